//! The fuzz targets, as library functions taking raw bytes.
//!
//! Each `cargo fuzz` target in `fuzz/fuzz_targets/` is one line calling one of these, and
//! `tests/fuzz_corpus.rs` replays the committed corpora (`fuzz/corpus/<target>/`) and every
//! minimised finding (`fuzz/regressions/<target>/`) through them on stable, so
//! `cargo test --workspace` covers them.
//!
//! A function returns normally for any input the engine handles correctly, a typed error
//! included, and panics on a bug: a panic inside the engine, a request that never finishes
//! (the engine stalls with nothing to do) or never stops issuing I/O, data that differs from
//! the model, or corruption or lost data after a crash.
//!
//! The targets and their input bytes:
//!
//! - [`header`]: an image file (at most [`MAX_IMAGE_BYTES`]), parsed, then opened read-only
//!   (read, checked), writable, metadata-only, and for check (repaired);
//! - [`image`]: `image file ++ plan ++ len(plan) as u16 LE` ([`split_image_input`]): the image
//!   is opened and driven by the [`ImagePlan`]'s request script;
//! - [`script`]: a [`ScriptPlan`], a request script on a fresh image, against the byte
//!   [`Model`];
//! - [`crash`]: a [`CrashPlan`], a request script on the crash simulator ([`crate::sim`]) with
//!   one crash point.
//!
//! Plans are decoded with [`arbitrary::Unstructured`], so nearly every byte string is an
//! input (what does not decode is skipped). Everything is bounded so that one input runs in
//! milliseconds: image files up to [`MAX_IMAGE_BYTES`], a host file that never grows past
//! [`MAX_FILE`] (an op reaching past it fails with `ENOSPC`), virtual sizes up to
//! [`MAX_VIRTUAL`], scripts of at most [`MAX_STEPS`] requests of at most [`MAX_LEN`] bytes,
//! and at most [`MAX_COMPLETIONS`] I/O completions per drive of the engine.
//!
//! [`header`], [`image`] and [`script`] drive the engine with a small executor of their own
//! ([`Mem`], over a sparse in-memory file): it submits several requests at once and caps the
//! file, which the crash simulator's [`Sim`] (one request at a time, a file that grows to
//! whatever offset the engine names, with a durable copy) does not. [`crash`] runs on [`Sim`]
//! itself. `QCOW2_FUZZ_TRACE=1` makes [`Mem`] print every request, completion and event.

use std::collections::HashMap;

use arbitrary::{Arbitrary, Unstructured};
use qcow2_proto::format::Layout;
use qcow2_proto::{
    CacheMode, CheckReport, CreateOptions, Event, Image, ImageConfig, ImageInfo, IoError, IoKind,
    IoOp, OpenError, Outcome, Preallocation, ReqId, Request, RequestError, Segment, SubmitError,
    Target,
};

use crate::model::{first_difference, pattern, Model, PAGE};
use crate::script::clip;
use crate::sim::disk::SimDisk;
use crate::sim::driver::Sim;
use crate::sim::oracle::Oracle;
use crate::sim::rng::Rng;

/// Largest image file the [`header`] and [`image`] targets take (longer inputs are ignored).
pub const MAX_IMAGE_BYTES: usize = 1 << 20;
/// Largest host file [`Mem`] keeps: an op reaching past it fails with `ENOSPC`.
pub const MAX_FILE: u64 = 128 << 20;
/// Largest virtual size a script creates or resizes to.
pub const MAX_VIRTUAL: u64 = 64 << 20;
/// Most requests in one script (more are dropped).
pub const MAX_STEPS: usize = 48;
/// Longest guest request.
pub const MAX_LEN: u64 = 256 << 10;
/// Most I/O completions one drive of the engine may take before it counts as a livelock.
pub const MAX_COMPLETIONS: u64 = 1 << 20;
/// Most requests submitted together.
const MAX_BATCH: usize = 8;
/// Largest virtual size whose whole contents [`image`] loads into a model.
const MAX_MODEL_SIZE: u64 = 16 << 20;
/// Virtual size the [`crash`] target's disk may reach (the oracle's extent).
const CRASH_MAX: u64 = 1 << 20;
/// Most requests in one [`crash`] script.
const CRASH_STEPS: usize = 24;

// ---------------------------------------------------------------------------------------
// Script steps
// ---------------------------------------------------------------------------------------

/// A guest offset, decoded against the disk's size when the step runs: byte-granular,
/// sector-aligned, or near a power-of-two boundary (cluster, L2 table and refcount block
/// boundaries of every cluster size).
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct Pos {
    kind: u8,
    value: u32,
}

impl Pos {
    fn offset(self) -> u64 {
        let v = u64::from(self.value);
        match self.kind % 4 {
            0 => v,
            1 => v * 512,
            _ => {
                let unit = 512u64 << (v % 13);
                let base = (v >> 4) * unit;
                let jitter = [0u64, 1, 512, 4096][usize::from(self.kind >> 2) % 4];
                if self.kind & 0x40 == 0 {
                    base + jitter
                } else {
                    base.saturating_sub(jitter)
                }
            }
        }
    }
}

/// A request length: a few bytes, whole sectors, whole 4 KiB pages or anything up to
/// [`MAX_LEN`].
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct Len {
    kind: u8,
    value: u32,
}

impl Len {
    fn get(self) -> u32 {
        let v = u64::from(self.value);
        (match self.kind % 4 {
            0 => v % 600 + 1,
            1 => (v % 128 + 1) * 512,
            2 => (v % 8 + 1) * 4096,
            _ => v % MAX_LEN + 1,
        }) as u32
    }
}

/// One request of a script.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Step {
    /// Read (and compare with the model, where there is one).
    Read(Pos, Len),
    /// Write a pattern.
    Write(Pos, Len, u8),
    /// Write zeroes, unmapping when the flag is set.
    Zeroes(Pos, Len, bool),
    /// Discard.
    Discard(Pos, Len),
    /// Guest flush.
    Flush,
    /// Resize (see [`virtual_size`]).
    Resize(u32),
    /// Block status of a range.
    Status(Pos, Len),
    /// Check without repairing.
    Check,
    /// Close and open again.
    Reopen,
}

/// A step and whether it is submitted together with the step before it.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct Item {
    /// Submit with the previous step, before either finishes.
    pub together: bool,
    /// The request.
    pub step: Step,
}

impl Step {
    /// The guest range the step touches on a disk of `size` bytes, if it has one.
    fn range(self, size: u64) -> Option<(u64, u64)> {
        match self {
            Step::Read(p, l)
            | Step::Write(p, l, _)
            | Step::Zeroes(p, l, _)
            | Step::Discard(p, l)
            | Step::Status(p, l) => clip(p.offset(), l.get(), size),
            _ => None,
        }
    }

