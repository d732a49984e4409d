//! The application surface every runtime serves, written once: the player page, `/healthz`,
//! Prometheus `/metrics`, the public stream list, the token-guarded JSON admin API, and the
//! serialisable stream specification used by configuration files and the admin API.
//!
//! Like the core, it does no IO: [`handle`] takes a parsed request and the core and
//! returns the response; WHEP requests fall through to [`Core::handle_http`].
//!
//! | route | method | what |
//! |---|---|---|
//! | `/` | GET | the player page (`?stream=ID` plays one) |
//! | `/healthz` | GET | `ok` |
//! | `/ready` | GET | `200 ready`, or `503` + `Retry-After` with the reason (`draining`, `overloaded`, `full`): whether a load balancer should send this node new viewers |
//! | `/metrics` | GET | Prometheus text, never labelled by session |
//! | `/streams` | GET | public list: id, state, viewers |
//! | `/api/streams` | GET, POST | admin: list with pid and ports; add (`{"id": .., ..spec}`) |
//! | `/api/streams/{id}` | GET, DELETE | admin: one stream; remove it |
//! | `/api/streams/{id}/start`, `/stop` | POST | admin: start or stop it |
//! | `/api/streams/{id}/sessions` | GET | admin: the stream's viewers ([`session_json`]) |
//! | `/api/sessions` | GET | admin: every viewer (`?stream=ID` filters) |
//! | `/api/sessions/{id}` | GET, DELETE | admin: one viewer; kick it ([`Core::kick`]) |
//! | WHEP prefix | any | [`Core::handle_http`] |
//!
//! Routes are matched on the request target alone. A request whose `Host` holds more than a
//! host and port (`/`, `?`, `#`, `\`), or that has two `Host` fields, is answered `400 bad Host
//! header` before any route.
//!
//! A stream added over the admin API is held to [`AdminPolicy`] (network URLs, files in media
//! directories, no raw FFmpeg arguments or filter graphs unless the operator opts in). A client
//! whose admin authentication failures exceed its budget (the per-client request rate,
//! [`RateLimits::requests_per_client`](whep_core::RateLimits::requests_per_client)) gets 429 with
//! `Retry-After` before its token is looked at.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use http_types::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use whep_core::ffmpeg::EgressConfig;
use whep_core::{
    Answer, Core, CoreConfig, RequestId, SessionId, SessionInfo, StreamError, StreamId, StreamInfo,
    StreamStatus, WhepRequest, WhepResponse,
};
use whep_core::{H264Profile, Rendition, StreamConfig, VideoCodec};

pub mod policy;

pub use policy::{AdminPolicy, FILE_FORMATS, Refused, URL_PROTOCOLS, URL_SCHEMES, check_media_dir};

/// The player page, with `__WHEP_PREFIX__` and `__ICE_SERVERS__` still in it; [`handle`] fills
/// them in.
pub const PLAYER_HTML: &str = include_str!("../assets/player.html");

/// Settings of the application routes that are not part of the core's [`CoreConfig`].
#[derive(Debug, Clone, Default)]
pub struct RoutesConfig {
    /// Bearer token of the admin API. `None` disables the admin API (403).
    pub admin_token: Option<String>,
    /// What streams added over the admin API may make FFmpeg do.
    pub policy: AdminPolicy,
    /// Where events go as JSON POSTs (`--webhook-url`, [`crate::webhook`]); an engine starts
    /// the sender ([`start_webhook`](Self::start_webhook)).
    pub webhook_url: Option<crate::outbound::HttpUrl>,
    /// The key that signs webhook deliveries (`--webhook-secret-file`); `None`: unsigned.
    pub webhook_secret: Option<crate::webhook::WebhookSecret>,
    /// The running webhook sender; its counters are in `/metrics`.
    pub webhook: Option<crate::webhook::Webhook>,
}

impl RoutesConfig {
    /// Starts the webhook sender for [`webhook_url`](Self::webhook_url), unless there is none
    /// or it runs already.
    pub fn start_webhook(&mut self) -> Result<(), String> {
        if self.webhook.is_none()
            && let Some(url) = &self.webhook_url
        {
            let secret = self.webhook_secret.clone();
            self.webhook = Some(crate::webhook::Webhook::start(url, secret)?);
        }
        Ok(())
    }
}

/// How a stream is fed and which WebRTC legs FFmpeg writes: the serialisable form of a
/// [`StreamConfig`], as written in a configuration file or posted to the admin API.
///
/// Exactly one of `url`, `file`, `lavfi`, `args` or `external = true` says where the media comes
/// from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamSpec {
    /// An input URL FFmpeg reads (`rtsp://`, `srt://`, `http://`, ...).
    pub url: Option<String>,
    /// A media file, played in real time and looped.
    pub file: Option<String>,
    /// A lavfi video source graph (e.g. `testsrc2=size=640x360:rate=30`); a sine tone is added
    /// as audio unless `lavfi_audio` says otherwise.
    pub lavfi: Option<String>,
    /// The lavfi audio source used with `lavfi`; default `sine=frequency=440:sample_rate=48000`.
    pub lavfi_audio: Option<String>,
    /// Raw FFmpeg input arguments (everything before the outputs).
    pub args: Option<Vec<String>>,
    /// The application runs FFmpeg itself; the server only hands out the output legs.
    pub external: bool,
    /// Re-encode to H264 constrained baseline + Opus. Defaults to true for `lavfi`, false
    /// otherwise (copy, which needs an H264 + Opus source).
    pub transcode: Option<bool>,
    /// Keyframe interval in frames when transcoding.
    pub gop: Option<u32>,
    /// Video bitrate in kbit/s when transcoding.
    pub video_bitrate_kbps: Option<u32>,
    /// Opus bitrate in kbit/s when transcoding.
    pub audio_bitrate_kbps: Option<u32>,
    /// FFmpeg `-map` selector of the video stream.
    pub video_map: Option<String>,
    /// FFmpeg `-map` selector of the audio stream.
    pub audio_map: Option<String>,
    /// H264 profile of the stream: `constrained-baseline` (default), `baseline`, `main`, `high`.
    pub profile: Option<String>,
    /// Per-stream viewer cap, overriding the server's.
    pub max_viewers: Option<usize>,
    /// Start the stream when it is added (default true).
    pub autostart: Option<bool>,
    /// Further video renditions FFmpeg encodes besides the H264 one, e.g. VP8 for players
    /// without H264: `[{ codec = "vp8", kbps = 800 }]`.
    pub renditions: Option<Vec<RenditionSpec>>,
    /// Start FFmpeg when the first viewer POSTs, stop it `on_demand_close_after_secs` after
    /// the last one left (MediaMTX's `sourceOnDemand`); the stream shows `idle` meanwhile.
    pub on_demand: bool,
    /// The close delay of an on-demand stream (default
    /// [`DEFAULT_ON_DEMAND_CLOSE_AFTER_SECS`]).
    pub on_demand_close_after_secs: Option<u64>,
}

/// MediaMTX's `sourceOnDemandCloseAfter` default.
pub const DEFAULT_ON_DEMAND_CLOSE_AFTER_SECS: u64 = 10;

/// A further video rendition of a [`StreamSpec`] (see [`whep_core::Rendition`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenditionSpec {
    /// `vp8` or `h264`.
    pub codec: String,
    /// Target bitrate in kbit/s.
    pub kbps: u32,
    /// Picture height in pixels; the source's when absent.
    #[serde(default)]
    pub height: Option<u32>,
}

impl RenditionSpec {
    /// A VP8 rendition at `kbps`.
    pub fn vp8(kbps: u32) -> Self {
        Self { codec: "vp8".into(), kbps, height: None }
    }

    /// An H264 rendition at `kbps`, `height` pixels high: a lower rung of the stream's ladder.
    pub fn h264(kbps: u32, height: u32) -> Self {
        Self { codec: "h264".into(), kbps, height: Some(height) }
    }

    fn to_rendition(&self) -> Result<Rendition, String> {
        let codec = match self.codec.to_ascii_lowercase().as_str() {
            "vp8" => VideoCodec::Vp8,
            "h264" => VideoCodec::H264,
            other => return Err(format!("rendition codec {other:?} is not one of vp8, h264")),
        };
        Ok(Rendition { codec, bitrate_kbps: self.kbps, height: self.height })
    }
}

impl StreamSpec {
    /// The demo stream: a 640x360 test pattern at 30 fps with a 440 Hz tone and a keyframe
    /// every 2 s (a new viewer still sees a picture at once, from the GOP cache), in H264 at
    /// 1.5 Mbit/s, in VP8 at 800 kbit/s for players without H264, and in H264 at 400 kbit/s
    /// and 240 lines, the lower rung for viewers whose link does not carry 1.5 Mbit/s.
    pub fn demo() -> Self {
        Self {
            lavfi: Some("testsrc2=size=640x360:rate=30".into()),
            gop: Some(60),
            video_bitrate_kbps: Some(1500),
            // Any browser plays it: players without H264 (Firefox without OpenH264) get VP8.
            // A slow link's viewer moves down to 400 kbit/s.
            renditions: Some(vec![RenditionSpec::vp8(800), RenditionSpec::h264(400, 240)]),
            ..Self::default()
        }
    }

    /// Whether the stream should start as soon as it is added.
    pub fn autostart(&self) -> bool {
        self.autostart.unwrap_or(true)
    }

