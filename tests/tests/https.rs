//! HTTPS (`--tls-cert`/`--tls-key`) on the tokio and smol servers: Chromium plays the player
//! page over https with a test certificate; SIGHUP swaps the certificate for new connections
//! while a viewer connected before keeps its media; a bad certificate at start is a clear
//! error exit, a bad one at SIGHUP keeps the previous certificate.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use whep_e2e::tls::{Issued, TestCa};
use whep_e2e::viewer::Viewer;
use whep_e2e::{Server, chromium, http, signal};

const PLAY_WITHIN: Duration = Duration::from_secs(25);

fn start_tls(bin: &str, files: &Issued, ca: &TestCa) -> Server {
    let (cert, key) = (files.cert.to_string_lossy(), files.key.to_string_lossy());
    let server = Server::start(bin, &["--tls-cert", &cert, "--tls-key", &key]);
    assert!(server.https, "the server does not say it listens on https");
    http::trust(server.http, &ca.ca_pem());
    server
}

/// Chromium loads the player page over https (trusting the test leaf by its public key, not
/// every certificate), POSTs its offer there, decodes 30 frames and receives audio.
fn chromium_plays_over_https(bin: &str) {
    let ca = TestCa::new("chromium");
    let files = ca.issue("server");
    let mut server = start_tls(bin, &files, &ca);
    let health = server.request("GET", "/healthz", &[], b"");
    assert_eq!(health.status, 200, "GET /healthz over TLS: {}", health.text());
    // Plain HTTP to the TLS port is no HTTP exchange, and each attempt's connection is closed.
    let baseline = server.resources();
    for _ in 0..20 {
        let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        let plain = http::raw(server.http, request, Duration::from_secs(2));
        assert!(plain.map_or(true, |r| r.status != 200), "plain HTTP served on the TLS port");
    }
    assert!(
        whep_e2e::wait_until(Duration::from_secs(5), || server.resources().fds <= baseline.fds),
        "failed handshakes left descriptors: {baseline:?} -> {:?}",
        server.resources()
    );
    let url = format!("https://{}/?stream=demo&test=1&frames=30&timeout=30", server.http);
    let flags = [format!("--ignore-certificate-errors-spki-list={}", files.spki_sha256())];
    let run = chromium::run_page_with(None, &url, Duration::from_secs(45), &flags);
    let verdict =
        run.verdict.unwrap_or_else(|e| panic!("{e}\nserver output:\n{}", server.output()));
    assert!(verdict.contains("[WHEP] PASS"), "{verdict}\nserver output:\n{}", server.output());
    let frames = chromium::number(&verdict, "framesDecoded").unwrap_or(0.0);
    let audio = chromium::number(&verdict, "audioPackets").unwrap_or(0.0);
    assert!(frames >= 30.0 && audio > 0.0, "{verdict}");
    assert_eq!(server.metric("whep_viewers_joined_total"), Some(1.0));
    eprintln!(
        "chromium over HTTPS: firstFrameMs={} (POST to first decoded frame)",
        chromium::field(&verdict, "firstFrameMs").unwrap_or("?")
    );
}

fn copy(from: &Issued, cert: &Path, key: &Path) {
    std::fs::copy(&from.cert, cert).expect("copy cert");
    std::fs::copy(&from.key, key).expect("copy key");
}

fn leaf(server: &Server) -> Vec<u8> {
    let chain = http::peer_certificates(server.http).expect("TLS handshake");
    chain.into_iter().next().expect("a certificate")
}

fn count(server: &mut Server, needle: &str) -> usize {
    server.output().lines().filter(|l| l.contains(needle)).count()
}

