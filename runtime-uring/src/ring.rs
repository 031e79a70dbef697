//! The loop around the engine and the ring. It turns every op into a submission entry,
//! submits them in batches, and feeds completions back. All of the crate's unsafe code is
//! here; `UNSAFE.md` lists each block.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring, Probe};
use qcow2_async::{guest_req, Driver, GuestSlot};
use qcow2_proto::{IoBuf, IoError, IoKind, IoOp, Segment, Target};
use qcow2_sync::exec::{Executor, Guest};
use qcow2_sync::{Cache, Chain, Error, HostFile};

use crate::join::{run_len, Span, Stream};

/// Memory alignment O_DIRECT gets from us (the core's pages).
const ALIGN: usize = 4096;
/// Offset and length granularity of O_DIRECT.
const SECTOR: u64 = 512;

/// Builds an entry against the image file (or, with a target, the file of the backing
/// chain it names): the registered index when registration worked, the raw descriptor
/// otherwise.
macro_rules! on_file {
    ($l:expr, |$fd:ident| $build:expr) => {
        on_file!($l, Target::Image, |$fd| $build)
    };
    ($l:expr, $target:expr, |$fd:ident| $build:expr) => {{
        let index = $l.index($target);
        if $l.fixed {
            let $fd = types::Fixed(index);
            $build
        } else {
            let $fd = types::Fd($l.raw_fd(index));
            $build
        }
    }};
}

/// A ring that passed the probe.
pub(crate) struct Ring(IoUring);

impl std::os::fd::AsFd for Ring {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Waits in `io_uring_enter` until the ring behind `fd` holds a completion, submitting
/// nothing (so it may run beside a thread that pushes entries).
pub(crate) fn wait_for_completion(fd: &impl AsRawFd) -> io::Result<()> {
    const GETEVENTS: libc::c_uint = 1;
    // SAFETY: nothing to submit and no argument: the kernel reads and writes no memory of
    // ours; the descriptor is the caller's, open for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_io_uring_enter,
            fd.as_raw_fd(),
            0 as libc::c_uint,
            1 as libc::c_uint,
            GETEVENTS,
            std::ptr::null::<libc::c_void>(),
            0 as libc::size_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Ring {
    /// Sets up a ring of `entries` and checks every opcode the runtime uses. Unless
    /// `interrupt`, completions for a thread busy in user space wait for it to enter the
    /// kernel rather than interrupt it (`IORING_SETUP_COOP_TASKRUN`, with the flag that
    /// tells a poller they wait: [`Loop::has_completions`]); a kernel older than 5.19
    /// refuses those flags, and gets a ring without them.
    pub(crate) fn new(entries: u32, interrupt: bool) -> Result<Self, Error> {
        let coop = (!interrupt)
            .then(|| {
                IoUring::builder()
                    .setup_coop_taskrun()
                    .setup_taskrun_flag()
                    .build(entries)
                    .ok()
            })
            .flatten();
        let ring = coop.map_or_else(|| IoUring::new(entries), Ok);
        let ring = ring.map_err(|source| Error::Runtime {
            what: "io_uring_setup failed (this kernel lacks io_uring, or it is disabled by \
                   kernel.io_uring_disabled or a seccomp filter)",
            source,
        })?;
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|source| Error::Runtime {
                what: "io_uring opcode probe failed (IORING_REGISTER_PROBE needs Linux 5.6)",
                source,
            })?;
        match missing_opcode(|code| probe.is_supported(code)) {
            None => Ok(Self(ring)),
            Some(what) => Err(Error::Runtime {
                what,
                source: io::ErrorKind::Unsupported.into(),
            }),
        }
    }
}

/// The first opcode the runtime needs that `supported` lacks, named for the error.
fn missing_opcode(supported: impl Fn(u8) -> bool) -> Option<&'static str> {
    [
        (opcode::Readv::CODE, "io_uring lacks IORING_OP_READV"),
        (opcode::Writev::CODE, "io_uring lacks IORING_OP_WRITEV"),
        (opcode::Fsync::CODE, "io_uring lacks IORING_OP_FSYNC"),
        (
            opcode::Fallocate::CODE,
            "io_uring lacks IORING_OP_FALLOCATE (needs Linux 5.6)",
        ),
    ]
    .into_iter()
    .find(|(code, _)| !supported(*code))
    .map(|(_, what)| what)
}

