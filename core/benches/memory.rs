//! Memory per viewer and heap allocations per viewer-packet, with a counting allocator.
//!
//! `cargo bench -p whep-core --features sim --bench memory`
//!
//! For N viewers: connect them through the simulation harness to a stream that has run for
//! 1.5 s (so each starts with a burst of the cached GOP, as a viewer joining mid-GOP does),
//! stream for 5 s so that every viewer's retransmission cache is as full as it gets, then keep
//! the core alone (the simulated players, network and source are dropped: their memory is not
//! the server's). The same run with no viewer gives the stream's own share (ports, GOP cache),
//! and the difference divided by N is the heap per viewer. Then feed packets by hand and count
//! heap allocations per viewer-packet on the fan-out path.
//!
//! A breakdown at 100 viewers follows: a viewer that has only been answered (str0m `Rtc` built,
//! offer accepted); one connected and streamed to without a retransmission cache or ratio cap;
//! the ratio cap (a few counters: the core's, not str0m's per-packet history); the video
//! retransmission cache.
//!
//! The counting allocator sees Rust allocations only. On glibc the `malloc` column also counts
//! what the C crypto library (aws-lc: SRTP and DTLS contexts) allocates, and malloc's own
//! per-block overhead.
#![allow(unsafe_code, clippy::print_stdout)]

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use whep_core::sim::{SimWorld, Source};
use whep_core::{Core, CoreConfig, PortPair, RateLimits, StreamConfig};

mod counting;
use counting::{ALLOCS, LIVE};

/// The heap a measurement grew by: Rust heap (counting allocator) and all of malloc.
#[derive(Clone, Copy)]
struct Heap {
    rust: isize,
    malloc: Option<isize>,
}

impl Heap {
    fn now() -> Self {
        Self { rust: LIVE.load(Relaxed), malloc: malloc_in_use() }
    }

    fn since(self, before: Self) -> Self {
        Self {
            rust: self.rust - before.rust,
            malloc: self.malloc.zip(before.malloc).map(|(a, b)| a - b),
        }
    }

    /// KiB per viewer of `self` (n viewers) over `fixed` (no viewer).
    fn per_viewer(self, fixed: Self, n: usize) -> (f64, Option<f64>) {
        let kib = |a: isize, b: isize| (a - b) as f64 / n as f64 / 1024.0;
        (kib(self.rust, fixed.rust), self.malloc.zip(fixed.malloc).map(|(a, b)| kib(a, b)))
    }
}

fn main() {
    if std::env::var_os("WHEP_MEMORY_PROFILE").is_some() {
        // For a heap profiler: 100 default viewers, then exit without freeing the core, so
        // that what it holds shows as leaked, by allocation site (README "Figures").
        let (_, core, _, _) = streamed(whep_core::sim::config(), 100);
        std::mem::forget(core);
        std::process::exit(0);
    }
    let default = CoreConfig::default();
    let (d_packets, d_age, d_cap) =
        (default.rtx_cache_packets, default.rtx_cache_age, default.rtx_ratio_cap);
    println!(
        "viewers  rtx-cache (packets, age)  ratio-cap  core-heap/viewer  malloc/viewer  \
         allocs/viewer-packet  datagram-bytes/viewer-packet"
    );
    let ms = Duration::from_millis;
    let runs = [
        (10usize, d_packets, d_age, d_cap),
        (100, d_packets, d_age, d_cap),
        (100, 256, ms(1000), d_cap),
        (100, 128, ms(1000), d_cap),
        (100, 64, ms(1000), None),
        (100, 48, ms(1000), d_cap),
        (100, 64, ms(0), d_cap),
    ];
    for (n, packets, age, cap) in runs {
        let mut config = whep_core::sim::config();
        config.rtx_cache_packets = packets;
        config.rtx_cache_age = age;
        config.rtx_ratio_cap = cap;
        let (fixed, core, _, _) = streamed(config.clone(), 0);
        drop(core);
        let (heap, mut core, now, ports) = streamed(config, n);
        let (rust, malloc) = heap.per_viewer(fixed, n);
        let (allocs, bytes) = fan_out(&mut core, now, ports, n);
        drop(core);
        let malloc = malloc.map_or("-".into(), |m| format!("{m:.1} KiB"));
        let cache = format!("{packets}, {} ms", age.as_millis());
        let cap = cap.map_or("none".into(), |c| c.to_string());
        println!(
            "{n:>7}  {cache:>23}  {cap:>9}  {rust:>12.1} KiB  {malloc:>13}  {allocs:>20.2}  {bytes:>28.0}"
        );
    }

    let n = 100;
    println!("\nbreakdown per viewer at {n} viewers, default config (Rust heap / malloc):");
    let show = |what: &str, (rust, malloc): (f64, Option<f64>)| {
        let malloc = malloc.map_or("-".into(), |m| format!("{m:.1}"));
        println!("  {what:<66} {rust:>6.1} / {malloc:>6} KiB");
    };
    let config = whep_core::sim::config();
    let nobody = joined(config.clone(), 0);
    let chromium = joined_chromium(config.clone(), n).per_viewer(nobody, n);
    let joined = joined(config.clone(), n).per_viewer(nobody, n);
    show("answered, not connected (Rtc, ICE agent, DTLS state, Viewer)", joined);
    show("  the same answering Chromium 156's offer (not str0m's)", chromium);
    let mut bare = config.clone();
    bare.rtx_cache_age = Duration::ZERO;
    bare.rtx_ratio_cap = None;
    let bare = per_viewer(bare, n);
    show("connected and streamed to, no retransmission cache, no ratio cap", bare);
    let diff = |a: (f64, Option<f64>), b: (f64, Option<f64>)| {
        (a.0 - b.0, a.1.zip(b.1).map(|(x, y)| x - y))
    };
    show("  of which set up on connect (SRTP, RTCP, send queues)", diff(bare, joined));
    let mut capped = config.clone();
    capped.rtx_cache_age = Duration::ZERO;
    let capped = per_viewer(capped, n);
    show("retransmission ratio cap (the core's counters, not str0m's history)", diff(capped, bare));
    let full = per_viewer(config, n);
    show(
        &format!("video retransmission cache ({d_packets} packets, {} ms)", d_age.as_millis()),
        diff(full, capped),
    );
    show("total", full);
    println!(
        "  (a viewer's `Viewer` struct, str0m `Rtc` inline, is {} bytes)",
        whep_core::sim::viewer_struct_size()
    );
}

