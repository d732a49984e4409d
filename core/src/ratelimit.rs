//! Token buckets for WHEP requests, per client address and for the whole server.
//!
//! A POST costs the most (it creates a WebRTC agent and claims a slot), so it has its own
//! buckets: one per client and one global. Every other request to a WHEP route (PATCH, DELETE,
//! GET, HEAD, OPTIONS) draws from a per-client bucket with a larger budget: a browser trickles
//! a burst of candidates right after its POST. A refused request gets 429 with `Retry-After`
//! set to the whole seconds until the bucket has a token again.
//!
//! The admin API's authentication failures draw on a per-client bucket of their own, at the
//! same rate as other WHEP requests ([`RateLimits::requests_per_client`]): a client whose
//! bucket is empty is refused (429) before its token is looked at, so guessing the admin token
//! is as slow as any other request, and an admin client that authenticates never spends it.
//!
//! Clients are keyed by IP address, IPv6 by its /64 (one host usually owns a whole /64). The
//! per-client table is bounded: buckets that have refilled carry no information and are
//! dropped when the table is full, and should it still be full (a flood from many addresses),
//! unknown clients share one overflow bucket. Memory is therefore bounded by
//! [`MAX_CLIENTS`] whatever arrives.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// Most clients tracked per bucket table.
pub const MAX_CLIENTS: usize = 4096;

/// A sustained rate and a burst: `per_second` tokens are added each second, up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests per second, sustained (at least 1).
    pub per_second: u32,
    /// Requests accepted at once after a quiet period (at least 1).
    pub burst: u32,
}

impl Rate {
    /// `per_second` with a burst of `burst`.
    pub const fn new(per_second: u32, burst: u32) -> Self {
        Self { per_second, burst }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.per_second, self.burst)
    }
}

/// Parses `RATE[:BURST]` (burst defaults to twice the rate); `0` or `off` means no limit.
impl FromStr for RateSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s == "0" || s.eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        let bad = || format!("rate limit {s:?}: expected RATE[:BURST] (requests per second), or 0");
        let (rate, burst) = match s.split_once(':') {
            Some((r, b)) => (r, Some(b)),
            None => (s, None),
        };
        let per_second: u32 = rate.trim().parse().map_err(|_| bad())?;
        let burst: u32 = match burst {
            Some(b) => b.trim().parse().map_err(|_| bad())?,
            None => per_second.saturating_mul(2),
        };
        if per_second == 0 || burst == 0 {
            return Err(bad());
        }
        Ok(Self(Some(Rate::new(per_second, burst))))
    }
}

/// A parsed `RATE[:BURST]` setting; `None` is "no limit".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSetting(pub Option<Rate>);

/// The limits [`CoreConfig::rate_limits`](crate::CoreConfig::rate_limits) sets. `None` disables one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    /// POSTs (new sessions) per client address.
    pub post_per_client: Option<Rate>,
    /// POSTs from all clients together.
    pub post_global: Option<Rate>,
    /// Other requests to WHEP routes (PATCH, DELETE, GET, HEAD, OPTIONS) per client address;
    /// also the budget of the admin API's authentication failures per client address.
    pub requests_per_client: Option<Rate>,
}

impl Default for RateLimits {
    /// 5 POSTs/s per client (burst 20), 100/s in total (burst 200), 50 other requests/s per
    /// client (burst 100).
    fn default() -> Self {
        Self {
            post_per_client: Some(Rate::new(5, 20)),
            post_global: Some(Rate::new(100, 200)),
            requests_per_client: Some(Rate::new(50, 100)),
        }
    }
}

impl RateLimits {
    /// No limits at all.
    pub const fn unlimited() -> Self {
        Self { post_per_client: None, post_global: None, requests_per_client: None }
    }
}

/// One bucket, in thousandths of a token so that refills need no floating point.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    milli: u64,
    at: Instant,
}

const TOKEN: u64 = 1000;

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Self {
        Self { milli: u64::from(rate.burst) * TOKEN, at: now }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed_ms =
            u64::try_from(now.saturating_duration_since(self.at).as_millis()).unwrap_or(u64::MAX);
        // per_second tokens per 1000 ms = per_second milli-tokens per ms.
        let add = elapsed_ms.saturating_mul(u64::from(rate.per_second));
        self.milli = self.milli.saturating_add(add).min(u64::from(rate.burst) * TOKEN);
        self.at = now;
    }

    fn is_full(&self, rate: Rate, now: Instant) -> bool {
        let mut b = *self;
        b.refill(rate, now);
        b.milli >= u64::from(rate.burst) * TOKEN
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        self.refill(rate, now);
        if self.milli >= TOKEN {
            self.milli -= TOKEN;
            Ok(())
        } else {
            let missing = TOKEN - self.milli;
            Err(Duration::from_millis(missing.div_ceil(u64::from(rate.per_second))))
        }
    }
}

