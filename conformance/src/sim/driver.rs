//! The engine driven directly over a [`SimDisk`]: every op the engine yields waits in a
//! pending set, and ops complete one at a time in a seeded random order (the contract lets
//! them run concurrently, in any order). After each completion the caller's `boundary`
//! callback sees the disk: that is where the crash simulator takes its crash points.
//!
//! An op takes effect when it completes. A flush makes durable what completed before it was
//! *issued* (`fdatasync`'s promise), not what completed while it was in flight.

use std::collections::HashMap;

use qcow2_proto::{
    CreateOptions, Event, Image, ImageConfig, ImageInfo, IoError, IoKind, IoOp, OpenError, Outcome,
    ReqId, Request, RequestError, Segment, Target,
};

use super::disk::SimDisk;
use super::rng::Rng;
use crate::model::{synthetic_backing, SYNTHETIC_BACKING_LEN};

/// Where an injected fault strikes: the `at`-th op completion (counting from 0) fails.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Fault {
    /// Which completion fails.
    pub at: u64,
    /// The OS error it fails with.
    pub errno: i32,
    /// How a write fails (other ops just fail).
    pub kind: FaultKind,
}

/// How a faulty write behaves.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum FaultKind {
    /// Nothing is written; the op fails with the error.
    Fail,
    /// A random whole-sector prefix is written, then the op fails with the error (a disk
    /// filling up mid-write).
    Torn,
    /// A random whole-sector prefix is written and reported as a success with that short
    /// count (a runtime that did not resubmit): the engine must not take it for complete.
    Short,
}

/// An engine over a simulated disk.
pub struct Sim {
    /// The engine.
    pub engine: Image,
    /// The host file.
    pub disk: SimDisk,
    /// Ops issued and not completed, each with the disk's log mark when it was issued.
    pending: Vec<(IoOp, u64)>,
    bufs: HashMap<ReqId, Vec<u8>>,
    rng: Rng,
    /// Op completions so far.
    pub completions: u64,
    /// Bytes read from the backing file so far.
    pub backing_reads: u64,
    /// The fault to inject, if any.
    pub fault: Option<Fault>,
    /// Print every completion (`QCOW2_SIM_TRACE=1`).
    trace: bool,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("pending", &self.pending.len())
            .field("completions", &self.completions)
            .finish_non_exhaustive()
    }
}

/// A failure of the simulation itself (not of a request).
pub type SimResult<T> = Result<T, String>;

/// A request's result and its guest buffer back.
pub type Ran = (Result<Outcome, RequestError>, Option<Vec<u8>>);

impl Sim {
    /// Opens the image in `disk` with `config` (its `file_len` is set from the disk).
    pub fn open(disk: SimDisk, mut config: ImageConfig, seed: u64) -> SimResult<(Self, ImageInfo)> {
        config.file_len = disk.current().len() as u64;
        Self::start(Image::open(config), disk, seed)
    }

    /// Opens internal snapshot `which` of the image in `disk`, read-only.
    pub fn open_snapshot(
        disk: SimDisk,
        mut config: ImageConfig,
        which: qcow2_proto::SnapshotRef,
        seed: u64,
    ) -> SimResult<(Self, ImageInfo)> {
        config.file_len = disk.current().len() as u64;
        Self::start(Image::open_snapshot(config, which), disk, seed)
    }

    /// Creates an image in an empty disk.
    pub fn create(
        options: CreateOptions,
        config: ImageConfig,
        seed: u64,
    ) -> SimResult<(Self, ImageInfo)> {
        Self::start(Image::create(config, options), SimDisk::default(), seed)
    }

