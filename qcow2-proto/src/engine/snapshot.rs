//! Internal snapshots: creating and deleting them (`qemu-img snapshot -c/-d`), as exclusive
//! tasks.
//!
//! Create: everything durable first; every cluster the active tables reference (L2 tables,
//! data clusters, each cluster a compressed stream touches) gets one more reference and
//! loses its COPIED flag; a copy of the active L1 and the new snapshot table are written;
//! a write-back cycle makes refcounts, L2 tables and L1 durable, then (rule D) the header
//! switches to the new table; the old table is freed.
//!
//! Delete: the table without the entry is written and the header switched first (so a
//! crash can only leak); then every reference of the snapshot's tree is dropped (rule B:
//! through the ordinary deferred decrements), and once they are applied the active tables'
//! COPIED flags are recomputed from the refcounts.
//!
//! A crash between a refcount change and the matching COPIED change leaves a COPIED flag
//! that disagrees with its refcount, which `check` reports and `check -r all` repairs (as
//! after QEMU's own snapshot operations); it never lets a write land in a cluster another
//! table still references: COPIED is set only once the refcount is 1 in the cache, whose
//! blocks are written back before the L2 tables.

use crate::config::SnapshotRef;
use crate::error::{CorruptReason, Corruption, RequestError, Structure};
use crate::format::entry::{L1Entry, Mapping, COPIED};
use crate::format::snapshot::{self, MAX_SNAPSHOTS};
use crate::info::SnapshotInfo;
use crate::io::{IoBuf, IoKind, IoOp, Segment};
use crate::request::ReqId;
use crate::SubmitError;

use super::alloc::PENDING_FREES_CAP;
use super::{be64, Block, Image, Kind, Purpose, TABLE_CHUNK};

/// What a snapshot task does.
#[derive(Debug, Clone)]
pub(super) enum SnapKind {
    Create(SnapshotInfo),
    Delete(SnapshotRef),
    Apply(SnapshotRef),
}

/// What a tree walk does at each reference.
#[derive(Debug, Clone, Copy, Eq, PartialEq)]
enum Action {
    /// One more reference; COPIED cleared (create).
    Reference,
    /// One reference less, deferred (delete).
    Unreference,
    /// COPIED set exactly where the refcount is 1 (after a delete).
    Recompute,
    /// The references a failed `Reference` walk added taken back, at once (nothing
    /// references them yet), and COPIED restored.
    Undo,
}

/// A snapshot task's state.
#[derive(Debug)]
pub(super) struct SnapOp {
    kind: SnapKind,
    /// The snapshot table as it is on disk.
    table: Vec<u8>,
    /// The L1 table walked: `None` for the active one.
    l1: Option<Vec<u64>>,
    /// Walk cursor: L1 index, and entry index in its L2 table.
    at: (usize, u64),
    /// The snapshot being deleted.
    victim: Option<SnapshotInfo>,
    /// Clusters of the old snapshot table, freed once the new one is in the header.
    old_table: (u64, u64),
    /// Where the new table was written (0: no snapshots left).
    new_table: u64,
    /// Whether the read in flight is of a snapshot's L1 (else of the snapshot table).
    reading_l1: bool,
    /// Whether the header switch is durable.
    switched: bool,
    /// After a refcount overflow: the walk position it stopped at (everything before it
    /// is taken back), and the error the request then fails with.
    undo: Option<((usize, u64), RequestError)>,
}

mod sub {
    pub const START: u8 = 0;
    pub const READ: u8 = 1;
    pub const WALK: u8 = 2;
    pub const WRITE: u8 = 3;
    pub const SWITCH: u8 = 4;
    pub const SWITCHED: u8 = 5;
    pub const RELEASE: u8 = 6;
    pub const RECOMPUTE: u8 = 7;
    pub const DONE: u8 = 8;
    pub const APPLY_L1: u8 = 9;
}

