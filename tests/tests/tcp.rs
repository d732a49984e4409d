//! ICE over TCP (RFC 6544) end to end, per runtime: a str0m viewer that has only a TCP
//! candidate plays through the server's passive TCP candidate; a TCP viewer that stops reading
//! loses its own frames (counted) while a UDP viewer of the same stream keeps its full rate;
//! headless Chromium in a network namespace whose UDP to the server is dropped plays over TCP.

use std::time::{Duration, Instant};

use whep_e2e::netns::Netns;
use whep_e2e::viewer::{Viewer, ViewerOptions};
use whep_e2e::{Server, chromium, wait_until};

/// Bound for a viewer to connect and receive both media; FFmpeg needs a moment to start.
const PLAY_WITHIN: Duration = Duration::from_secs(25);

fn tcp_viewer(server: &Server, rcvbuf: Option<usize>) -> Viewer {
    Viewer::connect_with(server.http, "/whep/demo", None, &ViewerOptions::default().tcp(rcvbuf))
        .unwrap_or_else(|e| panic!("TCP viewer: {e}"))
}

/// A str0m viewer with no UDP candidate connects to the TCP listener the server opens next to
/// its UDP socket by default, and receives video from a keyframe on, and audio, with nothing
/// lost; `/metrics` counts it as a TCP viewer.
fn str0m_viewer_plays_over_tcp(bin: &str) {
    let mut server = Server::start(bin, &[]);
    let v = tcp_viewer(&server, None);
    assert!(
        v.wait_for(PLAY_WITHIN, |s| s.video_packets >= 200 && s.audio_packets >= 50),
        "TCP viewer did not play: {:?}\n{}",
        v.stats(),
        server.output()
    );
    let s = v.stats();
    assert_eq!(s.first_video_is_keyframe, Some(true), "{s:?}");
    assert_eq!(s.video_seq.lost(), 0, "TCP loses nothing: {s:?}");
    assert!(v.answer().contains("tcptype passive"), "{}", v.answer());
    assert_eq!(server.metric("whep_viewers_transport{transport=\"tcp\"}"), Some(1.0));
    assert_eq!(server.metric("whep_viewers_transport{transport=\"udp\"}"), Some(0.0));
    assert_eq!(server.metric("whep_tcp_connections"), Some(1.0));
    assert_eq!(server.metric("whep_tcp_frames_dropped_total"), Some(0.0));
    let first = s.first_keyframe_at.zip(s.posted_at).map(|(k, p)| k - p);
    eprintln!("str0m over TCP: POST to first keyframe {first:?}");
    v.close();
    assert!(
        wait_until(Duration::from_secs(10), || server.metric("whep_tcp_connections") == Some(0.0)),
        "the connection of a viewer that left stays open"
    );
}

/// A TCP viewer stops reading (a tiny receive buffer: its window closes at once). Its frames
/// beyond a 16 KiB queue are dropped whole and counted, and the engine loop never waits for
/// it: a UDP viewer of the same stream keeps receiving every packet at the stream's pace.
fn stalled_tcp_reader_does_not_delay_udp_viewer(bin: &str) {
    let mut server = Server::start(bin, &["--tcp-queue-kib", "16"]);
    let udp = Viewer::connect(server.http, "/whep/demo", None).expect("UDP viewer");
    let tcp = tcp_viewer(&server, Some(4096));
    for v in [&udp, &tcp] {
        assert!(
            v.wait_for(PLAY_WITHIN, |s| s.video_packets >= 100),
            "viewer did not play: {:?}\n{}",
            v.stats(),
            server.output()
        );
    }
    // The UDP viewer's pace with both viewers reading (once the GOP each started with is
    // out), then with the TCP viewer stalled.
    std::thread::sleep(Duration::from_secs(3));
    let window = Duration::from_secs(4);
    let (rate_before, _) = pace(&udp, window);
    tcp.stall();
    let before = udp.stats();
    assert!(
        wait_until(Duration::from_secs(20), || server
            .metric("whep_tcp_frames_dropped_total")
            .is_some_and(|n| n >= 50.0)),
        "the stalled TCP viewer's frames were not dropped: {:?}\n{}",
        server.metric("whep_tcp_frames_dropped_total"),
        server.output()
    );
    // Its queue is full and it still does not read.
    let (rate, gaps) = pace(&udp, window);
    let after = udp.stats();
    let dropped = server.metric("whep_tcp_frames_dropped_total").unwrap_or(0.0);
    eprintln!(
        "UDP viewer while a TCP viewer stalled: {rate:.0} video packets/s (before: \
         {rate_before:.0}), {gaps} pauses over 1 s, max gap {:?}; {dropped} TCP frames dropped",
        after.max_video_gap,
    );
    assert!(!after.closed, "UDP viewer closed: {after:?}");
    assert_eq!(after.video_seq.lost(), before.video_seq.lost(), "the UDP viewer lost packets");
    assert!(
        rate > rate_before * 0.5,
        "UDP viewer slowed down: {rate:.0}/s against {rate_before:.0}/s"
    );
    // A frame every 33 ms: a loop that waited on the stalled socket would pause everyone's
    // video for good (the rate allows for a loaded machine running debug builds).
    assert_eq!(gaps, 0, "the UDP viewer's video paused while the TCP viewer stalled");
}

