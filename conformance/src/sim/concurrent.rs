//! Crash runs of random scripts with several requests in flight at once.
//!
//! [`crash_test`](super::crash_test) runs a script one request at a time, so no request
//! ever arrives while another's ops (or a write-back cycle a flush started) are still in
//! flight. Here the script's steps go in as batches: consecutive writes, zeroes, discards,
//! reads and flushes whose ranges share no sector (discards: no cluster), two to eight at a
//! time, submitted as a guest queue refills ([`Sim::run_batch`]); reopens and resizes run
//! alone. Ops complete in random order with a crash point after every completion. The
//! oracle follows the requests as they finish: a flush makes durable everything before its
//! batch and the requests of the batch seen done before it was sent, and in write-through
//! mode a write or write-zeroes is durable once done.

use std::cell::RefCell;

use qcow2_proto::Request;

use super::driver::Sim;
use super::oracle::BatchDurability;
use super::rng::Rng;
use super::{
    check_scripts, completed, create_options, engine_config, new_oracle, prepare, verify,
    CrashConfig, Tally,
};
use crate::script::{clip, Op, Script, MAX_OFFSET};

/// The most requests a batch holds.
const MAX_BATCH: u64 = 8;

/// How a step may join a batch.
enum Joins {
    /// Only alone (reopen, resize).
    Alone,
    /// Always (a flush; a step clipped to nothing, which sends no request).
    Always,
    /// When no step of the batch touches `[start, end)`.
    Range(u64, u64),
}

fn joins(op: &Op, size: u64, cs: u64) -> Joins {
    let range = |offset, len, unit: u64| match clip(offset, len, size) {
        Some((o, l)) => Joins::Range(o / unit * unit, (o + l).div_ceil(unit) * unit),
        None => Joins::Always,
    };
    match *op {
        Op::Write { offset, len, .. }
        | Op::Read { offset, len }
        | Op::Zeroes { offset, len, .. } => range(offset, len, 512),
        // (Whole clusters go; the range's partial ones are left, but kept apart anyway.)
        Op::Discard { offset, len } => range(offset, len, cs),
        Op::Flush => Joins::Always,
        Op::Reopen | Op::Resize { .. } => Joins::Alone,
    }
}

/// Runs `script` in batches, taking a crash point after every op completion.
fn run_script(
    cfg: &CrashConfig,
    script: &Script,
    seed: u64,
    tally: &RefCell<Tally>,
) -> Result<(), String> {
    let (mut sim, _) = Sim::create(create_options(cfg), engine_config(cfg), seed)?;
    let mut oracle = new_oracle(cfg);
    let mut rng = Rng::new(seed ^ 0xBA7C4);
    let cs = u64::from(cfg.cluster_size);
    let ops = &script.ops;
    let mut step = 0;
    while step < ops.len() {
        let first = step;
        let most = 2 + rng.below(MAX_BATCH - 1) as usize;
        let mut taken: Vec<(u64, u64)> = Vec::new();
        while step < ops.len() && step - first < most {
            match joins(&ops[step], oracle.len(), cs) {
                Joins::Alone if step > first => break,
                Joins::Alone => {
                    step += 1;
                    break;
                }
                Joins::Always => {}
                Joins::Range(s, e) => {
                    if taken.iter().any(|&(ts, te)| s < te && ts < e) {
                        break;
                    }
                    taken.push((s, e));
                }
            }
            step += 1;
        }
        let steps: Vec<&Op> = ops[first..step].iter().collect();
        let before = oracle.clone();
        let mut requests = Vec::new();
        for op in &steps {
            if let Some(r) = prepare(op, &mut oracle, cs, cfg) {
                requests.push(r);
            }
        }
        let kinds: Vec<Request> = requests.iter().map(|(r, _)| *r).collect();
        let at_once = 1 + rng.below(requests.len().max(1) as u64) as usize;
        // What a crash may find, as the batch's requests finish.
        let live = RefCell::new(oracle.clone());
        let mut made = BatchDurability::new(kinds.clone(), cfg.write_through);
        let mut done = |i: usize, seen: &[usize]| {
            if made.done(i, seen) {
                *live.borrow_mut() = made.oracle(&before, |o| {
                    for op in &steps {
                        prepare(op, o, cs, cfg);
                    }
                });
            }
        };
        let mut failure = None;
        let mut point = |d: &super::disk::SimDisk| {
            let found = verify(d.crash(&mut rng), &live.borrow(), seed, MAX_OFFSET);
            if let Some(p) = tally.borrow_mut().point(found) {
                failure.get_or_insert_with(|| format!("crash during steps {first}..{step}: {p}"));
            }
        };
        let results = sim
            .run_batch(requests, at_once, &mut point, &mut done)
            .map_err(|e| format!("steps {first}..{step}: {e}"))?;
        if let Some(f) = failure {
            tally.borrow_mut().first.get_or_insert_with(|| f.clone());
            return Err(f);
        }
        oracle = live.into_inner();
        for (request, (result, buf)) in kinds.iter().zip(results) {
            result.map_err(|e| format!("steps {first}..{step}: {request:?} failed: {e}"))?;
            if let (Request::Read { offset, len }, Some(got)) = (request, &buf) {
                if got.as_slice() != oracle.current(*offset, *len as usize) {
                    return Err(format!(
                        "steps {first}..{step}: {request:?} differs from the model"
                    ));
                }
            }
            if matches!(request, Request::Close) {
                completed(*request, &mut oracle, cfg);
                let disk = std::mem::take(&mut sim.disk);
                sim = Sim::open(disk, engine_config(cfg), seed ^ step as u64)?.0;
            }
        }
    }
    Ok(())
}

/// Runs `cfg.scripts` random scripts in batches of concurrent requests, with a crash point
/// after every op completion; panics (with a shrunk script) on the first corruption or lost
/// write, and returns the tally. Compressed writes are not batched: `cfg.compressed` must
/// be off.
pub fn concurrent_crash_test(name: &str, cfg: CrashConfig) -> Tally {
    assert!(
        !cfg.compressed,
        "compressed writes are not run concurrently"
    );
    check_scripts(name, &cfg, run_script)
}