    fn start(engine: Image, disk: SimDisk, seed: u64) -> SimResult<(Self, ImageInfo)> {
        let mut sim = Self {
            engine,
            disk,
            pending: Vec::new(),
            bufs: HashMap::new(),
            rng: Rng::new(seed),
            completions: 0,
            backing_reads: 0,
            fault: None,
            trace: std::env::var_os("QCOW2_SIM_TRACE").is_some(),
        };
        loop {
            while let Some(op) = sim.engine.poll_io() {
                sim.pending.push((op, sim.disk.mark()));
            }
            let mut attached = false;
            while let Some(ev) = sim.engine.poll_event() {
                match ev {
                    Event::Opened(info) => return Ok((sim, *info)),
                    Event::OpenFailed(e) => return Err(open_failed(e)),
                    // Whatever it names, the backing file is the synthetic raw one.
                    Event::OpenBacking { depth, .. } => {
                        sim.engine.attach_backing(depth, SYNTHETIC_BACKING_LEN);
                        attached = true;
                    }
                    // (The simulator makes no data-file images; a named one is attached
                    // empty so that opening cannot stall.)
                    Event::OpenDataFile { .. } => {
                        sim.engine.attach_data_file(0);
                        attached = true;
                    }
                    _ => {}
                }
            }
            if attached {
                continue;
            }
            if !sim.step(&mut |_| {}) {
                return Err("the engine stalled while opening".into());
            }
        }
    }

    /// Runs one request to its end, completing ops in random order and calling `boundary`
    /// after each completion. `buf` is the guest buffer (read into or written from).
    pub fn run(
        &mut self,
        request: Request,
        buf: Option<Vec<u8>>,
        boundary: &mut dyn FnMut(&SimDisk),
    ) -> SimResult<Ran> {
        self.run_with(
            &format!("{request:?}"),
            |e| e.submit(request),
            buf,
            boundary,
        )
    }

    /// [`run`](Self::run) for any request the engine takes through a method of its own
    /// (`what` names it in errors).
    pub fn run_with(
        &mut self,
        what: &str,
        submit: impl FnOnce(&mut Image) -> Result<ReqId, qcow2_proto::SubmitError>,
        buf: Option<Vec<u8>>,
        boundary: &mut dyn FnMut(&SimDisk),
    ) -> SimResult<Ran> {
        let id = match submit(&mut self.engine) {
            Ok(id) => id,
            Err(qcow2_proto::SubmitError::Refused(e)) => return Ok((Err(e), buf)),
            Err(e) => return Err(format!("submit failed: {e}")),
        };
        if let Some(b) = buf {
            self.bufs.insert(id, b);
        }
        loop {
            while let Some(op) = self.engine.poll_io() {
                self.pending.push((op, self.disk.mark()));
            }
            while let Some(ev) = self.engine.poll_event() {
                if let Event::Done { req, result } = ev {
                    if req == id {
                        return Ok((result, self.bufs.remove(&id)));
                    }
                }
            }
            if !self.step(boundary) {
                return Err(format!("the engine stalled running {what}"));
            }
        }
    }

    /// Runs `requests` concurrently, in submission order: the first `at_once` before any
    /// op completes, the rest one by one, each after a random number of op completions (as
    /// a guest queue refills). Ops complete in random order, calling `boundary` after each,
    /// until every request is done. Returns each request's result and buffer, in order.
    ///
    /// `done(i, before)` is called as request `i` is seen done (before the next op
    /// completes), with `before` the requests of the batch seen done before `i` was
    /// submitted: what a flush `i` must have made durable.
    pub fn run_batch(
        &mut self,
        requests: Vec<(Request, Option<Vec<u8>>)>,
        at_once: usize,
        boundary: &mut dyn FnMut(&SimDisk),
        done: &mut dyn FnMut(usize, &[usize]),
    ) -> SimResult<Vec<Ran>> {
        let mut batch = Batch::new(requests.len());
        let mut queue = requests.into_iter().enumerate().peekable();
        let mut submitted = 0;
        loop {
            while queue.peek().is_some()
                && (submitted < at_once || self.pending.is_empty() || self.rng.below(2) == 0)
            {
                // (First: a finished request's id may be given out again.)
                batch.collect(self, done);
                let (i, (request, buf)) = queue.next().expect("peeked");
                batch.seen_at_submit[i] = batch.finished.len();
                let id = self
                    .engine
                    .submit(request)
                    .map_err(|e| format!("submit of {request:?} failed: {e}"))?;
                if let Some(b) = buf {
                    self.bufs.insert(id, b);
                }
                batch.live.insert(id, i);
                submitted += 1;
                if submitted >= at_once {
                    break;
                }
            }
            while let Some(op) = self.engine.poll_io() {
                self.pending.push((op, self.disk.mark()));
            }
            batch.collect(self, done);
            if queue.peek().is_none() && batch.live.is_empty() {
                return Ok(batch
                    .results
                    .into_iter()
                    .map(|r| r.expect("done"))
                    .collect());
            }
            // (Nothing to complete, say after a flush with nothing to write back: the next
            // request goes in.)
            if self.pending.is_empty() && queue.peek().is_some() {
                continue;
            }
            if !self.step(boundary) {
                return Err("the engine stalled running a batch".into());
            }
        }
    }

