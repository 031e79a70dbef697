//! Hostile headers: every open-time limit refuses with its typed error, never a panic or a
//! hang, whatever the bytes.

use std::path::PathBuf;

use qcow2_proto::{Feature, FormatError, OpenError, Table};
use tempfile::TempDir;

use super::must;
use crate::harness::{Disk, Error, Harness, Mode};
use crate::hostile::{field, ImageBytes};
use crate::model::Model;
use crate::qemu::Qemu;
use crate::verify::{matches_model, our_check_clean, scratch};

/// Writes `img` into a fresh directory.
fn place(img: &ImageBytes) -> (TempDir, PathBuf) {
    let dir = scratch();
    let path = dir.path().join("hostile.qcow2");
    img.write(&path);
    (dir, path)
}

/// Opens `img` with `mode`.
fn open<H: Harness>(h: &H, img: &ImageBytes, mode: Mode) -> Result<H::Disk, Error> {
    let (_dir, path) = place(img);
    h.open(&path, mode)
}

/// Asserts that opening `img` (writable, then read-only unless `writable_only`) fails with
/// exactly `want`.
#[track_caller]
fn refused<H: Harness>(h: &H, img: &ImageBytes, want: OpenError, what: &str) {
    for mode in [Mode::writable(), Mode::read_only()] {
        match open(h, img, mode) {
            Err(Error::Open(got)) => assert_eq!(got, want, "{what} ({mode:?})"),
            Err(other) => panic!("{what} ({mode:?}): want {want:?}, got the untyped {other}"),
            Ok(_) => panic!("{what} ({mode:?}): want {want:?}, but the image opened"),
        }
    }
}

fn format(e: FormatError) -> OpenError {
    OpenError::Format(e)
}

/// The base image of these cases opens, reads as zero and is clean for us and for qemu-img
/// (so every refusal below is due to the one field changed).
pub fn base_image_is_valid<H: Harness>(h: &H) {
    for (version, bits, size) in [(3, 16, 16 << 20), (2, 16, 16 << 20), (3, 9, 32 << 10)] {
        let img = ImageBytes::valid(version, bits, size);
        let (dir, path) = place(&img);
        let what = format!("v{version} cluster_bits={bits}");
        let mut disk = must(h.open(&path, Mode::writable()), format!("{what}: open"));
        assert_eq!(
            (disk.info().version, disk.len(), disk.info().cluster_size),
            (version, size, 1 << bits),
            "{what}"
        );
        must(
            matches_model(&mut disk, &Model::new(size)),
            format!("{what}: reads as zero"),
        );
        must(disk.close(), format!("{what}: close"));
        must(our_check_clean(h, &path), format!("{what}: our check"));
        if let Some(q) = h
            .caps()
            .real_files
            .then(|| Qemu::optional("hostile::base_image_is_valid"))
            .flatten()
        {
            q.assert_clean(&path, &what);
        }
        drop(dir);
    }
}

/// Wrong magic, or no header at all.
pub fn bad_magic<H: Harness>(h: &H) {
    let mut img = ImageBytes::v3();
    img.set_u32(field::MAGIC, 0x5146_49fa);
    refused(h, &img, format(FormatError::BadMagic), "magic QFI\\xfa");
    img.bytes.iter_mut().for_each(|b| *b = 0);
    refused(h, &img, format(FormatError::BadMagic), "an all-zero file");
}

/// Versions other than 2 and 3.
pub fn versions<H: Harness>(h: &H) {
    for v in [0, 1, 4, u32::MAX] {
        let mut img = ImageBytes::v3();
        img.set_u32(field::VERSION, v);
        refused(
            h,
            &img,
            format(FormatError::UnsupportedVersion(v)),
            &format!("version {v}"),
        );
    }
}

/// cluster_bits outside 9..=21 (including values that would overflow a shift).
pub fn cluster_bits<H: Harness>(h: &H) {
    for bits in [0, 8, 22, 31, 64, u32::MAX] {
        for version in [2, 3] {
            let mut img = ImageBytes::valid(version, 16, 16 << 20);
            img.set_u32(field::CLUSTER_BITS, bits);
            refused(
                h,
                &img,
                format(FormatError::ClusterBits(bits)),
                &format!("v{version} cluster_bits {bits}"),
            );
        }
    }
}

