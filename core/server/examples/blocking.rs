//! `whepd` with no async runtime: [`whep_core::Core`] driven by a plain blocking loop over std
//! sockets and std threads. It is the proof that the core is sans-IO, and a template for
//! driving it from an event loop of your own.
//!
//! ```sh
//! cargo run -p whep-server --example blocking -- --help   # same flags as whepd
//! ```
//!
//! # Design
//!
//! The main thread owns the [`Core`] and is the only thread that touches it. Every other thread
//! does one kind of blocking IO and turns what happened into a `Msg` on one `std::sync::mpsc`
//! channel:
//!
//! | thread | blocks in | sends |
//! |---|---|---|
//! | `signals` | `sigwait` for SIGTERM and SIGINT | `Msg::Shutdown` |
//! | `viewer-udp` | `recv_from` on a clone of the viewer socket | `Msg::Datagram` |
//! | `ingest-PORT`, two per started stream | `recv`, waking every 100 ms to check a stop flag | `Msg::Ingest` |
//! | `http-accept`, and `http` per connection | `accept`; reading one HTTP/1.1 request; waiting for its answer, checking that the client is still there | `Msg::Http` with a reply channel; `Msg::HttpGone` when the client left first |
//! | `ffmpeg-wait` and `ffmpeg-log` per process | `wait()`; reading its stderr | `Msg::Exited`; log lines |
//! | `ice-tcp-accept`, and `ice-tcp-read` per connection | `accept` on the ICE-TCP listener; `read` | `Msg::TcpOpened`, `Msg::TcpData`, `Msg::TcpClosed` |
//! | `ice-tcp-write` per connection | waiting for its queue, `write` | nothing: the main loop only fills the queue, so a viewer that reads slowly blocks only this thread, and loses frames |
//!
//! The main loop (`Runtime::run`) sleeps in `recv_timeout` until a message arrives or the
//! core's next deadline ([`Core::poll_timeout`]) passes, feeds the message or the timeout to
//! the core, then executes every [`Output`] in order (`Runtime::flush`): datagrams go out on
//! the original viewer socket, ingest sockets are bound or released, processes spawned or
//! signalled, and what that yields (bound, spawned, failed) goes straight back into the core.
//! No locks anywhere: all shared state is in the core, on one thread.
//!
//! Shutdown: SIGTERM and SIGINT are blocked before the first thread starts, so every thread
//! inherits the mask and the signals wait until the `signals` thread takes them. Then
//! [`Core::shutdown`] closes every viewer and stops every FFmpeg, and the loop runs on until
//! [`Core::is_idle`]; after 10 s (or a second signal) what is left gets SIGKILL. FFmpeg also
//! gets SIGKILL when this process dies (`PR_SET_PDEATHSIG`; the main thread spawns them all).
//!
//! HTTP is the subset browsers, curl and WHEP clients need: keep-alive connections whose
//! requests (pipelined or not) are answered in order, `Content-Length` bodies only (a transfer
//! coding gets 501, conflicting lengths 400, and the connection is closed after either). The
//! end-to-end suite (`tests/`) runs this very file as its `whepd-blocking` binary.

// clippy.toml forbids clocks and sleeping in the server shell, whose loop takes time from its
// runtime; this example is a runtime, and reading the clock on the shell's behalf is its job.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{SigSet, Signal};
use tracing::{debug, error, info, warn};
use whep_core::auth::JwtKeys;
use whep_core::tcp::{ConnId, SendQueue};
use whep_core::whep::{Method, StatusCode};
use whep_core::{
    AuthDecision, Core, Input, Output, PortPair, RequestId, StreamId, Transport, WhepRequest,
    WhepResponse,
};
use whep_server::app::{Reply, RoutesConfig, TcpListen};
use whep_server::cli::{self, CliError, Launch};

/// Largest datagram read; a longer one is truncated and then dropped by the core as malformed.
const MAX_DATAGRAM: usize = 2048;
/// Messages queued for the main loop before the readers hold back.
const QUEUE: usize = 4096;
/// How often an idle ingest reader checks its stop flag.
const INGEST_POLL: Duration = Duration::from_millis(100);
/// How long a request may take to arrive (head and body), and an idle keep-alive connection
/// may wait for its next request; also the write timeout.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing connection's leftover input is read (and discarded) after the answer.
const LINGER: Duration = Duration::from_secs(2);
/// Longest request head (request line and headers).
const MAX_HEAD: usize = 64 * 1024;
/// HTTP connections served at once; more are answered 503 at once.
const MAX_CONNECTIONS: usize = 256;
/// How long a clean shutdown may take before what is left is killed.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything the IO threads tell the main loop.
enum Msg {
    /// A parsed HTTP request; the response goes back on `reply`. `ticket` names it for
    /// `HttpGone`.
    Http { req: WhepRequest, reply: Sender<Reply>, ticket: u64 },
    /// The client of the request `ticket` closed its connection before the answer.
    HttpGone { ticket: u64 },
    /// A datagram on the viewer socket.
    Datagram { source: SocketAddr, contents: Vec<u8> },
    /// A datagram on an ingest socket; `epoch` tells a released socket's leftovers apart.
    Ingest { port: u16, epoch: u64, source: SocketAddr, contents: Vec<u8>, read: Instant },
    /// A spawned process exited (`code` is `None` when a signal killed it).
    Exited { stream: StreamId, generation: u64, code: Option<i32> },
    /// SIGTERM or SIGINT.
    Shutdown(Signal),
    /// An ICE-TCP connection was accepted; `stream` is a clone for its writer.
    TcpOpened { conn: ConnId, peer: SocketAddr, local: SocketAddr, stream: TcpStream },
    /// Bytes read from an ICE-TCP connection.
    TcpData { conn: ConnId, contents: Vec<u8> },
    /// An ICE-TCP connection ended.
    TcpClosed { conn: ConnId },
    /// The authorisation server's decision on a pending request.
    Auth { id: RequestId, decision: AuthDecision },
    /// JWT keys fetched again from the JWKS URL.
    JwtKeys(JwtKeys),
}

