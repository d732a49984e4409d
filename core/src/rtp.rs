//! Parsing of the RTP and RTCP datagrams FFmpeg sends to the ingest ports.
//!
//! FFmpeg (`-f rtp udp://127.0.0.1:V?pkt_size=1200`) sends H264 (RFC 6184, packetization-mode 1)
//! to port V and Opus to V+1, interleaving RTCP sender reports on the same ports. Anything that
//! can reach those ports is treated as hostile bytes: every function here is total and never
//! panics, whatever it is given.

/// What one datagram from an ingest port is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datagram<'a> {
    /// An RTP media packet.
    Rtp(RtpPacket<'a>),
    /// An RTCP compound packet (sender reports and the like); its contents are not interpreted.
    Rtcp,
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Shorter than the fixed header it claims to be.
    TooShort,
    /// The version field is not 2.
    BadVersion,
    /// The CSRC list runs past the end of the datagram.
    BadCsrc,
    /// The header extension is truncated or its length runs past the end of the datagram.
    BadExtension,
    /// The padding count is zero or larger than what follows the header.
    BadPadding,
    /// The packet is well formed but its payload is zero-length.
    Empty,
}

/// A parsed RTP packet borrowing its payload from the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpPacket<'a> {
    /// The marker bit (for H264: last packet of an access unit).
    pub marker: bool,
    /// The 7-bit payload type.
    pub payload_type: u8,
    /// The 16-bit sequence number.
    pub sequence: u16,
    /// The media timestamp.
    pub timestamp: u32,
    /// The synchronisation source identifier.
    pub ssrc: u32,
    /// The payload, without CSRCs, header extension or padding; never empty.
    pub payload: &'a [u8],
}

/// Largest RTP payload the core forwards to viewers, in bytes; larger packets are dropped at
/// ingest. FFmpeg's legs send packets of at most [`RTP_PKT_SIZE`](crate::ffmpeg::RTP_PKT_SIZE)
/// bytes, and this still admits any sender that respects a 1500-byte Ethernet MTU. It keeps
/// what str0m builds from a payload (its own RTP header with extensions, 2 more bytes for a
/// retransmission) inside str0m's 2000-byte datagram buffer: str0m 0.25 panics on a payload
/// that does not fit (`streams/send.rs`), which any local process could otherwise trigger by
/// sending one large datagram to an ingest port.
pub const MAX_PAYLOAD: usize = 1500;

/// Length of the fixed RTP header.
const RTP_HEADER: usize = 12;
/// Length of the fixed RTCP header (V/P/count, PT, length).
const RTCP_HEADER: usize = 4;

/// Reads a big-endian `u16` at `at`, or `None` when it does not fit.
fn be16(data: &[u8], at: usize) -> Option<u16> {
    let end = at.checked_add(2)?;
    let bytes: [u8; 2] = data.get(at..end)?.try_into().ok()?;
    Some(u16::from_be_bytes(bytes))
}

/// Reads a big-endian `u32` at `at`, or `None` when it does not fit.
fn be32(data: &[u8], at: usize) -> Option<u32> {
    let end = at.checked_add(4)?;
    let bytes: [u8; 4] = data.get(at..end)?.try_into().ok()?;
    Some(u32::from_be_bytes(bytes))
}

