//! Decoding what the walk reads: L2 entry classes as QEMU's check sees them, compressed
//! descriptors, the snapshot table, the bitmap directory, and a cursor that reads big
//! tables (L1, bitmap tables) in bounded chunks.

use crate::format::entry::{COMPRESSED, ZERO};

/// Largest read of a table the walk issues at once.
pub(crate) const CHUNK_BYTES: u64 = 1 << 20;

/// L1 entry offset bits (`L1E_OFFSET_MASK`).
pub(crate) const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Standard L2 entry offset bits (`L2E_OFFSET_MASK`).
pub(crate) const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Subcluster bitmap: any allocated subcluster.
pub(crate) const BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;
/// Subcluster bitmap: every subcluster reads as zero.
pub(crate) const BITMAP_ALL_ZEROES: u64 = 0xffff_ffff_0000_0000;

/// Reads a big-endian u64 at `at` (the caller guarantees 8 bytes).
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// QEMU's `QCow2ClusterType`, as `qcow2_get_cluster_type` decides it.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) enum Kind {
    /// Compressed descriptor.
    Compressed,
    /// Zero flag without a host cluster.
    ZeroPlain,
    /// Zero flag with a preallocated host cluster.
    ZeroAlloc,
    /// Data at a host cluster.
    Normal,
    /// Nothing.
    Unallocated,
}

/// Classifies an L2 entry (with subclusters the zero flag is ignored; with an external data
/// file an entry with offset 0 and COPIED is data at guest cluster 0).
pub(crate) fn classify(e: u64, subclusters: bool, data_file: bool) -> Kind {
    if e & COMPRESSED != 0 {
        Kind::Compressed
    } else if e & ZERO != 0 && !subclusters {
        if e & L2_OFFSET_MASK != 0 {
            Kind::ZeroAlloc
        } else {
            Kind::ZeroPlain
        }
    } else if e & L2_OFFSET_MASK == 0 {
        if data_file && e & crate::format::entry::COPIED != 0 {
            Kind::Normal
        } else {
            Kind::Unallocated
        }
    } else {
        Kind::Normal
    }
}

/// The host byte range of a compressed descriptor, as `qcow2_parse_compressed_l2_entry`
/// computes it (no masking beyond QEMU's own).
pub(crate) fn compressed_range(e: u64, cluster_bits: u32) -> (u64, u64) {
    let shift = 62 - (cluster_bits - 8);
    let offset = e & ((1u64 << shift) - 1);
    let sectors = ((e >> shift) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
    (offset, sectors * 512 - (offset & 511))
}

/// QEMU's `cluster_offset_mask`, for messages about compressed entries.
pub(crate) fn compressed_offset_mask(cluster_bits: u32) -> u64 {
    (1u64 << (62 - (cluster_bits - 8))) - 1
}

/// What a [`TableCursor`] wants next.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) enum Cur {
    /// Entry `index` holds `value`.
    Entry(u64, u64),
    /// Read `len` bytes at `offset` and [`fill`](TableCursor::fill) them in.
    Read { offset: u64, len: usize },
    /// Every entry was seen.
    Done,
}

/// Walks a table of big-endian u64 entries, holding at most [`CHUNK_BYTES`] of it.
#[derive(Debug)]
pub(crate) struct TableCursor {
    offset: u64,
    entries: u64,
    base: u64,
    chunk: Vec<u64>,
    pos: u64,
}

impl TableCursor {
    /// A cursor over `entries` entries at `offset`.
    pub fn new(offset: u64, entries: u64) -> Self {
        Self {
            offset,
            entries,
            base: 0,
            chunk: Vec::new(),
            pos: 0,
        }
    }

    /// The next entry, or the read that brings it in.
    pub fn peek(&self) -> Cur {
        if self.pos >= self.entries {
            return Cur::Done;
        }
        if self.pos >= self.base && self.pos < self.base + self.chunk.len() as u64 {
            return Cur::Entry(self.pos, self.chunk[(self.pos - self.base) as usize]);
        }
        let n = (self.entries - self.pos).min(CHUNK_BYTES / 8);
        Cur::Read {
            offset: self.offset.saturating_add(self.pos * 8),
            len: (n * 8) as usize,
        }
    }

    /// Takes in the bytes of the read [`peek`](Self::peek) asked for.
    pub fn fill(&mut self, bytes: &[u8]) {
        self.base = self.pos;
        self.chunk.clear();
        self.chunk.extend(bytes.chunks_exact(8).map(|c| be64(c, 0)));
    }

