//! End-to-end harness: runs a real server binary (any runtime's `whepd`) as a child process on
//! loopback ports, with real FFmpeg, and talks to it over real HTTP and UDP with [`viewer`]s
//! (str0m), a headless Chromium ([`chromium`]), a headless Firefox ESR ([`firefox`]) or
//! GStreamer and aiortc players ([`players`]).
//!
//! The suite in `tests/e2e.rs` is written once against [`Server`] and instantiated per runtime
//! binary.

pub mod firefox;
pub mod http;
pub mod lan;
pub mod links;
pub mod nat;
pub mod netns;
pub mod nginx;
pub mod players;
pub mod relay;
pub mod signing;
pub mod tls;
pub mod turn;
pub mod viewer;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The admin token every test server gets.
pub const ADMIN_TOKEN: &str = "e2e-admin";

/// Hands out disjoint ingest port ranges so that concurrently running test servers never
/// compete for a pair (20 ports = 10 pairs each).
fn next_ingest_range() -> (u16, u16) {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let i = NEXT.fetch_add(1, Ordering::Relaxed);
    // 40 ports: five streams' blocks of 8 (two renditions each at most). Below Linux's
    // ephemeral ports (32768-60999), which the tests' own sockets bound to port 0 take: one of
    // them on a port FFmpeg must send from failed that FFmpeg's start.
    let slot = u16::try_from(std::process::id() % 12).unwrap_or(0);
    let base = 21_000 + slot * 800 + (i % 20) * 40;
    (base, base + 39)
}

/// A running server process.
#[derive(Debug)]
pub struct Server {
    child: Option<Child>,
    /// Its HTTP address.
    pub http: SocketAddr,
    /// Its WebRTC UDP address.
    pub udp: SocketAddr,
    /// Whether it serves HTTPS (started with `--tls-cert`).
    pub https: bool,
    /// Its ingest port range.
    pub ingest: (u16, u16),
    log: mpsc::Receiver<String>,
    lines: Vec<String>,
}