/// Video packets per second `v` receives over `window`, and its pauses over a second in it.
fn pace(v: &Viewer, window: Duration) -> (f64, u64) {
    let a = v.stats();
    std::thread::sleep(window);
    let b = v.stats();
    let rate = (b.video_packets - a.video_packets) as f64 / window.as_secs_f64();
    (rate, b.video_gaps_over_1s - a.video_gaps_over_1s)
}

/// Headless Chromium in a network namespace whose UDP to the server is dropped (nftables)
/// plays the demo over ICE-TCP: the page's selected pair is TCP and `/metrics` says so.
fn chromium_plays_over_tcp_without_udp(bin: &str) {
    let ns = Netns::create().expect("network namespace (needs root)");
    ns.drop_udp_to(ns.host.into()).expect("nftables rule in the namespace");
    let host = ns.host.to_string();
    let mut server = Server::start_with(bin, &format!("{host}:0"), &format!("{host}:0"), &[]);
    let url = format!("http://{}/?stream=demo&test=1&frames=30&timeout=40", server.http);
    let started = Instant::now();
    let run = chromium::run_page_in(Some(ns.name()), &url, Duration::from_secs(55));
    let verdict =
        run.verdict.unwrap_or_else(|e| panic!("{e}\nserver output:\n{}", server.output()));
    assert!(verdict.contains("[WHEP] PASS"), "{verdict}\nserver output:\n{}", server.output());
    assert_eq!(chromium::field(&verdict, "proto"), Some("tcp"), "not over TCP: {verdict}");
    assert!(
        ns.udp_dropped().is_some_and(|n| n > 0),
        "Chromium sent no UDP to the server: the rule proved nothing"
    );
    let tcp_viewers = server.metric("whep_viewers_transport{transport=\"tcp\"}");
    let frames_in = server.metric("whep_tcp_frames_in_total").unwrap_or(0.0);
    eprintln!(
        "chromium over ICE-TCP: firstFrameMs={} (POST to first decoded frame), browser start \
         to PASS {} ms, {frames_in} frames in",
        chromium::field(&verdict, "firstFrameMs").unwrap_or("?"),
        started.elapsed().as_millis()
    );
    assert!(frames_in > 0.0);
    // The page has just passed; the browser may already be gone when /metrics is read.
    assert!(
        tcp_viewers == Some(1.0) || server.metric("whep_tcp_connections_total") >= Some(1.0),
        "{:?}",
        tcp_viewers
    );
}

/// Whether the server closed `s` within `within` (a read sees the end, or a reset).
fn closed_by_server(s: &mut std::net::TcpStream, within: Duration) -> bool {
    use std::io::Read;
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 512];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let _ = s.set_read_timeout(Some(left.max(Duration::from_millis(1))));
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
    false
}

/// Bytes that are not RFC 4571 framing close the connection; connections beyond the limit
/// (256) are closed at once and counted; connections the clients close are forgotten.
fn tcp_garbage_and_floods_are_closed(bin: &str) {
    use std::io::Write;
    use std::net::TcpStream;
    let mut server = Server::start(bin, &[]);
    let addr = server.udp; // the ICE-TCP listener shares the UDP socket's port number
    let mut garbage = TcpStream::connect(addr).expect("ICE-TCP listener");
    garbage.write_all(&[0xff, 0xff, 1, 2, 3, 4]).expect("write");
    assert!(
        closed_by_server(&mut garbage, Duration::from_secs(5)),
        "garbage did not close the connection\n{}",
        server.output()
    );
    assert_eq!(server.metric("whep_tcp_framing_errors_total"), Some(1.0));
    let mut flood: Vec<TcpStream> =
        (0..300).map(|_| TcpStream::connect(addr).expect("connect")).collect();
    assert!(
        wait_until(Duration::from_secs(10), || server
            .metric("whep_tcp_connections_refused_total")
            .is_some_and(|n| n >= 44.0)),
        "connections beyond the limit not refused: {:?}\n{}",
        server.metric("whep_tcp_connections_refused_total"),
        server.output()
    );
    assert_eq!(server.metric("whep_tcp_connections"), Some(256.0));
    let closed = flood
        .iter_mut()
        .map(|s| closed_by_server(s, Duration::from_millis(20)))
        .filter(|c| *c)
        .count();
    assert_eq!(closed, 44, "exactly the connections beyond the limit are closed");
    drop(flood);
    assert!(
        wait_until(Duration::from_secs(10), || server.metric("whep_tcp_connections") == Some(0.0)),
        "closed connections not forgotten: {:?}",
        server.metric("whep_tcp_connections")
    );
    // And the server still serves a TCP viewer.
    let v = tcp_viewer(&server, None);
    assert!(v.wait_for(PLAY_WITHIN, |s| s.video_packets >= 50), "{:?}", v.stats());
}

whep_e2e::runtime_suite!(
    str0m_viewer_plays_over_tcp,
    stalled_tcp_reader_does_not_delay_udp_viewer,
    tcp_garbage_and_floods_are_closed,
    chromium_plays_over_tcp_without_udp,
);
