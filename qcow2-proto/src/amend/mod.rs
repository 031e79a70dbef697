//! `qemu-img amend` for qcow2: compat upgrade and downgrade, lazy refcounts on and off, and
//! a new refcount width, in QEMU's order (upgrade, lazy refcounts, refcount width,
//! downgrade). Each step is atomic; an amend of several options passes through the formats
//! of that order (an upgrade takes lazy refcounts along in its header write, and a
//! downgrade drops them in its own).
//!
//! `Amender` is a sans-IO machine with one op outstanding at a time, run by the engine
//! (like the checker) once everything before it is durable; the engine reads its metadata
//! again afterwards. Every refusal is decided before the first write. Each change is crash
//! safe on its own:
//!
//! * a header change writes the bytes past the first sector (if any) and flushes before the
//!   first sector switches (one sector write), then flushes again;
//! * a refcount width change is a reorder pass of the checker (see `check::reorder`): new
//!   structures first, one header write switches them in;
//! * a downgrade first expands zero clusters (zeroes written and flushed before an entry
//!   drops its zero flag; an unallocated zero cluster of an image without a backing file
//!   simply becomes unallocated, which reads the same; one over a backing file gets a new
//!   cluster of zeroes, counted by a new refcount structure switched in before any entry
//!   points at it), then writes the version 2 header.

mod plan;
mod zeroes;

use std::collections::VecDeque;

use crate::check::pass::{Pass, Req, Step};
use crate::check::serial::{OpResult, Serial};
use crate::error::{AmendError, RequestError};
use crate::format::Layout;
use crate::info::SnapshotInfo;
use crate::io::{IoError, IoOp};

use zeroes::Scan;

/// What to change, as `qemu-img amend -o` names it; `None` leaves a setting as it is.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct AmendOptions {
    /// `compat`: 2 (`0.10`, `v2`) or 3 (`1.1`, `v3`).
    pub version: Option<u32>,
    /// `lazy_refcounts`.
    pub lazy_refcounts: Option<bool>,
    /// `refcount_bits`: a power of two from 1 to 64.
    pub refcount_bits: Option<u32>,
}

impl AmendOptions {
    /// Whether the options themselves are valid (before looking at an image).
    pub fn validate(&self) -> Result<(), AmendError> {
        if let Some(b) = self.refcount_bits {
            if !(1..=64).contains(&b) || !b.is_power_of_two() {
                return Err(AmendError::RefcountWidth);
            }
        }
        if let Some(v) = self.version {
            if v != 2 && v != 3 {
                return Err(AmendError::UnknownVersion(v));
            }
        }
        Ok(())
    }
}

/// What the image looks like to the amend, from the engine's open state.
#[derive(Clone, Debug)]
pub(crate) struct Image {
    /// The file's length.
    pub file_len: u64,
    /// The cluster size.
    pub cluster_size: u64,
    /// The virtual disk size.
    pub size: u64,
    /// The internal snapshots.
    pub snapshots: Vec<SnapshotInfo>,
    /// Memory for the refcount arrays of a width change.
    pub memory_limit: u64,
}

/// Where the amend is.
#[derive(Debug)]
enum Stage {
    /// Read cluster 0, then choose the next change (or refuse, the first time).
    Header,
    /// Scan the L2 tables for what a downgrade must expand.
    Scan(Box<Scan>),
    /// Perform these requests, then go on with the queued stage (or read the header
    /// again).
    Writes(VecDeque<Req>),
    /// A new refcount structure: at `order`, counting `added` `(cluster, refcount)` too.
    Recount { order: u32, added: Vec<(u64, u64)> },
    /// A refcount structure being written.
    Reorder(Box<Pass>),
    /// Over.
    Done,
}

