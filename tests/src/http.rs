//! A minimal blocking HTTP/1.1 client over [`TcpStream`], enough for end-to-end tests.
//!
//! Every request opens a fresh connection and sends `Connection: close`. The response body is
//! read by `Transfer-Encoding: chunked`, by `Content-Length`, or until EOF, in that order of
//! preference. Reads and writes time out after [`TIMEOUT`]. A server registered with [`trust`]
//! is spoken to over TLS (rustls, trusting the CA given there), so that [`request`] and
//! everything built on it (the str0m viewer's POST and DELETE) work against an HTTPS server.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

/// Connect, read and write timeout of every request.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Longest status line, header line or chunk-size line accepted.
const MAX_LINE: usize = 64 * 1024;

/// A complete HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code, e.g. 201.
    pub status: u16,
    /// Header fields in the order received, names as sent by the server.
    pub headers: Vec<(String, String)>,
    /// The body, with any chunked transfer coding removed.
    pub body: Vec<u8>,
}

impl Response {
    /// The value of the first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The values of all headers named `name` (case-insensitive), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The body as text; invalid UTF-8 is replaced with U+FFFD.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request to `addr` and reads the whole response.
///
/// `target` is the request target, e.g. `/whep/demo`. `Host`, `Connection: close` and
/// `Content-Length` (also when 0) are always sent; entries of `headers` with one of these names
/// are ignored. Informational (1xx) responses are skipped.
pub fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Response> {
    if [method, target].iter().any(|s| s.is_empty() || s.contains(char::is_whitespace)) {
        return Err(invalid_input("method and target must be non-empty and without whitespace"));
    }
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        if ["host", "connection", "content-length"].iter().any(|n| name.eq_ignore_ascii_case(n)) {
            continue;
        }
        if [name, value].iter().any(|s| s.contains(['\r', '\n'])) {
            return Err(invalid_input("header names and values must not contain CR or LF"));
        }
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));

    let stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let mut conn: Box<dyn ReadWrite> = match trusted(addr) {
        Some(config) => Box::new(tls_stream(config, addr, stream)?),
        None => Box::new(stream),
    };
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)?;
    conn.flush()?;

    let mut reader = BufReader::new(conn);
    let is_head = method.eq_ignore_ascii_case("HEAD");
    loop {
        let (status, headers) = read_head(&mut reader)?;
        if (100..200).contains(&status) && status != 101 {
            tracing::debug!(status, "skipping informational response");
            continue;
        }
        let mut response = Response { status, headers, body: Vec::new() };
        if !is_head && status != 204 && status != 304 && status >= 200 {
            response.body = read_body(&mut reader, &response)?;
        }
        tracing::debug!(method, target, status, len = response.body.len(), "HTTP response");
        return Ok(response);
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Servers spoken to over TLS, with the client configuration for each.
static TRUSTED: Mutex<Vec<(SocketAddr, Arc<rustls::ClientConfig>)>> = Mutex::new(Vec::new());

/// Speaks TLS to `addr` from now on (in [`request`] and its users), trusting the CA
/// certificates in `ca_pem` (and nothing else) for it. The server must be named by an IP
/// address in its certificate (`subjectAltName=IP:…`).
///
/// # Panics
///
/// When `ca_pem` holds no certificate.
pub fn trust(addr: SocketAddr, ca_pem: &[u8]) {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.expect("a PEM certificate")).expect("a CA certificate");
    }
    assert!(!roots.is_empty(), "no CA certificate to trust");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut trusted = TRUSTED.lock().unwrap_or_else(PoisonError::into_inner);
    trusted.retain(|(a, _)| *a != addr);
    trusted.push((addr, Arc::new(config)));
}

fn trusted(addr: SocketAddr) -> Option<Arc<rustls::ClientConfig>> {
    let trusted = TRUSTED.lock().unwrap_or_else(PoisonError::into_inner);
    trusted.iter().find(|(a, _)| *a == addr).map(|(_, c)| Arc::clone(c))
}

fn tls_stream(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    stream: TcpStream,
) -> io::Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let name = ServerName::IpAddress(addr.ip().into());
    let conn = rustls::ClientConnection::new(config, name).map_err(io::Error::other)?;
    Ok(rustls::StreamOwned::new(conn, stream))
}

/// Makes a TLS handshake with `addr` (registered with [`trust`]) and returns the certificate
/// chain the server presented, leaf first (DER); `Err` when the handshake fails, for example
/// because the server's certificate is not trusted.
pub fn peer_certificates(addr: SocketAddr) -> io::Result<Vec<Vec<u8>>> {
    let config = trusted(addr).ok_or_else(|| invalid_input("no TLS trust for this address"))?;
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let mut tls = tls_stream(config, addr, stream)?;
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    let certs = tls.conn.peer_certificates().unwrap_or_default();
    Ok(certs.iter().map(|c| c.to_vec()).collect())
}

