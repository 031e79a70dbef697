//! What durability costs, counted in host flushes (`fdatasync`).

use super::{layout, must};
use crate::harness::{Disk, Harness, Mode};
use crate::model::{pattern, Model};
use crate::verify::{matches_model, our_check_clean, scratch};

/// Allocating writes in one batch.
const BATCH: u64 = 64;

/// A new image of `size` bytes with clusters of `cluster_size`, opened in `mode`, whose
/// first write (its first L2 table, and the host space and counts ahead when growing) is
/// flushed already.
fn warmed_up<H: Harness>(
    h: &H,
    path: &std::path::Path,
    (size, cluster_size): (u64, u32),
    mode: Mode,
) -> (H::Disk, Model) {
    let mut disk = must(
        h.create(path, &layout(size, 3, cluster_size, 16), mode),
        "create",
    );
    let mut model = Model::new(size);
    must(disk.write_at(&[0xaa; 512], 0), "warm-up write");
    model.write(0, &[0xaa; 512]);
    must(disk.flush(), "warm-up flush");
    (disk, model)
}

/// Writes `BATCH` 4 KiB pieces into new clusters starting at cluster `first`, checks that
/// they cost no flush, and returns what the guest flush after them cost.
fn batch<D: Disk>(disk: &mut D, model: &mut Model, first: u64, what: &str) -> u64 {
    let cs = 65536;
    let before = disk.flush_count();
    for i in 0..BATCH {
        let offset = (first + i) * cs + 4096;
        let data = pattern(i as u32, offset, 4096);
        must(disk.write_at(&data, offset), format!("{what}: write {i}"));
        model.write(offset, &data);
    }
    let written = disk.flush_count();
    assert_eq!(
        written - before,
        0,
        "{what}: {BATCH} write-back writes issued {} fdatasyncs",
        written - before
    );
    must(disk.flush(), format!("{what}: flush"));
    let flushed = disk.flush_count() - written;
    println!("{what}: {BATCH} allocating writes + 1 flush = {flushed} fdatasyncs");
    flushed
}

/// In write-back mode, any number of allocating writes into an image whose L2 tables exist,
/// followed by one flush, costs exactly two fdatasyncs (refblocks -> fdatasync -> L2 ->
/// fdatasync) when no host space is allocated ahead; a flush with nothing to write costs
/// at most one.
pub fn writeback_batch_costs_two_syncs<H: Harness>(h: &H) {
    crate::require!(h, flush_count);
    let dir = scratch();
    let path = dir.path().join("disk.qcow2");
    let size = 64 << 20;
    let mode = Mode {
        grow_step: Some(0),
        ..Mode::writable()
    };
    // The first write allocates the only L2 table.
    let (mut disk, mut model) = warmed_up(h, &path, (size, 65536), mode);
    for (first, what) in [(1, "first batch"), (1 + BATCH, "second batch")] {
        let n = batch(&mut disk, &mut model, first, what);
        assert_eq!(
            n, 2,
            "{what}: refblocks -> fdatasync -> L2 -> fdatasync is two, not {n}"
        );
    }
    let before = disk.flush_count();
    must(disk.flush(), "idle flush");
    let idle = disk.flush_count() - before;
    assert!(
        idle <= 1,
        "a flush with nothing dirty cost {idle} fdatasyncs"
    );

    must(disk.close(), "close");
    let mut disk = must(h.open(&path, mode), "reopen");
    let n = batch(&mut disk, &mut model, 1 + 2 * BATCH, "batch after reopen");
    assert_eq!(n, 2, "batch after reopen: two fdatasyncs, not {n}");
    must(matches_model(&mut disk, &model), "contents");
    must(disk.close(), "close");
    must(our_check_clean(h, &path), "check");
}

