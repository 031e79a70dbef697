//! `commit` side by side with qemu-img's: the same output, status and messages; the file
//! committed into then shows what the image showed, and the image is emptied (unless `-d`
//! or `-b`); every image is clean.

mod common;

use common::{args, have_qemu, map_shape, MapRun, Scratch, Twins};

/// `base.FMT` (`base_size`) under `top.qcow2` (`cluster`, `compat`, `top_size`), with data,
/// zero clusters, partial clusters and a discard in the image, and `before.raw`: what the
/// image shows.
#[derive(Clone, Copy, Debug)]
struct Chain {
    cluster: &'static str,
    compat: &'static str,
    base: &'static str,
    base_size: &'static str,
    top_size: &'static str,
}

/// A chain with the defaults, for the tests that are not about its layout.
const PLAIN: Chain = Chain {
    cluster: "64k",
    compat: "1.1",
    base: "qcow2",
    base_size: "4M",
    top_size: "4M",
};

impl Chain {
    fn build(&self, sc: &Scratch) {
        let base = format!("base.{}", self.base);
        sc.qemu_img_ok(&["create", "-q", "-f", self.base, &base, self.base_size]);
        sc.qemu_io_cmds(
            self.base,
            &base,
            &["write -P 0x11 0 1M", "write -P 0x12 2M 1M"],
        );
        let o = format!("cluster_size={},compat={}", self.cluster, self.compat);
        sc.qemu_overlay("top.qcow2", &base, self.base, &o, Some(self.top_size));
        let mut top = vec![
            "write -P 0x21 64k 4k",
            "write -z 256k 128k",
            "write -P 0x22 1000k 100k",
            "discard 2M 64k",
            "write -P 0x23 2500k 3000",
            "write -z 3M 1k",
        ];
        if self.top_size != self.base_size {
            top.push("write -P 0x24 4200k 8k");
        }
        sc.qemu_io_cmds("qcow2", "top.qcow2", &top);
        sc.qemu_img_ok(&["convert", "-O", "raw", "top.qcow2", "before.raw"]);
    }
}

/// The runs of `file` allocated in itself.
fn own_runs(sc: &Scratch, file: &str) -> Vec<MapRun> {
    map_shape(sc, file)
        .into_iter()
        .filter(|r| r.depth == 0 && r.present)
        .collect()
}

#[test]
fn commit_like_qemu() {
    if !have_qemu() {
        return;
    }
    let sizes = [
        ("qcow2", "4M", "4M"),
        ("raw", "4M", "4M"),
        ("qcow2", "3M", "5M"),
        ("raw", "3M", "5M"),
    ];
    let mut i = 0;
    for cluster in ["512", "4k", "64k", "2M"] {
        for compat in ["0.10", "1.1"] {
            for (base, base_size, top_size) in sizes {
                let chain = Chain {
                    cluster,
                    compat,
                    base,
                    base_size,
                    top_size,
                };
                let line = [
                    "commit top.qcow2",
                    "commit -q top.qcow2",
                    "commit -d top.qcow2",
                ][i % 3];
                i += 1;
                commit_both(&chain, line);
            }
        }
    }
}

/// Runs `line` over `chain` with both tools: the same output and images; the backing file
/// then holds what the image showed, and the image is empty (its own data kept with `-d`).
fn commit_both(chain: &Chain, line: &str) {
    let what = format!("{line} over {chain:?}");
    let twins = Twins::new(|sc| chain.build(sc));
    let top_before = own_runs(&twins.ours, "top.qcow2");
    assert!(twins.run_both(&args(line)), "{what}");
    let base = format!("base.{}", chain.base);
    twins.assert_same_image(&base, &what);
    twins.assert_same_image("top.qcow2", &what);
    twins
        .ours
        .qemu_img_ok(&["compare", "-f", chain.base, &base, "before.raw"]);
    twins
        .ours
        .qemu_img_ok(&["compare", "top.qcow2", "before.raw"]);
    if line.contains("-d") {
        let after = own_runs(&twins.ours, "top.qcow2");
        assert_eq!(after, top_before, "{what}: -d leaves the image's own data");
    } else {
        assert_eq!(own_runs(&twins.ours, "top.qcow2"), [], "{what}: emptied");
        assert_eq!(own_runs(&twins.qemu, "top.qcow2"), [], "{what}: emptied");
    }
}

