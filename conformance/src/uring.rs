//! The harness for `qcow2-uring` (feature `uring`).

use std::path::Path;

use qcow2_async::{Image, OpenOptions};
use qcow2_proto::CreateOptions;

use crate::async_rt::{AsyncHarness, Opener};

/// Opens images with `qcow2-uring`.
#[derive(Debug)]
pub struct Uring;

impl Opener for Uring {
    const NAME: &'static str = "qcow2-uring";

    fn create(path: &Path, c: &CreateOptions, o: &OpenOptions) -> Result<Image, qcow2_sync::Error> {
        qcow2_uring::create(path, c, o)
    }

    fn open(path: &Path, o: &OpenOptions) -> Result<Image, qcow2_sync::Error> {
        qcow2_uring::open(path, o)
    }
}

/// The suite on the io_uring runtime.
pub type UringHarness = AsyncHarness<Uring>;
