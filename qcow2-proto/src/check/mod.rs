//! Sans-IO consistency check and repair, as `qemu-img check [-r leaks|all]` does it.
//!
//! The [`Checker`] reads every metadata structure through ops (like the engine), rebuilds the
//! refcount of every host cluster from the references it finds, compares with the stored
//! refcounts, and reports corruptions and leaks; with [`Repair`] it fixes what QEMU fixes.
//!
//! It follows QEMU's `qcow2_co_check` step by step, so its counters and detail lines match
//! `qemu-img check`'s:
//!
//! 1. read the header (cluster 0) and the snapshot table, which the check validates itself
//!    (QEMU's check mode does not read it at open); `-r all` drops snapshots past 65,536
//!    or past 64 MiB of table (writing the reduced count to the header at once) and cuts
//!    extra data to 1 KiB;
//! 2. build the in-memory refcount table (IMRT) from the header, the active L1 and its L2
//!    tables (with allocation and fragmentation statistics), each snapshot's L1 and L2
//!    tables, the snapshot table, the refcount table, the LUKS header, the bitmaps and the
//!    refblocks themselves; references past the end of the file are corruptions and never
//!    grow the IMRT;
//! 3. compare with the stored refcount of every cluster up to the end of the file: a stored
//!    refcount above the references is a leak, below them a corruption;
//! 4. repair: `-r leaks` writes leaked refcounts down; `-r all` also raises refcounts below
//!    their references and, when a used cluster has refcount 0 (or a refblock is broken),
//!    builds a whole new refcount structure in free clusters, flushes it, and only then
//!    switches the header to it;
//! 5. check the COPIED flags of the active L1 and L2 tables against the refcounts (and fix
//!    them under `-r all`, or under `-r leaks` when nothing else is left);
//! 6. under `-r all`, rewrite a snapshot table found wanting (cut extra data, v3 entries
//!    with less than 16 bytes of it) as `qcow2_write_snapshots` does: in free clusters,
//!    refcounts first, then the table, then the header pointer, then free the old table;
//! 7. after a repair that left no corruption, clear the dirty and corrupt bits.
//!
//! When anything was repaired, the whole check runs again without repairing, and the
//! report gives that second run's counts with the first run's `*_fixed` counts, as
//! `qemu-img check -r` reports them.
//!
//! Memory is bounded: the two refcount arrays (the IMRT and the loaded refcounts, each
//! `refcount_bits` per cluster of the file) share a budget ([`Checker::with_memory_limit`]);
//! tables are read one at a time and big ones in 1 MiB chunks; every size read from disk is
//! checked before anything is allocated for it.

/// Adds a detail line to the pass's log (formatted only while the log has room).
macro_rules! say {
    ($self:expr, $($arg:tt)*) => { $self.log.push(format_args!($($arg)*)) };
}

mod calc;
mod compare;
mod copied;
mod imrt;
pub(crate) mod pass;
mod reorder;
mod repair;
pub(crate) mod serial;
mod snapshots;
mod walk;

use crate::error::OpenError;
use crate::io::{IoError, IoOp};

use pass::{Fix, Pass, PassResult, Step};
use serial::Serial;

/// What `check` may repair.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Repair {
    /// `-r leaks`: drop refcounts of clusters nothing references.
    Leaks,
    /// `-r all`: leaks and every repairable corruption (refcount rebuild, COPIED flags).
    All,
}

/// The result of a check, with qemu-img's counters (`--output=json` field names in docs).
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct CheckReport {
    /// `corruptions`: errors that remain.
    pub corruptions: u64,
    /// `leaks`: leaked clusters that remain.
    pub leaks: u64,
    /// `check-errors`: internal errors (I/O, memory) while checking. Non-zero also when the
    /// check could not complete (where `qemu-img check` says "Check failed" and exits 1).
    pub check_errors: u64,
    /// `corruptions-fixed`.
    pub corruptions_fixed: u64,
    /// `leaks-fixed`.
    pub leaks_fixed: u64,
    /// `image-end-offset`: end of the last used host cluster.
    pub image_end_offset: u64,
    /// `total-clusters`: guest clusters (virtual size / cluster size, rounded up).
    pub total_clusters: u64,
    /// `allocated-clusters`: guest clusters allocated in this image.
    pub allocated_clusters: u64,
    /// `fragmented-clusters`.
    pub fragmented_clusters: u64,
    /// `compressed-clusters`.
    pub compressed_clusters: u64,
    /// Detail lines, as qemu-img prints them on stderr ("Leaked cluster 9 refcount=1 reference=0").
    pub messages: Vec<String>,
    /// Why the check stopped before it was complete, as QEMU's error code says it
    /// ("Input/output error"); `None` when it completed. After a failure the counters hold
    /// what was found until then, and `qemu-img check` prints no report, only "Check
    /// failed: REASON" (exit status 1). Implies a non-zero `check_errors`.
    pub failure: Option<String>,
}

