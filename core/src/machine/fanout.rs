//! Ingest and fan-out: datagrams from FFmpeg checked and parsed, then written to every viewer of
//! their stream, viewer by viewer, a few viewers at a time as outputs are taken.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use str0m::media::MediaKind;

use crate::config::VideoCodec;
use crate::ids::{SessionId, StreamId};
use crate::packet::SourcePacket;
use crate::rtp::{self, Datagram};
use crate::shard::{Mirror, SharedPacket};
use crate::stream::Leg;
use crate::{CloseReason, Output};

use super::{Core, MAX_PENDING};

impl Core {
    pub(super) fn on_ingest(
        &mut self,
        port: u16,
        from: SocketAddr,
        contents: &[u8],
        arrived: Option<Instant>,
        now: Instant,
    ) {
        self.metrics.ingest_packets += 1;
        let Some((id, leg)) = self.ingest.get(&port) else {
            self.metrics.ingest_dropped += 1;
            return;
        };
        let leg = *leg;
        let Some(stream) = self.streams.get_mut(id) else {
            return;
        };
        let ports = stream.ports();
        let expected = match (stream.supervised(), ports, leg) {
            (false, _, _) => None,
            (true, Some(p), Leg::Video(0)) => Some(p.video_source()),
            (true, Some(p), Leg::Video(k)) => Some(p.rendition_source(k - 1)),
            (true, Some(p), Leg::Audio) => Some(p.audio_source()),
            (true, None, _) => Some(0),
        };
        let (kind, rendition, codec) = match leg {
            Leg::Video(k) => match stream.videos.get(usize::from(k)) {
                Some(v) => (MediaKind::Video, k, Some(v.codec)),
                None => return,
            },
            Leg::Audio => (MediaKind::Audio, 0, None),
        };
        let source = match leg {
            Leg::Video(k) => &mut stream.videos[usize::from(k)].source,
            Leg::Audio => &mut stream.audio,
        };
        if !source.admits(from, expected, now) {
            // Not the stream's own FFmpeg: another local process must not reach the viewers.
            self.metrics.ingest_rejected += 1;
            return;
        }
        let p = match rtp::parse(contents) {
            Ok(Datagram::Rtp(p)) => p,
            Ok(Datagram::Rtcp) => {
                self.metrics.ingest_rtcp += 1;
                return;
            }
            Err(_) => {
                self.metrics.ingest_dropped += 1;
                return;
            }
        };
        if p.payload.len() > rtp::MAX_PAYLOAD {
            // Not from our FFmpeg legs, and more than str0m can packetize (it would panic).
            self.metrics.ingest_dropped += 1;
            return;
        }
        let source = match leg {
            Leg::Video(k) => &mut stream.videos[usize::from(k)].source,
            Leg::Audio => &mut stream.audio,
        };
        let ext = source.seq.extend(p.ssrc, p.sequence);
        let keyframe_start = match codec {
            Some(VideoCodec::H264) => rtp::classify_h264(p.payload).is_keyframe_start(),
            Some(VideoCodec::Vp8) => rtp::vp8_keyframe_start(p.payload),
            None => false,
        };
        let pkt = SourcePacket {
            kind,
            rendition,
            seq: ext.seq,
            restart: ext.restart,
            timestamp: p.timestamp,
            marker: p.marker,
            keyframe_start,
            payload: Arc::from(p.payload),
        };
        let id = id.clone();
        if self.mirrors {
            // First, so that the other shards start on it while this one forwards.
            let read_at = arrived.map_or(now, |a| a.min(now));
            let shared = SharedPacket { stream: id.clone(), packet: pkt.clone(), read_at };
            self.outputs.push_back(Output::Mirror(Mirror::Packet(shared)));
        }
        self.defer(id, pkt, now);
    }

    /// Queues a packet for [`fan_out_pending`](Self::fan_out_pending).
    pub(super) fn defer(&mut self, id: StreamId, pkt: SourcePacket, now: Instant) {
        self.pending.push((id, pkt, now));
        if self.pending.len() >= MAX_PENDING {
            self.fan_out_pending();
        }
    }

    /// Writes the pending ingest packets to the viewers, all of them, before another input is
    /// handled (see [`fan_out_step`](Self::fan_out_step)).
    pub(super) fn fan_out_pending(&mut self) {
        self.fan_out_step(None);
    }

