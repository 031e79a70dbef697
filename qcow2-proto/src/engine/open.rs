//! Opening (and creating) as a plan: header, cluster 0, L1, refcount table, snapshot table,
//! bitmap directory; header fix-ups on a writable open; preallocation after a create.

use crate::config::Preallocation;
use crate::create::initial_image;
use crate::error::{FormatError, OpenError, RequestError, Table};
use crate::event::Event;
use crate::format::header::{autoclear, incompat, Header};
use crate::format::{snapshot, Layout};
use crate::info::{BitmapInfo, ImageInfo};
use crate::io::{IoBuf, IoError, IoKind, IoOp};

use super::cache::Cache;
use super::{be64, Image, Kind, Phase, Purpose, Task, TABLE_CHUNK};

#[derive(Debug, Default, Clone, Copy, Eq, PartialEq)]
pub(super) enum Step {
    #[default]
    Start,
    CreateWrites,
    CreateSync,
    Header,
    Cluster0,
    L1,
    Reftable,
    Snapshots,
    /// The L1 table of the snapshot opened instead of the active image.
    SnapshotL1,
    Bitmaps,
    /// The bitmap directory written back with in-use flags (a writable open).
    BitmapsInUse,
    HeaderUpdate,
    HeaderSync,
    /// Waiting for the runtime to attach the external data file.
    DataFile,
    Prealloc,
    /// Waiting for the runtime to attach the backing file, then for it to open.
    Backing,
}

#[derive(Debug, Default)]
pub(super) struct OpenState {
    step: Step,
    /// Ops of the current step still outstanding.
    pending: u32,
    /// Whether the current step's ops were issued.
    issued: bool,
    /// Bytes read so far of a table read in chunks (snapshot table).
    table: Vec<u8>,
    /// The bitmap directory to write back with in-use flags.
    bitmap_dir: Option<IoBuf>,
    /// Whether something was written that the open must flush.
    sync: bool,
    error: Option<OpenError>,
}

const FIRST_READ: usize = 4096;
const SNAPSHOT_CHUNK: usize = 64 << 10;

impl Image {
    fn fail_open(&mut self, e: OpenError) {
        if self.phase == Phase::Opening {
            self.open.error.get_or_insert(e);
        }
    }

    fn goto(&mut self, step: Step) {
        self.open.step = step;
        self.open.issued = false;
        self.open.pending = 0;
    }

