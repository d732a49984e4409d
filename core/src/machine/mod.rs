//! The core state machine. [`Core`] owns the state and dispatches each input to the module
//! whose job it is:
//!
//! | module | job |
//! |---|---|
//! | `streams` | stream lifecycle: add, start (bind the ingest ports, spawn FFmpeg), stop, remove, FFmpeg exits and restarts, stale sources |
//! | `fanout` | ingest: datagrams from FFmpeg checked and parsed, then written to every viewer of their stream |
//! | `viewers` | viewers (WHEP sessions, each a str0m peer): their datagrams, timers, connection news, GOP-cache prime and keyframe replies, removal |
//! | `tcp` | ICE-TCP connections: RFC 4571 frames in, each connection bound to the viewer its first check names, bounds on their number and unbound lifetime |
//! | `stun` | the viewer socket's public address, learned from STUN servers and advertised to new sessions |
//! | `sessions` | the sessions listing (a snapshot per viewer) and the operator's kick |
//! | `http` | the WHEP resource: POST, PATCH (trickle, ICE restart), DELETE, OPTIONS; rate limits, caps, admission |
//! | `invariants` | the bookkeeping checked whole, after every step in tests |

mod auth;
mod fanout;
mod http;
mod invariants;
mod sessions;
mod streams;
mod stun;
mod tcp;
mod viewers;

pub use sessions::{CandidatePair, MediaTransport, SessionInfo, SessionState};
pub use tcp::TransportCounts;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::config::{CryptoProvider, DtlsCert};
use tracing::{info, warn};

use crate::config::{CoreConfig, Feed, StreamConfig, canonical_addr};
use crate::ids::{Rng, SessionId, SessionMap, StreamId};
use crate::metrics::Metrics;
use crate::packet::SourcePacket;
use crate::pathbook::PathBook;
use crate::ports::PortPool;
use crate::ratelimit::{Limiter, Unconnected};
use crate::shard::{Mirror, ShardMember};
use crate::stream::{Leg, Process, Stream, StreamState};
use crate::viewer::{Viewer, ViewerNews, ViewerState};
use crate::{CloseReason, Input, Output, RenditionInfo, StreamInfo, TimerReason};

/// How many adjacent pairs a stream tries before giving up (the seed's retry count).
const MAX_BIND_ATTEMPTS: u32 = 10;

/// Ingest packets held for a viewer-by-viewer fan-out at most ([`Core::fan_out_pending`]);
/// a runtime normally takes outputs well before (after each wake-up's batch of reads).
const MAX_PENDING: usize = 64;

/// Outputs the core queues before [`Core::poll_output`] hands them out while it writes a batch
/// of packets to the viewers: a few viewers' copies at a time.
const OUTPUT_CHUNK: usize = 64;

/// Weight of a new sample in the load ([`Core::set_load`]): an exponential moving average,
/// whose time constant is about three samples.
pub const LOAD_SMOOTHING: f64 = 0.3;

/// What a timer entry belongs to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKey {
    Viewer(SessionId),
    Stream(StreamId),
    Tcp(crate::tcp::ConnId),
    Stun,
    Auth(crate::auth::RequestId),
}

