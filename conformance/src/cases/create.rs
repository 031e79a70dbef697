//! Creation options qemu-img must find clean: preallocation modes and lazy refcounts.

use std::os::unix::fs::MetadataExt;

use qcow2_proto::{CreateError, OpenError, Preallocation};
use serde_json::Value;

use super::{layout, must};
use crate::harness::{Disk, Error, Harness, Mode};
use crate::model::{pattern, Model};
use crate::qemu::Qemu;
use crate::verify::{matches_model, our_check_clean, qemu_agrees, scratch};

fn preallocated<H: Harness>(h: &H, case: &str, mode: Preallocation) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require(case) else { return };
    for version in [2, 3] {
        let cell = format!("{case} compat={version}");
        let dir = scratch();
        let path = dir.path().join("prealloc.qcow2");
        let size = 8u64 << 20;
        let mut opts = layout(size, version, 65536, 16);
        opts.preallocation = mode;
        let mut disk = must(
            h.create(&path, &opts, Mode::writable()),
            format!("{cell}: create"),
        );
        let mut model = Model::new(size);
        must(
            matches_model(&mut disk, &model),
            format!("{cell}: a new image reads as zero"),
        );
        // Every cluster is mapped: no extent is unallocated.
        let mut at = 0;
        while at < size {
            let s = must(
                disk.block_status(at, size - at),
                format!("{cell}: block_status at {at:#x}"),
            );
            assert_eq!(
                s.offset, at,
                "{cell}: block_status answered for another offset"
            );
            assert!(
                !matches!(s.allocation, qcow2_proto::Allocation::Unallocated),
                "{cell}: preallocated image has an unallocated extent {s:?}"
            );
            at += s.len;
        }
        // Writes into preallocated clusters land where they should.
        let data = pattern(9, 3 << 20, 70_000);
        must(disk.write_at(&data, 3 << 20), format!("{cell}: write"));
        model.write(3 << 20, &data);
        must(disk.close(), format!("{cell}: close"));

        must(
            qemu_agrees(&q, &path, &model, dir.path()),
            format!("{cell}: qemu"),
        );
        must(our_check_clean(h, &path), format!("{cell}: our check"));
        let map: Value = serde_json::from_str(&q.img(&[
            "map",
            "--output=json",
            "-f",
            "qcow2",
            &path.display().to_string(),
        ]))
        .expect("qemu-img map prints JSON");
        let mut covered = 0;
        for e in map.as_array().expect("a JSON array") {
            assert!(
                e["data"].as_bool() == Some(true) && e["offset"].is_u64(),
                "{cell}: qemu-img map: {e} not mapped"
            );
            covered += e["length"].as_u64().unwrap_or(0);
        }
        assert_eq!(covered, size, "{cell}: qemu-img map covers the disk: {map}");
        let used = std::fs::metadata(&path).expect("metadata").blocks() * 512;
        if mode == Preallocation::Metadata {
            // As qemu-img's: the clusters are mapped but the file holds only the metadata
            // and what was written (no host space allocated ahead of never-written clusters).
            assert!(
                used < size / 2,
                "{cell}: {mode:?} is not sparse ({used} bytes used for {size})"
            );
        } else {
            assert!(
                used >= size,
                "{cell}: {mode:?} left the data sparse ({used} bytes used for {size})"
            );
        }
    }
}

/// `preallocation=metadata`: every cluster mapped, data sparse.
pub fn preallocation_metadata<H: Harness>(h: &H) {
    preallocated(h, "create::preallocation_metadata", Preallocation::Metadata);
}

/// A metadata-preallocated image stays sparse at create (as qemu-img's), and in-place
/// writes that run sequentially get host space allocated ahead of them, a step at a time,
/// inside the file (the file system takes writes into allocated space faster than into
/// holes); scattered writes do not. Contents and metadata stay what qemu-img expects.
pub fn metadata_preallocation_filled_ahead_of_sequential_writes<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let case = "create::metadata_preallocation_filled_ahead_of_sequential_writes";
    let Some(q) = Qemu::require(case) else { return };
    let dir = scratch();
    let path = dir.path().join("meta.qcow2");
    let (size, step) = (64u64 << 20, 8u64 << 20);
    let mut opts = layout(size, 3, 65536, 16);
    opts.preallocation = Preallocation::Metadata;
    let mode = Mode {
        grow_step: Some(step),
        ..Mode::writable()
    };
    let mut disk = must(h.create(&path, &opts, mode), format!("{case}: create"));
    let used = || std::fs::metadata(&path).expect("metadata").blocks() * 512;
    let mut model = Model::new(size);
    assert!(
        used() < 1 << 20,
        "{case}: not sparse at create ({} bytes)",
        used()
    );
    for (i, at) in [40u64 << 20, 10 << 20, 50 << 20].into_iter().enumerate() {
        let data = pattern(i as u32 + 1, at, 4096);
        must(disk.write_at(&data, at), format!("{case}: scattered write"));
        model.write(at, &data);
    }
    assert!(
        used() < 1 << 20,
        "{case}: scattered writes allocated ahead ({} bytes)",
        used()
    );
    for at in (0..1u64 << 20).step_by(65536) {
        let data = pattern(7, at, 65536);
        must(
            disk.write_at(&data, at),
            format!("{case}: sequential write"),
        );
        model.write(at, &data);
    }
    must(disk.flush(), format!("{case}: flush"));
    let filled = used();
    assert!(
        filled >= step && filled < size / 2,
        "{case}: a sequential stream should have a step ({step}) allocated ahead, not the \
         disk ({filled} bytes used)"
    );
    must(matches_model(&mut disk, &model), format!("{case}: reads"));
    must(disk.close(), format!("{case}: close"));
    must(
        qemu_agrees(&q, &path, &model, dir.path()),
        format!("{case}: qemu"),
    );
    must(our_check_clean(h, &path), format!("{case}: our check"));
}