    /// Issues the current step's ops, or moves on when it has none.
    pub(super) fn open_pump(&mut self) {
        loop {
            if self.open.pending > 0 {
                return;
            }
            if let Some(e) = self.open.error.take() {
                if let Some(t) = self.reload_task.take() {
                    // Reloading after a repair failed: the check fails, and with the
                    // metadata half read, the engine stops (reopening is the way out).
                    self.phase = Phase::Open;
                    self.poisoned = Some(RequestError::Poisoned);
                    self.events
                        .push_back(Event::Poisoned(RequestError::Poisoned));
                    let task = self.task(t);
                    let e = match (task.kind, e) {
                        // (An amend reports what failed, not a check.)
                        (super::Kind::Amend(_), OpenError::Io(io)) => RequestError::Io(io),
                        (super::Kind::Amend(_), _) => RequestError::Poisoned,
                        (_, e) => RequestError::CheckFailed(e),
                    };
                    task.error.get_or_insert(e);
                    self.make_runnable(t);
                    return;
                }
                self.phase = Phase::Failed;
                self.events.push_back(Event::OpenFailed(e));
                return;
            }
            if self.open.issued {
                // Everything of this step came back: advance.
                let next = self.open_next();
                if self.open.error.is_some() {
                    continue;
                }
                match next {
                    Some(step) => self.goto(step),
                    None => {
                        self.finish_open();
                        return;
                    }
                }
                continue;
            }
            self.open.issued = true;
            let cs = self.geo.cluster_size();
            match self.open.step {
                Step::Start => {
                    self.goto(if self.create.is_some() {
                        Step::CreateWrites
                    } else {
                        Step::Header
                    });
                }
                Step::CreateWrites => {
                    let opts = self.create.clone().expect("create step only when creating");
                    match initial_image(&opts) {
                        Err(e) => self.fail_open(e.into()),
                        Ok(img) => {
                            self.config.file_len = img.file_len;
                            for (off, bytes) in img.writes {
                                let mut b = IoBuf::zeroed(bytes.len());
                                b.as_mut_slice().copy_from_slice(&bytes);
                                self.issue_buf(Purpose::Open, IoKind::Write, off, b);
                                self.open.pending += 1;
                            }
                            self.issue_bare(Purpose::Open, IoKind::SetLen, img.file_len);
                            self.open.pending += 1;
                        }
                    }
                }
                Step::CreateSync => {
                    self.issue_bare(Purpose::Open, IoKind::Flush, 0);
                    self.open.pending += 1;
                }
                Step::Header => self.read_open(0, FIRST_READ),
                Step::Cluster0 => self.read_open(0, cs as usize),
                Step::L1 => {
                    let bytes = u64::from(self.hdr.l1_size) * 8;
                    self.read_open(
                        self.hdr.l1_table_offset,
                        bytes.next_multiple_of(TABLE_CHUNK as u64) as usize,
                    );
                }
                Step::Reftable => {
                    let bytes = u64::from(self.hdr.refcount_table_clusters) * cs;
                    self.read_open(self.hdr.refcount_table_offset, bytes as usize);
                }
                Step::Snapshots => {
                    let at = self.hdr.snapshots_offset + self.open.table.len() as u64;
                    self.read_open(at, SNAPSHOT_CHUNK);
                }
                Step::SnapshotL1 => {
                    let sn = self.viewed_snapshot();
                    let bytes = (u64::from(sn.1) * 8).next_multiple_of(TABLE_CHUNK as u64);
                    self.read_open(sn.0, bytes.max(TABLE_CHUNK as u64) as usize);
                }
                Step::Bitmaps => {
                    let ext = self
                        .layout
                        .as_ref()
                        .and_then(|l| l.ext.bitmaps)
                        .expect("bitmaps step needs the extension");
                    let bytes = ext.directory_size.next_multiple_of(512) as usize;
                    self.read_open(ext.directory_offset, bytes);
                }
                Step::BitmapsInUse => {
                    let ext = self.layout.as_ref().and_then(|l| l.ext.bitmaps);
                    let (Some(ext), Some(dir)) = (ext, self.open.bitmap_dir.take()) else {
                        continue;
                    };
                    self.issue_buf(Purpose::Open, IoKind::Write, ext.directory_offset, dir);
                    self.open.pending += 1;
                    self.open.sync = true;
                }
                Step::HeaderUpdate => {
                    let len = self.header_write_len();
                    let mut b = IoBuf::zeroed(len);
                    b.as_mut_slice()
                        .copy_from_slice(&self.header_buf.as_slice()[..len]);
                    self.issue_buf(Purpose::Open, IoKind::Write, 0, b);
                    self.open.pending += 1;
                }
                Step::HeaderSync => {
                    self.issue_bare(Purpose::Open, IoKind::Flush, 0);
                    self.open.pending += 1;
                }
                Step::DataFile => {
                    self.open.pending += 1;
                    if !self.request_data_file() {
                        self.open.pending -= 1;
                        continue;
                    }
                    return;
                }
                Step::Prealloc => {
                    let mode = self
                        .create
                        .as_ref()
                        .map(|c| c.effective_preallocation())
                        .unwrap_or_default();
                    self.start_prealloc(mode);
                    self.open.pending += 1;
                    return;
                }
                Step::Backing => {
                    self.open.pending += 1;
                    let depth_left = self.config.limits.max_backing_depth;
                    if !self.request_backing(depth_left) {
                        continue;
                    }
                    return;
                }
            }
        }
    }

    fn read_open(&mut self, offset: u64, len: usize) {
        let b = IoBuf::zeroed(len);
        self.issue_buf(Purpose::Open, IoKind::Read, offset, b);
        self.open.pending += 1;
    }

