//! The crash simulator: the engine driven directly over a simulated disk ([`disk::SimDisk`])
//! that keeps a current and a durable image, with ops completing in a seeded random order.
//!
//! Random guest scripts (writes, zeroes, discards, flushes, resizes, reopens) run to their
//! end; after *every* op completion the simulator takes a crash point: the durable image
//! plus a random subset of the unflushed writes (torn at sector boundaries) is opened again,
//! `check` must find no corruption (leaks are allowed), and every guest sector must hold one
//! of the contents the [`oracle::Oracle`] allows since the last completed flush.
//!
//! [`concurrent`] runs the same scripts with several requests in flight (steps that share
//! no sector go in as one batch), and [`streams`] runs sequential write streams so; there a
//! flush is held to what completed before it was sent.
//!
//! Each run prints `crash points: N, corruptions: C, lost writes: L`. The CI run covers more
//! than ten thousand crash points; a soak is the same tests with more scripts:
//!
//! ```text
//! QCOW2_QC_TESTS=2000 cargo test --release -p qcow2-conformance --test crash -- --nocapture
//! ```

pub mod amend;
pub mod bitmaps;
pub mod concurrent;
pub mod disk;
pub mod driver;
pub mod oracle;
pub mod rng;
pub mod snapshots;
pub mod streams;

use std::cell::RefCell;

use qcow2_proto::{CacheMode, CreateOptions, ImageConfig, Outcome, Repair, Request, RequestError};

use crate::model::{pattern, synthetic_backing, SYNTHETIC_BACKING_LEN};
use crate::prop;
use crate::script::{clip, Op, Script, MAX_OFFSET};
use disk::{SimDisk, SECTOR};
use driver::{Sim, SimResult};
use oracle::Oracle;
use rng::Rng;

/// Virtual size scripts start from.
pub(crate) const START_SIZE: u64 = 4 << 20;

/// What a crash run exercises.
#[derive(Clone, Copy, Debug)]
pub struct CrashConfig {
    /// qcow2 version (2 or 3).
    pub version: u32,
    /// Cluster size in bytes.
    pub cluster_size: u32,
    /// Write-through: every completed write must survive a crash.
    pub write_through: bool,
    /// Create with `lazy_refcounts=on` (v3).
    pub lazy_refcounts: bool,
    /// Scripts to run unless `QCOW2_QC_TESTS` says otherwise.
    pub scripts: u64,
    /// Operations per script (quickcheck's size).
    pub script_len: usize,
    /// Create the image over a (synthetic, raw) backing file: every partial write into an
    /// unallocated cluster copies from it.
    pub backing: bool,
    /// Turn every third write into a compressed write of the cluster it starts in (a
    /// typed refusal, and no change, when that cluster is allocated).
    pub compressed: bool,
    /// Create with extended L2 entries (subclusters; version 3, clusters of 16 KiB or
    /// more): partial writes into unallocated clusters copy only the edge subclusters,
    /// writes into allocated clusters mark subclusters allocated once the data is written.
    pub extended_l2: bool,
    /// The L2 cache budget (default: QEMU's): a small one makes write-back cycles run in
    /// the middle of requests that walk many tables.
    pub l2_cache_bytes: Option<u64>,
    /// Host space allocated ahead ([`ImageConfig::grow_step`]; 0: off, the core's default).
    /// On, refcounts are written ahead of allocation and data in never-written host space
    /// may reach the disk after the L2 entries that map it.
    pub grow_step: u64,
}

/// What a run found.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    /// Crash points taken.
    pub points: u64,
    /// Crash points whose image failed to open or check clean (leaks allowed).
    pub corruptions: u64,
    /// Guest sectors, over all crash points, holding contents the oracle does not allow.
    pub lost: u64,
    /// The first problem seen, for the failure message.
    pub first: Option<String>,
}

impl Tally {
    /// Counts a crash point with what [`verify`] found there; returns the problem.
    pub(crate) fn point(&mut self, (problem, lost): (Option<String>, u64)) -> Option<String> {
        self.points += 1;
        self.lost += lost;
        if problem.is_some() && lost == 0 {
            self.corruptions += 1;
        }
        problem
    }

