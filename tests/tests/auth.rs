//! Viewer authorisation end to end, per runtime: an HTTP authorisation server in the test
//! (a std `TcpListener` thread) that allows one token and refuses another decides whether a
//! str0m viewer plays; with it down or silent the viewer gets a clear 503; a JWT signed with
//! the server's HS256 secret plays in headless Chromium from the WHEP URL's query, and a JWT
//! for another stream is refused 403. The callback and the JWKS also over HTTPS with a private
//! CA (`--outbound-ca-file`), and refused without it; a viewer gone before the decision frees
//! its place among the pending requests at once; a token of a key the issuer rotated in since
//! the last JWKS fetch plays at once (fetched on its POST); tokens and JWKS of PyJWT, including
//! tokens made for MediaMTX, decide as they would there.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use whep_core::auth::testing;
use whep_e2e::tls::{Issued, TestCa};
use whep_e2e::viewer::{Viewer, ViewerError};
use whep_e2e::{Server, chromium};

const PLAY_WITHIN: Duration = Duration::from_secs(25);
const SECRET: &str = "an-hs256-secret-of-32-bytes-or-more";

/// The authorisation server: `good` → 200, `bad` → 403, anything else → 401. Keeps every
/// request body it got.
struct AuthServer {
    url: String,
    /// `GET` of this URL answers the JWKS (the server's, or [`set_jwks`](Self::set_jwks)').
    jwks_url: String,
    jwks: Arc<Jwks>,
    requests: Arc<Mutex<Vec<Received>>>,
}

/// The JWKS document served, and how many times it was fetched.
#[derive(Default)]
struct Jwks {
    doc: Mutex<String>,
    gets: AtomicUsize,
}

impl Jwks {
    fn get(&self) -> String {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.doc.lock().map(|d| d.clone()).unwrap_or_default()
    }
}

/// A request the authorisation server got: its header fields and body.
type Received = (Vec<(String, String)>, String);

impl AuthServer {
    fn start() -> Self {
        Self::with_jwks(String::new())
    }

    fn with_jwks(jwks: String) -> Self {
        Self::serve(jwks, None)
    }

    /// The same over HTTPS with `cert`'s chain and key (issued for 127.0.0.1).
    fn https(jwks: String, cert: &Issued) -> Self {
        Self::serve(jwks, Some(cert.server_config()))
    }

    fn serve(jwks: String, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the auth server");
        let addr = listener.local_addr().expect("its address");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let theirs = Arc::clone(&requests);
        let jwks = Arc::new(Jwks { doc: Mutex::new(jwks), ..Jwks::default() });
        let served = Arc::clone(&jwks);
        let https = tls.is_some();
        // Lives as long as the test process; each connection is one request.
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let requests = Arc::clone(&theirs);
                let jwks = Arc::clone(&served);
                let tls = tls.clone();
                std::thread::spawn(move || match tls {
                    None => answer(conn, &requests, &jwks),
                    Some(config) => {
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                        let Ok(tls) = rustls::ServerConnection::new(config) else { return };
                        answer(rustls::StreamOwned::new(tls, conn), &requests, &jwks);
                    }
                });
            }
        });
        let scheme = if https { "https" } else { "http" };
        Self {
            url: format!("{scheme}://{addr}/auth"),
            jwks_url: format!("{scheme}://{addr}/jwks.json"),
            jwks,
            requests,
        }
    }

    /// Serves `doc` as the JWKS from now on.
    fn set_jwks(&self, doc: String) {
        if let Ok(mut d) = self.jwks.doc.lock() {
            *d = doc;
        }
    }

    fn jwks_gets(&self) -> usize {
        self.jwks.gets.load(Ordering::SeqCst)
    }

    fn bodies(&self) -> Vec<String> {
        self.requests().into_iter().map(|(_, body)| body).collect()
    }

    fn requests(&self) -> Vec<Received> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

