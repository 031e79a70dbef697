//! The in-memory host file the engine tests run over: one op performed on a byte vector.

#![allow(dead_code)]

use std::collections::HashMap;

use qcow2_proto::{IoKind, IoOp, ReqId, Segment};

/// Performs `op` on `disk` (guest spans in `bufs`); the bytes it transferred.
pub fn perform(disk: &mut Vec<u8>, bufs: &mut HashMap<ReqId, Vec<u8>>, op: &mut IoOp) -> usize {
    let mut pos = op.offset as usize;
    match op.kind {
        IoKind::Read | IoKind::Write | IoKind::ZeroFill => {
            for seg in op.segments.iter_mut() {
                let len = seg.len();
                if op.kind == IoKind::Write && disk.len() < pos + len {
                    disk.resize(pos + len, 0);
                }
                let read = |disk: &Vec<u8>, p: usize, out: &mut [u8]| {
                    for (i, b) in out.iter_mut().enumerate() {
                        *b = disk.get(p + i).copied().unwrap_or(0);
                    }
                };
                match (op.kind, seg) {
                    (IoKind::ZeroFill, Segment::Guest { req, start, len }) => {
                        bufs.get_mut(req).unwrap()[*start..*start + *len].fill(0)
                    }
                    (IoKind::Read, Segment::Guest { req, start, len }) => read(
                        disk,
                        pos,
                        &mut bufs.get_mut(req).unwrap()[*start..*start + *len],
                    ),
                    (IoKind::Read, Segment::Buf(b)) => read(disk, pos, b.as_mut_slice()),
                    (IoKind::Write, Segment::Guest { req, start, len }) => {
                        disk[pos..pos + *len].copy_from_slice(&bufs[req][*start..*start + *len])
                    }
                    (IoKind::Write, Segment::Buf(b)) => {
                        disk[pos..pos + b.len()].copy_from_slice(b.as_slice())
                    }
                    (IoKind::Write, Segment::Zeroes(n)) => disk[pos..pos + *n].fill(0),
                    (k, s) => panic!("unexpected segment {s:?} in {k:?}"),
                }
                pos += len;
            }
        }
        IoKind::SetLen => disk.resize(op.offset as usize, 0),
        IoKind::WriteZeroes { len } | IoKind::Allocate { len } => {
            let end = (op.offset + len) as usize;
            if disk.len() < end {
                disk.resize(end, 0);
            }
            if matches!(op.kind, IoKind::WriteZeroes { .. }) {
                disk[op.offset as usize..end].fill(0);
            }
        }
        IoKind::Flush | IoKind::PunchHole { .. } => {}
        k => panic!("unexpected op kind {k:?}"),
    }
    op.len() as usize
}

/// xorshift, so the tests need no dependency and are reproducible (seed must not be 0).
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
