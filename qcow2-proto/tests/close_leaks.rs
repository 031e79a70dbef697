//! No leaked clusters after a clean close, whatever order the ops complete in.
//!
//! The async runtimes complete ops in varying orders; the conformance model test then found
//! clusters with refcount 1 and no reference after a clean close. These tests drive the
//! engine directly over an in-memory disk, complete ops in a seeded random order, close,
//! open the bytes again and run the engine's own check.
//!
//! A runtime closes the file (and the caller may open the image again) as soon as the
//! close request is done; an op the engine still had outstanding then keeps running into
//! the next session. The harness models exactly that: ops left over at a close complete
//! later, interleaved with the next session's.

mod common;

use std::collections::HashMap;

use common::{perform, Rng};
use qcow2_proto::{
    CheckReport, CreateOptions, Event, Image, ImageConfig, IoKind, IoOp, Outcome, ReqId, Request,
};

const CS: u64 = 4096;
const SIZE: u64 = 4 << 20;

/// A closed session whose engine still had ops outstanding.
struct Late {
    img: Image,
    pending: Vec<IoOp>,
}

struct Harness {
    img: Image,
    disk: Vec<u8>,
    bufs: HashMap<ReqId, Vec<u8>>,
    pending: Vec<IoOp>,
    done: Vec<(ReqId, Outcome)>,
    /// What each read in flight must return.
    reads: HashMap<ReqId, Vec<u8>>,
    /// Guest ranges of the requests in flight (overlapping ones have no defined result).
    busy: HashMap<ReqId, (u64, u64)>,
    rng: Rng,
    /// Guest contents the image must show.
    model: Vec<u8>,
    late: Option<Late>,
    /// Ops some close left outstanding (the contract allows none).
    left_at_close: Vec<(IoKind, u64)>,
    what: String,
}

