//! Memory per viewer and heap allocations per viewer-packet, with a counting allocator.
//!
//! `cargo bench -p whep-core --features sim --bench memory`
//!
//! For N viewers: connect them through the simulation harness, stream for a while so that every
//! viewer's retransmission cache is full, drop the simulated players (their memory is not the
//! server's), and report the core's live heap per viewer. Then feed packets by hand and count
//! heap allocations per viewer-packet on the fan-out path.
#![allow(unsafe_code, clippy::print_stdout)]

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use whep_core::Input;
use whep_core::sim::{SimWorld, Source};

mod counting;
use counting::{ALLOCS, LIVE};

fn main() {
    println!(
        "viewers  rtx-cache  core-heap/viewer  allocs/viewer-packet  datagram-bytes/viewer-packet"
    );
    let default_rtx = whep_core::Config::default().rtx_cache_packets;
    for (n, rtx) in [(10usize, default_rtx), (100, default_rtx), (100, 512), (100, 128)] {
        let mut config = whep_core::sim::config();
        config.rtx_cache_packets = rtx;
        let base = LIVE.load(Relaxed);
        let (mut w, id, ports) = SimWorld::with_connected_viewers_config(config, n);
        // Stream 5 s so every retransmission cache is full.
        w.sources.insert(id.clone(), Source::new(60, 0x77));
        w.run_for(Duration::from_secs(5));
        w.sources.remove(&id);
        w.viewers.clear();
        w.events.clear();
        let _ = w.discard_outputs();
        let live = LIVE.load(Relaxed) - base;
        // A world with no viewer, for the fixed part.
        let base2 = LIVE.load(Relaxed);
        let (empty, _, _) = SimWorld::with_connected_viewers(0);
        let fixed = LIVE.load(Relaxed) - base2;
        drop(empty);
        let per_viewer = (live - fixed) as f64 / n as f64 / 1024.0;

        let mut source = Source::new(60, 0x99);
        let mut packets = Vec::new();
        for f in 0u32..300 {
            packets.extend(source.video_frame().into_iter().map(|p| (ports.video, p)));
            if !f.is_multiple_of(3) {
                packets.push((ports.audio(), source.audio_packet()));
            }
        }
        let mut now = w.now;
        let a0 = ALLOCS.load(Relaxed);
        let mut bytes = 0usize;
        for (port, p) in &packets {
            now += Duration::from_micros(1);
            w.core.handle_input(Input::Ingest { port: *port, contents: p }, now);
            while let Some(out) = w.core.poll_output() {
                if let whep_core::Output::Transmit(t) = out {
                    bytes += t.contents.capacity();
                }
            }
        }
        let allocs = (ALLOCS.load(Relaxed) - a0) as f64 / (packets.len() * n) as f64;
        let per_pkt_bytes = bytes as f64 / (packets.len() * n) as f64;
        println!("{n:>7}  {rtx:>9}  {per_viewer:>12.1} KiB  {allocs:>19.2}  {per_pkt_bytes:>28.0}");
    }
}
