//! The shell's one HTTP client, for the three URLs it calls out to: the authorisation callback
//! (`--auth-http-url`), the JWKS (`--jwks-url`) and the webhook (`--webhook-url`). Each call is
//! one small blocking exchange over a std socket (`Connection: close`), with a timeout for
//! connecting, the TLS handshake, writing and each read, run off the engine loop by its caller:
//! HTTP/1.1 when only the status is read (the callback, the webhook), HTTP/1.0 when the body
//! is (the JWKS), so that it is never chunked.
//!
//! `https://` URLs are served by rustls on the aws-lc backend str0m already builds (no ring).
//! The server's certificate is verified against the system's roots: the PEM bundle the
//! operating system keeps (`$SSL_CERT_FILE`, else the first of Debian's
//! `/etc/ssl/certs/ca-certificates.crt`, Fedora's, openSUSE's and Alpine's paths), read once,
//! at the first `https://` call; plus, with `--outbound-ca-file`, the certificates of a private
//! CA ([`Client::with_ca_file`]). SNI and the name checked are the URL's host (a DNS name or an
//! IP address). Reading the bundle ourselves is what `rustls-native-certs` does on Linux, with
//! no crate more to build; bundling `webpki-roots` would freeze Mozilla's list into the binary
//! and ignore the roots an operator adds to the system.
//!
//! No answer can make this panic: the head is parsed defensively and at most
//! [`MAX_HEAD`] + [`MAX_BODY`] bytes are read.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

/// Largest response head (status line and headers) read.
pub const MAX_HEAD: usize = 64 * 1024;
/// Largest response body read (a JWKS document); a longer answer is an error.
pub const MAX_BODY: usize = 1 << 20;

/// Where the system's root certificates are looked for, in order (after `$SSL_CERT_FILE`).
pub const SYSTEM_ROOTS: [&str; 5] = [
    "/etc/ssl/certs/ca-certificates.crt", // Debian, Ubuntu, Arch, Gentoo
    "/etc/pki/tls/certs/ca-bundle.crt",   // Fedora, RHEL
    "/etc/ssl/ca-bundle.pem",             // openSUSE
    "/etc/ssl/cert.pem",                  // Alpine, macOS
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
];

/// The certificates outgoing HTTPS trusts: the system's roots and, optionally, a private CA.
/// Cheap to clone; the clones share the rustls configuration, built at the first `https://`
/// exchange. Two clients are equal when they trust the same CA file.
#[derive(Clone, Default)]
pub struct Client {
    ca_file: Option<PathBuf>,
    tls: Arc<OnceLock<Result<Arc<rustls::ClientConfig>, String>>>,
}

impl PartialEq for Client {
    fn eq(&self, other: &Self) -> bool {
        self.ca_file == other.ca_file
    }
}

impl Eq for Client {}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("ca_file", &self.ca_file).finish_non_exhaustive()
    }
}

impl Client {
    /// Trusts the certificates in `ca_file` (PEM) besides the system's roots
    /// (`--outbound-ca-file`).
    pub fn with_ca_file(ca_file: PathBuf) -> Self {
        Self { ca_file: Some(ca_file), tls: Arc::default() }
    }

    /// The private CA file, if any.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }

    fn tls(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        self.tls.get_or_init(|| client_config(self.ca_file.as_deref()).map(Arc::new)).clone()
    }
}

/// The certificates in a PEM document; an error when there is none.
pub fn pem_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into());
    }
    Ok(certs)
}

fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    let system = env.into_iter().chain(SYSTEM_ROOTS.iter().map(PathBuf::from));
    for path in system {
        if let Ok(pem) = std::fs::read(&path) {
            let certs = CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok);
            let (added, _) = roots.add_parsable_certificates(certs);
            tracing::debug!(path = %path.display(), added, "system root certificates");
            if added > 0 {
                break;
            }
        }
    }
    if let Some(path) = ca_file {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let certs = pem_certificates(&pem).map_err(|e| format!("{}: {e}", path.display()))?;
        for cert in certs {
            roots.add(cert).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    if roots.is_empty() {
        return Err(
            "no root certificates: install ca-certificates or pass --outbound-ca-file".into()
        );
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS protocol versions: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// An `http://` or `https://` URL, checked at start, with the [`Client`] that calls it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// Whether it is `https://`.
    pub https: bool,
    /// `host[:port]` as written (the `Host` header).
    pub authority: String,
    /// The host as written (brackets kept around an IPv6 literal).
    pub host: String,
    /// The port (80 or 443 when none).
    pub port: u16,
    /// The path and query, `/` at least.
    pub path: String,
    /// The certificates trusted for `https://`.
    pub client: Client,
}

impl HttpUrl {
    /// Parses `http[s]://host[:port][/path][?query]`; user information, fragments, spaces and
    /// control characters are refused with a message. It trusts the system's roots; see
    /// [`with_client`](Self::with_client).
    pub fn parse(url: &str) -> Result<Self, String> {
        let (https, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
            (Some(rest), _) => (false, rest),
            (_, Some(rest)) => (true, rest),
            _ => return Err(format!("{url:?}: expected an http:// or https:// URL")),
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let path = if path.starts_with('?') { format!("/{path}") } else { path.to_owned() };
        if authority.is_empty()
            || authority.contains('@')
            || url.chars().any(|c| c.is_whitespace() || c.is_control() || c == '#')
        {
            return Err(format!("{url:?}: not a valid URL with a host"));
        }
        let bad = |what: &str| format!("{url:?}: bad {what}");
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (inner, after) = v6.split_once(']').ok_or_else(|| bad("host"))?;
                if inner.parse::<std::net::Ipv6Addr>().is_err() {
                    return Err(bad("IPv6 address"));
                }
                let port = match after {
                    "" => None,
                    _ => Some(after.strip_prefix(':').ok_or_else(|| bad("host"))?),
                };
                (&authority[..inner.len() + 2], port)
            }
            None => match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        let port = match port {
            Some(p) => p.parse::<u16>().map_err(|_| bad("port"))?,
            None if https => 443,
            None => 80,
        };
        if host.is_empty() || !host.starts_with('[') && host.contains(['[', ']', ':']) {
            return Err(bad("host"));
        }
        Ok(Self {
            https,
            authority: authority.to_owned(),
            host: host.to_owned(),
            port,
            path,
            client: Client::default(),
        })
    }

    /// This URL called with `client` (a private CA).
    pub fn with_client(mut self, client: Client) -> Self {
        self.client = client;
        self
    }

    /// The host without the brackets of an IPv6 literal.
    pub fn bare_host(&self) -> &str {
        self.host.trim_start_matches('[').trim_end_matches(']')
    }

    fn addrs(&self) -> Result<Vec<SocketAddr>, String> {
        (self.bare_host(), self.port)
            .to_socket_addrs()
            .map(Iterator::collect)
            .map_err(|e| format!("cannot resolve {}: {e}", self.host))
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority, self.path)
    }
}

/// What one exchange sends.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// `GET` or `POST`.
    pub method: &'a str,
    /// A JSON body (`Content-Type: application/json`), if any.
    pub json: Option<&'a str>,
    /// The `User-Agent`.
    pub user_agent: &'a str,
    /// More header fields (names and values of our own making: no CR or LF in them).
    pub headers: &'a [(&'a str, String)],
    /// The limit for connecting, the handshake, writing and each read.
    pub timeout: Duration,
    /// Whether the body is wanted; if not, the exchange ends at the status line.
    pub read_body: bool,
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body (empty unless [`Request::read_body`]), at most [`MAX_BODY`] bytes.
    pub body: Vec<u8>,
}

/// One exchange with `url`. Blocking: run it off the engine loop. The error says what went
/// wrong (resolving, connecting, the TLS handshake and certificate, a timeout, a malformed or
/// too large answer).
pub fn exchange(url: &HttpUrl, req: &Request<'_>) -> Result<Response, String> {
    let timeout = req.timeout.max(Duration::from_millis(1));
    let tls = if url.https { Some(url.client.tls()?) } else { None };
    let mut last = String::from("no address");
    let mut stream = None;
    for addr in url.addrs()? {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = format!("cannot connect to {addr}: {e}"),
        }
    }
    let mut tcp = stream.ok_or(last)?;
    let io = |e: io::Error| e.to_string();
    tcp.set_read_timeout(Some(timeout)).map_err(io)?;
    tcp.set_write_timeout(Some(timeout)).map_err(io)?;
    let _ = tcp.set_nodelay(true);
    let head = request_bytes(url, req);
    let Some(tls) = tls else {
        tcp.write_all(&head).map_err(|e| timed(&e, timeout))?;
        return read_response(&mut tcp, req.read_body, timeout);
    };
    let name = match url.bare_host().parse::<IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(url.bare_host().to_owned())
            .map_err(|e| format!("{}: not a TLS server name: {e}", url.host))?,
    };
    let mut conn = rustls::ClientConnection::new(tls, name)
        .map_err(|e| format!("TLS with {}: {e}", url.host))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)
            .map_err(|e| format!("TLS handshake with {}: {}", url.host, timed(&e, timeout)))?;
    }
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    stream.write_all(&head).map_err(|e| timed(&e, timeout))?;
    stream.flush().map_err(|e| timed(&e, timeout))?;
    read_response(&mut stream, req.read_body, timeout)
}