impl Harness {
    fn create(version: u32, seed: u64) -> Self {
        let mut opts = CreateOptions::new(SIZE);
        opts.cluster_size = CS as u32;
        opts.version = version;
        let mut h = Self {
            img: Image::create(ImageConfig::new(0), opts),
            disk: Vec::new(),
            bufs: HashMap::new(),
            pending: Vec::new(),
            done: Vec::new(),
            reads: HashMap::new(),
            busy: HashMap::new(),
            rng: Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1),
            model: vec![0; SIZE as usize],
            late: None,
            left_at_close: Vec::new(),
            what: format!("v{version} seed {seed}"),
        };
        h.run_all();
        h
    }

    /// Closes the image and opens the file again at once, as the conformance suite's
    /// `Reopen` does: caches start cold, and whatever the old engine left outstanding
    /// lands while the new one runs.
    fn reopen(&mut self) {
        self.close();
        if !self.pending.is_empty() {
            self.finish_late();
        }
        let config = ImageConfig::new(self.disk.len() as u64);
        let old = std::mem::replace(&mut self.img, Image::open(config));
        if !self.pending.is_empty() {
            self.late = Some(Late {
                img: old,
                pending: std::mem::take(&mut self.pending),
            });
        }
        self.done.clear();
        // Opening runs on its own (the runtimes open with blocking I/O); the old session's
        // leftovers may land at any time after.
        self.poll();
        while !self.pending.is_empty() {
            let i = self.rng.below(self.pending.len() as u64) as usize;
            let mut op = self.pending.swap_remove(i);
            let n = perform(&mut self.disk, &mut self.bufs, &mut op);
            self.img.complete(op, Ok(n));
            self.poll();
        }
    }

    /// Submits a close and runs until it is done (not further: what is still outstanding
    /// then is left over).
    fn close(&mut self) {
        self.run_all();
        let id = self.submit(Request::Close, Vec::new());
        while self.take_done(id).is_none() {
            assert!(
                !self.pending.is_empty(),
                "{}: close never finished",
                self.what
            );
            self.some(1);
        }
        self.left_at_close
            .extend(self.pending.iter().map(|o| (o.kind, o.offset)));
    }

    fn poll(&mut self) {
        while let Some(op) = self.img.poll_io() {
            self.pending.push(op);
        }
        while let Some(ev) = self.img.poll_event() {
            match ev {
                Event::Done { req, result } => {
                    let outcome =
                        result.unwrap_or_else(|e| panic!("{}: request failed: {e}", self.what));
                    self.busy.remove(&req);
                    if let Some(want) = self.reads.remove(&req) {
                        let got = &self.bufs[&req];
                        if let Some(at) = got.iter().zip(&want).position(|(a, b)| a != b) {
                            panic!("{}: a read differs from the model at +{at:#x}", self.what);
                        }
                    }
                    self.done.push((req, outcome));
                }
                Event::Opened(_) => {}
                other => panic!("{}: unexpected event {other:?}", self.what),
            }
        }
    }

    fn submit(&mut self, req: Request, buf: Vec<u8>) -> ReqId {
        let id = self.img.submit(req).expect("submit");
        // Ids are reused once done: forget an earlier request's outcome nobody took.
        self.done.retain(|(r, _)| *r != id);
        // Nothing runs before the next completion, so the buffer may go in after submit.
        self.bufs.insert(id, buf);
        self.poll();
        id
    }

    /// Completes one random outstanding op, of this session or a closed one.
    fn step(&mut self) -> bool {
        let late = self.late.as_ref().map_or(0, |l| l.pending.len());
        let n = self.pending.len() + late;
        if n == 0 {
            return false;
        }
        let i = self.rng.below(n as u64) as usize;
        if i < self.pending.len() {
            let mut op = self.pending.swap_remove(i);
            let n = perform(&mut self.disk, &mut self.bufs, &mut op);
            self.img.complete(op, Ok(n));
            self.poll();
        } else {
            self.step_late(i - self.pending.len());
        }
        true
    }

    fn step_late(&mut self, i: usize) {
        let late = self.late.as_mut().expect("late ops");
        let mut op = late.pending.swap_remove(i);
        let mut no_bufs = HashMap::new();
        let n = perform(&mut self.disk, &mut no_bufs, &mut op);
        late.img.complete(op, Ok(n));
        while let Some(op) = late.img.poll_io() {
            late.pending.push(op);
        }
        while late.img.poll_event().is_some() {}
        if late.pending.is_empty() {
            self.late = None;
        }
    }

    fn finish_late(&mut self) {
        while self.late.is_some() {
            self.step_late(0);
        }
    }

    /// Completes up to `n` random outstanding ops.
    fn some(&mut self, n: u64) {
        for _ in 0..n {
            if !self.step() {
                return;
            }
        }
    }

    fn run_all(&mut self) {
        self.poll();
        while self.step() {}
    }

    fn take_done(&mut self, req: ReqId) -> Option<Outcome> {
        let i = self.done.iter().position(|(r, _)| *r == req)?;
        self.bufs.remove(&req);
        Some(self.done.swap_remove(i).1)
    }

    fn finish(&mut self, req: Request) -> Outcome {
        let id = self.submit(req, Vec::new());
        self.run_all();
        self.take_done(id).expect("request finished")
    }

    /// Starts a guest request (finishing first whatever in flight overlaps it) and updates
    /// the model.
    fn start(&mut self, req: Request, fill: u8) {
        let (offset, len) = match req {
            Request::Read { offset, len }
            | Request::Write { offset, len }
            | Request::WriteZeroes { offset, len, .. }
            | Request::Discard { offset, len } => (offset, len),
            _ => unreachable!("guest requests only"),
        };
        let overlaps = |&(o, l): &(u64, u64)| offset < o + l && o < offset + len;
        if self.busy.values().any(overlaps) {
            self.run_all();
        }
        let size = self.model.len() as u64;
        let (buf, range) = match req {
            Request::Write { .. } => {
                self.model[offset as usize..(offset + len) as usize].fill(fill);
                (vec![fill; len as usize], (offset, len))
            }
            Request::WriteZeroes { .. } => {
                self.model[offset as usize..(offset + len) as usize].fill(0);
                (Vec::new(), (offset, len))
            }
            Request::Discard { .. } => {
                // Whole clusters inside the range (the image's partial last one counts).
                let s = offset.next_multiple_of(CS);
                let e = if offset + len == size {
                    size
                } else {
                    (offset + len) / CS * CS
                };
                if s < e {
                    self.model[s as usize..e as usize].fill(0);
                }
                (Vec::new(), (offset, len))
            }
            _ => (vec![0xee; len as usize], (offset, len)),
        };
        let want = matches!(req, Request::Read { .. })
            .then(|| self.model[offset as usize..(offset + len) as usize].to_vec());
        let id = self.img.submit(req).expect("submit");
        self.done.retain(|(r, _)| *r != id);
        self.bufs.insert(id, buf);
        if let Some(w) = want {
            self.reads.insert(id, w);
        }
        self.busy.insert(id, range);
        self.poll();
    }

    fn resize(&mut self, size: u64) {
        self.run_all();
        self.finish(Request::Resize { size, shrink: true });
        self.model.resize(size as usize, 0);
    }

    /// Reads the whole image back and compares it with the model.
    fn verify(&mut self) {
        let len = self.model.len() as u64;
        self.start(Request::Read { offset: 0, len }, 0);
        self.run_all();
    }

    /// Closes, opens the file again, and runs the engine's check once every op of the
    /// closed sessions has landed: nothing may leak, and no close may have left ops
    /// outstanding.
    fn close_and_check(mut self) {
        self.reopen();
        self.verify();
        self.finish_late();
        let report = match self.finish(Request::Check { repair: None }) {
            Outcome::Check(r) => r,
            other => panic!("check gave {other:?}"),
        };
        assert_clean(&report, &self.what);
        self.close();
        assert!(
            self.left_at_close.is_empty(),
            "{}: a close finished with ops outstanding: {:?}",
            self.what,
            self.left_at_close
        );
    }
}

