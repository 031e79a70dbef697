//! Guest request tasks: read, write, write-zeroes, discard, block status, preallocation;
//! and the allocations they start (data runs, new or copied L2 tables).

use arrayvec::ArrayVec;

use crate::config::{CacheMode, Preallocation};
use crate::error::{CorruptReason, Feature, RequestError, Structure};
use crate::format::entry::{L1Entry, L2Entry, Mapping, COPIED, OFFSET_MASK};
use crate::io::{IoBuf, IoError, IoKind, IoOp, Segment};
use crate::request::{Allocation, BlockStatus};

use super::alloc::PENDING_FREES_CAP;
use super::overlap::Own;
use super::{
    be64, put_be64, Alloc, AllocState, AllocWhat, Block, Body, Image, Kind, Purpose, TABLE_CHUNK,
};

/// Where an extent of a read comes from.
#[derive(Debug, Clone, Copy, Eq, PartialEq)]
enum Src {
    /// Host data at this offset.
    Host(u64),
    /// Zeros.
    Zero,
    /// The backing file, at the guest offset.
    Backing,
    /// A compressed cluster's stream of `len` bytes at `host`.
    Compressed { host: u64, len: u64 },
}

/// Where a copy-on-write head or tail comes from.
#[derive(Debug, Clone, Copy, Eq, PartialEq)]
enum Cow {
    /// The old host cluster, at this offset.
    Host(u64),
    /// The backing file, at this guest offset.
    Backing(u64),
    /// A compressed cluster (its stream), from byte `skip` of the cluster.
    Compressed { host: u64, len: u64, skip: u64 },
}

/// Ops one task may have outstanding at once.
const MAX_TASK_OPS: u32 = 16;

/// What a full-cluster edit does.
#[derive(Debug, Clone, Copy, Eq, PartialEq)]
pub(super) enum Edit {
    /// Write-zeroes of whole clusters (zero flag on v3).
    Zero { unmap: bool },
    /// Guest discard (reads as zero afterwards).
    Discard,
    /// Drop the mapping entirely (shrink).
    Full,
}

/// The new entry (if it changes) and the mapping whose host space to free (if any) for
/// `edit` on `m`.
///
/// Over a backing file, nothing may make backing data show through again: discarding sets
/// the zero flag (v3) or, in a v2 image, which has no zero flag, keeps the data. (QEMU
/// lets a v2 discard expose the backing file.) Write-zeroes never comes here for v2
/// images with a backing file: it writes zeroes. A compressed cluster cannot be zeroed in
/// place: it goes, like a shared one.
fn edit_entry(
    m: Mapping,
    edit: Edit,
    v3: bool,
    backing: bool,
) -> (Option<L2Entry>, Option<Mapping>) {
    match (m, edit) {
        (Mapping::Unallocated, Edit::Discard) if v3 && backing => {
            (Some(L2Entry::zero(0, false)), None)
        }
        (_, Edit::Discard | Edit::Zero { .. }) if !v3 && backing => (None, None),
        // Like QEMU, zeroing sets the zero flag even where nothing is allocated (a backing
        // file must not show through; without one, qemu-img map then calls it present).
        (Mapping::Unallocated, Edit::Zero { .. }) if v3 => (Some(L2Entry::zero(0, false)), None),
        (Mapping::Unallocated, _) => (None, None),
        (Mapping::Zero { host: 0, .. }, Edit::Full) => (Some(L2Entry(0)), None),
        (Mapping::Zero { host: 0, .. }, _) => (None, None),
        (_, Edit::Full) => (Some(L2Entry(0)), Some(m)),
        (Mapping::Data { .. } | Mapping::Compressed { .. }, _) if !v3 => {
            (Some(L2Entry(0)), Some(m))
        }
        (Mapping::Zero { .. }, Edit::Zero { unmap: false }) => (None, None),
        (Mapping::Data { host, copied: true }, Edit::Zero { unmap: false }) => {
            (Some(L2Entry::zero(host, true)), None)
        }
        _ => (Some(L2Entry::zero(0, false)), Some(m)),
    }
}

impl Image {
    // ---- lookups ----

    /// The L2 table offset under L1 index `l1i`, validated; `None` when unallocated.
    pub(super) fn l1_l2(&mut self, l1i: u64) -> Result<Option<u64>, RequestError> {
        let Some(&raw) = self.l1.get(l1i as usize) else {
            return Ok(None);
        };
        let off = L1Entry(raw).l2_offset();
        if off == 0 {
            return Ok(None);
        }
        if !self.geo.aligned(off) {
            return Err(self.corrupt(Structure::L1Table, raw, CorruptReason::Unaligned));
        }
        if off >= self.file_end {
            // Tables are linked only after their write was issued (which grows `file_end`).
            return Err(self.corrupt(Structure::L2Table, off, CorruptReason::PastEof));
        }
        if let Some(s) = self.metadata_overlap(off, self.geo.cluster_size(), Own::L2) {
            return Err(self.corrupt(Structure::L2Table, off, CorruptReason::Overlap(s)));
        }
        Ok(Some(off))
    }

    /// The cache slot holding guest cluster `gc`'s entry of table `l2`, and its index there.
    pub(super) fn l2_entry_slot(&mut self, l2: u64, gc: u64) -> Result<(u32, usize), Block> {
        let byte = (gc & (self.geo.l2_entries() - 1)) * 8;
        let unit = self.l2.unit as u64;
        let slot = self
            .cached(false, l2 + byte / unit * unit)?
            .expect("L2 lookups always give a slot");
        Ok((slot, ((byte % unit) / 8) as usize))
    }

    pub(super) fn entry(&self, slot: u32, idx: usize) -> L2Entry {
        L2Entry(be64(self.l2.data(slot), idx))
    }

    fn set_entry(&mut self, slot: u32, idx: usize, e: L2Entry) {
        put_be64(self.l2.data_mut(slot), idx, e.0);
    }

    fn per_slice(&self) -> usize {
        self.l2.unit / 8
    }

