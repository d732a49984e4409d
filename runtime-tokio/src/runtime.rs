//! [`Runtime`] for tokio: sockets, timer, tasks, and FFmpeg children via `tokio::process`.

use std::future::Future;
use std::io;
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use tokio::io::{AsyncBufReadExt, BufReader, ReadBuf};
use tracing::{debug, warn};
use whep_core::StreamId;
use whep_server::driver::{
    ProcessExit, Received, Runtime, TcpListener, TcpStream, Timer, UdpSocket,
};

/// The tokio runtime the engine was started on.
#[derive(Debug, Clone)]
pub struct TokioRuntime {
    handle: tokio::runtime::Handle,
}

impl TokioRuntime {
    /// The runtime of the calling task.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime.
    pub fn current() -> Self {
        Self { handle: tokio::runtime::Handle::current() }
    }
}

/// A tokio UDP socket, with quinn-udp's segmentation offload (GSO) for batched sends.
///
/// It joins a reactor when it is first used, not when it is bound: a shard's socket is bound
/// by the engine on the caller's runtime, then polled on the shard's own thread and runtime
/// ([`Runtime::spawn_shard`]), whose reactor should watch it (no cross-thread wake-up per
/// readiness event).
#[derive(Debug)]
pub struct TokioUdp {
    bound: std::net::UdpSocket,
    socket: std::sync::OnceLock<tokio::net::UdpSocket>,
    /// The runtime that bound it, for a first use outside any runtime.
    handle: tokio::runtime::Handle,
    state: quinn_udp::UdpSocketState,
}

impl TokioUdp {
    /// The registered socket: with the reactor of the runtime it is first used on.
    fn socket(&self) -> io::Result<&tokio::net::UdpSocket> {
        if let Some(s) = self.socket.get() {
            return Ok(s);
        }
        let std = self.bound.try_clone()?;
        let socket = match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::net::UdpSocket::from_std(std)?,
            Err(_) => {
                let _guard = self.handle.enter();
                tokio::net::UdpSocket::from_std(std)?
            }
        };
        // Only the engine loop that owns the socket polls it, so nobody raced us here.
        let _ = self.socket.set(socket);
        self.socket.get().ok_or_else(|| io::Error::other("socket registration lost"))
    }
}

