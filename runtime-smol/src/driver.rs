//! The engine task: owns the [`Core`] and executes every [`Output`] it produces. The same loop
//! as `whep-tokio`'s, over async-io: one `poll_fn` waits on every source in priority order.

use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_broadcast::Sender;
use smol::channel::{self, Receiver};
use smol::stream::Stream;
use smol::{Async, Timer};
use tracing::{debug, info, warn};
use whep_core::app::AppConfig;
use whep_core::{Core, Event, Input, Output, PortPair, StreamId};

use crate::Job;
use crate::process::{self, ProcessExit};

/// Largest datagram read from either socket; anything longer is truncated and then dropped by
/// the core as malformed.
const MAX_DATAGRAM: usize = 2048;
/// Datagrams read from the viewer socket per wake-up before outputs are flushed.
const RECV_BATCH: usize = 32;

pub(crate) struct Driver {
    pub(crate) core: Core,
    pub(crate) app: AppConfig,
    socket: Async<UdpSocket>,
    local: SocketAddr,
    events: Sender<Event>,
    /// Bound ingest sockets: (port, pair, socket).
    ingest: Vec<(u16, PortPair, Async<UdpSocket>)>,
    /// Round-robin start for polling the ingest sockets.
    ingest_next: usize,
    procs: HashMap<(StreamId, u64), u32>,
    exits_tx: channel::Sender<ProcessExit>,
    exits_rx: Pin<Box<Receiver<ProcessExit>>>,
    shutdown_at: Option<Instant>,
}

enum Wake {
    Job(Option<Job>),
    Exit(ProcessExit),
    Datagram(usize, SocketAddr),
    Ingest(u16, usize),
    Timer,
}

impl Driver {
    pub(crate) fn new(
        core: Core,
        app: AppConfig,
        socket: Async<UdpSocket>,
        events: Sender<Event>,
    ) -> Self {
        let local =
            socket.get_ref().local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (exits_tx, exits_rx) = channel::unbounded();
        Self {
            core,
            app,
            socket,
            local,
            events,
            ingest: Vec::new(),
            ingest_next: 0,
            procs: HashMap::new(),
            exits_tx,
            exits_rx: Box::pin(exits_rx),
            shutdown_at: None,
        }
    }

    pub(crate) fn begin_shutdown(&mut self) {
        if self.shutdown_at.is_none() {
            info!("shutting down: closing viewers, stopping streams");
            self.shutdown_at = Some(Instant::now());
            self.core.shutdown(Instant::now());
        }
    }

    pub(crate) async fn run(
        mut self,
        jobs: Receiver<Job>,
        shutdown_timeout: Duration,
        done: channel::Sender<()>,
    ) {
        let mut jobs = Box::pin(jobs);
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut jobs_open = true;
        let mut timer = Timer::never();
        loop {
            self.flush().await;
            if let Some(started) = self.shutdown_at {
                if self.core.is_idle() {
                    break;
                }
                if started.elapsed() >= shutdown_timeout {
                    warn!("shutdown timed out; killing what is left");
                    break;
                }
            }
            let next = self.core.poll_timeout().map(|(at, _)| at);
            match (next, self.shutdown_at) {
                // Re-check the idle condition regularly while shutting down.
                (t, Some(_)) => {
                    let recheck = Instant::now() + Duration::from_millis(100);
                    timer.set_at(t.map_or(recheck, |t| t.min(recheck)));
                }
                (Some(t), None) => timer.set_at(t),
                (None, None) => timer = Timer::never(),
            }
            let wake =
                poll_fn(|cx| self.poll_wake(cx, &mut jobs, jobs_open, &mut timer, &mut buf)).await;
            match wake {
                Wake::Job(Some(job)) => job(&mut self),
                Wake::Job(None) => {
                    jobs_open = false;
                    self.begin_shutdown();
                }
                Wake::Exit(exit) => {
                    self.procs.remove(&(exit.stream.clone(), exit.generation));
                    let input = Input::ProcessExited {
                        stream: exit.stream,
                        generation: exit.generation,
                        code: exit.code,
                    };
                    self.core.handle_input(input, Instant::now());
                }
                Wake::Ingest(port, n) => {
                    let input = Input::Ingest { port, contents: &buf[..n] };
                    self.core.handle_input(input, Instant::now());
                }
                Wake::Datagram(n, source) => {
                    self.on_datagram(source, &buf[..n]);
                    // Drain what else is queued before flushing, bounded so that timers and
                    // HTTP requests are not starved.
                    for _ in 1..RECV_BATCH {
                        match self.socket.get_ref().recv_from(&mut buf) {
                            Ok((n, source)) => self.on_datagram(source, &buf[..n]),
                            Err(_) => break,
                        }
                    }
                }
                Wake::Timer => self.core.handle_timeout(Instant::now()),
            }
        }
        // Whatever is still alive after the timeout is killed; dropping the sockets closes them.
        for ((stream, _), pid) in self.procs.drain() {
            warn!(%stream, pid, "killing FFmpeg left after shutdown");
            process::signal(pid, true);
        }
        self.ingest.clear();
        drop(done);
        info!("engine stopped");
    }

