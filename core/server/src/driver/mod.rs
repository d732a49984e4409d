//! The one event loop every async runtime runs, written against a small [`Runtime`] trait, as
//! quinn does (its loop and runtime trait live in `quinn`, outside `quinn-proto`): `whep-tokio`
//! and `whep-smol` each implement the trait (sockets, a timer, spawning tasks and FFmpeg
//! children) and add their HTTP server; the loop, the output execution and the [`Engine`]
//! handle live here once.
//!
//! This module does no IO of its own and depends on no runtime: every socket, timer, task and
//! process comes through the trait, and its queues are std-only. The [`Core`] state machine does
//! not use it; an application with its own loop can ignore it (see
//! `core/server/examples/blocking.rs`).
//!
//! One task owns the `Core`. It waits on every source at once: jobs from handles (HTTP
//! requests, stream management) and process exits first, then, taking turns so that none
//! starves the others when the loop is saturated, the ingest sockets (round-robin, up to 32
//! queued packets per wake-up: a frame's packets arrive back to back), the viewer socket (up
//! to 32 datagrams per wake-up: STUN consent checks, RTCP) and the timer; then it executes
//! every output. It measures the share of its time spent forwarding (working on anything but
//! HTTP requests) and reports it to the core ([`Core::set_load`]), which refuses new viewers
//! while that share is near saturation, and after a
//! few wake-ups in a row that found work at once it yields to the runtime's other tasks.
//!
//! Datagrams for viewers are sent in batches: when the socket supports segmentation offload
//! (UDP GSO, [`UdpSocket::max_segments`]), the copies for one viewer of the packets handled in
//! one wake-up (typically a frame's fragments, which are of equal size) leave in one system
//! call. The time from an ingest packet's arrival (the kernel's receive timestamp, so time
//! queued in the socket while the loop was busy counts) to having sent its last copy is
//! recorded in [`Metrics::egress_latency`], and to each copy in [`Metrics::copy_latency`].
//!
//! Sockets are read through [`UdpSocket::poll_recv`], which may return several datagrams of
//! one sender coalesced by the kernel (UDP GRO): they are handed to the core one by one.

mod chan;
mod follower;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use tracing::{debug, info, warn};

use crate::app::{AddError, Reply, RoutesConfig, ServerConfig, ShardView, StreamSpec, TcpListen};
use crate::shard::ShardSet;
use whep_core::auth::JwtKeys;
use whep_core::shard::{MAX_SHARDS, Mirror, ShardMember};
use whep_core::tcp::{ConnId, SendQueue};
use whep_core::{
    AuthDecision, Core, Event, Input, Metrics, Output, PortPair, RequestId, StreamError, StreamId,
    StreamInfo, Transport, WhepRequest, WhepResponse,
};

/// Receive buffer: room for the most datagrams one receive may return coalesced (UDP GRO: 64
/// segments, at most 64 KiB in all), or for the largest UDP datagram.
const RECV_BUFFER: usize = 1 << 17;
/// Datagrams read from the viewer socket, or from ingest sockets, per wake-up before outputs
/// are executed.
const RECV_BATCH: usize = 32;
/// Datagrams gathered before they are sent, at least (at the next change of destination).
const SEND_CHUNK: usize = 256;
/// Largest payload of one segmented send (the UDP length field's limit, less headers).
const MAX_GSO_BYTES: usize = 65_000;
/// Events a subscriber may fall behind before it loses the oldest.
const EVENT_BACKLOG: usize = 1024;
/// How often the share of time the loop spends working is reported to the core
/// ([`Core::set_load`], admission control).
const LOAD_INTERVAL: Duration = Duration::from_millis(250);
/// Wake-ups in a row that found work at once, after which the loop yields to the runtime's
/// other tasks (HTTP connections on a single-threaded executor) before going on.
const YIELD_EVERY: u32 = 8;

/// What an async runtime provides to the driver.
pub trait Runtime: Send + Sync + 'static {
    /// A UDP socket registered with the runtime's reactor.
    type UdpSocket: UdpSocket;
    /// A resettable timer.
    type Timer: Timer;

    /// Binds a non-blocking UDP socket.
    fn bind_udp(&self, addr: SocketAddr) -> io::Result<Self::UdpSocket>;
    /// A timer that has not been set.
    fn timer(&self) -> Self::Timer;
    /// Runs `future` to completion in the background.
    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>);
    /// Runs the engine loop of shard `index` of a sharded engine
    /// ([`ServerConfig::shards`] > 1), ideally on a thread of its own. The default spawns it
    /// like any task, which suits a multi-threaded executor.
    fn spawn_shard(&self, index: usize, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        let _ = index;
        self.spawn(future);
    }
    /// Starts `program args…` with stdin closed, its stderr forwarded to `tracing` (target
    /// `ffmpeg`, with `stream`), and calls [`ProcessExit::report`] when it exits. Returns its
    /// pid, or an error that says how to fix it (see [`crate::cli::missing_ffmpeg`]).
    fn spawn_process(
        &self,
        stream: &StreamId,
        program: &str,
        args: &[String],
        exit: ProcessExit,
    ) -> Result<u32, String>;
    /// Sends SIGTERM (or SIGKILL when `force`) to a process it spawned.
    fn signal(&self, pid: u32, force: bool);
    /// The runtime's clock (the driver reads no clock of its own).
    fn now(&self) -> Instant;
    /// Runs `work`, which blocks (an HTTP exchange with the authorisation server or a JWKS
    /// URL, bounded by its timeouts), where it cannot hold up the engine loop: the runtime's
    /// blocking pool. The default starts a thread for it.
    fn spawn_blocking(&self, work: Box<dyn FnOnce() + Send>) {
        let spawned = std::thread::Builder::new().name("whep-blocking".into()).spawn(work);
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start a thread for blocking work");
        }
    }
    /// Binds a non-blocking TCP listener (ICE-TCP). The default says the runtime has none:
    /// the engine then runs without ICE over TCP.
    fn bind_tcp(&self, addr: SocketAddr) -> io::Result<Box<dyn TcpListener>> {
        let _ = addr;
        Err(io::Error::new(io::ErrorKind::Unsupported, "this runtime has no TCP listener"))
    }
}

/// A TCP listener of a [`Runtime`] (ICE-TCP).
pub trait TcpListener: Send + Sync + 'static {
    /// Accepts a connection (non-blocking, `TCP_NODELAY` set), or registers the task for
    /// readiness.
    fn poll_accept(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(Box<dyn TcpStream>, SocketAddr)>>;
    /// The bound address.
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

/// An accepted TCP connection of a [`Runtime`]. Neither call may block: the engine loop
/// writes to every viewer's connection.
pub trait TcpStream: Send + Sync + 'static {
    /// Reads what is there (0: the peer closed), or registers the task for readiness.
    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>>;
    /// Writes what the socket takes of `buf`, or registers the task for writability.
    fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>>;
    /// Our end's address.
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

/// What one [`UdpSocket::poll_recv`] put in the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Bytes received.
    pub len: usize,
    /// Their sender.
    pub from: SocketAddr,
    /// The size of each datagram in them: `len` for one datagram; less when the kernel
    /// coalesced several of one sender (UDP GRO), the last of which may be shorter.
    pub stride: usize,
    /// How long before the call the kernel received them (its receive timestamp), where the
    /// socket reports one: time spent queued in the socket counts as latency.
    pub age: Option<Duration>,
}

impl Received {
    /// One datagram of `len` bytes from `from`, with no timestamp.
    pub fn datagram(len: usize, from: SocketAddr) -> Self {
        Self { len, from, stride: len, age: None }
    }

    /// `len` bytes from `from` in datagrams of `stride` bytes, with the kernel receive
    /// timestamp `timestamp` (time since the Unix epoch), read at wall-clock time `wall_now`:
    /// what a runtime reading through quinn-udp (`RecvMeta`) hands the driver.
    pub fn coalesced(
        len: usize,
        from: SocketAddr,
        stride: usize,
        timestamp: Option<Duration>,
        wall_now: SystemTime,
    ) -> Self {
        Self { len, from, stride, age: None }.timestamped(timestamp, wall_now)
    }