/// Classifies and parses one datagram.
///
/// RTCP is recognised by version 2 and the second byte in 200..=206 (SR, RR, SDES, BYE, APP,
/// RTPFB, PSFB): read as marker + payload type that byte lands in 200..=206 only for RTCP,
/// because RTP payload types 72..=78 are reserved to avoid exactly this clash (RFC 5761 §4).
/// Handles the CSRC list, the header extension (length in 32-bit words) and padding (last byte
/// is the count, which must be at least 1 and fit); rejects everything else as [`Malformed`].
pub fn parse(datagram: &[u8]) -> Result<Datagram<'_>, Malformed> {
    let (Some(&b0), Some(&b1)) = (datagram.first(), datagram.get(1)) else {
        return Err(Malformed::TooShort);
    };
    if b0 >> 6 != 2 {
        return Err(Malformed::BadVersion);
    }
    if (200..=206).contains(&b1) {
        // RTCP is only classified, never interpreted, so its fixed header is all we insist on.
        return if datagram.len() < RTCP_HEADER {
            Err(Malformed::TooShort)
        } else {
            Ok(Datagram::Rtcp)
        };
    }
    let (Some(sequence), Some(timestamp), Some(ssrc)) =
        (be16(datagram, 2), be32(datagram, 4), be32(datagram, 8))
    else {
        return Err(Malformed::TooShort);
    };
    let has_padding = b0 & 0x20 != 0;
    let has_extension = b0 & 0x10 != 0;
    let csrc_count = usize::from(b0 & 0x0f);

    let mut header = RTP_HEADER
        .checked_add(csrc_count.checked_mul(4).ok_or(Malformed::BadCsrc)?)
        .ok_or(Malformed::BadCsrc)?;
    if header > datagram.len() {
        return Err(Malformed::BadCsrc);
    }
    if has_extension {
        // 16-bit profile-defined id, then the extension length in 32-bit words (RFC 3550 §5.3.1).
        let words = be16(datagram, header.checked_add(2).ok_or(Malformed::BadExtension)?)
            .ok_or(Malformed::BadExtension)?;
        header = usize::from(words)
            .checked_mul(4)
            .and_then(|bytes| bytes.checked_add(4))
            .and_then(|ext| header.checked_add(ext))
            .ok_or(Malformed::BadExtension)?;
        if header > datagram.len() {
            return Err(Malformed::BadExtension);
        }
    }
    let mut end = datagram.len();
    if has_padding {
        let count = usize::from(*datagram.last().ok_or(Malformed::BadPadding)?);
        // The count includes itself, so 0 is invalid; it may not eat into the header.
        if count == 0 || count > end.saturating_sub(header) {
            return Err(Malformed::BadPadding);
        }
        end = end.saturating_sub(count);
    }
    let payload = datagram.get(header..end).ok_or(Malformed::TooShort)?;
    if payload.is_empty() {
        return Err(Malformed::Empty);
    }
    Ok(Datagram::Rtp(RtpPacket {
        marker: b1 & 0x80 != 0,
        payload_type: b1 & 0x7f,
        sequence,
        timestamp,
        ssrc,
        payload,
    }))
}

/// H264 facts about one RTP payload, computed once per source packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct H264Flags {
    /// The packet carries (the start of) a sequence parameter set.
    pub sps: bool,
    /// The packet carries (the start of) a picture parameter set.
    pub pps: bool,
    /// The packet carries (the start of) an IDR slice.
    pub idr: bool,
    /// True when this packet begins a NAL (single NAL, STAP-A, or FU-A with S bit).
    pub nal_start: bool,
}

impl H264Flags {
    /// Returns true when a new viewer's video may start at this packet: it carries an SPS, or
    /// the start of an IDR slice.
    pub fn is_keyframe_start(self) -> bool {
        self.sps || (self.idr && self.nal_start)
    }

    /// Records one NAL unit type found at the start of a NAL.
    fn note(&mut self, nal_type: u8) {
        match nal_type {
            5 => self.idr = true,
            7 => self.sps = true,
            8 => self.pps = true,
            _ => {}
        }
    }
}

/// NAL unit type of a STAP-A aggregation packet (RFC 6184 §5.7.1).
const STAP_A: u8 = 24;
/// NAL unit type of an FU-A fragmentation unit (RFC 6184 §5.8).
const FU_A: u8 = 28;

/// Inspects the NAL header(s) of one H264 RTP payload.
///
/// Single NAL types 1..=23 (5 = IDR, 7 = SPS, 8 = PPS); STAP-A (24: iterates the 16-bit
/// length-prefixed NALs, stopping safely at truncation); FU-A (28: FU header S bit and inner
/// type; the inner type counts only when S is set). Anything else (STAP-B, MTAP, FU-B, type 0,
/// 30, 31) gives the default flags.
pub fn classify_h264(payload: &[u8]) -> H264Flags {
    let mut flags = H264Flags::default();
    let Some(&header) = payload.first() else {
        return flags;
    };
    match header & 0x1f {
        t @ 1..=23 => {
            flags.nal_start = true;
            flags.note(t);
        }
        STAP_A => {
            flags.nal_start = true;
            let mut at: usize = 1;
            // Each aggregated NAL is `size: u16` then `size` bytes; a size that runs past the
            // end means corruption, so nothing after it is trusted (not even its header byte).
            while let Some(size) = be16(payload, at) {
                let Some(start) = at.checked_add(2) else {
                    break;
                };
                let Some(end) = start.checked_add(usize::from(size)) else {
                    break;
                };
                let Some(nal) = payload.get(start..end) else {
                    break;
                };
                if let Some(&nal_header) = nal.first() {
                    flags.note(nal_header & 0x1f);
                }
                at = end;
            }
        }
        FU_A => {
            if let Some(&fu_header) = payload.get(1) {
                // Only the first fragment (S bit) begins a NAL; middle and end fragments are
                // useless to a viewer that has not seen the start.
                if fu_header & 0x80 != 0 {
                    flags.nal_start = true;
                    flags.note(fu_header & 0x1f);
                }
            }
        }
        _ => {}
    }
    flags
}

