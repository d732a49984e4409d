//! [`Runtime`] for smol / async-io: `Async<UdpSocket>`, `async_io::Timer`, tasks on an
//! executor, and FFmpeg children via async-process.

use std::future::Future;
use std::io;
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use smol::io::{AsyncBufReadExt, BufReader};
use smol::stream::StreamExt;
use tracing::{debug, warn};
use whep_core::StreamId;
use whep_server::driver::{
    ProcessExit, Received, Runtime, TcpListener, TcpStream, Timer, UdpSocket,
};

type Spawner = Arc<dyn Fn(Pin<Box<dyn Future<Output = ()> + Send>>) + Send + Sync>;

/// Where the engine's tasks run: smol's global executor or one the application owns.
#[derive(Clone)]
pub struct SmolRuntime {
    spawner: Spawner,
}

impl std::fmt::Debug for SmolRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmolRuntime").finish_non_exhaustive()
    }
}

impl SmolRuntime {
    /// Tasks on smol's global executor.
    pub fn global() -> Self {
        Self { spawner: Arc::new(|task| smol::spawn(task).detach()) }
    }

    /// Tasks on `executor`, which the application runs.
    pub fn on(executor: &Arc<smol::Executor<'static>>) -> Self {
        let ex = Arc::clone(executor);
        Self { spawner: Arc::new(move |task| ex.spawn(task).detach()) }
    }
}

/// An async-io UDP socket.
#[derive(Debug)]
pub struct SmolUdp {
    socket: smol::Async<std::net::UdpSocket>,
    state: quinn_udp::UdpSocketState,
}

