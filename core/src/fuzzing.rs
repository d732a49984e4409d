//! Fuzz targets (feature `fuzzing`): one function per surface where untrusted bytes enter the
//! core, each taking `&[u8]`.
//!
//! The cargo-fuzz project in `fuzz/` calls these from libFuzzer (`scripts/fuzz.sh`), through
//! `whep_server::fuzzing`, which adds the target of the application routes (`whep_request`,
//! built on [`decode_request`] and the helpers here); `core/server/tests/fuzz_corpus.rs`
//! replays the committed seed corpora (`fuzz/corpus/<target>/`) and any crash files
//! (`fuzz/artifacts/<target>/`) through them as an ordinary test on stable Rust.
//!
//! No function panics on any input, unless the core is wrong: a broken invariant
//! ([`Core::check_invariants`](crate::Core::check_invariants), run after every step), a
//! documented contract not kept (named in each function's docs), or a panic inside the core or
//! str0m. A crash is a bug to fix, not an input to filter.
//!
//! Building a world costs more than most inputs (str0m answering an offer; for the media
//! targets a DTLS handshake), so all targets but `sdpfrag` and `ops` keep theirs in a
//! thread-local ([`with_world`]) and rebuild it every 256 inputs, or sooner when it is no longer
//! in the state the target needs. `offer` and `whep_request` rebuild or restore it whenever an
//! input may have changed it, so every input sees the same state (up to counters and the random
//! ids the core draws) and a crash file reproduces on its own.
//! `ingest` and `viewer_datagram` keep one connected viewer across inputs (its str0m state and
//! the stream's sequence numbers carry over), so a crash there may need the inputs before it;
//! replaying the crash file alone starts from a fresh world.

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::thread::LocalKey;
use std::time::Duration;

use crate::rtp::{self, Datagram, SeqExtender};
use crate::sdpfrag::{self, SdpFrag};
use crate::sim::ops::{Op, OpsWorld};
use crate::sim::{self, SimWorld};
use crate::whep::{CONTENT_TYPE_SDP, Method, WhepRequest};
use crate::{PortPair, StreamConfig, StreamId, sdp};

/// A fuzz target: takes any bytes, panics only when the core is wrong.
pub type Target = fn(&[u8]);

/// Every target of the core by name, as `fuzz/fuzz_targets/<name>.rs` and `fuzz/corpus/<name>/`
/// call it (`whep_server::fuzzing::TARGETS` lists these and `whep_request`).
pub const TARGETS: &[(&str, Target)] = &[
    ("offer", offer),
    ("sdpfrag", sdpfrag),
    ("ingest", ingest),
    ("viewer_datagram", viewer_datagram),
    ("tcp_stream", tcp_stream),
    ("ops", ops),
    ("jwt", jwt),
];

/// The Chromium offer of the core's test data; every world's session is created with it.
pub const CHROMIUM_OFFER: &str = include_str!("../tests/data/chromium-156-offer.sdp");

/// In a `whep_request` target, replaced by the id of the world's session.
pub const SESSION_PLACEHOLDER: &str = "SESSION";
/// In a `whep_request` header value, replaced by the session's `ETag` (quoted).
pub const ETAG_PLACEHOLDER: &str = "ETAG";
/// The admin token of the `whep_request` world (`Authorization: Bearer admin`).
pub const ADMIN_TOKEN: &str = "admin";
/// In a STUN USERNAME attribute of a [`viewer_datagram`] input, replaced by the real
/// `server-ufrag:viewer-ufrag` of the world's session; the message's MESSAGE-INTEGRITY is then
/// recomputed with the server's password, so the fuzzer gets past the integrity check.
pub const STUN_USERNAME_PLACEHOLDER: &[u8] = b"USER:NAME";

/// Inputs after which a reused world is built afresh.
pub const REBUILD_EVERY: u32 = 256;

/// At most this many operations of an [`ops`] input are run.
pub const MAX_OPS: usize = 64;
/// At most this much virtual time (ms) passes in one [`ops`] input.
pub const MAX_ADVANCE_MS: u64 = 30_000;

/// A world kept across inputs, rebuilt every [`REBUILD_EVERY`] uses or when it is no longer
/// in the state the target needs.
#[derive(Debug)]
pub struct Reused<T> {
    world: Option<T>,
    uses: u32,
}

impl<T> Reused<T> {
    /// No world yet: the first use builds one.
    pub const fn new() -> Self {
        Self { world: None, uses: 0 }
    }
}

