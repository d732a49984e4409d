//! The end-to-end suite: a real server process per test, real FFmpeg feeding it, real HTTP and
//! UDP, str0m viewers and a headless Chromium watching. Written once, instantiated per runtime
//! binary by `suite!`.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use whep_e2e::netns::Netns;
use whep_e2e::viewer::{Viewer, ViewerError, ViewerOptions};
use whep_e2e::{Server, chromium, firefox, process_alive, wait_until};

const CHROMIUM_OFFER: &str = include_str!("../../core/tests/data/chromium-156-offer.sdp");
const SDP: (&str, &str) = ("Content-Type", "application/sdp");

/// Bound for a viewer to connect and receive both media; FFmpeg needs a moment to start.
const PLAY_WITHIN: Duration = Duration::from_secs(25);

fn plays(v: &Viewer, video: u64, audio: u64) -> bool {
    v.wait_for(PLAY_WITHIN, |s| s.video_packets >= video && s.audio_packets >= audio)
}

fn assert_plays(v: &Viewer, server: &mut Server) {
    assert!(
        plays(v, 100, 20),
        "viewer did not receive media: {:?}\nserver output:\n{}",
        v.stats(),
        server.output()
    );
}

fn connect(server: &Server, stream: &str) -> Viewer {
    Viewer::connect(server.http, &format!("/whep/{stream}"), None)
        .unwrap_or_else(|e| panic!("viewer of {stream}: {e}"))
}

fn running_pid(server: &Server, stream: &str) -> u32 {
    let s = server
        .wait_stream(stream, PLAY_WITHIN, |s| s["state"] == "running" && s["pid"].is_u64())
        .unwrap_or_else(|s| panic!("{stream} not running: {s}"));
    u32::try_from(s["pid"].as_u64().unwrap_or_default()).unwrap_or_default()
}

fn ports_of(s: &serde_json::Value) -> Option<(u16, u16)> {
    let p = s["ports"].as_array()?;
    let port = |i: usize| p.get(i)?.as_u64().and_then(|v| u16::try_from(v).ok());
    Some((port(0)?, port(1)?))
}

fn can_bind(port: u16) -> bool {
    std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
}

/// Chromium opens the player page, POSTs its offer, decodes 30 frames of the demo stream and
/// receives audio.
fn chromium_plays_demo(bin: &str) {
    let mut server = Server::start(bin, &[]);
    let url = format!("http://{}/?stream=demo&test=1&frames=30&timeout=30", server.http);
    let started = Instant::now();
    let verdict = chromium::run_page(&url, Duration::from_secs(45))
        .unwrap_or_else(|e| panic!("{e}\nserver output:\n{}", server.output()));
    assert!(verdict.contains("[WHEP] PASS"), "{verdict}\nserver output:\n{}", server.output());
    let frames: u64 =
        chromium::field(&verdict, "framesDecoded").and_then(|v| v.parse().ok()).unwrap_or(0);
    let audio: u64 =
        chromium::field(&verdict, "audioPackets").and_then(|v| v.parse().ok()).unwrap_or(0);
    assert!(frames >= 30 && audio > 0, "{verdict}");
    // The first decoded frame's time is measured (the time on screen, from the frame callback,
    // is best effort: with three browsers on two cores the page can pass before its first
    // frame is composited).
    // The page offers H264 with its retransmission format, so a lost packet can be resent.
    assert_eq!(chromium::field(&verdict, "rtx"), Some("1"), "no RTX negotiated: {verdict}");
    assert_eq!(chromium::field(&verdict, "codec"), Some("video/H264"), "{verdict}");
    // The answer carries ICE-TCP candidates too; where UDP works, UDP wins.
    assert_eq!(chromium::field(&verdict, "proto"), Some("udp"), "{verdict}");
    assert_eq!(server.metric("whep_tcp_frames_in_total"), Some(0.0), "{verdict}");
    let ms = chromium::field(&verdict, "firstFrameMs").and_then(|v| v.parse::<u64>().ok());
    assert!(ms.is_some_and(|ms| ms > 0), "firstFrameMs missing: {verdict}");
    tracing::info!(
        first_frame_ms = chromium::field(&verdict, "firstFrameMs"),
        total_ms = started.elapsed().as_millis(),
        "chromium verdict"
    );
    eprintln!(
        "chromium: firstFrameMs={} (POST to first decoded frame), firstPresentedMs={} (to \
         the first frame on screen), browser start to PASS {} ms",
        chromium::field(&verdict, "firstFrameMs").unwrap_or("?"),
        chromium::field(&verdict, "firstPresentedMs").unwrap_or("?"),
        started.elapsed().as_millis()
    );
    assert_eq!(server.metric("whep_viewers_joined_total"), Some(1.0));
}

