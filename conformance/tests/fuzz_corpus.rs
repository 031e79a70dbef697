//! The fuzz corpora, replayed on stable: every file of `fuzz/corpus/<target>/` and
//! `fuzz/regressions/<target>/` goes through the target's library function
//! (`qcow2_conformance::fuzzing`), one test per target; each minimised finding also has a
//! named test of its own. A missing or nearly empty corpus fails rather than skips.
//!
//! Fuzzing itself needs nightly: `cargo +nightly fuzz run <target>` (see the README).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use qcow2_conformance::fuzzing;
use qcow2_conformance::watchdog::Watchdog;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

/// How long one input may run before it counts as a hang. (A hung input's thread is left
/// spinning; the test fails and the process ends with it.)
const INPUT_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `target` on `data` in a thread of its own: the panic message, or a hang.
fn run_bounded(target: fn(&[u8]), data: Vec<u8>) -> Result<(), String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let result = std::panic::catch_unwind(|| target(&data)).map_err(|panic| {
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default()
        });
        let _ = tx.send(result);
    });
    match rx.recv_timeout(INPUT_TIMEOUT) {
        Ok(result) => result,
        Err(_) => Err(format!("still running after {INPUT_TIMEOUT:?} (a hang)")),
    }
}

/// Runs `target` on every input of its corpus and regressions; fails listing every input
/// that panicked, or when the corpus holds fewer than `min` inputs.
fn replay(name: &'static str, target: fn(&[u8]), min: usize) {
    let _watchdog = Watchdog::arm(name);
    let corpus = files(&fuzz_dir().join("corpus").join(name));
    assert!(
        corpus.len() >= min,
        "fuzz/corpus/{name} holds {} inputs, expected at least {min}",
        corpus.len()
    );
    let regressions = files(&fuzz_dir().join("regressions").join(name));
    let mut failed = Vec::new();
    for path in corpus.iter().chain(&regressions) {
        let data = std::fs::read(path).expect("reading a corpus file");
        if let Err(msg) = run_bounded(target, data) {
            failed.push(format!("{}: {msg}", path.display()));
        }
    }
    println!(
        "{name}: {} corpus inputs, {} regressions replayed",
        corpus.len(),
        regressions.len()
    );
    assert!(
        failed.is_empty(),
        "{} inputs failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

/// Runs one minimised finding, `fuzz/regressions/<target>/<file>`.
fn regression(target: &str, file: &str, f: fn(&[u8])) {
    let path = fuzz_dir().join("regressions").join(target).join(file);
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if let Err(msg) = run_bounded(f, data) {
        panic!("{}: {msg}", path.display());
    }
}

#[test]
fn corpus_header() {
    replay("header", fuzzing::header, 10);
}

#[test]
fn corpus_image() {
    replay("image", fuzzing::image, 10);
}

#[test]
fn corpus_script() {
    replay("script", fuzzing::script, 8);
}

#[test]
fn corpus_crash() {
    replay("crash", fuzzing::crash, 8);
}

// ---- minimised findings, one test each ----

/// A writable engine asked to `check -r all` an image whose repair leaves a corruption: the
/// checker sets the corrupt bit, the engine's reload after the repair then refuses to open
/// a corrupt image read-write (`Event::OpenFailed(CorruptReadWrite)`) and the check
/// request never finishes.
#[test]
fn regression_image_check_repair_marking_corrupt_never_finishes() {
    regression(
        "image",
        "check_repair_marking_corrupt_never_finishes",
        fuzzing::image,
    );
}

/// A v2 image whose refcount table entry is `0xffff_ffff_ffff_fe00` (reserved bits set, past
/// `i64::MAX`): the engine loads that "refblock" (a read past the end of the file), changes
/// it, and computing the end of its write-back overflows (`engine/mod.rs`, `issue`:
/// `offset + len`).
#[test]
fn regression_image_reftable_entry_past_i64_max_overflows() {
    regression(
        "image",
        "reftable_entry_past_i64_max_overflows",
        fuzzing::image,
    );
}

/// A v3 image with 512-byte clusters and 32-bit refcounts, 2 MiB: write-zeroes with unmap
/// near the end, a resize to 8 MiB, then one to 64 MiB: the engine spins in `Image::pump`
/// (write-back cycles that issue no I/O while `unwritten()` stays true, waking the resize
/// task again and again) and the request never finishes.
#[test]
fn regression_script_grow_after_unmap_spins_in_pump() {
    regression("script", "grow_after_unmap_spins_in_pump", fuzzing::script);
}

/// A v3 image with 512-byte clusters and 64-bit refcounts, created with falloc
/// preallocation: the refcount table grows and moves while preallocating, and its old
/// cluster, freed, is handed out again as a data cluster that was only `fallocate`d, so
/// after a reopen the guest read the old refcount table there instead of zeros. Clusters
/// the file may hold old bytes in are now zeroed.
#[test]
fn regression_script_prealloc_reuses_freed_reftable_unzeroed() {
    regression(
        "script",
        "prealloc_reuses_freed_reftable_unzeroed",
        fuzzing::script,
    );
}

/// A hostile v3 image (512-byte clusters, 64-bit refcounts, L2 entries overlapping the L1
/// table): three writes submitted together, two of them overlapping; the third finds the
/// overlap (`Corrupt(L2Table, Overlap(L1Table))`), and afterwards the longer overlapping
/// write issues its data and never finishes (the engine stalls with nothing to do).
#[test]
fn regression_image_overlapping_writes_when_corruption_found_never_finish() {
    regression(
        "image",
        "overlapping_writes_when_corruption_found_never_finish",
        fuzzing::image,
    );
}

/// A clean v2 image (512-byte clusters, qemu-img check: no errors): one unaligned
/// write-zeroes without unmap over two unallocated clusters, then a clean close: our check
/// then finds clusters 4..=15 leaked (refcount 1, no reference); the write-zeroes wrote one
/// new cluster (16) and raised the refcounts of the twelve before it.
#[test]
fn regression_image_v2_write_zeroes_leaks_clusters() {
    regression("image", "v2_write_zeroes_leaks_clusters", fuzzing::image);
}

/// A v2 image of under four clusters whose refcount block holds refcounts for clusters
/// past the end of the file (64 of them, some 0xc7c7): a check sees no leaks (it compares
/// only up to the file's end, as QEMU's does), the allocator rightly skips those clusters,
/// and once writes grow the file over them the check reports 64 leaks. No engine fault:
/// the harness now counts a starting image's leaks over the final file's extent. (Two
/// inputs, the second from a CI fuzz run.)
#[test]
fn regression_image_refcounts_past_eof_become_leaks() {
    regression("image", "refcounts_past_eof_become_leaks", fuzzing::image);
    regression("image", "refcounts_past_eof_become_leaks_2", fuzzing::image);
}

/// A v2 image in write-through mode, 64 KiB clusters: a discard drops a cluster's mapping
/// (not yet written back: discards are not writes), then zeroes are written over part of
/// it with `unmap: false`. The range already read as zeroes, so the write changed nothing
/// and completed without a barrier; the crash after the script brought the discarded data
/// back under the completed write. (Found by the nightly fuzz run in CI; not minimised.)
#[test]
fn regression_crash_write_through_zeroes_over_unflushed_discard() {
    regression(
        "crash",
        "write_through_zeroes_over_unflushed_discard",
        fuzzing::crash,
    );
}
