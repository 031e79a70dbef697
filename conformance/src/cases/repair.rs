//! `check -r` repairs what `qemu-img check -r` repairs: a catalogue of damages, each made
//! by editing the bytes of an image qemu-img and qemu-io wrote, applied to twin copies.
//! qemu-img checks and repairs one twin, we check and repair the other through the
//! runtime under test, and then:
//!
//! - both checks report the same counters (`corruptions`, `leaks`, `check-errors`, the
//!   `*-fixed` counts, `image-end-offset`, the cluster statistics), the same exit status
//!   (or both fail to complete) and the same detail lines ("ERROR cluster 5 refcount=0
//!   reference=1", "Leaked cluster ...");
//! - after the repairs `qemu-img check` finds the same on both twins, and our check finds
//!   what qemu-img finds on each;
//! - the guests read the same (`qemu-img compare`; where qemu-img cannot read an image at
//!   all, cluster by cluster through our engine);
//! - the dirty and corrupt bits end up alike.
//!
//! Where QEMU's result cannot be matched, or is not worth matching, the damage says why in
//! its [`Differs`] note; every such note names the one assertion it relaxes.
//!
//! Our side goes through [`Harness::open`] in check-only mode and [`Disk::check`]; like
//! QEMU's check mode, that open leaves the snapshot table to the check.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use qcow2_proto::{CheckReport, Repair};

use super::must;
use crate::harness::{Disk, Harness, Mode};
use crate::qemu::{CheckRun, Qemu};
use crate::verify::scratch;

const COPIED: u64 = 1 << 63;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// An offset far past the end of every base image (64 MiB).
const FAR: u64 = 64 << 20;

// ---- base images ----------------------------------------------------------------------

/// How a base image is made with qemu-img and qemu-io.
struct Base {
    name: &'static str,
    options: &'static str,
    size: u64,
    writes: &'static [&'static str],
    /// `qemu-img snapshot -c s1`, then these writes.
    snapshot: Option<&'static [&'static str]>,
}

/// Data clusters at 0 and 64 KiB (guest clusters 0 and 1), 1 MiB (16), a compressed
/// cluster at 2 MiB (32) and a plain zero cluster at 3 MiB (48).
const WRITES_64K: &[&str] = &[
    "write -P 0x11 0 128k",
    "write -P 0x22 1M 64k",
    "write -c -P 0x33 2M 64k",
    "write -z 3M 64k",
];

const BASES: &[Base] = &[
    Base {
        name: "v3-64k",
        options: "cluster_size=65536",
        size: 16 << 20,
        writes: WRITES_64K,
        snapshot: None,
    },
    // Version 2, 4 KiB clusters: guest clusters 0, 1, 256 (1 MiB), 512 (2 MiB,
    // compressed) and 1024 (4 MiB), in three L2 tables.
    Base {
        name: "v2-4k",
        options: "compat=0.10,cluster_size=4096",
        size: 16 << 20,
        writes: &[
            "write -P 0x11 0 8k",
            "write -P 0x22 1M 4k",
            "write -c -P 0x33 2M 4k",
            "write -P 0x44 4M 4k",
        ],
        snapshot: None,
    },
    // 512-byte clusters: guest clusters 0, 1, 128 (64 KiB), 256 (128 KiB, compressed).
    Base {
        name: "v3-512",
        options: "cluster_size=512",
        size: 1 << 20,
        writes: &[
            "write -P 0x11 0 1k",
            "write -P 0x22 64k 512",
            "write -c -P 0x33 128k 512",
        ],
        snapshot: None,
    },
    // A snapshot, then guest cluster 0 rewritten (copied on write) and cluster 64 newly
    // written: cluster 1 and 16 stay shared with the snapshot (refcount 2).
    Base {
        name: "v3-snap",
        options: "cluster_size=65536",
        size: 16 << 20,
        writes: WRITES_64K,
        snapshot: Some(&["write -P 0x44 0 64k", "write -P 0x55 4M 64k"]),
    },
    // A snapshot and nothing after: the active L2 table is shared too.
    Base {
        name: "v3-snap0",
        options: "cluster_size=65536",
        size: 16 << 20,
        writes: WRITES_64K,
        snapshot: Some(&[]),
    },
    Base {
        name: "v3-lazy",
        options: "cluster_size=65536,lazy_refcounts=on",
        size: 16 << 20,
        writes: WRITES_64K,
        snapshot: None,
    },
];

/// Makes base `name` in `dir` and returns its bytes.
fn make_base(q: &Qemu, dir: &Path, name: &str) -> Vec<u8> {
    let base = BASES
        .iter()
        .find(|b| b.name == name)
        .unwrap_or_else(|| panic!("no base image {name}"));
    let path = dir.join(format!("base-{name}.qcow2"));
    q.create(&path, base.options, base.size);
    q.io(&path, base.writes);
    if let Some(after) = base.snapshot {
        q.img(&[
            "snapshot".as_ref(),
            "-c".as_ref(),
            "s1".as_ref(),
            path.as_os_str(),
        ]);
        if !after.is_empty() {
            q.io(&path, after);
        }
    }
    must(std::fs::read(&path), format!("reading base {name}"))
}

