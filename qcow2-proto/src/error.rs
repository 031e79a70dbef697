//! Typed, small, allocation-free errors. Messages say what is wrong with which structure at
//! which offset; where QEMU has a message for the same fault, ours says the same thing.

use crate::io::IoError;

/// A metadata structure, for error messages and corruption reports.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
#[non_exhaustive]
pub enum Structure {
    /// The header (cluster 0).
    Header,
    /// A header extension.
    HeaderExtension,
    /// The active L1 table.
    L1Table,
    /// An L2 table.
    L2Table,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// The snapshot table.
    SnapshotTable,
    /// A data cluster.
    DataCluster,
    /// A compressed cluster.
    CompressedCluster,
    /// The bitmap directory.
    BitmapDirectory,
    /// A snapshot's L1 table.
    SnapshotL1Table,
}

impl std::fmt::Display for Structure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Header => "header",
            Self::HeaderExtension => "header extension",
            Self::L1Table => "L1 table",
            Self::L2Table => "L2 table",
            Self::RefcountTable => "refcount table",
            Self::RefcountBlock => "refcount block",
            Self::SnapshotTable => "snapshot table",
            Self::DataCluster => "data cluster",
            Self::CompressedCluster => "compressed cluster",
            Self::BitmapDirectory => "bitmap directory",
            Self::SnapshotL1Table => "snapshot L1 table",
        })
    }
}

/// Why a structure is considered corrupt.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CorruptReason {
    /// An offset that must be cluster aligned is not.
    #[error("offset is not cluster aligned")]
    Unaligned,
    /// An entry points at host offset 0 (the header).
    #[error("points at the image header")]
    PointsAtHeader,
    /// An entry points into other metadata.
    #[error("overlaps with {0}")]
    Overlap(Structure),
    /// A write to it would have overwritten other metadata (QEMU's overlap check): it was
    /// refused.
    #[error("preventing invalid write on metadata (overlaps with {0})")]
    WriteOverlap(Structure),
    /// Reserved bits are set.
    #[error("reserved bits are set")]
    ReservedBits,
    /// A zero flag in a version 2 image.
    #[error("zero cluster entry found in pre-v3 image")]
    ZeroFlagInV2,
    /// An entry points past the end of the image file.
    #[error("points past the end of the image file")]
    PastEof,
    /// An offset beyond what the format can address.
    #[error("offset beyond the addressable range")]
    OffsetTooLarge,
    /// A referenced cluster has refcount 0, or a refcount would overflow.
    #[error("refcount does not match its references")]
    Refcount,
    /// The image's corrupt bit is set.
    #[error("the image is marked corrupt")]
    MarkedCorrupt,
    /// A compressed cluster's stream does not decompress to a whole cluster.
    #[error("compressed data does not decompress to a cluster")]
    BadCompressedData,
    /// A data cluster of an image with an external data file is not at its guest offset.
    #[error("external data file host cluster offset does not match the guest offset")]
    DataFileOffset,
    /// A compressed cluster in an image with an external data file.
    #[error("compressed cluster entry found in an image with an external data file")]
    CompressedInDataFile,
    /// An extended L2 entry's subcluster bitmap marks a subcluster both allocated and zero,
    /// or allocated in an unallocated cluster (QEMU: "Invalid cluster entry found").
    #[error("invalid subcluster bitmap (invalid cluster entry)")]
    InvalidSubclusterBitmap,
}

/// A corruption found at run time.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
#[error("{structure} at host offset {offset:#x} is corrupt: {reason}")]
pub struct Corruption {
    /// The damaged structure.
    pub structure: Structure,
    /// Its host offset (or the offending entry's value).
    pub offset: u64,
    /// What is wrong.
    pub reason: CorruptReason,
}

/// A feature of the format this engine does not support (yet).
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
#[non_exhaustive]
pub enum Feature {
    /// A backing file.
    BackingFile,
    /// An external data file.
    ExternalDataFile,
    /// Extended L2 entries (subclusters).
    /// The zstd compression type.
    ZstdCompression,
    /// zlib-compressed clusters.
    CompressedClusters,
    /// Encryption (AES or LUKS).
    Encryption,
    /// Refcount rebuild of a dirty image opened writable (lazy refcounts after a crash).
    DirtyImageRepair,
    /// Resizing a version 2 image that has internal snapshots.
    ResizeV2WithSnapshots,
}

