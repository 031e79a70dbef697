//! Facts about the host file: allocated size, and where its data and holes are
//! (`lseek(SEEK_DATA/SEEK_HOLE)`), the way qemu's `file` driver reports them.

use std::fs::File;
use std::os::unix::fs::MetadataExt;

use rustix::fs::SeekFrom;

/// Bytes the file occupies on disk (`st_blocks * 512`), qemu's `actual-size`.
pub fn allocated_bytes(file: &File) -> std::io::Result<u64> {
    Ok(file.metadata()?.blocks() * 512)
}

/// One extent of the host file as `lseek` sees it.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct HostExtent {
    /// Length in bytes from the asked offset.
    pub len: u64,
    /// Whether the range is a hole (reads as zero).
    pub hole: bool,
    /// Whether the extent reaches the end of the file.
    pub eof: bool,
}

/// The extent of `file` (of length `file_len`) starting at `offset`, at most `max` bytes;
/// `None` when the file system cannot tell (then everything counts as data).
pub fn extent_at(file: &File, file_len: u64, offset: u64, max: u64) -> Option<HostExtent> {
    if offset >= file_len {
        return Some(HostExtent {
            len: max,
            hole: true,
            eof: true,
        });
    }
    let limit = max.min(file_len - offset);
    let (len, hole, trailing) = match rustix::fs::seek(file, SeekFrom::Data(offset)) {
        Ok(data) if data == offset => {
            let end = rustix::fs::seek(file, SeekFrom::Hole(offset)).ok()?;
            (end - offset, false, false)
        }
        Ok(data) => (data - offset, true, false),
        Err(rustix::io::Errno::NXIO) => (limit, true, true),
        Err(_) => return None,
    };
    let len = len.min(limit).max(1);
    Some(HostExtent {
        len,
        hole,
        eof: trailing || offset + len >= file_len,
    })
}
