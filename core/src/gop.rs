//! The GOP cache: each stream's video since its last keyframe, which starts a joining viewer
//! at once (FFmpeg makes no keyframe on request) and answers a viewer's keyframe request.

use crate::packet::SourcePacket;

/// The video packets since the last keyframe (SPS/IDR start), so that a new viewer can start
/// with a picture at once instead of waiting for FFmpeg's next keyframe (which no viewer can
/// request). Bounded; a GOP too long for the bounds is not cached.
#[derive(Debug, Default)]
pub(crate) struct GopCache {
    pub(crate) packets: Vec<SourcePacket>,
    bytes: usize,
    /// RTP timestamp of the keyframe being cached; `None` until one starts.
    keyframe_ts: Option<u32>,
    /// The payload rate of the last whole GOP, in bytes per second of its RTP clock.
    rate: Option<u64>,
}

impl GopCache {
    /// Most packets kept (about 2 s of a 5 Mbit/s stream).
    pub(crate) const MAX_PACKETS: usize = 1024;
    /// Most payload bytes kept.
    pub(crate) const MAX_BYTES: usize = 1 << 20;

    pub(crate) fn push(&mut self, pkt: &SourcePacket) {
        if pkt.restart {
            self.clear();
            self.rate = None;
        }
        if pkt.keyframe_start && self.keyframe_ts != Some(pkt.timestamp) {
            if let Some(start) = self.keyframe_ts {
                // A whole GOP: its bytes over its length on the 90 kHz clock.
                let ticks = u64::from(pkt.timestamp.wrapping_sub(start));
                if ticks > 0 && ticks < 90_000 * 60 {
                    self.rate = Some(self.bytes as u64 * 90_000 / ticks);
                }
            }
            self.clear();
            self.keyframe_ts = Some(pkt.timestamp);
        }
        if self.keyframe_ts.is_none() {
            return;
        }
        if self.packets.len() >= Self::MAX_PACKETS
            || self.bytes + pkt.payload.len() > Self::MAX_BYTES
        {
            // Too long a GOP: nothing until the next keyframe.
            self.clear();
            self.rate = None;
            return;
        }
        self.bytes += pkt.payload.len();
        self.packets.push(pkt.clone());
    }

    pub(crate) fn clear(&mut self) {
        self.packets.clear();
        self.bytes = 0;
        self.keyframe_ts = None;
    }

    /// The payload rate of the last whole GOP cached, in bytes per second (`None` before one,
    /// after a source restart, or for a GOP too long to cache).
    pub(crate) fn rate(&self) -> Option<u64> {
        self.rate
    }

    /// Frames cached (distinct RTP timestamps).
    fn frames(&self) -> u32 {
        let mut n = 0u32;
        let mut last = None;
        for p in &self.packets {
            if last != Some(p.timestamp) {
                n += 1;
                last = Some(p.timestamp);
            }
        }
        n
    }

    /// The cached packets, frame `i` (0 the keyframe) with the RTP timestamp `ts(i)`.
    fn retimed<'a>(
        &'a self,
        ts: impl Fn(u32) -> u32 + 'a,
    ) -> impl Iterator<Item = SourcePacket> + 'a {
        let mut index = 0u32;
        let mut last = None;
        self.packets.iter().map(move |p| {
            if last.is_some() && last != Some(p.timestamp) {
                index += 1;
            }
            last = Some(p.timestamp);
            SourcePacket { timestamp: ts(index), ..p.clone() }
        })
    }

    /// The cached packets with their RTP timestamps moved forward so that the frames sit 1 ms
    /// apart right before the newest one, which keeps its own: a player decodes the burst at
    /// once and then continues with the live packets without being a GOP behind.
    pub(crate) fn primed(&self) -> impl Iterator<Item = SourcePacket> + '_ {
        let frames = self.frames();
        let newest = self.packets.last().map_or(0, |p| p.timestamp);
        self.retimed(move |i| {
            let behind = frames.saturating_sub(1).saturating_sub(i);
            newest.wrapping_sub(behind * PRIME_STEP)
        })
    }

    /// The offset to add to [`primed`](Self::primed)'s timestamps so that they come after
    /// `after` (a viewer's last timestamp, in another rendition's rebased clock): the first
    /// primed frame a frame after it, and the live frames after the cache continuing from
    /// there. For a viewer moved to this rendition with its cache.
    pub(crate) fn offset_after(&self, after: u32) -> u32 {
        let newest = self.packets.last().map_or(0, |p| p.timestamp);
        after
            .wrapping_add(DEFAULT_FRAME_TICKS)
            .wrapping_add(self.frames() * PRIME_STEP)
            .wrapping_sub(newest)
    }

    /// Whether the cache ends with a whole frame (its last packet has the marker bit), so that
    /// [`replayed`](Self::replayed) cuts no frame in two.
    pub(crate) fn ends_a_frame(&self) -> bool {
        self.packets.last().is_some_and(|p| p.marker)
    }

    /// The cached packets again, for a viewer that has had them and lost one (it asked for a
    /// keyframe), after `after`, the last RTP timestamp it was sent: the frames sit evenly
    /// between `after` and the next live frame's expected timestamp (the newest cached one
    /// plus the GOP's mean frame interval), at most 1 ms apart, so that timestamps keep going
    /// forward and the live frames that follow are still later.
    pub(crate) fn replayed(&self, after: u32) -> impl Iterator<Item = SourcePacket> + '_ {
        let frames = self.frames().max(1);
        let first = self.packets.first().map_or(0, |p| p.timestamp);
        let newest = self.packets.last().map_or(0, |p| p.timestamp);
        let interval = match newest.wrapping_sub(first) / frames.saturating_sub(1).max(1) {
            0 => DEFAULT_FRAME_TICKS,
            n => n,
        };
        // Ticks from `after` to the next live frame; none (`after` beyond it) packs the frames
        // one tick apart.
        let room = i64::from(newest.wrapping_add(interval).wrapping_sub(after) as i32).max(0);
        let step = u32::try_from(room / i64::from(frames + 1)).unwrap_or(1).clamp(1, PRIME_STEP);
        self.retimed(move |i| after.wrapping_add((i + 1) * step))
    }
}

