//! What an open image is, as [`Event::Opened`](crate::Event::Opened) reports it.

/// A snapshot from the snapshot table.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct SnapshotInfo {
    /// Unique ID string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Size of the saved VM state in bytes.
    pub vm_state_size: u64,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest run time in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Instruction count for record/replay, when stored.
    pub icount: Option<u64>,
    /// Virtual disk size when taken, when stored.
    pub disk_size: Option<u64>,
    /// Host offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
}

/// A persistent dirty bitmap from the bitmap directory.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct BitmapInfo {
    /// Name.
    pub name: String,
    /// Bytes of guest data per bit.
    pub granularity: u64,
    /// The in-use flag (not stored back cleanly).
    pub in_use: bool,
    /// The auto flag (enabled: tracks writes).
    pub auto: bool,
}

/// The facts about an open image.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct ImageInfo {
    /// Header version: 2 (compat 0.10) or 3 (compat 1.1).
    pub version: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount entry width in bits.
    pub refcount_bits: u32,
    /// The lazy-refcounts compatible bit.
    pub lazy_refcounts: bool,
    /// The incompatible dirty bit.
    pub dirty: bool,
    /// The incompatible corrupt bit.
    pub corrupt: bool,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// Compression type: 0 zlib, 1 zstd.
    pub compression_type: u8,
    /// Backing file name as stored, if any.
    pub backing_file: Option<String>,
    /// Backing file format from the header extension, if any.
    pub backing_format: Option<String>,
    /// External data file name, if any.
    pub data_file: Option<String>,
    /// The raw-external-data autoclear bit (the data file is a valid raw image).
    pub data_file_raw: bool,
    /// Encryption method (0 none, 1 AES, 2 LUKS).
    pub crypt_method: u32,
    /// Internal snapshots.
    pub snapshots: Vec<SnapshotInfo>,
    /// Persistent bitmaps (listed; not maintained yet).
    pub bitmaps: Vec<BitmapInfo>,
    /// Whether the engine refuses writes.
    pub read_only: bool,
}
