//! Loopback ingest port accounting.
//!
//! FFmpeg sends a stream's video RTP to `127.0.0.1:V` and its audio RTP to `127.0.0.1:V+1`. The
//! [`PortPool`] hands out such adjacent pairs from a configured range. It opens no socket: the
//! runtime binds the ports it is given, and when a bind fails it reports back so the pair is
//! quarantined for a while and the core moves on to another pair.
//!
//! All bookkeeping is sans-IO and deterministic: time comes in as an [`Instant`] argument and the
//! hand-out order depends only on the sequence of calls.

use std::collections::BTreeSet;
use std::fmt;
use std::ops::RangeInclusive;
use std::time::Instant;

/// An adjacent pair of loopback UDP ports: video on `video`, audio on `video + 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortPair {
    /// The video port V; the audio port is V + 1.
    pub video: u16,
}

impl PortPair {
    /// Returns the audio port, `video + 1`.
    ///
    /// A [`PortPool`] never hands out `video == 65535`; for such a hand-made pair this saturates
    /// to 65535 rather than wrapping to 0, because binding port 0 would silently pick a random
    /// port while binding 65535 twice fails loudly.
    #[must_use]
    pub fn audio(self) -> u16 {
        self.video.saturating_add(1)
    }

    /// Reports whether `port` is the video or the audio port of this pair.
    #[must_use]
    pub fn contains(self, port: u16) -> bool {
        port == self.video || port == self.audio()
    }

    /// The port a stream's FFmpeg sends its video from, `video + 2` (its output leg's
    /// `localport`): ingest accepts the video port's datagrams from this port alone. A pool of
    /// [`PortPool::STREAM_BLOCK`] ports per stream reserves it; saturates like [`audio`](Self::audio).
    #[must_use]
    pub fn video_source(self) -> u16 {
        self.video.saturating_add(2)
    }

    /// The port a stream's FFmpeg sends its audio from, `video + 3`.
    #[must_use]
    pub fn audio_source(self) -> u16 {
        self.video.saturating_add(3)
    }

    /// The ingest port of the stream's further video rendition `k` (0-based), `video + 4 + 2k`;
    /// saturates like [`audio`](Self::audio).
    #[must_use]
    pub fn rendition(self, k: u8) -> u16 {
        self.video.saturating_add(4 + 2 * u16::from(k))
    }

    /// The port FFmpeg sends rendition `k` from, `video + 5 + 2k`.
    #[must_use]
    pub fn rendition_source(self, k: u8) -> u16 {
        self.video.saturating_add(5 + 2 * u16::from(k))
    }

    /// Every ingest port of a stream with `renditions` further video renditions: video, audio,
    /// then each rendition's. A runtime binds all of them for an
    /// [`Output::BindIngest`](crate::Output::BindIngest).
    pub fn ingest(self, renditions: u8) -> impl Iterator<Item = u16> {
        [self.video, self.audio()]
            .into_iter()
            .chain((0..renditions).map(move |k| self.rendition(k)))
    }
}

impl fmt::Display for PortPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.video, self.audio())
    }
}

/// The state of one pair in the pool, indexed by pair number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Handed out and not yet released or quarantined.
    Allocated,
    /// Available for [`PortPool::allocate`].
    Free,
    /// Not handed out before `until` because the runtime could not bind it.
    Quarantined {
        /// The instant from which the pair may be handed out again.
        until: Instant,
    },
}