/// The amend machine: hand its ops to a runtime, their results back, and take the result.
#[derive(Debug)]
pub(crate) struct Amender {
    opts: AmendOptions,
    img: Image,
    stage: Stage,
    /// The refusals were checked (they are, before the first write).
    validated: bool,
    /// What the downgrade scan found, applied when the downgrade comes.
    expansion: Option<Box<Scan>>,
    /// The reorder pass running is a dry one.
    dry: bool,
    /// The downgrade's scan ran.
    scanned: bool,
    /// Stages to run before the header is read again.
    then: VecDeque<Stage>,
    /// Where the outstanding write ends (the file grows to there when it succeeds).
    write_end: u64,
    ops: Serial,
    input: Option<OpResult>,
    result: Option<Result<(), RequestError>>,
}

impl Amender {
    /// An amend of `img` as `opts` says.
    pub fn new(img: Image, opts: AmendOptions) -> Self {
        Self {
            opts,
            img,
            stage: Stage::Header,
            validated: false,
            expansion: None,
            then: VecDeque::new(),
            dry: false,
            scanned: false,
            write_end: 0,
            ops: Serial::default(),
            input: None,
            result: None,
        }
    }

    /// The next op (one at a time).
    pub fn poll_io(&mut self) -> Option<IoOp> {
        if self.ops.idle() {
            self.drive();
        }
        self.ops.take()
    }

    /// The result of the op last returned by [`poll_io`](Self::poll_io).
    pub fn complete(&mut self, op: IoOp, result: Result<usize, IoError>) {
        let Some(result) = self.ops.complete(op, result) else {
            return;
        };
        if result.is_ok() {
            self.img.file_len = self.img.file_len.max(self.write_end);
        }
        self.input = Some(result);
        self.drive();
    }

    /// The outcome, once (`Ok` when every change is made).
    pub fn poll_result(&mut self) -> Option<Result<(), RequestError>> {
        if self.ops.idle() {
            self.drive();
        }
        self.result.take()
    }

    fn issue(&mut self, req: Req) {
        self.write_end = match &req {
            Req::Write { offset, data } => offset + data.len() as u64,
            _ => 0,
        };
        self.ops.set(req);
    }

    fn finish(&mut self, result: Result<(), RequestError>) {
        self.stage = Stage::Done;
        if self.result.is_none() {
            self.result = Some(result);
        }
    }

    /// Steps until an op is ready or the amend is over.
    fn drive(&mut self) {
        while !self.ops.has_ready() {
            let stage = std::mem::replace(&mut self.stage, Stage::Done);
            match stage {
                Stage::Done => return,
                Stage::Header => match self.input.take() {
                    None => {
                        self.stage = Stage::Header;
                        let len = self.img.cluster_size as usize;
                        self.issue(Req::Read { offset: 0, len });
                    }
                    Some(Err(e)) => self.finish(Err(io_error(e))),
                    Some(Ok((buf, n))) => {
                        let bytes = &buf.as_slice()[..n.min(buf.len())];
                        if let Err(e) = self.next_change(bytes) {
                            self.finish(Err(e));
                        }
                    }
                },
                Stage::Scan(mut scan) => {
                    let input = self.input.take();
                    match scan.step(input) {
                        Ok(Some(req)) => {
                            self.stage = Stage::Scan(scan);
                            self.issue(req);
                        }
                        Ok(None) => {
                            self.expansion = Some(scan);
                            self.stage = Stage::Header;
                        }
                        Err(e) => self.finish(Err(e)),
                    }
                }
                Stage::Writes(mut reqs) => {
                    if let Some(Err(e)) = self.input.take() {
                        self.finish(Err(io_error(e)));
                        continue;
                    }
                    match reqs.pop_front() {
                        Some(req) => {
                            self.stage = Stage::Writes(reqs);
                            self.issue(req);
                        }
                        None => self.stage = self.then.pop_front().unwrap_or(Stage::Header),
                    }
                }
                Stage::Recount { order, added } => {
                    let (len, limit) = (self.img.file_len, self.img.memory_limit);
                    self.stage = Stage::Reorder(Box::new(Pass::reorder(len, order, limit, added)));
                }
                Stage::Reorder(mut pass) => {
                    if let Some(input) = self.input.take() {
                        if let Err(e) = input {
                            // The pass stops at its next step; the error is ours to say.
                            self.result.get_or_insert(Err(io_error(e)));
                            pass.complete(Err(e));
                        } else {
                            pass.complete(input);
                        }
                    }
                    match pass.step() {
                        Step::Io(req) => {
                            self.stage = Stage::Reorder(pass);
                            self.issue(req);
                        }
                        Step::Done => {
                            let done = pass.result();
                            if let Some(e) = done.amend_error {
                                self.finish(Err(e.into()));
                            } else if done.failed || !done.switched && !self.dry {
                                self.finish(Err(AmendError::NeedsRepair.into()));
                            } else if self.result.is_some() {
                                self.stage = Stage::Done;
                            } else if std::mem::take(&mut self.dry) {
                                self.stage = Stage::Header;
                            } else {
                                self.stage = self.then.pop_front().unwrap_or(Stage::Header);
                            }
                        }
                    }
                }
            }
        }
    }

