//! `amend` against qemu-img on twin images: every refcount width change, compat down and up,
//! lazy refcounts on and off, combinations and size, on images with snapshots, compressed
//! clusters, zero clusters and backing files; the same outcome (stdout, status, messages),
//! the same guest contents (snapshots too), the same `info` fields, both images clean; and
//! the refusals in qemu-img's words.

mod common;

use common::{have_qemu, json, messages, Scratch, Twins};
use serde_json::Value;

/// Fields of `qemu-img info --output=json` an amend decides (the format-specific data and
/// the sizes that are not the file's own).
fn amended_fields(sc: &Scratch, file: &str) -> Vec<Value> {
    let v = json(&sc.qemu_img_ok(&["info", "-U", "--output=json", file]));
    let data = &v["format-specific"]["data"];
    let mut out: Vec<Value> = ["compat", "lazy-refcounts", "refcount-bits", "corrupt"]
        .iter()
        .map(|k| data.get(*k).cloned().unwrap_or(Value::Null))
        .collect();
    out.push(v["virtual-size"].clone());
    out.push(v["cluster-size"].clone());
    out.push(v.get("backing-filename").cloned().unwrap_or(Value::Null));
    let names: Vec<Value> = v
        .get("snapshots")
        .and_then(Value::as_array)
        .map(|s| s.iter().map(|x| x["name"].clone()).collect())
        .unwrap_or_default();
    out.push(Value::Array(names));
    out
}

/// Asserts the twins' `file` alike after an amend: contents, every snapshot's contents,
/// the amended info fields, and `qemu-img check` clean on ours and on qemu's but for
/// COPIED flags (QEMU's downgrade leaves COPIED on clusters it expands in an L2 table a
/// snapshot shares; ours does not).
fn assert_twins_alike(tw: &Twins, file: &str, what: &str) {
    tw.assert_same_image(file, what);
    let theirs = tw.qemu.qemu_img(&["check", file]);
    let bad: Vec<String> = common::stderr(&theirs)
        .lines()
        .filter(|l| !l.contains("OFLAG_COPIED"))
        .map(String::from)
        .collect();
    assert!(bad.is_empty(), "{what}: qemu-img's image: {bad:?}");
    assert_eq!(
        amended_fields(&tw.ours, file),
        amended_fields(&tw.qemu, file),
        "{what}: info fields"
    );
    let v = json(&tw.qemu.qemu_img_ok(&["info", "-U", "--output=json", file]));
    let snaps: Vec<String> = v
        .get("snapshots")
        .and_then(Value::as_array)
        .map(|s| {
            s.iter()
                .filter_map(|x| x["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    for snap in snaps {
        let raw = format!("{snap}.raw");
        for sc in [&tw.ours, &tw.qemu] {
            sc.qemu_img_ok(&["convert", "-U", "-l", &snap, "-O", "raw", file, &raw]);
        }
        let a = std::fs::read(tw.ours.path(&raw)).unwrap();
        let b = std::fs::read(tw.qemu.path(&raw)).unwrap();
        assert!(a == b, "{what}: snapshot {snap} differs");
    }
}

/// `img.qcow2` made by qemu: `create_opts`, data, zeroes (plain and allocated), a
/// compressed cluster, a snapshot, more writes; over `base.qcow2` when `backing`.
fn setup(sc: &Scratch, create_opts: &str, backing: bool) {
    if backing {
        sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]);
        sc.qemu_io_cmds("qcow2", "base.qcow2", &["write -P 0x5 0 8M"]);
        sc.qemu_overlay("img.qcow2", "base.qcow2", "qcow2", create_opts, None);
    } else {
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !create_opts.is_empty() {
            args.extend(["-o", create_opts]);
        }
        args.extend(["img.qcow2", "8M"]);
        sc.qemu_img_ok(&args);
    }
    let v3 = !create_opts.contains("compat=0.10");
    let mut first = vec!["write -P 0x11 0 200k", "write -c -P 0x12 1M 64k"];
    if v3 {
        first.extend([
            "write -z 2M 256k",
            "write -P 0x13 3M 64k",
            "write -z 3M 64k",
        ]);
    }
    sc.qemu_io_cmds("qcow2", "img.qcow2", &first);
    sc.qemu_img_ok(&["snapshot", "-c", "snap", "img.qcow2"]);
    let mut second = vec!["write -P 0x21 64k 8k"];
    if v3 {
        second.push("write -z 5M 128k");
    }
    sc.qemu_io_cmds("qcow2", "img.qcow2", &second);
}

/// Runs `amend -o OPTS img.qcow2` with both tools (same outcome), then compares the twins.
/// Returns whether it succeeded.
fn amend_both(tw: &Twins, opts: &str, what: &str) -> bool {
    let done = tw.run_both(&["amend", "-o", opts, "img.qcow2"]);
    assert_twins_alike(tw, "img.qcow2", &format!("{what}: amend -o {opts}"));
    done
}

#[test]
fn amend_every_refcount_width_like_qemu() {
    if !have_qemu() {
        return;
    }
    // From 16 bits to every width and back; 1 bit is refused (the snapshot shares
    // clusters) with qemu-img's message, leaving the image as it was.
    for bits in [1, 2, 4, 8, 32, 64] {
        let tw = Twins::new(|sc| setup(sc, "cluster_size=4k", false));
        let opts = format!("refcount_bits={bits}");
        let done = amend_both(&tw, &opts, "from 16");
        // (A host cluster of 16 compressed clusters, shared with the snapshot, has
        // refcount 32.)
        assert_eq!(done, bits >= 8, "refcount_bits={bits}");
        if done {
            assert!(amend_both(&tw, "refcount_bits=16", "back"));
        }
    }
    // Without a snapshot every cluster fits in one bit: 64 -> 1 -> 64.
    let tw = Twins::new(|sc| {
        sc.qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=64",
            "img.qcow2",
            "4M",
        ]);
        sc.qemu_io_cmds(
            "qcow2",
            "img.qcow2",
            &["write -P 1 0 1M", "write -c 2M 64k"],
        );
    });
    assert!(amend_both(&tw, "refcount_bits=1", "64 to 1"));
    assert!(amend_both(&tw, "refcount_bits=64", "1 to 64"));
}

