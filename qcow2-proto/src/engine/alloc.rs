//! Host cluster allocation and refcount updates.
//!
//! New clusters come from clusters freed during this session first, then from a first-fit
//! scan that starts at cluster 1 when the image opens and only moves forward (`next_free`):
//! holes left by earlier sessions are reused, and past the last used cluster sequential
//! allocations get contiguous host space. Every candidate's refcount is read before use (a
//! crash may leave refcounted clusters past the end of the file). Decrements wait in
//! `pending_frees` until a write-back cycle made the dropping entry durable (rule B).
//!
//! While the image grows, refcounts are written ahead of allocation ([`Reserve`]): the
//! write-back copies of the refcount block at the allocation point count the next clusters
//! as used too, so that allocating them later changes nothing on disk. A flush cycle after
//! allocating writes then writes no refcount block and needs no barrier before the L2
//! tables (rule A holds: the counts are durable already).

use std::ops::Range;

use crate::error::{CorruptReason, RequestError, Structure, Table};
use crate::format::refcount::{self, REFTABLE_OFFSET_MASK};
use crate::format::Geometry;
use crate::format::MAX_REFTABLE_BYTES;
use crate::io::{IoError, IoKind, IoOp, Segment};

use super::cache::{Lookup, SlotState};
use super::overlap::Own;
use super::{Block, Free, Image, Purpose, TABLE_CHUNK};

/// Host offsets must fit the 56-bit offset fields.
const MAX_HOST: u64 = 1 << 56;
/// Freed clusters remembered for reuse.
const FREE_LIST_CAP: usize = 4096;
/// Pending decrement runs before writers wait for a write-back cycle.
pub(super) const PENDING_FREES_CAP: usize = 16384;

/// Refcounts written ahead of allocation: clusters `next_free..end`, all free in memory
/// and all in the refcount block `block`, are counted as used in that block's write-back
/// copies. In memory every count stays exact (checks, snapshots and repairs see the truth);
/// only the disk is ahead. A crash leaks the clusters counted ahead and not used (at most
/// an eighth of [`ImageConfig::grow_step`](crate::ImageConfig::grow_step), inside the file;
/// `qemu-img check` reports them as leaked). Image operations and close drop the
/// reservation first, and the block is written again with its true counts.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Reserve {
    /// Cache key (host offset) of the refcount block; 0: no reservation.
    block: u64,
    /// The reservation is clusters `next_free..end`.
    end: u64,
    /// The last write-back copy of `block` counted the clusters from `next_free` (as it was
    /// then) up to here: allocating them needs no refcount write.
    written: u64,
}

/// Sets the counts of host `clusters` (all covered by refcount block `block`) to `v`.
fn set_counts(geo: Geometry, block: &mut [u8], clusters: Range<u64>, v: u64) {
    for c in clusters {
        let idx = (c & (geo.rb_entries() - 1)) as usize;
        refcount::set(block, geo.refcount_order, idx, v);
    }
}

impl Image {
    /// The refcount cache slot of the block covering host cluster `c`; `None` when no block
    /// covers it (every refcount there is 0).
    pub(super) fn rb_slot(&mut self, c: u64) -> Result<Option<u32>, Block> {
        let ri = (c >> self.geo.rb_bits) as usize;
        let Some(&entry) = self.reftable.get(ri) else {
            return Ok(None);
        };
        let off = entry & REFTABLE_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !self.geo.aligned(off) {
            return Err(self
                .corrupt(Structure::RefcountTable, entry, CorruptReason::Unaligned)
                .into());
        }
        if off >= self.file_end && !self.rb.contains(off) {
            // A new block is cached (dirty) before it is written: only others are past EOF.
            return Err(self
                .corrupt(Structure::RefcountBlock, off, CorruptReason::PastEof)
                .into());
        }
        if let Some(s) = self.metadata_overlap(off, self.geo.cluster_size(), Own::Refblock) {
            return Err(self
                .corrupt(Structure::RefcountBlock, off, CorruptReason::Overlap(s))
                .into());
        }
        self.cached(true, off)
    }

