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

/// Parses `count` entries from the table bytes.
pub fn parse(table: &[u8], count: u32) -> Result<Vec<SnapshotInfo>, FormatError> {
    let mut out = Vec::with_capacity(count.min(1024) as usize);
    let mut off = 0usize;
    for i in 0..count {
        let bad = FormatError::SnapshotEntry(i);
        let (h, _) =
            RawSnapshotHeader::read_from_prefix(table.get(off..).ok_or(bad)?).map_err(|_| bad)?;
        let extra_len = h.extra_data_size.get();
        if extra_len > MAX_EXTRA_DATA {
            return Err(bad);
        }
        let extra_start = off + 40;
        let id_start = extra_start + extra_len as usize;
        let name_start = id_start + usize::from(h.id_str_size.get());
        let end = name_start + usize::from(h.name_size.get());
        if end > table.len() {
            return Err(bad);
        }
        let extra = &table[extra_start..id_start];
        let mut vm_state_size = u64::from(h.vm_state_size.get());
        let mut disk_size = None;
        let mut icount = None;
        if extra.len() >= 8 {
            vm_state_size = be64(&extra[0..]);
        }
        if extra.len() >= 16 {
            disk_size = Some(be64(&extra[8..]));
        }
        if extra.len() >= 24 {
            icount = Some(be64(&extra[16..]));
        }
        out.push(SnapshotInfo {
            id: String::from_utf8_lossy(&table[id_start..name_start]).into_owned(),
            name: String::from_utf8_lossy(&table[name_start..end]).into_owned(),
            vm_state_size,
            date_sec: h.date_sec.get(),
            date_nsec: h.date_nsec.get(),
            vm_clock_nsec: h.vm_clock_nsec.get(),
            icount,
            disk_size,
            l1_table_offset: h.l1_table_offset.get(),
            l1_size: h.l1_size.get(),
        });
        off = end.next_multiple_of(8);
    }
    Ok(out)
}