    /// Decodes and validates the L2 entry of guest cluster `gc`.
    fn mapping(&mut self, e: L2Entry, gc: u64) -> Result<Mapping, RequestError> {
        let cb = self.geo.cluster_bits;
        let m = e.mapping_in(cb, self.has_data_file());
        if self.has_data_file() {
            // (QEMU: "External data file host cluster offset ... does not match guest
            // cluster offset", and no compressed clusters in such images.)
            let reason = match m {
                Mapping::Compressed { .. } => Some(CorruptReason::CompressedInDataFile),
                Mapping::Data { host, .. } if host != gc << cb => {
                    Some(CorruptReason::DataFileOffset)
                }
                Mapping::Zero { host, .. } if host != 0 && host != gc << cb => {
                    Some(CorruptReason::DataFileOffset)
                }
                _ => None,
            };
            if let Some(r) = reason {
                return Err(self.corrupt(Structure::DataCluster, e.0, r));
            }
        }
        match m {
            Mapping::Zero { .. } if self.hdr.version < 3 => {
                Err(self.corrupt(Structure::L2Table, e.0, CorruptReason::ZeroFlagInV2))
            }
            Mapping::Data { host, .. } => self.check_data_cluster(host).map(|()| m),
            Mapping::Compressed { host, .. } => {
                // Byte-packed streams: only where they start is checked (QEMU reads past
                // the end of the file as zeros).
                let reason = if host < self.geo.cluster_size() {
                    Some(CorruptReason::PointsAtHeader)
                } else if host >= self.file_end {
                    Some(CorruptReason::PastEof)
                } else {
                    None
                };
                match reason {
                    Some(r) => Err(self.corrupt(Structure::DataCluster, host, r)),
                    None => Ok(m),
                }
            }
            Mapping::Zero { host, .. } if host != 0 => self.check_data_cluster(host).map(|()| m),
            _ => Ok(m),
        }
    }

    /// The in-flight data allocation covering guest cluster `gc`, if any.
    pub(super) fn alloc_covering(&self, gc: u64) -> bool {
        self.alloc_free.len() < self.allocs.len()
            && self.allocs.iter().flatten().any(|a| match a.what {
                AllocWhat::Data { guest_cluster, .. } => {
                    (guest_cluster..guest_cluster + a.count).contains(&gc)
                }
                AllocWhat::Compressed { guest_cluster, .. } => guest_cluster == gc,
                AllocWhat::L2Table { .. } => false,
            })
    }

    pub(super) fn new_alloc(&mut self, a: Alloc) -> u32 {
        let i = self
            .alloc_free
            .pop()
            .expect("allocation slots outnumber tasks");
        self.allocs[i as usize] = Some(a);
        i
    }

    fn drop_alloc(&mut self, a: u32) -> Alloc {
        self.alloc_free.push(a);
        self.allocs[a as usize].take().expect("live allocation")
    }

    // ---- read ----

    pub(super) fn step_read(&mut self, t: u32) -> bool {
        let cb = self.geo.cluster_bits;
        loop {
            let task = self.task(t);
            let (pos, end, origin, req) = (task.pos, task.end, task.origin, task.req);
            if task.error.is_some() || pos >= end {
                return task.inflight == 0;
            }
            if task.inflight >= MAX_TASK_OPS || !self.op_room(1) {
                return false;
            }
            let gc = pos >> cb;
            if self.alloc_covering(gc) {
                return false;
            }
            let l1i = gc >> self.geo.l2_bits;
            let (mut extent_end, mut src) = match self.l1_l2(l1i) {
                Err(e) => {
                    self.task(t).error = Some(e);
                    continue;
                }
                Ok(None) => (
                    end.min((l1i + 1) << (cb + self.geo.l2_bits)),
                    self.unallocated_src(),
                ),
                Ok(Some(l2)) => match self.read_extent(l2, gc, end) {
                    Ok(x) => x,
                    Err(Block::Park) => return false,
                    Err(Block::Fail(e)) => {
                        self.task(t).error = Some(e);
                        continue;
                    }
                },
            };
            if src == Src::Backing && self.backing.is_none() {
                self.task(t).error = Some(RequestError::Unsupported(Feature::BackingFile));
                continue;
            }
            if src == Src::Backing {
                let size = self.backing.as_ref().map_or(0, |b| b.size);
                if pos >= size {
                    // Past the end of a shorter backing file: zeros.
                    src = Src::Zero;
                } else {
                    extent_end = extent_end.min(size);
                    if !self.backing_room(1) || !self.backing_read(t, pos, extent_end) {
                        return false;
                    }
                    let task = self.task(t);
                    task.inflight += 1;
                    task.pos = extent_end;
                    continue;
                }
            }
            if let Src::Compressed { host, len: stream } = src {
                let buf = self.staging_buf(stream as usize);
                let purpose = Purpose::CompressedRead {
                    task: t,
                    skip: (pos - (gc << cb)) as u32,
                    start: (pos - origin) as usize,
                    len: (extent_end - pos) as u32,
                };
                self.issue_buf(purpose, IoKind::Read, host, buf);
                let task = self.task(t);
                task.inflight += 1;
                task.pos = extent_end;
                continue;
            }
            let host = match src {
                Src::Host(h) => Some(h),
                _ => None,
            };
            let len = (extent_end - pos) as usize;
            let mut segs = ArrayVec::new();
            segs.push(Segment::Guest {
                req,
                start: (pos - origin) as usize,
                len,
            });
            match host {
                Some(h) => self.issue(
                    Purpose::Guest {
                        task: t,
                        write: false,
                    },
                    IoKind::Read,
                    h + (pos - (gc << cb)),
                    segs,
                ),
                None => self.issue(
                    Purpose::Guest {
                        task: t,
                        write: false,
                    },
                    IoKind::ZeroFill,
                    0,
                    segs,
                ),
            }
            let task = self.task(t);
            task.inflight += 1;
            task.pos = extent_end;
        }
    }

    /// Whether the image has a backing file (attached or not: opened with
    /// [`ImageConfig::skip_backing`](crate::ImageConfig::skip_backing), its data cannot be
    /// read, and zeroing must still hide it).
    pub(super) fn names_backing(&self) -> bool {
        self.layout
            .as_ref()
            .is_some_and(|l| l.backing_file.is_some())
    }

    /// What unallocated clusters read as: the backing file, or zeros without one.
    fn unallocated_src(&self) -> Src {
        if self.names_backing() {
            Src::Backing
        } else {
            Src::Zero
        }
    }

