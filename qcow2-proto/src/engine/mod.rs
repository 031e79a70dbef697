//! The engine: open, caches, allocation, request tasks and write-back, tied together.
//!
//! Everything runs inside [`Image::submit`] and [`Image::complete`]: each input makes some
//! tasks runnable, [`Image::pump`] steps them until every one is blocked (waiting for an op,
//! a cache load, an allocation or a write-back cycle), and the ops they produced wait in
//! `ready` for [`Image::poll_io`].
//!
//! Invariants:
//! 1. A task's `Done` is emitted only when none of its ops is outstanding, so the runtime
//!    may release the guest buffer at `Done`.
//! 2. Refcount increments happen in the cache before any entry referencing the cluster is
//!    changed; decrements are queued (`pending_frees`) and applied only after a write-back
//!    cycle made the dropping entry durable (rules A and B).
//! 3. L2 entries are linked only after the data write completed (rule C), including the
//!    writes of other tasks that joined the allocation (`Alloc::joined`); write-back writes
//!    refblocks, syncs, then refcount-table entries, syncs, then L2 slices, syncs, then L1
//!    entries, syncs, then the header, syncs (rules A, C, D; a count is durable only once
//!    the refcount-table entry reaching its block is).
//! 4. While a cycle takes its copies (`window`), no reference-creating change is made, so a
//!    cycle never writes a reference whose target it did not make durable first. One
//!    exception: a data allocation into fresh space whose counts a write-back copy took
//!    already (written ahead) and that replaces no host cluster is linked then
//!    (`Image::links_in_window`): its count is durable before any L2 write-back that can
//!    carry the entry, and its data need not be (rule C, [`Alloc::fresh`]).
//! 5. A clean slot or table is not a durable one while a cycle is in progress (the cycle
//!    marked it clean when it took its copy): close and check wait for the cycle to end, and
//!    close is done only with no op outstanding, since the runtime then closes the file.

mod alloc;
mod amend;
mod backing;
mod bitmap_store;
mod bitmaps;
mod cache;
mod compress;
mod datafile;
mod open;
mod overlap;
mod rebase;
mod resize;
mod snapshot;
mod tasks;
mod writeback;

use std::collections::VecDeque;

use arrayvec::ArrayVec;

use crate::amend::{AmendOptions, Amender};
use crate::check::{CheckReport, Checker, Repair};
use crate::config::{CreateOptions, ImageConfig, Preallocation};
use crate::error::{CorruptReason, Corruption, RequestError, Structure, SubmitError};
use crate::event::Event;
use crate::format::header::{incompat, Header};
use crate::format::{Geometry, Layout};
use crate::info::ImageInfo;
use crate::io::{IoBuf, IoError, IoKind, IoOp, OpId, Segment, Segments, Target};
use crate::request::{BlockStatus, Outcome, ReqId, Request};

use cache::Cache;
use overlap::{MetaIndex, Own};

/// Bytes of L1 and refcount-table written back at once (one sector: O_DIRECT-friendly).
const TABLE_CHUNK: usize = 512;

#[derive(Debug, Clone, Copy, Eq, PartialEq)]
enum Phase {
    Opening,
    Open,
    Failed,
    Closed,
}

/// Why an op was issued, so its completion goes to the right place.
#[derive(Debug, Clone, Copy, Eq, PartialEq)]
enum Purpose {
    Open,
    /// Guest read, zero-fill or in-place write of task `task`.
    Guest {
        task: u32,
        write: bool,
    },
    /// The data write of allocation `alloc`.
    AllocWrite {
        alloc: u32,
    },
    /// Task `task`'s write into the clusters of allocation `alloc` while it is in flight
    /// (see [`Alloc::joined`]).
    JoinWrite {
        alloc: u32,
        task: u32,
    },
    /// Copy-on-write read (part 0 = head, 1 = tail) for allocation `alloc`.
    CowRead {
        alloc: u32,
        part: u8,
    },
    /// Read of a shared L2 table being copied for allocation `alloc`.
    TableRead {
        alloc: u32,
    },
    /// Write of a new (zeroed or copied) L2 table for allocation `alloc`.
    TableWrite {
        alloc: u32,
    },
    /// Cache load into slot `slot` (refcount cache when `rb`).
    Load {
        rb: bool,
        slot: u32,
    },
    /// A write-back metadata write (buffer returned to the cache pool when `pool`).
    Writeback {
        pool: Pool,
        slot: u32,
    },
    /// A write-back fdatasync.
    Sync,
    /// An op owned by a multi-step task (resize, preallocation).
    TaskIo {
        task: u32,
    },
    /// An op of the checker (or the amender) run by task `task`, known to it as `inner`.
    Check {
        task: u32,
        inner: u32,
    },
    /// The direct write of the corrupt bit after a refused metadata write.
    Mark,
    /// Read of a compressed cluster's stream for task `task`'s guest bytes `start..+len`,
    /// which are bytes `skip..` of the cluster.
    CompressedRead {
        task: u32,
        skip: u32,
        start: usize,
        len: u32,
    },
    /// Read of a compressed cluster's stream for part `part` of allocation `alloc`'s
    /// copy-on-write (bytes `skip..` of the cluster).
    CompressedCow {
        alloc: u32,
        part: u8,
        skip: u32,
    },
    /// Compression of task `task`'s guest cluster.
    Compress {
        task: u32,
    },
    /// Decompression into task `task`'s guest buffer.
    Decompress {
        task: u32,
    },
    /// Decompression into part `part` of allocation `alloc`'s staging.
    DecompressCow {
        alloc: u32,
        part: u8,
    },
    /// A header rewrite of task `task` (a new backing file).
    Header {
        task: u32,
    },
    /// A read of the snapshot table or of a snapshot's L1 table for snapshot task `task`.
    SnapshotRead {
        task: u32,
    },
    /// A read of a persistent bitmap's table (`index` `u32::MAX`) or data cluster `index`.
    BitmapRead {
        task: u32,
        index: u32,
    },
    /// An op of the backing file's engine, known to it as `inner`, carrying guest spans of
    /// its request `nreq` (`u32::MAX`: none).
    Nested {
        inner: u32,
        nreq: u32,
    },
}

#[derive(Debug, Clone, Copy, Eq, PartialEq)]
enum Pool {
    None,
    L2,
    Rb,
}

#[derive(Debug)]
struct OpSlot {
    purpose: Purpose,
    /// Issue sequence number of data ops (for "no reuse while I/O targets it").
    seq: u64,
    /// Set when the overlap check refused the op: it fails without being issued.
    refused: Option<Corruption>,
    /// For [`Purpose::Nested`]: where its guest spans start in the nested request's buffer.
    nested_start: usize,
}

