//! The checker against `qemu-img check`: images made by qemu-img and qemu-io, clean and
//! damaged by poking bytes, checked by both; repaired by both and checked again.
//!
//! Without qemu-img these tests fail when `CI` is set and are skipped otherwise.

mod check_util;

use std::path::{Path, PathBuf};

use check_util::*;
use qcow2_proto::Repair;

/// Makes a base image with qemu-img create + qemu-io writes.
fn make(dir: &Scratch, name: &str, opts: &str, size: &str, writes: &[&str]) -> PathBuf {
    let p = dir.path(name);
    let ps = p.to_str().expect("utf-8");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", opts, ps, size],
    );
    for w in writes {
        run("qemu-io", &["-f", "qcow2", "-c", w, ps]);
    }
    p
}

/// Our check and qemu-img's agree on `path` (which is left untouched).
fn agree(path: &Path, what: &str) {
    let (ours, stats) = check_file(path, None);
    assert_eq!(stats.writes, 0, "{what}: a plain check wrote");
    let q = qemu_check(path, None);
    assert_same(&ours, &q, what);
}

/// Repairs two copies of `damaged`, one with our checker and one with qemu-img, compares
/// the repair reports, then checks both results with qemu-img: they must agree.
fn repair_like_qemu(dir: &Scratch, damaged: &Path, mode: Repair, what: &str) {
    let flag = if mode == Repair::All { "all" } else { "leaks" };
    let ours_path = dir.path(&format!("{what}.ours-{flag}"));
    let qemu_path = dir.path(&format!("{what}.qemu-{flag}"));
    copy(damaged, &ours_path);
    copy(damaged, &qemu_path);
    let (ours, stats) = check_file(&ours_path, Some(mode));
    let q = qemu_check(&qemu_path, Some(flag));
    let ctx = format!("{what} -r {flag}");
    assert_same(&ours, &q, &ctx);
    if stats.writes > 0 {
        assert!(
            stats.ends_with_flush,
            "{ctx}: repair writes not followed by a flush"
        );
    }
    let after_ours = qemu_check(&ours_path, None);
    let after_qemu = qemu_check(&qemu_path, None);
    assert_eq!(
        (after_ours.code, &after_ours.fields),
        (after_qemu.code, &after_qemu.fields),
        "{ctx}: qemu-img check after our repair vs after qemu's\nours: {}\nqemu: {}\nour report: {ours:#?}",
        after_ours.stderr,
        after_qemu.stderr,
    );
    // And our own check of our repaired copy agrees with qemu's view of it.
    let (again, _) = check_file(&ours_path, None);
    assert_same(&again, &after_ours, &format!("{ctx}, re-checked"));
    // Guest data is the same either way (when both images still open).
    if after_ours.code != 1 && after_qemu.code != 1 {
        let out = std::process::Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "qcow2"])
            .arg(&ours_path)
            .arg(&qemu_path)
            .output()
            .expect("qemu-img compare");
        assert!(
            out.status.code() != Some(1),
            "{ctx}: guest data differs after repair: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// A damage: pokes `path`; false when it does not apply to this image.
type Damage = fn(&Path, &Meta) -> bool;

fn leak_raise(p: &Path, m: &Meta) -> bool {
    let Some((_, e)) = first_data_entry(p, m) else {
        return false;
    };
    let c = (e & 0x00ff_ffff_ffff_fe00) >> m.cluster_bits;
    let r = get_refcount(p, m, c);
    set_refcount(p, m, c, r + 1)
}

fn leak_unreferenced(p: &Path, m: &Meta) -> bool {
    let len = file_len(p).next_multiple_of(m.cluster_size);
    let c = len >> m.cluster_bits;
    if refcount_slot(p, m, c).is_none() {
        return false;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .expect("open")
        .set_len(len + m.cluster_size)
        .expect("grow");
    set_refcount(p, m, c, 1)
}

fn zero_refcount(p: &Path, m: &Meta) -> bool {
    let Some((_, e)) = first_data_entry(p, m) else {
        return false;
    };
    set_refcount(p, m, (e & 0x00ff_ffff_ffff_fe00) >> m.cluster_bits, 0)
}

fn lower_shared_refcount(p: &Path, m: &Meta) -> bool {
    for (_, e) in l2_entries(p, m) {
        if e & (1 << 62) != 0 || e & 0x00ff_ffff_ffff_fe00 == 0 {
            continue;
        }
        let c = (e & 0x00ff_ffff_ffff_fe00) >> m.cluster_bits;
        if get_refcount(p, m, c) == 2 {
            return set_refcount(p, m, c, 1);
        }
    }
    false
}

fn clear_copied_l2(p: &Path, m: &Meta) -> bool {
    let Some((at, e)) = first_data_entry(p, m) else {
        return false;
    };
    if e & (1 << 63) == 0 {
        return false;
    }
    set_u64(p, at, e & !(1 << 63));
    true
}

fn clear_copied_l1(p: &Path, m: &Meta) -> bool {
    let e = u64_at(p, m.l1_offset);
    if e & (1 << 63) == 0 {
        return false;
    }
    set_u64(p, m.l1_offset, e & !(1 << 63));
    true
}

fn misalign_l2(p: &Path, m: &Meta) -> bool {
    let Some((at, e)) = first_data_entry(p, m) else {
        return false;
    };
    if m.cluster_size == 512 {
        return false;
    }
    set_u64(p, at, e + 0x200);
    true
}

fn misalign_prealloc(p: &Path, m: &Meta) -> bool {
    let Some((at, e)) = first_data_entry(p, m) else {
        return false;
    };
    if m.cluster_size == 512 || m.version < 3 {
        return false;
    }
    set_u64(p, at, (e + 0x200) | 1);
    true
}

fn past_eof(p: &Path, m: &Meta) -> bool {
    let Some((at, e)) = first_data_entry(p, m) else {
        return false;
    };
    let far = (file_len(p) + 16 * m.cluster_size).next_multiple_of(m.cluster_size);
    set_u64(p, at, (e & (1 << 63)) | far);
    true
}

fn truncate_tail(p: &Path, m: &Meta) -> bool {
    let len = file_len(p);
    if len < 8 * m.cluster_size {
        return false;
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .expect("open");
    f.set_len(len - m.cluster_size - m.cluster_size / 2)
        .expect("truncate");
    true
}

fn reserved_l2(p: &Path, m: &Meta) -> bool {
    let Some((at, e)) = first_data_entry(p, m) else {
        return false;
    };
    set_u64(p, at, e | (1 << 56));
    true
}

fn reserved_l1(p: &Path, m: &Meta) -> bool {
    let e = u64_at(p, m.l1_offset);
    if e == 0 {
        return false;
    }
    set_u64(p, m.l1_offset, e | 2);
    true
}

fn reftable_reserved(p: &Path, m: &Meta) -> bool {
    let e = u64_at(p, m.reftable_offset);
    set_u64(p, m.reftable_offset, e | 1);
    true
}

fn refblock_outside(p: &Path, m: &Meta) -> bool {
    if m.reftable_entries < 2 || u64_at(p, m.reftable_offset + 8) != 0 {
        return false;
    }
    let far = (file_len(p) + 3 * m.cluster_size).next_multiple_of(m.cluster_size);
    set_u64(p, m.reftable_offset + 8, far);
    true
}

fn corrupt_bit_and_leak(p: &Path, m: &Meta) -> bool {
    if m.version < 3 || !leak_raise(p, m) {
        return false;
    }
    let bits = u64_at(p, 72);
    set_u64(p, 72, bits | 2);
    true
}

fn copied_on_compressed(p: &Path, m: &Meta) -> bool {
    let Some((at, e)) = l2_entries(p, m)
        .into_iter()
        .find(|&(_, v)| v & (1 << 62) != 0)
    else {
        return false;
    };
    set_u64(p, at, e | (1 << 63));
    true
}

fn compressed_grown(p: &Path, m: &Meta) -> bool {
    // iotest 214: the sector count field raised, so the range covers more host clusters.
    let Some((at, e)) = l2_entries(p, m)
        .into_iter()
        .find(|&(_, v)| v & (1 << 62) != 0)
    else {
        return false;
    };
    let shift = 62 - (m.cluster_bits - 8);
    let mask = ((1u64 << (m.cluster_bits - 8)) - 1) << shift;
    set_u64(p, at, e | mask);
    true
}

const DAMAGES: &[(&str, Damage)] = &[
    ("leak_raise", leak_raise),
    ("leak_unreferenced", leak_unreferenced),
    ("zero_refcount", zero_refcount),
    ("lower_shared_refcount", lower_shared_refcount),
    ("clear_copied_l2", clear_copied_l2),
    ("clear_copied_l1", clear_copied_l1),
    ("misalign_l2", misalign_l2),
    ("misalign_prealloc", misalign_prealloc),
    ("past_eof", past_eof),
    ("truncate_tail", truncate_tail),
    ("reserved_l2", reserved_l2),
    ("reserved_l1", reserved_l1),
    ("reftable_reserved", reftable_reserved),
    ("refblock_outside", refblock_outside),
    ("corrupt_bit_and_leak", corrupt_bit_and_leak),
    ("copied_on_compressed", copied_on_compressed),
    ("compressed_grown", compressed_grown),
];

/// Checks a clean base image, then every damage that applies to it, plain and repaired.
fn exercise(dir: &Scratch, base: &Path, name: &str) -> usize {
    agree(base, &format!("{name} (clean)"));
    let (ours, _) = check_file(base, None);
    let ours = ours.expect("clean image checks");
    assert_eq!(
        (ours.corruptions, ours.leaks, ours.check_errors),
        (0, 0, 0),
        "{name}: {ours:#?}"
    );
    let mut applied = 0;
    for (dname, damage) in DAMAGES {
        let what = format!("{name}.{dname}");
        let p = dir.path(&what);
        copy(base, &p);
        let m = meta(&p);
        if !damage(&p, &m) {
            continue;
        }
        applied += 1;
        agree(&p, &what);
        repair_like_qemu(dir, &p, Repair::Leaks, &what);
        repair_like_qemu(dir, &p, Repair::All, &what);
    }
    applied
}

#[test]
fn cluster_64k_refcount_16() {
    if !have_qemu() {
        return;
    }
    let d = Scratch::new("c64k");
    let base = make(
        &d,
        "base",
        "cluster_size=65536",
        "10M",
        &["write 0 128k", "write 1M 64k", "write 5M 4k"],
    );
    assert!(exercise(&d, &base, "c64k") >= 12);
}

#[test]
fn cluster_512_refcount_16() {
    if !have_qemu() {
        return;
    }
    let d = Scratch::new("c512");
    let base = make(
        &d,
        "base",
        "cluster_size=512",
        "1M",
        &["write 0 4k", "write 100k 1k", "write 600k 512"],
    );
    assert!(exercise(&d, &base, "c512") >= 8);
}

#[test]
fn cluster_4k_refcount_64() {
    if !have_qemu() {
        return;
    }
    let d = Scratch::new("c4k");
    let base = make(
        &d,
        "base",
        "cluster_size=4096,refcount_bits=64",
        "4M",
        &["write 0 12k", "write 2M 8k", "write 3M 4k"],
    );
    assert!(exercise(&d, &base, "c4k_r64") >= 12);
}

#[test]
fn cluster_2m_refcount_1() {
    if !have_qemu() {
        return;
    }
    let d = Scratch::new("c2m");
    let base = make(
        &d,
        "base",
        "cluster_size=2097152,refcount_bits=1",
        "8M",
        &["write 0 64k", "write 4M 1M"],
    );
    assert!(exercise(&d, &base, "c2m_r1") >= 6);
}

#[test]
fn compat_010() {
    if !have_qemu() {
        return;
    }
    let d = Scratch::new("v2");
    let base = make(
        &d,
        "base",
        "compat=0.10,cluster_size=65536",
        "10M",
        &["write 0 128k", "write 3M 64k"],
    );
    assert!(exercise(&d, &base, "v2") >= 10);
}

#[test]
fn internal_snapshots() {
    if !have_qemu() {
        return;
    }
    let d = Scratch::new("snap");
    let base = make(
        &d,
        "base",
        "cluster_size=65536",
        "10M",
        &["write 0 128k", "write 1M 64k"],
    );
    let b = base.to_str().expect("utf-8");
    run("qemu-img", &["snapshot", "-c", "s1", b]);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 7 64k 64k",
            "-c",
            "write 3M 64k",
            b,
        ],
    );
    run("qemu-img", &["snapshot", "-c", "s2", b]);
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 9 0 64k", b]);
    assert!(exercise(&d, &base, "snap") >= 12);

    // A v2 image with a snapshot, and 512-byte clusters with a snapshot.
    let v2 = make(
        &d,
        "v2snap",
        "compat=0.10,cluster_size=4096",
        "2M",
        &["write 0 16k"],
    );
    run(
        "qemu-img",
        &["snapshot", "-c", "s", v2.to_str().expect("utf-8")],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write 4k 4k",
            v2.to_str().expect("utf-8"),
        ],
    );
    assert!(exercise(&d, &v2, "v2snap") >= 8);
}

