//! Steady state allocates nothing: after warm-up, reads, overwrites, allocating writes and
//! flushes perform zero heap allocations in the engine and the runtime (counted by the
//! [`CountingAlloc`](crate::counting_alloc::CountingAlloc) `instantiate!` installs).

use super::{layout, must};
use crate::counting_alloc::{count, installed, Allocations};
use crate::harness::{Disk, Harness, Mode};
use crate::model::pattern;
use crate::verify::scratch;

/// Requests per measurement.
const REQUESTS: u64 = 1000;
/// Flushes measured (each costs real fdatasyncs).
const FLUSHES: u64 = 200;
/// Cluster size of the measured image.
const CS: u64 = 65536;
/// Clusters written during warm-up.
const WARM: u64 = 64;

/// An image of 256 MiB (one L2 table) with clusters `0..WARM` written, flushed, and read
/// once.
fn warmed<H: Harness>(h: &H) -> (tempfile::TempDir, H::Disk) {
    assert!(
        installed(),
        "the counting allocator is not this binary's global allocator (use instantiate!)"
    );
    let dir = scratch();
    let path = dir.path().join("disk.qcow2");
    let mut disk = must(
        h.create(
            &path,
            &layout(256 << 20, 3, CS as u32, 16),
            Mode::writable(),
        ),
        "create",
    );
    let data = pattern(1, 0, CS as usize);
    let mut buf = vec![0u8; CS as usize];
    for c in 0..WARM {
        must(disk.write_at(&data, c * CS), "warm-up write");
    }
    must(disk.flush(), "warm-up flush");
    for c in 0..WARM {
        must(disk.read_at(&mut buf, c * CS), "warm-up read");
        must(
            disk.write_at(&buf[..4096], c * CS + 4096),
            "warm-up overwrite",
        );
    }
    must(disk.flush(), "warm-up flush");
    (dir, disk)
}

fn assert_none(a: Allocations, requests: u64, what: &str) {
    assert_eq!(
        a.count, 0,
        "{requests} {what} performed {} heap allocations ({} bytes; first sizes {:?}); \
         rerun with QCOW2_ALLOC_TRACE=1 for a backtrace of the first",
        a.count, a.bytes, a.first_sizes
    );
}

/// 4 KiB reads of allocated clusters.
pub fn reads<H: Harness>(h: &H) {
    crate::require!(h, alloc_free);
    let (_dir, mut disk) = warmed(h);
    let mut buf = vec![0u8; 4096];
    let (a, r) = count(|| {
        (0..REQUESTS).try_for_each(|i| disk.read_at(&mut buf, (i % WARM) * CS + (i * 4096) % CS))
    });
    must(r, "read");
    assert_none(a, REQUESTS, "reads of allocated clusters");
    must(disk.close(), "close");
}

/// 4 KiB overwrites of allocated clusters.
pub fn overwrites<H: Harness>(h: &H) {
    crate::require!(h, alloc_free);
    let (_dir, mut disk) = warmed(h);
    let buf = pattern(2, 0, 4096);
    let (a, r) = count(|| {
        (0..REQUESTS).try_for_each(|i| disk.write_at(&buf, (i % WARM) * CS + (i * 4096) % CS))
    });
    must(r, "overwrite");
    assert_none(a, REQUESTS, "overwrites of allocated clusters");
    must(disk.close(), "close");
}

/// Whole-cluster writes to unallocated clusters under an existing L2 table.
pub fn allocating_writes<H: Harness>(h: &H) {
    crate::require!(h, alloc_free);
    let (_dir, mut disk) = warmed(h);
    let buf = pattern(3, 0, CS as usize);
    // A few allocating writes first, so lazily sized pools settle.
    for i in 0..16 {
        must(
            disk.write_at(&buf, (WARM + i) * CS),
            "warm-up allocating write",
        );
    }
    let first = WARM + 16;
    let (a, r) = count(|| (0..REQUESTS).try_for_each(|i| disk.write_at(&buf, (first + i) * CS)));
    must(r, "allocating write");
    assert_none(a, REQUESTS, "allocating writes");
    must(disk.close(), "close");
}

/// Guest flushes writing back the metadata of one allocating write each.
pub fn flushes<H: Harness>(h: &H) {
    crate::require!(h, alloc_free);
    let (_dir, mut disk) = warmed(h);
    let buf = pattern(4, 0, 4096);
    let mut total = Allocations::default();
    for i in 0..FLUSHES + 16 {
        must(disk.write_at(&buf, (WARM + i) * CS), "allocating write");
        let (a, r) = count(|| disk.flush());
        must(r, "flush");
        if i >= 16 {
            total.count += a.count;
            total.bytes += a.bytes;
            if total.first_sizes[0] == 0 {
                total.first_sizes = a.first_sizes;
            }
        }
    }
    assert_none(total, FLUSHES, "flushes after an allocating write");
    must(disk.close(), "close");
}