    /// Slot of the cached unit at `key` (refcount cache when `rb`), loading it if needed.
    pub(super) fn cached(&mut self, rb: bool, key: u64) -> Result<Option<u32>, Block> {
        let cache = if rb { &mut self.rb } else { &mut self.l2 };
        match cache.lookup(key) {
            Lookup::Hit(i) => Ok(Some(i)),
            Lookup::Loading => Err(Block::Park),
            Lookup::Failed(e) => {
                cache.forget(key);
                Err(Block::Fail(super::io_error(e)))
            }
            Lookup::Miss => {
                if !self.op_room(1) {
                    return Err(Block::Park);
                }
                let cache = if rb { &mut self.rb } else { &mut self.l2 };
                let Some((slot, buf)) = cache.start_load(key) else {
                    // Every slot is dirty or loading: write-back, or a finished load, makes
                    // room. A poisoned engine writes nothing back any more.
                    let loading = cache.slots.iter().any(|s| s.state == SlotState::Loading);
                    if let (Some(e), false) = (self.poisoned, loading) {
                        return Err(Block::Fail(e));
                    }
                    self.cycle_wanted = true;
                    self.cache_full = true;
                    return Err(Block::Park);
                };
                self.issue_buf(Purpose::Load { rb, slot }, IoKind::Read, key, buf);
                Err(Block::Park)
            }
        }
    }

    pub(super) fn load_done(&mut self, rb: bool, slot: u32, op: IoOp, result: Result<(), IoError>) {
        let Some(Segment::Buf(buf)) = op.segments.into_iter().next() else {
            return;
        };
        let ok = result.is_ok();
        let cache = if rb { &mut self.rb } else { &mut self.l2 };
        cache.finish_load(slot, buf, result);
        if rb && ok {
            self.uncount_reserve(slot);
        }
    }

    pub(super) fn refcount(&self, slot: u32, c: u64) -> u64 {
        let idx = (c & (self.geo.rb_entries() - 1)) as usize;
        refcount::get(self.rb.data(slot), self.geo.refcount_order, idx)
    }

    pub(super) fn set_refcount(&mut self, slot: u32, c: u64, v: u64) {
        let idx = (c & (self.geo.rb_entries() - 1)) as usize;
        let order = self.geo.refcount_order;
        refcount::set(self.rb.data_mut(slot), order, idx, v);
    }

    /// Allocates up to `want` contiguous host clusters (exactly `want` when `exact`) with
    /// refcount 1; returns the first host offset and the count.
    pub(super) fn alloc_clusters(&mut self, want: u64, exact: bool) -> Result<(u64, u64), Block> {
        let cb = self.geo.cluster_bits;
        if !exact {
            while let Some(c) = self.free_list.pop() {
                match self.rb_slot(c) {
                    Ok(Some(slot)) if self.refcount(slot, c) == 0 => {
                        self.set_refcount(slot, c, 1);
                        self.forget_cluster(c);
                        return Ok((c << cb, 1));
                    }
                    Ok(_) => continue,
                    Err(b) => {
                        self.free_list.push(c);
                        return Err(b);
                    }
                }
            }
        }
        if exact {
            self.ensure_refblocks(want)?;
        }
        let mut c = self.next_free;
        let mut start = c;
        let mut count = 0u64;
        while count < want {
            if (c + 1) << cb > MAX_HOST {
                if count > 0 && !exact {
                    break;
                }
                self.undo(start, count);
                return Err(RequestError::NoSpace.into());
            }
            match self.rb_slot(c) {
                Ok(Some(slot)) => {
                    if self.refcount(slot, c) != 0 {
                        if count > 0 && !exact {
                            break;
                        }
                        self.undo(start, count);
                        c += 1;
                        start = c;
                        count = 0;
                        continue;
                    }
                    self.count_new(slot, c);
                    count += 1;
                    c += 1;
                }
                Ok(None) => {
                    if count > 0 && !exact {
                        break;
                    }
                    self.undo(start, count);
                    if self.window {
                        return Err(Block::Park);
                    }
                    self.new_refblock(c)?;
                    c = self.next_free;
                    start = c;
                    count = 0;
                }
                Err(b) => {
                    if count > 0 && !exact {
                        break;
                    }
                    self.undo(start, count);
                    self.next_free = start;
                    return Err(b);
                }
            }
        }
        self.next_free = start + count;
        for i in 0..count {
            self.forget_cluster(start + i);
        }
        self.allocated_up_to(self.next_free);
        self.extend_reserve();
        Ok((start << cb, count))
    }

