//! The seat book the shards of one server share (see [`whep_core::shard`]): whep-core's
//! [`Book`] behind a mutex, taken once per HTTP request and once per viewer that leaves (never
//! per packet). The core keeps the bookkeeping and holds no lock; sharing it between the
//! shards' threads is the server's.

use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use whep_core::ratelimit::{Kind, RateLimits};
use whep_core::shard::{Book, MAX_SHARDS, SharedSeats};
use whep_core::{Reject, StreamId};

/// What the shards of one server share: viewer counts (for the caps and for placing new
/// viewers) and the request rate limiter, in one [`Book`] behind a mutex. Every core of the
/// server holds it as its [`ShardMember::set`](whep_core::shard::ShardMember::set).
#[derive(Debug)]
pub struct ShardSet {
    count: usize,
    book: Mutex<Book>,
}

impl ShardSet {
    /// State for `count` shards (1..=[`MAX_SHARDS`]), with the server's rate limits.
    pub fn new(count: usize, rate_limits: RateLimits, now: Instant) -> Arc<Self> {
        let count = count.clamp(1, MAX_SHARDS);
        Arc::new(Self { count, book: Mutex::new(Book::new(count, rate_limits, now)) })
    }

    fn lock(&self) -> MutexGuard<'_, Book> {
        // Every update is a few counter changes that cannot be left half done.
        self.book.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Number of shards.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The shard with the fewest viewers (the lowest index among equals).
    pub fn least_loaded(&self) -> usize {
        self.lock().least_loaded()
    }

    /// Viewers of every shard together.
    pub fn viewers(&self) -> usize {
        self.lock().viewers()
    }

    /// Viewers per shard.
    pub fn viewers_per_shard(&self) -> Vec<usize> {
        self.lock().viewers_per_shard().to_vec()
    }

    /// Viewers of `stream` on every shard together.
    pub fn stream_viewers(&self, stream: &StreamId) -> usize {
        self.lock().stream_viewers(stream)
    }
}

impl SharedSeats for ShardSet {
    fn count(&self) -> usize {
        self.count
    }

    fn viewers(&self) -> usize {
        Self::viewers(self)
    }

    fn stream_viewers(&self, stream: &StreamId) -> usize {
        Self::stream_viewers(self, stream)
    }

    fn admit(&self, kind: Kind, client: Option<IpAddr>, now: Instant) -> Result<(), Duration> {
        self.lock().admit(kind, client, now)
    }

    fn tracked_clients(&self) -> usize {
        self.lock().tracked_clients()
    }

    fn take_seat(
        &self,
        shard: u8,
        stream: &StreamId,
        stream_cap: usize,
        total_cap: usize,
    ) -> Result<(), Reject> {
        self.lock().take_seat(shard, stream, stream_cap, total_cap)
    }

    fn release_seat(&self, shard: u8, stream: &StreamId) {
        self.lock().release_seat(shard, stream);
    }

    fn take_unconnected(&self, client: IpAddr, cap: usize) -> bool {
        self.lock().take_unconnected(client, cap)
    }

    fn unconnected_full(&self, client: IpAddr, cap: usize) -> bool {
        self.lock().unconnected_full(client, cap)
    }

    fn release_unconnected(&self, client: IpAddr) {
        self.lock().release_unconnected(client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> StreamId {
        StreamId::new(s).expect("id")
    }

    #[test]
    fn seats_enforce_both_caps_across_shards() {
        #[allow(clippy::disallowed_methods)] // a test's clock
        let now = Instant::now();
        let set = ShardSet::new(2, RateLimits::unlimited(), now);
        let (a, b) = (id("a"), id("b"));
        assert!(set.take_seat(0, &a, 2, 3).is_ok());
        assert!(set.take_seat(1, &a, 2, 3).is_ok());
        assert!(matches!(set.take_seat(0, &a, 2, 3), Err(Reject::StreamFull { cap: 2 })));
        assert!(set.take_seat(1, &b, 2, 3).is_ok());
        assert!(matches!(set.take_seat(0, &b, 2, 3), Err(Reject::ServerFull { cap: 3 })));
        assert_eq!(set.viewers_per_shard(), vec![1, 2]);
        assert_eq!(set.least_loaded(), 0);
        set.release_seat(1, &a);
        set.release_seat(1, &b);
        assert_eq!(set.least_loaded(), 1);
        assert_eq!(set.stream_viewers(&a), 1);
        assert_eq!(set.stream_viewers(&b), 0);
        // Releasing more than was taken never underflows.
        set.release_seat(1, &b);
        assert_eq!(set.viewers(), 1);
    }
}
