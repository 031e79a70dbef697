//! Write-back order around new refcount blocks, a relocated refcount table and new L2
//! tables: what must be durable before a pointer to it is written.
//!
//! A refcount is durable only once the refcount-table entry reaching its block is, and, when
//! the table itself moved, once the header points at the new table (rule A). The crash
//! simulator in `qcow2-conformance` found both broken with 512-byte clusters: L2 slices went
//! out together with the refcount-table entry of a new block (no barrier between them), and
//! the header switched to a relocated table only after the L2 slices and L1 entries of the
//! same cycle, so a crash could leave data clusters referenced with refcount 0. A new L2
//! table's own write must likewise be covered by a barrier before its L1 entry (rule D),
//! even when it completed while an earlier cycle's barrier was already in flight.
//!
//! These tests drive the engine directly over an in-memory disk that keeps a durable image
//! and a log of the writes not yet covered by a flush. A flush covers what completed before
//! it was issued (`fdatasync`'s promise), not what completed while it was in flight. At
//! every completion of the part under test, crash images are opened read-only and checked
//! with the engine's check (leaks allowed, nothing else): nothing unflushed kept, everything
//! kept, and everything but one write kept.

use std::collections::HashMap;

use qcow2_proto::{
    CheckReport, CreateOptions, Event, Image, ImageConfig, IoKind, IoOp, Outcome, ReqId, Request,
    Segment,
};

const SIZE: u64 = 4 << 20;

/// A host file: what reads see, what survives a crash, and the writes in between.
#[derive(Default)]
struct Disk {
    current: Vec<u8>,
    durable: Vec<u8>,
    /// Writes not covered by a flush yet: offset and bytes, in completion order.
    log: Vec<(usize, Vec<u8>)>,
    /// Writes dropped from the front of `log` (made durable) so far.
    settled: usize,
}

fn write_into(img: &mut Vec<u8>, offset: usize, data: &[u8]) {
    if img.len() < offset + data.len() {
        img.resize(offset + data.len(), 0);
    }
    img[offset..offset + data.len()].copy_from_slice(data);
}

impl Disk {
    fn write(&mut self, offset: usize, data: &[u8]) {
        write_into(&mut self.current, offset, data);
        self.log.push((offset, data.to_vec()));
    }

    /// Where the log stands: a flush issued now covers the writes before this.
    fn mark(&self) -> usize {
        self.settled + self.log.len()
    }

    /// A flush issued at `mark` completes.
    fn flush(&mut self, mark: usize) {
        let n = (mark - self.settled).min(self.log.len());
        if n == self.log.len() {
            self.durable.clone_from(&self.current);
        } else {
            for (offset, data) in &self.log[..n] {
                write_into(&mut self.durable, *offset, data);
            }
        }
        self.log.drain(..n);
        self.settled += n;
    }

    /// The durable image plus the logged writes `keep` says survive.
    fn crash(&self, keep: impl Fn(usize) -> bool) -> Vec<u8> {
        let mut img = self.durable.clone();
        for (i, (offset, data)) in self.log.iter().enumerate() {
            if keep(i) {
                write_into(&mut img, *offset, data);
            }
        }
        img
    }
}

/// Performs `op`, issued when the log stood at `mark`; the bytes it transferred.
fn perform(disk: &mut Disk, bufs: &mut HashMap<ReqId, Vec<u8>>, op: &mut IoOp, mark: usize) {
    match op.kind {
        IoKind::Read | IoKind::ZeroFill => {
            let mut pos = op.offset as usize;
            for seg in op.segments.iter_mut() {
                let len = seg.len();
                let out: &mut [u8] = match seg {
                    Segment::Guest { req, start, len } => {
                        &mut bufs.get_mut(req).expect("guest buffer")[*start..*start + *len]
                    }
                    Segment::Buf(b) => b.as_mut_slice(),
                    _ => &mut [],
                };
                for (i, b) in out.iter_mut().enumerate() {
                    *b = match op.kind {
                        IoKind::Read => disk.current.get(pos + i).copied().unwrap_or(0),
                        _ => 0,
                    };
                }
                pos += len;
            }
        }
        IoKind::Write => {
            let mut data = Vec::with_capacity(op.len() as usize);
            for seg in op.segments.iter() {
                match seg {
                    Segment::Guest { req, start, len } => {
                        data.extend_from_slice(&bufs[req][*start..*start + *len])
                    }
                    Segment::Buf(b) => data.extend_from_slice(b.as_slice()),
                    Segment::Zeroes(z) => data.resize(data.len() + z, 0),
                    s => panic!("unexpected segment {s:?}"),
                }
            }
            disk.write(op.offset as usize, &data);
        }
        IoKind::Flush => disk.flush(mark),
        IoKind::SetLen => disk.current.resize(op.offset as usize, 0),
        // Extending the file only: the bytes read as zero either way.
        IoKind::Allocate { .. } => {}
        k => panic!("unexpected op kind {k:?}"),
    }
}

