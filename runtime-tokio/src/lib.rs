//! [whep-core] on tokio. The engine is `whep_server::driver`'s event loop over [`TokioRuntime`]
//! (tokio sockets, timer, tasks and `tokio::process` children); this crate adds the HTTP side:
//! a service for hyper and tower, and an HTTP listener.
//!
//! Use it two ways:
//!
//! - **embedded** in a tokio service: [`Whep::start`] on the running runtime, manage streams
//!   with [`Engine::add_stream`] and friends, [`Engine::subscribe`] to [`Event`]s, and mount
//!   [`Whep::service`] (a [`tower_service::Service`] and a [`hyper::service::Service`]) inside
//!   your own hyper or axum application, or let [`Whep::serve`] run an HTTP listener;
//! - **standalone**: the `whepd` binary of this crate.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use whep_tokio::{ServerConfig, Whep};
//! use whep_server::app::StreamSpec;
//!
//! let mut config = ServerConfig::default();
//! config.core.host_candidates = vec!["127.0.0.1:3478".parse().unwrap()];
//! let whep = Whep::start(config)?;
//! whep.add_stream("demo", StreamSpec::demo()).await.expect("valid stream");
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! whep.serve(listener, std::future::pending()).await?;
//! # Ok(()) }
//! ```
//!
//! [whep-core]: whep_core
//! [`Event`]: whep_core::Event

use std::future::Future;
use std::io;
use std::ops::Deref;

pub use whep_server::app::{AddError, ServerConfig};
pub use whep_server::driver::{Engine, Subscription};
pub use whep_server::tls::{Tls, TlsError, TlsFiles};

mod http;
mod runtime;

pub mod cli;

pub use http::{ClientAddr, WhepService};
pub use runtime::TokioRuntime;

/// A handle to a running engine on tokio: an [`Engine`] (streams, events, requests, shutdown;
/// reached through `Deref`) plus the HTTP services. Cheap to clone; the engine shuts down when
/// [`Engine::shutdown`] is called or the last handle is dropped.
#[derive(Debug, Clone)]
pub struct Whep {
    engine: Engine<TokioRuntime>,
}

impl Deref for Whep {
    type Target = Engine<TokioRuntime>;

    fn deref(&self) -> &Self::Target {
        &self.engine
    }
}

impl Whep {
    /// Binds the viewer socket and starts the engine on the current tokio runtime.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime.
    pub fn start(mut config: ServerConfig) -> io::Result<Self> {
        if config.core.rng_seed == [0; 32] {
            getrandom::fill(&mut config.core.rng_seed).map_err(io::Error::other)?;
        }
        let engine =
            Engine::start(TokioRuntime::current(), config, &whep_server::default_routes())?;
        Ok(Self { engine })
    }

    /// The engine, for code generic over runtimes.
    pub fn engine(&self) -> &Engine<TokioRuntime> {
        &self.engine
    }

    /// An HTTP service for every application route, to mount in a hyper or axum application.
    pub fn service(&self) -> WhepService {
        WhepService::new(self.clone(), true)
    }

    /// An HTTP service for the WHEP routes only.
    pub fn whep_service(&self) -> WhepService {
        WhepService::new(self.clone(), false)
    }

    /// Serves [`Whep::service`] on `listener` (HTTP/1.1) until `shutdown` completes.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        http::serve(self.service(), listener, None, shutdown).await
    }

    /// Serves [`Whep::service`] over HTTPS (HTTP/1.1 over TLS) on `listener` until `shutdown`
    /// completes. Each connection is served with `tls`'s configuration of the moment it is
    /// accepted: [`Tls::reload`] or [`Tls::set`] changes the certificate for new connections
    /// without touching open ones or any viewer.
    pub async fn serve_tls(
        &self,
        listener: tokio::net::TcpListener,
        tls: Tls,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        http::serve(self.service(), listener, Some(tls), shutdown).await
    }
}

pub use whep_server::check_program;
