//! Stream lifecycle: add, start (bind, spawn), stop, remove, FFmpeg exits and restarts with
//! backoff, stale sources, and the stream timers.

use std::time::Instant;

use tracing::{debug, info, warn};

use crate::config::{Feed, StreamConfig};
use crate::ffmpeg;
use crate::ids::{SessionId, StreamId};
use crate::ports::PortPair;
use crate::shard::Mirror;
use crate::stream::{Leg, Process, Stream, StreamState};
use crate::{CloseReason, Event, Output, StreamError};

use super::{Core, MAX_BIND_ATTEMPTS, TimerKey};

impl Core {
    /// Registers a stream. It stays stopped until [`start_stream`](Self::start_stream).
    pub fn add_stream(&mut self, id: StreamId, config: StreamConfig) -> Result<(), StreamError> {
        self.fan_out_pending();
        if self.streams.contains_key(&id) {
            return Err(StreamError::Exists);
        }
        config.egress.validate().map_err(StreamError::InvalidConfig)?;
        let renditions = config.egress.renditions.len();
        if renditions > usize::from(self.config.max_renditions) {
            return Err(StreamError::InvalidConfig(format!(
                "{renditions} renditions; at most {} (max_renditions)",
                self.config.max_renditions
            )));
        }
        // A follower shard's copy (`Feed::Mirror`) keeps `on_demand` to tell the leader about
        // its viewers (see `crate::shard`).
        if config.on_demand.is_some()
            && !matches!(config.feed, Feed::Supervised { .. } | Feed::Mirror)
        {
            return Err(StreamError::InvalidConfig(
                "on_demand needs a supervised feed (the core starts its FFmpeg)".into(),
            ));
        }
        info!(stream = %id, "stream added");
        if self.mirrors {
            let add = Mirror::Add { stream: id.clone(), config: config.clone() };
            self.outputs.push_back(Output::Mirror(add));
        }
        self.streams.insert(id.clone(), Stream::new(id, config));
        Ok(())
    }

    /// Starts a stream: allocates an adjacent port pair and asks the runtime to bind it
    /// ([`Output::BindIngest`]). Once bound, [`Event::StreamReady`] carries the FFmpeg output
    /// arguments and, for a supervised stream, [`Output::SpawnProcess`] follows.
    pub fn start_stream(&mut self, id: &StreamId, now: Instant) -> Result<(), StreamError> {
        self.fan_out_pending();
        let now = self.tick(now);
        let stream = self.streams.get(id).ok_or(StreamError::NotFound)?;
        if !stream.config.egress.enabled {
            return Err(StreamError::Disabled);
        }
        match stream.state() {
            StreamState::Stopped => {}
            StreamState::Backoff { .. } => {}
            _ => return Err(StreamError::AlreadyStarted),
        }
        if stream.config.feed == Feed::Mirror {
            if let Some(s) = self.streams.get_mut(id) {
                s.set_state(StreamState::Mirrored, self.mirrors, &mut self.outputs);
                s.last_rtp = None;
            }
            return Ok(());
        }
        if stream.config.on_demand.is_some() && *stream.state() == StreamState::Stopped {
            if let Some(s) = self.streams.get_mut(id) {
                s.set_state(StreamState::Idle, self.mirrors, &mut self.outputs);
                s.failures = 0;
            }
            info!(stream = %id, "stream idle until its first viewer (on demand)");
            return Ok(());
        }
        let ports = self.ports.allocate(now).ok_or(StreamError::NoPorts)?;
        // A start by the application is a fresh start: earlier crashes do not lengthen the
        // backoff of the next one.
        if let Some(s) = self.streams.get_mut(id) {
            s.failures = 0;
        }
        self.bind(id, ports, 1, now);
        Ok(())
    }

