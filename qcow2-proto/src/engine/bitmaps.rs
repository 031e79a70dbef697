//! Persistent dirty bitmaps while an image is open.
//!
//! *Reading* a bitmap's bits (what backup tools read): its bitmap table, then every data
//! cluster it points at, ORed into one buffer (layouts in [`crate::format::bitmap`]). One
//! read at a time.
//!
//! *Maintaining* them on a writable image ([`Live`]): at open, every enabled bitmap that
//! was stored cleanly is marked in use on disk (durably, before any write), and from then
//! on every write, write-zeroes and discard sets its range in an in-memory bitmap of what
//! changed. Close ORs that into the stored bits and stores every changed bitmap anew
//! (`bitmap_store`). A crash in between leaves the bitmaps in use, which tells every
//! reader that they are stale, as QEMU leaves them. Edits (add, remove, clear, enable,
//! disable, merge) are made in memory and stored the same way at close.

use crate::error::RequestError;
use crate::format::bitmap::{
    data_bytes, DirEntry, AUTO, GRANULARITY_BITS, IN_USE, MAX_BITMAPS, MAX_DIRECTORY_BYTES,
    MAX_NAME, TABLE_ENTRY_OFFSET as ENTRY_OFFSET, TABLE_ENTRY_RESERVED as ENTRY_RESERVED,
    TYPE_DIRTY_TRACKING,
};
use crate::info::{BitmapData, BitmapInfo};
use crate::io::{IoBuf, IoError, IoKind, IoOp, Segment};
use crate::request::{Outcome, ReqId};
use crate::SubmitError;

use super::{be64, Image, Kind, Purpose};

/// Largest bitmap held at once (QEMU keeps at most 512 MiB of bitmap in memory).
pub const MAX_BITMAP_BYTES: u64 = 512 << 20;
/// Most bytes of bits one image maintains in memory; past it, further enabled bitmaps are
/// left in use (stale) rather than tracked.
const MAX_TRACKED_BYTES: u64 = 1 << 30;
/// Data clusters read at once.
const READS_IN_FLIGHT: u32 = 8;

/// A bitmap read in progress: the table, then (unless `table_only`) the data clusters
/// ORed into `bits`.
#[derive(Debug)]
pub(super) struct BitmapRead {
    pub(super) bitmap: BitmapInfo,
    /// The table's entries, once read.
    pub(super) table: Option<Vec<u64>>,
    /// Next table entry to handle.
    next: usize,
    pub(super) bits: Vec<u8>,
    /// Only the table is wanted (to free a bitmap's clusters).
    table_only: bool,
    /// Stored bits from this one on are not taken (the disk shrank below them since).
    pub(super) limit: u64,
}

impl BitmapRead {
    /// A read of the table at `table` (offset, entries), ORing the data into `bits`.
    pub(super) fn new(table: (u64, u32), bits: Vec<u8>, table_only: bool) -> Self {
        Self {
            bitmap: BitmapInfo {
                name: String::new(),
                granularity: 0,
                in_use: false,
                auto: false,
                table_offset: table.0,
                table_size: table.1,
            },
            table: None,
            next: 0,
            bits,
            table_only,
            limit: u64::MAX,
        }
    }
}

/// The persistent bitmaps of a writable image, as this session maintains them.
#[derive(Debug, Default)]
pub(super) struct Live {
    pub(super) list: Vec<LiveBitmap>,
    /// Bitmaps removed this session: their clusters are freed once the new directory is
    /// in the header.
    pub(super) removed: Vec<DirEntry>,
    /// The directory on disk: offset and bytes (0 bytes: none).
    pub(super) dir: (u64, u64),
    /// Whether anything must be stored back at close.
    pub(super) changed: bool,
}

