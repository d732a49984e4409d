//! A blocking WHEP viewer for end-to-end tests: one str0m [`Rtc`] in RTP mode on its own thread
//! and its own UDP socket on 127.0.0.1, counting the RTP packets it receives per media kind.
//!
//! ```text
//! let viewer = Viewer::connect(server, "/whep/demo", None)?;
//! assert!(viewer.wait_for(Duration::from_secs(10), |s| s.video_packets > 100));
//! assert_eq!(viewer.delete()?, 200);
//! assert!(viewer.wait_for(Duration::from_secs(5), |s| s.closed));
//! ```

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use str0m::change::SdpAnswer;
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
    /// When str0m reported `Event::Connected`.
    pub connected_at: Option<Instant>,
    /// When the first video packet arrived.
    pub first_video_at: Option<Instant>,
    /// When the first audio packet arrived.
    pub first_audio_at: Option<Instant>,
    /// When the last video or audio packet arrived.
    pub last_media_at: Option<Instant>,
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
}

/// Loss and reordering of one media kind, from str0m's extended (64-bit) sequence numbers,
/// after str0m's de-duplication and NACK repair.
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
    /// Setting up the UDP socket or the viewer thread failed.
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
    thread: Option<JoinHandle<()>>,
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
        // The local address towards the server: loopback for a local server, else the one the
        // kernel routes through (connecting a UDP socket sends nothing).
        let local_ip = if server.ip().is_loopback() {
            server.ip()
        } else {
            UdpSocket::bind("0.0.0.0:0")
                .and_then(|s| s.connect(server).map(|()| s))
                .and_then(|s| s.local_addr())
                .map_err(ViewerError::Io)?
                .ip()
        };
        let socket = UdpSocket::bind((local_ip, 0)).map_err(ViewerError::Io)?;
        let local_addr = socket.local_addr().map_err(ViewerError::Io)?;

        let mut config = RtcConfig::new()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_h264(true)
            .enable_opus(true, false);
        // This setter takes `&mut self`, unlike the rest of the builder.
        config.set_max_stun_rto(MAX_STUN_RTO);
        let mut rtc = config.build(Instant::now());
        let candidate = Candidate::host(local_addr, "udp")
            .map_err(|e| ViewerError::Sdp(format!("host candidate {local_addr}: {e}")))?;
        if rtc.add_local_candidate(candidate).is_none() {
            return Err(ViewerError::Sdp(format!("host candidate {local_addr} not accepted")));
        }
        let mut api = rtc.sdp_api();
        let video_mid = api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
        let audio_mid = api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
        let Some((offer, pending)) = api.apply() else {
            return Err(ViewerError::Sdp("str0m made no offer".to_owned()));
        };

        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("Content-Type", "application/sdp"), ("Accept", "application/sdp")];
        if let Some(auth) = &auth {
            headers.push(("Authorization", auth));
        }
        let offer = offer.to_sdp_string();
        let posted_at = Instant::now();
        let response = http::request(server, "POST", endpoint, &headers, offer.as_bytes())
            .map_err(ViewerError::Http)?;
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

        let stats = Arc::new(Mutex::new(Stats {
            ice_state: "New".to_owned(),
            posted_at: Some(posted_at),
            answered_at: Some(answered_at),
            ..Stats::default()
        }));
        let stop = Arc::new(AtomicU8::new(RUN));
        let pli = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            rtc,
            socket,
            local_addr,
            stats: Arc::clone(&stats),
            stop: Arc::clone(&stop),
            pli: Arc::clone(&pli),
            video_mid,
            kinds: HashMap::from([(video_mid, MediaKind::Video), (audio_mid, MediaKind::Audio)]),
            last_keyframe_ts: None,
            disconnected_since: None,
            remote_closed: false,
        };
        let thread = thread::Builder::new()
            .name(format!("whep-viewer-{}", local_addr.port()))
            .spawn(move || worker.run())
            .map_err(ViewerError::Io)?;
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
            thread: Some(thread),
        })
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
        let Some(thread) = self.thread.take() else {
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
    disconnected_since: Option<Instant>,
    remote_closed: bool,
}

impl Worker {
    fn run(mut self) {
        let reason = self.run_loop();
        tracing::debug!(local_addr = %self.local_addr, reason, "viewer thread ends");
        let mut stats = lock(&self.stats);
        stats.closed = true;
        stats.close_reason = Some(reason);
    }

    /// Drives the `Rtc` until something ends it; returns why.
    fn run_loop(&mut self) -> String {
        let mut buf = vec![0u8; 65_536];
        loop {
            match self.stop.load(Ordering::SeqCst) {
                RUN => {}
                STOP_SILENT => return "abandoned by the test".to_owned(),
                _ => {
                    self.close_gracefully();
                    return "closed by the test".to_owned();
                }
            }
            if self.pli.load(Ordering::SeqCst) {
                self.send_pli();
            }
            let deadline = match self.drain() {
                Ok(deadline) => deadline,
                Err(e) => return e,
            };
            if self.remote_closed {
                return "closed by the server (DTLS close)".to_owned();
            }
            if !self.rtc.is_alive() {
                return "str0m Rtc no longer alive".to_owned();
            }
            let now = Instant::now();
            if self.disconnected_since.is_some_and(|t| now - t > DISCONNECTED_GRACE) {
                return format!("ICE disconnected for more than {DISCONNECTED_GRACE:?}");
            }
            if deadline <= now {
                self.input(Input::Timeout(now));
                continue;
            }
            let wait = (deadline - now).clamp(MIN_WAIT, MAX_WAIT);
            if let Err(e) = self.socket.set_read_timeout(Some(wait)) {
                return format!("socket error: {e}");
            }
            match self.socket.recv_from(&mut buf) {
                Ok((n, source)) => {
                    let Some(data) = buf.get(..n) else {
                        continue;
                    };
                    match Receive::new(Protocol::Udp, source, self.local_addr, data) {
                        Ok(receive) => self.input(Input::Receive(Instant::now(), receive)),
                        Err(e) => tracing::debug!(%source, "dropping unparsable datagram: {e}"),
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
                let keyframe = is_h264_keyframe(&packet.payload);
                stats.video_packets += 1;
                stats.video_bytes += len;
                stats.first_video_at.get_or_insert(now);
                stats.first_video_is_keyframe.get_or_insert(keyframe);
                let ts = packet.header.timestamp;
                if keyframe && self.last_keyframe_ts != Some(ts) {
                    self.last_keyframe_ts = Some(ts);
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
            Some(Codec::H264) => Some(MediaKind::Video),
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
