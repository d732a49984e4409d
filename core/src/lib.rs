//! A sans-IO WHEP egress core: WHEP sessions, SDP codec policy, port accounting, stream and viewer
//! lifecycle, and RTP fan-out over [str0m](https://docs.rs/str0m), as a deterministic state
//! machine.
//!
//! FFmpeg sends a stream's H264 video and Opus audio as RTP to two loopback ports (video on V,
//! audio on V+1). Browsers watch with WHEP: they POST an SDP offer and get an answer; the core
//! forwards every RTP packet to every viewer, SRTP-encrypted per viewer, over one shared UDP
//! socket.
//!
//! Comments that cite "the seed" mean the WebRTC egress subsystem of the Go media server this
//! crate re-implements: its routes, error statuses, per-stream cap, teardown order (viewers
//! first, then FFmpeg, then the ports) and FFmpeg output legs are kept where they say so, and
//! the differences are named there.
//!
//! # Words
//!
//! - A **stream** is one source of media: a supervised FFmpeg process (or an external feed)
//!   and its ingest ports ([`StreamId`], [`StreamConfig`]).
//! - A **viewer** is one watching player as the core keeps it (`viewer::Viewer`): its
//!   negotiated tracks, path, timers and counters. It is named by the [`SessionId`] of its
//!   **WHEP session**, the HTTP resource at `Location` that PATCH and DELETE address; "session"
//!   means that resource and its id, nothing else.
//! - A **peer** is only str0m's `Rtc` inside a viewer (its ICE-lite agent, DTLS and SRTP).
//! - [`Core`] is the state machine. The server shell (`whep-server`) drives it from a
//!   `Driver` task behind a cloneable `Engine` handle; each runtime crate's `Whep` is that
//!   handle plus its HTTP server.
//! - Configuration: [`CoreConfig`] (the state machine), [`ProcessConfig`] (how FFmpeg is
//!   supervised), [`StreamConfig`] (one stream) with its [`EgressConfig`] (the FFmpeg WebRTC
//!   output legs); in `whep-server`, `RoutesConfig` (application routes), `ServerConfig`
//!   (everything an engine needs to start), `StreamSpec` (a stream as written in a file or
//!   posted to the admin API) and `cli::Launch` (what `whepd`'s command line resolves to).
//!
//! # What this crate does not do
//!
//! It binds no socket, spawns no process, reads no clock, starts no thread, takes no lock and
//! parses no HTTP bytes. A runtime (tokio, smol, or a plain loop over std sockets) does all IO
//! and hands the results in as inputs; the core answers with outputs. Its normal dependencies
//! contain no async runtime, socket or process crate (CI checks this).
//!
//! The server shell around it lives in the crate `whep-server` (`core/server/`), written once
//! for every runtime: the event loop the async runtimes share over a small `Runtime` trait (as
//! quinn keeps its loop in `quinn`, outside `quinn-proto`), the application routes (player
//! page, `/metrics`, admin API), `whepd`'s command line, the shards' shared seat book behind a
//! mutex (`whep_server::shard::ShardSet`, over this crate's [`shard::Book`] and
//! [`shard::SharedSeats`]), and the operating-system helpers.
//!
//! # Features
//!
//! None is on by default; the default build is the state machine alone.
//!
//! - `sim`: the deterministic simulation harness (`whep_core::sim`: a virtual clock, str0m viewers, a
//!   scripted RTP source), for tests and benches.
//! - `http`: conversions between the `http` crate's types and [`WhepRequest`] /
//!   [`WhepResponse`] (types only, no IO), for runtimes that serve with hyper.
//! - `fuzzing`: fuzz targets for every untrusted input surface of the core (`whep_core::fuzzing`;
//!   implies `sim`).
//!
//! # Run loop
//!
//! 1. Create a [`Core`] with a [`CoreConfig`] (host candidates, port range, caps, a random seed).
//! 2. Register streams with [`Core::add_stream`] and start them with [`Core::start_stream`].
//! 3. Feed inputs as they happen, each with the current `now`:
//!    [`Core::handle_http`] for a WHEP request (it returns the response at once; with the
//!    authorisation callback configured, [`Core::handle_request`] may leave it pending until
//!    [`Core::handle_auth`], see [`auth`]),
//!    [`Core::handle_input`] for a datagram on the viewer socket, a datagram on an ingest port,
//!    a bind result or a process event, and [`Core::handle_timeout`] when the timer fires.
//! 4. After every call, drain [`Core::poll_output`] until `None` and execute each [`Output`]:
//!    send a [`Transmit`], bind or release ingest ports, spawn, stop or kill a process, ask the
//!    authorisation server, answer a pending request, or observe an [`Event`].
//! 5. Arm one timer at [`Core::poll_timeout`].
//!
//! ```no_run
//! use std::time::Instant;
//! use whep_core::{CoreConfig, Core, Input, Output, StreamConfig, StreamId};
//!
//! let mut config = CoreConfig::default();
//! config.host_candidates = vec!["192.0.2.10:3478".parse().unwrap()];
//! let mut core = Core::new(config, Instant::now());
//! let demo = StreamId::new("demo").unwrap();
//! core.add_stream(demo.clone(), StreamConfig::external()).unwrap();
//! core.start_stream(&demo, Instant::now()).unwrap();
//! loop {
//!     while let Some(out) = core.poll_output() {
//!         match out {
//!             Output::Transmit(t) => { /* socket.send_to(&t.contents, t.destination) */ }
//!             Output::BindIngest { stream, ports, renditions } => {
//!                 // bind 127.0.0.1 on every port of ports.ingest(renditions), then report:
//!                 core.handle_input(Input::IngestBound { stream, ports }, Instant::now());
//!             }
//!             _ => { /* spawn/stop/kill processes, release ports, log events */ }
//!         }
//!     }
//!     let _wake_at = core.poll_timeout();
//!     // wait for a datagram, an HTTP request, a child exit or the timer, then feed it in:
//!     core.handle_timeout(Instant::now());
//! }
//! ```
//!
//! # Time
//!
//! Every input carries `now: Instant`; the core never reads a clock. Time must not go
//! backwards (an older `now` counts as the newest seen). A spurious `handle_timeout` is
//! harmless.
//!
//! # Randomness
//!
//! Session ids, ETags and ICE credentials come from ChaCha20 seeded with
//! [`CoreConfig::rng_seed`] (128 random bits per session id). str0m draws DTLS keys and SSRCs from
//! its own generators, so two runs with one seed agree on ids but not on bytes on the wire.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

