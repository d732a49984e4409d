//! A fleet of three identical nodes (whepd-tokio with `--shards 2`, whepd-smol, whepd-blocking,
//! each `--node-id nK` and the same `--config` file) behind
//! Debian's nginx running the shipped `deploy/nginx/whep-fleet.conf` (node addresses replaced),
//! for real off loopback: every node, the balancer and the viewers are machines of their own on
//! one LAN ([`whep_e2e::lan::Lan`]: a namespace each, cabled to a bridge). The viewers (str0m,
//! and a headless Chromium playing the player page through nginx) are in the client namespace:
//! they POST through the balancer and send their media straight to the node address each
//! answer advertises (`--candidate NODE:3478`, as real deployments do).
//!
//! Every node pulls its source itself, on demand (`on_demand = true`, a short
//! `on_demand_close_after_secs`): before any viewer no node runs FFmpeg (stream `idle` in
//! `GET /streams`, no child process); a node starts its FFmpeg when the balancer gives it its
//! first viewer, and only then. The time from the POST through the balancer to the first
//! keyframe of a node's first viewer (FFmpeg started by that POST) and of its second (FFmpeg
//! running) is printed (`--nocapture`).
//!
//! Viewers spread over the nodes; PATCH and DELETE through nginx reach the owning node (its tag
//! in the path, checked in nginx's access log). Node n1 is drained with SIGTERM
//! (`--drain-secs`): `/ready` 503, new POSTs go to the others, its sessions still answer and its
//! viewers keep playing. Then, in one variant, n1 reaches its deadline, closes its viewers (DTLS
//! close) and exits, its sessions' URLs get 502 from nginx, and n2 is killed (SIGKILL, no
//! drain): its viewers' media stops, its sessions' URLs get 502. In the other, n1 is killed
//! during its drain (its viewers' media stops, 502), and n2's host vanishes from the network (its
//! cable pulled): its sessions' URLs get 504 after nginx's `proxy_connect_timeout`. A node that
//! exits or is killed leaves no FFmpeg behind. Either way
//! new POSTs all go to n3, whose viewers never stop, whose `/metrics` counts exactly its viewers,
//! and which holds none after their DELETEs through the balancer: its FFmpeg stops after the
//! close delay (stream `idle`, no child), and the next POST through the balancer starts it
//! again and plays.
//!
//! Behind HAProxy in TCP mode (`deploy/haproxy/haproxy-tcp.cfg`, TLS passed through to https
//! nodes) nothing routes by path: each node names itself with `--public-url`, its session URLs
//! are absolute and PATCH/DELETE go straight to it.
//!
//! Both variants again behind HAProxy (`deploy/haproxy/haproxy.cfg`, `/ready` health checks)
//! (`bash scripts/test.sh` installs it): a gone node's sessions get 503 there. One fleet runs at a time.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use whep_e2e::lan::{Host, Lan};
use whep_e2e::nginx::{self, Daemon, daemon_dir};
use whep_e2e::tls::{Issued, TestCa};
use whep_e2e::viewer::Viewer;
use whep_e2e::{Server, children_of, chromium, http, process_alive, udp_candidates, wait_until};

/// `--drain-secs` of the node drained to the end.
const DRAIN_SECS: u64 = 8;
/// `--drain-secs` of the node killed during its drain: long enough that the kill comes first.
const LONG_DRAIN_SECS: u64 = 30;
const PLAY_WITHIN: Duration = Duration::from_secs(25);
/// Every node's HTTP and UDP ports (each has its own address).
const HTTP_PORT: u16 = 8080;
const UDP_PORT: u16 = 3478;
/// The balancer's port (the shipped files' `0.0.0.0:80`, unchanged).
const LB_PORT: u16 = 80;

/// The stream every node serves, on demand.
const STREAM: &str = "demo";
/// `on_demand_close_after_secs`: FFmpeg stops this long after a node's last viewer left.
const CLOSE_AFTER_SECS: u64 = 3;
/// FFmpeg's first keyframe of a new start, and of the GOP cache for a later viewer.
const KEYFRAME_WITHIN: Duration = Duration::from_secs(20);

/// The one configuration file of every node: a `lavfi` source pulled on demand.
struct FleetConfig(PathBuf);

impl FleetConfig {
    fn write() -> Self {
        let dir = daemon_dir("fleet-config");
        let path = dir.join("whepd.toml");
        let toml = format!(
            "[streams.{STREAM}]\nlavfi = \"testsrc2=size=640x360:rate=30\"\ngop = 60\n\
             on_demand = true\non_demand_close_after_secs = {CLOSE_AFTER_SECS}\n"
        );
        std::fs::write(&path, toml).expect("write config");
        Self(dir)
    }

    fn path(&self) -> String {
        self.0.join("whepd.toml").display().to_string()
    }
}

impl Drop for FleetConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A load balancer process started by the test in the balancer's namespace, killed on drop.
struct Balancer {
    daemon: Daemon,
    addr: SocketAddr,
}

impl Balancer {
    fn log(&self, name: &str) -> String {
        self.daemon.log(name)
    }
}

/// The shipped configuration with the documentation addresses of the nodes replaced by theirs.
fn shipped(file: &str, nodes: &[SocketAddr]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file);
    let mut text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    for (i, node) in nodes.iter().enumerate() {
        text = text.replace(&format!("192.0.2.1{}:8080", i + 1), &node.to_string());
    }
    text
}