/// v3 header_length below 104 or beyond the cluster.
pub fn header_length<H: Harness>(h: &H) {
    let mut img = ImageBytes::v3();
    for len in [0, 72, 100, 103] {
        img.set_u32(field::HEADER_LENGTH, len);
        refused(
            h,
            &img,
            format(FormatError::HeaderTooShort),
            &format!("header_length {len}"),
        );
    }
    img.set_u32(field::HEADER_LENGTH, 65536 + 8);
    refused(
        h,
        &img,
        format(FormatError::HeaderExceedsCluster),
        "header_length 65544 with 64 KiB clusters",
    );
    let mut small = ImageBytes::valid(3, 9, 32 << 10);
    small.set_u32(field::HEADER_LENGTH, 520);
    refused(
        h,
        &small,
        format(FormatError::HeaderExceedsCluster),
        "header_length 520 with 512-byte clusters",
    );
    img.set_u32(field::HEADER_LENGTH, u32::MAX);
    refused(
        h,
        &img,
        format(FormatError::HeaderExceedsCluster),
        "header_length u32::MAX",
    );
}

/// The backing file name: offset past cluster 0, name longer than 1023 bytes or running
/// past cluster 0; a well-formed one is a feature of a later issue.
pub fn backing_file_name<H: Harness>(h: &H) {
    let mut img = ImageBytes::v3();
    img.set_u64(field::BACKING_FILE_OFFSET, 65536 + 512)
        .set_u32(field::BACKING_FILE_SIZE, 8);
    refused(
        h,
        &img,
        format(FormatError::BackingFileOffset),
        "backing_file_offset past cluster 0",
    );
    img.set_u64(field::BACKING_FILE_OFFSET, u64::MAX);
    refused(
        h,
        &img,
        format(FormatError::BackingFileOffset),
        "backing_file_offset u64::MAX",
    );
    img.set_u64(field::BACKING_FILE_OFFSET, 0x1000)
        .set_u32(field::BACKING_FILE_SIZE, 1024);
    refused(
        h,
        &img,
        format(FormatError::BackingFileNameTooLong),
        "backing name of 1024 bytes",
    );
    img.set_u64(field::BACKING_FILE_OFFSET, 65536 - 10)
        .set_u32(field::BACKING_FILE_SIZE, 20);
    refused(
        h,
        &img,
        format(FormatError::BackingFileNameTooLong),
        "backing name running past cluster 0",
    );
    img.set_u64(field::BACKING_FILE_OFFSET, 0x1000)
        .set_u32(field::BACKING_FILE_SIZE, 8);
    img.bytes[0x1000..0x1008].copy_from_slice(b"base.img");
    // A well-formed name of a file that does not exist: the runtime says which.
    for mode in [Mode::writable(), Mode::read_only()] {
        match open(h, &img, mode) {
            Err(Error::Other(m)) => assert!(m.contains("base.img"), "{m}"),
            Err(e) => panic!("a missing backing file ({mode:?}): {e}"),
            Ok(_) => panic!("a missing backing file ({mode:?}): the image opened"),
        }
    }
}

/// The active L1 table: too large, misaligned, beyond `i64::MAX`, past the end of the file,
/// too small for the size.
pub fn l1_table<H: Harness>(h: &H) {
    let base = ImageBytes::v3();
    let mut img = base.clone();
    img.set_u32(field::L1_SIZE, (32 << 20) / 8 + 1);
    refused(
        h,
        &img,
        format(FormatError::TableTooLarge(Table::ActiveL1)),
        "l1_size above 32 MiB",
    );
    img.set_u32(field::L1_SIZE, u32::MAX);
    refused(
        h,
        &img,
        format(FormatError::TableTooLarge(Table::ActiveL1)),
        "l1_size u32::MAX",
    );
    let mut img = base.clone();
    img.set_u64(field::L1_TABLE_OFFSET, 3 * 65536 + 8);
    refused(
        h,
        &img,
        format(FormatError::TableOffset(Table::ActiveL1)),
        "misaligned L1 offset",
    );
    // The table must end at or below i64::MAX (QEMU's rule): 64 KiB of L1 at 2^63 - 64 KiB
    // ends one byte past it.
    for (off, entries) in [(1u64 << 63, 1), (!0xffff, 1), ((1 << 63) - 0x1_0000, 8192)] {
        img.set_u64(field::L1_TABLE_OFFSET, off)
            .set_u32(field::L1_SIZE, entries);
        let what = format!("L1 of {entries} entries at {off:#x}");
        refused(
            h,
            &img,
            format(FormatError::TableOffset(Table::ActiveL1)),
            &what,
        );
    }
    // Past the end of the file (QEMU reads zeros there, then writes wherever they say).
    for (off, entries) in [(64 << 20, 1), (3 * 65536, (32 << 20) / 8)] {
        let mut img = base.clone();
        img.set_u64(field::L1_TABLE_OFFSET, off)
            .set_u32(field::L1_SIZE, entries);
        refused(
            h,
            &img,
            format(FormatError::TablePastEof(Table::ActiveL1)),
            &format!("L1 of {entries} entries at {off:#x}, past EOF"),
        );
    }
    let mut img = base.clone();
    img.set_u32(field::L1_SIZE, 0);
    refused(
        h,
        &img,
        format(FormatError::L1TooSmall),
        "l1_size 0 for a 16 MiB disk",
    );
    let mut img = base.clone();
    img.set_u64(field::SIZE, 1 << 63);
    refused(
        h,
        &img,
        format(FormatError::SizeTooLarge),
        "virtual size 2^63",
    );
}

