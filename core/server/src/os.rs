//! The operating-system helpers every runtime shares: FFmpeg children ([`command`],
//! [`signal`], [`check_program`]), the viewer and ingest sockets' setup ([`udp_state`]) and the
//! default route ([`default_route`]).

use std::io;
use std::net::SocketAddr;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::debug;

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

/// The address the kernel picks towards the Internet: connecting a UDP socket sends nothing.
pub fn default_route() -> Option<SocketAddr> {
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").map(|()| s))
        .and_then(|s| s.local_addr())
        .ok()
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
