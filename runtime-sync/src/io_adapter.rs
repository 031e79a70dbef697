//! `Read + Write + Seek` over the guest disk of an [`Image`].

use std::io::{self, Read, Seek, SeekFrom, Write};

use crate::{Error, HostFile, Image};

/// A cursor over the guest disk. Reads stop at the end of the disk; writes past it fail.
///
/// ```
/// use std::io::{Read, Seek, SeekFrom, Write};
/// use qcow2_sync::{CreateOptions, Image, OpenOptions};
///
/// let dir = tempfile::tempdir()?;
/// let mut img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20), &OpenOptions::default())?;
/// let mut io = img.io();
/// io.seek(SeekFrom::Start(4000))?;
/// io.write_all(b"across a sector boundary")?;
/// io.flush()?;
/// io.seek(SeekFrom::Current(-24))?;
/// let mut back = [0u8; 24];
/// io.read_exact(&mut back)?;
/// assert_eq!(&back, b"across a sector boundary");
/// // Reading stops at the end of the disk.
/// io.seek(SeekFrom::End(-10))?;
/// let mut tail = Vec::new();
/// assert_eq!(io.read_to_end(&mut tail)?, 10);
/// assert!(io.write_all(b"past the end").is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct ImageIo<'a, F: HostFile> {
    image: &'a mut Image<F>,
    pos: u64,
}

impl<'a, F: HostFile> ImageIo<'a, F> {
    pub(crate) fn new(image: &'a mut Image<F>) -> Self {
        Self { image, pos: 0 }
    }
}

fn to_io(e: Error) -> io::Error {
    io::Error::other(e)
}

impl<F: HostFile> Read for ImageIo<'_, F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.image.len().saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        self.image.read_at(&mut buf[..n], self.pos).map_err(to_io)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<F: HostFile> Write for ImageIo<'_, F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.image.write_at(buf, self.pos).map_err(to_io)?;
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.image.flush().map_err(to_io)
    }
}

impl<F: HostFile> Seek for ImageIo<'_, F> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.image.len().checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = new.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the disk",
            )
        })?;
        Ok(self.pos)
    }
}
