//! Running one server as several cores ("shards"), each on its own thread with its own viewer
//! socket, to use more than one CPU core.
//!
//! - **Viewers** live on one shard from POST to end. A session id carries its shard's index in
//!   its low byte ([`SessionId::shard`]), so that a runtime routes PATCH and DELETE without a
//!   table; a POST goes to the shard with the fewest viewers ([`Book::least_loaded`]).
//! - **Streams** belong to shard 0, the leader: it binds the ingest ports, runs FFmpeg and
//!   parses each RTP packet once. Its core emits every stream change and every parsed packet as
//!   [`Output::Mirror`](crate::Output::Mirror); the runtime hands them, in order, to every other
//!   shard ([`Core::mirror`](crate::Core::mirror)), where the stream exists as a follower copy
//!   with no ports and no process. A packet's payload is an `Arc<[u8]>` shared by all shards:
//!   ingest is parsed and copied once per machine, not once per shard.
//! - **Caps and rate limits** are the server's, not each shard's: the shards share one
//!   [`Book`], which counts viewers per stream and in total and holds the request rate
//!   limiter. This crate keeps the bookkeeping and says what a core needs of it
//!   ([`SharedSeats`]); the server shell shares it between threads
//!   (`whep_server::shard::ShardSet`, behind a mutex taken once per HTTP request and once per
//!   viewer that leaves, never per packet), so that this crate holds no lock.
//!
//! A stream stop closes the leader's viewers before its ports are released, as a single core
//! does; follower shards close theirs when the mirrored stop reaches them (microseconds later,
//! while the leader is still waiting for FFmpeg to exit).
//!
//! **On-demand streams** ([`StreamConfig::on_demand`]) keep their whole lifecycle on the
//! leader, which alone spawns and stops FFmpeg; what it needs from the other shards is whether
//! anyone watches, and that is the shared [`Book`]'s [`stream_viewers`](Book::stream_viewers),
//! which every shard updates (under its lock) before it acts on a viewer that came or went.
//!
//! - A follower that takes a viewer of an on-demand stream, or whose viewer leaves the stream
//!   with none left in the book, emits [`Output::Demand`](crate::Output::Demand); the runtime
//!   hands it to the leader ([`Core::demand`](crate::Core::demand)), which reads the book:
//!   watched, it starts an idle stream (bind, spawn; the POST was answered at once) and
//!   cancels a running close delay; unwatched, it arms the close delay. The leader does the
//!   same for its own viewers. Since every change of the book to or from zero is followed by
//!   such a look at the book, the leader's last look sees the last state. Only the leader
//!   spawns, one input at a time: concurrent POSTs on several shards start FFmpeg once.
//! - The close delay fires only if the book still counts no viewer then (a follower's viewer
//!   whose [`Output::Demand`](crate::Output::Demand) is still queued keeps the stream), and a
//!   stream that stops while a viewer came on any shard starts again when its FFmpeg exited.
//! - A new run of FFmpeg empties the GOP caches of every shard ([`Mirror::NewRun`]), so that a
//!   viewer who joins before its first keyframe never starts on the previous run's pictures.
//!   Followers keep the stream's `on_demand` setting only to know when to tell the leader:
//!   their copy is [`Feed::Mirror`](crate::config::Feed::Mirror), without ports or timers.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
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
    pub set: Arc<dyn SharedSeats>,
}

impl ShardMember {
    /// Whether this core is the leader (owns ports and processes, mirrors to the others).
    pub fn is_leader(&self) -> bool {
        self.index == 0
    }
}

/// What the shards of one server share, as a core sees it: a [`Book`] that every shard's core
/// updates from its own thread. The core defines what it needs and keeps the bookkeeping
/// ([`Book`]); the server shell supplies the sharing (`whep_server::shard::ShardSet`, a
/// [`Book`] behind a mutex), so that this crate holds no lock.
///
/// Each method is one [`Book`] call, done atomically with respect to the other shards.
pub trait SharedSeats: Send + Sync + fmt::Debug {
    /// Number of shards.
    fn count(&self) -> usize;

    /// Viewers of every shard together.
    fn viewers(&self) -> usize;

    /// Viewers of `stream` on every shard together.
    fn stream_viewers(&self, stream: &StreamId) -> usize;

    /// [`Book::admit`].
    fn admit(&self, kind: Kind, client: Option<IpAddr>, now: Instant) -> Result<(), Duration>;

    /// [`Book::tracked_clients`].
    fn tracked_clients(&self) -> usize;

    /// [`Book::take_seat`].
    fn take_seat(
        &self,
        shard: u8,
        stream: &StreamId,
        stream_cap: usize,
        total_cap: usize,
    ) -> Result<(), Reject>;

    /// [`Book::release_seat`].
    fn release_seat(&self, shard: u8, stream: &StreamId);

    /// [`Book::take_unconnected`].
    fn take_unconnected(&self, client: IpAddr, cap: usize) -> bool;

    /// [`Book::unconnected_full`].
    fn unconnected_full(&self, client: IpAddr, cap: usize) -> bool;

    /// [`Book::release_unconnected`].
    fn release_unconnected(&self, client: IpAddr);
}

/// The bookkeeping the shards of one server share: viewer counts (for the caps and for placing
/// new viewers) and the request rate limiter. Plain data; [`SharedSeats`] is how the shards
/// share it.
#[derive(Debug)]
pub struct Book {
    limiter: Limiter,
    /// Viewers per stream, all shards together.
    streams: HashMap<StreamId, usize>,
    /// Viewers per shard.
    shards: Vec<usize>,
    /// Sessions not connected yet per client, all shards together.
    unconnected: Unconnected,
}

