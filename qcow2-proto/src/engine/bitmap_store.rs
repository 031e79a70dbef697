//! Storing persistent bitmaps back at close (part of the close task, which runs alone).
//!
//! 1. Everything durable first.
//! 2. Each bitmap this session changed: its stored bits read and ORed with the session's
//!    (unless it was cleared), then written anew (non-zero data clusters, then its table,
//!    contiguous); the stored table is kept to free its clusters later. Removed bitmaps'
//!    tables are read for the same reason.
//! 3. The new directory (in-use flags cleared, except on bitmaps that were stale already)
//!    is written; a cycle makes every new cluster's refcount durable (rules A, D).
//! 4. The header switches to it in three durable steps, so that a torn multi-sector write
//!    of cluster 0 can never leave a bitmaps extension that claims to be valid: the
//!    bitmaps autoclear bit is cleared (one sector), the extension area is rewritten, the
//!    bit is set again (one sector). A crash in between leaves the bitmaps marked stale.
//! 5. The old directory, tables and data clusters are freed (rule B).

use crate::error::RequestError;
use crate::format::bitmap::{
    self, data_bytes, DirEntry, AUTO, IN_USE, TABLE_ENTRY_OFFSET, TABLE_ENTRY_RESERVED,
};
use crate::format::extension::{with_bitmaps, Extensions, RawBitmapsExtValue};
use crate::format::header::autoclear;
use crate::io::{IoBuf, IoKind};

use super::bitmaps::{clear_tail, BitmapRead};
use super::{put_be64, Block, Image, Purpose};

/// The store's progress.
#[derive(Debug, Default)]
pub(super) struct Store {
    sub: u8,
    /// Next bitmap: of the list, then of the removed ones (`list.len() + j`).
    next: usize,
    /// The new directory's entries, in order.
    entries: Vec<DirEntry>,
    /// Clusters to free once the new directory is in: host offset, count.
    frees: Vec<(u64, u64)>,
    /// The new bitmaps extension (none: no bitmaps left).
    ext: Option<RawBitmapsExtValue>,
    /// The step after a flush.
    then: u8,
}

mod sub {
    pub const START: u8 = 0;
    pub const NEXT: u8 = 1;
    pub const READ: u8 = 2;
    pub const WRITE: u8 = 3;
    pub const DIR: u8 = 4;
    pub const DURABLE: u8 = 5;
    pub const CLEAR_BIT: u8 = 6;
    pub const LAYOUT: u8 = 7;
    pub const SET_BIT: u8 = 8;
    pub const FREE: u8 = 9;
    pub const DONE: u8 = 10;
    /// A write was issued: flush, then go on with `then`.
    pub const SYNC: u8 = 11;
}

impl Image {
    /// Whether close must store bitmaps back.
    pub(super) fn bitmaps_to_store(&self) -> bool {
        !self.read_only
            && self.poisoned.is_none()
            && self.bitmaps.as_deref().is_some_and(|l| l.changed)
    }

