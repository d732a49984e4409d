//! The operating-system helpers every runtime shares: FFmpeg children ([`command`],
//! [`signal`], [`check_program`]), the viewer and ingest sockets' setup ([`udp_state`]), the
//! dual-stack binds of the viewer socket and the listeners ([`bind_udp`], [`bind_tcp`]) and the
//! default routes ([`default_routes`]).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::{debug, info};

/// Send and receive buffer asked for every UDP socket: a frame's datagrams for hundreds of
/// viewers, or a burst of ingest, must not overflow the kernel's default (~200 KiB).
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Kernel send buffer asked for each ICE-TCP connection: what the kernel holds for a viewer
/// that reads slowly is latency the engine cannot drop, so it stays small (the kernel doubles
/// it) and the connection's own queue ([`whep_core::tcp::SendQueue`]) does the rest.
pub const ICE_TCP_SEND_BUFFER: usize = 64 << 10;

/// Sets up an accepted ICE-TCP connection: `TCP_NODELAY` (every frame is a packet that is due
/// now) and a small send buffer ([`ICE_TCP_SEND_BUFFER`]). Failures are logged, not fatal.
pub fn ice_tcp_setup(stream: &impl std::os::fd::AsFd) {
    use nix::sys::socket::{setsockopt, sockopt};
    if let Err(e) = setsockopt(stream, sockopt::TcpNoDelay, &true) {
        debug!(error = %e, "TCP_NODELAY not set");
    }
    if let Err(e) = setsockopt(stream, sockopt::SndBuf, &ICE_TCP_SEND_BUFFER) {
        debug!(error = %e, "ICE-TCP send buffer not set");
    }
}

/// `program args…` as a child of the server: on Linux it gets SIGKILL when the thread that
/// spawned it dies (`PR_SET_PDEATHSIG`, so that no FFmpeg outlives a killed server), and it
/// starts with no signal blocked (a server that receives SIGTERM synchronously blocks it in its
/// threads, the mask survives exec, and FFmpeg must see SIGTERM). The caller sets stdio.
pub fn command(program: &str, args: &[String]) -> std::process::Command {
    let mut cmd = std::process::Command::new(program);
    cmd.args(args);
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure runs in the forked child before exec and only calls
        // pthread_sigmask(3) and prctl(2), which are async-signal-safe; it allocates nothing and
        // touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::signal::SigSet::empty().thread_set_mask().map_err(io::Error::from)?;
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)
            });
        }
    }
    cmd
}

/// Sends SIGTERM (or SIGKILL when `force`) to `pid`. A process that is already gone is fine.
pub fn signal(pid: u32, force: bool) {
    let Ok(raw) = i32::try_from(pid) else { return };
    let sig = if force { Signal::SIGKILL } else { Signal::SIGTERM };
    if let Err(e) = kill(Pid::from_raw(raw), sig) {
        debug!(pid, ?sig, error = %e, "signal not delivered");
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
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(crate::cli::missing_ffmpeg(program)),
        Err(e) => Err(format!("cannot run FFmpeg (`{program}`): {e}")),
    }
}

/// The kernel's ephemeral port range (`/proc/sys/net/ipv4/ip_local_port_range`), where it
/// picks the port of a socket bound to port 0; `None` where it cannot be read.
pub fn ephemeral_ports() -> Option<std::ops::RangeInclusive<u16>> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut parts = text.split_whitespace().map(str::parse::<u16>);
    match (parts.next(), parts.next()) {
        (Some(Ok(low)), Some(Ok(high))) if low <= high => Some(low..=high),
        _ => None,
    }
}

/// The ports `a` and `b` share, if any.
pub fn overlap(
    a: &std::ops::RangeInclusive<u16>,
    b: &std::ops::RangeInclusive<u16>,
) -> Option<std::ops::RangeInclusive<u16>> {
    let (low, high) = ((*a.start()).max(*b.start()), (*a.end()).min(*b.end()));
    (low <= high).then_some(low..=high)
}

/// Warns (in the log) when the ingest range overlaps the kernel's ephemeral ports: a socket any
/// program binds to port 0 may then take a port FFmpeg must send from, and FFmpeg's start
/// fails until it is free again. The binaries call it at start.
pub fn warn_ingest_overlap(ingest: &std::ops::RangeInclusive<u16>) {
    if let Some(ephemeral) = ephemeral_ports()
        && let Some(shared) = overlap(ingest, &ephemeral)
    {
        tracing::warn!(
            ingest = ?ingest, ephemeral = ?ephemeral, shared = ?shared,
            "the ingest ports overlap the kernel's ephemeral ports \
             (/proc/sys/net/ipv4/ip_local_port_range): another socket may take a port FFmpeg \
             sends from; choose --ingest-ports outside them"
        );
    }
}