/// A GET from the client's namespace until the balancer answers.
fn wait_up(client: &Host, lb: &Balancer, log: &str) {
    let addr = lb.addr;
    let up = client
        .enter(|| wait_until(Duration::from_secs(15), || http::get(addr, "/healthz").is_ok()));
    assert!(up, "balancer did not come up: {}", lb.log(log));
}

fn start_nginx(lan: &Lan, nodes: &[SocketAddr]) -> Balancer {
    let host = lan.host("lb");
    let conf = shipped("nginx/whep-fleet.conf", nodes);
    let daemon = nginx::start(Some(&host.name), &format!("nginx-{}", host.name), &conf)
        .expect("nginx: install Debian's nginx (bash scripts/test.sh does)");
    let lb = Balancer { daemon, addr: (host.addr, LB_PORT).into() };
    wait_up(lan.host("client"), &lb, "error.log");
    lb
}

fn start_haproxy(lan: &Lan, nodes: &[SocketAddr]) -> Balancer {
    haproxy_with(lan, nodes, "haproxy/haproxy.cfg", LB_PORT)
}

/// HAProxy with the shipped file `file` (node addresses replaced), its frontend on `port`.
fn haproxy_with(lan: &Lan, nodes: &[SocketAddr], file: &str, port: u16) -> Balancer {
    let host = lan.host("lb");
    let dir = daemon_dir(&format!("haproxy-{}", host.name));
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, shipped(file, nodes)).expect("write");
    let log = std::fs::File::create(dir.join("haproxy.log")).expect("log");
    let child = host
        .command("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("haproxy");
    let lb = Balancer { daemon: Daemon::new(child, dir), addr: (host.addr, port).into() };
    wait_up(lan.host("client"), &lb, "haproxy.log");
    lb
}

/// n1's engine loops (`--shards`): a sharded node drains, and answers `/ready`, as one.
const N1_SHARDS: u16 = 2;

/// The UDP addresses node `tag` may advertise: its own address, with port + i for shard i.
fn node_udp(lan: &Lan, tag: &str) -> Vec<String> {
    let shards = if tag == "n1" { N1_SHARDS } else { 1 };
    (0..shards).map(|i| format!("{}:{}", lan.host(tag).addr, UDP_PORT + i)).collect()
}

/// The nodes: one of each runtime.
const EVERY_RUNTIME: [(&str, &str); 3] = [
    ("n1", env!("CARGO_BIN_EXE_whepd-tokio")),
    ("n2", env!("CARGO_BIN_EXE_whepd-smol-e2e")),
    ("n3", env!("CARGO_BIN_EXE_whepd-blocking")),
];

/// The nodes when they serve HTTPS (the blocking example serves plain HTTP only).
const TLS_RUNTIMES: [(&str, &str); 3] = [
    ("n1", env!("CARGO_BIN_EXE_whepd-tokio")),
    ("n2", env!("CARGO_BIN_EXE_whepd-smol-e2e")),
    ("n3", env!("CARGO_BIN_EXE_whepd-tokio")),
];

/// Three nodes (`bins`: tag and binary), each in its namespace, listening on its own address
/// and advertising it, with `extra` arguments for each host.
fn nodes(
    lan: &Lan,
    bins: &[(&str, &str)],
    drain_secs: u64,
    config: &FleetConfig,
    extra: &dyn Fn(&Host) -> Vec<String>,
) -> Vec<Server> {
    let config = config.path();
    bins.iter()
        .map(|(tag, bin)| {
            let host = lan.host(tag);
            let candidate = format!("{}:{UDP_PORT}", host.addr);
            let drain = drain_secs.to_string();
            // Behind a balancer every request comes from its address: the per-client limits
            // would count all viewers as one client.
            let shards = N1_SHARDS.to_string();
            let mut args = vec![
                "--node-id",
                tag,
                "--candidate",
                &candidate,
                "--drain-secs",
                &drain,
                "--max-unconnected",
                "0",
                "--post-rate",
                "0",
                "--max-viewers",
                "20",
                "--config",
                &config,
            ];
            if *tag == "n1" {
                args.extend(["--shards", &shards]);
            }
            let extra = extra(host);
            args.extend(extra.iter().map(String::as_str));
            let http = format!("0.0.0.0:{HTTP_PORT}");
            let udp = format!("0.0.0.0:{UDP_PORT}");
            let mut node = Server::start_in(Some(&host.name), bin, &http, &udp, &args);
            node.http = (host.addr, HTTP_PORT).into();
            node
        })
        .collect()
}

/// The node tag in a viewer's session URL.
fn tag(v: &Viewer) -> String {
    let last = v.location().trim_end_matches('/').rsplit('/').next().unwrap_or_default();
    last.split_once('.').map(|(t, _)| t.to_owned()).unwrap_or_default()
}

/// The test's side of the fleet: requests and viewers from the client's namespace.
struct Client<'a> {
    host: &'a Host,
    lb: SocketAddr,
}

