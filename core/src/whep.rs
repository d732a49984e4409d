//! The WHEP HTTP surface as typed values: requests in, responses out, no sockets.
//!
//! A runtime turns its HTTP framework's request into a [`WhepRequest`] (method, request target,
//! headers, body), hands it to [`Core::handle_http`](crate::Core::handle_http) and writes the
//! [`WhepResponse`] back. Every request gets a response; rejections are ordinary responses.

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

pub use http_types::{Method, StatusCode};
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};

use crate::ids::{SessionId, StreamId};

/// `Content-Type` of an SDP offer or answer.
pub const CONTENT_TYPE_SDP: &str = "application/sdp";
/// `Content-Type` of a trickle / ICE-restart PATCH body (RFC 8840).
pub const CONTENT_TYPE_SDPFRAG: &str = "application/trickle-ice-sdpfrag";
/// Headers that browsers may read from our responses.
pub const EXPOSE_HEADERS: &str = "Location, ETag, Link, Accept-Patch, Accept-Post";
/// Methods allowed cross-origin.
pub const ALLOW_METHODS: &str = "GET, HEAD, POST, PATCH, DELETE, OPTIONS";
/// Request headers allowed cross-origin.
pub const ALLOW_HEADERS: &str = "Authorization, Content-Type, If-Match";

/// One HTTP request addressed to the WHEP routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhepRequest {
    /// The request method.
    pub method: Method,
    /// The request target: absolute path and optional `?query`, as received (percent-encoded).
    pub target: String,
    /// Header fields in arrival order; names compare case-insensitively.
    pub headers: Vec<(String, String)>,
    /// The body. A runtime may stop reading after
    /// [`CoreConfig::max_body_bytes`](crate::CoreConfig::max_body_bytes) + 1 bytes: anything longer is
    /// answered with 413 regardless of what follows.
    pub body: Vec<u8>,
    /// The client's address, when the runtime knows it: the key of the per-client rate limits
    /// ([`CoreConfig::rate_limits`](crate::CoreConfig::rate_limits)). Without it only the global
    /// limit applies.
    pub client: Option<IpAddr>,
    /// The wall-clock time the runtime received the request at: the start of the validity of
    /// the time-limited TURN credentials an answer carries ([`crate::turn`]). Without it, TURN
    /// servers configured with a [`secret`](crate::IceServer::secret) are left out of the
    /// answer's `Link` headers.
    pub wall_time: Option<SystemTime>,
}

impl WhepRequest {
    /// A request with no headers, an empty body, no client address and no wall-clock time.
    pub fn new(method: Method, target: impl Into<String>) -> Self {
        Self {
            method,
            target: target.into(),
            headers: Vec::new(),
            body: Vec::new(),
            client: None,
            wall_time: None,
        }
    }

    /// Sets the client's address.
    #[must_use]
    pub fn with_client(mut self, client: impl Into<IpAddr>) -> Self {
        self.client = Some(client.into());
        self
    }

    /// Sets the wall-clock time the request was received at.
    #[must_use]
    pub fn with_wall_time(mut self, wall_time: SystemTime) -> Self {
        self.wall_time = Some(wall_time);
        self
    }