impl UdpSocket for TokioUdp {
    fn poll_recv_from(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<(usize, SocketAddr)>> {
        let socket = self.socket()?;
        let mut rb = ReadBuf::new(buf);
        socket.poll_recv_from(cx, &mut rb).map_ok(|from| (rb.filled().len(), from))
    }

    fn poll_recv(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<Received>> {
        let socket = self.socket()?;
        let mut meta = [quinn_udp::RecvMeta::default()];
        loop {
            std::task::ready!(socket.poll_recv_ready(cx))?;
            let recv = || self.state.recv(socket.into(), &mut [IoSliceMut::new(buf)], &mut meta);
            match socket.try_io(tokio::io::Interest::READABLE, recv) {
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
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
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
        self.socket()?.poll_send_to(cx, buf, target)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.bound.local_addr()
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
        let socket = self.socket()?;
        loop {
            std::task::ready!(socket.poll_send_ready(cx))?;
            let send = || self.state.try_send(socket.into(), &transmit);
            match socket.try_io(tokio::io::Interest::WRITABLE, send) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
        }
    }
}

/// A tokio sleep that can be reset.
#[derive(Debug)]
pub struct TokioTimer(Pin<Box<tokio::time::Sleep>>);

impl Timer for TokioTimer {
    fn reset(&mut self, at: Instant) {
        self.0.as_mut().reset(at.into());
    }

    fn poll_fired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.0.as_mut().poll(cx)
    }
}

/// A tokio TCP listener for ICE-TCP, registered, like [`TokioUdp`], with the reactor of the
/// runtime it is first polled on (a shard's own).
#[derive(Debug)]
pub(crate) struct TokioTcpListener {
    bound: std::net::TcpListener,
    listener: std::sync::OnceLock<tokio::net::TcpListener>,
    handle: tokio::runtime::Handle,
}

impl TokioTcpListener {
    fn listener(&self) -> io::Result<&tokio::net::TcpListener> {
        if let Some(l) = self.listener.get() {
            return Ok(l);
        }
        let std = self.bound.try_clone()?;
        let listener = match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::net::TcpListener::from_std(std)?,
            Err(_) => {
                let _guard = self.handle.enter();
                tokio::net::TcpListener::from_std(std)?
            }
        };
        let _ = self.listener.set(listener);
        self.listener.get().ok_or_else(|| io::Error::other("listener registration lost"))
    }
}

impl TcpListener for TokioTcpListener {
    fn poll_accept(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(Box<dyn TcpStream>, SocketAddr)>> {
        let listener = match self.listener() {
            Ok(l) => l,
            Err(e) => return Poll::Ready(Err(e)),
        };
        listener.poll_accept(cx).map_ok(|(stream, peer)| {
            whep_server::ice_tcp_setup(&stream);
            (Box::new(TokioTcpStream(stream)) as Box<dyn TcpStream>, peer)
        })
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.bound.local_addr()
    }
}

/// An accepted ICE-TCP connection on tokio.
#[derive(Debug)]
struct TokioTcpStream(tokio::net::TcpStream);

impl TcpStream for TokioTcpStream {
    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.0.poll_read_ready(cx))?;
            match self.0.try_read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

impl Runtime for TokioRuntime {
    type UdpSocket = TokioUdp;
    type Timer = TokioTimer;

    fn bind_udp(&self, addr: SocketAddr) -> io::Result<TokioUdp> {
        let socket = whep_server::os::bind_udp(addr)?;
        socket.set_nonblocking(true)?;
        let state = whep_server::udp_state(&socket)?;
        Ok(TokioUdp {
            bound: socket,
            socket: std::sync::OnceLock::new(),
            handle: self.handle.clone(),
            state,
        })
    }

    /// A sleep on the calling runtime (a shard's own, see [`spawn_shard`](Self::spawn_shard)),
    /// or on the engine's outside any.
    fn timer(&self) -> TokioTimer {
        let _guard = tokio::runtime::Handle::try_current().is_err().then(|| self.handle.enter());
        TokioTimer(Box::pin(tokio::time::sleep_until(tokio::time::Instant::now())))
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self.handle.spawn(future);
    }

    fn spawn_blocking(&self, work: Box<dyn FnOnce() + Send>) {
        drop(self.handle.spawn_blocking(work));
    }

    /// A thread per shard with a current-thread runtime of its own (its reactor watches the
    /// shard's socket, its timer wheel the shard's timer), so that shards run in parallel
    /// whatever the embedding runtime's worker count, and a shard never waits behind another
    /// shard or the HTTP tasks. The thread ends with the loop.
    fn spawn_shard(&self, index: usize, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        let slot = Arc::new(Mutex::new(Some(future)));
        let theirs = Arc::clone(&slot);
        let engine = self.handle.clone();
        let spawned =
            std::thread::Builder::new().name(format!("whep-shard-{index}")).spawn(move || {
                let Some(future) = theirs.lock().ok().and_then(|mut f| f.take()) else {
                    return;
                };
                match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt.block_on(future),
                    Err(e) => {
                        warn!(shard = index, error = %e, "no runtime for the shard; using the engine's");
                        engine.block_on(future);
                    }
                }
            });
        if let Err(e) = spawned {
            // No thread to be had: share the engine runtime's workers.
            warn!(shard = index, error = %e, "no thread for the shard; running it as a task");
            if let Some(future) = slot.lock().ok().and_then(|mut f| f.take()) {
                self.handle.spawn(future);
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
        let _guard = self.handle.enter();
        let mut cmd = tokio::process::Command::from(whep_server::command(program, args));
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| whep_server::cli::spawn_error(program, &e))?;
        let pid = child.id().ok_or("the process exited before its pid was read")?;
        if let Some(stderr) = child.stderr.take() {
            let stream = stream.clone();
            // Its own task: a grandchild holding stderr open must not delay the exit report.
            self.handle.spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    warn!(target: "ffmpeg", stream = %stream, pid, "{line}");
                }
            });
        }
        let stream = stream.clone();
        self.handle.spawn(async move {
            let code = match child.wait().await {
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
        });
        Ok(pid)
    }

    fn signal(&self, pid: u32, force: bool) {
        whep_server::signal(pid, force);
    }

    fn now(&self) -> Instant {
        Instant::now()
    }

    fn bind_tcp(&self, addr: SocketAddr) -> io::Result<Box<dyn TcpListener>> {
        let bound = whep_server::os::bind_tcp(addr)?;
        bound.set_nonblocking(true)?;
        Ok(Box::new(TokioTcpListener {
            bound,
            listener: std::sync::OnceLock::new(),
            handle: self.handle.clone(),
        }))
    }
}
