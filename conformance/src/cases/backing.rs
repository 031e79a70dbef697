//! Backing files and chains, against images qemu-img makes and checks.
//!
//! Chains of raw and qcow2 files of different cluster sizes and versions, up to five deep,
//! with data, zero clusters and discards in every layer and layers of different sizes:
//! every byte we read equals `qemu-img convert -O raw` of the top. Writes into an overlay
//! (copy-on-write from the chain at both ends, zeroes, discard, past a shorter backing
//! file) are mirrored with qemu-io on a twin overlay of the same backing file: the two must
//! compare equal, the overlay must check clean, and the backing files must not change.

use std::path::{Path, PathBuf};

use qcow2_proto::{BackingError, CreateOptions, OpenError};

use super::mirror::Step;
use super::{assert_reads_as, first_diff, guest_of, must, read_all};
use crate::harness::{Disk, Error, Harness, Mode};
use crate::qemu::Qemu;
use crate::verify::scratch;

/// One layer of a chain, bottom first.
#[derive(Clone, Copy, Debug)]
struct Layer {
    /// `None`: a raw file (only at the bottom).
    cluster_size: Option<u32>,
    /// qcow2 version (2 or 3).
    version: u32,
    /// Virtual size.
    size: u64,
    /// Whether the backing-format extension is written (else the engine probes).
    with_format: bool,
}

const fn raw(size: u64) -> Layer {
    Layer {
        cluster_size: None,
        version: 3,
        size,
        with_format: true,
    }
}

const fn qcow2(cluster_size: u32, version: u32, size: u64) -> Layer {
    Layer {
        cluster_size: Some(cluster_size),
        version,
        size,
        with_format: true,
    }
}

const MIB: u64 = 1 << 20;

/// The chains, bottom first.
fn chains() -> Vec<Vec<Layer>> {
    let no_format = Layer {
        with_format: false,
        ..qcow2(4096, 3, 4 * MIB)
    };
    vec![
        vec![raw(4 * MIB), qcow2(65536, 3, 4 * MIB)],
        vec![raw(3 * MIB + 512), qcow2(4096, 2, 5 * MIB)],
        vec![
            qcow2(512, 3, 4 * MIB),
            qcow2(65536, 3, 2 * MIB),
            qcow2(4096, 3, 6 * MIB),
        ],
        vec![qcow2(2 << 20, 3, 8 * MIB), qcow2(512, 2, 8 * MIB)],
        vec![raw(2 * MIB), no_format, qcow2(65536, 2, 4 * MIB)],
        vec![
            raw(4 * MIB),
            qcow2(4096, 3, 4 * MIB),
            qcow2(65536, 2, 3 * MIB),
            qcow2(16384, 3, 5 * MIB),
            qcow2(4096, 3, 4 * MIB),
            qcow2(65536, 3, 4 * MIB),
        ],
    ]
}

fn file_name(i: usize, layer: &Layer) -> String {
    match layer.cluster_size {
        None => format!("layer{i}.raw"),
        Some(_) => format!("layer{i}.qcow2"),
    }
}