fn assert_clean(r: &CheckReport, what: &str) {
    assert!(
        r.leaks == 0 && r.corruptions == 0 && r.check_errors == 0,
        "{what}: check is not clean: leaks {} corruptions {} errors {}\n{}",
        r.leaks,
        r.corruptions,
        r.check_errors,
        r.messages.join("\n")
    );
}

/// Seeds to run (`SEED=n` runs one).
fn seeds(n: u64) -> impl Iterator<Item = u64> {
    let only: Option<u64> = std::env::var("SEED").ok().map(|v| v.parse().unwrap());
    (1..=n).filter(move |s| only.is_none_or(|o| o == *s))
}

/// The brief's scenario: write several clusters, flush, close, reopen, read, discard whole
/// clusters, close; every op completed in random order.
#[test]
fn discard_after_reopen_leaks_nothing() {
    for version in [2, 3] {
        for seed in seeds(200) {
            let mut h = Harness::create(version, seed);
            h.start(
                Request::Write {
                    offset: 0,
                    len: 12 * CS,
                },
                0x11,
            );
            h.start(
                Request::Write {
                    offset: 40 * CS + 100,
                    len: 5 * CS,
                },
                0x22,
            );
            h.run_all();
            h.finish(Request::Flush);
            h.reopen();
            h.start(
                Request::Read {
                    offset: 0,
                    len: 48 * CS,
                },
                0,
            );
            h.start(
                Request::Discard {
                    offset: 0,
                    len: 7 * CS,
                },
                0,
            );
            h.start(
                Request::Discard {
                    offset: 41 * CS,
                    len: 3 * CS,
                },
                0,
            );
            h.reopen();
            h.start(
                Request::Write {
                    offset: 20 * CS,
                    len: 9 * CS,
                },
                0x33,
            );
            h.close_and_check();
        }
    }
}

