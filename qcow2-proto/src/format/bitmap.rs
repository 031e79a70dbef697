//! Persistent dirty bitmaps: the bitmap directory (variable-length entries, each padded to
//! 8 bytes) and the bitmap table entries.
//!
//! ```text
//! directory entry                       (docs/interop/qcow2.txt, "Bitmaps")
//! offset size field
//!      0    8 bitmap_table_offset        cluster aligned
//!      8    4 bitmap_table_size          entries
//!     12    4 flags                      bit 0 in_use, 1 auto, 2 extra_data_compatible
//!     16    1 type                       1: dirty tracking
//!     17    1 granularity_bits
//!     18    2 name_size                  > 0, <= 1023
//!     20    4 extra_data_size
//!     24    n extra data, then the name  not NUL-terminated; then padding to 8
//!
//! bitmap table entry
//!   bit   0      with offset 0: 0 all zeros, 1 all ones; else reserved (0)
//!   bits  1.. 8  reserved (0)
//!   bits  9..55  host offset of a cluster of bitmap data; 0: see bit 0
//!   bits 56..63  reserved (0)
//! ```

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The fixed part of a directory entry (24 bytes).
#[derive(Clone, Copy, Debug, FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned)]
#[repr(C)]
pub struct RawBitmapEntry {
    pub table_offset: U64,
    pub table_size: U32,
    pub flags: U32,
    pub kind: u8,
    pub granularity_bits: u8,
    pub name_size: U16,
    pub extra_data_size: U32,
}

const _: () = assert!(size_of::<RawBitmapEntry>() == 24);

/// Flag: the bitmap was not stored back cleanly (its bits are stale).
pub const IN_USE: u32 = 1 << 0;
/// Flag: the bitmap is enabled (tracks every write).
pub const AUTO: u32 = 1 << 1;
/// Flag: the extra data may be kept unchanged by programs that do not know it.
pub const EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// The only bitmap type: dirty tracking.
pub const TYPE_DIRTY_TRACKING: u8 = 1;
/// Longest bitmap name QEMU accepts.
pub const MAX_NAME: usize = 1023;
/// Most bitmaps in an image (QEMU's limit).
pub const MAX_BITMAPS: usize = 65535;
/// Largest directory QEMU accepts (bytes).
pub const MAX_DIRECTORY_BYTES: u64 = 1024 * 65535;
/// Granularities QEMU accepts (bits).
pub const GRANULARITY_BITS: std::ops::RangeInclusive<u8> = 9..=31;

/// Offset bits of a bitmap table entry.
pub const TABLE_ENTRY_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of a bitmap table entry.
pub const TABLE_ENTRY_RESERVED: u64 = 0xff00_0000_0000_01fe;

/// One directory entry, decoded.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct DirEntry {
    /// Host offset of the bitmap table (0: none).
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// Flags ([`IN_USE`], [`AUTO`], [`EXTRA_DATA_COMPATIBLE`], reserved bits as found).
    pub flags: u32,
    /// Type ([`TYPE_DIRTY_TRACKING`]).
    pub kind: u8,
    /// Bytes of guest data per bit, as a power of two.
    pub granularity_bits: u8,
    /// The extra data, kept byte for byte.
    pub extra: Vec<u8>,
    /// The name.
    pub name: Vec<u8>,
}

impl DirEntry {
    /// Whether a program that knows no extra data and no reserved flag may rewrite the
    /// bitmap: a known type and granularity, no reserved flags, extra data only when
    /// marked compatible.
    pub fn writable(&self) -> bool {
        self.kind == TYPE_DIRTY_TRACKING
            && GRANULARITY_BITS.contains(&self.granularity_bits)
            && self.flags & !(IN_USE | AUTO | EXTRA_DATA_COMPATIBLE) == 0
            && (self.extra.is_empty() || self.flags & EXTRA_DATA_COMPATIBLE != 0)
    }

    /// The entry's bytes, padded to 8.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let raw = RawBitmapEntry {
            table_offset: self.table_offset.into(),
            table_size: self.table_size.into(),
            flags: self.flags.into(),
            kind: self.kind,
            granularity_bits: self.granularity_bits,
            name_size: (self.name.len() as u16).into(),
            extra_data_size: (self.extra.len() as u32).into(),
        };
        out.extend_from_slice(raw.as_bytes());
        out.extend_from_slice(&self.extra);
        out.extend_from_slice(&self.name);
        out.resize(out.len().next_multiple_of(8), 0);
    }
}

