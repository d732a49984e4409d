//! Model-based test of the ingest port allocator ([`PortPool`]) through its public API.
//!
//! The reference model is deliberately dumb: the set of allocated video ports, a map from
//! quarantined video port to its deadline (kept until an `allocate` sweeps it, as the pool's
//! lazy expiry does), and the last pair handed out. Long random sequences of `Allocate`,
//! `Release`, `Quarantine` and `Advance` run over tiny port ranges (zero to six pairs, some at
//! the ends of the `u16` range, odd and even starts) so that exhaustion, quarantine expiry and
//! round-robin wrap-around happen all the time.
//!
//! Every allocation is checked twice: first against what any correct allocator must do (the
//! pair lies in the range, is aligned on the range start, audio = video + 1 within the range,
//! was neither allocated nor still quarantined, and `None` comes exactly when the model has no
//! usable pair), then against the documented deterministic round-robin order. After every
//! operation `in_use`, `quarantined` at several instants, `next_unquarantine`, `is_allocated`
//! for every port around the range and `check_invariants` are compared or run.
//!
//! A failure names the operation index and the operation; proptest shrinks the sequence to the
//! shortest one that still fails and prints it, e.g. `range: 40000..=40005, ops: [Allocate,
//! Quarantine { target: Held(0), ms: 0 }, Allocate]`.

// The test anchors its virtual clock at one real `Instant`; nothing here reads time otherwise.
#![allow(clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::RangeInclusive;
use std::panic;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use whep_core::ports::{PortPair, PortPool};

/// Which pair an operation targets.
#[derive(Clone)]
enum Target {
    /// The pair at this index (modulo their number) among those the model holds allocated.
    Held(usize),
    /// The pair at this index among those the model holds quarantined (never releasable).
    Quarantined(usize),
    /// A pair with this video port: free, foreign, misaligned or allocated, whatever it is.
    Port(u16),
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Held(i) => write!(f, "Held({i})"),
            Self::Quarantined(i) => write!(f, "Quarantined({i})"),
            Self::Port(p) => write!(f, "Port({p})"),
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Allocate,
    Release { target: Target },
    Quarantine { target: Target, ms: u64 },
    Advance { ms: u64 },
}

/// A port range, printed as Rust writes it.
#[derive(Clone)]
struct Range(RangeInclusive<u16>);

impl fmt::Debug for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..={}", self.0.start(), self.0.end())
    }
}

/// The reference: plain sets keyed by video port.
#[derive(Debug)]
struct Model {
    /// Video ports of every pair of the range, in order.
    pairs: Vec<u16>,
    allocated: BTreeSet<u16>,
    /// Deadline of each quarantined pair, including those whose deadline has passed but that
    /// no `allocate` has swept back yet.
    quarantined: BTreeMap<u16, Instant>,
    /// The pair handed out last (the round-robin cursor).
    last: Option<u16>,
}

impl Model {
    fn new(range: &RangeInclusive<u16>) -> Self {
        let (start, end) = (u32::from(*range.start()), u32::from(*range.end()));
        let pairs = (start..end)
            .step_by(2)
            .filter(|v| *v < end)
            .filter_map(|v| u16::try_from(v).ok())
            .collect();
        Self { pairs, allocated: BTreeSet::new(), quarantined: BTreeMap::new(), last: None }
    }

    fn is_pair(&self, video: u16) -> bool {
        self.pairs.binary_search(&video).is_ok()
    }

    /// Pairs neither allocated nor quarantined past `now`.
    fn usable(&self, now: Instant) -> Vec<u16> {
        let blocked = |v: &u16| {
            self.allocated.contains(v) || self.quarantined.get(v).is_some_and(|until| *until > now)
        };
        self.pairs.iter().copied().filter(|v| !blocked(v)).collect()
    }

    /// Round-robin: the first usable pair after the last one handed out, else the first.
    fn allocate(&mut self, now: Instant) -> Option<u16> {
        self.quarantined.retain(|_, until| *until > now);
        let usable = self.usable(now);
        let after = usable.iter().copied().find(|v| self.last.is_none_or(|last| *v > last));
        let chosen = after.or_else(|| usable.first().copied())?;
        self.allocated.insert(chosen);
        self.last = Some(chosen);
        Some(chosen)
    }

    fn resolve(&self, target: &Target) -> u16 {
        let nth = |v: Vec<u16>, i: usize| if v.is_empty() { None } else { Some(v[i % v.len()]) };
        match *target {
            Target::Held(i) => nth(self.allocated.iter().copied().collect(), i),
            Target::Quarantined(i) => nth(self.quarantined.keys().copied().collect(), i),
            Target::Port(p) => Some(p),
        }
        // Nothing of that kind: a port that is never a pair of any range used here.
        .unwrap_or(1)
    }

