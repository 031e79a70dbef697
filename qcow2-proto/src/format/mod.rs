//! On-disk structures and header validation. Everything the engine knows about bytes on disk
//! is here; the engine works on the validated [`Layout`].

// The raw on-disk structs' fields are documented by each module's layout diagram.
#[allow(missing_docs)]
pub mod bitmap;
pub mod entry;
#[allow(missing_docs)]
pub mod extension;
#[allow(missing_docs)]
pub mod header;
pub mod refcount;
#[allow(missing_docs)]
pub mod snapshot;

pub use extension::FeatureNameSet;

use crate::error::{Feature, FormatError, OpenError, Table};
use extension::Extensions;
use header::{autoclear, incompat, Header, MAGIC};

/// Largest active L1 table QEMU accepts (bytes).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU accepts (bytes).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name QEMU accepts.
pub const MAX_BACKING_NAME: u32 = 1023;

/// Where QEMU's qcow2 driver ends one block-status answer starting at guest `offset`: at
/// the end of the L2 slice that maps it (4 KiB of entries, or one cluster of them for
/// smaller clusters). Tools that must step through an image as qemu-img does use it.
pub fn qemu_l2_slice_end(offset: u64, cluster_size: u64) -> u64 {
    let covered = (cluster_size.min(4096) / 8) * cluster_size;
    (offset / covered + 1) * covered
}
/// Smallest and largest cluster_bits.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster_bits.
pub const MAX_CLUSTER_BITS: u32 = 21;

/// Sizes derived from cluster_bits and refcount_order, computed once.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// log2 of the entries per L2 table.
    pub l2_bits: u32,
    /// log2 of the refcount width.
    pub refcount_order: u32,
    /// log2 of the entries per refcount block.
    pub rb_bits: u32,
    /// log2 of the subcluster size: `cluster_bits - 5` with extended L2 entries (32
    /// subclusters per cluster), `cluster_bits` without (one "subcluster": the cluster).
    pub subcluster_bits: u32,
}

/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;
/// Smallest cluster_bits with extended L2 entries (512-byte subclusters).
pub const MIN_EXTENDED_CLUSTER_BITS: u32 = 14;

impl Geometry {
    /// The geometry of standard (64-bit) L2 entries.
    pub fn new(cluster_bits: u32, refcount_order: u32) -> Self {
        Self {
            cluster_bits,
            l2_bits: cluster_bits - 3,
            refcount_order,
            rb_bits: cluster_bits + 3 - refcount_order,
            subcluster_bits: cluster_bits,
        }
    }

    /// The geometry of extended (128-bit) L2 entries when `extended_l2`, else [`new`](Self::new).
    /// `cluster_bits` must be at least [`MIN_EXTENDED_CLUSTER_BITS`] for extended entries.
    pub fn with_l2(cluster_bits: u32, refcount_order: u32, extended_l2: bool) -> Self {
        let mut geo = Self::new(cluster_bits, refcount_order);
        if extended_l2 {
            geo.l2_bits = cluster_bits - 4;
            geo.subcluster_bits = cluster_bits - SUBCLUSTERS.trailing_zeros();
        }
        geo
    }

    /// Whether L2 entries are extended (128-bit, with a subcluster bitmap).
    pub fn extended_l2(&self) -> bool {
        self.subcluster_bits != self.cluster_bits
    }

    /// Bytes per L2 entry: 8, or 16 with extended entries.
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Subcluster size in bytes (the cluster size without extended L2 entries).
    pub fn subcluster_size(&self) -> u64 {
        1 << self.subcluster_bits
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Guest bytes one L2 table maps.
    pub fn l2_coverage(&self) -> u64 {
        1 << (self.cluster_bits + self.l2_bits)
    }

    /// L1 entries needed to map `size` guest bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l2_coverage())
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits
    }

    /// Entries per refcount block.
    pub fn rb_entries(&self) -> u64 {
        1 << self.rb_bits
    }

    /// Host bytes one refcount block covers.
    pub fn rb_coverage(&self) -> u64 {
        1 << (self.rb_bits + self.cluster_bits)
    }

