//! Crash points and faults inside `amend`: refcount width changes (every width), compat
//! downgrades (zero clusters expanded, over a backing file too) and upgrades, lazy
//! refcounts on and off.
//!
//! Each script writes random data and zeroes (leaving plain and allocated zero clusters,
//! one of them over stale data), takes a snapshot half-way (shared L2 tables, snapshot L1
//! tables), flushes, then runs a few amends in a row, each with a crash point after every op completion. A crashed
//! image must:
//!
//! * open, with the format from before the amend, from after it, or (for an amend of
//!   several options) from a step between in QEMU's order: version, refcount width and
//!   lazy refcounts all from one of them, never a mix;
//! * read as before (an amend never changes guest contents), and read its snapshot as
//!   taken;
//! * check with no corruption and no check error (leaks are tolerated: clusters a
//!   downgrade allocated and has not linked yet), and with no leak after `check -r all`.
//!
//! A refused amend (a refcount that does not fit a narrower width) must fail with its
//! typed error and leave the image as it was.

use std::cell::RefCell;

use qcow2_proto::{
    AmendError, AmendOptions, ImageInfo, Outcome, Request, RequestError, SnapshotRef,
};

use super::disk::SimDisk;
use super::driver::{Sim, SimResult};
use super::rng::Rng;
use super::snapshots::{clean_after_repair, fault_at, fault_runs, scribble};
use super::{create_options, engine_config, read_all, read_only, CrashConfig, Tally, START_SIZE};
use crate::model::{pattern, synthetic_backing};

/// The format options an amend changes: `(version, refcount bits, lazy refcounts)`.
type Format = (u32, u32, bool);

fn format_of(info: &ImageInfo) -> Format {
    (info.version, info.refcount_bits, info.lazy_refcounts)
}

/// The formats `o` takes `f` through, in QEMU's order (upgrade with lazy refcounts,
/// lazy refcounts, refcount width, downgrade); the last is the result.
fn chain(f: Format, o: &AmendOptions) -> Vec<Format> {
    let mut out = vec![f];
    let version = o.version.unwrap_or(f.0);
    let mut now = f;
    if version > f.0 {
        now = (version, f.1, o.lazy_refcounts == Some(true));
    } else if version == f.0 {
        now.2 = o.lazy_refcounts.unwrap_or(f.2);
    }
    out.push(now);
    now.1 = o.refcount_bits.unwrap_or(now.1);
    out.push(now);
    if version < f.0 {
        now = (version, now.1, false);
    }
    out.push(now);
    out.dedup();
    out
}

/// A random amend that the format `f` allows (a narrower width may still be refused for a
/// shared cluster).
fn pick(rng: &mut Rng, f: Format) -> AmendOptions {
    let width = |rng: &mut Rng| 1u32 << rng.below(7);
    match (f.0, rng.below(4)) {
        (2, 0) => AmendOptions {
            version: Some(3),
            lazy_refcounts: Some(rng.below(2) == 0),
            ..AmendOptions::default()
        },
        (2, _) => AmendOptions {
            version: Some(3),
            refcount_bits: Some(width(rng)),
            ..AmendOptions::default()
        },
        (_, 0) => AmendOptions {
            version: Some(2),
            refcount_bits: Some(16),
            lazy_refcounts: Some(false),
        },
        (_, 1) => AmendOptions {
            lazy_refcounts: Some(!f.2),
            ..AmendOptions::default()
        },
        _ => AmendOptions {
            refcount_bits: Some(width(rng)),
            ..AmendOptions::default()
        },
    }
}

/// The guest contents: the active disk and the one snapshot's.
#[derive(Clone, Debug)]
struct State {
    active: Vec<u8>,
    snapshot: Vec<u8>,
}

/// Checks a crashed (or faulted) image: one of the two formats, contents as before, clean
/// but for leaks, and clean after `check -r all`.
fn verify(img: Vec<u8>, state: &State, formats: &[Format], seed: u64) -> Option<String> {
    let (mut sim, info) = match Sim::open(SimDisk::new(img.clone()), read_only(), seed) {
        Ok(x) => x,
        Err(e) => return Some(format!("the image does not open: {e}")),
    };
    let f = format_of(&info);
    if !formats.contains(&f) {
        return Some(format!("format {f:?}, neither of {formats:?}"));
    }
    match sim.run(Request::Check { repair: None }, None, &mut |_| {}) {
        Ok((Ok(Outcome::Check(r)), _)) if r.corruptions == 0 && r.check_errors == 0 => {}
        other => return Some(format!("check after the crash: {other:?}")),
    }
    match read_all(&mut sim, START_SIZE) {
        Ok(b) if b == state.active => {}
        Ok(_) => return Some("the active disk reads differently".into()),
        Err(e) => return Some(e),
    }
    let which = SnapshotRef::Name("s".into());
    let got = Sim::open_snapshot(SimDisk::new(img.clone()), read_only(), which, seed)
        .and_then(|(mut s, _)| read_all(&mut s, START_SIZE));
    match got {
        Ok(g) if g == state.snapshot => {}
        Ok(_) => return Some("the snapshot reads differently".into()),
        Err(e) => return Some(format!("snapshot: {e}")),
    }
    clean_after_repair(img, seed)
}