/// One bitmap of [`Live`].
#[derive(Debug)]
pub(super) struct LiveBitmap {
    /// The entry as it is on disk (table, flags).
    pub(super) disk: DirEntry,
    /// Whether it tracks writes now.
    pub(super) enabled: bool,
    /// Stale since before this session (in use, or not ours to rewrite): never tracked
    /// nor edited, only removed.
    pub(super) stale: bool,
    /// The bits this session holds: what changed (with `over_stored`: ORed into the
    /// stored bits at close), or the whole bitmap.
    pub(super) bits: Option<Vec<u8>>,
    pub(super) over_stored: bool,
    /// How many of the stored bits still count: a shrink drops those past the new end,
    /// and a later grow must not bring them back.
    pub(super) stored_limit: u64,
}

impl LiveBitmap {
    fn name(&self) -> &[u8] {
        &self.disk.name
    }

    /// What `info` lists for it.
    pub(super) fn info(&self) -> BitmapInfo {
        BitmapInfo {
            name: String::from_utf8_lossy(&self.disk.name).into_owned(),
            granularity: 1 << self.disk.granularity_bits,
            in_use: self.disk.flags & IN_USE != 0,
            auto: self.enabled,
            table_offset: self.disk.table_offset,
            table_size: self.disk.table_size,
        }
    }
}

/// Sets the bits covering guest bytes `offset..offset + len` (clamped to `bits`).
fn set_range(bits: &mut [u8], granularity_bits: u8, offset: u64, len: u64) {
    if len == 0 {
        return;
    }
    let total = bits.len() as u64 * 8;
    let first = offset >> granularity_bits;
    let end = (offset.saturating_add(len).saturating_sub(1) >> granularity_bits) + 1;
    let end = end.min(total);
    let mut i = first;
    while i < end {
        if i % 8 == 0 && end - i >= 8 {
            let n = ((end - i) / 8) as usize;
            let at = (i / 8) as usize;
            bits[at..at + n].fill(0xff);
            i += n as u64 * 8;
        } else {
            bits[(i / 8) as usize] |= 1 << (i % 8);
            i += 1;
        }
    }
}

/// ORs `src` into `bits` from byte `at`, up to bit `limit` (exclusive) and `bits`' end.
fn or_bits(bits: &mut [u8], at: usize, src: &[u8], limit: u64) {
    let start = at.min(bits.len());
    let end = (at + src.len()).min(bits.len());
    for (i, (b, &d)) in bits[start..end].iter_mut().zip(src).enumerate() {
        let first = (start + i) as u64 * 8;
        if first + 8 <= limit {
            *b |= d;
        } else if first < limit {
            *b |= d & ((1u16 << (limit - first)) - 1) as u8;
        }
    }
}

/// Clears the bits past the first `count` (the unused tail must be zero).
pub(super) fn clear_tail(bits: &mut [u8], count: u64) {
    let full = (count / 8) as usize;
    if full < bits.len() {
        let keep = count % 8;
        bits[full] &= ((1u16 << keep) - 1) as u8;
        bits[full + 1..].fill(0);
    }
}

