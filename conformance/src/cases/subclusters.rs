//! Extended L2 entries (subclusters), against images qemu-img and qemu-io make.
//!
//! Layouts of 16 KiB to 2 MiB clusters, alone, preallocated, over a raw backing file, over a
//! qcow2 backing file and with a raw external data file: what qemu-io writes at subcluster granularity reads byte for byte as
//! `qemu-img convert` gives it, and block status says what `qemu-img map` says. Our writes
//! are mirrored by qemu-io on a twin: same guest contents, a clean check, and the same
//! subcluster bitmaps in every entry, so partial writes into unallocated clusters copy
//! nothing they need not. Invalid bitmaps are corruption; clusters shared with a snapshot
//! are copied before their subclusters change.

use std::path::Path;

use qcow2_proto::{Allocation, CorruptReason, CreateOptions, Preallocation, RequestError};

use super::mirror::Step;
use super::{assert_reads_as, first_diff, guest_of, must, read_all};
use crate::harness::{Disk, Error, Harness, Mode};
use crate::qemu::Qemu;
use crate::verify::scratch;

const MIB: u64 = 1 << 20;

/// A layout: cluster size and what the image comes with.
#[derive(Clone, Copy, Debug)]
struct Layout {
    cluster_size: u64,
    with: With,
    /// Created with `preallocation=metadata` (clusters allocated, subclusters not).
    prealloc: bool,
}

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum With {
    Nothing,
    /// A raw backing file, shorter than the image.
    RawBacking,
    /// A qcow2 backing file with extended L2 entries and 16 KiB clusters of its own.
    Qcow2Backing,
    /// An external data file kept a valid raw image (`data_file_raw=on`), named after the
    /// image: `NAME.data`.
    RawDataFile,
}

const LAYOUTS: [Layout; 7] = [
    Layout {
        cluster_size: 16384,
        with: With::RawBacking,
        prealloc: false,
    },
    Layout {
        cluster_size: 65536,
        with: With::Nothing,
        prealloc: false,
    },
    Layout {
        cluster_size: 65536,
        with: With::Qcow2Backing,
        prealloc: false,
    },
    Layout {
        cluster_size: 2 * MIB,
        with: With::RawBacking,
        prealloc: false,
    },
    Layout {
        cluster_size: 65536,
        with: With::RawBacking,
        prealloc: true,
    },
    Layout {
        cluster_size: 32768,
        with: With::Nothing,
        prealloc: true,
    },
    Layout {
        cluster_size: 65536,
        with: With::RawDataFile,
        prealloc: false,
    },
];

impl Layout {
    /// The virtual size: room for [`steps`] (twelve clusters), at least 6 MiB.
    fn size(self) -> u64 {
        (12 * self.cluster_size).max(6 * MIB)
    }

    fn options(self, path: &Path) -> String {
        let mut o = format!("extended_l2=on,cluster_size={}", self.cluster_size);
        if self.prealloc {
            o.push_str(",preallocation=metadata");
        }
        if self.with == With::RawDataFile {
            o.push_str(&format!(",data_file={},data_file_raw=on", data_file(path)));
        }
        o
    }

    /// Makes what lies below the image in `dir` (with qemu-io's data) and returns its
    /// name and format.
    fn make_below(self, q: &Qemu, dir: &Path) -> Option<(&'static str, &'static str)> {
        match self.with {
            With::Nothing | With::RawDataFile => None,
            With::RawBacking => {
                let base = dir.join("base.raw");
                std::fs::write(&base, vec![0u8; (self.size() - MIB) as usize]).unwrap();
                q.io_as(
                    "raw",
                    &base,
                    &["write -P 0x5a 0 5M", "write -P 0x5b 100000 3000"],
                );
                Some(("base.raw", "raw"))
            }
            With::Qcow2Backing => {
                let base = dir.join("base.qcow2");
                q.create(&base, "extended_l2=on,cluster_size=16384", self.size());
                q.io(
                    &base,
                    &[
                        "write -P 0x6a 0 3M",
                        "write -P 0x6b 70000 1100",
                        "write -z 200000 9000",
                        "discard 1048576 65536",
                        "write -P 0x6c 4M 1M",
                    ],
                );
                Some(("base.qcow2", "qcow2"))
            }
        }
    }

