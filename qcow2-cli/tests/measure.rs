//! `measure` prints what qemu-img measure prints, byte for byte (human and JSON), for empty
//! images over a grid of creation options and for raw and qcow2 sources; errors exit and
//! read like qemu-img's; and `create` never makes a file larger than the size measured.

mod common;

use std::process::Output;

use common::{have_qemu, json, messages, stderr, stdout, Scratch};

/// Runs `measure ARGS` (split at spaces) with both tools and asserts the same exit status,
/// the same stdout and the same error messages (program prefix aside).
fn same(sc: &Scratch, args: &str) {
    let (ours, theirs) = both(sc, args);
    assert_eq!(
        ours.status.code(),
        theirs.status.code(),
        "measure {args:?}: exit status\nours: {}\nqemu: {}",
        stderr(&ours),
        stderr(&theirs)
    );
    assert_eq!(stdout(&ours), stdout(&theirs), "measure {args:?}: stdout");
    assert_eq!(
        messages(&ours),
        messages(&theirs),
        "measure {args:?}: stderr"
    );
}

/// Runs qemu-img with `args` (split at spaces) and asserts it succeeded.
fn qemu_img(sc: &Scratch, args: &str) {
    sc.qemu_img_ok(&args.split_whitespace().collect::<Vec<_>>());
}

fn both(sc: &Scratch, args: &str) -> (Output, Output) {
    let full: Vec<&str> = ["measure"]
        .into_iter()
        .chain(args.split_whitespace())
        .collect();
    (sc.ours(&full), sc.qemu_img(&full))
}

/// `--output` for the `i`th case: the grids alternate so both forms are compared.
fn output(i: usize) -> &'static str {
    if i % 2 == 0 {
        "--output=json"
    } else {
        "--output=human"
    }
}

const CLUSTER_SIZES: [&str; 13] = [
    "512", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k", "256k", "512k", "1M", "2M",
];

/// From empty through odd sizes to a few TiB (too large for small clusters: the error is
/// compared then).
const SIZES: [&str; 9] = [
    "0",
    "1",
    "511",
    "65537",
    "123456789",
    "1G",
    "3T",
    "3298534883329",
    "1.5P",
];

/// Measures `--size` for every `-o` option string and size, alternating the output form.
fn same_over_grid(options: &[String], sizes: &[&str]) {
    let sc = Scratch::new();
    let cases = options
        .iter()
        .flat_map(|o| sizes.iter().map(move |s| (o, s)));
    for (i, (o, size)) in cases.enumerate() {
        same(&sc, &format!("-O qcow2 -o {o} --size {size} {}", output(i)));
    }
}

#[test]
fn sizes_over_cluster_sizes_and_refcount_widths() {
    if !have_qemu() {
        return;
    }
    let mut options = Vec::new();
    for cs in CLUSTER_SIZES {
        for bits in [1, 2, 4, 8, 16, 32, 64] {
            options.push(format!("cluster_size={cs},refcount_bits={bits}"));
        }
    }
    same_over_grid(&options, &SIZES);
}

#[test]
fn extended_l2_compat_and_preallocation() {
    if !have_qemu() {
        return;
    }
    let mut options = Vec::new();
    for cs in ["512", "8k", "16k", "64k", "2M"] {
        for ext in ["off", "on"] {
            for compat in ["0.10", "1.1"] {
                for prealloc in ["off", "metadata", "falloc", "full"] {
                    options.push(format!(
                        "cluster_size={cs},extended_l2={ext},compat={compat},preallocation={prealloc}"
                    ));
                }
            }
        }
    }
    same_over_grid(&options, &["0", "1000", "1G", "5T"]);
}

#[test]
fn raw_targets_and_option_spellings() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    for (i, args) in [
        "--size 1G",
        "-O raw --size 1000",
        "-O raw --size 0",
        "-O raw --size 1 -o preallocation=full",
        "-O raw --size 1M -o preallocation=bogus,nocow=on",
        "-O raw -o size=8G --size 3k",
        "-O qcow2 --size 1G -o size=2G",
        "-O qcow2 --size 1.5G",
        "-O qcow2 --size 0x1000",
        "-O qcow2 --size=64M -o cluster_size=4k -o cluster_size=8k",
        "-O qcow2 --size 1G -o cluster_size=4k,,compat=1.1",
        "--target-format qcow2 --size 1G --options refcount_bits=8",
        "-O qcow2 --size 1G -o lazy_refcounts=on,compat=0.10",
        "-O qcow2 --size 1G -o extended_l2=yes",
        "-O qcow2 --size 1G -o backing_file=base.qcow2",
        "-O qcow2 --size 1G -o backing_file=b.qcow2,backing_fmt=qcow2,preallocation=full",
        "-O qcow2 --size 1G -o compression_type=zstd,data_file=d",
        "-O qcow2 --size 1G -o encryption=on,encrypt.format=aes",
        "-O qcow2 --size 1G -o nocow=on,extent_size_hint=1M",
        "-O qcow2 --size 2305843009213693951 -o cluster_size=2M",
    ]
    .into_iter()
    .enumerate()
    {
        same(&sc, &format!("{args} {}", output(i)));
    }
}

