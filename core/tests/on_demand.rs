//! On-demand streams in the simulation: an idle stream's FFmpeg starts with its first POST
//! (answered at once), stops its close delay after the last viewer left, a viewer in that
//! grace keeps it, and a crash while viewers watch restarts it as for any stream.

use std::time::Duration;

use whep_core::sim::{self, SimWorld};
use whep_core::whep::Method;
use whep_core::{CloseReason, Event, StreamConfig, StreamId, StreamStatus};

const SEC: Duration = Duration::from_secs(1);
const CLOSE_AFTER: Duration = Duration::from_secs(10);

fn on_demand() -> StreamConfig {
    let mut c =
        StreamConfig::supervised(vec!["-f".into(), "lavfi".into(), "-i".into(), "x".into()]);
    c.on_demand = Some(CLOSE_AFTER);
    c
}

fn state(w: &SimWorld, id: &StreamId) -> Option<StreamStatus> {
    w.core.stream(id).map(|s| s.state)
}

/// An idle on-demand stream: nothing spawned, no ports.
fn idle_world() -> (SimWorld, StreamId) {
    let mut w = SimWorld::new(sim::config());
    let demo = w.add_stream("demo", on_demand(), 30);
    w.run_for(SEC);
    assert_eq!(state(&w, &demo), Some(StreamStatus::Idle));
    assert_eq!(w.spawns, 0, "an on-demand stream spawns nothing before a viewer comes");
    assert_eq!(w.core.ports_in_use(), 0);
    (w, demo)
}

/// Joins a viewer and drives until its video flows.
fn join_and_play(w: &mut SimWorld, demo: &StreamId) -> usize {
    let (v, r) = w.join(demo);
    assert_eq!(r.code(), 201, "{}", String::from_utf8_lossy(&r.body));
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 30);
    v
}

fn delete(w: &mut SimWorld, v: usize) {
    let r = w.http(w.session_request(v, Method::Delete));
    assert_eq!(r.code(), 204);
}

#[test]
fn first_post_spawns_and_video_starts_at_the_first_keyframe() {
    let (mut w, demo) = idle_world();
    let posted = w.now;
    let (v, r) = w.join(&demo);
    assert_eq!(r.code(), 201, "answered at once, before FFmpeg runs");
    assert_eq!(w.spawns, 1, "the first POST started FFmpeg");
    assert_eq!(state(&w, &demo), Some(StreamStatus::Starting));
    w.drive_until(5 * SEC, |w| w.viewers[v].video_packets > 30);
    assert_eq!(state(&w, &demo), Some(StreamStatus::Running));
    assert_eq!(w.viewers[v].first_video_is_keyframe, Some(true));
    let first = w.viewers[v].first_video_at.map(|t| t - posted);
    assert!(first.is_some_and(|d| d < SEC), "first video {first:?} after the POST");
    // A second viewer joins the running process.
    let b = join_and_play(&mut w, &demo);
    assert_eq!(w.spawns, 1);
    assert_eq!(w.viewers[b].first_video_is_keyframe, Some(true));
}

#[test]
fn last_viewer_leaving_arms_the_close_timer() {
    let (mut w, demo) = idle_world();
    let a = join_and_play(&mut w, &demo);
    let b = join_and_play(&mut w, &demo);
    delete(&mut w, a);
    w.run_for(CLOSE_AFTER + SEC);
    assert!(w.procs.contains_key(&demo), "one viewer left: the process runs on");
    delete(&mut w, b);
    w.run_for(CLOSE_AFTER - SEC);
    assert!(w.procs.contains_key(&demo), "still within the close delay");
    assert_eq!(state(&w, &demo), Some(StreamStatus::Running));
    w.run_for(2 * SEC);
    assert!(w.procs.is_empty(), "stopped after the close delay");
    assert_eq!(state(&w, &demo), Some(StreamStatus::Idle));
    assert_eq!(w.core.ports_in_use(), 0, "ports released");
    assert!(!w.events.iter().any(|(_, e)| matches!(e, Event::StreamStopped { .. })));
    // And it starts again for the next viewer.
    let c = join_and_play(&mut w, &demo);
    assert_eq!(w.spawns, 2);
    assert_eq!(w.viewers[c].first_video_is_keyframe, Some(true));
}