    /// The image at `path`, made by qemu-img over what [`make_below`](Self::make_below)
    /// made.
    fn qemu_create(self, q: &Qemu, path: &Path, below: Option<(&str, &str)>) {
        match below {
            Some((name, fmt)) => q.overlay(path, name, fmt, &self.options(path), Some(self.size())),
            None => q.create(path, &self.options(path), self.size()),
        }
    }

    /// Our creation options for the same image.
    fn ours(self, path: &Path, below: Option<(&str, &str)>) -> CreateOptions {
        let mut o = CreateOptions::new(self.size());
        if self.with == With::RawDataFile {
            o.data_file = Some(data_file(path));
            o.data_file_raw = true;
        }
        o.cluster_size = self.cluster_size as u32;
        o.extended_l2 = true;
        if self.prealloc {
            o.preallocation = Preallocation::Metadata;
        }
        if let Some((name, fmt)) = below {
            o.backing_file = Some(name.into());
            o.backing_format = Some(fmt.into());
        }
        o
    }
}

/// The data file name of the image at `path` (with [`With::RawDataFile`]): `NAME.data`
/// beside it, absolute (QEMU resolves a relative one against its working directory).
fn data_file(path: &Path) -> String {
    let stem = path.file_stem().expect("image names").to_string_lossy();
    path.with_file_name(format!("{stem}.data"))
        .display()
        .to_string()
}

/// Guest operations at subcluster granularity for cluster size `cs`: partial subclusters
/// at both ends of a write into an unallocated cluster, whole and partial subcluster
/// zeroes, writes across clusters, writes into clusters allocated before (in place), zeroes
/// and discards of whole clusters, and the image's last bytes.
fn steps(layout: Layout) -> Vec<Step> {
    let (cs, size) = (layout.cluster_size, layout.size());
    let sc = cs / 32;
    let w = |offset: u64, len: u64, byte: u8| Step::Write { offset, len, byte };
    let z = |offset: u64, len: u64, unmap: bool| Step::Zero { offset, len, unmap };
    vec![
        // Inside one subcluster, at its start, and across two subclusters.
        w(sc + 100, 300, 0xb1),
        w(3 * sc, sc, 0xb2),
        w(5 * sc - 7, 20, 0xb3),
        // Over a cluster boundary, partial subclusters at both ends.
        w(2 * cs - sc / 2 - 5, sc + 11, 0xb4),
        // Several clusters, then in place into the ones before.
        w(3 * cs + 2 * sc + 1, 2 * cs, 0xb5),
        w(cs + 9, 3 * sc, 0xb6),
        w(sc + 50, 10, 0xb7),
        // Zeroes: whole subclusters (bitmap only), partial ones (written), whole clusters.
        z(7 * sc, 2 * sc, false),
        z(3 * sc + 17, sc, false),
        z(6 * cs, 2 * cs, false),
        z(3 * cs, cs, true),
        z(10 * cs + sc, 3 * sc, false),
        // Then data into zeroed subclusters.
        w(7 * sc + 3, 5, 0xb8),
        w(10 * cs + 2 * sc, sc / 2, 0xb9),
        // Discard (whole clusters), and a write into a discarded one.
        Step::Discard {
            offset: 4 * cs,
            len: cs,
        },
        w(4 * cs + 5 * sc + 1, 1, 0xba),
        // The last bytes of the image.
        w(size - sc - 300, sc + 300, 0xbb),
        z(size - 2 * sc, sc, false),
    ]
}