/// A read or write in flight: its op, the iovecs the kernel reads (boxed: stable address),
/// and the aligned bounce buffer when the guest memory could not go to O_DIRECT as it is.
struct Flight {
    op: IoOp,
    /// The op's memory, in file order.
    mem: [libc::iovec; 3],
    nmem: usize,
    /// What the kernel is given: `mem`, or the bounce buffer; advanced after short I/O.
    iov: [libc::iovec; 3],
    niov: usize,
    /// Bytes of the I/O done so far.
    done: usize,
    /// The I/O's host offset and length (the bounce span, when bouncing).
    offset: u64,
    len: usize,
    /// Bounce buffer covering `offset..offset + len`; the op's bytes start `head` into it.
    bounce: Option<IoBuf>,
    head: usize,
    /// Times the kernel cancelled it (see [`RESUBMIT`]).
    cancelled: u8,
}

/// Adjacent reads (or writes) submitted as one entry (`join.rs`). Each member keeps its
/// own `Flight` (its slot, iovecs and op); the group's slot holds the joined iovecs.
struct Group {
    members: Vec<usize>,
    iov: Vec<libc::iovec>,
    read: bool,
    target: Target,
    offset: u64,
    len: usize,
    cancelled: u8,
}

/// A non-I/O op in flight (flush, fallocate).
struct Plain {
    op: IoOp,
    entry: squeue::Entry,
    cancelled: u8,
}

/// How often an op the kernel cancelled is submitted again. The kernel cancels the ops a
/// thread submitted that had not started when the thread exited (callers submit; see
/// `hub.rs`); they did not happen, and go again from the thread reaping them.
const RESUBMIT: u8 = 8;

/// Whether an op that completed with `res` goes again (counted in `cancelled`).
fn go_again(res: i32, cancelled: &mut u8) -> bool {
    let again = res == -libc::ECANCELED && *cancelled < RESUBMIT;
    *cancelled += u8::from(again);
    again
}

fn iovec(ptr: *mut u8, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: ptr.cast(),
        iov_len: len,
    }
}

fn invalid() -> IoError {
    IoError {
        kind: io::ErrorKind::InvalidInput,
        raw_os_error: None,
    }
}

fn os_error(res: i32) -> IoError {
    IoError::from(&io::Error::from_raw_os_error(-res))
}

/// The engine (in its driver), the ring, and the ops in flight.
pub(crate) struct Loop {
    ring: IoUring,
    d: Driver,
    file: File,
    /// The backing chain's files (ops on them are only ever reads) and the data file.
    chain: Chain,
    /// Registered index of the data file (after the image and the backing chain).
    data_index: u32,
    fixed: bool,
    direct: bool,
    ignore_flush: bool,
    /// Runs the few ops io_uring does not take (set-len, fallocate fallbacks) in-thread.
    exec: Executor,
    /// Ops in flight by slot; `None` for free slots and for non-I/O ops (flush, fallocate)
    /// whose `IoOp` sits in `plain` with its entry (kept to resubmit).
    flights: Vec<Option<Box<Flight>>>,
    plain: Vec<Option<Plain>>,
    groups: Vec<Option<Group>>,
    free: Vec<usize>,
    /// Reads and writes started in this turn (by slot), submitted at its end, joined
    /// where adjacent.
    started: Vec<(Span, usize)>,
    stream: Stream,
    inflight: usize,
    /// Zeroes for `Segment::Zeroes` in writes; grows, never shrinks while in use.
    zeroes: Vec<IoBuf>,
    /// Completions taken from the ring in a turn (kept for its capacity).
    cqes: Vec<(u64, i32)>,
    syncs: u64,
    bounced: u64,
}

// SAFETY: the raw pointers in `flights` and `groups` (iovecs) point into memory the loop or
// the driver's request table owns (bounce buffers, op buffers, boxed guest buffers), none of
// it tied to a thread; every access to the loop goes through the hub's mutex.
unsafe impl Send for Loop {}

/// Aborts if a thread unwinds out of the loop with I/O in flight: the kernel may still write
/// into buffers the unwinding would free (or the loop's state may be half updated).
/// (A thread already unwinding when the guard is made, dropping a handle, is let through.)
pub(crate) struct AbortOnUnwind(bool);

