//! The crash simulator (`qcow2_conformance::sim`) over the core: a crash point after every op
//! completion of random scripts, in both cache modes and with lazy refcounts on and off. Each
//! run asserts at least 2,000 crash points, so the five cover more than ten thousand.
//! `cargo test -p qcow2-conformance crash -- --nocapture` shows each run's tally line.

use qcow2_conformance::script::{Op, Script};
use qcow2_conformance::sim::{crash_script, crash_test, CrashConfig, Tally};

fn config(version: u32, cluster_size: u32, write_through: bool, lazy: bool) -> CrashConfig {
    CrashConfig {
        version,
        cluster_size,
        write_through,
        lazy_refcounts: lazy,
        scripts: 48,
        script_len: 30,
        backing: false,
        compressed: false,
        extended_l2: false,
        l2_cache_bytes: None,
        grow_step: 0,
    }
}

fn run(name: &str, cfg: CrashConfig, min_points: u64) {
    assert_clean(name, &crash_test(name, cfg), min_points);
}

/// No corruption, no lost write, and at least `min_points` crash points.
fn assert_clean(name: &str, t: &Tally, min_points: u64) {
    assert_eq!(
        (t.corruptions, t.lost),
        (0, 0),
        "{}: {:?}",
        t.line(),
        t.first
    );
    assert!(
        t.points >= min_points,
        "{name}: only {} crash points",
        t.points
    );
}

#[test]
fn crash_writeback_v3_64k() {
    let cfg = CrashConfig {
        scripts: 96,
        ..config(3, 65536, false, false)
    };
    run("crash_writeback_v3_64k", cfg, 2000);
}

#[test]
fn crash_writethrough_v3_4k() {
    let cfg = CrashConfig {
        scripts: 64,
        ..config(3, 4096, true, false)
    };
    run("crash_writethrough_v3_4k", cfg, 2000);
}

#[test]
fn faults_at_every_op_writeback_v3_4k() {
    let t = qcow2_conformance::sim::fault_test(
        "faults_at_every_op_writeback_v3_4k",
        CrashConfig {
            scripts: 24,
            ..config(3, 4096, false, false)
        },
    );
    assert!(t.runs >= 500, "only {} fault runs", t.runs);
    assert!(t.failed_requests > 0 && t.poisoned > 0, "{t:?}");
}

#[test]
fn faults_at_every_op_writethrough_v2_64k() {
    let t = qcow2_conformance::sim::fault_test(
        "faults_at_every_op_writethrough_v2_64k",
        CrashConfig {
            scripts: 24,
            ..config(2, 65536, true, false)
        },
    );
    assert!(t.runs >= 500, "only {} fault runs", t.runs);
    assert!(t.failed_requests > 0 && t.poisoned > 0, "{t:?}");
}

#[test]
fn crash_writeback_v3_4k() {
    let cfg = CrashConfig {
        scripts: 72,
        ..config(3, 4096, false, false)
    };
    run("crash_writeback_v3_4k", cfg, 2000);
}

#[test]
fn crash_writeback_v2_512() {
    run("crash_writeback_v2_512", config(2, 512, false, false), 2000);
}

#[test]
fn crash_lazy_refcounts_v3_4k() {
    let cfg = CrashConfig {
        scripts: 72,
        ..config(3, 4096, false, true)
    };
    run("crash_lazy_refcounts_v3_4k", cfg, 2000);
}

/// Over a backing file: partial writes copy head and tail from it (rule C covers the copy),
/// discards and zeroes hide it, grown space reads as zero.
#[test]
fn crash_backing_writeback_v3_4k() {
    let cfg = CrashConfig {
        scripts: 72,
        backing: true,
        ..config(3, 4096, false, false)
    };
    run("crash_backing_writeback_v3_4k", cfg, 2000);
}

