//! Operation sequences over a [`SimWorld`], with a small reference model of what must hold
//! between operations and a clean state after shutdown.
//!
//! Shared by the property test (`core/tests/ops.rs`, random [`Op`] vectors) and the `ops` fuzz
//! target ([`crate::fuzzing::ops`], which decodes bytes into [`Op`]s). The world has three
//! streams (one supervised, two external), caps of 3 viewers per stream and 5 in total, and
//! only four ingest port pairs, so caps, port exhaustion and bind failures are all reachable
//! in a few operations. The harness checks the core's invariants after every step; [`OpsWorld`]
//! adds the reference model's assertions after every operation and [`OpsWorld::finish`] the
//! shutdown checks. Any panic is a bug in the core.

use std::time::Duration;

use super::{SimWorld, config};
use crate::whep::Method;
use crate::{CoreConfig, StreamConfig, StreamId, StreamStatus};

/// Per-stream viewer cap of the world.
pub const CAP_PER_STREAM: usize = 3;
/// Total viewer cap of the world.
pub const CAP_TOTAL: usize = 5;
/// Ports of the world's ingest range (four blocks).
pub const INGEST_PORTS: std::ops::RangeInclusive<u16> = 40_000..=40_031;

/// One operation. Viewer and stream arguments are taken modulo the number of viewers created
/// so far and of streams, so every value is meaningful.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A new viewer POSTs an offer to a stream.
    Join(u8),
    /// A viewer DELETEs its session.
    Delete(u8),
    /// A viewer vanishes without DELETE: everything it sends is dropped from now on.
    Silence(u8),
    /// A viewer PATCHes a trickle candidate.
    Trickle(u8),
    /// A viewer restarts ICE: PATCH with new credentials, then applies the server's fragment.
    IceRestart(u8),
    /// A viewer asks for a keyframe (RTCP PLI).
    Keyframe(u8),
    /// Virtual time passes (milliseconds).
    Advance(u16),
    /// A stream's FFmpeg dies unexpectedly (SIGKILL).
    Crash(u8),
    /// The application stops a stream.
    Stop(u8),
    /// The application starts a stream.
    Start(u8),
    /// Garbage arrives on an ingest port (40000 + p % 8) and on the viewer socket from an
    /// unknown address.
    Garbage(u8, Vec<u8>),
    /// Garbage arrives on the viewer socket from a viewer's own address.
    ViewerGarbage(u8, Vec<u8>),
    /// Binding the pair 40002/40003 fails from now on (`true`) or works again (`false`).
    BindFails(bool),
}

/// The world the operations act on.
#[derive(Debug)]
pub struct OpsWorld {
    /// The simulation.
    pub world: SimWorld,
    streams: Vec<StreamId>,
}

impl Default for OpsWorld {
    fn default() -> Self {
        Self::new()
    }
}

impl OpsWorld {
    /// Three running streams: `sup` (supervised), `ext` and `ext2` (external), GOP 15.
    pub fn new() -> Self {
        Self::with_config(|_| {})
    }

    /// As [`OpsWorld::new`], with `edit` applied to the simulation's config (timeouts, say);
    /// caps and ports are the model's and must stay.
    pub fn with_config(edit: impl FnOnce(&mut CoreConfig)) -> Self {
        let mut config = config();
        config.max_viewers_per_stream = CAP_PER_STREAM;
        config.max_viewers_total = CAP_TOTAL;
        config.ingest_ports = INGEST_PORTS;
        edit(&mut config);
        let mut w = SimWorld::new(config);
        let streams = vec![
            w.add_stream("sup", StreamConfig::supervised(vec!["-i".into(), "x".into()]), 15),
            w.add_stream("ext", StreamConfig::external(), 15),
            w.add_stream("ext2", StreamConfig::external(), 15),
        ];
        Self { world: w, streams }
    }

    fn pick(&self, i: u8) -> StreamId {
        self.streams[usize::from(i) % self.streams.len()].clone()
    }

    /// The index of an existing viewer, if any was created.
    fn viewer(&self, i: u8) -> Option<usize> {
        let n = self.world.viewers.len();
        (n > 0).then(|| usize::from(i) % n)
    }