    /// The summary line.
    pub fn line(&self) -> String {
        format!(
            "crash points: {}, corruptions: {}, lost writes: {}",
            self.points, self.corruptions, self.lost
        )
    }
}

pub(crate) fn engine_config(cfg: &CrashConfig) -> ImageConfig {
    let mut c = ImageConfig::new(0);
    if cfg.write_through {
        c.cache_mode = CacheMode::WriteThrough;
    }
    c.l2_cache_bytes = cfg.l2_cache_bytes;
    c.grow_step = cfg.grow_step;
    c
}

/// Opens a crashed image and compares its guest bytes below `max` with the oracle. Returns
/// the problem, if any, and the number of sectors holding contents the oracle does not
/// allow.
pub(crate) fn verify(img: Vec<u8>, oracle: &Oracle, seed: u64, max: u64) -> (Option<String>, u64) {
    let mut config = ImageConfig::new(0);
    config.read_only = true;
    let (mut sim, info) = match Sim::open(SimDisk::new(img.clone()), config, seed) {
        Ok(x) => x,
        Err(e) if e.contains("dirty") => match repair(img, seed) {
            Ok(x) => x,
            Err(e) => return (Some(format!("the dirty image does not repair: {e}")), 0),
        },
        Err(e) => return (Some(format!("the image does not open: {e}")), 0),
    };
    match sim.run(Request::Check { repair: None }, None, &mut |_| {}) {
        Ok((Ok(Outcome::Check(r)), _)) if r.corruptions == 0 && r.check_errors == 0 => {}
        Ok((r, _)) => return (Some(format!("check after the crash: {r:?}")), 0),
        Err(e) => return (Some(e), 0),
    }
    let end = info.size.min(max);
    let mut lost = 0;
    let mut first = None;
    let mut offset = 0;
    while offset < end {
        let len = (end - offset).min(1 << 20);
        let buf = vec![0u8; len as usize];
        let got = match sim.run(Request::Read { offset, len }, Some(buf), &mut |_| {}) {
            Ok((Ok(_), Some(buf))) => buf,
            other => return (Some(format!("read after the crash: {other:?}")), lost),
        };
        for (i, sector) in got.chunks(SECTOR).enumerate() {
            let s = offset as usize / SECTOR + i;
            if sector.len() == SECTOR && !oracle.allows(s, sector) {
                lost += 1;
                first.get_or_insert_with(|| {
                    format!("guest sector {s} holds contents never allowed")
                });
            }
        }
        offset += len;
    }
    (first, lost)
}

/// Opens a dirty (lazy-refcounts) crash image for repair, rebuilds its refcounts like
/// QEMU's automatic repair, and reopens it read-only.
fn repair(img: Vec<u8>, seed: u64) -> SimResult<(Sim, qcow2_proto::ImageInfo)> {
    let mut config = ImageConfig::new(0);
    config.check_only = true;
    let (mut sim, _) = Sim::open(SimDisk::new(img), config, seed)?;
    match sim.run(
        Request::Check {
            repair: Some(Repair::All),
        },
        None,
        &mut |_| {},
    )? {
        (Ok(_), _) => {}
        (Err(e), _) => return Err(format!("repair: {e}")),
    }
    if let (Err(e), _) = sim.run(Request::Close, None, &mut |_| {})? {
        return Err(format!("close after repair: {e}"));
    }
    let mut config = ImageConfig::new(0);
    config.read_only = true;
    Sim::open(SimDisk::new(sim.disk.current().to_vec()), config, seed)
}

