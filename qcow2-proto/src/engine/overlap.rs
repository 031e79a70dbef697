//! Metadata overlap checks: QEMU's default "cached" level, from in-memory state only.
//!
//! Before the engine writes to the image file (guest data, copy-on-write, new tables,
//! write-back), the target range is checked against every metadata structure it knows
//! without I/O:
//!
//! | structure | source |
//! | --- | --- |
//! | header cluster, active L1, refcount table | the header |
//! | snapshot table, snapshot L1 tables | the snapshot table read at open |
//! | bitmap directory | the bitmaps extension |
//! | active L2 tables, refcount blocks | [`MetaIndex`], kept in step with the L1 and refcount tables |
//!
//! A write of a structure may cover structures of its own kind (an L2 slice write-back
//! covers its L2 table); anything else is a hit: the write is refused, the request fails
//! with [`CorruptReason::WriteOverlap`], the corrupt bit is set and the image becomes
//! read-only (a refused metadata write-back poisons the engine). The checker's own
//! repairs rebuild metadata and are not checked; QEMU's "all" level (inactive L2 tables,
//! which needs reading every snapshot's L1) is not offered.

use hashbrown::HashMap;

use crate::error::{CorruptReason, Corruption, Structure};
use crate::format::entry::L1Entry;
use crate::format::header::incompat;
use crate::io::{IoKind, IoOp, Target};

use crate::format::refcount::REFTABLE_OFFSET_MASK;

use super::{Image, Pool, Purpose};

/// Host clusters holding active L2 tables and refcount blocks, with how many table entries
/// point at each (a damaged image may point twice at one cluster).
#[derive(Debug, Default)]
pub(super) struct MetaIndex {
    /// Host cluster index → L2 references in the low 16 bits, refblock ones in the high.
    map: HashMap<u64, u32>,
}

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(super) enum Indexed {
    L2,
    Refblock,
}

impl Indexed {
    fn unit(self) -> u32 {
        match self {
            Self::L2 => 1,
            Self::Refblock => 1 << 16,
        }
    }
}

/// Which structures a write may cover (the kind it writes).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(super) enum Own {
    Nothing,
    L2,
    Refblock,
    /// One of the fixed structures (the header, an L1 or refcount-table chunk).
    Fixed(Structure),
}

/// New entries the index takes before it may have to grow (an allocation, not per request).
const HEADROOM: usize = 4096;

impl MetaIndex {
    /// Rebuilds the index from the active tables.
    fn rebuild(&mut self, l1: &[u64], reftable: &[u64], cluster_bits: u32) {
        self.map.clear();
        let live =
            l1.iter().filter(|&&e| e != 0).count() + reftable.iter().filter(|&&e| e != 0).count();
        let cap = (l1.len() + reftable.len()).min(live + HEADROOM);
        self.map.reserve(cap.saturating_sub(self.map.capacity()));
        for &e in l1 {
            self.add(L1Entry(e).l2_offset(), Indexed::L2, cluster_bits);
        }
        for &e in reftable {
            self.add(e & REFTABLE_OFFSET_MASK, Indexed::Refblock, cluster_bits);
        }
    }

    fn add(&mut self, off: u64, kind: Indexed, cluster_bits: u32) {
        if off != 0 {
            let n = self.map.entry(off >> cluster_bits).or_insert(0);
            // Saturate per kind: 65,535 references to one cluster are corruption anyway.
            if (*n / kind.unit()) & 0xffff != 0xffff {
                *n += kind.unit();
            }
        }
    }

    fn remove(&mut self, off: u64, kind: Indexed, cluster_bits: u32) {
        let key = off >> cluster_bits;
        if let Some(n) = self.map.get_mut(&key) {
            if (*n / kind.unit()) & 0xffff != 0 {
                *n -= kind.unit();
            }
            if *n == 0 {
                self.map.remove(&key);
            }
        }
    }

    /// The indexed structure in host clusters `first..=last` not of kind `own`, if any.
    fn hit(&self, first: u64, last: u64, own: Own) -> Option<Structure> {
        if self.map.is_empty() {
            return None;
        }
        // Bounded by the write's length (a request piece), not by the image.
        (first..=last).find_map(|c| {
            let n = *self.map.get(&c)?;
            if n & 0xffff != 0 && own != Own::L2 {
                Some(Structure::L2Table)
            } else if n >> 16 != 0 && own != Own::Refblock {
                Some(Structure::RefcountBlock)
            } else {
                None
            }
        })
    }
}

impl Image {
    /// Points L1 entry `i` at `raw`, keeping the overlap index in step.
    pub(super) fn set_l1(&mut self, i: usize, raw: u64) {
        let cb = self.geo.cluster_bits;
        self.meta
            .remove(L1Entry(self.l1[i]).l2_offset(), Indexed::L2, cb);
        self.meta.add(L1Entry(raw).l2_offset(), Indexed::L2, cb);
        self.l1[i] = raw;
    }

    /// Points refcount-table entry `i` at `raw`, keeping the overlap index in step.
    pub(super) fn set_reftable(&mut self, i: usize, raw: u64) {
        let cb = self.geo.cluster_bits;
        self.meta.remove(
            self.reftable[i] & REFTABLE_OFFSET_MASK,
            Indexed::Refblock,
            cb,
        );
        self.meta
            .add(raw & REFTABLE_OFFSET_MASK, Indexed::Refblock, cb);
        self.reftable[i] = raw;
    }

