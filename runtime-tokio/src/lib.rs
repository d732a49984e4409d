//! [whep-core] on tokio: one task owns the sans-IO [`Core`] and all of its IO (the shared viewer
//! socket, the ingest sockets, FFmpeg children, the timer); a cheap, cloneable [`Whep`] handle
//! talks to it.
//!
//! Use it two ways:
//!
//! - **embedded** in a tokio service: [`Whep::start`] on the running runtime, manage streams
//!   with [`Whep::add_stream`] and friends, [`Whep::subscribe`] to [`Event`]s, and mount
//!   [`Whep::service`] (a [`tower_service::Service`] and a [`hyper::service::Service`]) inside
//!   your own hyper or axum application, or let [`Whep::serve`] run an HTTP listener;
//! - **standalone**: the `whepd` binary of this crate.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use whep_tokio::{ServerConfig, Whep};
//! use whep_core::app::StreamSpec;
//!
//! let mut config = ServerConfig::default();
//! config.core.host_candidates = vec!["127.0.0.1:3478".parse().unwrap()];
//! let whep = Whep::start(config)?;
//! whep.add_stream("demo", StreamSpec::demo()).await.expect("valid stream");
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! whep.serve(listener, std::future::pending()).await?;
//! # Ok(()) }
//! ```
//!
//! [whep-core]: whep_core

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{broadcast, mpsc, oneshot};
use whep_core::app::{AppConfig, StreamSpec};
use whep_core::{Core, Event, Metrics, StreamError, StreamId, StreamInfo};
use whep_core::{WhepRequest, WhepResponse};

pub mod cli;
mod driver;
mod http;
mod process;

pub use http::WhepService;
pub use whep_core::app::{AddError, ServerConfig};

type Job = Box<dyn FnOnce(&mut driver::Driver) + Send>;

/// A handle to a running engine. Cheap to clone; the engine stops when [`Whep::shutdown`] is
/// called or the last handle is dropped.
#[derive(Debug, Clone)]
pub struct Whep {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    jobs: mpsc::UnboundedSender<Job>,
    events: broadcast::Sender<Event>,
    udp_addr: SocketAddr,
    max_body: usize,
    done: tokio::sync::watch::Receiver<bool>,
}

impl Whep {
    /// Binds the viewer socket and starts the engine on the current tokio runtime.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime.
    pub fn start(mut config: ServerConfig) -> io::Result<Self> {
        if config.core.rng_seed == [0; 32] {
            getrandom::fill(&mut config.core.rng_seed).map_err(io::Error::other)?;
        }
        let socket = std::net::UdpSocket::bind(config.udp_bind)?;
        socket.set_nonblocking(true)?;
        let udp_addr = socket.local_addr()?;
        if config.core.host_candidates.is_empty() {
            config.core.host_candidates = default_candidates(udp_addr);
        }
        tracing::info!(udp = %udp_addr, candidates = ?config.core.host_candidates, "viewer socket bound");
        let socket = tokio::net::UdpSocket::from_std(socket)?;
        let (jobs, jobs_rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(1024);
        let (done_tx, done) = tokio::sync::watch::channel(false);
        let max_body = config.core.max_body_bytes;
        let core = Core::new(config.core, Instant::now());
        let driver = driver::Driver::new(core, config.app, socket, events.clone());
        tokio::spawn(driver.run(jobs_rx, config.shutdown_timeout, done_tx));
        Ok(Self { inner: Arc::new(Inner { jobs, events, udp_addr, max_body, done }) })
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
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |d: &mut driver::Driver| {
            let r = f(&mut d.core, &d.app, Instant::now());
            let _ = tx.send(r);
        });
        self.inner.jobs.send(job).ok()?;
        rx.await.ok()
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

    /// Events from now on: streams started, stopped and failed, FFmpeg exits, viewers joined,
    /// connected and left. A receiver that falls more than 1024 events behind loses the oldest.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Answers one request to the application routes (player page, `/metrics`, admin API and
    /// the WHEP routes); see [`whep_core::app`].
    pub async fn handle(&self, req: WhepRequest) -> WhepResponse {
        self.with_core(move |core, app, now| whep_core::app::handle(core, app, req, now))
            .await
            .unwrap_or_else(whep_core::app::unavailable)
    }

    /// Answers one request to the WHEP routes only.
    pub async fn handle_whep(&self, req: WhepRequest) -> WhepResponse {
        self.with_core(move |core, _, now| core.handle_http(req, now))
            .await
            .unwrap_or_else(whep_core::app::unavailable)
    }

    /// An HTTP service for every application route, to mount in a hyper or axum application.
    pub fn service(&self) -> WhepService {
        WhepService::new(self.clone(), true)
    }

    /// An HTTP service for the WHEP routes only.
    pub fn whep_service(&self) -> WhepService {
        WhepService::new(self.clone(), false)
    }

    /// Serves [`Whep::service`] on `listener` (HTTP/1.1) until `shutdown` completes.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        http::serve(self.service(), listener, shutdown).await
    }

    /// Closes every viewer session, stops every stream's FFmpeg (SIGTERM, then SIGKILL), waits
    /// until no process or port is left (at most [`ServerConfig::shutdown_timeout`]) and stops
    /// the engine.
    pub async fn shutdown(&self) {
        let job: Job = Box::new(|d: &mut driver::Driver| d.begin_shutdown());
        let _ = self.inner.jobs.send(job);
        self.closed().await;
    }

    /// Completes when the engine has stopped.
    pub async fn closed(&self) {
        let mut done = self.inner.done.clone();
        let _ = done.wait_for(|d| *d).await;
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