/// Per guest cluster of the image file at `path` (standard or extended entries): whether
/// a host cluster is mapped, and the subcluster bitmap.
fn entries(path: &Path) -> Vec<(bool, u64)> {
    let b = std::fs::read(path).unwrap();
    let be32 = |at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    let be64 = |at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let cb = be32(20);
    let size = be64(24);
    let (l1_size, l1) = (be32(36) as usize, be64(40) as usize);
    let extended = be64(72) & (1 << 4) != 0;
    let w = if extended { 16 } else { 8 };
    let per = (1usize << cb) / w;
    let clusters = size.div_ceil(1 << cb) as usize;
    let mut out = Vec::with_capacity(clusters);
    for gc in 0..clusters {
        let (l1i, l2i) = (gc / per, gc % per);
        let l2 = if l1i < l1_size {
            (be64(l1 + 8 * l1i) & 0x00ff_ffff_ffff_fe00) as usize
        } else {
            0
        };
        if l2 == 0 {
            out.push((false, 0));
            continue;
        }
        let at = l2 + l2i * w;
        let word = be64(at);
        let bitmap = if extended { be64(at + 8) } else { 0 };
        out.push((word & 0x00ff_ffff_ffff_fe00 != 0, bitmap));
    }
    out
}

/// What `qemu-img map --output=json` says, as `(start, len, depth, present, zero, data)`
/// with adjacent like extents merged.
fn qemu_map(q: &Qemu, path: &Path) -> Vec<(u64, u64, u64, bool, bool, bool)> {
    let out = q.img(&["map", "--output=json", &path.display().to_string()]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("map JSON");
    let rows = v.as_array().expect("map is a list").iter().map(|e| {
        (
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["depth"].as_u64().unwrap(),
            e["present"].as_bool().unwrap(),
            e["zero"].as_bool().unwrap(),
            e["data"].as_bool().unwrap(),
        )
    });
    merge(rows)
}

fn merge(
    rows: impl Iterator<Item = (u64, u64, u64, bool, bool, bool)>,
) -> Vec<(u64, u64, u64, bool, bool, bool)> {
    let mut out: Vec<(u64, u64, u64, bool, bool, bool)> = Vec::new();
    for r in rows {
        match out.last_mut() {
            Some(l) if l.0 + l.1 == r.0 && (l.2, l.3, l.4, l.5) == (r.2, r.3, r.4, r.5) => {
                l.1 += r.1
            }
            _ => out.push(r),
        }
    }
    out
}

/// Our block status over the whole disk, in the same terms.
fn our_map<D: Disk>(disk: &mut D) -> Vec<(u64, u64, u64, bool, bool, bool)> {
    let mut rows = Vec::new();
    let mut at = 0;
    while at < disk.len() {
        let s = must(disk.block_status(at, disk.len() - at), "block status");
        let (present, zero, data) = match s.allocation {
            Allocation::Zero { .. } => (true, true, false),
            Allocation::Data { .. } | Allocation::Compressed => (true, false, true),
            _ => (false, true, false),
        };
        rows.push((s.offset, s.len, u64::from(s.depth), present, zero, data));
        at += s.len;
    }
    merge(rows.into_iter())
}

/// Images qemu-io wrote at subcluster granularity read byte for byte as qemu-img converts
/// them (whole, and in unaligned pieces), and block status agrees with qemu-img map.
pub fn reads_qemu_subclusters<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("subclusters::reads_qemu_subclusters") else {
        return;
    };
    for layout in LAYOUTS {
        let dir = scratch();
        let below = layout.make_below(&q, dir.path());
        let path = dir.path().join("img.qcow2");
        layout.qemu_create(&q, &path, below);
        let cmds: Vec<String> = steps(layout).iter().map(|s| s.qemu_io()).collect();
        q.io(&path, &cmds);
        let want = guest_of(&q, &path, dir.path());
        let mut disk = must(h.open(&path, Mode::read_only()), format!("{layout:?}"));
        assert_reads_as(&mut disk, &want, &format!("{layout:?}"));
        assert_eq!(
            our_map(&mut disk),
            qemu_map(&q, &path),
            "{layout:?}: block status differs from qemu-img map"
        );
        must(disk.close(), "close");
    }
}

