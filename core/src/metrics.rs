//! Counters the core keeps; runtimes render them (e.g. as Prometheus text).

use std::collections::BTreeMap;
use std::time::Duration;

/// Monotonic counters since the core was created. Never labelled by session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metrics {
    /// HTTP requests by (route, method, status). Route is `endpoint`, `session` or `other`.
    pub requests: BTreeMap<(&'static str, String, u16), u64>,
    /// Rejected requests by [`Reject::reason`](crate::whep::Reject::reason).
    pub rejections: BTreeMap<&'static str, u64>,
    /// POSTs refused by the per-stream or total viewer cap.
    pub cap_rejections: u64,
    /// Viewers created by a POST.
    pub viewers_joined: u64,
    /// Viewers whose ICE and DTLS completed.
    pub viewers_connected: u64,
    /// Viewers removed, for any reason.
    pub viewers_left: u64,
    /// Viewers that never connected or whose ICE agent lost them.
    pub ice_failures: u64,
    /// Of those, viewers closed because they sent no ICE check within
    /// [`CoreConfig::first_check_timeout`](crate::CoreConfig::first_check_timeout).
    pub unchecked_sessions: u64,
    /// ICE checks dropped because their session already had
    /// [`CoreConfig::max_viewer_addresses`](crate::CoreConfig::max_viewer_addresses) source addresses.
    pub addresses_refused: u64,
    /// Keyframe requests (PLI/FIR) received from viewers; FFmpeg cannot honour them.
    pub keyframe_requests: u64,
    /// Keyframe requests answered from the GOP cache
    /// ([`CoreConfig::cached_keyframe_interval`](crate::CoreConfig::cached_keyframe_interval)).
    pub cached_keyframes: u64,
    /// Viewers whose first DTLS nominated the pair it came on (see `crate::path`).
    pub early_nominations: u64,
    /// Viewers whose media moved to a new address of theirs (a NAT rebinding).
    pub path_moves: u64,
    /// Viewers moved between renditions of their codec (a bitrate ladder's rungs).
    pub rendition_switches: u64,
    /// Times a lossy viewer with no lower rung was put on keyframes only.
    pub keyframes_only: u64,
    /// Viewers whose video was paced once their receiver reports showed loss.
    pub paced_viewers: u64,
    /// Viewers started on the rung and pace an earlier session from their address was left
    /// on ([`CoreConfig::path_memory`](crate::CoreConfig::path_memory)).
    pub known_path_starts: u64,
    /// Viewers started with the cached GOP instead of waiting for the next keyframe.
    pub gop_primes: u64,
    /// Paced backlogs (a prime's, or a paced viewer's live video) that outgrew their cap (the
    /// viewer fell behind live) and were dropped.
    pub prime_backlogs_dropped: u64,
    /// Video packets str0m retransmitted to viewers that NACKed them.
    pub packets_retransmitted: u64,
    /// Datagram bytes of those retransmissions.
    pub bytes_retransmitted: u64,
    /// Retransmissions dropped because they exceeded a viewer's share
    /// ([`CoreConfig::rtx_ratio_cap`](crate::CoreConfig::rtx_ratio_cap)).
    pub retransmissions_dropped: u64,
    /// Times a viewer's retransmissions were turned off for exceeding that share.
    pub retransmission_suspensions: u64,
    /// Restarts of supervised FFmpeg processes.
    pub process_restarts: u64,
    /// Packets a sharded leader dropped for a follower shard that fell thousands of messages
    /// behind (its viewers restart video at the next keyframe).
    pub mirror_packets_dropped: u64,
    /// TCP connections accepted for ICE-TCP.
    pub tcp_accepted: u64,
    /// TCP connections closed at once: over [`CoreConfig::max_tcp_connections`](crate::CoreConfig::max_tcp_connections), or no TCP candidate.
    pub tcp_refused: u64,
    /// TCP connections closed because no check named a viewer within
    /// [`CoreConfig::tcp_bind_timeout`](crate::CoreConfig::tcp_bind_timeout).
    pub tcp_unbound_closed: u64,
    /// TCP connections closed for bytes that are not RFC 4571 framing.
    pub tcp_framing_errors: u64,
    /// RFC 4571 frames received.
    pub tcp_frames_in: u64,
    /// Frames dropped whole by the runtime for a viewer whose TCP send queue was full
    /// ([`Input::TcpDropped`](crate::Input::TcpDropped)).
    pub tcp_frames_dropped: u64,
    /// Times the public address learned from STUN changed (the first one learned not counted;
    /// [`CoreConfig::stun_servers`](crate::CoreConfig::stun_servers)).
    pub stun_mapped_changes: u64,
    /// STUN transactions that failed: no answer after every retransmission, or an error
    /// response.
    pub stun_failures: u64,
    /// Datagrams from FFmpeg on ingest ports.
    pub ingest_packets: u64,
    /// RTCP from FFmpeg, dropped.
    pub ingest_rtcp: u64,
    /// Malformed or oversized datagrams, or datagrams on unknown ports, dropped.
    pub ingest_dropped: u64,
    /// Datagrams on a stream's ingest ports from another sender than its FFmpeg (or, for an
    /// external feed, than the sender it accepts), dropped.
    pub ingest_rejected: u64,
    /// Datagrams on the viewer socket.
    pub datagrams_in: u64,
    /// Viewer-socket datagrams that matched no viewer or were not WebRTC.
    pub datagrams_dropped: u64,
    /// RTP packets written to viewers (one per viewer per source packet).
    pub packets_forwarded: u64,
    /// Payload bytes written to viewers.
    pub bytes_forwarded: u64,
    /// Time from an RTP packet's arrival on an ingest socket (the kernel's receive timestamp
    /// where the runtime has one, else its read) to the end of sending its copies to every
    /// viewer, as measured and reported by the runtime
    /// ([`Core::record_egress_latency`](crate::Core::record_egress_latency)).
    pub egress_latency: LatencyHistogram,
    /// The same from the arrival to the sending of each viewer's copy, every copy counted:
    /// what a typical viewer waits, where [`egress_latency`](Self::egress_latency) is the
    /// last one's wait
    /// ([`Core::record_copy_latency`](crate::Core::record_copy_latency)).
    pub copy_latency: LatencyHistogram,
}

