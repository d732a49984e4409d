//! The backlog of a viewer being primed with the cached GOP: video held back and released
//! through a token bucket ([`PrimePacing`]). Pure bookkeeping, no str0m: the viewer writes what
//! [`Backlog::release`] hands out and the core wakes it at [`Backlog::next_release`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::packet::SourcePacket;

/// Pacing of the cached GOP to a viewer that just connected (see [`CoreConfig::gop_cache`](crate::CoreConfig::gop_cache)).
///
/// The keyframe that starts the cache (SPS, PPS, IDR: every packet with the first timestamp)
/// leaves at once, as a live keyframe does, so the first picture is not delayed. The rest of
/// the cache then leaves through a token bucket of [`rate`](Self::rate) bytes per second and
/// [`burst`](Self::burst) bytes of depth (which the keyframe draws on first), counted in RTP
/// payload bytes. Video that arrives live meanwhile queues behind it for that viewer, so its
/// sequence numbers and timestamps continue without a gap; audio is not held back.
///
/// A budget in bytes rather than a multiple of the stream's rate, because what overflows is
/// byte-sized (router queues, the viewer's socket buffer) and the stream's rate is unknown
/// right after a keyframe. The rate must exceed the stream's own, or the backlog never drains:
/// it then reaches [`max_pending`](Self::max_pending), is dropped, and that viewer's video
/// restarts at the next live keyframe. With the defaults, `burst + rate × RTT` stays within
/// the retransmission cache ([`CoreConfig::rtx_cache_packets`](crate::CoreConfig::rtx_cache_packets), 256 packets of about 1.1 kB) for
/// round trips up to about 200 ms, so a lost fragment of the keyframe can still be resent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrimePacing {
    /// Sustained rate in RTP payload bytes per second (default 1 000 000, 8 Mbit/s). A 2 s GOP
    /// of a 2 Mbit/s stream (500 kB) is caught up about 0.6 s after the first picture.
    pub rate: u64,
    /// Depth of the bucket in bytes (default 64 KiB): what may leave at once, keyframe included.
    pub burst: u64,
    /// Most video packets held back per viewer (default 2048, twice the largest cache). The
    /// queue shares payloads with the stream, so a full queue costs about 100 kB of
    /// bookkeeping and keeps at most `max_pending` × 1.5 kB of payload alive. A cache larger
    /// than this is not used (the viewer waits for the next keyframe); beyond it the backlog is
    /// dropped and the viewer's video restarts at the next keyframe.
    pub max_pending: usize,
}

impl Default for PrimePacing {
    fn default() -> Self {
        Self { rate: 1_000_000, burst: 64 * 1024, max_pending: 2048 }
    }
}

/// A viewer's live pacing, once its receiver reports showed loss: all of its video leaves
/// through a token bucket of [`rate`](Self::rate), a burst of [`LIVE_BURST`] deep, so that a
/// keyframe does not overflow a slow link's queue in one burst (a 1 Mbit/s link with 100 ms of
/// buffer holds 12.5 kB; a keyframe is often several times that). At most [`LIVE_QUEUE`] of
/// video at that rate waits; beyond it the queue is dropped and the viewer's video restarts at
/// the next keyframe (it is then moved down a rung by its next reports, or gets keyframes only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LivePacing {
    /// Bytes per second (RTP payload).
    pub(crate) rate: u64,
}

/// Depth of a viewer's live pacing bucket, in time at its rate: a P frame or two leave at
/// once, a keyframe is spread.
pub(crate) const LIVE_BURST: Duration = Duration::from_millis(20);

/// Most video a live-paced viewer's queue holds beyond what it started with, in time at its rate.
pub(crate) const LIVE_QUEUE: Duration = Duration::from_secs(1);

impl LivePacing {
    fn burst(self) -> u64 {
        ((self.rate as f64 * LIVE_BURST.as_secs_f64()) as u64).max(crate::rtp::MAX_PAYLOAD as u64)
    }