/// Frames of a primed GOP sit this far apart: 1 ms at 90 kHz.
const PRIME_STEP: u32 = 90;

/// A frame's duration in 90 kHz ticks when the cache cannot tell (one frame): 30 fps.
const DEFAULT_FRAME_TICKS: u32 = 3000;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use str0m::media::MediaKind;

    use super::*;

    /// A cache of `frames` frames of `per_frame` packets, 3000 ticks apart from `ts0`.
    fn cache(frames: u32, per_frame: u64, ts0: u32) -> GopCache {
        let mut gop = GopCache::default();
        let mut seq = 100;
        for f in 0..frames {
            for i in 0..per_frame {
                gop.push(&SourcePacket {
                    kind: MediaKind::Video,
                    rendition: 0,
                    seq,
                    restart: false,
                    timestamp: ts0.wrapping_add(f * 3000),
                    marker: i + 1 == per_frame,
                    keyframe_start: f == 0 && i == 0,
                    payload: Arc::from(vec![0u8; 100]),
                });
                seq += 1;
            }
        }
        gop
    }

    fn frame_timestamps(packets: impl Iterator<Item = SourcePacket>) -> Vec<u32> {
        let mut ts: Vec<u32> = packets.map(|p| p.timestamp).collect();
        ts.dedup();
        ts
    }

    #[test]
    fn primed_frames_end_at_the_newest_timestamp_one_millisecond_apart() {
        let gop = cache(10, 3, u32::MAX - 10_000);
        let newest = gop.packets.last().map(|p| p.timestamp).unwrap_or_default();
        let ts = frame_timestamps(gop.primed());
        assert_eq!(ts.len(), 10);
        assert_eq!(ts.last(), Some(&newest));
        assert!(ts.windows(2).all(|w| w[1].wrapping_sub(w[0]) == PRIME_STEP));
        assert!(gop.ends_a_frame());
    }

    #[test]
    fn replayed_frames_sit_after_the_viewers_last_timestamp_and_before_the_next_live_one() {
        for (frames, ts0) in [(1, 0), (10, 5), (60, u32::MAX - 100_000), (500, 7)] {
            let gop = cache(frames, 2, ts0);
            let newest = gop.packets.last().map(|p| p.timestamp).unwrap_or_default();
            let next_live = newest.wrapping_add(3000);
            let ts = frame_timestamps(gop.replayed(newest));
            assert_eq!(ts.len(), frames as usize, "one timestamp per frame");
            let mut last = newest;
            for t in ts {
                let d = t.wrapping_sub(last) as i32;
                assert!((1..=PRIME_STEP as i32).contains(&d), "{frames} frames: step {d}");
                assert!((next_live.wrapping_sub(t) as i32) > 0, "{frames} frames: {t} too late");
                last = t;
            }
        }
    }

    #[test]
    fn replayed_after_a_later_timestamp_still_goes_forward() {
        let gop = cache(5, 1, 1000);
        let ts = frame_timestamps(gop.replayed(1_000_000));
        assert_eq!(ts, vec![1_000_001, 1_000_002, 1_000_003, 1_000_004, 1_000_005]);
    }

    #[test]
    fn a_cache_mid_frame_does_not_end_a_frame() {
        let mut gop = cache(3, 2, 0);
        gop.packets.pop();
        assert!(!gop.ends_a_frame());
        assert!(!GopCache::default().ends_a_frame());
    }
}
