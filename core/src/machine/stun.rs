//! The viewer socket's public address, learned from STUN servers ([`crate::stun`]): requests
//! sent from the viewer socket on the discovery's timer, responses taken out of the viewer
//! socket's datagrams, and the address learned added to the candidates of new answers.

use std::net::SocketAddr;
use std::time::Instant;

use tracing::{debug, info, warn};

use super::{Core, TimerKey};
use crate::stun::News;
use crate::{Output, Transmit, Transport};

impl Core {
    /// The viewer socket's public address as the STUN servers last reported it
    /// ([`CoreConfig::stun_servers`](crate::CoreConfig::stun_servers)), advertised to new
    /// sessions next to the host candidates; `None` before a first answer or without servers.
    pub fn stun_mapped(&self) -> Option<SocketAddr> {
        self.stun.as_ref().and_then(|d| d.mapped())
    }

    /// The UDP candidates a new answer (or an ICE restart) advertises: the host candidates,
    /// then the address learned from STUN when it is not one of them.
    pub(super) fn udp_candidates(&self) -> Vec<SocketAddr> {
        let mut c = self.config.host_candidates.clone();
        if let Some(m) = self.stun_mapped()
            && !c.contains(&m)
        {
            c.push(m);
        }
        c
    }

    pub(super) fn reschedule_stun(&mut self) {
        let Some(d) = &mut self.stun else { return };
        // Never in the past: a deadline already due runs at the next handle_timeout.
        let at = d.deadline().max(self.now);
        if d.scheduled == Some(at) {
            return;
        }
        if let Some(old) = d.scheduled.replace(at) {
            self.timers.remove(&(old, TimerKey::Stun));
        }
        self.timers.insert((at, TimerKey::Stun));
    }

    /// Ends discovery (at shutdown): no more requests, no timer.
    pub(super) fn stop_stun(&mut self) {
        if let Some(d) = self.stun.take()
            && let Some(t) = d.scheduled
        {
            self.timers.remove(&(t, TimerKey::Stun));
        }
    }

    pub(super) fn stun_timeout(&mut self, now: Instant) {
        let Some(d) = &mut self.stun else { return };
        d.scheduled = None;
        let rng = &mut self.rng;
        let news = d.on_timeout(now, || rng.tid());
        if let Some(news) = news {
            self.on_stun_news(news);
        }
        self.reschedule_stun();
    }

    /// Takes a datagram from a STUN server that answers the transaction in flight; `false`
    /// (the datagram untouched) for anything else.
    pub(super) fn on_stun_datagram(
        &mut self,
        source: SocketAddr,
        contents: &[u8],
        now: Instant,
    ) -> bool {
        let Some(d) = &mut self.stun else { return false };
        if !d.is_server(source) {
            return false;
        }
        let Some(news) = d.on_datagram(source, contents, now) else {
            return false;
        };
        self.on_stun_news(news);
        self.reschedule_stun();
        true
    }

    fn on_stun_news(&mut self, news: News) {
        match news {
            News::Send { to, contents } => {
                let source = self.config.candidate_for(to).unwrap_or(to);
                debug!(server = %to, "STUN binding request");
                self.outputs.push_back(Output::Transmit(Transmit {
                    transport: Transport::Udp,
                    source,
                    destination: to,
                    contents,
                }));
            }
            News::Mapped { server, mapped, previous: None } => {
                info!(
                    %server, %mapped,
                    "STUN: the viewer socket is reached at {mapped}; advertised to new viewers"
                );
            }
            News::Mapped { server, mapped, previous: Some(old) } if old != mapped => {
                self.metrics.stun_mapped_changes += 1;
                warn!(
                    %server, %old, %mapped,
                    "STUN: the viewer socket's public address changed from {old} to {mapped}; \
                     new viewers and ICE restarts get the new one"
                );
            }
            News::Mapped { server, mapped, .. } => {
                debug!(%server, %mapped, "STUN: public address unchanged");
            }
            News::Failed { server, code, in_row } => {
                self.metrics.stun_failures += 1;
                let why = match code {
                    Some(code) => format!("answered with error {code}"),
                    None => "did not answer".to_owned(),
                };
                if in_row > 1 {
                    debug!(%server, in_row, "STUN server {why}");
                } else if let Some(mapped) = self.stun_mapped() {
                    warn!(%server, %mapped, "STUN server {why}; still advertising {mapped}");
                } else {
                    warn!(
                        %server, candidates = ?self.config.host_candidates,
                        "STUN server {why}: viewers get the local candidates only until one \
                         answers (viewers behind the NAT's outside cannot reach those)"
                    );
                }
            }
        }
    }
}
