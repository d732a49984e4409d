//! A sharded server (`--shards 2`): viewers spread over two engine loops, each with its own
//! thread and viewer socket; the leader's FFmpeg feeds both; caps, DELETE, listings, metrics
//! and stream stops work across shards. Written once, instantiated for the tokio and smol
//! binaries (the blocking one runs one loop and refuses `--shards`).

use std::time::Duration;

use whep_e2e::viewer::{Viewer, ViewerError};
use whep_e2e::{Server, chromium, wait_until};

const PLAY_WITHIN: Duration = Duration::from_secs(25);

fn connect(server: &Server) -> Viewer {
    Viewer::connect(server.http, "/whep/demo", None).unwrap_or_else(|e| panic!("viewer: {e}"))
}

/// The shard a viewer's session lives on: the low byte of its session id, the last path
/// segment of its Location.
fn shard_of(v: &Viewer) -> u8 {
    let id = v.location().trim_end_matches('/').rsplit('/').next().unwrap_or_default();
    u8::from_str_radix(&id[id.len().saturating_sub(2)..], 16).expect("hex session id")
}

/// The port of the host candidate in an SDP answer.
fn candidate_port(answer: &str) -> Option<u16> {
    let line = answer.lines().find(|l| l.starts_with("a=candidate:"))?;
    line.split_whitespace().nth(5)?.parse().ok()
}

fn viewers_play_on_both_shards(bin: &str) {
    let mut server =
        Server::start(bin, &["--shards", "2", "--max-viewers", "3", "--max-viewers-total", "10"]);
    let viewers: Vec<Viewer> = (0..3).map(|_| connect(&server)).collect();
    let shards: Vec<u8> = viewers.iter().map(shard_of).collect();
    // Each POST goes to the shard with the fewest viewers.
    assert_eq!(shards, vec![0, 1, 0], "placement");
    let ports: Vec<Option<u16>> = viewers.iter().map(|v| candidate_port(v.answer())).collect();
    assert_ne!(ports[0], ports[1], "each shard answers with its own socket: {ports:?}");
    assert_eq!(ports[0], ports[2]);
    for v in &viewers {
        assert!(
            v.wait_for(PLAY_WITHIN, |s| s.video_packets >= 100
                && s.audio_packets >= 20
                && s.first_keyframe_at.is_some()),
            "viewer on shard {} did not play: {:?}\n{}",
            shard_of(v),
            v.stats(),
            server.output()
        );
        let s = v.stats();
        assert_eq!(s.video_seq.lost(), 0, "video loss on shard {}: {s:?}", shard_of(v));
    }
    // The per-stream cap counts the viewers of both shards.
    match Viewer::connect(server.http, "/whep/demo", None) {
        Err(ViewerError::Rejected { status, body }) => assert_eq!(status, 503, "{body}"),
        other => panic!("4th viewer: expected 503, got {other:?}"),
    }
    // Listings and metrics count both shards; counters are summed.
    assert_eq!(server.metric("whep_viewers_current"), Some(3.0));
    assert_eq!(server.metric("whep_viewers{stream=\"demo\"}"), Some(3.0));
    assert_eq!(server.metric("whep_shard_viewers{shard=\"0\"}"), Some(2.0));
    assert_eq!(server.metric("whep_shard_viewers{shard=\"1\"}"), Some(1.0));
    assert_eq!(server.metric("whep_viewers_joined_total"), Some(3.0));
    assert_eq!(server.metric("whep_cap_rejections_total"), Some(1.0));
    assert_eq!(server.stream("demo")["viewers"], 3);
    let forwarded = server.metric("whep_packets_forwarded_total").unwrap_or(0.0);
    assert!(forwarded >= 360.0, "forwarded {forwarded}");
    // A DELETE reaches the viewer's own shard.
    let mut viewers = viewers.into_iter();
    let (a, b, c) = (viewers.next(), viewers.next(), viewers.next());
    let (a, b, c) = (a.expect("a"), b.expect("b"), c.expect("c"));
    assert_eq!(b.delete().expect("DELETE"), 204);
    assert!(wait_until(Duration::from_secs(5), || {
        server.metric("whep_shard_viewers{shard=\"1\"}") == Some(0.0)
    }));
    // Stopping the stream closes the viewers of every shard; starting it again serves both.
    let r = server.admin("POST", "/api/streams/demo/stop", "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        wait_until(Duration::from_secs(5), || server.metric("whep_viewers_current") == Some(0.0)),
        "viewers left after a stop: {:?}",
        server.metric("whep_viewers_current")
    );
    server
        .wait_stream("demo", Duration::from_secs(10), |s| s["state"] == "stopped")
        .unwrap_or_else(|s| panic!("demo not stopped: {s}"));
    let r = server.admin("POST", "/api/streams/demo/start", "");
    assert_eq!(r.status, 200, "{}", r.text());
    let again: Vec<Viewer> = (0..2).map(|_| connect(&server)).collect();
    assert_eq!(again.iter().map(shard_of).collect::<Vec<_>>(), vec![0, 1]);
    for v in &again {
        assert!(
            v.wait_for(PLAY_WITHIN, |s| s.video_packets >= 100 && s.audio_packets >= 20),
            "after restart, shard {}: {:?}",
            shard_of(v),
            v.stats()
        );
    }
    drop((a, c));
    again.into_iter().for_each(Viewer::close);
    let status = server.terminate(Duration::from_secs(15)).expect("server exits");
    assert!(status.success(), "{status:?}\n{}", server.output());
}