/// A pool of adjacent loopback port pairs taken from a configured range.
///
/// Pair `k` is `(start + s·k, start + s·k + 1)`, `s` the pool's stride (2, or
/// [`STREAM_BLOCK`](Self::STREAM_BLOCK) for the core's blocks whose two further ports are
/// FFmpeg's sending ports); every such block that fits in the range belongs to the pool. Each pair is in exactly one state: free, allocated or quarantined. Allocation is
/// round-robin so that a just-released pair, which a dying FFmpeg may still be sending to, rests
/// as long as possible before it is reused.
///
/// Quarantines are expired lazily: a pair whose quarantine has run out stays in the quarantined
/// state until the next [`allocate`](Self::allocate) sweeps it back to free. Queries that take a
/// `now` ([`quarantined`](Self::quarantined)) look at the deadline, not at the stored state.
#[derive(Debug, Clone)]
pub struct PortPool {
    /// The first port of the configured range (the video port of pair 0).
    start: u16,
    /// Ports per pair number: 2, or more when each pair owns further ports after it.
    stride: u16,
    /// The last port of the configured range; pairs never reach past it.
    end: u16,
    /// One entry per pair, indexed by pair number.
    slots: Vec<Slot>,
    /// Pair numbers of free slots, so that `allocate` finds the next one in O(log n).
    free: BTreeSet<usize>,
    /// `(until, pair number)` of quarantined slots, ordered by deadline for cheap expiry and
    /// `next_unquarantine`.
    quarantine: BTreeSet<(Instant, usize)>,
    /// Number of slots in [`Slot::Allocated`].
    allocated: usize,
    /// Pair number of the most recently allocated pair; the next search starts just after it.
    last: Option<usize>,
}

impl PortPool {
    /// Creates a pool over `range`.
    ///
    /// Pairs are (start + 2k, start + 2k + 1) for every k whose pair fits in the range. An empty
    /// or one-port range gives a pool with capacity 0 (never panics). All pairs start free.
    #[must_use]
    pub fn new(range: RangeInclusive<u16>) -> Self {
        Self::with_stride(range, 2)
    }

    /// Ports a stream holds in the core's pool: its ingest pair (video V, audio V+1) and the
    /// two ports its FFmpeg sends from (V+2, V+3; see [`PortPair::video_source`]).
    pub const STREAM_BLOCK: u16 = 4;

    /// The ports a stream takes with at most `max_renditions` further video renditions:
    /// [`STREAM_BLOCK`](Self::STREAM_BLOCK) and two per rendition.
    #[must_use]
    pub const fn block(max_renditions: u8) -> u16 {
        Self::STREAM_BLOCK + 2 * max_renditions as u16
    }

    /// Creates a pool whose pairs start every `stride` ports (at least 2): pair `k` is
    /// `start + stride·k` and `+ 1`, and the `stride - 2` ports after each pair belong to it too
    /// (handed out and released with it, never part of another pair).
    #[must_use]
    pub fn with_stride(range: RangeInclusive<u16>, stride: u16) -> Self {
        let stride = stride.max(2);
        let (start, end) = (*range.start(), *range.end());
        // Count in u32 so that a range ending at 65535 cannot overflow.
        let ports = if end < start { 0 } else { u32::from(end) - u32::from(start) + 1 };
        let pairs = usize::try_from(ports / u32::from(stride)).unwrap_or(0);
        Self {
            stride,
            start,
            end,
            slots: vec![Slot::Free; pairs],
            free: (0..pairs).collect(),
            quarantine: BTreeSet::new(),
            allocated: 0,
            last: None,
        }
    }

    /// Returns the number of pairs in the pool, whatever their state.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Returns the number of pairs currently allocated.
    #[must_use]
    pub fn in_use(&self) -> usize {
        self.allocated
    }

    /// Returns the number of pairs still blocked by a quarantine at `now`.
    #[must_use]
    pub fn quarantined(&self, now: Instant) -> usize {
        // Deadlines at or before `now` are over even if `allocate` has not swept them yet.
        self.quarantine.iter().filter(|(until, _)| *until > now).count()
    }

    /// Reports whether `pair` belongs to this pool and is currently allocated.
    #[must_use]
    pub fn is_allocated(&self, pair: PortPair) -> bool {
        self.index_of(pair).is_some_and(|i| self.slots[i] == Slot::Allocated)
    }

    /// Hands out a free pair that is neither allocated nor quarantined at `now`, or `None`.
    ///
    /// Order is deterministic round-robin: the search starts just after the most recently
    /// allocated pair (at pair 0 for a fresh pool) and wraps around, so a just-released pair is
    /// not handed out again at once while others are free (a dying FFmpeg may still send to it).
    /// Pairs whose quarantine has ended by `now` are first returned to the free set.
    pub fn allocate(&mut self, now: Instant) -> Option<PortPair> {
        self.expire(now);
        let from = self.last.map_or(0, |last| last + 1);
        let index = self.free.range(from..).next().or_else(|| self.free.iter().next()).copied()?;
        self.free.remove(&index);
        self.slots[index] = Slot::Allocated;
        self.allocated += 1;
        self.last = Some(index);
        Some(self.pair_at(index))
    }