/// The request for script step `op`, with its buffer, after telling the oracle what it may
/// change; `None` when the step falls outside the disk.
pub(crate) fn prepare(
    op: &Op,
    oracle: &mut Oracle,
    cs: u64,
    cfg: &CrashConfig,
) -> Option<(Request, Option<Vec<u8>>)> {
    let size = oracle.len();
    Some(match *op {
        Op::Write { offset, seed, .. } if cfg.compressed && seed % 3 == 0 => {
            let (offset, _) = clip(offset, 1, size)?;
            let offset = offset / cs * cs;
            let len = cs.min(size - offset);
            let data = pattern(seed, offset, len as usize);
            oracle.write(offset, &data);
            (Request::WriteCompressed { offset, len }, Some(data))
        }
        Op::Write { offset, len, seed } => {
            let (offset, len) = clip(offset, len, size)?;
            let data = pattern(seed, offset, len as usize);
            oracle.write(offset, &data);
            (Request::Write { offset, len }, Some(data))
        }
        Op::Read { offset, len } => {
            let (offset, len) = clip(offset, len, size)?;
            (Request::Read { offset, len }, Some(vec![0; len as usize]))
        }
        Op::Zeroes { offset, len, unmap } => {
            let (offset, len) = clip(offset, len, size)?;
            oracle.zero(offset, len);
            (Request::WriteZeroes { offset, len, unmap }, None)
        }
        Op::Discard { offset, len } => {
            let (offset, len) = clip(offset, len, size)?;
            // (Over a backing file a v2 image, with no zero flag, keeps discarded data.)
            if !(cfg.backing && cfg.version < 3) {
                oracle.discard(offset, len, cs);
            }
            (Request::Discard { offset, len }, None)
        }
        Op::Flush => (Request::Flush, None),
        Op::Reopen => (Request::Close, None),
        Op::Resize { size } => {
            oracle.resize(size);
            (Request::Resize { size, shrink: true }, None)
        }
    })
}

/// Creation options for a run.
pub(crate) fn create_options(cfg: &CrashConfig) -> CreateOptions {
    let mut create = CreateOptions::new(START_SIZE);
    create.version = cfg.version;
    create.cluster_size = cfg.cluster_size;
    create.lazy_refcounts = cfg.lazy_refcounts;
    create.extended_l2 = cfg.extended_l2;
    if cfg.backing {
        create.backing_file = Some("base.raw".into());
        create.backing_format = Some("raw".into());
    }
    create
}

/// The oracle of a fresh image: zeros, or the backing file showing through.
pub(crate) fn new_oracle(cfg: &CrashConfig) -> Oracle {
    if cfg.backing {
        let mut base = vec![0u8; SYNTHETIC_BACKING_LEN as usize];
        synthetic_backing(1, 0, &mut base);
        Oracle::with_base(START_SIZE, MAX_OFFSET, &base)
    } else {
        Oracle::new(START_SIZE, MAX_OFFSET)
    }
}

/// After a request completed: what became durable.
pub(crate) fn completed(request: Request, oracle: &mut Oracle, cfg: &CrashConfig) {
    match request {
        Request::Flush | Request::Close => oracle.flushed(),
        // Write-through promises durability for writes, not for discards (as QEMU).
        Request::Write { offset, len }
        | Request::WriteZeroes { offset, len, .. }
        | Request::WriteCompressed { offset, len }
            if cfg.write_through =>
        {
            oracle.settled(offset, len)
        }
        _ => {}
    }
}

/// Runs `script`, taking a crash point after every op completion.
fn run_script(
    cfg: &CrashConfig,
    script: &Script,
    seed: u64,
    tally: &RefCell<Tally>,
) -> Result<(), String> {
    let (mut sim, _) = Sim::create(create_options(cfg), engine_config(cfg), seed)?;
    let mut oracle = new_oracle(cfg);
    let mut rng = Rng::new(seed ^ 0xC0FFEE);
    let mut failures = Vec::new();
    let cs = u64::from(cfg.cluster_size);
    for (step, op) in script.ops.iter().enumerate() {
        let mut point = |d: &SimDisk, oracle: &Oracle| {
            let found = verify(d.crash(&mut rng), oracle, seed, MAX_OFFSET);
            let problem = tally.borrow_mut().point(found);
            if let Some(p) = problem {
                let msg = format!("crash during step {step} {op:?}: {p}");
                tally.borrow_mut().first.get_or_insert_with(|| msg.clone());
                failures.push(msg);
            }
        };
        let before = cfg.compressed.then(|| oracle.clone());
        let Some((request, buf)) = prepare(op, &mut oracle, cs, cfg) else {
            continue;
        };
        let frozen = oracle.clone();
        let (result, buf) = sim.run(request, buf, &mut |d| point(d, &frozen))?;
        if let (Request::WriteCompressed { .. }, Err(RequestError::CompressedWrite(_))) =
            (request, &result)
        {
            // Refused before any I/O (its cluster is allocated): nothing changed.
            oracle = before.expect("kept for compressed writes");
            continue;
        }
        result.map_err(|e| format!("step {step} {op:?} failed: {e}"))?;
        if let (Request::Read { offset, len }, Some(got)) = (request, &buf) {
            if got.as_slice() != oracle.current(offset, len as usize) {
                return Err(format!(
                    "step {step} {op:?}: the read differs from the model"
                ));
            }
        }
        completed(request, &mut oracle, cfg);
        if matches!(request, Request::Close) {
            let disk = std::mem::take(&mut sim.disk);
            sim = Sim::open(disk, engine_config(cfg), seed ^ step as u64)?.0;
        }
        if let Some(f) = failures.first() {
            return Err(f.clone());
        }
    }
    Ok(())
}

