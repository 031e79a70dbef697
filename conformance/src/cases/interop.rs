//! Interoperability with qemu both ways, over the grid compat 0.10/1.1 × cluster sizes
//! 512 B/4 KiB/64 KiB/2 MiB × refcount_bits 1/16/64 (16 only with compat 0.10): images
//! qemu-io writes read identically through us; images we write pass `qemu-img check` and
//! equal the model under `qemu-img compare`.

use std::path::Path;

use super::mirror::Step;
use super::{layout, must};
use crate::harness::{Disk, Harness, Mode};
use crate::model::Model;
use crate::qemu::Qemu;
use crate::verify::{matches_model, our_check_clean, qemu_agrees, scratch};

/// The (compat, refcount_bits) cells of the grid.
const CELLS: [(u32, u32); 4] = [(2, 16), (3, 1), (3, 16), (3, 64)];

/// A virtual size holding every step: at least 4 MiB, and past the first L2 table's
/// coverage so data can straddle an L2 boundary.
fn grid_size(cs: u64) -> u64 {
    (4u64 << 20).max(cs * (cs / 8) + 16 * cs)
}

/// Full, partial and byte-granular writes, zeroes with and without unmap over allocated
/// clusters, a discard, a write across the first L2 boundary and one to the last sector.
fn steps(cs: u64, size: u64) -> Vec<Step> {
    let l2 = cs * (cs / 8);
    vec![
        Step::Write {
            offset: 0,
            len: cs,
            byte: 0x11,
        },
        Step::Write {
            offset: cs + 512,
            len: 1024,
            byte: 0x22,
        },
        Step::Write {
            offset: 3 * cs + 100,
            len: 777,
            byte: 0x33,
        },
        Step::Write {
            offset: 5 * cs,
            len: 3 * cs,
            byte: 0x44,
        },
        Step::Zero {
            offset: 6 * cs,
            len: cs,
            unmap: false,
        },
        Step::Write {
            offset: 9 * cs,
            len: 2 * cs,
            byte: 0x55,
        },
        Step::Zero {
            offset: 9 * cs,
            len: cs,
            unmap: true,
        },
        Step::Write {
            offset: 12 * cs,
            len: 2 * cs,
            byte: 0x66,
        },
        Step::Discard {
            offset: 12 * cs,
            len: cs,
        },
        Step::Zero {
            offset: 14 * cs + 512,
            len: 512,
            unmap: false,
        },
        Step::Write {
            offset: l2 - 1024,
            len: 2048,
            byte: 0x77,
        },
        Step::Write {
            offset: size - 512,
            len: 512,
            byte: 0x88,
        },
    ]
}

fn qemu_options(version: u32, cs: u64, refcount_bits: u32) -> String {
    let compat = if version == 2 { "0.10" } else { "1.1" };
    format!("compat={compat},cluster_size={cs},refcount_bits={refcount_bits}")
}

/// Asserts qemu-img info describes the geometry we asked for.
fn assert_qemu_sees(q: &Qemu, path: &Path, version: u32, cs: u64, refcount_bits: u32, size: u64) {
    let info = q.info(path);
    let data = &info["format-specific"]["data"];
    let compat = if version == 2 { "0.10" } else { "1.1" };
    assert_eq!(
        info["virtual-size"].as_u64(),
        Some(size),
        "virtual-size: {info}"
    );
    assert_eq!(
        info["cluster-size"].as_u64(),
        Some(cs),
        "cluster-size: {info}"
    );
    assert_eq!(data["compat"].as_str(), Some(compat), "compat: {info}");
    assert_eq!(
        data["refcount-bits"].as_u64(),
        Some(u64::from(refcount_bits)),
        "refcount-bits: {info}"
    );
}