    fn queue_bytes(self) -> usize {
        (self.rate as f64 * LIVE_QUEUE.as_secs_f64()) as usize
    }
}

/// Shortest wait between two releases: the bucket is drained in steps of at least this much
/// budget, a few packets each, rather than with one wake-up per packet.
const TICK: Duration = Duration::from_millis(5);

/// Video packets waiting for one viewer, oldest first, and the bucket that lets them go.
#[derive(Debug)]
pub(crate) struct Backlog {
    queue: VecDeque<SourcePacket>,
    /// Packets at the head that leave whatever the tokens: the keyframe the cache starts with.
    lead: usize,
    /// Bytes per second.
    rate: f64,
    /// Bucket depth in bytes.
    burst: f64,
    /// Budget left; negative after a keyframe larger than the bucket, repaid before anything
    /// else leaves.
    tokens: f64,
    refilled: Instant,
    cap: usize,
    /// Payload bytes queued, and the most that may be ([`LivePacing`]; unbounded for a prime,
    /// whose cap is `cap` packets).
    bytes: usize,
    cap_bytes: usize,
}

/// What became of a packet offered to [`Backlog::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Push {
    /// Queued behind the backlog.
    Queued,
    /// The backlog is full: the caller drops it (and this packet) and re-gates the track.
    Full,
}

impl Backlog {
    /// A backlog holding `packets` (the primed cache), with a full bucket at `now`. `None` if
    /// they do not fit in `pacing.max_pending`.
    pub(crate) fn new(
        packets: impl IntoIterator<Item = SourcePacket>,
        pacing: &PrimePacing,
        now: Instant,
    ) -> Option<Self> {
        let queue: VecDeque<SourcePacket> = packets.into_iter().collect();
        if queue.len() > pacing.max_pending {
            return None;
        }
        let first = queue.front().map(|p| p.timestamp);
        let lead = queue.iter().take_while(|p| Some(p.timestamp) == first).count();
        // A zero rate would never drain; the bucket must hold the largest packet.
        let rate = pacing.rate.max(1) as f64;
        let burst = pacing.burst.max(crate::rtp::MAX_PAYLOAD as u64) as f64;
        let bytes = queue.iter().map(|p| p.payload.len()).sum();
        Some(Self {
            queue,
            lead,
            rate,
            burst,
            tokens: burst,
            refilled: now,
            cap: pacing.max_pending,
            bytes,
            cap_bytes: usize::MAX,
        })
    }

    /// A backlog of a live-paced viewer holding `packets` (a GOP sent again, or nothing), no
    /// packet exempt from the budget, live video queueing behind them up to [`LIVE_QUEUE`]
    /// more. `None` if they are more than `max_pending` packets.
    pub(crate) fn paced(
        packets: impl IntoIterator<Item = SourcePacket>,
        pacing: LivePacing,
        max_pending: usize,
        now: Instant,
    ) -> Option<Self> {
        let mut b = Self::new(
            packets,
            &PrimePacing { rate: pacing.rate, burst: pacing.burst(), max_pending },
            now,
        )?;
        b.lead = 0;
        b.cap_bytes = b.bytes + pacing.queue_bytes();
        Some(b)
    }

    /// Paces at `pacing` from now on, with what is queued.
    pub(crate) fn repace(&mut self, pacing: LivePacing) {
        self.rate = pacing.rate.max(1) as f64;
        self.burst = pacing.burst() as f64;
        self.tokens = self.tokens.min(self.burst);
        self.cap_bytes = self.bytes + pacing.queue_bytes();
    }

    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Drops what is queued, keeping the bucket.
    pub(crate) fn clear(&mut self) {
        self.queue.clear();
        self.lead = 0;
        self.bytes = 0;
        if self.cap_bytes != usize::MAX {
            self.cap_bytes = self.bytes_per_queue();
        }
    }

    /// Queues a live packet behind the backlog, unless it is full.
    pub(crate) fn push(&mut self, pkt: &SourcePacket) -> Push {
        if self.queue.len() >= self.cap || self.bytes + pkt.payload.len() > self.cap_bytes {
            return Push::Full;
        }
        self.bytes += pkt.payload.len();
        self.queue.push_back(pkt.clone());
        Push::Queued
    }