impl std::fmt::Display for Feature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::BackingFile => "backing files",
            Self::ExternalDataFile => "external data files",
            Self::ZstdCompression => "zstd compression type",
            Self::CompressedClusters => "compressed clusters",
            Self::Encryption => "encryption",
            Self::DirtyImageRepair => {
                "opening a dirty image (lazy refcounts, not closed cleanly) read/write; \
                 repair it with `qcow2 check -r all` or open it read-only"
            }
            Self::ResizeV2WithSnapshots => "resizing a v2 image which has snapshots",
        })
    }
}

/// Which header table a limit or offset error is about.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
#[non_exhaustive]
pub enum Table {
    /// The active L1 table.
    ActiveL1,
    /// The refcount table.
    Refcount,
    /// The snapshot table.
    Snapshot,
    /// An internal snapshot's L1 table.
    SnapshotL1,
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ActiveL1 => "Active L1 table",
            Self::Refcount => "Reference count table",
            Self::Snapshot => "Snapshot table",
            Self::SnapshotL1 => "Snapshot L1 table",
        })
    }
}

/// The header or one of its extensions cannot be accepted.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The file is shorter than a header.
    #[error("Image is too short to hold a qcow2 header ({0} bytes)")]
    Truncated(u64),
    /// Wrong magic.
    #[error("Image is not in qcow2 format")]
    BadMagic,
    /// Version other than 2 or 3.
    #[error("Unsupported qcow2 version {0}")]
    UnsupportedVersion(u32),
    /// cluster_bits outside 9..=21.
    #[error("Unsupported cluster size: 2^{0}")]
    ClusterBits(u32),
    /// v3 header_length below 104.
    #[error("qcow2 header too short")]
    HeaderTooShort,
    /// header_length beyond the cluster.
    #[error("qcow2 header exceeds cluster size")]
    HeaderExceedsCluster,
    /// backing_file_offset beyond the cluster.
    #[error("Invalid backing file offset")]
    BackingFileOffset,
    /// Backing name longer than 1023 bytes or past cluster 0.
    #[error("Backing file name too long")]
    BackingFileNameTooLong,
    /// An extension runs past the end of its area.
    #[error("Header extension too large (type {ext_type:#010x} at byte {offset})")]
    ExtensionTooLarge {
        /// The extension's type.
        ext_type: u32,
        /// Its byte offset in cluster 0.
        offset: u64,
    },
    /// A known extension has an impossible length or content.
    #[error("Invalid header extension {ext_type:#010x} at byte {offset}")]
    InvalidExtension {
        /// The extension's type.
        ext_type: u32,
        /// Its byte offset in cluster 0.
        offset: u64,
    },
    /// Compression type field and incompatible bit disagree, or the type is unknown.
    #[error("Compression type incompatible feature bit must be set")]
    CompressionBitMissing,
    /// Compression bit set with zlib.
    #[error("Compression type incompatible feature bit must not be set")]
    CompressionBitSet,
    /// Unknown compression type.
    #[error("unknown compression type: {0}")]
    UnknownCompressionType(u8),
    /// Extended L2 entries with clusters below 16 KiB (subclusters below 512 bytes).
    #[error("Unsupported subcluster size: {0}")]
    SubclusterSize(u64),
    /// refcount_order above 6.
    #[error("Reference count entry width too large; may not exceed 64 bits")]
    RefcountOrder(u32),
    /// crypt_method other than 0, 1, 2.
    #[error("Unsupported encryption method {0}")]
    EncryptionMethod(u32),
    /// A table is larger than QEMU's limit.
    #[error("{0} too large")]
    TableTooLarge(Table),
    /// A table's offset is unaligned or beyond `i64::MAX`.
    #[error("{0} offset invalid")]
    TableOffset(Table),
    /// A table lies (partly) past the end of the image file. QEMU opens such images and
    /// reads the missing part as zeros (writes then land wherever the zeros say); we refuse
    /// them, except to check or inspect them.
    #[error("{0} extends past the end of the image file")]
    TablePastEof(Table),
    /// The refcount table has no clusters.
    #[error("Image does not contain a reference count table")]
    NoRefcountTable,
    /// The L1 table cannot map the virtual size.
    #[error("L1 table is too small")]
    L1TooSmall,
    /// The virtual size cannot be mapped at all with this geometry.
    #[error("Image size too large for this cluster size")]
    SizeTooLarge,
    /// Unknown incompatible feature bits; the names come from the feature-name table when
    /// the image has one.
    #[error("Unsupported qcow2 feature(s): {}", FeatureNames(self))]
    UnknownIncompatible {
        /// The unknown bits.
        bits: u64,
        /// Their names from the image's feature-name table (index = bit), when present.
        names: crate::format::FeatureNameSet,
    },
    /// The external data file bit without a data file name.
    #[error("'data-file' is required for this image")]
    DataFileRequired,
    /// The raw-data autoclear bit without a data file.
    #[error("data-file-raw requires a data file")]
    RawDataWithoutDataFile,
    /// Too many snapshots, extra data too large, or a snapshot entry that does not parse.
    #[error("Snapshot table entry {0} is invalid")]
    SnapshotEntry(u32),
}

