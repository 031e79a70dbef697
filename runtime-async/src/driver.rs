//! [`Driver`]: the single owner of the engine. A runtime's driver loop feeds it commands and
//! completions and executes the ops it yields; the request table here pairs each engine
//! request with its caller's reply channel and guest buffer.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_channel::{Receiver, RecvError, TryRecvError};
use hashbrown::HashMap;
use qcow2_proto::{Event, ImageInfo, IoOp, Outcome, ReqId, Request, Segment, SubmitError};

use crate::buf::GuestBuf;
use crate::handle::{Cmd, Image, Pump, Reply, Shared};
use crate::Error;

/// The request whose guest buffer `op` reads into or writes from, if any.
pub fn guest_req(op: &IoOp) -> Option<ReqId> {
    op.segments.iter().find_map(|s| match s {
        Segment::Guest { req, .. } => Some(*req),
        _ => None,
    })
}

/// Where a request's guest buffer is while the request runs.
#[derive(Default)]
pub enum GuestSlot {
    /// The request has no buffer.
    #[default]
    None,
    /// Held by the driver.
    Owned(Box<dyn GuestBuf>),
    /// Moved into an op for the time of its I/O; [`Driver::restore`] brings it back.
    Lent,
    /// Shared read-only with the ops of a write (the driver unwraps it at the reply).
    Shared(Arc<Box<dyn GuestBuf>>),
}

impl std::fmt::Debug for GuestSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "None",
            Self::Owned(_) => "Owned",
            Self::Lent => "Lent",
            Self::Shared(_) => "Shared",
        })
    }
}

impl GuestSlot {
    fn take_box(&mut self) -> Option<Box<dyn GuestBuf>> {
        match std::mem::take(self) {
            Self::Owned(b) => Some(b),
            // Every op holding a clone dropped it before its completion was fed back, and
            // the engine reports a request done only after all its ops completed.
            Self::Shared(arc) => Arc::into_inner(arc),
            Self::None | Self::Lent => None,
        }
    }
}

/// A request the engine is running.
struct Pending {
    reply: Option<oneshot::Sender<Reply>>,
    slot: GuestSlot,
    base: usize,
}

impl Pending {
    fn reply(&mut self, result: Result<Outcome, Error>) {
        if let Some(tx) = self.reply.take() {
            let buf = self.slot.take_box();
            // The caller may have stopped waiting: the buffer is dropped with the reply.
            let _ = tx.send(Reply { result, buf });
        }
    }
}

impl Drop for Pending {
    /// A request dropped without an answer (driver shutting down) still gets one, with its
    /// buffer.
    fn drop(&mut self) {
        self.reply(Err(Error::Closed));
    }
}

/// The engine with its request table. Exactly one exists per open image.
pub struct Driver {
    /// The engine; the runtime drains its `poll_io` and feeds `complete`.
    pub engine: qcow2_proto::Image,
    rx: Receiver<Cmd>,
    shared: Arc<Shared>,
    reqs: HashMap<ReqId, Pending>,
    /// Commands the engine refused as `Busy`, in arrival order.
    backlog: VecDeque<Cmd>,
    disconnected: bool,
    close_sent: bool,
    /// The finished `Close` request, answered only by [`shutdown`](Self::shutdown), once the
    /// runtime has let go of the file (and so of its locks).
    closed: Option<Pending>,
    close_id: Option<ReqId>,
    /// Requests answered so far.
    answered: u64,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("requests", &self.reqs.len())
            .field("backlog", &self.backlog.len())
            .field("disconnected", &self.disconnected)
            .finish_non_exhaustive()
    }
}

impl Driver {
    /// Wraps an engine that finished opening (`info` from its `Opened` event) and makes the
    /// first handle. `pump`, if any, is how callers drive the runtime (see [`Pump`]).
    pub fn start(
        engine: qcow2_proto::Image,
        info: ImageInfo,
        pump: Option<Box<dyn Pump>>,
    ) -> (Self, Image) {
        let (image, rx) = Image::new(info, pump);
        let driver = Self {
            engine,
            rx,
            shared: image.shared(),
            reqs: HashMap::new(),
            backlog: VecDeque::new(),
            disconnected: false,
            close_sent: false,
            closed: None,
            close_id: None,
            answered: 0,
        };
        (driver, image)
    }

    /// Waits for the next command; never resolves once every handle is gone.
    pub async fn recv(&self) -> Result<Cmd, RecvError> {
        if self.disconnected {
            std::future::pending().await
        } else {
            self.rx.recv().await
        }
    }

    /// Takes the result of [`recv`](Self::recv).
    pub fn take(&mut self, cmd: Result<Cmd, RecvError>) {
        match cmd {
            Ok(cmd) => self.accept(cmd),
            Err(RecvError) => self.disconnect(),
        }
    }