    /// With the age of a kernel receive timestamp (`SO_TIMESTAMPNS`: time since the Unix
    /// epoch) at wall-clock time `wall_now`. A timestamp in the future (the clock was set
    /// back) counts as no age.
    #[must_use]
    pub fn timestamped(mut self, timestamp: Option<Duration>, wall_now: SystemTime) -> Self {
        let since_epoch = wall_now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        self.age = timestamp.map(|t| since_epoch.saturating_sub(t));
        self
    }

    /// Each datagram in `buf[..len]`: `stride` bytes each, the last possibly shorter.
    pub fn datagrams<'b>(&self, buf: &'b [u8]) -> impl Iterator<Item = &'b [u8]> + use<'b> {
        let len = self.len.min(buf.len());
        buf[..len].chunks(self.stride.max(1))
    }
}

/// A UDP socket of a [`Runtime`].
pub trait UdpSocket: Send + Sync + 'static {
    /// Receives one datagram, or registers the task for readiness.
    fn poll_recv_from(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<(usize, SocketAddr)>>;
    /// Receives what the socket has for one call: one datagram, or several of one sender
    /// coalesced by the kernel (UDP GRO, which a socket must handle here if it enables it),
    /// with the kernel's receive timestamp if the socket has one; or registers the task for
    /// readiness. The driver reads every socket through this. The default is one
    /// [`poll_recv_from`](Self::poll_recv_from) datagram without a timestamp.
    fn poll_recv(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<Received>> {
        self.poll_recv_from(cx, buf).map_ok(|(len, from)| Received::datagram(len, from))
    }
    /// Sends one datagram, or registers the task for writability.
    fn poll_send_to(
        &self,
        cx: &mut Context<'_>,
        buf: &[u8],
        target: SocketAddr,
    ) -> Poll<io::Result<usize>>;
    /// The bound address.
    fn local_addr(&self) -> io::Result<SocketAddr>;
    /// Most datagrams one [`poll_send_segments`](Self::poll_send_segments) call may carry:
    /// more than 1 where the socket has UDP segmentation offload (GSO). The default is 1.
    fn max_segments(&self) -> usize {
        1
    }
    /// Sends `contents` to `destination` as datagrams of `segment_size` bytes each (the last
    /// may be shorter) in one call, or registers the task for writability. The driver passes
    /// at most [`max_segments`](Self::max_segments) segments, so the default (one datagram,
    /// [`poll_send_to`](Self::poll_send_to)) is right for a socket without GSO.
    fn poll_send_segments(
        &self,
        cx: &mut Context<'_>,
        contents: &[u8],
        segment_size: usize,
        destination: SocketAddr,
    ) -> Poll<io::Result<()>> {
        let _ = segment_size;
        self.poll_send_to(cx, contents, destination).map_ok(|_| ())
    }
}

/// A resettable timer of a [`Runtime`].
pub trait Timer: Send + 'static {
    /// Fires at `at` (at once if it is past).
    fn reset(&mut self, at: Instant);
    /// Ready once the deadline passed.
    fn poll_fired(&mut self, cx: &mut Context<'_>) -> Poll<()>;
}

/// Reports a child's exit to the engine; handed to [`Runtime::spawn_process`].
#[derive(Debug)]
pub struct ProcessExit {
    stream: StreamId,
    generation: u64,
    tx: chan::Sender<Exited>,
}

impl ProcessExit {
    /// The process exited with `code` (`None` when killed by a signal).
    pub fn report(self, code: Option<i32>) {
        let _ = self.tx.send(Exited { stream: self.stream, generation: self.generation, code });
    }
}

#[derive(Debug)]
struct Exited {
    stream: StreamId,
    generation: u64,
    code: Option<i32>,
}

type Job = Box<dyn FnOnce(&mut Core, &RoutesConfig, Instant, &mut JobCtx) + Send>;

/// A decision of the authorisation server, from the blocking task that asked it.
type Decided = (RequestId, AuthDecision);

/// [`Engine::answer`]'s waiting half: dropped while still waiting (its `jobs` set), it queues a
/// job that cancels the request the answer job parked, if it did. The shard runs its jobs in
/// order, so that job sees the parked id.
struct CancelOnDrop {
    jobs: Option<chan::Sender<Job>>,
    parked: Arc<Mutex<Option<RequestId>>>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let Some(jobs) = self.jobs.take() else { return };
        let parked = Arc::clone(&self.parked);
        let _ = jobs.send(Box::new(move |core, _, _, ctx| {
            if let Some(id) = lock(&parked).take() {
                core.cancel_request(id);
                ctx.cancelled = Some(id);
            }
        }));
    }
}

/// What a job leaves for the loop: [`Engine::shutdown`]'s flag, a request the core left
/// pending with the channel its response goes to, or a pending request whose client went away.
#[derive(Default)]
struct JobCtx {
    shutdown: bool,
    parked: Option<(RequestId, chan::Sender<Reply>)>,
    cancelled: Option<RequestId>,
}

/// A stream of [`Event`]s from [`Engine::subscribe`]. A subscriber that falls more than 1024
/// events behind loses the oldest.
#[derive(Debug)]
pub struct Subscription {
    rx: chan::Receiver<Event>,
}

impl Subscription {
    /// The next event; `None` once the engine has stopped.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// Polls for the next event.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}

/// A handle to a running engine. Cheap to clone; the engine shuts down (viewers closed, FFmpeg
/// stopped, ports released) when [`Engine::shutdown`] is called or the last handle is dropped.
pub struct Engine<R: Runtime> {
    inner: Arc<Inner>,
    runtime: Arc<R>,
}

impl<R: Runtime> Clone for Engine<R> {
    fn clone(&self) -> Self {
        Self { inner: Arc::clone(&self.inner), runtime: Arc::clone(&self.runtime) }
    }
}

impl<R: Runtime> fmt::Debug for Engine<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine").field("udp_addrs", &self.udp_addrs()).finish_non_exhaustive()
    }
}

struct Inner {
    /// One per shard; shard 0 leads (owns the streams' ports and processes).
    shards: Vec<ShardHandle>,
    /// What the shards share, when there is more than one.
    set: Option<Arc<ShardSet>>,
    subscribers: Arc<Mutex<Vec<chan::Sender<Event>>>>,
    max_body: usize,
    whep_prefix: String,
}

struct ShardHandle {
    jobs: chan::Sender<Job>,
    udp_addr: SocketAddr,
    /// Set when the shard's loop has stopped.
    done: Arc<Latch>,
}

/// A flag that async waiters can wait for.
#[derive(Debug, Default)]
struct Latch {
    state: Mutex<(bool, Vec<Waker>)>,
}

