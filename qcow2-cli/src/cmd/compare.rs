//! `compare`: whether two images have the same guest contents (exit 0), differ (1, with
//! the first differing sector), or could not be compared (2 open, 3 block status, 4 read).
//! Images of different sizes compare equal when the longer one's extra part reads as zero.

use qcow2_sync::Cache;

use crate::cmd::parse_cache;
use crate::disk::{resolve_format, Disk, DiskOptions, Status};
use crate::error::{CliError, CmdResult};
use crate::progress::Progress;
use crate::CompareArgs;

/// qemu-img's comparison buffer.
const CHUNK: u64 = 2 << 20;
const SECTOR: usize = 512;

/// Exit status: content differs.
const DIFFERENT: i32 = 1;
/// Exit status: an image could not be opened.
const OPEN_FAILED: i32 = 2;
/// Exit status: block status failed.
const STATUS_FAILED: i32 = 3;
/// Exit status: reading failed.
const READ_FAILED: i32 = 4;

/// Index of the first 512-byte sector of `buf` that is not all zero, as a byte index.
fn first_nonzero_sector(buf: &[u8]) -> Option<usize> {
    buf.chunks(SECTOR)
        .position(|s| s.iter().any(|&b| b != 0))
        .map(|i| i * SECTOR)
}

/// Index of the first 512-byte sector where `a` and `b` differ, as a byte index.
fn first_different_sector(a: &[u8], b: &[u8]) -> Option<usize> {
    a.chunks(SECTOR)
        .zip(b.chunks(SECTOR))
        .position(|(x, y)| x != y)
        .map(|i| i * SECTOR)
}

struct Side {
    disk: Disk,
    name: String,
}

impl Side {
    fn status(&mut self, offset: u64, max: u64) -> Result<Status, CliError> {
        self.disk.status(offset, max).map_err(|e| {
            CliError::with_code(
                STATUS_FAILED,
                format!(
                    "Block status failed at offset {offset} of {}: {e}",
                    self.name
                ),
            )
        })
    }

    fn read(&mut self, buf: &mut [u8], offset: u64) -> Result<(), CliError> {
        self.disk.read_at(buf, offset).map_err(|e| {
            CliError::with_code(
                READ_FAILED,
                format!("Error while reading offset {offset} of {}: {e}", self.name),
            )
        })
    }

    /// qemu's `check_empty_sectors`: `Some(offset)` of the first non-zero sector.
    fn first_nonzero(&mut self, buf: &mut [u8], offset: u64) -> Result<Option<u64>, CliError> {
        self.read(buf, offset)?;
        Ok(first_nonzero_sector(buf).map(|i| offset + i as u64))
    }
}

/// Runs `compare`.
pub fn run(a: &CompareArgs) -> CmdResult {
    let cache = parse_cache(a.cache.as_deref(), Cache::WriteBack)?;
    let open = |path: &std::path::Path, fmt: Option<&str>| -> Result<Side, CliError> {
        let (format, _) = resolve_format(path, fmt, false)
            .map_err(|e| CliError::with_code(OPEN_FAILED, e.message))?;
        let disk = Disk::open(
            path,
            format,
            DiskOptions {
                force_share: a.force_share,
                read_only: true,
                cache,
            },
            false,
        )
        .map_err(|e| CliError::with_code(OPEN_FAILED, e.message))?;
        Ok(Side {
            disk,
            name: path.display().to_string(),
        })
    };
    let mut progress = Progress::new(a.progress && !a.quiet, 2.0);
    let result = (|| {
        let mut s1 = open(&a.a, a.format_a.as_deref())?;
        let mut s2 = open(&a.b, a.format_b.as_deref())?;
        progress.set(0.0);
        compare(&mut s1, &mut s2, a.strict, a.quiet, &mut progress)
    })();
    let code = match result {
        Ok(Outcome::Identical) => {
            if !a.quiet {
                println!("Images are identical.");
            }
            0
        }
        Ok(Outcome::Mismatch(msg)) => {
            if !a.quiet {
                println!("{msg}");
            }
            DIFFERENT
        }
        Err(e) => {
            progress.end();
            return Err(e);
        }
    };
    progress.end();
    Ok(code)
}

enum Outcome {
    /// Identical.
    Identical,
    /// The message naming the first difference.
    Mismatch(String),
}

fn mismatch(offset: u64) -> Outcome {
    Outcome::Mismatch(format!("Content mismatch at offset {offset}!"))
}

fn compare(
    s1: &mut Side,
    s2: &mut Side,
    strict: bool,
    quiet: bool,
    progress: &mut Progress,
) -> Result<Outcome, CliError> {
    let (size1, size2) = (s1.disk.len(), s2.disk.len());
    let total = size1.min(size2);
    let progress_base = size1.max(size2).max(1);
    if strict && size1 != size2 {
        return Ok(Outcome::Mismatch(
            "Strict mode: Image size mismatch!".into(),
        ));
    }
    let mut buf1 = vec![0u8; CHUNK as usize];
    let mut buf2 = vec![0u8; CHUNK as usize];
    let mut offset = 0;
    while offset < total {
        let st1 = s1.status(offset, total - offset)?;
        let st2 = s2.status(offset, total - offset)?;
        let mut chunk = st1.len.min(st2.len);
        if strict && (st1.present, st1.zero, st1.data) != (st2.present, st2.zero, st2.data) {
            return Ok(Outcome::Mismatch(format!(
                "Strict mode: Offset {offset} block status mismatch!"
            )));
        }
        if st1.zero && st2.zero {
            // Both read as zero.
        } else if st1.present == st2.present {
            if st1.present {
                chunk = chunk.min(CHUNK);
                let n = chunk as usize;
                s1.read(&mut buf1[..n], offset)?;
                s2.read(&mut buf2[..n], offset)?;
                if let Some(i) = first_different_sector(&buf1[..n], &buf2[..n]) {
                    return Ok(mismatch(offset + i as u64));
                }
            }
        } else {
            chunk = chunk.min(CHUNK);
            let n = chunk as usize;
            let side = if st1.present { &mut *s1 } else { &mut *s2 };
            if let Some(at) = side.first_nonzero(&mut buf1[..n], offset)? {
                return Ok(mismatch(at));
            }
        }
        offset += chunk;
        progress.add((chunk as f64 / progress_base as f64 * 100.0) as f32);
    }
    if size1 != size2 {
        if !quiet {
            println!("Warning: Image size mismatch!");
        }
        let over = if size1 > size2 { s1 } else { s2 };
        let end = size1.max(size2);
        let mut offset = total;
        while offset < end {
            let st = over.status(offset, end - offset)?;
            let mut chunk = st.len;
            if st.present && !st.zero {
                chunk = chunk.min(CHUNK);
                if let Some(at) = over.first_nonzero(&mut buf1[..chunk as usize], offset)? {
                    return Ok(mismatch(at));
                }
            }
            offset += chunk;
            progress.add((chunk as f64 / progress_base as f64 * 100.0) as f32);
        }
    }
    Ok(Outcome::Identical)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_are_reported_per_sector() {
        let a = vec![0u8; 4096];
        let mut b = a.clone();
        b[1500] = 1;
        assert_eq!(first_different_sector(&a, &b), Some(1024));
        assert_eq!(first_nonzero_sector(&b), Some(1024));
        assert_eq!(first_different_sector(&a, &a), None);
    }
}