    /// The extent starting at guest cluster `gc`: its end and where it reads from.
    fn read_extent(&mut self, l2: u64, gc: u64, end: u64) -> Result<(u64, Src), Block> {
        let cb = self.geo.cluster_bits;
        let cs = self.geo.cluster_size();
        let (slot, idx) = self.l2_entry_slot(l2, gc)?;
        let first = self.mapping(self.entry(slot, idx), gc)?;
        // (Fixed for the whole walk: worked out once, not per entry.)
        let (unallocated, v3, data_file) = (
            self.unallocated_src(),
            self.hdr.version >= 3,
            self.has_data_file(),
        );
        let src_of = |m: Mapping| match m {
            Mapping::Data { host, .. } => Some(Src::Host(host)),
            Mapping::Compressed { .. } => None,
            Mapping::Unallocated => Some(unallocated),
            // (A zero flag in a v2 image is corruption: never merged into an extent.)
            Mapping::Zero { .. } if !v3 => None,
            Mapping::Zero { .. } => Some(Src::Zero),
        };
        let src = match first {
            Mapping::Compressed { host, len } => {
                // One cluster at a time: each has a stream of its own.
                return Ok((end.min((gc + 1) << cb), Src::Compressed { host, len }));
            }
            Mapping::Zero { .. } => Src::Zero,
            m => src_of(m).expect("data and unallocated entries have a source"),
        };
        let mut n = 1;
        while idx + n < self.per_slice()
            && (gc + n as u64) << cb < end
            && !self.alloc_covering(gc + n as u64)
        {
            let m = self.entry(slot, idx + n).mapping_in(cb, data_file);
            let same = match (src, src_of(m)) {
                (Src::Host(h), Some(Src::Host(h2))) => h2 == h + n as u64 * cs,
                (a, Some(b)) => a == b && !matches!(a, Src::Host(_)),
                _ => false,
            };
            if !same {
                break;
            }
            n += 1;
        }
        Ok((end.min((gc + n as u64) << cb), src))
    }

    // ---- compressed clusters ----

    /// Frees the host space of a mapping dropped from an L2 entry: its cluster, or every
    /// cluster a compressed stream touches (each holds one reference per stream).
    pub(super) fn free_mapping(&mut self, m: Mapping) {
        if self.has_data_file() {
            // Data-file clusters have no refcounts: nothing to free.
            return;
        }
        match m {
            Mapping::Data { host, .. } | Mapping::Zero { host, .. } if host != 0 => {
                self.queue_free(host)
            }
            Mapping::Compressed { host, len } => {
                let cs = self.geo.cluster_size();
                let mut c = host / cs * cs;
                while c < host + len {
                    self.queue_free(c);
                    c += cs;
                }
            }
            _ => {}
        }
    }

    /// The decompression op for a stream read into `input`: output into `out`, bytes
    /// `skip..` of the cluster.
    fn issue_decompress(&mut self, purpose: Purpose, input: IoBuf, skip: u32, out: Segment) {
        let cs = self.geo.cluster_size() as usize;
        let mut segs = ArrayVec::new();
        segs.push(Segment::Buf(input));
        segs.push(Segment::Buf(self.staging_buf(cs)));
        segs.push(out);
        let kind = IoKind::Decompress {
            cluster_size: cs as u32,
            skip,
            zstd: self.hdr.compression_type == 1,
        };
        self.issue(purpose, kind, 0, segs);
    }

    /// The buffer a finished read of a compressed stream carries, or its error.
    fn stream_read(
        &mut self,
        op: IoOp,
        result: Result<(), IoError>,
    ) -> Result<IoBuf, RequestError> {
        match (result, op.segments.into_iter().next()) {
            (Ok(()), Some(Segment::Buf(b))) => Ok(b),
            (Err(e), seg) => {
                if let Some(Segment::Buf(b)) = seg {
                    self.put_staging(b);
                }
                Err(self.io_error(e))
            }
            (Ok(()), _) => Err(RequestError::Closed),
        }
    }

    /// A compressed stream for a guest read came in: decompress it into the guest buffer.
    /// (The stream's op slot just came back: there is room for the decompression.)
    pub(super) fn compressed_read_done(
        &mut self,
        t: u32,
        (skip, start, len): (u32, usize, u32),
        op: IoOp,
        result: Result<(), IoError>,
    ) {
        let input = match self.stream_read(op, result) {
            Ok(b) => b,
            Err(e) => return self.task_io_done(t, Err(e)),
        };
        let req = self.task(t).req;
        let out = Segment::Guest {
            req,
            start,
            len: len as usize,
        };
        self.issue_decompress(Purpose::Decompress { task: t }, input, skip, out);
    }

    /// A compressed stream for copy-on-write came in: decompress the part into staging.
    pub(super) fn compressed_cow_done(
        &mut self,
        a: u32,
        part: u8,
        skip: u32,
        op: IoOp,
        result: Result<(), IoError>,
    ) {
        let input = match self.stream_read(op, result) {
            Ok(b) => b,
            Err(e) => return self.cow_part_done(a, part, Err(e)),
        };
        let len = match &self.allocs[a as usize]
            .as_ref()
            .expect("live allocation")
            .what
        {
            AllocWhat::Data { head, tail, .. } => [*head, *tail][part as usize],
            AllocWhat::L2Table { .. } | AllocWhat::Compressed { .. } => 0,
        };
        let out = Segment::Buf(self.staging_buf(len as usize));
        self.issue_decompress(Purpose::DecompressCow { alloc: a, part }, input, skip, out);
    }

    /// A failed decompression: a stream that does not decompress is corruption.
    pub(super) fn decompress_error(&mut self, e: IoError) -> RequestError {
        if e.kind == std::io::ErrorKind::InvalidData {
            RequestError::Corrupt(crate::error::Corruption {
                structure: Structure::DataCluster,
                offset: 0,
                reason: CorruptReason::BadCompressedData,
            })
        } else {
            self.io_error(e)
        }
    }

    // ---- write and write-zeroes ----

