//! Minimised failures found by the other cases, kept as named cases. Each opens with what
//! went wrong.

use super::{layout, must};
use crate::harness::{Disk, Harness, Mode};
use crate::model::{pattern, Model};
use crate::verify::{matches_model, our_check_clean, scratch};

/// Found by `model::v3_cluster_512`: shrinking a 512-byte-cluster image so that about a
/// thousand allocated clusters fall past the new end stalled the engine (the runtime saw
/// no op and no event) instead of finishing the resize. With 511,327 bytes written the same
/// resize worked; with 511,718 it stalled.
pub fn shrink_dropping_a_thousand_clusters<H: Harness>(h: &H) {
    for version in [2, 3] {
        let dir = scratch();
        let path = dir.path().join("disk.qcow2");
        let mut disk = must(
            h.create(&path, &layout(4 << 20, version, 512, 16), Mode::writable()),
            "create",
        );
        let mut model = Model::new(4 << 20);
        let data = pattern(1, 2_200_000, 600_000);
        must(disk.write_at(&data, 2_200_000), "write");
        model.write(2_200_000, &data);
        must(
            disk.resize(2_153_984, true),
            format!("v{version}: shrink to 2153984 bytes"),
        );
        model.resize(2_153_984);
        must(disk.resize(4 << 20, false), "grow back");
        model.resize(4 << 20);
        must(matches_model(&mut disk, &model), "contents");
        must(disk.close(), "close");
        must(our_check_clean(h, &path), "check");
    }
}

/// Found by `basic::read_only_refuses_writes` and `hostile::garbage`: a flush on an image
/// opened read-only stalled the engine; it has nothing to write and must simply succeed.
pub fn flush_of_a_read_only_image<H: Harness>(h: &H) {
    let dir = scratch();
    let path = dir.path().join("disk.qcow2");
    must(
        must(
            h.create(&path, &layout(1 << 20, 3, 65536, 16), Mode::writable()),
            "create",
        )
        .close(),
        "close",
    );
    let mut disk = must(h.open(&path, Mode::read_only()), "open read-only");
    must(disk.flush(), "flush of a read-only image");
    must(disk.flush(), "second flush of a read-only image");
    must(disk.close(), "close");
}

/// Found while probing the shrink stall: with 512-byte clusters, a 1 MiB write whose
/// clusters come from a just-discarded 1 MiB range stalled the engine (a 512 KiB one did
/// not; a 64 KiB refcount cache made it pass, as for the shrink).
pub fn large_write_reusing_freed_clusters<H: Harness>(h: &H) {
    for version in [2, 3] {
        let dir = scratch();
        let path = dir.path().join("disk.qcow2");
        let mut disk = must(
            h.create(&path, &layout(8 << 20, version, 512, 16), Mode::writable()),
            "create",
        );
        let mut model = Model::new(8 << 20);
        must(
            disk.write_at(&pattern(1, 1 << 20, 1 << 20), 1 << 20),
            "first write",
        );
        must(disk.discard(1 << 20, 1 << 20), "discard");
        let data = pattern(2, 1 << 20, 1 << 20);
        must(
            disk.write_at(&data, 1 << 20),
            format!("v{version}: 1 MiB write into freed clusters"),
        );
        model.write(1 << 20, &data);
        must(matches_model(&mut disk, &model), "contents");
        must(disk.close(), "close");
        must(our_check_clean(h, &path), "check");
    }
}
