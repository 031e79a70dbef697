//! Executes one op against the host file: the whole "runtime" part of this crate.
//!
//! Public so that other runtimes can run ops the same way (qcow2-smol runs each op on the
//! blocking pool; qcow2-uring falls back to it for ops io_uring cannot take as they are).

use qcow2_proto::{IoBuf, IoError, IoKind, IoOp, Segment};

use crate::file::HostFile;

/// The guest buffer of the request an op belongs to.
#[derive(Debug)]
pub enum Guest<'a> {
    /// The buffer a read fills.
    Read(&'a mut [u8]),
    /// The buffer a write takes its data from.
    Write(&'a [u8]),
    /// The op touches no guest memory.
    None,
}

const ALIGN: u64 = 4096;
static ZEROES: [u8; 65536] = [0; 65536];

/// Runs ops with positional I/O; keeps the bounce buffer O_DIRECT needs for unaligned guest
/// memory, and counts bounced bytes and syncs.
#[derive(Debug)]
pub struct Executor {
    direct: bool,
    ignore_flush: bool,
    bounce: IoBuf,
    /// Guest bytes copied through the bounce buffer.
    pub bounced: u64,
    /// `fdatasync` calls (counted even when `unsafe` cache ignores them).
    pub syncs: u64,
}

fn err(e: std::io::Error) -> IoError {
    IoError::from(&e)
}

fn guest_missing() -> IoError {
    IoError {
        kind: std::io::ErrorKind::InvalidInput,
        raw_os_error: None,
    }
}

impl Executor {
    /// An executor for files opened with `cache`.
    pub fn for_cache(cache: crate::Cache) -> Self {
        Self::new(cache.direct(), cache == crate::Cache::Unsafe)
    }

    /// An executor; `direct` when the file is opened `O_DIRECT`, `ignore_flush` to skip
    /// `fdatasync` (QEMU's `unsafe`).
    pub fn new(direct: bool, ignore_flush: bool) -> Self {
        Self {
            direct,
            ignore_flush,
            bounce: IoBuf::zeroed(0),
            bounced: 0,
            syncs: 0,
        }
    }

    /// Runs `op`; returns the bytes read (a read past the end of file fills zeroes and
    /// counts only the bytes read) or written.
    pub fn run<F: HostFile>(
        &mut self,
        file: &F,
        op: &mut IoOp,
        guest: &mut Guest<'_>,
    ) -> Result<usize, IoError> {
        let len = op.len();
        match op.kind {
            IoKind::Read => self.read(file, op, guest),
            IoKind::Write => self.write(file, op, guest).map(|()| len as usize),
            IoKind::Flush => {
                self.syncs += 1;
                if !self.ignore_flush {
                    file.sync_data().map_err(err)?;
                }
                Ok(0)
            }
            IoKind::SetLen => file.set_len(op.offset).map(|()| 0).map_err(err),
            IoKind::PunchHole { len } => file.punch_hole(op.offset, len).map(|()| 0).map_err(err),
            IoKind::WriteZeroes { len } => {
                file.write_zeroes(op.offset, len).map(|()| 0).map_err(err)
            }
            IoKind::Allocate { len } => file.allocate(op.offset, len).map(|()| 0).map_err(err),
            IoKind::Compress { .. } => {
                let input = match (op.segments.first(), guest) {
                    (Some(&Segment::Guest { start, len, .. }), Guest::Write(buf)) => {
                        &buf[start..start + len]
                    }
                    _ => return Err(guest_missing()),
                };
                qcow2_proto::compress_op(op, input)
            }
            IoKind::Decompress { .. } => {
                let out = match (op.segments.last(), guest) {
                    (Some(&Segment::Guest { start, len, .. }), Guest::Read(buf)) => {
                        Some(&mut buf[start..start + len])
                    }
                    (Some(Segment::Guest { .. }), _) => return Err(guest_missing()),
                    _ => None,
                };
                qcow2_proto::decompress_op(op, out)
            }
            IoKind::ZeroFill => {
                for seg in op.segments.iter_mut() {
                    match (seg, &mut *guest) {
                        (Segment::Guest { start, len, .. }, Guest::Read(buf)) => {
                            buf[*start..*start + *len].fill(0)
                        }
                        (Segment::Buf(b), _) => b.as_mut_slice().fill(0),
                        _ => return Err(guest_missing()),
                    }
                }
                Ok(len as usize)
            }
            _ => Err(IoError {
                kind: std::io::ErrorKind::Unsupported,
                raw_os_error: None,
            }),
        }
    }

    /// Whether the op can go to the kernel as it is under O_DIRECT: sector-aligned offset and
    /// lengths, page-aligned memory, no zero segments (those come from an unaligned static).
    pub fn direct_ok(op: &IoOp, guest: &Guest<'_>) -> bool {
        let addr_ok =
            |p: *const u8, len: usize| (p as usize) % ALIGN as usize == 0 && len % 512 == 0;
        op.offset % 512 == 0
            && op.segments.iter().all(|seg| match (seg, guest) {
                (Segment::Buf(b), _) => addr_ok(b.as_slice().as_ptr(), b.len()),
                (Segment::Guest { start, len, .. }, Guest::Read(buf)) => {
                    addr_ok(buf[*start..].as_ptr(), *len)
                }
                (Segment::Guest { start, len, .. }, Guest::Write(buf)) => {
                    addr_ok(buf[*start..].as_ptr(), *len)
                }
                _ => false,
            })
    }

    fn read<F: HostFile>(
        &mut self,
        file: &F,
        op: &mut IoOp,
        guest: &mut Guest<'_>,
    ) -> Result<usize, IoError> {
        if self.direct && !Self::direct_ok(op, guest) {
            let len = op.len();
            let start = op.offset / ALIGN * ALIGN;
            let end = (op.offset + len).div_ceil(ALIGN) * ALIGN;
            self.grow_bounce(end - start);
            let got = file
                .read_at(
                    &mut self.bounce.as_mut_slice()[..(end - start) as usize],
                    start,
                )
                .map_err(err)?;
            self.bounce.as_mut_slice()[got..(end - start) as usize].fill(0);
            self.bounced += len;
            let mut pos = (op.offset - start) as usize;
            for seg in op.segments.iter_mut() {
                let n = seg.len();
                let src = &self.bounce.as_slice()[pos..pos + n];
                copy_into(seg, guest, src)?;
                pos += n;
            }
            return Ok(got
                .saturating_sub((op.offset - start) as usize)
                .min(len as usize));
        }
        let mut pos = op.offset;
        let mut total = 0;
        for seg in op.segments.iter_mut() {
            let n = seg.len();
            let got = match (seg, &mut *guest) {
                (Segment::Guest { start, len, .. }, Guest::Read(buf)) => {
                    let dst = &mut buf[*start..*start + *len];
                    let got = file.read_at(dst, pos).map_err(err)?;
                    dst[got..].fill(0);
                    got
                }
                (Segment::Buf(b), _) => {
                    let dst = b.as_mut_slice();
                    let got = file.read_at(dst, pos).map_err(err)?;
                    dst[got..].fill(0);
                    got
                }
                (Segment::Zeroes(_), _) => n,
                _ => return Err(guest_missing()),
            };
            total += got;
            pos += n as u64;
        }
        Ok(total)
    }

    fn write<F: HostFile>(
        &mut self,
        file: &F,
        op: &mut IoOp,
        guest: &mut Guest<'_>,
    ) -> Result<(), IoError> {
        if self.direct && !Self::direct_ok(op, guest) {
            let len = op.len();
            let start = op.offset / 512 * 512;
            let end = (op.offset + len).div_ceil(512) * 512;
            let span = (end - start) as usize;
            self.grow_bounce(end - start);
            if start != op.offset || end != op.offset + len {
                // Read-modify-write of the partial edge sectors.
                let got = file
                    .read_at(&mut self.bounce.as_mut_slice()[..span], start)
                    .map_err(err)?;
                self.bounce.as_mut_slice()[got..span].fill(0);
            }
            let mut pos = (op.offset - start) as usize;
            for seg in op.segments.iter() {
                let n = seg.len();
                let dst = &mut self.bounce.as_mut_slice()[pos..pos + n];
                match (seg, &*guest) {
                    (Segment::Guest { start, len, .. }, Guest::Write(buf)) => {
                        dst.copy_from_slice(&buf[*start..*start + *len])
                    }
                    (Segment::Buf(b), _) => dst.copy_from_slice(b.as_slice()),
                    (Segment::Zeroes(_), _) => dst.fill(0),
                    _ => return Err(guest_missing()),
                }
                pos += n;
            }
            self.bounced += len;
            return file
                .write_all_at(&self.bounce.as_slice()[..span], start)
                .map_err(err);
        }
        let mut pos = op.offset;
        for seg in op.segments.iter() {
            match (seg, &*guest) {
                (Segment::Guest { start, len, .. }, Guest::Write(buf)) => {
                    file.write_all_at(&buf[*start..*start + *len], pos)
                        .map_err(err)?;
                }
                (Segment::Buf(b), _) => file.write_all_at(b.as_slice(), pos).map_err(err)?,
                (Segment::Zeroes(n), _) => {
                    let mut done = 0;
                    while done < *n {
                        let k = (*n - done).min(ZEROES.len());
                        file.write_all_at(&ZEROES[..k], pos + done as u64)
                            .map_err(err)?;
                        done += k;
                    }
                }
                _ => return Err(guest_missing()),
            }
            pos += seg.len() as u64;
        }
        Ok(())
    }

    fn grow_bounce(&mut self, len: u64) {
        if (self.bounce.capacity() as u64) < len {
            self.bounce = IoBuf::zeroed(len as usize);
        }
        self.bounce.resize(len as usize);
    }
}

fn copy_into(seg: &mut Segment, guest: &mut Guest<'_>, src: &[u8]) -> Result<(), IoError> {
    match (seg, guest) {
        (Segment::Guest { start, len, .. }, Guest::Read(buf)) => {
            buf[*start..*start + *len].copy_from_slice(src)
        }
        (Segment::Buf(b), _) => b.as_mut_slice().copy_from_slice(src),
        (Segment::Zeroes(_), _) => {}
        _ => return Err(guest_missing()),
    }
    Ok(())
}