impl<T> Default for Reused<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs `f` on the world in `key`, built with `build` first when there is none, it served
/// [`REBUILD_EVERY`] inputs, or it is no longer `usable` (the targets of
/// `whep_server::fuzzing` keep theirs this way too).
pub fn with_world<T: 'static, R>(
    key: &'static LocalKey<RefCell<Reused<T>>>,
    build: fn() -> T,
    usable: fn(&T) -> bool,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    key.with(|cell| {
        let mut slot = cell.borrow_mut();
        let stale = slot.uses >= REBUILD_EVERY || !slot.world.as_ref().is_some_and(usable);
        if stale {
            // Drop the old world first: two live worlds would double the memory at peak.
            slot.world = None;
            slot.world = Some(build());
            slot.uses = 0;
        }
        slot.uses += 1;
        let world = slot.world.as_mut().unwrap_or_else(|| unreachable!("built above"));
        f(world)
    })
}

/// A simulated world of `config` without rate limits, with a started external stream `demo`.
pub fn demo_world(mut config: crate::CoreConfig) -> (SimWorld, StreamId) {
    // A world serves many inputs at one virtual instant: rate limits (tested on their own)
    // would refuse them after the first burst.
    config.rate_limits = crate::RateLimits::unlimited();
    let mut w = SimWorld::new(config);
    let id = w.add_stream("demo", StreamConfig::external(), 30);
    (w, id)
}

/// `POST /whep/demo` with an SDP offer `body`.
pub fn post(body: impl Into<Vec<u8>>) -> WhepRequest {
    WhepRequest::new(Method::Post, "/whep/demo")
        .with_header("Content-Type", CONTENT_TYPE_SDP)
        .with_body(body)
}

/// `body` as lossy UTF-8.
pub fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

// ---------------------------------------------------------------------------------------------
// offer
// ---------------------------------------------------------------------------------------------

thread_local! {
    static OFFER: RefCell<Reused<SimWorld>> = const { RefCell::new(Reused::new()) };
}