impl Client<'_> {
    fn connect(&self) -> Viewer {
        let lb = self.lb;
        self.host
            .enter(|| Viewer::connect(lb, "/whep/demo", None))
            .unwrap_or_else(|e| panic!("POST via the balancer: {e}"))
    }

    /// A request through the balancer (status, body).
    fn via_lb(&self, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> u16 {
        let lb = self.lb;
        self.host
            .enter(|| http::request(lb, method, target, headers, body))
            .unwrap_or_else(|e| panic!("{method} {target} via the balancer: {e}"))
            .status
    }

    fn ready(&self, node: &Server) -> (u16, String) {
        let addr = node.http;
        let r = self.host.enter(|| http::get(addr, "/ready")).expect("GET /ready");
        (r.status, r.text())
    }

    /// One sample (the name with its exact labels) of the node's `/metrics`.
    fn metric(&self, node: &Server, sample: &str) -> Option<f64> {
        let addr = node.http;
        let page = self.host.enter(|| http::get(addr, "/metrics")).ok()?.text();
        page.lines().find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
    }

    /// The state of [`STREAM`] on the node (`GET /streams`, public), `?` when it does not answer.
    fn state(&self, node: &Server) -> String {
        let addr = node.http;
        let Ok(r) = self.host.enter(|| http::get(addr, "/streams")) else { return "?".into() };
        let list: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
        let stream = list.as_array().and_then(|l| l.iter().find(|s| s["id"] == STREAM));
        stream.and_then(|s| s["state"].as_str()).unwrap_or("?").to_owned()
    }

    /// Whether the node runs no FFmpeg: no child process, and its stream says `idle`.
    fn idle(&self, node: &Server) -> bool {
        ffmpegs(node).is_empty() && self.state(node) == "idle"
    }

    /// The node's stream state and FFmpeg processes, for failure messages.
    fn pulling(&self, node: &Server) -> String {
        format!("state {}, FFmpeg pids {:?}", self.state(node), ffmpegs(node))
    }

    /// The node's `whep_viewers_current`.
    fn viewers_on(&self, node: &Server) -> Option<f64> {
        self.metric(node, "whep_viewers_current")
    }

    fn delete(&self, v: &Viewer) -> u16 {
        self.via_lb("DELETE", v.location(), &[], b"")
    }
}

/// The node's FFmpeg processes: its children (it runs nothing else). Only for a running node
/// (a gone node's pid is 0).
fn ffmpegs(node: &Server) -> Vec<u32> {
    let pid = node.pid();
    assert_ne!(pid, 0, "the node exited");
    children_of(pid)
}

/// Whether every one of these processes (a node's FFmpeg seen earlier) is gone. A node killed
/// with SIGKILL cannot stop them: `PR_SET_PDEATHSIG` does.
fn all_gone(pids: &[u32]) -> bool {
    wait_until(Duration::from_secs(15), || pids.iter().all(|p| !process_alive(*p)))
}

/// The time from the viewer's POST (through the balancer) to its first complete keyframe.
fn first_keyframe(v: &Viewer) -> Option<Duration> {
    let s = v.stats();
    Some(s.first_keyframe_at?.saturating_duration_since(s.posted_at?))
}

fn plays(v: &Viewer) -> bool {
    v.wait_for(PLAY_WITHIN, |s| s.first_keyframe_at.is_some() && s.video_packets > 60)
}

/// Whether every viewer's video packet count grows within 2 s.
fn all_growing(viewers: &[&Viewer]) -> bool {
    let before: Vec<u64> = viewers.iter().map(|v| v.stats().video_packets).collect();
    std::thread::sleep(Duration::from_secs(2));
    viewers.iter().zip(before).all(|(v, b)| v.stats().video_packets > b && !v.stats().closed)
}

/// Whether no viewer's video packet count grows within 3 s.
fn none_growing(viewers: &[&Viewer]) -> bool {
    // Packets in flight when the node went.
    std::thread::sleep(Duration::from_millis(500));
    let before: Vec<u64> = viewers.iter().map(|v| v.stats().video_packets).collect();
    std::thread::sleep(Duration::from_secs(3));
    viewers.iter().zip(before).all(|(v, b)| v.stats().video_packets == b)
}

/// How n1 and then n2 leave the fleet.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Ending {
    /// n1 drains to the end and exits; n2 is then killed (SIGKILL) without a drain.
    DrainThenKill,
    /// n1 is killed (SIGKILL) during its drain; n2's host then vanishes (its cable pulled).
    KillDuringDrainThenUnplug,
}

