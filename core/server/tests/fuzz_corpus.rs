//! Replays the committed fuzz corpora as an ordinary test on stable Rust: every file of every
//! `fuzz/corpus/<target>/` directory, and every crash file of `fuzz/artifacts/<target>/` (kept
//! as regression cases), goes through the matching `whep_server::fuzzing` function. A corpus
//! directory that is missing or empty fails the test, so a target cannot silently lose its
//! seeds.

use std::fs;
use std::path::{Path, PathBuf};

use whep_server::fuzzing::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join("fuzz")
}

/// The regular files of a directory, sorted; `None` if it does not exist.
fn files(dir: &Path) -> Option<Vec<PathBuf>> {
    let entries = fs::read_dir(dir).ok()?;
    let mut out: Vec<PathBuf> =
        entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_file()).collect();
    out.sort();
    Some(out)
}

fn replay(target: &str, run: fn(&[u8]), file: &Path) {
    let data = fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    eprintln!("{target}: {} ({} bytes)", file.display(), data.len());
    run(&data);
}

macro_rules! corpus_test {
    ($name:ident) => {
        #[test]
        fn $name() {
            let target = stringify!($name);
            let run = TARGETS
                .iter()
                .find(|(n, _)| *n == target)
                .map(|(_, f)| *f)
                .unwrap_or_else(|| panic!("no fuzz target {target}"));
            let dir = fuzz_dir().join("corpus").join(target);
            let corpus = files(&dir)
                .unwrap_or_else(|| panic!("corpus directory {} is missing", dir.display()));
            assert!(!corpus.is_empty(), "corpus directory {} is empty", dir.display());
            for file in &corpus {
                replay(target, run, file);
            }
            let artifacts = fuzz_dir().join("artifacts").join(target);
            for file in files(&artifacts).unwrap_or_default() {
                replay(target, run, &file);
            }
        }
    };
}

corpus_test!(offer);
corpus_test!(whep_request);
corpus_test!(sdpfrag);
corpus_test!(ingest);
corpus_test!(viewer_datagram);
corpus_test!(tcp_stream);
corpus_test!(ops);
corpus_test!(jwt);
corpus_test!(outbound);

#[test]
fn every_target_has_a_test_and_a_fuzz_target() {
    let tested = [
        "offer",
        "whep_request",
        "sdpfrag",
        "ingest",
        "viewer_datagram",
        "tcp_stream",
        "ops",
        "jwt",
        "outbound",
    ];
    let names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, tested, "a target without a corpus test");
    for name in names {
        let source = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
        assert!(source.is_file(), "{} is missing", source.display());
    }
    // No corpus directory without a target (a renamed target would leave its seeds unread).
    for dir in fs::read_dir(fuzz_dir().join("corpus")).into_iter().flatten().flatten() {
        let name = dir.file_name().to_string_lossy().into_owned();
        if dir.path().is_dir() {
            assert!(tested.contains(&name.as_str()), "corpus directory {name} has no target");
        }
    }
}

/// The targets reuse one world for many inputs at one virtual instant, as a fuzzing run does:
/// a real offer accepted 300 times in a row must stay a 201 each time (the rate limits once
/// turned the 201st into a 429 and the target into a crash).
#[test]
fn a_reused_world_accepts_every_input() {
    let offer = include_bytes!("../../tests/data/chromium-156-offer.sdp");
    for _ in 0..300 {
        whep_server::fuzzing::offer(offer);
    }
}
