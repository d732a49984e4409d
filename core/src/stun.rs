//! Learning the viewer socket's public address from STUN servers (RFC 5389 Binding), for a
//! server behind a NAT that forwards its UDP port (a home router's port forward, Docker's
//! `-p 3478:3478/udp`) but does not tell it the address viewers reach it at.
//!
//! With [`CoreConfig::stun_servers`](crate::CoreConfig::stun_servers) set, the core sends a
//! Binding request **from the viewer socket** (an [`Output::Transmit`](crate::Output::Transmit)
//! like any other), so the mapping the STUN server reports is the one of the socket viewers
//! send to; it recognises the response among the datagrams on that socket by the server's
//! address and the transaction id, before any viewer sees it. The address learned (the
//! XOR-MAPPED-ADDRESS, or MAPPED-ADDRESS from an RFC 3489 server) is advertised as one more
//! **host** candidate (str0m is ICE-lite here: it has no server-reflexive candidates of its own,
//! and it matches incoming checks against host candidates) in the answers of new sessions and
//! of ICE restarts; sessions already answered keep what they were given.
//!
//! It asks again every [`CoreConfig::stun_interval`](crate::CoreConfig::stun_interval) (the
//! NAT may give the socket another public address, a new lease, a reboot of the router), and
//! a transaction retransmits its request after 0.5, 1, 2 s and gives up 4 s after the last
//! ([`RTO`], [`MAX_SENDS`]); after a failure the next server (with several) is asked after a
//! backoff of 1 s doubling up to the interval. Until a first answer, viewers get the local
//! candidates alone (a warning says so).
//!
//! The parser ([`parse_response`]) reads only what it needs, never panics and refuses anything
//! that is not a well-formed Binding success or error response (fuzzed in
//! `whep_core::fuzzing::viewer_datagram`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

/// The magic cookie of RFC 5389 messages.
pub const MAGIC_COOKIE: u32 = 0x2112_a442;

/// First retransmission timeout of a Binding request (RFC 5389 recommends 500 ms); each
/// retransmission doubles it.
pub const RTO: Duration = Duration::from_millis(500);

/// Requests sent in one transaction before it fails (the first and three retransmissions: sent
/// at 0, 0.5, 1.5 and 3.5 s, failed at 7.5 s).
pub const MAX_SENDS: u32 = 4;

/// First wait after a failed transaction; doubles per failure in a row, up to the interval.
pub const RETRY_BACKOFF: Duration = Duration::from_secs(1);

const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const BINDING_ERROR: u16 = 0x0111;
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_ERROR_CODE: u16 = 0x0009;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;

/// A STUN transaction id (96 bits).
pub type TransactionId = [u8; 12];

/// A Binding request with transaction id `tid` and no attributes (20 bytes).
pub fn binding_request(tid: &TransactionId) -> Vec<u8> {
    let mut b = Vec::with_capacity(20);
    b.extend_from_slice(&BINDING_REQUEST.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    b.extend_from_slice(tid);
    b
}

/// A Binding success response for `tid` carrying `mapped` as XOR-MAPPED-ADDRESS, as a STUN
/// server sends it (for tests and simulations).
pub fn binding_success(tid: &TransactionId, mapped: SocketAddr) -> Vec<u8> {
    let mut value = vec![0u8];
    let port = mapped.port() ^ (MAGIC_COOKIE >> 16) as u16;
    match mapped.ip() {
        IpAddr::V4(ip) => {
            value.push(1);
            value.extend_from_slice(&port.to_be_bytes());
            value.extend_from_slice(&(u32::from(ip) ^ MAGIC_COOKIE).to_be_bytes());
        }
        IpAddr::V6(ip) => {
            value.push(2);
            value.extend_from_slice(&port.to_be_bytes());
            let key = xor_key(tid);
            value.extend(ip.octets().iter().zip(key).map(|(a, k)| a ^ k));
        }
    }
    let mut b = Vec::with_capacity(24 + value.len());
    b.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
    b.extend_from_slice(&((4 + value.len()) as u16).to_be_bytes());
    b.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    b.extend_from_slice(tid);
    b.extend_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    b.extend_from_slice(&(value.len() as u16).to_be_bytes());
    b.extend_from_slice(&value);
    b
}

/// What a Binding response says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindingResult {
    /// A success response: the address the server saw the request come from.
    Mapped(SocketAddr),
    /// An error response, with its code (class × 100 + number; 0 when it carries none).
    Error(u16),
}

/// A Binding response, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindingResponse {
    /// Its transaction id.
    pub tid: TransactionId,
    /// What it says.
    pub result: BindingResult,
}