    /// Bytes of cluster 0 rewritten when header fields change: the fixed header rounded up
    /// to a sector (what follows is the extension area, written back unchanged).
    pub(super) fn header_write_len(&self) -> usize {
        (self.hdr.header_length as usize)
            .next_multiple_of(512)
            .min(self.header_buf.len())
    }

    pub(super) fn open_complete(&mut self, op: IoOp, result: Result<(), IoError>) {
        self.open.pending -= 1;
        if let Err(e) = result {
            self.fail_open(OpenError::Io(e));
            return;
        }
        let Some(crate::io::Segment::Buf(buf)) = op.segments.into_iter().next() else {
            return;
        };
        if op.kind != IoKind::Read {
            return;
        }
        let bytes = buf.as_slice();
        match self.open.step {
            Step::Header | Step::Cluster0 => {
                let avail = (self.config.file_len.min(bytes.len() as u64)) as usize;
                let bytes = &bytes[..avail];
                match Header::decode(bytes) {
                    None => self.fail_open(FormatError::Truncated(avail as u64).into()),
                    Some(h) => {
                        self.hdr = h;
                        self.header_buf = buf;
                    }
                }
            }
            Step::L1 => {
                let n = self.hdr.l1_size as usize;
                self.l1 = (0..n).map(|i| be64(bytes, i)).collect();
                self.l1_dirty = vec![false; (n * 8).div_ceil(TABLE_CHUNK)];
            }
            Step::Reftable => {
                let n = bytes.len() / 8;
                self.reftable = (0..n).map(|i| be64(bytes, i)).collect();
                self.rt_dirty = vec![false; (n * 8).div_ceil(TABLE_CHUNK)];
            }
            Step::Snapshots => self.open.table.extend_from_slice(bytes),
            Step::SnapshotL1 => {
                // The snapshot's tables replace the active ones for reads (the engine is
                // read-only): past its L1, the image reads as unallocated.
                let n = self.viewed_snapshot().1 as usize;
                self.l1 = (0..n).map(|i| be64(bytes, i)).collect();
                self.l1_dirty = vec![false; (n * 8).div_ceil(TABLE_CHUNK)];
            }
            Step::Bitmaps => {
                let ext = self.layout.as_ref().and_then(|l| l.ext.bitmaps);
                let size = ext
                    .map_or(0, |e| e.directory_size as usize)
                    .min(bytes.len());
                let bitmaps = parse_bitmap_directory(&bytes[..size]);
                if let Some(info) = self.info.as_mut() {
                    info.bitmaps = bitmaps;
                }
                let maintain = !self.read_only
                    && !self.config.check_only
                    && self.reload_task.is_none()
                    && self.bitmaps.is_none();
                if let (true, Some(ext)) = (maintain, ext) {
                    let mut dir = buf;
                    let found = self.live_bitmaps(&mut dir.as_mut_slice()[..size], ext.nb_bitmaps);
                    if found == Some(true) {
                        self.open.bitmap_dir = Some(dir);
                    }
                } else {
                    self.sync_bitmap_info();
                }
            }
            _ => {}
        }
    }

    /// Decides the step after the current one finished; may record an open error.
    fn open_next(&mut self) -> Option<Step> {
        match self.open.step {
            Step::Start => Some(Step::Header),
            Step::CreateWrites => Some(Step::CreateSync),
            Step::CreateSync => Some(Step::Header),
            Step::Header => {
                // Fail early on what makes the cluster size meaningless.
                match Layout::parse_with(
                    self.header_buf.as_slice(),
                    self.parse_read_only(),
                    self.config.check_only,
                ) {
                    Err(OpenError::Format(
                        e @ (FormatError::BadMagic
                        | FormatError::UnsupportedVersion(_)
                        | FormatError::ClusterBits(_)
                        | FormatError::Truncated(_)),
                    )) => {
                        self.fail_open(e.into());
                        None
                    }
                    _ if self.hdr.cluster_size() > FIRST_READ as u64 => Some(Step::Cluster0),
                    _ => self.after_cluster0(),
                }
            }
            Step::Cluster0 => self.after_cluster0(),
            Step::L1 => Some(Step::Reftable),
            Step::Reftable => self.snapshots_or_next(),
            Step::Snapshots => self.snapshots_or_next(),
            Step::SnapshotL1 => self.bitmaps_or_next(),
            Step::Bitmaps if self.open.bitmap_dir.is_some() => Some(Step::BitmapsInUse),
            Step::Bitmaps | Step::BitmapsInUse => self.header_update_or_next(),
            Step::HeaderUpdate => Some(Step::HeaderSync),
            Step::HeaderSync => self.prealloc_or_done(),
            Step::DataFile => self.prealloc_or_backing(),
            Step::Prealloc => self.backing_or_done(),
            Step::Backing => None,
        }
    }

