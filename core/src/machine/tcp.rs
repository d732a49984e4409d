//! ICE over TCP (RFC 6544): the runtime's TCP connections, cut into RFC 4571 frames, each bound
//! to the viewer its first authenticated STUN check names, as a UDP source address is.
//!
//! A connection lives here from [`Input::TcpOpened`](crate::Input::TcpOpened) to
//! [`Input::TcpClosed`](crate::Input::TcpClosed) or the core's own
//! [`Output::CloseTcp`]. Until a check binds it, only STUN binding requests carrying a
//! viewer's credentials (verified by str0m, [`Rtc::accepts`](str0m::Rtc::accepts)) are
//! looked at, and it is closed after [`CoreConfig::tcp_bind_timeout`](crate::CoreConfig); at
//! most [`CoreConfig::max_tcp_connections`](crate::CoreConfig) are open at once.

use std::net::SocketAddr;
use std::time::Instant;

use str0m::Input as RtcInput;
use str0m::net::{DatagramRecv, Protocol, Receive};
use tracing::{debug, info};

use crate::Output;
use crate::ids::SessionId;
use crate::path;
use crate::tcp::{ConnId, FrameReader};
use crate::viewer::ViewerState;

use super::viewers::stun_local_ufrag;
use super::{Core, TimerKey};

/// One open TCP connection.
#[derive(Debug)]
pub(super) struct TcpConn {
    /// The viewer's end.
    pub(super) peer: SocketAddr,
    /// Ours, as advertised (one of the TCP candidates).
    pub(super) local: SocketAddr,
    pub(super) reader: FrameReader,
    /// The viewer it carries, once bound.
    pub(super) session: Option<SessionId>,
    /// Closed at this instant unless bound by then.
    pub(super) deadline: Option<Instant>,
}

/// How connected viewers get their media, as far as the server can tell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportCounts {
    /// Connected viewers whose DTLS and media go over UDP straight to them.
    pub udp: usize,
    /// Connected viewers whose DTLS and media go over a TCP connection (ICE-TCP).
    pub tcp: usize,
    /// Connected viewers whose media goes over UDP to the address of one of their relayed
    /// (TURN) candidates, from their offer or a PATCH. A relay the viewer did not announce
    /// (its checks only) counts as UDP.
    pub relayed: usize,
}

impl Core {
    /// Open TCP connections (ICE-TCP), bound to a viewer or not.
    pub fn tcp_connections(&self) -> usize {
        self.tcp.len()
    }

    /// Connected viewers by the transport their media takes.
    pub fn viewers_by_transport(&self) -> TransportCounts {
        let mut c = TransportCounts::default();
        for v in self.viewers.values().filter(|v| v.state == ViewerState::Connected) {
            super::sessions::count(&mut c, v);
        }
        c
    }

    pub(super) fn on_tcp_opened(
        &mut self,
        conn: ConnId,
        peer: SocketAddr,
        local: SocketAddr,
        now: Instant,
    ) {
        if self.tcp.contains_key(&conn) {
            return;
        }
        let full = self.tcp.len() >= self.config.max_tcp_connections;
        let Some(local) = self.config.tcp_candidate_for(local, peer).filter(|_| !full) else {
            self.metrics.tcp_refused += 1;
            debug!(%conn, %peer, full, "TCP connection refused");
            self.outputs.push_back(Output::CloseTcp { conn });
            return;
        };
        self.metrics.tcp_accepted += 1;
        let deadline = now + self.config.tcp_bind_timeout;
        self.tcp.insert(
            conn,
            TcpConn {
                peer,
                local,
                reader: FrameReader::default(),
                session: None,
                deadline: Some(deadline),
            },
        );
        self.timers.insert((deadline, TimerKey::Tcp(conn)));
    }

    pub(super) fn on_tcp_data(&mut self, conn: ConnId, contents: &[u8], now: Instant) {
        let Some(c) = self.tcp.get_mut(&conn) else {
            return;
        };
        let mut frames = std::mem::take(&mut self.tcp_frames);
        frames.clear();
        let fed = c.reader.feed(contents, |f| frames.push(f.to_vec()));
        for f in &frames {
            self.on_tcp_frame(conn, f, now);
        }
        self.tcp_frames = frames;
        if let Err(e) = fed {
            self.metrics.tcp_framing_errors += 1;
            debug!(%conn, error = %e, "not ICE-TCP framing; closing");
            self.close_tcp(conn);
        }
    }

