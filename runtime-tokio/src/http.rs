//! HTTP glue: `http::Request` ⇄ [`WhepRequest`], a service for hyper and tower, and a listener.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;
use whep_core::{WhepRequest, WhepResponse};
use whep_server::tls::Tls;

use crate::Whep;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a client may take to send its request head, and then its body: 408 (body) or a
/// closed connection (head) beyond.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head hyper buffers (request line and headers); beyond: 431.
const MAX_HEAD: usize = 64 * 1024;
/// Connections served at once by [`serve`]; beyond, new ones are closed at once (each costs a
/// descriptor and a task until its head timeout).
pub(crate) const MAX_CONNECTIONS: usize = 256;

/// The address of a request's client, as a request extension: the key of the per-client rate
/// limits. [`Whep::serve`] adds it; an application that serves [`WhepService`] itself adds it
/// (for axum, from `ConnectInfo`) or the service falls back to a [`SocketAddr`] extension, and
/// without either only the global limits apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// The WHEP routes (and, from [`Whep::service`], the player page, `/metrics` and the admin API)
/// as an HTTP service.
///
/// It implements both [`tower_service::Service`] (mount it in axum with
/// `Router::fallback_service` or `nest_service`) and [`hyper::service::Service`] (serve it
/// with `hyper::server::conn::http1`). Request bodies are read up to the configured limit; a
/// longer body is answered with 413 without being read further.
#[derive(Debug, Clone)]
pub struct WhepService {
    whep: Whep,
    app_routes: bool,
}

impl WhepService {
    pub(crate) fn new(whep: Whep, app_routes: bool) -> Self {
        Self { whep, app_routes }
    }

    /// Answers one request.
    pub async fn call_http<B>(&self, req: http::Request<B>) -> http::Response<Full<Bytes>>
    where
        B: Body,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = req.into_parts();
        let limit = self.whep.max_body();
        let read = tokio::time::timeout(REQUEST_TIMEOUT, Limited::new(body, limit + 1).collect());
        let body = match read.await {
            Ok(Ok(collected)) => collected.to_bytes().to_vec(),
            Ok(Err(e)) => match over_limit(limit, e.as_ref()) {
                Some(body) => body,
                None => return plain(http::StatusCode::BAD_REQUEST, "malformed request body"),
            },
            Err(_) => return plain(http::StatusCode::REQUEST_TIMEOUT, "request body too slow"),
        };
        let client = parts
            .extensions
            .get::<ClientAddr>()
            .map(|c| c.0)
            .or_else(|| parts.extensions.get::<SocketAddr>().copied());
        let req = match WhepRequest::from_http(&parts, body, client.map(|a| a.ip())) {
            Ok(req) => req.with_wall_time(SystemTime::now()),
            Err(resp) => return to_http(resp),
        };
        let resp = if self.app_routes {
            self.whep.handle_request(req).await
        } else {
            self.whep.handle_whep_request(req).await
        };
        to_http(resp)
    }
}

/// For a body that could not be read: an over-long body (`limit` + 1 bytes, so that the core
/// answers 413 and counts it, in one place) when the limit was hit, `None` for a broken one
/// (a bad chunk, a connection gone), which gets 400.
fn over_limit(
    limit: usize,
    e: &(dyn std::error::Error + Send + Sync + 'static),
) -> Option<Vec<u8>> {
    debug!(error = %e, "request body not read");
    e.is::<http_body_util::LengthLimitError>().then(|| vec![0; limit + 1])
}

fn to_http(resp: WhepResponse) -> http::Response<Full<Bytes>> {
    resp.into_http().map(|body| Full::new(Bytes::from(body)))
}

fn plain(status: http::StatusCode, text: &'static str) -> http::Response<Full<Bytes>> {
    let mut out = http::Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *out.status_mut() = status;
    out
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Full<Bytes>>, Infallible>> + Send>>;

impl<B> tower_service::Service<http::Request<B>> for WhepService
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let svc = self.clone();
        Box::pin(async move { Ok(svc.call_http(req).await) })
    }
}

impl<B> hyper::service::Service<http::Request<B>> for WhepService
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, req: http::Request<B>) -> Self::Future {
        let svc = self.clone();
        Box::pin(async move { Ok(svc.call_http(req).await) })
    }
}

/// Accepts HTTP/1.1 connections on `listener` until `shutdown` completes; connections in flight
/// are then finished gracefully. At most [`MAX_CONNECTIONS`] are served at once; a head must
/// arrive within [`REQUEST_TIMEOUT`] and fit in 64 KiB. With `tls`, each connection is a TLS
/// one whose handshake (with the configuration current when it was accepted) must end within
/// [`REQUEST_TIMEOUT`].
pub(crate) async fn serve(
    service: WhepService,
    listener: TcpListener,
    tls: Option<Tls>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let mut shutdown = std::pin::pin!(shutdown);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Running out of descriptors or a connection reset before accept: keep serving.
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            debug!(%peer, "too many connections, closing a new one");
            drop(stream);
            continue;
        };
        let service = service.clone();
        let stop = stop_rx.clone();
        let acceptor = tls.as_ref().map(|tls| tokio_rustls::TlsAcceptor::from(tls.config()));
        tokio::spawn(async move {
            let _slot = slot;
            let Some(acceptor) = acceptor else {
                return connection(service, stream, peer, stop).await;
            };
            match tokio::time::timeout(REQUEST_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => connection(service, stream, peer, stop).await,
                Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => debug!(%peer, "TLS handshake too slow"),
            }
        });
    }
    let _ = stop_tx.send(true);
    Ok(())
}

/// Serves one connection's requests until it closes, or finishes the one in flight once the
/// listener stops.
async fn connection<S>(
    service: WhepService,
    stream: S,
    peer: SocketAddr,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: http::Request<_>| {
        req.extensions_mut().insert(ClientAddr(peer));
        let service = service.clone();
        async move { Ok::<_, Infallible>(service.call_http(req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT)
        .max_header_size(MAX_HEAD)
        .serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r { debug!(%peer, error = %e, "connection ended") },
        _ = async { let _ = stop.wait_for(|s| *s).await; } => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
