//! Embedding whep-tokio in an existing tokio + hyper service.
//!
//! ```sh
//! cargo run -p whep-tokio --example embed_tokio
//! ```
//!
//! It starts the engine on the application's runtime, adds the demo stream (an FFmpeg test
//! pattern; needs `ffmpeg` on PATH), logs viewer and stream events, and serves two listeners:
//!
//! - `http://127.0.0.1:8081/`: the application's own hyper server, which answers `/hello` itself
//!   and hands `/whep/...` to [`Whep::whep_service`] (the WHEP routes only);
//! - `http://127.0.0.1:8080/`: the engine's own listener ([`Whep::serve`]) with the player page,
//!   `/metrics` and the admin API; open `http://127.0.0.1:8080/?stream=demo`. With
//!   `TLS_CERT` and `TLS_KEY` naming PEM files it serves HTTPS ([`Whep::serve_tls`]) and
//!   reloads them when they change.
//!
//! Ctrl-C closes every viewer, stops FFmpeg and exits.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use whep_core::Event;
use whep_server::app::StreamSpec;
use whep_tokio::{ServerConfig, Tls, TlsFiles, Whep};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("info").init();

    let mut config = ServerConfig { udp_bind: "127.0.0.1:3478".parse()?, ..Default::default() };
    config.core.max_viewers_per_stream = 4;
    let whep = Whep::start(config)?;
    whep.add_stream("demo", StreamSpec::demo()).await?;

    // Subscribe to what happens.
    let mut events = whep.subscribe();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            match event {
                Event::ViewerConnected { stream, session } => {
                    tracing::info!(%stream, %session, "app: a viewer is watching");
                }
                Event::ViewerLeft { stream, reason, .. } => {
                    tracing::info!(%stream, ?reason, "app: a viewer left");
                }
                Event::ProcessExited { stream, code, .. } => {
                    tracing::warn!(%stream, ?code, "app: FFmpeg exited");
                }
                _ => {}
            }
        }
    });

    // 1. Mounted in the application's own hyper server, next to its own routes.
    let app_listener = tokio::net::TcpListener::bind("127.0.0.1:8081").await?;
    let whep_routes = whep.whep_service();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = app_listener.accept().await else { continue };
            let whep_routes = whep_routes.clone();
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let whep_routes = whep_routes.clone();
                async move {
                    if req.uri().path().starts_with("/whep/") {
                        return Ok::<_, Infallible>(whep_routes.call_http(req).await);
                    }
                    Ok(hyper::Response::new(Full::new(Bytes::from_static(b"hello from the app\n"))))
                }
            });
            tokio::spawn(async move {
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc);
                if let Err(e) = conn.await {
                    tracing::debug!("connection: {e}");
                }
            });
        }
    });

    // 2. The engine's own listener, until Ctrl-C; then a clean shutdown.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match (std::env::var_os("TLS_CERT"), std::env::var_os("TLS_KEY")) {
        (Some(cert), Some(key)) => {
            let tls = Tls::from_files(TlsFiles { cert: cert.into(), key: key.into() })?;
            let watched = tls.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(whep_server::tls::WATCH_INTERVAL).await;
                    let tls = watched.clone();
                    let _ = tokio::task::spawn_blocking(move || tls.reload_if_changed()).await;
                }
            });
            tracing::info!("open https://127.0.0.1:8080/?stream=demo");
            whep.serve_tls(listener, tls, ctrl_c).await?;
        }
        _ => {
            tracing::info!("open http://127.0.0.1:8080/?stream=demo");
            whep.serve(listener, ctrl_c).await?;
        }
    }
    whep.shutdown().await;
    Ok(())
}
