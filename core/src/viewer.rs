//! One viewer: a str0m `Rtc` in RTP mode plus what the core knows about it.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::change::SdpOffer;
use str0m::config::{CryptoProvider, DtlsCert};
use str0m::media::{MediaKind, Mid, Pt};
use str0m::net::{DatagramRecv, Protocol, Receive, TcpType};
use str0m::rtp::{Extension, ExtensionMap, RtpWrite, SeqNo, Ssrc};
use str0m::{Candidate, IceCreds};
use str0m::{Event as RtcEvent, IceConnectionState, Input as RtcInput, Output as RtcOutput, Rtc};
use tracing::{debug, trace, warn};

use crate::config::{CoreConfig, H264Profile, VideoCodec};
use crate::gop::GopCache;
use crate::ids::{ETag, SessionId, StreamId};
use crate::pacer::{Backlog, LivePacing, PrimePacing, Push};
use crate::packet::SourcePacket;
use crate::path::{self, Path};
use crate::resend::{ResendBudget, Verdict};
use crate::sdp::{self, OfferSummary};
use crate::tcp::{self, ConnId};
use crate::whep::Reject;
use crate::{Output, Transmit, Transport};

/// A frame's length at 90 kHz and 30 fps: how far a rendition switch moves the timestamp.
const FRAME_TICKS: u32 = 3000;

/// Most live packets written to a viewer before its str0m output is drained.
pub(crate) const MAX_UNFLUSHED: u16 = 16;

/// Lifecycle of a viewer's WebRTC connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ViewerState {
    /// Answer sent; waiting for ICE and DTLS until the deadline.
    Connecting { deadline: Instant },
    /// ICE, DTLS and SRTP are up; media flows.
    Connected,
    /// The ICE agent lost the viewer; closed unless it recovers before the deadline.
    Disconnected { deadline: Instant },
}

/// The send side of one media section for one viewer.
#[derive(Debug)]
pub(crate) struct Track {
    pub(crate) mid: Mid,
    pub(crate) pt: Pt,
    pub(crate) ssrc: Ssrc,
    nackable: bool,
    /// `out = src + offset`; `None` until the track starts (video waits for a keyframe).
    offset: Option<i64>,
    /// Next extended sequence number this viewer expects; starts below 2^15 so the first
    /// packet's SRTP rollover counter is 0 (str0m notes: a first seq ≥ 65536 fails silently).
    next_out: u64,
    /// Video held back while the cached GOP is paced out ([`Viewer::prime`]); `None` otherwise.
    backlog: Option<Box<Backlog>>,
    /// The RTP timestamp of the last packet written (after `ts_offset`).
    last_ts: Option<u32>,
    /// Added to source timestamps: 0 until the viewer switches renditions, whose RTP clocks
    /// have unrelated origins (each FFmpeg RTP muxer picks its own).
    ts_offset: u32,
}

impl Track {
    /// Whether anything was sent on this track yet.
    pub(crate) fn started(&self) -> bool {
        self.last_ts.is_some()
    }

    pub(crate) fn new(mid: Mid, pt: Pt, ssrc: Ssrc, nackable: bool, first_seq: u16) -> Self {
        Self {
            mid,
            pt,
            ssrc,
            nackable,
            offset: None,
            next_out: u64::from(first_seq & 0x7fff),
            backlog: None,
            last_ts: None,
            ts_offset: 0,
        }
    }

    /// Packets held back for pacing.
    pub(crate) fn backlog(&self) -> usize {
        self.backlog.as_ref().map_or(0, |b| b.len())
    }

    /// Maps a source sequence number to this viewer's, starting or re-gating as needed.
    fn map(&mut self, pkt: &SourcePacket) -> Option<u64> {
        if pkt.restart || self.offset.is_none() {
            if pkt.kind == MediaKind::Video && !pkt.keyframe_start {
                self.offset = None;
                return None;
            }
            self.offset = Some(self.next_out as i64 - pkt.seq as i64);
        }
        let out = u64::try_from(pkt.seq as i64 + self.offset?).ok()?;
        self.next_out = self.next_out.max(out + 1);
        Some(out)
    }
}

/// Things a viewer tells the core after a mutation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum ViewerNews {
    Connected,
    KeyframeRequest,
    /// The backlog of a paced prime outgrew its cap and was dropped; video restarts at the
    /// next keyframe.
    BacklogDropped,
    /// Retransmissions str0m sent (`packets`, `bytes`) and dropped over the budget.
    Resent {
        packets: u64,
        bytes: u64,
        dropped: u64,
    },
    /// The viewer's retransmissions exceeded their share: its retransmission cache is off
    /// for a while.
    ResendsSuspended,
    /// A receiver report of its video: the fraction lost since the last one, and the rate
    /// its video was sent at meanwhile (bytes per second, retransmissions included; `None` for
    /// the first).
    Report {
        lost: f32,
        sent_rate: Option<u64>,
    },
    /// It moved to another rendition (at that rendition's keyframe).
    Switched {
        to: u8,
    },
}

/// A viewer's video retransmission settings: str0m's cache and the core's budget.
#[derive(Debug)]
pub(crate) struct Resend {
    pub(crate) cache_packets: usize,
    pub(crate) cache_age: Duration,
    /// The cache's size while the viewer is started from the GOP cache
    /// ([`CoreConfig::rtx_cache_prime_packets`](crate::CoreConfig::rtx_cache_prime_packets)).
    pub(crate) prime_packets: usize,
    /// When the cache goes back to `cache_packets` after a prime.
    pub(crate) shrink_at: Option<Instant>,
    /// The cache is at `prime_packets` for a GOP sent faster than live.
    pub(crate) grown: bool,
    pub(crate) budget: ResendBudget,
}

/// What a write put on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Sent {
    pub(crate) packets: u64,
    pub(crate) bytes: u64,
}

impl std::ops::AddAssign for Sent {
    fn add_assign(&mut self, other: Self) {
        self.packets += other.packets;
        self.bytes += other.bytes;
    }
}

