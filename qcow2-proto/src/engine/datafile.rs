//! The external data file (`data_file=`): guest data lives in a separate file, at the
//! guest offset; metadata stays in the image.
//!
//! QEMU's rules (docs/interop/qcow2.txt "External data file"; block/qcow2.c,
//! block/qcow2-cluster.c, block/qcow2-refcount.c):
//! * a data cluster's host offset is its guest offset (QEMU reports a mismatch as
//!   corruption when reading), so host offset 0 is valid there: the COPIED flag, always set
//!   since data-file clusters count as refcount 1, tells it from an unallocated entry;
//! * data clusters have no refcounts in the image; nothing is ever freed for them (a
//!   discard is passed down to the data file instead);
//! * no compressed clusters (a compressed entry is corruption), no internal snapshots;
//! * with the raw flag (`data_file_raw`, autoclear bit 1) the data file must stay a valid
//!   raw image of the disk: write-zeroes write zeroes into the data file before setting
//!   the zero flags (`qcow2_subcluster_zeroize`), and creation preallocates the metadata
//!   so that every cluster is mapped 1:1.
//!
//! Opening emits [`Event::OpenDataFile`]; the runtime answers with
//! [`Image::attach_data_file`]. Ops on the file come with [`Target::DataFile`].

use crate::event::Event;
use crate::format::header::autoclear;
use crate::io::{IoKind, Target};

use super::{Block, Image, Purpose};

/// The attached external data file.
#[derive(Debug, Clone, Copy)]
pub(super) struct DataFile {
    /// Whether the runtime attached the file.
    pub(super) attached: bool,
}

impl Image {
    /// Whether the image keeps its guest data in an external data file.
    pub(super) fn has_data_file(&self) -> bool {
        self.layout.as_ref().is_some_and(|l| l.data_file.is_some())
    }

    /// Whether the data file must stay a valid raw image (raw-external-data bit).
    pub(super) fn data_file_raw(&self) -> bool {
        self.has_data_file() && self.hdr.autoclear_features & autoclear::RAW_DATA != 0
    }

    /// Host space for `n` data clusters from guest cluster `gc`: in the data file, the
    /// guest offset itself (QEMU allocates nothing and counts nothing there); else new
    /// clusters of the image.
    pub(super) fn alloc_data(&mut self, gc: u64, n: u64) -> Result<(u64, u64), Block> {
        if self.has_data_file() {
            return Ok((gc << self.geo.cluster_bits, n));
        }
        self.alloc_clusters(n, false)
    }

    /// Starts the data-file step of opening: names the file to the runtime. False when
    /// there is nothing to wait for.
    pub(super) fn request_data_file(&mut self) -> bool {
        let Some(name) = self.layout.as_ref().and_then(|l| l.data_file.clone()) else {
            return false;
        };
        self.data_file = Some(DataFile { attached: false });
        self.events.push_back(Event::OpenDataFile { name });
        true
    }

    /// Answers [`Event::OpenDataFile`]: the runtime opened the image's external data file
    /// (writable when the image is), which is `file_len` bytes long. (To refuse, drop the
    /// engine: opening cannot go on.) Creating an image sets the data file's length to the
    /// virtual size, like `qemu-img create -o data_file=`.
    pub fn attach_data_file(&mut self, file_len: u64) {
        let _ = file_len;
        let Some(df) = self.data_file.as_mut() else {
            return;
        };
        if df.attached {
            return;
        }
        df.attached = true;
        if self.create.is_some() && !self.read_only && self.op_room(1) {
            // The step stays pending until the length is set (open_complete counts it).
            let size = self.hdr.size;
            self.issue_bare_at(Target::DataFile, Purpose::Open, IoKind::SetLen, size);
        } else {
            self.open_step_done();
        }
        self.pump();
    }
}
