//! Viewers (WHEP sessions, each a str0m peer): datagrams from them demultiplexed by address and
//! ICE username, their timers, connection news, the GOP-cache prime, and their removal.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::Input as RtcInput;
use str0m::net::{DatagramRecv, Protocol, Receive};
use tracing::{debug, info, warn};

use crate::ids::{SessionId, StreamId};
use crate::pacer::LivePacing;
use crate::path;
use crate::stream::StreamState;
use crate::viewer::Viewer;
use crate::viewer::{LOSS_CLEAN, Step, ViewerNews, ViewerState};
use crate::{CloseReason, Event, Output};

use super::{Core, TimerKey};

/// A paced viewer's video leaves at this multiple of its rendition's rate: room for the
/// rendition's own peaks and for catching up after a keyframe (at 1.5, a keyframe of a
/// 1.5 Mbit/s stream took over 180 ms, which Chromium counts as a freeze), unless the path's
/// measured ceiling says less ([`Ladder::pace_cap`](crate::viewer::Ladder::pace_cap)).
pub(super) const PACE_FACTOR: f64 = 2.0;

/// The least multiple of its rendition's rate a paced viewer's video leaves at, whatever the
/// path's ceiling: the rate is measured over the last GOP and the next may need more; at 1.25
/// a viewer's queue overflowed again and again after keyframes (sim).
pub(super) const PACE_FLOOR: f64 = 1.5;

/// How long a viewer must have played unpaced for its path to count as carrying the full rate
/// ([`PathBook::forget`](crate::pathbook::PathBook::forget)).
const CLEAN_PLAY: Duration = Duration::from_secs(10);

/// The address a viewer's media goes to (its nominated pair's remote end), or its first.
fn media_ip(viewer: &Viewer) -> Option<std::net::IpAddr> {
    viewer.path.sending_to.or_else(|| viewer.addrs.first().copied()).map(|a| a.ip())
}

/// Most video packets a viewer holds back (a paced prime's or live pacing's queue).
pub(super) fn max_held_packets(config: &crate::CoreConfig) -> usize {
    config.prime_pacing.unwrap_or_default().max_pending
}

impl Core {
    pub(super) fn viewer_timeout(&mut self, s: SessionId, now: Instant) {
        let grace = self.config.disconnect_grace;
        let inactivity = self.config.inactivity_timeout;
        let Some(viewer) = self.viewers.get_mut(&s) else {
            return;
        };
        let mut news = std::mem::take(&mut self.news);
        viewer.timeout(now, grace, &mut self.outputs, &mut news);
        let sent = viewer.pace(now, grace, &mut self.outputs, &mut news);
        self.metrics.packets_forwarded += sent.packets;
        self.metrics.bytes_forwarded += sent.bytes;
        let reason = match viewer.state {
            _ if viewer.dead => Some(CloseReason::RemoteClosed),
            ViewerState::Connecting { deadline } if deadline <= now => {
                if !viewer.checked {
                    self.metrics.unchecked_sessions += 1;
                    debug!(session = %s, "no ICE check arrived; closing the session");
                }
                Some(CloseReason::ConnectTimeout)
            }
            ViewerState::Disconnected { deadline } if deadline <= now => {
                Some(CloseReason::IceDisconnected)
            }
            ViewerState::Connected if viewer.last_rx + inactivity <= now => {
                Some(CloseReason::Inactive)
            }
            _ => None,
        };
        self.apply_news(s, &mut news, now);
        self.news = news;
        match reason {
            Some(r) => self.remove_viewer(s, r, now),
            None => self.reschedule_viewer(s, now),
        }
    }

