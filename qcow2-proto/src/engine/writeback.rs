//! Write-back cycles: dirty metadata goes to disk in dependency order, with one barrier
//! between levels and none per request.
//!
//! ```text
//! refcount blocks (+ a relocated refcount table)   rule A: counts before references
//!   fdatasync                                      (also covers completed data: rule C)
//! refcount-table entries, or the header switch     rule D: refblocks before their entries
//!   to a relocated refcount table                  rule A: a count is durable only once its
//!   fdatasync                                      block is reachable
//! L2 slices                                        rule D: tables before pointers
//!   fdatasync
//! L1 entries
//!   fdatasync
//! header fields (table switches, size, bits)
//!   fdatasync
//! queued refcount decrements applied in memory     rule B: written by the next cycle
//! ```
//!
//! A cycle covers what completed before it began: whoever waits for it asked then (a flush
//! sent while one runs waits for the next). Data completed while it runs is left to the
//! next cycle, so a cycle that wrote L2 slices ends with their barrier and adds none.
//!
//! Empty levels are skipped with their barrier, so any number of allocating writes followed
//! by one guest flush costs two `fdatasync`s once the L2 tables exist; a cycle that links a
//! new refcount block costs one more. While the image grows into fresh space it costs one:
//! the counts were written ahead ([`Reserve`](super::alloc::Reserve)), and data whose
//! clusters read as zero either way ([`Alloc::fresh`](super::Alloc)) need not be durable
//! before the L2 slices, so the first barrier is skipped and the last covers that data.
//! A guest's writes in place wait for the cycle's last barrier too (no mapping depends on
//! them); an image operation's stay ordered (a resize's zeroes past the old end come before
//! the new size). Allocating writes into such fresh, counted-ahead space do not wait for a
//! cycle at all: they are linked while it takes its copies (the engine's invariant 4), so
//! with flushes back to back a growing image's writes still finish at the speed of their
//! data.
//!
//! Refcount-table entries get a level of their own: an L2 entry written next to the
//! refcount-table entry of the block holding its cluster's count could reach the disk
//! without it, and after a crash that cluster would be referenced with refcount 0. For the
//! same reason a relocated refcount table is switched to there, not with the other header
//! fields: the header written then is the durable one with only the refcount-table fields
//! changed (a new size, say, must still wait for the tables written after it).

use crate::format::header::Header;
use crate::io::{IoBuf, IoError, IoKind, IoOp, Segment, Target};

use super::{put_be64, Block, Image, Pool, Purpose, TABLE_CHUNK};

#[derive(Debug, Clone, Copy, Eq, PartialEq, PartialOrd, Ord)]
enum Level {
    Refblocks,
    Sync1,
    RefTable,
    SyncRt,
    Tables,
    Sync2,
    L1,
    Sync3,
    Header,
    Sync4,
    Frees,
}

#[derive(Debug)]
pub(super) struct Cycle {
    /// This cycle's number (`cycles_started` when it began).
    no: u64,
    level: Level,
    /// Ops of the current level still outstanding.
    pending: u32,
    /// Whether the current level issued all its ops.
    issued: bool,
    /// Whether anything was written since the last barrier.
    wrote: bool,
    /// Whether a barrier went out in this cycle: it covers every write completed before
    /// the cycle began, the only ones a task waiting for this cycle may have completed.
    synced: bool,
    /// Whether this cycle wrote a relocated refcount table (the header switches to it in
    /// the refcount-table level).
    rt_moved: bool,
    /// File length the barrier in flight makes durable (`len_done` when it was issued).
    covers: u64,
}