fn main() -> ExitCode {
    cli::init_logging();
    let launch = match cli::parse(std::env::args_os(), |p| std::fs::read_to_string(p)) {
        Ok(s) => s,
        Err(CliError::Clap(e)) => e.exit(),
        Err(CliError::Invalid(e)) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) =
        whep_server::check_program(&launch.server.core.process.program, !launch.streams.is_empty())
    {
        error!("{e}");
        return ExitCode::FAILURE;
    }
    whep_server::warn_ingest_overlap(&launch.server.core.ingest_ports);
    // Before any thread exists, so that all of them inherit the mask and only the `signals`
    // thread's sigwait takes these signals. Children inherit it too; `whep_server::command` clears it.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    if let Err(e) = signals.thread_block() {
        error!("cannot block SIGTERM and SIGINT: {e}");
        return ExitCode::FAILURE;
    }
    match run(launch, signals) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run(launch: Launch, signals: SigSet) -> Result<(), String> {
    if launch.server.shards > 1 {
        return Err(
            "whepd-blocking runs one loop: --shards needs whepd (tokio) or whepd-smol".into()
        );
    }
    if launch.tls.is_some() {
        return Err(
            "whepd-blocking serves plain HTTP: --tls-cert needs whepd (tokio) or whepd-smol".into(),
        );
    }
    let mut config = launch.server.core;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut config.rng_seed))
        .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
    // `[::]` is dual-stack (IPv4 too), or IPv4 alone on a host without IPv6.
    let (socket, local) = whep_server::os::bind_udp(launch.server.udp_bind)
        .and_then(|s| s.local_addr().map(|a| (s, a)))
        .map_err(|e| {
            format!("cannot bind the WebRTC UDP socket {}: {e}", launch.server.udp_bind)
        })?;
    if config.host_candidates.is_empty() {
        config.host_candidates = default_candidates(local);
    }
    let ice_tcp = match launch.server.tcp {
        TcpListen::Off => None,
        TcpListen::SameAsUdp => whep_server::os::bind_tcp(local)
            .inspect_err(|e| warn!(%local, error = %e, "no ICE-TCP listener; viewers need UDP"))
            .ok(),
        TcpListen::At(addr) => Some(
            whep_server::os::bind_tcp(addr)
                .map_err(|e| format!("cannot bind the ICE-TCP listener {addr}: {e}"))?,
        ),
    };
    if let Some(port) = ice_tcp.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.port()) {
        config.tcp_candidates =
            config.host_candidates.iter().map(|c| SocketAddr::new(c.ip(), port)).collect();
    }
    info!(udp = %local, candidates = ?config.host_candidates, tcp_candidates = ?config.tcp_candidates, "viewer socket bound");
    let (listener, http) = whep_server::os::bind_tcp(launch.http)
        .and_then(|l| l.local_addr().map(|a| (l, a)))
        .map_err(|e| format!("cannot listen on {}: {e}", launch.http))?;

    let (tx, rx) = mpsc::sync_channel(QUEUE);
    let signal_tx = tx.clone();
    spawn("signals", move || {
        // Keeps listening: a second signal cuts the shutdown short.
        while let Ok(sig) = signals.wait() {
            if signal_tx.send(Msg::Shutdown(sig)).is_err() {
                return;
            }
        }
        error!("sigwait failed; signals no longer stop the server");
    })?;
    let reader = socket.try_clone().map_err(|e| format!("cannot clone the UDP socket: {e}"))?;
    let datagram_tx = tx.clone();
    spawn("viewer-udp", move || read_viewer_socket(&reader, &datagram_tx))?;
    let (http_tx, max_body) = (tx.clone(), config.max_body_bytes);
    spawn("http-accept", move || accept_loop(&listener, max_body, &http_tx))?;
    if let Some(l) = ice_tcp {
        let tcp_tx = tx.clone();
        spawn("ice-tcp-accept", move || accept_ice_tcp(&l, &tcp_tx))?;
    }

    let mut core = Core::new(config, Instant::now());
    // The lines people and scripts starting whepd look for. `writeln!`, not `println!`: a
    // closed stdout is worth no panic.
    let _ = writeln!(io::stdout(), "{}", cli::listening_line(http, local));
    for (name, spec) in launch.streams {
        let fail = |e: &dyn std::fmt::Display| format!("stream {name:?}: {e}");
        let id = StreamId::new(name.as_str()).ok_or_else(|| fail(&"invalid id"))?;
        core.add_stream(id.clone(), spec.to_config().map_err(|e| fail(&e))?)
            .map_err(|e| fail(&e))?;
        if spec.autostart() {
            core.start_stream(&id, Instant::now()).map_err(|e| fail(&e))?;
        }
        info!(stream = %name, url = %cli::player_url(http, &name), "stream added");
        let _ = writeln!(io::stdout(), "{}", cli::watch_line(http, &name));
    }
    let mut routes = launch.server.routes;
    routes.start_webhook()?;
    let mut runtime = Runtime {
        core,
        routes,
        socket,
        local,
        tx,
        ingest: HashMap::new(),
        blocks: HashMap::new(),
        epoch: 0,
        procs: HashMap::new(),
        shutdown_deadline: None,
        drain: launch.server.drain_timeout,
        drain_until: None,
        ingest_read: None,
        http_time: Duration::ZERO,
        conns: HashMap::new(),
        tcp_queue_bytes: launch.server.tcp_queue_bytes,
        waiting: HashMap::new(),
        auth_url: launch.server.auth.http_url.clone(),
        auth_secret: launch.server.auth.http_secret.clone(),
        jwks_ask: None,
    };
    if let Some(sources) = launch.server.auth.jwt.filter(|j| j.jwks_url.is_some()) {
        let tx = runtime.tx.clone();
        let (ask, asks) = mpsc::channel();
        runtime.jwks_ask = Some(ask);
        // Runs as long as the process.
        spawn("jwks", move || {
            let deliver = |keys| drop(tx.send(Msg::JwtKeys(keys)));
            whep_server::auth::fetch_jwks_forever(&sources, deliver, &asks, || true);
        })?;
    }
    runtime.run(&rx);
    Ok(())
}

