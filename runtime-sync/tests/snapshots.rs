//! Internal snapshots against a byte model: random scripts of writes, zeroes and discards
//! mixed with snapshot create, apply and delete. After every script (and a reopen) the
//! image and every snapshot read as their models, our check and qemu-img's are clean, and
//! qemu-img reads every snapshot the same.

use qcow2_conformance::model::{pattern, Model};
use qcow2_conformance::qemu::Qemu;
use qcow2_conformance::sim::rng::Rng;
use qcow2_proto::CreateOptions;
use qcow2_sync::{Image, OpenOptions, SnapshotRef};

const SIZE: u64 = 4 << 20;

fn read_all(img: &mut Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.len() as usize];
    img.read_at(&mut buf, 0).unwrap();
    buf
}

/// Whether a snapshot read at the image's current size (`got`) is the snapshot (`want`):
/// cut at the current size, zeros past the snapshot's own.
fn same_prefix(got: &[u8], want: &[u8]) -> bool {
    let n = got.len().min(want.len());
    got[..n] == want[..n] && got[n..].iter().all(|&b| b == 0)
}

fn model_bytes(m: &Model) -> Vec<u8> {
    let mut buf = vec![0u8; m.len() as usize];
    m.read(0, &mut buf);
    buf
}

fn run(seed: u64, options: &CreateOptions, q: Option<&Qemu>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    let cs = u64::from(options.cluster_size);
    let mut img = Image::create(&path, options, &OpenOptions::default()).unwrap();
    let mut rng = Rng::new(seed);
    let mut model = Model::new(SIZE);
    // (name, model) of each snapshot, in table order (a model has its size).
    let mut snaps: Vec<(String, Model)> = Vec::new();
    let mut log = Vec::new();
    for step in 0..40 {
        let size = model.len();
        let offset = rng.below(size);
        let len = (rng.below(3 * cs) + 1).min(size - offset);
        match rng.below(11) {
            0..=3 => {
                let data = pattern(step, offset, len as usize);
                img.write_at(&data, offset).unwrap();
                model.write(offset, &data);
                log.push(format!("write {offset} {len}"));
            }
            4 => {
                img.write_zeroes(offset, len, rng.below(2) == 0).unwrap();
                model.zero(offset, len);
                log.push(format!("zero {offset} {len}"));
            }
            5 => {
                img.discard(offset, len).unwrap();
                model.discard(offset, len, cs);
                log.push(format!("discard {offset} {len}"));
            }
            6 | 7 => {
                let name = format!("s{step}");
                img.snapshot_create(&name).unwrap();
                snaps.push((name.clone(), model.clone()));
                log.push(format!("create {name}"));
            }
            8 if !snaps.is_empty() => {
                let i = rng.below(snaps.len() as u64) as usize;
                let (name, m) = snaps[i].clone();
                img.snapshot_apply(&SnapshotRef::Name(name.clone()))
                    .unwrap();
                model = m;
                log.push(format!("apply {name}"));
            }
            10 => {
                // Grow or shrink (whole sectors), snapshots or not.
                let new = (rng.below(2 * SIZE) + 512).next_multiple_of(512);
                img.resize(new, true).unwrap();
                model.resize(new);
                log.push(format!("resize {new}"));
            }
            9 if !snaps.is_empty() => {
                let i = rng.below(snaps.len() as u64) as usize;
                let (name, _) = snaps.remove(i);
                img.snapshot_delete(&SnapshotRef::Name(name.clone()))
                    .unwrap();
                log.push(format!("delete {name}"));
            }
            _ => {}
        }
        let report = img.check(None).unwrap();
        assert!(
            report.corruptions == 0 && report.leaks == 0 && report.check_errors == 0,
            "seed {seed} step {step}: {report:?}\n{log:#?}"
        );
    }
    assert!(
        read_all(&mut img) == model_bytes(&model),
        "seed {seed}: the image\n{log:#?}"
    );
    img.close().unwrap();
    let mut img = Image::open(&path, &OpenOptions::read_only()).unwrap();
    assert!(
        read_all(&mut img) == model_bytes(&model),
        "seed {seed}: after reopen"
    );
    let listed: Vec<String> = img
        .info()
        .snapshots
        .iter()
        .map(|s| s.name.clone())
        .collect();
    let want: Vec<String> = snaps.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(listed, want, "seed {seed}: the snapshot list");
    img.close().unwrap();
    for (name, m) in &snaps {
        let which = SnapshotRef::Name(name.clone());
        let mut view = Image::open_snapshot(&path, &which, &OpenOptions::default()).unwrap();
        // (A snapshot is read at the image's current size, as qemu-img does: past the
        // size it was taken at, it reads as zero.)
        let got = read_all(&mut view);
        assert!(
            same_prefix(&got, &model_bytes(m)),
            "seed {seed}: snapshot {name}\n{log:#?}"
        );
    }
    if let Some(q) = q {
        let check = q.check(&path);
        assert!(
            check.is_clean(),
            "seed {seed}: qemu-img check: {check:?}\n{log:#?}"
        );
        for (name, m) in &snaps {
            let raw = dir.path().join("snap.raw");
            q.to_raw(&path, Some(name), &raw);
            // (Past the size a snapshot was taken at, qemu-img reads whatever the
            // snapshot's last cluster holds there; we read zeros: compared up to it.)
            let got = std::fs::read(&raw).unwrap();
            let want = model_bytes(m);
            let n = got.len().min(want.len());
            assert!(
                got[..n] == want[..n],
                "seed {seed}: qemu-img reads snapshot {name} differently"
            );
        }
    }
}