impl Image {
    /// Creates internal snapshot `name` of the active image (no VM state), taken at
    /// `date` (seconds and nanoseconds since the epoch) with guest clock `vm_clock_nsec`:
    /// its ID is the largest numeric ID plus one, as QEMU numbers them. Completes once the
    /// snapshot is durable.
    pub fn snapshot_create(
        &mut self,
        name: &str,
        date: (u32, u32),
        vm_clock_nsec: u64,
    ) -> Result<ReqId, SubmitError> {
        if name.len() > usize::from(u16::MAX) {
            return Err(RequestError::SnapshotName.into());
        }
        let info = self.info.as_ref().ok_or(SubmitError::NotOpen)?;
        let next_id = info
            .snapshots
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let sn = SnapshotInfo {
            id: next_id.to_string(),
            name: name.to_owned(),
            vm_state_size: 0,
            date_sec: date.0,
            date_nsec: date.1,
            vm_clock_nsec,
            icount: Some(0),
            disk_size: Some(self.hdr.size),
            l1_table_offset: 0,
            l1_size: self.l1.len() as u32,
        };
        self.start_snapshot_task(SnapKind::Create(sn))
    }

    /// Deletes the internal snapshot `which` names (the first match), freeing what only it
    /// referenced. Completes once the deletion is durable.
    pub fn snapshot_delete(&mut self, which: SnapshotRef) -> Result<ReqId, SubmitError> {
        self.start_snapshot_task(SnapKind::Delete(which))
    }

    /// Reverts the active image to the internal snapshot `which` names (the snapshot
    /// stays): its tables get one more reference, a new active L1 with its entries is
    /// written and switched to in the header (atomically), then the old tables lose their
    /// reference. The disk takes the snapshot's size (as in QEMU 10; the L1 table keeps the
    /// larger of the two sizes). Completes once durable.
    pub fn snapshot_apply(&mut self, which: SnapshotRef) -> Result<ReqId, SubmitError> {
        self.start_snapshot_task(SnapKind::Apply(which))
    }

    fn start_snapshot_task(&mut self, kind: SnapKind) -> Result<ReqId, SubmitError> {
        if self.has_data_file() {
            // (QEMU: "Operation not supported".)
            return Err(RequestError::Unsupported(crate::error::Feature::ExternalDataFile).into());
        }
        // (Set first: the task may run inside the submit.)
        self.snap = Some(Box::new(SnapOp {
            kind,
            table: Vec::new(),
            l1: None,
            at: (0, 0),
            victim: None,
            old_table: (0, 0),
            new_table: 0,
            reading_l1: false,
            switched: false,
            undo: None,
        }));
        self.submit_kind(Kind::Snapshot, 0, 0)
            .inspect_err(|_| self.snap = None)
    }