    /// Rounds `bytes` up to whole clusters.
    pub fn round_up(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size()) << self.cluster_bits
    }

    /// Whether `offset` is cluster aligned.
    pub fn aligned(&self, offset: u64) -> bool {
        offset & (self.cluster_size() - 1) == 0
    }
}

/// A validated header with its extensions and derived geometry.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Layout {
    /// The header fields.
    pub header: Header,
    /// Derived sizes.
    pub geo: Geometry,
    /// Extensions found in cluster 0.
    pub ext: Extensions,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
    /// The backing format, if any.
    pub backing_format: Option<String>,
    /// The external data file name, if any.
    pub data_file: Option<String>,
    /// The first feature of a later issue this image uses (the engine refuses I/O then).
    pub unsupported: Option<Feature>,
}

fn table_ok(offset: u64, bytes: u64, geo: &Geometry) -> bool {
    geo.aligned(offset)
        && offset
            .checked_add(bytes)
            .is_some_and(|end| end <= i64::MAX as u64)
}

impl Layout {
    /// Validates cluster 0 the way QEMU does at open (same order, same limits).
    /// `cluster0` holds at least the first cluster (or the whole file, if shorter).
    pub fn parse(cluster0: &[u8], read_only: bool) -> Result<Self, OpenError> {
        Self::parse_with(cluster0, read_only, false)
    }

    /// Like [`parse`](Self::parse); `check_mode` (QEMU's check mode) also accepts an empty
    /// refcount table, which only a check can repair (by rebuilding it).
    pub fn parse_with(
        cluster0: &[u8],
        read_only: bool,
        check_mode: bool,
    ) -> Result<Self, OpenError> {
        let h = Header::decode(cluster0).ok_or(FormatError::Truncated(cluster0.len() as u64))?;
        if u32::from_be_bytes([cluster0[0], cluster0[1], cluster0[2], cluster0[3]]) != MAGIC {
            return Err(FormatError::BadMagic.into());
        }
        if !(2..=3).contains(&h.version) {
            return Err(FormatError::UnsupportedVersion(h.version).into());
        }
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits) {
            return Err(FormatError::ClusterBits(h.cluster_bits).into());
        }
        let cluster_size = h.cluster_size();
        if h.version >= 3 {
            if cluster0.len() < 104 {
                return Err(FormatError::Truncated(cluster0.len() as u64).into());
            }
            if h.header_length < 104 {
                return Err(FormatError::HeaderTooShort.into());
            }
            if u64::from(h.header_length) > cluster_size {
                return Err(FormatError::HeaderExceedsCluster.into());
            }
        }
        if h.backing_file_offset > cluster_size {
            return Err(FormatError::BackingFileOffset.into());
        }
        let has_compression_bit = h.incompatible_features & incompat::COMPRESSION != 0;
        match h.compression_type {
            0 if has_compression_bit => return Err(FormatError::CompressionBitSet.into()),
            1 if !has_compression_bit => return Err(FormatError::CompressionBitMissing.into()),
            0 | 1 => {}
            t => return Err(FormatError::UnknownCompressionType(t).into()),
        }
        let area_end = if h.backing_file_offset != 0 {
            h.backing_file_offset
        } else {
            cluster_size
        };
        let area_end = (area_end as usize).min(cluster0.len());
        let ext = Extensions::parse(cluster0, h.header_length as usize, area_end)?;
        let unknown = h.incompatible_features & !incompat::KNOWN;
        if unknown != 0 {
            let names = ext.incompatible_names(cluster0, unknown);
            return Err(FormatError::UnknownIncompatible {
                bits: unknown,
                names,
            }
            .into());
        }
        if h.incompatible_features & incompat::CORRUPT != 0 && !read_only {
            return Err(OpenError::CorruptReadWrite);
        }
        let extended_l2 = h.incompatible_features & incompat::EXTENDED_L2 != 0;
        if extended_l2 && h.cluster_bits < MIN_EXTENDED_CLUSTER_BITS {
            return Err(
                FormatError::SubclusterSize(h.cluster_size() / u64::from(SUBCLUSTERS)).into(),
            );
        }
        if h.refcount_order > 6 {
            return Err(FormatError::RefcountOrder(h.refcount_order).into());
        }
        if h.crypt_method > 2 {
            return Err(FormatError::EncryptionMethod(h.crypt_method).into());
        }
        if (h.crypt_method == 2) != ext.fde.is_some() {
            return Err(FormatError::InvalidExtension {
                ext_type: extension::FDE,
                offset: 0,
            }
            .into());
        }
        let geo = Geometry::with_l2(h.cluster_bits, h.refcount_order, extended_l2);