    /// Accepts every command already queued, without waiting.
    pub fn accept_ready(&mut self) {
        while !self.disconnected {
            match self.rx.try_recv() {
                Ok(cmd) => self.accept(cmd),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Closed) => self.disconnect(),
            }
        }
    }

    fn accept(&mut self, cmd: Cmd) {
        if self.backlog.is_empty() {
            if let Some(cmd) = self.submit(cmd) {
                self.backlog.push_back(cmd);
            }
        } else {
            self.backlog.push_back(cmd);
        }
    }

    /// Submits a command; gives it back when the engine is busy.
    fn submit(&mut self, cmd: Cmd) -> Option<Cmd> {
        // The engine reuses a finished request's id: answer every queued `Done` before an id
        // can come back, so that a table entry is never replaced.
        self.answer();
        let close = matches!(cmd.req, Request::Close);
        match self.engine.submit(cmd.req) {
            Ok(id) => {
                self.close_sent |= close;
                if close {
                    self.close_id = Some(id);
                }
                let slot = cmd.buf.map_or(GuestSlot::None, GuestSlot::Owned);
                let pending = Pending {
                    reply: Some(cmd.reply),
                    slot,
                    base: cmd.base,
                };
                self.reqs.insert(id, pending);
                None
            }
            Err(SubmitError::Busy) => Some(cmd),
            Err(e) => {
                let _ = cmd.reply.send(Reply {
                    result: Err(e.into()),
                    buf: cmd.buf,
                });
                None
            }
        }
    }

    /// Every handle is gone: close a writable image that nobody closed.
    fn disconnect(&mut self) {
        self.disconnected = true;
        if !self.close_sent && !self.shared.info.read_only {
            self.close_sent = true;
            if let Ok(id) = self.engine.submit(Request::Close) {
                let pending = Pending {
                    reply: None,
                    slot: GuestSlot::None,
                    base: 0,
                };
                self.reqs.insert(id, pending);
            }
        }
    }

    /// Drains the engine's events: answers finished requests, then retries the backlog.
    /// Returns whether it submitted waiting commands: then the engine may have ops to poll
    /// before the runtime waits.
    pub fn events(&mut self) -> bool {
        self.answer();
        let mut submitted = false;
        // Retried whenever something waits: `submit` answers requests too, so room may
        // have appeared without a `Done` here.
        loop {
            let Some(cmd) = self.backlog.pop_front() else {
                break;
            };
            if let Some(cmd) = self.submit(cmd) {
                self.backlog.push_front(cmd);
                break;
            }
            submitted = true;
        }
        if self.disconnected && !self.backlog.is_empty() && self.reqs.is_empty() {
            // Nothing in flight can make room any more; answer what is left.
            for cmd in self.backlog.drain(..) {
                let _ = cmd.reply.send(Reply {
                    result: Err(Error::Closed),
                    buf: cmd.buf,
                });
            }
        }
        submitted
    }

    /// Answers the finished requests; returns whether there were any.
    fn answer(&mut self) -> bool {
        let mut any = false;
        while let Some(ev) = self.engine.poll_event() {
            if let Event::Done { req, result } = ev {
                any = true;
                self.answered += 1;
                let Some(mut p) = self.reqs.remove(&req) else {
                    continue;
                };
                if self.close_id == Some(req) && result.is_ok() {
                    // Answered at shutdown, after the file is closed.
                    self.closed = Some(p);
                    continue;
                }
                p.reply(result.map_err(Error::Request));
            }
        }
        any
    }

    /// How many requests the engine has finished so far (a counter to compare).
    pub fn answered(&self) -> u64 {
        self.answered
    }

    /// The guest buffer slot of request `req`, and the offset into the buffer of the
    /// request's byte 0 (add it to every `Segment::Guest::start`).
    pub fn guest(&mut self, req: ReqId) -> Option<(&mut GuestSlot, usize)> {
        self.reqs.get_mut(&req).map(|p| (&mut p.slot, p.base))
    }

    /// Puts a lent buffer back.
    pub fn restore(&mut self, req: ReqId, buf: Box<dyn GuestBuf>) {
        if let Some(p) = self.reqs.get_mut(&req) {
            p.slot = GuestSlot::Owned(buf);
        }
    }

    /// Whether the driver loop may end: every handle gone or the image closed, every
    /// request answered, and no op of the runtime's (`inflight`) outstanding. The runtime
    /// then drops its file and calls [`shutdown`](Self::shutdown).
    pub fn finished(&self, inflight: usize) -> bool {
        (self.disconnected || self.closed.is_some()) && self.reqs.is_empty() && inflight == 0
    }

    /// Ends the driver once the runtime closed its file: answers the `Close` request, and
    /// refuses whatever is still queued (handing buffers back).
    pub fn shutdown(mut self) {
        self.rx.close();
        let queued = std::iter::from_fn(|| self.rx.try_recv().ok());
        for cmd in self.backlog.drain(..).chain(queued) {
            let _ = cmd.reply.send(Reply {
                result: Err(Error::Closed),
                buf: cmd.buf,
            });
        }
        if let Some(mut p) = self.closed.take() {
            p.reply(Ok(Outcome::Done));
        }
    }

    /// Adds to the counters the handles report.
    pub fn count(&self, syncs: u64, bounced: u64) {
        self.shared.syncs.fetch_add(syncs, Ordering::Relaxed);
        self.shared.bounced.fetch_add(bounced, Ordering::Relaxed);
    }

    /// Adds to the count of joined reads and writes the handles report.
    pub fn count_joined(&self, ops: u64) {
        self.shared.joined.fetch_add(ops, Ordering::Relaxed);
    }
}