impl Latch {
    fn set(&self) {
        let wakers = {
            let mut s = lock(&self.state);
            s.0 = true;
            std::mem::take(&mut s.1)
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    async fn wait(&self) {
        poll_fn(|cx| {
            let mut s = lock(&self.state);
            if s.0 {
                return Poll::Ready(());
            }
            if !s.1.iter().any(|w| w.will_wake(cx.waker())) {
                s.1.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await;
    }
}

/// Sets the latch when the engine task ends, also when the runtime drops it unfinished.
struct SetOnDrop(Arc<Latch>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.set();
    }
}

impl<R: Runtime> Engine<R> {
    /// Binds the viewer socket and starts the engine task on `runtime`.
    ///
    /// An all-zero [`CoreConfig::rng_seed`](whep_core::CoreConfig::rng_seed) must be filled by the caller
    /// from the operating system first. With no host candidates, `default_routes` (the addresses
    /// the kernel picks towards the Internet, if known) feeds
    /// [`default_candidates`](crate::app::default_candidates).
    pub fn start(
        runtime: R,
        config: ServerConfig,
        default_routes: &[SocketAddr],
    ) -> io::Result<Self> {
        let runtime = Arc::new(runtime);
        let count = config.shards.clamp(1, MAX_SHARDS);
        let now = runtime.now();
        let set = (count > 1).then(|| ShardSet::new(count, config.core.rate_limits, now));
        // Bind every socket before starting anything, so that a failure leaves nothing behind.
        let mut sockets = Vec::with_capacity(count);
        for index in 0..count {
            let mut bind = config.udp_bind;
            if bind.port() != 0 {
                let port = u16::try_from(usize::from(bind.port()) + index).map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidInput, "shard ports beyond 65535")
                })?;
                bind.set_port(port);
            }
            // An ephemeral port is free for UDP but may be held for TCP (any local connection
            // can hold it): when ICE-TCP shares the UDP port, pick again until both are free.
            let tries = if bind.port() == 0 && config.tcp == TcpListen::SameAsUdp {
                EPHEMERAL_PAIR_TRIES
            } else {
                1
            };
            let mut bound = None;
            for attempt in 1..=tries {
                let socket = runtime.bind_udp(bind)?;
                let addr = socket.local_addr()?;
                if attempt < tries && config.tcp == TcpListen::SameAsUdp {
                    match runtime.bind_tcp(addr) {
                        Ok(l) => {
                            bound = Some((socket, addr, Some(l)));
                            break;
                        }
                        Err(e) => {
                            debug!(%addr, error = %e, "ephemeral port taken for TCP; picking another");
                            continue;
                        }
                    }
                }
                let tcp = bind_tcp(&*runtime, config.tcp, addr, index)?;
                bound = Some((socket, addr, tcp));
            }
            let Some(bound) = bound else {
                return Err(io::Error::other("no viewer socket bound"));
            };
            sockets.push(bound);
        }
        // The leader's queues to each follower: senders for shard 0, a receiver for each other.
        let (mut to_followers, from_leader): (Vec<_>, Vec<_>) =
            (1..count).map(|_| chan::channel::<Mirror>(None)).unzip();
        let mut from_leader = from_leader.into_iter();
        // The followers' queue to the leader: which on-demand streams' viewers changed.
        let (to_leader, demands) = match count {
            1 => (None, None),
            _ => {
                let (tx, rx) = chan::channel::<StreamId>(None);
                (Some(tx), Some(rx))
            }
        };
        let mut demands = demands;
        // One queue of refreshed JWT keys per shard, filled by the JWKS fetcher, and one queue
        // of the shards' asks for a fetch now (a token of a rotated key).
        let fetched = config.auth.jwt.as_ref().is_some_and(|j| j.jwks_url.is_some());
        let (jwks_tx, jwks_rx): (Vec<_>, Vec<_>) = match fetched {
            true => (0..count).map(|_| chan::channel(Some(1))).unzip(),
            false => (Vec::new(), Vec::new()),
        };
        let mut jwks_rx = jwks_rx.into_iter();
        let (jwks_ask, jwks_asks) = std::sync::mpsc::channel::<()>();
        let subscribers = Arc::new(Mutex::new(Vec::new()));
        let mut routes = config.routes.clone();
        routes.start_webhook().map_err(io::Error::other)?;
        let max_body = config.core.max_body_bytes;
        let whep_prefix = config.core.whep_prefix.clone();
        let mut shards = Vec::with_capacity(count);
        for (index, (socket, udp_addr, tcp)) in sockets.into_iter().enumerate() {
            let mut core = config.core.clone();
            if !fetched {
                // Nothing could fetch the keys again: a token of an unknown key is refused at
                // once rather than after waiting for nothing.
                core.auth.jwt_refresh = None;
            }
            if core.host_candidates.is_empty() {
                core.host_candidates = crate::app::default_candidates(udp_addr, default_routes);
            } else {
                // Configured candidates name shard 0's port; shard i listens i ports higher.
                for c in &mut core.host_candidates {
                    c.set_port(c.port().saturating_add(index as u16));
                }
            }
            if set.is_some() {
                core.rng_seed[31] ^= index as u8;
            }
            // ICE-TCP: the host candidates' addresses with the listener's port.
            let tcp_port = tcp.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.port());
            core.tcp_candidates = match tcp_port {
                Some(port) => {
                    core.host_candidates.iter().map(|c| SocketAddr::new(c.ip(), port)).collect()
                }
                None => Vec::new(),
            };
            info!(shard = index, udp = %udp_addr, candidates = ?core.host_candidates, tcp_candidates = ?core.tcp_candidates, "viewer socket bound");
            let (jobs, jobs_rx) = chan::channel(None);
            let done = Arc::new(Latch::default());
            let driver = Driver {
                core: match &set {
                    Some(set) => Core::new(core, now)
                        .in_shard(ShardMember { index: index as u8, set: set.clone() }),
                    None => Core::new(core, now),
                },
                routes: routes.clone(),
                runtime: Arc::clone(&runtime),
                local: udp_addr,
                socket,
                ingest: Vec::new(),
                ingest_next: 0,
                procs: HashMap::new(),
                exits: chan::channel(None),
                subscribers: Arc::clone(&subscribers),
                shutdown_at: None,
                sends: Vec::new(),
                segments: Vec::new(),
                ingest_arrivals: Vec::new(),
                gso: config.udp_gso,
                turn: 0,
                followers: std::mem::take(&mut to_followers)
                    .into_iter()
                    .map(follower::FollowerQueue::new)
                    .collect(),
                leader: if index == 0 { None } else { from_leader.next() },
                demands: if index == 0 { demands.take() } else { None },
                to_leader: if index == 0 { None } else { to_leader.clone() },
                index,
                tcp,
                conns: std::collections::BTreeMap::new(),
                next_conn: 0,
                tcp_next: ConnId(0),
                tcp_queue_bytes: config.tcp_queue_bytes.max(4096),
                responders: HashMap::new(),
                decisions: chan::channel(None),
                auth_url: config.auth.http_url.clone(),
                auth_secret: config.auth.http_secret.clone(),
                auth_timeout: config.core.auth.http.as_ref().map_or(Duration::ZERO, |h| h.timeout),
                jwt_keys: jwks_rx.next(),
                jwks_ask: fetched.then(|| jwks_ask.clone()),
            };
            let guard = SetOnDrop(Arc::clone(&done));
            let future = Box::pin(driver.run(jobs_rx, config.shutdown_timeout, guard));
            if count > 1 {
                runtime.spawn_shard(index, future);
            } else {
                runtime.spawn(future);
            }
            shards.push(ShardHandle { jobs, udp_addr, done });
        }
        if let Some(sources) = config.auth.jwt.clone().filter(|j| j.jwks_url.is_some()) {
            spawn_jwks_fetcher(sources, jwks_tx, jwks_asks);
        }
        let inner = Inner { shards, set, subscribers, max_body, whep_prefix };
        Ok(Self { inner: Arc::new(inner), runtime })
    }

    /// The runtime the engine runs on.
    pub fn runtime(&self) -> &R {
        &self.runtime
    }

    /// The local address of the viewer socket (shard 0's, when sharded).
    pub fn udp_addr(&self) -> SocketAddr {
        self.inner.shards[0].udp_addr
    }

    /// The local address of every shard's viewer socket, by shard index.
    pub fn udp_addrs(&self) -> Vec<SocketAddr> {
        self.inner.shards.iter().map(|s| s.udp_addr).collect()
    }

    /// Number of shards (see [`ServerConfig::shards`]).
    pub fn shard_count(&self) -> usize {
        self.inner.shards.len()
    }

    /// Largest accepted request body ([`CoreConfig::max_body_bytes`](whep_core::CoreConfig::max_body_bytes)).
    pub fn max_body(&self) -> usize {
        self.inner.max_body
    }