#[test]
fn errors_like_qemu_img() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    qemu_img(&sc, "create -q -f qcow2 a.qcow2 1M");
    for args in [
        // Neither or both of size and file; -f and -l without a file.
        "",
        "-O qcow2",
        "-O qcow2 -o size=1G",
        "-O qcow2 --size 1G a.qcow2",
        "-O qcow2 -f qcow2 --size 1G",
        "-O qcow2 -l snap --size 1G",
        "-O qcow2 missing.qcow2",
        // Bad sizes.
        "-O qcow2 --size -1",
        "-O qcow2 --size 1X",
        "-O qcow2 --size 8E",
        "-O qcow2 --size 9223372036854775808",
        "-O qcow2 --size 99999999999999999999",
        "-O qcow2 --size 1P -o cluster_size=512",
        "-O qcow2 --size 9223372036854775807 -o cluster_size=2M",
        "-O qcow2 -o size=1P,cluster_size=512 a.qcow2",
        // Bad options.
        "-O qcow2 --size 1G -o foo=bar",
        "-O qcow2 --size 1G -o help",
        "-O qcow2 --size 1G -o size=abc",
        "-O qcow2 --size 1G -o cluster_size=3k",
        "-O qcow2 --size 1G -o cluster_size=0",
        "-O qcow2 --size 1G -o cluster_size=8G",
        "-O qcow2 --size 1G -o cluster_size=4M",
        "-O qcow2 --size 1G -o cluster_size=abc",
        "-O qcow2 --size 1G -o refcount_bits=3",
        "-O qcow2 --size 1G -o refcount_bits=0",
        "-O qcow2 --size 1G -o refcount_bits=128",
        "-O qcow2 --size 1G -o refcount_bits=abc",
        "-O qcow2 --size 1G -o compat=0.10,refcount_bits=8",
        "-O qcow2 --size 1G -o compat=1.0",
        "-O qcow2 --size 1G -o compat=v3",
        "-O qcow2 --size 1G -o preallocation=bogus",
        "-O qcow2 --size 1G -o lazy_refcounts=bad",
        "-O qcow2 --size 1G -o extended_l2=maybe",
        "-O qcow2 --size 1G -o extended_l2=on,cluster_size=4k",
        "-O raw --size 1G -o cluster_size=4k",
        "-O raw --size 1G -o compat=1.1",
        "-O qcow2 -o foo=bar a.qcow2",
        "-O qcow2 -l snap a.qcow2",
    ] {
        same(&sc, args);
    }
    // Where the messages differ on purpose, the exit status still agrees.
    for (args, ours_says) in [
        ("-O vmdk --size 1G", "Unknown file format 'vmdk'"),
        ("-O qcow2 --image-opts a.qcow2", "not supported yet"),
        (
            "-O qcow2 --size 1G -o encrypt.format=luks",
            "not supported yet",
        ),
        ("-O qcow2 --size 1G --output=xml", "xml"),
    ] {
        let (ours, theirs) = both(&sc, args);
        assert_eq!(ours.status.code(), theirs.status.code(), "{args:?}");
        assert_eq!(ours.status.code(), Some(1), "{args:?}");
        assert!(stdout(&ours).is_empty(), "{args:?}");
        assert!(
            stderr(&ours).contains(ours_says),
            "{args:?}: {}",
            stderr(&ours)
        );
    }
}

/// Targets measured for every source image.
const TARGETS: &[&str] = &[
    "-O qcow2",
    "-O raw",
    "-O qcow2 -o cluster_size=512",
    "-O qcow2 -o cluster_size=4k,refcount_bits=1",
    "-O qcow2 -o cluster_size=2M,refcount_bits=64",
    "-O qcow2 -o compat=0.10",
    "-O qcow2 -o extended_l2=on,cluster_size=32k",
    "-O qcow2 -o preallocation=metadata",
    "-O qcow2 -o preallocation=full",
    "-O qcow2 -o backing_file=base.qcow2",
    // The option's size is checked, not the source's: this passes with a source.
    "-O qcow2 -o size=18446744073709551615",
];

