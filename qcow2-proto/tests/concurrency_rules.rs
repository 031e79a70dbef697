//! The core's concurrency rules (DESIGN.md, "Concurrency inside the core" and the
//! write-through line of "Ordering rules"), one test per rule. Each drives the engine directly
//! over an in-memory disk with many requests in flight, holding chosen ops back (issued but not
//! completed) and completing the rest in a seeded random order.

mod common;

use std::collections::HashMap;
use std::process::Command;

use common::perform;
use qcow2_proto::{
    Allocation, CacheMode, CreateOptions, Event, Image, ImageConfig, IoKind, IoOp, OpId, Outcome,
    ReqId, Request, Segment,
};

const CS: u64 = 4096;
/// 16 MiB: with 4 KiB clusters one L2 table covers 2 MiB, so there are 8 L2 regions.
const SIZE: u64 = 16 << 20;
const L2_SPAN: u64 = CS / 8 * CS;

/// xorshift, so the tests need no dependency and are reproducible.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// What happened, in order: the logical clock of the causality checks.
#[derive(Debug, Clone, Copy)]
enum Log {
    Issued {
        id: OpId,
        kind: IoKind,
        req: Option<ReqId>,
    },
    Completed(OpId),
    Done(ReqId),
}

struct Harness {
    img: Image,
    disk: Vec<u8>,
    bufs: HashMap<ReqId, Vec<u8>>,
    /// Issued, not yet completed.
    pending: Vec<IoOp>,
    /// Ops issued by the last input.
    fresh: Vec<OpId>,
    done: Vec<(ReqId, Outcome)>,
    log: Vec<Log>,
    rng: Rng,
    /// Ops kept outstanding until `release`, with their host ranges: no write may touch
    /// those (rule B: I/O still targets them).
    held: Vec<(OpId, u64, u64)>,
}

/// The request whose guest buffer `op` names, if any.
fn guest_req(op: &IoOp) -> Option<ReqId> {
    op.segments.iter().find_map(|s| match s {
        Segment::Guest { req, .. } => Some(*req),
        _ => None,
    })
}

fn writes_file(kind: IoKind) -> bool {
    matches!(
        kind,
        IoKind::Write
            | IoKind::WriteZeroes { .. }
            | IoKind::Allocate { .. }
            | IoKind::PunchHole { .. }
    )
}

fn config(cache_mode: CacheMode, file_len: u64) -> ImageConfig {
    ImageConfig {
        cache_mode,
        ..ImageConfig::new(file_len)
    }
}

