//! Plain requests and their error cases, with no other tool involved.

use qcow2_proto::{Allocation, RequestError};

use super::{layout, must};
use crate::harness::{Disk, Error, Harness, Mode};
use crate::model::{pattern, Model};
use crate::verify::{matches_model, our_check_clean, scratch};

/// Writes at aligned and unaligned offsets read back, before and after a reopen, and the
/// image checks clean.
pub fn roundtrip<H: Harness>(h: &H) {
    let dir = scratch();
    let path = dir.path().join("disk.qcow2");
    let size = 16 << 20;
    let mut disk = must(
        h.create(&path, &layout(size, 3, 65536, 16), Mode::writable()),
        "create",
    );
    assert_eq!(disk.len(), size);
    assert_eq!(disk.info().cluster_size, 65536);
    assert_eq!(disk.info().version, 3);
    let mut model = Model::new(size);
    let writes: [(u64, usize); 6] = [
        (0, 4096),
        (65536 - 100, 300),
        (1 << 20, 65536),
        (3 << 20 | 7, 130_000),
        (size - 512, 512),
        (size - 1, 1),
    ];
    for (i, &(offset, len)) in writes.iter().enumerate() {
        let data = pattern(i as u32, offset, len);
        must(
            disk.write_at(&data, offset),
            format!("write {offset:#x}+{len:#x}"),
        );
        model.write(offset, &data);
    }
    must(matches_model(&mut disk, &model), "before reopen");
    must(disk.flush(), "flush");
    must(disk.close(), "close");
    let mut disk = must(h.open(&path, Mode::writable()), "reopen");
    must(matches_model(&mut disk, &model), "after reopen");
    must(disk.close(), "close");
    must(our_check_clean(h, &path), "check");
}

/// Requests reaching past the end fail with `OutOfRange` and change nothing.
pub fn out_of_range<H: Harness>(h: &H) {
    let dir = scratch();
    let path = dir.path().join("disk.qcow2");
    let size = 1 << 20;
    let mut disk = must(
        h.create(&path, &layout(size, 3, 65536, 16), Mode::writable()),
        "create",
    );
    let mut buf = [0u8; 1024];
    let is_out_of_range =
        |r: Result<(), Error>| matches!(r, Err(Error::Request(RequestError::OutOfRange { .. })));
    assert!(
        is_out_of_range(disk.read_at(&mut buf, size - 512)),
        "read past the end"
    );
    assert!(
        is_out_of_range(disk.write_at(&buf, size - 512)),
        "write past the end"
    );
    assert!(
        is_out_of_range(disk.write_at(&buf, u64::MAX - 100)),
        "write at u64::MAX"
    );
    assert!(
        is_out_of_range(disk.write_zeroes(size, 512, false)),
        "write_zeroes past the end"
    );
    assert!(
        is_out_of_range(disk.discard(size - 512, 65536)),
        "discard past the end"
    );
    must(matches_model(&mut disk, &Model::new(size)), "contents");
    must(disk.close(), "close");
    must(our_check_clean(h, &path), "check");
}

/// A read-only open refuses every modification with `ReadOnly` and never touches the file.
pub fn read_only_refuses_writes<H: Harness>(h: &H) {
    let dir = scratch();
    let path = dir.path().join("disk.qcow2");
    let mut disk = must(
        h.create(&path, &layout(4 << 20, 3, 4096, 16), Mode::writable()),
        "create",
    );
    must(disk.write_at(&pattern(1, 0, 8192), 0), "write");
    must(disk.close(), "close");
    let before = std::fs::read(&path).expect("image bytes");
    let mut disk = must(h.open(&path, Mode::read_only()), "open read-only");
    assert!(
        disk.info().read_only,
        "info().read_only on a read-only open"
    );
    let read_only = |r: Result<(), Error>, what: &str| {
        assert_eq!(
            r,
            Err(Error::Request(RequestError::ReadOnly)),
            "{what} on a read-only image"
        );
    };
    read_only(disk.write_at(&[1; 512], 0), "write");
    read_only(disk.write_zeroes(0, 4096, true), "write_zeroes");
    read_only(disk.discard(0, 4096), "discard");
    read_only(disk.resize(8 << 20, false), "resize");
    let mut buf = vec![0u8; 8192];
    must(disk.read_at(&mut buf, 0), "read");
    assert_eq!(buf, pattern(1, 0, 8192));
    must(disk.flush(), "flush of a read-only image");
    must(disk.close(), "close");
    assert!(
        std::fs::read(&path).expect("image bytes") == before,
        "a read-only open modified the file"
    );
}

