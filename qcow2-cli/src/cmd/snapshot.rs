//! `snapshot`: an image's internal snapshots, as qemu-img handles them: `-l` (the default)
//! lists them, `-c NAME` creates one, `-a NAME` reverts the image to one (by ID, else by
//! name), `-d NAME` deletes one (by name, as qemu-img does). (Their contents are read with
//! `convert -l`.)

use serde_json::Value;

use crate::cmd::info::{snapshot_json, snapshot_table};
use crate::cmd::usage;
use qcow2_sync::{Image, OpenOptions, RequestError, SnapshotRef};

use crate::disk::{engine_error, qcow2_open_error, resolve_format, Disk, DiskOptions, Format};
use crate::error::{CliError, CmdResult};
use crate::SnapshotArgs;

/// Opens the qcow2 image at `path` writable, runs `f` on it and closes it; the error as
/// qemu-img words it after "Could not ... snapshot 'NAME': ".
fn change(
    path: &std::path::Path,
    format: Format,
    f: impl FnOnce(&mut Image) -> Result<(), qcow2_sync::Error>,
) -> Result<i32, String> {
    if format != Format::Qcow2 {
        return Err("Operation not supported".into());
    }
    let mut img = Image::open(path, &OpenOptions::default())
        .map_err(|e| qcow2_open_error(path, &e).message)?;
    let done = f(&mut img).map_err(|e| match e {
        qcow2_sync::Error::Request(RequestError::SnapshotNotFound) => "snapshot not found".into(),
        qcow2_sync::Error::Request(RequestError::RefcountOverflow) => "Invalid argument".into(),
        qcow2_sync::Error::Request(RequestError::Unsupported(_)) => {
            "Operation not supported".into()
        }
        e => engine_error(&e),
    });
    let closed = img.close().map_err(|e| engine_error(&e));
    done.and(closed).map(|()| 0)
}

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
    let (format, _) = resolve_format(path, a.format.as_deref(), false)?;
    if let Some(name) = a.create.as_deref() {
        return change(path, format, |img| img.snapshot_create(name))
            .map_err(|e| CliError::new(format!("Could not create snapshot '{name}': {e}")));
    }
    if let Some(name) = a.apply.as_deref() {
        let which = SnapshotRef::IdOrName(name.to_owned());
        return change(path, format, |img| img.snapshot_apply(&which)).map_err(|e| {
            // (qemu-img says a missing snapshot is a missing file.)
            let e = e.replace("snapshot not found", "No such file or directory");
            CliError::new(format!(
                "Could not apply snapshot '{name}': Failed to load snapshot: {e}"
            ))
        });
    }
    if let Some(name) = a.delete.as_deref() {
        // (qemu-img deletes by name only.)
        let which = SnapshotRef::Name(name.to_owned());
        return change(path, format, |img| img.snapshot_delete(&which))
            .map_err(|e| CliError::new(format!("Could not delete snapshot '{name}': {e}")));
    }
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