/// The sans-IO WHEP egress core. See the [crate documentation](crate) for the run loop.
///
/// # Calling contract
///
/// - **Inputs**: [`handle_http`](Self::handle_http) (answers at once), or
///   [`handle_request`](Self::handle_request) and [`handle_auth`](Self::handle_auth) (a request
///   may wait for the authorisation callback, see [`crate::auth`]),
///   [`handle_input`](Self::handle_input) (datagrams, RTP from FFmpeg, bind results, process
///   lifecycle), [`handle_timeout`](Self::handle_timeout), and the stream management calls
///   [`add_stream`](Self::add_stream), [`start_stream`](Self::start_stream),
///   [`stop_stream`](Self::stop_stream), [`remove_stream`](Self::remove_stream),
///   [`shutdown`](Self::shutdown).
/// - **Outputs**: after any of those calls, drain [`poll_output`](Self::poll_output) until it
///   returns `None` and execute each [`Output`] in order; then read
///   [`poll_timeout`](Self::poll_timeout) and call `handle_timeout` when that instant arrives.
/// - **Time** comes only from the `now` arguments. It must not go backwards; an earlier `now`
///   than one already seen is treated as the latest one seen.
/// - A spurious or early `handle_timeout` is harmless.
/// - Rejections (404, 406, 503, ...) are ordinary responses; IO failures come back as inputs
///   ([`Input::BindFailed`], [`Input::SpawnFailed`], [`Input::ProcessExited`]). Nothing here
///   panics on bytes from the network or from FFmpeg.
#[derive(Debug)]
pub struct Core {
    config: CoreConfig,
    rng: Rng,
    crypto: Arc<CryptoProvider>,
    cert: Option<DtlsCert>,
    streams: BTreeMap<StreamId, Stream>,
    viewers: SessionMap<Box<Viewer>>,
    by_addr: HashMap<SocketAddr, SessionId>,
    by_ufrag: HashMap<String, SessionId>,
    ingest: HashMap<u16, (StreamId, Leg)>,
    /// Open TCP connections (ICE-TCP).
    tcp: BTreeMap<crate::tcp::ConnId, tcp::TcpConn>,
    /// Discovery of the viewer socket's public address ([`crate::stun`]), when STUN servers
    /// are configured.
    stun: Option<crate::stun::Discovery>,
    /// Frames of one TCP read (reused).
    tcp_frames: Vec<Vec<u8>>,
    ports: PortPool,
    timers: BTreeSet<(Instant, TimerKey)>,
    outputs: VecDeque<Output>,
    metrics: Metrics,
    limiter: Limiter,
    /// Sessions not connected yet per client address (a sharded server counts them in its
    /// [`SharedSeats`](crate::shard::SharedSeats) instead).
    unconnected: Unconnected,
    /// What viewers' reports taught about their paths, for the next session from there.
    paths: PathBook,
    /// This core's place in a sharded server ([`Core::in_shard`]); caps and rate limits are
    /// then counted in the shared [`SharedSeats`](crate::shard::SharedSeats).
    shard: Option<ShardMember>,
    /// This core leads a sharded server: it mirrors streams and packets to the others.
    mirrors: bool,
    /// The load (the runtime's samples, smoothed), and whether admission is closed because of it.
    load: f64,
    overloaded: bool,
    /// [`set_draining`](Self::set_draining).
    draining: bool,
    next_generation: u64,
    now: Instant,
    /// Ingest packets parsed but not yet written to viewers, with their arrival times: written
    /// viewer by viewer when outputs are next taken or any other input comes
    /// ([`Core::fan_out_pending`]).
    pending: Vec<(StreamId, SourcePacket, Instant)>,
    /// The batch being written, viewer by viewer, as outputs are taken.
    fanning: Option<fanout::Fanning>,
    /// Reused buffers, so the packet path does not allocate for bookkeeping.
    news: Vec<ViewerNews>,
    scratch: Vec<SessionId>,
    /// Requests waiting for the authorisation callback or for JWT keys, and the callback's
    /// cached decisions.
    auth: auth::AuthState,
}

impl Core {
    /// Creates a core. `now` is the earliest instant it will see.
    pub fn new(mut config: CoreConfig, now: Instant) -> Self {
        for c in config.host_candidates.iter_mut().chain(config.tcp_candidates.iter_mut()) {
            *c = canonical_addr(*c);
        }
        let crypto = Arc::clone(&config.crypto);
        let cert = crypto.dtls_provider.generate_certificate();
        let stun = crate::stun::Discovery::new(&config.stun_servers, config.stun_interval, now);
        let mut core = Self {
            rng: Rng::new(config.rng_seed),
            ports: PortPool::with_stride(
                config.ingest_ports.clone(),
                PortPool::block(config.max_renditions),
            ),
            limiter: Limiter::new(config.rate_limits, now),
            unconnected: Unconnected::default(),
            paths: PathBook::default(),
            config,
            crypto,
            cert,
            streams: BTreeMap::new(),
            viewers: SessionMap::default(),
            by_addr: HashMap::new(),
            by_ufrag: HashMap::new(),
            ingest: HashMap::new(),
            tcp: BTreeMap::new(),
            stun,
            tcp_frames: Vec::new(),
            timers: BTreeSet::new(),
            outputs: VecDeque::new(),
            metrics: Metrics::default(),
            mirrors: false,
            shard: None,
            load: 0.0,
            overloaded: false,
            draining: false,
            next_generation: 1,
            now,
            pending: Vec::new(),
            fanning: None,
            news: Vec::new(),
            scratch: Vec::new(),
            auth: auth::AuthState::default(),
        };
        core.reschedule_stun();
        core
    }

