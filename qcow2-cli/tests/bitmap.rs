//! `bitmap --dump` against QEMU's own reading of the same bitmaps: qemu-nbd's dirty-bitmap
//! export, mapped by qemu-img (`x-dirty-bitmap`: dirty extents show as `"data": false`).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{have_qemu, json, stderr, Scratch, Twins};

/// The dirty ranges of bitmap `name` of `file` as qemu-nbd exports them.
fn qemu_dirty(sc: &Scratch, file: &str, name: &str) -> Vec<(u64, u64)> {
    let sock = sc.path("nbd.sock");
    let _ = std::fs::remove_file(&sock);
    let mut nbd = Command::new("qemu-nbd")
        .args(["-r", "-t", "-f", "qcow2", "-B", name])
        .arg(format!("--socket={}", sock.display()))
        .arg(sc.path(file))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd runs");
    let started = Instant::now();
    while !sock.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "qemu-nbd did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        sock.display()
    );
    let out = sc.qemu_img_ok(&["map", "--output=json", "--image-opts", &opts]);
    let _ = nbd.kill();
    let _ = nbd.wait();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for e in json(&out).as_array().expect("map is a list") {
        if e["data"] == false {
            let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            match ranges.last_mut() {
                Some(l) if l.0 + l.1 == start => l.1 += len,
                _ => ranges.push((start, len)),
            }
        }
    }
    ranges
}

/// Ours, from `bitmap --dump --output=json`.
fn our_dirty(sc: &Scratch, file: &str, name: &str) -> Vec<(u64, u64)> {
    let out = sc.ours_ok(&["bitmap", "--dump", "--output=json", file, name]);
    json(&out)
        .as_array()
        .expect("a list")
        .iter()
        .map(|r| (r["start"].as_u64().unwrap(), r["length"].as_u64().unwrap()))
        .collect()
}

#[test]
fn dump_agrees_with_qemu_nbd() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    let bitmap = |args: &[&str]| {
        let mut a = vec!["bitmap"];
        a.extend_from_slice(args);
        sc.qemu_img_ok(&a);
    };
    // An odd size (a partial last granule), bitmaps of several granularities, one disabled
    // before the writes, one cleared, one merged, one added after the writes.
    sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "img.qcow2", "100000001"]);
    bitmap(&["--add", "img.qcow2", "all"]);
    bitmap(&["--add", "-g", "512", "img.qcow2", "fine"]);
    bitmap(&["--add", "-g", "2M", "img.qcow2", "coarse"]);
    bitmap(&["--add", "--disable", "img.qcow2", "off"]);
    bitmap(&["--add", "img.qcow2", "cleared"]);
    sc.qemu_io_cmds(
        "qcow2",
        "img.qcow2",
        &[
            "write 0 1",
            "write 1M 64k",
            "write -z 5000000 70000",
            "discard 40M 3M",
            "write 99999000 1001",
        ],
    );
    bitmap(&["--clear", "img.qcow2", "cleared"]);
    bitmap(&["--add", "img.qcow2", "late"]);
    bitmap(&["--merge", "fine", "img.qcow2", "late"]);
    sc.qemu_io_cmds("qcow2", "img.qcow2", &["write 77M 4k"]);
    for name in ["all", "fine", "coarse", "off", "cleared", "late"] {
        let theirs = qemu_dirty(&sc, "img.qcow2", name);
        assert_eq!(our_dirty(&sc, "img.qcow2", name), theirs, "bitmap {name}");
    }
    // Human output: a header and a line per range.
    let human = sc.ours_ok(&["bitmap", "--dump", "img.qcow2", "all"]);
    assert!(human.starts_with("Offset          Length\n0x0 "), "{human}");
    // A missing bitmap, a raw image, a missing action.
    std::fs::write(sc.path("r.raw"), [0u8; 512]).unwrap();
    for (args, says) in [
        (
            &["bitmap", "--dump", "img.qcow2", "nope"][..],
            "Dirty bitmap 'nope' not found",
        ),
        (
            &["bitmap", "--dump", "r.raw", "all"][..],
            "Dirty bitmap 'all' not found",
        ),
        (&["bitmap", "img.qcow2", "all"][..], "Need at least one of"),
        (
            &["bitmap", "--dump", "img.qcow2"][..],
            "Expecting filename and bitmap name",
        ),
    ] {
        let out = sc.ours(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
}

/// A bitmap left in use (a writer that did not close) cannot be dumped: its bits mean
/// nothing.
#[test]
fn dump_refuses_an_inconsistent_bitmap() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "img.qcow2", "1M"]);
    sc.qemu_img_ok(&["bitmap", "--add", "img.qcow2", "b"]);
    // qemu-io's abort leaves the bitmap marked in use.
    let _ = sc.qemu_io(&["-c", "write 0 4k", "-c", "abort", "img.qcow2"]);
    let out = sc.ours(&["bitmap", "--dump", "img.qcow2", "b"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("inconsistent"), "{}", stderr(&out));
}

