//! HTTP glue: hyper 1 on smol ([`serve`]) and `http_types::Request` ⇄ [`WhepRequest`]
//! ([`handle`], for http-types applications).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use http_types::{Request, Response, StatusCode};
use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tracing::debug;
use whep_core::{WhepRequest, WhepResponse};
use whep_server::tls::Tls;

use crate::Whep;

/// How long a client may take to send its request head (the connection is closed beyond),
/// and then its body (408).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head hyper buffers (request line and headers); beyond: 431.
const MAX_HEAD: usize = 64 * 1024;
/// Connections served at once by [`serve`]; beyond, new ones are closed at once.
const MAX_CONNECTIONS: usize = 256;

/// Answers one request: every application route, or with `app_routes` false the WHEP routes
/// only. The body is read up to the configured limit; a longer body is answered with 413
/// without being read further. The client address for the rate limits is the request's
/// `peer_addr` (async-h1, tide and others set it).
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
    wreq.wall_time = Some(SystemTime::now());
    for (name, values) in req.iter() {
        for value in values.iter() {
            wreq.headers.push((name.as_str().to_owned(), value.as_str().to_owned()));
        }
    }
    let resp = if app_routes {
        whep.handle_request(wreq).await
    } else if !whep_server::app::plain_host(&wreq) {
        // The target came from a URL built with `Host`; see `plain_host` (the application
        // routes check it in the core).
        let mut resp = Response::new(StatusCode::BadRequest);
        resp.set_body("bad Host header\n");
        return resp;
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

/// Accepts HTTP/1.1 connections on `listener` until `shutdown` completes; connections in flight
/// are then finished gracefully. hyper does the framing (keep-alive, pipelining, chunked
/// bodies; a transfer coding or `Content-Length` it cannot trust is refused with 400 and the
/// connection closed). At most [`MAX_CONNECTIONS`] are served at once; a head must arrive
/// within [`REQUEST_TIMEOUT`] and fit in [`MAX_HEAD`]. With `tls`, each connection is a TLS
/// one whose handshake (with the configuration current when it was accepted) must end within
/// [`REQUEST_TIMEOUT`].
pub(crate) async fn serve(
    whep: Whep,
    listener: smol::net::TcpListener,
    tls: Option<Tls>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    enum Next {
        Stop,
        Conn(io::Result<(smol::net::TcpStream, SocketAddr)>),
    }
    let mut shutdown = std::pin::pin!(shutdown);
    let active = Arc::new(AtomicUsize::new(0));
    // Never sent on: dropping it on return wakes every connection's `recv` to shut down.
    let (_stop, stopped) = smol::channel::bounded::<()>(1);
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
        let (whep, active, stopped) = (whep.clone(), Arc::clone(&active), stopped.clone());
        let acceptor = tls.as_ref().map(|tls| futures_rustls::TlsAcceptor::from(tls.config()));
        smol::spawn(async move {
            match acceptor {
                None => connection(whep, stream, peer, stopped).await,
                Some(acceptor) => {
                    let handshake =
                        smol::future::or(async { Some(acceptor.accept(stream).await) }, async {
                            smol::Timer::after(REQUEST_TIMEOUT).await;
                            None
                        });
                    match handshake.await {
                        Some(Ok(stream)) => connection(whep, stream, peer, stopped).await,
                        Some(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                        None => debug!(%peer, "TLS handshake too slow"),
                    }
                }
            }
            active.fetch_sub(1, Ordering::AcqRel);
        })
        .detach();
    }
}

/// Serves one connection's requests until it closes, or finishes the one in flight once the
/// listener stops.
async fn connection<S>(
    whep: Whep,
    stream: S,
    peer: SocketAddr,
    stopped: smol::channel::Receiver<()>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let whep = whep.clone();
        async move { Ok::<_, Infallible>(call_http(&whep, req, peer).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(SmolTimer)
        .header_read_timeout(REQUEST_TIMEOUT)
        .max_header_size(MAX_HEAD)
        .serve_connection(SmolIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let ended = smol::future::or(async { Some(conn.as_mut().await) }, async {
        let _ = stopped.recv().await;
        None
    })
    .await;
    match ended {
        Some(Ok(())) => {}
        Some(Err(e)) => debug!(%peer, error = %e, "connection ended"),
        None => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Answers one request that hyper framed: the body is read up to the configured limit (413
/// beyond, without reading further) within [`REQUEST_TIMEOUT`] (408 beyond).
async fn call_http(
    whep: &Whep,
    req: http::Request<hyper::body::Incoming>,
    peer: SocketAddr,
) -> http::Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let limit = whep.max_body();
    let read =
        smol::future::or(async { Some(Limited::new(body, limit + 1).collect().await) }, async {
            smol::Timer::after(REQUEST_TIMEOUT).await;
            None
        });
    let body = match read.await {
        Some(Ok(collected)) => collected.to_bytes().to_vec(),
        Some(Err(e)) => {
            debug!(%peer, error = %e, "request body not read");
            if !e.is::<http_body_util::LengthLimitError>() {
                return plain(http::StatusCode::BAD_REQUEST, "malformed request body");
            }
            // Over the limit: hand the core an over-long body so that the refusal (413) and
            // its counting stay in one place.
            vec![0; limit + 1]
        }
        None => return plain(http::StatusCode::REQUEST_TIMEOUT, "request body too slow"),
    };
    let resp = match WhepRequest::from_http(&parts, body, Some(peer.ip())) {
        Ok(req) => whep.handle_request(req.with_wall_time(SystemTime::now())).await,
        Err(resp) => resp,
    };
    resp.into_http().map(|body| Full::new(Bytes::from(body)))
}

fn plain(status: http::StatusCode, text: &'static str) -> http::Response<Full<Bytes>> {
    let mut out = http::Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *out.status_mut() = status;
    out
}

/// A smol (futures-io) stream as hyper's IO: reads go through a small buffer of our own and
/// are copied into hyper's (hyper's buffer may be uninitialised, and filling it in place would
/// take `unsafe`); a copy of a request's bytes costs nothing next to answering it.
struct SmolIo<S> {
    inner: S,
    scratch: Box<[u8]>,
}

impl<S> SmolIo<S> {
    fn new(inner: S) -> Self {
        Self { inner, scratch: vec![0; 8 * 1024].into_boxed_slice() }
    }
}

impl<S: AsyncRead + Unpin> hyper::rt::Read for SmolIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let room = buf.remaining().min(this.scratch.len());
        let n =
            std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, &mut this.scratch[..room]))?;
        buf.put_slice(&this.scratch[..n]);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> hyper::rt::Write for SmolIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

/// hyper's timer (head timeouts) over async-io's.
#[derive(Debug, Clone, Copy)]
struct SmolTimer;

impl hyper::rt::Timer for SmolTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(SmolSleep(smol::Timer::after(duration)))
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(SmolSleep(smol::Timer::at(deadline)))
    }
}

struct SmolSleep(smol::Timer);

impl Future for SmolSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.get_mut().0).poll(cx).map(drop)
    }
}

impl hyper::rt::Sleep for SmolSleep {}

#[cfg(test)]
mod tests {
    use super::*;

    /// An http-types server builds the URL from `Host`: such a request is refused on both
    /// handlers rather than routed on what `Host` smuggled into the URL.
    #[test]
    fn handle_refuses_a_host_with_a_path() {
        smol::block_on(async {
            let config = whep_server::app::ServerConfig {
                udp_bind: SocketAddr::from(([127, 0, 0, 1], 0)),
                ..Default::default()
            };
            let whep = Whep::start(config).expect("engine");
            let request = || {
                let url = http_types::Url::parse("http://x/metrics?/healthz").expect("url");
                let mut req = Request::new(http_types::Method::Get, url);
                req.insert_header("Host", "x/metrics?");
                req
            };
            assert_eq!(whep.handle(request()).await.status(), StatusCode::BadRequest);
            assert_eq!(whep.handle_whep(request()).await.status(), StatusCode::BadRequest);
            let mut ok = request();
            ok.insert_header("Host", "x");
            assert_eq!(whep.handle(ok).await.status(), StatusCode::Ok);
            whep.shutdown().await;
        });
    }
}