/// Debian's Firefox ESR (no OpenH264: it offers VP8, VP9 and AV1) opens the player page, gets
/// the demo's VP8 rendition, decodes 30 frames and receives audio. The server's UDP socket is on
/// every address: Firefox gathers no loopback candidate (see [`Server::start_on`]).
fn firefox_plays_demo(bin: &str) {
    // Firefox gathers no loopback candidate: it runs in a namespace, the server on the
    // namespace's host-side veth address (HTTP and WebRTC), so traffic stays on the veth pair.
    let ns = Netns::create().expect("network namespace (needs root)");
    let host = ns.host.to_string();
    let mut server = Server::start_with(bin, &format!("{host}:0"), &format!("{host}:0"), &[]);
    let url = format!("http://{}/?stream=demo&test=1&frames=30&timeout=30", server.http);
    let started = Instant::now();
    let verdict = firefox::run_page_in(Some(ns.name()), &url, Duration::from_secs(45))
        .unwrap_or_else(|e| panic!("{e}\nserver output:\n{}", server.output()));
    assert!(verdict.contains("[WHEP] PASS"), "{verdict}\nserver output:\n{}", server.output());
    let frames: u64 =
        firefox::field(&verdict, "framesDecoded").and_then(|v| v.parse().ok()).unwrap_or(0);
    let audio: u64 =
        firefox::field(&verdict, "audioPackets").and_then(|v| v.parse().ok()).unwrap_or(0);
    assert!(frames >= 30 && audio > 0, "{verdict}");
    let codec = firefox::field(&verdict, "codec").map(str::to_ascii_lowercase);
    assert_eq!(codec.as_deref(), Some("video/vp8"), "not the VP8 rendition: {verdict}");
    // The page offers VP8 with its retransmission format when the browser has no H264.
    assert_eq!(firefox::field(&verdict, "rtx"), Some("1"), "no RTX negotiated: {verdict}");
    let ms = firefox::field(&verdict, "firstFrameMs").and_then(|v| v.parse::<u64>().ok());
    assert!(ms.is_some_and(|ms| ms > 0), "firstFrameMs missing: {verdict}");
    eprintln!(
        "firefox: firstFrameMs={} (POST to first decoded frame), codec={}, browser start to \
         PASS {} ms",
        firefox::field(&verdict, "firstFrameMs").unwrap_or("?"),
        firefox::field(&verdict, "codec").unwrap_or("?"),
        started.elapsed().as_millis()
    );
    assert_eq!(server.metric("whep_viewers_joined_total"), Some(1.0));
}