    fn writes(self) -> bool {
        matches!(
            self,
            Step::Write(..) | Step::Zeroes(..) | Step::Discard(..) | Step::Resize(_)
        )
    }

    /// Steps that run alone when results are compared with a model.
    fn alone(self) -> bool {
        matches!(self, Step::Resize(_) | Step::Check | Step::Reopen)
    }

    /// The new virtual size of a resize (see [`virtual_size`]).
    fn new_size(raw: u32, aligned: bool) -> u64 {
        let size = virtual_size(raw);
        if aligned {
            size
        } else {
            // Now and then an unaligned size, which the engine refuses.
            size - u64::from(raw >> 28 == 0xf) * 7
        }
    }
}

/// Decodes a plan: its fixed fields first, then steps from all the bytes left (at most
/// `max`), so that a longer input is a longer script.
fn decode<P: for<'a> Arbitrary<'a>>(data: &[u8], max: usize) -> Option<(P, Vec<Item>)> {
    let mut u = Unstructured::new(data);
    let plan = P::arbitrary(&mut u).ok()?;
    let mut items = Vec::new();
    while !u.is_empty() && items.len() < max {
        items.push(Item::arbitrary(&mut u).ok()?);
    }
    Some((plan, items))
}

/// A virtual size from fuzz bytes: 64 KiB shifted left by `raw % 11` (each power of two up
/// to [`MAX_VIRTUAL`] as likely), plus `(raw >> 4) % 128` sectors, at most [`MAX_VIRTUAL`].
fn virtual_size(raw: u32) -> u64 {
    (((64u64 << 10) << (raw % 11)) + u64::from(raw >> 4) % 128 * 512).min(MAX_VIRTUAL)
}

/// A virtual size for the [`crash`] target: 64 KiB to [`CRASH_MAX`], in sectors.
fn crash_size(raw: u32) -> u64 {
    let span = (CRASH_MAX - (64 << 10)) / 512 + 1;
    (64 << 10) + u64::from(raw) % span * 512
}

/// Takes the next batch of requests submitted together off the front of `items`: the first
/// item and those after it that ask to join, at most [`MAX_BATCH`]. With `strict`, a batch
/// never holds two requests whose result would depend on their order (a write overlapping
/// anything else on a disk of `size` bytes), and resizes, checks and reopens run alone, so
/// the model can predict every result.
fn next_batch(items: &mut &[Item], size: u64, strict: bool) -> Vec<Step> {
    let mut batch: Vec<Step> = Vec::new();
    while let Some((item, rest)) = items.split_first() {
        let step = item.step;
        if let Some(first) = batch.first() {
            let joins = item.together
                && batch.len() < MAX_BATCH
                && (!strict
                    || (!step.alone()
                        && !first.alone()
                        && batch.iter().all(|o| !conflict(*o, step, size))));
            if !joins {
                break;
            }
        }
        batch.push(step);
        *items = rest;
    }
    batch
}

