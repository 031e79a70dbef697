//! `rebase`: give an image another backing file (or none) without changing what the guest
//! sees, as qemu-img's `img_rebase` does. Safe mode compares, for every range the image does
//! not allocate itself, the old backing chain with the new backing file and copies the old
//! contents into the image where they differ; `-u` only rewrites the name in the header.

use std::path::Path;

use qcow2_sync::{Allocation, BackingPolicy, BlockStatus, Cache, Image, OpenOptions};

use crate::cmd::{parse_cache, refuse_qemu_objects, usage};
use crate::disk::{
    backing_path, engine_error, find_backing_layer, l2_slice_end, layer_format, open_backing,
    qcow2_open_error, resolve_format, Disk, DiskOptions, Format,
};
use crate::error::{CliError, CmdResult};
use crate::progress::Progress;
use crate::RebaseArgs;

/// qemu-img's buffer: the most compared (and written) per step.
const CHUNK: u64 = 2 << 20;

/// The format names qemu-img 10 knows (`qemu-img --help`); `-F` accepts them, as qemu does
/// for `-u`, though only qcow2 and raw backing files can be opened here.
const QEMU_FORMATS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "iscsi",
    "iser",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "snapshot-access",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

/// Runs `rebase`.
pub fn run(a: &RebaseArgs) -> CmdResult {
    let [file] = a.files.as_slice() else {
        return Err(usage("rebase", "Expecting one image file name"));
    };
    if !a.unsafe_rebase && a.backing.is_none() {
        return Err(usage(
            "rebase",
            "Must specify backing file (-b) or use unsafe mode (-u)",
        ));
    }
    refuse_qemu_objects(&a.object, a.image_opts)?;
    let mut progress = Progress::new(a.progress && !a.quiet, 2.0);
    progress.set(0.0);
    let result = rebase(a, file, &mut progress);
    progress.end();
    result.map(|()| 0)
}

/// The image being rebased. A raw file has no backing file to change; it is opened (and
/// locked) all the same, as qemu does before it refuses.
enum Target {
    Qcow2(Box<Image>),
    Raw(Disk),
}

fn rebase(a: &RebaseArgs, file: &Path, progress: &mut Progress) -> Result<(), CliError> {
    let cache = parse_cache(a.cache.as_deref(), Cache::WriteBack)?;
    let src_cache = parse_cache(a.backing_cache.as_deref(), Cache::WriteBack).map_err(|_| {
        CliError::new(format!(
            "Invalid source cache option: {}",
            a.backing_cache.as_deref().unwrap_or_default()
        ))
    })?;
    let (format, protect) = resolve_format(file, a.format.as_deref(), true)?;
    let mut target = match format {
        Format::Qcow2 => {
            // Unsafe mode ignores the old backing file: it may be gone (that is what `-u`
            // is for: correcting the name of a moved file).
            let o = OpenOptions {
                cache,
                backing: if a.unsafe_rebase {
                    BackingPolicy::Skip
                } else {
                    BackingPolicy::Follow
                },
                ..OpenOptions::default()
            };
            let img = Image::open(file, &o).map_err(|e| qcow2_open_error(file, &e))?;
            Target::Qcow2(Box::new(img))
        }
        Format::Raw => {
            let opts = DiskOptions {
                cache,
                ..DiskOptions::default()
            };
            Target::Raw(Disk::open(file, Format::Raw, opts, protect)?)
        }
    };
    if a.compress {
        return Err(CliError::new(
            "Compressed writes (-c) are not supported yet",
        ));
    }
    if let Some(f) = a.backing_format.as_deref() {
        if !QEMU_FORMATS.contains(&f) {
            return Err(CliError::new(format!("Invalid format name: '{f}'")));
        }
    }
    if !a.unsafe_rebase {
        let opts = DiskOptions {
            read_only: true,
            cache: src_cache,
            force_share: a.force_share,
        };
        let new = open_new_backing(a, file, &target, opts)?;
        if let Target::Qcow2(img) = &mut target {
            copy_differences(img, new, src_cache, progress)?;
        }
    }
    let changed = change_backing(a, &mut target);
    progress.set(100.0);
    changed?;
    match target {
        Target::Qcow2(img) => img.close().map_err(|e| CliError::new(engine_error(&e))),
        Target::Raw(disk) => disk.close().map_err(CliError::new),
    }
}

/// The new backing file, opened read-only (`None` for `-b ""`), and its depth in the old
/// chain when it is a file of it (qemu's `prefix_chain_bs`).
struct NewBacking {
    disk: Option<Disk>,
    in_old_chain: Option<u32>,
}