/// One WHEP session.
#[derive(Debug)]
pub(crate) struct Viewer {
    pub(crate) session: SessionId,
    pub(crate) stream: StreamId,
    pub(crate) rtc: Rtc,
    pub(crate) state: ViewerState,
    pub(crate) video: Track,
    pub(crate) audio: Track,
    /// The stream's video rendition this viewer gets (0: its H264; see
    /// [`Offer::videos`]).
    pub(crate) rendition: u8,
    /// Moves between renditions of its codec from what its receiver reports say.
    pub(crate) ladder: Ladder,
    pub(crate) etag: ETag,
    /// The offer as received, less what a restart does not need (`sdp::compact_offer`), kept
    /// to re-accept it with new credentials on ICE restart.
    pub(crate) offer: String,
    /// The viewer's current ICE credentials.
    pub(crate) remote_creds: (String, String),
    /// Our current ICE username fragment (the demux key).
    pub(crate) local_ufrag: String,
    pub(crate) last_rx: Instant,
    /// Source addresses learned for this viewer from its ICE checks in this ICE generation
    /// (demux keys), at most [`CoreConfig::max_viewer_addresses`](crate::CoreConfig).
    pub(crate) addrs: Vec<SocketAddr>,
    /// When the POST created this session.
    pub(crate) joined: Instant,
    /// An ICE check with this session's credentials has arrived.
    pub(crate) checked: bool,
    /// The client address this session is counted under while it has not connected
    /// ([`CoreConfig::max_unconnected_per_client`](crate::CoreConfig)); taken when it connects or goes.
    pub(crate) unconnected_client: Option<IpAddr>,
    /// Remote ICE candidates given to str0m in this ICE generation (offer and PATCHes).
    pub(crate) remote_candidates: usize,
    /// The addresses of its relayed (TURN) candidates, from its offer and PATCHes: media sent
    /// to one of them goes through a relay (for `/metrics`' split by transport).
    pub(crate) relays: Vec<SocketAddr>,
    pub(crate) keyframe_requests: u64,
    /// The viewer asked for a keyframe that the GOP cache will answer
    /// ([`CoreConfig::cached_keyframe_interval`](crate::CoreConfig::cached_keyframe_interval)), at the
    /// end of the frame being fanned out ([`Viewer::replay`]).
    pub(crate) keyframe_wanted: bool,
    /// When the viewer was last sent the cached GOP (its join, or an answer to a request).
    pub(crate) gop_sent_at: Option<Instant>,
    /// str0m's next timeout.
    pub(crate) rtc_deadline: Instant,
    /// The entry this viewer has in the core's timer set.
    pub(crate) scheduled: Option<Instant>,
    /// str0m said the viewer closed, or it errored: the core removes the viewer.
    pub(crate) dead: bool,
    /// Live packets written to str0m since its output was last drained ([`Viewer::flush`]).
    pub(crate) unflushed: u16,
    /// RTP packets written to str0m (retransmissions not counted), and their payload bytes.
    pub(crate) sent: Sent,
    /// Retransmission accounting and cap, when the viewer negotiated RTX.
    pub(crate) resend: Option<Box<Resend>>,
    /// Where its media goes, and the checks that may move it ([`crate::path`]).
    pub(crate) path: Path,
    /// Its video is paced ([`LivePacing`]) since its reports showed loss, holding back at
    /// most this many packets; `None` while they have not.
    pub(crate) pacing: Option<(LivePacing, usize)>,
    /// TCP connections bound to this viewer (ICE-TCP): the viewer's end of each, and the
    /// runtime's name for it. At most [`CoreConfig::max_viewer_addresses`](crate::CoreConfig).
    pub(crate) tcp: Vec<(SocketAddr, ConnId)>,
    /// Its DTLS and media last went over TCP (for `/metrics`' split by transport).
    pub(crate) media_tcp: bool,
    /// What the sessions listing shows ([`Core::sessions`](crate::Core::sessions)).
    pub(crate) seen: Box<Seen>,
}

/// What a viewer's session listing and its `ViewerLeft` event report, kept off the packet path:
/// plain counters where a packet is handled already, str0m's statistics once a second.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    /// The client's address as the POST came (the runtime's, maybe a proxy's).
    pub(crate) client: Option<IpAddr>,
    /// The POST's `User-Agent`, sanitised.
    pub(crate) user_agent: Option<String>,
    /// When ICE and DTLS completed.
    pub(crate) connected_at: Option<Instant>,
    /// Video packets str0m retransmitted on NACK.
    pub(crate) resent: u64,
    /// str0m's last egress statistics of its video and audio.
    pub(crate) video: Egress,
    pub(crate) audio: Egress,
    /// The selected candidate pair from str0m's last peer statistics: protocol, ours, theirs.
    pub(crate) pair: Option<(Protocol, SocketAddr, SocketAddr)>,
}

/// One track's egress statistics as str0m last reported them (every second).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Egress {
    /// Bytes and packets str0m sent, retransmissions included.
    pub(crate) bytes: u64,
    pub(crate) packets: u64,
    pub(crate) nacks: u64,
    pub(crate) plis: u64,
    pub(crate) firs: u64,
    /// Round-trip time from the last receiver report.
    pub(crate) rtt: Option<Duration>,
    /// Fraction lost in the last receiver reports.
    pub(crate) loss: Option<f32>,
    /// Bytes per second between the last two reports.
    pub(crate) rate: Option<u64>,
    pub(crate) at: Option<Instant>,
}

impl Egress {
    fn update(&mut self, s: &str0m::stats::MediaEgressStats) {
        if let Some(at) = self.at {
            let secs = s.timestamp.saturating_duration_since(at).as_secs_f64();
            if secs > 0.0 {
                self.rate = Some((s.bytes.saturating_sub(self.bytes) as f64 / secs) as u64);
            }
        }
        self.bytes = s.bytes;
        self.packets = s.packets;
        self.nacks = s.nacks;
        self.plis = s.plis;
        self.firs = s.firs;
        self.rtt = s.rtt.or(self.rtt);
        self.loss = s.loss.or(self.loss);
        self.at = Some(s.timestamp);
    }
}

/// A viewer's place on its stream's bitrate ladder (renditions of one codec): the rendition it
/// moves to at that rendition's next keyframe, and the loss its receiver reports state.
#[derive(Debug, Default)]
pub(crate) struct Ladder {
    /// Switch to this rendition at its next keyframe.
    pub(crate) target: Option<u8>,
    /// Consecutive reports with loss at or above [`LOSS_DOWN`].
    lossy: u8,
    /// Since when the reports say (nearly) no loss.
    clean_since: Option<Instant>,
    /// Lossy with no lower rung: the viewer gets the keyframes alone (a picture every GOP
    /// rather than none), until it is clean again.
    pub(crate) keyframes_only: bool,
    /// Clean again: full video resumes at the next keyframe (P frames now would refer to
    /// frames it never got).
    pub(crate) resume_at_keyframe: bool,
    /// The timestamp of the keyframe being passed in keyframes-only mode.
    keyframe_ts: Option<u32>,
    /// When it last moved up: a lossy report within [`PROBE_WINDOW`] of that moves it back
    /// down at once.
    probed: Option<Instant>,
    /// Reports until then describe the rendition it just left (they are in flight): ignored.
    settle_until: Option<Instant>,
    /// Moves up that were followed by loss in a row: each doubles the clean time the next
    /// needs ([`CLEAN_UP`] up to [`CLEAN_UP_MAX`]), so that a link that only just fails to
    /// carry the upper rung is not probed every ten seconds.
    failed_probes: u8,
    /// Video bytes sent to the viewer (str0m's count) at its last stats, and when.
    sent: Option<(u64, Instant)>,
    /// What the path delivered when it last lost heavily (bytes per second: the rate sent
    /// then, less the fraction lost), and when: more than it carries. A move up to a rung
    /// that needs more is not tried until [`CEILING_AGE`] has passed.
    ceiling: Option<(u64, Instant)>,
}

/// Fraction lost in a report from which the loss is taken for the path's limit, not chance:
/// a link that drops a fifth of what it is sent at random is unusable anyway, and one that
/// loses it for want of capacity loses that much as soon as it is sent twice what it carries.
pub(crate) const LOSS_HEAVY: f32 = 0.2;

/// Share of a path's ceiling a paced viewer's video may take (the rest for audio,
/// retransmissions and the rendition's peaks).
pub(crate) const CEILING_PACE: f64 = 0.75;

