//! The sessions API and the webhook end to end, per runtime: two str0m viewers of the demo
//! stream (real FFmpeg) are listed with what they were sent and a plausible round-trip time;
//! one is kicked (its resource answers 404, its peer is closed) while the other keeps playing;
//! a webhook receiver (a plain TCP listener here) gets stream up, viewers joined and left and
//! stream down with their fields; the API needs the admin token; a webhook that cannot be
//! reached costs failures in `/metrics`, not media. The webhook also over HTTPS with a private
//! CA (`--outbound-ca-file`), and refused without it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use whep_e2e::tls::{Issued, TestCa};
use whep_e2e::viewer::{Viewer, ViewerOptions};
use whep_e2e::{ADMIN_TOKEN, Server, wait_until};

/// Bound for a viewer to connect and play; FFmpeg needs a moment to start.
const PLAY_WITHIN: Duration = Duration::from_secs(25);

/// A webhook receiver: every POST's JSON body, answered 204.
struct Receiver {
    addr: SocketAddr,
    events: mpsc::Receiver<Delivery>,
    seen: Vec<Value>,
    /// Every delivery as it came, in the order of `seen`.
    raw: Vec<Delivery>,
}

/// Header fields: names in lower case, values trimmed, in the order received.
type Headers = Vec<(String, String)>;

/// One webhook POST: its header fields (names in lower case) and body, and the body's JSON.
#[derive(Debug, Clone)]
struct Delivery {
    headers: Headers,
    body: Vec<u8>,
    json: Value,
}

impl Receiver {
    fn start() -> Self {
        Self::serve(None)
    }

    /// The same over HTTPS with `cert`'s chain and key (issued for 127.0.0.1).
    fn https(cert: &Issued) -> Self {
        Self::serve(Some(cert.server_config()))
    }

    fn serve(tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the webhook receiver");
        let addr = listener.local_addr().expect("its address");
        let (tx, events) = mpsc::channel();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let body = match &tls {
                    None => receive(conn),
                    Some(config) => {
                        let Ok(tls) = rustls::ServerConnection::new(Arc::clone(config)) else {
                            continue;
                        };
                        receive(rustls::StreamOwned::new(tls, conn))
                    }
                };
                let Some((headers, body)) = body else { continue };
                match serde_json::from_slice(&body) {
                    Ok(json) => {
                        if tx.send(Delivery { headers, body, json }).is_err() {
                            return;
                        }
                    }
                    Err(e) => panic!(
                        "webhook body is not JSON ({e}): {:?}",
                        String::from_utf8_lossy(&body)
                    ),
                }
            }
        });
        Self { addr, events, seen: Vec::new(), raw: Vec::new() }
    }

    /// Waits up to `timeout` for an event matching `pred` (events seen before count).
    fn wait(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.seen.iter().find(|v| pred(v)) {
                return Some(v.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.events.recv_timeout(left) {
                Ok(d) => {
                    self.seen.push(d.json.clone());
                    self.raw.push(d);
                }
                Err(_) => return None,
            }
        }
    }
}

/// Reads one webhook POST from `conn`, answers 204, and returns its header fields (names in
/// lower case) and body.
fn receive(conn: impl Read + Write) -> Option<(Headers, Vec<u8>)> {
    let mut reader = BufReader::new(conn);
    let mut headers = Vec::new();
    let mut length = 0usize;
    let mut line = String::new();
    let mut request_line = true;
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        if request_line {
            assert!(line.starts_with("POST /hook HTTP/1.1"), "{line:?}");
            request_line = false;
        }
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim().to_owned());
            if name == "content-length" {
                length = value.parse().unwrap_or(0);
            }
            headers.push((name, value));
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    let mut conn = reader.into_inner();
    let _ = conn.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
    let _ = conn.flush();
    Some((headers, body))
}

fn json(r: &whep_e2e::http::Response) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("bad JSON ({e}): {}", r.text()))
}

fn sessions(server: &Server, target: &str) -> Vec<Value> {
    let r = server.admin("GET", target, "");
    assert_eq!(r.status, 200, "GET {target}: {}", r.text());
    json(&r).as_array().cloned().unwrap_or_default()
}