    /// The next packet, if the budget at `now` allows it.
    pub(crate) fn release(&mut self, now: Instant) -> Option<SourcePacket> {
        self.refill(now);
        let len = self.queue.front()?.payload.len() as f64;
        if self.lead == 0 && self.tokens < len {
            return None;
        }
        self.lead = self.lead.saturating_sub(1);
        self.tokens -= len;
        let pkt = self.queue.pop_front()?;
        self.bytes -= pkt.payload.len();
        // The queue is below its cap again once drained: repaced room is measured from here.
        if self.queue.is_empty() && self.cap_bytes != usize::MAX {
            self.cap_bytes = self.cap_bytes.min(self.bytes_per_queue());
        }
        Some(pkt)
    }

    /// When [`release`](Self::release) next hands out packets: once the budget covers the head
    /// packet and one [`TICK`] of rate, and a tick after the last release. `None` when empty.
    pub(crate) fn next_release(&self) -> Option<Instant> {
        let head = self.queue.front()?.payload.len() as f64;
        if self.lead > 0 {
            return Some(self.refilled);
        }
        let need = head.max((self.rate * TICK.as_secs_f64()).min(self.burst));
        let wait = ((need - self.tokens).max(0.0) / self.rate * 1e6).ceil() as u64;
        Some(self.refilled + Duration::from_micros(wait).max(TICK))
    }