    /// Counts cluster `c` (at `next_free` or past it, in slot `slot`) as used by a new
    /// allocation; without dirtying the block when its last write-back copy counted it.
    fn count_new(&mut self, slot: u32, c: u64) {
        let r = self.reserve;
        let s = &self.rb.slots[slot as usize];
        if r.block != 0 && s.key == r.block && c < r.written && !s.dirty {
            set_counts(self.geo, self.rb.data_as_on_disk(slot), c..c + 1, 1);
        } else {
            self.set_refcount(slot, c, 1);
        }
    }

    /// Keeps the reservation at least half of an eighth of the grow step ahead of
    /// `next_free`, inside the host space allocated ahead (what a crash leaks lies inside
    /// the file once a barrier covered that space) and in the block holding `next_free` when it is cached (nothing is
    /// loaded for it). The block is marked dirty: its next write-back copy counts the new
    /// clusters.
    fn extend_reserve(&mut self) {
        let want = (self.grow_step() / 8) >> self.geo.cluster_bits;
        if want == 0 || self.exclusive_tasks > 0 || self.poisoned.is_some() {
            return;
        }
        let c = self.next_free;
        let r = self.reserve;
        if r.block != 0 && r.end >= c + want / 2 {
            return;
        }
        let ri = c >> self.geo.rb_bits;
        let Some(key) = self
            .reftable
            .get(ri as usize)
            .map(|&e| e & REFTABLE_OFFSET_MASK)
            .filter(|&k| k != 0)
        else {
            return;
        };
        let Lookup::Hit(slot) = self.rb.lookup(key) else {
            return;
        };
        if r.block != 0 && r.block != key {
            // On to the next block: the old one is written again with its true counts.
            let Lookup::Hit(old) = self.rb.lookup(r.block) else {
                return;
            };
            self.rb.data_mut(old);
            self.reserve = Reserve::default();
        }
        let cap = (c + want)
            .min((ri + 1) << self.geo.rb_bits)
            .min(self.file_end >> self.geo.cluster_bits);
        let from = if self.reserve.block == key {
            self.reserve.end.max(c)
        } else {
            c
        };
        let mut end = from;
        while end < cap && self.refcount(slot, end) == 0 {
            end += 1;
        }
        if end > from {
            self.reserve.block = key;
            self.reserve.end = end;
            self.rb.data_mut(slot);
        }
    }

    /// Ends the reservation: when a copy counting it went out, the block is marked dirty,
    /// so that the next cycle writes its true counts (loaded first if need be when `load`;
    /// else, when it is not cached, the clusters stay counted on disk: leaked).
    pub(super) fn drop_reserve(&mut self, load: bool) -> Result<(), Block> {
        let r = self.reserve;
        if r.block != 0 && r.written != 0 {
            let slot = if load {
                self.cached(true, r.block)?
            } else {
                match self.rb.lookup(r.block) {
                    Lookup::Hit(i) => Some(i),
                    _ => None,
                }
            };
            if let Some(slot) = slot {
                self.rb.data_mut(slot);
            }
        }
        self.reserve = Reserve::default();
        Ok(())
    }

    /// Whether host clusters `c..c + count` are counted on disk already, by a write-back
    /// copy of the reserved refcount block that went out before now: durable by the
    /// barrier that follows its level, which comes before any L2 write-back taken later
    /// (rule A holds for an entry pointing at them whenever it is set).
    pub(super) fn counted_ahead(&self, c: u64, count: u64) -> bool {
        let r = self.reserve;
        let ri = c >> self.geo.rb_bits;
        count > 0
            && r.block != 0
            && (c + count - 1) >> self.geo.rb_bits == ri
            && c + count <= r.written
            && self
                .reftable
                .get(ri as usize)
                .is_some_and(|&e| e & REFTABLE_OFFSET_MASK == r.block)
    }

    /// A write-back copy of refcount block `key` is about to go out in `buf`: the
    /// reservation's clusters are counted in it.
    pub(super) fn count_reserve(&mut self, key: u64, buf: &mut [u8]) {
        let r = self.reserve;
        if r.block == 0 || r.block != key || r.end <= self.next_free || self.read_only {
            return;
        }
        set_counts(self.geo, buf, self.next_free..r.end, 1);
        self.reserve.written = r.end;
    }