fn session_of<'a>(list: &'a [Value], v: &Viewer) -> Option<&'a Value> {
    list.iter().find(|s| s["session"].as_str().is_some_and(|id| v.location().contains(id)))
}

/// Two viewers listed, one kicked, the other plays on; the webhook hears all of it.
fn list_kick_and_events(bin: &str) {
    let mut hook = Receiver::start();
    let url = format!("http://{}/hook", hook.addr);
    let mut server = Server::start(bin, &["--webhook-url", &url]);
    let up = hook.wait(PLAY_WITHIN, |e| e["event"] == "stream_up" && e["stream"] == "demo");
    assert!(
        up.is_some_and(|e| e["time"].as_f64().is_some_and(|t| t > 1.7e9)),
        "no stream_up: {:?}\n{}",
        hook.seen,
        server.output()
    );

    // Admin token required.
    for auth in [None, Some("Bearer wrong")] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", *a)).collect();
        let r = server.request("GET", "/api/sessions", &headers, b"");
        assert_eq!(r.status, 401, "{auth:?}: {}", r.text());
    }

    let ua = "Mozilla/5.0 (e2e) whep-e2e/1";
    let a = Viewer::connect_with(
        server.http,
        "/whep/demo",
        None,
        &ViewerOptions::default().user_agent(ua),
    )
    .expect("viewer a");
    let b = Viewer::connect(server.http, "/whep/demo", None).expect("viewer b");
    for v in [&a, &b] {
        assert!(
            v.wait_for(PLAY_WITHIN, |s| s.video_packets >= 100 && s.audio_packets >= 20),
            "viewer did not play: {:?}\n{}",
            v.stats(),
            server.output()
        );
    }
    // Receiver reports (and so the RTT) come every second or so.
    let mut list = Vec::new();
    let listed = wait_until(Duration::from_secs(10), || {
        list = sessions(&server, "/api/sessions");
        list.len() == 2
            && list.iter().all(|s| s["rtt_ms"].is_number() && s["send_rate"].is_number())
    });
    assert!(listed, "sessions not listed with an RTT: {list:#?}");
    for (v, agent) in [(&a, Some(ua)), (&b, None)] {
        let s = session_of(&list, v)
            .unwrap_or_else(|| panic!("{} not listed: {list:#?}", v.location()));
        assert_eq!(s["stream"], "demo");
        assert_eq!(s["state"], "connected");
        assert_eq!(s["transport"], "udp");
        assert_eq!(s["client"], "127.0.0.1");
        assert_eq!(s["user_agent"].as_str(), agent, "{s:#}");
        assert_eq!(s["candidate_pair"]["remote"], v.local_addr().to_string(), "{s:#}");
        assert_eq!(s["candidate_pair"]["protocol"], "udp");
        assert!(s["packets_sent"].as_u64().is_some_and(|n| n >= 100), "{s:#}");
        assert!(s["bytes_sent"].as_u64().is_some_and(|n| n > 10_000), "{s:#}");
        let rtt = s["rtt_ms"].as_f64().unwrap_or(-1.0);
        assert!((0.0..500.0).contains(&rtt), "implausible RTT on loopback: {s:#}");
        assert!(s["connected_secs"].as_f64().is_some_and(|t| t > 0.0), "{s:#}");
        assert!(s["connected_since"].as_f64().is_some_and(|t| t > 1.7e9), "{s:#}");
        // Over str0m's last stats interval: once below 10 kB/s on a loaded machine (blocking
        // runtime), so only "sending" is asserted.
        assert!(s["send_rate"].as_u64().is_some_and(|r| r > 0), "{s:#}");
        assert_eq!(s["codec"], "H264");
    }
    assert_eq!(sessions(&server, "/api/streams/demo/sessions").len(), 2);
    assert_eq!(sessions(&server, "/api/sessions?stream=other").len(), 0);
    let joined = hook
        .wait(Duration::from_secs(5), |e| e["event"] == "viewer_joined" && e["user_agent"] == ua);
    let joined =
        joined.unwrap_or_else(|| panic!("no viewer_joined with the user agent: {:?}", hook.seen));
    assert_eq!(joined["client"], "127.0.0.1");
    assert_eq!(joined["stream"], "demo");

    // Kick a: its resource is gone, its peer is closed, b plays on.
    let id =
        session_of(&list, &a).and_then(|s| s["session"].as_str()).unwrap_or_default().to_owned();
    let r = server.admin("DELETE", &format!("/api/sessions/{id}"), "");
    assert_eq!(r.status, 204, "{}", r.text());
    let r = server.admin("DELETE", &format!("/api/sessions/{id}"), "");
    assert_eq!(r.status, 404, "a second kick: {}", r.text());
    let patch = server.request(
        "PATCH",
        a.location(),
        &[("Content-Type", "application/trickle-ice-sdpfrag")],
        b"a=end-of-candidates\r\n",
    );
    assert_eq!(patch.status, 404, "PATCH of a kicked session: {}", patch.text());
    assert!(
        a.wait_for(Duration::from_secs(10), |s| s.closed),
        "the kicked viewer's peer was not closed: {:?}",
        a.stats()
    );
    let before = b.stats().video_packets;
    assert!(
        b.wait_for(Duration::from_secs(5), |s| s.video_packets >= before + 60 && !s.closed),
        "the other viewer stopped: {:?}",
        b.stats()
    );
    let list = sessions(&server, "/api/sessions");
    assert_eq!(list.len(), 1, "{list:#?}");
    assert!(session_of(&list, &b).is_some());
    let left = hook.wait(Duration::from_secs(5), |e| {
        e["event"] == "viewer_left" && e["session"] == id.as_str()
    });
    let left =
        left.unwrap_or_else(|| panic!("no viewer_left for the kicked viewer: {:?}", hook.seen));
    assert_eq!(left["reason"], "kicked");
    assert!(left["duration_secs"].as_f64().is_some_and(|d| d > 0.5), "{left}");
    assert!(left["bytes_sent"].as_u64().is_some_and(|n| n > 10_000), "{left}");
    assert!(left["packets_sent"].as_u64().is_some_and(|n| n >= 100), "{left}");

    // b leaves, then the stream stops.
    b.close();
    assert!(
        hook.wait(Duration::from_secs(10), |e| e["event"] == "viewer_left"
            && e["session"] != id.as_str())
            .is_some(),
        "no viewer_left for b: {:?}",
        hook.seen
    );
    let r = server.admin("POST", "/api/streams/demo/stop", "");
    assert_eq!(r.status, 200, "{}", r.text());
    let down = hook
        .wait(Duration::from_secs(10), |e| e["event"] == "stream_down" && e["stream"] == "demo");
    let down = down.unwrap_or_else(|| panic!("no stream_down: {:?}", hook.seen));
    assert!(down["state"].is_string(), "{down}");
    assert_eq!(server.metric("whep_webhook_dropped_total"), Some(0.0));
    assert_eq!(server.metric("whep_webhook_failures_total"), Some(0.0));
    assert!(server.metric("whep_webhook_delivered_total").is_some_and(|n| n >= 5.0));
}

