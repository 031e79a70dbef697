//! L1 and L2 table entries (64-bit, big-endian on disk).
//!
//! ```text
//! L1 entry                               (docs/interop/qcow2.txt, "Cluster mapping")
//!   bits  0.. 8  reserved (0)
//!   bits  9..55  L2 table offset (cluster aligned); 0 = unallocated
//!   bits 56..62  reserved (0)
//!   bit  63      COPIED: refcount of the L2 table is exactly 1
//!
//! L2 entry (standard cluster descriptor)
//!   bit   0      zero flag (v3): reads as zeroes
//!   bits  1.. 8  reserved (0)
//!   bits  9..55  host cluster offset; 0 = unallocated (or zero, with bit 0)
//!   bits 56..61  reserved (0)
//!   bit  62      compressed (then bits 0..61 are a compressed descriptor)
//!   bit  63      COPIED: refcount of the data cluster is exactly 1
//! ```

/// COPIED flag of L1 and L2 entries.
pub const COPIED: u64 = 1 << 63;
/// Compressed flag of L2 entries.
pub const COMPRESSED: u64 = 1 << 62;
/// Zero flag of standard L2 entries.
pub const ZERO: u64 = 1;
/// Offset bits of L1 entries and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of L1 entries.
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of standard L2 entries.
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// An L1 entry.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// The L2 table offset, 0 when unallocated.
    pub fn l2_offset(self) -> u64 {
        self.0 & OFFSET_MASK
    }

    /// Whether the L2 table may be written in place.
    pub fn copied(self) -> bool {
        self.0 & COPIED != 0
    }

    /// An entry pointing at `l2_offset`.
    pub fn new(l2_offset: u64, copied: bool) -> Self {
        Self(l2_offset | if copied { COPIED } else { 0 })
    }
}

/// How an L2 entry maps its guest cluster.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Mapping {
    /// Not allocated: reads fall through (zeroes without a backing file).
    Unallocated,
    /// Reads as zero; `host` is a preallocated cluster (0 = none).
    Zero {
        /// Preallocated host cluster offset, or 0.
        host: u64,
        /// COPIED flag.
        copied: bool,
    },
    /// Data at host cluster `host`.
    Data {
        /// Host cluster offset.
        host: u64,
        /// COPIED flag: writable in place.
        copied: bool,
    },
    /// Compressed data.
    Compressed {
        /// Host byte offset of the compressed stream.
        host: u64,
        /// Bytes to read.
        len: u64,
    },
}

/// An L2 entry.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct L2Entry(pub u64);

impl L2Entry {
    /// Decodes the entry for an image with `cluster_bits` (and no external data file).
    pub fn mapping(self, cluster_bits: u32) -> Mapping {
        self.mapping_in(cluster_bits, false)
    }

    /// Decodes the entry for an image with `cluster_bits`, with an external data file when
    /// `data_file`. There host offset 0 is a valid data cluster (guest cluster 0): as in
    /// QEMU (`qcow2_get_subcluster_type`), the COPIED flag tells it from an unallocated
    /// entry, every data-file cluster having refcount 1.
    pub fn mapping_in(self, cluster_bits: u32, data_file: bool) -> Mapping {
        let v = self.0;
        if v & COMPRESSED != 0 {
            let x = 62 - (cluster_bits - 8);
            let host = v & ((1u64 << x) - 1) & ((1 << 56) - 1);
            let nsect = (v & !COPIED & !COMPRESSED) >> x;
            let len = (nsect + 1) * 512 - (host & 511);
            return Mapping::Compressed { host, len };
        }
        let host = v & OFFSET_MASK;
        let copied = v & COPIED != 0;
        if v & ZERO != 0 {
            Mapping::Zero { host, copied }
        } else if host == 0 && !(data_file && copied) {
            Mapping::Unallocated
        } else {
            Mapping::Data { host, copied }
        }
    }

    /// Data at `host`, writable in place when `copied`.
    pub fn data(host: u64, copied: bool) -> Self {
        Self(host | if copied { COPIED } else { 0 })
    }

    /// Reads as zero, keeping the preallocated `host` cluster (0 for none).
    pub fn zero(host: u64, copied: bool) -> Self {
        Self(host | ZERO | if copied && host != 0 { COPIED } else { 0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_descriptors_decode_like_qemu_writes_them() {
        // 64 KiB clusters: offset 0x80000, one sector (qemu-io observation).
        let m = L2Entry(0x4000_0000_0008_0000).mapping(16);
        assert_eq!(
            m,
            Mapping::Compressed {
                host: 0x80000,
                len: 512
            }
        );
        // 2 MiB clusters: iotest 214's 0x4008000000a00000 = 5 sectors at 0xa00000.
        let m = L2Entry(0x4008_0000_00a0_0000).mapping(21);
        assert_eq!(
            m,
            Mapping::Compressed {
                host: 0xa0_0000,
                len: 5 * 512
            }
        );
    }

    #[test]
    fn offset_zero_is_data_in_a_data_file_when_copied() {
        let e = L2Entry(0x8000_0000_0000_0000);
        assert_eq!(e.mapping(16), Mapping::Unallocated);
        assert_eq!(
            e.mapping_in(16, true),
            Mapping::Data {
                host: 0,
                copied: true
            }
        );
        assert_eq!(L2Entry(0).mapping_in(16, true), Mapping::Unallocated);
        assert_eq!(
            L2Entry::data(0, true).mapping_in(16, true),
            e.mapping_in(16, true)
        );
    }

    #[test]
    fn standard_entries_classify() {
        assert_eq!(L2Entry(0).mapping(16), Mapping::Unallocated);
        assert_eq!(
            L2Entry(1).mapping(16),
            Mapping::Zero {
                host: 0,
                copied: false
            }
        );
        assert_eq!(
            L2Entry(0x8000_0000_0007_0001).mapping(16),
            Mapping::Zero {
                host: 0x70000,
                copied: true
            }
        );
        assert_eq!(
            L2Entry(0x8000_0000_0005_0000).mapping(16),
            Mapping::Data {
                host: 0x50000,
                copied: true
            }
        );
    }
}