struct FeatureNames<'a>(&'a FormatError);

impl std::fmt::Display for FeatureNames<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let FormatError::UnknownIncompatible { bits, names } = self.0 else {
            return Ok(());
        };
        f.write_str(names.text())?;
        let unnamed = bits & !names.named_bits();
        if unnamed != 0 {
            if !names.text().is_empty() {
                f.write_str(", ")?;
            }
            write!(f, "Unknown incompatible feature: {unnamed:x}")?;
        }
        Ok(())
    }
}

/// Opening (or creating) an image failed.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The header or a table description is invalid.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The image needs a feature this engine does not support.
    #[error("Unsupported feature: {0}")]
    Unsupported(Feature),
    /// The image's corrupt bit is set and a writable open was asked for.
    #[error("qcow2: Image is corrupt; cannot be opened read/write")]
    CorruptReadWrite,
    /// [`Image::open_snapshot`](crate::Image::open_snapshot) names no snapshot.
    #[error("Can't find snapshot")]
    SnapshotNotFound,
    /// Reading or writing the file failed.
    #[error("I/O error while opening: {0}")]
    Io(IoError),
    /// Metadata read during open is inconsistent.
    #[error(transparent)]
    Corrupt(Corruption),
    /// Creation options are invalid.
    #[error(transparent)]
    Create(#[from] CreateError),
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(&'static str),
    /// A file of the backing chain could not be opened.
    #[error("Could not open backing file (chain depth {depth}): {reason}")]
    Backing {
        /// Where in the chain (1 = the image's backing file).
        depth: u32,
        /// Why.
        reason: BackingError,
    },
}

/// Why a backing file could not be opened.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum BackingError {
    /// Its header or tables are invalid.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// It needs a feature this engine does not support.
    #[error("Unsupported feature: {0}")]
    Unsupported(Feature),
    /// Reading it failed.
    #[error("I/O error: {0}")]
    Io(IoError),
    /// Its metadata is inconsistent.
    #[error(transparent)]
    Corrupt(Corruption),
    /// The backing-format extension names a format other than qcow2 and raw.
    #[error("unknown backing file format (only qcow2 and raw are supported)")]
    UnknownFormat,
    /// The chain is longer than the configured limit (or loops).
    #[error("backing chain longer than {0} files (or a loop)")]
    TooDeep(u32),
    /// Something else went wrong opening it.
    #[error("{0}")]
    Other(&'static str),
}

impl BackingError {
    /// The reason a nested open failed, as seen from one level up.
    pub(crate) fn from_open(e: OpenError) -> (u32, Self) {
        match e {
            OpenError::Backing { depth, reason } => (depth + 1, reason),
            OpenError::Format(f) => (1, Self::Format(f)),
            OpenError::Unsupported(f) => (1, Self::Unsupported(f)),
            OpenError::Io(io) => (1, Self::Io(io)),
            OpenError::Corrupt(c) => (1, Self::Corrupt(c)),
            OpenError::CorruptReadWrite => (1, Self::Other("image is corrupt")),
            OpenError::Create(_) => (1, Self::Other("invalid creation options")),
            OpenError::Config(s) => (1, Self::Other(s)),
            OpenError::SnapshotNotFound => (1, Self::Other("snapshot not found")),
        }
    }
}

/// Creation options that cannot be honoured.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CreateError {
    /// Cluster size not a power of two in 512..=2 MiB.
    #[error("Cluster size must be a power of two between 512 and 2048k")]
    ClusterSize,
    /// refcount_bits not a power of two up to 64.
    #[error("Refcount width must be a power of two and may not exceed 64 bits")]
    RefcountBits,
    /// compat=0.10 asks for something only v3 has.
    #[error("{0} requires compat=1.1 or later")]
    NeedsV3(&'static str),
    /// The virtual size needs more L1 than allowed.
    #[error(
        "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
    )]
    SizeTooLarge,
    /// The backing file name (or format name) does not fit the header.
    #[error("Backing file name too long")]
    BackingNameTooLong,
    /// Extended L2 entries with clusters below 16 KiB.
    #[error("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")]
    ExtendedL2ClusterSize,
    /// Extended L2 entries with compat=0.10.
    #[error(
        "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)"
    )]
    ExtendedL2NeedsV3,
    /// A backing file with preallocation (QEMU allows it only with extended L2 entries).
    #[error(
        "Backing file and preallocation can only be used at the same time if extended_l2 is on"
    )]
    BackingWithPreallocation,
    /// `data_file_raw` without `data_file`.
    #[error("data-file-raw requires data-file")]
    RawDataWithoutDataFile,
    /// `data_file_raw` with a backing file.
    #[error("Backing file and data-file-raw cannot be used at the same time")]
    BackingWithRawDataFile,
    /// The data file name does not fit in the header cluster.
    #[error("data file name too long")]
    DataFileNameTooLong,
    /// The existing header cannot be rewritten (its extension list is invalid).
    #[error(transparent)]
    Format(#[from] FormatError),
}

