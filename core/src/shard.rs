//! Running one server as several cores ("shards"), each on its own thread with its own viewer
//! socket, to use more than one CPU core.
//!
//! - **Viewers** live on one shard from POST to end. A session id carries its shard's index in
//!   its low byte ([`SessionId::shard`]), so that a runtime routes PATCH and DELETE without a
//!   table; a POST goes to the shard with the fewest viewers ([`ShardSet::least_loaded`]).
//! - **Streams** belong to shard 0, the leader: it binds the ingest ports, runs FFmpeg and
//!   parses each RTP packet once. Its core emits every stream change and every parsed packet as
//!   [`Output::Mirror`](crate::Output::Mirror); the runtime hands them, in order, to every other
//!   shard ([`Core::mirror`](crate::Core::mirror)), where the stream exists as a follower copy
//!   with no ports and no process. A packet's payload is an `Arc<[u8]>` shared by all shards:
//!   ingest is parsed and copied once per machine, not once per shard.
//! - **Caps and rate limits** are the server's, not each shard's: the shards share one
//!   [`ShardSet`], which counts viewers per stream and in total and holds the request rate
//!   limiter, behind a mutex taken once per HTTP request and once per viewer that leaves
//!   (never per packet).
//!
//! A stream stop closes the leader's viewers before its ports are released, as a single core
//! does; follower shards close theirs when the mirrored stop reaches them (microseconds later,
//! while the leader is still waiting for FFmpeg to exit).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::CloseReason;
use crate::config::StreamConfig;
use crate::ids::{SessionId, StreamId};
use crate::packet::SourcePacket;
use crate::ratelimit::{Kind, Limiter, RateLimits, Unconnected};
use crate::whep::Reject;

/// Most shards one server runs (the index lives in one byte of the session id).
pub const MAX_SHARDS: usize = 64;

/// A core's place in a sharded server ([`Core::in_shard`](crate::Core::in_shard)).
#[derive(Debug, Clone)]
pub struct ShardMember {
    /// This core's index, `0..set.count()`. Shard 0 is the leader.
    pub index: u8,
    /// State shared by all shards of the server.
    pub set: Arc<ShardSet>,
}

impl ShardMember {
    /// Whether this core is the leader (owns ports and processes, mirrors to the others).
    pub fn is_leader(&self) -> bool {
        self.index == 0
    }
}

/// What the shards of one server share: viewer counts (for the caps and for placing new
/// viewers) and the request rate limiter.
#[derive(Debug)]
pub struct ShardSet {
    count: usize,
    book: Mutex<Book>,
}

#[derive(Debug)]
struct Book {
    limiter: Limiter,
    /// Viewers per stream, all shards together.
    streams: HashMap<StreamId, usize>,
    /// Viewers per shard.
    shards: Vec<usize>,
    /// Sessions not connected yet per client, all shards together.
    unconnected: Unconnected,
}

impl ShardSet {
    /// State for `count` shards (1..=[`MAX_SHARDS`]), with the server's rate limits.
    pub fn new(count: usize, rate_limits: RateLimits, now: Instant) -> Arc<Self> {
        let count = count.clamp(1, MAX_SHARDS);
        Arc::new(Self {
            count,
            book: Mutex::new(Book {
                limiter: Limiter::new(rate_limits, now),
                streams: HashMap::new(),
                shards: vec![0; count],
                unconnected: Unconnected::default(),
            }),
        })
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
        let book = self.lock();
        (0..book.shards.len()).min_by_key(|&i| book.shards[i]).unwrap_or(0)
    }

    /// Viewers of every shard together.
    pub fn viewers(&self) -> usize {
        self.lock().shards.iter().sum()
    }

    /// Viewers per shard.
    pub fn viewers_per_shard(&self) -> Vec<usize> {
        self.lock().shards.clone()
    }

    /// Viewers of `stream` on every shard together.
    pub fn stream_viewers(&self, stream: &StreamId) -> usize {
        self.lock().streams.get(stream).copied().unwrap_or(0)
    }

    pub(crate) fn admit(
        &self,
        kind: Kind,
        client: Option<IpAddr>,
        now: Instant,
    ) -> Result<(), Duration> {
        self.lock().limiter.admit(kind, client, now)
    }

    pub(crate) fn tracked_clients(&self) -> usize {
        self.lock().limiter.tracked()
    }

    /// Takes a viewer seat on `shard` for `stream` if both caps allow it.
    pub(crate) fn take_seat(
        &self,
        shard: u8,
        stream: &StreamId,
        stream_cap: usize,
        total_cap: usize,
    ) -> Result<(), Reject> {
        let mut book = self.lock();
        if book.streams.get(stream).copied().unwrap_or(0) >= stream_cap {
            return Err(Reject::StreamFull { cap: stream_cap });
        }
        if book.shards.iter().sum::<usize>() >= total_cap {
            return Err(Reject::ServerFull { cap: total_cap });
        }
        *book.streams.entry(stream.clone()).or_default() += 1;
        if let Some(n) = book.shards.get_mut(usize::from(shard)) {
            *n += 1;
        }
        Ok(())
    }

