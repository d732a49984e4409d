//! Headless Chromium behind an emulated link: the named link profiles of the measurement
//! (`whep-links`) and one measured run, shared by that binary and `tests/links.rs`.
//!
//! A run: a [`Relay`] whose front socket is on the host end of a [`Netns`]'s veth pair, a
//! server (any `whepd`) with HTTP on that address too and the relay's front as its only
//! candidate (its WebRTC UDP stays on loopback, behind the relay), and Chromium inside the
//! namespace playing the demo stream with the player page's `duration=` and `progress=1`.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::netns::Netns;
use crate::relay::{Impairment, Link, Relay, RelayStats};
use crate::viewer::Viewer;
use crate::{Server, chromium};

const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);

/// A named link.
#[derive(Debug, Clone)]
pub struct Profile {
    /// Short name (the table's first column, and `--only`'s argument).
    pub name: &'static str,
    /// The link.
    pub link: Link,
    /// Join late in the GOP (about 1.5 s into the demo's 2 s GOP, so that the cached GOP the
    /// server sends first is large).
    pub late_join: bool,
}

/// The measured profiles. Rates and outages apply to both directions; "RTT" is twice the
/// one-way delay of each direction. Times are on the relay's clock, which starts just before
/// the browser is launched (the browser POSTs about a second later).
pub fn profiles() -> Vec<Profile> {
    let lossy = |pct| Link::symmetric(Impairment::none().delay(25 * MS).loss_percent(pct));
    let capped = |bps| Link::symmetric(Impairment::none().rate(bps, 100 * MS));
    vec![
        Profile { name: "clean", link: Link::default(), late_join: false },
        Profile { name: "loss 1%, RTT 50 ms", link: lossy(1.0), late_join: false },
        Profile { name: "loss 5%, RTT 50 ms", link: lossy(5.0), late_join: false },
        Profile { name: "cap 1 Mbit/s", link: capped(1_000_000), late_join: false },
        Profile { name: "cap 3 Mbit/s, late join", link: capped(3_000_000), late_join: true },
        Profile { name: "RTT 150 ms", link: Link::delay(75 * MS), late_join: false },
        Profile {
            name: "outage 5 s at 10 s",
            link: Link::symmetric(Impairment::none().outage(10 * S, 5 * S)),
            late_join: false,
        },
        Profile {
            name: "NAT rebinding at 10 s",
            link: Link::default().rebind_at(10 * S),
            late_join: false,
        },
    ]
}

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The page's `duration=` in seconds.
    pub duration_s: u32,
    /// Join late in the GOP (see [`Profile::late_join`]).
    pub late_join: bool,
    /// For a late join: the expected time from the browser's launch to its first ICE check
    /// (measured by earlier runs, [`Outcome::launch_to_ice`]).
    pub launch_lead: Duration,
    /// More query parameters for the player page (each `&key=value`), e.g. `&retry=1`.
    pub page_params: String,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            duration_s: 10,
            late_join: false,
            launch_lead: Duration::from_millis(1200),
            page_params: String::new(),
        }
    }
}

/// What a run gave.
#[derive(Debug)]
pub struct Outcome {
    /// The page's verdict line (PASS or FAIL, with its stats), or why there was none.
    pub verdict: Result<String, String>,
    /// The page's other `[WHEP]` lines (`PROGRESS` every second) with their arrival times.
    pub lines: Vec<(Instant, String)>,
    /// The relay's counters at the end.
    pub relay: RelayStats,
    /// The server's output.
    pub server_log: String,
    /// When the browser was launched.
    pub launched: Instant,
    /// From the launch to the browser's first datagram at the relay (its first ICE check).
    pub launch_to_ice: Option<Duration>,
    /// For a late join: how far into the GOP the first ICE check came.
    pub join_phase: Option<Duration>,
    /// UDP datagrams dropped for full receive buffers during the run, outside the emulated
    /// link: (on the host: relay, server, FFmpeg and whatever else runs; in the namespace:
    /// the browser).
    pub rcvbuf_drops: (Option<u64>, Option<u64>),
}

