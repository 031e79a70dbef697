//! `snapshot -l` and `convert -l` against qemu-img on images with internal snapshots that
//! qemu-img made: the same listing, the same snapshot contents, the same messages.

mod common;

use common::{have_qemu, messages_as_ours, stderr, stdout, Scratch, Twins};

/// Runs `args` with our tool and with qemu-img on the same files (snapshot dates must be
/// the same): the same stdout, status and messages.
fn same(sc: &Scratch, args: &[&str]) {
    common::assert_same_outcome(&sc.ours(args), &sc.qemu_img(args), &format!("{args:?}"));
}

/// `img.qcow2` (extended L2 entries when `extended`) with three snapshots, each taken after
/// different writes (data, zeroes, a discard), and writes after the last one; and a raw
/// file.
fn setup(sc: &Scratch, extended: bool) {
    let opts = if extended {
        "extended_l2=on,cluster_size=32k"
    } else {
        "cluster_size=4k"
    };
    sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", opts, "img.qcow2", "4M"]);
    let steps: [(&[&str], &str); 4] = [
        (&["write -P 0x11 0 100k", "write -P 0x12 1M 3000"], "first"),
        (&["write -P 0x21 4k 8k", "write -z 1M 4k"], "second"),
        (&["discard 0 64k", "write -P 0x31 2M 1M"], "third"),
        (&["write -P 0x41 8000 100"], ""),
    ];
    for (cmds, snap) in steps {
        sc.qemu_io_cmds("qcow2", "img.qcow2", cmds);
        if !snap.is_empty() {
            sc.qemu_img_ok(&["snapshot", "-c", snap, "img.qcow2"]);
        }
    }
    std::fs::write(sc.path("disk.raw"), vec![7u8; 65536]).unwrap();
}

#[test]
fn snapshot_list_like_qemu() {
    if !have_qemu() {
        return;
    }
    for extended in [false, true] {
        let sc = Scratch::new();
        setup(&sc, extended);
        for args in [
            "snapshot -l img.qcow2",
            "snapshot img.qcow2",
            "snapshot -q -l img.qcow2",
            "snapshot -U -l img.qcow2",
            "snapshot -l disk.raw",
            "snapshot -l -c x img.qcow2",
            "snapshot -l -d first img.qcow2",
            "snapshot -l missing.qcow2",
            "snapshot",
            "snapshot img.qcow2 disk.raw",
        ] {
            let argv: Vec<&str> = args.split(' ').collect();
            same(&sc, &argv);
        }
        // An image without snapshots lists nothing.
        sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "none.qcow2", "1M"]);
        same(&sc, &["snapshot", "-l", "none.qcow2"]);
    }
}

#[test]
fn convert_reads_snapshots_like_qemu() {
    if !have_qemu() {
        return;
    }
    for extended in [false, true] {
        let twins = Twins::new(|sc| setup(sc, extended));
        for (i, l) in [
            "first",
            "2",
            "snapshot.id=3",
            "snapshot.name=second",
            "snapshot.id=1,snapshot.name=first",
        ]
        .into_iter()
        .enumerate()
        {
            for fmt in ["raw", "qcow2"] {
                let out = format!("out{i}.{fmt}");
                assert!(
                    twins.run_both(&["convert", "-O", fmt, "-l", l, "img.qcow2", &out]),
                    "-l {l}"
                );
                twins.assert_same_image(&out, &format!("convert -l {l} -O {fmt}"));
            }
        }
        // The snapshots differ from each other and from the image.
        let sc = &twins.ours;
        let read = |name: &str| std::fs::read(sc.path(name)).unwrap();
        assert!(read("out0.raw") != read("out1.raw") && read("out1.raw") != read("out2.raw"));
        sc.ours_ok(&["convert", "-O", "raw", "img.qcow2", "now.raw"]);
        assert!(read("now.raw") != read("out2.raw"));
        for args in [
            "convert -O raw -l nonexist img.qcow2 x.raw",
            "convert -O raw -l snapshot.id=1,snapshot.name=second img.qcow2 x.raw",
            "convert -O raw -l first img.qcow2 img.qcow2 x.raw",
            "convert -O raw -l first disk.raw x.raw",
        ] {
            let argv: Vec<&str> = args.split(' ').collect();
            assert!(!twins.run_both(&argv), "{args} succeeded");
        }
    }
}

/// A snapshot of an overlay reads through the overlay's backing file.
#[test]
fn convert_reads_a_snapshot_of_an_overlay() {
    if !have_qemu() {
        return;
    }
    let twins = Twins::new(|sc| {
        std::fs::write(sc.path("base.raw"), vec![0x5au8; 1 << 20]).unwrap();
        sc.qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "top.qcow2",
            "2M",
        ]);
        sc.qemu_io_cmds("qcow2", "top.qcow2", &["write -P 1 4k 1k"]);
        sc.qemu_img_ok(&["snapshot", "-c", "s", "top.qcow2"]);
        sc.qemu_io_cmds("qcow2", "top.qcow2", &["write -P 2 0 1M"]);
    });
    assert!(twins.run_both(&["convert", "-O", "raw", "-l", "s", "top.qcow2", "s.raw"]));
    twins.assert_same_image("s.raw", "snapshot of an overlay");
}

