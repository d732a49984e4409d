//! ICE over TCP (RFC 6544): the framing of RFC 4571 and a bounded per-connection send queue.
//!
//! A viewer that cannot reach the UDP socket connects to the server's TCP listener (a passive
//! host candidate, advertised with a lower priority than the UDP one). On that connection every
//! STUN, DTLS and SRTP packet travels as one *frame*: a 16-bit big-endian length, then the
//! packet. The runtime reads bytes from the connection and hands them to the core as they come
//! ([`Input::TcpData`](crate::Input::TcpData)); the core cuts them into frames with a
//! [`FrameReader`]. What the core sends on a connection comes out already framed
//! ([`Transport::Tcp`](crate::Transport::Tcp) on a [`Transmit`](crate::Transmit)); the runtime
//! queues it in the connection's [`SendQueue`] and writes from it without blocking, so that a
//! viewer that reads slowly only loses its own frames, whole ones
//! ([`Input::TcpDropped`](crate::Input::TcpDropped) tells the core, which restarts that
//! viewer's video at a keyframe).
//!
//! Nothing here does IO.

use std::collections::VecDeque;
use std::fmt;

/// The longest frame the core accepts from a viewer by default: STUN, DTLS records and SRTP
/// packets are sized for a UDP path MTU, far below this.
pub const MAX_FRAME: usize = 4096;

/// The default bound of a connection's [`SendQueue`], in bytes: about a quarter of a second of
/// a 4 Mbit/s stream.
pub const DEFAULT_QUEUE_BYTES: usize = 128 * 1024;

/// An identifier the runtime gives each accepted TCP connection, unique while it is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tcp#{}", self.0)
    }
}

/// Why a byte stream is not RFC 4571 framing the core accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// A frame announced more bytes than the reader's bound.
    TooLong {
        /// The announced length.
        len: usize,
        /// The bound.
        max: usize,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLong { len, max } => {
                write!(f, "RFC 4571 frame of {len} bytes, more than the {max} accepted")
            }
        }
    }
}

impl std::error::Error for FrameError {}

/// Cuts a TCP byte stream into RFC 4571 frames. Bytes may come split anywhere; a partial frame
/// is kept until the rest arrives, so at most one frame's bytes are buffered. Empty frames are
/// skipped. After an error the reader stays failed: the connection is garbage.
#[derive(Debug, Clone)]
pub struct FrameReader {
    buf: Vec<u8>,
    max: usize,
    failed: Option<FrameError>,
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::new(MAX_FRAME)
    }
}

impl FrameReader {
    /// A reader accepting frames of at most `max` bytes (at most 65535, the field's range).
    pub fn new(max: usize) -> Self {
        Self { buf: Vec::new(), max: max.min(usize::from(u16::MAX)), failed: None }
    }

