//! A packet from a stream's ingest, as every part of the core that carries it sees it.

use std::sync::Arc;

use str0m::media::MediaKind;

/// One packet from a stream's ingest port, parsed once and shared by every viewer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SourcePacket {
    pub(crate) kind: MediaKind,
    /// Which of the stream's video renditions a video packet belongs to (0: the stream's own
    /// H264; see [`EgressConfig::renditions`](crate::ffmpeg::EgressConfig::renditions)); 0 for
    /// audio.
    pub(crate) rendition: u8,
    /// Extended source sequence number (see [`crate::rtp::SeqExtender`]).
    pub(crate) seq: u64,
    /// The source restarted (new SSRC or a jump): viewers rebase and video re-gates.
    pub(crate) restart: bool,
    pub(crate) timestamp: u32,
    pub(crate) marker: bool,
    /// A viewer's video may start here (SPS or the start of an IDR).
    pub(crate) keyframe_start: bool,
    pub(crate) payload: Arc<[u8]>,
}