fn conflict(a: Step, b: Step, size: u64) -> bool {
    if !a.writes() && !b.writes() {
        return false;
    }
    match (a.range(size), b.range(size)) {
        (Some((ao, al)), Some((bo, bl))) => ao < bo + bl && bo < ao + al,
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------
// The executor
// ---------------------------------------------------------------------------------------

use crate::model::{synthetic_backing, SYNTHETIC_BACKING_LEN as BACKING_LEN};

/// A request's result and its guest buffer back.
type Ran = (Result<Outcome, RequestError>, Option<Vec<u8>>);

/// The engine over an in-memory file that may not grow past [`MAX_FILE`]: requests are
/// submitted in batches, ops complete one at a time in a seeded random order, and one op
/// may be made to fail.
#[derive(Debug)]
pub struct Mem {
    engine: Image,
    file: File,
    /// The external data file, when the image names one (empty at first).
    data: Option<File>,
    pending: Vec<IoOp>,
    /// Guest buffers of requests in flight, and which batch slot each fills.
    inflight: HashMap<ReqId, (usize, Option<Vec<u8>>)>,
    results: Vec<Option<Ran>>,
    rng: Rng,
    completions: u64,
    /// `completions` when the current drive (open, batch, settle) began.
    drive_start: u64,
    /// Completion number that fails, and with which errno.
    fault: Option<(u64, i32)>,
    /// Print every request, completion and event (`QCOW2_FUZZ_TRACE=1`).
    trace: bool,
}

impl Mem {
    /// Opens the image in `bytes` with `config` (its `file_len` is set from the bytes).
    pub fn open(
        bytes: &[u8],
        mut config: ImageConfig,
        seed: u64,
    ) -> Result<(Self, ImageInfo), OpenError> {
        let file = File::new(bytes);
        config.file_len = file.len;
        Self::start(Image::open(config), file, seed)
    }

    /// Creates an image in an empty file.
    pub fn create(
        options: CreateOptions,
        config: ImageConfig,
        seed: u64,
    ) -> Result<(Self, ImageInfo), OpenError> {
        Self::start(Image::create(config, options), File::new(&[]), seed)
    }

    /// Opens the file again with `config` (after a close); an armed fault stays armed.
    pub fn reopen(
        self,
        mut config: ImageConfig,
        seed: u64,
    ) -> Result<(Self, ImageInfo), OpenError> {
        config.file_len = self.file.len;
        let mut me = Self::new(Image::open(config), self.file, seed);
        (me.completions, me.fault, me.data) = (self.completions, self.fault, self.data);
        me.opened()
    }

    fn start(engine: Image, file: File, seed: u64) -> Result<(Self, ImageInfo), OpenError> {
        Self::new(engine, file, seed).opened()
    }

    fn new(engine: Image, file: File, seed: u64) -> Self {
        Self {
            engine,
            file,
            data: None,
            pending: Vec::new(),
            inflight: HashMap::new(),
            results: Vec::new(),
            rng: Rng::new(seed),
            completions: 0,
            drive_start: 0,
            fault: None,
            trace: std::env::var_os("QCOW2_FUZZ_TRACE").is_some(),
        }
    }

    /// Drives opening to its end.
    fn opened(mut self) -> Result<(Self, ImageInfo), OpenError> {
        let me = &mut self;
        me.drive_start = me.completions;
        loop {
            me.collect_ops();
            let mut attached = false;
            while let Some(ev) = me.engine.poll_event() {
                if me.trace {
                    eprintln!("event {ev:?}");
                }
                match ev {
                    Event::Opened(info) => return Ok((self, *info)),
                    Event::OpenFailed(e) => return Err(e),
                    // Whatever it names, the backing file is a synthetic raw one.
                    Event::OpenBacking { depth, .. } => {
                        me.engine.attach_backing(depth, BACKING_LEN);
                        attached = true;
                    }
                    // Whatever it names, the data file is an in-memory one (empty at first).
                    Event::OpenDataFile { .. } => {
                        let data = me.data.get_or_insert_with(|| File::new(&[]));
                        me.engine.attach_data_file(data.len);
                        attached = true;
                    }
                    _ => {}
                }
            }
            if !attached {
                assert!(me.step(), "the engine stalled while opening");
            }
        }
    }

    /// The host file now.
    pub fn file(&self) -> Vec<u8> {
        self.file.contents()
    }

    /// Makes the `at`-th op completion from now fail with `errno`.
    pub fn fail_at(&mut self, at: u64, errno: i32) {
        self.fault = Some((self.completions + at, errno));
    }

    /// Runs one request the engine takes through a method of its own (snapshots, bitmap
    /// reads) to its end.
    pub fn run_method(
        &mut self,
        submit: impl FnOnce(&mut Image) -> Result<ReqId, SubmitError>,
    ) -> Result<Outcome, RequestError> {
        self.drive_start = self.completions;
        self.results = vec![None];
        match submit(&mut self.engine) {
            Ok(id) => {
                self.inflight.insert(id, (0, None));
            }
            Err(SubmitError::Refused(e)) => return Err(e),
            Err(e) => {
                return Err(RequestError::Io(io_error(match e {
                    SubmitError::Busy => 16,
                    _ => 22,
                })))
            }
        }
        loop {
            self.collect_ops();
            self.collect_events();
            if self.inflight.is_empty() {
                break;
            }
            assert!(self.step(), "the engine stalled running a method's request");
        }
        let (result, _) = self.results.pop().flatten().expect("the request finished");
        result
    }

    /// Runs one request to its end.
    pub fn run1(&mut self, request: Request, buf: Option<Vec<u8>>) -> Ran {
        self.run(vec![(request, buf)]).pop().expect("one result")
    }

    /// Submits `batch` (each request with its guest buffer) before any of it finishes, and
    /// drives the engine until all of it has; returns the results in order.
    ///
    /// # Panics
    /// If the engine stalls with a request unfinished, or runs past [`MAX_COMPLETIONS`].
    pub fn run(&mut self, batch: Vec<(Request, Option<Vec<u8>>)>) -> Vec<Ran> {
        let requests: Vec<Request> = batch.iter().map(|(r, _)| *r).collect();
        self.drive_start = self.completions;
        self.results = (0..batch.len()).map(|_| None).collect();
        for (slot, (request, buf)) in batch.into_iter().enumerate() {
            if self.trace {
                eprintln!("submit {request:?}");
            }
            match self.engine.submit(request) {
                Ok(id) => {
                    self.inflight.insert(id, (slot, buf));
                }
                Err(SubmitError::Refused(e)) => self.results[slot] = Some((Err(e), buf)),
                Err(e) => panic!("submitting {request:?} failed: {e}"),
            }
            self.collect_ops();
            self.collect_events();
        }
        loop {
            self.collect_ops();
            self.collect_events();
            if self.inflight.is_empty() {
                break;
            }
            assert!(
                self.step(),
                "the engine stalled with requests unfinished: {requests:?}"
            );
        }
        std::mem::take(&mut self.results)
            .into_iter()
            .map(|r| r.expect("every request finished"))
            .collect()
    }

    /// Completes every op still pending (write-back the engine started on its own).
    pub fn settle(&mut self) {
        self.drive_start = self.completions;
        loop {
            self.collect_ops();
            self.collect_events();
            if !self.step() {
                return;
            }
        }
    }

    fn collect_ops(&mut self) {
        while let Some(op) = self.engine.poll_io() {
            self.pending.push(op);
        }
    }

    fn collect_events(&mut self) {
        while let Some(ev) = self.engine.poll_event() {
            if self.trace {
                eprintln!("event {ev:?}");
            }
            if let Event::Done { req, result } = ev {
                let (slot, buf) = self
                    .inflight
                    .remove(&req)
                    .unwrap_or_else(|| panic!("Done for {req:?}, which is not in flight"));
                self.results[slot] = Some((result, buf));
            }
        }
    }

    /// Completes one random pending op; `false` when none is pending.
    fn step(&mut self) -> bool {
        if self.pending.is_empty() {
            return false;
        }
        let i = self.rng.below(self.pending.len() as u64) as usize;
        let mut op = self.pending.swap_remove(i);
        let result = match self.fault {
            Some((at, errno)) if at == self.completions && op.kind != IoKind::ZeroFill => {
                Err(io_error(errno))
            }
            _ => self.execute(&mut op),
        };
        if self.trace {
            eprintln!(
                "completion {}: {:?} at {:#x}, {} bytes ({} more pending): {result:?}",
                self.completions,
                op.kind,
                op.offset,
                op.len(),
                self.pending.len()
            );
        }
        self.completions += 1;
        assert!(
            self.completions - self.drive_start < MAX_COMPLETIONS,
            "the engine is still issuing I/O after {MAX_COMPLETIONS} completions (a livelock?)"
        );
        self.engine.complete(op, result);
        true
    }

    /// A read of the synthetic backing file at `depth` (a raw file of [`BACKING_LEN`]
    /// bytes of a pattern); anything else on it fails with EBADF.
    fn read_backing(&mut self, depth: u32, op: &mut IoOp) -> Result<usize, IoError> {
        if op.kind != IoKind::Read && op.kind != IoKind::ZeroFill {
            return Err(io_error(9));
        }
        let zero = op.kind == IoKind::ZeroFill;
        let mut pos = op.offset;
        for seg in op.segments.iter_mut() {
            let n = seg.len();
            let out = read_target(&mut self.inflight, seg);
            if zero {
                out.fill(0);
            } else {
                synthetic_backing(depth, pos, out);
            }
            pos = pos.saturating_add(n as u64);
        }
        Ok(op.len() as usize)
    }

    /// Performs `op` on the file.
    fn execute(&mut self, op: &mut IoOp) -> Result<usize, IoError> {
        if let Target::Backing(depth) = op.target {
            return self.read_backing(depth, op);
        }
        if op.target == Target::DataFile {
            let Some(mut data) = self.data.take() else {
                return Err(io_error(9));
            };
            std::mem::swap(&mut self.file, &mut data);
            op.target = Target::Image;
            let r = self.execute(op);
            op.target = Target::DataFile;
            std::mem::swap(&mut self.file, &mut data);
            self.data = Some(data);
            return r;
        }
        if op.target != Target::Image {
            return Err(io_error(9));
        }
        let len = op.len();
        let end = match op.kind {
            IoKind::Write => op.offset.checked_add(len),
            IoKind::SetLen => Some(op.offset),
            IoKind::PunchHole { len } | IoKind::WriteZeroes { len } | IoKind::Allocate { len } => {
                op.offset.checked_add(len)
            }
            _ => Some(0),
        };
        if end.is_none_or(|e| e > MAX_FILE) {
            return Err(io_error(IoError::ENOSPC));
        }
        let mut pos = op.offset;
        match op.kind {
            IoKind::Read => {
                for seg in op.segments.iter_mut() {
                    let n = seg.len();
                    let out = read_target(&mut self.inflight, seg);
                    self.file.read(pos, out);
                    pos = pos.saturating_add(n as u64);
                }
            }
            IoKind::Write => {
                for seg in op.segments.iter() {
                    let n = seg.len();
                    match seg {
                        Segment::Guest { req, start, len } => {
                            let buf = guest(&mut self.inflight, *req);
                            self.file.write(pos, &buf[*start..*start + *len]);
                        }
                        Segment::Buf(b) => self.file.write(pos, b.as_slice()),
                        Segment::Zeroes(n) => self.file.zero(pos, *n as u64, true),
                        _ => panic!("an unknown segment kind"),
                    }
                    pos += n as u64;
                }
            }
            IoKind::Compress { .. } => {
                let input = match op.segments.first() {
                    Some(&Segment::Guest { req, start, len }) => {
                        guest(&mut self.inflight, req)[start..start + len].to_vec()
                    }
                    _ => Vec::new(),
                };
                return qcow2_proto::compress_op(op, &input);
            }
            IoKind::Decompress { .. } => {
                let out = match op.segments.last() {
                    Some(&Segment::Guest { req, start, len }) => {
                        Some(&mut guest(&mut self.inflight, req)[start..start + len])
                    }
                    _ => None,
                };
                return qcow2_proto::decompress_op(op, out);
            }
            IoKind::ZeroFill => {
                for seg in op.segments.iter_mut() {
                    match seg {
                        Segment::Guest { req, start, len } => {
                            let buf = guest(&mut self.inflight, *req);
                            buf[*start..*start + *len].fill(0);
                        }
                        Segment::Buf(b) => b.as_mut_slice().fill(0),
                        _ => {}
                    }
                }
            }
            IoKind::SetLen => self.file.set_len(op.offset),
            IoKind::PunchHole { len } => self.file.zero(op.offset, len, false),
            IoKind::WriteZeroes { len } => self.file.zero(op.offset, len, true),
            IoKind::Allocate { len } => self.file.grow(op.offset + len),
            // Nothing crashes here: a flush has nothing to do.
            _ => {}
        }
        Ok(len as usize)
    }
}

/// A sparse host file of at most [`MAX_FILE`] bytes (a [`Model`] holds the bytes).
#[derive(Debug)]
struct File {
    bytes: Model,
    len: u64,
}

impl File {
    fn new(data: &[u8]) -> Self {
        let mut bytes = Model::new(MAX_FILE);
        let len = (data.len() as u64).min(MAX_FILE);
        bytes.write(0, &data[..len as usize]);
        Self { bytes, len }
    }

    /// The whole file.
    fn contents(&self) -> Vec<u8> {
        let mut out = vec![0; self.len as usize];
        self.bytes.read(0, &mut out);
        out
    }

    /// Reads at `offset`; past the end reads zeroes.
    fn read(&self, offset: u64, out: &mut [u8]) {
        let n = self.len.saturating_sub(offset).min(out.len() as u64) as usize;
        self.bytes.read(offset, &mut out[..n]);
        out[n..].fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.bytes.write(offset, data);
        self.grow(offset + data.len() as u64);
    }

    fn zero(&mut self, offset: u64, len: u64, grow: bool) {
        let len = if grow {
            self.grow(offset + len);
            len
        } else {
            len.min(self.len.saturating_sub(offset))
        };
        self.bytes.zero(offset, len);
    }

    fn grow(&mut self, end: u64) {
        self.len = self.len.max(end);
    }

    fn set_len(&mut self, len: u64) {
        if len < self.len {
            self.bytes.zero(len, self.len - len);
        }
        self.len = len;
    }
}

fn guest(inflight: &mut HashMap<ReqId, (usize, Option<Vec<u8>>)>, req: ReqId) -> &mut Vec<u8> {
    inflight
        .get_mut(&req)
        .and_then(|(_, b)| b.as_mut())
        .unwrap_or_else(|| panic!("an op names the guest buffer of {req:?}, which has none"))
}

/// The memory a read fills for `seg`: a span of its request's guest buffer, or a core
/// buffer (nothing for other segments).
fn read_target<'a>(
    inflight: &'a mut HashMap<ReqId, (usize, Option<Vec<u8>>)>,
    seg: &'a mut Segment,
) -> &'a mut [u8] {
    match seg {
        Segment::Guest { req, start, len } => {
            let buf = guest(inflight, *req);
            &mut buf[*start..*start + *len]
        }
        Segment::Buf(b) => b.as_mut_slice(),
        _ => &mut [],
    }
}