    pub(super) fn bind(&mut self, id: &StreamId, ports: PortPair, attempt: u32, now: Instant) {
        let watched = self.watched(id);
        if let Some(s) = self.streams.get_mut(id) {
            s.set_state(StreamState::Binding { ports, attempt }, self.mirrors, &mut self.outputs);
            if self.mirrors {
                // The followers empty their GOP caches too.
                let run = Mirror::NewRun { stream: id.clone() };
                self.outputs.push_back(Output::Mirror(run));
            }
            for v in &mut s.videos {
                v.source = Default::default();
                // The previous run's GOP is never a new viewer's first picture, even if the new
                // run's audio comes before its first video packet (which clears it too).
                v.gop.clear();
            }
            s.audio = Default::default();
            s.last_rtp = None;
            // An on-demand process started with no one watching (on any shard) gets its whole
            // close delay.
            s.unwatched_since = (!watched).then_some(now);
        }
        debug!(stream = %id, %ports, attempt, "binding ingest ports");
        let renditions = self.streams.get(id).map_or(0, |s| s.renditions());
        self.outputs.push_back(Output::BindIngest { stream: id.clone(), ports, renditions });
        self.reschedule_stream(id, now);
    }

    /// Stops a stream: closes every viewer first, then stops its FFmpeg (if supervised) and
    /// releases its ports once the process has exited (the seed's teardown order).
    pub fn stop_stream(&mut self, id: &StreamId, now: Instant) -> Result<(), StreamError> {
        self.fan_out_pending();
        let now = self.tick(now);
        if !self.streams.contains_key(id) {
            return Err(StreamError::NotFound);
        }
        self.teardown(id, false, CloseReason::StreamStopped, now);
        Ok(())
    }

    /// Stops a stream as [`stop_stream`](Self::stop_stream) does and forgets it once stopped.
    pub fn remove_stream(&mut self, id: &StreamId, now: Instant) -> Result<(), StreamError> {
        self.fan_out_pending();
        let now = self.tick(now);
        if !self.streams.contains_key(id) {
            return Err(StreamError::NotFound);
        }
        self.teardown(id, true, CloseReason::StreamStopped, now);
        Ok(())
    }

    /// Closes every viewer and stops every stream, for a clean exit. Keep driving the core
    /// until [`Core::is_idle`] to let supervised processes exit and ports be released.
    pub fn shutdown(&mut self, now: Instant) {
        let now = self.tick(now);
        self.fan_out_pending();
        self.stop_stun();
        let ids: Vec<StreamId> = self.streams.keys().cloned().collect();
        for id in ids {
            self.teardown(&id, false, CloseReason::Shutdown, now);
        }
        let rest: Vec<SessionId> = self.viewers.keys().copied().collect();
        for s in rest {
            self.remove_viewer(s, CloseReason::Shutdown, now);
        }
        self.answer_pending_auth(now);
    }

    /// True when no viewer, port or process is held.
    pub fn is_idle(&self) -> bool {
        self.viewers.is_empty()
            && self.auth.is_idle()
            && self.ports.in_use() == 0
            && self
                .streams
                .values()
                .all(|s| matches!(s.state(), StreamState::Stopped | StreamState::Idle))
    }

    pub(super) fn teardown(&mut self, id: &StreamId, remove: bool, why: CloseReason, now: Instant) {
        self.close_viewers(id, why, now);
        let Some(stream) = self.streams.get_mut(id) else {
            return;
        };
        match stream.state().clone() {
            StreamState::Running { ports, process: Process::Spawned { generation, .. } }
            | StreamState::Running { ports, process: Process::Terminating { generation, .. } } => {
                stream.set_state(
                    StreamState::Stopping {
                        ports,
                        generation,
                        kill_at: Some(now + self.config.process.stop_grace),
                        remove,
                        idle: false,
                    },
                    self.mirrors,
                    &mut self.outputs,
                );
                info!(stream = %id, generation, "stopping process");
                self.outputs.push_back(Output::StopProcess { stream: id.clone(), generation });
            }
            StreamState::Stopping { ports, generation, kill_at, remove: r, .. } => {
                stream.set_state(
                    StreamState::Stopping {
                        ports,
                        generation,
                        kill_at,
                        remove: r || remove,
                        idle: false,
                    },
                    self.mirrors,
                    &mut self.outputs,
                );
            }
            StreamState::Running { ports, process: Process::External }
            | StreamState::Binding { ports, .. } => {
                self.release(id, ports);
                self.stopped(id, remove);
            }
            StreamState::Backoff { .. }
            | StreamState::Stopped
            | StreamState::Idle
            | StreamState::Mirrored => self.stopped(id, remove),
        }
        self.reschedule_stream(id, now);
    }

