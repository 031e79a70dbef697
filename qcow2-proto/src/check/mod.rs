//! Sans-IO consistency check and repair, as `qemu-img check [-r leaks|all]` does it.
//!
//! The [`Checker`] reads every metadata structure through ops (like the engine), rebuilds the
//! refcount of every host cluster from the references it finds, compares with the stored
//! refcounts, and reports corruptions and leaks; with [`Repair`] it fixes what QEMU fixes.

/// What `check` may repair.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Repair {
    /// `-r leaks`: drop refcounts of clusters nothing references.
    Leaks,
    /// `-r all`: leaks and every repairable corruption (refcount rebuild, COPIED flags).
    All,
}

/// The result of a check, with qemu-img's counters (`--output=json` field names in docs).
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct CheckReport {
    /// `corruptions`: errors that remain.
    pub corruptions: u64,
    /// `leaks`: leaked clusters that remain.
    pub leaks: u64,
    /// `check-errors`: internal errors (I/O, memory) while checking.
    pub check_errors: u64,
    /// `corruptions-fixed`.
    pub corruptions_fixed: u64,
    /// `leaks-fixed`.
    pub leaks_fixed: u64,
    /// `image-end-offset`: end of the last used host cluster.
    pub image_end_offset: u64,
    /// `total-clusters`: guest clusters (virtual size / cluster size, rounded up).
    pub total_clusters: u64,
    /// `allocated-clusters`: guest clusters allocated in this image.
    pub allocated_clusters: u64,
    /// `fragmented-clusters`.
    pub fragmented_clusters: u64,
    /// `compressed-clusters`.
    pub compressed_clusters: u64,
    /// Detail lines, as qemu-img prints them on stderr ("Leaked cluster 9 refcount=1 reference=0").
    pub messages: Vec<String>,
}