    /// Runs `f` on the engine's task with the core and the current time, and returns its result.
    /// Outputs the call produces are executed right after it. `None` once the engine is gone.
    ///
    /// On a sharded engine this is the leader's core (shard 0), which owns the streams; see
    /// [`with_shard`](Self::with_shard) for the others.
    pub async fn with_core<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Core, &RoutesConfig, Instant) -> T + Send + 'static,
    ) -> Option<T> {
        self.with_shard(0, f).await
    }

    /// [`with_core`](Self::with_core) on shard `index`; `None` when there is no such shard.
    pub async fn with_shard<T: Send + 'static>(
        &self,
        index: usize,
        f: impl FnOnce(&mut Core, &RoutesConfig, Instant) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = chan::channel(Some(1));
        let job: Job = Box::new(move |core, routes, now, _| {
            let _ = tx.send(f(core, routes, now));
        });
        self.inner.shards.get(index)?.jobs.send(job).ok()?;
        rx.recv().await
    }

    /// What the shards other than the leader hold, for the leader's status pages; with their
    /// sessions if `sessions`.
    async fn follower_views(&self, sessions: bool) -> Vec<ShardView> {
        let mut views = Vec::new();
        for index in 1..self.inner.shards.len() {
            let view = move |core: &mut Core, _: &RoutesConfig, now| {
                ShardView::with_sessions(core, now, sessions)
            };
            if let Some(v) = self.with_shard(index, view).await {
                views.push(v);
            }
        }
        views
    }

    /// Adds a stream and, unless `spec.autostart` is false, starts it.
    pub async fn add_stream(&self, id: &str, spec: StreamSpec) -> Result<(), AddError> {
        let id = StreamId::new(id).ok_or(AddError::BadId)?;
        let config = spec.to_config().map_err(AddError::BadSpec)?;
        let start = spec.autostart();
        self.with_core(move |core, _, now| {
            core.add_stream(id.clone(), config)?;
            if start { core.start_stream(&id, now) } else { Ok(()) }
        })
        .await
        .ok_or(AddError::Closed)?
        .map_err(AddError::Stream)
    }

    /// Starts a stopped stream.
    pub async fn start_stream(&self, id: &str) -> Result<(), StreamError> {
        self.stream_op(id, |core, id, now| core.start_stream(id, now)).await
    }

    /// Stops a stream: its viewers are closed, then its FFmpeg, then its ports are released.
    pub async fn stop_stream(&self, id: &str) -> Result<(), StreamError> {
        self.stream_op(id, |core, id, now| core.stop_stream(id, now)).await
    }

    /// Stops and forgets a stream.
    pub async fn remove_stream(&self, id: &str) -> Result<(), StreamError> {
        self.stream_op(id, |core, id, now| core.remove_stream(id, now)).await
    }

    async fn stream_op(
        &self,
        id: &str,
        op: impl FnOnce(&mut Core, &StreamId, Instant) -> Result<(), StreamError> + Send + 'static,
    ) -> Result<(), StreamError> {
        let id = StreamId::new(id).ok_or(StreamError::NotFound)?;
        self.with_core(move |core, _, now| op(core, &id, now))
            .await
            .unwrap_or(Err(StreamError::NotFound))
    }

    /// Status of every stream, viewers of all shards counted (empty once the engine is gone).
    pub async fn streams(&self) -> Vec<StreamInfo> {
        let views = self.follower_views(false).await;
        self.with_core(move |core, _, _| crate::app::merged_streams(core, &views))
            .await
            .unwrap_or_default()
    }

    /// A copy of the counters, all shards summed.
    pub async fn metrics(&self) -> Metrics {
        let views = self.follower_views(false).await;
        let mut m = self.with_core(|core, _, _| core.metrics().clone()).await.unwrap_or_default();
        views.iter().for_each(|v| m.merge(&v.metrics));
        m
    }

    /// Every viewer of every shard ([`Core::sessions`]), ordered by stream then session.
    pub async fn sessions(&self) -> Vec<whep_core::SessionInfo> {
        let mut all = Vec::new();
        for index in 0..self.inner.shards.len() {
            if let Some(list) = self.with_shard(index, |core, _, now| core.sessions(now)).await {
                all.extend(list);
            }
        }
        all.sort_by(|a, b| a.stream.cmp(&b.stream).then(a.session.cmp(&b.session)));
        all
    }

    /// Closes a viewer as its DELETE would ([`Core::kick`]); `false` when there is no such
    /// session.
    pub async fn kick(&self, session: whep_core::SessionId) -> bool {
        let shard = self.shard_of(session);
        self.with_shard(shard, move |core, _, now| core.kick(session, now).is_some())
            .await
            .unwrap_or(false)
    }

    /// The shard a session lives on (the leader for an id naming none).
    fn shard_of(&self, session: whep_core::SessionId) -> usize {
        let shard = usize::from(session.shard());
        if shard < self.inner.shards.len() { shard } else { 0 }
    }

    /// Events from now on: streams started, stopped and failed, FFmpeg exits, viewers joined,
    /// connected and left.
    /// On a sharded engine, stream events come from the leader only; viewer events from the
    /// shard the viewer lives on.
    pub fn subscribe(&self) -> Subscription {
        let (tx, rx) = chan::channel(Some(EVENT_BACKLOG));
        lock(&self.inner.subscribers).push(tx);
        Subscription { rx }
    }

    /// Answers one request to the application routes (player page, `/metrics`, admin API and
    /// the WHEP routes); see [`crate::app::handle`]. A WHEP request waiting for the
    /// authorisation callback is answered when the core decides.
    pub async fn handle_request(&self, req: WhepRequest) -> WhepResponse {
        let shard = match crate::app::session_route(&req) {
            Some(session) => self.shard_of(session),
            None => self.shard_for(&req),
        };
        if shard == 0 && self.inner.shards.len() > 1 && crate::app::shows_totals(&req) {
            let views = self.follower_views(crate::app::lists_sessions(&req)).await;
            return self
                .with_core(move |core, routes, now| {
                    crate::app::reply_sharded(core, routes, req, now, &views)
                })
                .await
                .and_then(Reply::into_response)
                .unwrap_or_else(crate::app::unavailable);
        }
        self.answer(shard, move |core, routes, now| {
            crate::app::handle_request(core, routes, req, now)
        })
        .await
    }

    /// Answers one request to the WHEP routes only.
    pub async fn handle_whep_request(&self, req: WhepRequest) -> WhepResponse {
        let shard = self.shard_for(&req);
        self.answer(shard, move |core, _, now| core.handle_request(req, now).into()).await
    }

    /// Runs `f` on shard `index`; a [`Reply::Pending`] is answered when the core emits its
    /// [`Output::Respond`]. Dropped before that (the HTTP connection closed, and the server
    /// dropped the request's future), it has the core forget the pending request at once
    /// ([`Core::cancel_request`]), so that it no longer counts against
    /// `--auth-max-pending`. A [`Reply::Listing`] is rendered here, on the caller's task, not
    /// on the shard's.
    async fn answer(
        &self,
        index: usize,
        f: impl FnOnce(&mut Core, &RoutesConfig, Instant) -> Reply + Send + 'static,
    ) -> WhepResponse {
        let Some(shard) = self.inner.shards.get(index) else {
            return crate::app::unavailable();
        };
        let (tx, rx) = chan::channel(Some(1));
        let parked = Arc::new(Mutex::new(None));
        let parked_id = Arc::clone(&parked);
        let job: Job = Box::new(move |core, routes, now, ctx| match f(core, routes, now) {
            Reply::Pending(id) => {
                *lock(&parked_id) = Some(id);
                ctx.parked = Some((id, tx));
            }
            ready => {
                let _ = tx.send(ready);
            }
        });
        if shard.jobs.send(job).is_err() {
            return crate::app::unavailable();
        }
        let mut guard = CancelOnDrop { jobs: Some(shard.jobs.clone()), parked };
        let response = rx.recv().await;
        guard.jobs = None;
        response.and_then(Reply::into_response).unwrap_or_else(crate::app::unavailable)
    }

    /// The shard that answers `req`: a session's own, the least loaded one for a POST that
    /// creates a session, else the leader. A session id naming a shard that does not exist
    /// (made up by a client) goes to the leader, which knows no such session either: 404, or
    /// 204 for a DELETE, within the rate limits like any other unknown session.
    fn shard_for(&self, req: &WhepRequest) -> usize {
        let Some(set) = &self.inner.set else { return 0 };
        match whep_core::whep::shard_route(&self.inner.whep_prefix, req) {
            whep_core::whep::ShardRoute::NewSession => set.least_loaded(),
            whep_core::whep::ShardRoute::Session(shard) if usize::from(shard) < set.count() => {
                usize::from(shard)
            }
            whep_core::whep::ShardRoute::Session(_) | whep_core::whep::ShardRoute::Any => 0,
        }
    }

    /// Drains the engine before a [`shutdown`](Self::shutdown): every shard refuses new
    /// viewers (503 + `Retry-After`; `/ready` answers 503 `draining`) while the current ones
    /// keep playing and their sessions answer PATCH and DELETE; completes when they have all
    /// left or `limit` has passed, with the number still there.
    pub async fn drain<F: Future<Output = ()>>(
        &self,
        limit: Duration,
        mut sleep: impl FnMut(Duration) -> F,
    ) -> usize {
        for index in 0..self.inner.shards.len() {
            let _ = self.with_shard(index, |core, _, _| core.set_draining(true)).await;
        }
        let start = self.runtime.now();
        loop {
            let viewers = self.viewer_count().await;
            let waited = self.runtime.now().saturating_duration_since(start);
            if viewers == 0 || waited >= limit {
                return viewers;
            }
            sleep((limit - waited).min(Duration::from_millis(250))).await;
        }
    }

    /// Viewers on every shard.
    pub async fn viewer_count(&self) -> usize {
        let mut n = 0;
        for index in 0..self.inner.shards.len() {
            n += self.with_shard(index, |core, _, _| core.viewer_count()).await.unwrap_or(0);
        }
        n
    }

    /// Closes every viewer session, stops every stream's FFmpeg (SIGTERM, then SIGKILL), waits
    /// until no process or port is left (at most
    /// [`ServerConfig::shutdown_timeout`]) and stops the engine.
    pub async fn shutdown(&self) {
        for shard in &self.inner.shards {
            let job: Job = Box::new(|_, _, _, ctx| ctx.shutdown = true);
            let _ = shard.jobs.send(job);
        }
        self.closed().await;
    }

    /// Completes when the engine (every shard) has stopped.
    pub async fn closed(&self) {
        for shard in &self.inner.shards {
            shard.done.wait().await;
        }
    }
}