    /// Polls every source once, in priority order: jobs (HTTP, API), process exits, ingest,
    /// the viewer socket, the timer.
    fn poll_wake(
        &mut self,
        cx: &mut Context<'_>,
        jobs: &mut Pin<Box<Receiver<Job>>>,
        jobs_open: bool,
        timer: &mut Timer,
        buf: &mut [u8],
    ) -> Poll<Wake> {
        if jobs_open && let Poll::Ready(job) = jobs.as_mut().poll_next(cx) {
            return Poll::Ready(Wake::Job(job));
        }
        if let Poll::Ready(Some(exit)) = self.exits_rx.as_mut().poll_next(cx) {
            return Poll::Ready(Wake::Exit(exit));
        }
        let n = self.ingest.len();
        for i in 0..n {
            let idx = (self.ingest_next + i) % n;
            let (port, _, socket) = &self.ingest[idx];
            if let Some(len) = poll_recv(socket, cx, buf).map(|(len, _)| len) {
                self.ingest_next = idx + 1;
                return Poll::Ready(Wake::Ingest(*port, len));
            }
        }
        if let Some((len, source)) = poll_recv(&self.socket, cx, buf) {
            return Poll::Ready(Wake::Datagram(len, source));
        }
        if Pin::new(timer).poll(cx).is_ready() {
            return Poll::Ready(Wake::Timer);
        }
        Poll::Pending
    }

    fn on_datagram(&mut self, source: SocketAddr, contents: &[u8]) {
        let destination = self.core.config().candidate_for(source).unwrap_or(self.local);
        self.core.handle_input(Input::Datagram { source, destination, contents }, Instant::now());
    }

    /// Executes outputs until the core has none left.
    async fn flush(&mut self) {
        while let Some(output) = self.core.poll_output() {
            match output {
                Output::Transmit(t) => {
                    if let Err(e) = self.socket.send_to(&t.contents, t.destination).await {
                        debug!(destination = %t.destination, error = %e, "send failed");
                    }
                }
                Output::BindIngest { stream, ports } => self.bind_ingest(stream, ports),
                Output::ReleaseIngest { stream, ports } => {
                    debug!(%stream, video = ports.video, "ingest ports released");
                    self.ingest.retain(|(_, p, _)| *p != ports);
                }
                Output::SpawnProcess { stream, generation, program, args } => {
                    let exits = self.exits_tx.clone();
                    let input = match process::spawn(&stream, generation, &program, &args, exits) {
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
                        process::signal(*pid, false);
                    }
                }
                Output::KillProcess { stream, generation } => {
                    if let Some(pid) = self.procs.get(&(stream, generation)) {
                        process::signal(*pid, true);
                    }
                }
                Output::Event(event) => {
                    // The core logs every event itself; subscribers get them here.
                    debug!(?event, "event");
                    let _ = self.events.try_broadcast(event);
                }
            }
        }
    }

    fn bind_ingest(&mut self, stream: StreamId, ports: PortPair) {
        let bind = |port: u16| Async::<UdpSocket>::bind(SocketAddr::from(([127, 0, 0, 1], port)));
        let input = match bind(ports.video).and_then(|v| Ok((v, bind(ports.audio())?))) {
            Ok((video, audio)) => {
                self.ingest.push((ports.video, ports, video));
                self.ingest.push((ports.audio(), ports, audio));
                Input::IngestBound { stream, ports }
            }
            Err(e) => Input::BindFailed { stream, ports, error: e.to_string() },
        };
        self.core.handle_input(input, Instant::now());
    }
}

/// One non-blocking receive after readiness; `None` registers the waker (or swallows a
/// transient error, e.g. a queued ICMP report, which the next poll retries).
fn poll_recv(
    socket: &Async<UdpSocket>,
    cx: &mut Context<'_>,
    buf: &mut [u8],
) -> Option<(usize, SocketAddr)> {
    loop {
        match socket.poll_readable(cx) {
            Poll::Pending => return None,
            Poll::Ready(Err(e)) => {
                debug!(error = %e, "socket readiness error");
                return None;
            }
            Poll::Ready(Ok(())) => match socket.get_ref().recv_from(buf) {
                Ok(r) => return Some(r),
                // Spurious readiness: poll again, which re-registers interest.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    debug!(error = %e, "receive error");
                    return None;
                }
            },
        }
    }
}