/// Our writes on an image we create, qemu-io's on a twin qemu-img creates: the same guest
/// contents, a clean check, and the same bitmap (and allocation) in every entry.
pub fn writes_mirror_qemu<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("subclusters::writes_mirror_qemu") else {
        return;
    };
    for layout in LAYOUTS {
        let dir = scratch();
        let below = layout.make_below(&q, dir.path());
        let ours = dir.path().join("ours.qcow2");
        let twin = dir.path().join("twin.qcow2");
        layout.qemu_create(&q, &twin, below);
        let steps = steps(layout);
        let mut disk = must(
            h.create(&ours, &layout.ours(&ours, below), Mode::writable()),
            format!("create {layout:?}"),
        );
        for &s in &steps {
            s.apply(&mut disk);
        }
        must(disk.close(), "close");
        let cmds: Vec<String> = steps.iter().map(|s| s.qemu_io()).collect();
        q.io(&twin, &cmds);
        let info = q.info(&ours);
        assert_eq!(
            info["format-specific"]["data"]["extended-l2"], true,
            "{layout:?}: {info}"
        );
        q.assert_clean(&ours, &format!("{layout:?}"));
        assert_eq!(
            q.compare_status(&ours, &twin),
            0,
            "{layout:?}: ours differs from qemu-io's twin"
        );
        let (a, b) = (entries(&ours), entries(&twin));
        for (gc, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(
                x, y,
                "{layout:?}: guest cluster {gc}: (mapped, bitmap) ours {x:x?}, qemu's {y:x?}"
            );
        }
        assert_eq!(
            qemu_map(&q, &ours),
            qemu_map(&q, &twin),
            "{layout:?}: qemu-img map"
        );
        if layout.with == With::RawDataFile {
            let data = |p: &Path| std::fs::read(data_file(p)).unwrap();
            assert!(
                data(&ours) == data(&twin),
                "{layout:?}: the raw data files differ"
            );
        }
        let want = guest_of(&q, &twin, dir.path());
        let mut disk = must(h.open(&ours, Mode::read_only()), "reopen");
        if let Some(d) = first_diff(&read_all(&mut disk), &want) {
            panic!("{layout:?} after reopen: {d}");
        }
    }
}

/// Overwrites `path`'s extended L2 entry of guest cluster `gc` (64 KiB clusters, one L2
/// table): its first word and bitmap.
fn patch_entry(path: &Path, gc: usize, word: Option<u64>, bitmap: u64) {
    let mut b = std::fs::read(path).unwrap();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = be64(&b, 40) as usize;
    let l2 = (be64(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let at = l2 + gc * 16;
    if let Some(w) = word {
        b[at..at + 8].copy_from_slice(&w.to_be_bytes());
    }
    b[at + 8..at + 16].copy_from_slice(&bitmap.to_be_bytes());
    std::fs::write(path, &b).unwrap();
}

/// A subcluster both allocated and zero, and allocated subclusters in an unallocated
/// cluster, are corruption (as QEMU says, "Invalid cluster entry found"): reads fail with
/// a typed error, a writable image gets its corrupt bit, other clusters still read.
pub fn invalid_bitmaps_are_corruption<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("subclusters::invalid_bitmaps_are_corruption") else {
        return;
    };
    let cs = 65536u64;
    // (word of the entry, bitmap) for guest cluster 1; cluster 0 stays intact.
    for (what, word, bitmap) in [
        ("allocated and zero", None, 0x0000_0001_0000_0001u64),
        (
            "allocated without a cluster",
            Some(0u64),
            0x0000_0000_0000_0004,
        ),
    ] {
        let dir = scratch();
        let path = dir.path().join("bad.qcow2");
        q.create(&path, "extended_l2=on", 4 * MIB);
        q.io(&path, &["write -P 0x11 0 128k"]);
        patch_entry(&path, 1, word, bitmap);
        let mut disk = must(h.open(&path, Mode::writable()), what);
        let mut buf = vec![0u8; 4096];
        match disk.read_at(&mut buf, cs + 8192) {
            Err(Error::Request(RequestError::Corrupt(c))) => {
                assert_eq!(
                    c.reason,
                    CorruptReason::InvalidSubclusterBitmap,
                    "{what}: {c}"
                )
            }
            other => panic!("{what}: reading the cluster: {other:?}"),
        }
        must(disk.read_at(&mut buf, 4096), "an intact cluster");
        assert!(buf.iter().all(|&b| b == 0x11), "{what}: cluster 0");
        let _ = disk.close();
        let info = q.info(&path);
        assert_eq!(
            info["format-specific"]["data"]["corrupt"], true,
            "{what}: the corrupt bit is not set: {info}"
        );
    }
}

/// Clusters shared with an internal snapshot (qemu-img snapshot -c) whose subclusters are
/// partly unallocated or zero: our writes into them (in an unallocated subcluster, across
/// a zero one, over allocated ones) leave the snapshot as it was and the image as
/// qemu-io's twin, both checking clean.
pub fn shared_clusters_are_copied<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("subclusters::shared_clusters_are_copied") else {
        return;
    };
    let dir = scratch();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0x3cu8; 4 * MIB as usize]).unwrap();
    let ours = dir.path().join("ours.qcow2");
    let twin = dir.path().join("twin.qcow2");
    let sc = 2048u64;
    for p in [&ours, &twin] {
        q.overlay(p, "base.raw", "raw", "extended_l2=on", Some(4 * MIB));
        q.io(
            p,
            &[
                "write -P 0x21 2048 4096",
                "write -z 16384 4096",
                "write -P 0x22 65536 65536",
                "write -P 0x23 200000 100",
            ],
        );
        q.img(&["snapshot", "-c", "s1", &p.display().to_string()]);
    }
    let before = dir.path().join("before.raw");
    q.to_raw(&ours, None, &before);
    let steps = [
        Step::Write {
            offset: 10 * sc + 5,
            len: 100,
            byte: 0xc1,
        },
        Step::Write {
            offset: 7 * sc + 1,
            len: 2 * sc,
            byte: 0xc2,
        },
        Step::Write {
            offset: 65536 + 300,
            len: 10,
            byte: 0xc3,
        },
        Step::Write {
            offset: 200_000 - 3000,
            len: 4000,
            byte: 0xc4,
        },
        Step::Zero {
            offset: 4 * sc,
            len: sc,
            unmap: false,
        },
    ];
    let mut disk = must(h.open(&ours, Mode::writable()), "open");
    for &s in &steps {
        s.apply(&mut disk);
    }
    must(disk.close(), "close");
    let cmds: Vec<String> = steps.iter().map(|s| s.qemu_io()).collect();
    q.io(&twin, &cmds);
    q.assert_clean(&ours, "after writes into shared clusters");
    assert_eq!(
        q.compare_status(&ours, &twin),
        0,
        "ours differs from the twin"
    );
    let snap = dir.path().join("snap.raw");
    q.to_raw(&ours, Some("s1"), &snap);
    assert!(
        std::fs::read(&snap).unwrap() == std::fs::read(&before).unwrap(),
        "the snapshot changed"
    );
}

