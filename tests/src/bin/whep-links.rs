//! Playback quality in headless Chromium behind emulated links: for each link profile, N runs of
//! whepd (its demo stream) and Chromium in a network namespace behind an impairing UDP relay,
//! each run `--duration` seconds; prints a markdown table (one value per run, `a / b`).
//!
//! ```sh
//! cargo build --release -p whep-e2e --bins
//! $CARGO_TARGET_DIR/release/whep-links                 # every profile, 2 runs of 30 s
//! $CARGO_TARGET_DIR/release/whep-links --runs 3 --only loss --duration 20
//! ```
//!
//! Needs root (network namespaces, a veth pair from 10.77.0.0/16; everything is removed after),
//! `/usr/bin/chromium` (or `CHROMIUM`) and FFmpeg. The server is `whepd-tokio` next to this binary
//! unless `--server` says otherwise. The profiles are in `whep_e2e::links::profiles`: clean; 1 %
//! and 5 % loss with a 50 ms round trip; 1 and 3 Mbit/s caps (100 ms buffer; the 3 Mbit/s one joins
//! about 1.5 s into the 2 s GOP, so that the cached GOP sent first is large; the aim is
//! approximate, as the browser's start-up time varies, and the table shows the phase each run
//! achieved); a 150 ms round trip; a 5 s outage at 10 s; a NAT rebinding at 10 s (the relay's clock
//! starts just before the browser's launch).
//!
//! Columns: first frame (POST to first decoded frame, ms), freezes (Chromium's `freezeCount`, and
//! `totalFreezesDuration` in s), pauses (`pauseCount` and `totalPausesDuration`: Chromium counts a
//! gap of 5 s or more between frames as a pause, not a freeze, and only once it has ended), the
//! stall at the end (no frame decoded for that long when the run ended: a gap no counter has seen
//! yet), average fps from the first frame on, NACKs and PLIs the browser sent, video packets lost
//! (Chromium's `packetsLost`: originals that never came, even when a retransmission repaired them),
//! retransmissions (RTX packets) the relay delivered to the browser, the relay's drops toward the
//! viewer, and datagrams dropped by full UDP receive buffers during the run, outside the emulated
//! link (`RcvbufErrors`: on the host, where the relay, the server, FFmpeg and everything else on
//! the machine count, so on a shared machine it is only a hint; and in the browser's namespace). A
//! run that did not end with PASS shows `FAIL`. "after 5 s": frames decoded per second and freeze
//! time from the first progress line 5 s after the POST to the end (the issue's goal for a slow
//! link: ≥ 25 fps, < 2 s frozen per 30 s after the first 5 s). fps counts from the first decoded frame, so the
//! cached GOP's burst at the start adds a little.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;

use clap::Parser;
use whep_e2e::links::{self, Outcome, RunOptions};
use whep_e2e::netns::Netns;

#[derive(Debug, Parser)]
#[command(about = "Chromium playback behind emulated links: a markdown table per link profile")]
struct Args {
    /// Runs per profile.
    #[arg(long, default_value_t = 2)]
    runs: u32,
    /// Seconds each run plays.
    #[arg(long, default_value_t = 30)]
    duration: u32,
    /// Only profiles whose name contains this (repeat).
    #[arg(long)]
    only: Vec<String>,
    /// The server binary.
    #[arg(long)]
    server: Option<PathBuf>,
    /// Let the player page reconnect (`retry=1`) as it does outside test mode; by default each
    /// run measures one session.
    #[arg(long)]
    reconnect: bool,
    /// Print each run's verdict line and relay counters to stderr.
    #[arg(long)]
    verbose: bool,
}

fn cell(outcomes: &[Outcome], f: impl Fn(&Outcome) -> String) -> String {
    outcomes.iter().map(f).collect::<Vec<_>>().join(" / ")
}

fn num(o: &Outcome, key: &str, scale: f64, decimals: usize) -> String {
    o.num(key).map_or_else(|| "?".to_owned(), |v| format!("{:.*}", decimals, v * scale))
}