/// The steps of the edit scripts: `bitmap` actions (run by both tools' `bitmap`), `io`
/// commands (our `io`, qemu-io) and `resize`.
const SCRIPT: &[&[&str]] = &[
    &["bitmap", "--add", "img.qcow2", "all"],
    &["bitmap", "--add", "-g", "512", "img.qcow2", "fine"],
    &[
        "bitmap",
        "--add",
        "-g",
        "2M",
        "--disable",
        "img.qcow2",
        "coarse",
    ],
    &[
        "io",
        "write 0 1",
        "write 1M 64k",
        "write -z 5000000 70000",
        "discard 40M 3M",
    ],
    &["bitmap", "--enable", "img.qcow2", "coarse"],
    &["bitmap", "--add", "img.qcow2", "late"],
    &["io", "write 99999000 1001", "write -P 7 33M 100k"],
    &["bitmap", "--clear", "--disable", "img.qcow2", "all"],
    &["bitmap", "--merge", "fine", "img.qcow2", "late"],
    &["io", "write 77M 4k", "write 512 512"],
    &["resize", "img.qcow2", "120000000"],
    &["io", "write 110M 3k"],
    &["bitmap", "--add", "img.qcow2", "gone"],
    &["bitmap", "--remove", "img.qcow2", "fine"],
    &["resize", "--shrink", "img.qcow2", "89999872"],
    &["io", "write 80M 1k"],
    &["bitmap", "--remove", "img.qcow2", "gone"],
];
const NAMES: [&str; 4] = ["all", "coarse", "late", "fine"];

/// Runs script step `step` on `sc`'s image with our tool (`ours`) or QEMU's.
fn run_step(sc: &Scratch, step: &[&str], ours: bool) {
    if step[0] == "io" {
        if ours {
            let mut args = vec!["io", "-f", "qcow2"];
            for c in &step[1..] {
                args.extend(["-c", c]);
            }
            args.push("img.qcow2");
            sc.ours_ok(&args);
        } else {
            sc.qemu_io_cmds("qcow2", "img.qcow2", &step[1..]);
        }
    } else if ours {
        sc.ours_ok(step);
    } else {
        sc.qemu_img_ok(step);
    }
}

/// Runs the script on twin images, ours with our tool (with `relay`, with our tool and
/// QEMU's in turn), the other with QEMU's; after each step both images list the same
/// bitmaps, and every bitmap reads the same through QEMU's own export (and our dump).
fn mirror(relay: bool) {
    let twins = Twins::new(|sc| {
        sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "img.qcow2", "100000001"]);
    });
    for (k, step) in SCRIPT.iter().enumerate() {
        run_step(&twins.ours, step, !relay || k % 2 == 0);
        run_step(&twins.qemu, step, false);
        let list = bitmap_list_of(&twins.qemu, "img.qcow2");
        assert_eq!(
            bitmap_list_of(&twins.ours, "img.qcow2"),
            list,
            "after step {k} {step:?}"
        );
        if step[0] != "io" && k != SCRIPT.len() - 1 {
            continue;
        }
        for name in NAMES {
            if !list.to_string().contains(&format!("\"{name}\"")) {
                continue;
            }
            let theirs = qemu_dirty(&twins.qemu, "img.qcow2", name);
            assert_eq!(
                qemu_dirty(&twins.ours, "img.qcow2", name),
                theirs,
                "bitmap {name} after step {k} {step:?}, through qemu-nbd"
            );
            assert_eq!(
                our_dirty(&twins.ours, "img.qcow2", name),
                theirs,
                "bitmap {name}"
            );
        }
    }
    twins.assert_same_image("img.qcow2", "after the script");
    for sc in [&twins.ours, &twins.qemu] {
        sc.qemu_img_ok(&["check", "img.qcow2"]);
        sc.ours_ok(&["check", "img.qcow2"]);
    }
}

#[test]
fn edits_and_writes_mirror_qemu() {
    if have_qemu() {
        mirror(false);
    }
}

/// The same, with our tool and QEMU's taking turns on one image: each keeps the other's
/// bitmaps.
#[test]
fn edits_and_writes_relayed_between_tools() {
    if have_qemu() {
        mirror(true);
    }
}