impl AbortOnUnwind {
    pub(crate) fn new() -> Self {
        Self(std::thread::panicking())
    }
}

impl Drop for AbortOnUnwind {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.0 {
            eprintln!(
                "qcow2-uring: a panic inside the ring loop; aborting to keep in-flight I/O sound"
            );
            std::process::abort();
        }
    }
}

impl Loop {
    /// The loop for an image that finished opening.
    pub(crate) fn new(ring: Ring, d: Driver, files: (File, Chain), cache: Cache) -> Self {
        let (file, chain) = files;
        let mut fds: Vec<_> = std::iter::once(file.as_raw_fd())
            .chain((1..).map_while(|d| chain.file(d).map(|f| f.as_raw_fd())))
            .collect();
        let data_index = fds.len() as u32;
        if let Some(f) = chain.data_file() {
            fds.push(f.as_raw_fd());
        }
        let fixed = ring.0.submitter().register_files(&fds).is_ok();
        Self {
            ring: ring.0,
            d,
            file,
            chain,
            data_index,
            fixed,
            direct: cache.direct(),
            ignore_flush: cache == Cache::Unsafe,
            exec: Executor::for_cache(cache),
            flights: Vec::new(),
            plain: Vec::new(),
            groups: Vec::new(),
            free: Vec::new(),
            started: Vec::new(),
            stream: Stream::default(),
            inflight: 0,
            zeroes: Vec::new(),
            cqes: Vec::new(),
            syncs: 0,
            bounced: 0,
        }
    }

    /// Ops in flight in the ring.
    pub(crate) fn inflight(&self) -> usize {
        self.inflight
    }

    /// Whether the ring holds completions not yet fed back (one load of the queue's tail).
    /// When the kernel flags completions of this thread's ops waiting for it to enter
    /// (`IORING_SQ_TASKRUN`, cooperative rings), enters to post them first: a polling
    /// reaper is busy in user space, and the kernel does not interrupt it for them.
    pub(crate) fn has_completions(&mut self) -> bool {
        if !self.ring.completion().is_empty() {
            return true;
        }
        if !self.ring.submission().taskrun() {
            return false;
        }
        const GETEVENTS: u32 = 1;
        // SAFETY: nothing to submit, no completion awaited and no argument: the kernel runs
        // the thread's pending completion work, which writes only the ring's own queues.
        // (An error leaves the completions to the next entry; nothing to handle here.)
        let _ = unsafe {
            self.ring
                .submitter()
                .enter::<libc::sigset_t>(0, 0, GETEVENTS, None)
        };
        !self.ring.completion().is_empty()
    }

    /// Whether the reads and writes lately started where the last of their kind ended:
    /// commands queued together are then worth taking in together (`hub.rs`).
    pub(crate) fn sequential(&self) -> bool {
        self.stream.sequential()
    }

    /// Whether the loop may end (see [`Driver::finished`]).
    pub(crate) fn finished(&self) -> bool {
        self.d.finished(self.inflight)
    }

    /// One turn: with `reap`, feeds every completion the ring holds to the engine; then takes
    /// the queued commands, starts every op the engine yields, answers finished requests and
    /// submits. Returns whether it answered any request.
    pub(crate) fn turn(&mut self, reap: bool) -> bool {
        let answered = self.d.answered();
        if reap {
            let mut cqes = std::mem::take(&mut self.cqes);
            cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for (slot, res) in cqes.drain(..) {
                self.finish(slot as usize, res);
            }
            self.cqes = cqes;
        }
        self.d.accept_ready();
        // Until quiet: commands taken from the backlog may have made more ops.
        loop {
            while let Some(op) = self.d.engine.poll_io() {
                self.start(op);
            }
            // Counts first: a caller that sees its request done sees its syncs counted.
            self.flush_counts();
            if !self.d.events() {
                break;
            }
        }
        self.submit_started();
        if !self.ring.submission().is_empty() {
            match self.ring.submit() {
                Ok(_) => {}
                // Entries stay queued; the next turn submits them (EBUSY: completions must
                // be reaped first, and something is in flight to reap).
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                Err(e) => panic!("io_uring_enter failed: {e}"),
            }
        }
        self.d.answered() != answered
    }

