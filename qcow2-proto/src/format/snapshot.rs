//! The internal snapshot table: variable-length entries, each padded to 8 bytes.
//!
//! ```text
//! offset size field                     (docs/interop/qcow2.txt, "Snapshots")
//!      0    8 l1_table_offset
//!      8    4 l1_size
//!     12    2 id_str_size
//!     14    2 name_size
//!     16    4 date_sec
//!     20    4 date_nsec
//!     24    8 vm_clock_nsec
//!     32    4 vm_state_size (32-bit)
//!     36    4 extra_data_size            v3: >= 16
//!     40    n extra data                 8 vm_state_size_large, 8 disk_size, 8 icount
//!      .    . id string, name            not NUL-terminated; then padding to 8
//! ```

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_are_found() {
        let s = SnapshotInfo {
            id: "12".into(),
            name: "before upgrade".into(),
            vm_state_size: 0,
            date_sec: 1_795_683_528,
            date_nsec: 610_195_000,
            vm_clock_nsec: 0,
            icount: Some(0),
            disk_size: Some(1 << 20),
            l1_table_offset: 0x60000,
            l1_size: 1,
        };
        let mut table = encode_entry(&s);
        assert_eq!(table.len() % 8, 0);
        table.extend(encode_entry(&SnapshotInfo {
            id: "13".into(),
            ..s.clone()
        }));
        assert_eq!(
            parse(&table, 2).unwrap(),
            vec![
                s.clone(),
                SnapshotInfo {
                    id: "13".into(),
                    ..s
                }
            ]
        );
        let r = entry_ranges(&table, 2).unwrap();
        assert_eq!(r[0].end, r[1].start);
        assert_eq!(r[1].end, table.len());
    }
}

use crate::error::FormatError;
use crate::info::SnapshotInfo;

/// Most snapshots QEMU accepts.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Largest snapshot table QEMU accepts.
pub const MAX_TABLE_BYTES: u64 = 64 << 20;
/// Most extra data per entry QEMU accepts.
pub const MAX_EXTRA_DATA: u32 = 1024;

/// The fixed part of a snapshot table entry.
#[derive(Clone, Copy, Debug, FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned)]
#[repr(C)]
pub struct RawSnapshotHeader {
    pub l1_table_offset: U64,
    pub l1_size: U32,
    pub id_str_size: U16,
    pub name_size: U16,
    pub date_sec: U32,
    pub date_nsec: U32,
    pub vm_clock_nsec: U64,
    pub vm_state_size: U32,
    pub extra_data_size: U32,
}

const _: () = assert!(size_of::<RawSnapshotHeader>() == 40);

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// The byte ranges of the first `count` entries of the table (each with its padding).
pub fn entry_ranges(table: &[u8], count: u32) -> Result<Vec<std::ops::Range<usize>>, FormatError> {
    let mut out = Vec::with_capacity(count.min(1024) as usize);
    let mut off = 0usize;
    for i in 0..count {
        let bad = FormatError::SnapshotEntry(i);
        let (h, _) =
            RawSnapshotHeader::read_from_prefix(table.get(off..).ok_or(bad)?).map_err(|_| bad)?;
        if h.extra_data_size.get() > MAX_EXTRA_DATA {
            return Err(bad);
        }
        let end = off
            + 40
            + h.extra_data_size.get() as usize
            + usize::from(h.id_str_size.get())
            + usize::from(h.name_size.get());
        if end > table.len() {
            return Err(bad);
        }
        // (The last entry's padding may be missing from a table read to its end.)
        let next = end.next_multiple_of(8);
        out.push(off..next.min(table.len()));
        off = next;
    }
    Ok(out)
}

/// A new entry as QEMU writes one for `qemu-img snapshot -c`: 24 bytes of extra data (the
/// 64-bit VM state size, the disk size, an instruction count of 0), padded to 8 bytes.
pub fn encode_entry(s: &SnapshotInfo) -> Vec<u8> {
    let extra = 24u32;
    let h = RawSnapshotHeader {
        l1_table_offset: U64::new(s.l1_table_offset),
        l1_size: U32::new(s.l1_size),
        id_str_size: U16::new(s.id.len() as u16),
        name_size: U16::new(s.name.len() as u16),
        date_sec: U32::new(s.date_sec),
        date_nsec: U32::new(s.date_nsec),
        vm_clock_nsec: U64::new(s.vm_clock_nsec),
        vm_state_size: U32::new(u32::try_from(s.vm_state_size).unwrap_or(0)),
        extra_data_size: U32::new(extra),
    };
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(&s.vm_state_size.to_be_bytes());
    out.extend_from_slice(&s.disk_size.unwrap_or(0).to_be_bytes());
    out.extend_from_slice(&s.icount.unwrap_or(0).to_be_bytes());
    out.extend_from_slice(s.id.as_bytes());
    out.extend_from_slice(s.name.as_bytes());
    out.resize(out.len().next_multiple_of(8), 0);
    out
}

/// Parses `count` entries from the table bytes.
pub fn parse(table: &[u8], count: u32) -> Result<Vec<SnapshotInfo>, FormatError> {
    let ranges = entry_ranges(table, count)?;
    let mut out = Vec::with_capacity(ranges.len());
    for (i, r) in ranges.into_iter().enumerate() {
        let entry = &table[r];
        let (h, _) = RawSnapshotHeader::read_from_prefix(entry)
            .map_err(|_| FormatError::SnapshotEntry(i as u32))?;
        let extra_len = h.extra_data_size.get() as usize;
        let id_start = 40 + extra_len;
        let name_start = id_start + usize::from(h.id_str_size.get());
        let end = name_start + usize::from(h.name_size.get());
        let extra = &entry[40..id_start];
        let field = |at: usize| (extra.len() >= at + 8).then(|| be64(&extra[at..]));
        out.push(SnapshotInfo {
            id: String::from_utf8_lossy(&entry[id_start..name_start]).into_owned(),
            name: String::from_utf8_lossy(&entry[name_start..end]).into_owned(),
            vm_state_size: field(0).unwrap_or(u64::from(h.vm_state_size.get())),
            date_sec: h.date_sec.get(),
            date_nsec: h.date_nsec.get(),
            vm_clock_nsec: h.vm_clock_nsec.get(),
            icount: field(16),
            disk_size: field(8),
            l1_table_offset: h.l1_table_offset.get(),
            l1_size: h.l1_size.get(),
        });
    }
    Ok(out)
}