/// Several str0m viewers all play; the one over the per-stream cap gets 503 with Retry-After;
/// a DELETE frees a slot.
fn concurrent_viewers_and_cap(bin: &str) {
    let mut server = Server::start(bin, &["--max-viewers", "3"]);
    let viewers: Vec<Viewer> = (0..3).map(|_| connect(&server, "demo")).collect();
    for v in &viewers {
        assert_plays(v, &mut server);
    }
    match Viewer::connect(server.http, "/whep/demo", None) {
        Err(ViewerError::Rejected { status, body }) => {
            assert_eq!(status, 503, "{body}");
        }
        other => panic!("4th viewer: expected 503, got {other:?}"),
    }
    assert_eq!(server.metric("whep_cap_rejections_total"), Some(1.0));
    assert_eq!(server.metric("whep_viewers{stream=\"demo\"}"), Some(3.0));
    let mut viewers = viewers.into_iter();
    let first = viewers.next().expect("three viewers");
    assert_eq!(first.delete().expect("DELETE"), 204);
    assert!(wait_until(Duration::from_secs(5), || server.metric("whep_viewers{stream=\"demo\"}")
        == Some(2.0)));
    let again = connect(&server, "demo");
    assert_plays(&again, &mut server);
    let forwarded = server.metric("whep_packets_forwarded_total").unwrap_or(0.0);
    assert!(forwarded >= 400.0, "packets forwarded: {forwarded}");
    // Both latencies are measured (last copy per ingest packet, and every copy), from the
    // kernel's receive timestamps, and are plausible on an idle machine.
    for name in ["whep_egress_latency_seconds", "whep_egress_copy_latency_seconds"] {
        let count = server.metric(&format!("{name}_count")).unwrap_or(0.0);
        let sum = server.metric(&format!("{name}_sum")).unwrap_or(0.0);
        assert!(count >= 100.0, "{name}: {count} recorded");
        assert!(sum > 0.0 && sum / count < 0.5, "{name}: mean {} s", sum / count);
    }
}

/// Every error path of the HTTP surface over real HTTP.
fn http_error_paths(bin: &str) {
    let server = Server::start(bin, &[]);
    running_pid(&server, "demo");
    let post = |target: &str, headers: &[(&str, &str)], body: &[u8]| {
        server.request("POST", target, headers, body)
    };
    let r = post("/whep/nope", &[SDP], CHROMIUM_OFFER.as_bytes());
    assert_eq!((r.status, r.text().contains("stream not found")), (404, true), "{}", r.text());
    assert_eq!(post("/whep/demo", &[SDP], b"hello").status, 400);
    // No video codec we send (the demo has H264 and VP8): 406, naming what is missing.
    let other_codecs = CHROMIUM_OFFER
        .lines()
        .filter(|l| !["H264", "VP8"].iter().any(|c| l.contains(c)))
        .collect::<Vec<_>>()
        .join("\r\n");
    let r = post("/whep/demo", &[SDP], other_codecs.as_bytes());
    assert_eq!(r.status, 406, "VP9/AV1-only offer: {}", r.text());
    assert!(r.text().contains("missing H264 (packetization-mode=1) or VP8"), "{}", r.text());
    let r = post("/whep/demo", &[("Content-Type", "text/plain")], CHROMIUM_OFFER.as_bytes());
    assert_eq!(r.status, 415, "{}", r.text());
    let huge = vec![b'a'; 200 * 1024];
    assert_eq!(post("/whep/demo", &[SDP], &huge).status, 413);
    // PATCH and DELETE of sessions that do not exist.
    let frag = ("Content-Type", "application/trickle-ice-sdpfrag");
    let r = server.request("PATCH", "/whep/demo/0123456789abcdef", &[frag], b"a=ice-ufrag:x\r\n");
    assert_eq!(r.status, 404, "{}", r.text());
    // A real session: DELETE is 204, and 204 again when repeated.
    let r = post("/whep/demo", &[SDP], CHROMIUM_OFFER.as_bytes());
    assert_eq!(r.status, 201, "{}", r.text());
    let location = r.header("location").expect("Location").to_owned();
    assert!(r.header("etag").is_some());
    assert_eq!(server.request("DELETE", &location, &[], b"").status, 204);
    assert_eq!(server.request("DELETE", &location, &[], b"").status, 204);
    // CORS preflight.
    let r = server.request(
        "OPTIONS",
        "/whep/demo",
        &[("Origin", "https://player.example"), ("Access-Control-Request-Method", "POST")],
        b"",
    );
    assert_eq!(r.status, 204);
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert!(r.header("access-control-allow-methods").is_some_and(|m| m.contains("POST")));
    // The application routes.
    assert_eq!(server.request("GET", "/healthz", &[], b"").status, 200);
    let page = server.request("GET", "/", &[], b"");
    assert!(page.status == 200 && page.text().contains("/whep"), "player page");
    assert_eq!(server.request("GET", "/api/streams", &[], b"").status, 401, "admin needs a token");
    assert_eq!(server.metric("whep_viewers_current"), Some(0.0));
    assert!(
        server.metric("whep_requests_total{route=\"endpoint\",method=\"POST\",status=\"406\"}")
            == Some(1.0)
    );
}

