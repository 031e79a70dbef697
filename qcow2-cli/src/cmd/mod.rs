//! One module per command, and the option parsing they share.

pub mod amend;
pub mod bench;
pub mod bitmap;
pub mod check;
pub mod commit;
pub mod compare;
pub mod convert;
pub mod create;
pub mod info;
pub mod io;
pub mod map;
pub mod measure;
pub mod rebase;
pub mod resize;
pub mod snapshot;

use qcow2_sync::Cache;

use crate::error::CliError;
use crate::size::parse_size;

/// Parses a `-t`/`-T` cache mode (default `default`).
pub fn parse_cache(mode: Option<&str>, default: Cache) -> Result<Cache, CliError> {
    match mode {
        None => Ok(default),
        Some(m) => {
            Cache::parse(m).ok_or_else(|| CliError::new(format!("Invalid cache option: {m}")))
        }
    }
}

/// Parses a size option, naming the option in the error.
pub fn parse_size_arg(value: &str, what: &str) -> Result<u64, CliError> {
    parse_size(value).map_err(|_| CliError::new(format!("Invalid {what} specified: '{value}'.")))
}

/// A command-line usage error, with qemu-img's pointer to the command's help.
pub fn usage(command: &str, message: &str) -> CliError {
    CliError::new(format!(
        "{message}\nTry 'qcow2 {command} --help' for more info"
    ))
}

/// Refuses qemu's `--object` and `--image-opts`, which this tool does not implement.
pub fn refuse_qemu_objects(objects: &[String], image_opts: bool) -> Result<(), CliError> {
    if !objects.is_empty() {
        return Err(CliError::new(
            "--object is not supported yet (encryption is not implemented)",
        ));
    }
    if image_opts {
        return Err(CliError::new(
            "--image-opts is not supported yet (give the image's file name)",
        ));
    }
    Ok(())
}