#[test]
fn a_viewer_in_the_grace_period_cancels_the_close() {
    let (mut w, demo) = idle_world();
    let a = join_and_play(&mut w, &demo);
    delete(&mut w, a);
    w.run_for(CLOSE_AFTER / 2);
    let b = join_and_play(&mut w, &demo);
    w.run_for(2 * CLOSE_AFTER);
    assert_eq!(w.spawns, 1, "the process was kept");
    assert!(w.procs.contains_key(&demo));
    let before = w.viewers[b].video_packets;
    w.run_for(SEC);
    assert!(w.viewers[b].video_packets > before, "the viewer keeps playing");
}

#[test]
fn a_viewer_while_the_process_stops_starts_it_again() {
    let (mut w, demo) = idle_world();
    w.exit_on_term = false;
    let a = join_and_play(&mut w, &demo);
    delete(&mut w, a);
    w.run_for(CLOSE_AFTER + SEC);
    assert_eq!(state(&w, &demo), Some(StreamStatus::Stopping), "FFmpeg ignores SIGTERM");
    let (b, r) = w.join(&demo);
    assert_eq!(r.code(), 201, "a stopping on-demand stream still takes viewers");
    // SIGKILL after the stop grace, then a new process for the viewer, which stays.
    w.drive_until(w.core.config().process.stop_grace + 5 * SEC, |w| w.spawns == 2);
    assert_eq!(w.kills, 1);
    assert_eq!(state(&w, &demo), Some(StreamStatus::Starting));
    let before = w.viewers[b].video_packets;
    w.drive_until(5 * SEC, |w| w.viewers[b].video_packets > before + 30);
    assert_eq!(state(&w, &demo), Some(StreamStatus::Running));
}

#[test]
fn a_crash_while_viewers_watch_restarts_as_for_any_stream() {
    let (mut w, demo) = idle_world();
    let _a = join_and_play(&mut w, &demo);
    w.crash_process(&demo);
    assert_eq!(state(&w, &demo), Some(StreamStatus::Backoff));
    assert!(w.events.iter().any(|(_, e)| matches!(
        e,
        Event::ViewerLeft { reason: CloseReason::StreamRestarting, .. }
    )));
    // The player reconnects during the backoff; the restart serves it.
    let b = join_and_play(&mut w, &demo);
    assert_eq!(w.spawns, 2);
    assert_eq!(w.viewers[b].first_video_is_keyframe, Some(true));
    // A crash that nobody comes back for: restarted once (within the close delay), then idle.
    w.crash_process(&demo);
    w.drive_until(5 * SEC, |w| w.spawns == 3);
    w.drive_until(CLOSE_AFTER + 5 * SEC, |w| {
        w.core.stream(&demo).is_some_and(|s| s.state == StreamStatus::Idle)
    });
    assert!(w.procs.is_empty());
    assert_eq!(w.core.ports_in_use(), 0);
}

#[test]
fn stop_and_shutdown_leave_an_on_demand_stream_stopped() {
    let (mut w, demo) = idle_world();
    let _a = join_and_play(&mut w, &demo);
    w.core.stop_stream(&demo, w.now).expect("stop");
    w.drain();
    w.run_for(SEC);
    assert_eq!(state(&w, &demo), Some(StreamStatus::Stopped));
    let (_, r) = w.join(&demo);
    assert_eq!(r.code(), 404, "a stopped on-demand stream takes no viewers");
    w.core.start_stream(&demo, w.now).expect("start");
    w.drain();
    assert_eq!(state(&w, &demo), Some(StreamStatus::Idle));
    w.core.shutdown(w.now);
    w.drain();
    assert!(w.core.is_idle());
}

#[test]
fn on_demand_needs_a_supervised_feed() {
    let mut w = SimWorld::new(sim::config());
    let mut c = StreamConfig::external();
    c.on_demand = Some(SEC);
    let id = StreamId::new("ext").expect("id");
    assert!(w.core.add_stream(id, c).is_err());
}