/// Runs `cfg.scripts` random scripts with a crash point after every op completion; panics
/// (with a shrunk script) on the first corruption or lost write, and returns the tally.
pub fn crash_test(name: &str, cfg: CrashConfig) -> Tally {
    check_scripts(name, &cfg, run_script)
}

/// A script runner: the script, its seed, and the tally its crash points go to.
pub(crate) type ScriptRun = fn(&CrashConfig, &Script, u64, &RefCell<Tally>) -> Result<(), String>;

/// Runs `cfg.scripts` random scripts through `run` (each with its own seed), shrinking the
/// first that fails; prints the tally line and returns the tally (panics on a failure).
pub(crate) fn check_scripts(name: &str, cfg: &CrashConfig, run: ScriptRun) -> Tally {
    let tally = RefCell::new(Tally::default());
    let seeds = RefCell::new(0u64);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        prop::check::<Script>(
            name,
            prop::test_count(cfg.scripts),
            cfg.script_len,
            |script| {
                let seed = {
                    let mut s = seeds.borrow_mut();
                    *s += 1;
                    *s
                };
                run(cfg, script, seed, &tally)
            },
        );
    }));
    let t = tally.into_inner();
    println!("{name}: {}", t.line());
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    t
}

/// Runs one given `script` (a regression found by [`crash_test`]) with a crash point after
/// every op completion, `seeds` times with different crash subsets; returns the tally
/// (corruptions and lost writes counted, not panicked on).
pub fn crash_script(cfg: CrashConfig, script: &Script, seeds: u64) -> Tally {
    let tally = RefCell::new(Tally::default());
    for seed in 1..=seeds {
        // (A failure is counted in the tally; the script itself stops there.)
        let _ = run_script(&cfg, script, seed, &tally);
    }
    tally.into_inner()
}

/// What the fault-injection runs found.
#[derive(Clone, Debug, Default)]
pub struct FaultTally {
    /// Runs, one per op position of each script.
    pub runs: u64,
    /// Runs where the injected error failed a request (with a typed error).
    pub failed_requests: u64,
    /// Runs that poisoned the engine.
    pub poisoned: u64,
}

