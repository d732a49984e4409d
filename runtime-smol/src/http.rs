//! HTTP glue: `http_types::Request` ⇄ [`WhepRequest`], and an async-h1 listener.

use std::future::Future;
use std::io;
use std::time::Duration;

use http_types::{Request, Response, StatusCode};
use smol::io::AsyncReadExt;
use tracing::debug;
use whep_core::{WhepRequest, WhepResponse};

use crate::Whep;

/// Answers one request: every application route, or with `app_routes` false the WHEP routes
/// only. The body is read up to the configured limit; a longer body is answered with 413
/// without being read further.
pub(crate) async fn handle(whep: &Whep, mut req: Request, app_routes: bool) -> Response {
    let limit = whep.max_body();
    let mut body = Vec::new();
    let read = req.take_body().take(limit as u64 + 1).read_to_end(&mut body).await;
    if let Err(e) = read {
        debug!(error = %e, "request body not read");
        // Hand the core an over-long body so that the refusal (413) and its counting stay in
        // one place.
        body = vec![0; limit + 1];
    }
    let url = req.url();
    let target = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    let mut wreq = WhepRequest::new(req.method(), target).with_body(body);
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
/// finish on their own tasks.
pub(crate) async fn serve(
    whep: Whep,
    listener: smol::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    enum Next {
        Stop,
        Conn(io::Result<(smol::net::TcpStream, std::net::SocketAddr)>),
    }
    let mut shutdown = std::pin::pin!(shutdown);
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
        let whep = whep.clone();
        smol::spawn(async move {
            let serve = async_h1::accept(stream, |req| {
                let whep = whep.clone();
                async move { Ok(handle(&whep, req, true).await) }
            });
            if let Err(e) = serve.await {
                debug!(%peer, error = %e, "connection ended");
            }
        })
        .detach();
    }
}