fn open_new_backing(
    a: &RebaseArgs,
    file: &Path,
    target: &Target,
    opts: DiskOptions,
) -> Result<NewBacking, CliError> {
    let name = a.backing.as_deref().unwrap_or_default();
    if name.is_empty() {
        return Ok(NewBacking {
            disk: None,
            in_old_chain: None,
        });
    }
    let path = backing_path(file, name);
    let in_old_chain = match target {
        Target::Qcow2(img) => find_backing_layer(img, file, &path.display().to_string()),
        Target::Raw(_) => None,
    };
    let format = match a.backing_format.as_deref() {
        None => None,
        Some(f) => Some(Format::parse(f).map_err(|_| {
            CliError::new(format!(
                "Could not open new backing file '{name}': backing files of format '{f}' are not supported (only qcow2 and raw)"
            ))
        })?),
    };
    let disk = open_backing(&path, format, opts, false)
        .map_err(|m| CliError::new(format!("Could not open new backing file '{name}': {m}")))?;
    Ok(NewBacking {
        disk: Some(disk),
        in_old_chain,
    })
}

/// Writes the header, with qemu's messages for what it refuses.
fn change_backing(a: &RebaseArgs, target: &mut Target) -> Result<(), CliError> {
    let shown = a.backing.as_deref().unwrap_or("(null)");
    let fail = |why: &str| {
        CliError::new(format!(
            "Could not change the backing file to '{shown}': {why}"
        ))
    };
    let (name, format) = match a.backing.as_deref() {
        Some(b) if !b.is_empty() => (Some(b), a.backing_format.as_deref()),
        _ => (None, None),
    };
    if name.is_some() && format.is_none() {
        return Err(fail("backing format must be specified"));
    }
    match target {
        Target::Raw(_) => Err(fail("Operation not supported")),
        Target::Qcow2(img) => img.set_backing(name, format).map_err(|e| match e {
            qcow2_sync::Error::Request(qcow2_sync::RequestError::Options(_)) => {
                fail("Invalid argument")
            }
            e => fail(&engine_error(&e)),
        }),
    }
}

/// Whether a status describes a range the image itself allocates (data or zeroes).
fn allocated_here(st: &BlockStatus) -> bool {
    st.depth == 0 && st.allocation.is_allocated()
}

/// How far a range of one kind reaches from `offset` (at most `max` bytes): the image's
/// extents merged while `kind` says the same of them. Returns what it says of the first.
fn run_of(
    img: &mut Image,
    offset: u64,
    max: u64,
    kind: impl Fn(&BlockStatus) -> bool,
) -> Result<(bool, u64), CliError> {
    let meta = |e: qcow2_sync::Error| {
        CliError::new(format!(
            "error while reading image metadata: {}",
            engine_error(&e)
        ))
    };
    let first = img.block_status(offset, max).map_err(meta)?;
    let is = kind(&first);
    let mut len = first.len.min(max);
    while len < max {
        let st = img.block_status(offset + len, max - len).map_err(meta)?;
        if kind(&st) != is {
            break;
        }
        len += st.len.min(max - len);
    }
    Ok((is, len))
}

