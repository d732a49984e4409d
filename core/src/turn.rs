//! Time-limited TURN credentials: the TURN REST scheme (draft-uberti-behave-turn-rest), which
//! coturn implements as `use-auth-secret` with a `static-auth-secret`.
//!
//! The TURN server and this server share a secret. For each answer the core makes a user name
//! `<expiry>:<user>` (`expiry` in seconds since the Unix epoch) and the password
//! `base64(HMAC-SHA1(secret, user name))`; the TURN server recomputes the password from the
//! user name and refuses it once `expiry` has passed. A page thus only ever holds a password
//! that stops working after [`CoreConfig::turn_credential_ttl`](crate::CoreConfig::turn_credential_ttl),
//! never the secret or a permanent one.
//!
//! The core reads no clock: the wall-clock time comes with each request
//! ([`WhepRequest::wall_time`](crate::WhepRequest::wall_time)).

use std::time::{Duration, SystemTime};

use aws_lc_rs::hmac;

/// A user name and password for one TURN server, valid until [`expiry`](Self::expiry).
#[derive(Clone, PartialEq, Eq)]
pub struct RestCredential {
    /// `<expiry>:<user>`.
    pub username: String,
    /// `base64(HMAC-SHA1(secret, username))`.
    pub credential: String,
    /// Seconds since the Unix epoch after which the TURN server refuses the credential.
    pub expiry: u64,
}

impl std::fmt::Debug for RestCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestCredential")
            .field("username", &self.username)
            .field("credential", &"<redacted>")
            .finish()
    }
}

impl RestCredential {
    /// The credential for `user` that expires `ttl` after `wall_time`, derived from `secret`.
    /// A `wall_time` before the Unix epoch counts as the epoch.
    pub fn new(secret: &str, user: &str, wall_time: SystemTime, ttl: Duration) -> Self {
        let since_epoch = wall_time.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let expiry = since_epoch.saturating_add(ttl).as_secs();
        Self::with_expiry(secret, user, expiry)
    }

    /// The credential for `user` that expires at `expiry` (seconds since the Unix epoch).
    pub fn with_expiry(secret: &str, user: &str, expiry: u64) -> Self {
        let username = format!("{expiry}:{user}");
        let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret.as_bytes());
        let tag = hmac::sign(&key, username.as_bytes());
        Self { credential: base64(tag.as_ref()), username, expiry }
    }

    /// Whether `credential` is what `secret` gives for `username` (the TURN server's check,
    /// without the expiry).
    pub fn verify(secret: &str, username: &str, credential: &str) -> bool {
        let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret.as_bytes());
        base64(hmac::sign(&key, username.as_bytes()).as_ref()) == credential
    }
}

/// Standard base64 (RFC 4648 §4) with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> shift) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, output) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), output, "{input:?}");
        }
    }

    /// The expected password was computed apart from this code:
    /// `printf '1767225600:whep' | openssl dgst -sha1 -hmac 'north-secret' -binary | base64`.
    #[test]
    fn credential_matches_openssl() {
        let c = RestCredential::with_expiry("north-secret", "whep", 1_767_225_600);
        assert_eq!(c.username, "1767225600:whep");
        assert_eq!(c.credential, "GUmivfMRItKwmo9AnNcaJY4lvTk=");
        assert!(RestCredential::verify("north-secret", &c.username, &c.credential));
        assert!(!RestCredential::verify("south-secret", &c.username, &c.credential));
        assert!(!format!("{c:?}").contains(&c.credential), "Debug hides the password");
    }

    #[test]
    fn expiry_is_wall_time_plus_ttl() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_767_225_000_900);
        let c = RestCredential::new("s", "cam", at, Duration::from_secs(600));
        assert_eq!(c.expiry, 1_767_225_600);
        assert_eq!(c.username, "1767225600:cam");
        let before_epoch = SystemTime::UNIX_EPOCH - Duration::from_secs(5);
        assert_eq!(RestCredential::new("s", "cam", before_epoch, Duration::from_secs(7)).expiry, 7);
    }
}