    /// Applies one operation and checks the reference model.
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::Join(s) => self.join(*s),
            Op::Delete(v) => {
                let Some(v) = self.viewer(*v) else { return };
                let w = &mut self.world;
                if w.viewers[v].location.is_some() {
                    let r = w.http(w.session_request(v, Method::Delete));
                    assert_eq!(r.code(), 204, "DELETE is idempotent");
                }
            }
            Op::Silence(v) => {
                if let Some(v) = self.viewer(*v) {
                    self.world.viewers[v].silent = true;
                }
            }
            Op::Trickle(v) => {
                let Some(v) = self.viewer(*v) else { return };
                let w = &mut self.world;
                if w.viewers[v].location.is_some() {
                    let r = w.http(
                        w.session_request(v, Method::Patch)
                            .with_header("Content-Type", "application/trickle-ice-sdpfrag")
                            .with_body("a=candidate:9 1 udp 1 198.51.100.7 9 typ host\r\n"),
                    );
                    assert!(matches!(r.code(), 204 | 404), "trickle PATCH: {}", r.code());
                }
            }
            Op::IceRestart(v) => {
                let Some(v) = self.viewer(*v) else { return };
                let w = &mut self.world;
                let viewer = &w.viewers[v];
                if viewer.location.is_none() || viewer.closed {
                    return;
                }
                let frag = w.viewer_ice_restart(v);
                let r = w.http(
                    w.session_request(v, Method::Patch)
                        .with_header("Content-Type", "application/trickle-ice-sdpfrag")
                        .with_body(frag),
                );
                match r.code() {
                    200 => {
                        let body = String::from_utf8_lossy(&r.body).into_owned();
                        w.viewer_accept_restart(v, &body);
                    }
                    404 => {}
                    c => panic!("ICE restart PATCH: {c} {}", String::from_utf8_lossy(&r.body)),
                }
            }
            Op::Keyframe(v) => {
                if let Some(v) = self.viewer(*v)
                    && !self.world.viewers[v].closed
                {
                    self.world.viewer_request_keyframe(v);
                }
            }
            Op::Advance(ms) => self.world.run_for(Duration::from_millis(u64::from(*ms))),
            Op::Crash(s) => {
                let id = self.pick(*s);
                self.world.crash_process(&id);
            }
            Op::Stop(s) => {
                let id = self.pick(*s);
                let w = &mut self.world;
                assert!(w.core.stop_stream(&id, w.now).is_ok(), "stop of a known stream");
                w.drain();
                assert_eq!(w.core.stream(&id).map(|i| i.viewers), Some(0), "stop closes viewers");
            }
            Op::Start(s) => {
                let id = self.pick(*s);
                let w = &mut self.world;
                let _ = w.core.start_stream(&id, w.now);
                w.drain();
            }
            Op::Garbage(p, bytes) => {
                let port = INGEST_PORTS.start() + u16::from(p % 32);
                self.world.ingest_raw(port, bytes);
                self.world.datagram_raw(super::SERVER, bytes);
            }
            Op::ViewerGarbage(v, bytes) => {
                if let Some(v) = self.viewer(*v) {
                    let from = self.world.viewers[v].addr;
                    self.world.datagram_raw(from, bytes);
                }
            }
            Op::BindFails(on) => {
                let pair = [INGEST_PORTS.start() + 4, INGEST_PORTS.start() + 5];
                if *on {
                    self.world.fail_bind.extend(pair);
                } else {
                    self.world.fail_bind.clear();
                }
            }
        }
        self.check_model();
    }

    fn join(&mut self, s: u8) {
        let id = self.pick(s);
        let w = &mut self.world;
        let before = w.core.viewer_count();
        let info = w.core.stream(&id);
        let (_, r) = w.join(&id);
        let accepting = info
            .as_ref()
            .is_some_and(|i| i.state != StreamStatus::Stopped && i.state != StreamStatus::Stopping);
        match r.code() {
            201 => {
                assert!(accepting, "201 from a stopped stream");
                assert_eq!(w.core.viewer_count(), before + 1, "a 201 adds one viewer");
            }
            404 => assert!(!accepting, "404 from an accepting stream"),
            503 => assert!(
                before >= CAP_TOTAL || info.is_some_and(|i| i.viewers >= CAP_PER_STREAM),
                "503 below the caps"
            ),
            c => panic!("unexpected POST status {c}: {}", String::from_utf8_lossy(&r.body)),
        }
    }

    /// Port accounting as seen from outside: streams holding ports match the pool, and the
    /// runtime holds bound exactly the pairs of streams past binding.
    fn check_model(&self) {
        let w = &self.world;
        let held = self
            .streams
            .iter()
            .filter_map(|s| w.core.stream(s))
            .filter(|i| i.ports.is_some())
            .count();
        assert_eq!(held, w.core.ports_in_use(), "streams holding ports = pairs in use");
        let past_binding = w
            .core
            .streams()
            .iter()
            .filter(|i| i.state != StreamStatus::Binding && i.ports.is_some())
            .count();
        assert_eq!(w.bound.len(), past_binding, "bound pairs = streams past binding");
    }

    /// Shuts the core down and checks that nothing is left: no stream holds ports or a
    /// process, every viewer that joined has left.
    pub fn finish(mut self) {
        let w = &mut self.world;
        w.core.shutdown(w.now);
        w.drain();
        w.run_for(Duration::from_secs(10));
        assert!(w.core.is_idle(), "idle after shutdown: {:?}", w.core.streams());
        assert!(w.procs.is_empty(), "no process left");
        assert!(w.bound.is_empty(), "no port left bound");
        let m = w.core.metrics();
        assert_eq!(m.viewers_joined, m.viewers_left, "every viewer that joined has left");
    }
}

/// Runs `ops` on a fresh [`OpsWorld`], then shuts it down and checks it is idle.
pub fn run(ops: &[Op]) {
    let mut w = OpsWorld::new();
    for op in ops {
        w.apply(op);
    }
    w.finish();
}