    pub(super) fn step_write(&mut self, t: u32) -> bool {
        let cb = self.geo.cluster_bits;
        loop {
            if !self.settle_alloc(t) {
                return false;
            }
            let task = self.task(t);
            let (pos, end, kind) = (task.pos, task.end, task.kind);
            if task.error.is_some() || pos >= end {
                if task.inflight > 0 {
                    return false;
                }
                let wrote = task.wrote && task.error.is_none();
                if wrote && self.config.cache_mode == CacheMode::WriteThrough {
                    return self.wait_for_cycle(t);
                }
                return true;
            }
            if self.pending_frees.len() >= PENDING_FREES_CAP {
                self.cycle_wanted = true;
                return false;
            }
            if self.task(t).inflight >= MAX_TASK_OPS || !self.op_room(3) {
                return false;
            }
            let gc = pos >> cb;
            if self.alloc_covering(gc) {
                return false;
            }
            // (A v2 image cannot hide its backing file behind zero flags: it writes zeroes.)
            let zero_flags = self.hdr.version >= 3 || !self.names_backing();
            let result = match kind {
                Kind::Zeroes { unmap } if zero_flags && self.full_cluster_at(pos, end) => {
                    self.edit_clusters(t, Edit::Zero { unmap })
                }
                Kind::Zeroes { .. } => self.write_piece(t, Body::Zeroes),
                _ => self.write_piece(t, Body::Guest),
            };
            match result {
                Ok(()) => {}
                Err(Block::Park) => return false,
                Err(Block::Fail(e)) => {
                    self.task(t).error.get_or_insert(e);
                }
            }
        }
    }

    /// Whether `[pos, end)` starts with a whole cluster (the partial last cluster of the
    /// image counts as whole).
    pub(super) fn full_cluster_at(&self, pos: u64, end: u64) -> bool {
        let cs = self.geo.cluster_size();
        pos % cs == 0 && (end - pos >= cs || end == self.hdr.size)
    }

    /// Handles the pending allocation of task `t`; false while it must wait.
    pub(super) fn settle_alloc(&mut self, t: u32) -> bool {
        let Some(a) = self.task(t).alloc else {
            return true;
        };
        let alloc = self.allocs[a as usize]
            .as_ref()
            .expect("task allocations are live");
        // A failed allocation is given up only once none of its I/O is in flight: the
        // request's `Done` must not come while an op still uses its buffer (nor may the
        // clusters be freed under it).
        if alloc.busy() {
            return false;
        }
        match alloc.state {
            AllocState::Io => false,
            AllocState::Failed(e) => {
                self.abort_alloc(a);
                let task = self.task(t);
                task.alloc = None;
                task.error.get_or_insert(e);
                true
            }
            AllocState::Ready => match self.link_data(a) {
                Ok(()) => {
                    self.task(t).alloc = None;
                    true
                }
                Err(Block::Park) => false,
                Err(Block::Fail(e)) => {
                    self.abort_alloc(a);
                    let task = self.task(t);
                    task.alloc = None;
                    task.error.get_or_insert(e);
                    true
                }
            },
        }
    }

    /// Gives back the clusters of an allocation that will never be linked.
    fn abort_alloc(&mut self, a: u32) {
        let alloc = self.drop_alloc(a);
        let first = alloc.host >> self.geo.cluster_bits << self.geo.cluster_bits;
        let refcounted = !(self.has_data_file() && matches!(alloc.what, AllocWhat::Data { .. }));
        for i in 0..alloc.count {
            if refcounted {
                self.queue_free(first + (i << self.geo.cluster_bits));
            }
        }
        if let AllocWhat::Data { staged, .. } = alloc.what {
            for b in staged.into_iter().flatten() {
                self.put_staging(b);
            }
        }
        self.wake_all();
    }

