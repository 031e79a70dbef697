//! Packed refcount arrays in memory: the in-memory refcount table (IMRT) built from the
//! references the walk finds, and the refcounts loaded from the image's refblocks.
//!
//! Both use the image's refcount width and refblock layout, so block `i` of an array (bytes
//! `i * cluster_size ..`) is byte for byte what refblock `i` holds on disk: a rebuild writes
//! IMRT blocks as they are, and a repaired block is written back from the loaded array.
//! Every allocation is charged to a [`Budget`] first and made with `try_reserve`, so an
//! absurd file length or reference becomes a check error, never an abort.

use crate::format::refcount;
use crate::format::Geometry;

/// The memory a check may spend on its refcount arrays.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Budget {
    /// Most bytes the arrays may hold together.
    pub limit: u64,
    /// Bytes they hold now.
    pub used: u64,
}

/// An array could not grow within the budget (or the allocator refused).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) struct OutOfMemory;

/// A packed array of refcounts, one entry per host cluster.
#[derive(Debug)]
pub(crate) struct RefArray {
    order: u32,
    block_bytes: u64,
    block_bits: u32,
    bytes: Vec<u8>,
    len: u64,
}

impl RefArray {
    /// An empty array for the image's geometry.
    pub fn new(geo: &Geometry) -> Self {
        Self {
            order: geo.refcount_order,
            block_bytes: geo.cluster_size(),
            block_bits: geo.rb_bits,
            bytes: Vec::new(),
            len: 0,
        }
    }

    /// Number of clusters covered (QEMU's `nb_clusters`).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Entries per block (per refblock).
    pub fn block_entries(&self) -> u64 {
        1 << self.block_bits
    }

    /// Number of whole blocks allocated.
    pub fn blocks(&self) -> u64 {
        self.bytes.len() as u64 / self.block_bytes
    }

    /// Bytes an array covering `len` clusters holds (whole blocks).
    pub fn bytes_for(&self, len: u64) -> u64 {
        len.div_ceil(self.block_entries())
            .saturating_mul(self.block_bytes)
    }

    /// Grows the array to cover `len` clusters (whole blocks are allocated, zeroed).
    pub fn grow(&mut self, len: u64, budget: &mut Budget) -> Result<(), OutOfMemory> {
        if len <= self.len {
            return Ok(());
        }
        let blocks = len.div_ceil(self.block_entries());
        let want = blocks.checked_mul(self.block_bytes).ok_or(OutOfMemory)?;
        let have = self.bytes.len() as u64;
        if want > have {
            let extra = want - have;
            if budget.used.saturating_add(extra) > budget.limit {
                return Err(OutOfMemory);
            }
            let want = usize::try_from(want).map_err(|_| OutOfMemory)?;
            self.bytes
                .try_reserve_exact(want - self.bytes.len())
                .map_err(|_| OutOfMemory)?;
            self.bytes.resize(want, 0);
            budget.used += extra;
        }
        self.len = len;
        Ok(())
    }

    /// Releases the memory back to the budget.
    pub fn free(&mut self, budget: &mut Budget) {
        budget.used = budget.used.saturating_sub(self.bytes.len() as u64);
        self.bytes = Vec::new();
        self.len = 0;
    }

    /// Sets every entry to 0, keeping the length.
    pub fn clear(&mut self) {
        self.bytes.fill(0);
    }

    /// Entries the allocated blocks hold.
    fn capacity(&self) -> u64 {
        self.blocks() << self.block_bits
    }

    /// The refcount of cluster `i` (0 outside the allocated blocks).
    pub fn get(&self, i: u64) -> u64 {
        if i >= self.capacity() {
            return 0;
        }
        refcount::get(&self.bytes, self.order, i as usize)
    }

    /// Sets the refcount of cluster `i`, which must be inside the allocated blocks.
    pub fn set(&mut self, i: u64, value: u64) {
        debug_assert!(i < self.capacity());
        refcount::set(&mut self.bytes, self.order, i as usize, value);
    }

    /// The largest refcount an entry holds.
    pub fn max_value(&self) -> u64 {
        refcount::max(self.order)
    }

    /// Block `b`, as a refblock's bytes.
    pub fn block(&self, b: u64) -> &[u8] {
        let start = (b * self.block_bytes) as usize;
        &self.bytes[start..start + self.block_bytes as usize]
    }

