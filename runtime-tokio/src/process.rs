//! FFmpeg children: spawn without stdin, forward stderr to `tracing`, report the exit.

use std::io;
use std::process::Stdio;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tracing::{debug, warn};
use whep_core::StreamId;

/// A child's exit, sent to the engine task.
#[derive(Debug)]
pub(crate) struct ProcessExit {
    pub(crate) stream: StreamId,
    pub(crate) generation: u64,
    pub(crate) code: Option<i32>,
}

/// Spawns `program args…` and returns its pid. A task forwards its stderr line by line to
/// `tracing` (target `ffmpeg`, with the stream id), waits for it and sends its exit on `exits`.
/// The child is killed if that task is dropped (runtime shut down), and on Linux it gets SIGKILL
/// when the thread that spawned it dies (`PR_SET_PDEATHSIG`), so that no FFmpeg outlives a
/// killed server.
pub(crate) fn spawn(
    stream: &StreamId,
    generation: u64,
    program: &str,
    args: &[String],
    exits: mpsc::UnboundedSender<ProcessExit>,
) -> Result<u32, String> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    set_parent_death_signal(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => whep_core::cli::missing_ffmpeg(program),
        io::ErrorKind::PermissionDenied => format!("`{program}` is not executable: {e}"),
        _ => format!("could not run `{program}`: {e}"),
    })?;
    let pid = child.id().ok_or("the process exited before its pid was read")?;
    debug!(%stream, pid, generation, "FFmpeg started");
    let stderr = child.stderr.take();
    let stream = stream.clone();
    if let Some(stderr) = stderr {
        let stream = stream.clone();
        // Its own task: a grandchild holding stderr open must not delay the exit report.
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                warn!(target: "ffmpeg", stream = %stream, pid, "{line}");
            }
        });
    }
    tokio::spawn(async move {
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
        let _ = exits.send(ProcessExit { stream, generation, code });
    });
    Ok(pid)
}

/// Sends SIGTERM (or SIGKILL when `force`) to `pid`. A process that is already gone is fine.
pub(crate) fn signal(pid: u32, force: bool) {
    let Ok(raw) = i32::try_from(pid) else { return };
    let sig = if force { Signal::SIGKILL } else { Signal::SIGTERM };
    if let Err(e) = kill(Pid::from_raw(raw), sig) {
        debug!(pid, ?sig, error = %e, "signal not delivered");
    }
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn set_parent_death_signal(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which is
    // async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from));
    }
}

#[cfg(not(target_os = "linux"))]
fn set_parent_death_signal(_cmd: &mut Command) {}