    /// Whether anyone watches stream `id`: on any shard of a sharded server (the shared book,
    /// which a shard updates before it calls [`viewer_came`](Self::viewer_came) or
    /// [`viewer_went`](Self::viewer_went)), else on this core.
    fn watched(&self, id: &StreamId) -> bool {
        match &self.shard {
            Some(m) => m.set.stream_viewers(id) > 0,
            None => self.streams.get(id).is_some_and(|s| !s.viewers.is_empty()),
        }
    }

    /// Whether this core is a follower shard (its streams are the leader's copies).
    fn follower(&self) -> bool {
        self.shard.as_ref().is_some_and(|m| !m.is_leader())
    }

    /// On the leader shard, a follower's [`Output::Demand`]: whether anyone watches on-demand
    /// stream `stream` changed on that shard. Reads the shared book: watched, an idle stream
    /// starts (once: only the leader spawns) and a close delay is cancelled; unwatched, the
    /// close delay is armed (see [`crate::shard`]). Ignored on a core that is not a sharded
    /// leader, and for a stream that is not on demand.
    pub fn demand(&mut self, stream: &StreamId, now: Instant) {
        self.fan_out_pending();
        let now = self.tick(now);
        if !self.mirrors || self.streams.get(stream).is_none_or(|s| s.config.on_demand.is_none()) {
            return;
        }
        if self.watched(stream) {
            self.viewer_came(stream, now);
        } else {
            self.viewer_went(stream, now);
        }
    }

    /// A viewer joined stream `id`: an idle on-demand stream starts its FFmpeg now. A follower
    /// shard tells the leader instead ([`Output::Demand`]).
    pub(super) fn viewer_came(&mut self, id: &StreamId, now: Instant) {
        let follower = self.follower();
        let Some(stream) = self.streams.get_mut(id) else {
            return;
        };
        if follower {
            if stream.config.on_demand.is_some() {
                self.outputs.push_back(Output::Demand { stream: id.clone() });
            }
            return;
        }
        stream.unwatched_since = None;
        if *stream.state() == StreamState::Idle {
            match self.ports.allocate(now) {
                Some(ports) => {
                    info!(stream = %id, "first viewer: starting the stream (on demand)");
                    self.bind(id, ports, 1, now);
                }
                None => self.failed(id, "no free ingest port pair".into(), now),
            }
        }
        self.reschedule_stream(id, now);
    }

    /// A viewer of stream `id` left: an on-demand stream with no one left (on any shard) arms
    /// its close timer. A follower shard tells the leader instead ([`Output::Demand`]).
    pub(super) fn viewer_went(&mut self, id: &StreamId, now: Instant) {
        if self.streams.get(id).is_none_or(|s| s.config.on_demand.is_none()) || self.watched(id) {
            return;
        }
        if self.follower() {
            self.outputs.push_back(Output::Demand { stream: id.clone() });
            return;
        }
        if let Some(stream) = self.streams.get_mut(id) {
            // Armed already when the leader heard of it before (from another shard).
            stream.unwatched_since.get_or_insert(now);
        }
        self.reschedule_stream(id, now);
    }