    /// Refcount block `slot` was just loaded: the counts its written copies hold ahead of
    /// allocation are free in memory.
    fn uncount_reserve(&mut self, slot: u32) {
        let r = self.reserve;
        if r.block == 0 || self.rb.slots[slot as usize].key != r.block {
            return;
        }
        let (geo, clusters) = (self.geo, self.next_free..r.written);
        set_counts(geo, self.rb.data_as_on_disk(slot), clusters, 0);
    }

    /// Clusters below `end` may be in use: the file keeps them at close; and when they
    /// come within half a step of the host space allocated ahead, the next step is
    /// allocated ([`ImageConfig::grow_step`](crate::ImageConfig::grow_step)).
    fn allocated_up_to(&mut self, end: u64) {
        let end = end << self.geo.cluster_bits;
        self.alloc_high = self.alloc_high.max(end);
        let step = self.grow_step();
        if step == 0 {
            return;
        }
        if end.saturating_add(step / 2) <= self.file_end || !self.op_room(1) {
            return;
        }
        let from = self.file_end.max(end);
        let to = (from + step).next_multiple_of(1 << 20);
        // (Best effort: a failure shows again in the writes that need the space.)
        self.issue_bare(Purpose::Mark, IoKind::Allocate { len: to - from }, from);
        self.grew = true;
        self.ahead_end = to;
    }

    /// An in-place guest write of `len` bytes at host `at`: when it continues a sequential
    /// stream (one is followed: the last in-place write's), host space inside the file is
    /// allocated ahead of it, a step at a time. The
    /// clusters of a metadata-preallocated image are holes until written, and the file
    /// system takes writes into space allocated but not yet written faster than into holes
    /// (sequential 8 KiB writes at depth 1: about twice as fast here). Allocating changes no
    /// content (written clusters keep theirs, holes still read as zero), so nothing orders
    /// it; a failure shows, if anywhere, in the writes themselves.
    pub(super) fn fill_ahead(&mut self, at: u64, len: u64) {
        let end = at + len;
        let sequential = at == self.inplace_end;
        self.inplace_end = end;
        let step = self.grow_step();
        if !sequential || step == 0 || end.saturating_add(step / 2) <= self.fill_end {
            return;
        }
        let from = self.fill_end.max(end);
        let to = (from + step).next_multiple_of(1 << 20).min(self.file_end);
        if to > from {
            if !self.op_room(1) {
                return; // (The next write of the stream tries again.)
            }
            self.issue_bare(Purpose::Mark, IoKind::Allocate { len: to - from }, from);
        }
        self.fill_end = to.max(end);
    }

    /// The step host space is allocated ahead in: never more than the guest disk itself (a
    /// small image gets small steps); 0 when the image does not grow ahead (nor while a
    /// metadata preallocation runs: its clusters are never written).
    fn grow_step(&self) -> u64 {
        if self.read_only || self.has_data_file() || self.sparse_prealloc {
            return 0;
        }
        self.config.grow_step.min(
            self.hdr
                .size
                .checked_next_multiple_of(1 << 20)
                .unwrap_or(u64::MAX),
        )
    }

    /// Host space for a compressed stream of `n` bytes (less than a cluster): after the
    /// last stream, in its cluster, when it fits there (one more reference on that
    /// cluster), else at the start of fresh clusters (QEMU's `qcow2_alloc_bytes`, without
    /// its spilling into a following cluster). Returns the byte offset.
    pub(super) fn alloc_bytes(&mut self, n: u64) -> Result<u64, Block> {
        let cb = self.geo.cluster_bits;
        let cs = self.geo.cluster_size();
        if let Some(at) = self.free_bytes {
            let c = at >> cb;
            if at + n <= (c + 1) << cb {
                if let Some(slot) = self.rb_slot(c)? {
                    let rc = self.refcount(slot, c);
                    let max = u64::MAX >> (64 - (1u32 << self.geo.refcount_order));
                    if rc > 0 && rc < max {
                        self.set_refcount(slot, c, rc + 1);
                        self.free_bytes = Some(at + n).filter(|e| e % cs != 0);
                        return Ok(at);
                    }
                }
            }
            self.free_bytes = None;
        }
        let (host, _) = self.alloc_clusters(n.div_ceil(cs), true)?;
        self.free_bytes = Some(host + n).filter(|e| e % cs != 0);
        Ok(host)
    }

