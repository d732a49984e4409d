//! Authorisation of WHEP requests (see [`crate::auth`]): the gate every non-preflight request
//! passes, the requests parked while the authorisation callback decides, and its cached
//! decisions.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::auth::{self, Answer, AuthDecision, AuthRequest, RequestId};
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
    key: [u8; 32],
    deadline: Instant,
}

/// Requests waiting for the callback, and its decisions by key.
#[derive(Debug, Default)]
pub(super) struct AuthState {
    next: u64,
    pending: BTreeMap<RequestId, Parked>,
    cache: BTreeMap<[u8; 32], (Instant, Verdict)>,
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
        let Some(parked) = self.auth.pending.remove(&id) else {
            debug!(%id, ?decision, "late authorisation decision ignored");
            return;
        };
        self.timers.remove(&(parked.deadline, TimerKey::Auth(id)));
        let ttl = self.config.auth.http.as_ref().map_or(Duration::ZERO, |h| h.cache_ttl);
        let gate = match decision {
            AuthDecision::Allow => {
                self.auth.remember(parked.key, Verdict::Allow, ttl, now);
                Gate::Open
            }
            AuthDecision::Deny(status) => {
                let v = Verdict::Deny(if status == 401 { 401 } else { 403 });
                self.auth.remember(parked.key, v, ttl, now);
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

    /// Requests waiting for the authorisation callback.
    pub fn pending_requests(&self) -> usize {
        self.auth.pending.len()
    }

    /// Replaces the keys that verify JWTs (a JWKS fetched again). Ignored unless JWT
    /// verification is configured ([`AuthConfig::jwt`](crate::auth::AuthConfig::jwt)).
    pub fn set_jwt_keys(&mut self, keys: auth::JwtKeys) {
        if let Some(k) = &mut self.config.auth.jwt {
            info!(keys = keys.len(), "JWT keys replaced");
            *k = keys;
        }
    }

    pub(super) fn auth_timeout(&mut self, id: RequestId, now: Instant) {
        let Some(parked) = self.auth.pending.remove(&id) else { return };
        let secs = self.config.auth.http.as_ref().map_or(0, |h| h.timeout.as_millis());
        warn!(%id, stream = %parked.stream, "authorisation callback timed out");
        let gate = Gate::Deny(Reject::AuthFailed(format!(
            "no answer from the authorisation server within {secs} ms"
        )));
        self.resume(id, parked.req, gate, now);
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
            (Gate::Deny(r), _) => Err(r),
            (_, _) => Err(Reject::NoRoute),
        };
        let response = self.finish(&req, label, result);
        self.outputs.push_back(Output::Respond { id, response });
    }

    /// The gate of a routed, admitted, non-preflight request (see [`crate::auth`]).
    pub(super) fn gate(&mut self, req: &WhepRequest, route: &Route, now: Instant) -> Gate {
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

    /// Whether [`HttpAuth::max_pending`](crate::auth::HttpAuth::max_pending) requests wait.
    pub(super) fn auth_full(&self) -> bool {
        let max = self.config.auth.http.as_ref().map_or(0, |h| h.max_pending);
        self.auth.pending.len() >= max
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
        self.auth.next += 1;
        let id = RequestId(self.auth.next);
        let query = req.target.split_once('?').map(|(_, q)| q.to_owned()).unwrap_or_default();
        self.outputs.push_back(Output::Authorize(AuthRequest {
            id,
            stream: stream.clone(),
            method: req.method.to_string(),
            client: req.client,
            token,
            user_agent: req.header("user-agent").map(str::to_owned),
            query,
        }));
        self.timers.insert((deadline, TimerKey::Auth(id)));
        debug!(%id, stream = %stream, "waiting for the authorisation callback");
        self.auth.pending.insert(id, Parked { req, stream, key, deadline });
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