#[test]
fn amend_compat_down_and_up_like_qemu() {
    if !have_qemu() {
        return;
    }
    for (opts, backing) in [
        ("cluster_size=4k", false),
        ("", true),
        ("cluster_size=512", true),
        ("lazy_refcounts=on", false),
    ] {
        let what = format!("create -o {opts:?}, backing {backing}");
        let tw = Twins::new(|sc| setup(sc, opts, backing));
        assert!(amend_both(&tw, "compat=0.10", &what));
        assert!(amend_both(&tw, "compat=1.1", &what));
        assert!(amend_both(&tw, "compat=v2", &what));
        assert!(amend_both(&tw, "compat=v3,lazy_refcounts=on", &what));
    }
    // Header bytes of a downgrade and an upgrade are qemu's, byte for byte.
    let tw = Twins::new(|sc| setup(sc, "", true));
    assert!(tw.run_both(&["amend", "-o", "compat=0.10", "img.qcow2"]));
    let head = |sc: &Scratch| std::fs::read(sc.path("img.qcow2")).unwrap()[..512].to_vec();
    let (a, b) = (head(&tw.ours), head(&tw.qemu));
    // (Only where the refcount table went may differ.)
    assert_eq!(a[..48], b[..48], "v2 header");
    assert_eq!(a[60..], b[60..], "v2 header and extensions");
    assert!(tw.run_both(&["amend", "-o", "compat=1.1", "img.qcow2"]));
    let (a, b) = (head(&tw.ours), head(&tw.qemu));
    assert_eq!(a[60..], b[60..], "v3 header and extensions");
}

#[test]
fn amend_lazy_refcounts_and_combinations_like_qemu() {
    if !have_qemu() {
        return;
    }
    let tw = Twins::new(|sc| setup(sc, "cluster_size=16k", false));
    for opts in [
        "lazy_refcounts=on",
        "lazy_refcounts=off",
        "lazy_refcounts=on,refcount_bits=8",
        "refcount_bits=16,lazy_refcounts=off,compat=0.10",
        "compat=1.1,refcount_bits=32,lazy_refcounts=on",
        "size=16M,refcount_bits=16",
        "lazy_refcounts=off,compat=0.10,size=8M",
        "compat=1.1,compat=0.10",
    ] {
        assert!(amend_both(&tw, opts, "combinations"), "{opts}");
    }
}