    /// Ends the loop once [`finished`](Self::finished): the ring lets go of the files first
    /// (registered files hold a reference), then the files and their locks go, then `close`
    /// is answered.
    pub(crate) fn shutdown(self) {
        let Loop {
            d,
            file,
            chain,
            ring,
            fixed,
            ..
        } = self;
        if fixed {
            // Synchronous, unlike the ring's own teardown: the file reference goes now.
            let _ = ring.submitter().unregister_files();
        }
        drop(ring);
        drop(file);
        drop(chain);
        d.shutdown();
    }

    /// The registered index of `target`'s file: 0 the image, then the backing chain by
    /// depth, then the data file.
    fn index(&self, target: Target) -> u32 {
        match target {
            Target::Backing(d) => d,
            Target::DataFile => self.data_index,
            _ => 0,
        }
    }

    /// The descriptor of the file at registered `index` (see [`index`](Self::index)); -1
    /// (the op then fails with EBADF) for a file the chain does not have.
    fn raw_fd(&self, index: u32) -> RawFd {
        match index {
            0 => self.file.as_raw_fd(),
            i if i == self.data_index => self.chain.data_file().map_or(-1, |f| f.as_raw_fd()),
            d => self.chain.file(d).map_or(-1, |f| f.as_raw_fd()),
        }
    }

    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every entry points only at memory that stays valid and unmoved until
            // its completion is reaped: iovecs and bounce buffers in a boxed `Flight` kept in
            // `flights` (a group's iovecs in its vector, never grown, kept in `groups`; its
            // members stay in `flights` until the group completes), guest buffers boxed in
            // the driver's request table (a request is not done, so its buffer not released,
            // before all its ops complete), core buffers inside the op the `Flight` holds.
            // Entries without memory hold nothing.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            // The queue is full: hand what is there to the kernel and retry.
            if let Err(e) = self.ring.submit() {
                if e.raw_os_error() != Some(libc::EBUSY) {
                    panic!("io_uring_enter failed: {e}");
                }
                std::thread::yield_now();
            }
        }
    }

    fn slot(&mut self) -> usize {
        self.inflight += 1;
        self.free.pop().unwrap_or_else(|| {
            self.flights.push(None);
            self.plain.push(None);
            self.groups.push(None);
            self.flights.len() - 1
        })
    }

    fn release(&mut self, slot: usize) {
        self.inflight -= 1;
        self.free.push(slot);
    }

    fn flush_counts(&mut self) {
        let (syncs, bounced) = (
            self.syncs + std::mem::take(&mut self.exec.syncs),
            self.bounced + std::mem::take(&mut self.exec.bounced),
        );
        if syncs + bounced > 0 {
            self.d.count(syncs, bounced);
            (self.syncs, self.bounced) = (0, 0);
        }
    }

    fn start(&mut self, mut op: IoOp) {
        match op.kind {
            // (Backing files are only read; the data file takes guest reads and writes here;
            // anything else on them runs the blocking way.)
            IoKind::Read | IoKind::Write | IoKind::ZeroFill if op.target != Target::Image => {
                if op.kind == IoKind::ZeroFill {
                    let r = self.zero_fill(&mut op);
                    self.d.engine.complete(op, r);
                } else {
                    self.start_rw(op);
                }
            }
            _ if op.target != Target::Image => {
                let r = match self.chain.pick(&self.file, op.target) {
                    Ok(f) => self.exec.run(f, &mut op, &mut Guest::None),
                    Err(e) => Err(e),
                };
                self.d.engine.complete(op, r);
            }
            IoKind::Read | IoKind::Write => self.start_rw(op),
            IoKind::ZeroFill => {
                let r = self.zero_fill(&mut op);
                self.d.engine.complete(op, r);
            }
            IoKind::Decompress { .. } => {
                let r = self.decompress(&mut op);
                self.d.engine.complete(op, r);
            }
            IoKind::Compress { .. } => {
                let r = self.compress(&mut op);
                self.d.engine.complete(op, r);
            }
            IoKind::Flush if self.ignore_flush => {
                self.syncs += 1;
                self.d.engine.complete(op, Ok(0));
            }
            IoKind::Flush => {
                let e = on_file!(self, |fd| opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build());
                self.start_plain(op, e);
            }
            IoKind::Allocate { len } => {
                let e = on_file!(self, |fd| opcode::Fallocate::new(fd, len)
                    .offset(op.offset)
                    .build());
                self.start_plain(op, e);
            }
            IoKind::PunchHole { len } => {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                let e = on_file!(self, |fd| opcode::Fallocate::new(fd, len)
                    .offset(op.offset)
                    .mode(mode)
                    .build());
                self.start_plain(op, e);
            }
            IoKind::WriteZeroes { len } => {
                let e = on_file!(self, |fd| opcode::Fallocate::new(fd, len)
                    .offset(op.offset)
                    .mode(libc::FALLOC_FL_ZERO_RANGE)
                    .build());
                self.start_plain(op, e);
            }
            // Set-len, and anything newer: in-thread, the blocking way.
            _ => {
                let r = self.exec.run(&self.file, &mut op, &mut Guest::None);
                self.d.engine.complete(op, r);
            }
        }
    }

    fn start_plain(&mut self, op: IoOp, entry: squeue::Entry) {
        let slot = self.slot();
        let entry = entry.user_data(slot as u64);
        self.plain[slot] = Some(Plain {
            op,
            entry: entry.clone(),
            cancelled: 0,
        });
        self.push(entry);
    }

    /// The request's guest memory: the start of byte 0 of the request, and the bytes there.
    fn guest(&mut self, op: &IoOp) -> Option<(*mut u8, usize)> {
        match self.d.guest(guest_req(op)?)? {
            (GuestSlot::Owned(buf), base) => {
                let s = &mut buf.as_mut_slice()[base..];
                Some((s.as_mut_ptr(), s.len()))
            }
            _ => None,
        }
    }

    /// The op's memory as iovecs; `None` when a guest span is out of its buffer.
    fn memory(&mut self, op: &mut IoOp) -> Option<([libc::iovec; 3], usize)> {
        let guest = self.guest(op);
        let mut mem = [iovec(std::ptr::null_mut(), 0); 3];
        let mut n = 0;
        for seg in op.segments.iter_mut() {
            mem[n] = match seg {
                Segment::Guest { start, len, .. } => {
                    let (base, avail) = guest?;
                    if start.checked_add(*len)? > avail {
                        return None;
                    }
                    // In bounds of the buffer, checked just above.
                    iovec(base.wrapping_add(*start), *len)
                }
                Segment::Buf(b) => iovec(b.as_mut_slice().as_mut_ptr(), b.len()),
                Segment::Zeroes(len) => {
                    if op.kind == IoKind::Read {
                        // Reads never carry zero segments; refuse rather than guess.
                        return None;
                    }
                    iovec(self.zero_memory(*len), *len)
                }
                _ => return None,
            };
            n += 1;
        }
        Some((mem, n))
    }

    /// `len` bytes of zeroes that stay put until the thread ends.
    fn zero_memory(&mut self, len: usize) -> *mut u8 {
        if self.zeroes.last().is_none_or(|z| z.len() < len) {
            self.zeroes.push(IoBuf::zeroed(len.max(1 << 20)));
        }
        let z = self.zeroes.last_mut().expect("just ensured");
        z.as_mut_slice().as_mut_ptr()
    }

    fn zero_fill(&mut self, op: &mut IoOp) -> Result<usize, IoError> {
        let (mem, n) = self.memory(op).ok_or_else(invalid)?;
        for m in &mem[..n] {
            // SAFETY: `memory` checked each span against its buffer; zero-fill ops never
            // share a guest span with an op in flight (the core's contract).
            unsafe { std::ptr::write_bytes(m.iov_base.cast::<u8>(), 0, m.iov_len) };
        }
        Ok(op.len() as usize)
    }

    /// Compression, in this thread (CPU work of a compressed write).
    fn compress(&mut self, op: &mut IoOp) -> Result<usize, IoError> {
        let (mem, n) = self.memory(op).ok_or_else(invalid)?;
        if n == 0 || !matches!(op.segments.first(), Some(Segment::Guest { .. })) {
            return Err(invalid());
        }
        let m = mem[0];
        // SAFETY: `memory` checked the span against its guest buffer, which the driver
        // keeps alive while the op is out; the op only reads it, and the slice is dropped
        // before the op completes.
        let input = unsafe { std::slice::from_raw_parts(m.iov_base.cast::<u8>(), m.iov_len) };
        qcow2_proto::compress_op(op, input)
    }

    /// Decompression, in this thread (CPU work of a compressed cluster read).
    fn decompress(&mut self, op: &mut IoOp) -> Result<usize, IoError> {
        let (mem, n) = self.memory(op).ok_or_else(invalid)?;
        let out = match op.segments.last() {
            Some(Segment::Guest { .. }) if n > 0 => {
                let m = mem[n - 1];
                // SAFETY: `memory` checked the span against its guest buffer, which the
                // driver keeps alive while the op is out; no other op in flight shares a
                // guest span with it (the core's contract), and the slice is dropped
                // before the op completes.
                Some(unsafe { std::slice::from_raw_parts_mut(m.iov_base.cast::<u8>(), m.iov_len) })
            }
            _ => None,
        };
        qcow2_proto::decompress_op(op, out)
    }

    fn start_rw(&mut self, mut op: IoOp) {
        let Some((mem, nmem)) = self.memory(&mut op) else {
            return self.d.engine.complete(op, Err(invalid()));
        };
        let total = op.len() as usize;
        let aligned = op.offset % SECTOR == 0
            && mem[..nmem]
                .iter()
                .all(|m| m.iov_base as usize % ALIGN == 0 && m.iov_len as u64 % SECTOR == 0);
        let mut f = Box::new(Flight {
            offset: op.offset,
            op,
            mem,
            nmem,
            iov: mem,
            niov: nmem,
            done: 0,
            len: total,
            bounce: None,
            head: 0,
            cancelled: 0,
        });
        if self.direct && !aligned {
            if let Err(e) = self.bounce(&mut f) {
                return self.d.engine.complete(f.op, Err(e));
            }
        }
        let span = Span {
            write: f.op.kind != IoKind::Read,
            file: self.index(f.op.target),
            offset: f.offset,
            len: f.len,
            iovs: f.niov,
        };
        let slot = self.slot();
        self.flights[slot] = Some(f);
        self.started.push((span, slot));
    }

    /// Submits the reads and writes started in this turn, runs of adjacent ones as one
    /// entry each (`join.rs`).
    fn submit_started(&mut self) {
        let mut started = std::mem::take(&mut self.started);
        started.sort_unstable();
        let mut rest = &started[..];
        while !rest.is_empty() {
            let n = run_len(rest, |&(span, _)| span);
            for (span, _) in &rest[..n] {
                self.stream.note(span);
            }
            if n == 1 {
                self.submit_rw(rest[0].1);
            } else {
                self.submit_group(&rest[..n]);
            }
            rest = &rest[n..];
        }
        started.clear();
        self.started = started;
    }

    /// Submits adjacent flights `members` (in file order) as one entry.
    fn submit_group(&mut self, members: &[(Span, usize)]) {
        let members: Vec<usize> = members.iter().map(|&(_, slot)| slot).collect();
        let mut iov = Vec::with_capacity(members.len() * 2);
        let mut len = 0;
        for &m in &members {
            let f = self.flights[m].as_ref().expect("started");
            iov.extend_from_slice(&f.iov[..f.niov]);
            len += f.len;
        }
        let first = self.flights[members[0]].as_ref().expect("started");
        let (offset, read, target) = (first.offset, first.op.kind == IoKind::Read, first.op.target);
        self.d.count_joined(members.len() as u64);
        let slot = self.slot();
        self.groups[slot] = Some(Group {
            members,
            iov,
            read,
            target,
            offset,
            len,
            cancelled: 0,
        });
        self.push_group(slot);
    }

    fn push_group(&mut self, slot: usize) {
        let g = self.groups[slot].as_ref().expect("in flight");
        let iov = (g.iov.as_ptr(), g.iov.len() as u32);
        self.push_vectored(slot, g.read, g.target, iov, g.offset);
    }

    /// A group's completion: all of it done completes each member; anything else (an
    /// error, a short transfer) sends each member again on its own, to end as it would have.
    fn finish_group(&mut self, slot: usize, mut g: Group, res: i32) {
        if go_again(res, &mut g.cancelled) {
            self.groups[slot] = Some(g);
            return self.push_group(slot);
        }
        self.release(slot);
        let whole = usize::try_from(res).is_ok_and(|n| n == g.len);
        for &m in &g.members {
            if whole {
                let len = self.flights[m].as_ref().expect("a member").len;
                self.finish(m, len as i32);
            } else {
                self.submit_rw(m);
            }
        }
    }

    /// Routes the op through an aligned buffer spanning whole sectors: writes copy their
    /// data in (reading the partial edge sectors first), reads copy out at completion.
    fn bounce(&mut self, f: &mut Flight) -> Result<(), IoError> {
        let start = f.offset / SECTOR * SECTOR;
        let end = (f.offset + f.len as u64).div_ceil(SECTOR) * SECTOR;
        let span = (end - start) as usize;
        let head = (f.offset - start) as usize;
        let mut b = IoBuf::zeroed(span);
        if f.op.kind == IoKind::Write {
            let buf = b.as_mut_slice();
            if head != 0 || span != head + f.len {
                // Read-modify-write of the partial sectors: rare (unaligned guest offsets under
                // O_DIRECT), so done right here with blocking reads.
                let mut edge = IoBuf::zeroed(SECTOR as usize);
                let file = self.chain.pick(&self.file, f.op.target)?;
                for sector in [start, end - SECTOR] {
                    let at = (sector - start) as usize;
                    read_full(file, edge.as_mut_slice(), sector).map_err(|e| IoError::from(&e))?;
                    buf[at..at + SECTOR as usize].copy_from_slice(edge.as_slice());
                }
            }
            let mut pos = head;
            for m in &f.mem[..f.nmem] {
                // SAFETY: `memory` checked the span; the op only reads it.
                let src = unsafe { std::slice::from_raw_parts(m.iov_base.cast::<u8>(), m.iov_len) };
                buf[pos..pos + src.len()].copy_from_slice(src);
                pos += src.len();
            }
        }
        self.bounced += f.len as u64;
        f.iov[0] = iovec(b.as_mut_slice().as_mut_ptr(), span);
        f.niov = 1;
        f.offset = start;
        f.len = span;
        f.head = head;
        f.bounce = Some(b);
        Ok(())
    }

    fn submit_rw(&mut self, slot: usize) {
        let f = self.flights[slot].as_ref().expect("in flight");
        let (read, target) = (f.op.kind == IoKind::Read, f.op.target);
        let iov = (f.iov.as_ptr(), f.niov as u32);
        self.push_vectored(slot, read, target, iov, f.offset + f.done as u64);
    }

    /// Pushes a vectored read or write of `iov` (pointer, count) at `at`, for `slot`.
    fn push_vectored(
        &mut self,
        slot: usize,
        read: bool,
        target: Target,
        (iov, n): (*const libc::iovec, u32),
        at: u64,
    ) {
        let entry = if read {
            on_file!(self, target, |fd| opcode::Readv::new(fd, iov, n)
                .offset(at)
                .build())
        } else {
            on_file!(self, target, |fd| opcode::Writev::new(fd, iov, n)
                .offset(at)
                .build())
        };
        self.push(entry.user_data(slot as u64));
    }

    fn finish(&mut self, slot: usize, res: i32) {
        if let Some(g) = self.groups[slot].take() {
            return self.finish_group(slot, g, res);
        }
        if let Some(mut p) = self.plain[slot].take() {
            if go_again(res, &mut p.cancelled) {
                let entry = p.entry.clone();
                self.plain[slot] = Some(p);
                return self.push(entry);
            }
            self.release(slot);
            return self.finish_plain(p.op, res);
        }
        let mut f = self.flights[slot]
            .take()
            .expect("a completion for a slot in flight");
        let read = f.op.kind == IoKind::Read;
        if go_again(res, &mut f.cancelled) {
            self.flights[slot] = Some(f);
            return self.submit_rw(slot);
        }
        let result = if res < 0 {
            Err(os_error(res))
        } else if res == 0 && f.done < f.len && !read {
            Err(IoError {
                kind: io::ErrorKind::WriteZero,
                raw_os_error: None,
            })
        } else {
            let n = res as usize;
            f.done += n;
            if f.done < f.len && n > 0 {
                // Short I/O: go on from where it stopped.
                advance(&mut f.iov, &mut f.niov, n);
                self.flights[slot] = Some(f);
                return self.submit_rw(slot);
            }
            Ok(())
        };
        self.release(slot);
        let r = result.map(|()| {
            if read {
                self.finish_read(&mut f)
            } else {
                f.op.len() as usize
            }
        });
        self.d.engine.complete(f.op, r);
    }

    /// Zero-fills what lay past the end of file and copies bounced bytes out; returns the
    /// bytes of the op actually read from the file.
    fn finish_read(&mut self, f: &mut Flight) -> usize {
        let want = f.op.len() as usize;
        if let Some(b) = &mut f.bounce {
            b.as_mut_slice()[f.done..].fill(0);
            let mut pos = f.head;
            for m in &f.mem[..f.nmem] {
                // SAFETY: `memory` checked the span, and no other op in flight touches it.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(m.iov_base.cast::<u8>(), m.iov_len) };
                dst.copy_from_slice(&b.as_slice()[pos..pos + dst.len()]);
                pos += dst.len();
            }
            return f.done.saturating_sub(f.head).min(want);
        }
        let mut skip = f.done;
        for m in &f.mem[..f.nmem] {
            let keep = skip.min(m.iov_len);
            skip -= keep;
            // SAFETY: as above; only the part past what the kernel filled is zeroed.
            unsafe {
                std::ptr::write_bytes(m.iov_base.cast::<u8>().add(keep), 0, m.iov_len - keep)
            };
        }
        f.done
    }

    fn finish_plain(&mut self, mut op: IoOp, res: i32) {
        if op.kind == IoKind::Flush {
            self.syncs += 1;
        }
        let r = match res {
            0.. => Ok(0),
            // fallocate modes this filesystem lacks: the blocking executor has fallbacks.
            _ if matches!(
                op.kind,
                IoKind::Allocate { .. } | IoKind::PunchHole { .. } | IoKind::WriteZeroes { .. }
            ) && matches!(-res, libc::EOPNOTSUPP | libc::EINVAL) =>
            {
                self.exec.run(&self.file, &mut op, &mut Guest::None)
            }
            _ => Err(os_error(res)),
        };
        self.d.engine.complete(op, r);
    }
}

