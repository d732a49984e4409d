//! The engine task: owns the [`Core`] and executes every [`Output`] it produces.

use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::io::ReadBuf;
use tokio::net::UdpSocket;
use tokio::sync::{broadcast, mpsc, watch};
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
    socket: UdpSocket,
    local: SocketAddr,
    events: broadcast::Sender<Event>,
    /// Bound ingest sockets: (port, pair, socket).
    ingest: Vec<(u16, PortPair, UdpSocket)>,
    /// Round-robin start for polling the ingest sockets.
    ingest_next: usize,
    procs: HashMap<(StreamId, u64), u32>,
    exits_tx: mpsc::UnboundedSender<ProcessExit>,
    exits_rx: mpsc::UnboundedReceiver<ProcessExit>,
    shutdown_at: Option<Instant>,
}

enum Wake {
    Job(Option<Job>),
    Exit(ProcessExit),
    Datagram(io::Result<(usize, SocketAddr)>),
    Ingest(u16, usize),
    Timer,
}

impl Driver {
    pub(crate) fn new(
        core: Core,
        app: AppConfig,
        socket: UdpSocket,
        events: broadcast::Sender<Event>,
    ) -> Self {
        let local = socket.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
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
            exits_rx,
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
        mut jobs: mpsc::UnboundedReceiver<Job>,
        shutdown_timeout: Duration,
        done: watch::Sender<bool>,
    ) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut ingest_buf = vec![0u8; MAX_DATAGRAM];
        let mut jobs_open = true;
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
            let timer = self.core.poll_timeout().map(|(at, _)| at);
            let timer = match self.shutdown_at {
                // Re-check the idle condition regularly while shutting down.
                Some(_) => Some(timer.map_or(Instant::now() + Duration::from_millis(100), |t| {
                    t.min(Instant::now() + Duration::from_millis(100))
                })),
                None => timer,
            };
            let wake = tokio::select! {
                biased;
                job = jobs.recv(), if jobs_open => Wake::Job(job),
                Some(exit) = self.exits_rx.recv() => Wake::Exit(exit),
                (port, n) = poll_ingest(&self.ingest, &mut self.ingest_next, &mut ingest_buf) => Wake::Ingest(port, n),
                r = self.socket.recv_from(&mut buf) => Wake::Datagram(r),
                () = sleep_until(timer) => Wake::Timer,
            };
            match wake {
                Wake::Job(Some(job)) => job(&mut self),
                Wake::Job(None) => {
                    jobs_open = false;
                    self.begin_shutdown();
                }
                Wake::Exit(exit) => self.on_exit(exit),
                Wake::Ingest(port, n) => {
                    let input = Input::Ingest { port, contents: &ingest_buf[..n] };
                    self.core.handle_input(input, Instant::now());
                }
                Wake::Datagram(Ok((n, source))) => {
                    self.on_datagram(source, &buf[..n]);
                    // Drain what else is queued before flushing, bounded so that timers and
                    // HTTP requests are not starved.
                    for _ in 1..RECV_BATCH {
                        match self.socket.try_recv_from(&mut buf) {
                            Ok((n, source)) => self.on_datagram(source, &buf[..n]),
                            Err(_) => break,
                        }
                    }
                }
                Wake::Datagram(Err(e)) => debug!(error = %e, "viewer socket receive error"),
                Wake::Timer => self.core.handle_timeout(Instant::now()),
            }
        }
        // Whatever is still alive after the timeout is killed; dropping the sockets closes them.
        for ((stream, _), pid) in self.procs.drain() {
            warn!(%stream, pid, "killing FFmpeg left after shutdown");
            process::signal(pid, true);
        }
        self.ingest.clear();
        let _ = done.send(true);
        info!("engine stopped");
    }

    fn on_datagram(&mut self, source: SocketAddr, contents: &[u8]) {
        let destination = self.core.config().candidate_for(source).unwrap_or(self.local);
        self.core.handle_input(Input::Datagram { source, destination, contents }, Instant::now());
    }

    fn on_exit(&mut self, exit: ProcessExit) {
        self.procs.remove(&(exit.stream.clone(), exit.generation));
        let input = Input::ProcessExited {
            stream: exit.stream,
            generation: exit.generation,
            code: exit.code,
        };
        self.core.handle_input(input, Instant::now());
    }

    /// Executes outputs until the core has none left.
    async fn flush(&mut self) {
        while let Some(output) = self.core.poll_output() {
            match output {
                Output::Transmit(t) => {
                    let sent = match self.socket.try_send_to(&t.contents, t.destination) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.socket.send_to(&t.contents, t.destination).await
                        }
                        other => other,
                    };
                    if let Err(e) = sent {
                        debug!(destination = %t.destination, error = %e, "send failed");
                    }
                }
                Output::BindIngest { stream, ports } => self.bind_ingest(stream, ports),
                Output::ReleaseIngest { stream, ports } => {
                    debug!(%stream, video = ports.video, "ingest ports released");
                    self.ingest.retain(|(_, p, _)| *p != ports);
                }
                Output::SpawnProcess { stream, generation, program, args } => {
                    let input = match process::spawn(
                        &stream,
                        generation,
                        &program,
                        &args,
                        self.exits_tx.clone(),
                    ) {
                        Ok(pid) => {
                            self.procs.insert((stream.clone(), generation), pid);
                            Input::ProcessSpawned { stream, generation, pid }
                        }
                        Err(error) => {
                            debug!(%stream, %error, "FFmpeg could not be started");
                            Input::SpawnFailed { stream, generation, error }
                        }
                    };
                    self.core.handle_input(input, Instant::now());
                }
                Output::StopProcess { stream, generation } => {
                    if let Some(pid) = self.procs.get(&(stream, generation)) {
                        process::signal(*pid, false);
                    }
                }
                Output::KillProcess { stream, generation } => {
                    if let Some(pid) = self.procs.get(&(stream.clone(), generation)) {
                        warn!(%stream, pid, "FFmpeg ignored SIGTERM; sending SIGKILL");
                        process::signal(*pid, true);
                    }
                }
                Output::Event(event) => {
                    // The core logs every event itself; subscribers get them here.
                    debug!(?event, "event");
                    let _ = self.events.send(event);
                }
            }
        }
    }

    fn bind_ingest(&mut self, stream: StreamId, ports: PortPair) {
        let bind = |port: u16| -> io::Result<UdpSocket> {
            let s = std::net::UdpSocket::bind(("127.0.0.1", port))?;
            s.set_nonblocking(true)?;
            UdpSocket::from_std(s)
        };
        let input = match bind(ports.video).and_then(|v| Ok((v, bind(ports.audio())?))) {
            Ok((video, audio)) => {
                debug!(%stream, video = ports.video, "ingest ports bound");
                self.ingest.push((ports.video, ports, video));
                self.ingest.push((ports.audio(), ports, audio));
                Input::IngestBound { stream, ports }
            }
            Err(e) => {
                debug!(%stream, video = ports.video, error = %e, "ingest bind failed");
                Input::BindFailed { stream, ports, error: e.to_string() }
            }
        };
        self.core.handle_input(input, Instant::now());
    }
}

/// Waits for a datagram on any ingest socket, starting the scan after the last one served so
/// that a busy stream cannot starve the others.
async fn poll_ingest(
    sockets: &[(u16, PortPair, UdpSocket)],
    next: &mut usize,
    buf: &mut [u8],
) -> (u16, usize) {
    poll_fn(|cx| {
        let n = sockets.len();
        for i in 0..n {
            let idx = (*next + i) % n;
            let (port, _, socket) = &sockets[idx];
            let mut rb = ReadBuf::new(buf);
            match socket.poll_recv(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    *next = idx + 1;
                    return Poll::Ready((*port, rb.filled().len()));
                }
                // An error on a loopback UDP socket (e.g. a queued ICMP report) is not fatal;
                // the next poll re-registers interest.
                Poll::Ready(Err(e)) => debug!(port, error = %e, "ingest receive error"),
                Poll::Pending => {}
            }
        }
        Poll::Pending
    })
    .await
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