/// Builds `chain` in `dir` with qemu-img (each layer gets its own writes) and returns the
/// top's path.
fn build(q: &Qemu, h: &impl Harness, dir: &Path, chain: &[Layer]) -> PathBuf {
    let mut below: Option<(String, &'static str)> = None;
    let mut path = PathBuf::new();
    for (i, layer) in chain.iter().enumerate() {
        let name = file_name(i, layer);
        path = dir.join(&name);
        let fmt = if layer.cluster_size.is_some() {
            "qcow2"
        } else {
            "raw"
        };
        match (layer.cluster_size, &below) {
            (None, _) => {
                q.img(&[
                    "create",
                    "-q",
                    "-f",
                    "raw",
                    &path.display().to_string(),
                    &layer.size.to_string(),
                ]);
            }
            (Some(cs), Some((base, base_fmt))) if !layer.with_format => {
                // qemu-img insists on a format: our own create leaves it out.
                let mut o = CreateOptions::new(layer.size);
                (o.cluster_size, o.version) = (cs, layer.version);
                o.backing_file = Some(base.clone());
                let _ = base_fmt;
                must(h.create(&path, &o, Mode::writable()), "create")
                    .close()
                    .unwrap();
            }
            (Some(cs), below) => {
                let compat = if layer.version == 2 { "0.10" } else { "1.1" };
                let o = format!("cluster_size={cs},compat={compat}");
                match below {
                    Some((base, base_fmt)) => {
                        q.overlay(&path, base, base_fmt, &o, Some(layer.size))
                    }
                    None => q.create(&path, &o, layer.size),
                }
            }
        }
        // Each layer writes its own pattern in places that overlap the others' partly,
        // zeroes some of what it inherited, and (v3) discards some of it.
        let size = layer.size;
        let k = i as u64 + 1;
        let mut cmds = vec![
            format!("write -P {:#x} {} {}", 0x10 * k, k * 200_000, 300_000),
            format!(
                "write -P {:#x} {} {}",
                0x10 * k + 1,
                size / 2 + k * 4096 + 512,
                70_000
            ),
            format!("write -P {:#x} {} {}", 0x10 * k + 2, size - 4096, 4096),
        ];
        if i > 0 {
            cmds.push(format!("write -z {} {}", k * 300_000 + 1024, 200_000));
            if layer.version == 3 {
                cmds.push(format!("discard {} {}", k * 500_000, 400_000));
            }
        }
        q.io_as(fmt, &path, &cmds);
        below = Some((name, fmt));
    }
    path
}

/// Every chain reads byte for byte as qemu-img converts it, whole and in unaligned pieces.
pub fn reads_qemu_chains<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("backing::reads_qemu_chains") else {
        return;
    };
    for chain in chains() {
        let dir = scratch();
        let top = build(&q, h, dir.path(), &chain);
        let want = guest_of(&q, &top, dir.path());
        for mode in [Mode::read_only(), Mode::writable()] {
            let mut disk = must(h.open(&top, mode), format!("open {chain:?}"));
            assert_reads_as(&mut disk, &want, &format!("{chain:?} ({mode:?})"));
            must(disk.close(), "close");
        }
    }
}

fn steps(size: u64, v3: bool) -> Vec<Step> {
    let mut s = vec![
        // Partial clusters at both ends: copy-on-write from the chain on both sides.
        Step::Write {
            offset: 123_457,
            len: 1000,
            byte: 0xa1,
        },
        Step::Write {
            offset: 210_000,
            len: 150_001,
            byte: 0xa2,
        },
        Step::Write {
            offset: 0,
            len: 512,
            byte: 0xa3,
        },
        Step::Zero {
            offset: 600_001,
            len: 9_000,
            unmap: false,
        },
        Step::Zero {
            offset: 1 << 20,
            len: 256 << 10,
            unmap: true,
        },
        Step::Zero {
            offset: 2 << 20,
            len: 192 << 10,
            unmap: false,
        },
        // Past the end of a shorter backing file, and the image's last sector.
        Step::Write {
            offset: size - 5000,
            len: 4488,
            byte: 0xa4,
        },
        Step::Write {
            offset: size - 512,
            len: 512,
            byte: 0xa5,
        },
    ];
    if v3 {
        // (A v2 discard lets QEMU show the backing file again; ours keeps the data.)
        s.push(Step::Discard {
            offset: 1 << 20,
            len: 2 << 20,
        });
        s.push(Step::Write {
            offset: (1 << 20) + 70_000,
            len: 3,
            byte: 0xa6,
        });
    }
    s
}

/// Writes into overlays of qemu-made chains, mirrored by qemu-io on a twin: same guest
/// contents, a clean check, untouched backing files.
pub fn writes_over_qemu_chains<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("backing::writes_over_qemu_chains") else {
        return;
    };
    for chain in chains() {
        let dir = scratch();
        let top = build(&q, h, dir.path(), &chain);
        // The overlay written to: a fresh one on top of the whole chain (as a VM's disk),
        // its twin for qemu-io.
        let last = chain.last().expect("chains are not empty");
        let below = top.file_name().unwrap().to_string_lossy().into_owned();
        let ours = dir.path().join("ours.qcow2");
        let twin = dir.path().join("twin.qcow2");
        let size = last.size + MIB + 512;
        let compat = if last.version == 2 { "0.10" } else { "1.1" };
        for path in [&ours, &twin] {
            let o = format!("cluster_size=65536,compat={compat}");
            q.overlay(path, &below, "qcow2", &o, Some(size));
        }
        let before: Vec<Vec<u8>> = (0..chain.len())
            .map(|i| std::fs::read(dir.path().join(file_name(i, &chain[i]))).unwrap())
            .collect();
        let steps = steps(size, last.version == 3);
        let mut disk = must(h.open(&ours, Mode::writable()), "open the overlay");
        for &s in &steps {
            s.apply(&mut disk);
        }
        must(disk.close(), "close");
        let cmds: Vec<String> = steps.iter().map(|&s| s.qemu_io()).collect();
        q.io(&twin, &cmds);
        let status = q.compare_status(&ours, &twin);
        assert_eq!(
            status, 0,
            "{chain:?}: the overlay differs from qemu-io's twin"
        );
        q.assert_clean(&ours, &format!("{chain:?}"));
        for (i, b) in before.iter().enumerate() {
            let now = std::fs::read(dir.path().join(file_name(i, &chain[i]))).unwrap();
            assert!(&now == b, "{chain:?}: layer {i} changed");
        }
        // And read back through us after a reopen.
        let want = guest_of(&q, &twin, dir.path());
        let mut disk = must(h.open(&ours, Mode::read_only()), "reopen");
        if let Some(d) = first_diff(&read_all(&mut disk), &want) {
            panic!("{chain:?} after reopen: {d}");
        }
    }
}

