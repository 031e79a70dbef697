//! The qcow2 header (cluster 0), as on disk and as validated.
//!
//! ```text
//! offset size field                     (docs/interop/qcow2.txt, "Header")
//!      0    4 magic "QFI\xfb"
//!      4    4 version (2 or 3)
//!      8    8 backing_file_offset       0 = no backing file
//!     16    4 backing_file_size         <= 1023
//!     20    4 cluster_bits              9..=21
//!     24    8 size                      virtual size in bytes
//!     32    4 crypt_method              0 none, 1 AES, 2 LUKS
//!     36    4 l1_size                   entries in the active L1
//!     40    8 l1_table_offset
//!     48    8 refcount_table_offset
//!     56    4 refcount_table_clusters
//!     60    4 nb_snapshots
//!     64    8 snapshots_offset
//!  -- version 3 only --
//!     72    8 incompatible_features     bit 0 dirty, 1 corrupt, 2 data file, 3 compression, 4 extended L2
//!     80    8 compatible_features       bit 0 lazy refcounts
//!     88    8 autoclear_features        bit 0 bitmaps, 1 raw external data
//!     96    4 refcount_order            refcount_bits = 1 << order, 0..=6
//!    100    4 header_length             >= 104
//!    104    1 compression_type          present when header_length > 104
//!    105    7 padding
//! ```

use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Length of the version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Length of the version 3 header without optional fields.
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// Length of the version 3 header QEMU writes (with compression_type and padding).
pub const V3_HEADER_LEN: u32 = 112;

/// Byte offset of `incompatible_features` (written alone to toggle dirty/corrupt bits).
pub const INCOMPATIBLE_OFFSET: u64 = 72;

/// Incompatible feature bits.
pub mod incompat {
    /// Refcounts may be stale (lazy refcounts).
    pub const DIRTY: u64 = 1 << 0;
    /// Metadata may be corrupt.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// The compression_type field is non-zero.
    pub const COMPRESSION: u64 = 1 << 3;
    /// Extended L2 entries.
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Every bit this implementation knows.
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTENDED_L2;
}

/// Compatible feature bits.
pub mod compat {
    /// Lazy refcounts.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits.
pub mod autoclear {
    /// The bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is a valid raw image.
    pub const RAW_DATA: u64 = 1 << 1;
    /// Every bit this implementation knows.
    pub const KNOWN: u64 = BITMAPS | RAW_DATA;
}

/// The fixed header fields common to versions 2 and 3 (72 bytes).
#[derive(Clone, Copy, Debug, FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned)]
#[repr(C)]
pub struct RawHeaderV2 {
    pub magic: U32,
    pub version: U32,
    pub backing_file_offset: U64,
    pub backing_file_size: U32,
    pub cluster_bits: U32,
    pub size: U64,
    pub crypt_method: U32,
    pub l1_size: U32,
    pub l1_table_offset: U64,
    pub refcount_table_offset: U64,
    pub refcount_table_clusters: U32,
    pub nb_snapshots: U32,
    pub snapshots_offset: U64,
}

/// The version 3 additions (bytes 72..112).
#[derive(Clone, Copy, Debug, FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned)]
#[repr(C)]
pub struct RawHeaderV3Ext {
    pub incompatible_features: U64,
    pub compatible_features: U64,
    pub autoclear_features: U64,
    pub refcount_order: U32,
    pub header_length: U32,
    pub compression_type: u8,
    pub padding: [u8; 7],
}

const _: () = assert!(size_of::<RawHeaderV2>() == 72);
const _: () = assert!(size_of::<RawHeaderV3Ext>() == 40);

/// The header with native types; every field of both versions.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
}

impl Header {
    /// Decodes the fixed fields from the start of cluster 0 (no validation beyond length).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let (v2, rest) = RawHeaderV2::read_from_prefix(bytes).ok()?;
        let mut h = Self {
            version: v2.version.get(),
            backing_file_offset: v2.backing_file_offset.get(),
            backing_file_size: v2.backing_file_size.get(),
            cluster_bits: v2.cluster_bits.get(),
            size: v2.size.get(),
            crypt_method: v2.crypt_method.get(),
            l1_size: v2.l1_size.get(),
            l1_table_offset: v2.l1_table_offset.get(),
            refcount_table_offset: v2.refcount_table_offset.get(),
            refcount_table_clusters: v2.refcount_table_clusters.get(),
            nb_snapshots: v2.nb_snapshots.get(),
            snapshots_offset: v2.snapshots_offset.get(),
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            ..Self::default()
        };
        if v2.magic.get() != MAGIC || h.version < 3 {
            return Some(h);
        }
        let (v3, _) = RawHeaderV3Ext::read_from_prefix(rest).ok()?;
        h.incompatible_features = v3.incompatible_features.get();
        h.compatible_features = v3.compatible_features.get();
        h.autoclear_features = v3.autoclear_features.get();
        h.refcount_order = v3.refcount_order.get();
        h.header_length = v3.header_length.get();
        if h.header_length > 104 {
            h.compression_type = v3.compression_type;
        }
        Some(h)
    }

    /// Encodes the fixed fields into the start of `out` (72 or 104..112 bytes, as the
    /// version and header_length say); bytes past what this version defines are left alone.
    pub fn encode(&self, out: &mut [u8]) {
        let v2 = RawHeaderV2 {
            magic: MAGIC.into(),
            version: self.version.into(),
            backing_file_offset: self.backing_file_offset.into(),
            backing_file_size: self.backing_file_size.into(),
            cluster_bits: self.cluster_bits.into(),
            size: self.size.into(),
            crypt_method: self.crypt_method.into(),
            l1_size: self.l1_size.into(),
            l1_table_offset: self.l1_table_offset.into(),
            refcount_table_offset: self.refcount_table_offset.into(),
            refcount_table_clusters: self.refcount_table_clusters.into(),
            nb_snapshots: self.nb_snapshots.into(),
            snapshots_offset: self.snapshots_offset.into(),
        };
        out[..72].copy_from_slice(v2.as_bytes());
        if self.version >= 3 {
            let mut v3 = RawHeaderV3Ext {
                incompatible_features: self.incompatible_features.into(),
                compatible_features: self.compatible_features.into(),
                autoclear_features: self.autoclear_features.into(),
                refcount_order: self.refcount_order.into(),
                header_length: self.header_length.into(),
                compression_type: self.compression_type,
                padding: [0; 7],
            };
            let end = (self.header_length as usize).clamp(104, 112);
            if end > 105 {
                v3.padding.copy_from_slice(&out[105..112]);
            }
            out[72..end].copy_from_slice(&v3.as_bytes()[..end - 72]);
        }
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
}