    /// One run of a write at the task's position: in place, or into new clusters.
    pub(super) fn write_piece(&mut self, t: u32, body: Body) -> Result<(), Block> {
        let cb = self.geo.cluster_bits;
        let cs = self.geo.cluster_size();
        let task = self.task(t);
        let (pos, end, origin, req) = (task.pos, task.end, task.origin, task.req);
        let gc = pos >> cb;
        let l2 = self.owned_l2(t, gc >> self.geo.l2_bits)?;
        let (slot, idx) = self.l2_entry_slot(l2, gc)?;
        let first = self.mapping(self.entry(slot, idx), gc)?;
        let limit = |n: usize| (gc + n as u64) << cb;
        let body_seg = |start: u64, len: u64| match body {
            Body::Guest => Segment::Guest {
                req,
                start: (start - origin) as usize,
                len: len as usize,
            },
            Body::Zeroes => Segment::Zeroes(len as usize),
        };
        match first {
            Mapping::Data { host, copied: true } => {
                let mut n = 1;
                while idx + n < self.per_slice()
                    && limit(n) < end
                    && !self.alloc_covering(gc + n as u64)
                    && self
                        .entry(slot, idx + n)
                        .mapping_in(cb, self.has_data_file())
                        == (Mapping::Data {
                            host: host + n as u64 * cs,
                            copied: true,
                        })
                {
                    n += 1;
                }
                let run_end = end.min(limit(n));
                let mut segs = ArrayVec::new();
                segs.push(body_seg(pos, run_end - pos));
                self.issue(
                    Purpose::Guest {
                        task: t,
                        write: true,
                    },
                    IoKind::Write,
                    host + (pos - (gc << cb)),
                    segs,
                );
                let task = self.task(t);
                task.inflight += 1;
                task.pos = run_end;
                task.wrote = true;
                Ok(())
            }
            Mapping::Zero { .. } if body == Body::Zeroes => {
                // Reads as zero already.
                self.task(t).pos = end.min(limit(1));
                Ok(())
            }
            Mapping::Unallocated if body == Body::Zeroes && !self.names_backing() => {
                // A partial zero write into a cluster that reads as zero: like QEMU, the
                // whole cluster gets the zero flag (v3), nothing is written.
                if first == Mapping::Unallocated && self.hdr.version >= 3 {
                    self.set_entry(slot, idx, L2Entry::zero(0, false));
                }
                self.task(t).pos = end.min(limit(1));
                Ok(())
            }
            _ => {
                let mut n = 1;
                if body == Body::Guest {
                    while idx + n < self.per_slice()
                        && limit(n) < end
                        && !self.alloc_covering(gc + n as u64)
                    {
                        match self
                            .entry(slot, idx + n)
                            .mapping_in(cb, self.has_data_file())
                        {
                            Mapping::Data { copied: true, .. } | Mapping::Compressed { .. } => {
                                break
                            }
                            _ => n += 1,
                        }
                    }
                }
                if self.names_backing() && !self.backing_room(2) {
                    return Err(Block::Park);
                }
                let (host, got) = self.alloc_data(gc, n as u64)?;
                let body_end = end.min(limit(got as usize));
                let head = pos - (gc << cb);
                let tail = limit(got as usize) - body_end;
                let last = self
                    .entry(slot, idx + got as usize - 1)
                    .mapping_in(cb, self.has_data_file());
                // Head and tail come from the old cluster, or through to the backing file
                // (while inside it), or are zeros.
                if self.names_backing() && self.backing.is_none() {
                    // Opened without its backing file: the head and tail cannot be copied.
                    let from_backing = |m: Mapping, len: u64| len > 0 && m == Mapping::Unallocated;
                    let last = self
                        .entry(slot, idx + n - 1)
                        .mapping_in(cb, self.has_data_file());
                    let tail = limit(n) - end.min(limit(n));
                    if from_backing(first, pos - (gc << cb)) || from_backing(last, tail) {
                        return Err(RequestError::Unsupported(Feature::BackingFile).into());
                    }
                }
                let backing_size = self.backing.as_ref().map(|b| b.size);
                let cow = |m: Mapping, host_off: u64, at: u64, len: u64| match m {
                    _ if len == 0 => None,
                    Mapping::Data { host: h, .. } => Some(Cow::Host(h + host_off)),
                    Mapping::Compressed { host, len: stream } => Some(Cow::Compressed {
                        host,
                        len: stream,
                        skip: host_off,
                    }),
                    Mapping::Unallocated if backing_size.is_some_and(|s| at < s) => {
                        Some(Cow::Backing(at))
                    }
                    _ => None,
                };
                let cow_head = cow(first, 0, gc << cb, head);
                let cow_tail = cow(last, cs - tail, body_end, tail);
                let a = self.new_alloc(Alloc {
                    task: t,
                    what: AllocWhat::Data {
                        guest_cluster: gc,
                        head,
                        body_start: (pos - origin) as usize,
                        body_len: (body_end - pos) as usize,
                        body,
                        tail,
                        staged: [None, None],
                        cow_pending: u8::from(cow_head.is_some()) + u8::from(cow_tail.is_some()),
                    },
                    host,
                    count: got,
                    state: AllocState::Io,
                    io_pending: 0,
                });
                let task = self.task(t);
                task.alloc = Some(a);
                task.pos = body_end;
                task.wrote = true;
                for (part, src, len) in [(0u8, cow_head, head), (1, cow_tail, tail)] {
                    match src {
                        Some(Cow::Host(src)) => {
                            let buf = self.staging_buf(len as usize);
                            let purpose = Purpose::CowRead { alloc: a, part };
                            self.issue_buf(purpose, IoKind::Read, src, buf);
                        }
                        Some(Cow::Backing(at)) => self.backing_cow_read(a, part, at, len),
                        Some(Cow::Compressed {
                            host,
                            len: stream,
                            skip,
                        }) => {
                            let buf = self.staging_buf(stream as usize);
                            let purpose = Purpose::CompressedCow {
                                alloc: a,
                                part,
                                skip: skip as u32,
                            };
                            self.issue_buf(purpose, IoKind::Read, host, buf);
                        }
                        None => {}
                    }
                }
                if cow_head.is_none() && cow_tail.is_none() {
                    self.issue_alloc_write(a);
                }
                Ok(())
            }
        }
    }

    /// The single vectored write of an allocation: COW head, body, COW tail.
    fn issue_alloc_write(&mut self, a: u32) {
        let req = self.allocs[a as usize]
            .as_ref()
            .map(|x| self.tasks[x.task as usize].as_ref().map(|t| t.req));
        let alloc = self.allocs[a as usize].as_mut().expect("live allocation");
        let AllocWhat::Data {
            head,
            body_start,
            body_len,
            body,
            tail,
            staged,
            ..
        } = &mut alloc.what
        else {
            return;
        };
        let mut segs = ArrayVec::new();
        match staged[0].take() {
            Some(b) => segs.push(Segment::Buf(b)),
            None if *head > 0 => segs.push(Segment::Zeroes(*head as usize)),
            None => {}
        }
        if *body_len > 0 {
            match (body, req.flatten()) {
                (Body::Guest, Some(req)) => segs.push(Segment::Guest {
                    req,
                    start: *body_start,
                    len: *body_len,
                }),
                _ => segs.push(Segment::Zeroes(*body_len)),
            }
        }
        match staged[1].take() {
            Some(b) => segs.push(Segment::Buf(b)),
            None if *tail > 0 => segs.push(Segment::Zeroes(*tail as usize)),
            None => {}
        }
        let mut host = alloc.host;
        let mut edges = [None, None];
        // Clusters past the end of the file read as zero already: instead of writing zeroes
        // around the data of a fresh allocation, allocate those edges (like QEMU's zero
        // range over the new cluster), concurrently, since the ranges are disjoint. (Not in
        // an external data file: the guest offset's old bytes are there.)
        if host >= self.file_end && !self.has_data_file() {
            if let Some(&Segment::Zeroes(n)) = segs.first() {
                edges[0] = Some((host, n as u64));
                host += n as u64;
                segs.remove(0);
            }
            if segs.len() > 1 {
                if let Some(&Segment::Zeroes(n)) = segs.last() {
                    let data: u64 = segs.iter().map(|s| s.len() as u64).sum();
                    edges[1] = Some((host + data - n as u64, n as u64));
                    segs.pop();
                }
            }
        }
        if segs.is_empty() {
            segs.push(Segment::Zeroes(0));
        }
        self.issue(Purpose::AllocWrite { alloc: a }, IoKind::Write, host, segs);
        let mut pending = 1;
        for (offset, len) in edges.into_iter().flatten() {
            // Optional (the bytes read as zero either way): only when an op slot is free.
            if self.op_room(1) {
                self.issue_bare(
                    Purpose::AllocWrite { alloc: a },
                    IoKind::Allocate { len },
                    offset,
                );
                pending += 1;
            }
        }
        self.allocs[a as usize]
            .as_mut()
            .expect("live allocation")
            .io_pending = pending;
    }

    pub(super) fn alloc_write_done(&mut self, a: u32, op: IoOp, result: Result<(), IoError>) {
        self.recycle(op);
        let result = result.map_err(|e| self.io_error(e));
        let alloc = self.allocs[a as usize].as_mut().expect("live allocation");
        alloc.io_pending -= 1;
        if let Err(err) = result {
            alloc.state = AllocState::Failed(err);
        }
        if alloc.io_pending > 0 {
            return;
        }
        if alloc.state == AllocState::Io {
            alloc.state = AllocState::Ready;
            self.unsynced_data = true;
        }
        let t = alloc.task;
        self.make_runnable(t);
    }

