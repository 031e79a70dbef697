//! Crash points inside internal-snapshot operations (create, apply, delete).
//!
//! Between operations, random writes and zeroes are made durable by a flush; each snapshot
//! operation then runs with a crash point after every op completion. A crashed image must:
//!
//! * open, and list either the snapshots from before the operation or those from after it;
//! * read, as the active disk, the contents from before or (for an apply) from after: an
//!   apply switches atomically;
//! * read every snapshot it lists as that snapshot was taken;
//! * check with no error but COPIED flags that disagree with a refcount (a crash between
//!   a refcount change and the matching flag change, as in QEMU; never a refcount below
//!   its references) and leaks, and check clean after `check -r all`.

use std::cell::RefCell;

use qcow2_proto::{ImageConfig, Outcome, Repair, Request, SnapshotRef};

use super::disk::SimDisk;
use super::driver::{Fault, FaultKind, Sim, SimResult};
use super::rng::Rng;
use super::{create_options, engine_config, read_all, read_only, CrashConfig, Tally, START_SIZE};
use crate::model::{pattern, synthetic_backing};

/// The guest contents and snapshots (name, contents) at one moment.
#[derive(Clone, Debug)]
struct State {
    active: Vec<u8>,
    snaps: Vec<(String, Vec<u8>)>,
}

/// Checks a crashed image against the states from before and after the operation (`apply`:
/// whether the active contents may be either).
fn verify(img: Vec<u8>, before: &State, after: &State, apply: bool, seed: u64) -> Option<String> {
    let (mut sim, info) = match Sim::open(SimDisk::new(img.clone()), read_only(), seed) {
        Ok(x) => x,
        Err(e) => return Some(format!("the image does not open: {e}")),
    };
    match sim.run(Request::Check { repair: None }, None, &mut |_| {}) {
        Ok((Ok(Outcome::Check(r)), _)) => {
            let bad: Vec<&String> = r
                .messages
                .iter()
                .filter(|m| m.starts_with("ERROR") && !m.contains("OFLAG_COPIED"))
                .collect();
            if !bad.is_empty() || r.check_errors > 0 {
                return Some(format!("check after the crash: {bad:?} {r:?}"));
            }
        }
        other => return Some(format!("check after the crash: {other:?}")),
    }
    let names: Vec<String> = info.snapshots.iter().map(|s| s.name.clone()).collect();
    fn listed(s: &State) -> Vec<String> {
        s.snaps.iter().map(|(n, _)| n.clone()).collect()
    }
    let state = if names == listed(after) {
        after
    } else if names == listed(before) {
        before
    } else {
        return Some(format!(
            "snapshots {names:?}, neither {:?} nor {:?}",
            listed(before),
            listed(after)
        ));
    };
    let active = match read_all(&mut sim, START_SIZE) {
        Ok(b) => b,
        Err(e) => return Some(e),
    };
    let ok = active == before.active || apply && active == after.active;
    if !ok || !apply && active != state.active {
        return Some("the active disk reads neither as before nor as after".into());
    }
    for (name, want) in &state.snaps {
        let which = SnapshotRef::Name(name.clone());
        let got = Sim::open_snapshot(SimDisk::new(img.clone()), read_only(), which, seed)
            .and_then(|(mut s, _)| read_all(&mut s, START_SIZE));
        match got {
            Ok(g) if &g == want => {}
            Ok(_) => return Some(format!("snapshot {name} reads differently")),
            Err(e) => return Some(format!("snapshot {name}: {e}")),
        }
    }
    clean_after_repair(img, seed)
}

/// The problem, if any, with the image in `img` after `check -r all`: it must check with
/// neither corruption nor leak.
pub(super) fn clean_after_repair(img: Vec<u8>, seed: u64) -> Option<String> {
    let mut config = ImageConfig::new(0);
    config.check_only = true;
    let repaired = Sim::open(SimDisk::new(img), config, seed).and_then(|(mut s, _)| {
        let repair = Request::Check {
            repair: Some(Repair::All),
        };
        s.run(repair, None, &mut |_| {})?
            .0
            .map_err(|e| format!("repair: {e}"))?;
        s.run(Request::Check { repair: None }, None, &mut |_| {})
    });
    match repaired {
        Ok((Ok(Outcome::Check(r)), _)) if r.corruptions == 0 && r.leaks == 0 => None,
        other => Some(format!("check after check -r all: {other:?}")),
    }
}