    /// Adds a header field.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body.
    #[must_use]
    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// The first value of a header, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The media type of `Content-Type` without parameters, lowercased.
    pub(crate) fn media_type(&self) -> Option<String> {
        self.header("content-type")
            .map(|v| v.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
    }

    /// A CORS preflight: OPTIONS with `Access-Control-Request-Method`.
    pub(crate) fn is_preflight(&self) -> bool {
        self.method == Method::Options && self.header("access-control-request-method").is_some()
    }
}

/// Longest `User-Agent` kept for a session, in characters ([`sanitize_user_agent`]).
pub const MAX_USER_AGENT: usize = 256;

/// A `User-Agent` value as sessions keep it: printable ASCII only (anything else becomes `?`,
/// so that logs, JSON and the sessions page see no control characters), surrounding spaces
/// trimmed, at most [`MAX_USER_AGENT`] characters; `None` when nothing is left.
pub fn sanitize_user_agent(raw: &str) -> Option<String> {
    let clean: String = raw
        .trim()
        .chars()
        .take(MAX_USER_AGENT)
        .map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' })
        .collect();
    (!clean.is_empty()).then_some(clean)
}

/// The response to a [`WhepRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhepResponse {
    /// The status code.
    pub status: StatusCode,
    /// Header fields; a name may repeat (e.g. `Link`).
    pub headers: Vec<(&'static str, String)>,
    /// The body (SDP, an SDP fragment, or a plain-text error).
    pub body: Vec<u8>,
}

impl WhepResponse {
    /// A response with `status`, no header and no body.
    pub fn new(status: StatusCode) -> Self {
        Self { status, headers: Vec::new(), body: Vec::new() }
    }

