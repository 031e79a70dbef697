//! Reading a persistent dirty bitmap's bits (what backup tools read): its bitmap table,
//! then every data cluster it points at, into one buffer. Read-only; one at a time.
//!
//! ```text
//! bitmap table entry                    (docs/interop/qcow2.txt, "Bitmaps")
//!   bit   0      with offset 0: 0 all zeros, 1 all ones; else reserved (0)
//!   bits  1.. 8  reserved (0)
//!   bits  9..55  host offset of a cluster of bitmap data; 0: see bit 0
//!   bits 56..63  reserved (0)
//! ```

use crate::error::RequestError;
use crate::info::{BitmapData, BitmapInfo};
use crate::io::{IoBuf, IoError, IoKind, IoOp, Segment};
use crate::request::{Outcome, ReqId};
use crate::SubmitError;

use super::{be64, Image, Kind, Purpose};

/// Offset bits of a bitmap table entry.
const ENTRY_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of a bitmap table entry.
const ENTRY_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// Granularities QEMU accepts (bits).
const GRANULARITY_BITS: std::ops::RangeInclusive<u32> = 9..=31;
/// Largest bitmap read at once (QEMU keeps at most 512 MiB of bitmap in memory).
pub const MAX_BITMAP_BYTES: u64 = 512 << 20;
/// Data clusters read at once.
const READS_IN_FLIGHT: u32 = 8;

/// A bitmap read in progress.
#[derive(Debug)]
pub(super) struct BitmapRead {
    bitmap: BitmapInfo,
    /// The table's entries, once read.
    table: Option<Vec<u64>>,
    /// Next table entry to handle.
    next: usize,
    bits: Vec<u8>,
}

impl Image {
    /// Reads the bits of persistent bitmap `name`; completes with [`Outcome::Bitmap`].
    /// A bitmap that was not stored back cleanly is
    /// [`RequestError::BitmapInconsistent`]; one whose table does not fit the disk is
    /// [`RequestError::BitmapInvalid`].
    pub fn read_bitmap(&mut self, name: &str) -> Result<ReqId, SubmitError> {
        if self.bitmap_read.is_some() {
            return Err(SubmitError::Busy);
        }
        let info = self.info.as_ref().ok_or(SubmitError::NotOpen)?;
        let Some(b) = info.bitmaps.iter().find(|b| b.name == name) else {
            return Err(RequestError::BitmapNotFound.into());
        };
        if b.in_use {
            return Err(RequestError::BitmapInconsistent.into());
        }
        let gran = b.granularity.trailing_zeros();
        let bytes = self.hdr.size.div_ceil(b.granularity).div_ceil(8);
        let cs = self.geo.cluster_size();
        if !GRANULARITY_BITS.contains(&gran)
            || bytes > MAX_BITMAP_BYTES
            || u64::from(b.table_size) != bytes.div_ceil(cs)
            || !self.geo.aligned(b.table_offset)
            || b.table_size > 0 && b.table_offset == 0
        {
            return Err(RequestError::BitmapInvalid.into());
        }
        self.bitmap_read = Some(Box::new(BitmapRead {
            bitmap: b.clone(),
            table: None,
            next: 0,
            bits: vec![0; bytes as usize],
        }));
        self.submit_kind(Kind::BitmapRead, 0, 0)
            .inspect_err(|_| self.bitmap_read = None)
    }

    pub(super) fn step_bitmap_read(&mut self, t: u32) -> bool {
        loop {
            let task = self.task(t);
            let (inflight, failed) = (task.inflight, task.error.is_some());
            let op = self.bitmap_read.as_deref().expect("a bitmap read runs");
            if failed {
                if inflight == 0 {
                    self.bitmap_read = None;
                }
                return inflight == 0;
            }
            let Some(table) = &op.table else {
                if inflight > 0 || !self.op_room(1) {
                    return false;
                }
                let b = &op.bitmap;
                let bytes = (u64::from(b.table_size) * 8).max(512).next_multiple_of(512);
                let (at, size) = (b.table_offset, b.table_size);
                if size == 0 {
                    self.bitmap_read.as_deref_mut().expect("runs").table = Some(Vec::new());
                    continue;
                }
                let buf = IoBuf::zeroed(bytes as usize);
                let purpose = Purpose::BitmapRead {
                    task: t,
                    index: u32::MAX,
                };
                self.issue_buf(purpose, IoKind::Read, at, buf);
                self.task(t).inflight += 1;
                return false;
            };
            let next = op.next;
            if next >= table.len() {
                if inflight > 0 {
                    return false;
                }
                let op = self.bitmap_read.take().expect("runs");
                let data = BitmapData {
                    granularity: op.bitmap.granularity,
                    size: self.hdr.size,
                    bits: op.bits,
                };
                self.task(t).bitmap = Some(Box::new(data));
                return true;
            }
            let e = table[next];
            let host = e & ENTRY_OFFSET;
            let cs = self.geo.cluster_size() as usize;
            if e & ENTRY_RESERVED != 0 || host != 0 && (e & 1 != 0 || host >= self.file_end) {
                self.task(t).error = Some(RequestError::BitmapInvalid);
                continue;
            }
            if host == 0 {
                if e & 1 != 0 {
                    let op = self.bitmap_read.as_deref_mut().expect("runs");
                    let end = ((next + 1) * cs).min(op.bits.len());
                    op.bits[next * cs..end].fill(0xff);
                }
                self.bitmap_read.as_deref_mut().expect("runs").next += 1;
                continue;
            }
            if inflight >= READS_IN_FLIGHT || !self.op_room(1) {
                return false;
            }
            let buf = self.staging_buf(cs);
            let purpose = Purpose::BitmapRead {
                task: t,
                index: next as u32,
            };
            self.issue_buf(purpose, IoKind::Read, host, buf);
            self.task(t).inflight += 1;
            self.bitmap_read.as_deref_mut().expect("runs").next += 1;
        }
    }

    /// A read of a bitmap's table (`index` `u32::MAX`) or of its data cluster `index`.
    pub(super) fn bitmap_read_done(
        &mut self,
        t: u32,
        index: u32,
        op: IoOp,
        result: Result<(), IoError>,
    ) {
        let result = result.map_err(|e| self.io_error(e));
        if let (Ok(()), Some(Segment::Buf(b))) = (result, op.segments.into_iter().next()) {
            let cs = self.geo.cluster_size() as usize;
            if let Some(read) = self.bitmap_read.as_deref_mut() {
                let bytes = b.as_slice();
                if index == u32::MAX {
                    let n = read.bitmap.table_size as usize;
                    read.table = Some((0..n).map(|i| be64(bytes, i)).collect());
                } else {
                    let start = index as usize * cs;
                    let end = (start + cs).min(read.bits.len());
                    read.bits[start..end].copy_from_slice(&bytes[..end - start]);
                }
            }
            self.put_staging(b);
        }
        self.task_io_done(t, result);
    }
}

impl super::Task {
    /// The outcome of a finished bitmap read.
    pub(super) fn bitmap_outcome(&mut self) -> Option<Outcome> {
        self.bitmap.take().map(Outcome::Bitmap)
    }
}
