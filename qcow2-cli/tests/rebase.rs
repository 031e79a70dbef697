//! `rebase` side by side with qemu-img's: the same output, status and messages; images with
//! the same guest contents, backing file and allocation; guest contents unchanged by a safe
//! rebase; clean images.

mod common;

use common::{args, have_qemu, map_shape, Scratch, Twins};

/// An old chain, made by qemu: `base.qcow2` (or `base.raw`) under `top.qcow2`, and new
/// backing files to rebase onto: `new.qcow2` and `new.raw`, each partly the same as the old
/// one; `before.raw` holds what the image shows.
#[derive(Clone, Copy, Debug)]
struct Chain {
    /// Cluster size of the image rebased.
    cluster: &'static str,
    /// Its compat level.
    compat: &'static str,
    /// Format of the old backing file.
    old: &'static str,
    /// Sizes: old backing file, image, new backing files.
    old_size: &'static str,
    top_size: &'static str,
    new_size: &'static str,
}

/// A chain with the defaults, for the tests that are not about its layout.
const PLAIN: Chain = Chain {
    cluster: "64k",
    compat: "1.1",
    old: "qcow2",
    old_size: "4M",
    top_size: "5M",
    new_size: "2M",
};

impl Chain {
    fn build(&self, sc: &Scratch) {
        let old = format!("base.{}", self.old);
        sc.qemu_img_ok(&["create", "-q", "-f", self.old, &old, self.old_size]);
        let mut w = vec![
            "write -P 0x11 0 1M",
            "write -P 0x22 1536k 300k",
            "write -P 0x23 3000k 1000",
        ];
        if self.old == "qcow2" {
            w.push("write -z 2M 64k");
        }
        sc.qemu_io_cmds(self.old, &old, &w);
        let o = format!("cluster_size={},compat={}", self.cluster, self.compat);
        sc.qemu_overlay("top.qcow2", &old, self.old, &o, Some(self.top_size));
        let top = [
            "write -P 0x33 64k 4k",
            "write -z 512k 64k",
            "write -P 0x44 3000k 5000",
            "discard 1M 64k",
            "write -P 0x45 3900k 1k",
        ];
        sc.qemu_io_cmds("qcow2", "top.qcow2", &top);
        let same_and_different = [
            "write -P 0x11 0 512k",
            "write -P 0x55 700k 100k",
            "write -P 0x22 1600k 100k",
        ];
        for fmt in ["qcow2", "raw"] {
            let new = format!("new.{fmt}");
            sc.qemu_img_ok(&["create", "-q", "-f", fmt, &new, self.new_size]);
            sc.qemu_io_cmds(fmt, &new, &same_and_different);
        }
        sc.qemu_img_ok(&["convert", "-O", "raw", "top.qcow2", "before.raw"]);
    }
}

/// Runs `rebase` with `options` on `top.qcow2` with both tools over `chain`: the same
/// output, image and allocation, and (safe mode) the guest contents of before.
fn rebase_both(chain: &Chain, options: &str) {
    let twins = Twins::new(|sc| chain.build(sc));
    let line = format!("rebase {options} top.qcow2");
    let what = format!("{line} over {chain:?}");
    assert!(twins.run_both(&args(&line)), "{what} failed");
    twins.assert_same_image("top.qcow2", &what);
    assert_eq!(
        map_shape(&twins.ours, "top.qcow2"),
        map_shape(&twins.qemu, "top.qcow2"),
        "{what}: allocation of the image"
    );
    if !options.contains("-u") {
        let out = twins
            .ours
            .qemu_img_ok(&["compare", "top.qcow2", "before.raw"]);
        assert_eq!(
            out, "Images are identical.\n",
            "{what}: guest contents kept"
        );
    }
}

