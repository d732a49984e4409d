//! HTTP glue: `http_types::Request` ⇄ [`WhepRequest`], and an async-h1 listener.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_h1::server::ConnectionStatus;
use http_types::{Request, Response, StatusCode};
use smol::io::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;
use whep_core::{WhepRequest, WhepResponse};

use crate::Whep;

/// How long a client may take to send its request head (the connection is closed beyond),
/// and then its body (408).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once by [`serve`]; beyond, new ones are closed at once.
const MAX_CONNECTIONS: usize = 256;

/// Answers one request: every application route, or with `app_routes` false the WHEP routes
/// only. The body is read up to the configured limit; a longer body is answered with 413
/// without being read further. The client address for the rate limits is the request's
/// `peer_addr` (async-h1 through [`serve`], tide and others set it).
pub(crate) async fn handle(whep: &Whep, mut req: Request, app_routes: bool) -> Response {
    let limit = whep.max_body();
    let mut body = Vec::new();
    let mut reader = req.take_body().take(limit as u64 + 1);
    let read = smol::future::or(async { Some(reader.read_to_end(&mut body).await) }, async {
        smol::Timer::after(REQUEST_TIMEOUT).await;
        None
    });
    match read.await {
        Some(Ok(_)) => {}
        Some(Err(e)) => {
            debug!(error = %e, "request body not read");
            // Hand the core an over-long body so that the refusal (413) and its counting stay
            // in one place.
            body = vec![0; limit + 1];
        }
        None => {
            let mut resp = Response::new(StatusCode::RequestTimeout);
            resp.set_body("request body too slow\n");
            return resp;
        }
    }
    let client = req.peer_addr().and_then(|a| a.parse::<SocketAddr>().ok());
    let url = req.url();
    let target = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    let mut wreq = WhepRequest::new(req.method(), target).with_body(body);
    wreq.client = client.map(|a| a.ip());
    for (name, values) in req.iter() {
        for value in values.iter() {
            wreq.headers.push((name.as_str().to_owned(), value.as_str().to_owned()));
        }
    }
    let resp = if app_routes {
        whep.handle_request(wreq).await
    } else {
        whep.handle_whep_request(wreq).await
    };
    to_http_types(resp)
}

fn to_http_types(resp: WhepResponse) -> Response {
    let status = StatusCode::try_from(resp.code()).unwrap_or(StatusCode::InternalServerError);
    let mut out = Response::new(status);
    for (name, value) in &resp.headers {
        out.append_header(*name, value.as_str());
    }
    if !resp.body.is_empty() {
        // Headers first: `set_body` keeps an existing Content-Type.
        out.set_body(resp.body);
    }
    out
}

/// Accepts HTTP/1.1 connections on `listener` until `shutdown` completes. Connections in flight
/// finish on their own tasks. At most [`MAX_CONNECTIONS`] are served at once; a head must
/// arrive within [`REQUEST_TIMEOUT`] and fit in async-h1's 8 KiB (431 beyond).
pub(crate) async fn serve(
    whep: Whep,
    listener: smol::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    enum Next {
        Stop,
        Conn(io::Result<(smol::net::TcpStream, SocketAddr)>),
    }
    let mut shutdown = std::pin::pin!(shutdown);
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let next = smol::future::or(async { Next::Conn(listener.accept().await) }, async {
            (&mut shutdown).await;
            Next::Stop
        })
        .await;
        let (stream, peer) = match next {
            Next::Stop => return Ok(()),
            Next::Conn(Ok(c)) => c,
            // Running out of descriptors or a connection reset before accept: keep serving.
            Next::Conn(Err(e)) => {
                debug!(error = %e, "accept failed");
                smol::Timer::after(Duration::from_millis(50)).await;
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            debug!(%peer, "too many connections, closing a new one");
            continue;
        }
        let (whep, active) = (whep.clone(), Arc::clone(&active));
        smol::spawn(async move {
            connection(whep, stream, peer).await;
            active.fetch_sub(1, Ordering::AcqRel);
        })
        .detach();
    }
}

/// Serves one connection's requests. async-h1's own head timeout (60 s) cannot be set, so each
/// request gets [`REQUEST_TIMEOUT`] for its head and then twice that for its body, the answer
/// and discarding what is left of an over-long body; the connection is closed beyond.
async fn connection(whep: Whep, stream: smol::net::TcpStream, peer: SocketAddr) {
    let entered = Arc::new(AtomicBool::new(false));
    let endpoint = {
        let entered = Arc::clone(&entered);
        move |mut req: Request| {
            entered.store(true, Ordering::Release);
            req.set_peer_addr(Some(peer));
            let whep = whep.clone();
            async move { Ok(handle(&whep, req, true).await) }
        }
    };
    let mut server = async_h1::server::Server::new(stream.clone(), endpoint);
    loop {
        entered.store(false, Ordering::Release);
        let deadline = async {
            smol::Timer::after(REQUEST_TIMEOUT).await;
            if entered.load(Ordering::Acquire) {
                smol::Timer::after(2 * REQUEST_TIMEOUT).await;
            }
            None
        };
        match smol::future::or(async { Some(server.accept_one().await) }, deadline).await {
            Some(Ok(ConnectionStatus::KeepAlive)) => {}
            Some(Ok(ConnectionStatus::Close)) => return,
            Some(Err(e)) => {
                debug!(%peer, error = %e, "connection ended");
                if !entered.load(Ordering::Acquire) {
                    refuse_head(stream, &e).await;
                }
                return;
            }
            None => {
                debug!(%peer, "request too slow, closing the connection");
                return;
            }
        }
    }
}

/// async-h1 closes the connection without a word on a head it cannot decode; answer it first
/// (431 for an over-long head, 400 for a malformed one), so that the client learns why.
/// Transport errors (the connection is gone) get nothing.
async fn refuse_head(mut stream: smol::net::TcpStream, e: &http_types::Error) {
    if e.downcast_ref::<io::Error>().is_some() {
        return;
    }
    let (status, why) = if e.to_string().contains("Head byte length") {
        ("431 Request Header Fields Too Large", "request head too large\n")
    } else {
        ("400 Bad Request", "malformed request head\n")
    };
    let answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{why}",
        why.len()
    );
    let write = async {
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.flush().await;
    };
    smol::future::or(write, async {
        smol::Timer::after(Duration::from_secs(1)).await;
    })
    .await;
}
