//! One run of the check (QEMU's `qcow2_co_check_locked`): read the header and the snapshot
//! table, build the IMRT from every reference (`calculate_refcounts`), load the stored
//! refcounts, compare them (`compare_refcounts`), repair or rebuild as allowed, check the
//! COPIED flags (`check_oflag_copied`), and mark the image clean.
//!
//! The pass is a state machine with at most one op outstanding: [`Pass::step`] runs until it
//! needs an op (returned as a [`Req`]) or is done; [`Pass::complete`] hands the op's result
//! in. Each [`Stage`] issues its next op itself, so re-entering a stage with no input means
//! "issue the op you are waiting for" and with input means "consume it".

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use crate::error::{FormatError, OpenError};
use crate::format::extension::BITMAPS;
use crate::format::header::{autoclear, incompat, Header, INCOMPATIBLE_OFFSET};

/// QEMU's reasons for a check that could not complete (`strerror` of its error codes).
pub(super) const EIO: &str = "Input/output error";
pub(super) const ENOMEM: &str = "Cannot allocate memory";
pub(super) const EFBIG: &str = "File too large";
pub(super) const EINVAL: &str = "Invalid argument";
pub(super) const ENOSPC: &str = "No space left on device";

/// Byte offset of `nb_snapshots` in the header (`snapshots_offset` follows it).
pub(super) const NB_SNAPSHOTS_OFFSET: u64 = 60;
use crate::format::{Geometry, Layout};
use crate::io::{IoBuf, IoError, IoKind, IoOp, OpId, Segment, Segments, Target};

use super::calc::Calc;
use super::compare::RebuildOp;
use super::copied::Copied;
use super::imrt::{Budget, RefArray};
use super::repair::{MetaMap, RebuildPlan};
use super::snapshots::SnapFix;
use super::walk::{self, Snap, SnapParse};

/// An op the pass wants performed on the image file.
#[derive(Debug)]
pub(crate) enum Req {
    /// Read `len` bytes at `offset` (zero-filled past the end of the file).
    Read { offset: u64, len: usize },
    /// Write `data` at `offset`.
    Write { offset: u64, data: Vec<u8> },
    /// Make the writes so far durable.
    Flush,
    /// Set the file length.
    SetLen(u64),
}

impl Req {
    /// The op that performs this request, numbered `id`, with an owned buffer.
    pub(crate) fn into_op(self, id: OpId) -> IoOp {
        let mut segments = Segments::new();
        let (kind, offset) = match self {
            Req::Read { offset, len } => {
                segments.push(Segment::Buf(IoBuf::zeroed(len)));
                (IoKind::Read, offset)
            }
            Req::Write { offset, data } => {
                let mut buf = IoBuf::zeroed(data.len());
                buf.as_mut_slice().copy_from_slice(&data);
                segments.push(Segment::Buf(buf));
                (IoKind::Write, offset)
            }
            Req::Flush => (IoKind::Flush, 0),
            Req::SetLen(len) => (IoKind::SetLen, len),
        };
        IoOp {
            id,
            target: Target::Image,
            kind,
            offset,
            segments,
        }
    }
}

/// What [`Pass::step`] asks for.
#[derive(Debug)]
pub(crate) enum Step {
    /// Perform this op and call [`Pass::complete`].
    Io(Req),
    /// The pass is over; see [`Pass::result`].
    Done,
}

/// Which repairs the pass may make (`BDRV_FIX_LEAKS`, `BDRV_FIX_ERRORS`).
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub(crate) struct Fix {
    pub leaks: bool,
    pub errors: bool,
}

impl Fix {
    /// Whether any repair is allowed.
    pub(super) fn any(self) -> bool {
        self.leaks || self.errors
    }
}

/// QEMU's `BdrvCheckResult` counters.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub(crate) struct Counts {
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    pub allocated: u64,
    pub fragmented: u64,
    pub compressed: u64,
}

/// Most detail lines kept per pass; the rest are only counted.
const MAX_LINES: usize = 10_000;
/// Most bytes of detail lines kept per pass.
const MAX_LOG_BYTES: usize = 4 << 20;

/// The detail lines of a pass, bounded in number and bytes.
#[derive(Debug, Default)]
pub(crate) struct Log {
    pub lines: Vec<String>,
    pub dropped: u64,
    bytes: usize,
}