    /// Returns an allocated pair to the pool.
    ///
    /// Returns false (and changes nothing) if it was not allocated, which includes pairs outside
    /// the pool and quarantined pairs.
    pub fn release(&mut self, pair: PortPair) -> bool {
        let Some(index) = self.allocated_index(pair) else {
            return false;
        };
        self.slots[index] = Slot::Free;
        self.free.insert(index);
        self.allocated -= 1;
        true
    }

    /// Marks an allocated pair as unusable until `until` (the runtime could not bind it).
    ///
    /// The pair stops being allocated and [`allocate`](Self::allocate) skips it until then.
    /// Returns false (and changes nothing) if it was not allocated.
    pub fn quarantine(&mut self, pair: PortPair, until: Instant) -> bool {
        let Some(index) = self.allocated_index(pair) else {
            return false;
        };
        self.slots[index] = Slot::Quarantined { until };
        self.quarantine.insert((until, index));
        self.allocated -= 1;
        true
    }

    /// Returns the earliest instant at which a quarantined pair becomes usable again, if any.
    ///
    /// This lets the core schedule a retry when the pool is exhausted only by quarantine. The
    /// instant may already have passed when no [`allocate`](Self::allocate) has run since the
    /// quarantine ended; an `allocate` at that instant or later then succeeds.
    #[must_use]
    pub fn next_unquarantine(&self) -> Option<Instant> {
        self.quarantine.first().map(|(until, _)| *until)
    }

    /// Panics with a clear message if internal bookkeeping is inconsistent.
    ///
    /// Tests and the simulation harness call this after every step. It checks that allocated
    /// pairs are within range, aligned, unique and disjoint from quarantined ones, and that the
    /// free set, the quarantine index and the counters agree with the per-pair states.
    pub fn check_invariants(&self) {
        let ports =
            if self.end < self.start { 0 } else { u32::from(self.end) - u32::from(self.start) + 1 };
        assert_eq!(
            u32::try_from(self.slots.len()).ok(),
            Some(ports / u32::from(self.stride)),
            "PortPool: {} slots for range {}..={}",
            self.slots.len(),
            self.start,
            self.end
        );
        let mut allocated = 0;
        let mut seen = BTreeSet::new();
        for (index, slot) in self.slots.iter().enumerate() {
            let pair = self.pair_at(index);
            assert!(
                pair.video >= self.start
                    && (pair.video - self.start).is_multiple_of(self.stride)
                    && u32::from(pair.video) + u32::from(self.stride) - 1 <= u32::from(self.end),
                "PortPool: pair {index} = {pair} is outside or misaligned in {}..={}",
                self.start,
                self.end
            );
            assert!(seen.insert(pair), "PortPool: pair {pair} appears twice");
            assert_eq!(
                self.index_of(pair),
                Some(index),
                "PortPool: pair {pair} does not map back to slot {index}"
            );
            match slot {
                Slot::Allocated => {
                    allocated += 1;
                    assert!(
                        !self.free.contains(&index),
                        "PortPool: allocated pair {pair} is in the free set"
                    );
                }
                Slot::Free => assert!(
                    self.free.contains(&index),
                    "PortPool: free pair {pair} is missing from the free set"
                ),
                Slot::Quarantined { until } => {
                    assert!(
                        self.quarantine.contains(&(*until, index)),
                        "PortPool: quarantined pair {pair} is missing from the quarantine index"
                    );
                    assert!(
                        !self.free.contains(&index),
                        "PortPool: quarantined pair {pair} is in the free set"
                    );
                }
            }
        }
        assert_eq!(
            allocated, self.allocated,
            "PortPool: {allocated} pairs allocated but the counter says {}",
            self.allocated
        );
        for &index in &self.free {
            assert!(
                self.slots.get(index) == Some(&Slot::Free),
                "PortPool: free set holds pair number {index}, which is not free"
            );
        }
        for &(until, index) in &self.quarantine {
            assert!(
                self.slots.get(index) == Some(&Slot::Quarantined { until }),
                "PortPool: quarantine index holds pair number {index}, which is not quarantined \
                 until that instant"
            );
        }
        assert_eq!(
            self.free.len() + self.quarantine.len() + self.allocated,
            self.slots.len(),
            "PortPool: free + quarantined + allocated does not add up to the capacity"
        );
        if let Some(last) = self.last {
            assert!(
                last < self.slots.len(),
                "PortPool: round-robin cursor {last} is past the last pair"
            );
        }
    }

