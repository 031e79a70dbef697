//! The backing chain: what unallocated clusters read through to.
//!
//! A raw backing file is read at the guest offset ([`Target::Backing(1)`]). A qcow2 backing
//! file is a nested, read-only [`Image`] whose ops this engine forwards with their target
//! shifted one level down (`Image` → `Backing(1)`, `Backing(d)` → `Backing(d + 1)`): a chain
//! of any depth is engines inside engines, each knowing only the file below it.
//!
//! A read of an unallocated extent becomes a read request to the nested engine; the guest
//! spans of its ops are relabelled as spans of the top request's buffer on the way out and
//! back on completion, so guest data is still never copied. Copy-on-write reads (head and
//! tail of a partial write into an unallocated cluster) have no guest buffer: their spans
//! go out as bounce buffers that are copied into the allocation's staging buffer when they
//! come back. Past the end of the backing file everything reads as zero.
//!
//! Invariants:
//! 1. Every nested request in flight has a [`Dest`]; its `Done` is the only way the top
//!    task (or allocation) learns it finished.
//! 2. A forwarded op holds a top op slot ([`Purpose::Nested`]) from the moment it is
//!    forwarded until it is handed back, so "no op outstanding" covers the whole chain.
//! 3. Nested engines are read-only: they never write, flush or poison.

use arrayvec::ArrayVec;

use crate::error::{BackingError, FormatError, OpenError};
use crate::event::Event;
use crate::io::{IoError, IoKind, IoOp, OpId, Segment, Target};
use crate::request::{Outcome, ReqId, Request};

use super::{Image, OpSlot, Purpose};

/// Where the data of a nested read request goes.
#[derive(Debug, Clone, Copy, Eq, PartialEq)]
pub(super) enum Dest {
    /// Into task `task`'s guest buffer (request `req`), from byte `base` of it.
    Guest { task: u32, req: ReqId, base: usize },
    /// Into part `part` (0 head, 1 tail) of allocation `alloc`'s staging buffer.
    Staging { alloc: u32, part: u8 },
    /// The block status of task `task`.
    Status { task: u32 },
}

#[derive(Debug)]
enum Layer {
    /// Waiting for the runtime's [`Image::attach_backing`].
    Waiting,
    Raw,
    /// A nested engine (opening while the top one is).
    Qcow2(Box<Image>),
    /// No format was named and the nested engine found no qcow2 header: raw, after all.
    Probing(Box<Image>),
}

/// The image's backing file, once named.
#[derive(Debug)]
pub(super) struct Backing {
    /// Bytes readable through the backing file (its virtual size); zeros past it.
    pub(super) size: u64,
    layer: Layer,
    /// The format named by the header extension.
    format: Option<String>,
    /// Destination of each nested request in flight, by nested request id.
    dests: Vec<Option<Dest>>,
}

impl Backing {
    pub(super) fn new(format: Option<String>) -> Self {
        Self {
            size: 0,
            layer: Layer::Waiting,
            format,
            dests: Vec::new(),
        }
    }

    fn inner(&mut self) -> Option<&mut Image> {
        match &mut self.layer {
            Layer::Qcow2(i) | Layer::Probing(i) => Some(i),
            _ => None,
        }
    }

    /// Whether reads go to a raw file (no nested engine).
    pub(super) fn is_raw(&self) -> bool {
        matches!(self.layer, Layer::Raw)
    }
}

fn shift_down(t: Target) -> Target {
    match t {
        // (Nested engines never open a data file: see `nested_event`.)
        Target::Image | Target::DataFile => Target::Backing(1),
        Target::Backing(d) => Target::Backing(d + 1),
    }
}

fn shift_up(t: Target) -> Target {
    match t {
        Target::Backing(1) | Target::Image | Target::DataFile => Target::Image,
        Target::Backing(d) => Target::Backing(d - 1),
    }
}

