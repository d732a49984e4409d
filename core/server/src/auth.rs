//! The IO half of viewer authorisation ([`whep_core::auth`]): the HTTP callback's request and
//! its decision, and fetching a JWKS. Both are small blocking exchanges of
//! [`crate::outbound`] with timeouts, run by the runtime off the engine loop
//! ([`Runtime::spawn_blocking`](crate::driver::Runtime::spawn_blocking), or a thread of the
//! blocking example), never on it.
//!
//! The callback gets a JSON POST shaped like MediaMTX's `authMethod: http` request, so that an
//! authorisation server written for MediaMTX works unchanged:
//!
//! ```json
//! {"action": "read", "protocol": "whep", "path": "demo", "ip": "192.0.2.7",
//!  "token": "…", "user": "", "password": "", "query": "token=…", "id": "req-3",
//!  "method": "POST", "user_agent": "Mozilla/5.0 …"}
//! ```
//!
//! With `--auth-http-secret-file` the request is signed as the webhook's deliveries are
//! (Standard Webhooks' `webhook-id`, `webhook-timestamp`, `webhook-signature`), so that the
//! authorisation server can tell it comes from whepd.
//!
//! 2xx allows, 401 and 403 refuse, anything else (or no answer) is an error: the viewer gets
//! 503. `http://` and `https://` URLs are supported ([`crate::outbound`]: the system's roots,
//! plus `--outbound-ca-file` for a private CA).

use std::time::Duration;

use whep_core::{AuthDecision, AuthRequest};

pub use crate::outbound::HttpUrl;
use crate::outbound::{self, Request};
use crate::webhook::WebhookSecret;

/// The callback's JSON body for `req` (see the [module docs](self)).
pub fn request_body(req: &AuthRequest) -> String {
    let json = serde_json::json!({
        "action": "read",
        "protocol": "whep",
        "path": req.stream.as_str(),
        "ip": req.client.map(|c| c.to_string()).unwrap_or_default(),
        "token": req.token.clone().unwrap_or_default(),
        "user": "",
        "password": "",
        "query": req.query,
        "id": req.id.to_string(),
        "method": req.method,
        "user_agent": req.user_agent.clone().unwrap_or_default(),
    });
    json.to_string()
}

/// Asks the authorisation server at `url` about `req`, with `timeout` for connecting, the TLS
/// handshake, writing and reading ([`outbound::exchange`]), the request signed with `secret`
/// as the webhook's are ([`crate::webhook`]: Standard Webhooks headers) if there is one.
/// Blocking: run it off the engine loop.
pub fn ask(
    url: &HttpUrl,
    req: &AuthRequest,
    timeout: Duration,
    secret: Option<&WebhookSecret>,
) -> AuthDecision {
    let body = request_body(req);
    let signed = secret.map(|key| key.headers(&crate::webhook::message_id(), &body));
    let request = Request {
        method: "POST",
        json: Some(&body),
        user_agent: "whepd",
        headers: signed.as_ref().map_or(&[], |h| &h[..]),
        timeout,
        read_body: false,
    };
    match outbound::exchange(url, &request) {
        Ok(r) if (200..300).contains(&r.status) => AuthDecision::Allow,
        Ok(r) if matches!(r.status, 401 | 403) => AuthDecision::Deny(r.status),
        Ok(r) => {
            AuthDecision::Error(format!("the authorisation server at {url} answered {}", r.status))
        }
        Err(e) => AuthDecision::Error(format!("the authorisation server at {url}: {e}")),
    }
}

/// Fetches a document (a JWKS) with GET: its body on 200. Blocking.
pub fn fetch(url: &HttpUrl, timeout: Duration) -> Result<Vec<u8>, String> {
    let request = Request {
        method: "GET",
        json: None,
        user_agent: "whepd",
        headers: &[],
        timeout,
        read_body: true,
    };
    match outbound::exchange(url, &request) {
        Ok(r) if r.status == 200 => Ok(r.body),
        Ok(r) => Err(format!("{url} answered {}", r.status)),
        Err(e) => Err(format!("{url}: {e}")),
    }
}