    pub(super) fn apply_news(&mut self, s: SessionId, news: &mut Vec<ViewerNews>, now: Instant) {
        for n in news.drain(..) {
            let Some(viewer) = self.viewers.get(&s) else {
                continue;
            };
            let stream = viewer.stream.clone();
            match n {
                ViewerNews::Connected => {
                    // Where its checks came from (IPv4 or IPv6), for whoever reads the log.
                    let from = viewer.path.sending_to.or_else(|| viewer.addrs.first().copied());
                    let from = from.map(|a| a.to_string()).unwrap_or_default();
                    info!(session = %s, %stream, %from, "viewer connected");
                    self.release_unconnected(s);
                    self.metrics.viewers_connected += 1;
                    self.outputs.push_back(Output::Event(Event::ViewerConnected {
                        stream: stream.clone(),
                        session: s,
                    }));
                    self.start_on_known_path(s, &stream, now);
                    self.prime(s, &stream, now);
                }
                ViewerNews::KeyframeRequest => {
                    self.metrics.keyframe_requests += 1;
                    if let Some(interval) = self.config.cached_keyframe_interval
                        && self.config.gop_cache
                        && let Some(viewer) = self.viewers.get_mut(&s)
                    {
                        viewer.want_keyframe(now, interval);
                    }
                    self.outputs
                        .push_back(Output::Event(Event::KeyframeRequested { stream, session: s }));
                }
                ViewerNews::BacklogDropped => {
                    self.metrics.prime_backlogs_dropped += 1;
                    warn!(session = %s, %stream, "viewer fell behind its paced video; video restarts at the next keyframe");
                }
                ViewerNews::Resent { packets, bytes, dropped } => {
                    self.metrics.packets_retransmitted += packets;
                    self.metrics.bytes_retransmitted += bytes;
                    self.metrics.retransmissions_dropped += dropped;
                }
                ViewerNews::Report { lost, sent_rate } => {
                    self.climb(s, &stream, lost, sent_rate, now);
                }
                ViewerNews::Switched { to } => {
                    self.metrics.rendition_switches += 1;
                    debug!(session = %s, %stream, to, "viewer moved to another rendition");
                    self.repace(s, &stream, now);
                }
                ViewerNews::ResendsSuspended => {
                    self.metrics.retransmission_suspensions += 1;
                    debug!(session = %s, %stream, "viewer's retransmissions over its share: off for a second");
                }
            }
        }
    }