        // Refcount table.
        if h.refcount_table_clusters == 0 && !check_mode {
            return Err(FormatError::NoRefcountTable.into());
        }
        let reftable_bytes = u64::from(h.refcount_table_clusters) << h.cluster_bits;
        if reftable_bytes > MAX_REFTABLE_BYTES {
            return Err(FormatError::TableTooLarge(Table::Refcount).into());
        }
        if !table_ok(h.refcount_table_offset, reftable_bytes, &geo) || h.refcount_table_offset == 0
        {
            return Err(FormatError::TableOffset(Table::Refcount).into());
        }
        // Snapshot table (QEMU's check mode leaves it to the check, which repairs it).
        if h.nb_snapshots > snapshot::MAX_SNAPSHOTS && !check_mode {
            return Err(FormatError::TableTooLarge(Table::Snapshot).into());
        }
        if h.nb_snapshots > 0
            && !check_mode
            && !table_ok(h.snapshots_offset, u64::from(h.nb_snapshots) * 40, &geo)
        {
            return Err(FormatError::TableOffset(Table::Snapshot).into());
        }
        // Active L1.
        let l1_bytes = u64::from(h.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(FormatError::TableTooLarge(Table::ActiveL1).into());
        }
        if h.l1_size > 0 && (!table_ok(h.l1_table_offset, l1_bytes, &geo) || h.l1_table_offset == 0)
        {
            return Err(FormatError::TableOffset(Table::ActiveL1).into());
        }
        let needed = geo.l1_entries_for(h.size);
        if needed > i32::MAX as u64 || h.size > i64::MAX as u64 {
            return Err(FormatError::SizeTooLarge.into());
        }
        if needed > u64::from(h.l1_size) {
            return Err(FormatError::L1TooSmall.into());
        }
        // Names.
        let string_at = |start: usize, len: usize| -> Option<String> {
            cluster0
                .get(start..start + len)
                .map(|b| String::from_utf8_lossy(b).into_owned())
        };
        let backing_file = if h.backing_file_offset != 0 {
            if h.backing_file_size > MAX_BACKING_NAME
                || h.backing_file_offset + u64::from(h.backing_file_size) > cluster_size
            {
                return Err(FormatError::BackingFileNameTooLong.into());
            }
            Some(
                string_at(h.backing_file_offset as usize, h.backing_file_size as usize)
                    .ok_or(FormatError::BackingFileNameTooLong)?,
            )
        } else {
            None
        };
        let backing_format = ext.backing_format.and_then(|r| string_at(r.start, r.len));
        let data_file = ext.data_file.and_then(|r| string_at(r.start, r.len));
        let has_data_file = h.incompatible_features & incompat::DATA_FILE != 0;
        if has_data_file && data_file.is_none() {
            return Err(FormatError::DataFileRequired.into());
        }
        if h.autoclear_features & autoclear::RAW_DATA != 0 && !has_data_file {
            return Err(FormatError::RawDataWithoutDataFile.into());
        }
        let unsupported = if h.crypt_method != 0 {
            Some(Feature::Encryption)
        } else if h.incompatible_features & incompat::DIRTY != 0 && !read_only {
            Some(Feature::DirtyImageRepair)
        } else {
            None
        };
        Ok(Self {
            header: h,
            geo,
            ext,
            backing_file,
            backing_format,
            data_file,
            unsupported,
        })
    }
}
