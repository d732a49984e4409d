//! Viewer authorisation beyond the static bearer tokens: JSON Web Tokens verified here, without
//! IO, and an external HTTP callback whose decision comes back as an input.
//!
//! # Which method decides
//!
//! A request to a WHEP endpoint (`POST /whep/{stream}`, and `OPTIONS`, `GET`, `HEAD` there)
//! presents a token in `Authorization: Bearer …`, or, for players that cannot set headers, in
//! the query (`?token=…` or `?jwt=…`). With nothing configured every request is let through,
//! as without this module. Otherwise the first method that recognises the token decides:
//!
//! 1. a static token ([`CoreConfig::bearer_tokens`](crate::CoreConfig::bearer_tokens)) that
//!    matches: allowed, every stream;
//! 2. with JWT keys configured ([`AuthConfig::jwt`]), a token shaped like a JWT (three
//!    base64url parts): its signature, expiry and streams decide (401 for a bad, expired or
//!    unsigned token, 403 for a valid one that does not name the stream);
//! 3. with the HTTP callback configured ([`AuthConfig::http`]): the core emits
//!    [`Output::Authorize`](crate::Output::Authorize), the runtime asks the authorisation
//!    server and reports [`Core::handle_auth`](crate::Core::handle_auth); 2xx allows, 401 and
//!    403 refuse with the same status, anything else, no answer or no answer within
//!    [`HttpAuth::timeout`] is 503 (fail closed, `Retry-After`);
//! 4. otherwise 401.
//!
//! A WHEP session's own URL (PATCH, DELETE) is authorised by its session id (128 random bits
//! the POST's answer gave out) once JWT or the callback is configured: a token that expires
//! during the session does not break its ICE restarts or its DELETE. With static tokens alone,
//! every request presents one, as before.
//!
//! # The JWT claims
//!
//! ```json
//! {"exp": 1767225600, "nbf": 1767222000, "whep": {"streams": ["demo", "cam*"]}}
//! ```
//!
//! `exp` is required (a token that never expires is refused), `nbf` is optional; both are
//! checked with [`AuthConfig::leeway`] against the request's wall-clock time
//! ([`WhepRequest::wall_time`](crate::WhepRequest::wall_time)). With
//! [`AuthConfig::jwt_issuer`] or [`AuthConfig::jwt_audience`] set, `iss` must be that issuer
//! and `aud` (a string or a list) must name that audience. `whep.streams` lists the
//! streams the token may watch: an exact id, a prefix ending in `*`, or `*` for every stream.
//! Tokens made for MediaMTX are understood as they are: their `mediamtx_permissions` claim (a
//! list of `{"action": …, "path": …}`, or that list as a JSON string) grants every stream its
//! `read` entries name: an empty or missing path is every stream, a path starting with `~` a
//! regular expression the id must match (unanchored, as MediaMTX's), any other an exact id.
//! Algorithms: `HS256` (a shared secret), `RS256` and `ES256` (public keys from a JWKS); `none`
//! and every other algorithm are refused, and a key is only ever used with its own algorithm
//! (an RSA key is never an HMAC secret). With a `kid` in the header only the key with that
//! `kid` is tried.

use std::fmt;
use std::time::{Duration, SystemTime};

use aws_lc_rs::{hmac, signature};
use serde_json::Value;

/// Longest token looked at; a longer one is refused unread.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Settings of viewer authorisation beyond the static tokens. The default configures nothing.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// Keys that verify JWTs; `None` = JWTs are not looked at. Replaced at run time by
    /// [`Core::set_jwt_keys`](crate::Core::set_jwt_keys) (a JWKS fetched again).
    pub jwt: Option<JwtKeys>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// The `iss` a JWT must carry; `None` = not checked. Set it when the keys also sign
    /// tokens of other issuers (RFC 8725 §3.8).
    pub jwt_issuer: Option<String>,
    /// An `aud` a JWT must carry (its `aud` is this string, or a list holding it); `None` =
    /// not checked. Set it when the issuer makes tokens for other services too (RFC 8725 §3.9).
    pub jwt_audience: Option<String>,
    /// The external HTTP callback; `None` = none.
    pub http: Option<HttpAuth>,
    /// Fetching the JWT keys again when a token names a key the core lacks (see
    /// [Rotated keys](self#rotated-keys)); `None` = such a token is refused at once. Set it
    /// when the keys come from a source the runtime can fetch again (a JWKS URL).
    pub jwt_refresh: Option<JwtRefresh>,
}

/// How the core waits for rotated JWT keys (see [Rotated keys](self#rotated-keys)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtRefresh {
    /// At most one [`Output::RefreshJwtKeys`](crate::Output::RefreshJwtKeys) per this long.
    pub min_interval: Duration,
    /// A request waits at most this long for the keys; then it is checked with the keys there
    /// are (401 if its key is still missing).
    pub wait: Duration,
    /// Requests waiting for keys at most; beyond, a token with an unknown key is refused at
    /// once.
    pub max_pending: usize,
}