    /// Converts to the core's stream configuration, checking that the source is given exactly
    /// once and that the egress settings are valid.
    pub fn to_config(&self) -> Result<StreamConfig, String> {
        let sources = [
            self.url.is_some(),
            self.file.is_some(),
            self.lavfi.is_some(),
            self.args.is_some(),
            self.external,
        ];
        match sources.iter().filter(|s| **s).count() {
            1 => {}
            0 => return Err("a stream needs one of url, file, lavfi, args or external".into()),
            _ => return Err("give only one of url, file, lavfi, args or external".into()),
        }
        let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let mut config = if self.external {
            StreamConfig::external()
        } else if let Some(url) = &self.url {
            StreamConfig::supervised(strings(&["-i", url]))
        } else if let Some(file) = &self.file {
            StreamConfig::supervised(strings(&["-re", "-stream_loop", "-1", "-i", file]))
        } else if let Some(video) = &self.lavfi {
            let audio =
                self.lavfi_audio.as_deref().unwrap_or("sine=frequency=440:sample_rate=48000");
            StreamConfig::supervised(strings(&[
                "-re", "-f", "lavfi", "-i", video, "-f", "lavfi", "-i", audio,
            ]))
        } else {
            let args = self.args.clone().unwrap_or_default();
            if args.is_empty() {
                return Err("args must not be empty".into());
            }
            StreamConfig::supervised(args)
        };
        let mut egress = EgressConfig {
            force_transcode: self.transcode.unwrap_or(self.lavfi.is_some()),
            ..EgressConfig::default()
        };
        if self.lavfi.is_some() {
            egress.audio_map = "1:a:0".into();
        }
        if let Some(gop) = self.gop {
            egress.gop = gop;
        }
        egress.video_bitrate_kbps = self.video_bitrate_kbps.or(egress.video_bitrate_kbps);
        if let Some(kbps) = self.audio_bitrate_kbps {
            egress.audio_bitrate_kbps = kbps;
        }
        if let Some(map) = &self.video_map {
            egress.video_map.clone_from(map);
        }
        if let Some(map) = &self.audio_map {
            egress.audio_map.clone_from(map);
        }
        for r in self.renditions.iter().flatten() {
            egress.renditions.push(r.to_rendition()?);
        }
        egress.validate()?;
        config.egress = egress;
        config.profile = match self.profile.as_deref() {
            None | Some("constrained-baseline") => H264Profile::ConstrainedBaseline,
            Some("baseline") => H264Profile::Baseline,
            Some("main") => H264Profile::Main,
            Some("high") => H264Profile::High,
            Some(other) => {
                return Err(format!(
                    "profile {other:?} is not one of constrained-baseline, baseline, main, high"
                ));
            }
        };
        if self.max_viewers == Some(0) {
            return Err("max_viewers must be at least 1".into());
        }
        config.max_viewers = self.max_viewers;
        if self.on_demand {
            if self.external {
                return Err("on_demand needs a source the server runs (not external)".into());
            }
            let secs =
                self.on_demand_close_after_secs.unwrap_or(DEFAULT_ON_DEMAND_CLOSE_AFTER_SECS);
            config.on_demand = Some(Duration::from_secs(secs));
        } else if self.on_demand_close_after_secs.is_some() {
            return Err("on_demand_close_after_secs needs on_demand = true".into());
        }
        Ok(config)
    }
}

/// Everything a runtime's engine needs to start (`whep_tokio::Whep::start`,
/// `whep_smol::Whep::start`).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The core's configuration. An all-zero [`CoreConfig::rng_seed`] is replaced by one from the
    /// operating system. With no [`CoreConfig::host_candidates`], the viewer socket's own address is
    /// advertised (or `127.0.0.1` and the default-route address of each family the socket
    /// serves when bound to a wildcard, see [`default_candidates`]).
    pub core: CoreConfig,
    /// Settings of the application routes (admin token).
    pub routes: RoutesConfig,
    /// Where the shared viewer socket binds: by default `[::]:3478`, dual-stack (IPv6 and
    /// IPv4; `0.0.0.0:3478` on a host without IPv6, see [`crate::os::bind_udp`]).
    pub udp_bind: SocketAddr,
    /// How long the engine's shutdown waits for FFmpeg processes to exit after viewers are closed
    /// (they get SIGTERM, then SIGKILL after [`ProcessConfig::stop_grace`]).
    ///
    /// [`ProcessConfig::stop_grace`]: whep_core::ProcessConfig::stop_grace
    pub shutdown_timeout: Duration,
    /// What `whepd` does on SIGTERM before that shutdown: drain for at most this long (new
    /// viewers refused, `/ready` 503, current viewers kept until they leave or this passes; see
    /// [`Engine::drain`](crate::driver::Engine::drain)). Zero (the default): shut down at once.
    pub drain_timeout: Duration,
    /// Send a viewer's datagrams of one wake-up in one UDP segmentation-offload (GSO) call
    /// where the socket supports it (default). Off: one system call per datagram.
    pub udp_gso: bool,
    /// Engine loops ("shards", see [`whep_core::shard`]), each with its own thread (where the
    /// runtime gives it one), core and viewer socket; shard `i` binds [`udp_bind`](Self::udp_bind)'s
    /// port plus `i` (unless that is 0) and advertises configured host candidates with their
    /// port plus `i`. 1 (the default) is one loop for everything. Up to 64.
    pub shards: usize,
    /// The ICE-TCP listener (RFC 6544 passive candidates) for viewers that cannot use UDP.
    pub tcp: TcpListen,
    /// Bytes a TCP viewer's send queue holds at most; beyond, whole frames are dropped and its
    /// video restarts at a keyframe ([`whep_core::tcp::SendQueue`]).
    pub tcp_queue_bytes: usize,
    /// Where the authorisation callback and the JWT keys come from (the IO half of
    /// [`CoreConfig::auth`](whep_core::CoreConfig::auth)).
    pub auth: AuthSettings,
}

/// The IO half of viewer authorisation ([`whep_core::auth`], [`crate::auth`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthSettings {
    /// The authorisation server the runtime asks for each
    /// [`Output::Authorize`](whep_core::Output::Authorize); set together with
    /// [`AuthConfig::http`](whep_core::auth::AuthConfig::http).
    pub http_url: Option<crate::auth::HttpUrl>,
    /// The key that signs the callback's requests (`--auth-http-secret-file`); `None`:
    /// unsigned.
    pub http_secret: Option<crate::webhook::WebhookSecret>,
    /// Where the JWT keys come from; set together with
    /// [`AuthConfig::jwt`](whep_core::auth::AuthConfig::jwt).
    pub jwt: Option<crate::auth::JwtSources>,
}

/// Where the ICE-TCP listener binds ([`ServerConfig::tcp`]). Its candidates are the host
/// candidates' addresses with the listener's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TcpListen {
    /// No ICE over TCP.
    Off,
    /// The viewer socket's address and port number (the default); if that TCP port cannot
    /// be bound, the server runs without ICE-TCP and says so in the log.
    #[default]
    SameAsUdp,
    /// This address (shard `i` at its port plus `i`); failing to bind it fails the start.
    At(SocketAddr),
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            core: CoreConfig::default(),
            routes: RoutesConfig::default(),
            udp_bind: SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 3478)),
            shutdown_timeout: Duration::from_secs(10),
            drain_timeout: Duration::ZERO,
            udp_gso: true,
            shards: 1,
            tcp: TcpListen::SameAsUdp,
            tcp_queue_bytes: whep_core::tcp::DEFAULT_QUEUE_BYTES,
            auth: AuthSettings::default(),
        }
    }
}

/// Why a runtime could not add a stream.
#[derive(Debug)]
pub enum AddError {
    /// The id is empty or too long.
    BadId,
    /// The specification is invalid.
    BadSpec(String),
    /// The core refused it.
    Stream(StreamError),
    /// The engine has shut down.
    Closed,
}

impl std::fmt::Display for AddError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BadId => f.write_str("invalid stream id"),
            Self::BadSpec(why) => write!(f, "invalid stream: {why}"),
            Self::Stream(e) => e.fmt(f),
            Self::Closed => f.write_str("the WHEP engine has shut down"),
        }
    }
}

impl std::error::Error for AddError {}

/// The response a runtime gives once its engine has stopped.
pub fn unavailable() -> WhepResponse {
    WhepResponse::new(StatusCode::ServiceUnavailable)
        .with_body("text/plain", "webrtc: server is shutting down")
}

/// The host candidates a runtime advertises when none are configured: the viewer socket's own
/// address, or for a wildcard bind, `127.0.0.1` plus the default route's address of each family
/// the socket serves (`0.0.0.0`: IPv4; `[::]`, dual-stack: IPv4 and IPv6), on the bound port.
/// `default_routes` are what the runtime finds by connecting a probe UDP socket of each family
/// (which sends nothing, [`crate::default_routes`]); loopback, unspecified and link-local ones
/// are left out (a link-local address needs a scope no candidate carries).
pub fn default_candidates(bound: SocketAddr, default_routes: &[SocketAddr]) -> Vec<SocketAddr> {
    let bound = whep_core::canonical_addr(bound);
    if !bound.ip().is_unspecified() {
        return vec![bound];
    }
    let mut out = vec![SocketAddr::from(([127, 0, 0, 1], bound.port()))];
    for addr in default_routes {
        let ip = addr.ip().to_canonical();
        let usable = match ip {
            IpAddr::V4(v4) => !v4.is_link_local(),
            // Link-local (fe80::/10).
            IpAddr::V6(v6) => bound.is_ipv6() && (v6.segments()[0] & 0xffc0) != 0xfe80,
        };
        let candidate = SocketAddr::new(ip, bound.port());
        if usable && !ip.is_loopback() && !ip.is_unspecified() && !out.contains(&candidate) {
            out.push(candidate);
        }
    }
    out
}