/// The refcount table: no clusters, too many, misaligned or zero offset, past the end of the
/// file.
pub fn refcount_table<H: Harness>(h: &H) {
    let base = ImageBytes::v3();
    let mut img = base.clone();
    img.set_u32(field::REFCOUNT_TABLE_CLUSTERS, 0);
    refused(
        h,
        &img,
        format(FormatError::NoRefcountTable),
        "refcount_table_clusters 0",
    );
    for clusters in [(8 << 20) / 65536 + 1, u32::MAX] {
        img.set_u32(field::REFCOUNT_TABLE_CLUSTERS, clusters);
        refused(
            h,
            &img,
            format(FormatError::TableTooLarge(Table::Refcount)),
            &format!("refcount_table_clusters {clusters}"),
        );
    }
    let mut img = base.clone();
    for off in [65536 + 512, 0, 1 << 63] {
        img.set_u64(field::REFCOUNT_TABLE_OFFSET, off);
        refused(
            h,
            &img,
            format(FormatError::TableOffset(Table::Refcount)),
            &format!("reftable offset {off:#x}"),
        );
    }
    for (off, clusters) in [(64 << 20, 1), (65536, 128)] {
        let mut img = base.clone();
        img.set_u64(field::REFCOUNT_TABLE_OFFSET, off)
            .set_u32(field::REFCOUNT_TABLE_CLUSTERS, clusters);
        refused(
            h,
            &img,
            format(FormatError::TablePastEof(Table::Refcount)),
            &format!("reftable of {clusters} clusters at {off:#x}, past EOF"),
        );
    }
}

/// The snapshot table: too many snapshots, misaligned offset, past the end of the file.
pub fn snapshot_table<H: Harness>(h: &H) {
    let mut img = ImageBytes::v3();
    img.set_u32(field::NB_SNAPSHOTS, 65537);
    img.set_u64(field::SNAPSHOTS_OFFSET, 4 * 65536);
    refused(
        h,
        &img,
        format(FormatError::TableTooLarge(Table::Snapshot)),
        "65537 snapshots",
    );
    img.set_u32(field::NB_SNAPSHOTS, u32::MAX);
    refused(
        h,
        &img,
        format(FormatError::TableTooLarge(Table::Snapshot)),
        "u32::MAX snapshots",
    );
    img.set_u32(field::NB_SNAPSHOTS, 1);
    img.set_u64(field::SNAPSHOTS_OFFSET, 4 * 65536 + 8);
    refused(
        h,
        &img,
        format(FormatError::TableOffset(Table::Snapshot)),
        "misaligned snapshot table",
    );
    img.set_u64(field::SNAPSHOTS_OFFSET, !0xffff);
    refused(
        h,
        &img,
        format(FormatError::TableOffset(Table::Snapshot)),
        "snapshot table beyond i64::MAX",
    );
    img.set_u64(field::SNAPSHOTS_OFFSET, 64 << 20);
    refused(
        h,
        &img,
        format(FormatError::TablePastEof(Table::Snapshot)),
        "snapshot table past EOF",
    );
}

/// refcount_order above 6 (refcounts wider than 64 bits).
pub fn refcount_order<H: Harness>(h: &H) {
    for order in [7, 32, u32::MAX] {
        let mut img = ImageBytes::v3();
        img.set_u32(field::REFCOUNT_ORDER, order);
        refused(
            h,
            &img,
            format(FormatError::RefcountOrder(order)),
            &format!("refcount_order {order}"),
        );
    }
}

