//! The WHEP HTTP surface: every row of the seed's error matrix and of the status map, driven
//! through the simulation harness (real str0m viewers where a session is needed).

use std::time::{Duration, SystemTime};

use whep_core::sim::{self, SimWorld};
use whep_core::whep::Method;
use whep_core::{CoreConfig, IceServer, StreamConfig, StreamId, WhepRequest, WhepResponse};

const CHROMIUM_OFFER: &str = include_str!("data/chromium-156-offer.sdp");

fn world(config: CoreConfig) -> (SimWorld, StreamId) {
    let mut w = SimWorld::new(config);
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    (w, demo)
}

fn post(body: &str) -> WhepRequest {
    WhepRequest::new(Method::Post, "/whep/demo")
        .with_header("Content-Type", "application/sdp")
        .with_body(body)
}

fn text(r: &WhepResponse) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

/// Every response, success or not, carries the CORS headers.
fn assert_cors(r: &WhepResponse) {
    assert_eq!(r.header("access-control-allow-origin"), Some("*"), "{r:?}");
    assert_eq!(
        r.header("access-control-expose-headers"),
        Some("Location, ETag, Link, Accept-Patch, Accept-Post")
    );
}

#[test]
fn post_chromium_offer_is_201_with_answer_location_etag() {
    let (mut w, _) = world(sim::config());
    let r = w.http(post(CHROMIUM_OFFER).with_header("Content-Type", "application/sdp"));
    assert_eq!(r.code(), 201, "{}", text(&r));
    assert_cors(&r);
    assert_eq!(r.header("content-type"), Some("application/sdp"));
    assert_eq!(r.header("accept-patch"), Some("application/trickle-ice-sdpfrag"));
    let loc = r.header("location").unwrap_or_default();
    assert!(loc.starts_with("/whep/demo/") && loc.len() == "/whep/demo/".len() + 32, "{loc}");
    let etag = r.header("etag").unwrap_or_default();
    assert!(etag.len() == 34 && etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    let answer = text(&r);
    for needle in [
        "a=ice-lite",
        "a=setup:passive",
        "a=sendonly",
        "a=rtcp-mux-only",
        "a=end-of-candidates",
        "a=candidate:",
        "a=rtpmap:108 H264/90000",
        "a=rtpmap:111 opus/48000/2",
        "a=group:BUNDLE 0 1",
    ] {
        assert!(answer.contains(needle), "answer lacks {needle}:\n{answer}");
    }
    assert!(!answer.contains("a=recvonly"));
    assert!(!answer.contains("sprop-parameter-sets"));
    assert_eq!(w.core.viewer_count(), 1);
}

#[test]
fn post_keeps_query_in_location() {
    let (mut w, _) = world(sim::config());
    let mut req = post(CHROMIUM_OFFER);
    req.target = "/whep/demo?token=abc".into();
    let r = w.http(req);
    assert_eq!(r.code(), 201);
    assert!(r.header("location").unwrap_or_default().ends_with("?token=abc"));
}

#[test]
fn error_matrix_post() {
    let (mut w, _) = world(sim::config());
    let vp8_only =
        CHROMIUM_OFFER.lines().filter(|l| !l.contains("H264")).collect::<Vec<_>>().join("\r\n");
    let no_opus = CHROMIUM_OFFER.replace("opus/48000/2", "foo/48000/2");
    let sendonly = CHROMIUM_OFFER.replace("a=recvonly", "a=sendonly");
    let cases: Vec<(&str, WhepRequest, u16, &str)> = vec![
        ("unknown stream", post(CHROMIUM_OFFER).tap_target("/whep/nope"), 404, "stream not found"),
        ("empty body", post(""), 400, "invalid offer"),
        ("garbage body", post("hello world"), 400, "invalid offer"),
        ("not utf-8", post("").with_body(vec![0xff, 0xfe, 0x00]), 400, "invalid offer"),
        (
            "wrong content type",
            WhepRequest::new(Method::Post, "/whep/demo")
                .with_header("Content-Type", "text/plain")
                .with_body(CHROMIUM_OFFER),
            415,
            "application/sdp",
        ),
        (
            "no content type",
            WhepRequest::new(Method::Post, "/whep/demo").with_body(CHROMIUM_OFFER),
            415,
            "application/sdp",
        ),
        ("VP8-only offer", post(&vp8_only), 406, "missing H264"),
        ("no Opus", post(&no_opus), 406, "missing Opus"),
        ("sendonly offer", post(&sendonly), 422, "layout"),
        ("oversized body", post(&"a".repeat(64 * 1024 + 1)), 413, "too large"),
    ];
    for (what, req, code, needle) in cases {
        let r = w.http(req);
        assert_eq!(r.code(), code, "{what}: {}", text(&r));
        assert!(text(&r).contains(needle), "{what}: body {:?} lacks {needle:?}", text(&r));
        assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"), "{what}");
        assert_cors(&r);
    }
    assert_eq!(w.core.viewer_count(), 0, "no rejected POST leaves a viewer behind");
}

trait Tap {
    fn tap_target(self, t: &str) -> Self;
}
impl Tap for WhepRequest {
    fn tap_target(mut self, t: &str) -> Self {
        self.target = t.into();
        self
    }
}

#[test]
fn charset_parameter_on_content_type_is_accepted() {
    let (mut w, _) = world(sim::config());
    let r = w.http(
        WhepRequest::new(Method::Post, "/whep/demo")
            .with_header("content-type", "Application/SDP; charset=utf-8")
            .with_body(CHROMIUM_OFFER),
    );
    assert_eq!(r.code(), 201, "{}", text(&r));
}

#[test]
fn stopped_or_disabled_stream_is_404() {
    let mut w = SimWorld::new(sim::config());
    let idle = StreamId::new("idle").unwrap_or_else(|| unreachable!());
    w.core.add_stream(idle.clone(), StreamConfig::external()).unwrap_or_default();
    let mut disabled = StreamConfig::external();
    disabled.egress.enabled = false;
    let off = StreamId::new("off").unwrap_or_else(|| unreachable!());
    w.core.add_stream(off.clone(), disabled).unwrap_or_default();
    assert!(w.core.start_stream(&off, w.now).is_err());
    for path in ["/whep/idle", "/whep/off"] {
        let r = w.http(post(CHROMIUM_OFFER).tap_target(path));
        assert_eq!(r.code(), 404, "{path}");
        assert!(text(&r).contains("webrtc: stream not found"));
    }
}

#[test]
fn per_stream_cap_then_total_cap_with_distinct_bodies() {
    let mut config = sim::config();
    config.max_viewers_per_stream = 2;
    config.max_viewers_total = 3;
    let mut w = SimWorld::new(config);
    let a = w.add_stream("a", StreamConfig::external(), 30);
    let b = w.add_stream("b", StreamConfig::external(), 30);
    for _ in 0..2 {
        assert_eq!(w.join(&a).1.code(), 201);
    }
    let (_, full) = w.join(&a);
    assert_eq!(full.code(), 503);
    assert_eq!(full.header("retry-after"), Some("5"));
    assert!(text(&full).contains("this stream"), "{}", text(&full));
    assert_eq!(w.join(&b).1.code(), 201);
    let (_, total) = w.join(&b);
    assert_eq!(total.code(), 503);
    assert!(total.header("retry-after").is_some());
    assert!(text(&total).contains("too many peers"), "{}", text(&total));
    assert_ne!(text(&full), text(&total));
    assert_eq!(w.core.viewer_count(), 3);
    assert_eq!(w.core.metrics().cap_rejections, 2);
}

#[test]
fn delete_is_idempotent_and_patch_of_unknown_is_404() {
    let (mut w, demo) = world(sim::config());
    let (v, r) = w.join(&demo);
    assert_eq!(r.code(), 201);
    let del = w.session_request(v, Method::Delete);
    let r1 = w.http(del.clone());
    assert_eq!(r1.code(), 204);
    assert_cors(&r1);
    assert_eq!(w.core.viewer_count(), 0);
    assert_eq!(w.http(del).code(), 204, "second DELETE");
    let unknown = "/whep/demo/00000000000000000000000000000000";
    assert_eq!(w.http(WhepRequest::new(Method::Delete, unknown)).code(), 204);
    assert_eq!(w.http(WhepRequest::new(Method::Delete, "/whep/demo/junk")).code(), 204);
    let patch = |t: &str| {
        WhepRequest::new(Method::Patch, t)
            .with_header("Content-Type", "application/trickle-ice-sdpfrag")
            .with_body("a=end-of-candidates\r\n")
    };
    assert_eq!(w.http(patch(unknown)).code(), 404);
    assert_eq!(w.http(patch(&w.viewers[v].location.clone().unwrap_or_default())).code(), 404);
    assert_eq!(w.http(patch("/whep/demo/junk")).code(), 404);
}

#[test]
fn session_of_another_stream_is_not_found() {
    let mut w = SimWorld::new(sim::config());
    let a = w.add_stream("a", StreamConfig::external(), 30);
    w.add_stream("b", StreamConfig::external(), 30);
    let (v, _) = w.join(&a);
    let loc = w.viewers[v].location.clone().unwrap_or_default().replace("/whep/a/", "/whep/b/");
    assert_eq!(w.http(WhepRequest::new(Method::Delete, loc)).code(), 204);
    assert_eq!(w.core.viewer_count(), 1, "DELETE under the wrong stream closes nothing");
}

#[test]
fn trickle_patch_is_204_without_etag() {
    let (mut w, demo) = world(sim::config());
    let (v, _) = w.join(&demo);
    let frag = "a=ice-ufrag:ignored\r\n"; // credentials without pwd are rejected
    let base = w
        .session_request(v, Method::Patch)
        .with_header("Content-Type", "application/trickle-ice-sdpfrag");
    assert_eq!(w.http(base.clone().with_body(frag)).code(), 400);
    let body = "a=group:BUNDLE 0 1\r\nm=audio 9 RTP/AVP 0\r\na=mid:0\r\n\
                a=candidate:1 1 udp 2122260223 10.0.0.1 5000 typ host\r\n\
                a=candidate:2 1 udp 2122260223 abcd-1234.local 5001 typ host\r\n\
                a=candidate:3 1 tcp 1518280447 10.0.0.1 9 typ host tcptype active\r\n\
                a=end-of-candidates\r\n";
    let r = w.http(base.clone().with_body(body));
    assert_eq!(r.code(), 204, "{}", text(&r));
    assert!(r.header("etag").is_none(), "trickle PATCH carries no ETag");
    assert!(r.body.is_empty());
    assert_eq!(w.http(base.clone().with_body("")).code(), 204, "empty fragment");
    let wrong = w.session_request(v, Method::Patch).with_header("Content-Type", "application/sdp");
    assert_eq!(w.http(wrong.with_body(body)).code(), 415);
    assert_eq!(w.http(base.with_body("garbage line")).code(), 400);
}

#[test]
fn if_match_is_lenient_by_default_and_strict_by_config() {
    let (mut w, demo) = world(sim::config());
    let (v, _) = w.join(&demo);
    let req = w
        .session_request(v, Method::Patch)
        .with_header("Content-Type", "application/trickle-ice-sdpfrag")
        .with_header("If-Match", "\"stale\"");
    assert_eq!(w.http(req).code(), 204, "lenient: If-Match ignored");

    let mut config = sim::config();
    config.strict_if_match = true;
    let (mut w, demo) = world(config);
    let (v, _) = w.join(&demo);
    let etag = w.viewers[v].etag.clone().unwrap_or_default();
    let base = w
        .session_request(v, Method::Patch)
        .with_header("Content-Type", "application/trickle-ice-sdpfrag");
    assert_eq!(w.http(base.clone()).code(), 428);
    assert_eq!(w.http(base.clone().with_header("If-Match", "\"stale\"")).code(), 412);
    assert_eq!(w.http(base.clone().with_header("If-Match", etag)).code(), 204);
    assert_eq!(w.http(base.clone().with_header("If-Match", "*")).code(), 204);
    assert_eq!(w.http(base.with_header("If-Match", "\"*\"")).code(), 204);
}

#[test]
fn options_preflight_and_discovery() {
    let mut config = sim::config();
    config.bearer_tokens = vec!["tok".into()];
    config.ice_servers = vec![
        IceServer::new("stun:stun.example.net:3478"),
        IceServer {
            url: "turn:turn.example.net:3478?transport=udp".into(),
            username: Some("u".into()),
            credential: Some("p\"w".into()),
            secret: None,
        },
    ];
    let (mut w, _) = world(config);
    let pre = WhepRequest::new(Method::Options, "/whep/demo")
        .with_header("Origin", "https://player.example")
        .with_header("Access-Control-Request-Method", "POST")
        .with_header("Access-Control-Request-Headers", "content-type, authorization");
    let r = w.http(pre);
    assert_eq!(r.code(), 204, "preflight never needs the token");
    assert_cors(&r);
    assert!(r.header("access-control-allow-methods").unwrap_or_default().contains("PATCH"));
    assert!(r.header("access-control-allow-headers").unwrap_or_default().contains("If-Match"));
    assert_eq!(r.header("link"), None, "no ICE servers on a preflight");
    let pre_session = WhepRequest::new(Method::Options, "/whep/demo/junk")
        .with_header("Access-Control-Request-Method", "DELETE");
    assert_eq!(w.http(pre_session).code(), 204);

    let plain = WhepRequest::new(Method::Options, "/whep/demo");
    let r = w.http(plain.clone());
    assert_eq!(r.code(), 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"whep\""));
    let r = w.http(plain.with_header("Authorization", "Bearer tok"));
    assert_eq!(r.code(), 204);
    assert_eq!(r.header("accept-post"), Some("application/sdp"));
    let links: Vec<&str> = r.header_all("link").collect();
    assert_eq!(links.len(), 2);
    assert_eq!(links[0], "<stun:stun.example.net:3478>; rel=\"ice-server\"");
    assert!(
        links[1].contains("username=\"u\"; credential=\"p\\\"w\"; credential-type=\"password\"")
    );

    let r = w.http(post(CHROMIUM_OFFER));
    assert_eq!(r.code(), 401);
    let r = w.http(post(CHROMIUM_OFFER).with_header("Authorization", "Bearer nope"));
    assert_eq!(r.code(), 401);
    let r = w.http(post(CHROMIUM_OFFER).with_header("Authorization", "Bearer tok"));
    assert_eq!(r.code(), 201);
    assert_eq!(r.header_all("link").count(), 2, "ICE servers on the 201");
    let loc = r.header("location").unwrap_or_default().to_owned();
    let del = WhepRequest::new(Method::Delete, loc);
    assert_eq!(w.http(del.clone()).code(), 401, "DELETE needs the token too");
    assert_eq!(w.core.viewer_count(), 1);
    assert_eq!(w.http(del.with_header("Authorization", "Bearer tok")).code(), 204);
}

