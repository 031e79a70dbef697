//! `resize` grows and shrinks like qemu-img, and qemu-img sees the new size.

mod common;

use common::{have_qemu, json, Scratch};

fn qemu_size(sc: &Scratch, file: &str) -> u64 {
    json(&sc.qemu_img_ok(&["info", "--output=json", file]))["virtual-size"]
        .as_u64()
        .unwrap()
}

#[test]
fn grow_then_qemu_sees_the_size() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    sc.qemu_io_ok(&["-c", "write -P 9 0 1M", "a.qcow2"]);
    assert_eq!(
        sc.ours_ok(&["resize", "a.qcow2", "+1G"]),
        "Image resized.\n"
    );
    assert_eq!(qemu_size(&sc, "a.qcow2"), (1 << 30) + (1 << 20));
    sc.qemu_io_ok(&["-c", "read -P 9 0 1M", "-c", "read -P 0 1M 1M", "a.qcow2"]);
    sc.qemu_img_ok(&["check", "a.qcow2"]);
    assert_eq!(
        sc.ours_ok(&["resize", "-q", "-f", "qcow2", "a.qcow2", "3G"]),
        ""
    );
    assert_eq!(qemu_size(&sc, "a.qcow2"), 3 << 30);

    // Raw files too.
    sc.qemu_img_ok(&["create", "-q", "-f", "raw", "a.raw", "1M"]);
    sc.ours_ok(&["resize", "-f", "raw", "a.raw", "5M"]);
    assert_eq!(qemu_size(&sc, "a.raw"), 5 << 20);
}

#[test]
fn shrink_needs_consent() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "a.qcow2", "4M"]);
    sc.qemu_io_ok(&["-c", "write -P 9 0 1M", "a.qcow2"]);
    for args in [
        &["resize", "a.qcow2", "1M"][..],
        &["resize", "a.qcow2", "--", "-1M"],
        &["resize", "a.qcow2", "0"],
    ] {
        let ours = sc.ours(args);
        let theirs = sc.qemu_img(args);
        assert_eq!(ours.status.code(), Some(1), "{args:?}");
        assert_eq!(
            common::messages(&ours),
            common::messages(&theirs),
            "{args:?}"
        );
    }
    assert_eq!(qemu_size(&sc, "a.qcow2"), 4 << 20);
    sc.ours_ok(&["resize", "--shrink", "a.qcow2", "-2M"]);
    assert_eq!(qemu_size(&sc, "a.qcow2"), 2 << 20);
    sc.qemu_io_ok(&["-c", "read -P 9 0 1M", "a.qcow2"]);
    sc.qemu_img_ok(&["check", "a.qcow2"]);
}
