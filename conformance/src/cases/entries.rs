//! Damaged L1 and L2 entries found at run time: an entry that is misaligned, points past
//! the end of the file or into metadata fails the request with a typed corruption, sets the
//! corrupt bit on a writable image and leaves it read-only; the undamaged clusters still
//! read back.

use std::path::Path;

use qcow2_proto::{CorruptReason, Corruption, OpenError, RequestError, Structure};

use super::{layout, must};
use crate::harness::{Disk, Error, Harness, Mode};
use crate::hostile::be64;
use crate::verify::scratch;

const CLUSTER: u64 = 64 << 10;
const COPIED: u64 = 1 << 63;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

fn put64(b: &mut [u8], at: u64, v: u64) {
    let at = at as usize;
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Where things are in the fixture.
#[derive(Debug, Clone, Copy)]
struct Map {
    l1: u64,
    reftable: u64,
    refblock: u64,
    l2: u64,
    data0: u64,
    file_len: u64,
}

fn map(b: &[u8]) -> Map {
    let l1 = be64(b, 40);
    let reftable = be64(b, 48);
    let l2 = be64(b, l1) & OFFSET_MASK;
    Map {
        l1,
        reftable,
        refblock: be64(b, reftable),
        l2,
        data0: be64(b, l2) & OFFSET_MASK,
        file_len: b.len() as u64,
    }
}

/// A v3 image of ours, 64 KiB clusters, guest clusters 0 and 1 written with 0x11 and
/// 0x22.
fn fixture<H: Harness>(h: &H, path: &Path) -> Map {
    let mut disk = must(
        h.create(
            path,
            &layout(16 << 20, 3, CLUSTER as u32, 16),
            Mode::writable(),
        ),
        "create",
    );
    must(
        disk.write_at(&[0x11; CLUSTER as usize], 0),
        "write cluster 0",
    );
    must(
        disk.write_at(&[0x22; CLUSTER as usize], CLUSTER),
        "write cluster 1",
    );
    must(disk.close(), "close");
    map(&std::fs::read(path).expect("read image"))
}

/// The fixture with the 8-byte entry at file offset `at` set to `value` (`entry` gives
/// both): its directory, path and bytes. `None` (said) when the harness has no files.
fn damage<H: Harness>(
    h: &H,
    what: &str,
    entry: impl FnOnce(&Map) -> (u64, u64),
) -> Option<(tempfile::TempDir, std::path::PathBuf, Vec<u8>)> {
    if !h.caps().real_files {
        println!(
            "SKIP entries ({what}): the {} harness has no real files",
            h.name()
        );
        return None;
    }
    let dir = scratch();
    let path = dir.path().join("entries.qcow2");
    let m = fixture(h, &path);
    let mut bytes = std::fs::read(&path).expect("read image");
    let (at, value) = entry(&m);
    put64(&mut bytes, at, value);
    std::fs::write(&path, &bytes).expect("write damaged image");
    Some((dir, path, bytes))
}

/// Damages entry `at` (a file offset) to `value`, then: the read and the write of guest
/// cluster 0 fail with `want`, guest cluster 1 still reads (when its entry is not the
/// damaged one's L2 table: `l2_intact`), and the image ends up marked corrupt.
fn damaged<H: Harness>(
    h: &H,
    what: &str,
    entry: impl Fn(&Map) -> (u64, u64),
    want: Corruption,
    l2_intact: bool,
) {
    let Some((_dir, path, bytes)) = damage(h, what, |m| entry(m)) else {
        return;
    };

    let expect = |r: Result<(), Error>, op: &str| match r {
        Err(Error::Request(RequestError::Corrupt(c))) => {
            assert_eq!(c, want, "{what}: the {op} of the damaged cluster")
        }
        other => panic!("{what}: the {op} of the damaged cluster: want {want}, got {other:?}"),
    };
    // Read-only: typed errors, nothing written, nothing marked.
    let mut disk = must(h.open(&path, Mode::read_only()), format!("{what}: open"));
    let mut buf = vec![0; CLUSTER as usize];
    expect(disk.read_at(&mut buf, 0), "read-only read");
    must(disk.close(), format!("{what}: close"));
    assert_eq!(
        std::fs::read(&path).expect("read"),
        bytes,
        "{what}: a read-only open wrote"
    );

    // Writable: the write fails too, the image turns read-only and is marked corrupt.
    let mut disk = must(h.open(&path, Mode::writable()), format!("{what}: open"));
    expect(disk.write_at(&[0x33; 4096], 0), "write");
    expect(disk.read_at(&mut buf, 0), "read");
    match disk.write_at(&[0x44; 4096], CLUSTER) {
        Err(Error::Request(RequestError::ReadOnly)) => {}
        other => panic!("{what}: a write after the corruption: {other:?}"),
    }
    if l2_intact {
        must(
            disk.read_at(&mut buf, CLUSTER),
            format!("{what}: read cluster 1"),
        );
        assert!(buf.iter().all(|&b| b == 0x22), "{what}: cluster 1");
    } else {
        expect(disk.read_at(&mut buf, CLUSTER), "read of the neighbour");
    }
    must(disk.close(), format!("{what}: close"));
    match h.open(&path, Mode::writable()) {
        Err(Error::Open(OpenError::CorruptReadWrite)) => {}
        other => panic!("{what}: writable reopen: {:?}", other.map(drop)),
    }
    let disk = must(h.open(&path, Mode::read_only()), format!("{what}: reopen"));
    assert!(disk.info().corrupt, "{what}: the corrupt bit");
    must(disk.close(), "close");
}

fn corruption(structure: Structure, offset: u64, reason: CorruptReason) -> Corruption {
    Corruption {
        structure,
        offset,
        reason,
    }
}

/// An L2 entry whose host offset is not cluster aligned.
pub fn l2_entry_misaligned<H: Harness>(h: &H) {
    // The offset mask keeps bits 9..55: the entry reads as data 512 bytes into a cluster.
    let dir = scratch();
    let m = fixture(h, &dir.path().join("probe.qcow2"));
    damaged(
        h,
        "misaligned L2 entry",
        |m| (m.l2, (m.data0 + 512) | COPIED),
        corruption(
            Structure::DataCluster,
            m.data0 + 512,
            CorruptReason::Unaligned,
        ),
        true,
    );
}

/// An L2 entry pointing past the end of the file (QEMU reads zeros there, and writes
/// wherever the entry says).
pub fn l2_entry_past_eof<H: Harness>(h: &H) {
    let dir = scratch();
    let m = fixture(h, &dir.path().join("probe.qcow2"));
    let past = (m.file_len.div_ceil(CLUSTER) + 16) * CLUSTER;
    damaged(
        h,
        "L2 entry past EOF",
        |m| (m.l2, past | COPIED),
        corruption(Structure::DataCluster, past, CorruptReason::PastEof),
        true,
    );
}

/// L2 entries pointing into each metadata structure.
pub fn l2_entry_into_metadata<H: Harness>(h: &H) {
    let dir = scratch();
    let m = fixture(h, &dir.path().join("probe.qcow2"));
    for (s, host) in [
        (Structure::L1Table, m.l1),
        (Structure::RefcountTable, m.reftable),
        (Structure::RefcountBlock, m.refblock),
        (Structure::L2Table, m.l2),
    ] {
        damaged(
            h,
            &format!("L2 entry into the {s}"),
            |m| (m.l2, host | COPIED),
            corruption(Structure::DataCluster, host, CorruptReason::Overlap(s)),
            true,
        );
    }
}

/// L1 entries that are misaligned, past EOF or pointing into other metadata.
pub fn l1_entry_damaged<H: Harness>(h: &H) {
    let dir = scratch();
    let m = fixture(h, &dir.path().join("probe.qcow2"));
    let past = (m.file_len.div_ceil(CLUSTER) + 16) * CLUSTER;
    let cases = [
        (
            "misaligned",
            m.l2 + 512,
            corruption(
                Structure::L1Table,
                (m.l2 + 512) | COPIED,
                CorruptReason::Unaligned,
            ),
        ),
        (
            "past EOF",
            past,
            corruption(Structure::L2Table, past, CorruptReason::PastEof),
        ),
        (
            "into the refcount table",
            m.reftable,
            corruption(
                Structure::L2Table,
                m.reftable,
                CorruptReason::Overlap(Structure::RefcountTable),
            ),
        ),
        (
            "into the refcount block",
            m.refblock,
            corruption(
                Structure::L2Table,
                m.refblock,
                CorruptReason::Overlap(Structure::RefcountBlock),
            ),
        ),
    ];
    for (what, target, want) in cases {
        damaged(
            h,
            &format!("L1 entry {what}"),
            |m| (m.l1, target | COPIED),
            want,
            false,
        );
    }
}

/// `check -r all` on an image open for I/O, when the repair cannot fix everything (a
/// misaligned refcount-table entry stays, as in QEMU): the check finishes with the
/// corruption reported, the data still reads, and the image closes.
pub fn repair_leaving_corruption_while_open<H: Harness>(h: &H) {
    let damaged = damage(h, "repair while open", |m| (m.reftable, m.refblock + 512));
    let Some((_dir, path, _)) = damaged else {
        return;
    };
    let mut disk = must(h.open(&path, Mode::writable()), "open");
    let report = must(disk.check(Some(qcow2_proto::Repair::All)), "check -r all");
    assert!(
        report.corruptions > 0,
        "the misaligned entry stays: {report:?}"
    );
    let mut buf = vec![0; CLUSTER as usize];
    must(
        disk.read_at(&mut buf, CLUSTER),
        "read cluster 1 after the repair",
    );
    assert!(buf.iter().all(|&b| b == 0x22), "cluster 1 after the repair");
    must(disk.close(), "close");
}