/// Unknown encryption methods are refused; AES (1) is a feature of a later issue.
pub fn crypt_method<H: Harness>(h: &H) {
    for method in [3, u32::MAX] {
        let mut img = ImageBytes::v3();
        img.set_u32(field::CRYPT_METHOD, method);
        refused(
            h,
            &img,
            format(FormatError::EncryptionMethod(method)),
            &format!("crypt_method {method}"),
        );
    }
    let mut img = ImageBytes::v3();
    img.set_u32(field::CRYPT_METHOD, 1);
    refused(
        h,
        &img,
        OpenError::Unsupported(Feature::Encryption),
        "crypt_method 1 (AES)",
    );
}

fn unknown_bit<H: Harness>(h: &H, img: &ImageBytes, bit: u32, name: Option<&str>) {
    let what = format!("unknown incompatible bit {bit} named {name:?}");
    for mode in [Mode::writable(), Mode::read_only()] {
        match open(h, img, mode) {
            Err(Error::Open(
                e @ OpenError::Format(FormatError::UnknownIncompatible { bits, names }),
            )) => {
                assert_eq!(bits, 1 << bit, "{what}: the bits reported");
                assert_eq!(names.name(bit), name, "{what}: the name reported");
                let message = e.to_string();
                match name {
                    Some(n) => assert!(
                        message.contains(n),
                        "{what}: message {message:?} lacks the name"
                    ),
                    None => assert!(
                        message.contains(&format!("{:x}", 1u64 << bit)),
                        "{what}: message {message:?} lacks the bit"
                    ),
                }
            }
            other => panic!("{what} ({mode:?}): {:?}", other.map(drop)),
        }
    }
}

/// An unknown incompatible bit refuses every open; the message names it from the feature
/// name table when the image has an entry for it.
pub fn unknown_incompatible_bit<H: Harness>(h: &H) {
    for bit in [5, 40, 63] {
        let mut img = ImageBytes::v3();
        img.set_u64(field::INCOMPATIBLE, 1 << bit);
        unknown_bit(h, &img, bit, None);
        img.feature_names(&[
            (0, 0, "dirty bit"),
            (0, bit as u8, "hostile feature"),
            (1, bit as u8, "not this one"),
        ]);
        unknown_bit(h, &img, bit, Some("hostile feature"));
    }
}

/// The corrupt bit refuses writable opens; read-only opens work and report it.
pub fn corrupt_bit<H: Harness>(h: &H) {
    let mut img = ImageBytes::v3();
    img.set_u64(field::INCOMPATIBLE, 1 << 1);
    match open(h, &img, Mode::writable()) {
        Err(Error::Open(e)) => assert_eq!(
            e,
            OpenError::CorruptReadWrite,
            "writable open of a corrupt image"
        ),
        other => panic!("writable open of a corrupt image: {:?}", other.map(drop)),
    }
    let mut disk = must(
        open(h, &img, Mode::read_only()),
        "read-only open of a corrupt image",
    );
    assert!(disk.info().corrupt, "info().corrupt");
    must(
        matches_model(&mut disk, &Model::new(16 << 20)),
        "reading a corrupt image",
    );
    must(disk.close(), "close");
}

/// The dirty bit (lazy refcounts, not closed cleanly): a writable open either refuses with
/// `Unsupported(DirtyImageRepair)` or repairs, leaving a clean image with the bit cleared;
/// a read-only open works and reports it.
pub fn dirty_bit<H: Harness>(h: &H) {
    let mut img = ImageBytes::v3();
    img.set_u64(field::INCOMPATIBLE, 1)
        .set_u64(field::COMPATIBLE, 1);
    let mut disk = must(
        open(h, &img, Mode::read_only()),
        "read-only open of a dirty image",
    );
    assert!(disk.info().dirty, "info().dirty");
    must(
        matches_model(&mut disk, &Model::new(16 << 20)),
        "reading a dirty image",
    );
    must(disk.close(), "close");

    // A writable open repairs it first (QEMU's automatic repair of lazy refcounts).
    let (_dir, path) = place(&img);
    let disk = must(
        h.open(&path, Mode::writable()),
        "writable open of a dirty image",
    );
    must(disk.close(), "close after repairing");
    let bytes = std::fs::read(&path).expect("image bytes");
    let incompatible = u64::from_be_bytes(bytes[72..80].try_into().expect("8 bytes"));
    assert_eq!(
        incompatible & 1,
        0,
        "the dirty bit is still set after a repairing open and close"
    );
    must(our_check_clean(h, &path), "check after repair");
}

