//! Viewer authorisation (`whep_core::auth`) through the simulation harness: JWTs decided in the
//! core, and the HTTP callback's pending requests, timeouts, bound and cache.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use whep_core::auth::{AuthConfig, HttpAuth, JwtKeys, JwtRefresh, testing};
use whep_core::sim::{self, SimWorld};
use whep_core::whep::Method;
use whep_core::{
    Answer, AuthDecision, CoreConfig, RequestId, StreamConfig, StreamId, WhepRequest, WhepResponse,
};

const CHROMIUM_OFFER: &str = include_str!("data/chromium-156-offer.sdp");
const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
const H256: &str = r#"{"alg":"HS256","typ":"JWT"}"#;
const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

fn world(auth: AuthConfig, tokens: &[&str]) -> (SimWorld, StreamId) {
    let config = CoreConfig {
        auth,
        bearer_tokens: tokens.iter().map(|t| (*t).to_owned()).collect(),
        ..sim::config()
    };
    let mut w = SimWorld::new(config);
    let demo = w.add_stream("demo", StreamConfig::external(), 30);
    w.add_stream("other", StreamConfig::external(), 30);
    (w, demo)
}

fn jwt_world() -> (SimWorld, StreamId) {
    let mut keys = JwtKeys::new();
    keys.add_hs256(SECRET);
    world(AuthConfig { jwt: Some(keys), ..AuthConfig::default() }, &[])
}

fn callback_world(max_pending: usize, cache: Duration) -> (SimWorld, StreamId) {
    let http = HttpAuth { timeout: Duration::from_secs(2), cache_ttl: cache, max_pending };
    world(AuthConfig { http: Some(http), ..AuthConfig::default() }, &["static"])
}

/// Wall-clock time of every request: 1000 s after the epoch.
fn wall() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1000)
}

fn post(target: &str) -> WhepRequest {
    WhepRequest::new(Method::Post, target)
        .with_header("Content-Type", "application/sdp")
        .with_body(CHROMIUM_OFFER)
        .with_client(CLIENT)
        .with_wall_time(wall())
}

fn bearer(target: &str, token: &str) -> WhepRequest {
    post(target).with_header("Authorization", format!("Bearer {token}"))
}