/// An engine over a [`Disk`], with the ops it issued and not yet got back (each with the
/// log mark at its issue).
struct Sim {
    img: Image,
    disk: Disk,
    pending: Vec<(IoOp, usize)>,
    bufs: HashMap<ReqId, Vec<u8>>,
    done: HashMap<ReqId, Outcome>,
    opened: bool,
}

impl Sim {
    /// Starts an image (open or create) and runs until it is open.
    fn start(img: Image, disk: Disk) -> Self {
        let mut sim = Self {
            img,
            disk,
            pending: Vec::new(),
            bufs: HashMap::new(),
            done: HashMap::new(),
            opened: false,
        };
        sim.poll();
        while !sim.opened {
            assert!(!sim.pending.is_empty(), "opening stalled");
            sim.complete(0);
        }
        sim
    }

    fn poll(&mut self) {
        while let Some(op) = self.img.poll_io() {
            self.pending.push((op, self.disk.mark()));
        }
        while let Some(ev) = self.img.poll_event() {
            match ev {
                Event::Done { req, result } => {
                    let o = result.unwrap_or_else(|e| panic!("{req:?} failed: {e}"));
                    self.done.insert(req, o);
                }
                Event::Opened(_) => self.opened = true,
                Event::OpenFailed(e) => panic!("open failed: {e}"),
                _ => {}
            }
        }
    }

    /// Completes pending op `i`.
    fn complete(&mut self, i: usize) {
        let (mut op, mark) = self.pending.remove(i);
        perform(&mut self.disk, &mut self.bufs, &mut op, mark);
        let n = op.len() as usize;
        self.img.complete(op, Ok(n));
        self.poll();
    }

    /// Completes the oldest pending op `pick` chooses.
    fn complete_where(&mut self, pick: impl Fn(&IoOp) -> bool) {
        let i = self.pending.iter().position(|(op, _)| pick(op));
        self.complete(i.expect("no such op pending"));
    }

    fn submit(&mut self, req: Request, buf: Vec<u8>) -> ReqId {
        let id = self.img.submit(req).expect("submit");
        // Nothing runs before the next completion, so the buffer may go in after submit.
        self.bufs.insert(id, buf);
        self.poll();
        id
    }

    /// Completes ops in issue order until request `id` is done, calling `point` after each
    /// completion.
    fn wait(&mut self, id: ReqId, point: &mut dyn FnMut(&Disk)) -> Outcome {
        loop {
            if let Some(o) = self.done.remove(&id) {
                self.bufs.remove(&id);
                return o;
            }
            assert!(!self.pending.is_empty(), "the engine stalled");
            self.complete(0);
            point(&self.disk);
        }
    }

    /// Completes ops in issue order until none is pending (a cycle the engine started on
    /// its own, say to write back the decrements a flush released).
    fn settle(&mut self) {
        while !self.pending.is_empty() {
            self.complete(0);
        }
    }

    fn run(&mut self, req: Request, point: &mut dyn FnMut(&Disk)) -> Outcome {
        let buf = match req {
            // Nonzero bytes: as L2 entries, each points at cluster 1 (the refcount table).
            Request::Write { len, .. } => (0..len)
                .map(|i| [0x80, 0, 0, 0, 0, 0, 2, 0][i as usize % 8])
                .collect(),
            _ => Vec::new(),
        };
        let id = self.submit(req, buf);
        self.wait(id, point)
    }
}

/// Opens `bytes` read-only and checks it.
fn check(bytes: Vec<u8>) -> CheckReport {
    let mut config = ImageConfig::new(bytes.len() as u64);
    config.read_only = true;
    let disk = Disk {
        durable: bytes.clone(),
        current: bytes,
        ..Disk::default()
    };
    let mut sim = Sim::start(Image::open(config), disk);
    match sim.run(Request::Check { repair: None }, &mut |_| {}) {
        Outcome::Check(r) => *r,
        other => panic!("check gave {other:?}"),
    }
}

/// Checks the crash images of `disk` now: nothing unflushed kept, everything kept, and all
/// but one write kept; the problem, if any image has more than leaks.
fn crash_points(disk: &Disk) -> Option<String> {
    let n = disk.log.len();
    let images = [
        ("nothing kept".to_owned(), disk.crash(|_| false)),
        ("everything kept".to_owned(), disk.crash(|_| true)),
    ]
    .into_iter()
    .chain((0..n).map(|drop| {
        let (offset, len) = (disk.log[drop].0, disk.log[drop].1.len());
        (
            format!("all but the write of {len} bytes at {offset} kept"),
            disk.crash(|i| i != drop),
        )
    }));
    for (what, img) in images {
        let r = check(img);
        if r.corruptions > 0 || r.check_errors > 0 {
            return Some(format!("{what}: {}", r.messages.join("; ")));
        }
    }
    None
}