/// Snapshot list rows without their dates (twins are made at different instants).
fn undated(list: &str) -> String {
    list.lines()
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            if cols.len() >= 7 && cols[0].chars().all(|c| c.is_ascii_digit()) {
                // ID TAG VM_SIZE(2 words) DATE(2 words) VM_CLOCK ICOUNT
                format!(
                    "{} {} {} {}",
                    cols[0],
                    cols[1],
                    cols[cols.len() - 2],
                    cols[cols.len() - 1]
                )
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The same `snapshot -c/-a/-d` sequences (with writes between) on twin images, ours with
/// our tool and qemu's with qemu-img: the same guest contents, the same snapshots with the
/// same contents, both images clean; and each tool takes over the other's snapshots.
#[test]
fn snapshot_changes_like_qemu() {
    if !have_qemu() {
        return;
    }
    let images: [(&str, &str); 4] = [
        ("plain", "cluster_size=4k"),
        ("extended", "extended_l2=on,cluster_size=32k"),
        ("refcount2", "refcount_bits=2,cluster_size=4k"),
        ("compressed", "cluster_size=4k"),
    ];
    for (what, opts) in images {
        let twins = Twins::new(|sc| {
            if what == "compressed" {
                let text: Vec<u8> = b"snapshot over compressed clusters\n"
                    .iter()
                    .copied()
                    .cycle()
                    .take(300_000)
                    .collect();
                std::fs::write(sc.path("src.raw"), &text).unwrap();
                sc.qemu_img_ok(&[
                    "convert",
                    "-q",
                    "-c",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    "-o",
                    opts,
                    "src.raw",
                    "img.qcow2",
                ]);
                sc.qemu_img_ok(&["resize", "-q", "img.qcow2", "4M"]);
            } else {
                sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", opts, "img.qcow2", "4M"]);
            }
        });
        let io = |cmds: &[&str]| {
            twins.ours.qemu_io_cmds("qcow2", "img.qcow2", cmds);
            twins.qemu.qemu_io_cmds("qcow2", "img.qcow2", cmds);
        };
        let both = |args: &str| {
            let argv: Vec<&str> = args.split(' ').collect();
            let ours = twins.ours.ours(&argv);
            let theirs = twins.qemu.qemu_img(&argv);
            assert_eq!(
                ours.status.code(),
                theirs.status.code(),
                "{what}: {args}: {}",
                stderr(&ours)
            );
            assert_eq!(
                messages_as_ours(&ours),
                messages_as_ours(&theirs),
                "{what}: messages of {args}"
            );
        };
        let same_state = |step: &str| {
            twins.assert_same_image("img.qcow2", &format!("{what} after {step}"));
            let list = |sc: &Scratch, tool: &str| {
                let out = if tool == "ours" {
                    sc.ours(&["snapshot", "-l", "img.qcow2"])
                } else {
                    sc.qemu_img(&["snapshot", "-l", "img.qcow2"])
                };
                undated(&stdout(&out))
            };
            let (a, b) = (list(&twins.ours, "ours"), list(&twins.qemu, "qemu"));
            assert_eq!(a, b, "{what} after {step}: snapshot lists");
            for line in a.lines().skip(2) {
                let id = line.split_whitespace().next().unwrap();
                for sc in [&twins.ours, &twins.qemu] {
                    sc.qemu_img_ok(&[
                        "convert",
                        "-O",
                        "raw",
                        "-l",
                        id,
                        "img.qcow2",
                        &format!("snap{id}.raw"),
                    ]);
                }
                let read = |sc: &Scratch| std::fs::read(sc.path(&format!("snap{id}.raw"))).unwrap();
                assert!(
                    read(&twins.ours) == read(&twins.qemu),
                    "{what} after {step}: snapshot {id}"
                );
            }
        };
        io(&[
            "write -P 0x11 0 64k",
            "write -z 1M 64k",
            "write -P 0x12 2M 5000",
        ]);
        both("snapshot -c first img.qcow2");
        same_state("create first");
        io(&[
            "write -P 0x21 4k 4k",
            "discard 2M 64k",
            "write -P 0x22 3M 1M",
        ]);
        both("snapshot -c second img.qcow2");
        both("snapshot -c first img.qcow2");
        same_state("create second, and first again");
        io(&["write -P 0x31 0 4M"]);
        both("snapshot -a first img.qcow2");
        same_state("apply first");
        io(&["write -P 0x41 8k 12k"]);
        both("snapshot -a 2 img.qcow2");
        same_state("apply 2");
        both("snapshot -d first img.qcow2");
        same_state("delete first");
        both("snapshot -d nonexist img.qcow2");
        both("snapshot -a nonexist img.qcow2");
        both("snapshot -d 2 img.qcow2");
        both("snapshot -d second img.qcow2");
        both("snapshot -d first img.qcow2");
        same_state("delete everything");
        // Each tool takes over the other's snapshots.
        let (ours, qemu) = (&twins.ours, &twins.qemu);
        // (qemu-img leaks what a failed apply had referenced already: not ours to judge.)
        qemu.qemu_img(&["check", "-r", "leaks", "img.qcow2"]);
        qemu.qemu_img_ok(&["snapshot", "-c", "q", "img.qcow2"]);
        ours.ours_ok(&["snapshot", "-c", "q", "img.qcow2"]);
        std::fs::copy(qemu.path("img.qcow2"), ours.path("theirs.qcow2")).unwrap();
        ours.qemu_io_cmds("qcow2", "theirs.qcow2", &["write -P 0x51 0 8k"]);
        ours.ours_ok(&["snapshot", "-a", "q", "theirs.qcow2"]);
        ours.ours_ok(&["snapshot", "-d", "q", "theirs.qcow2"]);
        ours.qemu_img_ok(&["check", "theirs.qcow2"]);
        ours.qemu_img_ok(&["snapshot", "-a", "q", "img.qcow2"]);
        ours.qemu_img_ok(&["snapshot", "-d", "q", "img.qcow2"]);
        ours.qemu_img_ok(&["check", "img.qcow2"]);
        ours.qemu_img_ok(&["compare", "img.qcow2", "theirs.qcow2"]);
    }
}

/// Creating a snapshot needs one more reference to every cluster: with 1-bit refcounts
/// that is impossible, and fails as in qemu-img, leaving the image clean.
#[test]
fn snapshot_refused_where_refcounts_cannot_grow() {
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
        "refcount_bits=1",
        "r.qcow2",
        "1M",
    ]);
    sc.qemu_io_cmds("qcow2", "r.qcow2", &["write 0 64k"]);
    std::fs::copy(sc.path("r.qcow2"), sc.path("q.qcow2")).unwrap();
    let ours = sc.ours(&["snapshot", "-c", "x", "r.qcow2"]);
    let theirs = sc.qemu_img(&["snapshot", "-c", "x", "q.qcow2"]);
    assert_eq!(ours.status.code(), theirs.status.code());
    assert_eq!(messages_as_ours(&ours), messages_as_ours(&theirs));
    // (qemu-img leaks the L1 copy it allocated first; we allocate nothing before.)
    sc.qemu_img_ok(&["check", "r.qcow2"]);
    sc.qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=r.data",
        "d.qcow2",
        "1M",
    ]);
    same(&sc, &["snapshot", "-c", "x", "d.qcow2"]);
}

