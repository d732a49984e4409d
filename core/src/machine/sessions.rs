//! The sessions listing and the operator's kick: a snapshot of every viewer computed on request
//! from what the core keeps anyway (nothing on the packet path but two counters in
//! `Viewer::write_rtp`; str0m's statistics arrive once a second).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use str0m::net::Protocol;

use crate::config::VideoCodec;
use crate::ids::{SessionId, StreamId};
use crate::viewer::{Viewer, ViewerState};
use crate::{CloseReason, TransportCounts};

use super::Core;

/// Where a viewer's session is ([`SessionInfo::state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionState {
    /// Answered; ICE and DTLS not complete yet.
    Connecting,
    /// Media flows.
    Connected,
    /// The ICE agent lost the viewer; closed unless it comes back within the grace period.
    Disconnected,
}

impl SessionState {
    /// `connecting`, `connected` or `disconnected`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Connected => "connected",
            Self::Disconnected => "disconnected",
        }
    }
}

/// How a viewer's media travels, as `/metrics`' `whep_viewers_transport` splits them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MediaTransport {
    /// UDP straight to the viewer.
    Udp,
    /// ICE-TCP.
    Tcp,
    /// UDP to a TURN relay's address (a relayed candidate of the viewer).
    Relayed,
}

impl MediaTransport {
    /// `udp`, `tcp` or `relayed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
            Self::Relayed => "relayed",
        }
    }
}

/// The ICE candidate pair a viewer's media uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CandidatePair {
    /// Our end (a host or TCP candidate); `None` before str0m's first peer statistics.
    pub local: Option<SocketAddr>,
    /// The viewer's end (a relay's address for a relayed viewer).
    pub remote: SocketAddr,
    /// Whether it is a TCP pair.
    pub tcp: bool,
}

/// One viewer as the sessions listing shows it ([`Core::sessions`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SessionInfo {
    /// The session (its WHEP resource's id).
    pub session: SessionId,
    /// The stream it watches.
    pub stream: StreamId,
    /// The client's address the POST came from, when the runtime gave it.
    pub client: Option<IpAddr>,
    /// The POST's `User-Agent`, sanitised ([`whep::sanitize_user_agent`](crate::whep::sanitize_user_agent)).
    pub user_agent: Option<String>,
    /// Connecting, connected or disconnected.
    pub state: SessionState,
    /// How its media travels, once a pair is chosen.
    pub transport: Option<MediaTransport>,
    /// The candidate pair its media uses, once one is chosen.
    pub pair: Option<CandidatePair>,
    /// Time since its POST.
    pub age: Duration,
    /// Time since ICE and DTLS completed (first connected), if they have.
    pub connected_for: Option<Duration>,
    /// RTP packets written to it (audio and video, retransmissions not counted), and their
    /// payload bytes.
    pub packets_sent: u64,
    /// See `packets_sent`.
    pub bytes_sent: u64,
    /// Video packets retransmitted on its NACKs.
    pub retransmissions: u64,
    /// NACK packets received (str0m's count, as of its last statistics: at most a second old).
    pub nacks: u64,
    /// PLIs received (idem).
    pub plis: u64,
    /// FIRs received (idem).
    pub firs: u64,
    /// The fraction of its video lost, as its last RTCP receiver reports state it.
    pub loss: Option<f32>,
    /// Round-trip time from its last receiver report with a sender-report reference.
    pub rtt: Option<Duration>,
    /// Bytes per second sent to it (audio and video, retransmissions included) over the last
    /// statistics interval (a second).
    pub send_rate: Option<u64>,
    /// Its rung: the index of the stream's video rendition it gets, and that rendition's codec.
    pub rendition: u8,
    /// See `rendition`.
    pub codec: Option<VideoCodec>,
    /// The rung it moves to at that rendition's next keyframe, if a move is pending.
    pub target_rendition: Option<u8>,
    /// It gets keyframes only (lossy, no lower rung).
    pub keyframes_only: bool,
    /// The rate its video is paced at (bytes per second) since its reports showed loss;
    /// `None` while unpaced.
    pub pacing: Option<u64>,
    /// Video packets held back by its pacing or a paced prime.
    pub held_packets: usize,
}