/// Resizing: sizes must be multiples of 512, shrinking over data needs consent, growing
/// reads as zero, and the image stays clean.
pub fn resize_rules<H: Harness>(h: &H) {
    let dir = scratch();
    let path = dir.path().join("disk.qcow2");
    let mut disk = must(
        h.create(&path, &layout(4 << 20, 3, 65536, 16), Mode::writable()),
        "create",
    );
    let mut model = Model::new(4 << 20);
    let data = pattern(3, 3 << 20, 65536);
    must(disk.write_at(&data, 3 << 20), "write");
    model.write(3 << 20, &data);
    assert_eq!(
        disk.resize(5_000_001, false),
        Err(Error::Request(RequestError::UnalignedSize))
    );
    match disk.resize(2 << 20, false) {
        Err(Error::Request(RequestError::ShrinkDropsData(at))) => {
            assert!(
                (2 << 20..4 << 20).contains(&at),
                "ShrinkDropsData names {at:#x}, outside the dropped range"
            )
        }
        other => panic!("shrinking over data without consent: {other:?}"),
    }
    assert_eq!(disk.len(), 4 << 20, "a refused resize changed the size");
    must(disk.resize(64 << 20, false), "grow to 64 MiB");
    model.resize(64 << 20);
    assert_eq!(disk.len(), 64 << 20);
    must(matches_model(&mut disk, &model), "after growing");
    must(disk.resize((3 << 20) + 512, true), "shrink with consent");
    model.resize((3 << 20) + 512);
    must(disk.resize(8 << 20, false), "grow again");
    model.resize(8 << 20);
    must(
        matches_model(&mut disk, &model),
        "after shrinking and growing",
    );
    must(disk.close(), "close");
    let mut disk = must(h.open(&path, Mode::read_only()), "reopen");
    must(matches_model(&mut disk, &model), "after reopen");
    must(disk.close(), "close");
    must(our_check_clean(h, &path), "check");
}

/// `block_status` tells data from unallocated and discarded ranges.
pub fn block_status<H: Harness>(h: &H) {
    let dir = scratch();
    let path = dir.path().join("disk.qcow2");
    let cs = 65536;
    let mut disk = must(
        h.create(&path, &layout(8 << 20, 3, cs as u32, 16), Mode::writable()),
        "create",
    );
    must(
        disk.write_at(&pattern(1, 2 * cs, 2 * cs as usize), 2 * cs),
        "write",
    );
    let s = must(
        disk.block_status(2 * cs, (8 << 20) - 2 * cs),
        "status of written clusters",
    );
    assert_eq!(s.offset, 2 * cs);
    assert!(
        matches!(s.allocation, Allocation::Data { .. }),
        "written clusters: {s:?}"
    );
    assert!(
        s.len >= cs && s.len <= 2 * cs,
        "extent of two written clusters: {s:?}"
    );
    let s = must(disk.block_status(0, 2 * cs), "status of unwritten clusters");
    assert_eq!(
        (s.offset, s.len, s.allocation),
        (0, 2 * cs, Allocation::Unallocated)
    );
    must(disk.discard(2 * cs, cs), "discard");
    let s = must(
        disk.block_status(2 * cs, cs),
        "status of a discarded cluster",
    );
    assert!(
        matches!(
            s.allocation,
            Allocation::Unallocated | Allocation::Zero { host: None }
        ),
        "a discarded cluster: {s:?}"
    );
    let s = must(
        disk.block_status(3 * cs, cs),
        "status of the cluster next to it",
    );
    assert!(
        matches!(s.allocation, Allocation::Data { .. }),
        "the neighbour of a discard: {s:?}"
    );
    must(disk.close(), "close");
    must(our_check_clean(h, &path), "check");
}

/// Space discarded in one session is reused by allocations in the next (first fit from the
/// start of the file, like QEMU), so a disk that keeps rewriting does not grow its file.
pub fn space_reused_across_sessions<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let dir = scratch();
    let path = dir.path().join("disk.qcow2");
    let size = 64 << 20;
    let mut model = Model::new(size);
    let mut disk = must(
        h.create(&path, &layout(size, 3, 65536, 16), Mode::writable()),
        "create",
    );
    let data = pattern(1, 0, 4 << 20);
    must(disk.write_at(&data, 0), "write 4 MiB");
    must(disk.discard(0, 4 << 20), "discard it");
    must(disk.close(), "close");
    let grown = std::fs::metadata(&path).expect("stat").len();
    for round in 0..3u32 {
        let mut disk = must(h.open(&path, Mode::writable()), "reopen");
        let offset = (8 + 8 * u64::from(round)) << 20;
        let data = pattern(2 + round, offset, 4 << 20);
        must(disk.write_at(&data, offset), "write 4 MiB elsewhere");
        model.write(offset, &data);
        must(disk.discard(offset, 4 << 20), "discard it");
        model.write(offset, &vec![0; 4 << 20]);
        must(matches_model(&mut disk, &model), "reading back");
        must(disk.close(), "close");
    }
    let len = std::fs::metadata(&path).expect("stat").len();
    assert!(
        len <= grown + (1 << 20),
        "the file grew from {grown} to {len} bytes instead of reusing space"
    );
    must(our_check_clean(h, &path), "check");
}
