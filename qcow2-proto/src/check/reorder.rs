//! Rewriting the refcount structure at another refcount width (QEMU's
//! `qcow2_change_refcount_order`), as a mode of the check pass.
//!
//! The pass builds the IMRT and loads the stored refcounts as a check does; when they agree
//! (leaks are kept, as QEMU keeps them), the stored refcounts are copied into an array of
//! the new width, the new refblocks and reftable are placed in clusters free in both the
//! old and the new structure (the placement counts them in themselves, to a fixed point),
//! written, flushed, and only then does one write inside the header's first sector switch
//! `refcount_table_offset`, `refcount_table_clusters` and `refcount_order` together
//! (rule D). The old reftable and refblocks hold refcount 0 in the new structure from the
//! start, so the switch frees them. The pass then checks the image again against the new
//! structure.
//!
//! The same pass at the current width counts clusters about to be linked (a downgrade's
//! zero clusters over a backing file, allocated past the end of the file): their refcounts
//! are in place before any entry points at them (rule A), so a crash in between only
//! leaks them.

use crate::error::AmendError;
use crate::format::refcount::{self, REFTABLE_OFFSET_MASK};
use crate::format::Geometry;

use super::imrt::RefArray;
use super::pass::{Flow, Pass, Stage, EINVAL, ENOMEM};
use super::repair;

impl Pass {
    /// The first cluster whose stored refcount does not fit `order`, with its refcount.
    fn too_wide(&self, order: u32) -> Option<(u64, u64)> {
        let max = refcount::max(order);
        let mut c = 0;
        while let Some(used) = self.disk.next_used(c, self.disk.len()) {
            let r = self.disk.get(used);
            if r > max {
                return Some((used, r));
            }
            c = used + 1;
        }
        None
    }

    /// The clusters of the current reftable and refblocks.
    fn old_structure(&self) -> Vec<u64> {
        let h = self.img.hdr;
        let cb = self.img.cluster_bits;
        let first = h.refcount_table_offset >> cb;
        let mut clusters: Vec<u64> =
            (first..first + u64::from(h.refcount_table_clusters)).collect();
        clusters.extend(
            self.reftable
                .iter()
                .map(|e| e & REFTABLE_OFFSET_MASK)
                .filter(|&o| o != 0)
                .map(|o| o >> cb),
        );
        clusters
    }

    /// Refuses the change with `e`: nothing was written.
    fn refuse(&mut self, e: AmendError, reason: &str) -> Flow {
        self.amend_error = Some(e);
        self.fail_with(reason)
    }

    /// After the comparison of a reorder pass: plans the structure at the new width and
    /// starts writing it.
    pub(super) fn reorder_stage(&mut self, order: u32) -> Flow {
        if self.rebuild || self.counts.corruptions > 0 || self.counts.check_errors > 0 {
            return self.refuse(AmendError::NeedsRepair, EINVAL);
        }
        if let Some((c, r)) = self.too_wide(order) {
            let e = AmendError::RefcountTooWide {
                bits: 1 << order,
                offset: c << self.img.cluster_bits,
                refcount: r,
            };
            return self.refuse(e, EINVAL);
        }
        if self.dry {
            self.stage = Stage::Done;
            return Flow::Next;
        }
        let geo = Geometry::new(self.img.cluster_bits, order);
        let mut wide = RefArray::new(&geo);
        if wide.grow(self.disk.len(), &mut self.budget).is_err() {
            return self.refuse(AmendError::OutOfMemory, ENOMEM);
        }
        let mut c = 0;
        while let Some(used) = self.disk.next_used(c, self.disk.len()) {
            wide.set(used, self.disk.get(used));
            c = used + 1;
        }
        let end = self.added.iter().map(|&(c, _)| c + 1).max().unwrap_or(0);
        if end > wide.len() && wide.grow(end, &mut self.budget).is_err() {
            return self.refuse(AmendError::OutOfMemory, ENOMEM);
        }
        for &(c, r) in &self.added {
            wide.set(c, r.min(refcount::max(order)));
        }
        // The old structure stays in use (and untouched) until the switch.
        let old = self.old_structure();
        for &c in &old {
            if c < wide.len() {
                wide.set(c, 1);
            }
        }
        let Ok(plan) = repair::plan_rebuild(&mut wide, &mut self.budget, self.img.cluster_bits)
        else {
            return self.refuse(AmendError::OutOfMemory, ENOMEM);
        };
        // ... and free from the switch on.
        for &c in &old {
            if c < wide.len() {
                wide.set(c, 0);
            }
        }
        self.disk.free(&mut self.budget);
        self.imrt.free(&mut self.budget);
        self.imrt = wide;
        self.img.order = order;
        self.img.rb_bits = geo.rb_bits;
        self.start_rebuild(plan)
    }
}
