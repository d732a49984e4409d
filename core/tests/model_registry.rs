//! Model-based test of the core's registry: streams, WHEP sessions, caps, ports, process
//! supervision and timeouts, against a reference model made of plain maps and counters.
//!
//! The core runs behind a tiny fake runtime ([`Sut`]): it executes every output the way the
//! simulation harness does (binds ingest pairs, spawns, stops and kills fake processes, collects
//! events), but no viewer ever answers ICE, so every session stays "connecting" until a DELETE,
//! a stream teardown or the connect timeout reaps it. Without ICE and DTLS a case of a few
//! hundred operations takes tens of milliseconds (a POST, str0m accepting the offer, is most of
//! it), where the str0m-viewer simulation (`tests/ops.rs`) manages a few operations a second.
//!
//! The world: four stream names `s0`..`s3` (added, started, stopped, removed at random, each
//! external, supervised or with egress disabled, with or without its own viewer cap), a default
//! cap of [`CAP_PER_STREAM`], a total cap of [`CAP_TOTAL`], and one to four ingest pairs (or
//! twelve, to reach the bind retry limit). The fake runtime can be switched to fail binds, to
//! defer them until a `CompleteBind`, to fail spawns, and to ignore SIGTERM. Rate limits are
//! off (not modelled here). Every case ends with a shutdown and the stop grace, after which
//! the core must be idle and the runtime hold nothing.
//!
//! [`Model`] mirrors the engine's semantics step by step, including the order in which the
//! runtime executes queued outputs (a port released by a kill is not free for a restart decided
//! by an earlier timer at the same instant). After every operation the test compares: the
//! status of each request and the result of each stream call, `viewer_count`, every stream's
//! `StreamInfo` (state, viewers, ports held, pid, restarts), `ports_in_use`, the pairs the
//! runtime holds bound or binding, `is_idle`, the metrics counters (joined, left, ICE failures,
//! cap rejections, restarts, ingest, requests by status and rejections by reason), the
//! lifecycle events by kind and the reasons viewers left; the fake runtime runs
//! `check_invariants` after every drain.
//!
//! A failure names the operation index and the operation. The report lists proptest's shrunk
//! sequence and then only the operations the failure needs, e.g. for a per-stream cap checked
//! off by one:
//!
//! ```text
//! every operation the failure needs: pairs = 1, ops = [
//!     #0 Add { stream: 0, kind: External, cap: Some(0) }
//!     #1 Start { stream: 0 }
//!     #2 Post { stream: 0 }
//! ]
//! which fails with: ... left: `503`, right: `201`: op #2 Post { stream: 0 }: status
//! ```

// The test anchors its virtual clock at one real `Instant`; nothing here reads time otherwise.
#![allow(clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::panic::{self, AssertUnwindSafe};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestError, TestRunner, contextualize_config};
use whep_core::whep::Method;
use whep_core::{
    Core, CoreConfig, Event, Input, Output, PortPair, ProcessConfig, RateLimits, StreamConfig,
    StreamError, StreamId, StreamStatus, WhepRequest,
};

/// Chromium's offer; [`offer`] trims it to what a POST needs.
const CHROMIUM_OFFER: &str = include_str!("data/chromium-156-offer.sdp");
const NAMES: [&str; 4] = ["s0", "s1", "s2", "s3"];
const CAP_PER_STREAM: usize = 3;
const CAP_TOTAL: usize = 5;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const BIND_QUARANTINE: Duration = Duration::from_secs(3);
const BACKOFF_INITIAL: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(4);
const BACKOFF_RESET: Duration = Duration::from_secs(5);
const STALE: Duration = Duration::from_secs(8);
const STOP_GRACE: Duration = Duration::from_secs(1);
const MAX_BODY: usize = 64 * 1024;
/// The core's bind retry limit (`MAX_BIND_ATTEMPTS` in core/src/machine/mod.rs).
const MAX_BIND_ATTEMPTS: u32 = 10;

// -------------------------------------------------------------------------------------------
// Operations
// -------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    External,
    Supervised,
    /// External with WebRTC egress disabled: never starts, never takes viewers.
    Disabled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bad {
    /// Not an SDP at all: 400.
    Garbage,
    /// The right offer with `Content-Type: text/plain`: 415.
    NotSdp,
    /// The offer without any H264: 406.
    NoH264,
    /// Over `max_body_bytes`: 413 before anything else, even for an unknown stream.
    TooLarge,
}

/// What the fake runtime does with an `Output::BindIngest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Binds {
    Succeed,
    Fail,
    /// Hold it until a `CompleteBind`.
    Defer,
}

#[derive(Debug, Clone)]
enum Op {
    Add {
        stream: usize,
        kind: Kind,
        cap: Option<usize>,
    },
    Start {
        stream: usize,
    },
    Stop {
        stream: usize,
    },
    Remove {
        stream: usize,
    },
    /// POST a valid Chromium offer.
    Post {
        stream: usize,
    },
    PostBad {
        stream: usize,
        bad: Bad,
    },
    /// DELETE the session of the `session`-th 201 so far (modulo), alive or not.
    Delete {
        session: usize,
    },
    /// DELETE that session under another (or the same) stream's URL.
    DeleteVia {
        session: usize,
        stream: usize,
    },
    /// DELETE a session id that was never issued.
    DeleteUnknown {
        stream: usize,
    },
    /// One RTP packet to the stream's video ingest port (to an unused port if it holds none).
    Rtp {
        stream: usize,
    },
    /// The stream's fake FFmpeg dies (SIGKILL), if it has one.
    Crash {
        stream: usize,
    },
    /// Finish a deferred bind of the stream's pair.
    CompleteBind {
        stream: usize,
        ok: bool,
    },
    Advance {
        ms: u64,
    },
    Binds(Binds),
    SpawnFails(bool),
    /// Fake processes ignore SIGTERM from now on (`true`) and wait for SIGKILL.
    Stubborn(bool),
    /// `Core::shutdown`: every viewer closed, every stream stopped (each case also ends with
    /// one, followed by the stop grace, after which the core must be idle).
    Shutdown,
}

