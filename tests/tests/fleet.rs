//! A fleet of three nodes (whepd-tokio, whepd-smol, whepd-blocking, each `--node-id nK`) behind
//! Debian's nginx running the shipped `deploy/nginx/whep-fleet.conf` (addresses replaced), all
//! on loopback: str0m viewers and a headless Chromium (the player page through nginx) spread
//! over the nodes; PATCH and DELETE through nginx reach the owning node (its tag in the path,
//! checked in nginx's access log); node n1 drained with SIGTERM (`--drain-secs`): `/ready` 503,
//! new POSTs go to the others, its viewers keep playing until the deadline and are then closed
//! (DTLS close), it exits; its sessions' URLs then get 502 from nginx; the other nodes' viewers
//! never stop. The same against HAProxy (`deploy/haproxy/haproxy.cfg`, `/ready` health checks)
//! when it is installed.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use whep_e2e::viewer::Viewer;
use whep_e2e::{Server, chromium, http, wait_until};

const DRAIN_SECS: u64 = 8;
const PLAY_WITHIN: Duration = Duration::from_secs(25);

/// A load balancer process started by the test, killed on drop.
struct Balancer {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Balancer {
    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("whep-fleet-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// The shipped configuration with the documentation addresses replaced by the test's.
fn shipped(file: &str, listen: SocketAddr, nodes: &[&Server]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file);
    let mut text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    text = text.replace("0.0.0.0:80", &listen.to_string());
    for (i, node) in nodes.iter().enumerate() {
        text = text.replace(&format!("192.0.2.1{}:8080", i + 1), &node.http.to_string());
    }
    text
}

fn start_nginx(nodes: &[&Server]) -> Balancer {
    let dir = temp_dir("nginx");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    std::fs::write(dir.join("whep-fleet.conf"), shipped("nginx/whep-fleet.conf", addr, nodes))
        .expect("write");
    let d = dir.display();
    // Run as the test user; as root nginx's workers would switch to `nobody`: keep root so they
    // can write the temp dir.
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let user = if root { "user root;" } else { "" };
    let main = format!(
        "{user}\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\nworker_processes 1;\n\
         events {{ worker_connections 256; }}\nhttp {{\n\
         log_format up '$request_method $uri $status $upstream_addr';\n\
         access_log {d}/access.log up;\n\
         client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
         include {d}/whep-fleet.conf;\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), main).expect("write");
    let child = Command::new("nginx")
        .args(["-p", &d.to_string(), "-c", &format!("{d}/nginx.conf"), "-e"])
        .arg(format!("{d}/error.log"))
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx: install Debian's nginx (bash scripts/test.sh does)");
    let balancer = Balancer { child, addr, dir };
    assert!(
        wait_until(Duration::from_secs(10), || http::get(addr, "/healthz").is_ok()),
        "nginx did not come up: {}",
        balancer.log("error.log")
    );
    balancer
}

fn start_haproxy(nodes: &[&Server]) -> Balancer {
    let dir = temp_dir("haproxy");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, shipped("haproxy/haproxy.cfg", addr, nodes)).expect("write");
    let log = std::fs::File::create(dir.join("haproxy.log")).expect("log");
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("haproxy");
    let balancer = Balancer { child, addr, dir };
    assert!(
        wait_until(Duration::from_secs(10), || http::get(addr, "/healthz").is_ok()),
        "haproxy did not come up: {}",
        balancer.log("haproxy.log")
    );
    balancer
}

fn nodes() -> Vec<Server> {
    let drain = DRAIN_SECS.to_string();
    // Behind a balancer every request comes from its address: the per-client limits would count
    // all viewers as one client.
    let common = [
        "--drain-secs",
        &drain,
        "--max-unconnected",
        "0",
        "--post-rate",
        "0",
        "--max-viewers",
        "20",
    ];
    let bins = [
        ("n1", env!("CARGO_BIN_EXE_whepd-tokio")),
        ("n2", env!("CARGO_BIN_EXE_whepd-smol-e2e")),
        ("n3", env!("CARGO_BIN_EXE_whepd-blocking")),
    ];
    bins.iter()
        .map(|(tag, bin)| {
            let mut args = vec!["--node-id", tag];
            args.extend(common);
            Server::start(bin, &args)
        })
        .collect()
}

/// The node tag in a viewer's session URL.
fn tag(v: &Viewer) -> String {
    let last = v.location().trim_end_matches('/').rsplit('/').next().unwrap_or_default();
    last.split_once('.').map(|(t, _)| t.to_owned()).unwrap_or_default()
}

