//! `whep-load`: N WHEP viewers (str0m, one process) against any WHEP endpoint, or against a
//! server binary it starts itself. Reports setup times and setups per second, time to the first
//! decodable frame, packets, bytes, loss and reordering per viewer, its own CPU per received
//! packet, and, for a server it started, the server's CPU, forwarded packets, RSS per admitted
//! viewer, its added latency (from its `/metrics`: arrival on the ingest port to the last
//! viewer's copy and to each copy, p50 and p99) and where packets were dropped.
//!
//! ```sh
//! cargo build --release -p whep-e2e --bins
//! T=$HOME/.cache/whep-target/release
//! # a whepd it starts (the demo stream), 20 viewers for 15 s:
//! $T/whep-load --viewers 20 --seconds 15
//! # any WHEP server (http only):
//! $T/whep-load --url http://10.0.0.5:8080/whep/cam1 --viewers 50
//! # how many light viewers of a 2.5 Mbit/s stream one server core serves without loss
//! # (server on core 0, this tool and FFmpeg on core 1, reniced against neighbours, viewers
//! # joining 10 ms apart, a fresh server per step; 300, 600, then bisected):
//! $T/whep-load --light --bitrate-kbps 2500 --server-cpus 0 --cpus 1 --nice -10 \
//!     --ramp-ms 10 --seconds 10 --viewers 300 --find-max --find-resolution 5
//! # session setups per second (4 POSTs in flight; no measuring window):
//! $T/whep-load --light --bitrate-kbps 2500 --viewers 200 --parallel 4 --setup-only \
//!     --server-cpus 0 --cpus 1 --nice -10
//! # the same viewers over ICE-TCP (a thread each), to compare the server's CPU per viewer:
//! $T/whep-load --light --viewers 50 --seconds 15 --tcp
//! # packets per second one whep-load core receives: 400 low-rate viewers plus 300 000
//! # packets/s sent straight to their sockets from core 0:
//! $T/whep-load --light --bitrate-kbps 100 --viewers 400 --parallel 4 --seconds 10 \
//!     --blast 300000 --server-cpus 0 --cpus 1 --nice -10
//! ```
//!
//! Viewers run on `--threads` hub threads that poll all their sockets with `epoll` (or one
//! thread each with `--thread-per-viewer`). `--light` viewers decrypt nothing after the first
//! keyframe: they count media packets from the plaintext RTP header, about 2.5 to 3 times
//! cheaper than full str0m viewers (2.0 against 5.8 us of CPU per packet at 66 000 packets/s;
//! 1.4 us at 300 000), so the tool and not the server stays below its limit: one whep-load
//! core received 310 000 packets/s with `--blast` at 44 % of the core.
//!
//! A `--find-max` step counts as too many viewers when a viewer is refused or never plays, when
//! a single packet is lost, or when the viewers together receive less than 95 % of viewers x
//! the stream's packet rate measured before they joined (the server falls behind).
//! Past about 100 % of its core, the server does not degrade gracefully: every viewer's ICE
//! consent fails within a second or two ("closed: ... ICE disconnected").
//!
//! A server it starts gets `--post-rate 0 --post-rate-global 0 --request-rate 0
//! --max-unconnected 0` (its per-client limits off, so that setups per second measure the
//! server rather than its limiter, and every viewer comes from one address; give
//! `--keep-rate-limits`, or any of these flags with `--server-arg`, to keep or set them) and
//! `--max-viewers N --max-viewers-total N`. 429 answers are retried after their Retry-After
//! until `--play-timeout`.
//!
//! Exits 1 when a viewer is refused or never plays, or when a viewer's loss exceeds
//! `--max-loss` percent (`--find-max`: when no step is free of loss); 2 on bad arguments.

#![allow(clippy::print_stdout)]

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;
use whep_e2e::Server;
use whep_e2e::viewer::{Hub, Stats, Viewer, ViewerOptions};