fn stream_id(i: usize) -> StreamId {
    StreamId::new(NAMES[i]).expect("valid stream id")
}

fn is_hex(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

// -------------------------------------------------------------------------------------------
// The system under test: the core and a fake runtime
// -------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Sut {
    core: Core,
    t0: Instant,
    now: Instant,
    binds: Binds,
    spawn_fails: bool,
    stubborn: bool,
    /// Binds held back in `Binds::Defer` mode.
    pending: BTreeMap<StreamId, PortPair>,
    /// Pairs the runtime holds bound.
    bound: BTreeMap<StreamId, PortPair>,
    /// Live fake processes: generation by stream.
    procs: BTreeMap<StreamId, u64>,
    next_pid: u32,
    /// Events by kind, and `ViewerLeft` by reason.
    events: BTreeMap<&'static str, u64>,
    left: BTreeMap<String, u64>,
    /// Streams a `StreamUp` reported running and no `StreamDown` since.
    up: BTreeSet<StreamId>,
    /// `Location` of every 201, in order.
    sessions: Vec<String>,
}

impl Sut {
    fn new(pairs: u16) -> Self {
        let t0 = Instant::now();
        let config = CoreConfig {
            host_candidates: vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 3478)],
            rng_seed: [7; 32],
            ingest_ports: ingest_ports(pairs),
            bind_quarantine: BIND_QUARANTINE,
            max_viewers_per_stream: CAP_PER_STREAM,
            max_viewers_total: CAP_TOTAL,
            max_body_bytes: MAX_BODY,
            // Not modelled here (`ratelimit`'s own tests cover it); requests carry no client
            // address, and a long sequence would otherwise drain the global POST budget.
            rate_limits: RateLimits::unlimited(),
            connect_timeout: CONNECT_TIMEOUT,
            process: ProcessConfig {
                restart_backoff_initial: BACKOFF_INITIAL,
                restart_backoff_max: BACKOFF_MAX,
                restart_backoff_reset: BACKOFF_RESET,
                stale_timeout: STALE,
                stop_grace: STOP_GRACE,
                ..ProcessConfig::default()
            },
            ..CoreConfig::default()
        };
        Self {
            core: Core::new(config, t0),
            t0,
            now: t0,
            binds: Binds::Succeed,
            spawn_fails: false,
            stubborn: false,
            pending: BTreeMap::new(),
            bound: BTreeMap::new(),
            procs: BTreeMap::new(),
            next_pid: 1000,
            events: BTreeMap::new(),
            left: BTreeMap::new(),
            up: BTreeSet::new(),
            sessions: Vec::new(),
        }
    }

    fn input(&mut self, input: Input<'_>) {
        self.core.handle_input(input, self.now);
    }

    /// Executes the core's outputs in order, as a runtime does, then checks its invariants.
    fn drain(&mut self) {
        while let Some(out) = self.core.poll_output() {
            match out {
                Output::Transmit(_)
                | Output::CloseTcp { .. }
                | Output::Authorize(_)
                | Output::RefreshJwtKeys
                | Output::Respond { .. } => {}
                Output::BindIngest { stream, ports, .. } => {
                    let taken = self
                        .bound
                        .values()
                        .chain(self.pending.values())
                        .any(|p| p.contains(ports.video) || p.contains(ports.audio()));
                    assert!(!taken, "pair {ports} handed to {stream} while bound or binding");
                    match self.binds {
                        Binds::Succeed => {
                            self.bound.insert(stream.clone(), ports);
                            self.input(Input::IngestBound { stream, ports });
                        }
                        Binds::Fail => {
                            let error = "address in use".to_owned();
                            self.input(Input::BindFailed { stream, ports, error });
                        }
                        Binds::Defer => {
                            self.pending.insert(stream, ports);
                        }
                    }
                }
                Output::ReleaseIngest { stream, ports } => {
                    if self.bound.get(&stream) == Some(&ports) {
                        self.bound.remove(&stream);
                    }
                    if self.pending.get(&stream) == Some(&ports) {
                        self.pending.remove(&stream);
                    }
                }
                Output::SpawnProcess { stream, generation, .. } => {
                    if self.spawn_fails {
                        let error = "ffmpeg: not found".to_owned();
                        self.input(Input::SpawnFailed { stream, generation, error });
                    } else {
                        let old = self.procs.insert(stream.clone(), generation);
                        assert_eq!(old, None, "{stream} spawned while its process runs");
                        self.next_pid += 1;
                        let pid = self.next_pid;
                        self.input(Input::ProcessSpawned { stream, generation, pid });
                    }
                }
                Output::StopProcess { stream, generation } => {
                    if !self.stubborn && self.procs.get(&stream) == Some(&generation) {
                        self.procs.remove(&stream);
                        self.input(Input::ProcessExited { stream, generation, code: Some(255) });
                    }
                }
                Output::KillProcess { stream, generation } => {
                    if self.procs.get(&stream) == Some(&generation) {
                        self.procs.remove(&stream);
                        self.input(Input::ProcessExited { stream, generation, code: None });
                    }
                }
                Output::Event(Event::StreamUp { stream }) => {
                    assert!(self.up.insert(stream.clone()), "{stream} up twice");
                }
                Output::Event(Event::StreamDown { stream, .. }) => {
                    assert!(self.up.remove(&stream), "{stream} down but not up");
                }
                Output::Event(e) => {
                    if let Event::ViewerLeft { reason, .. } = &e {
                        *self.left.entry(format!("{reason:?}")).or_default() += 1;
                    }
                    *self.events.entry(event_kind(&e)).or_default() += 1;
                }
                Output::Mirror(m) => panic!("an unsharded core mirrored {m:?}"),
                Output::Demand { stream } => {
                    panic!("an unsharded core asked a leader for {stream}")
                }
            }
        }
        self.core.check_invariants();
        // Up and down alternate, and up is exactly the running status (`whep_stream_up`).
        for info in self.core.streams() {
            let running = info.state == StreamStatus::Running;
            assert_eq!(self.up.contains(&info.id), running, "{}: {:?}", info.id, info.state);
        }
        assert!(self.up.iter().all(|id| self.core.stream(id).is_some()), "a removed stream up");
    }

    fn http(&mut self, req: WhepRequest) -> u16 {
        let r = self.core.handle_http(req, self.now);
        if r.code() == 201 {
            let location = r.header("location").unwrap_or_default().to_owned();
            assert!(!self.sessions.contains(&location), "session {location} issued twice");
            self.sessions.push(location);
        }
        self.drain();
        r.code()
    }

    /// Drives the clock to `target` as a runtime does: `handle_timeout` at every instant
    /// `poll_timeout` asks for, executing outputs in between.
    fn advance(&mut self, target: Instant) {
        while let Some((t, _)) = self.core.poll_timeout() {
            if t > target {
                break;
            }
            self.now = self.now.max(t);
            self.core.handle_timeout(self.now);
            self.drain();
            if let Some((next, why)) = self.core.poll_timeout() {
                assert!(next > self.now, "core deadline {why:?} not in the future after a timeout");
            }
        }
        self.now = target;
        self.core.handle_timeout(self.now);
        self.drain();
    }
}