/// Writes `bytes` as they are (a hand-made, possibly broken request) on a fresh connection and
/// reads one response. Write errors are ignored (a server may close before reading all of an
/// over-long request and still have answered); `Err` when no response came within `wait`.
pub fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> io::Result<Response> {
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(wait))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let _ = (&stream).write_all(bytes);
    read_response(&stream)
}

/// Reads one response (skipping 1xx) from a connection whose request was written already.
pub fn read_response(stream: &TcpStream) -> io::Result<Response> {
    let mut reader = BufReader::new(stream);
    loop {
        let (status, headers) = read_head(&mut reader)?;
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        let mut response = Response { status, headers, body: Vec::new() };
        if status != 204 && status != 304 && status >= 200 {
            response.body = read_body(&mut reader, &response)?;
        }
        return Ok(response);
    }
}

/// Reads the responses on one connection, in order, until it closes or `max` have arrived
/// (a request was written already, possibly several pipelined). Informational (1xx) responses
/// are skipped. The error, if any, says why reading stopped before `max`: `UnexpectedEof` for
/// a clean close between responses, a timeout for a connection left open and silent.
pub fn read_responses(stream: &TcpStream, max: usize) -> (Vec<Response>, Option<io::Error>) {
    let mut reader = BufReader::new(stream);
    let mut out = Vec::new();
    while out.len() < max {
        let (status, headers) = match read_head(&mut reader) {
            Ok(head) => head,
            Err(e) => return (out, Some(e)),
        };
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        let mut response = Response { status, headers, body: Vec::new() };
        if status != 204 && status != 304 && status >= 200 {
            match read_body(&mut reader, &response) {
                Ok(body) => response.body = body,
                Err(e) => return (out, Some(e)),
            }
        }
        out.push(response);
    }
    (out, None)
}

/// `GET target` without extra headers.
pub fn get(addr: SocketAddr, target: &str) -> io::Result<Response> {
    request(addr, "GET", target, &[], &[])
}

fn invalid_input(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn invalid_data(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// One line without its line ending (CRLF or bare LF). Errors on EOF before any byte.
fn read_line(reader: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    let n = reader.by_ref().take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"));
    }
    if line.last() != Some(&b'\n') {
        return Err(invalid_data(format!("line longer than {MAX_LINE} bytes or truncated")));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| invalid_data("line is not UTF-8".to_owned()))
}

/// The status line and the header fields.
fn read_head(reader: &mut impl BufRead) -> io::Result<(u16, Vec<(String, String)>)> {
    let line = read_line(reader)?;
    let mut parts = line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(invalid_data(format!("bad status line {line:?}")));
    };
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(invalid_data(format!("bad status line {line:?}")));
    }
    let status = code.parse().map_err(|_| invalid_data(format!("bad status line {line:?}")))?;

    let mut headers = Vec::new();
    loop {
        let line = read_line(reader)?;
        if line.is_empty() {
            return Ok((status, headers));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(invalid_data(format!("bad header line {line:?}")));
        };
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
}

fn read_body(reader: &mut impl BufRead, response: &Response) -> io::Result<Vec<u8>> {
    let chunked = response.header_all("transfer-encoding").iter().any(|v| {
        v.rsplit(',').next().is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
    });
    if chunked {
        return read_chunked(reader);
    }
    let mut body = Vec::new();
    match response.header("content-length") {
        Some(len) => {
            let len: u64 =
                len.parse().map_err(|_| invalid_data(format!("bad Content-Length {len:?}")))?;
            reader.take(len).read_to_end(&mut body)?;
            if (body.len() as u64) < len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("body ended after {} of {len} bytes", body.len()),
                ));
            }
        }
        None => {
            reader.read_to_end(&mut body)?;
        }
    }
    Ok(body)
}

fn read_chunked(reader: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = read_line(reader)?;
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = u64::from_str_radix(size, 16)
            .map_err(|_| invalid_data(format!("bad chunk size line {line:?}")))?;
        if size == 0 {
            // Trailer fields, up to the empty line.
            while !read_line(reader)?.is_empty() {}
            return Ok(body);
        }
        let before = body.len();
        reader.take(size).read_to_end(&mut body)?;
        if ((body.len() - before) as u64) < size {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "chunk truncated"));
        }
        if !read_line(reader)?.is_empty() {
            return Err(invalid_data("chunk not followed by CRLF".to_owned()));
        }
    }
}

/// Writes `bytes` as [`raw`] does, from a connection whose local address is `local` (another
/// loopback address such as 127.0.0.2: a second client to the per-client limits).
pub fn raw_from(
    local: std::net::Ipv4Addr,
    addr: SocketAddr,
    bytes: &[u8],
    wait: Duration,
) -> io::Result<Response> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};
    let SocketAddr::V4(to) = addr else {
        return Err(invalid_input("raw_from connects to IPv4 addresses only"));
    };
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(std::net::SocketAddrV4::new(local, 0)),
    )?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(to))?;
    let stream = TcpStream::from(fd);
    stream.set_read_timeout(Some(wait))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let _ = (&stream).write_all(bytes);
    read_response(&stream)
}
