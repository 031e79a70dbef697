//! `commit`: write what an image changes into a file of its backing chain, as qemu-img's
//! `img_commit` (a commit block job) does: every range allocated above that file — in the
//! image or in a file between — is written into it as the image shows it (zeroes as
//! write-zeroes), the file grows to the image's size if it is shorter, and then the image is
//! emptied (unless `-d`, or `-b`, which implies it) so that it shows the file again.

use std::path::Path;

use qcow2_sync::{Allocation, BackingPolicy, BlockStatus, Cache, Image, OpenOptions};

use crate::cmd::{parse_cache, parse_size_arg, refuse_qemu_objects, usage};
use crate::disk::{
    engine_error, find_backing_layer, layer_format, qcow2_open_error, resolve_format, Disk,
    DiskOptions, Format,
};
use crate::error::{CliError, CmdResult};
use crate::progress::Progress;
use crate::CommitArgs;

/// Bytes copied per read.
const CHUNK: u64 = 2 << 20;

/// Runs `commit`.
pub fn run(a: &CommitArgs) -> CmdResult {
    if let Some(r) = a.rate_limit.as_deref() {
        parse_size_arg(r, "rate limit")?;
    }
    let [file] = a.files.as_slice() else {
        return Err(usage("commit", "Expecting one image file name"));
    };
    if a.rate_limit.is_some() {
        return Err(CliError::new(
            "Rate limits (-r) are not supported yet (commit runs at full speed)",
        ));
    }
    refuse_qemu_objects(&a.object, a.image_opts)?;
    let cache = parse_cache(a.cache.as_deref(), Cache::WriteBack)?;
    let (format, protect) = resolve_format(file, a.format.as_deref(), true)?;
    let img = match format {
        Format::Qcow2 => {
            // The chain is opened sharing writes: the file committed into is opened again,
            // writable, below.
            let o = OpenOptions {
                cache,
                force_share: true,
                backing: BackingPolicy::Follow,
                ..OpenOptions::default()
            };
            Some(Image::open(file, &o).map_err(|e| qcow2_open_error(file, &e))?)
        }
        Format::Raw => {
            let opts = DiskOptions {
                cache,
                ..DiskOptions::default()
            };
            // A raw file has no backing file; it is opened (and locked) all the same, as
            // qemu does before it says so.
            Disk::open(file, Format::Raw, opts, protect)?;
            None
        }
    };
    let mut progress = Progress::new(a.progress && !a.quiet, 1.0);
    progress.set(0.0);
    let result = match img {
        Some(img) => commit(a, file, img, cache, &mut progress),
        None => Err(CliError::new("Image does not have a backing file")),
    };
    progress.end();
    result?;
    if !a.quiet {
        println!("Image committed.");
    }
    Ok(0)
}

/// What to do with an extent of the image.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Kind {
    /// Not allocated above the base: the base already shows it.
    Skip,
    /// Reads as zero in the image.
    Zero,
    /// Data to copy.
    Data,
}

/// Classifies an extent as qemu's `bdrv_is_allocated_above(image, base)` and the commit
/// job's block status do: allocated in a layer above the base (`depth < base`), or past the
/// end of a shorter file between (which reads as zero, "allocated" there).
fn classify(st: &BlockStatus, base: u32) -> Kind {
    match st.allocation {
        // Past the end of the file at `depth + 1`: between only if above the base.
        _ if !st.allocation.is_allocated() && st.depth + 1 < base => Kind::Zero,
        _ if !st.allocation.is_allocated() => Kind::Skip,
        _ if st.depth >= base => Kind::Skip,
        Allocation::Zero { .. } => Kind::Zero,
        _ => Kind::Data,
    }
}

/// The extent at `offset` (at most `max` bytes) and what to do with it.
fn extent(img: &mut Image, offset: u64, max: u64, base: u32) -> Result<(u64, Kind), CliError> {
    let st = img
        .block_status(offset, max)
        .map_err(|e| CliError::new(format!("Block job failed: {}", engine_error(&e))))?;
    Ok((st.len.clamp(1, max), classify(&st, base)))
}

