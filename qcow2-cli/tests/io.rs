//! `io` writes and verifies patterns across reopens, and reports like qemu-io.

mod common;

use common::{have_qemu, stdout, Scratch};

#[test]
fn write_then_read_pattern_across_reopen() {
    let sc = Scratch::new();
    sc.ours_ok(&["create", "-q", "-f", "qcow2", "a.qcow2", "64M"]);
    let out = sc.ours_ok(&[
        "io",
        "-c",
        "write -P 0xab 1M 64k",
        "-c",
        "write -P 7 0 512",
        "-c",
        "flush",
        "a.qcow2",
    ]);
    assert!(
        out.starts_with("wrote 65536/65536 bytes at offset 1048576\n64 KiB, 1 ops; "),
        "{out}"
    );
    assert!(
        out.contains("\nwrote 512/512 bytes at offset 0\n512 bytes, 1 ops; "),
        "{out}"
    );
    // A new process: the data is there.
    let out = sc.ours_ok(&[
        "io",
        "-r",
        "-c",
        "read -P 0xab 1M 64k",
        "-c",
        "read -P 7 0 512",
        "-c",
        "read -P 0 512 1k",
        "a.qcow2",
    ]);
    assert!(
        out.starts_with("read 65536/65536 bytes at offset 1048576\n"),
        "{out}"
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // A mismatch is reported like qemu-io and fails the run.
    let bad = sc.ours(&["io", "-c", "read -P 0xac 1M 64k", "a.qcow2"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(stdout(&bad).starts_with(
        "Pattern verification failed at offset 1048576, 65536 bytes\nread 65536/65536"
    ));
    // Zeroes and discard.
    sc.ours_ok(&[
        "io",
        "-c",
        "write -z 1M 4k",
        "-c",
        "discard 2M 64k",
        "-c",
        "read -q -P 0 1M 4k",
        "a.qcow2",
    ]);
    sc.ours_ok(&[
        "io",
        "-t",
        "none",
        "-c",
        "read -P 0xab 1028k 60k",
        "a.qcow2",
    ]);
}

#[test]
fn qemu_io_reads_what_we_wrote_and_back() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    sc.ours_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "a.qcow2",
        "16M",
    ]);
    sc.ours_ok(&[
        "io",
        "-c",
        "write -P 0x5a 3000 70000",
        "-c",
        "write -z -u 8M 1M",
        "a.qcow2",
    ]);
    sc.qemu_io_ok(&[
        "-c",
        "read -P 0x5a 3000 70000",
        "-c",
        "read -P 0 0 3000",
        "a.qcow2",
    ]);
    sc.qemu_img_ok(&["check", "a.qcow2"]);
    sc.qemu_io_ok(&["-c", "write -P 0x6b 10M 100k", "a.qcow2"]);
    let out = sc.ours_ok(&[
        "io",
        "-c",
        "read -P 0x6b 10M 100k",
        "-c",
        "read -P 0x5a 3000 70000",
        "a.qcow2",
    ]);
    assert!(!out.contains("failed"), "{out}");
}

#[test]
fn messages_match_qemu_io() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    for cmd in [
        "bogus 1 2",
        "read 1X 1",
        "read 0",
        "write -P 300 0 1",
        "write -x 0 1",
        "write -u 0 1",
        "read 0 1 2",
        "read -P 0 0 64k -q",
    ] {
        let ours = sc.ours(&["io", "-c", cmd, "a.qcow2"]);
        let theirs = sc.qemu_io(&["-c", cmd, "a.qcow2"]);
        assert_eq!(stdout(&ours), stdout(&theirs), "{cmd}");
        assert_eq!(common::stderr(&ours), common::stderr(&theirs), "{cmd}");
        assert_eq!(ours.status.code(), theirs.status.code(), "{cmd}");
    }
}

#[test]
fn raw_files_work_and_probed_raw_protects_sector_zero() {
    let sc = Scratch::new();
    std::fs::write(sc.path("a.raw"), vec![0u8; 1 << 20]).unwrap();
    sc.ours_ok(&[
        "io",
        "-f",
        "raw",
        "-c",
        "write -P 1 0 4k",
        "-c",
        "read -P 1 0 4k",
        "a.raw",
    ]);
    let probed = sc.ours(&["io", "-c", "write -P 2 0 512", "a.raw"]);
    assert_eq!(probed.status.code(), Some(1));
    assert!(common::stderr(&probed).contains("probing guessed raw"));
    sc.ours_ok(&["io", "-c", "write -P 2 4k 512", "a.raw"]);
}

#[test]
fn commands_from_stdin() {
    use std::io::Write;
    let sc = Scratch::new();
    sc.ours_ok(&["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    let mut child = std::process::Command::new(common::QCOW2)
        .args(["io", sc.path("a.qcow2").to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"write -P 3 0 4k\nread -P 3 0 4k\nquit\nread -P 4 0 4k\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(
        text.starts_with("wrote 4096/4096 bytes at offset 0\n"),
        "{text}"
    );
    assert!(
        text.contains("read 4096/4096 bytes at offset 0\n"),
        "{text}"
    );
    assert!(!text.contains("Pattern verification failed"), "{text}");
}