/// The `username` and `credential` parameters of a `Link` header value.
fn link_credentials(link: &str) -> (String, String) {
    let param = |name: &str| {
        let start = link.find(&format!("; {name}=\"")).map(|i| i + name.len() + 4);
        let rest = &link[start.unwrap_or_else(|| panic!("no {name} in {link}"))..];
        rest[..rest.find('"').unwrap_or(rest.len())].to_owned()
    };
    (param("username"), param("credential"))
}

#[test]
fn turn_rest_credentials_are_made_per_answer_and_expire() {
    let mut config = sim::config();
    config.ice_servers = vec![
        IceServer::new("stun:stun.example.net:3478"),
        IceServer {
            secret: Some("north-secret".into()),
            ..IceServer::new("turn:turn.example.net:3478?transport=udp")
        },
        IceServer {
            username: Some("whep".into()),
            secret: Some("north-secret".into()),
            ..IceServer::new("turn:turn.example.net:3478?transport=tcp")
        },
    ];
    config.turn_credential_ttl = Duration::from_secs(600);
    let (mut w, _) = world(config);
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_000);
    let options = WhepRequest::new(Method::Options, "/whep/demo");

    let r = w.http(options.clone().with_wall_time(at));
    assert_eq!(r.code(), 204);
    let links: Vec<&str> = r.header_all("link").collect();
    assert_eq!(links.len(), 3, "{links:?}");
    assert!(links[1].starts_with("<turn:turn.example.net:3478?transport=udp>; rel=\"ice-server\""));
    assert!(links[1].ends_with("; credential-type=\"password\""), "{}", links[1]);
    let (user, password) = link_credentials(links[1]);
    assert_eq!(user, "1767225600:demo", "expiry = request time + ttl, then the stream");
    assert!(whep_core::turn::RestCredential::verify("north-secret", &user, &password));
    // Computed apart from the core: printf '1767225600:whep' | openssl dgst -sha1 -hmac
    // 'north-secret' -binary | base64
    assert_eq!(
        link_credentials(links[2]),
        ("1767225600:whep".to_owned(), "GUmivfMRItKwmo9AnNcaJY4lvTk=".to_owned())
    );
    assert!(!r.headers.iter().any(|(_, v)| v.contains("north-secret")), "the secret stays");

    let later = at + Duration::from_secs(60);
    let r = w.http(post(CHROMIUM_OFFER).with_wall_time(later));
    assert_eq!(r.code(), 201);
    let links: Vec<&str> = r.header_all("link").collect();
    assert_eq!(links.len(), 3, "ICE servers on the 201");
    assert_eq!(link_credentials(links[1]).0, "1767225660:demo", "a fresh credential");

    let r = w.http(options);
    assert_eq!(r.code(), 204);
    let links: Vec<&str> = r.header_all("link").collect();
    assert_eq!(links, ["<stun:stun.example.net:3478>; rel=\"ice-server\""], "no time, no TURN");
}

