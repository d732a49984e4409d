//! One stream: its configuration, ingest ports, FFmpeg process and viewers.

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::config::{Feed, ProcessConfig, StreamConfig, VideoCodec};
use crate::gop::GopCache;
use crate::ids::{SessionId, StreamId};
use crate::ports::PortPair;
use crate::rtp::SeqExtender;
use crate::shard::Mirror;
use crate::{Event, Output, StreamStatus};

/// Where a stream is in its lifecycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StreamState {
    /// Not started; no ports, no process.
    Stopped,
    /// An on-demand stream ([`StreamConfig::on_demand`]) waiting for its first viewer: accepts
    /// viewers; no ports, no process.
    Idle,
    /// Ports allocated; waiting for the runtime to confirm the bind.
    Binding { ports: PortPair, attempt: u32 },
    /// Ports bound; RTP is accepted and forwarded.
    Running { ports: PortPair, process: Process },
    /// The supervised FFmpeg died or went stale; ports are released and a restart is due.
    Backoff { until: Instant },
    /// Stopping: viewers are gone, the process was asked to exit; ports are released when it
    /// does. `kill_at` is when SIGKILL follows SIGTERM. `idle`: an on-demand stream that no one
    /// watched for its close delay; it goes back to [`StreamState::Idle`] (and accepts viewers
    /// meanwhile: one that comes starts it again once the process is gone).
    Stopping {
        ports: PortPair,
        generation: u64,
        kill_at: Option<Instant>,
        remove: bool,
        idle: bool,
    },
    /// A follower shard's copy of a started stream: accepts viewers; packets come from the
    /// leader.
    Mirrored,
}

/// The FFmpeg process of a running stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Process {
    /// The embedding application feeds the ports itself.
    External,
    /// Spawn requested (or running) with this generation since `since`.
    Spawned { generation: u64, since: Instant },
    /// Asked to stop because it went stale; restarted when it exits. `kill_at` as in
    /// [`StreamState::Stopping`].
    Terminating { generation: u64, kill_at: Option<Instant> },
}

/// How long the sender an external feed's port accepts may be silent before another sender
/// takes its place (an application's FFmpeg restarted from a new port).
pub(crate) const SENDER_IDLE: Duration = Duration::from_secs(2);

/// What an ingest port carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Leg {
    /// Video rendition `k` (0: the stream's own H264).
    Video(u8),
    Audio,
}

/// One video rendition's ingest: its codec, source and GOP cache.
#[derive(Debug)]
pub(crate) struct VideoIn {
    pub(crate) codec: VideoCodec,
    pub(crate) source: Source,
    /// Video since the last keyframe, for new viewers and keyframe requests.
    pub(crate) gop: GopCache,
}

/// Per-source (video or audio) ingest state.
#[derive(Debug, Clone, Default)]
pub(crate) struct Source {
    pub(crate) seq: SeqExtender,
    /// The sender an external feed's port accepts, and when it last sent.
    sender: Option<(SocketAddr, Instant)>,
}

impl Source {
    /// Whether a datagram from `from` belongs to the stream. A supervised stream's FFmpeg sends
    /// from a known loopback port (`expected`, its leg's `localport`); nothing else is
    /// accepted. An external feed's port accepts its first sender, and another only once that
    /// one has been silent for [`SENDER_IDLE`].
    pub(crate) fn admits(&mut self, from: SocketAddr, expected: Option<u16>, now: Instant) -> bool {
        if let Some(port) = expected {
            return from.port() == port && from.ip().is_loopback();
        }
        match &mut self.sender {
            Some((sender, last)) if *sender == from => *last = now,
            Some((_, last)) if now.saturating_duration_since(*last) < SENDER_IDLE => return false,
            _ => self.sender = Some((from, now)),
        }
        true
    }
}