fn event_kind(e: &Event) -> &'static str {
    match e {
        Event::StreamReady { .. } => "stream_ready",
        Event::StreamStopped { .. } => "stream_stopped",
        Event::StreamFailed { .. } => "stream_failed",
        Event::ProcessExited { .. } => "process_exited",
        Event::StreamStale { .. } => "stream_stale",
        Event::ViewerJoined { .. } => "viewer_joined",
        Event::ViewerConnected { .. } => "viewer_connected",
        Event::ViewerLeft { .. } => "viewer_left",
        _ => "other",
    }
}

fn ingest_ports(pairs: u16) -> RangeInclusive<u16> {
    let block = whep_core::ports::PortPool::block(CoreConfig::default().max_renditions);
    40_000..=40_000 + block * pairs - 1
}

/// A P-frame RTP packet as FFmpeg sends it.
fn rtp_packet() -> Vec<u8> {
    let mut p = vec![0x80, 96, 0, 1, 0, 0, 0, 0, 0x11, 0x11, 0, 0];
    p.extend_from_slice(&[0x41, 0x9a, 0, 0, 0, 0]);
    p
}

/// Chromium's offer reduced to one H264 payload type (108, with its RTX 109) and Opus (111):
/// the registry, not SDP negotiation, is under test, and str0m accepts this offer in a
/// third of the time the full one takes in a debug build.
fn offer() -> String {
    static OFFER: LazyLock<String> = LazyLock::new(trimmed_offer);
    OFFER.clone()
}