/// Parses `b` as a STUN Binding success or error response (RFC 5389: the magic cookie, a
/// length that matches, attributes within it). A success needs an XOR-MAPPED-ADDRESS or a
/// MAPPED-ADDRESS (the first is preferred) of a usable address: not unspecified, multicast or
/// port 0. `None` for anything else.
pub fn parse_response(b: &[u8]) -> Option<BindingResponse> {
    let header = b.get(..20)?;
    let typ = u16::from_be_bytes([header[0], header[1]]);
    if typ != BINDING_SUCCESS && typ != BINDING_ERROR {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    if header[4..8] != MAGIC_COOKIE.to_be_bytes() || len % 4 != 0 || b.len() != 20 + len {
        return None;
    }
    let tid: TransactionId = header[8..20].try_into().ok()?;
    let mut xor_mapped = None;
    let mut mapped = None;
    let mut code = None;
    let mut attrs = &b[20..];
    while !attrs.is_empty() {
        let head = attrs.get(..4)?;
        let atype = u16::from_be_bytes([head[0], head[1]]);
        let alen = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let value = attrs.get(4..4 + alen)?;
        match atype {
            ATTR_XOR_MAPPED_ADDRESS if xor_mapped.is_none() => {
                xor_mapped = Some(address(value, Some(&tid))?);
            }
            ATTR_MAPPED_ADDRESS if mapped.is_none() => mapped = Some(address(value, None)?),
            ATTR_ERROR_CODE if code.is_none() => {
                let v = value.get(..4)?;
                code = Some(u16::from(v[2] & 0x07) * 100 + u16::from(v[3]));
            }
            _ => {}
        }
        // Attributes are padded to a multiple of 4 bytes.
        attrs = attrs.get((4 + alen).next_multiple_of(4)..).unwrap_or_default();
    }
    let result = if typ == BINDING_ERROR {
        BindingResult::Error(code.unwrap_or(0))
    } else {
        let addr = xor_mapped.or(mapped)?;
        let ip = addr.ip();
        if ip.is_unspecified() || ip.is_multicast() || addr.port() == 0 {
            return None;
        }
        BindingResult::Mapped(addr)
    };
    Some(BindingResponse { tid, result })
}

/// The IPv6 XOR key: the magic cookie, then the transaction id.
fn xor_key(tid: &TransactionId) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    key[4..].copy_from_slice(tid);
    key
}

