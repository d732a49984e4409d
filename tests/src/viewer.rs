//! A blocking WHEP viewer for end-to-end tests: one str0m [`Rtc`] in RTP mode on its own thread
//! and its own UDP socket on 127.0.0.1, counting the RTP packets it receives per media kind.
//!
//! ```text
//! let viewer = Viewer::connect(server, "/whep/demo", None)?;
//! assert!(viewer.wait_for(Duration::from_secs(10), |s| s.video_packets > 100));
//! assert_eq!(viewer.delete()?, 200);
//! assert!(viewer.wait_for(Duration::from_secs(5), |s| s.closed));
//! ```
//!
//! For load tests, [`Viewer::connect_with`] takes [`ViewerOptions`]:
//!
//! - a [`Hub`]: one thread polling the sockets of many viewers with `epoll` instead of one
//!   thread per viewer;
//! - light mode: once ICE and DTLS are up, SRTP media packets are not decrypted; their plaintext
//!   RTP header (payload type, sequence number) is counted into the same [`Stats`]. STUN, DTLS
//!   and SRTCP still go to str0m (consent checks keep the session alive), and video still goes
//!   to str0m until the first keyframe, so [`Stats::first_keyframe_at`] stays exact;
//! - retrying a POST answered with 429 after its `Retry-After`;
//! - one DTLS certificate shared by all viewers of the process.
//!
//! ```text
//! let hub = Hub::new()?;
//! let options = ViewerOptions::default().light(true).hub(&hub).retry_429(Duration::from_secs(20));
//! let viewers: Vec<Viewer> =
//!     (0..500).map(|_| Viewer::connect_with(server, "/whep/demo", None, &options)).collect()?;
//! ```

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{setsockopt, sockopt};
use str0m::change::SdpAnswer;
use str0m::config::DtlsCert;
use str0m::format::Codec;
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::RtpPacket;
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};

use crate::http;

/// How long ICE may stay `Disconnected` before the viewer gives up and closes.
pub const DISCONNECTED_GRACE: Duration = Duration::from_secs(3);

/// Cap of str0m's STUN retransmission timeout, also the interval of its consent checks.
/// str0m's default of 3 s lets ICE notice a vanished server only after about 21 s; with 1 s it
/// takes about 8.5 s (9 unanswered checks), then [`DISCONNECTED_GRACE`] follows.
const MAX_STUN_RTO: Duration = Duration::from_secs(1);

/// Bounds of the socket read timeout of the viewer thread, so str0m gets a timeout input at
/// least every 50 ms.
const MIN_WAIT: Duration = Duration::from_millis(1);
const MAX_WAIT: Duration = Duration::from_millis(50);

/// Longest sleep of a [`Hub`] thread between two looks at a viewer's timers (str0m's own
/// deadlines are usually sooner), so the ICE disconnect grace is checked often enough.
const HUB_MAX_WAIT: Duration = Duration::from_millis(250);

/// Datagrams a [`Hub`] reads from one ready socket before it serves the next one.
const HUB_RECV_BATCH: usize = 8;

/// `epoll` token of the hub's wake-up eventfd.
const HUB_WAKE: u64 = u64::MAX;

/// Bytes after the payload of an SRTP packet that light mode does not decrypt: the 16-byte tag
/// of the AES-GCM profiles str0m prefers (`AES_CM_128_HMAC_SHA1_80` would be 10).
pub const SRTP_TAG_LEN: usize = 16;

/// Polling interval of [`Viewer::wait_for`].
const POLL: Duration = Duration::from_millis(20);

/// Values of the stop flag shared with the thread.
const RUN: u8 = 0;
const STOP_GRACEFUL: u8 = 1;
const STOP_SILENT: u8 = 2;

/// What a viewer has seen so far.
///
/// The viewer runs str0m in RTP mode: the counters count RTP packets (after SRTP decryption,
/// de-duplication and RTX repair by str0m), not frames. Packets with an empty payload (padding)
/// are not counted.
///
/// In light mode ([`ViewerOptions::light`]) the media packets after the first keyframe are
/// counted from their plaintext RTP header without decryption: every packet counts, the bytes
/// are the encrypted payload minus [`SRTP_TAG_LEN`], and the sequence numbers are extended here
/// (nothing is de-duplicated or repaired).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Whether str0m reported `Event::Connected` (ICE and DTLS up). Stays true after a close.
    pub connected: bool,
    /// The last ICE connection state as its `Debug` name: `New`, `Checking`, `Connected`,
    /// `Completed` or `Disconnected`.
    pub ice_state: String,
    /// RTP packets received for the video m-line.
    pub video_packets: u64,
    /// RTP packets received for the audio m-line.
    pub audio_packets: u64,
    /// RTP payload bytes (without RTP headers) received for video.
    pub video_bytes: u64,
    /// RTP payload bytes (without RTP headers) received for audio.
    pub audio_bytes: u64,
    /// H264 keyframes seen: distinct RTP timestamps with a packet carrying an SPS (NAL type 7)
    /// or the start of an IDR slice (NAL type 5), also inside STAP-A or as FU-A start fragment.
    pub keyframes: u64,
    /// Whether the first video packet received starts a keyframe (see [`is_h264_keyframe`]).
    pub first_video_is_keyframe: Option<bool>,
    /// Whether the viewer thread has ended; nothing is counted any more.
    pub closed: bool,
    /// Why the viewer thread ended, once it has.
    pub close_reason: Option<String>,
    /// When the viewer thread ended.
    pub closed_at: Option<Instant>,
    /// When str0m reported `Event::Connected`.
    pub connected_at: Option<Instant>,
    /// When the first video packet arrived.
    pub first_video_at: Option<Instant>,
    /// When the first audio packet arrived.
    pub first_audio_at: Option<Instant>,
    /// When the last video or audio packet arrived.
    pub last_media_at: Option<Instant>,
    /// When the last video packet arrived.
    pub last_video_at: Option<Instant>,
    /// PLIs handed to str0m after [`Viewer::request_keyframe`].
    pub keyframe_requests: u64,
    /// When the offer was POSTed.
    pub posted_at: Option<Instant>,
    /// When the 201 with the answer arrived.
    pub answered_at: Option<Instant>,
    /// When the first video packet starting a keyframe arrived (the first decodable frame).
    pub first_keyframe_at: Option<Instant>,
    /// Sequence accounting of the video packets.
    pub video_seq: SeqStats,
    /// Sequence accounting of the audio packets.
    pub audio_seq: SeqStats,
    /// When the first POST of the offer was sent; earlier than [`Stats::posted_at`] when 429
    /// answers were retried ([`ViewerOptions::retry_429`]).
    pub first_posted_at: Option<Instant>,
    /// POSTs answered with 429 and retried before the 201.
    pub post_retries: u64,
    /// Media packets counted from their RTP header without decryption (light mode).
    pub undecrypted_packets: u64,
    /// RTP packets of no known media: a payload type that is not the answer's H264 or Opus
    /// (light mode), or that str0m could not map to an m-line.
    pub unknown_packets: u64,
    /// The longest time between two video packets' arrivals (a stall of the sender shows here
    /// when the source sends evenly).
    pub max_video_gap: Duration,
    /// Times more than 100 ms passed between two video packets' arrivals.
    pub video_gaps_over_100ms: u64,
    /// Times more than a second passed between two video packets' arrivals (a pause no load
    /// on the machine explains; a blocked server loop would show here).
    pub video_gaps_over_1s: u64,
}