/// Measures `file` for every target, with and without `-f`, in both output forms.
fn same_for_targets(sc: &Scratch, file: &str, format: &str) {
    for (i, target) in TARGETS.iter().enumerate() {
        let f = if i % 3 == 0 {
            format!("-f {format}")
        } else {
            String::new()
        };
        same(sc, &format!("{target} {} {f} {file}", output(i)));
    }
}

#[test]
fn raw_sources() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    // Sparse, never written.
    std::fs::File::create(sc.path("sparse.raw"))
        .and_then(|f| f.set_len(64 << 20))
        .expect("sparse file");
    same_for_targets(&sc, "sparse.raw", "raw");
    // qemu-img's raw files have their first block written.
    qemu_img(&sc, "create -q -f raw r.raw 64M");
    same_for_targets(&sc, "r.raw", "raw");
    // Partly written, with zeroes written over some of it.
    sc.qemu_io_ok(&[
        "-f",
        "raw",
        "-c",
        "write -P 0x11 100k 10k",
        "-c",
        "write -P 0x22 1M 1M",
        "-c",
        "write -z 1536k 256k",
        "-c",
        "write -P 0x33 3M 1",
        "-c",
        "write -P 0x44 64508k 4k",
        "r.raw",
    ]);
    same_for_targets(&sc, "r.raw", "raw");
    // Fully written, with an odd size.
    qemu_img(&sc, "create -q -f raw full.raw 3000000");
    sc.qemu_io_ok(&["-f", "raw", "-c", "write -P 0x55 0 2999808", "full.raw"]);
    same_for_targets(&sc, "full.raw", "raw");
    // Not a multiple of 512 bytes.
    std::fs::write(sc.path("odd.raw"), vec![7u8; 1000]).expect("odd file");
    same_for_targets(&sc, "odd.raw", "raw");
    // An empty file.
    std::fs::write(sc.path("empty.raw"), b"").expect("empty file");
    same_for_targets(&sc, "empty.raw", "raw");
}

#[test]
fn qcow2_sources() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    for (create_opts, script) in [
        ("cluster_size=64k", &[][..]),
        (
            "cluster_size=64k",
            &[
                "-c",
                "write -P 0xab 100k 10k",
                "-c",
                "write -z 1M 1M",
                "-c",
                "write -P 0x01 3M 1",
                "-c",
                "write 8M 1M",
                "-c",
                "discard 8M 64k",
            ],
        ),
        (
            "cluster_size=4k,refcount_bits=8",
            &[
                "-c",
                "write 0 4k",
                "-c",
                "write -z 64k 64k",
                "-c",
                "write 6M 12k",
            ],
        ),
        (
            "cluster_size=2M",
            &[
                "-c",
                "write 5M 1",
                "-c",
                "write -z 0 2M",
                "-c",
                "write 12M 4M",
            ],
        ),
        (
            "compat=0.10",
            &["-c", "write 0 100k", "-c", "write -z 2M 1M"],
        ),
        ("preallocation=metadata", &[]),
        ("preallocation=metadata", &["-c", "write 1M 64k"]),
        ("preallocation=falloc", &["-c", "write -z 0 1M"]),
        ("preallocation=full", &["-c", "write 4M 4k"]),
        ("cluster_size=64k", &["-c", "write -P 0x5a 0 16M"]),
    ] {
        let _ = std::fs::remove_file(sc.path("a.qcow2"));
        qemu_img(
            &sc,
            &format!("create -q -f qcow2 -o {create_opts} a.qcow2 16M"),
        );
        if !script.is_empty() {
            let mut a = script.to_vec();
            a.push("a.qcow2");
            sc.qemu_io_ok(&a);
        }
        same_for_targets(&sc, "a.qcow2", "qcow2");
    }
    // A qcow2 file measured as raw.
    same(&sc, "-O qcow2 -f raw a.qcow2");
    // Compressed clusters count as data.
    qemu_img(&sc, "create -q -f qcow2 s.qcow2 8M");
    sc.qemu_io_ok(&["-c", "write -P 0x61 0 1M", "-c", "write 5M 100k", "s.qcow2"]);
    qemu_img(&sc, "convert -c -O qcow2 s.qcow2 c.qcow2");
    same_for_targets(&sc, "c.qcow2", "qcow2");
}