/// An SDP offer, as the body of `POST /whep/{stream}`.
///
/// Runs [`sdp::check_offer`]; when the codec policy accepts the offer, POSTs it for real to a
/// core with one started external stream (str0m parses and answers it), then DELETEs the
/// session so the next input finds the same empty stream.
///
/// A crash means: the policy's summary breaks its documented shape (neither H264 with
/// packetization-mode 1 nor VP8, or no Opus), the core answers an accepted offer with anything but
/// 201, 400 (str0m refused it), 406 (str0m dropped the codecs) or 413 (over the body limit), a
/// 201 lacks `Location`/`ETag` or does not add exactly one viewer, a rejection leaves a viewer
/// behind, DELETE does not remove it, an invariant breaks, or str0m panics.
pub fn offer(data: &[u8]) {
    let Ok(summary) = sdp::check_offer(data) else {
        return;
    };
    assert!(
        !summary.h264.is_empty() || !summary.vp8.is_empty(),
        "accepted offer without H264 or VP8"
    );
    assert!(
        summary.h264.iter().all(|h| h.packetization_mode == 1),
        "summary lists an H264 type without packetization-mode 1: {:?}",
        summary.h264
    );
    assert!(!summary.opus.is_empty(), "accepted offer without Opus");
    with_world(
        &OFFER,
        || demo_world(sim::config()).0,
        |w| w.core.viewer_count() == 0,
        |w| {
            let r = w.http(post(data));
            match r.code() {
                201 => {
                    assert_eq!(w.core.viewer_count(), 1, "a 201 adds one viewer");
                    assert!(r.header("etag").is_some(), "201 without ETag");
                    let location = r.header("location").map(str::to_owned);
                    let location = location.unwrap_or_else(|| panic!("201 without Location"));
                    let d = w.http(WhepRequest::new(Method::Delete, location));
                    assert_eq!(d.code(), 204, "DELETE of the new session");
                    assert_eq!(w.core.viewer_count(), 0, "DELETE removes the viewer");
                }
                400 | 406 | 413 => {
                    assert_eq!(w.core.viewer_count(), 0, "a rejected POST leaves no viewer");
                }
                c => {
                    panic!("the policy accepted the offer but the core said {c}: {}", text(&r.body))
                }
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// whep_request
// ---------------------------------------------------------------------------------------------

/// Every [`Method`] of http-types, the WHEP ones first; [`decode_request`] picks one with the
/// first input byte modulo the length.
pub const METHODS: [Method; 39] = [
    Method::Get,
    Method::Head,
    Method::Post,
    Method::Put,
    Method::Delete,
    Method::Patch,
    Method::Options,
    Method::Connect,
    Method::Trace,
    Method::Acl,
    Method::BaselineControl,
    Method::Bind,
    Method::Checkin,
    Method::Checkout,
    Method::Copy,
    Method::Label,
    Method::Link,
    Method::Lock,
    Method::Merge,
    Method::MkActivity,
    Method::MkCalendar,
    Method::MkCol,
    Method::MkRedirectRef,
    Method::MkWorkspace,
    Method::Move,
    Method::OrderPatch,
    Method::Pri,
    Method::PropFind,
    Method::PropPatch,
    Method::Rebind,
    Method::Report,
    Method::Search,
    Method::Unbind,
    Method::Uncheckout,
    Method::Unlink,
    Method::Unlock,
    Method::Update,
    Method::UpdateRedirectRef,
    Method::VersionControl,
];

/// Splits off one line (without its `\n` or `\r\n`); the rest follows the `\n`.
fn split_line(data: &[u8]) -> (&[u8], &[u8]) {
    let (line, rest) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    (line.strip_suffix(b"\r").unwrap_or(line), rest)
}

/// Decodes fuzz bytes into a request: the first byte picks the method from [`METHODS`]
/// (modulo), then the target up to `\n`, then `name: value` header lines up to an empty line
/// (a line without `:` is a name with an empty value), and the rest is the body. Text is
/// decoded as lossy UTF-8; `\r\n` works as well as `\n`. Empty input is `GET` with an empty
/// target.
pub fn decode_request(data: &[u8]) -> WhepRequest {
    let Some((&m, rest)) = data.split_first() else {
        return WhepRequest::new(Method::Get, "");
    };
    let method = METHODS[usize::from(m) % METHODS.len()];
    let (target, mut rest) = split_line(rest);
    let mut req = WhepRequest::new(method, text(target));
    while !rest.is_empty() {
        let (line, after) = split_line(rest);
        rest = after;
        if line.is_empty() {
            break;
        }
        let line = text(line);
        let (name, value) = line.split_once(':').unwrap_or((&line, ""));
        req.headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    req.body = rest.to_vec();
    req
}

// ---------------------------------------------------------------------------------------------
// sdpfrag
// ---------------------------------------------------------------------------------------------

/// A PATCH body (`application/trickle-ice-sdpfrag`): [`SdpFrag::parse`], and when the fragment
/// carries credentials, [`sdpfrag::build_restart_answer`] with them, its candidates and its
/// first two mids, then the answer parsed again.
///
/// A crash means: a parsed fragment breaks its documented shape (ufrag without password,
/// a candidate not starting with `candidate:`, a candidate labelled with a mid the fragment
/// does not list), or a restart answer that fits the parser's limits does not parse back to
/// the same credentials and number of candidates (a value injected a line).
pub fn sdpfrag(data: &[u8]) {
    let Ok(frag) = SdpFrag::parse(data) else {
        return;
    };
    assert_eq!(frag.ice_ufrag.is_some(), frag.ice_pwd.is_some(), "ufrag and pwd come together");
    for (mid, c) in &frag.candidates {
        assert!(c.starts_with("candidate:"), "candidate {c:?}");
        if let Some(mid) = mid {
            assert!(frag.mids.contains(mid), "candidate labelled with unknown mid {mid:?}");
        }
    }
    let (Some(ufrag), Some(pwd)) = (&frag.ice_ufrag, &frag.ice_pwd) else {
        return;
    };
    let mids: Vec<&str> = frag.mids.iter().take(2).map(String::as_str).collect();
    let answer = sdpfrag::build_restart_answer(
        true,
        frag.ice_options.as_deref(),
        "video",
        &mids,
        ufrag,
        pwd,
        &frag.candidates.iter().map(|(_, c)| c.clone()).collect::<Vec<_>>(),
    );
    let fits = answer.lines().count() <= SdpFrag::MAX_LINES
        && answer.lines().all(|l| l.len() <= SdpFrag::MAX_LINE);
    if !fits {
        return;
    }
    let back = SdpFrag::parse(answer.as_bytes())
        .unwrap_or_else(|e| panic!("restart answer does not parse: {e}\n{answer}"));
    assert_eq!(back.ice_ufrag.as_ref(), Some(ufrag), "ufrag round trip");
    assert_eq!(back.ice_pwd.as_ref(), Some(pwd), "pwd round trip");
    assert_eq!(back.candidates.len(), frag.candidates.len(), "candidates round trip");
    assert!(back.end_of_candidates, "restart answer ends the candidates");
}

// ---------------------------------------------------------------------------------------------
// A world with one connected viewer (ingest, viewer_datagram)
// ---------------------------------------------------------------------------------------------

struct MediaWorld {
    w: SimWorld,
    stream: StreamId,
    ports: PortPair,
    viewer: SocketAddr,
    /// `server-ufrag:viewer-ufrag`, the USERNAME of the viewer's binding requests.
    username: String,
    server_pwd: String,
}

thread_local! {
    static INGEST: RefCell<Reused<MediaWorld>> = const { RefCell::new(Reused::new()) };
    static DATAGRAM: RefCell<Reused<MediaWorld>> = const { RefCell::new(Reused::new()) };
}

/// Virtual time that passes after each input of the media targets: the viewer receives what
/// the core sent and answers (receiver reports, NACKs, keepalives).
const MEDIA_STEP: Duration = Duration::from_millis(20);

fn sdp_value(sdp: &str, prefix: &str) -> String {
    sdp.lines().find_map(|l| l.strip_prefix(prefix)).unwrap_or_default().trim().to_owned()
}

fn media_world() -> MediaWorld {
    let (mut w, stream) = demo_world(sim::config());
    let (v, r) = w.join(&stream);
    assert_eq!(r.code(), 201, "the simulated viewer is accepted: {}", text(&r.body));
    let answer = text(&r.body);
    let stream_id = stream.clone();
    w.drive_until(Duration::from_secs(30), |w| w.connected(&stream_id) == 1);
    // Media flows for a while (keyframes, receiver reports), then the scripted source stops:
    // from here on only the fuzzer feeds the ingest ports.
    w.run_for(Duration::from_millis(500));
    w.sources.remove(&stream);
    let ports = w.bound[&stream];
    let viewer_ufrag = w.viewers[v].rtc.direct_api().local_ice_credentials().ufrag.clone();
    let username = format!("{}:{viewer_ufrag}", sdp_value(&answer, "a=ice-ufrag:"));
    let server_pwd = sdp_value(&answer, "a=ice-pwd:");
    MediaWorld { viewer: w.viewers[v].addr, w, stream, ports, username, server_pwd }
}

fn media_usable(m: &MediaWorld) -> bool {
    m.w.connected(&m.stream) == 1
}

// ---------------------------------------------------------------------------------------------
// ingest
// ---------------------------------------------------------------------------------------------

/// A datagram from FFmpeg (or anyone who can reach the loopback ingest ports).
///
/// Runs [`rtp::parse`] and [`rtp::classify_h264`] on it (and on its payload), and the bytes as
/// `(ssrc: u32, seq: u16)` records through a [`SeqExtender`]; then delivers it as
/// [`Input::Ingest`](crate::Input::Ingest) to the video port and to the audio port of a running external stream
/// whose one viewer is connected (its scripted source stopped after the first keyframes, so the
/// viewer's str0m keeps the SSRC 0x11110000 video and 0x11110001 audio state), and lets 20 ms
/// of virtual time pass so the viewer receives the forwarded packets and answers.
///
/// A crash means: a parsed RTP packet contradicts its header (payload type, empty payload), a
/// datagram classified as RTCP without an RTCP type, the extender breaks its contract (low 16
/// bits not the packet's, a new epoch not above everything before), an invariant breaks, or a
/// panic in the fan-out (sequence rewriting, keyframe gating, str0m `write_rtp`, SRTP).
pub fn ingest(data: &[u8]) {
    match rtp::parse(data) {
        Ok(Datagram::Rtp(p)) => {
            assert_eq!(Some(p.payload_type), data.get(1).map(|b| b & 0x7f), "payload type");
            assert!(!p.payload.is_empty() && p.payload.len() + 12 <= data.len(), "payload size");
            let _ = rtp::classify_h264(p.payload);
        }
        Ok(Datagram::Rtcp) => {
            assert!(data.get(1).is_some_and(|b| (200..=206).contains(b)), "RTCP type");
        }
        Err(_) => {}
    }
    let _ = rtp::classify_h264(data);
    check_seq_extender(data);

    with_world(&INGEST, media_world, media_usable, |m| {
        m.w.ingest_raw(m.ports.video, data);
        m.w.ingest_raw(m.ports.audio(), data);
        m.w.run_for(MEDIA_STEP);
    });
}

fn check_seq_extender(data: &[u8]) {
    let mut ext = SeqExtender::new();
    let mut top: Option<u64> = None;
    for rec in data.chunks_exact(6) {
        let ssrc = u32::from_be_bytes([rec[0], rec[1], rec[2], rec[3]]);
        let seq = u16::from_be_bytes([rec[4], rec[5]]);
        let e = ext.extend(ssrc, seq);
        assert_eq!(e.seq & 0xffff, u64::from(seq), "extended seq keeps the low 16 bits");
        if e.restart {
            assert!(top.is_none_or(|t| e.seq > t), "a new epoch starts above all before");
        }
        assert!(ext.highest().is_some_and(|h| h >= e.seq), "highest is the highest");
        top = top.max(Some(e.seq));
    }
}

// ---------------------------------------------------------------------------------------------
// viewer_datagram
// ---------------------------------------------------------------------------------------------

/// The address of a stranger on the viewer socket.
const STRANGER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 99)), 4444);

/// A datagram on the shared viewer socket: STUN, DTLS, SRTP/SRTCP or garbage.
///
/// First read as a STUN server's answer to the core's own Binding request (see
/// `check_stun_response`: [`crate::stun`]). Then delivered as
/// [`Input::Datagram`](crate::Input::Datagram) twice to a core with one connected viewer: from an unknown
/// address (the core's STUN username lookup, str0m's `accepts`, a new address for a session)
/// and from the viewer's own address (straight into its str0m: STUN, DTLS records, SRTP and
/// SRTCP parsing). A STUN message whose USERNAME is [`STUN_USERNAME_PLACEHOLDER`] gets the
/// session's real username and a valid MESSAGE-INTEGRITY. Then 20 ms of virtual time pass.
/// A viewer the input kills (a DTLS alert, say) is replaced by a new world on the next call.
///
/// A crash means an invariant breaks or the core or str0m panics.
pub fn viewer_datagram(data: &[u8]) {
    check_stun_response(data);
    with_world(&DATAGRAM, media_world, media_usable, |m| {
        let data = resign_stun(data, &m.username, &m.server_pwd).unwrap_or_else(|| data.to_vec());
        m.w.datagram_raw(STRANGER, &data);
        m.w.datagram_raw(m.viewer, &data);
        m.w.run_for(MEDIA_STEP);
    });
}

/// The datagram as a STUN server's answer ([`crate::stun`]): what [`stun::parse_response`]
/// reads must be a usable address that re-encodes to itself; then, with its transaction id
/// set to the one in flight, the core's discovery takes it from the server (and only from
/// there, and only once) and learns exactly what the parser read.
#[allow(clippy::disallowed_methods)] // a real instant to anchor virtual time, as in `sim`
fn check_stun_response(data: &[u8]) {
    use crate::stun::{self, BindingResult, Discovery, News};
    if let Some(r) = stun::parse_response(data)
        && let BindingResult::Mapped(a) = r.result
    {
        assert!(!a.ip().is_unspecified() && !a.ip().is_multicast() && a.port() != 0, "{a}");
        let again = stun::parse_response(&stun::binding_success(&r.tid, a));
        assert_eq!(again.map(|x| x.result), Some(r.result), "re-encoded");
    }
    let now = std::time::Instant::now();
    let Some(mut d) = Discovery::new(&[STRANGER], Duration::from_secs(30), now) else {
        return;
    };
    let tid = [0x5a; 12];
    assert!(matches!(d.on_timeout(now, || tid), Some(News::Send { .. })));
    let mut patched = data.to_vec();
    if let Some(t) = patched.get_mut(8..20) {
        t.copy_from_slice(&tid);
    }
    let other = SocketAddr::new(STRANGER.ip(), STRANGER.port().wrapping_add(1));
    assert!(d.on_datagram(other, &patched, now).is_none(), "only the server's");
    let parsed = stun::parse_response(&patched).map(|r| r.result);
    match d.on_datagram(STRANGER, &patched, now) {
        Some(News::Mapped { mapped, .. }) => {
            assert_eq!(parsed, Some(BindingResult::Mapped(mapped)));
            assert_eq!(d.mapped(), Some(mapped));
        }
        Some(News::Failed { code: Some(code), .. }) => {
            assert_eq!(parsed, Some(BindingResult::Error(code)));
        }
        Some(other) => panic!("unexpected {other:?}"),
        None => assert_eq!(parsed, None),
    }
    assert!(d.on_datagram(STRANGER, &patched, now).is_none(), "taken once");
}

// ---------------------------------------------------------------------------------------------
// tcp_stream
// ---------------------------------------------------------------------------------------------

/// A world with one viewer connected over ICE-TCP, and its connection.
struct TcpWorld {
    media: MediaWorld,
    conn: crate::tcp::ConnId,
}

thread_local! {
    static TCP: RefCell<Reused<TcpWorld>> = const { RefCell::new(Reused::new()) };
}

fn tcp_world() -> TcpWorld {
    let config = crate::CoreConfig { tcp_candidates: vec![sim::SERVER], ..sim::config() };
    let (mut w, stream) = demo_world(config);
    let (v, r) = w.join_tcp(&stream, crate::tcp::DEFAULT_QUEUE_BYTES);
    assert_eq!(r.code(), 201, "the simulated TCP viewer is accepted: {}", text(&r.body));
    let answer = text(&r.body);
    let stream_id = stream.clone();
    w.drive_until(Duration::from_secs(30), |w| w.connected(&stream_id) == 1);
    w.run_for(Duration::from_millis(500));
    w.sources.remove(&stream);
    let ports = w.bound[&stream];
    let viewer_ufrag = w.viewers[v].rtc.direct_api().local_ice_credentials().ufrag.clone();
    let username = format!("{}:{viewer_ufrag}", sdp_value(&answer, "a=ice-ufrag:"));
    let server_pwd = sdp_value(&answer, "a=ice-pwd:");
    let conn = w.viewers[v].tcp.as_ref().map(|t| t.conn).expect("a TCP viewer");
    let media = MediaWorld { viewer: w.viewers[v].addr, w, stream, ports, username, server_pwd };
    TcpWorld { media, conn }
}

fn tcp_usable(t: &TcpWorld) -> bool {
    media_usable(&t.media) && !t.media.w.tcp_closed.contains(&t.conn)
}

/// A stranger's TCP address.
const TCP_STRANGER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 98)), 5555);