    fn quarantined_at(&self, t: Instant) -> usize {
        self.quarantined.values().filter(|until| **until > t).count()
    }
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        4 => (0usize..8).prop_map(Target::Held),
        1 => (0usize..8).prop_map(Target::Quarantined),
        // Ports in and around every range `scenario` picks.
        2 => prop_oneof![39_995u16..40_020, 65_520u16..=65_535, 0u16..20].prop_map(Target::Port),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => Just(Op::Allocate),
        3 => target().prop_map(|target| Op::Release { target }),
        // 0 ms makes a quarantine that is over at once (the deadline itself counts as usable).
        2 => (target(), prop_oneof![Just(0u64), 1u64..3_000])
            .prop_map(|(target, ms)| Op::Quarantine { target, ms }),
        2 => prop_oneof![Just(0u64), 1u64..2_000].prop_map(|ms| Op::Advance { ms }),
    ]
}

fn range() -> impl Strategy<Value = Range> {
    let start = prop_oneof![6 => 40_000u16..=40_003, 1 => 65_522u16..=65_535, 1 => 0u16..=3];
    (start, 0u16..=12).prop_map(|(start, len)| Range(start..=start.saturating_add(len)))
}

/// Runs `check_invariants`, turning its panic into a failure that names the operation.
fn invariants(pool: &PortPool, i: usize, op: &Op) -> Result<(), TestCaseError> {
    panic::catch_unwind(|| pool.check_invariants()).map_err(|payload| {
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        TestCaseError::fail(format!("op #{i} {op:?}: check_invariants: {msg}"))
    })
}

/// Runs `ops` against a fresh pool and the model, comparing after every operation.
fn run(range: &Range, ops: &[Op]) -> Result<(), TestCaseError> {
    let t0 = Instant::now();
    let mut now = t0;
    let mut pool = PortPool::new(range.0.clone());
    let mut model = Model::new(&range.0);
    pool.check_invariants();
    prop_assert_eq!(pool.capacity(), model.pairs.len(), "capacity of {:?}", range);
    let (start, end) = (*range.0.start(), *range.0.end());

    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::Advance { ms } => now += Duration::from_millis(*ms),
            Op::Allocate => {
                let usable = model.usable(now);
                let got = pool.allocate(now);
                let want = model.allocate(now);
                // What any allocator must do, whatever its order.
                prop_assert_eq!(
                    got.is_some(),
                    !usable.is_empty(),
                    "op #{} {:?}: got {:?} with usable pairs {:?}",
                    i,
                    op,
                    got,
                    usable
                );
                if let Some(p) = got {
                    prop_assert!(
                        p.video >= start
                            && (p.video - start).is_multiple_of(2)
                            && u32::from(p.audio()) == u32::from(p.video) + 1
                            && p.audio() <= end,
                        "op #{} {:?}: {} is not an aligned adjacent pair of {:?}",
                        i,
                        op,
                        p,
                        range
                    );
                    prop_assert!(
                        usable.contains(&p.video),
                        "op #{} {:?}: {} was allocated or quarantined (usable: {:?})",
                        i,
                        op,
                        p,
                        usable
                    );
                }
                // The documented round-robin order.
                prop_assert_eq!(
                    got.map(|p| p.video),
                    want,
                    "op #{} {:?}: round-robin order (usable {:?})",
                    i,
                    op,
                    usable
                );
            }
            Op::Release { target } => {
                let video = model.resolve(target);
                let got = pool.release(PortPair { video });
                let want = model.allocated.remove(&video);
                prop_assert_eq!(got, want, "op #{} {:?} on {}", i, op, video);
            }
            Op::Quarantine { target, ms } => {
                let video = model.resolve(target);
                let until = now + Duration::from_millis(*ms);
                let got = pool.quarantine(PortPair { video }, until);
                let want = model.allocated.remove(&video);
                if want {
                    model.quarantined.insert(video, until);
                }
                prop_assert_eq!(got, want, "op #{} {:?} on {}", i, op, video);
            }
        }

        invariants(&pool, i, op)?;
        prop_assert_eq!(pool.in_use(), model.allocated.len(), "op #{} {:?}: in_use", i, op);
        for later in [0, 1, 999, 2_999, 60_000] {
            let t = now + Duration::from_millis(later);
            prop_assert_eq!(
                pool.quarantined(t),
                model.quarantined_at(t),
                "op #{} {:?}: quarantined(now + {} ms)",
                i,
                op,
                later
            );
        }
        prop_assert_eq!(
            pool.next_unquarantine().map(|t| t - t0),
            model.quarantined.values().min().map(|t| *t - t0),
            "op #{} {:?}: next_unquarantine (as time since the start)",
            i,
            op
        );
        for port in start.saturating_sub(3)..=end.saturating_add(3) {
            let want = model.is_pair(port) && model.allocated.contains(&port);
            prop_assert_eq!(
                pool.is_allocated(PortPair { video: port }),
                want,
                "op #{} {:?}: is_allocated({})",
                i,
                op,
                port
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    #[test]
    fn port_pool_matches_the_model(range in range(), ops in prop::collection::vec(op(), 1..500)) {
        run(&range, &ops)?;
    }
}