fn answer(conn: impl Read + Write, requests: &Mutex<Vec<Received>>, jwks: &Jwks) {
    let mut reader = BufReader::new(conn);
    let mut headers = Vec::new();
    let mut length = 0usize;
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let get_jwks = line.starts_with("GET /jwks.json ");
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((name, value)) = l.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }
    if get_jwks {
        let mut conn = reader.into_inner();
        let doc = jwks.get();
        let _ = write!(conn, "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{doc}");
        let _ = conn.flush();
        return;
    }
    let mut body = vec![0u8; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let body = String::from_utf8_lossy(&body).into_owned();
    let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let status = match json.get("token").and_then(|t| t.as_str()) {
        Some("good") => "200 OK",
        Some("bad") => "403 Forbidden",
        _ => "401 Unauthorized",
    };
    if let Ok(mut r) = requests.lock() {
        r.push((headers, body));
    }
    let mut conn = reader.into_inner();
    let _ = write!(conn, "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let _ = conn.flush();
}

fn rejected(r: Result<Viewer, ViewerError>) -> (u16, String) {
    match r {
        Err(ViewerError::Rejected { status, body }) => (status, body),
        Err(e) => panic!("not a rejection: {e:?}"),
        Ok(v) => panic!("accepted: {:?}", v.stats()),
    }
}

/// The allowed token plays; the refused one gets 403, no token 401; the authorisation server
/// hears stream, token, address and user agent; a second POST with the allowed token is
/// decided from the cache.
fn callback_decides_who_plays(bin: &str) {
    callback_decides_who_plays_on(bin, 1);
}

/// [`callback_decides_who_plays`] on `shards` engine loops: each asks for the requests it
/// holds (and caches on its own, so the cache is not checked with more than one).
fn callback_decides_who_plays_on(bin: &str, shards: usize) {
    let auth = AuthServer::start();
    let shards_arg = shards.to_string();
    let mut server = Server::start(bin, &["--auth-http-url", &auth.url, "--shards", &shards_arg]);
    let v = Viewer::connect(server.http, "/whep/demo", Some("good"))
        .unwrap_or_else(|e| panic!("allowed viewer: {e:?}\n{}", server.output()));
    assert!(
        v.wait_for(PLAY_WITHIN, |s| s.video_packets >= 100 && s.audio_packets >= 20),
        "allowed viewer did not play: {:?}\n{}",
        v.stats(),
        server.output()
    );
    let asked = auth.bodies();
    assert_eq!(asked.len(), 1, "{asked:?}");
    let json: serde_json::Value = serde_json::from_str(&asked[0]).expect("JSON");
    assert_eq!(json["path"], "demo");
    assert_eq!(json["token"], "good");
    assert_eq!(json["action"], "read");
    assert_eq!(json["protocol"], "whep");
    assert_eq!(json["ip"], "127.0.0.1");

    let (status, body) = rejected(Viewer::connect(server.http, "/whep/demo", Some("bad")));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("denied access to stream demo"), "{body}");
    let (status, body) = rejected(Viewer::connect(server.http, "/whep/demo", None));
    assert_eq!(status, 401, "{body}");

    let again = Viewer::connect(server.http, "/whep/demo", Some("good")).expect("cached allow");
    if shards == 1 {
        assert_eq!(auth.bodies().len(), 3, "the cached decision was asked for again");
    }
    again.close();
    v.close();
}