/// Load-tests a WHEP endpoint with N str0m viewers and reports what they received, setups per
/// second, and the CPU, memory and drops of a server it started itself.
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
    /// A server it starts also gets `--max-viewers N --max-viewers-total N` and `--post-rate 0
    /// --post-rate-global 0 --request-rate 0 --max-unconnected 0` unless given here.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Keep the rate limits of the server it starts (do not pass `--post-rate 0
    /// --post-rate-global 0 --request-rate 0 --max-unconnected 0`).
    #[arg(long)]
    keep_rate_limits: bool,
    /// Video bitrate of the demo stream of the server it starts, in kbit/s (whep-load writes a
    /// TOML config with a `demo` stream: testsrc2 640x360 at 30 fps, GOP 60, this bitrate)
    /// [default: the server's demo, 1500].
    #[arg(long)]
    bitrate_kbps: Option<u32>,
    /// Number of viewers (with `--find-max`: of the first step).
    #[arg(long, default_value_t = 1)]
    viewers: usize,
    /// Length of the measured window, after every viewer plays (or gave up).
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Pause between two viewers' POSTs, in milliseconds (per `--parallel` thread).
    #[arg(long, default_value_t = 0)]
    ramp_ms: u64,
    /// POSTs in flight at once: this many threads connect the viewers.
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    /// Stop POSTing after this many failed POSTs (the rest count as refused); 0 = never. An
    /// overloaded server may take the HTTP client's 10 s timeout for every POST.
    #[arg(long, default_value_t = 10)]
    max_failures: usize,
    /// How long the viewers may take to receive their first keyframe after the last POST, in
    /// seconds; also how long a POST answered with 429 is retried.
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
    /// Print what the server it started logged (stdout and stderr, `RUST_LOG` from `E2E_LOG`,
    /// default info) after each run.
    #[arg(long)]
    server_log: bool,
    /// Light viewers: after ICE + DTLS and the first keyframe, SRTP media packets are counted
    /// from their plaintext RTP header (payload type, sequence number) and not decrypted; STUN,
    /// DTLS and SRTCP still go to str0m. Loss and reordering are counted as before (without
    /// NACK repair, which needs str0m to see the packets).
    #[arg(long)]
    light: bool,
    /// Hub threads that receive for the viewers (viewer i on hub i mod N).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// `SO_RCVBUF` of each viewer socket in bytes (the kernel doubles it, up to
    /// `net.core.rmem_max`); 0 keeps the kernel's default.
    #[arg(long, default_value_t = 1 << 20, value_name = "BYTES")]
    recv_buffer: usize,
    /// One thread per viewer (blocking socket reads) instead of hub threads.
    #[arg(long, conflicts_with = "threads")]
    thread_per_viewer: bool,
    /// Viewers use ICE over TCP only (no UDP candidate; RFC 4571 frames on a connection to
    /// the server's passive TCP candidate); one thread per viewer.
    #[arg(long, conflicts_with = "threads")]
    tcp: bool,
    /// CPUs of the server it starts, e.g. `0` or `0,2-3` (its FFmpeg is moved to
    /// `--ffmpeg-cpus`).
    #[arg(long, value_parser = parse_cpus, value_name = "LIST")]
    server_cpus: Option<CpuList>,
    /// CPUs of whep-load itself (all its threads), e.g. `1`.
    #[arg(long, value_parser = parse_cpus, value_name = "LIST")]
    cpus: Option<CpuList>,
    /// Nice value of the server, its FFmpeg and every thread of whep-load (with `renice`;
    /// negative values need root). On a shared machine, e.g. `-10` keeps other processes from
    /// taking much of the pinned cores.
    #[arg(long, allow_hyphen_values = true)]
    nice: Option<i32>,
    /// CPUs of the server's FFmpeg [default: `--cpus` if given, else the server's].
    #[arg(long, value_parser = parse_cpus, value_name = "LIST")]
    ffmpeg_cpus: Option<CpuList>,
    /// Connect the viewers, report setup times and setups per second, and exit without the
    /// measuring window.
    #[arg(long)]
    setup_only: bool,
    /// Also send this many packets per second of 1200-byte RTP with payload type 0 (which no
    /// viewer negotiated) straight to the viewers' sockets during the window, from a thread on
    /// `--blast-cpus`, in UDP GSO batches of 8 per viewer: measures how many packets whep-load
    /// receives per second and core (light viewers count them as unknown packets).
    #[arg(long, value_name = "PPS")]
    blast: Option<u64>,
    /// CPUs of the `--blast` thread [default: `--server-cpus` if given].
    #[arg(long, value_parser = parse_cpus, value_name = "LIST")]
    blast_cpus: Option<CpuList>,
    /// Find the most viewers the server serves without loss: `--viewers`, then doubled until a
    /// step loses a packet (or a viewer is refused or never plays, or the viewers receive less
    /// than 95 % of the stream: the server falls behind), then bisected to `--find-resolution`;
    /// a fresh server for every step. Needs a server it starts.
    #[arg(long, conflicts_with_all = ["url", "setup_only"])]
    find_max: bool,
    /// Largest step of `--find-max`.
    #[arg(long, default_value_t = 6400)]
    find_limit: usize,
    /// `--find-max` stops bisecting when the gap between the largest passing and the smallest
    /// failing step is at most this percentage of the passing one.
    #[arg(long, default_value_t = 10.0)]
    find_resolution: f64,
}

/// A CPU list as given (`0,2-3`) and as a set.
#[derive(Debug, Clone)]
struct CpuList {
    text: String,
    set: CpuSet,
}

fn parse_cpus(text: &str) -> Result<CpuList, String> {
    let mut set = CpuSet::new();
    let mut any = false;
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (first, last) = part.split_once('-').unwrap_or((part, part));
        let parse = |s: &str| s.trim().parse::<usize>().map_err(|e| format!("{part}: {e}"));
        let (first, last) = (parse(first)?, parse(last)?);
        if first > last {
            return Err(format!("{part}: empty range"));
        }
        for cpu in first..=last {
            set.set(cpu).map_err(|e| format!("CPU {cpu}: {e}"))?;
            any = true;
        }
    }
    if !any {
        return Err("no CPU given".into());
    }
    Ok(CpuList { text: text.to_owned(), set })
}

/// Pins every thread of process `pid` to `set`; returns how many threads it pinned.
fn pin_process(pid: u32, set: &CpuSet) -> Result<usize, String> {
    let tasks =
        std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| format!("{pid}: {e}"))?;
    let mut pinned = 0;
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse::<i32>().ok()) else {
            continue;
        };
        // A thread may end meanwhile: only count the ones that took it.
        if sched_setaffinity(Pid::from_raw(tid), set).is_ok() {
            pinned += 1;
        }
    }
    Ok(pinned)
}

/// Size of a `--blast` packet.
const BLAST_PACKET: usize = 1200;
/// `--blast` packets per GSO send (to one viewer).
const BLAST_BATCH: usize = 8;

/// The `--blast` sender: `pps` packets per second round-robin to `targets` until `stop`;
/// returns how many it sent.
fn blast(targets: &[SocketAddr], pps: u64, cpus: Option<&CpuSet>, stop: &AtomicBool) -> u64 {
    if let Some(cpus) = cpus
        && let Err(e) = sched_setaffinity(Pid::from_raw(0), cpus)
    {
        println!("blast: sched_setaffinity: {e}");
    }
    let socket = match std::net::UdpSocket::bind("127.0.0.1:0") {
        Ok(s) => s,
        Err(e) => {
            println!("blast: {e}");
            return 0;
        }
    };
    #[allow(clippy::cast_possible_truncation)]
    let segment = BLAST_PACKET as u16;
    let gso = nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::UdpGsoSegment,
        &i32::from(segment),
    )
    .is_ok();
    let batch = if gso { BLAST_BATCH } else { 1 };
    let mut buf = vec![0u8; BLAST_PACKET * BLAST_BATCH];
    let start = Instant::now();
    let (mut sent, mut seq, mut next) = (0u64, 0u16, 0usize);
    while !stop.load(Ordering::Relaxed) && !targets.is_empty() {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let due = (start.elapsed().as_secs_f64() * pps as f64) as u64;
        if sent >= due {
            thread::sleep(Duration::from_micros(200));
            continue;
        }
        let k = usize::try_from(due - sent).unwrap_or(batch).min(batch);
        for packet in buf.chunks_mut(BLAST_PACKET).take(k) {
            // RTP version 2, payload type 0, sequence number, timestamp 0, SSRC 0xb1a57.
            packet[..12].copy_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0x0b, 0x1a, 0x57]);
            packet[2..4].copy_from_slice(&seq.to_be_bytes());
            seq = seq.wrapping_add(1);
        }
        let target = targets[next % targets.len()];
        next += 1;
        if socket.send_to(&buf[..k * BLAST_PACKET], target).is_ok() {
            sent += k as u64;
        }
    }
    sent
}