/// SIGHUP re-reads the files: a new connection gets the new certificate, a viewer that POSTed
/// over TLS before keeps receiving media; a broken file at the next SIGHUP keeps the new
/// certificate and logs an error; files that change without a signal are loaded too.
fn sighup_or_a_file_change_reloads_the_certificate(bin: &str) {
    let ca = TestCa::new("reload");
    let (first, second) = (ca.issue("first"), ca.issue("second"));
    let live = Issued { cert: ca.path("live.pem"), key: ca.path("live.key"), leaf: ca.path("-") };
    copy(&first, &live.cert, &live.key);
    let mut server = start_tls(bin, &live, &ca);
    assert_eq!(leaf(&server), first.leaf_der(), "not the first certificate");
    let viewer = Viewer::connect(server.http, "/whep/demo", None)
        .unwrap_or_else(|e| panic!("viewer over https: {e}\n{}", server.output()));
    let plays = |v: &Viewer, n: u64| v.wait_for(PLAY_WITHIN, |s| s.video_packets >= n);
    assert!(plays(&viewer, 100), "no media: {:?}\n{}", viewer.stats(), server.output());

    copy(&second, &live.cert, &live.key);
    assert!(signal(server.pid(), Signal::SIGHUP));
    // Within 1.5 s: before the file watch (every 2 s, a change settled for one look) could.
    assert!(
        whep_e2e::wait_until(Duration::from_millis(1500), || {
            count(&mut server, "TLS certificate loaded") >= 2
        }),
        "no reload logged:\n{}",
        server.output()
    );
    assert_eq!(leaf(&server), second.leaf_der(), "a new connection has the old certificate");
    let seen = viewer.stats().video_packets;
    assert!(plays(&viewer, seen + 100), "viewer lost: {:?}\n{}", viewer.stats(), server.output());

    std::fs::write(&live.cert, "-----BEGIN CERTIFICATE-----\nbroken\n").expect("write");
    assert!(signal(server.pid(), Signal::SIGHUP));
    assert!(
        server
            .wait_line(Duration::from_secs(5), |l| l.contains("TLS certificate not reloaded"))
            .is_some(),
        "no error logged:\n{}",
        server.output()
    );
    assert_eq!(leaf(&server), second.leaf_der(), "a failed reload changed the certificate");
    let health = server.request("GET", "/healthz", &[], b"");
    assert_eq!(health.status, 200);
    let seen = viewer.stats().video_packets;
    assert!(plays(&viewer, seen + 100), "viewer lost: {:?}\n{}", viewer.stats(), server.output());

    // No signal: the changed files are loaded within a few watch intervals.
    let third = ca.issue("third");
    copy(&third, &live.cert, &live.key);
    assert!(
        whep_e2e::wait_until(Duration::from_secs(10), || leaf(&server) == third.leaf_der()),
        "changed files not loaded:\n{}",
        server.output()
    );
    assert!(plays(&viewer, viewer.stats().video_packets + 50), "viewer lost: {:?}", viewer.stats());
    assert_eq!(server.metric("whep_viewers_joined_total"), Some(1.0));
    assert!(server.terminate(Duration::from_secs(10)).is_some_and(|s| s.success()));
}

fn run_to_exit(bin: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin)
        .args(["--http", "127.0.0.1:0", "--udp", "127.0.0.1:0", "--no-demo"])
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

/// A missing file, a key of another certificate, or only one of the two flags: the server
/// exits with an error that says what is wrong, before serving anything.
fn bad_certificate_at_start_is_an_error(bin: &str) {
    let ca = TestCa::new("bad");
    let (a, b) = (ca.issue("a"), ca.issue("b"));
    let missing = ca.path("missing.pem");
    let (cert, key, other_key) =
        (a.cert.to_string_lossy(), a.key.to_string_lossy(), b.key.to_string_lossy());
    let missing = missing.to_string_lossy();
    for (args, needle) in [
        (vec!["--tls-cert", &*missing, "--tls-key", &*key], &*missing),
        (vec!["--tls-cert", &*cert, "--tls-key", &*other_key], "does not belong"),
        (vec!["--tls-cert", &*cert], "needs --tls-key"),
    ] {
        let (code, text) = run_to_exit(bin, &args);
        assert!(code.is_some_and(|c| c != 0), "{args:?} exited {code:?}:\n{text}");
        assert!(text.contains(needle), "{args:?}: no {needle:?} in:\n{text}");
        assert!(!text.contains("listening on"), "{args:?} served:\n{text}");
    }
}

whep_e2e::runtime_suite!(
    [tokio, smol]
    chromium_plays_over_https,
    sighup_or_a_file_change_reloads_the_certificate,
    bad_certificate_at_start_is_an_error,
);
