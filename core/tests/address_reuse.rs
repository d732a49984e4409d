//! A viewer vanishes; before its session is reaped, a new viewer comes from the same address
//! (an ephemeral port the OS handed out again, a TURN relay port, a NAT mapping).
use std::time::Duration;
use whep_core::StreamConfig;
use whep_core::sim::{self, SimWorld};

#[test]
fn new_viewer_from_a_vanished_viewers_address_connects() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let (a, _) = w.join(&demo);
    w.drive_until(Duration::from_secs(5), |w| w.connected(&demo) == 1);
    // Vanished without DELETE, its socket closed: what comes to its address goes to b.
    w.viewers[a].silent = true;
    w.viewers[a].closed = true;
    let addr = w.viewers[a].addr;
    w.run_for(Duration::from_millis(500));
    let (b, r) = w.join_from(&demo, addr);
    assert_eq!(r.code(), 201);
    w.run_for(Duration::from_secs(60));
    let timeout = w.core.config().connect_timeout;
    assert!(
        w.viewers[b].connected,
        "viewer b never connected (connect timeout {timeout:?}); sessions now {}, events {:?}",
        w.core.viewer_count(),
        w.events
            .iter()
            .filter(|(_, e)| format!("{e:?}").starts_with("Viewer"))
            .map(|(t, e)| format!("{t:?} {e:?}"))
            .collect::<Vec<_>>()
    );
}

#[test]
fn vanished_viewer_is_reaped_although_its_address_is_in_use_again() {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    let (a, _) = w.join(&demo);
    w.drive_until(Duration::from_secs(5), |w| w.connected(&demo) == 1);
    w.viewers[a].silent = true;
    w.viewers[a].closed = true;
    let addr = w.viewers[a].addr;
    let (b, _) = w.join_from(&demo, addr);
    w.drive_until(Duration::from_secs(5), |w| w.viewers[b].connected);
    // b keeps playing and sending; a, silent, must go within the inactivity timeout.
    let inactivity = w.core.config().inactivity_timeout;
    w.run_for(inactivity + Duration::from_secs(2));
    assert_eq!(w.core.viewer_count(), 1, "the vanished session is still there");
    assert!(w.viewers[b].video_packets > 0 && !w.viewers[b].closed);
}
