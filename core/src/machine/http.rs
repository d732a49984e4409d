//! The WHEP resource: POST an offer (a viewer and its answer), PATCH trickle and ICE restarts,
//! DELETE, OPTIONS, with authentication, rate limits, caps and admission.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use str0m::change::SdpOffer;
use str0m::{Candidate, IceCreds};
use tracing::{debug, info, warn};

use crate::auth::{Answer, JwtError};
use crate::config::VideoCodec;
use crate::ids::{SessionId, StreamId};
use crate::ratelimit::Kind;
use crate::sdp;
use crate::sdpfrag::{self, SdpFrag};
use crate::stream::Stream;
use crate::viewer::{Answered, Offer, Seat};
use crate::whep::{
    self, ALLOW_HEADERS, ALLOW_METHODS, CONTENT_TYPE_SDP, CONTENT_TYPE_SDPFRAG, Method, Reject,
    Route, StatusCode, WhepRequest, WhepResponse,
};
use crate::{CloseReason, Event, Output};

use super::Core;
use super::auth::Gate;

impl Core {
    /// Answers one WHEP request at once. Always returns a response; see [`crate::whep`].
    ///
    /// A runtime that serves the authorisation callback ([`crate::auth`]) calls
    /// [`handle_request`](Self::handle_request) instead; here a request that would have to wait
    /// for it is answered 503.
    pub fn handle_http(&mut self, req: WhepRequest, now: Instant) -> WhepResponse {
        match self.request(req, now, false) {
            Answer::Ready(r) => r,
            Answer::Pending(id) => {
                // Not reached: `request` parks nothing when it may not wait.
                self.cancel_request(id);
                Reject::AuthFailed("internal: request left pending".into())
                    .into_response(self.config.retry_after_secs)
            }
        }
    }

    pub(super) fn request(&mut self, mut req: WhepRequest, now: Instant, can_wait: bool) -> Answer {
        let now = self.tick(now);
        // An IPv4 client of a dual-stack listener is the same client as over IPv4.
        req.client = req.client.map(|ip| ip.to_canonical());
        self.fan_out_pending();
        let node = whep::NodeTag::Only(self.config.node_id.as_deref());
        let route = whep::route(&self.config.whep_prefix, node, &req.target);
        let label = Self::label(route.as_ref());
        let preflight = req.is_preflight();
        // Preflights and unknown paths are free; everything else draws on the rate limits
        // before any work (authentication included, so tokens cannot be guessed at speed).
        let limited = match route {
            Some(_) if !preflight => self.admit(&req, now).err(),
            _ => None,
        };
        let result = match route {
            None => Err(Reject::NoRoute),
            Some(_) if preflight => Ok(self.preflight()),
            Some(_) if limited.is_some() => {
                Err(Reject::RateLimited { retry_after: limited.unwrap_or_default() })
            }
            Some(route) => match self.gate(&req, &route, now, true) {
                Gate::Open => self.serve(&req, route, now),
                Gate::Deny(reject) => Err(reject),
                Gate::Ask { .. } if !can_wait => Err(Reject::AuthFailed(
                    "this server's loop cannot wait for the authorisation callback".into(),
                )),
                Gate::Ask { .. } if self.auth_full() => Err(Reject::AuthBusy),
                Gate::Ask { stream, token, key } => {
                    return Answer::Pending(self.park(req, stream, token, key, now));
                }
                Gate::AwaitKeys { .. } if !can_wait || self.keys_full() => {
                    Err(Reject::InvalidToken(JwtError::NoKey.to_string()))
                }
                Gate::AwaitKeys { stream } => {
                    return Answer::Pending(self.park_for_keys(req, stream, now));
                }
            },
        };
        Answer::Ready(self.finish(&req, label, result))
    }

    /// Serves an authorised request.
    pub(super) fn serve(
        &mut self,
        req: &WhepRequest,
        route: Route,
        now: Instant,
    ) -> Result<WhepResponse, Reject> {
        if req.body.len() > self.config.max_body_bytes {
            return Err(Reject::PayloadTooLarge);
        }
        match route {
            Route::Endpoint(stream) => self.endpoint(req, &stream, now),
            Route::Session(stream, session) => self.on_session(req, &stream, session, now),
        }
    }

    /// Draws on the rate limits; a POST to an endpoint is a new session, anything else is an
    /// ordinary request.
    pub(super) fn admit(&mut self, req: &WhepRequest, now: Instant) -> Result<(), Duration> {
        let kind = if req.method == Method::Post { Kind::Post } else { Kind::Other };
        match &self.shard {
            Some(m) => m.set.admit(kind, req.client, now),
            None => self.limiter.admit(kind, req.client, now),
        }
    }