    /// [`LIVE_QUEUE`] at the current rate.
    fn bytes_per_queue(&self) -> usize {
        (self.rate * LIVE_QUEUE.as_secs_f64()) as usize
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.refilled = self.refilled.max(now);
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests pick a real starting instant
mod tests {
    use std::sync::Arc;

    use str0m::media::MediaKind;

    use super::*;

    fn pkt(seq: u64, timestamp: u32, len: usize) -> SourcePacket {
        SourcePacket {
            kind: MediaKind::Video,
            rendition: 0,
            seq,
            restart: false,
            timestamp,
            marker: false,
            keyframe_start: seq == 0,
            payload: Arc::from(vec![0u8; len]),
        }
    }

    fn pacing(rate: u64, burst: u64, max_pending: usize) -> PrimePacing {
        PrimePacing { rate, burst, max_pending }
    }

    /// Releases everything due at `now`; returns the bytes.
    fn drain(b: &mut Backlog, now: Instant) -> usize {
        std::iter::from_fn(|| b.release(now)).map(|p| p.payload.len()).sum()
    }

    #[test]
    fn keyframe_leaves_at_once_even_beyond_the_burst_then_the_rate_applies() {
        let t0 = Instant::now();
        // A 40-packet keyframe (44 kB) over a 10 kB bucket, then 100 packets of later frames.
        let packets = (0..140).map(|i| pkt(i, if i < 40 { 0 } else { 3000 * (i as u32) }, 1100));
        let mut b = Backlog::new(packets, &pacing(100_000, 10_000, 1000), t0).expect("fits");
        assert_eq!(drain(&mut b, t0), 40 * 1100, "the keyframe, nothing more");
        // The debt (44 kB - 10 kB) is repaid at 100 kB/s before anything else leaves.
        let next = b.next_release().expect("more");
        assert!(next - t0 >= Duration::from_millis(340), "{:?}", next - t0);
        assert_eq!(drain(&mut b, next - Duration::from_millis(1)), 0);
        assert!(drain(&mut b, next) >= 1100);
        assert!(b.next_release().expect("more") > next, "no busy loop");
    }

    #[test]
    fn bytes_per_interval_stay_within_burst_plus_rate() {
        for rate in [200_000u64, 2_000_000] {
            let t0 = Instant::now();
            let burst = 20_000u64;
            let packets =
                (0..500).map(|i| pkt(i, 3000 * (i as u32 / 8), 1000 + (i as usize % 7) * 50));
            let mut b = Backlog::new(packets, &pacing(rate, burst, 1000), t0).expect("fits");
            let mut sent = Vec::new();
            let mut now = t0;
            while !b.is_empty() {
                let bytes = drain(&mut b, now);
                sent.push((now, bytes));
                let Some(next) = b.next_release() else { break };
                assert!(next > now, "next release not in the future");
                now = next;
            }
            // Every window [t, t + w) from every release instant carries at most
            // burst + rate × w (the lead frame here is 8 packets, well inside the burst).
            for (i, &(t, _)) in sent.iter().enumerate() {
                for w in [1, 5, 20, 100, 1000].map(Duration::from_millis) {
                    let bytes: usize =
                        sent[i..].iter().take_while(|(s, _)| *s < t + w).map(|(_, b)| b).sum();
                    let budget = burst as f64 + rate as f64 * w.as_secs_f64();
                    assert!(bytes as f64 <= budget + 1.0, "{bytes} B in {w:?} at {:?}", t - t0);
                }
            }
            // It took as long as the rate says, in steps of at least a tick (a few packets
            // each when the rate allows), not one wake-up per packet.
            let total: usize = sent.iter().map(|(_, b)| b).sum();
            let expect = (total as u64 - burst) as f64 / rate as f64;
            let took = (now - t0).as_secs_f64();
            assert!((took - expect).abs() < 0.01, "took {took} s, expected {expect} s");
            let ticks = (took / TICK.as_secs_f64()).ceil() as usize + 1;
            assert!(sent.len() <= ticks, "{} wake-ups in {took} s", sent.len());
        }
    }

    #[test]
    fn a_full_backlog_refuses_and_a_too_large_cache_is_not_taken() {
        let t0 = Instant::now();
        let mut b =
            Backlog::new((0..3).map(|i| pkt(i, 0, 100)), &pacing(1000, 2000, 4), t0).expect("fits");
        assert_eq!(b.push(&pkt(3, 3000, 100)), Push::Queued);
        assert_eq!(b.push(&pkt(4, 3000, 100)), Push::Full);
        assert_eq!(b.len(), 4);
        assert!(Backlog::new((0..5).map(|i| pkt(i, 0, 100)), &pacing(1000, 2000, 4), t0).is_none());
    }

    #[test]
    fn live_pacing_spreads_a_keyframe_and_caps_the_queue_in_time() {
        let t0 = Instant::now();
        let live = LivePacing { rate: 100_000 };
        let mut b = Backlog::paced([], live, 1000, t0).expect("empty fits");
        // A 22 kB keyframe: 2 kB (the 20 ms burst) at once, the rest at 100 kB/s.
        for i in 0..20 {
            assert_eq!(b.push(&pkt(i, 0, 1100)), Push::Queued);
        }
        assert_eq!(drain(&mut b, t0), 1100, "the burst, no more");
        let next = b.next_release().expect("more");
        assert!(next - t0 >= Duration::from_millis(5), "{:?}", next - t0);
        let mut now = t0;
        while let Some(next) = b.next_release() {
            now = next;
            drain(&mut b, now);
        }
        let took = now - t0;
        assert!(
            took >= Duration::from_millis(180) && took <= Duration::from_millis(215),
            "{took:?}"
        );
        // At most a second of video at the rate waits: 100 kB, then the queue is full.
        let mut queued = 0;
        while b.push(&pkt(100 + queued, 3000, 1000)) == Push::Queued {
            queued += 1;
        }
        assert_eq!(queued, 100);
        // A new rate keeps what waits and lets a second at that rate join it.
        b.repace(LivePacing { rate: 50_000 });
        let mut more = 0;
        while b.push(&pkt(1000 + more, 6000, 1000)) == Push::Queued {
            more += 1;
        }
        assert_eq!(more, 50);
        b.clear();
        assert!(b.is_empty());
        assert_eq!(b.push(&pkt(2000, 9000, 1000)), Push::Queued);
    }
}
