//! `check` agrees with qemu-img's report and exit status.

mod common;

use std::os::unix::fs::FileExt;

use common::{assert_json_eq, have_qemu, json, stdout, Scratch};

/// Runs `check` with `extra` args through both tools on copies of `file`; compares exit
/// status, stdout (human) or parsed JSON, and returns the exit status.
fn same_check(sc: &Scratch, file: &str, extra: &[&str]) -> Option<i32> {
    let copy = |to: &str| std::fs::copy(sc.path(file), sc.path(to)).unwrap();
    copy("ours-copy.qcow2");
    copy("qemu-copy.qcow2");
    for output in ["human", "json"] {
        let mut a = vec!["check", "--output", output];
        a.extend_from_slice(extra);
        let mut ours_args = a.clone();
        ours_args.push("ours-copy.qcow2");
        let mut qemu_args = a.clone();
        qemu_args.push("qemu-copy.qcow2");
        let ours = sc.ours(&ours_args);
        let theirs = sc.qemu_img(&qemu_args);
        assert_eq!(
            ours.status.code(),
            theirs.status.code(),
            "check {extra:?} {file}: ours {}\n{}\nqemu {}",
            stdout(&ours),
            common::stderr(&ours),
            stdout(&theirs)
        );
        let rename = |m: String| m.replace("qemu-copy", "ours-copy");
        assert_eq!(
            common::messages(&ours),
            rename(common::messages(&theirs)),
            "check {extra:?} {file}: detail lines"
        );
        if output == "json" && stdout(&theirs).is_empty() {
            // A check that could not complete prints no report.
            assert_eq!(stdout(&ours), "", "check {extra:?} {file}: a report");
        } else if output == "json" {
            let mut o = json(&stdout(&ours));
            let t = json(&stdout(&theirs));
            o["filename"] = t["filename"].clone();
            assert_json_eq(&o, &t, &format!("check --output=json {extra:?} {file}"));
        } else {
            assert_eq!(stdout(&ours), stdout(&theirs), "check {extra:?} {file}");
        }
        copy("ours-copy.qcow2");
        copy("qemu-copy.qcow2");
    }
    sc.qemu_img(&["check", file]).status.code()
}

#[test]
fn clean_images_check_like_qemu() {
    if !have_qemu() {
        return;
    }
    for opts in [
        "cluster_size=64k",
        "compat=0.10",
        "cluster_size=4k",
        "refcount_bits=1",
        "preallocation=metadata",
    ] {
        let sc = Scratch::new();
        sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", opts, "a.qcow2", "16M"]);
        same_check(&sc, "a.qcow2", &[]);
        sc.qemu_io_ok(&[
            "-c",
            "write 0 200k",
            "-c",
            "write -z 1M 64k",
            "-c",
            "discard 64k 64k",
            "a.qcow2",
        ]);
        assert_eq!(same_check(&sc, "a.qcow2", &[]), Some(0));
    }
}

/// An image with a leaked cluster (refcount set on an unused cluster inside the file).
fn leaky(sc: &Scratch) {
    sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "leak.qcow2", "16M"]);
    sc.qemu_io_ok(&["-c", "write 0 64k", "-c", "write 1M 64k", "leak.qcow2"]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(sc.path("leak.qcow2"))
        .unwrap();
    let len = f.metadata().unwrap().len();
    // Grow the file by two clusters and count the first of them: a leak.
    f.set_len(len + 2 * 65536).unwrap();
    let cluster = len / 65536;
    f.write_all_at(&1u16.to_be_bytes(), 0x20000 + 2 * cluster)
        .unwrap();
}

#[test]
fn leaks_check_and_repair_like_qemu() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    leaky(&sc);
    assert_eq!(same_check(&sc, "leak.qcow2", &[]), Some(3));
    same_check(&sc, "leak.qcow2", &["-r", "leaks"]);
    same_check(&sc, "leak.qcow2", &["-r", "all"]);
}

#[test]
fn corruption_checks_like_qemu() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "bad.qcow2", "16M"]);
    sc.qemu_io_ok(&["-c", "write 0 64k", "bad.qcow2"]);
    // Refcount 0 for the L2 table (cluster 4), 2 for the data cluster (cluster 5).
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(sc.path("bad.qcow2"))
        .unwrap();
    f.write_all_at(&0u16.to_be_bytes(), 0x20000 + 2 * 4)
        .unwrap();
    f.write_all_at(&2u16.to_be_bytes(), 0x20000 + 2 * 5)
        .unwrap();
    drop(f);
    assert_eq!(same_check(&sc, "bad.qcow2", &[]), Some(2));
    same_check(&sc, "bad.qcow2", &["-r", "all"]);
}

/// A lazy-refcounts image whose writer died: the dirty bit is set and refcounts are stale.
/// Check mode opens it anyway; `-r all` rebuilds the refcounts and clears the bit, after
/// which it opens writable.
#[test]
fn dirty_images_check_and_repair_like_qemu() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    sc.qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        "d.qcow2",
        "16M",
    ]);
    // qemu-io aborts on purpose; its exit status is the signal.
    sc.qemu_io(&["-c", "write -P 7 0 128k", "-c", "abort", "d.qcow2"]);
    let info = json(&sc.ours_ok(&["info", "--output=json", "d.qcow2"]));
    assert_eq!(
        info["dirty-flag"], true,
        "qemu-io's abort leaves the image dirty"
    );
    assert_eq!(same_check(&sc, "d.qcow2", &[]), Some(2));
    same_check(&sc, "d.qcow2", &["-r", "all"]);
    sc.ours_ok(&["check", "-r", "all", "d.qcow2"]);
    let info = json(&sc.ours_ok(&["info", "--output=json", "d.qcow2"]));
    assert_eq!(info["dirty-flag"], false, "a repair clears the dirty bit");
    sc.ours_ok(&[
        "io",
        "-c",
        "write -P 9 1M 64k",
        "-c",
        "read -P 7 0 128k",
        "d.qcow2",
    ]);
    assert_eq!(sc.qemu_img(&["check", "d.qcow2"]).status.code(), Some(0));
}