    pub(super) fn cow_read_done(
        &mut self,
        a: u32,
        part: u8,
        op: IoOp,
        result: Result<(), IoError>,
    ) {
        if let Some(Segment::Buf(b)) = op.segments.into_iter().next() {
            self.set_staged(a, part, b);
        }
        let result = result.map_err(|e| self.io_error(e));
        self.cow_part_done(a, part, result);
    }

    /// Puts `buf` in as part `part` (0 head, 1 tail) of allocation `a`'s staging.
    pub(super) fn set_staged(&mut self, a: u32, part: u8, buf: IoBuf) {
        let alloc = self.allocs[a as usize].as_mut().expect("live allocation");
        if let AllocWhat::Data { staged, .. } = &mut alloc.what {
            staged[part as usize] = Some(buf);
        }
    }

    /// `len` bytes from `start` of part `part` of allocation `a`'s staging buffer.
    pub(super) fn staging_slice(
        &mut self,
        a: u32,
        part: u8,
        start: usize,
        len: usize,
    ) -> &mut [u8] {
        let alloc = self.allocs[a as usize].as_mut().expect("live allocation");
        match &mut alloc.what {
            AllocWhat::Data { staged, .. } => match staged[part as usize].as_mut() {
                Some(b) => &mut b.as_mut_slice()[start..start + len],
                None => &mut [],
            },
            AllocWhat::L2Table { .. } | AllocWhat::Compressed { .. } => &mut [],
        }
    }

    /// One copy-on-write part of allocation `a` is in its staging buffer (or failed).
    pub(super) fn cow_part_done(&mut self, a: u32, _part: u8, result: Result<(), RequestError>) {
        let alloc = self.allocs[a as usize].as_mut().expect("live allocation");
        let AllocWhat::Data { cow_pending, .. } = &mut alloc.what else {
            return;
        };
        *cow_pending -= 1;
        if let Err(err) = result {
            alloc.state = AllocState::Failed(err);
        }
        if *cow_pending > 0 {
            return;
        }
        if alloc.state == AllocState::Io {
            self.issue_alloc_write(a);
        } else {
            let t = alloc.task;
            self.make_runnable(t);
        }
    }

    /// Publishes a finished data allocation in its L2 table and frees what it replaced.
    fn link_data(&mut self, a: u32) -> Result<(), Block> {
        if self.window {
            return Err(Block::Park);
        }
        let cb = self.geo.cluster_bits;
        let alloc = self.allocs[a as usize].as_ref().expect("live allocation");
        let (host, count) = (alloc.host, alloc.count);
        let (gc, stream) = match alloc.what {
            AllocWhat::Data { guest_cluster, .. } => (guest_cluster, None),
            AllocWhat::Compressed { guest_cluster, len } => (guest_cluster, Some(len)),
            AllocWhat::L2Table { .. } => return Ok(()),
        };
        let l1i = gc >> self.geo.l2_bits;
        let raw = self.l1[l1i as usize];
        if raw & COPIED == 0 {
            return Err(RequestError::Corrupt(crate::error::Corruption {
                structure: Structure::L1Table,
                offset: raw,
                reason: CorruptReason::Refcount,
            })
            .into());
        }
        let (slot, idx) = self.l2_entry_slot(raw & OFFSET_MASK, gc)?;
        if let Some(len) = stream {
            let entry = crate::codec::compressed_entry(host, len, cb)
                .expect("streams are shorter than a cluster, placed below 2^56");
            self.set_entry(slot, idx, L2Entry(entry));
            self.drop_alloc(a);
            self.wake_all();
            return Ok(());
        }
        for i in 0..count as usize {
            let m = self
                .entry(slot, idx + i)
                .mapping_in(cb, self.has_data_file());
            if !matches!(m, Mapping::Data { copied: true, .. }) {
                // (Unallocated and zero-without-host entries free nothing.)
                self.free_mapping(m);
            }
            self.set_entry(
                slot,
                idx + i,
                L2Entry::data(host + ((i as u64) << cb), true),
            );
        }
        self.drop_alloc(a);
        self.wake_all();
        Ok(())
    }

    // ---- L2 tables ----

    /// The L2 table of L1 index `l1i`, writable in place; starts making one (new, or a copy
    /// of a table shared with a snapshot) and parks when there is none.
    pub(super) fn owned_l2(&mut self, t: u32, l1i: u64) -> Result<u64, Block> {
        let raw = self.l1[l1i as usize];
        let old = match self.l1_l2(l1i)? {
            Some(off) if raw & COPIED != 0 => return Ok(off),
            Some(off) => off,
            None => 0,
        };
        let busy = self
            .allocs
            .iter()
            .flatten()
            .any(|a| matches!(a.what, AllocWhat::L2Table { l1_index, .. } if l1_index == l1i));
        if busy || self.window || !self.op_room(2) {
            return Err(Block::Park);
        }
        let (host, _) = self.alloc_clusters(1, false)?;
        let a = self.new_alloc(Alloc {
            task: t,
            what: AllocWhat::L2Table { l1_index: l1i, old },
            host,
            count: 1,
            state: AllocState::Io,
            io_pending: 0,
        });
        let cs = self.geo.cluster_size() as usize;
        if old == 0 {
            let mut segs = ArrayVec::new();
            segs.push(Segment::Zeroes(cs));
            self.issue(Purpose::TableWrite { alloc: a }, IoKind::Write, host, segs);
        } else {
            let buf = self.staging_buf(cs);
            self.issue_buf(Purpose::TableRead { alloc: a }, IoKind::Read, old, buf);
        }
        Err(Block::Park)
    }

    pub(super) fn table_read_done(&mut self, a: u32, op: IoOp, result: Result<(), IoError>) {
        if let Err(e) = result {
            self.recycle(op);
            return self.table_failed(a, e);
        }
        let host = self.allocs[a as usize]
            .as_ref()
            .expect("live allocation")
            .host;
        self.issue(
            Purpose::TableWrite { alloc: a },
            IoKind::Write,
            host,
            op.segments,
        );
    }