/// The same in a v2 image (no zero flag: zeroes are written, discards keep data), write-
/// through.
#[test]
fn crash_backing_writethrough_v2_64k() {
    let cfg = CrashConfig {
        backing: true,
        ..config(2, 65536, true, false)
    };
    run("crash_backing_writethrough_v2_64k", cfg, 2000);
}

#[test]
fn faults_at_every_op_backing_v3_64k() {
    let t = qcow2_conformance::sim::fault_test(
        "faults_at_every_op_backing_v3_64k",
        CrashConfig {
            scripts: 16,
            backing: true,
            ..config(3, 65536, false, false)
        },
    );
    assert!(t.runs >= 300, "only {} fault runs", t.runs);
    assert!(t.failed_requests > 0 && t.poisoned > 0, "{t:?}");
}

/// Compressed writes among the others: streams byte-packed into shared clusters, linked
/// only once written; overwriting and discarding them frees their space.
#[test]
fn crash_compressed_writeback_v3_4k() {
    let cfg = CrashConfig {
        scripts: 80,
        compressed: true,
        ..config(3, 4096, false, false)
    };
    run("crash_compressed_writeback_v3_4k", cfg, 2000);
}

#[test]
fn faults_at_every_op_compressed_v2_64k() {
    let t = qcow2_conformance::sim::fault_test(
        "faults_at_every_op_compressed_v2_64k",
        CrashConfig {
            scripts: 16,
            compressed: true,
            ..config(2, 65536, true, false)
        },
    );
    assert!(t.runs >= 300, "only {} fault runs", t.runs);
    assert!(t.failed_requests > 0 && t.poisoned > 0, "{t:?}");
}

/// Extended L2 entries over a backing file: partial writes into unallocated clusters copy
/// only their edge subclusters, in-place writes into allocated clusters and subcluster
/// zeroes change only bitmaps; no crash may expose a subcluster whose data was not durable
/// before its bit.
#[test]
fn crash_extended_l2_backing_writeback_16k() {
    let cfg = CrashConfig {
        scripts: 96,
        backing: true,
        extended_l2: true,
        ..config(3, 16384, false, false)
    };
    run("crash_extended_l2_backing_writeback_16k", cfg, 2000);
}

/// The same without a backing file, write-through, 64 KiB clusters (2 KiB subclusters).
#[test]
fn crash_extended_l2_writethrough_64k() {
    let cfg = CrashConfig {
        scripts: 80,
        extended_l2: true,
        ..config(3, 65536, true, false)
    };
    run("crash_extended_l2_writethrough_64k", cfg, 2000);
}

#[test]
fn faults_at_every_op_extended_l2_backing_32k() {
    let t = qcow2_conformance::sim::fault_test(
        "faults_at_every_op_extended_l2_backing_32k",
        CrashConfig {
            scripts: 16,
            backing: true,
            extended_l2: true,
            ..config(3, 32768, false, false)
        },
    );
    assert!(t.runs >= 300, "only {} fault runs", t.runs);
    assert!(t.failed_requests > 0 && t.poisoned > 0, "{t:?}");
}