#[test]
fn qcow2_sources_with_bitmaps() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    qemu_img(&sc, "create -q -f qcow2 b.qcow2 100M");
    same_for_targets(&sc, "b.qcow2", "qcow2");
    qemu_img(&sc, "bitmap --add -g 64k b.qcow2 bm0");
    qemu_img(&sc, "bitmap --add -g 512 b.qcow2 a-rather-long-bitmap-name");
    qemu_img(&sc, "bitmap --add b.qcow2 off");
    qemu_img(&sc, "bitmap --disable b.qcow2 off");
    sc.qemu_io_ok(&["-c", "write 1M 3M", "b.qcow2"]);
    same_for_targets(&sc, "b.qcow2", "qcow2");
    let m = json(&sc.ours_ok(&["measure", "-O", "qcow2", "--output=json", "b.qcow2"]));
    assert!(m["bitmaps"].as_u64().unwrap() > 0, "{m}");
}

#[test]
fn overlays() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    qemu_img(&sc, "create -q -f qcow2 base.qcow2 16M");
    sc.qemu_io_ok(&["-c", "write 0 1M", "-c", "write 8M 64k", "base.qcow2"]);
    qemu_img(&sc, "create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2");
    sc.qemu_io_ok(&["-c", "write 4M 64k", "-c", "write -z 0 64k", "mid.qcow2"]);
    qemu_img(&sc, "create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2");
    sc.qemu_io_ok(&["-c", "write 12M 100k", "-c", "discard 8M 64k", "top.qcow2"]);
    // A raw file below.
    qemu_img(&sc, "create -q -f raw base.raw 16M");
    sc.qemu_io_ok(&["-f", "raw", "-c", "write 2M 1M", "base.raw"]);
    qemu_img(&sc, "create -q -f qcow2 -b base.raw -F raw over-raw.qcow2");
    sc.qemu_io_ok(&["-c", "write -z 2M 64k", "over-raw.qcow2"]);
    // The data of the whole chain counts (none of it with a backing file for the target).
    for file in ["mid.qcow2", "top.qcow2", "over-raw.qcow2"] {
        same_for_targets(&sc, file, "qcow2");
    }
}

#[test]
fn force_share_measures_an_image_in_use() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    qemu_img(&sc, "create -q -f qcow2 busy.qcow2 4M");
    sc.qemu_io_ok(&["-c", "write -P 0x5a 0 64k", "busy.qcow2"]);
    let q = qcow2_conformance::qemu::Qemu::find().expect("qemu found above");
    let held = q.hold(&sc.path("busy.qcow2"), false);
    same(&sc, "-O qcow2 busy.qcow2");
    same(&sc, "-O qcow2 -U busy.qcow2");
    same(&sc, "-O qcow2 --force-share --output=json busy.qcow2");
    drop(held);
}

#[test]
fn create_stays_within_the_fully_allocated_size() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    for (opts, size) in [
        ("preallocation=full", "1M"),
        ("preallocation=full", "1000000"),
        ("preallocation=full,cluster_size=4k", "8M"),
        ("preallocation=full,cluster_size=512,refcount_bits=1", "2M"),
        ("preallocation=full,cluster_size=2M,refcount_bits=64", "5M"),
        ("preallocation=full,compat=0.10", "3M"),
        ("preallocation=falloc", "16M"),
        ("preallocation=metadata", "64M"),
        ("preallocation=metadata,cluster_size=4k", "64M"),
    ] {
        let m = json(&sc.ours_ok(&[
            "measure",
            "-O",
            "qcow2",
            "-o",
            opts,
            "--size",
            size,
            "--output=json",
        ]));
        let fully = m["fully-allocated"].as_u64().expect("fully-allocated");
        let _ = std::fs::remove_file(sc.path("c.qcow2"));
        sc.ours_ok(&["create", "-q", "-f", "qcow2", "-o", opts, "c.qcow2", size]);
        let len = std::fs::metadata(sc.path("c.qcow2"))
            .expect("created")
            .len();
        assert!(
            len <= fully,
            "create -o {opts} {size}: {len} bytes, measured {fully}"
        );
        // And a full image measures as needing all of it.
        if opts.starts_with("preallocation=full") {
            same(&sc, &format!("-O qcow2 -o {opts} c.qcow2"));
        }
    }
}