    pub(super) fn table_write_done(&mut self, a: u32, op: IoOp, result: Result<(), IoError>) {
        self.recycle(op);
        if let Err(e) = result {
            return self.table_failed(a, e);
        }
        // Like completed data, the new table must be made durable by the next cycle's first
        // barrier before its L1 entry is written (rule D): that cycle may have nothing else
        // to write before it, when the table's refcount went out in an earlier cycle.
        self.unsynced_data = true;
        self.allocs[a as usize]
            .as_mut()
            .expect("live allocation")
            .state = AllocState::Ready;
        self.try_link_table(a);
    }

    fn table_failed(&mut self, a: u32, e: IoError) {
        let err = self.io_error(e);
        let t = self.allocs[a as usize]
            .as_ref()
            .expect("live allocation")
            .task;
        self.abort_alloc(a);
        if let Some(task) = self.tasks[t as usize].as_mut() {
            task.error.get_or_insert(err);
        }
    }

    fn try_link_table(&mut self, a: u32) {
        if self.window {
            return;
        }
        let alloc = self.drop_alloc(a);
        let AllocWhat::L2Table { l1_index, old } = alloc.what else {
            return;
        };
        if old == 0 && self.l2.unit as u64 == self.geo.cluster_size() {
            // The table was just written as zeroes: cache it without reading it back.
            self.l2.insert_clean_zeroed(alloc.host);
        }
        self.set_l1(l1_index as usize, L1Entry::new(alloc.host, true).0);
        self.l1_dirty[l1_index as usize * 8 / TABLE_CHUNK] = true;
        if old != 0 {
            self.queue_free(old);
        }
        self.wake_all();
    }

    /// Links L2 tables whose writes finished while a cycle was taking its copies.
    pub(super) fn link_ready_tables(&mut self) {
        for a in 0..self.allocs.len() as u32 {
            let ready = self.allocs[a as usize].as_ref().is_some_and(|x| {
                x.state == AllocState::Ready && matches!(x.what, AllocWhat::L2Table { .. })
            });
            if ready {
                self.try_link_table(a);
            }
        }
    }

    // ---- whole-cluster edits: zeroes and discard ----

    /// Edits the run of whole clusters at the task's position (within one L2 slice).
    pub(super) fn edit_clusters(&mut self, t: u32, edit: Edit) -> Result<(), Block> {
        if self.window {
            return Err(Block::Park);
        }
        let cb = self.geo.cluster_bits;
        let task = self.task(t);
        let (pos, end) = (task.pos, task.end);
        // Whole clusters only; the image's partial last cluster counts as whole.
        let full_end = if end == self.hdr.size {
            end
        } else {
            end >> cb << cb
        };
        let gc = pos >> cb;
        let l1i = gc >> self.geo.l2_bits;
        let v3 = self.hdr.version >= 3;
        let hides_backing = match edit {
            Edit::Zero { .. } => v3,
            Edit::Discard => v3 && self.names_backing(),
            Edit::Full => false,
        };
        if self.l1_l2(l1i)?.is_none() && !hides_backing {
            // No table: nothing to drop, and nothing to hide (or no way to: v2).
            self.task(t).pos = full_end
                .max(pos)
                .min((l1i + 1) << (cb + self.geo.l2_bits))
                .max(pos + 1)
                .min(end);
            return Ok(());
        }
        let l2 = self.owned_l2(t, l1i)?;
        let (slot, idx) = self.l2_entry_slot(l2, gc)?;
        let mut n = 0;
        while idx + n < self.per_slice()
            && (gc + n as u64) << cb < full_end
            && !self.alloc_covering(gc + n as u64)
        {
            let m = self.mapping(self.entry(slot, idx + n), gc + n as u64)?;
            let (new, free) = edit_entry(m, edit, v3, self.names_backing());
            if let Some(e) = new {
                self.set_entry(slot, idx + n, e);
            }
            if let Some(m) = free {
                self.free_mapping(m);
            }
            n += 1;
        }
        if n > 0 && self.data_file_raw() && edit != Edit::Full {
            // The data file stays a valid raw image: what now reads as zero is zeroed
            // there too (QEMU's qcow2_subcluster_zeroize; a discard becomes zeroes).
            let start = gc << cb;
            let len = (((gc + n as u64) << cb).min(self.hdr.size)) - start;
            self.issue_bare_at(
                crate::io::Target::DataFile,
                Purpose::TaskIo { task: t },
                IoKind::WriteZeroes { len },
                start,
            );
            self.task(t).inflight += 1;
        }
        let task = self.task(t);
        task.pos = end.min((gc + n.max(1) as u64) << cb);
        task.wrote = true;
        Ok(())
    }

    pub(super) fn step_discard(&mut self, t: u32) -> bool {
        let cs = self.geo.cluster_size();
        let size = self.hdr.size;
        let task = self.task(t);
        if task.sub == 0 {
            // Discard works on whole clusters inside the range.
            task.sub = 1;
            task.pos = task.pos.next_multiple_of(cs);
            if task.end != size {
                task.end = task.end / cs * cs;
            }
        }
        self.step_edits(t, Edit::Discard)
    }

    /// Applies `edit` to the whole clusters of the task's range, a run at a time (discard,
    /// make-empty).
    pub(super) fn step_edits(&mut self, t: u32, edit: Edit) -> bool {
        loop {
            let task = self.task(t);
            if task.error.is_some() || task.pos >= task.end {
                return task.inflight == 0;
            }
            if self.pending_frees.len() >= PENDING_FREES_CAP {
                self.cycle_wanted = true;
                return false;
            }
            let gc = self.task(t).pos >> self.geo.cluster_bits;
            if self.alloc_covering(gc) || !self.op_room(2) {
                return false;
            }
            match self.edit_clusters(t, edit) {
                Ok(()) => {}
                Err(Block::Park) => return false,
                Err(Block::Fail(e)) => {
                    self.task(t).error.get_or_insert(e);
                }
            }
        }
    }

    // ---- block status ----

