//! Metadata overlap checks (QEMU's "cached" level): a write that would land on metadata is
//! refused, the request fails with the corruption, the corrupt bit is set, the image turns
//! read-only, and the metadata is left as it was.
//!
//! Each case damages one refcount (QEMU's iotest 060 does the same): the cluster of a
//! metadata structure gets refcount 0, so the allocator's first fit hands it out for the
//! next allocating write.

use std::path::Path;

use qcow2_proto::{CorruptReason, Corruption, OpenError, RequestError, Structure};

use super::must;
use crate::harness::{Disk, Error, Harness, Mode};
use crate::hostile::be64;
use crate::qemu::Qemu;
use crate::verify::scratch;

const CLUSTER: u64 = 64 << 10;

/// The host offset of structure `s` in the image `bytes` (64 KiB clusters, one refcount
/// block, data at guest 0, a snapshot when `s` is a snapshot structure).
fn locate(bytes: &[u8], s: Structure) -> u64 {
    let l1 = be64(bytes, 40);
    let reftable = be64(bytes, 48);
    let snapshots = be64(bytes, 64);
    match s {
        Structure::L1Table => l1,
        Structure::RefcountTable => reftable,
        Structure::RefcountBlock => be64(bytes, reftable),
        Structure::L2Table => be64(bytes, l1) & 0x00ff_ffff_ffff_fe00,
        Structure::SnapshotTable => snapshots,
        // The first snapshot entry starts with its L1 table's offset.
        Structure::SnapshotL1Table => be64(bytes, snapshots),
        other => unreachable!("no fixture locates {other}"),
    }
}

/// Sets the 16-bit refcount of the cluster at `host` to zero.
fn zero_refcount(bytes: &mut [u8], host: u64) {
    let refblock = locate(bytes, Structure::RefcountBlock);
    let at = (refblock + host / CLUSTER * 2) as usize;
    assert_eq!(
        u16::from_be_bytes([bytes[at], bytes[at + 1]]),
        1,
        "refcount of {host:#x} before the damage"
    );
    bytes[at..at + 2].fill(0);
}

fn cluster_at(path: &Path, host: u64) -> Vec<u8> {
    let bytes = std::fs::read(path).expect("read image");
    let end = (host + CLUSTER).min(bytes.len() as u64);
    bytes[host as usize..end as usize].to_vec()
}

/// Damages `s`'s refcount in an image qemu-img made, then runs an allocating write.
fn refused_write_over<H: Harness>(h: &H, s: Structure) {
    let what = format!("refcount 0 under the {s}");
    let Some(q) = Qemu::require(&format!("overlap: {what}")) else {
        return;
    };
    if !h.caps().real_files {
        println!(
            "SKIP overlap ({what}): the {} harness has no real files",
            h.name()
        );
        return;
    }
    let dir = scratch();
    let path = dir.path().join("overlap.qcow2");
    q.create(&path, "cluster_size=65536", 64 << 20);
    q.io(&path, &["write -P 0x11 0 64k"]);
    let snapshot = matches!(s, Structure::SnapshotTable | Structure::SnapshotL1Table);
    if snapshot {
        q.img(&[
            "snapshot".as_ref(),
            "-c".as_ref(),
            "s1".as_ref(),
            path.as_os_str(),
        ]);
    }
    let mut bytes = std::fs::read(&path).expect("read image");
    let host = locate(&bytes, s);
    zero_refcount(&mut bytes, host);
    std::fs::write(&path, &bytes).expect("write damaged image");
    let before = cluster_at(&path, host);

    let mut disk = must(h.open(&path, Mode::writable()), format!("{what}: open"));
    match disk.write_at(&[0x22; 4096], 1 << 20) {
        Err(Error::Request(RequestError::Corrupt(Corruption {
            reason: CorruptReason::WriteOverlap(hit),
            ..
        }))) => assert_eq!(
            hit, s,
            "{what}: the structure the refused write would overwrite"
        ),
        other => panic!("{what}: the allocating write was not refused: {other:?}"),
    }
    match disk.write_at(&[0x33; 512], 0) {
        Err(Error::Request(RequestError::ReadOnly)) => {}
        other => panic!("{what}: a write after the refusal: {other:?}"),
    }
    let mut buf = vec![0; 64 << 10];
    must(disk.read_at(&mut buf, 0), format!("{what}: read after"));
    assert!(
        buf.iter().all(|&b| b == 0x11),
        "{what}: data before the refusal"
    );
    must(disk.close(), format!("{what}: close"));

    // (The file may have grown past it: host space allocated ahead stays once the engine
    // stopped writing.)
    let after = cluster_at(&path, host);
    assert!(
        after.len() >= before.len()
            && after[..before.len()] == before[..]
            && after[before.len()..].iter().all(|&b| b == 0),
        "{what}: the {s} was written over"
    );
    let info = q.info(&path);
    assert_eq!(
        info["format-specific"]["data"]["corrupt"],
        serde_json::Value::Bool(true),
        "{what}: qemu-img info after the refusal: {info}"
    );
    match h.open(&path, Mode::writable()) {
        Err(Error::Open(OpenError::CorruptReadWrite)) => {}
        other => panic!("{what}: writable reopen: {:?}", other.map(drop)),
    }
    // Nothing but the damaged refcount is wrong (the refused allocation may even have
    // counted the cluster); QEMU's repair clears the bit; the data is intact.
    let check = q.check(&path);
    assert!(
        check.corruptions <= 1 && check.leaks == 0 && check.check_errors == 0,
        "{what}: qemu-img check should see the damaged refcount at most: {}",
        check.json
    );
    q.img(&[
        "check".as_ref(),
        "-r".as_ref(),
        "all".as_ref(),
        path.as_os_str(),
    ]);
    q.assert_clean(&path, &format!("{what}: after qemu-img check -r all"));
    let mut disk = must(h.open(&path, Mode::writable()), format!("{what}: reopen"));
    must(
        disk.write_at(&[0x22; 4096], 1 << 20),
        format!("{what}: write after repair"),
    );
    must(
        disk.read_at(&mut buf, 0),
        format!("{what}: read after repair"),
    );
    assert!(
        buf.iter().all(|&b| b == 0x11),
        "{what}: data after the repair"
    );
    must(disk.close(), format!("{what}: close after repair"));
    q.assert_clean(&path, &format!("{what}: after writing again"));
}

/// An allocation lands on the active L2 table.
pub fn refcount_zero_under_l2_table<H: Harness>(h: &H) {
    refused_write_over(h, Structure::L2Table);
}

/// An allocation lands on the refcount block.
pub fn refcount_zero_under_refcount_block<H: Harness>(h: &H) {
    refused_write_over(h, Structure::RefcountBlock);
}

/// An allocation lands on the active L1 table.
pub fn refcount_zero_under_l1_table<H: Harness>(h: &H) {
    refused_write_over(h, Structure::L1Table);
}

/// An allocation lands on the refcount table.
pub fn refcount_zero_under_refcount_table<H: Harness>(h: &H) {
    refused_write_over(h, Structure::RefcountTable);
}

/// An allocation lands on the snapshot table.
pub fn refcount_zero_under_snapshot_table<H: Harness>(h: &H) {
    refused_write_over(h, Structure::SnapshotTable);
}

/// An allocation lands on a snapshot's L1 table.
pub fn refcount_zero_under_snapshot_l1<H: Harness>(h: &H) {
    refused_write_over(h, Structure::SnapshotL1Table);
}