impl Default for JwtRefresh {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_secs(30),
            wait: Duration::from_secs(5),
            max_pending: 64,
        }
    }
}

impl AuthConfig {
    /// Whether JWT or the callback is configured (see the [module docs](self)).
    pub fn is_external(&self) -> bool {
        self.jwt.is_some() || self.http.is_some()
    }
}

/// How the core waits for the HTTP callback's decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAuth {
    /// A request not decided after this long is answered 503.
    pub timeout: Duration,
    /// How long a decision (allow, 401 or 403) is reused for the same stream, token and client
    /// address; zero = never.
    pub cache_ttl: Duration,
    /// Requests waiting for a decision at most; beyond, 503 with `Retry-After`.
    pub max_pending: usize,
}

impl Default for HttpAuth {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            cache_ttl: Duration::from_secs(60),
            max_pending: 64,
        }
    }
}

/// What the runtime asks the authorisation server ([`Output::Authorize`](crate::Output::Authorize)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthRequest {
    /// Report the decision under this id.
    pub id: RequestId,
    /// The stream the viewer wants.
    pub stream: crate::StreamId,
    /// The HTTP method of the request (`POST` for a new session).
    pub method: String,
    /// The client's address, when the runtime knows it.
    pub client: Option<std::net::IpAddr>,
    /// The token it presented, if any.
    pub token: Option<String>,
    /// Its `User-Agent`, if any.
    pub user_agent: Option<String>,
    /// The request target's query string, without `?`.
    pub query: String,
}

/// A request waiting for an authorisation decision ([`Answer::Pending`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "req-{}", self.0)
    }
}

/// What [`Core::handle_request`](crate::Core::handle_request) gives back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The response, at once.
    Ready(crate::WhepResponse),
    /// Waiting for the authorisation callback: the response comes as
    /// [`Output::Respond`](crate::Output::Respond) with this id.
    Pending(RequestId),
}

/// The authorisation server's decision, as the runtime reports it
/// ([`Core::handle_auth`](crate::Core::handle_auth)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthDecision {
    /// It answered 2xx.
    Allow,
    /// It answered 401 or 403 (the status).
    Deny(u16),
    /// It answered something else, or could not be asked: what happened, for the viewer and
    /// the log.
    Error(String),
}

/// Keys that verify JWTs: HS256 secrets and RS256 / ES256 public keys.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct JwtKeys {
    keys: Vec<Jwk>,
}

impl fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kinds: Vec<&str> = self.keys.iter().map(|k| k.material.alg()).collect();
        f.debug_struct("JwtKeys").field("algs", &kinds).finish()
    }
}

#[derive(Clone, PartialEq, Eq)]
struct Jwk {
    kid: Option<String>,
    material: Material,
}

#[derive(Clone, PartialEq, Eq)]
enum Material {
    /// HS256.
    Hmac(Vec<u8>),
    /// RS256: modulus and exponent, big-endian.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// ES256: the uncompressed P-256 point (`04 || x || y`).
    P256(Vec<u8>),
}

impl Material {
    fn alg(&self) -> &'static str {
        match self {
            Self::Hmac(_) => "HS256",
            Self::Rsa { .. } => "RS256",
            Self::P256(_) => "ES256",
        }
    }
}

impl JwtKeys {
    /// No keys: every JWT is refused (until keys arrive).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an HS256 shared secret (raw bytes).
    pub fn add_hs256(&mut self, secret: &[u8]) {
        self.keys.push(Jwk { kid: None, material: Material::Hmac(secret.to_vec()) });
    }