/// A webhook URL nobody listens on: its events fail after their retries and are counted;
/// viewers play as ever.
fn unreachable_webhook_costs_no_media(bin: &str) {
    // A port that was free a moment ago: connections are refused.
    let port =
        TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a port").port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let mut server = Server::start(bin, &["--webhook-url", &url]);
    let v = Viewer::connect(server.http, "/whep/demo", None).expect("viewer");
    assert!(
        v.wait_for(PLAY_WITHIN, |s| s.video_packets >= 100),
        "viewer did not play: {:?}\n{}",
        v.stats(),
        server.output()
    );
    // stream_up and viewer_joined, each after three attempts.
    assert!(
        wait_until(Duration::from_secs(15), || server
            .metric("whep_webhook_failures_total")
            .is_some_and(|n| n >= 2.0)),
        "failures not counted: {:?}\n{}",
        server.metric("whep_webhook_failures_total"),
        server.output()
    );
    assert_eq!(server.metric("whep_webhook_delivered_total"), Some(0.0));
    let before = v.stats().video_packets;
    assert!(v.wait_for(Duration::from_secs(5), |s| s.video_packets >= before + 60));
    // Without the admin token the sessions API is refused, with it the viewer is there.
    let r = server.request("DELETE", "/api/sessions/00000000000000000000000000000000", &[], b"");
    assert_eq!(r.status, 401);
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let r = server.request("GET", "/api/sessions", &[("Authorization", &auth)], b"");
    assert_eq!(json(&r).as_array().map(Vec::len), Some(1), "{}", r.text());
}

