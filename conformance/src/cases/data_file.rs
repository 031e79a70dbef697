//! External data files (`data_file=`, `data_file_raw=on|off`), against images qemu-img
//! makes and checks.
//!
//! QEMU's rules the cases hold us to: guest data lives in the data file at the guest
//! offset, the image keeps the metadata only (data clusters have no refcounts, `qemu-img
//! check` stays clean); with `data_file_raw=on` the data file stays a valid raw image of
//! the disk, zeroed where the disk reads as zero. Images qemu-img writes read byte for
//! byte as `qemu-img convert` gives them; our writes are mirrored with qemu-io on a twin
//! pair (image + data file) and the two compare equal; images we create check clean.

use std::path::{Path, PathBuf};

use qcow2_proto::CreateOptions;

use super::mirror::Step;
use super::{assert_reads_as, first_diff, must, read_all};
use crate::harness::{Disk, Harness, Mode};
use crate::qemu::Qemu;
use crate::verify::scratch;

const MIB: u64 = 1 << 20;

/// The geometries: cluster size, raw flag.
const SHAPES: [(u32, bool); 6] = [
    (4096, false),
    (4096, true),
    (65536, false),
    (65536, true),
    (2 << 20, false),
    (2 << 20, true),
];

fn size_for(cs: u32) -> u64 {
    (8 * MIB).max(4 * u64::from(cs)) + 512 * 3
}

/// Creates `name.qcow2` with data file `name.raw` in `dir` with qemu-img; returns both
/// paths. (The name stored is absolute: QEMU 10 resolves a relative data-file name against
/// its working directory, both creating and opening, where we resolve it against the
/// image's directory like a backing file's; absolute names mean the same to both.)
fn qemu_pair(q: &Qemu, dir: &Path, name: &str, cs: u32, raw: bool) -> (PathBuf, PathBuf) {
    let img = dir.join(format!("{name}.qcow2"));
    let data = dir.join(format!("{name}.raw"));
    let flag = if raw { "on" } else { "off" };
    q.create(
        &img,
        &format!(
            "cluster_size={cs},data_file={},data_file_raw={flag}",
            data.display()
        ),
        size_for(cs),
    );
    (img, data)
}

/// With the raw flag, the data file (up to the disk's size) is the disk.
fn assert_raw_view(q: &Qemu, img: &Path, data: &Path, context: &str) {
    let dir = img.parent().expect("images live in a directory");
    let want = dir.join("view.raw");
    q.to_raw(img, None, &want);
    let want = std::fs::read(&want).expect("the converted image");
    let mut got = std::fs::read(data).expect("the data file");
    assert!(
        got.len() >= want.len(),
        "{context}: data file shorter ({}) than the disk ({})",
        got.len(),
        want.len()
    );
    got.truncate(want.len());
    if let Some(d) = first_diff(&got, &want) {
        panic!("{context}: the raw data file is not the disk: {d}");
    }
}

/// Every data-file image qemu-io wrote (data, zeroes, discards) reads as qemu-img
/// converts it, whole and in unaligned pieces, read-only and writable.
pub fn reads_qemu_data_files<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("data_file::reads_qemu_data_files") else {
        return;
    };
    for (cs, raw) in SHAPES {
        let dir = scratch();
        let (img, data) = qemu_pair(&q, dir.path(), "disk", cs, raw);
        let size = size_for(cs);
        q.io(
            &img,
            &[
                "write -P 0x11 0 4096".to_string(),
                format!("write -P 0x22 {} 300000", 200_000),
                format!("write -P 0x33 {} 70000", size / 2 + 512),
                format!("write -P 0x44 {} 4096", size - 4096),
                format!("write -z {} {}", 3 * MIB, MIB),
                format!("discard {} {}", 5 * MIB, 2 * MIB),
                format!("write -P 0x55 {} 1000", 5 * MIB + 3000),
            ],
        );
        let want_path = dir.path().join("want.raw");
        q.to_raw(&img, None, &want_path);
        let want = std::fs::read(&want_path).unwrap();
        for mode in [Mode::read_only(), Mode::writable()] {
            let ctx = format!("cluster {cs}, raw {raw} ({mode:?})");
            let mut disk = must(h.open(&img, mode), format!("open {ctx}"));
            let name = data.display().to_string();
            assert_eq!(disk.info().data_file.as_deref(), Some(&*name), "{ctx}");
            assert_eq!(disk.info().data_file_raw, raw, "{ctx}");
            assert_reads_as(&mut disk, &want, &ctx);
            must(disk.close(), "close");
        }
        q.assert_clean(&img, "after our opens");
        if raw {
            assert_raw_view(&q, &img, &data, &format!("cluster {cs}"));
        }
    }
}

