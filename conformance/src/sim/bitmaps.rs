//! Crash points while persistent bitmaps are maintained: what a backup tool relies on.
//!
//! A first session adds bitmaps (enabled at 512 bytes and at the cluster size, one
//! disabled, one to be removed later), writes, and closes: the bitmaps are stored (the
//! extension is added). A second session removes one bitmap (or all of them: the
//! extension goes), writes, zeroes and discards (a flush in between), and closes. Both
//! sessions have a crash point after every op completion. A crashed image must open
//! and check with no error (leaks allowed), and every bitmap it lists without the in-use
//! flag must be trustworthy: an enabled one has every granule dirty whose guest bytes
//! differ from the first session's, the disabled one is exactly as stored. A bitmap still
//! in use is stale, and says so.

use std::cell::RefCell;

use qcow2_proto::{BitmapData, Outcome, Request};

use super::disk::SimDisk;
use super::driver::{Sim, SimResult};
use super::rng::Rng;
use super::{create_options, engine_config, read_all, read_only, CrashConfig, Tally, START_SIZE};
use crate::model::pattern;

/// The bitmaps of the first session: name, granularity (0: the cluster size), enabled.
const BITMAPS: [(&str, u64, bool); 4] = [
    ("fine", 512, true),
    ("coarse", 0, true),
    ("off", 65536, false),
    ("gone", 4096, true),
];

fn read_bitmap(sim: &mut Sim, name: &str) -> SimResult<BitmapData> {
    match sim.run_with("read bitmap", |e| e.read_bitmap(name), None, &mut |_| {})? {
        (Ok(Outcome::Bitmap(b)), _) => Ok(*b),
        (r, _) => Err(format!("bitmap {name}: {r:?}")),
    }
}

/// Whether bit `i` of `b` is set.
fn dirty(b: &BitmapData, i: u64) -> bool {
    b.bits
        .get((i / 8) as usize)
        .is_some_and(|x| x & (1 << (i % 8)) != 0)
}

/// A random write, zeroes or discard of up to three clusters.
fn random_request(rng: &mut Rng, cs: u64, tag: u32) -> (Request, Option<Vec<u8>>) {
    let offset = rng.below(START_SIZE);
    let len = (rng.below(3 * cs) + 1).min(START_SIZE - offset);
    match rng.below(5) {
        0 => (
            Request::WriteZeroes {
                offset,
                len,
                unmap: rng.below(2) == 0,
            },
            None,
        ),
        1 => (Request::Discard { offset, len }, None),
        _ => (
            Request::Write { offset, len },
            Some(pattern(tag, offset, len as usize)),
        ),
    }
}

/// How many bitmaps crashed images showed in use (stale) and not (checked).
#[derive(Clone, Copy, Debug, Default)]
pub struct Seen {
    /// Bitmaps in use: stale, and saying so.
    pub stale: u64,
    /// Bitmaps not in use, whose bits were checked.
    pub trusted: u64,
    /// Crash points whose image had no valid bitmaps extension (a crash inside a
    /// three-step header switch: every bitmap stale).
    pub dropped: u64,
}

/// What a session's crashed images are checked against.
struct Expect {
    /// The guest contents when the session began.
    base: Vec<u8>,
    /// Each bitmap as stored when the session began (empty: added in the session).
    stored: Vec<(String, BitmapData)>,
    /// The bitmaps the session removes or adds: they may be absent.
    absent_ok: &'static [&'static str],
    /// The backing file name the header must keep.
    backing: Option<String>,
}

/// What a crashed image must satisfy.
fn verify(img: Vec<u8>, x: &Expect, seed: u64, seen: &mut Seen) -> Option<String> {
    let (base, stored, removed) = (&x.base, &x.stored, x.absent_ok);
    let (mut sim, info) = match Sim::open(SimDisk::new(img), read_only(), seed) {
        Ok(x) => x,
        Err(e) => return Some(format!("the image does not open: {e}")),
    };
    if info.backing_file != x.backing {
        return Some(format!("backing file {:?}", info.backing_file));
    }
    match sim.run(Request::Check { repair: None }, None, &mut |_| {}) {
        Ok((Ok(Outcome::Check(r)), _)) if r.corruptions == 0 && r.check_errors == 0 => {}
        other => return Some(format!("check after the crash: {other:?}")),
    }
    if info.bitmaps.is_empty() && removed.len() < stored.len() {
        // (The extension without its autoclear bit: every bitmap is stale.)
        seen.dropped += 1;
        return None;
    }
    let now = match read_all(&mut sim, START_SIZE) {
        Ok(b) => b,
        Err(e) => return Some(e),
    };
    for (name, old) in stored {
        let Some(listed) = info.bitmaps.iter().find(|b| &b.name == name) else {
            if removed.contains(&name.as_str()) {
                continue;
            }
            return Some(format!("bitmap {name} is gone"));
        };
        if listed.in_use {
            seen.stale += 1;
            continue;
        }
        seen.trusted += 1;
        let b = match read_bitmap(&mut sim, name) {
            Ok(b) => b,
            Err(e) => return Some(e),
        };
        let g = b.granularity;
        for i in 0..START_SIZE.div_ceil(g) {
            let (start, end) = ((i * g) as usize, ((i + 1) * g).min(START_SIZE) as usize);
            let changed = base[start..end] != now[start..end];
            let was = dirty(old, i);
            let is = dirty(&b, i);
            let ok = if listed.auto {
                is || !(was || changed)
            } else {
                is == was
            };
            if !ok {
                return Some(format!(
                    "bitmap {name} (not in use) granule {i}: dirty {is}, was {was}, changed {changed}"
                ));
            }
        }
    }
    None
}

const ALL: &[&str] = &["fine", "coarse", "off", "gone"];