    /// Moves past the current entry.
    pub fn advance(&mut self) {
        self.pos += 1;
    }

    /// Replaces the in-memory copy of the current entry (after repairing it on disk).
    pub fn set_current(&mut self, value: u64) {
        if let Some(slot) = self.chunk.get_mut((self.pos - self.base) as usize) {
            *slot = value;
        }
    }
}

/// One snapshot table entry, as far as the check needs it.
#[derive(Clone, Debug, Eq, PartialEq)]
pub(crate) struct Snap {
    pub l1_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    /// Extra data size after a repair's truncation (the on-disk size otherwise).
    pub extra_size: u32,
    /// Where the entry starts in the table.
    pub at: u64,
    /// Where its ID starts in the table (after the whole on-disk extra data).
    pub id_at: u64,
    pub id_len: u16,
    pub name_len: u16,
}

/// The snapshot table as QEMU's `qcow2_do_read_snapshots` reads it.
#[derive(Debug, Default, Eq, PartialEq)]
pub(crate) struct SnapTable {
    pub snaps: Vec<Snap>,
    /// QEMU's `snapshots_size`: the end of the last entry read (its name), from the start.
    pub size: u64,
    /// Repair only: `(entry, extra data size)` of each entry whose extra data was cut to
    /// 1 KiB.
    pub dropped_extra: Vec<(u32, u32)>,
    /// Repair only: entries dropped off the end because the table exceeds 64 MiB.
    pub overhanging: u32,
}

/// Result of parsing the snapshot table bytes read so far.
#[derive(Debug, Eq, PartialEq)]
pub(crate) enum SnapParse {
    /// Every entry parsed (or, when repairing, dropped).
    Done(SnapTable),
    /// The table is at least this many bytes long: read more.
    Need(u64),
    /// Entry `i` has more than 1 KiB of extra data (not repairing).
    TooMuchExtra(u32),
    /// The table exceeds 64 MiB from this many entries before the end (not repairing).
    TooBig(u32),
}

/// Most bytes of snapshot table QEMU accepts.
pub(crate) const MAX_SNAPSHOT_TABLE: u64 = 64 << 20;
/// Most extra data per snapshot QEMU accepts.
pub(crate) const MAX_SNAPSHOT_EXTRA: u32 = 1024;
/// Most snapshots QEMU accepts.
pub(crate) const MAX_SNAPSHOTS: u32 = 65536;
/// The extra data QEMU knows (and writes): VM state size, disk size, icount.
pub(crate) const KNOWN_SNAPSHOT_EXTRA: u32 = 24;

/// Parses `count` snapshot entries from the start of `buf` (`qcow2_do_read_snapshots`).
/// With `repair` (`-r all`), extra data beyond 1 KiB is cut off and the entries that
/// overhang 64 MiB of table are dropped, instead of failing.
pub(crate) fn parse_snapshots(buf: &[u8], count: u32, repair: bool) -> SnapParse {
    let mut out = SnapTable {
        snaps: Vec::with_capacity(count.min(1024) as usize),
        ..SnapTable::default()
    };
    let mut off = 0u64;
    let mut table_len = 0u64;
    for i in 0..count {
        let pre = off;
        off = off.next_multiple_of(8);
        table_len = table_len.next_multiple_of(8);
        if off + 40 > buf.len() as u64 {
            return SnapParse::Need(off + 40);
        }
        let h = &buf[off as usize..off as usize + 40];
        let raw_extra = be32(h, 36);
        let mut extra = raw_extra;
        if extra > MAX_SNAPSHOT_EXTRA {
            if !repair {
                return SnapParse::TooMuchExtra(i);
            }
            extra = MAX_SNAPSHOT_EXTRA;
        }
        let id_len = be16(h, 12);
        let name_len = be16(h, 14);
        let id_at = off + 40 + u64::from(raw_extra);
        let end = id_at + u64::from(id_len) + u64::from(name_len);
        table_len += 40 + u64::from(extra) + u64::from(id_len) + u64::from(name_len);
        // Bytes past twice QEMU's table limit are never read (cut extra data may claim
        // up to 4 GiB): such an entry overhangs, like one past the limit.
        if table_len > MAX_SNAPSHOT_TABLE || end > 2 * MAX_SNAPSHOT_TABLE {
            if !repair {
                return SnapParse::TooBig(count - i);
            }
            out.overhanging = count - i;
            off = pre;
            break;
        }
        if end > buf.len() as u64 {
            return SnapParse::Need(end);
        }
        if extra != raw_extra {
            out.dropped_extra.push((i, raw_extra));
        }
        out.snaps.push(Snap {
            l1_offset: be64(h, 0),
            l1_size: be32(h, 8),
            id: String::new(),
            name: String::new(),
            extra_size: extra,
            at: off,
            id_at,
            id_len,
            name_len,
        });
        off = end;
    }
    // The names only once everything is in (the table is parsed again after each read).
    for s in &mut out.snaps {
        let text = |from: u64, len: u16| {
            String::from_utf8_lossy(&buf[from as usize..from as usize + usize::from(len)])
                .into_owned()
        };
        s.id = text(s.id_at, s.id_len);
        s.name = text(s.id_at + u64::from(s.id_len), s.name_len);
    }
    out.size = off;
    SnapParse::Done(out)
}