/// What a follower shard holds, for the leader's status pages and `/metrics` (see
/// [`handle_sharded`]).
#[derive(Debug, Clone, Default)]
pub struct ShardView {
    /// The shard's counters.
    pub metrics: whep_core::Metrics,
    /// Its streams, with its own viewers.
    pub streams: Vec<StreamInfo>,
    /// Its viewers.
    pub viewers: usize,
    /// Its loop's load ([`Core::load`]).
    pub load: f64,
    /// Whether it refuses new viewers because of load.
    pub overloaded: bool,
    /// Its connected viewers by transport.
    pub transport: whep_core::TransportCounts,
    /// Its open ICE-TCP connections.
    pub tcp_connections: usize,
    /// Its requests waiting for the authorisation callback ([`Core::pending_requests`]).
    pub auth_pending: usize,
    /// Its viewer socket's public address learned from STUN ([`Core::stun_mapped`]).
    pub stun_mapped: Option<SocketAddr>,
    /// Its viewers' sessions, for the sessions listing only ([`ShardView::with_sessions`]);
    /// empty otherwise.
    pub sessions: Vec<SessionInfo>,
}

impl ShardView {
    /// A snapshot of `core`, with its sessions as of `now` if `sessions`.
    pub fn with_sessions(core: &Core, now: Instant, sessions: bool) -> Self {
        let mut view = Self::of(core);
        if sessions {
            view.sessions = core.sessions(now);
        }
        view
    }

    /// A snapshot of `core`.
    pub fn of(core: &Core) -> Self {
        Self {
            sessions: Vec::new(),
            metrics: core.metrics().clone(),
            streams: core.streams(),
            viewers: core.viewer_count(),
            load: core.load(),
            overloaded: core.is_overloaded(),
            transport: core.viewers_by_transport(),
            tcp_connections: core.tcp_connections(),
            auth_pending: core.pending_requests(),
            stun_mapped: core.stun_mapped(),
        }
    }
}

/// The whole node's readiness (`/ready`): the leader's ([`Core::readiness`]: draining and the
/// total viewer cap are node-wide already), and `overloaded` when any shard refuses new viewers
/// because of load, as `whep_overloaded` counts it (a POST goes to the shard with the fewest
/// viewers, which may be that one).
pub fn node_readiness(core: &Core, followers: &[ShardView]) -> Result<(), &'static str> {
    core.readiness()?;
    if followers.iter().any(|f| f.overloaded) { Err("overloaded") } else { Ok(()) }
}

/// The leader's streams with the viewers of `followers` added.
pub fn merged_streams(core: &Core, followers: &[ShardView]) -> Vec<StreamInfo> {
    let mut streams = core.streams();
    for s in &mut streams {
        for f in followers {
            if let Some(other) = f.streams.iter().find(|o| o.id == s.id) {
                s.viewers += other.viewers;
                s.connected_viewers += other.connected_viewers;
                for (mine, theirs) in s.renditions.iter_mut().zip(&other.renditions) {
                    mine.viewers += theirs.viewers;
                }
            }
        }
    }
    streams
}

/// Whether answering `req` on the leader of a sharded server needs the other shards' views
/// (`/metrics`, `/ready`, `/streams`, the admin API's listings).
pub fn shows_totals(req: &WhepRequest) -> bool {
    let path = req.target.split('?').next().unwrap_or_default();
    matches!(req.method, Method::Get | Method::Head)
        && (path == "/metrics"
            || path == "/ready"
            || path == "/streams"
            || path.starts_with("/api/streams")
            || path == "/api/sessions"
            || path == "/api/sessions/")
}

/// Whether answering `req` lists sessions (the followers' views must carry theirs).
pub fn lists_sessions(req: &WhepRequest) -> bool {
    let path = req.target.split('?').next().unwrap_or_default().trim_end_matches('/');
    matches!(req.method, Method::Get | Method::Head)
        && (path == "/api/sessions"
            || path.starts_with("/api/streams/") && path.ends_with("/sessions"))
}

/// The session a request to `/api/sessions/{id}` names, for routing it to its shard.
pub fn session_route(req: &WhepRequest) -> Option<SessionId> {
    let path = req.target.split('?').next().unwrap_or_default();
    SessionId::parse(path.strip_prefix("/api/sessions/")?.trim_end_matches('/'))
}

/// Answers one request to the application routes (see the [module docs](self)); anything under
/// the WHEP prefix or unknown goes to [`Core::handle_http`].
pub fn handle(
    core: &mut Core,
    routes: &RoutesConfig,
    req: WhepRequest,
    now: Instant,
) -> WhepResponse {
    handle_sharded(core, routes, req, now, &[])
}

/// [`handle`] on the leader of a sharded server: listings and `/metrics` count the viewers,
/// counters and loads of the `followers` too.
pub fn handle_sharded(
    core: &mut Core,
    routes: &RoutesConfig,
    req: WhepRequest,
    now: Instant,
    followers: &[ShardView],
) -> WhepResponse {
    match reply_sharded(core, routes, req, now, followers) {
        Reply::Ready(r) => r,
        Reply::Listing(listing) => listing.render(),
        // `dispatch` leaves nothing pending when it may not wait.
        Reply::Pending(id) => {
            core.cancel_request(id);
            unavailable()
        }
    }
}

/// [`handle_sharded`] that leaves a sessions listing unserialised ([`Reply::Listing`]), for a
/// caller that renders it off the engine's task. Never [`Reply::Pending`].
pub fn reply_sharded(
    core: &mut Core,
    routes: &RoutesConfig,
    req: WhepRequest,
    now: Instant,
    followers: &[ShardView],
) -> Reply {
    dispatch(core, routes, req, now, followers, false)
}

/// An answer of the application routes ([`handle_request`]).
#[derive(Debug)]
pub enum Reply {
    /// The response, at once.
    Ready(WhepResponse),
    /// A WHEP request waiting for the authorisation callback: the response comes as
    /// [`Output::Respond`](whep_core::Output::Respond) with this id.
    Pending(RequestId),
    /// A sessions listing, taken from the core and not yet serialised: [`Listing::render`] makes
    /// the response. Serialising 500 sessions takes milliseconds; a runtime does it on the HTTP
    /// connection's task, not on the engine's, whose packets would wait.
    Listing(Listing),
}

impl From<WhepResponse> for Reply {
    fn from(r: WhepResponse) -> Self {
        Self::Ready(r)
    }
}

impl From<Answer> for Reply {
    fn from(a: Answer) -> Self {
        match a {
            Answer::Ready(r) => Self::Ready(r),
            Answer::Pending(id) => Self::Pending(id),
        }
    }
}

impl Reply {
    /// The response, rendering a listing here; `None` while pending.
    pub fn into_response(self) -> Option<WhepResponse> {
        match self {
            Self::Ready(r) => Some(r),
            Self::Listing(listing) => Some(listing.render()),
            Self::Pending(_) => None,
        }
    }
}

/// A sessions listing of the sessions API ([`Reply::Listing`]).
#[derive(Debug)]
pub struct Listing {
    /// Status and headers; the body is the rendered list.
    head: WhepResponse,
    sessions: Vec<SessionInfo>,
    wall: Option<std::time::SystemTime>,
    /// False for a HEAD request.
    with_body: bool,
}

impl Listing {
    /// The sessions (every shard's, ordered by stream, then age) as a JSON array.
    pub fn render(self) -> WhepResponse {
        if !self.with_body {
            return self.head;
        }
        let mut sessions = self.sessions;
        sessions.sort_by(|a, b| a.stream.cmp(&b.stream).then(b.age.cmp(&a.age)));
        let rows: Vec<SessionRow<'_>> =
            sessions.iter().map(|s| SessionRow::new(s, self.wall)).collect();
        match serde_json::to_vec(&rows) {
            Ok(body) => {
                let WhepResponse { status, headers, .. } = self.head;
                WhepResponse { status, headers, body }
            }
            Err(e) => error(StatusCode::InternalServerError, &e.to_string()),
        }
    }