    /// Completes every op still pending (write-back the engine started on its own).
    pub fn settle(&mut self, boundary: &mut dyn FnMut(&SimDisk)) {
        loop {
            while let Some(op) = self.engine.poll_io() {
                self.pending.push((op, self.disk.mark()));
            }
            while self.engine.poll_event().is_some() {}
            if !self.step(boundary) {
                return;
            }
        }
    }

    /// Completes one random pending op; `false` when none is pending.
    fn step(&mut self, boundary: &mut dyn FnMut(&SimDisk)) -> bool {
        if self.pending.is_empty() {
            return false;
        }
        let i = self.rng.below(self.pending.len() as u64) as usize;
        let (mut op, mark) = self.pending.swap_remove(i);
        if self.trace {
            self.trace_op(&op);
        }
        let result = match self.fault {
            Some(f) if f.at == self.completions && op.kind != IoKind::ZeroFill => {
                let error = IoError {
                    kind: std::io::Error::from_raw_os_error(f.errno).kind(),
                    raw_os_error: Some(f.errno),
                };
                match (f.kind, op.kind) {
                    (FaultKind::Torn, IoKind::Write) => {
                        self.write_prefix(&op);
                        Err(error)
                    }
                    (FaultKind::Short, IoKind::Write) if op.len() > 512 => {
                        Ok(self.write_prefix(&op))
                    }
                    _ => Err(error),
                }
            }
            _ => Ok(self.execute(&mut op, mark)),
        };
        self.completions += 1;
        self.engine.complete(op, result);
        boundary(&self.disk);
        true
    }

    fn trace_op(&self, op: &IoOp) {
        let fails = self.fault.is_some_and(|f| f.at == self.completions);
        let segs: Vec<String> = op
            .segments
            .iter()
            .map(|s| match s {
                Segment::Guest { req, start, len } => format!("guest {req:?} @{start}+{len}"),
                other => format!("{}", other.len()),
            })
            .collect();
        eprintln!(
            "completion {}{}: {:?} at {} {segs:?} ({} more pending)",
            self.completions,
            if fails { " (fails)" } else { "" },
            op.kind,
            op.offset,
            self.pending.len()
        );
    }

    /// The bytes write `op` carries.
    fn write_data(&self, op: &IoOp) -> Vec<u8> {
        let mut data = Vec::with_capacity(op.len() as usize);
        for seg in op.segments.iter() {
            match seg {
                Segment::Guest { req, start, len } => {
                    data.extend_from_slice(&self.bufs[req][*start..*start + *len])
                }
                Segment::Buf(b) => data.extend_from_slice(b.as_slice()),
                Segment::Zeroes(n) => data.resize(data.len() + n, 0),
                _ => unreachable!("unknown segment"),
            }
        }
        data
    }

    /// Writes a random prefix of write `op` that ends on a sector boundary of the disk
    /// (where a real disk tears) before the op's end; returns its length.
    fn write_prefix(&mut self, op: &IoOp) -> usize {
        let data = self.write_data(op);
        let end = op.offset + data.len() as u64;
        let first = op.offset / 512 + 1;
        let boundaries = (end.saturating_sub(1) / 512 + 1).saturating_sub(first);
        let n = match self.rng.below(boundaries + 1) {
            0 => 0,
            k => ((first + k - 1) * 512 - op.offset) as usize,
        };
        self.disk.write(op.offset, &data[..n]);
        n
    }

