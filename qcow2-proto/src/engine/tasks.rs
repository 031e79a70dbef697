//! Guest request tasks: read, write, write-zeroes, discard, block status, preallocation;
//! and the allocations they start (data runs, new or copied L2 tables).

use arrayvec::ArrayVec;

use crate::config::{CacheMode, Preallocation};
use crate::error::{CorruptReason, Feature, RequestError, Structure};
use crate::format::entry::{
    self, L1Entry, L2Entry, Mapping, Sub, ALL_ALLOC, ALL_ZEROES, COMPRESSED, COPIED, OFFSET_MASK,
    ZERO,
};
use crate::io::{IoBuf, IoError, IoKind, IoOp, Segment};
use crate::request::{Allocation, BlockStatus};

use super::alloc::PENDING_FREES_CAP;
use super::overlap::Own;
use super::{
    be64, put_be64, Alloc, AllocState, AllocWhat, Block, Body, Deferred, Image, Kind, Purpose,
    TABLE_CHUNK,
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
pub(super) enum Cow {
    /// The old host cluster, at this offset.
    Host(u64),
    /// The backing file, at this guest offset.
    Backing(u64),
    /// A compressed cluster (its stream), from byte `skip` of the cluster.
    Compressed { host: u64, len: u64, skip: u64 },
}

/// What a unit reports to block status (host offsets as host minus guest offset).
#[derive(Debug, Clone, Copy, Eq, PartialEq)]
enum Status {
    Unallocated,
    Reserved(u64),
    Zero(Option<u64>),
    Data(u64),
    Compressed,
}

/// A data allocation about to start: guest clusters `gc..gc + count` at host `host`. The
/// write covers the first cluster from byte `lead`: `head` bytes of copy-on-write, the
/// body up to guest `body_end`, then `tail` bytes of copy-on-write.
#[derive(Debug, Clone, Copy)]
struct Plan {
    gc: u64,
    host: u64,
    count: u64,
    lead: u64,
    head: u64,
    body_end: u64,
    tail: u64,
    /// Sources of the head and the tail (`None`: zeros).
    cow: [Option<Cow>; 2],
    /// With extended L2 entries: the new bitmaps of the first, middle and last clusters.
    bitmaps: [u64; 3],
    /// Into the clusters the entries map already (no new clusters, nothing to free).
    in_place: bool,
    /// See [`Alloc::fresh`](super::Alloc).
    fresh: bool,
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
        let w = self.geo.l2_entry_bytes();
        let byte = (gc & (self.geo.l2_entries() - 1)) * w;
        let unit = self.l2.unit as u64;
        let slot = self
            .cached(false, l2 + byte / unit * unit)?
            .expect("L2 lookups always give a slot");
        Ok((slot, ((byte % unit) / w) as usize))
    }

    /// The first word of entry `idx` of the cached slice in `slot`.
    pub(super) fn entry(&self, slot: u32, idx: usize) -> L2Entry {
        let words = self.geo.l2_entry_bytes() as usize / 8;
        L2Entry(be64(self.l2.data(slot), idx * words))
    }

    /// The subcluster bitmap of entry `idx` (0 without extended L2 entries).
    pub(super) fn bitmap(&self, slot: u32, idx: usize) -> u64 {
        if self.geo.extended_l2() {
            be64(self.l2.data(slot), idx * 2 + 1)
        } else {
            0
        }
    }

    /// Decodes an entry's first word for this image (data file, extended entries).
    pub(super) fn decode(&self, e: L2Entry) -> Mapping {
        e.mapping_ext(
            self.geo.cluster_bits,
            self.has_data_file(),
            self.geo.extended_l2(),
        )
    }

    /// What subcluster `sc` of a cluster mapped by `m` with `bitmap` holds.
    fn sub(&self, m: Mapping, bitmap: u64, sc: u32) -> Sub {
        let ext = self.geo.extended_l2();
        entry::subcluster(m, bitmap, ext, sc, self.geo.subcluster_bits)
    }

    /// Sets entry `idx`. With extended entries a zero flag becomes "every subcluster reads
    /// as zeros" and any other entry gets an empty bitmap (see [`set_entry_ext`]).
    ///
    /// [`set_entry_ext`]: Self::set_entry_ext
    fn set_entry(&mut self, slot: u32, idx: usize, e: L2Entry) {
        if self.geo.extended_l2() {
            let zero = e.0 & ZERO != 0 && e.0 & COMPRESSED == 0;
            let bitmap = if zero { ALL_ZEROES } else { 0 };
            self.set_entry_ext(slot, idx, L2Entry(e.0 & !u64::from(zero)), bitmap);
        } else {
            put_be64(self.l2.data_mut(slot), idx, e.0);
        }
    }

    /// Sets extended entry `idx`: its first word and its subcluster bitmap.
    fn set_entry_ext(&mut self, slot: u32, idx: usize, e: L2Entry, bitmap: u64) {
        let data = self.l2.data_mut(slot);
        put_be64(data, idx * 2, e.0);
        put_be64(data, idx * 2 + 1, bitmap);
    }

    /// Data (or a new table) is written: the next guest flush needs a barrier, and when
    /// `ordered`, the next cycle's first barrier comes before its mappings (rules C and D).
    pub(super) fn data_done(&mut self, ordered: bool) {
        self.unsynced_data = true;
        self.ordered_data |= ordered;
    }

    /// Whether host clusters `host..` (`count` of them, for the guest clusters from `g0`
    /// whose entries start at `idx` of L2 slot `slot`) are fresh (see
    /// [`Alloc::fresh`](super::Alloc)).
    fn fresh_clusters(&self, host: u64, count: u64, (slot, idx): (u32, usize), g0: u64) -> bool {
        let (cb, scb) = (self.geo.cluster_bits, self.geo.subcluster_bits);
        if host < self.zero_from
            || host + (count << cb) > self.len_durable
            || self.has_data_file()
            || self.names_backing() && self.backing.is_none()
        {
            return false;
        }
        (0..count as usize).all(|k| {
            let (m, bitmap) = (
                self.decode(self.entry(slot, idx + k)),
                self.bitmap(slot, idx + k),
            );
            let g = g0 + ((k as u64) << cb);
            (0..1u32 << (cb - scb)).all(|sc| match self.sub(m, bitmap, sc) {
                Sub::Zero => true,
                Sub::Unallocated => self
                    .backing
                    .as_ref()
                    .is_none_or(|b| g + (u64::from(sc) << scb) >= b.size),
                Sub::Data(_) | Sub::Compressed => false,
            })
        })
    }

    fn per_slice(&self) -> usize {
        self.l2.unit / self.geo.l2_entry_bytes() as usize
    }

    /// Decodes and validates entry `idx` of `slot`, guest cluster `gc`'s.
    fn mapping_at(&mut self, slot: u32, idx: usize, gc: u64) -> Result<Mapping, RequestError> {
        let e = self.entry(slot, idx);
        let m = self.mapping(e, gc)?;
        if self.geo.extended_l2() {
            let bitmap = self.bitmap(slot, idx);
            if !entry::bitmap_valid(m, bitmap) {
                return Err(self.corrupt(
                    Structure::L2Table,
                    bitmap,
                    CorruptReason::InvalidSubclusterBitmap,
                ));
            }
        }
        Ok(m)
    }

    /// Decodes and validates the L2 entry of guest cluster `gc`.
    fn mapping(&mut self, e: L2Entry, gc: u64) -> Result<Mapping, RequestError> {
        let cb = self.geo.cluster_bits;
        let m = self.decode(e);
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

    /// Ends allocation `a` (linked or given up); the tasks that joined it may finish.
    fn drop_alloc(&mut self, a: u32) -> Alloc {
        self.alloc_free.push(a);
        let alloc = self.allocs[a as usize].take().expect("live allocation");
        for &t in &alloc.joined {
            if let Some(task) = self.tasks[t as usize].as_mut() {
                task.join = None;
            }
            self.make_runnable(t);
        }
        alloc
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
                // A snapshot read past the size it was taken at: zeros (whatever its last
                // cluster holds there).
                _ if pos >= self.view_end => (end, Src::Zero),
                Err(e) => {
                    self.task(t).error = Some(e);
                    continue;
                }
                Ok(None) => (
                    end.min((l1i + 1) << (cb + self.geo.l2_bits)),
                    self.unallocated_src(),
                ),
                Ok(Some(l2)) => match self.read_extent(l2, pos, end) {
                    Ok(x) => x,
                    Err(Block::Park) => return false,
                    Err(Block::Fail(e)) => {
                        self.task(t).error = Some(e);
                        continue;
                    }
                },
            };
            extent_end = extent_end.min(self.view_end.max(pos + 1));
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
                    h,
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

    /// The extent starting at guest offset `pos`: its end and where it reads from (a host
    /// source already at `pos`'s byte).
    fn read_extent(&mut self, l2: u64, pos: u64, end: u64) -> Result<(u64, Src), Block> {
        let cb = self.geo.cluster_bits;
        let gc = pos >> cb;
        let (slot, idx) = self.l2_entry_slot(l2, gc)?;
        let first = self.mapping_at(slot, idx, gc)?;
        if let Mapping::Compressed { host, len } = first {
            // One cluster at a time: each has a stream of its own.
            return Ok((end.min((gc + 1) << cb), Src::Compressed { host, len }));
        }
        // (Fixed for the whole walk: worked out once, not per unit.)
        let (unallocated, v3) = (self.unallocated_src(), self.hdr.version >= 3);
        // Host sources are keyed by host minus guest offset: equal keys are contiguous.
        let key = |_: Mapping, sub: Sub, g: u64| match sub {
            Sub::Data(h) => Some(Src::Host(h.wrapping_sub(g))),
            Sub::Compressed => None,
            Sub::Unallocated => Some(unallocated),
            // (A zero flag in a v2 image is corruption: never merged into an extent.)
            Sub::Zero if !v3 => None,
            Sub::Zero => Some(Src::Zero),
        };
        let (run_end, src) = self.unit_run(slot, idx, first, pos, end, key);
        let src = match src {
            Some(Src::Host(delta)) => Src::Host(delta.wrapping_add(pos)),
            Some(s) => s,
            None => Src::Zero,
        };
        Ok((run_end, src))
    }

    /// Walks the units (subclusters with extended L2 entries, else clusters) from guest
    /// offset `pos`, guest cluster `gc` = entry `idx` of `slot` mapped by `first`, while
    /// `key` (of a unit's content and guest offset) stays what it is for `pos`'s unit: the
    /// run's end (before `end`, inside the slice, short of clusters under allocation) and
    /// that key. A `None` key ends the run after the first unit.
    fn unit_run<K: PartialEq + Copy>(
        &self,
        slot: u32,
        idx: usize,
        first: Mapping,
        pos: u64,
        end: u64,
        key: impl Fn(Mapping, Sub, u64) -> Option<K>,
    ) -> (u64, Option<K>) {
        let (cb, scb) = (self.geo.cluster_bits, self.geo.subcluster_bits);
        let (ext, cmask) = (self.geo.extended_l2(), self.geo.cluster_size() - 1);
        let gc = pos >> cb;
        let sc = |g: u64| ((g & cmask) >> scb) as u32;
        let mut g = pos >> scb << scb;
        let (mut m, mut bitmap) = (first, self.bitmap(slot, idx));
        let k0 = key(m, self.sub(m, bitmap, sc(g)), g);
        let mut n = 0;
        loop {
            g += 1 << scb;
            if g >= end || k0.is_none() {
                break;
            }
            if g & cmask == 0 {
                n += 1;
                if idx + n >= self.per_slice() || self.alloc_covering(gc + n as u64) {
                    break;
                }
                m = self.decode(self.entry(slot, idx + n));
                bitmap = self.bitmap(slot, idx + n);
                if ext && !entry::bitmap_valid(m, bitmap) {
                    break;
                }
            }
            if key(m, self.sub(m, bitmap, sc(g)), g) != k0 {
                break;
            }
        }
        (end.min(g), k0)
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
                if task.inflight > 0 || task.join.is_some() {
                    return false;
                }
                // Write-through: what the range reads is durable before the request
                // completes, even when this request changed nothing (a range that reads as
                // zeroes because of a discard not yet written back still needs that
                // discard's write-back).
                let ok = task.error.is_none();
                if ok && self.config.cache_mode == CacheMode::WriteThrough {
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
                if kind == Kind::Write && self.try_join(t, gc) {
                    continue;
                }
                return false;
            }
            // (A v2 image cannot hide its backing file behind zero flags: it writes zeroes.)
            let zero_flags = self.hdr.version >= 3 || !self.names_backing();
            let result = match kind {
                Kind::Zeroes { unmap } if zero_flags && self.full_cluster_at(pos, end) => {
                    self.edit_clusters(t, Edit::Zero { unmap })
                }
                Kind::Zeroes { .. } if self.full_subcluster_at(pos, end) => {
                    self.zero_subclusters(t)
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

    /// Whether `[pos, end)` starts with a whole subcluster of an image with extended L2
    /// entries (the partial last one of the image counts as whole).
    fn full_subcluster_at(&self, pos: u64, end: u64) -> bool {
        let scs = self.geo.subcluster_size();
        self.geo.extended_l2() && pos % scs == 0 && (end - pos >= scs || end == self.hdr.size)
    }

    /// Write-zeroes of the whole subclusters at the task's position (extended L2 entries,
    /// inside one cluster): their zero bits are set and their allocated bits cleared; the
    /// cluster stays. A compressed cluster has no subclusters: it is rewritten.
    fn zero_subclusters(&mut self, t: u32) -> Result<(), Block> {
        if self.window {
            return Err(Block::Park);
        }
        let (cb, scb) = (self.geo.cluster_bits, self.geo.subcluster_bits);
        let (pos, end) = (self.task(t).pos, self.task(t).end);
        let gc = pos >> cb;
        let l2 = self.owned_l2(t, gc >> self.geo.l2_bits)?;
        let (slot, idx) = self.l2_entry_slot(l2, gc)?;
        let m = self.mapping_at(slot, idx, gc)?;
        if let Mapping::Compressed { .. } = m {
            return self.write_piece(t, Body::Zeroes);
        }
        let cluster_end = (gc + 1) << cb;
        let zero_end = if end == self.hdr.size {
            end.min(cluster_end)
        } else {
            (end >> scb << scb).min(cluster_end)
        };
        let first = ((pos >> scb) & 31) as u32;
        let last = (((zero_end - 1) >> scb) & 31) as u32;
        let mask = entry::subcluster_mask(first, last);
        let bitmap = self.bitmap(slot, idx);
        let e = self.entry(slot, idx);
        self.set_entry_ext(slot, idx, e, (bitmap & !mask) | mask << 32);
        if self.data_file_raw() {
            self.zero_raw_data_file(t, pos, zero_end.min(self.hdr.size));
        }
        let task = self.task(t);
        task.pos = zero_end;
        Ok(())
    }

    /// Handles the pending allocation of task `t`; false while it must wait.
    pub(super) fn settle_alloc(&mut self, t: u32) -> bool {
        let Some(a) = self.task(t).alloc else {
            return true;
        };
        if !self.issue_later_reads(a) {
            return false;
        }
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
                self.abort_alloc(a, e);
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
                    self.abort_alloc(a, e);
                    let task = self.task(t);
                    task.alloc = None;
                    task.error.get_or_insert(e);
                    true
                }
            },
        }
    }

    /// Gives back the clusters of an allocation that will never be linked; the writes
    /// that joined it fail with `err`.
    fn abort_alloc(&mut self, a: u32, err: RequestError) {
        let alloc = self.drop_alloc(a);
        for &t in &alloc.joined {
            if let Some(task) = self.tasks[t as usize].as_mut() {
                task.error.get_or_insert(err);
            }
        }
        if let AllocWhat::Data { in_place: true, .. } = alloc.what {
            // Written in place: the cluster stays where it is.
        } else {
            let data = matches!(alloc.what, AllocWhat::Data { .. });
            self.release(alloc.host, alloc.count, data);
        }
        if let AllocWhat::Data { staged, .. } = alloc.what {
            for b in staged.into_iter().flatten() {
                self.put_staging(b);
            }
        }
        self.wake_all();
    }

    /// Gives back `count` clusters from `host` that nothing references (`data`: guest data
    /// clusters, which in an external data file have no refcounts).
    fn release(&mut self, host: u64, count: u64, data: bool) {
        let cb = self.geo.cluster_bits;
        if data && self.has_data_file() {
            return;
        }
        for i in 0..count {
            self.queue_free((host >> cb << cb) + (i << cb));
        }
    }

    /// Where the copy-on-write next to a write reaches in a cluster mapped by `m` with
    /// `bitmap`, at guest offset `g`, and what it copies (`None`: zeros). For the head
    /// (`head`), the write's data starts at byte `off` of the cluster and the copy runs from
    /// the returned offset up to it; for the tail the data ends at `off` and the copy runs
    /// from it to the returned offset. `in_place`: the write goes into `m`'s own cluster.
    ///
    /// A cluster that is replaced by a new one is copied whole, unless its entry can say
    /// "unallocated" or "zero" for the subclusters the write does not touch (extended L2
    /// entries over an unallocated cluster, or in place): then only the partly written
    /// subcluster at the edge is filled, from where that subcluster reads.
    fn cow_edge(
        &self,
        (m, bitmap, g): (Mapping, u64, u64),
        off: u64,
        head: bool,
        in_place: bool,
    ) -> Result<(u64, Option<Cow>), RequestError> {
        let (cs, scs) = (self.geo.cluster_size(), self.geo.subcluster_size());
        let whole = !self.geo.extended_l2()
            || matches!(m, Mapping::Compressed { .. })
            || matches!(m, Mapping::Data { .. }) && !in_place;
        let edge = if whole {
            if head {
                0
            } else {
                cs
            }
        } else if off % scs == 0 {
            return Ok((off, None));
        } else {
            let unit = off / scs * scs;
            if in_place && matches!(self.sub(m, bitmap, (off / scs) as u32), Sub::Data(_)) {
                // The subcluster holds data already.
                return Ok((off, None));
            }
            if head {
                unit
            } else {
                unit + scs
            }
        };
        let (from, len) = if head {
            (edge, off - edge)
        } else {
            (off, edge - off)
        };
        if len == 0 {
            return Ok((edge, None));
        }
        let src = match m {
            Mapping::Data { host, .. } if whole => Some(Cow::Host(host + from)),
            Mapping::Compressed { host, len: stream } => Some(Cow::Compressed {
                host,
                len: stream,
                skip: from,
            }),
            _ => match self.sub(m, bitmap, (from / scs) as u32) {
                Sub::Data(h) => Some(Cow::Host(h + from % scs)),
                Sub::Zero | Sub::Compressed => None,
                Sub::Unallocated => match &self.backing {
                    Some(b) if g + from < b.size => Some(Cow::Backing(g + from)),
                    Some(_) => None,
                    // Opened without its backing file: the data to copy cannot be read.
                    None if self.names_backing() => {
                        return Err(RequestError::Unsupported(Feature::BackingFile))
                    }
                    None => None,
                },
            },
        };
        Ok((edge, src))
    }

    /// Whether every subcluster of a cluster with `bitmap` that bytes `[from, to)` touch is
    /// allocated (always, without extended L2 entries).
    fn subclusters_allocated(&self, bitmap: u64, from: u64, to: u64) -> bool {
        if !self.geo.extended_l2() {
            return true;
        }
        let scb = self.geo.subcluster_bits;
        let mask = entry::subcluster_mask((from >> scb) as u32, ((to - 1) >> scb) as u32);
        bitmap & mask == mask
    }

    /// The new bitmap of a cluster (with `old`, mapped by `m`) whose bytes `[from, to)` were
    /// written: those subclusters allocated, the others as they were.
    fn written_bitmap(&self, m: Mapping, old: u64, from: u64, to: u64) -> u64 {
        let scb = self.geo.subcluster_bits;
        let mask = entry::subcluster_mask((from >> scb) as u32, ((to - 1) >> scb) as u32);
        let keep = match m {
            Mapping::Compressed { .. } => 0,
            _ => old,
        };
        (keep & !(mask | mask << 32)) | mask
    }

    /// One run of a write at the task's position: in place, or into new clusters.
    pub(super) fn write_piece(&mut self, t: u32, body: Body) -> Result<(), Block> {
        let cb = self.geo.cluster_bits;
        let cs = self.geo.cluster_size();
        let scb = self.geo.subcluster_bits;
        let task = self.task(t);
        let (pos, end) = (task.pos, task.end);
        let gc = pos >> cb;
        let g0 = gc << cb;
        let l2 = self.owned_l2(t, gc >> self.geo.l2_bits)?;
        let (slot, idx) = self.l2_entry_slot(l2, gc)?;
        let first = self.mapping_at(slot, idx, gc)?;
        let bitmap0 = self.bitmap(slot, idx);
        let limit = |n: usize| (gc + n as u64) << cb;
        if body == Body::Zeroes {
            let reads_zero = match self.sub(first, bitmap0, ((pos - g0) >> scb) as u32) {
                Sub::Zero => true,
                Sub::Unallocated => !self.names_backing(),
                Sub::Data(_) | Sub::Compressed => false,
            };
            if reads_zero {
                // A partial zero write where the image reads as zero already. Like QEMU,
                // a standard entry gets the zero flag over the whole cluster (v3); nothing
                // is written.
                if first == Mapping::Unallocated && self.hdr.version >= 3 && !self.geo.extended_l2()
                {
                    self.set_entry(slot, idx, L2Entry::zero(0, false));
                }
                self.task(t).pos = end.min(((pos >> scb) + 1) << scb);
                return Ok(());
            }
        }
        if let Mapping::Data { host, copied: true } = first {
            if !self.subclusters_allocated(bitmap0, pos - g0, end.min(limit(1)) - g0) {
                return self.write_in_place(t, body, (first, bitmap0, g0), host);
            }
            let mut n = 1;
            while idx + n < self.per_slice()
                && limit(n) < end
                && !self.alloc_covering(gc + n as u64)
                && self.decode(self.entry(slot, idx + n))
                    == (Mapping::Data {
                        host: host + n as u64 * cs,
                        copied: true,
                    })
                && self.subclusters_allocated(
                    self.bitmap(slot, idx + n),
                    0,
                    end.min(limit(n + 1)) - limit(n),
                )
            {
                n += 1;
            }
            let run_end = end.min(limit(n));
            let mut segs = ArrayVec::new();
            segs.push(self.body_seg(t, body, pos, run_end - pos));
            self.fill_ahead(host + (pos - g0), run_end - pos);
            self.issue(
                Purpose::Guest {
                    task: t,
                    write: true,
                },
                IoKind::Write,
                host + (pos - g0),
                segs,
            );
            let task = self.task(t);
            task.inflight += 1;
            task.pos = run_end;
            return Ok(());
        }
        let ext = self.geo.extended_l2();
        if let (true, Mapping::Data { host, .. }) = (ext, first) {
            if bitmap0 != ALL_ALLOC {
                return self.unshare(t, bitmap0, g0, host);
            }
        }
        let mut n = 1;
        if body == Body::Guest {
            while idx + n < self.per_slice()
                && limit(n) < end
                && !self.alloc_covering(gc + n as u64)
            {
                let m = self.decode(self.entry(slot, idx + n));
                let bitmap = self.bitmap(slot, idx + n);
                match m {
                    Mapping::Data { copied: true, .. } | Mapping::Compressed { .. } => break,
                    // (Shared partly allocated clusters are unshared first; invalid
                    // bitmaps are reported once the cluster comes first.)
                    Mapping::Data { .. } if ext && bitmap != ALL_ALLOC => break,
                    _ if ext && !entry::bitmap_valid(m, bitmap) => break,
                    _ => n += 1,
                }
            }
        }
        if self.names_backing() && !self.backing_room(2) {
            return Err(Block::Park);
        }
        // The head is known before allocating; the tail depends on how many clusters come.
        let (lead, cow_head) = self.cow_edge((first, bitmap0, g0), pos - g0, true, false)?;
        let (host, got) = self.alloc_data(gc, n as u64)?;
        let body_end = end.min(limit(got as usize));
        let li = idx + got as usize - 1;
        let gl = limit(got as usize - 1);
        let (last, bitmap_last) = (self.decode(self.entry(slot, li)), self.bitmap(slot, li));
        let (tail_end, cow_tail) =
            match self.cow_edge((last, bitmap_last, gl), body_end - gl, false, false) {
                Ok(x) => x,
                Err(e) => {
                    self.release(host, got, true);
                    return Err(e.into());
                }
            };
        let fresh = self.fresh_clusters(host, got, (slot, idx), g0);
        let bitmaps = if got == 1 {
            let b = self.written_bitmap(first, bitmap0, lead, tail_end);
            [b, b, b]
        } else {
            [
                self.written_bitmap(first, bitmap0, lead, cs),
                ALL_ALLOC,
                self.written_bitmap(last, bitmap_last, 0, tail_end),
            ]
        };
        self.start_alloc(
            t,
            body,
            Plan {
                gc,
                host,
                count: got,
                lead,
                head: pos - g0 - lead,
                body_end,
                tail: gl + tail_end - body_end,
                cow: [cow_head, cow_tail],
                bitmaps,
                in_place: false,
                fresh,
            },
        );
        Ok(())
    }

    /// The body of a write piece: task `t`'s guest bytes `start..start + len`, or zeroes.
    fn body_seg(&mut self, t: u32, body: Body, start: u64, len: u64) -> Segment {
        let task = self.task(t);
        match body {
            Body::Guest => Segment::Guest {
                req: task.req,
                start: (start - task.origin) as usize,
                len: len as usize,
            },
            Body::Zeroes => Segment::Zeroes(len as usize),
        }
    }

    /// A write into an allocated cluster (COPIED, at `host`) of an image with extended L2
    /// entries that touches subclusters not yet allocated: the partly written ones are
    /// filled from where they read, and the bitmap is updated once the data is written.
    fn write_in_place(
        &mut self,
        t: u32,
        body: Body,
        (m, bitmap, g0): (Mapping, u64, u64),
        host: u64,
    ) -> Result<(), Block> {
        let cs = self.geo.cluster_size();
        let (pos, end) = (self.task(t).pos, self.task(t).end);
        let body_end = end.min(g0 + cs);
        if self.names_backing() && !self.backing_room(2) {
            return Err(Block::Park);
        }
        let (lead, cow_head) = self.cow_edge((m, bitmap, g0), pos - g0, true, true)?;
        let (tail_end, cow_tail) = self.cow_edge((m, bitmap, g0), body_end - g0, false, true)?;
        let scb = self.geo.subcluster_bits;
        let mask = entry::subcluster_mask((lead >> scb) as u32, ((tail_end - 1) >> scb) as u32);
        let b = (bitmap & !(mask << 32)) | mask;
        self.start_alloc(
            t,
            body,
            Plan {
                gc: g0 >> self.geo.cluster_bits,
                host,
                count: 1,
                lead,
                head: pos - g0 - lead,
                body_end,
                tail: g0 + tail_end - body_end,
                cow: [cow_head, cow_tail],
                bitmaps: [b, b, b],
                in_place: true,
                fresh: false,
            },
        );
        Ok(())
    }

    /// A write into a cluster shared with a snapshot whose extended L2 entry has
    /// unallocated or zero subclusters: first a copy of the whole cluster with the same
    /// bitmap (what the old cluster holds outside its allocated subclusters is never read),
    /// then the write goes in place into the copy.
    fn unshare(&mut self, t: u32, bitmap: u64, g0: u64, old: u64) -> Result<(), Block> {
        let gc = g0 >> self.geo.cluster_bits;
        let (host, _) = self.alloc_data(gc, 1)?;
        let pos = self.task(t).pos;
        // The whole cluster is the "head"; no body: the task stays where it is.
        self.start_alloc(
            t,
            Body::Guest,
            Plan {
                gc,
                host,
                count: 1,
                lead: 0,
                head: self.geo.cluster_size(),
                body_end: pos,
                tail: 0,
                cow: [Some(Cow::Host(old)), None],
                bitmaps: [bitmap; 3],
                in_place: false,
                fresh: false,
            },
        );
        Ok(())
    }

    /// Starts the allocation `plan` for task `t`: its copy-on-write reads, or at once its
    /// write.
    fn start_alloc(&mut self, t: u32, body: Body, plan: Plan) {
        let task = self.task(t);
        let (pos, origin, sequential) = (task.pos, task.origin, task.sequential);
        let [cow_head, cow_tail] = plan.cow;
        let g0 = plan.gc << self.geo.cluster_bits;
        // Copy-on-write deferred for joins (see `Alloc::cover`): a sequential guest write
        // over standard entries, with every edge to copy read from somewhere (each read
        // frees the op slot its trimmed write takes later).
        let defer = sequential
            && body == Body::Guest
            && !plan.in_place
            && !self.geo.extended_l2()
            && plan.body_end > pos
            && (cow_head.is_some() || cow_tail.is_some())
            && (plan.head == 0 || cow_head.is_some())
            && (plan.tail == 0 || cow_tail.is_some());
        // Reads put off too when other requests are in flight (the stream's next writes
        // are likely among them), from sources read directly (no nested backing request,
        // no decompression, which need room reserved now).
        let raw_backing = self.backing.as_ref().is_some_and(|b| b.is_raw());
        let later = defer
            && self.task_free.len() + 1 < self.tasks.len()
            && [cow_head, cow_tail].iter().all(|c| match c {
                None | Some(Cow::Host(_)) => true,
                Some(Cow::Backing(_)) => raw_backing,
                Some(Cow::Compressed { .. }) => false,
            });
        let tail_start = plan.body_end - g0;
        let a = self.new_alloc(Alloc {
            task: t,
            what: AllocWhat::Data {
                guest_cluster: plan.gc,
                lead: plan.lead,
                head: plan.head,
                body_start: (pos - origin) as usize,
                body_len: (plan.body_end - pos) as usize,
                body,
                tail: plan.tail,
                staged: [None, None],
                cow_pending: u8::from(cow_head.is_some()) + u8::from(cow_tail.is_some()),
                bitmaps: plan.bitmaps,
                in_place: plan.in_place,
            },
            host: plan.host,
            count: plan.count,
            state: AllocState::Io,
            io_pending: 0,
            joinable: false,
            joined: ArrayVec::new(),
            fresh: plan.fresh,
            deferred: defer.then_some(Deferred {
                cover: (pos - g0, tail_start),
                later: later.then_some(plan.cow),
                body_done: false,
                from: [plan.lead, tail_start],
            }),
        });
        let task = self.task(t);
        task.alloc = Some(a);
        task.pos = plan.body_end;
        if !later {
            self.issue_cow_reads(a, [(cow_head, plan.head), (cow_tail, plan.tail)]);
        }
        if defer {
            let mut segs = ArrayVec::new();
            segs.push(self.body_seg(t, body, pos, plan.body_end - pos));
            let host = plan.host + (pos - g0);
            self.issue(Purpose::AllocWrite { alloc: a }, IoKind::Write, host, segs);
            let alloc = self.allocs[a as usize].as_mut().expect("just made");
            alloc.io_pending = 1;
            alloc.joinable = true;
        } else if cow_head.is_none() && cow_tail.is_none() {
            self.issue_alloc_write(a);
        }
    }

    /// Issues allocation `a`'s copy-on-write reads: head and tail, each a source and a
    /// length (parts without a source read nothing).
    fn issue_cow_reads(&mut self, a: u32, parts: [(Option<Cow>, u64); 2]) {
        for (part, (src, len)) in (0u8..).zip(parts) {
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
    }

    /// The put-off copy-on-write reads of allocation `a`, now that its guest data is
    /// written: only what the cover does not reach yet. False while there is no room for
    /// them.
    fn issue_later_reads(&mut self, a: u32) -> bool {
        let room = self.op_room(2);
        let alloc = self.allocs[a as usize].as_mut().expect("live allocation");
        let failed = alloc.state != AllocState::Io;
        let Some(d) = alloc.deferred.as_mut().filter(|d| d.body_done) else {
            return true;
        };
        if !room && !failed {
            return false;
        }
        let Some([head_src, tail_src]) = d.later.take() else {
            return true;
        };
        let (lo, hi) = d.cover;
        let AllocWhat::Data {
            lead,
            head,
            body_len,
            tail,
            cow_pending,
            ..
        } = &mut alloc.what
        else {
            unreachable!("deferred copy-on-write is for data allocations");
        };
        let tail_start = *lead + *head + *body_len as u64;
        let head_len = lo.min(*lead + *head).saturating_sub(*lead);
        let skip = hi.max(tail_start) - tail_start;
        let tail_len = tail.saturating_sub(skip);
        let shift = |c: Option<Cow>, by: u64| match c {
            Some(Cow::Host(h)) => Some(Cow::Host(h + by)),
            Some(Cow::Backing(g)) => Some(Cow::Backing(g + by)),
            other => other,
        };
        let head_src = head_src.filter(|_| head_len > 0 && !failed);
        let tail_src = shift(tail_src, skip).filter(|_| tail_len > 0 && !failed);
        *cow_pending = u8::from(head_src.is_some()) + u8::from(tail_src.is_some());
        d.from[1] = tail_start + skip;
        if *cow_pending == 0 {
            // The writes covered both edges (nothing to copy at all), or the allocation
            // failed.
            self.issue_cow_writes(a);
            return true;
        }
        self.issue_cow_reads(a, [(head_src, head_len), (tail_src, tail_len)]);
        true
    }

    /// The copy-on-write reads of an allocation with deferred copy-on-write are in: the
    /// joins stop, and the parts of the head and tail no write covered go out.
    fn issue_cow_writes(&mut self, a: u32) {
        let alloc = self.allocs[a as usize].as_mut().expect("live allocation");
        alloc.joinable = false;
        let d = alloc
            .deferred
            .take()
            .expect("deferred copy-on-write is deferred");
        let (host, state, owner) = (alloc.host, alloc.state, alloc.task);
        let (lo, hi) = d.cover;
        let [head_from, tail_from] = d.from;
        let AllocWhat::Data { staged, .. } = &mut alloc.what else {
            unreachable!("deferred copy-on-write is for data allocations");
        };
        let mut parts = [staged[0].take(), staged[1].take()];
        let mut writes = ArrayVec::<(u64, IoBuf), 2>::new();
        if state == AllocState::Io {
            if let Some(mut b) = parts[0].take() {
                // The head runs up to the data; the cover may reach down into it.
                let end = (head_from + b.len() as u64).min(lo);
                let len = end.saturating_sub(head_from) as usize;
                if len > 0 {
                    b.resize(len);
                    writes.push((host + head_from, b));
                } else {
                    parts[0] = Some(b);
                }
            }
            if let Some(mut b) = parts[1].take() {
                // The tail runs on from the data; the cover may reach up into it.
                let skip = (hi.max(tail_from) - tail_from) as usize;
                let len = b.len().saturating_sub(skip);
                if len > 0 {
                    b.as_mut_slice().copy_within(skip.., 0);
                    b.resize(len);
                    writes.push((host + tail_from + skip as u64, b));
                } else {
                    parts[1] = Some(b);
                }
            }
        }
        for b in parts.into_iter().flatten() {
            self.put_staging(b);
        }
        let n = writes.len() as u8;
        for (at, b) in writes {
            let mut segs = ArrayVec::new();
            segs.push(Segment::Buf(b));
            self.issue(Purpose::AllocWrite { alloc: a }, IoKind::Write, at, segs);
        }
        let alloc = self.allocs[a as usize].as_mut().expect("live allocation");
        alloc.io_pending += n;
        if alloc.io_pending == 0 && alloc.state == AllocState::Io {
            alloc.state = AllocState::Ready;
            let ordered = !alloc.fresh;
            self.data_done(ordered);
        }
        self.make_runnable(owner);
    }

    /// The single vectored write of an allocation: COW head, body, COW tail.
    fn issue_alloc_write(&mut self, a: u32) {
        let req = self.allocs[a as usize]
            .as_ref()
            .map(|x| self.tasks[x.task as usize].as_ref().map(|t| t.req));
        let alloc = self.allocs[a as usize].as_mut().expect("live allocation");
        let AllocWhat::Data {
            lead,
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
        let mut host = alloc.host + *lead;
        let mut edges = [None, None];
        // Clusters past the end of the file (or allocated ahead and never written) read as
        // zero already: instead of writing zeroes around the data of a fresh allocation,
        // allocate those edges (like QEMU's zero range over the new cluster), concurrently,
        // since the ranges are disjoint. (Not in an external data file: the guest offset's
        // old bytes are there.)
        if host >= self.zero_from && !self.has_data_file() {
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
        let guest_only = matches!(segs.as_slice(), [Segment::Guest { .. }]);
        self.issue(Purpose::AllocWrite { alloc: a }, IoKind::Write, host, segs);
        let mut pending = 1;
        for (offset, len) in edges.into_iter().flatten() {
            // Optional (the bytes read as zero either way): only when an op slot is free,
            // and not where host space was allocated ahead already (an fallocate takes the
            // file's lock and would serialize the writes around it).
            if self.op_room(1) && offset + len > self.ahead_end {
                self.issue_bare(
                    Purpose::AllocWrite { alloc: a },
                    IoKind::Allocate { len },
                    offset,
                );
                pending += 1;
            }
        }
        let alloc = self.allocs[a as usize].as_mut().expect("live allocation");
        alloc.io_pending = pending;
        alloc.joinable = guest_only
            && pending == 1
            && matches!(
                alloc.what,
                AllocWhat::Data {
                    in_place: false,
                    ..
                }
            );
    }

    /// Writes task `t`'s piece at guest cluster `gc` into the clusters of the allocation
    /// in flight there, if it takes joins (see [`Alloc::joined`]); false when the task
    /// has to wait for it instead.
    fn try_join(&mut self, t: u32, gc: u64) -> bool {
        let (cb, scb) = (self.geo.cluster_bits, self.geo.subcluster_bits);
        let ext = self.geo.extended_l2();
        let size = self.hdr.size;
        let task = self.task(t);
        let (pos, end) = (task.pos, task.end);
        if task.join.is_some() || task.inflight >= MAX_TASK_OPS {
            return false;
        }
        let Some(a) = self.allocs.iter().position(|x| {
            x.as_ref().is_some_and(|x| match x.what {
                AllocWhat::Data { guest_cluster, .. } => {
                    (guest_cluster..guest_cluster + x.count).contains(&gc)
                }
                _ => false,
            })
        }) else {
            return false;
        };
        let alloc = self.allocs[a].as_ref().expect("found live");
        let AllocWhat::Data { guest_cluster, .. } = alloc.what else {
            return false;
        };
        if !alloc.joinable
            || alloc.state != AllocState::Io
            || alloc.joined.is_full()
            || alloc.io_pending >= u8::MAX - 1
        {
            return false;
        }
        // With extended L2 entries the piece stays in one cluster and covers whole
        // subclusters, which become allocated: the rest of a partly written one would read
        // what the new cluster holds there (old bytes of a reused cluster), not what it
        // read before (zeros, or the backing file).
        let piece_end = if ext {
            end.min((gc + 1) << cb)
        } else {
            end.min((guest_cluster + alloc.count) << cb)
        };
        let scs = 1u64 << scb;
        if ext && (pos % scs != 0 || piece_end % scs != 0 && piece_end != size) {
            return false;
        }
        let g0 = guest_cluster << cb;
        let cover = match alloc.deferred.as_ref().map(|d| d.cover) {
            // Deferred copy-on-write: only a piece that extends the written range.
            Some((lo, hi)) if pos - g0 == hi => Some((lo, piece_end - g0)),
            Some((lo, hi)) if piece_end - g0 == lo => Some((pos - g0, hi)),
            Some(_) => return false,
            None => None,
        };
        let host = alloc.host + (pos - g0);
        let a = a as u32;
        let body = self.body_seg(t, Body::Guest, pos, piece_end - pos);
        let mut segs = ArrayVec::new();
        segs.push(body);
        self.issue(
            Purpose::JoinWrite { alloc: a, task: t },
            IoKind::Write,
            host,
            segs,
        );
        let alloc = self.allocs[a as usize].as_mut().expect("live allocation");
        alloc.io_pending += 1;
        alloc.joined.push(t);
        if let (Some(d), Some(c)) = (alloc.deferred.as_mut(), cover) {
            d.cover = c;
        }
        let count = alloc.count;
        if let AllocWhat::Data { bitmaps, .. } = &mut alloc.what {
            if ext {
                let (from, to) = (pos - (gc << cb), piece_end - (gc << cb));
                let mask = entry::subcluster_mask((from >> scb) as u32, ((to - 1) >> scb) as u32);
                let i = gc - guest_cluster;
                let which: &[usize] = match (i, count) {
                    (_, 1) => &[0, 1, 2],
                    (0, _) => &[0],
                    (i, c) if i + 1 == c => &[2],
                    _ => &[],
                };
                for &w in which {
                    bitmaps[w] = (bitmaps[w] & !(mask | mask << 32)) | mask;
                }
            }
        }
        let task = self.task(t);
        task.inflight += 1;
        task.pos = piece_end;
        task.join = Some(a);
        true
    }

    /// A joined write of task `t` into allocation `a`'s clusters is done.
    pub(super) fn join_write_done(&mut self, a: u32, t: u32, result: Result<(), IoError>) {
        let result = result.map_err(|e| self.io_error(e));
        if result.is_ok() {
            // (Ordered or not with the allocation, which waits for it.)
            self.unsynced_data = true;
        }
        self.task_io_done(t, result);
        // (A failed joined write fails its own request; the allocation goes on.)
        self.alloc_io_done(a, Ok(()), false);
    }

    pub(super) fn alloc_write_done(&mut self, a: u32, op: IoOp, result: Result<(), IoError>) {
        self.recycle(op);
        let result = result.map_err(|e| self.io_error(e));
        self.alloc_io_done(a, result, true);
    }

    /// One of allocation `a`'s data-side ops is done (`own`: one of its own writes, not a
    /// joined one).
    fn alloc_io_done(&mut self, a: u32, result: Result<(), RequestError>, own: bool) {
        let alloc = self.allocs[a as usize].as_mut().expect("live allocation");
        alloc.io_pending -= 1;
        if let Err(err) = result {
            alloc.state = AllocState::Failed(err);
        }
        if let Some(d) = alloc.deferred.as_mut().filter(|d| own && !d.body_done) {
            // While copy-on-write is deferred, its own first write is the guest data.
            d.body_done = true;
            if d.later.is_some() {
                let owner = alloc.task;
                if !self.issue_later_reads(a) {
                    // No room for the reads now: the owner retries as it settles.
                    self.make_runnable(owner);
                }
                return;
            }
        }
        if alloc.io_pending > 0 || alloc.deferred.is_some() {
            return;
        }
        let (t, ready) = (alloc.task, alloc.state == AllocState::Io);
        if ready {
            alloc.state = AllocState::Ready;
            let ordered = !alloc.fresh;
            self.data_done(ordered);
        }
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
        if alloc.deferred.is_some() {
            self.issue_cow_writes(a);
        } else if alloc.state == AllocState::Io {
            self.issue_alloc_write(a);
        } else {
            let t = alloc.task;
            self.make_runnable(t);
        }
    }

    /// Whether data allocation `a` may be linked while a write-back cycle takes its copies
    /// (the window, when reference-creating changes otherwise wait): its clusters are
    /// fresh (rule C asks nothing of their data), counted on disk ahead
    /// ([`counted_ahead`](Self::counted_ahead): rule A holds whichever L2 write-back
    /// carries the entry), and replace nothing with a host cluster (no decrement queued
    /// mid-cycle: rule B). A growing image's allocating writes then finish while a flush
    /// cycle runs, instead of waiting for its barriers.
    fn links_in_window(&mut self, a: u32) -> bool {
        let cb = self.geo.cluster_bits;
        let alloc = self.allocs[a as usize].as_ref().expect("live allocation");
        let AllocWhat::Data { guest_cluster, .. } = alloc.what else {
            return false;
        };
        if !alloc.fresh || !self.counted_ahead(alloc.host >> cb, alloc.count) {
            return false;
        }
        let raw = self.l1[(guest_cluster >> self.geo.l2_bits) as usize];
        if raw & COPIED == 0 {
            return false;
        }
        let count = alloc.count as usize;
        // (A slice not cached waits for the window to close: `link_data` loads it then.)
        let Ok((slot, idx)) = self.l2_entry_slot(raw & OFFSET_MASK, guest_cluster) else {
            return false;
        };
        (0..count).all(|i| {
            matches!(
                self.decode(self.entry(slot, idx + i)),
                Mapping::Unallocated | Mapping::Zero { host: 0, .. }
            )
        })
    }

    /// Publishes a finished data allocation in its L2 table and frees what it replaced.
    fn link_data(&mut self, a: u32) -> Result<(), Block> {
        if self.window && !self.links_in_window(a) {
            return Err(Block::Park);
        }
        let cb = self.geo.cluster_bits;
        let alloc = self.allocs[a as usize].as_ref().expect("live allocation");
        let (host, count) = (alloc.host, alloc.count);
        let bitmaps = match alloc.what {
            AllocWhat::Data { bitmaps, .. } => bitmaps,
            _ => [0; 3],
        };
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
            let m = self.decode(self.entry(slot, idx + i));
            if !matches!(m, Mapping::Data { copied: true, .. }) {
                // (Unallocated and zero-without-host entries free nothing; an in-place
                // write keeps its cluster.)
                self.free_mapping(m);
            }
            let e = L2Entry::data(host + ((i as u64) << cb), true);
            if self.geo.extended_l2() {
                let which = if i == 0 {
                    0
                } else if i + 1 == count as usize {
                    2
                } else {
                    1
                };
                self.set_entry_ext(slot, idx + i, e, bitmaps[which]);
            } else {
                self.set_entry(slot, idx + i, e);
            }
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
            joinable: false,
            joined: ArrayVec::new(),
            deferred: None,
            fresh: false,
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
        self.data_done(true);
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
        self.abort_alloc(a, err);
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
        if old == 0 {
            // The table was just written as zeroes: cache its slices without reading them
            // back.
            let unit = self.l2.unit as u64;
            for s in 0..self.geo.cluster_size() / unit {
                self.l2.insert_clean_zeroed(alloc.host + s * unit);
            }
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
            let m = self.mapping_at(slot, idx + n, gc + n as u64)?;
            let (new, free) = match edit_entry(m, edit, v3, self.names_backing()) {
                // Dropping the mapping clears zero bits too.
                (None, f) if edit == Edit::Full && self.bitmap(slot, idx + n) != 0 => {
                    (Some(L2Entry(0)), f)
                }
                x => x,
            };
            if let Some(e) = new {
                self.set_entry(slot, idx + n, e);
            }
            if let Some(m) = free {
                self.free_mapping(m);
            }
            n += 1;
        }
        if n > 0 && self.data_file_raw() && edit != Edit::Full {
            let end = ((gc + n as u64) << cb).min(self.hdr.size);
            self.zero_raw_data_file(t, gc << cb, end);
        }
        let task = self.task(t);
        task.pos = end.min((gc + n.max(1) as u64) << cb);
        Ok(())
    }

    /// Keeps a raw external data file a valid raw image of the disk: guest bytes
    /// `[start, end)`, which now read as zero, are zeroed there too (QEMU's
    /// `qcow2_subcluster_zeroize`; a discard becomes zeroes).
    fn zero_raw_data_file(&mut self, t: u32, start: u64, end: u64) {
        self.issue_bare_at(
            crate::io::Target::DataFile,
            Purpose::TaskIo { task: t },
            IoKind::WriteZeroes { len: end - start },
            start,
        );
        self.task(t).inflight += 1;
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
            _ if pos >= self.view_end => Ok((end, Allocation::Zero { host: None })),
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
                let first = self.mapping_at(slot, idx, gc)?;
                let cmask = cs - 1;
                // Host offsets keyed by host minus guest offset: equal keys are contiguous.
                let key = |m: Mapping, sub: Sub, g: u64| {
                    let host = match m {
                        Mapping::Data { host, .. } | Mapping::Zero { host, .. } if host != 0 => {
                            Some((host + (g & cmask)).wrapping_sub(g))
                        }
                        _ => None,
                    };
                    Some(match (sub, host) {
                        (Sub::Data(h), _) => Status::Data(h.wrapping_sub(g)),
                        (Sub::Zero, h) => Status::Zero(h),
                        (Sub::Unallocated, None) => Status::Unallocated,
                        (Sub::Unallocated, Some(h)) => Status::Reserved(h),
                        (Sub::Compressed, _) => Status::Compressed,
                    })
                };
                let (run_end, k) = self.unit_run(slot, idx, first, pos, end, key);
                let at = |delta: u64| delta.wrapping_add(pos);
                let allocation = match k.expect("every unit has a status") {
                    Status::Unallocated => Allocation::Unallocated,
                    Status::Reserved(d) => Allocation::Reserved { host: at(d) },
                    Status::Zero(d) => Allocation::Zero { host: d.map(at) },
                    Status::Data(d) => Allocation::Data { host: at(d) },
                    Status::Compressed => Allocation::Compressed,
                };
                Ok((run_end, allocation))
            }),
        };
        let found = found.map(|(e, a)| (e.min(self.view_end.max(pos + 1)), a));
        let size = self.backing.as_ref().map(|b| b.size);
        match found {
            Err(Block::Park) => return false,
            Err(Block::Fail(e)) => self.task(t).error = Some(e),
            Ok((extent_end, Allocation::Unallocated | Allocation::Reserved { .. }))
                if size.is_some_and(|s| pos < s) =>
            {
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
                    && self.decode(self.entry(slot, idx + n)) == Mapping::Unallocated
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
                        lead: 0,
                        head: 0,
                        body_start: 0,
                        body_len: 0,
                        body: Body::Zeroes,
                        tail: 0,
                        staged: [None, None],
                        cow_pending: 0,
                        // (Preallocated subclusters stay unallocated, as in QEMU.)
                        bitmaps: [0; 3],
                        in_place: false,
                    },
                    host,
                    count: got,
                    state: AllocState::Ready,
                    io_pending: 0,
                    joinable: false,
                    joined: ArrayVec::new(),
                    deferred: None,
                    fresh: false,
                });
                let len = got << cb;
                // A standard entry makes the guest read the host cluster: one the file may
                // hold old bytes in (below `zero_from`: freed metadata, say a refcount
                // table that moved while preallocating) is zeroed, not just allocated.
                let stale =
                    !self.geo.extended_l2() && !self.has_data_file() && host < self.zero_from;
                match mode {
                    Preallocation::Falloc | Preallocation::Metadata
                        if stale || mode == Preallocation::Falloc =>
                    {
                        let alloc = self.allocs[a as usize].as_mut().expect("just made");
                        (alloc.state, alloc.io_pending) = (AllocState::Io, 1);
                        let kind = if stale {
                            IoKind::WriteZeroes { len }
                        } else {
                            IoKind::Allocate { len }
                        };
                        self.issue_bare(Purpose::AllocWrite { alloc: a }, kind, host);
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
