//! Opening an internal snapshot's contents (`Image::open_snapshot`): reads as qemu-img
//! converts the snapshot, a missing snapshot and a damaged snapshot L1 are typed errors.

use qcow2_conformance::qemu::Qemu;
use qcow2_sync::{Error, Image, OpenError, OpenOptions, SnapshotRef};

/// An image qemu-img made, with snapshot "s1" (id 1) taken between two writes.
fn made(q: &Qemu, dir: &std::path::Path) -> std::path::PathBuf {
    let img = dir.join("img.qcow2");
    q.create(&img, "cluster_size=4096", 1 << 20);
    q.io(&img, &["write -P 0x11 0 64k", "write -z 8k 4k"]);
    q.img(&["snapshot", "-c", "s1", &img.display().to_string()]);
    q.io(&img, &["write -P 0x22 0 128k"]);
    img
}

#[test]
fn snapshot_reads_as_qemu_converts_it() {
    let Some(q) = Qemu::require("snapshot_view::snapshot_reads_as_qemu_converts_it") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = made(&q, dir.path());
    let raw = dir.path().join("s1.raw");
    q.to_raw(&img, Some("s1"), &raw);
    let want = std::fs::read(&raw).unwrap();
    for which in ["s1", "1", "snapshot.name=s1", "snapshot.id=1"] {
        let mut view =
            Image::open_snapshot(&img, &SnapshotRef::parse(which), &OpenOptions::default())
                .unwrap();
        assert!(view.info().read_only, "{which}");
        let mut got = vec![0u8; want.len()];
        view.read_at(&mut got, 0).unwrap();
        assert!(got == want, "{which}: the snapshot reads differently");
        assert!(view.write_at(&[1], 0).is_err(), "{which}: writable");
    }
    match Image::open_snapshot(&img, &SnapshotRef::parse("s2"), &OpenOptions::default()) {
        Err(Error::Open(OpenError::SnapshotNotFound)) => {}
        other => panic!("a missing snapshot: {:?}", other.err()),
    }
}

#[test]
fn damaged_snapshot_l1_is_refused() {
    let Some(q) = Qemu::require("snapshot_view::damaged_snapshot_l1_is_refused") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = made(&q, dir.path());
    let mut bytes = std::fs::read(&img).unwrap();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let table = be64(&bytes, 64) as usize;
    // The snapshot's L1 offset, unaligned; then past the end of the file.
    for (l1, what) in [
        (be64(&bytes, table) + 8, "unaligned"),
        (1 << 40, "past EOF"),
    ] {
        bytes[table..table + 8].copy_from_slice(&l1.to_be_bytes());
        std::fs::write(&img, &bytes).unwrap();
        match Image::open_snapshot(&img, &SnapshotRef::parse("s1"), &OpenOptions::default()) {
            Err(Error::Open(OpenError::Format(e))) => {
                assert!(e.to_string().contains("Snapshot L1 table"), "{what}: {e}")
            }
            other => panic!("{what}: {:?}", other.err()),
        }
    }
}