    /// Makes this core shard `member.index` of a sharded server (see [`crate::shard`]): its
    /// caps and rate limits are counted in the shared set, and the leader (index 0) mirrors its
    /// streams and packets to the others.
    #[must_use]
    pub fn in_shard(mut self, member: ShardMember) -> Self {
        self.mirrors = member.is_leader() && member.set.count() > 1;
        self.shard = Some(member);
        self
    }

    /// The configuration.
    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// Counters since creation.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Records how long one ingest packet took from its arrival to the runtime having sent its
    /// last copy, into [`Metrics::egress_latency`]. The core cannot see this itself: it ends
    /// in the runtime's sockets.
    pub fn record_egress_latency(&mut self, latency: Duration) {
        self.metrics.egress_latency.record(latency);
    }

    /// Records that `copies` viewers' copies of ingest packets left `latency` after the
    /// packets' arrival, into [`Metrics::copy_latency`].
    pub fn record_copy_latency(&mut self, latency: Duration, copies: u64) {
        self.metrics.copy_latency.record_n(latency, copies);
    }

    /// Counts packets a sharded leader's runtime dropped for a follower shard whose queue was
    /// full ([`Metrics::mirror_packets_dropped`]).
    pub fn record_mirror_drops(&mut self, packets: u64) {
        self.metrics.mirror_packets_dropped += packets;
    }

    /// Reports the share of its time (0 to 1) the loop driving this core spent forwarding
    /// (ingest, viewer datagrams, timers and sending; answering HTTP requests excluded, the
    /// rate limits bound those) rather than waiting, over the last interval (the runtime
    /// measures it; call it every ~250 ms). The core smooths the samples
    /// ([`LOAD_SMOOTHING`]: about the last second at that rate), so that the burst of a
    /// keyframe, one interval in eight with a 2 s GOP, does not close admission by itself. At
    /// [`CoreConfig::max_load`] or more, new viewers are refused with 503 ([`Reject::Overloaded`](crate::whep::Reject::Overloaded))
    /// until the load falls below 85 % of it.
    pub fn set_load(&mut self, sample: f64) {
        let sample = if sample.is_finite() { sample.clamp(0.0, 1.0) } else { 0.0 };
        let load = self.load + (sample - self.load) * LOAD_SMOOTHING;
        self.load = load;
        let max = self.config.max_load;
        let was = self.overloaded;
        if max < 1.0 && load >= max {
            self.overloaded = true;
        } else if load < max * 0.85 || max >= 1.0 {
            self.overloaded = false;
        }
        if self.overloaded != was {
            if self.overloaded {
                warn!(load, "overloaded: refusing new viewers");
            } else {
                info!(load, "load back to normal: admitting viewers");
            }
        }
    }

    /// The load: the samples reported with [`set_load`](Self::set_load), smoothed.
    pub fn load(&self) -> f64 {
        self.load
    }

    /// Drains the server (on SIGTERM before a shutdown): while set, POSTs get 503 with
    /// `Retry-After` ([`Reject::Draining`](crate::whep::Reject::Draining)) and
    /// [`readiness`](Self::readiness) says so, while the viewers already here keep playing
    /// and their sessions answer PATCH and DELETE.
    pub fn set_draining(&mut self, draining: bool) {
        if draining != self.draining {
            info!(draining, viewers = self.viewers.len(), "draining");
        }
        self.draining = draining;
    }