/// The snapshot table QEMU's `qcow2_write_snapshots` writes for `snaps` (read from the
/// table bytes `old`): every entry with at least the 24 bytes of extra data QEMU knows
/// (disk size `disk_size` and icount -1 where the old entry had none), unknown extra data
/// kept up to the entry's (possibly cut) extra size, IDs and names up to their first NUL.
pub(crate) fn build_snapshot_table(old: &[u8], snaps: &[Snap], disk_size: u64) -> Vec<u8> {
    let mut t = Vec::new();
    for s in snaps {
        t.resize(t.len().next_multiple_of(8), 0);
        let at = s.at as usize;
        let h = &old[at..at + 40];
        let extra = &old[at + 40..at + 40 + s.extra_size as usize];
        let field = |from: usize| (extra.len() >= from + 8).then(|| be64(extra, from));
        let vm_state = field(0).unwrap_or(u64::from(be32(h, 32)));
        let disk = field(8).unwrap_or(disk_size);
        let icount = field(16).unwrap_or(u64::MAX);
        let unknown = extra.get(KNOWN_SNAPSHOT_EXTRA as usize..).unwrap_or(&[]);
        let until_nul =
            |b: &[u8]| -> Vec<u8> { b.iter().copied().take_while(|&c| c != 0).collect() };
        let id_at = s.id_at as usize;
        let name_at = id_at + usize::from(s.id_len);
        let id = until_nul(&old[id_at..name_at]);
        let name = until_nul(&old[name_at..name_at + usize::from(s.name_len)]);
        let extra_size = s.extra_size.max(KNOWN_SNAPSHOT_EXTRA);
        t.extend_from_slice(&h[0..12]); // L1 offset and size
        t.extend_from_slice(&(id.len() as u16).to_be_bytes());
        t.extend_from_slice(&(name.len() as u16).to_be_bytes());
        t.extend_from_slice(&h[16..32]); // dates and VM clock
        let small = u32::try_from(vm_state).unwrap_or(0);
        t.extend_from_slice(&small.to_be_bytes());
        t.extend_from_slice(&extra_size.to_be_bytes());
        for v in [vm_state, disk, icount] {
            t.extend_from_slice(&v.to_be_bytes());
        }
        t.extend_from_slice(unknown);
        t.extend_from_slice(&id);
        t.extend_from_slice(&name);
    }
    t
}

/// A bitmap's table, from the bitmap directory.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) struct BitmapTable {
    pub offset: u64,
    pub entries: u32,
}