/// While the image grows ahead (the runtimes' default), allocating writes followed by a
/// flush cost one fdatasync: the refcounts of the next clusters went out ahead, and data in
/// host space never written before need not be durable before the L2 entries (they read as
/// zero either way). Each time the counts written ahead run low, one cycle writes the
/// refcount block again and costs two. A clean close leaves no leaked cluster.
pub fn writeback_growing_batch_costs_one_sync<H: Harness>(h: &H) {
    crate::require!(h, flush_count);
    let dir = scratch();
    let path = dir.path().join("disk.qcow2");
    let size = 256 << 20;
    // The L2 table, the host space ahead, and the counts ahead, made durable.
    let (mut disk, mut model) = warmed_up(h, &path, (size, 65536), Mode::writable());
    let n = batch(&mut disk, &mut model, 1, "first batch");
    assert_eq!(n, 1, "first batch: L2 -> fdatasync is one, not {n}");
    // 16 MiB counted ahead (grow_step / 8), topped up when half is used: at most one more
    // barrier per 128 clusters of 64 KiB.
    let mut total = 0;
    for k in 1..=4 {
        let n = batch(&mut disk, &mut model, 1 + k * BATCH, "later batch");
        assert!((1..=2).contains(&n), "later batch {k}: {n} fdatasyncs");
        total += n;
    }
    assert!(
        total <= 4 + 3,
        "four batches of {BATCH} cost {total} fdatasyncs"
    );
    must(matches_model(&mut disk, &model), "contents");
    must(disk.close(), "close");
    must(our_check_clean(h, &path), "check");
    if let Some(q) = crate::qemu::Qemu::require("growing batch") {
        q.assert_clean(&path, "growing batch: qemu-img check after close");
    }
}

/// Allocating writes that also need new L2 tables cost one more barrier: refblocks ->
/// fdatasync -> L2 tables -> fdatasync -> L1 -> fdatasync, three for the whole batch.
pub fn writeback_new_l2_tables_cost_three_syncs<H: Harness>(h: &H) {
    crate::require!(h, flush_count);
    let dir = scratch();
    let path = dir.path().join("disk.qcow2");
    let size = 256 << 20;
    // 4 KiB clusters: one L2 table maps 2 MiB.
    let (mut disk, mut model) = warmed_up(h, &path, (size, 4096), Mode::writable());
    let before = disk.flush_count();
    for i in 1..=BATCH {
        let offset = i * (2 << 20) + 512;
        let data = pattern(i as u32, offset, 1024);
        must(disk.write_at(&data, offset), format!("write {i}"));
        model.write(offset, &data);
    }
    let written = disk.flush_count();
    assert_eq!(written, before, "write-back writes issued fdatasyncs");
    must(disk.flush(), "flush");
    let flushed = disk.flush_count() - written;
    println!("{BATCH} allocating writes into new L2 tables + 1 flush = {flushed} fdatasyncs");
    assert_eq!(
        flushed, 3,
        "refblocks, L2 tables and L1 need three barriers, not {flushed}"
    );
    must(matches_model(&mut disk, &model), "contents");
    must(disk.close(), "close");
    must(our_check_clean(h, &path), "check");
}

/// In write-through mode every write issues a flush before it completes, and what it wrote
/// (data and mapping) is in the file: a second, read-only open sees it at once (sharing
/// the image with the writer, as `qemu-img -U` does).
pub fn writethrough_makes_each_write_durable<H: Harness>(h: &H) {
    crate::require!(h, flush_count, write_through);
    let dir = scratch();
    let path = dir.path().join("disk.qcow2");
    let size = 32 << 20;
    must(
        must(
            h.create(&path, &layout(size, 3, 4096, 16), Mode::writable()),
            "create",
        )
        .close(),
        "close",
    );
    let mut disk = must(h.open(&path, Mode::write_through()), "open write-through");
    let mut model = Model::new(size);
    // New L2 tables (4 KiB clusters: one per 2 MiB), an allocation under an existing L2
    // table, partial clusters, and overwrites.
    let writes: [(u64, usize); 7] = [
        (0, 4096),
        (8192, 4096),
        (3 << 20, 100),
        ((7 << 20) + 4000, 9000),
        (0, 512),
        (31 << 20, 65536),
        ((3 << 20) + 50, 10),
    ];
    let mut syncs = Vec::new();
    for (i, &(offset, len)) in writes.iter().enumerate() {
        let data = pattern(100 + i as u32, offset, len);
        let before = disk.flush_count();
        must(disk.write_at(&data, offset), format!("write {i}"));
        model.write(offset, &data);
        let n = disk.flush_count() - before;
        assert!(
            n >= 1,
            "write-through write {i} at {offset:#x} completed without an fdatasync"
        );
        syncs.push(n);
        let mut reader = must(
            h.open(&path, Mode::shared_reader()),
            "second, read-only open",
        );
        must(
            matches_model(&mut reader, &model),
            format!("after write-through write {i}, a second open"),
        );
        must(reader.close(), "close the reader");
    }
    println!(
        "writethrough: fdatasyncs per write (new L2, allocating, new L2, new L2, overwrite, \
         new L2, overwrite): {syncs:?}"
    );
    must(disk.close(), "close");
    must(our_check_clean(h, &path), "check");
}