    /// This response with the header field `name: value` added.
    pub fn with(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// This response with `body` and a `Content-Type` of `content_type`.
    pub fn with_body(mut self, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        self.headers.push(("Content-Type", content_type.to_owned()));
        self.body = body.into();
        self
    }

    /// The first value of a header, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Every value of a header, compared case-insensitively.
    pub fn header_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The status as a number.
    pub fn code(&self) -> u16 {
        u16::from(self.status)
    }
}

/// Why a request was refused. Each variant maps to one status and a plain-text body in the
/// seed's style (`webrtc: …`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    /// Authentication is configured and the request carried no valid bearer token (401).
    Unauthorized,
    /// The presented token was refused: a JWT that does not verify, expired, or that the
    /// authorisation server refused with 401 (401).
    InvalidToken(String),
    /// A valid token that does not grant this stream, or the authorisation server said 403
    /// (403).
    Forbidden(String),
    /// The authorisation server could not decide: an error status, no answer, or none in
    /// time (503; the request is refused, not let through).
    AuthFailed(String),
    /// Too many requests wait for the authorisation server already (503).
    AuthBusy,
    /// The path is not a WHEP route (404).
    NoRoute,
    /// No such stream, or its WebRTC egress is disabled or stopped (404).
    StreamNotFound,
    /// No such session (404).
    SessionNotFound,
    /// The method is not supported on this resource (405).
    MethodNotAllowed {
        /// Value of the `Allow` header.
        allow: &'static str,
    },
    /// Wrong `Content-Type` (415).
    UnsupportedMediaType {
        /// The media type the route accepts.
        expected: &'static str,
    },
    /// The body is larger than configured (413).
    PayloadTooLarge,
    /// Empty or unparsable offer, or one str0m cannot answer (400).
    BadOffer(String),
    /// The offer lacks a video codec we send (H264 with packetization-mode 1, or VP8), or
    /// Opus (406, the seed's rule).
    CodecMismatch {
        /// No usable video codec.
        h264: bool,
        /// No Opus.
        opus: bool,
    },
    /// The offer has none of the video codecs this stream's renditions are in (406); names
    /// them, e.g. `H264 (packetization-mode=1) or VP8`.
    NoRendition {
        /// What the stream sends.
        sends: String,
    },
    /// The offer's media layout is not one video and one audio section we can send (422).
    BadLayout(String),
    /// A PATCH body that is not a valid SDP fragment (400).
    BadFragment(String),
    /// Strict `If-Match` is configured and the PATCH carried none (428).
    PreconditionRequired,
    /// `If-Match` does not match the session's ETag (412).
    PreconditionFailed,
    /// The stream has reached its viewer cap (503).
    StreamFull {
        /// The cap.
        cap: usize,
    },
    /// The server has reached its total viewer cap (503).
    ServerFull {
        /// The cap.
        cap: usize,
    },
    /// The server has no host candidate to offer (503).
    NoCandidates,
    /// The server is too busy to take another viewer without hurting those it has (503,
    /// see [`CoreConfig::max_load`](crate::CoreConfig::max_load)).
    Overloaded,
    /// The server is draining (shutting down): it keeps its viewers for a while but takes no
    /// new one (503, see [`Core::set_draining`](crate::Core::set_draining)).
    Draining,
    /// An ICE restart the WebRTC stack refused; the session is kept (400).
    RestartFailed(String),
    /// The offer, or a PATCH on top of what the session holds, carries more ICE candidates than
    /// [`CoreConfig::max_remote_candidates`](crate::CoreConfig::max_remote_candidates) (422).
    TooManyCandidates {
        /// The limit.
        cap: usize,
    },
    /// The client address already holds
    /// [`CoreConfig::max_unconnected_per_client`](crate::CoreConfig::max_unconnected_per_client)
    /// sessions that have not connected (429).
    TooManyUnconnected {
        /// The limit.
        cap: usize,
    },
    /// The client, or all clients together, sent more requests than
    /// [`CoreConfig::rate_limits`](crate::CoreConfig::rate_limits) allows (429).
    RateLimited {
        /// How long until the request would be admitted.
        retry_after: Duration,
    },
}

impl Reject {
    /// The status code of this rejection.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized | Self::InvalidToken(_) => StatusCode::Unauthorized,
            Self::Forbidden(_) => StatusCode::Forbidden,
            Self::NoRoute | Self::StreamNotFound | Self::SessionNotFound => StatusCode::NotFound,
            Self::MethodNotAllowed { .. } => StatusCode::MethodNotAllowed,
            Self::UnsupportedMediaType { .. } => StatusCode::UnsupportedMediaType,
            Self::PayloadTooLarge => StatusCode::PayloadTooLarge,
            Self::BadOffer(_) | Self::BadFragment(_) | Self::RestartFailed(_) => {
                StatusCode::BadRequest
            }
            Self::CodecMismatch { .. } | Self::NoRendition { .. } => StatusCode::NotAcceptable,
            Self::BadLayout(_) | Self::TooManyCandidates { .. } => StatusCode::UnprocessableEntity,
            Self::PreconditionRequired => StatusCode::PreconditionRequired,
            Self::PreconditionFailed => StatusCode::PreconditionFailed,
            Self::StreamFull { .. }
            | Self::ServerFull { .. }
            | Self::NoCandidates
            | Self::Overloaded
            | Self::Draining => StatusCode::ServiceUnavailable,
            Self::AuthFailed(_) | Self::AuthBusy => StatusCode::ServiceUnavailable,
            Self::RateLimited { .. } | Self::TooManyUnconnected { .. } => {
                StatusCode::TooManyRequests
            }
        }
    }

    /// Whether the response carries `Retry-After`.
    pub fn retry_after(&self) -> bool {
        matches!(
            self,
            Self::StreamFull { .. }
                | Self::ServerFull { .. }
                | Self::NoCandidates
                | Self::Overloaded
                | Self::Draining
                | Self::AuthFailed(_)
                | Self::AuthBusy
                | Self::RateLimited { .. }
                | Self::TooManyUnconnected { .. }
        )
    }

    /// Short machine-readable reason, for metrics labels and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::InvalidToken(_) => "invalid_token",
            Self::Forbidden(_) => "forbidden",
            Self::AuthFailed(_) => "auth_failed",
            Self::AuthBusy => "auth_busy",
            Self::NoRoute => "no_route",
            Self::StreamNotFound => "stream_not_found",
            Self::SessionNotFound => "session_not_found",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::UnsupportedMediaType { .. } => "unsupported_media_type",
            Self::PayloadTooLarge => "payload_too_large",
            Self::BadOffer(_) => "bad_offer",
            Self::CodecMismatch { .. } | Self::NoRendition { .. } => "codec_mismatch",
            Self::BadLayout(_) => "bad_layout",
            Self::BadFragment(_) => "bad_fragment",
            Self::PreconditionRequired => "precondition_required",
            Self::PreconditionFailed => "precondition_failed",
            Self::StreamFull { .. } => "stream_full",
            Self::ServerFull { .. } => "server_full",
            Self::NoCandidates => "no_candidates",
            Self::Overloaded => "overloaded",
            Self::Draining => "draining",
            Self::RestartFailed(_) => "restart_failed",
            Self::RateLimited { .. } => "rate_limited",
            Self::TooManyCandidates { .. } => "too_many_candidates",
            Self::TooManyUnconnected { .. } => "too_many_unconnected",
        }
    }

    pub(crate) fn into_response(self, retry_after_secs: u32) -> WhepResponse {
        let mut r = WhepResponse::new(self.status());
        match &self {
            Self::Unauthorized => {
                r = r.with("WWW-Authenticate", "Bearer realm=\"whep\"");
            }
            Self::InvalidToken(_) => {
                r = r.with("WWW-Authenticate", "Bearer realm=\"whep\", error=\"invalid_token\"");
            }
            Self::MethodNotAllowed { allow } => r = r.with("Allow", *allow),
            Self::UnsupportedMediaType { expected } => r = r.with("Accept-Post", *expected),
            _ => {}
        }
        if let Self::RateLimited { retry_after } = self {
            // Whole seconds, rounded up: a client that waits that long is admitted.
            let secs = retry_after.as_millis().div_ceil(1000).max(1);
            r = r.with("Retry-After", secs.to_string());
        } else if self.retry_after() {
            r = r.with("Retry-After", retry_after_secs.to_string());
        }
        r.with_body("text/plain; charset=utf-8", format!("{self}\n"))
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unauthorized => f.write_str("webrtc: missing or invalid bearer token"),
            Self::InvalidToken(why) => write!(f, "webrtc: token refused: {why}"),
            Self::Forbidden(why) => write!(f, "webrtc: forbidden: {why}"),
            Self::AuthFailed(why) => write!(f, "webrtc: authorisation failed: {why}"),
            Self::AuthBusy => {
                f.write_str("webrtc: too many requests waiting for authorisation, retry later")
            }
            Self::NoRoute => f.write_str("webrtc: no such resource"),
            Self::StreamNotFound => f.write_str("webrtc: stream not found"),
            Self::SessionNotFound => f.write_str("webrtc: session not found"),
            Self::MethodNotAllowed { allow } => write!(f, "webrtc: method not allowed ({allow})"),
            Self::UnsupportedMediaType { expected } => {
                write!(f, "webrtc: unsupported content type, expected {expected}")
            }
            Self::PayloadTooLarge => f.write_str("webrtc: body too large"),
            Self::BadOffer(why) => write!(f, "webrtc: invalid offer: {why}"),
            Self::CodecMismatch { h264, opus } => {
                let missing = match (h264, opus) {
                    (true, true) => "H264 (packetization-mode=1) or VP8, and Opus",
                    (true, false) => "H264 (packetization-mode=1) or VP8",
                    _ => "Opus",
                };
                write!(f, "webrtc: offer must include H264 or VP8, and Opus; missing {missing}")
            }
            Self::NoRendition { sends } => {
                write!(f, "webrtc: offer has no video codec this stream sends; missing {sends}")
            }
            Self::BadLayout(why) => write!(f, "webrtc: unsupported media layout: {why}"),
            Self::BadFragment(why) => write!(f, "webrtc: invalid sdpfrag: {why}"),
            Self::PreconditionRequired => f.write_str("webrtc: If-Match required"),
            Self::PreconditionFailed => f.write_str("webrtc: If-Match does not match the ETag"),
            Self::StreamFull { cap } => {
                write!(f, "webrtc: too many viewers of this stream (cap {cap})")
            }
            Self::ServerFull { cap } => write!(f, "webrtc: too many peers (cap {cap})"),
            Self::NoCandidates => f.write_str("webrtc: no host candidate configured"),
            Self::Overloaded => f.write_str("webrtc: server busy, retry later"),
            Self::Draining => f.write_str("webrtc: server draining, retry on another node"),
            Self::RestartFailed(why) => write!(f, "webrtc: ICE restart failed: {why}"),
            Self::RateLimited { .. } => f.write_str("webrtc: too many requests, retry later"),
            Self::TooManyCandidates { cap } => {
                write!(f, "webrtc: too many ICE candidates (a session holds at most {cap})")
            }
            Self::TooManyUnconnected { cap } => write!(
                f,
                "webrtc: too many sessions from this address still connecting (at most {cap}), retry later"
            ),
        }
    }
}

