//! `check_oflag_copied`: the COPIED flag of every active L1 and L2 entry against the
//! refcount now stored, rewritten where repairs allow; and the metadata overlap test that
//! guards every in-place repair write.

use crate::format::entry::COPIED;
use crate::format::refcount::{self, REFTABLE_OFFSET_MASK};

use super::pass::{Block, Flow, Pass, Req, Stage};
use super::repair::{self, MetaMap};
use super::walk::{self, Cur, Kind, TableCursor};

/// What the COPIED check waits for.
#[derive(Debug)]
pub(super) enum CopiedWait {
    Nothing,
    /// The next chunk of the active L1 table.
    Chunk,
    /// Refblock `index`, for a refcount past the loaded ones.
    Refblock(u64),
    /// The repaired L1 entry (its new value) to be written.
    L1Write(u64),
    /// The L2 table at this offset.
    L2Read(u64),
    /// The repaired L2 table to be written.
    L2Write,
}

/// An L2 table being scanned.
#[derive(Debug)]
pub(super) struct L2Scan {
    offset: u64,
    table: Vec<u8>,
    /// The next entry to look at.
    next: u64,
    /// Entries repaired in `table`, not yet written.
    dirty: u64,
}

/// `check_oflag_copied`: where it is in the active L1 table.
#[derive(Debug)]
pub(super) struct Copied {
    repair: bool,
    l1: TableCursor,
    /// The current L1 entry's own flag was checked.
    checked: bool,
    wait: CopiedWait,
    scan: Option<L2Scan>,
}

/// A stored refcount looked up.
pub(super) enum Lookup {
    Value(u64),
    /// It cannot be read (QEMU skips the entry).
    Error,
    /// The refblock's reftable entry is not cluster aligned: `(index, offset)`.
    Unaligned(u64, u64),
    /// Refblock `(index, offset)` must be read first.
    Read(u64, u64),
}

/// What the COPIED scan of an L2 table needs next.
pub(super) enum ScanOut {
    /// The table is done (and written, if it had to be).
    Finished,
    /// The repaired table would overwrite this metadata.
    Overlap(&'static str),
    /// Read refblock `(index, offset)`.
    Refblock(u64, u64),
    /// Write the repaired table: `(offset, bytes)`.
    Write(u64, Vec<u8>),
}

/// Refblocks kept for COPIED lookups past the loaded range.
pub(super) const EXTRA_BLOCKS: usize = 8;

impl Pass {
    /// Starts `check_oflag_copied`; repairs only under `-r all`, or `-r leaks` with
    /// nothing else left (as QEMU decides).
    pub(super) fn begin_copied(&mut self) -> Flow {
        let repair = if self.fix.errors {
            true
        } else if self.fix.leaks {
            self.counts.check_errors == 0 && self.counts.corruptions == 0 && self.counts.leaks == 0
        } else {
            false
        };
        let h = self.img.hdr;
        self.stage = Stage::Copied(Copied {
            repair,
            l1: TableCursor::new(h.l1_table_offset, u64::from(h.l1_size)),
            checked: false,
            wait: CopiedWait::Nothing,
            scan: None,
        });
        Flow::Next
    }

    /// The refcount of `cluster` as stored now (after this pass's repairs).
    pub(super) fn stored(&self, cluster: u64) -> Lookup {
        let index = cluster >> self.img.rb_bits;
        let Some(&e) = self.reftable.get(index as usize) else {
            return Lookup::Value(0);
        };
        let off = e & REFTABLE_OFFSET_MASK;
        if off == 0 {
            return Lookup::Value(0);
        }
        if !self.img.aligned(off) {
            return Lookup::Unaligned(index, off);
        }
        match self.blocks.get(index as usize) {
            Some(Block::Loaded) => return Lookup::Value(self.disk.get(cluster)),
            Some(Block::Failed(_) | Block::Unaligned) => return Lookup::Error,
            _ => {}
        }
        match self.extra.get(&index) {
            Some(Some(block)) => {
                let i = (cluster & ((1 << self.img.rb_bits) - 1)) as usize;
                Lookup::Value(refcount::get(block, self.img.order, i))
            }
            Some(None) => Lookup::Error,
            None => Lookup::Read(index, off),
        }
    }