impl Log {
    /// Adds a line, or counts it when the log is full.
    pub(super) fn push(&mut self, args: fmt::Arguments<'_>) {
        if self.lines.len() < MAX_LINES && self.bytes < MAX_LOG_BYTES {
            let line = args.to_string();
            self.bytes += line.len();
            self.lines.push(line);
        } else {
            self.dropped += 1;
        }
    }
}

/// C's `%#x`: `0` for zero, `0x..` otherwise.
pub(super) fn alt_hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// What the pass learnt.
#[derive(Debug)]
pub(crate) struct PassResult {
    pub counts: Counts,
    pub log: Log,
    /// `(highest used cluster + 1) * cluster_size`, when the comparison ran to the end.
    pub image_end_offset: u64,
    pub total_clusters: u64,
    /// The check could not complete (QEMU's "Check failed").
    pub failed: bool,
    /// Why, as QEMU's error code says it ("Input/output error").
    pub failure: Option<String>,
    /// The image was marked corrupt while repairing (QEMU then refuses to check it again).
    pub poisoned: bool,
    /// The header could not be read or accepted.
    pub header_error: Option<OpenError>,
    /// The file length after the pass's own writes and resizes.
    pub file_len: u64,
    /// Why a reorder pass refused the change.
    pub amend_error: Option<crate::error::AmendError>,
    /// A rebuilt refcount structure is in the header now.
    pub switched: bool,
}

/// How a refblock of the loaded on-disk refcounts came in.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(super) enum Block {
    /// No refblock: every refcount it would hold is 0.
    Zero,
    Loaded,
    /// The reftable entry is not cluster aligned.
    Unaligned,
    Failed(IoError),
}

/// What the header says, in the units the pass uses.
#[derive(Clone, Debug, Default)]
pub(super) struct Img {
    pub(super) hdr: Header,
    pub(super) cluster_bits: u32,
    pub(super) cluster_size: u64,
    pub(super) order: u32,
    pub(super) rb_bits: u32,
    pub(super) l2_entries: u64,
    pub(super) entry_bytes: u64,
    pub(super) subclusters: bool,
    pub(super) data_file: bool,
    /// `(nb_bitmaps, directory_offset, directory_size)` when the bitmaps are to be counted.
    pub(super) bitmaps: Option<(u32, u64, u64)>,
    pub(super) fde: Option<(u64, u64)>,
}

impl Img {
    /// Whether `off` is cluster aligned.
    pub(super) fn aligned(&self, off: u64) -> bool {
        off & (self.cluster_size - 1) == 0
    }
}

/// Where a pass is, in QEMU's order.
#[derive(Debug)]
pub(super) enum Stage {
    /// Read the first 4 KiB of cluster 0.
    Header,
    /// Read the rest of a cluster 0 larger than 4 KiB: `(first 4 KiB, bytes to read)`.
    HeaderRest(Vec<u8>, u64),
    /// Read the snapshot table, in growing chunks, until every entry parses.
    SnapTable(Vec<u8>),
    /// Write (and flush) the reduced snapshot count to the header.
    SnapCount { flushed: bool },
    /// Read the refcount table.
    Reftable,
    /// Build the IMRT from the tables.
    Calc(Calc),
    /// `check_refblocks`, from reftable entry `i`; `resizing` while a `SetLen` is out.
    Refblocks { i: usize, resizing: Option<u64> },
    /// Load the stored refcounts, refblock by refblock.
    Load { block: u64, waiting: bool },
    /// Compare, then choose the repairs.
    Compare,
    /// Write a new refcount structure.
    Rebuild {
        plan: RebuildPlan,
        ops: VecDeque<RebuildOp>,
    },
    /// Write back the refblocks the comparison repaired, then flush.
    WriteDirty {
        blocks: Vec<u64>,
        next: usize,
        flushed: bool,
    },
    /// Check (and repair) the COPIED flags.
    Copied(Copied),
    /// Rewrite the snapshot table (`qcow2_check_fix_snapshot_table`).
    SnapFix(SnapFix),
    /// Clear the dirty and corrupt bits after a successful repair.
    Clean(u8),
    /// Set the corrupt bit if a repair was refused, and flush.
    Finish { flushed: bool },
    /// Over.
    Done,
}