impl Core {
    /// Every viewer, ordered by stream then session, as of `now` (ages are measured to it).
    /// Computed on request from what the core keeps: about 0.1 µs per viewer
    /// (`core/benches/RESULTS.md`, "Sessions listing"), no state changes.
    pub fn sessions(&self, now: Instant) -> Vec<SessionInfo> {
        let now = self.now.max(now);
        let mut out = Vec::with_capacity(self.viewers.len());
        for stream in self.streams.values() {
            for s in &stream.viewers {
                if let Some(v) = self.viewers.get(s) {
                    out.push(self.session_info(v, now));
                }
            }
        }
        out
    }

    /// One viewer of [`sessions`](Self::sessions), by its session id.
    pub fn session(&self, session: SessionId, now: Instant) -> Option<SessionInfo> {
        let now = self.now.max(now);
        self.viewers.get(&session).map(|v| self.session_info(v, now))
    }

    /// Closes a viewer as its own DELETE would (RTCP BYE and DTLS close_notify, its seat, ports
    /// and counters released), with [`CloseReason::Kicked`]: its WHEP resource answers 404 from
    /// now on (a DELETE of it 204, as for any unknown session). Returns the stream it watched,
    /// or `None` when there is no such session.
    pub fn kick(&mut self, session: SessionId, now: Instant) -> Option<StreamId> {
        let now = self.tick(now);
        self.fan_out_pending();
        let stream = self.viewers.get(&session)?.stream.clone();
        self.remove_viewer(session, CloseReason::Kicked, now);
        Some(stream)
    }

    fn session_info(&self, v: &Viewer, now: Instant) -> SessionInfo {
        let seen = &v.seen;
        let state = match v.state {
            ViewerState::Connecting { .. } => SessionState::Connecting,
            ViewerState::Connected => SessionState::Connected,
            ViewerState::Disconnected { .. } => SessionState::Disconnected,
        };
        let pair = match seen.pair {
            Some((proto, local, remote)) => {
                Some(CandidatePair { local: Some(local), remote, tcp: proto != Protocol::Udp })
            }
            None => v.path.sending_to.map(|remote| CandidatePair {
                local: None,
                remote,
                tcp: v.media_tcp,
            }),
        };
        let transport = pair.map(|_| transport_of(v));
        let rate = match (seen.video.rate, seen.audio.rate) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
        };
        let codec = self
            .streams
            .get(&v.stream)
            .and_then(|s| s.videos.get(usize::from(v.rendition)))
            .map(|r| r.codec);
        SessionInfo {
            session: v.session,
            stream: v.stream.clone(),
            client: seen.client,
            user_agent: seen.user_agent.clone(),
            state,
            transport,
            pair,
            age: now.saturating_duration_since(v.joined),
            connected_for: seen.connected_at.map(|t| now.saturating_duration_since(t)),
            packets_sent: v.sent.packets,
            bytes_sent: v.sent.bytes,
            retransmissions: seen.resent,
            nacks: seen.video.nacks + seen.audio.nacks,
            plis: seen.video.plis,
            firs: seen.video.firs,
            loss: seen.video.loss,
            rtt: seen.video.rtt.or(seen.audio.rtt),
            send_rate: rate,
            rendition: v.rendition,
            codec,
            target_rendition: v.ladder.target,
            keyframes_only: v.ladder.keyframes_only,
            pacing: v.pacing.map(|(p, _)| p.rate),
            held_packets: v.video.backlog(),
        }
    }
}

/// The transport a viewer's media uses, as [`Core::viewers_by_transport`] counts it.
pub(super) fn transport_of(v: &Viewer) -> MediaTransport {
    if v.media_tcp {
        MediaTransport::Tcp
    } else if v.path.sending_to.is_some_and(|a| v.relays.contains(&a)) {
        MediaTransport::Relayed
    } else {
        MediaTransport::Udp
    }
}

/// Adds one connected viewer to `counts` by its transport.
pub(super) fn count(counts: &mut TransportCounts, v: &Viewer) {
    match transport_of(v) {
        MediaTransport::Tcp => counts.tcp += 1,
        MediaTransport::Relayed => counts.relayed += 1,
        MediaTransport::Udp => counts.udp += 1,
    }
}