/// Whether a VP8 RTP payload (RFC 7741) begins a key frame: the payload descriptor says the
/// packet starts partition 0 (S set, partition index 0), and the VP8 payload header after the
/// descriptor has its inverse key-frame bit (P) clear. A truncated descriptor is not a start.
pub fn vp8_keyframe_start(payload: &[u8]) -> bool {
    let Some(&d) = payload.first() else {
        return false;
    };
    if d & 0x10 == 0 || d & 0x07 != 0 {
        return false; // S clear, or a later partition
    }
    let mut at = 1;
    if d & 0x80 != 0 {
        // X: one byte of I L T K flags, then the fields they announce.
        let Some(&x) = payload.get(1) else {
            return false;
        };
        at = 2;
        if x & 0x80 != 0 {
            // I: a 7- or 15-bit picture id (M, the high bit, says 15).
            let Some(&pid) = payload.get(at) else {
                return false;
            };
            at += if pid & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            at += 1; // L: TL0PICIDX
        }
        if x & 0x30 != 0 {
            at += 1; // T or K: TID, Y, KEYIDX
        }
    }
    payload.get(at).is_some_and(|h| h & 0x01 == 0)
}

/// Extends 16-bit RTP sequence numbers to a monotonic 64-bit counter per source and detects
/// source restarts.
#[derive(Debug, Clone, Default)]
pub struct SeqExtender {
    /// SSRC and highest extended sequence number of the current epoch, once a packet was seen.
    current: Option<(u32, u64)>,
}

/// Result of extending one sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extended {
    /// The extended 64-bit sequence number.
    pub seq: u64,
    /// True when this packet starts a new epoch: first packet, SSRC change, or a jump larger
    /// than [`SeqExtender::MAX_JUMP`] forwards or [`SeqExtender::MAX_BACK`] backwards (FFmpeg
    /// restarted); callers re-gate viewers on it.
    pub restart: bool,
}

/// Size of the 16-bit sequence space.
const CYCLE: u64 = 1 << 16;

impl SeqExtender {
    /// Forward gap beyond which the source is taken to have restarted.
    pub const MAX_JUMP: u16 = 3000;
    /// Reordering tolerance: how far behind the highest sequence number a late packet may be.
    pub const MAX_BACK: u16 = 100;

    /// Creates an extender that has seen no packet yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Extends `seq` of a packet from `ssrc`.
    ///
    /// Within an epoch the result is the 64-bit value nearest to the previous highest one
    /// (handles the 65535 -> 0 wrap and small reordering); a late packet (up to `MAX_BACK`
    /// behind) gets its smaller extended value with `restart == false`. The first extended
    /// value of each epoch is at least `65536 * 2` and strictly greater than every value handed
    /// out before, so epochs never go backwards and late packets never underflow.
    pub fn extend(&mut self, ssrc: u32, seq: u16) -> Extended {
        let Some((current_ssrc, highest)) = self.current else {
            return self.start_epoch(ssrc, seq, 0);
        };
        if current_ssrc != ssrc {
            return self.start_epoch(ssrc, seq, highest);
        }
        // Reinterpreting the 16-bit difference as signed picks the nearest 64-bit candidate,
        // which is what makes the wrap from 65535 to 0 (and late packets across it) work.
        let delta = seq.wrapping_sub(low16(highest)).cast_signed();
        if delta >= 0 {
            let forward = delta.unsigned_abs();
            if forward > Self::MAX_JUMP {
                return self.start_epoch(ssrc, seq, highest);
            }
            let next = highest.saturating_add(u64::from(forward));
            self.current = Some((ssrc, next));
            Extended { seq: next, restart: false }
        } else {
            let back = delta.unsigned_abs();
            match highest.checked_sub(u64::from(back)) {
                Some(late) if back <= Self::MAX_BACK => Extended { seq: late, restart: false },
                _ => self.start_epoch(ssrc, seq, highest),
            }
        }
    }