    /// Steps the store; true once it is over (failed: the task's error is set).
    pub(super) fn step_bitmap_store(&mut self, t: u32) -> bool {
        loop {
            let (failed, inflight) = (self.task(t).error.is_some(), self.task(t).inflight);
            if failed && self.bitmap_read.is_none() {
                self.bitmap_store = None;
                return inflight == 0;
            }
            let s = self.bitmap_store.as_deref().map_or(sub::START, |s| s.sub);
            if s != sub::READ && (inflight > 0 || !self.op_room(2)) {
                return false;
            }
            let r: Result<(), Block> = match s {
                sub::START => {
                    if !self.wait_all_durable(t) {
                        return false;
                    }
                    self.task(t).wait_cycle = None;
                    self.bitmap_store = Some(Box::default());
                    self.store_mut().sub = sub::NEXT;
                    Ok(())
                }
                sub::NEXT => {
                    self.store_next();
                    Ok(())
                }
                sub::READ => {
                    if !self.read_bits_step(t) {
                        return false;
                    }
                    self.store_read_done(t);
                    Ok(())
                }
                sub::WRITE => self.store_write(t),
                sub::DIR => self.store_directory(t),
                sub::DURABLE => {
                    if !self.wait_all_durable(t) {
                        return false;
                    }
                    self.task(t).wait_cycle = None;
                    self.store_mut().sub = sub::CLEAR_BIT;
                    Ok(())
                }
                sub::CLEAR_BIT => {
                    if self.hdr.autoclear_features & autoclear::BITMAPS != 0 {
                        self.hdr.autoclear_features &= !autoclear::BITMAPS;
                        self.store_header(t);
                        self.store_sync_then(sub::LAYOUT);
                    } else {
                        self.store_mut().sub = sub::LAYOUT;
                    }
                    Ok(())
                }
                sub::LAYOUT => self
                    .store_layout(t)
                    .map(|()| self.store_sync_then(sub::SET_BIT)),
                sub::SET_BIT => {
                    if self.store_mut().ext.is_some() {
                        self.hdr.autoclear_features |= autoclear::BITMAPS;
                        self.store_header(t);
                        self.store_sync_then(sub::FREE);
                    } else {
                        self.store_mut().sub = sub::FREE;
                    }
                    Ok(())
                }
                sub::SYNC => {
                    self.issue_bare(Purpose::TaskIo { task: t }, IoKind::Flush, 0);
                    self.task(t).inflight += 1;
                    let store = self.store_mut();
                    store.sub = store.then;
                    Ok(())
                }
                sub::FREE => {
                    self.store_free();
                    Ok(())
                }
                _ => {
                    if !self.wait_all_durable(t) {
                        return false;
                    }
                    self.task(t).wait_cycle = None;
                    self.bitmap_store = None;
                    return true;
                }
            };
            match r {
                Ok(()) => {}
                Err(Block::Park) => return false,
                Err(Block::Fail(e)) => {
                    self.task(t).error.get_or_insert(e);
                }
            }
        }
    }

    /// A flush next, then step `then`.
    fn store_sync_then(&mut self, then: u8) {
        let store = self.store_mut();
        (store.sub, store.then) = (sub::SYNC, then);
    }

    fn store_mut(&mut self) -> &mut Store {
        self.bitmap_store
            .as_deref_mut()
            .expect("a bitmap store runs")
    }

    /// Picks the next bitmap: kept as it is, rewritten, or (removed) freed.
    fn store_next(&mut self) {
        let live = self.bitmaps.as_deref_mut().expect("bitmaps to store");
        let store = self.bitmap_store.as_deref_mut().expect("runs");
        let i = store.next;
        let (table, bits, table_only) = if let Some(b) = live.list.get_mut(i) {
            if b.stale || b.bits.is_none() {
                let mut e = b.disk.clone();
                if !b.stale {
                    e.flags &= !IN_USE;
                }
                store.entries.push(e);
                store.next += 1;
                return;
            }
            if b.disk.table_size == 0 {
                store.sub = sub::WRITE;
                return;
            }
            let bits = b.bits.take().expect("checked");
            (
                (b.disk.table_offset, b.disk.table_size),
                bits,
                !b.over_stored,
            )
        } else if let Some(r) = live.removed.get(i - live.list.len()) {
            ((r.table_offset, r.table_size), Vec::new(), true)
        } else {
            store.sub = sub::DIR;
            return;
        };
        let fits = self.geo.aligned(table.0)
            && table.0 != 0
            && table.0.saturating_add(u64::from(table.1) * 8) <= self.file_end;
        let store = self.bitmap_store.as_deref_mut().expect("runs");
        if !fits {
            // (Only stale bitmaps get here: the others' tables were checked at open.)
            let live = self.bitmaps.as_deref_mut().expect("bitmaps to store");
            if let Some(b) = live.list.get_mut(i) {
                b.bits = Some(bits);
                store.sub = sub::WRITE;
            } else {
                store.next += 1;
            }
            return;
        }
        self.bitmap_read = Some(Box::new(BitmapRead::new(table, bits, table_only)));
        store.sub = sub::READ;
    }

