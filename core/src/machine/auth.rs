//! Authorisation of WHEP requests (see [`crate::auth`]): the gate every non-preflight request
//! passes, the requests parked while the authorisation callback decides or while rotated JWT
//! keys are fetched, and the callback's cached decisions.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::auth::{self, Answer, AuthDecision, AuthRequest, JwtError, RequestId};
use crate::ids::StreamId;
use crate::whep::{self, Reject, Route, WhepRequest};
use crate::{Output, WhepResponse};

use super::{Core, TimerKey};

/// Cached callback decisions kept at most; beyond, expired ones go, then all.
const MAX_CACHED: usize = 4096;

/// What the gate says about a request.
#[derive(Debug)]
pub(super) enum Gate {
    /// Serve it.
    Open,
    /// Refuse it.
    Deny(Reject),
    /// Ask the authorisation server, and cache its decision under this key.
    Ask { stream: StreamId, token: Option<String>, key: [u8; 32] },
    /// Wait for the JWT keys to be fetched again: the token names a key the core lacks.
    AwaitKeys { stream: StreamId },
}

/// A cached decision of the authorisation server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Allow,
    Deny(u16),
}

#[derive(Debug)]
struct Parked {
    req: WhepRequest,
    stream: StreamId,
    waits: Waits,
    deadline: Instant,
}

/// What a parked request waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waits {
    /// The callback's decision, cached under this key.
    Callback([u8; 32]),
    /// The JWT keys, fetched again.
    Keys,
}

/// The JWT key refresh the core asked for ([`Output::RefreshJwtKeys`]).
#[derive(Debug, Default)]
struct Refresh {
    /// When it was last asked.
    asked: Option<Instant>,
    /// Asked and not yet answered by [`Core::set_jwt_keys`].
    in_flight: bool,
}

/// Requests waiting for the callback or for keys, and the callback's decisions by key.
#[derive(Debug, Default)]
pub(super) struct AuthState {
    next: u64,
    pending: BTreeMap<RequestId, Parked>,
    cache: BTreeMap<[u8; 32], (Instant, Verdict)>,
    refresh: Refresh,
}

impl AuthState {
    pub(super) fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }

    pub(super) fn pending_len(&self) -> usize {
        self.pending.len()
    }

    pub(super) fn deadlines(&self) -> impl Iterator<Item = (RequestId, Instant)> + '_ {
        self.pending.iter().map(|(id, p)| (*id, p.deadline))
    }

    /// Parked requests waiting for keys (`true`) or for the callback (`false`).
    fn waiting(&self, for_keys: bool) -> usize {
        self.pending.values().filter(|p| (p.waits == Waits::Keys) == for_keys).count()
    }

    fn cached(&mut self, key: &[u8; 32], now: Instant) -> Option<Verdict> {
        match self.cache.get(key) {
            Some((until, v)) if *until > now => Some(*v),
            Some(_) => {
                self.cache.remove(key);
                None
            }
            None => None,
        }
    }

    fn remember(&mut self, key: [u8; 32], verdict: Verdict, ttl: Duration, now: Instant) {
        if ttl.is_zero() {
            return;
        }
        if self.cache.len() >= MAX_CACHED {
            self.cache.retain(|_, (until, _)| *until > now);
            if self.cache.len() >= MAX_CACHED {
                self.cache.clear();
            }
        }
        self.cache.insert(key, (now + ttl, verdict));
    }
}

impl Verdict {
    fn gate(self, stream: &StreamId) -> Gate {
        match self {
            Self::Allow => Gate::Open,
            Self::Deny(401) => Gate::Deny(Reject::InvalidToken(
                "the authorisation server refused the token".into(),
            )),
            Self::Deny(_) => Gate::Deny(Reject::Forbidden(format!(
                "the authorisation server denied access to stream {stream}"
            ))),
        }
    }
}

impl Core {
    /// Answers one WHEP request, or leaves it pending while the authorisation callback decides
    /// ([`Answer::Pending`]; see [`crate::auth`]). Without the callback configured this always
    /// answers at once, exactly as [`handle_http`](Self::handle_http).
    ///
    /// A pending request is answered by [`Output::Respond`] after [`handle_auth`](Self::handle_auth)
    /// reports the decision, or when [`HttpAuth::timeout`](crate::auth::HttpAuth::timeout)
    /// passes first (503), or at [`shutdown`](Self::shutdown) (503). At most
    /// [`HttpAuth::max_pending`](crate::auth::HttpAuth::max_pending) wait at once; beyond, 503
    /// with `Retry-After`.
    pub fn handle_request(&mut self, req: WhepRequest, now: Instant) -> Answer {
        self.request(req, now, true)
    }

