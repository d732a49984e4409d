//! An impairing UDP relay: one viewer on one side, the server on the other, each datagram put
//! through an emulated link per direction (the kernel here has `tbf` but no `netem`, so the
//! link is emulated in user space, on real sockets).
//!
//! The server advertises the relay's front address as its host candidate (`--candidate`), so a
//! viewer sends everything there; the relay forwards it to the server from its back socket, and
//! what the server sends to that socket back to the viewer from the front one.
//!
//! Per direction ([`Impairment`]), in the order a datagram meets them:
//!
//! 1. outages: everything is dropped inside a window `[at, at + len)` of the relay's clock;
//! 2. random loss (independent, a probability) and bursty loss ([`GilbertElliott`]);
//! 3. a rate cap: a token bucket of `burst_bytes` in front of a FIFO that holds at most
//!    `queue` worth of bytes at the rate; a datagram that would wait longer is dropped (drop
//!    tail), as at a real bottleneck with a small buffer;
//! 4. a one-way delay plus a random jitter, order kept unless `reorder` is set.
//!
//! And for the whole link, NAT rebinding ([`Link::rebind_at`], [`Relay::rebind`]): the back
//! socket toward the server is replaced by a new one on another port, so the server sees the
//! viewer's traffic come from a new address. What the server still sends to the old port is
//! counted ([`RelayStats::stale`]) and dropped, as a NAT whose old mapping is gone would.
//!
//! Randomness comes from a seeded xorshift generator: the same seed and the same arrival
//! times give the same fates ([`Shaper`] is the pure, testable part).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// A small seeded PRNG (xorshift64*), enough for loss and jitter draws.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is replaced by a fixed non-zero value).
    pub fn new(seed: u64) -> Self {
        // One splitmix64 step spreads small seeds over the state.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Self(if z == 0 { 0x2545_F491_4F6C_DD1D } else { z })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p` (clamped to `[0, 1]`).
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }
}

/// Bursty loss, the Gilbert–Elliott two-state model: per datagram the state may change (good to
/// bad with `to_bad`, bad to good with `to_good`), then the datagram is lost with the state's
/// loss probability. The mean loss is `to_bad / (to_bad + to_good) * loss_bad` (plus the good
/// state's share), the mean burst of the bad state `1 / to_good` datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GilbertElliott {
    /// Probability of going from good to bad, per datagram.
    pub to_bad: f64,
    /// Probability of going from bad to good, per datagram.
    pub to_good: f64,
    /// Loss probability in the bad state.
    pub loss_bad: f64,
    /// Loss probability in the good state (usually 0).
    pub loss_good: f64,
}

/// What one direction of the link does to datagrams; the default does nothing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Impairment {
    /// One-way delay.
    pub delay: Duration,
    /// Extra delay, uniform in `[0, jitter)`, per datagram.
    pub jitter: Duration,
    /// Let jitter reorder datagrams (by default a datagram never overtakes an earlier one).
    pub reorder: bool,
    /// Independent loss probability, `0..=1`.
    pub loss: f64,
    /// Bursty loss on top of `loss`.
    pub burst: Option<GilbertElliott>,
    /// Rate cap in bit/s (0: none).
    pub rate_bps: u64,
    /// The bottleneck's buffer, as the longest a datagram may wait in it (drop tail beyond).
    pub queue: Duration,
    /// The token bucket's depth: bytes that pass at once after an idle time.
    pub burst_bytes: usize,
    /// Windows `(at, len)` of the relay's clock in which every datagram is dropped.
    pub outages: Vec<(Duration, Duration)>,
}

impl Impairment {
    /// A link that does nothing.
    pub fn none() -> Self {
        Self::default()
    }

    /// With a one-way delay.
    pub fn delay(mut self, one_way: Duration) -> Self {
        self.delay = one_way;
        self
    }

    /// With a random extra delay in `[0, jitter)`.
    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    /// With independent loss, in percent.
    pub fn loss_percent(mut self, percent: f64) -> Self {
        self.loss = percent / 100.0;
        self
    }