/// Headless Chromium decodes the demo from shard 1 (a str0m viewer takes shard 0 first).
fn chromium_plays_from_second_shard(bin: &str) {
    let mut server = Server::start(bin, &["--shards", "2"]);
    let first = connect(&server);
    assert_eq!(shard_of(&first), 0);
    let url = format!("http://{}/?stream=demo&test=1&frames=30&timeout=30", server.http);
    let verdict = chromium::run_page(&url, Duration::from_secs(45))
        .unwrap_or_else(|e| panic!("{e}\nserver output:\n{}", server.output()));
    assert!(verdict.contains("[WHEP] PASS"), "{verdict}\nserver output:\n{}", server.output());
    assert_eq!(server.metric("whep_shard_viewers{shard=\"1\"}"), Some(1.0), "{verdict}");
    eprintln!(
        "chromium on shard 1: firstFrameMs={}",
        chromium::field(&verdict, "firstFrameMs").unwrap_or("?")
    );
    first.close();
}

/// A session id that names a shard the server does not have (its low byte is the shard): the
/// leader answers as for any unknown session, within the rate limits.
fn made_up_session_on_a_missing_shard(bin: &str) {
    let server = Server::start(bin, &["--shards", "2", "--no-demo"]);
    let r = server.admin("POST", "/api/streams", r#"{"id":"ext","external":true}"#);
    assert_eq!(r.status, 201, "{}", r.text());
    let target = "/whep/ext/0123456789abcdef0123456789abcd05";
    let frag = ("Content-Type", "application/trickle-ice-sdpfrag");
    assert_eq!(server.request("DELETE", target, &[], b"").status, 204);
    let r = server.request("PATCH", target, &[frag], b"a=end-of-candidates\r\n");
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(server.request("GET", target, &[], b"").status, 404);
    let statuses: Vec<u16> =
        (0..150).map(|_| server.request("GET", target, &[], b"").status).collect();
    assert!(statuses.iter().all(|s| [404, 429].contains(s)), "{statuses:?}");
    assert!(statuses.contains(&429), "requests to a missing shard escape the rate limit");
}

/// The leader's FFmpeg is killed: the viewers of both shards are closed (as on a server of one
/// loop), and once FFmpeg is back viewers play on both again.
fn ffmpeg_crash_closes_viewers_on_every_shard(bin: &str) {
    let server = Server::start(bin, &["--shards", "2"]);
    let running = server
        .wait_stream("demo", PLAY_WITHIN, |s| s["state"] == "running" && s["pid"].is_u64())
        .unwrap_or_else(|s| panic!("demo not running: {s}"));
    let pid = running["pid"].as_u64().and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
    let viewers: Vec<Viewer> = (0..2).map(|_| connect(&server)).collect();
    assert_eq!(viewers.iter().map(shard_of).collect::<Vec<_>>(), [0, 1]);
    for v in &viewers {
        assert!(v.wait_for(PLAY_WITHIN, |s| s.video_packets > 30), "{:?}", v.stats());
    }
    assert!(whep_e2e::signal(pid, nix::sys::signal::Signal::SIGKILL), "kill FFmpeg {pid}");
    for v in &viewers {
        assert!(
            v.wait_for(Duration::from_secs(10), |s| s.closed),
            "a viewer on shard {} outlived its stream's FFmpeg: {:?}",
            shard_of(v),
            v.stats()
        );
    }
    assert!(
        wait_until(Duration::from_secs(5), || server.metric("whep_viewers_current") == Some(0.0))
    );
    server
        .wait_stream("demo", PLAY_WITHIN, |s| {
            s["state"] == "running" && s["pid"].as_u64().is_some_and(|p| p != u64::from(pid))
        })
        .unwrap_or_else(|s| panic!("FFmpeg not restarted: {s}"));
    let again: Vec<Viewer> = (0..2).map(|_| connect(&server)).collect();
    for v in &again {
        assert!(v.wait_for(PLAY_WITHIN, |s| s.video_packets > 30), "{:?}", v.stats());
    }
    again.into_iter().for_each(Viewer::close);
}

whep_e2e::runtime_suite!(
    [tokio, smol]
    viewers_play_on_both_shards,
    chromium_plays_from_second_shard,
    ffmpeg_crash_closes_viewers_on_every_shard,
    made_up_session_on_a_missing_shard,
);

#[test]
fn blocking_refuses_shards() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_whepd-blocking"))
        .args(["--shards", "2", "--no-demo", "--http", "127.0.0.1:0", "--udp", "127.0.0.1:0"])
        .output()
        .expect("run whepd-blocking");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--shards"), "{stderr}");
}
