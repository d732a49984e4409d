//! Deterministic simulation harness (feature `sim`): a virtual clock, str0m-based viewers, a
//! scripted FFmpeg-like RTP source, fake processes and in-memory packet queues around one
//! [`Core`]. The core's invariants are checked after every step.
//!
//! Used by the core's tests, benchmarks and fuzz targets; the end-to-end suite uses only its
//! helpers for crafted datagrams ([`binding_request`]), its viewers are its own.

#![allow(clippy::unwrap_used, missing_docs)]
// The harness anchors its virtual clock at one real instant (str0m needs a real `Instant`).
#![allow(clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::ice::StunMessage;
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event as RtcEvent, Input as RtcInput, Output as RtcOutput, Rtc};

use crate::tcp::{ConnId, FrameReader, SendQueue};
use crate::whep::{Method, WhepRequest, WhepResponse};
use crate::{
    Core, CoreConfig, Event, Input, Output, PortPair, StreamConfig, StreamId, Transport, VideoCodec,
};

pub mod ops;

/// The address of the core's viewer socket in the simulation.
pub const SERVER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 3478);

/// Bytes of a viewer's `Viewer` struct (its str0m `Rtc` inline), for the memory benchmark.
pub fn viewer_struct_size() -> usize {
    size_of::<crate::viewer::Viewer>()
}

/// A config suitable for simulations: the [`SERVER`] candidate and a fixed seed.
pub fn config() -> CoreConfig {
    CoreConfig {
        host_candidates: vec![SERVER],
        rng_seed: [42; 32],
        ingest_ports: 40_000..=40_099,
        ..CoreConfig::default()
    }
}

/// An ICE connectivity check (STUN binding request, as a controlling player sends) to the
/// session whose SDP answer is `answer`, from the player whose ICE username fragment is
/// `player_ufrag`: integrity-protected with the answer's password, so the server accepts it
/// from whatever address it comes (tests spoof sources with it).
pub fn binding_request(answer: &str, player_ufrag: &str, nonce: u64) -> Vec<u8> {
    use str0m::ice::{StunMessage, TransId};
    let attr = |name: &str| {
        answer.lines().find_map(|l| l.trim().strip_prefix(name)).unwrap_or_default().to_owned()
    };
    let (ufrag, pwd) = (attr("a=ice-ufrag:"), attr("a=ice-pwd:"));
    let username = format!("{ufrag}:{player_ufrag}");
    let msg =
        StunMessage::binding_request(&username, TransId::new(), true, nonce, 0x6e00_1eff, false);
    let mut buf = vec![0u8; 1500];
    let hmac = crate::dtls::provider().sha1_hmac_provider;
    let n = msg.to_bytes(Some(pwd.as_bytes()), &mut buf, |k, p| hmac.sha1_hmac(k, p)).unwrap();
    buf.truncate(n);
    buf
}

/// Where a stream's FFmpeg sends the datagrams for ingest port `port` from: two ports above it
/// (see [`PortPair::video_source`]).
pub fn ffmpeg_source(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port.saturating_add(2)))
}

/// An ingest datagram on `port` as the stream's FFmpeg sends it (from [`ffmpeg_source`]),
/// with no arrival time.
pub fn from_ffmpeg(port: u16, contents: &[u8]) -> Input<'_> {
    Input::Ingest { port, source: ffmpeg_source(port), contents, arrived: None }
}

/// A datagram in flight, or bytes on a TCP connection.
#[derive(Debug, Clone)]
struct Packet {
    at: Instant,
    from: SocketAddr,
    to: SocketAddr,
    data: Vec<u8>,
    /// The TCP connection the bytes travel on (ICE-TCP); `None` for a UDP datagram.
    tcp: Option<ConnId>,
}

/// A viewer's ICE-TCP connection to the server ([`SimWorld::join_tcp`]), with the send queue
/// the runtime would hold for it.
#[derive(Debug)]
pub struct SimTcp {
    pub conn: ConnId,
    /// What the server has queued for the viewer (as the runtime's).
    pub queue: SendQueue,
    /// The viewer stopped reading: nothing leaves the queue.
    pub stalled: bool,
    /// The server closed the connection.
    pub closed: bool,
    /// Frames the queue dropped.
    pub dropped: u64,
    reader: FrameReader,
}

/// A simulated STUN server on the far side of a NAT that forwards the core's port
/// ([`SimWorld::stun`]): it answers Binding requests with `mapped`, and datagrams viewers send
/// to `mapped` reach the core's socket.
#[derive(Debug, Clone)]
pub struct SimStun {
    /// Its address (put it in [`CoreConfig::stun_servers`]).
    pub addr: SocketAddr,
    /// The address the NAT gives the core's socket (changing it is a new public address).
    pub mapped: SocketAddr,
    /// Whether it answers.
    pub answers: bool,
    /// Whether viewers can reach the core's own address ([`SERVER`]) too (a viewer inside
    /// the NAT); when not, only through `mapped`.
    pub server_reachable: bool,
    /// Binding requests received.
    pub requests: u64,
    /// The last one, as received.
    pub last_request: Option<Vec<u8>>,
}

impl SimStun {
    /// A STUN server at `addr` that answers `mapped`; [`SERVER`] unreachable to viewers.
    pub fn new(addr: SocketAddr, mapped: SocketAddr) -> Self {
        Self {
            addr,
            mapped,
            answers: true,
            server_reachable: false,
            requests: 0,
            last_request: None,
        }
    }
}

