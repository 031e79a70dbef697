//! `snapshot`: an image's internal snapshots. `-l` (the default) lists them as qemu-img
//! does; creating, applying and deleting them are not supported yet and fail clearly,
//! changing nothing. (Their contents are read with `convert -l`.)

use serde_json::Value;

use crate::cmd::info::{snapshot_json, snapshot_table};
use crate::cmd::usage;
use crate::disk::{resolve_format, Disk, DiskOptions, Format};
use crate::error::{CliError, CmdResult};
use crate::SnapshotArgs;

/// Runs `snapshot`.
pub fn run(a: &SnapshotArgs) -> CmdResult {
    let actions = usize::from(a.list)
        + usize::from(a.create.is_some())
        + usize::from(a.apply.is_some())
        + usize::from(a.delete.is_some());
    if actions > 1 {
        return Err(usage("snapshot", "Cannot mix '-l', '-a', '-c', '-d'"));
    }
    let [path] = a.filenames.as_slice() else {
        return Err(usage("snapshot", "Expecting one image file name"));
    };
    if a.create.is_some() || a.apply.is_some() || a.delete.is_some() {
        return Err(CliError::new(
            "Creating, applying and deleting internal snapshots is not supported yet",
        ));
    }
    let (format, _) = resolve_format(path, a.format.as_deref(), false)?;
    if format != Format::Qcow2 {
        // (A raw file has no snapshots: qemu-img lists none.)
        return Ok(0);
    }
    let opts = DiskOptions {
        read_only: true,
        force_share: a.force_share,
        ..DiskOptions::default()
    };
    let mut disk = Disk::open_with(path, format, opts, false, true)?;
    let snaps: Vec<Value> = disk
        .qcow2()
        .map(|img| img.info().snapshots.iter().map(snapshot_json).collect())
        .unwrap_or_default();
    if !snaps.is_empty() {
        print!("{}", snapshot_table(&snaps));
    }
    Ok(0)
}
