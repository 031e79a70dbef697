//! `bitmap --dump` against QEMU's own reading of the same bitmaps: qemu-nbd's dirty-bitmap
//! export, mapped by qemu-img (`x-dirty-bitmap`: dirty extents show as `"data": false`).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{have_qemu, json, stderr, Scratch};

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
        (
            &["bitmap", "--clear", "img.qcow2", "all"][..],
            "not supported yet",
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