#[test]
fn snapshot_scripts_against_a_model() {
    let q = Qemu::require("snapshots::snapshot_scripts_against_a_model");
    let tests: u64 = std::env::var("QCOW2_QC_TESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    for seed in 0..tests {
        let mut o = CreateOptions::new(SIZE);
        match seed % 4 {
            0 => o.cluster_size = 4096,
            1 => {
                o.cluster_size = 16384;
                o.extended_l2 = true;
            }
            2 => o.cluster_size = 65536,
            _ => {
                o.cluster_size = 512;
                o.refcount_bits = 8;
            }
        }
        run(0x5eed_0000 + seed, &o, q.as_ref());
    }
}

/// A refcount that overflows in the middle of a create (2-bit refcounts: a cluster shared
/// by three tables already) fails the request, and what the walk had added before is taken
/// back: no leak, COPIED flags restored.
#[test]
fn refcount_overflow_mid_walk_leaves_no_trace() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    let mut o = CreateOptions::new(SIZE);
    o.refcount_bits = 2;
    let mut img = Image::create(&path, &o, &OpenOptions::default()).unwrap();
    // A cluster late in the walk reaches refcount 3 (the most 2 bits hold)...
    img.write_at(&[7; 4096], SIZE - 65536).unwrap();
    img.snapshot_create("a").unwrap();
    img.snapshot_create("b").unwrap();
    // ...then clusters early in the walk get one reference each.
    img.write_at(&[8; 65536 * 3], 0).unwrap();
    match img.snapshot_create("c") {
        Err(qcow2_sync::Error::Request(qcow2_proto::RequestError::RefcountOverflow)) => {}
        other => panic!("a create past the refcount width: {other:?}"),
    }
    let report = img.check(None).unwrap();
    assert_eq!(
        (report.corruptions, report.leaks),
        (0, 0),
        "after the failed create: {report:?}"
    );
    // The early clusters are still written in place (COPIED restored), and read right.
    img.write_at(&[9; 512], 0).unwrap();
    let mut buf = vec![0u8; 1024];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 9) && buf[512..].iter().all(|&b| b == 8));
    assert_eq!(img.info().snapshots.len(), 2);
    let report = img.check(None).unwrap();
    assert_eq!((report.corruptions, report.leaks), (0, 0), "{report:?}");
    img.close().unwrap();
}