impl Image {
    /// Reads the bits of persistent bitmap `name`; completes with [`Outcome::Bitmap`].
    /// On an image open for writing, the bits include every change made since it was
    /// opened. A bitmap that was not stored back cleanly is
    /// [`RequestError::BitmapInconsistent`]; one whose table does not fit the disk is
    /// [`RequestError::BitmapInvalid`].
    pub fn read_bitmap(&mut self, name: &str) -> Result<ReqId, SubmitError> {
        if self.bitmap_read.is_some() {
            return Err(SubmitError::Busy);
        }
        let read = match self.bitmaps.as_deref() {
            Some(live) => {
                let b = live
                    .list
                    .iter()
                    .find(|b| b.name() == name.as_bytes())
                    .ok_or(RequestError::BitmapNotFound)?;
                if b.stale {
                    return Err(RequestError::BitmapInconsistent.into());
                }
                let bytes = data_bytes(self.hdr.size, b.disk.granularity_bits) as usize;
                let mut bits = b.bits.clone().unwrap_or_default();
                bits.resize(bytes, 0);
                let table = match &b.bits {
                    Some(_) if !b.over_stored => (0, 0),
                    _ => (b.disk.table_offset, b.disk.table_size),
                };
                let mut read = BitmapRead::new(table, bits, false);
                read.limit = b.stored_limit;
                read.bitmap = BitmapInfo {
                    table_offset: table.0,
                    table_size: table.1,
                    ..b.info()
                };
                read
            }
            None => {
                let info = self.info.as_ref().ok_or(SubmitError::NotOpen)?;
                let Some(b) = info.bitmaps.iter().find(|b| b.name == name) else {
                    return Err(RequestError::BitmapNotFound.into());
                };
                if b.in_use {
                    return Err(RequestError::BitmapInconsistent.into());
                }
                if !self.stored_bitmap_fits(b) {
                    return Err(RequestError::BitmapInvalid.into());
                }
                let gran = b.granularity.trailing_zeros() as u8;
                let bytes = data_bytes(self.hdr.size, gran) as usize;
                let mut read =
                    BitmapRead::new((b.table_offset, b.table_size), vec![0; bytes], false);
                read.bitmap = b.clone();
                read
            }
        };
        self.bitmap_read = Some(Box::new(read));
        self.submit_kind(Kind::BitmapRead, 0, 0)
            .inspect_err(|_| self.bitmap_read = None)
    }

    /// Whether a stored bitmap's granularity, size and table fit the disk as it is.
    fn stored_bitmap_fits(&self, b: &BitmapInfo) -> bool {
        let gran = b.granularity.trailing_zeros();
        let ok_gran =
            b.granularity.is_power_of_two() && GRANULARITY_BITS.contains(&(gran.min(255) as u8));
        if !ok_gran {
            return false;
        }
        let bytes = data_bytes(self.hdr.size, gran as u8);
        let cs = self.geo.cluster_size();
        bytes <= MAX_BITMAP_BYTES
            && u64::from(b.table_size) == bytes.div_ceil(cs)
            && self.geo.aligned(b.table_offset)
            && !(b.table_size > 0 && b.table_offset == 0)
            && b.table_offset.saturating_add(u64::from(b.table_size) * 8)
                <= self.file_end.max(self.config.file_len)
    }

    pub(super) fn step_bitmap_read(&mut self, t: u32) -> bool {
        if !self.read_bits_step(t) {
            return false;
        }
        if self.task(t).error.is_some() {
            self.bitmap_read = None;
            return true;
        }
        let op = self.bitmap_read.take().expect("runs");
        let data = BitmapData {
            granularity: op.bitmap.granularity,
            size: self.hdr.size,
            bits: op.bits,
        };
        self.task(t).bitmap = Some(Box::new(data));
        true
    }

