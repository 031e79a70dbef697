//! Resize: grow (with a bigger L1 when needed) and shrink (refused over allocated data
//! unless the caller consents).
//!
//! Every table switch follows rule D: the new L1 is written, then the header points at it in
//! the next write-back cycle (after the barrier that makes the table durable), and the old
//! L1 is freed after that.

use crate::error::{Feature, RequestError, Table};
use crate::format::entry::Mapping;
use crate::format::MAX_L1_BYTES;
use crate::io::{IoBuf, IoKind};

use super::tasks::Edit;
use super::{put_be64, Block, Body, Image, Kind, Purpose, TABLE_CHUNK};

mod sub {
    pub(super) const START: u8 = 0;
    pub(super) const ZERO_OLD_TAIL: u8 = 1;
    pub(super) const GROW_L1: u8 = 2;
    pub(super) const SWITCH_L1: u8 = 3;
    pub(super) const SET_SIZE: u8 = 4;
    pub(super) const WAIT: u8 = 5;
    pub(super) const SCAN_TAIL: u8 = 6;
    pub(super) const DROP_TAIL: u8 = 7;
    pub(super) const ZERO_GROWN: u8 = 8;
}

impl Image {
    /// After the L1 covers the new size: grown over a longer backing file, the new space is
    /// zeroed first (it must read as zero, not as what the backing file holds there; QEMU
    /// zeroes it too), before the header's new size can reach the disk.
    fn zero_grown_or_set_size(&mut self, t: u32, old: u64, new: u64) {
        let cs = self.geo.cluster_size();
        let from = old.next_multiple_of(cs);
        let to = self
            .backing
            .as_ref()
            .map_or(0, |b| new.min(b.size.next_multiple_of(cs)));
        let task = self.task(t);
        (task.pos, task.end) = (from, to);
        task.sub = if to > from {
            sub::ZERO_GROWN
        } else {
            sub::SET_SIZE
        };
    }

    /// One step of making the task's range `[pos, end)` read as zero (zero flags for whole
    /// clusters of v3 images, zeroes written otherwise): `Some(true)` once done,
    /// `Some(false)` to wait, `None` to step again.
    fn zero_step(&mut self, t: u32) -> Option<bool> {
        let task = self.task(t);
        let (pos, end) = (task.pos, task.end);
        if pos >= end {
            return Some(task.inflight == 0);
        }
        if !self.op_room(3) {
            return Some(false);
        }
        let r = if self.hdr.version >= 3 && self.full_cluster_at(pos, end) {
            self.edit_clusters(t, Edit::Zero { unmap: false })
        } else {
            self.write_piece(t, Body::Zeroes)
        };
        match r {
            Ok(()) => None,
            Err(Block::Park) => Some(false),
            Err(Block::Fail(e)) => {
                self.task(t).error = Some(e);
                None
            }
        }
    }

