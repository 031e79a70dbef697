//! The oracle: for every guest sector, the contents it may hold after a crash. That is its
//! contents at the last completed flush, or anything written to it since (writes completed
//! or still in flight), or zero where a discard may have dropped it.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use qcow2_proto::Request;

use super::disk::SECTOR;

/// Allowed contents per guest sector, as hashes.
#[derive(Clone, Debug)]
pub struct Oracle {
    /// The guest disk as the model says it is now.
    bytes: Vec<u8>,
    size: usize,
    allowed: Vec<Vec<u64>>,
    /// The backing file's contents, when the disk has one.
    base: Option<Vec<u8>>,
}

fn hash(sector: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    sector.hash(&mut h);
    h.finish()
}

/// Hash of a sector of zeroes.
fn zero_hash() -> u64 {
    hash(&[0u8; SECTOR])
}

impl Oracle {
    /// A zeroed disk of `size` bytes that may grow to `max` bytes.
    /// A disk whose first bytes are `base` (a backing file showing through), zeros after.
    pub fn with_base(size: u64, max: u64, base: &[u8]) -> Self {
        let mut o = Self::new(size, max);
        let n = base.len().min(o.bytes.len());
        o.bytes[..n].copy_from_slice(&base[..n]);
        for s in 0..n.div_ceil(SECTOR) {
            o.allowed[s] = vec![hash(&o.bytes[s * SECTOR..(s + 1) * SECTOR])];
        }
        o.base = Some(o.bytes[..n].to_vec());
        o
    }

    pub fn new(size: u64, max: u64) -> Self {
        let sectors = (max as usize).div_ceil(SECTOR);
        Self {
            bytes: vec![0; sectors * SECTOR],
            size: size as usize,
            allowed: vec![vec![zero_hash()]; sectors],
            base: None,
        }
    }

    /// The virtual size now.
    pub fn len(&self) -> u64 {
        self.size as u64
    }

    /// Whether the size is zero.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// What the guest must read now, before any crash.
    pub fn current(&self, offset: u64, len: usize) -> &[u8] {
        &self.bytes[offset as usize..offset as usize + len]
    }

    fn touched(&mut self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        for s in offset / SECTOR..(offset + len).div_ceil(SECTOR) {
            let h = hash(&self.bytes[s * SECTOR..(s + 1) * SECTOR]);
            if !self.allowed[s].contains(&h) {
                self.allowed[s].push(h);
            }
        }
    }

    /// A write (completed or in flight).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let o = offset as usize;
        self.bytes[o..o + data.len()].copy_from_slice(data);
        self.touched(o, data.len());
    }

    /// Write zeroes.
    pub fn zero(&mut self, offset: u64, len: u64) {
        let (o, n) = (offset as usize, len as usize);
        self.bytes[o..o + n].fill(0);
        self.touched(o, n);
    }

    /// A discard of the whole clusters inside `offset..offset + len`; the image's partial
    /// last cluster counts as whole when the range reaches the end (as in
    /// [`Model::discard_range`](crate::model::Model::discard_range), the engine and QEMU).
    pub fn discard(&mut self, offset: u64, len: u64, cluster: u64) {
        let size = self.size as u64;
        let start = offset.div_ceil(cluster) * cluster;
        let end = (offset + len).min(size);
        let end = if end == size {
            end
        } else {
            end / cluster * cluster
        };
        if end > start {
            self.zero(start, end - start);
        }
    }

    /// A resize: bytes past the new end read as zero (and may again, after growing).
    pub fn resize(&mut self, size: u64) {
        let size = size as usize;
        if size < self.size {
            let old = self.size;
            self.bytes[size..old].fill(0);
            self.touched(size, old - size);
            // Until the new size is durable, a crash may find the dropped clusters
            // unallocated at the old size: showing the backing file (as in QEMU).
            if let Some(base) = &self.base {
                for s in size / SECTOR..old.min(base.len()).div_ceil(SECTOR) {
                    let h = hash(&base[s * SECTOR..(s + 1) * SECTOR]);
                    if !self.allowed[s].contains(&h) {
                        self.allowed[s].push(h);
                    }
                }
            }
        }
        self.size = size;
    }

    /// A flush completed: only what the disk holds now may be read after a crash.
    pub fn flushed(&mut self) {
        for (s, allowed) in self.allowed.iter_mut().enumerate() {
            allowed.clear();
            allowed.push(hash(&self.bytes[s * SECTOR..(s + 1) * SECTOR]));
        }
    }

    /// A write-through write (or write-zeroes) completed: its own sectors are durable.
    pub fn settled(&mut self, offset: u64, len: u64) {
        let (o, n) = (offset as usize, len as usize);
        for s in o / SECTOR..(o + n).div_ceil(SECTOR) {
            let h = hash(&self.bytes[s * SECTOR..(s + 1) * SECTOR]);
            self.allowed[s].clear();
            self.allowed[s].push(h);
        }
    }

    /// Whether sector `s` may hold `content` after a crash.
    pub fn allows(&self, s: usize, content: &[u8]) -> bool {
        self.allowed
            .get(s)
            .is_some_and(|a| a.contains(&hash(content)))
    }
}

/// What has become durable while a batch of concurrent requests runs
/// ([`Sim::run_batch`](super::driver::Sim::run_batch)): a flush of the batch makes durable
/// everything before the batch and the requests seen done before it was sent; in
/// write-through mode a write or write-zeroes is durable once done.
pub(crate) struct BatchDurability {
    requests: Vec<Request>,
    durable: Vec<bool>,
    flushed: bool,
    write_through: bool,
}

impl BatchDurability {
    /// Nothing durable yet of the batch `requests`.
    pub(crate) fn new(requests: Vec<Request>, write_through: bool) -> Self {
        let durable = vec![false; requests.len()];
        Self {
            requests,
            durable,
            flushed: false,
            write_through,
        }
    }

    /// Request `i` finished, with `seen` the requests seen done before it was sent.
    /// Returns whether that made anything durable.
    pub(crate) fn done(&mut self, i: usize, seen: &[usize]) -> bool {
        match self.requests[i] {
            Request::Flush => {
                self.flushed = true;
                for &j in seen {
                    self.durable[j] = true;
                }
                true
            }
            Request::Write { .. } | Request::WriteZeroes { .. } if self.write_through => {
                self.durable[i] = true;
                true
            }
            _ => false,
        }
    }

    /// What a crash may find now: `before` (the oracle before the batch) with the batch's
    /// effects (`apply`) allowed, everything before the batch durable once a flush
    /// finished, and the durable requests' ranges (sector-disjoint) holding only their
    /// new contents.
    pub(crate) fn oracle(&self, before: &Oracle, apply: impl FnOnce(&mut Oracle)) -> Oracle {
        let mut o = before.clone();
        if self.flushed {
            o.flushed();
        }
        apply(&mut o);
        for (r, _) in self.requests.iter().zip(&self.durable).filter(|(_, d)| **d) {
            if let Request::Write { offset, len }
            | Request::WriteZeroes { offset, len, .. }
            | Request::Discard { offset, len } = *r
            {
                o.settled(offset, len);
            }
        }
        o
    }
}
