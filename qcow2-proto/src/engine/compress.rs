//! Compressed writes: one guest cluster compressed by the runtime ([`IoKind::Compress`]),
//! its stream byte-packed after the previous one ([`Image::alloc_bytes`]), written, then
//! linked as a compressed L2 entry (rules A and C as for any data: the refcounts are
//! raised first, the entry written back only after the stream is durable).

use arrayvec::ArrayVec;

use crate::config::CacheMode;
use crate::error::RequestError;
use crate::format::entry::Mapping;
use crate::io::{IoError, IoKind, IoOp, Segment};

use super::{Alloc, AllocState, AllocWhat, Block, Image, Kind, Purpose};

mod sub {
    pub(super) const START: u8 = 0;
    pub(super) const COMPRESSED: u8 = 1;
    pub(super) const LINK: u8 = 2;
}

impl Image {
    pub(super) fn step_write_compressed(&mut self, t: u32) -> bool {
        let cb = self.geo.cluster_bits;
        let cs = self.geo.cluster_size();
        loop {
            if !self.settle_alloc(t) {
                return false;
            }
            let task = self.task(t);
            let (pos, end, sub, req) = (task.pos, task.end, task.sub, task.req);
            if task.error.is_some() {
                let done = task.inflight == 0 && task.alloc.is_none();
                if done {
                    self.drop_stream(t);
                }
                return done;
            }
            if task.inflight > 0 {
                return false;
            }
            match sub {
                sub::START => {
                    let whole = pos % cs == 0 && (end - pos == cs || end == self.hdr.size);
                    if !whole || end - pos > cs {
                        self.task(t).error = Some(RequestError::CompressedWrite(pos));
                        continue;
                    }
                    if !self.op_room(3) || self.alloc_covering(pos >> cb) {
                        return false;
                    }
                    // Only into an unallocated cluster (QEMU refuses the rest too).
                    let gc = pos >> cb;
                    // (The L2 table is made writable now: the link needs it.)
                    let free = self.owned_l2(t, gc >> self.geo.l2_bits).and_then(|l2| {
                        self.l2_entry_slot(l2, gc).map(|(slot, idx)| {
                            matches!(
                                self.decode(self.entry(slot, idx)),
                                Mapping::Unallocated | Mapping::Zero { host: 0, .. }
                            )
                        })
                    });
                    match free {
                        Ok(true) => {}
                        Ok(false) => {
                            self.task(t).error = Some(RequestError::CompressedWrite(pos));
                            continue;
                        }
                        Err(Block::Park) => return false,
                        Err(Block::Fail(e)) => {
                            self.task(t).error = Some(e);
                            continue;
                        }
                    }
                    let mut segs = ArrayVec::new();
                    segs.push(Segment::Guest {
                        req,
                        start: 0,
                        len: (end - pos) as usize,
                    });
                    segs.push(Segment::Buf(self.staging_buf(cs as usize)));
                    let kind = IoKind::Compress {
                        cluster_size: cs as u32,
                        zstd: self.hdr.compression_type == 1,
                    };
                    self.issue(Purpose::Compress { task: t }, kind, 0, segs);
                    let task = self.task(t);
                    task.inflight += 1;
                    task.sub = sub::COMPRESSED;
                }
                sub::COMPRESSED => {
                    let Some(stream) = self.stream_of(t) else {
                        return true;
                    };
                    if stream.is_empty() || stream.len() as u64 >= cs {
                        // Compressing does not pay: an ordinary write, as QEMU does. (A
                        // runtime that left the output a whole cluster long did not run the
                        // codec: the same.)
                        self.drop_stream(t);
                        let task = self.task(t);
                        (task.kind, task.sub) = (Kind::Write, 0);
                        return self.step_write(t);
                    }
                    if self.window || !self.op_room(1) {
                        return false;
                    }
                    let n = stream.len() as u64;
                    let host = match self.alloc_bytes(n) {
                        Ok(h) => h,
                        Err(Block::Park) => return false,
                        Err(Block::Fail(e)) => {
                            self.task(t).error = Some(e);
                            continue;
                        }
                    };
                    let buf = self.streams[t as usize].take().expect("checked above");
                    let touched = ((host + n - 1) >> cb) - (host >> cb) + 1;
                    let a = self.new_alloc(Alloc {
                        task: t,
                        what: AllocWhat::Compressed {
                            guest_cluster: pos >> cb,
                            len: n,
                        },
                        host,
                        count: touched,
                        state: AllocState::Io,
                        io_pending: 1,
                        joinable: false,
                        joined: ArrayVec::new(),
                        deferred: None,
                        fresh: false,
                    });
                    let mut segs = ArrayVec::new();
                    segs.push(Segment::Buf(buf));
                    self.issue(Purpose::AllocWrite { alloc: a }, IoKind::Write, host, segs);
                    let task = self.task(t);
                    task.alloc = Some(a);
                    task.sub = sub::LINK;
                }
                _ => {
                    if self.config.cache_mode == CacheMode::WriteThrough {
                        return self.wait_for_cycle(t);
                    }
                    return true;
                }
            }
        }
    }

    /// The compression op came back: keep its output for the placement.
    pub(super) fn compress_done(&mut self, t: u32, op: IoOp, result: Result<(), IoError>) {
        let out = op.segments.into_iter().find_map(|s| match s {
            Segment::Buf(b) => Some(b),
            _ => None,
        });
        let result = result.map_err(|e| self.io_error(e));
        if let (Ok(()), Some(b)) = (result, out) {
            if self.streams.len() <= t as usize {
                self.streams.resize_with(t as usize + 1, || None);
            }
            self.streams[t as usize] = Some(b);
        }
        self.task_io_done(t, result);
    }

    fn stream_of(&self, t: u32) -> Option<&crate::io::IoBuf> {
        self.streams.get(t as usize).and_then(Option::as_ref)
    }

    fn drop_stream(&mut self, t: u32) {
        if let Some(b) = self.streams.get_mut(t as usize).and_then(Option::take) {
            self.put_staging(b);
        }
    }
}