impl Image {
    /// Starts a cycle when one is wanted, and moves the current one along.
    pub(super) fn wb_pump(&mut self) {
        loop {
            if self.poisoned.is_some() {
                self.cycle = None;
                return;
            }
            let Some(cycle) = self.cycle.as_mut() else {
                // A read-only engine has nothing to write back, but one that turned
                // read-only on finding corruption still writes what it changed before (and
                // the corrupt bit), so that no dirty slot stays stuck in its caches.
                if !self.cycle_wanted
                    || self.read_only && !self.unwritten()
                    || !self.cycle_has_work()
                {
                    self.cycle_wanted = false;
                    return;
                }
                self.cycle_wanted = false;
                self.cycles_started += 1;
                self.window = true;
                self.cycle = Some(Cycle {
                    no: self.cycles_started,
                    level: Level::Refblocks,
                    pending: 0,
                    issued: false,
                    wrote: false,
                    synced: false,
                    rt_moved: false,
                    covers: 0,
                });
                continue;
            };
            if cycle.pending > 0 {
                return;
            }
            if cycle.issued {
                let next = match cycle.level {
                    Level::Refblocks => Level::Sync1,
                    Level::Sync1 => Level::RefTable,
                    Level::RefTable => Level::SyncRt,
                    Level::SyncRt => Level::Tables,
                    Level::Tables => Level::Sync2,
                    Level::Sync2 => Level::L1,
                    Level::L1 => Level::Sync3,
                    Level::Sync3 => Level::Header,
                    Level::Header => Level::Sync4,
                    Level::Sync4 => Level::Frees,
                    Level::Frees => {
                        self.cycles_done = cycle.no;
                        self.cycle = None;
                        self.wake_all();
                        continue;
                    }
                };
                cycle.level = next;
                cycle.issued = false;
                continue;
            }
            let level = cycle.level;
            let done = match level {
                Level::Refblocks => self.wb_caches(true),
                Level::RefTable => self.wb_reftable_switch() && self.wb_table(false),
                Level::Tables => self.wb_caches(false),
                Level::L1 => self.wb_table(true),
                Level::Header => self.wb_header(),
                Level::Sync1 | Level::SyncRt | Level::Sync2 | Level::Sync3 | Level::Sync4 => {
                    self.wb_sync(level)
                }
                Level::Frees => {
                    let no = self.cycle.as_ref().map_or(0, |c| c.no);
                    match self.release_frees(no) {
                        Ok(()) => true,
                        Err(Block::Park) => return,
                        Err(Block::Fail(_)) => true,
                    }
                }
            };
            if !done {
                // Out of op slots: resume when ops come back.
                return;
            }
            let cycle = self.cycle.as_mut().expect("cycle in progress");
            cycle.issued = true;
            if level == Level::Header {
                // Every copy of this cycle is taken: reference-creating changes may go on.
                self.window = false;
                self.link_ready_tables();
                self.wake_all();
            }
        }
    }

    /// A header write of `hdr` (with the extension area, which never changes while open),
    /// recorded as the header on disk.
    pub(super) fn header_as(&mut self, hdr: Header) -> IoBuf {
        let len = self.header_write_len();
        let mut buf = IoBuf::zeroed(len);
        buf.as_mut_slice()
            .copy_from_slice(&self.header_buf.as_slice()[..len]);
        hdr.encode(buf.as_mut_slice());
        self.hdr_disk = hdr;
        buf
    }

    fn wb_issue(&mut self, pool: Pool, slot: u32, offset: u64, buf: IoBuf) {
        self.issue_buf(
            Purpose::Writeback { pool, slot },
            IoKind::Write,
            offset,
            buf,
        );
        let cycle = self.cycle.as_mut().expect("cycle in progress");
        cycle.pending += 1;
        cycle.wrote = true;
    }

    /// Writes every dirty slot of one cache; false when op slots ran out.
    fn wb_caches(&mut self, rb: bool) -> bool {
        if rb && self.rt_relocated {
            if !self.op_room(1) {
                return false;
            }
            let bytes = self.reftable.len() * 8;
            let mut buf = IoBuf::zeroed(bytes);
            for (i, &e) in self.reftable.iter().enumerate() {
                put_be64(buf.as_mut_slice(), i, e);
            }
            self.rt_relocated = false;
            self.rt_dirty.iter_mut().for_each(|d| *d = false);
            let off = self.hdr.refcount_table_offset;
            self.wb_issue(Pool::None, 0, off, buf);
            self.cycle.as_mut().expect("cycle in progress").rt_moved = true;
        }
        let n = if rb {
            self.rb.slots.len()
        } else {
            self.l2.slots.len()
        };
        for i in 0..n as u32 {
            let cache = if rb { &mut self.rb } else { &mut self.l2 };
            if !cache.slots[i as usize].dirty {
                continue;
            }
            if !self.op_room(1) {
                return false;
            }
            let cache = if rb { &mut self.rb } else { &mut self.l2 };
            let (key, mut buf) = cache.take_dirty_copy(i);
            if rb {
                self.count_reserve(key, buf.as_mut_slice());
            }
            self.wb_issue(if rb { Pool::Rb } else { Pool::L2 }, i, key, buf);
        }
        true
    }