    pub(super) fn step_resize(&mut self, t: u32) -> bool {
        let Kind::Resize { size: new, shrink } = self.task(t).kind else {
            return true;
        };
        let old = self.hdr.size;
        let cs = self.geo.cluster_size();
        loop {
            if !self.settle_alloc(t) {
                return false;
            }
            let task = self.task(t);
            if task.error.is_some() {
                return task.inflight == 0 && task.alloc.is_none();
            }
            match task.sub {
                sub::START => {
                    let snapshots = self.hdr.nb_snapshots > 0;
                    let err = if new % 512 != 0 {
                        Some(RequestError::UnalignedSize)
                    } else if snapshots && self.hdr.version < 3 {
                        Some(RequestError::Unsupported(Feature::ResizeV2WithSnapshots))
                    } else if self.geo.l1_entries_for(new) * 8 > MAX_L1_BYTES {
                        Some(RequestError::TooLarge(Table::ActiveL1))
                    } else {
                        None
                    };
                    let task = self.task(t);
                    if let Some(e) = err {
                        task.error = Some(e);
                        continue;
                    }
                    if new >= old {
                        task.pos = old;
                        task.end = new.min(old.next_multiple_of(cs));
                        task.sub = sub::ZERO_OLD_TAIL;
                    } else {
                        task.pos = new;
                        task.end = old;
                        task.sub = if shrink {
                            sub::DROP_TAIL
                        } else {
                            sub::SCAN_TAIL
                        };
                        if shrink {
                            task.pos = new.next_multiple_of(cs);
                        }
                    }
                }
                // Bytes of the old last cluster past the old end must read as zero.
                sub::ZERO_OLD_TAIL => match self.zero_step(t) {
                    Some(true) => self.task(t).sub = sub::GROW_L1,
                    Some(false) => return false,
                    None => {}
                },
                sub::GROW_L1 => {
                    let need = self.geo.l1_entries_for(new) as usize;
                    if need <= self.l1.len() {
                        self.zero_grown_or_set_size(t, old, new);
                        continue;
                    }
                    if self.window || !self.op_room(1) {
                        return false;
                    }
                    let bytes = self.geo.round_up(need as u64 * 8);
                    let (host, _) = match self.alloc_clusters(bytes / cs, true) {
                        Ok(x) => x,
                        Err(Block::Park) => return false,
                        Err(Block::Fail(e)) => {
                            self.task(t).error = Some(e);
                            continue;
                        }
                    };
                    let mut buf = IoBuf::zeroed(bytes as usize);
                    for (i, &e) in self.l1.iter().enumerate() {
                        put_be64(buf.as_mut_slice(), i, e);
                    }
                    self.issue_buf(Purpose::TaskIo { task: t }, IoKind::Write, host, buf);
                    let task = self.task(t);
                    task.inflight += 1;
                    task.aux = host;
                    task.sub = sub::SWITCH_L1;
                }
                sub::SWITCH_L1 => {
                    if self.task(t).inflight > 0 || self.window {
                        return false;
                    }
                    let need = self.geo.l1_entries_for(new) as usize;
                    let old_off = self.hdr.l1_table_offset;
                    let old_clusters = self.geo.round_up(u64::from(self.hdr.l1_size) * 8) / cs;
                    if old_off != 0 {
                        for j in 0..old_clusters {
                            self.queue_free(old_off + j * cs);
                        }
                    }
                    self.l1.resize(need, 0);
                    self.l1_dirty = vec![false; (need * 8).div_ceil(TABLE_CHUNK)];
                    self.hdr.l1_table_offset = self.task(t).aux;
                    self.hdr.l1_size = need as u32;
                    self.zero_grown_or_set_size(t, old, new);
                }
                sub::SET_SIZE => {
                    if self.window || !self.op_room(1) {
                        return false;
                    }
                    if self.has_data_file() {
                        // Like QEMU's qcow2_co_truncate: the data file follows the disk's
                        // size (a raw one stays the disk).
                        self.issue_bare_at(
                            crate::io::Target::DataFile,
                            Purpose::TaskIo { task: t },
                            IoKind::SetLen,
                            new,
                        );
                        self.task(t).inflight += 1;
                    }
                    self.hdr.size = new;
                    self.hdr.encode(self.header_buf.as_mut_slice());
                    self.header_dirty = true;
                    if let Some(info) = self.info.as_mut() {
                        info.size = new;
                    }
                    self.resize_bitmaps(new);
                    self.task(t).sub = sub::WAIT;
                }
                sub::ZERO_GROWN => match self.zero_step(t) {
                    Some(true) => self.task(t).sub = sub::SET_SIZE,
                    Some(false) => return false,
                    None => {}
                },
                sub::WAIT => {
                    if self.task(t).inflight > 0 {
                        return false;
                    }
                    return self.wait_for_cycle(t);
                }
                sub::SCAN_TAIL => {
                    // Without consent, shrinking may only drop unallocated space.
                    let cb = self.geo.cluster_bits;
                    let (pos, end) = (self.task(t).pos, self.task(t).end);
                    if pos >= end {
                        let task = self.task(t);
                        task.pos = new.next_multiple_of(cs);
                        task.sub = sub::DROP_TAIL;
                        continue;
                    }
                    let gc = pos >> cb;
                    let l1i = gc >> self.geo.l2_bits;
                    let next = match self.l1_l2(l1i) {
                        Err(e) => {
                            self.task(t).error = Some(e);
                            continue;
                        }
                        Ok(None) => (l1i + 1) << (cb + self.geo.l2_bits),
                        Ok(Some(l2)) => match self.l2_entry_slot(l2, gc) {
                            Err(Block::Park) => return false,
                            Err(Block::Fail(e)) => {
                                self.task(t).error = Some(e);
                                continue;
                            }
                            Ok((slot, idx)) => match self.decode(self.entry(slot, idx)) {
                                Mapping::Data { .. } | Mapping::Compressed { .. } => {
                                    self.task(t).error = Some(RequestError::ShrinkDropsData(pos));
                                    continue;
                                }
                                _ => (gc + 1) << cb,
                            },
                        },
                    };
                    self.task(t).pos = next;
                }
                sub::DROP_TAIL => {
                    let task = self.task(t);
                    if task.pos >= task.end {
                        task.sub = sub::SET_SIZE;
                        continue;
                    }
                    if !self.op_room(2) {
                        return false;
                    }
                    match self.edit_clusters(t, Edit::Full) {
                        Ok(()) => {}
                        Err(Block::Park) => return false,
                        Err(Block::Fail(e)) => self.task(t).error = Some(e),
                    }
                }
                _ => return true,
            }
        }
    }
}
