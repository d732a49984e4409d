//! The client against a local HTTPS server: a CA and a certificate for 127.0.0.1 made here with
//! rcgen, served by rustls on a thread.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::sync::Mutex;

use whep_core::{AuthDecision, AuthRequest, RequestId, StreamId};

use super::*;

#[test]
fn urls_parse() {
    let u = HttpUrl::parse("http://127.0.0.1:9000/auth?x=1").expect("url");
    assert_eq!((u.host.as_str(), u.port, u.path.as_str()), ("127.0.0.1", 9000, "/auth?x=1"));
    assert_eq!(u.authority, "127.0.0.1:9000");
    assert!(!u.https);
    let u = HttpUrl::parse("http://auth.local").expect("url");
    assert_eq!((u.port, u.path.as_str()), (80, "/"));
    let u = HttpUrl::parse("https://auth.example.org/check").expect("url");
    assert_eq!((u.https, u.port, u.host.as_str()), (true, 443, "auth.example.org"));
    assert_eq!(u.to_string(), "https://auth.example.org/check");
    let u = HttpUrl::parse("https://[::1]:8443?a").expect("url");
    assert_eq!(
        (u.host.as_str(), u.bare_host(), u.port, u.path.as_str()),
        ("[::1]", "::1", 8443, "/?a")
    );
    let u = HttpUrl::parse("http://[::1]:81/a").expect("url");
    assert_eq!((u.host.as_str(), u.port), ("[::1]", 81));
    for bad in [
        "ftp://x",
        "http://",
        "https:///a",
        "http://u:p@x/",
        "http://x:http/",
        "http://x:99999/",
        "http://x/a b",
        "http://x/a#frag",
        "http://[zz]/",
        "http://a:b:c/",
        "x",
    ] {
        assert!(HttpUrl::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn answers_parse_without_panicking() {
    let ok = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiextra", true);
    assert_eq!(ok, Ok(Response { status: 200, body: b"hi".to_vec() }));
    let ok = parse_response(b"HTTP/1.0 204 No Content\r\n", false);
    assert_eq!(ok.map(|r| r.status), Ok(204));
    for bad in [
        &b""[..],
        b"\n",
        b"HTTP/1.1\r\n",
        b"HTTP/2 200\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 +20 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
        b"\xff\xfe 200\r\n\r\n",
    ] {
        assert!(parse_response(bad, true).is_err(), "{:?}", String::from_utf8_lossy(bad));
    }
    // Every prefix and a few corruptions of a good answer: an error or a status, no panic.
    let good = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX: \xc3\x28\r\n\r\nhello";
    for n in 0..=good.len() {
        let _ = parse_response(&good[..n], true);
        let _ = parse_response(&good[..n], false);
        let mut bent = good.to_vec();
        if let Some(b) = bent.get_mut(n) {
            *b ^= 0x80;
        }
        let _ = parse_response(&bent, true);
        let _ = content_length(&bent);
    }
}

proptest::proptest! {
    /// Any bytes as an answer, read as from a socket and parsed whole: an error or a bounded
    /// answer, never a panic.
    #[test]
    fn any_answer_is_read_without_panicking(
        head in proptest::sample::select(vec![
            &b"HTTP/1.1 200 OK\r\n"[..],
            b"HTTP/1.0 401 No\r\nContent-Length: 3\r\n",
            b"HTTP/1.1 204 \r\nTransfer-Encoding: chunked\r\n",
            b"",
        ]),
        rest in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
        read_body: bool,
    ) {
        let mut answer = head.to_vec();
        answer.extend_from_slice(&rest);
        if let Ok(r) = read_response(&mut answer.as_slice(), read_body, TIMEOUT) {
            proptest::prop_assert!(r.body.len() <= answer.len() && (100..1000).contains(&r.status));
        }
        let _ = parse_response(&rest, read_body);
        let _ = content_length(&rest);
    }

    /// Any string as a URL: an error or a URL whose parts it holds, never a panic.
    #[test]
    fn any_url_parses_without_panicking(url in "(https?://)?[a-z0-9\\[\\]:@/?#. %\u{e9}-]{0,40}") {
        if let Ok(u) = HttpUrl::parse(&url) {
            proptest::prop_assert!(url.contains(&u.authority) && !u.host.is_empty());
        }
    }
}

/// A CA made here, and a rustls server configuration for 127.0.0.1 whose certificate it signed.
struct TestCa {
    pem: String,
    server: Arc<rustls::ServerConfig>,
}

/// `der` as a PEM certificate.
pub(crate) fn pem_of(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                b64.push('=');
            }
        }
    }
    let lines: Vec<&str> =
        b64.as_bytes().chunks(64).map(|l| std::str::from_utf8(l).expect("ascii")).collect();
    format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", lines.join("\n"))
}