    /// Check mode accepts the dirty and corrupt bits like a read-only open does.
    /// Whether the header is parsed as for a read-only open: also while reloading after a
    /// repair, which may have left the corrupt bit set (the engine turns read-only then).
    fn parse_read_only(&self) -> bool {
        self.read_only || self.config.check_only || self.reload_task.is_some()
    }

    fn after_cluster0(&mut self) -> Option<Step> {
        let layout = match Layout::parse_with(
            self.header_buf.as_slice(),
            self.parse_read_only(),
            self.config.check_only,
        ) {
            Ok(l) => l,
            Err(e) => {
                self.fail_open(e);
                return None;
            }
        };
        if let Some(f) = layout.unsupported {
            if !self.config.inspect_only && !self.config.check_only {
                self.fail_open(OpenError::Unsupported(f));
                return None;
            }
        }
        self.geo = layout.geo;
        self.layout = Some(layout);
        if self.reload_task.is_some()
            && !self.config.check_only
            && self.hdr.incompatible_features & incompat::CORRUPT != 0
        {
            self.read_only = true;
        }
        if let Some(t) = self.table_past_eof() {
            self.fail_open(FormatError::TablePastEof(t).into());
            return None;
        }
        if self.hdr.l1_size > 0 {
            Some(Step::L1)
        } else {
            Some(Step::Reftable)
        }
    }

    /// The first table that does not fit in the file, unless opening only to check or
    /// inspect (which report it) or creating (the file grows as the plan writes it).
    fn table_past_eof(&self) -> Option<Table> {
        if self.config.check_only || self.config.inspect_only {
            return None;
        }
        let h = &self.hdr;
        let cs = self.geo.cluster_size();
        let len = self.config.file_len;
        let past = |at: u64, bytes: u64| bytes > 0 && at.saturating_add(bytes) > len;
        if past(h.l1_table_offset, u64::from(h.l1_size) * 8) {
            Some(Table::ActiveL1)
        } else if past(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
        ) {
            Some(Table::Refcount)
        } else if h.nb_snapshots > 0 && past(h.snapshots_offset, 40) {
            Some(Table::Snapshot)
        } else {
            None
        }
    }

    fn snapshots_or_next(&mut self) -> Option<Step> {
        // A check-mode open does not read the snapshot table (like QEMU's): the check
        // validates it, and `-r all` repairs it.
        let nb = if self.config.check_only {
            0
        } else {
            self.hdr.nb_snapshots
        };
        self.snapshot_table_bytes = 0;
        if nb > 0 {
            match snapshot_table_len(&self.open.table, nb) {
                Ok(Some(n)) => self.snapshot_table_bytes = n as u64,
                Ok(None) if self.open.table.len() < snapshot::MAX_TABLE_BYTES as usize => {
                    return Some(Step::Snapshots);
                }
                Ok(None) => {
                    self.fail_open(FormatError::TableTooLarge(Table::Snapshot).into());
                    return None;
                }
                Err(e) => {
                    self.fail_open(e.into());
                    return None;
                }
            }
        }
        let snapshots = match snapshot::parse(&self.open.table, nb) {
            Ok(s) => s,
            Err(e) => {
                self.fail_open(e.into());
                return None;
            }
        };
        self.open.table = Vec::new();
        self.info = Some(self.make_info(snapshots));
        if self.view.is_some() {
            return self.snapshot_view();
        }
        self.bitmaps_or_next()
    }

