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

// Sharded: a leader (shard 0, owns FFmpeg) and a follower (shard 1) sharing one seat book; the
// leader's mirror messages and the follower's demands are handed over as the driver does.

mod sharded {
    use std::time::{Duration, Instant};

    use whep_core::RateLimits;
    use whep_core::shard::ShardMember;
    use whep_core::sim::{self, SimWorld};
    use whep_core::{CloseReason, Event, StreamId, StreamStatus};
    use whep_server::shard::ShardSet;

    use super::{CLOSE_AFTER, SEC, delete, on_demand, state};

    const STEP: Duration = Duration::from_millis(20);

    struct Shards {
        l: SimWorld,
        f: SimWorld,
        id: StreamId,
    }

    /// An idle on-demand stream on a leader and its follower.
    #[allow(clippy::disallowed_methods)] // the shard set's limiter needs a start before the worlds
    fn idle() -> Shards {
        let set = ShardSet::new(2, RateLimits::unlimited(), Instant::now());
        let shard =
            |index: u8| SimWorld::in_shard(sim::config(), ShardMember { index, set: set.clone() });
        let (l, f) = (shard(0), shard(1));
        let mut s = Shards { id: StreamId::new("demo").expect("id"), l, f };
        s.id = s.l.add_stream("demo", on_demand(), 30);
        s.run(SEC);
        assert_eq!(state(&s.l, &s.id), Some(StreamStatus::Idle));
        assert_eq!(state(&s.f, &s.id), Some(StreamStatus::Running), "the follower's copy");
        assert_eq!(s.l.spawns, 0);
        s
    }

    impl Shards {
        /// Hands the leader's mirror messages to the follower and the follower's demands to
        /// the leader, until neither has any.
        fn pump(&mut self) {
            loop {
                let mirrors = std::mem::take(&mut self.l.mirrors);
                let demands = std::mem::take(&mut self.f.demands);
                if mirrors.is_empty() && demands.is_empty() {
                    return;
                }
                for m in mirrors {
                    self.f.core.mirror(m, self.f.now);
                    self.f.drain();
                }
                for stream in demands {
                    self.l.core.demand(&stream, self.l.now);
                    self.l.drain();
                }
            }
        }

        /// Runs both shards for `d`, in steps, pumping in between.
        fn run(&mut self, d: Duration) {
            self.run_until(d, |_| false);
        }

        /// Runs both shards until `pred` holds; panics after `max`.
        fn run_until(&mut self, max: Duration, pred: impl Fn(&Self) -> bool) -> bool {
            let steps = (max.as_millis() / STEP.as_millis()).max(1);
            for _ in 0..steps {
                if pred(self) {
                    return true;
                }
                self.l.run_for(STEP);
                self.pump();
                self.f.run_for(STEP);
                self.pump();
            }
            pred(self)
        }

        /// Joins a viewer on `shard` and runs until its video flows.
        fn play(&mut self, follower: bool) -> usize {
            let w = if follower { &mut self.f } else { &mut self.l };
            let (v, r) = w.join(&self.id);
            assert_eq!(r.code(), 201, "{}", String::from_utf8_lossy(&r.body));
            let played = self.run_until(5 * SEC, |s| {
                let w = if follower { &s.f } else { &s.l };
                w.viewers[v].video_packets > 30
            });
            assert!(played, "no video for the viewer on the {} shard", name(follower));
            v
        }

        fn running(&self) -> bool {
            self.l.procs.contains_key(&self.id)
        }
    }