/// Runs `script` with an I/O error at the `at`-th op completion (none when `at` is `None`);
/// returns the completions the script took, whether a request failed and whether the engine
/// was poisoned. Fails when an error is untyped, a poisoned engine accepts a request, or the
/// image afterwards is corrupt or lost flushed data.
fn run_with_fault(
    cfg: &CrashConfig,
    script: &Script,
    seed: u64,
    at: Option<u64>,
) -> Result<(u64, bool, bool), String> {
    let (mut sim, _) = Sim::create(create_options(cfg), engine_config(cfg), seed)?;
    // Completions of earlier sessions, and where this session's count started.
    let (mut done, mut start) = (0, sim.completions);
    let arm = |sim: &mut Sim, done: u64| {
        sim.fault = at
            .and_then(|at| at.checked_sub(done))
            .map(|rel| driver::Fault {
                at: sim.completions + rel,
                errno: if rel % 2 == 0 { 5 } else { 28 },
                kind: match rel % 3 {
                    0 => driver::FaultKind::Fail,
                    1 => driver::FaultKind::Torn,
                    _ => driver::FaultKind::Short,
                },
            });
    };
    arm(&mut sim, done);
    let mut oracle = new_oracle(cfg);
    let cs = u64::from(cfg.cluster_size);
    let (mut failed, mut poisoned) = (false, false);
    for (step, op) in script.ops.iter().enumerate() {
        let before = cfg.compressed.then(|| oracle.clone());
        let Some((request, buf)) = prepare(op, &mut oracle, cs, cfg) else {
            continue;
        };
        let (result, buf) = sim.run(request, buf, &mut |_| {})?;
        match result {
            Err(RequestError::CompressedWrite(_)) if !failed => {
                oracle = before.expect("kept for compressed writes");
                continue;
            }
            Ok(_) => {
                if poisoned {
                    return Err(format!("step {step} {op:?} succeeded on a poisoned engine"));
                }
                if let (Request::Read { offset, len }, Some(got), false) = (request, &buf, failed) {
                    if got.as_slice() != oracle.current(offset, len as usize) {
                        return Err(format!("step {step} {op:?}: the read differs"));
                    }
                }
                completed(request, &mut oracle, cfg);
            }
            Err(RequestError::Io(_) | RequestError::NoSpace) => failed = true,
            Err(RequestError::Poisoned) => {
                failed = true;
                poisoned = true;
            }
            Err(e) => return Err(format!("step {step} {op:?}: unexpected error {e}")),
        }
        if failed {
            // One more request shows whether the engine stopped: a poisoned engine refuses it.
            let (r, _) = sim.run(Request::Flush, None, &mut |_| {})?;
            match r {
                Err(RequestError::Poisoned) => poisoned = true,
                Err(RequestError::Io(_) | RequestError::NoSpace) if !poisoned => {}
                // The model now has the failed request's data, which may not have landed:
                // the oracle keeps allowing what it allowed before.
                Ok(_) if !poisoned => {}
                other => return Err(format!("flush after the failure: {other:?}")),
            }
            break;
        }
        if matches!(request, Request::Close) {
            done += sim.completions - start;
            let disk = std::mem::take(&mut sim.disk);
            sim = Sim::open(disk, engine_config(cfg), seed ^ step as u64)?.0;
            start = sim.completions;
            arm(&mut sim, done);
        }
    }
    let completions = done + sim.completions - start;
    sim.settle(&mut |_| {});
    // The process goes on (no crash): reopen what the file holds now.
    let (problem, lost) = verify(sim.disk.current().to_vec(), &oracle, seed, MAX_OFFSET);
    if let Some(p) = problem {
        return Err(format!("after the fault at {at:?}: {p} ({lost} sectors)"));
    }
    Ok((completions, failed, poisoned))
}

/// Injects EIO and ENOSPC at every op position of `cfg.scripts` random scripts in turn;
/// a failing write fails whole, torn (a sector prefix lands) or short (a sector prefix
/// lands and is reported as success with a short count).
pub fn fault_test(name: &str, cfg: CrashConfig) -> FaultTally {
    let tally = RefCell::new(FaultTally::default());
    let seeds = RefCell::new(0u64);
    prop::check::<Script>(
        name,
        prop::test_count(cfg.scripts),
        cfg.script_len,
        |script| {
            let seed = {
                let mut s = seeds.borrow_mut();
                *s += 1;
                *s
            };
            let (total, _, _) = run_with_fault(&cfg, script, seed, None)?;
            for at in 0..total {
                let (_, failed, poisoned) = run_with_fault(&cfg, script, seed, Some(at))?;
                let mut t = tally.borrow_mut();
                t.runs += 1;
                t.failed_requests += u64::from(failed);
                t.poisoned += u64::from(poisoned);
            }
            Ok(())
        },
    );
    let t = tally.into_inner();
    println!(
        "{name}: fault runs: {}, failed requests: {}, poisoned: {}",
        t.runs, t.failed_requests, t.poisoned
    );
    t
}

/// Reads the whole disk of an open simulated image.
pub(crate) fn read_all(sim: &mut Sim, len: u64) -> SimResult<Vec<u8>> {
    match sim.run(
        Request::Read { offset: 0, len },
        Some(vec![0; len as usize]),
        &mut |_| {},
    )? {
        (Ok(_), Some(b)) => Ok(b),
        (r, _) => Err(format!("read: {r:?}")),
    }
}

/// A read-only configuration.
pub(crate) fn read_only() -> ImageConfig {
    let mut c = ImageConfig::new(0);
    c.read_only = true;
    c
}