#[test]
fn safe_rebase_like_qemu() {
    if !have_qemu() {
        return;
    }
    let layouts = [
        ("512", "1.1"),
        ("4k", "0.10"),
        ("64k", "1.1"),
        ("64k", "0.10"),
        ("2M", "1.1"),
    ];
    let sizes = [
        ("qcow2", "4M", "5M", "2M"),
        ("raw", "4M", "4M", "6M"),
        ("qcow2", "3M", "5M", "5M"),
    ];
    let mut i = 0;
    for (cluster, compat) in layouts {
        for (old, old_size, top_size, new_size) in sizes {
            let chain = Chain {
                cluster,
                compat,
                old,
                old_size,
                top_size,
                new_size,
            };
            // Onto a new qcow2 file, a new raw file, and none; with and without progress.
            let progress = if i % 2 == 0 { "-p" } else { "" };
            i += 1;
            for new in ["-b new.qcow2 -F qcow2", "-b new.raw -F raw", "-b ''"] {
                rebase_both(&chain, &format!("{progress} {new}"));
            }
        }
    }
}

#[test]
fn unsafe_rebase_changes_only_the_header() {
    if !have_qemu() {
        return;
    }
    for options in [
        "-u -b new.qcow2 -F qcow2",
        "-u -b new.raw -F raw",
        "-u -b ''",
        "-u",
    ] {
        rebase_both(&PLAIN, options);
    }
    // A name that leads nowhere is written as it is.
    let twins = Twins::new(|sc| PLAIN.build(sc));
    assert!(twins.run_both(&args(
        "rebase -u -q -b elsewhere/base.qcow2 -F qcow2 top.qcow2"
    )));
    let info = |sc: &Scratch| {
        let v = common::json(&sc.qemu_img_ok(&["info", "--output=json", "-U", "top.qcow2"]));
        (
            v["backing-filename"].clone(),
            v["backing-filename-format"].clone(),
        )
    };
    assert_eq!(info(&twins.ours), info(&twins.qemu));
}

/// A moved backing file: `-u` repairs the name without opening the old file; safe mode
/// cannot open the image.
#[test]
fn unsafe_rebase_repairs_a_moved_backing_file() {
    if !have_qemu() {
        return;
    }
    let twins = Twins::new(|sc| {
        PLAIN.build(sc);
        std::fs::create_dir(sc.path("moved")).unwrap();
        std::fs::rename(sc.path("base.qcow2"), sc.path("moved/base.qcow2")).unwrap();
    });
    assert!(!twins.run_both(&args("rebase -b moved/base.qcow2 -F qcow2 top.qcow2")));
    assert!(!twins.run_both(&args("commit top.qcow2")));
    assert!(twins.run_both(&args("rebase -u -b moved/base.qcow2 -F qcow2 top.qcow2")));
    twins.assert_same_image("top.qcow2", "after repairing the name");
    twins
        .ours
        .qemu_img_ok(&["compare", "top.qcow2", "before.raw"]);
}

/// Onto a file further down the old chain (qemu's "prefix chain"): only what the files in
/// between change is compared; the guest contents stay.
#[test]
fn rebase_onto_a_file_of_the_old_chain() {
    rebase_within_a_chain("64k");
}

/// The same with a middle file of 4 KiB clusters (found a stall: a status request to a
/// backing file was submitted again while the first was in flight).
#[test]
fn rebase_onto_a_file_of_the_old_chain_small_clusters() {
    rebase_within_a_chain("4k");
}

fn rebase_within_a_chain(mid_cluster: &str) {
    if !have_qemu() {
        return;
    }
    for line in [
        "rebase -p -b base.qcow2 -F qcow2 top.qcow2",
        "rebase -p -b mid.qcow2 -F qcow2 top.qcow2",
        "rebase -p -b base.qcow2 -F qcow2 mid.qcow2",
    ] {
        let twins = Twins::new(|sc| sc.qemu_chain3(mid_cluster));
        assert!(twins.run_both(&args(line)), "{line}");
        let file = line.rsplit(' ').next().expect("a file");
        twins.assert_same_image(file, line);
        assert_eq!(
            map_shape(&twins.ours, file),
            map_shape(&twins.qemu, file),
            "{line}: allocation"
        );
        twins
            .ours
            .qemu_img_ok(&["compare", "top.qcow2", "before.raw"]);
    }
}