/// A resolved WHEP route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// `{prefix}/{stream}`
    Endpoint(StreamId),
    /// `{prefix}/{stream}/{session}`; `None` when the session segment is not a session id.
    Session(StreamId, Option<SessionId>),
}

/// Resolves a request target against the route prefix. Segments are percent-decoded, so a
/// stream id may contain `:` literally or `%3A`, and even `/` as `%2F`.
///
/// `node` is this node's tag ([`CoreConfig::node_id`](crate::CoreConfig::node_id)): a session
/// segment `{tag}.{session}` names a session only when the tag is this node's (`Any`: any tag,
/// for routing among shards); a bare `{session}` always does.
pub(crate) fn route(prefix: &str, node: NodeTag<'_>, target: &str) -> Option<Route> {
    let path = target.split(['?', '#']).next().unwrap_or_default();
    let rest = path.strip_prefix(prefix.trim_end_matches('/'))?.strip_prefix('/')?;
    let mut parts = rest.split('/');
    let stream = decode_segment(parts.next()?)?;
    let stream = StreamId::new(stream)?;
    match (parts.next(), parts.next()) {
        (None, _) | (Some(""), None) => Some(Route::Endpoint(stream)),
        (Some(session), None) => Some(Route::Session(stream, node.session(session))),
        (Some(session), Some("")) if parts.next().is_none() => {
            Some(Route::Session(stream, node.session(session)))
        }
        _ => None,
    }
}