/// The lines `child` writes to its piped stdout and stderr, as they come (a reader thread per
/// pipe; the channel closes when both end).
pub(crate) fn output_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    for pipe in [
        child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

/// `program` as a command, run inside the network namespace `netns` (by name) when given.
pub(crate) fn command_in(netns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// A player (a browser with its helper processes, or a script) spawned in its own process
/// group by [`spawn_group`]: the whole group is killed when this is dropped.
pub(crate) struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        if let Ok(pgid) = i32::try_from(self.0.id()) {
            let _ = nix::sys::signal::killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `cmd` in a process group of its own, stdin closed, stdout and stderr piped: the
/// guard of the group and the lines of both pipes.
pub(crate) fn spawn_group(cmd: &mut Command) -> std::io::Result<(Group, mpsc::Receiver<String>)> {
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let lines = output_lines(&mut child);
    Ok((Group(child), lines))
}

impl Server {
    /// Starts `binary` on ephemeral loopback ports with the admin token, a private ingest port
    /// range and `extra` arguments, and waits until it listens.
    ///
    /// # Panics
    ///
    /// When it does not come up within 20 s (the panic carries its output).
    pub fn start(binary: &str, extra: &[&str]) -> Self {
        Self::start_on(binary, "127.0.0.1:0", extra)
    }

    /// [`start`](Self::start) with HTTP on `http` (e.g. a veth address a viewer in a network
    /// namespace reaches; WebRTC UDP stays on loopback).
    ///
    /// # Panics
    ///
    /// When it does not come up within 20 s (the panic carries its output).
    pub fn start_on(binary: &str, http: &str, extra: &[&str]) -> Self {
        Self::start_with(binary, http, "127.0.0.1:0", extra)
    }

    /// [`start`](Self::start) with HTTP on `http` and the WebRTC UDP socket on `udp`: both on
    /// a namespace's host-side veth address, for a browser in that namespace that gathers no
    /// loopback candidate (Firefox, even with `media.peerconnection.ice.loopback`).
    ///
    /// # Panics
    ///
    /// When it does not come up within 20 s (the panic carries its output).
    pub fn start_with(binary: &str, http: &str, udp: &str, extra: &[&str]) -> Self {
        Self::start_in(None, binary, http, udp, extra)
    }

    /// [`start_with`](Self::start_with) inside the network namespace `netns` (by name,
    /// `ip netns exec`, which runs the binary in place: its pid is the server's), FFmpeg with
    /// it. [`Server::http`] is then the address inside; set it to where the test reaches it.
    ///
    /// # Panics
    ///
    /// When it does not come up within 20 s (the panic carries its output).
    pub fn start_in(
        netns: Option<&str>,
        binary: &str,
        http: &str,
        udp: &str,
        extra: &[&str],
    ) -> Self {
        let ingest = next_ingest_range();
        let range = format!("{}-{}", ingest.0, ingest.1);
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, binary]);
                c
            }
            None => Command::new(binary),
        };
        cmd.args(["--http", http, "--udp", udp, "--admin-token", ADMIN_TOKEN])
            .args(["--ingest-ports", &range])
            .args(extra)
            .env("RUST_LOG", std::env::var("E2E_LOG").unwrap_or_else(|_| "info".into()))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {binary}: {e}"));
        let log = output_lines(&mut child);
        let mut server = Self {
            child: Some(child),
            http: SocketAddr::from(([0, 0, 0, 0], 0)),
            udp: SocketAddr::from(([0, 0, 0, 0], 0)),
            https: false,
            ingest,
            log,
            lines: Vec::new(),
        };
        let line = server
            .wait_line(Duration::from_secs(20), |l| l.starts_with("whepd: listening on http"))
            .unwrap_or_else(|| panic!("server did not start:\n{}", server.output()));
        // "whepd: listening on http://127.0.0.1:PORT (WebRTC UDP 127.0.0.1:PORT)", or https://
        let rest = &line["whepd: listening on ".len()..];
        server.https = rest.starts_with("https://");
        let rest = rest.trim_start_matches("https://").trim_start_matches("http://");
        let (http, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        server.http = http.parse().unwrap_or_else(|_| panic!("bad address in {line:?}"));
        let udp = rest.trim_start_matches("(WebRTC UDP ").trim_end_matches(')');
        server.udp = udp.parse().unwrap_or_else(|_| panic!("bad address in {line:?}"));
        server
    }

    /// Waits up to `timeout` for an output line matching `pred` (lines seen before count).
    pub fn wait_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        if let Some(l) = self.lines.iter().find(|l| pred(l)) {
            return Some(l.clone());
        }
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    let hit = pred(&line);
                    self.lines.push(line.clone());
                    if hit {
                        return Some(line);
                    }
                }
                Err(_) => return None,
            }
        }
        None
    }

    /// Everything the server printed so far.
    pub fn output(&mut self) -> String {
        while let Ok(line) = self.log.try_recv() {
            self.lines.push(line);
        }
        self.lines.join("\n")
    }

    /// A request to the server.
    ///
    /// # Panics
    ///
    /// When the request fails at the transport level.
    pub fn request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> http::Response {
        http::request(self.http, method, target, headers, body)
            .unwrap_or_else(|e| panic!("{method} {target}: {e}"))
    }

    /// An admin API request with the admin token.
    pub fn admin(&self, method: &str, target: &str, body: &str) -> http::Response {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let headers = [("Authorization", auth.as_str()), ("Content-Type", "application/json")];
        self.request(method, target, &headers, body.as_bytes())
    }

    /// The admin API's view of one stream.
    ///
    /// # Panics
    ///
    /// When the stream does not exist or the answer is not JSON.
    pub fn stream(&self, id: &str) -> serde_json::Value {
        let r = self.admin("GET", &format!("/api/streams/{id}"), "");
        assert_eq!(r.status, 200, "GET /api/streams/{id}: {}", r.text());
        serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("bad JSON ({e}): {}", r.text()))
    }

    /// Polls the stream until `pred` holds or `timeout` passes; returns the last state seen.
    pub fn wait_stream(
        &self,
        id: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value, serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.stream(id);
            if pred(&s) {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err(s);
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// One sample (without labels, or with the exact label set given) from `/metrics`.
    pub fn metric(&self, name_and_labels: &str) -> Option<f64> {
        let r = self.request("GET", "/metrics", &[], b"");
        r.text().lines().find_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            (key == name_and_labels).then(|| value.parse().ok()).flatten()
        })
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        signal(self.pid(), Signal::SIGTERM);
        self.wait_exit(timeout)
    }

    /// Waits up to `timeout` for the server to exit (after a signal sent earlier).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Server {
    /// What the server holds right now: descriptors, memory, threads, child processes (from
    /// `/proc`) and sessions and ingest ports (from `/metrics`).
    ///
    /// # Panics
    ///
    /// When `/proc` has no entry for the server (it exited).
    pub fn resources(&self) -> Resources {
        let pid = self.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("server {pid} gone: {e}"));
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
        Resources {
            fds,
            rss_kib: kib("VmRSS:"),
            threads: kib("Threads:"),
            children: children_of(pid).len(),
            sessions: self.metric("whep_viewers_current").unwrap_or(-1.0) as i64,
            port_pairs: self.metric("whep_ingest_port_pairs_in_use").unwrap_or(-1.0) as i64,
        }
    }
}

