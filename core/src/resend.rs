//! A cap on how much of a viewer's video may be retransmissions.
//!
//! A viewer that NACKs without end (a broken or hostile player, or a link losing most packets)
//! could make the server resend its whole retransmission cache per NACK. str0m can cap the
//! share of retransmitted bytes itself, but it keeps a history entry for every packet sent in
//! the last second to do so (24 bytes a packet, about a fifth of a viewer's memory). This does
//! the same from the datagrams str0m hands out, with a few counters: the video and
//! retransmission (RTX) SSRCs are in the clear in an SRTP packet's header. When the
//! retransmitted share of the last half second to second exceeds the cap, the over-budget
//! datagram is dropped and the viewer turns its retransmission cache off until the window has
//! rolled past the burst, so that further NACKs cost nothing, not even the encryption.

use std::time::{Duration, Instant};

use str0m::rtp::Ssrc;

/// Length of one counting window; the ratio is taken over the current and the previous one.
const WINDOW: Duration = Duration::from_millis(500);

/// Retransmitted bytes always allowed within the two windows: a few lost packets of a
/// keyframe are repaired even when little else has been sent yet.
const ALLOWANCE: u64 = 24 * 1024;

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    /// Video bytes sent, retransmissions included.
    sent: u64,
    /// Retransmitted bytes sent.
    resent: u64,
}

/// What to do with one datagram str0m produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Not a retransmission, or one within the budget.
    Send,
    /// A retransmission over the budget: drop it. `suspend` is set on the first one, when the
    /// viewer should turn its retransmission cache off.
    Drop { suspend: bool },
}

/// Per-viewer retransmission accounting; see the module documentation.
#[derive(Debug)]
pub(crate) struct ResendBudget {
    video: u32,
    rtx: u32,
    cap: Option<f32>,
    /// Current and previous window.
    counts: [Counts; 2],
    window_start: Instant,
    /// Retransmission is off until then.
    suspended_until: Option<Instant>,
    /// Retransmissions sent and dropped since the core last collected them.
    pub(crate) resent_packets: u64,
    pub(crate) resent_bytes: u64,
    pub(crate) dropped: u64,
}

impl ResendBudget {
    /// A budget for the video stream `video` whose retransmissions go out on `rtx`, allowing
    /// retransmissions up to `cap` (0..1) of the video bytes; `None` only counts them.
    pub(crate) fn new(video: Ssrc, rtx: Ssrc, cap: Option<f32>, now: Instant) -> Self {
        Self {
            video: *video,
            rtx: *rtx,
            cap: cap.map(|c| c.clamp(0.0, 1.0)),
            counts: [Counts::default(); 2],
            window_start: now,
            suspended_until: None,
            resent_packets: 0,
            resent_bytes: 0,
            dropped: 0,
        }
    }

    /// Accounts one datagram that str0m produced for this viewer.
    pub(crate) fn on_transmit(&mut self, datagram: &[u8], now: Instant) -> Verdict {
        let Some(ssrc) = rtp_ssrc(datagram) else {
            return Verdict::Send;
        };
        if ssrc != self.video && ssrc != self.rtx {
            return Verdict::Send;
        }
        self.roll(now);
        let len = datagram.len() as u64;
        if ssrc == self.video {
            self.counts[0].sent += len;
            return Verdict::Send;
        }
        if self.suspended_until.is_some() {
            self.dropped += 1;
            return Verdict::Drop { suspend: false };
        }
        let (sent, resent) = self.totals();
        let (sent, resent) = (sent + len, resent + len);
        if let Some(cap) = self.cap
            && resent > ALLOWANCE
            && resent as f64 > f64::from(cap) * sent as f64
        {
            self.dropped += 1;
            self.suspended_until = Some(now + 2 * WINDOW);
            return Verdict::Drop { suspend: true };
        }
        self.counts[0].sent += len;
        self.counts[0].resent += len;
        self.resent_packets += 1;
        self.resent_bytes += len;
        Verdict::Send
    }

    /// Whether a suspension ended at `now`: the viewer turns its retransmission cache back on.
    pub(crate) fn resume(&mut self, now: Instant) -> bool {
        match self.suspended_until {
            Some(t) if now >= t => {
                self.suspended_until = None;
                true
            }
            _ => false,
        }
    }

    /// Whether retransmission is off.
    pub(crate) fn suspended(&self) -> bool {
        self.suspended_until.is_some()
    }

    fn totals(&self) -> (u64, u64) {
        let [a, b] = self.counts;
        (a.sent + b.sent, a.resent + b.resent)
    }