pub mod auth;
pub mod base64;
mod config;
pub mod dtls;
pub mod ffmpeg;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod gop;
#[cfg(feature = "http")]
mod http_glue;
mod ids;
mod machine;
mod metrics;
mod pacer;
mod packet;
mod path;
mod pathbook;
pub mod ports;
pub mod ratelimit;
mod resend;
pub mod rtp;
pub mod sdp;
pub mod sdpfrag;
pub mod shard;
mod stream;
pub mod stun;
pub mod tcp;
pub mod turn;
mod viewer;
pub mod whep;

#[cfg(feature = "sim")]
pub mod sim;

pub use auth::{Answer, AuthDecision, AuthRequest, RequestId};
pub use config::{
    CoreConfig, Feed, H264Profile, IceServer, ProcessConfig, StreamConfig, VideoCodec,
    canonical_addr, public_origin, valid_node_id,
};
pub use ffmpeg::{EgressConfig, Rendition};
pub use ids::{ETag, SessionId, StreamId};
pub use machine::{CandidatePair, MediaTransport, SessionInfo, SessionState};
pub use machine::{Core, LOAD_SMOOTHING, TransportCounts};
pub use metrics::{LatencyHistogram, Metrics};
pub use pacer::PrimePacing;
pub use ports::PortPair;
pub use ratelimit::{Rate, RateLimits};
pub use tcp::ConnId;
pub use whep::{Reject, WhepRequest, WhepResponse};

