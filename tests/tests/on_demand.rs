//! On-demand streams with real FFmpeg: the stream is idle (no FFmpeg) until a str0m viewer
//! POSTs; the POST is answered at once, video starts at FFmpeg's first keyframe; after the last
//! viewer leaves, FFmpeg is stopped once the close delay has passed and the stream is idle
//! again; the next viewer starts it again. On every runtime.
//!
//! The first-frame measurement (POST to the first complete keyframe, FFmpeg started by the
//! POST), release build:
//!
//! ```sh
//! cargo test -p whep-e2e --release --test on_demand -- --ignored --nocapture
//! ```
//!
//! With `--shards 2` (tokio, smol): a POST on the follower shard starts the leader's FFmpeg
//! once, and FFmpeg stops only when neither shard has a viewer; `first_frame_on_demand_follower_shard`
//! measures the first frame of a viewer on the follower.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use whep_e2e::viewer::Viewer;
use whep_e2e::{Server, children_of, wait_until};

const CLOSE_AFTER_SECS: u64 = 3;

fn config(tag: &str, close_after: u64) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("whep-on-demand-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("whepd.toml");
    let toml = format!(
        "[streams.od]\nlavfi = \"testsrc2=size=640x360:rate=30\"\ngop = 60\n\
         on_demand = true\non_demand_close_after_secs = {close_after}\n"
    );
    std::fs::write(&path, toml).expect("write config");
    path
}

fn state(server: &Server) -> String {
    server.stream("od")["state"].as_str().unwrap_or_default().to_owned()
}

/// Connects a viewer to the idle stream and returns it with the time from its POST to the first
/// complete keyframe.
fn watch(server: &mut Server) -> (Viewer, Duration) {
    let v = Viewer::connect(server.http, "/whep/od", None).unwrap_or_else(|e| panic!("{e}"));
    let played = v.wait_for(Duration::from_secs(20), |s| {
        s.first_keyframe_at.is_some() && s.video_packets > 60 && s.audio_packets > 20
    });
    assert!(played, "no media: {:?}\n{}", v.stats(), server.output());
    let s = v.stats();
    let (Some(posted), Some(key)) = (s.posted_at, s.first_keyframe_at) else {
        panic!("no timestamps: {s:?}");
    };
    (v, key - posted)
}

/// The stream's last viewer `v` leaves (DELETE): FFmpeg runs on through the close delay, then
/// stops and the stream is idle. Returns the time from the DELETE to FFmpeg gone.
fn last_viewer_leaves(server: &mut Server, v: Viewer) -> Duration {
    let pid = server.pid();
    assert_eq!(v.delete().expect("DELETE"), 204);
    let left = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(state(server), "running", "stopped before the close delay");
    assert!(
        wait_until(Duration::from_secs(CLOSE_AFTER_SECS + 10), || children_of(pid).is_empty()),
        "FFmpeg still runs {:?} after the last viewer left\n{}",
        left.elapsed(),
        server.output()
    );
    let stopped = left.elapsed();
    assert!(stopped >= Duration::from_secs(CLOSE_AFTER_SECS), "stopped after {stopped:?}");
    assert!(server.wait_stream("od", Duration::from_secs(5), |s| s["state"] == "idle").is_ok());
    stopped
}

