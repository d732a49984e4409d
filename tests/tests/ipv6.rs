//! IPv6 end to end, per runtime: a server bound dual-stack (`[::]`, its viewer socket, ICE-TCP
//! listener and HTTP listener) serves viewers in an IPv6-only network namespace (a veth pair
//! with addresses from fd77:6::/48 and no IPv4 inside but `lo`): a str0m viewer over UDP and
//! over ICE-TCP, and headless Chromium loading the player page from `http://[fd77:6:…::1]:port`;
//! the server's log names the viewer's IPv6 address. The same server still serves an IPv4
//! viewer, which its sockets see at an IPv4-mapped address (`[::ffff:127.0.0.1]`) and the
//! core as plain IPv4, over UDP and TCP.

use std::net::{Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use whep_e2e::netns::Netns;
use whep_e2e::viewer::{Viewer, ViewerOptions};
use whep_e2e::{Server, chromium};

/// Bound for a viewer to connect and receive both media; FFmpeg needs a moment to start.
const PLAY_WITHIN: Duration = Duration::from_secs(25);

/// A port free for UDP and TCP on `[::]` (both released again): the server's viewer socket
/// and ICE-TCP listener, whose host candidate must be given before it starts.
fn free_port() -> u16 {
    for _ in 0..32 {
        let udp = std::net::UdpSocket::bind("[::]:0").expect("UDP on [::]");
        let port = udp.local_addr().expect("addr").port();
        if std::net::TcpListener::bind(("::", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP");
}

/// An IPv6-only namespace and a server bound to `[::]` (HTTP on an ephemeral port, viewer
/// socket and ICE-TCP on `port`) that advertises the namespace's host end as its candidate;
/// with the server's HTTP address as the namespace reaches it.
fn ipv6_setup(bin: &str) -> (Netns, Server, SocketAddr, Ipv6Addr) {
    let ns = Netns::create_ipv6_only().expect("IPv6-only network namespace (needs root)");
    let (host6, peer6) = (ns.host6.expect("host end"), ns.peer6.expect("namespace end"));
    let port = free_port();
    let candidate = SocketAddr::from((host6, port)).to_string();
    let server =
        Server::start_with(bin, "[::]:0", &format!("[::]:{port}"), &["--candidate", &candidate]);
    assert_eq!(server.udp.to_string(), format!("[::]:{port}"), "not bound dual-stack");
    let http = SocketAddr::from((host6, server.http.port()));
    (ns, server, http, peer6)
}

/// The server logs the viewer as connected from `peer` (its IPv6 address).
fn assert_logged_from(server: &mut Server, peer: Ipv6Addr) {
    let needle = format!("from=[{peer}]:");
    let line = server.wait_line(Duration::from_secs(5), |l| {
        l.contains("viewer connected") && l.contains(&needle)
    });
    assert!(line.is_some(), "no `viewer connected {needle}` in the log:\n{}", server.output());
}

/// A str0m viewer inside the IPv6-only namespace (UDP, or ICE-TCP with `tcp`) plays the demo
/// from the dual-stack server: its offer and the answer's candidate are IPv6.
fn str0m_viewer_plays_from_ipv6_only_namespace(bin: &str, tcp: bool) {
    let (ns, mut server, http, peer6) = ipv6_setup(bin);
    let options = if tcp { ViewerOptions::default().tcp(None) } else { ViewerOptions::default() };
    let v = ns
        .enter(|| Viewer::connect_with(http, "/whep/demo", None, &options))
        .expect("enter the namespace")
        .unwrap_or_else(|e| panic!("viewer in the namespace: {e}\n{}", server.output()));
    assert_eq!(v.local_addr().ip(), peer6, "the viewer is not on the namespace's IPv6 address");
    assert!(
        v.wait_for(PLAY_WITHIN, |s| s.video_packets >= 200 && s.audio_packets >= 50),
        "IPv6 viewer did not play: {:?}\n{}",
        v.stats(),
        server.output()
    );
    let s = v.stats();
    assert_eq!(s.first_video_is_keyframe, Some(true), "{s:?}");
    let host6 = http.ip().to_string();
    let proto = if tcp { "tcp" } else { "udp" };
    assert!(
        v.answer().lines().any(|l| l.starts_with("a=candidate:")
            && l.contains(&format!(" {proto} "))
            && l.contains(&format!(" {host6} "))),
        "no IPv6 {proto} candidate {host6} in the answer:\n{}",
        v.answer()
    );
    let transport = format!("whep_viewers_transport{{transport=\"{proto}\"}}");
    assert_eq!(server.metric(&transport), Some(1.0), "{}", server.output());
    assert_logged_from(&mut server, peer6);
    let first = s.first_keyframe_at.zip(s.posted_at).map(|(k, p)| k - p);
    eprintln!("str0m over IPv6/{proto}: POST to first keyframe {first:?}");
    v.close();
}

fn str0m_viewer_plays_over_ipv6_udp(bin: &str) {
    str0m_viewer_plays_from_ipv6_only_namespace(bin, false);
}

fn str0m_viewer_plays_over_ipv6_tcp(bin: &str) {
    str0m_viewer_plays_from_ipv6_only_namespace(bin, true);
}

/// Headless Chromium in the IPv6-only namespace loads the player page from
/// `http://[fd77:6:…::1]:port/` and plays the demo over IPv6.
fn chromium_plays_over_ipv6(bin: &str) {
    let (ns, mut server, http, peer6) = ipv6_setup(bin);
    let url = format!("http://{http}/?stream=demo&test=1&frames=30&timeout=40");
    let started = Instant::now();
    let run = chromium::run_page_in(Some(ns.name()), &url, Duration::from_secs(55));
    let verdict =
        run.verdict.unwrap_or_else(|e| panic!("{e}\nserver output:\n{}", server.output()));
    assert!(verdict.contains("[WHEP] PASS"), "{verdict}\nserver output:\n{}", server.output());
    eprintln!(
        "chromium over IPv6: firstFrameMs={} (POST to first decoded frame), browser start to \
         PASS {} ms, proto={}",
        chromium::field(&verdict, "firstFrameMs").unwrap_or("?"),
        started.elapsed().as_millis(),
        chromium::field(&verdict, "proto").unwrap_or("?"),
    );
    assert_logged_from(&mut server, peer6);
}

/// A server bound dual-stack with its default candidates still serves an IPv4 viewer (on
/// loopback), over UDP and over ICE-TCP: its sockets see `[::ffff:127.0.0.1]`, the viewer's
/// candidate says `127.0.0.1`, and the pair still matches.
fn ipv4_viewer_plays_from_dual_stack_server(bin: &str) {
    let mut server = Server::start_with(bin, "[::]:0", "[::]:0", &[]);
    assert!(server.udp.is_ipv6() && server.udp.ip().is_unspecified(), "{}", server.udp);
    assert!(server.http.is_ipv4(), "the listening line names 127.0.0.1: {}", server.http);
    let udp = Viewer::connect(server.http, "/whep/demo", None).expect("UDP viewer");
    let tcp =
        Viewer::connect_with(server.http, "/whep/demo", None, &ViewerOptions::default().tcp(None))
            .expect("TCP viewer");
    for (v, name) in [(&udp, "UDP"), (&tcp, "TCP")] {
        assert!(
            v.wait_for(PLAY_WITHIN, |s| s.video_packets >= 200 && s.audio_packets >= 50),
            "IPv4 {name} viewer of a dual-stack server did not play: {:?}\n{}",
            v.stats(),
            server.output()
        );
        assert!(v.answer().contains(" 127.0.0.1 "), "{}", v.answer());
        assert!(!v.answer().contains("::ffff:"), "{}", v.answer());
    }
    assert_eq!(server.metric("whep_viewers_transport{transport=\"udp\"}"), Some(1.0));
    assert_eq!(server.metric("whep_viewers_transport{transport=\"tcp\"}"), Some(1.0));
    let line = server.wait_line(Duration::from_secs(5), |l| {
        l.contains("viewer connected") && l.contains("from=127.0.0.1:")
    });
    assert!(line.is_some(), "IPv4 viewer not logged as IPv4:\n{}", server.output());
}

whep_e2e::runtime_suite!(
    str0m_viewer_plays_over_ipv6_udp,
    str0m_viewer_plays_over_ipv6_tcp,
    chromium_plays_over_ipv6,
    ipv4_viewer_plays_from_dual_stack_server,
);