/// A snapshot of what a server process holds; see [`Server::resources`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    /// Open file descriptors (sockets, pipes, files).
    pub fds: usize,
    /// Resident memory.
    pub rss_kib: u64,
    /// Threads.
    pub threads: u64,
    /// Live (non-zombie) child processes.
    pub children: usize,
    /// WHEP sessions (`whep_viewers_current`).
    pub sessions: i64,
    /// Ingest port pairs bound (`whep_ingest_port_pairs_in_use`).
    pub port_pairs: i64,
}

impl Resources {
    /// Whether `self` (after some work) is back at `baseline`: the same descriptors, sessions,
    /// port pairs, children and threads, and resident memory grown by at most `slack_kib`
    /// (allocators keep freed pages; the bound catches per-request leaks, not fragmentation).
    pub fn back_to(&self, baseline: &Self, slack_kib: u64) -> bool {
        self.fds <= baseline.fds
            && self.sessions == baseline.sessions
            && self.port_pairs == baseline.port_pairs
            && self.children <= baseline.children
            && self.threads <= baseline.threads
            && self.rss_kib <= baseline.rss_kib + slack_kib
    }
}

/// Thread names and descriptor targets of a process, for failure messages.
pub fn describe(pid: u32) -> String {
    let mut threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| {
                let comm = std::fs::read_to_string(e.ok()?.path().join("comm")).ok()?;
                Some(comm.trim().to_owned())
            })
            .collect()
        })
        .unwrap_or_default();
    threads.sort();
    let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| Some(std::fs::read_link(e.ok()?.path()).ok()?.display().to_string()))
                .collect()
        })
        .unwrap_or_default();
    fds.sort();
    format!("threads {threads:?}\nfds {fds:?}")
}

/// Pids of the live (non-zombie) children of `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // After ") ": state, ppid.
            stat.rsplit_once(") ").is_some_and(|(_, rest)| {
                let mut f = rest.split(' ');
                let state = f.next().unwrap_or("Z");
                state != "Z" && f.next().and_then(|p| p.parse::<u32>().ok()) == Some(pid)
            })
        })
        .collect()
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Politely first, so that the server stops its FFmpeg children.
            signal(child.id(), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends `sig` to `pid`; returns whether it was delivered. Pid 0 (a [`Server::pid`] after its
/// exit) is refused: `kill(0, …)` would signal the test's own process group.
pub fn signal(pid: u32, sig: Signal) -> bool {
    i32::try_from(pid).is_ok_and(|raw| raw > 0 && kill(Pid::from_raw(raw), sig).is_ok())
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Field 3, after the parenthesised command name, is the state; Z is a zombie.
    stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z'))
}

/// The UDP candidate addresses (`ip:port`, as the SDP writes them) of an SDP answer.
pub fn udp_candidates(sdp: &str) -> Vec<String> {
    sdp.lines()
        .filter_map(|l| l.trim().strip_prefix("a=candidate:"))
        .filter(|l| l.split(' ').nth(2).is_some_and(|p| p.eq_ignore_ascii_case("udp")))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Some(format!("{}:{}", f.get(4)?, f.get(5)?))
        })
        .collect()
}