    /// Reports the authorisation server's decision on the pending request `id`
    /// ([`Output::Authorize`]); its response follows as [`Output::Respond`]. A decision that
    /// comes after the request timed out (or for an unknown id) is ignored.
    pub fn handle_auth(&mut self, id: RequestId, decision: AuthDecision, now: Instant) {
        let now = self.tick(now);
        self.fan_out_pending();
        let key = match self.auth.pending.get(&id) {
            Some(Parked { waits: Waits::Callback(key), .. }) => *key,
            _ => {
                debug!(%id, ?decision, "late authorisation decision ignored");
                return;
            }
        };
        let Some(parked) = self.auth.pending.remove(&id) else { return };
        self.timers.remove(&(parked.deadline, TimerKey::Auth(id)));
        let ttl = self.config.auth.http.as_ref().map_or(Duration::ZERO, |h| h.cache_ttl);
        let gate = match decision {
            AuthDecision::Allow => {
                self.auth.remember(key, Verdict::Allow, ttl, now);
                Gate::Open
            }
            AuthDecision::Deny(status) => {
                let v = Verdict::Deny(if status == 401 { 401 } else { 403 });
                self.auth.remember(key, v, ttl, now);
                v.gate(&parked.stream)
            }
            AuthDecision::Error(why) => {
                warn!(%id, stream = %parked.stream, error = %why, "authorisation callback failed");
                Gate::Deny(Reject::AuthFailed(why))
            }
        };
        debug!(%id, stream = %parked.stream, ?gate, "authorisation decided");
        self.resume(id, parked.req, gate, now);
    }

    /// Drops the pending request `id` because its client went away (the runtime saw its HTTP
    /// connection close before the answer): it no longer counts against
    /// [`HttpAuth::max_pending`](crate::auth::HttpAuth::max_pending), its timeout is gone,
    /// nothing is answered, and the authorisation server's decision on it, if one still comes,
    /// is ignored ([`handle_auth`](Self::handle_auth)). An unknown or already answered id is
    /// ignored.
    pub fn cancel_request(&mut self, id: RequestId) {
        if let Some(p) = self.auth.pending.remove(&id) {
            self.timers.remove(&(p.deadline, TimerKey::Auth(id)));
            debug!(%id, stream = %p.stream, "pending request cancelled: its client went away");
        }
    }

    /// Requests waiting for the authorisation callback or for JWT keys.
    pub fn pending_requests(&self) -> usize {
        self.auth.pending.len()
    }