/// The op in flight, for what its success changes in the pass's view of the file.
#[derive(Clone, Copy, Debug)]
pub(super) enum Inflight {
    Read,
    /// A write ending at this offset.
    Write(u64),
    Flush,
    SetLen(u64),
}

/// Internal control flow of the stage functions.
pub(super) enum Flow {
    /// Issue this op and wait.
    Io(Req),
    /// Go on with the next stage (already set).
    Next,
}

/// One check run over the image.
#[derive(Debug)]
pub(crate) struct Pass {
    pub(super) fix: Fix,
    pub(super) file_len: u64,
    pub(super) budget: Budget,
    pub(super) img: Img,
    pub(super) counts: Counts,
    pub(super) log: Log,
    pub(super) imrt: RefArray,
    pub(super) disk: RefArray,
    pub(super) blocks: Vec<Block>,
    pub(super) reftable: Vec<u64>,
    pub(super) snaps: Vec<Snap>,
    pub(super) snaps_size: u64,
    /// What the snapshot table check found and fixed (QEMU's `snapshot_res`), kept apart
    /// from the refcount counters until the end, as QEMU does.
    pub(super) snap: Counts,
    /// Snapshots dropped off the end of the table by the repair.
    pub(super) snap_reduced: u32,
    /// The snapshot table bytes, kept when the repair must rewrite the table.
    pub(super) snap_table: Vec<u8>,
    /// The walk counted the snapshot table's clusters (it does not run past the file).
    pub(super) snap_counted: bool,
    pub(super) rebuild: bool,
    pub(super) round: u8,
    pub(super) highest: Option<u64>,
    pub(super) pre_compare: Counts,
    pub(super) old_res: Counts,
    pub(super) dirty: BTreeSet<u64>,
    pub(super) extra: BTreeMap<u64, Option<Vec<u8>>>,
    pub(super) unflushed: bool,
    pub(super) failed: bool,
    pub(super) failure: Option<String>,
    /// Offsets of the active L2 tables (kept when repairing, for the overlap checks).
    pub(super) active_l2s: Vec<u64>,
    pub(super) meta_map: Option<MetaMap>,
    /// A repair was refused for overlapping metadata: set the corrupt bit, as QEMU does.
    pub(super) mark_corrupt: bool,
    /// A corruption was signalled (said once, as QEMU does).
    pub(super) signaled: bool,
    /// The image was marked corrupt while repairing: it cannot be checked again.
    pub(super) poisoned: bool,
    pub(super) total_clusters: u64,
    pub(super) header_error: Option<OpenError>,
    /// A reorder pass: the refcount order to rewrite the structure at.
    pub(super) reorder: Option<u32>,
    /// Refcounts a reorder pass adds: `(cluster, refcount)` of clusters about to be
    /// referenced (they are not yet).
    pub(super) added: Vec<(u64, u64)>,
    /// A reorder pass that only checks that every refcount fits the new width.
    pub(super) dry: bool,
    /// Why a reorder pass refused the change.
    pub(super) amend_error: Option<crate::error::AmendError>,
    /// A rebuilt structure is in the header now.
    pub(super) switched: bool,
    pub(super) stage: Stage,
    pub(super) input: Option<Result<(IoBuf, usize), IoError>>,
    pub(super) inflight: Option<Inflight>,
}

impl Pass {
    /// A pass over a file of `file_len` bytes that may repair what `fix` allows, with
    /// `memory_limit` bytes for its refcount arrays.
    pub fn new(file_len: u64, fix: Fix, memory_limit: u64) -> Self {
        let geo = Geometry::new(9, 4);
        Self {
            fix,
            file_len,
            budget: Budget {
                limit: memory_limit,
                used: 0,
            },
            img: Img::default(),
            counts: Counts::default(),
            log: Log::default(),
            imrt: RefArray::new(&geo),
            disk: RefArray::new(&geo),
            blocks: Vec::new(),
            reftable: Vec::new(),
            snaps: Vec::new(),
            snaps_size: 0,
            snap: Counts::default(),
            snap_reduced: 0,
            snap_table: Vec::new(),
            snap_counted: false,
            rebuild: false,
            round: 1,
            highest: None,
            pre_compare: Counts::default(),
            old_res: Counts::default(),
            dirty: BTreeSet::new(),
            extra: BTreeMap::new(),
            unflushed: false,
            failed: false,
            failure: None,
            active_l2s: Vec::new(),
            meta_map: None,
            mark_corrupt: false,
            signaled: false,
            poisoned: false,
            total_clusters: 0,
            header_error: None,
            reorder: None,
            added: Vec::new(),
            dry: false,
            amend_error: None,
            switched: false,
            stage: Stage::Header,
            input: None,
            inflight: None,
        }
    }