/// Found by the fault test (a short write of a refcount block): a poisoned engine whose L2
/// cache held only dirty slices parked a read that missed the cache until a write-back
/// cycle made room, and a poisoned engine runs none: the read hung. It fails now.
#[test]
fn regression_poisoned_engine_with_a_dirty_cache_fails_reads() {
    use qcow2_conformance::sim::driver::{Fault, FaultKind, Sim};
    use qcow2_proto::{CreateOptions, ImageConfig, Request, RequestError};

    let mut options = CreateOptions::new(8 << 20);
    options.cluster_size = 4096;
    let mut config = ImageConfig::new(0);
    // Two L2 slices of 4 KiB, each mapping 2 MiB.
    config.l2_cache_bytes = Some(8192);
    let (mut sim, _) = Sim::create(options, config, 1).expect("create");
    let write = |sim: &mut Sim, offset: u64| {
        let (r, _) = sim
            .run(
                Request::Write { offset, len: 4096 },
                Some(vec![7; 4096]),
                &mut |_| {},
            )
            .expect("write");
        r.expect("write");
    };
    // Three L2 tables, written back; then two slices dirty, the third evicted.
    for offset in [0, 2 << 20, 4 << 20] {
        write(&mut sim, offset);
    }
    let (flushed, _) = sim.run(Request::Flush, None, &mut |_| {}).expect("flush");
    flushed.expect("flush");
    for offset in [8192, (2 << 20) + 8192] {
        write(&mut sim, offset);
    }
    sim.fault = Some(Fault {
        at: sim.completions,
        errno: 5,
        kind: FaultKind::Fail,
    });
    let (flushed, _) = sim.run(Request::Flush, None, &mut |_| {}).expect("flush");
    assert!(flushed.is_err(), "the flush whose write-back failed");
    let (read, _) = sim
        .run(
            Request::Read {
                offset: 4 << 20,
                len: 4096,
            },
            Some(vec![0; 4096]),
            &mut |_| {},
        )
        .expect("the read finishes");
    assert_eq!(read.err(), Some(RequestError::Poisoned));
}

/// Internal snapshots created, applied and deleted with a crash point after every op
/// completion: the image lists the snapshots from before or after, reads as before (or,
/// for an apply, as after: the switch is atomic), every snapshot reads as taken, and only
/// COPIED flags may disagree with refcounts until `check -r all`.
#[test]
fn crash_snapshot_operations_v3_4k() {
    let t = qcow2_conformance::sim::snapshots::snapshot_crash_test(
        "crash_snapshot_operations_v3_4k",
        CrashConfig {
            scripts: 12,
            script_len: 8,
            ..config(3, 4096, false, false)
        },
    );
    assert!(t.points >= 500, "only {} crash points", t.points);
}

/// 512-byte clusters (128 L2 tables) with an L2 cache of two slices: the walks over every
/// table fill the cache, and write-back cycles run in the middle of the operations.
#[test]
fn crash_snapshot_operations_small_cache_512() {
    let t = qcow2_conformance::sim::snapshots::snapshot_crash_test(
        "crash_snapshot_operations_small_cache_512",
        CrashConfig {
            scripts: 4,
            script_len: 6,
            l2_cache_bytes: Some(1024),
            ..config(3, 512, false, false)
        },
    );
    assert!(t.points >= 500, "only {} crash points", t.points);
}

/// The same with extended L2 entries and a backing file, and in a v2 image.
#[test]
fn crash_snapshot_operations_extended_l2_and_v2() {
    for (name, cfg) in [
        (
            "crash_snapshot_operations_extended_l2_16k",
            CrashConfig {
                scripts: 6,
                script_len: 8,
                backing: true,
                extended_l2: true,
                ..config(3, 16384, false, false)
            },
        ),
        (
            "crash_snapshot_operations_v2_64k",
            CrashConfig {
                scripts: 6,
                script_len: 8,
                ..config(2, 65536, false, false)
            },
        ),
    ] {
        let t = qcow2_conformance::sim::snapshots::snapshot_crash_test(name, cfg);
        assert!(t.points >= 200, "{name}: only {} crash points", t.points);
    }
}

#[test]
fn faults_in_snapshot_operations_v3_4k() {
    let (runs, failed) = qcow2_conformance::sim::snapshots::snapshot_fault_test(
        "faults_in_snapshot_operations_v3_4k",
        CrashConfig {
            scripts: 16,
            script_len: 6,
            ..config(3, 4096, false, false)
        },
    );
    assert!(runs >= 150 && failed > 0, "runs {runs}, failed {failed}");
}