    /// With bursty loss.
    pub fn bursty(mut self, ge: GilbertElliott) -> Self {
        self.burst = Some(ge);
        self
    }

    /// With a rate cap of `bps` bit/s and a buffer of `queue` at that rate (bucket: one
    /// 1500-byte datagram).
    pub fn rate(mut self, bps: u64, queue: Duration) -> Self {
        self.rate_bps = bps;
        self.queue = queue;
        self.burst_bytes = 1500;
        self
    }

    /// With an outage of `len` starting at `at` on the relay's clock.
    pub fn outage(mut self, at: Duration, len: Duration) -> Self {
        self.outages.push((at, len));
        self
    }
}

/// The whole emulated link: both directions, rebinding, and the seed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Link {
    /// Viewer to server.
    pub up: Impairment,
    /// Server to viewer.
    pub down: Impairment,
    /// Times on the relay's clock at which the back socket is replaced (NAT rebinding).
    pub rebind_at: Vec<Duration>,
    /// Seed of the random draws (each direction derives its own stream).
    pub seed: u64,
}

impl Link {
    /// The same impairment both ways.
    pub fn symmetric(imp: Impairment) -> Self {
        Self { up: imp.clone(), down: imp, ..Self::default() }
    }

    /// Only a delay: `one_way` each way.
    pub fn delay(one_way: Duration) -> Self {
        Self::symmetric(Impairment::none().delay(one_way))
    }

    /// With a rebinding at `at`.
    pub fn rebind_at(mut self, at: Duration) -> Self {
        self.rebind_at.push(at);
        self
    }

    /// With this seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
}

/// What happens to one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Delivered at this time.
    Deliver(Instant),
    /// Lost (random or bursty loss).
    Lost,
    /// Dropped at the bottleneck's full buffer.
    QueueFull,
    /// Dropped in an outage.
    Outage,
}

/// Counters of one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DirStats {
    /// Datagrams admitted (offered to the link).
    pub offered: u64,
    /// Datagrams sent on.
    pub forwarded: u64,
    /// Their bytes.
    pub forwarded_bytes: u64,
    /// Dropped by random or bursty loss.
    pub lost: u64,
    /// Dropped at the bottleneck's full buffer.
    pub queue_drops: u64,
    /// Dropped in an outage.
    pub outage_drops: u64,
}

impl DirStats {
    /// Every drop, whatever the cause.
    pub fn dropped(&self) -> u64 {
        self.lost + self.queue_drops + self.outage_drops
    }
}

/// One direction of the link as a pure function of arrival times: decides each datagram's
/// fate. The relay's thread drives one per direction; tests drive it with made-up times.
#[derive(Debug, Clone)]
pub struct Shaper {
    cfg: Impairment,
    rng: Rng,
    bad: bool,
    /// The token bucket's theoretical arrival time (GCRA).
    tat: Option<Instant>,
    last_due: Option<Instant>,
    /// Counters so far (`forwarded` is the caller's to count).
    pub stats: DirStats,
}

impl Shaper {
    /// A direction with this impairment and seed.
    pub fn new(cfg: Impairment, seed: u64) -> Self {
        Self {
            cfg,
            rng: Rng::new(seed),
            bad: false,
            tat: None,
            last_due: None,
            stats: DirStats::default(),
        }
    }