/// A simulated WHEP player: a str0m `Rtc` as the browser side.
#[derive(Debug)]
pub struct Viewer {
    pub rtc: Rtc,
    pub addr: SocketAddr,
    pub stream: StreamId,
    /// `Location` of the session, once created.
    pub location: Option<String>,
    pub etag: Option<String>,
    pending: Option<SdpPendingOffer>,
    /// The answer as received, for ICE restarts.
    pub answer: String,
    video_mid: Mid,
    pub connected: bool,
    /// Drop everything this viewer sends (it vanished without DELETE).
    pub silent: bool,
    /// The address the server sees this viewer at, when a NAT maps it (`None`: `addr`).
    /// Changing it is a NAT rebinding: what the server sends to the old one is lost.
    pub nat: Option<SocketAddr>,
    pub video_packets: u64,
    pub audio_packets: u64,
    pub first_video_seq: Option<u16>,
    pub first_audio_seq: Option<u16>,
    /// Whether the first video packet received starts a keyframe.
    pub first_video_is_keyframe: Option<bool>,
    /// The codec of the last video packet received.
    pub video_codec: Option<Codec>,
    /// Highest video sequence number minus lowest plus one, minus packets received.
    pub video_seqs: BTreeSet<u64>,
    /// The last video RTP timestamp received.
    pub last_video_ts: Option<u32>,
    /// Video packets whose RTP timestamp went backwards (wrapping compare).
    pub video_ts_regressions: u64,
    /// When the first video packet arrived.
    pub first_video_at: Option<Instant>,
    pub deadline: Instant,
    /// Whether str0m reported the peer closed.
    pub closed: bool,
    /// Record every video packet in [`Viewer::arrivals`] (off: benchmarks run many viewers).
    pub record: bool,
    pub arrivals: Vec<Arrival>,
    /// Its ICE-TCP connection, for a viewer that has only a TCP candidate.
    pub tcp: Option<SimTcp>,
}

/// One video packet as a viewer received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    pub at: Instant,
    /// Extended sequence number.
    pub seq: u64,
    pub timestamp: u32,
    /// RTP payload bytes.
    pub bytes: usize,
    pub keyframe_start: bool,
}

/// The scripted FFmpeg: H264 at 30 fps with a keyframe (STAP-A SPS+PPS, FU-A IDR) every
/// `gop` frames, Opus at 50 packets/s, sent to a stream's ingest pair while it is bound.
#[derive(Debug, Clone)]
pub struct Source {
    pub gop: u32,
    frame: u32,
    video_seq: u16,
    audio_seq: u16,
    video_ts: u32,
    audio_ts: u32,
    pub ssrc: u32,
    next_video: Option<Instant>,
    next_audio: Option<Instant>,
    pub video_sent: u64,
    pub audio_sent: u64,
    /// FU-A fragments of each IDR frame and of each P frame, 1100 bytes each. The defaults
    /// (24 and 7) give about 244 video packets/s at 30 fps with a 1 s GOP, what FFmpeg's
    /// libx264 at 2 Mbit/s puts on the wire (`shared/notes/CLIENTS.md`).
    pub idr_fragments: usize,
    pub p_fragments: usize,
    vp8_seq: [u16; 4],
}

impl Source {
    pub fn new(gop: u32, ssrc: u32) -> Self {
        Self {
            gop,
            frame: 0,
            video_seq: 60_000,
            audio_seq: 1_000,
            video_ts: 0,
            audio_ts: 0,
            ssrc,
            next_video: None,
            next_audio: None,
            video_sent: 0,
            audio_sent: 0,
            idr_fragments: 24,
            p_fragments: 7,
            vp8_seq: [5_000; 4],
        }
    }

    /// RTP timestamp of the last video frame sent.
    pub fn last_video_ts(&self) -> u32 {
        self.video_ts.wrapping_sub(3000)
    }

    fn header(marker: bool, pt: u8, seq: u16, ts: u32, ssrc: u32) -> Vec<u8> {
        let mut h = vec![0x80, (u8::from(marker) << 7) | pt];
        h.extend_from_slice(&seq.to_be_bytes());
        h.extend_from_slice(&ts.to_be_bytes());
        h.extend_from_slice(&ssrc.to_be_bytes());
        h
    }

    /// One NAL unit of type `nal` (header byte) as `n` FU-A fragments of 1100 bytes; the
    /// last one carries the marker bit.
    fn fu_a(nal: u8, n: usize) -> Vec<(bool, Vec<u8>)> {
        let n = n.max(1);
        (0..n)
            .map(|i| {
                let start = if i == 0 { 0x80 } else { 0 };
                let end = if i + 1 == n { 0x40 } else { 0 };
                let mut p = vec![(nal & 0x60) | 28, start | end | (nal & 0x1f)];
                p.resize(1100, i as u8);
                (i + 1 == n, p)
            })
            .collect()
    }

    /// The video packets of the next frame.
    pub fn video_frame(&mut self) -> Vec<Vec<u8>> {
        let mut payloads: Vec<(bool, Vec<u8>)> = Vec::new();
        if self.frame.is_multiple_of(self.gop) {
            let sps = [0x67, 0x42, 0xc0, 0x1e, 0xda, 0x02, 0x80, 0xbf, 0xe5, 0x84];
            let pps = [0x68, 0xce, 0x3c, 0x80];
            let mut stap = vec![24];
            for nal in [&sps[..], &pps[..]] {
                stap.extend_from_slice(&(nal.len() as u16).to_be_bytes());
                stap.extend_from_slice(nal);
            }
            payloads.push((false, stap));
            payloads.extend(Self::fu_a(0x65, self.idr_fragments));
        } else {
            payloads.extend(Self::fu_a(0x41, self.p_fragments));
        }
        self.frame += 1;
        let ts = self.video_ts;
        self.video_ts = self.video_ts.wrapping_add(3000);
        payloads
            .into_iter()
            .map(|(m, p)| {
                let mut d = Self::header(m, 96, self.video_seq, ts, self.ssrc);
                self.video_seq = self.video_seq.wrapping_add(1);
                d.extend_from_slice(&p);
                d
            })
            .collect()
    }

    /// The packets of the frame [`video_frame`](Self::video_frame) last made, as a VP8
    /// rendition `k` carries it (its own SSRC and sequence numbers): a key frame of 6 packets
    /// with the H264 one, else 2 packets.
    pub fn vp8_frame(&mut self, k: u8) -> Vec<Vec<u8>> {
        let frame = self.frame.saturating_sub(1);
        let key = frame.is_multiple_of(self.gop);
        let n = if key { 6 } else { 2 };
        let ts = self.last_video_ts();
        let ssrc = self.ssrc ^ (0x100 + u32::from(k));
        let seq = &mut self.vp8_seq[usize::from(k) % 4];
        (0..n)
            .map(|i| {
                let mut d = Self::header(i + 1 == n, 97, *seq, ts, ssrc);
                *seq = seq.wrapping_add(1);
                // Descriptor: S and partition 0 on the first packet; then the VP8 header's
                // inverse key-frame bit.
                d.extend_from_slice(if i == 0 { &[0x10] } else { &[0x00] });
                d.push(if key { 0x00 } else { 0x01 });
                d.resize(d.len() + 900, k);
                d
            })
            .collect()
    }