/// `settle`: how long the balancer may take to stop sending POSTs to a node whose `/ready` says
/// 503 (nginx: none, it retries the 503 on the next node; HAProxy: its health check interval).
fn fleet_behind(
    balancer: fn(&Lan, &[SocketAddr]) -> Balancer,
    with_chromium: bool,
    settle: Duration,
    ending: Ending,
) {
    let lan = Lan::create(&[("lb", 1), ("n1", 11), ("n2", 12), ("n3", 13), ("client", 100)])
        .expect("namespaces (needs root)");
    let drain_secs = match ending {
        Ending::DrainThenKill => DRAIN_SECS,
        Ending::KillDuringDrainThenUnplug => LONG_DRAIN_SECS,
    };
    let config = FleetConfig::write();
    let mut nodes = nodes(&lan, &EVERY_RUNTIME, drain_secs, &config, &|_| Vec::new());
    let node_addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.http).collect();
    let lb = balancer(&lan, &node_addrs);
    let client = Client { host: lan.host("client"), lb: lb.addr };
    for n in &nodes {
        assert_eq!(client.ready(n).0, 200, "{:?}", client.ready(n));
    }
    // On demand: up, ready and health-checked, and no node pulls its source yet.
    std::thread::sleep(Duration::from_secs(1));
    for (i, n) in nodes.iter().enumerate() {
        assert!(client.idle(n), "n{} before any viewer: {}", i + 1, client.pulling(n));
    }

    // Nine viewers, one after the other: round robin spreads them (three on each node). Each
    // node starts its FFmpeg with the first viewer the balancer gives it, and not before.
    let mut viewers: Vec<Viewer> = Vec::new();
    // Per node: its viewers' times from the POST to the first keyframe, in order.
    let mut first_frames: [Vec<Duration>; 3] = Default::default();
    for _ in 0..9 {
        for (i, n) in nodes.iter().enumerate() {
            if first_frames[i].is_empty() {
                assert!(client.idle(n), "n{} pulls with no viewer: {}", i + 1, client.pulling(n));
            }
        }
        let v = client.connect();
        let i: usize = tag(&v)[1..].parse::<usize>().expect("tag number") - 1;
        let node = &nodes[i];
        assert!(
            wait_until(KEYFRAME_WITHIN, || !ffmpegs(node).is_empty()),
            "n{} runs no FFmpeg for its viewer: {}",
            i + 1,
            client.pulling(node)
        );
        assert!(
            ["starting", "running"].contains(&client.state(node).as_str()),
            "n{} with a viewer: {}",
            i + 1,
            client.pulling(node)
        );
        // The next POST once this one has its picture: a node's second viewer joins a running
        // FFmpeg.
        let keyframe = v.wait_for(KEYFRAME_WITHIN, |s| s.first_keyframe_at.is_some());
        assert!(keyframe, "no keyframe on n{}: {:?}", i + 1, v.stats());
        first_frames[i].push(first_keyframe(&v).expect("keyframe"));
        viewers.push(v);
    }
    let build = if cfg!(debug_assertions) { "debug" } else { "release" };
    for (i, times) in first_frames.iter().enumerate() {
        eprintln!(
            "n{} ({build} build), POST via the balancer to first keyframe: first viewer (FFmpeg \
             started on demand) {:?}, next viewers (FFmpeg running) {:?}",
            i + 1,
            times.first(),
            times.get(1..).unwrap_or_default()
        );
    }
    let mut tags: Vec<String> = viewers.iter().map(tag).collect();
    for v in &viewers {
        assert!(plays(v), "viewer on {} did not play: {:?}", tag(v), v.stats());
        // Its media comes straight from its node's address, not through the balancer.
        let node: usize = tag(v)[1..].parse().expect("tag number");
        let offered = udp_candidates(v.answer());
        let own = node_udp(&lan, &tag(v));
        assert!(offered.len() == 1 && own.contains(&offered[0]), "n{node}: {offered:?}");
    }
    tags.sort();
    tags.dedup();
    assert_eq!(tags, ["n1", "n2", "n3"], "spread over every node");
    // The player page once every node pulls (whichever node the balancer gives it).
    if with_chromium {
        let url = format!("http://{}/?stream={STREAM}&test=1&frames=60&timeout=40", lb.addr);
        let verdict = chromium_plays_from_a_node(&lan, &client, &url, &[]);
        eprintln!(
            "Chromium via the balancer: firstFrameMs={} ({verdict})",
            chromium::field(&verdict, "firstFrameMs").unwrap_or("?")
        );
    }

    // PATCH and DELETE through the balancer reach the owning node.
    let frag = ("Content-Type", "application/trickle-ice-sdpfrag");
    for v in &viewers {
        let status = client.via_lb("PATCH", v.location(), &[frag], b"a=end-of-candidates\r\n");
        assert!(![404, 502, 503].contains(&status), "PATCH {}: {status}", tag(v));
    }
    let gone = &viewers[8];
    assert_eq!(client.delete(gone), 204);
    assert!(gone.wait_for(Duration::from_secs(5), |s| s.closed), "DELETE closed the session");
    let access = lb.log("access.log");
    if !access.is_empty() {
        // nginx's log: each session request went to its node's address.
        for v in &viewers {
            let i: usize = tag(v)[1..].parse().expect("tag number");
            let node = nodes[i - 1].http.to_string();
            let mine: Vec<&str> = access.lines().filter(|l| l.contains(v.location())).collect();
            assert!(!mine.is_empty(), "no log of {}", v.location());
            assert!(mine.iter().all(|l| l.contains(&node)), "{}: {mine:?} not to {node}", tag(v));
        }
    }

    // Drain n1: SIGTERM.
    let live = &viewers[..8];
    let n1_viewers: Vec<&Viewer> = live.iter().filter(|v| tag(v) == "n1").collect();
    let n2_viewers: Vec<&Viewer> = live.iter().filter(|v| tag(v) == "n2").collect();
    let mut n3_viewers: Vec<&Viewer> = live.iter().filter(|v| tag(v) == "n3").collect();
    assert!(!n1_viewers.is_empty() && !n2_viewers.is_empty() && !n3_viewers.is_empty());
    let n1_shards: Vec<Vec<String>> =
        n1_viewers.iter().map(|v| udp_candidates(v.answer())).collect();
    eprintln!("n1's viewers' media from {n1_shards:?} (--shards {N1_SHARDS})");
    if n1_viewers.len() >= 2 {
        // A POST goes to the shard with the fewest viewers: the drain covers both.
        let on_shard_1 = client.metric(&nodes[0], "whep_shard_viewers{shard=\"1\"}");
        assert!(on_shard_1.is_some_and(|n| n > 0.0), "n1's shard 1: {on_shard_1:?}");
    }
    let n1_pid = nodes[0].pid();
    let n1_ffmpeg = ffmpegs(&nodes[0]);
    assert!(!n1_ffmpeg.is_empty(), "n1 pulls for its viewers: {}", client.pulling(&nodes[0]));
    let term = Instant::now();
    assert!(whep_e2e::signal(n1_pid, Signal::SIGTERM));
    assert!(
        wait_until(Duration::from_secs(5), || client.ready(&nodes[0]).0 == 503),
        "n1 /ready: {:?}",
        client.ready(&nodes[0])
    );
    let not_ready = term.elapsed();
    assert!(client.ready(&nodes[0]).1.contains("draining"));
    std::thread::sleep(settle);
    // New POSTs go to the others (a 503 from n1 is retried on the next node).
    let late: Vec<Viewer> = (0..4).map(|_| client.connect()).collect();
    for v in &late {
        assert_ne!(tag(v), "n1", "a POST reached the draining node");
        assert!(plays(v), "late viewer on {}: {:?}", tag(v), v.stats());
    }
    // n1's sessions still answer through the balancer, and its viewers keep playing...
    let status =
        client.via_lb("PATCH", n1_viewers[0].location(), &[frag], b"a=end-of-candidates\r\n");
    assert!(![404, 502, 503].contains(&status), "PATCH on the draining node: {status}");
    assert!(all_growing(&n1_viewers), "n1's viewers stopped during the drain");
    assert!(term.elapsed() < Duration::from_secs(drain_secs), "the checks took the whole drain");
    let mut n2_late: Vec<&Viewer> = late.iter().filter(|v| tag(v) == "n2").collect();
    n3_viewers.extend(late.iter().filter(|v| tag(v) == "n3"));
    n2_late.extend(&n2_viewers);
    let n2_viewers = n2_late;

    match ending {
        Ending::DrainThenKill => {
            // ... until the deadline; they are then closed by the server (DTLS close), and n1
            // exits.
            for v in &n1_viewers {
                assert!(
                    v.wait_for(Duration::from_secs(DRAIN_SECS + 10), |s| s.closed),
                    "n1's viewer not closed: {:?}",
                    v.stats()
                );
            }
            let closed =
                n1_viewers.iter().filter_map(|v| v.stats().closed_at).max().map(|t| t - term);
            assert!(
                closed.is_some_and(|c| c >= Duration::from_secs(DRAIN_SECS)),
                "closed before the deadline: {closed:?}"
            );
            let status = nodes[0].wait_exit(Duration::from_secs(15));
            let exited = term.elapsed();
            assert_eq!(status.map(|s| s.success()), Some(true), "n1 exit");
            eprintln!(
                "drain in namespaces: /ready 503 after {not_ready:?}, viewers closed {closed:?} \
                 and exit {exited:?} after SIGTERM (--drain-secs {DRAIN_SECS})"
            );
        }
        Ending::KillDuringDrainThenUnplug => {
            // Killed mid-drain: its viewers stop at once, with no close.
            assert!(n1_viewers.iter().all(|v| !v.stats().closed), "closed before the kill");
            assert!(whep_e2e::signal(n1_pid, Signal::SIGKILL));
            let killed = term.elapsed();
            assert!(killed < Duration::from_secs(drain_secs), "killed after the drain");
            let status = nodes[0].wait_exit(Duration::from_secs(10));
            assert!(status.is_some_and(|s| !s.success()), "n1 killed: {status:?}");
            assert!(none_growing(&n1_viewers), "n1's viewers still get media");
            eprintln!("n1 killed {killed:?} into its drain (--drain-secs {drain_secs})");
        }
    }
    // Gone, and its FFmpeg with it (stopped on exit, or killed with it: `PR_SET_PDEATHSIG`).
    assert!(all_gone(&n1_ffmpeg), "n1's FFmpeg {n1_ffmpeg:?} outlived it ({ending:?})");
    // n1's session URLs now reach no node.
    let status = client.via_lb("DELETE", n1_viewers[0].location(), &[], b"");
    eprintln!("DELETE of a session of the gone n1 through the balancer ({ending:?}): {status}");
    assert!([502, 503].contains(&status), "{status}");

    // n2 goes without a drain.
    let n2_ffmpeg = ffmpegs(&nodes[1]);
    assert!(!n2_ffmpeg.is_empty(), "n2 pulls for its viewers: {}", client.pulling(&nodes[1]));
    let gone_at = Instant::now();
    match ending {
        Ending::DrainThenKill => {
            assert!(whep_e2e::signal(nodes[1].pid(), Signal::SIGKILL));
            assert!(nodes[1].wait_exit(Duration::from_secs(10)).is_some(), "n2 killed");
            assert!(all_gone(&n2_ffmpeg), "n2's FFmpeg {n2_ffmpeg:?} outlived its SIGKILL");
        }
        Ending::KillDuringDrainThenUnplug => lan.host("n2").plug(false).expect("unplug n2"),
    }
    assert!(none_growing(&n2_viewers), "n2's viewers still get media");
    // Its sessions' URLs: the balancer reaches no node (connection refused, or a connect timeout
    // for a host that vanished).
    let started = Instant::now();
    let status = client.via_lb("DELETE", n2_viewers[0].location(), &[], b"");
    eprintln!(
        "DELETE of a session of the gone n2 through the balancer ({ending:?}): {status} after {:?}",
        started.elapsed()
    );
    assert!([502, 503, 504].contains(&status), "{status}");
    // New POSTs all go to n3 now (HAProxy: once its checks mark n2 down).
    std::thread::sleep(settle);
    let last: Vec<Viewer> = (0..3).map(|_| client.connect()).collect();
    for v in &last {
        assert_eq!(tag(v), "n3", "a POST reached a gone node");
        assert!(plays(v), "last viewer: {:?}", v.stats());
    }
    eprintln!(
        "n2 gone ({ending:?}); the next POSTs all played on n3 {:?} later",
        gone_at.elapsed()
    );
    n3_viewers.extend(&last);

    // The survivor's viewers never stopped, and its /metrics counts exactly them (the page's
    // session, if it went there, times out).
    assert!(all_growing(&n3_viewers), "n3's viewers stopped");
    assert!(n3_viewers.iter().all(|v| !v.stats().closed));
    let gaps: Vec<Duration> = n3_viewers.iter().map(|v| v.stats().max_video_gap).collect();
    eprintln!("n3's viewers' longest pauses between video packets ({ending:?}): {gaps:?}");
    let mine = n3_viewers.len() as f64;
    assert!(
        wait_until(Duration::from_secs(60), || client.viewers_on(&nodes[2]) == Some(mine)),
        "n3 counts {:?} viewers, the test has {mine} there",
        client.viewers_on(&nodes[2])
    );
    // No session left behind after their DELETEs through the balancer; the last one starts the
    // close delay, after which n3 stops its FFmpeg.
    let n3_ffmpeg = ffmpegs(&nodes[2]);
    assert!(!n3_ffmpeg.is_empty(), "n3 pulls for its viewers: {}", client.pulling(&nodes[2]));
    let (last_one, others) = n3_viewers.split_last().expect("viewers on n3");
    for v in others {
        assert_eq!(client.delete(v), 204, "DELETE on n3");
    }
    let left = Instant::now();
    assert_eq!(client.delete(last_one), 204, "DELETE on n3");
    assert!(
        wait_until(Duration::from_secs(10), || client.viewers_on(&nodes[2]) == Some(0.0)),
        "n3 still counts {:?} viewers",
        client.viewers_on(&nodes[2])
    );
    assert!(
        wait_until(Duration::from_secs(CLOSE_AFTER_SECS + 20), || client.idle(&nodes[2])),
        "n3 still pulls {:?} after its last viewer left: {}",
        left.elapsed(),
        client.pulling(&nodes[2])
    );
    let stopped = left.elapsed();
    assert!(all_gone(&n3_ffmpeg), "n3's FFmpeg {n3_ffmpeg:?} still runs");
    assert!(
        stopped >= Duration::from_secs(CLOSE_AFTER_SECS),
        "n3's FFmpeg stopped {stopped:?} after its last viewer left, before the close delay"
    );
    eprintln!(
        "n3 idle again {stopped:?} after its last viewer's DELETE (close delay {CLOSE_AFTER_SECS} s)"
    );
    assert_eq!(client.ready(&nodes[2]).0, 200);
    // The next POST through the balancer starts it again.
    let again = client.connect();
    assert_eq!(tag(&again), "n3", "the POST reached a gone node");
    assert!(
        wait_until(KEYFRAME_WITHIN, || !ffmpegs(&nodes[2]).is_empty()),
        "n3 runs no FFmpeg for its new viewer: {}",
        client.pulling(&nodes[2])
    );
    assert!(plays(&again), "n3's viewer after idle: {:?}", again.stats());
    eprintln!(
        "n3 started again on demand ({build} build): POST via the balancer to first keyframe {:?}",
        first_keyframe(&again)
    );
    let n3_ffmpeg = ffmpegs(&nodes[2]);
    assert_eq!(client.delete(&again), 204, "DELETE on n3");
    if ending == Ending::KillDuringDrainThenUnplug {
        // The unplugged n2 still runs: no need to wait for its drain. Its FFmpeg dies with it.
        assert!(whep_e2e::signal(nodes[1].pid(), Signal::SIGKILL));
        assert!(nodes[1].wait_exit(Duration::from_secs(10)).is_some(), "n2 killed");
        assert!(all_gone(&n2_ffmpeg), "n2's FFmpeg {n2_ffmpeg:?} outlived its SIGKILL");
    }
    // And n3 on SIGTERM: it exits with no FFmpeg left.
    let status = nodes[2].terminate(Duration::from_secs(15));
    assert_eq!(status.map(|s| s.success()), Some(true), "n3 exit");
    assert!(all_gone(&n3_ffmpeg), "n3's FFmpeg {n3_ffmpeg:?} outlived it");
}

