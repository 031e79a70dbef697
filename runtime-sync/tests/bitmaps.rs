//! Persistent dirty bitmaps against a model: random scripts of writes, zeroes, discards,
//! resizes, snapshot applies, reopens and bitmap edits (add, remove, clear, enable,
//! disable, merge). After every step every bitmap reads exactly as its model: every range
//! written while it was enabled is dirty, and nothing else. At the end our check and
//! qemu-img's are clean and qemu-img lists the same bitmaps.

use qcow2_conformance::model::pattern;
use qcow2_conformance::qemu::Qemu;
use qcow2_conformance::sim::rng::Rng;
use qcow2_proto::CreateOptions;
use qcow2_sync::{Image, OpenOptions, SnapshotRef};

const SIZE: u64 = 8 << 20;

/// A bitmap's model: one flag per granule.
#[derive(Clone, Debug)]
struct Bits {
    name: String,
    granularity: u64,
    enabled: bool,
    dirty: Vec<bool>,
}

impl Bits {
    fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 || !self.enabled {
            return;
        }
        let (g, n) = (self.granularity, self.dirty.len() as u64);
        for i in offset / g..((offset + len - 1) / g + 1).min(n) {
            self.dirty[i as usize] = true;
        }
    }

    fn resize(&mut self, size: u64) {
        self.dirty
            .resize(size.div_ceil(self.granularity) as usize, false);
    }

    /// Dirty ranges, merged and clamped to `size`.
    fn ranges(&self, size: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let g = self.granularity;
        for (i, _) in self.dirty.iter().enumerate().filter(|(_, &d)| d) {
            let start = i as u64 * g;
            let len = g.min(size - start);
            match out.last_mut() {
                Some(l) if l.0 + l.1 == start => l.1 += len,
                _ => out.push((start, len)),
            }
        }
        out
    }
}

fn check_all(img: &mut Image, bitmaps: &[Bits], size: u64, log: &[String]) {
    let mut listed: Vec<String> = img.info().bitmaps.iter().map(|b| b.name.clone()).collect();
    listed.sort();
    let mut want: Vec<String> = bitmaps.iter().map(|b| b.name.clone()).collect();
    want.sort();
    assert_eq!(listed, want, "listed bitmaps after {log:?}");
    for b in bitmaps {
        let got = img.read_bitmap(&b.name).unwrap();
        assert_eq!(got.granularity, b.granularity);
        assert_eq!(
            got.dirty_ranges(),
            b.ranges(size),
            "bitmap {} after {log:?}",
            b.name
        );
    }
}

fn run(seed: u64, options: &CreateOptions, q: Option<&Qemu>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    let cs = u64::from(options.cluster_size);
    let mut img = Image::create(&path, options, &OpenOptions::default()).unwrap();
    let mut rng = Rng::new(seed);
    let mut size = SIZE;
    let mut bitmaps: Vec<Bits> = Vec::new();
    let mut snapshots = 0;
    let mut log = Vec::new();
    for step in 0..60 {
        let offset = rng.below(size);
        let len = (rng.below(3 * cs) + 1).min(size - offset);
        let pick = |rng: &mut Rng, n: usize| rng.below(n as u64) as usize;
        match rng.below(16) {
            0..=3 => {
                img.write_at(&pattern(step, offset, len as usize), offset)
                    .unwrap();
                bitmaps.iter_mut().for_each(|b| b.mark(offset, len));
                log.push(format!("write {offset} {len}"));
            }
            4 => {
                img.write_zeroes(offset, len, rng.below(2) == 0).unwrap();
                bitmaps.iter_mut().for_each(|b| b.mark(offset, len));
                log.push(format!("zero {offset} {len}"));
            }
            5 => {
                img.discard(offset, len).unwrap();
                bitmaps.iter_mut().for_each(|b| b.mark(offset, len));
                log.push(format!("discard {offset} {len}"));
            }
            6 | 7 if bitmaps.len() < 6 => {
                let name = format!("b{step}");
                let granularity = 1 << (9 + rng.below(13));
                let enabled = rng.below(4) != 0;
                img.bitmap_add(&name, granularity, enabled).unwrap();
                let n = size.div_ceil(granularity) as usize;
                bitmaps.push(Bits {
                    name: name.clone(),
                    granularity,
                    enabled,
                    dirty: vec![false; n],
                });
                log.push(format!("add {name} {granularity} {enabled}"));
            }
            8 if !bitmaps.is_empty() => {
                let b = bitmaps.remove(pick(&mut rng, bitmaps.len()));
                img.bitmap_remove(&b.name).unwrap();
                log.push(format!("remove {}", b.name));
            }
            9 if !bitmaps.is_empty() => {
                let i = pick(&mut rng, bitmaps.len());
                let b = &mut bitmaps[i];
                img.bitmap_clear(&b.name).unwrap();
                b.dirty.iter_mut().for_each(|d| *d = false);
                log.push(format!("clear {}", b.name));
            }
            10 if !bitmaps.is_empty() => {
                let i = pick(&mut rng, bitmaps.len());
                let b = &mut bitmaps[i];
                b.enabled = !b.enabled;
                img.bitmap_enable(&b.name, b.enabled).unwrap();
                log.push(format!("enable {} {}", b.name, b.enabled));
            }
            11 if !bitmaps.is_empty() => {
                let (d, s) = (pick(&mut rng, bitmaps.len()), pick(&mut rng, bitmaps.len()));
                let data = img.read_bitmap(&bitmaps[s].name).unwrap();
                img.bitmap_merge(&bitmaps[d].name, &data).unwrap();
                let src = bitmaps[s].clone();
                let dst = &mut bitmaps[d];
                let was = dst.enabled;
                dst.enabled = true;
                for (start, len) in src.ranges(size) {
                    dst.mark(start, len);
                }
                dst.enabled = was;
                log.push(format!("merge {} into {}", src.name, dst.name));
            }
            12 => {
                // Grow or shrink (whole sectors): a grown part starts clean.
                let new = (rng.below(2 * SIZE) + 512).next_multiple_of(512);
                img.resize(new, true).unwrap();
                size = new;
                bitmaps.iter_mut().for_each(|b| b.resize(size));
                log.push(format!("resize {new}"));
            }
            13 if snapshots == 0 => {
                img.snapshot_create("s").unwrap();
                snapshots = 1;
                log.push("create s".into());
            }
            13 => {
                // Every byte may differ after an apply: every enabled bitmap is all dirty.
                img.snapshot_apply(&SnapshotRef::Name("s".into())).unwrap();
                size = img.len();
                for b in &mut bitmaps {
                    b.resize(size);
                    b.mark(0, size);
                }
                log.push("apply s".into());
            }
            _ => {
                img.close().unwrap();
                img = Image::open(&path, &OpenOptions::default()).unwrap();
                log.push("reopen".into());
            }
        }
        check_all(&mut img, &bitmaps, size, &log);
    }
    img.close().unwrap();
    let mut img = Image::open(&path, &OpenOptions::read_only()).unwrap();
    check_all(&mut img, &bitmaps, size, &log);
    let report = img.check(None).unwrap();
    assert!(
        report.corruptions == 0 && report.leaks == 0 && report.check_errors == 0,
        "{report:?} after {log:?}"
    );
    drop(img);
    if let Some(q) = q {
        let check = q.check(&path);
        assert!(check.is_clean(), "qemu-img check: {check:?}\n{log:#?}");
        let info = q.info(&path);
        let listed = info["format-specific"]["data"]["bitmaps"]
            .as_array()
            .map_or(0, Vec::len);
        assert_eq!(listed, bitmaps.len(), "qemu-img lists them all: {info}");
        for b in info["format-specific"]["data"]["bitmaps"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let flags = b["flags"].to_string();
            assert!(!flags.contains("in-use"), "stored cleanly: {b}");
        }
    }
}

