//! Comparing an image with the model: through the harness, our own `check`, and qemu-img.

use std::path::Path;

use tempfile::TempDir;

use crate::harness::{Disk, Harness, Mode};
use crate::model::{first_difference, Model, PAGE};
use crate::qemu::Qemu;

/// A fresh temporary directory for one case.
///
/// # Panics
/// If none can be made.
pub fn scratch() -> TempDir {
    tempfile::Builder::new()
        .prefix("qcow2-conformance-")
        .tempdir()
        .expect("a temporary directory")
}

/// Largest disk read whole by [`matches_model`]; bigger ones are sampled.
const READ_ALL_LIMIT: u64 = 64 << 20;

fn compare_range<D: Disk>(
    disk: &mut D,
    model: &Model,
    offset: u64,
    len: u64,
) -> Result<(), String> {
    let mut got = vec![0u8; len as usize];
    let mut want = vec![0u8; len as usize];
    disk.read_at(&mut got, offset)
        .map_err(|e| format!("read of {offset:#x}+{len:#x} failed: {e}"))?;
    model.read(offset, &mut want);
    match first_difference(&got, &want, offset) {
        Some(d) => Err(format!("read of {offset:#x}+{len:#x}: {d}")),
        None => Ok(()),
    }
}

/// Reads the disk through `disk` and compares it with `model`: every byte of small disks;
/// for large ones every page the model touched, its neighbours, and a spread of probes.
pub fn matches_model<D: Disk>(disk: &mut D, model: &Model) -> Result<(), String> {
    if disk.len() != model.len() {
        return Err(format!(
            "virtual size is {:#x}, the model's is {:#x}",
            disk.len(),
            model.len()
        ));
    }
    let size = model.len();
    if size <= READ_ALL_LIMIT {
        let mut at = 0;
        while at < size {
            let n = (size - at).min(1 << 20);
            compare_range(disk, model, at, n)?;
            at += n;
        }
        return Ok(());
    }
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (start, _) in model.touched() {
        for s in [start.saturating_sub(PAGE), start, start + PAGE] {
            if s < size {
                ranges.push((s, PAGE.min(size - s)));
            }
        }
    }
    for i in 0..64 {
        let s = (size / 64 * i) / 512 * 512;
        ranges.push((s, 4096.min(size - s)));
    }
    ranges.push((size - 4096.min(size), 4096.min(size)));
    ranges.sort_unstable();
    ranges.dedup();
    for (s, n) in ranges {
        compare_range(disk, model, s, n)?;
    }
    Ok(())
}

/// Opens `path` read-only through `h` and asserts our `check` finds no corruption, no leak
/// and no check error.
pub fn our_check_clean<H: Harness>(h: &H, path: &Path) -> Result<(), String> {
    let mut disk = h
        .open(path, Mode::read_only())
        .map_err(|e| format!("reopen for check: {e}"))?;
    let report = disk.check(None).map_err(|e| format!("check: {e}"))?;
    disk.close()
        .map_err(|e| format!("close after check: {e}"))?;
    if report.corruptions != 0 || report.leaks != 0 || report.check_errors != 0 {
        return Err(format!("our check is not clean: {report:?}"));
    }
    Ok(())
}

/// Asserts `qemu-img check` is clean and `qemu-img compare` finds the image equal to the
/// model (written as a raw file into `dir`).
pub fn qemu_agrees(q: &Qemu, path: &Path, model: &Model, dir: &Path) -> Result<(), String> {
    let c = q.check(path);
    if !c.is_clean() {
        return Err(format!("qemu-img check is not clean: {}", c.json));
    }
    let raw = dir.join("model.raw");
    model
        .write_raw(&raw)
        .map_err(|e| format!("writing the model: {e}"))?;
    let r = q
        .same_as_raw(path, &raw)
        .map_err(|e| format!("qemu-img compare: image differs from the model: {e}"));
    let _ = std::fs::remove_file(&raw);
    r
}