fn autoclear(path: &std::path::Path) -> u64 {
    let bytes = std::fs::read(path).expect("image bytes");
    u64::from_be_bytes(
        bytes[field::AUTOCLEAR..field::AUTOCLEAR + 8]
            .try_into()
            .expect("8 bytes"),
    )
}

/// A writable open clears unknown autoclear bits (in the file, right away); a read-only open
/// leaves them.
pub fn unknown_autoclear_bit_cleared<H: Harness>(h: &H) {
    let mut img = ImageBytes::v3();
    let unknown = (1 << 10) | (1 << 63);
    img.set_u64(field::AUTOCLEAR, unknown);
    let (_dir, path) = place(&img);
    let disk = must(h.open(&path, Mode::read_only()), "read-only open");
    must(disk.close(), "close");
    assert_eq!(
        autoclear(&path),
        unknown,
        "a read-only open changed the autoclear bits"
    );
    let disk = must(h.open(&path, Mode::writable()), "writable open");
    assert_eq!(
        autoclear(&path) & unknown,
        0,
        "unknown autoclear bits still set after a writable open"
    );
    must(disk.close(), "close");
    assert_eq!(
        autoclear(&path) & unknown,
        0,
        "unknown autoclear bits set again after close"
    );
    must(our_check_clean(h, &path), "check");
}

/// Every prefix of 0..=200 bytes of a valid image: shorter than its header, the open fails
/// with `Truncated`; longer, it opens or fails with a typed error, and never panics.
pub fn truncated<H: Harness>(h: &H) {
    for (version, header) in [(3u32, 104usize), (2, 72)] {
        let full = ImageBytes::valid(version, 16, 16 << 20);
        for n in 0..=200usize {
            let mut img = full.clone();
            img.bytes.truncate(n);
            let what = format!("v{version} image truncated to {n} bytes");
            for mode in [Mode::writable(), Mode::read_only()] {
                match open(h, &img, mode) {
                    Err(Error::Open(e)) if n < header => {
                        assert_eq!(
                            e,
                            OpenError::Format(FormatError::Truncated(n as u64)),
                            "{what} ({mode:?})"
                        )
                    }
                    Err(Error::Open(_)) => {}
                    Err(other) => panic!("{what} ({mode:?}): untyped error {other}"),
                    Ok(disk) => {
                        assert!(n >= header, "{what} ({mode:?}) opened");
                        let _ = disk.close();
                    }
                }
            }
        }
    }
}

/// A little xorshift generator (the cases must not depend on the clock).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn fill(&mut self, bytes: &mut [u8]) {
        bytes.iter_mut().for_each(|b| *b = self.next() as u8);
    }
}

/// Random garbage, random garbage behind a valid magic and version, and a valid header with
/// randomised fields and tables: every open ends with an image or a typed error, and every
/// request on an image that opened ends, too.
pub fn garbage<H: Harness>(h: &H) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for i in 0..1200u32 {
        let mut img = ImageBytes::v3();
        match i % 3 {
            0 => {
                let len = (rng.next() % (256 << 10)) as usize;
                img.bytes.resize(len, 0);
                rng.fill(&mut img.bytes);
            }
            1 => {
                rng.fill(&mut img.bytes[8..]);
                img.set_u32(field::VERSION, 2 + (i % 2));
            }
            _ => {
                // Keep the geometry sane; scramble some other header fields and the tables.
                for _ in 0..4 {
                    let at = [8, 16, 24, 36, 40, 48, 56, 60, 64, 72, 80, 88, 104]
                        [(rng.next() % 13) as usize];
                    let v = rng.next() >> (rng.next() % 64);
                    img.bytes[at..at + 4].copy_from_slice(&(v as u32).to_be_bytes());
                }
                let table = 65536 * (1 + (rng.next() % 3) as usize);
                let at = table + (rng.next() % 64) as usize * 8;
                let v = rng.next();
                img.bytes[at..at + 8].copy_from_slice(&v.to_be_bytes());
            }
        }
        let what = format!("garbage image {i}");
        for mode in [Mode::read_only(), Mode::writable()] {
            match open(h, &img, mode) {
                Err(Error::Open(_)) => {}
                Err(other) => panic!("{what} ({mode:?}): untyped error {other}"),
                Ok(mut disk) => {
                    let mut buf = vec![0u8; 65536];
                    let len = disk.len();
                    let r = disk.read_at(&mut buf, 0);
                    assert!(
                        !matches!(r, Err(Error::Other(_))),
                        "{what} ({mode:?}): read: untyped error {r:?}"
                    );
                    let r = disk.write_at(&buf[..4096], 4096.min(len.saturating_sub(4096)));
                    assert!(
                        !matches!(r, Err(Error::Other(_))),
                        "{what} ({mode:?}): write: untyped error {r:?}"
                    );
                    let r = disk.flush();
                    assert!(
                        !matches!(r, Err(Error::Other(_))),
                        "{what} ({mode:?}): flush: untyped error {r:?}"
                    );
                    let r = disk.check(None).map(drop);
                    assert!(
                        !matches!(r, Err(Error::Other(_))),
                        "{what} ({mode:?}): check: untyped error {r:?}"
                    );
                    let r = disk.close();
                    assert!(
                        !matches!(r, Err(Error::Other(_))),
                        "{what} ({mode:?}): close: untyped error {r:?}"
                    );
                }
            }
        }
    }
}