fn main() {
    let args = Args::parse();
    let server = args.server.clone().unwrap_or_else(|| {
        let exe = std::env::current_exe().expect("own path");
        exe.with_file_name("whepd-tokio")
    });
    let server = server.to_str().expect("utf-8 path").to_owned();
    let ns = Netns::create().expect("network namespace (run as root)");
    eprintln!("namespace {} ({} <-> {}), server {server}", ns.name(), ns.host, ns.peer);
    let mut rows = Vec::new();
    let mut lead = RunOptions::default().launch_lead;
    for profile in links::profiles() {
        if !args.only.is_empty() && !args.only.iter().any(|o| profile.name.contains(o.as_str())) {
            continue;
        }
        let mut outcomes = Vec::new();
        for run in 0..args.runs {
            let opts = RunOptions {
                duration_s: args.duration,
                late_join: profile.late_join,
                launch_lead: lead,
                page_params: if args.reconnect { "&retry=1".into() } else { String::new() },
            };
            let link = profile.link.clone().seed(u64::from(run) + 1);
            let o = links::run(&server, &ns, link, &opts, |_, _| {});
            if let Some(d) = o.launch_to_ice {
                lead = d;
            }
            eprintln!(
                "{} run {}: {}{}",
                profile.name,
                run + 1,
                o.verdict.as_deref().map_or_else(|e| format!("no verdict: {e}"), str::to_owned),
                o.join_phase.map_or(String::new(), |p| format!(
                    " (joined {} ms into the GOP)",
                    p.as_millis()
                ))
            );
            if args.verbose {
                eprintln!("  relay: {:?}", o.relay);
            }
            outcomes.push(o);
        }
        rows.push((profile, outcomes));
    }
    println!(
        "| link | first frame (ms) | freezes | freeze total (s) | pauses (total s) | stall at end (s) | fps | after 5 s: fps, frozen (s) | NACKs | PLIs | lost | RTX to viewer | relay drops down | UDP buffer drops host / browser | result |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (profile, o) in &rows {
        let mut name = profile.name.to_owned();
        if profile.late_join {
            let phases =
                cell(o, |o| o.join_phase.map_or("?".into(), |p| format!("{}", p.as_millis())));
            name = format!("{name} (joined at {phases} ms of 2000)");
        }
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(o, |o| num(o, "firstFrameMs", 1.0, 0)),
            cell(o, |o| num(o, "freezeCount", 1.0, 0)),
            cell(o, |o| num(o, "totalFreezesDurationMs", 0.001, 1)),
            cell(o, |o| format!(
                "{} ({})",
                num(o, "pauseCount", 1.0, 0),
                num(o, "totalPausesDurationMs", 0.001, 1)
            )),
            cell(o, |o| num(o, "stallMs", 0.001, 1)),
            cell(o, |o| num(o, "avgFps", 1.0, 1)),
            cell(o, |o| {
                let fps = o.growth_since(5000.0, "framesDecoded").map(|(n, s)| n / s);
                let frozen = o.growth_since(5000.0, "totalFreezesDurationMs").map(|(ms, _)| ms);
                let pauses = o.growth_since(5000.0, "totalPausesDurationMs").map(|(ms, _)| ms);
                let frozen = frozen.zip(pauses).map(|(f, p)| (f + p) / 1000.0);
                format!(
                    "{}, {}",
                    fps.map_or("?".into(), |v| format!("{v:.1}")),
                    frozen.map_or("?".into(), |v| format!("{v:.1}"))
                )
            }),
            cell(o, |o| num(o, "nackCount", 1.0, 0)),
            cell(o, |o| num(o, "pliCount", 1.0, 0)),
            cell(o, |o| num(o, "packetsLost", 1.0, 0)),
            cell(o, |o| o.rtx_delivered().map_or("?".into(), |n| n.to_string())),
            cell(o, |o| o.relay.down.dropped().to_string()),
            cell(o, |o| {
                let n = |v: Option<u64>| v.map_or("?".into(), |v| v.to_string());
                format!("{}+{}", n(o.rcvbuf_drops.0), n(o.rcvbuf_drops.1))
            }),
            cell(o, |o| if o.passed() { "PASS".into() } else { "FAIL".into() }),
        );
    }
    drop(ns);
}
