//! `bitmap`: persistent dirty bitmaps. `--dump NAME` prints a bitmap's dirty ranges (what
//! a backup tool otherwise reads through qemu-nbd's dirty-bitmap export), human or
//! `--output=json` as `[{"start":..,"length":..}, ...]`. qemu-img's editing actions
//! (`--add`, `--remove`, `--clear`, `--enable`, `--disable`, `--merge`) are not supported
//! yet and fail clearly, changing nothing.

use std::path::Path;

use serde_json::json;

use crate::disk::{qcow2_open_error, resolve_format, Format};
use crate::error::{CliError, CmdResult};
use crate::{BitmapArgs, OutputFormat};

/// Runs `bitmap`.
pub fn run(a: &BitmapArgs) -> CmdResult {
    let edits = a.add || a.remove || a.clear || a.enable || a.disable || a.merge.is_some();
    if !edits && !a.dump {
        return Err(CliError::new(
            "Need at least one of --add, --remove, --clear, --enable, --disable, --merge or --dump",
        ));
    }
    let [file, name] = a.args.as_slice() else {
        return Err(crate::cmd::usage(
            "bitmap",
            "Expecting filename and bitmap name",
        ));
    };
    if edits {
        return Err(CliError::new(
            "Changing persistent bitmaps (--add, --remove, --clear, --enable, --disable, --merge) is not supported yet",
        ));
    }
    let path = Path::new(file);
    let (format, _) = resolve_format(path, a.format.as_deref(), false)?;
    if format != Format::Qcow2 {
        return Err(CliError::new(format!("Dirty bitmap '{name}' not found")));
    }
    let options = qcow2_sync::OpenOptions {
        read_only: true,
        force_share: a.force_share,
        ..qcow2_sync::OpenOptions::default()
    };
    let mut img =
        qcow2_sync::Image::open(path, &options).map_err(|e| qcow2_open_error(path, &e))?;
    let data = img.read_bitmap(name).map_err(|e| match e {
        qcow2_sync::Error::Request(qcow2_sync::RequestError::BitmapNotFound) => {
            CliError::new(format!("Dirty bitmap '{name}' not found"))
        }
        e => CliError::new(format!(
            "Could not read bitmap '{name}': {}",
            crate::disk::engine_error(&e)
        )),
    })?;
    let ranges = data.dirty_ranges();
    match a.output {
        OutputFormat::Json => {
            let list: Vec<_> = ranges
                .iter()
                .map(|&(start, length)| json!({ "start": start, "length": length }))
                .collect();
            println!("{}", serde_json::Value::Array(list));
        }
        OutputFormat::Human => {
            println!("{:<16}Length", "Offset");
            for (start, length) in ranges {
                println!("{start:<#16x}{length:#x}");
            }
        }
    }
    Ok(0)
}