impl Image {
    /// Answers [`Event::OpenBacking`] for `depth`: the runtime opened that file, which is
    /// `file_len` bytes long. (To refuse, drop the engine: opening cannot go on.)
    pub fn attach_backing(&mut self, depth: u32, file_len: u64) {
        let Some(b) = self.backing.as_mut() else {
            return;
        };
        if depth > 1 {
            if let Some(inner) = b.inner() {
                inner.attach_backing(depth - 1, file_len);
            }
            self.pump();
            return;
        }
        if !matches!(b.layer, Layer::Waiting) {
            return;
        }
        let mut config = self.config;
        config.read_only = true;
        config.inspect_only = false;
        config.check_only = false;
        config.file_len = file_len;
        config.limits.max_backing_depth = config.limits.max_backing_depth.saturating_sub(1);
        match b.format.as_deref() {
            Some("raw") => {
                b.size = file_len;
                b.layer = Layer::Raw;
                self.open_backing_done(None);
            }
            Some("qcow2") => b.layer = Layer::Qcow2(Box::new(Image::open(config))),
            None => b.layer = Layer::Probing(Box::new(Image::open(config))),
            Some(_) => self.open_backing_done(Some((1, BackingError::UnknownFormat))),
        }
        if let Some(b) = self.backing.as_mut() {
            if matches!(b.layer, Layer::Probing(_)) {
                b.size = file_len;
            }
        }
        self.pump();
    }

    /// Starts the backing step of opening: names the file to the runtime. False when the
    /// chain is already as long as allowed.
    pub(super) fn request_backing(&mut self, depth_left: u32) -> bool {
        let layout = self.layout.as_ref().expect("backing after layout");
        let (Some(name), format) = (layout.backing_file.clone(), layout.backing_format.clone())
        else {
            return true;
        };
        if depth_left == 0 {
            let limit = self.config.limits.max_backing_depth;
            self.open_backing_done(Some((1, BackingError::TooDeep(limit))));
            return false;
        }
        self.backing = Some(Box::new(Backing::new(format.clone())));
        self.events.push_back(Event::OpenBacking {
            depth: 1,
            name,
            format,
        });
        true
    }

    /// The backing file finished opening (or failed to: `(depth, reason)`).
    fn open_backing_done(&mut self, failure: Option<(u32, BackingError)>) {
        self.open_step_done();
        if let Some((depth, reason)) = failure {
            self.backing = None;
            self.fail_open_backing(OpenError::Backing { depth, reason });
        }
    }

    /// Whether the backing engine can take `n` more requests.
    pub(super) fn backing_room(&self, n: usize) -> bool {
        match self.backing.as_deref().map(|b| &b.layer) {
            Some(Layer::Qcow2(i)) => i.task_free.len() >= n,
            _ => true,
        }
    }

    /// Reads guest `[pos, end)` of task `t` into its guest buffer
    /// from the backing file; the caller clipped it to the backing size. False when the
    /// nested engine is busy (try again later).
    pub(super) fn backing_read(&mut self, t: u32, pos: u64, end: u64) -> bool {
        let task = self.tasks[t as usize].as_ref().expect("live task");
        let (req, base) = (task.req, (pos - task.origin) as usize);
        let b = self.backing.as_mut().expect("reads through a backing file");
        if b.is_raw() {
            let mut segs = ArrayVec::new();
            segs.push(Segment::Guest {
                req,
                start: base,
                len: (end - pos) as usize,
            });
            self.issue_at(
                Target::Backing(1),
                Purpose::Guest {
                    task: t,
                    write: false,
                },
                IoKind::Read,
                pos,
                segs,
            );
            return true;
        }
        let dest = Dest::Guest { task: t, req, base };
        self.nested_submit(pos, end - pos, dest)
    }

    /// The block status of guest `[pos, end)` of status task `t` (inside the backing
    /// file) from the chain; true when it is known at once (raw), false while the task
    /// waits for the nested engine.
    pub(super) fn backing_status(&mut self, t: u32, pos: u64, end: u64) -> bool {
        let raw = self.backing.as_ref().is_some_and(|b| b.is_raw());
        if raw {
            self.task(t).status = Some(crate::request::BlockStatus {
                offset: pos,
                len: end - pos,
                allocation: crate::request::Allocation::Data { host: pos },
                depth: 1,
            });
            return true;
        }
        if !self.backing_room(1) {
            return false;
        }
        let Some(inner) = self.backing.as_mut().and_then(|b| b.inner()) else {
            return false;
        };
        let Ok(nreq) = inner.submit(Request::BlockStatus {
            offset: pos,
            len: end - pos,
        }) else {
            return false;
        };
        let b = self.backing.as_mut().expect("just used");
        let i = nreq.0 as usize;
        if b.dests.len() <= i {
            b.dests.resize(i + 1, None);
        }
        b.dests[i] = Some(Dest::Status { task: t });
        self.task(t).inflight += 1;
        false
    }