fn on_demand_starts_and_stops(bin: &str) {
    let path = config("play", CLOSE_AFTER_SECS);
    let mut server = Server::start(bin, &["--config", path.to_str().unwrap_or_default()]);
    let pid = server.pid();
    assert_eq!(state(&server), "idle");
    std::thread::sleep(Duration::from_millis(500));
    assert!(children_of(pid).is_empty(), "FFmpeg runs before any viewer");

    let posted = Instant::now();
    let a = Viewer::connect(server.http, "/whep/od", None).unwrap_or_else(|e| panic!("{e}"));
    let answered = posted.elapsed();
    let s = state(&server);
    assert!(s == "starting" || s == "running", "state after the POST: {s}");
    assert!(a.wait_for(Duration::from_secs(20), |s| s.first_keyframe_at.is_some()
        && s.video_packets > 60));
    assert_eq!(a.stats().first_video_is_keyframe, Some(true));
    let st = a.stats();
    let first = st.first_keyframe_at.zip(st.posted_at).map(|(k, p)| k - p);
    eprintln!("on demand: POST answered in {answered:?}, first keyframe {first:?} after the POST");
    assert!(server.wait_stream("od", Duration::from_secs(5), |s| s["state"] == "running").is_ok());
    assert_eq!(children_of(pid).len(), 1, "one FFmpeg");

    // A second viewer joins the running FFmpeg.
    let (b, second) = watch(&mut server);
    eprintln!("second viewer (FFmpeg already up): first keyframe {second:?} after the POST");
    assert_eq!(a.delete().expect("DELETE"), 204);
    std::thread::sleep(Duration::from_secs(CLOSE_AFTER_SECS + 1));
    assert_eq!(state(&server), "running", "one viewer still watches");
    let stopped = last_viewer_leaves(&mut server, b);
    eprintln!(
        "FFmpeg gone {stopped:?} after the last viewer left (close delay {CLOSE_AFTER_SECS} s)"
    );
    assert_eq!(server.metric("whep_ingest_port_pairs_in_use"), Some(0.0));

    // The next viewer starts it again.
    let (_c, again) = watch(&mut server);
    eprintln!("on demand again: first keyframe {again:?} after the POST");
    assert_eq!(server.terminate(Duration::from_secs(15)).map(|s| s.success()), Some(true));
}

/// Five on-demand starts in a row (close delay 1 s): POST to the first complete keyframe.
#[test]
#[ignore = "measurement; run in release with --ignored --nocapture"]
fn first_frame_on_demand() {
    let path = config("measure", 1);
    let mut server = Server::start(
        env!("CARGO_BIN_EXE_whepd-tokio"),
        &["--config", path.to_str().unwrap_or_default()],
    );
    measure_starts(&mut server, "", |_| {});
}

/// Five starts of the idle stream `od`, each by one viewer's POST (which `check` looks at)
/// and ended by its DELETE: prints POST to first complete keyframe, labelled `label`.
fn measure_starts(server: &mut Server, label: &str, check: impl Fn(&Viewer)) {
    let mut times = Vec::new();
    for run in 0..5 {
        assert!(
            server.wait_stream("od", Duration::from_secs(20), |s| s["state"] == "idle").is_ok()
        );
        let (v, first) = watch(server);
        check(&v);
        eprintln!("run {run}: first keyframe {} ms after the POST{label}", first.as_millis());
        times.push(first.as_millis());
        assert_eq!(v.delete().expect("DELETE"), 204);
    }
    times.sort_unstable();
    eprintln!(
        "first frame on demand{label} (ms): min {} median {} max {} of {:?}",
        times[0], times[2], times[4], times
    );
}

/// A config with the on-demand stream `od` and an external stream `hold` (no FFmpeg, no
/// media): a viewer of `hold` on shard 0 makes the next POST go to shard 1.
fn sharded_config(tag: &str, close_after: u64) -> PathBuf {
    let path = config(tag, close_after);
    let mut toml = std::fs::read_to_string(&path).expect("read config");
    toml.push_str("\n[streams.hold]\nexternal = true\n");
    std::fs::write(&path, toml).expect("write config");
    path
}

/// The shard a viewer's session lives on: the low byte of its session id (Location).
fn shard_of(v: &Viewer) -> u8 {
    let id = v.location().trim_end_matches('/').rsplit('/').next().unwrap_or_default();
    u8::from_str_radix(&id[id.len().saturating_sub(2)..], 16).expect("hex session id")
}

/// How often the leader started the on-demand stream for a viewer (its log line).
fn starts(server: &mut Server) -> usize {
    server.output().matches("first viewer: starting the stream (on demand)").count()
}