/// How long a path's measured ceiling ([`Ladder::note_delivery`]) holds moves up back.
pub(crate) const CEILING_AGE: Duration = Duration::from_secs(30);

/// The share of a path's ceiling a rung may need for a move up to it to be tried.
pub(crate) const CEILING_HEADROOM: f64 = 0.85;

/// Fraction lost in a receiver report that, twice in a row, moves a viewer down a rung.
pub(crate) const LOSS_DOWN: f32 = 0.08;
/// Fraction lost below which a viewer counts as clean.
pub(crate) const LOSS_CLEAN: f32 = 0.02;
/// How long a viewer must be clean before it moves up a rung.
pub(crate) const CLEAN_UP: Duration = Duration::from_secs(10);
/// The longest clean time a move up waits for, after failed ones.
pub(crate) const CLEAN_UP_MAX: Duration = Duration::from_secs(160);
/// How long after a move up a single lossy report moves the viewer back down.
pub(crate) const PROBE_WINDOW: Duration = Duration::from_secs(10);

/// Which way a viewer should move on its ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Down,
    Up,
}

impl Ladder {
    /// Notes a receiver report's fraction `lost` at `now`; returns a move once the evidence
    /// is enough: down after two lossy reports (one, right after a move up), up after
    /// [`CLEAN_UP`] of clean ones (longer after moves up that failed).
    pub(crate) fn on_report(&mut self, lost: f32, now: Instant) -> Option<Step> {
        if self.settle_until.is_some_and(|t| now < t) {
            return None;
        }
        let probing = self.probed.is_some_and(|t| now < t + PROBE_WINDOW);
        if !probing && self.probed.take().is_some() {
            // The move up held.
            self.failed_probes = 0;
        }
        if lost >= LOSS_DOWN {
            self.clean_since = None;
            self.lossy = self.lossy.saturating_add(1);
            if self.lossy >= 2 || probing {
                self.lossy = 0;
                if probing {
                    self.probed = None;
                    self.failed_probes = self.failed_probes.saturating_add(1);
                }
                return Some(Step::Down);
            }
            return None;
        }
        self.lossy = 0;
        if lost >= LOSS_CLEAN {
            self.clean_since = None;
            return None;
        }
        let since = *self.clean_since.get_or_insert(now);
        let hold = CLEAN_UP.saturating_mul(1 << self.failed_probes.min(4)).min(CLEAN_UP_MAX);
        if now.saturating_duration_since(since) >= hold {
            self.clean_since = Some(now);
            self.probed = Some(now);
            return Some(Step::Up);
        }
        None
    }
}

impl Ladder {
    /// Notes what a report says the path delivered: under heavy loss (at or above
    /// [`LOSS_HEAVY`]), the rate sent less the fraction lost is about what the path carries.
    /// The highest such measurement while fresh is kept (one taken while less was sent than
    /// the path carries says too little); none is taken on keyframes only, where what is sent
    /// is this server's choice, not the path's.
    pub(crate) fn note_delivery(&mut self, lost: f32, sent_rate: Option<u64>, now: Instant) {
        if self.keyframes_only {
            return;
        }
        if let Some(rate) = sent_rate.filter(|_| lost >= LOSS_HEAVY) {
            let delivered = (rate as f64 * f64::from(1.0 - lost.clamp(0.0, 1.0))) as u64;
            let fresh = self
                .ceiling
                .filter(|(_, at)| now.saturating_duration_since(*at) < CEILING_AGE)
                .map_or(0, |(c, _)| c);
            self.ceiling = Some((delivered.max(fresh), now));
        }
    }

    /// The most a paced viewer's video may be sent at while the path's measured ceiling is
    /// fresh ([`CEILING_PACE`] of it), in bytes per second.
    pub(crate) fn pace_cap(&self, now: Instant) -> Option<u64> {
        self.ceiling
            .filter(|(_, at)| now.saturating_duration_since(*at) < CEILING_AGE)
            .map(|(c, _)| (c as f64 * CEILING_PACE) as u64)
    }

    /// Whether a move up to a rung that needs `rate` bytes per second is held back by the
    /// path's measured ceiling; if so the move up is dropped (not counted as a probe).
    pub(crate) fn ceiling_blocks(&mut self, rate: u64, now: Instant) -> bool {
        let Some((ceiling, at)) = self.ceiling else {
            return false;
        };
        if now.saturating_duration_since(at) >= CEILING_AGE {
            self.ceiling = None;
            return false;
        }
        let blocks = rate as f64 > ceiling as f64 * CEILING_HEADROOM;
        if blocks {
            self.probed = None;
        }
        blocks
    }

    /// It just moved (to another rendition, or to keyframes only): the next [`SETTLE`] of
    /// reports are not about where it is now.
    pub(crate) fn settle(&mut self, now: Instant) {
        self.settle_until = Some(now + SETTLE);
        self.lossy = 0;
    }
}

/// How long after a move a viewer's reports are ignored: one report interval, plus the time
/// a slow link's queue takes to drain what was sent before.
pub(crate) const SETTLE: Duration = Duration::from_millis(1500);

/// A viewer's offer, checked ([`sdp::check_offer`]).
#[derive(Debug)]
pub(crate) struct Offer<'a> {
    pub(crate) text: &'a str,
    pub(crate) summary: &'a OfferSummary,
    /// The H264 profile the stream carries: decides which offered payload type the viewer gets.
    pub(crate) profile: H264Profile,
    /// The codecs of the stream's video renditions, its H264 first: the viewer gets the first
    /// its offer can receive.
    pub(crate) videos: &'a [VideoCodec],
}

/// A viewer's str0m peer that accepted its offer: ICE-lite, RTP mode, H264 and Opus, our DTLS
/// certificate and host candidates, a bounded retransmission cache. Built before the viewer
/// takes a seat, so that an offer str0m refuses costs none; [`into_viewer`](Self::into_viewer)
/// then gives it its session.
#[derive(Debug)]
pub(crate) struct Answered {
    rtc: Rtc,
    answer: String,
    local_ufrag: String,
    video: (Mid, Ssrc),
    audio: (Mid, Ssrc),
    /// The stream's video rendition chosen for the viewer ([`Offer::videos`]).
    pub(crate) rendition: u8,
    /// The offered payload types chosen for the viewer.
    pub(crate) video_pt: u8,
    pub(crate) audio_pt: u8,
    compact_offer: String,
    resend: Option<Box<Resend>>,
}

/// What a viewer's session is when its [`Answered`] peer becomes a [`Viewer`].
#[derive(Debug)]
pub(crate) struct Seat {
    pub(crate) session: SessionId,
    pub(crate) stream: StreamId,
    pub(crate) etag: ETag,
    /// The first sequence numbers of its video and audio (random).
    pub(crate) first_seqs: (u16, u16),
    pub(crate) remote_creds: (String, String),
    /// The client's address and the POST's sanitised `User-Agent`, for the sessions listing.
    pub(crate) client: Option<IpAddr>,
    pub(crate) user_agent: Option<String>,
    pub(crate) unconnected_client: Option<IpAddr>,
    pub(crate) remote_candidates: usize,
    pub(crate) relays: Vec<SocketAddr>,
    /// When it is closed unless it sends an ICE check (see [`Viewer::checked`]).
    pub(crate) deadline: Instant,
    pub(crate) now: Instant,
}