/// A request failed.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// An I/O error.
    #[error("I/O error: {0}")]
    Io(IoError),
    /// The file system is full.
    #[error("No space left on device")]
    NoSpace,
    /// Metadata is corrupt; the image is now read-only.
    #[error(transparent)]
    Corrupt(Corruption),
    /// The image is open read-only.
    #[error("The image is opened read-only")]
    ReadOnly,
    /// The request needs a feature this engine does not support yet.
    #[error("Unsupported feature: {0}")]
    Unsupported(Feature),
    /// An earlier metadata write or flush failed; reopen the image.
    #[error("The image stopped after an earlier metadata I/O error; reopen it")]
    Poisoned,
    /// The request reaches past the end of the image.
    #[error("Request at {offset:#x}+{len:#x} is beyond the end of the image ({size:#x} bytes)")]
    OutOfRange {
        /// Guest offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Virtual size.
        size: u64,
    },
    /// Shrinking would drop allocated data and the request did not consent.
    #[error(
        "Shrinking would discard allocated data at guest offset {0:#x}; use --shrink to consent"
    )]
    ShrinkDropsData(u64),
    /// A size or table would exceed the format's limits.
    #[error("{0} too large")]
    TooLarge(Table),
    /// No persistent bitmap has this name.
    #[error("Dirty bitmap not found")]
    BitmapNotFound,
    /// The bitmap was not stored back cleanly (its in-use flag is set): its bits mean
    /// nothing.
    #[error("Bitmap is inconsistent (in use: not stored back cleanly)")]
    BitmapInconsistent,
    /// The bitmap's table does not fit the disk, or an entry is invalid.
    #[error("Bitmap table is invalid")]
    BitmapInvalid,
    /// A persistent bitmap with this name exists already.
    #[error("Bitmap already exists")]
    BitmapExists,
    /// A bitmap name that is empty or longer than 1,023 bytes.
    #[error("Bitmap name must be 1 to 1023 bytes long")]
    BitmapName,
    /// A bitmap granularity that is not a power of two from 512 bytes to 2 GiB.
    #[error("Granularity must be power of 2 and at least 512")]
    BitmapGranularity,
    /// The image has the most bitmaps QEMU allows (65,535), or their directory would
    /// exceed its 64 MiB.
    #[error("Too many persistent bitmaps")]
    TooManyBitmaps,
    /// Persistent bitmaps need a version 3 image.
    #[error("Cannot store dirty bitmaps in qcow2 v2 files")]
    BitmapsNeedV3,
    /// The bitmap would take more memory than QEMU allows one bitmap (512 MiB).
    #[error("Bitmap is too large (more than 512 MiB of bits)")]
    BitmapTooLarge,
    /// The bitmaps of a merge cover disks of different sizes.
    #[error("Bitmaps are of different sizes (destination size is {dst}, source size is {src}) and can't be merged")]
    BitmapSizes {
        /// The destination's disk size.
        dst: u64,
        /// The source's disk size.
        src: u64,
    },
    /// No internal snapshot has this ID or name.
    #[error("snapshot not found")]
    SnapshotNotFound,
    /// The image has the most snapshots QEMU allows (65,536).
    #[error("Too many snapshots")]
    TooManySnapshots,
    /// A snapshot name longer than 65,535 bytes.
    #[error("Snapshot name too long")]
    SnapshotName,
    /// A cluster's refcount is at the largest its width holds: it cannot be shared once
    /// more (QEMU: EINVAL).
    #[error("Invalid argument (refcount overflow)")]
    RefcountOverflow,
    /// A resize to a size that is not a multiple of 512.
    #[error("The new size must be a multiple of 512")]
    UnalignedSize,
    /// The engine is closed.
    #[error("The image is closed")]
    Closed,
    /// The image was opened for check and repair only.
    #[error("The image is opened for check and repair only")]
    CheckOnly,
    /// A compressed write that is not one whole cluster, or whose cluster is allocated
    /// (compressed clusters are never overwritten in place; QEMU refuses the same).
    #[error(
        "Compressed writes must cover exactly one whole, unallocated cluster (guest offset {0:#x})"
    )]
    CompressedWrite(u64),
    /// The request's options cannot be honoured (a backing name that does not fit, ...).
    #[error(transparent)]
    Options(CreateError),
    /// A check could not run (the header is unreadable or unacceptable).
    #[error("Check failed: {0}")]
    CheckFailed(OpenError),
    /// An amend was refused or could not complete ([`AmendError`] says why).
    #[error(transparent)]
    Amend(#[from] AmendError),
}