/// Where the shell finds JWT keys, besides the secret (see [`crate::app::AuthSettings`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSources {
    /// HS256 secret (raw bytes).
    pub hs256_secret: Option<Vec<u8>>,
    /// JWKS documents read from files at start.
    pub jwks_files: Vec<Vec<u8>>,
    /// A JWKS URL fetched at start and every [`jwks_refresh`](Self::jwks_refresh).
    pub jwks_url: Option<HttpUrl>,
    /// How often the JWKS URL is fetched again.
    pub jwks_refresh: Duration,
    /// At most one fetch per this long on a core's ask (a token naming a key not yet fetched);
    /// an ask sooner gets the keys there are.
    pub jwks_min_interval: Duration,
}

impl Default for JwtSources {
    /// No keys; a URL, if one is set, fetched every 5 minutes and at most every 30 s on a
    /// core's ask.
    fn default() -> Self {
        Self {
            hs256_secret: None,
            jwks_files: Vec::new(),
            jwks_url: None,
            jwks_refresh: Duration::from_secs(300),
            jwks_min_interval: whep_core::auth::JwtRefresh::default().min_interval,
        }
    }
}

impl JwtSources {
    /// The keys of the secret, the files and `fetched` (the URL's last document, if any).
    pub fn keys(&self, fetched: Option<&[u8]>) -> Result<whep_core::auth::JwtKeys, String> {
        let mut keys = whep_core::auth::JwtKeys::new();
        if let Some(s) = &self.hs256_secret {
            keys.add_hs256(s);
        }
        for f in &self.jwks_files {
            keys.add_jwks(f)?;
        }
        if let Some(doc) = fetched {
            keys.add_jwks(doc)?;
        }
        Ok(keys)
    }
}

/// Fetches `sources`' JWKS URL now, then every [`JwtSources::jwks_refresh`] and whenever
/// `asks` yields (a core emitted [`Output::RefreshJwtKeys`](whep_core::Output::RefreshJwtKeys)),
/// handing the keys (with the secret's and the files') to `deliver`, until `running` says false
/// (checked every second). An ask is always answered: within [`JwtSources::jwks_min_interval`]
/// of the last fetch an ask made (the periodic fetches do not count: tokens cannot cause
/// them), or when the fetch fails, with the keys there are. A failed fetch keeps the keys
/// there are. Blocking: run it on a thread of its own.
pub fn fetch_jwks_forever(
    sources: &JwtSources,
    deliver: impl Fn(whep_core::auth::JwtKeys),
    asks: &std::sync::mpsc::Receiver<()>,
    running: impl Fn() -> bool,
) {
    use std::sync::mpsc::RecvTimeoutError;
    use std::time::Instant;
    let Some(url) = &sources.jwks_url else { return };
    // The keys of the secret and the files (checked at start), until a fetch brings more.
    let mut keys = sources.keys(None).unwrap_or_default();
    let mut fetched_at: Option<Instant> = None;
    let mut asked_fetch_at: Option<Instant> = None;
    let mut asked = false;
    loop {
        let due = fetched_at.is_none_or(|t| t.elapsed() >= sources.jwks_refresh);
        let may = asked_fetch_at.is_none_or(|t| t.elapsed() >= sources.jwks_min_interval);
        if due || (asked && may) {
            // This thread is outside any runtime: it keeps its own time.
            #[allow(clippy::disallowed_methods)]
            let now = Instant::now();
            fetched_at = Some(now);
            if asked {
                asked_fetch_at = fetched_at;
            }
            match fetch(url, Duration::from_secs(10)) {
                Ok(doc) => match sources.keys(Some(&doc)) {
                    Ok(new) => {
                        tracing::info!(%url, keys = new.len(), asked, "JWKS fetched");
                        keys = new;
                        deliver(keys.clone());
                        asked = false;
                    }
                    Err(e) => {
                        tracing::warn!(%url, error = %e, "JWKS unusable; keeping the keys there are")
                    }
                },
                Err(e) => {
                    tracing::warn!(%url, error = %e, "JWKS fetch failed; keeping the keys there are")
                }
            }
        }
        if asked {
            // Not fetched (too soon, or it failed): the cores waiting get the keys there are.
            deliver(keys.clone());
            asked = false;
        }
        if !running() {
            return;
        }
        match asks.recv_timeout(Duration::from_secs(1)) {
            Ok(()) => {
                asked = true;
                // One fetch answers every ask that came meanwhile (several shards).
                while asks.try_recv().is_ok() {}
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                // Nobody can ask any more: only the periodic fetch is left.
                #[allow(clippy::disallowed_methods)]
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}