impl Answered {
    /// Builds the str0m peer and accepts `offer` with our ICE credentials `creds`, advertising
    /// `candidates` (UDP host candidates); `dtls` is the crypto provider and the certificate
    /// every viewer shares.
    pub(crate) fn new(
        offer: Offer<'_>,
        creds: IceCreds,
        dtls: (&Arc<CryptoProvider>, Option<&DtlsCert>),
        config: &CoreConfig,
        candidates: &[SocketAddr],
        now: Instant,
    ) -> Result<Self, Reject> {
        let local_ufrag = creds.ufrag.clone();
        let mut cfg = Rtc::builder()
            .set_ice_lite(true)
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_h264(offer.videos.contains(&VideoCodec::H264))
            .enable_vp8(offer.videos.contains(&VideoCodec::Vp8))
            .enable_opus(true, false)
            .set_local_ice_credentials(creds)
            .set_crypto_provider(dtls.0.clone())
            .set_extension_map(rtp_extensions())
            .set_send_buffer_video(config.rtx_cache_packets)
            .set_send_buffer_audio(64)
            // Receiver reports move the viewer along a ladder, or to keyframes only without
            // one (see `Ladder`).
            .set_stats_interval(Some(Duration::from_secs(1)));
        if let Some(cert) = dtls.1 {
            cfg = cfg.set_dtls_cert(cert.clone());
        }
        let mut rtc = cfg.build(now);
        for addr in candidates {
            match Candidate::host(*addr, "udp") {
                Ok(c) => {
                    rtc.add_local_candidate(c);
                }
                Err(e) => warn!(%addr, error = %e, "unusable host candidate"),
            }
        }
        // ICE-TCP: passive candidates (the viewer connects), with str0m's lower type
        // preference for TCP host candidates (90 against UDP's 126): UDP wins where it works.
        for addr in &config.tcp_candidates {
            match Candidate::builder().tcp().host(*addr).tcptype(TcpType::Passive).build() {
                Ok(c) => {
                    rtc.add_local_candidate(c);
                }
                Err(e) => warn!(%addr, error = %e, "unusable TCP host candidate"),
            }
        }
        let sdp_offer =
            SdpOffer::from_sdp_string(offer.text).map_err(|e| Reject::BadOffer(e.to_string()))?;
        let answer =
            rtc.sdp_api().accept_offer(sdp_offer).map_err(|e| Reject::BadOffer(e.to_string()))?;

        let summary = offer.summary;
        let video_mid = Mid::from(summary.video_mid.as_str());
        let audio_mid = Mid::from(summary.audio_mid.as_str());
        let usable = |rtc: &Rtc, mid: Mid| -> Vec<Pt> {
            rtc.media(mid)
                .filter(|m| !m.disabled())
                .map(|m| m.remote_pts().to_vec())
                .unwrap_or_default()
        };
        let (vpts, apts) = (usable(&rtc, video_mid), usable(&rtc, audio_mid));
        let video = sdp::choose_video(summary, offer.videos, offer.profile, |pt| {
            vpts.contains(&Pt::from(pt))
        });
        let audio_pt = summary.opus.iter().copied().find(|pt| apts.contains(&Pt::from(*pt)));
        let Some(audio_pt) = audio_pt else {
            return Err(Reject::CodecMismatch { h264: false, opus: true });
        };
        let Some((rendition, video_pt)) = video else {
            return Err(Reject::NoRendition { sends: sdp::sends(offer.videos) });
        };
        let mut api = rtc.direct_api();
        let video_ssrc = api.stream_tx_by_mid(video_mid, None).map(|t| t.ssrc());
        let audio_ssrc = api.stream_tx_by_mid(audio_mid, None).map(|t| t.ssrc());
        let (Some(video_ssrc), Some(audio_ssrc)) = (video_ssrc, audio_ssrc) else {
            return Err(Reject::BadOffer("no send stream for a media section".into()));
        };
        // Bound the retransmission cache by age and count: its packet metadata (about 430 bytes
        // a packet) dominates a viewer's memory, and an old retransmission is useless to a
        // low-latency player.
        // str0m's own ratio cap is off: it keeps an entry per packet sent in the last second;
        // the viewer's `ResendBudget` does the same job with a few counters.
        let (packets, age) = (config.rtx_cache_packets, config.rtx_cache_age);
        let mut resend = None;
        if let Some(tx) = api.stream_tx(&video_ssrc) {
            tx.set_rtx_cache(packets, age, None);
            if let Some(rtx) = tx.rtx() {
                let budget = ResendBudget::new(video_ssrc, rtx, config.rtx_ratio_cap, now);
                resend = Some(Box::new(Resend {
                    cache_packets: packets,
                    cache_age: age,
                    prime_packets: config.rtx_cache_prime_packets,
                    shrink_at: None,
                    grown: false,
                    budget,
                }));
            }
        }
        // Audio is written non-nackable, so its cache stays empty; without a ratio cap str0m
        // keeps no per-packet byte history for it either.
        if let Some(tx) = api.stream_tx(&audio_ssrc) {
            tx.set_rtx_cache(0, Duration::ZERO, None);
        }
        Ok(Self {
            rtc,
            answer: sdp::finish_answer(&sdp::trim_answer(
                &answer.to_sdp_string(),
                offer.text,
                &[(&summary.video_mid, video_pt), (&summary.audio_mid, audio_pt)],
            )),
            local_ufrag,
            video: (video_mid, video_ssrc),
            audio: (audio_mid, audio_ssrc),
            rendition,
            video_pt,
            audio_pt,
            compact_offer: sdp::compact_offer(
                offer.text,
                &[(&summary.video_mid, &[video_pt]), (&summary.audio_mid, &[audio_pt])],
            ),
            resend,
        })
    }

    /// The viewer's [`Viewer`], connecting until `seat.deadline`, and the SDP answer to send.
    pub(crate) fn into_viewer(self, seat: Seat) -> (Viewer, String) {
        let now = seat.now;
        let viewer = Viewer {
            session: seat.session,
            stream: seat.stream,
            rtc: self.rtc,
            state: ViewerState::Connecting { deadline: seat.deadline },
            rendition: self.rendition,
            ladder: Ladder::default(),
            video: Track::new(
                self.video.0,
                Pt::from(self.video_pt),
                self.video.1,
                true,
                seat.first_seqs.0,
            ),
            audio: Track::new(
                self.audio.0,
                Pt::from(self.audio_pt),
                self.audio.1,
                false,
                seat.first_seqs.1,
            ),
            etag: seat.etag,
            offer: self.compact_offer,
            remote_creds: seat.remote_creds,
            local_ufrag: self.local_ufrag,
            last_rx: now,
            addrs: Vec::new(),
            joined: now,
            checked: false,
            unconnected_client: seat.unconnected_client,
            remote_candidates: seat.remote_candidates,
            relays: seat.relays,
            keyframe_requests: 0,
            keyframe_wanted: false,
            gop_sent_at: None,
            rtc_deadline: now,
            scheduled: None,
            dead: false,
            unflushed: 0,
            sent: Sent::default(),
            resend: self.resend,
            path: Path::default(),
            pacing: None,
            tcp: Vec::new(),
            media_tcp: false,
            seen: Box::new(Seen {
                client: seat.client,
                user_agent: seat.user_agent,
                ..Seen::default()
            }),
        };
        (viewer, self.answer)
    }
}