    /// With cluster 0 read: refuses what cannot be done (the first time), then starts the
    /// next change in QEMU's order, or ends.
    fn next_change(&mut self, cluster0: &[u8]) -> Result<(), RequestError> {
        let layout =
            Layout::parse_with(cluster0, false, false).map_err(RequestError::CheckFailed)?;
        let h = layout.header;
        let o = self.opts;
        let downgrade = o.version.is_some_and(|v| v < h.version);
        if !self.validated {
            plan::refuse(&o, &layout, &self.img)?;
            self.validated = true;
            let narrower = o.refcount_bits.is_some_and(|b| b < 1 << h.refcount_order);
            let earlier = o.version.is_some_and(|v| v > h.version)
                || o.lazy_refcounts.is_some_and(|l| l != plan::lazy(&h));
            if narrower && earlier {
                // A refcount that does not fit must refuse before the upgrade is made.
                let order = o.refcount_bits.unwrap_or(16).trailing_zeros();
                let (len, limit) = (self.img.file_len, self.img.memory_limit);
                self.dry = true;
                self.stage = Stage::Reorder(Box::new(Pass::reorder_dry(len, order, limit)));
                return Ok(());
            }
        }
        if downgrade && !self.scanned {
            self.scanned = true;
            self.stage = Stage::Scan(Box::new(Scan::new(&layout, &self.img)));
            return Ok(());
        }
        if o.version.is_some_and(|v| v > h.version) {
            // Lazy refcounts come with the upgrade, in the same header write.
            let lazy = o.lazy_refcounts == Some(true);
            let bytes = plan::relaid(cluster0, &layout, 3, lazy)?;
            self.stage = Stage::Writes(plan::header_writes(&bytes));
        } else if let Some(lazy) = o
            .lazy_refcounts
            .filter(|&l| l != plan::lazy(&h) && !downgrade)
        {
            // (A downgrade drops the bit with the rest of the version 3 header.)
            self.stage = Stage::Writes(plan::lazy_writes(&h, lazy));
        } else if let Some(bits) = o.refcount_bits.filter(|&b| b != 1 << h.refcount_order) {
            let order = bits.trailing_zeros();
            self.stage = Stage::Recount {
                order,
                added: Vec::new(),
            };
        } else if downgrade {
            if let Some(x) = self.expansion.take().map(|s| s.expansion()) {
                // Zero clusters first; the header comes when it is read again.
                if !x.allocs.is_empty() {
                    self.then.push_back(Stage::Recount {
                        order: h.refcount_order,
                        added: x.allocs,
                    });
                }
                self.then.push_back(Stage::Writes(x.tables));
                self.stage = Stage::Writes(x.zeroes);
            } else {
                let bytes = plan::relaid(cluster0, &layout, 2, false)?;
                self.stage = Stage::Writes(plan::header_writes(&bytes));
            }
        } else {
            self.finish(Ok(()));
        }
        Ok(())
    }
}

fn io_error(e: IoError) -> RequestError {
    if e.is_no_space() {
        RequestError::NoSpace
    } else {
        RequestError::Io(e)
    }
}