/// A relative new name is taken from the image's directory, not the current one.
#[test]
fn new_backing_names_are_relative_to_the_image() {
    if !have_qemu() {
        return;
    }
    let twins = Twins::new(|sc| {
        std::fs::create_dir(sc.path("vm")).unwrap();
        sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "vm/base.qcow2", "1M"]);
        sc.qemu_io_cmds("qcow2", "vm/base.qcow2", &["write -P 7 0 1M"]);
        sc.qemu_overlay("vm/top.qcow2", "base.qcow2", "qcow2", "", None);
        sc.qemu_img_ok(&["create", "-q", "-f", "raw", "vm/new.raw", "1M"]);
        sc.qemu_img_ok(&["convert", "-O", "raw", "vm/top.qcow2", "before.raw"]);
    });
    assert!(twins.run_both(&args("rebase -b new.raw -F raw vm/top.qcow2")));
    twins.assert_same_image("vm/top.qcow2", "relative name");
    twins
        .ours
        .qemu_img_ok(&["compare", "vm/top.qcow2", "before.raw"]);
}

/// Failures (and the partial work qemu does before some of them) are qemu-img's.
#[test]
fn rebase_fails_like_qemu() {
    if !have_qemu() {
        return;
    }
    let setup = |sc: &Scratch| {
        PLAIN.build(sc);
        sc.qemu_img_ok(&["create", "-q", "-f", "raw", "r.raw", "1M"]);
        sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "alone.qcow2", "3M"]);
    };
    let cases = [
        "rebase",
        "rebase top.qcow2",
        "rebase -b new.qcow2",
        "rebase -b new.qcow2 top.qcow2 alone.qcow2",
        "rebase -b missing.qcow2 top.qcow2",
        "rebase -b missing.qcow2 -F qcow2 top.qcow2",
        "rebase -b new.raw -F qcow2 top.qcow2",
        "rebase -b new.qcow2 -F foo top.qcow2",
        "rebase -t bogus -b new.qcow2 -F qcow2 top.qcow2",
        "rebase -T bogus -b new.qcow2 -F qcow2 top.qcow2",
        "rebase -p -T bogus -b new.qcow2 -F qcow2 top.qcow2",
        // Copies what differs, then refuses to write a name without a format.
        "rebase -b new.qcow2 top.qcow2",
        "rebase -u -b new.qcow2 top.qcow2",
        "rebase -b new.raw -F raw missing.qcow2",
        "rebase -b new.raw -F raw r.raw",
        "rebase -b new.raw -F raw -f raw r.raw",
        "rebase -u -f raw r.raw",
        "rebase -b '' -f raw r.raw",
        "rebase -b new.raw -f raw r.raw",
        // An image without a backing file: what the new one shows is zeroed.
        "rebase -b new.raw -F raw alone.qcow2",
        "rebase -b '' alone.qcow2",
        "rebase -q -b '' -F qcow2 top.qcow2",
    ];
    for line in cases {
        let twins = Twins::new(setup);
        twins.run_both(&args(line));
        for file in ["top.qcow2", "alone.qcow2", "r.raw"] {
            twins.assert_same_image(file, &format!("after {line}"));
        }
        twins
            .ours
            .qemu_img_ok(&["compare", "top.qcow2", "before.raw"]);
    }
}

#[test]
fn compressed_rebase_is_refused_clearly() {
    let sc = Scratch::new();
    sc.ours_ok(&["create", "-q", "-f", "qcow2", "x.qcow2", "1M"]);
    let out = sc.ours(&["rebase", "-c", "-u", "-b", "", "x.qcow2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        common::stderr(&out).contains("not supported yet"),
        "{}",
        common::stderr(&out)
    );
}