/// Runs [`crate::auth::fetch_jwks_forever`] on a thread of its own (not the runtime's blocking
/// pool, whose shutdown would wait for it), handing every shard the keys, also when a shard
/// `asks`; the thread ends within a second of the engine.
fn spawn_jwks_fetcher(
    sources: crate::auth::JwtSources,
    shards: Vec<chan::Sender<JwtKeys>>,
    asks: std::sync::mpsc::Receiver<()>,
) {
    let shards = Arc::new(shards);
    let theirs = Arc::clone(&shards);
    let work = move || {
        crate::auth::fetch_jwks_forever(
            &sources,
            |keys| theirs.iter().for_each(|s| drop(s.send(keys.clone()))),
            &asks,
            || !theirs.iter().all(chan::Sender::is_closed),
        );
    };
    if let Err(e) = std::thread::Builder::new().name("whep-jwks".into()).spawn(work) {
        warn!(error = %e, "cannot start the JWKS fetcher; JWTs are checked against the files only");
    }
}

/// Returns `Pending` once, after asking to be polled again: other tasks of the executor run
/// in between.
async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await;
}

/// The share of time the loop spends working rather than waiting, over intervals of
/// [`LOAD_INTERVAL`].
#[derive(Debug)]
struct LoadMeter {
    /// Start of the current interval.
    since: Instant,
    /// When the loop last woke up.
    woke: Instant,
    /// Time spent working in the current interval.
    busy: Duration,
    /// Work in the current interval that does not count (answering requests).
    excluded: Duration,
}

impl LoadMeter {
    fn new(now: Instant) -> Self {
        Self { since: now, woke: now, busy: Duration::ZERO, excluded: Duration::ZERO }
    }

    /// Work that does not count as load (answering requests).
    fn exclude(&mut self, work: Duration) {
        self.excluded += work;
    }

    /// The loop is about to wait at `now`: the time since it woke was work.
    fn waiting(&mut self, now: Instant) {
        self.busy += now.saturating_duration_since(self.woke);
    }

    /// The loop woke up at `now`; returns the share of time spent working in the interval
    /// that ends here, once it is [`LOAD_INTERVAL`] long. Deciding at wake-up, before the
    /// work, means a request after a long idle time is judged by that idle time.
    fn woke(&mut self, now: Instant) -> Option<f64> {
        self.woke = now;
        let elapsed = now.saturating_duration_since(self.since);
        if elapsed < LOAD_INTERVAL {
            return None;
        }
        let share = self.busy.saturating_sub(self.excluded).as_secs_f64() / elapsed.as_secs_f64();
        self.since = now;
        self.busy = Duration::ZERO;
        self.excluded = Duration::ZERO;
        Some(share)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct Driver<R: Runtime> {
    core: Core,
    routes: RoutesConfig,
    runtime: Arc<R>,
    socket: R::UdpSocket,
    local: SocketAddr,
    /// Bound ingest sockets: (port, pair, socket).
    ingest: Vec<(u16, PortPair, R::UdpSocket)>,
    /// Round-robin start for polling the ingest sockets.
    ingest_next: usize,
    procs: HashMap<(StreamId, u64), u32>,
    exits: (chan::Sender<Exited>, chan::Receiver<Exited>),
    subscribers: Arc<Mutex<Vec<chan::Sender<Event>>>>,
    shutdown_at: Option<Instant>,
    /// Datagrams for viewers gathered for one batched send (reused).
    sends: Vec<whep_core::Transmit>,
    /// One segmented send's payload (reused).
    segments: Vec<u8>,
    /// When each ingest packet handled since the last flush arrived.
    ingest_arrivals: Vec<Instant>,
    /// [`ServerConfig::udp_gso`].
    gso: bool,
    /// Which of ingest, viewer socket and timer `poll_wake` tries first (rotates).
    turn: u8,
    /// The leader's queues to every other shard (empty unless this is a sharded leader).
    followers: Vec<follower::FollowerQueue>,
    /// A follower's queue from the leader (its ingest).
    leader: Option<chan::Receiver<Mirror>>,
    /// A sharded leader's queue from the followers: their [`Output::Demand`]s.
    demands: Option<chan::Receiver<StreamId>>,
    /// A follower's end of the leader's `demands`.
    to_leader: Option<chan::Sender<StreamId>>,
    /// This shard's index.
    index: usize,
    /// The ICE-TCP listener, if any.
    tcp: Option<Box<dyn TcpListener>>,
    /// Open ICE-TCP connections.
    conns: std::collections::BTreeMap<ConnId, Conn>,
    next_conn: u64,
    /// Where the round-robin read of the connections starts.
    tcp_next: ConnId,
    /// [`ServerConfig::tcp_queue_bytes`].
    tcp_queue_bytes: usize,
    /// Where the answers of requests waiting for the authorisation callback go.
    responders: HashMap<RequestId, chan::Sender<Reply>>,
    /// Decisions of the authorisation server, from the blocking tasks that asked it.
    decisions: (chan::Sender<Decided>, chan::Receiver<Decided>),
    /// The authorisation server ([`AuthSettings::http_url`](crate::app::AuthSettings::http_url)).
    auth_url: Option<crate::auth::HttpUrl>,
    auth_secret: Option<crate::webhook::WebhookSecret>,
    auth_timeout: Duration,
    /// JWT keys fetched again from the JWKS URL.
    jwt_keys: Option<chan::Receiver<JwtKeys>>,
    /// Asks the JWKS fetcher for a fetch now ([`Output::RefreshJwtKeys`]).
    jwks_ask: Option<std::sync::mpsc::Sender<()>>,
}

/// An ICE-TCP connection: its socket and what waits to be written to it.
struct Conn {
    stream: Box<dyn TcpStream>,
    queue: SendQueue,
    /// A read or write failed, or the peer closed: reported to the core next.
    gone: bool,
}

/// How many ephemeral ports [`Engine::start`] tries for a UDP socket whose port is free for TCP.
const EPHEMERAL_PAIR_TRIES: usize = 16;

/// Binds shard `index`'s ICE-TCP listener as `mode` says, next to its viewer socket at `udp`.
fn bind_tcp<R: Runtime>(
    runtime: &R,
    mode: TcpListen,
    udp: SocketAddr,
    index: usize,
) -> io::Result<Option<Box<dyn TcpListener>>> {
    match mode {
        TcpListen::Off => Ok(None),
        TcpListen::SameAsUdp => match runtime.bind_tcp(udp) {
            Ok(l) => Ok(Some(l)),
            Err(e) => {
                warn!(%udp, error = %e, "no ICE-TCP listener next to the viewer socket; viewers need UDP");
                Ok(None)
            }
        },
        TcpListen::At(mut addr) => {
            if addr.port() != 0 {
                let port = u16::try_from(usize::from(addr.port()) + index).map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidInput, "shard ports beyond 65535")
                })?;
                addr.set_port(port);
            }
            runtime.bind_tcp(addr).map(Some)
        }
    }
}