/// Which node tags in a session segment [`route`] accepts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum NodeTag<'a> {
    /// Only this one (`None`: no tag, the node has none).
    Only(Option<&'a str>),
    /// Any.
    Any,
}

impl NodeTag<'_> {
    fn session(self, segment: &str) -> Option<SessionId> {
        match (segment.split_once('.'), self) {
            (None, _) => SessionId::parse(segment),
            (Some((_, id)), Self::Any) => SessionId::parse(id),
            (Some((tag, id)), Self::Only(Some(ours))) if tag == ours => SessionId::parse(id),
            (Some(_), Self::Only(_)) => None,
        }
    }
}

/// Which shard of a sharded server answers a request (see [`crate::shard`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardRoute {
    /// A POST to a WHEP endpoint: it creates a session, on any shard (the least loaded).
    NewSession,
    /// A request to an existing session: the shard its id names.
    Session(u8),
    /// Anything else: the leader answers.
    Any,
}

/// Where `req` goes on a sharded server whose WHEP routes are under `prefix`.
pub fn shard_route(prefix: &str, req: &WhepRequest) -> ShardRoute {
    match route(prefix, NodeTag::Any, &req.target) {
        Some(Route::Endpoint(_)) if req.method == Method::Post => ShardRoute::NewSession,
        Some(Route::Session(_, Some(session))) => ShardRoute::Session(session.shard()),
        _ => ShardRoute::Any,
    }
}

fn decode_segment(s: &str) -> Option<String> {
    percent_decode_str(s).decode_utf8().ok().map(|c| c.into_owned())
}