fn token(streams: &str, exp: u64) -> String {
    testing::hs256(SECRET, H256, &format!(r#"{{"exp":{exp},"whep":{{"streams":{streams}}}}}"#))
}

fn text(r: &WhepResponse) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

#[test]
fn jwt_grants_its_streams_and_refuses_the_rest() {
    let (mut w, _) = jwt_world();
    let t = token(r#"["demo"]"#, 2000);
    let r = w.http(bearer("/whep/demo", &t));
    assert_eq!(r.code(), 201, "{}", text(&r));
    // The session's own URL needs no token: its id is the capability.
    let loc = r.header("location").unwrap_or_default().to_owned();
    let r = w.http(WhepRequest::new(Method::Delete, loc).with_client(CLIENT));
    assert_eq!(r.code(), 204, "{}", text(&r));

    let r = w.http(bearer("/whep/other", &t));
    assert_eq!(r.code(), 403, "{}", text(&r));
    assert!(text(&r).contains("does not grant stream other"), "{}", text(&r));

    let r = w.http(bearer("/whep/demo", &token(r#"["demo"]"#, 900)));
    assert_eq!(r.code(), 401, "{}", text(&r));
    assert!(text(&r).contains("expired"), "{}", text(&r));
    assert!(r.header("www-authenticate").is_some_and(|v| v.contains("invalid_token")));

    let forged = testing::hs256(b"not-the-secret-not-the-secret-00", H256, r#"{"exp":2000}"#);
    let r = w.http(bearer("/whep/demo", &forged));
    assert_eq!(r.code(), 401, "{}", text(&r));
    assert!(text(&r).contains("signature"), "{}", text(&r));

    let r = w.http(post("/whep/demo"));
    assert_eq!(r.code(), 401, "no token: {}", text(&r));
    let r = w.http(bearer("/whep/demo", "a.b"));
    assert_eq!(r.code(), 401, "not a JWT, no callback: {}", text(&r));
}

#[test]
fn jwt_in_the_query_plays_and_is_kept_in_the_location() {
    let (mut w, _) = jwt_world();
    let t = token(r#"["dem*"]"#, 2000);
    let r = w.http(post(&format!("/whep/demo?jwt={t}")));
    assert_eq!(r.code(), 201, "{}", text(&r));
    assert!(r.header("location").is_some_and(|l| l.ends_with(&format!("?jwt={t}"))));
    let r = w.http(post(&format!("/whep/demo?token={t}")));
    assert_eq!(r.code(), 201, "{}", text(&r));
}

#[test]
fn jwt_without_wall_clock_is_refused_clearly() {
    let (mut w, _) = jwt_world();
    let mut req = bearer("/whep/demo", &token(r#"["demo"]"#, 2000));
    req.wall_time = None;
    let r = w.http(req);
    assert_eq!(r.code(), 503, "{}", text(&r));
    assert!(text(&r).contains("wall-clock"), "{}", text(&r));
}

/// Sends `req` through `handle_request` and drains; returns the answer.
fn request(w: &mut SimWorld, req: WhepRequest) -> Answer {
    let a = w.core.handle_request(req, w.now);
    w.drain();
    a
}

fn decide(w: &mut SimWorld, id: RequestId, d: AuthDecision) -> WhepResponse {
    w.core.handle_auth(id, d, w.now);
    w.drain();
    let (got, r) = w.responses.pop().expect("a response for the pending request");
    assert_eq!(got, id);
    r
}

fn pending(a: Answer) -> RequestId {
    match a {
        Answer::Pending(id) => id,
        Answer::Ready(r) => panic!("answered at once: {} {}", r.code(), text(&r)),
    }
}

#[test]
fn callback_allows_denies_and_caches() {
    let (mut w, _) = callback_world(8, Duration::from_secs(60));
    let id =
        pending(request(&mut w, bearer("/whep/demo", "good").with_header("User-Agent", "t/1")));
    let asked = w.authorize.pop().expect("an Authorize output");
    assert_eq!(
        (asked.id, asked.stream.as_str(), asked.token.as_deref()),
        (id, "demo", Some("good"))
    );
    assert_eq!((asked.client, asked.user_agent.as_deref()), (Some(CLIENT), Some("t/1")));
    let r = decide(&mut w, id, AuthDecision::Allow);
    assert_eq!(r.code(), 201, "{}", text(&r));
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));

    // The same stream, token and client: from the cache, at once.
    match request(&mut w, bearer("/whep/demo", "good")) {
        Answer::Ready(r) => assert_eq!(r.code(), 201, "{}", text(&r)),
        Answer::Pending(_) => panic!("asked again despite the cache"),
    }
    assert!(w.authorize.is_empty());
    // Another client address is asked about.
    let other = bearer("/whep/demo", "good").with_client(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 8)));
    let id = pending(request(&mut w, other));
    assert_eq!(decide(&mut w, id, AuthDecision::Deny(403)).code(), 403);

    let id = pending(request(&mut w, bearer("/whep/demo", "bad")));
    let r = decide(&mut w, id, AuthDecision::Deny(401));
    assert_eq!(r.code(), 401, "{}", text(&r));
    // A cached refusal, at once.
    match request(&mut w, bearer("/whep/demo", "bad")) {
        Answer::Ready(r) => assert_eq!(r.code(), 401),
        Answer::Pending(_) => panic!("asked again despite the cache"),
    }
    // After the cache time, asked again.
    w.run_for(Duration::from_secs(61));
    let _ = pending(request(&mut w, bearer("/whep/demo", "bad")));

    // A static token needs no callback.
    match request(&mut w, bearer("/whep/demo", "static")) {
        Answer::Ready(r) => assert_eq!(r.code(), 201, "{}", text(&r)),
        Answer::Pending(_) => panic!("a static token went to the callback"),
    }
}

#[test]
fn callback_errors_and_timeouts_refuse_with_503_and_leak_nothing() {
    let (mut w, _) = callback_world(8, Duration::from_secs(60));
    let id = pending(request(&mut w, bearer("/whep/demo", "t")));
    let r = decide(&mut w, id, AuthDecision::Error("connection refused".into()));
    assert_eq!(r.code(), 503);
    assert!(text(&r).contains("authorisation failed: connection refused"), "{}", text(&r));
    // An error is not cached.
    let id = pending(request(&mut w, bearer("/whep/demo", "t")));
    assert_eq!(w.core.pending_requests(), 1);
    w.run_for(Duration::from_millis(1900));
    assert!(w.responses.is_empty(), "answered before the timeout");
    w.run_for(Duration::from_millis(200));
    let (got, r) = w.responses.pop().expect("the timeout answers");
    assert_eq!((got, r.code()), (id, 503));
    assert!(text(&r).contains("within 2000 ms"), "{}", text(&r));
    assert_eq!(w.core.pending_requests(), 0);
    assert!(w.core.poll_timeout().is_none_or(|(_, why)| why != whep_core::TimerReason::Auth));
    // The late decision is ignored.
    w.core.handle_auth(id, AuthDecision::Allow, w.now);
    w.drain();
    assert!(w.responses.is_empty());
    assert_eq!(w.core.viewer_count(), 0);
}

#[test]
fn pending_requests_are_bounded() {
    let (mut w, _) = callback_world(2, Duration::from_secs(60));
    let a = pending(request(&mut w, bearer("/whep/demo", "1")));
    let _b = pending(request(&mut w, bearer("/whep/demo", "2")));
    match request(&mut w, bearer("/whep/demo", "3")) {
        Answer::Ready(r) => {
            assert_eq!(r.code(), 503, "{}", text(&r));
            assert!(r.header("retry-after").is_some());
        }
        Answer::Pending(_) => panic!("beyond the bound"),
    }
    assert_eq!(w.authorize.len(), 2);
    assert_eq!(decide(&mut w, a, AuthDecision::Allow).code(), 201);
    let _c = pending(request(&mut w, bearer("/whep/demo", "3")));
    // Cancelled and shut down: nothing is left.
    w.core.cancel_request(_c);
    assert_eq!(w.core.pending_requests(), 1);
    w.core.shutdown(w.now);
    w.drain();
    let (_, r) = w.responses.pop().expect("shutdown answers the pending request");
    assert_eq!(r.code(), 503);
    assert_eq!(w.core.pending_requests(), 0);
}

#[test]
fn a_cancelled_request_frees_its_place_at_once_and_its_decision_is_ignored() {
    let (mut w, _) = callback_world(1, Duration::from_secs(60));
    let gone = pending(request(&mut w, bearer("/whep/demo", "good")));
    assert_eq!(w.core.pending_requests(), 1);
    // The bound is reached: the next viewer waits for no one and gets 503.
    match request(&mut w, bearer("/whep/demo", "other")) {
        Answer::Ready(r) => assert_eq!(r.code(), 503, "{}", text(&r)),
        Answer::Pending(_) => panic!("beyond the bound"),
    }
    // Its client goes away: the place is free at once, its timer with it.
    w.core.cancel_request(gone);
    w.drain();
    assert_eq!(w.core.pending_requests(), 0);
    assert!(w.core.poll_timeout().is_none_or(|(_, why)| why != whep_core::TimerReason::Auth));
    let next = pending(request(&mut w, bearer("/whep/demo", "next")));
    // The decision on the cancelled request is ignored: no response, no viewer, no cache.
    w.core.handle_auth(gone, AuthDecision::Allow, w.now);
    w.drain();
    assert!(w.responses.is_empty(), "a cancelled request was answered");
    assert_eq!(w.core.viewer_count(), 0);
    // Cancelling again, or an unknown id, changes nothing.
    w.core.cancel_request(gone);
    w.core.cancel_request(RequestId(999));
    assert_eq!(w.core.pending_requests(), 1);
    // Its timeout passes unnoticed; the other request's answers it alone.
    w.run_for(Duration::from_millis(2100));
    let (got, r) = w.responses.pop().expect("the timeout answers the other request");
    assert_eq!((got, r.code()), (next, 503));
    assert!(w.responses.is_empty());
    // "good" was not cached by the ignored decision: it is asked about again.
    let _ = pending(request(&mut w, bearer("/whep/demo", "good")));
    w.core.check_invariants();
}

#[test]
fn handle_http_cannot_wait_and_says_so() {
    let (mut w, _) = callback_world(8, Duration::from_secs(60));
    let r = w.http(bearer("/whep/demo", "t"));
    assert_eq!(r.code(), 503);
    assert!(text(&r).contains("cannot wait"), "{}", text(&r));
    assert!(w.authorize.is_empty() && w.core.pending_requests() == 0);
}

#[test]
fn static_tokens_alone_guard_every_request_as_before() {
    let (mut w, _) = world(AuthConfig::default(), &["s3cret"]);
    let r = w.http(bearer("/whep/demo", "s3cret"));
    assert_eq!(r.code(), 201, "{}", text(&r));
    let loc = r.header("location").unwrap_or_default().to_owned();
    let r = w.http(WhepRequest::new(Method::Delete, loc.clone()));
    assert_eq!(r.code(), 401, "a session URL needs the token too");
    let r =
        w.http(WhepRequest::new(Method::Delete, loc).with_header("Authorization", "Bearer s3cret"));
    assert_eq!(r.code(), 204);
    assert_eq!(w.http(post("/whep/demo")).code(), 401);
    assert_eq!(w.http(post("/whep/demo?token=s3cret")).code(), 201);
}

/// A world whose JWT keys come from a JWKS (`k1`) that can be fetched again.
fn rotating_world(max_pending: usize) -> (SimWorld, StreamId, String) {
    let (_, jwk1) = testing::es256_key("k1");
    let refresh = JwtRefresh { max_pending, ..JwtRefresh::default() };
    let auth = AuthConfig {
        jwt: Some(jwks(&[&jwk1])),
        jwt_refresh: Some(refresh),
        ..AuthConfig::default()
    };
    let (w, demo) = world(auth, &[]);
    (w, demo, jwk1)
}

fn es256_token(key: &aws_lc_rs::signature::EcdsaKeyPair, kid: &str) -> String {
    let header = format!(r#"{{"alg":"ES256","typ":"JWT","kid":"{kid}"}}"#);
    testing::es256(key, &header, r#"{"exp":2000,"whep":{"streams":["demo"]}}"#)
}

fn jwks(jwks: &[&str]) -> JwtKeys {
    let mut keys = JwtKeys::new();
    let doc = format!(r#"{{"keys":[{}]}}"#, jwks.join(","));
    assert_eq!(keys.add_jwks(doc.as_bytes()), Ok(jwks.len()));
    keys
}

#[test]
fn a_token_of_a_rotated_key_waits_for_the_keys_fetched_again() {
    let (mut w, _, jwk1) = rotating_world(8);
    let (k2, jwk2) = testing::es256_key("k2");
    // Signed with a key the issuer published after the last fetch: it waits, one refresh.
    let a = pending(request(&mut w, bearer("/whep/demo", &es256_token(&k2, "k2"))));
    let b = pending(request(&mut w, bearer("/whep/demo", &es256_token(&k2, "k2"))));
    assert_eq!(w.refresh_jwt_keys, 1, "one refresh for both");
    assert_eq!(w.core.pending_requests(), 2);
    w.run_for(Duration::from_millis(300));
    assert!(w.responses.is_empty(), "answered before the keys came");
    w.core.set_jwt_keys(jwks(&[&jwk1, &jwk2]), w.now);
    w.drain();
    let mut answered: Vec<(RequestId, u16)> =
        w.responses.drain(..).map(|(id, r)| (id, r.code())).collect();
    answered.sort();
    assert_eq!(answered, [(a, 201), (b, 201)]);
    assert_eq!((w.core.pending_requests(), w.core.viewer_count()), (0, 2));
    assert!(w.core.poll_timeout().is_none_or(|(_, why)| why != whep_core::TimerReason::Auth));

    // A made-up kid within the minimum interval: refused at once, nothing asked.
    let (k9, _) = testing::es256_key("k9");
    let r = w.http(bearer("/whep/demo", &es256_token(&k9, "k9")));
    assert_eq!(r.code(), 401, "{}", text(&r));
    assert!(text(&r).contains("no key"), "{}", text(&r));
    assert_eq!(w.refresh_jwt_keys, 1);
    // After it, asked again; the keys that come still lack it: 401.
    w.run_for(JwtRefresh::default().min_interval);
    let c = pending(request(&mut w, bearer("/whep/demo", &es256_token(&k9, "k9"))));
    assert_eq!(w.refresh_jwt_keys, 2);
    w.core.set_jwt_keys(jwks(&[&jwk1, &jwk2]), w.now);
    w.drain();
    let (got, r) = w.responses.pop().expect("answered with the keys there are");
    assert_eq!((got, r.code()), (c, 401), "{}", text(&r));
    assert_eq!(w.core.pending_requests(), 0);
}

#[test]
fn a_refresh_never_answered_refuses_after_the_wait_and_is_asked_again() {
    let (mut w, _, _) = rotating_world(8);
    let (k2, _) = testing::es256_key("k2");
    let t = es256_token(&k2, "k2");
    let a = pending(request(&mut w, bearer("/whep/demo", &t)));
    let wait = JwtRefresh::default().wait;
    w.run_for(wait - Duration::from_millis(100));
    assert!(w.responses.is_empty(), "answered before the wait");
    w.run_for(Duration::from_millis(200));
    let (got, r) = w.responses.pop().expect("the wait answers");
    assert_eq!((got, r.code()), (a, 401), "{}", text(&r));
    assert_eq!(w.core.pending_requests(), 0);
    assert!(w.core.poll_timeout().is_none_or(|(_, why)| why != whep_core::TimerReason::Auth));
    // The unanswered refresh is over: after the minimum interval the next token asks again.
    w.run_for(JwtRefresh::default().min_interval);
    let _ = pending(request(&mut w, bearer("/whep/demo", &t)));
    assert_eq!(w.refresh_jwt_keys, 2);
}

#[test]
fn requests_waiting_for_keys_are_bounded_cancelled_and_not_decided_by_the_callback() {
    let (mut w, _, jwk1) = rotating_world(1);
    let (k2, jwk2) = testing::es256_key("k2");
    let t = es256_token(&k2, "k2");
    let a = pending(request(&mut w, bearer("/whep/demo", &t)));
    // Full: the next is refused as a token without a key, at once.
    let r = w.http(bearer("/whep/demo", &t));
    assert_eq!(r.code(), 401, "{}", text(&r));
    // A callback decision for it is not its answer.
    w.core.handle_auth(a, AuthDecision::Allow, w.now);
    w.drain();
    assert!(w.responses.is_empty() && w.core.pending_requests() == 1);
    // Its client goes: the place is free at once.
    w.core.cancel_request(a);
    assert_eq!(w.core.pending_requests(), 0);
    let b = pending(request(&mut w, bearer("/whep/demo", &t)));
    assert_eq!(w.refresh_jwt_keys, 1, "the refresh under way serves the next one");
    w.core.set_jwt_keys(jwks(&[&jwk1, &jwk2]), w.now);
    w.drain();
    let answered: Vec<(RequestId, u16)> =
        w.responses.drain(..).map(|(id, r)| (id, r.code())).collect();
    assert_eq!(answered, [(b, 201)], "the cancelled request is not answered");
    // A loop that cannot wait (handle_http) refuses at once.
    let (k3, _) = testing::es256_key("k3");
    w.run_for(JwtRefresh::default().min_interval);
    let r = w.http(bearer("/whep/demo", &es256_token(&k3, "k3")));
    assert_eq!(r.code(), 401, "{}", text(&r));
}

#[test]
fn without_a_refresh_a_token_of_an_unknown_key_is_refused_at_once() {
    let (_, jwk1) = testing::es256_key("k1");
    let (mut w, _) = world(AuthConfig { jwt: Some(jwks(&[&jwk1])), ..AuthConfig::default() }, &[]);
    let (k2, _) = testing::es256_key("k2");
    let r = request(&mut w, bearer("/whep/demo", &es256_token(&k2, "k2")));
    assert!(matches!(r, Answer::Ready(ref r) if r.code() == 401), "{r:?}");
    assert_eq!(w.refresh_jwt_keys, 0);
}

#[test]
fn a_token_made_for_mediamtx_plays_the_paths_it_may_read() {
    let (mut w, _) = jwt_world();
    let claims = r#"{"exp":2000,"mediamtx_permissions":[{"action":"read","path":"~^dem"},{"action":"publish","path":"other"}]}"#;
    let t = testing::hs256(SECRET, H256, claims);
    let r = w.http(bearer("/whep/demo", &t));
    assert_eq!(r.code(), 201, "{}", text(&r));
    let r = w.http(bearer("/whep/other", &t));
    assert_eq!(r.code(), 403, "publishing is not viewing: {}", text(&r));
}