fn io_error(errno: i32) -> IoError {
    IoError {
        kind: std::io::Error::from_raw_os_error(errno).kind(),
        raw_os_error: Some(errno),
    }
}

/// The request for `step` on a disk of `size` bytes, with its buffer; `None` when the step
/// touches nothing. Resizes and reopens are handled by the caller.
fn request(step: Step, size: u64, aligned_resize: bool) -> Option<(Request, Option<Vec<u8>>)> {
    let range = step.range(size);
    Some(match step {
        Step::Read(..) => {
            let (offset, len) = range?;
            (Request::Read { offset, len }, Some(vec![0; len as usize]))
        }
        Step::Write(_, _, seed) => {
            let (offset, len) = range?;
            let data = pattern(u32::from(seed), offset, len as usize);
            (Request::Write { offset, len }, Some(data))
        }
        Step::Zeroes(_, _, unmap) => {
            let (offset, len) = range?;
            (Request::WriteZeroes { offset, len, unmap }, None)
        }
        Step::Discard(..) => {
            let (offset, len) = range?;
            (Request::Discard { offset, len }, None)
        }
        Step::Status(..) => {
            let (offset, len) = range?;
            (Request::BlockStatus { offset, len }, None)
        }
        Step::Flush => (Request::Flush, None),
        Step::Resize(raw) => (
            Request::Resize {
                size: Step::new_size(raw, aligned_resize),
                shrink: true,
            },
            None,
        ),
        Step::Check => (Request::Check { repair: None }, None),
        Step::Reopen => (Request::Close, None),
    })
}

/// Cache budgets and cache mode from fuzz bytes.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct Knobs {
    write_through: bool,
    l2_cache: u8,
    refcount_cache: u8,
    /// Seeds the completion order.
    pub seed: u64,
}

