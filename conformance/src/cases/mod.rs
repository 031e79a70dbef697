//! The cases, grouped by topic. Each is `pub fn name<H: Harness>(h: &H)` and panics on
//! failure; [`instantiate!`](crate::instantiate) lists them all.

pub mod backing;
pub mod basic;
pub mod compressed;
pub mod concurrency;
pub mod create;
pub mod data_file;
pub mod entries;
pub mod features;
pub mod flush;
pub mod hostile;
pub mod interop;
mod mirror;
pub mod model;
pub mod no_alloc;
pub mod overlap;
pub mod regressions;
pub mod repair;
pub mod snapshots;
pub mod subclusters;

use std::fmt::Display;

use qcow2_proto::CreateOptions;

/// Unwraps `r`, or fails the case saying what was being done.
#[track_caller]
pub(crate) fn must<T, E: Display>(r: Result<T, E>, what: impl Display) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Creation options with the given geometry.
pub(crate) fn layout(
    size: u64,
    version: u32,
    cluster_size: u32,
    refcount_bits: u32,
) -> CreateOptions {
    let mut o = CreateOptions::new(size);
    o.version = version;
    o.cluster_size = cluster_size;
    o.refcount_bits = refcount_bits;
    o
}