    /// An on-demand stream that no one watched for its close delay: its process is stopped
    /// and the stream goes back to idle.
    fn close_unwatched(&mut self, id: &StreamId, ports: PortPair, generation: u64, now: Instant) {
        let Some(stream) = self.streams.get_mut(id) else {
            return;
        };
        stream.set_state(
            StreamState::Stopping {
                ports,
                generation,
                kill_at: Some(now + self.config.process.stop_grace),
                remove: false,
                idle: true,
            },
            self.mirrors,
            &mut self.outputs,
        );
        info!(stream = %id, generation, "no viewers: stopping the process (on demand)");
        self.outputs.push_back(Output::StopProcess { stream: id.clone(), generation });
    }

    /// Closes the stream's viewers; a sharded leader has the followers close theirs too.
    pub(super) fn close_viewers(&mut self, id: &StreamId, why: CloseReason, now: Instant) {
        if self.mirrors && self.streams.contains_key(id) {
            let m = Mirror::CloseViewers { stream: id.clone(), reason: why };
            self.outputs.push_back(Output::Mirror(m));
        }
        let viewers: Vec<SessionId> =
            self.streams.get(id).map(|s| s.viewers.iter().copied().collect()).unwrap_or_default();
        for v in viewers {
            self.remove_viewer(v, why, now);
        }
    }

    pub(super) fn release(&mut self, id: &StreamId, ports: PortPair) {
        let renditions = self.streams.get(id).map_or(0, |s| s.renditions());
        for port in ports.ingest(renditions) {
            self.ingest.remove(&port);
        }
        if self.ports.release(ports) {
            self.outputs.push_back(Output::ReleaseIngest { stream: id.clone(), ports });
        }
    }

    pub(super) fn stopped(&mut self, id: &StreamId, remove: bool) {
        if let Some(s) = self.streams.get_mut(id) {
            s.set_state(StreamState::Stopped, self.mirrors, &mut self.outputs);
            s.pid = None;
        }
        self.outputs.push_back(Output::Event(Event::StreamStopped { stream: id.clone() }));
        if self.mirrors && remove {
            self.outputs.push_back(Output::Mirror(Mirror::Remove { stream: id.clone() }));
        }
        if remove {
            if let Some(t) = self.streams.remove(id).and_then(|s| s.scheduled) {
                self.timers.remove(&(t, TimerKey::Stream(id.clone())));
            }
            info!(stream = %id, "stream removed");
        } else {
            info!(stream = %id, "stream stopped");
        }
    }

    pub(super) fn on_bound(&mut self, id: &StreamId, ports: PortPair, now: Instant) {
        let Some(stream) = self.streams.get_mut(id) else {
            return;
        };
        if !matches!(*stream.state(), StreamState::Binding { ports: p, .. } if p == ports) {
            return;
        }
        self.ingest.insert(ports.video, (id.clone(), Leg::Video(0)));
        self.ingest.insert(ports.audio(), (id.clone(), Leg::Audio));
        for k in 0..stream.renditions() {
            self.ingest.insert(ports.rendition(k), (id.clone(), Leg::Video(k + 1)));
        }
        let egress = &stream.config.egress;
        let (process, args) = match &stream.config.feed {
            Feed::External => (Process::External, ffmpeg::build_args(egress, ports.video)),
            Feed::Mirror => return, // never binds
            Feed::Supervised { input_args } => {
                let generation = self.next_generation;
                self.next_generation += 1;
                (
                    Process::Spawned { generation, since: now },
                    ffmpeg::command_line(input_args, egress, ports.video),
                )
            }
        };
        stream.set_state(
            StreamState::Running { ports, process: process.clone() },
            self.mirrors,
            &mut self.outputs,
        );
        info!(stream = %id, %ports, "stream ready");
        self.outputs.push_back(Output::Event(Event::StreamReady {
            stream: id.clone(),
            ports,
            args: args.clone(),
        }));
        if let Process::Spawned { generation, .. } = process {
            self.outputs.push_back(Output::SpawnProcess {
                stream: id.clone(),
                generation,
                program: self.config.process.program.clone(),
                args,
            });
        }
        self.reschedule_stream(id, now);
    }