/// An empty refcount table (refcount_table_clusters = 0): only check mode opens it, and
/// `-r all` rebuilds the refcount structure, as qemu-img does.
#[test]
fn empty_refcount_table_checks_and_rebuilds_like_qemu() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "z.qcow2", "8M"]);
    sc.qemu_io_ok(&["-c", "write -P 5 0 64k", "z.qcow2"]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(sc.path("z.qcow2"))
        .unwrap();
    f.write_all_at(&0u32.to_be_bytes(), 56).unwrap();
    drop(f);
    assert_eq!(same_check(&sc, "z.qcow2", &[]), Some(2));
    same_check(&sc, "z.qcow2", &["-r", "all"]);
    sc.ours_ok(&["check", "-r", "all", "z.qcow2"]);
    sc.ours_ok(&[
        "io",
        "-c",
        "read -P 5 0 64k",
        "-c",
        "write -P 6 1M 64k",
        "z.qcow2",
    ]);
    assert_eq!(sc.qemu_img(&["check", "z.qcow2"]).status.code(), Some(0));
}

/// Refcount 0 under a used cluster: `-r leaks` cannot repair it, and the check fails
/// without a report ("Check failed: Input/output error"), as qemu-img's does; `-r all`
/// rebuilds.
#[test]
fn failed_checks_print_no_report_like_qemu() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "z.qcow2", "16M"]);
    sc.qemu_io_ok(&["-c", "write -P 3 0 64k", "z.qcow2"]);
    // Refcount 0 for the data cluster (cluster 5).
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(sc.path("z.qcow2"))
        .unwrap();
    f.write_all_at(&0u16.to_be_bytes(), 0x20000 + 2 * 5)
        .unwrap();
    drop(f);
    assert_eq!(same_check(&sc, "z.qcow2", &["-r", "leaks"]), Some(2));
    same_check(&sc, "z.qcow2", &["-r", "all"]);
    // A refcount table entry that is not cluster aligned: the check completes with check
    // errors (a report, exit 1); the repair fails without one.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(sc.path("z.qcow2"))
        .unwrap();
    f.write_all_at(&0x20200u64.to_be_bytes(), 0x10000).unwrap();
    drop(f);
    assert_eq!(same_check(&sc, "z.qcow2", &[]), Some(1));
    same_check(&sc, "z.qcow2", &["-r", "all"]);
}

/// Snapshot table damage that only the check reads (QEMU's check mode does not load the
/// table at open): too much extra data fails the check and `-r all` cuts it; a v3 entry
/// with less than 16 bytes of extra data is rewritten.
#[test]
fn snapshot_tables_check_and_repair_like_qemu() {
    if !have_qemu() {
        return;
    }
    for extra in [2000u32, 8] {
        let sc = Scratch::new();
        sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "s.qcow2", "16M"]);
        sc.qemu_io_ok(&["-c", "write -P 1 0 128k", "s.qcow2"]);
        sc.qemu_img_ok(&["snapshot", "-c", "s1", "s.qcow2"]);
        sc.qemu_io_ok(&["-c", "write -P 2 0 64k", "s.qcow2"]);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(sc.path("s.qcow2"))
            .unwrap();
        let mut table = [0u8; 8];
        f.read_exact_at(&mut table, 64).unwrap();
        let table = u64::from_be_bytes(table);
        f.write_all_at(&extra.to_be_bytes(), table + 36).unwrap();
        drop(f);
        let plain = same_check(&sc, "s.qcow2", &[]);
        assert_eq!(plain, Some(if extra > 1024 { 1 } else { 2 }));
        same_check(&sc, "s.qcow2", &["-r", "leaks"]);
        same_check(&sc, "s.qcow2", &["-r", "all"]);
        sc.ours_ok(&["check", "-r", "all", "s.qcow2"]);
        assert_eq!(sc.qemu_img(&["check", "s.qcow2"]).status.code(), Some(0));
        sc.ours_ok(&[
            "io",
            "-c",
            "read -P 2 0 64k",
            "-c",
            "read -P 1 64k 64k",
            "s.qcow2",
        ]);
    }
}

#[test]
fn raw_images_have_no_check() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    sc.qemu_img_ok(&["create", "-q", "-f", "raw", "a.raw", "1M"]);
    for args in [
        &["check", "a.raw"][..],
        &["check", "-f", "raw", "a.raw"],
        &["check", "--output=json", "a.raw"],
    ] {
        let ours = sc.ours(args);
        let theirs = sc.qemu_img(args);
        assert_eq!(ours.status.code(), Some(63));
        assert_eq!(ours.status.code(), theirs.status.code());
        assert_eq!(
            common::stderr(&ours),
            "qcow2: This image format does not support checks\n"
        );
    }
    assert_eq!(sc.ours(&["check", "missing"]).status.code(), Some(1));
}
