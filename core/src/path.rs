//! A viewer's media path: the address str0m sends its DTLS and SRTP to, and the two moves the
//! core makes on it that str0m's ICE-lite agent would otherwise wait for.
//!
//! An ICE-lite agent sends no checks of its own: str0m sends DTLS and media only on a pair the
//! viewer nominated (USE-CANDIDATE), and keeps that pair until its binding expires. Two cases
//! then cost the viewer time:
//!
//! - **Join.** Chromium sends its DTLS ClientHello on the pair it selected right after its
//!   first successful check, and USE-CANDIDATE only with a later check (about a second later
//!   at 150 ms RTT), so the ServerHello waited for that. Now the ClientHello, arriving from an
//!   address the viewer's authenticated checks came from, nominates that pair at once: the
//!   viewer has just shown it selected the pair by sending DTLS on it (RFC 8445 §7.3.1.5 lets
//!   a controlled agent use a pair once it is valid and nominated; a lite agent's pairs are
//!   valid when a check arrives on them, §6.1.3.4 / str0m).
//! - **NAT rebinding.** When the viewer's NAT gives it a new port, its checks and RTCP come
//!   from the new address while str0m goes on sending to the dead one (for ~15 s). Now a check
//!   from a new address with a transaction id not seen before, authenticated with the session's
//!   credentials, makes that address the candidate path; the next datagram from it (the
//!   viewer's own traffic: RTCP, a further check) moves the media there, if the current path
//!   has been silent for [`QUIET`]. The old address's candidates are invalidated in str0m, so
//!   a replay of an old check from there cannot move the path back, and an exact replay of any
//!   check (a transaction id already seen) never moves it anywhere.
//!
//! Both moves are a USE-CANDIDATE check that the core makes with the session's own ICE
//! credentials and hands to str0m as if the viewer had sent it; str0m's answer to it is not
//! sent.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::Candidate;
use str0m::ice::{StunMessage, TransId};

/// How long the current path must have been silent before media moves to another address the
/// viewer's checks came from: longer than the viewer's RTCP interval (1 s for video in
/// libwebrtc), so that a viewer checking a second path it keeps as a backup is not moved.
pub(crate) const QUIET: Duration = Duration::from_millis(1500);

/// Transaction ids of a viewer's recent checks kept to tell a replay from a new check.
const TIDS: usize = 8;

/// What the core knows of a viewer's media path.
#[derive(Debug, Default)]
pub(crate) struct Path {
    /// Where str0m sent DTLS or SRTP last: its nominated send address. `None` before the
    /// first nomination.
    pub(crate) sending_to: Option<SocketAddr>,
    /// When a datagram last came from `sending_to`.
    pub(crate) heard_at: Option<Instant>,
    /// Another address a new authenticated check came from: media moves there on its next
    /// datagram if the current path is quiet.
    pub(crate) candidate: Option<SocketAddr>,
    /// A nomination was made for the viewer's first DTLS in this ICE generation.
    pub(crate) nominated_for_dtls: bool,
    /// The transaction id of the core's own check, whose response str0m must not send.
    pub(crate) suppress: Option<[u8; 12]>,
    tids: [[u8; 12]; TIDS],
    next_tid: usize,
}

impl Path {
    /// Notes a check's transaction id; returns whether it is new (not a retransmission or a
    /// replay of a recent one).
    pub(crate) fn fresh_check(&mut self, tid: [u8; 12]) -> bool {
        if self.tids.contains(&tid) {
            return false;
        }
        self.tids[self.next_tid] = tid;
        self.next_tid = (self.next_tid + 1) % TIDS;
        true
    }

    /// Notes a datagram str0m sends; DTLS and RTP/RTCP go to the nominated address.
    pub(crate) fn on_transmit(&mut self, destination: SocketAddr, contents: &[u8]) {
        if matches!(contents.first(), Some(20..=63 | 128..=191)) {
            self.sending_to = Some(destination);
        }
    }

    /// Whether `contents` is the response to the core's own check (not to be sent).
    pub(crate) fn suppresses(&mut self, contents: &[u8]) -> bool {
        let hit = self.suppress.is_some_and(|t| contents.get(8..20) == Some(&t[..]));
        if hit {
            self.suppress = None;
        }
        hit
    }

    /// Notes a datagram from the viewer at `source`.
    pub(crate) fn heard(&mut self, source: SocketAddr, now: Instant) {
        if self.sending_to == Some(source) {
            self.heard_at = Some(now);
        }
    }

    /// Whether the current path has been silent for [`QUIET`] at `now`.
    pub(crate) fn quiet(&self, now: Instant) -> bool {
        self.heard_at.is_none_or(|t| now.saturating_duration_since(t) >= QUIET)
    }

    /// A new ICE generation: nominations start again.
    pub(crate) fn restart(&mut self) {
        self.nominated_for_dtls = false;
        self.candidate = None;
    }
}