/// Persistent bitmaps maintained across a session with a crash point after every op
/// completion (writes, zeroes, discards, a flush, the close that stores them): every
/// bitmap a crashed image lists as not in use covers every granule that changed (a
/// disabled one is as stored), and the image checks with no error. Crashes both before
/// and after the store are seen.
#[test]
fn crash_while_bitmaps_are_maintained() {
    for (name, cfg) in [
        (
            "bitmaps_v3_64k_write_back",
            CrashConfig {
                scripts: 8,
                script_len: 10,
                ..config(3, 65536, false, false)
            },
        ),
        (
            "bitmaps_v3_4k_write_through",
            CrashConfig {
                scripts: 6,
                script_len: 10,
                ..config(3, 4096, true, false)
            },
        ),
        (
            "bitmaps_extended_l2_16k_backing",
            CrashConfig {
                scripts: 6,
                script_len: 10,
                backing: true,
                extended_l2: true,
                ..config(3, 16384, false, false)
            },
        ),
    ] {
        let (t, seen) = qcow2_conformance::sim::bitmaps::bitmap_crash_test(name, cfg);
        assert!(t.points >= 300, "{name}: only {} crash points", t.points);
        // Most crash points fall while the bitmaps are in use; the last ones of the
        // store leave them stored and checked: both kinds must have been seen.
        assert!(seen.stale > 0 && seen.trusted > 0, "{name}: {seen:?}");
    }
}

/// Amends in a row (every refcount width, compat down and up, lazy refcounts on and off)
/// with a crash point after every op completion: every crashed image has the format from
/// before or after, reads as before (snapshot too), and checks clean but for leaks.
#[test]
fn crash_amend_v3_4k() {
    let t = qcow2_conformance::sim::amend::amend_crash_test(
        "crash_amend_v3_4k",
        CrashConfig {
            scripts: 10,
            script_len: 5,
            ..config(3, 4096, false, false)
        },
    );
    assert!(t.points >= 500, "only {} crash points", t.points);
}

/// The same from version 2 images and over a backing file (a downgrade then gives zero
/// clusters new clusters of zeroes), with 512-byte clusters and a small L2 cache.
#[test]
fn crash_amend_v2_and_backing() {
    for (name, cfg) in [
        (
            "crash_amend_v2_64k",
            CrashConfig {
                scripts: 6,
                script_len: 5,
                ..config(2, 65536, false, false)
            },
        ),
        (
            "crash_amend_backing_512",
            CrashConfig {
                scripts: 6,
                script_len: 5,
                backing: true,
                l2_cache_bytes: Some(1024),
                ..config(3, 512, false, false)
            },
        ),
    ] {
        let t = qcow2_conformance::sim::amend::amend_crash_test(name, cfg);
        assert!(t.points >= 200, "{name}: only {} crash points", t.points);
    }
}

/// An I/O error at every op completion of the last amend: it fails with a typed error or
/// succeeds, and the file is as after a crash.
#[test]
fn faults_in_amend_v3_4k() {
    let (runs, failed) = qcow2_conformance::sim::amend::amend_fault_test(
        "faults_in_amend_v3_4k",
        CrashConfig {
            scripts: 10,
            script_len: 3,
            backing: true,
            ..config(3, 4096, false, false)
        },
    );
    assert!(runs >= 150 && failed > 0, "runs {runs}, failed {failed}");
}

/// Sequential streams over a backing file with many writes in flight (copy-on-write
/// deferred, writes joining allocations in flight, reads put off and trimmed): a crash
/// point after every op completion, in both cache modes and on 4 KiB and 64 KiB clusters.
#[test]
fn crash_while_sequential_streams_join_allocations() {
    use qcow2_conformance::sim::streams::stream_crash_test;
    for (name, cfg, rounds) in [
        (
            "streams_v3_64k_write_back",
            CrashConfig {
                scripts: 4,
                backing: true,
                ..config(3, 65536, false, false)
            },
            12,
        ),
        (
            "streams_v3_4k_write_through",
            CrashConfig {
                scripts: 4,
                backing: true,
                ..config(3, 4096, true, false)
            },
            12,
        ),
        (
            "streams_v2_64k_lazy_write_back",
            CrashConfig {
                scripts: 3,
                backing: true,
                ..config(2, 65536, false, false)
            },
            10,
        ),
    ] {
        assert_clean(name, &stream_crash_test(name, cfg, rounds), 500);
    }
}