enum Wake {
    Job(Option<Job>),
    Auth(RequestId, AuthDecision),
    JwtKeys(JwtKeys),
    Exit(Exited),
    Ingest(u16, Received),
    Mirror(Mirror),
    Demand(StreamId),
    Datagram(Received),
    Timer,
    Accept(Box<dyn TcpStream>, SocketAddr),
    TcpRead(ConnId, usize),
    TcpGone(ConnId),
}

impl<R: Runtime> Driver<R> {
    fn begin_shutdown(&mut self) {
        if self.shutdown_at.is_none() {
            info!("shutting down: closing viewers, stopping streams");
            let now = self.runtime.now();
            self.shutdown_at = Some(now);
            self.core.shutdown(now);
        }
    }

    async fn run(mut self, jobs: chan::Receiver<Job>, shutdown_timeout: Duration, done: SetOnDrop) {
        let mut buf = vec![0u8; RECV_BUFFER];
        let mut jobs_open = true;
        let mut timer = self.runtime.timer();
        let mut load = LoadMeter::new(self.runtime.now());
        let mut ready_in_a_row = 0u32;
        loop {
            self.flush().await;
            if !self.ingest_arrivals.is_empty() {
                let sent = self.runtime.now();
                for arrived in self.ingest_arrivals.drain(..) {
                    self.core.record_egress_latency(sent.saturating_duration_since(arrived));
                }
            }
            if let Some(started) = self.shutdown_at {
                if self.core.is_idle() {
                    break;
                }
                if self.runtime.now().saturating_duration_since(started) >= shutdown_timeout {
                    warn!("shutdown timed out; killing what is left");
                    break;
                }
            }
            let next = self.core.poll_timeout().map(|(at, _)| at);
            // While shutting down, re-check the idle condition regularly.
            let next = match self.shutdown_at {
                Some(_) => {
                    let recheck = self.runtime.now() + Duration::from_millis(100);
                    Some(next.map_or(recheck, |t| t.min(recheck)))
                }
                None => next,
            };
            if let Some(at) = next {
                timer.reset(at);
            }
            load.waiting(self.runtime.now());
            let mut polls = 0u32;
            let wake = poll_fn(|cx| {
                polls += 1;
                self.poll_wake(cx, &jobs, jobs_open, &mut timer, next, &mut buf)
            })
            .await;
            ready_in_a_row = if polls == 1 { ready_in_a_row + 1 } else { 0 };
            if ready_in_a_row >= YIELD_EVERY {
                // Busy without a pause: let the HTTP tasks of a single-threaded executor run.
                ready_in_a_row = 0;
                yield_now().await;
            }
            if let Some(share) = load.woke(self.runtime.now()) {
                self.core.set_load(share);
            }
            match wake {
                Wake::Job(Some(job)) => {
                    let mut ctx = JobCtx::default();
                    let started = self.runtime.now();
                    job(&mut self.core, &self.routes, started, &mut ctx);
                    if let Some((id, tx)) = ctx.parked {
                        self.responders.insert(id, tx);
                    }
                    if let Some(id) = ctx.cancelled {
                        self.responders.remove(&id);
                    }
                    // Answering requests is not forwarding load: a burst of setups (bounded by
                    // the rate limits) must not close admission by itself.
                    load.exclude(self.runtime.now().saturating_duration_since(started));
                    if ctx.shutdown {
                        self.begin_shutdown();
                    }
                }
                Wake::Job(None) => {
                    // Every handle is gone.
                    jobs_open = false;
                    self.begin_shutdown();
                }
                Wake::Auth(id, decision) => {
                    self.core.handle_auth(id, decision, self.runtime.now());
                }
                Wake::JwtKeys(keys) => self.core.set_jwt_keys(keys, self.runtime.now()),
                Wake::Exit(exit) => {
                    self.procs.remove(&(exit.stream.clone(), exit.generation));
                    let input = Input::ProcessExited {
                        stream: exit.stream,
                        generation: exit.generation,
                        code: exit.code,
                    };
                    self.core.handle_input(input, self.runtime.now());
                }
                Wake::Ingest(port, received) => {
                    self.on_ingest(port, received, &buf);
                    // The rest of a frame is usually queued already: take it too, so that its
                    // copies for each viewer can leave in one segmented send.
                    let mut noop = Context::from_waker(Waker::noop());
                    for _ in 1..RECV_BATCH {
                        let Some((port, received)) = self.poll_ingest(&mut noop, &mut buf) else {
                            break;
                        };
                        self.on_ingest(port, received, &buf);
                    }
                }
                Wake::Mirror(m) => {
                    self.on_mirror(m);
                    let mut noop = Context::from_waker(Waker::noop());
                    for _ in 1..RECV_BATCH {
                        let Some(rx) = &self.leader else { break };
                        let Poll::Ready(Some(m)) = rx.poll_recv(&mut noop) else { break };
                        self.on_mirror(m);
                    }
                }
                Wake::Demand(stream) => self.core.demand(&stream, self.runtime.now()),
                Wake::Datagram(received) => {
                    self.on_datagrams(received, &buf);
                    // Drain what else is queued before executing outputs, bounded so that timers
                    // and requests are not starved. The no-op waker is replaced by the next
                    // `poll_wake`, which polls this socket again with the task's waker.
                    let mut noop = Context::from_waker(Waker::noop());
                    for _ in 1..RECV_BATCH {
                        match self.socket.poll_recv(&mut noop, &mut buf) {
                            Poll::Ready(Ok(received)) => self.on_datagrams(received, &buf),
                            _ => break,
                        }
                    }
                }
                Wake::Timer => self.core.handle_timeout(self.runtime.now()),
                Wake::Accept(stream, peer) => {
                    self.next_conn += 1;
                    let conn = ConnId(self.next_conn);
                    let local = stream.local_addr().unwrap_or(self.local);
                    let queue = SendQueue::new(self.tcp_queue_bytes);
                    self.conns.insert(conn, Conn { stream, queue, gone: false });
                    debug!(%conn, %peer, %local, "ICE-TCP connection accepted");
                    self.core
                        .handle_input(Input::TcpOpened { conn, peer, local }, self.runtime.now());
                }
                Wake::TcpRead(conn, n) => {
                    let contents = &buf[..n];
                    self.core.handle_input(Input::TcpData { conn, contents }, self.runtime.now());
                }
                Wake::TcpGone(conn) => {
                    self.conns.remove(&conn);
                    self.core.handle_input(Input::TcpClosed { conn }, self.runtime.now());
                }
            }
        }
        // Whatever is still alive after the timeout is killed; dropping the sockets closes them.
        for ((stream, _), pid) in self.procs.drain() {
            warn!(%stream, pid, "killing FFmpeg left after shutdown");
            self.runtime.signal(pid, true);
        }
        self.ingest.clear();
        lock(&self.subscribers).clear();
        drop(done);
        info!("engine stopped");
    }