    /// Replaces the keys that verify JWTs (a JWKS fetched, periodically or because the core
    /// asked with [`Output::RefreshJwtKeys`]), and checks again every request waiting for keys:
    /// their responses follow as [`Output::Respond`]. Keys are ignored unless JWT verification
    /// is configured ([`AuthConfig::jwt`](crate::auth::AuthConfig::jwt)).
    pub fn set_jwt_keys(&mut self, keys: auth::JwtKeys, now: Instant) {
        let now = self.tick(now);
        self.fan_out_pending();
        if let Some(k) = &mut self.config.auth.jwt {
            info!(keys = keys.len(), "JWT keys replaced");
            *k = keys;
        }
        self.auth.refresh.in_flight = false;
        let waiting: Vec<RequestId> = (self.auth.pending.iter())
            .filter(|(_, p)| p.waits == Waits::Keys)
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            if let Some(p) = self.auth.pending.remove(&id) {
                self.timers.remove(&(p.deadline, TimerKey::Auth(id)));
                self.check_again(id, p.req, now);
            }
        }
    }

    pub(super) fn auth_timeout(&mut self, id: RequestId, now: Instant) {
        let Some(parked) = self.auth.pending.remove(&id) else { return };
        if parked.waits == Waits::Keys {
            let wait = self.config.auth.jwt_refresh.as_ref().map_or(Duration::ZERO, |r| r.wait);
            let asked = self.auth.refresh.asked.unwrap_or(now);
            if self.auth.refresh.in_flight && now.saturating_duration_since(asked) >= wait {
                warn!(
                    "the JWT keys were not fetched again in time; checking with the keys there are"
                );
                self.auth.refresh.in_flight = false;
            }
            return self.check_again(id, parked.req, now);
        }
        let secs = self.config.auth.http.as_ref().map_or(0, |h| h.timeout.as_millis());
        warn!(%id, stream = %parked.stream, "authorisation callback timed out");
        let gate = Gate::Deny(Reject::AuthFailed(format!(
            "no answer from the authorisation server within {secs} ms"
        )));
        self.resume(id, parked.req, gate, now);
    }

    /// Answers a request that waited for keys, with the keys there are now.
    fn check_again(&mut self, id: RequestId, req: WhepRequest, now: Instant) {
        let node = whep::NodeTag::Only(self.config.node_id.as_deref());
        let gate = match whep::route(&self.config.whep_prefix, node, &req.target) {
            Some(route) => self.gate(&req, &route, now, false),
            None => Gate::Deny(Reject::NoRoute),
        };
        self.resume(id, req, gate, now);
    }

    /// Answers every pending request 503 (shutdown).
    pub(super) fn answer_pending_auth(&mut self, now: Instant) {
        let ids: Vec<RequestId> = self.auth.pending.keys().copied().collect();
        for id in ids {
            if let Some(p) = self.auth.pending.remove(&id) {
                self.timers.remove(&(p.deadline, TimerKey::Auth(id)));
                let gate = Gate::Deny(Reject::AuthFailed("the server is shutting down".into()));
                self.resume(id, p.req, gate, now);
            }
        }
    }

    fn resume(&mut self, id: RequestId, req: WhepRequest, gate: Gate, now: Instant) {
        let node = whep::NodeTag::Only(self.config.node_id.as_deref());
        let route = whep::route(&self.config.whep_prefix, node, &req.target);
        let label = Self::label(route.as_ref());
        let result = match (gate, route) {
            (Gate::Open, Some(route)) => self.serve(&req, route, now),
            (Gate::Open, None) => Err(Reject::NoRoute),
            (Gate::Deny(r), _) => Err(r),
            // Not given by a gate that may not wait (`check_again`).
            (Gate::Ask { .. } | Gate::AwaitKeys { .. }, _) => {
                Err(Reject::AuthFailed("the request cannot wait a second time".into()))
            }
        };
        let response = self.finish(&req, label, result);
        self.outputs.push_back(Output::Respond { id, response });
    }

    /// The gate of a routed, admitted, non-preflight request (see [`crate::auth`]); with
    /// `may_wait` false it never says [`Gate::Ask`] or [`Gate::AwaitKeys`] for a JWT.
    pub(super) fn gate(
        &mut self,
        req: &WhepRequest,
        route: &Route,
        now: Instant,
        may_wait: bool,
    ) -> Gate {
        let statics = &self.config.bearer_tokens;
        let config = &self.config.auth;
        if !config.is_external() {
            let token = auth::presented_token(req);
            return if whep::bearer_ok(statics, token.as_deref()) {
                Gate::Open
            } else {
                Gate::Deny(Reject::Unauthorized)
            };
        }
        // A session's URL: its id is the capability.
        let Route::Endpoint(stream) = route else { return Gate::Open };
        let token = auth::presented_token(req);
        if let Some(t) = token.as_deref()
            && !statics.is_empty()
            && whep::bearer_ok(statics, Some(t))
        {
            return Gate::Open;
        }
        if let (Some(keys), Some(t)) = (&config.jwt, token.as_deref())
            && auth::looks_like_jwt(t)
        {
            let Some(wall) = req.wall_time else {
                return Gate::Deny(Reject::AuthFailed(
                    "the server gave the request no wall-clock time to check the token's expiry"
                        .into(),
                ));
            };
            let verified = keys.verify(t, wall, config.leeway).and_then(|claims| {
                let (iss, aud) = (config.jwt_issuer.as_deref(), config.jwt_audience.as_deref());
                claims.check_origin(iss, aud).map(|()| claims)
            });
            return match verified {
                Ok(claims) if claims.allows(stream.as_str()) => Gate::Open,
                Ok(_) => Gate::Deny(Reject::Forbidden(format!(
                    "the token does not grant stream {stream}"
                ))),
                Err(JwtError::NoKey) if may_wait && self.may_refresh_keys(now) => {
                    Gate::AwaitKeys { stream: stream.clone() }
                }
                Err(e) => Gate::Deny(Reject::InvalidToken(e.to_string())),
            };
        }
        if config.http.is_some() {
            let key = auth::cache_key(stream.as_str(), token.as_deref(), req.client);
            if let Some(v) = self.auth.cached(&key, now) {
                debug!(stream = %stream, ?v, "authorisation from cache");
                return v.gate(stream);
            }
            return Gate::Ask { stream: stream.clone(), token, key };
        }
        Gate::Deny(Reject::Unauthorized)
    }

    /// Whether a request whose JWT names a key the core lacks may wait for the keys: a
    /// refresh is configured and either under way or not asked within its minimum interval.
    fn may_refresh_keys(&self, now: Instant) -> bool {
        let Some(r) = &self.config.auth.jwt_refresh else { return false };
        let refresh = &self.auth.refresh;
        refresh.in_flight
            || refresh.asked.is_none_or(|t| now.saturating_duration_since(t) >= r.min_interval)
    }

    /// Whether [`HttpAuth::max_pending`](crate::auth::HttpAuth::max_pending) requests wait.
    pub(super) fn auth_full(&self) -> bool {
        let max = self.config.auth.http.as_ref().map_or(0, |h| h.max_pending);
        self.auth.waiting(false) >= max
    }

    /// Whether [`JwtRefresh::max_pending`](crate::auth::JwtRefresh::max_pending) requests wait
    /// for keys.
    pub(super) fn keys_full(&self) -> bool {
        let max = self.config.auth.jwt_refresh.as_ref().map_or(0, |r| r.max_pending);
        self.auth.waiting(true) >= max
    }

    /// Parks `req` until the JWT keys come again ([`Core::set_jwt_keys`]) or
    /// [`JwtRefresh::wait`](crate::auth::JwtRefresh::wait) passes, emitting
    /// [`Output::RefreshJwtKeys`] unless a refresh is under way (the caller checked
    /// [`keys_full`](Self::keys_full)).
    pub(super) fn park_for_keys(
        &mut self,
        req: WhepRequest,
        stream: StreamId,
        now: Instant,
    ) -> RequestId {
        let wait = self.config.auth.jwt_refresh.as_ref().map_or(Duration::ZERO, |r| r.wait);
        if !self.auth.refresh.in_flight {
            info!(stream = %stream, "a token names a JWT key not known here; fetching the keys again");
            self.auth.refresh = Refresh { asked: Some(now), in_flight: true };
            self.outputs.push_back(Output::RefreshJwtKeys);
        }
        let id = self.park_as(req, stream, Waits::Keys, now + wait);
        debug!(%id, "waiting for the JWT keys");
        id
    }

    /// Parks `req` and emits [`Output::Authorize`] (the caller checked
    /// [`auth_full`](Self::auth_full)).
    pub(super) fn park(
        &mut self,
        req: WhepRequest,
        stream: StreamId,
        token: Option<String>,
        key: [u8; 32],
        now: Instant,
    ) -> RequestId {
        let timeout = self.config.auth.http.as_ref().map_or(Duration::ZERO, |h| h.timeout);
        let deadline = now + timeout;
        let query = req.target.split_once('?').map(|(_, q)| q.to_owned()).unwrap_or_default();
        let (method, client) = (req.method.to_string(), req.client);
        let user_agent = req.header("user-agent").map(str::to_owned);
        let id = self.park_as(req, stream.clone(), Waits::Callback(key), deadline);
        self.outputs.push_back(Output::Authorize(AuthRequest {
            id,
            stream: stream.clone(),
            method,
            client,
            token,
            user_agent,
            query,
        }));
        debug!(%id, stream = %stream, "waiting for the authorisation callback");
        id
    }

    /// Parks `req` under a new id with a timeout at `deadline`.
    fn park_as(
        &mut self,
        req: WhepRequest,
        stream: StreamId,
        waits: Waits,
        deadline: Instant,
    ) -> RequestId {
        self.auth.next += 1;
        let id = RequestId(self.auth.next);
        self.timers.insert((deadline, TimerKey::Auth(id)));
        self.auth.pending.insert(id, Parked { req, stream, waits, deadline });
        id
    }

    /// The label of a route in [`Metrics::requests`](crate::Metrics::requests).
    pub(super) fn label(route: Option<&Route>) -> &'static str {
        match route {
            Some(Route::Endpoint(_)) => "endpoint",
            Some(Route::Session(..)) => "session",
            None => "other",
        }
    }

    /// Counts and decorates the response to `req` (CORS), or turns its rejection into one.
    pub(super) fn finish(
        &mut self,
        req: &WhepRequest,
        label: &'static str,
        result: Result<WhepResponse, Reject>,
    ) -> WhepResponse {
        let mut resp = match result {
            Ok(r) => r,
            Err(reject) => {
                debug!(method = %req.method, target = %req.target, reason = reject.reason(), "request rejected");
                *self.metrics.rejections.entry(reject.reason()).or_default() += 1;
                reject.into_response(self.config.retry_after_secs)
            }
        };
        resp = resp
            .with("Access-Control-Allow-Origin", self.config.cors_origin.clone())
            .with("Access-Control-Expose-Headers", whep::EXPOSE_HEADERS);
        if self.config.cors_origin != "*" {
            resp = resp.with("Vary", "Origin");
        }
        self.count_request(label, &req.method, resp.code());
        resp
    }
}