#[derive(Debug, Clone, Copy, Eq, PartialEq)]
enum Kind {
    Read,
    Write,
    Zeroes { unmap: bool },
    Discard,
    Flush,
    Resize { size: u64, shrink: bool },
    Status,
    Check { repair: Option<Repair> },
    Close,
    CountRefcounted { limit: u64 },
    Prealloc(Preallocation),
    MakeEmpty,
    SetBacking,
    WriteCompressed,
    Snapshot,
    BitmapRead,
    Amend(AmendOptions),
}

impl Kind {
    fn exclusive(self) -> bool {
        matches!(
            self,
            Self::Resize { .. }
                | Self::Check { .. }
                | Self::Close
                | Self::Prealloc(_)
                | Self::MakeEmpty
                | Self::SetBacking
                | Self::Snapshot
                | Self::Amend(_)
        )
    }

    fn writes(self) -> bool {
        !matches!(
            self,
            Self::Read
                | Self::Status
                | Self::BitmapRead
                | Self::Flush
                | Self::Check { repair: None }
                | Self::CountRefcounted { .. }
        )
    }
}

#[derive(Debug)]
struct Task {
    req: ReqId,
    seq: u64,
    kind: Kind,
    /// Guest offset of byte 0 of the request's buffer.
    origin: u64,
    /// Next guest byte to handle.
    pos: u64,
    end: u64,
    inflight: u32,
    error: Option<RequestError>,
    /// The data allocation this task waits on (at most one at a time).
    alloc: Option<u32>,
    /// The allocation of another task this one wrote into (see [`Alloc::joined`]): the
    /// task is finished only once that allocation is linked or given up.
    join: Option<u32>,
    /// A write that starts where the previous one ended (more are likely to follow).
    sequential: bool,
    /// Finished once `cycles_done` reaches this.
    wait_cycle: Option<u64>,
    /// Sub-state of multi-step tasks.
    sub: u8,
    /// Scratch value of multi-step tasks.
    aux: u64,
    status: Option<BlockStatus>,
    /// The report of a check task.
    report: Option<Box<CheckReport>>,
    /// The bits a bitmap read gathered.
    bitmap: Option<Box<crate::info::BitmapData>>,
}

/// What the body of a write piece comes from.
#[derive(Debug, Clone, Copy, Eq, PartialEq)]
enum Body {
    Guest,
    Zeroes,
}

#[derive(Debug)]
enum AllocWhat {
    /// `count` guest clusters from `guest_cluster`, COW head/tail around the body; the
    /// write starts at byte `lead` of the first cluster.
    Data {
        guest_cluster: u64,
        lead: u64,
        head: u64,
        body_start: usize,
        body_len: usize,
        body: Body,
        tail: u64,
        staged: [Option<IoBuf>; 2],
        cow_pending: u8,
        /// With extended L2 entries: the new bitmaps of the first, middle and last
        /// clusters.
        bitmaps: [u64; 3],
        /// Written into clusters already mapped (no new clusters, nothing to free).
        in_place: bool,
    },
    /// A new L2 table for L1 index `l1_index`, copied from `old` when non-zero.
    L2Table { l1_index: u64, old: u64 },
    /// A compressed stream of `len` bytes for guest cluster `guest_cluster` (the
    /// allocation's `host` is its byte offset, `count` the clusters it touches).
    Compressed { guest_cluster: u64, len: u64 },
}

#[derive(Debug, Clone, Copy, Eq, PartialEq)]
enum AllocState {
    Io,
    Ready,
    Failed(RequestError),
}

#[derive(Debug)]
struct Alloc {
    task: u32,
    what: AllocWhat,
    host: u64,
    count: u64,
    state: AllocState,
    /// Data-side ops (write, edge allocations, joined writes) still outstanding.
    io_pending: u8,
    /// Whether other writes may go into the new clusters while the allocation's own write
    /// is in flight: set when that write covers only its guest data (no copy-on-write, no
    /// zeroes: the rest of the clusters reads as zero in the file already).
    joinable: bool,
    /// Tasks whose writes went into these clusters while the allocation was in flight.
    /// Their data is written before the clusters are linked (the allocation waits for those
    /// writes like for its own), and each task finishes only after the link, so a
    /// sequential writer's next requests in a fresh cluster run in parallel instead of
    /// waiting one allocation each. If the allocation fails, they fail with it.
    joined: ArrayVec<u32, MAX_JOINS>,
    /// Copy-on-write put off for joins, until its writes are issued.
    deferred: Option<Deferred>,
    /// The clusters read as zero before this allocation (no data, no backing data under
    /// them) and are host space never written, inside the durable file length: should
    /// the new L2 entry reach the disk and the data not, they read as zero, as before the
    /// write. So the data need not be durable before the entry (rule C holds: nothing
    /// becomes readable that was not there), only by the end of the cycle.
    fresh: bool,
}

/// Copy-on-write put off so that writes can join: the guest data of the allocation goes
/// out at once, alone; `cover` (bytes from the allocation's first cluster) is what it and
/// the joined writes have written, one contiguous range that joins may only extend. When
/// the copy-on-write reads are in, only the parts of the head and tail outside `cover` are
/// written, so a sequential writer's next requests replace the copy instead of waiting for
/// it. Chosen for sequential writes only: otherwise one write of head, data and tail
/// costs fewer ops.
#[derive(Debug)]
struct Deferred {
    cover: (u64, u64),
    /// While other requests are in flight, the reads wait too: these are the sources of
    /// head and tail, read once the guest data is written, and then only what `cover`
    /// does not reach by then (a sequential stream's next writes often replace the whole
    /// copy, read included).
    later: Option<[Option<tasks::Cow>; 2]>,
    /// The guest data is written (the put-off reads may go).
    body_done: bool,
    /// Where each staged copy-on-write buffer starts, in bytes from the first cluster.
    from: [u64; 2],
}

/// Writes that may join one allocation (see [`Alloc::joined`]).
const MAX_JOINS: usize = 32;

impl Alloc {
    /// Whether any of its I/O (copy-on-write reads, data write, edge allocations) is in
    /// flight.
    fn busy(&self) -> bool {
        self.io_pending > 0
            || self.deferred.is_some()
            || matches!(self.what, AllocWhat::Data { cow_pending, .. } if cow_pending > 0)
    }
}

/// A refcount decrement waiting for the entry that dropped the reference to be durable.
#[derive(Debug, Clone, Copy)]
struct Free {
    host: u64,
    /// Contiguous clusters from `host`.
    count: u64,
    /// Releasable once `cycles_done > tag`.
    tag: u64,
    /// Data ops issued before this sequence number must have completed.
    op_seq: u64,
}