/// On a sharded server (`--shards 2`) the listing gathers both shards' viewers, and a kick
/// goes to the shard that holds the session.
fn sharded_listing_and_kick(bin: &str) {
    let mut server = Server::start(bin, &["--shards", "2"]);
    let viewers: Vec<Viewer> =
        (0..2).map(|_| Viewer::connect(server.http, "/whep/demo", None).expect("viewer")).collect();
    for v in &viewers {
        assert!(
            v.wait_for(PLAY_WITHIN, |s| s.video_packets >= 50),
            "viewer did not play: {:?}\n{}",
            v.stats(),
            server.output()
        );
    }
    let on_shard = |v: &Viewer| v.location().ends_with("01");
    assert!(viewers.iter().any(on_shard), "no viewer on shard 1: placement changed?");
    let list = sessions(&server, "/api/sessions");
    assert_eq!(list.len(), 2, "{list:#?}");
    assert_eq!(sessions(&server, "/api/streams/demo/sessions").len(), 2);
    let follower = viewers.iter().find(|v| on_shard(v)).expect("on shard 1");
    let id = session_of(&list, follower).and_then(|s| s["session"].as_str()).expect("listed");
    let r = server.admin("GET", &format!("/api/sessions/{id}"), "");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = server.admin("DELETE", &format!("/api/sessions/{id}"), "");
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(follower.wait_for(Duration::from_secs(10), |s| s.closed), "{:?}", follower.stats());
    assert_eq!(sessions(&server, "/api/sessions").len(), 1);
}

