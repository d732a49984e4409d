//! [whep-core] on smol / async-io: one task owns the sans-IO [`Core`] and all of its IO
//! (`Async<UdpSocket>` for viewers and ingest, `async_io::Timer`, async-process children); a
//! cheap, cloneable [`Whep`] handle talks to it. HTTP comes from the http-types ecosystem:
//! [`Whep::serve`] runs async-h1, and [`Whep::handle`] answers an `http_types::Request` for an
//! application that has its own server (tide, async-h1, ...).
//!
//! The surface matches `whep-tokio`: start on an executor, manage streams, subscribe to events,
//! serve the routes or hand them over; the `whepd-smol` binary is `whepd` on this runtime.
//!
//! ```no_run
//! # fn demo() -> std::io::Result<()> {
//! use whep_core::app::{ServerConfig, StreamSpec};
//! use whep_smol::Whep;
//!
//! smol::block_on(async {
//!     let whep = Whep::start(ServerConfig::default())?;
//!     whep.add_stream("demo", StreamSpec::demo()).await.expect("valid stream");
//!     let listener = smol::net::TcpListener::bind("127.0.0.1:8080").await?;
//!     whep.serve(listener, std::future::pending()).await
//! })
//! # }
//! ```
//!
//! [whep-core]: whep_core

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use async_broadcast::{InactiveReceiver, Receiver};
use smol::channel;
use whep_core::app::{AddError, AppConfig, ServerConfig, StreamSpec};
use whep_core::{Core, Event, Metrics, StreamError, StreamId, StreamInfo};
use whep_core::{WhepRequest, WhepResponse};

pub mod cli;
mod driver;
mod http;
mod process;

type Job = Box<dyn FnOnce(&mut driver::Driver) + Send>;

/// A handle to a running engine. Cheap to clone; the engine stops when [`Whep::shutdown`] is
/// called or the last handle is dropped.
#[derive(Debug, Clone)]
pub struct Whep {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    jobs: channel::Sender<Job>,
    events: InactiveReceiver<Event>,
    udp_addr: SocketAddr,
    max_body: usize,
    done: channel::Receiver<()>,
}

impl Whep {
    /// Binds the viewer socket and starts the engine on smol's global executor.
    pub fn start(config: ServerConfig) -> io::Result<Self> {
        Self::start_with(config, |task| smol::spawn(task).detach())
    }

    /// Binds the viewer socket and starts the engine on `executor` (which the application
    /// must run, e.g. with `executor.run(..)` on its threads).
    pub fn start_on(
        config: ServerConfig,
        executor: &Arc<smol::Executor<'static>>,
    ) -> io::Result<Self> {
        let ex = Arc::clone(executor);
        Self::start_with(config, move |task| ex.spawn(task).detach())
    }

    fn start_with(
        mut config: ServerConfig,
        spawn: impl FnOnce(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>),
    ) -> io::Result<Self> {
        if config.core.rng_seed == [0; 32] {
            getrandom::fill(&mut config.core.rng_seed).map_err(io::Error::other)?;
        }
        let socket = smol::Async::<std::net::UdpSocket>::bind(config.udp_bind)?;
        let udp_addr = socket.get_ref().local_addr()?;
        if config.core.host_candidates.is_empty() {
            config.core.host_candidates = default_candidates(udp_addr);
        }
        tracing::info!(udp = %udp_addr, candidates = ?config.core.host_candidates, "viewer socket bound");
        let (jobs, jobs_rx) = channel::unbounded();
        let (mut events_tx, events_rx) = async_broadcast::broadcast(1024);
        // A slow subscriber loses the oldest events instead of stalling the engine.
        events_tx.set_overflow(true);
        events_tx.set_await_active(false);
        let (done_tx, done) = channel::bounded(1);
        let max_body = config.core.max_body_bytes;
        let core = Core::new(config.core, Instant::now());
        let driver = driver::Driver::new(core, config.app, socket, events_tx);
        spawn(Box::pin(driver.run(jobs_rx, config.shutdown_timeout, done_tx)));
        let inner = Inner { jobs, events: events_rx.deactivate(), udp_addr, max_body, done };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// The local address of the shared viewer socket.
    pub fn udp_addr(&self) -> SocketAddr {
        self.inner.udp_addr
    }

    /// Runs `f` on the engine's task with the core and the current time, and returns its result.
    /// Outputs the call produces are executed right after it. `None` once the engine is gone.
    pub async fn with_core<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Core, &AppConfig, Instant) -> R + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = channel::bounded(1);
        let job: Job = Box::new(move |d: &mut driver::Driver| {
            let _ = tx.try_send(f(&mut d.core, &d.app, Instant::now()));
        });
        self.inner.jobs.send(job).await.ok()?;
        rx.recv().await.ok()
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