/// An input from the runtime.
#[derive(Debug)]
pub enum Input<'a> {
    /// A datagram that arrived on the shared viewer socket.
    Datagram {
        /// The sender.
        source: SocketAddr,
        /// The local address it arrived on: one of [`CoreConfig::host_candidates`] (a socket bound
        /// to a wildcard address passes the advertised candidate).
        destination: SocketAddr,
        /// The datagram.
        contents: &'a [u8],
    },
    /// A datagram that arrived on an ingest port (RTP or RTCP from FFmpeg, or garbage).
    Ingest {
        /// The local port it arrived on.
        port: u16,
        /// Its sender: only the stream's own FFmpeg is accepted (see
        /// [`PortPair::video_source`]), other datagrams are counted and dropped.
        source: SocketAddr,
        /// The datagram.
        contents: &'a [u8],
        /// When it arrived, if the runtime knows (a kernel receive timestamp) and it is
        /// earlier than `now`: the time a sharded engine's other shards measure their egress
        /// latency from ([`SharedPacket::read_at`](crate::shard::SharedPacket::read_at)).
        /// `None` means `now`.
        arrived: Option<std::time::Instant>,
    },
    /// The runtime accepted a connection on its TCP listener (ICE-TCP, see [`tcp`]). The core
    /// answers [`Output::CloseTcp`] at once when it holds
    /// [`CoreConfig::max_tcp_connections`] already, and later when its first STUN check names
    /// no viewer within [`CoreConfig::tcp_bind_timeout`].
    TcpOpened {
        /// The runtime's name for it, unique while it is open.
        conn: ConnId,
        /// The viewer's end.
        peer: SocketAddr,
        /// Our end: one of [`CoreConfig::tcp_candidates`] (a listener bound to a wildcard
        /// address passes the advertised candidate).
        local: SocketAddr,
    },
    /// Bytes read from a connection, as they came: the core cuts them into RFC 4571 frames
    /// (split anywhere is fine).
    TcpData {
        /// The connection.
        conn: ConnId,
        /// The bytes.
        contents: &'a [u8],
    },
    /// The runtime dropped whole frames for this connection because its send queue was full
    /// (the viewer does not read fast enough; see [`tcp::SendQueue`]): the viewer's video
    /// restarts at a keyframe.
    TcpDropped {
        /// The connection.
        conn: ConnId,
        /// Frames dropped.
        frames: u64,
    },
    /// A connection closed (by the viewer, an error, or after [`Output::CloseTcp`]).
    TcpClosed {
        /// The connection.
        conn: ConnId,
    },
    /// Both ports of an [`Output::BindIngest`] are bound.
    IngestBound {
        /// The stream.
        stream: StreamId,
        /// The pair that was bound.
        ports: PortPair,
    },
    /// An [`Output::BindIngest`] failed; the core quarantines the pair and tries another.
    BindFailed {
        /// The stream.
        stream: StreamId,
        /// The pair that could not be bound.
        ports: PortPair,
        /// What the operating system said.
        error: String,
    },
    /// The process of an [`Output::SpawnProcess`] started.
    ProcessSpawned {
        /// The stream.
        stream: StreamId,
        /// The generation from the spawn request.
        generation: u64,
        /// Its process id.
        pid: u32,
    },
    /// An [`Output::SpawnProcess`] could not be executed (e.g. no `ffmpeg` on `PATH`).
    SpawnFailed {
        /// The stream.
        stream: StreamId,
        /// The generation from the spawn request.
        generation: u64,
        /// What went wrong, including how to fix it.
        error: String,
    },
    /// A spawned process exited.
    ProcessExited {
        /// The stream.
        stream: StreamId,
        /// The generation from the spawn request.
        generation: u64,
        /// Exit code; `None` when killed by a signal.
        code: Option<i32>,
    },
}

/// How a [`Transmit`] leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// A datagram on the viewer socket.
    Udp,
    /// A frame on a TCP connection (ICE-TCP): the contents are framed already (RFC 4571,
    /// [`tcp::encode`]); queue them whole in the connection's [`tcp::SendQueue`].
    Tcp(ConnId),
}

