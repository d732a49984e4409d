//! The core state machine: streams, peers, timers and the WHEP request handler.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::change::SdpOffer;
use str0m::config::{CryptoProvider, DtlsCert};
use str0m::media::{MediaKind, Mid, Pt};
use str0m::net::{DatagramRecv, Protocol, Receive};
use str0m::rtp::{Extension, ExtensionMap};
use str0m::{Candidate, IceCreds, Input as RtcInput, Rtc};
use tracing::{debug, info, warn};

use crate::config::{Config, Feed, StreamConfig};
use crate::ffmpeg;
use crate::ids::{Rng, SessionId, SessionMap, StreamId};
use crate::metrics::Metrics;
use crate::peer::{Peer, PeerNews, PeerState, Resend, SourcePacket, Track};
use crate::ports::{PortPair, PortPool};
use crate::ratelimit::{Kind, Limiter, Unconnected};
use crate::resend::ResendBudget;
use crate::rtp::{self, Datagram};
use crate::sdp;
use crate::sdpfrag::{self, SdpFrag};
use crate::shard::{Mirror, SharedPacket};
use crate::stream::{Process, Stream, StreamState};
use crate::whep::{
    self, ALLOW_HEADERS, ALLOW_METHODS, CONTENT_TYPE_SDP, CONTENT_TYPE_SDPFRAG, EXPOSE_HEADERS,
    Method, Reject, Route, StatusCode, WhepRequest, WhepResponse,
};
use crate::{CloseReason, Event, Input, Output, StreamError, StreamInfo, TimerReason};

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
    Peer(SessionId),
    Stream(StreamId),
}

/// The sans-IO WHEP egress core. See the [crate documentation](crate) for the run loop.
///
/// # Calling contract
///
/// - **Inputs**: [`handle_http`](Self::handle_http) (answers at once),
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
    config: Config,
    rng: Rng,
    crypto: Arc<CryptoProvider>,
    cert: Option<DtlsCert>,
    streams: BTreeMap<StreamId, Stream>,
    peers: SessionMap<Box<Peer>>,
    by_addr: HashMap<SocketAddr, SessionId>,
    by_ufrag: HashMap<String, SessionId>,
    ingest: HashMap<u16, (StreamId, MediaKind)>,
    ports: PortPool,
    timers: BTreeSet<(Instant, TimerKey)>,
    outputs: VecDeque<Output>,
    metrics: Metrics,
    limiter: Limiter,
    /// Sessions not connected yet per client address (a sharded server counts them in its
    /// [`ShardSet`](crate::shard::ShardSet) instead).
    unconnected: Unconnected,
    /// This core leads a sharded server: it mirrors streams and packets to the others.
    mirrors: bool,
    /// The load (the runtime's samples, smoothed), and whether admission is closed because of it.
    load: f64,
    overloaded: bool,
    next_generation: u64,
    now: Instant,
    /// Ingest packets parsed but not yet written to viewers, with their arrival times: written
    /// viewer by viewer when outputs are next taken or any other input comes
    /// ([`Core::fan_out_pending`]).
    pending: Vec<(StreamId, SourcePacket, Instant)>,
    /// The batch being written, viewer by viewer, as outputs are taken.
    fanning: Option<Fanning>,
    /// Reused buffers, so the packet path does not allocate for bookkeeping.
    news: Vec<PeerNews>,
    scratch: Vec<SessionId>,
}