/// The qcow2 engine: a sans-IO state machine (see the crate documentation).
#[derive(Debug)]
pub struct Image {
    config: ImageConfig,
    phase: Phase,
    open: open::OpenState,
    create: Option<CreateOptions>,

    layout: Option<Layout>,
    hdr: Header,
    /// The header as last written (or read at open): what a crash finds.
    hdr_disk: Header,
    geo: Geometry,
    header_buf: IoBuf,
    info: Option<ImageInfo>,
    read_only: bool,
    l1: Vec<u64>,
    l1_dirty: Vec<bool>,
    reftable: Vec<u64>,
    rt_dirty: Vec<bool>,
    /// Active L2 tables and refcount blocks by host cluster, for the overlap checks.
    meta: MetaIndex,
    /// Bytes of the snapshot table (0 without snapshots).
    snapshot_table_bytes: u64,
    rt_relocated: bool,
    header_dirty: bool,
    l2: Cache,
    rb: Cache,
    next_free: u64,
    /// Highest byte the file may hold data at (file length at open, grown by every write
    /// issued since): clusters past it read as zero without being written.
    file_end: u64,
    /// End of the host space allocated to clusters or written (a high-water mark, bytes:
    /// a repair or an amend may write structures of its own): what the file is cut back to
    /// at close after growing ahead.
    alloc_high: u64,
    /// Whether host space was allocated ahead of use ([`ImageConfig::grow_step`]).
    grew: bool,
    /// End of the host space allocated ahead (0: none).
    ahead_end: u64,
    /// A metadata preallocation runs: its clusters stay unwritten, so no host space is
    /// allocated ahead of them (the file stays sparse, as QEMU's).
    sparse_prealloc: bool,
    /// End of the last in-place guest write, and of the host space allocated ahead of a
    /// sequential stream of them (see `Image::fill_ahead`).
    inplace_end: u64,
    fill_end: u64,
    /// From here on the file holds nothing but zeros (past the end, or allocated ahead
    /// and never written).
    zero_from: u64,
    /// File length reached by completed `Allocate` ops (and at open).
    len_done: u64,
    /// File length a completed barrier made durable: a crash keeps at least this much.
    len_durable: u64,
    /// Refcounts written ahead of allocation (see [`alloc`]).
    reserve: alloc::Reserve,
    free_list: Vec<u64>,
    pending_frees: VecDeque<Free>,
    staging: Vec<IoBuf>,
    /// Guest offset just past the last write submitted: a write starting there continues
    /// a sequential stream (see [`Alloc::cover`]).
    last_write_end: u64,

    tasks: Vec<Option<Task>>,
    task_free: Vec<u32>,
    task_seq: u64,
    runnable: VecDeque<u32>,
    /// Whether each task is already in `runnable` (so the queue never outgrows its capacity).
    queued: Vec<bool>,
    parked: Vec<u32>,
    allocs: Vec<Option<Alloc>>,
    alloc_free: Vec<u32>,
    /// Live tasks of exclusive kinds (resize, check, close, preallocation).
    exclusive_tasks: u32,

    ops: Vec<Option<OpSlot>>,
    op_free: Vec<u32>,
    op_seq: u64,
    ready: VecDeque<IoOp>,
    /// Ops the overlap check refused: they complete with an error at the next pump.
    refused: VecDeque<IoOp>,
    /// The corruption of the refused op being completed (its error, instead of EIO).
    refusing: Option<Corruption>,
    events: VecDeque<Event>,

    cycle: Option<writeback::Cycle>,
    cycles_started: u64,
    cycles_done: u64,
    cycle_wanted: bool,
    window: bool,
    /// Guest data (or a new table) completed since the last barrier: the next guest flush
    /// needs a barrier even when no metadata changed.
    unsynced_data: bool,
    /// Part of that data must be durable before the mappings the next cycle writes
    /// (rule C); the rest reads as zero until then whichever reaches the disk first (see
    /// [`Alloc::fresh`]).
    ordered_data: bool,
    poisoned: Option<RequestError>,
    /// Set when a cache had no slot to load into (every slot dirty): only write-back helps.
    cache_full: bool,
    /// The checker of a running check task.
    checker: Option<Box<Checker>>,
    /// The amender of a running amend task.
    amender: Option<Box<Amender>>,
    /// The check task waiting for metadata to be reloaded after a repair.
    reload_task: Option<u32>,
    /// The backing file, once the image names one and the runtime attached it.
    backing: Option<Box<backing::Backing>>,
    /// The external data file, once the image names one.
    data_file: Option<datafile::DataFile>,
    /// The backing file a set-backing task writes into the header: name and format.
    new_backing: Option<(Option<String>, Option<String>)>,
    /// Where the next compressed stream may go in the partly used cluster of the last one.
    free_bytes: Option<u64>,
    /// Compressed streams waiting for host space, by task.
    streams: Vec<Option<IoBuf>>,
    /// The internal snapshot opened instead of the active image, if any.
    view: Option<crate::config::SnapshotRef>,
    /// Where the opened snapshot's disk ends (`u64::MAX` for the active image): reads past
    /// it are zeros.
    view_end: u64,
    /// The running snapshot create or delete.
    snap: Option<Box<snapshot::SnapOp>>,
    /// The running bitmap read.
    bitmap_read: Option<Box<bitmaps::BitmapRead>>,
    /// The persistent bitmaps maintained while open for writing.
    bitmaps: Option<Box<bitmaps::Live>>,
    /// Storing the bitmaps back at close, in progress.
    bitmap_store: Option<Box<bitmap_store::Store>>,
}

/// Outcome of trying to make progress on something that may have to wait.
#[derive(Debug)]
enum Block {
    /// Wait; a later wake-up retries.
    Park,
    /// Give up with this error.
    Fail(RequestError),
}

impl From<RequestError> for Block {
    fn from(e: RequestError) -> Self {
        Self::Fail(e)
    }
}