/// The RTP header extensions offered to viewers: str0m's standard set without transport-wide
/// congestion control. Bandwidth estimation is off, so TWCC feedback would go unused, and with it
/// negotiated str0m keeps a record of the last 1000 sent packets per viewer (about 88 KiB).
fn rtp_extensions() -> ExtensionMap {
    let mut exts = ExtensionMap::empty();
    for (id, ext) in ExtensionMap::standard().iter() {
        if *ext != Extension::TransportSequenceNumber {
            exts.set(id, ext.clone());
        }
    }
    exts
}

impl Viewer {
    /// The earliest instant at which this viewer needs [`Viewer::timeout`] (or [`Viewer::pace`]).
    pub(crate) fn deadline(&self, inactivity: Duration) -> Instant {
        let own = match self.state {
            ViewerState::Connecting { deadline } | ViewerState::Disconnected { deadline } => {
                deadline
            }
            ViewerState::Connected => self.last_rx + inactivity,
        };
        let pace = self.video.backlog.as_ref().and_then(|b| b.next_release());
        let shrink = self.resend.as_ref().and_then(|r| r.shrink_at);
        own.min(self.rtc_deadline).min(pace.unwrap_or(own)).min(shrink.unwrap_or(own))
    }

    /// Hands str0m a datagram or TCP frame of viewer `session`. A DTLS handshake that failed
    /// (dimpl sent a fatal alert) marks the viewer dead, to be closed now rather than at the
    /// connect timeout, and says why once; anything else str0m refuses is only logged.
    pub(crate) fn receive(&mut self, session: SessionId, input: RtcInput<'_>) {
        if let Err(e) = self.rtc.handle_input(input) {
            let error = e.to_string();
            if let Some(hint) = crate::dtls::failure_hint(&error) {
                warn!(%session, stream = %self.stream, %error, "DTLS handshake failed: {hint}");
                self.dead = true;
            } else {
                debug!(%session, %error, "datagram or TCP frame rejected");
            }
        }
    }

    /// Drains str0m's output into the core's queue until it asks for a timeout.
    pub(crate) fn drain(
        &mut self,
        now: Instant,
        grace: Duration,
        out: &mut VecDeque<Output>,
        news: &mut Vec<ViewerNews>,
    ) {
        loop {
            match self.rtc.poll_output() {
                Ok(RtcOutput::Transmit(t)) => {
                    if self.path.suppress.is_some() && self.path.suppresses(&t.contents) {
                        continue;
                    }
                    self.path.on_transmit(t.destination, &t.contents);
                    let transport = match t.proto {
                        Protocol::Udp => Transport::Udp,
                        _ => match self.tcp.iter().find(|(peer, _)| *peer == t.destination) {
                            Some((_, conn)) => Transport::Tcp(*conn),
                            // Its connection closed: nowhere to send.
                            None => continue,
                        },
                    };
                    if matches!(t.contents.first(), Some(20..=63 | 128..=191)) {
                        self.media_tcp = transport != Transport::Udp;
                    }
                    if let Some(r) = &mut self.resend
                        && let Verdict::Drop { suspend } = r.budget.on_transmit(&t.contents, now)
                    {
                        if suspend {
                            debug!(session = %self.session, "retransmissions over budget");
                            news.push(ViewerNews::ResendsSuspended);
                            self.set_rtx_cache(0, Duration::ZERO);
                        }
                        continue;
                    }
                    let contents = match transport {
                        Transport::Udp => t.contents.into(),
                        Transport::Tcp(_) => match tcp::encode(&t.contents) {
                            Some(framed) => framed,
                            None => continue,
                        },
                    };
                    out.push_back(Output::Transmit(Transmit {
                        transport,
                        source: t.source,
                        destination: t.destination,
                        contents,
                    }));
                }
                Ok(RtcOutput::Timeout(t)) => {
                    self.rtc_deadline = t;
                    break;
                }
                Ok(RtcOutput::Event(e)) => self.on_event(e, now, grace, news),
                Err(e) => {
                    debug!(session = %self.session, error = %e, "viewer failed");
                    self.dead = true;
                    break;
                }
            }
        }
        if !self.rtc.is_alive() {
            self.dead = true;
        }
        if let Some(r) = &mut self.resend
            && (r.budget.resent_packets | r.budget.dropped) != 0
        {
            let b = &mut r.budget;
            self.seen.resent += b.resent_packets;
            news.push(ViewerNews::Resent {
                packets: std::mem::take(&mut b.resent_packets),
                bytes: std::mem::take(&mut b.resent_bytes),
                dropped: std::mem::take(&mut b.dropped),
            });
        }
    }

    /// Replaces the video stream's retransmission cache (str0m keeps no ratio history: the
    /// [`ResendBudget`] caps retransmissions).
    fn set_rtx_cache(&mut self, packets: usize, age: Duration) {
        if let Some(tx) = self.rtc.direct_api().stream_tx(&self.video.ssrc) {
            tx.set_rtx_cache(packets, age, None);
        }
    }

    fn on_event(&mut self, e: RtcEvent, now: Instant, grace: Duration, news: &mut Vec<ViewerNews>) {
        match e {
            RtcEvent::Connected => {
                self.seen.connected_at = Some(now);
                self.state = ViewerState::Connected;
                news.push(ViewerNews::Connected);
            }
            RtcEvent::IceConnectionStateChange(s) => {
                trace!(session = %self.session, state = ?s, "ice state");
                match (s, self.state) {
                    (IceConnectionState::Disconnected, ViewerState::Connected) => {
                        self.state = ViewerState::Disconnected { deadline: now + grace };
                    }
                    (
                        IceConnectionState::Connected | IceConnectionState::Completed,
                        ViewerState::Disconnected { .. },
                    ) => self.state = ViewerState::Connected,
                    _ => {}
                }
            }
            RtcEvent::MediaEgressStats(s) if s.mid == self.audio.mid => self.seen.audio.update(&s),
            RtcEvent::PeerStats(s) => {
                if let Some(p) = s.selected_candidate_pair {
                    self.seen.pair = Some((p.protocol, p.local.addr, p.remote.addr));
                }
            }
            RtcEvent::MediaEgressStats(s) if s.mid == self.video.mid => {
                self.seen.video.update(&s);
                let sent_rate =
                    self.ladder.sent.replace((s.bytes, s.timestamp)).and_then(|(bytes, at)| {
                        let secs = s.timestamp.saturating_duration_since(at).as_secs_f64();
                        (secs > 0.0).then(|| (s.bytes.saturating_sub(bytes) as f64 / secs) as u64)
                    });
                if let Some(lost) = s.loss {
                    news.push(ViewerNews::Report { lost, sent_rate });
                }
            }
            RtcEvent::KeyframeRequest(_) => {
                self.keyframe_requests += 1;
                news.push(ViewerNews::KeyframeRequest);
            }
            RtcEvent::Closed => self.dead = true,
            _ => {}
        }
    }

