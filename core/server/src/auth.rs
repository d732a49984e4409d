//! The IO half of viewer authorisation ([`whep_core::auth`]): the HTTP callback's request and
//! its decision, and fetching a JWKS. Both are small blocking HTTP/1.0 exchanges over std
//! sockets with timeouts, run by the runtime off the engine loop
//! ([`Runtime::spawn_blocking`](crate::driver::Runtime::spawn_blocking), or a thread of the
//! blocking example), never on it.
//!
//! The callback gets a JSON POST shaped like MediaMTX's `authMethod: http` request, so that an
//! authorisation server written for MediaMTX works unchanged:
//!
//! ```json
//! {"action": "read", "protocol": "whep", "path": "demo", "ip": "192.0.2.7",
//!  "token": "…", "user": "", "password": "", "query": "token=…", "id": "req-3",
//!  "method": "POST", "user_agent": "Mozilla/5.0 …"}
//! ```
//!
//! 2xx allows, 401 and 403 refuse, anything else (or no answer) is an error: the viewer gets
//! 503. Only `http://` URLs are supported: put the authorisation server on the same host or a
//! trusted network.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use whep_core::{AuthDecision, AuthRequest};

/// Largest response read (a JWKS document; the callback's body is not read).
const MAX_RESPONSE: usize = 1 << 20;

/// An `http://host[:port]/path` URL, checked at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// `host:port` as written (port 80 when none).
    pub authority: String,
    /// The host alone, for the `Host` header.
    pub host: String,
    /// The port.
    pub port: u16,
    /// The path and query, `/` at least.
    pub path: String,
}

impl HttpUrl {
    /// Parses an `http://` URL; HTTPS and user information are refused with a message.
    pub fn parse(url: &str) -> Result<Self, String> {
        let Some(rest) = url.strip_prefix("http://") else {
            return Err(format!(
                "{url:?}: only http:// URLs are supported (run the authorisation server or a \
                 plain-HTTP proxy to it on a trusted network)"
            ));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty()
            || authority.contains('@')
            || url.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(format!("{url:?}: not a valid http:// URL with a host"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse::<u16>() {
                Ok(port) if !h.contains(':') || h.starts_with('[') => (h.to_owned(), port),
                _ if authority.starts_with('[') && authority.ends_with(']') => {
                    (authority.to_owned(), 80)
                }
                _ => return Err(format!("{url:?}: bad port")),
            },
            _ => (authority.to_owned(), 80),
        };
        Ok(Self { authority: authority.to_owned(), host, port, path: path.to_owned() })
    }

    fn addrs(&self) -> Result<Vec<SocketAddr>, String> {
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        (host, self.port)
            .to_socket_addrs()
            .map(Iterator::collect)
            .map_err(|e| format!("cannot resolve {}: {e}", self.host))
    }
}

impl std::fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority, self.path)
    }
}

/// The callback's JSON body for `req` (see the [module docs](self)).
pub fn request_body(req: &AuthRequest) -> String {
    let json = serde_json::json!({
        "action": "read",
        "protocol": "whep",
        "path": req.stream.as_str(),
        "ip": req.client.map(|c| c.to_string()).unwrap_or_default(),
        "token": req.token.clone().unwrap_or_default(),
        "user": "",
        "password": "",
        "query": req.query,
        "id": req.id.to_string(),
        "method": req.method,
        "user_agent": req.user_agent.clone().unwrap_or_default(),
    });
    json.to_string()
}

/// Asks the authorisation server at `url` about `req`, waiting at most about `timeout` in all
/// (connect, write, read). Blocking: run it off the engine loop.
pub fn ask(url: &HttpUrl, req: &AuthRequest, timeout: Duration) -> AuthDecision {
    let body = request_body(req);
    match exchange(url, "POST", Some(&body), timeout, false) {
        Ok((status, _)) if (200..300).contains(&status) => AuthDecision::Allow,
        Ok((status @ (401 | 403), _)) => AuthDecision::Deny(status),
        Ok((status, _)) => {
            AuthDecision::Error(format!("the authorisation server at {url} answered {status}"))
        }
        Err(e) => AuthDecision::Error(format!("the authorisation server at {url}: {e}")),
    }
}

/// Fetches a document (a JWKS) with GET: its body on 200. Blocking.
pub fn fetch(url: &HttpUrl, timeout: Duration) -> Result<Vec<u8>, String> {
    match exchange(url, "GET", None, timeout, true) {
        Ok((200, body)) => Ok(body),
        Ok((status, _)) => Err(format!("{url} answered {status}")),
        Err(e) => Err(format!("{url}: {e}")),
    }
}