#[test]
fn compressed_clusters() {
    if !have_qemu() {
        return;
    }
    let d = Scratch::new("comp");
    let raw = d.path("raw");
    let r = raw.to_str().expect("utf-8");
    run("qemu-img", &["create", "-q", "-f", "raw", r, "4M"]);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 64k",
            "-c",
            "write -P 0x22 128k 100k",
            "-c",
            "write -P 0x33 1M 1M",
            r,
        ],
    );
    for cs in ["512", "4096", "65536", "2097152"] {
        let p = d.path(&format!("comp{cs}"));
        let ps = p.to_str().expect("utf-8");
        run(
            "qemu-img",
            &[
                "convert",
                "-q",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &format!("cluster_size={cs}"),
                r,
                ps,
            ],
        );
        let (ours, _) = check_file(&p, None);
        assert!(ours.as_ref().expect("report").compressed_clusters > 0);
        agree(&p, &format!("comp{cs}"));
    }
    let base = d.path("comp4096");
    // Mix in uncompressed writes after the compressed ones.
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x44 2M 8k",
            base.to_str().expect("utf-8"),
        ],
    );
    assert!(exercise(&d, &base, "comp4k") >= 10);
}

#[test]
fn clean_matrix_matches_qemu() {
    if !have_qemu() {
        return;
    }
    let d = Scratch::new("matrix");
    let mut n = 0;
    for cs in [512u64, 4096, 65536, 2 << 20] {
        for bits in [1u32, 2, 8, 16, 32, 64] {
            for compat in ["0.10", "1.1"] {
                if compat == "0.10" && bits != 16 {
                    continue;
                }
                let name = format!("m{cs}-{bits}-{compat}");
                let opts = format!("cluster_size={cs},refcount_bits={bits},compat={compat}");
                let p = make(
                    &d,
                    &name,
                    &opts,
                    "6M",
                    &[
                        "write 0 3k",
                        "write 1M 70k",
                        "write 5M 1M",
                        "write -z 3M 64k",
                    ],
                );
                agree(&p, &name);
                n += 1;
            }
        }
    }
    assert_eq!(n, 28);
}