    /// Writes one live source packet to this viewer (if connected and the track has started),
    /// or queues it behind its paced backlog (a prime, or its live pacing), releasing what that
    /// backlog's budget allows. Returns what was written.
    ///
    /// The packets are not released through str0m yet: the core drains a batch of writes with
    /// one [`flush`](Self::flush) (a frame's packets arrive together), which costs one str0m
    /// timeout and output poll per batch instead of per packet. A viewer flushes by itself every
    /// [`MAX_UNFLUSHED`] packets, well within str0m's send queue.
    pub(crate) fn write_media(
        &mut self,
        pkt: &SourcePacket,
        now: Instant,
        grace: Duration,
        out: &mut VecDeque<Output>,
        news: &mut Vec<ViewerNews>,
    ) -> Sent {
        if self.dead || matches!(self.state, ViewerState::Connecting { .. }) {
            return Sent::default();
        }
        if pkt.kind == MediaKind::Audio {
            return self.write_batched(pkt, now, grace, out, news);
        }
        if pkt.rendition != self.rendition {
            if self.ladder.target != Some(pkt.rendition) || !pkt.keyframe_start {
                return Sent::default();
            }
            self.switch_to(pkt, now);
            news.push(ViewerNews::Switched { to: pkt.rendition });
        }
        let mut restart = false;
        if self.ladder.keyframes_only {
            match self.keyframe_only_passes(pkt) {
                Some(r) => restart = r,
                None => return Sent::default(),
            }
        }
        if self.video.backlog.is_none()
            && let Some((pacing, max_pending)) = self.pacing
        {
            self.video.backlog = Backlog::paced([], pacing, max_pending, now).map(Box::new);
        }
        let Some(backlog) = &mut self.video.backlog else {
            if restart {
                self.video.offset = None;
            }
            return self.write_batched(pkt, now, grace, out, news);
        };
        // A keyframe that restarts the track does so when it leaves the queue, after what is
        // queued before it.
        let restarted;
        let pkt = if restart {
            restarted = SourcePacket { restart: true, ..pkt.clone() };
            &restarted
        } else {
            pkt
        };
        match backlog.push(pkt) {
            Push::Queued => {}
            Push::Full => {
                // Behind by more than the cap allows: give up on the backlog rather than grow
                // it, and restart the video at the next keyframe (sequence numbers stay
                // contiguous, see `Track::map`).
                debug!(session = %self.session, dropped = backlog.len(), "paced backlog full");
                self.video.backlog = None;
                self.video.offset = None;
                news.push(ViewerNews::BacklogDropped);
                let Some((pacing, max_pending)) = self.pacing else {
                    return self.write_batched(pkt, now, grace, out, news);
                };
                // Live pacing goes on from this packet (it leaves if it starts a keyframe).
                self.video.backlog =
                    Backlog::paced([pkt.clone()], pacing, max_pending, now).map(Box::new);
            }
        }
        let mut sent = Sent::default();
        while let Some(p) = self.video.backlog.as_mut().and_then(|b| b.release(now)) {
            sent += self.write_batched(&p, now, grace, out, news);
        }
        self.settle_backlog(now);
        sent
    }

    /// Writes `pkt` through str0m, flushing every [`MAX_UNFLUSHED`] packets.
    fn write_batched(
        &mut self,
        pkt: &SourcePacket,
        now: Instant,
        grace: Duration,
        out: &mut VecDeque<Output>,
        news: &mut Vec<ViewerNews>,
    ) -> Sent {
        if !self.write_rtp(pkt, now) {
            return Sent::default();
        }
        self.unflushed += 1;
        let sent = Sent { packets: 1, bytes: pkt.payload.len() as u64 };
        // Next to `unflushed`, in a cache line this write touches anyway.
        self.sent += sent;
        if self.unflushed >= MAX_UNFLUSHED {
            self.flush(now, grace, out, news);
        }
        sent
    }

    /// Drops the video held back for this viewer; its video restarts at the next keyframe.
    pub(crate) fn restart_video(&mut self) {
        if let Some(b) = &mut self.video.backlog {
            b.clear();
        }
        self.video.offset = None;
    }

    /// Paces this viewer's video at `pacing` from now on (see [`LivePacing`]), holding back at
    /// most `max_pending` packets.
    pub(crate) fn pace_at(&mut self, pacing: LivePacing, max_pending: usize) {
        self.pacing = Some((pacing, max_pending));
        if let Some(b) = &mut self.video.backlog {
            b.repace(pacing);
        }
    }

    /// Releases what [`write_media`](Self::write_media) wrote through str0m, if anything.
    pub(crate) fn flush(
        &mut self,
        now: Instant,
        grace: Duration,
        out: &mut VecDeque<Output>,
        news: &mut Vec<ViewerNews>,
    ) {
        if self.unflushed > 0 {
            self.timeout(now, grace, out, news);
        }
    }

    /// Starts a viewer that just connected with `packets` (the stream's primed GOP cache):
    /// all at once without `pacing`, else the keyframe at once and the rest from a backlog
    /// that [`pace`](Self::pace) releases, live video queueing behind it. Returns what was
    /// written now, or `None` when the cache was not used (nothing written without pacing, or
    /// more packets than the backlog may hold).
    pub(crate) fn prime(
        &mut self,
        packets: impl IntoIterator<Item = SourcePacket>,
        pacing: Option<&PrimePacing>,
        now: Instant,
        grace: Duration,
        out: &mut VecDeque<Output>,
        news: &mut Vec<ViewerNews>,
    ) -> Option<Sent> {
        if self.dead || matches!(self.state, ViewerState::Connecting { .. }) {
            return None;
        }
        if self.video.backlog.is_some() || self.video.offset.is_some() {
            // Primed already, or playing live: the cache would go back in time.
            return None;
        }
        self.send_gop(packets, pacing, now, grace, out, news)
    }

    /// Marks the viewer's keyframe request for an answer from the GOP cache, unless it had
    /// the cached GOP less than `interval` ago.
    pub(crate) fn want_keyframe(&mut self, now: Instant, interval: Duration) {
        if self.gop_sent_at.is_none_or(|t| now >= t + interval) {
            self.keyframe_wanted = true;
        }
    }

    /// Answers the viewer's keyframe request with the stream's cached GOP again
    /// ([`GopCache::replayed`]): its sequence numbers continue where the viewer's are, the
    /// frames' timestamps come after the last one it was sent, and the live video continues
    /// behind it as after a join. Call only when the cache ends with a whole frame that the
    /// viewer was sent. `None` if nothing could be sent (not connected, a prime still being
    /// paced, no video sent yet, or a cache beyond the backlog's cap).
    pub(crate) fn replay(
        &mut self,
        gop: &GopCache,
        pacing: Option<&PrimePacing>,
        now: Instant,
        grace: Duration,
        out: &mut VecDeque<Output>,
        news: &mut Vec<ViewerNews>,
    ) -> Option<Sent> {
        // A prime still going out is not replaced; a live-paced viewer's queue is.
        let priming = self.video.backlog.is_some() && self.pacing.is_none();
        if self.dead || self.state != ViewerState::Connected || priming {
            return None;
        }
        let after = self.video.last_ts?;
        self.keyframe_wanted = false;
        // In the source's clock: `write_rtp` adds the offset back.
        let after = after.wrapping_sub(self.video.ts_offset);
        self.send_gop(gop.replayed(after), pacing, now, grace, out, news)
    }