    /// The stored table (and bits) of the bitmap in hand came in.
    fn store_read_done(&mut self, t: u32) {
        let read = self.bitmap_read.take().expect("a read ran");
        let ok = match self.task(t).error {
            None => true,
            Some(RequestError::BitmapInvalid) => {
                // A damaged table: its clusters are leaked rather than freed blindly.
                self.task(t).error = None;
                false
            }
            Some(_) => {
                self.bitmap_store = None;
                return;
            }
        };
        let cs = self.geo.cluster_size();
        let store = self.bitmap_store.as_deref_mut().expect("runs");
        if ok {
            let table = read.table.as_deref().unwrap_or_default();
            for &e in table {
                let host = e & TABLE_ENTRY_OFFSET;
                if host != 0 && e & TABLE_ENTRY_RESERVED == 0 {
                    store.frees.push((host, 1));
                }
            }
            let bytes = u64::from(read.bitmap.table_size) * 8;
            store
                .frees
                .push((read.bitmap.table_offset, bytes.div_ceil(cs)));
        }
        let i = store.next;
        let live = self.bitmaps.as_deref_mut().expect("bitmaps to store");
        match live.list.get_mut(i) {
            Some(b) if !ok && b.over_stored => {
                // Its stored bits could not be read: it can only be stored as stale.
                b.stale = true;
                store.sub = sub::NEXT;
            }
            Some(b) => {
                b.bits = Some(read.bits);
                store.sub = sub::WRITE;
            }
            None => {
                store.next += 1;
                store.sub = sub::NEXT;
            }
        }
    }

    /// Writes bitmap `next`'s bits anew: its non-zero data clusters, then its table.
    fn store_write(&mut self, t: u32) -> Result<(), Block> {
        let (size, cs) = (self.hdr.size, self.geo.cluster_size() as usize);
        let i = self.bitmap_store.as_deref().expect("runs").next;
        let live = self.bitmaps.as_deref_mut().expect("bitmaps to store");
        let b = &mut live.list[i];
        let g = b.disk.granularity_bits;
        let bits = b.bits.as_mut().expect("bits to store");
        bits.resize(data_bytes(size, g) as usize, 0);
        clear_tail(bits, size.div_ceil(1 << g));
        let entries = bits.len().div_ceil(cs);
        let data: Vec<usize> = (0..entries)
            .filter(|&k| {
                bits[k * cs..((k + 1) * cs).min(bits.len())]
                    .iter()
                    .any(|&x| x != 0)
            })
            .collect();
        let table_clusters = (entries * 8).div_ceil(cs);
        let want = (data.len() + table_clusters) as u64;
        let mut entry = b.disk.clone();
        entry.flags = (entry.flags & !(IN_USE | AUTO)) | if b.enabled { AUTO } else { 0 };
        entry.table_size = entries as u32;
        entry.table_offset = 0;
        if want > 0 {
            let (host, _) = self.alloc_clusters(want, true)?;
            let live = self.bitmaps.as_deref_mut().expect("bitmaps to store");
            let bits = live.list[i].bits.as_ref().expect("bits to store");
            let mut buf = IoBuf::zeroed(want as usize * cs);
            let out = buf.as_mut_slice();
            let table_at = data.len() * cs;
            for (n, &k) in data.iter().enumerate() {
                let src = &bits[k * cs..((k + 1) * cs).min(bits.len())];
                out[n * cs..n * cs + src.len()].copy_from_slice(src);
                let e = host + (n * cs) as u64;
                put_be64(&mut out[table_at..], k, e);
            }
            self.issue_buf(Purpose::TaskIo { task: t }, IoKind::Write, host, buf);
            self.task(t).inflight += 1;
            entry.table_offset = host + table_at as u64;
        }
        let store = self.store_mut();
        store.entries.push(entry);
        store.next += 1;
        store.sub = sub::NEXT;
        Ok(())
    }

