//! Internal snapshots (made by `qemu-img snapshot -c`): images with them open, and writes,
//! zeroes and discards over clusters shared with a snapshot leave the snapshot intact.

use std::path::Path;

use super::must;
use crate::harness::{Disk, Harness, Mode};
use crate::model::{first_difference, pattern, Model};
use crate::qemu::Qemu;
use crate::verify::{matches_model, our_check_clean, qemu_agrees, scratch};

/// Compares the raw file at `raw` with `model`.
fn raw_equals(raw: &Path, model: &Model) -> Result<(), String> {
    let bytes = std::fs::read(raw).map_err(|e| e.to_string())?;
    if bytes.len() as u64 != model.len() {
        return Err(format!("raw size {} != {}", bytes.len(), model.len()));
    }
    let mut want = vec![0u8; bytes.len()];
    model.read(0, &mut want);
    first_difference(&bytes, &want, 0).map_or(Ok(()), Err)
}

fn shared_clusters_untouched<H: Harness>(h: &H, case: &str, version: u32) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require(case) else { return };
    let dir = scratch();
    let path = dir.path().join("snap.qcow2");
    let size = 4u64 << 20;
    let cs = 65536u64;
    let compat = if version == 2 { "0.10" } else { "1.1" };
    q.create(&path, &format!("compat={compat},cluster_size={cs}"), size);
    q.io(&path, &["write -P 0xa1 0 1M", "write -P 0xa2 2M 512k"]);
    let mut before = Model::new(size);
    before.write(0, &[0xa1; 1 << 20]);
    before.write(2 << 20, &[0xa2; 512 << 10]);
    q.img(&["snapshot", "-c", "snap1", &path.display().to_string()]);

    let mut disk = must(
        h.open(&path, Mode::writable()),
        "open an image with a snapshot",
    );
    let names: Vec<_> = disk
        .info()
        .snapshots
        .iter()
        .map(|s| s.name.clone())
        .collect();
    assert_eq!(names, ["snap1"], "snapshots listed");
    let mut after = before.clone();
    // A whole shared cluster, then part of another (copy-on-write of the rest).
    for (offset, len, seed) in [
        (0u64, cs as usize, 1u32),
        (cs + 512, 1000, 2),
        (5 * cs + 7, 3 * cs as usize, 3),
    ] {
        let data = pattern(seed, offset, len);
        must(
            disk.write_at(&data, offset),
            format!("write {offset:#x}+{len:#x} over shared clusters"),
        );
        after.write(offset, &data);
    }
    must(
        disk.write_zeroes(2 << 20, cs, false),
        "write_zeroes over a shared cluster",
    );
    after.zero(2 << 20, cs);
    must(
        disk.write_zeroes((2 << 20) + cs, cs + 512, true),
        "write_zeroes with unmap over shared clusters",
    );
    after.zero((2 << 20) + cs, cs + 512);
    must(
        disk.discard((2 << 20) + 4 * cs, 2 * cs),
        "discard of shared clusters",
    );
    after.discard((2 << 20) + 4 * cs, 2 * cs, cs);
    let fresh = pattern(4, 3 << 20, 70_000);
    must(
        disk.write_at(&fresh, 3 << 20),
        "write to unallocated clusters",
    );
    after.write(3 << 20, &fresh);
    must(matches_model(&mut disk, &after), "reading back");
    must(disk.flush(), "flush");
    must(disk.close(), "close");

    must(our_check_clean(h, &path), "our check");
    must(
        qemu_agrees(&q, &path, &after, dir.path()),
        "the active image",
    );
    let raw = dir.path().join("snap1.raw");
    q.to_raw(&path, Some("snap1"), &raw);
    must(
        raw_equals(&raw, &before),
        "the snapshot's contents after writes to the active image",
    );
    let mut disk = must(h.open(&path, Mode::read_only()), "reopen");
    must(
        matches_model(&mut disk, &after),
        "reading back after reopen",
    );
    must(disk.close(), "close");
}

/// compat=0.10.
pub fn shared_clusters_untouched_v2<H: Harness>(h: &H) {
    shared_clusters_untouched(h, "snapshots::shared_clusters_untouched_v2", 2);
}

/// compat=1.1.
pub fn shared_clusters_untouched_v3<H: Harness>(h: &H) {
    shared_clusters_untouched(h, "snapshots::shared_clusters_untouched_v3", 3);
}