    /// Block `b`, writable.
    pub fn block_mut(&mut self, b: u64) -> &mut [u8] {
        let start = (b * self.block_bytes) as usize;
        &mut self.bytes[start..start + self.block_bytes as usize]
    }

    /// The first cluster in `from..end` with a non-zero refcount (skips zero bytes fast).
    pub fn next_used(&self, from: u64, end: u64) -> Option<u64> {
        let end = end.min(self.capacity());
        let per_byte_bits = self.order; // log2 of bits per entry
        let mut i = from;
        while i < end {
            // Skip whole zero bytes (each holds 8 >> order entries, or is part of one).
            let bit = i << per_byte_bits;
            if bit % 8 == 0 {
                let byte = (bit / 8) as usize;
                if self.bytes[byte] == 0 {
                    let entry_bytes = (1u64 << per_byte_bits).div_ceil(8);
                    let entries_per_byte = if per_byte_bits >= 3 {
                        0
                    } else {
                        8 >> per_byte_bits
                    };
                    if entries_per_byte > 0 {
                        i += entries_per_byte;
                        continue;
                    }
                    if self.bytes[byte..byte + entry_bytes as usize]
                        .iter()
                        .all(|&b| b == 0)
                    {
                        i += 1;
                        continue;
                    }
                }
            }
            if self.get(i) != 0 {
                return Some(i);
            }
            i += 1;
        }
        None
    }

    /// QEMU's `alloc_clusters_imrt`: finds `count` free clusters from `*first_free` on
    /// (appending at the end when there is no gap), sets their refcount to 1 and returns the
    /// first one's index. `*first_free` moves to the first gap seen.
    pub fn alloc(
        &mut self,
        count: u64,
        first_free: &mut u64,
        budget: &mut Budget,
    ) -> Result<u64, OutOfMemory> {
        let mut cluster = *first_free;
        let mut first_gap = true;
        let mut run = 0u64;
        while cluster < self.len && run < count {
            if self.get(cluster) == 0 {
                run += 1;
                if first_gap {
                    *first_free = cluster;
                    first_gap = false;
                }
            } else {
                run = 0;
            }
            cluster += 1;
        }
        if run < count {
            self.grow(cluster + count - run, budget)?;
        }
        let start = cluster - run;
        for c in start..start + count {
            self.set(c, 1);
        }
        Ok(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> Budget {
        Budget {
            limit: 1 << 20,
            used: 0,
        }
    }

    #[test]
    fn grows_in_whole_blocks_and_charges_the_budget() {
        let geo = Geometry::new(9, 4); // 512-byte blocks of 256 entries
        let mut b = budget();
        let mut a = RefArray::new(&geo);
        a.grow(10, &mut b).unwrap();
        assert_eq!((a.len(), a.blocks(), b.used), (10, 1, 512));
        a.grow(257, &mut b).unwrap();
        assert_eq!((a.blocks(), b.used), (2, 1024));
        let mut small = Budget {
            limit: 1000,
            used: 0,
        };
        let mut c = RefArray::new(&geo);
        assert_eq!(c.grow(300, &mut small), Err(OutOfMemory));
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn alloc_takes_the_first_gap_then_appends() {
        let geo = Geometry::new(9, 4);
        let mut b = budget();
        let mut a = RefArray::new(&geo);
        a.grow(6, &mut b).unwrap();
        for i in [0, 1, 3, 5] {
            a.set(i, 1);
        }
        let mut ff = 0;
        assert_eq!(a.alloc(1, &mut ff, &mut b), Ok(2));
        assert_eq!(ff, 2);
        let mut ff = 0;
        // No run of two inside: appends after the trailing partial run (cluster 4 is free).
        assert_eq!(a.alloc(2, &mut ff, &mut b), Ok(6));
        assert_eq!(a.len(), 8);
        assert_eq!(a.alloc(1, &mut 0, &mut b), Ok(4));
    }

    #[test]
    fn next_used_skips_zeroes_at_every_width() {
        for order in 0..=6 {
            let geo = Geometry::new(9, order);
            let mut b = budget();
            let mut a = RefArray::new(&geo);
            a.grow(3000, &mut b).unwrap();
            a.set(1234, 1);
            assert_eq!(a.next_used(0, a.len()), Some(1234), "order {order}");
            assert_eq!(a.next_used(1235, a.len()), None, "order {order}");
        }
    }
}
