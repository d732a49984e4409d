//! The core's bookkeeping checked whole, after every step in tests and the simulation.

use crate::stream::{Stream, StreamState};
use crate::viewer::ViewerState;

use super::{Core, MAX_PENDING, TimerKey};

impl Core {
    /// Checks the bookkeeping and panics with a description when it is inconsistent. Used by
    /// tests and the simulation harness after every step; cheap enough for debugging in
    /// production, linear in viewers and streams.
    pub fn check_invariants(&self) {
        self.ports.check_invariants();
        assert!(self.pending.len() < MAX_PENDING, "pending packets beyond the bound");
        assert!(self.fanning.is_none(), "a fan-out left half done after the outputs were taken");
        let mut indexed = 0;
        for (id, s) in &self.streams {
            assert_eq!(&s.id, id, "stream keyed by its id");
            for v in &s.viewers {
                let p = self
                    .viewers
                    .get(v)
                    .unwrap_or_else(|| panic!("stream {id} lists unknown viewer {v}"));
                assert_eq!(&p.stream, id, "viewer {v} indexed under the wrong stream");
            }
            indexed += s.viewers.len();
            let cap = s.config.max_viewers.unwrap_or(self.config.max_viewers_per_stream);
            assert!(s.viewers.len() <= cap, "stream {id} over its cap");
            if let Some(m) = &self.shard {
                assert!(m.set.stream_viewers(id) >= s.viewers.len(), "stream {id} seats");
            }
            if matches!(s.state(), StreamState::Stopped | StreamState::Stopping { idle: false, .. })
            {
                assert!(s.viewers.is_empty(), "stream {id} is {} but has viewers", s.status());
            }
            if let Some(ports) = s.ports() {
                assert!(self.ports.is_allocated(ports), "stream {id} holds unallocated {ports}");
            }
            if let Some(t) = s.scheduled {
                assert!(
                    self.timers.contains(&(t, TimerKey::Stream(id.clone()))),
                    "stream {id} timer missing"
                );
            }
        }
        assert_eq!(indexed, self.viewers.len(), "every viewer is indexed under exactly one stream");
        assert!(self.viewers.len() <= self.config.max_viewers_total, "over the total cap");
        let held = self.streams.values().filter_map(Stream::ports).count();
        assert_eq!(held, self.ports.in_use(), "allocated pairs are exactly those streams hold");
        for (port, (id, _)) in &self.ingest {
            let s = self
                .streams
                .get(id)
                .unwrap_or_else(|| panic!("ingest port {port} of unknown stream {id}"));
            assert!(
                s.ports().is_some_and(|p| p.ingest(s.renditions()).any(|q| q == *port)),
                "ingest port {port} not held by {id}"
            );
        }
        for (a, s) in &self.by_addr {
            let p = self
                .viewers
                .get(s)
                .unwrap_or_else(|| panic!("address {a} maps to unknown session {s}"));
            assert!(p.addrs.contains(a), "address index of {s} out of sync");
        }
        for (u, s) in &self.by_ufrag {
            let p =
                self.viewers.get(s).unwrap_or_else(|| panic!("ufrag maps to unknown session {s}"));
            assert_eq!(&p.local_ufrag, u, "ufrag index of {s} out of sync");
        }
        for (s, p) in &self.viewers {
            assert_eq!(
                self.by_ufrag.get(&p.local_ufrag),
                Some(s),
                "viewer {s} not in the ufrag index"
            );
            let cap = super::viewers::max_held_packets(&self.config);
            assert!(
                p.video.backlog() <= cap,
                "viewer {s} holds {} packets back",
                p.video.backlog()
            );
            assert_eq!(p.audio.backlog(), 0, "audio is never held back");
            let t = p.scheduled.unwrap_or_else(|| panic!("viewer {s} has no timer"));
            assert!(self.timers.contains(&(t, TimerKey::Viewer(*s))), "viewer {s} timer missing");
            assert!(p.addrs.len() <= self.config.max_viewer_addresses, "viewer {s} addresses");
            assert!(
                p.remote_candidates <= self.config.max_remote_candidates,
                "viewer {s} candidates"
            );
            assert!(
                p.unconnected_client.is_none() || matches!(p.state, ViewerState::Connecting { .. }),
                "viewer {s} connected but still counted as connecting"
            );
        }
        if self.shard.is_none() {
            let counted = self.viewers.values().filter(|p| p.unconnected_client.is_some()).count();
            assert_eq!(self.unconnected.total(), counted, "unconnected sessions per client");
        }
        assert!(self.tcp.len() <= self.config.max_tcp_connections, "over the TCP connection cap");
        for (conn, c) in &self.tcp {
            match c.session {
                Some(s) => {
                    let v = self
                        .viewers
                        .get(&s)
                        .unwrap_or_else(|| panic!("{conn} bound to unknown viewer {s}"));
                    assert!(v.tcp.iter().any(|(_, k)| k == conn), "{conn} not listed by {s}");
                    assert!(c.deadline.is_none(), "bound {conn} still has a deadline");
                }
                None => {
                    let t = c.deadline.unwrap_or_else(|| panic!("unbound {conn} has no deadline"));
                    assert!(self.timers.contains(&(t, TimerKey::Tcp(*conn))), "{conn} timer");
                }
            }
        }
        for (s, v) in &self.viewers {
            assert!(v.tcp.len() <= self.config.max_viewer_addresses, "viewer {s} connections");
            for (_, conn) in &v.tcp {
                assert!(
                    self.tcp.get(conn).is_some_and(|c| c.session == Some(*s)),
                    "viewer {s} lists {conn} not bound to it"
                );
            }
        }
        let scheduled = self.viewers.values().filter(|p| p.scheduled.is_some()).count()
            + self.streams.values().filter(|s| s.scheduled.is_some()).count()
            + self.tcp.values().filter(|c| c.deadline.is_some()).count()
            + usize::from(self.stun.as_ref().is_some_and(|d| d.scheduled.is_some()))
            + self.auth.pending_len();
        for (id, deadline) in self.auth.deadlines() {
            assert!(self.timers.contains(&(deadline, TimerKey::Auth(id))), "{id} timer missing");
        }
        assert_eq!(scheduled, self.timers.len(), "no stray timer entries");
        if let Some(d) = &self.stun {
            let t = d.scheduled.expect("STUN discovery always has a deadline");
            assert!(self.timers.contains(&(t, TimerKey::Stun)), "STUN timer missing");
        }
    }
}
