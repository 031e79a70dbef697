//! `create` prints what qemu-img prints for the same options, fails where it fails, and makes
//! images qemu-img accepts.

mod common;

use common::{have_qemu, stderr, stdout, Scratch};

const CASES: &[&[&str]] = &[
    &["-f", "qcow2", "a.qcow2", "64M"],
    &["-f", "qcow2", "-o", "compat=0.10", "a.qcow2", "64M"],
    &["-f", "qcow2", "-o", "compat=v2", "a.qcow2", "1G"],
    &["-f", "qcow2", "-o", "compat=1.1", "a.qcow2", "1G"],
    &[
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        "a.qcow2",
        "64M",
    ],
    &[
        "-f",
        "qcow2",
        "-o",
        "preallocation=full,cluster_size=4k",
        "a.qcow2",
        "4M",
    ],
    &[
        "-f",
        "qcow2",
        "-o",
        "preallocation=falloc",
        "a.qcow2",
        "16M",
    ],
    &[
        "-f",
        "qcow2",
        "-o",
        "preallocation=full,compat=0.10",
        "a.qcow2",
        "1M",
    ],
    &[
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on,refcount_bits=64",
        "a.qcow2",
        "64M",
    ],
    &["-f", "qcow2", "-o", "cluster_size=2M", "a.qcow2", "10G"],
    &["-f", "qcow2", "-o", "extended_l2=on", "a.qcow2", "64M"],
    &[
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=16k,preallocation=metadata",
        "a.qcow2",
        "5M",
    ],
    &[
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=2M",
        "a.qcow2",
        "100G",
    ],
    &[
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "-o",
        "refcount_bits=1",
        "a.qcow2",
        "100M",
    ],
    &["-f", "qcow2", "a.qcow2", "1000"],
    &["-f", "qcow2", "a.qcow2", "1.5M"],
    &["-f", "qcow2", "-o", "size=2M", "a.qcow2"],
    &["-q", "-f", "qcow2", "a.qcow2", "1M"],
    &["-f", "raw", "r.raw", "1M"],
    &["r.raw", "1M"],
    &["-f", "raw", "-o", "preallocation=full", "r.raw", "1M"],
    &["-f", "raw", "-o", "preallocation=falloc,size=3M", "r.raw"],
    &["-f", "raw", "r.raw", "1000"],
    // Failures, before and after the Formatting line.
    &["-f", "qcow2", "a.qcow2"],
    &["-f", "qcow2", "-o", "foo=bar", "a.qcow2", "1M"],
    &["-f", "qcow2", "-o", "cluster_size=3000", "a.qcow2", "1M"],
    &[
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=8k",
        "a.qcow2",
        "1M",
    ],
    &[
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,compat=0.10",
        "a.qcow2",
        "1M",
    ],
    &["-f", "qcow2", "a.qcow2", "1X"],
    &[
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,lazy_refcounts=on",
        "a.qcow2",
        "1M",
    ],
    &["-f", "qcow2", "-o", "refcount_bits=3", "a.qcow2", "1M"],
    &[
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,refcount_bits=8",
        "a.qcow2",
        "1M",
    ],
    &["-f", "qcow2", "-o", "lazy_refcounts=maybe", "a.qcow2", "1M"],
    &["-f", "qcow2", "-o", "preallocation=bogus", "a.qcow2", "1M"],
    &["-f", "qcow2", "-o", "size=1M", "a.qcow2", "1M"],
    &["-f", "raw", "-o", "preallocation=metadata", "r.raw", "1M"],
    &["-f", "qcow2", "-o", "cluster_size=512", "a.qcow2", "1P"],
    &[
        "-f",
        "qcow2",
        "-o",
        "compression_type=zstd",
        "a.qcow2",
        "1M",
    ],
    &[
        "-f",
        "qcow2",
        "-o",
        "compression_type=zlib",
        "a.qcow2",
        "1M",
    ],
    &[
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,compression_type=zstd",
        "a.qcow2",
        "1M",
    ],
    &["-f", "qcow2", "-o", "compression_type=lz4", "a.qcow2", "1M"],
    &[
        "-f",
        "qcow2",
        "-o",
        "data_file=d.raw,data_file_raw=on",
        "a.qcow2",
        "1M",
    ],
    &[
        "-f",
        "qcow2",
        "-o",
        "data_file=d.raw,cluster_size=4096",
        "a.qcow2",
        "3M",
    ],
    &["-f", "qcow2", "-o", "data_file_raw=on", "a.qcow2", "1M"],
    &[
        "-f",
        "qcow2",
        "-o",
        "data_file=d.raw,compat=0.10",
        "a.qcow2",
        "1M",
    ],
];

