//! The harness for the blocking runtime, `qcow2-sync` (feature `sync`).

use std::fs::File;
use std::path::Path;

use qcow2_proto::{BlockStatus, CheckReport, CreateOptions, ImageInfo, Repair};
use qcow2_sync::{Cache, Image, OpenOptions};

use crate::harness::{Caps, Disk, Durability, Error, Harness, Mode};

/// Runs the suite on [`qcow2_sync::Image`] over real files.
#[derive(Clone, Copy, Debug, Default)]
pub struct SyncHarness;

/// The runtime options for a case's mode (shared by every runtime's harness).
pub fn options(mode: Mode) -> OpenOptions {
    OpenOptions {
        read_only: mode.read_only,
        force_share: mode.force_share,
        check_only: mode.check_only,
        backing: if mode.refuse_backing {
            qcow2_sync::BackingPolicy::Refuse
        } else {
            qcow2_sync::BackingPolicy::Follow
        },
        cache: match (mode.durability, mode.direct) {
            (Durability::WriteBack, false) => Cache::WriteBack,
            (Durability::WriteThrough, false) => Cache::WriteThrough,
            (Durability::WriteBack, true) => Cache::None,
            (Durability::WriteThrough, true) => Cache::DirectSync,
        },
        grow_step: mode.grow_step,
        ..OpenOptions::default()
    }
}

/// A runtime error as the suite reports it.
pub fn error(e: qcow2_sync::Error) -> Error {
    match e {
        qcow2_sync::Error::Open(e) => Error::Open(e),
        qcow2_sync::Error::Request(e) => Error::Request(e),
        other => Error::Other(other.to_string()),
    }
}

impl Harness for SyncHarness {
    type Disk = SyncDisk;

    fn name(&self) -> &'static str {
        "qcow2-sync"
    }

    fn caps(&self) -> Caps {
        Caps {
            real_files: true,
            flush_count: true,
            write_through: true,
            direct_io: true,
            alloc_free: true,
            concurrent: false,
        }
    }

    fn create(&self, path: &Path, create: &CreateOptions, mode: Mode) -> Result<SyncDisk, Error> {
        Image::create(path, create, &options(mode))
            .map(SyncDisk)
            .map_err(error)
    }

    fn open(&self, path: &Path, mode: Mode) -> Result<SyncDisk, Error> {
        Image::open(path, &options(mode))
            .map(SyncDisk)
            .map_err(error)
    }
}

/// An image open in the blocking runtime.
#[derive(Debug)]
pub struct SyncDisk(Image<File>);

impl Disk for SyncDisk {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.0.read_at(buf, offset).map_err(error)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), Error> {
        self.0.write_at(buf, offset).map_err(error)
    }

    fn write_compressed(&mut self, buf: &[u8], offset: u64) -> Result<(), Error> {
        self.0.write_compressed(buf, offset).map_err(error)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), Error> {
        self.0.write_zeroes(offset, len, unmap).map_err(error)
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), Error> {
        self.0.discard(offset, len).map_err(error)
    }

    fn flush(&mut self) -> Result<(), Error> {
        self.0.flush().map_err(error)
    }

    fn resize(&mut self, size: u64, shrink: bool) -> Result<(), Error> {
        self.0.resize(size, shrink).map_err(error)
    }

    fn block_status(&mut self, offset: u64, len: u64) -> Result<BlockStatus, Error> {
        self.0.block_status(offset, len).map_err(error)
    }

    fn check(&mut self, repair: Option<Repair>) -> Result<CheckReport, Error> {
        self.0.check(repair).map_err(error)
    }

    fn len(&self) -> u64 {
        self.0.len()
    }

    fn info(&self) -> &ImageInfo {
        self.0.info()
    }

    fn flush_count(&self) -> u64 {
        self.0.flush_count()
    }

    fn close(self) -> Result<(), Error> {
        self.0.close().map_err(error)
    }
}