#[derive(Debug)]
pub(crate) struct Stream {
    pub(crate) id: StreamId,
    pub(crate) config: StreamConfig,
    /// Changed only through [`set_state`](Self::set_state), which tells the follower shards.
    state: StreamState,
    pub(crate) viewers: BTreeSet<SessionId>,
    /// The video renditions, the stream's own H264 first, then
    /// [`EgressConfig::renditions`](crate::ffmpeg::EgressConfig::renditions) in order.
    pub(crate) videos: Vec<VideoIn>,
    pub(crate) audio: Source,
    /// When RTP last arrived (stale detection).
    pub(crate) last_rtp: Option<Instant>,
    /// Consecutive failed runs of the supervised process (restart backoff).
    pub(crate) failures: u32,
    /// Restarts of the supervised process since the stream was added.
    pub(crate) restarts: u64,
    pub(crate) pid: Option<u32>,
    pub(crate) scheduled: Option<Instant>,
    /// An on-demand stream's last viewer left (or its process started with none) at this
    /// time; its process stops [`StreamConfig::on_demand`] later unless a viewer comes.
    pub(crate) unwatched_since: Option<Instant>,
}

impl Stream {
    pub(crate) fn new(id: StreamId, config: StreamConfig) -> Self {
        let videos = std::iter::once(VideoCodec::H264)
            .chain(config.egress.renditions.iter().map(|r| r.codec))
            .map(|codec| VideoIn { codec, source: Source::default(), gop: GopCache::default() })
            .collect();
        Self {
            id,
            config,
            state: StreamState::Stopped,
            viewers: BTreeSet::new(),
            videos,
            audio: Source::default(),
            last_rtp: None,
            failures: 0,
            restarts: 0,
            pid: None,
            scheduled: None,
            unwatched_since: None,
        }
    }

    /// The target bitrate of video rendition `k` (0: the stream's H264, whose bitrate is set
    /// only when it is transcoded), in kbit/s.
    pub(crate) fn rendition_kbps(&self, k: usize) -> Option<u32> {
        let egress = &self.config.egress;
        match k {
            0 => egress.video_bitrate_kbps,
            _ => egress.renditions.get(k - 1).map(|r| r.bitrate_kbps),
        }
    }

    /// What video rendition `k` sends, in payload bytes per second: its last GOP's rate as
    /// measured, or its target bitrate when that is higher (or nothing is measured yet).
    pub(crate) fn rendition_rate(&self, k: usize) -> Option<u64> {
        let measured = self.videos.get(k).and_then(|v| v.gop.rate());
        let target = self.rendition_kbps(k).map(|kbps| u64::from(kbps) * 125);
        measured.max(target)
    }

    /// Video rendition `k`'s GOP cache.
    pub(crate) fn gop(&self, k: u8) -> Option<&GopCache> {
        self.videos.get(usize::from(k)).map(|v| &v.gop)
    }

    /// Further video renditions besides the stream's own H264 (each with its ingest port).
    pub(crate) fn renditions(&self) -> u8 {
        u8::try_from(self.videos.len().saturating_sub(1)).unwrap_or(u8::MAX)
    }

    pub(crate) fn state(&self) -> &StreamState {
        &self.state
    }

    /// Moves the stream to `state`, the one way its state changes. On a sharded leader
    /// (`mirror`), a change in whether it accepts viewers goes to the follower shards in
    /// `out` ([`Mirror::Accepting`]), so that no shard can be left behind by a code path that
    /// forgot to tell them.
    pub(crate) fn set_state(
        &mut self,
        state: StreamState,
        mirror: bool,
        out: &mut VecDeque<Output>,
    ) {
        let before = self.accepts_viewers();
        let was_up = self.status() == StreamStatus::Running;
        self.state = state;
        let accepting = self.accepts_viewers();
        if mirror && accepting != before {
            out.push_back(Output::Mirror(Mirror::Accepting { stream: self.id.clone(), accepting }));
        }
        let status = self.status();
        match (was_up, status == StreamStatus::Running) {
            (false, true) => {
                out.push_back(Output::Event(Event::StreamUp { stream: self.id.clone() }))
            }
            (true, false) => out.push_back(Output::Event(Event::StreamDown {
                stream: self.id.clone(),
                state: status,
            })),
            _ => {}
        }
    }

