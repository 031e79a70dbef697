//! The host file an image lives in: positional I/O, durability and space management.
//!
//! [`HostFile`] is implemented for [`std::fs::File`]; tests implement it over memory
//! (the conformance suite's simulator keeps a *current* and a *durable* image).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use rustix::fs::FallocateFlags;

/// Positional file operations the runtime needs.
#[allow(clippy::len_without_is_empty)] // a file length, not a collection
pub trait HostFile {
    /// Reads at `offset` until `buf` is full or the end of the file; returns bytes read.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes completed writes durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// Current length.
    fn len(&self) -> io::Result<u64>;
    /// Sets the length.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Deallocates a range (keeps the size); it reads as zero afterwards.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes a range read as zero, allocated; may extend the file.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Allocates a range without changing its contents; may extend the file.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()>;
}

fn write_zero_buffers(f: &File, mut offset: u64, len: u64) -> io::Result<()> {
    let zeroes = vec![0u8; len.min(1 << 20) as usize];
    let end = offset + len;
    while offset < end {
        let n = (end - offset).min(zeroes.len() as u64) as usize;
        FileExt::write_all_at(f, &zeroes[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}

impl HostFile for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match FileExt::read_at(self, &mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(self, flags, offset, len) {
            Ok(()) => Ok(()),
            // No hole punching here: write zeroes instead (same contents, no space back).
            Err(rustix::io::Errno::OPNOTSUPP) => {
                let end = (offset + len).min(HostFile::len(self)?);
                if end > offset {
                    write_zero_buffers(self, offset, end - offset)?;
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        match rustix::fs::fallocate(self, FallocateFlags::ZERO_RANGE, offset, len) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::INVAL) => {
                write_zero_buffers(self, offset, len)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        match rustix::fs::fallocate(self, FallocateFlags::empty(), offset, len) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) => {
                if HostFile::len(self)? < offset + len {
                    File::set_len(self, offset + len)?;
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}
