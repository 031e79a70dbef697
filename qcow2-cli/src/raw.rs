//! Raw image files: positional I/O on the file itself, with the same cache modes as the
//! qcow2 runtime (O_DIRECT for `none`/`directsync`, a sync after each write for
//! `writethrough`/`directsync`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use qcow2_sync::Cache;
use rustix::fs::FallocateFlags;

/// Alignment of O_DIRECT buffers, offsets and lengths.
pub const DIRECT_ALIGN: usize = 4096;

/// A heap buffer whose start is aligned for O_DIRECT (no unsafe: the aligned window is
/// found inside a slightly larger vector).
#[derive(Debug)]
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes starting on a 4 KiB boundary.
    pub fn new(len: usize) -> Self {
        let storage = vec![0u8; len + DIRECT_ALIGN];
        let misalign = storage.as_ptr() as usize % DIRECT_ALIGN;
        let start = (DIRECT_ALIGN - misalign) % DIRECT_ALIGN;
        Self {
            storage,
            start,
            len,
        }
    }

    /// The buffer.
    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// The buffer, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

fn is_direct(cache: Cache) -> bool {
    matches!(cache, Cache::None | Cache::DirectSync)
}

fn is_sync(cache: Cache) -> bool {
    matches!(cache, Cache::WriteThrough | Cache::DirectSync)
}

/// Opens `path` with the flags of `cache` (O_DIRECT for `none` and `directsync`).
pub fn open_file(path: &Path, write: bool, cache: Cache) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(write);
    if is_direct(cache) {
        o.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
    }
    o.open(path)
}

/// A raw image.
#[derive(Debug)]
pub struct RawDisk {
    file: File,
    /// A handle without O_DIRECT, for requests that are not aligned.
    buffered: Option<File>,
    file_len: u64,
    cache: Cache,
    read_only: bool,
    /// Refuse writes to the first sector (the format was probed, not given).
    protect_sector0: bool,
    syncs: u64,
}

fn aligned(offset: u64, len: usize, buf_ptr: usize) -> bool {
    offset % DIRECT_ALIGN as u64 == 0 && len % 512 == 0 && buf_ptr % DIRECT_ALIGN == 0
}

impl RawDisk {
    /// Opens the raw image at `path`.
    pub fn open(
        path: &Path,
        read_only: bool,
        cache: Cache,
        protect_sector0: bool,
    ) -> io::Result<Self> {
        let file = open_file(path, !read_only, cache)?;
        let buffered = if is_direct(cache) {
            Some(open_file(path, !read_only, Cache::WriteBack)?)
        } else {
            None
        };
        let file_len = file.metadata()?.len();
        Ok(Self {
            file,
            buffered,
            file_len,
            cache,
            read_only,
            protect_sector0,
            syncs: 0,
        })
    }

    /// The file (the one holding the image locks).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The virtual size: the file length rounded up to 512 bytes, as qemu reports it.
    pub fn len(&self) -> u64 {
        self.file_len.next_multiple_of(512)
    }

    /// The host file length.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// `fdatasync` calls issued so far.
    pub fn flush_count(&self) -> u64 {
        self.syncs
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.len()) {
            return Err(io::Error::from_raw_os_error(
                rustix::io::Errno::IO.raw_os_error(),
            ));
        }
        Ok(())
    }

    fn check_write(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(
                rustix::io::Errno::ACCESS.raw_os_error(),
            ));
        }
        if self.protect_sector0 && offset < 512 && len > 0 {
            return Err(io::Error::from_raw_os_error(
                rustix::io::Errno::PERM.raw_os_error(),
            ));
        }
        self.check_range(offset, len)
    }

    fn handle_for(&self, offset: u64, len: usize, ptr: usize) -> &File {
        match &self.buffered {
            Some(b) if !aligned(offset, len, ptr) => b,
            _ => &self.file,
        }
    }

    /// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as zero.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let file = self.handle_for(offset, buf.len(), buf.as_ptr() as usize);
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf[done..].fill(0);
        Ok(())
    }

    /// Writes `buf` at `offset` (inside the virtual size).
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_write(offset, buf.len() as u64)?;
        self.handle_for(offset, buf.len(), buf.as_ptr() as usize)
            .write_all_at(buf, offset)?;
        self.file_len = self.file_len.max(offset + buf.len() as u64);
        self.after_write()
    }

    fn after_write(&mut self) -> io::Result<()> {
        if is_sync(self.cache) {
            self.sync()?;
        }
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        self.syncs += 1;
        if self.cache != Cache::Unsafe {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Makes the range read as zero: punches a hole with `unmap`, else zeroes it in place.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.check_write(offset, len)?;
        let end = (offset + len).min(self.file_len);
        if end > offset {
            let flags = if unmap {
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
            } else {
                FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
            };
            if rustix::fs::fallocate(&self.file, flags, offset, end - offset).is_err() {
                let zeroes = vec![0u8; (end - offset).min(1 << 20) as usize];
                let file = self.buffered.as_ref().unwrap_or(&self.file);
                let mut pos = offset;
                while pos < end {
                    let n = (end - pos).min(zeroes.len() as u64) as usize;
                    file.write_all_at(&zeroes[..n], pos)?;
                    pos += n as u64;
                }
            }
        }
        self.after_write()
    }

    /// Discards the range (punches a hole).
    pub fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true)
    }

    /// Makes completed writes durable.
    pub fn flush(&mut self) -> io::Result<()> {
        self.sync()
    }

    /// Changes the file length.
    pub fn resize(&mut self, size: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(
                rustix::io::Errno::ACCESS.raw_os_error(),
            ));
        }
        self.file.set_len(size)?;
        self.file_len = size;
        Ok(())
    }
}