/// `measure -l` measures a snapshot's contents, as qemu-img does.
#[test]
fn measure_reads_snapshots_like_qemu() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    setup(&sc, false);
    for l in ["first", "2", "snapshot.name=third", "nonexist"] {
        for out in ["human", "json"] {
            let o = format!("--output={out}");
            same(&sc, &["measure", &o, "-O", "qcow2", "-l", l, "img.qcow2"]);
        }
    }
}

/// Applying a snapshot taken at another disk size gives the disk that size again, as
/// qemu-img 10 does (growing and shrinking).
#[test]
fn apply_restores_the_snapshot_size_like_qemu() {
    if !have_qemu() {
        return;
    }
    let twins = Twins::new(|sc| {
        sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "img.qcow2", "1M"]);
        sc.qemu_io_cmds("qcow2", "img.qcow2", &["write -P 1 0 64k"]);
    });
    for (step, args) in [
        "snapshot -c small img.qcow2",
        "resize img.qcow2 3G",
        "snapshot -c big img.qcow2",
        "snapshot -a small img.qcow2",
        "snapshot -a big img.qcow2",
        "resize --shrink img.qcow2 512k",
        "snapshot -a small img.qcow2",
    ]
    .into_iter()
    .enumerate()
    {
        let argv: Vec<&str> = args.split(' ').collect();
        let (ours, theirs) = (twins.ours.ours(&argv), twins.qemu.qemu_img(&argv));
        assert_eq!(
            ours.status.code(),
            theirs.status.code(),
            "{args}: {}",
            stderr(&ours)
        );
        if step == 1 {
            twins
                .ours
                .qemu_io_cmds("qcow2", "img.qcow2", &["write -P 2 2G 64k"]);
            twins
                .qemu
                .qemu_io_cmds("qcow2", "img.qcow2", &["write -P 2 2G 64k"]);
        }
        twins.assert_same_image("img.qcow2", args);
    }
}