/// With backing files (`base.qcow2`, 2 MiB + 512 of 0x5a; `base.raw`, 3 MiB).
const BACKING_CASES: &[&[&str]] = &[
    &["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "a.qcow2"],
    &[
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "a.qcow2",
        "8M",
    ],
    &["-f", "qcow2", "-b", "base.qcow2", "-F", "raw", "a.qcow2"],
    &[
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,preallocation=metadata",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "a.qcow2",
    ],
    &[
        "-f",
        "qcow2",
        "-o",
        "backing_file=base.raw,backing_fmt=raw,cluster_size=4096",
        "a.qcow2",
    ],
    &[
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "a.qcow2",
    ],
    &[
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "a.qcow2",
    ],
    &[
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "-o",
        "backing_file=base.qcow2",
        "a.qcow2",
        "1M",
    ],
    &[
        "-f",
        "qcow2",
        "-u",
        "-b",
        "nonexist.qcow2",
        "-F",
        "qcow2",
        "a.qcow2",
        "1M",
    ],
    // Failures.
    &[
        "-f",
        "qcow2",
        "-b",
        "nonexist.qcow2",
        "-F",
        "qcow2",
        "a.qcow2",
    ],
    &[
        "-f",
        "qcow2",
        "-u",
        "-b",
        "nonexist.qcow2",
        "-F",
        "qcow2",
        "a.qcow2",
    ],
    &["-f", "qcow2", "-b", "base.qcow2", "a.qcow2", "1M"],
    &["-f", "raw", "-b", "base.raw", "-F", "raw", "r.raw"],
    &[
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "-o",
        "preallocation=metadata",
        "a.qcow2",
    ],
];

#[test]
fn create_prints_and_fails_like_qemu() {
    compare_with_qemu(CASES, |_| {});
}

#[test]
fn create_with_backing_files_like_qemu() {
    compare_with_qemu(BACKING_CASES, |sc| {
        sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "base.qcow2", "2097664"]);
        let base = sc.path("base.qcow2").display().to_string();
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x5a 0 2097664", &base])
            .output()
            .expect("qemu-io runs");
        assert!(out.status.success());
        sc.qemu_img_ok(&["create", "-q", "-f", "raw", "base.raw", "3M"]);
    });
}

/// Runs each `create` argument list with both tools in fresh directories prepared by
/// `setup`: same output, status and messages; images with the same `info`, checked clean.
fn compare_with_qemu(cases: &[&[&str]], setup: impl Fn(&Scratch)) {
    if !have_qemu() {
        return;
    }
    for args in cases {
        let ours_dir = Scratch::new();
        let qemu_dir = Scratch::new();
        setup(&ours_dir);
        setup(&qemu_dir);
        let mut a = vec!["create"];
        a.extend_from_slice(args);
        let ours = ours_dir.ours(&a);
        let theirs = qemu_dir.qemu_img(&a);
        assert_eq!(stdout(&ours), stdout(&theirs), "create {args:?}");
        assert_eq!(
            ours.status.code(),
            theirs.status.code(),
            "create {args:?}: {}",
            stderr(&ours)
        );
        assert_eq!(
            common::messages(&ours),
            common::messages(&theirs),
            "create {args:?}"
        );
        if !ours.status.success() {
            continue;
        }
        // The image we made is what qemu makes: same info (apart from disk usage), and clean.
        let file = *args
            .iter()
            .find(|a| **a == "a.qcow2" || **a == "r.raw")
            .expect("every case creates a.qcow2 or r.raw");
        let info = |sc: &Scratch| {
            let mut v = common::json(&sc.qemu_img_ok(&["info", "--output=json", file]));
            common::strip_key(&mut v, "actual-size");
            common::strip_key(&mut v, "children");
            v
        };
        common::assert_json_eq(
            &info(&ours_dir),
            &info(&qemu_dir),
            &format!("info after create {args:?}"),
        );
        // (qemu-img check opens the backing file: not for `-u` with a missing one.)
        if file.ends_with(".qcow2") && !args.contains(&"nonexist.qcow2") {
            ours_dir.qemu_img_ok(&["check", file]);
        }
    }
}

#[test]
fn unsupported_options_fail_clearly() {
    let sc = Scratch::new();
    let o = "encrypt.format=luks";
    let out = sc.ours(&["create", "-f", "qcow2", "-o", o, "a.qcow2", "1M"]);
    assert_eq!(out.status.code(), Some(1), "{o}");
    assert!(
        stderr(&out).contains("not supported yet"),
        "{o}: {}",
        stderr(&out)
    );
    assert!(stdout(&out).is_empty(), "{o}");
}

#[test]
fn options_help_lists_the_options() {
    let sc = Scratch::new();
    let help = sc.ours_ok(&["create", "-f", "qcow2", "-o", "help"]);
    for key in [
        "cluster_size=",
        "compat=",
        "lazy_refcounts=",
        "preallocation=",
        "refcount_bits=",
        "size=",
    ] {
        assert!(help.contains(key), "{key} missing from:\n{help}");
    }
    assert!(sc
        .ours_ok(&["create", "-f", "raw", "-o", "?"])
        .contains("size="));
}