    /// Whether [`set_draining`](Self::set_draining) is on.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Whether a load balancer should send this node new viewers: `Err` with the reason
    /// (`draining`, `overloaded`, `full`: the total viewer cap is reached) when a POST would be
    /// refused whatever the stream.
    pub fn readiness(&self) -> Result<(), &'static str> {
        let viewers = match &self.shard {
            Some(m) => m.set.viewers(),
            None => self.viewers.len(),
        };
        if self.draining {
            Err("draining")
        } else if self.overloaded {
            Err("overloaded")
        } else if viewers >= self.config.max_viewers_total {
            Err("full")
        } else {
            Ok(())
        }
    }

    /// Whether new viewers are being refused because of load (see [`set_load`](Self::set_load)).
    pub fn is_overloaded(&self) -> bool {
        self.overloaded
    }

    /// Number of viewers (WHEP sessions) in total.
    pub fn viewer_count(&self) -> usize {
        self.viewers.len()
    }

    /// Video packets held back for viewers being primed at a paced rate, in total (each
    /// viewer's share is bounded by [`PrimePacing::max_pending`](crate::PrimePacing)).
    pub fn prime_backlog(&self) -> usize {
        self.viewers.values().map(|p| p.video.backlog()).sum()
    }

    /// Number of ingest port pairs held by streams.
    pub fn ports_in_use(&self) -> usize {
        self.ports.in_use()
    }

    /// Status of one stream.
    pub fn stream(&self, id: &StreamId) -> Option<StreamInfo> {
        self.streams.get(id).map(|s| self.info(s))
    }

    /// Status of every stream, ordered by id.
    pub fn streams(&self) -> Vec<StreamInfo> {
        self.streams.values().map(|s| self.info(s)).collect()
    }

    fn info(&self, s: &Stream) -> StreamInfo {
        StreamInfo {
            id: s.id.clone(),
            state: s.status(),
            enabled: s.config.egress.enabled,
            supervised: s.supervised(),
            ports: s.ports(),
            pid: s.pid,
            viewers: s.viewers.len(),
            connected_viewers: s
                .viewers
                .iter()
                .filter(|v| self.viewers.get(v).is_some_and(|p| p.state == ViewerState::Connected))
                .count(),
            restarts: s.restarts,
            renditions: s
                .videos
                .iter()
                .enumerate()
                .map(|(k, v)| RenditionInfo {
                    codec: v.codec,
                    bitrate_kbps: s.rendition_kbps(k),
                    viewers: s
                        .viewers
                        .iter()
                        .filter(|v| {
                            self.viewers.get(v).is_some_and(|p| usize::from(p.rendition) == k)
                        })
                        .count(),
                })
                .collect(),
        }
    }

    /// The next output to execute, in order.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        if self.outputs.is_empty() {
            // A few viewers' copies at a time: the runtime sends the first viewers' while the
            // core writes the next ones', and a batch's datagrams are never all in memory.
            self.fan_out_step(Some(OUTPUT_CHUNK));
        }
        self.outputs.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) is next needed, and why.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<(Instant, TimerReason)> {
        self.timers.first().map(|(t, k)| {
            let why = match k {
                TimerKey::Viewer(_) => TimerReason::Viewer,
                TimerKey::Stream(_) => TimerReason::Stream,
                TimerKey::Tcp(_) => TimerReason::Tcp,
                TimerKey::Stun => TimerReason::Stun,
                TimerKey::Auth(_) => TimerReason::Auth,
            };
            (*t, why)
        })
    }

    fn tick(&mut self, now: Instant) -> Instant {
        self.now = self.now.max(now);
        self.now
    }

    /// Handles one input from the runtime.
    pub fn handle_input(&mut self, input: Input<'_>, now: Instant) {
        let now = self.tick(now);
        if !matches!(input, Input::Ingest { .. }) {
            // Packets first, as they came: e.g. a viewer that connects now is started from the
            // GOP cache, which must hold them, and must not get them twice.
            self.fan_out_pending();
        }
        match input {
            Input::Datagram { source, destination, contents } => {
                let (source, destination) = (canonical_addr(source), canonical_addr(destination));
                self.on_datagram(source, destination, contents, now)
            }
            Input::Ingest { port, source, contents, arrived } => {
                self.on_ingest(port, source, contents, arrived, now)
            }
            Input::TcpOpened { conn, peer, local } => {
                self.on_tcp_opened(conn, canonical_addr(peer), canonical_addr(local), now)
            }
            Input::TcpData { conn, contents } => self.on_tcp_data(conn, contents, now),
            Input::TcpDropped { conn, frames } => self.on_tcp_dropped(conn, frames),
            Input::TcpClosed { conn } => self.on_tcp_closed(conn),
            Input::IngestBound { stream, ports } => self.on_bound(&stream, ports, now),
            Input::BindFailed { stream, ports, error } => {
                self.on_bind_failed(&stream, ports, &error, now)
            }
            Input::ProcessSpawned { stream, generation, pid } => {
                let Some(s) = self.streams.get_mut(&stream) else { return };
                if let StreamState::Running {
                    process: Process::Spawned { generation: g, .. }, ..
                } = *s.state()
                    && g == generation
                {
                    s.pid = Some(pid);
                    info!(stream = %stream, generation, pid, "process spawned");
                }
            }
            Input::SpawnFailed { stream, generation, error } => {
                let current = self.streams.get(&stream).is_some_and(|s| {
                    matches!(*s.state(), StreamState::Running { process: Process::Spawned { generation: g, .. }, .. } if g == generation)
                });
                if current {
                    self.close_viewers(&stream, CloseReason::StreamRestarting, now);
                    self.failed(&stream, format!("could not start the process: {error}"), now);
                }
            }
            Input::ProcessExited { stream, generation, code } => {
                self.on_process_exit(&stream, generation, code, now)
            }
        }
    }

    /// Applies what the leader shard emitted as [`Output::Mirror`] (see [`crate::shard`]).
    /// Only follower shards call this; it is ignored on a core that is not one.
    pub fn mirror(&mut self, mirror: Mirror, now: Instant) {
        let now = self.tick(now);
        if !matches!(mirror, Mirror::Packet(_)) {
            self.fan_out_pending();
        }
        if self.shard.as_ref().is_none_or(|m| m.is_leader()) {
            return;
        }
        match mirror {
            Mirror::Add { stream, config } => {
                let config = StreamConfig { feed: Feed::Mirror, ..config };
                if let Err(e) = self.add_stream(stream.clone(), config) {
                    warn!(%stream, error = %e, "mirrored stream not added");
                }
            }
            Mirror::Accepting { stream, accepting: true } => {
                let _ = self.start_stream(&stream, now);
            }
            Mirror::Accepting { stream, accepting: false } => {
                let _ = self.stop_stream(&stream, now);
            }
            Mirror::CloseViewers { stream, reason } => self.close_viewers(&stream, reason, now),
            Mirror::NewRun { stream } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    for v in &mut s.videos {
                        v.gop.clear();
                    }
                }
            }
            Mirror::Remove { stream } => {
                let _ = self.remove_stream(&stream, now);
            }
            Mirror::Packet(shared) => {
                // Not counted in `ingest_packets`: the leader counted the datagram.
                if self
                    .streams
                    .get(&shared.stream)
                    .is_some_and(|s| *s.state() == StreamState::Mirrored)
                {
                    self.defer(shared.stream, shared.packet, now);
                }
            }
        }
    }

    /// Handles every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let now = self.tick(now);
        self.fan_out_pending();
        while let Some((t, key)) = self.timers.first().cloned() {
            if t > now {
                break;
            }
            self.timers.remove(&(t, key.clone()));
            match key {
                TimerKey::Viewer(s) => {
                    if let Some(p) = self.viewers.get_mut(&s) {
                        p.scheduled = None;
                    }
                    self.viewer_timeout(s, now);
                }
                TimerKey::Stream(id) => {
                    if let Some(st) = self.streams.get_mut(&id) {
                        st.scheduled = None;
                    }
                    self.stream_timeout(&id, now);
                }
                TimerKey::Tcp(conn) => self.tcp_timeout(conn, now),
                TimerKey::Stun => self.stun_timeout(now),
                TimerKey::Auth(id) => self.auth_timeout(id, now),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_is_send() {
        fn is_send<T: Send>() {}
        is_send::<Core>();
    }
}