/// Bitmap table entries beyond this are refused (`BME_MAX_TABLE_SIZE`).
const BME_MAX_TABLE_SIZE: u32 = 0x800_0000;
/// `BME_MAX_PHYS_SIZE`.
const BME_MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Largest bitmap directory QEMU accepts (`QCOW2_MAX_BITMAP_DIRECTORY_SIZE`).
pub(crate) const MAX_BITMAP_DIRECTORY: u64 = 1024 * 65535;
/// Most bitmaps QEMU accepts.
pub(crate) const MAX_BITMAPS: u32 = 65535;
/// Bitmap table entry: reserved bits.
pub(crate) const BME_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// Bitmap table entry: offset bits.
pub(crate) const BME_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Parses the bitmap directory as `bitmap_list_load` does; the error is QEMU's reason.
pub(crate) fn parse_bitmap_directory(
    dir: &[u8],
    nb_bitmaps: u32,
    cluster_size: u64,
    virtual_size: u64,
) -> Result<Vec<BitmapTable>, &'static str> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    let mut count = 0u32;
    while pos < dir.len() {
        if pos + 24 > dir.len() {
            return Err("Broken bitmap directory");
        }
        count += 1;
        if count > nb_bitmaps {
            return Err("More bitmaps found than specified in header extension");
        }
        let e = &dir[pos..pos + 24];
        let table_offset = be64(e, 0);
        let table_size = be32(e, 8);
        let flags = be32(e, 12);
        let kind = e[16];
        let granularity = e[17];
        let name_size = be16(e, 18);
        let extra = be32(e, 20);
        let size = (24 + u64::from(name_size) + u64::from(extra)).next_multiple_of(8);
        if pos as u64 + size > dir.len() as u64 {
            return Err("Broken bitmap directory");
        }
        if extra != 0 {
            return Err("Bitmap extra data is not supported");
        }
        let phys = u64::from(table_size) * cluster_size;
        let fail = table_size == 0
            || table_offset == 0
            || table_offset % cluster_size != 0
            || table_size > BME_MAX_TABLE_SIZE
            || !(9..=31).contains(&granularity)
            || flags & 0xffff_fffc != 0
            || name_size > 1023
            || kind != 1
            || phys > BME_MAX_PHYS_SIZE
            || (flags & 1 == 0 && virtual_size > (phys * 8) << granularity);
        if fail {
            return Err("Bitmap doesn't satisfy the constraints");
        }
        out.push(BitmapTable {
            offset: table_offset,
            entries: table_size,
        });
        pos += size as usize;
    }
    if count != nb_bitmaps {
        return Err("Less bitmaps found than specified in header extension");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_matches_qemu() {
        assert_eq!(classify(0, false, false), Kind::Unallocated);
        assert_eq!(classify(1, false, false), Kind::ZeroPlain);
        assert_eq!(
            classify(0x8000_0000_0005_0001, false, false),
            Kind::ZeroAlloc
        );
        assert_eq!(classify(0x8000_0000_0005_0001, true, false), Kind::Normal);
        assert_eq!(
            classify(0x4000_0000_0008_0000, false, false),
            Kind::Compressed
        );
        assert_eq!(classify(0x8000_0000_0000_0000, false, true), Kind::Normal);
        assert_eq!(
            classify(0x8000_0000_0000_0000, false, false),
            Kind::Unallocated
        );
    }

    #[test]
    fn compressed_ranges() {
        assert_eq!(compressed_range(0x4000_0000_0008_0000, 16), (0x80000, 512));
        assert_eq!(
            compressed_range(0x4008_0000_00a0_0000, 21),
            (0xa0_0000, 5 * 512)
        );
        // 512-byte clusters: bits 56..60 belong to the offset, as in QEMU.
        assert_eq!(
            compressed_range(0x4100_0000_0000_0200, 9).0,
            0x0100_0000_0000_0200
        );
    }

    #[test]
    fn cursor_reads_in_chunks() {
        let mut c = TableCursor::new(4096, 3);
        assert_eq!(
            c.peek(),
            Cur::Read {
                offset: 4096,
                len: 24
            }
        );
        let bytes: Vec<u8> = [1u64, 0, 7].iter().flat_map(|v| v.to_be_bytes()).collect();
        c.fill(&bytes);
        assert_eq!(c.peek(), Cur::Entry(0, 1));
        c.advance();
        c.advance();
        assert_eq!(c.peek(), Cur::Entry(2, 7));
        c.advance();
        assert_eq!(c.peek(), Cur::Done);
        let big = TableCursor::new(0, 1 << 20);
        assert_eq!(
            big.peek(),
            Cur::Read {
                offset: 0,
                len: CHUNK_BYTES as usize
            }
        );
    }

    fn snap_entry(extra: u32, id: &str, name: &str) -> Vec<u8> {
        let mut v = vec![0u8; 40];
        v[0..8].copy_from_slice(&0x30000u64.to_be_bytes());
        v[8..12].copy_from_slice(&20u32.to_be_bytes());
        v[12..14].copy_from_slice(&(id.len() as u16).to_be_bytes());
        v[14..16].copy_from_slice(&(name.len() as u16).to_be_bytes());
        v[36..40].copy_from_slice(&extra.to_be_bytes());
        v.extend(std::iter::repeat_n(0, extra as usize));
        v.extend(id.as_bytes());
        v.extend(name.as_bytes());
        v
    }

    #[test]
    fn snapshot_table_parses_incrementally() {
        let mut t = snap_entry(16, "1", "first");
        let first_len = t.len() as u64;
        t.resize(t.len().next_multiple_of(8), 0);
        t.extend(snap_entry(24, "2", "b"));
        assert_eq!(parse_snapshots(&t[..10], 2, false), SnapParse::Need(40));
        assert_eq!(
            parse_snapshots(&t[..50], 2, false),
            SnapParse::Need(first_len)
        );
        match parse_snapshots(&t, 2, false) {
            SnapParse::Done(SnapTable { snaps, size, .. }) => {
                assert_eq!(snaps.len(), 2);
                assert_eq!(
                    (
                        snaps[1].id.as_str(),
                        snaps[1].name.as_str(),
                        snaps[1].extra_size
                    ),
                    ("2", "b", 24)
                );
                assert_eq!(size, t.len() as u64);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_snapshots(&snap_entry(2000, "", ""), 1, false),
            SnapParse::TooMuchExtra(0)
        );
    }

    #[test]
    fn snapshot_repair_cuts_extra_data_and_drops_overhanging_entries() {
        let mut t = snap_entry(2000, "1", "big");
        t.resize(t.len().next_multiple_of(8), 0);
        let second = t.len() as u64;
        t.extend(snap_entry(8, "2", "small"));
        assert_eq!(parse_snapshots(&t, 2, false), SnapParse::TooMuchExtra(0));
        let SnapParse::Done(table) = parse_snapshots(&t, 2, true) else {
            panic!("repair parse");
        };
        assert_eq!(table.dropped_extra, vec![(0, 2000)]);
        assert_eq!(table.overhanging, 0);
        assert_eq!(table.size, t.len() as u64);
        assert_eq!(
            (table.snaps[0].extra_size, table.snaps[0].id_at),
            (1024, 40 + 2000)
        );
        assert_eq!(
            (table.snaps[1].at, table.snaps[1].name.as_str()),
            (second, "small")
        );

        // Rewritten as QEMU writes it: 24 bytes of known extra data at least (disk size
        // and icount filled in for the short entry), unknown extra data up to 1 KiB.
        let new = build_snapshot_table(&t, &table.snaps, 1 << 30);
        let SnapParse::Done(again) = parse_snapshots(&new, 2, false) else {
            panic!("rewritten table");
        };
        assert_eq!(again.snaps[0].extra_size, 1024);
        assert_eq!(again.snaps[1].extra_size, 24);
        assert_eq!(
            (again.snaps[1].id.as_str(), again.snaps[1].name.as_str()),
            ("2", "small")
        );
        let e = again.snaps[1].at as usize + 40;
        assert_eq!(be64(&new, e + 8), 1 << 30, "disk size");
        assert_eq!(be64(&new, e + 16), u64::MAX, "icount");
        assert_eq!(new.len() as u64, again.size);

        // Past 64 MiB of table, the rest is dropped (repair) or refused.
        let mut huge = snap_entry(16, "1", "");
        huge[12..14].copy_from_slice(&u16::MAX.to_be_bytes());
        huge[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        huge.resize(40 + 16 + 2 * 65535, b'x');
        let n = (MAX_SNAPSHOT_TABLE / huge.len() as u64 + 2) as u32;
        let mut big = Vec::new();
        for _ in 0..n {
            big.resize(big.len().next_multiple_of(8), 0);
            big.extend_from_slice(&huge);
        }
        assert_eq!(parse_snapshots(&big, n, false), SnapParse::TooBig(2));
        let SnapParse::Done(cut) = parse_snapshots(&big, n, true) else {
            panic!("repair parse of a big table");
        };
        assert_eq!(cut.overhanging, 2);
        assert_eq!(cut.snaps.len() as u32, n - 2);
        let last = cut.snaps.last().expect("entries");
        assert_eq!(cut.size, last.id_at + 2 * 65535);
    }

    #[test]
    fn bitmap_directory_limits() {
        let mut e = vec![0u8; 24];
        e[0..8].copy_from_slice(&0x10000u64.to_be_bytes());
        e[8..12].copy_from_slice(&1u32.to_be_bytes());
        e[16] = 1;
        e[17] = 16;
        e[18..20].copy_from_slice(&2u16.to_be_bytes());
        e.extend(b"b0");
        e.resize(32, 0);
        assert_eq!(
            parse_bitmap_directory(&e, 1, 65536, 1 << 20),
            Ok(vec![BitmapTable {
                offset: 0x10000,
                entries: 1
            }])
        );
        assert!(parse_bitmap_directory(&e, 2, 65536, 1 << 20).is_err());
        assert!(parse_bitmap_directory(&e[..20], 1, 65536, 1 << 20).is_err());
        e[17] = 40;
        assert!(parse_bitmap_directory(&e, 1, 65536, 1 << 20).is_err());
    }
}
