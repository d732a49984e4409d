//! The sessions listing ([`Core::sessions`]), the operator's kick ([`Core::kick`]) and the
//! events an application or webhook gets (viewers joined and left with their duration and
//! bytes, streams up and down), in the simulation.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use whep_core::sim::{self, SimWorld};
use whep_core::whep::Method;
use whep_core::{CloseReason, Event, MediaTransport, SessionState, StreamConfig, StreamStatus};

const SEC: Duration = Duration::from_secs(1);

#[test]
fn the_listing_shows_what_each_viewer_was_sent_and_reported() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let client: IpAddr = [198, 51, 100, 7].into();
    w.post_client = Some(client);
    w.post_user_agent = Some("Mozilla/5.0 (sim)\r\nX-Evil: 1".into());
    let (a, r) = w.join(&demo);
    assert_eq!(r.code(), 201);
    w.post_client = None;
    w.post_user_agent = None;
    let (b, r) = w.join(&demo);
    assert_eq!(r.code(), 201);
    w.drive_until(5 * SEC, |w| w.viewers[a].connected && w.viewers[b].connected);
    // Every 37th datagram lost: the viewers NACK, the server retransmits.
    w.loss_every = 37;
    w.run_for(4 * SEC);
    w.loss_every = 0;
    w.run_for(2 * SEC);
    assert!(w.lost > 10, "only {} datagrams lost", w.lost);

    let list = w.core.sessions(w.now);
    assert_eq!(list.len(), 2);
    for s in &list {
        let v = w
            .viewers
            .iter()
            .find(|v| v.location.as_deref().is_some_and(|l| l.ends_with(&s.session.to_string())));
        let v = v.expect("a listed session is a viewer");
        assert_eq!(s.stream, demo);
        assert_eq!(s.state, SessionState::Connected);
        assert_eq!(s.transport, Some(MediaTransport::Udp));
        let pair = s.pair.expect("a candidate pair");
        assert_eq!(pair.remote, v.addr);
        assert_eq!(pair.local, Some(sim::SERVER));
        assert!(!pair.tcp);
        // What the viewer got, the server counted (a few in flight or lost are not received).
        let received = v.video_packets + v.audio_packets;
        assert!(s.packets_sent >= received && received > 100, "{s:?}: received {received}");
        assert!(s.bytes_sent > s.packets_sent * 10);
        assert!(s.nacks > 0, "NACKs not listed: {s:?}");
        assert!(s.retransmissions > 0, "retransmissions not listed: {s:?}");
        assert!(s.rtt.is_some_and(|r| r < SEC), "no plausible RTT: {s:?}");
        assert!(s.loss.is_some(), "no loss from the receiver reports: {s:?}");
        assert!(s.send_rate.is_some_and(|r| r > 1000), "no send rate: {s:?}");
        let connected = s.connected_for.expect("connected");
        assert!(connected >= 6 * SEC && s.age >= connected, "{s:?}");
        assert_eq!(s.rendition, 0);
        assert!(!s.keyframes_only);
    }
    let first = list.iter().find(|s| s.client.is_some()).expect("the first viewer's client");
    assert_eq!(first.client, Some(client));
    assert_eq!(first.user_agent.as_deref(), Some("Mozilla/5.0 (sim)??X-Evil: 1"));
    assert!(list.iter().any(|s| s.client.is_none() && s.user_agent.is_none()));
    // One session by id agrees.
    let one = w.core.session(first.session, w.now).expect("found");
    assert_eq!(one.session, first.session);
    assert_eq!(one.user_agent, first.user_agent);
    // A PLI is listed (str0m counts it at its next statistics, within a second).
    w.viewer_request_keyframe(b);
    w.run_for(2 * SEC);
    let sb = w.core.sessions(w.now).into_iter().find(|s| s.client.is_none()).expect("b");
    assert!(sb.plis >= 1, "PLI not listed: {sb:?}");
}

#[test]
fn a_kicked_viewer_is_closed_as_by_delete_and_its_resource_is_gone() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let (a, _) = w.join(&demo);
    let (b, _) = w.join(&demo);
    w.drive_until(5 * SEC, |w| w.viewers[a].connected && w.viewers[b].connected);
    w.run_for(2 * SEC);
    let list = w.core.sessions(w.now);
    let loc = w.viewers[a].location.clone().expect("location");
    let kicked = list.iter().find(|s| loc.ends_with(&s.session.to_string())).expect("a");
    let kicked_id = kicked.session;
    let sent = kicked.packets_sent;
    let t = w.now;
    assert_eq!(w.core.kick(kicked_id, t), Some(demo.clone()));
    w.drain();
    assert_eq!(w.core.kick(kicked_id, t), None, "gone already");
    // Its WHEP resource answers 404 (a DELETE 204, as for any unknown session).
    let r = w.http(
        w.session_request(a, Method::Patch)
            .with_header("Content-Type", "application/trickle-ice-sdpfrag")
            .with_body("a=end-of-candidates\r\n"),
    );
    assert_eq!(r.code(), 404);
    assert_eq!(w.http(w.session_request(a, Method::Get)).code(), 404);
    // The viewer heard DTLS close_notify, as after its own DELETE.
    w.drive_until(2 * SEC, |w| w.viewers[a].closed);
    let left = w.events.iter().find_map(|(_, e)| match e {
        Event::ViewerLeft { session, reason, duration, packets_sent, bytes_sent, .. }
            if *session == kicked_id =>
        {
            Some((*reason, *duration, *packets_sent, *bytes_sent))
        }
        _ => None,
    });
    let (reason, duration, packets, bytes) = left.expect("ViewerLeft");
    assert_eq!(reason, CloseReason::Kicked);
    assert!(duration >= 2 * SEC, "{duration:?}");
    assert!(packets >= sent && bytes > packets, "{packets} {bytes}");
    assert_eq!(w.core.metrics().viewers_left, 1);
    assert_eq!(w.core.viewer_count(), 1);
    // The other keeps playing.
    let before = w.viewers[b].video_packets;
    w.run_for(SEC);
    assert!(w.viewers[b].video_packets > before + 20);
    assert_eq!(w.core.sessions(w.now).len(), 1);
}

#[test]
fn joins_carry_the_client_and_streams_report_up_and_down() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    w.post_client = Some([203, 0, 113, 9].into());
    w.post_user_agent = Some("x".repeat(1000));
    let (a, _) = w.join(&demo);
    w.drive_until(5 * SEC, |w| w.viewers[a].connected);
    w.run_for(SEC);
    w.core.stop_stream(&demo, w.now).expect("stopped");
    w.drain();
    w.run_for(SEC);
    w.core.start_stream(&demo, w.now).expect("started");
    w.drain();
    let kinds: Vec<String> = w
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::StreamUp { stream } => Some(format!("up {stream}")),
            Event::StreamDown { stream, state } => Some(format!("down {stream} {state}")),
            Event::ViewerJoined { client, user_agent, .. } => {
                Some(format!("joined {client:?} {}", user_agent.as_ref().map_or(0, String::len)))
            }
            Event::ViewerLeft { reason, packets_sent, .. } => {
                Some(format!("left {} {}", reason.as_str(), *packets_sent > 0))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "up demo",
            "joined Some(203.0.113.9) 256",
            "left stream_stopped true",
            "down demo stopped",
            "up demo",
        ]
    );
    let _ = StreamStatus::Stopped;
    let _: Option<Instant> = None;
}
