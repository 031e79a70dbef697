//! Many requests in flight at once (runtimes with [`Caps::concurrent`]): overlapping and
//! disjoint writes to the same clusters while others read, zero, discard and flush, checked
//! byte by byte against what each batch allows; group commit in write-through mode; and the
//! same script giving the same image as the blocking runtime.
//!
//! [`Caps::concurrent`]: crate::harness::Caps::concurrent

use super::{layout, must};
use crate::harness::{BatchOp, Disk, Harness, Mode};
use crate::model::{pattern, Model};
use crate::qemu::Qemu;
use crate::verify::{matches_model, our_check_clean, qemu_agrees, scratch};
use crate::{require, sync::SyncHarness};

/// xorshift64*: reproducible without a dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

fn seed() -> u64 {
    std::env::var("QCOW2_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED)
}

/// A random batch over `region` bytes: writes (each filling its range with its own
/// non-zero byte), reads, zeroes, discards and flushes.
fn batch(rng: &mut Rng, region: u64, cluster: u64) -> Vec<BatchOp> {
    let n = 4 + rng.below(13) as usize;
    (0..n)
        .map(|i| {
            let offset = rng.below(region);
            let len = (1 + rng.below(2 * cluster)).min(region - offset);
            match rng.below(20) {
                0..=9 => BatchOp::Write {
                    offset,
                    data: vec![1 + i as u8; len as usize],
                },
                10..=14 => BatchOp::Read {
                    offset,
                    len: len as usize,
                },
                15 | 16 => BatchOp::Flush,
                17 | 18 => BatchOp::Zeroes {
                    offset,
                    len,
                    unmap: rng.below(2) == 0,
                },
                _ => BatchOp::Discard { offset, len },
            }
        })
        .collect()
}

/// Whether byte `b` may read as `v` during or after `batch`, given its value `old` before.
/// `after`: the batch has finished, so a byte covered by a write or zeroes must hold one of
/// the values written there.
fn allowed(batch: &[BatchOp], b: u64, v: u8, old: u8, after: bool) -> bool {
    let mut covered = false;
    let mut ok = false;
    for op in batch {
        let (offset, len, value) = match op {
            BatchOp::Write { offset, data } => (*offset, data.len() as u64, Some(data[0])),
            BatchOp::Zeroes { offset, len, .. } => (*offset, *len, Some(0)),
            // A discard drops whole clusters only: either value, even afterwards.
            BatchOp::Discard { offset, len } => {
                if (*offset..offset + len).contains(&b) && v == 0 {
                    ok = true;
                }
                continue;
            }
            _ => continue,
        };
        if (offset..offset + len).contains(&b) {
            covered = true;
            ok |= value == Some(v);
        }
    }
    ok || (v == old && !(after && covered))
}

fn overlapping<H: Harness>(h: &H, cluster_size: u32, rounds: u32) {
    require!(h, concurrent, real_files);
    let dir = scratch();
    let path = dir.path().join("disk.qcow2");
    let cs = u64::from(cluster_size);
    // Six clusters take every overlap; two more per L2 table boundary keep it honest.
    let region = 6 * cs;
    let size = (region * 2).max(4 << 20);
    let mut disk = must(
        h.create(&path, &layout(size, 3, cluster_size, 16), Mode::writable()),
        "create",
    );
    let mut model = Model::new(size);
    let mut rng = Rng::new(seed() ^ u64::from(cluster_size));
    for round in 0..rounds {
        let ops = batch(&mut rng, region, cs);
        let before = {
            let mut b = vec![0; region as usize];
            model.read(0, &mut b);
            b
        };
        let results = disk.run_batch(&ops).expect("the runtime runs batches");
        for (op, r) in ops.iter().zip(&results) {
            let got = r
                .as_ref()
                .unwrap_or_else(|e| panic!("round {round}: {op:?} failed: {e}"));
            if let BatchOp::Read { offset, .. } = op {
                for (i, &v) in got.iter().enumerate() {
                    let b = offset + i as u64;
                    assert!(
                        allowed(&ops, b, v, before[b as usize], false),
                        "round {round}: a concurrent read at {offset:#x} saw {v:#x} at byte \
                         {b:#x} (before: {:#x}); batch {ops:?}",
                        before[b as usize]
                    );
                }
            }
        }
        let mut now = vec![0; region as usize];
        must(disk.read_at(&mut now, 0), "read back");
        for (b, &v) in now.iter().enumerate() {
            assert!(
                allowed(&ops, b as u64, v, before[b], true),
                "round {round}: after the batch byte {b:#x} holds {v:#x} (before: {:#x}); \
                 batch {ops:?}",
                before[b]
            );
        }
        model.write(0, &now);
    }
    must(disk.flush(), "flush");
    must(disk.close(), "close");
    let mut disk = must(h.open(&path, Mode::read_only()), "reopen");
    must(matches_model(&mut disk, &model), "contents after reopen");
    drop(disk);
    must(our_check_clean(h, &path), "our check");
    if let Some(q) = Qemu::optional("concurrency::overlapping") {
        must(qemu_agrees(&q, &path, &model, dir.path()), "qemu-img");
    }
}

/// Batches over six 64 KiB clusters.
pub fn overlapping_writes_cluster_64k<H: Harness>(h: &H) {
    overlapping(h, 65536, 60);
}

/// Batches over six 4 KiB clusters.
pub fn overlapping_writes_cluster_4k<H: Harness>(h: &H) {
    overlapping(h, 4096, 150);
}

/// Batches over six 512-byte clusters (every write spans clusters).
pub fn overlapping_writes_cluster_512<H: Harness>(h: &H) {
    overlapping(h, 512, 150);
}

/// Write-through: sixteen concurrent writes share flushes instead of paying one each.
pub fn write_through_group_commit<H: Harness>(h: &H) {
    require!(h, concurrent, flush_count, write_through);
    let dir = scratch();
    let path = dir.path().join("disk.qcow2");
    let mut disk = must(
        h.create(
            &path,
            &layout(64 << 20, 3, 65536, 16),
            Mode::write_through(),
        ),
        "create",
    );
    let writes = |round: u8| -> Vec<BatchOp> {
        (0..16u64)
            .map(|i| BatchOp::Write {
                offset: i << 20,
                data: vec![round + i as u8; 4096],
            })
            .collect()
    };
    // Allocate first, then overwrite in place: both must share flushes.
    for (round, what) in [(1u8, "allocating"), (50, "in-place")] {
        let before = disk.flush_count();
        for r in disk.run_batch(&writes(round)).expect("batches") {
            must(r, what);
        }
        let syncs = disk.flush_count() - before;
        println!("{what}: 16 concurrent write-through writes cost {syncs} fdatasyncs");
        assert!(
            syncs <= 8,
            "{what}: 16 concurrent write-through writes cost {syncs} fdatasyncs; group \
             commit should share them"
        );
    }
    drop(disk);
    must(our_check_clean(h, &path), "our check");
}

/// The same sequential script gives a byte-identical host file on this runtime and on the
/// blocking one (the engine decides everything; runtimes only move bytes).
pub fn same_script_same_image<H: Harness>(h: &H) {
    require!(h, real_files);
    let dir = scratch();
    let ours = dir.path().join("ours.qcow2");
    let reference = dir.path().join("sync.qcow2");
    run_script(h, &ours);
    run_script(&SyncHarness, &reference);
    let a = must(std::fs::read(&ours), "read our image");
    let b = must(std::fs::read(&reference), "read the reference image");
    assert_eq!(
        a.len(),
        b.len(),
        "host file lengths differ from qcow2-sync's"
    );
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("host files differ from qcow2-sync's first at byte {i:#x}");
    }
}

fn run_script<H: Harness>(h: &H, path: &std::path::Path) {
    let size = 32 << 20;
    let mut disk = must(
        h.create(path, &layout(size, 3, 65536, 16), Mode::writable()),
        "create",
    );
    let mut rng = Rng::new(seed());
    for step in 0..400u32 {
        let offset = rng.below(size - (256 << 10));
        let len = 1 + rng.below(256 << 10);
        match rng.below(10) {
            0..=5 => must(
                disk.write_at(&pattern(step, offset, len as usize), offset),
                "write",
            ),
            6 => must(disk.write_zeroes(offset, len, step % 2 == 0), "zeroes"),
            7 => must(disk.discard(offset, len), "discard"),
            8 => must(disk.flush(), "flush"),
            _ => {
                let mut buf = vec![0; len as usize];
                must(disk.read_at(&mut buf, offset), "read");
            }
        }
    }
    must(disk.close(), "close");
}
