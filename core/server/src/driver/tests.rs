//! The driver against a fake [`Runtime`]: in-memory UDP sockets, recorded processes and
//! signals, the real clock. What the loop itself decides is checked here without the
//! end-to-end suite: ports bound before FFmpeg is spawned, the timer armed for a restart with
//! no other wake-up to rely on, datagrams handed in and answers sent in order, ingest from a
//! stranger refused, shutdown signalling every process and releasing every socket.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use super::{Engine, ProcessExit, Runtime, TcpListener, TcpStream, Timer, UdpSocket};
use crate::app::{ServerConfig, StreamSpec};
use whep_core::whep::{Method, WhepRequest};
use whep_core::{CoreConfig, StreamId};

const WAIT: Duration = Duration::from_secs(10);
const OFFER: &str = include_str!("../../../tests/data/chromium-156-offer.sdp");

/// Runs `fut` to completion on this thread.
fn block_on<F: Future>(fut: F) -> F::Output {
    struct Unpark(Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        // Only a wake-up polls again: a source that forgets to wake the task shows as a stall.
        thread::park_timeout(Duration::from_secs(30));
    }
}

/// Waits until `pred` holds, polling.
fn eventually(what: &str, mut pred: impl FnMut() -> bool) {
    let until = Instant::now() + WAIT;
    while !pred() {
        assert!(Instant::now() < until, "not within {WAIT:?}: {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap()
}

/// One datagram a fake socket sent.
#[derive(Debug, Clone)]
struct Sent {
    from: SocketAddr,
    to: SocketAddr,
    bytes: Vec<u8>,
}

#[derive(Debug, Default)]
struct Inbox {
    queue: Mutex<VecDeque<(Vec<u8>, SocketAddr)>>,
    waker: Mutex<Option<Waker>>,
}

impl Inbox {
    /// Queues datagrams that arrive together (one wake-up).
    fn push(&self, datagrams: impl IntoIterator<Item = (Vec<u8>, SocketAddr)>) {
        lock(&self.queue).extend(datagrams);
        if let Some(w) = lock(&self.waker).take() {
            w.wake();
        }
    }
}

/// The fake network: bound sockets by address, and everything sent.
#[derive(Debug, Default)]
struct Net {
    bound: Mutex<HashMap<SocketAddr, Arc<Inbox>>>,
    sent: Mutex<Vec<Sent>>,
    /// Datagrams per send call, in order.
    calls: Mutex<Vec<usize>>,
    next_port: AtomicU16,
}

impl Net {
    /// Delivers datagrams from `from` to a bound socket, all at once.
    fn deliver(&self, to: SocketAddr, from: SocketAddr, datagrams: &[Vec<u8>]) {
        let inbox = lock(&self.bound).get(&to).cloned();
        let inbox = inbox.unwrap_or_else(|| panic!("nothing bound at {to}"));
        inbox.push(datagrams.iter().map(|d| (d.clone(), from)));
    }

    fn is_bound(&self, addr: SocketAddr) -> bool {
        lock(&self.bound).contains_key(&addr)
    }

    fn sent_to(&self, to: SocketAddr) -> Vec<Sent> {
        lock(&self.sent).iter().filter(|s| s.to == to).cloned().collect()
    }
}

#[derive(Debug)]
struct FakeUdp {
    addr: SocketAddr,
    inbox: Arc<Inbox>,
    net: Arc<Net>,
}

impl Drop for FakeUdp {
    fn drop(&mut self) {
        lock(&self.net.bound).remove(&self.addr);
    }
}

impl UdpSocket for FakeUdp {
    fn poll_recv_from(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<(usize, SocketAddr)>> {
        if let Some((bytes, from)) = lock(&self.inbox.queue).pop_front() {
            buf[..bytes.len()].copy_from_slice(&bytes);
            return Poll::Ready(Ok((bytes.len(), from)));
        }
        *lock(&self.inbox.waker) = Some(cx.waker().clone());
        // A datagram that came in between is not lost: look once more.
        match lock(&self.inbox.queue).pop_front() {
            Some((bytes, from)) => {
                buf[..bytes.len()].copy_from_slice(&bytes);
                Poll::Ready(Ok((bytes.len(), from)))
            }
            None => Poll::Pending,
        }
    }

    fn poll_send_to(
        &self,
        _: &mut Context<'_>,
        buf: &[u8],
        target: SocketAddr,
    ) -> Poll<io::Result<usize>> {
        lock(&self.net.sent).push(Sent { from: self.addr, to: target, bytes: buf.to_vec() });
        lock(&self.net.calls).push(1);
        Poll::Ready(Ok(buf.len()))
    }

    fn max_segments(&self) -> usize {
        8
    }

    fn poll_send_segments(
        &self,
        _: &mut Context<'_>,
        contents: &[u8],
        segment_size: usize,
        destination: SocketAddr,
    ) -> Poll<io::Result<()>> {
        let mut sent = lock(&self.net.sent);
        for bytes in contents.chunks(segment_size) {
            sent.push(Sent { from: self.addr, to: destination, bytes: bytes.to_vec() });
        }
        lock(&self.net.calls).push(contents.len().div_ceil(segment_size));
        Poll::Ready(Ok(()))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// A timer on the real clock: a sleeping thread wakes the task at the deadline.
#[derive(Debug, Default)]
struct FakeTimer {
    at: Option<Instant>,
    armed: Option<Instant>,
}

impl Timer for FakeTimer {
    fn reset(&mut self, at: Instant) {
        self.at = Some(at);
    }

    fn poll_fired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(at) = self.at else { return Poll::Pending };
        if Instant::now() >= at {
            self.at = None;
            return Poll::Ready(());
        }
        if self.armed != Some(at) {
            self.armed = Some(at);
            let waker = cx.waker().clone();
            thread::spawn(move || {
                thread::sleep(at.saturating_duration_since(Instant::now()));
                waker.wake();
            });
        }
        Poll::Pending
    }
}

/// A process the fake runtime "spawned".
#[derive(Debug)]
struct Proc {
    stream: StreamId,
    args: Vec<String>,
    pid: u32,
    at: Instant,
    exit: Option<ProcessExit>,
}

#[derive(Debug, Default)]
struct Fake {
    net: Arc<Net>,
    procs: Mutex<Vec<Proc>>,
    signals: Mutex<Vec<(u32, bool)>>,
    next_pid: AtomicU32,
    /// Ports a TCP listener cannot bind (held by some other TCP socket).
    tcp_taken: Mutex<Vec<u16>>,
    /// Where TCP listeners were bound.
    tcp_bound: Mutex<Vec<SocketAddr>>,
}

impl Fake {
    /// Reports the exit of process `pid` (as its waiter would).
    fn exit(&self, pid: u32, code: Option<i32>) {
        let exit = lock(&self.procs).iter_mut().find(|p| p.pid == pid).and_then(|p| p.exit.take());
        if let Some(exit) = exit {
            exit.report(code);
        }
    }

    fn spawned(&self) -> usize {
        lock(&self.procs).len()
    }
}

#[derive(Debug, Clone, Default)]
struct FakeRuntime(Arc<Fake>);

impl Runtime for FakeRuntime {
    type UdpSocket = FakeUdp;
    type Timer = FakeTimer;

    fn bind_udp(&self, addr: SocketAddr) -> io::Result<FakeUdp> {
        let mut addr = addr;
        if addr.port() == 0 {
            addr.set_port(50_000 + self.0.net.next_port.fetch_add(1, Ordering::Relaxed));
        }
        let inbox = Arc::new(Inbox::default());
        let mut bound = lock(&self.0.net.bound);
        if bound.contains_key(&addr) {
            return Err(io::ErrorKind::AddrInUse.into());
        }
        bound.insert(addr, Arc::clone(&inbox));
        Ok(FakeUdp { addr, inbox, net: Arc::clone(&self.0.net) })
    }

    fn timer(&self) -> FakeTimer {
        FakeTimer::default()
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        thread::spawn(move || block_on(future));
    }

    fn spawn_process(
        &self,
        stream: &StreamId,
        _program: &str,
        args: &[String],
        exit: ProcessExit,
    ) -> Result<u32, String> {
        let pid = 1000 + self.0.next_pid.fetch_add(1, Ordering::Relaxed);
        let proc = Proc {
            stream: stream.clone(),
            args: args.to_vec(),
            pid,
            at: Instant::now(),
            exit: Some(exit),
        };
        lock(&self.0.procs).push(proc);
        Ok(pid)
    }

    fn signal(&self, pid: u32, force: bool) {
        lock(&self.0.signals).push((pid, force));
        // FFmpeg ends on SIGTERM.
        self.0.exit(pid, None);
    }

    fn now(&self) -> Instant {
        Instant::now()
    }

    fn bind_tcp(&self, addr: SocketAddr) -> io::Result<Box<dyn TcpListener>> {
        if lock(&self.0.tcp_taken).contains(&addr.port()) {
            return Err(io::ErrorKind::AddrInUse.into());
        }
        lock(&self.0.tcp_bound).push(addr);
        Ok(Box::new(FakeListener(addr)))
    }
}

/// A listener nobody connects to.
struct FakeListener(SocketAddr);

impl TcpListener for FakeListener {
    fn poll_accept(
        &self,
        _cx: &mut Context<'_>,
    ) -> Poll<io::Result<(Box<dyn TcpStream>, SocketAddr)>> {
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.0)
    }
}

fn engine(runtime: &FakeRuntime) -> Engine<FakeRuntime> {
    let mut config = ServerConfig {
        udp_bind: SocketAddr::from(([127, 0, 0, 1], 3478)),
        udp_gso: true,
        ..ServerConfig::default()
    };
    config.core = CoreConfig { rng_seed: [7; 32], ingest_ports: 40_000..=40_099, ..config.core };
    config.core.process.restart_backoff_initial = Duration::from_millis(300);
    Engine::start(runtime.clone(), config, &[]).unwrap()
}

fn ingest(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn ports_are_bound_before_ffmpeg_is_spawned_and_a_crash_restarts_it_from_the_timer() {
    let rt = FakeRuntime::default();
    let engine = engine(&rt);
    let mut events = engine.subscribe();
    block_on(engine.add_stream("s", StreamSpec::demo())).unwrap();
    eventually("FFmpeg spawned", || rt.0.spawned() == 1);
    let first = lock(&rt.0.procs).first().map(|p| (p.stream.clone(), p.args.clone(), p.pid));
    let (stream, args, pid) = first.unwrap();
    assert_eq!(stream.as_str(), "s");
    // The legs name the ports bound for them, and the ports FFmpeg sends from.
    assert!(rt.0.net.is_bound(ingest(40_000)) && rt.0.net.is_bound(ingest(40_001)));
    let leg = "udp://127.0.0.1:40000?pkt_size=1200&localaddr=127.0.0.1&localport=40002";
    assert!(args.iter().any(|a| a == leg), "{args:?}");

    // FFmpeg dies: nothing else happens in this world, so only the armed timer can bring the
    // restart after its backoff.
    let died = Instant::now();
    rt.0.exit(pid, Some(1));
    eventually("FFmpeg restarted", || rt.0.spawned() == 2);
    let waited = lock(&rt.0.procs)[1].at.saturating_duration_since(died);
    assert!(waited >= Duration::from_millis(250), "restarted after {waited:?}, before its backoff");
    // Both runs were announced, the exit between them (the second spawn came after both).
    let mut seen = Vec::new();
    block_on(async {
        while seen.len() < 3 {
            match events.recv().await {
                Some(whep_core::Event::StreamReady { .. }) => seen.push("ready"),
                Some(whep_core::Event::ProcessExited { .. }) => seen.push("exited"),
                Some(_) => {}
                None => break,
            }
        }
    });
    assert_eq!(seen, ["ready", "exited", "ready"]);

    block_on(engine.shutdown());
    let signals = lock(&rt.0.signals).clone();
    assert_eq!(signals.first().map(|s| s.1), Some(false), "SIGTERM first: {signals:?}");
    assert!(!rt.0.net.is_bound(ingest(40_000)), "ingest sockets released at shutdown");
}

#[test]
fn checks_are_answered_in_order_and_ingest_from_a_stranger_is_refused() {
    let rt = FakeRuntime::default();
    let engine = engine(&rt);
    let spec = StreamSpec { external: true, ..StreamSpec::default() };
    block_on(engine.add_stream("x", spec)).unwrap();
    eventually("ingest bound", || rt.0.net.is_bound(ingest(40_000)));
    let req = WhepRequest::new(Method::Post, "/whep/x")
        .with_header("Content-Type", "application/sdp")
        .with_body(OFFER);
    let resp = block_on(engine.handle_whep_request(req));
    assert_eq!(resp.code(), 201, "{}", String::from_utf8_lossy(&resp.body));
    let answer = String::from_utf8_lossy(&resp.body).into_owned();
    let player_ufrag = OFFER.lines().find_map(|l| l.trim().strip_prefix("a=ice-ufrag:")).unwrap();

    // Two players' checks arrive together: each gets its answer, in the order they came.
    let viewer_socket = engine.udp_addr();
    let (a, b): (SocketAddr, SocketAddr) =
        ("10.0.0.1:5000".parse().unwrap(), "10.0.0.2:5000".parse().unwrap());
    for (from, nonce) in [(a, 1), (b, 2)] {
        let check = whep_core::sim::binding_request(&answer, player_ufrag, nonce);
        rt.0.net.deliver(viewer_socket, from, &[check]);
    }
    eventually("both checks answered", || {
        rt.0.net.sent_to(a).len() + rt.0.net.sent_to(b).len() >= 2
    });
    let sent = lock(&rt.0.net.sent).clone();
    let order: Vec<SocketAddr> =
        sent.iter().filter(|s| s.to == a || s.to == b).map(|s| s.to).collect();
    assert_eq!(order[..2], [a, b]);
    for s in sent.iter().filter(|s| s.to == a || s.to == b) {
        assert_eq!(s.from, viewer_socket);
        assert_eq!(&s.bytes[..2], &[0x01, 0x01], "a STUN binding success response");
    }

    // Answers of one size to one player, produced in one wake-up, leave in one segmented send.
    let calls_before = lock(&rt.0.net.calls).len();
    let answered = rt.0.net.sent_to(a).len();
    let checks: Vec<Vec<u8>> = (10..13)
        .map(|nonce| whep_core::sim::binding_request(&answer, player_ufrag, nonce))
        .collect();
    rt.0.net.deliver(viewer_socket, a, &checks);
    eventually("three more answers", || rt.0.net.sent_to(a).len() == answered + 3);
    let calls = lock(&rt.0.net.calls)[calls_before..].to_vec();
    assert_eq!(calls, [3], "one send of three segments");

    // An external feed's port takes its first sender; another one is refused and counted.
    let rtp = |ssrc: u8| {
        let mut p = vec![0x80, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, ssrc];
        p.extend_from_slice(&[0x65; 100]);
        p
    };
    let (feed, stranger) = (ingest(45_000), ingest(45_001));
    rt.0.net.deliver(ingest(40_000), feed, &[rtp(1)]);
    rt.0.net.deliver(ingest(40_000), stranger, &vec![rtp(2); 5]);
    eventually("stranger's datagrams refused", || block_on(engine.metrics()).ingest_rejected == 5);
    assert_eq!(block_on(engine.metrics()).ingest_packets, 6);
    block_on(engine.shutdown());
}

#[test]
fn an_ephemeral_viewer_port_is_one_free_for_tcp_too() {
    let runtime = FakeRuntime::default();
    // The fake hands out 50000, 50001, ... for port 0; the first three are held for TCP.
    lock(&runtime.0.tcp_taken).extend([50_000, 50_001, 50_002]);
    let config = ServerConfig {
        udp_bind: SocketAddr::from(([127, 0, 0, 1], 0)),
        core: CoreConfig { rng_seed: [7; 32], ..CoreConfig::default() },
        ..ServerConfig::default()
    };
    let engine = Engine::start(runtime.clone(), config, &[]).unwrap();
    assert_eq!(engine.udp_addr().port(), 50_003);
    assert_eq!(*lock(&runtime.0.tcp_bound), vec![SocketAddr::from(([127, 0, 0, 1], 50_003))]);
    drop(engine);
}

#[test]
fn a_dropped_request_future_cancels_its_pending_authorisation() {
    // An authorisation server that accepts and never answers, and room for one pending request.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/auth", silent.local_addr().unwrap());
    let rt = FakeRuntime::default();
    let mut config = ServerConfig {
        udp_bind: SocketAddr::from(([127, 0, 0, 1], 3478)),
        ..ServerConfig::default()
    };
    config.core.rng_seed = [7; 32];
    config.core.auth.http = Some(whep_core::auth::HttpAuth {
        timeout: Duration::from_secs(60),
        cache_ttl: Duration::ZERO,
        max_pending: 1,
    });
    config.auth.http_url = Some(crate::auth::HttpUrl::parse(&url).unwrap());
    let engine = Engine::start(rt.clone(), config, &[]).unwrap();
    block_on(engine.add_stream("x", StreamSpec { external: true, ..StreamSpec::default() }))
        .unwrap();
    let post = || {
        WhepRequest::new(Method::Post, "/whep/x")
            .with_header("Content-Type", "application/sdp")
            .with_header("Authorization", "Bearer t")
            .with_body(OFFER)
    };
    let pending = || block_on(engine.with_shard(0, |core, _, _| core.pending_requests())).unwrap();
    // Polled once (the request reaches the loop and is parked), then dropped: the HTTP
    // server's connection closed.
    let mut request = Box::pin(engine.handle_whep_request(post()));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(request.as_mut().poll(&mut cx).is_pending());
    eventually("the request pending", || pending() == 1);
    drop(request);
    assert_eq!(pending(), 0, "the pending request outlived its future");
    // Its place is free: the next request waits too, rather than getting 503 at once.
    let mut next = Box::pin(engine.handle_whep_request(post()));
    assert!(next.as_mut().poll(&mut cx).is_pending());
    eventually("the next request pending", || pending() == 1);
    drop(next);
    drop(silent);
}
