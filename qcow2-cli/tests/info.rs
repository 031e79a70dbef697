//! `info` agrees with qemu-img's, field by field, on images qemu made and wrote and on images
//! we made.

mod common;

use common::{assert_json_eq, have_qemu, json, strip_key, Scratch};

/// Compares `info --output=json` (ignoring `actual-size`) and the human form.
fn same_info(sc: &Scratch, file: &str, extra: &[&str]) {
    let mut args = vec!["info", "--output=json"];
    args.extend_from_slice(extra);
    args.push(file);
    let mut ours = json(&sc.ours_ok(&args));
    let mut theirs = json(&sc.qemu_img_ok(&args));
    strip_key(&mut ours, "actual-size");
    strip_key(&mut theirs, "actual-size");
    assert_json_eq(&ours, &theirs, &format!("info --output=json {file}"));

    // Same file, same moment: the human form (disk sizes included) is byte for byte equal.
    let mut args = vec!["info"];
    args.extend_from_slice(extra);
    args.push(file);
    assert_eq!(sc.ours_ok(&args), sc.qemu_img_ok(&args), "info {file}");
}

#[test]
fn info_matches_qemu_on_qemu_images() {
    if !have_qemu() {
        return;
    }
    let cases: &[(&str, &str)] = &[
        ("c512.qcow2", "cluster_size=512"),
        ("c4k.qcow2", "cluster_size=4k"),
        ("c64k.qcow2", "cluster_size=64k"),
        ("c2m.qcow2", "cluster_size=2M"),
        ("v2.qcow2", "compat=0.10"),
        ("v2c4k.qcow2", "compat=0.10,cluster_size=4k"),
        ("lazy.qcow2", "lazy_refcounts=on"),
        ("rb1.qcow2", "refcount_bits=1"),
        ("rb64.qcow2", "refcount_bits=64"),
        ("meta.qcow2", "preallocation=metadata"),
        ("ext.qcow2", "extended_l2=on"),
        (
            "ext16k.qcow2",
            "extended_l2=on,cluster_size=16k,preallocation=metadata",
        ),
    ];
    for (name, opts) in cases {
        let sc = Scratch::new();
        sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", opts, name, "24M"]);
        same_info(&sc, name, &[]);
        sc.qemu_io_ok(&[
            "-c",
            "write -P 0xab 0 100k",
            "-c",
            "write -z 1M 64k",
            "-c",
            "write 5M 4k",
            name,
        ]);
        same_info(&sc, name, &[]);
        same_info(&sc, name, &["-f", "qcow2"]);
    }
}

#[test]
fn info_matches_qemu_with_snapshots_and_backing_names() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "base.qcow2", "16M"]);
    sc.qemu_io_ok(&["-c", "write 0 64k", "base.qcow2"]);
    sc.qemu_img_ok(&["snapshot", "-c", "first", "base.qcow2"]);
    sc.qemu_img_ok(&[
        "snapshot",
        "-c",
        "a-much-longer-snapshot-name",
        "base.qcow2",
    ]);
    same_info(&sc, "base.qcow2", &[]);
    sc.qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    same_info(&sc, "top.qcow2", &["-U"]);
    let abs = sc.path("top.qcow2");
    same_info(&sc, abs.to_str().unwrap(), &[]);
}

#[test]
fn info_matches_qemu_on_raw_files() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    std::fs::write(sc.path("odd.raw"), vec![7u8; 1000]).unwrap();
    sc.qemu_img_ok(&["create", "-q", "-f", "raw", "sparse.raw", "3M"]);
    for f in ["odd.raw", "sparse.raw"] {
        same_info(&sc, f, &[]);
        same_info(&sc, f, &["-f", "raw"]);
    }
    // A qcow2 image shown as raw, as qemu-img does when told so.
    sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "img.qcow2", "1M"]);
    same_info(&sc, "img.qcow2", &["-f", "raw"]);
}

#[test]
fn info_matches_qemu_on_our_images() {
    if !have_qemu() {
        return;
    }
    for opts in [
        "cluster_size=64k",
        "compat=0.10",
        "cluster_size=4k,refcount_bits=8",
        "lazy_refcounts=on",
    ] {
        let sc = Scratch::new();
        sc.ours_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            "ours.qcow2",
            "8M",
        ]);
        sc.ours_ok(&["io", "-c", "write -P 0x33 64k 128k", "ours.qcow2"]);
        same_info(&sc, "ours.qcow2", &[]);
    }
}

#[test]
fn info_of_a_missing_file_fails_like_qemu() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    let ours = sc.ours(&["info", "missing.qcow2"]);
    let theirs = sc.qemu_img(&["info", "missing.qcow2"]);
    assert_eq!(ours.status.code(), theirs.status.code());
    assert_eq!(common::messages(&ours), common::messages(&theirs));
}

#[test]
fn info_of_an_image_without_its_data_file_fails_like_qemu() {
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
        "data_file=img.data",
        "img.qcow2",
        "1M",
    ]);
    std::fs::remove_file(sc.path("img.data")).unwrap();
    let ours = sc.ours(&["info", "img.qcow2"]);
    let theirs = sc.qemu_img(&["info", "img.qcow2"]);
    assert_eq!(ours.status.code(), theirs.status.code());
    assert_eq!(common::messages(&ours), common::messages(&theirs));
}