impl Image {
    fn empty(config: ImageConfig) -> Self {
        let max_requests = config.limits.max_requests.max(1);
        let op_cap = max_requests * 8 + 256;
        Self {
            config,
            phase: Phase::Opening,
            open: open::OpenState::default(),
            create: None,
            layout: None,
            hdr: Header::default(),
            hdr_disk: Header::default(),
            geo: Geometry::new(16, 4),
            header_buf: IoBuf::zeroed(0),
            info: None,
            read_only: config.read_only || config.inspect_only,
            l1: Vec::new(),
            l1_dirty: Vec::new(),
            reftable: Vec::new(),
            rt_dirty: Vec::new(),
            rt_relocated: false,
            meta: MetaIndex::default(),
            snapshot_table_bytes: 0,
            header_dirty: false,
            l2: Cache::new(512, 2),
            rb: Cache::new(512, 2),
            next_free: 1,
            file_end: 0,
            alloc_high: 0,
            grew: false,
            ahead_end: 0,
            sparse_prealloc: false,
            inplace_end: 0,
            fill_end: 0,
            zero_from: 0,
            len_done: 0,
            len_durable: 0,
            reserve: alloc::Reserve::default(),
            free_list: Vec::with_capacity(4096),
            pending_frees: VecDeque::with_capacity(1024),
            staging: Vec::new(),
            last_write_end: 0,
            tasks: (0..max_requests).map(|_| None).collect(),
            task_free: (0..max_requests as u32).rev().collect(),
            task_seq: 0,
            runnable: VecDeque::with_capacity(max_requests),
            queued: vec![false; max_requests],
            parked: Vec::with_capacity(max_requests),
            allocs: (0..max_requests * 2).map(|_| None).collect(),
            alloc_free: (0..(max_requests * 2) as u32).rev().collect(),
            exclusive_tasks: 0,
            ops: (0..op_cap).map(|_| None).collect(),
            op_free: (0..op_cap as u32).rev().collect(),
            op_seq: 0,
            ready: VecDeque::with_capacity(op_cap),
            refused: VecDeque::new(),
            refusing: None,
            events: VecDeque::with_capacity(max_requests + 4),
            cycle: None,
            cycles_started: 0,
            cycles_done: 0,
            cycle_wanted: false,
            window: false,
            unsynced_data: false,
            ordered_data: false,
            poisoned: None,
            cache_full: false,
            checker: None,
            amender: None,
            reload_task: None,
            backing: None,
            data_file: None,
            new_backing: None,
            free_bytes: None,
            streams: Vec::new(),
            view: None,
            view_end: u64::MAX,
            snap: None,
            bitmap_read: None,
            bitmaps: None,
            bitmap_store: None,
        }
    }

    /// Starts opening the image described by `config`. No I/O happens here: the first
    /// [`poll_io`](Self::poll_io) asks for the header. Opening ends with
    /// [`Event::Opened`] or [`Event::OpenFailed`].
    pub fn open(config: ImageConfig) -> Self {
        let mut img = Self::empty(config);
        img.pump();
        img
    }

    /// Starts opening the contents of the internal snapshot `snapshot` of the image, read-
    /// only, in place of the active image (what `qemu-img convert -l` reads). Opening
    /// fails with [`OpenError::SnapshotNotFound`](crate::OpenError::SnapshotNotFound) when
    /// the image has no such snapshot.
    pub fn open_snapshot(config: ImageConfig, snapshot: crate::config::SnapshotRef) -> Self {
        let mut img = Self::empty(ImageConfig {
            read_only: true,
            ..config
        });
        img.view = Some(snapshot);
        img.pump();
        img
    }

    /// Starts formatting an empty file as a new image with `options`, then opens it (and
    /// preallocates, if asked). Ends like [`open`](Self::open).
    pub fn create(config: ImageConfig, options: CreateOptions) -> Self {
        let mut img = Self::empty(ImageConfig {
            read_only: false,
            inspect_only: false,
            ..config
        });
        img.read_only = false;
        img.create = Some(options);
        img.pump();
        img
    }

    /// The image's facts, once opened.
    pub fn info(&self) -> Option<&ImageInfo> {
        self.info.as_ref()
    }

    /// Whether no request is in flight and nothing waits to be written back.
    pub fn is_idle(&self) -> bool {
        self.tasks.iter().all(Option::is_none) && self.cycle.is_none() && self.ready.is_empty()
    }

    /// Submits a request. Guest data stays with the caller: ops name spans of the request's
    /// buffer, which must stay valid until the request's [`Event::Done`].
    ///
    /// After it, drain [`poll_io`](Self::poll_io) and [`poll_event`](Self::poll_event).
    pub fn submit(&mut self, request: Request) -> Result<ReqId, SubmitError> {
        match self.phase {
            Phase::Opening | Phase::Failed => return Err(SubmitError::NotOpen),
            Phase::Closed => return Err(RequestError::Closed.into()),
            Phase::Open => {}
        }
        let size = self.hdr.size;
        let (kind, offset, len) = match request {
            Request::Read { offset, len } => (Kind::Read, offset, len),
            Request::Write { offset, len } => (Kind::Write, offset, len),
            Request::WriteZeroes { offset, len, unmap } => (Kind::Zeroes { unmap }, offset, len),
            Request::Discard { offset, len } => (Kind::Discard, offset, len),
            Request::Flush => (Kind::Flush, 0, 0),
            Request::Resize { size, shrink } => (Kind::Resize { size, shrink }, 0, 0),
            Request::BlockStatus { offset, len } => (Kind::Status, offset, len),
            Request::Check { repair } => (Kind::Check { repair }, 0, 0),
            Request::Close => (Kind::Close, 0, 0),
            Request::CountRefcounted { end, limit } => (Kind::CountRefcounted { limit }, 0, end),
            Request::MakeEmpty => (Kind::MakeEmpty, 0, size),
            Request::WriteCompressed { offset, len } => (Kind::WriteCompressed, offset, len),
        };
        self.submit_kind(kind, offset, len)
    }