impl Outcome {
    /// A numeric field of the verdict line.
    pub fn num(&self, key: &str) -> Option<f64> {
        self.verdict.as_deref().ok().and_then(|v| chromium::number(v, key))
    }

    /// Retransmissions (RTP of the answer's RTX payload type) the relay delivered to the
    /// browser (Chromium has no `retransmittedPacketsReceived` for video).
    pub fn rtx_delivered(&self) -> Option<u64> {
        let pt = u8::try_from(self.num("rtxPt")? as u64).ok()?;
        Some(self.relay.down_pts.get(&pt).copied().unwrap_or(0))
    }

    /// Whether the page said PASS.
    pub fn passed(&self) -> bool {
        self.verdict.as_deref().is_ok_and(|v| v.contains("[WHEP] PASS"))
    }

    /// `key` of the last `PROGRESS` line that came at or before `at`.
    pub fn progress_at(&self, at: Instant, key: &str) -> Option<f64> {
        self.lines
            .iter()
            .rfind(|(t, l)| *t <= at && l.contains("[WHEP] PROGRESS"))
            .and_then(|(_, l)| chromium::number(l, key))
    }

    /// From the first `PROGRESS` line at or after `t_ms` (milliseconds from the POST) to the
    /// verdict: how much `key` grew, and over how many seconds. `None` if the run ended before.
    pub fn growth_since(&self, t_ms: f64, key: &str) -> Option<(f64, f64)> {
        let (t0, v0) = self
            .lines
            .iter()
            .filter(|(_, l)| l.contains("[WHEP] PROGRESS"))
            .filter_map(|(_, l)| Some((chromium::number(l, "t")?, chromium::number(l, key)?)))
            .find(|(t, _)| *t >= t_ms)?;
        let (t1, v1) = self
            .lines
            .iter()
            .rfind(|(_, l)| l.contains("[WHEP] PROGRESS"))
            .and_then(|(_, l)| Some((chromium::number(l, "t")?, chromium::number(l, key)?)))?;
        let end = self.num(key).unwrap_or(v1);
        (t1 > t0).then(|| (end - v0, (t1 - t0) / 1000.0))
    }

    /// When the last `PROGRESS` line came.
    pub fn last_progress(&self) -> Option<Instant> {
        self.lines
            .iter()
            .filter(|(_, l)| l.contains("[WHEP] PROGRESS"))
            .map(|(t, _)| *t)
            .next_back()
    }
}

/// Keyframe arrival times seen by a str0m viewer (the GOP clock of a late join).
fn keyframe_times(viewer: &Viewer, want: usize, timeout: Duration) -> Vec<Instant> {
    let mut times = Vec::new();
    let mut seen = viewer.stats().keyframes;
    let deadline = Instant::now() + timeout;
    while times.len() < want && Instant::now() < deadline {
        let k = viewer.stats().keyframes;
        if k != seen {
            seen = k;
            times.push(Instant::now());
        }
        thread::sleep(2 * MS);
    }
    times
}