/// Refused edits fail as qemu-img's do (message, status), and change nothing.
#[test]
fn refused_edits_match_qemu() {
    if !have_qemu() {
        return;
    }
    let twins = Twins::new(|sc| {
        sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "img.qcow2", "1M"]);
        sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "two.qcow2", "2M"]);
        sc.qemu_img_ok(&["bitmap", "--add", "img.qcow2", "b"]);
        sc.qemu_img_ok(&["bitmap", "--add", "two.qcow2", "s"]);
        sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "stale.qcow2", "1M"]);
        sc.qemu_img_ok(&["bitmap", "--add", "stale.qcow2", "b"]);
        // qemu-io's abort leaves the bitmap marked in use.
        let _ = sc.qemu_io(&["-c", "write 0 4k", "-c", "abort", "stale.qcow2"]);
    });
    for line in [
        "bitmap --add img.qcow2 b",
        "bitmap --remove img.qcow2 nope",
        "bitmap --add -g 100 img.qcow2 c",
        "bitmap --add -g 4G img.qcow2 c",
        "bitmap -g 64k --clear img.qcow2 b",
        "bitmap --merge nope img.qcow2 b",
        "bitmap --merge s -b two.qcow2 img.qcow2 b",
        "bitmap --merge s -b two.qcow2 --add img.qcow2 m",
        "bitmap --clear stale.qcow2 b",
        "bitmap --enable stale.qcow2 b",
        "bitmap --remove stale.qcow2 b",
        "bitmap --add --clear --disable img.qcow2 fresh",
    ] {
        twins.run_both(&common::args(line));
        assert_eq!(
            bitmap_list_of(&twins.ours, "img.qcow2"),
            bitmap_list_of(&twins.qemu, "img.qcow2"),
            "{line}"
        );
        assert_eq!(
            bitmap_list_of(&twins.ours, "stale.qcow2"),
            bitmap_list_of(&twins.qemu, "stale.qcow2"),
            "{line}"
        );
    }
    // Version 2 images have no bitmaps (qemu-img names its node where we name the file).
    twins.ours.qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "v2.qcow2",
        "1M",
    ]);
    let out = twins.ours.ours(&["bitmap", "--add", "v2.qcow2", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("Cannot store dirty bitmaps in qcow2 v2 files"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        bitmap_list_of(&twins.ours, "v2.qcow2"),
        serde_json::Value::Null
    );
}

/// The bitmaps `info` lists (names, flags, granularities), by qemu-img.
fn bitmap_list_of(sc: &Scratch, file: &str) -> serde_json::Value {
    let v = json(&sc.qemu_img_ok(&["info", "-U", "--output=json", file]));
    v["format-specific"]["data"]["bitmaps"].clone()
}

/// `convert --bitmaps` copies every bitmap (bits, granularity, enabled or not) as qemu-img
/// does, and refuses what it refuses, with its messages.
#[test]
fn convert_copies_bitmaps_like_qemu() {
    if !have_qemu() {
        return;
    }
    let twins = Twins::new(|sc| {
        sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "src.qcow2", "100M"]);
        sc.qemu_img_ok(&["bitmap", "--add", "src.qcow2", "a"]);
        sc.qemu_img_ok(&["bitmap", "--add", "-g", "512", "src.qcow2", "b"]);
        sc.qemu_io_cmds("qcow2", "src.qcow2", &["write 0 1M", "write 70M 3k"]);
        sc.qemu_img_ok(&["bitmap", "--disable", "src.qcow2", "a"]);
        sc.qemu_io_cmds("qcow2", "src.qcow2", &["write 90M 64k"]);
        sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "dst.qcow2", "100M"]);
        sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "stale.qcow2", "1M"]);
        sc.qemu_img_ok(&["bitmap", "--add", "stale.qcow2", "s"]);
        let _ = sc.qemu_io(&["-c", "write 0 4k", "-c", "abort", "stale.qcow2"]);
    });
    for line in [
        "convert --bitmaps -O qcow2 src.qcow2 new.qcow2",
        "convert -n --bitmaps -O qcow2 src.qcow2 dst.qcow2",
        "convert -n --bitmaps -O qcow2 src.qcow2 dst.qcow2",
        "convert --bitmaps -O raw src.qcow2 r.raw",
        "convert --bitmaps -O qcow2 src.qcow2 src.qcow2 two.qcow2",
        "convert --bitmaps -O qcow2 stale.qcow2 s1.qcow2",
        "convert --bitmaps --skip-broken-bitmaps -O qcow2 stale.qcow2 s2.qcow2",
    ] {
        twins.run_both(&common::args(line));
    }
    for file in ["new.qcow2", "dst.qcow2", "s2.qcow2"] {
        assert_eq!(
            bitmap_list_of(&twins.ours, file),
            bitmap_list_of(&twins.qemu, file),
            "{file}"
        );
    }
    for (file, name) in [("new.qcow2", "a"), ("new.qcow2", "b"), ("dst.qcow2", "b")] {
        let theirs = qemu_dirty(&twins.qemu, file, name);
        assert!(!theirs.is_empty());
        assert_eq!(qemu_dirty(&twins.ours, file, name), theirs, "{file} {name}");
    }
    twins.assert_same_image("new.qcow2", "converted");
}