/// Sets the nice value of every thread of process `pid` with `renice`.
fn renice(pid: u32, nice: i32) -> Result<(), String> {
    let tasks =
        std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| format!("{pid}: {e}"))?;
    let tids: Vec<String> =
        tasks.flatten().filter_map(|t| t.file_name().to_str().map(str::to_owned)).collect();
    let status = std::process::Command::new("renice")
        .args(["-n", &nice.to_string(), "-p"])
        .args(&tids)
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("renice: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("renice -n {nice} of {pid} failed")) }
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

/// CPU seconds of the threads of process `pid` whose name starts with `prefix`, from
/// `/proc/PID/task/TID/stat`.
fn threads_cpu_seconds(pid: u32, prefix: &str) -> Option<f64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0.0;
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        // The same fields as a process's stat.
        let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
        #[allow(clippy::cast_precision_loss)]
        {
            total += (utime + stime) / ticks as f64;
        }
    }
    Some(total)
}

/// Busy and total jiffies of each CPU, from `/proc/stat` (busy: everything but idle and
/// iowait).
fn cpu_jiffies() -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
            let total: u64 = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            (total - idle, total)
        })
        .collect()
}

/// Resident memory of a process in KiB, from `/proc/PID/status`.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()
}

/// Socket inodes of a process, from `/proc/PID/fd`.
fn socket_inodes(pid: u32) -> HashSet<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return HashSet::new() };
    fds.flatten()
        .filter_map(|fd| {
            let target = std::fs::read_link(fd.path()).ok()?;
            let target = target.to_str()?;
            target.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// Datagrams the kernel dropped at the UDP sockets with these inodes (receive buffer full),
/// from the `drops` column of `/proc/net/udp` and `/proc/net/udp6`.
fn udp_drops(inodes: &HashSet<u64>) -> u64 {
    let mut drops = 0;
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let inode = fields.get(9).and_then(|i| i.parse::<u64>().ok());
            if inode.is_some_and(|i| inodes.contains(&i)) {
                drops += fields.last().and_then(|d| d.parse::<u64>().ok()).unwrap_or(0);
            }
        }
    }
    drops
}

/// Bytes queued for reading at each UDP socket with these inodes, by local port, from
/// `/proc/net/udp` (`tx_queue:rx_queue` in hex).
fn udp_queues(inodes: &HashSet<u64>) -> Vec<(u16, u64)> {
    let text = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    let mut queues: Vec<(u16, u64)> = text
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let inode = fields.get(9)?.parse::<u64>().ok()?;
            if !inodes.contains(&inode) {
                return None;
            }
            let port = u16::from_str_radix(fields.get(1)?.rsplit_once(':')?.1, 16).ok()?;
            let rx = u64::from_str_radix(fields.get(4)?.split_once(':')?.1, 16).ok()?;
            Some((port, rx))
        })
        .collect();
    queues.sort_unstable();
    queues
}

/// The kernel's UDP counters (`Udp:` of `/proc/net/snmp`) by name.
fn udp_snmp() -> HashMap<String, u64> {
    let text = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return HashMap::new();
    };
    names
        .split_whitespace()
        .skip(1)
        .zip(values.split_whitespace().skip(1))
        .filter_map(|(n, v)| Some((n.to_owned(), v.parse().ok()?)))
        .collect()
}