#[test]
fn amend_refusals_like_qemu() {
    if !have_qemu() {
        return;
    }
    let cases: &[(&str, &str)] = &[
        ("", "cluster_size=4k"),
        ("", "preallocation=metadata"),
        ("", "extended_l2=on"),
        ("", "compression_type=zstd"),
        ("", "encrypt.format=luks"),
        ("", "foo=bar,compat=0.9"),
        ("", "compat=0.9,refcount_bits=3"),
        ("", "compat="),
        ("", "refcount_bits=3"),
        ("", "refcount_bits=128"),
        ("", "refcount_bits="),
        ("", "lazy_refcounts=maybe,compat=0.9"),
        ("", "backing_file=x"),
        ("", "backing_fmt=raw"),
        ("", "data_file=x"),
        ("", "data_file_raw=on"),
        ("", "encrypt.new-secret=x"),
        ("", "size=abc"),
        ("", "size=1000"),
        ("", "compat=0.10,lazy_refcounts=on"),
        ("", "compat=0.10,refcount_bits=8"),
        ("compat=0.10", "lazy_refcounts=on"),
        ("compat=0.10", "refcount_bits=8"),
        ("refcount_bits=8", "compat=0.10"),
        ("extended_l2=on", "compat=v2"),
        ("data_file=data.raw", "compat=v2"),
    ];
    for &(create, amend) in cases {
        let tw = Twins::new(|sc| {
            let mut args = vec!["create", "-q", "-f", "qcow2"];
            if !create.is_empty() {
                args.extend(["-o", create]);
            }
            args.extend(["img.qcow2", "4M"]);
            sc.qemu_img_ok(&args);
            sc.qemu_io_cmds("qcow2", "img.qcow2", &["write -P 3 0 64k"]);
        });
        let done = tw.run_both(&["amend", "-o", amend, "img.qcow2"]);
        assert!(!done, "amend -o {amend} of create -o {create} succeeded");
        tw.assert_same_image("img.qcow2", amend);
        assert_eq!(
            amended_fields(&tw.ours, "img.qcow2"),
            amended_fields(&tw.qemu, "img.qcow2"),
            "{amend}: unchanged alike"
        );
    }
    // A snapshot of another size, a refcount too wide for the new width, a zstd image
    // with compressed clusters.
    let tw = Twins::new(|sc| {
        setup(sc, "compression_type=zstd", false);
        sc.qemu_img_ok(&["resize", "-q", "img.qcow2", "16M"]);
    });
    for opts in [
        "compat=0.10",
        "refcount_bits=1",
        "compat=1.1,refcount_bits=1",
    ] {
        assert!(!tw.run_both(&["amend", "-o", opts, "img.qcow2"]), "{opts}");
        assert_twins_alike(&tw, "img.qcow2", opts);
    }
    let tw = Twins::new(|sc| setup(sc, "compression_type=zstd", false));
    assert!(!tw.run_both(&["amend", "-o", "compat=0.10", "img.qcow2"]));
    // Usage: no options, no file, a raw image, help.
    let tw = Twins::new(|sc| {
        sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "img.qcow2", "1M"]);
        sc.qemu_img_ok(&["create", "-q", "-f", "raw", "disk.raw", "1M"]);
    });
    for args in [
        "amend img.qcow2",
        "amend -o compat=v2",
        "amend -f raw -o compat=v2 disk.raw",
        "amend -f qcow2 -o compat=v2 disk.raw",
        "amend -o compat=v2 missing.qcow2",
        "amend -o help img.qcow2",
    ] {
        let argv: Vec<&str> = args.split(' ').collect();
        let (ours, theirs) = (tw.ours.ours(&argv), tw.qemu.qemu_img(&argv));
        assert_eq!(ours.status.code(), theirs.status.code(), "{args}");
        assert_eq!(
            messages(&ours).replace("qcow2 amend", "qemu-img amend"),
            messages(&theirs),
            "{args}"
        );
    }
}

#[test]
fn amended_images_cross_over() {
    if !have_qemu() {
        return;
    }
    // Amended by qemu-img, read and amended back by us; amended by us, by qemu-img.
    let tw = Twins::new(|sc| setup(sc, "", true));
    for (opts, back) in [
        ("compat=0.10", "compat=1.1"),
        ("refcount_bits=2", "refcount_bits=64"),
        ("lazy_refcounts=on", "lazy_refcounts=off"),
    ] {
        tw.qemu.qemu_img_ok(&["amend", "-o", opts, "img.qcow2"]);
        tw.ours.ours_ok(&["amend", "-o", opts, "img.qcow2"]);
        tw.ours.ours_ok(&["check", "img.qcow2"]);
        // Our check of qemu's image says what qemu-img's says (COPIED flags QEMU's
        // downgrade leaves on expanded clusters a snapshot shares, if any).
        let check = ["check", "img.qcow2"];
        let (ours, theirs) = (tw.qemu.ours(&check), tw.qemu.qemu_img(&check));
        common::assert_same_outcome(&ours, &theirs, opts);
        tw.qemu.ours_ok(&["amend", "-o", back, "img.qcow2"]);
        tw.ours.qemu_img_ok(&["amend", "-o", back, "img.qcow2"]);
        assert_twins_alike(&tw, "img.qcow2", opts);
        tw.ours.ours_ok(&["check", "img.qcow2"]);
    }
}

#[test]
fn amend_progress_ends_at_100() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    setup(&sc, "", false);
    let out = sc.ours_ok(&["amend", "-p", "-o", "refcount_bits=8", "img.qcow2"]);
    assert!(out.starts_with("    (0.00/100%)\r"), "{out:?}");
    assert!(out.ends_with("    (100.00/100%)\r\n"), "{out:?}");
    let quiet = sc.ours_ok(&["amend", "-p", "-q", "-o", "refcount_bits=16", "img.qcow2"]);
    assert_eq!(quiet, "");
}