    /// Switches to the snapshot the config names: checks it, then reads its L1 table in
    /// place of the active one.
    fn snapshot_view(&mut self) -> Option<Step> {
        let which = self.view.clone().expect("a snapshot was asked for");
        let info = self.info.as_ref().expect("info before the snapshot view");
        let Some(sn) = which.find(&info.snapshots) else {
            self.fail_open(OpenError::SnapshotNotFound);
            return None;
        };
        let bytes = u64::from(sn.l1_size) * 8;
        let error = if bytes > crate::format::MAX_L1_BYTES {
            Some(FormatError::TableTooLarge(Table::SnapshotL1))
        } else if !self.geo.aligned(sn.l1_table_offset) || sn.l1_size > 0 && sn.l1_table_offset == 0
        {
            Some(FormatError::TableOffset(Table::SnapshotL1))
        } else if sn.l1_table_offset.saturating_add(bytes) > self.config.file_len.max(self.file_end)
        {
            Some(FormatError::TablePastEof(Table::SnapshotL1))
        } else {
            None
        };
        if let Some(e) = error {
            self.fail_open(e.into());
            return None;
        }
        self.view_end = sn.disk_size.unwrap_or(u64::MAX);
        Some(Step::SnapshotL1)
    }

    fn bitmaps_or_next(&mut self) -> Option<Step> {
        let bitmaps_valid = self.hdr.autoclear_features & autoclear::BITMAPS != 0;
        match self.layout.as_ref().and_then(|l| l.ext.bitmaps) {
            Some(b) if bitmaps_valid && b.directory_size > 0 && b.directory_size <= 64 << 20 => {
                Some(Step::Bitmaps)
            }
            _ => self.header_update_or_next(),
        }
    }

    /// The L1 offset and size of the snapshot the config names (found at open).
    fn viewed_snapshot(&self) -> (u64, u32) {
        let info = self.info.as_ref().expect("info before the snapshot view");
        let which = self.view.as_ref().expect("a snapshot was asked for");
        let sn = which
            .find(&info.snapshots)
            .expect("checked by snapshot_view");
        (sn.l1_table_offset, sn.l1_size)
    }

    fn make_info(&self, snapshots: Vec<crate::info::SnapshotInfo>) -> ImageInfo {
        let layout = self.layout.as_ref().expect("info after layout");
        let h = &self.hdr;
        ImageInfo {
            version: h.version,
            size: h.size,
            cluster_size: h.cluster_size(),
            refcount_bits: 1 << h.refcount_order,
            lazy_refcounts: h.compatible_features & crate::format::header::compat::LAZY_REFCOUNTS
                != 0,
            dirty: h.incompatible_features & incompat::DIRTY != 0,
            corrupt: h.incompatible_features & incompat::CORRUPT != 0,
            extended_l2: h.incompatible_features & incompat::EXTENDED_L2 != 0,
            compression_type: h.compression_type,
            backing_file: layout.backing_file.clone(),
            backing_format: layout.backing_format.clone(),
            data_file: layout.data_file.clone(),
            data_file_raw: h.autoclear_features & autoclear::RAW_DATA != 0,
            crypt_method: h.crypt_method,
            snapshots,
            bitmaps: Vec::new(),
            read_only: self.read_only,
        }
    }

    /// On a writable open: clear unknown autoclear bits, and the bitmaps bit unless the
    /// bitmaps are maintained (a damaged directory: nobody may trust them after we write).
    fn header_update_or_next(&mut self) -> Option<Step> {
        let keep = if self.bitmaps.is_some() || self.config.check_only {
            autoclear::KNOWN
        } else {
            autoclear::KNOWN & !autoclear::BITMAPS
        };
        let unchanged = self.hdr.autoclear_features & !keep == 0;
        if self.read_only || self.hdr.version < 3 || unchanged {
            if std::mem::take(&mut self.open.sync) {
                return Some(Step::HeaderSync);
            }
            return self.prealloc_or_done();
        }
        self.hdr.autoclear_features &= keep;
        self.hdr.encode(self.header_buf.as_mut_slice());
        Some(Step::HeaderUpdate)
    }

