//! Load measurement: N str0m viewers watch a server's demo stream; reports the CPU the server
//! process and its FFmpeg used, and what each viewer received.
//!
//! ```sh
//! cargo run --release -p whep-e2e --bin whep-load -- --viewers 20 --seconds 20
//! cargo run --release -p whep-e2e --bin whep-load -- --server path/to/whepd --viewers 1
//! ```
//!
//! The server defaults to `whepd-tokio` next to this binary (same build profile). CPU is read
//! from `/proc/PID/stat` (user + system time) over the measured window, after every viewer
//! receives media, and reported as a share of one core.

#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use whep_e2e::Server;
use whep_e2e::viewer::Viewer;

struct Args {
    server: PathBuf,
    viewers: usize,
    seconds: u64,
}

fn args() -> Result<Args, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut a = Args { server: exe.with_file_name("whepd-tokio"), viewers: 1, seconds: 20 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--server" => a.server = value()?.into(),
            "--viewers" => a.viewers = value()?.parse().map_err(|e| format!("--viewers: {e}"))?,
            "--seconds" => a.seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

/// User + system CPU seconds of a process, from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(") ")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command name: state is field 3, utime 14, stime 15 (1-based in proc(5)).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    #[allow(clippy::cast_precision_loss)]
    Some((utime + stime) / ticks as f64)
}

fn main() -> std::process::ExitCode {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            println!("whep-load: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let n = a.viewers.to_string();
    let server_bin = a.server.to_string_lossy().into_owned();
    let server = Server::start(&server_bin, &["--max-viewers", &n, "--max-viewers-total", &n]);
    let ffmpeg = server
        .wait_stream("demo", Duration::from_secs(20), |s| s["pid"].is_u64())
        .map(|s| u32::try_from(s["pid"].as_u64().unwrap_or_default()).unwrap_or_default())
        .unwrap_or_default();
    let setup = Instant::now();
    let viewers: Vec<Viewer> = (0..a.viewers)
        .filter_map(|_| match Viewer::connect(server.http, "/whep/demo", None) {
            Ok(v) => Some(v),
            Err(e) => {
                println!("viewer refused: {e}");
                None
            }
        })
        .collect();
    let playing = viewers
        .iter()
        .filter(|v| {
            v.wait_for(Duration::from_secs(20), |s| s.video_packets > 0 && s.audio_packets > 0)
        })
        .count();
    println!(
        "{playing}/{} viewers playing after {:.2} s; measuring {} s",
        a.viewers,
        setup.elapsed().as_secs_f64(),
        a.seconds
    );
    let before: Vec<_> = viewers.iter().map(Viewer::stats).collect();
    let (s0, f0, t0) = (cpu_seconds(server.pid()), cpu_seconds(ffmpeg), Instant::now());
    let fwd0 = server.metric("whep_packets_forwarded_total").unwrap_or(0.0);
    std::thread::sleep(Duration::from_secs(a.seconds));
    let wall = t0.elapsed().as_secs_f64();
    let (s1, f1) = (cpu_seconds(server.pid()), cpu_seconds(ffmpeg));
    let fwd1 = server.metric("whep_packets_forwarded_total").unwrap_or(0.0);
    #[allow(clippy::cast_precision_loss)]
    let per_viewer: Vec<(f64, f64)> = viewers
        .iter()
        .zip(&before)
        .map(|(v, b)| {
            let s = v.stats();
            (
                (s.video_packets - b.video_packets) as f64 / wall,
                (s.audio_packets - b.audio_packets) as f64 / wall,
            )
        })
        .collect();
    let share = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.1} %", (b - a) / wall * 100.0),
        _ => "n/a".into(),
    };
    let min_video = per_viewer.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let min_audio = per_viewer.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    println!("server ({server_bin}) CPU: {} of one core", share(s0, s1));
    println!("FFmpeg CPU: {} of one core", share(f0, f1));
    println!("forwarded: {:.0} packets/s", (fwd1 - fwd0) / wall);
    println!("slowest viewer: {min_video:.0} video + {min_audio:.0} audio packets/s");
    drop(viewers);
    drop(server);
    std::process::ExitCode::SUCCESS
}