impl Knobs {
    /// An engine configuration: QEMU's cache defaults, or small budgets (a few slices or
    /// refcount blocks) that make the caches evict.
    pub fn config(&self, cluster_size: u64, read_only: bool) -> ImageConfig {
        let mut c = ImageConfig::new(0);
        c.read_only = read_only;
        if self.write_through {
            c.cache_mode = CacheMode::WriteThrough;
        }
        if self.l2_cache % 4 != 0 {
            c.l2_cache_bytes = Some(u64::from(self.l2_cache / 4 % 32 + 1) * 4096);
        }
        if self.refcount_cache % 4 != 0 {
            c.refcount_cache_bytes =
                Some(u64::from(self.refcount_cache / 4 % 8 + 1) * cluster_size);
        }
        c
    }
}

fn check_report(r: &Ran) -> Option<&CheckReport> {
    match r {
        (Ok(Outcome::Check(report)), _) => Some(report),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// header
// ---------------------------------------------------------------------------------------

/// Fuzz target `header`: `data` is an image file. It is parsed in every mode, then opened
/// read-only (first MiB read, checked), writable (closed), metadata-only (closed) and for
/// check (repaired; a repair that reports success must leave an image that checks without
/// corruption). Any typed error passes.
pub fn header(data: &[u8]) {
    if data.len() > MAX_IMAGE_BYTES {
        return;
    }
    for (read_only, check_mode) in [(true, false), (false, false), (false, true)] {
        let _ = Layout::parse_with(data, read_only, check_mode);
    }
    let small = |c: &mut ImageConfig| {
        c.l2_cache_bytes = Some(64 << 10);
        c.refcount_cache_bytes = Some(64 << 10);
    };
    for mode in 0..4 {
        let mut config = ImageConfig::new(0);
        small(&mut config);
        match mode {
            0 => config.read_only = true,
            1 => {}
            2 => config.inspect_only = true,
            _ => config.check_only = true,
        }
        let Ok((mut m, info)) = Mem::open(data, config, 1) else {
            continue;
        };
        if mode == 0 {
            let len = info.size.min(1 << 20);
            let _ = m.run1(
                Request::Read { offset: 0, len },
                Some(vec![0; len as usize]),
            );
        }
        // Checks read-only and with repair; the other modes just open and close.
        let report = match mode {
            0 => Some(m.run1(Request::Check { repair: None }, None)),
            3 => Some(m.run1(
                Request::Check {
                    repair: Some(qcow2_proto::Repair::All),
                },
                None,
            )),
            _ => None,
        };
        let _ = m.run1(Request::Close, None);
        m.settle();
        if let Some(r) = report.as_ref().and_then(check_report) {
            if mode == 3 && r.corruptions == 0 && r.check_errors == 0 {
                let mut config = ImageConfig::new(0);
                small(&mut config);
                config.read_only = true;
                if let Ok((mut again, _)) = m.reopen(config, 2) {
                    let after = again.run1(Request::Check { repair: None }, None);
                    if let Some(a) = check_report(&after) {
                        assert!(
                            a.corruptions == 0 && a.check_errors == 0,
                            "check -r all reported a clean image, a new check disagrees: \
                             {r:?}\nthen {a:?}"
                        );
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// image
// ---------------------------------------------------------------------------------------

/// How the [`image`] target opens its image. In the input these fields are followed by the
/// request script: [`Item`]s decoded from every byte left (at most [`MAX_STEPS`]).
#[derive(Arbitrary, Debug)]
pub struct ImagePlan {
    read_only: bool,
    knobs: Knobs,
    /// An I/O error at this op completion (EIO or ENOSPC by the flag).
    fault: Option<(u8, bool)>,
    /// What runs at the end: `% 4` 0 nothing more, 1 a check, 2 repair leaks, 3 repair
    /// all; `/ 4 % 4` before that: 1 a snapshot created, 2 created and applied, 3 created
    /// and deleted (with every snapshot and bitmap the image lists read first).
    finish: u8,
}

/// Splits the [`image`] target's input: `image ++ plan ++ len(plan) as u16 LE`.
pub fn split_image_input(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((body, tail)) = data.split_last_chunk::<2>() else {
        return (data, &[]);
    };
    let n = usize::from(u16::from_le_bytes(*tail)).min(body.len());
    body.split_at(body.len() - n)
}

/// Joins an image and plan bytes into an [`image`] input (the inverse of
/// [`split_image_input`]); the plan is cut at 65535 bytes.
pub fn join_image_input(image: &[u8], plan: &[u8]) -> Vec<u8> {
    let plan = &plan[..plan.len().min(usize::from(u16::MAX))];
    let mut out = image.to_vec();
    out.extend_from_slice(plan);
    out.extend_from_slice(&(plan.len() as u16).to_le_bytes());
    out
}

/// Fuzz target `image`: a whole image (see [`split_image_input`]) opened and driven by an
/// [`ImagePlan`]'s script, requests submitted in batches, maybe with an injected I/O error;
/// then checked or repaired and closed. Any typed error passes, except where the image was
/// consistent to begin with: then, unless an error was injected, every request must
/// succeed (resizes may be refused), reads must return what the model says, and after a
/// clean close the image must check without corruption (and without leaks if it had none).
pub fn image(data: &[u8]) {
    let (bytes, plan) = split_image_input(data);
    if bytes.len() > MAX_IMAGE_BYTES {
        return;
    }
    let Some((plan, items)) = decode::<ImagePlan>(plan, MAX_STEPS) else {
        return;
    };
    // The cluster size, for the refcount cache budget (a guess if the header is bad).
    let cs = Layout::parse(bytes, true).map_or(65536, |l| l.geo.cluster_size());
    let config = plan.knobs.config(cs, plan.read_only);
    // The image's own state: consistent ones are held to a model.
    let mut clean: Option<(u64, Model)> = None;
    let probe = plan.knobs.config(cs, true);
    if !plan.read_only && plan.fault.is_none() {
        if let Ok((mut m, info)) = Mem::open(bytes, probe, plan.knobs.seed) {
            let report = m.run1(Request::Check { repair: None }, None);
            if let Some(r) = check_report(&report) {
                if r.corruptions == 0 && r.check_errors == 0 && info.size <= MAX_MODEL_SIZE {
                    clean = load(&mut m, info.size).map(|model| (r.leaks, model));
                }
            }
        }
    }
    let Ok((mut m, info)) = Mem::open(bytes, config, plan.knobs.seed) else {
        return;
    };
    let cs = info.cluster_size;
    let discard_keeps = info.version < 3 && info.backing_file.is_some();
    if let Some((at, enospc)) = plan.fault {
        m.fail_at(u64::from(at), if enospc { IoError::ENOSPC } else { 5 });
    }
    let mut size = info.size;
    let mut model = clean.as_ref().map(|(_, model)| model.clone());
    let mut items = &items[..];
    while !items.is_empty() {
        let batch = next_batch(&mut items, size, model.is_some());
        let steps: Vec<(Request, Option<Vec<u8>>)> = batch
            .iter()
            .filter_map(|&s| request(s, size, model.is_some()))
            .collect();
        let requests: Vec<Request> = steps.iter().map(|(r, _)| *r).collect();
        let results = m.run(steps);
        let mut closed = false;
        for (request, (result, buf)) in requests.into_iter().zip(results) {
            if let Some(model) = model.as_mut() {
                apply_to_model(model, request, &result, buf.as_deref(), cs, discard_keeps);
            }
            match (request, result) {
                (Request::Resize { size: s, .. }, Ok(_)) => size = s,
                (Request::Close, Ok(_)) => closed = true,
                _ => {}
            }
        }
        if closed {
            m.settle();
            let info;
            (m, info) = match m.reopen(config, plan.knobs.seed ^ 1) {
                Ok(x) => x,
                Err(e) => {
                    assert!(model.is_none(), "reopening a consistent image failed: {e}");
                    return;
                }
            };
            // (Not after an injected error: a failed resize may have landed.)
            if model.is_some() && info.size != size {
                panic!("the size was {size} before the reopen, {} after", info.size);
            }
            size = info.size;
        }
    }
    // Snapshot operations and bitmap reads on whatever the image holds: typed results only;
    // none of them changes what the guest reads.
    if let Some(info) = m.engine.info().cloned() {
        let mut merged = None;
        for b in &info.bitmaps {
            if let Ok(Outcome::Bitmap(d)) = m.run_method(|e| e.read_bitmap(&b.name)) {
                merged = Some(d);
            }
        }
        // Bitmap edits, stored (over whatever directory the image has) at the close.
        if plan.finish & 16 != 0 {
            let g = 512u64 << ((plan.finish >> 5) % 8);
            let _ = m.engine.bitmap_add("fuzz", g, plan.finish & 32 != 0);
            if let Some(first) = info.bitmaps.first() {
                let _ = m.engine.bitmap_clear(&first.name);
                let _ = m.engine.bitmap_enable(&first.name, plan.finish & 64 != 0);
            }
            if let Some(d) = merged {
                let _ = m.engine.bitmap_merge("fuzz", &d);
            }
            if let Some(last) = info.bitmaps.last().filter(|_| plan.finish & 128 != 0) {
                let _ = m.engine.bitmap_remove(&last.name);
            }
        }
        let snapshot = |e: &mut Image, kind: u8| match kind {
            0 => e.snapshot_create("fuzz", (0, 0), 0),
            1 => e.snapshot_apply(qcow2_proto::SnapshotRef::Name("fuzz".into())),
            _ => e.snapshot_delete(qcow2_proto::SnapshotRef::Name("fuzz".into())),
        };
        match plan.finish / 4 % 4 {
            0 => {}
            ops => {
                let created = m.run_method(|e| snapshot(e, 0)).is_ok();
                if created && ops > 1 {
                    let _ = m.run_method(|e| snapshot(e, ops - 1));
                }
            }
        }
    }
    let repair = match plan.finish % 4 {
        2 => Some(qcow2_proto::Repair::Leaks),
        3 => Some(qcow2_proto::Repair::All),
        _ => None,
    };
    if plan.finish % 4 != 0 && model.is_none() {
        let _ = m.run1(Request::Check { repair }, None);
    }
    let closed = m.run1(Request::Close, None);
    m.settle();
    let (Some((leaks_before, _)), Some(model)) = (clean, model) else {
        return;
    };
    assert!(
        closed.0.is_ok(),
        "closing a consistent image failed: {closed:?}"
    );
    let mut config = ImageConfig::new(0);
    config.read_only = true;
    let (mut m, info) = m
        .reopen(config, 3)
        .unwrap_or_else(|e| panic!("a consistent image does not open after the script: {e}"));
    let report = m.run1(Request::Check { repair: None }, None);
    let r = check_report(&report)
        .unwrap_or_else(|| panic!("check after the script failed: {:?}", report.0));
    // A check compares refcounts only up to the end of the file (as QEMU's does), so
    // refcounts the image held for clusters past its end are leaks nobody sees until the
    // file grows over them (the allocator rightly skips those clusters). Count them as the
    // starting image's own: its leaks over the final file's extent.
    let leaks_before = if r.leaks > 0 && leaks_before == 0 {
        leaks_over(bytes, m.file.len, probe, plan.knobs.seed)
    } else {
        leaks_before
    };
    assert!(
        r.corruptions == 0 && r.check_errors == 0 && (leaks_before > 0 || r.leaks == 0),
        "a consistent image (leaks: {leaks_before}) is not after the script: {r:?}"
    );
    assert_eq!(info.size, model.len(), "virtual size after the script");
    if let Err(e) = compare(&mut m, &model) {
        panic!("after the script and a reopen: {e}");
    }
}

/// The leaks a check finds in the image `bytes` with its file extended by zeros to `len`
/// bytes (opened with `config`, read-only): what a check of the untouched image sees
/// over that extent. (Only asked of images that checked clean, so every reference lies
/// inside `bytes`.)
fn leaks_over(bytes: &[u8], len: u64, config: ImageConfig, seed: u64) -> u64 {
    let mut padded = bytes.to_vec();
    padded.resize(
        usize::try_from(len).map_or(bytes.len(), |n| n.max(bytes.len())),
        0,
    );
    let (mut m, _) = Mem::open(&padded, config, seed)
        .unwrap_or_else(|e| panic!("the starting image, extended, does not open: {e}"));
    let report = m.run1(Request::Check { repair: None }, None);
    check_report(&report).map_or(0, |r| r.leaks)
}

/// Where `got` differs from `want` (`base` is the guest offset of both), if it does; the
/// comparison itself is a plain `==` (uninstrumented, fast).
fn differs(got: &[u8], want: &[u8], base: u64) -> Option<String> {
    if got == want {
        None
    } else {
        first_difference(got, want, base)
    }
}

/// Reads the whole disk into a model; `None` if a read fails (an image the engine cannot
/// read data from: encrypted, with a backing file, ...).
fn load(m: &mut Mem, size: u64) -> Option<Model> {
    let mut model = Model::new(size);
    let mut at = 0;
    while at < size {
        let n = (size - at).min(1 << 20);
        match m.run1(
            Request::Read { offset: at, len: n },
            Some(vec![0; n as usize]),
        ) {
            (Ok(_), Some(buf)) => model.write(at, &buf),
            _ => return None,
        }
        at += n;
    }
    Some(model)
}

/// Compares the disk with the model: all of it up to 8 MiB; beyond, every model page that
/// was written, its neighbours, and the first and last pages.
fn compare(m: &mut Mem, model: &Model) -> Result<(), String> {
    let size = model.len();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    if size <= 8 << 20 {
        ranges.extend(
            (0..size)
                .step_by(1 << 20)
                .map(|at| (at, (size - at).min(1 << 20))),
        );
    } else {
        let pages = model.touched().map(|(start, _)| start / PAGE);
        let mut wanted: Vec<u64> = pages
            .flat_map(|p| [p.saturating_sub(1), p, p + 1])
            .collect();
        wanted.extend([0, (size - 1) / PAGE]);
        wanted.sort_unstable();
        wanted.dedup();
        ranges.extend(
            wanted
                .into_iter()
                .map(|p| p * PAGE)
                .filter(|&at| at < size)
                .map(|at| (at, (size - at).min(PAGE))),
        );
    }
    for (at, n) in ranges {
        let (result, buf) = m.run1(
            Request::Read { offset: at, len: n },
            Some(vec![0; n as usize]),
        );
        result.map_err(|e| format!("read at {at:#x}+{n:#x} failed: {e}"))?;
        let got = buf.expect("the read buffer");
        let mut want = vec![0; n as usize];
        model.read(at, &mut want);
        if let Some(d) = differs(&got, &want, at) {
            return Err(d);
        }
    }
    Ok(())
}

/// Checks a finished request against the model and applies it. Requests of one batch never
/// conflict (see [`next_batch`]), so their order does not matter.
///
/// # Panics
/// If a request failed or a read differs from the model.
fn apply_to_model(
    model: &mut Model,
    request: Request,
    result: &Result<Outcome, RequestError>,
    buf: Option<&[u8]>,
    cluster: u64,
    discard_keeps: bool,
) {
    if let Err(e) = result {
        // Resizes may be refused (snapshots, bitmaps, limits); nothing else may fail.
        assert!(
            matches!(request, Request::Resize { .. }),
            "{request:?} failed: {e}"
        );
        return;
    }
    match request {
        Request::Read { offset, len } => {
            let got = buf.expect("the read buffer");
            let mut want = vec![0; len as usize];
            model.read(offset, &mut want);
            if let Some(d) = differs(got, &want, offset) {
                panic!("{request:?} differs from the model: {d}");
            }
        }
        Request::Write { offset, .. } => model.write(offset, buf.expect("the write buffer")),
        Request::WriteZeroes { offset, len, .. } => model.zero(offset, len),
        // (A v2 image over a backing file keeps discarded data: it has no zero flag.)
        Request::Discard { .. } if discard_keeps => {}
        Request::Discard { offset, len } => model.discard(offset, len, cluster),
        Request::Resize { size, .. } => model.resize(size),
        Request::Check { .. } => {
            if let Ok(Outcome::Check(r)) = result {
                assert!(
                    r.corruptions == 0 && r.check_errors == 0,
                    "a check during the script found problems: {r:?}"
                );
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------
// script
// ---------------------------------------------------------------------------------------

/// How the [`script`] target creates its image.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct Shape {
    v2: bool,
    cluster_bits: u8,
    refcount_order: u8,
    lazy_refcounts: bool,
    preallocation: u8,
    /// Virtual size (see [`virtual_size`]).
    sectors: u32,
}

impl Shape {
    fn options(self) -> CreateOptions {
        // 64 KiB to 64 MiB, each power of two as likely, plus a few sectors.
        let size =
            ((64u64 << 10) << (self.sectors % 11)) + u64::from(self.sectors >> 4) % 128 * 512;
        let size = size.min(MAX_VIRTUAL);
        let mut o = CreateOptions::new(size);
        o.version = if self.v2 { 2 } else { 3 };
        // 512 B to 64 KiB, and now and then 2 MiB.
        o.cluster_size = if self.cluster_bits == 0xff {
            2 << 20
        } else {
            512 << (self.cluster_bits % 8)
        };
        if !self.v2 {
            o.refcount_bits = 1 << (self.refcount_order % 7);
            o.lazy_refcounts = self.lazy_refcounts;
            // Half the images with clusters of 16 KiB or more get subclusters.
            o.extended_l2 = o.cluster_size >= 16384 && self.sectors & 1 == 1;
        }
        // Preallocation on small disks only (it writes every cluster).
        if size <= 4 << 20 {
            o.preallocation = match self.preallocation % 8 {
                1 => Preallocation::Metadata,
                2 => Preallocation::Falloc,
                3 => Preallocation::Full,
                _ => Preallocation::Off,
            };
        }
        o
    }
}

/// The [`script`] target's input: these fields, then [`Item`]s decoded from every byte left
/// (at most [`MAX_STEPS`]).
#[derive(Arbitrary, Debug)]
pub struct ScriptPlan {
    layout: Shape,
    knobs: Knobs,
}

/// Fuzz target `script`: a request script (batches of non-conflicting requests) on a fresh
/// image, compared with the byte [`Model`]: every request succeeds, every read returns the
/// model's bytes, every check is clean; after a clean close the image checks without
/// corruption or leak and reads back as the model.
pub fn script(data: &[u8]) {
    let Some((plan, items)) = decode::<ScriptPlan>(data, MAX_STEPS) else {
        return;
    };
    let options = plan.layout.options();
    let cs = u64::from(options.cluster_size);
    let config = plan.knobs.config(cs, false);
    let (mut m, info) = Mem::create(options.clone(), config, plan.knobs.seed)
        .unwrap_or_else(|e| panic!("create {options:?} failed: {e}"));
    let mut model = Model::new(info.size);
    let mut items = &items[..];
    while !items.is_empty() {
        let size = model.len();
        let batch = next_batch(&mut items, size, true);
        let steps: Vec<(Request, Option<Vec<u8>>)> = batch
            .iter()
            .filter_map(|&s| request(s, size, true))
            .collect();
        let requests: Vec<Request> = steps.iter().map(|(r, _)| *r).collect();
        let results = m.run(steps);
        let mut closed = false;
        for (request, (result, buf)) in requests.into_iter().zip(results) {
            if let (Request::Resize { size, .. }, Err(e)) = (request, &result) {
                panic!("resize to {size} failed: {e}");
            }
            apply_to_model(&mut model, request, &result, buf.as_deref(), cs, false);
            closed |= request == Request::Close;
        }
        if closed {
            m.settle();
            let (again, info) = m
                .reopen(config, plan.knobs.seed ^ 1)
                .unwrap_or_else(|e| panic!("reopen failed: {e}"));
            assert_eq!(info.size, model.len(), "virtual size after a reopen");
            m = again;
        }
    }
    let (closed, _) = m.run1(Request::Close, None);
    closed.unwrap_or_else(|e| panic!("close failed: {e}"));
    m.settle();
    let mut config = ImageConfig::new(0);
    config.read_only = true;
    let (mut m, info) = m
        .reopen(config, 3)
        .unwrap_or_else(|e| panic!("the image does not open after the script: {e}"));
    let report = m.run1(Request::Check { repair: None }, None);
    let r = check_report(&report)
        .unwrap_or_else(|| panic!("check after the script failed: {:?}", report.0));
    assert!(
        r.corruptions == 0 && r.check_errors == 0 && r.leaks == 0,
        "check after a clean close: {r:?}"
    );
    assert_eq!(info.size, model.len(), "virtual size after the script");
    if let Err(e) = compare(&mut m, &model) {
        panic!("after the script and a reopen: {e}");
    }
}

// ---------------------------------------------------------------------------------------
// crash
// ---------------------------------------------------------------------------------------

/// The [`crash`] target's input: these fields, then [`Item`]s decoded from every byte left
/// (at most 24; batching is ignored, the simulator runs one request at a time).
#[derive(Arbitrary, Debug)]
pub struct CrashPlan {
    v2: bool,
    /// 512 B, 4 KiB or 64 KiB clusters.
    cluster: u8,
    write_through: bool,
    lazy_refcounts: bool,
    /// Virtual size at the start (see [`crash_size`]).
    sectors: u16,
    /// Seeds the completion order.
    seed: u64,
    /// The op completion after which the crash happens (at the end when the script takes
    /// fewer).
    crash_at: u16,
    /// Seeds which unflushed writes survive the crash.
    crash_seed: u64,
}

/// Fuzz target `crash`: a request script on the crash simulator with one crash point: after
/// the chosen op completion the disk keeps its durable image plus a random subset of the
/// unflushed writes. The crashed image must open (repaired first if lazy refcounts left it
/// dirty), check without corruption, and every guest sector must hold a content the
/// [`Oracle`] allows.
pub fn crash(data: &[u8]) {
    let Some((plan, items)) = decode::<CrashPlan>(data, CRASH_STEPS) else {
        return;
    };
    let cs = [512u64, 4096, 65536][usize::from(plan.cluster % 3)];
    let start = crash_size(u32::from(plan.sectors));
    let mut create = CreateOptions::new(start);
    create.version = if plan.v2 { 2 } else { 3 };
    create.cluster_size = cs as u32;
    create.lazy_refcounts = plan.lazy_refcounts && !plan.v2;
    let mut config = ImageConfig::new(0);
    if plan.write_through {
        config.cache_mode = CacheMode::WriteThrough;
    }
    let (mut sim, _) = Sim::create(create.clone(), config, plan.seed)
        .unwrap_or_else(|e| panic!("create {create:?}: {e}"));
    let mut oracle = Oracle::new(start, CRASH_MAX);
    let mut rng = Rng::new(plan.crash_seed);
    let crash_at = u64::from(plan.crash_at);
    let mut seen = 0u64;
    let mut problem: Option<String> = None;
    let mut crashed = false;
    for (step, item) in items.iter().enumerate() {
        let Some((request, buf)) = prepare(item.step, &mut oracle, cs) else {
            continue;
        };
        let frozen = &oracle;
        let mut boundary = |d: &SimDisk| {
            if seen == crash_at {
                problem = verify(d.crash(&mut rng), frozen);
                crashed = true;
            }
            seen += 1;
        };
        let (result, buf) = sim
            .run(request, buf, &mut boundary)
            .unwrap_or_else(|e| panic!("step {step} {request:?}: {e}"));
        if let Some(p) = problem.take() {
            panic!("crash after completion {crash_at}, during step {step} {request:?}: {p}");
        }
        if crashed {
            return;
        }
        if let Err(e) = result {
            panic!("step {step} {request:?} failed: {e}");
        }
        if let (Request::Read { offset, len }, Some(got)) = (request, &buf) {
            if let Some(d) = differs(got, oracle.current(offset, len as usize), offset) {
                panic!("step {step} {request:?} differs from the model: {d}");
            }
        }
        match request {
            Request::Flush | Request::Close => oracle.flushed(),
            Request::Write { offset, len } | Request::WriteZeroes { offset, len, .. }
                if plan.write_through =>
            {
                oracle.settled(offset, len)
            }
            _ => {}
        }
        if request == Request::Close {
            let disk = std::mem::take(&mut sim.disk);
            sim = Sim::open(disk, config, plan.seed ^ step as u64)
                .unwrap_or_else(|e| panic!("reopen after step {step}: {e}"))
                .0;
        }
    }
    // The script ended before the crash point: crash now.
    if let Some(p) = verify(sim.disk.crash(&mut rng), &oracle) {
        panic!("crash after the script: {p}");
    }
}

/// The request for `step`, with its buffer, after telling the oracle what it may change;
/// `None` when the step falls outside the disk.
fn prepare(step: Step, oracle: &mut Oracle, cs: u64) -> Option<(Request, Option<Vec<u8>>)> {
    let size = oracle.len();
    let range = step.range(size);
    Some(match step {
        Step::Write(_, _, seed) => {
            let (offset, len) = range?;
            let data = pattern(u32::from(seed), offset, len as usize);
            oracle.write(offset, &data);
            (Request::Write { offset, len }, Some(data))
        }
        Step::Read(..) => {
            let (offset, len) = range?;
            (Request::Read { offset, len }, Some(vec![0; len as usize]))
        }
        Step::Zeroes(_, _, unmap) => {
            let (offset, len) = range?;
            oracle.zero(offset, len);
            (Request::WriteZeroes { offset, len, unmap }, None)
        }
        Step::Discard(..) => {
            let (offset, len) = range?;
            oracle.discard(offset, len, cs);
            (Request::Discard { offset, len }, None)
        }
        Step::Status(..) => {
            let (offset, len) = range?;
            (Request::BlockStatus { offset, len }, None)
        }
        Step::Flush => (Request::Flush, None),
        Step::Check => (Request::Check { repair: None }, None),
        Step::Reopen => (Request::Close, None),
        Step::Resize(raw) => {
            let size = crash_size(raw);
            oracle.resize(size);
            (Request::Resize { size, shrink: true }, None)
        }
    })
}

/// Opens a crashed image and compares it with the oracle: the problem, if any (the crash
/// simulator's own check).
fn verify(img: Vec<u8>, oracle: &Oracle) -> Option<String> {
    crate::sim::verify(img, oracle, 7, CRASH_MAX).0
}