#[test]
fn lazy_refcounts_dirty_image_is_repaired_and_marked_clean() {
    if !have_qemu() {
        return;
    }
    let d = Scratch::new("dirty");
    let base = make(
        &d,
        "base",
        "cluster_size=65536,lazy_refcounts=on",
        "4M",
        &["write 0 64k"],
    );
    // Set the dirty bit and drop a refcount, as a crash under lazy refcounts leaves it.
    let m = meta(&base);
    set_u64(&base, 72, u64_at(&base, 72) | 1);
    let (_, e) = first_data_entry(&base, &m).expect("data");
    set_refcount(&base, &m, (e & 0x00ff_ffff_ffff_fe00) >> m.cluster_bits, 0);
    agree(&base, "dirty");
    let ours = d.path("ours");
    copy(&base, &ours);
    let (r, _) = check_file(&ours, Some(Repair::All));
    let r = r.expect("report");
    assert_eq!(
        (r.corruptions, r.leaks, r.check_errors),
        (0, 0, 0),
        "{r:#?}"
    );
    assert_eq!(u64_at(&ours, 72) & 3, 0, "dirty/corrupt bits cleared");
    repair_like_qemu(&d, &base, Repair::All, "dirty");
}

#[test]
fn bitmaps_are_counted() {
    if !have_qemu() {
        return;
    }
    let d = Scratch::new("bitmaps");
    let base = make(&d, "base", "cluster_size=65536", "64M", &["write 0 64k"]);
    let b = base.to_str().expect("utf-8");
    let out = std::process::Command::new("qemu-img")
        .args(["bitmap", "--add", b, "b0"])
        .output()
        .expect("qemu-img");
    if !out.status.success() {
        eprintln!("skipping: qemu-img bitmap unavailable");
        return;
    }
    run("qemu-img", &["bitmap", "--add", "-g", "512", b, "b1"]);
    run("qemu-io", &["-f", "qcow2", "-c", "write 1M 64k", b]);
    agree(&base, "bitmaps");
    // Without our counting of the directory and tables these would all be leaks.
    let (r, _) = check_file(&base, None);
    assert_eq!(r.expect("report").leaks, 0);
}