/// Starts a stream, lets it run 1.5 s (so a GOP is cached and every viewer is started with a
/// burst of it, as a real viewer joining mid-GOP is), connects `n` viewers, streams 5 s more,
/// and returns the core alone with the heap it holds.
fn streamed(mut config: CoreConfig, n: usize) -> (Heap, Core, Instant, PortPair) {
    config.max_viewers_per_stream = n;
    config.max_viewers_total = n;
    config.rate_limits = RateLimits::unlimited();
    let before = Heap::now();
    let mut w = SimWorld::new(config);
    let id = w.add_stream("bench", StreamConfig::external(), 60);
    w.run_for(Duration::from_millis(1500));
    for _ in 0..n {
        let (_, r) = w.join(&id);
        assert_eq!(r.code(), 201);
    }
    w.drive_until(Duration::from_secs(30), |w| w.connected(&id) == n);
    w.run_for(Duration::from_secs(5));
    let now = w.now;
    let ports = w.bound[&id];
    let mut core = w.into_core();
    while core.poll_output().is_some() {}
    (Heap::now().since(before), core, now, ports)
}

/// Heap per viewer (Rust, malloc) of `streamed` with `n` viewers over none.
fn per_viewer(config: CoreConfig, n: usize) -> (f64, Option<f64>) {
    let (fixed, core, _, _) = streamed(config.clone(), 0);
    drop(core);
    let (heap, core, _, _) = streamed(config, n);
    drop(core);
    heap.per_viewer(fixed, n)
}

/// Answers `n` viewers' offers without letting them connect; returns the core's heap.
fn joined(mut config: CoreConfig, n: usize) -> Heap {
    config.max_viewers_per_stream = n;
    config.max_viewers_total = n;
    config.rate_limits = RateLimits::unlimited();
    let before = Heap::now();
    let mut w = SimWorld::new(config);
    let id = w.add_stream("bench", StreamConfig::external(), 30);
    for _ in 0..n {
        let (_, r) = w.join(&id);
        assert_eq!(r.code(), 201);
    }
    let mut core = w.into_core();
    while core.poll_output().is_some() {}
    let heap = Heap::now().since(before);
    drop(core);
    heap
}

/// Answers Chromium 156's offer (`core/tests/data`) `n` times; returns the core's heap.
fn joined_chromium(mut config: CoreConfig, n: usize) -> Heap {
    const OFFER: &str = include_str!("../tests/data/chromium-156-offer.sdp");
    config.max_viewers_per_stream = n;
    config.max_viewers_total = n;
    config.rate_limits = RateLimits::unlimited();
    let before = Heap::now();
    let mut w = SimWorld::new(config);
    w.add_stream("bench", StreamConfig::external(), 30);
    for _ in 0..n {
        let req = whep_core::WhepRequest::new(whep_core::whep::Method::Post, "/whep/bench")
            .with_header("Content-Type", "application/sdp")
            .with_body(OFFER);
        assert_eq!(w.http(req).code(), 201);
    }
    let mut core = w.into_core();
    while core.poll_output().is_some() {}
    let heap = Heap::now().since(before);
    drop(core);
    heap
}

/// Feeds 10 s of video and audio at once; returns allocations and datagram bytes per
/// viewer-packet.
fn fan_out(core: &mut Core, mut now: Instant, ports: PortPair, n: usize) -> (f64, f64) {
    let mut source = Source::new(60, 0x99);
    let mut packets = Vec::new();
    for f in 0u32..300 {
        packets.extend(source.video_frame().into_iter().map(|p| (ports.video, p)));
        if !f.is_multiple_of(3) {
            packets.push((ports.audio(), source.audio_packet()));
        }
    }
    let a0 = ALLOCS.load(Relaxed);
    let mut bytes = 0usize;
    for (port, p) in &packets {
        now += Duration::from_micros(1);
        core.handle_input(whep_core::sim::from_ffmpeg(*port, p), now);
        while let Some(out) = core.poll_output() {
            if let whep_core::Output::Transmit(t) = out {
                bytes += t.contents.capacity();
            }
        }
    }
    let per = (packets.len() * n) as f64;
    ((ALLOCS.load(Relaxed) - a0) as f64 / per, bytes as f64 / per)
}

/// Bytes malloc has handed out and not had back (glibc), C allocations included.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn malloc_in_use() -> Option<isize> {
    /// glibc's `struct mallinfo2`.
    #[repr(C)]
    struct Mallinfo2 {
        arena: usize,
        ordblks: usize,
        smblks: usize,
        hblks: usize,
        hblkhd: usize,
        usmblks: usize,
        fsmblks: usize,
        uordblks: usize,
        fordblks: usize,
        keepcost: usize,
    }
    unsafe extern "C" {
        fn mallinfo2() -> Mallinfo2;
    }
    // SAFETY: mallinfo2 only reads the allocator's statistics (glibc ≥ 2.33).
    let m = unsafe { mallinfo2() };
    Some((m.uordblks + m.hblkhd) as isize)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn malloc_in_use() -> Option<isize> {
    None
}