/// Every sample of a server's `/metrics`, by name with labels.
fn metrics(server: &Server) -> HashMap<String, f64> {
    let Ok(r) = whep_e2e::http::request(server.http, "GET", "/metrics", &[], b"") else {
        return HashMap::new();
    };
    r.text()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Quantile `q` of a Prometheus histogram's increase between two snapshots: the upper bound of
/// the first bucket that holds it.
fn histogram_quantile(
    name: &str,
    before: &HashMap<String, f64>,
    after: &HashMap<String, f64>,
    q: f64,
) -> Option<f64> {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut buckets: Vec<(f64, f64)> = after
        .iter()
        .filter_map(|(k, v)| {
            let le = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, v - before.get(k).copied().unwrap_or(0.0)))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    buckets.iter().find(|(_, count)| *count >= q * total).map(|(le, _)| *le)
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

#[allow(clippy::cast_precision_loss)]
fn per_second(n: u64, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

/// Whether `args` already set the server flag `flag` (as `--flag V` or `--flag=V`).
fn has_flag(args: &[String], flag: &str) -> bool {
    args.iter().any(|a| a == flag || a.strip_prefix(flag).is_some_and(|r| r.starts_with('=')))
}

/// A server whep-load started, with its FFmpeg and the config file it wrote.
struct Own {
    server: Server,
    ffmpeg: Option<u32>,
    config: Option<PathBuf>,
    /// Packets per second the server read from FFmpeg before any viewer: the stream's rate.
    stream_pps: Option<f64>,
}

impl Drop for Own {
    fn drop(&mut self) {
        if let Some(config) = &self.config {
            let _ = std::fs::remove_file(config);
        }
    }
}

/// Starts the server for `n` viewers, pinned to `--server-cpus`, waits until its demo stream
/// sends, moves FFmpeg to `--ffmpeg-cpus`, and lets it run for one GOP.
fn start_server(args: &Args, n: usize) -> Result<Own, String> {
    let bin = args.server.clone().unwrap_or_else(|| {
        std::env::current_exe().unwrap_or_default().with_file_name("whepd-tokio")
    });
    let mut server_args: Vec<String> = Vec::new();
    let mut add = |flag: &str, value: String| {
        if !has_flag(&args.server_args, flag) {
            server_args.extend([flag.to_owned(), value]);
        }
    };
    add("--max-viewers", n.to_string());
    add("--max-viewers-total", n.to_string());
    if !args.keep_rate_limits {
        add("--post-rate", "0".into());
        add("--post-rate-global", "0".into());
        add("--request-rate", "0".into());
        add("--max-unconnected", "0".into());
    }
    let mut config = None;
    if let Some(kbps) = args.bitrate_kbps {
        if has_flag(&args.server_args, "--config") {
            return Err("--bitrate-kbps writes the server's --config: give only one".into());
        }
        let path =
            std::env::temp_dir().join(format!("whep-load-{}-{kbps}k.toml", std::process::id()));
        let toml = format!(
            "# written by whep-load --bitrate-kbps {kbps}\n[streams.demo]\n\
             lavfi = \"testsrc2=size=640x360:rate=30\"\ngop = 60\nvideo_bitrate_kbps = {kbps}\n"
        );
        std::fs::write(&path, toml).map_err(|e| format!("{}: {e}", path.display()))?;
        server_args.extend(["--config".to_owned(), path.to_string_lossy().into_owned()]);
        config = Some(path);
    }
    server_args.extend(args.server_args.iter().cloned());
    let server_args: Vec<&str> = server_args.iter().map(String::as_str).collect();

    // The child inherits the affinity of the thread that forks it: this one, for a moment.
    let me = Pid::from_raw(0);
    let original = sched_getaffinity(me).map_err(|e| format!("sched_getaffinity: {e}"))?;
    if let Some(cpus) = &args.server_cpus {
        sched_setaffinity(me, &cpus.set)
            .map_err(|e| format!("--server-cpus {}: {e}", cpus.text))?;
    }
    let server = Server::start(&bin.to_string_lossy(), &server_args);
    // All our threads (the server's log readers too) back to ours.
    let mine = args.cpus.as_ref().map_or(original, |c| c.set);
    pin_process(std::process::id(), &mine)?;
    if let Some(nice) = args.nice
        && let Err(e) = renice(server.pid(), nice)
    {
        println!("whep-load: {e}");
    }

    let ready = server.wait_stream("demo", Duration::from_secs(20), |s| s["pid"].is_u64());
    let ffmpeg = ready.ok().and_then(|s| s["pid"].as_u64()).and_then(|p| u32::try_from(p).ok());
    let ffmpeg_cpus = args.ffmpeg_cpus.as_ref().or(args.cpus.as_ref());
    let pin_ffmpeg = || {
        if let (Some(pid), Some(nice)) = (ffmpeg, args.nice)
            && let Err(e) = renice(pid, nice)
        {
            println!("whep-load: {e}");
        }
        if let (Some(pid), Some(cpus)) = (ffmpeg, ffmpeg_cpus) {
            pin_process(pid, &cpus.set).map(drop)
        } else {
            Ok(())
        }
    };
    pin_ffmpeg()?;
    let sending = whep_e2e::wait_until(Duration::from_secs(20), || {
        server.metric("whep_ingest_packets_total").is_some_and(|p| p > 0.0)
    });
    if !sending {
        return Err("the server's demo stream sends nothing".into());
    }
    // Threads FFmpeg started since; then one GOP, so the RSS baseline holds the GOP cache, and
    // the stream's packet rate meanwhile.
    pin_ffmpeg()?;
    let ingest = || server.metric("whep_ingest_packets_total");
    let (i0, t0) = (ingest(), Instant::now());
    thread::sleep(Duration::from_secs(3));
    let stream_pps = ingest().zip(i0).map(|(b, a)| (b - a) / t0.elapsed().as_secs_f64());
    Ok(Own { server, ffmpeg, config, stream_pps })
}

/// Connects `n` viewers from `--parallel` threads; returns them in order and the failures.
fn connect_all(
    args: &Args,
    addr: SocketAddr,
    path: &str,
    n: usize,
    options: &[ViewerOptions],
) -> (Vec<Viewer>, Vec<(usize, String)>) {
    let next = AtomicUsize::new(0);
    let failures = AtomicUsize::new(0);
    let mut results: Vec<(usize, Result<Viewer, String>)> = thread::scope(|scope| {
        let workers: Vec<_> = (0..args.parallel.max(1))
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return mine;
                        }
                        if args.max_failures > 0
                            && failures.load(Ordering::Relaxed) >= args.max_failures
                        {
                            mine.push((i, Err("not attempted: --max-failures reached".into())));
                            continue;
                        }
                        if !mine.is_empty() && args.ramp_ms > 0 {
                            thread::sleep(Duration::from_millis(args.ramp_ms));
                        }
                        let opts = &options[i % options.len()];
                        let v = Viewer::connect_with(addr, path, args.token.as_deref(), opts)
                            .map_err(|e| e.to_string());
                        if v.is_err() {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                        mine.push((i, v));
                    }
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap_or_default()).collect()
    });
    results.sort_by_key(|(i, _)| *i);
    let mut viewers = Vec::new();
    let mut failed = Vec::new();
    for (i, r) in results {
        match r {
            Ok(v) => viewers.push(v),
            Err(e) => failed.push((i, e)),
        }
    }
    (viewers, failed)
}

/// What one run measured.
#[derive(Debug, Default)]
struct Outcome {
    viewers: usize,
    refused: usize,
    silent: usize,
    /// Packets lost in the window: video, audio; viewers with loss; worst viewer's loss in %.
    lost_video: u64,
    lost_audio: u64,
    lossy_viewers: usize,
    worst_loss: f64,
    received_per_s: f64,
    server_cpu: Option<f64>,
    forwarded_per_s: Option<f64>,
    rss_per_viewer_kib: Option<f64>,
    tool_cpu: Option<f64>,
    setups_per_s: Option<f64>,
    /// Drops: at the server's sockets, at ours.
    drops: Option<(u64, u64)>,
    /// What the viewers received per second as a share of viewers x the stream's rate (before
    /// the viewers); below [`KEEP_UP`] the server falls behind (its queues grow).
    delivered: Option<f64>,
}

/// The least share of the stream's packets the viewers must receive for a run to pass.
const KEEP_UP: f64 = 0.95;

impl Outcome {
    fn lost(&self) -> u64 {
        self.lost_video + self.lost_audio
    }

    fn clean(&self) -> bool {
        self.refused == 0
            && self.silent == 0
            && self.lost() == 0
            && self.delivered.is_none_or(|d| d >= KEEP_UP)
    }

    fn summary(&self) -> String {
        let pct = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.1} %"));
        #[allow(clippy::cast_precision_loss)]
        let per_viewer = self
            .server_cpu
            .map_or("n/a".into(), |c| format!("{:.3} %", c / self.viewers.max(1) as f64));
        let mut s = format!(
            "server CPU {} ({per_viewer} per viewer), forwarded {} packets/s, RSS {} KiB per \
             viewer; received {:.0} packets/s; whep-load CPU {}",
            pct(self.server_cpu),
            self.forwarded_per_s.map_or("n/a".into(), |f| format!("{f:.0}")),
            self.rss_per_viewer_kib.map_or("n/a".into(), |r| format!("{r:.0}")),
            self.received_per_s,
            pct(self.tool_cpu),
        );
        if let Some(rate) = self.setups_per_s {
            s.push_str(&format!("; {rate:.0} setups/s"));
        }
        if let Some(d) = self.delivered {
            s.push_str(&format!("; delivered {:.1} % of the stream", d * 100.0));
        }
        if !self.clean() {
            s.push_str(&format!(
                "; {} refused, {} never played, lost {} (video {}, audio {}) at {} viewers, worst \
                 {:.2} %",
                self.refused,
                self.silent,
                self.lost(),
                self.lost_video,
                self.lost_audio,
                self.lossy_viewers,
                self.worst_loss
            ));
            if let Some((server, ours)) = self.drops {
                s.push_str(&format!("; socket drops: server {server}, whep-load {ours}"));
            }
        }
        s
    }
}