/// An overlay we create (`-b`, with and without `-F`) over a qemu-made image: qemu-img
/// reads our header as we meant it, and sees our writes over its data.
pub fn overlay_we_create<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("backing::overlay_we_create") else {
        return;
    };
    for (cs, version, format) in [
        (65536, 3, Some("qcow2")),
        (512, 3, Some("qcow2")),
        (4096, 2, Some("qcow2")),
        (65536, 3, None),
    ] {
        let dir = scratch();
        let base = dir.path().join("base.qcow2");
        q.create(&base, "cluster_size=4096", 3 * MIB);
        q.io(&base, &["write -P 0x5a 0 3M"]);
        let top = dir.path().join("top.qcow2");
        let mut o = CreateOptions::new(4 * MIB);
        (o.cluster_size, o.version) = (cs, version);
        o.backing_file = Some("base.qcow2".into());
        o.backing_format = format.map(str::to_owned);
        let mut disk = must(h.create(&top, &o, Mode::writable()), "create the overlay");
        must(disk.write_at(&[0x77; 1000], 5000), "write");
        must(disk.close(), "close");
        let info = q.info(&top);
        assert_eq!(info["backing-filename"], "base.qcow2", "{info}");
        if let Some(f) = format {
            assert_eq!(info["backing-filename-format"], f, "{info}");
        }
        q.assert_clean(&top, "our overlay");
        let raw = dir.path().join("want.raw");
        let mut want = vec![0x5a; 3 * MIB as usize];
        want.resize(4 * MIB as usize, 0);
        want[5000..6000].fill(0x77);
        std::fs::write(&raw, &want).unwrap();
        if let Err(e) = q.same_as_raw(&top, &raw) {
            panic!("cluster {cs} v{version} {format:?}: {e}");
        }
    }
}

/// A missing backing file, a refused one and a loop are typed errors naming the file.
pub fn unopenable_chains<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("backing::unopenable_chains") else {
        return;
    };
    let dir = scratch();
    let p = |n: &str| dir.path().join(n);
    q.create(&p("base.qcow2"), "", MIB);
    q.overlay(&p("top.qcow2"), "base.qcow2", "qcow2", "", Some(MIB));
    // Refused by policy.
    let refuse = Mode {
        refuse_backing: true,
        ..Mode::read_only()
    };
    match h.open(&p("top.qcow2"), refuse) {
        Err(Error::Other(m)) => assert!(m.contains("base.qcow2") && m.contains("refused"), "{m}"),
        Err(e) => panic!("refused backing: {e}"),
        Ok(_) => panic!("a refused backing file was opened"),
    }
    // Missing.
    std::fs::rename(p("base.qcow2"), p("moved.qcow2")).unwrap();
    match h.open(&p("top.qcow2"), Mode::read_only()) {
        Err(Error::Other(m)) => assert!(m.contains("base.qcow2"), "{m}"),
        Err(e) => panic!("missing backing: {e}"),
        Ok(_) => panic!("an image with a missing backing file opened"),
    }
    // A loop: a -> b -> a.
    for (a, b) in [
        ("loop1.qcow2", "loop2.qcow2"),
        ("loop2.qcow2", "loop1.qcow2"),
    ] {
        q.overlay(&p(a), b, "qcow2", "", Some(MIB));
    }
    match h.open(&p("loop1.qcow2"), Mode::read_only()) {
        Err(Error::Open(OpenError::Backing {
            reason: BackingError::TooDeep(_),
            ..
        })) => {}
        Err(e) => panic!("a backing loop: {e}"),
        Ok(_) => panic!("a backing loop opened"),
    }
    // A format we do not know.
    q.overlay(&p("vmdk.qcow2"), "moved.qcow2", "vmdk", "", Some(MIB));
    match h.open(&p("vmdk.qcow2"), Mode::read_only()) {
        Err(Error::Open(OpenError::Backing {
            depth: 1,
            reason: BackingError::UnknownFormat,
        })) => {}
        Err(e) => panic!("an unknown backing format: {e}"),
        Ok(_) => panic!("an unknown backing format opened"),
    }
}

