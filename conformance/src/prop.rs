//! A small property runner over quickcheck's generators and shrinkers.
//!
//! quickcheck's own runner wants `'static` properties; ours borrow the harness, so the loop
//! lives here: generate from a seed, run, and on failure shrink greedily and report the
//! minimal input with the seed that reproduces it.

use std::fmt::Debug;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{SystemTime, UNIX_EPOCH};

use quickcheck::{Arbitrary, Gen};

/// How many inputs one property tries (`QCOW2_QC_TESTS` overrides).
pub fn test_count(default: u64) -> u64 {
    std::env::var("QCOW2_QC_TESTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The first seed of a randomized run: `QCOW2_SEED`, or taken from the clock.
pub fn base_seed() -> u64 {
    std::env::var("QCOW2_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                % 1_000_000_007
        })
}

/// Most property runs spent on shrinking one failure.
const SHRINK_BUDGET: u32 = 400;

fn run_one<T>(prop: &impl Fn(&T) -> Result<(), String>, input: &T) -> Result<(), String> {
    match catch_unwind(AssertUnwindSafe(|| prop(input))) {
        Ok(r) => r,
        Err(panic) => Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .map_or_else(|| "panicked".to_owned(), |m| format!("panicked: {m}"))),
    }
}

/// Checks `prop` on `tests` inputs generated with `size`; panics with the shrunk
/// counterexample on failure. The base seed comes from `QCOW2_SEED` or the clock.
pub fn check<T: Arbitrary + Debug>(
    name: &str,
    tests: u64,
    size: usize,
    prop: impl Fn(&T) -> Result<(), String>,
) {
    let base = base_seed();
    for i in 0..tests {
        let seed = base.wrapping_add(i);
        let input = T::arbitrary(&mut Gen::from_size_and_seed(size, seed));
        let Err(first) = run_one(&prop, &input) else {
            continue;
        };
        let (mut best, mut why, mut budget, mut steps) =
            (input, first.clone(), SHRINK_BUDGET, 0u32);
        'shrink: while budget > 0 {
            for candidate in best.shrink() {
                if budget == 0 {
                    break 'shrink;
                }
                budget -= 1;
                if let Err(e) = run_one(&prop, &candidate) {
                    best = candidate;
                    why = e;
                    steps += 1;
                    continue 'shrink;
                }
            }
            break;
        }
        panic!(
            "{name}: property failed on input {i} (QCOW2_SEED={base} reproduces; input seed {seed})\n\
             first failure: {first}\n\
             shrunk in {steps} steps to:\n{best:?}\n\
             which fails with: {why}"
        );
    }
}