/// `-b` commits everything above a deeper file into it (and implies `-d`): the files above
/// keep their data.
#[test]
fn commit_into_a_deeper_file() {
    commit_within_a_chain("64k");
}

/// The same with a middle file of 4 KiB clusters (found a stall: a status request to a
/// backing file was submitted again while the first was in flight).
#[test]
fn commit_into_a_deeper_file_small_clusters() {
    commit_within_a_chain("4k");
}

fn commit_within_a_chain(mid_cluster: &str) {
    if !have_qemu() {
        return;
    }
    for (line, into, above) in [
        (
            "commit -b base.qcow2 top.qcow2",
            "base.qcow2",
            &["top.qcow2", "mid.qcow2"][..],
        ),
        (
            "commit -q -b mid.qcow2 top.qcow2",
            "mid.qcow2",
            &["top.qcow2"],
        ),
        ("commit mid.qcow2", "base.qcow2", &[]),
    ] {
        let twins = Twins::new(|sc| sc.qemu_chain3(mid_cluster));
        let own = |sc: &Scratch| above.iter().map(|f| own_runs(sc, f)).collect::<Vec<_>>();
        let before = own(&twins.ours);
        assert!(twins.run_both(&args(line)), "{line}");
        for file in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
            twins.assert_same_image(file, line);
        }
        twins
            .ours
            .qemu_img_ok(&["compare", "top.qcow2", "before.raw"]);
        if line.contains("-b") {
            // Everything the image showed is now in the file committed into; the files
            // above it keep their own data.
            twins.ours.qemu_img_ok(&["compare", into, "before.raw"]);
            assert_eq!(own(&twins.ours), before, "{line}: files above unchanged");
        } else {
            twins.ours.qemu_img_ok(&["compare", into, "mid.raw"]);
            assert_eq!(own_runs(&twins.ours, "mid.qcow2"), []);
        }
    }
}

#[test]
fn commit_fails_like_qemu() {
    if !have_qemu() {
        return;
    }
    let setup = |sc: &Scratch| {
        PLAIN.build(sc);
        sc.qemu_img_ok(&["create", "-q", "-f", "qcow2", "alone.qcow2", "1M"]);
        sc.qemu_img_ok(&["create", "-q", "-f", "raw", "r.raw", "1M"]);
    };
    let cases = [
        "commit",
        "commit top.qcow2 alone.qcow2",
        "commit alone.qcow2",
        "commit -p alone.qcow2",
        "commit r.raw",
        "commit -f raw r.raw",
        "commit missing.qcow2",
        "commit -t bogus top.qcow2",
        "commit -r abc top.qcow2",
        "commit -b nonexist.qcow2 top.qcow2",
        "commit -b top.qcow2 top.qcow2",
        "commit -b alone.qcow2 top.qcow2",
    ];
    for line in cases {
        let twins = Twins::new(setup);
        assert!(!twins.run_both(&args(line)), "{line} should fail");
        for file in ["top.qcow2", "base.qcow2"] {
            twins.assert_same_image(file, &format!("after {line}"));
        }
        twins
            .ours
            .qemu_img_ok(&["compare", "top.qcow2", "before.raw"]);
    }
}

/// qemu's progress lines depend on its job's timing; both start at 0 and end at 100.
#[test]
fn commit_progress_starts_and_ends_like_qemu() {
    if !have_qemu() {
        return;
    }
    let chain = Chain {
        cluster: "4k",
        ..PLAIN
    };
    let twins = Twins::new(|sc| chain.build(sc));
    let ours = common::ok(&twins.ours.ours(&["commit", "-p", "top.qcow2"]), "ours");
    let theirs = twins.qemu.qemu_img_ok(&["commit", "-p", "top.qcow2"]);
    for out in [&ours, &theirs] {
        assert!(out.starts_with("    (0.00/100%)\r"), "{out:?}");
        assert!(
            out.ends_with("    (100.00/100%)\r\nImage committed.\n"),
            "{out:?}"
        );
    }
    twins.assert_same_image("base.qcow2", "commit -p");
}

#[test]
fn rate_limits_are_refused_clearly() {
    let sc = Scratch::new();
    sc.ours_ok(&["create", "-q", "-f", "qcow2", "x.qcow2", "1M"]);
    let out = sc.ours(&["commit", "-r", "1M", "x.qcow2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        common::stderr(&out).contains("not supported yet"),
        "{}",
        common::stderr(&out)
    );
}