    /// The frame [`video_frame`](Self::video_frame) last made as an H264 rendition `k`
    /// carries it at a lower bitrate: its own SSRC, sequence numbers and RTP clock origin, the
    /// keyframe with the H264 one, 8 and 2 fragments of 1100 bytes (the payload's fill byte
    /// is `0xA0 + k`, to tell renditions apart).
    pub fn h264_rendition_frame(&mut self, k: u8) -> Vec<Vec<u8>> {
        let frame = self.frame.saturating_sub(1);
        let key = frame.is_multiple_of(self.gop);
        let ts = self.last_video_ts().wrapping_add(1_000_000 * (u32::from(k) + 1));
        let ssrc = self.ssrc ^ (0x200 + u32::from(k));
        let mut payloads: Vec<(bool, Vec<u8>)> = Vec::new();
        if key {
            let sps = [0x67, 0x42, 0xc0, 0x1e, 0xda, 0x02, 0x80, 0xbf, 0xe5, 0x84];
            let mut stap = vec![24];
            stap.extend_from_slice(&(sps.len() as u16).to_be_bytes());
            stap.extend_from_slice(&sps);
            payloads.push((false, stap));
        }
        let fragments = Self::fu_a(if key { 0x65 } else { 0x41 }, if key { 8 } else { 2 });
        payloads.extend(fragments.into_iter().map(|(m, mut p)| {
            p[2..].fill(0xa0 + k);
            (m, p)
        }));
        let seq = &mut self.vp8_seq[usize::from(k) % 4];
        payloads
            .into_iter()
            .map(|(m, p)| {
                let mut d = Self::header(m, 96, *seq, ts, ssrc);
                *seq = seq.wrapping_add(1);
                d.extend_from_slice(&p);
                d
            })
            .collect()
    }

    /// The next audio packet.
    pub fn audio_packet(&mut self) -> Vec<u8> {
        let mut d = Self::header(false, 111, self.audio_seq, self.audio_ts, self.ssrc ^ 1);
        self.audio_seq = self.audio_seq.wrapping_add(1);
        self.audio_ts = self.audio_ts.wrapping_add(960);
        d.extend_from_slice(&[0xfc; 80]);
        d
    }
}

/// A fake FFmpeg process.
#[derive(Debug, Clone)]
pub struct FakeProcess {
    pub generation: u64,
    pub pid: u32,
    pub args: Vec<String>,
}

/// The simulated world.
#[derive(Debug)]
pub struct SimWorld {
    pub start: Instant,
    pub now: Instant,
    pub core: Core,
    pub viewers: Vec<Viewer>,
    net: VecDeque<Packet>,
    pub latency: Duration,
    /// Ingest pairs the fake runtime holds bound.
    pub bound: BTreeMap<StreamId, PortPair>,
    /// Further video renditions whose ports it bound with each pair.
    pub renditions: BTreeMap<StreamId, u8>,
    /// Ports whose bind fails.
    pub fail_bind: BTreeSet<u16>,
    /// Fake FFmpeg processes by stream.
    pub procs: BTreeMap<StreamId, FakeProcess>,
    /// Whether a fake process exits as soon as it gets SIGTERM.
    pub exit_on_term: bool,
    /// Whether spawning fails (FFmpeg missing).
    pub spawn_fails: bool,
    /// RTP sources by stream. A supervised stream's source only sends while its process runs.
    pub sources: BTreeMap<StreamId, Source>,
    /// Every event the core emitted, with the virtual time since `start`.
    pub events: Vec<(Duration, Event)>,
    /// What the core emitted for other shards ([`Output::Mirror`]), in order; a sharded test
    /// hands them to the follower worlds' cores.
    pub mirrors: Vec<crate::shard::Mirror>,
    /// What a follower core emitted for the leader ([`Output::Demand`]), in order; a sharded
    /// test hands them to the leader's core.
    pub demands: Vec<StreamId>,
    /// What the core asked the authorisation server ([`Output::Authorize`]), in order; a test
    /// answers with [`Core::handle_auth`](crate::Core::handle_auth).
    pub authorize: Vec<crate::AuthRequest>,
    /// How many times the core asked for the JWT keys again ([`Output::RefreshJwtKeys`]); a
    /// test answers with [`Core::set_jwt_keys`](crate::Core::set_jwt_keys).
    pub refresh_jwt_keys: usize,
    /// Responses to requests left pending ([`Output::Respond`]), in order.
    pub responses: Vec<(crate::RequestId, WhepResponse)>,
    /// Drop every this many datagrams the core sends (0: none), to exercise NACK repair.
    pub loss_every: u64,
    /// Until then, viewers' checks go without USE-CANDIDATE (re-signed), as Chromium's first
    /// checks do: its nomination comes with a later check, while its DTLS starts at once.
    pub hold_nomination: Option<Instant>,
    /// The last STUN binding request a viewer sent, as sent (for replay tests).
    pub last_check: Option<Vec<u8>>,
    /// Datagrams from the core dropped by `loss_every` so far.
    pub lost: u64,
    /// A STUN server behind which the core sits, if any.
    pub stun: Option<SimStun>,
    /// The server's socket and listener are dual-stack (bound to `[::]`): what an IPv4 viewer
    /// sends arrives from its IPv4-mapped IPv6 address (`[::ffff:a.b.c.d]`), as the kernel
    /// reports it, and so do its TCP connections.
    pub dual_stack: bool,
    /// The client address and `User-Agent` the next POSTs carry (none by default).
    pub post_client: Option<IpAddr>,
    pub post_user_agent: Option<String>,
    sent: u64,
    pub spawns: u64,
    pub kills: u64,
    /// TCP connections the core closed ([`Output::CloseTcp`]).
    pub tcp_closed: BTreeSet<ConnId>,
    next_pid: u32,
    next_viewer: u32,
    next_conn: u64,
}

impl SimWorld {
    /// A world around a core built from `config`.
    pub fn new(config: CoreConfig) -> Self {
        Self::with_core(|start| Core::new(config, start))
    }

