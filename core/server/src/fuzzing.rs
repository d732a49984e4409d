//! Every fuzz target (feature `fuzzing`): the core's ([`whep_core::fuzzing`]) and the one of the
//! application routes, [`whep_request`], which needs [`app::handle`] and so lives here.
//!
//! The cargo-fuzz project in `fuzz/` calls these from libFuzzer (`scripts/fuzz.sh`), and
//! `core/server/tests/fuzz_corpus.rs` replays the committed seed corpora
//! (`fuzz/corpus/<target>/`) and any crash files (`fuzz/artifacts/<target>/`) through
//! [`TARGETS`] as an ordinary test on stable Rust. What a crash means, and how the targets keep
//! their worlds across inputs, is documented in [`whep_core::fuzzing`].

use std::cell::RefCell;

use whep_core::fuzzing::{
    ADMIN_TOKEN, CHROMIUM_OFFER, ETAG_PLACEHOLDER, Reused, SESSION_PLACEHOLDER, decode_request,
    demo_world, post, text, with_world,
};
pub use whep_core::fuzzing::{
    Target, decode_ops, ingest, jwt, offer, ops, sdpfrag, tcp_stream, viewer_datagram,
};
use whep_core::sim::{self, SimWorld};
use whep_core::whep::Method;

use crate::app::{self, RoutesConfig};

/// Every target by name, as `fuzz/fuzz_targets/<name>.rs` and `fuzz/corpus/<name>/` call it.
pub const TARGETS: &[(&str, Target)] = &[
    ("offer", offer),
    ("whep_request", whep_request),
    ("sdpfrag", sdpfrag),
    ("ingest", ingest),
    ("viewer_datagram", viewer_datagram),
    ("tcp_stream", tcp_stream),
    ("ops", ops),
    ("jwt", jwt),
    ("outbound", outbound),
];

struct RequestWorld {
    w: SimWorld,
    /// The session's id and ETag, once an input named it.
    session: Option<(String, String)>,
    /// A request that may have changed the core's state ran; the next input needs a new world.
    dirty: bool,
    routes: RoutesConfig,
}

impl RequestWorld {
    fn new() -> Self {
        let mut config = sim::config();
        config.strict_if_match = true;
        let (w, _) = demo_world(config);
        let routes =
            RoutesConfig { admin_token: Some(ADMIN_TOKEN.to_owned()), ..RoutesConfig::default() };
        Self { w, session: None, dirty: false, routes }
    }

    /// The session's id and ETag, created on first use (str0m answering an offer is the
    /// costly part of a world, so inputs that do not name the session skip it).
    fn session(&mut self) -> (String, String) {
        if let Some(s) = &self.session {
            return s.clone();
        }
        let r = self.w.http(post(CHROMIUM_OFFER));
        assert_eq!(r.code(), 201, "the Chromium offer is accepted: {}", text(&r.body));
        let location = r.header("location").unwrap_or_default();
        let id = location.rsplit('/').next().unwrap_or_default().to_owned();
        let etag = r.header("etag").unwrap_or_default().to_owned();
        self.session.insert((id, etag)).clone()
    }
}

thread_local! {
    static REQUEST: RefCell<Reused<RequestWorld>> = const { RefCell::new(Reused::new()) };
}

/// One HTTP request to the application routes, decoded with [`decode_request`], answered by
/// [`app::handle`] (player page, metrics, admin API with token [`ADMIN_TOKEN`], and the WHEP
/// routes of [`Core::handle_http`](whep_core::Core::handle_http)).
///
/// The core has a running external stream `demo` and enforces `If-Match` on PATCH
/// ([`CoreConfig::strict_if_match`](whep_core::CoreConfig::strict_if_match)). When the target contains
/// [`SESSION_PLACEHOLDER`] or a header value [`ETAG_PLACEHOLDER`], the stream also has one
/// session (created from [`CHROMIUM_OFFER`], not connected), whose id and ETag replace them:
/// `/whep/demo/SESSION` with `If-Match: ETAG` reaches PATCH (trickle and ICE restart), DELETE
/// and GET of a live session. The outputs are executed by the simulation (ports bound, fake
/// FFmpeg spawned for streams the admin API adds).
///
/// Every input sees the same state (up to counters), so a crash file reproduces on its own: the world is kept
/// only across requests that cannot change it (every method but POST, PATCH and DELETE is
/// read-only on every route); after a POST, PATCH or DELETE the next input gets a new one.
///
/// A crash means: an invariant breaks, a response lacks `Access-Control-Allow-Origin`, or
/// something panics in the routes, the admin API's JSON handling, the WHEP handlers or str0m.
pub fn whep_request(data: &[u8]) {
    let mut req = decode_request(data);
    let needs_session = req.target.contains(SESSION_PLACEHOLDER)
        || req.headers.iter().any(|(_, v)| v.contains(ETAG_PLACEHOLDER));
    with_world(
        &REQUEST,
        RequestWorld::new,
        |r| !r.dirty,
        |rw| {
            if needs_session {
                let (id, etag) = rw.session();
                req.target = req.target.replace(SESSION_PLACEHOLDER, &id);
                for (_, v) in &mut req.headers {
                    *v = v.replace(ETAG_PLACEHOLDER, &etag);
                }
            }
            rw.dirty = matches!(req.method, Method::Post | Method::Patch | Method::Delete);
            let w = &mut rw.w;
            let resp = app::handle(&mut w.core, &rw.routes, req, w.now);
            w.drain();
            assert!(
                resp.header("access-control-allow-origin").is_some(),
                "response {} without Access-Control-Allow-Origin",
                resp.code()
            );
        },
    );
}

/// The outbound HTTP client ([`crate::outbound`]): the input as what an authorisation server,
/// a JWKS server or a webhook receiver answers, read for its status only and with its body;
/// and, as text, as a configured URL. Nothing panics, and a body is never larger than
/// [`outbound::MAX_BODY`](crate::outbound::MAX_BODY) nor than the input.
pub fn outbound(data: &[u8]) {
    use crate::outbound::{HttpUrl, MAX_BODY, parse_response};

    for read_body in [false, true] {
        if let Ok(r) = parse_response(data, read_body) {
            assert!(r.body.len() <= MAX_BODY.min(data.len()), "a body from nowhere");
            assert!(read_body || r.body.is_empty(), "a body read when not asked for");
        }
    }
    let _ = HttpUrl::parse(&String::from_utf8_lossy(data));
}