/// Buckets keyed by client, bounded by [`MAX_CLIENTS`].
#[derive(Debug)]
struct PerClient {
    rate: Rate,
    clients: HashMap<IpAddr, Bucket>,
    overflow: Bucket,
}

impl PerClient {
    fn new(rate: Rate, now: Instant) -> Self {
        Self { rate, clients: HashMap::new(), overflow: Bucket::full(rate, now) }
    }

    /// Whether `client` has a token, without taking it (nor a place in the table).
    fn peek(&mut self, client: IpAddr, now: Instant) -> Result<(), Duration> {
        let rate = self.rate;
        let mut copy = match self.clients.get(&client) {
            Some(bucket) => *bucket,
            None if self.clients.len() < MAX_CLIENTS => return Ok(()),
            None => {
                self.clients.retain(|_, b| !b.is_full(rate, now));
                if self.clients.len() < MAX_CLIENTS {
                    return Ok(());
                }
                self.overflow
            }
        };
        copy.take(rate, now)
    }

    fn take(&mut self, client: IpAddr, now: Instant) -> Result<(), Duration> {
        let rate = self.rate;
        if !self.clients.contains_key(&client) && self.clients.len() >= MAX_CLIENTS {
            self.clients.retain(|_, b| !b.is_full(rate, now));
            if self.clients.len() >= MAX_CLIENTS {
                return self.overflow.take(rate, now);
            }
        }
        self.clients.entry(client).or_insert_with(|| Bucket::full(rate, now)).take(rate, now)
    }
}

/// What kind of request is being admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A POST that creates a session.
    Post,
    /// Any other request to a WHEP route.
    Other,
}

/// The limiter the core consults before handling a request to a WHEP route.
#[derive(Debug)]
pub(crate) struct Limiter {
    post_client: Option<PerClient>,
    post_global: Option<(Rate, Bucket)>,
    other_client: Option<PerClient>,
    /// Admin API authentication failures.
    admin_client: Option<PerClient>,
}

impl Limiter {
    pub(crate) fn new(limits: RateLimits, now: Instant) -> Self {
        Self {
            post_client: limits.post_per_client.map(|r| PerClient::new(r, now)),
            post_global: limits.post_global.map(|r| (r, Bucket::full(r, now))),
            other_client: limits.requests_per_client.map(|r| PerClient::new(r, now)),
            admin_client: limits.requests_per_client.map(|r| PerClient::new(r, now)),
        }
    }

    /// Admits a request or says how long the client should wait. A request without a known
    /// client address is subject to the global limit only.
    pub(crate) fn admit(
        &mut self,
        kind: Kind,
        client: Option<IpAddr>,
        now: Instant,
    ) -> Result<(), Duration> {
        let client = client.map(key);
        match kind {
            Kind::Post => {
                if let (Some(limiter), Some(ip)) = (&mut self.post_client, client) {
                    limiter.take(ip, now)?;
                }
                // A client over its own limit does not drain the global budget (checked
                // second); one within it may still be refused when everyone together is over.
                if let Some((rate, bucket)) = &mut self.post_global {
                    bucket.take(*rate, now)?;
                }
                Ok(())
            }
            Kind::Other => match (&mut self.other_client, client) {
                (Some(limiter), Some(ip)) => limiter.take(ip, now),
                _ => Ok(()),
            },
        }
    }

    /// Whether an admin API request from `client` may be looked at: `Err` with the wait while
    /// its authentication failures have used up its budget. Takes nothing; see
    /// [`admin_failed`](Self::admin_failed). A request without a known client address is not
    /// limited.
    pub(crate) fn admin_admit(
        &mut self,
        client: Option<IpAddr>,
        now: Instant,
    ) -> Result<(), Duration> {
        match (&mut self.admin_client, client) {
            (Some(limiter), Some(ip)) => limiter.peek(key(ip), now),
            _ => Ok(()),
        }
    }