fn commit(
    a: &CommitArgs,
    file: &Path,
    mut img: Image,
    cache: Cache,
    progress: &mut Progress,
) -> Result<(), CliError> {
    let depth = match a.base.as_deref() {
        Some(name) => find_backing_layer(&img, file, name).ok_or_else(|| {
            CliError::new(format!(
                "Did not find '{name}' in the backing chain of '{}'",
                file.display()
            ))
        })?,
        None if img.backing_paths().is_empty() => {
            return Err(CliError::new("Image does not have a backing file"))
        }
        None => 1,
    };
    // `-b` implies `-d`: the image is emptied only after a commit into its backing file.
    let drop = a.drop || a.base.is_some();
    let base_path = img.backing_paths()[depth as usize - 1].to_path_buf();
    let base_format = layer_format(&img, depth)?;
    let opts = DiskOptions {
        cache,
        ..DiskOptions::default()
    };
    let mut base = Disk::open(&base_path, base_format, opts, false)?;
    let failed = |e: String| CliError::new(format!("Block job failed: {e}"));
    let size = img.len();
    if base.len() < size {
        base.resize(size).map_err(failed)?;
    }
    // Progress counts the bytes to write, as the job's does.
    let (mut total, mut offset) = (0, 0);
    while offset < size {
        let (len, kind) = extent(&mut img, offset, size - offset, depth)?;
        if kind != Kind::Skip {
            total += len;
        }
        offset += len;
    }
    let mut buf = vec![0u8; CHUNK as usize];
    let (mut done, mut offset) = (0, 0);
    while offset < size {
        let (len, kind) = extent(&mut img, offset, size - offset, depth)?;
        let len = match kind {
            Kind::Skip => len,
            Kind::Zero => {
                base.write_zeroes(offset, len, true).map_err(failed)?;
                len
            }
            Kind::Data => {
                let n = len.min(CHUNK);
                let chunk = &mut buf[..n as usize];
                img.read_at(chunk, offset)
                    .map_err(|e| failed(engine_error(&e)))?;
                base.write_at(chunk, offset).map_err(failed)?;
                n
            }
        };
        if kind != Kind::Skip {
            done += len;
            progress.set((done as f64 * 100.0 / total as f64) as f32);
        }
        offset += len;
    }
    base.close().map_err(failed)?;
    progress.set(100.0);
    if !drop {
        img.make_empty()
            .map_err(|e| CliError::new(engine_error(&e)))?;
    }
    img.close().map_err(|e| {
        CliError::new(format!(
            "Error while closing the image: {}",
            engine_error(&e)
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::{classify, Kind};
    use qcow2_sync::{Allocation, BlockStatus};

    fn st(allocation: Allocation, depth: u32) -> BlockStatus {
        BlockStatus {
            offset: 0,
            len: 512,
            allocation,
            depth,
        }
    }

    #[test]
    fn extents_above_the_base_are_committed() {
        let data = Allocation::Data { host: 0 };
        let zero = Allocation::Zero { host: None };
        let none = Allocation::Unallocated;
        assert_eq!(classify(&st(data, 0), 1), Kind::Data);
        assert_eq!(classify(&st(zero, 0), 1), Kind::Zero);
        assert_eq!(classify(&st(data, 1), 1), Kind::Skip);
        assert_eq!(classify(&st(data, 1), 2), Kind::Data);
        assert_eq!(classify(&st(Allocation::Compressed, 1), 2), Kind::Data);
        // Past the end of the base (it grows; reads as zero) / of a file between.
        assert_eq!(classify(&st(none, 0), 1), Kind::Skip);
        assert_eq!(classify(&st(none, 0), 2), Kind::Zero);
        assert_eq!(classify(&st(none, 1), 2), Kind::Skip);
        assert_eq!(classify(&st(none, 2), 2), Kind::Skip);
    }
}