    /// Returns every pair whose quarantine has ended by `now` to the free set.
    fn expire(&mut self, now: Instant) {
        while let Some(&(until, index)) = self.quarantine.first() {
            if until > now {
                break;
            }
            self.quarantine.remove(&(until, index));
            self.slots[index] = Slot::Free;
            self.free.insert(index);
        }
    }

    /// Returns the pair number of `pair` if it is one of this pool's pairs.
    fn index_of(&self, pair: PortPair) -> Option<usize> {
        let offset = pair.video.checked_sub(self.start)?;
        if !offset.is_multiple_of(self.stride) {
            return None;
        }
        let index = usize::from(offset / self.stride);
        (index < self.slots.len()).then_some(index)
    }

    /// Returns the pair number of `pair` if it is one of this pool's pairs and is allocated.
    fn allocated_index(&self, pair: PortPair) -> Option<usize> {
        self.index_of(pair).filter(|&i| self.slots[i] == Slot::Allocated)
    }

    /// Returns the pair with number `index`; the caller guarantees `index < capacity`.
    fn pair_at(&self, index: usize) -> PortPair {
        // `index < capacity <= 32768`, and `start + stride * index + 1 <= end`, so this fits in
        // u16; the saturating arithmetic only keeps a broken invariant from wrapping silently.
        let offset =
            u16::try_from(index.saturating_mul(usize::from(self.stride))).unwrap_or(u16::MAX);
        PortPair { video: self.start.saturating_add(offset) }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests pick a real starting instant
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    fn pair(video: u16) -> PortPair {
        PortPair { video }
    }

    fn drain(pool: &mut PortPool, now: Instant) -> Vec<PortPair> {
        let mut out = Vec::new();
        while let Some(p) = pool.allocate(now) {
            pool.check_invariants();
            out.push(p);
        }
        out
    }

    #[test]
    fn pair_ports_and_display() {
        let p = pair(40000);
        assert_eq!(p.audio(), 40001);
        assert!(p.contains(40000));
        assert!(p.contains(40001));
        assert!(!p.contains(39999));
        assert!(!p.contains(40002));
        assert_eq!(p.to_string(), "40000/40001");
        // A hand-made pair at the very top must not wrap to port 0.
        assert_eq!(pair(65535).audio(), 65535);
        assert!(!pair(65535).contains(0));
    }

    #[test]
    fn capacity_of_even_odd_and_empty_ranges() {
        assert_eq!(PortPool::new(40000..=40009).capacity(), 5);
        assert_eq!(PortPool::new(40000..=40010).capacity(), 5);
        assert_eq!(PortPool::new(40001..=40010).capacity(), 5);
        assert_eq!(PortPool::new(40000..=40001).capacity(), 1);
        assert_eq!(PortPool::new(40000..=40000).capacity(), 0);
        #[allow(clippy::reversed_empty_ranges)]
        let empty = PortPool::new(40010..=40000);
        assert_eq!(empty.capacity(), 0);
        let mut empty = empty;
        assert_eq!(empty.allocate(Instant::now()), None);
        assert_eq!(empty.next_unquarantine(), None);
        empty.check_invariants();
        for pool in
            [PortPool::new(40000..=40009), PortPool::new(40000..=40000), PortPool::new(0..=0)]
        {
            pool.check_invariants();
        }
    }

    #[test]
    fn full_u16_range_and_top_of_range_do_not_overflow() {
        let now = Instant::now();
        let mut full = PortPool::new(0..=65535);
        assert_eq!(full.capacity(), 32768);
        full.check_invariants();

        let mut top = PortPool::new(65530..=65535);
        assert_eq!(top.capacity(), 3);
        let got = drain(&mut top, now);
        assert_eq!(got, vec![pair(65530), pair(65532), pair(65534)]);
        assert_eq!(got[2].audio(), 65535);

        // An odd start at the top leaves the last port unused instead of overflowing.
        let mut odd_top = PortPool::new(65531..=65535);
        assert_eq!(drain(&mut odd_top, now), vec![pair(65531), pair(65533)]);

        // A pair that would extend past 65535 is never part of the pool.
        assert!(!full.release(pair(65535)));
        assert_eq!(full.allocate(now), Some(pair(0)));
    }

    #[test]
    fn no_pair_handed_out_twice_and_exhaustion_returns_none() {
        let now = Instant::now();
        let mut pool = PortPool::new(40000..=40019);
        let got = drain(&mut pool, now);
        assert_eq!(got.len(), 10);
        let unique: BTreeSet<_> = got.iter().copied().collect();
        assert_eq!(unique.len(), 10);
        assert!(got.iter().all(|p| pool.is_allocated(*p)));
        assert_eq!(pool.in_use(), 10);
        assert_eq!(pool.allocate(now), None);
        assert_eq!(pool.allocate(now), None);
        pool.check_invariants();
    }

    #[test]
    fn release_then_reallocate() {
        let now = Instant::now();
        let mut pool = PortPool::new(40000..=40003);
        let a = pool.allocate(now);
        let b = pool.allocate(now);
        assert_eq!((a, b), (Some(pair(40000)), Some(pair(40002))));
        assert_eq!(pool.allocate(now), None);
        assert!(pool.release(pair(40000)));
        assert!(!pool.release(pair(40000)), "double release must be refused");
        assert!(!pool.is_allocated(pair(40000)));
        assert_eq!(pool.in_use(), 1);
        assert_eq!(pool.allocate(now), Some(pair(40000)));
        pool.check_invariants();
    }

    #[test]
    fn release_rejects_foreign_and_misaligned_pairs() {
        let now = Instant::now();
        let mut pool = PortPool::new(40000..=40009);
        let held = pool.allocate(now);
        assert_eq!(held, Some(pair(40000)));
        for foreign in [39998, 40001, 40010, 0, 65535] {
            assert!(!pool.release(pair(foreign)), "released {foreign}");
            assert!(!pool.quarantine(pair(foreign), now), "quarantined {foreign}");
            assert!(!pool.is_allocated(pair(foreign)));
        }
        // Free but never allocated: also refused.
        assert!(!pool.release(pair(40002)));
        assert_eq!(pool.in_use(), 1);
        pool.check_invariants();
    }

    #[test]
    fn round_robin_skips_just_released_pair() {
        let now = Instant::now();
        let mut pool = PortPool::new(40000..=40007);
        let a = pool.allocate(now);
        let b = pool.allocate(now);
        assert_eq!((a, b), (Some(pair(40000)), Some(pair(40002))));
        assert!(pool.release(pair(40002)));
        // 40002 is free again but rests while 40004 and 40006 are free.
        assert_eq!(pool.allocate(now), Some(pair(40004)));
        assert!(pool.release(pair(40004)));
        assert_eq!(pool.allocate(now), Some(pair(40006)));
        // Wraps around to the oldest free pair.
        assert_eq!(pool.allocate(now), Some(pair(40002)));
        assert_eq!(pool.allocate(now), Some(pair(40004)));
        assert_eq!(pool.allocate(now), None);
        pool.check_invariants();
    }

    #[test]
    fn quarantine_blocks_until_expiry() {
        let t0 = Instant::now();
        let until = t0 + Duration::from_secs(5);
        let mut pool = PortPool::new(40000..=40003);
        assert_eq!(pool.allocate(t0), Some(pair(40000)));
        assert!(pool.quarantine(pair(40000), until));
        assert!(!pool.quarantine(pair(40000), until), "not allocated any more");
        assert!(!pool.release(pair(40000)), "a quarantined pair cannot be released");
        assert!(!pool.is_allocated(pair(40000)));
        assert_eq!(pool.in_use(), 0);
        assert_eq!(pool.quarantined(t0), 1);
        assert_eq!(pool.next_unquarantine(), Some(until));
        pool.check_invariants();

        assert_eq!(pool.allocate(t0), Some(pair(40002)));
        // Exhausted only by quarantine.
        assert_eq!(pool.allocate(t0 + Duration::from_secs(4)), None);
        assert_eq!(pool.quarantined(until - Duration::from_millis(1)), 1);
        // The deadline itself counts as usable.
        assert_eq!(pool.quarantined(until), 0);
        assert_eq!(pool.allocate(until), Some(pair(40000)));
        assert_eq!(pool.next_unquarantine(), None);
        assert_eq!(pool.quarantined(until), 0);
        pool.check_invariants();
    }

    #[test]
    fn next_unquarantine_is_the_earliest_deadline() {
        let t0 = Instant::now();
        let mut pool = PortPool::new(40000..=40005);
        let held = drain(&mut pool, t0);
        assert_eq!(held.len(), 3);
        assert!(pool.quarantine(held[0], t0 + Duration::from_secs(9)));
        assert!(pool.quarantine(held[1], t0 + Duration::from_secs(3)));
        assert!(pool.quarantine(held[2], t0 + Duration::from_secs(6)));
        assert_eq!(pool.next_unquarantine(), Some(t0 + Duration::from_secs(3)));
        assert_eq!(pool.quarantined(t0 + Duration::from_secs(4)), 2);
        assert_eq!(pool.allocate(t0 + Duration::from_secs(4)), Some(held[1]));
        assert_eq!(pool.next_unquarantine(), Some(t0 + Duration::from_secs(6)));
        pool.check_invariants();
    }

    // ---------------------------------------------------------------------------------------------
    // Model test: the pool against a slow, obviously correct reference.

    /// Which pair an operation targets.
    #[derive(Debug, Clone)]
    enum Target {
        /// The pair at this index (modulo the count) among the pairs the model says are held.
        Held(usize),
        /// A pair with this video port, which may be foreign, misaligned or free.
        Port(u16),
    }

    #[derive(Debug, Clone)]
    enum Op {
        Advance(u64),
        Allocate,
        Quarantine(Target, u64),
        Release(Target),
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum State {
        Allocated,
        Free,
        Quarantined(Instant),
    }

    /// The reference: every pair in a map, round-robin written as "first free pair after the
    /// last one, else the first free pair".
    struct Model {
        pairs: BTreeMap<PortPair, State>,
        last: Option<PortPair>,
    }

    impl Model {
        fn new(start: u16, end: u16) -> Self {
            let mut pairs = BTreeMap::new();
            let mut video = u32::from(start);
            while video < u32::from(end) {
                if let Ok(v) = u16::try_from(video) {
                    pairs.insert(pair(v), State::Free);
                }
                video += 2;
            }
            Self { pairs, last: None }
        }

        fn allocate(&mut self, now: Instant) -> Option<PortPair> {
            for state in self.pairs.values_mut() {
                if matches!(*state, State::Quarantined(until) if until <= now) {
                    *state = State::Free;
                }
            }
            let free = |(p, s): (&PortPair, &State)| (*s == State::Free).then_some(*p);
            let after = self
                .pairs
                .iter()
                .filter(|(p, _)| self.last.is_none_or(|last| **p > last))
                .find_map(free);
            let chosen = after.or_else(|| self.pairs.iter().find_map(free))?;
            self.pairs.insert(chosen, State::Allocated);
            self.last = Some(chosen);
            Some(chosen)
        }

        fn set_if_allocated(&mut self, p: PortPair, state: State) -> bool {
            match self.pairs.get_mut(&p) {
                Some(s) if *s == State::Allocated => {
                    *s = state;
                    true
                }
                _ => false,
            }
        }

        fn held(&self) -> Vec<PortPair> {
            self.pairs.iter().filter(|(_, s)| **s == State::Allocated).map(|(p, _)| *p).collect()
        }

        fn resolve(&self, target: &Target) -> PortPair {
            match *target {
                Target::Held(i) => {
                    let held = self.held();
                    if held.is_empty() { pair(0) } else { held[i % held.len()] }
                }
                Target::Port(video) => pair(video),
            }
        }

        fn quarantined(&self, now: Instant) -> usize {
            self.pairs
                .values()
                .filter(|s| matches!(**s, State::Quarantined(until) if until > now))
                .count()
        }

        fn next_unquarantine(&self) -> Option<Instant> {
            self.pairs
                .values()
                .filter_map(|s| match *s {
                    State::Quarantined(until) => Some(until),
                    _ => None,
                })
                .min()
        }
    }

    fn target(start: u16, len: u16) -> impl Strategy<Value = Target> {
        // Random ports reach a little outside the range on both sides.
        let lo = start.saturating_sub(3);
        let hi = start.saturating_add(len).saturating_add(3);
        prop_oneof![
            3 => (0usize..16).prop_map(Target::Held),
            1 => (lo..=hi).prop_map(Target::Port),
        ]
    }

    fn op(start: u16, len: u16) -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => Just(Op::Allocate),
            3 => target(start, len).prop_map(Op::Release),
            2 => (target(start, len), 0u64..2_000).prop_map(|(t, ms)| Op::Quarantine(t, ms)),
            2 => (0u64..1_500).prop_map(Op::Advance),
        ]
    }

