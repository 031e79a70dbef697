//! Storing persistent bitmaps back at close (part of the close task, which runs alone).
//!
//! 1. Everything durable first.
//! 2. Each bitmap this session changed: its stored bits read and ORed with the session's
//!    (unless it was cleared), then written anew (non-zero data clusters, then its table,
//!    contiguous); the stored table is kept to free its clusters later. Removed bitmaps'
//!    tables are read for the same reason.
//! 3. The new directory (in-use flags cleared, except on bitmaps that were stale already)
//!    is written; a cycle makes every new cluster's refcount durable (rules A, D).
//! 4. The header switches to it: when only the first sector of cluster 0 changes, by one
//!    (atomic) sector write; else in three durable steps, so that a torn multi-sector
//!    write can never leave a bitmaps extension that claims to be valid: the bitmaps
//!    autoclear bit is cleared (one sector), the extension area is rewritten, the bit is
//!    set again (one sector). A crash in between leaves every bitmap stale (the
//!    extension is not trusted without the bit).
//! 5. The old directory, tables and data clusters are freed (rule B).

use crate::error::RequestError;
use crate::format::bitmap::{
    self, data_bytes, DirEntry, AUTO, IN_USE, TABLE_ENTRY_OFFSET, TABLE_ENTRY_RESERVED,
};
use std::collections::VecDeque;

use crate::format::extension::{
    bitmaps_payload, relayout, Extensions, FeatureTable, RawBitmapsExtValue, Relayout, BITMAPS,
};
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
    /// The header switch still to write: stages of sector writes of cluster 0, each
    /// followed by a flush.
    stages: VecDeque<Vec<(u64, IoBuf)>>,
}