/// One run against `addr` + `path` (and the server `own`, if whep-load started it) with `n`
/// viewers; prints its report.
#[allow(clippy::too_many_lines)]
fn run(args: &Args, addr: SocketAddr, path: &str, own: Option<&Own>, n: usize) -> Outcome {
    let server_pid = own.map(|o| o.server.pid());
    let rss_before = server_pid.and_then(rss_kib);
    let hubs: Vec<Hub> = if args.thread_per_viewer || args.tcp {
        Vec::new()
    } else {
        (0..args.threads.max(1))
            .filter_map(|i| match Hub::named(&format!("whep-hub-{i}")) {
                Ok(h) => Some(h),
                Err(e) => {
                    println!("hub thread {i}: {e}");
                    None
                }
            })
            .collect()
    };
    if let Some(nice) = args.nice
        && let Err(e) = renice(std::process::id(), nice)
    {
        println!("whep-load: {e}");
    }
    let base = ViewerOptions::default()
        .light(args.light)
        .retry_429(Duration::from_secs(args.play_timeout))
        .share_dtls_cert(true);
    let base = if args.recv_buffer > 0 { base.recv_buffer(args.recv_buffer) } else { base };
    let base = if args.tcp { base.tcp(None) } else { base };
    let options: Vec<ViewerOptions> = if hubs.is_empty() {
        vec![base.clone()]
    } else {
        hubs.iter().map(|h| base.clone().hub(h)).collect()
    };

    let me = std::process::id();
    let (setup_server0, setup_me0) = (server_pid.and_then(cpu_seconds), cpu_seconds(me));
    let start = Instant::now();
    let (viewers, failed) = connect_all(args, addr, path, n, &options);
    // The failures by message, with the first viewer of each.
    let mut reasons: Vec<(String, usize, usize)> = Vec::new();
    for (i, e) in &failed {
        match reasons.iter_mut().find(|(m, _, _)| m == e) {
            Some(r) => r.2 += 1,
            None => reasons.push((e.clone(), *i, 1)),
        }
    }
    for (e, first, count) in &reasons {
        println!("{count} viewers failed (first: viewer {first}): {e}");
    }
    let refused = failed.len();
    let deadline = Instant::now() + Duration::from_secs(args.play_timeout);
    let playing = viewers
        .iter()
        .filter(|v| {
            v.wait_for(deadline.saturating_duration_since(Instant::now()), |s| {
                s.first_keyframe_at.is_some() && s.audio_packets > 0
            })
        })
        .count();
    let setup_secs = start.elapsed().as_secs_f64();
    // Per-viewer figures divide by the viewers the server admitted, not by those asked for.
    let admitted = viewers.len().max(1);
    let (setup_server1, setup_me1) = (server_pid.and_then(cpu_seconds), cpu_seconds(me));
    let retries = base.retries();
    println!(
        "{playing}/{n} viewers playing ({refused} refused, {retries} POSTs retried after 429) \
         {:.2} s after the first POST{}",
        start.elapsed().as_secs_f64(),
        if args.setup_only { String::new() } else { format!("; measuring {} s", args.seconds) }
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
    let connected: Vec<Instant> = setup.iter().filter_map(|s| s.connected_at).collect();
    let setups_per_s = connected.iter().max().map(|last| {
        let secs = last.saturating_duration_since(start).as_secs_f64();
        let rate = per_second(connected.len() as u64, secs);
        println!(
            "setups: {} connected (ICE + DTLS) {secs:.2} s after the first POST = {rate:.0} \
             setups/s ({} POSTs in flight, ramp {} ms)",
            connected.len(),
            args.parallel.max(1),
            args.ramp_ms
        );
        rate
    });
    let setup_share =
        |a: Option<f64>, b: Option<f64>| Some(format!("{:.0} %", (b? - a?) / setup_secs * 100.0));
    #[allow(clippy::cast_precision_loss)]
    let server_ms = setup_server1
        .zip(setup_server0)
        .map(|(b, a)| format!(", {:.2} ms per viewer", (b - a) * 1000.0 / admitted as f64));
    println!(
        "CPU from the first POST until every viewer played: server {}{}, whep-load {} of one core \
         (streaming to the viewers already connected included)",
        setup_share(setup_server0, setup_server1).unwrap_or_else(|| "n/a".into()),
        server_ms.unwrap_or_default(),
        setup_share(setup_me0, setup_me1).unwrap_or_else(|| "n/a".into()),
    );
    let mut outcome = Outcome {
        viewers: n,
        refused,
        silent: viewers.len() - playing,
        setups_per_s,
        ..Outcome::default()
    };
    if args.setup_only {
        return outcome;
    }

    let cpu = |p: Option<u32>| p.and_then(cpu_seconds);
    let ffmpeg_pid = own.and_then(|o| o.ffmpeg);
    let server_sockets = server_pid.map(socket_inodes).unwrap_or_default();
    let our_sockets = socket_inodes(me);
    let drops = || (udp_drops(&server_sockets), udp_drops(&our_sockets));
    // When each answer arrived: a loaded server answers late, so rates from /metrics are per
    // the time between the answers, not per window.
    let m0 = own.map(|o| metrics(&o.server)).unwrap_or_default();
    let m0_at = Instant::now();
    let q0 = udp_queues(&server_sockets);
    let (snmp0, d0) = (udp_snmp(), drops());
    // The threads that receive for the viewers.
    let receivers = if args.thread_per_viewer { "whep-viewer" } else { "whep-hub" };
    let recv_cpu = || threads_cpu_seconds(me, receivers);
    let (s0, f0, l0, r0) = (cpu(server_pid), cpu(ffmpeg_pid), cpu(Some(me)), recv_cpu());
    let t0 = Instant::now();
    let j0 = cpu_jiffies();
    let before: Vec<Stats> = viewers.iter().map(Viewer::stats).collect();
    let targets: Vec<SocketAddr> = viewers.iter().map(Viewer::local_addr).collect();
    let stop = AtomicBool::new(false);
    let blast_cpus = args.blast_cpus.as_ref().or(args.server_cpus.as_ref()).map(|c| &c.set);
    let blasted = thread::scope(|scope| {
        let sender = args.blast.map(|pps| {
            let (targets, stop) = (&targets, &stop);
            thread::Builder::new()
                .name("whep-blast".into())
                .spawn_scoped(scope, move || blast(targets, pps, blast_cpus, stop))
                .ok()
        });
        thread::sleep(Duration::from_secs(args.seconds));
        stop.store(true, Ordering::Relaxed);
        sender.flatten().map(|s| s.join().unwrap_or(0))
    });
    let wall = t0.elapsed().as_secs_f64();
    let (s1, f1, l1, r1) = (cpu(server_pid), cpu(ffmpeg_pid), cpu(Some(me)), recv_cpu());
    let j1 = cpu_jiffies();
    let after: Vec<Stats> = viewers.iter().map(Viewer::stats).collect();
    let (snmp1, d1) = (udp_snmp(), drops());
    let m1 = own.map(|o| metrics(&o.server)).unwrap_or_default();
    let metrics_secs = m0_at.elapsed().as_secs_f64();
    let q1 = udp_queues(&server_sockets);
    let rss_after = server_pid.and_then(rss_kib);

    let (mut pkts, mut bytes, mut reordered, mut undecrypted) = (0u64, 0u64, 0u64, 0u64);
    let mut unknown = 0u64;
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let received = (a.video_seq.received - b.video_seq.received)
            + (a.audio_seq.received - b.audio_seq.received);
        let lost = |a: &whep_e2e::viewer::SeqStats, b: &whep_e2e::viewer::SeqStats| {
            (a.expected() - b.expected()).saturating_sub(a.received - b.received)
        };
        let (lv, la) = (lost(&a.video_seq, &b.video_seq), lost(&a.audio_seq, &b.audio_seq));
        let expected = (a.video_seq.expected() - b.video_seq.expected())
            + (a.audio_seq.expected() - b.audio_seq.expected());
        let l = lv + la;
        let r = (a.video_seq.reordered - b.video_seq.reordered)
            + (a.audio_seq.reordered - b.audio_seq.reordered);
        let by = (a.video_bytes - b.video_bytes) + (a.audio_bytes - b.audio_bytes);
        #[allow(clippy::cast_precision_loss)]
        let loss = if expected == 0 { 100.0 } else { l as f64 * 100.0 / expected as f64 };
        outcome.worst_loss = outcome.worst_loss.max(loss);
        outcome.lost_video += lv;
        outcome.lost_audio += la;
        outcome.lossy_viewers += usize::from(l > 0);
        pkts += received;
        bytes += by;
        reordered += r;
        undecrypted += a.undecrypted_packets - b.undecrypted_packets;
        unknown += a.unknown_packets - b.unknown_packets;
        if args.per_viewer {
            #[allow(clippy::cast_precision_loss)]
            let kbps = by as f64 * 8.0 / wall / 1000.0;
            println!(
                "viewer {i}: {:.0} packets/s, {kbps:.0} kbit/s, lost {l} ({loss:.2} %), \
                 reordered {r}, closed {}",
                per_second(received, wall),
                a.closed
            );
        }
    }
    outcome.received_per_s = per_second(pkts, wall);
    // Viewers that ended, by reason: how many, first and last end after the first POST.
    let mut reasons: HashMap<String, (usize, f64, f64)> = HashMap::new();
    for a in after.iter().filter(|a| a.closed) {
        let at = a.closed_at.map_or(0.0, |t| t.saturating_duration_since(start).as_secs_f64());
        let e =
            reasons.entry(a.close_reason.clone().unwrap_or_default()).or_insert((0, f64::MAX, 0.0));
        *e = (e.0 + 1, e.1.min(at), e.2.max(at));
    }
    for (reason, (count, first, last)) in &reasons {
        println!(
            "closed: {count} viewers, {first:.1} to {last:.1} s after the first POST: {reason}"
        );
    }
    #[allow(clippy::cast_precision_loss)]
    {
        println!(
            "received: {:.0} packets/s, {:.1} Mbit/s payload in total; lost {} (video {}, audio \
             {}) at {} viewers, reordered {reordered}; worst viewer loss {:.2} %",
            outcome.received_per_s,
            bytes as f64 * 8.0 / wall / 1e6,
            outcome.lost(),
            outcome.lost_video,
            outcome.lost_audio,
            outcome.lossy_viewers,
            outcome.worst_loss
        );
    }
    if let Some(sent) = blasted {
        println!(
            "blast: sent {:.0} packets/s, the viewers counted {:.0} packets/s of them ({} not \
             counted by the end: queued or dropped)",
            per_second(sent, wall),
            per_second(unknown, wall),
            sent.saturating_sub(unknown)
        );
    }
    let share = |a: Option<f64>, b: Option<f64>| Some((b? - a?) / wall * 100.0);
    outcome.tool_cpu = share(r0, r1);
    if let Some(tool) = outcome.tool_cpu {
        let all = pkts + unknown;
        if unknown > 0 {
            println!(
                "whep-load received {:.0} packets/s in all (media + unknown payload types)",
                per_second(all, wall)
            );
        }
        #[allow(clippy::cast_precision_loss)]
        let us = if all > 0 { tool / 100.0 * wall * 1e6 / all as f64 } else { 0.0 };
        let mode = if args.light { "light" } else { "full str0m" };
        let threads = if args.thread_per_viewer {
            "a thread per viewer".to_owned()
        } else {
            format!("{} hub thread(s)", hubs.len())
        };
        println!(
            "whep-load CPU: receiving {tool:.1} % of one core = {us:.2} us per received packet \
             ({mode} viewers on {threads}; {undecrypted} packets counted without decryption); \
             the whole process {}",
            share(l0, l1).map_or("n/a".into(), |v| format!("{v:.1} %"))
        );
    }
    // Every process counts here: on a shared machine, others may take the cores measured.
    let busy: Vec<String> = j0
        .iter()
        .zip(&j1)
        .enumerate()
        .map(|(cpu, ((b0, t0), (b1, t1)))| {
            #[allow(clippy::cast_precision_loss)]
            let pct = (b1 - b0) as f64 * 100.0 / (t1 - t0).max(1) as f64;
            format!("CPU {cpu} {pct:.0} %")
        })
        .collect();
    println!("machine busy in the window (all processes): {}", busy.join(", "));
    let delta = |m1: &HashMap<String, f64>, m0: &HashMap<String, f64>, k: &str| {
        m1.get(k).copied().unwrap_or(0.0) - m0.get(k).copied().unwrap_or(0.0)
    };
    let Some(own) = own else {
        return outcome;
    };
    if let Some(stream) = own.stream_pps {
        #[allow(clippy::cast_precision_loss)]
        let delivered = outcome.received_per_s / (stream * admitted as f64);
        outcome.delivered = Some(delivered);
        let ingest = delta(&m1, &m0, "whep_ingest_packets_total") / metrics_secs;
        println!(
            "stream: {stream:.0} packets/s from FFmpeg before the viewers, {ingest:.0} read by \
             the server in the window; the viewers received {:.1} % of viewers x stream{}",
            delivered * 100.0,
            if delivered < KEEP_UP { " (the server falls behind)" } else { "" }
        );
    }
    let queues = |q: &[(u16, u64)]| {
        q.iter().map(|(port, bytes)| format!("{port}: {bytes}")).collect::<Vec<_>>().join(", ")
    };
    println!(
        "server socket receive queues (port: bytes): {} at the start of the window, {} at its end",
        queues(&q0),
        queues(&q1)
    );
    let pct = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.1} %"));
    outcome.server_cpu = share(s0, s1);
    let fwd = |m: &HashMap<String, f64>| m.get("whep_packets_forwarded_total").copied();
    outcome.forwarded_per_s = fwd(&m1).zip(fwd(&m0)).map(|(b, a)| (b - a) / metrics_secs);
    #[allow(clippy::cast_precision_loss)]
    let per_viewer = outcome.server_cpu.map(|c| c / admitted as f64);
    let per_kpps = outcome.server_cpu.zip(outcome.forwarded_per_s).map(|(c, f)| c / (f / 1000.0));
    println!(
        "server CPU: {} of one core = {} per viewer ({admitted} admitted), {} per 1000 \
         forwarded packets/s; FFmpeg CPU: {}",
        pct(outcome.server_cpu),
        per_viewer.map_or("n/a".into(), |v| format!("{v:.3} %")),
        per_kpps.map_or("n/a".into(), |v| format!("{v:.2} %")),
        pct(share(f0, f1)),
    );
    if let (Some(f), Some(total)) = (outcome.forwarded_per_s, fwd(&m1)) {
        let latency = |name, q| {
            histogram_quantile(name, &m0, &m1, q)
                .map_or("n/a".into(), |s| format!("{:.0} us", s * 1e6))
        };
        let (last, copy) = ("whep_egress_latency_seconds", "whep_egress_copy_latency_seconds");
        println!(
            "server forwarded {f:.0} packets/s ({total:.0} in total); added latency from arrival \
             on the ingest port: to the last viewer's copy p50 {}, p99 {}; to each copy p50 {}, \
             p99 {}",
            latency(last, 0.5),
            latency(last, 0.99),
            latency(copy, 0.5),
            latency(copy, 0.99)
        );
    }
    #[allow(clippy::cast_precision_loss)]
    if let (Some(b), Some(a)) = (rss_before, rss_after) {
        let per = (a as f64 - b as f64) / admitted as f64;
        outcome.rss_per_viewer_kib = Some(per);
        println!(
            "server RSS: {:.1} MiB before the viewers, {:.1} MiB with them = {per:.0} KiB per \
             viewer ({admitted} admitted)",
            b as f64 / 1024.0,
            a as f64 / 1024.0
        );
    }
    let snmp = |k: &str| {
        snmp1.get(k).copied().unwrap_or(0).saturating_sub(snmp0.get(k).copied().unwrap_or(0))
    };
    outcome.drops = Some((d1.0.saturating_sub(d0.0), d1.1.saturating_sub(d0.1)));
    println!(
        "drops in the window: server sockets {} (ingest + viewer socket receive buffers), \
         whep-load sockets {}; server metrics: ingest dropped {:.0}, datagrams dropped {:.0}; \
         kernel UDP RcvbufErrors {}, SndbufErrors {}",
        d1.0.saturating_sub(d0.0),
        d1.1.saturating_sub(d0.1),
        delta(&m1, &m0, "whep_ingest_dropped_total"),
        delta(&m1, &m0, "whep_datagrams_dropped_total"),
        snmp("RcvbufErrors"),
        snmp("SndbufErrors"),
    );
    outcome
}