fn qemu_writes<H: Harness>(h: &H, case: &str, cs: u64) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require(case) else { return };
    for (version, refcount_bits) in CELLS {
        let cell = format!("{case} compat={version} refcount_bits={refcount_bits}");
        let dir = scratch();
        let path = dir.path().join("qemu.qcow2");
        let size = grid_size(cs);
        q.create(&path, &qemu_options(version, cs, refcount_bits), size);
        let steps = steps(cs, size);
        q.io(
            &path,
            &steps.iter().map(|&s| s.qemu_io()).collect::<Vec<_>>(),
        );
        let mut model = Model::new(size);
        for &s in &steps {
            s.apply_to_model(&mut model, cs);
        }

        let mut disk = must(h.open(&path, Mode::read_only()), format!("{cell}: open"));
        let info = disk.info().clone();
        assert_eq!(
            (
                info.version,
                info.cluster_size,
                info.refcount_bits,
                info.size
            ),
            (version, cs, refcount_bits, size),
            "{cell}: the image as we see it"
        );
        must(
            matches_model(&mut disk, &model),
            format!("{cell}: reading qemu's image"),
        );
        must(disk.close(), format!("{cell}: close"));
        must(
            our_check_clean(h, &path),
            format!("{cell}: our check of qemu's image"),
        );

        // A writable open and close must leave qemu's image as clean as it was.
        let disk = must(
            h.open(&path, Mode::writable()),
            format!("{cell}: writable open"),
        );
        must(disk.close(), format!("{cell}: close"));
        must(
            qemu_agrees(&q, &path, &model, dir.path()),
            format!("{cell}: after our writable open"),
        );
    }
}

fn we_write<H: Harness>(h: &H, case: &str, cs: u64) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require(case) else { return };
    for (version, refcount_bits) in CELLS {
        let cell = format!("{case} compat={version} refcount_bits={refcount_bits}");
        let dir = scratch();
        let path = dir.path().join("ours.qcow2");
        let size = grid_size(cs);
        let mut disk = must(
            h.create(
                &path,
                &layout(size, version, cs as u32, refcount_bits),
                Mode::writable(),
            ),
            format!("{cell}: create"),
        );
        let mut model = Model::new(size);
        for s in steps(cs, size) {
            s.apply(&mut disk);
            s.apply_to_model(&mut model, cs);
        }
        must(
            matches_model(&mut disk, &model),
            format!("{cell}: reading back"),
        );
        must(disk.flush(), format!("{cell}: flush"));
        must(disk.close(), format!("{cell}: close"));
        assert_qemu_sees(&q, &path, version, cs, refcount_bits, size);
        must(
            qemu_agrees(&q, &path, &model, dir.path()),
            format!("{cell}: qemu on our image"),
        );
        must(our_check_clean(h, &path), format!("{cell}: our check"));
        // qemu reads the same bytes with its own pattern checks, too.
        q.io(
            &path,
            &[
                "read -P 0x11 0 512".to_owned(),
                format!("read -P 0x44 {} 512", 5 * cs),
            ],
        );
    }
}

/// qemu-io writes, 512-byte clusters.
pub fn qemu_writes_cluster_512<H: Harness>(h: &H) {
    qemu_writes(h, "interop::qemu_writes_cluster_512", 512);
}

/// qemu-io writes, 4 KiB clusters.
pub fn qemu_writes_cluster_4k<H: Harness>(h: &H) {
    qemu_writes(h, "interop::qemu_writes_cluster_4k", 4096);
}

/// qemu-io writes, 64 KiB clusters.
pub fn qemu_writes_cluster_64k<H: Harness>(h: &H) {
    qemu_writes(h, "interop::qemu_writes_cluster_64k", 65536);
}

/// qemu-io writes, 2 MiB clusters.
pub fn qemu_writes_cluster_2m<H: Harness>(h: &H) {
    qemu_writes(h, "interop::qemu_writes_cluster_2m", 2 << 20);
}

/// We write, 512-byte clusters.
pub fn we_write_cluster_512<H: Harness>(h: &H) {
    we_write(h, "interop::we_write_cluster_512", 512);
}

/// We write, 4 KiB clusters.
pub fn we_write_cluster_4k<H: Harness>(h: &H) {
    we_write(h, "interop::we_write_cluster_4k", 4096);
}

/// We write, 64 KiB clusters.
pub fn we_write_cluster_64k<H: Harness>(h: &H) {
    we_write(h, "interop::we_write_cluster_64k", 65536);
}

/// We write, 2 MiB clusters.
pub fn we_write_cluster_2m<H: Harness>(h: &H) {
    we_write(h, "interop::we_write_cluster_2m", 2 << 20);
}