    fn roll(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed < WINDOW {
            return;
        }
        self.counts = if elapsed < 2 * WINDOW {
            [Counts::default(), self.counts[0]]
        } else {
            [Counts::default(); 2]
        };
        self.window_start = now;
    }
}

/// The SSRC of an SRTP packet (not RTCP, STUN or DTLS), from its clear-text header.
fn rtp_ssrc(d: &[u8]) -> Option<u32> {
    let (&[b0, b1], Some(ssrc)) = (d.first_chunk::<2>()?, d.get(8..12)) else {
        return None;
    };
    // RFC 5761 demultiplexing: RTCP packet types 192..=223 share the byte with marker + PT.
    if b0 >> 6 != 2 || (192..=223).contains(&b1) {
        return None;
    }
    Some(u32::from_be_bytes(ssrc.try_into().ok()?))
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests pick a real starting instant
mod tests {
    use super::*;

    fn rtp(ssrc: u32, len: usize) -> Vec<u8> {
        let mut d = vec![0u8; len.max(12)];
        d[0] = 0x80;
        d[1] = 102;
        d[8..12].copy_from_slice(&ssrc.to_be_bytes());
        d.truncate(len);
        d
    }

    const V: u32 = 0x1111;
    const R: u32 = 0x2222;

    fn budget(now: Instant) -> ResendBudget {
        ResendBudget::new(Ssrc::from(V), Ssrc::from(R), Some(0.15), now)
    }

    #[test]
    fn classifies_only_srtp_of_its_own_streams() {
        assert_eq!(rtp_ssrc(&rtp(7, 12)), Some(7));
        assert_eq!(rtp_ssrc(&rtp(7, 11)), None);
        let mut rtcp = rtp(7, 28);
        rtcp[1] = 200;
        assert_eq!(rtp_ssrc(&rtcp), None);
        let mut dtls = rtp(7, 28);
        dtls[0] = 23;
        assert_eq!(rtp_ssrc(&dtls), None);
        assert_eq!(rtp_ssrc(&[]), None);
        let now = Instant::now();
        let mut b = budget(now);
        for _ in 0..1000 {
            assert_eq!(b.on_transmit(&rtp(0x3333, 1200), now), Verdict::Send);
        }
        assert_eq!(b.counts[0].sent, 0);
    }

    #[test]
    fn retransmissions_within_the_cap_pass() {
        let now = Instant::now();
        let mut b = budget(now);
        for i in 0..10_000u32 {
            let t = now + Duration::from_millis(u64::from(i) * 4);
            assert_eq!(b.on_transmit(&rtp(V, 1200), t), Verdict::Send);
            if i % 10 == 0 {
                assert_eq!(b.on_transmit(&rtp(R, 1200), t), Verdict::Send, "packet {i}");
            }
        }
        assert_eq!(b.resent_packets, 1000);
        assert_eq!(b.dropped, 0);
    }

    #[test]
    fn without_a_cap_it_only_counts() {
        let now = Instant::now();
        let mut b = ResendBudget::new(Ssrc::from(V), Ssrc::from(R), None, now);
        for _ in 0..100 {
            assert_eq!(b.on_transmit(&rtp(R, 1000), now), Verdict::Send);
        }
        assert_eq!((b.resent_packets, b.resent_bytes, b.dropped), (100, 100_000, 0));
    }

    #[test]
    fn a_flood_is_cut_off_then_resumes_after_the_window() {
        let now = Instant::now();
        let mut b = budget(now);
        for _ in 0..100 {
            b.on_transmit(&rtp(V, 1200), now);
        }
        let mut verdicts = Vec::new();
        for _ in 0..100 {
            verdicts.push(b.on_transmit(&rtp(R, 1200), now));
        }
        let sent = verdicts.iter().take_while(|v| **v == Verdict::Send).count();
        // 100 live packets allow the 24 KiB allowance: 20 resends at 1200 bytes, then nothing.
        assert_eq!(sent, ALLOWANCE as usize / 1200);
        assert_eq!(verdicts[sent], Verdict::Drop { suspend: true });
        assert!(verdicts[sent + 1..].iter().all(|v| *v == Verdict::Drop { suspend: false }));
        assert!(b.suspended());
        assert!(!b.resume(now + WINDOW));
        assert!(b.resume(now + 2 * WINDOW));
        assert!(!b.suspended());
        // The burst that tripped it has rolled out of the windows.
        let later = now + 2 * WINDOW;
        b.on_transmit(&rtp(V, 1200), later);
        assert_eq!(b.on_transmit(&rtp(R, 1200), later), Verdict::Send);
    }
}
