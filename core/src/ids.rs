//! Identifiers and the seeded random source that draws them.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

/// Identifies a stream. Any non-empty string without control characters, at most 256 bytes;
/// ids such as `restreamer-ui:ingest:3f2a` (with `:`) are common.
///
/// Cheap to clone (a shared string): the packet path hands it around per packet.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(Arc<str>);

impl StreamId {
    /// Longest accepted id, in bytes.
    pub const MAX_LEN: usize = 256;

    /// Validates and wraps a stream id.
    pub fn new(id: impl Into<String>) -> Option<Self> {
        let id = id.into();
        let ok = !id.is_empty() && id.len() <= Self::MAX_LEN && !id.chars().any(char::is_control);
        ok.then(|| Self(Arc::from(id)))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Identifies one WHEP session (one viewer): 128 random bits as 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(u128);

impl SessionId {
    /// Parses the 32-hex-digit form used in session URLs.
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
            return None;
        }
        u128::from_str_radix(s, 16).ok().map(Self)
    }
}

impl SessionId {
    pub(crate) fn low_byte(self) -> u8 {
        (self.0 & 0xff) as u8
    }
}

/// A map keyed by [`SessionId`] that hashes an id by taking 64 of its random bits. Session
/// ids are drawn by the server from a CSPRNG, so nobody can choose colliding keys and a keyed
/// hash (SipHash, the std default) buys nothing; the fan-out looks a viewer up per packet copy.
pub(crate) type SessionMap<V> = HashMap<SessionId, V, BuildHasherDefault<SessionHasher>>;

/// See [`SessionMap`].
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SessionHasher(u64);

impl Hasher for SessionHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u128(&mut self, id: u128) {
        // Above the low byte (the shard index, the same for every id of a shard).
        self.0 = (id >> 8) as u64;
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not reached by `SessionId` (it hashes one u128); FNV-1a for anything else.
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// A strong entity tag of a session's ICE state, rendered quoted (`"…"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ETag(u128);

impl ETag {
    /// The header value, quoted as RFC 9110 requires for a strong tag.
    pub fn header_value(self) -> String {
        format!("\"{:032x}\"", self.0)
    }

    /// Whether an `If-Match` header value matches this tag: `*`, `"*"` (as the WHEP draft's
    /// examples write it) or a list containing this strong tag.
    pub fn matches(self, if_match: &str) -> bool {
        let mine = self.header_value();
        if_match.split(',').map(str::trim).any(|t| t == "*" || t == "\"*\"" || t == mine)
    }
}

/// The core's only source of randomness: ChaCha20 seeded from [`CoreConfig`](crate::CoreConfig).
#[derive(Debug)]
pub(crate) struct Rng(ChaCha20Rng);

impl Rng {
    pub(crate) fn new(seed: [u8; 32]) -> Self {
        Self(ChaCha20Rng::from_seed(seed))
    }

    fn u128(&mut self) -> u128 {
        let mut b = [0u8; 16];
        self.0.fill_bytes(&mut b);
        u128::from_le_bytes(b)
    }

    /// A session id whose low byte is `shard` ([`SessionId::shard`]).
    pub(crate) fn session_id(&mut self, shard: u8) -> SessionId {
        SessionId((self.u128() & !0xff) | u128::from(shard))
    }

    pub(crate) fn etag(&mut self) -> ETag {
        ETag(self.u128())
    }

    /// A STUN transaction id (96 random bits).
    pub(crate) fn tid(&mut self) -> [u8; 12] {
        let mut b = [0u8; 12];
        self.0.fill_bytes(&mut b);
        b
    }

    pub(crate) fn u32(&mut self) -> u32 {
        self.0.next_u32()
    }

    /// ICE credential characters (RFC 8839 ice-char), `len` of them.
    pub(crate) fn ice_chars(&mut self, len: usize) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        (0..len).map(|_| char::from(ALPHABET[(self.0.next_u32() % 64) as usize])).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_hashes_spread_over_buckets_within_a_shard() {
        use std::hash::BuildHasher;
        let mut rng = Rng::new([9; 32]);
        let build = BuildHasherDefault::<SessionHasher>::default();
        // Low bits pick the bucket, the top 7 the tag: both must vary although the shard
        // byte is fixed.
        let mut low = [0u32; 64];
        let mut top = [0u32; 128];
        for _ in 0..64_000 {
            let h = build.hash_one(rng.session_id(5));
            low[(h & 63) as usize] += 1;
            top[(h >> 57) as usize] += 1;
        }
        assert!(low.iter().all(|&n| (800..1200).contains(&n)), "{low:?}");
        assert!(top.iter().all(|&n| (350..650).contains(&n)), "{top:?}");
        let mut map = SessionMap::default();
        let ids: Vec<_> = (0..1000).map(|_| rng.session_id(5)).collect();
        for (i, id) in ids.iter().enumerate() {
            map.insert(*id, i);
        }
        assert!(ids.iter().enumerate().all(|(i, id)| map.get(id) == Some(&i)));
    }

    #[test]
    fn session_id_round_trips_and_rejects_junk() {
        let mut rng = Rng::new([7; 32]);
        let id = rng.session_id(0);
        let s = id.to_string();
        assert_eq!(s.len(), 32);
        assert_eq!(SessionId::parse(&s), Some(id));
        assert_eq!(SessionId::parse(&s.to_uppercase()), None);
        assert_eq!(SessionId::parse("xyz"), None);
        assert_eq!(SessionId::parse(&format!("{s}0")), None);
        let on_shard = rng.session_id(5);
        assert_eq!(on_shard.shard(), 5);
        assert_eq!(SessionId::parse(&on_shard.to_string()), Some(on_shard));
    }

    #[test]
    fn seeded_rng_is_deterministic_and_distinct() {
        let (mut a, mut b) = (Rng::new([1; 32]), Rng::new([1; 32]));
        assert_eq!(a.session_id(0), b.session_id(0));
        assert_ne!(a.session_id(0), a.session_id(0));
        assert_ne!(Rng::new([2; 32]).session_id(0), Rng::new([1; 32]).session_id(0));
    }

    #[test]
    fn etag_matching() {
        let t = Rng::new([3; 32]).etag();
        let v = t.header_value();
        assert!(v.starts_with('"') && v.ends_with('"') && v.len() == 34);
        assert!(t.matches(&v));
        assert!(t.matches("*"));
        assert!(t.matches("\"*\""));
        assert!(t.matches(&format!("\"x\", {v}")));
        assert!(!t.matches("\"0\""));
        assert!(!t.matches(""));
    }

    #[test]
    fn stream_ids() {
        assert!(StreamId::new("restreamer-ui:ingest:3f2a").is_some());
        assert!(StreamId::new("").is_none());
        assert!(StreamId::new("a\nb").is_none());
        assert!(StreamId::new("x".repeat(257)).is_none());
    }
}