    pub(crate) fn supervised(&self) -> bool {
        matches!(self.config.feed, Feed::Supervised { .. })
    }

    /// Whether a POST may create a viewer: egress enabled and the stream started.
    pub(crate) fn accepts_viewers(&self) -> bool {
        self.config.egress.enabled
            && matches!(
                self.state,
                StreamState::Binding { .. }
                    | StreamState::Running { .. }
                    | StreamState::Backoff { .. }
                    | StreamState::Mirrored
                    | StreamState::Idle
                    | StreamState::Stopping { idle: true, remove: false, .. }
            )
    }

    /// The ports the stream holds in the pool, if any.
    pub(crate) fn ports(&self) -> Option<PortPair> {
        match self.state {
            StreamState::Binding { ports, .. }
            | StreamState::Running { ports, .. }
            | StreamState::Stopping { ports, .. } => Some(ports),
            StreamState::Stopped
            | StreamState::Idle
            | StreamState::Backoff { .. }
            | StreamState::Mirrored => None,
        }
    }

    /// When an on-demand stream's process is due to stop for want of viewers.
    pub(crate) fn close_at(&self) -> Option<Instant> {
        let after = self.config.on_demand?;
        if !self.viewers.is_empty() {
            return None;
        }
        self.unwatched_since.map(|t| t + after)
    }

    /// The stream's own next deadline (restart, stale check, kill escalation).
    pub(crate) fn deadline(&self, p: &ProcessConfig) -> Option<Instant> {
        match &self.state {
            StreamState::Backoff { until } => Some(*until),
            StreamState::Stopping { kill_at, .. } => *kill_at,
            StreamState::Running { process: Process::Spawned { since, .. }, .. } => {
                let active = self.last_rtp.map_or(*since, |t| t.max(*since));
                let stale = active + p.stale_timeout;
                Some(self.close_at().map_or(stale, |c| c.min(stale)))
            }
            StreamState::Running { process: Process::Terminating { kill_at, .. }, .. } => *kill_at,
            StreamState::Running { process: Process::External, .. }
            | StreamState::Binding { .. }
            | StreamState::Mirrored
            | StreamState::Idle
            | StreamState::Stopped => None,
        }
    }

    /// Delay before the next restart after a failed run that lasted `ran`.
    pub(crate) fn backoff(&mut self, ran: Option<Duration>, p: &ProcessConfig) -> Duration {
        if ran.is_some_and(|r| r >= p.restart_backoff_reset) {
            self.failures = 0;
        }
        let exp = self.failures.min(16);
        self.failures = self.failures.saturating_add(1);
        p.restart_backoff_initial.saturating_mul(1 << exp).min(p.restart_backoff_max)
    }

    /// The state as status listings show it.
    pub(crate) fn status(&self) -> StreamStatus {
        let on_demand = self.config.on_demand.is_some();
        match &self.state {
            StreamState::Stopped => StreamStatus::Stopped,
            StreamState::Idle => StreamStatus::Idle,
            StreamState::Binding { .. } if on_demand => StreamStatus::Starting,
            StreamState::Running { process: Process::Spawned { .. }, .. }
                if on_demand && self.last_rtp.is_none() =>
            {
                StreamStatus::Starting
            }
            StreamState::Binding { .. } => StreamStatus::Binding,
            StreamState::Running { process: Process::Terminating { .. }, .. } => {
                StreamStatus::Restarting
            }
            StreamState::Running { .. } | StreamState::Mirrored => StreamStatus::Running,
            StreamState::Backoff { .. } => StreamStatus::Backoff,
            StreamState::Stopping { .. } => StreamStatus::Stopping,
        }
    }
}