/// SIGKILL of FFmpeg: the stream's viewers are closed, its ports released, FFmpeg restarted,
/// and a new viewer plays.
fn ffmpeg_kill_restarts(bin: &str) {
    let mut server = Server::start(bin, &[]);
    let pid = running_pid(&server, "demo");
    let viewer = connect(&server, "demo");
    assert_plays(&viewer, &mut server);
    assert!(whep_e2e::signal(pid, Signal::SIGKILL), "kill FFmpeg {pid}");
    assert!(
        viewer.wait_for(Duration::from_secs(20), |s| s.closed),
        "viewer of the killed stream was not closed: {:?}",
        viewer.stats()
    );
    let restarted = server
        .wait_stream("demo", PLAY_WITHIN, |s| {
            s["state"] == "running" && s["pid"].as_u64().is_some_and(|p| p != u64::from(pid))
        })
        .unwrap_or_else(|s| panic!("FFmpeg not restarted: {s}\n{}", server.output()));
    assert_eq!(restarted["restarts"], 1, "{restarted}");
    assert!(!process_alive(pid), "the killed FFmpeg is gone");
    assert_eq!(server.metric("whep_ffmpeg_restarts_total"), Some(1.0));
    assert_eq!(server.metric("whep_ingest_port_pairs_in_use"), Some(1.0));
    let left = server.metric("whep_viewers_left_total").unwrap_or(0.0);
    assert!(left >= 1.0, "viewers left: {left}");
    let again = connect(&server, "demo");
    assert_plays(&again, &mut server);
}

/// Stopping a stream through the admin API leaves no process, port or session; starting it
/// again plays; removing it forgets it.
fn stop_via_api_leaves_nothing(bin: &str) {
    let mut server = Server::start(bin, &[]);
    let pid = running_pid(&server, "demo");
    let ports = ports_of(&server.stream("demo")).expect("a running stream holds ports");
    let viewer = connect(&server, "demo");
    assert_plays(&viewer, &mut server);
    let r = server.admin("POST", "/api/streams/demo/stop", "");
    assert_eq!(r.status, 200, "{}", r.text());
    let stopped = server
        .wait_stream("demo", Duration::from_secs(15), |s| s["state"] == "stopped")
        .unwrap_or_else(|s| panic!("not stopped: {s}"));
    assert!(stopped["pid"].is_null() && stopped["ports"].is_null(), "{stopped}");
    assert_eq!(stopped["viewers"], 0);
    assert!(wait_until(Duration::from_secs(2), || !process_alive(pid)), "FFmpeg {pid} survived");
    assert!(can_bind(ports.0) && can_bind(ports.1), "ports {ports:?} still bound");
    assert!(viewer.wait_for(Duration::from_secs(10), |s| s.closed), "viewer not closed");
    assert_eq!(server.metric("whep_viewers_current"), Some(0.0));
    assert_eq!(server.metric("whep_ingest_port_pairs_in_use"), Some(0.0));
    let r = server.request("POST", "/whep/demo", &[SDP], CHROMIUM_OFFER.as_bytes());
    assert_eq!(r.status, 404, "a stopped stream takes no viewers");

    let r = server.admin("POST", "/api/streams/demo/start", "");
    assert_eq!(r.status, 200, "{}", r.text());
    let again = connect(&server, "demo");
    assert_plays(&again, &mut server);
    let pid = running_pid(&server, "demo");
    assert_eq!(server.admin("DELETE", "/api/streams/demo", "").status, 204);
    assert!(wait_until(Duration::from_secs(10), || !process_alive(pid)), "FFmpeg {pid} survived");
    assert_eq!(server.admin("GET", "/api/streams/demo", "").status, 404);
    assert!(
        wait_until(Duration::from_secs(5), || server.metric("whep_viewers_current") == Some(0.0))
    );
}