impl TestCa {
    fn new() -> Self {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "whep outbound test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(params, ca_key).expect("CA");
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .expect("leaf params")
            .signed_by(&key, &ca)
            .expect("leaf");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone(), ca.der().clone()], key)
            .expect("server config");
        Self { pem: pem_of(ca.der()), server: Arc::new(server) }
    }

    /// The CA certificate in a PEM file of its own.
    fn file(&self, name: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "whep-outbound-{name}-{}-{:p}.pem",
            std::process::id(),
            self
        ));
        std::fs::write(&path, &self.pem).expect("write the CA file");
        path
    }
}

/// An HTTPS server on 127.0.0.1 answering every request with `answer` (status line, headers
/// and body), keeping the request heads and bodies it read.
struct HttpsServer {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

impl HttpsServer {
    fn start(ca: &TestCa, answer: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (config, theirs) = (Arc::clone(&ca.server), Arc::clone(&seen));
        std::thread::spawn(move || {
            for tcp in listener.incoming().flatten() {
                let (config, seen) = (Arc::clone(&config), Arc::clone(&theirs));
                std::thread::spawn(move || {
                    let Ok(conn) = rustls::ServerConnection::new(config) else { return };
                    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut tls = BufReader::new(rustls::StreamOwned::new(conn, tcp));
                    let (mut text, mut length, mut line) = (String::new(), 0usize, String::new());
                    loop {
                        line.clear();
                        if tls.read_line(&mut line).unwrap_or(0) == 0 {
                            return; // the client refused the certificate
                        }
                        text.push_str(&line);
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0; length];
                    if tls.read_exact(&mut body).is_err() {
                        return;
                    }
                    text.push_str(&String::from_utf8_lossy(&body));
                    seen.lock().expect("lock").push(text);
                    let mut tls = tls.into_inner();
                    let _ = tls.write_all(answer.as_bytes());
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                });
            }
        });
        Self { addr, seen }
    }