    pub(super) fn step_snapshot(&mut self, t: u32) -> bool {
        loop {
            let task = self.task(t);
            let (s, inflight) = (task.sub, task.inflight);
            if task.error.is_some() {
                if inflight == 0 {
                    self.snap = None;
                    return true;
                }
                return false;
            }
            if inflight > 0 || !self.op_room(2) {
                return false;
            }
            let create = matches!(self.snap().kind, SnapKind::Create(_));
            let apply = matches!(self.snap().kind, SnapKind::Apply(_));
            let r: Result<(), Block> = match s {
                sub::START => self.snap_start(t),
                sub::READ => self.snap_read_done(t),
                sub::WALK => match self.walk(t) {
                    Ok(true) if self.snap().undo.is_some() => {
                        let (_, e) = self.snap_mut().undo.take().expect("checked");
                        Err(Block::Fail(e))
                    }
                    Err(Block::Fail(RequestError::RefcountOverflow))
                        if self.snap().undo.is_none() =>
                    {
                        // Take back what this walk added, then fail.
                        let op = self.snap_mut();
                        op.undo = Some((op.at, RequestError::RefcountOverflow));
                        op.at = (0, 0);
                        Ok(())
                    }
                    Ok(true) => {
                        self.task(t).sub = match (create, apply, self.snap().switched) {
                            (true, _, _) => sub::WRITE,
                            (_, true, false) => sub::APPLY_L1,
                            _ => sub::RELEASE,
                        };
                        Ok(())
                    }
                    Ok(false) => Ok(()),
                    Err(e) => Err(e),
                },
                sub::APPLY_L1 => self.apply_l1().map(|()| self.task(t).sub = sub::SWITCHED),
                sub::WRITE => self.snap_write(t),
                sub::SWITCH => {
                    if self.window {
                        // A cycle is taking its copies, and may have passed the barrier
                        // the new table needs before the header points at it: the next
                        // cycle writes the switch.
                        return false;
                    }
                    self.snap_switch();
                    self.task(t).sub = sub::SWITCHED;
                    Ok(())
                }
                sub::SWITCHED => {
                    if !self.wait_for_cycle(t) {
                        return false;
                    }
                    self.task(t).wait_cycle = None;
                    self.snap_mut().switched = true;
                    // The old snapshot table (create, delete) or the old active L1 (apply).
                    let (at, n) = self.snap().old_table;
                    self.release_clusters(at, n);
                    if create {
                        self.task(t).sub = sub::DONE;
                    } else {
                        // Now drop the snapshot's references.
                        self.snap_mut().at = (0, 0);
                        self.task(t).sub = sub::WALK;
                    }
                    Ok(())
                }
                sub::RELEASE => {
                    // The deleted snapshot's own L1, then wait for every decrement to be
                    // applied.
                    if let (SnapKind::Delete(_), Some(v)) =
                        (&self.snap().kind, self.snap().victim.clone())
                    {
                        let bytes = u64::from(v.l1_size) * 8;
                        let n = self.geo.round_up(bytes.max(1)) >> self.geo.cluster_bits;
                        self.release_clusters(v.l1_table_offset, n);
                        self.snap_mut().victim = None;
                    }
                    if !self.wait_all_durable(t) {
                        return false;
                    }
                    self.task(t).wait_cycle = None;
                    let op = self.snap_mut();
                    op.l1 = None;
                    op.at = (0, 0);
                    self.task(t).sub = sub::RECOMPUTE;
                    Ok(())
                }
                sub::RECOMPUTE => match self.walk(t) {
                    Ok(true) => {
                        self.task(t).sub = sub::DONE;
                        Ok(())
                    }
                    Ok(false) => Ok(()),
                    Err(e) => Err(e),
                },
                _ => {
                    if !self.wait_all_durable(t) {
                        return false;
                    }
                    self.snap = None;
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

    fn snap(&self) -> &SnapOp {
        self.snap.as_deref().expect("a snapshot task runs")
    }

    fn snap_mut(&mut self) -> &mut SnapOp {
        self.snap.as_deref_mut().expect("a snapshot task runs")
    }

    /// Checks the request, waits until everything is durable, reads the snapshot table.
    fn snap_start(&mut self, t: u32) -> Result<(), Block> {
        let snapshots = self
            .info
            .as_ref()
            .map(|i| i.snapshots.clone())
            .unwrap_or_default();
        match self.snap().kind.clone() {
            SnapKind::Create(_) if snapshots.len() as u32 >= MAX_SNAPSHOTS => {
                return Err(RequestError::TooManySnapshots.into())
            }
            SnapKind::Create(_) => {}
            SnapKind::Delete(which) => {
                let Some(v) = which.find(&snapshots) else {
                    return Err(RequestError::SnapshotNotFound.into());
                };
                self.snap_mut().victim = Some(v.clone());
            }
            SnapKind::Apply(which) => {
                let Some(v) = which.find(&snapshots) else {
                    return Err(RequestError::SnapshotNotFound.into());
                };
                self.snap_mut().victim = Some(v.clone());
            }
        }
        if !self.wait_all_durable(t) {
            return Err(Block::Park);
        }
        self.task(t).wait_cycle = None;
        let bytes = self.snapshot_table_bytes as usize;
        if let SnapKind::Apply(_) = self.snap().kind {
            // (No table change: straight to the snapshot's L1.)
        } else if bytes > 0 {
            let buf = self.staging_buf(bytes);
            let at = self.hdr.snapshots_offset;
            self.issue_buf(Purpose::SnapshotRead { task: t }, IoKind::Read, at, buf);
            self.task(t).inflight += 1;
        }
        self.task(t).sub = sub::READ;
        Ok(())
    }

    /// A read of the snapshot table (or of a snapshot's L1) came in.
    pub(super) fn snapshot_read_done(
        &mut self,
        t: u32,
        op: IoOp,
        result: Result<(), crate::io::IoError>,
    ) {
        let result = result.map_err(|e| self.io_error(e));
        if let (Ok(()), Some(Segment::Buf(b))) = (result, op.segments.into_iter().next()) {
            let op = self.snap_mut();
            if !op.reading_l1 {
                op.table = b.as_slice().to_vec();
            } else {
                let n = op.victim.as_ref().map_or(0, |v| v.l1_size as usize);
                op.l1 = Some((0..n).map(|i| be64(b.as_slice(), i)).collect());
            }
            self.put_staging(b);
        }
        self.task_io_done(t, result);
    }

    /// After the table read: a create walks the active tables; a delete reads the
    /// snapshot's L1, then writes the table without its entry.
    fn snap_read_done(&mut self, t: u32) -> Result<(), Block> {
        let op = self.snap();
        match (&op.kind, &op.victim, &op.l1) {
            (SnapKind::Create(_), _, _) => {
                let op = self.snap_mut();
                (op.l1, op.at) = (None, (0, 0));
                self.task(t).sub = sub::WALK;
            }
            (_, Some(v), None) => {
                let v = v.clone();
                self.check_snapshot_l1(&v)?;
                let bytes = (u64::from(v.l1_size) * 8).next_multiple_of(TABLE_CHUNK as u64);
                let buf = IoBuf::zeroed(bytes.max(TABLE_CHUNK as u64) as usize);
                let purpose = Purpose::SnapshotRead { task: t };
                self.snap_mut().reading_l1 = true;
                self.issue_buf(purpose, IoKind::Read, v.l1_table_offset, buf);
                self.task(t).inflight += 1;
            }
            (SnapKind::Delete(_), _, _) => {
                self.snap_mut().at = (0, 0);
                self.task(t).sub = sub::WRITE;
            }
            (_, _, _) => {
                // Apply: one more reference for everything the snapshot's tables hold.
                self.snap_mut().at = (0, 0);
                self.task(t).sub = sub::WALK;
            }
        }
        Ok(())
    }

    /// Apply: a new active L1 holding the snapshot's entries, at a new place; the header
    /// switches to it at the end of the next cycle, after the L1 is written (rule D). The
    /// old L1's entries are kept for dropping their references.
    fn apply_l1(&mut self) -> Result<(), Block> {
        if self.window {
            return Err(Block::Park);
        }
        let cb = self.geo.cluster_bits;
        let old_n = self.l1.len();
        let size = self.snap().victim.as_ref().and_then(|v| v.disk_size);
        let size = size.unwrap_or(self.hdr.size);
        let n = old_n
            .max(self.snap().l1.as_ref().map_or(0, Vec::len))
            .max(self.geo.l1_entries_for(size) as usize);
        let clusters = self.geo.round_up((n as u64 * 8).max(1)) >> cb;
        let (host, _) = self.alloc_clusters(clusters, true)?;
        let snap_l1 = self.snap_mut().l1.take().unwrap_or_default();
        let old_l1 = self.l1.clone();
        self.l1.resize(n, 0);
        for i in 0..n {
            let e = snap_l1.get(i).copied().unwrap_or(0) & !COPIED;
            self.set_l1(i, e);
        }
        self.l1_dirty = vec![true; (n * 8).div_ceil(TABLE_CHUNK)];
        let old = (
            self.hdr.l1_table_offset,
            self.geo.round_up((old_n as u64 * 8).max(1)) >> cb,
        );
        self.hdr.l1_table_offset = host;
        self.hdr.l1_size = n as u32;
        let old_size = std::mem::replace(&mut self.hdr.size, size);
        if let Some(info) = self.info.as_mut() {
            info.size = size;
        }
        // Everything may differ from what the bitmaps knew: all of it is dirty.
        if size != old_size {
            self.resize_bitmaps(size);
        }
        self.mark_dirty(0, size);
        self.hdr.encode(self.header_buf.as_mut_slice());
        self.header_dirty = true;
        self.cycle_wanted = true;
        let op = self.snap_mut();
        op.old_table = old;
        op.l1 = Some(old_l1);
        op.at = (0, 0);
        Ok(())
    }

    /// Refuses a snapshot L1 that is too large, misaligned or past the end of the file.
    fn check_snapshot_l1(&mut self, v: &SnapshotInfo) -> Result<(), RequestError> {
        let bytes = u64::from(v.l1_size) * 8;
        let reason = if !self.geo.aligned(v.l1_table_offset) {
            CorruptReason::Unaligned
        } else if bytes > crate::format::MAX_L1_BYTES {
            CorruptReason::OffsetTooLarge
        } else if v.l1_table_offset.saturating_add(bytes) > self.file_end {
            CorruptReason::PastEof
        } else {
            return Ok(());
        };
        Err(self.corrupt(Structure::L1Table, v.l1_table_offset, reason))
    }

    /// Writes what the new header will point at: for a create the L1 copy and the table
    /// with the new entry; for a delete the table without the entry.
    fn snap_write(&mut self, t: u32) -> Result<(), Block> {
        let cb = self.geo.cluster_bits;
        let nb = self.hdr.nb_snapshots;
        let ranges = snapshot::entry_ranges(&self.snap().table, nb)
            .map_err(|e| RequestError::Options(crate::error::CreateError::Format(e)))?;
        let mut table = Vec::with_capacity(self.snap().table.len() + 128);
        match self.snap().kind.clone() {
            SnapKind::Create(mut sn) => {
                // The copy of the active L1 (COPIED means nothing in a snapshot's table).
                let bytes = self.l1.len() as u64 * 8;
                let (host, _) = self.alloc_clusters(self.geo.round_up(bytes.max(1)) >> cb, true)?;
                let mut buf = IoBuf::zeroed(self.geo.round_up(bytes.max(1)) as usize);
                for (i, &e) in self.l1.iter().enumerate() {
                    super::put_be64(buf.as_mut_slice(), i, e & !COPIED);
                }
                self.issue_buf(Purpose::TaskIo { task: t }, IoKind::Write, host, buf);
                self.task(t).inflight += 1;
                sn.l1_table_offset = host;
                table.extend_from_slice(&self.snap().table[..ranges.last().map_or(0, |r| r.end)]);
                table.extend_from_slice(&snapshot::encode_entry(&sn));
                self.snap_mut().kind = SnapKind::Create(sn);
            }
            // (Apply writes no table: see `apply_l1`.)
            SnapKind::Apply(_) => return Ok(()),
            SnapKind::Delete(_) => {
                let snapshots = self
                    .info
                    .as_ref()
                    .map(|i| i.snapshots.clone())
                    .unwrap_or_default();
                let victim = snapshots
                    .iter()
                    .position(|s| Some(s) == self.snap().victim.as_ref())
                    .expect("found at the start");
                for (i, r) in ranges.iter().enumerate() {
                    if i != victim {
                        table.extend_from_slice(&self.snap().table[r.clone()]);
                    }
                }
            }
        }
        let old = self.geo.round_up(self.snapshot_table_bytes) >> cb;
        self.snap_mut().old_table = (self.hdr.snapshots_offset, old);
        let new_at = if table.is_empty() {
            0
        } else {
            let (host, _) =
                self.alloc_clusters(self.geo.round_up(table.len() as u64) >> cb, true)?;
            let mut buf = IoBuf::zeroed(self.geo.round_up(table.len() as u64) as usize);
            buf.as_mut_slice()[..table.len()].copy_from_slice(&table);
            self.issue_buf(Purpose::TaskIo { task: t }, IoKind::Write, host, buf);
            self.task(t).inflight += 1;
            host
        };
        self.snap_mut().table = table;
        self.snap_mut().new_table = new_at;
        self.task(t).sub = sub::SWITCH;
        Ok(())
    }

    /// Points the header at the new table (written back at the end of the next cycle,
    /// after everything else) and updates what the engine knows of the snapshots.
    fn snap_switch(&mut self) {
        let new_at = self.snap().new_table;
        let bytes = self.snap().table.len() as u64;
        let nb = match self.snap().kind {
            SnapKind::Create(_) => self.hdr.nb_snapshots + 1,
            SnapKind::Delete(_) => self.hdr.nb_snapshots - 1,
            // (Apply switches the L1 instead: see `apply_l1`.)
            SnapKind::Apply(_) => return,
        };
        self.hdr.snapshots_offset = new_at;
        self.hdr.nb_snapshots = nb;
        self.hdr.encode(self.header_buf.as_mut_slice());
        self.header_dirty = true;
        self.cycle_wanted = true;
        self.snapshot_table_bytes = bytes;
        let kind = self.snap().kind.clone();
        let victim = self.snap().victim.clone();
        if let Some(info) = self.info.as_mut() {
            match kind {
                SnapKind::Create(sn) => info.snapshots.push(sn),
                SnapKind::Apply(_) => {}
                SnapKind::Delete(_) => {
                    if let Some(v) = victim {
                        if let Some(i) = info.snapshots.iter().position(|s| *s == v) {
                            info.snapshots.remove(i);
                        }
                    }
                }
            }
        }
    }

    /// Queues the decrements of `count` clusters from `at` (nothing for `count` 0).
    fn release_clusters(&mut self, at: u64, count: u64) {
        for i in 0..count {
            self.queue_free(at + (i << self.geo.cluster_bits));
        }
    }

    // ---- tree walks ----

    /// Steps the walk over the L1 table being walked (the active one, or the deleted
    /// snapshot's): `Ok(true)` once every reference was handled.
    fn walk(&mut self, t: u32) -> Result<bool, Block> {
        let s = self.task(t).sub;
        let action = match (&self.snap().kind, s, self.snap().switched) {
            _ if self.snap().undo.is_some() => Action::Undo,
            (SnapKind::Create(_), _, _) => Action::Reference,
            (_, sub::RECOMPUTE, _) => Action::Recompute,
            (SnapKind::Apply(_), _, false) => Action::Reference,
            _ => Action::Unreference,
        };
        let entries = self.geo.l2_entries();
        if self.window {
            // (A cycle is taking its copies.)
            return Err(Block::Park);
        }
        let until = self.snap().undo.as_ref().map(|(at, _)| *at);
        loop {
            let (l1i, idx) = self.snap().at;
            if until.is_some_and(|u| (l1i, idx) >= u) {
                return Ok(true);
            }
            let l1e = match &self.snap().l1 {
                Some(l1) => l1.get(l1i).copied(),
                None => self.l1.get(l1i).copied(),
            };
            let Some(l1e) = l1e else {
                return Ok(true);
            };
            let l2 = L1Entry(l1e).l2_offset();
            if l2 == 0 {
                self.snap_mut().at = (l1i + 1, 0);
                continue;
            }
            let bad = if !self.geo.aligned(l2) {
                Some(CorruptReason::Unaligned)
            } else if l2 >= self.file_end {
                Some(CorruptReason::PastEof)
            } else {
                None
            };
            if let Some(reason) = bad {
                return Err(self.corrupt(Structure::L1Table, l1e, reason).into());
            }
            if idx < entries {
                let gc = ((l1i as u64) << self.geo.l2_bits) + idx;
                let (slot, first) = self.l2_entry_slot(l2, gc)?;
                let mut i = first;
                while i < self.per_slice_entries() {
                    if until.is_some_and(|u| (l1i, self.snap().at.1) >= u) {
                        return Ok(true);
                    }
                    self.walk_entry(action, slot, i)?;
                    i += 1;
                    self.snap_mut().at.1 += 1;
                }
                continue;
            }
            self.walk_table(action, l1i, l1e)?;
            self.snap_mut().at = (l1i + 1, 0);
        }
    }

    fn per_slice_entries(&self) -> usize {
        self.l2.unit / self.geo.l2_entry_bytes() as usize
    }

    /// The host clusters an entry references: its cluster, or each cluster its compressed
    /// stream touches (one reference each).
    fn referenced(&self, m: Mapping) -> ([u64; 2], usize) {
        let cb = self.geo.cluster_bits;
        match m {
            Mapping::Data { host, .. } | Mapping::Zero { host, .. } if host != 0 => {
                ([host >> cb, 0], 1)
            }
            Mapping::Compressed { host, len } => {
                let (a, b) = (host >> cb, (host + len.max(1) - 1) >> cb);
                ([a, b], if a == b { 1 } else { 2 })
            }
            _ => ([0, 0], 0),
        }
    }

    /// One L2 entry of the walk.
    fn walk_entry(&mut self, action: Action, slot: u32, i: usize) -> Result<(), Block> {
        let e = self.entry(slot, i);
        let m = self.decode(e);
        let (clusters, n) = self.referenced(m);
        let clusters = &clusters[..n];
        let word = match action {
            Action::Unreference => {
                if self.pending_frees.len() >= PENDING_FREES_CAP {
                    self.cycle_wanted = true;
                    return Err(Block::Park);
                }
                for &c in clusters {
                    self.queue_free(c << self.geo.cluster_bits);
                }
                return Ok(());
            }
            Action::Reference => {
                self.add_references(clusters)?;
                e.0 & !COPIED
            }
            Action::Undo => {
                // (Every block loaded before any change: a park must not repeat one.)
                let mut slots = [0u32; 2];
                for (k, &c) in clusters.iter().enumerate() {
                    slots[k] = self.rb_slot(c)?.ok_or_else(|| self.refcount_missing(c))?;
                }
                let mut one = false;
                for (k, &c) in clusters.iter().enumerate() {
                    let rc = self.refcount(slots[k], c).saturating_sub(1);
                    self.set_refcount(slots[k], c, rc);
                    one = rc == 1;
                }
                match m {
                    Mapping::Compressed { .. } => e.0,
                    _ if n == 1 && one => e.0 | COPIED,
                    _ => e.0,
                }
            }
            Action::Recompute => match m {
                Mapping::Compressed { .. } => e.0 & !COPIED,
                _ if n == 1 => {
                    let rc = self.refcount_of(clusters[0])?;
                    if rc == 1 {
                        e.0 | COPIED
                    } else {
                        e.0 & !COPIED
                    }
                }
                _ => e.0,
            },
        };
        if word != e.0 {
            self.set_word(slot, i, word);
        }
        Ok(())
    }

    /// The L2 table itself, after its entries.
    fn walk_table(&mut self, action: Action, l1i: usize, l1e: u64) -> Result<(), Block> {
        let c = L1Entry(l1e).l2_offset() >> self.geo.cluster_bits;
        let new = match action {
            Action::Unreference => {
                self.queue_free(c << self.geo.cluster_bits);
                return Ok(());
            }
            Action::Reference => {
                self.add_references(&[c])?;
                l1e & !COPIED
            }
            Action::Undo => {
                let slot = self.rb_slot(c)?.ok_or_else(|| self.refcount_missing(c))?;
                let rc = self.refcount(slot, c).saturating_sub(1);
                self.set_refcount(slot, c, rc);
                if rc == 1 {
                    l1e | COPIED
                } else {
                    l1e
                }
            }
            Action::Recompute => {
                if self.refcount_of(c)? == 1 {
                    l1e | COPIED
                } else {
                    l1e & !COPIED
                }
            }
        };
        // (Only the active L1's flags mean anything.)
        if new != l1e && self.snap().l1.is_none() {
            self.set_l1(l1i, new);
            self.l1_dirty[l1i * 8 / TABLE_CHUNK] = true;
        }
        Ok(())
    }

    /// One more reference to each of `clusters` (all or none: their blocks are loaded
    /// first, and a refcount at its maximum fails the whole request).
    fn add_references(&mut self, clusters: &[u64]) -> Result<(), Block> {
        let max = if self.geo.refcount_order >= 6 {
            u64::MAX
        } else {
            (1u64 << (1 << self.geo.refcount_order)) - 1
        };
        let mut slots = [0u32; 2];
        for (k, &c) in clusters.iter().enumerate() {
            slots[k] = self.rb_slot(c)?.ok_or_else(|| self.refcount_missing(c))?;
        }
        for (k, &c) in clusters.iter().enumerate() {
            let rc = self.refcount(slots[k], c);
            let twice = clusters.len() == 2 && clusters[0] == clusters[1];
            if rc == 0 {
                return Err(self.refcount_missing(c).into());
            }
            if rc + u64::from(twice) >= max {
                return Err(RequestError::RefcountOverflow.into());
            }
        }
        for (k, &c) in clusters.iter().enumerate() {
            let rc = self.refcount(slots[k], c);
            self.set_refcount(slots[k], c, rc + 1);
        }
        Ok(())
    }

    /// The refcount of host cluster `c`.
    fn refcount_of(&mut self, c: u64) -> Result<u64, Block> {
        Ok(match self.rb_slot(c)? {
            Some(slot) => self.refcount(slot, c),
            None => 0,
        })
    }

    /// A referenced cluster without a refcount: corruption.
    fn refcount_missing(&mut self, c: u64) -> RequestError {
        let _ = self.corrupt(
            Structure::RefcountBlock,
            c << self.geo.cluster_bits,
            CorruptReason::Refcount,
        );
        RequestError::Corrupt(Corruption {
            structure: Structure::DataCluster,
            offset: c << self.geo.cluster_bits,
            reason: CorruptReason::Refcount,
        })
    }

    /// Rewrites the first word of entry `i` of `slot` (the bitmap of an extended entry
    /// stays).
    fn set_word(&mut self, slot: u32, i: usize, word: u64) {
        let words = self.geo.l2_entry_bytes() as usize / 8;
        super::put_be64(self.l2.data_mut(slot), i * words, word);
    }
}
