//! `snapshot -l` and `convert -l` against qemu-img on images with internal snapshots that
//! qemu-img made: the same listing, the same snapshot contents, the same messages.

mod common;

use common::{have_qemu, messages_as_ours, stderr, stdout, Scratch, Twins};

/// Runs `args` with our tool and with qemu-img on the same files (snapshot dates must be
/// the same): the same stdout, status and messages.
fn same(sc: &Scratch, args: &[&str]) {
    let (ours, theirs) = (sc.ours(args), sc.qemu_img(args));
    assert_eq!(stdout(&ours), stdout(&theirs), "stdout of {args:?}");
    assert_eq!(
        ours.status.code(),
        theirs.status.code(),
        "status of {args:?}"
    );
    assert_eq!(
        messages_as_ours(&ours),
        messages_as_ours(&theirs),
        "messages of {args:?}"
    );
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
fn snapshot_changes_are_refused_without_touching_the_image() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    setup(&sc, false);
    let before = std::fs::read(sc.path("img.qcow2")).unwrap();
    for flag in ["-c", "-a", "-d"] {
        let out = sc.ours(&["snapshot", flag, "first", "img.qcow2"]);
        assert_eq!(out.status.code(), Some(1), "{flag}");
        assert!(
            stderr(&out).contains("not supported yet"),
            "{flag}: {}",
            stderr(&out)
        );
    }
    assert!(std::fs::read(sc.path("img.qcow2")).unwrap() == before);
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