/// The main thread's state: the core, and handles of the IO it ordered.
struct Runtime {
    core: Core,
    routes: RoutesConfig,
    /// The viewer socket; the `viewer-udp` thread reads a clone.
    socket: UdpSocket,
    local: SocketAddr,
    /// Cloned into the threads the loop starts (ingest readers, process waiters).
    tx: SyncSender<Msg>,
    /// Bound ingest sockets by port.
    ingest: HashMap<u16, IngestReader>,
    /// The ingest ports bound for each pair (the pair and its renditions'), to release.
    blocks: HashMap<PortPair, Vec<u16>>,
    epoch: u64,
    /// Running processes' pids by (stream, generation).
    procs: HashMap<(StreamId, u64), u32>,
    /// Set by the first signal: when to give up waiting for a clean shutdown.
    shutdown_deadline: Option<Instant>,
    /// `--drain-secs`: how long the first signal drains before the shutdown.
    drain: Duration,
    /// While draining: when the drain ends at the latest.
    drain_until: Option<Instant>,
    /// When the ingest packet being handled was read, for the egress latency metrics.
    ingest_read: Option<Instant>,
    /// Time spent answering HTTP requests in the current load interval.
    http_time: Duration,
    /// Open ICE-TCP connections: the queue their writer thread takes from, and the socket
    /// (to shut down on close).
    conns: HashMap<ConnId, (Arc<TcpOut>, TcpStream)>,
    tcp_queue_bytes: usize,
    /// Requests waiting for the authorisation callback or for JWT keys: their ticket, and where
    /// their answer goes.
    waiting: HashMap<RequestId, (u64, Sender<Reply>)>,
    /// The authorisation server, if one is configured.
    auth_url: Option<whep_server::auth::HttpUrl>,
    auth_secret: Option<whep_server::webhook::WebhookSecret>,
    /// Asks the JWKS fetcher for a fetch now (`Output::RefreshJwtKeys`).
    jwks_ask: Option<Sender<()>>,
}

/// What the main loop hands an ICE-TCP connection's writer thread.
struct TcpOut {
    state: Mutex<(SendQueue, bool)>,
    ready: Condvar,
}