    /// Adds every usable key of a JWKS document (`{"keys": [...]}`): `RSA` (RS256), `EC` on
    /// `P-256` (ES256) and `oct` (HS256). Keys of other types, or whose `alg` or `use` say they
    /// are not for verifying these signatures, are skipped; the count added is returned.
    pub fn add_jwks(&mut self, json: &[u8]) -> Result<usize, String> {
        let doc: Value =
            serde_json::from_slice(json).map_err(|e| format!("JWKS is not JSON: {e}"))?;
        let Some(keys) = doc.get("keys").and_then(Value::as_array) else {
            return Err("JWKS has no \"keys\" array".into());
        };
        let mut added = 0;
        for k in keys {
            let field = |name: &str| k.get(name).and_then(Value::as_str);
            let b64 = |name: &str| field(name).and_then(|v| b64url(v.as_bytes()));
            if field("use").is_some_and(|u| u != "sig") {
                continue;
            }
            let material = match (field("kty"), field("crv")) {
                (Some("RSA"), _) => match (b64("n"), b64("e")) {
                    (Some(n), Some(e)) => Material::Rsa { n, e },
                    _ => return Err("JWKS: an RSA key without n or e".into()),
                },
                (Some("EC"), Some("P-256")) => match (b64("x"), b64("y")) {
                    (Some(x), Some(y)) if x.len() == 32 && y.len() == 32 => {
                        let mut point = vec![4u8];
                        point.extend_from_slice(&x);
                        point.extend_from_slice(&y);
                        Material::P256(point)
                    }
                    _ => return Err("JWKS: a P-256 key without 32-byte x and y".into()),
                },
                (Some("oct"), _) => match b64("k") {
                    Some(k) => Material::Hmac(k),
                    None => return Err("JWKS: an oct key without k".into()),
                },
                _ => continue,
            };
            if field("alg").is_some_and(|a| a != material.alg()) {
                continue;
            }
            self.keys.push(Jwk { kid: field("kid").map(str::to_owned), material });
            added += 1;
        }
        Ok(added)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there is no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Verifies `token` at wall-clock time `now` (seconds since the Unix epoch) with `leeway`
    /// and returns its claims. Never panics, whatever the bytes.
    pub fn verify(
        &self,
        token: &str,
        now: SystemTime,
        leeway: Duration,
    ) -> Result<Claims, JwtError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JwtError::Malformed("token too long"));
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed("not three dot-separated parts"));
        };
        let header = b64url(h.as_bytes()).ok_or(JwtError::Malformed("header is not base64url"))?;
        let payload =
            b64url(p.as_bytes()).ok_or(JwtError::Malformed("payload is not base64url"))?;
        let sig = b64url(s.as_bytes()).ok_or(JwtError::Malformed("signature is not base64url"))?;
        let header: Value = serde_json::from_slice(&header)
            .map_err(|_| JwtError::Malformed("header is not JSON"))?;
        let header = header.as_object().ok_or(JwtError::Malformed("header is not an object"))?;
        if header.contains_key("crit") {
            return Err(JwtError::Malformed("critical header extensions are not supported"));
        }
        if header
            .get("typ")
            .is_some_and(|t| !t.as_str().is_some_and(|t| t.eq_ignore_ascii_case("JWT")))
        {
            return Err(JwtError::Malformed("typ is not JWT"));
        }
        let alg = header.get("alg").and_then(Value::as_str).ok_or(JwtError::Malformed("no alg"))?;
        if !matches!(alg, "HS256" | "RS256" | "ES256") {
            return Err(JwtError::Algorithm);
        }
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.as_str()),
            Some(_) => return Err(JwtError::Malformed("kid is not a string")),
        };
        let signed = &token.as_bytes()[..h.len() + 1 + p.len()];
        let mut tried = false;
        let mut ok = false;
        for key in &self.keys {
            if key.material.alg() != alg || (kid.is_some() && key.kid.as_deref() != kid) {
                continue;
            }
            tried = true;
            if key.material.verify(signed, &sig) {
                ok = true;
                break;
            }
        }
        if !tried {
            return Err(JwtError::NoKey);
        }
        if !ok {
            return Err(JwtError::Signature);
        }
        // Only a signed payload is read further.
        let claims: Value = serde_json::from_slice(&payload)
            .map_err(|_| JwtError::Malformed("claims are not JSON"))?;
        let claims = claims.as_object().ok_or(JwtError::Malformed("claims are not an object"))?;
        let date = |name: &str| -> Result<Option<i64>, JwtError> {
            match claims.get(name) {
                None => Ok(None),
                Some(v) => v
                    .as_i64()
                    .or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f.floor() as i64))
                    .map(Some)
                    .ok_or(JwtError::Malformed("a date claim is not a number")),
            }
        };
        let exp = date("exp")?.ok_or(JwtError::NoExpiry)?;
        let nbf = date("nbf")?;
        let now = unix_seconds(now);
        let leeway = i64::try_from(leeway.as_secs()).unwrap_or(i64::MAX);
        if now >= exp.saturating_add(leeway) {
            return Err(JwtError::Expired);
        }
        if nbf.is_some_and(|nbf| now < nbf.saturating_sub(leeway)) {
            return Err(JwtError::NotYetValid);
        }
        let streams = match claims.get("whep").and_then(|w| w.get("streams")) {
            None => Vec::new(),
            Some(Value::Array(list)) => strings(list)
                .ok_or(JwtError::Malformed("whep.streams holds something else than strings"))?,
            Some(_) => return Err(JwtError::Malformed("whep.streams is not a list")),
        };
        let iss = match claims.get("iss") {
            None => None,
            Some(Value::String(i)) => Some(i.clone()),
            Some(_) => return Err(JwtError::Malformed("iss is not a string")),
        };
        let aud = match claims.get("aud") {
            None => Vec::new(),
            Some(Value::String(a)) => vec![a.clone()],
            Some(Value::Array(list)) => {
                strings(list).ok_or(JwtError::Malformed("aud holds something else than strings"))?
            }
            Some(_) => return Err(JwtError::Malformed("aud is not a string or a list")),
        };
        let read_paths = match claims.get(MEDIAMTX_CLAIM) {
            None => Vec::new(),
            // Issuers that can only emit strings put the list there as JSON.
            Some(Value::String(s)) => read_paths(
                &serde_json::from_str(s)
                    .map_err(|_| JwtError::Malformed("mediamtx_permissions is not a JSON list"))?,
            )?,
            Some(v) => read_paths(v)?,
        };
        Ok(Claims { exp, nbf, streams, iss, aud, read_paths })
    }
}