/// `preallocation=falloc`: every cluster mapped and allocated on the host.
pub fn preallocation_falloc<H: Harness>(h: &H) {
    preallocated(h, "create::preallocation_falloc", Preallocation::Falloc);
}

/// `preallocation=full`: every cluster mapped and written.
pub fn preallocation_full<H: Harness>(h: &H) {
    preallocated(h, "create::preallocation_full", Preallocation::Full);
}

/// `lazy_refcounts=on`: the bit is set, writes and a clean close leave a clean image; the
/// option needs compat=1.1.
pub fn lazy_refcounts<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("create::lazy_refcounts") else {
        return;
    };
    let dir = scratch();
    let path = dir.path().join("lazy.qcow2");
    let size = 16 << 20;
    let mut opts = layout(size, 3, 65536, 16);
    opts.lazy_refcounts = true;
    let mut disk = must(h.create(&path, &opts, Mode::writable()), "create");
    assert!(disk.info().lazy_refcounts, "info().lazy_refcounts");
    let mut model = Model::new(size);
    for i in 0..8u64 {
        let data = pattern(i as u32, i * 1_000_000, 100_000);
        must(disk.write_at(&data, i * 1_000_000), "write");
        model.write(i * 1_000_000, &data);
    }
    must(disk.flush(), "flush");
    must(disk.discard(1 << 20, 1 << 20), "discard");
    model.discard(1 << 20, 1 << 20, 65536);
    must(disk.close(), "close");
    let info = q.info(&path);
    assert_eq!(
        info["format-specific"]["data"]["lazy-refcounts"].as_bool(),
        Some(true),
        "{info}"
    );
    must(qemu_agrees(&q, &path, &model, dir.path()), "qemu");
    must(our_check_clean(h, &path), "our check");

    opts.version = 2;
    let r = h
        .create(&dir.path().join("v2.qcow2"), &opts, Mode::writable())
        .map(drop);
    assert!(
        matches!(
            r,
            Err(Error::Open(OpenError::Create(CreateError::NeedsV3(_))))
        ),
        "lazy_refcounts with compat=0.10: {r:?}"
    );
}

/// QEMU's automatic repair: an image qemu-io left dirty (lazy refcounts, killed by
/// `abort` with refcounts never written) opens writable here after its refcounts are
/// rebuilt, keeps its data, takes writes, and closes clean for `qemu-img check`.
pub fn lazy_refcounts_crash_repaired_on_open<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("create::lazy_refcounts_crash_repaired_on_open") else {
        return;
    };
    let dir = scratch();
    let path = dir.path().join("crashed.qcow2");
    q.create(&path, "lazy_refcounts=on", 4 << 20);
    // qemu-io reports the abort on stderr and dies: run it without the failure check.
    let _ = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 64k",
            "-c",
            "write -P 0x22 1M 128k",
        ])
        .args(["-c", "abort"])
        .arg(&path)
        .output()
        .expect("run qemu-io");
    assert!(
        !q.check(&path).is_clean(),
        "qemu-io's abort should leave refcounts unwritten"
    );
    let mut model = Model::new(4 << 20);
    model.write(0, &[0x11; 64 << 10]);
    model.write(1 << 20, &[0x22; 128 << 10]);
    let mut disk = must(
        h.open(&path, Mode::writable()),
        "writable open of the dirty image",
    );
    must(matches_model(&mut disk, &model), "data after the repair");
    must(
        disk.write_at(&[0x33; 8192], 2 << 20),
        "write after the repair",
    );
    model.write(2 << 20, &[0x33; 8192]);
    must(disk.close(), "close");
    q.assert_clean(&path, "after the repairing open");
    must(qemu_agrees(&q, &path, &model, dir.path()), "contents");
}