    /// A world around shard `member.index` of a sharded server. Its
    /// [`set`](crate::shard::ShardMember::set) is what the shards share: the server's
    /// (`whep_server::shard::ShardSet`), or any [`SharedSeats`](crate::shard::SharedSeats).
    pub fn in_shard(config: CoreConfig, member: crate::shard::ShardMember) -> Self {
        Self::with_core(|start| Core::new(config, start).in_shard(member))
    }

    fn with_core(core: impl FnOnce(Instant) -> Core) -> Self {
        let start = Instant::now();
        Self {
            start,
            now: start,
            core: core(start),
            viewers: Vec::new(),
            net: VecDeque::new(),
            latency: Duration::from_millis(5),
            bound: BTreeMap::new(),
            renditions: BTreeMap::new(),
            fail_bind: BTreeSet::new(),
            procs: BTreeMap::new(),
            exit_on_term: true,
            spawn_fails: false,
            sources: BTreeMap::new(),
            events: Vec::new(),
            mirrors: Vec::new(),
            demands: Vec::new(),
            loss_every: 0,
            hold_nomination: None,
            last_check: None,
            lost: 0,
            stun: None,
            dual_stack: false,
            post_client: None,
            post_user_agent: None,
            sent: 0,
            spawns: 0,
            authorize: Vec::new(),
            refresh_jwt_keys: 0,
            responses: Vec::new(),
            kills: 0,
            tcp_closed: BTreeSet::new(),
            next_pid: 1000,
            next_viewer: 0,
            next_conn: 0,
        }
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Adds and starts a stream fed by a scripted source, and drives until it is running.
    pub fn add_stream(&mut self, id: &str, config: StreamConfig, gop: u32) -> StreamId {
        let id = StreamId::new(id).unwrap();
        self.core.add_stream(id.clone(), config).unwrap();
        self.core.start_stream(&id, self.now).unwrap();
        let ssrc = 0x1111_0000 + self.sources.len() as u32;
        self.sources.insert(id.clone(), Source::new(gop, ssrc));
        self.drain();
        id
    }

    /// Sends a WHEP request to the core and drains its outputs.
    pub fn http(&mut self, req: WhepRequest) -> WhepResponse {
        let r = self.core.handle_http(req, self.now);
        self.drain();
        r
    }

    /// Creates a viewer, POSTs its offer and applies the answer. Returns its index and the
    /// response.
    pub fn join(&mut self, stream: &StreamId) -> (usize, WhepResponse) {
        self.join_with(stream, &[Codec::H264])
    }

    /// [`SimWorld::join`] from a given address.
    pub fn join_from(&mut self, stream: &StreamId, addr: SocketAddr) -> (usize, WhepResponse) {
        self.join_offering(stream, addr, &[Codec::H264])
    }

    /// [`SimWorld::join`] with a player that offers only the video codecs `video` (H264 and
    /// VP8 are known), as Firefox without OpenH264 offers VP8 alone.
    pub fn join_with(&mut self, stream: &StreamId, video: &[Codec]) -> (usize, WhepResponse) {
        self.next_viewer += 1;
        let n = self.next_viewer;
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, (n >> 8) as u8, n as u8)), 5000);
        self.join_offering(stream, addr, video)
    }

    /// [`SimWorld::join`] by a player that can only use TCP (its UDP is blocked): its one
    /// candidate is TCP, and it opens a connection to the server's TCP candidate
    /// ([`SERVER`], which the config must list in
    /// [`CoreConfig::tcp_candidates`]) as soon as it has the answer. The server's frames for it
    /// go through a [`SendQueue`] of `queue_bytes`, as in a runtime.
    pub fn join_tcp(&mut self, stream: &StreamId, queue_bytes: usize) -> (usize, WhepResponse) {
        self.next_viewer += 1;
        let n = self.next_viewer;
        let addr =
            SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 1, (n >> 8) as u8, n as u8)), 40_000);
        self.next_conn += 1;
        let conn = ConnId(self.next_conn);
        let tcp = SimTcp {
            conn,
            queue: SendQueue::new(queue_bytes),
            stalled: false,
            closed: false,
            dropped: 0,
            reader: FrameReader::default(),
        };
        self.join_inner(stream, addr, &[Codec::H264], Some(tcp))
    }

    /// Opens a TCP connection from `peer` to the server that belongs to no viewer; returns its id.
    pub fn tcp_open_raw(&mut self, peer: SocketAddr) -> ConnId {
        self.next_conn += 1;
        let conn = ConnId(self.next_conn);
        self.core.handle_input(Input::TcpOpened { conn, peer, local: SERVER }, self.now);
        self.drain();
        conn
    }

    /// Feeds raw bytes on a TCP connection.
    pub fn tcp_raw(&mut self, conn: ConnId, bytes: &[u8]) {
        self.core.handle_input(Input::TcpData { conn, contents: bytes }, self.now);
        self.drain();
    }

    fn join_offering(
        &mut self,
        stream: &StreamId,
        addr: SocketAddr,
        video: &[Codec],
    ) -> (usize, WhepResponse) {
        self.join_inner(stream, addr, video, None)
    }

    fn join_inner(
        &mut self,
        stream: &StreamId,
        addr: SocketAddr,
        video: &[Codec],
        tcp: Option<SimTcp>,
    ) -> (usize, WhepResponse) {
        let mut rtc = Rtc::builder()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_h264(video.contains(&Codec::H264))
            .enable_vp8(video.contains(&Codec::Vp8))
            .enable_opus(true, false)
            .set_crypto_provider(crate::dtls::provider())
            .build(self.now);
        let proto = if tcp.is_some() { "tcp" } else { "udp" };
        rtc.add_local_candidate(Candidate::host(addr, proto).unwrap());
        let mut api = rtc.sdp_api();
        let video_mid = api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
        api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
        let (offer, pending) = api.apply().unwrap();
        let target = format!("{}/{}", self.core.config().whep_prefix, stream);
        let mut req = WhepRequest::new(Method::Post, target)
            .with_header("Content-Type", "application/sdp")
            .with_body(offer.to_sdp_string());
        req.client = self.post_client;
        if let Some(ua) = &self.post_user_agent {
            req = req.with_header("User-Agent", ua.clone());
        }
        let resp = self.http(req);
        let mut v = Viewer {
            rtc,
            addr,
            stream: stream.clone(),
            location: resp.header("location").map(str::to_owned),
            etag: resp.header("etag").map(str::to_owned),
            pending: Some(pending),
            answer: String::from_utf8_lossy(&resp.body).into_owned(),
            video_mid,
            connected: false,
            silent: false,
            nat: None,
            video_packets: 0,
            audio_packets: 0,
            first_video_seq: None,
            first_audio_seq: None,
            first_video_is_keyframe: None,
            video_codec: None,
            video_seqs: BTreeSet::new(),
            last_video_ts: None,
            video_ts_regressions: 0,
            first_video_at: None,
            deadline: self.now,
            closed: false,
            record: false,
            arrivals: Vec::new(),
            tcp,
        };
        if let Some(t) = &v.tcp
            && resp.code() == 201
        {
            let (peer, local) = (self.seen_by_server(addr), self.seen_by_server(SERVER));
            let input = Input::TcpOpened { conn: t.conn, peer, local };
            self.core.handle_input(input, self.now);
            self.drain();
        }
        if resp.code() == 201 {
            let answer =
                SdpAnswer::from_sdp_string(std::str::from_utf8(&resp.body).unwrap()).unwrap();
            v.rtc.sdp_api().accept_answer(v.pending.take().unwrap(), answer).unwrap();
        }
        v.rtc.handle_input(RtcInput::Timeout(self.now)).unwrap();
        self.viewers.push(v);
        let i = self.viewers.len() - 1;
        self.drain_viewer(i);
        (i, resp)
    }

    /// Starts an ICE restart on viewer `i` as a WHEP player does: new local credentials, and
    /// the PATCH body (an sdpfrag) carrying them and the viewer's candidate.
    pub fn viewer_ice_restart(&mut self, i: usize) -> String {
        let v = &mut self.viewers[i];
        let mut api = v.rtc.sdp_api();
        api.ice_restart(true);
        let (offer, pending) = api.apply().unwrap();
        v.pending = Some(pending);
        let offer = offer.to_sdp_string();
        let line =
            |p: &str| offer.lines().find(|l| l.starts_with(p)).unwrap_or_default().to_owned();
        let cands: String = offer
            .lines()
            .filter(|l| l.starts_with("a=candidate:"))
            .map(|l| format!("{l}\r\n"))
            .collect();
        format!(
            "a=ice-options:trickle\r\n{}\r\n{}\r\nm=video 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:{}\r\n{cands}a=end-of-candidates\r\n",
            line("a=ice-ufrag:"),
            line("a=ice-pwd:"),
            v.video_mid
        )
    }

    /// Applies the server's ICE-restart sdpfrag to viewer `i` (its original answer with the new
    /// credentials).
    pub fn viewer_accept_restart(&mut self, i: usize, frag: &str) {
        let find =
            |p: &str| frag.lines().find_map(|l| l.strip_prefix(p)).unwrap().trim().to_owned();
        let (u, p) = (find("a=ice-ufrag:"), find("a=ice-pwd:"));
        let v = &mut self.viewers[i];
        let answer: String = v
            .answer
            .lines()
            .map(|l| {
                if l.starts_with("a=ice-ufrag:") {
                    format!("a=ice-ufrag:{u}\r\n")
                } else if l.starts_with("a=ice-pwd:") {
                    format!("a=ice-pwd:{p}\r\n")
                } else {
                    format!("{l}\r\n")
                }
            })
            .collect();
        let pending = v.pending.take().unwrap();
        v.rtc
            .sdp_api()
            .accept_answer(pending, SdpAnswer::from_sdp_string(&answer).unwrap())
            .unwrap();
        v.answer = answer;
        let _ = v.rtc.handle_input(RtcInput::Timeout(self.now));
        self.drain_viewer(i);
    }

    /// Viewer `i` sends a PLI for its video.
    pub fn viewer_request_keyframe(&mut self, i: usize) {
        let v = &mut self.viewers[i];
        let mid = v.video_mid;
        if let Some(rx) = v.rtc.direct_api().stream_rx_by_mid(mid, None) {
            rx.request_keyframe(KeyframeRequestKind::Pli);
        }
        let _ = v.rtc.handle_input(RtcInput::Timeout(self.now));
        self.drain_viewer(i);
    }

    /// A request to a viewer's session URL.
    pub fn session_request(&self, i: usize, method: Method) -> WhepRequest {
        WhepRequest::new(method, self.viewers[i].location.clone().unwrap_or_default())
    }

    /// Drives until `pred` holds, failing loudly after `max` of virtual time.
    pub fn drive_until(&mut self, max: Duration, mut pred: impl FnMut(&Self) -> bool) {
        let until = self.now + max;
        while !pred(self) {
            assert!(
                self.now < until,
                "condition not reached within {max:?} (at {:?})",
                self.elapsed()
            );
            if !self.step(until) {
                self.now = until;
            }
        }
    }

    /// Drives for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        while self.step(until) {}
        self.now = self.now.max(until);
        self.core.handle_timeout(self.now);
        self.drain();
    }

    /// Advances to the earliest pending thing (not beyond `limit`) and handles it. Returns
    /// false when nothing is due before `limit`.
    pub fn step(&mut self, limit: Instant) -> bool {
        let mut next = [
            self.core.poll_timeout().map(|(t, _)| t),
            self.net.iter().map(|p| p.at).min(),
            self.viewers.iter().filter(|v| !v.closed).map(|v| v.deadline).min(),
        ]
        .into_iter()
        .flatten()
        .chain(self.source_deadlines())
        .min();
        if next.is_some_and(|t| t > limit) {
            next = None;
        }
        let Some(t) = next else { return false };
        self.now = self.now.max(t);
        let now = self.now;

        // Packets due.
        let mut due = Vec::new();
        self.net.retain(|p| {
            if p.at <= now {
                due.push(p.clone());
                false
            } else {
                true
            }
        });
        for p in due {
            self.deliver(p);
        }
        // RTP from the scripted sources.
        self.emit_sources();
        // Viewers' timers.
        for i in 0..self.viewers.len() {
            if !self.viewers[i].closed && self.viewers[i].deadline <= now {
                let _ = self.viewers[i].rtc.handle_input(RtcInput::Timeout(now));
                self.drain_viewer(i);
            }
        }
        // The core's timers.
        if self.core.poll_timeout().is_some_and(|(t, _)| t <= now) {
            self.core.handle_timeout(now);
            self.drain();
            if let Some((t, why)) = self.core.poll_timeout() {
                assert!(t > now, "core deadline {why:?} not in the future after handle_timeout");
            }
        }
        self.drain();
        true
    }

    fn source_deadlines(&self) -> Vec<Instant> {
        self.sources
            .iter()
            .filter(|(id, _)| self.source_active(id))
            .flat_map(|(_, s)| [s.next_video, s.next_audio])
            .map(|t| t.unwrap_or(self.now))
            .collect()
    }

    fn source_active(&self, id: &StreamId) -> bool {
        let Some(info) = self.core.stream(id) else {
            return false;
        };
        self.bound.contains_key(id) && (!info.supervised || self.procs.contains_key(id))
    }

    fn emit_sources(&mut self) {
        let now = self.now;
        let ids: Vec<StreamId> = self.sources.keys().cloned().collect();
        for id in ids {
            if !self.source_active(&id) {
                if let Some(s) = self.sources.get_mut(&id) {
                    s.next_video = None;
                    s.next_audio = None;
                }
                continue;
            }
            let ports = self.bound[&id];
            let mut datagrams = Vec::new();
            let s = self.sources.get_mut(&id).unwrap();
            if s.next_video.is_none_or(|t| t <= now) {
                for d in s.video_frame() {
                    datagrams.push((ports.video, ports.video_source(), d));
                    s.video_sent += 1;
                }
                let codecs: Vec<VideoCodec> = self
                    .core
                    .stream(&id)
                    .map(|i| i.renditions.iter().skip(1).map(|r| r.codec).collect())
                    .unwrap_or_default();
                for (k, codec) in codecs.into_iter().enumerate() {
                    let k = u8::try_from(k).unwrap_or(u8::MAX);
                    let frame = match codec {
                        VideoCodec::Vp8 => s.vp8_frame(k),
                        VideoCodec::H264 => s.h264_rendition_frame(k),
                    };
                    for d in frame {
                        datagrams.push((ports.rendition(k), ports.rendition_source(k), d));
                    }
                }
                s.next_video = Some(s.next_video.unwrap_or(now) + Duration::from_micros(33_333));
            }
            if s.next_audio.is_none_or(|t| t <= now) {
                datagrams.push((ports.audio(), ports.audio_source(), s.audio_packet()));
                s.audio_sent += 1;
                s.next_audio = Some(s.next_audio.unwrap_or(now) + Duration::from_millis(20));
            }
            for (port, from, d) in datagrams {
                let source = SocketAddr::from(([127, 0, 0, 1], from));
                let input = Input::Ingest { port, source, contents: &d, arrived: None };
                self.core.handle_input(input, now);
                self.drain();
            }
        }
    }

    /// Feeds one raw datagram to an ingest port (garbage, RTCP, ...), from where the stream's
    /// FFmpeg sends.
    pub fn ingest_raw(&mut self, port: u16, data: &[u8]) {
        self.ingest_from(ffmpeg_source(port), port, data);
    }

    /// Feeds one raw datagram to an ingest port from `source`.
    pub fn ingest_from(&mut self, source: SocketAddr, port: u16, data: &[u8]) {
        let input = Input::Ingest { port, source, contents: data, arrived: None };
        self.core.handle_input(input, self.now);
        self.drain();
    }

    /// `addr` as the server's socket reports it: IPv4-mapped when it is
    /// [`dual_stack`](Self::dual_stack).
    fn seen_by_server(&self, addr: SocketAddr) -> SocketAddr {
        match addr {
            SocketAddr::V4(v4) if self.dual_stack => {
                SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
            }
            _ => addr,
        }
    }

    /// Feeds one raw datagram to the viewer socket.
    pub fn datagram_raw(&mut self, from: SocketAddr, data: &[u8]) {
        self.core.handle_input(
            Input::Datagram { source: from, destination: SERVER, contents: data },
            self.now,
        );
        self.drain();
    }

    fn deliver(&mut self, p: Packet) {
        let now = self.now;
        if let Some(conn) = p.tcp {
            if p.to == SERVER {
                self.core.handle_input(Input::TcpData { conn, contents: &p.data }, now);
                self.drain();
                return;
            }
            let Some(i) = self.viewers.iter().position(|v| {
                !v.closed && v.tcp.as_ref().is_some_and(|t| t.conn == conn && !t.closed)
            }) else {
                return;
            };
            let mut frames = Vec::new();
            let v = &mut self.viewers[i];
            if let Some(t) = &mut v.tcp
                && t.reader.feed(&p.data, |f| frames.push(f.to_vec())).is_err()
            {
                t.closed = true;
            }
            let local = v.addr;
            for f in frames {
                let Ok(recv) = Receive::new(Protocol::Tcp, p.from, local, &f) else {
                    continue;
                };
                // One frame at a time, each drained, as str0m wants its inputs.
                let _ = self.viewers[i].rtc.handle_input(RtcInput::Receive(now, recv));
                self.drain_viewer(i);
            }
            return;
        }
        if let Some(st) = &mut self.stun {
            if p.to == st.addr {
                st.requests += 1;
                st.last_request = Some(p.data.clone());
                if st.answers
                    && let Some(tid) = crate::path::binding_request_tid(&p.data)
                {
                    self.net.push_back(Packet {
                        at: now + self.latency,
                        from: st.addr,
                        to: SERVER,
                        data: crate::stun::binding_success(&tid, st.mapped),
                        tcp: None,
                    });
                }
                return;
            }
            if p.to == SERVER && p.from != st.addr && !st.server_reachable {
                return; // the private address, from outside
            }
            if p.to == st.mapped {
                // Forwarded by the NAT to the core's socket.
                let input =
                    Input::Datagram { source: p.from, destination: SERVER, contents: &p.data };
                self.core.handle_input(input, now);
                self.drain();
                return;
            }
        }
        if p.to == SERVER {
            let (source, destination) = (self.seen_by_server(p.from), self.seen_by_server(p.to));
            self.core.handle_input(Input::Datagram { source, destination, contents: &p.data }, now);
            self.drain();
            return;
        }
        let Some(i) =
            self.viewers.iter().position(|v| v.nat.unwrap_or(v.addr) == p.to && !v.closed)
        else {
            return;
        };
        let local = self.viewers[i].addr;
        // Through the NAT, the core's datagrams come from its public address.
        let from = match &self.stun {
            Some(st) if p.from == SERVER && !st.server_reachable => st.mapped,
            _ => p.from,
        };
        let Ok(recv) = Receive::new(Protocol::Udp, from, local, &p.data) else {
            return;
        };
        let _ = self.viewers[i].rtc.handle_input(RtcInput::Receive(now, recv));
        self.drain_viewer(i);
    }

    fn drain_viewer(&mut self, i: usize) {
        let now = self.now;
        let latency = self.latency;
        loop {
            let v = &mut self.viewers[i];
            match v.rtc.poll_output() {
                Ok(RtcOutput::Transmit(t)) => {
                    if !v.silent {
                        let mut data: Vec<u8> = t.contents.into();
                        if self.hold_nomination.is_some_and(|until| now < until)
                            && let Some(held) = without_use_candidate(&data, &v.answer)
                        {
                            data = held;
                        }
                        if data.starts_with(&[0x00, 0x01]) {
                            self.last_check = Some(data.clone());
                        }
                        let tcp = match (&v.tcp, t.proto) {
                            (Some(c), Protocol::Tcp) if !c.closed => Some(c.conn),
                            (Some(_), _) => continue,
                            (None, _) => None,
                        };
                        if tcp.is_some() {
                            data = crate::tcp::encode(&data).unwrap();
                        }
                        self.net.push_back(Packet {
                            at: now + latency,
                            from: v.nat.unwrap_or(t.source),
                            to: t.destination,
                            data,
                            tcp,
                        });
                    }
                }
                Ok(RtcOutput::Timeout(t)) => {
                    v.deadline = t.max(now + Duration::from_millis(1));
                    break;
                }
                Ok(RtcOutput::Event(e)) => match e {
                    RtcEvent::Connected => v.connected = true,
                    RtcEvent::RtpPacket(p) => {
                        let codec = v
                            .rtc
                            .codec_config()
                            .params()
                            .iter()
                            .find(|c| c.pt() == p.header.payload_type)
                            .map(|c| c.spec().codec);
                        let keyframe_start = |payload: &[u8]| match codec {
                            Some(Codec::Vp8) => crate::rtp::vp8_keyframe_start(payload),
                            _ => crate::rtp::classify_h264(payload).is_keyframe_start(),
                        };
                        match codec {
                            Some(Codec::H264 | Codec::Vp8) => {
                                v.video_packets += 1;
                                v.video_codec = codec;
                                v.first_video_seq.get_or_insert(p.header.sequence_number);
                                v.first_video_is_keyframe
                                    .get_or_insert_with(|| keyframe_start(&p.payload));
                                v.video_seqs.insert(*p.seq_no);
                                let ts = p.header.timestamp;
                                if v.last_video_ts.is_some_and(|l| (ts.wrapping_sub(l) as i32) < 0)
                                {
                                    v.video_ts_regressions += 1;
                                }
                                v.last_video_ts = Some(ts);
                                v.first_video_at.get_or_insert(now);
                                if v.record {
                                    v.arrivals.push(Arrival {
                                        at: now,
                                        seq: *p.seq_no,
                                        timestamp: ts,
                                        bytes: p.payload.len(),
                                        keyframe_start: keyframe_start(&p.payload),
                                    });
                                }
                            }
                            Some(Codec::Opus) => {
                                v.audio_packets += 1;
                                v.first_audio_seq.get_or_insert(p.header.sequence_number);
                            }
                            _ => {}
                        }
                    }
                    RtcEvent::Closed => v.closed = true,
                    _ => {}
                },
                Err(_) => {
                    v.closed = true;
                    break;
                }
            }
        }
        if !self.viewers[i].rtc.is_alive() {
            self.viewers[i].closed = true;
        }
    }

    /// Executes the core's outputs as a runtime would, then checks its invariants.
    pub fn drain(&mut self) {
        let now = self.now;
        while let Some(out) = self.core.poll_output() {
            match out {
                Output::Transmit(t) => {
                    self.sent += 1;
                    if let Transport::Tcp(conn) = t.transport {
                        self.queue_tcp(conn, t.contents);
                        continue;
                    }
                    if self.loss_every > 0 && self.sent.is_multiple_of(self.loss_every) {
                        self.lost += 1;
                        continue;
                    }
                    self.net.push_back(Packet {
                        at: now + self.latency,
                        from: t.source,
                        to: t.destination,
                        data: t.contents,
                        tcp: None,
                    });
                }
                Output::CloseTcp { conn } => {
                    self.tcp_closed.insert(conn);
                    if let Some(t) = self
                        .viewers
                        .iter_mut()
                        .filter_map(|v| v.tcp.as_mut())
                        .find(|t| t.conn == conn)
                    {
                        t.closed = true;
                    }
                    self.core.handle_input(Input::TcpClosed { conn }, now);
                }
                Output::BindIngest { stream, ports, renditions } => {
                    let taken = self
                        .bound
                        .values()
                        .any(|p| p.contains(ports.video) || p.contains(ports.audio()));
                    assert!(!taken, "pair {ports} handed out while bound");
                    if self.fail_bind.contains(&ports.video)
                        || self.fail_bind.contains(&ports.audio())
                    {
                        let error = "address in use".to_owned();
                        self.core.handle_input(Input::BindFailed { stream, ports, error }, now);
                    } else {
                        self.bound.insert(stream.clone(), ports);
                        self.renditions.insert(stream.clone(), renditions);
                        self.core.handle_input(Input::IngestBound { stream, ports }, now);
                    }
                }
                Output::ReleaseIngest { stream, ports } => {
                    if self.bound.get(&stream) == Some(&ports) {
                        self.bound.remove(&stream);
                    }
                }
                Output::SpawnProcess { stream, generation, args, .. } => {
                    self.spawns += 1;
                    if self.spawn_fails {
                        let error = "ffmpeg: not found on PATH".to_owned();
                        self.core
                            .handle_input(Input::SpawnFailed { stream, generation, error }, now);
                    } else {
                        self.next_pid += 1;
                        let pid = self.next_pid;
                        self.procs.insert(stream.clone(), FakeProcess { generation, pid, args });
                        self.core
                            .handle_input(Input::ProcessSpawned { stream, generation, pid }, now);
                    }
                }
                Output::StopProcess { stream, generation } => {
                    if self.exit_on_term
                        && self.procs.get(&stream).is_some_and(|p| p.generation == generation)
                    {
                        self.procs.remove(&stream);
                        self.core.handle_input(
                            Input::ProcessExited { stream, generation, code: Some(255) },
                            now,
                        );
                    }
                }
                Output::KillProcess { stream, generation } => {
                    self.kills += 1;
                    if self.procs.get(&stream).is_some_and(|p| p.generation == generation) {
                        self.procs.remove(&stream);
                        self.core.handle_input(
                            Input::ProcessExited { stream, generation, code: None },
                            now,
                        );
                    }
                }
                Output::Event(e) => self.events.push((now - self.start, e)),
                Output::Mirror(m) => self.mirrors.push(m),
                Output::Demand { stream } => self.demands.push(stream),
                Output::Authorize(a) => self.authorize.push(a),
                Output::RefreshJwtKeys => self.refresh_jwt_keys += 1,
                Output::Respond { id, response } => self.responses.push((id, response)),
            }
        }
        self.flush_tcp();
        self.core.check_invariants();
    }

    /// Queues a framed transmit in its connection's send queue, as a runtime does; a frame
    /// that does not fit is reported dropped.
    fn queue_tcp(&mut self, conn: ConnId, frame: Vec<u8>) {
        let Some(t) = self
            .viewers
            .iter_mut()
            .filter_map(|v| v.tcp.as_mut())
            .find(|t| t.conn == conn && !t.closed)
        else {
            return;
        };
        if !t.queue.push(frame) {
            let (frames, _) = t.queue.take_dropped();
            t.dropped += frames;
            self.core.handle_input(Input::TcpDropped { conn, frames }, self.now);
        }
    }

    /// Puts what every TCP viewer that reads has queued on the wire.
    fn flush_tcp(&mut self) {
        let at = self.now + self.latency;
        for v in &mut self.viewers {
            let Some(t) = &mut v.tcp else { continue };
            if t.stalled || t.closed || t.queue.is_empty() {
                continue;
            }
            let mut data = Vec::with_capacity(t.queue.len());
            while !t.queue.is_empty() {
                let n = t.queue.front().len();
                data.extend_from_slice(t.queue.front());
                t.queue.advance(n);
            }
            self.net.push_back(Packet { at, from: SERVER, to: v.addr, data, tcp: Some(t.conn) });
        }
    }

    /// Drops the core's pending outputs without executing them (benchmarks measure the core
    /// alone); returns how many datagrams were dropped.
    pub fn discard_outputs(&mut self) -> usize {
        let mut n = 0;
        while let Some(out) = self.core.poll_output() {
            n += usize::from(matches!(out, Output::Transmit(_)));
        }
        n
    }

    /// A world with one external stream and `n` connected viewers, the source stopped, ready
    /// for feeding packets by hand (benchmarks).
    pub fn with_connected_viewers(n: usize) -> (Self, StreamId, PortPair) {
        Self::with_connected_viewers_config(config(), n)
    }

    /// As [`SimWorld::with_connected_viewers`], from a given config (caps are raised to `n`).
    pub fn with_connected_viewers_config(
        mut config: CoreConfig,
        n: usize,
    ) -> (Self, StreamId, PortPair) {
        config.max_viewers_per_stream = n;
        config.max_viewers_total = n;
        // All of them join at one instant.
        config.rate_limits = crate::RateLimits::unlimited();
        let mut w = Self::new(config);
        let id = w.add_stream("bench", StreamConfig::external(), 30);
        for _ in 0..n {
            let (_, r) = w.join(&id);
            assert_eq!(r.code(), 201);
        }
        w.drive_until(Duration::from_secs(30), |w| w.connected(&id) == n);
        w.run_for(Duration::from_secs(2));
        w.sources.remove(&id);
        let ports = w.bound[&id];
        (w, id, ports)
    }

    /// Ends the simulation and keeps only the core, dropping the players, the network and the
    /// sources (benchmarks measure the core's heap alone).
    pub fn into_core(self) -> Core {
        self.core
    }

    /// Kills a stream's fake FFmpeg as SIGKILL would (an unexpected exit).
    pub fn crash_process(&mut self, stream: &StreamId) {
        if let Some(p) = self.procs.remove(stream) {
            self.core.handle_input(
                Input::ProcessExited {
                    stream: stream.clone(),
                    generation: p.generation,
                    code: None,
                },
                self.now,
            );
            self.drain();
        }
    }

    /// Number of viewers whose media flows, as the core sees it.
    pub fn connected(&self, stream: &StreamId) -> usize {
        self.core.stream(stream).map_or(0, |s| s.connected_viewers)
    }
}

/// A viewer's STUN binding request with USE-CANDIDATE, rebuilt without it and signed again with
/// the server's ICE password from `answer`; `None` for anything else.
fn without_use_candidate(data: &[u8], answer: &str) -> Option<Vec<u8>> {
    let msg = StunMessage::parse(data).ok()?;
    if !msg.is_binding_request() || !msg.use_candidate() {
        return None;
    }
    let pwd = answer.lines().find_map(|l| l.trim().strip_prefix("a=ice-pwd:"))?;
    let (ours, theirs) = msg.split_username()?;
    let username = format!("{ours}:{theirs}");
    let tie = msg.ice_controlling().unwrap_or(0);
    let held =
        StunMessage::binding_request(&username, msg.trans_id(), true, tie, msg.prio()?, false);
    let mut buf = vec![0u8; 512];
    let provider = crate::dtls::provider();
    let n = held
        .to_bytes(Some(pwd.as_bytes()), &mut buf, |k, p| {
            provider.sha1_hmac_provider.sha1_hmac(k, p)
        })
        .ok()?;
    buf.truncate(n);
    Some(buf)
}
