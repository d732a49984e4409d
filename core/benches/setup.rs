//! Server CPU to answer one WHEP POST: parse and check the offer, build the viewer's str0m
//! `Rtc` (its DTLS endpoint included), accept the offer and write the answer. The offer is
//! Chromium 156's (`core/tests/data`), the stream a running external one; every answer creates
//! a viewer, so the core is replaced every `PER_CORE` posts. The DTLS handshake that follows is
//! not included (it needs a client; `whep-load --setup-only` measures whole setups).
//!
//! Once per DTLS implementation the build has (`whepd --dtls`): `setup/answer/dimpl`, and
//! `setup/answer/openssl` when whep-server's `openssl-dtls` feature is on (OpenSSL builds its
//! `SSL_CTX` and `SSL` for each viewer where dimpl shares one validated configuration):
//!
//! `cargo bench -p whep-core --features sim,whep-server/openssl-dtls --bench setup`

#![allow(clippy::disallowed_methods)] // a benchmark times itself

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use http_types::Method;
use whep_core::sim::SimWorld;
use whep_core::{RateLimits, StreamConfig, WhepRequest};
use whep_server::dtls::Dtls;

const OFFER: &str = include_str!("../tests/data/chromium-156-offer.sdp");
/// Viewers answered by one core before it is replaced.
const PER_CORE: usize = 500;

fn world(crypto: &Arc<str0m::config::CryptoProvider>) -> SimWorld {
    let mut config = whep_core::sim::config();
    config.crypto = Arc::clone(crypto);
    config.max_viewers_per_stream = PER_CORE;
    config.max_viewers_total = PER_CORE;
    config.rate_limits = RateLimits::unlimited();
    let mut w = SimWorld::new(config);
    w.add_stream("bench", StreamConfig::external(), 60);
    w.run_for(Duration::from_millis(100));
    w
}

fn answer(c: &mut Criterion) {
    let mut g = c.benchmark_group("setup/answer");
    g.measurement_time(Duration::from_secs(8));
    for dtls in [Dtls::Dimpl, Dtls::Openssl] {
        let Ok(crypto) = dtls.crypto() else {
            eprintln!("setup/answer/{dtls}: not in this build (whep-server/openssl-dtls)");
            continue;
        };
        let mut w = world(&crypto);
        let mut answered = 0;
        g.bench_function(dtls.to_string(), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    if answered == PER_CORE {
                        w = world(&crypto);
                        answered = 0;
                    }
                    let req = WhepRequest::new(Method::Post, "/whep/bench")
                        .with_header("Content-Type", "application/sdp")
                        .with_body(OFFER);
                    let started = Instant::now();
                    let resp = w.core.handle_http(req, w.now);
                    total += started.elapsed();
                    assert_eq!(resp.code(), 201, "{resp:?}");
                    answered += 1;
                }
                total
            });
        });
    }
    g.finish();
}

criterion_group!(benches, answer);
criterion_main!(benches);