/// Whether a request's result is acceptable on a damaged image: success or a typed error.
fn typed<T: std::fmt::Debug>(what: &str, op: &str, r: Result<T, Error>) {
    assert!(
        !matches!(r, Err(Error::Other(_))),
        "{what}: {op}: untyped error {r:?}"
    );
}

/// A real image (data under several L2 tables, a snapshot sharing clusters) with random
/// bytes of its metadata area overwritten: opening, reading everything, writing, zeroing,
/// discarding, flushing, checking and closing give results or typed errors, never a
/// panic or a hang.
pub fn mutated_metadata<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("hostile::mutated_metadata") else {
        return;
    };
    let dir = scratch();
    let base = dir.path().join("base.qcow2");
    q.create(&base, "cluster_size=4096", 8 << 20);
    q.io(
        &base,
        &[
            "write -P 0x11 0 300k",
            "write -P 0x22 2M 64k",
            "write -z 3M 64k",
        ],
    );
    q.img(&["snapshot", "-c", "s1", &base.display().to_string()]);
    q.io(&base, &["write -P 0x33 4k 8k", "discard 2M 16k"]);
    let pristine = std::fs::read(&base).expect("read the image");
    // The metadata lives in the first clusters: header, reftable, refblock, L1, L2s.
    let meta_end = pristine.len().min(40 * 4096);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let path = dir.path().join("mutated.qcow2");
    let mut opened = 0;
    for i in 0..1000u32 {
        let mut bytes = pristine.clone();
        for _ in 0..1 + rng.next() % 8 {
            let at = (rng.next() % meta_end as u64) as usize & !7;
            let v = rng.next() >> (rng.next() % 64);
            bytes[at..at + 8].copy_from_slice(&v.to_be_bytes());
        }
        std::fs::write(&path, &bytes).expect("write the mutated image");
        let what = format!("mutated image {i}");
        for mode in [Mode::read_only(), Mode::writable()] {
            let mut disk = match h.open(&path, mode) {
                Err(Error::Open(_)) => continue,
                Err(other) => panic!("{what} ({mode:?}): untyped open error {other}"),
                Ok(d) => d,
            };
            opened += 1;
            let len = disk.len();
            let mut buf = vec![0u8; 256 << 10];
            let mut off = 0;
            while off < len {
                let n = (len - off).min(buf.len() as u64) as usize;
                typed(&what, "read", disk.read_at(&mut buf[..n], off));
                off += n as u64;
            }
            if mode == Mode::writable() {
                typed(&what, "write", disk.write_at(&buf[..12 << 10], 6 << 10));
                typed(&what, "write", disk.write_at(&buf[..4096], len / 2));
                typed(
                    &what,
                    "zeroes",
                    disk.write_zeroes(64 << 10, 64 << 10, false),
                );
                typed(&what, "discard", disk.discard(1 << 20, 128 << 10));
                typed(&what, "flush", disk.flush());
            }
            typed(&what, "check", disk.check(None));
            typed(&what, "close", disk.close());
        }
    }
    // Most damage is past the header: the requests above really ran on damaged tables.
    assert!(opened > 1000, "only {opened} of 2000 opens succeeded");
}
