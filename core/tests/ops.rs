//! Randomized operation sequences through the simulation harness. The harness checks the core's
//! invariants (peer and port counts, indexes, timers) after every step; this test adds a small
//! reference model of what must hold between operations and a clean state after shutdown.

use std::time::Duration;

use proptest::prelude::*;
use whep_core::sim::{self, SimWorld};
use whep_core::whep::Method;
use whep_core::{StreamConfig, StreamId};

#[derive(Debug, Clone)]
enum Op {
    Join(u8),
    Delete(u8),
    Silence(u8),
    Trickle(u8),
    Advance(u16),
    Crash(u8),
    Stop(u8),
    Start(u8),
    Garbage(u8, Vec<u8>),
    BindFails(bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u8>().prop_map(Op::Join),
        2 => any::<u8>().prop_map(Op::Delete),
        1 => any::<u8>().prop_map(Op::Silence),
        1 => any::<u8>().prop_map(Op::Trickle),
        4 => (0u16..5000).prop_map(Op::Advance),
        1 => any::<u8>().prop_map(Op::Crash),
        1 => any::<u8>().prop_map(Op::Stop),
        2 => any::<u8>().prop_map(Op::Start),
        1 => (any::<u8>(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(p, b)| Op::Garbage(p, b)),
        1 => any::<bool>().prop_map(Op::BindFails),
    ]
}

fn run(ops: Vec<Op>) {
    let mut config = sim::config();
    config.max_viewers_per_stream = 3;
    config.max_viewers_total = 5;
    config.ingest_ports = 40_000..=40_007;
    let mut w = SimWorld::new(config);
    let streams: Vec<StreamId> = vec![
        w.add_stream("sup", StreamConfig::supervised(vec!["-i".into(), "x".into()]), 15),
        w.add_stream("ext", StreamConfig::external(), 15),
        w.add_stream("ext2", StreamConfig::external(), 15),
    ];
    let pick = |i: u8| streams[usize::from(i) % streams.len()].clone();
    for op in ops {
        match op {
            Op::Join(s) => {
                let id = pick(s);
                let before = w.core.viewer_count();
                let info = w.core.stream(&id);
                let (_, r) = w.join(&id);
                let accepting =
                    info.as_ref().is_some_and(|i| i.state != "stopped" && i.state != "stopping");
                match r.code() {
                    201 => {
                        assert!(accepting, "201 from a stopped stream");
                        assert_eq!(w.core.viewer_count(), before + 1);
                    }
                    404 => assert!(!accepting),
                    503 => assert!(before >= 5 || info.is_some_and(|i| i.viewers >= 3)),
                    c => panic!("unexpected POST status {c}"),
                }
            }
            Op::Delete(v) if !w.viewers.is_empty() => {
                let v = usize::from(v) % w.viewers.len();
                if w.viewers[v].location.is_none() {
                    continue;
                }
                let r = w.http(w.session_request(v, Method::Delete));
                assert_eq!(r.code(), 204);
            }
            Op::Silence(v) if !w.viewers.is_empty() => {
                let v = usize::from(v) % w.viewers.len();
                w.viewers[v].silent = true;
            }
            Op::Trickle(v) if !w.viewers.is_empty() => {
                let v = usize::from(v) % w.viewers.len();
                if w.viewers[v].location.is_none() {
                    continue;
                }
                let r = w.http(
                    w.session_request(v, Method::Patch)
                        .with_header("Content-Type", "application/trickle-ice-sdpfrag")
                        .with_body("a=candidate:9 1 udp 1 198.51.100.7 9 typ host\r\n"),
                );
                assert!(matches!(r.code(), 204 | 404), "{}", r.code());
            }
            Op::Advance(ms) => w.run_for(Duration::from_millis(u64::from(ms))),
            Op::Crash(s) => w.crash_process(&pick(s)),
            Op::Stop(s) => {
                let id = pick(s);
                assert!(w.core.stop_stream(&id, w.now).is_ok());
                w.drain();
                assert_eq!(w.core.stream(&id).map(|i| i.viewers), Some(0), "stop closes viewers");
            }
            Op::Start(s) => {
                let _ = w.core.start_stream(&pick(s), w.now);
                w.drain();
            }
            Op::Garbage(p, bytes) => {
                let port = 40_000 + u16::from(p % 8);
                w.ingest_raw(port, &bytes);
                w.datagram_raw(sim::SERVER, &bytes);
            }
            Op::BindFails(on) => {
                if on {
                    w.fail_bind.extend([40_002, 40_003]);
                } else {
                    w.fail_bind.clear();
                }
            }
            Op::Delete(_) | Op::Silence(_) | Op::Trickle(_) => {}
        }
        let held: usize =
            streams.iter().filter_map(|s| w.core.stream(s)).filter(|i| i.ports.is_some()).count();
        assert_eq!(held, w.core.ports_in_use());
        assert_eq!(
            w.bound.len(),
            w.core.streams().iter().filter(|i| i.state != "binding" && i.ports.is_some()).count()
        );
    }
    w.core.shutdown(w.now);
    w.drain();
    w.run_for(Duration::from_secs(10));
    assert!(w.core.is_idle(), "idle after shutdown: {:?}", w.core.streams());
    assert!(w.procs.is_empty(), "no process left");
    assert!(w.bound.is_empty(), "no port left bound");
    let m = w.core.metrics();
    assert_eq!(m.viewers_joined, m.viewers_left, "every viewer that joined has left");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_keep_the_invariants(ops in prop::collection::vec(op(), 1..40)) {
        run(ops);
    }
}
