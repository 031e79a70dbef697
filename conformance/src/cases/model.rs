//! Model-based properties: random scripts of writes, reads, zeroes, discards, flushes,
//! reopens and resizes must leave the image equal to a byte model, clean under our `check`
//! and qemu-img's, and equal to the model under `qemu-img compare`.

use super::layout;
use crate::harness::{Disk, Harness, Mode};
use crate::model::{pattern, synthetic_backing, Model, SYNTHETIC_BACKING_LEN};
use crate::prop;
use crate::qemu::Qemu;
use crate::script::{clip, Op, Script};
use crate::verify::{matches_model, our_check_clean, qemu_agrees, scratch};

/// Virtual size scripts start from.
const START_SIZE: u64 = 4 << 20;
/// Inputs per property unless `QCOW2_QC_TESTS` says otherwise.
const DEFAULT_TESTS: u64 = 32;
/// Most operations in one script.
const SCRIPT_LEN: usize = 40;

/// The image a property's scripts run on.
#[derive(Clone, Copy, Debug)]
struct Shape {
    version: u32,
    cluster_size: u32,
    /// Extended L2 entries (subclusters).
    extended_l2: bool,
    /// Over a raw backing file (the synthetic pattern, shorter than the disk): the model
    /// starts as its contents.
    backing: bool,
}

const fn shape(version: u32, cluster_size: u32) -> Shape {
    Shape {
        version,
        cluster_size,
        extended_l2: false,
        backing: false,
    }
}

fn run<H: Harness>(
    h: &H,
    qemu: Option<&Qemu>,
    mode: Mode,
    shape: Shape,
    script: &Script,
) -> Result<(), String> {
    let dir = scratch();
    let path = dir.path().join("disk.qcow2");
    let cs = u64::from(shape.cluster_size);
    let mut options = layout(START_SIZE, shape.version, shape.cluster_size, 16);
    options.extended_l2 = shape.extended_l2;
    let mut model = Model::new(START_SIZE);
    if shape.backing {
        let mut base = vec![0u8; SYNTHETIC_BACKING_LEN as usize];
        synthetic_backing(1, 0, &mut base);
        std::fs::write(dir.path().join("base.raw"), &base).map_err(|e| e.to_string())?;
        model.write(0, &base);
        options.backing_file = Some("base.raw".into());
        options.backing_format = Some("raw".into());
    }
    let mut disk = h
        .create(&path, &options, mode)
        .map_err(|e| format!("create: {e}"))?;
    for (step, op) in script.ops.iter().enumerate() {
        let at = |e: &dyn std::fmt::Display| format!("step {step} {op:?}: {e}");
        let size = model.len();
        match *op {
            Op::Write { offset, len, seed } => {
                if let Some((offset, len)) = clip(offset, len, size) {
                    let data = pattern(seed, offset, len as usize);
                    disk.write_at(&data, offset).map_err(|e| at(&e))?;
                    model.write(offset, &data);
                }
            }
            Op::Read { offset, len } => {
                if let Some((offset, len)) = clip(offset, len, size) {
                    let mut got = vec![0; len as usize];
                    let mut want = vec![0; len as usize];
                    disk.read_at(&mut got, offset).map_err(|e| at(&e))?;
                    model.read(offset, &mut want);
                    if let Some(d) = crate::model::first_difference(&got, &want, offset) {
                        return Err(at(&d));
                    }
                }
            }
            Op::Zeroes { offset, len, unmap } => {
                if let Some((offset, len)) = clip(offset, len, size) {
                    disk.write_zeroes(offset, len, unmap).map_err(|e| at(&e))?;
                    model.zero(offset, len);
                }
            }
            Op::Discard { offset, len } => {
                if let Some((offset, len)) = clip(offset, len, size) {
                    disk.discard(offset, len).map_err(|e| at(&e))?;
                    model.discard(offset, len, cs);
                }
            }
            Op::Flush => disk.flush().map_err(|e| at(&e))?,
            Op::Reopen => {
                disk.close().map_err(|e| at(&e))?;
                disk = h.open(&path, mode).map_err(|e| at(&e))?;
            }
            Op::Resize { size: new } => {
                disk.resize(new, true).map_err(|e| at(&e))?;
                model.resize(new);
            }
        }
    }
    matches_model(&mut disk, &model).map_err(|e| format!("after the script: {e}"))?;
    disk.close().map_err(|e| format!("close: {e}"))?;
    let mut disk = h
        .open(
            &path,
            Mode {
                read_only: true,
                ..mode
            },
        )
        .map_err(|e| format!("reopen: {e}"))?;
    matches_model(&mut disk, &model).map_err(|e| format!("after close and reopen: {e}"))?;
    disk.close().map_err(|e| format!("close: {e}"))?;
    our_check_clean(h, &path)?;
    if let Some(q) = qemu {
        qemu_agrees(q, &path, &model, dir.path())?;
    }
    Ok(())
}