    /// Returns the highest extended seq seen in the current epoch, if any.
    pub fn highest(&self) -> Option<u64> {
        self.current.map(|(_, highest)| highest)
    }

    /// Starts a new epoch whose first value ends in `seq` and lies at least one full cycle
    /// above `previous` (the highest value handed out so far, which is always the latest
    /// epoch's highest), and at least two cycles above zero so late packets cannot underflow.
    fn start_epoch(&mut self, ssrc: u32, seq: u16, previous: u64) -> Extended {
        let first = (previous / CYCLE)
            .checked_add(2)
            .and_then(|cycles| cycles.checked_mul(CYCLE))
            .map_or(u64::MAX, |base| base | u64::from(seq));
        self.current = Some((ssrc, first));
        Extended { seq: first, restart: true }
    }
}

/// Returns the low 16 bits of an extended sequence number.
fn low16(value: u64) -> u16 {
    // Truncation is the point: it recovers the on-the-wire sequence number.
    (value & 0xffff) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Builds an RTP packet from its parts.
    #[allow(clippy::too_many_arguments)]
    fn build(
        marker: bool,
        pt: u8,
        seq: u16,
        ts: u32,
        ssrc: u32,
        csrcs: &[u32],
        ext: Option<&[u8]>,
        payload: &[u8],
        padding: u8,
    ) -> Vec<u8> {
        let mut b0 = 0x80u8 | (csrcs.len() as u8);
        if padding > 0 {
            b0 |= 0x20;
        }
        if ext.is_some() {
            b0 |= 0x10;
        }
        let mut out = vec![b0, (u8::from(marker) << 7) | pt];
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&ts.to_be_bytes());
        out.extend_from_slice(&ssrc.to_be_bytes());
        for c in csrcs {
            out.extend_from_slice(&c.to_be_bytes());
        }
        if let Some(ext) = ext {
            assert_eq!(ext.len() % 4, 0);
            out.extend_from_slice(&[0xbe, 0xde]);
            out.extend_from_slice(&((ext.len() / 4) as u16).to_be_bytes());
            out.extend_from_slice(ext);
        }
        out.extend_from_slice(payload);
        if padding > 0 {
            out.extend(std::iter::repeat_n(0, usize::from(padding) - 1));
            out.push(padding);
        }
        out
    }

    fn rtp(d: &[u8]) -> RtpPacket<'_> {
        match parse(d) {
            Ok(Datagram::Rtp(p)) => p,
            other => panic!("expected RTP, got {other:?}"),
        }
    }

    #[test]
    fn minimal_header() {
        let d = build(true, 96, 1234, 90000, 0xdead_beef, &[], None, &[0x41, 1, 2], 0);
        let p = rtp(&d);
        assert!(p.marker);
        assert_eq!(p.payload_type, 96);
        assert_eq!(p.sequence, 1234);
        assert_eq!(p.timestamp, 90000);
        assert_eq!(p.ssrc, 0xdead_beef);
        assert_eq!(p.payload, &[0x41, 1, 2]);
        for cut in 0..12 {
            assert_eq!(parse(&d[..cut]), Err(Malformed::TooShort), "cut {cut}");
        }
        assert_eq!(parse(&d[..12]), Err(Malformed::Empty));
    }

    #[test]
    fn csrcs() {
        let d = build(false, 111, 7, 8, 9, &[1, 2], None, b"opus", 0);
        let p = rtp(&d);
        assert_eq!(p.payload, b"opus");
        assert_eq!(p.payload_type, 111);
        assert!(!p.marker);
        for cut in 12..20 {
            assert_eq!(parse(&d[..cut]), Err(Malformed::BadCsrc), "cut {cut}");
        }
        assert_eq!(parse(&d[..20]), Err(Malformed::Empty));
    }

    #[test]
    fn extension() {
        let d = build(false, 96, 7, 8, 9, &[5], Some(&[1, 2, 3, 4, 5, 6, 7, 8]), b"xy", 0);
        assert_eq!(rtp(&d).payload, b"xy");
        // Header 12 + CSRC 4 = 16; extension spans 16..28.
        for cut in 16..28 {
            assert_eq!(parse(&d[..cut]), Err(Malformed::BadExtension), "cut {cut}");
        }
        assert_eq!(parse(&d[..28]), Err(Malformed::Empty));
    }

    #[test]
    fn padding() {
        let d = build(false, 96, 7, 8, 9, &[], None, b"abc", 4);
        assert_eq!(rtp(&d).payload, b"abc");
        // Padding that would swallow all of the payload leaves it empty.
        let mut all = d.clone();
        let last = all.len() - 1;
        all[last] = 7;
        assert_eq!(parse(&all), Err(Malformed::Empty));
        // Padding reaching into the header, or a zero count, is malformed.
        all[last] = 8;
        assert_eq!(parse(&all), Err(Malformed::BadPadding));
        all[last] = 0;
        assert_eq!(parse(&all), Err(Malformed::BadPadding));
        // Truncating the packet drops the real count byte; what remains is garbage padding.
        assert_eq!(parse(&d[..d.len() - 1]), Err(Malformed::BadPadding));
        // A padded packet with nothing after the header: the "count" is an SSRC byte.
        let mut bare = build(false, 96, 7, 8, 9, &[], None, &[], 0);
        bare[0] |= 0x20;
        assert_eq!(parse(&bare), Err(Malformed::BadPadding));
    }

    #[test]
    fn version() {
        let mut d = build(false, 96, 7, 8, 9, &[], None, b"abc", 0);
        d[0] = (d[0] & 0x3f) | 0x40;
        assert_eq!(parse(&d), Err(Malformed::BadVersion));
        d[0] &= 0x3f;
        assert_eq!(parse(&d), Err(Malformed::BadVersion));
        assert_eq!(parse(&[]), Err(Malformed::TooShort));
        assert_eq!(parse(&[0x80]), Err(Malformed::TooShort));
        assert_eq!(parse(&[0x40]), Err(Malformed::TooShort));
    }

    #[test]
    fn rtcp() {
        // SR header with one (elided) body; RR with no report blocks; PSFB PLI.
        let sr = [0x80, 200, 0, 6, 1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0];
        let rr = [0x80, 201, 0, 1, 1, 2, 3, 4];
        let pli = [0x81, 206, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2];
        for d in [&sr[..], &rr[..], &pli[..]] {
            assert_eq!(parse(d), Ok(Datagram::Rtcp));
        }
        assert_eq!(parse(&rr[..3]), Err(Malformed::TooShort));
        // Just outside the RTCP range is RTP with marker set and PT 71 / 79.
        let d = build(true, 71, 1, 2, 3, &[], None, b"a", 0);
        assert_eq!(rtp(&d).payload_type, 71);
        let d = build(true, 79, 1, 2, 3, &[], None, b"a", 0);
        assert_eq!(rtp(&d).payload_type, 79);
    }

    #[test]
    fn h264_stap_a_sps_pps() {
        // FFmpeg-like STAP-A: 0x78 header, SPS (0x67 ...) and PPS (0x68 ...).
        let stap =
            [0x78, 0x00, 0x05, 0x67, 0x42, 0xc0, 0x1f, 0xda, 0x00, 0x04, 0x68, 0xce, 0x3c, 0x80];
        let f = classify_h264(&stap);
        assert!(f.sps && f.pps && !f.idr && f.nal_start);
        assert!(f.is_keyframe_start());
        // Every truncation stops safely; the SPS is only counted once it is complete.
        for cut in 0..stap.len() {
            let f = classify_h264(&stap[..cut]);
            assert!(!f.pps);
            assert_eq!(f.sps, cut >= 8, "cut {cut}");
        }
        // A length that claims far more than there is.
        let f = classify_h264(&[0x78, 0xff, 0xff, 0x67, 0x42]);
        assert!(!f.sps && f.nal_start);
        // A zero-length entry is skipped without looping forever.
        let f = classify_h264(&[0x78, 0x00, 0x00, 0x00, 0x01, 0x65]);
        assert!(f.idr && f.is_keyframe_start());
    }

    #[test]
    fn h264_fu_a() {
        let start = classify_h264(&[0x7c, 0x85, 0xb8, 0x00]);
        assert!(start.idr && start.nal_start && start.is_keyframe_start());
        let middle = classify_h264(&[0x7c, 0x05, 0xb8, 0x00]);
        assert_eq!(middle, H264Flags::default());
        assert!(!middle.is_keyframe_start());
        let end = classify_h264(&[0x7c, 0x45, 0xb8]);
        assert_eq!(end, H264Flags::default());
        let non_idr_start = classify_h264(&[0x5c, 0x81, 0x9a]);
        assert!(non_idr_start.nal_start && !non_idr_start.is_keyframe_start());
        assert_eq!(classify_h264(&[0x7c]), H264Flags::default());
    }

    #[test]
    fn h264_single_and_others() {
        let f = classify_h264(&[0x41, 0x9a, 0x00]);
        assert!(f.nal_start && !f.idr && !f.sps && !f.pps && !f.is_keyframe_start());
        assert!(classify_h264(&[0x65, 0x88]).is_keyframe_start());
        assert!(classify_h264(&[0x67, 0x42]).is_keyframe_start());
        let pps = classify_h264(&[0x68, 0xce]);
        assert!(pps.pps && !pps.is_keyframe_start());
        for t in [0u8, 25, 26, 27, 29, 30, 31] {
            assert_eq!(classify_h264(&[0x60 | t, 0x85, 0, 5, 0x67]), H264Flags::default());
        }
        assert_eq!(classify_h264(&[]), H264Flags::default());
    }

    #[test]
    fn seq_wrap() {
        let mut x = SeqExtender::new();
        assert_eq!(x.highest(), None);
        let a = x.extend(1, 65534);
        assert!(a.restart);
        assert!(a.seq >= 2 * 65536);
        let vals: Vec<_> = [65535u16, 0, 1].iter().map(|&s| x.extend(1, s)).collect();
        for (i, v) in vals.iter().enumerate() {
            assert!(!v.restart);
            assert_eq!(v.seq, a.seq + 1 + i as u64);
        }
        assert_eq!(x.highest(), Some(a.seq + 3));
        // A late packet from before the wrap.
        let late = x.extend(1, 65535);
        assert_eq!(late, Extended { seq: a.seq + 1, restart: false });
        assert_eq!(x.highest(), Some(a.seq + 3));
    }

    #[test]
    fn seq_reorder_jump_and_ssrc() {
        let mut x = SeqExtender::new();
        let first = x.extend(7, 100).seq;
        for s in 101..=110 {
            assert!(!x.extend(7, s).restart);
        }
        let late = x.extend(7, 105);
        assert_eq!(late, Extended { seq: first + 5, restart: false });
        // Duplicate of the highest is not a restart either.
        assert_eq!(x.extend(7, 110), Extended { seq: first + 10, restart: false });
        let edge = x.extend(7, 110 - SeqExtender::MAX_BACK);
        assert!(!edge.restart);
        let before = x.highest().unwrap_or(0);
        let back = x.extend(7, 110 - SeqExtender::MAX_BACK - 1);
        assert!(back.restart && back.seq > before);
        assert_eq!(back.seq & 0xffff, u64::from(110 - SeqExtender::MAX_BACK - 1));

        let base = x.highest().unwrap_or(0);
        let s = low16(base);
        let ok = x.extend(7, s.wrapping_add(SeqExtender::MAX_JUMP));
        assert_eq!(ok, Extended { seq: base + 3000, restart: false });
        let h = x.highest().unwrap_or(0);
        let jump = x.extend(7, low16(h).wrapping_add(10000));
        assert!(jump.restart && jump.seq > h);
        assert_eq!(jump.seq & 0xffff, u64::from(low16(h).wrapping_add(10000)));

        let h = x.highest().unwrap_or(0);
        let other = x.extend(8, low16(h).wrapping_add(1));
        assert!(other.restart && other.seq > h);
        let next = x.extend(8, low16(h).wrapping_add(2));
        assert_eq!(next, Extended { seq: other.seq + 1, restart: false });
    }

    #[test]
    fn seq_restart_beyond_everything() {
        let mut x = SeqExtender::new();
        let mut max_seen = 0;
        let mut seq = 65000u16;
        for i in 0..500u32 {
            let ssrc = i / 50;
            seq = seq.wrapping_add(if i % 7 == 0 { 20000 } else { 3 });
            let e = x.extend(ssrc, seq);
            assert_eq!(e.seq & 0xffff, u64::from(seq));
            if e.restart {
                assert!(e.seq > max_seen);
            }
            max_seen = max_seen.max(e.seq);
        }
        // Saturation near the top of u64 stays total.
        let mut x = SeqExtender { current: Some((1, u64::MAX - 2)) };
        assert_eq!(x.extend(1, low16(u64::MAX)).seq, u64::MAX);
        assert!(x.extend(1, 5000).restart);
        assert!(x.extend(2, 0).restart);
    }

    proptest! {
        #[test]
        fn parse_never_panics(d in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let _ = parse(&d);
        }

        #[test]
        fn parse_never_panics_v2(mut d in proptest::collection::vec(any::<u8>(), 0..64)) {
            // Arbitrary bytes are mostly not version 2; force it to reach the deeper paths.
            if let Some(b) = d.first_mut() {
                *b = (*b & 0x3f) | 0x80;
            }
            let _ = parse(&d);
        }

        #[test]
        fn classify_never_panics(d in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let f = classify_h264(&d);
            prop_assert!(!f.idr || f.nal_start);
        }

        #[test]
        fn round_trip(
            marker in any::<bool>(),
            pt in 0u8..=127,
            seq in any::<u16>(),
            ts in any::<u32>(),
            ssrc in any::<u32>(),
            csrcs in proptest::collection::vec(any::<u32>(), 0..=15),
            ext in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..4)),
            payload in proptest::collection::vec(any::<u8>(), 1..1200),
            padding in 0u8..=255,
        ) {
            prop_assume!(!(marker && (72..=78).contains(&pt)));
            let ext: Option<Vec<u8>> = ext.map(|w| w.iter().flat_map(|b| [*b; 4]).collect());
            let d = build(marker, pt, seq, ts, ssrc, &csrcs, ext.as_deref(), &payload, padding);
            let p = RtpPacket { marker, payload_type: pt, sequence: seq, timestamp: ts, ssrc,
                payload: &payload };
            prop_assert_eq!(parse(&d), Ok(Datagram::Rtp(p)));
        }

        #[test]
        fn in_order_is_strictly_increasing(
            ssrc in any::<u32>(),
            start in any::<u16>(),
            steps in proptest::collection::vec(1u16..=50, 1..3000),
        ) {
            let mut x = SeqExtender::new();
            let mut prev = x.extend(ssrc, start);
            prop_assert!(prev.restart);
            let mut seq = start;
            for step in steps {
                seq = seq.wrapping_add(step);
                let e = x.extend(ssrc, seq);
                prop_assert!(!e.restart);
                prop_assert_eq!(e.seq, prev.seq + u64::from(step));
                prev = e;
            }
            prop_assert_eq!(x.highest(), Some(prev.seq));
        }

        #[test]
        fn arbitrary_sequences_never_go_below_restart_floor(
            ops in proptest::collection::vec((0u32..3, any::<u16>()), 1..500),
        ) {
            let mut x = SeqExtender::new();
            let mut max_seen = 0u64;
            for (ssrc, seq) in ops {
                let e = x.extend(ssrc, seq);
                prop_assert_eq!(e.seq & 0xffff, u64::from(seq));
                prop_assert!(e.seq >= 2 * 65536 - u64::from(SeqExtender::MAX_BACK));
                if e.restart {
                    prop_assert!(e.seq > max_seen);
                }
                max_seen = max_seen.max(e.seq);
            }
        }
    }
    #[test]
    fn vp8_keyframe_starts() {
        // S, partition 0, no extension, P = 0: a key frame's first packet.
        assert!(vp8_keyframe_start(&[0x10, 0x00, 0x9d, 0x01, 0x2a]));
        // P = 1: an interframe.
        assert!(!vp8_keyframe_start(&[0x10, 0x01]));
        // Not the start of partition 0.
        assert!(!vp8_keyframe_start(&[0x00, 0x00]));
        assert!(!vp8_keyframe_start(&[0x11, 0x00]));
        // Extended descriptor: I with a 15-bit picture id, then L, then T/K (FFmpeg and
        // libwebrtc send I with M set).
        assert!(vp8_keyframe_start(&[0x90, 0x80, 0x81, 0x23, 0x00]));
        assert!(vp8_keyframe_start(&[0x90, 0xf0, 0x81, 0x23, 0x07, 0x20, 0x00]));
        assert!(!vp8_keyframe_start(&[0x90, 0xf0, 0x81, 0x23, 0x07, 0x20, 0x01]));
        // Truncated anywhere: not a start, no panic.
        for n in 0..7 {
            assert!(!vp8_keyframe_start(&[0x90, 0xf0, 0x81, 0x23, 0x07, 0x20, 0x00][..n]));
        }
    }
}
