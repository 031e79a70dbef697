//! `resize`: change the virtual size (`SIZE`, `+SIZE` or `-SIZE`); shrinking needs
//! `--shrink`, as in qemu-img.

use crate::disk::{engine_error, resolve_format, Disk, DiskOptions};
use crate::error::{strerror, CliError, CmdResult};
use crate::size::parse_size;
use crate::ResizeArgs;

/// The new size for `spec` (absolute, or relative with a leading `+`/`-`), or qemu's error.
pub fn new_size(spec: &str, current: u64) -> Result<u64, CliError> {
    let (sign, digits) = match spec.as_bytes().first() {
        Some(b'+') => (1i128, &spec[1..]),
        Some(b'-') => (-1i128, &spec[1..]),
        _ => (0, spec),
    };
    let n = parse_size(digits).map_err(|_| {
        CliError::new(
            "Parameter 'size' expects a non-negative number below 2^64\n\
             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively.",
        )
    })?;
    let total = if sign == 0 {
        i128::from(n)
    } else {
        i128::from(current) + sign * i128::from(n)
    };
    if total <= 0 || total > i128::from(i64::MAX) {
        return Err(CliError::new("New image size must be positive"));
    }
    Ok(total as u64)
}

/// Runs `resize`.
pub fn run(a: &ResizeArgs) -> CmdResult {
    if a.preallocation.as_deref().is_some_and(|p| p != "off") {
        return Err(CliError::new(
            "Preallocation modes other than 'off' are not supported by resize yet",
        ));
    }
    let (format, protect) = resolve_format(&a.filename, a.format.as_deref(), true)?;
    let mut disk = Disk::open(&a.filename, format, DiskOptions::default(), protect)?;
    let current = disk.len();
    let size = new_size(&a.size, current)?;
    if size < current && !a.shrink {
        return Err(CliError::new(
            "Use the --shrink option to perform a shrink operation.\n\
             qcow2: warning: Shrinking an image will delete all data beyond the shrunken image's end. \
             Before performing such an operation, make sure there is no important data there.",
        ));
    }
    if let Some(img) = disk.qcow2() {
        if size % 512 != 0 {
            return Err(CliError::new("The new size must be a multiple of 512"));
        }
        img.resize(size, a.shrink)
            .map_err(|e| CliError::new(engine_error(&e)))?;
    } else if let Some(raw) = disk.raw() {
        raw.resize(size)
            .map_err(|e| CliError::new(format!("Error resizing image: {}", strerror(&e))))?;
    }
    disk.close().map_err(CliError::new)?;
    if !a.quiet {
        println!("Image resized.");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::new_size;

    #[test]
    fn relative_and_absolute_sizes() {
        assert_eq!(new_size("2M", 1 << 20).unwrap(), 2 << 20);
        assert_eq!(new_size("+1M", 1 << 20).unwrap(), 2 << 20);
        assert_eq!(new_size("-512k", 1 << 20).unwrap(), 512 << 10);
        assert!(new_size("-1M", 1 << 20).is_err());
        assert!(new_size("0", 1 << 20).is_err());
        assert!(new_size("1X", 1 << 20).is_err());
    }
}
