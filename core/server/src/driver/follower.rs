//! The leader shard's queue to one follower shard.

use std::collections::HashSet;

use super::chan::{self, Full};
use whep_core::StreamId;
use whep_core::shard::Mirror;

/// Most messages waiting in one follower's queue before the leader drops packets for it
/// (about 12 s of one 2.5 Mbit/s stream, 0.4 s of 10 000 packets/s; payloads are shared, so
/// this holds at most ~5 MiB of them alive).
pub(crate) const MAX_QUEUED: usize = 4096;

/// The leader's queue to one follower shard. Lifecycle messages always go in, in order with
/// the packets; packets only while fewer than [`MAX_QUEUED`] messages wait. A stalled follower
/// therefore costs bounded memory. When a stream's packets were dropped, its next packet that
/// does go in is marked as a source restart: the follower's viewers re-gate video at the next
/// keyframe, sequence numbers continuing without a gap, rather than decode a picture with a
/// hole in it (and NACK packets the follower never had).
#[derive(Debug)]
pub(crate) struct FollowerQueue {
    tx: chan::Sender<Mirror>,
    /// Streams whose packets were dropped since the last one queued.
    gaps: HashSet<StreamId>,
}

impl FollowerQueue {
    pub(crate) fn new(tx: chan::Sender<Mirror>) -> Self {
        Self { tx, gaps: HashSet::new() }
    }

    /// Queues `m`; returns `false` when it was a packet and was dropped.
    pub(crate) fn push(&mut self, m: Mirror) -> bool {
        let Mirror::Packet(mut shared) = m else {
            if let Mirror::Remove { stream } | Mirror::Accepting { stream, accepting: false } = &m {
                self.gaps.remove(stream);
            }
            // A follower that is gone (shut down) needs nothing more.
            let _ = self.tx.send(m);
            return true;
        };
        // Usually no gap: the stream id is cloned only to forget one.
        let gap = (!self.gaps.is_empty() && self.gaps.contains(shared.stream()))
            .then(|| shared.stream().clone());
        if gap.is_some() {
            shared.mark_restart();
        }
        match self.tx.send_within(Mirror::Packet(shared), MAX_QUEUED) {
            Ok(()) => {
                if let Some(stream) = gap {
                    self.gaps.remove(&stream);
                }
                true
            }
            Err(Full::Full(m)) => {
                if let Mirror::Packet(shared) = m {
                    self.gaps.insert(shared.stream().clone());
                }
                false
            }
            Err(Full::Closed(_)) => true,
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests pick a real instant
mod tests {
    use std::task::{Context, Poll, Waker};

    use super::*;
    use whep_core::StreamConfig;
    use whep_core::shard::SharedPacket;

    fn packet(stream: &StreamId, seq: u64) -> Mirror {
        Mirror::Packet(SharedPacket::test_video(stream.clone(), seq, std::time::Instant::now()))
    }

    fn next(rx: &chan::Receiver<Mirror>) -> Option<Mirror> {
        match rx.poll_recv(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(m) => m,
            Poll::Pending => None,
        }
    }

    #[test]
    fn a_stalled_follower_costs_bounded_memory_and_restarts_cleanly() {
        let (tx, rx) = chan::channel(None);
        let mut q = FollowerQueue::new(tx);
        let id = |s: &str| StreamId::new(s).unwrap_or_else(|| panic!("stream id {s}"));
        let (a, b) = (id("a"), id("b"));
        let mut dropped = 0;
        for seq in 0..(MAX_QUEUED as u64 + 100) {
            dropped += usize::from(!q.push(packet(&a, seq)));
        }
        assert_eq!(dropped, 100);
        // Lifecycle messages still go in.
        assert!(q.push(Mirror::Add { stream: b.clone(), config: StreamConfig::external() }));
        assert!(!q.push(packet(&b, 0)), "b's packet is dropped too");
        // The follower catches up by three messages (the Add went in beyond the limit): room
        // for two packets, and the next packet of each stream is marked.
        for seq in 0..3 {
            match next(&rx) {
                Some(Mirror::Packet(p)) => {
                    assert_eq!((p.seq(), p.is_restart()), (seq, false))
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(q.push(packet(&a, 9000)));
        assert!(q.push(packet(&a, 9001)));
        let mut rest = Vec::new();
        while let Some(m) = next(&rx) {
            rest.push(m);
        }
        assert_eq!(rest.len(), MAX_QUEUED);
        assert!(matches!(&rest[MAX_QUEUED - 3], Mirror::Add { .. }));
        let marks: Vec<_> = rest[MAX_QUEUED - 2..]
            .iter()
            .map(|m| match m {
                Mirror::Packet(p) => (p.seq(), p.is_restart()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(marks, [(9000, true), (9001, false)]);
        // b still owes its restart mark; a stop forgets it.
        assert!(q.push(Mirror::Accepting { stream: b.clone(), accepting: false }));
        assert!(q.push(packet(&b, 1)));
        let marks: Vec<_> = std::iter::from_fn(|| next(&rx))
            .filter_map(|m| match m {
                Mirror::Packet(p) => Some(p.is_restart()),
                _ => None,
            })
            .collect();
        assert_eq!(marks, [false]);
    }
}
