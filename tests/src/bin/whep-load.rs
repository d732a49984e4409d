//! `whep-load`: N WHEP viewers (str0m, one process) against any WHEP endpoint, or against a
//! server binary it starts itself. Reports setup times, time to the first decodable frame,
//! packets, bytes, loss and reordering per viewer, and the server's CPU when it started it.
//!
//! ```sh
//! cargo build --release -p whep-e2e --bins
//! # a whepd it starts (the demo stream), 20 viewers for 15 s:
//! $HOME/.cache/whep-target/release/whep-load --viewers 20 --seconds 15
//! # any WHEP server (http only):
//! $HOME/.cache/whep-target/release/whep-load --url http://10.0.0.5:8080/whep/cam1 --viewers 50
//! ```
//!
//! Exits 1 when a viewer is refused or never plays, or when a viewer's loss exceeds
//! `--max-loss` percent; 2 on bad arguments.

#![allow(clippy::print_stdout)]

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use whep_e2e::Server;
use whep_e2e::viewer::{Stats, Viewer};

/// Load-tests a WHEP endpoint with N str0m viewers and reports what they received.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// WHEP endpoint to load, `http://HOST:PORT/PATH`. Without it, whep-load starts `--server`
    /// with its demo stream and loads `/whep/demo`.
    #[arg(long)]
    url: Option<String>,
    /// Server binary to start when no `--url` is given [default: whepd-tokio next to this
    /// binary].
    #[arg(long)]
    server: Option<PathBuf>,
    /// Extra argument for the server it starts (repeat), e.g. `--server-arg=--no-gop-cache`.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Number of viewers.
    #[arg(long, default_value_t = 1)]
    viewers: usize,
    /// Length of the measured window, after every viewer plays (or gave up).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Pause between two viewers' POSTs, in milliseconds.
    #[arg(long, default_value_t = 0)]
    ramp_ms: u64,
    /// How long a viewer may take to receive its first keyframe, in seconds.
    #[arg(long, default_value_t = 20)]
    play_timeout: u64,
    /// Bearer token for the endpoint.
    #[arg(long)]
    token: Option<String>,
    /// Fail when any viewer lost more than this percentage of packets in the window.
    #[arg(long, default_value_t = 1.0)]
    max_loss: f64,
    /// Print one line per viewer.
    #[arg(long)]
    per_viewer: bool,
}

/// `http://host:port/path` → (address, path).
fn parse_url(url: &str) -> Result<(SocketAddr, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs are supported"))?;
    let (host, path) =
        rest.split_once('/').map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let host = if host.contains(':') { host.to_owned() } else { format!("{host}:80") };
    let addr = host
        .to_socket_addrs()
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}: no address"))?;
    Ok((addr, path))
}

/// User + system CPU seconds of a process, from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    // After the command name: utime and stime are fields 14 and 15 of proc(5).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    #[allow(clippy::cast_precision_loss)]
    Some((utime + stime) / ticks as f64)
}

/// p50 / p99 / max of durations in milliseconds.
fn percentiles(mut ms: Vec<f64>) -> String {
    if ms.is_empty() {
        return "n/a".into();
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((ms.len() - 1) as f64 * q).round() as usize;
        ms[i]
    };
    format!("p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms", at(0.5), at(0.99), at(1.0))
}