    /// Spends a token of `client`'s admin budget on a failed authentication.
    pub(crate) fn admin_failed(&mut self, client: Option<IpAddr>, now: Instant) {
        if let (Some(limiter), Some(ip)) = (&mut self.admin_client, client) {
            // Refused or not, the failure is answered; the next request finds the bucket empty.
            let _ = limiter.take(key(ip), now);
        }
    }

    /// Clients tracked, for tests and metrics.
    pub(crate) fn tracked(&self) -> usize {
        self.post_client.as_ref().map_or(0, |l| l.clients.len())
            + self.other_client.as_ref().map_or(0, |l| l.clients.len())
            + self.admin_client.as_ref().map_or(0, |l| l.clients.len())
    }
}

/// Sessions not connected yet, per client (keyed as the rate limits are: IPv6 by its /64).
/// An entry lives only while one of its sessions does, so the viewer caps bound the table.
#[derive(Debug, Default)]
pub(crate) struct Unconnected(HashMap<IpAddr, usize>);

impl Unconnected {
    /// Counts one more session of `client`, unless it already has `cap`.
    pub(crate) fn take(&mut self, client: IpAddr, cap: usize) -> bool {
        if self.is_full(client, cap) {
            return false;
        }
        *self.0.entry(key(client)).or_default() += 1;
        true
    }

    /// Whether `client` holds `cap` sessions or more.
    pub(crate) fn is_full(&self, client: IpAddr, cap: usize) -> bool {
        self.0.get(&key(client)).is_some_and(|n| *n >= cap)
    }

    /// Gives back one session counted with [`take`](Self::take).
    pub(crate) fn release(&mut self, client: IpAddr) {
        let k = key(client);
        if let Some(n) = self.0.get_mut(&k) {
            *n -= 1;
            if *n == 0 {
                self.0.remove(&k);
            }
        }
    }

    /// Sessions counted, all clients together.
    pub(crate) fn total(&self) -> usize {
        self.0.values().sum()
    }
}