/// One fleet at a time: each runs three nodes transcoding the demo, and a 2-core machine
/// running all four at once would measure its own load.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static FLEET: std::sync::Mutex<()> = std::sync::Mutex::new(());
    FLEET.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// HAProxy from Debian; `bash scripts/test.sh` installs it.
fn need_haproxy() {
    let installed = Command::new("haproxy").arg("-v").output().is_ok();
    assert!(installed, "haproxy is not installed: bash scripts/test.sh installs it");
}

/// HAProxy's health checks (`inter 1s fall 1`) take a node out within about a second.
const HAPROXY_SETTLE: Duration = Duration::from_millis(2500);

#[test]
fn nginx_fleet_drains_a_node_then_loses_one_to_sigkill() {
    let _one = one_at_a_time();
    fleet_behind(start_nginx, true, Duration::ZERO, Ending::DrainThenKill);
}

#[test]
fn nginx_fleet_loses_a_node_mid_drain_and_an_unplugged_one() {
    let _one = one_at_a_time();
    fleet_behind(start_nginx, false, Duration::ZERO, Ending::KillDuringDrainThenUnplug);
}

#[test]
fn haproxy_fleet_drains_a_node_then_loses_one_to_sigkill() {
    let _one = one_at_a_time();
    need_haproxy();
    fleet_behind(start_haproxy, false, HAPROXY_SETTLE, Ending::DrainThenKill);
}