    /// Clients the rate limiter tracks (bounded by [`MAX_CLIENTS`](crate::ratelimit::MAX_CLIENTS) per table).
    pub fn rate_limited_clients(&self) -> usize {
        match &self.shard {
            Some(m) => m.set.tracked_clients(),
            None => self.limiter.tracked(),
        }
    }

    /// Whether an admin API request from `client` may be looked at (the application routes'
    /// authentication limit): `Err` with the wait, counted as an `admin_rate_limited`
    /// rejection, while its authentication failures have used up its budget. Takes nothing; see
    /// [`admin_failed`](Self::admin_failed).
    pub fn admin_admit(&mut self, client: Option<IpAddr>, now: Instant) -> Result<(), Duration> {
        let admitted = self.limiter.admin_admit(client, now);
        if admitted.is_err() {
            *self.metrics.rejections.entry("admin_rate_limited").or_default() += 1;
        }
        admitted
    }

    /// Spends a token of `client`'s admin budget on a failed authentication.
    pub fn admin_failed(&mut self, client: Option<IpAddr>, now: Instant) {
        self.limiter.admin_failed(client, now);
    }

    /// Counts one answered HTTP request in [`Metrics::requests`](crate::Metrics::requests).
    pub fn count_request(&mut self, route: &'static str, method: &Method, status: u16) {
        *self.metrics.requests.entry((route, method.to_string(), status)).or_default() += 1;
    }

    pub(super) fn preflight(&self) -> WhepResponse {
        WhepResponse::new(StatusCode::NoContent)
            .with("Access-Control-Allow-Methods", ALLOW_METHODS)
            .with("Access-Control-Allow-Headers", ALLOW_HEADERS)
            .with("Access-Control-Max-Age", "86400")
    }

    pub(super) fn endpoint(
        &mut self,
        req: &WhepRequest,
        id: &StreamId,
        now: Instant,
    ) -> Result<WhepResponse, Reject> {
        const ALLOW: &str = "GET, HEAD, OPTIONS, POST";
        let live = self.streams.get(id).is_some_and(Stream::accepts_viewers);
        match req.method {
            Method::Post => self.post(req, id, now),
            Method::Options => {
                let mut r = WhepResponse::new(StatusCode::NoContent)
                    .with("Accept-Post", CONTENT_TYPE_SDP)
                    .with("Allow", ALLOW);
                for link in self.ice_links(req, id) {
                    r = r.with("Link", link);
                }
                Ok(r)
            }
            Method::Get if live => Ok(WhepResponse::new(StatusCode::NoContent)),
            Method::Head if live => {
                Ok(WhepResponse::new(StatusCode::Ok).with("Content-Type", CONTENT_TYPE_SDP))
            }
            Method::Get | Method::Head => Err(Reject::StreamNotFound),
            _ => Err(Reject::MethodNotAllowed { allow: ALLOW }),
        }
    }