/// The bucket key of an address: IPv4 as is, IPv6 by its /64 (IPv4-mapped as IPv4). Also the
/// key of what the core learns of a client's path ([`crate::pathbook`]).
pub(crate) fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests pick a real starting instant
mod tests {
    use super::*;

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn parses_settings() {
        assert_eq!("5:20".parse(), Ok(RateSetting(Some(Rate::new(5, 20)))));
        assert_eq!("7".parse(), Ok(RateSetting(Some(Rate::new(7, 14)))));
        assert_eq!("0".parse(), Ok(RateSetting(None)));
        assert_eq!("off".parse(), Ok(RateSetting(None)));
        for bad in ["", "x", "5:", ":5", "5:0", "-1", "5:20:1"] {
            assert!(bad.parse::<RateSetting>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn burst_then_rate_then_retry_after() {
        let t0 = Instant::now();
        let limits =
            RateLimits { post_per_client: Some(Rate::new(2, 3)), ..RateLimits::unlimited() };
        let mut l = Limiter::new(limits, t0);
        for _ in 0..3 {
            assert_eq!(l.admit(Kind::Post, ip(1), t0), Ok(()));
        }
        // Empty: one token comes back after 500 ms.
        assert_eq!(l.admit(Kind::Post, ip(1), t0), Err(Duration::from_millis(500)));
        let t = t0 + Duration::from_millis(200);
        assert_eq!(l.admit(Kind::Post, ip(1), t), Err(Duration::from_millis(300)));
        // Another client is not affected; other requests are not limited here.
        assert_eq!(l.admit(Kind::Post, ip(2), t), Ok(()));
        assert_eq!(l.admit(Kind::Other, ip(1), t), Ok(()));
        let t = t0 + Duration::from_millis(500);
        assert_eq!(l.admit(Kind::Post, ip(1), t), Ok(()));
        assert!(l.admit(Kind::Post, ip(1), t).is_err());
        // Refills to the burst, not beyond.
        let t = t0 + Duration::from_secs(100);
        for _ in 0..3 {
            assert_eq!(l.admit(Kind::Post, ip(1), t), Ok(()));
        }
        assert!(l.admit(Kind::Post, ip(1), t).is_err());
    }

    #[test]
    fn global_limit_applies_to_everyone_and_to_unknown_clients() {
        let t0 = Instant::now();
        let limits = RateLimits { post_global: Some(Rate::new(1, 2)), ..RateLimits::unlimited() };
        let mut l = Limiter::new(limits, t0);
        assert_eq!(l.admit(Kind::Post, ip(1), t0), Ok(()));
        assert_eq!(l.admit(Kind::Post, None, t0), Ok(()));
        assert_eq!(l.admit(Kind::Post, ip(3), t0), Err(Duration::from_secs(1)));
    }

    #[test]
    fn a_client_over_its_limit_does_not_drain_the_global_budget() {
        let t0 = Instant::now();
        let limits = RateLimits {
            post_per_client: Some(Rate::new(1, 1)),
            post_global: Some(Rate::new(1, 2)),
            requests_per_client: None,
        };
        let mut l = Limiter::new(limits, t0);
        assert_eq!(l.admit(Kind::Post, ip(1), t0), Ok(()));
        for _ in 0..100 {
            assert!(l.admit(Kind::Post, ip(1), t0).is_err());
        }
        assert_eq!(l.admit(Kind::Post, ip(2), t0), Ok(()));
    }

    #[test]
    fn ipv6_clients_share_their_64() {
        let t0 = Instant::now();
        let limits =
            RateLimits { requests_per_client: Some(Rate::new(1, 1)), ..RateLimits::unlimited() };
        let mut l = Limiter::new(limits, t0);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap_or(IpAddr::from([0; 16]));
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap_or(IpAddr::from([0; 16]));
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap_or(IpAddr::from([0; 16]));
        assert_eq!(l.admit(Kind::Other, Some(a), t0), Ok(()));
        assert!(l.admit(Kind::Other, Some(b), t0).is_err());
        assert_eq!(l.admit(Kind::Other, Some(c), t0), Ok(()));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap_or(IpAddr::from([0; 16]));
        assert_eq!(l.admit(Kind::Other, ip(1), t0), Ok(()));
        assert!(l.admit(Kind::Other, Some(mapped), t0).is_err());
    }

    #[test]
    fn admin_failures_spend_a_budget_of_their_own() {
        let t0 = Instant::now();
        let limits =
            RateLimits { requests_per_client: Some(Rate::new(2, 3)), ..RateLimits::unlimited() };
        let mut l = Limiter::new(limits, t0);
        // Looking costs nothing; failures do.
        for _ in 0..10 {
            assert_eq!(l.admin_admit(ip(1), t0), Ok(()));
        }
        for _ in 0..3 {
            assert_eq!(l.admin_admit(ip(1), t0), Ok(()));
            l.admin_failed(ip(1), t0);
        }
        assert_eq!(l.admin_admit(ip(1), t0), Err(Duration::from_millis(500)));
        // WHEP requests and other clients are unaffected; no address, no limit.
        assert_eq!(l.admit(Kind::Other, ip(1), t0), Ok(()));
        assert_eq!(l.admin_admit(ip(2), t0), Ok(()));
        l.admin_failed(None, t0);
        assert_eq!(l.admin_admit(None, t0), Ok(()));
        // Refilled at the request rate.
        assert_eq!(l.admin_admit(ip(1), t0 + Duration::from_millis(500)), Ok(()));
        // Unlimited request rate: no admin limit either.
        let mut open = Limiter::new(RateLimits::unlimited(), t0);
        for _ in 0..100 {
            open.admin_failed(ip(1), t0);
        }
        assert_eq!(open.admin_admit(ip(1), t0), Ok(()));
    }

    #[test]
    fn the_table_is_bounded_and_overflow_clients_share_a_bucket() {
        let t0 = Instant::now();
        let limits =
            RateLimits { requests_per_client: Some(Rate::new(1, 1)), ..RateLimits::unlimited() };
        let mut l = Limiter::new(limits, t0);
        let addr = |i: u32| Some(IpAddr::from(i.to_be_bytes()));
        for i in 0..MAX_CLIENTS as u32 {
            assert_eq!(l.admit(Kind::Other, addr(i), t0), Ok(()));
        }
        assert_eq!(l.tracked(), MAX_CLIENTS);
        // Every tracked bucket is empty: newcomers share the overflow bucket.
        assert_eq!(l.admit(Kind::Other, addr(1_000_000), t0), Ok(()));
        assert!(l.admit(Kind::Other, addr(1_000_001), t0).is_err());
        assert_eq!(l.tracked(), MAX_CLIENTS);
        // Once they refill, they are forgotten and newcomers get their own bucket again.
        let t = t0 + Duration::from_secs(2);
        assert_eq!(l.admit(Kind::Other, addr(2_000_000), t), Ok(()));
        assert_eq!(l.tracked(), 1);
    }
}
