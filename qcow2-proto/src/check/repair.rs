//! Planning repairs: the refcount-structure rebuild (QEMU's `rebuild_refcount_structure`)
//! and the metadata overlap test that guards every in-place table write.
//!
//! A rebuild never touches the old structures: it places new refblocks and a new reftable
//! in clusters that are free in the IMRT (appending at the end of the file when there is no
//! gap), so the image stays consistent until the header switches to the new reftable. The
//! caller writes the refblocks and the reftable, flushes, and only then writes the header
//! pointer (rule D); the old structures are then merely leaked, and the leak pass that
//! follows frees them.

use super::imrt::{Budget, OutOfMemory, RefArray};

/// The new refcount structure: where each refblock goes, and the reftable that finds them.
#[derive(Debug, Eq, PartialEq)]
pub(crate) struct RebuildPlan {
    /// `(refblock index, host offset)` of each refblock to write, in QEMU's write order;
    /// the block's content is the IMRT block of that index once planning is over.
    pub refblocks: Vec<(u64, u64)>,
    /// The new reftable's entries (a whole number of clusters).
    pub reftable: Vec<u64>,
    /// Host offset of the new reftable.
    pub reftable_offset: u64,
    /// Its size in clusters.
    pub reftable_clusters: u32,
}

/// `rebuild_refcounts_write_refblocks`: gives every block of the IMRT that has a used
/// cluster in `first..end` a refblock, allocated in the IMRT itself.
fn place_refblocks(
    imrt: &mut RefArray,
    budget: &mut Budget,
    cluster_bits: u32,
    first: u64,
    mut end: u64,
    reftable: &mut Vec<u64>,
    order: &mut Vec<(u64, u64)>,
) -> Result<bool, OutOfMemory> {
    let per_block = imrt.block_entries();
    let cluster_size = 1u64 << cluster_bits;
    let mut first_free = 0u64;
    let mut grown = false;
    let mut cluster = first;
    while cluster < end {
        let Some(used) = imrt.next_used(cluster, end) else {
            break;
        };
        let index = used / per_block;
        let block_start = index * per_block;
        let offset = match reftable.get(index as usize) {
            Some(&off) if off != 0 => off,
            _ => {
                first_free = first_free.max(block_start);
                let at = imrt.alloc(1, &mut first_free, budget)?;
                if at >= end {
                    end = at + 1;
                }
                if reftable.len() as u64 <= index {
                    let entries = ((index + 1) * 8).next_multiple_of(cluster_size) / 8;
                    let entries = usize::try_from(entries).map_err(|_| OutOfMemory)?;
                    reftable
                        .try_reserve_exact(entries - reftable.len())
                        .map_err(|_| OutOfMemory)?;
                    reftable.resize(entries, 0);
                    grown = true;
                }
                reftable[index as usize] = at << cluster_bits;
                at << cluster_bits
            }
        };
        if !order.iter().any(|&(i, _)| i == index) {
            order.try_reserve(1).map_err(|_| OutOfMemory)?;
            order.push((index, offset));
        }
        cluster = block_start + per_block;
    }
    Ok(grown)
}

/// Plans a new refcount structure covering every cluster the IMRT counts, allocating its
/// clusters in the IMRT (which then also counts them).
pub(crate) fn plan_rebuild(
    imrt: &mut RefArray,
    budget: &mut Budget,
    cluster_bits: u32,
) -> Result<RebuildPlan, OutOfMemory> {
    let mut reftable = Vec::new();
    let mut order = Vec::new();
    let end = imrt.len();
    place_refblocks(
        imrt,
        budget,
        cluster_bits,
        0,
        end,
        &mut reftable,
        &mut order,
    )?;
    loop {
        let clusters = ((reftable.len() as u64) * 8)
            .div_ceil(1 << cluster_bits)
            .max(1);
        let mut first_free = 0;
        let at = imrt.alloc(clusters, &mut first_free, budget)?;
        let grown = place_refblocks(
            imrt,
            budget,
            cluster_bits,
            at,
            at + clusters,
            &mut reftable,
            &mut order,
        )?;
        if !grown {
            let reftable_clusters = u32::try_from(clusters).map_err(|_| OutOfMemory)?;
            return Ok(RebuildPlan {
                refblocks: order,
                reftable,
                reftable_offset: at << cluster_bits,
                reftable_clusters,
            });
        }
    }
}

/// The metadata a repair must not overwrite: QEMU's "cached" overlap checks (header, active
/// L1 and L2 tables, refcount table and blocks, snapshot table, inactive L1 tables, bitmap
/// directory), as cluster ranges searchable in logarithmic time.
#[derive(Debug, Default)]
pub(crate) struct MetaMap {
    /// `(first cluster, end cluster, rank, name)`, sorted by first cluster.
    ranges: Vec<(u64, u64, u8, &'static str)>,
    /// Running maximum of the end clusters.
    max_end: Vec<u64>,
    cluster_bits: u32,
}

/// Structure names as QEMU prints them, in the order QEMU tests them.
pub(crate) const HEADER: (u8, &str) = (0, "qcow2_header");
pub(crate) const ACTIVE_L1: (u8, &str) = (1, "active L1 table");
pub(crate) const REFTABLE: (u8, &str) = (2, "refcount table");
pub(crate) const SNAPSHOT_TABLE: (u8, &str) = (3, "snapshot table");
pub(crate) const INACTIVE_L1: (u8, &str) = (4, "inactive L1 table");
pub(crate) const ACTIVE_L2: (u8, &str) = (5, "active L2 table");
pub(crate) const REFBLOCK: (u8, &str) = (6, "refcount block");
pub(crate) const BITMAP_DIRECTORY: (u8, &str) = (7, "bitmap directory");

impl MetaMap {
    /// An empty map for clusters of `1 << cluster_bits` bytes.
    pub fn new(cluster_bits: u32) -> Self {
        let mut map = Self {
            cluster_bits,
            ..Self::default()
        };
        map.add(0, 1, HEADER);
        map
    }

