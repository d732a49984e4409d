//! ICE over TCP in the simulation: a viewer that can only use TCP plays through the core's
//! passive TCP candidate, RFC 4571 framed; a full send queue drops whole frames and the viewer
//! resumes at a keyframe; connections that bind to no viewer are closed, and their number is
//! bounded.

use std::net::SocketAddr;
use std::time::Duration;

use whep_core::sim::{self, SimWorld};
use whep_core::{CoreConfig, StreamConfig, StreamId, tcp};

const SEC: Duration = Duration::from_secs(1);

fn tcp_config() -> CoreConfig {
    CoreConfig { tcp_candidates: vec![sim::SERVER], ..sim::config() }
}

fn world() -> (SimWorld, StreamId) {
    let mut w = SimWorld::new(tcp_config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    (w, demo)
}

#[test]
fn the_answer_has_a_passive_tcp_candidate_below_the_udp_one() {
    let (mut w, demo) = world();
    let (v, r) = w.join(&demo);
    assert_eq!(r.code(), 201);
    let answer = &w.viewers[v].answer;
    let prio = |proto: &str| {
        answer
            .lines()
            .filter(|l| l.starts_with("a=candidate:"))
            .find(|l| l.split(' ').nth(2) == Some(proto))
            .and_then(|l| l.split(' ').nth(3)?.parse::<u32>().ok())
            .unwrap_or_else(|| panic!("no {proto} candidate in {answer}"))
    };
    assert!(answer.contains("tcptype passive"), "{answer}");
    assert!(prio("tcp") < prio("udp"), "TCP must rank below UDP");
}

#[test]
fn a_tcp_viewer_connects_and_receives_media() {
    let (mut w, demo) = world();
    let (v, r) = w.join_tcp(&demo, tcp::DEFAULT_QUEUE_BYTES);
    assert_eq!(r.code(), 201);
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 100 && w.viewers[v].audio_packets > 20);
    let viewer = &w.viewers[v];
    assert!(viewer.connected);
    assert_eq!(viewer.first_video_is_keyframe, Some(true));
    let seqs = &viewer.video_seqs;
    let span = seqs.last().expect("video") - seqs.first().expect("video") + 1;
    assert_eq!(span, seqs.len() as u64, "nothing lost over TCP");
    let by = w.core.viewers_by_transport();
    assert_eq!((by.udp, by.tcp), (0, 1));
    assert_eq!(w.core.tcp_connections(), 1);
    let m = w.core.metrics();
    assert!(m.tcp_frames_in >= 4, "checks and DTLS came over TCP: {}", m.tcp_frames_in);
    assert_eq!((m.tcp_accepted, m.tcp_frames_dropped), (1, 0));
    // A UDP viewer next to it is counted as one.
    let (u, _) = w.join(&demo);
    w.drive_until(5 * SEC, |w| w.viewers[u].video_packets > 10);
    let by = w.core.viewers_by_transport();
    assert_eq!((by.udp, by.tcp), (1, 1));
}

#[test]
fn a_full_send_queue_drops_whole_frames_and_the_viewer_resumes_at_a_keyframe() {
    let (mut w, demo) = world();
    let (v, _) = w.join_tcp(&demo, 16 * 1024);
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 100);
    w.viewers[v].record = true;
    // The viewer stops reading for two seconds: its queue fills, the rest is dropped.
    w.viewers[v].tcp.as_mut().expect("tcp").stalled = true;
    w.run_for(2 * SEC);
    let dropped = w.viewers[v].tcp.as_ref().expect("tcp").dropped;
    assert!(dropped > 50, "frames dropped: {dropped}");
    assert_eq!(w.core.metrics().tcp_frames_dropped, dropped);
    let stalled_at = w.now;
    w.viewers[v].tcp.as_mut().expect("tcp").stalled = false;
    w.run_for(3 * SEC);
    let viewer = &w.viewers[v];
    assert!(!viewer.closed && viewer.connected, "the slow viewer is not dropped");
    // The frames queued before the drop arrive, then a gap, then video starts again with a
    // keyframe: every jump past the highest sequence number received lands on a keyframe's
    // first packet (packets below it are NACK repairs of what was dropped).
    let arrivals = &viewer.arrivals;
    let mut jumps = 0;
    let mut highest = arrivals.first().map_or(0, |a| a.seq);
    for a in arrivals {
        if a.seq > highest + 1 {
            jumps += 1;
            assert!(a.keyframe_start, "video resumed mid-GOP after a drop at {highest}: {a:?}");
        }
        highest = highest.max(a.seq);
    }
    assert!(jumps >= 1, "the drop shows as a gap");
    assert!(
        arrivals.iter().filter(|a| a.at > stalled_at).count() > 100,
        "video flows again after the stall"
    );
}

