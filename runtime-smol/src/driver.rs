//! The driver task: the engine's single owner. It starts every op on the blocking pool and
//! feeds completions back; guest buffers are lent, shared or staged (see the crate doc).

use std::fs::File;
use std::sync::Arc;

use arrayvec::ArrayVec;
use async_channel::{Receiver, Sender};
use futures_lite::future;
use qcow2_async::{guest_req, Driver, GuestBuf, GuestSlot};
use qcow2_proto::{IoBuf, IoError, IoKind, IoOp, ReqId, Segment};
use qcow2_sync::exec::{Executor, Guest};
use qcow2_sync::{Cache, Chain};

/// A finished op on its way back from the pool.
struct Finished {
    op: IoOp,
    result: Result<usize, IoError>,
    exec: Executor,
    guest: Back,
}

/// What an op did with its request's guest buffer.
enum Back {
    None,
    /// The read buffer it was lent.
    Lent(ReqId, Box<dyn GuestBuf>),
    /// A staging buffer holding guest bytes `lo..` of request `req`.
    Staged(ReqId, usize, IoBuf),
}

/// Staged bytes waiting for their request's lent buffer: (req, copies, staging buffer).
type Deferred = (ReqId, ArrayVec<(usize, usize, usize), 3>, IoBuf);

/// The image file and its backing chain.
type Files = Arc<(File, Chain)>;

struct Loop {
    d: Driver,
    files: Files,
    cache: Cache,
    done_tx: Sender<Finished>,
    execs: Vec<Executor>,
    inline: Executor,
    inflight: usize,
    deferred: Vec<Deferred>,
}

/// Runs until every handle is gone and everything in flight has finished.
pub(crate) async fn run(d: Driver, files: Files, cache: Cache) {
    let (done_tx, done_rx) = async_channel::unbounded();
    let mut l = Loop {
        d,
        files,
        cache,
        done_tx,
        execs: Vec::new(),
        inline: Executor::for_cache(cache),
        inflight: 0,
        deferred: Vec::new(),
    };
    loop {
        // Until quiet: commands taken from the backlog may have made more ops.
        loop {
            while let Some(op) = l.d.engine.poll_io() {
                l.start(op);
            }
            if !l.d.events() {
                break;
            }
        }
        if l.d.finished(l.inflight) {
            // The file (and its locks) goes before `close` is answered.
            let Loop { d, files, .. } = l;
            drop(files);
            return d.shutdown();
        }
        l.wait(&done_rx).await;
    }
}

/// Shifts every guest segment's start by `-by` (or back, with `undo`).
fn rebase(op: &mut IoOp, by: usize, undo: bool) {
    for s in op.segments.iter_mut() {
        if let Segment::Guest { start, .. } = s {
            *start = if undo { *start + by } else { *start - by };
        }
    }
}

fn refused() -> IoError {
    IoError {
        kind: std::io::ErrorKind::InvalidInput,
        raw_os_error: None,
    }
}

impl Loop {
    async fn wait(&mut self, done_rx: &Receiver<Finished>) {
        enum Woke {
            Cmd(Result<qcow2_async::Cmd, async_channel::RecvError>),
            Done(Finished),
        }
        let cmd = async { Woke::Cmd(self.d.recv().await) };
        let done = async {
            // The loop holds a sender, so this never fails.
            Woke::Done(done_rx.recv().await.expect("sender held by the loop"))
        };
        match future::or(done, cmd).await {
            Woke::Cmd(c) => self.d.take(c),
            Woke::Done(f) => self.finish(f),
        }
        while let Ok(f) = done_rx.try_recv() {
            self.finish(f);
        }
        self.d.accept_ready();
    }