/// A (XOR-)MAPPED-ADDRESS value; XORed when `tid` is given.
fn address(v: &[u8], tid: Option<&TransactionId>) -> Option<SocketAddr> {
    let head = v.get(..4)?;
    let mut port = u16::from_be_bytes([head[2], head[3]]);
    let key = tid.map(xor_key);
    if key.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    let ip = match head[1] {
        1 => {
            let raw: [u8; 4] = v.get(4..8)?.try_into().ok()?;
            let mut n = u32::from_be_bytes(raw);
            if key.is_some() {
                n ^= MAGIC_COOKIE;
            }
            IpAddr::V4(Ipv4Addr::from(n))
        }
        2 => {
            let mut raw: [u8; 16] = v.get(4..20)?.try_into().ok()?;
            if let Some(key) = key {
                raw.iter_mut().zip(key).for_each(|(a, k)| *a ^= k);
            }
            IpAddr::V6(Ipv6Addr::from(raw))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// One Binding transaction in flight.
#[derive(Debug, Clone, Copy)]
struct Pending {
    tid: TransactionId,
    server: SocketAddr,
    sends: u32,
}

/// What [`Discovery`] asks of the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum News {
    /// Send this Binding request to the server from the viewer socket.
    Send { to: SocketAddr, contents: Vec<u8> },
    /// A server answered with this address; `previous` was advertised before.
    Mapped { server: SocketAddr, mapped: SocketAddr, previous: Option<SocketAddr> },
    /// A transaction failed: no answer (`code` `None`) or an error response.
    Failed { server: SocketAddr, code: Option<u16>, in_row: u32 },
}

/// The discovery of the viewer socket's public address: one transaction at a time, to one
/// server at a time (the next one after a failure), again every interval.
#[derive(Debug)]
pub(crate) struct Discovery {
    servers: Vec<SocketAddr>,
    interval: Duration,
    /// The server of the next transaction (an index into `servers`).
    server: usize,
    pending: Option<Pending>,
    /// When [`on_timeout`](Self::on_timeout) has something to do.
    next: Instant,
    mapped: Option<SocketAddr>,
    failures_in_row: u32,
    /// The entry the core's timer table holds for it.
    pub(crate) scheduled: Option<Instant>,
}

impl Discovery {
    /// Discovery through `servers`, the first request at `now`; `None` without servers.
    pub(crate) fn new(servers: &[SocketAddr], interval: Duration, now: Instant) -> Option<Self> {
        if servers.is_empty() {
            return None;
        }
        Some(Self {
            servers: servers.to_vec(),
            interval: interval.max(Duration::from_secs(1)),
            server: 0,
            pending: None,
            next: now,
            mapped: None,
            failures_in_row: 0,
            scheduled: None,
        })
    }

    /// The address learned last, if any.
    pub(crate) fn mapped(&self) -> Option<SocketAddr> {
        self.mapped
    }

    /// When [`on_timeout`](Self::on_timeout) is next needed.
    pub(crate) fn deadline(&self) -> Instant {
        self.next
    }

    /// Whether `source` is one of the configured servers.
    pub(crate) fn is_server(&self, source: SocketAddr) -> bool {
        self.servers.contains(&source)
    }

    /// Starts a transaction, retransmits, or gives one up, as `now` says; `tid` draws a new
    /// transaction id.
    pub(crate) fn on_timeout(
        &mut self,
        now: Instant,
        tid: impl FnOnce() -> TransactionId,
    ) -> Option<News> {
        if now < self.next {
            return None;
        }
        match &mut self.pending {
            None => {
                let server = self.servers[self.server % self.servers.len()];
                let p = Pending { tid: tid(), server, sends: 1 };
                self.pending = Some(p);
                self.next = now + RTO;
                Some(News::Send { to: server, contents: binding_request(&p.tid) })
            }
            Some(p) if p.sends < MAX_SENDS => {
                p.sends += 1;
                self.next = now + RTO * (1 << (p.sends - 1));
                Some(News::Send { to: p.server, contents: binding_request(&p.tid) })
            }
            Some(p) => {
                let server = p.server;
                Some(self.fail(server, None, now))
            }
        }
    }

    /// A datagram from `source` on the viewer socket: `Some` when it answers the transaction
    /// in flight (it is then consumed), `None` for anything else (left to the viewers).
    pub(crate) fn on_datagram(
        &mut self,
        source: SocketAddr,
        contents: &[u8],
        now: Instant,
    ) -> Option<News> {
        let p = self.pending?;
        if p.server != source {
            return None;
        }
        let r = parse_response(contents).filter(|r| r.tid == p.tid)?;
        match r.result {
            BindingResult::Mapped(mapped) => {
                self.pending = None;
                self.failures_in_row = 0;
                self.next = now + self.interval;
                let previous = self.mapped.replace(mapped);
                Some(News::Mapped { server: source, mapped, previous })
            }
            BindingResult::Error(code) => Some(self.fail(source, Some(code), now)),
        }
    }

    fn fail(&mut self, server: SocketAddr, code: Option<u16>, now: Instant) -> News {
        self.pending = None;
        self.failures_in_row = self.failures_in_row.saturating_add(1);
        self.server = (self.server + 1) % self.servers.len();
        let doublings = self.failures_in_row.saturating_sub(1).min(16);
        let backoff = RETRY_BACKOFF.saturating_mul(1 << doublings).min(self.interval);
        self.next = now + backoff;
        News::Failed { server, code, in_row: self.failures_in_row }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TID: TransactionId = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    /// The RFC 5769 §2.2 sample IPv4 response (from a STUN server, with SOFTWARE,
    /// MESSAGE-INTEGRITY and FINGERPRINT): 192.0.2.1 port 32853.
    #[test]
    fn parses_rfc5769_ipv4_response() {
        let hex = "0101003c2112a442b7e7a701bc34d686fa87dfae8022000b\
                   7465737420766563746f7220002000080001a147e112a643\
                   000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7\
                   80280004c07d4c96";
        let b: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect();
        let r = parse_response(&b).expect("a binding success");
        assert_eq!(r.result, BindingResult::Mapped(addr("192.0.2.1:32853")));
        assert_eq!(r.tid, b[8..20]);
    }

    #[test]
    fn request_and_response_round_trip() {
        let req = binding_request(&TID);
        assert_eq!(req.len(), 20);
        assert_eq!(crate::path::binding_request_tid(&req), Some(TID));
        for mapped in ["203.0.113.7:3478", "[2001:db8::7]:40000"] {
            let r = parse_response(&binding_success(&TID, addr(mapped))).expect("parses");
            assert_eq!(
                r,
                BindingResponse { tid: TID, result: BindingResult::Mapped(addr(mapped)) }
            );
        }
    }

    #[test]
    fn refuses_malformed_and_other_messages() {
        let good = binding_success(&TID, addr("203.0.113.7:3478"));
        assert!(parse_response(&good).is_some());
        assert_eq!(parse_response(&binding_request(&TID)), None, "a request is no response");
        for cut in 0..good.len() {
            assert_eq!(parse_response(&good[..cut]), None, "cut at {cut}");
        }
        let mut longer = good.clone();
        longer.extend_from_slice(&[0; 4]);
        assert_eq!(parse_response(&longer), None, "length does not match");
        let mut cookie = good.clone();
        cookie[4] ^= 1;
        assert_eq!(parse_response(&cookie), None, "no magic cookie");
        let mut attr_len = good.clone();
        attr_len[23] = 200;
        assert_eq!(parse_response(&attr_len), None, "attribute beyond the message");
        let mut family = good.clone();
        family[25] = 3;
        assert_eq!(parse_response(&family), None, "unknown family");
        let zero = binding_success(&TID, addr("0.0.0.0:3478"));
        assert_eq!(parse_response(&zero), None, "unspecified address");
        // A success without an address.
        let mut bare = good[..20].to_vec();
        bare[2..4].copy_from_slice(&0u16.to_be_bytes());
        assert_eq!(parse_response(&bare), None);
        // An error response with ERROR-CODE 420.
        let mut err = bare.clone();
        err[..2].copy_from_slice(&BINDING_ERROR.to_be_bytes());
        err[2..4].copy_from_slice(&8u16.to_be_bytes());
        err.extend_from_slice(&[0x00, 0x09, 0x00, 0x04, 0, 0, 4, 20]);
        let r = parse_response(&err).expect("an error response");
        assert_eq!(r.result, BindingResult::Error(420));
    }

    #[test]
    fn mapped_address_attribute_is_the_fallback() {
        // MAPPED-ADDRESS (not XORed) 198.51.100.2:3478 and nothing else.
        let mut b = binding_success(&TID, addr("198.51.100.2:3478"));
        b[20..22].copy_from_slice(&ATTR_MAPPED_ADDRESS.to_be_bytes());
        b[26..28].copy_from_slice(&3478u16.to_be_bytes());
        b[28..32].copy_from_slice(&[198, 51, 100, 2]);
        let r = parse_response(&b).expect("parses");
        assert_eq!(r.result, BindingResult::Mapped(addr("198.51.100.2:3478")));
    }

    #[test]
    #[allow(clippy::disallowed_methods)]
    fn discovery_retransmits_fails_over_and_backs_off() {
        let t0 = Instant::now();
        let servers = [addr("198.51.100.1:3478"), addr("198.51.100.9:3478")];
        let mut d = Discovery::new(&servers, Duration::from_secs(30), t0).expect("servers");
        let mut n = 0u8;
        let mut tid = || {
            n += 1;
            [n; 12]
        };
        let sent = |news: Option<News>| match news {
            Some(News::Send { to, contents }) => (to, contents),
            other => panic!("expected a send, got {other:?}"),
        };
        let (to, first) = sent(d.on_timeout(t0, &mut tid));
        assert_eq!(to, servers[0]);
        // Retransmissions with the same id at 0.5, 1.5 and 3.5 s; the failure at 7.5 s.
        let mut at = t0;
        for wait in [500, 1000, 2000] {
            assert!(d.on_timeout(at + Duration::from_millis(wait - 1), &mut tid).is_none());
            at += Duration::from_millis(wait);
            assert_eq!(sent(d.on_timeout(at, &mut tid)), (servers[0], first.clone()));
        }
        at += Duration::from_millis(4000);
        assert_eq!(
            d.on_timeout(at, &mut tid),
            Some(News::Failed { server: servers[0], code: None, in_row: 1 })
        );
        // The next server, after 1 s.
        assert_eq!(d.deadline(), at + Duration::from_secs(1));
        at = d.deadline();
        let (to, second) = sent(d.on_timeout(at, &mut tid));
        assert_eq!(to, servers[1]);
        assert_ne!(first[8..20], second[8..20], "a new transaction id");
        let tid2: TransactionId = second[8..20].try_into().expect("12 bytes");
        // Not ours: another source, another id, garbage.
        let answer = binding_success(&tid2, addr("203.0.113.7:3478"));
        assert!(d.on_datagram(servers[0], &answer, at).is_none());
        assert!(
            d.on_datagram(servers[1], &binding_success(&[0; 12], addr("1.2.3.4:5")), at).is_none()
        );
        assert!(d.on_datagram(servers[1], b"garbage", at).is_none());
        assert_eq!(d.mapped(), None);
        assert_eq!(
            d.on_datagram(servers[1], &answer, at),
            Some(News::Mapped {
                server: servers[1],
                mapped: addr("203.0.113.7:3478"),
                previous: None
            })
        );
        assert!(d.on_datagram(servers[1], &answer, at).is_none(), "answered once");
        assert_eq!(d.deadline(), at + Duration::from_secs(30));
    }
}