fn request_bytes(url: &HttpUrl, req: &Request<'_>) -> Vec<u8> {
    let version = if req.read_body { "1.0" } else { "1.1" };
    let mut head = format!(
        "{} {} HTTP/{version}\r\nHost: {}\r\nUser-Agent: {}\r\nAccept: */*\r\n",
        req.method, url.path, url.authority, req.user_agent
    );
    for (name, value) in req.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(b) = req.json {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("Connection: close\r\n\r\n");
    head.push_str(req.json.unwrap_or(""));
    head.into_bytes()
}

fn timed(e: &io::Error, timeout: Duration) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("no answer within {} ms", timeout.as_millis())
        }
        _ => e.to_string(),
    }
}

/// Reads an answer: up to the end of the status line without `read_body`, else up to the end
/// of the body (its `Content-Length`, or the end of the connection).
fn read_response(
    stream: &mut impl Read,
    read_body: bool,
    timeout: Duration,
) -> Result<Response, String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // The end of the head and its Content-Length, once read.
    let mut head: Option<(usize, Option<usize>)> = None;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            // A TLS peer that closes without close_notify: the end, as for plain HTTP/1.0.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(timed(&e, timeout)),
        };
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if !read_body && got.contains(&b'\n') {
            break;
        }
        if head.is_none() {
            head = head_end(&got).map(|end| (end, content_length(&got[..end])));
        }
        match head {
            Some((end, _)) if end > MAX_HEAD => return Err("answer head too large".into()),
            Some((end, _)) if got.len() - end > MAX_BODY => {
                return Err(format!("answer larger than {MAX_BODY} bytes"));
            }
            Some((end, Some(len))) if got.len() - end >= len => break,
            Some(_) => {}
            None if got.len() > MAX_HEAD => return Err("answer head too large".into()),
            None => {}
        }
    }
    parse_response(&got, read_body)
}

fn head_end(got: &[u8]) -> Option<usize> {
    got.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// The `Content-Length` of a head, if it has one that parses.
fn content_length(head: &[u8]) -> Option<usize> {
    let head = std::str::from_utf8(head).ok()?;
    head.split("\r\n").find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim().eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok())?
    })
}

/// The status and, with `read_body`, the body of an answer read whole.
pub fn parse_response(got: &[u8], read_body: bool) -> Result<Response, String> {
    let line_end = got.iter().position(|&b| b == b'\n').ok_or("no status line")?;
    let line = std::str::from_utf8(&got[..line_end]).map_err(|_| "bad status line")?;
    let line = line.trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(format!("bad status line {line:?}"));
    };
    if !version.starts_with("HTTP/1.")
        || code.len() != 3
        || !code.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(format!("bad status line {line:?}"));
    }
    let status: u16 = code.parse().map_err(|_| format!("bad status line {line:?}"))?;
    if !read_body {
        return Ok(Response { status, body: Vec::new() });
    }
    let end = head_end(got).ok_or("answer ends in its head")?;
    let head = &got[..end];
    if std::str::from_utf8(head).is_ok_and(|h| {
        h.split("\r\n").any(|l| {
            l.split_once(':').is_some_and(|(n, v)| {
                n.trim().eq_ignore_ascii_case("transfer-encoding")
                    && !v.trim().eq_ignore_ascii_case("identity")
            })
        })
    }) {
        return Err("a transfer-coded answer to an HTTP/1.0 request".into());
    }
    let mut body = got[end..].to_vec();
    if let Some(len) = content_length(head) {
        if body.len() < len {
            return Err(format!("answer cut short: {} of {len} bytes", body.len()));
        }
        body.truncate(len);
    }
    Ok(Response { status, body })
}

#[cfg(test)]
pub(crate) mod tests;