    fn start(&mut self, mut op: IoOp) {
        let req = match op.kind {
            IoKind::Read
            | IoKind::Write
            | IoKind::ZeroFill
            | IoKind::Decompress { .. }
            | IoKind::Compress { .. } => guest_req(&op),
            _ => None,
        };
        let Some(req) = req else {
            return self.spawn(op, move |exec, file, op| {
                (exec.run(file, op, &mut Guest::None), Back::None)
            });
        };
        let Some((slot, base)) = self.d.guest(req) else {
            return self.d.engine.complete(op, Err(refused()));
        };
        match (op.kind, std::mem::take(slot)) {
            (IoKind::Write | IoKind::Compress { .. }, GuestSlot::Owned(buf)) => {
                let shared = Arc::new(buf);
                *slot = GuestSlot::Shared(shared.clone());
                self.spawn_write(op, shared, base);
            }
            (IoKind::Write | IoKind::Compress { .. }, GuestSlot::Shared(shared)) => {
                *slot = GuestSlot::Shared(shared.clone());
                self.spawn_write(op, shared, base);
            }
            (IoKind::ZeroFill, GuestSlot::Owned(mut buf)) => {
                let r = self.inline.run(
                    &self.files.0,
                    &mut op,
                    &mut Guest::Read(&mut buf.as_mut_slice()[base..]),
                );
                *slot = GuestSlot::Owned(buf);
                self.d.engine.complete(op, r);
            }
            (IoKind::Read | IoKind::Decompress { .. }, GuestSlot::Owned(mut buf)) => {
                *slot = GuestSlot::Lent;
                self.spawn(op, move |exec, file, op| {
                    let r = exec.run(file, op, &mut Guest::Read(&mut buf.as_mut_slice()[base..]));
                    (r, Back::Lent(req, buf))
                });
            }
            (IoKind::Read | IoKind::ZeroFill | IoKind::Decompress { .. }, GuestSlot::Lent) => {
                *slot = GuestSlot::Lent;
                // Another op of this read holds the buffer: fill a staging buffer instead.
                let (lo, hi) = op
                    .segments
                    .iter()
                    .fold((usize::MAX, 0), |(lo, hi), s| match s {
                        Segment::Guest { start, len, .. } => (lo.min(*start), hi.max(start + len)),
                        _ => (lo, hi),
                    });
                rebase(&mut op, lo, false);
                let mut staging = IoBuf::zeroed(hi - lo);
                self.spawn(op, move |exec, file, op| {
                    let r = exec.run(file, op, &mut Guest::Read(staging.as_mut_slice()));
                    (r, Back::Staged(req, lo, staging))
                });
            }
            // A write's buffer is never lent, a read's never shared: nothing else occurs.
            (_, other) => {
                *slot = other;
                self.d.engine.complete(op, Err(refused()));
            }
        }
    }

    fn spawn_write(&mut self, op: IoOp, shared: Arc<Box<dyn GuestBuf>>, base: usize) {
        self.spawn(op, move |exec, file, op| {
            let r = exec.run(file, op, &mut Guest::Write(&shared.as_slice()[base..]));
            // The clone goes before the completion does (the driver unwraps the buffer
            // when the request is done).
            drop(shared);
            (r, Back::None)
        });
    }

    fn spawn(
        &mut self,
        mut op: IoOp,
        job: impl FnOnce(&mut Executor, &File, &mut IoOp) -> (Result<usize, IoError>, Back)
            + Send
            + 'static,
    ) {
        let mut exec = self
            .execs
            .pop()
            .unwrap_or_else(|| Executor::for_cache(self.cache));
        let files = self.files.clone();
        let tx = self.done_tx.clone();
        self.inflight += 1;
        blocking::unblock(move || {
            let (result, guest) = match files.1.pick(&files.0, op.target) {
                Ok(file) => job(&mut exec, file, &mut op),
                Err(e) => (Err(e), Back::None),
            };
            drop(files);
            let _ = tx.try_send(Finished {
                op,
                result,
                exec,
                guest,
            });
        })
        .detach();
    }

    fn finish(&mut self, f: Finished) {
        let Finished {
            mut op,
            result,
            mut exec,
            guest,
        } = f;
        self.inflight -= 1;
        self.d.count(exec.syncs, exec.bounced);
        (exec.syncs, exec.bounced) = (0, 0);
        self.execs.push(exec);
        match guest {
            Back::None => {}
            Back::Lent(req, mut buf) => {
                if let Some((_, base)) = self.d.guest(req) {
                    let dst = &mut buf.as_mut_slice()[base..];
                    self.deferred.retain(|(r, copies, staging)| {
                        if *r != req {
                            return true;
                        }
                        for &(to, from, len) in copies {
                            dst[to..to + len]
                                .copy_from_slice(&staging.as_slice()[from..from + len]);
                        }
                        false
                    });
                }
                self.d.restore(req, buf);
            }
            Back::Staged(req, lo, staging) => {
                let copies: ArrayVec<_, 3> = op
                    .segments
                    .iter()
                    .filter_map(|s| match s {
                        Segment::Guest { start, len, .. } => Some((lo + start, *start, *len)),
                        _ => None,
                    })
                    .collect();
                rebase(&mut op, lo, true);
                match self.d.guest(req) {
                    Some((GuestSlot::Owned(buf), base)) => {
                        let dst = &mut buf.as_mut_slice()[base..];
                        for (to, from, len) in copies {
                            dst[to..to + len]
                                .copy_from_slice(&staging.as_slice()[from..from + len]);
                        }
                    }
                    _ => self.deferred.push((req, copies, staging)),
                }
            }
        }
        self.d.engine.complete(op, result);
    }
}
