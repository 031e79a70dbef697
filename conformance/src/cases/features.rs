//! Features not supported, in images qemu-img makes: opening refuses them with
//! `Unsupported(feature)`.

use std::path::Path;

use qcow2_proto::{Feature, OpenError};

use crate::harness::{Error, Harness, Mode};
use crate::qemu::Qemu;
use crate::verify::scratch;

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