fn connect(server: &Server, path: &str) -> Viewer {
    Viewer::connect(server.http, path, None).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn plays(server: &mut Server, v: &Viewer) {
    let played = v.wait_for(Duration::from_secs(20), |s| {
        s.first_keyframe_at.is_some() && s.video_packets > 60 && s.audio_packets > 20
    });
    assert!(played, "no media on shard {}: {:?}\n{}", shard_of(v), v.stats(), server.output());
    assert_eq!(v.stats().first_video_is_keyframe, Some(true), "shard {}", shard_of(v));
}

/// `--shards 2`: a POST on the follower shard starts the leader's FFmpeg (once), the viewers of
/// both shards play, FFmpeg runs while a viewer on either shard watches and stops the close
/// delay after the last one of both left; POSTs on both shards while it starts start it once.
fn on_demand_with_two_shards(bin: &str) {
    let path = sharded_config("shards", CLOSE_AFTER_SECS);
    let mut server =
        Server::start(bin, &["--config", path.to_str().unwrap_or_default(), "--shards", "2"]);
    let pid = server.pid();
    assert_eq!(state(&server), "idle");
    std::thread::sleep(Duration::from_millis(500));
    assert!(children_of(pid).is_empty(), "FFmpeg runs before any viewer");
    let hold = connect(&server, "/whep/hold");
    assert_eq!(shard_of(&hold), 0);

    // A POST on the follower starts FFmpeg on the leader.
    let a = connect(&server, "/whep/od");
    assert_eq!(shard_of(&a), 1, "placement");
    plays(&mut server, &a);
    let st = a.stats();
    let first = st.first_keyframe_at.zip(st.posted_at).map(|(k, p)| k - p);
    eprintln!("on demand, viewer on the follower shard: first keyframe {first:?} after the POST");
    let b = connect(&server, "/whep/od");
    assert_eq!(shard_of(&b), 0, "placement");
    plays(&mut server, &b);
    assert_eq!(children_of(pid).len(), 1, "one FFmpeg");
    assert_eq!(starts(&mut server), 1);
    assert_eq!(server.stream("od")["viewers"], 2);

    // The leader's viewer leaves: the follower's keeps FFmpeg running.
    assert_eq!(b.delete().expect("DELETE"), 204);
    std::thread::sleep(Duration::from_secs(CLOSE_AFTER_SECS + 1));
    assert_eq!(state(&server), "running", "stopped while the follower's viewer watches");
    let before = a.stats().video_packets;
    assert!(a.wait_for(Duration::from_secs(5), |s| s.video_packets > before + 30));
    // The follower's leaves too: stopped after the close delay.
    let stopped = last_viewer_leaves(&mut server, a);
    eprintln!("sharded: FFmpeg gone {stopped:?} after the last viewer of both shards left");

    // Two POSTs back to back, one per shard, the second while FFmpeg is starting: one FFmpeg,
    // both play.
    let c = connect(&server, "/whep/od");
    let d = connect(&server, "/whep/od");
    assert_eq!((shard_of(&c), shard_of(&d)), (1, 0), "placement");
    plays(&mut server, &c);
    plays(&mut server, &d);
    assert_eq!(children_of(pid).len(), 1, "one FFmpeg");
    assert_eq!(starts(&mut server), 2, "started once more");
    drop(hold);
    assert_eq!(server.terminate(Duration::from_secs(15)).map(|s| s.success()), Some(true));
}

/// As [`first_frame_on_demand`] with `--shards 2`, for a viewer on the follower shard (a
/// viewer of `hold` on the leader places it there): its POST reaches the leader as a demand,
/// FFmpeg's packets reach it through the leader's mirror queue.
#[test]
#[ignore = "measurement; run in release with --ignored --nocapture"]
fn first_frame_on_demand_follower_shard() {
    let path = sharded_config("measure-shards", 1);
    let mut server = Server::start(
        env!("CARGO_BIN_EXE_whepd-tokio"),
        &["--config", path.to_str().unwrap_or_default(), "--shards", "2"],
    );
    let hold = connect(&server, "/whep/hold");
    assert_eq!(shard_of(&hold), 0);
    measure_starts(&mut server, ", follower shard", |v| assert_eq!(shard_of(v), 1, "placement"));
}

whep_e2e::runtime_suite!(on_demand_starts_and_stops,);

/// The blocking server runs one loop and refuses `--shards`.
mod sharded {
    #[test]
    fn tokio() {
        super::on_demand_with_two_shards(env!("CARGO_BIN_EXE_whepd-tokio"));
    }

    #[test]
    fn smol() {
        super::on_demand_with_two_shards(env!("CARGO_BIN_EXE_whepd-smol-e2e"));
    }
}