    /// A pass that rewrites the refcount structure at refcount order `order` (see
    /// the `reorder` module) and then checks the image against it, repairing nothing.
    /// `added` are `(cluster, refcount)` of clusters the new structure counts although
    /// nothing references them yet (the caller links them after the switch).
    pub fn reorder(file_len: u64, order: u32, memory_limit: u64, added: Vec<(u64, u64)>) -> Self {
        let mut pass = Self::new(file_len, Fix::default(), memory_limit);
        pass.reorder = Some(order);
        pass.added = added;
        pass
    }

    /// A reorder pass that writes nothing: it fails as [`reorder`](Self::reorder) would
    /// when a refcount does not fit `order`, and is done otherwise.
    pub fn reorder_dry(file_len: u64, order: u32, memory_limit: u64) -> Self {
        let mut pass = Self::reorder(file_len, order, memory_limit, Vec::new());
        pass.dry = true;
        pass
    }

    /// The length of the file as the pass knows it.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Hands in the result of the op the last [`step`](Self::step) asked for: the buffer
    /// (for reads) and the bytes transferred.
    pub fn complete(&mut self, result: Result<(IoBuf, usize), IoError>) {
        if let (Ok(_), Some(op)) = (&result, self.inflight.take()) {
            match op {
                Inflight::Write(end) => {
                    self.file_len = self.file_len.max(end);
                    self.unflushed = true;
                }
                Inflight::Flush => self.unflushed = false,
                Inflight::SetLen(len) => self.file_len = len,
                Inflight::Read => {}
            }
        }
        self.input = Some(result);
    }

    /// The pass's outcome (call once [`step`](Self::step) returned [`Step::Done`]).
    pub fn result(self) -> PassResult {
        let image_end_offset = match (self.failed, self.highest) {
            (false, Some(h)) => (h + 1) * self.img.cluster_size,
            _ => 0,
        };
        let mut log = self.log;
        if log.dropped > 0 {
            log.lines
                .push(format!("({} more lines not shown)", log.dropped));
        }
        let mut counts = self.counts;
        counts.corruptions += self.snap.corruptions;
        counts.corruptions_fixed += self.snap.corruptions_fixed;
        PassResult {
            counts,
            log,
            image_end_offset,
            total_clusters: self.total_clusters,
            failed: self.failed,
            failure: self.failure,
            poisoned: self.poisoned,
            header_error: self.header_error,
            file_len: self.file_len,
            amend_error: self.amend_error,
            switched: self.switched,
        }
    }

    /// The result of the op the current stage waits for, if it came.
    pub(super) fn take(&mut self) -> Option<Result<(IoBuf, usize), IoError>> {
        self.input.take()
    }

    /// Asks for `req` (and remembers what its success changes).
    pub(super) fn io(&mut self, req: Req) -> Flow {
        self.inflight = Some(match &req {
            Req::Read { .. } => Inflight::Read,
            Req::Write { offset, data } => {
                Inflight::Write(offset.saturating_add(data.len() as u64))
            }
            Req::Flush => Inflight::Flush,
            Req::SetLen(len) => Inflight::SetLen(*len),
        });
        Flow::Io(req)
    }

    /// Asks for a read of `len` bytes at `offset`.
    pub(super) fn read(&mut self, offset: u64, len: u64) -> Flow {
        self.io(Req::Read {
            offset,
            len: len as usize,
        })
    }

