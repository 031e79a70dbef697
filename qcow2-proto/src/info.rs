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
    /// Host offset of its bitmap table.
    pub table_offset: u64,
    /// Entries in its bitmap table.
    pub table_size: u32,
}

/// A persistent bitmap's bits, as [`Image::read_bitmap`](crate::Image::read_bitmap) reads
/// them: bit `i` (LSB first in each byte) covers guest bytes `i * granularity ..`.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct BitmapData {
    /// Bytes of guest data per bit.
    pub granularity: u64,
    /// The virtual disk size the bitmap covers.
    pub size: u64,
    /// The bits.
    pub bits: Vec<u8>,
}

impl BitmapData {
    /// The dirty ranges, `(start, length)` in guest bytes, merged and clamped to the disk.
    ///
    /// ```
    /// let b = qcow2_proto::BitmapData { granularity: 65536, size: 1 << 20, bits: vec![0b0110, 0x80] };
    /// assert_eq!(b.dirty_ranges(), vec![(65536, 131072), (15 * 65536, 65536)]);
    /// ```
    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let bits = self.size.div_ceil(self.granularity);
        for (i, &byte) in self.bits.iter().enumerate() {
            if byte == 0 {
                continue;
            }
            for b in 0..8 {
                let bit = i as u64 * 8 + b;
                if bit >= bits || byte & (1 << b) == 0 {
                    continue;
                }
                let start = bit * self.granularity;
                let len = self.granularity.min(self.size - start);
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == start => last.1 += len,
                    _ => out.push((start, len)),
                }
            }
        }
        out
    }
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
