//! `convert` round trips between qcow2 and raw, checked with `qemu-img compare`, and its
//! `-p` output is qemu-img's.

mod common;

use common::{have_qemu, Scratch};

fn source_images(sc: &Scratch) {
    sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "src.qcow2", "20M"]);
    sc.qemu_io_ok(&[
        "-c",
        "write -P 0x11 0 100k",
        "-c",
        "write -P 0 200k 64k",
        "-c",
        "write -z 1M 64k",
        "-c",
        "write -P 0x22 5M 3M",
        "-c",
        "write 20476k 4k",
        "src.qcow2",
    ]);
    sc.qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k,compat=0.10",
        "small.qcow2",
        "3M",
    ]);
    sc.qemu_io_ok(&[
        "-c",
        "write -P 0x33 4095 2",
        "-c",
        "write 1M 1M",
        "small.qcow2",
    ]);
    sc.qemu_img_ok(&["create", "-q", "-f", "raw", "src.raw", "7M"]);
    sc.qemu_io_ok(&[
        "-f",
        "raw",
        "-c",
        "write -P 0x44 8k 12k",
        "-c",
        "write -P 0 1M 1M",
        "-c",
        "write 6M 1k",
        "src.raw",
    ]);
}

fn identical(sc: &Scratch, a: &str, b: &str) {
    let out = sc.qemu_img(&["compare", a, b]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{a} vs {b}: {}",
        common::stdout(&out)
    );
}

#[test]
fn round_trips_compare_identical() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    source_images(&sc);
    for src in ["src.qcow2", "small.qcow2", "src.raw"] {
        for (fmt, ext) in [("raw", "raw"), ("qcow2", "qcow2")] {
            let dst = format!("{src}.to.{ext}");
            sc.ours_ok(&["convert", "-O", fmt, src, &dst]);
            identical(&sc, src, &dst);
            if fmt == "qcow2" {
                sc.qemu_img_ok(&["check", &dst]);
            }
            // And back again.
            let back = format!("{dst}.back");
            sc.ours_ok(&["convert", "-f", fmt, "-O", "raw", &dst, &back]);
            identical(&sc, src, &back);
        }
    }
    // qcow2 -> qcow2 with options, -S 0, and into an existing target with -n.
    sc.ours_ok(&[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4k,compat=0.10",
        "src.qcow2",
        "o4k.qcow2",
    ]);
    identical(&sc, "src.qcow2", "o4k.qcow2");
    sc.ours_ok(&[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=16k",
        "src.qcow2",
        "ext.qcow2",
    ]);
    identical(&sc, "src.qcow2", "ext.qcow2");
    sc.qemu_img_ok(&["check", "ext.qcow2"]);
    sc.ours_ok(&["convert", "-S", "0", "-O", "raw", "small.qcow2", "full.raw"]);
    identical(&sc, "small.qcow2", "full.raw");
    let blocks =
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(sc.path("full.raw")).unwrap());
    assert!(blocks * 512 >= 3 << 20, "-S 0 allocates everything");
    sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "existing.qcow2", "20M"]);
    sc.qemu_io_ok(&["-c", "write -P 0x99 0 20M", "existing.qcow2"]);
    sc.ours_ok(&[
        "convert",
        "-n",
        "-O",
        "qcow2",
        "src.qcow2",
        "existing.qcow2",
    ]);
    identical(&sc, "src.qcow2", "existing.qcow2");
    // Into an existing raw file: the zero ranges are written too.
    std::fs::write(sc.path("dirty.raw"), vec![0xeeu8; 20 << 20]).unwrap();
    sc.ours_ok(&["convert", "-n", "-O", "raw", "src.qcow2", "dirty.raw"]);
    identical(&sc, "src.qcow2", "dirty.raw");
    // Several sources are concatenated.
    sc.ours_ok(&["convert", "-O", "raw", "small.qcow2", "src.raw", "cat.raw"]);
    sc.qemu_img_ok(&["convert", "-O", "raw", "small.qcow2", "src.raw", "qcat.raw"]);
    identical(&sc, "cat.raw", "qcat.raw");
}

#[test]
fn every_runtime_writes_the_same_guest_data() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    source_images(&sc);
    for rt in ["sync", "smol", "uring"] {
        for cache in ["writeback", "none"] {
            for src in ["src.qcow2", "src.raw"] {
                let dst = format!("{src}.{rt}.{cache}.qcow2");
                sc.ours_ok(&[
                    "convert",
                    "--runtime",
                    rt,
                    "-t",
                    cache,
                    "-O",
                    "qcow2",
                    src,
                    &dst,
                ]);
                identical(&sc, src, &dst);
                sc.qemu_img_ok(&["check", &dst]);
            }
        }
    }
    let out = sc.ours(&[
        "convert",
        "--runtime",
        "nope",
        "-O",
        "qcow2",
        "src.raw",
        "x.qcow2",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(common::stderr(&out).contains("Unknown runtime 'nope'"));
}

#[test]
fn sparse_output_like_qemu() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    source_images(&sc);
    for src in ["src.qcow2", "src.raw"] {
        let ours = format!("{src}.ours.raw");
        let theirs = format!("{src}.qemu.raw");
        sc.ours_ok(&["convert", "-O", "raw", src, &ours]);
        sc.qemu_img_ok(&["convert", "-O", "raw", src, &theirs]);
        let map = |f: &str| sc.qemu_img_ok(&["map", "--output=json", "-f", "raw", f]);
        assert_eq!(map(&ours), map(&theirs), "{src}: holes of the raw output");
    }
}