    pub(super) fn post(
        &mut self,
        req: &WhepRequest,
        id: &StreamId,
        now: Instant,
    ) -> Result<WhepResponse, Reject> {
        let stream =
            self.streams.get(id).filter(|s| s.accepts_viewers()).ok_or(Reject::StreamNotFound)?;
        if req.media_type().as_deref() != Some(CONTENT_TYPE_SDP) {
            return Err(Reject::UnsupportedMediaType { expected: CONTENT_TYPE_SDP });
        }
        let summary = sdp::check_offer(&req.body)?;
        let profile = stream.config.profile;
        let videos: Vec<VideoCodec> = stream.videos.iter().map(|v| v.codec).collect();
        if sdp::choose_video(&summary, &videos, profile, |_| true).is_none() {
            // With the offer's other faults and before str0m reads it: the viewer is told what
            // this stream sends.
            return Err(Reject::NoRendition { sends: sdp::sends(&videos) });
        }
        sdp::check_bundle(&req.body)?;
        let cap = stream.config.max_viewers.unwrap_or(self.config.max_viewers_per_stream);
        let total_cap = self.config.max_viewers_total;
        let (here, total) = match &self.shard {
            Some(m) => (m.set.stream_viewers(id), m.set.viewers()),
            None => (stream.viewers.len(), self.viewers.len()),
        };
        if here >= cap {
            self.metrics.cap_rejections += 1;
            return Err(Reject::StreamFull { cap });
        }
        if total >= total_cap {
            self.metrics.cap_rejections += 1;
            return Err(Reject::ServerFull { cap: total_cap });
        }
        if self.config.host_candidates.is_empty() && self.stun_mapped().is_none() {
            return Err(Reject::NoCandidates);
        }
        let unconnected_cap = self.config.max_unconnected_per_client;
        let client = req.client.filter(|_| unconnected_cap > 0);
        if let Some(ip) = client {
            let full = match &self.shard {
                Some(m) => m.set.unconnected_full(ip, unconnected_cap),
                None => self.unconnected.is_full(ip, unconnected_cap),
            };
            if full {
                return Err(Reject::TooManyUnconnected { cap: unconnected_cap });
            }
        }
        if self.draining {
            return Err(Reject::Draining);
        }
        if self.overloaded {
            // Before the expensive part (answer, certificate, SRTP context): a POST refused
            // here costs next to nothing, and the viewers already served keep their share.
            return Err(Reject::Overloaded);
        }
        // The policy accepted UTF-8 already.
        let offer_text = String::from_utf8_lossy(&req.body).into_owned();
        let offered_candidates =
            offer_text.lines().filter(|l| l.trim_start().starts_with("a=candidate:")).count();
        if offered_candidates > self.config.max_remote_candidates {
            return Err(Reject::TooManyCandidates { cap: self.config.max_remote_candidates });
        }
        let remote_creds = sdp::ice_credentials(&offer_text)
            .ok_or_else(|| Reject::BadOffer("no a=ice-ufrag / a=ice-pwd".into()))?;

        let local_ufrag = self.unique_ufrag();
        let answered = Answered::new(
            Offer { text: &offer_text, summary: &summary, profile, videos: &videos },
            IceCreds { ufrag: local_ufrag.clone(), pass: self.rng.ice_chars(24) },
            (&self.crypto, self.cert.as_ref()),
            &self.config,
            &self.udp_candidates(),
            now,
        )?;
        let (video_pt, audio_pt) = (answered.video_pt, answered.audio_pt);

        // Shards take their seat now, atomically with the check: another shard may have
        // filled the cap since the check above.
        if let Some(m) = &self.shard
            && let Err(full) = m.set.take_seat(m.index, id, cap, total_cap)
        {
            self.metrics.cap_rejections += 1;
            return Err(full);
        }
        if let Some(ip) = client {
            let taken = match &self.shard {
                Some(m) => m.set.take_unconnected(ip, unconnected_cap),
                None => self.unconnected.take(ip, unconnected_cap),
            };
            if !taken {
                // Another shard's session of this client came in between.
                if let Some(m) = &self.shard {
                    m.set.release_seat(m.index, id);
                }
                // The leader may have seen the seat (an on-demand close delay kept for it).
                self.viewer_went(id, now);
                return Err(Reject::TooManyUnconnected { cap: unconnected_cap });
            }
        }
        let session = self.unique_session();
        let etag = self.rng.etag();
        let (mut viewer, answer) = answered.into_viewer(Seat {
            session,
            stream: id.clone(),
            etag,
            first_seqs: (self.rng.u32() as u16, self.rng.u32() as u16),
            remote_creds,
            unconnected_client: client,
            client: req.client,
            user_agent: req.header("user-agent").and_then(whep::sanitize_user_agent),
            remote_candidates: offered_candidates,
            relays: sdp::relay_addresses(&offer_text),
            deadline: now + self.config.first_check_timeout.min(self.config.connect_timeout),
            now,
        });
        let mut news = std::mem::take(&mut self.news);
        viewer.timeout(now, self.config.disconnect_grace, &mut self.outputs, &mut news);
        self.news = news;
        self.viewers.insert(session, Box::new(viewer));
        self.by_ufrag.insert(local_ufrag, session);
        if let Some(s) = self.streams.get_mut(id) {
            s.viewers.insert(session);
        }
        self.viewer_came(id, now);
        self.reschedule_viewer(session, now);
        self.metrics.viewers_joined += 1;
        info!(%session, stream = %id, video_pt, audio_pt, "viewer joined");
        let seen = self.viewers.get(&session).map(|v| &v.seen);
        self.outputs.push_back(Output::Event(Event::ViewerJoined {
            stream: id.clone(),
            session,
            client: seen.and_then(|s| s.client),
            user_agent: seen.and_then(|s| s.user_agent.clone()),
        }));

        let location = whep::session_location(
            self.config.public_url.as_deref(),
            &self.config.whep_prefix,
            self.config.node_id.as_deref(),
            id,
            session,
            &req.target,
        );
        let mut resp = WhepResponse::new(StatusCode::Created)
            .with("Location", location)
            .with("ETag", etag.header_value())
            .with("Accept-Patch", CONTENT_TYPE_SDPFRAG);
        for link in self.ice_links(req, id) {
            resp = resp.with("Link", link);
        }
        Ok(resp.with_body(CONTENT_TYPE_SDP, answer))
    }

