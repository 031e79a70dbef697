//! Image locking from the command line: while qemu-io writes an image, our commands are
//! refused with qemu-img's message unless `-U` shares the image, as qemu-img does.

mod common;

use common::{have_qemu, stderr, Scratch};
use qcow2_conformance::qemu::Qemu;

#[test]
fn commands_respect_qemu_s_locks() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "busy.qcow2", "4M"]);
    sc.qemu_io_ok(&["-c", "write -P 0x5a 0 64k", "busy.qcow2"]);
    let q = Qemu::find().expect("qemu found above");
    let held = q.hold(&sc.path("busy.qcow2"), false);
    // Exit codes as qemu-img's (compare says 2 for errors).
    for (cmd, code) in [
        (&["info", "busy.qcow2"][..], 1),
        (&["check", "busy.qcow2"], 1),
        (&["map", "busy.qcow2"], 1),
        (&["compare", "busy.qcow2", "busy.qcow2"], 2),
        (&["io", "-c", "read 0 512", "busy.qcow2"], 1),
    ] {
        let out = sc.ours(cmd);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{cmd:?} ran while qemu-io writes"
        );
        let err = stderr(&out);
        assert!(
            err.contains("lock\nIs another process using the image [busy.qcow2]?"),
            "{cmd:?}: {err}"
        );
    }
    // Sharing: readers that accept a writer beside them.
    for cmd in [
        &["info", "-U", "busy.qcow2"][..],
        &["map", "-U", "busy.qcow2"],
        &["compare", "-U", "busy.qcow2", "busy.qcow2"],
    ] {
        let out = sc.ours(cmd);
        assert_eq!(out.status.code(), Some(0), "{cmd:?}: {}", stderr(&out));
    }
    drop(held);
    sc.ours_ok(&["info", "busy.qcow2"]);
    sc.ours_ok(&["io", "-c", "read -P 0x5a 0 64k", "busy.qcow2"]);
}
