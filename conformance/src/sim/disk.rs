//! The simulated host file: a *current* image (what reads see) and a *durable* image (what
//! survives a crash), plus the log of everything done since the last host flush. A crash
//! keeps the durable image and any subset of the logged operations, each write longer than a
//! sector possibly torn at sector boundaries.
//!
//! A sector is the unit of durability: an op that covers part of a sector logs the whole
//! sector as the file holds it right after the op (a host page cache, or an O_DIRECT bounce,
//! writes whole sectors of the current file). Logging only the bytes the op wrote would let a
//! crash merge them into the *durable* sector, a mix of old and new bytes that the file never
//! held (say an unflushed full-sector write dropped while a later partial write of the same
//! sector survives).

use super::rng::Rng;

/// Durability granularity: a sector is written whole or not at all.
pub const SECTOR: usize = 512;

/// An operation not yet made durable.
#[derive(Clone, Debug)]
enum Logged {
    Write { offset: usize, data: Vec<u8> },
    Zero { offset: usize, len: usize },
    SetLen(usize),
}

/// A host file with crash semantics.
#[derive(Clone, Debug, Default)]
pub struct SimDisk {
    current: Vec<u8>,
    durable: Vec<u8>,
    log: Vec<Logged>,
    /// Logged operations made durable and dropped from the front of `log` so far.
    settled: u64,
}

impl SimDisk {
    /// A file holding `bytes`, all of it durable.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self {
            durable: bytes.clone(),
            current: bytes,
            log: Vec::new(),
            settled: 0,
        }
    }

    /// What reads see.
    pub fn current(&self) -> &[u8] {
        &self.current
    }

    /// Operations since the last flush.
    pub fn unflushed(&self) -> usize {
        self.log.len()
    }

    /// Reads at `offset`; past the end reads zeroes. Returns the bytes inside the file.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> usize {
        let start = (offset as usize).min(self.current.len());
        let end = (offset as usize + out.len()).min(self.current.len());
        let n = end - start;
        out[..n].copy_from_slice(&self.current[start..end]);
        out[n..].fill(0);
        n
    }

    /// Writes at `offset`, growing the file.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let offset = offset as usize;
        write_into(&mut self.current, offset, data);
        self.log_current(offset, offset + data.len());
    }

    /// Makes a range read as zero (zero-range, hole punch), growing the file if `grow`.
    pub fn zero(&mut self, offset: u64, len: u64, grow: bool) {
        let (offset, mut len) = (offset as usize, len as usize);
        if !grow {
            len = len.min(self.current.len().saturating_sub(offset));
        }
        if len == 0 {
            return;
        }
        zero_into(&mut self.current, offset, len);
        // Whole sectors inside the range are zeroed; the partial ones at its edges are
        // logged as they are now.
        let (inner_start, inner_end) = (
            offset.next_multiple_of(SECTOR),
            (offset + len) / SECTOR * SECTOR,
        );
        if inner_start >= inner_end {
            self.log_current(offset, offset + len);
            return;
        }
        self.log_current(offset, inner_start);
        self.log.push(Logged::Zero {
            offset: inner_start,
            len: inner_end - inner_start,
        });
        self.log_current(inner_end, offset + len);
    }

    /// Logs the sectors holding `start..end` as the current file has them (clipped at its
    /// end).
    fn log_current(&mut self, start: usize, end: usize) {
        if start >= end {
            return;
        }
        let start = start / SECTOR * SECTOR;
        let end = end.next_multiple_of(SECTOR).min(self.current.len());
        self.log.push(Logged::Write {
            offset: start,
            data: self.current[start..end].to_vec(),
        });
    }

    /// Extends the file to at least `end` bytes (fallocate), contents unchanged.
    pub fn allocate(&mut self, end: u64) {
        let end = end as usize;
        if self.current.len() < end {
            self.set_len(end as u64);
        }
    }

    /// Sets the length.
    pub fn set_len(&mut self, len: u64) {
        self.current.resize(len as usize, 0);
        self.log.push(Logged::SetLen(len as usize));
    }

    /// Where the log stands now: a flush issued now covers what was done before this mark.
    pub fn mark(&self) -> u64 {
        self.settled + self.log.len() as u64
    }

    /// `fdatasync` issued at `mark` (see [`mark`](Self::mark)): what was done before it was
    /// issued becomes durable. What completed while it was in flight may or may not be
    /// (`fdatasync` promises nothing for it), so it stays in the log.
    pub fn flush(&mut self, mark: u64) {
        let n = (mark.saturating_sub(self.settled) as usize).min(self.log.len());
        if n == self.log.len() {
            self.durable.clone_from(&self.current);
        } else {
            for op in &self.log[..n] {
                apply(&mut self.durable, op);
            }
        }
        self.log.drain(..n);
        self.settled += n as u64;
    }

    /// The file after a crash now: the durable image plus a random subset of the logged
    /// operations, in order, multi-sector writes torn at sector boundaries.
    pub fn crash(&self, rng: &mut Rng) -> Vec<u8> {
        let mut img = self.durable.clone();
        // Sometimes nothing or everything survives; usually a random subset.
        let keep = match rng.below(8) {
            0 => 0,
            1 => 100,
            _ => rng.below(101) as u32,
        };
        for op in &self.log {
            match op {
                Logged::Write { offset, data } => {
                    let mut at = 0;
                    while at < data.len() {
                        // A piece: up to the next sector boundary of the file.
                        let pos = offset + at;
                        let n = (SECTOR - pos % SECTOR).min(data.len() - at);
                        if rng.below(100) < u64::from(keep) {
                            write_into(&mut img, pos, &data[at..at + n]);
                        }
                        at += n;
                    }
                }
                Logged::Zero { offset, len } => {
                    if rng.below(100) < u64::from(keep) {
                        zero_into(&mut img, *offset, *len);
                    }
                }
                Logged::SetLen(len) => {
                    if rng.below(100) < u64::from(keep) {
                        img.resize(*len, 0);
                    }
                }
            }
        }
        img
    }
}

/// Applies a logged operation in full.
fn apply(img: &mut Vec<u8>, op: &Logged) {
    match op {
        Logged::Write { offset, data } => write_into(img, *offset, data),
        Logged::Zero { offset, len } => zero_into(img, *offset, *len),
        Logged::SetLen(len) => img.resize(*len, 0),
    }
}

fn write_into(img: &mut Vec<u8>, offset: usize, data: &[u8]) {
    if img.len() < offset + data.len() {
        img.resize(offset + data.len(), 0);
    }
    img[offset..offset + data.len()].copy_from_slice(data);
}

fn zero_into(img: &mut Vec<u8>, offset: usize, len: usize) {
    if img.len() < offset + len {
        img.resize(offset + len, 0);
    }
    img[offset..offset + len].fill(0);
}