// ---- editing images ---------------------------------------------------------------------

/// An image's bytes, with just enough qcow2 to find the structures to damage.
struct Img {
    b: Vec<u8>,
}

/// A snapshot table entry's position and fields.
struct SnapEntry {
    at: usize,
    l1_offset: u64,
    len: usize,
}

impl Img {
    fn u16(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.b[at], self.b[at + 1]])
    }

    fn u32(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.b[at..at + 4].try_into().expect("4 bytes"))
    }

    fn u64(&self, at: usize) -> u64 {
        u64::from_be_bytes(self.b[at..at + 8].try_into().expect("8 bytes"))
    }

    fn set_u32(&mut self, at: usize, v: u32) {
        self.b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }

    fn set_u64(&mut self, at: usize, v: u64) {
        if self.b.len() < at + 8 {
            self.b.resize(at + 8, 0);
        }
        self.b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    fn cluster_bits(&self) -> u32 {
        self.u32(20)
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits()
    }

    fn version(&self) -> u32 {
        self.u32(4)
    }

    fn l1_offset(&self) -> u64 {
        self.u64(40)
    }

    fn reftable_offset(&self) -> u64 {
        self.u64(48)
    }

    fn l1(&self, i: u64) -> u64 {
        self.u64((self.l1_offset() + 8 * i) as usize)
    }

    fn set_l1(&mut self, i: u64, v: u64) {
        self.set_u64((self.l1_offset() + 8 * i) as usize, v);
    }

    fn reftable(&self, i: u64) -> u64 {
        self.u64((self.reftable_offset() + 8 * i) as usize)
    }

    fn set_reftable(&mut self, i: u64, v: u64) {
        self.set_u64((self.reftable_offset() + 8 * i) as usize, v);
    }

    /// Where guest cluster `g`'s L2 entry is.
    fn l2_entry_at(&self, g: u64) -> usize {
        let per = self.cs() / 8;
        let l2 = self.l1(g / per) & OFFSET_MASK;
        assert_ne!(l2, 0, "guest cluster {g} has no L2 table in the base image");
        (l2 + 8 * (g % per)) as usize
    }

    fn l2(&self, g: u64) -> u64 {
        self.u64(self.l2_entry_at(g))
    }

    fn set_l2(&mut self, g: u64, v: u64) {
        let at = self.l2_entry_at(g);
        self.set_u64(at, v);
    }

    /// The host cluster index of guest cluster `g`'s data.
    fn host_cluster(&self, g: u64) -> u64 {
        (self.l2(g) & OFFSET_MASK) >> self.cluster_bits()
    }

    /// The cluster index of the L2 table of L1 entry `i`.
    fn l2_cluster(&self, i: u64) -> u64 {
        (self.l1(i) & OFFSET_MASK) >> self.cluster_bits()
    }

    fn refcount_bits(&self) -> u32 {
        if self.version() >= 3 {
            1 << self.u32(96)
        } else {
            16
        }
    }

    fn set_refcount(&mut self, cluster: u64, v: u64) {
        let bits = u64::from(self.refcount_bits());
        assert!(bits >= 8, "sub-byte refcounts are not used by the bases");
        let per = self.cs() * 8 / bits;
        let block = self.reftable(cluster / per) & OFFSET_MASK;
        assert_ne!(block, 0, "cluster {cluster} has no refblock");
        let bytes = (bits / 8) as usize;
        let at = (block + (cluster % per) * bits / 8) as usize;
        let be = v.to_be_bytes();
        self.b[at..at + bytes].copy_from_slice(&be[8 - bytes..]);
    }

    /// Clusters in the file (a partial last one counts).
    fn clusters(&self) -> u64 {
        (self.b.len() as u64).div_ceil(self.cs())
    }

    fn snapshot(&self, n: usize) -> SnapEntry {
        let mut at = self.u64(64) as usize;
        for i in 0..=n {
            at = at.next_multiple_of(8);
            let len = 40
                + self.u32(at + 36) as usize
                + usize::from(self.u16(at + 12))
                + usize::from(self.u16(at + 14));
            if i == n {
                return SnapEntry {
                    at,
                    l1_offset: self.u64(at),
                    len,
                };
            }
            at += len;
        }
        unreachable!()
    }
}

// ---- the catalogue --------------------------------------------------------------------