    /// Submits a task of `kind` over guest `[offset, offset + len)` after the checks every
    /// request goes through.
    fn submit_kind(&mut self, kind: Kind, offset: u64, len: u64) -> Result<ReqId, SubmitError> {
        let size = self.hdr.size;
        if let Some(e) = self.poisoned {
            if kind.writes() || kind == Kind::Flush {
                return Err(e.into());
            }
        }
        let metadata_only = matches!(
            kind,
            Kind::Close | Kind::Flush | Kind::Check { .. } | Kind::CountRefcounted { .. }
        );
        if let Some(f) = self.layout.as_ref().and_then(|l| l.unsupported) {
            if !metadata_only {
                return Err(RequestError::Unsupported(f).into());
            }
        }
        if self.config.check_only && !metadata_only {
            return Err(RequestError::CheckOnly.into());
        }
        if kind == Kind::WriteCompressed && self.has_data_file() {
            // Like QEMU: an external data file has no room for compressed clusters.
            return Err(RequestError::Unsupported(crate::error::Feature::ExternalDataFile).into());
        }
        if self.read_only && kind.writes() && kind != Kind::Close {
            return Err(RequestError::ReadOnly.into());
        }
        if matches!(
            kind,
            Kind::Read
                | Kind::Write
                | Kind::Zeroes { .. }
                | Kind::Discard
                | Kind::Status
                | Kind::WriteCompressed
        ) {
            let out = RequestError::OutOfRange { offset, len, size };
            if offset.checked_add(len).is_none_or(|e| e > size) {
                return Err(out.into());
            }
            if len > self.config.limits.max_request_bytes
                && matches!(kind, Kind::Read | Kind::Write)
            {
                return Err(out.into());
            }
        }
        let Some(t) = self.task_free.pop() else {
            return Err(SubmitError::Busy);
        };
        if matches!(
            kind,
            Kind::Write
                | Kind::Zeroes { .. }
                | Kind::Discard
                | Kind::WriteCompressed
                | Kind::MakeEmpty
        ) {
            // Marked at once: a bitmap may say more changed than did, never less.
            self.mark_dirty(offset, len);
        }
        if kind.exclusive() {
            self.exclusive_tasks += 1;
        }
        self.task_seq += 1;
        let req = ReqId(t);
        let sequential = kind == Kind::Write && offset == self.last_write_end;
        if kind == Kind::Write {
            self.last_write_end = offset + len;
        }
        self.tasks[t as usize] = Some(Task {
            req,
            seq: self.task_seq,
            kind,
            origin: offset,
            pos: offset,
            end: offset + len,
            inflight: 0,
            error: None,
            alloc: None,
            join: None,
            sequential,
            wait_cycle: None,
            sub: 0,
            aux: 0,
            status: None,
            report: None,
            bitmap: None,
        });
        self.make_runnable(t);
        self.pump();
        Ok(req)
    }

    /// The next op to perform, if any. Every op returned may be started at once,
    /// concurrently with all other outstanding ops, in any order.
    ///
    /// Call after [`open`](Self::open), [`create`](Self::create), [`submit`](Self::submit) and
    /// [`complete`](Self::complete), until it returns `None`.
    pub fn poll_io(&mut self) -> Option<IoOp> {
        self.ready.pop_front()
    }

    /// The next event, if any. Call after the same inputs as [`poll_io`](Self::poll_io).
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Feeds back a finished op: the op itself (with every buffer it carried) and its result,
    /// the bytes transferred or the error. Reads past the end of the file must come back
    /// zero-filled; a runtime resubmits short transfers itself (a write reported short
    /// fails as an I/O error).
    pub fn complete(&mut self, op: IoOp, result: Result<usize, IoError>) {
        let result = match result {
            // A write is complete only when all of it is: a short count (a runtime that did
            // not go on from where the kernel stopped) fails the op rather than leave the
            // rest unwritten behind a success.
            Ok(n) if op.kind == IoKind::Write && (n as u64) < op.len() => Err(SHORT_WRITE),
            r => r.map(|_| ()),
        };
        self.complete_op(op, result);
        self.wake_all();
        self.pump();
    }

    /// Hands a finished op to whatever issued it.
    fn complete_op(&mut self, op: IoOp, result: Result<(), IoError>) {
        let Some(slot) = self.ops.get_mut(op.id.0 as usize).and_then(Option::take) else {
            debug_assert!(false, "completion of an unknown op {:?}", op.id);
            return;
        };
        self.op_free.push(op.id.0);
        self.refusing = slot.refused;
        match slot.purpose {
            Purpose::Open => self.open_complete(op, result),
            Purpose::Guest { task, write } => {
                if write && result.is_ok() {
                    // In place: a guest write waits only for the next guest flush; an image
                    // operation's (a resize zeroing the old last cluster's tail) comes
                    // before the metadata written after it (the new size).
                    let guest = self.tasks[task as usize]
                        .as_ref()
                        .is_some_and(|t| matches!(t.kind, Kind::Write | Kind::Zeroes { .. }));
                    self.data_done(!guest);
                }
                let result = result.map_err(|e| self.io_error(e));
                self.task_io_done(task, result);
            }
            Purpose::AllocWrite { alloc } => self.alloc_write_done(alloc, op, result),
            Purpose::JoinWrite { alloc, task } => self.join_write_done(alloc, task, result),
            Purpose::CowRead { alloc, part } => self.cow_read_done(alloc, part, op, result),
            Purpose::TableRead { alloc } => self.table_read_done(alloc, op, result),
            Purpose::TableWrite { alloc } => self.table_write_done(alloc, op, result),
            Purpose::Load { rb, slot } => self.load_done(rb, slot, op, result),
            Purpose::Writeback { pool, slot } => self.writeback_done(pool, slot, op, result),
            Purpose::Sync => self.sync_done(result),
            Purpose::CompressedRead {
                task,
                skip,
                start,
                len,
            } => self.compressed_read_done(task, (skip, start, len), op, result),
            Purpose::CompressedCow { alloc, part, skip } => {
                self.compressed_cow_done(alloc, part, skip, op, result)
            }
            Purpose::Compress { task } => self.compress_done(task, op, result),
            Purpose::Decompress { task } => {
                self.recycle(op);
                let result = result.map_err(|e| self.decompress_error(e));
                self.task_io_done(task, result);
            }
            Purpose::DecompressCow { alloc, part } => {
                let mut segs = op.segments.into_iter();
                let (input, scratch, out) = (segs.next(), segs.next(), segs.next());
                for s in [input, scratch].into_iter().flatten() {
                    if let Segment::Buf(b) = s {
                        self.put_staging(b);
                    }
                }
                if let Some(Segment::Buf(b)) = out {
                    self.set_staged(alloc, part, b);
                }
                let result = result.map_err(|e| self.decompress_error(e));
                self.cow_part_done(alloc, part, result);
            }
            Purpose::SnapshotRead { task } => self.snapshot_read_done(task, op, result),
            Purpose::BitmapRead { task, index } => self.bitmap_read_done(task, index, op, result),
            Purpose::Header { task } => {
                self.recycle(op);
                let result = result.map_err(|e| self.io_error(e));
                self.task_io_done(task, result);
            }
            Purpose::TaskIo { task } => {
                if op.kind != IoKind::Read && result.is_ok() {
                    // A new table (a grown L1): the next cycle's first barrier makes it
                    // durable before the header points at it (rule D).
                    self.unsynced_data = true;
                    self.ordered_data = true;
                }
                self.recycle(op);
                let result = result.map_err(|e| self.io_error(e));
                self.task_io_done(task, result);
            }
            Purpose::Check { task, inner } => {
                let mut op = op;
                op.id = OpId(inner);
                let n = op.len() as usize;
                if let Some(checker) = self.checker.as_mut() {
                    checker.complete(op, result.map(|()| n));
                } else if let Some(amender) = self.amender.as_mut() {
                    amender.complete(op, result.map(|()| n));
                }
                self.task_io_done(task, Ok(()));
            }
            Purpose::Mark => {
                if let (IoKind::Allocate { len }, Ok(())) = (op.kind, result) {
                    // Host space allocated ahead: durable with the next barrier.
                    self.len_done = self.len_done.max(op.offset + len);
                }
                self.recycle(op);
            }
            Purpose::Nested { inner, nreq } => {
                self.nested_complete(op, (inner, nreq, slot.nested_start), result)
            }
        }
        if self.refusing.take().is_some() && matches!(slot.purpose, Purpose::Writeback { .. }) {
            self.mark_corrupt_now();
        }
    }

