//! [whep-core] on smol / async-io. The engine is `whep_server::driver`'s event loop over
//! [`SmolRuntime`] (`Async<UdpSocket>`, `async_io::Timer`, async-process children); this crate
//! adds the HTTP side: [`Whep::serve`] runs hyper's HTTP/1.1 server on smol, and
//! [`Whep::handle`] answers an `http_types::Request` for an http-types application with its own
//! server.
//!
//! The surface matches `whep-tokio`: start on an executor, manage streams, subscribe to events,
//! serve the routes or hand them over; the `whepd-smol` binary is `whepd` on this runtime.
//!
//! ```no_run
//! # fn demo() -> std::io::Result<()> {
//! use whep_server::app::{ServerConfig, StreamSpec};
//! use whep_smol::Whep;
//!
//! smol::block_on(async {
//!     let whep = Whep::start(ServerConfig::default())?;
//!     whep.add_stream("demo", StreamSpec::demo()).await.expect("valid stream");
//!     let listener = smol::net::TcpListener::bind("127.0.0.1:8080").await?;
//!     whep.serve(listener, std::future::pending()).await
//! })
//! # }
//! ```
//!
//! [whep-core]: whep_core

use std::future::Future;
use std::io;
use std::ops::Deref;
use std::sync::Arc;

pub use whep_server::app::{AddError, ServerConfig};
pub use whep_server::driver::{Engine, Subscription};
pub use whep_server::tls::{Tls, TlsError, TlsFiles};

mod http;
mod runtime;

pub mod cli;

pub use runtime::SmolRuntime;

/// A handle to a running engine on smol: an [`Engine`] (streams, events, requests, shutdown;
/// reached through `Deref`) plus the HTTP glue. Cheap to clone; the engine shuts down
/// when [`Engine::shutdown`] is called or the last handle is dropped.
#[derive(Debug, Clone)]
pub struct Whep {
    engine: Engine<SmolRuntime>,
}

impl Deref for Whep {
    type Target = Engine<SmolRuntime>;

    fn deref(&self) -> &Self::Target {
        &self.engine
    }
}

impl Whep {
    /// Binds the viewer socket and starts the engine on smol's global executor.
    pub fn start(config: ServerConfig) -> io::Result<Self> {
        Self::start_with(SmolRuntime::global(), config)
    }

    /// Binds the viewer socket and starts the engine on `executor` (which the application
    /// must run, e.g. with `executor.run(..)` on its threads).
    pub fn start_on(
        config: ServerConfig,
        executor: &Arc<smol::Executor<'static>>,
    ) -> io::Result<Self> {
        Self::start_with(SmolRuntime::on(executor), config)
    }

    fn start_with(runtime: SmolRuntime, mut config: ServerConfig) -> io::Result<Self> {
        if config.core.rng_seed == [0; 32] {
            getrandom::fill(&mut config.core.rng_seed).map_err(io::Error::other)?;
        }
        Ok(Self { engine: Engine::start(runtime, config, &whep_server::default_routes())? })
    }

    /// The engine, for code generic over runtimes.
    pub fn engine(&self) -> &Engine<SmolRuntime> {
        &self.engine
    }

    /// Answers an `http_types::Request` on every application route (player page, `/metrics`,
    /// admin API, WHEP): the handler to mount in an http-types application.
    pub async fn handle(&self, req: http_types::Request) -> http_types::Response {
        http::handle(self, req, true).await
    }

    /// Answers an `http_types::Request` on the WHEP routes only.
    pub async fn handle_whep(&self, req: http_types::Request) -> http_types::Response {
        http::handle(self, req, false).await
    }

    /// Serves every application route on `listener` (HTTP/1.1 by hyper, with keep-alive and
    /// pipelining) until `shutdown` completes; connections in flight are then finished.
    pub async fn serve(
        &self,
        listener: smol::net::TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        http::serve(self.clone(), listener, None, shutdown).await
    }

    /// Serves every application route over HTTPS (HTTP/1.1 over TLS, hyper's framing) on
    /// `listener` until `shutdown` completes. Each connection is served with `tls`'s
    /// configuration of the moment it is accepted: [`Tls::reload`] or [`Tls::set`] changes the
    /// certificate for new connections without touching open ones or any viewer.
    pub async fn serve_tls(
        &self,
        listener: smol::net::TcpListener,
        tls: Tls,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        http::serve(self.clone(), listener, Some(tls), shutdown).await
    }
}

pub use whep_server::check_program;
