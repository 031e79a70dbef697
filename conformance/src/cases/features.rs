//! Features of later issues, in images qemu-img makes: opening refuses them with
//! `Unsupported(feature)`; compressed clusters open but reading one fails the request.

use std::path::Path;

use qcow2_proto::{Allocation, Feature, OpenError, RequestError};

use super::must;
use crate::harness::{Disk, Error, Harness, Mode};
use crate::model::{pattern, Model};
use crate::qemu::Qemu;
use crate::verify::{our_check_clean, scratch};

fn refused<H: Harness>(h: &H, path: &Path, feature: Feature) {
    for mode in [Mode::writable(), Mode::read_only()] {
        match h.open(path, mode) {
            Err(Error::Open(e)) => {
                assert_eq!(e, OpenError::Unsupported(feature), "{feature:?} ({mode:?})")
            }
            Err(other) => panic!("{feature:?} ({mode:?}): untyped error {other}"),
            Ok(_) => panic!("{feature:?} ({mode:?}): the image opened"),
        }
    }
}

/// `-o data_file=...`.
pub fn external_data_file<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("features::external_data_file") else {
        return;
    };
    let dir = scratch();
    let path = dir.path().join("img.qcow2");
    q.create(
        &path,
        &format!("data_file={}", dir.path().join("data.raw").display()),
        1 << 20,
    );
    refused(h, &path, Feature::ExternalDataFile);
}

/// `-o extended_l2=on`.
pub fn extended_l2<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("features::extended_l2") else {
        return;
    };
    let dir = scratch();
    let path = dir.path().join("img.qcow2");
    q.create(&path, "extended_l2=on,cluster_size=65536", 1 << 20);
    refused(h, &path, Feature::ExtendedL2);
}

/// `-o compression_type=zstd`.
pub fn zstd_compression<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("features::zstd_compression") else {
        return;
    };
    let dir = scratch();
    let path = dir.path().join("img.qcow2");
    q.create(&path, "compression_type=zstd", 1 << 20);
    refused(h, &path, Feature::ZstdCompression);
}

/// LUKS encryption (`-o encrypt.format=luks`).
pub fn encryption<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("features::encryption") else {
        return;
    };
    let dir = scratch();
    let path = dir.path().join("img.qcow2");
    q.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=conformance",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        &path.display().to_string(),
        "1M",
    ]);
    refused(h, &path, Feature::Encryption);
}

/// `qemu-img convert -c`: the image opens, unallocated ranges read as zero, reading a
/// compressed cluster fails with `Unsupported(CompressedClusters)`, and block status says
/// `Compressed`.
pub fn compressed_clusters<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("features::compressed_clusters") else {
        return;
    };
    let dir = scratch();
    let raw = dir.path().join("data.raw");
    let path = dir.path().join("img.qcow2");
    let size = 1u64 << 20;
    let mut model = Model::new(size);
    model.write(0, &pattern(5, 0, 128 << 10));
    model.write_raw(&raw).expect("raw file");
    let img = path.display().to_string();
    q.img(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=65536",
        &raw.display().to_string(),
        &img,
    ]);
    for mode in [Mode::read_only(), Mode::writable()] {
        let mut disk = must(h.open(&path, mode), "open a compressed image");
        let mut buf = vec![0u8; 4096];
        let r = disk.read_at(&mut buf, 4096);
        assert_eq!(
            r,
            Err(Error::Request(RequestError::Unsupported(
                Feature::CompressedClusters
            ))),
            "{mode:?}"
        );
        let s = must(
            disk.block_status(0, 65536),
            "block_status of a compressed cluster",
        );
        assert_eq!(s.allocation, Allocation::Compressed, "{mode:?}: {s:?}");
        let mut tail = vec![0xffu8; 65536];
        must(
            disk.read_at(&mut tail, 512 << 10),
            "read of an unallocated range",
        );
        assert!(
            tail.iter().all(|&b| b == 0),
            "{mode:?}: an unallocated range of a compressed image is not zero"
        );
        must(disk.close(), "close");
    }
    must(our_check_clean(h, &path), "our check of a compressed image");
    q.assert_clean(&path, "the compressed image after our opens");
}