/// Why `amend` refused to change an image, in QEMU's words where QEMU refuses the same.
/// Every refusal leaves the image as it was.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AmendError {
    /// A `compat` version other than 2 and 3.
    #[error("Unknown compatibility level: version {0}")]
    UnknownVersion(u32),
    /// `refcount_bits` not a power of two from 1 to 64.
    #[error("Refcount width must be a power of two and may not exceed 64 bits")]
    RefcountWidth,
    /// Lazy refcounts asked for on a version 2 image.
    #[error("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)")]
    LazyRefcountsNeedV3,
    /// A refcount width other than 16 asked for on a version 2 image.
    #[error("Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")]
    RefcountWidthNeedsV3,
    /// A downgrade of an image whose refcounts are not 16 bits wide.
    #[error("compat=0.10 requires refcount_bits=16")]
    DowngradeRefcountBits,
    /// A downgrade of an image with an external data file.
    #[error("Cannot downgrade an image with a data file")]
    DowngradeDataFile,
    /// A downgrade of an image with incompatible features version 2 cannot express.
    #[error("Cannot downgrade an image with incompatible features {0:#x} set")]
    DowngradeIncompatible(u64),
    /// A downgrade of an image with a snapshot of another disk size or a VM state of
    /// 4 GiB or more.
    #[error("Internal snapshots prevent downgrade of image")]
    DowngradeSnapshots,
    /// A downgrade of a zstd image holding compressed clusters.
    #[error(
        "Cannot downgrade an image with zstd compression type and existing compressed clusters"
    )]
    DowngradeZstd,
    /// A downgrade of an image with persistent bitmaps (QEMU downgrades it and leaves the
    /// bitmaps' clusters leaked; this engine refuses instead).
    #[error("Cannot downgrade an image with persistent bitmaps (remove them first)")]
    DowngradeBitmaps,
    /// An upgrade of an image whose snapshot table lacks the entries' version 3 fields;
    /// not implemented yet.
    #[error(
        "Cannot upgrade an image whose snapshot table lacks version 3 fields (not supported yet)"
    )]
    UpgradeSnapshotTable,
    /// A narrower refcount width cannot hold a cluster's refcount.
    #[error("Cannot decrease refcount entry width to {bits} bits: Cluster at offset {offset:#x} has a refcount of {refcount}")]
    RefcountTooWide {
        /// The width asked for.
        bits: u32,
        /// Host offset of the first cluster that does not fit.
        offset: u64,
        /// Its refcount.
        refcount: u64,
    },
    /// The stored refcounts disagree with the references (or could not be read): the
    /// image must be repaired before its refcounts are rewritten.
    #[error(
        "The image's refcounts are inconsistent; repair it with 'qemu-img check -r all' first"
    )]
    NeedsRepair,
    /// The header and its extensions do not fit in cluster 0 in the new version's layout.
    #[error("The header and its extensions do not fit in the first cluster")]
    HeaderTooLarge,
    /// Memory for the refcount arrays ran out.
    #[error("Cannot allocate memory")]
    OutOfMemory,
}

/// A request was refused before it started.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    /// Too many requests in flight; submit again after a [`Event::Done`](crate::Event::Done).
    #[error("too many requests in flight")]
    Busy,
    /// The engine is still opening or failed to open.
    #[error("the image is not open")]
    NotOpen,
    /// The request was refused outright.
    #[error(transparent)]
    Refused(#[from] RequestError),
}
