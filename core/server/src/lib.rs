//! The server shell around [`whep_core`]: everything of a WHEP server that is not the pure
//! state machine, written once for every runtime. The core stays pure (no socket, process,
//! lock, thread or clock); the runtimes (tokio, smol, the blocking example) supply sockets,
//! timers and tasks; what they share lives here.
//!
//! - [`driver`]: the one event loop the async runtimes run, over a small
//!   [`Runtime`](driver::Runtime) trait (as quinn keeps its loop and runtime trait in `quinn`,
//!   outside `quinn-proto`), and the [`Engine`](driver::Engine) handle.
//! - [`app`]: the application routes every runtime serves (player page, `/metrics`, the admin
//!   API) and the serialisable stream specification.
//! - [`cli`]: `whepd`'s command line and configuration file, shared by every runtime's binary.
//! - [`dtls`]: the viewers' DTLS implementation (`--dtls dimpl|openssl`): the core's default
//!   dimpl, or OpenSSL's behind an adapter (feature `openssl-dtls`) for RSA client certificates.
//! - [`shard`]: the seat book the shards of one server share ([`whep_core::shard::Book`]),
//!   behind a mutex, kept out of the pure core.
//! - [`os`] (re-exported here): the operating-system helpers: FFmpeg children ([`command`],
//!   [`signal`], [`check_program`]), the sockets' setup ([`udp_state`]), dual-stack binds
//!   ([`os::bind_udp`], [`os::bind_tcp`]) and the default routes ([`default_routes`]).
//! - [`outbound`]: the one HTTP(S) client of the authorisation callback, the JWKS and the
//!   webhook.
//! - [`webhook`]: events POSTed as JSON to `--webhook-url` from a thread of their own.
//! - `fuzzing` (feature `fuzzing`): every fuzz target, the core's and the application routes'.
//!
//! `examples/blocking.rs` is `whepd` on plain std threads and sockets, with none of the async
//! driver: the template for a loop of one's own.

#![warn(missing_docs)]

pub mod app;
pub mod auth;
pub mod cli;
pub mod driver;
pub mod dtls;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod os;
pub mod outbound;
pub mod shard;
pub mod tls;
pub mod webhook;

pub use os::{
    ICE_TCP_SEND_BUFFER, SOCKET_BUFFER, check_program, command, default_route, default_routes,
    ice_tcp_setup, signal, udp_state, warn_ingest_overlap,
};