impl Material {
    fn verify(&self, signed: &[u8], sig: &[u8]) -> bool {
        match self {
            Self::Hmac(secret) => {
                hmac::verify(&hmac::Key::new(hmac::HMAC_SHA256, secret), signed, sig).is_ok()
            }
            Self::Rsa { n, e } => signature::RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, signed, sig)
                .is_ok(),
            Self::P256(point) => {
                signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(signed, sig)
                    .is_ok()
            }
        }
    }
}

/// A JSON list of strings as strings; `None` if anything else is in it.
fn strings(list: &[Value]) -> Option<Vec<String>> {
    list.iter().map(|v| v.as_str().map(str::to_owned)).collect()
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// What a verified token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// Expiry, seconds since the Unix epoch.
    pub exp: i64,
    /// Not before, if given.
    pub nbf: Option<i64>,
    /// `whep.streams`: ids, prefixes ending in `*`, or `*`.
    pub streams: Vec<String>,
    /// `iss`, if given.
    pub iss: Option<String>,
    /// `aud`: one audience or several; empty if not given.
    pub aud: Vec<String>,
    /// The paths of the `read` entries of MediaMTX's `mediamtx_permissions` claim: `""` every
    /// stream, `~` and a regular expression, or an id.
    pub read_paths: Vec<String>,
}

/// The claim that carries a MediaMTX token's permissions (MediaMTX's default
/// `authJWTClaimKey`).
pub const MEDIAMTX_CLAIM: &str = "mediamtx_permissions";

impl Claims {
    /// Checks `iss` against `issuer` and `aud` against `audience`, each when set.
    ///
    /// # Errors
    ///
    /// [`JwtError::Issuer`] or [`JwtError::Audience`] when the token was not made by that
    /// issuer or for that audience.
    pub fn check_origin(
        &self,
        issuer: Option<&str>,
        audience: Option<&str>,
    ) -> Result<(), JwtError> {
        if issuer.is_some_and(|i| self.iss.as_deref() != Some(i)) {
            return Err(JwtError::Issuer);
        }
        if audience.is_some_and(|a| !self.aud.iter().any(|x| x == a)) {
            return Err(JwtError::Audience);
        }
        Ok(())
    }

    /// Whether the token may watch `stream`.
    pub fn allows(&self, stream: &str) -> bool {
        let listed = self.streams.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => stream.starts_with(prefix),
            None => p == stream,
        });
        listed
            || self.read_paths.iter().any(|p| match p.strip_prefix('~') {
                _ if p.is_empty() => true,
                // A pattern the issuer signed; one that does not compile (or is too large)
                // grants nothing.
                Some(pattern) => regex::RegexBuilder::new(pattern)
                    .size_limit(MAX_PATTERN_BYTES)
                    .dfa_size_limit(MAX_PATTERN_BYTES)
                    .build()
                    .is_ok_and(|re| re.is_match(stream)),
                None => p == stream,
            })
    }
}

/// Most memory a permission path's compiled regular expression may take.
const MAX_PATTERN_BYTES: usize = 1024 * 1024;

/// The paths of the `read` entries of a `mediamtx_permissions` list.
fn read_paths(list: &Value) -> Result<Vec<String>, JwtError> {
    let list = list.as_array().ok_or(JwtError::Malformed("mediamtx_permissions is not a list"))?;
    let mut paths = Vec::new();
    for entry in list {
        let entry = entry
            .as_object()
            .ok_or(JwtError::Malformed("a mediamtx_permissions entry is not an object"))?;
        let action = entry
            .get("action")
            .and_then(Value::as_str)
            .ok_or(JwtError::Malformed("a mediamtx_permissions entry has no action"))?;
        if action != "read" {
            continue;
        }
        match entry.get("path") {
            None => paths.push(String::new()),
            Some(Value::String(p)) => paths.push(p.clone()),
            Some(_) => {
                return Err(JwtError::Malformed("a mediamtx_permissions path is not a string"));
            }
        }
    }
    Ok(paths)
}