impl Stats {
    /// Records a video packet's arrival at `now` in the gap statistics (before
    /// `last_video_at` moves).
    fn video_arrived(&mut self, now: Instant) {
        if let Some(last) = self.last_video_at {
            let gap = now.saturating_duration_since(last);
            self.max_video_gap = self.max_video_gap.max(gap);
            if gap > Duration::from_millis(100) {
                self.video_gaps_over_100ms += 1;
            }
            if gap > Duration::from_secs(1) {
                self.video_gaps_over_1s += 1;
            }
        }
        self.last_video_at = Some(now);
    }
}

/// Loss and reordering of one media kind, from str0m's extended (64-bit) sequence numbers,
/// after str0m's de-duplication and NACK repair (in light mode: from the 16-bit sequence
/// numbers of the RTP headers, extended by [`extend_seq`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqStats {
    /// The first sequence number seen.
    pub first: Option<u64>,
    /// The highest sequence number seen.
    pub highest: u64,
    /// Packets received (padding included).
    pub received: u64,
    /// Packets that arrived after a higher sequence number.
    pub reordered: u64,
}

impl SeqStats {
    fn record(&mut self, seq: u64) {
        self.received += 1;
        match self.first {
            None => {
                self.first = Some(seq);
                self.highest = seq;
            }
            Some(_) if seq > self.highest => self.highest = seq,
            Some(_) => self.reordered += 1,
        }
    }

    /// Packets the sequence numbers say were sent since the first one seen.
    pub fn expected(&self) -> u64 {
        self.first.map_or(0, |f| self.highest - f + 1)
    }

    /// Packets missing: expected minus received (never negative).
    pub fn lost(&self) -> u64 {
        self.expected().saturating_sub(self.received)
    }

    /// Records a 16-bit RTP sequence number, extended against the highest one seen so far.
    fn record_u16(&mut self, seq: u16) {
        let ext = extend_seq(self.first.map(|_| self.highest), seq);
        self.record(ext);
    }
}

/// Extends a 16-bit RTP sequence number to 64 bits: the value congruent to `seq` modulo 2^16
/// that is nearest to `highest` (the highest extended number seen so far). The first number
/// (`highest` = `None`) becomes `2^16 + seq`, so that packets reordered before it do not
/// underflow.
pub fn extend_seq(highest: Option<u64>, seq: u16) -> u64 {
    let seq = u64::from(seq);
    let Some(highest) = highest else {
        return (1 << 16) | seq;
    };
    let candidate = (highest & !0xffff) | seq;
    if candidate > highest && candidate - highest > 0x8000 && candidate >= 0x1_0000 {
        candidate - 0x1_0000
    } else if candidate < highest && highest - candidate > 0x8000 {
        candidate + 0x1_0000
    } else {
        candidate
    }
}

/// The plaintext header of an SRTP packet, as light mode reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpHead {
    /// Payload type.
    pub pt: u8,
    /// Marker bit.
    pub marker: bool,
    /// Sequence number.
    pub seq: u16,
    /// RTP timestamp.
    pub timestamp: u32,
    /// SSRC.
    pub ssrc: u32,
    /// Header length: 12 bytes, the CSRCs and the header extension.
    pub header_len: usize,
}

/// Parses the header of an RTP (or SRTP) packet; `None` for anything else: not version 2, an
/// RTCP packet type (payload type 64..=95, RFC 5761), or too short for its CSRCs and extension.
pub fn parse_rtp_header(data: &[u8]) -> Option<RtpHead> {
    let [b0, b1, s0, s1, t0, t1, t2, t3, c0, c1, c2, c3, ..] = *data else {
        return None;
    };
    if b0 >> 6 != 2 {
        return None;
    }
    let pt = b1 & 0x7f;
    if (64..=95).contains(&pt) {
        return None;
    }
    let mut header_len = 12 + 4 * usize::from(b0 & 0x0f);
    if b0 & 0x10 != 0 {
        let words = data.get(header_len + 2..header_len + 4)?;
        header_len += 4 + 4 * usize::from(u16::from_be_bytes([words[0], words[1]]));
    }
    (header_len <= data.len()).then_some(RtpHead {
        pt,
        marker: b1 & 0x80 != 0,
        seq: u16::from_be_bytes([s0, s1]),
        timestamp: u32::from_be_bytes([t0, t1, t2, t3]),
        ssrc: u32::from_be_bytes([c0, c1, c2, c3]),
        header_len,
    })
}

/// The media kind of each payload type of an SDP answer: the H264 payload types of its video
/// m-lines and the Opus ones of its audio m-lines (RTX, RED, FEC and others are left out).
pub fn media_payload_types(sdp: &str) -> HashMap<u8, MediaKind> {
    let mut kinds = HashMap::new();
    let mut kind = None;
    for line in sdp.lines() {
        let line = line.trim_end();
        if let Some(m) = line.strip_prefix("m=") {
            kind = match m.split(' ').next() {
                Some("video") => Some((MediaKind::Video, "h264")),
                Some("audio") => Some((MediaKind::Audio, "opus")),
                _ => None,
            };
        } else if let (Some((kind, codec)), Some(map)) = (kind, line.strip_prefix("a=rtpmap:")) {
            let Some((pt, encoding)) = map.split_once(' ') else { continue };
            let name = encoding.split('/').next().unwrap_or_default();
            if let Ok(pt) = pt.parse::<u8>()
                && name.eq_ignore_ascii_case(codec)
            {
                kinds.insert(pt, kind);
            }
        }
    }
    kinds
}

/// How [`Viewer::connect_with`] sets up and runs a viewer. The default is what
/// [`Viewer::connect`] does: its own thread, every packet through str0m, no retries, its own
/// DTLS certificate.
///
/// Clones share the counter of [`ViewerOptions::retries`].
#[derive(Debug, Clone, Default)]
pub struct ViewerOptions {
    light: bool,
    hub: Option<Hub>,
    retry_429: Option<Duration>,
    shared_cert: bool,
    recv_buffer: Option<usize>,
    retries: Arc<AtomicU64>,
    vp8: bool,
    tcp: Option<Option<usize>>,
    user_agent: Option<String>,
}

impl ViewerOptions {
    /// The `User-Agent` its POST carries (none by default).
    #[must_use]
    pub fn user_agent(mut self, ua: &str) -> Self {
        self.user_agent = Some(ua.to_owned());
        self
    }

    /// Light mode: after ICE and DTLS connect, SRTP media packets are counted from their
    /// plaintext RTP header and never decrypted (video only after the first keyframe, which
    /// str0m must decrypt to find). STUN, DTLS and SRTCP still go to str0m.
    #[must_use]
    pub fn light(mut self, on: bool) -> Self {
        self.light = on;
        self
    }

    /// Runs the viewer on `hub`'s thread rather than on a thread of its own.
    #[must_use]
    pub fn hub(mut self, hub: &Hub) -> Self {
        self.hub = Some(hub.clone());
        self
    }

    /// Answers of 429 Too Many Requests are retried after their `Retry-After` (1 s when it is
    /// missing or not in seconds) until `give_up_after` has passed since the first POST; then
    /// the 429 is returned as [`ViewerError::Rejected`].
    #[must_use]
    pub fn retry_429(mut self, give_up_after: Duration) -> Self {
        self.retry_429 = Some(give_up_after);
        self
    }