    /// Bytes held of a frame not complete yet (its length field included).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Feeds `bytes` read from the connection and calls `frame` with each frame they complete,
    /// in order. On an error the frames before it were delivered and the rest is ignored (now
    /// and in later calls).
    pub fn feed(
        &mut self,
        mut bytes: &[u8],
        mut frame: impl FnMut(&[u8]),
    ) -> Result<(), FrameError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        // Finish a frame begun in an earlier call.
        if !self.buf.is_empty() {
            if self.buf.len() < 2 {
                let take = (2 - self.buf.len()).min(bytes.len());
                self.buf.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if self.buf.len() < 2 {
                    return Ok(());
                }
            }
            let len = usize::from(u16::from_be_bytes([self.buf[0], self.buf[1]]));
            if len > self.max {
                return Err(self.fail(len));
            }
            let missing = 2 + len - self.buf.len();
            let take = missing.min(bytes.len());
            self.buf.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if take < missing {
                return Ok(());
            }
            if len > 0 {
                frame(&self.buf[2..]);
            }
            self.buf.clear();
        }
        // Whole frames straight from the input; only a tail is copied.
        loop {
            match bytes {
                [] => return Ok(()),
                [_] => break,
                [a, b, rest @ ..] => {
                    let len = usize::from(u16::from_be_bytes([*a, *b]));
                    if len > self.max {
                        return Err(self.fail(len));
                    }
                    if rest.len() < len {
                        break;
                    }
                    if len > 0 {
                        frame(&rest[..len]);
                    }
                    bytes = &rest[len..];
                }
            }
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    fn fail(&mut self, len: usize) -> FrameError {
        let e = FrameError::TooLong { len, max: self.max };
        self.failed = Some(e);
        self.buf = Vec::new();
        e
    }
}

/// Frames `packet` for RFC 4571: its length as two big-endian bytes, then the packet. `None`
/// for a packet longer than 65535 bytes, which the framing cannot carry.
pub fn encode(packet: &[u8]) -> Option<Vec<u8>> {
    let len = u16::try_from(packet.len()).ok()?;
    let mut out = Vec::with_capacity(packet.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(packet);
    Some(out)
}

/// What a connection holds to send: whole frames, at most a bound of bytes. The runtime
/// [`push`](Self::push)es each framed [`Transmit`](crate::Transmit) for the connection and
/// writes from [`front`](Self::front) whenever the socket takes bytes, calling
/// [`advance`](Self::advance) with what it wrote. A frame that does not fit is dropped whole
/// and counted; the frame being written is never dropped, so the stream stays well framed.
/// Once it dropped a frame, the queue refuses every frame until it has drained to half its
/// bound: the viewer then loses a run of frames, not every other one, and its video resumes
/// at the keyframe the core sends after the drop is reported.
#[derive(Debug)]
pub struct SendQueue {
    /// The unwritten bytes of the queued frames, back to back: one write may carry many.
    bytes: VecDeque<u8>,
    max: usize,
    /// It dropped a frame and has not drained to half its bound since.
    refusing: bool,
    dropped: u64,
    dropped_bytes: u64,
}

impl SendQueue {
    /// A queue of at most `max_bytes` unwritten bytes (at least one largest frame is always
    /// accepted into an empty queue).
    pub fn new(max_bytes: usize) -> Self {
        Self {
            bytes: VecDeque::new(),
            max: max_bytes,
            refusing: false,
            dropped: 0,
            dropped_bytes: 0,
        }
    }

    /// Queues a framed packet; false (and counted) when it did not fit and was dropped.
    pub fn push(&mut self, frame: Vec<u8>) -> bool {
        if frame.is_empty() {
            return true;
        }
        let queued = self.bytes.len();
        if self.refusing && queued > self.max / 2 {
            self.dropped += 1;
            self.dropped_bytes += frame.len() as u64;
            return false;
        }
        self.refusing = false;
        if queued > 0 && queued + frame.len() > self.max {
            self.refusing = true;
            self.dropped += 1;
            self.dropped_bytes += frame.len() as u64;
            return false;
        }
        self.bytes.extend(frame);
        true
    }

    /// The bytes to write next, as many as lie contiguous (often every queued frame); empty
    /// when nothing is queued.
    pub fn front(&self) -> &[u8] {
        self.bytes.as_slices().0
    }

    /// Notes that `n` bytes of [`front`](Self::front) were written.
    pub fn advance(&mut self, n: usize) {
        let n = n.min(self.bytes.len());
        self.bytes.drain(..n);
    }

    /// Whether nothing is left to write.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Unwritten bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Frames dropped since the last call, and their bytes; resets the count.
    pub fn take_dropped(&mut self) -> (u64, u64) {
        (std::mem::take(&mut self.dropped), std::mem::take(&mut self.dropped_bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames(reader: &mut FrameReader, bytes: &[u8]) -> Result<Vec<Vec<u8>>, FrameError> {
        let mut out = Vec::new();
        reader.feed(bytes, |f| out.push(f.to_vec()))?;
        Ok(out)
    }

    #[test]
    fn frames_come_out_whole_and_in_order() {
        let mut stream = encode(b"hello").expect("short");
        stream.extend(encode(&[7; 300]).expect("short"));
        stream.extend([0, 0]); // an empty frame is skipped
        stream.extend(encode(b"x").expect("short"));
        let mut r = FrameReader::default();
        let got = frames(&mut r, &stream).expect("well framed");
        assert_eq!(got, vec![b"hello".to_vec(), vec![7; 300], b"x".to_vec()]);
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn a_partial_frame_waits_for_its_rest() {
        let stream = encode(b"abcdef").expect("short");
        let mut r = FrameReader::default();
        assert!(frames(&mut r, &stream[..1]).expect("ok").is_empty());
        assert!(frames(&mut r, &stream[1..4]).expect("ok").is_empty());
        assert_eq!(r.buffered(), 4);
        assert_eq!(frames(&mut r, &stream[4..]).expect("ok"), vec![b"abcdef".to_vec()]);
    }

    #[test]
    fn garbage_is_a_clear_error_and_stays_one() {
        let mut r = FrameReader::new(1500);
        let mut stream = encode(b"ok").expect("short");
        stream.extend([0xff, 0xff, 1, 2, 3]);
        let mut got = Vec::new();
        let e = r.feed(&stream, |f| got.push(f.to_vec())).expect_err("65535 > 1500");
        assert_eq!(got, vec![b"ok".to_vec()], "frames before the garbage are delivered");
        assert_eq!(e, FrameError::TooLong { len: 65535, max: 1500 });
        assert!(e.to_string().contains("65535"));
        assert_eq!(frames(&mut r, &encode(b"later").expect("short")), Err(e));
        assert_eq!(r.buffered(), 0, "nothing kept of a failed stream");
    }

    #[test]
    fn the_queue_drops_whole_frames_and_never_the_one_being_written() {
        let mut q = SendQueue::new(10);
        assert!(q.push(vec![1; 8]));
        q.advance(3);
        assert_eq!(q.front(), &[1; 5]);
        assert!(q.push(vec![2; 4]), "5 + 4 fits in 10");
        assert_eq!(q.len(), 9);
        assert!(!q.push(vec![3; 4]), "5 + 4 + 4 does not");
        assert!(!q.push(vec![5; 1]), "refused until drained to half, though it would fit");
        assert_eq!(q.len(), 9);
        assert_eq!(q.take_dropped(), (2, 5));
        assert_eq!(q.take_dropped(), (0, 0));
        q.advance(6);
        assert_eq!(q.len(), 3);
        assert!(q.push(vec![6; 2]), "3 left: below half, taken again");
        q.advance(5);
        assert!(q.is_empty());
        assert!(q.front().is_empty());
        // An empty queue takes a frame larger than its bound: the bound is on what waits.
        assert!(q.push(vec![4; 50]));
    }

    fn frame_list() -> impl Strategy<Value = Vec<Vec<u8>>> {
        prop::collection::vec(prop::collection::vec(any::<u8>(), 1..200), 0..12)
    }

    proptest! {
        /// However the stream is cut into reads, the same frames come out.
        #[test]
        fn splitting_the_stream_anywhere_gives_the_same_frames(
            packets in frame_list(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..16),
        ) {
            let stream: Vec<u8> =
                packets.iter().flat_map(|p| encode(p).expect("short")).collect();
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            points.sort_unstable();
            let mut r = FrameReader::default();
            let mut got = Vec::new();
            let mut at = 0;
            for p in points.into_iter().chain([stream.len()]) {
                r.feed(&stream[at..p], |f| got.push(f.to_vec())).expect("well framed");
                at = p;
            }
            prop_assert_eq!(got, packets);
            prop_assert_eq!(r.buffered(), 0);
        }

        /// Arbitrary bytes never panic, never buffer more than one bounded frame.
        #[test]
        fn garbage_never_panics_or_grows(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..8)) {
            let mut r = FrameReader::new(256);
            for c in &chunks {
                let _ = r.feed(c, |f| assert!(!f.is_empty() && f.len() <= 256));
                prop_assert!(r.buffered() <= 258);
            }
        }

        /// Bytes written from a queue are always whole frames back to back, whatever is dropped.
        #[test]
        fn what_the_queue_writes_is_well_framed(
            packets in frame_list(),
            writes in prop::collection::vec(0usize..400, 1..30),
        ) {
            let mut q = SendQueue::new(300);
            let mut wire = Vec::new();
            let mut kept = Vec::new();
            let mut w = writes.iter().cycle();
            for p in &packets {
                if q.push(encode(p).expect("short")) {
                    kept.push(p.clone());
                }
                let n = (*w.next().expect("cycle")).min(q.front().len());
                wire.extend_from_slice(&q.front()[..n]);
                q.advance(n);
            }
            while !q.is_empty() {
                let n = q.front().len();
                wire.extend_from_slice(q.front());
                q.advance(n);
            }
            let mut r = FrameReader::default();
            let mut got = Vec::new();
            r.feed(&wire, |f| got.push(f.to_vec())).expect("well framed");
            prop_assert_eq!(got, kept);
        }
    }
}