/// One HTTP/1.0 exchange (so the answer is never chunked): the status and, if asked for, the
/// body up to [`MAX_RESPONSE`].
fn exchange(
    url: &HttpUrl,
    method: &str,
    body: Option<&str>,
    timeout: Duration,
    read_body: bool,
) -> Result<(u16, Vec<u8>), String> {
    let timeout = timeout.max(Duration::from_millis(1));
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
    let mut stream = stream.ok_or(last)?;
    let io = |e: std::io::Error| e.to_string();
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut head = format!(
        "{method} {} HTTP/1.0\r\nHost: {}\r\nUser-Agent: whepd\r\nAccept: */*\r\n",
        url.path, url.authority
    );
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("Connection: close\r\n\r\n");
    head.push_str(body.unwrap_or(""));
    stream.write_all(head.as_bytes()).map_err(io)?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                format!("no answer within {} ms", timeout.as_millis())
            }
            _ => e.to_string(),
        })?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if got.len() > MAX_RESPONSE + 64 * 1024 {
            return Err("answer too large".into());
        }
        if !read_body && got.windows(2).any(|w| w == b"\r\n") {
            break;
        }
    }
    let line_end = got.windows(2).position(|w| w == b"\r\n").ok_or("no status line")?;
    let line = std::str::from_utf8(&got[..line_end]).map_err(|_| "bad status line")?;
    let mut parts = line.split(' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(format!("bad status line {line:?}"));
    };
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(format!("bad status line {line:?}"));
    }
    let status: u16 = code.parse().map_err(|_| format!("bad status line {line:?}"))?;
    let body = match got.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) if read_body => got[i + 4..].to_vec(),
        _ => Vec::new(),
    };
    Ok((status, body))
}

/// Where the shell finds JWT keys, besides the secret (see [`crate::app::AuthSettings`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JwtSources {
    /// HS256 secret (raw bytes).
    pub hs256_secret: Option<Vec<u8>>,
    /// JWKS documents read from files at start.
    pub jwks_files: Vec<Vec<u8>>,
    /// A JWKS URL fetched at start and every [`jwks_refresh`](Self::jwks_refresh).
    pub jwks_url: Option<HttpUrl>,
    /// How often the JWKS URL is fetched again.
    pub jwks_refresh: Duration,
}

impl JwtSources {
    /// The keys of the secret, the files and `fetched` (the URL's last document, if any).
    pub fn keys(&self, fetched: Option<&[u8]>) -> Result<whep_core::auth::JwtKeys, String> {
        let mut keys = whep_core::auth::JwtKeys::new();
        if let Some(s) = &self.hs256_secret {
            keys.add_hs256(s);
        }
        for f in &self.jwks_files {
            keys.add_jwks(f)?;
        }
        if let Some(doc) = fetched {
            keys.add_jwks(doc)?;
        }
        Ok(keys)
    }
}

/// Fetches `sources`' JWKS URL now and then every [`JwtSources::jwks_refresh`], handing the
/// keys (with the secret's and the files') to `deliver`, until `running` says false (checked
/// every second). A failed fetch keeps the keys there are. Blocking: run it on a thread of its
/// own.
pub fn fetch_jwks_forever(
    sources: &JwtSources,
    deliver: impl Fn(whep_core::auth::JwtKeys),
    running: impl Fn() -> bool,
) {
    let Some(url) = &sources.jwks_url else { return };
    loop {
        match fetch(url, Duration::from_secs(10)) {
            Ok(doc) => match sources.keys(Some(&doc)) {
                Ok(keys) => {
                    tracing::info!(%url, keys = keys.len(), "JWKS fetched");
                    deliver(keys);
                }
                Err(e) => {
                    tracing::warn!(%url, error = %e, "JWKS unusable; keeping the keys there are")
                }
            },
            Err(e) => {
                tracing::warn!(%url, error = %e, "JWKS fetch failed; keeping the keys there are")
            }
        }
        let mut waited = Duration::ZERO;
        while waited < sources.jwks_refresh {
            if !running() {
                return;
            }
            // This thread's job is to wait.
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(Duration::from_secs(1));
            waited += Duration::from_secs(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = HttpUrl::parse("http://127.0.0.1:9000/auth?x=1").expect("url");
        assert_eq!((u.host.as_str(), u.port, u.path.as_str()), ("127.0.0.1", 9000, "/auth?x=1"));
        let u = HttpUrl::parse("http://auth.local").expect("url");
        assert_eq!((u.port, u.path.as_str()), (80, "/"));
        let u = HttpUrl::parse("http://[::1]:81/a").expect("url");
        assert_eq!((u.host.as_str(), u.port), ("[::1]", 81));
        assert!(HttpUrl::parse("https://x/").is_err());
        assert!(HttpUrl::parse("http://u:p@x/").is_err());
        assert!(HttpUrl::parse("http:///a").is_err());
        assert!(HttpUrl::parse("http://x:http/").is_err());
    }
}