    /// Offers VP8 as its only video codec (as Firefox without OpenH264 does), not H264.
    #[must_use]
    pub fn vp8_only(mut self, on: bool) -> Self {
        self.vp8 = on;
        self
    }

    /// Uses one DTLS certificate, made once per process, instead of one per viewer (saves a key
    /// generation per viewer; the server sees the same fingerprint in every offer).
    #[must_use]
    pub fn share_dtls_cert(mut self, on: bool) -> Self {
        self.shared_cert = on;
        self
    }

    /// Asks for this `SO_RCVBUF` on the viewer's socket (the kernel doubles it and caps it at
    /// `net.core.rmem_max`), so that a late read loses nothing.
    #[must_use]
    pub fn recv_buffer(mut self, bytes: usize) -> Self {
        self.recv_buffer = Some(bytes);
        self
    }

    /// Whether light mode is on.
    pub fn is_light(&self) -> bool {
        self.light
    }

    /// 429 answers retried so far by every connect that used these options or a clone.
    /// ICE over TCP only (RFC 6544): the viewer offers no UDP candidate and connects to the
    /// server's passive TCP candidate from the answer, asking for `rcvbuf` bytes of receive
    /// buffer when given (a small one makes a stall felt at once). Not on a [`Hub`].
    #[must_use]
    pub fn tcp(mut self, rcvbuf: Option<usize>) -> Self {
        self.tcp = Some(rcvbuf);
        self
    }

    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }
}

/// The DTLS certificate shared by viewers with [`ViewerOptions::share_dtls_cert`].
fn shared_cert() -> Option<DtlsCert> {
    static CERT: OnceLock<Option<DtlsCert>> = OnceLock::new();
    CERT.get_or_init(|| str0m::crypto::from_feature_flags().dtls_provider.generate_certificate())
        .clone()
}

/// The `Retry-After` of a response in seconds, if it has one in that form.
fn retry_after(response: &http::Response) -> Option<Duration> {
    let secs: u64 = response.header("retry-after")?.trim().parse().ok()?;
    Some(Duration::from_secs(secs))
}

/// Why [`Viewer::connect`] failed.
#[derive(Debug)]
pub enum ViewerError {
    /// The HTTP exchange with the server failed.
    Http(io::Error),
    /// The server answered the offer with a status other than 201 Created.
    Rejected {
        /// The HTTP status code.
        status: u16,
        /// The response body as text.
        body: String,
    },
    /// The local offer could not be made or the server's answer was not acceptable.
    Sdp(String),
    /// Setting up the UDP socket, the viewer thread or the hub registration failed.
    Io(io::Error),
}

impl fmt::Display for ViewerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Http(e) => write!(f, "WHEP request failed: {e}"),
            Self::Rejected { status, body } => {
                write!(f, "WHEP offer rejected with {status}: {body}")
            }
            Self::Sdp(e) => write!(f, "SDP negotiation failed: {e}"),
            Self::Io(e) => write!(f, "viewer setup failed: {e}"),
        }
    }
}

impl std::error::Error for ViewerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Http(e) | Self::Io(e) => Some(e),
            Self::Rejected { .. } | Self::Sdp(_) => None,
        }
    }
}

/// One WHEP viewer: a str0m `Rtc` (ICE controlling, RTP mode, H264 and Opus only) receiving a
/// recvonly video and a recvonly audio m-line, driven by its own thread on its own UDP socket
/// bound to 127.0.0.1 (so the server must offer an IPv4 candidate reachable from loopback).
///
/// The thread ends, setting [`Stats::closed`], when the server closes DTLS, when str0m's `Rtc`
/// is no longer alive, when ICE stays `Disconnected` longer than [`DISCONNECTED_GRACE`] (ICE
/// gives up about 8.5 s after the server stops answering), on a socket error, or on
/// [`Viewer::close`], [`Viewer::abandon`] or drop. Dropping stops the thread as `close` does.
/// On a [`Hub`] the same holds for the viewer's share of the hub thread.
#[derive(Debug)]
pub struct Viewer {
    server: SocketAddr,
    endpoint: String,
    token: Option<String>,
    location: String,
    etag: Option<String>,
    answer: String,
    local_addr: SocketAddr,
    stats: Arc<Mutex<Stats>>,
    stop: Arc<AtomicU8>,
    pli: Arc<AtomicBool>,
    runner: Runner,
    /// Set: a TCP viewer stops reading its connection ([`Viewer::stall`]).
    stall: Arc<AtomicBool>,
}

/// What runs a viewer's [`Worker`].
#[derive(Debug)]
enum Runner {
    /// Its own thread; `None` once joined.
    Thread(Option<JoinHandle<()>>),
    /// A hub's thread; `done` disconnects when the hub has dropped the worker, `None` once
    /// waited for.
    Hub { hub: Hub, token: u64, done: Option<mpsc::Receiver<()>> },
}

impl Viewer {
    /// Offers recvonly H264 video and recvonly Opus audio to `endpoint` (a path such as
    /// `/whep/demo`) on `server`, applies the answer and starts the viewer thread.
    ///
    /// `token`, if given, is sent as `Authorization: Bearer <token>`, also by
    /// [`Viewer::delete`]. Any status other than 201 gives [`ViewerError::Rejected`].
    pub fn connect(
        server: SocketAddr,
        endpoint: &str,
        token: Option<&str>,
    ) -> Result<Self, ViewerError> {
        Self::connect_with(server, endpoint, token, &ViewerOptions::default())
    }