/// Why a JWT was refused (401).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtError {
    /// Not a well-formed JWT (the part that is wrong).
    Malformed(&'static str),
    /// `alg` is not HS256, RS256 or ES256 (`none` included).
    Algorithm,
    /// No configured key for its `alg` (and `kid`).
    NoKey,
    /// The signature does not verify.
    Signature,
    /// No `exp` claim.
    NoExpiry,
    /// Past `exp` (plus the leeway).
    Expired,
    /// Before `nbf` (less the leeway).
    NotYetValid,
    /// Not the configured issuer's (`iss`).
    Issuer,
    /// Not for the configured audience (`aud`).
    Audience,
}

impl fmt::Display for JwtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(why) => write!(f, "malformed token: {why}"),
            Self::Algorithm => {
                f.write_str("token algorithm not accepted (HS256, RS256, ES256 only)")
            }
            Self::NoKey => f.write_str("no key for the token's algorithm and kid"),
            Self::Signature => f.write_str("token signature does not verify"),
            Self::NoExpiry => f.write_str("token has no exp claim"),
            Self::Expired => f.write_str("token expired"),
            Self::NotYetValid => f.write_str("token not valid yet (nbf)"),
            Self::Issuer => f.write_str("token is not from the expected issuer (iss)"),
            Self::Audience => f.write_str("token is not for this audience (aud)"),
        }
    }
}

/// Strict base64url without padding (RFC 7515 §2): the URL-safe alphabet only, no `=`, no
/// length that leaves a lone character, and zero bits after the last whole byte.
pub fn b64url(s: &[u8]) -> Option<Vec<u8>> {
    crate::base64::decode(s, crate::base64::Alphabet::UrlSafe)
}

/// Base64url without padding.
pub fn b64url_encode(data: &[u8]) -> String {
    crate::base64::encode(data, crate::base64::Alphabet::UrlSafe)
}

/// Whether `token` has the shape of a JWT: three non-empty-header parts separated by dots.
pub(crate) fn looks_like_jwt(token: &str) -> bool {
    token.bytes().filter(|&b| b == b'.').count() == 2 && !token.starts_with('.')
}

/// The token a request presents: `Authorization: Bearer …`, else `token=` or `jwt=` in the
/// query (percent-decoded).
pub(crate) fn presented_token(req: &crate::WhepRequest) -> Option<String> {
    if let Some(value) = req.header("authorization")
        && let Some((scheme, token)) = value.trim().split_once(' ')
        && scheme.eq_ignore_ascii_case("bearer")
    {
        return Some(token.trim().to_owned());
    }
    let query = req.target.split_once('?')?.1;
    let query = query.split('#').next().unwrap_or_default();
    query.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        if name != "token" && name != "jwt" {
            return None;
        }
        let value = value.replace('+', " ");
        percent_encoding::percent_decode_str(&value).decode_utf8().ok().map(|v| v.into_owned())
    })
}