/// Parses a directory of `count` entries strictly: every entry must fit, with a name of
/// 1..=1023 bytes, unique, and a cluster-aligned table offset (`align_mask` is the cluster
/// size minus one). `None` when it is damaged.
pub fn parse_directory(dir: &[u8], count: u32, align_mask: u64) -> Option<Vec<DirEntry>> {
    let mut out: Vec<DirEntry> = Vec::new();
    let mut off = 0usize;
    for _ in 0..count {
        let (raw, _) = RawBitmapEntry::read_from_prefix(dir.get(off..)?).ok()?;
        let extra = raw.extra_data_size.get() as usize;
        let name = usize::from(raw.name_size.get());
        let extra_at = off + 24;
        let name_at = extra_at.checked_add(extra)?;
        let end = name_at + name;
        let entry = DirEntry {
            table_offset: raw.table_offset.get(),
            table_size: raw.table_size.get(),
            flags: raw.flags.get(),
            kind: raw.kind,
            granularity_bits: raw.granularity_bits,
            extra: dir.get(extra_at..name_at)?.to_vec(),
            name: dir.get(name_at..end)?.to_vec(),
        };
        let bad = name == 0
            || name > MAX_NAME
            || entry.table_offset & align_mask != 0
            || out.iter().any(|e| e.name == entry.name);
        if bad {
            return None;
        }
        out.push(entry);
        off = end.next_multiple_of(8);
    }
    Some(out)
}

/// The directory holding `entries`.
pub fn encode_directory(entries: &[DirEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        e.encode(&mut out);
    }
    out
}

/// Bytes of bitmap data for a disk of `size` bytes at `granularity_bits`.
pub fn data_bytes(size: u64, granularity_bits: u8) -> u64 {
    size.div_ceil(1 << granularity_bits).div_ceil(8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, flags: u32) -> DirEntry {
        DirEntry {
            table_offset: 0x30000,
            table_size: 1,
            flags,
            kind: TYPE_DIRTY_TRACKING,
            granularity_bits: 16,
            extra: Vec::new(),
            name: name.as_bytes().to_vec(),
        }
    }

    #[test]
    fn directories_round_trip() {
        let mut with_extra = entry("backup-2026", AUTO | EXTRA_DATA_COMPATIBLE);
        with_extra.extra = vec![1, 2, 3];
        let list = vec![entry("b0", AUTO), with_extra, entry("c", IN_USE)];
        let dir = encode_directory(&list);
        assert_eq!(dir.len() % 8, 0);
        assert_eq!(parse_directory(&dir, 3, 0xffff), Some(list.clone()));
        // One entry too many, a cut directory, a misaligned table: damaged.
        assert_eq!(parse_directory(&dir, 4, 0xffff), None);
        assert_eq!(parse_directory(&dir[..dir.len() - 8], 3, 0xffff), None);
        assert_eq!(parse_directory(&dir, 3, 0x1ffff), None);
    }

    #[test]
    fn duplicate_and_empty_names_are_damage() {
        let dup = encode_directory(&[entry("a", 0), entry("a", AUTO)]);
        assert_eq!(parse_directory(&dup, 2, 0xffff), None);
        let empty = encode_directory(&[entry("", 0)]);
        assert_eq!(parse_directory(&empty, 1, 0xffff), None);
    }

    #[test]
    fn only_known_bitmaps_are_writable() {
        assert!(entry("a", AUTO | IN_USE).writable());
        assert!(!entry("a", 1 << 5).writable());
        let mut e = entry("a", AUTO);
        e.extra = vec![0; 8];
        assert!(!e.writable());
        e.flags |= EXTRA_DATA_COMPATIBLE;
        assert!(e.writable());
        e.granularity_bits = 8;
        assert!(!e.writable());
    }

    #[test]
    fn data_bytes_round_up() {
        assert_eq!(data_bytes(1 << 20, 16), 2);
        assert_eq!(data_bytes((1 << 20) + 1, 16), 3);
        assert_eq!(data_bytes(0, 16), 0);
    }
}
