//! Cost of the fan-out path: one RTP packet from FFmpeg to N connected viewers (parse once,
//! share the payload, per viewer header rewrite + str0m `write_rtp` + SRTP + drain), in time per
//! viewer-packet (criterion's throughput is viewer-packets), for N = 1, 10, 100, 1000, and heap
//! allocations per viewer-packet (printed after each N). Outputs are dropped, not sent: this
//! measures the core alone.
//!
//! `cargo bench -p whep-core --features sim --bench fanout`

#![allow(clippy::disallowed_methods, clippy::print_stdout)] // a benchmark times itself

mod counting;

use std::collections::VecDeque;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use whep_core::sim::{SimWorld, Source};

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout");
    g.measurement_time(Duration::from_secs(8));
    for n in [1usize, 10, 100, 1000] {
        let (mut w, _, ports) = SimWorld::with_connected_viewers(n);
        let mut source = Source::new(60, 0x5151_5151);
        let mut queue: VecDeque<(u16, Vec<u8>)> = VecDeque::new();
        let mut frames = 0u64;
        let mut now = w.now;
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    if queue.is_empty() {
                        queue.extend(source.video_frame().into_iter().map(|p| (ports.video, p)));
                        frames += 1;
                        if !frames.is_multiple_of(3) {
                            queue.push_back((ports.audio(), source.audio_packet()));
                        }
                    }
                    let Some((port, pkt)) = queue.pop_front() else { continue };
                    now += Duration::from_micros(1);
                    let t = Instant::now();
                    w.core.handle_input(whep_core::sim::from_ffmpeg(port, &pkt), now);
                    black_box(w.discard_outputs());
                    total += t.elapsed();
                }
                total
            })
        });
        assert_eq!(w.core.viewer_count(), n, "no viewer lost during the run");
        // Allocations on the same path, over 300 packets made beforehand (the scripted source
        // allocates its own).
        while queue.len() < 300 {
            queue.extend(source.video_frame().into_iter().map(|p| (ports.video, p)));
        }
        let a0 = counting::ALLOCS.load(std::sync::atomic::Ordering::Relaxed);
        let mut fed = 0usize;
        while let Some((port, pkt)) = queue.pop_front() {
            now += Duration::from_micros(1);
            w.core.handle_input(whep_core::sim::from_ffmpeg(port, &pkt), now);
            black_box(w.discard_outputs());
            fed += 1;
        }
        let allocs = counting::ALLOCS.load(std::sync::atomic::Ordering::Relaxed) - a0;
        println!(
            "fanout/{n}: {:.2} allocations per viewer-packet",
            allocs as f64 / (fed * n) as f64
        );
    }
    g.finish();
}

/// The driver hands the core every packet it read in one wake-up (a frame's fragments arrive
/// back to back) before draining its outputs. Side by side in one run: the same packets fed
/// and drained one by one, and fed a frame at a time, then drained.
fn frame_batches(_: &mut Criterion) {
    for n in [10usize, 100, 1000] {
        let mut results = Vec::new();
        for batched in [false, true] {
            let (mut w, _, ports) = SimWorld::with_connected_viewers(n);
            let mut source = Source::new(60, 0x5151_5151);
            let mut now = w.now;
            let (mut fed, mut total) = (0usize, Duration::ZERO);
            for frame in 0..600u32 {
                let mut packets: Vec<(u16, Vec<u8>)> =
                    source.video_frame().into_iter().map(|p| (ports.video, p)).collect();
                if frame % 3 != 0 {
                    packets.push((ports.audio(), source.audio_packet()));
                }
                now += Duration::from_millis(16);
                let t = Instant::now();
                for (port, pkt) in &packets {
                    w.core.handle_input(whep_core::sim::from_ffmpeg(*port, pkt), now);
                    if !batched {
                        black_box(w.discard_outputs());
                    }
                }
                black_box(w.discard_outputs());
                // The first frames warm caches up.
                if frame >= 100 {
                    total += t.elapsed();
                    fed += packets.len();
                }
            }
            assert_eq!(w.core.viewer_count(), n);
            results.push(total.as_nanos() as f64 / (fed * n) as f64);
        }
        println!(
            "fanout/{n}: {:.0} ns per viewer-packet drained per packet, {:.0} ns drained per frame",
            results[0], results[1]
        );
    }
}

criterion_group!(benches, fanout, frame_batches);
criterion_main!(benches);