    fn name(follower: bool) -> &'static str {
        if follower { "follower" } else { "leader" }
    }

    /// A POST on a follower starts the leader's FFmpeg; its viewer starts at a keyframe.
    #[test]
    fn a_post_on_a_follower_starts_ffmpeg_on_the_leader() {
        let mut s = idle();
        let (v, r) = s.f.join(&s.id);
        assert_eq!(r.code(), 201, "answered at once, before FFmpeg runs");
        assert_eq!(s.f.spawns, 0, "a follower spawns nothing");
        assert_eq!(s.f.demands.len(), 1, "the follower tells the leader");
        s.pump();
        assert_eq!(s.l.spawns, 1, "the follower's POST started FFmpeg on the leader");
        assert!(s.run_until(5 * SEC, |s| s.f.viewers[v].video_packets > 30), "no video");
        assert_eq!(s.f.viewers[v].first_video_is_keyframe, Some(true));
        assert_eq!(state(&s.l, &s.id), Some(StreamStatus::Running));
    }

    /// POSTs on both shards at once (the follower's demand reaching the leader after the
    /// leader's own viewer started the stream, and a second demand while it binds): one FFmpeg,
    /// and both viewers play.
    #[test]
    fn concurrent_posts_on_two_shards_spawn_once() {
        let mut s = idle();
        let (a, r) = s.l.join(&s.id);
        assert_eq!(r.code(), 201);
        let (b, r) = s.f.join(&s.id);
        assert_eq!(r.code(), 201);
        let (c, r) = s.f.join(&s.id);
        assert_eq!(r.code(), 201);
        s.pump();
        assert!(s.run_until(5 * SEC, |s| {
            s.l.viewers[a].video_packets > 30
                && s.f.viewers[b].video_packets > 30
                && s.f.viewers[c].video_packets > 30
        }));
        assert_eq!(s.l.spawns, 1, "one FFmpeg for POSTs on two shards");
        // The same with the follower's demand first.
        delete(&mut s.l, a);
        delete(&mut s.f, b);
        delete(&mut s.f, c);
        s.pump();
        assert!(s.run_until(CLOSE_AFTER + 5 * SEC, |s| !s.running()), "not stopped");
        let (_, r) = s.f.join(&s.id);
        assert_eq!(r.code(), 201);
        s.pump();
        assert_eq!(s.l.spawns, 2);
        let (_, r) = s.l.join(&s.id);
        assert_eq!(r.code(), 201);
        s.run(2 * SEC);
        assert_eq!(s.l.spawns, 2, "one FFmpeg for the second run too");
    }

    /// The close delay starts when the stream has no viewer on any shard: not when the
    /// leader's last one leaves while a follower's watches, nor when the follower's last
    /// leaves while the leader's watches.
    #[test]
    fn the_close_delay_waits_for_the_viewers_of_every_shard() {
        let mut s = idle();
        let a = s.play(false);
        let b = s.play(true);
        delete(&mut s.l, a);
        s.run(CLOSE_AFTER + SEC);
        assert!(s.running(), "stopped while a viewer on the follower watched");
        let c = s.play(false);
        delete(&mut s.f, b);
        s.run(CLOSE_AFTER + SEC);
        assert!(s.running(), "stopped while a viewer on the leader watched");
        let d = s.play(true);
        delete(&mut s.l, c);
        s.run(SEC);
        delete(&mut s.f, d);
        s.pump();
        s.run(CLOSE_AFTER - SEC);
        assert!(s.running(), "stopped before the close delay after the last viewer");
        s.run(2 * SEC);
        assert!(!s.running(), "not stopped after the close delay");
        assert_eq!(state(&s.l, &s.id), Some(StreamStatus::Idle));
        assert_eq!(s.l.core.ports_in_use(), 0);
        assert_eq!(
            state(&s.f, &s.id),
            Some(StreamStatus::Running),
            "the follower still takes viewers"
        );
        assert_eq!(s.l.spawns, 1);
    }

    /// A viewer on the follower during the close delay keeps the stream, also when the leader's
    /// timer fires before the follower's demand reached it (the shared book counts the viewer).
    #[test]
    fn a_follower_viewer_in_the_grace_cancels_the_close() {
        let mut s = idle();
        let a = s.play(false);
        delete(&mut s.l, a);
        s.run(CLOSE_AFTER / 2);
        let b = s.play(true);
        s.run(2 * CLOSE_AFTER);
        assert!(s.running(), "stopped with a viewer on the follower");
        assert_eq!(s.l.spawns, 1);
        // The demand still queued when the timer fires.
        let c = s.play(false);
        delete(&mut s.f, b);
        delete(&mut s.l, c);
        s.pump();
        s.run(CLOSE_AFTER - SEC);
        let (d, r) = s.f.join(&s.id);
        assert_eq!(r.code(), 201);
        assert_eq!(s.f.demands.len(), 1);
        s.l.run_for(2 * SEC);
        assert!(s.running(), "the leader stopped FFmpeg that a follower's viewer watches");
        s.pump();
        s.run(2 * CLOSE_AFTER);
        assert!(s.running());
        assert_eq!(s.l.spawns, 1);
        let before = s.f.viewers[d].video_packets;
        s.run(SEC);
        assert!(s.f.viewers[d].video_packets > before, "the follower's viewer plays");
    }

    /// A viewer on the follower while the leader's FFmpeg stops (it ignores SIGTERM): the
    /// stream starts again once the process is gone, and that viewer plays.
    #[test]
    fn a_follower_viewer_while_ffmpeg_stops_starts_it_again() {
        let mut s = idle();
        s.l.exit_on_term = false;
        let a = s.play(false);
        delete(&mut s.l, a);
        s.run(CLOSE_AFTER + SEC);
        assert_eq!(state(&s.l, &s.id), Some(StreamStatus::Stopping), "FFmpeg ignores SIGTERM");
        let (b, r) = s.f.join(&s.id);
        assert_eq!(r.code(), 201, "the follower takes viewers of a stopping stream");
        let grace = s.l.core.config().process.stop_grace;
        assert!(s.run_until(grace + 5 * SEC, |s| s.l.spawns == 2), "not started again");
        assert_eq!(s.l.kills, 1);
        let played = s.run_until(5 * SEC, |s| s.f.viewers[b].video_packets > 30);
        assert!(played, "no video for the follower's viewer");
        s.run(2 * CLOSE_AFTER);
        assert!(s.running(), "stopped while the follower's viewer watches");
    }

    /// A new run of FFmpeg empties the follower's GOP cache too: a viewer who connects before
    /// the new run's first keyframe gets nothing of the previous run.
    #[test]
    fn a_new_run_never_primes_a_follower_viewer_with_the_previous_gop() {
        let mut s = idle();
        let a = s.play(true);
        delete(&mut s.f, a);
        s.pump();
        assert!(s.run_until(CLOSE_AFTER + 5 * SEC, |s| !s.running()), "not stopped");
        // The next run sends nothing (yet).
        s.l.sources.remove(&s.id);
        let (b, r) = s.f.join(&s.id);
        assert_eq!(r.code(), 201);
        s.pump();
        assert_eq!(s.l.spawns, 2);
        assert!(s.run_until(5 * SEC, |s| s.f.viewers[b].connected), "not connected");
        s.run(2 * SEC);
        assert_eq!(s.f.viewers[b].video_packets, 0, "primed with the previous run's GOP");
    }

    /// A crash while only the follower's viewer watches: its viewer is closed, and when it comes
    /// back during the backoff the stream restarts for it; if no one comes back, the stream
    /// goes idle after the close delay.
    #[test]
    fn a_crash_with_a_follower_viewer_restarts() {
        let mut s = idle();
        let _a = s.play(true);
        s.l.crash_process(&s.id);
        s.pump();
        assert_eq!(s.f.core.viewer_count(), 0);
        assert!(s.f.events.iter().any(|(_, e)| matches!(
            e,
            Event::ViewerLeft { reason: CloseReason::StreamRestarting, .. }
        )));
        let b = s.play(true);
        assert!(s.run_until(5 * SEC, |s| s.l.spawns == 2), "not restarted for the viewer");
        assert_eq!(s.f.viewers[b].first_video_is_keyframe, Some(true));
        s.run(2 * CLOSE_AFTER);
        assert!(s.running(), "the viewer on the follower still watches");
        let before = s.f.viewers[b].video_packets;
        s.run(SEC);
        assert!(s.f.viewers[b].video_packets > before + 20, "no video after the restart");
        // A crash that nobody comes back for: idle after the close delay.
        s.l.crash_process(&s.id);
        s.pump();
        assert!(
            s.run_until(2 * CLOSE_AFTER, |s| state(&s.l, &s.id) == Some(StreamStatus::Idle)),
            "not idle: {:?}",
            state(&s.l, &s.id)
        );
        assert!(!s.running());
        assert_eq!(s.l.core.ports_in_use(), 0);
    }
}