/// The key of a cached callback decision: SHA-256 over stream, token and client address, so
/// that the cache holds no tokens and its entries are all the same size.
pub(crate) fn cache_key(
    stream: &str,
    token: Option<&str>,
    client: Option<std::net::IpAddr>,
) -> [u8; 32] {
    use aws_lc_rs::digest;
    let mut ctx = digest::Context::new(&digest::SHA256);
    for part in [stream.as_bytes(), token.unwrap_or("").as_bytes()] {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    ctx.update(&[u8::from(token.is_some())]);
    ctx.update(client.map(|c| c.to_string()).unwrap_or_default().as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(ctx.finish().as_ref());
    key
}

/// Test helpers (feature `sim`): tokens signed with keys made at test time.
#[cfg(any(test, feature = "sim"))]
pub mod testing {
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{self, KeyPair};

    use super::{b64url_encode, hmac};

    /// `header.payload.signature` with HS256 and `secret`.
    pub fn hs256(secret: &[u8], header: &str, claims: &str) -> String {
        let signed =
            format!("{}.{}", b64url_encode(header.as_bytes()), b64url_encode(claims.as_bytes()));
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), signed.as_bytes());
        format!("{signed}.{}", b64url_encode(tag.as_ref()))
    }

    /// A fresh P-256 key: a signer and its JWKS entry (with `kid`).
    pub fn es256_key(kid: &str) -> (signature::EcdsaKeyPair, String) {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(alg, &rng)
            .unwrap_or_else(|_| unreachable!("P-256 key generation"));
        let pair = signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref())
            .unwrap_or_else(|_| unreachable!("own key"));
        let point = pair.public_key().as_ref();
        let jwk = format!(
            r#"{{"kty":"EC","crv":"P-256","kid":"{kid}","x":"{}","y":"{}"}}"#,
            b64url_encode(&point[1..33]),
            b64url_encode(&point[33..65])
        );
        (pair, jwk)
    }

    /// `header.payload.signature` with ES256.
    pub fn es256(key: &signature::EcdsaKeyPair, header: &str, claims: &str) -> String {
        let signed =
            format!("{}.{}", b64url_encode(header.as_bytes()), b64url_encode(claims.as_bytes()));
        let sig = key
            .sign(&SystemRandom::new(), signed.as_bytes())
            .unwrap_or_else(|_| unreachable!("ES256 signing"));
        format!("{signed}.{}", b64url_encode(sig.as_ref()))
    }

    /// A fresh 2048-bit RSA key: a signer and its JWKS entry (with `kid`).
    pub fn rs256_key(kid: &str) -> (signature::RsaKeyPair, String) {
        let pair = signature::RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
            .unwrap_or_else(|_| unreachable!("RSA key generation"));
        let public = pair.public_key();
        let n = public.modulus();
        let e = public.exponent();
        let jwk = format!(
            r#"{{"kty":"RSA","kid":"{kid}","alg":"RS256","use":"sig","n":"{}","e":"{}"}}"#,
            b64url_encode(n.big_endian_without_leading_zero()),
            b64url_encode(e.big_endian_without_leading_zero())
        );
        (pair, jwk)
    }

    /// `header.payload.signature` with RS256.
    pub fn rs256(key: &signature::RsaKeyPair, header: &str, claims: &str) -> String {
        let signed =
            format!("{}.{}", b64url_encode(header.as_bytes()), b64url_encode(claims.as_bytes()));
        let mut sig = vec![0u8; key.public_modulus_len()];
        key.sign(&signature::RSA_PKCS1_SHA256, &SystemRandom::new(), signed.as_bytes(), &mut sig)
            .unwrap_or_else(|_| unreachable!("RS256 signing"));
        format!("{signed}.{}", b64url_encode(&sig))
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    const H256: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn hs_keys() -> JwtKeys {
        let mut k = JwtKeys::new();
        k.add_hs256(b"s3cret");
        k
    }

    fn claims(exp: u64) -> String {
        format!(r#"{{"exp":{exp},"whep":{{"streams":["demo","cam*"]}}}}"#)
    }

    #[test]
    fn base64url_is_strict_and_round_trips() {
        for n in 0..40u8 {
            let data: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37)).collect();
            assert_eq!(b64url(b64url_encode(&data).as_bytes()), Some(data));
        }
        assert_eq!(b64url(b"QQ"), Some(b"A".to_vec()));
        assert_eq!(b64url(b"QR"), None, "non-zero trailing bits");
        assert_eq!(b64url(b"QQ=="), None, "padding");
        assert_eq!(b64url(b"Q+8/"), None, "standard alphabet");
        assert_eq!(b64url(b"QUJDR"), None, "lone character");
    }

    #[test]
    fn hs256_grants_its_streams_until_expiry() {
        let t = hs256(b"s3cret", H256, &claims(2000));
        let c = hs_keys().verify(&t, at(1000), Duration::ZERO).expect("valid token");
        assert!(c.allows("demo") && c.allows("cam7") && c.allows("cam"));
        assert!(!c.allows("other") && !c.allows("demo2") && !c.allows("xcam"));
        assert_eq!(hs_keys().verify(&t, at(2000), Duration::ZERO), Err(JwtError::Expired));
        assert!(hs_keys().verify(&t, at(2000), Duration::from_secs(30)).is_ok(), "leeway");
        let wrong = hs256(b"other", H256, &claims(2000));
        assert_eq!(hs_keys().verify(&wrong, at(1000), Duration::ZERO), Err(JwtError::Signature));
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let k = hs_keys();
        let token = |extra: &str| {
            let claims = format!(r#"{{"exp":2000,{extra}"whep":{{"streams":["*"]}}}}"#);
            hs256(b"s3cret", H256, &claims)
        };
        let check = |t: &str, iss: Option<&str>, aud: Option<&str>| {
            k.verify(t, at(1000), Duration::ZERO).and_then(|c| c.check_origin(iss, aud))
        };
        let both = token(r#""iss":"https://idp","aud":["other","whep"],"#);
        assert_eq!(check(&both, Some("https://idp"), Some("whep")), Ok(()));
        assert_eq!(check(&both, None, None), Ok(()));
        assert_eq!(check(&both, Some("https://evil"), None), Err(JwtError::Issuer));
        assert_eq!(check(&both, None, Some("mail")), Err(JwtError::Audience));
        let one = token(r#""aud":"whep","#);
        assert_eq!(check(&one, None, Some("whep")), Ok(()));
        assert_eq!(check(&one, Some("https://idp"), None), Err(JwtError::Issuer), "no iss");
        let none = token("");
        assert_eq!(check(&none, None, Some("whep")), Err(JwtError::Audience), "no aud");
        for bad in [r#""iss":1,"#, r#""aud":{},"#, r#""aud":["whep",2],"#] {
            let t = token(bad);
            assert!(matches!(check(&t, None, None), Err(JwtError::Malformed(_))), "{bad}");
        }
    }

    #[test]
    fn nbf_exp_and_stream_claims_are_checked() {
        let k = hs_keys();
        let nbf = hs256(b"s3cret", H256, r#"{"exp":3000,"nbf":1500,"whep":{"streams":["*"]}}"#);
        assert_eq!(k.verify(&nbf, at(1000), Duration::ZERO), Err(JwtError::NotYetValid));
        assert!(k.verify(&nbf, at(1490), Duration::from_secs(10)).is_ok());
        assert!(k.verify(&nbf, at(1500), Duration::ZERO).expect("valid").allows("anything"));
        let no_exp = hs256(b"s3cret", H256, r#"{"whep":{"streams":["*"]}}"#);
        assert_eq!(k.verify(&no_exp, at(1000), Duration::ZERO), Err(JwtError::NoExpiry));
        let float = hs256(b"s3cret", H256, r#"{"exp":2000.5}"#);
        assert!(k.verify(&float, at(1000), Duration::ZERO).expect("valid").streams.is_empty());
        let bad = hs256(b"s3cret", H256, r#"{"exp":2000,"whep":{"streams":"demo"}}"#);
        assert!(matches!(k.verify(&bad, at(1000), Duration::ZERO), Err(JwtError::Malformed(_))));
        let bad = hs256(b"s3cret", H256, r#"{"exp":"2000"}"#);
        assert!(matches!(k.verify(&bad, at(1000), Duration::ZERO), Err(JwtError::Malformed(_))));
    }

    #[test]
    fn mediamtx_permissions_grant_their_read_paths() {
        let k = hs_keys();
        let verify = |perms: &str| {
            let t =
                hs256(b"s3cret", H256, &format!(r#"{{"exp":2000,"{MEDIAMTX_CLAIM}":{perms}}}"#));
            k.verify(&t, at(1000), Duration::ZERO)
        };
        let c = verify(
            r#"[{"action":"read","path":"demo"},{"action":"read","path":"~^cam[0-9]+$"},
                {"action":"publish","path":""},{"action":"playback","path":"other"}]"#,
        )
        .expect("valid");
        assert!(c.allows("demo") && c.allows("cam1") && c.allows("cam42"));
        assert!(!c.allows("demo2") && !c.allows("camx") && !c.allows("xcam1"));
        assert!(!c.allows("other"), "publish and playback grant no viewing");
        // Unanchored, as MediaMTX's (Go's MatchString).
        let c = verify(r#"[{"action":"read","path":"~cam"}]"#).expect("valid");
        assert!(c.allows("mycam1") && !c.allows("demo"));
        // An empty or missing path: every stream.
        for every in [r#"[{"action":"read","path":""}]"#, r#"[{"action":"read"}]"#] {
            assert!(verify(every).expect("valid").allows("anything"), "{every}");
        }
        // The list as a JSON string (issuers that emit only strings).
        let c = verify(r#""[{\"action\":\"read\",\"path\":\"demo\"}]""#).expect("valid");
        assert!(c.allows("demo") && !c.allows("other"));
        // A pattern that does not compile, or is too large, grants nothing.
        let small = r#"[{"action":"read","path":"~demo|\\w{10}"}]"#;
        assert!(verify(small).expect("valid").allows("demo"), "{small}");
        for bad in [
            r#"[{"action":"read","path":"~demo|("}]"#,
            r#"[{"action":"read","path":"~demo|\\w{1000}{100}"}]"#,
        ] {
            assert!(!verify(bad).expect("valid").allows("demo"), "{bad}");
        }
        for bad in [
            r#"{"action":"read"}"#,
            r#"[{"path":"demo"}]"#,
            r#"[{"action":"read","path":1}]"#,
            r#"["read"]"#,
            r#""not json""#,
        ] {
            assert!(matches!(verify(bad), Err(JwtError::Malformed(_))), "{bad}");
        }
    }

    #[test]
    fn alg_none_and_other_algorithms_are_refused() {
        let k = hs_keys();
        let c = b64url_encode(claims(2000).as_bytes());
        let none = format!("{}.{c}.", b64url_encode(br#"{"alg":"none"}"#));
        assert_eq!(k.verify(&none, at(1000), Duration::ZERO), Err(JwtError::Algorithm));
        let hs512 = hs256(b"s3cret", r#"{"alg":"HS512"}"#, &claims(2000));
        assert_eq!(k.verify(&hs512, at(1000), Duration::ZERO), Err(JwtError::Algorithm));
        // An RS256 header over an HMAC: no RSA key, and the secret is never used for it.
        let confused = hs256(b"s3cret", r#"{"alg":"RS256"}"#, &claims(2000));
        assert_eq!(k.verify(&confused, at(1000), Duration::ZERO), Err(JwtError::NoKey));
        let crit = hs256(b"s3cret", r#"{"alg":"HS256","crit":["x"]}"#, &claims(2000));
        assert!(matches!(k.verify(&crit, at(1000), Duration::ZERO), Err(JwtError::Malformed(_))));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let k = hs_keys();
        let good = hs256(b"s3cret", H256, &claims(2000));
        for t in [
            "",
            "a.b",
            "a.b.c.d",
            "...",
            "!!.e30.e30",
            &format!("{good}="),
            &good.replacen('.', ".=", 1),
            &"a".repeat(MAX_TOKEN_BYTES + 1),
        ] {
            assert!(
                matches!(k.verify(t, at(1000), Duration::ZERO), Err(JwtError::Malformed(_))),
                "{t}"
            );
        }
        let not_json = format!("{}.{}.x", b64url_encode(b"{"), b64url_encode(b"{}"));
        assert!(k.verify(&not_json, at(1000), Duration::ZERO).is_err());
    }

    #[test]
    fn es256_and_rs256_from_a_jwks() {
        let (ec, ec_jwk) = es256_key("ec1");
        let (rsa, rsa_jwk) = rs256_key("rsa1");
        let mut k = JwtKeys::new();
        let jwks =
            format!(r#"{{"keys":[{ec_jwk},{rsa_jwk},{{"kty":"OKP","crv":"Ed25519","x":"AA"}}]}}"#);
        assert_eq!(k.add_jwks(jwks.as_bytes()), Ok(2));
        let t = es256(&ec, r#"{"alg":"ES256","kid":"ec1"}"#, &claims(2000));
        assert!(k.verify(&t, at(1000), Duration::ZERO).expect("ES256").allows("demo"));
        let t = rs256(&rsa, r#"{"alg":"RS256","kid":"rsa1"}"#, &claims(2000));
        assert!(k.verify(&t, at(1000), Duration::ZERO).expect("RS256").allows("cam1"));
        let t = rs256(&rsa, r#"{"alg":"RS256"}"#, &claims(2000));
        assert!(k.verify(&t, at(1000), Duration::ZERO).is_ok(), "no kid: every RS256 key");
        let t = rs256(&rsa, r#"{"alg":"RS256","kid":"other"}"#, &claims(2000));
        assert_eq!(k.verify(&t, at(1000), Duration::ZERO), Err(JwtError::NoKey));
        let (other, _) = es256_key("ec1");
        let t = es256(&other, r#"{"alg":"ES256","kid":"ec1"}"#, &claims(2000));
        assert_eq!(k.verify(&t, at(1000), Duration::ZERO), Err(JwtError::Signature));
        // A tampered payload under a valid signature.
        let t = es256(&ec, r#"{"alg":"ES256"}"#, &claims(2000));
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged = b64url_encode(claims(9999).as_bytes());
        parts[1] = &forged;
        assert_eq!(k.verify(&parts.join("."), at(1000), Duration::ZERO), Err(JwtError::Signature));
        assert!(JwtKeys::new().add_jwks(b"[]").is_err());
        assert!(JwtKeys::new().add_jwks(br#"{"keys":[{"kty":"RSA","n":"AQAB"}]}"#).is_err());
    }

    #[test]
    fn tokens_from_header_or_query() {
        use crate::whep::Method;
        let r = crate::WhepRequest::new(Method::Post, "/whep/demo?a=1&jwt=x%2Ey+z");
        assert_eq!(presented_token(&r).as_deref(), Some("x.y z"));
        let r = r.with_header("Authorization", "Bearer  abc ");
        assert_eq!(presented_token(&r).as_deref(), Some("abc"));
        let r = crate::WhepRequest::new(Method::Post, "/whep/demo?token=t");
        assert_eq!(presented_token(&r).as_deref(), Some("t"));
        assert_eq!(presented_token(&crate::WhepRequest::new(Method::Post, "/whep/d")), None);
    }

    proptest::proptest! {
        #[test]
        fn no_bytes_panic_the_verifier(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let k = hs_keys();
            let text = String::from_utf8_lossy(&bytes);
            let _ = k.verify(&text, at(1000), Duration::from_secs(5));
            let _ = b64url(&bytes);
            let _ = JwtKeys::new().add_jwks(&bytes);
        }

        #[test]
        fn signed_garbage_claims_do_not_panic(claims in ".{0,200}") {
            let t = hs256(b"s3cret", H256, &claims);
            let _ = hs_keys().verify(&t, at(1000), Duration::from_secs(5));
        }
    }
}