    /// QEMU's `qcow2_signal_corruption` for an unaligned refblock found by a refcount
    /// lookup: said once; when repairing, the image is marked corrupt and (as QEMU makes the
    /// node unusable) the check cannot run again after the repair.
    pub(super) fn signal_unaligned_refblock(&mut self, index: u64, offset: u64) {
        if self.signaled {
            return;
        }
        self.signaled = true;
        if self.fix.any() {
            say!(
                self,
                "qcow2: Marking image as corrupt: Refblock offset {} unaligned (reftable index: {}); further corruption events will be suppressed",
                alt_hex(offset),
                alt_hex(index)
            );
        } else {
            // A read-only image is not marked (QEMU's `qcow2_signal_corruption`).
            say!(
                self,
                "qcow2: Image is corrupt: Refblock offset {} unaligned (reftable index: {}); further non-fatal corruption events will be suppressed",
                alt_hex(offset),
                alt_hex(index)
            );
        }
        if self.fix.any() {
            self.mark_corrupt = true;
            self.poisoned = true;
        }
    }

    /// The check cannot go on: count a check error if nothing did yet, flush what was
    /// written, and stop.
    pub(super) fn fail(&mut self) -> Flow {
        self.fail_with(EIO)
    }

    /// [`fail`](Self::fail), saying why as QEMU's error code would (`strerror`).
    pub(super) fn fail_with(&mut self, reason: &str) -> Flow {
        self.failed = true;
        if self.failure.is_none() {
            self.failure = Some(reason.to_string());
        }
        if self.counts.check_errors == 0 {
            self.counts.check_errors = 1;
        }
        self.stage = Stage::Finish { flushed: false };
        Flow::Next
    }

    /// An op failed: a check error, and the check stops.
    pub(super) fn fail_io(&mut self, what: &str, e: IoError) -> Flow {
        self.counts.check_errors += 1;
        say!(self, "{what}: {e}");
        self.fail_with(&e.to_string())
    }

    /// The memory budget is exhausted: a check error, and the check stops.
    pub(super) fn out_of_memory(&mut self) -> Flow {
        self.counts.check_errors += 1;
        say!(
            self,
            "ERROR: Cannot allocate memory for the refcount check (limit {} bytes)",
            self.budget.limit
        );
        self.fail_with(ENOMEM)
    }

    /// Runs until the pass needs an op or is over.
    pub fn step(&mut self) -> Step {
        loop {
            let stage = std::mem::replace(&mut self.stage, Stage::Done);
            let flow = match stage {
                Stage::Header => self.header(None),
                Stage::HeaderRest(first, rest) => self.header(Some((first, rest))),
                Stage::SnapTable(buf) => self.snapshot_table(buf),
                Stage::SnapCount { flushed } => self.snap_count(flushed),
                Stage::Reftable => self.read_reftable(),
                Stage::Calc(calc) => self.calc(calc),
                Stage::Refblocks { i, resizing } => self.check_refblocks(i, resizing),
                Stage::Load { block, waiting } => self.load(block, waiting),
                Stage::Compare => self.compare_stage(),
                Stage::Rebuild { plan, ops } => self.rebuild(plan, ops),
                Stage::WriteDirty {
                    blocks,
                    next,
                    flushed,
                } => self.write_dirty(blocks, next, flushed),
                Stage::Copied(c) => self.copied(c),
                Stage::SnapFix(f) => self.snap_fix(f),
                Stage::Clean(step) => self.clean(step),
                Stage::Finish { flushed } => self.finish(flushed),
                Stage::Done => return Step::Done,
            };
            if let Flow::Io(req) = flow {
                return Step::Io(req);
            }
        }
    }

    // ---- header and snapshot table -------------------------------------------------