    /// Steps the read in `self.bitmap_read`: true once it is over (failed: the task's
    /// error is set; else the read stays there, finished).
    pub(super) fn read_bits_step(&mut self, t: u32) -> bool {
        loop {
            let task = self.task(t);
            let (inflight, failed) = (task.inflight, task.error.is_some());
            let op = self.bitmap_read.as_deref().expect("a bitmap read runs");
            if failed {
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
                return inflight == 0;
            }
            let e = table[next];
            let host = e & ENTRY_OFFSET;
            let cs = self.geo.cluster_size() as usize;
            if e & ENTRY_RESERVED != 0 || host != 0 && (e & 1 != 0 || host >= self.file_end) {
                self.task(t).error = Some(RequestError::BitmapInvalid);
                continue;
            }
            if host == 0 || op.table_only {
                if host == 0 && e & 1 != 0 {
                    let op = self.bitmap_read.as_deref_mut().expect("runs");
                    or_bits(&mut op.bits, next * cs, &vec![0xff; cs], op.limit);
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
                    or_bits(&mut read.bits, index as usize * cs, bytes, read.limit);
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

/// Maintenance: set-up at open, marking, edits.
impl Image {
    /// At a writable open, from the directory read (`dir`, `count` entries): the bitmaps
    /// to maintain. Every bitmap stored cleanly gets the in-use flag in `dir` (written
    /// back before the open completes), and the enabled ones are tracked; one we cannot
    /// maintain (unknown flags or extra data, a table that does not fit, too large) keeps
    /// the flag for good. `None` when the directory is damaged: the caller then clears the
    /// bitmaps' autoclear bit, so that nobody trusts them. Returns whether `dir` changed.
    pub(super) fn live_bitmaps(&mut self, dir: &mut [u8], count: u32) -> Option<bool> {
        let cs = self.geo.cluster_size();
        let entries = crate::format::bitmap::parse_directory(dir, count, cs - 1)?;
        let mut live = Live::default();
        let mut changed = false;
        let mut tracked = 0u64;
        let mut off = 0usize;
        for e in entries {
            let at = off;
            off = (off + 24 + e.extra.len() + e.name.len()).next_multiple_of(8);
            let enabled = e.flags & AUTO != 0;
            let bytes = data_bytes(self.hdr.size, e.granularity_bits);
            let mut b = LiveBitmap {
                enabled,
                stale: e.flags & IN_USE != 0,
                bits: None,
                over_stored: false,
                stored_limit: u64::MAX,
                disk: e,
            };
            if !b.stale {
                // Every bitmap is in use while the image is open (as QEMU marks them): a
                // resize or an edit may change any of them.
                let fits = b.disk.writable() && self.stored_bitmap_fits(&b.info());
                if !fits || enabled && tracked + bytes > MAX_TRACKED_BYTES {
                    b.stale = true;
                } else if enabled {
                    tracked += bytes;
                    b.bits = Some(vec![0; bytes as usize]);
                    b.over_stored = true;
                }
                b.disk.flags |= IN_USE;
                dir[at + 12..at + 16].copy_from_slice(&b.disk.flags.to_be_bytes());
                changed = true;
            }
            live.list.push(b);
        }
        live.dir = (
            self.layout
                .as_ref()
                .and_then(|l| l.ext.bitmaps)
                .map_or(0, |b| b.directory_offset),
            off as u64,
        );
        live.changed = changed;
        self.bitmaps = Some(Box::new(live));
        self.sync_bitmap_info();
        Some(changed)
    }

    /// Marks guest bytes `offset..offset + len` changed in every enabled bitmap.
    pub(super) fn mark_dirty(&mut self, offset: u64, len: u64) {
        let Some(live) = self.bitmaps.as_deref_mut() else {
            return;
        };
        for b in &mut live.list {
            if let (true, Some(bits)) = (b.enabled, b.bits.as_mut()) {
                set_range(bits, b.disk.granularity_bits, offset, len);
            }
        }
    }

    /// The disk changed size: the bitmaps this session holds follow it (bits past the
    /// new end dropped; a grown part starts clean, as in QEMU).
    pub(super) fn resize_bitmaps(&mut self, size: u64) {
        let Some(live) = self.bitmaps.as_deref_mut() else {
            return;
        };
        for b in &mut live.list {
            let g = b.disk.granularity_bits;
            b.stored_limit = b.stored_limit.min(size.div_ceil(1 << g));
            if let Some(bits) = b.bits.as_mut() {
                bits.resize(data_bytes(size, g) as usize, 0);
                clear_tail(bits, size.div_ceil(1 << g));
            } else if !b.stale {
                // A stored bitmap of the old size: rewritten at close at the new one.
                b.bits = Some(vec![0; data_bytes(size, g) as usize]);
                b.over_stored = true;
            }
            live.changed = true;
        }
    }

    /// Adds persistent bitmap `name` (empty) with `granularity` bytes per bit, enabled or
    /// not; stored at close. As `qemu-img bitmap --add`.
    pub fn bitmap_add(
        &mut self,
        name: &str,
        granularity: u64,
        enabled: bool,
    ) -> Result<(), RequestError> {
        self.bitmap_editable()?;
        if self.hdr.version < 3 {
            return Err(RequestError::BitmapsNeedV3);
        }
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(RequestError::BitmapName);
        }
        let gran = granularity.trailing_zeros();
        if !granularity.is_power_of_two() || !GRANULARITY_BITS.contains(&(gran.min(255) as u8)) {
            return Err(RequestError::BitmapGranularity);
        }
        let bytes = data_bytes(self.hdr.size, gran as u8);
        if bytes > MAX_BITMAP_BYTES {
            return Err(RequestError::BitmapTooLarge);
        }
        let live = self.bitmaps.get_or_insert_with(Box::default);
        if live.list.iter().any(|b| b.name() == name.as_bytes()) {
            return Err(RequestError::BitmapExists);
        }
        let dir_bytes: u64 = live
            .list
            .iter()
            .map(|b| (24 + b.disk.extra.len() + b.disk.name.len()).next_multiple_of(8) as u64)
            .sum();
        let more = (24 + name.len()).next_multiple_of(8) as u64;
        if live.list.len() >= MAX_BITMAPS || dir_bytes + more > MAX_DIRECTORY_BYTES {
            return Err(RequestError::TooManyBitmaps);
        }
        // (As QEMU orders its directory: the stored bitmaps, then this session's new ones,
        // the latest first.)
        let at = live
            .list
            .iter()
            .position(|b| b.disk.table_size == 0 && b.bits.is_some() && !b.stale)
            .unwrap_or(live.list.len());
        live.list.insert(
            at,
            LiveBitmap {
                disk: DirEntry {
                    table_offset: 0,
                    table_size: 0,
                    flags: 0,
                    kind: TYPE_DIRTY_TRACKING,
                    granularity_bits: gran as u8,
                    extra: Vec::new(),
                    name: name.as_bytes().to_vec(),
                },
                enabled,
                stale: false,
                bits: Some(vec![0; bytes as usize]),
                over_stored: false,
                stored_limit: u64::MAX,
            },
        );
        live.changed = true;
        self.sync_bitmap_info();
        Ok(())
    }

    /// Removes persistent bitmap `name` (its clusters are freed at close). As
    /// `qemu-img bitmap --remove`; an inconsistent bitmap may be removed.
    pub fn bitmap_remove(&mut self, name: &str) -> Result<(), RequestError> {
        self.bitmap_editable()?;
        let live = self
            .bitmaps
            .as_deref_mut()
            .ok_or(RequestError::BitmapNotFound)?;
        let i = live
            .list
            .iter()
            .position(|b| b.name() == name.as_bytes())
            .ok_or(RequestError::BitmapNotFound)?;
        let b = live.list.remove(i);
        if b.disk.table_size > 0 {
            live.removed.push(b.disk);
        }
        live.changed = true;
        self.sync_bitmap_info();
        Ok(())
    }

    /// Clears persistent bitmap `name`: no range is dirty. As `qemu-img bitmap --clear`.
    pub fn bitmap_clear(&mut self, name: &str) -> Result<(), RequestError> {
        let size = self.hdr.size;
        let b = self.live_bitmap(name)?;
        b.bits = Some(vec![0; data_bytes(size, b.disk.granularity_bits) as usize]);
        b.over_stored = false;
        self.bitmaps_changed();
        Ok(())
    }

    /// Enables (`true`) or disables persistent bitmap `name`: whether it records the
    /// writes that follow. As `qemu-img bitmap --enable` / `--disable`.
    pub fn bitmap_enable(&mut self, name: &str, enabled: bool) -> Result<(), RequestError> {
        let size = self.hdr.size;
        let b = self.live_bitmap(name)?;
        if b.bits.is_none() {
            b.bits = Some(vec![0; data_bytes(size, b.disk.granularity_bits) as usize]);
            b.over_stored = true;
        }
        b.enabled = enabled;
        self.bitmaps_changed();
        self.sync_bitmap_info();
        Ok(())
    }

    /// Merges `source`'s dirty ranges into persistent bitmap `name` (its granularity may
    /// differ; its disk size may not). As `qemu-img bitmap --merge`.
    pub fn bitmap_merge(&mut self, name: &str, source: &BitmapData) -> Result<(), RequestError> {
        let size = self.hdr.size;
        if source.size != size {
            self.live_bitmap(name)?;
            return Err(RequestError::BitmapSizes {
                dst: size,
                src: source.size,
            });
        }
        let b = self.live_bitmap(name)?;
        let g = b.disk.granularity_bits;
        if b.bits.is_none() {
            b.bits = Some(vec![0; data_bytes(size, g) as usize]);
            b.over_stored = true;
        }
        let bits = b.bits.as_mut().expect("just set");
        for (start, len) in source.dirty_ranges() {
            set_range(bits, g, start, len);
        }
        self.bitmaps_changed();
        Ok(())
    }

    /// The bitmap `name` names, for an edit.
    fn live_bitmap(&mut self, name: &str) -> Result<&mut LiveBitmap, RequestError> {
        self.bitmap_editable()?;
        let live = self
            .bitmaps
            .as_deref_mut()
            .ok_or(RequestError::BitmapNotFound)?;
        let b = live
            .list
            .iter_mut()
            .find(|b| b.name() == name.as_bytes())
            .ok_or(RequestError::BitmapNotFound)?;
        if b.stale {
            return Err(RequestError::BitmapInconsistent);
        }
        Ok(b)
    }

    fn bitmap_editable(&self) -> Result<(), RequestError> {
        if self.info.is_none() {
            return Err(RequestError::Poisoned);
        }
        if self.read_only {
            return Err(RequestError::ReadOnly);
        }
        if self.poisoned.is_some() {
            return Err(RequestError::Poisoned);
        }
        Ok(())
    }

    fn bitmaps_changed(&mut self) {
        if let Some(live) = self.bitmaps.as_deref_mut() {
            live.changed = true;
        }
    }

    /// Lists the maintained bitmaps in the image's info.
    pub(super) fn sync_bitmap_info(&mut self) {
        let list = self
            .bitmaps
            .as_deref()
            .map(|l| l.list.iter().map(LiveBitmap::info).collect());
        if let (Some(info), Some(list)) = (self.info.as_mut(), list) {
            info.bitmaps = list;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_set_exactly_their_bits() {
        let mut bits = vec![0u8; 4];
        set_range(&mut bits, 16, 65536, 1);
        assert_eq!(bits, [0b10, 0, 0, 0]);
        set_range(&mut bits, 16, 3 * 65536 - 1, 2);
        assert_eq!(bits, [0b1110, 0, 0, 0]);
        set_range(&mut bits, 16, 7 << 16, 18 << 16);
        assert_eq!(bits, [0b1000_1110, 0xff, 0xff, 0b1]);
        // Clamped to the bitmap.
        set_range(&mut bits, 16, 30 << 16, u64::MAX);
        assert_eq!(bits[3], 0b1100_0001);
        let mut none = vec![0u8; 1];
        set_range(&mut none, 9, 0, 0);
        assert_eq!(none, [0], "an empty range marks nothing");
    }

    #[test]
    fn tails_are_cleared() {
        let mut bits = vec![0xffu8; 3];
        clear_tail(&mut bits, 10);
        assert_eq!(bits, [0xff, 0b11, 0]);
        clear_tail(&mut bits, 24);
        assert_eq!(bits, [0xff, 0b11, 0]);
    }
}
