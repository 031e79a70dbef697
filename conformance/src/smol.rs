//! The harness for `qcow2-smol` (feature `smol`).

use std::path::Path;

use qcow2_async::{Image, OpenOptions};
use qcow2_proto::CreateOptions;

use crate::async_rt::{AsyncHarness, Opener};

/// Opens images with `qcow2-smol`.
#[derive(Debug)]
pub struct Smol;

impl Opener for Smol {
    const NAME: &'static str = "qcow2-smol";

    fn create(path: &Path, c: &CreateOptions, o: &OpenOptions) -> Result<Image, qcow2_sync::Error> {
        futures_lite::future::block_on(qcow2_smol::create(path, c, o))
    }

    fn open(path: &Path, o: &OpenOptions) -> Result<Image, qcow2_sync::Error> {
        futures_lite::future::block_on(qcow2_smol::open(path, o))
    }
}

/// The suite on the smol runtime.
pub type SmolHarness = AsyncHarness<Smol>;
