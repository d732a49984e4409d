//! FFmpeg children on async-process: spawn without stdin, forward stderr to `tracing`, report
//! the exit.

use std::process::Stdio;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use smol::channel::Sender;
use smol::io::{AsyncBufReadExt, BufReader};
use smol::stream::StreamExt;
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
/// The child is killed if that task is dropped, and on Linux it gets SIGKILL when the thread
/// that spawned it dies (`PR_SET_PDEATHSIG`), so that no FFmpeg outlives a killed server.
pub(crate) fn spawn(
    stream: &StreamId,
    generation: u64,
    program: &str,
    args: &[String],
    exits: Sender<ProcessExit>,
) -> Result<u32, String> {
    let mut std_cmd = std::process::Command::new(program);
    std_cmd.args(args);
    set_parent_death_signal(&mut std_cmd);
    let mut cmd = smol::process::Command::from(std_cmd);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => whep_core::cli::missing_ffmpeg(program),
        std::io::ErrorKind::PermissionDenied => format!("`{program}` is not executable: {e}"),
        _ => format!("could not run `{program}`: {e}"),
    })?;
    let pid = child.id();
    let stderr = child.stderr.take();
    let stream = stream.clone();
    if let Some(stderr) = stderr {
        let stream = stream.clone();
        // Its own task: a grandchild holding stderr open must not delay the exit report.
        smol::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Some(Ok(line)) = lines.next().await {
                warn!(target: "ffmpeg", stream = %stream, pid, "{line}");
            }
        })
        .detach();
    }
    smol::spawn(async move {
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
        let _ = exits.send(ProcessExit { stream, generation, code }).await;
    })
    .detach();
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
fn set_parent_death_signal(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2) and
    // sigprocmask(2), which are async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            // The server blocks SIGTERM/SIGINT in all its threads to receive them synchronously;
            // a blocked mask survives exec, and FFmpeg must see SIGTERM.
            nix::sys::signal::SigSet::all().thread_unblock().map_err(std::io::Error::from)?;
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn set_parent_death_signal(_cmd: &mut std::process::Command) {}