/// A STUN binding request's transaction id.
pub(crate) fn binding_request_tid(b: &[u8]) -> Option<[u8; 12]> {
    const MAGIC: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
    if b.len() < 20 || b[0..2] != [0x00, 0x01] || b[4..8] != MAGIC {
        return None;
    }
    b[8..20].try_into().ok()
}

/// Whether `b` is a DTLS record (RFC 7983: first byte 20 to 63).
pub(crate) fn is_dtls(b: &[u8]) -> bool {
    matches!(b.first(), Some(20..=63))
}

/// A USE-CANDIDATE binding request as the viewer (controlling) would send it, signed with our
/// ICE password `local_pass` (`username` is `ours:theirs`), and its transaction id.
pub(crate) fn nomination(
    username: &str,
    local_pass: &str,
    sha1_hmac: impl Fn(&[u8], &[&[u8]]) -> [u8; 20],
) -> Option<(Vec<u8>, [u8; 12])> {
    // PRIORITY only matters for a peer-reflexive candidate str0m has not seen, and this check
    // comes from an address whose checks it has: the pair exists.
    let msg = StunMessage::binding_request(username, TransId::new(), true, 0, 1, true);
    let mut buf = vec![0u8; 512];
    let n = msg.to_bytes(Some(local_pass.as_bytes()), &mut buf, sha1_hmac).ok()?;
    buf.truncate(n);
    let tid = buf.get(8..20)?.try_into().ok()?;
    Some((buf, tid))
}

/// The remote candidates str0m may hold for `addr` and pair with: a host candidate from the
/// offer or the peer-reflexive one a check created (RFC 8445 §7.3.1.3). A server-reflexive or
/// relayed candidate there has a lower priority than the peer-reflexive candidate of a new
/// address, so a nomination moves past it without invalidating it.
pub(crate) fn candidates_at(addr: SocketAddr) -> impl Iterator<Item = Candidate> {
    ["host", "prflx"].into_iter().filter_map(move |typ| {
        let line = format!("candidate:0 1 udp 1 {} {} typ {typ}", addr.ip(), addr.port());
        Candidate::from_sdp_string(&line).ok()
    })
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests pick a real starting instant
mod tests {
    use super::*;

    fn hmac(_: &[u8], _: &[&[u8]]) -> [u8; 20] {
        [7; 20]
    }

    #[test]
    fn a_nomination_is_a_binding_request_with_use_candidate() {
        let (bytes, tid) = nomination("srv:cli", "pass", hmac).expect("built");
        assert_eq!(binding_request_tid(&bytes), Some(tid));
        let msg = StunMessage::parse(&bytes).expect("parses");
        assert!(msg.use_candidate());
        assert_eq!(msg.split_username(), Some(("srv", "cli")));
        assert!(msg.ice_controlling().is_some());
    }

    #[test]
    fn replays_are_not_fresh_and_old_ids_are_forgotten() {
        let mut p = Path::default();
        assert!(p.fresh_check([1; 12]));
        assert!(!p.fresh_check([1; 12]));
        for i in 2..=(TIDS as u8 + 1) {
            assert!(p.fresh_check([i; 12]));
        }
        assert!(p.fresh_check([1; 12]), "beyond the window");
    }

    #[test]
    fn the_send_address_is_where_dtls_and_media_go_and_quiet_counts_from_it() {
        let (a, b): (SocketAddr, SocketAddr) =
            ("192.0.2.1:1000".parse().expect("addr"), "192.0.2.1:2000".parse().expect("addr"));
        let mut p = Path::default();
        p.on_transmit(a, &[0x00, 0x01]);
        assert_eq!(p.sending_to, None, "STUN is not the media path");
        p.on_transmit(a, &[22, 254, 253]);
        assert_eq!(p.sending_to, Some(a));
        let t0 = Instant::now();
        assert!(p.quiet(t0));
        p.heard(b, t0);
        assert!(p.quiet(t0));
        p.heard(a, t0);
        assert!(!p.quiet(t0 + QUIET / 2));
        assert!(p.quiet(t0 + QUIET));
    }

    #[test]
    fn only_the_own_response_is_suppressed_once() {
        let mut p = Path { suppress: Some([9; 12]), ..Path::default() };
        let mut reply = vec![0x01, 0x01, 0, 0, 0x21, 0x12, 0xa4, 0x42];
        reply.extend_from_slice(&[8; 12]);
        assert!(!p.suppresses(&reply));
        reply[8..20].copy_from_slice(&[9; 12]);
        assert!(p.suppresses(&reply));
        assert!(!p.suppresses(&reply));
    }

    #[test]
    fn candidates_at_an_address_parse() {
        let addr: SocketAddr = "198.51.100.7:5000".parse().expect("addr");
        assert_eq!(candidates_at(addr).count(), 2);
    }
}