/// One run of `server_bin` and Chromium (in `ns`) through `link`. `watch` runs alongside the
/// browser with the relay and a flag that turns true when the browser is done (it must return
/// then at the latest); e.g. to rebind at the right moment.
///
/// # Panics
///
/// When the relay cannot be bound or the server does not start or its demo stream does not
/// run within 25 s.
pub fn run(
    server_bin: &str,
    ns: &Netns,
    link: Link,
    opts: &RunOptions,
    watch: impl FnOnce(&Relay, &AtomicBool) + Send,
) -> Outcome {
    let mut relay = Relay::bind(IpAddr::V4(ns.host)).expect("relay on the veth address");
    relay.accept_only(IpAddr::V4(ns.peer));
    let front = relay.front().to_string();
    // A late join needs the GOP's clock: a str0m viewer on the host watches the keyframes
    // through a plain loopback relay of its own, advertised as a second candidate (the browser
    // cannot reach the namespace's loopback, and the first relay ignores the probe).
    let mut probe_relay = Relay::bind_loopback().expect("probe relay");
    let probe_front = probe_relay.front().to_string();
    let mut args = vec!["--candidate", front.as_str()];
    if opts.late_join {
        args.extend(["--candidate", probe_front.as_str()]);
    }
    let http = format!("{}:0", ns.host);
    let mut server = Server::start_on(server_bin, &http, &args);
    if let Err(s) = server.wait_stream("demo", Duration::from_secs(25), |s| s["state"] == "running")
    {
        panic!("demo not running: {s}\n{}", server.output());
    }
    // A keyframe in the GOP cache, so that a join does not wait for FFmpeg's first one.
    thread::sleep(Duration::from_millis(2500));
    let mut probe = None;
    let mut keyframes = Vec::new();
    if opts.late_join {
        probe_relay.start(server.udp, Link::default()).expect("probe relay start");
        let viewer = Viewer::connect(server.http, "/whep/demo", None).expect("probe viewer");
        // Two keyframes give the period (the demo's GOP is 60 frames at 30 fps: 2 s).
        keyframes = keyframe_times(&viewer, 3, Duration::from_secs(15));
        let period = match keyframes.as_slice() {
            [.., a, b] => *b - *a,
            _ => 2 * S,
        };
        // Launch so that the first check comes about 1.5 s after a keyframe.
        let target = Duration::from_millis(1500);
        let last = keyframes.last().copied().unwrap_or_else(Instant::now);
        let mut launch = last + period + target;
        launch = launch.checked_sub(opts.launch_lead).unwrap_or(launch);
        while launch < Instant::now() {
            launch += period;
        }
        thread::sleep(launch - Instant::now());
        probe = Some((viewer, period));
    }
    let host_drops = || {
        let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
        crate::netns::udp_rcvbuf_errors(&snmp)
    };
    let drops_before = (host_drops(), ns.udp_rcvbuf_errors());
    relay.start(server.udp, link).expect("relay start");
    let url = format!(
        "http://{}/?stream=demo&test=1&frames=30&duration={}&progress=1{}",
        server.http, opts.duration_s, opts.page_params
    );
    let timeout = Duration::from_secs(u64::from(opts.duration_s) + 40);
    let done = AtomicBool::new(false);
    let page = thread::scope(|scope| {
        scope.spawn(|| watch(&relay, &done));
        let page = chromium::run_page_in(Some(ns.name()), &url, timeout);
        done.store(true, Ordering::Relaxed);
        page
    });
    let stats = relay.stats();
    let (host_after, ns_after) = (host_drops(), ns.udp_rcvbuf_errors());
    let rcvbuf_drops = (
        host_after.zip(drops_before.0).map(|(a, b)| a.saturating_sub(b)),
        ns_after.zip(drops_before.1).map(|(a, b)| a.saturating_sub(b)),
    );
    let launch_to_ice = stats.first_up_at.map(|t| t.saturating_duration_since(page.started));
    let join_phase = probe.as_ref().and_then(|(viewer, period)| {
        let first = stats.first_up_at?;
        // Keyframes kept coming while the browser ran; the probe saw them all.
        let k0 = *keyframes.last()?;
        let since = first.checked_duration_since(k0)?;
        let _ = viewer;
        Some(Duration::from_nanos(
            u64::try_from(since.as_nanos() % period.as_nanos().max(1)).unwrap_or(0),
        ))
    });
    if let Some((viewer, _)) = probe {
        viewer.close();
    }
    let server_log = server.output();
    drop(server);
    Outcome {
        verdict: page.verdict,
        lines: page.lines,
        relay: stats,
        server_log,
        launched: page.started,
        launch_to_ice,
        join_phase,
        rcvbuf_drops,
    }
}