impl Core {
    /// Creates a core. `now` is the earliest instant it will see.
    pub fn new(config: Config, now: Instant) -> Self {
        let crypto = crate::dtls::provider();
        let cert = crypto.dtls_provider.generate_certificate();
        let mirrors = config.shard.as_ref().is_some_and(|m| m.is_leader() && m.set.count() > 1);
        Self {
            rng: Rng::new(config.rng_seed),
            ports: PortPool::with_stride(config.ingest_ports.clone(), PortPool::STREAM_BLOCK),
            limiter: Limiter::new(config.rate_limits, now),
            unconnected: Unconnected::default(),
            config,
            crypto,
            cert,
            streams: BTreeMap::new(),
            peers: SessionMap::default(),
            by_addr: HashMap::new(),
            by_ufrag: HashMap::new(),
            ingest: HashMap::new(),
            timers: BTreeSet::new(),
            outputs: VecDeque::new(),
            metrics: Metrics::default(),
            mirrors,
            load: 0.0,
            overloaded: false,
            next_generation: 1,
            now,
            pending: Vec::new(),
            fanning: None,
            news: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
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
    /// [`Config::max_load`] or more, new viewers are refused with 503 ([`Reject::Overloaded`])
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

    /// Whether new viewers are being refused because of load (see [`set_load`](Self::set_load)).
    pub fn is_overloaded(&self) -> bool {
        self.overloaded
    }

    /// Number of viewers (WHEP sessions) in total.
    pub fn viewer_count(&self) -> usize {
        self.peers.len()
    }

    /// Video packets held back for viewers being primed at a paced rate, in total (each
    /// viewer's share is bounded by [`PrimePacing::max_pending`](crate::PrimePacing)).
    pub fn prime_backlog(&self) -> usize {
        self.peers.values().map(|p| p.video.backlog()).sum()
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
            state: s.state_name(),
            enabled: s.config.egress.enabled,
            supervised: s.supervised(),
            ports: s.ports(),
            pid: s.pid,
            viewers: s.viewers.len(),
            connected_viewers: s
                .viewers
                .iter()
                .filter(|v| self.peers.get(v).is_some_and(|p| p.state == PeerState::Connected))
                .count(),
            restarts: s.restarts,
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
                TimerKey::Peer(_) => TimerReason::Peer,
                TimerKey::Stream(_) => TimerReason::Stream,
            };
            (*t, why)
        })
    }

    fn tick(&mut self, now: Instant) -> Instant {
        self.now = self.now.max(now);
        self.now
    }

    // ---------------------------------------------------------------------------------------
    // Streams
    // ---------------------------------------------------------------------------------------

    /// Registers a stream. It stays stopped until [`start_stream`](Self::start_stream).
    pub fn add_stream(&mut self, id: StreamId, config: StreamConfig) -> Result<(), StreamError> {
        self.fan_out_pending();
        if self.streams.contains_key(&id) {
            return Err(StreamError::Exists);
        }
        config.egress.validate().map_err(StreamError::InvalidConfig)?;
        info!(stream = %id, "stream added");
        if self.mirrors {
            let add = Mirror::Add { stream: id.clone(), config: config.clone() };
            self.outputs.push_back(Output::Mirror(add));
        }
        self.streams.insert(id.clone(), Stream::new(id, config));
        Ok(())
    }

    /// Starts a stream: allocates an adjacent port pair and asks the runtime to bind it
    /// ([`Output::BindIngest`]). Once bound, [`Event::StreamReady`] carries the FFmpeg output
    /// arguments and, for a supervised stream, [`Output::SpawnProcess`] follows.
    pub fn start_stream(&mut self, id: &StreamId, now: Instant) -> Result<(), StreamError> {
        self.fan_out_pending();
        let now = self.tick(now);
        let stream = self.streams.get(id).ok_or(StreamError::NotFound)?;
        if !stream.config.egress.enabled {
            return Err(StreamError::Disabled);
        }
        match stream.state {
            StreamState::Stopped => {}
            StreamState::Backoff { .. } => {}
            _ => return Err(StreamError::AlreadyStarted),
        }
        if stream.config.feed == Feed::Mirror {
            if let Some(s) = self.streams.get_mut(id) {
                s.state = StreamState::Mirrored;
                s.last_rtp = None;
            }
            return Ok(());
        }
        if self.mirrors {
            self.outputs.push_back(Output::Mirror(Mirror::Start { stream: id.clone() }));
        }
        let ports = self.ports.allocate(now).ok_or(StreamError::NoPorts)?;
        // A start by the application is a fresh start: earlier crashes do not lengthen the
        // backoff of the next one.
        if let Some(s) = self.streams.get_mut(id) {
            s.failures = 0;
        }
        self.bind(id, ports, 1, now);
        Ok(())
    }

    fn bind(&mut self, id: &StreamId, ports: PortPair, attempt: u32, now: Instant) {
        if let Some(s) = self.streams.get_mut(id) {
            s.state = StreamState::Binding { ports, attempt };
            s.video = Default::default();
            s.audio = Default::default();
            s.last_rtp = None;
        }
        debug!(stream = %id, %ports, attempt, "binding ingest ports");
        self.outputs.push_back(Output::BindIngest { stream: id.clone(), ports });
        self.reschedule_stream(id, now);
    }

    /// Stops a stream: closes every viewer first, then stops its FFmpeg (if supervised) and
    /// releases its ports once the process has exited (the seed's teardown order).
    pub fn stop_stream(&mut self, id: &StreamId, now: Instant) -> Result<(), StreamError> {
        self.fan_out_pending();
        let now = self.tick(now);
        if !self.streams.contains_key(id) {
            return Err(StreamError::NotFound);
        }
        self.teardown(id, false, CloseReason::StreamStopped, now);
        Ok(())
    }

    /// Stops a stream as [`stop_stream`](Self::stop_stream) does and forgets it once stopped.
    pub fn remove_stream(&mut self, id: &StreamId, now: Instant) -> Result<(), StreamError> {
        self.fan_out_pending();
        let now = self.tick(now);
        if !self.streams.contains_key(id) {
            return Err(StreamError::NotFound);
        }
        self.teardown(id, true, CloseReason::StreamStopped, now);
        Ok(())
    }

    /// Closes every viewer and stops every stream, for a clean exit. Keep driving the core
    /// until [`Core::is_idle`] to let supervised processes exit and ports be released.
    pub fn shutdown(&mut self, now: Instant) {
        let now = self.tick(now);
        self.fan_out_pending();
        let ids: Vec<StreamId> = self.streams.keys().cloned().collect();
        for id in ids {
            self.teardown(&id, false, CloseReason::Shutdown, now);
        }
        let rest: Vec<SessionId> = self.peers.keys().copied().collect();
        for s in rest {
            self.remove_peer(s, CloseReason::Shutdown, now);
        }
    }

    /// True when no viewer, port or process is held.
    pub fn is_idle(&self) -> bool {
        self.peers.is_empty()
            && self.ports.in_use() == 0
            && self.streams.values().all(|s| matches!(s.state, StreamState::Stopped))
    }

    fn teardown(&mut self, id: &StreamId, remove: bool, why: CloseReason, now: Instant) {
        self.close_viewers(id, why, now);
        let Some(stream) = self.streams.get_mut(id) else {
            return;
        };
        let state = std::mem::replace(&mut stream.state, StreamState::Stopped);
        match state {
            StreamState::Running { ports, process: Process::Spawned { generation, .. } }
            | StreamState::Running { ports, process: Process::Terminating { generation, .. } } => {
                stream.state = StreamState::Stopping {
                    ports,
                    generation,
                    kill_at: Some(now + self.config.process.stop_grace),
                    remove,
                };
                info!(stream = %id, generation, "stopping process");
                self.outputs.push_back(Output::StopProcess { stream: id.clone(), generation });
            }
            StreamState::Stopping { ports, generation, kill_at, remove: r } => {
                stream.state =
                    StreamState::Stopping { ports, generation, kill_at, remove: r || remove };
            }
            StreamState::Running { ports, process: Process::External }
            | StreamState::Binding { ports, .. } => {
                self.release(id, ports);
                self.stopped(id, remove);
            }
            StreamState::Backoff { .. } | StreamState::Stopped | StreamState::Mirrored => {
                self.stopped(id, remove)
            }
        }
        self.reschedule_stream(id, now);
    }

    fn close_viewers(&mut self, id: &StreamId, why: CloseReason, now: Instant) {
        let viewers: Vec<SessionId> =
            self.streams.get(id).map(|s| s.viewers.iter().copied().collect()).unwrap_or_default();
        for v in viewers {
            self.remove_peer(v, why, now);
        }
    }

    fn release(&mut self, id: &StreamId, ports: PortPair) {
        self.ingest.remove(&ports.video);
        self.ingest.remove(&ports.audio());
        if self.ports.release(ports) {
            self.outputs.push_back(Output::ReleaseIngest { stream: id.clone(), ports });
        }
    }

    fn stopped(&mut self, id: &StreamId, remove: bool) {
        if let Some(s) = self.streams.get_mut(id) {
            s.state = StreamState::Stopped;
            s.pid = None;
        }
        self.outputs.push_back(Output::Event(Event::StreamStopped { stream: id.clone() }));
        if self.mirrors {
            let m = if remove {
                Mirror::Remove { stream: id.clone() }
            } else {
                Mirror::Stop { stream: id.clone() }
            };
            self.outputs.push_back(Output::Mirror(m));
        }
        if remove {
            if let Some(t) = self.streams.remove(id).and_then(|s| s.scheduled) {
                self.timers.remove(&(t, TimerKey::Stream(id.clone())));
            }
            info!(stream = %id, "stream removed");
        } else {
            info!(stream = %id, "stream stopped");
        }
    }

    fn on_bound(&mut self, id: &StreamId, ports: PortPair, now: Instant) {
        let Some(stream) = self.streams.get_mut(id) else {
            return;
        };
        if !matches!(stream.state, StreamState::Binding { ports: p, .. } if p == ports) {
            return;
        }
        self.ingest.insert(ports.video, (id.clone(), MediaKind::Video));
        self.ingest.insert(ports.audio(), (id.clone(), MediaKind::Audio));
        let egress = &stream.config.egress;
        let (process, args) = match &stream.config.feed {
            Feed::External => (Process::External, ffmpeg::build_args(egress, ports.video)),
            Feed::Mirror => return, // never binds
            Feed::Supervised { input_args } => {
                let generation = self.next_generation;
                self.next_generation += 1;
                (
                    Process::Spawned { generation, since: now },
                    ffmpeg::command_line(input_args, egress, ports.video),
                )
            }
        };
        stream.state = StreamState::Running { ports, process: process.clone() };
        info!(stream = %id, %ports, "stream ready");
        self.outputs.push_back(Output::Event(Event::StreamReady {
            stream: id.clone(),
            ports,
            args: args.clone(),
        }));
        if let Process::Spawned { generation, .. } = process {
            self.outputs.push_back(Output::SpawnProcess {
                stream: id.clone(),
                generation,
                program: self.config.process.program.clone(),
                args,
            });
        }
        self.reschedule_stream(id, now);
    }

    fn on_bind_failed(&mut self, id: &StreamId, ports: PortPair, error: &str, now: Instant) {
        let Some(stream) = self.streams.get(id) else {
            return;
        };
        let StreamState::Binding { ports: p, attempt } = stream.state else {
            return;
        };
        if p != ports {
            return;
        }
        warn!(stream = %id, %ports, error, "ingest bind failed");
        self.ports.quarantine(ports, now + self.config.bind_quarantine);
        let next = (attempt < MAX_BIND_ATTEMPTS).then(|| self.ports.allocate(now)).flatten();
        match next {
            Some(ports) => self.bind(id, ports, attempt + 1, now),
            None => self.failed(id, format!("no bindable ingest port pair ({error})"), now),
        }
    }

    /// The stream could not get going: supervised streams retry after a backoff, external
    /// ones stop.
    fn failed(&mut self, id: &StreamId, reason: String, now: Instant) {
        let p = self.config.process.clone();
        let Some(stream) = self.streams.get_mut(id) else {
            return;
        };
        if let Some(ports) = stream.ports() {
            stream.state = StreamState::Stopped;
            self.release(id, ports);
        }
        let Some(stream) = self.streams.get_mut(id) else {
            return;
        };
        let retry_in = stream.supervised().then(|| stream.backoff(None, &p));
        stream.pid = None;
        stream.state = match retry_in {
            Some(d) => StreamState::Backoff { until: now + d },
            None => StreamState::Stopped,
        };
        if retry_in.is_none() {
            // A stopped stream holds no viewers, as after `stop_stream`: those that joined
            // while it was binding would otherwise stay attached to it, without media.
            self.close_viewers(id, CloseReason::StreamStopped, now);
        }
        warn!(stream = %id, reason, ?retry_in, "stream failed");
        self.outputs.push_back(Output::Event(Event::StreamFailed {
            stream: id.clone(),
            reason,
            retry_in,
        }));
        self.reschedule_stream(id, now);
    }

    fn on_process_exit(&mut self, id: &StreamId, generation: u64, code: Option<i32>, now: Instant) {
        let p = self.config.process.clone();
        let Some(stream) = self.streams.get_mut(id) else {
            return;
        };
        match stream.state.clone() {
            StreamState::Stopping { ports, generation: g, remove, .. } if g == generation => {
                info!(stream = %id, generation, ?code, "process exited");
                self.release(id, ports);
                self.stopped(id, remove);
                self.reschedule_stream(id, now);
            }
            StreamState::Running { ports, process } => {
                let (g, ran) = match process {
                    Process::Spawned { generation: g, since } => (g, Some(now - since)),
                    Process::Terminating { generation: g, .. } => (g, None),
                    Process::External => return,
                };
                if g != generation {
                    return;
                }
                let delay = stream.backoff(ran, &p);
                stream.restarts += 1;
                stream.pid = None;
                self.metrics.process_restarts += 1;
                warn!(stream = %id, generation, ?code, ?delay, "process exited; restarting");
                self.outputs.push_back(Output::Event(Event::ProcessExited {
                    stream: id.clone(),
                    code,
                    restart_in: Some(delay),
                }));
                self.close_viewers(id, CloseReason::StreamRestarting, now);
                if let Some(s) = self.streams.get_mut(id) {
                    s.state = StreamState::Backoff { until: now + delay };
                }
                self.release(id, ports);
                self.reschedule_stream(id, now);
            }
            _ => {}
        }
    }

    fn stream_timeout(&mut self, id: &StreamId, now: Instant) {
        let p = self.config.process.clone();
        let Some(stream) = self.streams.get_mut(id) else {
            return;
        };
        match stream.state.clone() {
            StreamState::Backoff { until } if until <= now => match self.ports.allocate(now) {
                Some(ports) => self.bind(id, ports, 1, now),
                None => {
                    let d = stream.backoff(None, &p);
                    stream.state = StreamState::Backoff { until: now + d };
                    warn!(stream = %id, "no free ingest ports; retrying later");
                }
            },
            StreamState::Stopping { kill_at: Some(k), generation, ports, remove } if k <= now => {
                stream.state = StreamState::Stopping { ports, generation, kill_at: None, remove };
                warn!(stream = %id, generation, "process did not stop in time; killing");
                self.outputs.push_back(Output::KillProcess { stream: id.clone(), generation });
            }
            StreamState::Running {
                ports,
                process: Process::Terminating { generation, kill_at: Some(k) },
            } if k <= now => {
                stream.state = StreamState::Running {
                    ports,
                    process: Process::Terminating { generation, kill_at: None },
                };
                self.outputs.push_back(Output::KillProcess { stream: id.clone(), generation });
            }
            StreamState::Running { ports, process: Process::Spawned { generation, .. } }
                if stream.deadline(&p).is_some_and(|d| d <= now) =>
            {
                warn!(stream = %id, generation, "no RTP from the process; restarting it");
                stream.state = StreamState::Running {
                    ports,
                    process: Process::Terminating { generation, kill_at: Some(now + p.stop_grace) },
                };
                self.outputs.push_back(Output::Event(Event::StreamStale { stream: id.clone() }));
                self.outputs.push_back(Output::StopProcess { stream: id.clone(), generation });
            }
            _ => {}
        }
        self.reschedule_stream(id, now);
    }

    // ---------------------------------------------------------------------------------------
    // Inputs
    // ---------------------------------------------------------------------------------------

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
                self.on_datagram(source, destination, contents, now)
            }
            Input::Ingest { port, source, contents, arrived } => {
                self.on_ingest(port, source, contents, arrived, now)
            }
            Input::IngestBound { stream, ports } => self.on_bound(&stream, ports, now),
            Input::BindFailed { stream, ports, error } => {
                self.on_bind_failed(&stream, ports, &error, now)
            }
            Input::ProcessSpawned { stream, generation, pid } => {
                let Some(s) = self.streams.get_mut(&stream) else { return };
                if let StreamState::Running {
                    process: Process::Spawned { generation: g, .. }, ..
                } = s.state
                    && g == generation
                {
                    s.pid = Some(pid);
                    info!(stream = %stream, generation, pid, "process spawned");
                }
            }
            Input::SpawnFailed { stream, generation, error } => {
                let current = self.streams.get(&stream).is_some_and(|s| {
                    matches!(s.state, StreamState::Running { process: Process::Spawned { generation: g, .. }, .. } if g == generation)
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
        if self.config.shard.as_ref().is_none_or(|m| m.is_leader()) {
            return;
        }
        match mirror {
            Mirror::Add { stream, config } => {
                let config = StreamConfig { feed: Feed::Mirror, ..config };
                if let Err(e) = self.add_stream(stream.clone(), config) {
                    warn!(%stream, error = %e, "mirrored stream not added");
                }
            }
            Mirror::Start { stream } => {
                let _ = self.start_stream(&stream, now);
            }
            Mirror::Stop { stream } => {
                let _ = self.stop_stream(&stream, now);
            }
            Mirror::Remove { stream } => {
                let _ = self.remove_stream(&stream, now);
            }
            Mirror::Packet(shared) => {
                // Not counted in `ingest_packets`: the leader counted the datagram.
                if self
                    .streams
                    .get(&shared.stream)
                    .is_some_and(|s| s.state == StreamState::Mirrored)
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
                TimerKey::Peer(s) => {
                    if let Some(p) = self.peers.get_mut(&s) {
                        p.scheduled = None;
                    }
                    self.peer_timeout(s, now);
                }
                TimerKey::Stream(id) => {
                    if let Some(st) = self.streams.get_mut(&id) {
                        st.scheduled = None;
                    }
                    self.stream_timeout(&id, now);
                }
            }
        }
    }

    fn peer_timeout(&mut self, s: SessionId, now: Instant) {
        let grace = self.config.disconnect_grace;
        let inactivity = self.config.inactivity_timeout;
        let Some(peer) = self.peers.get_mut(&s) else {
            return;
        };
        let mut news = std::mem::take(&mut self.news);
        peer.timeout(now, grace, &mut self.outputs, &mut news);
        let sent = peer.pace(now, grace, &mut self.outputs, &mut news);
        self.metrics.packets_forwarded += sent.packets;
        self.metrics.bytes_forwarded += sent.bytes;
        let reason = match peer.state {
            _ if peer.dead => Some(CloseReason::RemoteClosed),
            PeerState::Connecting { deadline } if deadline <= now => {
                if !peer.checked {
                    self.metrics.unchecked_sessions += 1;
                    debug!(session = %s, "no ICE check arrived; closing the session");
                }
                Some(CloseReason::ConnectTimeout)
            }
            PeerState::Disconnected { deadline } if deadline <= now => {
                Some(CloseReason::IceDisconnected)
            }
            PeerState::Connected if peer.last_rx + inactivity <= now => Some(CloseReason::Inactive),
            _ => None,
        };
        self.apply_news(s, &mut news, now);
        self.news = news;
        match reason {
            Some(r) => self.remove_peer(s, r, now),
            None => self.reschedule_peer(s, now),
        }
    }

    fn apply_news(&mut self, s: SessionId, news: &mut Vec<PeerNews>, now: Instant) {
        for n in news.drain(..) {
            let Some(peer) = self.peers.get(&s) else {
                continue;
            };
            let stream = peer.stream.clone();
            match n {
                PeerNews::Connected => {
                    info!(session = %s, %stream, "viewer connected");
                    self.release_unconnected(s);
                    self.metrics.viewers_connected += 1;
                    self.outputs.push_back(Output::Event(Event::ViewerConnected {
                        stream: stream.clone(),
                        session: s,
                    }));
                    self.prime(s, &stream, now);
                }
                PeerNews::KeyframeRequest => {
                    self.metrics.keyframe_requests += 1;
                    self.outputs
                        .push_back(Output::Event(Event::KeyframeRequested { stream, session: s }));
                }
                PeerNews::BacklogDropped => {
                    self.metrics.prime_backlogs_dropped += 1;
                    warn!(session = %s, %stream, "viewer fell behind the paced GOP; video restarts at the next keyframe");
                }
                PeerNews::Resent { packets, bytes, dropped } => {
                    self.metrics.packets_retransmitted += packets;
                    self.metrics.bytes_retransmitted += bytes;
                    self.metrics.retransmissions_dropped += dropped;
                }
                PeerNews::ResendsSuspended => {
                    self.metrics.retransmission_suspensions += 1;
                    debug!(session = %s, %stream, "viewer's retransmissions over its share: off for a second");
                }
            }
        }
    }

    /// Starts a viewer that just connected with the stream's cached GOP, so that its first
    /// picture does not wait for FFmpeg's next keyframe: the keyframe at once, the rest paced
    /// by [`Config::prime_pacing`] from the peer's timer ([`Peer::pace`]).
    fn prime(&mut self, s: SessionId, stream: &StreamId, now: Instant) {
        let grace = self.config.disconnect_grace;
        let (Some(st), Some(peer)) = (self.streams.get(stream), self.peers.get_mut(&s)) else {
            return;
        };
        // Only a cache of the source that is sending now: after a stop or an FFmpeg exit the
        // cache may still hold the previous run's GOP until the new source's first packet
        // clears it.
        let live = matches!(st.state, StreamState::Running { .. } | StreamState::Mirrored)
            && st
                .last_rtp
                .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1));
        if st.gop.packets.is_empty() || !live {
            return;
        }
        // News from these writes (a DTLS close, say) is picked up by the caller's next drain.
        let mut news = Vec::new();
        let pacing = self.config.prime_pacing.as_ref();
        let Some(sent) =
            peer.prime(st.gop.primed(), pacing, now, grace, &mut self.outputs, &mut news)
        else {
            debug!(session = %s, %stream, cached = st.gop.packets.len(), "cached GOP not used");
            return;
        };
        self.metrics.packets_forwarded += sent.packets;
        self.metrics.bytes_forwarded += sent.bytes;
        self.metrics.gop_primes += 1;
        debug!(
            session = %s, %stream, packets = sent.packets, held = peer.video.backlog(),
            "viewer primed with the cached GOP"
        );
        // The caller reschedules the peer, now with the backlog's next release.
    }

    fn on_datagram(
        &mut self,
        source: SocketAddr,
        destination: SocketAddr,
        contents: &[u8],
        now: Instant,
    ) {
        self.metrics.datagrams_in += 1;
        let Ok(recv) = DatagramRecv::try_from(contents) else {
            self.metrics.datagrams_dropped += 1;
            return;
        };
        let input = RtcInput::Receive(
            now,
            Receive { proto: Protocol::Udp, source, destination, contents: recv },
        );
        let known = self.by_addr.get(&source).copied();
        // A STUN request names its session by ufrag, whatever the address: a new viewer may
        // come from the address of one that vanished and is not reaped yet (a port the OS or
        // a TURN relay handed out again). The address then belongs to the new session.
        let by_ufrag = stun_local_ufrag(contents)
            .and_then(|ufrag| self.by_ufrag.get(ufrag).copied())
            .filter(|s| self.peers.get(s).is_some_and(|p| p.rtc.accepts(&input)));
        let Some(session) = by_ufrag.or(known) else {
            self.metrics.datagrams_dropped += 1;
            return;
        };
        let grace = self.config.disconnect_grace;
        let Some(peer) = self.peers.get_mut(&session) else {
            return;
        };
        if known != Some(session) {
            if !peer.addrs.contains(&source) {
                if peer.addrs.len() >= self.config.max_viewer_addresses {
                    // Each address would be a demultiplexing entry here and a candidate in
                    // str0m: a viewer with its credentials could spoof thousands.
                    self.metrics.addresses_refused += 1;
                    self.metrics.datagrams_dropped += 1;
                    return;
                }
                peer.addrs.push(source);
            }
            self.by_addr.insert(source, session);
            if !peer.checked {
                // The first check: the viewer is reachable, so it gets the whole connect
                // timeout for the rest (DTLS) instead of the first check's.
                peer.checked = true;
                if let PeerState::Connecting { deadline } = &mut peer.state {
                    *deadline = peer.joined + self.config.connect_timeout;
                }
            }
        }
        peer.last_rx = now;
        let mut news = std::mem::take(&mut self.news);
        if let Err(e) = peer.rtc.handle_input(input) {
            debug!(%session, error = %e, "datagram rejected");
        }
        peer.drain(now, grace, &mut self.outputs, &mut news);
        let dead = peer.dead;
        self.apply_news(session, &mut news, now);
        self.news = news;
        if dead {
            self.remove_peer(session, CloseReason::RemoteClosed, now);
        } else {
            self.reschedule_peer(session, now);
        }
    }

    fn on_ingest(
        &mut self,
        port: u16,
        from: SocketAddr,
        contents: &[u8],
        arrived: Option<Instant>,
        now: Instant,
    ) {
        self.metrics.ingest_packets += 1;
        let Some((id, kind)) = self.ingest.get(&port) else {
            self.metrics.ingest_dropped += 1;
            return;
        };
        let kind = *kind;
        let Some(stream) = self.streams.get_mut(id) else {
            return;
        };
        let ports = stream.ports();
        let expected = match (stream.supervised(), ports, kind) {
            (false, _, _) => None,
            (true, Some(p), MediaKind::Video) => Some(p.video_source()),
            (true, Some(p), MediaKind::Audio) => Some(p.audio_source()),
            (true, None, _) => Some(0),
        };
        let source = match kind {
            MediaKind::Video => &mut stream.video,
            MediaKind::Audio => &mut stream.audio,
        };
        if !source.admits(from, expected, now) {
            // Not the stream's own FFmpeg: another local process must not reach the viewers.
            self.metrics.ingest_rejected += 1;
            return;
        }
        let p = match rtp::parse(contents) {
            Ok(Datagram::Rtp(p)) => p,
            Ok(Datagram::Rtcp) => {
                self.metrics.ingest_rtcp += 1;
                return;
            }
            Err(_) => {
                self.metrics.ingest_dropped += 1;
                return;
            }
        };
        if p.payload.len() > rtp::MAX_PAYLOAD {
            // Not from our FFmpeg legs, and more than str0m can packetize (it would panic).
            self.metrics.ingest_dropped += 1;
            return;
        }
        let source = match kind {
            MediaKind::Video => &mut stream.video,
            MediaKind::Audio => &mut stream.audio,
        };
        let ext = source.seq.extend(p.ssrc, p.sequence);
        let keyframe_start =
            kind == MediaKind::Video && rtp::classify_h264(p.payload).is_keyframe_start();
        let pkt = SourcePacket {
            kind,
            seq: ext.seq,
            restart: ext.restart,
            timestamp: p.timestamp,
            marker: p.marker,
            keyframe_start,
            payload: Arc::from(p.payload),
        };
        let id = id.clone();
        if self.mirrors {
            // First, so that the other shards start on it while this one forwards.
            let read_at = arrived.map_or(now, |a| a.min(now));
            let shared = SharedPacket { stream: id.clone(), packet: pkt.clone(), read_at };
            self.outputs.push_back(Output::Mirror(Mirror::Packet(shared)));
        }
        self.defer(id, pkt, now);
    }

    /// Queues a packet for [`fan_out_pending`](Self::fan_out_pending).
    fn defer(&mut self, id: StreamId, pkt: SourcePacket, now: Instant) {
        self.pending.push((id, pkt, now));
        if self.pending.len() >= MAX_PENDING {
            self.fan_out_pending();
        }
    }

    /// Writes the pending ingest packets to the viewers, all of them, before another input is
    /// handled (see [`fan_out_step`](Self::fan_out_step)).
    fn fan_out_pending(&mut self) {
        self.fan_out_step(None);
    }

    /// Writes the pending ingest packets to the viewers, stream by stream and viewer by
    /// viewer: each viewer gets all of its stream's packets and one str0m drain before the next
    /// viewer is touched. A viewer's state (str0m's `Rtc` and its queues, ~100 KiB) thus comes
    /// into the cache once per batch of packets, not once per packet: with hundreds of viewers
    /// it does not stay cached between two packets. With a `budget`, stops once that many
    /// outputs are queued and resumes at the next call.
    fn fan_out_step(&mut self, budget: Option<usize>) {
        let (now, grace) = (self.now, self.config.disconnect_grace);
        let mut news = std::mem::take(&mut self.news);
        while let Some(mut f) = self.fanning.take().or_else(|| self.start_fanning()) {
            if f.next >= f.viewers.len() && !self.next_stream(&mut f) {
                // Done: keep the buffers for the next batch.
                f.packets.clear();
                if self.pending.is_empty() {
                    std::mem::swap(&mut self.pending, &mut f.packets);
                }
                self.scratch = std::mem::take(&mut f.viewers);
                continue;
            }
            let next = f.viewers.get(f.next).copied();
            f.next += 1;
            if let Some(s) = next
                && let Some(peer) = self.peers.get_mut(&s)
            {
                for (_, pkt, at) in &f.packets[f.start..f.end] {
                    if peer.write_media(pkt, *at, grace, &mut self.outputs, &mut news) {
                        self.metrics.packets_forwarded += 1;
                        self.metrics.bytes_forwarded += pkt.payload.len() as u64;
                    }
                }
                peer.flush(now, grace, &mut self.outputs, &mut news);
                let dead = peer.dead;
                self.apply_news(s, &mut news, now);
                if dead {
                    self.remove_peer(s, CloseReason::RemoteClosed, now);
                } else {
                    self.reschedule_peer(s, now);
                }
            }
            self.fanning = Some(f);
            if budget.is_some_and(|b| self.outputs.len() >= b) {
                break;
            }
        }
        self.news = news;
    }

    /// A fan-out of the pending packets, if any.
    fn start_fanning(&mut self) -> Option<Fanning> {
        if self.pending.is_empty() {
            return None;
        }
        let mut packets = std::mem::take(&mut self.pending);
        // Usually one stream (its video and audio); stable, so each stream's order holds.
        packets.sort_by(|a, b| a.0.cmp(&b.0));
        let viewers = std::mem::take(&mut self.scratch);
        Some(Fanning { packets, start: 0, end: 0, viewers, next: 0 })
    }

    /// Moves `f` to its next stream's packets: keeps them in that stream's GOP cache and
    /// lists its viewers. Returns `false` when there are no more.
    fn next_stream(&mut self, f: &mut Fanning) -> bool {
        f.start = f.end;
        let Some((id, _, _)) = f.packets.get(f.start) else {
            return false;
        };
        let id = id.clone();
        f.end = f.start + f.packets[f.start..].iter().take_while(|p| p.0 == id).count();
        f.viewers.clear();
        f.next = 0;
        if let Some(stream) = self.streams.get_mut(&id) {
            for (_, pkt, at) in &f.packets[f.start..f.end] {
                stream.last_rtp = Some(*at);
                if pkt.kind == MediaKind::Video && self.config.gop_cache {
                    stream.gop.push(pkt);
                }
            }
            f.viewers.extend(stream.viewers.iter().copied());
        }
        true
    }

    // ---------------------------------------------------------------------------------------
    // Peers
    // ---------------------------------------------------------------------------------------

    fn remove_peer(&mut self, s: SessionId, reason: CloseReason, now: Instant) {
        self.release_unconnected(s);
        let Some(mut peer) = self.peers.remove(&s) else {
            return;
        };
        peer.close(now, &mut self.outputs);
        if let Some(t) = peer.scheduled {
            self.timers.remove(&(t, TimerKey::Peer(s)));
        }
        for a in &peer.addrs {
            if self.by_addr.get(a) == Some(&s) {
                self.by_addr.remove(a);
            }
        }
        if self.by_ufrag.get(&peer.local_ufrag) == Some(&s) {
            self.by_ufrag.remove(&peer.local_ufrag);
        }
        if let Some(stream) = self.streams.get_mut(&peer.stream) {
            stream.viewers.remove(&s);
        }
        if let Some(m) = &self.config.shard {
            m.set.release_seat(m.index, &peer.stream);
        }
        if matches!(reason, CloseReason::IceDisconnected | CloseReason::ConnectTimeout) {
            self.metrics.ice_failures += 1;
        }
        self.metrics.viewers_left += 1;
        info!(session = %s, stream = %peer.stream, ?reason, "viewer left");
        self.outputs.push_back(Output::Event(Event::ViewerLeft {
            stream: peer.stream,
            session: s,
            reason,
        }));
    }

    /// Stops counting `s` against its client's unconnected sessions (it connected, or goes).
    fn release_unconnected(&mut self, s: SessionId) {
        let Some(client) = self.peers.get_mut(&s).and_then(|p| p.unconnected_client.take()) else {
            return;
        };
        match &self.config.shard {
            Some(m) => m.set.release_unconnected(client),
            None => self.unconnected.release(client),
        }
    }

    fn reschedule_peer(&mut self, s: SessionId, now: Instant) {
        let inactivity = self.config.inactivity_timeout;
        let Some(peer) = self.peers.get_mut(&s) else {
            return;
        };
        // str0m may ask for a timeout at `now` right after a write; the core's own
        // handle_timeout runs it, so never schedule in the past (no busy loop).
        let at = peer.deadline(inactivity).max(now);
        if peer.scheduled == Some(at) {
            return;
        }
        if let Some(old) = peer.scheduled.replace(at) {
            self.timers.remove(&(old, TimerKey::Peer(s)));
        }
        self.timers.insert((at, TimerKey::Peer(s)));
    }

    fn reschedule_stream(&mut self, id: &StreamId, now: Instant) {
        let p = &self.config.process;
        let Some(stream) = self.streams.get_mut(id) else {
            return;
        };
        let at = stream.deadline(p).map(|t| t.max(now));
        if stream.scheduled == at {
            return;
        }
        if let Some(old) = std::mem::replace(&mut stream.scheduled, at) {
            self.timers.remove(&(old, TimerKey::Stream(id.clone())));
        }
        if let Some(at) = at {
            self.timers.insert((at, TimerKey::Stream(id.clone())));
        }
    }

    // ---------------------------------------------------------------------------------------
    // HTTP
    // ---------------------------------------------------------------------------------------

    /// Answers one WHEP request. Always returns a response; see [`crate::whep`].
    pub fn handle_http(&mut self, req: WhepRequest, now: Instant) -> WhepResponse {
        let now = self.tick(now);
        self.fan_out_pending();
        let route = whep::route(&self.config.whep_prefix, &req.target);
        let label = match (&route, &req.method) {
            (Some(Route::Endpoint(_)), _) => "endpoint",
            (Some(Route::Session(..)), _) => "session",
            (None, _) => "other",
        };
        let preflight = req.is_preflight();
        // Preflights and unknown paths are free; everything else draws on the rate limits
        // before any work (authentication included, so tokens cannot be guessed at speed).
        let limited = match route {
            Some(_) if !preflight => self.admit(&req, now).err(),
            _ => None,
        };
        let result = match route {
            None => Err(Reject::NoRoute),
            Some(_) if preflight => Ok(self.preflight()),
            Some(_) if limited.is_some() => {
                Err(Reject::RateLimited { retry_after: limited.unwrap_or_default() })
            }
            Some(_)
                if !whep::bearer_ok(&self.config.bearer_tokens, req.header("authorization")) =>
            {
                Err(Reject::Unauthorized)
            }
            Some(_) if req.body.len() > self.config.max_body_bytes => Err(Reject::PayloadTooLarge),
            Some(Route::Endpoint(stream)) => self.endpoint(&req, &stream, now),
            Some(Route::Session(stream, session)) => self.session(&req, &stream, session, now),
        };
        let mut resp = match result {
            Ok(r) => r,
            Err(reject) => {
                debug!(method = %req.method, target = %req.target, reason = reject.reason(), "request rejected");
                *self.metrics.rejections.entry(reject.reason()).or_default() += 1;
                reject.into_response(self.config.retry_after_secs)
            }
        };
        resp = resp
            .with("Access-Control-Allow-Origin", self.config.cors_origin.clone())
            .with("Access-Control-Expose-Headers", EXPOSE_HEADERS);
        if self.config.cors_origin != "*" {
            resp = resp.with("Vary", "Origin");
        }
        self.count_request(label, &req.method, resp.code());
        resp
    }

    /// Draws on the rate limits; a POST to an endpoint is a new session, anything else is an
    /// ordinary request.
    fn admit(&mut self, req: &WhepRequest, now: Instant) -> Result<(), Duration> {
        let kind = if req.method == Method::Post { Kind::Post } else { Kind::Other };
        match &self.config.shard {
            Some(m) => m.set.admit(kind, req.client, now),
            None => self.limiter.admit(kind, req.client, now),
        }
    }

    /// Clients the rate limiter tracks (bounded by [`MAX_CLIENTS`](crate::ratelimit::MAX_CLIENTS) per table).
    pub fn rate_limited_clients(&self) -> usize {
        match &self.config.shard {
            Some(m) => m.set.tracked_clients(),
            None => self.limiter.tracked(),
        }
    }

    /// The rate limiter and counters, for the admin API's authentication limit (`app`).
    #[cfg(feature = "app")]
    pub(crate) fn admin_limits(&mut self) -> (&mut Limiter, &mut Metrics) {
        (&mut self.limiter, &mut self.metrics)
    }

    /// Counts one answered HTTP request in [`Metrics::requests`].
    pub(crate) fn count_request(&mut self, route: &'static str, method: &Method, status: u16) {
        *self.metrics.requests.entry((route, method.to_string(), status)).or_default() += 1;
    }

    fn preflight(&self) -> WhepResponse {
        WhepResponse::new(StatusCode::NoContent)
            .with("Access-Control-Allow-Methods", ALLOW_METHODS)
            .with("Access-Control-Allow-Headers", ALLOW_HEADERS)
            .with("Access-Control-Max-Age", "86400")
    }

    fn endpoint(
        &mut self,
        req: &WhepRequest,
        id: &StreamId,
        now: Instant,
    ) -> Result<WhepResponse, Reject> {
        const ALLOW: &str = "GET, HEAD, OPTIONS, POST";
        let live = self.streams.get(id).is_some_and(Stream::accepts_viewers);
        match req.method {
            Method::Post => self.post(req, id, now),
            Method::Options => {
                let mut r = WhepResponse::new(StatusCode::NoContent)
                    .with("Accept-Post", CONTENT_TYPE_SDP)
                    .with("Allow", ALLOW);
                for s in &self.config.ice_servers {
                    r = r.with("Link", s.link_value());
                }
                Ok(r)
            }
            Method::Get if live => Ok(WhepResponse::new(StatusCode::NoContent)),
            Method::Head if live => {
                Ok(WhepResponse::new(StatusCode::Ok).with("Content-Type", CONTENT_TYPE_SDP))
            }
            Method::Get | Method::Head => Err(Reject::StreamNotFound),
            _ => Err(Reject::MethodNotAllowed { allow: ALLOW }),
        }
    }

    fn post(
        &mut self,
        req: &WhepRequest,
        id: &StreamId,
        now: Instant,
    ) -> Result<WhepResponse, Reject> {
        let stream =
            self.streams.get(id).filter(|s| s.accepts_viewers()).ok_or(Reject::StreamNotFound)?;
        if req.media_type().as_deref() != Some(CONTENT_TYPE_SDP) {
            return Err(Reject::UnsupportedMediaType { expected: CONTENT_TYPE_SDP });
        }
        let summary = sdp::check_offer(&req.body)?;
        let cap = stream.config.max_viewers.unwrap_or(self.config.max_viewers_per_stream);
        let total_cap = self.config.max_viewers_total;
        let (here, total) = match &self.config.shard {
            Some(m) => (m.set.stream_viewers(id), m.set.viewers()),
            None => (stream.viewers.len(), self.peers.len()),
        };
        if here >= cap {
            self.metrics.cap_rejections += 1;
            return Err(Reject::StreamFull { cap });
        }
        if total >= total_cap {
            self.metrics.cap_rejections += 1;
            return Err(Reject::ServerFull { cap: total_cap });
        }
        if self.config.host_candidates.is_empty() {
            return Err(Reject::NoCandidates);
        }
        let unconnected_cap = self.config.max_unconnected_per_client;
        let client = req.client.filter(|_| unconnected_cap > 0);
        if let Some(ip) = client {
            let full = match &self.config.shard {
                Some(m) => m.set.unconnected_full(ip, unconnected_cap),
                None => self.unconnected.is_full(ip, unconnected_cap),
            };
            if full {
                return Err(Reject::TooManyUnconnected { cap: unconnected_cap });
            }
        }
        if self.overloaded {
            // Before the expensive part (answer, certificate, SRTP context): a POST refused
            // here costs next to nothing, and the viewers already served keep their share.
            return Err(Reject::Overloaded);
        }
        let profile = stream.config.profile;
        // The policy accepted UTF-8 already.
        let offer_text = String::from_utf8_lossy(&req.body).into_owned();
        let offered_candidates =
            offer_text.lines().filter(|l| l.trim_start().starts_with("a=candidate:")).count();
        if offered_candidates > self.config.max_remote_candidates {
            return Err(Reject::TooManyCandidates { cap: self.config.max_remote_candidates });
        }
        let remote_creds = sdp::ice_credentials(&offer_text)
            .ok_or_else(|| Reject::BadOffer("no a=ice-ufrag / a=ice-pwd".into()))?;

        let local_ufrag = self.unique_ufrag();
        let creds = IceCreds { ufrag: local_ufrag.clone(), pass: self.rng.ice_chars(24) };
        let mut cfg = Rtc::builder()
            .set_ice_lite(true)
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_h264(true)
            .enable_opus(true, false)
            .set_local_ice_credentials(creds)
            .set_crypto_provider(self.crypto.clone())
            .set_extension_map(rtp_extensions())
            .set_send_buffer_video(self.config.rtx_cache_packets)
            .set_send_buffer_audio(64);
        if let Some(cert) = &self.cert {
            cfg = cfg.set_dtls_cert(cert.clone());
        }
        let mut rtc = cfg.build(now);
        for addr in &self.config.host_candidates {
            match Candidate::host(*addr, "udp") {
                Ok(c) => {
                    rtc.add_local_candidate(c);
                }
                Err(e) => warn!(%addr, error = %e, "unusable host candidate"),
            }
        }
        let offer =
            SdpOffer::from_sdp_string(&offer_text).map_err(|e| Reject::BadOffer(e.to_string()))?;
        let answer =
            rtc.sdp_api().accept_offer(offer).map_err(|e| Reject::BadOffer(e.to_string()))?;

        let video_mid = Mid::from(summary.video_mid.as_str());
        let audio_mid = Mid::from(summary.audio_mid.as_str());
        let usable = |rtc: &Rtc, mid: Mid| -> Vec<Pt> {
            rtc.media(mid)
                .filter(|m| !m.disabled())
                .map(|m| m.remote_pts().to_vec())
                .unwrap_or_default()
        };
        let (vpts, apts) = (usable(&rtc, video_mid), usable(&rtc, audio_mid));
        let h264: Vec<_> =
            summary.h264.iter().copied().filter(|h| vpts.contains(&Pt::from(h.pt))).collect();
        let video_pt = sdp::choose_h264(&h264, profile);
        let audio_pt = summary.opus.iter().copied().find(|pt| apts.contains(&Pt::from(*pt)));
        let (Some(video_pt), Some(audio_pt)) = (video_pt, audio_pt) else {
            return Err(Reject::CodecMismatch {
                h264: video_pt.is_none(),
                opus: audio_pt.is_none(),
            });
        };
        let mut api = rtc.direct_api();
        let video_ssrc = api.stream_tx_by_mid(video_mid, None).map(|t| t.ssrc());
        let audio_ssrc = api.stream_tx_by_mid(audio_mid, None).map(|t| t.ssrc());
        let (Some(video_ssrc), Some(audio_ssrc)) = (video_ssrc, audio_ssrc) else {
            return Err(Reject::BadOffer("no send stream for a media section".into()));
        };
        // Bound the retransmission cache by age and count: its packet metadata (about 430 bytes
        // a packet) dominates a viewer's memory, and an old retransmission is useless to a
        // low-latency player.
        // str0m's own ratio cap is off: it keeps an entry per packet sent in the last second;
        // the peer's `ResendBudget` does the same job with a few counters.
        let (packets, age) = (self.config.rtx_cache_packets, self.config.rtx_cache_age);
        let mut resend = None;
        if let Some(tx) = api.stream_tx(&video_ssrc) {
            tx.set_rtx_cache(packets, age, None);
            if let Some(rtx) = tx.rtx() {
                let budget = ResendBudget::new(video_ssrc, rtx, self.config.rtx_ratio_cap, now);
                resend = Some(Box::new(Resend {
                    cache_packets: packets,
                    cache_age: age,
                    prime_packets: self.config.rtx_cache_prime_packets,
                    shrink_at: None,
                    budget,
                }));
            }
        }
        // Audio is written non-nackable, so its cache stays empty; without a ratio cap str0m
        // keeps no per-packet byte history for it either.
        if let Some(tx) = api.stream_tx(&audio_ssrc) {
            tx.set_rtx_cache(0, Duration::ZERO, None);
        }

        // Shards take their seat now, atomically with the check: another shard may have
        // filled the cap since the check above.
        if let Some(m) = &self.config.shard
            && let Err(full) = m.set.take_seat(m.index, id, cap, total_cap)
        {
            self.metrics.cap_rejections += 1;
            return Err(full);
        }
        if let Some(ip) = client {
            let taken = match &self.config.shard {
                Some(m) => m.set.take_unconnected(ip, unconnected_cap),
                None => self.unconnected.take(ip, unconnected_cap),
            };
            if !taken {
                // Another shard's session of this client came in between.
                if let Some(m) = &self.config.shard {
                    m.set.release_seat(m.index, id);
                }
                return Err(Reject::TooManyUnconnected { cap: unconnected_cap });
            }
        }
        let session = self.unique_session();
        let etag = self.rng.etag();
        let (vseq, aseq) = (self.rng.u32() as u16, self.rng.u32() as u16);
        let mut peer = Peer {
            session,
            stream: id.clone(),
            rtc,
            state: PeerState::Connecting {
                deadline: now + self.config.first_check_timeout.min(self.config.connect_timeout),
            },
            video: Track::new(video_mid, Pt::from(video_pt), video_ssrc, true, vseq),
            audio: Track::new(audio_mid, Pt::from(audio_pt), audio_ssrc, false, aseq),
            etag,
            offer: sdp::compact_offer(
                &offer_text,
                &[(&summary.video_mid, &[video_pt]), (&summary.audio_mid, &[audio_pt])],
            ),
            remote_creds,
            local_ufrag: local_ufrag.clone(),
            last_rx: now,
            addrs: Vec::new(),
            joined: now,
            checked: false,
            unconnected_client: client,
            remote_candidates: offered_candidates,
            keyframe_requests: 0,
            rtc_deadline: now,
            scheduled: None,
            dead: false,
            unflushed: 0,
            resend,
        };
        let mut news = std::mem::take(&mut self.news);
        peer.timeout(now, self.config.disconnect_grace, &mut self.outputs, &mut news);
        self.news = news;
        self.peers.insert(session, Box::new(peer));
        self.by_ufrag.insert(local_ufrag, session);
        if let Some(s) = self.streams.get_mut(id) {
            s.viewers.insert(session);
        }
        self.reschedule_peer(session, now);
        self.metrics.viewers_joined += 1;
        info!(%session, stream = %id, video_pt, audio_pt, "viewer joined");
        self.outputs.push_back(Output::Event(Event::ViewerJoined { stream: id.clone(), session }));

        let location = whep::session_location(&self.config.whep_prefix, id, session, &req.target);
        let mut resp = WhepResponse::new(StatusCode::Created)
            .with("Location", location)
            .with("ETag", etag.header_value())
            .with("Accept-Patch", CONTENT_TYPE_SDPFRAG);
        for s in &self.config.ice_servers {
            resp = resp.with("Link", s.link_value());
        }
        Ok(resp.with_body(CONTENT_TYPE_SDP, sdp::finish_answer(&answer.to_sdp_string())))
    }

    fn unique_session(&mut self) -> SessionId {
        loop {
            let shard = self.config.shard.as_ref().map_or(0, |m| m.index);
            let s = self.rng.session_id(shard);
            if !self.peers.contains_key(&s) {
                return s;
            }
        }
    }

    fn unique_ufrag(&mut self) -> String {
        loop {
            let u = self.rng.ice_chars(16);
            if !self.by_ufrag.contains_key(&u) {
                return u;
            }
        }
    }

    fn session(
        &mut self,
        req: &WhepRequest,
        id: &StreamId,
        session: Option<SessionId>,
        now: Instant,
    ) -> Result<WhepResponse, Reject> {
        const ALLOW: &str = "GET, HEAD, OPTIONS, PATCH, DELETE";
        let known = session.filter(|s| self.peers.get(s).is_some_and(|p| &p.stream == id));
        match (req.method, known) {
            (Method::Delete, Some(s)) => {
                self.remove_peer(s, CloseReason::Deleted, now);
                Ok(WhepResponse::new(StatusCode::NoContent))
            }
            // Idempotent, as the seed: deleting what is not there succeeds.
            (Method::Delete, None) => Ok(WhepResponse::new(StatusCode::NoContent)),
            (Method::Patch, Some(s)) => self.patch(req, s, now),
            (Method::Options, _) => Ok(WhepResponse::new(StatusCode::NoContent)
                .with("Accept-Patch", CONTENT_TYPE_SDPFRAG)
                .with("Allow", ALLOW)),
            (Method::Get | Method::Head, Some(_)) => Ok(WhepResponse::new(StatusCode::NoContent)),
            (Method::Patch | Method::Get | Method::Head, None) => Err(Reject::SessionNotFound),
            _ => Err(Reject::MethodNotAllowed { allow: ALLOW }),
        }
    }

    fn patch(
        &mut self,
        req: &WhepRequest,
        s: SessionId,
        now: Instant,
    ) -> Result<WhepResponse, Reject> {
        if req.media_type().as_deref() != Some(CONTENT_TYPE_SDPFRAG) {
            return Err(Reject::UnsupportedMediaType { expected: CONTENT_TYPE_SDPFRAG });
        }
        let Some(peer) = self.peers.get(&s) else {
            return Err(Reject::SessionNotFound);
        };
        if self.config.strict_if_match {
            match req.header("if-match") {
                None => return Err(Reject::PreconditionRequired),
                Some(v) if !peer.etag.matches(v) => return Err(Reject::PreconditionFailed),
                Some(_) => {}
            }
        }
        let frag = SdpFrag::parse(&req.body).map_err(|e| Reject::BadFragment(e.to_string()))?;
        let restart = match (&frag.ice_ufrag, &frag.ice_pwd) {
            (Some(u), Some(p)) => {
                (u.as_str(), p.as_str())
                    != (peer.remote_creds.0.as_str(), peer.remote_creds.1.as_str())
            }
            _ => false,
        };
        // The whole PATCH or nothing of it; more candidates than a session may hold in all are
        // refused before any is parsed, so no request costs more than the bound.
        let cap = self.config.max_remote_candidates;
        let held = if restart { 0 } else { peer.remote_candidates };
        if frag.candidates.len() > cap {
            return Err(Reject::TooManyCandidates { cap });
        }
        // mDNS (.local), TCP and otherwise unusable candidates are dropped silently (WHEP).
        let candidates: Vec<Candidate> = frag
            .candidates
            .iter()
            .filter_map(|(_, c)| Candidate::from_sdp_string(c).ok())
            .collect();
        if held + candidates.len() > cap {
            return Err(Reject::TooManyCandidates { cap });
        }
        let resp = if restart {
            self.ice_restart(s, &frag)?
        } else {
            WhepResponse::new(StatusCode::NoContent)
        };
        let Some(peer) = self.peers.get_mut(&s) else {
            return Ok(resp);
        };
        let added = candidates.len();
        let mut news = std::mem::take(&mut self.news);
        let grace = self.config.disconnect_grace;
        for c in candidates {
            peer.rtc.add_remote_candidate(c);
            peer.drain(now, grace, &mut self.outputs, &mut news);
        }
        peer.remote_candidates += added;
        debug!(session = %s, restart, added, "patch");
        peer.timeout(now, self.config.disconnect_grace, &mut self.outputs, &mut news);
        self.apply_news(s, &mut news, now);
        self.news = news;
        self.reschedule_peer(s, now);
        Ok(resp)
    }

    fn ice_restart(&mut self, s: SessionId, frag: &SdpFrag) -> Result<WhepResponse, Reject> {
        let (Some(ufrag), Some(pwd)) = (&frag.ice_ufrag, &frag.ice_pwd) else {
            return Err(Reject::BadFragment("restart without credentials".into()));
        };
        let etag = self.rng.etag();
        let Some(peer) = self.peers.get_mut(&s) else {
            return Err(Reject::SessionNotFound);
        };
        let offer_text = sdp::restart_offer(&peer.offer, ufrag, pwd);
        let offer = SdpOffer::from_sdp_string(&offer_text)
            .map_err(|e| Reject::RestartFailed(e.to_string()))?;
        let answer = peer
            .rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| Reject::RestartFailed(e.to_string()))?;
        // Whatever this reports is applied by the caller with the rest of the PATCH's news.
        peer.drain(self.now, self.config.disconnect_grace, &mut self.outputs, &mut self.news);
        let local = peer.rtc.direct_api().local_ice_credentials();
        peer.offer = offer_text;
        peer.remote_creds = (ufrag.clone(), pwd.clone());
        peer.etag = etag;
        let old = std::mem::replace(&mut peer.local_ufrag, local.ufrag.clone());
        let answer = answer.to_sdp_string();
        let candidates: Vec<String> = answer
            .lines()
            .filter_map(|l| l.strip_prefix("a="))
            .filter(|l| l.starts_with("candidate:"))
            .map(str::to_owned)
            .collect();
        let mids = [peer.video.mid.to_string(), peer.audio.mid.to_string()];
        let first_kind =
            if answer.find("m=audio") < answer.find("m=video") { "audio" } else { "video" };
        let (first, second) =
            if first_kind == "video" { (&mids[0], &mids[1]) } else { (&mids[1], &mids[0]) };
        if self.by_ufrag.get(&old) == Some(&s) {
            self.by_ufrag.remove(&old);
        }
        // str0m forgot the old generation's candidates and pairs: so do the demultiplexer and
        // the limits. The new generation's checks (by ufrag) bring the addresses back.
        peer.remote_candidates = 0;
        for a in peer.addrs.drain(..) {
            if self.by_addr.get(&a) == Some(&s) {
                self.by_addr.remove(&a);
            }
        }
        self.by_ufrag.insert(local.ufrag.clone(), s);
        info!(session = %s, "ice restart");
        let body = sdpfrag::build_restart_answer(
            true,
            Some("trickle"),
            first_kind,
            &[first.as_str(), second.as_str()],
            &local.ufrag,
            &local.pass,
            &candidates,
        );
        Ok(WhepResponse::new(StatusCode::Ok)
            .with("ETag", etag.header_value())
            .with_body(CONTENT_TYPE_SDPFRAG, body))
    }

    // ---------------------------------------------------------------------------------------
    // Invariants
    // ---------------------------------------------------------------------------------------

    /// Checks the bookkeeping and panics with a description when it is inconsistent. Used by
    /// tests and the simulation harness after every step; cheap enough for debugging in
    /// production, linear in viewers and streams.
    pub fn check_invariants(&self) {
        self.ports.check_invariants();
        assert!(self.pending.len() < MAX_PENDING, "pending packets beyond the bound");
        assert!(self.fanning.is_none(), "a fan-out left half done after the outputs were taken");
        let mut indexed = 0;
        for (id, s) in &self.streams {
            assert_eq!(&s.id, id, "stream keyed by its id");
            for v in &s.viewers {
                let p = self
                    .peers
                    .get(v)
                    .unwrap_or_else(|| panic!("stream {id} lists unknown viewer {v}"));
                assert_eq!(&p.stream, id, "viewer {v} indexed under the wrong stream");
            }
            indexed += s.viewers.len();
            let cap = s.config.max_viewers.unwrap_or(self.config.max_viewers_per_stream);
            assert!(s.viewers.len() <= cap, "stream {id} over its cap");
            if let Some(m) = &self.config.shard {
                assert!(m.set.stream_viewers(id) >= s.viewers.len(), "stream {id} seats");
            }
            if matches!(s.state, StreamState::Stopped | StreamState::Stopping { .. }) {
                assert!(s.viewers.is_empty(), "stream {id} is {} but has viewers", s.state_name());
            }
            if let Some(ports) = s.ports() {
                assert!(self.ports.is_allocated(ports), "stream {id} holds unallocated {ports}");
            }
            if let Some(t) = s.scheduled {
                assert!(
                    self.timers.contains(&(t, TimerKey::Stream(id.clone()))),
                    "stream {id} timer missing"
                );
            }
        }
        assert_eq!(indexed, self.peers.len(), "every peer is indexed under exactly one stream");
        assert!(self.peers.len() <= self.config.max_viewers_total, "over the total cap");
        let held = self.streams.values().filter_map(Stream::ports).count();
        assert_eq!(held, self.ports.in_use(), "allocated pairs are exactly those streams hold");
        for (port, (id, _)) in &self.ingest {
            let s = self
                .streams
                .get(id)
                .unwrap_or_else(|| panic!("ingest port {port} of unknown stream {id}"));
            assert!(
                s.ports().is_some_and(|p| p.contains(*port)),
                "ingest port {port} not held by {id}"
            );
        }
        for (a, s) in &self.by_addr {
            let p = self
                .peers
                .get(s)
                .unwrap_or_else(|| panic!("address {a} maps to unknown session {s}"));
            assert!(p.addrs.contains(a), "address index of {s} out of sync");
        }
        for (u, s) in &self.by_ufrag {
            let p =
                self.peers.get(s).unwrap_or_else(|| panic!("ufrag maps to unknown session {s}"));
            assert_eq!(&p.local_ufrag, u, "ufrag index of {s} out of sync");
        }
        for (s, p) in &self.peers {
            assert_eq!(
                self.by_ufrag.get(&p.local_ufrag),
                Some(s),
                "peer {s} not in the ufrag index"
            );
            let cap = self.config.prime_pacing.map_or(0, |p| p.max_pending);
            assert!(p.video.backlog() <= cap, "peer {s} holds {} packets back", p.video.backlog());
            assert_eq!(p.audio.backlog(), 0, "audio is never held back");
            let t = p.scheduled.unwrap_or_else(|| panic!("peer {s} has no timer"));
            assert!(self.timers.contains(&(t, TimerKey::Peer(*s))), "peer {s} timer missing");
            assert!(p.addrs.len() <= self.config.max_viewer_addresses, "peer {s} addresses");
            assert!(
                p.remote_candidates <= self.config.max_remote_candidates,
                "peer {s} candidates"
            );
            assert!(
                p.unconnected_client.is_none() || matches!(p.state, PeerState::Connecting { .. }),
                "peer {s} connected but still counted as connecting"
            );
        }
        if self.config.shard.is_none() {
            let counted = self.peers.values().filter(|p| p.unconnected_client.is_some()).count();
            assert_eq!(self.unconnected.total(), counted, "unconnected sessions per client");
        }
        let scheduled = self.peers.values().filter(|p| p.scheduled.is_some()).count()
            + self.streams.values().filter(|s| s.scheduled.is_some()).count();
        assert_eq!(scheduled, self.timers.len(), "no stray timer entries");
    }
}