/// No authorisation server listening, then one that never answers: 503 with a clear error,
/// within the timeout.
fn auth_server_down_is_a_clear_503(bin: &str) {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let url = format!("http://127.0.0.1:{port}/auth");
    let mut server = Server::start(bin, &["--auth-http-url", &url]);
    let (status, body) = rejected(Viewer::connect(server.http, "/whep/demo", Some("good")));
    assert_eq!(status, 503, "{body}\n{}", server.output());
    assert!(body.contains("authorisation failed") && body.contains("connect"), "{body}");
    drop(server);

    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr: SocketAddr = silent.local_addr().expect("address");
    let url = format!("http://{addr}/auth");
    let server = Server::start(bin, &["--auth-http-url", &url, "--auth-http-timeout-ms", "500"]);
    let started = std::time::Instant::now();
    let (status, body) = rejected(Viewer::connect(server.http, "/whep/demo", Some("good")));
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("within 500 ms"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    drop(silent);
}

fn jwt(streams: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() + 3600)
        .unwrap_or_default();
    testing::hs256(
        SECRET.as_bytes(),
        r#"{"alg":"HS256","typ":"JWT"}"#,
        &format!(r#"{{"exp":{exp},"whep":{{"streams":{streams}}}}}"#),
    )
}

/// A JWT in the WHEP URL's query plays in Chromium (the player page's `jwt=`); one for other
/// streams is refused 403, a forged one 401.
fn jwt_in_the_query_plays_in_chromium(bin: &str) {
    let mut server = Server::start(bin, &["--jwt-secret", SECRET]);
    let (status, body) =
        rejected(Viewer::connect(server.http, "/whep/demo", Some(&jwt(r#"["cam*"]"#))));
    assert_eq!(status, 403, "{body}");
    let forged = testing::hs256(b"another-secret-of-32-bytes-or-more!", r#"{"alg":"HS256"}"#, "{}");
    let (status, body) = rejected(Viewer::connect(server.http, "/whep/demo", Some(&forged)));
    assert_eq!(status, 401, "{body}");
    let url = format!(
        "http://{}/?stream=demo&test=1&frames=30&timeout=30&jwt={}",
        server.http,
        jwt(r#"["demo"]"#)
    );
    let verdict = chromium::run_page(&url, Duration::from_secs(45))
        .unwrap_or_else(|e| panic!("{e}\nserver output:\n{}", server.output()));
    assert!(verdict.contains("[WHEP] PASS"), "{verdict}\nserver output:\n{}", server.output());
}

/// `--auth-http-secret-file`: the callback's requests carry Standard Webhooks signatures that an
/// independent verifier accepts, and one whose body was changed fails it; the decisions are
/// obeyed as without signing.
fn signed_callback(bin: &str) {
    let auth = AuthServer::start();
    let dir = std::env::temp_dir().join(format!(
        "whep-auth-sign-{}-{}",
        std::process::id(),
        std::path::Path::new(bin).file_name().and_then(|n| n.to_str()).unwrap_or("whepd")
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let secret = dir.join("secret");
    std::fs::write(&secret, "whsec_ZGVjaXNpb25zLW9mLXRoZS1hdXRoLXNlcnZlcg==\n").expect("write");
    let secret_arg = secret.to_str().expect("UTF-8 path");
    let args = ["--auth-http-url", &auth.url, "--auth-http-secret-file", secret_arg];
    let server = Server::start(bin, &args);
    let v = Viewer::connect(server.http, "/whep/demo", Some("good"))
        .unwrap_or_else(|e| panic!("allowed viewer: {e:?}"));
    let (status, body) = rejected(Viewer::connect(server.http, "/whep/demo", Some("bad")));
    assert_eq!(status, 403, "{body}");
    let mut requests = auth.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    let mut tampered = requests[0].clone();
    tampered.1 = tampered.1.replace("good", "g00d");
    requests.push(tampered);
    let signed: Vec<whep_e2e::signing::Signed<'_>> =
        requests.iter().map(|(h, b)| (&h[..], b.as_bytes())).collect();
    let verdicts = whep_e2e::signing::verify_standard_webhooks(&secret, &signed);
    assert_eq!(verdicts[..2], ["ok", "ok"], "{verdicts:?}");
    assert!(verdicts[2].starts_with("bad signature"), "a tampered body passed: {verdicts:?}");
    v.close();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--jwt-issuer` and `--jwt-audience`: a token of that issuer for that audience (among
/// others) plays; one of another issuer, for another audience, or naming neither is refused 401
/// saying which.
fn jwt_issuer_and_audience_are_enforced(bin: &str) {
    let args =
        ["--jwt-secret", SECRET, "--jwt-issuer", "https://idp.example", "--jwt-audience", "whep"];
    let server = Server::start(bin, &args);
    let exp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() + 3600)
        .unwrap_or_default();
    let token = |origin: &str| {
        let claims = format!(r#"{{"exp":{exp},{origin}"whep":{{"streams":["demo"]}}}}"#);
        testing::hs256(SECRET.as_bytes(), r#"{"alg":"HS256","typ":"JWT"}"#, &claims)
    };
    let good = token(r#""iss":"https://idp.example","aud":["mail","whep"],"#);
    let v = Viewer::connect(server.http, "/whep/demo", Some(&good))
        .unwrap_or_else(|e| panic!("the issuer's token for us: {e:?}"));
    assert!(v.wait_for(PLAY_WITHIN, |s| s.video_packets >= 20), "{:?}", v.stats());
    for (claims, why) in [
        (r#""iss":"https://other.example","aud":"whep","#, "(iss)"),
        (r#""iss":"https://idp.example","aud":"mail","#, "(aud)"),
        ("", "(iss)"),
    ] {
        let (status, body) =
            rejected(Viewer::connect(server.http, "/whep/demo", Some(&token(claims))));
        assert_eq!(status, 401, "{claims}: {body}");
        assert!(body.contains(why), "{claims}: {body}");
    }
    v.close();
}

/// ES256 keys from a JWKS URL: fetched at start, a token signed by them plays, one for other
/// streams is refused 403.
fn jwks_url_keys_verify_es256(bin: &str) {
    let (key, jwk) = testing::es256_key("k1");
    let jwks_server = AuthServer::with_jwks(format!(r#"{{"keys":[{jwk}]}}"#));
    let mut server = Server::start(bin, &["--jwks-url", &jwks_server.jwks_url]);
    assert!(
        whep_e2e::wait_until(Duration::from_secs(10), || server.output().contains("JWKS fetched")),
        "JWKS not fetched:\n{}",
        server.output()
    );
    let exp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() + 3600)
        .unwrap_or_default();
    let token = |streams: &str| {
        let claims = format!(r#"{{"exp":{exp},"whep":{{"streams":{streams}}}}}"#);
        testing::es256(&key, r#"{"alg":"ES256","kid":"k1"}"#, &claims)
    };
    let v = Viewer::connect(server.http, "/whep/demo", Some(&token(r#"["demo"]"#)))
        .unwrap_or_else(|e| panic!("ES256 viewer: {e:?}\n{}", server.output()));
    assert!(v.wait_for(PLAY_WITHIN, |s| s.video_packets >= 50), "{:?}", v.stats());
    let (status, body) =
        rejected(Viewer::connect(server.http, "/whep/demo", Some(&token(r#"["other"]"#))));
    assert_eq!(status, 403, "{body}");
    v.close();
}

/// The issuer rotates in a key after the server's fetch: the first token signed by it makes
/// the server fetch the JWKS again on its POST, and plays; a token naming a key that is not
/// published is refused 401 at once, without another fetch (at most one per 30 s).
fn a_rotated_jwks_key_plays_at_once(bin: &str) {
    a_rotated_jwks_key_plays_at_once_on(bin, 1);
}

fn a_rotated_jwks_key_plays_at_once_on(bin: &str, shards: usize) {
    let (_, jwk1) = testing::es256_key("k1");
    let (k2, jwk2) = testing::es256_key("k2");
    let (k9, _) = testing::es256_key("k9");
    let jwks_server = AuthServer::with_jwks(format!(r#"{{"keys":[{jwk1}]}}"#));
    let shards_arg = shards.to_string();
    let args = ["--jwks-url", &jwks_server.jwks_url, "--shards", &shards_arg];
    let mut server = Server::start(bin, &args);
    assert!(
        whep_e2e::wait_until(Duration::from_secs(10), || server.output().contains("JWKS fetched")),
        "JWKS not fetched:\n{}",
        server.output()
    );
    assert_eq!(jwks_server.jwks_gets(), 1);
    jwks_server.set_jwks(format!(r#"{{"keys":[{jwk1},{jwk2}]}}"#));
    let exp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() + 3600)
        .unwrap_or_default();
    let claims = format!(r#"{{"exp":{exp},"whep":{{"streams":["demo"]}}}}"#);
    let token = |key, kid: &str| {
        testing::es256(key, &format!(r#"{{"alg":"ES256","kid":"{kid}"}}"#), &claims)
    };
    let mut viewers = Vec::new();
    for _ in 0..2 * shards {
        let v = Viewer::connect(server.http, "/whep/demo", Some(&token(&k2, "k2")))
            .unwrap_or_else(|e| panic!("a token of the rotated key: {e:?}\n{}", server.output()));
        viewers.push(v);
    }
    for v in &viewers {
        assert!(v.wait_for(PLAY_WITHIN, |s| s.video_packets >= 20), "{:?}", v.stats());
    }
    // One fetch more, also with shards asking at once (the fetcher answers the later asks
    // with the keys it has).
    let fetched = jwks_server.jwks_gets();
    assert_eq!(fetched, 2, "JWKS fetches");
    let (status, body) =
        rejected(Viewer::connect(server.http, "/whep/demo", Some(&token(&k9, "k9"))));
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("no key"), "{body}");
    assert_eq!(jwks_server.jwks_gets(), fetched, "no fetch within the minimum interval");
    viewers.into_iter().for_each(Viewer::close);
}

/// Tokens of an identity provider as users run one (PyJWT, `tests/clients/jwt_issuer.py`):
/// its JWKS (RSA and P-256 keys, as PyJWT writes them) served at `--jwks-url`; an RS256 token
/// with `whep.streams` and ES256 ones made for MediaMTX (`mediamtx_permissions`: a regular
/// expression, and the list as a JSON string) play; one whose MediaMTX claim names another
/// stream and one that may only publish are refused 403, an expired one 401.
fn tokens_of_a_real_issuer_play(bin: &str) {
    let out = std::process::Command::new(whep_e2e::players::venv_python())
        .arg(whep_e2e::players::client("jwt_issuer.py"))
        .output()
        .expect("run jwt_issuer.py");
    assert!(out.status.success(), "jwt_issuer.py: {}", String::from_utf8_lossy(&out.stderr));
    let issued: serde_json::Value = serde_json::from_slice(&out.stdout).expect("its JSON");
    let token = |name: &str| issued["tokens"][name].as_str().expect(name).to_owned();
    let jwks_server = AuthServer::with_jwks(issued["jwks"].to_string());
    let mut server = Server::start(bin, &["--jwks-url", &jwks_server.jwks_url]);
    assert!(
        whep_e2e::wait_until(Duration::from_secs(10), || server.output().contains("JWKS fetched")),
        "JWKS not fetched:\n{}",
        server.output()
    );
    assert!(server.output().contains("keys=2"), "both keys taken:\n{}", server.output());
    let mut viewers = Vec::new();
    for name in ["rs256_demo", "es256_mediamtx_regex", "es256_mediamtx_string_demo"] {
        let v = Viewer::connect(server.http, "/whep/demo", Some(&token(name)))
            .unwrap_or_else(|e| panic!("{name}: {e:?}\n{}", server.output()));
        viewers.push(v);
    }
    for v in &viewers {
        assert!(v.wait_for(PLAY_WITHIN, |s| s.video_packets >= 20), "{:?}", v.stats());
    }
    for (name, status, why) in [
        ("rs256_mediamtx_other", 403, "does not grant stream demo"),
        ("rs256_mediamtx_publish", 403, "does not grant stream demo"),
        ("rs256_expired", 401, "expired"),
    ] {
        let (got, body) = rejected(Viewer::connect(server.http, "/whep/demo", Some(&token(name))));
        assert_eq!(got, status, "{name}: {body}");
        assert!(body.contains(why), "{name}: {body}");
    }
    viewers.into_iter().for_each(Viewer::close);
}

/// The callback and the JWKS over HTTPS, their server's certificate issued by a private CA:
/// trusted with `--outbound-ca-file`, the allowed token plays and the refused one gets 403;
/// without it (the system's roots only) the handshake fails and the viewer gets 503, nothing
/// reaching the authorisation server.
fn callback_and_jwks_over_https_with_a_private_ca(bin: &str) {
    let ca = TestCa::new("outbound");
    let (key, jwk) = testing::es256_key("k1");
    let auth = AuthServer::https(format!(r#"{{"keys":[{jwk}]}}"#), &ca.issue("auth"));
    assert!(auth.url.starts_with("https://127.0.0.1:"), "{}", auth.url);
    let ca_file = ca.path("ca.pem");
    let ca_file = ca_file.to_str().expect("a UTF-8 path");
    let args = ["--auth-http-url", &auth.url, "--jwks-url", &auth.jwks_url];
    let mut server = Server::start(bin, &[&args[..], &["--outbound-ca-file", ca_file]].concat());
    let v = Viewer::connect(server.http, "/whep/demo", Some("good"))
        .unwrap_or_else(|e| panic!("allowed viewer: {e:?}\n{}", server.output()));
    assert!(v.wait_for(PLAY_WITHIN, |s| s.video_packets >= 20), "{:?}", v.stats());
    let (status, body) = rejected(Viewer::connect(server.http, "/whep/demo", Some("bad")));
    assert_eq!(status, 403, "{body}");
    assert_eq!(auth.bodies().len(), 2);
    assert!(
        whep_e2e::wait_until(Duration::from_secs(10), || server.output().contains("JWKS fetched")),
        "JWKS not fetched over HTTPS:\n{}",
        server.output()
    );
    let exp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() + 3600)
        .unwrap_or_default();
    let claims = format!(r#"{{"exp":{exp},"whep":{{"streams":["demo"]}}}}"#);
    let token = testing::es256(&key, r#"{"alg":"ES256","kid":"k1"}"#, &claims);
    let jwt_viewer = Viewer::connect(server.http, "/whep/demo", Some(&token))
        .unwrap_or_else(|e| panic!("JWT viewer: {e:?}\n{}", server.output()));
    jwt_viewer.close();
    v.close();
    drop(server);

    // The private CA not trusted: fails closed.
    let mut server = Server::start(bin, &args);
    let (status, body) = rejected(Viewer::connect(server.http, "/whep/demo", Some("good")));
    assert_eq!(status, 503, "{body}\n{}", server.output());
    assert!(body.contains("authorisation failed") && body.contains("certificate"), "{body}");
    assert_eq!(auth.bodies().len(), 2, "a request reached the untrusted server");
    assert!(
        whep_e2e::wait_until(Duration::from_secs(10), || {
            server.output().contains("JWKS fetch failed")
        }),
        "{}",
        server.output()
    );
}

/// A viewer whose connection closes while the authorisation server decides frees its place
/// among `--auth-max-pending` at once (not after the 20 s timeout): `whep_auth_pending` drops
/// to 0 and the next viewer is asked about instead of refused.
fn a_viewer_gone_before_the_decision_frees_its_place(bin: &str) {
    // Accepts (the kernel's backlog) and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/auth", silent.local_addr().expect("address"));
    let args = ["--auth-http-url", &url, "--auth-http-timeout-ms", "20000"];
    let mut server = Server::start(bin, &[&args[..], &["--auth-max-pending", "1"]].concat());
    let post = |server: &Server| {
        let mut conn = TcpStream::connect(server.http).expect("connect");
        let offer = "v=0\r\n";
        let _ = write!(
            conn,
            "POST /whep/demo HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer t\r\n\
             Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{offer}",
            server.http,
            offer.len()
        );
        conn
    };
    let pending = |server: &Server| server.metric("whep_auth_pending").unwrap_or(-1.0);
    let first = post(&server);
    assert!(
        whep_e2e::wait_until(Duration::from_secs(5), || pending(&server) == 1.0),
        "not pending: {}\n{}",
        pending(&server),
        server.output()
    );
    drop(first);
    assert!(
        whep_e2e::wait_until(Duration::from_secs(3), || pending(&server) == 0.0),
        "the pending request outlived its connection: {}\n{}",
        pending(&server),
        server.output()
    );
    // Its place is free: the next one waits for the decision rather than getting 503.
    let mut second = post(&server);
    assert!(
        whep_e2e::wait_until(Duration::from_secs(5), || pending(&server) == 1.0),
        "{}",
        server.output()
    );
    second.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
    let mut got = [0u8; 64];
    assert!(second.read(&mut got).is_err(), "answered: {:?}", String::from_utf8_lossy(&got));
    drop(second);
    drop(silent);
}

whep_e2e::runtime_suite!(
    callback_and_jwks_over_https_with_a_private_ca,
    a_viewer_gone_before_the_decision_frees_its_place,
    callback_decides_who_plays,
    auth_server_down_is_a_clear_503,
    jwks_url_keys_verify_es256,
    a_rotated_jwks_key_plays_at_once,
    tokens_of_a_real_issuer_play,
    jwt_in_the_query_plays_in_chromium,
    jwt_issuer_and_audience_are_enforced,
    signed_callback,
);

/// The callback with two shards (the blocking server runs one loop).
#[test]
fn tokio_callback_with_shards() {
    callback_decides_who_plays_on(env!("CARGO_BIN_EXE_whepd-tokio"), 2);
}

#[test]
fn smol_callback_with_shards() {
    callback_decides_who_plays_on(env!("CARGO_BIN_EXE_whepd-smol-e2e"), 2);
}

/// A rotated key with two shards: each asks the one fetcher, which fetches at most once more.
#[test]
fn tokio_rotated_jwks_key_with_shards() {
    a_rotated_jwks_key_plays_at_once_on(env!("CARGO_BIN_EXE_whepd-tokio"), 2);
}