fn property<H: Harness>(h: &H, name: &str, mode: Mode, shape: Shape, tests: u64) {
    let qemu = if h.caps().real_files {
        Qemu::optional(name)
    } else {
        None
    };
    prop::check(name, prop::test_count(tests), SCRIPT_LEN, |s: &Script| {
        run(h, qemu.as_ref(), mode, shape, s)
    });
}

/// compat=0.10, 512-byte clusters.
pub fn v2_cluster_512<H: Harness>(h: &H) {
    property(
        h,
        "model::v2_cluster_512",
        Mode::writable(),
        shape(2, 512),
        DEFAULT_TESTS,
    );
}

/// compat=0.10, 4 KiB clusters.
pub fn v2_cluster_4k<H: Harness>(h: &H) {
    property(
        h,
        "model::v2_cluster_4k",
        Mode::writable(),
        shape(2, 4096),
        DEFAULT_TESTS,
    );
}

/// compat=0.10, 64 KiB clusters.
pub fn v2_cluster_64k<H: Harness>(h: &H) {
    property(
        h,
        "model::v2_cluster_64k",
        Mode::writable(),
        shape(2, 65536),
        DEFAULT_TESTS,
    );
}

/// compat=1.1, 512-byte clusters.
pub fn v3_cluster_512<H: Harness>(h: &H) {
    property(
        h,
        "model::v3_cluster_512",
        Mode::writable(),
        shape(3, 512),
        DEFAULT_TESTS,
    );
}

/// compat=1.1, 4 KiB clusters.
pub fn v3_cluster_4k<H: Harness>(h: &H) {
    property(
        h,
        "model::v3_cluster_4k",
        Mode::writable(),
        shape(3, 4096),
        DEFAULT_TESTS,
    );
}

/// compat=1.1, 64 KiB clusters.
pub fn v3_cluster_64k<H: Harness>(h: &H) {
    property(
        h,
        "model::v3_cluster_64k",
        Mode::writable(),
        shape(3, 65536),
        DEFAULT_TESTS,
    );
}

/// compat=1.1, 4 KiB clusters, opened with `O_DIRECT` (unaligned guest buffers and
/// requests go through the runtime's bounce path).
pub fn v3_cluster_4k_direct<H: Harness>(h: &H) {
    crate::require!(h, direct_io);
    property(
        h,
        "model::v3_cluster_4k_direct",
        Mode::direct(),
        shape(3, 4096),
        DEFAULT_TESTS / 4,
    );
}

/// compat=1.1, 64 KiB clusters, write-through (every write flushed before it completes).
pub fn v3_cluster_64k_write_through<H: Harness>(h: &H) {
    crate::require!(h, write_through);
    property(
        h,
        "model::v3_cluster_64k_write_through",
        Mode::write_through(),
        shape(3, 65536),
        DEFAULT_TESTS / 4,
    );
}

/// Extended L2 entries, 16 KiB clusters (512-byte subclusters).
pub fn v3_extended_l2_16k<H: Harness>(h: &H) {
    let shape = Shape {
        extended_l2: true,
        ..shape(3, 16384)
    };
    property(
        h,
        "model::v3_extended_l2_16k",
        Mode::writable(),
        shape,
        DEFAULT_TESTS,
    );
}

/// Extended L2 entries, 64 KiB clusters, over a raw backing file shorter than the disk.
pub fn v3_extended_l2_64k_backing<H: Harness>(h: &H) {
    let shape = Shape {
        extended_l2: true,
        backing: true,
        ..shape(3, 65536)
    };
    property(
        h,
        "model::v3_extended_l2_64k_backing",
        Mode::writable(),
        shape,
        DEFAULT_TESTS,
    );
}

/// Standard entries, 4 KiB clusters, over a raw backing file shorter than the disk.
pub fn v3_cluster_4k_backing<H: Harness>(h: &H) {
    let shape = Shape {
        backing: true,
        ..shape(3, 4096)
    };
    property(
        h,
        "model::v3_cluster_4k_backing",
        Mode::writable(),
        shape,
        DEFAULT_TESTS,
    );
}