#[test]
fn messages_read_like_qemu() {
    if !have_qemu() {
        return;
    }
    let d = Scratch::new("msgs");
    let base = make(
        &d,
        "base",
        "cluster_size=65536",
        "10M",
        &["write 0 128k", "write 1M 64k"],
    );
    let m = meta(&base);
    // Raise the refcount of the data cluster at guest 1M (host cluster 7).
    let c = 7;
    assert_eq!(get_refcount(&base, &m, c), 1);
    set_refcount(&base, &m, c, 2);
    let (r, _) = check_file(&base, None);
    let r = r.expect("report");
    assert_eq!(
        r.messages,
        vec![
            "Leaked cluster 7 refcount=2 reference=1".to_string(),
            "ERROR OFLAG_COPIED data cluster: l2_entry=8000000000070000 refcount=2".to_string(),
        ]
    );
    let q = qemu_check(&base, None);
    assert_eq!(q.stderr.lines().collect::<Vec<_>>(), r.messages);
}

#[test]
fn rebuild_with_a_reftable_of_several_clusters() {
    if !have_qemu() {
        return;
    }
    // 512-byte clusters with 16-bit refcounts: a refblock covers 128 KiB and a reftable
    // cluster 64 refblocks (8 MiB); 9 MiB of data needs a reftable of two clusters.
    let d = Scratch::new("bigrt");
    let base = make(&d, "base", "cluster_size=512", "16M", &["write -P 1 0 9M"]);
    let m = meta(&base);
    assert!(m.reftable_entries > 64, "qemu grew the reftable: {m:?}");
    let p = d.path("zero");
    copy(&base, &p);
    assert!(zero_refcount(&p, &m));
    agree(&p, "bigrt.zero_refcount");
    repair_like_qemu(&d, &p, Repair::All, "bigrt.zero_refcount");
    let ours = d.path("bigrt.zero_refcount.ours-all");
    let after = meta(&ours);
    assert!(
        after.reftable_offset != m.reftable_offset && after.reftable_entries > 64,
        "{after:?}"
    );
}