fn steps(size: u64) -> Vec<Step> {
    vec![
        Step::Write {
            offset: 123_457,
            len: 1000,
            byte: 0xa1,
        },
        Step::Write {
            offset: 0,
            len: 512,
            byte: 0xa2,
        },
        Step::Write {
            offset: 210_000,
            len: 2 * MIB + 150_001,
            byte: 0xa3,
        },
        Step::Zero {
            offset: 600_001,
            len: 9_000,
            unmap: false,
        },
        Step::Zero {
            offset: MIB,
            len: 256 << 10,
            unmap: true,
        },
        Step::Zero {
            offset: 2 * MIB,
            len: 2 * MIB,
            unmap: false,
        },
        Step::Discard {
            offset: 4 * MIB,
            len: 2 * MIB,
        },
        Step::Write {
            offset: 4 * MIB + 70_000,
            len: 3,
            byte: 0xa4,
        },
        Step::Write {
            offset: size - 5000,
            len: 4488,
            byte: 0xa5,
        },
        Step::Write {
            offset: size - 512,
            len: 512,
            byte: 0xa6,
        },
        Step::Write {
            offset: 2 * MIB + 4096,
            len: 8192,
            byte: 0xa7,
        },
    ]
}

/// Our writes into qemu-made data-file images, mirrored by qemu-io on a twin pair: same
/// guest contents, clean checks, and with the raw flag a data file that is the disk.
pub fn writes_mirror_qemu<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("data_file::writes_mirror_qemu") else {
        return;
    };
    for (cs, raw) in SHAPES {
        let dir = scratch();
        let (ours, ours_data) = qemu_pair(&q, dir.path(), "ours", cs, raw);
        let (twin, _) = qemu_pair(&q, dir.path(), "twin", cs, raw);
        let size = size_for(cs);
        let ctx = format!("cluster {cs}, raw {raw}");
        let steps = steps(size);
        let mut disk = must(h.open(&ours, Mode::writable()), format!("open {ctx}"));
        for (i, &s) in steps.iter().enumerate() {
            s.apply(&mut disk);
            if i % 3 == 2 {
                must(disk.flush(), "flush");
            }
        }
        must(disk.close(), "close");
        let cmds: Vec<String> = steps.iter().map(|&s| s.qemu_io()).collect();
        q.io(&twin, &cmds);
        let want_path = dir.path().join("want.raw");
        q.to_raw(&twin, None, &want_path);
        if let Err(e) = q.same_as_raw(&ours, &want_path) {
            panic!("{ctx}: ours and qemu-io's twin differ: {e}");
        }
        assert_eq!(q.compare_status(&ours, &twin), 0, "{ctx}: qemu-img compare");
        q.assert_clean(&ours, &ctx);
        if raw {
            assert_raw_view(&q, &ours, &ours_data, &ctx);
        }
        // And we read back what qemu-io wrote into the twin.
        let want = std::fs::read(&want_path).unwrap();
        let mut disk = must(h.open(&twin, Mode::read_only()), "open the twin");
        if let Some(d) = first_diff(&read_all(&mut disk), &want) {
            panic!("{ctx}: twin: {d}");
        }
        must(disk.close(), "close");
    }
}