/// Zeroing part of a compressed cluster (which has no subclusters) rewrites it; bitmap
/// zeroes elsewhere still work, and the image stays clean and equal to qemu-io's twin.
pub fn compressed_clusters_have_no_subclusters<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("subclusters::compressed_clusters_have_no_subclusters") else {
        return;
    };
    let dir = scratch();
    let raw = dir.path().join("src.raw");
    let text: Vec<u8> = b"subclusters and compression\n"
        .iter()
        .copied()
        .cycle()
        .take(2 * MIB as usize)
        .collect();
    std::fs::write(&raw, &text).unwrap();
    let ours = dir.path().join("ours.qcow2");
    let twin = dir.path().join("twin.qcow2");
    for p in [&ours, &twin] {
        super::compressed::convert_c(&q, &raw, p, "extended_l2=on");
    }
    let steps = [
        Step::Zero {
            offset: 4096,
            len: 8192,
            unmap: false,
        },
        Step::Write {
            offset: 70_000,
            len: 100,
            byte: 0xd1,
        },
        Step::Discard {
            offset: 131072,
            len: 65536,
        },
    ];
    let mut disk = must(h.open(&ours, Mode::writable()), "open");
    let s = must(disk.block_status(65536 * 5, 4096), "status");
    assert_eq!(s.allocation, Allocation::Compressed, "{s:?}");
    for &s in &steps {
        s.apply(&mut disk);
    }
    must(disk.close(), "close");
    let cmds: Vec<String> = steps.iter().map(|s| s.qemu_io()).collect();
    q.io(&twin, &cmds);
    q.assert_clean(&ours, "compressed, extended");
    assert_eq!(
        q.compare_status(&ours, &twin),
        0,
        "ours differs from the twin"
    );
}