    pub(super) fn on_bind_failed(
        &mut self,
        id: &StreamId,
        ports: PortPair,
        error: &str,
        now: Instant,
    ) {
        let Some(stream) = self.streams.get(id) else {
            return;
        };
        let StreamState::Binding { ports: p, attempt } = *stream.state() else {
            return;
        };
        if p != ports {
            return;
        }
        warn!(stream = %id, %ports, error, "ingest bind failed");
        self.ports.quarantine(ports, now + self.config.bind_quarantine);
        let next = (attempt < MAX_BIND_ATTEMPTS).then(|| self.ports.allocate(now)).flatten();
        match next {
            Some(ports) => self.bind(id, ports, attempt + 1, now),
            None => self.failed(id, format!("no bindable ingest port pair ({error})"), now),
        }
    }

    /// The stream could not get going: supervised streams retry after a backoff, external
    /// ones stop.
    pub(super) fn failed(&mut self, id: &StreamId, reason: String, now: Instant) {
        let p = self.config.process.clone();
        let Some(stream) = self.streams.get_mut(id) else {
            return;
        };
        if let Some(ports) = stream.ports() {
            stream.set_state(StreamState::Stopped, self.mirrors, &mut self.outputs);
            self.release(id, ports);
        }
        let Some(stream) = self.streams.get_mut(id) else {
            return;
        };
        let retry_in = stream.supervised().then(|| stream.backoff(None, &p));
        stream.pid = None;
        stream.set_state(
            match retry_in {
                Some(d) => StreamState::Backoff { until: now + d },
                None => StreamState::Stopped,
            },
            self.mirrors,
            &mut self.outputs,
        );
        if retry_in.is_none() {
            // A stopped stream holds no viewers, as after `stop_stream`: those that joined
            // while it was binding would otherwise stay attached to it, without media.
            self.close_viewers(id, CloseReason::StreamStopped, now);
        }
        warn!(stream = %id, reason, ?retry_in, "stream failed");
        self.outputs.push_back(Output::Event(Event::StreamFailed {
            stream: id.clone(),
            reason,
            retry_in,
        }));
        self.reschedule_stream(id, now);
    }

    pub(super) fn on_process_exit(
        &mut self,
        id: &StreamId,
        generation: u64,
        code: Option<i32>,
        now: Instant,
    ) {
        let p = self.config.process.clone();
        let Some(stream) = self.streams.get_mut(id) else {
            return;
        };
        match stream.state().clone() {
            StreamState::Stopping { ports, generation: g, remove, idle, .. } if g == generation => {
                info!(stream = %id, generation, ?code, "process exited");
                self.release(id, ports);
                if idle {
                    let watched = self.watched(id);
                    let Some(stream) = self.streams.get_mut(id) else {
                        return;
                    };
                    stream.set_state(StreamState::Idle, self.mirrors, &mut self.outputs);
                    stream.pid = None;
                    if watched {
                        // A viewer came (on any shard) while the process was stopping.
                        self.viewer_came(id, now);
                    } else {
                        info!(stream = %id, "stream idle (on demand)");
                    }
                } else {
                    self.stopped(id, remove);
                }
                self.reschedule_stream(id, now);
            }
            StreamState::Running { ports, process } => {
                let (g, ran) = match process {
                    Process::Spawned { generation: g, since } => (g, Some(now - since)),
                    Process::Terminating { generation: g, .. } => (g, None),
                    Process::External => return,
                };
                if g != generation {
                    return;
                }
                let delay = stream.backoff(ran, &p);
                stream.restarts += 1;
                stream.pid = None;
                self.metrics.process_restarts += 1;
                warn!(stream = %id, generation, ?code, ?delay, "process exited; restarting");
                self.outputs.push_back(Output::Event(Event::ProcessExited {
                    stream: id.clone(),
                    code,
                    restart_in: Some(delay),
                }));
                self.close_viewers(id, CloseReason::StreamRestarting, now);
                if let Some(s) = self.streams.get_mut(id) {
                    s.set_state(
                        StreamState::Backoff { until: now + delay },
                        self.mirrors,
                        &mut self.outputs,
                    );
                }
                self.release(id, ports);
                self.reschedule_stream(id, now);
            }
            _ => {}
        }
    }