#[test]
fn progress_output_is_qemu_img_s() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    source_images(&sc);
    sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "empty.qcow2", "1M"]);
    for src in ["src.qcow2", "small.qcow2", "src.raw", "empty.qcow2"] {
        let ours = sc.ours_ok(&["convert", "-p", "-O", "raw", src, "p1.raw"]);
        let theirs = sc.qemu_img_ok(&["convert", "-p", "-O", "raw", src, "p2.raw"]);
        assert_eq!(ours, theirs, "progress of {src}");
        assert!(ours.starts_with("    (0.00/100%)\r"));
        assert!(ours.ends_with("    (100.00/100%)\r\n"));
    }
}

/// A chain (sparse raw base, qcow2 middle, qcow2 top of another cluster size) converts to the same
/// guest contents as qemu-img converts it, to raw and to qcow2.
#[test]
fn convert_from_a_backing_chain_like_qemu() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    sc.qemu_chain();
    sc.ours_ok(&["convert", "-O", "raw", "top.qcow2", "ours.raw"]);
    sc.qemu_img_ok(&["convert", "-O", "raw", "top.qcow2", "theirs.raw"]);
    assert!(
        std::fs::read(sc.path("ours.raw")).unwrap()
            == std::fs::read(sc.path("theirs.raw")).unwrap(),
        "raw conversions differ"
    );
    sc.ours_ok(&["convert", "-O", "qcow2", "top.qcow2", "ours.qcow2"]);
    sc.qemu_img_ok(&["compare", "top.qcow2", "ours.qcow2"]);
    sc.qemu_img_ok(&["check", "ours.qcow2"]);
}

/// Sources for `-B`: `src.qcow2` (6 MiB) over `base.qcow2` (4 MiB), `s2.qcow2` over the
/// shorter `short.qcow2`, `other.raw`, and an existing `ex.qcow2` for `-n`.
fn backing_sources(sc: &Scratch) {
    sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    sc.qemu_io_cmds("qcow2", "base.qcow2", &["write -P 0xaa 0 2M"]);
    sc.qemu_overlay("src.qcow2", "base.qcow2", "qcow2", "", Some("6M"));
    let src = [
        "write -P 0xbb 1M 64k",
        "write -z 0 64k",
        "write -z 5M 64k",
        "write -P 0 3M 64k",
        "write -P 0xee 2047k 2k",
    ];
    sc.qemu_io_cmds("qcow2", "src.qcow2", &src);
    sc.qemu_img_ok(&["create", "-q", "-f", "raw", "other.raw", "3M"]);
    sc.qemu_io_cmds("raw", "other.raw", &["write -P 0xcc 0 3M"]);
    sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "ex.qcow2", "6M"]);
    sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "short.qcow2", "2M"]);
    sc.qemu_io_cmds("qcow2", "short.qcow2", &["write -P 0x11 0 2M"]);
    sc.qemu_overlay("s2.qcow2", "short.qcow2", "qcow2", "", Some("6M"));
    sc.qemu_io_cmds(
        "qcow2",
        "s2.qcow2",
        &["write -P 0x22 1M 64k", "write -z 4M 64k"],
    );
}