/// The address the kernel picks towards the Internet over IPv4: connecting a UDP socket sends
/// nothing.
pub fn default_route() -> Option<SocketAddr> {
    route_from("0.0.0.0:0", "192.0.2.1:9")
}

/// The addresses the kernel picks towards the Internet, IPv4 then IPv6, each where the host
/// has a route: the host candidates of a wildcard bind
/// ([`default_candidates`](crate::app::default_candidates), which leaves out link-local ones).
pub fn default_routes() -> Vec<SocketAddr> {
    [default_route(), route_from("[::]:0", "[2001:db8::1]:9")].into_iter().flatten().collect()
}

fn route_from(bind: &str, probe: &str) -> Option<SocketAddr> {
    std::net::UdpSocket::bind(bind)
        .and_then(|s| s.connect(probe).map(|()| s))
        .and_then(|s| s.local_addr())
        .ok()
}

/// Whether binding `addr` failed because the host has no IPv6 (the protocol is disabled or
/// not built in): a wildcard `[::]` then falls back to `0.0.0.0`.
fn no_ipv6(addr: SocketAddr, e: &io::Error) -> bool {
    addr.is_ipv6()
        && addr.ip().is_unspecified()
        && (matches!(e.raw_os_error(), Some(nix::libc::EAFNOSUPPORT | nix::libc::EADDRNOTAVAIL))
            || e.kind() == io::ErrorKind::AddrNotAvailable)
}

/// A socket of `addr`'s family and `kind`, bound to `addr`; an IPv6 one with `IPV6_V6ONLY`
/// off, so that `[::]` serves IPv4 too (peers then show as `[::ffff:a.b.c.d]`, which the core
/// reads as IPv4, see [`whep_core::canonical_addr`]), whatever the host's
/// `net.ipv6.bindv6only`.
fn bound_socket(addr: SocketAddr, kind: nix::sys::socket::SockType) -> io::Result<OwnedFd> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockaddrIn, SockaddrIn6, SockaddrLike, bind, setsockopt, socket,
        sockopt,
    };
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket(family, kind, SockFlag::SOCK_CLOEXEC, None)?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &false)?;
    }
    if kind == nix::sys::socket::SockType::Stream {
        // As std's `TcpListener::bind`: a restarted server rebinds at once.
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    }
    let sockaddr: Box<dyn SockaddrLike> = match addr {
        SocketAddr::V4(a) => Box::new(SockaddrIn::from(a)),
        SocketAddr::V6(a) => Box::new(SockaddrIn6::from(a)),
    };
    bind(fd.as_raw_fd(), &*sockaddr)?;
    Ok(fd)
}

/// A UDP socket bound to `addr`, blocking: for `[::]` a dual-stack one (IPv4 and IPv6), or
/// `0.0.0.0` on a host without IPv6 (logged). The viewer socket of every runtime.
pub fn bind_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    use nix::sys::socket::SockType;
    match bound_socket(addr, SockType::Datagram) {
        Ok(fd) => Ok(fd.into()),
        Err(e) if no_ipv6(addr, &e) => {
            info!(%addr, error = %e, "no IPv6 on this host: the viewer socket serves IPv4 only");
            std::net::UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], addr.port())))
        }
        Err(e) => Err(e),
    }
}

/// A TCP listener bound to `addr`, blocking: for `[::]` a dual-stack one, or `0.0.0.0` on a
/// host without IPv6 (logged). The HTTP and ICE-TCP listeners of every runtime.
pub fn bind_tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use nix::sys::socket::{Backlog, SockType, listen};
    let listener = |addr| -> io::Result<std::net::TcpListener> {
        let fd = bound_socket(addr, SockType::Stream)?;
        listen(&fd, Backlog::new(1024).unwrap_or(Backlog::MAXCONN))?;
        Ok(fd.into())
    };
    match listener(addr) {
        Err(e) if no_ipv6(addr, &e) => {
            info!(%addr, error = %e, "no IPv6 on this host: listening on IPv4 only");
            listener(SocketAddr::from(([0, 0, 0, 0], addr.port())))
        }
        r => r,
    }
}