fn soak(case: &str, options: CreateOptions) {
    let q = Qemu::require(case);
    let tests: u64 = std::env::var("QCOW2_QC_TESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    for seed in 0..tests {
        run(0xb17_0000 + seed, &options, q.as_ref());
    }
}

#[test]
fn bitmaps_follow_their_model_64k() {
    soak(
        "bitmaps::bitmaps_follow_their_model_64k",
        CreateOptions::new(SIZE),
    );
}

#[test]
fn bitmaps_follow_their_model_16k_extended_l2_refcount_2() {
    let mut o = CreateOptions::new(SIZE);
    o.cluster_size = 16 << 10;
    o.extended_l2 = true;
    o.refcount_bits = 2;
    soak(
        "bitmaps::bitmaps_follow_their_model_16k_extended_l2_refcount_2",
        o,
    );
}

/// A removed bitmap whose table points somewhere it should not (here into the L1 table,
/// not cluster-aligned) has its clusters leaked, never freed: freeing would drop a
/// reference the L1 table holds.
#[test]
fn a_damaged_table_is_leaked_not_freed() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    let mut img = Image::create(&path, &CreateOptions::new(SIZE), &OpenOptions::default()).unwrap();
    img.bitmap_add("b", 65536, true).unwrap();
    img.write_at(&[7; 4096], 0).unwrap();
    img.close().unwrap();
    let img = Image::open(&path, &OpenOptions::read_only()).unwrap();
    let b = img.info().bitmaps[0].clone();
    drop(img);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut hdr = [0u8; 48];
    file.read_exact_at(&mut hdr, 0).unwrap();
    let l1 = u64::from_be_bytes(hdr[40..48].try_into().unwrap());
    file.write_all_at(&(l1 + 512).to_be_bytes(), b.table_offset)
        .unwrap();
    drop(file);

    let mut img = Image::open(&path, &OpenOptions::default()).unwrap();
    img.bitmap_remove("b").unwrap();
    img.close().unwrap();
    let mut img = Image::open(&path, &OpenOptions::read_only()).unwrap();
    assert!(img.info().bitmaps.is_empty());
    let report = img.check(None).unwrap();
    assert_eq!(
        (report.corruptions, report.check_errors),
        (0, 0),
        "nothing freed blindly: {report:?}"
    );
    assert!(
        report.leaks > 0,
        "the damaged bitmap's clusters are leaked: {report:?}"
    );
    let mut back = [0u8; 4096];
    img.read_at(&mut back, 0).unwrap();
    assert_eq!(back, [7; 4096]);
}