/// Streams added through the admin API play; bad specs are refused with 400 and a reason.
/// (`lavfi` over the API needs the operator's opt-in; `admin_policy.rs` tests the policy.)
fn admin_adds_streams(bin: &str) {
    let mut server = Server::start(bin, &["--no-demo", "--admin-raw-ffmpeg"]);
    let r = server.admin("POST", "/api/streams", r#"{"id":"x"}"#);
    assert_eq!(r.status, 400, "{}", r.text());
    let r = server.admin("POST", "/api/streams", r#"{"id":"x","lavfi":"testsrc2","bogus":1}"#);
    assert_eq!(r.status, 400, "{}", r.text());
    let spec = r#"{"id":"cam:1","lavfi":"testsrc2=size=320x240:rate=15","gop":15}"#;
    let r = server.admin("POST", "/api/streams", spec);
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(server.admin("POST", "/api/streams", spec).status, 409, "duplicate id");
    let viewer = connect(&server, "cam:1");
    assert_plays(&viewer, &mut server);
}

/// SIGTERM: whepd closes viewers, stops FFmpeg and exits 0 without leaving a process behind.
fn sigterm_leaves_no_orphan(bin: &str) {
    let mut server = Server::start(bin, &[]);
    let pid = running_pid(&server, "demo");
    let viewer = connect(&server, "demo");
    assert_plays(&viewer, &mut server);
    let status = server.terminate(Duration::from_secs(15)).expect("whepd exits after SIGTERM");
    assert!(status.success(), "exit status {status}");
    assert!(!process_alive(pid), "FFmpeg {pid} outlived whepd");
    assert!(viewer.wait_for(Duration::from_secs(10), |s| s.closed), "viewer not closed");
}

/// SIGKILL of whepd itself: its FFmpeg dies with it (parent-death signal), no orphan.
fn killed_server_leaves_no_ffmpeg(bin: &str) {
    let mut server = Server::start(bin, &[]);
    let pid = running_pid(&server, "demo");
    assert!(whep_e2e::signal(server.pid(), Signal::SIGKILL));
    assert!(
        wait_until(Duration::from_secs(5), || !process_alive(pid)),
        "FFmpeg {pid} outlived a killed server\n{}",
        server.output()
    );
}

/// An FFmpeg that stops sending (SIGSTOP) is detected as stale, killed (it cannot act on
/// SIGTERM while stopped) and restarted; the settings come from a configuration file.
fn stalled_ffmpeg_is_restarted(bin: &str) {
    let dir = std::env::temp_dir().join(format!("whep-e2e-stale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join(format!("{:?}.toml", std::thread::current().id()).replace(['(', ')'], ""));
    std::fs::write(
        &file,
        "stale_timeout_secs = 2\nstop_grace_secs = 1\n\n[streams.slow]\nlavfi = \"testsrc2=size=320x240:rate=15\"\ngop = 15\n",
    )
    .expect("write config");
    let mut server = Server::start(bin, &["--config", file.to_str().expect("utf-8 path")]);
    let pid = running_pid(&server, "slow");
    let viewer = connect(&server, "slow");
    assert!(plays(&viewer, 30, 10), "{:?}\n{}", viewer.stats(), server.output());
    assert!(whep_e2e::signal(pid, Signal::SIGSTOP), "stop FFmpeg {pid}");
    let restarted = server.wait_stream("slow", PLAY_WITHIN, |s| {
        s["state"] == "running" && s["pid"].as_u64().is_some_and(|p| p != u64::from(pid))
    });
    let _ = std::fs::remove_dir_all(&dir);
    let restarted = restarted.unwrap_or_else(|s| panic!("not restarted: {s}\n{}", server.output()));
    assert_eq!(restarted["restarts"], 1, "{restarted}");
    assert!(wait_until(Duration::from_secs(5), || !process_alive(pid)), "stalled FFmpeg survived");
    assert!(viewer.wait_for(Duration::from_secs(10), |s| s.closed), "viewer not closed");
    let again = connect(&server, "slow");
    assert!(plays(&again, 30, 10), "{:?}", again.stats());
}

/// A missing FFmpeg is a clear error naming the fix.
fn missing_ffmpeg_is_a_clear_error(bin: &str) {
    let out = std::process::Command::new(bin)
        .args(["--http", "127.0.0.1:0", "--udp", "127.0.0.1:0", "--ffmpeg", "/nonexistent/ffmpeg"])
        .output()
        .expect("run the server");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("apt-get install ffmpeg"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A player without H264 (as Debian's Firefox, which has no OpenH264) gets the demo's VP8
/// rendition, from a keyframe, with audio, next to an H264 viewer; the stream lists the
/// rendition and its viewer.
fn vp8_viewer_gets_the_vp8_rendition(bin: &str) {
    let mut server = Server::start(bin, &[]);
    running_pid(&server, "demo");
    let options = ViewerOptions::default().vp8_only(true);
    let vp8 = Viewer::connect_with(server.http, "/whep/demo", None, &options)
        .unwrap_or_else(|e| panic!("VP8 viewer: {e}"));
    let h264 = connect(&server, "demo");
    assert_plays(&vp8, &mut server);
    assert_plays(&h264, &mut server);
    assert_eq!(vp8.stats().first_video_is_keyframe, Some(true), "VP8 starts at a key frame");
    assert_eq!(
        server.metric("whep_rendition_viewers{stream=\"demo\",rendition=\"1\",codec=\"VP8\"}"),
        Some(1.0)
    );
    let demo = server.stream("demo");
    let renditions = &demo["renditions"];
    assert_eq!(renditions[0]["codec"], "H264", "{demo}");
    assert_eq!(
        (renditions[1]["codec"].as_str(), renditions[1]["viewers"].as_u64()),
        (Some("VP8"), Some(1)),
        "{demo}"
    );
    vp8.close();
    h264.close();
}

/// The player page recovers by itself: when FFmpeg dies its viewers' sessions are closed, and
/// the page (retry=1) says so, starts a new session after its backoff and plays again; it passes
/// only once a second session has decoded its frames (reconnects=1). The page is the same for
/// every runtime, so one runtime is enough.
#[test]
fn chromium_page_reconnects_when_the_server_closes_its_session() {
    let mut server = Server::start(env!("CARGO_BIN_EXE_whepd-tokio"), &[]);
    let pid = running_pid(&server, "demo");
    let url = format!(
        "http://{}/?stream=demo&test=1&frames=30&timeout=60&retry=1&reconnects=1",
        server.http
    );
    let page = std::thread::spawn(move || chromium::run_page(&url, Duration::from_secs(75)));
    // The first session plays, then its stream's FFmpeg dies.
    let playing = server.wait_stream("demo", PLAY_WITHIN, |s| s["viewers"].as_u64() == Some(1));
    assert!(playing.is_ok(), "the page never joined: {playing:?}\n{}", server.output());
    std::thread::sleep(Duration::from_secs(2));
    assert!(whep_e2e::signal(pid, Signal::SIGKILL), "kill FFmpeg {pid}");
    let verdict = page
        .join()
        .expect("page thread")
        .unwrap_or_else(|e| panic!("{e}\nserver output:\n{}", server.output()));
    assert!(verdict.contains("[WHEP] PASS"), "{verdict}\nserver output:\n{}", server.output());
    let reconnects = chromium::number(&verdict, "reconnects").unwrap_or(0.0);
    assert!(reconnects >= 1.0, "no reconnect: {verdict}");
    eprintln!(
        "reconnect: lastEnd={} reconnects={reconnects} firstFrameMs={} (of the new session)",
        chromium::field(&verdict, "lastEnd").unwrap_or("?"),
        chromium::field(&verdict, "firstFrameMs").unwrap_or("?"),
    );
    let joined = server.metric("whep_viewers_joined_total").unwrap_or(0.0);
    assert!(joined >= 2.0, "one session only: {joined}");
}

whep_e2e::runtime_suite!(
    chromium_plays_demo,
    firefox_plays_demo,
    concurrent_viewers_and_cap,
    http_error_paths,
    vp8_viewer_gets_the_vp8_rendition,
    ffmpeg_kill_restarts,
    stop_via_api_leaves_nothing,
    admin_adds_streams,
    sigterm_leaves_no_orphan,
    killed_server_leaves_no_ffmpeg,
    stalled_ffmpeg_is_restarted,
    missing_ffmpeg_is_a_clear_error,
);