    /// [`Viewer::connect`] with [`ViewerOptions`]: light mode, a shared [`Hub`] thread, 429
    /// retries, a shared DTLS certificate.
    pub fn connect_with(
        server: SocketAddr,
        endpoint: &str,
        token: Option<&str>,
        options: &ViewerOptions,
    ) -> Result<Self, ViewerError> {
        // The local address towards the server: loopback for a local server, else the one the
        // kernel routes through (connecting a UDP socket sends nothing).
        let any = SocketAddr::new(
            if server.is_ipv4() {
                Ipv4Addr::UNSPECIFIED.into()
            } else {
                Ipv6Addr::UNSPECIFIED.into()
            },
            0,
        );
        let local_ip = if server.ip().is_loopback() {
            server.ip()
        } else {
            UdpSocket::bind(any)
                .and_then(|s| s.connect(server).map(|()| s))
                .and_then(|s| s.local_addr())
                .map_err(ViewerError::Io)?
                .ip()
        };
        let socket = UdpSocket::bind((local_ip, 0)).map_err(ViewerError::Io)?;
        let local_addr = socket.local_addr().map_err(ViewerError::Io)?;
        if options.hub.is_some() {
            socket.set_nonblocking(true).map_err(ViewerError::Io)?;
        }
        if let Some(bytes) = options.recv_buffer {
            setsockopt(&socket, sockopt::RcvBuf, &bytes).map_err(|e| ViewerError::Io(e.into()))?;
        }

        let mut config = RtcConfig::new()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_h264(!options.vp8)
            .enable_vp8(options.vp8)
            .enable_opus(true, false)
            // DTLS configuration validated once, not per viewer (~1 ms of CPU each).
            .set_crypto_provider(whep_core::dtls::provider());
        // This setter takes `&mut self`, unlike the rest of the builder.
        config.set_max_stun_rto(MAX_STUN_RTO);
        if options.shared_cert
            && let Some(cert) = shared_cert()
        {
            config = config.set_dtls_cert(cert);
        }
        let mut rtc = config.build(Instant::now());
        if options.tcp.is_none() {
            let candidate = Candidate::host(local_addr, "udp")
                .map_err(|e| ViewerError::Sdp(format!("host candidate {local_addr}: {e}")))?;
            if rtc.add_local_candidate(candidate).is_none() {
                return Err(ViewerError::Sdp(format!("host candidate {local_addr} not accepted")));
            }
        }
        let mut api = rtc.sdp_api();
        let video_mid = api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
        let audio_mid = api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
        let Some((offer, pending)) = api.apply() else {
            return Err(ViewerError::Sdp("str0m made no offer".to_owned()));
        };

        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("Content-Type", "application/sdp"), ("Accept", "application/sdp")];
        if let Some(ua) = &options.user_agent {
            headers.push(("User-Agent", ua.as_str()));
        }
        if let Some(auth) = &auth {
            headers.push(("Authorization", auth));
        }
        let offer = offer.to_sdp_string();
        let first_posted_at = Instant::now();
        let mut post_retries = 0;
        let (posted_at, response) = loop {
            let posted_at = Instant::now();
            let response = http::request(server, "POST", endpoint, &headers, offer.as_bytes())
                .map_err(ViewerError::Http)?;
            let Some(give_up_after) = options.retry_429.filter(|_| response.status == 429) else {
                break (posted_at, response);
            };
            let left = give_up_after.saturating_sub(first_posted_at.elapsed());
            if left.is_zero() {
                break (posted_at, response);
            }
            let wait = retry_after(&response).unwrap_or(Duration::from_secs(1));
            post_retries += 1;
            options.retries.fetch_add(1, Ordering::Relaxed);
            thread::sleep(wait.max(Duration::from_millis(10)).min(left));
        };
        let answered_at = Instant::now();
        if response.status != 201 {
            return Err(ViewerError::Rejected { status: response.status, body: response.text() });
        }
        let location = response.header("location").unwrap_or_default().to_owned();
        if location.is_empty() {
            tracing::warn!(endpoint, "201 without a Location header");
        }
        let answer = response.text();
        let parsed = SdpAnswer::from_sdp_string(&answer)
            .map_err(|e| ViewerError::Sdp(format!("bad answer: {e}")))?;
        rtc.sdp_api()
            .accept_answer(pending, parsed)
            .map_err(|e| ViewerError::Sdp(format!("answer not accepted: {e}")))?;
        let stall = Arc::new(AtomicBool::new(false));
        let mut local_addr = local_addr;
        let tcp = match options.tcp {
            None => None,
            Some(rcvbuf) => {
                let link = TcpLink::connect(&answer, server, rcvbuf, Arc::clone(&stall))?;
                local_addr = link.local;
                let candidate = Candidate::host(local_addr, "tcp")
                    .map_err(|e| ViewerError::Sdp(format!("TCP candidate {local_addr}: {e}")))?;
                if rtc.add_local_candidate(candidate).is_none() {
                    return Err(ViewerError::Sdp(format!("TCP candidate {local_addr} refused")));
                }
                Some(link)
            }
        };

        let stats = Arc::new(Mutex::new(Stats {
            ice_state: "New".to_owned(),
            posted_at: Some(posted_at),
            answered_at: Some(answered_at),
            first_posted_at: Some(first_posted_at),
            post_retries,
            ..Stats::default()
        }));
        let stop = Arc::new(AtomicU8::new(RUN));
        let pli = Arc::new(AtomicBool::new(false));
        let mut worker = Worker {
            rtc,
            socket,
            local_addr,
            stats: Arc::clone(&stats),
            stop: Arc::clone(&stop),
            pli: Arc::clone(&pli),
            video_mid,
            kinds: HashMap::from([(video_mid, MediaKind::Video), (audio_mid, MediaKind::Audio)]),
            last_keyframe_ts: None,
            vp8: options.vp8,
            disconnected_since: None,
            remote_closed: false,
            light: options.light.then(|| media_payload_types(&answer)),
            connected: false,
            keyframe_seen: false,
            scheduled: None,
            done: None,
            tcp,
        };
        let runner = if let Some(hub) = options.hub.as_ref().filter(|_| options.tcp.is_none()) {
            let (done_tx, done) = mpsc::channel();
            worker.done = Some(done_tx);
            let token = hub.add(worker).map_err(ViewerError::Io)?;
            Runner::Hub { hub: hub.clone(), token, done: Some(done) }
        } else {
            let thread = thread::Builder::new()
                .name(format!("whep-viewer-{}", local_addr.port()))
                .spawn(move || worker.run())
                .map_err(ViewerError::Io)?;
            Runner::Thread(Some(thread))
        };
        tracing::debug!(%local_addr, location, "viewer started");

        Ok(Self {
            server,
            endpoint: endpoint.to_owned(),
            token: token.map(str::to_owned),
            location,
            etag: response.header("etag").map(str::to_owned),
            answer,
            local_addr,
            stats,
            stop,
            pli,
            runner,
            stall,
        })
    }

    /// A TCP viewer ([`ViewerOptions::tcp`]) stops reading its connection, as a client that
    /// cannot keep up does; it goes on driving str0m's timers.
    pub fn stall(&self) {
        self.stall.store(true, Ordering::SeqCst);
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        lock(&self.stats).clone()
    }

    /// The `Location` header of the 201 response as sent (empty if it was missing).
    pub fn location(&self) -> &str {
        &self.location
    }

    /// The `ETag` header of the 201 response, if any.
    pub fn etag(&self) -> Option<&str> {
        self.etag.as_deref()
    }

    /// The SDP answer as received.
    pub fn answer(&self) -> &str {
        &self.answer
    }

    /// The viewer's UDP address (its ICE host candidate).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Polls the stats every 20 ms until `pred` holds (true) or `timeout` passes (false).
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Stats) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.stats()) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            thread::sleep(POLL.min(deadline - now));
        }
    }

    /// Asks the viewer thread to send a PLI for the video stream, as a player does after loss.
    /// [`Stats::keyframe_requests`] counts the PLIs handed to str0m.
    pub fn request_keyframe(&self) {
        self.pli.store(true, Ordering::SeqCst);
        if let Runner::Hub { hub, token, .. } = &self.runner {
            hub.poke(*token);
        }
    }

    /// Sends `DELETE` to the session's location and returns the status. The viewer keeps
    /// running, so tests can watch the server close the peer connection.
    ///
    /// An absolute location (`http://host/path`) is sent to the server's address with only its
    /// path; a relative one without a leading `/` is resolved against the endpoint.
    pub fn delete(&self) -> io::Result<u16> {
        if self.location.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no Location to delete"));
        }
        let target = resolve_location(&self.endpoint, &self.location);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        Ok(http::request(self.server, "DELETE", &target, &headers, &[])?.status)
    }

    /// Stops the viewer politely and waits for its thread: str0m closes the connection (RTCP
    /// BYE and DTLS close_notify are sent), so the server can notice at once.
    pub fn close(mut self) {
        self.shutdown(STOP_GRACEFUL);
    }

    /// Stops the viewer thread without sending anything more, as a crashed or vanished client
    /// would; the server only notices by ICE timeout.
    pub fn abandon(mut self) {
        self.shutdown(STOP_SILENT);
    }

    fn shutdown(&mut self, mode: u8) {
        match &mut self.runner {
            Runner::Thread(thread) => {
                let Some(thread) = thread.take() else {
                    return;
                };
                // Keep the first request if the thread was already asked to stop.
                let _ = self.stop.compare_exchange(RUN, mode, Ordering::SeqCst, Ordering::SeqCst);
                if thread.join().is_err() {
                    tracing::error!(local_addr = %self.local_addr, "viewer thread panicked");
                    let mut stats = lock(&self.stats);
                    stats.closed = true;
                    stats.close_reason.get_or_insert_with(|| "viewer thread panicked".to_owned());
                }
            }
            Runner::Hub { hub, token, done } => {
                let Some(done) = done.take() else {
                    return;
                };
                let _ = self.stop.compare_exchange(RUN, mode, Ordering::SeqCst, Ordering::SeqCst);
                hub.poke(*token);
                // Disconnects when the hub drops the worker (after `Worker::finish`, or in a
                // panic of the hub thread).
                let _ = done.recv();
                let mut stats = lock(&self.stats);
                if !stats.closed {
                    tracing::error!(local_addr = %self.local_addr, "viewer hub thread panicked");
                    stats.closed = true;
                    stats.close_reason.get_or_insert_with(|| "hub thread panicked".to_owned());
                }
            }
        }
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        self.shutdown(STOP_GRACEFUL);
    }
}

