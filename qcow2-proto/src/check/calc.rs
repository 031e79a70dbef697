//! `calculate_refcounts`: the walk that builds the IMRT. It counts the header, the active
//! L1 and its L2 tables (gathering the allocation statistics), every snapshot's L1 and L2
//! tables, the snapshot table, the refcount table, the LUKS header, the bitmaps and the
//! refblocks, checking each entry on the way as `check_refcounts_l1`/`_l2` do.

use std::collections::VecDeque;

use crate::format::entry::{COPIED, L1_RESERVED, L2_RESERVED, ZERO};
use crate::format::refcount::{REFTABLE_OFFSET_MASK, REFTABLE_RESERVED};
use crate::format::MAX_L1_BYTES;

use super::imrt::OutOfMemory;
use super::pass::{alt_hex, Fix, Flow, Pass, Req, Stage};
use super::walk::{self, BitmapTable, Cur, Kind, TableCursor};

/// What an L1 walk waits for.
#[derive(Debug)]
pub(super) enum L1Wait {
    Nothing,
    /// The next chunk of the L1 table.
    Chunk,
    /// The L2 table at this offset.
    L2(u64),
    /// A repair write (or its flush).
    Fix,
}

/// Walking one L1 table and its L2 tables (`check_refcounts_l1`).
#[derive(Debug)]
pub(super) struct L1Walk {
    cursor: TableCursor,
    active: bool,
    wait: L1Wait,
    fixes: VecDeque<Req>,
}

/// The parts of `calculate_refcounts`, in order.
#[derive(Debug)]
pub(super) enum Calc {
    /// The header cluster, then the active L1.
    Start,
    /// Walking an L1 table: the active one (`None`) or snapshot `i`'s.
    L1(L1Walk, Option<usize>),
    /// Snapshot `i`'s L1 table is next.
    Snapshot(usize),
    /// The snapshot table, the refcount table and the LUKS header.
    Tail,
    /// The bitmap directory (`waiting` for its read).
    BitmapDir { waiting: bool },
    /// The bitmap tables, one by one.
    Bitmaps {
        list: Vec<BitmapTable>,
        idx: usize,
        cursor: Option<TableCursor>,
        waiting: bool,
    },
}

impl Pass {
    /// The repairs the walk may make: none in the recount after a rebuild.
    pub(super) fn calc_fix(&self) -> Fix {
        if self.round == 1 {
            self.fix
        } else {
            Fix::default()
        }
    }

