//! `qcow2_check_fix_snapshot_table`: after the refcounts are repaired, a snapshot table
//! that `-r all` found wanting (extra data cut to 1 KiB, v3 entries with less than 16 bytes
//! of extra data) is written anew, as `qcow2_write_snapshots` writes it: in free clusters,
//! refcounts first, then the table, then the header pointer, each step flushed; the old
//! table's clusters are freed last.

use std::collections::VecDeque;

use crate::format::refcount::REFTABLE_OFFSET_MASK;

use super::pass::{Block, Flow, Pass, Req, Stage, NB_SNAPSHOTS_OFFSET};
use super::walk;

/// The rewrite in flight: its ops, in order, and where the new table goes.
#[derive(Debug)]
pub(crate) struct SnapFix {
    ops: VecDeque<Req>,
    offset: u64,
    len: u64,
}

impl Pass {
    /// Starts the rewrite when the snapshot check left corruptions that `-r all` fixes,
    /// else goes on to marking the image clean.
    pub(super) fn begin_snap_fix(&mut self) -> Flow {
        if self.snap.corruptions == 0 || !self.fix.errors || self.snap_table.is_empty() {
            self.stage = Stage::Clean(0);
            return Flow::Next;
        }
        match self.plan_snap_fix() {
            Some(fix) => {
                // QEMU's overlap check before the new table is written.
                let len = fix.len;
                if let Some(what) = self.meta_map().overlap(fix.offset, len, false) {
                    return self.refuse_overlap(
                        what,
                        "ERROR failed to update snapshot table: Input/output error",
                    );
                }
                self.stage = Stage::SnapFix(fix);
                Flow::Next
            }
            None => {
                self.counts.check_errors += 1;
                say!(
                    self,
                    "ERROR failed to update snapshot table: No space left on device"
                );
                self.fail_with(super::pass::ENOSPC)
            }
        }
    }

    /// Places the new table in the first run of clusters that nothing references and
    /// whose refblock exists, and lists the writes. `None` when there is no such run
    /// (QEMU would add a refblock; this repair refuses instead).
    fn plan_snap_fix(&mut self) -> Option<SnapFix> {
        let cs = self.img.cluster_size;
        let bits = self.img.cluster_bits;
        let disk_size = self.img.hdr.size / 512 * 512;
        let table = walk::build_snapshot_table(&self.snap_table, &self.snaps, disk_size);
        let clusters = (table.len() as u64).div_ceil(cs).max(1);
        let per = self.disk.block_entries();
        // The old table stays live until the header switches: never reuse its clusters,
        // even where the refcounts say they are free (a table running past the end of
        // the file is not counted).
        let old = self.img.hdr.snapshots_offset;
        let old_clusters = (old >> bits)..old.saturating_add(self.snaps_size).div_ceil(cs);
        let mut run = 0u64;
        let mut start = None;
        'blocks: for (b, state) in self.blocks.iter().enumerate() {
            if *state != Block::Loaded {
                run = 0;
                continue;
            }
            let first = b as u64 * per;
            for c in first..first + per {
                if self.disk.get(c) == 0 && self.imrt.get(c) == 0 && !old_clusters.contains(&c) {
                    run += 1;
                    if run == clusters {
                        start = Some(c + 1 - clusters);
                        break 'blocks;
                    }
                } else {
                    run = 0;
                }
            }
        }
        let start = start?;
        let mut ops = VecDeque::new();
        // Refcounts of the new table first.
        let mut touched = Vec::new();
        for c in start..start + clusters {
            self.disk.set(c, 1);
            touched.push(c / per);
        }
        self.push_blocks(&mut ops, &mut touched);
        let offset = start << bits;
        let len = table.len() as u64;
        ops.push_back(Req::Write {
            offset,
            data: table,
        });
        ops.push_back(Req::Flush);
        // The header switch: count and offset together.
        let mut header = self.img.hdr.nb_snapshots.to_be_bytes().to_vec();
        header.extend_from_slice(&offset.to_be_bytes());
        ops.push_back(Req::Write {
            offset: NB_SNAPSHOTS_OFFSET,
            data: header,
        });
        ops.push_back(Req::Flush);
        // Then free the old table: only where the walk counted it and the stored refcount
        // agrees with the references, so that a table overlapping other structures (or
        // running past the end of the file) never takes their refcounts down with it.
        if self.snaps_size > 0 && self.snap_counted {
            for c in old_clusters {
                let b = c / per;
                let r = self.disk.get(c);
                if self.blocks.get(b as usize) == Some(&Block::Loaded)
                    && r > 0
                    && r == self.imrt.get(c)
                {
                    self.disk.set(c, r - 1);
                    touched.push(b);
                }
            }
            self.push_blocks(&mut ops, &mut touched);
        }
        self.snap_table = Vec::new();
        Some(SnapFix { ops, offset, len })
    }

    /// Adds the writes of the refblocks in `touched` (then a flush) and empties it.
    fn push_blocks(&self, ops: &mut VecDeque<Req>, touched: &mut Vec<u64>) {
        touched.sort_unstable();
        touched.dedup();
        for &b in touched.iter() {
            ops.push_back(Req::Write {
                offset: self.reftable[b as usize] & REFTABLE_OFFSET_MASK,
                data: self.disk.block(b).to_vec(),
            });
        }
        if !touched.is_empty() {
            ops.push_back(Req::Flush);
        }
        touched.clear();
    }

    /// Steps the rewrite.
    pub(super) fn snap_fix(&mut self, mut fix: SnapFix) -> Flow {
        if let Some(Err(e)) = self.take() {
            self.counts.check_errors += 1;
            say!(self, "ERROR failed to update snapshot table: {e}");
            return self.fail_with(&e.to_string());
        }
        if let Some(req) = fix.ops.pop_front() {
            self.stage = Stage::SnapFix(fix);
            return self.io(req);
        }
        self.img.hdr.snapshots_offset = fix.offset;
        self.snap.corruptions_fixed += self.snap.corruptions;
        self.snap.corruptions = 0;
        self.stage = Stage::Clean(0);
        Flow::Next
    }
}