    /// Starts a viewer that just connected with the stream's cached GOP, so that its first
    /// picture does not wait for FFmpeg's next keyframe: the keyframe at once, the rest paced
    /// by [`CoreConfig::prime_pacing`] from the viewer's timer ([`Viewer::pace`]).
    pub(super) fn prime(&mut self, s: SessionId, stream: &StreamId, now: Instant) {
        let grace = self.config.disconnect_grace;
        let (Some(st), Some(viewer)) = (self.streams.get(stream), self.viewers.get_mut(&s)) else {
            return;
        };
        // Only a cache of the source that is sending now: after a stop or an FFmpeg exit the
        // cache may still hold the previous run's GOP until the new source's first packet
        // clears it.
        let live = matches!(st.state(), StreamState::Running { .. } | StreamState::Mirrored)
            && st
                .last_rtp
                .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1));
        let Some(gop) = st.gop(viewer.rendition) else {
            return;
        };
        if gop.packets.is_empty() || !live {
            return;
        }
        // News from these writes (a DTLS close, say) is picked up by the caller's next drain.
        let mut news = Vec::new();
        let pacing = self.config.prime_pacing.as_ref();
        let Some(sent) =
            viewer.prime(gop.primed(), pacing, now, grace, &mut self.outputs, &mut news)
        else {
            debug!(session = %s, %stream, cached = gop.packets.len(), "cached GOP not used");
            return;
        };
        self.metrics.packets_forwarded += sent.packets;
        self.metrics.bytes_forwarded += sent.bytes;
        self.metrics.gop_primes += 1;
        debug!(
            session = %s, %stream, packets = sent.packets, held = viewer.video.backlog(),
            "viewer primed with the cached GOP"
        );
        // The caller reschedules the viewer, now with the backlog's next release.
    }

    /// Starts a viewer that just connected on what an earlier session from its address found
    /// its path carries ([`CoreConfig::path_memory`](crate::CoreConfig::path_memory)): the
    /// highest rung of its codec at or below that session's, paced from the start, so that its
    /// GOP prime too leaves at that rung's pace rather than the configured 8 Mbit/s.
    fn start_on_known_path(&mut self, s: SessionId, stream: &StreamId, now: Instant) {
        let Some(memory) = self.config.path_memory else {
            return;
        };
        let (Some(st), Some(viewer)) = (self.streams.get(stream), self.viewers.get_mut(&s)) else {
            return;
        };
        let Some(known) = media_ip(viewer).and_then(|ip| self.paths.get(ip, memory, now)) else {
            return;
        };
        if viewer.video.started() {
            return; // video sent already (an ICE restart's reconnection)
        }
        let Some(codec) = st.videos.get(usize::from(viewer.rendition)).map(|v| v.codec) else {
            return;
        };
        let kbps = |k: usize| st.rendition_kbps(k).unwrap_or(u32::MAX);
        let rungs = || st.videos.iter().enumerate().filter(|(_, v)| v.codec == codec);
        let fits = rungs().filter(|(k, _)| kbps(*k) <= known.kbps).max_by_key(|(k, _)| kbps(*k));
        let Some(k) = fits.or_else(|| rungs().min_by_key(|(k, _)| kbps(*k))).map(|(k, _)| k) else {
            return;
        };
        let Ok(k) = u8::try_from(k) else { return };
        let from = viewer.rendition;
        viewer.rendition = k;
        viewer.ladder.settle(now);
        self.metrics.known_path_starts += 1;
        self.metrics.paced_viewers += 1;
        debug!(session = %s, %stream, from, to = k, known_kbps = known.kbps, "viewer starts on its address's known rung, paced");
        self.repace(s, stream, now);
    }

    /// Remembers what a leaving viewer's reports taught about its path, or that it played
    /// unpaced for a while (the path carries the full rate).
    fn learn_path(&mut self, viewer: &Viewer, now: Instant) {
        let Some(memory) = self.config.path_memory else {
            return;
        };
        let Some(ip) = media_ip(viewer) else {
            return;
        };
        if viewer.pacing.is_some() {
            let kbps = self.streams.get(&viewer.stream).map_or(u32::MAX, |st| {
                st.rendition_kbps(usize::from(viewer.rendition)).unwrap_or(u32::MAX)
            });
            self.paths.learn(ip, kbps, memory, now);
        } else if viewer.state == ViewerState::Connected
            && now.saturating_duration_since(viewer.joined) >= CLEAN_PLAY
        {
            self.paths.forget(ip);
        }
    }

    /// Paces a viewer's video once a receiver report shows loss, and moves it along its
    /// stream's renditions of its codec (by bitrate): one rung down after two lossy reports
    /// (one right after a move up), one up after ten clean seconds, longer after moves up that
    /// failed ([`Ladder::on_report`](crate::viewer::Ladder::on_report)); the switch itself
    /// happens at the target's keyframe.
    fn climb(
        &mut self,
        s: SessionId,
        stream: &StreamId,
        lost: f32,
        sent_rate: Option<u64>,
        now: Instant,
    ) {
        let Some(viewer) = self.viewers.get_mut(&s) else {
            return;
        };
        viewer.ladder.note_delivery(lost, sent_rate, now);
        if lost >= LOSS_CLEAN && viewer.pacing.is_none() {
            // Loss: from now on its video is spread at a pace its rendition needs, not sent in
            // bursts as it comes (a keyframe at once overflows a slow link's queue).
            self.metrics.paced_viewers += 1;
            debug!(session = %s, %stream, lost, "viewer's video paced from now on");
            self.repace(s, stream, now);
        }
        let (Some(st), Some(viewer)) = (self.streams.get(stream), self.viewers.get_mut(&s)) else {
            return;
        };
        let Some(step) = viewer.ladder.on_report(lost, now) else {
            return;
        };
        let Some(codec) = st.videos.get(usize::from(viewer.rendition)).map(|v| v.codec) else {
            return;
        };
        // A copied H264 has no bitrate set: it is the top rung.
        let kbps = |k: usize| st.rendition_kbps(k).unwrap_or(u32::MAX);
        let mine = kbps(usize::from(viewer.rendition));
        let rungs = st.videos.iter().enumerate().filter(|(_, v)| v.codec == codec);
        let next = match step {
            Step::Down => rungs.filter(|(k, _)| kbps(*k) < mine).max_by_key(|(k, _)| kbps(*k)),
            Step::Up => rungs.filter(|(k, _)| kbps(*k) > mine).min_by_key(|(k, _)| kbps(*k)),
        };
        let l = &mut viewer.ladder;
        // Up only to a rung the path's last measured ceiling leaves room for: on a link that
        // lost most of what it was sent, a move up would only lose again.
        // (Full video again after keyframes only is not a move up: always allowed.)
        if let (Step::Up, Some((k, _))) = (step, next)
            && !l.keyframes_only
            && let Some(rate) = st.rendition_rate(k)
            && l.ceiling_blocks(rate, now)
        {
            debug!(session = %s, %stream, to = k, rate, "move up held back by the path's ceiling");
            return;
        }
        match (step, next) {
            // Clean again after keyframes only: full video from the next keyframe first.
            (Step::Up, _) if l.keyframes_only => {
                l.resume_at_keyframe = true;
                debug!(session = %s, %stream, lost, "viewer clean again: full video at the next keyframe");
            }
            (_, Some((k, _))) => {
                debug!(session = %s, %stream, ?step, lost, to = k, "rendition switch asked");
                let Ok(k) = u8::try_from(k) else { return };
                l.target = Some(k);
                // Down: at once from the lower rung's cache, if it is of the running source;
                // up (and otherwise) at the target's next keyframe.
                let fresh = st
                    .last_rtp
                    .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1));
                if step == Step::Down
                    && fresh
                    && let Some(gop) = st.gop(k)
                {
                    let grace = self.config.disconnect_grace;
                    let mut news = Vec::new();
                    if let Some(sent) =
                        viewer.switch_with_cache(k, gop, now, grace, &mut self.outputs, &mut news)
                    {
                        self.metrics.packets_forwarded += sent.packets;
                        self.metrics.bytes_forwarded += sent.bytes;
                        self.metrics.rendition_switches += 1;
                        self.repace(s, stream, now);
                    }
                }
            }
            (Step::Down, None) if !l.keyframes_only => {
                l.keyframes_only = true;
                l.resume_at_keyframe = false;
                l.settle(now);
                // What is held back goes too: the next picture is a keyframe.
                viewer.restart_video();
                self.metrics.keyframes_only += 1;
                debug!(session = %s, %stream, lost, "no lower rung: keyframes only");
            }
            _ => {}
        }
    }

    /// Sets the pace of a viewer's video ([`LivePacing`]) to [`PACE_FACTOR`] times what its
    /// rendition sends, or less while the path's measured ceiling says so (not below
    /// [`PACE_FLOOR`] times); nothing while the rendition's rate is unknown (a copied stream
    /// before its first whole GOP).
    fn repace(&mut self, s: SessionId, stream: &StreamId, now: Instant) {
        let (Some(st), Some(viewer)) = (self.streams.get(stream), self.viewers.get_mut(&s)) else {
            return;
        };
        let Some(rate) = st.rendition_rate(usize::from(viewer.rendition)) else {
            return;
        };
        let mut pace = (rate as f64 * PACE_FACTOR) as u64;
        if let Some(cap) = viewer.ladder.pace_cap(now) {
            pace = pace.min(cap.max((rate as f64 * PACE_FLOOR) as u64));
        }
        viewer.pace_at(LivePacing { rate: pace }, max_held_packets(&self.config));
    }

    /// Answers a viewer's keyframe request ([`Viewer::want_keyframe`]) with the stream's cached
    /// GOP again, once the cache ends with a whole frame (the fan-out calls this after every
    /// batch it wrote to a viewer that wants one; a frame cut in two would be lost twice).
    pub(super) fn replay_gop(&mut self, s: SessionId, stream: &StreamId, now: Instant) {
        let grace = self.config.disconnect_grace;
        let (Some(st), Some(viewer)) = (self.streams.get(stream), self.viewers.get_mut(&s)) else {
            return;
        };
        let Some(gop) = st.gop(viewer.rendition) else {
            return;
        };
        if !gop.ends_a_frame() {
            return;
        }
        let mut news = Vec::new();
        let pacing = self.config.prime_pacing.as_ref();
        let Some(sent) = viewer.replay(gop, pacing, now, grace, &mut self.outputs, &mut news)
        else {
            return;
        };
        self.metrics.packets_forwarded += sent.packets;
        self.metrics.bytes_forwarded += sent.bytes;
        self.metrics.cached_keyframes += 1;
        debug!(
            session = %s, %stream, packets = sent.packets, held = viewer.video.backlog(),
            "keyframe request answered with the cached GOP"
        );
    }

    pub(super) fn on_datagram(
        &mut self,
        source: SocketAddr,
        destination: SocketAddr,
        contents: &[u8],
        now: Instant,
    ) {
        self.metrics.datagrams_in += 1;
        // A STUN server's answer to our own request (by its address and transaction id only:
        // anything else from there goes on as any datagram would).
        if self.stun.is_some() && self.on_stun_datagram(source, contents, now) {
            return;
        }
        let Ok(recv) = DatagramRecv::try_from(contents) else {
            self.metrics.datagrams_dropped += 1;
            return;
        };
        let input = RtcInput::Receive(
            now,
            Receive { proto: Protocol::Udp, source, destination, contents: recv },
        );
        let known = self.by_addr.get(&source).copied();
        // A STUN request names its session by ufrag, whatever the address: a new viewer may
        // come from the address of one that vanished and is not reaped yet (a port the OS or
        // a TURN relay handed out again). The address then belongs to the new session.
        let by_ufrag = stun_local_ufrag(contents)
            .and_then(|ufrag| self.by_ufrag.get(ufrag).copied())
            .filter(|s| self.viewers.get(s).is_some_and(|p| p.rtc.accepts(&input)));
        let Some(session) = by_ufrag.or(known) else {
            self.metrics.datagrams_dropped += 1;
            return;
        };
        let grace = self.config.disconnect_grace;
        let Some(viewer) = self.viewers.get_mut(&session) else {
            return;
        };
        if known != Some(session) {
            if !viewer.addrs.contains(&source) {
                if viewer.addrs.len() >= self.config.max_viewer_addresses {
                    // Each address would be a demultiplexing entry here and a candidate in
                    // str0m: a viewer with its credentials could spoof thousands.
                    self.metrics.addresses_refused += 1;
                    self.metrics.datagrams_dropped += 1;
                    return;
                }
                viewer.addrs.push(source);
            }
            self.by_addr.insert(source, session);
            if !viewer.checked {
                // The first check: the viewer is reachable, so it gets the whole connect
                // timeout for the rest (DTLS) instead of the first check's.
                viewer.checked = true;
                if let ViewerState::Connecting { deadline } = &mut viewer.state {
                    *deadline = viewer.joined + self.config.connect_timeout;
                }
            }
        }
        viewer.last_rx = now;
        // A check whose integrity str0m verified (routed by its username) with a transaction
        // id not seen before: the viewer's own, not a replay (see `crate::path`).
        let fresh_check = by_ufrag == Some(session)
            && path::binding_request_tid(contents).is_some_and(|t| viewer.path.fresh_check(t));
        let mut news = std::mem::take(&mut self.news);
        viewer.receive(session, input);
        viewer.drain(now, grace, &mut self.outputs, &mut news);
        let path = &mut viewer.path;
        if path.sending_to.is_none()
            && !path.nominated_for_dtls
            && path::is_dtls(contents)
            && viewer.addrs.contains(&source)
        {
            // The viewer sends DTLS on the pair it selected: answer there now, not once its
            // nomination comes (a second later at 150 ms RTT).
            path.nominated_for_dtls = true;
            if viewer.nominate(
                Protocol::Udp,
                source,
                destination,
                now,
                grace,
                &mut self.outputs,
                &mut news,
            ) {
                self.metrics.early_nominations += 1;
                debug!(%session, %source, "nominated the pair the viewer's DTLS came on");
            }
        } else if path.sending_to.is_some_and(|to| to != source) {
            if path.candidate == Some(source) && path.quiet(now) {
                // Its checks and now its own traffic come from here, and nothing from the
                // old path for a while: the NAT gave it a new port.
                let old = path.sending_to;
                if viewer.move_path(source, destination, now, grace, &mut self.outputs, &mut news) {
                    // What went to the dead address is lost: start the picture again from the
                    // GOP cache at once rather than after the viewer's NACKs and PLI.
                    if self.config.gop_cache && self.config.cached_keyframe_interval.is_some() {
                        viewer.keyframe_wanted = true;
                    }
                    self.metrics.path_moves += 1;
                    info!(%session, ?old, new = %source, "viewer's address changed; media follows");
                }
            } else if fresh_check {
                path.candidate = Some(source);
            }
        }
        viewer.path.heard(source, now);
        self.after_input(session, news, now);
    }

    /// What follows a viewer's datagram or TCP frame once str0m has it and `news` holds what
    /// it said: the news applied, then the viewer removed if it is dead, else its timer moved.
    pub(super) fn after_input(
        &mut self,
        session: SessionId,
        mut news: Vec<ViewerNews>,
        now: Instant,
    ) {
        let dead = self.viewers.get(&session).is_some_and(|v| v.dead);
        self.apply_news(session, &mut news, now);
        self.news = news;
        if dead {
            self.remove_viewer(session, CloseReason::RemoteClosed, now);
        } else {
            self.reschedule_viewer(session, now);
        }
    }

    pub(super) fn remove_viewer(&mut self, s: SessionId, reason: CloseReason, now: Instant) {
        self.release_unconnected(s);
        let Some(mut viewer) = self.viewers.remove(&s) else {
            return;
        };
        self.learn_path(&viewer, now);
        viewer.close(now, &mut self.outputs);
        if let Some(t) = viewer.scheduled {
            self.timers.remove(&(t, TimerKey::Viewer(s)));
        }
        for a in &viewer.addrs {
            if self.by_addr.get(a) == Some(&s) {
                self.by_addr.remove(a);
            }
        }
        for (_, conn) in &viewer.tcp {
            self.close_tcp(*conn);
        }
        if self.by_ufrag.get(&viewer.local_ufrag) == Some(&s) {
            self.by_ufrag.remove(&viewer.local_ufrag);
        }
        if let Some(stream) = self.streams.get_mut(&viewer.stream) {
            stream.viewers.remove(&s);
        }
        // The book first: on-demand streams count the viewers of every shard in it.
        if let Some(m) = &self.shard {
            m.set.release_seat(m.index, &viewer.stream);
        }
        self.viewer_went(&viewer.stream, now);
        if matches!(reason, CloseReason::IceDisconnected | CloseReason::ConnectTimeout) {
            self.metrics.ice_failures += 1;
        }
        self.metrics.viewers_left += 1;
        info!(session = %s, stream = %viewer.stream, ?reason, "viewer left");
        self.outputs.push_back(Output::Event(Event::ViewerLeft {
            stream: viewer.stream,
            session: s,
            reason,
            duration: now.saturating_duration_since(viewer.joined),
            packets_sent: viewer.sent.packets,
            bytes_sent: viewer.sent.bytes,
        }));
    }

    /// Stops counting `s` against its client's unconnected sessions (it connected, or goes).
    pub(super) fn release_unconnected(&mut self, s: SessionId) {
        let Some(client) = self.viewers.get_mut(&s).and_then(|p| p.unconnected_client.take())
        else {
            return;
        };
        match &self.shard {
            Some(m) => m.set.release_unconnected(client),
            None => self.unconnected.release(client),
        }
    }

    pub(super) fn reschedule_viewer(&mut self, s: SessionId, now: Instant) {
        let inactivity = self.config.inactivity_timeout;
        let Some(viewer) = self.viewers.get_mut(&s) else {
            return;
        };
        // str0m may ask for a timeout at `now` right after a write; the core's own
        // handle_timeout runs it, so never schedule in the past (no busy loop).
        let at = viewer.deadline(inactivity).max(now);
        if viewer.scheduled == Some(at) {
            return;
        }
        if let Some(old) = viewer.scheduled.replace(at) {
            self.timers.remove(&(old, TimerKey::Viewer(s)));
        }
        self.timers.insert((at, TimerKey::Viewer(s)));
    }
}