#[test]
fn get_head_and_unsupported_methods() {
    let (mut w, demo) = world(sim::config());
    let r = w.http(WhepRequest::new(Method::Get, "/whep/demo"));
    assert_eq!(r.code(), 204);
    let r = w.http(WhepRequest::new(Method::Head, "/whep/demo"));
    assert_eq!((r.code(), r.header("content-type")), (200, Some("application/sdp")));
    assert!(r.body.is_empty());
    assert_eq!(w.http(WhepRequest::new(Method::Get, "/whep/nope")).code(), 404);
    let r = w.http(WhepRequest::new(Method::Put, "/whep/demo"));
    assert_eq!(r.code(), 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD, OPTIONS, POST"));
    let (v, _) = w.join(&demo);
    assert_eq!(w.http(w.session_request(v, Method::Get)).code(), 204);
    let r = w.http(w.session_request(v, Method::Post));
    assert_eq!(r.code(), 405);
    assert_eq!(w.http(WhepRequest::new(Method::Get, "/elsewhere")).code(), 404);
    assert_eq!(w.http(WhepRequest::new(Method::Get, "/whep/a/b/c")).code(), 404);
}

#[test]
fn stream_ids_with_colons_are_percent_decoded() {
    let mut w = SimWorld::new(sim::config());
    w.add_stream("restreamer-ui:ingest:42", StreamConfig::external(), 30);
    for target in ["/whep/restreamer-ui:ingest:42", "/whep/restreamer-ui%3Aingest%3A42"] {
        let r = w.http(post(CHROMIUM_OFFER).tap_target(target));
        assert_eq!(r.code(), 201, "{target}");
        let loc = r.header("location").unwrap_or_default();
        assert!(loc.starts_with("/whep/restreamer-ui:ingest:42/"), "{loc}");
        assert_eq!(w.http(WhepRequest::new(Method::Delete, loc)).code(), 204);
    }
    assert_eq!(w.core.viewer_count(), 0);
}

#[test]
fn custom_prefix_and_origin() {
    let mut config = sim::config();
    config.whep_prefix = "/api/v3/whep".into();
    config.cors_origin = "https://player.example".into();
    let (mut w, _) = world(config);
    let r = w.http(post(CHROMIUM_OFFER).tap_target("/api/v3/whep/demo"));
    assert_eq!(r.code(), 201);
    assert!(r.header("location").unwrap_or_default().starts_with("/api/v3/whep/demo/"));
    assert_eq!(r.header("access-control-allow-origin"), Some("https://player.example"));
    assert_eq!(r.header("vary"), Some("Origin"));
    assert_eq!(w.http(post(CHROMIUM_OFFER)).code(), 404);
}

#[test]
fn no_host_candidate_is_503() {
    let mut config = sim::config();
    config.host_candidates.clear();
    let (mut w, _) = world(config);
    let r = w.http(post(CHROMIUM_OFFER));
    assert_eq!(r.code(), 503);
    assert!(r.header("retry-after").is_some());
}

#[test]
fn session_ids_are_unguessable() {
    let (mut w, demo) = world(sim::config());
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..8 {
        let (v, r) = w.join(&demo);
        assert_eq!(r.code(), 201);
        let loc = w.viewers[v].location.clone().unwrap_or_default();
        let id = loc.rsplit('/').next().unwrap_or_default().to_owned();
        assert_eq!(id.len(), 32);
        assert!(seen.insert(id));
    }
    let _ = Duration::ZERO;
}

#[test]
fn rate_limits_answer_429_with_retry_after_per_client_and_globally() {
    use whep_core::{Rate, RateLimits};
    let mut config = sim::config();
    config.max_viewers_per_stream = 100;
    config.max_viewers_total = 100;
    config.rate_limits = RateLimits {
        post_per_client: Some(Rate::new(1, 2)),
        post_global: Some(Rate::new(1, 4)),
        requests_per_client: Some(Rate::new(2, 3)),
    };
    let (mut w, _) = world(config);
    let from = |last: u8| post(CHROMIUM_OFFER).with_client([10, 0, 0, last]);
    // Client 1: its burst of 2, then 429 with the whole seconds until its next token.
    assert_eq!(w.http(from(1)).code(), 201);
    assert_eq!(w.http(from(1)).code(), 201);
    let r = w.http(from(1));
    assert_eq!(r.code(), 429, "{}", text(&r));
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_cors(&r);
    assert_eq!(text(&r), "webrtc: too many requests, retry later\n");
    // Client 2 has its own budget but the global burst (4) runs out after two more.
    assert_eq!(w.http(from(2)).code(), 201);
    assert_eq!(w.http(from(2)).code(), 201);
    assert_eq!(w.http(from(3)).code(), 429, "global limit");
    assert_eq!(w.core.viewer_count(), 4, "a refused POST creates nothing");
    // Other requests draw on their own per-client bucket: 3 at once, then 429; the
    // preflight is free.
    let unknown = "/whep/demo/00000000000000000000000000000000";
    let del = || WhepRequest::new(Method::Delete, unknown).with_client([10, 0, 0, 1]);
    for _ in 0..3 {
        assert_eq!(w.http(del()).code(), 204);
    }
    assert_eq!(w.http(del()).code(), 429);
    let preflight = WhepRequest::new(Method::Options, "/whep/demo")
        .with_header("Access-Control-Request-Method", "POST")
        .with_client([10, 0, 0, 1]);
    assert_eq!(w.http(preflight).code(), 204);
    assert_eq!(w.core.metrics().rejections.get("rate_limited"), Some(&3));
    // Time refills the buckets.
    w.run_for(Duration::from_secs(2));
    assert_eq!(w.http(from(3)).code(), 201);
    assert_eq!(w.http(del()).code(), 204);
}

#[test]
fn overload_refuses_new_viewers_and_keeps_the_others() {
    // The load is a moving average of the samples: a sample held long enough is the load.
    fn hold(w: &mut SimWorld, sample: f64) {
        for _ in 0..40 {
            w.core.set_load(sample);
        }
    }
    let (mut w, demo) = world(sim::config());
    let (first, r) = w.join(&demo);
    assert_eq!(r.code(), 201);
    // Below the threshold nothing changes.
    hold(&mut w, 0.89);
    assert!(!w.core.is_overloaded());
    assert_eq!(w.join(&demo).1.code(), 201);
    // A keyframe's burst saturates one interval in eight (2 s GOP, 250 ms samples): busy
    // but not overloaded.
    hold(&mut w, 0.75);
    for i in 0..32 {
        w.core.set_load(if i % 8 == 0 { 1.0 } else { 0.75 });
        assert!(!w.core.is_overloaded(), "sample {i}: load {}", w.core.load());
    }
    // At 0.9 (the default) POSTs are refused, cheaply, with Retry-After, within a few samples.
    let mut samples = 0;
    while !w.core.is_overloaded() {
        w.core.set_load(0.95);
        samples += 1;
        assert!(samples <= 8, "still admitting at load {}", w.core.load());
    }
    let r = w.http(post(CHROMIUM_OFFER));
    assert_eq!(r.code(), 503);
    assert_eq!(r.header("retry-after"), Some("5"));
    assert!(text(&r).contains("busy"), "{}", text(&r));
    assert_cors(&r);
    assert_eq!(w.core.metrics().rejections.get("overloaded"), Some(&1));
    assert_eq!(w.core.viewer_count(), 2, "existing viewers are kept");
    w.run_for(Duration::from_secs(1));
    assert_eq!(w.core.viewer_count(), 2);
    // Other requests are still served: the first viewer can leave.
    let del = w.session_request(first, Method::Delete);
    let del = w.http(del);
    assert_eq!(del.code(), 204, "{del:?}");
    // Hysteresis: 0.8 is above 85 % of 0.9, still refused; 0.7 admits again.
    hold(&mut w, 0.8);
    assert_eq!(w.http(post(CHROMIUM_OFFER)).code(), 503);
    hold(&mut w, 0.7);
    assert!(!w.core.is_overloaded());
    assert_eq!(w.join(&demo).1.code(), 201);
    // Nonsense loads are ignored (treated as idle), and 1.0 turns the check off.
    hold(&mut w, f64::NAN);
    assert!(w.core.load() < 0.001, "{}", w.core.load());
    let mut config = sim::config();
    config.max_load = 1.0;
    let (mut w, demo) = world(config);
    hold(&mut w, 1.0);
    assert_eq!(w.join(&demo).1.code(), 201);
}
