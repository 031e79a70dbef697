//! The qcow2 conformance suite, written once and instantiated per runtime.
//!
//! A runtime implements the small blocking [`Harness`](harness::Harness) trait (an async
//! runtime does so with `block_on`) and instantiates the whole case list in its
//! `tests/conformance.rs` with one macro call, the way rustls runs one suite per crypto
//! provider:
//!
//! ```text
//! qcow2_conformance::instantiate!(qcow2_conformance::sync::SyncHarness);
//! ```
//!
//! Every case becomes a `#[test]` named `<topic>::<case>` (`cargo test hostile::` runs one
//! topic). Cases declare the [`Caps`](harness::Caps) they need and print a skip line on
//! runtimes without them. Cases that need `qemu-img`/`qemu-io` fail when the tools are
//! missing and `CI` is set; elsewhere they print a skip line.
//!
//! Environment knobs: `QCOW2_QC_TESTS` (inputs per property), `QCOW2_SEED` (replays a
//! property failure), `QCOW2_ALLOC_TRACE=1` (backtrace of the first steady-state
//! allocation), `QCOW2_CASE_TIMEOUT_SECS` (hang watchdog, default 600).

#[cfg(any(feature = "smol", feature = "uring"))]
pub mod async_rt;
pub mod cases;
pub mod counting_alloc;
pub mod fuzzing;
pub mod harness;
pub mod hostile;
pub mod model;
pub mod prop;
pub mod qemu;
pub mod script;
pub mod sim;
#[cfg(feature = "smol")]
pub mod smol;
pub mod sync;
#[cfg(feature = "uring")]
pub mod uring;
pub mod verify;
pub mod watchdog;

/// Expands the whole case list into one `#[test]` per case, run against the harness value
/// `$harness` (an expression evaluated once per test), and installs the
/// [`CountingAlloc`](counting_alloc::CountingAlloc) global allocator in the test binary.
///
/// Invoke it once, at the root of a runtime's `tests/conformance.rs`.
#[macro_export]
macro_rules! instantiate {
    ($harness:expr) => {
        #[global_allocator]
        static QCOW2_CONFORMANCE_ALLOCATOR: $crate::counting_alloc::CountingAlloc =
            $crate::counting_alloc::CountingAlloc;

        $crate::__emit_cases! { $harness;
            basic {
                roundtrip,
                out_of_range,
                read_only_refuses_writes,
                resize_rules,
                block_status,
                space_reused_across_sessions,
            }
            model {
                v2_cluster_512,
                v2_cluster_4k,
                v2_cluster_64k,
                v3_cluster_512,
                v3_cluster_4k,
                v3_cluster_64k,
                v3_cluster_4k_direct,
                v3_cluster_64k_write_through,
                v3_extended_l2_16k,
                v3_extended_l2_64k_backing,
                v3_cluster_4k_backing,
            }
            interop {
                qemu_writes_cluster_512,
                qemu_writes_cluster_4k,
                qemu_writes_cluster_64k,
                qemu_writes_cluster_2m,
                we_write_cluster_512,
                we_write_cluster_4k,
                we_write_cluster_64k,
                we_write_cluster_2m,
                unaligned_sizes,
                locks_like_qemu,
            }
            create {
                preallocation_metadata,
                metadata_preallocation_filled_ahead_of_sequential_writes,
                preallocation_falloc,
                preallocation_full,
                lazy_refcounts,
                lazy_refcounts_crash_repaired_on_open,
            }
            flush {
                writeback_batch_costs_two_syncs,
                writeback_growing_batch_costs_one_sync,
                writeback_new_l2_tables_cost_three_syncs,
                writethrough_makes_each_write_durable,
            }
            no_alloc {
                reads,
                overwrites,
                allocating_writes,
                flushes,
            }
            hostile {
                base_image_is_valid,
                bad_magic,
                versions,
                cluster_bits,
                header_length,
                backing_file_name,
                l1_table,
                refcount_table,
                snapshot_table,
                refcount_order,
                crypt_method,
                unknown_incompatible_bit,
                corrupt_bit,
                dirty_bit,
                unknown_autoclear_bit_cleared,
                truncated,
                garbage,
                mutated_metadata,
            }
            entries {
                l2_entry_misaligned,
                l2_entry_past_eof,
                l2_entry_into_metadata,
                l1_entry_damaged,
                repair_leaving_corruption_while_open,
            }
            overlap {
                refcount_zero_under_l2_table,
                refcount_zero_under_refcount_block,
                refcount_zero_under_l1_table,
                refcount_zero_under_refcount_table,
                refcount_zero_under_snapshot_table,
                refcount_zero_under_snapshot_l1,
            }
            backing {
                reads_qemu_chains,
                writes_over_qemu_chains,
                overlay_we_create,
                unopenable_chains,
                grow_over_longer_backing,
                block_status_through_three_files,
            }
            data_file {
                reads_qemu_data_files,
                writes_mirror_qemu,
                we_create_data_files,
                relative_name_next_to_the_image,
                resize_follows,
            }
            features {
                encryption,
            }
            subclusters {
                reads_qemu_subclusters,
                writes_mirror_qemu,
                invalid_bitmaps_are_corruption,
                shared_clusters_are_copied,
                compressed_clusters_have_no_subclusters,
            }
            compressed {
                reads_qemu_compressed,
                writes_over_compressed,
                damaged_stream_is_corruption,
                we_write_compressed,
            }
            snapshots {
                shared_clusters_untouched_v2,
                shared_clusters_untouched_v3,
                bitmaps_maintained_by_writable_open,
            }
            concurrency {
                overlapping_writes_cluster_64k,
                overlapping_writes_cluster_4k,
                overlapping_writes_cluster_512,
                write_through_group_commit,
                same_script_same_image,
            }
            repair {
                leaks,
                refcounts_too_low,
                refcount_zero,
                copied_flags,
                l2_entries,
                l1_entries,
                compressed_descriptors,
                refcount_table_entries,
                snapshot_table,
                snapshot_table_limits,
                dirty_and_corrupt_bits,
            }
            regressions {
                shrink_dropping_a_thousand_clusters,
                flush_of_a_read_only_image,
                large_write_reusing_freed_clusters,
            }
        }
    };
}

/// The expansion of [`instantiate!`]: one module per topic, one `#[test]` per case.
#[doc(hidden)]
#[macro_export]
macro_rules! __emit_cases {
    ($harness:expr; $($topic:ident { $($case:ident),* $(,)? })*) => {
        $(
            mod $topic {
                #[allow(unused_imports)]
                use super::*;

                $(
                    #[test]
                    fn $case() {
                        let _watchdog = $crate::watchdog::Watchdog::arm(concat!(
                            stringify!($topic),
                            "::",
                            stringify!($case)
                        ));
                        $crate::cases::$topic::$case(&$harness);
                    }
                )*
            }
        )*
    };
}