/// Images we create with a data file (raw flag on and off) check clean, name their data
/// file like qemu-img's, and hold what we wrote for qemu-io.
pub fn we_create_data_files<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("data_file::we_create_data_files") else {
        return;
    };
    for (cs, raw) in [
        (4096, false),
        (65536, true),
        (65536, false),
        (2 << 20, true),
    ] {
        let dir = scratch();
        let img = dir.path().join("made.qcow2");
        let data = dir.path().join("made.raw");
        let name = data.display().to_string();
        let size = size_for(cs);
        let mut o = CreateOptions::new(size);
        o.cluster_size = cs;
        o.data_file = Some(name.clone());
        o.data_file_raw = raw;
        let ctx = format!("cluster {cs}, raw {raw}");
        let mut disk = must(
            h.create(&img, &o, Mode::writable()),
            format!("create {ctx}"),
        );
        must(disk.write_at(&[0x5a; 5000], 70_000), "write");
        must(disk.write_at(&[0x6b; 512], size - 512), "write the end");
        must(disk.write_zeroes(70_000, 1000, false), "zero");
        must(disk.close(), "close");
        let len = std::fs::metadata(&data).map(|m| m.len()).unwrap_or(0);
        assert!(
            len >= size,
            "{ctx}: data file of {len} bytes for a disk of {size}"
        );
        q.assert_clean(&img, &ctx);
        let info = q.info(&img);
        let specific = &info["format-specific"]["data"];
        assert_eq!(specific["data-file"], name.as_str(), "{ctx}: {info}");
        assert_eq!(specific["data-file-raw"], raw, "{ctx}: {info}");
        q.io(
            &img,
            &[
                "read -P 0 70000 1000".to_string(),
                "read -P 0x5a 71000 4000".to_string(),
                format!("read -P 0x6b {} 512", size - 512),
                "read -P 0 0 70000".to_string(),
            ],
        );
        if raw {
            assert_raw_view(&q, &img, &data, &ctx);
        }
    }
}

/// A relative data-file name resolves against the image's directory (as a backing file's
/// does), whatever the working directory.
pub fn relative_name_next_to_the_image<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let dir = scratch();
    let img = dir.path().join("rel.qcow2");
    let mut o = CreateOptions::new(MIB);
    o.data_file = Some("rel-data.raw".into());
    let mut disk = must(h.create(&img, &o, Mode::writable()), "create");
    must(disk.write_at(&[0x77; 4096], 65536), "write");
    must(disk.close(), "close");
    let data = std::fs::read(dir.path().join("rel-data.raw")).expect("the data file");
    assert_eq!(data.len() as u64, MIB);
    assert!(data[65536..65536 + 4096].iter().all(|&b| b == 0x77));
    let mut disk = must(h.open(&img, Mode::read_only()), "reopen");
    let mut buf = vec![0u8; 8192];
    must(disk.read_at(&mut buf, 61440), "read back");
    assert!(buf[..4096].iter().all(|&b| b == 0) && buf[4096..].iter().all(|&b| b == 0x77));
    must(disk.close(), "close");
}

/// Resizing follows QEMU: the data file takes the disk's new size, and with the raw flag it
/// stays the disk; the image checks clean.
pub fn resize_follows<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("data_file::resize_follows") else {
        return;
    };
    for raw in [false, true] {
        let dir = scratch();
        let (img, data) = qemu_pair(&q, dir.path(), "grow", 65536, raw);
        let size = size_for(65536);
        let ctx = format!("raw {raw}");
        let mut disk = must(h.open(&img, Mode::writable()), format!("open {ctx}"));
        must(disk.write_at(&[0x31; 3000], size - 3000), "write the end");
        must(disk.resize(size + MIB, false), "grow");
        must(
            disk.write_at(&[0x32; 5000], size + 70_000),
            "write past the old end",
        );
        must(disk.close(), "close");
        let len = std::fs::metadata(&data).map(|m| m.len()).unwrap_or(0);
        assert_eq!(len, size + MIB, "{ctx}: data file length");
        q.assert_clean(&img, &ctx);
        q.io(
            &img,
            &[
                format!("read -P 0x31 {} 1000", size - 1000),
                format!("read -P 0 {size} 70000"),
                format!("read -P 0x32 {} 5000", size + 70_000),
            ],
        );
        if raw {
            assert_raw_view(&q, &img, &data, &ctx);
        }
    }
}