/// Stops the server and prints its log with `--server-log`.
fn print_server_log(args: &Args, mut own: Own) {
    if args.server_log {
        own.server.terminate(Duration::from_secs(10));
        println!("--- server log ---\n{}\n--- end of server log ---", own.server.output());
    }
}

/// `--find-max`: doubles, then bisects, with a fresh server per step.
fn find_max(args: &Args) -> ExitCode {
    let mut n = args.viewers.max(1);
    let mut best: Option<(usize, Outcome)> = None;
    let mut first_bad: Option<(usize, Outcome)> = None;
    loop {
        println!("\n=== find-max: {n} viewers ===");
        let own = match start_server(args, n) {
            Ok(own) => own,
            Err(e) => {
                println!("whep-load: {e}");
                return ExitCode::from(2);
            }
        };
        let addr = own.server.http;
        let outcome = run(args, addr, "/whep/demo", Some(&own), n);
        print_server_log(args, own);
        let verdict = if outcome.clean() { "no loss" } else { "LOSS" };
        println!("find-max: {n} viewers: {verdict}; {}", outcome.summary());
        if outcome.clean() {
            best = Some((n, outcome));
        } else {
            first_bad = Some((n, outcome));
        }
        let good = best.as_ref().map_or(0, |(g, _)| *g);
        n = match &first_bad {
            None if n >= args.find_limit => break,
            None => (n * 2).min(args.find_limit),
            Some((bad, _)) => {
                #[allow(clippy::cast_precision_loss)]
                let gap_ok = (bad - good) as f64 <= good as f64 * args.find_resolution / 100.0;
                if good == 0 || gap_ok || bad - good <= 1 {
                    break;
                }
                good + (bad - good) / 2
            }
        };
        // Let the sockets and the machine settle between servers.
        thread::sleep(Duration::from_secs(1));
    }
    println!();
    let Some((good, outcome)) = &best else {
        println!("find-max: no step without loss (the first, {} viewers, lost)", args.viewers);
        return ExitCode::FAILURE;
    };
    println!("find-max: largest step without loss: {good} viewers; {}", outcome.summary());
    match &first_bad {
        Some((bad, o)) => {
            println!("find-max: first step with loss: {bad} viewers; {}", o.summary())
        }
        None => println!("find-max: no loss up to --find-limit {}", args.find_limit),
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Many viewers need many sockets: the soft descriptor limit up to the hard one.
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    if args.url.is_some()
        && (args.server_cpus.is_some() || args.bitrate_kbps.is_some() || args.ffmpeg_cpus.is_some())
    {
        println!(
            "whep-load: --server-cpus, --ffmpeg-cpus and --bitrate-kbps need a server it starts (no --url)"
        );
        return ExitCode::from(2);
    }
    if let Some(cpus) = &args.cpus
        && let Err(e) = pin_process(std::process::id(), &cpus.set)
    {
        println!("whep-load: --cpus {}: {e}", cpus.text);
        return ExitCode::from(2);
    }
    let mode = if args.light {
        "light (RTP headers counted without decryption after the first keyframe)"
    } else {
        "full (str0m decrypts every packet)"
    };
    let threads = if args.thread_per_viewer {
        "a thread per viewer".to_owned()
    } else {
        format!("{} hub thread(s)", args.threads.max(1))
    };
    println!(
        "whep-load: {mode} viewers on {threads}; whep-load on CPUs {}, server on CPUs {}",
        args.cpus.as_ref().map_or("any", |c| c.text.as_str()),
        args.server_cpus.as_ref().map_or("any", |c| c.text.as_str()),
    );
    if args.find_max {
        return find_max(&args);
    }

    // Either a server we start, or the URL.
    let (own, addr, path) = match &args.url {
        Some(url) => match parse_url(url) {
            Ok((addr, path)) => (None, addr, path),
            Err(e) => {
                println!("whep-load: {e}");
                return ExitCode::from(2);
            }
        },
        None => match start_server(&args, args.viewers) {
            Ok(own) => {
                let addr = own.server.http;
                (Some(own), addr, "/whep/demo".to_owned())
            }
            Err(e) => {
                println!("whep-load: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let outcome = run(&args, addr, &path, own.as_ref(), args.viewers);
    if let Some(own) = own {
        print_server_log(&args, own);
    }
    if outcome.refused > 0 || outcome.silent > 0 || outcome.worst_loss > args.max_loss {
        println!(
            "FAIL: {} refused, {} never played, worst loss {:.2} % (limit {} %)",
            outcome.refused, outcome.silent, outcome.worst_loss, args.max_loss
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