impl UdpSocket for SmolUdp {
    fn poll_recv_from(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<(usize, SocketAddr)>> {
        loop {
            match self.socket.get_ref().recv_from(buf) {
                // Not ready: register for readiness; spurious readiness loops back here.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::task::ready!(self.socket.poll_readable(cx))?;
                }
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_recv(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<Received>> {
        let mut meta = [quinn_udp::RecvMeta::default()];
        loop {
            let socket = self.socket.get_ref();
            match self.state.recv(socket.into(), &mut [IoSliceMut::new(buf)], &mut meta) {
                Ok(_) => {
                    let m = &meta[0];
                    let now = SystemTime::now();
                    return Poll::Ready(Ok(Received::coalesced(
                        m.len,
                        m.addr,
                        m.stride,
                        m.timestamp,
                        now,
                    )));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::task::ready!(self.socket.poll_readable(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_send_to(
        &self,
        cx: &mut Context<'_>,
        buf: &[u8],
        target: SocketAddr,
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.socket.get_ref().send_to(buf, target) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::task::ready!(self.socket.poll_writable(cx))?;
                }
                r => return Poll::Ready(r),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.get_ref().local_addr()
    }

    fn max_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn poll_send_segments(
        &self,
        cx: &mut Context<'_>,
        contents: &[u8],
        segment_size: usize,
        destination: SocketAddr,
    ) -> Poll<io::Result<()>> {
        let transmit = quinn_udp::Transmit {
            destination,
            ecn: None,
            contents,
            segment_size: (contents.len() > segment_size).then_some(segment_size),
            src_ip: None,
        };
        loop {
            match self.state.try_send(self.socket.get_ref().into(), &transmit) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::task::ready!(self.socket.poll_writable(cx))?;
                }
                r => return Poll::Ready(r),
            }
        }
    }
}

/// An async-io timer.
#[derive(Debug)]
pub struct SmolTimer(smol::Timer);

impl Timer for SmolTimer {
    fn reset(&mut self, at: Instant) {
        self.0.set_at(at);
    }

    fn poll_fired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}

/// An async-io TCP listener for ICE-TCP.
#[derive(Debug)]
struct SmolTcpListener(smol::Async<std::net::TcpListener>);

impl TcpListener for SmolTcpListener {
    fn poll_accept(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(Box<dyn TcpStream>, SocketAddr)>> {
        loop {
            std::task::ready!(self.0.poll_readable(cx))?;
            match self.0.get_ref().accept() {
                Ok((stream, peer)) => {
                    whep_server::ice_tcp_setup(&stream);
                    let stream = smol::Async::new(stream)?;
                    return Poll::Ready(Ok((Box::new(SmolTcpStream(stream)), peer)));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().local_addr()
    }
}

/// An accepted ICE-TCP connection on async-io.
#[derive(Debug)]
struct SmolTcpStream(smol::Async<std::net::TcpStream>);

impl TcpStream for SmolTcpStream {
    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        use std::io::Read;
        loop {
            std::task::ready!(self.0.poll_readable(cx))?;
            match (&mut self.0.get_ref()).read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        use std::io::Write;
        loop {
            std::task::ready!(self.0.poll_writable(cx))?;
            match (&mut self.0.get_ref()).write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().local_addr()
    }
}

impl Runtime for SmolRuntime {
    type UdpSocket = SmolUdp;
    type Timer = SmolTimer;

    fn bind_tcp(&self, addr: SocketAddr) -> io::Result<Box<dyn TcpListener>> {
        let bound = whep_server::os::bind_tcp(addr)?;
        Ok(Box::new(SmolTcpListener(smol::Async::new(bound)?)))
    }

    fn bind_udp(&self, addr: SocketAddr) -> io::Result<SmolUdp> {
        let socket = smol::Async::new(whep_server::os::bind_udp(addr)?)?;
        let state = whep_server::udp_state(socket.get_ref())?;
        Ok(SmolUdp { socket, state })
    }

    fn timer(&self) -> SmolTimer {
        SmolTimer(smol::Timer::never())
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        (self.spawner)(future);
    }

    fn spawn_blocking(&self, work: Box<dyn FnOnce() + Send>) {
        smol::unblock(work).detach();
    }

    /// A thread per shard running the loop with `smol::block_on` (async-io's reactor is
    /// global, so its sockets and timers work from any thread). The thread ends with the loop.
    fn spawn_shard(&self, index: usize, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        let slot = Arc::new(std::sync::Mutex::new(Some(future)));
        let theirs = Arc::clone(&slot);
        let spawned =
            std::thread::Builder::new().name(format!("whep-shard-{index}")).spawn(move || {
                let future = theirs.lock().ok().and_then(|mut f| f.take());
                if let Some(future) = future {
                    smol::block_on(future);
                }
            });
        if let Err(e) = spawned {
            // No thread to be had: share the executor's instead.
            warn!(shard = index, error = %e, "no thread for the shard; running it as a task");
            if let Some(future) = slot.lock().ok().and_then(|mut f| f.take()) {
                (self.spawner)(future);
            }
        }
    }

    fn spawn_process(
        &self,
        stream: &StreamId,
        program: &str,
        args: &[String],
        exit: ProcessExit,
    ) -> Result<u32, String> {
        let mut cmd = smol::process::Command::from(whep_server::command(program, args));
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| whep_server::cli::spawn_error(program, &e))?;
        let pid = child.id();
        if let Some(stderr) = child.stderr.take() {
            let stream = stream.clone();
            // Its own task: a grandchild holding stderr open must not delay the exit report.
            self.spawn(Box::pin(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Some(Ok(line)) = lines.next().await {
                    warn!(target: "ffmpeg", stream = %stream, pid, "{line}");
                }
            }));
        }
        let stream = stream.clone();
        self.spawn(Box::pin(async move {
            let code = match child.status().await {
                Ok(status) => {
                    debug!(%stream, pid, %status, "FFmpeg exited");
                    status.code()
                }
                Err(e) => {
                    warn!(%stream, pid, error = %e, "waiting for FFmpeg failed");
                    None
                }
            };
            exit.report(code);
        }));
        Ok(pid)
    }

    fn signal(&self, pid: u32, force: bool) {
        whep_server::signal(pid, force);
    }

    fn now(&self) -> Instant {
        Instant::now()
    }
}