    /// Polls every source once: jobs and process exits first (rare, and a job may be an HTTP
    /// request waiting for its answer), then ingest, viewer socket and timer, starting with a
    /// different one on each call. Strict priority would let a saturating ingest starve the
    /// viewer socket (consent checks: viewers time out) and the timer (str0m's retransmissions
    /// and keepalives).
    fn poll_wake(
        &mut self,
        cx: &mut Context<'_>,
        jobs: &chan::Receiver<Job>,
        jobs_open: bool,
        timer: &mut R::Timer,
        deadline: Option<Instant>,
        buf: &mut [u8],
    ) -> Poll<Wake> {
        if jobs_open && let Poll::Ready(job) = jobs.poll_recv(cx) {
            return Poll::Ready(Wake::Job(job));
        }
        if let Poll::Ready(Some(exit)) = self.exits.1.poll_recv(cx) {
            return Poll::Ready(Wake::Exit(exit));
        }
        // Closed (every follower gone) is `Ready(None)`, ignored: it registers no waker.
        if let Some(rx) = &self.demands
            && let Poll::Ready(Some(stream)) = rx.poll_recv(cx)
        {
            return Poll::Ready(Wake::Demand(stream));
        }
        if let Poll::Ready(Some((id, decision))) = self.decisions.1.poll_recv(cx) {
            return Poll::Ready(Wake::Auth(id, decision));
        }
        if let Some(rx) = &self.jwt_keys
            && let Poll::Ready(Some(keys)) = rx.poll_recv(cx)
        {
            return Poll::Ready(Wake::JwtKeys(keys));
        }
        if let Some(gone) = self.poll_tcp_writes(cx) {
            return Poll::Ready(Wake::TcpGone(gone));
        }
        let first = self.turn;
        self.turn = (self.turn + 1) % 4;
        for i in 0..4 {
            let wake = match (first + i) % 4 {
                3 => self.poll_tcp(cx, buf),
                0 => match &self.leader {
                    Some(rx) => match rx.poll_recv(cx) {
                        Poll::Ready(Some(m)) => Some(Wake::Mirror(m)),
                        _ => None,
                    },
                    None => self.poll_ingest(cx, buf).map(|(port, r)| Wake::Ingest(port, r)),
                },
                1 => match self.socket.poll_recv(cx, buf) {
                    Poll::Ready(Ok(received)) => Some(Wake::Datagram(received)),
                    Poll::Ready(Err(e)) => {
                        debug!(error = %e, "viewer socket receive error");
                        cx.waker().wake_by_ref();
                        None
                    }
                    Poll::Pending => None,
                },
                // Due by the clock even if the runtime's timer has not fired yet: a busy loop
                // may not give the timer driver a turn.
                _ => deadline
                    .filter(|&at| timer.poll_fired(cx).is_ready() || self.runtime.now() >= at)
                    .map(|_| Wake::Timer),
            };
            if let Some(wake) = wake {
                return Poll::Ready(wake);
            }
        }
        Poll::Pending
    }

