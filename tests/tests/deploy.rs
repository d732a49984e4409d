//! The shipped Kubernetes manifests (`deploy/k8s/`) held against the real binary and Debian's
//! nginx, so that they cannot drift from the code: the StatefulSet's container arguments (the
//! downward-API variables filled in as Kubernetes does) and its ConfigMap's `whepd.toml` start
//! `whepd` as they are; its ports and probes name the ports and paths the node serves (`/ready`
//! and `/healthz` answer 200, ICE-TCP on the UDP port number); the on-demand source stays idle
//! until a viewer; the session URLs carry the pod name the balancer's `map` extracts (nginx
//! itself evaluates the shipped `map` on a real session URL); the balancer's whole
//! `default.conf` passes `nginx -t`; the autoscaler's metric is one `/metrics` serves; the drain
//! fits in the termination grace period. Only loopback is used: the manifests' cluster DNS names
//! are replaced before nginx reads them.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use whep_e2e::viewer::Viewer;
use whep_e2e::{Server, children_of, http, nginx, wait_until};

/// The pod name the test plays (`metadata.name` of the StatefulSet's second pod).
const POD_NAME: &str = "whepd-1";

fn manifest(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The part of `yaml` from the first line that is `key` (trimmed) on.
fn from<'a>(yaml: &'a str, key: &str) -> &'a str {
    let at = yaml
        .lines()
        .scan(0, |offset, l| {
            let start = *offset;
            *offset += l.len() + 1;
            Some((start, l))
        })
        .find(|(_, l)| l.trim() == key)
        .map(|(start, _)| start)
        .unwrap_or_else(|| panic!("no {key:?} in the manifest"));
    &yaml[at..]
}

/// The lines indented below the first line of `yaml` (a `key:` or `key: |`), up to the next
/// line indented no deeper.
fn block(yaml: &str) -> Vec<&str> {
    let mut lines = yaml.lines();
    let head = indent(lines.next().unwrap_or_default());
    lines.take_while(|l| l.trim().is_empty() || indent(l) > head).collect()
}

/// The items of the block list under `key` (`- item` lines, comments skipped).
fn list(yaml: &str, key: &str) -> Vec<String> {
    block(from(yaml, key))
        .iter()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .map(str::to_owned)
        .collect()
}

/// The literal block scalar under `key` (`key: |`), its indentation removed.
fn literal(yaml: &str, key: &str) -> String {
    let lines = block(from(yaml, key));
    let by = lines.iter().find(|l| !l.trim().is_empty()).map_or(0, |l| indent(l));
    lines.iter().map(|l| format!("{}\n", l.get(by..).unwrap_or_default())).collect()
}

/// The value of `key` in a flow mapping (`{ a: b, c: d }`).
fn flow<'a>(map: &'a str, key: &str) -> Option<&'a str> {
    let inner = map.trim().strip_prefix('{')?.strip_suffix('}')?;
    inner.split(',').find_map(|kv| {
        let (k, v) = kv.split_once(':')?;
        (k.trim() == key).then_some(v.trim())
    })
}

/// The `httpGet` of the probe `probe` (`readinessProbe:`): its path and port.
fn probe(yaml: &str, probe: &str) -> (String, u16) {
    let get = block(from(yaml, probe))
        .iter()
        .find_map(|l| l.trim().strip_prefix("httpGet:"))
        .unwrap_or_else(|| panic!("{probe} has no httpGet"));
    let path = flow(get, "path").expect("probe path").to_owned();
    let port = flow(get, "port").and_then(|p| p.parse().ok()).expect("probe port");
    (path, port)
}

/// The container port named `name`: its number and protocol.
fn container_port(ports: &[String], name: &str) -> (u16, String) {
    let port = ports
        .iter()
        .find(|p| flow(p, "name") == Some(name))
        .unwrap_or_else(|| panic!("no container port {name}: {ports:?}"));
    let number = flow(port, "containerPort").and_then(|p| p.parse().ok()).expect("number");
    (number, flow(port, "protocol").unwrap_or("TCP").to_owned())
}