fn since(later: Option<Instant>, earlier: Option<Instant>) -> Option<f64> {
    Some(later?.checked_duration_since(earlier?)?.as_secs_f64() * 1000.0)
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Either a server we start, or the URL.
    let mut own = None;
    let (addr, path) = match &args.url {
        Some(url) => match parse_url(url) {
            Ok(t) => t,
            Err(e) => {
                println!("whep-load: {e}");
                return ExitCode::from(2);
            }
        },
        None => {
            let bin = args.server.clone().unwrap_or_else(|| {
                std::env::current_exe().unwrap_or_default().with_file_name("whepd-tokio")
            });
            let n = args.viewers.to_string();
            let mut server_args = vec!["--max-viewers", &n, "--max-viewers-total", &n];
            server_args.extend(args.server_args.iter().map(String::as_str));
            let server = Server::start(&bin.to_string_lossy(), &server_args);
            let ready = server.wait_stream("demo", Duration::from_secs(20), |s| s["pid"].is_u64());
            let ffmpeg =
                ready.ok().and_then(|s| s["pid"].as_u64()).and_then(|p| u32::try_from(p).ok());
            let addr = server.http;
            own = Some((server, ffmpeg));
            (addr, "/whep/demo".to_owned())
        }
    };

    let start = Instant::now();
    let mut viewers = Vec::new();
    let mut refused = 0;
    for i in 0..args.viewers {
        if i > 0 && args.ramp_ms > 0 {
            std::thread::sleep(Duration::from_millis(args.ramp_ms));
        }
        match Viewer::connect(addr, &path, args.token.as_deref()) {
            Ok(v) => viewers.push(v),
            Err(e) => {
                refused += 1;
                println!("viewer {i}: {e}");
            }
        }
    }
    let deadline = Duration::from_secs(args.play_timeout);
    let playing = viewers
        .iter()
        .filter(|v| v.wait_for(deadline, |s| s.first_keyframe_at.is_some() && s.audio_packets > 0))
        .count();
    println!(
        "{playing}/{} viewers playing ({refused} refused) {:.2} s after the first POST; measuring {} s",
        args.viewers,
        start.elapsed().as_secs_f64(),
        args.seconds
    );
    let setup: Vec<Stats> = viewers.iter().map(Viewer::stats).collect();
    println!(
        "POST to 201:            {}",
        percentiles(setup.iter().filter_map(|s| since(s.answered_at, s.posted_at)).collect())
    );
    println!(
        "POST to connected:      {}",
        percentiles(setup.iter().filter_map(|s| since(s.connected_at, s.posted_at)).collect())
    );
    println!(
        "POST to first keyframe: {}",
        percentiles(setup.iter().filter_map(|s| since(s.first_keyframe_at, s.posted_at)).collect())
    );

    let cpu = |p: Option<u32>| p.and_then(cpu_seconds);
    let server_pid = own.as_ref().map(|(s, _)| s.pid());
    let ffmpeg_pid = own.as_ref().and_then(|(_, f)| *f);
    let (s0, f0, t0) = (cpu(server_pid), cpu(ffmpeg_pid), Instant::now());
    let before: Vec<Stats> = viewers.iter().map(Viewer::stats).collect();
    std::thread::sleep(Duration::from_secs(args.seconds));
    let wall = t0.elapsed().as_secs_f64();
    let (s1, f1) = (cpu(server_pid), cpu(ffmpeg_pid));
    let after: Vec<Stats> = viewers.iter().map(Viewer::stats).collect();

    let mut worst_loss: f64 = 0.0;
    let (mut pkts, mut bytes, mut lost, mut reordered) = (0u64, 0u64, 0u64, 0u64);
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let received = (a.video_seq.received - b.video_seq.received)
            + (a.audio_seq.received - b.audio_seq.received);
        let expected = (a.video_seq.expected() - b.video_seq.expected())
            + (a.audio_seq.expected() - b.audio_seq.expected());
        let l = expected.saturating_sub(received);
        let r = (a.video_seq.reordered - b.video_seq.reordered)
            + (a.audio_seq.reordered - b.audio_seq.reordered);
        let by = (a.video_bytes - b.video_bytes) + (a.audio_bytes - b.audio_bytes);
        #[allow(clippy::cast_precision_loss)]
        let loss = if expected == 0 { 100.0 } else { l as f64 * 100.0 / expected as f64 };
        worst_loss = worst_loss.max(loss);
        pkts += received;
        bytes += by;
        lost += l;
        reordered += r;
        if args.per_viewer {
            #[allow(clippy::cast_precision_loss)]
            let rate = received as f64 / wall;
            println!(
                "viewer {i}: {rate:.0} packets/s, {:.0} kbit/s, lost {l} ({loss:.2} %), reordered {r}, closed {}",
                by as f64 * 8.0 / wall / 1000.0,
                a.closed
            );
        }
    }
    #[allow(clippy::cast_precision_loss)]
    {
        println!(
            "received: {:.0} packets/s, {:.1} Mbit/s payload in total; lost {lost}, reordered {reordered}; worst viewer loss {worst_loss:.2} %",
            pkts as f64 / wall,
            bytes as f64 * 8.0 / wall / 1e6
        );
    }
    if let Some((server, _)) = &own {
        let share = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => format!("{:.1} %", (b - a) / wall * 100.0),
            _ => "n/a".into(),
        };
        println!("server CPU: {} of one core; FFmpeg CPU: {}", share(s0, s1), share(f0, f1));
        if let Some(fwd) = server.metric("whep_packets_forwarded_total") {
            println!("server forwarded {fwd:.0} packets in total");
        }
    }
    let silent = viewers.len() - playing;
    drop(viewers);
    drop(own);
    if refused > 0 || silent > 0 || worst_loss > args.max_loss {
        println!(
            "FAIL: {refused} refused, {silent} never played, worst loss {worst_loss:.2} % (limit {} %)",
            args.max_loss
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