/// The fault of a fault run: at op completion `at` counted from `start`, EIO or ENOSPC,
/// failing whole, torn or short, by `at`.
pub(super) fn fault_at(start: u64, at: u64) -> Fault {
    Fault {
        at: start.saturating_add(at),
        errno: if at % 2 == 0 { 5 } else { 28 },
        kind: match at % 3 {
            0 => FaultKind::Fail,
            1 => FaultKind::Torn,
            _ => FaultKind::Short,
        },
    }
}

/// Runs `scripts` scripts with `run(seed, fault)`: first without a fault (to count the
/// last operation's completions), then once with a fault at each of them. Panics on the
/// first problem; returns (runs, failed operations).
pub(super) fn fault_runs(
    name: &str,
    scripts: u64,
    mut run: impl FnMut(u64, Option<u64>) -> SimResult<(u64, bool)>,
) -> (u64, u64) {
    let (mut runs, mut failed) = (0, 0);
    for seed in 1..=crate::prop::test_count(scripts) {
        let (total, _) = run(seed, Some(u64::MAX)).unwrap_or_else(|e| panic!("{name}: {e}"));
        for at in 0..total {
            let (_, f) = run(seed, Some(at)).unwrap_or_else(|e| panic!("{name}: {e}"));
            runs += 1;
            failed += u64::from(f);
        }
    }
    (runs, failed)
}