    /// Steps the COPIED check over the active L1 table and its L2 tables.
    pub(super) fn copied(&mut self, mut c: Copied) -> Flow {
        let cs = self.img.cluster_size;
        loop {
            match std::mem::replace(&mut c.wait, CopiedWait::Nothing) {
                CopiedWait::Nothing => {}
                CopiedWait::Chunk => match self.take() {
                    Some(Ok((buf, _))) => c.l1.fill(buf.as_slice()),
                    Some(Err(e)) => return self.fail_io("ERROR: Could not read the L1 table", e),
                    None => {}
                },
                CopiedWait::Refblock(index) => {
                    if self.extra.len() >= EXTRA_BLOCKS {
                        self.extra.clear();
                    }
                    let block = match self.take() {
                        Some(Ok((buf, _))) => Some(buf.as_slice()[..cs as usize].to_vec()),
                        _ => None,
                    };
                    self.extra.insert(index, block);
                }
                CopiedWait::L1Write(value) => match self.take() {
                    Some(Ok(_)) => {
                        c.l1.set_current(value);
                        self.counts.corruptions -= 1;
                        self.counts.corruptions_fixed += 1;
                    }
                    Some(Err(e)) => return self.fail_io("ERROR: Could not write the L1 entry", e),
                    None => {}
                },
                CopiedWait::L2Read(offset) => match self.take() {
                    Some(Ok((buf, _))) => {
                        c.scan = Some(L2Scan {
                            offset,
                            table: buf.as_slice().to_vec(),
                            next: 0,
                            dirty: 0,
                        });
                        c.checked = false;
                        c.l1.advance();
                    }
                    Some(Err(e)) => return self.fail_io("ERROR: Could not read L2 table", e),
                    None => {}
                },
                CopiedWait::L2Write => match self.take() {
                    Some(Ok(_)) => {
                        if let Some(s) = c.scan.take() {
                            self.counts.corruptions -= s.dirty;
                            self.counts.corruptions_fixed += s.dirty;
                        }
                    }
                    Some(Err(e)) => return self.fail_io("ERROR: Could not write L2 table", e),
                    None => {}
                },
            }
            if c.scan.is_some() {
                match self.copied_scan(&mut c) {
                    ScanOut::Finished => continue,
                    ScanOut::Overlap(what) => {
                        return self.refuse_overlap(
                            what,
                            "ERROR: Could not write L2 table; metadata overlap check failed: Input/output error",
                        )
                    }
                    ScanOut::Refblock(index, off) => {
                        c.wait = CopiedWait::Refblock(index);
                        self.stage = Stage::Copied(c);
                        return self.read(off, cs);
                    }
                    ScanOut::Write(offset, data) => {
                        c.wait = CopiedWait::L2Write;
                        self.stage = Stage::Copied(c);
                        return self.io(Req::Write { offset, data });
                    }
                }
            }
            match c.l1.peek() {
                Cur::Done => {
                    return self.begin_snap_fix();
                }
                Cur::Read { offset, len } => {
                    c.wait = CopiedWait::Chunk;
                    self.stage = Stage::Copied(c);
                    return self.read(offset, len as u64);
                }
                Cur::Entry(i, e) => {
                    let l2 = e & walk::L1_OFFSET_MASK;
                    if l2 == 0 {
                        c.l1.advance();
                        continue;
                    }
                    if !c.checked {
                        let r = match self.stored(l2 >> self.img.cluster_bits) {
                            Lookup::Value(r) => r,
                            Lookup::Error => {
                                c.l1.advance();
                                continue;
                            }
                            Lookup::Unaligned(index, off) => {
                                self.signal_unaligned_refblock(index, off);
                                c.l1.advance();
                                continue;
                            }
                            Lookup::Read(index, off) => {
                                c.wait = CopiedWait::Refblock(index);
                                self.stage = Stage::Copied(c);
                                return self.read(off, cs);
                            }
                        };
                        c.checked = true;
                        if (r == 1) != (e & COPIED != 0) {
                            self.counts.corruptions += 1;
                            let word = if c.repair { "Repairing" } else { "ERROR" };
                            say!(self, "{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={r}");
                            if c.repair {
                                let value = if r == 1 { e | COPIED } else { e & !COPIED };
                                c.wait = CopiedWait::L1Write(value);
                                let offset = self.img.hdr.l1_table_offset + i * 8;
                                self.stage = Stage::Copied(c);
                                return self.io(Req::Write {
                                    offset,
                                    data: value.to_be_bytes().to_vec(),
                                });
                            }
                        }
                    }
                    c.wait = CopiedWait::L2Read(l2);
                    self.stage = Stage::Copied(c);
                    return self.read(l2, cs);
                }
            }
        }
    }