    fn prealloc_or_done(&mut self) -> Option<Step> {
        self.setup_runtime_state();
        self.data_file_or_next()
    }

    /// The external data file is needed by opens that read or write data (not by check or
    /// inspect opens, nor by a reload after a repair, which keeps the attached one).
    fn data_file_or_next(&mut self) -> Option<Step> {
        let data = !self.config.check_only && !self.config.inspect_only;
        if self.has_data_file() && data && self.data_file.is_none() {
            Some(Step::DataFile)
        } else {
            self.prealloc_or_backing()
        }
    }

    fn prealloc_or_backing(&mut self) -> Option<Step> {
        match self.create.as_ref().map(|c| c.effective_preallocation()) {
            Some(p) if p != Preallocation::Off => Some(Step::Prealloc),
            _ => self.backing_or_done(),
        }
    }

    /// The backing file is needed by opens that read data (not by check or inspect opens,
    /// nor by a reload after a repair, which keeps the attached one).
    fn backing_or_done(&mut self) -> Option<Step> {
        let named = self
            .layout
            .as_ref()
            .is_some_and(|l| l.backing_file.is_some());
        let data =
            !self.config.check_only && !self.config.inspect_only && !self.config.skip_backing;
        if named && data && self.backing.is_none() && self.reload_task.is_none() {
            Some(Step::Backing)
        } else {
            None
        }
    }

    /// The current step's outstanding work (an attach, a nested open) is over.
    pub(super) fn open_step_done(&mut self) {
        self.open.pending = self.open.pending.saturating_sub(1);
    }

    /// Opening fails because of the backing chain.
    pub(super) fn fail_open_backing(&mut self, e: OpenError) {
        self.fail_open(e);
    }

    /// Caches and allocator, from the configuration and the opened geometry.
    fn setup_runtime_state(&mut self) {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let all_l2 = geo.l1_entries_for(self.hdr.size).max(1) * cs;
        let budget = self.config.l2_cache_bytes.unwrap_or(all_l2.min(32 << 20));
        // 4 KiB slices even when the budget covers every table: a flush cycle writes back
        // only the slices it dirtied (random allocating writes dirty a few entries of
        // each table), where whole 64 KiB tables made its write twice as slow.
        let slice = cs.min(4096);
        self.l2 = Cache::new(slice as usize, (budget / slice) as usize);
        let rb_budget = self.config.refcount_cache_bytes.unwrap_or(4 * cs);
        self.rb = Cache::new(cs as usize, (rb_budget / cs) as usize);
        // First fit from the start, like QEMU: space freed by earlier sessions is reused
        // (the scan reads each refcount block once per session, as allocation proceeds).
        self.next_free = 1;
        self.file_end = self.file_end.max(self.config.file_len);
        self.zero_from = self.zero_from.max(self.config.file_len);
        self.len_done = self.len_done.max(self.config.file_len);
        if self.create.is_none() {
            // (A file just created is durable only after its first barrier.)
            self.len_durable = self.len_durable.max(self.config.file_len);
        }
        self.hdr_disk = self.hdr;
        self.index_metadata();
    }

    /// Reads the metadata again (after a repair), then resumes check task `t`.
    pub(super) fn reload(&mut self, t: u32) {
        self.l2.clear();
        self.rb.clear();
        self.free_list.clear();
        self.pending_frees.clear();
        self.config.file_len = self.file_end;
        self.read_only = self.config.read_only || self.config.inspect_only;
        self.open = OpenState {
            step: Step::Header,
            ..OpenState::default()
        };
        self.phase = Phase::Opening;
        self.reload_task = Some(t);
    }