    /// Reads and validates cluster 0 (as QEMU opens the image for a check).
    fn header(&mut self, first: Option<(Vec<u8>, u64)>) -> Flow {
        let input = self.take();
        let bytes = match (first, input) {
            (None, None) => {
                self.stage = Stage::Header;
                return self.read(0, 4096);
            }
            (Some((first, rest)), None) => {
                self.stage = Stage::HeaderRest(first, rest);
                return self.read(4096, rest);
            }
            (_, Some(Err(e))) => {
                self.header_error = Some(OpenError::Io(e));
                self.failed = true;
                self.stage = Stage::Done;
                return Flow::Next;
            }
            (None, Some(Ok((buf, n)))) => {
                let bytes = buf.as_slice()[..n.min(buf.len())].to_vec();
                let cluster_size = match Header::decode(&bytes) {
                    Some(h) if (9..=21).contains(&h.cluster_bits) => 1u64 << h.cluster_bits,
                    _ => 0,
                };
                if n == 4096 && cluster_size > 4096 {
                    let rest = cluster_size - 4096;
                    self.stage = Stage::HeaderRest(bytes, rest);
                    return self.read(4096, rest);
                }
                bytes
            }
            (Some((mut first, _)), Some(Ok((buf, n)))) => {
                first.extend_from_slice(&buf.as_slice()[..n.min(buf.len())]);
                first
            }
        };
        // QEMU's open in check mode leaves the snapshot table alone; the check validates
        // it itself (`snapshot_table`), so that `-r all` can repair it.
        let mut masked = bytes.clone();
        if let Some(pointer) = masked.get_mut(60..72) {
            pointer.fill(0);
        }
        match Layout::parse_with(&masked, true, true) {
            Ok(mut layout) => {
                if let Some(h) = Header::decode(&bytes) {
                    layout.header.nb_snapshots = h.nb_snapshots;
                    layout.header.snapshots_offset = h.snapshots_offset;
                }
                self.accept_layout(&layout)
            }
            Err(e) => {
                self.header_error = Some(e);
                self.failed = true;
                self.stage = Stage::Done;
                Flow::Next
            }
        }
    }

    /// Takes the geometry and the tables to walk from a valid header.
    fn accept_layout(&mut self, layout: &Layout) -> Flow {
        let h = layout.header;
        let geo = layout.geo;
        let subclusters = h.incompatible_features & incompat::EXTENDED_L2 != 0;
        let entry_bytes = if subclusters { 16 } else { 8 };
        let mut bitmaps = None;
        if let Some(b) = layout.ext.bitmaps {
            if h.autoclear_features & autoclear::BITMAPS != 0 {
                let bad = b.nb_bitmaps == 0
                    || b.nb_bitmaps > walk::MAX_BITMAPS
                    || !geo.aligned(b.directory_offset)
                    || b.directory_size > walk::MAX_BITMAP_DIRECTORY;
                if bad {
                    let e = FormatError::InvalidExtension {
                        ext_type: BITMAPS,
                        offset: 0,
                    };
                    self.header_error = Some(e.into());
                    self.failed = true;
                    self.stage = Stage::Done;
                    return Flow::Next;
                }
                bitmaps = Some((b.nb_bitmaps, b.directory_offset, b.directory_size));
            }
        }
        self.img = Img {
            hdr: h,
            cluster_bits: geo.cluster_bits,
            cluster_size: geo.cluster_size(),
            order: geo.refcount_order,
            rb_bits: geo.rb_bits,
            l2_entries: geo.cluster_size() / entry_bytes,
            entry_bytes,
            subclusters,
            data_file: h.incompatible_features & incompat::DATA_FILE != 0,
            bitmaps,
            fde: layout
                .ext
                .fde
                .filter(|&(_, len)| len != 0 && h.crypt_method == 2),
        };
        self.total_clusters = h.size.div_ceil(geo.cluster_size());
        self.imrt = RefArray::new(&geo);
        self.disk = RefArray::new(&geo);
        self.stage = Stage::SnapTable(Vec::new());
        Flow::Next
    }