/// Runs `requests` (a flush in the middle) and a close on `sim`, with a crash point after
/// every op completion, each checked against `x`.
fn session(
    sim: &mut Sim,
    requests: Vec<(Request, Option<Vec<u8>>)>,
    x: &Expect,
    seed: u64,
    tally: &RefCell<Tally>,
    seen: &mut Seen,
) -> SimResult<()> {
    let mut failure = None;
    let mut crash_rng = Rng::new(seed ^ 0xC4A5);
    let mut point = |d: &SimDisk, what: &str| {
        let problem = verify(d.crash(&mut crash_rng), x, seed, seen);
        let mut t = tally.borrow_mut();
        t.points += 1;
        if let Some(p) = problem {
            t.corruptions += 1;
            let msg = format!("seed {seed}, crash during {what}: {p}");
            t.first.get_or_insert_with(|| msg.clone());
            failure.get_or_insert(msg);
        }
    };
    let half = requests.len() / 2;
    for (k, (request, buf)) in requests.into_iter().enumerate() {
        let what = format!("{request:?}");
        sim.run(request, buf, &mut |d| point(d, &what))?
            .0
            .map_err(|e| e.to_string())?;
        if k == half {
            sim.run(Request::Flush, None, &mut |d| point(d, "flush"))?
                .0
                .map_err(|e| e.to_string())?;
        }
    }
    sim.run(Request::Close, None, &mut |d| point(d, "close"))?
        .0
        .map_err(|e| e.to_string())?;
    failure.map_or(Ok(()), Err)
}

/// One script: two sessions.
fn run_one(cfg: &CrashConfig, seed: u64, tally: &RefCell<Tally>, seen: &mut Seen) -> SimResult<()> {
    let cs = u64::from(cfg.cluster_size);
    let backing = cfg.backing.then(|| "base.raw".to_owned());
    let (mut sim, _) = Sim::create(create_options(cfg), engine_config(cfg), seed)?;
    let mut rng = Rng::new(seed ^ 0xB17);
    // The first session adds the bitmaps (its close adds the extension).
    let mut stored = Vec::new();
    for (name, g, enabled) in BITMAPS {
        let g = if g == 0 { cs.clamp(512, 1 << 21) } else { g };
        sim.engine
            .bitmap_add(name, g, enabled)
            .map_err(|e| format!("add {name}: {e}"))?;
        let empty = BitmapData {
            granularity: g,
            size: START_SIZE,
            bits: vec![0; START_SIZE.div_ceil(g).div_ceil(8) as usize],
        };
        stored.push((name.to_owned(), empty));
    }
    let first = Expect {
        base: read_all(&mut sim, START_SIZE)?,
        stored,
        absent_ok: ALL,
        backing: backing.clone(),
    };
    let requests = (0..4)
        .map(|k| random_request(&mut rng, cs, seed as u32 ^ k))
        .collect();
    session(&mut sim, requests, &first, seed, tally, seen)?;
    let img = sim.disk.current().to_vec();
    // What the first session left.
    let (mut view, info) = Sim::open(SimDisk::new(img.clone()), read_only(), seed)?;
    if info.bitmaps.len() != ALL.len() {
        return Err(format!(
            "seed {seed}: after the first session {:?}",
            info.bitmaps
        ));
    }
    let mut stored = Vec::new();
    for name in ALL {
        stored.push((name.to_string(), read_bitmap(&mut view, name)?));
    }
    // The second session. Every third one removes every bitmap (the extension goes),
    // the others one.
    let removed: &'static [&'static str] = if seed % 3 == 0 { ALL } else { &["gone"] };
    let second = Expect {
        base: read_all(&mut view, START_SIZE)?,
        stored,
        absent_ok: removed,
        backing,
    };
    let (mut sim, _) = Sim::open(SimDisk::new(img), engine_config(cfg), seed)?;
    for name in removed {
        sim.engine
            .bitmap_remove(name)
            .map_err(|e| format!("remove: {e}"))?;
    }
    let requests = (0..cfg.script_len as u32)
        .map(|k| random_request(&mut rng, cs, seed as u32 ^ (k + 100)))
        .collect();
    session(&mut sim, requests, &second, seed, tally, seen)?;
    // Closed: every bitmap is stored and trustworthy, the removed ones are gone.
    let mut after = Seen::default();
    let img = sim.disk.current().to_vec();
    if let Some(p) = verify(img.clone(), &second, seed, &mut after) {
        return Err(format!("seed {seed}, after close: {p}"));
    }
    let (_, info) = Sim::open(SimDisk::new(img), read_only(), seed)?;
    let gone = |b: &qcow2_proto::BitmapInfo| removed.contains(&b.name.as_str());
    if after.stale + after.dropped > 0 || info.bitmaps.iter().any(gone) {
        return Err(format!("seed {seed}, after close: {:?}", info.bitmaps));
    }
    Ok(())
}

/// Runs `cfg.scripts` scripts with a crash point after every op completion of the second
/// session; panics on the first problem. Returns the tally and what the crashed images
/// showed.
pub fn bitmap_crash_test(name: &str, cfg: CrashConfig) -> (Tally, Seen) {
    let tally = RefCell::new(Tally::default());
    let mut seen = Seen::default();
    for seed in 1..=crate::prop::test_count(cfg.scripts) {
        if let Err(e) = run_one(&cfg, seed, &tally, &mut seen) {
            panic!("{name}: {e}");
        }
    }
    let t = tally.into_inner();
    println!(
        "{name}: {}, bitmaps seen stale: {}, checked: {}; images with none valid: {}",
        t.line(),
        seen.stale,
        seen.trusted,
        seen.dropped
    );
    (t, seen)
}