    fn transmission(&self, bytes: usize) -> Duration {
        let nanos = (bytes as u128 * 8 * 1_000_000_000) / u128::from(self.cfg.rate_bps.max(1));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// The fate of a datagram of `len` bytes arriving at `now`, `elapsed` after the link's
    /// start.
    pub fn admit(&mut self, now: Instant, elapsed: Duration, len: usize) -> Fate {
        self.stats.offered += 1;
        if self.cfg.outages.iter().any(|&(at, len)| elapsed >= at && elapsed < at + len) {
            self.stats.outage_drops += 1;
            return Fate::Outage;
        }
        let mut lost = false;
        if let Some(ge) = self.cfg.burst {
            let flip = if self.bad { ge.to_good } else { ge.to_bad };
            if self.rng.chance(flip) {
                self.bad = !self.bad;
            }
            lost = self.rng.chance(if self.bad { ge.loss_bad } else { ge.loss_good });
        }
        // Drawn even when already lost, so that one knob does not shift the other's draws.
        lost |= self.rng.chance(self.cfg.loss);
        if lost {
            self.stats.lost += 1;
            return Fate::Lost;
        }
        let mut depart = now;
        if self.cfg.rate_bps > 0 {
            // GCRA: a token bucket of `burst_bytes` at `rate_bps`; the datagram leaves when the
            // bucket holds its tokens; if that is further away than the buffer holds, drop it.
            let tat = self.tat.map_or(now, |t| t.max(now));
            let tau = self.transmission(self.cfg.burst_bytes);
            depart = tat.checked_sub(tau).map_or(now, |t| t.max(now));
            if depart - now > self.cfg.queue {
                self.stats.queue_drops += 1;
                return Fate::QueueFull;
            }
            self.tat = Some(tat + self.transmission(len));
        }
        let jitter = self.cfg.jitter.mul_f64(self.rng.unit());
        let mut due = depart + self.cfg.delay + jitter;
        if !self.cfg.reorder {
            due = self.last_due.map_or(due, |last| last.max(due));
        }
        self.last_due = Some(due);
        Fate::Deliver(due)
    }
}

/// Everything the relay counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Viewer to server.
    pub up: DirStats,
    /// Server to viewer.
    pub down: DirStats,
    /// Rebindings done.
    pub rebinds: u64,
    /// When the last rebinding happened.
    pub rebound_at: Option<Instant>,
    /// The back socket's ports, oldest first (one more per rebinding).
    pub back_ports: Vec<u16>,
    /// Datagrams the server sent to a back socket replaced by a rebinding (dropped).
    pub stale: u64,
    /// When the last such datagram came.
    pub last_stale_at: Option<Instant>,
    /// When the first datagram from the client came (a browser's first ICE check, just after
    /// it has the answer).
    pub first_up_at: Option<Instant>,
    /// Datagrams from other addresses than [`Relay::accept_only`]'s (dropped).
    pub foreign: u64,
    /// RTP datagrams delivered to the viewer per payload type (the RTP header is clear text
    /// under SRTP): e.g. how many retransmissions (the RTX type) reached it.
    pub down_pts: BTreeMap<u8, u64>,
}

/// The payload type of an RTP datagram (not RTCP, STUN or DTLS), from its clear-text header.
pub fn rtp_payload_type(data: &[u8]) -> Option<u8> {
    let (&b0, &b1) = (data.first()?, data.get(1)?);
    // Version 2, and not RTCP (types 192-223 with the marker bit: 200-206 and friends).
    (b0 >> 6 == 2 && !(192..=223).contains(&b1) && data.len() >= 12).then_some(b1 & 0x7f)
}

/// A datagram held by the link: (due, arrival number, to the server?, bytes).
type Held = (Instant, u64, bool, Vec<u8>);

#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    rebind: AtomicBool,
    stats: Mutex<RelayStats>,
}

/// A relay between one client and one server through an emulated [`Link`]; stops when dropped.
#[derive(Debug)]
pub struct Relay {
    front: UdpSocket,
    only: Option<IpAddr>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Binds the front socket on `ip` (an ephemeral port); give its [`front`](Self::front)
    /// address to the server as its candidate before starting it.
    pub fn bind(ip: IpAddr) -> io::Result<Self> {
        Ok(Self {
            front: UdpSocket::bind((ip, 0))?,
            only: None,
            shared: Arc::new(Shared::default()),
            thread: None,
        })
    }

    /// Binds the front socket on 127.0.0.1.
    pub fn bind_loopback() -> io::Result<Self> {
        Self::bind(IpAddr::V4(Ipv4Addr::LOCALHOST))
    }