/// A legitimate difference from QEMU's outcome, and why.
#[derive(Clone, Copy, Debug)]
enum Differs {
    /// Nothing: every assertion holds as stated.
    No,
    /// qemu-img cannot read the guest (misaligned entries, compressed data past the end,
    /// the zero flag in a v2 image, a header it refuses): the twins' guests are compared
    /// through our engine instead, cluster by cluster (a failing read must fail on both).
    Unreadable,
    /// After the repairs the twins check differently; both keep corruptions. The note says
    /// why.
    After(&'static str),
    /// qemu-img's repair fails where ours completes and leaves an image qemu-img finds
    /// clean. The note says why QEMU fails.
    Repairs(&'static str),
    /// Like `Unreadable`, but QEMU's leak repair also discards the freed cluster's bytes,
    /// which a damaged entry still points at: a read that fails on qemu's twin may read on
    /// ours (which keeps them). The note says which.
    Discarded(&'static str),
}

/// One damage: the bases it applies to, the edit, and what may legitimately differ.
struct Damage {
    name: &'static str,
    bases: &'static [&'static str],
    edit: fn(&mut Img),
    differs: Differs,
}

const fn damage(name: &'static str, bases: &'static [&'static str], edit: fn(&mut Img)) -> Damage {
    Damage {
        name,
        bases,
        edit,
        differs: Differs::No,
    }
}

const fn unreadable(
    name: &'static str,
    bases: &'static [&'static str],
    edit: fn(&mut Img),
) -> Damage {
    Damage {
        name,
        bases,
        edit,
        differs: Differs::Unreadable,
    }
}

/// The L2 entry of guest cluster `g` pointing at `offset` (COPIED set).
fn point_l2(img: &mut Img, g: u64, offset: u64) {
    img.set_l2(g, COPIED | offset);
}

/// A misalignment smaller than the cluster size.
fn skew(img: &Img) -> u64 {
    if img.cs() > 512 {
        0x200
    } else {
        0x100
    }
}

/// An L2 entry: misaligned, past the end, into other metadata, doubled.
const L2_ENTRIES: &[Damage] = &[
    unreadable("l2_entry_misaligned", &["v3-64k", "v2-4k", "v3-512"], |i| {
        let e = i.l2(0) + skew(i);
        i.set_l2(0, e);
    }),
    damage("l2_entry_past_eof", &["v3-64k", "v2-4k", "v3-512"], |i| {
        point_l2(i, 0, FAR)
    }),
    damage("l2_entry_into_l1_table", &["v3-64k", "v2-4k"], |i| {
        let at = i.l1_offset();
        point_l2(i, 0, at);
    }),
    damage("l2_entry_into_refcount_table", &["v3-64k", "v2-4k"], |i| {
        let at = i.reftable_offset();
        point_l2(i, 0, at);
    }),
    damage("l2_entry_into_refcount_block", &["v3-64k", "v2-4k"], |i| {
        let at = i.reftable(0) & OFFSET_MASK;
        point_l2(i, 0, at);
    }),
    damage("l2_entry_into_its_own_l2_table", &["v3-64k"], |i| {
        let at = i.l1(0) & OFFSET_MASK;
        point_l2(i, 0, at);
    }),
    damage("l2_entry_into_snapshot_l1_table", &["v3-snap"], |i| {
        let at = i.snapshot(0).l1_offset;
        point_l2(i, 0, at);
    }),
    damage(
        "data_cluster_referenced_twice",
        &["v3-64k", "v2-4k", "v3-512"],
        |i| {
            let e = i.l2(0);
            i.set_l2(1, e);
        },
    ),
    // A preallocated zero cluster with a misaligned offset: qemu (and we) make it a plain
    // zero cluster.
    damage("zero_cluster_misaligned", &["v3-64k", "v3-512"], |i| {
        let off = (i.l2(16) & OFFSET_MASK) + skew(i);
        let g = if i.cs() > 512 { 48 } else { 2 };
        i.set_l2(g, 1 | off);
    }),
    // Guest cluster 48 preallocated zero over cluster 16's data: shared, so COPIED wrong.
    damage("zero_cluster_sharing_data", &["v3-64k"], |i| {
        let off = i.l2(16) & OFFSET_MASK;
        i.set_l2(48, 1 | COPIED | off);
    }),
    unreadable("zero_flag_in_v2_data_entry", &["v2-4k"], |i| {
        let e = i.l2(1) | 1;
        i.set_l2(1, e);
    }),
    unreadable("zero_flag_in_v2_empty_entry", &["v2-4k"], |i| {
        i.set_l2(3, 1)
    }),
];

/// Compressed descriptors QEMU cannot have written.
const COMPRESSED: &[Damage] = &[
    unreadable("compressed_offset_past_eof", &["v3-64k", "v2-4k"], |i| {
        let g = if i.cs() == 4096 { 512 } else { 32 };
        let shift = 62 - (i.cluster_bits() - 8);
        let e = i.l2(g);
        i.set_l2(g, (e & !((1u64 << shift) - 1)) | FAR);
    }),
    Damage {
        name: "compressed_size_past_eof",
        bases: &["v3-64k"],
        edit: |i| {
            let shift = 62 - (i.cluster_bits() - 8);
            let sectors = (1u64 << (i.cluster_bits() - 8)) - 1;
            let e = i.l2(32);
            i.set_l2(32, e | (sectors << shift));
        },
        differs: Differs::Discarded(
            "the stream's cluster counts as leaked (its reference runs past the end of the \
             file and is not counted); QEMU's repair punches it, so the stream is gone",
        ),
    },
    damage("compressed_with_copied_flag", &["v3-64k", "v2-4k"], |i| {
        let g = if i.cs() == 4096 { 512 } else { 32 };
        let e = i.l2(g);
        i.set_l2(g, e | COPIED);
    }),
];

/// L1 entries: misaligned, past the end, into metadata.
const L1_ENTRIES: &[Damage] = &[
    unreadable("l1_entry_misaligned", &["v3-64k", "v2-4k"], |i| {
        let e = i.l1(0) + 0x200;
        i.set_l1(0, e);
    }),
    damage("l1_entry_past_eof", &["v3-64k", "v2-4k"], |i| {
        i.set_l1(0, COPIED | FAR)
    }),
    damage("l1_entry_into_refcount_table", &["v3-64k"], |i| {
        let at = i.reftable_offset();
        i.set_l1(0, COPIED | at);
    }),
];

/// Refcounts above the references: leaks (COPIED then wrong, too, for a data cluster).
const LEAKS: &[Damage] = &[
    damage(
        "refcount_on_unused_cluster",
        &["v3-64k", "v2-4k", "v3-512"],
        |i| {
            let n = i.clusters();
            let cs = i.cs() as usize;
            i.b.resize((n as usize + 1) * cs, 0);
            i.set_refcount(n, 1);
        },
    ),
    damage(
        "refcount_2_on_data_cluster",
        &["v3-64k", "v2-4k", "v3-512"],
        |i| {
            let c = i.host_cluster(0);
            i.set_refcount(c, 2);
        },
    ),
    damage("refcount_3_on_shared_cluster", &["v3-snap"], |i| {
        let c = i.host_cluster(1);
        i.set_refcount(c, 3);
    }),
    damage("refcount_2_on_l2_table", &["v3-64k"], |i| {
        let c = i.l2_cluster(0);
        i.set_refcount(c, 2);
    }),
    damage("refcount_2_on_refcount_block", &["v3-64k"], |i| {
        let c = (i.reftable(0) & OFFSET_MASK) >> i.cluster_bits();
        i.set_refcount(c, 2);
    }),
];

/// Refcounts below the references, but not 0: `-r all` raises them.
const TOO_LOW: &[Damage] = &[damage("refcount_1_on_shared_cluster", &["v3-snap"], |i| {
    let c = i.host_cluster(1);
    i.set_refcount(c, 1);
})];

/// Refcount 0 under a used cluster: `-r all` rebuilds the refcount structure, `-r leaks`
/// fails ("need to rebuild refcount structures").
const REFCOUNT_ZERO: &[Damage] = &[
    damage(
        "refcount_0_under_data_cluster",
        &["v3-64k", "v2-4k", "v3-512", "v3-snap"],
        |i| {
            let c = i.host_cluster(0);
            i.set_refcount(c, 0);
        },
    ),
    damage("refcount_0_under_shared_cluster", &["v3-snap"], |i| {
        let c = i.host_cluster(1);
        i.set_refcount(c, 0);
    }),
    damage(
        "refcount_0_under_l2_table",
        &["v3-64k", "v2-4k", "v3-512"],
        |i| {
            let c = i.l2_cluster(0);
            i.set_refcount(c, 0);
        },
    ),
    damage("refcount_0_under_l1_table", &["v3-64k", "v2-4k"], |i| {
        let c = i.l1_offset() >> i.cluster_bits();
        i.set_refcount(c, 0);
    }),
    damage(
        "refcount_0_under_refcount_block",
        &["v3-64k", "v2-4k"],
        |i| {
            let c = (i.reftable(0) & OFFSET_MASK) >> i.cluster_bits();
            i.set_refcount(c, 0);
        },
    ),
    damage(
        "refcount_0_under_refcount_table",
        &["v3-64k", "v2-4k"],
        |i| {
            let c = i.reftable_offset() >> i.cluster_bits();
            i.set_refcount(c, 0);
        },
    ),
    damage("refcount_0_under_header", &["v3-64k", "v2-4k"], |i| {
        i.set_refcount(0, 0)
    }),
    damage("refcount_0_under_snapshot_table", &["v3-snap"], |i| {
        let c = i.u64(64) >> i.cluster_bits();
        i.set_refcount(c, 0);
    }),
    damage("refcount_0_under_snapshot_l1_table", &["v3-snap"], |i| {
        let c = i.snapshot(0).l1_offset >> i.cluster_bits();
        i.set_refcount(c, 0);
    }),
];

/// The COPIED flag against the refcounts.
const COPIED_FLAGS: &[Damage] = &[
    damage(
        "copied_missing_in_l2_entry",
        &["v3-64k", "v2-4k", "v3-snap"],
        |i| {
            let e = i.l2(0) & !COPIED;
            i.set_l2(0, e);
        },
    ),
    damage("copied_on_shared_l2_entry", &["v3-snap"], |i| {
        let e = i.l2(1) | COPIED;
        i.set_l2(1, e);
    }),
    damage("copied_missing_in_l1_entry", &["v3-64k", "v2-4k"], |i| {
        let e = i.l1(0) & !COPIED;
        i.set_l1(0, e);
    }),
    damage("copied_on_shared_l1_entry", &["v3-snap0"], |i| {
        let e = i.l1(0) | COPIED;
        i.set_l1(0, e);
    }),
];

/// Refcount table entries: misaligned, past the end, into other metadata.
const REFTABLE_ENTRIES: &[Damage] = &[
    Damage {
        name: "refcount_table_entry_misaligned",
        bases: &["v3-64k", "v2-4k"],
        edit: |i| {
            let e = i.reftable(0) + 0x200;
            i.set_reftable(0, e);
        },
        // QEMU marks the image corrupt and then refuses its own rebuild's first write
        // (the overlap check sees the unaligned refblock's cluster): both fail the same
        // way and leave the same image.
        differs: Differs::No,
    },
    damage("refcount_table_entry_past_eof", &["v3-64k", "v2-4k"], |i| {
        i.set_reftable(0, FAR)
    }),
    damage("refcount_table_entry_into_l1_table", &["v3-64k"], |i| {
        let at = i.l1_offset();
        i.set_reftable(0, at);
    }),
    damage("refcount_table_entry_into_l2_table", &["v3-64k"], |i| {
        let at = i.l1(0) & OFFSET_MASK;
        i.set_reftable(0, at);
    }),
];

/// Sets snapshot 0's 32-bit field at `off`.
fn snap_u32(i: &mut Img, off: usize, v: u32) {
    let at = i.snapshot(0).at;
    i.set_u32(at + off, v);
}

/// Replaces the snapshot table with one holding the original entry and then `n - 1`
/// snapshots without L1 tables (IDs `id_len` bytes, names `name_len`), appended at the end
/// of the file with refcounts 1 (the old table's cluster is freed).
fn big_snapshot_table(i: &mut Img, n: u32, id_len: u16, name_len: u16) {
    let first = i.snapshot(0);
    let mut t = i.b[first.at..first.at + first.len].to_vec();
    for k in 1..n {
        t.resize(t.len().next_multiple_of(8), 0);
        t.extend_from_slice(&[0; 12]);
        t.extend_from_slice(&id_len.to_be_bytes());
        t.extend_from_slice(&name_len.to_be_bytes());
        t.extend_from_slice(&[0; 20]);
        t.extend_from_slice(&24u32.to_be_bytes());
        t.extend_from_slice(&[0; 24]);
        let mut id = (k + 1).to_string().into_bytes();
        id.resize(usize::from(id_len), b'x');
        t.extend_from_slice(&id);
        t.resize(t.len() + usize::from(name_len), b'n');
    }
    let cs = i.cs() as usize;
    let start = i.clusters();
    i.b.resize(start as usize * cs, 0);
    i.b.extend_from_slice(&t);
    i.b.resize(i.b.len().next_multiple_of(cs), 0);
    for c in start..i.clusters() {
        i.set_refcount(c, 1);
    }
    let old = i.u64(64) >> i.cluster_bits();
    i.set_refcount(old, 0);
    i.set_u32(60, n);
    i.set_u64(64, start * i.cs());
}

/// Snapshot table damage: what `qcow2_check_read_snapshot_table` finds and
/// `qcow2_check_fix_snapshot_table` repairs (extra data, incomplete v3 entries, too many
/// or too big), and snapshot L1 tables the check refuses to follow.
const SNAPSHOT_TABLE: &[Damage] = &[
    damage("snapshot_extra_data_too_large", &["v3-snap"], |i| {
        snap_u32(i, 36, 2000)
    }),
    damage("snapshot_extra_data_incomplete", &["v3-snap"], |i| {
        snap_u32(i, 36, 8)
    }),
    damage("snapshot_l1_table_misaligned", &["v3-snap"], |i| {
        let s = i.snapshot(0);
        i.set_u64(s.at, s.l1_offset + 0x200);
    }),
    damage("snapshot_l1_table_past_eof", &["v3-snap"], |i| {
        let at = i.snapshot(0).at;
        i.set_u64(at, FAR);
    }),
    Damage {
        name: "snapshot_l1_table_too_large",
        bases: &["v3-snap"],
        edit: |i| snap_u32(i, 8, 0x0200_0000),
        // Both fix the leaks of the snapshot's clusters (its L1 table is not followed),
        // then refuse the COPIED repair that would overwrite the L2 table the oversized
        // L1 "covers", mark the image corrupt and fail. QEMU loses its refcount repairs
        // with the node it just killed (they were still in its cache); ours were written
        // (and flushed) before the COPIED pass. So qemu-img then finds the leaks again
        // on its twin and the COPIED errors on ours.
        differs: Differs::After(
            "QEMU drops its unflushed refcount repairs when it marks the image corrupt",
        ),
    },
    damage(
        "snapshot_table_offset_misaligned_without_snapshots",
        &["v3-64k"],
        |i| i.set_u64(64, 0x200),
    ),
];

/// The snapshot count and table size limits, with real tables (slow: QEMU reads 65,537
/// entries one by one; the second table is 64 MiB).
const SNAPSHOT_LIMITS: &[Damage] = &[
    damage("more_than_65536_snapshots", &["v3-snap"], |i| {
        big_snapshot_table(i, 65_537, 1, 0)
    }),
    damage("snapshot_table_over_64_mib", &["v3-snap"], |i| {
        big_snapshot_table(i, 513, u16::MAX, u16::MAX)
    }),
    // Only the count says 65,537: the "table" runs on past its one entry, over other
    // metadata and past the end of the file (read as zeros, as QEMU reads it).
    Damage {
        name: "snapshot_count_beyond_its_table",
        bases: &["v3-snap"],
        edit: |i| i.set_u32(60, 65_537),
        // QEMU drops the overhanging snapshot, reads 65,536 entries (mostly zeros), frees
        // the old table's one counted cluster as a leak, and then allocates the new table
        // over that very cluster, which its overlap check refuses ("overlaps with snapshot
        // table"): the image is marked corrupt and the check fails. We never reuse the
        // clusters of the table being replaced, and never free clusters the old table
        // shares with other structures or did not have counted (it ran past the end of
        // the file), so the rewrite completes and qemu-img then finds the image clean.
        differs: Differs::Repairs("QEMU's allocator reuses the old table's freed cluster"),
    },
];

/// The dirty bit of lazy refcounts and the corrupt bit.
const HEADER_BITS: &[Damage] = &[
    damage("dirty_bit", &["v3-lazy"], |i| {
        let v = i.u64(72) | 1;
        i.set_u64(72, v);
    }),
    // What a crash with lazy refcounts leaves: refcount 0 under new clusters.
    damage("dirty_bit_with_refcount_0", &["v3-lazy"], |i| {
        let v = i.u64(72) | 1;
        i.set_u64(72, v);
        for g in [0, 16] {
            let c = i.host_cluster(g);
            i.set_refcount(c, 0);
        }
    }),
    damage("corrupt_bit", &["v3-64k"], |i| {
        let v = i.u64(72) | 2;
        i.set_u64(72, v);
    }),
    damage("corrupt_bit_with_refcount_0", &["v3-64k"], |i| {
        let v = i.u64(72) | 2;
        i.set_u64(72, v);
        let c = i.host_cluster(0);
        i.set_refcount(c, 0);
    }),
];

// ---- running both tools ----------------------------------------------------------------

/// Our check of `path` through the harness (a check-only open, which like QEMU's leaves
/// the snapshot table to the check).
fn our_check<H: Harness>(h: &H, path: &Path, repair: Option<Repair>, ctx: &str) -> CheckReport {
    let mut disk = must(
        h.open(path, Mode::check_only(repair.is_some())),
        format!("{ctx}: check-only open"),
    );
    let report = must(disk.check(repair), format!("{ctx}: our check"));
    must(disk.close(), format!("{ctx}: close after our check"));
    report
}

/// The exit status `qemu-img check` would give our report.
fn status_of(r: &CheckReport) -> i32 {
    if r.failed() || r.check_errors > 0 {
        1
    } else if r.corruptions > 0 {
        2
    } else if r.leaks > 0 {
        3
    } else {
        0
    }
}

/// qemu-img's detail lines, without its own prefixes and its final verdict.
fn qemu_lines(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| !l.starts_with("qemu-img: Check failed"))
        .map(|l| l.strip_prefix("qemu-img: ").unwrap_or(l).to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Our detail lines, without our own warnings (a zero flag in a v2 image, which QEMU's check passes silently although its
/// reads then fail: we say so, without counting it).
fn our_lines(r: &CheckReport) -> Vec<String> {
    r.messages
        .iter()
        .filter(|l| !l.starts_with("Warning:"))
        .cloned()
        .collect()
}

/// Asserts our report says what qemu-img's run said: outcome, every counter of the JSON
/// report, and the detail lines.
fn assert_same(q: &CheckRun, ours: &CheckReport, ctx: &str) {
    let mut diff = String::new();
    match &q.json {
        None => {
            if !ours.failed() {
                diff.push_str("qemu-img's check could not complete (no report), ours did\n");
            }
        }
        Some(_) => {
            if ours.failed() {
                diff.push_str("our check could not complete, qemu-img's did\n");
            }
            for (name, value) in ours.qemu_fields() {
                if q.field(name) != value {
                    let _ = writeln!(diff, "{name}: qemu-img {}, ours {value}", q.field(name));
                }
            }
        }
    }
    if q.status != status_of(ours) {
        let _ = writeln!(
            diff,
            "exit status: qemu-img {}, ours {}",
            q.status,
            status_of(ours)
        );
    }
    let (ql, ol) = (qemu_lines(&q.stderr), our_lines(ours));
    if ql != ol {
        let at = ql.iter().zip(&ol).take_while(|(a, b)| a == b).count();
        let _ = writeln!(
            diff,
            "detail lines differ from line {} on ({} lines from qemu-img, {} from us):\nqemu-img: {:?}\nours:     {:?}",
            at + 1,
            ql.len(),
            ol.len(),
            ql.get(at..(at + 3).min(ql.len())).unwrap_or_default(),
            ol.get(at..(at + 3).min(ol.len())).unwrap_or_default(),
        );
    }
    assert!(
        diff.is_empty(),
        "{ctx}: our check differs from qemu-img's:\n{diff}qemu-img's JSON: {}\nour report: {ours:#?}",
        q.json.as_ref().map_or("(none)".into(), ToString::to_string)
    );
}

/// Whether two qemu-img runs ended alike: status and every counter.
fn same_run(a: &CheckRun, b: &CheckRun) -> bool {
    let strip = |r: &CheckRun| {
        r.json.clone().map(|mut v| {
            if let Some(m) = v.as_object_mut() {
                m.remove("filename");
            }
            v
        })
    };
    a.status == b.status && strip(a) == strip(b)
}

/// Reads the guests of `a` and `b` through our engine, cluster by cluster: each read must
/// give the same bytes on both, or fail on both.
/// With `lenient` (the reason), a read that fails on qemu's twin may succeed on ours.
fn same_guest_through_engine<H: Harness>(
    h: &H,
    a: &Path,
    b: &Path,
    ctx: &str,
    lenient: Option<&str>,
) {
    let (mut da, mut db) = match (h.open(a, Mode::read_only()), h.open(b, Mode::read_only())) {
        (Ok(da), Ok(db)) => (da, db),
        (Err(x), Err(y)) if x == y => return, // Neither opens, alike.
        (x, y) => panic!(
            "{ctx}: opening the repaired twins: qemu's {:?}, ours {:?}",
            x.map(drop),
            y.map(drop)
        ),
    };
    assert_eq!(da.len(), db.len(), "{ctx}: virtual sizes differ");
    let step = 64 << 10;
    let mut at = 0;
    while at < da.len() {
        let n = step.min(da.len() - at) as usize;
        let (mut x, mut y) = (vec![0u8; n], vec![0u8; n]);
        let rx = da.read_at(&mut x, at).map(|()| x);
        let ry = db.read_at(&mut y, at).map(|()| y);
        match (rx, ry) {
            (Ok(x), Ok(y)) => assert!(x == y, "{ctx}: guest bytes differ at {at:#x}"),
            (Err(_), Err(_)) => {}
            (Err(_), Ok(_)) if lenient.is_some() => {}
            (x, y) => panic!(
                "{ctx}: reading {at:#x}: qemu's twin {:?}, ours {:?} ({})",
                x.map(drop),
                y.map(drop),
                lenient.unwrap_or("no difference expected")
            ),
        }
        at += n as u64;
    }
    let _ = da.close();
    let _ = db.close();
}

/// The incompatible feature bits (dirty, corrupt, ...).
fn incompatible(path: &Path) -> u64 {
    let bytes = must(std::fs::read(path), "reading a twin");
    if u32::from_be_bytes(bytes[4..8].try_into().expect("4 bytes")) < 3 {
        return 0;
    }
    u64::from_be_bytes(bytes[72..80].try_into().expect("8 bytes"))
}

/// Applies `d` to `base` in twins, checks and repairs them (qemu-img one, we the other)
/// with `mode`, and asserts the parity the module describes.
fn run_twins<H: Harness>(
    h: &H,
    q: &Qemu,
    dir: &Path,
    d: &Damage,
    base_name: &str,
    base: &[u8],
    mode: Repair,
) {
    let flag = if mode == Repair::All { "all" } else { "leaks" };
    let ctx = format!("{} on {base_name} (-r {flag}, {})", d.name, h.name());
    let mut img = Img { b: base.to_vec() };
    (d.edit)(&mut img);
    let twin =
        |who: &str| -> PathBuf { dir.join(format!("{}-{base_name}-{flag}-{who}.qcow2", d.name)) };
    let (a, b) = (twin("qemu"), twin("ours"));
    must(std::fs::write(&a, &img.b), format!("{ctx}: writing"));
    must(std::fs::write(&b, &img.b), format!("{ctx}: writing"));

    // Both find the same.
    let found = q.check_run(&a, None);
    assert_same(
        &found,
        &our_check(h, &b, None, &ctx),
        &format!("{ctx}: check"),
    );

    // Both repair the same.
    let repaired = q.check_run(&a, Some(flag));
    let ours = our_check(h, &b, Some(mode), &ctx);
    if let Differs::Repairs(why) = d.differs {
        assert!(
            repaired.json.is_none() && ours.failure.is_none(),
            "{ctx}: expected qemu-img's repair to fail ({why}) and ours to complete: qemu-img {:?}\n{}\nours {ours:#?}",
            repaired.json,
            repaired.stderr
        );
        let after = q.check_run(&b, None);
        assert!(
            after.status == 0 && after.field("check-errors") == 0,
            "{ctx}: qemu-img check after our repair: {} {:?}\n{}",
            after.status,
            after.json,
            after.stderr
        );
        assert_same(
            &after,
            &our_check(h, &b, None, &ctx),
            &format!("{ctx}: our check of our repaired twin"),
        );
        return;
    }
    assert_same(&repaired, &ours, &format!("{ctx}: check -r {flag}"));

    // qemu-img finds the same on both results, and our check agrees with it on each.
    let after_a = q.check_run(&a, None);
    let after_b = q.check_run(&b, None);
    match d.differs {
        Differs::After(why) => {
            assert!(
                after_a.field("corruptions") > 0 && after_b.field("corruptions") > 0,
                "{ctx}: both twins should keep corruptions ({why}): qemu's {:?}, ours {:?}",
                after_a.json,
                after_b.json
            );
        }
        _ => assert!(
            same_run(&after_a, &after_b),
            "{ctx}: qemu-img check after the repairs differs:\nafter qemu's repair: {} {:?}\n{}\nafter ours: {} {:?}\n{}",
            after_a.status,
            after_a.json,
            after_a.stderr,
            after_b.status,
            after_b.json,
            after_b.stderr
        ),
    }
    assert_same(
        &after_a,
        &our_check(h, &a, None, &ctx),
        &format!("{ctx}: our check of qemu's repaired twin"),
    );
    assert_same(
        &after_b,
        &our_check(h, &b, None, &ctx),
        &format!("{ctx}: our check of our repaired twin"),
    );

    // The dirty and corrupt bits end alike, except where QEMU clears the dirty bit after a
    // repair that failed (it marks a dirty image clean on close whatever the check
    // found; we keep the bit, so that the next writable open repairs again).
    let (ia, ib) = (incompatible(&a), incompatible(&b));
    let failed_dirty = repaired.json.is_none() && incompatible(&b) & 1 != 0;
    if !failed_dirty {
        assert_eq!(
            ia, ib,
            "{ctx}: incompatible feature bits after the repairs: qemu's twin {ia:#x}, ours {ib:#x}"
        );
    }

    // The guests read the same.
    match q.compare_status(&a, &b) {
        0 => {}
        1 => panic!(
            "{ctx}: qemu-img compare: the repaired guests differ ({} vs {})",
            a.display(),
            b.display()
        ),
        status => {
            assert!(
                matches!(d.differs, Differs::Unreadable | Differs::Discarded(_))
                    || repaired.json.is_none(),
                "{ctx}: qemu-img compare failed (status {status}) on the repaired twins"
            );
            let lenient = match d.differs {
                Differs::Discarded(why) => Some(why),
                _ => None,
            };
            same_guest_through_engine(h, &a, &b, &ctx, lenient);
        }
    }
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
}

/// Runs every damage of `list` on each of its bases, with each repair mode of `modes`.
fn run_catalogue<H: Harness>(h: &H, case: &str, list: &[Damage], modes: &[Repair]) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require(case) else { return };
    let dir = scratch();
    let mut bases: Vec<(&str, Vec<u8>)> = Vec::new();
    for d in list {
        for &name in d.bases {
            if !bases.iter().any(|(n, _)| *n == name) {
                bases.push((name, make_base(&q, dir.path(), name)));
            }
            let base = &bases.iter().find(|(n, _)| *n == name).expect("made").1;
            for &mode in modes {
                run_twins(h, &q, dir.path(), d, name, base, mode);
            }
        }
    }
}

const ALL: &[Repair] = &[Repair::All];
const BOTH: &[Repair] = &[Repair::Leaks, Repair::All];

/// Leaked clusters (refcount above the references): found, counted and freed alike.
pub fn leaks<H: Harness>(h: &H) {
    run_catalogue(h, "repair::leaks", LEAKS, BOTH);
}

/// Refcounts below the references: raised by `-r all`, left by `-r leaks`.
pub fn refcounts_too_low<H: Harness>(h: &H) {
    run_catalogue(h, "repair::refcounts_too_low", TOO_LOW, BOTH);
}

/// Refcount 0 under every kind of used cluster: `-r all` rebuilds the refcount structure,
/// `-r leaks` refuses ("need to rebuild refcount structures").
pub fn refcount_zero<H: Harness>(h: &H) {
    run_catalogue(h, "repair::refcount_zero", REFCOUNT_ZERO, BOTH);
}

/// COPIED set or missing in L1 and L2 entries: rewritten from the refcounts.
pub fn copied_flags<H: Harness>(h: &H) {
    run_catalogue(h, "repair::copied_flags", COPIED_FLAGS, BOTH);
}

/// L2 entries misaligned, past the end, into metadata, doubled; preallocated zero
/// entries misaligned; the zero flag in v2 images.
pub fn l2_entries<H: Harness>(h: &H) {
    run_catalogue(h, "repair::l2_entries", L2_ENTRIES, ALL);
}

/// L1 entries misaligned, past the end, into metadata.
pub fn l1_entries<H: Harness>(h: &H) {
    run_catalogue(h, "repair::l1_entries", L1_ENTRIES, ALL);
}

/// Impossible compressed descriptors.
pub fn compressed_descriptors<H: Harness>(h: &H) {
    run_catalogue(h, "repair::compressed_descriptors", COMPRESSED, ALL);
}

/// Refcount table entries misaligned, past the end, into metadata.
pub fn refcount_table_entries<H: Harness>(h: &H) {
    run_catalogue(h, "repair::refcount_table_entries", REFTABLE_ENTRIES, BOTH);
}

/// Snapshot table damage: extra data, incomplete entries, snapshot L1 tables.
pub fn snapshot_table<H: Harness>(h: &H) {
    run_catalogue(h, "repair::snapshot_table", SNAPSHOT_TABLE, BOTH);
}

/// More than 65,536 snapshots, a snapshot table over 64 MiB: `-r all` drops the
/// overhanging ones.
pub fn snapshot_table_limits<H: Harness>(h: &H) {
    run_catalogue(h, "repair::snapshot_table_limits", SNAPSHOT_LIMITS, ALL);
}

/// The dirty bit of lazy refcounts and the corrupt bit, alone and with refcount 0 under
/// used clusters.
pub fn dirty_and_corrupt_bits<H: Harness>(h: &H) {
    run_catalogue(h, "repair::dirty_and_corrupt_bits", HEADER_BITS, BOTH);
}
