//! Crash runs of sequential write streams, several requests in flight at once: over a
//! backing file, the case where the engine defers copy-on-write and lets a stream's next
//! writes join an allocation still in flight (so they replace the copy instead of waiting
//! for it); into a growing image (`grow_step`), allocations that finish while a flush's
//! write-back cycle takes its copies.
//!
//! Each round submits a batch: one to three streams in disjoint regions, each a run of
//! consecutive writes (sizes from one sector to two clusters, aligned or not), sometimes one
//! or two flushes among them. Ops complete in random order with a crash point
//! after every completion, as in [`crash_test`](super::crash_test); after the batch every
//! region must read back as the model says.

use std::cell::RefCell;

use qcow2_proto::{Request, RequestError};

use super::driver::Sim;
use super::oracle::BatchDurability;
use super::rng::Rng;
use super::START_SIZE;
use super::{completed, create_options, engine_config, new_oracle, verify, CrashConfig, Tally};
use crate::model::pattern;
use crate::script::MAX_OFFSET;

/// One write of a stream.
struct Piece {
    offset: u64,
    len: u64,
    seed: u32,
}

/// A batch: the streams' writes in submission order (stream by stream), and where flushes
/// go among them (a flush at `k` is sent after the first `k` writes): none, one at the
/// end, or one at the end and one or two among the writes, so that a flush can arrive
/// while the write-back cycle of the one before still runs.
fn batch(rng: &mut Rng, cs: u64, round: u32) -> (Vec<Piece>, Vec<usize>) {
    let streams = 1 + rng.below(3);
    // (Sector-aligned: concurrent writes sharing a sector could land in either order,
    // which the oracle's history of contents does not describe.)
    let region = START_SIZE / streams / 512 * 512;
    let mut pieces = Vec::new();
    for k in 0..streams {
        let base = k * region;
        // Cluster-aligned half the time: a stream that starts a cluster can cover it all.
        let mut at = base + rng.below(region / 2) / 512 * 512;
        if rng.below(2) == 0 {
            // (Up: down could cross into the stream before, whose writes then overlap.)
            at = at.div_ceil(cs) * cs;
        }
        let writes = 2 + rng.below(10);
        let size = match rng.below(3) {
            0 => (1 + rng.below(4)) * 512,
            1 => cs / 4,
            _ => (1 + rng.below(2 * cs / 512)) * 512,
        }
        .max(512);
        for w in 0..writes {
            let len = size.min(base + region - at);
            if len == 0 {
                break;
            }
            pieces.push(Piece {
                offset: at,
                len,
                seed: round * 64 + (k * 16 + w) as u32,
            });
            at += len;
        }
    }
    let n = pieces.len();
    let mut flushes = match rng.below(8) {
        0 | 1 => vec![n],
        2..=4 => vec![rng.below(n as u64 + 1) as usize, n],
        5 => vec![
            rng.below(n as u64 + 1) as usize,
            rng.below(n as u64 + 1) as usize,
            n,
        ],
        _ => vec![],
    };
    flushes.sort_unstable();
    (pieces, flushes)
}