    // ---- ops ----

    fn op_room(&self, n: usize) -> bool {
        self.op_free.len() >= n
    }

    fn issue(&mut self, purpose: Purpose, kind: IoKind, offset: u64, segments: Segments) {
        self.issue_at(Target::Image, purpose, kind, offset, segments);
    }

    /// Issues an op on `target` (only the image itself and its data file are ever
    /// written). Guest data ops aimed at the image go to the external data file when there
    /// is one.
    fn issue_at(
        &mut self,
        mut target: Target,
        purpose: Purpose,
        kind: IoKind,
        offset: u64,
        segments: Segments,
    ) {
        let id = self.op_free.pop().expect("callers check op_room first");
        let data = matches!(
            purpose,
            Purpose::Guest { .. }
                | Purpose::AllocWrite { .. }
                | Purpose::JoinWrite { .. }
                | Purpose::CowRead { .. }
        );
        if data && target == Target::Image && kind != IoKind::ZeroFill && self.has_data_file() {
            target = Target::DataFile;
        }
        self.op_seq += 1;
        let len: u64 = segments.iter().map(|s| s.len() as u64).sum();
        match kind {
            _ if target != Target::Image => {}
            IoKind::Write => {
                self.file_end = self.file_end.max(offset + len);
                self.zero_from = self.zero_from.max(offset + len);
                self.alloc_high = self.alloc_high.max(offset + len);
            }
            IoKind::WriteZeroes { len } => {
                self.file_end = self.file_end.max(offset + len);
                self.alloc_high = self.alloc_high.max(offset + len);
            }
            IoKind::Allocate { len } => self.file_end = self.file_end.max(offset + len),
            IoKind::SetLen => {
                self.len_done = self.len_done.min(offset);
                self.len_durable = self.len_durable.min(offset);
                self.file_end = offset;
                self.zero_from = self.zero_from.min(offset);
                self.ahead_end = self.ahead_end.min(offset);
            }
            _ => {}
        }
        let op = IoOp {
            id: OpId(id),
            target,
            kind,
            offset,
            segments,
        };
        let refused = self.write_overlap(purpose, &op);
        self.ops[id as usize] = Some(OpSlot {
            purpose,
            seq: if data && target == Target::Image {
                self.op_seq
            } else {
                u64::MAX
            },
            refused,
            nested_start: 0,
        });
        match refused {
            None => self.ready.push_back(op),
            Some(c) => {
                self.corrupt(c.structure, c.offset, c.reason);
                self.refused.push_back(op);
            }
        }
    }

    fn issue_buf(&mut self, purpose: Purpose, kind: IoKind, offset: u64, buf: IoBuf) {
        self.issue_buf_at(Target::Image, purpose, kind, offset, buf);
    }

    fn issue_buf_at(
        &mut self,
        target: Target,
        purpose: Purpose,
        kind: IoKind,
        offset: u64,
        buf: IoBuf,
    ) {
        let mut segs = ArrayVec::new();
        segs.push(Segment::Buf(buf));
        self.issue_at(target, purpose, kind, offset, segs);
    }

    fn issue_bare(&mut self, purpose: Purpose, kind: IoKind, offset: u64) {
        self.issue(purpose, kind, offset, ArrayVec::new());
    }

    fn issue_bare_at(&mut self, target: Target, purpose: Purpose, kind: IoKind, offset: u64) {
        self.issue_at(target, purpose, kind, offset, ArrayVec::new());
    }