/// Writes into a growing image racing flush cycles: streams of writes with a flush among
/// them, so that allocations finish while a cycle takes its copies. Those into fresh space
/// counted on disk ahead are linked then (instead of waiting for the cycle's barriers);
/// the others wait. With steps of 64 MiB the counts are nearly always ahead; with steps of
/// 16 clusters (two counted ahead at a time) allocations often outrun them.
#[test]
fn crash_while_growing_writes_race_flush_cycles() {
    use qcow2_conformance::sim::streams::stream_crash_test;
    for (name, cfg, rounds) in [
        (
            "streams_growing_v3_4k",
            CrashConfig {
                scripts: 6,
                grow_step: 64 << 20,
                ..config(3, 4096, false, false)
            },
            12,
        ),
        (
            "streams_growing_small_steps_v3_4k",
            CrashConfig {
                scripts: 6,
                grow_step: 64 << 10,
                ..config(3, 4096, false, false)
            },
            12,
        ),
        (
            "streams_growing_v3_64k",
            CrashConfig {
                scripts: 4,
                grow_step: 64 << 20,
                ..config(3, 65536, false, false)
            },
            12,
        ),
    ] {
        assert_clean(name, &stream_crash_test(name, cfg, rounds), 500);
    }
}

/// Small writes covering whole clusters from their first byte, all in flight at once,
/// copy nothing from the backing file but the first cluster's tail (its first write does
/// not continue a stream): the first write of each later cluster allocates it and the
/// others join before the copy would be read. (Copying every cluster's tail would read
/// four times as much.)
#[test]
fn sequential_writes_covering_clusters_copy_nothing() {
    use qcow2_conformance::sim::streams::covered_clusters_copy_nothing;
    for cs in [4096, 65536] {
        let cfg = CrashConfig {
            backing: true,
            ..config(3, cs, false, false)
        };
        let read = covered_clusters_copy_nothing(&cfg).unwrap();
        let first_tail = u64::from(cs) - u64::from(cs) / 4;
        assert_eq!(
            read, first_tail,
            "{cs}-byte clusters: {read} bytes copied from the backing file"
        );
    }
}

/// Growing ahead (as the runtimes do): refcounts written ahead of allocation, data into
/// never-written host space unordered with the L2 entries that map it, and the counts
/// ahead taken back at close and before image operations. Crashes leak at most.
#[test]
fn crash_growing_writeback() {
    for (name, cfg) in [
        (
            "crash_growing_writeback_v3_64k",
            CrashConfig {
                scripts: 64,
                grow_step: 64 << 20,
                ..config(3, 65536, false, false)
            },
        ),
        (
            "crash_growing_writeback_v3_4k",
            CrashConfig {
                scripts: 64,
                grow_step: 64 << 20,
                ..config(3, 4096, false, false)
            },
        ),
        (
            "crash_growing_backing_v3_4k",
            CrashConfig {
                scripts: 48,
                backing: true,
                grow_step: 64 << 20,
                ..config(3, 4096, false, false)
            },
        ),
        (
            "crash_growing_extended_l2_16k",
            CrashConfig {
                scripts: 48,
                backing: true,
                extended_l2: true,
                grow_step: 64 << 20,
                ..config(3, 16384, false, false)
            },
        ),
        (
            "crash_growing_writethrough_v2_4k",
            CrashConfig {
                scripts: 32,
                grow_step: 64 << 20,
                ..config(2, 4096, true, false)
            },
        ),
        (
            // Steps of 16 clusters, so two counted ahead at a time: allocations often
            // outrun the counts on disk (they must then wait for a cycle to link).
            "crash_growing_small_steps_v3_4k",
            CrashConfig {
                scripts: 48,
                grow_step: 64 << 10,
                ..config(3, 4096, false, false)
            },
        ),
    ] {
        run(name, cfg, 1000);
    }
}