    /// How many sessions it lists.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether it lists none.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

/// [`handle`] for a runtime that serves the authorisation callback
/// ([`whep_core::auth`]): a WHEP request may be left pending
/// ([`Core::handle_request`]).
pub fn handle_request(
    core: &mut Core,
    routes: &RoutesConfig,
    req: WhepRequest,
    now: Instant,
) -> Reply {
    dispatch(core, routes, req, now, &[], true)
}

fn dispatch(
    core: &mut Core,
    routes: &RoutesConfig,
    req: WhepRequest,
    now: Instant,
    followers: &[ShardView],
    can_wait: bool,
) -> Reply {
    let whep = |core: &mut Core, req: WhepRequest| -> Reply {
        if can_wait {
            core.handle_request(req, now).into()
        } else {
            core.handle_http(req, now).into()
        }
    };
    if !plain_host(&req) {
        let resp = error(StatusCode::BadRequest, "bad Host header");
        core.count_request("other", &req.method, resp.code());
        return resp.into();
    }
    let path = req.target.split('?').next().unwrap_or_default().to_owned();
    let prefix = core.config().whep_prefix.clone();
    if path.starts_with(&format!("{prefix}/")) {
        return whep(core, req);
    }
    let get = matches!(req.method, Method::Get | Method::Head);
    let (label, reply): (_, Reply) = match path.as_str() {
        "/" | "/index.html" if get => {
            let ice = if core.config().ice_servers.is_empty() { "0" } else { "1" };
            let page = PLAYER_HTML
                .replace("__WHEP_PREFIX__", &json_escape(&prefix))
                .replace("__ICE_SERVERS__", ice);
            ("player", text(StatusCode::Ok, "text/html; charset=utf-8", page).into())
        }
        "/healthz" if get => ("healthz", text(StatusCode::Ok, "text/plain", "ok\n").into()),
        "/ready" if get => match node_readiness(core, followers) {
            Ok(()) => ("ready", text(StatusCode::Ok, "text/plain", "ready\n").into()),
            Err(why) => (
                "ready",
                text(StatusCode::ServiceUnavailable, "text/plain", format!("{why}\n"))
                    .with("Retry-After", core.config().retry_after_secs.to_string())
                    .into(),
            ),
        },
        "/metrics" if get => {
            let mut page = render_prometheus_sharded(core, followers);
            render_webhook(&mut page, routes.webhook.as_ref());
            (
                "metrics",
                text(StatusCode::Ok, "text/plain; version=0.0.4; charset=utf-8", page).into(),
            )
        }
        "/streams" if get => {
            let list: Vec<_> = merged_streams(core, followers)
                .iter()
                .map(|s| {
                    serde_json::json!({"id": s.id.as_str(), "state": s.state.as_str(), "viewers": s.viewers})
                })
                .collect();
            ("streams", json(StatusCode::Ok, &serde_json::Value::Array(list)).into())
        }
        p if p == "/api/streams" || p.starts_with("/api/streams/") => {
            ("admin", admin(core, routes, &req, &p["/api/streams".len()..], now, followers))
        }
        p if p == "/api/sessions" || p.starts_with("/api/sessions/") => {
            ("sessions", sessions(core, routes, &req, &p["/api/sessions".len()..], now, followers))
        }
        "/" | "/index.html" | "/healthz" | "/ready" | "/metrics" | "/streams" => (
            "other",
            error(StatusCode::MethodNotAllowed, "method not allowed")
                .with("Allow", "GET, HEAD")
                .into(),
        ),
        _ => return whep(core, req),
    };
    let cors = core.config().cors_origin.clone();
    let head = req.method == Method::Head;
    match reply {
        Reply::Ready(resp) => {
            let resp = resp.with("Access-Control-Allow-Origin", cors);
            core.count_request(label, &req.method, resp.code());
            Reply::Ready(if head { WhepResponse { body: Vec::new(), ..resp } } else { resp })
        }
        Reply::Listing(mut listing) => {
            listing.head = listing.head.with("Access-Control-Allow-Origin", cors);
            listing.with_body = !head;
            core.count_request(label, &req.method, listing.head.code());
            Reply::Listing(listing)
        }
        pending @ Reply::Pending(_) => pending,
    }
}

/// Whether the request has at most one `Host` field, and it names a host and port only.
///
/// Routing uses the request target alone, but an HTTP library that builds a URL from
/// `http://{Host}{target}` (http-types' servers do) would route `Host: x/metrics?` to
/// `/metrics`; a proxy in front may also route on `Host`. Such a request is refused
/// (RFC 9112 §3.2: 400 for an invalid or repeated `Host`) rather than answered on a route the
/// client did not name in its target. [`handle`] checks it; a runtime that serves the WHEP
/// routes alone from such a URL checks it itself.
pub fn plain_host(req: &WhepRequest) -> bool {
    let mut hosts = req.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("host"));
    match (hosts.next(), hosts.next()) {
        (Some((_, host)), None) => !host.contains(['/', '?', '#', '\\']),
        (None, _) => true,
        (Some(_), Some(_)) => false,
    }
}

/// The admin API's guard (also the sessions API's): a configured token, presented as
/// `Authorization: Bearer`, within the client's budget of failed attempts.
fn authorize(
    core: &mut Core,
    routes: &RoutesConfig,
    req: &WhepRequest,
    now: Instant,
) -> Result<(), WhepResponse> {
    let Some(token) = &routes.admin_token else {
        return Err(error(StatusCode::Forbidden, "admin API disabled: configure an admin token"));
    };
    // A client whose failures used up its budget is refused before its token is compared,
    // so a right guess looks no different from a wrong one.
    if let Err(wait) = core.admin_admit(req.client, now) {
        let secs = wait.as_millis().div_ceil(1000).max(1);
        return Err(error(
            StatusCode::TooManyRequests,
            "admin API: too many failed authentications",
        )
        .with("Retry-After", secs.to_string()));
    }
    let presented = req.header("authorization").and_then(|v| v.strip_prefix("Bearer "));
    if !presented.is_some_and(|p| constant_time_eq(p.trim().as_bytes(), token.as_bytes())) {
        core.admin_failed(req.client, now);
        return Err(error(StatusCode::Unauthorized, "admin API: missing or wrong bearer token")
            .with("WWW-Authenticate", "Bearer"));
    }
    Ok(())
}

/// The sessions API (`/api/sessions`, `rest` is what follows), behind the admin guard.
fn sessions(
    core: &mut Core,
    routes: &RoutesConfig,
    req: &WhepRequest,
    rest: &str,
    now: Instant,
    followers: &[ShardView],
) -> Reply {
    if let Err(refused) = authorize(core, routes, req, now) {
        return refused.into();
    }
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    match (&req.method, segments.as_slice()) {
        (Method::Get | Method::Head, []) => {
            let stream = query_param(&req.target, "stream");
            let list = all_sessions(core, now, followers, |s| {
                stream.as_deref().is_none_or(|id| s.stream.as_str() == id)
            });
            sessions_listing(list, req.wall_time)
        }
        (method, [raw]) => session(core, req, method, raw, now).into(),
        _ => error(StatusCode::MethodNotAllowed, "method not allowed").into(),
    }
}

/// `/api/sessions/{id}`: one viewer, or kicking it.
fn session(
    core: &mut Core,
    req: &WhepRequest,
    method: &Method,
    raw: &str,
    now: Instant,
) -> WhepResponse {
    let Some(id) = SessionId::parse(raw) else {
        return error(StatusCode::NotFound, "no such session");
    };
    match method {
        Method::Get | Method::Head => match core.session(id, now) {
            Some(s) => json(StatusCode::Ok, &session_json(&s, req.wall_time)),
            None => error(StatusCode::NotFound, "no such session"),
        },
        Method::Delete => match core.kick(id, now) {
            Some(stream) => {
                tracing::info!(session = %id, %stream, "viewer kicked over the admin API");
                WhepResponse::new(StatusCode::NoContent)
            }
            None => error(StatusCode::NotFound, "no such session"),
        },
        _ => error(StatusCode::MethodNotAllowed, "method not allowed")
            .with("Allow", "GET, HEAD, DELETE"),
    }
}

/// Every shard's sessions that `keep` keeps, unordered ([`Listing::render`] orders them).
fn all_sessions(
    core: &Core,
    now: Instant,
    followers: &[ShardView],
    keep: impl Fn(&SessionInfo) -> bool,
) -> Vec<SessionInfo> {
    let mut list: Vec<SessionInfo> = core.sessions(now).into_iter().filter(|s| keep(s)).collect();
    for f in followers {
        list.extend(f.sessions.iter().filter(|s| keep(s)).cloned());
    }
    list
}

/// A query parameter's value, percent-decoded.
fn query_param(target: &str, name: &str) -> Option<String> {
    let query = target.split_once('?')?.1;
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name)
            .then(|| percent_encoding::percent_decode_str(v).decode_utf8().ok())
            .flatten()
            .map(|v| v.into_owned())
    })
}

/// The sessions as a JSON array, to be serialised straight from [`SessionRow`]s by
/// [`Listing::render`] (a `json!` value per session made 500 sessions cost 9.1 ms, against
/// 2.8 ms; `sessions_listing_cost`).
fn sessions_listing(sessions: Vec<SessionInfo>, wall: Option<std::time::SystemTime>) -> Reply {
    let head = text(StatusCode::Ok, "application/json", Vec::new());
    Reply::Listing(Listing { head, sessions, wall, with_body: true })
}

/// One session as the sessions API lists it ([`session_json`]).
#[derive(Debug, Serialize)]
struct SessionRow<'a> {
    session: String,
    stream: &'a str,
    client: Option<String>,
    user_agent: Option<&'a str>,
    state: &'static str,
    transport: Option<&'static str>,
    candidate_pair: Option<PairRow>,
    joined_at: Option<f64>,
    age_secs: f64,
    connected_since: Option<f64>,
    connected_secs: Option<f64>,
    packets_sent: u64,
    bytes_sent: u64,
    retransmissions: u64,
    nacks: u64,
    plis: u64,
    firs: u64,
    loss: Option<f32>,
    rtt_ms: Option<f64>,
    send_rate: Option<u64>,
    rendition: u8,
    codec: Option<&'static str>,
    target_rendition: Option<u8>,
    keyframes_only: bool,
    pacing_rate: Option<u64>,
    held_packets: usize,
}

#[derive(Debug, Serialize)]
struct PairRow {
    local: Option<String>,
    remote: String,
    protocol: &'static str,
}

