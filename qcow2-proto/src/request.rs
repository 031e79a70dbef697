//! Guest requests and image operations going into the core, and what they finish with.

use crate::check::{CheckReport, Repair};

/// Identifies one submitted request until its [`Event::Done`](crate::Event::Done).
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct ReqId(pub(crate) u32);

impl ReqId {
    /// The raw value (an index into the core's request slab, below
    /// [`Limits::max_requests`](crate::Limits::max_requests)).
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A request. Guest data never travels in it: the runtime keeps the guest buffer and ops name
/// spans of it ([`Segment::Guest`](crate::Segment::Guest)).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
#[non_exhaustive]
pub enum Request {
    /// Read `len` guest bytes at `offset` into the request's buffer.
    Read {
        /// Guest byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Write `len` guest bytes at `offset` from the request's buffer.
    Write {
        /// Guest byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Make `len` guest bytes at `offset` read as zero. With `unmap`, host clusters may be
    /// released; without it, allocation is kept.
    WriteZeroes {
        /// Guest byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Whether host space may be released.
        unmap: bool,
    },
    /// Discard `len` guest bytes at `offset` (whole clusters inside the range; they read as
    /// zero afterwards on v3 images).
    Discard {
        /// Guest byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Make every write completed before this request durable.
    Flush,
    /// Change the virtual size. Shrinking drops data past the new end only with `shrink`.
    Resize {
        /// New virtual size in bytes.
        size: u64,
        /// Consent to drop allocated data past the new end.
        shrink: bool,
    },
    /// Where the guest range starting at `offset` is stored: the answer covers the first
    /// extent of at most `len` bytes with one [`BlockStatus`].
    BlockStatus {
        /// Guest byte offset.
        offset: u64,
        /// Longest extent to describe.
        len: u64,
    },
    /// Check the image's metadata, repairing what `repair` allows. Runs alone: the core waits
    /// for other requests to finish and writes back its caches first.
    Check {
        /// What to repair, if anything.
        repair: Option<Repair>,
    },
    /// Write one cluster compressed (`qemu-img convert -c`): `offset` cluster aligned, `len`
    /// a whole cluster (or the image's partial last one), the cluster unallocated (or a
    /// zero cluster without host space), as QEMU requires. When compressing does not pay,
    /// the cluster is written as it is. The guest buffer holds the data.
    WriteCompressed {
        /// Guest byte offset of the cluster.
        offset: u64,
        /// Bytes: the cluster size, or what is left of the image.
        len: u64,
    },
    /// Drop every mapping of the image (QEMU's `make_empty`, after `qemu-img commit`): every
    /// cluster becomes unallocated, reading through to the backing file again, and its host
    /// space is freed.
    MakeEmpty,
    /// Write back everything and mark the image clean; the engine accepts nothing after.
    /// Done only once no op is outstanding: the runtime may close the file at once.
    Close,
    /// Counts host clusters below byte `end` with a non-zero refcount, stopping at `limit`
    /// (qemu-img's test for metadata-preallocated images needs this).
    CountRefcounted {
        /// Host byte offset to stop at.
        end: u64,
        /// Stop counting here.
        limit: u64,
    },
}

/// What a guest range is, as [`Request::BlockStatus`] reports it.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
#[non_exhaustive]
pub enum Allocation {
    /// Not allocated in this image (reads as zero here; would fall through to a backing file).
    Unallocated,
    /// Not allocated in this image either, but inside a host cluster reserved for it (a
    /// preallocated cluster of an image with extended L2 entries, or an unwritten
    /// subcluster of an allocated cluster): reads like [`Unallocated`](Self::Unallocated).
    /// qemu-img map shows the host offset.
    Reserved {
        /// The reserved host offset.
        host: u64,
    },
    /// Reads as zero from a zero flag; `host` is a preallocated host offset, if any.
    Zero {
        /// The preallocated host offset.
        host: Option<u64>,
    },
    /// Stored uncompressed at host offset `host`.
    Data {
        /// Host byte offset of the extent's first byte.
        host: u64,
    },
    /// Stored compressed.
    Compressed,
}

impl Allocation {
    /// Whether the image itself decides what the extent reads as (data, zeros or a
    /// compressed cluster); `false` where reads fall through to the backing file.
    pub fn is_allocated(&self) -> bool {
        !matches!(self, Self::Unallocated | Self::Reserved { .. })
    }
}

/// One extent of a guest range.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct BlockStatus {
    /// Guest offset of the extent.
    pub offset: u64,
    /// Length of the extent in bytes (at least 1, at most the asked length).
    pub len: u64,
    /// What the extent is.
    pub allocation: Allocation,
    /// Where in the backing chain the extent was found: 0 is the image itself, 1 its
    /// backing file, ... For an extent allocated nowhere, the depth of the last file
    /// asked (the bottom of the chain, or 0 past the end of a shorter backing file).
    /// `Data { host }` at a depth > 0 is a host offset in that file.
    pub depth: u32,
}

/// The successful result of a request.
#[derive(Debug, Eq, PartialEq)]
#[non_exhaustive]
pub enum Outcome {
    /// The request completed; nothing to report.
    Done,
    /// The answer to [`Request::BlockStatus`].
    Status(BlockStatus),
    /// The answer to [`Request::Check`].
    Check(Box<CheckReport>),
    /// The answer to [`Request::CountRefcounted`].
    Count(u64),
    /// The answer to [`Image::read_bitmap`](crate::Image::read_bitmap).
    Bitmap(Box<crate::info::BitmapData>),
}