    /// `qcow2_check_read_snapshot_table`: validates the table pointer, reads and parses the
    /// table; with `-r all` drops what QEMU drops (snapshots past 65,536 or past 64 MiB of
    /// table, extra data past 1 KiB), writing a reduced snapshot count to the header right
    /// away. The table itself is rewritten at the end ([`Stage::SnapFix`]).
    fn snapshot_table(&mut self, mut buf: Vec<u8>) -> Flow {
        let h = self.img.hdr;
        let base = h.snapshots_offset;
        let mut count = h.nb_snapshots;
        let first = buf.is_empty() && self.input.is_none();
        if count > walk::MAX_SNAPSHOTS && self.fix.errors {
            if first {
                say!(
                    self,
                    "Discarding {} overhanging snapshots",
                    count - walk::MAX_SNAPSHOTS
                );
            }
            count = walk::MAX_SNAPSHOTS;
        }
        if first {
            // qcow2_validate_table(), even for an empty table.
            if count > walk::MAX_SNAPSHOTS {
                self.counts.check_errors += 1;
                say!(self, "ERROR snapshot table too large");
                say!(
                    self,
                    "You can force-remove all {} overhanging snapshots with qemu-img check -r all",
                    count - walk::MAX_SNAPSHOTS
                );
                return self.fail_with(EFBIG);
            }
            let size = u64::from(count) * 40;
            if i64::MAX as u64 - size < base || !self.img.aligned(base) {
                self.counts.check_errors += 1;
                say!(self, "ERROR snapshot table offset invalid");
                return self.fail_with(EINVAL);
            }
        }
        match self.take() {
            Some(Err(e)) => {
                return self.fail_io("ERROR failed to read the snapshot table", e);
            }
            Some(Ok((b, _))) => buf.extend_from_slice(b.as_slice()),
            None => {}
        }
        if count == 0 {
            self.snaps_size = 0;
            return self.start_refcounts();
        }
        match walk::parse_snapshots(&buf, count, self.fix.errors) {
            SnapParse::Need(need) => {
                let have = buf.len() as u64;
                let len = (need - have).max(have.clamp(64 << 10, walk::CHUNK_BYTES));
                self.stage = Stage::SnapTable(buf);
                self.read(base.saturating_add(have), len)
            }
            SnapParse::TooMuchExtra(i) => {
                self.counts.check_errors += 1;
                say!(self, "ERROR failed to read the snapshot table: Too much extra metadata in snapshot table entry {i}");
                say!(
                    self,
                    "You can force-remove this extra metadata with qemu-img check -r all"
                );
                self.fail_with(EFBIG)
            }
            SnapParse::TooBig(overhanging) => {
                self.counts.check_errors += 1;
                say!(
                    self,
                    "ERROR failed to read the snapshot table: Snapshot table is too big"
                );
                say!(
                    self,
                    "You can force-remove all {overhanging} overhanging snapshots with qemu-img check -r all"
                );
                self.fail_with(EFBIG)
            }
            SnapParse::Done(table) => {
                for &(i, extra) in &table.dropped_extra {
                    say!(
                        self,
                        "Discarding too much extra metadata in snapshot table entry {i} ({extra} > {})",
                        walk::MAX_SNAPSHOT_EXTRA
                    );
                }
                if table.overhanging > 0 {
                    say!(
                        self,
                        "Discarding {} overhanging snapshots (snapshot table is too big)",
                        table.overhanging
                    );
                }
                let reduced = h.nb_snapshots - table.snaps.len() as u32;
                self.snap_reduced = reduced;
                self.snap.corruptions += u64::from(reduced) + table.dropped_extra.len() as u64;
                if self.img.hdr.version >= 3 {
                    for (i, s) in table.snaps.iter().enumerate() {
                        if s.extra_size < 16 {
                            self.snap.corruptions += 1;
                            let word = if self.fix.errors {
                                "Repairing"
                            } else {
                                "ERROR"
                            };
                            say!(self, "{word} snapshot table entry {i} is incomplete");
                        }
                    }
                }
                self.snaps = table.snaps;
                self.snaps_size = table.size;
                if self.snap.corruptions > u64::from(reduced) && self.fix.errors {
                    // Kept for the rewrite at the end.
                    buf.truncate(table.size as usize);
                    self.snap_table = buf;
                }
                if reduced > 0 {
                    // The count goes to the header before the refcounts are checked: the
                    // dropped snapshots' clusters are then merely leaked.
                    self.img.hdr.nb_snapshots -= reduced;
                    self.stage = Stage::SnapCount { flushed: false };
                    return self.io(Req::Write {
                        offset: NB_SNAPSHOTS_OFFSET,
                        data: self.img.hdr.nb_snapshots.to_be_bytes().to_vec(),
                    });
                }
                self.start_refcounts()
            }
        }
    }