    /// Counts a session of `client` that has not connected, unless it already has `cap`.
    pub(crate) fn take_unconnected(&self, client: IpAddr, cap: usize) -> bool {
        self.lock().unconnected.take(client, cap)
    }

    /// Whether `client` holds `cap` unconnected sessions on all shards together.
    pub(crate) fn unconnected_full(&self, client: IpAddr, cap: usize) -> bool {
        self.lock().unconnected.is_full(client, cap)
    }

    /// Gives back what [`take_unconnected`](Self::take_unconnected) counted.
    pub(crate) fn release_unconnected(&self, client: IpAddr) {
        self.lock().unconnected.release(client);
    }

    /// Gives back a seat taken with [`take_seat`](Self::take_seat).
    pub(crate) fn release_seat(&self, shard: u8, stream: &StreamId) {
        let mut book = self.lock();
        if let Some(n) = book.streams.get_mut(stream) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                book.streams.remove(stream);
            }
        }
        if let Some(n) = book.shards.get_mut(usize::from(shard)) {
            *n = n.saturating_sub(1);
        }
    }
}

/// What the leader shard tells the others ([`Output::Mirror`](crate::Output::Mirror)), to be
/// applied in order with [`Core::mirror`](crate::Core::mirror).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mirror {
    /// A stream was added (its configuration; followers keep a copy without ports or process).
    Add {
        /// The stream.
        stream: StreamId,
        /// Its configuration on the leader.
        config: StreamConfig,
    },
    /// The stream began or ceased to accept viewers (started; stopped, or failed for good):
    /// followers do the same, closing its viewers when it ceased.
    Accepting {
        /// The stream.
        stream: StreamId,
        /// Whether it accepts viewers now.
        accepting: bool,
    },
    /// The leader closed the stream's viewers (its FFmpeg exited or could not start, or it
    /// stopped): followers close theirs, for the same reason.
    CloseViewers {
        /// The stream.
        stream: StreamId,
        /// Why.
        reason: CloseReason,
    },
    /// The stream was removed.
    Remove {
        /// The stream.
        stream: StreamId,
    },
    /// One RTP packet from the stream's FFmpeg, parsed; its payload is shared, not copied.
    Packet(SharedPacket),
}

/// An ingest packet as the leader parsed it (extended sequence number, keyframe flags), with
/// its payload in an `Arc<[u8]>` that every shard's viewers share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedPacket {
    pub(crate) stream: StreamId,
    pub(crate) packet: SourcePacket,
    /// When the leader read it off the ingest socket.
    pub(crate) read_at: Instant,
}

impl SharedPacket {
    /// When the leader's runtime read the datagram (the `now` of its `Input::Ingest`): a
    /// follower's runtime measures its egress latency from here, queueing between shards
    /// included.
    pub fn read_at(&self) -> Instant {
        self.read_at
    }

    /// The stream the packet belongs to.
    pub fn stream(&self) -> &StreamId {
        &self.stream
    }

    /// The RTP payload's length.
    pub fn payload_len(&self) -> usize {
        self.packet.payload.len()
    }

    /// The extended source sequence number.
    pub fn seq(&self) -> u64 {
        self.packet.seq
    }

    /// Whether the packet is marked as a source restart (see [`mark_restart`](Self::mark_restart)).
    pub fn is_restart(&self) -> bool {
        self.packet.restart
    }

    /// Marks the packet as a source restart: a follower's viewers re-gate video at the next
    /// keyframe, sequence numbers continuing without a gap (what a runtime does with the first
    /// packet after it dropped some of the stream's for a follower that fell behind).
    pub fn mark_restart(&mut self) {
        self.packet.restart = true;
    }

    /// A video packet of `stream` with sequence number `seq` and an 8-byte payload, read at
    /// `read_at`: for tests of what carries packets between shards.
    #[cfg(feature = "sim")]
    pub fn test_video(stream: StreamId, seq: u64, read_at: Instant) -> Self {
        Self {
            stream,
            packet: SourcePacket {
                kind: str0m::media::MediaKind::Video,
                seq,
                restart: false,
                timestamp: 0,
                marker: false,
                keyframe_start: false,
                payload: Arc::from(&[0u8; 8][..]),
            },
            read_at,
        }
    }
}

impl SessionId {
    /// The shard the session lives on (the low byte; always 0 on an unsharded server).
    pub fn shard(self) -> u8 {
        self.low_byte()
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
