//! A UDP relay that delays: one viewer on one side, the server on the other, each datagram
//! held for a fixed one-way delay in each direction. Real sockets on loopback, for tests of
//! behaviour on a long round trip (the kernel here has no `netem`).
//!
//! The server advertises the relay's front address as its host candidate (`--candidate`), so a
//! viewer sends everything there; the relay forwards it to the server from its back socket, and
//! what the server sends to that socket back to the viewer from the front one.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// A delaying relay between one client and one server; stops when dropped.
#[derive(Debug)]
pub struct DelayRelay {
    front: UdpSocket,
    stop: Arc<AtomicBool>,
    forwarded: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl DelayRelay {
    /// Binds the front socket on 127.0.0.1 (give its [`front`](Self::front) address to the
    /// server as its candidate before starting it).
    pub fn bind() -> io::Result<Self> {
        Ok(Self {
            front: UdpSocket::bind("127.0.0.1:0")?,
            stop: Arc::new(AtomicBool::new(false)),
            forwarded: Arc::new(AtomicU64::new(0)),
            thread: None,
        })
    }

    /// The address clients send to.
    pub fn front(&self) -> SocketAddr {
        self.front.local_addr().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Datagrams forwarded so far, both directions.
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }

    /// Starts relaying to `server`, every datagram delayed by `one_way` in each direction.
    pub fn start(&mut self, server: SocketAddr, one_way: Duration) -> io::Result<()> {
        let front = self.front.try_clone()?;
        let back = UdpSocket::bind("127.0.0.1:0")?;
        front.set_nonblocking(true)?;
        back.set_nonblocking(true)?;
        let (stop, forwarded) = (Arc::clone(&self.stop), Arc::clone(&self.forwarded));
        self.thread = Some(thread::spawn(move || {
            // (due, to the server?, bytes), in arrival order: one delay keeps them ordered.
            let mut queue: VecDeque<(Instant, bool, Vec<u8>)> = VecDeque::new();
            let mut client: Option<SocketAddr> = None;
            let mut buf = vec![0u8; 65_536];
            while !stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                while let Ok((n, from)) = front.recv_from(&mut buf) {
                    client = Some(from);
                    queue.push_back((now + one_way, true, buf[..n].to_vec()));
                }
                while let Ok((n, _)) = back.recv_from(&mut buf) {
                    queue.push_back((now + one_way, false, buf[..n].to_vec()));
                }
                while queue.front().is_some_and(|(due, _, _)| *due <= now) {
                    let Some((_, up, data)) = queue.pop_front() else { break };
                    let sent = match (up, client) {
                        (true, _) => back.send_to(&data, server),
                        (false, Some(c)) => front.send_to(&data, c),
                        (false, None) => continue,
                    };
                    if sent.is_ok() {
                        forwarded.fetch_add(1, Ordering::Relaxed);
                    }
                }
                thread::sleep(Duration::from_millis(1));
            }
        }));
        Ok(())
    }
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