    /// Status of every stream (empty once the engine is gone).
    pub async fn streams(&self) -> Vec<StreamInfo> {
        self.with_core(|core, _, _| core.streams()).await.unwrap_or_default()
    }

    /// A copy of the core's counters.
    pub async fn metrics(&self) -> Metrics {
        self.with_core(|core, _, _| core.metrics().clone()).await.unwrap_or_default()
    }

    /// Events from now on. A receiver that falls more than 1024 events behind loses the oldest.
    pub fn subscribe(&self) -> Receiver<Event> {
        self.inner.events.activate_cloned()
    }

    /// Answers one request to the application routes (player page, `/metrics`, admin API and
    /// the WHEP routes); see [`whep_core::app`].
    pub async fn handle_request(&self, req: WhepRequest) -> WhepResponse {
        self.with_core(move |core, app, now| whep_core::app::handle(core, app, req, now))
            .await
            .unwrap_or_else(whep_core::app::unavailable)
    }

    /// Answers one request to the WHEP routes only.
    pub async fn handle_whep_request(&self, req: WhepRequest) -> WhepResponse {
        self.with_core(move |core, _, now| core.handle_http(req, now))
            .await
            .unwrap_or_else(whep_core::app::unavailable)
    }

    /// Answers an `http_types::Request` on every application route: the handler to mount in an
    /// http-types application.
    pub async fn handle(&self, req: http_types::Request) -> http_types::Response {
        http::handle(self, req, true).await
    }

    /// Answers an `http_types::Request` on the WHEP routes only.
    pub async fn handle_whep(&self, req: http_types::Request) -> http_types::Response {
        http::handle(self, req, false).await
    }

    /// Serves every application route on `listener` (HTTP/1.1 by async-h1) until `shutdown`
    /// completes.
    pub async fn serve(
        &self,
        listener: smol::net::TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        http::serve(self.clone(), listener, shutdown).await
    }

    /// Closes every viewer session, stops every stream's FFmpeg (SIGTERM, then SIGKILL), waits
    /// until no process or port is left (at most [`ServerConfig::shutdown_timeout`]) and stops
    /// the engine.
    pub async fn shutdown(&self) {
        let job: Job = Box::new(|d: &mut driver::Driver| d.begin_shutdown());
        let _ = self.inner.jobs.send(job).await;
        self.closed().await;
    }

    /// Completes when the engine has stopped.
    pub async fn closed(&self) {
        // The driver drops its sender when it stops; `recv` then fails.
        let _ = self.inner.done.recv().await;
    }

    pub(crate) fn max_body(&self) -> usize {
        self.inner.max_body
    }
}

/// Fails early, naming the fix, when `program` (FFmpeg) cannot be run and a stream needs it.
pub fn check_program(program: &str, needed: bool) -> Result<(), String> {
    if !needed {
        return Ok(());
    }
    let status = std::process::Command::new(program)
        .arg("-version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    match status {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(whep_core::cli::missing_ffmpeg(program))
        }
        Err(e) => Err(format!("cannot run FFmpeg (`{program}`): {e}")),
    }
}

/// The candidates advertised when none are configured: the socket's own address, or for a
/// wildcard bind, loopback plus the address of the default route.
fn default_candidates(bound: SocketAddr) -> Vec<SocketAddr> {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").map(|()| s))
        .and_then(|s| s.local_addr());
    whep_core::app::default_candidates(bound, probe.ok())
}