    /// Writes the pending ingest packets to the viewers, stream by stream and viewer by
    /// viewer: each viewer gets all of its stream's packets and one str0m drain before the next
    /// viewer is touched. A viewer's state (str0m's `Rtc` and its queues, ~100 KiB) thus comes
    /// into the cache once per batch of packets, not once per packet: with hundreds of viewers
    /// it does not stay cached between two packets. With a `budget`, stops once that many
    /// outputs are queued and resumes at the next call.
    pub(super) fn fan_out_step(&mut self, budget: Option<usize>) {
        let (now, grace) = (self.now, self.config.disconnect_grace);
        let mut news = std::mem::take(&mut self.news);
        while let Some(mut f) = self.fanning.take().or_else(|| self.start_fanning()) {
            if f.next >= f.viewers.len() && !self.next_stream(&mut f) {
                // Done: keep the buffers for the next batch.
                f.packets.clear();
                if self.pending.is_empty() {
                    std::mem::swap(&mut self.pending, &mut f.packets);
                }
                self.scratch = std::mem::take(&mut f.viewers);
                continue;
            }
            let next = f.viewers.get(f.next).copied();
            f.next += 1;
            if let Some(s) = next
                && let Some(viewer) = self.viewers.get_mut(&s)
            {
                for (_, pkt, at) in &f.packets[f.start..f.end] {
                    let sent = viewer.write_media(pkt, *at, grace, &mut self.outputs, &mut news);
                    self.metrics.packets_forwarded += sent.packets;
                    self.metrics.bytes_forwarded += sent.bytes;
                }
                viewer.flush(now, grace, &mut self.outputs, &mut news);
                let (dead, keyframe_wanted) = (viewer.dead, viewer.keyframe_wanted);
                self.apply_news(s, &mut news, now);
                // A request that came with this batch's news is answered after the next one.
                if !dead && keyframe_wanted {
                    let stream = f.packets[f.start].0.clone();
                    self.replay_gop(s, &stream, now);
                }
                if dead {
                    self.remove_viewer(s, CloseReason::RemoteClosed, now);
                } else {
                    self.reschedule_viewer(s, now);
                }
            }
            self.fanning = Some(f);
            if budget.is_some_and(|b| self.outputs.len() >= b) {
                break;
            }
        }
        self.news = news;
    }

    /// A fan-out of the pending packets, if any.
    pub(super) fn start_fanning(&mut self) -> Option<Fanning> {
        if self.pending.is_empty() {
            return None;
        }
        let mut packets = std::mem::take(&mut self.pending);
        // Usually one stream (its video and audio); stable, so each stream's order holds.
        packets.sort_by(|a, b| a.0.cmp(&b.0));
        let viewers = std::mem::take(&mut self.scratch);
        Some(Fanning { packets, start: 0, end: 0, viewers, next: 0 })
    }

    /// Moves `f` to its next stream's packets: keeps them in that stream's GOP cache and
    /// lists its viewers. Returns `false` when there are no more.
    pub(super) fn next_stream(&mut self, f: &mut Fanning) -> bool {
        f.start = f.end;
        let Some((id, _, _)) = f.packets.get(f.start) else {
            return false;
        };
        let id = id.clone();
        f.end = f.start + f.packets[f.start..].iter().take_while(|p| p.0 == id).count();
        f.viewers.clear();
        f.next = 0;
        if let Some(stream) = self.streams.get_mut(&id) {
            for (_, pkt, at) in &f.packets[f.start..f.end] {
                stream.last_rtp = Some(*at);
                if pkt.kind == MediaKind::Video
                    && self.config.gop_cache
                    && let Some(v) = stream.videos.get_mut(usize::from(pkt.rendition))
                {
                    if pkt.keyframe_start {
                        tracing::trace!(stream = %id, rendition = pkt.rendition, ts = pkt.timestamp, "keyframe in");
                    }
                    v.gop.push(pkt);
                }
            }
            f.viewers.extend(stream.viewers.iter().copied());
        }
        true
    }
}

/// Ingest packets being written to viewers ([`Core::fan_out_step`]).
#[derive(Debug)]
pub(super) struct Fanning {
    /// The batch, sorted by stream (stable).
    packets: Vec<(StreamId, SourcePacket, Instant)>,
    /// The current stream's packets are `packets[start..end]`.
    start: usize,
    end: usize,
    /// That stream's viewers, and the next one to write.
    viewers: Vec<SessionId>,
    next: usize,
}