/// Runs `rounds` batches on one image with a crash point after every op completion.
/// Returns the bytes read from the backing file.
fn run(cfg: &CrashConfig, seed: u64, rounds: u32, tally: &RefCell<Tally>) -> Result<u64, String> {
    let (mut sim, _) = Sim::create(create_options(cfg), engine_config(cfg), seed)?;
    let mut oracle = new_oracle(cfg);
    let mut rng = Rng::new(seed);
    let cs = u64::from(cfg.cluster_size);
    for round in 0..rounds {
        let (pieces, flushes) = batch(&mut rng, cs, round);
        let before = oracle.clone();
        let mut requests = Vec::new();
        for (j, p) in pieces.iter().enumerate() {
            for _ in flushes.iter().filter(|&&k| k == j) {
                requests.push((Request::Flush, None));
            }
            let data = pattern(p.seed, p.offset, p.len as usize);
            oracle.write(p.offset, &data);
            requests.push((
                Request::Write {
                    offset: p.offset,
                    len: p.len,
                },
                Some(data),
            ));
        }
        for _ in flushes.iter().filter(|&&k| k == pieces.len()) {
            requests.push((Request::Flush, None));
        }
        // All at once, or as a queue refills (joins then also come while the
        // copy-on-write of an allocation is being read).
        let at_once = match rng.below(2) {
            0 => requests.len(),
            _ => 1 + rng.below(4) as usize,
        };
        // What a crash may find, as the batch's requests finish.
        let live = RefCell::new(oracle.clone());
        let mut made = BatchDurability::new(
            requests.iter().map(|(r, _)| *r).collect(),
            cfg.write_through,
        );
        let mut done = |i: usize, seen: &[usize]| {
            if made.done(i, seen) {
                *live.borrow_mut() = made.oracle(&before, |o| {
                    for p in &pieces {
                        o.write(p.offset, &pattern(p.seed, p.offset, p.len as usize));
                    }
                });
            }
        };
        let mut failure = None;
        let mut point = |d: &super::disk::SimDisk| {
            let found = verify(d.crash(&mut rng), &live.borrow(), seed, MAX_OFFSET);
            let problem = tally.borrow_mut().point(found);
            if let Some(p) = problem {
                failure.get_or_insert_with(|| format!("seed {seed}, round {round}: {p}"));
            }
        };
        if std::env::var("QCOW2_SIM_TRACE").is_ok() {
            let list: Vec<_> = pieces.iter().map(|p| (p.offset, p.len)).collect();
            eprintln!("round {round}: writes {list:?}, flushes after {flushes:?}");
        }
        let results = sim
            .run_batch(requests, at_once, &mut point, &mut done)
            .map_err(|e| format!("seed {seed}, round {round}: {e}"))?;
        if let Some(f) = failure {
            tally.borrow_mut().first.get_or_insert_with(|| f.clone());
            return Err(f);
        }
        oracle = live.into_inner();
        for (r, _) in &results {
            if let Err(e) = r {
                return Err(format!("seed {seed}, round {round}: a request failed: {e}"));
            }
        }
        for p in &pieces {
            let request = Request::Write {
                offset: p.offset,
                len: p.len,
            };
            completed(request, &mut oracle, cfg);
        }
        // (A flush in the batch covered only the writes done before it was sent; one after
        // the batch covers them all.)
        if rng.below(3) == 0 {
            let frozen = oracle.clone();
            let mut failure = None;
            sim.run(Request::Flush, None, &mut |d| {
                let found = verify(d.crash(&mut rng), &frozen, seed, MAX_OFFSET);
                let problem = tally.borrow_mut().point(found);
                if let Some(p) = problem {
                    failure.get_or_insert_with(|| format!("seed {seed}, flush {round}: {p}"));
                }
            })?
            .0
            .map_err(|e| format!("seed {seed}, flush after round {round}: {e}"))?;
            if let Some(f) = failure {
                return Err(f);
            }
            completed(Request::Flush, &mut oracle, cfg);
        }
        // Everything the batch wrote reads back (the model's bytes, backing included).
        let buf = vec![0u8; START_SIZE as usize];
        let request = Request::Read {
            offset: 0,
            len: START_SIZE,
        };
        match sim.run(request, Some(buf), &mut |_| {})? {
            (Ok(_), Some(got)) if got == oracle.current(0, START_SIZE as usize) => {}
            (Ok(_), _) => {
                return Err(format!(
                    "seed {seed}, round {round}: the image reads differently from the model"
                ))
            }
            (Err(e), _) => return Err(format!("seed {seed}, round {round}: read: {e}")),
        }
    }
    Ok(sim.backing_reads)
}

/// Runs `cfg.scripts` images of `rounds` batches each (seeds from `QCOW2_SIM_SEED` or the
/// clock); panics on the first corruption or lost write, and returns the tally.
pub fn stream_crash_test(name: &str, cfg: CrashConfig, rounds: u32) -> Tally {
    let tally = RefCell::new(Tally::default());
    let base = crate::prop::base_seed();
    for i in 0..crate::prop::test_count(cfg.scripts) {
        let seed = base.wrapping_add(i);
        if let Err(e) = run(&cfg, seed, rounds, &tally) {
            panic!("{name}: {e}\n{}", tally.borrow().line());
        }
    }
    let t = tally.into_inner();
    eprintln!("{name}: {}", t.line());
    t
}

/// A batch of small writes that covers whole clusters from their first byte reads nothing
/// from the backing file: the first write of each cluster allocates it, the others join,
/// and the copy-on-write they cover is neither read nor written. Returns the bytes read
/// from the backing file and whether the data reads back.
pub fn covered_clusters_copy_nothing(cfg: &CrashConfig) -> Result<u64, String> {
    let (mut sim, _) = Sim::create(create_options(cfg), engine_config(cfg), 1)?;
    let mut oracle = new_oracle(cfg);
    let cs = u64::from(cfg.cluster_size);
    let piece = (cs / 4).max(512);
    let mut requests = Vec::new();
    let mut at = 2 * cs;
    while at < 6 * cs {
        let data = pattern(7, at, piece as usize);
        oracle.write(at, &data);
        requests.push((
            Request::Write {
                offset: at,
                len: piece,
            },
            Some(data),
        ));
        at += piece;
    }
    let n = requests.len();
    for (r, _) in sim.run_batch(requests, n, &mut |_| {}, &mut |_, _| {})? {
        r.map_err(|e: RequestError| e.to_string())?;
    }
    let buf = vec![0u8; (8 * cs) as usize];
    let request = Request::Read {
        offset: 0,
        len: 8 * cs,
    };
    match sim.run(request, Some(buf), &mut |_| {})? {
        (Ok(_), Some(got)) if got == oracle.current(0, (8 * cs) as usize) => {}
        other => return Err(format!("the clusters read back wrong: {:?}", other.0)),
    }
    // (The read of clusters 0, 1, 6 and 7 goes to the backing file itself.)
    Ok(sim.backing_reads - 4 * cs)
}
