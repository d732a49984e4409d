//! Mounting the WHEP routes in an axum application.
//!
//! ```sh
//! cargo run -p whep-tokio --example axum
//! ```
//!
//! The application serves `/` itself and routes `/whep/{stream}` and `/whep/{stream}/{session}`
//! to [`Whep::whep_service`], a `tower::Service`. Use `route_service` (or `fallback_service`),
//! not `nest_service`: nesting strips the prefix the engine routes on. A viewer can use any WHEP
//! player with `http://127.0.0.1:8082/whep/demo`, or the engine's own player at
//! `http://127.0.0.1:8083/?stream=demo` (its WHEP calls go to that port).

use axum::Router;
use axum::routing::get;
use whep_server::app::StreamSpec;
use whep_tokio::{ServerConfig, Whep};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let config = ServerConfig { udp_bind: "127.0.0.1:3479".parse()?, ..Default::default() };
    let whep = Whep::start(config)?;
    whep.add_stream("demo", StreamSpec::demo()).await?;

    let app = Router::new()
        .route("/", get(|| async { "an axum app with WHEP at /whep/{stream}\n" }))
        .route_service("/whep/{stream}", whep.whep_service())
        .route_service("/whep/{stream}/{session}", whep.whep_service());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:8082").await?;

    let player = tokio::net::TcpListener::bind("127.0.0.1:8083").await?;
    let engine = whep.clone();
    tokio::spawn(async move { engine.serve(player, std::future::pending()).await });

    tracing::info!("WHEP endpoint http://127.0.0.1:8082/whep/demo");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    whep.shutdown().await;
    Ok(())
}