impl Book {
    /// The book of `count` shards (clamped to 1..=[`MAX_SHARDS`]), with the server's rate
    /// limits.
    pub fn new(count: usize, rate_limits: RateLimits, now: Instant) -> Self {
        Self {
            limiter: Limiter::new(rate_limits, now),
            streams: HashMap::new(),
            shards: vec![0; count.clamp(1, MAX_SHARDS)],
            unconnected: Unconnected::default(),
        }
    }

    /// Number of shards.
    pub fn count(&self) -> usize {
        self.shards.len()
    }

    /// The shard with the fewest viewers (the lowest index among equals).
    pub fn least_loaded(&self) -> usize {
        (0..self.shards.len()).min_by_key(|&i| self.shards[i]).unwrap_or(0)
    }

    /// Viewers of every shard together.
    pub fn viewers(&self) -> usize {
        self.shards.iter().sum()
    }

    /// Viewers per shard.
    pub fn viewers_per_shard(&self) -> &[usize] {
        &self.shards
    }

    /// Viewers of `stream` on every shard together.
    pub fn stream_viewers(&self, stream: &StreamId) -> usize {
        self.streams.get(stream).copied().unwrap_or(0)
    }

    /// Admits a request of `kind` from `client` or says how long it should wait (the server's
    /// rate limits, all shards together).
    pub fn admit(
        &mut self,
        kind: Kind,
        client: Option<IpAddr>,
        now: Instant,
    ) -> Result<(), Duration> {
        self.limiter.admit(kind, client, now)
    }

    /// Clients the rate limiter tracks.
    pub fn tracked_clients(&self) -> usize {
        self.limiter.tracked()
    }

    /// Takes a viewer seat on `shard` for `stream` if both caps allow it.
    pub fn take_seat(
        &mut self,
        shard: u8,
        stream: &StreamId,
        stream_cap: usize,
        total_cap: usize,
    ) -> Result<(), Reject> {
        if self.stream_viewers(stream) >= stream_cap {
            return Err(Reject::StreamFull { cap: stream_cap });
        }
        if self.viewers() >= total_cap {
            return Err(Reject::ServerFull { cap: total_cap });
        }
        *self.streams.entry(stream.clone()).or_default() += 1;
        if let Some(n) = self.shards.get_mut(usize::from(shard)) {
            *n += 1;
        }
        Ok(())
    }

    /// Counts a session of `client` that has not connected, unless it already has `cap`.
    pub fn take_unconnected(&mut self, client: IpAddr, cap: usize) -> bool {
        self.unconnected.take(client, cap)
    }

    /// Whether `client` holds `cap` unconnected sessions on all shards together.
    pub fn unconnected_full(&self, client: IpAddr, cap: usize) -> bool {
        self.unconnected.is_full(client, cap)
    }

    /// Gives back what [`take_unconnected`](Self::take_unconnected) counted.
    pub fn release_unconnected(&mut self, client: IpAddr) {
        self.unconnected.release(client);
    }

    /// Gives back a seat taken with [`take_seat`](Self::take_seat).
    pub fn release_seat(&mut self, shard: u8, stream: &StreamId) {
        if let Some(n) = self.streams.get_mut(stream) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.streams.remove(stream);
            }
        }
        if let Some(n) = self.shards.get_mut(usize::from(shard)) {
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
    /// The leader starts a new run of the stream's ingest (it binds ports for a new FFmpeg):
    /// followers empty its GOP caches, as the leader does, so that no viewer starts on the
    /// previous run's pictures.
    NewRun {
        /// The stream.
        stream: StreamId,
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
                rendition: 0,
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
        let mut book = Book::new(2, RateLimits::unlimited(), now);
        let (a, b) = (id("a"), id("b"));
        assert!(book.take_seat(0, &a, 2, 3).is_ok());
        assert!(book.take_seat(1, &a, 2, 3).is_ok());
        assert!(matches!(book.take_seat(0, &a, 2, 3), Err(Reject::StreamFull { cap: 2 })));
        assert!(book.take_seat(1, &b, 2, 3).is_ok());
        assert!(matches!(book.take_seat(0, &b, 2, 3), Err(Reject::ServerFull { cap: 3 })));
        assert_eq!(book.viewers_per_shard(), [1, 2]);
        assert_eq!(book.least_loaded(), 0);
        book.release_seat(1, &a);
        book.release_seat(1, &b);
        assert_eq!(book.least_loaded(), 1);
        assert_eq!(book.stream_viewers(&a), 1);
        assert_eq!(book.stream_viewers(&b), 0);
        // Releasing more than was taken never underflows.
        book.release_seat(1, &b);
        assert_eq!(book.viewers(), 1);
    }

    #[test]
    fn a_book_counts_unconnected_sessions_per_client() {
        #[allow(clippy::disallowed_methods)] // a test's clock
        let now = Instant::now();
        let mut book = Book::new(MAX_SHARDS + 1, RateLimits::unlimited(), now);
        assert_eq!(book.count(), MAX_SHARDS);
        let ip = IpAddr::from([192, 0, 2, 1]);
        assert!(book.take_unconnected(ip, 2));
        assert!(!book.unconnected_full(ip, 2));
        assert!(book.take_unconnected(ip, 2));
        assert!(book.unconnected_full(ip, 2));
        assert!(!book.take_unconnected(ip, 2));
        book.release_unconnected(ip);
        assert!(!book.unconnected_full(ip, 2));
        assert!(book.admit(Kind::Post, Some(ip), now).is_ok());
    }
}
