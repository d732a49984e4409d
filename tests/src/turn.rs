//! A real TURN server for the tests: Debian's coturn (`turnserver`) on one address, with the
//! TURN REST scheme (`use-auth-secret`, `static-auth-secret`), UDP and TCP listeners, no TLS.
//! Dropping the guard (also while a panic unwinds) kills it and removes its log and pid files.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// A running `turnserver`; killed on drop.
#[derive(Debug)]
pub struct Coturn {
    child: Child,
    log: PathBuf,
    pid_file: PathBuf,
    /// Where it listens, for UDP and TCP alike.
    pub addr: SocketAddr,
}

/// A port free for both UDP and TCP on `ip` (free when asked; the server binds it right after).
fn free_port(ip: Ipv4Addr) -> io::Result<u16> {
    for _ in 0..32 {
        let udp = UdpSocket::bind((ip, 0))?;
        let port = udp.local_addr()?.port();
        if TcpListener::bind((ip, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(io::Error::other("no port free for both UDP and TCP"))
}

impl Coturn {
    /// Starts `turnserver` on `ip` (listening and relaying there) with the shared `secret`,
    /// and waits until it accepts TCP connections.
    ///
    /// # Errors
    ///
    /// When `turnserver` cannot be run (the test command installs Debian's coturn) or does not
    /// listen within 10 s.
    pub fn start(ip: Ipv4Addr, secret: &str) -> io::Result<Self> {
        let auth = ["--use-auth-secret", "--static-auth-secret", secret, "--realm", "whep"];
        Self::start_with(ip, &auth)
    }

    /// Starts `turnserver` on `ip` as a plain STUN server (`--stun-only`: Binding requests
    /// answered, TURN requests ignored), and waits until it listens.
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start).
    pub fn start_stun_only(ip: Ipv4Addr) -> io::Result<Self> {
        Self::start_with(ip, &["--stun-only", "--no-auth"])
    }

    fn start_with(ip: Ipv4Addr, mode: &[&str]) -> io::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let port = free_port(ip)?;
        let tag = format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let log = std::env::temp_dir().join(format!("whep-e2e-coturn-{tag}.log"));
        let pid_file = std::env::temp_dir().join(format!("whep-e2e-coturn-{tag}.pid"));
        let ip_text = ip.to_string();
        let child = Command::new("turnserver")
            .args(["-n", "--listening-ip", &ip_text, "--relay-ip", &ip_text])
            .args(["--listening-port", &port.to_string()])
            .args(mode)
            .args([
                "--no-tls",
                "--no-dtls",
                "--no-cli",
                "--fingerprint",
                "--simple-log",
                "--verbose",
            ])
            .args(["--min-port", "49152", "--max-port", "65535"])
            .arg("--log-file")
            .arg(&log)
            .arg("--pidfile")
            .arg(&pid_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| io::Error::other(format!("turnserver (Debian's coturn): {e}")))?;
        let mut turn = Self { child, log, pid_file, addr: SocketAddr::from((ip, port)) };
        let up = crate::wait_until(Duration::from_secs(10), || {
            TcpStream::connect_timeout(&turn.addr, Duration::from_millis(200)).is_ok()
        });
        if !up || turn.child.try_wait().ok().flatten().is_some() {
            return Err(io::Error::other(format!("turnserver did not listen:\n{}", turn.log())));
        }
        Ok(turn)
    }

    /// What it has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_file(&self.pid_file);
    }
}
