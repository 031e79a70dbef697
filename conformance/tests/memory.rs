//! Memory stays bounded for hostile images: opening, reading and checking images whose
//! headers claim the largest tables QEMU allows, over files that hold almost nothing, under
//! the counting allocator. The engine may allocate up to its budgets ([`BUDGET`]); nothing a
//! header claims may take it past them.

use qcow2_conformance::counting_alloc::{count, CountingAlloc};
use qcow2_conformance::hostile::{field, ImageBytes};
use qcow2_conformance::sim::disk::SimDisk;
use qcow2_conformance::sim::driver::Sim;
use qcow2_proto::{ImageConfig, Request};

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

/// Opens `bytes` read-only (only to check them when `check_only`: tables past the end of
/// the file are then read as zeros instead of refused), reads the first MiB and runs a
/// check; returns the peak bytes live meanwhile and what happened.
fn peak(bytes: &[u8], check_only: bool) -> (u64, String) {
    let (a, what) = count(|| {
        let mut config = ImageConfig::new(0);
        config.read_only = true;
        config.check_only = check_only;
        match Sim::open(SimDisk::new(bytes.to_vec()), config, 1) {
            Err(e) => e,
            Ok((mut sim, info)) => {
                let len = info.size.min(1 << 20);
                let read = sim.run(
                    Request::Read { offset: 0, len },
                    Some(vec![0; len as usize]),
                    &mut |_| {},
                );
                let check = sim.run(Request::Check { repair: None }, None, &mut |_| {});
                format!(
                    "opened; read {:?}; check {:?}",
                    read.map(|r| r.0.is_ok()),
                    check.map(|c| c.0.is_ok())
                )
            }
        }
    });
    (a.peak, what)
}

/// What the engine may hold for any input, by DESIGN.md's limits: the whole L1 table
/// (QEMU's 32 MiB cap) and refcount table (8 MiB), the L2 cache (QEMU's default, at most
/// 32 MiB), the refcount cache (four clusters of at most 2 MiB), and 4 MiB of buffers. The
/// file itself is copied into the simulated disk (the `3 *` of the file length).
const BUDGET: u64 = (32 + 8 + 32 + 8 + 4) << 20;

#[test]
fn hostile_headers_cannot_make_the_engine_allocate() {
    let cases: Vec<(&str, ImageBytes)> = vec![
        ("largest L1 QEMU allows, past the end of a tiny file", {
            let mut i = ImageBytes::v3();
            i.set_u64(field::SIZE, 1 << 50)
                .set_u32(field::L1_SIZE, 4 << 20);
            i
        }),
        ("largest refcount table, past the end", {
            let mut i = ImageBytes::v3();
            i.set_u32(field::REFCOUNT_TABLE_CLUSTERS, (8 << 20) / 65536);
            i
        }),
        ("most snapshots, table past the end", {
            let mut i = ImageBytes::v3();
            i.set_u32(field::NB_SNAPSHOTS, 65536)
                .set_u64(field::SNAPSHOTS_OFFSET, 4 << 16);
            i
        }),
        ("a virtual size of 2^60 bytes with one L1 entry", {
            let mut i = ImageBytes::v3();
            i.set_u64(field::SIZE, 1 << 60);
            i
        }),
    ];
    for (what, img) in cases {
        let bytes = img.bytes.clone();
        for check_only in [false, true] {
            let (peak, outcome) = peak(&bytes, check_only);
            println!(
                "{what} (check_only {check_only}): file {} bytes, peak {} bytes live: {outcome}",
                bytes.len(),
                peak
            );
            let cap = 3 * bytes.len() as u64 + BUDGET;
            assert!(peak <= cap, "{what}: {peak} bytes live, cap {cap}");
        }
    }
}

/// Found by fuzzing (`fuzz/regressions/header/snapshot_extra_data_claims_gigabytes`): a
/// snapshot entry whose extra data claims 1.5 GB made `check -r all` read (and hold) the
/// whole claimed table, 2.9 GB live. The checker now never reads past twice QEMU's 64 MiB
/// table limit.
#[test]
fn regression_repair_of_a_snapshot_table_claiming_gigabytes() {
    use qcow2_proto::Repair;
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fuzz/regressions/header/snapshot_extra_data_claims_gigabytes"
    );
    let bytes = std::fs::read(path).expect("the regression input");
    let (a, ()) = count(|| {
        let mut config = ImageConfig::new(0);
        config.check_only = true;
        if let Ok((mut sim, _)) = Sim::open(SimDisk::new(bytes.clone()), config, 1) {
            let check = Request::Check {
                repair: Some(Repair::All),
            };
            let _ = sim.run(check, None, &mut |_| {});
        }
    });
    let cap = 3 * bytes.len() as u64 + BUDGET + (512 << 20);
    assert!(a.peak <= cap, "{} bytes live, cap {cap}", a.peak);
}