/// `writes` random writes (and zeroes, one in `zero_one_in`, unmapping or not) of up to three
/// clusters over `active` (the model of the guest disk), of data tagged `tag`, then a
/// flush.
pub(super) fn scribble(
    sim: &mut Sim,
    rng: &mut Rng,
    active: &mut [u8],
    cs: u64,
    tag: u32,
    (writes, zero_one_in): (usize, u64),
) -> SimResult<()> {
    for _ in 0..writes {
        let offset = rng.below(START_SIZE);
        let len = (rng.below(3 * cs) + 1).min(START_SIZE - offset);
        let range = offset as usize..(offset + len) as usize;
        let (request, buf) = if rng.below(zero_one_in) == 0 {
            active[range].fill(0);
            let unmap = rng.below(2) == 0;
            (Request::WriteZeroes { offset, len, unmap }, None)
        } else {
            let data = pattern(tag, offset, len as usize);
            active[range].copy_from_slice(&data);
            (Request::Write { offset, len }, Some(data))
        };
        sim.run(request, buf, &mut |_| {})?
            .0
            .map_err(|e| e.to_string())?;
    }
    sim.run(Request::Flush, None, &mut |_| {})?
        .0
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// One script: `steps` rounds of durable writes and one snapshot operation, each with
/// crash points; or, with `fault`, without crash points and with an I/O error at that op
/// completion (counted from the start of the last operation). Returns the completions
/// the last operation took, and whether it failed.
fn run_one(
    cfg: &CrashConfig,
    seed: u64,
    steps: usize,
    tally: &RefCell<Tally>,
    fault: Option<u64>,
) -> SimResult<(u64, bool)> {
    let (mut sim, _) = Sim::create(create_options(cfg), engine_config(cfg), seed)?;
    let mut rng = Rng::new(seed ^ 0x5_4A95);
    let cs = u64::from(cfg.cluster_size);
    let mut state = State {
        active: vec![0; START_SIZE as usize],
        snaps: Vec::new(),
    };
    if cfg.backing {
        // (The synthetic backing file shows through where nothing is written.)
        synthetic_backing(1, 0, &mut state.active);
    }
    for step in 0..steps {
        let tag = seed as u32 ^ step as u32;
        scribble(&mut sim, &mut rng, &mut state.active, cs, tag, (3, 4))?;
        let before = state.clone();
        let mut after = state.clone();
        let pick = rng.below(3);
        let (what, apply) = match pick {
            1 if !state.snaps.is_empty() => {
                let i = rng.below(state.snaps.len() as u64) as usize;
                after.active = state.snaps[i].1.clone();
                (format!("apply {}", state.snaps[i].0), true)
            }
            2 if !state.snaps.is_empty() => {
                let i = rng.below(state.snaps.len() as u64) as usize;
                let (name, _) = after.snaps.remove(i);
                (format!("delete {name}"), false)
            }
            _ => {
                let name = format!("s{step}");
                after.snaps.push((name.clone(), state.active.clone()));
                (format!("create {name}"), false)
            }
        };
        let mut failure = None;
        let mut point = |d: &SimDisk| {
            let problem = verify(d.crash(&mut rng), &before, &after, apply, seed);
            let mut t = tally.borrow_mut();
            t.points += 1;
            if let Some(p) = problem {
                t.corruptions += 1;
                let msg = format!("seed {seed}, crash during step {step} ({what}): {p}");
                t.first.get_or_insert_with(|| msg.clone());
                failure.get_or_insert(msg);
            }
        };
        let name = what
            .split_once(' ')
            .map(|(_, n)| n.to_owned())
            .unwrap_or_default();
        let last = step + 1 == steps;
        let start = sim.completions;
        if let (Some(at), true) = (fault, last) {
            sim.fault = Some(fault_at(start, at));
        }
        let faulty = fault.is_some();
        let (result, _) = sim.run_with(
            &what,
            |e| match what.as_bytes()[0] {
                b'c' => e.snapshot_create(&name, (1_800_000_000, 0), 0),
                b'a' => e.snapshot_apply(SnapshotRef::Name(name.clone())),
                _ => e.snapshot_delete(SnapshotRef::Name(name.clone())),
            },
            None,
            &mut |d| {
                if !faulty {
                    point(d)
                }
            },
        )?;
        if let Some(f) = failure {
            return Err(f);
        }
        if last && faulty {
            // The process goes on (no crash): what the file holds now must be sound.
            let failed = match result {
                Ok(_) => false,
                Err(
                    qcow2_proto::RequestError::Io(_)
                    | qcow2_proto::RequestError::NoSpace
                    | qcow2_proto::RequestError::Poisoned,
                ) => true,
                Err(e) => return Err(format!("{what}: untyped failure {e}")),
            };
            let completions = sim.completions - start;
            sim.settle(&mut |_| {});
            if let Some(p) = verify(sim.disk.current().to_vec(), &before, &after, apply, seed) {
                return Err(format!("seed {seed}, fault at {fault:?} in {what}: {p}"));
            }
            return Ok((completions, failed));
        }
        result.map_err(|e| format!("step {step} {what} failed: {e}"))?;
        if last {
            return Ok((sim.completions - start, false));
        }
        state = after;
    }
    Ok((0, false))
}

/// Runs `cfg.scripts` scripts of snapshot operations with a crash point after every op
/// completion; panics on the first problem, and returns the tally.
pub fn snapshot_crash_test(name: &str, cfg: CrashConfig) -> Tally {
    let tally = RefCell::new(Tally::default());
    let scripts = crate::prop::test_count(cfg.scripts);
    for seed in 1..=scripts {
        if let Err(e) = run_one(&cfg, seed, cfg.script_len, &tally, None) {
            panic!("{name}: {e}");
        }
    }
    let t = tally.into_inner();
    println!(
        "{name}: crash points: {}, corruptions: {}, lost writes: {}",
        t.points, t.corruptions, t.lost
    );
    t
}

/// Runs `cfg.scripts` scripts whose last snapshot operation meets an I/O error (EIO or
/// ENOSPC; failing whole, torn or short) at each of its op completions in turn: the
/// operation fails with a typed error or succeeds, and the file is then as after a crash
/// (before or after, never broken). Returns (runs, failed operations).
pub fn snapshot_fault_test(name: &str, cfg: CrashConfig) -> (u64, u64) {
    let tally = RefCell::new(Tally::default());
    let (runs, failed) = fault_runs(name, cfg.scripts, |seed, fault| {
        run_one(&cfg, seed, cfg.script_len, &tally, fault)
    });
    println!("{name}: fault runs: {runs}, failed operations: {failed}");
    (runs, failed)
}