    /// Writes the new directory (if any bitmap is left).
    fn store_directory(&mut self, t: u32) -> Result<(), Block> {
        let store = self.bitmap_store.as_deref().expect("runs");
        let dir = bitmap::encode_directory(&store.entries);
        let n = store.entries.len() as u32;
        let ext = if dir.is_empty() {
            None
        } else {
            let bytes = self.geo.round_up(dir.len() as u64);
            let (host, _) = self.alloc_clusters(bytes >> self.geo.cluster_bits, true)?;
            let mut buf = IoBuf::zeroed(bytes as usize);
            buf.as_mut_slice()[..dir.len()].copy_from_slice(&dir);
            self.issue_buf(Purpose::TaskIo { task: t }, IoKind::Write, host, buf);
            self.task(t).inflight += 1;
            Some(RawBitmapsExtValue {
                nb_bitmaps: n,
                directory_size: dir.len() as u64,
                directory_offset: host,
            })
        };
        let store = self.store_mut();
        store.ext = ext;
        store.sub = sub::DURABLE;
        Ok(())
    }

    /// Writes the header sector as `self.hdr` says.
    fn store_header(&mut self, t: u32) {
        self.hdr.encode(self.header_buf.as_mut_slice());
        let buf = self.header_as(self.hdr);
        self.issue_buf(Purpose::Header { task: t }, IoKind::Write, 0, buf);
        self.task(t).inflight += 1;
    }

    /// Rewrites cluster 0's extension area with the new bitmaps extension (the autoclear
    /// bit still clear).
    fn store_layout(&mut self, t: u32) -> Result<(), Block> {
        let cs = self.geo.cluster_size() as usize;
        let limit = self.header_buf.len().min(cs);
        let header_len = self.hdr.header_length as usize;
        let backing = (self.hdr.backing_file_offset, self.hdr.backing_file_size);
        let ext = self.bitmap_store.as_deref().expect("runs").ext;
        let cluster0 = &self.header_buf.as_slice()[..limit];
        let area = match backing.0 {
            0 => limit,
            off => (off as usize).min(limit),
        };
        let old_end = Extensions::parse(cluster0, header_len, area)
            .map(|e| e.end_offset + 8)
            .unwrap_or(area)
            .max((backing.0 + u64::from(backing.1)).min(limit as u64) as usize);
        let laid = with_bitmaps(cluster0, header_len, backing, ext)
            .map_err(|e| RequestError::Options(crate::error::CreateError::Format(e)))?;
        let Some((bytes, name_at, _)) = laid else {
            return Err(RequestError::TooManyBitmaps.into());
        };
        let end = bytes.len().max(old_end).min(limit);
        let buf = self.header_buf.as_mut_slice();
        buf[..bytes.len()].copy_from_slice(&bytes);
        buf[bytes.len()..end].fill(0);
        self.hdr.backing_file_offset = name_at;
        self.hdr.encode(buf);
        let n = end.next_multiple_of(512).min(limit);
        let mut out = IoBuf::zeroed(n);
        out.as_mut_slice()
            .copy_from_slice(&self.header_buf.as_slice()[..n]);
        self.hdr_disk = self.hdr;
        self.issue_buf(Purpose::Header { task: t }, IoKind::Write, 0, out);
        self.task(t).inflight += 1;
        if let Some(l) = self.layout.as_mut() {
            l.ext.bitmaps = ext;
        }
        Ok(())
    }

    /// Frees what the old directory referenced and no bitmap does any more.
    fn store_free(&mut self) {
        let cs = self.geo.cluster_size();
        let cb = self.geo.cluster_bits;
        let store = self.bitmap_store.as_deref_mut().expect("runs");
        let mut frees = std::mem::take(&mut store.frees);
        let entries = std::mem::take(&mut store.entries);
        store.sub = sub::DONE;
        let live = self.bitmaps.as_deref_mut().expect("bitmaps to store");
        if live.dir.1 > 0 && live.dir.0 != 0 {
            frees.push((live.dir.0, live.dir.1.div_ceil(cs)));
        }
        for (b, e) in live.list.iter_mut().zip(&entries) {
            b.disk = e.clone();
            b.bits = None;
            b.over_stored = false;
        }
        live.removed.clear();
        live.changed = false;
        let ext = self.layout.as_ref().and_then(|l| l.ext.bitmaps);
        live.dir = ext.map_or((0, 0), |e| (e.directory_offset, e.directory_size));
        for (host, count) in frees {
            for k in 0..count {
                self.queue_free(host + (k << cb));
            }
        }
        self.sync_bitmap_info();
    }
}