/// Drops the first `n` bytes from `iov[..*niov]` after a short transfer.
fn advance(iov: &mut [libc::iovec; 3], niov: &mut usize, mut n: usize) {
    let mut i = 0;
    while i < *niov && n >= iov[i].iov_len {
        n -= iov[i].iov_len;
        i += 1;
    }
    iov.copy_within(i..*niov, 0);
    *niov -= i;
    if n > 0 {
        iov[0].iov_base = iov[0].iov_base.cast::<u8>().wrapping_add(n).cast();
        iov[0].iov_len -= n;
    }
}

/// Reads a whole buffer, zeroes past the end of file.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let got = HostFile::read_at(file, buf, offset)?;
    buf[got..].fill(0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_setup_is_a_clear_error() {
        // Zero entries make io_uring_setup fail here as a kernel without io_uring would
        // (with another errno): the error must say what failed, not hang or panic.
        let Err(e) = Ring::new(0, false) else {
            panic!("a ring of zero entries was set up")
        };
        let msg = e.to_string();
        assert!(msg.starts_with("io_uring_setup failed"), "{msg}");
        assert!(msg.contains("kernel.io_uring_disabled"), "{msg}");
    }

    #[test]
    fn a_missing_opcode_is_named() {
        assert_eq!(missing_opcode(|_| true), None);
        let what = missing_opcode(|code| code != opcode::Fallocate::CODE).expect("missing");
        assert!(what.contains("IORING_OP_FALLOCATE"), "{what}");
    }

    #[test]
    fn short_transfers_advance_the_iovecs() {
        let (a, b) = ([0u8; 100], [0u8; 50]);
        let (pa, pb) = (a.as_ptr() as *mut u8, b.as_ptr() as *mut u8);
        let mut iov = [
            iovec(pa, 100),
            iovec(pb, 50),
            iovec(std::ptr::null_mut(), 0),
        ];
        let mut n = 2;
        advance(&mut iov, &mut n, 40);
        assert_eq!(
            (n, iov[0].iov_len, iov[0].iov_base as usize),
            (2, 60, pa as usize + 40)
        );
        advance(&mut iov, &mut n, 80);
        assert_eq!(
            (n, iov[0].iov_len, iov[0].iov_base as usize),
            (1, 30, pb as usize + 20)
        );
        advance(&mut iov, &mut n, 30);
        assert_eq!(n, 0);
    }
}