/// A shrunk failure of the uring conformance run (its script's offsets wrap at the virtual
/// size): shrink, write, discard what was written, reopen, write a long run of new
/// clusters. The close left the write-back of the decrements in flight; the next session
/// loaded the refcount block before it landed, and wrote its stale copy back.
#[test]
fn write_after_shrink_and_reopen_leaks_nothing() {
    for version in [2, 3] {
        for seed in seeds(200) {
            let mut h = Harness::create(version, seed);
            h.resize(997_888);
            h.start(
                Request::Write {
                    offset: 308_224,
                    len: 44_677,
                },
                0x55,
            );
            h.start(
                Request::Discard {
                    offset: 296_448,
                    len: 142_689,
                },
                0,
            );
            h.reopen();
            h.start(
                Request::Write {
                    offset: 0,
                    len: 260_490,
                },
                0x44,
            );
            h.close_and_check();
        }
    }
}

/// The failing script of the report, offsets wrapped: shrink, write, flush, reopen, read,
/// discard the written clusters, reopen, write.
#[test]
fn reported_script_leaks_nothing() {
    for version in [2, 3] {
        for seed in seeds(200) {
            let mut h = Harness::create(version, seed);
            h.resize(524_288);
            h.start(
                Request::Discard {
                    offset: 32_768,
                    len: 453,
                },
                0,
            );
            h.start(
                Request::Write {
                    offset: 4096,
                    len: 30_000,
                },
                0x66,
            );
            h.finish(Request::Flush);
            h.reopen();
            h.start(
                Request::Read {
                    offset: 44_192,
                    len: 20_224,
                },
                0,
            );
            h.start(
                Request::Discard {
                    offset: 0,
                    len: 28_672,
                },
                0,
            );
            h.reopen();
            h.start(
                Request::Write {
                    offset: 100_000,
                    len: 50_000,
                },
                0x77,
            );
            h.close_and_check();
        }
    }
}

/// Random scripts with several requests in flight, ops completed partly while more
/// requests arrive (so flushes, discards and closes land in the middle of write-back
/// cycles), reopens and resizes.
#[test]
fn random_scripts_leak_nothing() {
    for version in [2, 3] {
        for seed in seeds(150) {
            let mut h = Harness::create(version, seed);
            for step in 0..48u32 {
                let size = h.model.len() as u64;
                let off = h.rng.below(size);
                let len = (1 + h.rng.below(16 * CS)).min(size - off);
                // Whole clusters now and then, so discards free something.
                let (off, len) = if h.rng.below(2) == 0 && off / CS * CS + CS <= size {
                    let o = off / CS * CS;
                    (o, (len.div_ceil(CS) * CS).min(size - o))
                } else {
                    (off, len)
                };
                let fill = (step as u8) | 1;
                match h.rng.below(16) {
                    0..=4 => h.start(Request::Write { offset: off, len }, fill),
                    5..=7 => h.start(Request::Discard { offset: off, len }, 0),
                    8 => {
                        let unmap = h.rng.below(2) == 0;
                        h.start(
                            Request::WriteZeroes {
                                offset: off,
                                len,
                                unmap,
                            },
                            0,
                        );
                    }
                    9..=10 => {
                        h.submit(Request::Flush, Vec::new());
                    }
                    11 => h.start(Request::Read { offset: off, len }, 0),
                    12..=13 => h.reopen(),
                    14 => {
                        let new = (1 + h.rng.below(2 * SIZE / CS)) * CS;
                        h.resize(new);
                    }
                    _ => {}
                }
                // Let part of the work run before the next request comes in.
                let n = h.rng.below(8);
                h.some(n);
            }
            h.close_and_check();
        }
    }
}