    /// The address clients send to.
    pub fn front(&self) -> SocketAddr {
        self.front.local_addr().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Datagrams forwarded so far, both directions.
    pub fn forwarded(&self) -> u64 {
        let s = self.stats();
        s.up.forwarded + s.down.forwarded
    }

    /// The counters so far.
    pub fn stats(&self) -> RelayStats {
        self.shared.stats.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Relays only what comes from `ip` (the viewer): datagrams from elsewhere to the front
    /// are counted ([`RelayStats::foreign`]) and dropped. Call before [`start`](Self::start).
    pub fn accept_only(&mut self, ip: IpAddr) {
        self.only = Some(ip);
    }

    /// Replaces the back socket now (NAT rebinding), as [`Link::rebind_at`] does at a time.
    pub fn rebind(&self) {
        self.shared.rebind.store(true, Ordering::Relaxed);
    }

    /// Starts relaying to `server` through `link`; the link's clock starts now.
    pub fn start(&mut self, server: SocketAddr, link: Link) -> io::Result<()> {
        let front = self.front.try_clone()?;
        front.set_nonblocking(true)?;
        // Toward the server: loopback when it is there, else any address.
        let back_ip = if server.ip().is_loopback() {
            server.ip()
        } else if server.is_ipv4() {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        };
        let bind_back = move || -> io::Result<UdpSocket> {
            let s = UdpSocket::bind((back_ip, 0))?;
            s.set_nonblocking(true)?;
            Ok(s)
        };
        let mut back = bind_back()?;
        let shared = Arc::clone(&self.shared);
        let only = self.only;
        {
            let mut st = shared.stats.lock().unwrap_or_else(PoisonError::into_inner);
            st.back_ports.push(back.local_addr()?.port());
        }
        self.thread = Some(thread::spawn(move || {
            let seed = link.seed;
            let mut up = Shaper::new(link.up, seed ^ 0x5555_0000_0000_0001);
            let mut down = Shaper::new(link.down, seed ^ 0xAAAA_0000_0000_0002);
            let mut rebinds = link.rebind_at;
            rebinds.sort();
            let mut next_rebind = 0;
            let mut old_backs: Vec<UdpSocket> = Vec::new();
            let (mut up_sent, mut down_sent) = ((0u64, 0u64), (0u64, 0u64));
            let (mut stale, mut foreign) = (0u64, 0u64);
            let mut first_up_at = None;
            let mut down_pts: BTreeMap<u8, u64> = BTreeMap::new();
            let mut queue: BinaryHeap<Reverse<Held>> = BinaryHeap::new();
            let mut seq = 0u64;
            let mut client: Option<SocketAddr> = None;
            let mut buf = vec![0u8; 65_536];
            let start = Instant::now();
            while !shared.stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                let elapsed = now - start;
                let timed = rebinds.get(next_rebind).is_some_and(|&at| elapsed >= at);
                if timed || shared.rebind.swap(false, Ordering::Relaxed) {
                    next_rebind += usize::from(timed);
                    if let Ok(fresh) = bind_back() {
                        let port = fresh.local_addr().map_or(0, |a| a.port());
                        old_backs.push(std::mem::replace(&mut back, fresh));
                        let mut st = shared.stats.lock().unwrap_or_else(PoisonError::into_inner);
                        st.rebinds += 1;
                        st.rebound_at = Some(now);
                        st.back_ports.push(port);
                    }
                }
                while let Ok((n, from)) = front.recv_from(&mut buf) {
                    if only.is_some_and(|ip| ip != from.ip()) {
                        foreign += 1;
                        continue;
                    }
                    client = Some(from);
                    first_up_at.get_or_insert(now);
                    if let Fate::Deliver(due) = up.admit(now, elapsed, n) {
                        queue.push(Reverse((due, seq, true, buf[..n].to_vec())));
                        seq += 1;
                    }
                }
                while let Ok((n, _)) = back.recv_from(&mut buf) {
                    if let Fate::Deliver(due) = down.admit(now, elapsed, n) {
                        queue.push(Reverse((due, seq, false, buf[..n].to_vec())));
                        seq += 1;
                    }
                }
                let mut stale_now = false;
                for old in &old_backs {
                    while old.recv_from(&mut buf).is_ok() {
                        stale += 1;
                        stale_now = true;
                    }
                }
                while queue.peek().is_some_and(|Reverse((due, ..))| *due <= now) {
                    let Some(Reverse((_, _, to_server, data))) = queue.pop() else { break };
                    let (sent, counter) = match (to_server, client) {
                        (true, _) => (back.send_to(&data, server), &mut up_sent),
                        (false, Some(c)) => (front.send_to(&data, c), &mut down_sent),
                        (false, None) => continue,
                    };
                    if sent.is_ok() {
                        counter.0 += 1;
                        counter.1 += data.len() as u64;
                        if let (false, Some(pt)) = (to_server, rtp_payload_type(&data)) {
                            *down_pts.entry(pt).or_default() += 1;
                        }
                    }
                }
                {
                    let mut st = shared.stats.lock().unwrap_or_else(PoisonError::into_inner);
                    st.up =
                        DirStats { forwarded: up_sent.0, forwarded_bytes: up_sent.1, ..up.stats };
                    st.down = DirStats {
                        forwarded: down_sent.0,
                        forwarded_bytes: down_sent.1,
                        ..down.stats
                    };
                    st.stale = stale;
                    st.foreign = foreign;
                    st.first_up_at = first_up_at;
                    st.down_pts.clone_from(&down_pts);
                    if stale_now {
                        st.last_stale_at = Some(now);
                    }
                }
                let idle = queue.peek().map_or(Duration::from_millis(1), |Reverse((due, ..))| {
                    due.saturating_duration_since(Instant::now()).min(Duration::from_millis(1))
                });
                if !idle.is_zero() {
                    thread::sleep(idle);
                }
            }
        }));
        Ok(())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Feeds `n` datagrams of `len` bytes, one every `gap`, and returns the fates.
    fn feed(shaper: &mut Shaper, n: u64, gap: Duration, len: usize) -> Vec<(Instant, Fate)> {
        let t0 = Instant::now();
        (0..n)
            .map(|i| {
                let at = gap * u32::try_from(i).expect("small");
                (t0 + at, shaper.admit(t0 + at, at, len))
            })
            .collect()
    }

    #[test]
    fn random_loss_rate_is_within_bounds() {
        let mut s = Shaper::new(Impairment::none().loss_percent(5.0), 7);
        let fates = feed(&mut s, 100_000, MS, 1200);
        let lost = fates.iter().filter(|(_, f)| *f == Fate::Lost).count();
        // 5 % of 100 000 is 5000; the standard deviation is about 69.
        assert!((4700..=5300).contains(&lost), "{lost} lost");
        assert_eq!(s.stats.lost, lost as u64);
        assert_eq!(s.stats.offered, 100_000);
    }

    #[test]
    fn same_seed_same_fates() {
        let cfg = Impairment::none().loss_percent(10.0).jitter(20 * MS);
        let t0 = Instant::now();
        let run = |seed| {
            let mut s = Shaper::new(cfg.clone(), seed);
            (0..1000u32).map(|i| s.admit(t0 + MS * i, MS * i, 100)).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn gilbert_elliott_losses_come_in_bursts() {
        let ge = GilbertElliott { to_bad: 0.01, to_good: 0.2, loss_bad: 0.8, loss_good: 0.0 };
        let mut s = Shaper::new(Impairment::none().bursty(ge), 3);
        let fates = feed(&mut s, 200_000, MS, 1200);
        let lost: Vec<bool> = fates.iter().map(|(_, f)| *f == Fate::Lost).collect();
        let n_lost = lost.iter().filter(|&&l| l).count() as f64;
        // Stationary share of the bad state: 0.01 / 0.21 = 4.76 %, times 0.8 = 3.8 %.
        let rate = n_lost / lost.len() as f64;
        assert!((0.030..=0.046).contains(&rate), "loss rate {rate}");
        // Mean run of consecutive losses: independent 3.8 % loss gives 1.04; bursts give more.
        let runs = lost.windows(2).filter(|w| w[1] && !w[0]).count() as f64;
        let mean_run = n_lost / runs;
        assert!(mean_run > 2.0, "mean loss run {mean_run}");
    }

    #[test]
    fn rate_cap_limits_throughput_and_drops_tail() {
        // 2 Mbit/s offered (1000 bytes every 4 ms) into a 1 Mbit/s cap with a 100 ms buffer.
        let mut s = Shaper::new(Impairment::none().rate(1_000_000, 100 * MS), 1);
        let fates = feed(&mut s, 2500, 4 * MS, 1000);
        let delivered: Vec<(Instant, Instant)> = fates
            .iter()
            .filter_map(|&(at, f)| match f {
                Fate::Deliver(due) => Some((at, due)),
                _ => None,
            })
            .collect();
        // 10 s at 1 Mbit/s is 1250 datagrams of 1000 bytes, plus what the buffer holds.
        assert!((1240..=1275).contains(&delivered.len()), "{} delivered", delivered.len());
        assert_eq!(s.stats.queue_drops as usize, 2500 - delivered.len());
        // Nobody waits longer than the buffer, and the departures are spaced at the rate.
        assert!(delivered.iter().all(|(at, due)| *due - *at <= 100 * MS));
        let (first, last) = (delivered[0].1, delivered[delivered.len() - 1].1);
        let bits = (delivered.len() - 1) as f64 * 8000.0;
        let rate = bits / (last - first).as_secs_f64();
        assert!((950_000.0..=1_050_000.0).contains(&rate), "{rate} bit/s");
    }

    #[test]
    fn under_the_cap_nothing_waits() {
        let mut s = Shaper::new(Impairment::none().rate(3_000_000, 50 * MS), 1);
        let fates = feed(&mut s, 1000, 10 * MS, 1200); // 0.96 Mbit/s
        assert!(fates.iter().all(|(at, f)| *f == Fate::Deliver(*at)), "{fates:?}");
    }

    #[test]
    fn outage_drops_its_window_only() {
        let mut s = Shaper::new(Impairment::none().outage(1000 * MS, 500 * MS), 1);
        let fates = feed(&mut s, 2000, MS, 100);
        for (i, (_, f)) in fates.iter().enumerate() {
            let inside = (1000..1500).contains(&i);
            assert_eq!(*f == Fate::Outage, inside, "datagram {i}: {f:?}");
        }
        assert_eq!(s.stats.outage_drops, 500);
    }

    #[test]
    fn delay_and_jitter_keep_order_unless_asked() {
        let cfg = Impairment::none().delay(25 * MS).jitter(30 * MS);
        let mut s = Shaper::new(cfg.clone(), 9);
        let fates = feed(&mut s, 5000, MS, 100);
        let dues: Vec<Instant> = fates
            .iter()
            .map(|(at, f)| match f {
                Fate::Deliver(due) => {
                    assert!(*due >= *at + 25 * MS, "earlier than the delay");
                    *due
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(dues.windows(2).all(|w| w[0] <= w[1]), "reordered");
        let mut s = Shaper::new(Impairment { reorder: true, ..cfg }, 9);
        let fates = feed(&mut s, 5000, MS, 100);
        let mut reordered = 0;
        for w in fates.windows(2) {
            if let (Fate::Deliver(a), Fate::Deliver(b)) = (w[0].1, w[1].1) {
                assert!(a - w[0].0 < 55 * MS);
                reordered += usize::from(b < a);
            }
        }
        assert!(reordered > 100, "{reordered} reordered");
    }

    #[test]
    fn rtp_payload_types_from_clear_headers() {
        let mut rtp = [0u8; 20];
        rtp[0] = 0x80;
        rtp[1] = 0x80 | 97; // marker, type 97
        assert_eq!(rtp_payload_type(&rtp), Some(97));
        rtp[1] = 200; // RTCP sender report
        assert_eq!(rtp_payload_type(&rtp), None);
        assert_eq!(rtp_payload_type(&[0x00, 0x01, 0, 0]), None); // STUN
        assert_eq!(rtp_payload_type(&[22, 0xfe, 0xfd]), None); // DTLS
    }

    /// A UDP echo "server" on loopback that records the source ports it sees.
    type Echo = (SocketAddr, Arc<Mutex<Vec<u16>>>, Arc<AtomicBool>, JoinHandle<()>);

    fn echo() -> Echo {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        sock.set_read_timeout(Some(10 * MS)).expect("timeout");
        let addr = sock.local_addr().expect("addr");
        let (ports, stop) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
        let (p, s) = (Arc::clone(&ports), Arc::clone(&stop));
        let t = thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    p.lock().expect("lock").push(from.port());
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        (addr, ports, stop, t)
    }

    #[test]
    fn relays_both_ways_and_rebinding_changes_the_source_port() {
        let (server, ports, stop, t) = echo();
        let mut relay = Relay::bind_loopback().expect("relay");
        relay.start(server, Link::delay(MS)).expect("start");
        let client = UdpSocket::bind("127.0.0.1:0").expect("client");
        client.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut buf = [0u8; 64];
        let round = |msg: &[u8], buf: &mut [u8]| {
            client.send_to(msg, relay.front()).expect("send");
            let (n, from) = client.recv_from(buf).expect("echo through the relay");
            assert_eq!(from, relay.front());
            n
        };
        assert_eq!(round(b"one", &mut buf), 3);
        relay.rebind();
        // The rebinding happens on the relay's next turn; wait for it, then go again.
        assert!(crate::wait_until(Duration::from_secs(5), || relay.stats().rebinds == 1));
        assert_eq!(round(b"two", &mut buf), 3);
        // The relay counts a datagram after sending it: the echo can arrive first.
        let counted =
            crate::wait_until(Duration::from_secs(5), || relay.stats().down.forwarded == 2);
        let seen = ports.lock().expect("lock").clone();
        let st = relay.stats();
        assert!(counted, "{st:?}");
        assert_eq!(st.back_ports.len(), 2, "{st:?}");
        assert_eq!(seen, st.back_ports, "the server saw the back ports in turn");
        assert_ne!(seen[0], seen[1]);
        assert_eq!((st.up.forwarded, st.down.forwarded), (2, 2), "{st:?}");
        // The server answering the old address reaches nobody; the relay counts it.
        UdpSocket::bind("127.0.0.1:0")
            .expect("bind")
            .send_to(b"late", (Ipv4Addr::LOCALHOST, seen[0]))
            .expect("send");
        assert!(crate::wait_until(Duration::from_secs(5), || relay.stats().stale == 1));
        stop.store(true, Ordering::Relaxed);
        t.join().expect("echo thread");
    }

    #[test]
    fn rate_cap_bounds_real_throughput() {
        let (server, _ports, stop, t) = echo();
        let mut relay = Relay::bind_loopback().expect("relay");
        let link = Link {
            up: Impairment::none().rate(800_000, 50 * MS), // 100 kB/s
            ..Link::default()
        };
        relay.start(server, link).expect("start");
        let client = UdpSocket::bind("127.0.0.1:0").expect("client");
        let started = Instant::now();
        // 1000 bytes every millisecond for 0.5 s: 8 Mbit/s offered.
        for _ in 0..500 {
            client.send_to(&[0u8; 1000], relay.front()).expect("send");
            thread::sleep(MS);
        }
        thread::sleep(200 * MS);
        let st = relay.stats();
        let elapsed = started.elapsed().as_secs_f64();
        // Never more than the rate over the time plus what the buffer and bucket hold (the
        // lower bound depends on how busy the machine is, so only "something passed").
        let most = (100_000.0 * elapsed + 5_000.0 + 1_500.0) / 1000.0;
        assert!(st.up.forwarded > 10 && st.up.forwarded as f64 <= most, "{st:?} in {elapsed} s");
        assert!(st.up.queue_drops > 0, "{st:?}");
        stop.store(true, Ordering::Relaxed);
        t.join().expect("echo thread");
    }
}