/// Snapshot operations and faults while growing ahead: the counts written ahead are
/// dropped before each operation, and an engine poisoned or turned read-only leaves at
/// most leaks.
#[test]
fn crash_and_faults_growing_snapshots() {
    let cfg = CrashConfig {
        scripts: 8,
        script_len: 8,
        grow_step: 64 << 20,
        ..config(3, 4096, false, false)
    };
    let t = qcow2_conformance::sim::snapshots::snapshot_crash_test(
        "crash_snapshot_operations_growing_4k",
        cfg,
    );
    assert!(t.points >= 300, "only {} crash points", t.points);
    let t = qcow2_conformance::sim::fault_test(
        "faults_at_every_op_growing_v3_4k",
        CrashConfig { scripts: 40, ..cfg },
    );
    assert!(t.runs >= 300, "only {} fault runs", t.runs);
    assert!(t.failed_requests > 0 && t.poisoned > 0, "{t:?}");
}

/// Found by `crash_growing_writeback`: a resize that grows the disk zeroes the tail of the
/// old last cluster in place, and that zeroing must be durable before the new size. With
/// the refcounts written ahead, the cycle had no other reason for its first barrier, and
/// the new size could land first (the old bytes then showed past the old end).
#[test]
fn crash_growing_resize_zeroes_old_tail_first() {
    let script = Script {
        ops: vec![
            Op::Write {
                offset: 3375104,
                len: 269402,
                seed: 3024678164,
            },
            Op::Resize { size: 3476480 },
            Op::Flush,
            Op::Resize { size: 4837376 },
        ],
    };
    let cfg = CrashConfig {
        grow_step: 64 << 20,
        ..config(3, 65536, false, false)
    };
    let t = crash_script(cfg, &script, 64);
    assert_clean("crash_growing_resize_zeroes_old_tail_first", &t, 100);
}

/// Random scripts with several requests in flight: consecutive steps that share no sector go
/// in as one batch (flushes among them, each held to what completed before it was sent,
/// also while the cycle of the flush before still runs), with a crash point after every op
/// completion, in both cache modes, over a backing file, growing and with subclusters.
#[test]
fn crash_with_requests_in_flight() {
    use qcow2_conformance::sim::concurrent::concurrent_crash_test;
    for (name, cfg) in [
        (
            "concurrent_writeback_v3_64k",
            CrashConfig {
                scripts: 24,
                script_len: 80,
                ..config(3, 65536, false, false)
            },
        ),
        (
            "concurrent_writethrough_v3_4k",
            CrashConfig {
                scripts: 24,
                script_len: 80,
                ..config(3, 4096, true, false)
            },
        ),
        (
            "concurrent_backing_writeback_v2_4k",
            CrashConfig {
                scripts: 16,
                script_len: 80,
                backing: true,
                ..config(2, 4096, false, false)
            },
        ),
        (
            "concurrent_growing_writeback_v3_4k",
            CrashConfig {
                scripts: 24,
                script_len: 80,
                grow_step: 64 << 10,
                ..config(3, 4096, false, false)
            },
        ),
        (
            "concurrent_extended_l2_backing_writeback_32k",
            CrashConfig {
                scripts: 16,
                script_len: 80,
                backing: true,
                extended_l2: true,
                ..config(3, 32768, false, false)
            },
        ),
        (
            "concurrent_small_cache_writeback_v3_512",
            CrashConfig {
                scripts: 16,
                script_len: 80,
                l2_cache_bytes: Some(1024),
                ..config(3, 512, false, false)
            },
        ),
    ] {
        assert_clean(name, &concurrent_crash_test(name, cfg), 300);
    }
}
