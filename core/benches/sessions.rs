//! Cost of the sessions listing ([`Core::sessions`](whep_core::Core::sessions)) with 500
//! connected viewers of one stream: the snapshot `GET /api/sessions` takes on the engine's task
//! (its JSON is built from it after). Nothing else runs meanwhile, so this is the time the
//! engine loop is held per listing.
//!
//! `cargo bench -p whep-core --features sim --bench sessions`

#![allow(clippy::disallowed_methods, clippy::print_stdout)] // a benchmark times itself

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use whep_core::sim::SimWorld;

fn sessions(c: &mut Criterion) {
    let mut g = c.benchmark_group("sessions");
    g.measurement_time(Duration::from_secs(5));
    for n in [50usize, 500] {
        let (w, _, _) = SimWorld::with_connected_viewers(n);
        assert_eq!(w.core.sessions(w.now).len(), n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| black_box(w.core.sessions(w.now)));
        });
    }
    g.finish();
}

criterion_group!(benches, sessions);
criterion_main!(benches);