fn create(version: u32, cluster_size: u64, refcount_bits: u32) -> Sim {
    let mut opts = CreateOptions::new(SIZE);
    opts.cluster_size = cluster_size as u32;
    opts.version = version;
    opts.refcount_bits = refcount_bits;
    Sim::start(Image::create(ImageConfig::new(0), opts), Disk::default())
}

/// A crash-point callback collecting problems, and the problems.
fn collector() -> (
    impl FnMut(&Disk),
    std::rc::Rc<std::cell::RefCell<Vec<String>>>,
) {
    let failures = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let sink = failures.clone();
    let mut at = 0;
    let point = move |d: &Disk| {
        at += 1;
        if let Some(p) = crash_points(d) {
            sink.borrow_mut().push(format!("crash point {at}: {p}"));
        }
    };
    (point, failures)
}

/// Closes the image and checks what is on disk: no corruption and no leak. Returns the
/// refcount table's offset from the header.
fn close_clean(mut sim: Sim) -> u64 {
    sim.run(Request::Close, &mut |_| {});
    let r = check(sim.disk.durable.clone());
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    u64::from_be_bytes(sim.disk.durable[48..56].try_into().expect("8 bytes"))
}

/// 512-byte clusters, 64-bit refcounts (a refcount block covers 64 clusters, the
/// one-cluster refcount table 4096). Links guest cluster 0 (so its L2 table is durable),
/// fills the host file up to `fill_to` clusters elsewhere and flushes; then allocates the
/// rest of that L2 table's clusters, which crosses into a new refcount block, and flushes
/// again with a crash point after every completion.
fn crosses_into_new_block(fill_to: u64) -> u64 {
    const CS: u64 = 512;
    let mut sim = create(3, CS, 64);
    let none = &mut |_: &Disk| {};
    sim.run(Request::Write { offset: 0, len: CS }, none);
    let mut guest = 64 * CS;
    while (sim.disk.current.len() as u64) / CS + 8 < fill_to {
        let req = Request::Write {
            offset: guest,
            len: 8 * CS,
        };
        sim.run(req, none);
        guest += 8 * CS;
    }
    sim.run(Request::Flush, none);
    let (mut point, failures) = collector();
    let req = Request::Write {
        offset: CS,
        len: 63 * CS,
    };
    sim.run(req, &mut point);
    sim.run(Request::Flush, &mut point);
    assert!(
        failures.borrow().is_empty(),
        "{}",
        failures.borrow().join("\n")
    );
    close_clean(sim)
}

/// The new block's refcount-table entry must be durable before the L2 slice that references
/// the clusters it counts.
#[test]
fn new_refcount_block_is_reachable_before_references() {
    let reftable = crosses_into_new_block(0);
    assert_eq!(reftable, 512, "the refcount table stays at cluster 1");
}

/// Filling the file near 4096 clusters makes the second write relocate the refcount table:
/// the header must point at the new table before the L2 slice that references clusters
/// only it counts.
#[test]
fn relocated_refcount_table_is_switched_to_before_references() {
    let reftable = crosses_into_new_block(4096 - 30);
    assert!(
        reftable > 4096 * 512,
        "the refcount table moved ({reftable:#x})"
    );
}

/// A new L2 table goes into a cluster freed earlier (holding old data) while a flush runs:
/// its write completes after that cycle issued its barrier, and the table is linked when the
/// cycle ends. The next cycle has nothing to write but the L1 entry; the table must still be
/// made durable before it.
#[test]
fn new_l2_table_is_durable_before_its_l1_entry() {
    const CS: u64 = 512;
    let mut sim = create(2, CS, 16);
    let none = &mut |_: &Disk| {};
    // A data cluster full of bytes that read as L2 entries pointing at the refcount table.
    sim.run(Request::Write { offset: 0, len: CS }, none);
    sim.run(Request::Flush, none);
    sim.run(Request::Discard { offset: 0, len: CS }, none);
    // Made durable, then the cluster is free for reuse.
    sim.run(Request::Flush, none);
    sim.settle();
    // A partial write-zeroes where no L2 table exists (v2): a new table, no entry changes.
    let zero = sim.submit(
        Request::WriteZeroes {
            offset: 2 * 64 * CS + 100,
            len: 100,
            unmap: false,
        },
        Vec::new(),
    );
    let [(table, _)] = sim.pending.as_slice() else {
        panic!("expected the new table's write alone: {:?}", sim.pending);
    };
    let table = table.offset;
    let flush = sim.submit(Request::Flush, Vec::new());
    // The cycle writes the refcount block; its barrier is issued before the table's write
    // completes and completes after it.
    sim.complete_where(|op| op.kind == IoKind::Write && op.offset != table);
    sim.complete_where(|op| op.kind == IoKind::Write && op.offset == table);
    sim.complete_where(|op| op.kind == IoKind::Flush);
    sim.wait(flush, none);
    sim.wait(zero, none);
    let (mut point, failures) = collector();
    sim.run(Request::Flush, &mut point);
    assert!(
        failures.borrow().is_empty(),
        "{}",
        failures.borrow().join("\n")
    );
    close_clean(sim);
}