/// Whether an H264 RTP payload (RFC 6184) starts a keyframe: a single NAL unit of type 5 (IDR
/// slice) or 7 (SPS), a STAP-A (24) aggregating one of those, or an FU-A (28) start fragment of
/// one of those.
pub fn is_h264_keyframe(payload: &[u8]) -> bool {
    let is_key = |nal_header: u8| matches!(nal_header & 0x1f, 5 | 7);
    match payload {
        [] => false,
        [h, rest @ ..] if h & 0x1f == 24 => {
            let mut rest = rest;
            while let [hi, lo, tail @ ..] = rest {
                let size = usize::from(u16::from_be_bytes([*hi, *lo]));
                let Some(nal) = tail.get(..size) else {
                    return false;
                };
                if nal.first().is_some_and(|n| is_key(*n)) {
                    return true;
                }
                rest = &tail[size..];
            }
            false
        }
        [h, fu, ..] if h & 0x1f == 28 => fu & 0x80 != 0 && is_key(*fu),
        [h, ..] => is_key(*h),
    }
}

/// The request target for a session `location` returned by a POST to `endpoint`.
fn resolve_location(endpoint: &str, location: &str) -> String {
    let lower = location.to_ascii_lowercase();
    if let Some(scheme_len) =
        ["http://", "https://"].iter().find(|s| lower.starts_with(*s)).map(|s| s.len())
    {
        let rest = &location[scheme_len..];
        return rest.find('/').map_or_else(|| "/".to_owned(), |i| rest[i..].to_owned());
    }
    if location.starts_with('/') {
        return location.to_owned();
    }
    let base = endpoint.rfind('/').map_or("", |i| &endpoint[..i]);
    format!("{base}/{location}")
}

fn lock(stats: &Mutex<Stats>) -> MutexGuard<'_, Stats> {
    stats.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The state of the viewer thread.
struct Worker {
    rtc: Rtc,
    socket: UdpSocket,
    local_addr: SocketAddr,
    stats: Arc<Mutex<Stats>>,
    stop: Arc<AtomicU8>,
    pli: Arc<AtomicBool>,
    video_mid: Mid,
    /// Media kind of each m-line, from the local offer and any `Event::MediaAdded`.
    kinds: HashMap<Mid, MediaKind>,
    last_keyframe_ts: Option<u32>,
    /// Video is VP8 ([`ViewerOptions::vp8_only`]), not H264.
    vp8: bool,
    disconnected_since: Option<Instant>,
    remote_closed: bool,
    /// Light mode: the media kind of each H264 and Opus payload type of the answer.
    light: Option<HashMap<u8, MediaKind>>,
    /// Whether str0m reported `Event::Connected` (light mode starts then).
    connected: bool,
    /// Whether a video keyframe was seen (light mode stops decrypting video then).
    keyframe_seen: bool,
    /// On a hub: the earliest entry of this worker in the hub's timer heap.
    scheduled: Option<Instant>,
    /// On a hub: dropped with the worker, which tells [`Viewer::shutdown`] it is done.
    done: Option<mpsc::Sender<()>>,
    /// The ICE-TCP connection of a TCP viewer.
    tcp: Option<TcpLink>,
}

/// A TCP viewer's connection to the server's passive candidate, RFC 4571 framed.
struct TcpLink {
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    reader: whep_core::tcp::FrameReader,
    stall: Arc<AtomicBool>,
}

impl TcpLink {
    /// Connects to the answer's TCP candidate at the server's address (or loopback).
    fn connect(
        answer: &str,
        server: SocketAddr,
        rcvbuf: Option<usize>,
        stall: Arc<AtomicBool>,
    ) -> Result<Self, ViewerError> {
        let candidates: Vec<SocketAddr> = answer
            .lines()
            .filter_map(|l| l.trim().strip_prefix("a=candidate:"))
            .filter_map(|c| {
                let f: Vec<&str> = c.split_whitespace().collect();
                let tcp = f.get(2).is_some_and(|p| p.eq_ignore_ascii_case("tcp"));
                let addr = SocketAddr::new(f.get(4)?.parse().ok()?, f.get(5)?.parse().ok()?);
                tcp.then_some(addr)
            })
            .collect();
        let peer = candidates
            .iter()
            .find(|a| a.ip() == server.ip())
            .or_else(|| {
                candidates.iter().find(|a| {
                    a.ip().is_loopback() == server.ip().is_loopback()
                        && a.is_ipv4() == server.is_ipv4()
                })
            })
            .or(candidates.first())
            .copied()
            .ok_or_else(|| {
                ViewerError::Sdp(format!("no TCP candidate in the answer:\n{answer}"))
            })?;
        let stream =
            TcpStream::connect_timeout(&peer, Duration::from_secs(5)).map_err(ViewerError::Io)?;
        stream.set_nodelay(true).map_err(ViewerError::Io)?;
        if let Some(bytes) = rcvbuf {
            setsockopt(&stream, sockopt::RcvBuf, &bytes).map_err(|e| ViewerError::Io(e.into()))?;
        }
        let local = stream.local_addr().map_err(ViewerError::Io)?;
        Ok(Self { stream, peer, local, reader: whep_core::tcp::FrameReader::default(), stall })
    }
}

impl Worker {
    /// The viewer thread (without a hub).
    fn run(mut self) {
        let reason = self.run_loop();
        self.finish(reason);
    }

    /// Marks the viewer closed, for `reason`.
    fn finish(self, reason: String) {
        tracing::debug!(local_addr = %self.local_addr, reason, "viewer ends");
        let mut stats = lock(&self.stats);
        stats.closed = true;
        stats.close_reason = Some(reason);
        stats.closed_at = Some(Instant::now());
    }

