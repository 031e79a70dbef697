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
//!
//! Extended L2 entry (incompatible bit 4): 128 bits, the standard descriptor above (whose
//! bit 0 is then reserved and ignored), followed by the subcluster bitmap:
//!   bits  0..31  subcluster i is allocated (data at host + i * subcluster size)
//!   bits 32..63  subcluster 32 + i reads as zeros
//!   (Both bits of one subcluster set, or allocated bits without a host cluster, make the
//!   entry invalid; a compressed entry's bitmap is reserved: 0.)
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

/// Subcluster bitmap bits: every subcluster allocated.
pub const ALL_ALLOC: u64 = 0xffff_ffff;
/// Subcluster bitmap bits: every subcluster reads as zeros.
pub const ALL_ZEROES: u64 = 0xffff_ffff << 32;

/// What one subcluster of an extended L2 entry (or the one "subcluster" of a standard entry)
/// holds.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Sub {
    /// Data at this host byte offset.
    Data(u64),
    /// Reads as zeros.
    Zero,
    /// Not allocated: reads through to the backing file (zeros without one).
    Unallocated,
    /// Part of a compressed cluster.
    Compressed,
}

/// Whether `bitmap` is valid for the cluster mapping `m` (extended entries only): no
/// subcluster both allocated and zero, no allocated subcluster without a host cluster. (A
/// compressed entry's bitmap is reserved: QEMU ignores it at run time, as we do; the check
/// reports it.)
pub fn bitmap_valid(m: Mapping, bitmap: u64) -> bool {
    match m {
        Mapping::Data { .. } => (bitmap >> 32) & bitmap == 0,
        Mapping::Unallocated => bitmap & ALL_ALLOC == 0,
        Mapping::Zero { .. } | Mapping::Compressed { .. } => true,
    }
}

/// What subcluster `sc` holds in a cluster mapped by `m` with (valid) `bitmap`; `sc_bits` is
/// log2 of the subcluster size. For a standard entry (`extended` false) the one subcluster
/// is the cluster.
pub fn subcluster(m: Mapping, bitmap: u64, extended: bool, sc: u32, sc_bits: u32) -> Sub {
    match m {
        Mapping::Compressed { .. } => Sub::Compressed,
        Mapping::Zero { .. } => Sub::Zero,
        Mapping::Data { host, .. } if !extended => Sub::Data(host),
        Mapping::Unallocated if !extended => Sub::Unallocated,
        _ if bitmap & (1 << (32 + sc)) != 0 => Sub::Zero,
        Mapping::Data { host, .. } if bitmap & (1 << sc) != 0 => {
            Sub::Data(host + (u64::from(sc) << sc_bits))
        }
        _ => Sub::Unallocated,
    }
}

/// The bitmap bits of subclusters `first..=last`, allocated (`<< 32` for the zero bits).
pub fn subcluster_mask(first: u32, last: u32) -> u64 {
    debug_assert!(first <= last && last < 32);
    (u64::MAX >> (63 - last)) & !((1u64 << first) - 1) & ALL_ALLOC
}

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

    /// Decodes the first word of an extended entry: bit 0 is reserved there and ignored
    /// (zeros are in the bitmap), as QEMU does.
    pub fn mapping_ext(self, cluster_bits: u32, data_file: bool, extended: bool) -> Mapping {
        if extended && self.0 & COMPRESSED == 0 {
            Self(self.0 & !ZERO).mapping_in(cluster_bits, data_file)
        } else {
            self.mapping_in(cluster_bits, data_file)
        }
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
    fn subcluster_bitmaps_classify_like_qemu_writes_them() {
        let data = L2Entry(0x8000_0000_0005_0000).mapping_ext(16, false, true);
        // 64 KiB clusters, 2 KiB subclusters: "zeroing 2 KiB inside an allocated cluster".
        let b = 0x0000_0002_ffff_fffd;
        assert!(bitmap_valid(data, b));
        assert_eq!(subcluster(data, b, true, 0, 11), Sub::Data(0x50000));
        assert_eq!(subcluster(data, b, true, 1, 11), Sub::Zero);
        assert_eq!(subcluster(data, b, true, 2, 11), Sub::Data(0x51000));
        // Preallocated, nothing written: allocated cluster, unallocated subclusters.
        assert_eq!(subcluster(data, 0, true, 5, 11), Sub::Unallocated);
        // Both bits of a subcluster, or allocated bits without a cluster: invalid.
        assert!(!bitmap_valid(data, (1 << 32) | 1));
        let none = L2Entry(0).mapping_ext(16, false, true);
        assert!(!bitmap_valid(none, 1 << 7));
        assert!(bitmap_valid(none, 0x0000_000f_0000_0000));
        assert_eq!(
            subcluster(none, 0x0000_000f_0000_0000, true, 3, 11),
            Sub::Zero
        );
        assert_eq!(
            subcluster(none, 0x0000_000f_0000_0000, true, 4, 11),
            Sub::Unallocated
        );
        // Bit 0 of the first word is reserved in extended entries.
        assert_eq!(
            L2Entry(1).mapping_ext(16, false, true),
            Mapping::Unallocated
        );
        assert_eq!(subcluster_mask(0, 31), ALL_ALLOC);
        assert_eq!(subcluster_mask(2, 3), 0b1100);
        assert_eq!(subcluster_mask(31, 31), 1 << 31);
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
