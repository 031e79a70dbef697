//! Loading the stored refcounts, `compare_refcounts`, and the repairs that follow it: leak
//! and refcount fixes written back per refblock, or the whole refcount structure rebuilt
//! (QEMU's `qcow2_check_refcounts` after the IMRT is built).

use std::collections::VecDeque;

use crate::format::refcount::REFTABLE_OFFSET_MASK;
use crate::format::Geometry;

use super::calc::Calc;
use super::imrt::RefArray;
use super::pass::{Block, Counts, Fix, Flow, Pass, Req, Stage};
use super::repair::{self, RebuildPlan};

/// One op of the rebuild, in order: refblocks, reftable, flush, header, flush.
#[derive(Clone, Copy, Debug)]
pub(super) enum RebuildOp {
    /// Write IMRT block `index` as the refblock at `offset`.
    Block(u64, u64),
    /// Write the new reftable.
    Table,
    Flush,
    /// Point the header at the new reftable (offset and size, 12 bytes at 48).
    Header,
}

/// The last cluster in `start..end` with a non-zero refcount.
pub(super) fn last_used(a: &RefArray, start: u64, end: u64) -> Option<u64> {
    let mut last = None;
    let mut from = start;
    while let Some(c) = a.next_used(from, end) {
        last = Some(c);
        from = c + 1;
    }
    last
}

impl Pass {
    /// Sizes the array of stored refcounts like the IMRT and starts loading it.
    pub(super) fn begin_load(&mut self) -> Flow {
        let nb = self.imrt.len();
        let geo = Geometry::new(self.img.cluster_bits, self.img.order);
        self.disk.free(&mut self.budget);
        self.disk = RefArray::new(&geo);
        if self.disk.grow(nb, &mut self.budget).is_err() {
            return self.out_of_memory();
        }
        self.blocks = vec![Block::Zero; self.disk.blocks() as usize];
        self.extra.clear();
        self.dirty.clear();
        self.stage = Stage::Load {
            block: 0,
            waiting: false,
        };
        Flow::Next
    }

    /// Reads the refblocks covering the file into the array of stored refcounts.
    pub(super) fn load(&mut self, mut block: u64, waiting: bool) -> Flow {
        let cs = self.img.cluster_size as usize;
        if waiting {
            match self.take() {
                Some(Ok((buf, _))) => {
                    self.disk
                        .block_mut(block)
                        .copy_from_slice(&buf.as_slice()[..cs]);
                    self.blocks[block as usize] = Block::Loaded;
                }
                Some(Err(e)) => self.blocks[block as usize] = Block::Failed(e),
                None => {
                    let off = self.reftable[block as usize] & REFTABLE_OFFSET_MASK;
                    self.stage = Stage::Load {
                        block,
                        waiting: true,
                    };
                    return self.read(off, cs as u64);
                }
            }
            block += 1;
        }
        while block < self.blocks.len() as u64 {
            let off = self
                .reftable
                .get(block as usize)
                .map_or(0, |e| e & REFTABLE_OFFSET_MASK);
            if off == 0 {
                block += 1;
                continue;
            }
            if !self.img.aligned(off) {
                self.blocks[block as usize] = Block::Unaligned;
                block += 1;
                continue;
            }
            self.stage = Stage::Load {
                block,
                waiting: true,
            };
            return self.read(off, cs as u64);
        }
        self.stage = Stage::Compare;
        Flow::Next
    }