/// A datagram to send from the shared viewer socket, or a frame for a TCP connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// UDP or which TCP connection.
    pub transport: Transport,
    /// The local address to send from (one of the host candidates).
    pub source: SocketAddr,
    /// Where to send it.
    pub destination: SocketAddr,
    /// The datagram.
    pub contents: Vec<u8>,
}

/// Something the runtime must do, or may observe.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Output {
    /// Send a datagram on the viewer socket, or a frame on a TCP connection
    /// ([`Transmit::transport`]).
    Transmit(Transmit),
    /// Close a TCP connection (over the limit, never bound to a viewer, garbage, or its viewer
    /// left), then report [`Input::TcpClosed`].
    CloseTcp {
        /// The connection.
        conn: ConnId,
    },
    /// Bind `127.0.0.1` on `ports.video`, `ports.audio()` and each further video rendition's
    /// port ([`PortPair::ingest`]) for the stream's RTP and report [`Input::IngestBound`] or
    /// [`Input::BindFailed`].
    BindIngest {
        /// The stream.
        stream: StreamId,
        /// The pair to bind.
        ports: PortPair,
        /// The stream's further video renditions: bind every port of
        /// [`PortPair::ingest`]`(renditions)`, the pair and one port per rendition.
        renditions: u8,
    },
    /// Close the stream's ingest sockets (those of its [`Output::BindIngest`]).
    ReleaseIngest {
        /// The stream.
        stream: StreamId,
        /// The pair to close.
        ports: PortPair,
    },
    /// Run `program args…` (FFmpeg) without stdin, forward its stderr to logs, and report
    /// [`Input::ProcessSpawned`] or [`Input::SpawnFailed`], then [`Input::ProcessExited`].
    SpawnProcess {
        /// The stream.
        stream: StreamId,
        /// Identifies this spawn in later reports.
        generation: u64,
        /// The program.
        program: String,
        /// Its arguments.
        args: Vec<String>,
    },
    /// Ask the process to exit (SIGTERM). The core follows with [`Output::KillProcess`] if it
    /// has not exited after [`ProcessConfig::stop_grace`].
    StopProcess {
        /// The stream.
        stream: StreamId,
        /// Which spawn.
        generation: u64,
    },
    /// Kill the process (SIGKILL).
    KillProcess {
        /// The stream.
        stream: StreamId,
        /// Which spawn.
        generation: u64,
    },
    /// Something happened.
    Event(Event),
    /// Hand this to every other shard's core, in order ([`Core::mirror`]); only the leader
    /// of a sharded server emits it (see [`shard`]).
    Mirror(shard::Mirror),
    /// Hand this to the leader shard's core ([`Core::demand`]): the viewers of on-demand
    /// stream `stream` changed on this follower shard (one came, or the stream has no viewer
    /// left on any shard). Only a follower of a sharded server emits it (see [`shard`]).
    Demand {
        /// The stream.
        stream: StreamId,
    },
    /// Ask the authorisation server about this request (see [`auth`]), off the loop that
    /// drives the core, and report its decision with [`Core::handle_auth`]. The core answers
    /// the request itself if no decision comes within
    /// [`HttpAuth::timeout`](auth::HttpAuth::timeout).
    Authorize(AuthRequest),
    /// Fetch the JWT keys again (a JWKS URL) and report them with [`Core::set_jwt_keys`], the
    /// keys there are if the fetch failed: a request waits for a key the core lacks (see
    /// [`auth`](auth#rotated-keys)). Only emitted with
    /// [`AuthConfig::jwt_refresh`](auth::AuthConfig::jwt_refresh) set.
    RefreshJwtKeys,
    /// The response to a request [`Core::handle_request`] left pending
    /// ([`Answer::Pending`]).
    Respond {
        /// The request.
        id: RequestId,
        /// Its response.
        response: WhepResponse,
    },
}

