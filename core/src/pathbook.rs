//! What the core learned of viewers' paths, by the address their media went to: the rung of the
//! bitrate ladder a paced viewer (its receiver reports showed loss) was on when it left, kept
//! for a while after it left ([`CoreConfig::path_memory`](crate::CoreConfig::path_memory)), so
//! that the next session from there (a player reconnecting, a page reloaded) starts on that rung,
//! paced, with its first GOP at that pace too, instead of at full rate into a link that cannot
//! carry it and finding out again from its losses.
//!
//! Keyed like the rate limits: an IPv4 address as is, an IPv6 address by its /64 (one host
//! usually owns a whole /64). Bounded: at most [`PathBook::CAPACITY`] entries, the oldest
//! forgotten first. Pure bookkeeping: no str0m, no IO.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::ratelimit::key;

/// What one path carried, as the last viewer on it found out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KnownPath {
    /// The bitrate (kbit/s) of the rendition its viewer was on when it left, paced.
    pub(crate) kbps: u32,
    learned: Instant,
}

/// Known paths by client address.
#[derive(Debug, Default)]
pub(crate) struct PathBook {
    paths: HashMap<IpAddr, KnownPath>,
}

impl PathBook {
    /// Most paths remembered.
    pub(crate) const CAPACITY: usize = 4096;

    /// Remembers that the path to `ip` carried, paced, a rendition of bitrate `kbps`. A full
    /// book first forgets what is older than `memory`, then its oldest path.
    pub(crate) fn learn(&mut self, ip: IpAddr, kbps: u32, memory: Duration, now: Instant) {
        let key = key(ip);
        if self.paths.len() >= Self::CAPACITY && !self.paths.contains_key(&key) {
            self.paths.retain(|_, p| now.saturating_duration_since(p.learned) < memory);
            if self.paths.len() >= Self::CAPACITY
                && let Some(oldest) =
                    self.paths.iter().min_by_key(|(_, p)| p.learned).map(|(k, _)| *k)
            {
                self.paths.remove(&oldest);
            }
        }
        self.paths.insert(key, KnownPath { kbps, learned: now });
    }

    /// Forgets the path to `ip` (a viewer on it played unpaced: it carries the full rate now).
    pub(crate) fn forget(&mut self, ip: IpAddr) {
        self.paths.remove(&key(ip));
    }

    /// What is known of the path to `ip`, if learned less than `memory` ago.
    pub(crate) fn get(&self, ip: IpAddr, memory: Duration, now: Instant) -> Option<KnownPath> {
        self.paths
            .get(&key(ip))
            .filter(|p| now.saturating_duration_since(p.learned) < memory)
            .copied()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.paths.len()
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    const MEMORY: Duration = Duration::from_secs(600);

    #[test]
    fn a_path_is_known_for_its_memory_then_forgotten() {
        let t0 = Instant::now();
        let mut book = PathBook::default();
        let ip: IpAddr = "10.0.0.7".parse().expect("ip");
        book.learn(ip, 400, MEMORY, t0);
        let known = book.get(ip, MEMORY, t0 + Duration::from_secs(599)).expect("known");
        assert_eq!(known.kbps, 400);
        assert_eq!(book.get(ip, MEMORY, t0 + MEMORY), None);
    }

    #[test]
    fn ipv6_paths_are_keyed_by_their_64_and_mapped_v4_as_v4() {
        let t0 = Instant::now();
        let mut book = PathBook::default();
        book.learn("2001:db8:1:2::10".parse().expect("ip"), 400, MEMORY, t0);
        assert!(book.get("2001:db8:1:2::99".parse().expect("ip"), MEMORY, t0).is_some());
        assert!(book.get("2001:db8:1:3::10".parse().expect("ip"), MEMORY, t0).is_none());
        book.learn("::ffff:10.0.0.7".parse().expect("ip"), 400, MEMORY, t0);
        assert!(book.get("10.0.0.7".parse().expect("ip"), MEMORY, t0).is_some());
        book.forget("10.0.0.7".parse().expect("ip"));
        assert!(book.get("::ffff:10.0.0.7".parse().expect("ip"), MEMORY, t0).is_none());
    }

    #[test]
    fn a_full_book_forgets_expired_paths_first_then_its_oldest() {
        let t0 = Instant::now();
        let mut book = PathBook::default();
        for i in 0..PathBook::CAPACITY as u32 {
            let ip = IpAddr::V4((0x0a00_0000 + i).into());
            book.learn(ip, 400, MEMORY, t0 + Duration::from_millis(u64::from(i)));
        }
        let newest = IpAddr::V4(0x0b00_0000.into());
        book.learn(newest, 400, MEMORY, t0 + Duration::from_secs(60));
        assert_eq!(book.len(), PathBook::CAPACITY);
        assert!(book.get(IpAddr::V4(0x0a00_0000.into()), MEMORY, t0).is_none(), "oldest kept");
        assert!(book.get(IpAddr::V4(0x0a00_0001.into()), MEMORY, t0).is_some());
        assert!(book.get(newest, MEMORY, t0 + Duration::from_secs(60)).is_some());
        // Long after: everything else expired, and goes at the next learning.
        let later = t0 + MEMORY + Duration::from_secs(30);
        book.learn(IpAddr::V4(0x0c00_0000.into()), 400, MEMORY, later);
        assert_eq!(book.len(), 2, "expired paths kept");
    }
}
