//! `compare` exit codes and messages agree with qemu-img's.

mod common;

use common::{have_qemu, stdout, Scratch};

#[test]
fn compare_like_qemu() {
    if !have_qemu() {
        return;
    }
    let sc = Scratch::new();
    let img = |name: &str, size: &str, cmds: &[&str]| {
        sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", name, size]);
        let mut args: Vec<&str> = cmds.iter().flat_map(|c| ["-c", *c]).collect();
        args.push(name);
        sc.qemu_io_ok(&args);
    };
    img("a.qcow2", "4M", &["write -P 1 0 1M"]);
    img("b.qcow2", "4M", &["write -P 1 0 1M", "write -P 2 700k 1"]);
    img("long.qcow2", "8M", &["write -P 1 0 1M", "write -P 3 6M 1k"]);
    img("same-long.qcow2", "8M", &["write -P 1 0 1M"]);
    img(
        "zeroes.qcow2",
        "4M",
        &["write -P 1 0 1M", "write -P 0 2M 1M"],
    );
    sc.qemu_img_ok(&["convert", "-O", "raw", "a.qcow2", "a.raw"]);
    let cases: &[(&[&str], i32)] = &[
        (&["a.qcow2", "a.qcow2"], 0),
        (&["a.qcow2", "b.qcow2"], 1),
        (&["b.qcow2", "a.qcow2"], 1),
        (&["a.qcow2", "long.qcow2"], 1),
        (&["long.qcow2", "a.qcow2"], 1),
        (&["a.qcow2", "same-long.qcow2"], 0),
        (&["a.qcow2", "zeroes.qcow2"], 0),
        (&["-s", "a.qcow2", "same-long.qcow2"], 1),
        (&["-s", "a.qcow2", "a.raw"], 1),
        (&["a.qcow2", "a.raw"], 0),
        (&["-f", "qcow2", "-F", "raw", "a.qcow2", "a.raw"], 0),
        (&["-q", "a.qcow2", "b.qcow2"], 1),
        (&["a.qcow2", "missing.qcow2"], 2),
        (&["-f", "qcow2", "a.raw", "a.qcow2"], 2),
    ];
    for (args, code) in cases {
        let mut a = vec!["compare"];
        a.extend_from_slice(args);
        let ours = sc.ours(&a);
        let theirs = sc.qemu_img(&a);
        assert_eq!(theirs.status.code(), Some(*code), "qemu-img {a:?}");
        assert_eq!(
            ours.status.code(),
            Some(*code),
            "qcow2 {a:?}: {}",
            common::stderr(&ours)
        );
        assert_eq!(stdout(&ours), stdout(&theirs), "{a:?}");
        // With -p: the progress lines too.
        let mut p = vec!["compare", "-p"];
        p.extend_from_slice(args);
        assert_eq!(stdout(&sc.ours(&p)), stdout(&sc.qemu_img(&p)), "{p:?}");
    }
}
