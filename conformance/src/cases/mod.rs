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

/// The whole disk, read at once.
pub(crate) fn read_all<D: crate::harness::Disk>(disk: &mut D) -> Vec<u8> {
    let mut got = vec![0u8; disk.len() as usize];
    must(disk.read_at(&mut got, 0), "read the whole disk");
    got
}

/// The guest contents of `image` as `qemu-img convert -O raw` gives them (through
/// `dir/want.raw`).
pub(crate) fn guest_of(
    q: &crate::qemu::Qemu,
    image: &std::path::Path,
    dir: &std::path::Path,
) -> Vec<u8> {
    let raw = dir.join("want.raw");
    q.to_raw(image, None, &raw);
    std::fs::read(&raw).expect("reading the converted image")
}

/// Where `got` first differs from `want` (or their lengths), for a failure message.
pub(crate) fn first_diff(got: &[u8], want: &[u8]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("size {} vs {}", got.len(), want.len()));
    }
    crate::model::first_difference(got, want, 0)
}

/// Fails the case (saying `ctx`) unless `disk` reads as `want`: whole, then in unaligned
/// pieces of lengths from 1 byte to 300 KB, crossing cluster and file boundaries.
#[track_caller]
pub(crate) fn assert_reads_as<D: crate::harness::Disk>(disk: &mut D, want: &[u8], ctx: &str) {
    if let Some(d) = first_diff(&read_all(disk), want) {
        panic!("{ctx}: {d}");
    }
    let mut at = 0u64;
    let mut step = 777u64;
    while at < disk.len() {
        let n = step.min(disk.len() - at);
        let mut buf = vec![0u8; n as usize];
        must(
            disk.read_at(&mut buf, at),
            format!("{ctx}: read {at:#x}+{n:#x}"),
        );
        if let Some(d) =
            crate::model::first_difference(&buf, &want[at as usize..(at + n) as usize], at)
        {
            panic!("{ctx}: piece {at:#x}+{n:#x}: {d}");
        }
        at += n;
        step = step * 7 % 300_001 + 1;
    }
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