    /// Drives the `Rtc` until something ends it; returns why.
    fn run_loop(&mut self) -> String {
        let mut buf = vec![0u8; 65_536];
        loop {
            let deadline = match self.step() {
                Ok(deadline) => deadline,
                Err(reason) => return reason,
            };
            let now = Instant::now();
            let wait = deadline.saturating_duration_since(now).clamp(MIN_WAIT, MAX_WAIT);
            if self.tcp.is_some() {
                if let Err(reason) = self.read_tcp(&mut buf, wait) {
                    return reason;
                }
                continue;
            }
            if let Err(e) = self.socket.set_read_timeout(Some(wait)) {
                return format!("socket error: {e}");
            }
            match self.socket.recv_from(&mut buf) {
                Ok((n, source)) => {
                    if let Some(data) = buf.get(..n) {
                        self.on_datagram(data, source, Instant::now());
                    }
                }
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::Interrupted
                    // ICMP errors of earlier sends, as some platforms report them.
                    | io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::ConnectionReset => self.input(Input::Timeout(Instant::now())),
                    _ => return format!("socket error: {e}"),
                },
            }
        }
    }

    /// Handles the stop and keyframe requests, drives str0m's timers and sends what it
    /// outputs; returns str0m's next deadline, or why the viewer ends.
    fn step(&mut self) -> Result<Instant, String> {
        loop {
            match self.stop.load(Ordering::SeqCst) {
                RUN => {}
                STOP_SILENT => return Err("abandoned by the test".to_owned()),
                _ => {
                    self.close_gracefully();
                    return Err("closed by the test".to_owned());
                }
            }
            if self.pli.load(Ordering::SeqCst) {
                self.send_pli();
            }
            let deadline = self.drain()?;
            if self.remote_closed {
                return Err("closed by the server (DTLS close)".to_owned());
            }
            if !self.rtc.is_alive() {
                return Err("str0m Rtc no longer alive".to_owned());
            }
            let now = Instant::now();
            if self.disconnected_since.is_some_and(|t| now - t > DISCONNECTED_GRACE) {
                return Err(format!("ICE disconnected for more than {DISCONNECTED_GRACE:?}"));
            }
            if deadline <= now {
                self.input(Input::Timeout(now));
                continue;
            }
            return Ok(deadline);
        }
    }

    /// Waits up to `wait` for bytes on the TCP connection and hands str0m each frame they
    /// complete (draining it after each); a stalled viewer only sleeps.
    fn read_tcp(&mut self, buf: &mut [u8], wait: Duration) -> Result<(), String> {
        let Some(link) = &mut self.tcp else { return Ok(()) };
        if link.stall.load(Ordering::SeqCst) {
            thread::sleep(wait);
            self.input(Input::Timeout(Instant::now()));
            return Ok(());
        }
        link.stream.set_read_timeout(Some(wait)).map_err(|e| format!("TCP error: {e}"))?;
        let n = match link.stream.read(buf) {
            Ok(0) => return Err("TCP connection closed by the server".to_owned()),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                self.input(Input::Timeout(Instant::now()));
                return Ok(());
            }
            Err(e) => return Err(format!("TCP error: {e}")),
        };
        let mut frames = Vec::new();
        let peer = link.peer;
        link.reader
            .feed(&buf[..n], |f| frames.push(f.to_vec()))
            .map_err(|e| format!("TCP framing: {e}"))?;
        for f in frames {
            if self.on_datagram(&f, peer, Instant::now()) {
                self.drain()?;
            }
        }
        Ok(())
    }

    /// One datagram from the socket. Returns whether str0m got it (then it may have output to
    /// send: call [`Worker::step`]).
    fn on_datagram(&mut self, data: &[u8], source: SocketAddr, now: Instant) -> bool {
        if self.connected
            && let Some(kinds) = &self.light
            && let Some(head) = parse_rtp_header(data)
        {
            let kind = kinds.get(&head.pt).copied();
            // Video goes through str0m until its first keyframe, which needs the payload.
            if kind != Some(MediaKind::Video) || self.keyframe_seen {
                self.on_light_rtp(kind, &head, data.len(), now);
                return false;
            }
        }
        let proto = if self.tcp.is_some() { Protocol::Tcp } else { Protocol::Udp };
        match Receive::new(proto, source, self.local_addr, data) {
            Ok(receive) => self.input(Input::Receive(now, receive)),
            Err(e) => tracing::debug!(%source, "dropping unparsable datagram: {e}"),
        }
        true
    }

    /// Counts an SRTP media packet from its plaintext header (light mode).
    fn on_light_rtp(&self, kind: Option<MediaKind>, head: &RtpHead, len: usize, now: Instant) {
        let mut stats = lock(&self.stats);
        stats.undecrypted_packets += 1;
        let Some(kind) = kind else {
            stats.unknown_packets += 1;
            return;
        };
        let bytes = (len - head.header_len).saturating_sub(SRTP_TAG_LEN) as u64;
        stats.last_media_at = Some(now);
        match kind {
            MediaKind::Video => {
                stats.video_seq.record_u16(head.seq);
                stats.video_packets += 1;
                stats.video_bytes += bytes;
                stats.first_video_at.get_or_insert(now);
                stats.video_arrived(now);
            }
            MediaKind::Audio => {
                stats.audio_seq.record_u16(head.seq);
                stats.audio_packets += 1;
                stats.audio_bytes += bytes;
                stats.first_audio_at.get_or_insert(now);
            }
        }
    }

    /// Requests a keyframe if str0m knows the incoming video stream yet; else the request stays
    /// pending.
    fn send_pli(&mut self) {
        let mut api = self.rtc.direct_api();
        let Some(rx) = api.stream_rx_by_mid(self.video_mid, None) else {
            return;
        };
        rx.request_keyframe(KeyframeRequestKind::Pli);
        self.pli.store(false, Ordering::SeqCst);
        lock(&self.stats).keyframe_requests += 1;
        self.input(Input::Timeout(Instant::now()));
    }

    fn input(&mut self, input: Input<'_>) {
        if let Err(e) = self.rtc.handle_input(input) {
            tracing::debug!(local_addr = %self.local_addr, "str0m rejected input: {e}");
        }
    }

    /// Polls str0m until it asks for a timeout, sending and handling what it outputs.
    fn drain(&mut self) -> Result<Instant, String> {
        loop {
            match self.rtc.poll_output() {
                Ok(Output::Timeout(deadline)) => return Ok(deadline),
                Ok(Output::Transmit(t)) if t.proto == Protocol::Tcp => {
                    let Some(link) = &mut self.tcp else { continue };
                    let Some(frame) = whep_core::tcp::encode(&t.contents) else { continue };
                    if let Err(e) = link.stream.write_all(&frame) {
                        return Err(format!("TCP write failed: {e}"));
                    }
                }
                Ok(Output::Transmit(t)) => {
                    if let Err(e) = self.socket.send_to(&t.contents, t.destination) {
                        tracing::debug!(destination = %t.destination, "send failed: {e}");
                    }
                }
                Ok(Output::Event(event)) => self.on_event(event),
                Err(e) => return Err(format!("str0m error: {e}")),
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        let now = Instant::now();
        match event {
            Event::Connected => {
                self.connected = true;
                let mut stats = lock(&self.stats);
                stats.connected = true;
                stats.connected_at.get_or_insert(now);
            }
            Event::IceConnectionStateChange(state) => {
                tracing::debug!(local_addr = %self.local_addr, ?state, "ICE state");
                if state == IceConnectionState::Disconnected {
                    self.disconnected_since.get_or_insert(now);
                } else {
                    self.disconnected_since = None;
                }
                lock(&self.stats).ice_state = format!("{state:?}");
            }
            Event::MediaAdded(added) => {
                self.kinds.insert(added.mid, added.kind);
            }
            Event::RtpPacket(packet) => self.on_rtp(&packet, now),
            Event::Closed => self.remote_closed = true,
            _ => {}
        }
    }

    fn on_rtp(&mut self, packet: &RtpPacket, now: Instant) {
        let Some(kind) = self.kind_of(packet) else {
            tracing::debug!(ssrc = ?packet.header.ssrc, "RTP packet of unknown media");
            lock(&self.stats).unknown_packets += 1;
            return;
        };
        {
            let mut stats = lock(&self.stats);
            let seq = match kind {
                MediaKind::Video => &mut stats.video_seq,
                MediaKind::Audio => &mut stats.audio_seq,
            };
            seq.record(*packet.seq_no);
        }
        if packet.payload.is_empty() {
            return;
        }
        let len = packet.payload.len() as u64;
        let mut stats = lock(&self.stats);
        stats.last_media_at = Some(now);
        match kind {
            MediaKind::Video => {
                let keyframe = if self.vp8 {
                    whep_core::rtp::vp8_keyframe_start(&packet.payload)
                } else {
                    is_h264_keyframe(&packet.payload)
                };
                stats.video_packets += 1;
                stats.video_bytes += len;
                stats.first_video_at.get_or_insert(now);
                stats.video_arrived(now);
                stats.first_video_is_keyframe.get_or_insert(keyframe);
                let ts = packet.header.timestamp;
                if keyframe && self.last_keyframe_ts != Some(ts) {
                    self.last_keyframe_ts = Some(ts);
                    self.keyframe_seen = true;
                    stats.keyframes += 1;
                    stats.first_keyframe_at.get_or_insert(now);
                }
            }
            MediaKind::Audio => {
                stats.audio_packets += 1;
                stats.audio_bytes += len;
                stats.first_audio_at.get_or_insert(now);
            }
        }
    }

    /// The media kind of a packet: by the m-line of its SSRC, else by its payload type.
    fn kind_of(&mut self, packet: &RtpPacket) -> Option<MediaKind> {
        let mid = self.rtc.direct_api().stream_rx(&packet.header.ssrc).map(|rx| rx.mid());
        if let Some(mid) = mid {
            if let Some(kind) = self.kinds.get(&mid) {
                return Some(*kind);
            }
            if let Some(media) = self.rtc.media(mid) {
                return Some(media.kind());
            }
        }
        let pt = packet.header.payload_type;
        let codec = self.rtc.codec_config().find(|p| p.pt() == pt).map(|p| p.spec().codec);
        match codec {
            Some(Codec::H264 | Codec::Vp8) => Some(MediaKind::Video),
            Some(Codec::Opus) => Some(MediaKind::Audio),
            _ => None,
        }
    }

    /// Starts str0m's close (RTCP BYE, DTLS close_notify) and sends what it outputs.
    fn close_gracefully(&mut self) {
        if !self.rtc.is_alive() {
            return;
        }
        if let Err(e) = self.rtc.close() {
            tracing::debug!(local_addr = %self.local_addr, "str0m close failed: {e}");
        }
        if let Err(e) = self.drain() {
            tracing::debug!(local_addr = %self.local_addr, "draining on close failed: {e}");
        }
    }
}

/// One thread that runs many viewers: it polls their sockets with `epoll` (level-triggered),
/// keeps their str0m timers in one heap, and reads up to 8 datagrams per ready socket per
/// round. Cheaper than a thread per viewer when there are hundreds of them; with
/// [`ViewerOptions::light`] one hub thread receives a few hundred thousand packets per second.
///
/// Clones are handles to the same thread. The thread ends when the last handle and the last of
/// its viewers are dropped.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub").field("name", &self.inner.name).finish_non_exhaustive()
    }
}