/// The safe part: for every range the image does not allocate, what the old chain shows is
/// compared with the new backing file (both read as zero past their ends), and written into
/// the image where they differ, a cluster at a time as qemu-img does (zeroes where the old
/// chain has ended).
fn copy_differences(
    img: &mut Image,
    new: NewBacking,
    src_cache: Cache,
    progress: &mut Progress,
) -> Result<(), CliError> {
    let mut old = match img.info().backing_file.is_some() {
        true => {
            let path = img.backing_paths()[0].to_path_buf();
            let format = layer_format(img, 1)?;
            let opts = DiskOptions {
                read_only: true,
                cache: src_cache,
                force_share: true,
            };
            Some(open_backing(&path, Some(format), opts, false).map_err(|m| {
                CliError::new(format!(
                    "Could not reuse old backing file '{}': {m}",
                    path.display()
                ))
            })?)
        }
        false => None,
    };
    let NewBacking {
        disk: mut new,
        in_old_chain,
    } = new;
    let size = img.len();
    let cluster = img.info().cluster_size.max(1);
    let old_size = old.as_ref().map_or(0, Disk::len);
    let new_size = new.as_ref().map_or(0, Disk::len);
    let step = if size == 0 {
        0.0
    } else {
        100.0 / (size / size.min(CHUNK)) as f32
    };
    // (A step grows to whole clusters at both ends.)
    let buf_len = (CHUNK + 2 * cluster) as usize;
    let mut buf_old = vec![0u8; buf_len];
    let mut buf_new = vec![0u8; buf_len];
    let mut offset = 0;
    while offset < size {
        let mut n = CHUNK.min(size - offset);
        let limit = n.min(l2_slice_end(offset, cluster) - offset);
        let (allocated, len) = run_of(img, offset, limit, allocated_here)?;
        n = len;
        if allocated {
            offset += n;
            continue;
        }
        match in_old_chain {
            // Onto the old backing file itself: nothing can differ.
            Some(1) => {
                offset += n;
                continue;
            }
            // Onto a file below it in its chain: only what the files between them change
            // can differ (past the end of the old backing file, everything is compared).
            Some(prefix) if offset < old_size => {
                let above = |st: &BlockStatus| match st.allocation {
                    Allocation::Unallocated | Allocation::Reserved { .. } => {
                        (1..prefix - 1).contains(&st.depth)
                    }
                    _ => (1..prefix).contains(&st.depth),
                };
                // (qemu asks the old backing file, which ends at its own size.)
                let (changed, len) = run_of(img, offset, n.min(old_size - offset), above)?;
                n = len;
                if !changed {
                    offset += n;
                    continue;
                }
            }
            _ => {}
        }
        // Whole clusters, so that the writes need no copy-on-write.
        let start = offset / cluster * cluster;
        let end = (offset + n).next_multiple_of(cluster).min(size);
        let span = (end - start) as usize;
        let read = |disk: &mut Option<Disk>, buf: &mut [u8], file_size: u64, what: &str| {
            // Both read as zero past their ends.
            let len = span.min(file_size.saturating_sub(start) as usize);
            buf[len..span].fill(0);
            match disk {
                Some(d) if len > 0 => d
                    .read_at(&mut buf[..len], start)
                    .map_err(|_| CliError::new(format!("error while reading from {what}"))),
                _ => Ok(()),
            }
        };
        read(&mut old, &mut buf_old, old_size, "old backing file")?;
        read(&mut new, &mut buf_new, new_size, "new backing file")?;
        let mut old_eof = start >= old_size;
        let mut done = 0;
        while done < span {
            let (differ, len) =
                compare_chunks(&buf_old[done..span], &buf_new[done..span], cluster as usize);
            let at = start + done as u64;
            if differ {
                let written = if old_eof {
                    img.write_zeroes(at, len as u64, false)
                } else {
                    img.write_at(&buf_old[done..done + len], at)
                };
                written.map_err(|e| {
                    CliError::new(format!(
                        "Error while writing to COW image: {}",
                        engine_error(&e)
                    ))
                })?;
            }
            done += len;
            if at + len as u64 >= old_size {
                old_eof = true;
            }
        }
        offset = end;
        progress.add(step);
    }
    Ok(())
}

/// qemu-img's `compare_buffers`: whether the first `chunk`-sized piece of `a` and `b`
/// differs, and how long the run of pieces with that same answer is.
fn compare_chunks(a: &[u8], b: &[u8], chunk: usize) -> (bool, usize) {
    let mut pieces = a.chunks(chunk).zip(b.chunks(chunk));
    let Some((x, y)) = pieces.next() else {
        return (false, 0);
    };
    let differ = x != y;
    let mut len = x.len();
    for (x, y) in pieces {
        if (x != y) != differ {
            break;
        }
        len += x.len();
    }
    (differ, len)
}

#[cfg(test)]
mod tests {
    use super::compare_chunks;
    use crate::disk::l2_slice_end;

    #[test]
    fn chunks_compare_in_runs() {
        let a = vec![0u8; 4096];
        let mut b = a.clone();
        b[1500] = 1;
        b[2100] = 1;
        assert_eq!(compare_chunks(&a, &b, 1024), (false, 1024));
        assert_eq!(compare_chunks(&a[1024..], &b[1024..], 1024), (true, 2048));
        assert_eq!(compare_chunks(&a[3072..], &b[3072..], 1024), (false, 1024));
        assert_eq!(compare_chunks(&a[..100], &b[..100], 1024), (false, 100));
    }

    #[test]
    fn l2_slices_like_qemu() {
        assert_eq!(l2_slice_end(0, 65536), 32 << 20);
        assert_eq!(l2_slice_end(5 << 20, 4096), 6 << 20);
        assert_eq!(l2_slice_end(100, 512), 32 << 10);
        assert_eq!(l2_slice_end(0, 2048), 512 << 10);
    }
}