/// `-B`: the target is made an overlay of the given file and gets only what the source's
/// top layer stores, exactly as qemu-img does it (the same messages and failures, the same
/// guest contents and allocation), whether or not the new backing file is the source's.
#[test]
fn convert_onto_a_backing_file_like_qemu() {
    if !have_qemu() {
        return;
    }
    let cases = [
        "-O qcow2 -B base.qcow2 -F qcow2 src.qcow2 d.qcow2",
        "-p -O qcow2 -B base.qcow2 -F qcow2 src.qcow2 d.qcow2",
        "-O qcow2 -B other.raw -F raw src.qcow2 d.qcow2",
        "-O qcow2 -B base.qcow2 -F qcow2 -o cluster_size=4k,compat=0.10 src.qcow2 d.qcow2",
        "-O qcow2 -B base.qcow2 -F qcow2 -S 0 src.qcow2 d.qcow2",
        "-O qcow2 -o backing_file=base.qcow2,backing_fmt=qcow2 src.qcow2 d.qcow2",
        // The source's backing file is shorter, or longer, than the target's.
        "-O qcow2 -B base.qcow2 -F qcow2 s2.qcow2 d.qcow2",
        "-O qcow2 -B short.qcow2 -F qcow2 src.qcow2 d.qcow2",
        "-O qcow2 -B base.qcow2 -F qcow2 -o cluster_size=512 s2.qcow2 d.qcow2",
        // Subclusters: what the source's top layer stores, at subcluster granularity.
        "-O qcow2 -B base.qcow2 -F qcow2 -o extended_l2=on,cluster_size=32k src.qcow2 d.qcow2",
        // A source without a backing file: its unallocated ranges are zeroes.
        "-O qcow2 -B src.qcow2 -F qcow2 base.qcow2 d.qcow2",
        "-O qcow2 -B base.qcow2 -F qcow2 other.raw d.qcow2",
        // Into an existing image: its backing file is not changed; zeroes are written.
        "-n -O qcow2 -B base.qcow2 -F qcow2 src.qcow2 ex.qcow2",
        "-n -O qcow2 -B base.qcow2 src.qcow2 ex.qcow2",
        // (qemu-img reports this one and exits with 0, having done nothing.)
        "-n --target-is-zero -O qcow2 -B base.qcow2 -F qcow2 src.qcow2 ex.qcow2",
        // Failures.
        "-O qcow2 -B base.qcow2 src.qcow2 d.qcow2",
        "-O qcow2 -o backing_file=base.qcow2 src.qcow2 d.qcow2",
        "-O raw -B base.qcow2 -F qcow2 src.qcow2 d.raw",
        "-O raw -B base.qcow2 src.qcow2 d.raw",
        "-O qcow2 -B missing.qcow2 -F qcow2 src.qcow2 d.qcow2",
        "-O qcow2 -B other.raw -o backing_file=base.qcow2,backing_fmt=qcow2 src.qcow2 d.qcow2",
        "-O qcow2 -B base.qcow2 -F qcow2 src.qcow2 other.raw d.qcow2",
        "-O qcow2 -B base.qcow2 -F qcow2 -o preallocation=metadata src.qcow2 d.qcow2",
    ];
    for options in cases {
        let twins = common::Twins::new(backing_sources);
        let line = format!("convert {options}");
        let ok = twins.run_both(&common::args(&line));
        let target = options.rsplit(' ').next().expect("a target");
        if !ok || !twins.ours.path(target).exists() {
            continue;
        }
        twins.assert_same_image(target, &line);
        assert_eq!(
            common::map_shape(&twins.ours, target),
            common::map_shape(&twins.qemu, target),
            "{line}: allocation of the target"
        );
    }
    // Onto the source's own backing file, the target shows what the source shows.
    let sc = Scratch::new();
    backing_sources(&sc);
    sc.ours_ok(&common::args(
        "convert -O qcow2 -B base.qcow2 -F qcow2 src.qcow2 d.qcow2",
    ));
    identical(&sc, "src.qcow2", "d.qcow2");
}

/// `convert -c`: the same compressed clusters as qemu-img makes (map field by field: which
/// clusters are compressed, which are left out), the same guest contents, a clean check;
/// zlib and zstd, several cluster sizes, from raw and from a chain; refusals like qemu's.
#[test]
fn compressed_convert_like_qemu() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    sc.qemu_img_ok(&["create", "-q", "-f", "raw", "src.raw", "3M"]);
    sc.qemu_io_ok(&[
        "-f",
        "raw",
        "-c",
        "write -P 0x41 0 700k",
        "-c",
        "write -P 0 100k 64k",
        "-c",
        "write 2M 4k",
        "src.raw",
    ]);
    let top = sc.qemu_chain();
    for (src, opts) in [
        ("src.raw", "cluster_size=65536"),
        ("src.raw", "cluster_size=4096,compression_type=zstd"),
        ("src.raw", "cluster_size=16384,compat=0.10"),
        (top, "cluster_size=65536,compression_type=zstd"),
    ] {
        sc.ours_ok(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            opts,
            src,
            "ours.qcow2",
        ]);
        sc.qemu_img_ok(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            opts,
            src,
            "theirs.qcow2",
        ]);
        sc.qemu_img_ok(&["compare", "ours.qcow2", "theirs.qcow2"]);
        sc.qemu_img_ok(&["check", "ours.qcow2"]);
        // Which ranges are compressed, zero or absent (offsets differ: packing order).
        let shape = |f: &str| {
            let mut v = common::json(&sc.qemu_img_ok(&["map", "--output=json", f]));
            common::strip_key(&mut v, "offset");
            v
        };
        common::assert_json_eq(&shape("ours.qcow2"), &shape("theirs.qcow2"), opts);
    }
    for (args, msg) in [
        (
            &["convert", "-c", "-O", "raw", "src.raw", "x.raw"][..],
            "Compression not supported for this file format",
        ),
        (
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                "preallocation=metadata",
                "src.raw",
                "x.qcow2",
            ][..],
            "Compression and preallocation not supported at the same time",
        ),
    ] {
        let ours = sc.ours(args);
        let theirs = sc.qemu_img(args);
        assert_eq!(ours.status.code(), theirs.status.code(), "{args:?}");
        assert!(
            common::stderr(&ours).contains(msg),
            "{args:?}: {}",
            common::stderr(&ours)
        );
    }
}