    /// Reads `len` bytes at guest `at` (below the backing size) from the backing file
    /// into part `part` of allocation `a`'s staging buffer (zeros past the backing size).
    /// The caller checked [`backing_room`](Self::backing_room).
    pub(super) fn backing_cow_read(&mut self, a: u32, part: u8, at: u64, len: u64) {
        let b = self
            .backing
            .as_ref()
            .expect("copy-on-write from a backing file");
        let (raw, size) = (b.is_raw(), b.size);
        let mut buf = self.staging_buf(len as usize);
        if raw {
            // A raw file reads as zero past its end by itself.
            self.issue_buf_at(
                Target::Backing(1),
                Purpose::CowRead { alloc: a, part },
                IoKind::Read,
                at,
                buf,
            );
            return;
        }
        buf.as_mut_slice().fill(0);
        self.set_staged(a, part, buf);
        let len = len.min(size.saturating_sub(at));
        let submitted = self.nested_submit(at, len, Dest::Staging { alloc: a, part });
        debug_assert!(submitted, "callers check backing_room first");
    }

    fn nested_submit(&mut self, offset: u64, len: u64, dest: Dest) -> bool {
        let b = self
            .backing
            .as_mut()
            .expect("nested reads need a backing file");
        let Some(inner) = b.inner() else {
            return false;
        };
        let Ok(nreq) = inner.submit(Request::Read { offset, len }) else {
            return false;
        };
        let i = nreq.0 as usize;
        if b.dests.len() <= i {
            b.dests.resize(i + 1, None);
        }
        b.dests[i] = Some(dest);
        true
    }

    /// Moves the nested engine's ops out and its events in; true if anything moved.
    pub(super) fn backing_pump(&mut self) -> bool {
        let mut moved = false;
        loop {
            let Some(inner) = self.backing.as_mut().and_then(|b| b.inner()) else {
                return moved;
            };
            if let Some(ev) = inner.poll_event() {
                moved = true;
                self.nested_event(ev);
                continue;
            }
            if !self.op_room(1) {
                return moved;
            }
            let Some(inner) = self.backing.as_mut().and_then(|b| b.inner()) else {
                return moved;
            };
            let Some(op) = inner.poll_io() else {
                return moved;
            };
            moved = true;
            self.forward(op);
        }
    }

    fn nested_event(&mut self, ev: Event) {
        match ev {
            Event::Done { req, result } => {
                let b = self
                    .backing
                    .as_mut()
                    .expect("nested events need a backing file");
                let Some(dest) = b.dests.get_mut(req.0 as usize).and_then(Option::take) else {
                    return;
                };
                match (dest, result) {
                    (Dest::Status { task }, Ok(Outcome::Status(mut s))) => {
                        s.depth += 1;
                        self.task(task).status = Some(s);
                        self.task_io_done(task, Ok(()));
                    }
                    (Dest::Status { task } | Dest::Guest { task, .. }, r) => {
                        self.task_io_done(task, r.map(drop))
                    }
                    (Dest::Staging { alloc, part }, r) => {
                        self.cow_part_done(alloc, part, r.map(drop))
                    }
                }
            }
            Event::Opened(info) => {
                let b = self
                    .backing
                    .as_mut()
                    .expect("nested events need a backing file");
                b.size = info.size;
                b.layer = match std::mem::replace(&mut b.layer, Layer::Waiting) {
                    Layer::Probing(i) => Layer::Qcow2(i),
                    other => other,
                };
                self.open_backing_done(None);
            }
            Event::OpenFailed(e) => {
                let b = self
                    .backing
                    .as_mut()
                    .expect("nested events need a backing file");
                let not_qcow2 = matches!(
                    e,
                    OpenError::Format(FormatError::BadMagic | FormatError::Truncated(_))
                );
                if matches!(b.layer, Layer::Probing(_)) && not_qcow2 {
                    // Not a qcow2 image: a raw file, as QEMU's probe decides. (`size` is
                    // already the file's length.)
                    b.layer = Layer::Raw;
                    self.open_backing_done(None);
                } else {
                    self.open_backing_done(Some(BackingError::from_open(e)));
                }
            }
            Event::OpenBacking {
                depth,
                name,
                format,
            } => self.events.push_back(Event::OpenBacking {
                depth: depth + 1,
                name,
                format,
            }),
            Event::OpenDataFile { .. } => {
                // A backing file with an external data file is not supported (yet): its
                // ops would need a target of their own.
                self.open_backing_done(Some((
                    1,
                    BackingError::Unsupported(crate::error::Feature::ExternalDataFile),
                )));
            }
            Event::Poisoned(_) => {}
        }
    }