/// Waits until `pred` holds, polling every 50 ms, for at most `timeout`.
pub fn wait_until(timeout: Duration, mut pred: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if pred() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// One `#[test]` per runtime server for each test function `fn name(bin: &str)` of the calling
/// test file: `mod tokio { #[test] fn name() }` and likewise `smol` and `blocking`, each calling
/// `super::name` with its server binary. `runtime_suite!(a, b)` is every runtime;
/// `runtime_suite!([tokio, smol] a, b)` names them.
#[macro_export]
macro_rules! runtime_suite {
    ([] $($test:ident),+ $(,)?) => {};
    ([$first:ident $(, $rest:ident)*] $($test:ident),+ $(,)?) => {
        $crate::runtime_suite!(@runtime $first; $($test),+);
        $crate::runtime_suite!([$($rest),*] $($test),+);
    };
    (@runtime tokio; $($test:ident),+) => {
        $crate::runtime_suite!(@mod tokio, env!("CARGO_BIN_EXE_whepd-tokio"); $($test),+);
    };
    (@runtime smol; $($test:ident),+) => {
        $crate::runtime_suite!(@mod smol, env!("CARGO_BIN_EXE_whepd-smol-e2e"); $($test),+);
    };
    (@runtime blocking; $($test:ident),+) => {
        $crate::runtime_suite!(@mod blocking, env!("CARGO_BIN_EXE_whepd-blocking"); $($test),+);
    };
    (@mod $runtime:ident, $bin:expr; $($test:ident),+) => {
        mod $runtime {
            $(
                #[test]
                fn $test() {
                    super::$test($bin);
                }
            )+
        }
    };
    ($($test:ident),+ $(,)?) => {
        $crate::runtime_suite!([tokio, smol, blocking] $($test),+);
    };
}

/// Headless Chromium (Debian's `chromium` package) driven through its console log.
pub mod chromium {
    use super::{Duration, Instant, Ordering, Path};

    /// Where Debian installs it; `CHROMIUM` overrides.
    pub fn binary() -> String {
        std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
    }

    /// Opens `url` and returns the first console line containing `[WHEP] PASS` or
    /// `[WHEP] FAIL`, or `Err` with the browser's output when none came within `timeout`.
    ///
    /// # Panics
    ///
    /// When Chromium is not installed (the test command installs it).
    pub fn run_page(url: &str, timeout: Duration) -> Result<String, String> {
        run_page_in(None, url, timeout).verdict
    }

    /// What a page run gave: the verdict, and the page's other `[WHEP]` lines (e.g. the
    /// `[WHEP] PROGRESS` lines of `progress=1`) with when they came.
    #[derive(Debug)]
    pub struct PageRun {
        /// The `[WHEP] PASS`/`FAIL` line, or the browser's output when none came in time.
        pub verdict: Result<String, String>,
        /// Other `[WHEP]` console lines, in order, with their arrival time.
        pub lines: Vec<(Instant, String)>,
        /// When the browser was started.
        pub started: Instant,
    }

    /// [`run_page`], with the browser inside the network namespace `netns` (by name, see
    /// [`crate::netns`]) when given.
    ///
    /// # Panics
    ///
    /// When Chromium is not installed (the test command installs it).
    pub fn run_page_in(netns: Option<&str>, url: &str, timeout: Duration) -> PageRun {
        run_page_with(netns, url, timeout, &[])
    }

    /// [`run_page_in`] with `extra` browser flags (e.g.
    /// `--ignore-certificate-errors-spki-list=…` for a test certificate).
    ///
    /// # Panics
    ///
    /// When Chromium is not installed (the test command installs it).
    pub fn run_page_with(
        netns: Option<&str>,
        url: &str,
        timeout: Duration,
        extra: &[String],
    ) -> PageRun {
        let bin = binary();
        assert!(
            Path::new(&bin).exists(),
            "{bin} is missing: install Debian's chromium package (bash scripts/test.sh does)"
        );
        // One profile per browser: tests in one binary run browsers in parallel, and a profile
        // in use (its SingletonLock) makes a second Chromium abort.
        static BROWSERS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let profile = std::env::temp_dir().join(format!(
            "whep-e2e-chromium-{}-{}",
            std::process::id(),
            BROWSERS.fetch_add(1, Ordering::Relaxed)
        ));
        // Left by an earlier process with the same pid.
        let _ = std::fs::remove_dir_all(&profile);
        let mut cmd = crate::command_in(netns, &bin);
        // Its own process group: /usr/bin/chromium is a script, and the browser it starts
        // (with its helpers) must go when the test is done.
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--autoplay-policy=no-user-gesture-required",
            "--allow-loopback-in-peer-connection",
            "--use-fake-ui-for-media-stream",
            "--disable-features=WebRtcHideLocalIpsWithMdns",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url);
        let started = Instant::now();
        let (group, rx) = match crate::spawn_group(&mut cmd) {
            Ok(spawned) => spawned,
            Err(e) => {
                let verdict = Err(format!("cannot start {bin}: {e}"));
                return PageRun { verdict, lines: Vec::new(), started };
            }
        };
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        let mut lines = Vec::new();
        let result = loop {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break Err(format!("no verdict within {timeout:?}:\n{}", seen.join("\n")));
            };
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("[WHEP] PASS") || line.contains("[WHEP] FAIL") => {
                    break Ok(line);
                }
                Ok(line) => {
                    if let Some(i) = line.find("[WHEP] ") {
                        let text = line[i..].split("\", source:").next().unwrap_or("");
                        lines.push((Instant::now(), text.to_owned()));
                    }
                    seen.push(line);
                }
                Err(_) => {
                    break Err(format!("no verdict within {timeout:?}:\n{}", seen.join("\n")));
                }
            }
        };
        drop(group);
        let _ = std::fs::remove_dir_all(&profile);
        PageRun { verdict: result, lines, started }
    }

    /// The value of `key=` in a verdict line.
    pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
        let pat = format!("{key}=");
        // Only whole keys: `framesDecoded=` is not found in `keyFramesDecoded=`.
        let start = line
            .match_indices(&pat)
            .map(|(i, _)| i)
            .find(|&i| line[..i].chars().next_back().is_none_or(|c| c == ' ' || c == '"'))?
            + pat.len();
        line[start..].split([' ', '"', ',']).next()
    }

    /// `field` parsed as a number (`?`, a missing field and garbage give `None`).
    pub fn number(line: &str, key: &str) -> Option<f64> {
        field(line, key)?.parse().ok()
    }
}