fn trimmed_offer() -> String {
    const KEEP: [&str; 3] = ["108", "109", "111"];
    let mut out = String::new();
    for line in CHROMIUM_OFFER.lines() {
        if let Some(rest) = line.strip_prefix("m=") {
            let mut fields: Vec<&str> = rest.split(' ').collect();
            let pts = fields.split_off(3.min(fields.len()));
            let pts: Vec<&str> = pts.into_iter().filter(|p| KEEP.contains(p)).collect();
            out.push_str(&format!("m={} {}\r\n", fields.join(" "), pts.join(" ")));
            continue;
        }
        let pt = ["a=rtpmap:", "a=rtcp-fb:", "a=fmtp:"]
            .iter()
            .find_map(|p| line.strip_prefix(p))
            .map(|rest| rest.split([' ', '/']).next().unwrap_or_default());
        if pt.is_none_or(|pt| KEEP.contains(&pt)) {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out
}

fn post(stream: usize, bad: Option<Bad>) -> WhepRequest {
    let req = WhepRequest::new(Method::Post, format!("/whep/{}", NAMES[stream]));
    match bad {
        None => req.with_header("Content-Type", "application/sdp").with_body(offer()),
        Some(Bad::Garbage) => {
            req.with_header("Content-Type", "application/sdp").with_body("hello world")
        }
        Some(Bad::NotSdp) => req.with_header("Content-Type", "text/plain").with_body(offer()),
        Some(Bad::NoH264) => {
            let body = offer().replace("H264/90000", "VP8/90000");
            req.with_header("Content-Type", "application/sdp").with_body(body)
        }
        Some(Bad::TooLarge) => {
            req.with_header("Content-Type", "application/sdp").with_body(vec![b'a'; MAX_BODY + 1])
        }
    }
}

// -------------------------------------------------------------------------------------------
// The reference model
// -------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proc {
    External,
    Spawned,
    /// Went stale and was asked to stop; restarted when it exits.
    Terminating {
        kill_at: Option<Instant>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Stopped,
    Binding { attempt: u32 },
    Running { since: Instant, proc: Proc },
    Backoff { until: Instant },
    Stopping { kill_at: Option<Instant>, remove: bool },
}

impl St {
    fn name(self) -> &'static str {
        match self {
            Self::Stopped => "stopped",
            Self::Binding { .. } => "binding",
            Self::Running { proc: Proc::Terminating { .. }, .. } => "restarting",
            Self::Running { .. } => "running",
            Self::Backoff { .. } => "backoff",
            Self::Stopping { .. } => "stopping",
        }
    }

    fn holds_ports(self) -> bool {
        matches!(self, Self::Binding { .. } | Self::Running { .. } | Self::Stopping { .. })
    }
}

#[derive(Debug, Clone)]
struct MStream {
    kind: Kind,
    cap: usize,
    st: St,
    /// Consecutive failed runs (restart backoff exponent).
    failures: u32,
    restarts: u64,
    last_rtp: Option<Instant>,
    /// Whether its fake FFmpeg runs.
    alive: bool,
}

impl MStream {
    fn backoff(&mut self, ran: Option<Duration>) -> Duration {
        if ran.is_some_and(|r| r >= BACKOFF_RESET) {
            self.failures = 0;
        }
        let exp = self.failures.min(16);
        self.failures += 1;
        BACKOFF_INITIAL.saturating_mul(1 << exp).min(BACKOFF_MAX)
    }

    fn deadline(&self) -> Option<Instant> {
        match self.st {
            St::Backoff { until } => Some(until),
            St::Stopping { kill_at, .. } => kill_at,
            St::Running { since, proc: Proc::Spawned } => {
                Some(self.last_rtp.map_or(since, |t| t.max(since)) + STALE)
            }
            St::Running { proc: Proc::Terminating { kill_at }, .. } => kill_at,
            _ => None,
        }
    }
}

/// An output the runtime has yet to execute, in the core's queue order.
#[derive(Debug, Clone, Copy)]
enum Action {
    Bind(usize),
    Spawn(usize),
    Stop(usize),
    Kill(usize),
}

#[derive(Debug)]
struct MViewer {
    stream: usize,
    created: Instant,
    alive: bool,
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Counters {
    joined: u64,
    left: u64,
    ice_failures: u64,
    cap_rejections: u64,
    process_restarts: u64,
    ingest_packets: u64,
    ingest_dropped: u64,
}

#[derive(Debug)]
struct Model {
    now: Instant,
    pairs: usize,
    streams: [Option<MStream>; 4],
    viewers: Vec<MViewer>,
    /// Deadlines of quarantined pairs (the pool sweeps them lazily; only counts matter here).
    quarantine: Vec<Instant>,
    binds: Binds,
    spawn_fails: bool,
    stubborn: bool,
    queue: VecDeque<Action>,
    counters: Counters,
    requests: BTreeMap<(&'static str, String, u16), u64>,
    rejections: BTreeMap<&'static str, u64>,
    events: BTreeMap<&'static str, u64>,
    left: BTreeMap<String, u64>,
}

impl Model {
    fn new(t0: Instant, pairs: u16) -> Self {
        Self {
            now: t0,
            pairs: usize::from(pairs),
            streams: Default::default(),
            viewers: Vec::new(),
            quarantine: Vec::new(),
            binds: Binds::Succeed,
            spawn_fails: false,
            stubborn: false,
            queue: VecDeque::new(),
            counters: Counters::default(),
            requests: BTreeMap::new(),
            rejections: BTreeMap::new(),
            events: BTreeMap::new(),
            left: BTreeMap::new(),
        }
    }

    fn s(&mut self, i: usize) -> &mut MStream {
        self.streams[i].as_mut().expect("the model only touches streams it has")
    }

    fn event(&mut self, kind: &'static str) {
        *self.events.entry(kind).or_default() += 1;
    }

    fn held(&self) -> usize {
        self.streams.iter().flatten().filter(|s| s.st.holds_ports()).count()
    }

    fn free_pairs(&self) -> usize {
        let quarantined = self.quarantine.iter().filter(|t| **t > self.now).count();
        self.pairs - self.held() - quarantined
    }

    fn viewers_of(&self, i: usize) -> usize {
        self.viewers.iter().filter(|v| v.alive && v.stream == i).count()
    }

    fn alive_viewers(&self) -> usize {
        self.viewers.iter().filter(|v| v.alive).count()
    }

    fn close_viewer(&mut self, k: usize, reason: &str) {
        self.viewers[k].alive = false;
        self.counters.left += 1;
        if reason == "ConnectTimeout" {
            self.counters.ice_failures += 1;
        }
        *self.left.entry(reason.to_owned()).or_default() += 1;
        self.event("viewer_left");
    }

    fn close_viewers(&mut self, i: usize, reason: &str) {
        for k in 0..self.viewers.len() {
            if self.viewers[k].alive && self.viewers[k].stream == i {
                self.close_viewer(k, reason);
            }
        }
    }

    // --- requests ------------------------------------------------------------------------

    fn reject(&mut self, code: u16, reason: &'static str) -> u16 {
        *self.rejections.entry(reason).or_default() += 1;
        code
    }

    fn post(&mut self, i: usize, bad: Option<Bad>) -> u16 {
        let code = self.post_code(i, bad);
        *self.requests.entry(("endpoint", "POST".to_owned(), code)).or_default() += 1;
        code
    }

    fn post_code(&mut self, i: usize, bad: Option<Bad>) -> u16 {
        if bad == Some(Bad::TooLarge) {
            return self.reject(413, "payload_too_large");
        }
        let accepts = self.streams[i].as_ref().is_some_and(|s| {
            s.kind != Kind::Disabled
                && matches!(s.st, St::Binding { .. } | St::Running { .. } | St::Backoff { .. })
        });
        if !accepts {
            return self.reject(404, "stream_not_found");
        }
        match bad {
            Some(Bad::NotSdp) => return self.reject(415, "unsupported_media_type"),
            Some(Bad::Garbage) => return self.reject(400, "bad_offer"),
            Some(Bad::NoH264) => return self.reject(406, "codec_mismatch"),
            _ => {}
        }
        if self.viewers_of(i) >= self.s(i).cap {
            self.counters.cap_rejections += 1;
            return self.reject(503, "stream_full");
        }
        if self.alive_viewers() >= CAP_TOTAL {
            self.counters.cap_rejections += 1;
            return self.reject(503, "server_full");
        }
        self.viewers.push(MViewer { stream: i, created: self.now, alive: true });
        self.counters.joined += 1;
        self.event("viewer_joined");
        201
    }

    /// DELETE is idempotent: 204 whether or not the session exists under that stream.
    fn delete(&mut self, session: Option<(usize, usize)>) -> u16 {
        if let Some((k, via)) = session
            && self.viewers[k].alive
            && self.viewers[k].stream == via
        {
            self.close_viewer(k, "Deleted");
        }
        *self.requests.entry(("session", "DELETE".to_owned(), 204)).or_default() += 1;
        204
    }

    // --- stream management ---------------------------------------------------------------

    fn add(&mut self, i: usize, kind: Kind, cap: Option<usize>) -> Result<(), StreamError> {
        if self.streams[i].is_some() {
            return Err(StreamError::Exists);
        }
        self.streams[i] = Some(MStream {
            kind,
            cap: cap.unwrap_or(CAP_PER_STREAM),
            st: St::Stopped,
            failures: 0,
            restarts: 0,
            last_rtp: None,
            alive: false,
        });
        Ok(())
    }

    fn start(&mut self, i: usize) -> Result<(), StreamError> {
        let Some(s) = &self.streams[i] else {
            return Err(StreamError::NotFound);
        };
        if s.kind == Kind::Disabled {
            return Err(StreamError::Disabled);
        }
        if !matches!(s.st, St::Stopped | St::Backoff { .. }) {
            return Err(StreamError::AlreadyStarted);
        }
        if self.free_pairs() == 0 {
            return Err(StreamError::NoPorts);
        }
        // A start by the application resets the crash backoff.
        self.s(i).failures = 0;
        self.begin_bind(i, 1);
        Ok(())
    }

    fn stop(&mut self, i: usize, remove: bool, reason: &str) -> Result<(), StreamError> {
        if self.streams[i].is_none() {
            return Err(StreamError::NotFound);
        }
        self.close_viewers(i, reason);
        let now = self.now;
        match self.s(i).st {
            St::Running { proc: Proc::Spawned | Proc::Terminating { .. }, .. } => {
                self.s(i).st = St::Stopping { kill_at: Some(now + STOP_GRACE), remove };
                self.queue.push_back(Action::Stop(i));
            }
            St::Stopping { kill_at, remove: r } => {
                self.s(i).st = St::Stopping { kill_at, remove: r || remove };
            }
            St::Running { proc: Proc::External, .. }
            | St::Binding { .. }
            | St::Backoff { .. }
            | St::Stopped => self.stopped(i, remove),
        }
        Ok(())
    }

    fn stopped(&mut self, i: usize, remove: bool) {
        self.s(i).st = St::Stopped;
        self.event("stream_stopped");
        if remove {
            self.streams[i] = None;
        }
    }

    // --- what the core does on runtime reports -------------------------------------------

    /// Allocates a pair (the caller checked one is free) and asks the runtime to bind it.
    fn begin_bind(&mut self, i: usize, attempt: u32) {
        let now = self.now;
        self.quarantine.retain(|t| *t > now);
        let s = self.s(i);
        s.st = St::Binding { attempt };
        s.last_rtp = None;
        self.queue.push_back(Action::Bind(i));
    }

    fn bound(&mut self, i: usize) {
        let now = self.now;
        let s = self.s(i);
        if !matches!(s.st, St::Binding { .. }) {
            return;
        }
        if s.kind == Kind::Supervised {
            s.st = St::Running { since: now, proc: Proc::Spawned };
            self.queue.push_back(Action::Spawn(i));
        } else {
            s.st = St::Running { since: now, proc: Proc::External };
        }
        self.event("stream_ready");
    }

    fn bind_failed(&mut self, i: usize) {
        let St::Binding { attempt } = self.s(i).st else {
            return;
        };
        // The pair is quarantined, no longer held.
        self.quarantine.push(self.now + BIND_QUARANTINE);
        self.s(i).st = St::Stopped;
        if attempt < MAX_BIND_ATTEMPTS && self.free_pairs() > 0 {
            self.begin_bind(i, attempt + 1);
        } else {
            self.failed(i);
        }
    }

    /// The stream could not get going: ports released, supervised streams retry later (their
    /// viewers wait), external ones stop and close their viewers.
    fn failed(&mut self, i: usize) {
        let now = self.now;
        let s = self.s(i);
        s.alive = false;
        if s.kind == Kind::Supervised {
            s.st = St::Backoff { until: now + s.backoff(None) };
        } else {
            s.st = St::Stopped;
            self.close_viewers(i, "StreamStopped");
        }
        self.event("stream_failed");
    }

    fn spawn_failed(&mut self, i: usize) {
        if !matches!(self.s(i).st, St::Running { proc: Proc::Spawned, .. }) {
            return;
        }
        self.close_viewers(i, "StreamRestarting");
        self.failed(i);
    }

    /// The stream's process exited (crash, SIGTERM or SIGKILL).
    fn process_exit(&mut self, i: usize) {
        let now = self.now;
        self.s(i).alive = false;
        match self.s(i).st {
            St::Stopping { remove, .. } => self.stopped(i, remove),
            St::Running { since, proc } => {
                let ran = match proc {
                    Proc::Spawned => Some(now - since),
                    Proc::Terminating { .. } => None,
                    Proc::External => return,
                };
                let s = self.s(i);
                let delay = s.backoff(ran);
                s.restarts += 1;
                self.counters.process_restarts += 1;
                self.event("process_exited");
                self.close_viewers(i, "StreamRestarting");
                self.s(i).st = St::Backoff { until: now + delay };
            }
            _ => {}
        }
    }

    fn crash(&mut self, i: usize) {
        if self.streams[i].as_ref().is_some_and(|s| s.alive) {
            self.process_exit(i);
            self.drain();
        }
    }

    /// Runs the queued outputs as the fake runtime does.
    fn drain(&mut self) {
        while let Some(action) = self.queue.pop_front() {
            match action {
                Action::Bind(i) => match self.binds {
                    Binds::Succeed => self.bound(i),
                    Binds::Fail => self.bind_failed(i),
                    Binds::Defer => {}
                },
                Action::Spawn(i) => {
                    if self.spawn_fails {
                        self.spawn_failed(i);
                    } else {
                        self.s(i).alive = true;
                    }
                }
                Action::Stop(i) => {
                    if !self.stubborn && self.s(i).alive {
                        self.process_exit(i);
                    }
                }
                Action::Kill(i) => {
                    if self.s(i).alive {
                        self.process_exit(i);
                    }
                }
            }
        }
    }

    // --- time ----------------------------------------------------------------------------

    fn next_deadline(&self) -> Option<Instant> {
        let viewers = self.viewers.iter().filter(|v| v.alive).map(|v| v.created + CONNECT_TIMEOUT);
        let streams = self.streams.iter().flatten().filter_map(MStream::deadline);
        viewers.chain(streams).min()
    }

    /// Every timer due up to `target`, instant by instant: at one instant the core handles
    /// sessions first, then streams in id order, and only then does the runtime execute the
    /// outputs.
    fn advance(&mut self, target: Instant) {
        while let Some(t) = self.next_deadline().filter(|t| *t <= target) {
            self.now = t;
            for k in 0..self.viewers.len() {
                if self.viewers[k].alive && self.viewers[k].created + CONNECT_TIMEOUT <= t {
                    self.close_viewer(k, "ConnectTimeout");
                }
            }
            for i in 0..NAMES.len() {
                if self.streams[i].as_ref().and_then(MStream::deadline).is_some_and(|d| d <= t) {
                    self.stream_timeout(i);
                }
            }
            self.drain();
        }
        self.now = target;
    }

    fn stream_timeout(&mut self, i: usize) {
        let now = self.now;
        match self.s(i).st {
            St::Backoff { .. } => {
                if self.free_pairs() > 0 {
                    self.begin_bind(i, 1);
                } else {
                    let s = self.s(i);
                    s.st = St::Backoff { until: now + s.backoff(None) };
                }
            }
            St::Stopping { remove, .. } => {
                self.s(i).st = St::Stopping { kill_at: None, remove };
                self.queue.push_back(Action::Kill(i));
            }
            St::Running { proc: Proc::Terminating { .. }, since } => {
                self.s(i).st = St::Running { since, proc: Proc::Terminating { kill_at: None } };
                self.queue.push_back(Action::Kill(i));
            }
            St::Running { since, proc: Proc::Spawned } => {
                self.s(i).st = St::Running {
                    since,
                    proc: Proc::Terminating { kill_at: Some(now + STOP_GRACE) },
                };
                self.event("stream_stale");
                self.queue.push_back(Action::Stop(i));
            }
            _ => {}
        }
    }

    fn rtp(&mut self, i: usize) {
        self.counters.ingest_packets += 1;
        let now = self.now;
        match self.streams[i].as_mut() {
            Some(s) if matches!(s.st, St::Running { .. } | St::Stopping { .. }) => {
                s.last_rtp = Some(now);
            }
            _ => self.counters.ingest_dropped += 1,
        }
    }
}

// -------------------------------------------------------------------------------------------
// The test
// -------------------------------------------------------------------------------------------

/// Applies one operation to both sides, comparing direct results.
fn apply(sut: &mut Sut, model: &mut Model, i: usize, op: &Op) -> Result<(), TestCaseError> {
    let now = sut.now;
    match *op {
        Op::Add { stream, kind, cap } => {
            let mut config = match kind {
                Kind::Supervised => StreamConfig::supervised(vec!["-i".into(), "x".into()]),
                Kind::External | Kind::Disabled => StreamConfig::external(),
            };
            config.egress.enabled = kind != Kind::Disabled;
            config.max_viewers = cap;
            let got = sut.core.add_stream(stream_id(stream), config);
            sut.drain();
            prop_assert_eq!(got, model.add(stream, kind, cap), "op #{} {:?}", i, op);
        }
        Op::Start { stream } => {
            let got = sut.core.start_stream(&stream_id(stream), now);
            sut.drain();
            let want = model.start(stream);
            model.drain();
            prop_assert_eq!(got, want, "op #{} {:?}", i, op);
        }
        Op::Stop { stream } | Op::Remove { stream } => {
            let remove = matches!(op, Op::Remove { .. });
            let id = stream_id(stream);
            let got = if remove {
                sut.core.remove_stream(&id, now)
            } else {
                sut.core.stop_stream(&id, now)
            };
            sut.drain();
            let want = model.stop(stream, remove, "StreamStopped");
            model.drain();
            prop_assert_eq!(got, want, "op #{} {:?}", i, op);
        }
        Op::Post { stream } | Op::PostBad { stream, .. } => {
            let bad = match *op {
                Op::PostBad { bad, .. } => Some(bad),
                _ => None,
            };
            let got = sut.http(post(stream, bad));
            prop_assert_eq!(got, model.post(stream, bad), "op #{} {:?}: status", i, op);
        }
        Op::Delete { session } | Op::DeleteVia { session, .. } => {
            if sut.sessions.is_empty() {
                return apply(sut, model, i, &Op::DeleteUnknown { stream: 0 });
            }
            let k = session % sut.sessions.len();
            let location = sut.sessions[k].clone();
            let (own, sid) = location.rsplit_once('/').unwrap_or_default();
            prop_assert!(is_hex(sid), "op #{} {:?}: Location {:?}", i, op, location);
            prop_assert_eq!(
                own.to_owned(),
                format!("/whep/{}", NAMES[model.viewers[k].stream]),
                "op #{} {:?}: Location of session {}",
                i,
                op,
                k
            );
            let via = match *op {
                Op::DeleteVia { stream, .. } => stream,
                _ => model.viewers[k].stream,
            };
            let target = format!("/whep/{}/{sid}", NAMES[via]);
            let got = sut.http(WhepRequest::new(Method::Delete, target));
            prop_assert_eq!(got, model.delete(Some((k, via))), "op #{} {:?}: status", i, op);
        }
        Op::DeleteUnknown { stream } => {
            let target = format!("/whep/{}/{:032x}", NAMES[stream], 0xdead_beef_u128);
            let got = sut.http(WhepRequest::new(Method::Delete, target));
            prop_assert_eq!(got, model.delete(None), "op #{} {:?}: status", i, op);
        }
        Op::Rtp { stream } => {
            let port =
                sut.core.stream(&stream_id(stream)).and_then(|s| s.ports).map_or(1, |p| p.video);
            sut.core.handle_input(whep_core::sim::from_ffmpeg(port, &rtp_packet()), now);
            sut.drain();
            model.rtp(stream);
        }
        Op::Crash { stream } => {
            let id = stream_id(stream);
            if let Some(generation) = sut.procs.remove(&id) {
                sut.input(Input::ProcessExited { stream: id, generation, code: None });
                sut.drain();
            }
            model.crash(stream);
        }
        Op::CompleteBind { stream, ok } => {
            let id = stream_id(stream);
            if let Some(ports) = sut.pending.remove(&id) {
                if ok {
                    sut.bound.insert(id.clone(), ports);
                    sut.input(Input::IngestBound { stream: id, ports });
                } else {
                    let error = "address in use".to_owned();
                    sut.input(Input::BindFailed { stream: id, ports, error });
                }
                sut.drain();
            }
            if model.streams[stream].as_ref().is_some_and(|s| matches!(s.st, St::Binding { .. })) {
                if ok {
                    model.bound(stream);
                } else {
                    model.bind_failed(stream);
                }
                model.drain();
            }
        }
        Op::Advance { ms } => {
            let target = now + Duration::from_millis(ms);
            sut.advance(target);
            model.advance(target);
        }
        Op::Binds(b) => {
            sut.binds = b;
            model.binds = b;
        }
        Op::SpawnFails(on) => {
            sut.spawn_fails = on;
            model.spawn_fails = on;
        }
        Op::Stubborn(on) => {
            sut.stubborn = on;
            model.stubborn = on;
        }
        Op::Shutdown => {
            sut.core.shutdown(now);
            sut.drain();
            for j in 0..NAMES.len() {
                // Ignores absent streams, as the core iterates over the streams it has.
                let _ = model.stop(j, false, "Shutdown");
            }
            model.drain();
        }
    }
    Ok(())
}

/// Compares everything observable after an operation.
fn compare(sut: &Sut, model: &Model, i: usize, op: &Op) -> Result<(), TestCaseError> {
    let core = &sut.core;
    prop_assert_eq!(sut.now - sut.t0, model.now - sut.t0, "op #{} {:?}: clocks", i, op);
    prop_assert_eq!(core.viewer_count(), model.alive_viewers(), "op #{} {:?}: viewer_count", i, op);
    prop_assert_eq!(core.ports_in_use(), model.held(), "op #{} {:?}: ports_in_use", i, op);
    prop_assert_eq!(
        sut.bound.len() + sut.pending.len(),
        model.held(),
        "op #{} {:?}: pairs bound or binding in the runtime",
        i,
        op
    );
    let listed: Vec<String> = core.streams().iter().map(|s| s.id.to_string()).collect();
    let want: Vec<String> = (0..NAMES.len())
        .filter(|j| model.streams[*j].is_some())
        .map(|j| NAMES[j].to_owned())
        .collect();
    prop_assert_eq!(listed, want, "op #{} {:?}: streams", i, op);
    for (j, m) in model.streams.iter().enumerate() {
        let Some(m) = m else { continue };
        let Some(info) = core.stream(&stream_id(j)) else {
            return Err(TestCaseError::fail(format!("op #{i} {op:?}: {} missing", NAMES[j])));
        };
        let name = NAMES[j];
        prop_assert_eq!(info.state.as_str(), m.st.name(), "op #{} {:?}: state of {}", i, op, name);
        prop_assert_eq!(
            info.viewers,
            model.viewers_of(j),
            "op #{} {:?}: viewers of {}",
            i,
            op,
            name
        );
        if info.state == StreamStatus::Stopped {
            prop_assert_eq!(info.viewers, 0, "op #{} {:?}: stopped {} holds viewers", i, op, name);
        }
        prop_assert_eq!(info.connected_viewers, 0, "op #{} {:?}: connected of {}", i, op, name);
        prop_assert_eq!(
            info.ports.is_some(),
            m.st.holds_ports(),
            "op #{} {:?}: {} holds ports",
            i,
            op,
            name
        );
        prop_assert_eq!(info.pid.is_some(), m.alive, "op #{} {:?}: pid of {}", i, op, name);
        prop_assert_eq!(info.restarts, m.restarts, "op #{} {:?}: restarts of {}", i, op, name);
        prop_assert_eq!(
            info.supervised,
            m.kind == Kind::Supervised,
            "op #{} {:?}: {}",
            i,
            op,
            name
        );
        prop_assert_eq!(info.enabled, m.kind != Kind::Disabled, "op #{} {:?}: {}", i, op, name);
    }
    let metrics = core.metrics();
    let counters = Counters {
        joined: metrics.viewers_joined,
        left: metrics.viewers_left,
        ice_failures: metrics.ice_failures,
        cap_rejections: metrics.cap_rejections,
        process_restarts: metrics.process_restarts,
        ingest_packets: metrics.ingest_packets,
        ingest_dropped: metrics.ingest_dropped,
    };
    prop_assert_eq!(&counters, &model.counters, "op #{} {:?}: metrics", i, op);
    prop_assert_eq!(metrics.viewers_connected, 0, "op #{} {:?}: nobody connects", i, op);
    prop_assert_eq!(&metrics.requests, &model.requests, "op #{} {:?}: requests", i, op);
    prop_assert_eq!(&metrics.rejections, &model.rejections, "op #{} {:?}: rejections", i, op);
    prop_assert_eq!(&sut.events, &model.events, "op #{} {:?}: events by kind", i, op);
    prop_assert_eq!(&sut.left, &model.left, "op #{} {:?}: viewers left by reason", i, op);
    let idle = model.alive_viewers() == 0
        && model.held() == 0
        && model.streams.iter().flatten().all(|s| s.st == St::Stopped);
    prop_assert_eq!(core.is_idle(), idle, "op #{} {:?}: is_idle", i, op);
    Ok(())
}

/// Runs `ops`, then a shutdown and the stop grace, comparing after each; a panic in the core
/// or in the fake runtime's checks (`check_invariants`) is reported with the operation index.
fn run(pairs: u16, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut sut = Sut::new(pairs);
    let mut model = Model::new(sut.t0, pairs);
    let finish = [Op::Shutdown, Op::Advance { ms: STOP_GRACE.as_millis() as u64 }];
    for (i, op) in ops.iter().chain(&finish).enumerate() {
        let step = panic::catch_unwind(AssertUnwindSafe(|| apply(&mut sut, &mut model, i, op)));
        match step {
            Ok(result) => result?,
            Err(payload) => {
                let msg = payload
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| payload.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)");
                return Err(TestCaseError::fail(format!("op #{i} {op:?} panicked: {msg}")));
            }
        }
        compare(&sut, &model, i, op)?;
    }
    prop_assert!(sut.core.is_idle(), "not idle after the final shutdown: {:?}", sut.core.streams());
    prop_assert!(
        sut.procs.is_empty() && sut.bound.is_empty() && sut.pending.is_empty(),
        "the runtime still holds processes {:?}, bound pairs {:?} or binds {:?}",
        sut.procs,
        sut.bound,
        sut.pending
    );
    Ok(())
}

fn op() -> impl Strategy<Value = Op> {
    let s = || 0..NAMES.len();
    let kind = prop_oneof![
        4 => Just(Kind::External),
        4 => Just(Kind::Supervised),
        1 => Just(Kind::Disabled),
    ];
    let cap = prop_oneof![3 => Just(None), 1 => (0usize..=4).prop_map(Some)];
    let bad =
        prop_oneof![Just(Bad::Garbage), Just(Bad::NotSdp), Just(Bad::NoH264), Just(Bad::TooLarge)];
    let binds =
        prop_oneof![3 => Just(Binds::Succeed), 1 => Just(Binds::Fail), 1 => Just(Binds::Defer)];
    let ms = prop_oneof![
        12 => 0u64..300,
        6 => 300u64..3_000,
        1 => Just(CONNECT_TIMEOUT.as_millis() as u64),
    ];
    // Simplest first: proptest shrinks an operation towards the earlier alternatives.
    prop_oneof![
        6 => ms.prop_map(|ms| Op::Advance { ms }),
        3 => (s(), kind, cap).prop_map(|(stream, kind, cap)| Op::Add { stream, kind, cap }),
        6 => s().prop_map(|stream| Op::Start { stream }),
        1 => s().prop_map(|stream| Op::Stop { stream }),
        1 => s().prop_map(|stream| Op::Remove { stream }),
        12 => s().prop_map(|stream| Op::Post { stream }),
        2 => (s(), bad).prop_map(|(stream, bad)| Op::PostBad { stream, bad }),
        3 => (0usize..64).prop_map(|session| Op::Delete { session }),
        1 => (0usize..64, s()).prop_map(|(session, stream)| Op::DeleteVia { session, stream }),
        1 => s().prop_map(|stream| Op::DeleteUnknown { stream }),
        2 => s().prop_map(|stream| Op::Rtp { stream }),
        2 => s().prop_map(|stream| Op::Crash { stream }),
        2 => (s(), any::<bool>()).prop_map(|(stream, ok)| Op::CompleteBind { stream, ok }),
        1 => binds.prop_map(Op::Binds),
        1 => any::<bool>().prop_map(Op::SpawnFails),
        1 => any::<bool>().prop_map(Op::Stubborn),
        1 => Just(Op::Shutdown),
    ]
}

/// Cases per run (`PROPTEST_CASES` overrides it): about 12 s in a debug build.
const CASES: u32 = 192;

/// Runs random sequences through proptest and, on a failure, removes from proptest's shrunk
/// sequence every operation that the failure does not need. Proptest shrinks a `Vec` in a
/// single deletion pass followed by element shrinking, which can leave operations that only
/// became removable later; the report shows both sequences, one operation a line with the
/// index the assertion messages use.
#[test]
fn registry_matches_the_model() {
    let mut config =
        contextualize_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() });
    config.failure_persistence = None;
    let pairs = prop_oneof![4 => 1u16..=4, 1 => Just(12u16)];
    let strategy = (pairs, prop::collection::vec(op(), 1..300));
    match TestRunner::new(config).run(&strategy, |(pairs, ops)| run(pairs, &ops)) {
        Ok(()) => {}
        Err(TestError::Abort(why)) => panic!("proptest aborted: {why}"),
        Err(TestError::Fail(why, (pairs, ops))) => {
            let (min_pairs, min_ops) = minimize(pairs, ops.clone());
            let min_why = run(min_pairs, &min_ops).err().map(|e| e.to_string()).unwrap_or_default();
            panic!(
                "{why}\nproptest's shrunk input: pairs = {pairs}, ops = {}\n\
                 every operation the failure needs: pairs = {min_pairs}, ops = {}\n\
                 which fails with: {min_why}",
                listing(&ops),
                listing(&min_ops),
            );
        }
    }
}