mod sub {
    pub const START: u8 = 0;
    pub const NEXT: u8 = 1;
    pub const READ: u8 = 2;
    pub const WRITE: u8 = 3;
    pub const DIR: u8 = 4;
    pub const DURABLE: u8 = 5;
    pub const SWITCH: u8 = 6;
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
                    self.plan_switch()
                        .map(|()| self.store_mut().sub = sub::SWITCH)
                }
                sub::SWITCH => {
                    match self.store_mut().stages.pop_front() {
                        Some(stage) => {
                            for (at, buf) in stage {
                                self.issue_buf(Purpose::Header { task: t }, IoKind::Write, at, buf);
                                self.task(t).inflight += 1;
                            }
                            self.store_sync_then(sub::SWITCH);
                        }
                        None => self.store_mut().sub = sub::FREE,
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
        let mut limit = u64::MAX;
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
            limit = b.stored_limit;
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
            // (Tables were checked at open: this is a removed stale bitmap's, left leaked.)
            let live = self.bitmaps.as_deref_mut().expect("bitmaps to store");
            match live.list.get_mut(i) {
                // Its stored bits cannot be read: it can only be stored as stale.
                Some(b) if !table_only => b.stale = true,
                Some(b) => {
                    b.bits = Some(bits);
                    store.sub = sub::WRITE;
                }
                None => store.next += 1,
            }
            return;
        }
        let mut read = BitmapRead::new(table, bits, table_only);
        read.limit = limit;
        self.bitmap_read = Some(Box::new(read));
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
        // Only a table whose every entry is sound (reserved bits clear, cluster-aligned,
        // inside the file) has its clusters freed; any other is leaked, never freed blindly.
        let table = read.table.as_deref().unwrap_or_default();
        let sound = |e: u64| {
            let host = e & TABLE_ENTRY_OFFSET;
            e & TABLE_ENTRY_RESERVED == 0
                && (host == 0 || e & 1 == 0 && host % cs == 0 && host + cs <= self.file_end)
        };
        let ok = ok && table.iter().all(|&e| sound(e));
        let store = self.bitmap_store.as_deref_mut().expect("runs");
        if ok {
            for &e in table {
                let host = e & TABLE_ENTRY_OFFSET;
                if host != 0 {
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

    /// Plans the header switch to the new bitmaps extension, as stages that each keep
    /// cluster 0 valid whatever part of them a crash lets through (a sector write is
    /// atomic; bytes nothing points at may be anything):
    ///
    /// * *the extension stays:* its 24 bytes rewritten; when they straddle two sectors,
    ///   with the autoclear bit cleared around the write;
    /// * *the first bitmap:* the extension is appended where the end marker was. The
    ///   backing file name, if the longer list would reach it, is first copied further
    ///   and the header pointed at the copy; the data and a new end marker are written
    ///   past the old end marker; then its 8-byte head over the old end marker (one
    ///   sector); then the autoclear bit;
    /// * *the last bitmap gone:* the bit cleared, then (the extension last in the list)
    ///   an end marker over its head. An extension followed by others is laid out anew,
    ///   which a torn write could damage, as QEMU's header rewrites could.
    ///
    /// The engine's header and cluster 0 take their final state at once.
    fn plan_switch(&mut self) -> Result<(), Block> {
        let cs = self.geo.cluster_size() as usize;
        let limit = self.header_buf.len().min(cs);
        let mut img = self.header_buf.as_slice()[..limit].to_vec();
        let mut hdr = self.hdr;
        let header_len = hdr.header_length as usize;
        let backing = (
            hdr.backing_file_offset as usize,
            hdr.backing_file_size as usize,
        );
        let area = if backing.0 == 0 {
            limit
        } else {
            backing.0.min(limit)
        };
        let format_error = |e| RequestError::Options(crate::error::CreateError::Format(e));
        let exts = Extensions::parse(&img, header_len, area).map_err(format_error)?;
        let new = self.bitmap_store.as_deref().expect("runs").ext;
        let mut stages = VecDeque::new();
        let bit = |hdr: &mut crate::format::header::Header, img: &mut Vec<u8>, on: bool| {
            let was = hdr.autoclear_features;
            if on {
                hdr.autoclear_features |= autoclear::BITMAPS;
            } else {
                hdr.autoclear_features &= !autoclear::BITMAPS;
            }
            hdr.encode(img);
            was != hdr.autoclear_features
        };
        let no_room = || Block::Fail(RequestError::TooManyBitmaps);
        match (exts.bitmaps_at, new) {
            (Some(at), Some(b)) => {
                // (Bit clear around a write that could tear, or when it was clear.)
                let straddles = (at + 8) / 512 != (at + 31) / 512;
                let before = img.clone();
                if straddles && bit(&mut hdr, &mut img, false) {
                    push_stage(&mut stages, &before, &img);
                }
                let before = img.clone();
                img[at + 8..at + 32].copy_from_slice(&bitmaps_payload(b));
                push_stage(&mut stages, &before, &img);
                let before = img.clone();
                if bit(&mut hdr, &mut img, true) {
                    push_stage(&mut stages, &before, &img);
                }
            }
            (None, Some(b)) => {
                let end = exts.end_offset;
                let need = end + 40;
                if need > limit {
                    return Err(no_room());
                }
                let before = img.clone();
                if bit(&mut hdr, &mut img, false) {
                    push_stage(&mut stages, &before, &img);
                }
                if backing.0 != 0 && need > backing.0 {
                    // The name first moves out of the way.
                    let (off, len) = backing;
                    let to = (off + len).max(need).next_multiple_of(8);
                    if to + len > limit {
                        return Err(no_room());
                    }
                    let before = img.clone();
                    img.copy_within(off..off + len, to);
                    push_stage(&mut stages, &before, &img);
                    let before = img.clone();
                    hdr.backing_file_offset = to as u64;
                    hdr.encode(&mut img);
                    push_stage(&mut stages, &before, &img);
                }
                let before = img.clone();
                img[end + 8..end + 32].copy_from_slice(&bitmaps_payload(b));
                img[end + 32..end + 40].fill(0);
                push_stage(&mut stages, &before, &img);
                let before = img.clone();
                img[end..end + 4].copy_from_slice(&BITMAPS.to_be_bytes());
                img[end + 4..end + 8].copy_from_slice(&24u32.to_be_bytes());
                if end + 8 <= 512 {
                    bit(&mut hdr, &mut img, true);
                }
                push_stage(&mut stages, &before, &img);
                if end + 8 > 512 {
                    let before = img.clone();
                    bit(&mut hdr, &mut img, true);
                    push_stage(&mut stages, &before, &img);
                }
            }
            (Some(at), None) => {
                let before = img.clone();
                bit(&mut hdr, &mut img, false);
                if at + 32 == exts.end_offset {
                    if at >= 512 {
                        push_stage(&mut stages, &before, &img);
                    }
                    let before = if at >= 512 { img.clone() } else { before };
                    img[at..at + 8].fill(0);
                    push_stage(&mut stages, &before, &img);
                } else {
                    push_stage(&mut stages, &before, &img);
                    let name_end = (backing.0 + backing.1).min(limit);
                    let spec = Relayout {
                        header_len,
                        area,
                        new_header_len: header_len,
                        name: (backing.0 != 0).then(|| &img[backing.0.min(limit)..name_end]),
                        format: exts.backing_format.map(|r| &img[r.start..r.start + r.len]),
                        features: FeatureTable::Keep,
                        drop_bitmaps: true,
                    };
                    let laid = relayout(&img, &spec).map_err(format_error)?;
                    let (bytes, name_at, _) = laid.ok_or_else(no_room)?;
                    let before = img.clone();
                    let used = bytes.len();
                    img[..used].copy_from_slice(&bytes);
                    let old_end = (exts.end_offset + 8).max(backing.0 + backing.1).min(limit);
                    if old_end > used {
                        img[used..old_end].fill(0);
                    }
                    hdr.backing_file_offset = name_at;
                    hdr.encode(&mut img);
                    push_stage(&mut stages, &before, &img);
                }
            }
            (None, None) => {
                let before = img.clone();
                if bit(&mut hdr, &mut img, false) {
                    push_stage(&mut stages, &before, &img);
                }
            }
        }
        self.header_buf.as_mut_slice()[..limit].copy_from_slice(&img);
        self.hdr = hdr;
        self.hdr_disk = hdr;
        if let Some(l) = self.layout.as_mut() {
            l.ext.bitmaps = new;
        }
        self.store_mut().stages = stages;
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
            b.stored_limit = u64::MAX;
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

/// Adds the stage that turns `before` into `after`: one write of the sectors between the
/// first and the last byte that differ (none when nothing does).
fn push_stage(stages: &mut VecDeque<Vec<(u64, IoBuf)>>, before: &[u8], after: &[u8]) {
    let diff = |i: &usize| before[*i] != after[*i];
    let Some(first) = (0..after.len()).find(diff) else {
        return;
    };
    let last = (0..after.len()).rfind(diff).expect("one differs");
    let start = first / 512 * 512;
    let end = (last + 1).next_multiple_of(512).min(after.len());
    let mut buf = IoBuf::zeroed(end - start);
    buf.as_mut_slice().copy_from_slice(&after[start..end]);
    stages.push_back(vec![(start as u64, buf)]);
}