    /// The `Link` header values announcing the ICE servers to a viewer of `id`: TURN servers
    /// with a shared secret get credentials made for this answer, valid from the request's wall
    /// time for [`turn_credential_ttl`](crate::CoreConfig::turn_credential_ttl).
    fn ice_links(&self, req: &WhepRequest, id: &StreamId) -> Vec<String> {
        let ttl = self.config.turn_credential_ttl;
        let mut links = Vec::with_capacity(self.config.ice_servers.len());
        for server in &self.config.ice_servers {
            match server.link_value_at(req.wall_time, ttl, id.as_str()) {
                Some(link) => links.push(link),
                None => warn!(
                    url = %server.url,
                    "TURN server left out: the runtime gave the request no wall-clock time"
                ),
            }
        }
        links
    }

    pub(super) fn unique_session(&mut self) -> SessionId {
        loop {
            let shard = self.shard.as_ref().map_or(0, |m| m.index);
            let s = self.rng.session_id(shard);
            if !self.viewers.contains_key(&s) {
                return s;
            }
        }
    }

    pub(super) fn unique_ufrag(&mut self) -> String {
        loop {
            let u = self.rng.ice_chars(16);
            if !self.by_ufrag.contains_key(&u) {
                return u;
            }
        }
    }

    pub(super) fn on_session(
        &mut self,
        req: &WhepRequest,
        id: &StreamId,
        session: Option<SessionId>,
        now: Instant,
    ) -> Result<WhepResponse, Reject> {
        const ALLOW: &str = "GET, HEAD, OPTIONS, PATCH, DELETE";
        let known = session.filter(|s| self.viewers.get(s).is_some_and(|p| &p.stream == id));
        match (req.method, known) {
            (Method::Delete, Some(s)) => {
                self.remove_viewer(s, CloseReason::Deleted, now);
                Ok(WhepResponse::new(StatusCode::NoContent))
            }
            // Idempotent, as the seed: deleting what is not there succeeds.
            (Method::Delete, None) => Ok(WhepResponse::new(StatusCode::NoContent)),
            (Method::Patch, Some(s)) => self.patch(req, s, now),
            (Method::Options, _) => Ok(WhepResponse::new(StatusCode::NoContent)
                .with("Accept-Patch", CONTENT_TYPE_SDPFRAG)
                .with("Allow", ALLOW)),
            (Method::Get | Method::Head, Some(_)) => Ok(WhepResponse::new(StatusCode::NoContent)),
            (Method::Patch | Method::Get | Method::Head, None) => Err(Reject::SessionNotFound),
            _ => Err(Reject::MethodNotAllowed { allow: ALLOW }),
        }
    }

    pub(super) fn patch(
        &mut self,
        req: &WhepRequest,
        s: SessionId,
        now: Instant,
    ) -> Result<WhepResponse, Reject> {
        if req.media_type().as_deref() != Some(CONTENT_TYPE_SDPFRAG) {
            return Err(Reject::UnsupportedMediaType { expected: CONTENT_TYPE_SDPFRAG });
        }
        let Some(viewer) = self.viewers.get(&s) else {
            return Err(Reject::SessionNotFound);
        };
        if self.config.strict_if_match {
            match req.header("if-match") {
                None => return Err(Reject::PreconditionRequired),
                Some(v) if !viewer.etag.matches(v) => return Err(Reject::PreconditionFailed),
                Some(_) => {}
            }
        }
        let frag = SdpFrag::parse(&req.body).map_err(|e| Reject::BadFragment(e.to_string()))?;
        let restart = match (&frag.ice_ufrag, &frag.ice_pwd) {
            (Some(u), Some(p)) => {
                (u.as_str(), p.as_str())
                    != (viewer.remote_creds.0.as_str(), viewer.remote_creds.1.as_str())
            }
            _ => false,
        };
        // The whole PATCH or nothing of it; more candidates than a session may hold in all are
        // refused before any is parsed, so no request costs more than the bound.
        let cap = self.config.max_remote_candidates;
        let held = if restart { 0 } else { viewer.remote_candidates };
        if frag.candidates.len() > cap {
            return Err(Reject::TooManyCandidates { cap });
        }
        // mDNS (.local), TCP and otherwise unusable candidates are dropped silently (WHEP).
        let candidates: Vec<Candidate> = frag
            .candidates
            .iter()
            .filter_map(|(_, c)| Candidate::from_sdp_string(c).ok())
            .collect();
        if held + candidates.len() > cap {
            return Err(Reject::TooManyCandidates { cap });
        }
        let resp = if restart {
            self.ice_restart(s, &frag)?
        } else {
            WhepResponse::new(StatusCode::NoContent)
        };
        let Some(viewer) = self.viewers.get_mut(&s) else {
            return Ok(resp);
        };
        let added = candidates.len();
        let mut news = std::mem::take(&mut self.news);
        let grace = self.config.disconnect_grace;
        for c in candidates {
            if c.kind() == str0m::CandidateKind::Relayed && !viewer.relays.contains(&c.addr()) {
                viewer.relays.push(c.addr());
            }
            viewer.rtc.add_remote_candidate(c);
            viewer.drain(now, grace, &mut self.outputs, &mut news);
        }
        viewer.remote_candidates += added;
        debug!(session = %s, restart, added, "patch");
        viewer.timeout(now, self.config.disconnect_grace, &mut self.outputs, &mut news);
        self.apply_news(s, &mut news, now);
        self.news = news;
        self.reschedule_viewer(s, now);
        Ok(resp)
    }