impl<'a> SessionRow<'a> {
    fn new(s: &'a SessionInfo, wall: Option<std::time::SystemTime>) -> Self {
        let unix = |ago: Duration| {
            wall.and_then(|w| w.checked_sub(ago))
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0)
        };
        Self {
            session: s.session.to_string(),
            stream: s.stream.as_str(),
            client: s.client.map(|c| c.to_string()),
            user_agent: s.user_agent.as_deref(),
            state: s.state.as_str(),
            transport: s.transport.map(|t| t.as_str()),
            candidate_pair: s.pair.map(|p| PairRow {
                local: p.local.map(|a| a.to_string()),
                remote: p.remote.to_string(),
                protocol: if p.tcp { "tcp" } else { "udp" },
            }),
            joined_at: unix(s.age),
            age_secs: s.age.as_secs_f64(),
            connected_since: s.connected_for.and_then(unix),
            connected_secs: s.connected_for.map(|d| d.as_secs_f64()),
            packets_sent: s.packets_sent,
            bytes_sent: s.bytes_sent,
            retransmissions: s.retransmissions,
            nacks: s.nacks,
            plis: s.plis,
            firs: s.firs,
            loss: s.loss,
            rtt_ms: s.rtt.map(|d| d.as_secs_f64() * 1000.0),
            send_rate: s.send_rate,
            rendition: s.rendition,
            codec: s.codec.map(|c| c.name()),
            target_rendition: s.target_rendition,
            keyframes_only: s.keyframes_only,
            pacing_rate: s.pacing,
            held_packets: s.held_packets,
        }
    }
}

/// One session as the sessions API lists it. Rates are bytes per second; times are Unix
/// seconds (from the request's wall-clock time, `null` without one) and `age_secs` /
/// `connected_secs` durations; `loss` is a fraction (0 to 1) and `rtt_ms` milliseconds, both as
/// the viewer's RTCP receiver reports state them (`null` before the first).
pub fn session_json(s: &SessionInfo, wall: Option<std::time::SystemTime>) -> serde_json::Value {
    serde_json::to_value(SessionRow::new(s, wall)).unwrap_or_default()
}

/// The webhook's counters in Prometheus text (zero without a webhook).
fn render_webhook(out: &mut String, webhook: Option<&crate::webhook::Webhook>) {
    let (delivered, dropped, failures) =
        webhook.map_or((0, 0, 0), |w| (w.delivered(), w.dropped(), w.failures()));
    for (name, help, n) in [
        ("webhook_delivered_total", "Events the webhook receiver accepted (2xx).", delivered),
        ("webhook_dropped_total", "Events dropped because the webhook queue was full.", dropped),
        ("webhook_failures_total", "Events given up after every webhook attempt failed.", failures),
    ] {
        let _ =
            writeln!(out, "# HELP whep_{name} {help}\n# TYPE whep_{name} counter\nwhep_{name} {n}");
    }
}

fn admin(
    core: &mut Core,
    routes: &RoutesConfig,
    req: &WhepRequest,
    rest: &str,
    now: Instant,
    followers: &[ShardView],
) -> Reply {
    if let Err(refused) = authorize(core, routes, req, now) {
        return refused.into();
    }
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    if let (Method::Get | Method::Head, [raw, "sessions"]) = (&req.method, segments.as_slice()) {
        let Some(id) = stream_id(raw) else {
            return error(StatusCode::NotFound, "no such stream").into();
        };
        if core.stream(&id).is_none() {
            return error(StatusCode::NotFound, "no such stream").into();
        }
        let list = all_sessions(core, now, followers, |s| s.stream == id);
        return sessions_listing(list, req.wall_time);
    }
    streams_admin(core, routes, req, &segments, now, followers).into()
}

/// A stream id in a path segment, percent-decoded.
fn stream_id(raw: &str) -> Option<StreamId> {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()
        .and_then(|s| StreamId::new(s.into_owned()))
}

/// The admin API's stream routes but a stream's sessions (`segments` follow `/api/streams`).
fn streams_admin(
    core: &mut Core,
    routes: &RoutesConfig,
    req: &WhepRequest,
    segments: &[&str],
    now: Instant,
    followers: &[ShardView],
) -> WhepResponse {
    let id = stream_id;
    match (&req.method, segments) {
        (Method::Get, []) => {
            let list: Vec<_> = merged_streams(core, followers).iter().map(info_json).collect();
            json(StatusCode::Ok, &serde_json::Value::Array(list))
        }
        (Method::Post, []) => {
            // `{"id": .., ..spec}`; the id is taken out so that the spec's unknown-field check
            // still applies (serde's flatten would disable it).
            let parsed =
                serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&req.body)
                    .map_err(|e| e.to_string())
                    .and_then(|mut map| {
                        let id = map.remove("id").and_then(|v| v.as_str().map(str::to_owned));
                        let id = id.ok_or_else(|| "missing string field `id`".to_owned())?;
                        let spec: StreamSpec =
                            serde_json::from_value(serde_json::Value::Object(map))
                                .map_err(|e| e.to_string())?;
                        Ok((id, spec))
                    });
            let (id, spec) = match parsed {
                Ok(p) => p,
                Err(e) => return error(StatusCode::BadRequest, &format!("bad stream: {e}")),
            };
            let Some(id) = StreamId::new(id) else {
                return error(StatusCode::BadRequest, "bad stream id");
            };
            let config = match routes.policy.stream_config(&spec) {
                Ok(c) => c,
                Err(Refused::Forbidden(why)) => return error(StatusCode::Forbidden, &why),
                Err(Refused::Invalid(e)) => {
                    return error(StatusCode::BadRequest, &format!("bad stream: {e}"));
                }
            };
            if let Err(e) = core.add_stream(id.clone(), config) {
                return stream_error(&e);
            }
            if spec.autostart()
                && let Err(e) = core.start_stream(&id, now)
            {
                return stream_error(&e);
            }
            let info = core.stream(&id).map(|s| info_json(&s)).unwrap_or_default();
            let segment =
                percent_encoding::utf8_percent_encode(id.as_str(), whep_core::whep::SEGMENT);
            json(StatusCode::Created, &info).with("Location", format!("/api/streams/{segment}"))
        }
        (method, [raw, action @ ..]) => {
            let Some(id) = id(raw) else { return error(StatusCode::NotFound, "no such stream") };
            let result = match (method, action) {
                (Method::Get, []) => Ok(()),
                (Method::Delete, []) => core.remove_stream(&id, now),
                (Method::Post, ["start"]) => core.start_stream(&id, now),
                (Method::Post, ["stop"]) => core.stop_stream(&id, now),
                _ => return error(StatusCode::MethodNotAllowed, "method not allowed"),
            };
            match result {
                Err(e) => stream_error(&e),
                Ok(()) if *method == Method::Delete => WhepResponse::new(StatusCode::NoContent),
                Ok(()) => match merged_streams(core, followers).into_iter().find(|s| s.id == id) {
                    Some(info) => json(StatusCode::Ok, &info_json(&info)),
                    None => error(StatusCode::NotFound, "no such stream"),
                },
            }
        }
        _ => error(StatusCode::MethodNotAllowed, "method not allowed"),
    }
}

fn info_json(s: &StreamInfo) -> serde_json::Value {
    serde_json::json!({
        "id": s.id.as_str(),
        "state": s.state.as_str(),
        "enabled": s.enabled,
        "supervised": s.supervised,
        "pid": s.pid,
        "ports": s.ports.map(|p| [p.video, p.audio()]),
        "viewers": s.viewers,
        "connected_viewers": s.connected_viewers,
        "restarts": s.restarts,
        "renditions": s.renditions.iter().map(|r| serde_json::json!({
            "codec": r.codec.name(),
            "bitrate_kbps": r.bitrate_kbps,
            "viewers": r.viewers,
        })).collect::<Vec<_>>(),
    })
}

