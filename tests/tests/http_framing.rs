//! HTTP/1.1 framing and routing over raw TCP: a `Host` header cannot steer routing, transfer
//! codings a server does not implement cannot smuggle a second request, conflicting
//! `Content-Length`s are refused, and pipelined requests are all answered, in order. Written
//! once, instantiated per runtime binary by `suite!`.

use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::time::Duration;

use whep_e2e::http::{self, Response};
use whep_e2e::{ADMIN_TOKEN, Server};

/// How long a case waits for an answer, or for the connection to close.
const WAIT: Duration = Duration::from_secs(10);

/// A server with no stream and no FFmpeg.
fn server(bin: &str) -> Server {
    Server::start(bin, &["--no-demo"])
}

/// Writes `bytes` in one write on a fresh connection and reads every response until the
/// connection closes (at most `max`). Returns the responses and whether the connection was
/// closed (rather than left open and silent, or broken mid-response).
fn exchange(server: &Server, bytes: &[u8], max: usize) -> (Vec<Response>, bool) {
    let mut stream = TcpStream::connect(server.http).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    // A server may close before reading all of a refused request; the answer still counts.
    let _ = stream.write_all(bytes);
    let (responses, ended) = http::read_responses(&stream, max);
    let closed = match ended {
        None => false,
        Some(e) => matches!(e.kind(), ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset),
    };
    (responses, closed)
}

fn is_metrics(r: &Response) -> bool {
    r.text().contains("whep_requests_total")
}

/// A `Host` with a path, query or fragment in it is refused, never routed on: the route is the
/// request target, and only the request target.
fn host_cannot_route(bin: &str) {
    let server = server(bin);
    let auth = format!("Authorization: Bearer {ADMIN_TOKEN}\r\n");
    let cases = [
        ("127.0.0.1/metrics?", ""),
        ("x/api/streams?", auth.as_str()),
        ("x#y", ""),
        ("x?y", ""),
        ("x/", ""),
    ];
    for (host, extra) in cases {
        let req =
            format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n");
        let (responses, _) = exchange(&server, req.as_bytes(), 2);
        let [r] = responses.as_slice() else {
            panic!("Host {host:?}: {} responses: {responses:?}", responses.len())
        };
        assert_eq!(r.status, 400, "Host {host:?}: {} {}", r.status, r.text());
        assert!(r.text().contains("Host"), "Host {host:?}: {}", r.text());
        assert!(!is_metrics(r), "Host {host:?} reached /metrics");
    }
    // Two Host fields are refused as well (RFC 9112 §3.2).
    let req = "GET /healthz HTTP/1.1\r\nHost: x\r\nHost: y\r\nConnection: close\r\n\r\n";
    let (responses, _) = exchange(&server, req.as_bytes(), 2);
    assert_eq!(responses.first().map(|r| r.status), Some(400), "two Hosts: {responses:?}");

    // Ordinary hosts still work: a name, an address with a port, IPv6, and none (HTTP/1.0).
    for host in ["x", "127.0.0.1:8080", "[::1]:80", "example.com."] {
        let req = format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let (responses, _) = exchange(&server, req.as_bytes(), 2);
        assert_eq!(responses.first().map(|r| r.status), Some(200), "Host {host:?}");
        assert_eq!(responses[0].text(), "ok\n");
    }
    let (responses, _) = exchange(&server, b"GET /healthz HTTP/1.0\r\n\r\n", 2);
    assert_eq!(responses.first().map(|r| r.status), Some(200), "HTTP/1.0 without Host");
}

/// A transfer coding the server does not implement (or a list it must not accept) is refused
/// with 400 or 501 and the connection closed: the bytes after the head never become a second,
/// smuggled request.
fn transfer_coding_cannot_smuggle(bin: &str) {
    let server = server(bin);
    let smuggled = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let codings: [&[&str]; 6] = [
        &["gzip, chunked"],
        &["chunked, identity"],
        &["xchunked"],
        &["chunked", "identity"],
        &["identity", "chunked"],
        &["chunked", "chunked"],
    ];
    for lines in codings {
        let mut req =
            String::from("POST /whep/ext HTTP/1.1\r\nHost: x\r\nContent-Type: application/sdp\r\n");
        for l in lines {
            req.push_str(&format!("Transfer-Encoding: {l}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(smuggled);
        let (responses, closed) = exchange(&server, req.as_bytes(), 3);
        let statuses: Vec<u16> = responses.iter().map(|r| r.status).collect();
        assert!(
            responses.iter().all(|r| !is_metrics(r)),
            "Transfer-Encoding {lines:?}: the body was answered as a request: {statuses:?}"
        );
        assert_eq!(responses.len(), 1, "Transfer-Encoding {lines:?}: {statuses:?}");
        assert!([400, 501].contains(&statuses[0]), "Transfer-Encoding {lines:?}: {statuses:?}");
        assert!(closed, "Transfer-Encoding {lines:?}: connection left open after {statuses:?}");
    }
}

/// Two different lengths (two fields, or a list) are refused: which one a proxy in front
/// used is unknowable.
fn conflicting_lengths(bin: &str) {
    let server = server(bin);
    let smuggled = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    for lengths in [&["5", "6"][..], &["6", "5"], &["5, 6"], &["5", "5, 6"]] {
        let mut req =
            String::from("POST /whep/ext HTTP/1.1\r\nHost: x\r\nContent-Type: application/sdp\r\n");
        for l in lengths {
            req.push_str(&format!("Content-Length: {l}\r\n"));
        }
        req.push_str("\r\nhello!");
        req.push_str(smuggled);
        let (responses, closed) = exchange(&server, req.as_bytes(), 3);
        let statuses: Vec<u16> = responses.iter().map(|r| r.status).collect();
        assert!(responses.iter().all(|r| !is_metrics(r)), "Content-Length {lengths:?}");
        assert_eq!(statuses, [400], "Content-Length {lengths:?}");
        assert!(closed, "Content-Length {lengths:?}: connection left open");
    }
}

/// Requests written back to back in one write on a keep-alive connection are all answered,
/// in order, bodies framed by their `Content-Length`.
fn pipelining(bin: &str) {
    let server = server(bin);
    let req = [
        "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        "POST /whep/none HTTP/1.1\r\nHost: x\r\nContent-Type: application/sdp\r\n\
         Content-Length: 5\r\n\r\nhello",
        "GET /streams HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ]
    .concat();
    let (responses, closed) = exchange(&server, req.as_bytes(), 5);
    let statuses: Vec<u16> = responses.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 404, 200, 200], "{responses:?}");
    assert_eq!(responses[0].text(), "ok\n");
    assert!(responses[1].text().contains("stream not found"), "{}", responses[1].text());
    assert_eq!(responses[2].text(), "[]");
    assert!(is_metrics(&responses[3]));
    assert!(closed, "connection left open after `Connection: close`");

    // The connection stays usable between requests written one at a time.
    let mut stream = TcpStream::connect(server.http).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    for _ in 0..3 {
        stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
        let (responses, ended) = http::read_responses(&stream, 1);
        assert_eq!(responses.first().map(|r| r.status), Some(200), "{ended:?}");
    }
}

whep_e2e::runtime_suite!(
    host_cannot_route,
    transfer_coding_cannot_smuggle,
    conflicting_lengths,
    pipelining,
);