    /// The reduced snapshot count was written: flush it, then go on.
    fn snap_count(&mut self, flushed: bool) -> Flow {
        if let Some(Err(e)) = self.take() {
            self.counts.check_errors += 1;
            say!(
                self,
                "ERROR failed to update the snapshot count in the image header: {e}"
            );
            return self.fail_with(&e.to_string());
        }
        if !flushed {
            self.stage = Stage::SnapCount { flushed: true };
            return self.io(Req::Flush);
        }
        let reduced = u64::from(self.snap_reduced);
        self.snap.corruptions -= reduced;
        self.snap.corruptions_fixed += reduced;
        self.start_refcounts()
    }

    /// `qcow2_check_refcounts`: size the IMRT from the file length and read the reftable.
    fn start_refcounts(&mut self) -> Flow {
        let nb = self.file_len.div_ceil(self.img.cluster_size);
        if nb > i32::MAX as u64 {
            self.counts.check_errors += 1;
            say!(
                self,
                "ERROR: the image file is too large to check ({} clusters)",
                nb
            );
            return self.fail_with(EFBIG);
        }
        // The loaded refcounts will need as much again.
        let need = self.imrt.bytes_for(nb).saturating_mul(2);
        if need > self.budget.limit || self.imrt.grow(nb, &mut self.budget).is_err() {
            return self.out_of_memory();
        }
        self.stage = Stage::Reftable;
        Flow::Next
    }

    /// Reads the refcount table.
    fn read_reftable(&mut self) -> Flow {
        let h = self.img.hdr;
        let len = u64::from(h.refcount_table_clusters) << self.img.cluster_bits;
        match self.take() {
            None => {
                self.stage = Stage::Reftable;
                self.read(h.refcount_table_offset, len)
            }
            Some(Err(e)) => self.fail_io("ERROR: could not read the refcount table", e),
            Some(Ok((buf, _))) => {
                self.reftable = buf
                    .as_slice()
                    .chunks_exact(8)
                    .map(|c| walk::be64(c, 0))
                    .collect();
                self.stage = Stage::Calc(Calc::Start);
                Flow::Next
            }
        }
    }

    // ---- the end -----------------------------------------------------------------------

    /// The last ops of every pass: set the corrupt bit if a repair was refused, and flush
    /// whatever was written.
    fn finish(&mut self, flushed: bool) -> Flow {
        if let Some(Err(e)) = self.take() {
            self.counts.check_errors += 1;
            say!(self, "ERROR: could not finish the repair: {e}");
        }
        if self.mark_corrupt {
            self.mark_corrupt = false;
            let h = self.img.hdr;
            if self.fix.any() && h.version >= 3 && h.incompatible_features & incompat::CORRUPT == 0
            {
                let value = h.incompatible_features | incompat::CORRUPT;
                self.stage = Stage::Finish { flushed };
                return self.io(Req::Write {
                    offset: INCOMPATIBLE_OFFSET,
                    data: value.to_be_bytes().to_vec(),
                });
            }
        }
        if self.unflushed && !flushed {
            self.stage = Stage::Finish { flushed: true };
            return self.io(Req::Flush);
        }
        self.stage = Stage::Done;
        Flow::Next
    }

    /// `qcow2_mark_clean` and `qcow2_mark_consistent` after a repair that left nothing.
    fn clean(&mut self, step: u8) -> Flow {
        if let Some(Err(e)) = self.take() {
            return self.fail_io("ERROR: could not mark the image clean", e);
        }
        let h = self.img.hdr;
        let bits = h.incompatible_features & (incompat::DIRTY | incompat::CORRUPT);
        let wanted = self.fix.any()
            && self.counts.check_errors == 0
            && self.counts.corruptions + self.snap.corruptions == 0;
        if !wanted || h.version < 3 || bits == 0 {
            self.stage = Stage::Finish { flushed: false };
            return Flow::Next;
        }
        match step {
            0 => {
                self.stage = Stage::Clean(1);
                self.io(Req::Flush)
            }
            1 => {
                let value = h.incompatible_features & !bits;
                self.stage = Stage::Clean(2);
                self.io(Req::Write {
                    offset: INCOMPATIBLE_OFFSET,
                    data: value.to_be_bytes().to_vec(),
                })
            }
            2 => {
                self.stage = Stage::Clean(3);
                self.io(Req::Flush)
            }
            _ => {
                self.stage = Stage::Done;
                Flow::Next
            }
        }
    }
}