impl Metrics {
    /// Adds `other`'s counts to these (the shards of one server).
    pub fn merge(&mut self, other: &Self) {
        for (k, n) in &other.requests {
            *self.requests.entry(k.clone()).or_default() += n;
        }
        for (k, n) in &other.rejections {
            *self.rejections.entry(k).or_default() += n;
        }
        let Self {
            requests: _,
            rejections: _,
            cap_rejections,
            viewers_joined,
            viewers_connected,
            viewers_left,
            ice_failures,
            unchecked_sessions,
            addresses_refused,
            keyframe_requests,
            cached_keyframes,
            early_nominations,
            path_moves,
            rendition_switches,
            keyframes_only,
            paced_viewers,
            known_path_starts,
            gop_primes,
            prime_backlogs_dropped,
            packets_retransmitted,
            bytes_retransmitted,
            retransmissions_dropped,
            retransmission_suspensions,
            process_restarts,
            mirror_packets_dropped,
            tcp_accepted,
            tcp_refused,
            tcp_unbound_closed,
            tcp_framing_errors,
            tcp_frames_in,
            tcp_frames_dropped,
            stun_mapped_changes,
            stun_failures,
            ingest_packets,
            ingest_rtcp,
            ingest_dropped,
            ingest_rejected,
            datagrams_in,
            datagrams_dropped,
            packets_forwarded,
            bytes_forwarded,
            egress_latency,
            copy_latency,
        } = other;
        self.cap_rejections += cap_rejections;
        self.viewers_joined += viewers_joined;
        self.viewers_connected += viewers_connected;
        self.viewers_left += viewers_left;
        self.ice_failures += ice_failures;
        self.unchecked_sessions += unchecked_sessions;
        self.addresses_refused += addresses_refused;
        self.keyframe_requests += keyframe_requests;
        self.cached_keyframes += cached_keyframes;
        self.early_nominations += early_nominations;
        self.path_moves += path_moves;
        self.rendition_switches += rendition_switches;
        self.keyframes_only += keyframes_only;
        self.paced_viewers += paced_viewers;
        self.known_path_starts += known_path_starts;
        self.gop_primes += gop_primes;
        self.prime_backlogs_dropped += prime_backlogs_dropped;
        self.packets_retransmitted += packets_retransmitted;
        self.bytes_retransmitted += bytes_retransmitted;
        self.retransmissions_dropped += retransmissions_dropped;
        self.retransmission_suspensions += retransmission_suspensions;
        self.process_restarts += process_restarts;
        self.mirror_packets_dropped += mirror_packets_dropped;
        self.tcp_accepted += tcp_accepted;
        self.tcp_refused += tcp_refused;
        self.tcp_unbound_closed += tcp_unbound_closed;
        self.tcp_framing_errors += tcp_framing_errors;
        self.tcp_frames_in += tcp_frames_in;
        self.tcp_frames_dropped += tcp_frames_dropped;
        self.stun_mapped_changes += stun_mapped_changes;
        self.stun_failures += stun_failures;
        self.ingest_packets += ingest_packets;
        self.ingest_rtcp += ingest_rtcp;
        self.ingest_dropped += ingest_dropped;
        self.ingest_rejected += ingest_rejected;
        self.datagrams_in += datagrams_in;
        self.datagrams_dropped += datagrams_dropped;
        self.packets_forwarded += packets_forwarded;
        self.bytes_forwarded += bytes_forwarded;
        self.egress_latency.merge(egress_latency);
        self.copy_latency.merge(copy_latency);
    }
}

/// Buckets per doubling of [`LatencyHistogram`].
const STEPS_PER_OCTAVE: u32 = 4;
/// Finite buckets: upper bounds 2^(k/4) µs for k = 0..80, i.e. 1 µs to about 1 s.
const BUCKETS: usize = 80;