    fn url(&self, path: &str, client: &Client) -> HttpUrl {
        let url = format!("https://{}{path}", self.addr);
        HttpUrl::parse(&url).expect("url").with_client(client.clone())
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().expect("lock").clone()
    }
}

fn auth_request() -> AuthRequest {
    AuthRequest {
        id: RequestId(7),
        stream: StreamId::new("cam").expect("id"),
        method: "POST".into(),
        client: Some("192.0.2.7".parse().expect("ip")),
        token: Some("good".into()),
        user_agent: None,
        query: String::new(),
    }
}

const JWKS: &str =
    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"keys\":[]}";

#[test]
fn https_with_the_private_ca_works_for_all_three_callers() {
    let ca = TestCa::new();
    let client = Client::with_ca_file(ca.file("good"));
    // The callback: 200 allows, 403 denies, 500 is an error.
    let allow = HttpsServer::start(&ca, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    let decision = crate::auth::ask(&allow.url("/auth", &client), &auth_request(), TIMEOUT, None);
    assert_eq!(decision, AuthDecision::Allow);
    let seen = allow.seen();
    assert!(seen[0].starts_with("POST /auth HTTP/1.1\r\n"), "{seen:?}");
    assert!(seen[0].contains("\"token\":\"good\""), "{seen:?}");
    let deny = HttpsServer::start(&ca, "HTTP/1.1 403 Forbidden\r\n\r\n");
    let decision = crate::auth::ask(&deny.url("/auth", &client), &auth_request(), TIMEOUT, None);
    assert_eq!(decision, AuthDecision::Deny(403));
    // The JWKS: the body, as long as its Content-Length.
    let jwks = HttpsServer::start(&ca, JWKS);
    let doc = crate::auth::fetch(&jwks.url("/jwks.json", &client), TIMEOUT).expect("fetched");
    assert_eq!(doc, b"{\"keys\":[]}");
    assert!(jwks.seen()[0].starts_with("GET /jwks.json HTTP/1.0\r\n"), "{:?}", jwks.seen());
    // The webhook: delivered once the receiver said 204.
    let hook = HttpsServer::start(&ca, "HTTP/1.1 204 No Content\r\n\r\n");
    let webhook =
        crate::webhook::Webhook::start(&hook.url("/hook", &client), None).expect("started");
    webhook.send(&whep_core::Event::StreamUp { stream: StreamId::new("cam").expect("id") });
    for _ in 0..100 {
        if webhook.delivered() == 1 {
            break;
        }
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(webhook.delivered(), 1);
    assert!(hook.seen()[0].contains("\"event\":\"stream_up\""), "{:?}", hook.seen());
}

#[test]
fn another_ca_is_refused_and_the_callback_fails_closed() {
    let ca = TestCa::new();
    let other = TestCa::new();
    let server = HttpsServer::start(&ca, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    // Trusting only the system's roots and another CA: the handshake fails, nothing is sent.
    for client in [Client::with_ca_file(other.file("other")), Client::default()] {
        let url = server.url("/auth", &client);
        match crate::auth::ask(&url, &auth_request(), TIMEOUT, None) {
            AuthDecision::Error(e) => {
                assert!(e.contains("TLS handshake") && e.contains("certificate"), "{e}")
            }
            d => panic!("{d:?}"),
        }
        let e = crate::auth::fetch(&server.url("/jwks.json", &client), TIMEOUT).expect_err("no");
        assert!(e.contains("certificate"), "{e}");
    }
    // Plain HTTP to the TLS port: a clear error, no panic.
    let plain = HttpUrl::parse(&format!("http://{}/auth", server.addr)).expect("url");
    assert!(matches!(
        crate::auth::ask(&plain, &auth_request(), TIMEOUT, None),
        AuthDecision::Error(_)
    ));
    assert!(server.seen().is_empty(), "{:?}", server.seen());
    // A CA file that is not one.
    let missing = Client::with_ca_file(PathBuf::from("/nonexistent/ca.pem"));
    let e = crate::auth::fetch(&server.url("/", &missing), TIMEOUT).expect_err("no CA");
    assert!(e.contains("cannot read /nonexistent/ca.pem"), "{e}");
    assert!(pem_certificates(b"not a certificate").is_err());
    assert_eq!(pem_certificates(ca.pem.as_bytes()).map(|c| c.len()), Ok(1));
}

#[test]
fn an_answer_too_large_is_an_error() {
    let ca = TestCa::new();
    let client = Client::with_ca_file(ca.file("large"));
    let huge: &'static str =
        Box::leak(format!("HTTP/1.1 200 OK\r\n\r\n{}", "x".repeat(MAX_BODY + 10)).into_boxed_str());
    let server = HttpsServer::start(&ca, huge);
    let e = crate::auth::fetch(&server.url("/jwks.json", &client), TIMEOUT).expect_err("large");
    assert!(e.contains("larger than"), "{e}");
}

const TIMEOUT: Duration = Duration::from_secs(5);