/// Growing an overlay over a longer backing file: the new space reads as zero (as after
/// `qemu-img resize`), also from an old size that ends inside a cluster, in v2 and v3.
pub fn grow_over_longer_backing<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("backing::grow_over_longer_backing") else {
        return;
    };
    for (compat, old) in [("1.1", MIB), ("1.1", MIB + 512), ("0.10", MIB + 4096 + 512)] {
        let dir = scratch();
        let p = |n: &str| dir.path().join(n).display().to_string();
        q.create(Path::new(&p("base.qcow2")), "cluster_size=4096", 4 * MIB);
        q.io(Path::new(&p("base.qcow2")), &["write -P 0x3c 0 4M"]);
        for f in ["ours.qcow2", "twin.qcow2"] {
            let o = format!("compat={compat}");
            q.overlay(Path::new(&p(f)), "base.qcow2", "qcow2", &o, Some(old));
        }
        let mut disk = must(
            h.open(Path::new(&p("ours.qcow2")), Mode::writable()),
            "open",
        );
        must(disk.resize(6 * MIB, false), "grow");
        let mut got = vec![0xffu8; (6 * MIB - old) as usize];
        must(disk.read_at(&mut got, old), "read the grown space");
        assert!(
            got.iter().all(|&b| b == 0),
            "compat={compat} old={old}: grown space not zero"
        );
        must(disk.close(), "close");
        q.assert_clean(Path::new(&p("ours.qcow2")), "grown overlay");
        if compat == "0.10" {
            // qemu-img refuses this one ("Failed to zero out new clusters"): v2 has no zero
            // flag. We write zeroes instead.
            continue;
        }
        q.img(&["resize", "-q", &p("twin.qcow2"), &(6 * MIB).to_string()]);
        assert_eq!(
            q.compare_status(Path::new(&p("ours.qcow2")), Path::new(&p("twin.qcow2"))),
            0,
            "compat={compat} old={old}: differs from qemu-img resize"
        );
    }
}

/// Block status through three qcow2 files, extent after extent: depths and allocations as
/// qemu-img map reports them. (Found by the CLI's commit tests: a status request to a
/// backing file was submitted again while the first was in flight, and the answers got
/// crossed until the engine stalled.)
pub fn block_status_through_three_files<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("backing::block_status_through_three_files") else {
        return;
    };
    let dir = scratch();
    let p = |n: &str| dir.path().join(n);
    q.create(&p("base.qcow2"), "", 4 * MIB);
    q.overlay(
        &p("mid.qcow2"),
        "base.qcow2",
        "qcow2",
        "cluster_size=4096",
        Some(4 * MIB),
    );
    q.io(&p("mid.qcow2"), &["write 1M 4k"]);
    q.overlay(&p("top.qcow2"), "mid.qcow2", "qcow2", "", Some(4 * MIB));
    let mut disk = must(h.open(&p("top.qcow2"), Mode::read_only()), "open");
    let mut got = Vec::new();
    let mut at = 0;
    while at < disk.len() {
        let s = must(disk.block_status(at, disk.len() - at), "block status");
        let unallocated = !s.allocation.is_allocated();
        // (Extents may end early, at table boundaries: merge the like ones.)
        match got.last_mut() {
            Some((o, l, d, u)) if *o + *l == s.offset && *d == s.depth && *u == unallocated => {
                *l += s.len
            }
            _ => got.push((s.offset, s.len, s.depth, unallocated)),
        }
        at += s.len;
    }
    let want = vec![
        (0, MIB, 2, true),
        (MIB, 4096, 1, false),
        (MIB + 4096, 3 * MIB - 4096, 2, true),
    ];
    assert_eq!(got, want, "(offset, len, depth, unallocated)");
}