/// A histogram of durations with logarithmic buckets (four per doubling, 1 µs to 1 s, and one
/// for longer), so that quantiles are known within about 19 % at any scale and recording costs
/// one array increment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencyHistogram {
    counts: [u64; BUCKETS + 1],
    sum_ns: u128,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self { counts: [0; BUCKETS + 1], sum_ns: 0 }
    }
}

impl LatencyHistogram {
    /// Counts one duration.
    pub fn record(&mut self, d: Duration) {
        self.record_n(d, 1);
    }

    /// Counts `n` equal durations.
    pub fn record_n(&mut self, d: Duration, n: u64) {
        let us = d.as_secs_f64() * 1e6;
        let k = if us <= 1.0 {
            0
        } else {
            // Smallest k with 2^(k/4) >= us.
            let k = (f64::from(STEPS_PER_OCTAVE) * us.log2()).ceil();
            if k >= BUCKETS as f64 { BUCKETS } else { k as usize }
        };
        self.counts[k] += n;
        self.sum_ns += d.as_nanos() * u128::from(n);
    }

    /// Durations recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Their sum.
    pub fn sum(&self) -> Duration {
        Duration::from_nanos(u64::try_from(self.sum_ns).unwrap_or(u64::MAX))
    }

    /// The upper bound of finite bucket `k` (`None` for the last, unbounded one).
    pub fn bound(k: usize) -> Option<Duration> {
        (k < BUCKETS).then(|| {
            Duration::from_secs_f64(2f64.powf(k as f64 / f64::from(STEPS_PER_OCTAVE)) / 1e6)
        })
    }

    /// `(upper bound, cumulative count)` per bucket, the last with no bound (+Inf).
    pub fn buckets(&self) -> impl Iterator<Item = (Option<Duration>, u64)> + '_ {
        self.counts.iter().enumerate().scan(0u64, |acc, (k, n)| {
            *acc += n;
            Some((Self::bound(k), *acc))
        })
    }

    /// The `q` quantile (0..=1), interpolated linearly inside its bucket; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        Self::quantile_of(self.counts.iter().enumerate().map(|(k, n)| (Self::bound(k), *n)), q)
    }

    /// Adds what `other` recorded.
    pub fn merge(&mut self, other: &Self) {
        for (c, o) in self.counts.iter_mut().zip(other.counts) {
            *c += o;
        }
        self.sum_ns += other.sum_ns;
    }

    /// What was recorded since `earlier`, a snapshot of this histogram.
    pub fn since(&self, earlier: &Self) -> Self {
        let mut d = self.clone();
        for (c, e) in d.counts.iter_mut().zip(earlier.counts) {
            *c = c.saturating_sub(e);
        }
        d.sum_ns = d.sum_ns.saturating_sub(earlier.sum_ns);
        d
    }

    /// The `q` quantile of `(upper bound, count)` buckets in increasing order (the last may be
    /// unbounded), interpolated linearly inside the bucket it falls in, as Prometheus'
    /// `histogram_quantile` does (per-bucket counts, not cumulative ones).
    pub fn quantile_of(
        buckets: impl IntoIterator<Item = (Option<Duration>, u64)>,
        q: f64,
    ) -> Option<Duration> {
        let buckets: Vec<_> = buckets.into_iter().collect();
        let total: u64 = buckets.iter().map(|(_, n)| n).sum();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let (mut below, mut lower) = (0u64, Duration::ZERO);
        for (bound, n) in buckets {
            if n > 0 && (below + n) as f64 >= rank {
                let Some(upper) = bound else { return Some(lower) };
                let within = ((rank - below as f64) / n as f64).clamp(0.0, 1.0);
                return Some(lower + (upper - lower).mul_f64(within));
            }
            below += n;
            if let Some(b) = bound {
                lower = b;
            }
        }
        Some(lower)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_quantiles() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.quantile(0.5), None);
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.count(), 1000);
        let p50 = h.quantile(0.5).unwrap_or_default().as_secs_f64() * 1e6;
        let p99 = h.quantile(0.99).unwrap_or_default().as_secs_f64() * 1e6;
        assert!((420.0..600.0).contains(&p50), "p50 {p50}");
        assert!((900.0..1100.0).contains(&p99), "p99 {p99}");
        // Every duration lands in a bucket whose bound is at least it, and at most 19 % more.
        for k in 1..BUCKETS {
            let (lo, hi) = (LatencyHistogram::bound(k - 1), LatencyHistogram::bound(k));
            let (lo, hi) = (lo.unwrap_or_default(), hi.unwrap_or_default());
            assert!(hi > lo && hi.as_secs_f64() / lo.as_secs_f64() < 1.19 + 1e-9);
        }
        h.record(Duration::from_secs(5));
        assert_eq!(h.buckets().last(), Some((None, 1001)));
        let before = h.clone();
        h.record(Duration::from_micros(10));
        let d = h.since(&before);
        assert_eq!(d.count(), 1);
        let p = d.quantile(0.5).unwrap_or_default().as_secs_f64() * 1e6;
        assert!((9.0..=12.0).contains(&p), "{p}");
    }
}