/// Our ICE username fragment from a STUN binding request's USERNAME (`ours:theirs`).
pub(super) fn stun_local_ufrag(b: &[u8]) -> Option<&str> {
    const MAGIC: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
    if b.len() < 20 || b[0] & 0xc0 != 0 || b.get(4..8)? != MAGIC {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([b[2], b[3]]));
    let attrs = b.get(20..20 + len)?;
    let mut i = 0;
    while i + 4 <= attrs.len() {
        let typ = u16::from_be_bytes([attrs[i], attrs[i + 1]]);
        let alen = usize::from(u16::from_be_bytes([attrs[i + 2], attrs[i + 3]]));
        let value = attrs.get(i + 4..i + 4 + alen)?;
        if typ == 0x0006 {
            let user = std::str::from_utf8(value).ok()?;
            return user.split(':').next();
        }
        i += 4 + alen.div_ceil(4) * 4;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stun_username_is_parsed() {
        let user = b"srvufrag:cli";
        let mut m = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
        m.extend_from_slice(&[7; 12]);
        // A PRIORITY attribute first, then USERNAME (12 bytes, no padding needed).
        let mut attrs = vec![0x00, 0x24, 0x00, 0x04, 1, 2, 3, 4, 0x00, 0x06, 0x00, 12];
        attrs.extend_from_slice(user);
        m[2..4].copy_from_slice(&(attrs.len() as u16).to_be_bytes());
        m.extend_from_slice(&attrs);
        assert_eq!(stun_local_ufrag(&m), Some("srvufrag"));
        assert_eq!(stun_local_ufrag(&m[..m.len() - 1]), None, "truncated");
        assert_eq!(stun_local_ufrag(&[0x80; 40]), None, "not STUN");
        for n in 0..m.len() {
            let _ = stun_local_ufrag(&m[..n]);
        }
    }
}