/// Greedily removes operations (and ingest pairs) while the run still fails, to a fixpoint.
fn minimize(mut pairs: u16, mut ops: Vec<Op>) -> (u16, Vec<Op>) {
    // The panics of failing candidates were reported already; keep the output readable.
    let hook = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));
    let fails = |pairs: u16, ops: &[Op]| run(pairs, ops).is_err();
    loop {
        let before = (pairs, ops.len());
        let mut i = 0;
        while i < ops.len() {
            let mut shorter = ops.clone();
            shorter.remove(i);
            if fails(pairs, &shorter) {
                ops = shorter;
            } else {
                i += 1;
            }
        }
        if let Some(fewer) = (1..pairs).find(|p| fails(*p, &ops)) {
            pairs = fewer;
        }
        if (pairs, ops.len()) == before {
            break;
        }
    }
    panic::set_hook(hook);
    (pairs, ops)
}

fn listing(ops: &[Op]) -> String {
    let lines: String =
        ops.iter().enumerate().map(|(i, op)| format!("\n    #{i} {op:?}")).collect();
    format!("[{lines}\n]")
}

/// Found by this test (shrunk as shown): an external stream whose start failed after a viewer
/// joined while its pair was binding went back to "stopped" with that viewer still attached.
#[test]
fn external_stream_that_cannot_bind_closes_its_viewers() {
    let ops = [
        Op::Add { stream: 3, kind: Kind::External, cap: None },
        Op::Binds(Binds::Defer),
        Op::Start { stream: 3 },
        Op::Binds(Binds::Fail),
        Op::Post { stream: 3 },
        Op::CompleteBind { stream: 3, ok: false },
    ];
    if let Err(e) = run(2, &ops) {
        panic!("{e}");
    }
}