fn stream_error(e: &StreamError) -> WhepResponse {
    let status = match e {
        StreamError::NotFound => StatusCode::NotFound,
        StreamError::Exists | StreamError::AlreadyStarted | StreamError::Disabled => {
            StatusCode::Conflict
        }
        StreamError::NoPorts => StatusCode::ServiceUnavailable,
        StreamError::InvalidConfig(_) => StatusCode::BadRequest,
    };
    error(status, &e.to_string())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn text(status: StatusCode, content_type: &str, body: impl Into<Vec<u8>>) -> WhepResponse {
    WhepResponse::new(status).with_body(content_type, body).with("Cache-Control", "no-store")
}

fn json(status: StatusCode, value: &serde_json::Value) -> WhepResponse {
    text(status, "application/json", value.to_string())
}

fn error(status: StatusCode, message: &str) -> WhepResponse {
    json(status, &serde_json::json!({ "error": message }))
}

fn json_escape(s: &str) -> String {
    let quoted = serde_json::Value::String(s.to_owned()).to_string();
    quoted[1..quoted.len() - 1].to_owned()
}

/// Renders the core's counters and per-stream gauges as Prometheus text (exposition format
/// 0.0.4). Labels are route, method, status, reason and stream; never a session.
pub fn render_prometheus(core: &Core) -> String {
    render_prometheus_sharded(core, &[])
}

/// [`render_prometheus`] for the leader of a sharded server: counters summed over all shards,
/// viewers counted on all, `whep_engine_load` the highest shard's, and per-shard
/// `whep_shard_load` and `whep_shard_viewers`.
pub fn render_prometheus_sharded(core: &Core, followers: &[ShardView]) -> String {
    fn head(out: &mut String, name: &str, kind: &str, help: &str) {
        let _ = writeln!(out, "# HELP whep_{name} {help}\n# TYPE whep_{name} {kind}");
    }
    let mut merged;
    let m = if followers.is_empty() {
        core.metrics()
    } else {
        merged = core.metrics().clone();
        followers.iter().for_each(|f| merged.merge(&f.metrics));
        &merged
    };
    let mut out = String::with_capacity(4096);
    head(&mut out, "requests_total", "counter", "HTTP requests by route, method and status.");
    for ((route, method, status), n) in &m.requests {
        let _ = writeln!(
            out,
            "whep_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {n}"
        );
    }
    head(&mut out, "rejections_total", "counter", "Refused requests by reason.");
    for (reason, n) in &m.rejections {
        let _ = writeln!(out, "whep_rejections_total{{reason=\"{reason}\"}} {n}");
    }
    let counters = [
        ("cap_rejections_total", "POSTs refused by a viewer cap.", m.cap_rejections),
        ("viewers_joined_total", "Viewers created by a POST.", m.viewers_joined),
        ("viewers_connected_total", "Viewers whose ICE and DTLS completed.", m.viewers_connected),
        ("viewers_left_total", "Viewers removed, for any reason.", m.viewers_left),
        ("ice_failures_total", "Viewers that never connected or were lost.", m.ice_failures),
        (
            "unchecked_sessions_total",
            "Viewers closed for sending no ICE check in time.",
            m.unchecked_sessions,
        ),
        (
            "addresses_refused_total",
            "ICE checks from a source address beyond a session's limit, dropped.",
            m.addresses_refused,
        ),
        ("keyframe_requests_total", "PLI/FIR from viewers.", m.keyframe_requests),
        ("ffmpeg_restarts_total", "Restarts of supervised FFmpeg processes.", m.process_restarts),
        (
            "cached_keyframes_total",
            "Keyframe requests answered from the GOP cache.",
            m.cached_keyframes,
        ),
        (
            "early_nominations_total",
            "Viewers whose first DTLS nominated its pair (no wait for USE-CANDIDATE).",
            m.early_nominations,
        ),
        ("path_moves_total", "Viewers whose media followed their new address.", m.path_moves),
        (
            "rendition_switches_total",
            "Viewers moved between renditions of their codec.",
            m.rendition_switches,
        ),
        (
            "keyframes_only_total",
            "Lossy viewers without a lower rendition put on keyframes only.",
            m.keyframes_only,
        ),
        (
            "paced_viewers_total",
            "Viewers whose video is paced since their reports showed loss.",
            m.paced_viewers,
        ),
        (
            "known_path_starts_total",
            "Viewers started on the rung and pace an earlier session from their address left.",
            m.known_path_starts,
        ),
        ("gop_primes_total", "Viewers started with the cached GOP.", m.gop_primes),
        (
            "prime_backlogs_dropped_total",
            "Paced backlogs (GOP primes, paced live video) dropped for falling behind live.",
            m.prime_backlogs_dropped,
        ),
        (
            "packets_retransmitted_total",
            "Video packets retransmitted on NACK.",
            m.packets_retransmitted,
        ),
        ("bytes_retransmitted_total", "Bytes of those retransmissions.", m.bytes_retransmitted),
        (
            "retransmissions_dropped_total",
            "Retransmissions over a viewer's share, dropped.",
            m.retransmissions_dropped,
        ),
        (
            "retransmission_suspensions_total",
            "Times a viewer's retransmissions were turned off for exceeding its share.",
            m.retransmission_suspensions,
        ),
        (
            "mirror_packets_dropped_total",
            "Packets dropped for a shard that fell behind.",
            m.mirror_packets_dropped,
        ),
        ("tcp_connections_total", "ICE-TCP connections accepted.", m.tcp_accepted),
        (
            "tcp_connections_refused_total",
            "ICE-TCP connections closed at once (over the limit).",
            m.tcp_refused,
        ),
        (
            "tcp_unbound_closed_total",
            "ICE-TCP connections closed for naming no viewer in time.",
            m.tcp_unbound_closed,
        ),
        (
            "tcp_framing_errors_total",
            "ICE-TCP connections closed for bytes that are not RFC 4571 framing.",
            m.tcp_framing_errors,
        ),
        ("tcp_frames_in_total", "RFC 4571 frames received from viewers.", m.tcp_frames_in),
        (
            "tcp_frames_dropped_total",
            "Frames dropped whole for TCP viewers whose send queue was full.",
            m.tcp_frames_dropped,
        ),
        (
            "stun_mapped_changes_total",
            "Times the public address learned from STUN changed (the first one not counted).",
            m.stun_mapped_changes,
        ),
        (
            "stun_failures_total",
            "STUN transactions that failed (no answer after retransmissions, or an error).",
            m.stun_failures,
        ),
        ("ingest_packets_total", "Datagrams received from FFmpeg.", m.ingest_packets),
        ("ingest_rtcp_total", "RTCP from FFmpeg, dropped.", m.ingest_rtcp),
        (
            "ingest_dropped_total",
            "Malformed or oversized ingest datagrams, dropped.",
            m.ingest_dropped,
        ),
        (
            "ingest_rejected_total",
            "Ingest datagrams from another sender than the stream's FFmpeg, dropped.",
            m.ingest_rejected,
        ),
        ("datagrams_in_total", "Datagrams on the viewer socket.", m.datagrams_in),
        ("datagrams_dropped_total", "Viewer datagrams matching no viewer.", m.datagrams_dropped),
        ("packets_forwarded_total", "RTP packets written to viewers.", m.packets_forwarded),
        ("bytes_forwarded_total", "RTP payload bytes written to viewers.", m.bytes_forwarded),
    ];
    for (name, help, value) in counters {
        head(&mut out, name, "counter", help);
        let _ = writeln!(out, "whep_{name} {value}");
    }
    let streams = merged_streams(core, followers);
    head(&mut out, "viewers", "gauge", "Viewers per stream.");
    for s in &streams {
        let _ = writeln!(
            out,
            "whep_viewers{{stream=\"{}\"}} {}",
            prom_escape(s.id.as_str()),
            s.viewers
        );
    }
    head(&mut out, "rendition_viewers", "gauge", "Viewers per video rendition of a stream.");
    for s in &streams {
        for (k, r) in s.renditions.iter().enumerate() {
            let _ = writeln!(
                out,
                "whep_rendition_viewers{{stream=\"{}\",rendition=\"{k}\",codec=\"{}\"}} {}",
                prom_escape(s.id.as_str()),
                r.codec,
                r.viewers
            );
        }
    }
    head(&mut out, "stream_up", "gauge", "1 while the stream's ingest is running.");
    for s in &streams {
        let up = u8::from(s.state == StreamStatus::Running);
        let _ = writeln!(out, "whep_stream_up{{stream=\"{}\"}} {up}", prom_escape(s.id.as_str()));
    }
    head(
        &mut out,
        "viewers_transport",
        "gauge",
        "Connected viewers by the transport of their media.",
    );
    let mut by = core.viewers_by_transport();
    for f in followers {
        by.udp += f.transport.udp;
        by.tcp += f.transport.tcp;
        by.relayed += f.transport.relayed;
    }
    for (name, n) in [("udp", by.udp), ("tcp", by.tcp), ("relayed", by.relayed)] {
        let _ = writeln!(out, "whep_viewers_transport{{transport=\"{name}\"}} {n}");
    }
    head(&mut out, "tcp_connections", "gauge", "Open ICE-TCP connections.");
    let conns = core.tcp_connections() + followers.iter().map(|f| f.tcp_connections).sum::<usize>();
    let _ = writeln!(out, "whep_tcp_connections {conns}");
    head(
        &mut out,
        "auth_pending",
        "gauge",
        "Requests waiting for the authorisation callback or for JWT keys.",
    );
    let pending = core.pending_requests() + followers.iter().map(|f| f.auth_pending).sum::<usize>();
    let _ = writeln!(out, "whep_auth_pending {pending}");
    head(&mut out, "viewers_current", "gauge", "Viewers of all streams.");
    let viewers = core.viewer_count() + followers.iter().map(|f| f.viewers).sum::<usize>();
    let _ = writeln!(out, "whep_viewers_current {viewers}");
    head(
        &mut out,
        "engine_load",
        "gauge",
        "Share of its time the engine loop spent working, over about the last second.",
    );
    let load = followers.iter().map(|f| f.load).fold(core.load(), f64::max);
    let _ = writeln!(out, "whep_engine_load {load:.3}");
    head(&mut out, "overloaded", "gauge", "1 while new viewers are refused because of load.");
    let overloaded = core.is_overloaded() || followers.iter().any(|f| f.overloaded);
    let _ = writeln!(out, "whep_overloaded {}", u8::from(overloaded));
    head(&mut out, "draining", "gauge", "1 while the node drains (SIGTERM): no new viewers.");
    let _ = writeln!(out, "whep_draining {}", u8::from(core.is_draining()));
    if !followers.is_empty() {
        let shards: Vec<(f64, usize)> = std::iter::once((core.load(), core.viewer_count()))
            .chain(followers.iter().map(|f| (f.load, f.viewers)))
            .collect();
        head(&mut out, "shard_load", "gauge", "Share of its time each shard's loop spent working.");
        for (i, (load, _)) in shards.iter().enumerate() {
            let _ = writeln!(out, "whep_shard_load{{shard=\"{i}\"}} {load:.3}");
        }
        head(&mut out, "shard_viewers", "gauge", "Viewers per shard.");
        for (i, (_, viewers)) in shards.iter().enumerate() {
            let _ = writeln!(out, "whep_shard_viewers{{shard=\"{i}\"}} {viewers}");
        }
    }
    let mapped: Vec<(usize, SocketAddr)> = std::iter::once(core.stun_mapped())
        .chain(followers.iter().map(|f| f.stun_mapped))
        .enumerate()
        .filter_map(|(i, m)| Some((i, m?)))
        .collect();
    if !mapped.is_empty() {
        head(
            &mut out,
            "stun_mapped_address",
            "gauge",
            "The public address each shard's viewer socket learned from STUN and advertises (1).",
        );
        for (i, addr) in mapped {
            let _ = writeln!(out, "whep_stun_mapped_address{{shard=\"{i}\",address=\"{addr}\"}} 1");
        }
    }
    head(&mut out, "ingest_port_pairs_in_use", "gauge", "Ingest port pairs held.");
    let _ = writeln!(out, "whep_ingest_port_pairs_in_use {}", core.ports_in_use());
    let latencies = [
        (
            "egress_latency_seconds",
            "From an ingest packet's arrival to having sent it to every viewer.",
            &m.egress_latency,
        ),
        (
            "egress_copy_latency_seconds",
            "From an ingest packet's arrival to sending one viewer's copy (every copy counted).",
            &m.copy_latency,
        ),
    ];
    for (name, help, h) in latencies {
        head(&mut out, name, "histogram", help);
        for (bound, n) in h.buckets() {
            let le = bound.map_or_else(|| "+Inf".to_owned(), |b| format!("{:e}", b.as_secs_f64()));
            let _ = writeln!(out, "whep_{name}_bucket{{le=\"{le}\"}} {n}");
        }
        let _ = writeln!(out, "whep_{name}_sum {}", h.sum().as_secs_f64());
        let _ = writeln!(out, "whep_{name}_count {}", h.count());
    }
    out
}

fn prom_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_sources_are_exclusive() {
        assert!(StreamSpec::default().to_config().is_err());
        let both =
            StreamSpec { url: Some("rtsp://x".into()), external: true, ..Default::default() };
        assert!(both.to_config().is_err());
        let demo = StreamSpec::demo().to_config().expect("demo is valid");
        assert!(demo.egress.force_transcode);
        assert_eq!(demo.egress.gop, 60);
        assert_eq!(demo.egress.audio_map, "1:a:0");
        let bad = StreamSpec { profile: Some("ultra".into()), ..StreamSpec::demo() };
        assert!(bad.to_config().expect_err("bad profile").contains("ultra"));
    }

    #[test]
    fn spec_parses_from_json_and_rejects_unknown_fields() {
        let spec: StreamSpec =
            serde_json::from_str(r#"{"file":"a.mp4","max_viewers":3}"#).expect("valid");
        assert_eq!(spec.to_config().expect("valid").max_viewers, Some(3));
        assert!(serde_json::from_str::<StreamSpec>(r#"{"fiel":"a.mp4"}"#).is_err());
    }

    fn admin_req(method: Method, target: &str, token: &str, body: &str) -> WhepRequest {
        WhepRequest::new(method, target)
            .with_header("Authorization", format!("Bearer {token}"))
            .with_body(body)
            .with_client([192, 0, 2, 1])
    }

    fn body(r: &WhepResponse) -> String {
        String::from_utf8_lossy(&r.body).into_owned()
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // a real starting instant
    fn player_page_asks_for_ice_servers_only_when_some_are_announced() {
        let now = Instant::now();
        for (servers, flag) in [(vec![], "\"0\" === '1'"), (vec![true], "\"1\" === '1'")] {
            let ice_servers =
                servers.iter().map(|_| whep_core::IceServer::new("turn:t:3478")).collect();
            let mut core = Core::new(CoreConfig { ice_servers, ..CoreConfig::default() }, now);
            let page = handle(
                &mut core,
                &RoutesConfig::default(),
                WhepRequest::new(Method::Get, "/"),
                now,
            );
            let page = body(&page);
            assert!(page.contains(&format!("const ICE_SERVERS_ANNOUNCED = {flag};")), "{flag}");
            assert!(!page.contains("__ICE_SERVERS__") && !page.contains("__WHEP_PREFIX__"));
        }
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // a real starting instant
    fn ready_counts_every_shard_of_the_node() {
        let now = Instant::now();
        let mut core = Core::new(CoreConfig::default(), now);
        let routes = RoutesConfig::default();
        let ready = WhepRequest::new(Method::Get, "/ready");
        assert!(shows_totals(&ready), "the leader answers /ready with the shards' views");
        let calm = ShardView::default();
        let busy = ShardView { overloaded: true, load: 0.97, ..ShardView::default() };
        let r = handle_sharded(&mut core, &routes, ready.clone(), now, std::slice::from_ref(&calm));
        assert_eq!((r.code(), body(&r)), (200, "ready\n".to_owned()));
        // The leader (shard 0) is fine, shard 2 is overloaded: the node is not ready.
        let r = handle_sharded(&mut core, &routes, ready, now, &[calm, busy]);
        assert_eq!((r.code(), body(&r)), (503, "overloaded\n".to_owned()));
        assert!(r.header("retry-after").is_some());
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // a real starting instant
    fn admin_posts_are_held_to_the_policy() {
        let now = Instant::now();
        let mut core = Core::new(CoreConfig::default(), now);
        let routes = RoutesConfig { admin_token: Some("t".into()), ..RoutesConfig::default() };
        let post = |core: &mut Core, spec: &str| {
            handle(core, &routes, admin_req(Method::Post, "/api/streams", "t", spec), now)
        };
        for (spec, status, needle) in [
            (r#"{"id":"a","url":"file:/etc/shadow"}"#, 403, "only network protocols"),
            (r#"{"id":"a","file":"/etc/shadow"}"#, 403, "--media-dir"),
            (r#"{"id":"a","lavfi":"testsrc2"}"#, 403, "--admin-raw-ffmpeg"),
            (r#"{"id":"a","args":["-i","/etc/shadow"]}"#, 403, "--admin-raw-ffmpeg"),
            (r#"{"id":"a","url":"rtsp://h/x","external":true}"#, 400, "only one of"),
        ] {
            let r = post(&mut core, spec);
            assert_eq!(r.code(), status, "{spec}: {}", body(&r));
            assert!(body(&r).contains(needle), "{spec}: {}", body(&r));
        }
        assert!(core.streams().is_empty());
        // An accepted URL runs FFmpeg with the protocol whitelist.
        let r = post(&mut core, r#"{"id":"cam","url":"rtsp://127.0.0.1:1/x","autostart":false}"#);
        assert_eq!(r.code(), 201, "{}", body(&r));
        assert_eq!(r.header("location"), Some("/api/streams/cam"));
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // a real starting instant
    fn admin_location_is_percent_encoded() {
        let now = Instant::now();
        let mut core = Core::new(CoreConfig::default(), now);
        let routes = RoutesConfig { admin_token: Some("t".into()), ..RoutesConfig::default() };
        for (id, want) in [
            ("a b", "/api/streams/a%20b"),
            ("a/b", "/api/streams/a%2Fb"),
            ("a%2Fb", "/api/streams/a%252Fb"),
        ] {
            let spec = serde_json::json!({"id": id, "external": true, "autostart": false});
            let req = admin_req(Method::Post, "/api/streams", "t", &spec.to_string());
            let r = handle(&mut core, &routes, req, now);
            assert_eq!(r.code(), 201, "{id}: {}", body(&r));
            let location = r.header("location").unwrap_or_default().to_owned();
            assert_eq!(location, want);
            let r = handle(&mut core, &routes, admin_req(Method::Get, &location, "t", ""), now);
            let got: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
            assert_eq!(got["id"], id, "GET {location}: {}", body(&r));
        }
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // a real starting instant
    fn admin_authentication_failures_are_rate_limited() {
        let t0 = Instant::now();
        let mut config = CoreConfig::default();
        config.rate_limits.requests_per_client = Some(whep_core::Rate::new(2, 4));
        let mut core = Core::new(config, t0);
        let routes = RoutesConfig { admin_token: Some("t".into()), ..RoutesConfig::default() };
        let get = |core: &mut Core, token: &str, t: Instant| {
            handle(core, &routes, admin_req(Method::Get, "/api/streams", token, ""), t)
        };
        // The right token spends nothing.
        for _ in 0..10 {
            assert_eq!(get(&mut core, "t", t0).code(), 200);
        }
        for _ in 0..4 {
            assert_eq!(get(&mut core, "guess", t0).code(), 401);
        }
        // Out of budget: refused before the token is looked at, right or wrong.
        for token in ["guess", "t"] {
            let r = get(&mut core, token, t0);
            assert_eq!(r.code(), 429, "{}", body(&r));
            assert_eq!(r.header("retry-after"), Some("1"));
        }
        assert_eq!(core.metrics().rejections.get("admin_rate_limited"), Some(&2));
        // Another client is not affected; the budget refills at the request rate.
        let other = admin_req(Method::Get, "/api/streams", "t", "").with_client([192, 0, 2, 2]);
        assert_eq!(handle(&mut core, &routes, other, t0).code(), 200);
        assert_eq!(get(&mut core, "t", t0 + Duration::from_millis(500)).code(), 200);
    }

    #[test]
    fn sessions_api_needs_the_admin_token_and_kicks() {
        let (mut w, _, _) = whep_core::sim::SimWorld::with_connected_viewers(2);
        let now = w.now;
        let get = |core: &mut Core, routes: &RoutesConfig, target: &str, token: &str| {
            handle(core, routes, admin_req(Method::Get, target, token, ""), now)
        };
        // No admin token configured: refused, whoever asks.
        let closed = RoutesConfig::default();
        assert_eq!(get(&mut w.core, &closed, "/api/sessions", "t").code(), 403);
        let routes = RoutesConfig { admin_token: Some("t".into()), ..RoutesConfig::default() };
        for target in ["/api/sessions", "/api/streams/bench/sessions"] {
            assert_eq!(get(&mut w.core, &routes, target, "wrong").code(), 401, "{target}");
            let r = get(&mut w.core, &routes, target, "t");
            assert_eq!(r.code(), 200, "{target}: {}", body(&r));
            let list: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
            assert_eq!(list.as_array().map(Vec::len), Some(2), "{target}: {list}");
            assert_eq!(list[0]["stream"], "bench");
            assert_eq!(list[0]["state"], "connected");
            assert!(list[0]["packets_sent"].as_u64().is_some());
        }
        let r = get(&mut w.core, &routes, "/api/streams/nope/sessions", "t");
        assert_eq!(r.code(), 404);
        let r = get(&mut w.core, &routes, "/api/sessions?stream=nope", "t");
        assert_eq!(body(&r), "[]");
        let id = w.core.sessions(now)[0].session.to_string();
        let one = get(&mut w.core, &routes, &format!("/api/sessions/{id}"), "t");
        assert_eq!(one.code(), 200, "{}", body(&one));
        let kick = |core: &mut Core, token: &str| {
            let req = admin_req(Method::Delete, &format!("/api/sessions/{id}"), token, "");
            handle(core, &routes, req, now).code()
        };
        assert_eq!(kick(&mut w.core, "wrong"), 401);
        assert_eq!(w.core.viewer_count(), 2);
        assert_eq!(kick(&mut w.core, "t"), 204);
        assert_eq!(kick(&mut w.core, "t"), 404);
        assert_eq!(w.core.viewer_count(), 1);
        assert_eq!(get(&mut w.core, &routes, &format!("/api/sessions/{id}"), "t").code(), 404);
        assert_eq!(get(&mut w.core, &routes, "/api/sessions/zz", "t").code(), 404);
        // The webhook's counters are in /metrics, zero without one.
        let m = body(&handle(&mut w.core, &routes, WhepRequest::new(Method::Get, "/metrics"), now));
        assert!(m.contains("whep_webhook_dropped_total 0\n"), "{m}");
        assert!(m.contains("whep_webhook_failures_total 0\n"), "{m}");
    }

    /// The time `GET /api/sessions` holds the engine with 500 viewers (the snapshot; the JSON
    /// is rendered on the HTTP connection's task), against the whole request:
    /// `cargo test --release -p whep-server --lib sessions_listing_cost -- --ignored --nocapture`
    #[test]
    #[ignore = "a timing, run by hand"]
    #[allow(clippy::disallowed_methods, clippy::print_stdout)]
    fn sessions_listing_cost() {
        let (mut w, _, _) = whep_core::sim::SimWorld::with_connected_viewers(500);
        let routes = RoutesConfig { admin_token: Some("t".into()), ..RoutesConfig::default() };
        let now = w.now;
        let runs = 200u32;
        let (mut engine, mut render, mut bytes) = (Duration::ZERO, Duration::ZERO, 0);
        for _ in 0..runs {
            let req = admin_req(Method::Get, "/api/sessions", "t", "")
                .with_wall_time(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 31));
            let t = Instant::now();
            let reply = reply_sharded(&mut w.core, &routes, req, now, &[]);
            engine += t.elapsed();
            let Reply::Listing(listing) = reply else { panic!("a listing") };
            let t = Instant::now();
            let r = listing.render();
            render += t.elapsed();
            assert_eq!(r.code(), 200);
            bytes = r.body.len();
        }
        let (engine, render) = (engine / runs, render / runs);
        let t = Instant::now();
        for _ in 0..runs {
            std::hint::black_box(w.core.sessions(now));
        }
        let snapshot = t.elapsed() / runs;
        println!(
            "GET /api/sessions, 500 viewers: {engine:?} on the engine's task (of which \
             Core::sessions {snapshot:?}), {render:?} rendering {bytes} bytes of JSON on the \
             connection's task"
        );
    }

    /// A sessions listing leaves the engine unserialised, and renders to what [`handle`]
    /// answers; HEAD renders no body; errors and single sessions are answered at once.
    #[test]
    fn a_sessions_listing_is_rendered_off_the_engine() {
        let (mut w, _, _) = whep_core::sim::SimWorld::with_connected_viewers(3);
        let now = w.now;
        let routes = RoutesConfig { admin_token: Some("t".into()), ..RoutesConfig::default() };
        let wall = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 31);
        let req = |method: Method, target: &str, token: &str| {
            admin_req(method, target, token, "").with_wall_time(wall)
        };
        for target in ["/api/sessions", "/api/sessions?stream=bench", "/api/streams/bench/sessions"]
        {
            let reply =
                reply_sharded(&mut w.core, &routes, req(Method::Get, target, "t"), now, &[]);
            let Reply::Listing(listing) = reply else { panic!("{target}: not a listing") };
            assert_eq!(listing.len(), 3, "{target}");
            let rendered = listing.render();
            let direct = handle(&mut w.core, &routes, req(Method::Get, target, "t"), now);
            assert_eq!(rendered.code(), 200);
            assert_eq!(rendered.body, direct.body, "{target}");
            assert_eq!(rendered.header("content-type"), Some("application/json"));
            assert_eq!(rendered.header("access-control-allow-origin"), Some("*"));
            let head =
                reply_sharded(&mut w.core, &routes, req(Method::Head, target, "t"), now, &[]);
            let head = head.into_response().expect("a response");
            assert_eq!((head.code(), head.body.len()), (200, 0), "{target}");
        }
        let id = w.core.sessions(now)[0].session.to_string();
        for (target, token, code) in [
            ("/api/sessions", "wrong", 401),
            ("/api/streams/nope/sessions", "t", 404),
            (&*format!("/api/sessions/{id}"), "t", 200),
        ] {
            match reply_sharded(&mut w.core, &routes, req(Method::Get, target, token), now, &[]) {
                Reply::Ready(r) => assert_eq!(r.code(), code, "{target}"),
                other => panic!("{target}: {other:?}"),
            }
        }
        // Counted once each, as answered, when taken from the engine: four listings and one
        // session under /api/sessions, two listings under /api/streams.
        let m = body(&handle(&mut w.core, &routes, WhepRequest::new(Method::Get, "/metrics"), now));
        assert!(m.contains(r#"{route="sessions",method="GET",status="200"} 5"#), "{m}");
        assert!(m.contains(r#"{route="sessions",method="HEAD",status="200"} 2"#), "{m}");
        assert!(m.contains(r#"{route="admin",method="GET",status="200"} 2"#), "{m}");
    }

    #[test]
    fn default_candidates_for_wildcard_and_specific_binds() {
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert_eq!(default_candidates(addr("10.0.0.1:3478"), &[]), vec![addr("10.0.0.1:3478")]);
        let routes = [addr("192.0.2.9:5555"), addr("[2001:db8::9]:5555")];
        // An IPv4 socket advertises its family only.
        assert_eq!(
            default_candidates(addr("0.0.0.0:3478"), &routes),
            vec![addr("127.0.0.1:3478"), addr("192.0.2.9:3478")]
        );
        assert_eq!(default_candidates(addr("0.0.0.0:9"), &[]), vec![addr("127.0.0.1:9")]);
        // A dual-stack socket advertises both.
        assert_eq!(
            default_candidates(addr("[::]:3478"), &routes),
            vec![addr("127.0.0.1:3478"), addr("192.0.2.9:3478"), addr("[2001:db8::9]:3478")]
        );
        // A host with IPv6 only (no IPv4 route).
        assert_eq!(
            default_candidates(addr("[::]:7"), &routes[1..]),
            vec![addr("127.0.0.1:7"), addr("[2001:db8::9]:7")]
        );
        // Link-local, loopback and unspecified routes are no candidates.
        let useless = [
            addr("[fe80::1]:1"),
            addr("[febf::1]:1"),
            addr("169.254.0.9:1"),
            addr("[::1]:1"),
            addr("[::]:1"),
        ];
        assert_eq!(default_candidates(addr("[::]:7"), &useless), vec![addr("127.0.0.1:7")]);
        // A unique local address (fd00::/8) is one; a specific bind is advertised as it is,
        // IPv4-mapped as IPv4.
        assert_eq!(
            default_candidates(addr("[::]:7"), &[addr("[fd77:6::1]:1")]),
            vec![addr("127.0.0.1:7"), addr("[fd77:6::1]:7")]
        );
        assert_eq!(
            default_candidates(addr("[2001:db8::5]:7"), &routes),
            vec![addr("[2001:db8::5]:7")]
        );
        assert_eq!(default_candidates(addr("[::ffff:10.0.0.1]:7"), &[]), vec![addr("10.0.0.1:7")]);
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn host_must_be_plain() {
        let get = |hosts: &[&str]| {
            hosts
                .iter()
                .fold(WhepRequest::new(Method::Get, "/healthz"), |r, h| r.with_header("Host", *h))
        };
        for ok in [&[][..], &["x"], &["127.0.0.1:8080"], &["[::1]:80"]] {
            assert!(plain_host(&get(ok)), "{ok:?}");
        }
        for bad in [&["x/metrics?"][..], &["x?y"], &["x#y"], &["x\\y"], &["x", "y"]] {
            assert!(!plain_host(&get(bad)), "{bad:?}");
        }
    }

    #[test]
    fn json_escape_quotes() {
        assert_eq!(json_escape(r#"/a"b"#), r#"/a\"b"#);
    }
}