    /// `qcow2_inc_refcounts_imrt`: one more reference to each cluster `offset..offset +
    /// size` touches. `Err` when the IMRT could not grow (counted as a check error).
    pub(super) fn inc(&mut self, offset: u64, size: u64) -> Result<(), OutOfMemory> {
        if size == 0 {
            return Ok(());
        }
        let cs = self.img.cluster_size;
        let end = offset.saturating_add(size);
        if end >= self.file_len.saturating_add(cs) {
            say!(
                self,
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {offset:#x} size {size:#x}"
            );
            self.counts.corruptions += 1;
            return Ok(());
        }
        let first = offset >> self.img.cluster_bits;
        let last = (end - 1) >> self.img.cluster_bits;
        for k in first..=last {
            if k >= self.imrt.len() && self.imrt.grow(k + 1, &mut self.budget).is_err() {
                self.counts.check_errors += 1;
                return Err(OutOfMemory);
            }
            let r = self.imrt.get(k);
            if r == self.imrt.max_value() {
                say!(
                    self,
                    "ERROR: overflow cluster offset={:#x}",
                    k << self.img.cluster_bits
                );
                say!(
                    self,
                    "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing"
                );
                self.counts.corruptions += 1;
                continue;
            }
            self.imrt.set(k, r + 1);
        }
        Ok(())
    }

    /// Steps `calculate_refcounts` from `calc`.
    pub(super) fn calc(&mut self, calc: Calc) -> Flow {
        match calc {
            Calc::Start => {
                let cs = self.img.cluster_size;
                if self.inc(0, cs).is_err() {
                    return self.out_of_memory();
                }
                let h = self.img.hdr;
                self.start_l1(h.l1_table_offset, h.l1_size, None)
            }
            Calc::L1(mut w, snapshot) => match self.l1_step(&mut w) {
                Some(flow) => {
                    if matches!(flow, Flow::Io(_)) {
                        self.stage = Stage::Calc(Calc::L1(w, snapshot));
                    }
                    flow
                }
                None => {
                    if self.img.data_file && !self.snaps.is_empty() && snapshot.is_none() {
                        say!(
                            self,
                            "ERROR {} snapshots in image with data file",
                            self.snaps.len()
                        );
                        self.counts.corruptions += 1;
                    }
                    self.stage = Stage::Calc(Calc::Snapshot(snapshot.map_or(0, |i| i + 1)));
                    Flow::Next
                }
            },
            Calc::Snapshot(i) => {
                let Some(s) = self.snaps.get(i) else {
                    self.stage = Stage::Calc(Calc::Tail);
                    return Flow::Next;
                };
                let (off, size) = (s.l1_offset, s.l1_size);
                if !self.img.aligned(off) {
                    let s = &self.snaps[i];
                    say!(
                        self,
                        "ERROR snapshot {} ({}) l1_offset={}: L1 table is not cluster aligned; snapshot table entry corrupted",
                        s.id,
                        s.name,
                        alt_hex(off)
                    );
                    self.counts.corruptions += 1;
                    self.stage = Stage::Calc(Calc::Snapshot(i + 1));
                    return Flow::Next;
                }
                if u64::from(size) > MAX_L1_BYTES / 8 {
                    let s = &self.snaps[i];
                    say!(
                        self,
                        "ERROR snapshot {} ({}) l1_size={}: L1 table is too large; snapshot table entry corrupted",
                        s.id,
                        s.name,
                        alt_hex(u64::from(size))
                    );
                    self.counts.corruptions += 1;
                    self.stage = Stage::Calc(Calc::Snapshot(i + 1));
                    return Flow::Next;
                }
                self.start_l1(off, size, Some(i))
            }
            Calc::Tail => {
                let h = self.img.hdr;
                let reftable_bytes = self.reftable.len() as u64 * 8;
                let end = h.snapshots_offset.saturating_add(self.snaps_size);
                self.snap_counted = end < self.file_len.saturating_add(self.img.cluster_size);
                let mut ok = self.inc(h.snapshots_offset, self.snaps_size).is_ok();
                ok = ok && self.inc(h.refcount_table_offset, reftable_bytes).is_ok();
                if let Some((off, len)) = self.img.fde {
                    ok = ok && self.inc(off, len).is_ok();
                }
                if !ok {
                    return self.out_of_memory();
                }
                self.stage = Stage::Calc(Calc::BitmapDir { waiting: false });
                Flow::Next
            }
            Calc::BitmapDir { waiting } => self.bitmap_directory(waiting),
            Calc::Bitmaps {
                list,
                idx,
                cursor,
                waiting,
            } => self.bitmap_tables(list, idx, cursor, waiting),
        }
    }

    /// Counts an L1 table (`None`: the active one) and starts walking it.
    pub(super) fn start_l1(&mut self, offset: u64, size: u32, snapshot: Option<usize>) -> Flow {
        if size > 0 && self.inc(offset, u64::from(size) * 8).is_err() {
            return self.out_of_memory();
        }
        let walk = L1Walk {
            cursor: TableCursor::new(offset, u64::from(size)),
            active: snapshot.is_none(),
            wait: L1Wait::Nothing,
            fixes: VecDeque::new(),
        };
        self.stage = Stage::Calc(Calc::L1(walk, snapshot));
        Flow::Next
    }

    /// Steps an L1 walk: `Some(flow)` to issue an op or stop, `None` when it is over.
    pub(super) fn l1_step(&mut self, w: &mut L1Walk) -> Option<Flow> {
        loop {
            match std::mem::replace(&mut w.wait, L1Wait::Nothing) {
                L1Wait::Nothing => {}
                L1Wait::Chunk => match self.take() {
                    Some(Ok((buf, _))) => w.cursor.fill(buf.as_slice()),
                    Some(Err(e)) => {
                        return Some(self.fail_io("ERROR: I/O error in check_refcounts_l1", e))
                    }
                    None => {}
                },
                L1Wait::L2(l2) => match self.take() {
                    Some(Ok((buf, _))) => match self.check_l2(buf.as_slice(), l2, w.active) {
                        Ok(fixes) => w.fixes = fixes,
                        Err(flow) => return Some(flow),
                    },
                    Some(Err(e)) => {
                        return Some(self.fail_io("ERROR: I/O error in check_refcounts_l2", e))
                    }
                    None => {
                        w.wait = L1Wait::L2(l2);
                        return Some(self.read(l2, self.img.cluster_size));
                    }
                },
                L1Wait::Fix => {
                    if let Some(Err(e)) = self.take() {
                        return Some(self.fail_io("ERROR: Failed to overwrite L2 table entry", e));
                    }
                }
            }
            if let Some(req) = w.fixes.pop_front() {
                w.wait = L1Wait::Fix;
                return Some(self.io(req));
            }
            match w.cursor.peek() {
                Cur::Done => return None,
                Cur::Read { offset, len } => {
                    w.wait = L1Wait::Chunk;
                    return Some(self.read(offset, len as u64));
                }
                Cur::Entry(_, e) => {
                    w.cursor.advance();
                    if e == 0 {
                        continue;
                    }
                    if e & L1_RESERVED != 0 {
                        say!(self, "ERROR found L1 entry with reserved bits set: {e:x}");
                        self.counts.corruptions += 1;
                    }
                    let l2 = e & walk::L1_OFFSET_MASK;
                    if w.active && self.round == 1 && self.fix.any() {
                        self.active_l2s.push(l2);
                    }
                    if self.inc(l2, self.img.cluster_size).is_err() {
                        return Some(self.out_of_memory());
                    }
                    if !self.img.aligned(l2) {
                        say!(self, "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted");
                        self.counts.corruptions += 1;
                    }
                    w.wait = L1Wait::L2(l2);
                    return Some(self.read(l2, self.img.cluster_size));
                }
            }
        }
    }

    /// `check_refcounts_l2` over one table; returns the entry repairs to write (each a
    /// write then a flush), already counted as fixed.
    pub(super) fn check_l2(
        &mut self,
        table: &[u8],
        l2_offset: u64,
        active: bool,
    ) -> Result<VecDeque<Req>, Flow> {
        let img = self.img.clone();
        let frag = active;
        let fix = self.calc_fix();
        let mut fixes = VecDeque::new();
        let mut next_contiguous = 0u64;
        for i in 0..img.l2_entries {
            let at = (i * img.entry_bytes) as usize;
            let mut e = walk::be64(table, at);
            let bitmap = if img.subclusters {
                walk::be64(table, at + 8)
            } else {
                0
            };
            let kind = walk::classify(e, img.subclusters, img.data_file);
            if kind != Kind::Compressed && e & L2_RESERVED != 0 {
                say!(self, "ERROR found l2 entry with reserved bits set: {e:x}");
                self.counts.corruptions += 1;
            }
            match kind {
                Kind::Compressed => {
                    if e & COPIED != 0 {
                        say!(
                            self,
                            "ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
                            e & walk::compressed_offset_mask(img.cluster_bits)
                        );
                        e &= !COPIED;
                        self.counts.corruptions += 1;
                    }
                    if img.data_file {
                        say!(
                            self,
                            "ERROR compressed cluster {i} with data file, entry={e:#x}"
                        );
                        self.counts.corruptions += 1;
                        continue;
                    }
                    if bitmap != 0 {
                        say!(self, "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry={e:#x}");
                        self.counts.corruptions += 1;
                        continue;
                    }
                    let (off, len) = walk::compressed_range(e, img.cluster_bits);
                    if self.inc(off, len).is_err() {
                        return Err(self.out_of_memory());
                    }
                    if frag {
                        self.counts.allocated += 1;
                        self.counts.compressed += 1;
                        self.counts.fragmented += 1;
                    }
                }
                Kind::ZeroAlloc | Kind::Normal => {
                    let off = e & walk::L2_OFFSET_MASK;
                    if (bitmap >> 32) & bitmap != 0 {
                        self.counts.corruptions += 1;
                        say!(self, "ERROR offset={off:x}: Allocated cluster has corrupted subcluster allocation bitmap");
                    }
                    if !img.aligned(off) {
                        self.counts.corruptions += 1;
                        let data = if img.subclusters {
                            bitmap & walk::BITMAP_ALL_ALLOC != 0
                        } else {
                            e & ZERO == 0
                        };
                        if data {
                            say!(self, "ERROR offset={off:x}: Data cluster is not properly aligned; L2 entry corrupted.");
                        } else if fix.errors {
                            say!(self, "Repairing offset={off:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.");
                            let entry_at = l2_offset + i * img.entry_bytes;
                            if let Some(what) =
                                self.meta_map().overlap(entry_at, img.entry_bytes, active)
                            {
                                return Err(
                                    self.refuse_overlap(what, "ERROR: Overlap check failed")
                                );
                            }
                            let mut data = Vec::with_capacity(img.entry_bytes as usize);
                            if img.subclusters {
                                let b = (bitmap | (bitmap << 32)) & walk::BITMAP_ALL_ZEROES;
                                data.extend_from_slice(&0u64.to_be_bytes());
                                data.extend_from_slice(&b.to_be_bytes());
                            } else {
                                data.extend_from_slice(&ZERO.to_be_bytes());
                            }
                            fixes.push_back(Req::Write {
                                offset: entry_at,
                                data,
                            });
                            fixes.push_back(Req::Flush);
                            self.counts.corruptions -= 1;
                            self.counts.corruptions_fixed += 1;
                            continue;
                        } else {
                            say!(self, "ERROR offset={off:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.");
                        }
                    }
                    if frag {
                        self.counts.allocated += 1;
                        if next_contiguous != 0 && off != next_contiguous {
                            self.counts.fragmented += 1;
                        }
                        next_contiguous = off.wrapping_add(img.cluster_size);
                    }
                    if !img.data_file && self.inc(off, img.cluster_size).is_err() {
                        return Err(self.out_of_memory());
                    }
                }
                Kind::ZeroPlain => {}
                Kind::Unallocated => {
                    if bitmap & walk::BITMAP_ALL_ALLOC != 0 {
                        self.counts.corruptions += 1;
                        say!(
                            self,
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                        );
                    }
                }
            }
            if img.hdr.version < 3 && !img.subclusters && e & ZERO != 0 && kind != Kind::Compressed
            {
                // QEMU's check accepts this (its runtime refuses to read it); say so without
                // counting, so the counters stay comparable with qemu-img's.
                say!(
                    self,
                    "Warning: zero cluster entry found in pre-v3 image: l2_entry={e:x}"
                );
            }
        }
        Ok(fixes)
    }

    /// `qcow2_check_bitmaps_refcounts`, first part: counts and parses the directory.
    pub(super) fn bitmap_directory(&mut self, waiting: bool) -> Flow {
        let Some((nb, off, size)) = self.img.bitmaps else {
            self.stage = Stage::Refblocks {
                i: 0,
                resizing: None,
            };
            return Flow::Next;
        };
        if !waiting {
            if self.inc(off, size).is_err() {
                return self.out_of_memory();
            }
            if size == 0 {
                self.counts.corruptions += 1;
                say!(self, "ERROR Requested bitmap directory size is zero");
                return self.fail_with(super::pass::EINVAL);
            }
            // QEMU's QCOW2_MAX_BITMAP_DIRECTORY_SIZE: never read a larger directory.
            if size > 64 << 20 {
                self.counts.corruptions += 1;
                say!(self, "ERROR Requested bitmap directory size is too big");
                return self.fail_with(super::pass::EINVAL);
            }
            self.stage = Stage::Calc(Calc::BitmapDir { waiting: true });
            return self.read(off, size);
        }
        match self.take() {
            Some(Ok((buf, _))) => {
                let cs = self.img.cluster_size;
                match walk::parse_bitmap_directory(buf.as_slice(), nb, cs, self.img.hdr.size) {
                    Ok(list) => {
                        self.stage = Stage::Calc(Calc::Bitmaps {
                            list,
                            idx: 0,
                            cursor: None,
                            waiting: false,
                        });
                        Flow::Next
                    }
                    Err(reason) => {
                        self.counts.corruptions += 1;
                        say!(self, "ERROR {reason}");
                        self.fail_with(super::pass::EINVAL)
                    }
                }
            }
            Some(Err(e)) => {
                self.counts.corruptions += 1;
                say!(self, "ERROR could not read the bitmap directory: {e}");
                self.fail_with(&e.to_string())
            }
            None => {
                self.stage = Stage::Calc(Calc::BitmapDir { waiting: true });
                self.read(off, size)
            }
        }
    }

    /// `qcow2_check_bitmaps_refcounts`, second part: each bitmap table and its clusters.
    pub(super) fn bitmap_tables(
        &mut self,
        list: Vec<BitmapTable>,
        mut idx: usize,
        mut cursor: Option<TableCursor>,
        waiting: bool,
    ) -> Flow {
        let cs = self.img.cluster_size;
        if waiting {
            match (self.take(), cursor.as_mut()) {
                (Some(Ok((buf, _))), Some(c)) => c.fill(buf.as_slice()),
                (Some(Err(_)), _) => {
                    // `bitmap_table_load` failed: one corruption, and the other bitmaps are
                    // not counted.
                    self.counts.corruptions += 1;
                    self.stage = Stage::Refblocks {
                        i: 0,
                        resizing: None,
                    };
                    return Flow::Next;
                }
                _ => {}
            }
        }
        loop {
            let Some(c) = cursor.as_mut() else {
                let Some(t) = list.get(idx).copied() else {
                    self.stage = Stage::Refblocks {
                        i: 0,
                        resizing: None,
                    };
                    return Flow::Next;
                };
                if self.inc(t.offset, u64::from(t.entries) * 8).is_err() {
                    return self.out_of_memory();
                }
                cursor = Some(TableCursor::new(t.offset, u64::from(t.entries)));
                continue;
            };
            match c.peek() {
                Cur::Done => {
                    cursor = None;
                    idx += 1;
                }
                Cur::Read { offset, len } => {
                    self.stage = Stage::Calc(Calc::Bitmaps {
                        list,
                        idx,
                        cursor,
                        waiting: true,
                    });
                    return self.read(offset, len as u64);
                }
                Cur::Entry(_, e) => {
                    c.advance();
                    let off = e & walk::BME_OFFSET_MASK;
                    if e & walk::BME_RESERVED != 0 || (off != 0 && (e & 1 != 0 || off % cs != 0)) {
                        self.counts.corruptions += 1;
                        continue;
                    }
                    if off != 0 && self.inc(off, cs).is_err() {
                        return self.out_of_memory();
                    }
                }
            }
        }
    }

    /// `check_refblocks`: counts each refblock, checks its reftable entry, and (with
    /// `-r all`) grows the file to cover refblocks past its end.
    pub(super) fn check_refblocks(&mut self, mut i: usize, resizing: Option<u64>) -> Flow {
        let cs = self.img.cluster_size;
        let fix = self.calc_fix();
        if let Some(off) = resizing {
            let resized = match self.take() {
                Some(Ok(_)) => {
                    let nb = self.file_len.div_ceil(cs);
                    if self.imrt.grow(nb, &mut self.budget).is_err() {
                        return self.out_of_memory();
                    }
                    if (off >> self.img.cluster_bits) < self.imrt.len() {
                        Ok(())
                    } else {
                        Err("Invalid argument".to_string())
                    }
                }
                Some(Err(e)) => Err(e.to_string()),
                None => {
                    self.stage = Stage::Refblocks {
                        i,
                        resizing: Some(off),
                    };
                    return self.io(Req::SetLen(off + cs));
                }
            };
            match resized {
                Ok(()) => {
                    self.counts.corruptions -= 1;
                    self.counts.corruptions_fixed += 1;
                    if self.inc(off, cs).is_err() {
                        return self.out_of_memory();
                    }
                }
                Err(msg) => {
                    self.rebuild = true;
                    say!(self, "ERROR could not resize image: {msg}");
                }
            }
            i += 1;
        }
        while i < self.reftable.len() {
            let e = self.reftable[i];
            let off = e & REFTABLE_OFFSET_MASK;
            let cluster = off >> self.img.cluster_bits;
            if e & REFTABLE_RESERVED != 0 {
                say!(self, "ERROR refcount table entry {i} has reserved bits set");
                self.counts.corruptions += 1;
                self.rebuild = true;
            } else if !self.img.aligned(off) {
                say!(self, "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted");
                self.counts.corruptions += 1;
                self.rebuild = true;
            } else if cluster >= self.imrt.len() {
                self.counts.corruptions += 1;
                say!(
                    self,
                    "{} refcount block {i} is outside image",
                    if fix.errors { "Repairing" } else { "ERROR" }
                );
                if fix.errors {
                    if off > i64::MAX as u64 - cs {
                        self.rebuild = true;
                        say!(self, "ERROR could not resize image: Invalid argument");
                    } else {
                        // A file whose IMRT could not be held is not grown at all: as
                        // when the file system refuses the size, the refcount structure
                        // is rebuilt instead.
                        // (The IMRT and the loaded refcounts both cover the file.)
                        let need = self.imrt.bytes_for(off / cs + 1).saturating_mul(2);
                        if need > self.budget.limit {
                            self.rebuild = true;
                            say!(self, "ERROR could not resize image: File too large");
                        } else {
                            self.stage = Stage::Refblocks {
                                i,
                                resizing: Some(off),
                            };
                            return self.io(Req::SetLen(off + cs));
                        }
                    }
                }
            } else if off != 0 {
                if self.inc(off, cs).is_err() {
                    return self.out_of_memory();
                }
                let r = self.imrt.get(cluster);
                if r != 1 {
                    say!(self, "ERROR refcount block {i} refcount={r}");
                    self.counts.corruptions += 1;
                    self.rebuild = true;
                }
            }
            i += 1;
        }
        self.begin_load()
    }
}