/// One script: writes, a snapshot, writes, then `steps` amends with crash points; or, with
/// `fault`, the last amend meets an I/O error at that op completion (counted from its
/// start) and no crash points are taken. Returns the completions the last amend took and
/// whether it failed.
fn run_one(
    cfg: &CrashConfig,
    seed: u64,
    steps: usize,
    tally: &RefCell<Tally>,
    fault: Option<u64>,
) -> SimResult<(u64, bool)> {
    let (mut sim, info) = Sim::create(create_options(cfg), engine_config(cfg), seed)?;
    let mut rng = Rng::new(seed ^ 0xA_3E4D);
    let cs = u64::from(cfg.cluster_size);
    let mut state = State {
        active: vec![0; START_SIZE as usize],
        snapshot: Vec::new(),
    };
    if cfg.backing {
        synthetic_backing(1, 0, &mut state.active);
    }
    scribble(
        &mut sim,
        &mut rng,
        &mut state.active,
        cs,
        seed as u32,
        (6, 3),
    )?;
    let create = |e: &mut qcow2_proto::Image| e.snapshot_create("s", (1_800_000_000, 0), 0);
    sim.run_with("snapshot", create, None, &mut |_| {})?
        .0
        .map_err(|e| e.to_string())?;
    state.snapshot = state.active.clone();
    let tag = seed as u32 ^ 0x55;
    scribble(&mut sim, &mut rng, &mut state.active, cs, tag, (6, 3))?;
    // An allocated zero cluster over stale data (a downgrade must write zeroes there
    // before the entry loses its flag, rule C).
    let at = rng.below(START_SIZE / cs) * cs;
    let data = pattern(seed as u32 ^ 0xAA, at, cs as usize);
    let zero = Request::WriteZeroes {
        offset: at,
        len: cs,
        unmap: false,
    };
    for (request, buf) in [
        (
            Request::Write {
                offset: at,
                len: cs,
            },
            Some(data),
        ),
        (zero, None),
    ] {
        sim.run(request, buf, &mut |_| {})?
            .0
            .map_err(|e| e.to_string())?;
    }
    state.active[at as usize..(at + cs) as usize].fill(0);
    sim.run(Request::Flush, None, &mut |_| {})?
        .0
        .map_err(|e| e.to_string())?;
    let mut format = format_of(&info);
    for step in 0..steps {
        let o = pick(&mut rng, format);
        let formats = chain(format, &o);
        let after = *formats.last().expect("one");
        let what = format!("amend {o:?} of {format:?}");
        let mut failure = None;
        let mut point = |d: &SimDisk| {
            let problem = verify(d.crash(&mut rng), &state, &formats, seed);
            let mut t = tally.borrow_mut();
            t.points += 1;
            if let Some(p) = problem {
                t.corruptions += 1;
                let msg = format!("seed {seed}, crash during step {step} ({what}): {p}");
                t.first.get_or_insert_with(|| msg.clone());
                failure.get_or_insert(msg);
            }
        };
        let last = step + 1 == steps;
        let start = sim.completions;
        if let (Some(at), true) = (fault, last) {
            sim.fault = Some(fault_at(start, at));
        }
        let faulty = fault.is_some();
        let (result, _) = sim.run_with(&what, |e| e.amend(o), None, &mut |d| {
            if !faulty {
                point(d)
            }
        })?;
        if let Some(f) = failure {
            return Err(f);
        }
        if last && faulty {
            let failed = match result {
                Ok(_) => false,
                Err(RequestError::Io(_) | RequestError::NoSpace | RequestError::Poisoned) => true,
                Err(RequestError::Amend(AmendError::RefcountTooWide { .. })) => true,
                Err(e) => return Err(format!("{what}: untyped failure {e}")),
            };
            let completions = sim.completions - start;
            sim.settle(&mut |_| {});
            if let Some(p) = verify(sim.disk.current().to_vec(), &state, &formats, seed) {
                return Err(format!("seed {seed}, fault at {fault:?} in {what}: {p}"));
            }
            return Ok((completions, failed));
        }
        match result {
            Ok(_) => format = after,
            // A shared cluster does not fit a narrower width: refused, nothing changed.
            Err(RequestError::Amend(AmendError::RefcountTooWide { bits, .. }))
                if o.refcount_bits == Some(bits) => {}
            Err(e) => return Err(format!("seed {seed}, step {step} {what} failed: {e}")),
        }
        let now = sim.engine.info().map(format_of);
        if now != Some(format) {
            return Err(format!("{what}: the engine says {now:?}, not {format:?}"));
        }
        if last {
            return Ok((sim.completions - start, false));
        }
    }
    Ok((0, false))
}

/// Runs `cfg.scripts` scripts of amends with a crash point after every op completion;
/// panics on the first problem, and returns the tally.
pub fn amend_crash_test(name: &str, cfg: CrashConfig) -> Tally {
    let tally = RefCell::new(Tally::default());
    for seed in 1..=crate::prop::test_count(cfg.scripts) {
        if let Err(e) = run_one(&cfg, seed, cfg.script_len, &tally, None) {
            panic!("{name}: {e}");
        }
    }
    let t = tally.into_inner();
    println!("{name}: {}", t.line());
    t
}

/// Runs `cfg.scripts` scripts whose last amend meets an I/O error (EIO or ENOSPC; failing
/// whole, torn or short) at each of its op completions in turn: the amend fails with a
/// typed error or succeeds, and the file is then as after a crash. Returns (runs, failed
/// amends).
pub fn amend_fault_test(name: &str, cfg: CrashConfig) -> (u64, u64) {
    let tally = RefCell::new(Tally::default());
    let (runs, failed) = fault_runs(name, cfg.scripts, |seed, fault| {
        run_one(&cfg, seed, cfg.script_len, &tally, fault)
    });
    println!("{name}: fault runs: {runs}, failed amends: {failed}");
    (runs, failed)
}