fn connect(lb: &Balancer) -> Viewer {
    Viewer::connect(lb.addr, "/whep/demo", None).unwrap_or_else(|e| panic!("POST via lb: {e}"))
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

fn ready(node: &Server) -> (u16, String) {
    let r = node.request("GET", "/ready", &[], b"");
    (r.status, r.text())
}

/// `settle`: how long the balancer may take to stop sending POSTs to a node whose `/ready` says
/// 503 (nginx: none, it retries the 503 on the next node; HAProxy: its health check interval).
fn fleet_behind(balancer: fn(&[&Server]) -> Balancer, with_chromium: bool, settle: Duration) {
    let mut nodes = nodes();
    let lb = balancer(&nodes.iter().collect::<Vec<_>>());
    for n in &nodes {
        assert_eq!(ready(n).0, 200, "{:?}", ready(n));
    }
    let page = with_chromium.then(|| {
        let url = format!("http://{}/?stream=demo&test=1&frames=60&timeout=40", lb.addr);
        std::thread::spawn(move || chromium::run_page(&url, Duration::from_secs(60)))
    });
    // Six viewers: round robin spreads them (two on each node, the page's session aside).
    let viewers: Vec<Viewer> = (0..6).map(|_| connect(&lb)).collect();
    let mut tags: Vec<String> = viewers.iter().map(tag).collect();
    for v in &viewers {
        assert!(plays(v), "viewer on {} did not play: {:?}", tag(v), v.stats());
    }
    tags.sort();
    tags.dedup();
    assert_eq!(tags, ["n1", "n2", "n3"], "spread over every node");
    if let Some(page) = page {
        let verdict = page.join().expect("page thread").unwrap_or_else(|e| panic!("{e}"));
        assert!(verdict.contains("[WHEP] PASS"), "Chromium through the balancer: {verdict}");
        eprintln!("Chromium via the balancer: {verdict}");
    }

    // PATCH and DELETE through the balancer reach the owning node.
    let frag = ("Content-Type", "application/trickle-ice-sdpfrag");
    for v in &viewers {
        let r = http::request(lb.addr, "PATCH", v.location(), &[frag], b"a=end-of-candidates\r\n")
            .expect("PATCH");
        assert!(
            ![404, 502, 503].contains(&r.status),
            "PATCH {}: {} {}",
            tag(v),
            r.status,
            r.text()
        );
    }
    let gone = &viewers[5];
    let owner_tag = tag(gone);
    assert_eq!(gone.delete().expect("DELETE"), 204);
    assert!(gone.wait_for(Duration::from_secs(5), |s| s.closed), "DELETE closed the session");
    let access = lb.log("access.log");
    if !access.is_empty() {
        // nginx's log: each session request went to its node's address.
        for v in &viewers {
            let i: usize = tag(v)[1..].parse().expect("tag number");
            let node = nodes[i - 1].http.to_string();
            let mine: Vec<&str> = access.lines().filter(|l| l.contains(v.location())).collect();
            assert!(!mine.is_empty(), "no log of {}", v.location());
            assert!(mine.iter().all(|l| l.ends_with(&node)), "{owner_tag}: {mine:?} not to {node}");
        }
    }

    // Drain n1: SIGTERM.
    let n1_viewers: Vec<&Viewer> = viewers[..5].iter().filter(|v| tag(v) == "n1").collect();
    let others: Vec<&Viewer> = viewers[..5].iter().filter(|v| tag(v) != "n1").collect();
    assert!(!n1_viewers.is_empty() && !others.is_empty());
    let n1_pid = nodes[0].pid();
    let term = Instant::now();
    assert!(whep_e2e::signal(n1_pid, nix::sys::signal::Signal::SIGTERM));
    assert!(
        wait_until(Duration::from_secs(3), || ready(&nodes[0]).0 == 503),
        "n1 /ready: {:?}",
        ready(&nodes[0])
    );
    let not_ready = term.elapsed();
    assert!(ready(&nodes[0]).1.contains("draining"));
    std::thread::sleep(settle);
    // New POSTs go to the others (a 503 from n1 is retried on the next node).
    let late: Vec<Viewer> = (0..4).map(|_| connect(&lb)).collect();
    for v in &late {
        assert_ne!(tag(v), "n1", "a POST reached the draining node");
        assert!(plays(v), "late viewer on {}: {:?}", tag(v), v.stats());
    }
    // n1's viewers keep playing until the deadline...
    assert!(all_growing(&n1_viewers), "n1's viewers stopped during the drain");
    assert!(term.elapsed() < Duration::from_secs(DRAIN_SECS), "the checks took the whole drain");
    // ... and are then closed by the server (DTLS close), and n1 exits.
    for v in &n1_viewers {
        assert!(
            v.wait_for(Duration::from_secs(DRAIN_SECS + 10), |s| s.closed),
            "n1's viewer not closed: {:?}",
            v.stats()
        );
    }
    let closed = n1_viewers.iter().filter_map(|v| v.stats().closed_at).max().map(|t| t - term);
    assert!(
        closed.is_some_and(|c| c >= Duration::from_secs(DRAIN_SECS)),
        "closed before the deadline: {closed:?}"
    );
    let status = nodes[0].wait_exit(Duration::from_secs(15));
    let exited = term.elapsed();
    assert_eq!(status.map(|s| s.success()), Some(true), "n1 exit");
    eprintln!(
        "drain: /ready 503 after {not_ready:?}, viewers closed {closed:?} and exit {exited:?} after SIGTERM (--drain-secs {DRAIN_SECS})"
    );
    // n1's session URLs now reach no node.
    let r = http::request(lb.addr, "DELETE", n1_viewers[0].location(), &[], b"").expect("DELETE");
    eprintln!("DELETE of a session of the gone node through the balancer: {}", r.status);
    assert!([502, 503].contains(&r.status), "{} {}", r.status, r.text());
    // The others never stopped.
    let late_refs: Vec<&Viewer> = late.iter().collect();
    assert!(all_growing(&others), "the other nodes' viewers stopped");
    assert!(all_growing(&late_refs), "the late viewers stopped");
    for v in others.iter().chain(late_refs.iter()) {
        assert!(!v.stats().closed, "{} closed", tag(v));
    }
    nodes.truncate(0);
}

#[test]
fn nginx_fleet_routes_sessions_and_drains_a_node() {
    fleet_behind(start_nginx, true, Duration::ZERO);
}

#[test]
fn haproxy_fleet_routes_sessions_and_drains_a_node() {
    if Command::new("haproxy").arg("-v").output().is_err() {
        eprintln!("haproxy not installed: skipped (bash scripts/test.sh installs it)");
        return;
    }
    fleet_behind(start_haproxy, false, Duration::from_millis(2500));
}