    /// Writes a GOP (its keyframe first) from a fresh start of the video track: see
    /// [`prime`](Self::prime).
    fn send_gop(
        &mut self,
        packets: impl IntoIterator<Item = SourcePacket>,
        pacing: Option<&PrimePacing>,
        now: Instant,
        grace: Duration,
        out: &mut VecDeque<Output>,
        news: &mut Vec<ViewerNews>,
    ) -> Option<Sent> {
        let backlog = match (self.pacing, pacing) {
            // A paced viewer gets the GOP at its own pace, the keyframe included; what was
            // queued is in the GOP too.
            (Some((live, max_pending)), _) => Backlog::paced(packets, live, max_pending, now)?,
            (None, Some(pacing)) => Backlog::new(packets, pacing, now)?,
            (None, None) => {
                self.video.offset = None;
                self.gop_sent_at = Some(now);
                self.grow_rtx_cache_for_prime();
                let mut sent = Sent::default();
                for pkt in packets {
                    sent += self.write_batched(&pkt, now, grace, out, news);
                }
                self.flush(now, grace, out, news);
                self.prime_done(now);
                return (sent.packets > 0).then_some(sent);
            }
        };
        // The track starts again at the GOP's keyframe (`Track::map`), sequence numbers
        // continuing.
        self.video.offset = None;
        self.video.backlog = Some(Box::new(backlog));
        self.gop_sent_at = Some(now);
        self.grow_rtx_cache_for_prime();
        Some(self.pace(now, grace, out, news))
    }

    /// Makes room in the retransmission cache for a GOP sent faster than live (see
    /// [`CoreConfig::rtx_cache_prime_packets`](crate::CoreConfig::rtx_cache_prime_packets)). The GOP
    /// starts the viewer's video anew, so replacing the cache loses nothing it still needs.
    fn grow_rtx_cache_for_prime(&mut self) {
        let Some(r) = &mut self.resend else { return };
        if r.prime_packets <= r.cache_packets || r.budget.suspended() {
            return;
        }
        let (packets, age) = (r.prime_packets, r.cache_age);
        r.shrink_at = None;
        r.grown = true;
        self.set_rtx_cache(packets, age);
    }

    /// The GOP prime went out: the cache shrinks back once its packets are too old to be
    /// asked for.
    fn prime_done(&mut self, now: Instant) {
        if let Some(r) = &mut self.resend
            && r.grown
            && r.shrink_at.is_none()
        {
            r.shrink_at = Some(now + r.cache_age);
        }
    }

    /// Writes what the paced backlog's budget allows at `now`; forgets the backlog once it is
    /// empty (live video then goes straight through).
    pub(crate) fn pace(
        &mut self,
        now: Instant,
        grace: Duration,
        out: &mut VecDeque<Output>,
        news: &mut Vec<ViewerNews>,
    ) -> Sent {
        let mut sent = Sent::default();
        while !self.dead
            && let Some(pkt) = self.video.backlog.as_mut().and_then(|b| b.release(now))
        {
            sent += self.write_batched(&pkt, now, grace, out, news);
        }
        self.flush(now, grace, out, news);
        self.settle_backlog(now);
        sent
    }

    /// Forgets a drained prime backlog (live video then goes straight through); a live-paced
    /// viewer keeps its backlog, with its bucket.
    fn settle_backlog(&mut self, now: Instant) {
        if self.video.backlog.as_ref().is_some_and(|b| b.is_empty()) {
            if self.pacing.is_none() {
                self.video.backlog = None;
            }
            self.prime_done(now);
            trace!(session = %self.session, "paced backlog drained");
        }
    }

    /// In keyframes-only mode, whether a video packet goes out (`Some`) and whether it
    /// restarts the track (`Some(true)`): the packets of keyframes go out, each new keyframe
    /// restarting the track so that sequence numbers stay contiguous over the frames left out;
    /// the rest do not. A new keyframe also ends the mode when the viewer was found clean again.
    fn keyframe_only_passes(&mut self, pkt: &SourcePacket) -> Option<bool> {
        let l = &mut self.ladder;
        if pkt.keyframe_start && l.keyframe_ts != Some(pkt.timestamp) {
            l.keyframe_ts = Some(pkt.timestamp);
            if l.resume_at_keyframe {
                l.keyframes_only = false;
                l.resume_at_keyframe = false;
                l.keyframe_ts = None;
            }
            return Some(true);
        }
        (l.keyframe_ts == Some(pkt.timestamp)).then_some(false)
    }