    /// Performs `op`, issued when the disk's log stood at `mark`.
    fn execute(&mut self, op: &mut IoOp, mark: u64) -> usize {
        let mut pos = op.offset;
        if let Target::Backing(depth) = op.target {
            if op.kind == IoKind::Read {
                self.backing_reads += op.len();
            }
            // The synthetic backing file: read-only, always durable.
            for seg in op.segments.iter_mut() {
                let n = seg.len();
                let out: &mut [u8] = match seg {
                    Segment::Guest { req, start, len } => {
                        let buf = self.bufs.get_mut(req).expect("guest buffer");
                        &mut buf[*start..*start + *len]
                    }
                    Segment::Buf(b) => b.as_mut_slice(),
                    _ => &mut [],
                };
                if op.kind == IoKind::ZeroFill {
                    out.fill(0);
                } else {
                    synthetic_backing(depth, pos, out);
                }
                pos += n as u64;
            }
            return op.len() as usize;
        }
        match op.kind {
            IoKind::Read => {
                let mut total = 0;
                for seg in op.segments.iter_mut() {
                    let n = seg.len();
                    total += match seg {
                        Segment::Guest { req, start, len } => {
                            let buf = self.bufs.get_mut(req).expect("guest buffer");
                            self.disk.read(pos, &mut buf[*start..*start + *len])
                        }
                        Segment::Buf(b) => self.disk.read(pos, b.as_mut_slice()),
                        _ => n,
                    };
                    pos += n as u64;
                }
                total
            }
            IoKind::Write => {
                let data = self.write_data(op);
                self.disk.write(op.offset, &data);
                data.len()
            }
            IoKind::Compress { .. } => {
                let input = match op.segments.first() {
                    Some(&Segment::Guest { req, start, len }) => {
                        self.bufs[&req][start..start + len].to_vec()
                    }
                    _ => Vec::new(),
                };
                qcow2_proto::compress_op(op, &input).expect("the engine's compress ops are valid")
            }
            IoKind::Decompress { .. } => {
                let out = match op.segments.last() {
                    Some(&Segment::Guest { req, start, len }) => {
                        let buf = self.bufs.get_mut(&req).expect("guest buffer");
                        Some(&mut buf[start..start + len])
                    }
                    _ => None,
                };
                qcow2_proto::decompress_op(op, out)
                    .expect("simulated images hold only streams the codec made")
            }
            IoKind::ZeroFill => {
                for seg in op.segments.iter_mut() {
                    match seg {
                        Segment::Guest { req, start, len } => {
                            let buf = self.bufs.get_mut(req).expect("guest buffer");
                            buf[*start..*start + *len].fill(0);
                        }
                        Segment::Buf(b) => b.as_mut_slice().fill(0),
                        _ => {}
                    }
                }
                op.len() as usize
            }
            IoKind::Flush => {
                self.disk.flush(mark);
                0
            }
            IoKind::SetLen => {
                self.disk.set_len(op.offset);
                0
            }
            IoKind::PunchHole { len } => {
                self.disk.zero(op.offset, len, false);
                0
            }
            IoKind::WriteZeroes { len } => {
                self.disk.zero(op.offset, len, true);
                0
            }
            IoKind::Allocate { len } => {
                self.disk.allocate(op.offset + len);
                0
            }
            _ => 0,
        }
    }
}

/// A batch's requests in flight and done ([`Sim::run_batch`]).
struct Batch {
    /// Requests in flight by id (ids are reused once a request is done).
    live: HashMap<ReqId, usize>,
    results: Vec<Option<Ran>>,
    /// The requests seen done, in order.
    finished: Vec<usize>,
    /// How many were seen done when each request was submitted.
    seen_at_submit: Vec<usize>,
}

impl Batch {
    fn new(total: usize) -> Self {
        Self {
            live: HashMap::new(),
            results: (0..total).map(|_| None).collect(),
            finished: Vec::with_capacity(total),
            seen_at_submit: vec![0; total],
        }
    }

    /// Takes the results of the requests the engine finished, telling `done` of each.
    fn collect(&mut self, sim: &mut Sim, done: &mut dyn FnMut(usize, &[usize])) {
        while let Some(ev) = sim.engine.poll_event() {
            if let Event::Done { req, result } = ev {
                if let Some(i) = self.live.remove(&req) {
                    self.results[i] = Some((result, sim.bufs.remove(&req)));
                    done(i, &self.finished[..self.seen_at_submit[i]]);
                    self.finished.push(i);
                }
            }
        }
    }
}

fn open_failed(e: OpenError) -> String {
    format!("open failed: {e}")
}