/// Reads the autoclear feature field of a v3 header.
fn autoclear(path: &Path) -> u64 {
    let bytes = std::fs::read(path).expect("read the image");
    u64::from_be_bytes(bytes[88..96].try_into().expect("8 bytes"))
}

/// Persistent bitmaps (made by `qemu-img bitmap --add`) are maintained by every runtime: a
/// read-only open lists them and changes nothing; a writable open keeps the bitmaps'
/// autoclear bit and marks each bitmap in use on disk before the first write; the close
/// stores them back (not in use) with every written range dirty, and nothing else; the
/// data stays right and qemu-img's check is clean (no leak).
pub fn bitmaps_maintained_by_writable_open<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("snapshots::bitmaps_maintained_by_writable_open") else {
        return;
    };
    let dir = scratch();
    let path = dir.path().join("bitmaps.qcow2");
    let size = 4u64 << 20;
    q.create(&path, "", size);
    q.io(&path, &["write -P 0x5a 0 256k"]);
    q.img(&["bitmap", "--add", &path.display().to_string(), "b0"]);
    q.img(&[
        "bitmap",
        "--add",
        "-g",
        "4k",
        &path.display().to_string(),
        "b1",
    ]);
    assert_eq!(autoclear(&path) & 1, 1, "qemu-img sets the bitmaps bit");
    let flags = |name: &str| {
        // (-U: the image may be open for writing.)
        let out = q.img(&["info", "-U", "--output=json", &path.display().to_string()]);
        let info: serde_json::Value = serde_json::from_str(&out).expect("qemu-img info JSON");
        let list = info["format-specific"]["data"]["bitmaps"].clone();
        let b = list
            .as_array()
            .and_then(|l| l.iter().find(|b| b["name"] == name).cloned());
        b.map(|b| b["flags"].to_string()).unwrap_or_default()
    };

    let disk = must(h.open(&path, Mode::read_only()), "read-only open");
    let names: Vec<_> = disk.info().bitmaps.iter().map(|b| b.name.clone()).collect();
    assert_eq!(names, ["b0", "b1"], "bitmaps listed");
    must(disk.close(), "close");
    assert_eq!(autoclear(&path) & 1, 1, "a read-only open keeps the bit");
    assert!(
        !flags("b0").contains("in-use"),
        "a read-only open marks nothing"
    );

    let mut model = Model::new(size);
    model.write(0, &[0x5a; 256 << 10]);
    let mut disk = must(h.open(&path, Mode::writable()), "writable open");
    assert_eq!(autoclear(&path) & 1, 1, "a writable open keeps the bit");
    assert!(
        flags("b0").contains("in-use"),
        "in use while open: {}",
        flags("b0")
    );
    let data = pattern(7, 1 << 20, 70_000);
    must(disk.write_at(&data, 1 << 20), "write");
    model.write(1 << 20, &data);
    must(disk.write_zeroes(3 << 20, 4096, false), "write zeroes");
    model.zero(3 << 20, 4096);
    must(matches_model(&mut disk, &model), "reading back");
    must(disk.close(), "close");
    assert_eq!(autoclear(&path) & 1, 1, "the bit stays set after close");
    for name in ["b0", "b1"] {
        let f = flags(name);
        assert!(
            f.contains("auto") && !f.contains("in-use"),
            "{name} stored: {f}"
        );
    }
    let mut img = must(
        qcow2_sync::Image::open(&path, &qcow2_sync::OpenOptions::read_only()),
        "reopen",
    );
    let ranges = |img: &mut qcow2_sync::Image, name: &str| {
        must(img.read_bitmap(name), "read the bitmap").dirty_ranges()
    };
    assert_eq!(
        ranges(&mut img, "b0"),
        [(1 << 20, 128 << 10), (3 << 20, 64 << 10)],
        "b0: the written ranges, in 64 KiB granules"
    );
    assert_eq!(
        ranges(&mut img, "b1"),
        [(1 << 20, 72 << 10), (3 << 20, 4 << 10)],
        "b1: the written ranges, in 4 KiB granules"
    );
    drop(img);
    let c = q.check(&path);
    assert!(c.is_clean(), "qemu-img check: {}", c.json);
    let raw = dir.path().join("model.raw");
    model.write_raw(&raw).expect("write the model");
    must(q.same_as_raw(&path, &raw), "qemu reads the same data");
}