    /// `compare_refcounts`.
    pub(super) fn compare(&mut self, fix: Fix) {
        let nb = self.imrt.len();
        let per = self.imrt.block_entries();
        let mut highest = 0u64;
        let mut b = 0u64;
        while b * per < nb {
            let start = b * per;
            let end = (start + per).min(nb);
            let state = self.blocks.get(b as usize).copied().unwrap_or(Block::Zero);
            let reason = match state {
                Block::Unaligned => Some("Input/output error".to_string()),
                Block::Failed(e) => Some(e.to_string()),
                Block::Zero | Block::Loaded => None,
            };
            if let Some(reason) = reason {
                if state == Block::Unaligned {
                    let off = self.reftable[b as usize] & REFTABLE_OFFSET_MASK;
                    self.signal_unaligned_refblock(b, off);
                }
                for c in start..end {
                    say!(self, "Can't get refcount for cluster {c}: {reason}");
                    self.counts.check_errors += 1;
                }
                b += 1;
                continue;
            }
            if end == start + per && self.disk.block(b) == self.imrt.block(b) {
                if let Some(h) = last_used(&self.imrt, start, end) {
                    highest = h;
                }
                b += 1;
                continue;
            }
            for c in start..end {
                let r1 = self.disk.get(c);
                let r2 = self.imrt.get(c);
                if r1 > 0 || r2 > 0 {
                    highest = c;
                }
                if r1 == r2 {
                    continue;
                }
                let fixable = if r1 == 0 {
                    self.rebuild = true;
                    false
                } else {
                    (r1 > r2 && fix.leaks) || (r1 < r2 && fix.errors)
                };
                let word = if fixable {
                    "Repairing"
                } else if r1 < r2 {
                    "ERROR"
                } else {
                    "Leaked"
                };
                say!(self, "{word} cluster {c} refcount={r1} reference={r2}");
                if fixable {
                    self.disk.set(c, r2);
                    self.dirty.insert(b);
                    if r1 > r2 {
                        self.counts.leaks_fixed += 1;
                    } else {
                        self.counts.corruptions_fixed += 1;
                    }
                } else if r1 < r2 {
                    self.counts.corruptions += 1;
                } else {
                    self.counts.leaks += 1;
                }
            }
            b += 1;
        }
        self.highest = Some(highest);
    }

    /// The comparison and QEMU's choice of repairs after it (`qcow2_check_refcounts`).
    pub(super) fn compare_stage(&mut self) -> Flow {
        if self.round == 2 {
            return self.after_rebuild();
        }
        self.pre_compare = self.counts;
        self.compare(Fix::default());
        if let Some(order) = self.reorder {
            return self.reorder_stage(order);
        }
        if self.rebuild && self.fix.errors {
            self.old_res = self.counts;
            say!(self, "Rebuilding refcount structure");
            let plan =
                match repair::plan_rebuild(&mut self.imrt, &mut self.budget, self.img.cluster_bits)
                {
                    Ok(plan) => plan,
                    Err(_) => {
                        self.counts.check_errors += 1;
                        say!(self, "ERROR allocating refblock: Cannot allocate memory");
                        return self.fail_with(super::pass::ENOMEM);
                    }
                };
            return self.start_rebuild(plan);
        }
        if self.fix.any() {
            if self.rebuild {
                say!(self, "ERROR need to rebuild refcount structures");
                self.counts.check_errors += 1;
                return self.fail();
            }
            if self.counts.leaks > 0 || self.counts.corruptions > 0 {
                self.counts = self.pre_compare;
                self.compare(self.fix);
                return self.begin_write_dirty();
            }
        }
        self.begin_copied()
    }

    /// Starts writing a planned refcount structure: refblocks, reftable, flush, header
    /// switch, flush (refused when a new block would overwrite metadata).
    pub(super) fn start_rebuild(&mut self, plan: RebuildPlan) -> Flow {
        let cs = self.img.cluster_size;
        for &(_, off) in &plan.refblocks {
            if let Some(what) = self.meta_map().overlap(off, cs, false) {
                return self.refuse_overlap(what, "ERROR writing refblock: Input/output error");
            }
        }
        let table_len = plan.reftable.len() as u64 * 8;
        if let Some(what) = self
            .meta_map()
            .overlap(plan.reftable_offset, table_len, false)
        {
            return self.refuse_overlap(what, "ERROR writing reftable: Input/output error");
        }
        let mut ops: VecDeque<RebuildOp> = plan
            .refblocks
            .iter()
            .map(|&(i, off)| RebuildOp::Block(i, off))
            .collect();
        ops.extend([
            RebuildOp::Table,
            RebuildOp::Flush,
            RebuildOp::Header,
            RebuildOp::Flush,
        ]);
        self.stage = Stage::Rebuild { plan, ops };
        Flow::Next
    }