    /// One RFC 4571 frame from `conn`: to its viewer, or a check that binds it to one.
    fn on_tcp_frame(&mut self, conn: ConnId, frame: &[u8], now: Instant) {
        self.metrics.tcp_frames_in += 1;
        let Some(c) = self.tcp.get(&conn) else {
            return;
        };
        let (peer, local, bound) = (c.peer, c.local, c.session);
        let Ok(recv) = DatagramRecv::try_from(frame) else {
            self.metrics.datagrams_dropped += 1;
            return;
        };
        let input = RtcInput::Receive(
            now,
            Receive { proto: Protocol::Tcp, source: peer, destination: local, contents: recv },
        );
        let session = match bound {
            Some(s) => s,
            None => {
                let by_ufrag = stun_local_ufrag(frame)
                    .and_then(|ufrag| self.by_ufrag.get(ufrag).copied())
                    .filter(|s| self.viewers.get(s).is_some_and(|p| p.rtc.accepts(&input)));
                let Some(s) = by_ufrag else {
                    self.metrics.datagrams_dropped += 1;
                    return;
                };
                if !self.bind_tcp(conn, s) {
                    return;
                }
                s
            }
        };
        let grace = self.config.disconnect_grace;
        let connect_timeout = self.config.connect_timeout;
        let Some(viewer) = self.viewers.get_mut(&session) else {
            return;
        };
        if !viewer.checked {
            viewer.checked = true;
            if let ViewerState::Connecting { deadline } = &mut viewer.state {
                *deadline = viewer.joined + connect_timeout;
            }
        }
        viewer.last_rx = now;
        let mut news = std::mem::take(&mut self.news);
        viewer.receive(session, input);
        viewer.drain(now, grace, &mut self.outputs, &mut news);
        let path = &mut viewer.path;
        if path.sending_to.is_none() && !path.nominated_for_dtls && path::is_dtls(frame) {
            // As over UDP (see `crate::path`): the viewer's DTLS on this connection shows it
            // selected the pair; answer there now, not after its USE-CANDIDATE.
            path.nominated_for_dtls = true;
            if viewer.nominate(Protocol::Tcp, peer, local, now, grace, &mut self.outputs, &mut news)
            {
                self.metrics.early_nominations += 1;
                debug!(%session, %conn, "nominated the TCP pair the viewer's DTLS came on");
            }
        }
        viewer.path.heard(peer, now);
        self.after_input(session, news, now);
    }

    /// Binds `conn` to viewer `s`; false (and the connection closed) when the viewer holds
    /// its most connections already.
    fn bind_tcp(&mut self, conn: ConnId, s: SessionId) -> bool {
        let max = self.config.max_viewer_addresses;
        let (Some(c), Some(viewer)) = (self.tcp.get_mut(&conn), self.viewers.get_mut(&s)) else {
            return false;
        };
        if viewer.tcp.len() >= max {
            self.metrics.addresses_refused += 1;
            self.close_tcp(conn);
            return false;
        }
        viewer.tcp.push((c.peer, conn));
        c.session = Some(s);
        if let Some(t) = c.deadline.take() {
            self.timers.remove(&(t, TimerKey::Tcp(conn)));
        }
        info!(session = %s, %conn, peer = %c.peer, "TCP connection bound to its viewer");
        true
    }

    pub(super) fn on_tcp_dropped(&mut self, conn: ConnId, frames: u64) {
        self.metrics.tcp_frames_dropped += frames;
        let Some(s) = self.tcp.get(&conn).and_then(|c| c.session) else {
            return;
        };
        let Some(viewer) = self.viewers.get_mut(&s) else {
            return;
        };
        // Some of its video is lost for good: the next picture it gets is the next live
        // keyframe. Not the cached GOP: a viewer that cannot take its stream would only have
        // it encrypted again and dropped, at the expense of the others.
        viewer.restart_video();
        debug!(session = %s, %conn, frames, "TCP send queue full: frames dropped, video restarts at a keyframe");
    }

    pub(super) fn on_tcp_closed(&mut self, conn: ConnId) {
        self.forget_tcp(conn);
    }

    pub(super) fn tcp_timeout(&mut self, conn: ConnId, now: Instant) {
        let Some(c) = self.tcp.get_mut(&conn) else {
            return;
        };
        if c.deadline.is_some_and(|t| t <= now) {
            c.deadline = None;
            self.metrics.tcp_unbound_closed += 1;
            debug!(%conn, "TCP connection named no viewer in time; closing");
            self.close_tcp(conn);
        }
    }

    /// Asks the runtime to close `conn` and forgets it.
    pub(super) fn close_tcp(&mut self, conn: ConnId) {
        if self.forget_tcp(conn) {
            self.outputs.push_back(Output::CloseTcp { conn });
        }
    }

    /// Forgets `conn` (unbinding it from its viewer); false if it was not known.
    fn forget_tcp(&mut self, conn: ConnId) -> bool {
        let Some(c) = self.tcp.remove(&conn) else {
            return false;
        };
        if let Some(t) = c.deadline {
            self.timers.remove(&(t, TimerKey::Tcp(conn)));
        }
        if let Some(v) = c.session.and_then(|s| self.viewers.get_mut(&s)) {
            v.tcp.retain(|(_, k)| *k != conn);
        }
        true
    }
}