/// Why a viewer's session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The viewer sent DELETE.
    Deleted,
    /// ICE and DTLS did not complete within [`CoreConfig::connect_timeout`].
    ConnectTimeout,
    /// No datagram from the viewer within [`CoreConfig::inactivity_timeout`].
    Inactive,
    /// The ICE agent lost the viewer and it did not recover within the grace period.
    IceDisconnected,
    /// The viewer closed DTLS, or its connection failed.
    RemoteClosed,
    /// The stream was stopped or removed.
    StreamStopped,
    /// The stream's FFmpeg exited and is being restarted.
    StreamRestarting,
    /// The core is shutting down.
    Shutdown,
    /// The operator closed it ([`Core::kick`], the admin API's `DELETE /api/sessions/{id}`).
    Kicked,
}

impl CloseReason {
    /// The name events and listings use: `deleted`, `connect_timeout`, `inactive`,
    /// `ice_disconnected`, `remote_closed`, `stream_stopped`, `stream_restarting`, `shutdown`
    /// or `kicked`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deleted => "deleted",
            Self::ConnectTimeout => "connect_timeout",
            Self::Inactive => "inactive",
            Self::IceDisconnected => "ice_disconnected",
            Self::RemoteClosed => "remote_closed",
            Self::StreamStopped => "stream_stopped",
            Self::StreamRestarting => "stream_restarting",
            Self::Shutdown => "shutdown",
            Self::Kicked => "kicked",
        }
    }
}

/// Something the embedding application may want to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The stream's ingest ports are bound. For a stream fed externally, `args` are the
    /// FFmpeg output legs to append after the application's own outputs (the seed's
    /// `BuildArgs`); for a supervised stream, the full command line being spawned.
    StreamReady {
        /// The stream.
        stream: StreamId,
        /// Its ingest pair.
        ports: PortPair,
        /// FFmpeg arguments.
        args: Vec<String>,
    },
    /// The stream is stopped and holds no ports or process.
    StreamStopped {
        /// The stream.
        stream: StreamId,
    },
    /// The stream could not start (no bindable ports, FFmpeg missing, ...).
    StreamFailed {
        /// The stream.
        stream: StreamId,
        /// Why.
        reason: String,
        /// When the next attempt is, for a supervised stream.
        retry_in: Option<Duration>,
    },
    /// The supervised process exited unexpectedly; viewers were closed.
    ProcessExited {
        /// The stream.
        stream: StreamId,
        /// Its exit code.
        code: Option<i32>,
        /// Delay before the restart.
        restart_in: Option<Duration>,
    },
    /// The supervised process sent no RTP for [`ProcessConfig::stale_timeout`]; it is being
    /// restarted.
    StreamStale {
        /// The stream.
        stream: StreamId,
    },
    /// The stream's ingest runs: its status became [`StreamStatus::Running`] (ports bound, its
    /// FFmpeg spawned or an external feed expected). `/metrics`' `whep_stream_up` is 1 from here.
    StreamUp {
        /// The stream.
        stream: StreamId,
    },
    /// The stream's ingest stopped running (stopped, removed, its FFmpeg exited, went stale or
    /// could not start): the status it is in now.
    StreamDown {
        /// The stream.
        stream: StreamId,
        /// Where it is now ([`StreamStatus::Stopped`], `Backoff`, `Restarting`, `Stopping`).
        state: StreamStatus,
    },
    /// A POST created a viewer.
    ViewerJoined {
        /// The stream.
        stream: StreamId,
        /// The session.
        session: SessionId,
        /// The client's address, when the runtime gave it ([`WhepRequest::client`]).
        client: Option<IpAddr>,
        /// The POST's `User-Agent`, sanitised ([`whep::sanitize_user_agent`]).
        user_agent: Option<String>,
    },
    /// A viewer's ICE and DTLS completed; media flows.
    ViewerConnected {
        /// The stream.
        stream: StreamId,
        /// The session.
        session: SessionId,
    },
    /// A viewer's session ended.
    ViewerLeft {
        /// The stream.
        stream: StreamId,
        /// The session.
        session: SessionId,
        /// Why.
        reason: CloseReason,
        /// How long the session lasted, from its POST.
        duration: Duration,
        /// RTP packets written to it (audio and video, retransmissions not counted).
        packets_sent: u64,
        /// Their payload bytes.
        bytes_sent: u64,
    },
    /// A viewer asked for a keyframe (PLI/FIR). FFmpeg cannot be asked; counted only.
    KeyframeRequested {
        /// The stream.
        stream: StreamId,
        /// The session.
        session: SessionId,
    },
}