    /// Rebuilds the overlap index after the tables were (re)loaded.
    pub(super) fn index_metadata(&mut self) {
        self.meta
            .rebuild(&self.l1, &self.reftable, self.geo.cluster_bits);
    }

    /// Which metadata structure other than `own`'s kind the clusters of `[off, off+len)`
    /// overlap (rounded out to whole clusters, like QEMU).
    pub(super) fn metadata_overlap(&self, off: u64, len: u64, own: Own) -> Option<Structure> {
        if len == 0 {
            return None;
        }
        let cb = self.geo.cluster_bits;
        let last = off.saturating_add(len - 1);
        self.fixed_overlap(off, len, own)
            .or_else(|| self.meta.hit(off >> cb, last >> cb, own))
    }

    /// The fixed structure (header, tables, snapshot and bitmap metadata) other than
    /// `own` that the clusters of `[off, off+len)` overlap.
    fn fixed_overlap(&self, off: u64, len: u64, own: Own) -> Option<Structure> {
        let cs = self.geo.cluster_size();
        let end = off.saturating_add(len).div_ceil(cs).saturating_mul(cs);
        let start = off & !(cs - 1);
        let hit = |s: Structure, at: u64, bytes: u64| {
            own != Own::Fixed(s) && bytes > 0 && start < at.saturating_add(bytes) && at < end
        };
        let h = &self.hdr;
        let fixed = [
            (Structure::Header, 0, cs),
            (
                Structure::L1Table,
                h.l1_table_offset,
                u64::from(h.l1_size) * 8,
            ),
            (
                Structure::RefcountTable,
                h.refcount_table_offset,
                u64::from(h.refcount_table_clusters) * cs,
            ),
            (
                Structure::SnapshotTable,
                h.snapshots_offset,
                self.snapshot_table_bytes,
            ),
        ];
        if let Some(&(s, ..)) = fixed.iter().find(|&&(s, at, n)| hit(s, at, n)) {
            return Some(s);
        }
        let snapshots = self.info.as_ref().map_or(&[][..], |i| &i.snapshots[..]);
        if snapshots.iter().any(|s| {
            hit(
                Structure::SnapshotL1Table,
                s.l1_table_offset,
                u64::from(s.l1_size) * 8,
            )
        }) {
            return Some(Structure::SnapshotL1Table);
        }
        match self.layout.as_ref().and_then(|l| l.ext.bitmaps) {
            Some(b)
                if hit(
                    Structure::BitmapDirectory,
                    b.directory_offset,
                    b.directory_size,
                ) =>
            {
                Some(Structure::BitmapDirectory)
            }
            _ => None,
        }
    }

    /// QEMU's pre-write overlap check for an op about to be issued: the structure it would
    /// overwrite, if any. Reads, flushes, other files and the checker's repairs pass.
    pub(super) fn write_overlap(&self, purpose: Purpose, op: &IoOp) -> Option<Corruption> {
        let len = match op.kind {
            IoKind::Write => op.len(),
            IoKind::WriteZeroes { len } | IoKind::Allocate { len } => len,
            _ => return None,
        };
        if op.target != Target::Image {
            return None;
        }
        let (own, structure) = match purpose {
            Purpose::Guest { .. } | Purpose::AllocWrite { .. } | Purpose::JoinWrite { .. } => {
                (Own::Nothing, Structure::DataCluster)
            }
            Purpose::TableWrite { .. } => (Own::Nothing, Structure::L2Table),
            // A grown L1 table, written before the header points at it.
            Purpose::TaskIo { .. } => (Own::Nothing, Structure::L1Table),
            Purpose::Writeback { pool: Pool::L2, .. } => (Own::L2, Structure::L2Table),
            Purpose::Writeback { pool: Pool::Rb, .. } => (Own::Refblock, Structure::RefcountBlock),
            Purpose::Writeback {
                pool: Pool::None, ..
            } => {
                let s = self.table_at(op.offset);
                (Own::Fixed(s), s)
            }
            _ => return None,
        };
        self.metadata_overlap(op.offset, len, own)
            .map(|s| Corruption {
                structure,
                offset: op.offset,
                reason: CorruptReason::WriteOverlap(s),
            })
    }

    /// The fixed table a write-back of the header or a table chunk at `off` belongs to.
    fn table_at(&self, off: u64) -> Structure {
        let h = &self.hdr;
        let inside = |at: u64, bytes: u64| (at..at.saturating_add(bytes)).contains(&off);
        if off == 0 {
            Structure::Header
        } else if inside(h.l1_table_offset, u64::from(h.l1_size) * 8) {
            Structure::L1Table
        } else {
            Structure::RefcountTable
        }
    }

    /// Sets the corrupt bit in the header as last written, directly (not through a
    /// write-back cycle, which a refused metadata write has just stopped). Best effort,
    /// like QEMU's: the engine is poisoned and nothing else is written.
    pub(super) fn mark_corrupt_now(&mut self) {
        if self.hdr_disk.version < 3 || !self.op_room(1) {
            return;
        }
        let mut h = self.hdr_disk;
        h.incompatible_features |= incompat::CORRUPT;
        let buf = self.header_as(h);
        self.issue_buf(Purpose::Mark, IoKind::Write, 0, buf);
    }
}