struct HubInner {
    name: String,
    commands: mpsc::Sender<HubCommand>,
    wake: Arc<EventFd>,
    next_token: AtomicU64,
    thread: Mutex<Option<JoinHandle<()>>>,
}

enum HubCommand {
    /// A new viewer.
    Add(u64, Box<Worker>),
    /// Look at a viewer's stop and keyframe flags now.
    Poke(u64),
}

impl Hub {
    /// Starts a hub thread named `whep-hub`.
    pub fn new() -> io::Result<Self> {
        Self::named("whep-hub")
    }

    /// Starts a hub thread with this name.
    pub fn named(name: &str) -> io::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
        let wake = Arc::new(
            EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .map_err(io::Error::from)?,
        );
        epoll
            .add(wake.as_ref(), EpollEvent::new(EpollFlags::EPOLLIN, HUB_WAKE))
            .map_err(io::Error::from)?;
        let (commands, rx) = mpsc::channel();
        let thread_wake = Arc::clone(&wake);
        let thread = thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || HubThread::new(epoll, thread_wake, rx).run())?;
        Ok(Self {
            inner: Arc::new(HubInner {
                name: name.to_owned(),
                commands,
                wake,
                next_token: AtomicU64::new(0),
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    fn send(&self, command: HubCommand) -> io::Result<()> {
        self.inner
            .commands
            .send(command)
            .map_err(|_| io::Error::other(format!("{}: hub thread is gone", self.inner.name)))?;
        self.inner.wake.write(1).map(drop).map_err(io::Error::from)
    }

    fn add(&self, worker: Worker) -> io::Result<u64> {
        let token = self.inner.next_token.fetch_add(1, Ordering::Relaxed);
        self.send(HubCommand::Add(token, Box::new(worker)))?;
        Ok(token)
    }

    fn poke(&self, token: u64) {
        if let Err(e) = self.send(HubCommand::Poke(token)) {
            tracing::debug!("poke: {e}");
        }
    }
}

impl Drop for HubInner {
    fn drop(&mut self) {
        // Every viewer is gone (each holds a handle): closing the channel ends the thread.
        let (dead, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.commands, dead));
        let _ = self.wake.write(1);
        let thread = self.thread.get_mut().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread
            && thread.join().is_err()
        {
            tracing::error!(name = self.name, "hub thread panicked");
        }
    }
}

/// The state of a hub thread.
struct HubThread {
    epoll: Epoll,
    wake: Arc<EventFd>,
    commands: mpsc::Receiver<HubCommand>,
    workers: HashMap<u64, Box<Worker>>,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Workers to step in this round.
    due: Vec<u64>,
}

impl HubThread {
    fn new(epoll: Epoll, wake: Arc<EventFd>, commands: mpsc::Receiver<HubCommand>) -> Self {
        Self {
            epoll,
            wake,
            commands,
            workers: HashMap::new(),
            timers: BinaryHeap::new(),
            due: Vec::new(),
        }
    }

    fn run(mut self) {
        let mut events = vec![EpollEvent::empty(); 256];
        let mut buf = vec![0u8; 65_536];
        loop {
            if !self.take_commands() {
                break;
            }
            let now = Instant::now();
            while let Some(&Reverse((at, token))) = self.timers.peek() {
                if at > now {
                    break;
                }
                self.timers.pop();
                if let Some(worker) = self.workers.get_mut(&token)
                    && worker.scheduled == Some(at)
                {
                    worker.scheduled = None;
                    self.due.push(token);
                }
            }
            self.step_due(now);
            let wait = self.timers.peek().map_or(HUB_MAX_WAIT, |Reverse((at, _))| {
                at.saturating_duration_since(Instant::now()).min(HUB_MAX_WAIT)
            });
            // Whole milliseconds, rounded up: an early wake-up would only spin.
            let ms = u16::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(u16::MAX);
            let n = match self.epoll.wait(&mut events, ms) {
                Ok(n) => n,
                Err(Errno::EINTR) => 0,
                Err(e) => {
                    tracing::error!("epoll_wait: {e}");
                    self.end_all(&format!("hub epoll_wait failed: {e}"));
                    return;
                }
            };
            let now = Instant::now();
            for event in events.iter().take(n) {
                let token = event.data();
                if token == HUB_WAKE {
                    let _ = self.wake.read();
                    continue;
                }
                self.receive(token, &mut buf, now);
            }
            self.step_due(now);
        }
        self.end_all("hub stopped");
    }

    /// Reads up to [`HUB_RECV_BATCH`] datagrams of a ready socket. str0m must be polled after
    /// every input (it keeps one pending output per kind), so each datagram str0m gets is
    /// followed by a step.
    fn receive(&mut self, token: u64, buf: &mut [u8], now: Instant) {
        let Some(worker) = self.workers.get_mut(&token) else { return };
        let mut result = None;
        for _ in 0..HUB_RECV_BATCH {
            match worker.socket.recv_from(buf) {
                Ok((len, source)) => {
                    let Some(data) = buf.get(..len) else { continue };
                    if worker.on_datagram(data, source, now) {
                        let r = worker.step();
                        let ended = r.is_err();
                        result = Some(r);
                        if ended {
                            break;
                        }
                    }
                }
                Err(e) => {
                    match e.kind() {
                        io::ErrorKind::WouldBlock
                        | io::ErrorKind::Interrupted
                        | io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::ConnectionReset => {}
                        _ => result = Some(Err(format!("socket error: {e}"))),
                    }
                    break;
                }
            }
        }
        if let Some(r) = result {
            self.stepped(token, r, now);
        }
    }

    /// Takes the queued commands; false when the channel is closed (the hub is dropped).
    fn take_commands(&mut self) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(HubCommand::Add(token, worker)) => {
                    let event = EpollEvent::new(EpollFlags::EPOLLIN, token);
                    if let Err(e) = self.epoll.add(&worker.socket, event) {
                        worker.finish(format!("hub cannot poll the socket: {e}"));
                        continue;
                    }
                    self.workers.insert(token, worker);
                    self.due.push(token);
                }
                Ok(HubCommand::Poke(token)) => self.due.push(token),
                Err(mpsc::TryRecvError::Empty) => return true,
                Err(mpsc::TryRecvError::Disconnected) => return false,
            }
        }
    }

    /// Steps the due workers: schedules their next deadline, or ends them.
    fn step_due(&mut self, now: Instant) {
        let mut due = std::mem::take(&mut self.due);
        for token in due.drain(..) {
            let Some(worker) = self.workers.get_mut(&token) else { continue };
            let result = worker.step();
            self.stepped(token, result, now);
        }
        self.due = due;
    }

    /// Schedules a worker's next deadline, or ends it.
    fn stepped(&mut self, token: u64, result: Result<Instant, String>, now: Instant) {
        match result {
            Ok(deadline) => {
                let Some(worker) = self.workers.get_mut(&token) else { return };
                let at = deadline.min(now + HUB_MAX_WAIT);
                if worker.scheduled.is_none_or(|s| at < s) {
                    worker.scheduled = Some(at);
                    self.timers.push(Reverse((at, token)));
                }
            }
            Err(reason) => self.end(token, reason),
        }
    }

    fn end(&mut self, token: u64, reason: String) {
        if let Some(worker) = self.workers.remove(&token) {
            let _ = self.epoll.delete(&worker.socket);
            worker.finish(reason);
        }
    }

    fn end_all(&mut self, reason: &str) {
        let tokens: Vec<u64> = self.workers.keys().copied().collect();
        for token in tokens {
            self.end(token, reason.to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_extend_across_wraps_and_reordering() {
        let mut s = SeqStats::default();
        for seq in [65_533u16, 65_534, 65_535, 0, 2, 1, 3] {
            s.record_u16(seq);
        }
        assert_eq!(s.received, 7);
        assert_eq!(s.expected(), 7);
        assert_eq!(s.lost(), 0);
        assert_eq!(s.reordered, 1);
        assert_eq!(s.highest - s.first.unwrap_or(0), 6);
        // A packet from before the first one seen does not underflow.
        assert_eq!(extend_seq(None, 0), 65_536);
        assert_eq!(extend_seq(Some(65_536), 65_535), 65_535);
        // Continuing from str0m's extended numbers (light mode after the first keyframe).
        assert_eq!(extend_seq(Some(5), 6), 6);
        assert_eq!(extend_seq(Some(3 << 16 | 65_535), 0), 4 << 16);
        // A gap is loss, not a wrap.
        let mut g = SeqStats::default();
        for seq in [10u16, 11, 15] {
            g.record_u16(seq);
        }
        assert_eq!(g.lost(), 3);
    }

    #[test]
    fn rtp_headers_parse_with_csrcs_and_extensions_and_rtcp_is_refused() {
        let mut p = vec![0x80, 0x80 | 102, 0x12, 0x34, 0, 0, 0, 9, 0xde, 0xad, 0xbe, 0xef];
        p.extend_from_slice(&[1; 20]);
        let h = parse_rtp_header(&p).expect("rtp");
        assert_eq!((h.pt, h.marker, h.seq, h.timestamp), (102, true, 0x1234, 9));
        assert_eq!((h.ssrc, h.header_len), (0xdead_beef, 12));
        // One CSRC and a one-word extension.
        let mut q = vec![0x91, 111, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 7, 0xbe, 0xde, 0, 1];
        q.extend_from_slice(&[0; 8]);
        assert_eq!(parse_rtp_header(&q).map(|h| h.header_len), Some(24));
        // Extension longer than the packet.
        assert_eq!(parse_rtp_header(&q[..22]), None);
        // RTCP (receiver report, PT 201 = 0x80 | 73), not version 2, too short.
        assert_eq!(parse_rtp_header(&[0x80, 201, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(parse_rtp_header(&[0x40, 102, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(parse_rtp_header(&[0x80, 102, 0]), None);
    }

    #[test]
    fn answer_payload_types_map_to_media_kinds() {
        let sdp = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 102 103\r\na=rtpmap:102 H264/90000\r\n\
                   a=rtpmap:103 rtx/90000\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n\
                   a=rtpmap:111 opus/48000/2\r\n";
        let kinds = media_payload_types(sdp);
        assert_eq!(kinds.len(), 2);
        assert_eq!(kinds.get(&102), Some(&MediaKind::Video));
        assert_eq!(kinds.get(&111), Some(&MediaKind::Audio));
    }
}