    /// Sends a nested op out: target one level down, guest spans relabelled as the top
    /// request's, or bounced for copy-on-write. Zero-fills of staging are done here.
    fn forward(&mut self, mut op: IoOp) {
        let first = op.segments.iter().find_map(|s| match *s {
            Segment::Guest { req, start, .. } => Some((req.0, start)),
            _ => None,
        });
        let dest = first.and_then(|(r, _)| self.dest(r));
        if let (Some(Dest::Staging { alloc, part }), IoKind::ZeroFill) = (dest, op.kind) {
            for seg in op.segments.iter() {
                if let Segment::Guest { start, len, .. } = *seg {
                    self.staging_slice(alloc, part, start, len).fill(0);
                }
            }
            let n = op.len() as usize;
            if let Some(inner) = self.backing.as_mut().and_then(|b| b.inner()) {
                inner.complete(op, Ok(n));
            }
            return;
        }
        for seg in op.segments.iter_mut() {
            let Segment::Guest { start, len, .. } = *seg else {
                continue;
            };
            *seg = match dest {
                Some(Dest::Guest { req, base, .. }) => Segment::Guest {
                    req,
                    start: base + start,
                    len,
                },
                Some(Dest::Staging { .. }) => Segment::Buf(self.staging_buf(len)),
                Some(Dest::Status { .. }) | None => {
                    debug_assert!(false, "a nested guest span without a reading request");
                    continue;
                }
            };
        }
        let (nreq, start) = first.unwrap_or((u32::MAX, 0));
        let id = self.op_free.pop().expect("callers check op_room first");
        let inner = std::mem::replace(&mut op.id, OpId(id)).0;
        op.target = shift_down(op.target);
        self.ops[id as usize] = Some(OpSlot {
            purpose: Purpose::Nested { inner, nreq },
            seq: u64::MAX,
            refused: None,
            nested_start: start,
        });
        self.ready.push_back(op);
    }

    fn dest(&self, nreq: u32) -> Option<Dest> {
        self.backing
            .as_ref()
            .and_then(|b| b.dests.get(nreq as usize).copied().flatten())
    }

    /// A forwarded op came back: relabel it as the nested engine issued it (its guest spans
    /// of request `nreq` start at `start`, contiguous) and hand it over.
    pub(super) fn nested_complete(
        &mut self,
        mut op: IoOp,
        (inner, nreq, start): (u32, u32, usize),
        result: Result<(), IoError>,
    ) {
        op.id = OpId(inner);
        op.target = shift_up(op.target);
        let n = op.len() as usize;
        if let Some(dest) = self.dest(nreq) {
            let mut pos = start;
            let mut segs = std::mem::take(&mut op.segments);
            for seg in segs.iter_mut() {
                let len = seg.len();
                let back = Segment::Guest {
                    req: ReqId(nreq),
                    start: pos,
                    len,
                };
                match (dest, &*seg) {
                    (Dest::Guest { .. }, Segment::Guest { .. }) => *seg = back,
                    (Dest::Staging { alloc, part }, Segment::Buf(_)) => {
                        if let Segment::Buf(tmp) = std::mem::replace(seg, back) {
                            if result.is_ok() {
                                self.staging_slice(alloc, part, pos, len)
                                    .copy_from_slice(tmp.as_slice());
                            }
                            self.put_staging(tmp);
                        }
                    }
                    _ => continue,
                }
                pos += len;
            }
            op.segments = segs;
        }
        if let Some(inner) = self.backing.as_mut().and_then(|b| b.inner()) {
            inner.complete(op, result.map(|()| n));
        }
    }
}