impl CheckReport {
    /// Whether the check stopped before it was complete (see [`failure`](Self::failure)).
    pub fn failed(&self) -> bool {
        self.failure.is_some()
    }

    /// The counters under the names `qemu-img check --output=json` gives them, in its
    /// order.
    ///
    /// ```
    /// let report = qcow2_proto::CheckReport { leaks: 2, ..Default::default() };
    /// assert!(report.qemu_fields().contains(&("leaks", 2)));
    /// ```
    pub fn qemu_fields(&self) -> [(&'static str, u64); 10] {
        [
            ("check-errors", self.check_errors),
            ("image-end-offset", self.image_end_offset),
            ("corruptions", self.corruptions),
            ("leaks", self.leaks),
            ("corruptions-fixed", self.corruptions_fixed),
            ("leaks-fixed", self.leaks_fixed),
            ("total-clusters", self.total_clusters),
            ("allocated-clusters", self.allocated_clusters),
            ("fragmented-clusters", self.fragmented_clusters),
            ("compressed-clusters", self.compressed_clusters),
        ]
    }
}

/// Default budget for the refcount arrays: 512 MiB (a 64 KiB-cluster image with 16-bit
/// refcounts of up to 8 TiB of file).
pub const DEFAULT_MEMORY_LIMIT: u64 = 512 << 20;

/// A sans-IO `qemu-img check`: hand its ops to a runtime, their results back, and collect
/// the report.
///
/// At most one op is outstanding at a time: after each [`complete`](Self::complete), ask
/// [`poll_io`](Self::poll_io) for the next op, and [`poll_result`](Self::poll_result) once
/// there is none.
///
/// ```
/// use qcow2_proto::check::Checker;
/// use qcow2_proto::create::initial_image;
/// use qcow2_proto::{CreateOptions, IoKind, Repair, Segment};
///
/// // An empty 64 MiB image in memory, with a leaked cluster appended.
/// let init = initial_image(&CreateOptions::new(64 << 20)).unwrap();
/// let mut disk = vec![0u8; init.file_len as usize];
/// for (off, bytes) in &init.writes {
///     disk[*off as usize..*off as usize + bytes.len()].copy_from_slice(bytes);
/// }
/// disk.resize(5 << 16, 0);
/// disk[0x20000 + 9] = 1; // refblock 0, cluster 4: refcount 1, nothing refers to it
///
/// let mut checker = Checker::new(disk.len() as u64, Some(Repair::Leaks));
/// let report = loop {
///     while let Some(mut op) = checker.poll_io() {
///         let at = op.offset as usize;
///         let n = match (op.kind, op.segments.first_mut()) {
///             (IoKind::Read, Some(Segment::Buf(b))) => {
///                 let n = disk.len().saturating_sub(at).min(b.len());
///                 b.as_mut_slice().fill(0);
///                 b.as_mut_slice()[..n].copy_from_slice(&disk[at..at + n]);
///                 n
///             }
///             (IoKind::Write, Some(Segment::Buf(b))) => {
///                 disk.resize(disk.len().max(at + b.len()), 0);
///                 disk[at..at + b.len()].copy_from_slice(b.as_slice());
///                 b.len()
///             }
///             (IoKind::SetLen, _) => {
///                 disk.resize(at, 0);
///                 0
///             }
///             _ => 0, // flush
///         };
///         checker.complete(op, Ok(n));
///     }
///     if let Some(result) = checker.poll_result() {
///         break result.unwrap();
///     }
/// };
/// assert_eq!((report.leaks_fixed, report.leaks, report.corruptions), (1, 0, 0));
/// assert_eq!(report.messages[0], "Leaked cluster 4 refcount=1 reference=0");
/// ```
#[derive(Debug)]
pub struct Checker {
    repair: Option<Repair>,
    memory_limit: u64,
    pass: Option<Pass>,
    second: bool,
    first: Option<PassResult>,
    ops: Serial,
    result: Option<Result<CheckReport, OpenError>>,
    finished: bool,
}

impl Checker {
    /// Checks the image in a file of `file_len` bytes, repairing what `repair` allows.
    pub fn new(file_len: u64, repair: Option<Repair>) -> Self {
        let fix = match repair {
            None => Fix::default(),
            Some(Repair::Leaks) => Fix {
                leaks: true,
                errors: false,
            },
            Some(Repair::All) => Fix {
                leaks: true,
                errors: true,
            },
        };
        Self {
            repair,
            memory_limit: DEFAULT_MEMORY_LIMIT,
            pass: Some(Pass::new(file_len, fix, DEFAULT_MEMORY_LIMIT)),
            second: false,
            first: None,
            ops: Serial::default(),
            result: None,
            finished: false,
        }
    }

