//! A server whose viewer socket and ICE-TCP listener are dual-stack (bound to `[::]`): the
//! kernel reports an IPv4 viewer at its IPv4-mapped IPv6 address (`[::ffff:a.b.c.d]`), while
//! its offer names the plain IPv4 address. The core matches both forms as one, so such a viewer
//! plays over UDP and over TCP, and counts as one client in the per-client limits.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use whep_core::sim::{self, SimWorld};
use whep_core::whep::Method;
use whep_core::{CoreConfig, StreamConfig, WhepRequest, canonical_addr, tcp};

const SEC: Duration = Duration::from_secs(1);

fn dual_stack_world(config: CoreConfig) -> SimWorld {
    let mut w = SimWorld::new(config);
    w.dual_stack = true;
    w
}

#[test]
fn an_ipv4_viewer_seen_as_ipv4_mapped_plays_over_udp() {
    let mut w = dual_stack_world(sim::config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let (v, r) = w.join(&demo);
    assert_eq!(r.code(), 201);
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 100 && w.viewers[v].audio_packets > 20);
    let viewer = &w.viewers[v];
    assert!(viewer.connected, "the checks from the mapped address did not connect it");
    assert_eq!(viewer.first_video_is_keyframe, Some(true));
    assert_eq!(w.core.viewers_by_transport().udp, 1);
}

#[test]
fn an_ipv4_viewer_seen_as_ipv4_mapped_plays_over_tcp() {
    let config = CoreConfig { tcp_candidates: vec![sim::SERVER], ..sim::config() };
    let mut w = dual_stack_world(config);
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let (v, r) = w.join_tcp(&demo, tcp::DEFAULT_QUEUE_BYTES);
    assert_eq!(r.code(), 201);
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 100);
    assert!(w.viewers[v].connected);
    let by = w.core.viewers_by_transport();
    assert_eq!((by.udp, by.tcp), (0, 1));
}

#[test]
fn configured_candidates_in_mapped_form_are_advertised_as_ipv4() {
    let mapped = SocketAddr::new(
        IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped()),
        sim::SERVER.port(),
    );
    assert_eq!(canonical_addr(mapped), sim::SERVER);
    let config = CoreConfig { host_candidates: vec![mapped], ..sim::config() };
    let mut w = dual_stack_world(config);
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let (v, r) = w.join(&demo);
    assert_eq!(r.code(), 201);
    assert!(w.viewers[v].answer.contains("192.0.2.1 3478 typ host"), "{}", w.viewers[v].answer);
    assert!(!w.viewers[v].answer.contains("::ffff:"), "{}", w.viewers[v].answer);
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 10);
    assert!(w.viewers[v].connected);
}

#[test]
fn an_ipv4_client_and_its_mapped_form_share_one_unconnected_budget() {
    let config = CoreConfig { max_unconnected_per_client: 2, ..sim::config() };
    let mut w = SimWorld::new(config);
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let v4 = Ipv4Addr::new(198, 51, 100, 7);
    let post = |client: IpAddr| {
        let offer = include_str!("data/chromium-156-offer.sdp");
        WhepRequest::new(Method::Post, format!("/whep/{demo}"))
            .with_header("Content-Type", "application/sdp")
            .with_body(offer)
            .with_client(client)
    };
    assert_eq!(w.http(post(IpAddr::V4(v4))).code(), 201);
    assert_eq!(w.http(post(IpAddr::V6(v4.to_ipv6_mapped()))).code(), 201);
    // Two sessions still connecting, one under each form: the third is one too many.
    assert_eq!(w.http(post(IpAddr::V4(v4))).code(), 429);
    assert_eq!(w.http(post(IpAddr::V6(v4.to_ipv6_mapped()))).code(), 429);
    // Another client is not held back.
    assert_eq!(w.http(post(IpAddr::from([198, 51, 100, 8]))).code(), 201);
}