impl TcpOut {
    fn close(&self) {
        lock(&self.state).1 = true;
        self.ready.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Runtime {
    fn run(&mut self, rx: &Receiver<Msg>) {
        // The share of time spent working rather than waiting, reported to the core every
        // 250 ms for its admission control (`Core::set_load`).
        let (mut load_since, mut busy, mut woke) = (Instant::now(), Duration::ZERO, Instant::now());
        loop {
            // Execute the outputs first: they may feed the core, and so move its timer.
            self.flush();
            if let Some(read) = self.ingest_read.take() {
                self.core.record_egress_latency(read.elapsed());
            }
            let now = Instant::now();
            if let Some(until) = self.drain_until
                && (now >= until || self.core.viewer_count() == 0)
            {
                info!(viewers = self.core.viewer_count(), "drained; closing the viewers left");
                self.drain_until = None;
                self.begin_shutdown(now);
            }
            if let Some(deadline) = self.shutdown_deadline {
                if self.core.is_idle() {
                    info!("shut down cleanly");
                    return;
                }
                if now >= deadline {
                    for ((stream, _), pid) in self.procs.drain() {
                        warn!(%stream, pid, "shutdown cut short; killing FFmpeg");
                        whep_server::signal(pid, true);
                    }
                    return;
                }
            }
            busy += now.saturating_duration_since(woke);
            let timer = self.core.poll_timeout().map(|(at, _)| at);
            let msg =
                match timer.into_iter().chain(self.shutdown_deadline).chain(self.drain_until).min()
                {
                    Some(at) => rx.recv_timeout(at.saturating_duration_since(now)),
                    None => rx.recv().map_err(RecvTimeoutError::from),
                };
            let now = Instant::now();
            woke = now;
            let elapsed = now.saturating_duration_since(load_since);
            if elapsed >= Duration::from_millis(250) {
                let forwarding = busy.saturating_sub(std::mem::take(&mut self.http_time));
                self.core.set_load(forwarding.as_secs_f64() / elapsed.as_secs_f64());
                (load_since, busy) = (now, Duration::ZERO);
            }
            match msg {
                Ok(msg) => self.handle(msg, now),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return, // not while `self.tx` lives
            }
            // Checked after messages too: a steady flow of datagrams must not starve timers.
            if self.core.poll_timeout().is_some_and(|(at, _)| at <= now) {
                self.core.handle_timeout(now);
            }
        }
    }

    fn begin_shutdown(&mut self, now: Instant) {
        self.shutdown_deadline = Some(now + SHUTDOWN_TIMEOUT);
        self.core.shutdown(now);
    }

    fn handle(&mut self, msg: Msg, now: Instant) {
        match msg {
            Msg::Http { req, reply, ticket } => {
                // The player page, /metrics, the admin API, and WHEP via `Core::handle_http`.
                let started = Instant::now();
                let answer =
                    whep_server::app::handle_request(&mut self.core, &self.routes, req, now);
                // Answering requests is not forwarding load (see `Core::set_load`).
                self.http_time += started.elapsed();
                match answer {
                    // Answered by `Output::Respond` once the authorisation server decided.
                    Reply::Pending(id) => drop(self.waiting.insert(id, (ticket, reply))),
                    // A sessions listing is serialised by the connection's thread, not here.
                    // The client may have gone; nothing to do.
                    ready => drop(reply.send(ready)),
                }
            }
            Msg::HttpGone { ticket } => {
                // Its place among `--auth-max-pending` is free at once; a decision that still
                // comes for it is ignored by the core.
                let gone = self.waiting.iter().find(|(_, (t, _))| *t == ticket).map(|(id, _)| *id);
                if let Some(id) = gone {
                    self.waiting.remove(&id);
                    self.core.cancel_request(id);
                }
            }
            Msg::Auth { id, decision } => self.core.handle_auth(id, decision, now),
            Msg::JwtKeys(keys) => self.core.set_jwt_keys(keys, now),
            Msg::Datagram { source, contents } => {
                // A dual-stack socket reports IPv4 viewers IPv4-mapped; the core's form is IPv4.
                let source = whep_core::canonical_addr(source);
                let destination = self.core.config().candidate_for(source).unwrap_or(self.local);
                let input = Input::Datagram { source, destination, contents: &contents };
                self.core.handle_input(input, now);
            }
            Msg::Ingest { port, epoch, source, contents, read } => {
                // Leftovers of a released socket must not reach a stream that re-bound the port.
                if self.ingest.get(&port).is_some_and(|r| r.epoch == epoch) {
                    let arrived = Some(read);
                    let input = Input::Ingest { port, source, contents: &contents, arrived };
                    self.core.handle_input(input, now);
                    self.ingest_read = Some(read);
                }
            }
            Msg::Exited { stream, generation, code } => {
                self.procs.remove(&(stream.clone(), generation));
                self.core.handle_input(Input::ProcessExited { stream, generation, code }, now);
            }
            Msg::Shutdown(sig)
                if self.shutdown_deadline.is_none()
                    && self.drain_until.is_none()
                    && !self.drain.is_zero() =>
            {
                // HTTP goes on meanwhile: sessions answer, `/ready` says draining.
                info!(signal = %sig, secs = self.drain.as_secs(), "draining: no new viewers");
                self.core.set_draining(true);
                self.drain_until = Some(now + self.drain);
            }
            Msg::Shutdown(sig) if self.shutdown_deadline.is_none() => {
                info!(signal = %sig, "shutting down: closing viewers, stopping streams");
                self.drain_until = None;
                self.begin_shutdown(now);
            }
            Msg::Shutdown(sig) => {
                warn!(signal = %sig, "second signal: not waiting for a clean shutdown");
                self.shutdown_deadline = Some(now);
            }
            Msg::TcpOpened { conn, peer, local, stream } => {
                let out = Arc::new(TcpOut {
                    state: Mutex::new((SendQueue::new(self.tcp_queue_bytes), false)),
                    ready: Condvar::new(),
                });
                let writer = (Arc::clone(&out), stream.try_clone());
                match writer {
                    (w, Ok(socket)) => {
                        let name = format!("ice-tcp-write-{}", conn.0);
                        let started = spawn_io(&name, move || write_ice_tcp(&w, socket));
                        if started.is_err() {
                            let _ = stream.shutdown(Shutdown::Both);
                            return;
                        }
                    }
                    (_, Err(_)) => return,
                }
                self.conns.insert(conn, (out, stream));
                self.core.handle_input(Input::TcpOpened { conn, peer, local }, now);
            }
            Msg::TcpData { conn, contents } => {
                self.core.handle_input(Input::TcpData { conn, contents: &contents }, now);
            }
            Msg::TcpClosed { conn } => {
                if let Some((out, _)) = self.conns.remove(&conn) {
                    out.close();
                }
                self.core.handle_input(Input::TcpClosed { conn }, now);
            }
        }
    }

    /// Executes outputs until the core has none left.
    fn flush(&mut self) {
        while let Some(output) = self.core.poll_output() {
            match output {
                Output::Transmit(t) if t.transport != Transport::Udp => {
                    let Transport::Tcp(conn) = t.transport else { continue };
                    let Some((out, _)) = self.conns.get(&conn) else { continue };
                    let dropped = {
                        let mut state = lock(&out.state);
                        if state.0.push(t.contents) { 0 } else { state.0.take_dropped().0 }
                    };
                    out.ready.notify_one();
                    if dropped > 0 {
                        let input = Input::TcpDropped { conn, frames: dropped };
                        self.core.handle_input(input, Instant::now());
                    }
                }
                Output::CloseTcp { conn } => {
                    if let Some((out, stream)) = self.conns.remove(&conn) {
                        out.close();
                        let _ = stream.shutdown(Shutdown::Both);
                    }
                }
                Output::Transmit(t) => {
                    // One socket, so `t.source` (its address as the viewer sees it) is implied.
                    let to = whep_server::os::for_socket(t.destination, self.local);
                    if let Err(e) = self.socket.send_to(&t.contents, to) {
                        debug!(destination = %t.destination, error = %e, "send failed");
                    }
                    if let Some(read) = self.ingest_read {
                        self.core.record_copy_latency(read.elapsed(), 1);
                    }
                }
                Output::BindIngest { stream, ports, renditions } => {
                    let input = match self.bind_ingest(ports, renditions) {
                        Ok(()) => Input::IngestBound { stream, ports },
                        Err(e) => {
                            debug!(%stream, %ports, error = %e, "ingest bind failed");
                            Input::BindFailed { stream, ports, error: e.to_string() }
                        }
                    };
                    self.core.handle_input(input, Instant::now());
                }
                Output::ReleaseIngest { stream, ports } => {
                    debug!(%stream, %ports, "releasing ingest ports");
                    for port in self.blocks.remove(&ports).unwrap_or_default() {
                        if let Some(reader) = self.ingest.remove(&port) {
                            reader.stop();
                        }
                    }
                }
                Output::SpawnProcess { stream, generation, program, args } => {
                    let spawned = spawn_process(&stream, generation, &program, &args, &self.tx);
                    let input = match spawned {
                        Ok(pid) => {
                            self.procs.insert((stream.clone(), generation), pid);
                            Input::ProcessSpawned { stream, generation, pid }
                        }
                        Err(error) => Input::SpawnFailed { stream, generation, error },
                    };
                    self.core.handle_input(input, Instant::now());
                }
                Output::StopProcess { stream, generation } => {
                    if let Some(pid) = self.procs.get(&(stream, generation)) {
                        whep_server::signal(*pid, false);
                    }
                }
                Output::KillProcess { stream, generation } => {
                    if let Some(pid) = self.procs.get(&(stream.clone(), generation)) {
                        warn!(%stream, pid, "FFmpeg did not stop in time; sending SIGKILL");
                        whep_server::signal(*pid, true);
                    }
                }
                // The core logs what matters; an embedding application would act on these.
                Output::Event(event) => {
                    debug!(?event, "event");
                    if let Some(hook) = &self.routes.webhook {
                        hook.send(&event);
                    }
                }
                // Only the shards of a sharded server emit these; this loop is one core.
                Output::Mirror(_) | Output::Demand { .. } => {}
                Output::Authorize(req) => {
                    // A thread per question, bounded by the core's limit on pending requests
                    // (`--auth-max-pending`) and by the exchange's timeouts.
                    let tx = self.tx.clone();
                    let timeout =
                        self.core.config().auth.http.as_ref().map_or(Duration::ZERO, |h| h.timeout);
                    let id = req.id;
                    let secret = self.auth_secret.clone();
                    let started = match self.auth_url.clone() {
                        Some(url) => spawn_io("auth", move || {
                            let decision =
                                whep_server::auth::ask(&url, &req, timeout, secret.as_ref());
                            let _ = tx.send(Msg::Auth { id, decision });
                        })
                        .map_err(|e| e.to_string()),
                        None => Err("no authorisation server configured".into()),
                    };
                    if let Err(e) = started {
                        self.core.handle_auth(id, AuthDecision::Error(e), Instant::now());
                    }
                }
                Output::RefreshJwtKeys => {
                    if let Some(ask) = &self.jwks_ask {
                        let _ = ask.send(());
                    }
                }
                Output::Respond { id, response } => {
                    if let Some((_, reply)) = self.waiting.remove(&id) {
                        let _ = reply.send(Reply::Ready(response));
                    }
                }
            }
        }
    }

    /// Binds both ports of the pair, or neither, with a reader thread on each.
    fn bind_ingest(&mut self, ports: PortPair, renditions: u8) -> io::Result<()> {
        let mut readers = Vec::new();
        for port in ports.ingest(renditions) {
            match self.start_reader(port) {
                Ok(reader) => readers.push((port, reader)),
                Err(e) => {
                    readers.into_iter().for_each(|(_, r)| r.stop());
                    return Err(e);
                }
            }
        }
        self.blocks.insert(ports, readers.iter().map(|(p, _)| *p).collect());
        self.ingest.extend(readers);
        Ok(())
    }

    fn start_reader(&mut self, port: u16) -> io::Result<IngestReader> {
        let socket = UdpSocket::bind(("127.0.0.1", port))?;
        socket.set_read_timeout(Some(INGEST_POLL))?;
        let waker = socket.try_clone()?;
        self.epoch += 1;
        let (epoch, tx) = (self.epoch, self.tx.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = spawn_io(&format!("ingest-{port}"), move || {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while !stopped.load(Ordering::Acquire) {
                match socket.recv_from(&mut buf) {
                    Ok(_) if stopped.load(Ordering::Acquire) => break,
                    // `try_send`: this thread must never block on the main loop, which may be
                    // waiting in `IngestReader::stop` for it to end. A full queue drops the
                    // packet, as a full socket buffer would.
                    Ok((n, source)) => {
                        let (contents, read) = (buf[..n].to_vec(), Instant::now());
                        let msg = Msg::Ingest { port, epoch, source, contents, read };
                        match tx.try_send(msg) {
                            Ok(()) | Err(TrySendError::Full(_)) => {}
                            Err(TrySendError::Disconnected(_)) => break,
                        }
                    }
                    Err(e) => match e.kind() {
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {} // check the flag
                        _ => {
                            debug!(port, error = %e, "ingest receive error");
                            thread::sleep(INGEST_POLL);
                        }
                    },
                }
            }
            // The socket is dropped, and the port free again, when this thread ends.
        })?;
        Ok(IngestReader { epoch, stop, waker, thread })
    }
}

/// One bound ingest socket and the thread reading it.
struct IngestReader {
    epoch: u64,
    stop: Arc<AtomicBool>,
    /// A clone of the socket, only to wake the reader with an empty datagram to itself.
    waker: UdpSocket,
    thread: JoinHandle<()>,
}

impl IngestReader {
    /// Ends the reader and waits for it, so that the port is closed on return: the core may
    /// bind the pair again right away. The wake-up datagram ends the wait at once; should it
    /// be lost, the read timeout does within [`INGEST_POLL`].
    fn stop(self) {
        self.stop.store(true, Ordering::Release);
        if let Ok(addr) = self.waker.local_addr() {
            let _ = self.waker.send_to(&[], addr);
        }
        drop(self.waker);
        if self.thread.join().is_err() {
            warn!("an ingest reader panicked");
        }
    }
}

fn read_viewer_socket(socket: &UdpSocket, tx: &SyncSender<Msg>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        match socket.recv_from(&mut buf) {
            // A blocking send: when the main loop lags, the kernel's buffer takes the slack.
            Ok((n, source)) => {
                if tx.send(Msg::Datagram { source, contents: buf[..n].to_vec() }).is_err() {
                    return;
                }
            }
            Err(e) => {
                debug!(error = %e, "viewer socket receive error");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Spawns `program args…` and returns its pid. One thread logs its stderr line by line
/// (target `ffmpeg`); another waits for it and sends [`Msg::Exited`].
fn spawn_process(
    stream: &StreamId,
    generation: u64,
    program: &str,
    args: &[String],
    tx: &SyncSender<Msg>,
) -> Result<u32, String> {
    let mut cmd = whep_server::command(program, args);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| cli::spawn_error(program, &e))?;
    let pid = child.id();
    debug!(%stream, pid, generation, "FFmpeg started");
    if let Some(stderr) = child.stderr.take() {
        let id = stream.clone();
        let logger = spawn_io("ffmpeg-log", move || {
            let (mut stderr, mut line) = (BufReader::new(stderr), Vec::new());
            while stderr.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                let text = String::from_utf8_lossy(&line);
                warn!(target: "ffmpeg", stream = %id, pid, "{}", text.trim_end());
                line.clear();
            }
        });
        if let Err(e) = logger {
            debug!(%stream, error = %e, "FFmpeg's stderr is not logged");
        }
    }
    let (id, tx) = (stream.clone(), tx.clone());
    let waiter = spawn_io("ffmpeg-wait", move || {
        let code = match child.wait() {
            Ok(status) => status.code(),
            Err(e) => {
                warn!(stream = %id, pid, error = %e, "waiting for FFmpeg failed");
                None
            }
        };
        let _ = tx.send(Msg::Exited { stream: id, generation, code });
    });
    if let Err(e) = waiter {
        // Nobody would report its exit: do not let it run.
        whep_server::signal(pid, true);
        return Err(format!("cannot start a thread to wait for `{program}`: {e}"));
    }
    Ok(pid)
}

// ------------------------------------------------------------------------------------------
// HTTP/1.1 with keep-alive: `Content-Length` bodies only, answers in request order.
// ------------------------------------------------------------------------------------------

fn accept_loop(listener: &TcpListener, max_body: usize, tx: &SyncSender<Msg>) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let (conn, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            // Out of descriptors, or a connection reset before accept: keep serving.
            Err(e) => {
                debug!(error = %e, "accept failed");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
            let busy = plain(StatusCode::ServiceUnavailable, "too many connections");
            let _ = write_response(&conn, &busy, false, true);
            continue;
        }
        let (tx, done) = (tx.clone(), Arc::clone(&active));
        let served = spawn_io("http", move || {
            serve(&conn, peer, max_body, &tx);
            done.fetch_sub(1, Ordering::AcqRel);
        });
        if let Err(e) = served {
            active.fetch_sub(1, Ordering::AcqRel);
            warn!(%peer, error = %e, "cannot start a connection thread");
        }
    }
}

/// Names each request for `Msg::HttpGone`.
static NEXT_TICKET: AtomicU64 = AtomicU64::new(0);

/// How often a connection waiting for its answer checks that the client is still there.
const GONE_CHECK: Duration = Duration::from_millis(100);

enum Waited {
    Answer(Reply),
    /// The main loop is gone.
    Exiting,
    /// The client closed the connection first.
    ClientGone,
}

/// Waits for the main loop's answer, looking every [`GONE_CHECK`] whether the client closed
/// the connection meanwhile (a request pending for the authorisation server can wait for
/// seconds).
fn await_answer(conn: &TcpStream, answer: &Receiver<Reply>) -> Waited {
    loop {
        match answer.recv_timeout(GONE_CHECK) {
            Ok(resp) => return Waited::Answer(resp),
            Err(RecvTimeoutError::Disconnected) => return Waited::Exiting,
            Err(RecvTimeoutError::Timeout) if client_gone(conn) => return Waited::ClientGone,
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

/// Whether the client closed the connection (or it broke): a peek without waiting sees the
/// end of the stream or an error. Bytes of a pipelined next request are left where they are.
fn client_gone(conn: &TcpStream) -> bool {
    if conn.set_nonblocking(true).is_err() {
        return false;
    }
    let gone = match conn.peek(&mut [0u8; 1]) {
        Ok(n) => n == 0,
        Err(e) => !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted),
    };
    let _ = conn.set_nonblocking(false);
    gone
}

/// Reads requests one after the other (pipelined ones are already in the buffer), has the
/// main loop answer each and writes the answers in order, until the client asks to close, the
/// request cannot be framed, or the connection idles for [`HTTP_TIMEOUT`].
fn serve(conn: &TcpStream, peer: SocketAddr, max_body: usize, tx: &SyncSender<Msg>) {
    let _ = conn.set_write_timeout(Some(HTTP_TIMEOUT));
    let mut reader = BufReader::new(Deadline::new(conn, HTTP_TIMEOUT));
    for first in std::iter::once(true).chain(std::iter::repeat(false)) {
        reader.get_mut().until = Instant::now() + HTTP_TIMEOUT;
        let (resp, head, unread, close) = match read_request(&mut reader, max_body) {
            Ok(Some(Parsed { mut req, unread, close })) => {
                req.client = Some(peer.ip());
                req.wall_time = Some(SystemTime::now());
                let head = req.method == Method::Head;
                let (reply, answer) = mpsc::channel();
                let ticket = NEXT_TICKET.fetch_add(1, Ordering::Relaxed);
                // If the main loop is gone, `reply` is dropped with the message and `recv` fails.
                let resp = match tx.send(Msg::Http { req, reply, ticket }) {
                    Ok(()) => match await_answer(conn, &answer) {
                        Waited::Answer(resp) => resp.into_response(),
                        Waited::Exiting => None,
                        Waited::ClientGone => {
                            debug!(%peer, "client gone before the answer");
                            let _ = tx.send(Msg::HttpGone { ticket });
                            return;
                        }
                    },
                    Err(_) => None,
                };
                let resp = resp.unwrap_or_else(|| plain(StatusCode::ServiceUnavailable, "exiting"));
                // What is left of an over-long body is not read as the next request.
                (resp, head, unread, close || unread > 0)
            }
            // Closed between requests: the client is done.
            Ok(None) if !first => return,
            Ok(None) => (plain(StatusCode::BadRequest, "no request"), false, 0, true),
            Err(ReadError::Refused(status, why)) => (plain(status, why), false, 0, true),
            Err(ReadError::Broken(e)) => {
                debug!(%peer, error = %e, "request not read");
                return;
            }
        };
        if let Err(e) = write_response(conn, &resp, head, close) {
            debug!(%peer, error = %e, "response not written");
            return;
        }
        if close {
            // Read (a bounded part of) what the client sent beyond the answered request before
            // closing: closing with unread data resets the connection, and the client could
            // lose the answer before reading it.
            let _ = conn.shutdown(Shutdown::Write);
            reader.get_mut().until = Instant::now() + LINGER;
            let budget = unread.min(16 * max_body as u64).max(MAX_HEAD as u64);
            let _ = io::copy(&mut reader.take(budget), &mut io::sink());
            return;
        }
    }
}

/// Reads from a connection until a deadline: a client that trickles its request a byte at a
/// time cannot hold a thread longer than the whole request may take.
struct Deadline<'a> {
    conn: &'a TcpStream,
    until: Instant,
}

impl<'a> Deadline<'a> {
    fn new(conn: &'a TcpStream, within: Duration) -> Self {
        Self { conn, until: Instant::now() + within }
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.conn.set_read_timeout(Some(left))?;
        self.conn.read(buf)
    }
}

/// Why no request was read: answer with a status (and close), or just close the connection.
enum ReadError {
    Refused(StatusCode, &'static str),
    Broken(io::Error),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        Self::Broken(e)
    }
}

/// A request read off a connection.
struct Parsed {
    req: WhepRequest,
    /// Body bytes not read (beyond `max_body + 1`).
    unread: u64,
    /// Whether the connection ends after the answer (`Connection: close`, or HTTP/1.0 without
    /// `keep-alive`).
    close: bool,
}

/// Reads the request line, the headers and a `Content-Length` body of at most `max_body + 1`
/// bytes: the core answers anything longer with 413. `None` when the connection ended before a
/// request began.
fn read_request(
    reader: &mut BufReader<Deadline<'_>>,
    max_body: usize,
) -> Result<Option<Parsed>, ReadError> {
    use ReadError::Refused;
    let bad = |why| Refused(StatusCode::BadRequest, why);
    let mut budget = MAX_HEAD;
    let Some(line) = read_line(reader, &mut budget)? else { return Ok(None) };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("bad request line"));
    };
    if !target.starts_with('/') || !matches!(version, "HTTP/1.1" | "HTTP/1.0") {
        return Err(bad("bad request line"));
    }
    let method = method
        .parse::<Method>()
        .map_err(|_| Refused(StatusCode::MethodNotAllowed, "method not allowed"))?;
    let mut req = WhepRequest::new(method, target);
    loop {
        let eof = || io::Error::from(io::ErrorKind::UnexpectedEof);
        let line = read_line(reader, &mut budget)?.ok_or_else(eof)?;
        if line.is_empty() {
            break; // end of the head
        }
        let (name, value) = line.split_once(':').ok_or_else(|| bad("bad header line"))?;
        if name.is_empty() || name.contains(|c: char| c.is_ascii_whitespace()) {
            return Err(bad("bad header line"));
        }
        req.headers.push((name.to_owned(), value.trim().to_owned()));
    }
    // Only `Content-Length` frames a body here. A transfer coding (even one ending in chunked)
    // is not read, and guessing its length would let the body pass as the next request.
    if req.header("transfer-encoding").is_some() {
        return Err(Refused(
            StatusCode::NotImplemented,
            "Transfer-Encoding not supported: send the body with Content-Length",
        ));
    }
    let length = content_length(&req).ok_or_else(|| bad("bad or conflicting Content-Length"))?;
    let tokens = |name| {
        header_all(&req, name)
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .map(str::to_ascii_lowercase)
            .collect::<Vec<_>>()
    };
    let connection = tokens("connection");
    let close = connection.iter().any(|t| t == "close")
        || (version == "HTTP/1.0" && !connection.iter().any(|t| t == "keep-alive"));
    let keep = length.min(max_body as u64 + 1);
    if keep > 0 && req.header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        let mut conn: &TcpStream = reader.get_ref().conn;
        conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    match reader.by_ref().take(keep).read_to_end(&mut req.body) {
        Err(e) if is_timeout(&e) => {
            return Err(Refused(StatusCode::RequestTimeout, "request body too slow"));
        }
        r => r?,
    };
    if (req.body.len() as u64) < keep {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
    }
    Ok(Some(Parsed { req, unread: length - keep, close }))
}

/// The body length: 0 without `Content-Length`, `None` (400) unless every field and list
/// element is the same run of digits (RFC 9112 §6.3: differing lengths are an error, since a
/// proxy in front may have used another one).
fn content_length(req: &WhepRequest) -> Option<u64> {
    let mut length = None;
    for value in header_all(req, "content-length").flat_map(|v| v.split(',')) {
        let value = value.trim();
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n = value.parse::<u64>().ok()?;
        if length.is_some_and(|l| l != n) {
            return None;
        }
        length = Some(n);
    }
    Some(length.unwrap_or(0))
}

/// Every value of the header `name`, in order.
fn header_all<'a>(req: &'a WhepRequest, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    req.headers.iter().filter(move |(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock)
}

/// One line without its line break, `None` at end of stream. The whole head may take
/// [`MAX_HEAD`] bytes (431 beyond) and must be UTF-8 (400 otherwise).
fn read_line(
    reader: &mut BufReader<Deadline<'_>>,
    budget: &mut usize,
) -> Result<Option<String>, ReadError> {
    let mut line = Vec::new();
    let n = reader.by_ref().take(*budget as u64 + 1).read_until(b'\n', &mut line)?;
    if n > *budget {
        return Err(ReadError::Refused(StatusCode::RequestHeaderFieldsTooLarge, "head too large"));
    }
    *budget -= n;
    match line.last() {
        None => Ok(None),
        Some(b'\n') => String::from_utf8(line)
            .map(|l| Some(l.trim_end_matches(['\r', '\n']).to_owned()))
            .map_err(|_| ReadError::Refused(StatusCode::BadRequest, "request head not UTF-8")),
        Some(_) => Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
    }
}

/// Writes `resp`, with `Connection: close` when the connection ends after it.
fn write_response(
    mut conn: &TcpStream,
    resp: &WhepResponse,
    head: bool,
    close: bool,
) -> io::Result<()> {
    let mut out = format!("HTTP/1.1 {} {}\r\n", resp.code(), resp.status.canonical_reason());
    for (name, value) in &resp.headers {
        // No value holds CR or LF; should one, dropping it beats splitting the response.
        if !value.contains(['\r', '\n']) {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    // 204 and 304 carry neither a body nor a Content-Length (RFC 9110); HEAD only the length.
    let bodiless = matches!(resp.code(), 204 | 304);
    if !bodiless {
        out.push_str(&format!("Content-Length: {}\r\n", resp.body.len()));
    }
    if close {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if !head && !bodiless {
        bytes.extend_from_slice(&resp.body);
    }
    conn.write_all(&bytes)?;
    conn.flush()
}

fn plain(status: StatusCode, text: &str) -> WhepResponse {
    let body = format!("{text}\n").into_bytes();
    WhepResponse { status, headers: vec![("Content-Type", "text/plain".into())], body }
}

// ------------------------------------------------------------------------------------------
// Startup helpers, the same as whep-tokio's.
// ------------------------------------------------------------------------------------------

/// A named thread; unlike `thread::spawn`, failing to start one is an error, not a panic.
/// Accepts ICE-TCP connections, each with a reader thread.
fn accept_ice_tcp(listener: &TcpListener, tx: &SyncSender<Msg>) {
    let mut next = 0u64;
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) => {
                debug!(error = %e, "ICE-TCP accept failed");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        next += 1;
        let conn = ConnId(next);
        whep_server::ice_tcp_setup(&stream);
        let (Ok(local), Ok(reader)) = (stream.local_addr(), stream.try_clone()) else {
            continue;
        };
        if tx.send(Msg::TcpOpened { conn, peer, local, stream }).is_err() {
            return;
        }
        let tx = tx.clone();
        let _ = spawn_io(&format!("ice-tcp-read-{next}"), move || {
            let mut buf = vec![0u8; 16 * 1024];
            let mut reader = reader;
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                if tx.send(Msg::TcpData { conn, contents: buf[..n].to_vec() }).is_err() {
                    return;
                }
            }
            let _ = tx.send(Msg::TcpClosed { conn });
        });
    }
}

/// Writes what the main loop queues for one ICE-TCP connection, until it is closed or a write
/// fails. Only this thread waits for a slow reader.
fn write_ice_tcp(out: &TcpOut, mut socket: TcpStream) {
    loop {
        let chunk = {
            let mut state = lock(&out.state);
            while state.0.is_empty() && !state.1 {
                state = out.ready.wait(state).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            if state.1 {
                return;
            }
            state.0.front().to_vec()
        };
        match socket.write(&chunk) {
            Ok(n @ 1..) => lock(&out.state).0.advance(n),
            _ => {
                let _ = socket.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

fn spawn_io(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    thread::Builder::new().name(name.to_owned()).spawn(f)
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), String> {
    spawn_io(name, f).map(drop).map_err(|e| format!("cannot start the {name} thread: {e}"))
}

/// The candidates advertised when none are configured: the socket's own address, or for a
/// wildcard bind, loopback plus the address of the default route of each family it serves.
fn default_candidates(bound: SocketAddr) -> Vec<SocketAddr> {
    whep_server::app::default_candidates(bound, &whep_server::default_routes())
}