/// The player page's sessions view in headless Chromium: with the admin token in the URL's
/// fragment it lists the viewer playing; without it, it is refused.
#[test]
fn player_page_lists_sessions() {
    let mut server = Server::start(env!("CARGO_BIN_EXE_whepd-tokio"), &[]);
    let v = Viewer::connect(server.http, "/whep/demo", None).expect("viewer");
    assert!(v.wait_for(PLAY_WITHIN, |s| s.video_packets >= 50), "{:?}", v.stats());
    let base = format!("http://{}/?sessions=demo&test=1&timeout=20", server.http);
    let verdict = whep_e2e::chromium::run_page(
        &format!("{base}#admin={ADMIN_TOKEN}"),
        Duration::from_secs(40),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", server.output()));
    assert!(verdict.contains("[WHEP] PASS sessions=1 state=connected rows=1"), "{verdict}");
    let verdict = whep_e2e::chromium::run_page(&base, Duration::from_secs(40))
        .unwrap_or_else(|e| panic!("{e}\n{}", server.output()));
    assert!(verdict.contains("[WHEP] FAIL") && verdict.contains("401"), "{verdict}");
}

/// `--shards` is not in the blocking example.
mod shards {
    use super::sharded_listing_and_kick;
    whep_e2e::runtime_suite!([tokio, smol] sharded_listing_and_kick);
}

/// The webhook over HTTPS, its receiver's certificate issued by a private CA trusted with
/// `--outbound-ca-file`: events arrive; without the option (the system's roots only) none do,
/// and the failures are counted.
fn webhook_over_https_with_a_private_ca(bin: &str) {
    let ca = TestCa::new("webhook");
    let mut hook = Receiver::https(&ca.issue("hook"));
    let url = format!("https://{}/hook", hook.addr);
    let ca_file = ca.path("ca.pem");
    let ca_file = ca_file.to_str().expect("a UTF-8 path");
    let mut server = Server::start(bin, &["--webhook-url", &url, "--outbound-ca-file", ca_file]);
    let up = hook.wait(PLAY_WITHIN, |e| e["event"] == "stream_up" && e["stream"] == "demo");
    assert!(up.is_some(), "no stream_up over HTTPS: {:?}\n{}", hook.seen, server.output());
    // Counted once whepd has read the 204, which may be just after the receiver saw the event.
    let delivered = || server.metric("whep_webhook_delivered_total").is_some_and(|n| n >= 1.0);
    assert!(wait_until(Duration::from_secs(5), delivered), "{}", server.output());
    assert_eq!(server.metric("whep_webhook_failures_total"), Some(0.0));
    drop(server);

    let server = Server::start(bin, &["--webhook-url", &url]);
    assert!(
        wait_until(PLAY_WITHIN, || server
            .metric("whep_webhook_failures_total")
            .is_some_and(|n| n >= 1.0)),
        "no failure counted"
    );
    // Nothing of the second server reached the receiver: one stream_up in all.
    while let Ok(d) = hook.events.try_recv() {
        hook.seen.push(d.json);
    }
    let ups = hook.seen.iter().filter(|e| e["event"] == "stream_up").count();
    assert_eq!(ups, 1, "{:?}", hook.seen);
}

/// `--webhook-secret-file`: every delivery carries Standard Webhooks headers that an
/// independent verifier accepts with the secret, a distinct id per event, and a body changed
/// by one byte fails it (the verifier can say no).
fn signed_webhook(bin: &str) {
    let mut hook = Receiver::start();
    let url = format!("http://{}/hook", hook.addr);
    let name = Path::new(bin).file_name().and_then(|n| n.to_str()).unwrap_or("whepd");
    let dir = std::env::temp_dir().join(format!("whep-webhook-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let secret = dir.join("secret");
    std::fs::write(&secret, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwC0ffee12\n").expect("write");
    let secret_arg = secret.to_str().expect("UTF-8 path");
    let mut server =
        Server::start(bin, &["--webhook-url", &url, "--webhook-secret-file", secret_arg]);
    let v = Viewer::connect(server.http, "/whep/demo", None).unwrap_or_else(|e| panic!("{e}"));
    let joined = hook.wait(PLAY_WITHIN, |e| e["event"] == "viewer_joined");
    assert!(joined.is_some(), "no viewer_joined: {:?}\n{}", hook.seen, server.output());
    assert_eq!(v.delete().expect("DELETE"), 204);
    assert!(hook.wait(PLAY_WITHIN, |e| e["event"] == "viewer_left").is_some(), "{:?}", hook.seen);
    assert!(hook.wait(PLAY_WITHIN, |e| e["event"] == "stream_up").is_some(), "{:?}", hook.seen);

    let mut deliveries = hook.raw.clone();
    let mut tampered = deliveries[0].clone();
    if let Some(b) = tampered.body.last_mut() {
        *b ^= 1;
    }
    deliveries.push(tampered);
    let signed: Vec<whep_e2e::signing::Signed<'_>> =
        deliveries.iter().map(|d| (&d.headers[..], &d.body[..])).collect();
    let verdicts = whep_e2e::signing::verify_standard_webhooks(&secret, &signed);
    let n = deliveries.len();
    assert_eq!(verdicts.len(), n, "{verdicts:?}");
    assert!(verdicts[..n - 1].iter().all(|v| v == "ok"), "{verdicts:?}");
    assert!(verdicts[n - 1].starts_with("bad signature"), "a tampered body passed: {verdicts:?}");
    let mut ids: Vec<&str> = hook.raw.iter().filter_map(|d| header(d, "webhook-id")).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), hook.raw.len(), "one id per event");
    assert_eq!(server.metric("whep_webhook_failures_total"), Some(0.0));
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

fn header<'a>(d: &'a Delivery, name: &str) -> Option<&'a str> {
    d.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

whep_e2e::runtime_suite!(
    signed_webhook,
    list_kick_and_events,
    unreachable_webhook_costs_no_media,
    webhook_over_https_with_a_private_ca,
);