/// What the next timeout is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerReason {
    /// A viewer: str0m's timers, connect deadline, inactivity, disconnect grace.
    Viewer,
    /// A stream: restart backoff, stale detection, stop escalation.
    Stream,
    /// A TCP connection not bound to a viewer yet ([`CoreConfig::tcp_bind_timeout`]).
    Tcp,
    /// Discovery of the public address: a STUN request to send, resend or give up
    /// ([`CoreConfig::stun_servers`]).
    Stun,
    /// A request waiting for the authorisation callback ([`auth::HttpAuth::timeout`]).
    Auth,
}

/// Why a stream management call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamError {
    /// No stream with this id.
    NotFound,
    /// A stream with this id exists.
    Exists,
    /// Its WebRTC egress is disabled.
    Disabled,
    /// It is already started.
    AlreadyStarted,
    /// No free ingest port pair.
    NoPorts,
    /// The egress configuration is invalid.
    InvalidConfig(String),
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFound => f.write_str("no such stream"),
            Self::Exists => f.write_str("a stream with this id exists"),
            Self::Disabled => f.write_str("the stream's WebRTC egress is disabled"),
            Self::AlreadyStarted => f.write_str("the stream is already started"),
            Self::NoPorts => f.write_str("no free ingest port pair"),
            Self::InvalidConfig(why) => write!(f, "invalid egress configuration: {why}"),
        }
    }
}

impl std::error::Error for StreamError {}

/// Where a stream is in its lifecycle, as listings show it ([`StreamInfo::state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamStatus {
    /// Not started, or stopped.
    Stopped,
    /// Its ingest ports are being bound.
    Binding,
    /// Receiving (or waiting for) RTP; on a follower shard, mirroring the leader's.
    Running,
    /// Its FFmpeg went stale and is being stopped to be started again.
    Restarting,
    /// Waiting to start again after its FFmpeg exited or could not start.
    Backoff,
    /// Stopping: its FFmpeg was asked to exit, its ports are released when it has.
    Stopping,
    /// On demand ([`StreamConfig::on_demand`]): waiting for a viewer, no FFmpeg running.
    Idle,
    /// On demand: a viewer came, its FFmpeg is starting (no RTP yet).
    Starting,
}

impl StreamStatus {
    /// The name listings and `/api/streams` use: `stopped`, `binding`, `running`,
    /// `restarting`, `backoff`, `stopping`, and for on-demand streams `idle` and `starting`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stopped => "stopped",
            Self::Binding => "binding",
            Self::Running => "running",
            Self::Restarting => "restarting",
            Self::Backoff => "backoff",
            Self::Stopping => "stopping",
            Self::Idle => "idle",
            Self::Starting => "starting",
        }
    }
}

impl fmt::Display for StreamStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Status of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    /// The id.
    pub id: StreamId,
    /// Where it is in its lifecycle.
    pub state: StreamStatus,
    /// Whether WebRTC egress is enabled.
    pub enabled: bool,
    /// Whether the core supervises its FFmpeg.
    pub supervised: bool,
    /// Its ingest pair, while it holds one.
    pub ports: Option<PortPair>,
    /// The FFmpeg process id, while running.
    pub pid: Option<u32>,
    /// Viewers, connected or not.
    pub viewers: usize,
    /// Viewers whose media flows.
    pub connected_viewers: usize,
    /// Restarts of its FFmpeg.
    pub restarts: u64,
    /// Its video renditions, its H264 first: the codec of each and the viewers it serves.
    pub renditions: Vec<RenditionInfo>,
}

/// One of a stream's video renditions, as [`StreamInfo`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenditionInfo {
    /// Its codec.
    pub codec: VideoCodec,
    /// Its target bitrate in kbit/s, where one is set.
    pub bitrate_kbps: Option<u32>,
    /// Viewers that get it, connected or not.
    pub viewers: usize,
}