    fn finish_open(&mut self) {
        self.phase = Phase::Open;
        self.create = None;
        if let Some(t) = self.reload_task.take() {
            self.make_runnable(t);
            return;
        }
        let info = self.info.clone().expect("info before open ends");
        self.events.push_back(Event::Opened(Box::new(info)));
    }

    fn start_prealloc(&mut self, mode: Preallocation) {
        let Some(t) = self.task_free.pop() else {
            return;
        };
        self.task_seq += 1;
        self.exclusive_tasks += 1;
        self.sparse_prealloc = mode == Preallocation::Metadata;
        self.tasks[t as usize] = Some(Task {
            req: super::ReqId(t),
            seq: self.task_seq,
            kind: Kind::Prealloc(mode),
            origin: 0,
            pos: 0,
            end: self.hdr.size,
            inflight: 0,
            error: None,
            alloc: None,
            join: None,
            sequential: false,
            wait_cycle: None,
            sub: 0,
            aux: 0,
            status: None,
            report: None,
            bitmap: None,
        });
        self.phase = Phase::Open;
        self.make_runnable(t);
    }

    pub(super) fn open_prealloc_done(&mut self, err: Option<RequestError>) {
        self.phase = Phase::Opening;
        self.sparse_prealloc = false;
        self.open.pending -= 1;
        if let Some(e) = err {
            self.fail_open(match e {
                RequestError::Io(io) => OpenError::Io(io),
                RequestError::NoSpace => OpenError::Io(IoError {
                    kind: std::io::ErrorKind::StorageFull,
                    raw_os_error: Some(IoError::ENOSPC),
                }),
                _ => OpenError::Config("preallocation failed"),
            });
        }
    }
}

/// Bytes the snapshot table spans, or `None` if `table` does not hold all of it yet.
fn snapshot_table_len(table: &[u8], count: u32) -> Result<Option<usize>, FormatError> {
    let mut off = 0usize;
    for i in 0..count {
        if off + 40 > table.len() {
            return Ok(None);
        }
        let h = &table[off..off + 40];
        let extra = u32::from_be_bytes([h[36], h[37], h[38], h[39]]);
        if extra > snapshot::MAX_EXTRA_DATA {
            return Err(FormatError::SnapshotEntry(i));
        }
        let id = u16::from_be_bytes([h[12], h[13]]) as usize;
        let name = u16::from_be_bytes([h[14], h[15]]) as usize;
        off = (off + 40 + extra as usize + id + name).next_multiple_of(8);
        if off as u64 > snapshot::MAX_TABLE_BYTES {
            return Err(FormatError::TableTooLarge(Table::Snapshot));
        }
    }
    Ok(if off <= table.len() { Some(off) } else { None })
}

/// Lists the bitmaps of a bitmap directory (for `info`); stops at the first bad entry.
fn parse_bitmap_directory(dir: &[u8]) -> Vec<BitmapInfo> {
    let mut out = Vec::new();
    let mut off = 0usize;
    while off + 24 <= dir.len() && out.len() < 65535 {
        let e = &dir[off..off + 24];
        let flags = u32::from_be_bytes([e[12], e[13], e[14], e[15]]);
        let gran_bits = u32::from(e[17]);
        let name_len = u16::from_be_bytes([e[18], e[19]]) as usize;
        let extra = u32::from_be_bytes([e[20], e[21], e[22], e[23]]) as usize;
        let name_start = off + 24 + extra;
        let Some(name) = dir.get(name_start..name_start + name_len) else {
            break;
        };
        if name_len == 0 || gran_bits > 63 {
            break;
        }
        out.push(BitmapInfo {
            name: String::from_utf8_lossy(name).into_owned(),
            granularity: 1u64 << gran_bits,
            in_use: flags & 1 != 0,
            auto: flags & 2 != 0,
            table_offset: u64::from_be_bytes(e[0..8].try_into().expect("8 bytes")),
            table_size: u32::from_be_bytes([e[8], e[9], e[10], e[11]]),
        });
        off = (name_start + name_len).next_multiple_of(8);
    }
    out
}