/// A small xorshift generator for the mutation tests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Random byte mutations of qemu-made images (snapshots, compressed clusters, bitmaps,
/// v2, 2 MiB clusters with 1-bit refcounts): our check and repairs must agree with
/// qemu-img's on every copy (set QCOW2_CHECK_FUZZ_ROUNDS for a longer run).
#[test]
fn mutated_images_agree_with_qemu() {
    if !have_qemu() {
        return;
    }
    let d = Scratch::new("mutate");
    let snap = make(
        &d,
        "snap",
        "cluster_size=65536",
        "4M",
        &["write 0 128k", "write 1M 64k"],
    );
    let sp = snap.to_str().expect("utf-8");
    run("qemu-img", &["snapshot", "-c", "s1", sp]);
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 3 64k 64k", sp]);
    let v2 = make(
        &d,
        "v2",
        "compat=0.10,cluster_size=4096",
        "4M",
        &["write 0 64k", "write 2M 16k"],
    );
    run(
        "qemu-img",
        &["snapshot", "-c", "s", v2.to_str().expect("utf-8")],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write 8k 8k",
            v2.to_str().expect("utf-8"),
        ],
    );
    let big = make(
        &d,
        "big",
        "cluster_size=2M,refcount_bits=1",
        "16M",
        &["write 0 64k", "write 6M 3M"],
    );
    let r64 = make(
        &d,
        "r64",
        "cluster_size=4096,refcount_bits=64",
        "4M",
        &["write 0 64k", "write -z 1M 64k"],
    );
    run(
        "qemu-img",
        &["snapshot", "-c", "s", r64.to_str().expect("utf-8")],
    );
    let small = make(
        &d,
        "small",
        "cluster_size=512",
        "1M",
        &["write 0 8k", "write 300k 4k"],
    );
    let raw = d.path("raw");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "raw",
            raw.to_str().expect("utf-8"),
            "1M",
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 200k",
            raw.to_str().expect("utf-8"),
        ],
    );
    let comp = d.path("comp");
    let cp = comp.to_str().expect("utf-8");
    run(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            raw.to_str().expect("utf-8"),
            cp,
        ],
    );
    let mut bases = vec![snap, v2, big, r64, small, comp];
    let bm = make(&d, "bm", "cluster_size=4096", "4M", &["write 0 64k"]);
    let bmp = bm.to_str().expect("utf-8");
    if std::process::Command::new("qemu-img")
        .args(["bitmap", "--add", bmp, "b0"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        bases.push(bm);
    }
    let rounds: u64 = std::env::var("QCOW2_CHECK_FUZZ_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    // To replay round N: QCOW2_CHECK_FUZZ_FROM=N QCOW2_CHECK_FUZZ_ROUNDS=N+1, and
    // QCOW2_CHECK_FUZZ_KEEP=path keeps the mutated image there.
    let from: u64 = std::env::var("QCOW2_CHECK_FUZZ_FROM")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let keep = std::env::var_os("QCOW2_CHECK_FUZZ_KEEP");
    let seed = std::env::var("QCOW2_CHECK_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok());
    let mut rng = Rng(seed.unwrap_or(0x2545_f491_4f6c_dd1d));
    for round in 0..rounds {
        let base = &bases[round as usize % bases.len()];
        let p = d.path(&format!("m{round}"));
        copy(base, &p);
        let m = meta(&p);
        let mut img = std::fs::read(&p).expect("read");
        let end = (img.len() as u64).min(16 * m.cluster_size) as usize;
        let start = if rng.next() % 4 == 0 {
            0
        } else {
            m.cluster_size as usize
        };
        for _ in 0..1 + rng.next() % 4 {
            let at = start + (rng.next() as usize) % (end - start);
            match rng.next() % 3 {
                0 => img[at] ^= 1 << (rng.next() % 8),
                1 => img[at] = rng.next() as u8,
                _ => img[at] = 0,
            }
        }
        std::fs::write(&p, &img).expect("write");
        let mode = [None, Some(Repair::Leaks), Some(Repair::All)][(rng.next() % 3) as usize];
        if round < from {
            let _ = std::fs::remove_file(&p);
            continue;
        }
        if let Some(keep) = &keep {
            std::fs::copy(&p, keep).expect("keep the mutated image");
        }
        let what = format!("round {round} ({}) {mode:?}", base.display());
        let q = match mode {
            None => qemu_check(&p, None),
            Some(mode) => {
                let twin = d.path(&format!("m{round}.qemu"));
                copy(&p, &twin);
                let q = qemu_check(
                    &twin,
                    Some(if mode == Repair::All { "all" } else { "leaks" }),
                );
                let _ = std::fs::remove_file(&twin);
                q
            }
        };
        let (ours, _) = check_file(&p, mode);
        let _ = std::fs::remove_file(&p);
        // The one intended difference: a refblock pointer so far past the end of the file
        // that its IMRT would not fit in our budget. QEMU grows the file (sparse, to
        // terabytes) when the file system lets it; we rebuild the refcounts instead.
        let refused = "ERROR could not resize image: File too large";
        let ours_refused = ours
            .as_ref()
            .map_or(0, |r| r.messages.iter().filter(|m| *m == refused).count());
        if ours_refused > q.stderr.lines().filter(|l| *l == refused).count() {
            continue;
        }
        assert_same(&ours, &q, &what);
    }
}

#[test]
fn extended_l2_entries() {
    if !have_qemu() {
        return;
    }
    let d = Scratch::new("extl2");
    let base = make(
        &d,
        "base",
        "extended_l2=on,cluster_size=65536",
        "10M",
        &[
            "write 0 4k",
            "write 1M 64k",
            "write -z 2M 8k",
            "write 70k 2k",
            "write 5M 128k",
        ],
    );
    assert!(meta(&base).extended);
    assert!(exercise(&d, &base, "extl2") >= 10);
}

#[test]
fn luks_header_is_counted() {
    if !have_qemu() {
        return;
    }
    let d = Scratch::new("luks");
    let p = d.path("luks");
    let ps = p.to_str().expect("utf-8");
    let secret = "secret,id=sec0,data=123456";
    let opts = "encrypt.format=luks,encrypt.key-secret=sec0,cluster_size=65536";
    run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "--object", secret, "-o", opts, ps, "10M",
        ],
    );
    let image_opts = format!("driver=qcow2,file.filename={ps},encrypt.key-secret=sec0");
    run(
        "qemu-io",
        &[
            "--object",
            secret,
            "--image-opts",
            "-c",
            "write 0 64k",
            "-c",
            "write 3M 8k",
            &image_opts,
        ],
    );
    let q = qemu_check_args(&[
        "check",
        "--output=json",
        "--object",
        secret,
        "--image-opts",
        &image_opts,
    ]);
    // The metadata is not encrypted: no key needed to check it.
    let (ours, _) = check_file(&p, None);
    assert_same(&ours, &q, "luks");
    // Without the LUKS header in the IMRT its clusters would be leaks.
    assert_eq!(ours.expect("report").leaks, 0);
    // A leak on an encrypted image, repaired by both.
    let m = meta(&p);
    assert!(leak_raise(&p, &m));
    let twin = d.path("twin");
    copy(&p, &twin);
    let (ours, _) = check_file(&p, Some(Repair::Leaks));
    let tw = twin.to_str().expect("utf-8");
    let twin_opts = format!("driver=qcow2,file.filename={tw},encrypt.key-secret=sec0");
    let q = qemu_check_args(&[
        "check",
        "--output=json",
        "-r",
        "leaks",
        "--object",
        secret,
        "--image-opts",
        &twin_opts,
    ]);
    assert_same(&ours, &q, "luks -r leaks");
}