/// Bytes on an ICE-TCP connection: RFC 4571 frames of STUN, DTLS, SRTP, or garbage.
///
/// First the framing alone: the bytes cut at a point the first byte picks give the same frames
/// as whole, and no frame is longer than the bound or empty. Each frame that is a STUN message
/// with the USERNAME [`STUN_USERNAME_PLACEHOLDER`] is re-signed as in [`viewer_datagram`].
/// Then, to a core whose one viewer is connected over TCP, the stream goes as
/// [`Input::TcpData`](crate::Input::TcpData) on a new connection from a stranger, in the two
/// pieces (the unbound path: framing, the username lookup, str0m's `accepts`, binding), and on
/// the viewer's own connection (straight into its str0m over TCP); the stranger's connection
/// is then closed and 20 ms of virtual time pass. A viewer or connection the input kills is
/// replaced by a new world on the next call.
///
/// A crash means the framing contradicts itself, an invariant breaks (connections and their
/// viewers out of step, a timer missing), or the core or str0m panics.
pub fn tcp_stream(data: &[u8]) {
    use crate::tcp::{FrameReader, MAX_FRAME, encode};
    let cut = data.first().map_or(0, |b| usize::from(*b) % (data.len() + 1));
    let (mut whole, mut split) = (Vec::new(), Vec::new());
    let mut r = FrameReader::default();
    let ok_whole = r.feed(data, |f| whole.push(f.to_vec())).is_ok();
    let mut r = FrameReader::default();
    let ok_split = r.feed(&data[..cut], |f| split.push(f.to_vec())).is_ok()
        && r.feed(&data[cut..], |f| split.push(f.to_vec())).is_ok();
    assert_eq!(ok_whole, ok_split, "a cut changes whether the stream is well framed");
    assert_eq!(whole, split, "a cut changes the frames");
    assert!(whole.iter().all(|f| !f.is_empty() && f.len() <= MAX_FRAME), "frame size");

    with_world(&TCP, tcp_world, tcp_usable, |t| {
        // The frames re-signed where they carry the placeholder; garbage after them as it came.
        let mut stream = Vec::with_capacity(data.len());
        let mut r = FrameReader::default();
        let fed = r.feed(data, |f| {
            let f = resign_stun(f, &t.media.username, &t.media.server_pwd)
                .unwrap_or_else(|| f.to_vec());
            stream.extend(encode(&f).unwrap_or_default());
        });
        if fed.is_err() || r.buffered() > 0 {
            let done: usize = whole.iter().map(|f| f.len() + 2).sum();
            stream.extend_from_slice(data.get(done..).unwrap_or_default());
        }
        let w = &mut t.media.w;
        let stranger = w.tcp_open_raw(TCP_STRANGER);
        let cut = cut.min(stream.len());
        w.tcp_raw(stranger, &stream[..cut]);
        w.tcp_raw(stranger, &stream[cut..]);
        w.core.handle_input(crate::Input::TcpClosed { conn: stranger }, w.now);
        w.drain();
        w.tcp_raw(t.conn, &stream);
        w.run_for(MEDIA_STEP);
    });
}