    /// Sets the memory the refcount arrays may use (default [`DEFAULT_MEMORY_LIMIT`]); an
    /// image whose file needs more is reported with a check error instead. Call before the
    /// first [`poll_io`](Self::poll_io).
    pub fn with_memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = bytes;
        if let Some(pass) = self.pass.take() {
            let fix = match self.repair {
                None => Fix::default(),
                Some(Repair::Leaks) => Fix {
                    leaks: true,
                    errors: false,
                },
                Some(Repair::All) => Fix {
                    leaks: true,
                    errors: true,
                },
            };
            self.pass = Some(Pass::new(pass.file_len(), fix, bytes));
        }
        self
    }

    /// Next op to perform: [`Target::Image`](crate::Target::Image), kinds [`IoKind::Read`](crate::IoKind::Read), [`IoKind::Write`](crate::IoKind::Write),
    /// [`IoKind::Flush`](crate::IoKind::Flush) and [`IoKind::SetLen`](crate::IoKind::SetLen) only, segments only [`Segment::Buf`](crate::Segment::Buf). One op
    /// at a time: the next comes after the previous one's [`complete`](Self::complete).
    pub fn poll_io(&mut self) -> Option<IoOp> {
        if self.ops.idle() {
            self.drive();
        }
        self.ops.take()
    }

    /// The result of an op (bytes transferred; reads past the end of the file come back
    /// zero-filled with the count actually read). Ops not issued by this checker are
    /// ignored.
    pub fn complete(&mut self, op: IoOp, result: Result<usize, IoError>) {
        let Some(result) = self.ops.complete(op, result) else {
            return;
        };
        if let Some(pass) = self.pass.as_mut() {
            pass.complete(result);
        }
        self.drive();
    }

    /// The report once finished (then never again). `Err` only when the check could not
    /// run at all: the header could not be read or is not an acceptable qcow2 header.
    pub fn poll_result(&mut self) -> Option<Result<CheckReport, OpenError>> {
        if self.ops.idle() && !self.finished {
            self.drive();
        }
        self.result.take()
    }

    /// Steps the current pass until it wants an op or the whole check is over.
    fn drive(&mut self) {
        while let Some(pass) = self.pass.as_mut() {
            match pass.step() {
                Step::Io(req) => {
                    self.ops.set(req);
                    return;
                }
                Step::Done => {
                    let Some(pass) = self.pass.take() else { return };
                    self.pass_done(pass.result());
                }
            }
        }
    }

    /// Ends a pass: starts qemu-img's double check after a repair, or builds the report.
    fn pass_done(&mut self, done: PassResult) {
        if let Some(e) = done.header_error {
            if !self.second {
                self.finished = true;
                self.result = Some(Err(e));
                return;
            }
        }
        let fixed = done.counts.corruptions_fixed > 0 || done.counts.leaks_fixed > 0;
        if !self.second && !done.failed && fixed && !done.poisoned {
            // qemu-img double-checks a repaired image and reports that check.
            self.second = true;
            self.pass = Some(Pass::new(done.file_len, Fix::default(), self.memory_limit));
            self.first = Some(done);
            return;
        }
        let mut report = report_of(&done);
        if done.failed {
            report.failure = Some(
                done.failure
                    .clone()
                    .unwrap_or_else(|| "Input/output error".into()),
            );
        }
        if !self.second && !done.failed && fixed && done.poisoned {
            // QEMU makes the image unusable once it marked it corrupt, so the double check
            // after the repair fails ("No medium found").
            report.check_errors = report.check_errors.max(1);
            report.failure = Some("No medium found".into());
        }
        if let Some(e) = &done.header_error {
            report.check_errors = report.check_errors.max(1);
            report.failure = Some(format!("the repaired image cannot be opened: {e}"));
        }
        if let Some(first) = self.first.take() {
            report.leaks_fixed = first.counts.leaks_fixed;
            report.corruptions_fixed = first.counts.corruptions_fixed;
            let mut messages = first.log.lines;
            messages.append(&mut report.messages);
            report.messages = messages;
        }
        self.finished = true;
        self.result = Some(Ok(report));
    }
}

fn report_of(done: &PassResult) -> CheckReport {
    let c = done.counts;
    CheckReport {
        corruptions: c.corruptions,
        leaks: c.leaks,
        check_errors: c.check_errors,
        corruptions_fixed: c.corruptions_fixed,
        leaks_fixed: c.leaks_fixed,
        image_end_offset: done.image_end_offset,
        total_clusters: done.total_clusters,
        allocated_clusters: c.allocated,
        fragmented_clusters: c.fragmented,
        compressed_clusters: c.compressed,
        messages: done.log.lines.clone(),
        failure: None,
    }
}