    /// Writes dirty 512-byte chunks of the L1 table (`l1`) or the refcount table.
    fn wb_table(&mut self, l1: bool) -> bool {
        let n = if l1 {
            self.l1_dirty.len()
        } else {
            self.rt_dirty.len()
        };
        for chunk in 0..n {
            let dirty = if l1 {
                self.l1_dirty[chunk]
            } else {
                self.rt_dirty[chunk]
            };
            if !dirty {
                continue;
            }
            if !self.op_room(1) {
                return false;
            }
            let per = TABLE_CHUNK / 8;
            let mut buf = IoBuf::zeroed(TABLE_CHUNK);
            let table = if l1 { &self.l1 } else { &self.reftable };
            for (j, &e) in table.iter().skip(chunk * per).take(per).enumerate() {
                put_be64(buf.as_mut_slice(), j, e);
            }
            let base = if l1 {
                self.hdr.l1_table_offset
            } else {
                self.hdr.refcount_table_offset
            };
            if l1 {
                self.l1_dirty[chunk] = false;
            } else {
                self.rt_dirty[chunk] = false;
            }
            self.wb_issue(Pool::None, 0, base + (chunk * TABLE_CHUNK) as u64, buf);
        }
        true
    }

    /// After a relocated refcount table (and the blocks it points at) is durable: the header
    /// as it is on disk, switched to the new table. The clusters counted only by the new
    /// table may be referenced by the L2 slices and L1 entries this cycle writes next.
    fn wb_reftable_switch(&mut self) -> bool {
        let cycle = self.cycle.as_ref().expect("cycle in progress");
        if !cycle.rt_moved {
            return true;
        }
        if !self.op_room(1) {
            return false;
        }
        self.cycle.as_mut().expect("cycle in progress").rt_moved = false;
        let mut hdr = self.hdr_disk;
        hdr.refcount_table_offset = self.hdr.refcount_table_offset;
        hdr.refcount_table_clusters = self.hdr.refcount_table_clusters;
        let buf = self.header_as(hdr);
        if hdr == self.hdr {
            // Nothing else changed: the header level has nothing left to write.
            self.header_dirty = false;
        }
        self.wb_issue(Pool::None, 0, 0, buf);
        true
    }

    fn wb_header(&mut self) -> bool {
        if !self.header_dirty {
            return true;
        }
        if !self.op_room(1) {
            return false;
        }
        self.header_dirty = false;
        let buf = self.header_as(self.hdr);
        self.wb_issue(Pool::None, 0, 0, buf);
        true
    }

    /// A barrier, when something was written since the last one. Completed data needs
    /// one too: before the mappings when it is ordered (rule C: the first barrier), else
    /// by the end of the cycle (the last) unless an earlier barrier of the cycle covered
    /// it. Data completed while the cycle runs is left to the next: whoever waits for this
    /// cycle asked before it began.
    fn wb_sync(&mut self, level: Level) -> bool {
        let cycle = self.cycle.as_ref().expect("cycle in progress");
        let data = match level {
            Level::Sync1 => self.ordered_data || self.unsynced_data && self.has_data_file(),
            Level::Sync4 => self.unsynced_data && !cycle.synced,
            _ => false,
        };
        if !(cycle.wrote || data) {
            return true;
        }
        if !self.op_room(2) {
            return false;
        }
        let data_file = self.unsynced_data && self.has_data_file();
        let covers = self.len_done;
        let cycle = self.cycle.as_mut().expect("cycle in progress");
        cycle.wrote = false;
        cycle.synced = true;
        cycle.pending += 1;
        cycle.covers = covers;
        self.unsynced_data = false;
        self.ordered_data = false;
        self.issue_bare(Purpose::Sync, IoKind::Flush, 0);
        if data_file {
            // Guest data in the external data file is durable before the metadata that
            // finds it (rule C) and at every guest flush.
            self.cycle.as_mut().expect("cycle in progress").pending += 1;
            self.issue_bare_at(Target::DataFile, Purpose::Sync, IoKind::Flush, 0);
        }
        true
    }

    pub(super) fn writeback_done(
        &mut self,
        pool: Pool,
        slot: u32,
        op: IoOp,
        result: Result<(), IoError>,
    ) {
        if let Some(Segment::Buf(buf)) = op.segments.into_iter().next() {
            match pool {
                Pool::L2 => {
                    self.l2.written(slot);
                    self.l2.return_spare(buf);
                }
                Pool::Rb => {
                    self.rb.written(slot);
                    self.rb.return_spare(buf);
                }
                Pool::None => {}
            }
        }
        if let Some(c) = self.cycle.as_mut() {
            c.pending -= 1;
        }
        if let Err(e) = result {
            self.poison(e);
        }
    }

    pub(super) fn sync_done(&mut self, result: Result<(), IoError>) {
        if let Some(c) = self.cycle.as_mut() {
            c.pending -= 1;
            if result.is_ok() {
                self.len_durable = self.len_durable.max(c.covers);
            }
        }
        if let Err(e) = result {
            self.poison(e);
        }
    }
}
