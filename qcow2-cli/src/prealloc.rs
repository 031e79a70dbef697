//! qemu's heuristic for "this qcow2 image was created with `preallocation=metadata`".
//!
//! qemu asks the host file where its holes are inside data clusters only for such images
//! (`qcow2_detect_metadata_preallocation`): when at least `max(real * 10 / 9, real + 2)`
//! host clusters have a non-zero refcount, where `real` is the number of clusters the file
//! actually occupies on disk. `map` must apply the same test to report what qemu reports
//! (`"zero": true, "data": true` for preallocated, never written clusters).
//!
//! The refcounts are read straight from the host file with `qcow2_proto::format`'s
//! decoders; the engine's API has no refcount query (yet).

use std::fs::File;
use std::os::unix::fs::FileExt;

use qcow2_proto::format::header::Header;
use qcow2_proto::format::refcount;

use crate::host::allocated_bytes;

fn read_exact_at(file: &File, len: u64, offset: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(buf)
}

/// Whether the qcow2 image in `file` looks metadata-preallocated to qemu.
pub fn detect_metadata_preallocation(file: &File) -> std::io::Result<bool> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "unreadable qcow2 header");
    let head = read_exact_at(file, 4096, 0)?;
    let header = Header::decode(&head).ok_or_else(bad)?;
    if !(9..=21).contains(&header.cluster_bits) || header.refcount_order > 6 {
        return Err(bad());
    }
    let cs = header.cluster_size();
    let file_len = file.metadata()?.len();
    let real_clusters = allocated_bytes(file)? / cs;
    let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
    let end_cluster = file_len.div_ceil(cs);
    let reftable_len = (u64::from(header.refcount_table_clusters) * cs).min(8 << 20);
    let reftable = read_exact_at(file, reftable_len, header.refcount_table_offset)?;
    let per_block = (cs * 8) >> header.refcount_order;
    let mut count = 0u64;
    for (i, entry) in reftable.chunks_exact(8).enumerate() {
        let first = i as u64 * per_block;
        if first >= end_cluster || count >= threshold {
            break;
        }
        let block_offset =
            u64::from_be_bytes(entry.try_into().expect("8 bytes")) & refcount::REFTABLE_OFFSET_MASK;
        if block_offset == 0 {
            continue;
        }
        let block = read_exact_at(file, cs, block_offset)?;
        let n = per_block.min(end_cluster - first);
        for j in 0..n as usize {
            if refcount::get(&block, header.refcount_order, j) != 0 {
                count += 1;
                if count >= threshold {
                    break;
                }
            }
        }
    }
    Ok(count >= threshold)
}