    pub(super) fn ice_restart(
        &mut self,
        s: SessionId,
        frag: &SdpFrag,
    ) -> Result<WhepResponse, Reject> {
        let (Some(ufrag), Some(pwd)) = (&frag.ice_ufrag, &frag.ice_pwd) else {
            return Err(Reject::BadFragment("restart without credentials".into()));
        };
        let etag = self.rng.etag();
        let mapped = self.stun_mapped();
        let Some(viewer) = self.viewers.get_mut(&s) else {
            return Err(Reject::SessionNotFound);
        };
        if let Some(mapped) = mapped {
            // The public address learned since the session began (or changed since): the new
            // generation's answer carries it (str0m ignores a candidate it has).
            match Candidate::host(mapped, "udp") {
                Ok(c) => {
                    viewer.rtc.add_local_candidate(c);
                }
                Err(e) => debug!(%mapped, error = %e, "unusable STUN-mapped candidate"),
            }
        }
        let offer_text = sdp::restart_offer(&viewer.offer, ufrag, pwd);
        let offer = SdpOffer::from_sdp_string(&offer_text)
            .map_err(|e| Reject::RestartFailed(e.to_string()))?;
        let answer = viewer
            .rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| Reject::RestartFailed(e.to_string()))?;
        // Whatever this reports is applied by the caller with the rest of the PATCH's news.
        viewer.drain(self.now, self.config.disconnect_grace, &mut self.outputs, &mut self.news);
        let local = viewer.rtc.direct_api().local_ice_credentials();
        viewer.offer = offer_text;
        viewer.remote_creds = (ufrag.clone(), pwd.clone());
        viewer.etag = etag;
        let old = std::mem::replace(&mut viewer.local_ufrag, local.ufrag.clone());
        let answer = answer.to_sdp_string();
        let candidates: Vec<String> = answer
            .lines()
            .filter_map(|l| l.strip_prefix("a="))
            .filter(|l| l.starts_with("candidate:"))
            .map(str::to_owned)
            .collect();
        let mids = [viewer.video.mid.to_string(), viewer.audio.mid.to_string()];
        let first_kind =
            if answer.find("m=audio") < answer.find("m=video") { "audio" } else { "video" };
        let (first, second) =
            if first_kind == "video" { (&mids[0], &mids[1]) } else { (&mids[1], &mids[0]) };
        if self.by_ufrag.get(&old) == Some(&s) {
            self.by_ufrag.remove(&old);
        }
        // str0m forgot the old generation's candidates and pairs: so do the demultiplexer and
        // the limits. The new generation's checks (by ufrag) bring the addresses back.
        viewer.remote_candidates = 0;
        viewer.relays.clear();
        viewer.path.restart();
        for a in viewer.addrs.drain(..) {
            if self.by_addr.get(&a) == Some(&s) {
                self.by_addr.remove(&a);
            }
        }
        self.by_ufrag.insert(local.ufrag.clone(), s);
        info!(session = %s, "ice restart");
        let body = sdpfrag::build_restart_answer(
            true,
            Some("trickle"),
            first_kind,
            &[first.as_str(), second.as_str()],
            &local.ufrag,
            &local.pass,
            &candidates,
        );
        Ok(WhepResponse::new(StatusCode::Ok)
            .with("ETag", etag.header_value())
            .with_body(CONTENT_TYPE_SDPFRAG, body))
    }
}
