//! Randomized operation sequences through the simulation harness. The harness checks the core's
//! invariants (peer and port counts, indexes, timers) after every step; the interpreter
//! (`whep_core::sim::ops`, shared with the `ops` fuzz target) adds a small reference model of
//! what must hold between operations and a clean state after shutdown.

use proptest::prelude::*;
use whep_core::sim::ops::{self, Op};

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u8>().prop_map(Op::Join),
        2 => any::<u8>().prop_map(Op::Delete),
        1 => any::<u8>().prop_map(Op::Silence),
        1 => any::<u8>().prop_map(Op::Trickle),
        1 => any::<u8>().prop_map(Op::IceRestart),
        1 => any::<u8>().prop_map(Op::Keyframe),
        4 => (0u16..5000).prop_map(Op::Advance),
        1 => any::<u8>().prop_map(Op::Crash),
        1 => any::<u8>().prop_map(Op::Stop),
        2 => any::<u8>().prop_map(Op::Start),
        1 => (any::<u8>(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(p, b)| Op::Garbage(p, b)),
        1 => (any::<u8>(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(v, b)| Op::ViewerGarbage(v, b)),
        1 => any::<bool>().prop_map(Op::BindFails),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_keep_the_invariants(ops in prop::collection::vec(op(), 1..40)) {
        ops::run(&ops);
    }
}