/// The RTP header extensions offered to viewers: str0m's standard set without transport-wide
/// congestion control. Bandwidth estimation is off, so TWCC feedback would go unused, and with it
/// negotiated str0m keeps a record of the last 1000 sent packets per viewer (about 88 KiB).
/// Ingest packets being written to viewers ([`Core::fan_out_step`]).
#[derive(Debug)]
struct Fanning {
    /// The batch, sorted by stream (stable).
    packets: Vec<(StreamId, SourcePacket, Instant)>,
    /// The current stream's packets are `packets[start..end]`.
    start: usize,
    end: usize,
    /// That stream's viewers, and the next one to write.
    viewers: Vec<SessionId>,
    next: usize,
}

fn rtp_extensions() -> ExtensionMap {
    let mut exts = ExtensionMap::empty();
    for (id, ext) in ExtensionMap::standard().iter() {
        if *ext != Extension::TransportSequenceNumber {
            exts.set(id, ext.clone());
        }
    }
    exts
}

/// Our ICE username fragment from a STUN binding request's USERNAME (`ours:theirs`).
fn stun_local_ufrag(b: &[u8]) -> Option<&str> {
    const MAGIC: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
    if b.len() < 20 || b[0] & 0xc0 != 0 || b.get(4..8)? != MAGIC {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([b[2], b[3]]));
    let attrs = b.get(20..20 + len)?;
    let mut i = 0;
    while i + 4 <= attrs.len() {
        let typ = u16::from_be_bytes([attrs[i], attrs[i + 1]]);
        let alen = usize::from(u16::from_be_bytes([attrs[i + 2], attrs[i + 3]]));
        let value = attrs.get(i + 4..i + 4 + alen)?;
        if typ == 0x0006 {
            let user = std::str::from_utf8(value).ok()?;
            return user.split(':').next();
        }
        i += 4 + alen.div_ceil(4) * 4;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_is_send() {
        fn is_send<T: Send>() {}
        is_send::<Core>();
    }

    #[test]
    fn stun_username_is_parsed() {
        let user = b"srvufrag:cli";
        let mut m = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
        m.extend_from_slice(&[7; 12]);
        // A PRIORITY attribute first, then USERNAME (12 bytes, no padding needed).
        let mut attrs = vec![0x00, 0x24, 0x00, 0x04, 1, 2, 3, 4, 0x00, 0x06, 0x00, 12];
        attrs.extend_from_slice(user);
        m[2..4].copy_from_slice(&(attrs.len() as u16).to_be_bytes());
        m.extend_from_slice(&attrs);
        assert_eq!(stun_local_ufrag(&m), Some("srvufrag"));
        assert_eq!(stun_local_ufrag(&m[..m.len() - 1]), None, "truncated");
        assert_eq!(stun_local_ufrag(&[0x80; 40]), None, "not STUN");
        for n in 0..m.len() {
            let _ = stun_local_ufrag(&m[..n]);
        }
    }
}