    /// Writes what every ICE-TCP connection has queued, as far as its socket takes it without
    /// blocking (a connection that takes nothing registers the task for writability); returns
    /// a connection that failed.
    fn poll_tcp_writes(&mut self, cx: &mut Context<'_>) -> Option<ConnId> {
        let mut failed = None;
        for (id, c) in &mut self.conns {
            if c.gone {
                failed = Some(*id);
                continue;
            }
            while !c.queue.is_empty() {
                match c.stream.poll_write(cx, c.queue.front()) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        c.gone = true;
                        failed = Some(*id);
                        break;
                    }
                    Poll::Ready(Ok(n)) => c.queue.advance(n),
                    Poll::Pending => break,
                }
            }
        }
        failed
    }

    /// Accepts an ICE-TCP connection, or reads one connection's bytes into `buf`
    /// (round-robin).
    fn poll_tcp(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Option<Wake> {
        if let Some(l) = &self.tcp {
            match l.poll_accept(cx) {
                Poll::Ready(Ok((stream, peer))) => return Some(Wake::Accept(stream, peer)),
                Poll::Ready(Err(e)) => {
                    debug!(error = %e, "ICE-TCP accept failed");
                    cx.waker().wake_by_ref();
                }
                Poll::Pending => {}
            }
        }
        let start = self.tcp_next;
        let order = self.conns.range(start..).chain(self.conns.range(..start));
        for (id, c) in order {
            if c.gone {
                continue;
            }
            match c.stream.poll_read(cx, buf) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Some(Wake::TcpGone(*id)),
                Poll::Ready(Ok(n)) => {
                    self.tcp_next = ConnId(id.0 + 1);
                    return Some(Wake::TcpRead(*id, n));
                }
                Poll::Pending => {}
            }
        }
        None
    }

    /// Queues a frame for an ICE-TCP connection; a frame its full queue drops is reported.
    fn queue_tcp(&mut self, conn: ConnId, frame: Vec<u8>) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if !c.queue.push(frame) {
            let (frames, _) = c.queue.take_dropped();
            self.core.handle_input(Input::TcpDropped { conn, frames }, self.runtime.now());
        }
    }

    /// Polls the ingest sockets once each, round-robin; the first ready one's packets are in
    /// `buf`.
    fn poll_ingest(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Option<(u16, Received)> {
        let n = self.ingest.len();
        for i in 0..n {
            let idx = (self.ingest_next + i) % n;
            let (port, _, socket) = &self.ingest[idx];
            match socket.poll_recv(cx, buf) {
                Poll::Ready(Ok(received)) => {
                    self.ingest_next = idx + 1;
                    return Some((*port, received));
                }
                // An error on a loopback UDP socket (e.g. a queued ICMP report) is not fatal.
                Poll::Ready(Err(e)) => {
                    debug!(port, error = %e, "ingest receive error");
                    cx.waker().wake_by_ref();
                }
                Poll::Pending => {}
            }
        }
        None
    }

    fn on_mirror(&mut self, m: Mirror) {
        let now = self.runtime.now();
        if let Mirror::Packet(p) = &m {
            // From the leader's read: the hop between shards is part of the latency.
            self.ingest_arrivals.push(p.read_at());
        }
        self.core.mirror(m, now);
    }

    /// Hands the core what one ingest receive returned, timed from its arrival.
    fn on_ingest(&mut self, port: u16, received: Received, buf: &[u8]) {
        let now = self.runtime.now();
        let arrived = received.age.and_then(|age| now.checked_sub(age)).unwrap_or(now);
        for contents in received.datagrams(buf) {
            self.ingest_arrivals.push(arrived);
            let input =
                Input::Ingest { port, source: received.from, contents, arrived: Some(arrived) };
            self.core.handle_input(input, now);
        }
    }

    fn on_datagrams(&mut self, received: Received, buf: &[u8]) {
        // A dual-stack socket reports IPv4 viewers IPv4-mapped: the core's form is plain IPv4.
        let source = whep_core::canonical_addr(received.from);
        let destination = self.core.config().candidate_for(source).unwrap_or(self.local);
        let now = self.runtime.now();
        for contents in received.datagrams(buf) {
            self.core.handle_input(Input::Datagram { source, destination, contents }, now);
        }
    }

    /// Sends the gathered datagrams in the order the core produced them, each run to one
    /// destination of equal size (the last may be shorter) in one segmented send.
    async fn send_gathered(&mut self) {
        if self.sends.is_empty() {
            return;
        }
        // The core hands out each viewer's copies of a batch together (it drains one viewer at
        // a time), so runs need no sorting by destination.
        let max = if self.gso { self.socket.max_segments().max(1) } else { 1 };
        // Copies of the ingest packets handled since the last flush are timed from the first
        // one's arrival (datagrams of other kinds sent with them, RTCP and STUN, are too few
        // to matter).
        let arrived = self.ingest_arrivals.iter().min().copied();
        let mut i = 0;
        while i < self.sends.len() {
            let first = &self.sends[i];
            let (size, destination) = (first.contents.len(), first.destination);
            let mut end = i + 1;
            let mut bytes = size;
            while end < self.sends.len() && end - i < max {
                let next = &self.sends[end];
                let len = next.contents.len();
                if next.destination != destination || len > size || bytes + len > MAX_GSO_BYTES {
                    break;
                }
                end += 1;
                bytes += len;
                if len < size {
                    break; // a shorter datagram ends a segmented send
                }
            }
            let socket = &self.socket;
            let destination = crate::os::for_socket(destination, self.local);
            let sent = if end - i == 1 {
                let contents = &self.sends[i].contents;
                poll_fn(|cx| socket.poll_send_to(cx, contents, destination)).await.map(|_| ())
            } else {
                self.segments.clear();
                for t in &self.sends[i..end] {
                    self.segments.extend_from_slice(&t.contents);
                }
                let segments = &self.segments;
                poll_fn(|cx| socket.poll_send_segments(cx, segments, size, destination)).await
            };
            if let Err(e) = sent {
                debug!(%destination, datagrams = end - i, error = %e, "send failed");
            }
            if let Some(arrived) = arrived {
                let latency = self.runtime.now().saturating_duration_since(arrived);
                self.core.record_copy_latency(latency, (end - i) as u64);
            }
            i = end;
        }
        self.sends.clear();
    }

    /// Executes outputs until the core has none left. Datagrams are gathered and sent in a
    /// batch before any other output and at the end.
    async fn flush(&mut self) {
        while let Some(output) = self.core.poll_output() {
            let output = match output {
                Output::Transmit(t) if t.transport != Transport::Udp => {
                    if let Transport::Tcp(conn) = t.transport {
                        self.queue_tcp(conn, t.contents);
                    }
                    continue;
                }
                Output::Transmit(t) => {
                    // The core hands a batch out a few viewers at a time: send what is
                    // gathered once it is a chunk, at a change of viewer, so the first
                    // viewers' copies leave while the core writes the next ones'.
                    if self.sends.len() >= SEND_CHUNK
                        && self.sends.last().is_some_and(|l| l.destination != t.destination)
                    {
                        self.send_gathered().await;
                    }
                    self.sends.push(t);
                    continue;
                }
                Output::Demand { stream } => {
                    if let Some(tx) = &self.to_leader {
                        // A leader that is gone (shut down) needs nothing more.
                        let _ = tx.send(stream);
                    }
                    continue;
                }
                Output::Mirror(m) => {
                    // Not ordered with datagrams: no need to send what is gathered first.
                    let mut dropped = 0;
                    if let Some((last, rest)) = self.followers.split_last_mut() {
                        for f in rest {
                            dropped += u64::from(!f.push(m.clone()));
                        }
                        dropped += u64::from(!last.push(m));
                    }
                    if dropped > 0 {
                        self.core.record_mirror_drops(dropped);
                    }
                    continue;
                }
                other => other,
            };
            self.send_gathered().await;
            match output {
                Output::Transmit(_) | Output::Mirror(_) | Output::Demand { .. } => {}
                Output::CloseTcp { conn } => {
                    if let Some(c) = self.conns.remove(&conn) {
                        // What is queued (a DTLS close_notify) goes if the socket takes it now.
                        let mut noop = Context::from_waker(Waker::noop());
                        let front = c.queue.front();
                        if !front.is_empty() {
                            let _ = c.stream.poll_write(&mut noop, front);
                        }
                        debug!(%conn, "ICE-TCP connection closed");
                    }
                    self.core.handle_input(Input::TcpClosed { conn }, self.runtime.now());
                }
                Output::BindIngest { stream, ports, renditions } => {
                    self.bind_ingest(stream, ports, renditions);
                }
                Output::ReleaseIngest { stream, ports } => {
                    debug!(%stream, video = ports.video, "ingest ports released");
                    self.ingest.retain(|(_, p, _)| *p != ports);
                }
                Output::SpawnProcess { stream, generation, program, args } => {
                    let exit = ProcessExit {
                        stream: stream.clone(),
                        generation,
                        tx: self.exits.0.clone(),
                    };
                    let input = match self.runtime.spawn_process(&stream, &program, &args, exit) {
                        Ok(pid) => {
                            self.procs.insert((stream.clone(), generation), pid);
                            Input::ProcessSpawned { stream, generation, pid }
                        }
                        Err(error) => Input::SpawnFailed { stream, generation, error },
                    };
                    self.core.handle_input(input, self.runtime.now());
                }
                Output::StopProcess { stream, generation } => {
                    if let Some(pid) = self.procs.get(&(stream, generation)) {
                        self.runtime.signal(*pid, false);
                    }
                }
                Output::KillProcess { stream, generation } => {
                    if let Some(pid) = self.procs.get(&(stream, generation)) {
                        self.runtime.signal(*pid, true);
                    }
                }
                Output::Authorize(req) => {
                    let tx = self.decisions.0.clone();
                    match &self.auth_url {
                        Some(url) => {
                            let url = url.clone();
                            let secret = self.auth_secret.clone();
                            let timeout = self.auth_timeout;
                            self.runtime.spawn_blocking(Box::new(move || {
                                let decision =
                                    crate::auth::ask(&url, &req, timeout, secret.as_ref());
                                let _ = tx.send((req.id, decision));
                            }));
                        }
                        None => {
                            let why = "no authorisation server configured".to_owned();
                            self.core.handle_auth(
                                req.id,
                                AuthDecision::Error(why),
                                self.runtime.now(),
                            );
                        }
                    }
                }
                // Without a fetcher the core is configured not to ask (see `start`).
                Output::RefreshJwtKeys => {
                    if let Some(ask) = &self.jwks_ask {
                        let _ = ask.send(());
                    }
                }
                Output::Respond { id, response } => {
                    if let Some(tx) = self.responders.remove(&id) {
                        let _ = tx.send(Reply::Ready(response));
                    }
                }
                Output::Event(event) => {
                    // The core logs every event itself; subscribers get them here. Followers'
                    // stream events repeat the leader's.
                    let viewer_event = matches!(
                        event,
                        Event::ViewerJoined { .. }
                            | Event::ViewerConnected { .. }
                            | Event::ViewerLeft { .. }
                            | Event::KeyframeRequested { .. }
                    );
                    if self.index != 0 && !viewer_event {
                        continue;
                    }
                    if let Some(hook) = &self.routes.webhook {
                        hook.send(&event);
                    }
                    let mut subs = lock(&self.subscribers);
                    subs.retain(|s| s.send(event.clone()).is_ok());
                }
            }
        }
        self.send_gathered().await;
        // TCP frames leave now, as far as the sockets take them; the rest when writable.
        let mut noop = Context::from_waker(Waker::noop());
        let _ = self.poll_tcp_writes(&mut noop);
    }

    fn bind_ingest(&mut self, stream: StreamId, ports: PortPair, renditions: u8) {
        let bind = |port: u16| self.runtime.bind_udp(SocketAddr::from(([127, 0, 0, 1], port)));
        let bound: io::Result<Vec<_>> =
            ports.ingest(renditions).map(|p| bind(p).map(|s| (p, ports, s))).collect();
        let input = match bound {
            Ok(sockets) => {
                self.ingest.extend(sockets);
                Input::IngestBound { stream, ports }
            }
            Err(e) => Input::BindFailed { stream, ports, error: e.to_string() },
        };
        self.core.handle_input(input, self.runtime.now());
    }
}