#[test]
fn haproxy_fleet_loses_a_node_mid_drain_and_an_unplugged_one() {
    let _one = one_at_a_time();
    need_haproxy();
    fleet_behind(start_haproxy, false, HAPROXY_SETTLE, Ending::KillDuringDrainThenUnplug);
}

/// The node address and the path of an absolute session URL (`https://ADDR/PATH`).
fn split_url(url: &str) -> Option<(SocketAddr, &str)> {
    let rest = url.strip_prefix("https://")?;
    let slash = rest.find('/')?;
    Some((rest[..slash].parse().ok()?, &rest[slash..]))
}

/// HAProxy in TCP mode passes TLS through (`deploy/haproxy/haproxy-tcp.cfg`): it sees no path
/// to route on, so each node names itself in its session URLs (`--public-url`, its own
/// address; its certificate names the balancer's address and its own). Viewers POST through
/// the balancer and get an absolute `Location` at the node that answered; PATCH, a CORS
/// preflight and DELETE go there straight (the balancer's log shows no such connection) and
/// reach the owner; the media comes from the node. The shipped health check (`GET /ready` over
/// TLS) takes a draining node out: POSTs then go to the others while the drained node's
/// session still answers at its absolute URL.
#[test]
fn haproxy_tcp_fleet_routes_sessions_by_absolute_urls() {
    let _one = one_at_a_time();
    need_haproxy();
    const TLS_PORT: u16 = 443;
    let lan = Lan::create(&[("lb", 1), ("n1", 11), ("n2", 12), ("n3", 13), ("client", 100)])
        .expect("namespaces (needs root)");
    let ca = TestCa::new("fleet-tcp");
    let lb_ip = lan.host("lb").addr;
    let issued: Vec<(String, Issued)> = ["n1", "n2", "n3"]
        .iter()
        .map(|t| (t.to_string(), ca.issue_for(t, &[lb_ip.into(), lan.host(t).addr.into()])))
        .collect();
    let config = FleetConfig::write();
    let tls_args = |host: &Host| {
        let files = &issued.iter().find(|(t, _)| *t == host.role).expect("issued").1;
        vec![
            "--tls-cert".into(),
            files.cert.display().to_string(),
            "--tls-key".into(),
            files.key.display().to_string(),
            "--public-url".into(),
            format!("https://{}:{HTTP_PORT}", host.addr),
        ]
    };
    let mut nodes = nodes(&lan, &TLS_RUNTIMES, DRAIN_SECS, &config, &tls_args);
    for n in &nodes {
        assert!(n.https, "a node does not serve https");
        http::trust(n.http, &ca.ca_pem());
    }
    http::trust((lb_ip, TLS_PORT).into(), &ca.ca_pem());
    let node_addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.http).collect();
    let lb = haproxy_with(&lan, &node_addrs, "haproxy/haproxy-tcp.cfg", TLS_PORT);
    let client = Client { host: lan.host("client"), lb: lb.addr };
    std::thread::sleep(HAPROXY_SETTLE);

    // Six viewers through the balancer, spread by round robin; each answer names its node.
    let viewers: Vec<(Viewer, usize)> = (0..6)
        .map(|_| {
            let v = client.connect();
            let (addr, path) = split_url(v.location())
                .unwrap_or_else(|| panic!("not an absolute https URL: {:?}", v.location()));
            let node = node_addrs.iter().position(|a| *a == addr).expect("a node's address");
            assert!(path.starts_with(&format!("/whep/{STREAM}/n{}.", node + 1)), "{path}");
            (v, node)
        })
        .collect();
    let mut spread: Vec<usize> = viewers.iter().map(|(_, n)| *n).collect();
    spread.sort_unstable();
    spread.dedup();
    assert_eq!(spread, [0, 1, 2], "spread over every node");
    for (v, node) in &viewers {
        assert!(plays(v), "viewer on n{} did not play: {:?}", node + 1, v.stats());
        let offered = udp_candidates(v.answer());
        let own = node_udp(&lan, &format!("n{}", node + 1));
        assert!(offered.len() == 1 && own.contains(&offered[0]), "n{node}: {offered:?}");
    }
    let through = || lb.log("haproxy.log").lines().filter(|l| l.contains("whep_tls ")).count();
    let via_lb = through();
    assert!(via_lb >= 6, "the POSTs are not in the balancer's log: {}", lb.log("haproxy.log"));

    // Straight to the node: PATCH, the preflight of a page on the balancer's origin, DELETE.
    let straight = |method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]| {
        let (addr, path) = split_url(url).expect("absolute URL");
        client
            .host
            .enter(|| http::request(addr, method, path, headers, body))
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
    };
    let frag = ("Content-Type", "application/trickle-ice-sdpfrag");
    let origin = format!("https://{}", lb.addr);
    let (last, others) = viewers.split_last().expect("viewers");
    for (v, node) in others {
        let r = straight("PATCH", v.location(), &[frag], b"a=end-of-candidates\r\n");
        assert_eq!(r.status, 204, "PATCH at n{}: {}", node + 1, r.text());
        let preflight = [("Origin", origin.as_str()), ("Access-Control-Request-Method", "DELETE")];
        let r = straight("OPTIONS", v.location(), &preflight, b"");
        let methods = r.header("access-control-allow-methods").unwrap_or_default().to_owned();
        assert!(r.status < 300 && methods.contains("DELETE"), "preflight: {} {methods}", r.status);
        assert!(r.header("access-control-allow-origin").is_some(), "preflight without origin");
        assert_eq!(straight("DELETE", v.location(), &[], b"").status, 204, "DELETE");
    }
    // None of it went through the balancer: a TCP connection through it is a log line.
    assert_eq!(through(), via_lb, "{}", lb.log("haproxy.log"));
    let (last_node, last_v) = (last.1, &last.0);
    for (i, n) in nodes.iter().enumerate() {
        let expect = if i == last_node { 1.0 } else { 0.0 };
        assert!(
            wait_until(Duration::from_secs(10), || client.viewers_on(n) == Some(expect)),
            "n{} counts {:?} viewers, expected {expect}",
            i + 1,
            client.viewers_on(n)
        );
    }

    // The last viewer's node drains: the health check over TLS takes it out, new POSTs go to
    // the others, its session still answers at its own URL.
    let term = Instant::now();
    assert!(whep_e2e::signal(nodes[last_node].pid(), Signal::SIGTERM));
    assert!(
        wait_until(Duration::from_secs(5), || client.ready(&nodes[last_node]).0 == 503),
        "/ready of the draining node: {:?}",
        client.ready(&nodes[last_node])
    );
    std::thread::sleep(HAPROXY_SETTLE);
    for _ in 0..3 {
        let v = client.connect();
        let (addr, _) = split_url(v.location()).expect("absolute URL");
        assert_ne!(addr, nodes[last_node].http, "a POST reached the draining node");
        assert_eq!(straight("DELETE", v.location(), &[], b"").status, 204);
    }
    assert!(term.elapsed() < Duration::from_secs(DRAIN_SECS), "drain over before the check");
    let r = straight("PATCH", last_v.location(), &[frag], b"a=end-of-candidates\r\n");
    assert_eq!(r.status, 204, "the draining node's session: {}", r.text());
    assert_eq!(straight("DELETE", last_v.location(), &[], b"").status, 204);
    eprintln!("haproxy (TCP mode) log:\n{}", lb.log("haproxy.log"));
    // Its last viewer gone, the drained node exits.
    let status = nodes[last_node].wait_exit(Duration::from_secs(DRAIN_SECS + 10));
    assert_eq!(status.map(|s| s.success()), Some(true), "the drained node's exit");

    // Chromium loads the player page from the balancer (https, the nodes' certificates pinned)
    // and plays from whichever node is left.
    let url = format!("https://{}/?stream={STREAM}&test=1&frames=60&timeout=40", lb.addr);
    let pins: Vec<String> = issued.iter().map(|(_, f)| f.spki_sha256()).collect();
    let flags = [format!("--ignore-certificate-errors-spki-list={}", pins.join(","))];
    chromium_plays_from_a_node(&lan, &client, &url, &flags);
}

/// Headless Chromium in the client's namespace plays the player page at `url` (through the
/// balancer) with `flags`, its media straight from a node's address; returns its verdict.
fn chromium_plays_from_a_node(
    lan: &Lan,
    client: &Client<'_>,
    url: &str,
    flags: &[String],
) -> String {
    let run = chromium::run_page_with(Some(&client.host.name), url, Duration::from_secs(60), flags);
    let verdict = run.verdict.unwrap_or_else(|e| panic!("{e}"));
    assert!(verdict.contains("[WHEP] PASS"), "Chromium through the balancer: {verdict}");
    let pair = chromium::field(&verdict, "pair").unwrap_or_default();
    let remote = pair.split_once("->").map(|(_, r)| r.to_owned()).unwrap_or_default();
    let own: Vec<String> = ["n1", "n2", "n3"].iter().flat_map(|t| node_udp(lan, t)).collect();
    assert!(own.contains(&remote), "Chromium's pair {pair:?} is not to a node {own:?}");
    verdict
}