/// The port of an `ADDR:PORT` argument value.
fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or_else(|| panic!("{addr}"))
}

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_k8s_manifests_run_as_shipped() {
    let whepd = manifest("whepd.yaml");
    let balancer = manifest("balancer.yaml");

    // The container's arguments, with the downward-API variables as the kubelet fills them.
    let args: Vec<String> = list(from(&whepd, "containers:"), "args:")
        .iter()
        .map(|a| a.replace("$(HOST_IP)", "127.0.0.1").replace("$(POD_NAME)", POD_NAME))
        .collect();
    assert!(args.iter().all(|a| a.starts_with("--")), "{args:?}");
    let value = |flag: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(flag)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {flag} in {args:?}"))
    };
    let (http_port, udp_port) = (port_of(value("--http")), port_of(value("--udp")));
    assert_eq!(port_of(value("--candidate")), udp_port, "the candidate is the UDP port");
    assert_eq!(value("--node-id"), POD_NAME);

    // Ports and probes name what the node serves.
    let ports = list(from(&whepd, "containers:"), "ports:");
    assert_eq!(container_port(&ports, "http"), (http_port, "TCP".into()));
    assert_eq!(container_port(&ports, "webrtc-udp"), (udp_port, "UDP".into()));
    assert_eq!(container_port(&ports, "webrtc-tcp"), (udp_port, "TCP".into()));
    let ready = probe(&whepd, "readinessProbe:");
    let live = probe(&whepd, "livenessProbe:");
    assert_eq!((ready.1, live.1), (http_port, http_port), "probes on the HTTP port");
    // The drain ends before the kubelet's SIGKILL.
    let grace: u64 = whepd
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("terminationGracePeriodSeconds");
    let drain: u64 = value("--drain-secs").parse().expect("--drain-secs");
    assert!(drain + 10 <= grace, "--drain-secs {drain} leaves no time in a {grace} s grace");

    // The ConfigMap's whepd.toml as the pod mounts it, and one external stream of the test's
    // (no FFmpeg) to POST to: the shipped stream pulls from a camera address that is not here.
    let dir = TempDir(std::env::temp_dir().join(format!("whep-k8s-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let mut toml = literal(&whepd, "whepd.toml: |");
    assert!(toml.contains("on_demand = true"), "{toml}");
    toml.push_str("\n[streams.probe]\nexternal = true\n");
    let config = dir.0.join("whepd.toml");
    std::fs::write(&config, &toml).expect("write config");
    let config_arg = format!("--config={}", config.display());

    // The node as the pod runs it (the test's loopback addresses for --http and --udp).
    let run: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with("--http=") && !a.starts_with("--udp="))
        .map(|a| if a.starts_with("--config=") { config_arg.as_str() } else { a.as_str() })
        .collect();
    let mut server = Server::start(env!("CARGO_BIN_EXE_whepd-tokio"), &run);
    for (path, _) in [&ready, &live] {
        let r = http::get(server.http, path).expect("probe");
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    assert!(TcpStream::connect(server.udp).is_ok(), "ICE-TCP on the UDP port number");

    // The autoscaler's metric is served.
    let metric = balancer
        .lines()
        .skip_while(|l| l.trim() != "metric:")
        .find_map(|l| l.trim().strip_prefix("name:"))
        .map(str::trim)
        .expect("the HPA's metric");
    assert!(server.metric(metric).is_some(), "{metric} is not in /metrics");

    // On demand: the shipped stream pulls nothing before a viewer.
    let id = toml
        .lines()
        .find_map(|l| l.trim().strip_prefix("[streams.")?.strip_suffix(']'))
        .expect("a stream");
    assert_eq!(server.stream(id)["state"], "idle", "{id}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(children_of(server.pid()).is_empty(), "FFmpeg runs with no viewer");

    // A session URL carries the pod name.
    let viewer =
        Viewer::connect(server.http, "/whep/probe", None).unwrap_or_else(|e| panic!("{e}"));
    let location = viewer.location().to_owned();
    let session = location.rsplit('/').next().unwrap_or_default();
    let (tag, hex) = session.split_once('.').unwrap_or_default();
    assert_eq!(tag, POD_NAME, "{location}");
    assert!(hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()), "{location}");

    // The balancer's configuration: nginx accepts all of it (the cluster resolver and port 80
    // replaced by loopback ones), and its `map` sends that URL to the pod and a POST to any.
    let site = literal(&balancer, "default.conf: |");
    let port = free_port();
    let resolver = site
        .lines()
        .find(|l| l.trim_start().starts_with("resolver "))
        .expect("a resolver line")
        .to_owned();
    let local = site
        .replace(&resolver, "resolver 127.0.0.1 valid=10s;")
        .replace("listen 80;", &format!("listen 127.0.0.1:{port};"));
    if let Err(e) = nginx::check(&local) {
        panic!("nginx -t of balancer.yaml's default.conf: {e}\n{local}");
    }
    let map: String =
        block(from(&site, "map $uri $whep_pod {")).iter().map(|l| format!("{l}\n")).collect();
    let probe_site = format!(
        "map $uri $whep_pod {{\n{map}}}\nserver {{ listen 127.0.0.1:{port}; \
         location / {{ return 200 \"pod=$whep_pod\\n\"; }} }}\n"
    );
    let lb = nginx::start(None, "k8s-map", &probe_site).expect("nginx");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    assert!(
        wait_until(Duration::from_secs(10), || http::get(addr, "/").is_ok()),
        "nginx did not come up: {}",
        lb.log("error.log")
    );
    let routed = |target: &str| http::get(addr, target).map(|r| r.text()).unwrap_or_default();
    let path = location
        .split_once("://")
        .map_or(location.as_str(), |(_, rest)| rest.find('/').map_or("/", |i| &rest[i..]));
    assert_eq!(routed(path), format!("pod={POD_NAME}\n"), "{path}");
    assert_eq!(routed(&format!("{path}/")), format!("pod={POD_NAME}\n"));
    assert_eq!(routed("/whep/probe"), "pod=\n", "a POST goes to any pod");
    assert_eq!(routed("/whep/probe/whepd-1.xyz"), "pod=\n", "not a session URL");
    drop(lb);

    // Leaves, and the pod ends well inside its grace period with no viewer.
    assert_eq!(viewer.delete().expect("DELETE"), 204);
    let status = server.terminate(Duration::from_secs(15));
    assert_eq!(status.map(|s| s.success()), Some(true), "{}", server.output());
}