    /// Scans the current L2 table of the COPIED check, up to the next op it needs.
    pub(super) fn copied_scan(&mut self, c: &mut Copied) -> ScanOut {
        let Some(scan) = c.scan.as_mut() else {
            return ScanOut::Finished;
        };
        while scan.next < self.img.l2_entries {
            let at = (scan.next * self.img.entry_bytes) as usize;
            let e = walk::be64(&scan.table, at);
            let kind = walk::classify(e, self.img.subclusters, self.img.data_file);
            if matches!(kind, Kind::Normal | Kind::ZeroAlloc) {
                let r = if self.img.data_file {
                    1
                } else {
                    match self.stored((e & walk::L2_OFFSET_MASK) >> self.img.cluster_bits) {
                        Lookup::Value(r) => r,
                        Lookup::Error => {
                            scan.next += 1;
                            continue;
                        }
                        Lookup::Unaligned(index, off) => {
                            self.signal_unaligned_refblock(index, off);
                            scan.next += 1;
                            continue;
                        }
                        Lookup::Read(index, off) => return ScanOut::Refblock(index, off),
                    }
                };
                if (r == 1) != (e & COPIED != 0) {
                    self.counts.corruptions += 1;
                    let word = if c.repair { "Repairing" } else { "ERROR" };
                    say!(
                        self,
                        "{word} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={r}"
                    );
                    if c.repair {
                        let value = if r == 1 { e | COPIED } else { e & !COPIED };
                        scan.table[at..at + 8].copy_from_slice(&value.to_be_bytes());
                        scan.dirty += 1;
                    }
                }
            }
            scan.next += 1;
        }
        if scan.dirty == 0 {
            c.scan = None;
            return ScanOut::Finished;
        }
        let offset = scan.offset;
        let table = scan.table.clone();
        let cs = self.img.cluster_size;
        if let Some(what) = self.meta_map().overlap(offset, cs, true) {
            return ScanOut::Overlap(what);
        }
        ScanOut::Write(offset, table)
    }

    /// The metadata map for overlap checks, built on first use.
    pub(super) fn meta_map(&mut self) -> &MetaMap {
        if self.meta_map.is_none() {
            let h = self.img.hdr;
            let cs = self.img.cluster_size;
            let mut map = MetaMap::new(self.img.cluster_bits);
            map.add(
                h.l1_table_offset,
                u64::from(h.l1_size) * 8,
                repair::ACTIVE_L1,
            );
            map.add(
                h.refcount_table_offset,
                self.reftable.len() as u64 * 8,
                repair::REFTABLE,
            );
            map.add(h.snapshots_offset, self.snaps_size, repair::SNAPSHOT_TABLE);
            for s in &self.snaps {
                map.add(s.l1_offset, u64::from(s.l1_size) * 8, repair::INACTIVE_L1);
            }
            for &l2 in &self.active_l2s {
                map.add(l2, cs, repair::ACTIVE_L2);
            }
            for &e in &self.reftable {
                let off = e & REFTABLE_OFFSET_MASK;
                if off != 0 {
                    map.add(off, cs, repair::REFBLOCK);
                }
            }
            if let Some((_, off, size)) = self.img.bitmaps {
                map.add(off, size, repair::BITMAP_DIRECTORY);
            }
            map.finish();
            self.meta_map = Some(map);
        }
        self.meta_map.get_or_insert_with(MetaMap::default)
    }

    /// A repair write would overwrite metadata: QEMU's `qcow2_signal_corruption` (mark
    /// the image corrupt) and the check fails.
    pub(super) fn refuse_overlap(&mut self, what: &str, then: &str) -> Flow {
        if !self.signaled {
            // Said once: QEMU suppresses further corruption events.
            say!(
                self,
                "qcow2: Marking image as corrupt: Preventing invalid write on metadata (overlaps with {what}); further corruption events will be suppressed"
            );
        }
        say!(self, "{then}");
        self.counts.check_errors += 1;
        self.mark_corrupt = true;
        self.signaled = true;
        self.poisoned = true;
        self.fail()
    }
}