    /// The oldest data op still outstanding, by issue sequence.
    fn oldest_data_op(&self) -> u64 {
        self.ops
            .iter()
            .flatten()
            .map(|s| s.seq)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Returns staging buffers carried by a finished op to the pool.
    fn recycle(&mut self, op: IoOp) {
        for seg in op.segments {
            if let Segment::Buf(b) = seg {
                self.put_staging(b);
            }
        }
    }

    fn staging_buf(&mut self, len: usize) -> IoBuf {
        let cs = self.geo.cluster_size() as usize;
        let mut b = match self.staging.pop() {
            Some(b) if b.capacity() >= len => b,
            _ => IoBuf::zeroed(len.max(cs)),
        };
        b.resize(len);
        b
    }

    fn put_staging(&mut self, b: IoBuf) {
        if b.capacity() >= self.geo.cluster_size() as usize && self.staging.len() < 64 {
            self.staging.push(b);
        }
    }

    // ---- scheduling ----

    fn wake_all(&mut self) {
        while let Some(t) = self.parked.pop() {
            self.make_runnable(t);
        }
    }

    fn make_runnable(&mut self, t: u32) {
        if !std::mem::replace(&mut self.queued[t as usize], true) {
            self.runnable.push_back(t);
        }
    }

    /// Steps runnable tasks and the write-back cycle until nothing moves.
    fn pump(&mut self) {
        loop {
            while let Some(op) = self.refused.pop_front() {
                self.complete_op(op, Err(REFUSED));
                self.wake_all();
            }
            if self.backing_pump() {
                self.wake_all();
            }
            if self.phase == Phase::Opening {
                self.open_pump();
                if self.phase == Phase::Opening {
                    return;
                }
            }
            let mut moved = false;
            while let Some(t) = self.runnable.pop_front() {
                self.queued[t as usize] = false;
                if let Some(i) = self.parked.iter().position(|&p| p == t) {
                    self.parked.swap_remove(i);
                }
                if self.tasks[t as usize].is_none() {
                    continue;
                }
                moved = true;
                if !self.step(t) && !self.parked.contains(&t) {
                    self.parked.push(t);
                }
            }
            let cycles = self.cycles_done;
            self.wb_pump();
            if self.cycles_done != cycles {
                self.wake_all();
                moved = true;
            }
            if self.phase == Phase::Opening {
                // Preallocation just finished: opening goes on.
                continue;
            }
            if self.backing_pump() {
                // Requests to the backing file went out, or some of them finished.
                self.wake_all();
                moved = true;
            }
            if (!moved || self.runnable.is_empty()) && self.refused.is_empty() {
                return;
            }
        }
    }

    /// Steps task `t`; false when it has to wait.
    fn step(&mut self, t: u32) -> bool {
        let task = self.tasks[t as usize]
            .as_ref()
            .expect("stepped tasks exist");
        let (kind, seq) = (task.kind, task.seq);
        // Exclusive operations wait for every older task; younger tasks wait for them.
        if self.exclusive_tasks > 0 {
            let older_busy = self.tasks.iter().flatten().any(|o| o.seq < seq);
            let exclusive_before = self
                .tasks
                .iter()
                .flatten()
                .any(|o| o.seq < seq && o.kind.exclusive());
            if exclusive_before || (kind.exclusive() && older_busy) {
                return false;
            }
        }
        if kind.exclusive() && self.poisoned.is_none() {
            // Image operations (and close) see refcounts on disk as they are in memory.
            match self.drop_reserve(true) {
                Ok(()) => {}
                Err(Block::Park) => return false,
                Err(Block::Fail(_)) => self.reserve = alloc::Reserve::default(),
            }
        }
        if let Some(e) = self.poisoned {
            let task = self.tasks[t as usize]
                .as_mut()
                .expect("stepped tasks exist");
            if task.error.is_none() && task.kind != Kind::Read && task.kind != Kind::Status {
                task.error = Some(e);
            }
        }
        let finished = match kind {
            Kind::Read => self.step_read(t),
            Kind::Write | Kind::Zeroes { .. } => self.step_write(t),
            Kind::Discard => self.step_discard(t),
            Kind::Status => self.step_status(t),
            Kind::Flush => self.step_flush(t),
            Kind::Close => self.step_close(t),
            Kind::Resize { .. } => self.step_resize(t),
            Kind::Prealloc(_) => self.step_prealloc(t),
            Kind::Check { repair } => self.step_check(t, repair),
            Kind::CountRefcounted { limit } => self.step_count_refcounted(t, limit),
            Kind::MakeEmpty => self.step_make_empty(t),
            Kind::SetBacking => self.step_set_backing(t),
            Kind::WriteCompressed => self.step_write_compressed(t),
            Kind::Snapshot => self.step_snapshot(t),
            Kind::BitmapRead => self.step_bitmap_read(t),
            Kind::Amend(options) => self.step_amend(t, options),
        };
        if finished {
            self.finish(t);
        }
        finished
    }

    /// Completes task `t` (all its ops are back).
    fn finish(&mut self, t: u32) {
        let task = self.tasks[t as usize].take().expect("finished tasks exist");
        self.task_free.push(t);
        if task.kind.exclusive() {
            self.exclusive_tasks -= 1;
        }
        let mut task = task;
        let bitmap = task.bitmap_outcome();
        let result = match task.error {
            Some(e) => Err(e),
            None => Ok(match (task.status, task.report, task.kind) {
                _ if bitmap.is_some() => bitmap.expect("checked"),
                (Some(s), _, _) => Outcome::Status(s),
                (None, Some(r), _) => Outcome::Check(r),
                (None, None, Kind::CountRefcounted { .. }) => Outcome::Count(task.aux),
                (None, None, _) => Outcome::Done,
            }),
        };
        if task.kind == Kind::Close && result.is_ok() {
            self.phase = Phase::Closed;
        }
        if let Kind::Prealloc(_) = task.kind {
            self.open_prealloc_done(result.err());
            self.wake_all();
            return;
        }
        self.events.push_back(Event::Done {
            req: task.req,
            result,
        });
        self.wake_all();
    }

    fn task(&mut self, t: u32) -> &mut Task {
        self.tasks[t as usize].as_mut().expect("live task")
    }

    fn task_io_done(&mut self, t: u32, result: Result<(), RequestError>) {
        let task = self.task(t);
        task.inflight -= 1;
        if let Err(e) = result {
            task.error.get_or_insert(e);
        }
        self.make_runnable(t);
    }

    /// Waits for a write-back cycle that starts after now; true once it is done.
    fn wait_for_cycle(&mut self, t: u32) -> bool {
        let started = self.cycles_started;
        let task = self.task(t);
        let target = *task.wait_cycle.get_or_insert(started + 1);
        if self.poisoned.is_some() || self.read_only && !self.header_dirty {
            // Nothing to write back (read-only), or nothing can be (poisoned).
            return true;
        }
        if self.cycles_done >= target || self.cycle.is_none() && !self.cycle_has_work() {
            // Done, or nothing completed before now still waits to be made durable.
            return true;
        }
        // (Once the cycle waited for runs, another is wanted only by whoever asks for it.)
        self.cycle_wanted |= target > self.cycles_started;
        false
    }

    /// Whether a write-back cycle would do anything now. Cycles never start empty: a
    /// parked task asking for one again at once would otherwise spin.
    fn cycle_has_work(&self) -> bool {
        self.unwritten()
            || self
                .pending_frees
                .front()
                .is_some_and(|f| self.oldest_data_op() > f.op_seq)
    }

    /// Whether metadata or completed data still waits to be written back or made durable.
    fn unwritten(&self) -> bool {
        self.l2.any_dirty()
            || self.rb.any_dirty()
            || self.l1_dirty.iter().any(|&d| d)
            || self.rt_dirty.iter().any(|&d| d)
            || self.rt_relocated
            || self.header_dirty
            || self.unsynced_data
    }

    fn step_flush(&mut self, t: u32) -> bool {
        self.wait_for_cycle(t)
    }

    fn step_close(&mut self, t: u32) -> bool {
        if self.bitmaps_to_store() {
            if !self.step_bitmap_store(t) {
                return false;
            }
            if self.task(t).error.is_some() {
                return self.task(t).inflight == 0 && !self.ops_outstanding();
            }
        }
        if !self.read_only && self.poisoned.is_none() && !self.wait_all_durable(t) {
            return false;
        }
        if std::mem::take(&mut self.grew) && self.poisoned.is_none() {
            // Host space allocated ahead and not used goes back.
            let keep = self.alloc_high.max(self.config.file_len);
            if self.file_end > keep && self.op_room(1) {
                self.issue_bare(Purpose::TaskIo { task: t }, IoKind::SetLen, keep);
                self.task(t).inflight += 1;
                return false;
            }
        }
        // The runtime closes the file at `Done`, and the image may be opened again at once:
        // nothing may still be in flight (a read-only image's corrupt-bit cycle, the writes
        // of a poisoned cycle), or it would land under the next session.
        self.cycle.is_none() && !self.ops_outstanding()
    }

    /// Waits until everything is durable (see [`has_dirty_state`](Self::has_dirty_state));
    /// true once it is.
    fn wait_all_durable(&mut self, t: u32) -> bool {
        loop {
            if !self.wait_for_cycle(t) {
                return false;
            }
            if !self.has_dirty_state() {
                return true;
            }
            self.task(t).wait_cycle = None;
            if self.cycle.is_none() && !self.cycle_has_work() {
                // Queued decrements wait for data ops still in flight (rule B): their
                // completions wake the task.
                return false;
            }
        }
    }

    /// Whether anything is not durable yet: dirty metadata, unsynced data, queued
    /// decrements, or a write-back cycle in progress. A cycle marks what it copies clean
    /// when it takes the copy (invariant 3 of the cache), so until it ends, clean slots and
    /// tables may still be on their way to the disk.
    fn has_dirty_state(&self) -> bool {
        self.cycle.is_some() || self.unwritten() || !self.pending_frees.is_empty()
    }

    /// Whether any op is issued and not completed (or not yet polled).
    fn ops_outstanding(&self) -> bool {
        self.op_free.len() < self.ops.len()
    }

    /// Check: write everything back, run the checker over the file, and reload the metadata
    /// if it repaired anything.
    fn step_check(&mut self, t: u32, repair: Option<Repair>) -> bool {
        loop {
            let task = self.task(t);
            if task.error.is_some() {
                return task.inflight == 0;
            }
            match task.sub {
                0 => {
                    if !self.read_only && self.poisoned.is_none() && !self.wait_all_durable(t) {
                        return false;
                    }
                    self.checker = Some(Box::new(Checker::new(self.file_end, repair)));
                    self.task(t).sub = 1;
                }
                1 => {
                    let checker = self.checker.as_mut().expect("checking");
                    if let Some(result) = checker.poll_result() {
                        self.checker = None;
                        let task = self.task(t);
                        match result {
                            Ok(report) => {
                                let fixed = report.corruptions_fixed + report.leaks_fixed > 0;
                                task.report = Some(Box::new(report));
                                task.sub = if fixed { 2 } else { 3 };
                            }
                            Err(e) => task.error = Some(RequestError::CheckFailed(e)),
                        }
                        continue;
                    }
                    if !self.issue_inner_op(t) {
                        return false;
                    }
                }
                2 => {
                    // The repair rewrote metadata behind the caches: read it all again.
                    if self.task(t).inflight > 0 {
                        return false;
                    }
                    self.task(t).sub = 3;
                    self.reload(t);
                    return false;
                }
                _ => return self.task(t).inflight == 0 && self.reload_task.is_none(),
            }
        }
    }

    /// Issues the next op of the checker or amender that task `t` runs; `false` when it
    /// has none now (or there is no room for it).
    fn issue_inner_op(&mut self, t: u32) -> bool {
        if !self.op_room(1) {
            return false;
        }
        let op = match (self.checker.as_mut(), self.amender.as_mut()) {
            (Some(c), _) => c.poll_io(),
            (None, Some(a)) => a.poll_io(),
            _ => None,
        };
        let Some(op) = op else {
            return false;
        };
        let inner = op.id.0;
        let purpose = Purpose::Check { task: t, inner };
        self.issue(purpose, op.kind, op.offset, op.segments);
        self.task(t).inflight += 1;
        true
    }

    // ---- failures ----

    /// Fail-stop after a failed metadata write or flush.
    fn poison(&mut self, e: IoError) {
        if self.poisoned.is_some() {
            return;
        }
        let err = self.io_error(e);
        self.poisoned = Some(RequestError::Poisoned);
        self.cycle = None;
        self.window = false;
        self.events.push_back(Event::Poisoned(err));
        for task in self.tasks.iter_mut().flatten() {
            if task.kind != Kind::Read && task.kind != Kind::Status {
                task.error.get_or_insert(err);
            }
        }
        self.wake_all();
    }

    /// Reports corruption found at run time: on a writable image the corrupt bit is set and
    /// further writes are refused.
    fn corrupt(
        &mut self,
        structure: Structure,
        offset: u64,
        reason: CorruptReason,
    ) -> RequestError {
        let c = Corruption {
            structure,
            offset,
            reason,
        };
        if !self.read_only {
            // (Nothing more is allocated: the counts written ahead are taken back.)
            let _ = self.drop_reserve(false);
        }
        if !self.read_only && self.hdr.version >= 3 {
            self.hdr.incompatible_features |= incompat::CORRUPT;
            self.hdr.encode(self.header_buf.as_mut_slice());
            self.header_dirty = true;
            self.cycle_wanted = true;
        }
        self.read_only = true;
        RequestError::Corrupt(c)
    }

    /// Checks that a host cluster taken from an L2 entry may hold data: aligned, inside the
    /// file, clear of metadata.
    fn check_data_cluster(&mut self, host: u64) -> Result<(), RequestError> {
        if self.has_data_file() {
            // In the data file: at the guest offset (checked by the caller), any length.
            return Ok(());
        }
        let reason = if !self.geo.aligned(host) {
            Some(CorruptReason::Unaligned)
        } else if host < self.geo.cluster_size() {
            Some(CorruptReason::PointsAtHeader)
        } else if host >= self.file_end {
            // Every cluster the engine links was written (or allocated) first, so a data
            // cluster starts inside the file; QEMU reads such clusters as zeros and writes
            // there, growing the file wherever the entry says.
            Some(CorruptReason::PastEof)
        } else {
            self.metadata_overlap(host, self.geo.cluster_size(), Own::Nothing)
                .map(CorruptReason::Overlap)
        };
        match reason {
            Some(r) => Err(self.corrupt(Structure::DataCluster, host, r)),
            None => Ok(()),
        }
    }
}

/// What a write reported as short fails with.
const SHORT_WRITE: IoError = IoError {
    kind: std::io::ErrorKind::WriteZero,
    raw_os_error: None,
};

/// How a refused op completes (QEMU fails such writes with EIO); its request gets the
/// corruption instead (see [`Image::io_error`]).
const REFUSED: IoError = IoError {
    kind: std::io::ErrorKind::Other,
    raw_os_error: Some(5),
};

impl Image {
    /// The request error for a failed op: the corruption when the op was refused by the
    /// overlap check.
    fn io_error(&self, e: IoError) -> RequestError {
        match self.refusing {
            Some(c) => RequestError::Corrupt(c),
            None => io_error(e),
        }
    }
}

fn io_error(e: IoError) -> RequestError {
    if e.is_no_space() {
        RequestError::NoSpace
    } else {
        RequestError::Io(e)
    }
}

fn be64(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i * 8..i * 8 + 8]);
    u64::from_be_bytes(a)
}

fn put_be64(b: &mut [u8], i: usize, v: u64) {
    b[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
}