/// `destination` as a socket bound to `local` sends to it: an IPv4 address in its IPv4-mapped
/// form (`[::ffff:a.b.c.d]`) from an IPv6 (dual-stack) socket, as the core hands addresses out
/// in their plain form ([`whep_core::canonical_addr`]); anything else as it is.
pub fn for_socket(destination: SocketAddr, local: SocketAddr) -> SocketAddr {
    match destination {
        SocketAddr::V4(v4) if local.is_ipv6() => {
            SocketAddr::new(std::net::IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
        }
        _ => destination,
    }
}

/// quinn-udp's state for a bound UDP socket (GSO, GRO, receive timestamps), its buffers set
/// to [`SOCKET_BUFFER`] where the kernel allows.
pub fn udp_state(socket: &std::net::UdpSocket) -> io::Result<quinn_udp::UdpSocketState> {
    let state = quinn_udp::UdpSocketState::new(socket.into())?;
    for set in [
        quinn_udp::UdpSocketState::set_send_buffer_size,
        quinn_udp::UdpSocketState::set_recv_buffer_size,
    ] {
        if let Err(e) = set(&state, socket.into(), SOCKET_BUFFER) {
            debug!(error = %e, "socket buffer size not set");
        }
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_overlap_where_they_share_ports() {
        assert_eq!(overlap(&(40_000..=40_999), &(32_768..=60_999)), Some(40_000..=40_999));
        assert_eq!(overlap(&(20_000..=20_999), &(32_768..=60_999)), None);
        assert_eq!(overlap(&(32_000..=33_000), &(32_768..=60_999)), Some(32_768..=33_000));
        assert_eq!(overlap(&(60_999..=61_000), &(32_768..=60_999)), Some(60_999..=60_999));
        // The default ingest range is outside Linux's default ephemeral range.
        let default = whep_core::CoreConfig::default().ingest_ports;
        assert_eq!(overlap(&default, &(32_768..=60_999)), None);
        if let Some(here) = ephemeral_ports() {
            assert!(here.start() <= here.end());
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn only_a_wildcard_ipv6_bind_falls_back_to_ipv4() {
        let gone = io::Error::from_raw_os_error(nix::libc::EAFNOSUPPORT);
        assert!(no_ipv6(addr("[::]:3478"), &gone));
        assert!(!no_ipv6(addr("[2001:db8::1]:3478"), &gone), "a chosen address fails");
        assert!(!no_ipv6(addr("0.0.0.0:3478"), &gone));
        let taken = io::Error::from_raw_os_error(nix::libc::EADDRINUSE);
        assert!(!no_ipv6(addr("[::]:3478"), &taken), "a port in use fails");
    }

    #[test]
    fn ipv4_destinations_are_mapped_for_an_ipv6_socket_only() {
        let v4 = addr("192.0.2.1:5000");
        assert_eq!(for_socket(v4, addr("[::]:3478")), addr("[::ffff:192.0.2.1]:5000"));
        assert_eq!(for_socket(v4, addr("0.0.0.0:3478")), v4);
        let v6 = addr("[2001:db8::1]:5000");
        assert_eq!(for_socket(v6, addr("[::]:3478")), v6);
    }

    /// `[::]` is one socket for both families, whatever `net.ipv6.bindv6only` says: IPv4
    /// arrives IPv4-mapped, and an IPv4 address in mapped form is reached.
    #[test]
    fn a_wildcard_ipv6_bind_is_dual_stack() {
        use nix::sys::socket::{getsockopt, sockopt};
        let udp = bind_udp(addr("[::]:0")).expect("UDP on [::]");
        let local = udp.local_addr().expect("addr");
        assert!(local.is_ipv6(), "{local}");
        assert!(!getsockopt(&udp, sockopt::Ipv6V6Only).expect("getsockopt"));
        udp.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").expect("IPv4 peer");
        peer.send_to(b"v4", ("127.0.0.1", local.port())).expect("send");
        let mut buf = [0u8; 8];
        let (n, from) = udp.recv_from(&mut buf).expect("IPv4 datagram on [::]");
        assert_eq!(&buf[..n], b"v4");
        assert_eq!(
            from,
            addr(&format!("[::ffff:127.0.0.1]:{}", peer.local_addr().expect("a").port()))
        );
        assert_eq!(whep_core::canonical_addr(from), peer.local_addr().expect("addr"));
        // Back to the plain form, mapped for this socket.
        let to = for_socket(whep_core::canonical_addr(from), local);
        udp.send_to(b"back", to).expect("send to the mapped form");
        peer.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
        let (n, _) = peer.recv_from(&mut buf).expect("reply");
        assert_eq!(&buf[..n], b"back");

        let tcp = bind_tcp(addr("[::]:0")).expect("TCP on [::]");
        assert!(!getsockopt(&tcp, sockopt::Ipv6V6Only).expect("getsockopt"));
        let port = tcp.local_addr().expect("addr").port();
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("IPv4 connect");
        let (_conn, from) = tcp.accept().expect("accept");
        assert_eq!(whep_core::canonical_addr(from).ip(), std::net::Ipv4Addr::LOCALHOST);
    }
}