    /// Writes the planned refcount structure, then recounts everything against it.
    pub(super) fn rebuild(&mut self, plan: RebuildPlan, mut ops: VecDeque<RebuildOp>) -> Flow {
        if let Some(Err(e)) = self.take() {
            return self.fail_io("ERROR writing the rebuilt refcount structure", e);
        }
        let Some(op) = ops.pop_front() else {
            // The header now points at the new structure.
            self.img.hdr.refcount_table_offset = plan.reftable_offset;
            self.img.hdr.refcount_table_clusters = plan.reftable_clusters;
            self.img.hdr.refcount_order = self.img.order;
            self.switched = true;
            self.reftable = plan.reftable;
            self.meta_map = None;
            self.counts.corruptions = 0;
            self.counts.leaks = 0;
            self.counts.allocated = 0;
            self.counts.fragmented = 0;
            self.counts.compressed = 0;
            self.rebuild = false;
            self.imrt.clear();
            self.round = 2;
            self.stage = Stage::Calc(Calc::Start);
            return Flow::Next;
        };
        let req = match op {
            RebuildOp::Block(i, off) => Req::Write {
                offset: off,
                data: self.imrt.block(i).to_vec(),
            },
            RebuildOp::Table => {
                let data = plan.reftable.iter().flat_map(|e| e.to_be_bytes()).collect();
                Req::Write {
                    offset: plan.reftable_offset,
                    data,
                }
            }
            RebuildOp::Flush => Req::Flush,
            RebuildOp::Header => match self.reorder {
                None => {
                    let mut data = plan.reftable_offset.to_be_bytes().to_vec();
                    data.extend_from_slice(&plan.reftable_clusters.to_be_bytes());
                    Req::Write { offset: 48, data }
                }
                Some(order) => {
                    // Table, size and width in one write inside the first sector.
                    let mut h = self.img.hdr;
                    h.refcount_table_offset = plan.reftable_offset;
                    h.refcount_table_clusters = plan.reftable_clusters;
                    h.refcount_order = order;
                    let mut bytes = [0u8; 112];
                    h.encode(&mut bytes);
                    Req::Write {
                        offset: 48,
                        data: bytes[48..100].to_vec(),
                    }
                }
            },
        };
        self.stage = Stage::Rebuild { plan, ops };
        self.io(req)
    }

    /// The end of QEMU's rebuild branch: recounted, now free the old structures.
    pub(super) fn after_rebuild(&mut self) -> Flow {
        let mut fresh_leaks = 0;
        if self.fix.leaks {
            let saved = self.counts;
            self.counts = Counts::default();
            self.compare(Fix {
                leaks: true,
                errors: false,
            });
            if self.rebuild {
                say!(self, "ERROR rebuilt refcount structure is still broken");
            }
            fresh_leaks = self.counts.leaks;
            self.counts = saved;
        }
        let old = self.old_res;
        if self.counts.corruptions < old.corruptions {
            self.counts.corruptions_fixed += old.corruptions - self.counts.corruptions;
        }
        if self.counts.leaks < old.leaks {
            self.counts.leaks_fixed += old.leaks - self.counts.leaks;
        }
        self.counts.leaks += fresh_leaks;
        self.begin_write_dirty()
    }

    /// Starts writing back the refblocks the comparison repaired.
    pub(super) fn begin_write_dirty(&mut self) -> Flow {
        let blocks: Vec<u64> = std::mem::take(&mut self.dirty).into_iter().collect();
        self.stage = Stage::WriteDirty {
            blocks,
            next: 0,
            flushed: false,
        };
        Flow::Next
    }

    /// Writes the repaired refblocks, then flushes them before any COPIED repair.
    pub(super) fn write_dirty(&mut self, blocks: Vec<u64>, next: usize, flushed: bool) -> Flow {
        if let Some(Err(e)) = self.take() {
            return self.fail_io("ERROR: could not write a refcount block", e);
        }
        if blocks.is_empty() {
            return self.begin_copied();
        }
        if let Some(&b) = blocks.get(next) {
            let off = self.reftable[b as usize] & REFTABLE_OFFSET_MASK;
            let data = self.disk.block(b).to_vec();
            self.stage = Stage::WriteDirty {
                blocks,
                next: next + 1,
                flushed,
            };
            return self.io(Req::Write { offset: off, data });
        }
        if !flushed {
            self.stage = Stage::WriteDirty {
                blocks,
                next,
                flushed: true,
            };
            return self.io(Req::Flush);
        }
        self.begin_copied()
    }
}