impl Harness {
    fn start(img: Image, disk: Vec<u8>, seed: u64) -> Self {
        let mut h = Self {
            img,
            disk,
            bufs: HashMap::new(),
            pending: Vec::new(),
            fresh: Vec::new(),
            done: Vec::new(),
            log: Vec::new(),
            rng: Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1),
            held: Vec::new(),
        };
        h.poll();
        h.run_all();
        h
    }

    fn create(cache_mode: CacheMode, seed: u64) -> Self {
        Self::create_with(cache_mode, CS, seed)
    }

    fn create_with(cache_mode: CacheMode, cluster_size: u64, seed: u64) -> Self {
        let mut opts = CreateOptions::new(SIZE);
        opts.cluster_size = cluster_size as u32;
        Self::start(Image::create(config(cache_mode, 0), opts), Vec::new(), seed)
    }

    /// A new write-back image that allocates host space ahead in steps of `grow_step` bytes
    /// (and so counts clusters ahead, as the runtimes' images do).
    fn growing(grow_step: u64, seed: u64) -> Self {
        let mut opts = CreateOptions::new(SIZE);
        opts.cluster_size = CS as u32;
        let cfg = ImageConfig {
            grow_step,
            ..config(CacheMode::WriteBack, 0)
        };
        Self::start(Image::create(cfg, opts), Vec::new(), seed)
    }

    /// Closes the image and opens it again (with an L2 cache budget): caches start cold.
    fn reopen(mut self, l2_cache_bytes: Option<u64>) -> Self {
        self.finish(Request::Close, Vec::new());
        let cfg = ImageConfig {
            l2_cache_bytes,
            ..config(CacheMode::WriteBack, self.disk.len() as u64)
        };
        let seed = self.rng.0;
        Self::start(Image::open(cfg), self.disk, seed)
    }

    /// Collects ops and events after an input.
    fn poll(&mut self) {
        self.fresh.clear();
        while let Some(op) = self.img.poll_io() {
            if writes_file(op.kind) {
                let len = match op.kind {
                    IoKind::WriteZeroes { len }
                    | IoKind::Allocate { len }
                    | IoKind::PunchHole { len } => len,
                    _ => op.len(),
                };
                for &(_, g, glen) in &self.held {
                    assert!(
                        op.offset + len <= g || g + glen <= op.offset,
                        "{:?} of [{:#x}, {:#x}) hits host range [{g:#x}, {:#x}) that an \
                         outstanding read still targets",
                        op.kind,
                        op.offset,
                        op.offset + len,
                        g + glen,
                    );
                }
            }
            self.log.push(Log::Issued {
                id: op.id,
                kind: op.kind,
                req: guest_req(&op),
            });
            self.fresh.push(op.id);
            self.pending.push(op);
        }
        while let Some(ev) = self.img.poll_event() {
            match ev {
                Event::Done { req, result } => {
                    let outcome = result.unwrap_or_else(|e| panic!("request failed: {e}"));
                    self.log.push(Log::Done(req));
                    self.done.push((req, outcome));
                }
                Event::Opened(_) => {}
                other => panic!("unexpected event {other:?}"),
            }
        }
    }

    fn submit(&mut self, req: Request, buf: Vec<u8>) -> ReqId {
        let id = self.img.submit(req).expect("submit");
        // Nothing runs before the next completion, so the buffer may go in after submit.
        self.bufs.insert(id, buf);
        self.poll();
        id
    }

    fn op(&self, id: OpId) -> &IoOp {
        self.pending
            .iter()
            .find(|o| o.id == id)
            .expect("pending op")
    }

    /// Performs op `id` on the disk and completes it.
    fn complete(&mut self, id: OpId) {
        let i = self.pending.iter().position(|o| o.id == id).expect("op");
        let mut op = self.pending.swap_remove(i);
        let n = perform(&mut self.disk, &mut self.bufs, &mut op);
        self.log.push(Log::Completed(id));
        self.img.complete(op, Ok(n));
        self.poll();
    }

    /// Keeps op `id` outstanding, and every write away from its host range, until `release`.
    fn hold(&mut self, id: OpId) {
        let op = self.op(id);
        self.held.push((id, op.offset, op.len()));
    }

    fn release(&mut self, id: OpId) {
        self.held.retain(|h| h.0 != id);
        self.complete(id);
    }

    /// Completes pending ops matching `f` (including ones they cause), in random order,
    /// until none is left; held ops stay outstanding.
    fn run_matching(&mut self, f: impl Fn(&IoOp) -> bool) {
        loop {
            let ids: Vec<OpId> = self
                .pending
                .iter()
                .filter(|o| f(o) && !self.held.iter().any(|h| h.0 == o.id))
                .map(|o| o.id)
                .collect();
            if ids.is_empty() {
                return;
            }
            let id = ids[self.rng.below(ids.len())];
            self.complete(id);
        }
    }

    fn run_all(&mut self) {
        self.run_matching(|_| true);
    }

    fn run_all_but(&mut self, held: &[OpId]) {
        self.run_matching(|o| !held.contains(&o.id));
    }

    /// The outcome of `req`, if it finished (request ids are reused once done).
    fn take_done(&mut self, req: ReqId) -> Option<Outcome> {
        let i = self.done.iter().position(|(r, _)| *r == req)?;
        Some(self.done.swap_remove(i).1)
    }

    fn is_done(&self, req: ReqId) -> bool {
        self.done.iter().any(|(r, _)| *r == req)
    }

    /// Runs `req` (and everything else) to the end; its outcome and buffer.
    fn finish(&mut self, req: Request, buf: Vec<u8>) -> (Outcome, Vec<u8>) {
        let id = self.submit(req, buf);
        self.run_all();
        let out = self.take_done(id).expect("request finished");
        (out, self.bufs.remove(&id).unwrap())
    }

    fn write(&mut self, offset: u64, len: u64, fill: u8) -> ReqId {
        self.submit(Request::Write { offset, len }, vec![fill; len as usize])
    }

    fn read(&mut self, offset: u64, len: u64) -> ReqId {
        self.submit(Request::Read { offset, len }, vec![0xee; len as usize])
    }

    /// Runs a write of `len` bytes of `fill` at `offset` (and everything else) to the end.
    fn write_now(&mut self, offset: u64, len: u64, fill: u8) {
        self.finish(Request::Write { offset, len }, vec![fill; len as usize]);
    }

    /// Submits a flush and keeps every op it started outstanding: its write-back cycle holds
    /// its copy window. Returns the flush and the cycle's ops (for `run_all_but`).
    fn stalled_flush(&mut self) -> (ReqId, Vec<OpId>) {
        let flush = self.submit(Request::Flush, Vec::new());
        let cycle = self.pending_ids();
        assert!(!cycle.is_empty(), "the flush started a cycle");
        assert!(!self.is_done(flush));
        (flush, cycle)
    }

    /// A growing image whose cluster 0 is durable, with a flush whose cycle wrote its L2
    /// slice (a new mapping for cluster 1) and holds its barrier; then an in-place write of
    /// 3s to cluster 0 that finished behind that barrier. Returns the flush, the log's
    /// length when it was sent, and the write.
    fn write_behind_a_cycle_barrier(seed: u64) -> (Self, ReqId, usize, ReqId) {
        let mut h = Self::growing(256 << 10, seed);
        h.write_now(0, CS, 1);
        h.finish(Request::Flush, Vec::new());
        h.write_now(CS, CS, 2);
        let mark = h.log.len();
        let (flush, cycle) = h.stalled_flush();
        for id in cycle {
            h.complete(id);
        }
        let barrier: Vec<OpId> = h
            .pending
            .iter()
            .filter(|o| o.kind == IoKind::Flush)
            .map(|o| o.id)
            .collect();
        assert_eq!(barrier.len(), 1, "seed {seed}: the cycle's barrier");
        let write = h.write(0, CS, 3);
        h.run_all_but(&barrier);
        assert!(h.is_done(write), "seed {seed}: the write waited");
        assert!(!h.is_done(flush));
        (h, flush, mark, write)
    }

    fn read_now(&mut self, offset: u64, len: u64) -> Vec<u8> {
        self.finish(Request::Read { offset, len }, vec![0xee; len as usize])
            .1
    }

    /// Takes the buffer of a finished request.
    fn result(&mut self, req: ReqId) -> Vec<u8> {
        assert!(self.take_done(req).is_some(), "{req:?} did not finish");
        self.bufs.remove(&req).unwrap()
    }

    fn host_of(&mut self, guest: u64) -> u64 {
        match self.finish(
            Request::BlockStatus {
                offset: guest,
                len: CS,
            },
            Vec::new(),
        ) {
            (Outcome::Status(s), _) => match s.allocation {
                Allocation::Data { host } => host,
                other => panic!("guest {guest:#x} is {other:?}"),
            },
            (other, _) => panic!("block status gave {other:?}"),
        }
    }

    /// Pending ops of request `req`'s guest buffer.
    fn ops_of(&self, req: ReqId) -> Vec<OpId> {
        self.pending
            .iter()
            .filter(|o| guest_req(o) == Some(req))
            .map(|o| o.id)
            .collect()
    }

    fn pending_ids(&self) -> Vec<OpId> {
        self.pending.iter().map(|o| o.id).collect()
    }

    /// Closes the image and runs `qemu-img check` on the bytes: no corruption, no leak.
    fn close_and_check(mut self) -> Vec<u8> {
        self.finish(Request::Close, Vec::new());
        let have_qemu = Command::new("qemu-img").arg("--version").output().is_ok();
        if !have_qemu {
            assert!(
                std::env::var_os("CI").is_none(),
                "qemu-img is required in CI"
            );
            return self.disk;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.qcow2");
        std::fs::write(&path, &self.disk).unwrap();
        let out = Command::new("qemu-img")
            .args(["check", "--output=json"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "qemu-img check failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.disk
    }
}

// ---- reading the image bytes ----

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

fn be64(d: &[u8], at: u64) -> u64 {
    u64::from_be_bytes(d[at as usize..at as usize + 8].try_into().unwrap())
}

fn be32(d: &[u8], at: u64) -> u64 {
    u64::from(u32::from_be_bytes(
        d[at as usize..at as usize + 4].try_into().unwrap(),
    ))
}

/// The L2 table offset of L1 index `i`.
fn l2_table(d: &[u8], i: u64) -> u64 {
    be64(d, be64(d, 40) + i * 8) & OFFSET_MASK
}

/// The offset of the refcount block covering host cluster 0.
fn first_refblock(d: &[u8]) -> u64 {
    be64(d, be64(d, 48))
}

/// Every (guest cluster, host offset) pair the active L2 tables map to data.
fn mappings(d: &[u8]) -> Vec<(u64, u64)> {
    let per = CS / 8;
    let mut out = Vec::new();
    for i in 0..be32(d, 36) {
        let l2 = l2_table(d, i);
        if l2 == 0 {
            continue;
        }
        for j in 0..per {
            let host = be64(d, l2 + j * 8) & OFFSET_MASK;
            if host != 0 {
                out.push((i * per + j, host));
            }
        }
    }
    out
}

/// Reads into core buffers (cache loads) since the log was last cleared.
fn metadata_reads(h: &Harness) -> usize {
    h.log
        .iter()
        .filter(|l| {
            matches!(
                l,
                Log::Issued {
                    kind: IoKind::Read,
                    req: None,
                    ..
                }
            )
        })
        .count()
}

// ---- the rules ----

/// "A read of an allocated cluster is one data I/O with no wait on unrelated requests."
///
/// With an allocating write needing a new L2 table stalled, an allocating write under the
/// read's own L2 table stalled, and a flush stalled inside its write-back cycle (while it holds
/// its copy window), a read of an allocated cluster issues its single data read right at
/// submit, and finishes as soon as that op completes.
#[test]
fn read_of_allocated_cluster_waits_on_nothing_unrelated() {
    for seed in 1..=4 {
        let mut h = Harness::create(CacheMode::WriteBack, seed);
        h.finish(
            Request::Write { offset: 0, len: CS },
            vec![0x11; CS as usize],
        );
        h.finish(Request::Flush, Vec::new());
        let host0 = h.host_of(0);
        // Completed but not yet written back: the flush below has a cycle to run.
        h.finish(
            Request::Write {
                offset: 5 * CS,
                len: CS,
            },
            vec![0x55; CS as usize],
        );

        let w_table = h.write(2 * L2_SPAN + 3 * CS, CS, 0x22);
        assert!(!h.fresh.is_empty(), "the new L2 table's write is issued");
        let w_same = h.write(7 * CS, CS, 0x77);
        assert!(!h.ops_of(w_same).is_empty(), "the data write is issued");
        let flush = h.submit(Request::Flush, Vec::new());
        assert!(
            h.fresh.iter().any(|&id| writes_file(h.op(id).kind)),
            "the flush's write-back cycle started"
        );
        let mut held = h.pending_ids();
        held.sort();

        let r = h.read(0, CS);
        assert_eq!(
            h.fresh.len(),
            1,
            "the read is exactly one op, issued at submit"
        );
        let op = h.op(h.fresh[0]);
        assert_eq!(
            (op.kind, op.offset, op.len(), guest_req(op)),
            (IoKind::Read, host0, CS, Some(r)),
            "the read's op reads the cluster's host range into its buffer"
        );
        h.complete(h.fresh[0]);
        assert!(
            h.fresh.is_empty(),
            "completing the read issues nothing else"
        );
        assert_eq!(h.result(r), vec![0x11; CS as usize]);
        for req in [w_table, w_same, flush] {
            assert!(!h.is_done(req), "the stalled requests are still in flight");
        }
        let mut still = h.pending_ids();
        still.sort();
        assert_eq!(still, held, "no held op was touched");

        h.run_all();
        for req in [w_table, w_same, flush] {
            assert!(h.take_done(req).is_some());
        }
        assert_eq!(
            h.read_now(2 * L2_SPAN + 3 * CS, CS),
            vec![0x22; CS as usize]
        );
        assert_eq!(h.read_now(7 * CS, CS), vec![0x77; CS as usize]);
        h.close_and_check();
    }
}

/// "Requests that miss the same L2 slice share one load": with 4 KiB clusters (slices are
/// whole tables), and with 64 KiB clusters (4 KiB slices) under the default budget and a
/// small one.
#[test]
fn misses_on_the_same_l2_slice_share_one_load() {
    const N: u64 = 12;
    for (cs, budget) in [(CS, None), (65536, None), (65536, Some(16384))] {
        let mut h = Harness::create_with(CacheMode::WriteBack, cs, 7);
        for k in 0..N {
            h.finish(
                Request::Write {
                    offset: k * cs,
                    len: cs,
                },
                vec![k as u8 + 1; cs as usize],
            );
        }
        let mut h = h.reopen(budget);
        let l2 = l2_table(&h.disk, 0);
        assert_ne!(l2, 0);
        h.log.clear();

        let reads: Vec<ReqId> = (0..N).map(|k| h.read(k * cs, cs)).collect();
        assert_eq!(
            metadata_reads(&h),
            1,
            "one load for {N} reads under one L2 slice"
        );
        assert_eq!(h.pending.len(), 1, "every read waits for that load");
        let load = &h.pending[0];
        assert_eq!(
            (load.kind, load.offset, guest_req(load)),
            (IoKind::Read, l2, None),
            "the load reads the L2 table's first slice"
        );
        assert_eq!(load.len(), cs.min(4096));

        h.run_all();
        assert_eq!(metadata_reads(&h), 1);
        for (k, r) in reads.into_iter().enumerate() {
            assert_eq!(h.result(r), vec![k as u8 + 1; cs as usize], "read {k}");
        }
        h.close_and_check();
    }
}

/// "Requests that miss the same refcount block share one load": after a reopen, allocating
/// writes to different unallocated clusters all need refcount block 0.
#[test]
fn misses_on_the_same_refcount_block_share_one_load() {
    const N: u64 = 12;
    let mut h = Harness::create(CacheMode::WriteBack, 3);
    h.finish(Request::Write { offset: 0, len: CS }, vec![1; CS as usize]);
    let mut h = h.reopen(None);
    let (l2, rb) = (l2_table(&h.disk, 0), first_refblock(&h.disk));
    assert!(l2 != 0 && rb != 0);
    h.log.clear();

    let writes: Vec<ReqId> = (1..=N).map(|k| h.write(k * 2 * CS, CS, k as u8)).collect();
    // First the shared L2 load, then (once it completes) the shared refcount block load.
    assert_eq!(h.pending.len(), 1);
    assert_eq!(h.pending[0].offset, l2);
    h.complete(h.pending[0].id);
    assert_eq!(
        h.pending.len(),
        1,
        "every write waits for one refcount block load"
    );
    assert_eq!(
        (h.pending[0].kind, h.pending[0].offset),
        (IoKind::Read, rb),
        "the load reads refcount block 0"
    );
    h.run_all();
    assert_eq!(
        metadata_reads(&h),
        2,
        "one L2 load and one refcount block load in all"
    );
    for w in writes {
        assert!(h.take_done(w).is_some());
    }
    for k in 1..=N {
        assert_eq!(h.read_now(k * 2 * CS, CS), vec![k as u8; CS as usize]);
    }
    h.close_and_check();
}

/// "In-flight allocations are tracked per cluster range: an overlapping request waits or is
/// shortened, never takes a whole-table lock."
///
/// Two writes to the same unallocated cluster: the engine serializes them in submission
/// order (the second waits for the first's allocation to be linked, then writes in place), so
/// the later write wins where they overlap and the cluster is mapped once. A write to another
/// unallocated cluster under the same L2 table is not held up: it is issued, and even
/// finishes, while the first write's ops are all still outstanding.
#[test]
fn overlapping_allocating_writes_serialize_per_cluster_not_per_table() {
    for seed in 1..=6 {
        let mut h = Harness::create(CacheMode::WriteBack, seed);
        h.finish(
            Request::Write { offset: 0, len: CS },
            vec![0x11; CS as usize],
        );
        h.finish(Request::Flush, Vec::new());
        h.log.clear();

        let base = 2 * CS;
        let a = h.write(base, 3000, 0xaa);
        let a_ops = h.pending_ids();
        assert!(!h.ops_of(a).is_empty(), "the first write allocates at once");
        let b = h.write(base + 1000, 5000, 0xbb);
        assert!(
            h.ops_of(b).is_empty(),
            "the overlapping write waits for the cluster's allocation"
        );
        let c = h.write(4 * CS + 100, 200, 0xcc);
        assert!(
            !h.ops_of(c).is_empty(),
            "a write to another cluster of the same table is issued at once"
        );
        h.run_all_but(&a_ops);
        assert!(
            h.take_done(c).is_some(),
            "and finishes, the first write still stalled"
        );
        assert!(!h.is_done(a) && !h.is_done(b));
        assert!(h.ops_of(b).is_empty(), "the overlapping write still waits");

        h.run_all();
        assert!(h.take_done(a).is_some() && h.take_done(b).is_some());
        // B's data went out only after A's data write completed: serialized.
        // (Op ids are reused: each of A's ops is the first completion of its id.)
        let a_done = a_ops
            .iter()
            .map(|a| {
                h.log
                    .iter()
                    .position(|l| matches!(l, Log::Completed(id) if id == a))
                    .unwrap()
            })
            .max()
            .unwrap();
        let b_issued = h
            .log
            .iter()
            .position(|l| matches!(l, Log::Issued { req: Some(r), .. } if *r == b))
            .unwrap();
        assert!(b_issued > a_done);

        let mut want = vec![0u8; 2 * CS as usize];
        want[..3000].fill(0xaa);
        want[1000..6000].fill(0xbb);
        assert_eq!(h.read_now(base, 2 * CS), want, "seed {seed}");
        let mut want_c = vec![0u8; CS as usize];
        want_c[100..300].fill(0xcc);
        assert_eq!(h.read_now(4 * CS, CS), want_c);

        h.finish(Request::Flush, Vec::new());
        let disk = h.close_and_check();
        let maps = mappings(&disk);
        for gc in [2, 3, 4] {
            assert_eq!(
                maps.iter().filter(|m| m.0 == gc).count(),
                1,
                "guest cluster {gc} mapped once"
            );
        }
        let mut hosts: Vec<u64> = maps.iter().map(|m| m.1).collect();
        hosts.sort_unstable();
        hosts.dedup();
        assert_eq!(hosts.len(), maps.len(), "no host cluster mapped twice");
    }
}

/// "A read of a cluster being allocated waits for it": reads overlapping an allocating write
/// issue no read of that cluster while the write is in flight and return all-new data,
/// never a mix of old (zeroes) and new.
#[test]
fn reads_of_a_cluster_being_allocated_wait_and_see_all_new_data() {
    for seed in 1..=6 {
        let mut h = Harness::create(CacheMode::WriteBack, seed);
        h.finish(
            Request::Write { offset: 0, len: CS },
            vec![0x11; CS as usize],
        );
        h.finish(Request::Flush, Vec::new());

        let base = 2 * CS;
        let w = h.write(base, CS, 0x5a);
        let w_ops = h.pending_ids();
        let whole = h.read(base, CS);
        let part = h.read(base + 512, 1024);
        let span = h.read(CS, 3 * CS);
        for r in [whole, part] {
            assert!(
                h.ops_of(r).is_empty(),
                "no read of the cluster while it is allocated"
            );
        }
        // The spanning read may go on before the cluster (zeroes for cluster 1), not into it.
        h.run_all_but(&w_ops);
        for r in [whole, part, span] {
            assert!(!h.is_done(r), "reads wait for the allocation");
        }
        assert!(h.pending.iter().all(|o| w_ops.contains(&o.id)));

        h.run_all();
        assert!(h.take_done(w).is_some());
        assert_eq!(h.result(whole), vec![0x5a; CS as usize], "seed {seed}");
        assert_eq!(h.result(part), vec![0x5a; 1024]);
        let mut want = vec![0u8; 3 * CS as usize];
        want[CS as usize..2 * CS as usize].fill(0x5a);
        assert_eq!(h.result(span), want);
        h.close_and_check();
    }
}

/// Rule B: "the cluster is not reused ... while any in-flight I/O targets it". A read of a
/// cluster is held while the cluster is discarded and flushes complete; allocating writes
/// after that never write into its host range while the read is outstanding, and the read
/// returns the old data. Once it completes (and a flush releases the cluster), the cluster is
/// reused, so the allocator would have taken it.
#[test]
fn freed_cluster_is_not_reused_while_io_targets_it() {
    for seed in 1..=4 {
        let mut h = Harness::create(CacheMode::WriteBack, seed);
        h.finish(
            Request::Write { offset: 0, len: CS },
            vec![0x11; CS as usize],
        );
        h.finish(Request::Flush, Vec::new());
        let host = h.host_of(0);

        let r = h.read(0, CS);
        assert_eq!(h.fresh.len(), 1);
        let held = h.fresh[0];
        assert_eq!(h.op(held).offset, host);
        h.hold(held);

        h.finish(Request::Discard { offset: 0, len: CS }, Vec::new());
        assert_eq!(h.read_now(0, CS), vec![0; CS as usize], "discarded");
        for round in 0..3u64 {
            let f = h.submit(Request::Flush, Vec::new());
            h.run_all();
            assert!(
                h.take_done(f).is_some(),
                "flushes finish around the held read"
            );
            let writes: Vec<ReqId> = (0..4)
                .map(|k| h.write((8 + round * 4 + k) * CS + 512, 1024, 0x30 + k as u8))
                .collect();
            h.run_all();
            for w in writes {
                assert!(h.take_done(w).is_some());
            }
        }
        assert!(!h.is_done(r));
        h.release(held);
        assert_eq!(
            h.result(r),
            vec![0x11; CS as usize],
            "the read saw the old data"
        );

        // Now the cluster may be reused: the next flush releases it, the next write takes it.
        h.finish(Request::Flush, Vec::new());
        h.finish(
            Request::Write {
                offset: 100 * CS,
                len: CS,
            },
            vec![0x99; CS as usize],
        );
        assert_eq!(
            h.host_of(100 * CS),
            host,
            "the freed cluster is reused after all"
        );
        h.close_and_check();
    }
}

/// "Write-through makes each write durable before it completes; concurrent writes share one
/// flush (group commit)." 16 in-place writes in flight, their data ops completed before any
/// flush: at most two flushes in all, and each write's Done comes after a flush that was
/// issued after its data write completed and has itself completed.
#[test]
fn write_through_writes_share_flushes() {
    const N: u64 = 16;
    for seed in 1..=4 {
        let mut h = Harness::create(CacheMode::WriteThrough, seed);
        h.finish(
            Request::Write {
                offset: 0,
                len: N * CS,
            },
            vec![1; (N * CS) as usize],
        );
        h.log.clear();

        let writes: Vec<ReqId> = (0..N)
            .map(|k| h.write(k * CS, CS, 0x40 + k as u8))
            .collect();
        for &w in &writes {
            assert_eq!(h.ops_of(w).len(), 1, "in-place writes go out at once");
        }
        h.run_matching(|o| guest_req(o).is_some());
        h.run_all();

        let flushes = h
            .log
            .iter()
            .filter(|l| {
                matches!(
                    l,
                    Log::Issued {
                        kind: IoKind::Flush,
                        ..
                    }
                )
            })
            .count();
        assert!(
            (1..=2).contains(&flushes),
            "{flushes} flushes for {N} writes"
        );
        // Causality, on the log's clock.
        let mut kinds: HashMap<OpId, (IoKind, Option<ReqId>, usize)> = HashMap::new();
        let mut data_done: HashMap<ReqId, usize> = HashMap::new();
        let mut flushes_done: Vec<(usize, usize)> = Vec::new();
        for (t, l) in h.log.iter().enumerate() {
            match *l {
                Log::Issued { id, kind, req } => {
                    kinds.insert(id, (kind, req, t));
                }
                Log::Completed(id) => match kinds.remove(&id).unwrap() {
                    (IoKind::Flush, _, issued) => flushes_done.push((issued, t)),
                    (IoKind::Write, Some(r), _) => {
                        data_done.insert(r, t);
                    }
                    _ => {}
                },
                Log::Done(r) => {
                    let d = data_done[&r];
                    assert!(
                        flushes_done.iter().any(|&(i, _)| i > d),
                        "{r:?} done without a flush issued after its data write"
                    );
                }
            }
        }
        for (k, w) in writes.into_iter().enumerate() {
            assert!(h.take_done(w).is_some());
            assert_eq!(
                h.read_now(k as u64 * CS, CS),
                vec![0x40 + k as u8; CS as usize]
            );
        }
        h.close_and_check();
    }
}

/// "While the image grows, an allocating write does not wait for a flush's barriers": a
/// write into fresh host space whose refcount is on disk already (written ahead) is linked,
/// and finishes, while a write-back cycle holds its copy window with every op of it
/// outstanding; the flush still waits for its cycle. Afterwards everything reads back, and
/// the image checks clean.
#[test]
fn fresh_allocating_write_finishes_while_a_flush_cycle_runs() {
    for seed in 0..4 {
        let mut h = Harness::growing(256 << 10, seed);
        // The first writes make the L2 table, allocate host space ahead and count the next
        // clusters ahead; a flush makes all of it durable.
        h.write_now(0, CS, 1);
        h.write_now(CS, CS, 2);
        h.finish(Request::Flush, Vec::new());
        // Dirty the L2 slice, then stall a flush inside its cycle.
        h.write_now(2 * CS, CS, 3);
        let (flush, cycle) = h.stalled_flush();

        let fresh = h.write(5 * CS, CS, 4);
        h.run_all_but(&cycle);
        assert!(
            h.is_done(fresh),
            "seed {seed}: a fresh allocating write waited for the cycle"
        );
        assert!(!h.is_done(flush), "seed {seed}: the flush did not wait");
        h.run_all();
        assert!(h.take_done(flush).is_some());
        assert!(h.take_done(fresh).is_some());
        h.finish(Request::Flush, Vec::new());
        assert_eq!(h.read_now(5 * CS, CS), vec![4; CS as usize]);
        assert_eq!(h.read_now(0, CS), vec![1; CS as usize]);
        assert_eq!(h.read_now(2 * CS, CS), vec![3; CS as usize]);
        h.close_and_check();
    }
}

/// The other side of the rule above: with steps of 16 clusters only two are counted ahead
/// at a time, so of eight fresh writes sent while a cycle holds its window, those whose
/// counts no copy has taken yet must wait for the cycle (an entry written before its count
/// is durable would leave a referenced cluster with refcount 0 after a crash). Some
/// finish, some wait, and all read back in the end.
#[test]
fn fresh_writes_beyond_the_counts_on_disk_wait_for_the_cycle() {
    for seed in 0..4 {
        let mut h = Harness::growing(64 << 10, seed);
        h.write_now(0, CS, 1);
        h.finish(Request::Flush, Vec::new());
        h.write_now(CS, CS, 2);
        let (flush, cycle) = h.stalled_flush();

        let writes: Vec<_> = (0..8u64)
            .map(|k| h.write((8 + k) * CS, CS, 0x10 + k as u8))
            .collect();
        h.run_all_but(&cycle);
        let finished = writes.iter().filter(|&&w| h.is_done(w)).count();
        assert!(
            finished > 0 && finished < writes.len(),
            "seed {seed}: {finished} of {} writes finished inside the window",
            writes.len()
        );
        h.run_all();
        assert!(h.take_done(flush).is_some());
        for (k, w) in writes.into_iter().enumerate() {
            assert!(h.take_done(w).is_some());
            assert_eq!(
                h.read_now((8 + k as u64) * CS, CS),
                vec![0x10 + k as u8; CS as usize]
            );
        }
        h.close_and_check();
    }
}

/// "A guest flush costs one barrier once the counts and tables exist": a cycle that writes
/// L2 slices ends with the barrier after them, even when data completes while it runs. Such
/// data belongs to later flushes (whoever waits for this cycle asked before it began); the
/// next flush's cycle issues the barrier that covers it, and the data survives a reopen.
#[test]
fn data_completed_during_a_cycle_is_left_to_the_next_barrier() {
    let flushes_since = |h: &Harness, from: usize| {
        h.log[from..]
            .iter()
            .filter(|l| {
                matches!(
                    l,
                    Log::Issued {
                        kind: IoKind::Flush,
                        ..
                    }
                )
            })
            .count()
    };
    for seed in 0..4 {
        let (mut h, flush, mark, write) = Harness::write_behind_a_cycle_barrier(seed);
        assert!(h.take_done(write).is_some());
        h.run_all();
        assert!(h.take_done(flush).is_some());
        assert_eq!(
            flushes_since(&h, mark),
            1,
            "seed {seed}: the cycle added a barrier for data completed after it began"
        );
        // The next flush makes that write durable: one barrier, nothing else to write.
        let mark = h.log.len();
        h.finish(Request::Flush, Vec::new());
        assert_eq!(
            flushes_since(&h, mark),
            1,
            "seed {seed}: the write completed during the cycle was never made durable"
        );
        let mut h = h.reopen(None);
        assert_eq!(h.read_now(0, CS), vec![3; CS as usize]);
        assert_eq!(h.read_now(CS, CS), vec![2; CS as usize]);
        h.close_and_check();
    }
}

/// Whether the log shows a flush issued after the data write of request `write` completed
/// and completed itself before request `by`, sent at log index `sent`, was done (request
/// ids are reused).
fn flushed_between(log: &[Log], write: ReqId, by: ReqId, sent: usize) -> bool {
    let mut ops: HashMap<OpId, (IoKind, Option<ReqId>, usize)> = HashMap::new();
    let mut written = None;
    for (t, l) in log.iter().enumerate() {
        match *l {
            Log::Issued { id, kind, req } => {
                ops.insert(id, (kind, req, t));
            }
            Log::Completed(id) => match ops.remove(&id) {
                Some((IoKind::Write, Some(r), _)) if r == write => written = Some(t),
                Some((IoKind::Flush, _, issued)) if written.is_some_and(|w| issued > w) => {
                    return true
                }
                _ => {}
            },
            Log::Done(r) if r == by && t >= sent => return false,
            Log::Done(_) => {}
        }
    }
    false
}

/// "A guest flush covers every write completed before it was sent": sent while a cycle's
/// barrier is in flight, after a write that completed behind that barrier, the flush waits
/// for a barrier issued after the write (the running cycle's does not cover it).
#[test]
fn a_flush_sent_during_a_cycle_waits_for_a_barrier_after_its_writes() {
    for seed in 0..4 {
        let (mut h, first, _, write) = Harness::write_behind_a_cycle_barrier(seed);
        assert!(h.take_done(write).is_some());
        let mark = h.log.len();
        let second = h.submit(Request::Flush, Vec::new());
        h.run_all();
        assert!(h.take_done(first).is_some() && h.take_done(second).is_some());
        let log = &h.log[mark - 4..];
        assert!(
            flushed_between(&h.log, write, second, mark),
            "seed {seed}: the flush finished before the write was durable: {log:?}"
        );
        h.close_and_check();
    }
}

/// "Write-through makes each write durable before it completes", when the write changes
/// nothing: zeroes written over a range that reads as zeroes only because of a discard not
/// yet written back finish after a barrier that follows that discard's write-back (else a
/// crash brings the discarded data back under a completed write of zeroes).
#[test]
fn write_through_zeroes_over_an_unflushed_discard_wait_for_it() {
    for seed in 1..=4 {
        let mut h = Harness::create(CacheMode::WriteThrough, seed);
        h.write_now(0, CS, 1);
        h.finish(Request::Discard { offset: 0, len: CS }, Vec::new());
        let mark = h.log.len();
        let zeroes = h.submit(
            Request::WriteZeroes {
                offset: 0,
                len: CS / 2,
                unmap: false,
            },
            Vec::new(),
        );
        h.run_all();
        assert!(h.take_done(zeroes).is_some());
        let log = &h.log[mark..];
        let done = log
            .iter()
            .position(|l| matches!(l, Log::Done(r) if *r == zeroes))
            .expect("done");
        // (Op ids are reused: the kind is the one of the id's latest issue.)
        let mut kinds: HashMap<OpId, IoKind> = HashMap::new();
        let flushed = log[..done].iter().any(|l| match *l {
            Log::Issued { id, kind, .. } => {
                kinds.insert(id, kind);
                false
            }
            Log::Completed(id) => kinds.get(&id) == Some(&IoKind::Flush),
            Log::Done(_) => false,
        });
        assert!(
            flushed,
            "seed {seed}: no barrier before the zeroes completed: {log:?}"
        );
        let mut h = h.reopen(None);
        assert_eq!(h.read_now(0, CS), vec![0; CS as usize]);
        h.close_and_check();
    }
}