const STUN_MAGIC: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
const STUN_USERNAME: u16 = 0x0006;
const STUN_MESSAGE_INTEGRITY: u16 = 0x0008;

/// When `data` is a STUN message whose USERNAME is the placeholder, the message with the real
/// username (header and attribute lengths fixed up, padding kept) and MESSAGE-INTEGRITY, if
/// present, recomputed over what precedes it as RFC 8489 §14.5 says.
fn resign_stun(data: &[u8], username: &str, pwd: &str) -> Option<Vec<u8>> {
    if data.len() < 20 || data[0] & 0xc0 != 0 || data[4..8] != STUN_MAGIC {
        return None;
    }
    let mut attrs: Vec<(u16, Vec<u8>)> = Vec::new();
    let mut i = 20;
    let mut placeholder = false;
    while i + 4 <= data.len() {
        let typ = u16::from_be_bytes([data[i], data[i + 1]]);
        let len = usize::from(u16::from_be_bytes([data[i + 2], data[i + 3]]));
        let value = data.get(i + 4..i + 4 + len)?;
        if typ == STUN_USERNAME && value == STUN_USERNAME_PLACEHOLDER {
            placeholder = true;
            attrs.push((typ, username.as_bytes().to_vec()));
        } else {
            attrs.push((typ, value.to_vec()));
        }
        i += 4 + len.div_ceil(4) * 4;
    }
    if !placeholder {
        return None;
    }
    let mut out = data[..20].to_vec();
    let mut integrity_at = None;
    for (typ, value) in &attrs {
        if *typ == STUN_MESSAGE_INTEGRITY && value.len() == 20 && integrity_at.is_none() {
            integrity_at = Some(out.len());
        }
        out.extend_from_slice(&typ.to_be_bytes());
        out.extend_from_slice(&u16::try_from(value.len()).ok()?.to_be_bytes());
        out.extend_from_slice(value);
        out.resize(out.len().div_ceil(4) * 4, 0);
    }
    let body_len = u16::try_from(out.len() - 20).ok()?;
    out[2..4].copy_from_slice(&body_len.to_be_bytes());
    if let Some(at) = integrity_at {
        // The length field counts up to and including MESSAGE-INTEGRITY while it is computed.
        let len_for_mac = u16::try_from(at + 24 - 20).ok()?.to_be_bytes();
        let provider = str0m::crypto::from_feature_flags().sha1_hmac_provider;
        let mac = provider.sha1_hmac(pwd.as_bytes(), &[&out[..2], &len_for_mac, &out[4..at]]);
        out[at + 4..at + 24].copy_from_slice(&mac);
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// ops
// ---------------------------------------------------------------------------------------------

/// Decodes fuzz bytes into at most [`MAX_OPS`] operations of [`sim::ops`]. Each operation is an
/// opcode byte (modulo 13) and its arguments:
///
/// | opcode | operation | arguments |
/// |---|---|---|
/// | 0 | [`Op::Join`] | stream byte |
/// | 1 | [`Op::Delete`] | viewer byte |
/// | 2 | [`Op::Silence`] | viewer byte |
/// | 3 | [`Op::Trickle`] | viewer byte |
/// | 4 | [`Op::IceRestart`] | viewer byte |
/// | 5 | [`Op::Keyframe`] | viewer byte |
/// | 6 | [`Op::Advance`] | big-endian `u16` milliseconds, modulo 5000 |
/// | 7 | [`Op::Crash`] | stream byte |
/// | 8 | [`Op::Stop`] | stream byte |
/// | 9 | [`Op::Start`] | stream byte |
/// | 10 | [`Op::Garbage`] | port byte, length byte (modulo 64), that many bytes |
/// | 11 | [`Op::ViewerGarbage`] | viewer byte, length byte (modulo 64), that many bytes |
/// | 12 | [`Op::BindFails`] | byte, odd = on |
///
/// Missing argument bytes read as zero; advances beyond [`MAX_ADVANCE_MS`] in total are cut.
pub fn decode_ops(data: &[u8]) -> Vec<Op> {
    let mut bytes = data.iter().copied();
    let mut out = Vec::new();
    let mut advanced: u64 = 0;
    while out.len() < MAX_OPS {
        let Some(code) = bytes.next() else { break };
        let mut arg = || bytes.next().unwrap_or(0);
        let op = match code % 13 {
            0 => Op::Join(arg()),
            1 => Op::Delete(arg()),
            2 => Op::Silence(arg()),
            3 => Op::Trickle(arg()),
            4 => Op::IceRestart(arg()),
            5 => Op::Keyframe(arg()),
            6 => {
                let ms = u16::from_be_bytes([arg(), arg()]) % 5000;
                let ms = u64::from(ms).min(MAX_ADVANCE_MS - advanced);
                advanced += ms;
                Op::Advance(u16::try_from(ms).unwrap_or(0))
            }
            7 => Op::Crash(arg()),
            8 => Op::Stop(arg()),
            9 => Op::Start(arg()),
            10 | 11 => {
                let who = arg();
                let len = usize::from(arg() % 64);
                let garbage: Vec<u8> = (0..len).map(|_| arg()).collect();
                if code % 13 == 10 {
                    Op::Garbage(who, garbage)
                } else {
                    Op::ViewerGarbage(who, garbage)
                }
            }
            _ => Op::BindFails(arg() % 2 == 1),
        };
        out.push(op);
    }
    out
}

/// A stateful run: [`decode_ops`] turns the bytes into operations on the [`sim::ops`] world
/// (three streams, one supervised; caps 3 per stream and 5 in total; four ingest pairs), each
/// applied with the reference model's checks, then the core is shut down and must be idle.
/// Timeouts are shortened (connect 4 s, inactivity 5 s, ICE disconnect grace 2 s, stale
/// FFmpeg 3 s, stop grace 1 s, backoff up to 4 s and reset after 5 s, bind quarantine 5 s) so that every timer
/// path is reachable within [`MAX_ADVANCE_MS`] of virtual time, and the scripted sources send
/// fewer fragments per frame than FFmpeg at 2 Mbit/s (the same packet kinds).
///
/// A crash means: an invariant breaks in any step (the harness checks after every input), a
/// status the model does not allow (a 201 from a stopped stream, a 503 below the caps, a
/// refused ICE restart of a live session, a stop that keeps viewers), port accounting out of
/// step with the runtime, or anything left after shutdown (a stream, a port, a process, a
/// viewer that joined and never left).
pub fn ops(data: &[u8]) {
    let ops = decode_ops(data);
    let mut world = OpsWorld::with_config(|c| {
        c.connect_timeout = Duration::from_secs(4);
        c.inactivity_timeout = Duration::from_secs(5);
        c.disconnect_grace = Duration::from_secs(2);
        c.bind_quarantine = Duration::from_secs(5);
        c.process.stale_timeout = Duration::from_secs(3);
        c.process.stop_grace = Duration::from_secs(1);
        c.process.restart_backoff_max = Duration::from_secs(4);
        c.process.restart_backoff_reset = Duration::from_secs(5);
    });
    for s in world.world.sources.values_mut() {
        s.idr_fragments = 3;
        s.p_fragments = 1;
    }
    for op in &ops {
        world.apply(op);
    }
    world.finish();
}

/// The HS256 secret of the [`jwt`] target's keys.
pub const JWT_SECRET: &[u8] = b"fuzz-secret-of-thirty-two-bytes!";

/// JWT verification ([`crate::auth`]): the input as a token (UTF-8, lossily) against an HS256
/// secret and RS256 and ES256 keys; the input as `header\nclaims` signed with the secret, so
/// that the header and claims parsers are reached past the signature; and the input as a JWKS
/// document.
pub fn jwt(data: &[u8]) {
    use std::sync::OnceLock;
    use std::time::SystemTime;

    use crate::auth::{JwtKeys, testing};

    static KEYS: OnceLock<JwtKeys> = OnceLock::new();
    let keys = KEYS.get_or_init(|| {
        let mut keys = JwtKeys::new();
        keys.add_hs256(JWT_SECRET);
        let (_, ec) = testing::es256_key("ec");
        let (_, rsa) = testing::rs256_key("rsa");
        let added = keys.add_jwks(format!(r#"{{"keys":[{ec},{rsa}]}}"#).as_bytes());
        assert_eq!(added, Ok(2), "the target's own JWKS");
        keys
    });
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let leeway = Duration::from_secs(30);
    let text = String::from_utf8_lossy(data);
    let _ = keys.verify(&text, now, leeway);
    let (header, claims) = text.split_once('\n').unwrap_or((r#"{"alg":"HS256"}"#, &text));
    let signed = testing::hs256(JWT_SECRET, header, claims);
    if let Ok(c) = keys.verify(&signed, now, leeway) {
        assert!(c.exp.saturating_add(30) > 1_700_000_000, "an expired token passed: {c:?}");
        let _ = c.allows("demo");
    }
    let _ = JwtKeys::new().add_jwks(data);
}