    pub(super) fn stream_timeout(&mut self, id: &StreamId, now: Instant) {
        let p = self.config.process.clone();
        let due = self.streams.get(id).and_then(|s| s.close_at()).is_some_and(|c| c <= now);
        // A viewer that came on another shard keeps the stream even before the leader hears of
        // it ([`Output::Demand`] on its way): the shared book counts it already.
        let unwatched = due && !self.watched(id);
        let Some(stream) = self.streams.get_mut(id) else {
            return;
        };
        if due && !unwatched {
            stream.unwatched_since = None;
        }
        match stream.state().clone() {
            StreamState::Backoff { until } if until <= now && unwatched => {
                // A crashed on-demand process that no one came back for stays down.
                stream.set_state(StreamState::Idle, self.mirrors, &mut self.outputs);
                info!(stream = %id, "no viewers: not restarting (on demand)");
            }
            StreamState::Running { ports, process: Process::Spawned { generation, .. } }
                if unwatched =>
            {
                self.close_unwatched(id, ports, generation, now);
            }
            StreamState::Backoff { until } if until <= now => match self.ports.allocate(now) {
                Some(ports) => self.bind(id, ports, 1, now),
                None => {
                    let d = stream.backoff(None, &p);
                    stream.set_state(
                        StreamState::Backoff { until: now + d },
                        self.mirrors,
                        &mut self.outputs,
                    );
                    warn!(stream = %id, "no free ingest ports; retrying later");
                }
            },
            StreamState::Stopping { kill_at: Some(k), generation, ports, remove, idle }
                if k <= now =>
            {
                stream.set_state(
                    StreamState::Stopping { ports, generation, kill_at: None, remove, idle },
                    self.mirrors,
                    &mut self.outputs,
                );
                warn!(stream = %id, generation, "process did not stop in time; killing");
                self.outputs.push_back(Output::KillProcess { stream: id.clone(), generation });
            }
            StreamState::Running {
                ports,
                process: Process::Terminating { generation, kill_at: Some(k) },
            } if k <= now => {
                stream.set_state(
                    StreamState::Running {
                        ports,
                        process: Process::Terminating { generation, kill_at: None },
                    },
                    self.mirrors,
                    &mut self.outputs,
                );
                self.outputs.push_back(Output::KillProcess { stream: id.clone(), generation });
            }
            StreamState::Running { ports, process: Process::Spawned { generation, .. } }
                if stream.deadline(&p).is_some_and(|d| d <= now) =>
            {
                warn!(stream = %id, generation, "no RTP from the process; restarting it");
                stream.set_state(
                    StreamState::Running {
                        ports,
                        process: Process::Terminating {
                            generation,
                            kill_at: Some(now + p.stop_grace),
                        },
                    },
                    self.mirrors,
                    &mut self.outputs,
                );
                self.outputs.push_back(Output::Event(Event::StreamStale { stream: id.clone() }));
                self.outputs.push_back(Output::StopProcess { stream: id.clone(), generation });
            }
            _ => {}
        }
        self.reschedule_stream(id, now);
    }

    pub(super) fn reschedule_stream(&mut self, id: &StreamId, now: Instant) {
        let p = &self.config.process;
        let Some(stream) = self.streams.get_mut(id) else {
            return;
        };
        let at = stream.deadline(p).map(|t| t.max(now));
        if stream.scheduled == at {
            return;
        }
        if let Some(old) = std::mem::replace(&mut stream.scheduled, at) {
            self.timers.remove(&(old, TimerKey::Stream(id.clone())));
        }
        if let Some(at) = at {
            self.timers.insert((at, TimerKey::Stream(id.clone())));
        }
    }
}