    /// Makes sure refcount blocks exist for the `want` clusters from `next_free`, placing
    /// missing ones before that run, so that an exact run can span several blocks.
    fn ensure_refblocks(&mut self, want: u64) -> Result<(), Block> {
        loop {
            let start = self.next_free;
            let (first, last) = (
                start >> self.geo.rb_bits,
                (start + want - 1) >> self.geo.rb_bits,
            );
            let Some(ri) =
                (first..=last).find(|&ri| self.reftable.get(ri as usize).is_none_or(|&e| e == 0))
            else {
                return Ok(());
            };
            if self.window {
                return Err(Block::Park);
            }
            if ri as usize >= self.reftable.len() && ri != first {
                // Grow the table first (the block for `first`'s range lands inside it).
                let c = self.next_free;
                let (off, _) = self.alloc_clusters(1, false)?;
                self.queue_free(off);
                let _ = c;
                if (ri as usize) < self.reftable.len() {
                    continue;
                }
                return Err(RequestError::TooLarge(Table::Refcount).into());
            }
            let (off, _) = self.alloc_clusters(1, false)?;
            let covered = self.reftable.get(ri as usize).is_some_and(|&e| e != 0);
            if covered {
                // The allocation itself created the block (self-describing): give back the
                // cluster it returned.
                self.queue_free(off);
                continue;
            }
            self.rb.forget(off);
            let Some(_slot) = self.rb.insert_zeroed(off) else {
                self.queue_free(off);
                self.cycle_wanted = true;
                return Err(Block::Park);
            };
            self.set_reftable(ri as usize, off);
            self.rt_dirty[ri as usize * 8 / TABLE_CHUNK] = true;
        }
    }

    /// Counts clusters with a non-zero refcount below byte `task.end`, up to `limit`, a
    /// refcount block at a time (`task.pos` is the next cluster, `task.aux` the count).
    pub(super) fn step_count_refcounted(&mut self, t: u32, limit: u64) -> bool {
        let end = self.task(t).end.div_ceil(self.geo.cluster_size());
        loop {
            let task = self.task(t);
            let (c, count) = (task.pos, task.aux);
            if c >= end || count >= limit || task.error.is_some() {
                return true;
            }
            let first = c >> self.geo.rb_bits << self.geo.rb_bits;
            let stop = end.min(first + self.geo.rb_entries());
            match self.rb_slot(c) {
                Ok(Some(slot)) => {
                    let n = (c..stop).filter(|&x| self.refcount(slot, x) != 0).count() as u64;
                    let task = self.task(t);
                    task.aux = (count + n).min(limit);
                }
                Ok(None) => {}
                Err(Block::Park) => return false,
                Err(Block::Fail(e)) => self.task(t).error = Some(e),
            }
            self.task(t).pos = stop;
        }
    }

    /// Takes back refcounts just set by an unfinished exact allocation.
    fn undo(&mut self, start: u64, count: u64) {
        for c in start..start + count {
            if let Ok(Some(slot)) = self.rb_slot(c) {
                self.set_refcount(slot, c, 0);
            }
        }
    }

    /// A new refcount block at host cluster `c`, describing itself.
    fn new_refblock(&mut self, c: u64) -> Result<(), Block> {
        let ri = (c >> self.geo.rb_bits) as usize;
        if ri >= self.reftable.len() {
            return self.grow_reftable(c, ri);
        }
        let key = c << self.geo.cluster_bits;
        self.rb.forget(key);
        let Some(slot) = self.rb.insert_zeroed(key) else {
            self.cycle_wanted = true;
            return Err(Block::Park);
        };
        self.set_refcount(slot, c, 1);
        self.set_reftable(ri, key);
        self.rt_dirty[ri * 8 / TABLE_CHUNK] = true;
        self.next_free = c + 1;
        self.allocated_up_to(self.next_free);
        Ok(())
    }