    fn scenario() -> impl Strategy<Value = (u16, u16, Vec<Op>)> {
        // Small ranges make exhaustion and wrap-around common; some sit at the top of u16.
        let start = prop_oneof![3 => 40000u16..40004, 1 => 65520u16..=65535, 1 => 0u16..4];
        (start, 0u16..14).prop_flat_map(|(start, len)| {
            let end = start.saturating_add(len);
            let len = end - start;
            (Just(start), Just(end), proptest::collection::vec(op(start, len), 0..200))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn pool_matches_model((start, end, ops) in scenario()) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut pool = PortPool::new(start..=end);
            let mut model = Model::new(start, end);
            prop_assert_eq!(pool.capacity(), model.pairs.len());
            pool.check_invariants();

            for (step, op) in ops.iter().enumerate() {
                match op {
                    Op::Advance(ms) => now += Duration::from_millis(*ms),
                    Op::Allocate => {
                        let got = pool.allocate(now);
                        let want = model.allocate(now);
                        prop_assert_eq!(got, want, "step {} {:?}", step, op);
                    }
                    Op::Release(t) => {
                        let p = model.resolve(t);
                        let got = pool.release(p);
                        let want = model.set_if_allocated(p, State::Free);
                        prop_assert_eq!(got, want, "step {} {:?} on {}", step, op, p);
                    }
                    Op::Quarantine(t, ms) => {
                        let p = model.resolve(t);
                        let until = now + Duration::from_millis(*ms);
                        let got = pool.quarantine(p, until);
                        let want = model.set_if_allocated(p, State::Quarantined(until));
                        prop_assert_eq!(got, want, "step {} {:?} on {}", step, op, p);
                    }
                }
                pool.check_invariants();
                let held = model.held();
                prop_assert_eq!(pool.in_use(), held.len(), "step {} {:?}", step, op);
                prop_assert_eq!(pool.quarantined(now), model.quarantined(now), "step {}", step);
                prop_assert_eq!(pool.next_unquarantine(), model.next_unquarantine());
                for (p, s) in &model.pairs {
                    prop_assert_eq!(pool.is_allocated(*p), *s == State::Allocated, "pair {}", p);
                }
            }
        }
    }
    #[test]
    fn blocks_of_four_keep_the_senders_ports_out_of_other_pairs() {
        let now = Instant::now();
        let mut pool = PortPool::with_stride(40000..=40010, PortPool::STREAM_BLOCK);
        assert_eq!(pool.capacity(), 2, "a block needs all four ports in the range");
        let a =
            pool.allocate(now).map(|p| (p.video, p.audio(), p.video_source(), p.audio_source()));
        assert_eq!(a, Some((40000, 40001, 40002, 40003)));
        assert_eq!(pool.allocate(now), Some(pair(40004)));
        assert_eq!(pool.allocate(now), None);
        assert!(!pool.is_allocated(pair(40002)) && !pool.release(pair(40002)));
        assert!(pool.release(pair(40000)));
        pool.check_invariants();
        assert_eq!(PortPool::with_stride(40000..=40003, 1).capacity(), 2, "at least pairs");
    }
}