#[test]
fn a_stalled_tcp_viewer_does_not_hold_back_a_udp_viewer() {
    let (mut w, demo) = world();
    let (t, _) = w.join_tcp(&demo, 16 * 1024);
    let (u, _) = w.join(&demo);
    w.drive_until(5 * SEC, |w| w.viewers[t].video_packets > 50 && w.viewers[u].video_packets > 50);
    w.viewers[t].tcp.as_mut().expect("tcp").stalled = true;
    let before = w.viewers[u].video_packets;
    let gaps = |w: &SimWorld| {
        let s = &w.viewers[u].video_seqs;
        s.last().expect("video") - s.first().expect("video") + 1 - s.len() as u64
    };
    w.run_for(2 * SEC);
    // 30 fps for two seconds, several packets a frame.
    assert!(w.viewers[u].video_packets - before > 60);
    assert_eq!(gaps(&w), 0, "the UDP viewer lost nothing");
    assert!(w.core.metrics().tcp_frames_dropped > 0);
}

#[test]
fn a_connection_that_names_no_viewer_is_closed_after_the_timeout() {
    let (mut w, _) = world();
    let peer: SocketAddr = "10.9.9.9:50000".parse().expect("addr");
    let conn = w.tcp_open_raw(peer);
    // A well-framed STUN request with credentials no viewer has: ignored, not bound.
    let check =
        sim::binding_request("a=ice-ufrag:nobody\r\na=ice-pwd:secretsecretsecret\r\n", "x", 1);
    w.tcp_raw(conn, &tcp::encode(&check).expect("short"));
    w.run_for(9 * SEC);
    assert!(w.tcp_closed.is_empty(), "still within the bind timeout");
    w.run_for(2 * SEC);
    assert!(w.tcp_closed.contains(&conn));
    assert_eq!(w.core.tcp_connections(), 0);
    assert_eq!(w.core.metrics().tcp_unbound_closed, 1);
}

#[test]
fn garbage_on_a_connection_closes_it() {
    let (mut w, _) = world();
    let conn = w.tcp_open_raw("10.9.9.9:50001".parse().expect("addr"));
    w.tcp_raw(conn, &[0xff, 0xff, 0, 1, 2, 3]);
    assert!(w.tcp_closed.contains(&conn));
    assert_eq!(w.core.metrics().tcp_framing_errors, 1);
}

#[test]
fn connections_beyond_the_limit_are_closed_at_once() {
    let mut w = SimWorld::new(CoreConfig { max_tcp_connections: 3, ..tcp_config() });
    let conns: Vec<_> =
        (0..5).map(|i| w.tcp_open_raw(SocketAddr::from(([10, 9, 9, 9], 50_000 + i)))).collect();
    assert_eq!(w.core.tcp_connections(), 3);
    assert_eq!(w.tcp_closed.iter().copied().collect::<Vec<_>>(), conns[3..].to_vec());
    assert_eq!(w.core.metrics().tcp_refused, 2);
    // One goes: there is room for one more.
    w.core.handle_input(whep_core::Input::TcpClosed { conn: conns[0] }, w.now);
    let again = w.tcp_open_raw(SocketAddr::from(([10, 9, 9, 9], 50_100)));
    assert!(!w.tcp_closed.contains(&again));
    assert_eq!(w.core.tcp_connections(), 3);
}

#[test]
fn without_tcp_candidates_connections_are_refused() {
    let mut w = SimWorld::new(sim::config());
    let conn = w.tcp_open_raw("10.9.9.9:50002".parse().expect("addr"));
    assert!(w.tcp_closed.contains(&conn));
    assert_eq!(w.core.metrics().tcp_refused, 1);
}

#[test]
fn a_viewer_that_leaves_has_its_connection_closed() {
    let (mut w, demo) = world();
    let (v, _) = w.join_tcp(&demo, tcp::DEFAULT_QUEUE_BYTES);
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 10);
    let req = w.session_request(v, whep_core::whep::Method::Delete);
    assert_eq!(w.http(req).code(), 204);
    let conn = w.viewers[v].tcp.as_ref().expect("tcp").conn;
    assert!(w.tcp_closed.contains(&conn));
    assert_eq!(w.core.tcp_connections(), 0);
}

#[test]
fn a_viewer_whose_media_goes_to_its_relay_candidate_counts_as_relayed() {
    let (mut w, demo) = world();
    let (v, _) = w.join(&demo);
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 10);
    let by = w.core.viewers_by_transport();
    assert_eq!((by.udp, by.tcp, by.relayed), (1, 0, 0));
    // The viewer announces that its address is a TURN relay's (as a player behind one does).
    let addr = w.viewers[v].addr;
    let frag = format!(
        "a=candidate:7 1 udp 16777215 {ip} {port} typ relay raddr {ip} rport {port}\r\n",
        ip = addr.ip(),
        port = addr.port()
    );
    let r = w.http(
        w.session_request(v, whep_core::whep::Method::Patch)
            .with_header("Content-Type", "application/trickle-ice-sdpfrag")
            .with_body(frag),
    );
    assert_eq!(r.code(), 204, "{}", String::from_utf8_lossy(&r.body));
    let by = w.core.viewers_by_transport();
    assert_eq!((by.udp, by.tcp, by.relayed), (0, 0, 1));
}