    /// A bigger refcount table: a new refcount block at `c`, the table right after it (both
    /// described by that block); the next write-back cycle writes them, syncs and switches
    /// the header to the new table before it writes any L2 slice or L1 entry (which may
    /// reference clusters only the new table counts), and the old table is freed after that
    /// cycle.
    fn grow_reftable(&mut self, c: u64, ri: usize) -> Result<(), Block> {
        let cs = self.geo.cluster_size();
        let entries = (ri + 1).max(self.reftable.len() * 3 / 2 + 1) as u64;
        let bytes = self.geo.round_up(entries * 8);
        if bytes > MAX_REFTABLE_BYTES {
            return Err(RequestError::TooLarge(Table::Refcount).into());
        }
        let k = bytes / cs;
        if (c + k) >> self.geo.rb_bits != ri as u64 {
            return Err(RequestError::TooLarge(Table::Refcount).into());
        }
        let key = c << self.geo.cluster_bits;
        self.rb.forget(key);
        let Some(slot) = self.rb.insert_zeroed(key) else {
            self.cycle_wanted = true;
            return Err(Block::Park);
        };
        for j in 0..=k {
            self.set_refcount(slot, c + j, 1);
        }
        let old_off = self.hdr.refcount_table_offset >> self.geo.cluster_bits;
        for j in 0..u64::from(self.hdr.refcount_table_clusters) {
            self.queue_free((old_off + j) << self.geo.cluster_bits);
        }
        self.reftable.resize((bytes / 8) as usize, 0);
        self.set_reftable(ri, key);
        self.rt_dirty = vec![false; (bytes as usize).div_ceil(TABLE_CHUNK)];
        self.rt_relocated = true;
        self.hdr.refcount_table_offset = (c + 1) << self.geo.cluster_bits;
        self.hdr.refcount_table_clusters = k as u32;
        self.hdr.encode(self.header_buf.as_mut_slice());
        self.header_dirty = true;
        self.next_free = c + 1 + k;
        self.allocated_up_to(self.next_free);
        Ok(())
    }

    /// Drops cached metadata of a cluster that changes owner.
    fn forget_cluster(&mut self, c: u64) {
        let cs = self.geo.cluster_size();
        let key = c << self.geo.cluster_bits;
        self.rb.forget(key);
        let unit = self.l2.unit as u64;
        let mut off = 0;
        while off < cs {
            self.l2.forget(key + off);
            off += unit;
        }
    }

    /// Queues the decrement of host cluster `host` (rule B: applied after the next cycle).
    pub(super) fn queue_free(&mut self, host: u64) {
        let (tag, op_seq) = (self.cycles_started, self.op_seq);
        if let Some(last) = self.pending_frees.back_mut() {
            let end = last.host + (last.count << self.geo.cluster_bits);
            if last.tag == tag && last.op_seq == op_seq && end == host {
                last.count += 1;
                return;
            }
        }
        self.pending_frees.push_back(Free {
            host,
            count: 1,
            tag,
            op_seq,
        });
    }

    /// Applies every decrement that is now safe; `Park` while a refcount block loads.
    ///
    /// When the refcount cache is full of dirty blocks, the rest waits for the next cycle
    /// (which writes those blocks first) instead of for this one, which would never end.
    pub(super) fn release_frees(&mut self, cycle: u64) -> Result<(), Block> {
        let cb = self.geo.cluster_bits;
        self.cache_full = false;
        while let Some(f) = self.pending_frees.front().copied() {
            if f.tag >= cycle || self.oldest_data_op() <= f.op_seq {
                return Ok(());
            }
            let c = f.host >> cb;
            match self.rb_slot(c) {
                Ok(Some(slot)) => {
                    let rc = self.refcount(slot, c);
                    if rc > 0 {
                        self.set_refcount(slot, c, rc - 1);
                        if rc == 1 && self.free_list.len() < FREE_LIST_CAP {
                            self.free_list.push(c);
                        }
                        if rc == 1 && self.free_bytes.is_some_and(|b| b >> cb == c) {
                            // Its last stream went: the cluster may be reused for anything.
                            self.free_bytes = None;
                        }
                    }
                }
                Ok(None) => {}
                Err(Block::Park) if self.cache_full && self.rb.any_dirty() => {
                    // Only write-back makes room: end this cycle, the next one writes.
                    self.cache_full = false;
                    self.cycle_wanted = true;
                    return Ok(());
                }
                // Loads in flight make room; their completions resume this level (ending
                // the cycle instead would start the next at once, and spin).
                Err(Block::Park) => {
                    self.cache_full = false;
                    return Err(Block::Park);
                }
                Err(Block::Fail(_)) => {}
            }
            let front = self.pending_frees.front_mut().expect("front exists");
            front.count -= 1;
            front.host += 1 << cb;
            if front.count == 0 {
                self.pending_frees.pop_front();
            }
        }
        Ok(())
    }
}