    /// Moves a paced viewer to rendition `k` at once with `gop`, that rendition's cache (the
    /// keyframe first, at the viewer's pace), instead of at its next keyframe: a viewer moved
    /// down for loss is not left with broken pictures for up to a GOP. The cached frames'
    /// timestamps come after the last one the viewer was sent ([`GopCache::offset_after`]).
    /// `None`, and nothing changed, when it cannot (not connected or paced, nothing sent yet,
    /// or a cache beyond what it may hold back).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn switch_with_cache(
        &mut self,
        k: u8,
        gop: &GopCache,
        now: Instant,
        grace: Duration,
        out: &mut VecDeque<Output>,
        news: &mut Vec<ViewerNews>,
    ) -> Option<Sent> {
        let (_, max_pending) = self.pacing?;
        let last = self.video.last_ts?;
        if self.dead
            || self.state != ViewerState::Connected
            || gop.packets.is_empty()
            || gop.packets.len() > max_pending
            || !gop.ends_a_frame()
        {
            return None;
        }
        debug!(session = %self.session, from = self.rendition, to = k, "rendition switch from the cache");
        self.rendition = k;
        self.ladder.target = None;
        self.ladder.settle(now);
        self.video.ts_offset = gop.offset_after(last);
        self.send_gop(gop.primed(), None, now, grace, out, news)
    }

    /// Moves the viewer to the rendition `pkt` (a keyframe start) belongs to: its video
    /// starts again at this keyframe, sequence numbers continuing, and the new rendition's RTP
    /// clock is rebased to go on one frame after the last timestamp sent.
    fn switch_to(&mut self, pkt: &SourcePacket, now: Instant) {
        debug!(session = %self.session, from = self.rendition, to = pkt.rendition, "rendition switch");
        self.rendition = pkt.rendition;
        self.ladder.target = None;
        self.ladder.settle(now);
        self.video.offset = None;
        self.video.backlog = None;
        self.video.ts_offset = match self.video.last_ts {
            Some(last) => last.wrapping_add(FRAME_TICKS).wrapping_sub(pkt.timestamp),
            None => 0,
        };
    }

    /// Hands `pkt` to str0m for this viewer, mapped to its sequence numbers.
    fn write_rtp(&mut self, pkt: &SourcePacket, now: Instant) -> bool {
        let track = match pkt.kind {
            MediaKind::Video => &mut self.video,
            MediaKind::Audio => &mut self.audio,
        };
        let Some(seq) = track.map(pkt) else {
            return false;
        };
        let timestamp = pkt.timestamp.wrapping_add(track.ts_offset);
        track.last_ts = Some(timestamp);
        if pkt.keyframe_start {
            // A keyframe goes out anyway.
            self.keyframe_wanted = false;
        }
        let (pt, ssrc, nackable) = (track.pt, track.ssrc, track.nackable);
        let mut api = self.rtc.direct_api();
        let Some(tx) = api.stream_tx(&ssrc) else {
            return false;
        };
        tx.write_rtp(
            RtpWrite::new(pt, SeqNo::from(seq), timestamp, now, pkt.payload.clone())
                .marker(pkt.marker)
                .nackable(nackable),
        );
        true
    }

    /// Feeds str0m a timeout and drains it.
    pub(crate) fn timeout(
        &mut self,
        now: Instant,
        grace: Duration,
        out: &mut VecDeque<Output>,
        news: &mut Vec<ViewerNews>,
    ) {
        // Releases whatever was written, so nothing is left to flush.
        self.unflushed = 0;
        if let Some(r) = &mut self.resend {
            // Back to the steady size after a suspension (see `ResendBudget`) or a prime. The
            // shrink drops the cache's packets, all older than `cache_age` but the last few.
            let resumed = r.budget.resume(now);
            let shrink = r.shrink_at.is_some_and(|t| now >= t);
            if resumed || shrink {
                r.shrink_at = None;
                r.grown = false;
                let (packets, age) = (r.cache_packets, r.cache_age);
                self.set_rtx_cache(packets, age);
            }
        }
        if let Err(e) = self.rtc.handle_input(RtcInput::Timeout(now)) {
            debug!(session = %self.session, error = %e, "timeout failed");
            self.dead = true;
        }
        self.drain(now, grace, out, news);
    }

    /// Nominates the pair the viewer's datagrams from `source` to our `destination` came on,
    /// with a USE-CANDIDATE check made with the session's credentials (see [`crate::path`]),
    /// and drains what follows (DTLS or media now on that path). False if str0m refused it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn nominate(
        &mut self,
        proto: Protocol,
        source: SocketAddr,
        destination: SocketAddr,
        now: Instant,
        grace: Duration,
        out: &mut VecDeque<Output>,
        news: &mut Vec<ViewerNews>,
    ) -> bool {
        let local = self.rtc.direct_api().local_ice_credentials();
        let username = format!("{}:{}", local.ufrag, self.remote_creds.0);
        let provider = crate::dtls::provider();
        let hmac = |k: &[u8], p: &[&[u8]]| provider.sha1_hmac_provider.sha1_hmac(k, p);
        let Some((bytes, tid)) = path::nomination(&username, &local.pass, hmac) else {
            return false;
        };
        let Ok(contents) = DatagramRecv::try_from(&bytes[..]) else {
            return false;
        };
        let input = RtcInput::Receive(now, Receive { proto, source, destination, contents });
        if !self.rtc.accepts(&input) {
            return false;
        }
        self.path.suppress = Some(tid);
        if let Err(e) = self.rtc.handle_input(input) {
            debug!(session = %self.session, error = %e, "nomination refused");
            return false;
        }
        // str0m makes the nominated pair its send path on its next timeout.
        self.timeout(now, grace, out, news);
        self.path.suppress = None;
        true
    }

    /// Moves the media to `to` (see [`crate::path`]): the current path's candidates are
    /// invalidated (their pairs go, and checks from there are ignored from now on) and the pair
    /// from `to` is nominated.
    pub(crate) fn move_path(
        &mut self,
        to: SocketAddr,
        destination: SocketAddr,
        now: Instant,
        grace: Duration,
        out: &mut VecDeque<Output>,
        news: &mut Vec<ViewerNews>,
    ) -> bool {
        if let Some(old) = self.path.sending_to {
            let mut api = self.rtc.direct_api();
            for c in path::candidates_at(old) {
                api.invalidate_candidate(&c);
            }
        }
        self.path.candidate = None;
        self.path.heard_at = Some(now);
        self.nominate(Protocol::Udp, to, destination, now, grace, out, news)
    }

    /// Starts a graceful close (RTCP BYE, DTLS close_notify) and drains what it produces.
    pub(crate) fn close(&mut self, now: Instant, out: &mut VecDeque<Output>) {
        let mut news = Vec::new();
        if self.rtc.close().is_ok() {
            let _ = self.rtc.handle_input(RtcInput::Timeout(now));
            self.drain(now, Duration::ZERO, out, &mut news);
        }
        if self.rtc.is_alive() {
            self.rtc.disconnect();
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests pick a real starting instant
mod tests {
    use super::*;

    #[test]
    fn the_ladder_moves_down_after_two_lossy_reports_and_up_after_ten_clean_seconds() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut l = Ladder::default();
        assert_eq!(l.on_report(0.2, t0), None, "one lossy report is not enough");
        assert_eq!(l.on_report(0.01, t0 + s), None, "a clean one in between starts again");
        assert_eq!(l.on_report(0.2, t0 + 2 * s), None);
        assert_eq!(l.on_report(0.1, t0 + 3 * s), Some(Step::Down));
        // Clean from 4 s; a middling report (between the thresholds) restarts the clean time.
        assert_eq!(l.on_report(0.0, t0 + 4 * s), None);
        assert_eq!(l.on_report(0.05, t0 + 8 * s), None);
        assert_eq!(l.on_report(0.0, t0 + 9 * s), None);
        assert_eq!(l.on_report(0.0, t0 + 18 * s), None);
        assert_eq!(l.on_report(0.0, t0 + 19 * s), Some(Step::Up));
        assert_eq!(l.on_report(0.0, t0 + 20 * s), None, "the next rung waits ten more seconds");
    }

    #[test]
    fn a_move_up_followed_by_loss_goes_back_down_at_once_and_the_next_waits_twice_as_long() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut l = Ladder::default();
        assert_eq!(l.on_report(0.0, t0), None);
        assert_eq!(l.on_report(0.0, t0 + 10 * s), Some(Step::Up));
        assert_eq!(l.on_report(0.3, t0 + 12 * s), Some(Step::Down), "one lossy report suffices");
        // Clean again from 13 s: now 20 s, not 10, before the next move up.
        assert_eq!(l.on_report(0.0, t0 + 13 * s), None);
        assert_eq!(l.on_report(0.0, t0 + 23 * s), None);
        assert_eq!(l.on_report(0.0, t0 + 33 * s), Some(Step::Up));
        // Failed again: 40 s.
        assert_eq!(l.on_report(0.2, t0 + 34 * s), Some(Step::Down));
        assert_eq!(l.on_report(0.0, t0 + 35 * s), None);
        assert_eq!(l.on_report(0.0, t0 + 74 * s), None);
        assert_eq!(l.on_report(0.0, t0 + 75 * s), Some(Step::Up));
        // This one holds past the window: loss then takes two reports again, and the next
        // move up 10 s.
        assert_eq!(l.on_report(0.2, t0 + 86 * s), None);
        assert_eq!(l.on_report(0.2, t0 + 87 * s), Some(Step::Down));
        assert_eq!(l.on_report(0.0, t0 + 88 * s), None);
        assert_eq!(l.on_report(0.0, t0 + 98 * s), Some(Step::Up));
    }
}