/// Virtual sizes that are not cluster multiples (nor 512 multiples, which round up like
/// qemu-img), both ways, including the last partial cluster.
pub fn unaligned_sizes<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("interop::unaligned_sizes") else {
        return;
    };
    for (version, cs, asked) in [
        (3u32, 65536u64, 1_000_001u64),
        (2, 4096, (5 << 20) + 512),
        (3, 512, 777_777),
    ] {
        let cell = format!("compat={version} cluster_size={cs} size={asked}");
        let size = asked.next_multiple_of(512);
        let dir = scratch();

        // Ours, checked by qemu.
        let path = dir.path().join("ours.qcow2");
        let mut disk = must(
            h.create(
                &path,
                &layout(asked, version, cs as u32, 16),
                Mode::writable(),
            ),
            &cell,
        );
        assert_eq!(
            disk.len(),
            size,
            "{cell}: size rounds up to a multiple of 512"
        );
        let mut model = Model::new(size);
        let last_cluster = (size - 1) / cs * cs;
        for (offset, len, byte) in [
            (size - 512, 512, 0xe1u8),
            (last_cluster, 100, 0xe2),
            (size - 1, 1, 0xe3),
        ] {
            must(
                disk.write_at(&vec![byte; len as usize], offset),
                format!("{cell}: write at {offset}"),
            );
            model.write(offset, &vec![byte; len as usize]);
        }
        must(
            matches_model(&mut disk, &model),
            format!("{cell}: read back"),
        );
        must(disk.close(), format!("{cell}: close"));
        assert_qemu_sees(&q, &path, version, cs, 16, size);
        must(
            qemu_agrees(&q, &path, &model, dir.path()),
            format!("{cell}: qemu on our image"),
        );
        must(our_check_clean(h, &path), format!("{cell}: our check"));

        // qemu's, read by us.
        let path = dir.path().join("qemu.qcow2");
        q.create(&path, &qemu_options(version, cs, 16), asked);
        q.io(
            &path,
            &[
                format!("write -P 0xd1 {} 512", size - 512),
                format!("write -P 0xd2 {last_cluster} 100"),
            ],
        );
        let mut model = Model::new(size);
        model.write(size - 512, &[0xd1; 512]);
        model.write(last_cluster, &[0xd2; 100]);
        let mut disk = must(
            h.open(&path, Mode::writable()),
            format!("{cell}: open qemu's image"),
        );
        must(
            matches_model(&mut disk, &model),
            format!("{cell}: reading qemu's image"),
        );
        must(disk.close(), format!("{cell}: close"));
        must(
            our_check_clean(h, &path),
            format!("{cell}: our check of qemu's image"),
        );
    }
}

/// Image locking works both ways with QEMU: while qemu-io holds an image, we refuse to open
/// it (writable: qemu's "write" lock; read-only: its "shared write" lock), and while we hold
/// it writable, qemu-io and qemu-img are refused; `qemu-img info -U` still reads it.
pub fn locks_like_qemu<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("interop::locks_like_qemu") else {
        return;
    };
    let dir = scratch();
    let path = dir.path().join("locked.qcow2");
    q.create(&path, "", 1 << 20);
    let refused = |mode: Mode, want: &str| match h.open(&path, mode) {
        Ok(_) => panic!("opened {mode:?} while qemu-io holds the image"),
        Err(e) => assert!(e.to_string().contains(want), "{mode:?}: {e}"),
    };
    {
        let _held = q.hold(&path, false);
        refused(Mode::writable(), "Failed to get \"write\" lock");
        refused(Mode::read_only(), "Failed to get shared \"write\" lock");
    }
    {
        // A reader does not share write either.
        let _held = q.hold(&path, true);
        refused(Mode::writable(), "Failed to get \"write\" lock");
        let reader = must(
            h.open(&path, Mode::read_only()),
            "open beside a qemu reader",
        );
        drop(reader);
    }
    let disk = must(h.open(&path, Mode::writable()), "open once qemu-io is gone");
    let err = q
        .io_open(&path, false)
        .expect_err("qemu-io opened an image we write");
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");
    let err = q
        .io_open(&path, true)
        .expect_err("qemu-io -r opened an image we write");
    assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
    q.img(&["info", "-U", path.to_str().expect("utf-8 path")]);
    // Two of our readers share the image; a writer does not join them.
    must(disk.close(), "close");
    let a = must(h.open(&path, Mode::read_only()), "first reader");
    let b = must(h.open(&path, Mode::read_only()), "second reader");
    assert!(
        h.open(&path, Mode::writable()).is_err(),
        "a writer opened beside our readers"
    );
    drop((a, b));
    must(q.io_open(&path, false), "qemu-io after we closed");
    q.assert_clean(&path, "after the locking dance");
}