    /// Adds the byte range `start..start + len` (nothing when `len` is 0).
    pub fn add(&mut self, start: u64, len: u64, kind: (u8, &'static str)) {
        if len == 0 {
            return;
        }
        let first = start >> self.cluster_bits;
        let end = start
            .saturating_add(len)
            .div_ceil(1 << self.cluster_bits)
            .max(first + 1);
        self.ranges.push((first, end, kind.0, kind.1));
    }

    /// Sorts the ranges; call after the last [`add`](Self::add).
    pub fn finish(&mut self) {
        self.ranges.sort_unstable_by_key(|r| r.0);
        let mut m = 0;
        self.max_end = self
            .ranges
            .iter()
            .map(|r| {
                m = m.max(r.1);
                m
            })
            .collect();
    }

    /// The structure (first in QEMU's order) that `offset..offset + len` overlaps, if any.
    pub fn overlap(&self, offset: u64, len: u64, ignore_active_l2: bool) -> Option<&'static str> {
        if len == 0 {
            return None;
        }
        let first = offset >> self.cluster_bits;
        let end = offset.saturating_add(len).div_ceil(1 << self.cluster_bits);
        let mut j = self.ranges.partition_point(|r| r.0 < end);
        let mut best: Option<(u8, &'static str)> = None;
        while j > 0 && self.max_end[j - 1] > first {
            j -= 1;
            let (_, e, rank, what) = self.ranges[j];
            if e > first
                && !(ignore_active_l2 && rank == ACTIVE_L2.0)
                && best.is_none_or(|b| rank < b.0)
            {
                best = Some((rank, what));
            }
        }
        best.map(|b| b.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Geometry;

    #[test]
    fn rebuild_of_a_small_image_appends_refblock_then_reftable() {
        // 64 KiB clusters, 16-bit refcounts; clusters 0..=7 used (QEMU's own image after
        // a refcount was zeroed: refblock at cluster 8, reftable at cluster 9).
        let geo = Geometry::new(16, 4);
        let mut budget = Budget {
            limit: 1 << 24,
            used: 0,
        };
        let mut imrt = RefArray::new(&geo);
        imrt.grow(8, &mut budget).unwrap();
        for c in 0..8 {
            imrt.set(c, 1);
        }
        let plan = plan_rebuild(&mut imrt, &mut budget, 16).unwrap();
        assert_eq!(plan.refblocks, vec![(0, 8 << 16)]);
        assert_eq!((plan.reftable_offset, plan.reftable_clusters), (9 << 16, 1));
        assert_eq!(plan.reftable[0], 8 << 16);
        assert_eq!(plan.reftable.len(), 8192);
        assert_eq!((imrt.get(8), imrt.get(9), imrt.len()), (1, 1, 10));
    }

    #[test]
    fn rebuild_fills_gaps_first() {
        let geo = Geometry::new(9, 4); // 256 clusters per refblock
        let mut budget = Budget {
            limit: 1 << 24,
            used: 0,
        };
        let mut imrt = RefArray::new(&geo);
        imrt.grow(600, &mut budget).unwrap();
        for c in [0, 1, 4, 300, 599] {
            imrt.set(c, 1);
        }
        let plan = plan_rebuild(&mut imrt, &mut budget, 9).unwrap();
        // Refblock 0 at the first gap (2); refblock 1 inside its own range (256);
        // refblock 2 at 512; the reftable (3 entries -> 1 cluster) at the next gap, 3.
        assert_eq!(
            plan.refblocks,
            vec![(0, 2 << 9), (1, 256 << 9), (2, 512 << 9)]
        );
        assert_eq!(plan.reftable_offset, 3 << 9);
        for &(i, off) in &plan.refblocks {
            assert_eq!(plan.reftable[i as usize], off);
            assert_eq!(imrt.get(off >> 9), 1);
        }
    }

    #[test]
    fn overlap_rounds_to_clusters_and_ranks_like_qemu() {
        let mut map = MetaMap::new(16);
        map.add(0x30000, 8, ACTIVE_L1);
        map.add(0x50000, 0x10000, ACTIVE_L2);
        map.add(0x50000, 0x10000, REFBLOCK);
        map.add(0x100000, 0x30000, REFTABLE);
        map.finish();
        assert_eq!(map.overlap(0x100, 8, false), Some("qcow2_header"));
        assert_eq!(map.overlap(0x3fff8, 8, false), Some("active L1 table"));
        assert_eq!(map.overlap(0x40000, 0x10000, false), None);
        assert_eq!(map.overlap(0x50008, 8, false), Some("active L2 table"));
        assert_eq!(map.overlap(0x50008, 8, true), Some("refcount block"));
        assert_eq!(
            map.overlap(0x120000, 0x20000, false),
            Some("refcount table")
        );
        assert_eq!(map.overlap(0x130000, 0x10000, false), None);
    }
}
