//! `map` agrees with qemu-img's on the same file: JSON entries field by field (host offsets
//! included, since both tools read the same file) and the human form.

mod common;

use common::{assert_json_eq, have_qemu, json, Scratch};

fn same_map(sc: &Scratch, file: &str, extra: &[&str]) {
    let mut args = vec!["map", "--output=json"];
    args.extend_from_slice(extra);
    args.push(file);
    let ours = json(&sc.ours_ok(&args));
    let theirs = json(&sc.qemu_img_ok(&args));
    assert_json_eq(&ours, &theirs, &format!("map {extra:?} {file}"));
}

/// qemu-io scripts that leave every kind of extent behind.
const SCRIPTS: &[&[&str]] = &[
    &[
        "-c",
        "write -P 0xab 0 100k",
        "-c",
        "write 2M 4k",
        "-c",
        "write 2052k 60k",
    ],
    &[
        "-c",
        "write -z 0 64k",
        "-c",
        "write 64k 64k",
        "-c",
        "write -z 64k 64k",
        "-c",
        "write 128k 64k",
        "-c",
        "discard 128k 64k",
    ],
    &[
        "-c",
        "write 0 4k",
        "-c",
        "write -z 64k 64k",
        "-c",
        "write -z -u 128k 64k",
        "-c",
        "discard 192k 64k",
    ],
];

#[test]
fn map_matches_qemu_on_qemu_images() {
    if !have_qemu() {
        return;
    }
    for opts in [
        "cluster_size=64k",
        "cluster_size=4k",
        "compat=0.10",
        "cluster_size=2M",
        "preallocation=metadata",
        "preallocation=falloc",
        "extended_l2=on",
        "extended_l2=on,cluster_size=16k,preallocation=metadata",
    ] {
        for script in SCRIPTS {
            let sc = Scratch::new();
            sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", opts, "a.qcow2", "8M"]);
            same_map(&sc, "a.qcow2", &[]);
            let mut args = script.to_vec();
            args.push("a.qcow2");
            // v2 images have no zero clusters: qemu-io falls back to writing zeroes.
            sc.qemu_io_ok(&args);
            same_map(&sc, "a.qcow2", &[]);
            same_map(
                &sc,
                "a.qcow2",
                &["--start-offset", "64k", "--max-length", "1M"],
            );
            same_map(&sc, "a.qcow2", &["-f", "qcow2", "--start-offset=4k"]);
            assert_eq!(
                sc.ours_ok(&["map", "a.qcow2"]),
                sc.qemu_img_ok(&["map", "a.qcow2"]),
                "{opts} {script:?}"
            );
        }
    }
}

#[test]
fn map_matches_qemu_on_our_images() {
    if !have_qemu() {
        return;
    }
    for opts in [
        "cluster_size=64k",
        "cluster_size=4k",
        "preallocation=metadata",
        "compat=0.10",
        "extended_l2=on",
        "extended_l2=on,cluster_size=32k,preallocation=metadata",
    ] {
        for script in SCRIPTS {
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
            for w in script.chunks(2) {
                sc.ours_ok(&["io", "-c", w[1], "ours.qcow2"]);
            }
            same_map(&sc, "ours.qcow2", &[]);
        }
    }
}

#[test]
fn map_matches_qemu_on_raw_files() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    sc.qemu_img_ok(&["create", "-q", "-f", "raw", "a.raw", "3M"]);
    sc.qemu_io_ok(&[
        "-f",
        "raw",
        "-c",
        "write 70000 3",
        "-c",
        "write 1M 128k",
        "a.raw",
    ]);
    std::fs::write(sc.path("odd.raw"), vec![1u8; 1000]).unwrap();
    for f in ["a.raw", "odd.raw"] {
        same_map(&sc, f, &["-f", "raw"]);
        same_map(&sc, f, &[]);
        assert_eq!(
            sc.ours_ok(&["map", "-f", "raw", f]),
            sc.qemu_img_ok(&["map", "-f", "raw", f])
        );
    }
}

#[test]
fn map_json_is_byte_identical_on_a_simple_image() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "a.qcow2", "16M"]);
    sc.qemu_io_ok(&["-c", "write 0 64k", "-c", "write 1M 64k", "a.qcow2"]);
    assert_eq!(
        sc.ours_ok(&["map", "--output", "json", "a.qcow2"]),
        sc.qemu_img_ok(&["map", "--output", "json", "a.qcow2"])
    );
}

#[test]
fn compressed_clusters_like_qemu() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    std::fs::write(sc.path("text.raw"), b"hello\n".repeat(200_000)).unwrap();
    sc.qemu_img_ok(&["convert", "-c", "-O", "qcow2", "text.raw", "comp.qcow2"]);
    same_map(&sc, "comp.qcow2", &[]);
    // The human form refuses, like qemu-img.
    let ours = sc.ours(&["map", "comp.qcow2"]);
    let theirs = sc.qemu_img(&["map", "comp.qcow2"]);
    assert_eq!(ours.status.code(), Some(1));
    assert_eq!(ours.status.code(), theirs.status.code());
    assert_eq!(common::stdout(&ours), common::stdout(&theirs));
    assert_eq!(common::messages(&ours), common::messages(&theirs));
}

/// The same writes through us and through qemu-io give images qemu-img maps identically
/// (offsets included): fresh clusters are laid out and allocated on the host like qemu's.
#[test]
fn our_writes_map_like_qemu_io_writes() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    let writes = [
        "write -P 1 0 4k",
        "write -P 2 1M 100k",
        "write -P 3 3M 64k",
        "write -z 2M 64k",
        "write -z 5M 4k",
        "write -z -u 3M 64k",
        "discard 1M 64k",
        "write -P 4 6M 4k",
    ];
    sc.ours_ok(&["create", "-q", "-f", "qcow2", "ours.qcow2", "8M"]);
    sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "theirs.qcow2", "8M"]);
    for w in writes {
        sc.ours_ok(&["io", "-c", w, "ours.qcow2"]);
        sc.qemu_io_ok(&["-c", w, "theirs.qcow2"]);
    }
    let ours = sc.qemu_img_ok(&["map", "--output=json", "ours.qcow2"]);
    let theirs = sc.qemu_img_ok(&["map", "--output=json", "theirs.qcow2"]);
    assert_eq!(ours, theirs, "qemu-img map of our image vs qemu-io's");
}

/// Chains: a sparse raw base, a qcow2 middle layer with data, zero and discarded clusters,
/// and a top of another cluster size and a larger size: JSON (depths, offsets in each
/// layer's file) and the human form (the file column) as qemu-img prints them.
#[test]
fn map_matches_qemu_over_backing_chains() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    sc.qemu_chain();
    sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "q.qcow2", "4M"]);
    sc.qemu_io_ok(&["-c", "write 64k 64k", "q.qcow2"]);
    sc.qemu_overlay("qt.qcow2", "q.qcow2", "qcow2", "", None);
    for file in ["mid.qcow2", "top.qcow2", "qt.qcow2"] {
        same_map(&sc, file, &[]);
        same_map(&sc, file, &["-s", "100000", "-l", "3000000"]);
        let human = |out: String| out;
        assert_eq!(
            human(sc.ours_ok(&["map", file])),
            human(sc.qemu_img_ok(&["map", file])),
            "human map of {file}"
        );
    }
}