    pub(super) fn step_status(&mut self, t: u32) -> bool {
        let cb = self.geo.cluster_bits;
        let cs = self.geo.cluster_size();
        let task = self.task(t);
        let (pos, end) = (task.pos, task.end);
        if task.error.is_some() || pos >= end || task.status.is_some() || task.inflight > 0 {
            // (A status from the backing file lands while the task waits for it.)
            return task.inflight == 0;
        }
        let gc = pos >> cb;
        if self.alloc_covering(gc) {
            return false;
        }
        let l1i = gc >> self.geo.l2_bits;
        let l2_span = cb + self.geo.l2_bits;
        let found = match self.l1_l2(l1i) {
            Err(e) => Err(Block::Fail(e)),
            Ok(None) => {
                let mut next = l1i + 1;
                while (next << l2_span) < end
                    && self
                        .l1
                        .get(next as usize)
                        .is_some_and(|&e| L1Entry(e).l2_offset() == 0)
                {
                    next += 1;
                }
                Ok((end.min(next << l2_span), Allocation::Unallocated))
            }
            Ok(Some(l2)) => self.l2_entry_slot(l2, gc).and_then(|(slot, idx)| {
                let first = self.mapping(self.entry(slot, idx), gc)?;
                let class = |m: Mapping| match m {
                    Mapping::Unallocated => 0,
                    Mapping::Zero { host: 0, .. } => 1,
                    Mapping::Zero { .. } => 2,
                    Mapping::Data { .. } => 3,
                    Mapping::Compressed { .. } => 4,
                };
                let mut n = 1;
                while idx + n < self.per_slice() && (gc + n as u64) << cb < end {
                    let m = self
                        .entry(slot, idx + n)
                        .mapping_in(cb, self.has_data_file());
                    let same = class(m) == class(first)
                        && match (first, m) {
                            (Mapping::Data { host: a, .. }, Mapping::Data { host: b, .. })
                            | (Mapping::Zero { host: a, .. }, Mapping::Zero { host: b, .. }) => {
                                b == a + n as u64 * cs
                            }
                            _ => true,
                        };
                    if !same {
                        break;
                    }
                    n += 1;
                }
                let inner = pos - (gc << cb);
                let allocation = match first {
                    Mapping::Unallocated => Allocation::Unallocated,
                    Mapping::Zero { host: 0, .. } => Allocation::Zero { host: None },
                    Mapping::Zero { host, .. } => Allocation::Zero {
                        host: Some(host + inner),
                    },
                    Mapping::Data { host, .. } => Allocation::Data { host: host + inner },
                    Mapping::Compressed { .. } => Allocation::Compressed,
                };
                Ok((end.min((gc + n as u64) << cb), allocation))
            }),
        };
        let size = self.backing.as_ref().map(|b| b.size);
        match found {
            Err(Block::Park) => return false,
            Err(Block::Fail(e)) => self.task(t).error = Some(e),
            Ok((extent_end, Allocation::Unallocated)) if size.is_some_and(|s| pos < s) => {
                // Ask the backing file (up to its end).
                let extent_end = extent_end.min(size.unwrap_or(0));
                return self.backing_status(t, pos, extent_end);
            }
            Ok((extent_end, allocation)) => {
                self.task(t).status = Some(BlockStatus {
                    offset: pos,
                    len: extent_end - pos,
                    allocation,
                    depth: 0,
                });
            }
        }
        true
    }

    // ---- preallocation ----

    pub(super) fn step_prealloc(&mut self, t: u32) -> bool {
        let cb = self.geo.cluster_bits;
        let Kind::Prealloc(mode) = self.task(t).kind else {
            return true;
        };
        loop {
            if !self.settle_alloc(t) {
                return false;
            }
            let task = self.task(t);
            let (pos, end) = (task.pos, task.end);
            if task.error.is_some() || pos >= end {
                if task.inflight > 0 {
                    return false;
                }
                if task.error.is_some() {
                    return true;
                }
                if task.sub == 0 {
                    task.sub = 1;
                    if mode == Preallocation::Metadata && self.op_room(1) {
                        let len = (self.next_free << cb).max(self.config.file_len);
                        self.issue_bare(Purpose::TaskIo { task: t }, IoKind::SetLen, len);
                        self.task(t).inflight += 1;
                        return false;
                    }
                }
                return self.wait_for_cycle(t);
            }
            if !self.op_room(3) {
                return false;
            }
            let gc = pos >> cb;
            let step = (|| -> Result<(), Block> {
                let l2 = self.owned_l2(t, gc >> self.geo.l2_bits)?;
                let (slot, idx) = self.l2_entry_slot(l2, gc)?;
                let mut n = 0;
                while idx + n < self.per_slice()
                    && (gc + n as u64) << cb < end
                    && self
                        .entry(slot, idx + n)
                        .mapping_in(cb, self.has_data_file())
                        == Mapping::Unallocated
                {
                    n += 1;
                }
                if n == 0 {
                    self.task(t).pos = (gc + 1) << cb;
                    return Ok(());
                }
                let (host, got) = self.alloc_data(gc, n as u64)?;
                let a = self.new_alloc(Alloc {
                    task: t,
                    what: AllocWhat::Data {
                        guest_cluster: gc,
                        head: 0,
                        body_start: 0,
                        body_len: 0,
                        body: Body::Zeroes,
                        tail: 0,
                        staged: [None, None],
                        cow_pending: 0,
                    },
                    host,
                    count: got,
                    state: AllocState::Ready,
                    io_pending: 0,
                });
                let len = got << cb;
                match mode {
                    Preallocation::Falloc => {
                        let alloc = self.allocs[a as usize].as_mut().expect("just made");
                        (alloc.state, alloc.io_pending) = (AllocState::Io, 1);
                        self.issue_bare(
                            Purpose::AllocWrite { alloc: a },
                            IoKind::Allocate { len },
                            host,
                        );
                    }
                    Preallocation::Full => {
                        let alloc = self.allocs[a as usize].as_mut().expect("just made");
                        (alloc.state, alloc.io_pending) = (AllocState::Io, 1);
                        let mut segs = ArrayVec::new();
                        segs.push(Segment::Zeroes(len as usize));
                        self.issue(Purpose::AllocWrite { alloc: a }, IoKind::Write, host, segs);
                    }
                    _ => {}
                }
                let task = self.task(t);
                task.alloc = Some(a);
                task.pos = (gc + got) << cb;
                Ok(())
            })();
            match step {
                Ok(()) => {}
                Err(Block::Park) => return false,
                Err(Block::Fail(e)) => {
                    self.task(t).error.get_or_insert(e);
                }
            }
        }
    }
}