/// Characters escaped in a path segment we emit: everything but unreserved, sub-delims, `:`
/// and `@` (RFC 3986 `pchar`).
pub const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// The `Location` of a session: prefix, encoded stream id, session id and the request's query
/// string (kept so that URL-token authentication works for PATCH and DELETE).
/// With a node tag the session segment is `{node}.{session}`; with a public origin
/// ([`CoreConfig::public_url`](crate::CoreConfig::public_url)) the URL is absolute.
pub(crate) fn session_location(
    origin: Option<&str>,
    prefix: &str,
    node: Option<&str>,
    stream: &StreamId,
    session: SessionId,
    target: &str,
) -> String {
    let origin = origin.unwrap_or_default();
    let prefix = prefix.trim_end_matches('/');
    let stream = utf8_percent_encode(stream.as_str(), SEGMENT);
    let session = match node {
        Some(node) => format!("{node}.{session}"),
        None => session.to_string(),
    };
    match target.split_once('?') {
        Some((_, q)) if !q.is_empty() => format!("{origin}{prefix}/{stream}/{session}?{q}"),
        _ => format!("{origin}{prefix}/{stream}/{session}"),
    }
}

/// Constant-time comparison of a presented token (see [`crate::auth::presented_token`]) with
/// the configured ones; none configured lets everything through.
pub(crate) fn bearer_ok(tokens: &[String], presented: Option<&str>) -> bool {
    if tokens.is_empty() {
        return true;
    }
    let Some(presented) = presented else {
        return false;
    };
    let presented = presented.as_bytes();
    tokens.iter().fold(false, |ok, t| ok | ct_eq(t.as_bytes(), presented))
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_agents_are_bounded_and_printable() {
        assert_eq!(
            sanitize_user_agent("  Mozilla/5.0 (X11)  ").as_deref(),
            Some("Mozilla/5.0 (X11)")
        );
        assert_eq!(sanitize_user_agent("a\r\nb\u{7f}é\"<").as_deref(), Some("a??b??\"<"));
        assert_eq!(sanitize_user_agent(" \t "), None);
        let long = "x".repeat(10_000);
        assert_eq!(sanitize_user_agent(&long).map(|s| s.len()), Some(MAX_USER_AGENT));
    }

    fn sid() -> SessionId {
        SessionId::parse("0123456789abcdef0123456789abcdef").unwrap_or_else(|| unreachable!())
    }

    #[test]
    fn routes_decode_segments_and_ignore_query() {
        let s = |x: &str| StreamId::new(x).unwrap_or_else(|| unreachable!());
        assert_eq!(
            route("/whep", NodeTag::Only(None), "/whep/demo"),
            Some(Route::Endpoint(s("demo")))
        );
        assert_eq!(
            route("/whep", NodeTag::Only(None), "/whep/demo/"),
            Some(Route::Endpoint(s("demo")))
        );
        assert_eq!(
            route("/whep/", NodeTag::Only(None), "/whep/demo?token=1"),
            Some(Route::Endpoint(s("demo")))
        );
        assert_eq!(
            route("/whep", NodeTag::Only(None), "/whep/restreamer-ui%3Aingest%3Aab"),
            Some(Route::Endpoint(s("restreamer-ui:ingest:ab")))
        );
        assert_eq!(
            route("/whep", NodeTag::Only(None), "/whep/a:b"),
            Some(Route::Endpoint(s("a:b")))
        );
        assert_eq!(
            route("/whep", NodeTag::Only(None), "/whep/a%2Fb"),
            Some(Route::Endpoint(s("a/b")))
        );
        assert_eq!(
            route("/whep", NodeTag::Only(None), &format!("/whep/demo/{}", sid())),
            Some(Route::Session(s("demo"), Some(sid())))
        );
        assert_eq!(
            route("/whep", NodeTag::Only(None), "/whep/demo/nope"),
            Some(Route::Session(s("demo"), None))
        );
        assert_eq!(route("/whep", NodeTag::Only(None), "/whep"), None);
        assert_eq!(route("/whep", NodeTag::Only(None), "/whep/"), None);
        assert_eq!(route("/whep", NodeTag::Only(None), "/other/demo"), None);
        assert_eq!(route("/whep", NodeTag::Only(None), "/whepx/demo"), None);
        assert_eq!(route("/whep", NodeTag::Only(None), "/whep/a/b/c"), None);
        assert_eq!(route("/whep", NodeTag::Only(None), "/whep/%FF"), None);
        assert_eq!(
            route("/api/v3/whep", NodeTag::Only(None), "/api/v3/whep/x"),
            Some(Route::Endpoint(s("x")))
        );
    }

    #[test]
    fn location_encodes_and_keeps_query() {
        let st = StreamId::new("a:b/c d").unwrap_or_else(|| unreachable!());
        let l = session_location(None, "/whep", None, &st, sid(), "/whep/x?token=abc");
        assert_eq!(l, format!("/whep/a:b%2Fc%20d/{}?token=abc", sid()));
        assert_eq!(route("/whep", NodeTag::Only(None), &l), Some(Route::Session(st, Some(sid()))));
    }

    #[test]
    fn node_tags_route_sessions_to_their_node() {
        let st = StreamId::new("demo").unwrap_or_else(|| unreachable!());
        let l = session_location(None, "/whep", Some("n1"), &st, sid(), "/whep/demo");
        assert_eq!(l, format!("/whep/demo/n1.{}", sid()));
        let mine = Some(Route::Session(st.clone(), Some(sid())));
        assert_eq!(route("/whep", NodeTag::Only(Some("n1")), &l), mine);
        assert_eq!(route("/whep", NodeTag::Any, &l), mine);
        let other = Some(Route::Session(st.clone(), None));
        assert_eq!(route("/whep", NodeTag::Only(Some("n2")), &l), other);
        assert_eq!(route("/whep", NodeTag::Only(None), &l), other);
        // A bare session id is still this node's.
        let bare = format!("/whep/demo/{}", sid());
        assert_eq!(route("/whep", NodeTag::Only(Some("n1")), &bare), mine);
    }

    #[test]
    fn a_public_origin_makes_session_urls_absolute() {
        let st = StreamId::new("demo").unwrap_or_else(|| unreachable!());
        let origin = Some("https://n1.example.org:8443");
        let l = session_location(origin, "/whep", None, &st, sid(), "/whep/demo?token=t");
        assert_eq!(l, format!("https://n1.example.org:8443/whep/demo/{}?token=t", sid()));
        let l = session_location(origin, "/live/", Some("n1"), &st, sid(), "/live/demo");
        assert_eq!(l, format!("https://n1.example.org:8443/live/demo/n1.{}", sid()));
        // The request that comes back to it carries the path only.
        let path = &l["https://n1.example.org:8443".len()..];
        let mine = Some(Route::Session(st, Some(sid())));
        assert_eq!(route("/live", NodeTag::Only(Some("n1")), path), mine);
    }

    #[test]
    fn bearer_tokens() {
        let t = vec!["s3cret".to_owned()];
        let presented = |h: &str| {
            crate::auth::presented_token(
                &WhepRequest::new(Method::Post, "/").with_header("Authorization", h),
            )
        };
        let ok = |h: &str| bearer_ok(&t, presented(h).as_deref());
        assert!(bearer_ok(&[], None));
        assert!(ok("Bearer s3cret"));
        assert!(ok("bearer  s3cret "));
        assert!(!ok("Bearer s3cre"));
        assert!(!ok("Basic s3cret"));
        assert!(!bearer_ok(&t, None));
        let query = WhepRequest::new(Method::Post, "/whep/x?token=s3cret");
        assert!(bearer_ok(&t, crate::auth::presented_token(&query).as_deref()));
    }

    #[test]
    fn codec_mismatch_names_the_missing_codec() {
        let r = Reject::CodecMismatch { h264: false, opus: true }.to_string();
        assert!(r.contains("missing Opus"), "{r}");
        let r = Reject::CodecMismatch { h264: true, opus: false }.to_string();
        assert!(r.contains("missing H264"), "{r}");
    }
}
