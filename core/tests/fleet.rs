//! A node of a fleet behind a load balancer, in the simulation: its session URLs carry its
//! node tag, requests naming another node's tag find nothing here, and a draining node refuses
//! new viewers (503 + Retry-After, readiness says why) while its viewers keep playing.

use std::time::Duration;

use whep_core::sim::{self, SimWorld};
use whep_core::whep::Method;
use whep_core::{CoreConfig, StreamConfig, WhepRequest};

const SEC: Duration = Duration::from_secs(1);

fn node(tag: &str) -> CoreConfig {
    CoreConfig { node_id: Some(tag.into()), ..sim::config() }
}

#[test]
fn session_urls_carry_the_node_tag_and_route_only_here() {
    let mut w = SimWorld::new(node("n1"));
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let (v, r) = w.join(&demo);
    assert_eq!(r.code(), 201);
    let location = r.header("location").unwrap_or_default().to_owned();
    let session = location.strip_prefix("/whep/demo/n1.").expect("tagged session URL");
    assert_eq!(session.len(), 32, "{location}");
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 30);
    // The same session under another node's tag, or none, is not found here...
    let other = w.http(WhepRequest::new(Method::Get, format!("/whep/demo/n2.{session}")));
    assert_eq!(other.code(), 404);
    // ... but the bare id and the tagged URL are.
    let bare = w.http(WhepRequest::new(Method::Get, format!("/whep/demo/{session}")));
    assert_ne!(bare.code(), 404);
    let r = w.http(WhepRequest::new(Method::Delete, location));
    assert_eq!(r.code(), 204);
    assert_eq!(w.core.viewer_count(), 0);
}

#[test]
fn a_public_url_makes_session_urls_absolute_and_their_paths_route_here() {
    let origin = "https://n1.example.org:8443";
    let config = CoreConfig { public_url: Some(origin.into()), ..sim::config() };
    let mut w = SimWorld::new(config);
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let (v, r) = w.join(&demo);
    assert_eq!(r.code(), 201);
    let location = r.header("location").unwrap_or_default().to_owned();
    let path = location.strip_prefix(origin).expect("absolute session URL");
    assert!(path.starts_with("/whep/demo/") && path.len() == "/whep/demo/".len() + 32, "{path}");
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 30);
    // The client's requests at that URL carry its path.
    let mut patch = WhepRequest::new(Method::Patch, path.to_owned());
    patch.headers.push(("Content-Type".into(), "application/trickle-ice-sdpfrag".into()));
    patch.body = b"a=end-of-candidates\r\n".to_vec();
    assert_eq!(w.http(patch).code(), 204);
    assert_eq!(w.http(WhepRequest::new(Method::Delete, path.to_owned())).code(), 204);
    assert_eq!(w.core.viewer_count(), 0);
}

#[test]
fn a_draining_node_refuses_posts_and_keeps_its_viewers() {
    let mut w = SimWorld::new(node("n1"));
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let (v, _) = w.join(&demo);
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 30);
    assert_eq!(w.core.readiness(), Ok(()));
    w.core.set_draining(true);
    assert_eq!(w.core.readiness(), Err("draining"));
    let (_, r) = w.join(&demo);
    assert_eq!(r.code(), 503);
    assert!(r.header("retry-after").is_some());
    assert!(String::from_utf8_lossy(&r.body).contains("draining"));
    let before = w.viewers[v].video_packets;
    w.run_for(5 * SEC);
    assert!(w.viewers[v].video_packets > before + 100, "the viewer keeps playing");
    let r = w.http(w.session_request(v, Method::Delete));
    assert_eq!(r.code(), 204, "its session still answers");
}

#[test]
fn readiness_says_full_at_the_total_cap() {
    let mut w = SimWorld::new(CoreConfig { max_viewers_total: 1, ..node("n1") });
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let (_, r) = w.join(&demo);
    assert_eq!(r.code(), 201);
    assert_eq!(w.core.readiness(), Err("full"));
}
