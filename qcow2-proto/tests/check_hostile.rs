//! The checker on hostile and broken input, in memory: garbage, truncated headers, absurd
//! table sizes and offsets, I/O errors, a tight memory budget, and random mutations. It must
//! answer with an error or a report, never panic, hang or allocate without bound; and on
//! images it builds itself it must find exactly the damage done.

mod check_util;

use check_util::{check_vec, drive};
use qcow2_proto::check::Checker;
use qcow2_proto::create::initial_image;
use qcow2_proto::format::refcount;
use qcow2_proto::{CheckReport, CreateOptions, IoError, IoKind, OpenError, Repair, Segment};

/// Virtual size of the built images: small enough that one L2 table and the first
/// refblock cover everything.
fn size_for(cluster_size: u32) -> u64 {
    if cluster_size == 512 {
        1 << 20
    } else {
        64 << 20
    }
}

/// A valid image with `data` allocated guest clusters (one L2 table), as qemu-img lays it
/// out: returns the bytes and (L2 offset, first data offset).
fn build(cluster_size: u32, refcount_bits: u32, version: u32, data: u64) -> (Vec<u8>, u64, u64) {
    let mut opts = CreateOptions::new(size_for(cluster_size));
    opts.cluster_size = cluster_size;
    opts.refcount_bits = refcount_bits;
    opts.version = version;
    let init = initial_image(&opts).expect("layout");
    let mut img = vec![0u8; init.file_len as usize];
    for (off, bytes) in &init.writes {
        img[*off as usize..*off as usize + bytes.len()].copy_from_slice(bytes);
    }
    let cs = u64::from(cluster_size);
    let be =
        |b: &[u8], at: u64| u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().unwrap());
    let l1 = be(&img, 40);
    let reftable = be(&img, 48);
    let l2 = (img.len() as u64).next_multiple_of(cs);
    let first_data = l2 + cs;
    img.resize((first_data + data * cs) as usize, 0);
    img[l1 as usize..l1 as usize + 8].copy_from_slice(&(l2 | 1 << 63).to_be_bytes());
    for i in 0..data {
        let e = (first_data + i * cs) | 1 << 63;
        img[(l2 + i * 8) as usize..(l2 + i * 8 + 8) as usize].copy_from_slice(&e.to_be_bytes());
        img[(first_data + i * cs) as usize] = 0x5a;
    }
    let order = refcount_bits.trailing_zeros();
    let per_block = (cs * 8) >> order;
    for c in l2 / cs..first_data / cs + data {
        let rb = be(&img, reftable + c / per_block * 8) as usize;
        assert_ne!(rb, 0, "built image outgrew its refblocks");
        refcount::set(
            &mut img[rb..rb + cluster_size as usize],
            order,
            (c % per_block) as usize,
            1,
        );
    }
    (img, l2, first_data)
}

fn report(r: Result<CheckReport, OpenError>) -> CheckReport {
    r.unwrap_or_else(|e| panic!("expected a report, got {e}"))
}

fn set64(img: &mut [u8], at: u64, v: u64) {
    img[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
}

fn set32(img: &mut [u8], at: u64, v: u32) {
    img[at as usize..at as usize + 4].copy_from_slice(&v.to_be_bytes());
}

#[test]
fn built_images_are_clean_at_every_geometry() {
    for cs in [512u32, 4096, 65536, 2 << 20] {
        for bits in [1u32, 2, 4, 8, 16, 32, 64] {
            for version in [2, 3] {
                if version == 2 && bits != 16 {
                    continue;
                }
                let (mut img, ..) = build(cs, bits, version, 3);
                let r = report(check_vec(&mut img, None, None).0);
                let what = format!("cs={cs} bits={bits} v{version}: {r:#?}");
                assert_eq!(
                    (r.corruptions, r.leaks, r.check_errors),
                    (0, 0, 0),
                    "{what}"
                );
                assert_eq!(r.allocated_clusters, 3, "{what}");
                assert_eq!(
                    r.total_clusters,
                    size_for(cs).div_ceil(u64::from(cs)),
                    "{what}"
                );
                assert_eq!(r.image_end_offset, img.len() as u64, "{what}");
                assert_eq!(r.fragmented_clusters, 0, "{what}");
            }
        }
    }
}

#[test]
fn finds_exactly_the_damage_done() {
    let (img, l2, data) = build(4096, 16, 3, 4);
    // A leak: refcount 2 on data cluster 1 (and its COPIED flag now disagrees).
    let mut leak = img.clone();
    let rb = u64::from_be_bytes(leak[4096..4104].try_into().unwrap()) as usize;
    refcount::set(&mut leak[rb..rb + 4096], 4, (data / 4096 + 1) as usize, 2);
    let r = report(check_vec(&mut leak, None, None).0);
    assert_eq!((r.leaks, r.corruptions), (1, 1), "{r:#?}");
    // -r leaks fixes the leak; the flag then agrees again.
    let r = report(check_vec(&mut leak, Some(Repair::Leaks), None).0);
    assert_eq!(
        (r.leaks, r.corruptions, r.leaks_fixed, r.corruptions_fixed),
        (0, 0, 1, 0),
        "{r:#?}"
    );
    let r = report(check_vec(&mut leak, None, None).0);
    assert_eq!((r.leaks, r.corruptions), (0, 0), "{r:#?}");

    // Fragmentation: swap two data clusters in the L2 table.
    let mut frag = img.clone();
    set64(&mut frag, l2, (data + 4096) | 1 << 63);
    set64(&mut frag, l2 + 8, data | 1 << 63);
    let r = report(check_vec(&mut frag, None, None).0);
    assert_eq!(
        (r.corruptions, r.leaks, r.fragmented_clusters),
        (0, 0, 2),
        "{r:#?}"
    );

    // Refcount 0 under a used cluster: -r leaks cannot, -r all rebuilds.
    let mut zero = img.clone();
    refcount::set(&mut zero[rb..rb + 4096], 4, (data / 4096) as usize, 0);
    let r = report(check_vec(&mut zero.clone(), Some(Repair::Leaks), None).0);
    assert!(r.check_errors > 0, "{r:#?}");
    assert!(r
        .messages
        .iter()
        .any(|m| m == "ERROR need to rebuild refcount structures"));
    let before = zero.len();
    let r = report(check_vec(&mut zero, Some(Repair::All), None).0);
    assert_eq!(
        (r.corruptions, r.leaks, r.check_errors),
        (0, 0, 0),
        "{r:#?}"
    );
    assert!(
        r.corruptions_fixed >= 1
            && r.messages
                .iter()
                .any(|m| m == "Rebuilding refcount structure")
    );
    assert!(
        zero.len() > before,
        "the new structure goes at the end of the file"
    );
    // The data survived and the image is clean.
    assert_eq!(zero[data as usize], 0x5a);
    let r = report(check_vec(&mut zero, None, None).0);
    assert_eq!(
        (r.corruptions, r.leaks, r.allocated_clusters),
        (0, 0, 4),
        "{r:#?}"
    );
}

#[test]
fn repair_clears_dirty_and_corrupt_bits_only_when_nothing_is_left() {
    let (img, l2, _) = build(65536, 16, 3, 2);
    let mut marked = img.clone();
    set64(&mut marked, 72, 3); // dirty + corrupt
    let r = report(check_vec(&mut marked, Some(Repair::All), None).0);
    assert_eq!(r.corruptions, 0);
    assert_eq!(u64::from_be_bytes(marked[72..80].try_into().unwrap()), 0);
    // With a corruption left (a reference past the end of the file), the bits stay.
    let mut broken = img.clone();
    set64(&mut broken, 72, 2);
    set64(&mut broken, l2 + 16, (1 << 40) | 1 << 63);
    let r = report(check_vec(&mut broken, Some(Repair::All), None).0);
    assert!(r.corruptions > 0, "{r:#?}");
    assert_eq!(u64::from_be_bytes(broken[72..80].try_into().unwrap()), 2);
    // A plain check never writes.
    let mut plain = img.clone();
    set64(&mut plain, 72, 3);
    let copy = plain.clone();
    let (_, stats) = check_vec(&mut plain, None, None);
    assert_eq!((stats.writes, stats.flushes), (0, 0));
    assert_eq!(plain, copy);
}

#[test]
fn garbage_and_truncated_headers_are_errors() {
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut rand = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for len in [0usize, 1, 4, 71, 72, 100, 104, 512, 4096, 70000] {
        let mut g: Vec<u8> = (0..len).map(|_| rand() as u8).collect();
        assert!(
            check_vec(&mut g, None, None).0.is_err(),
            "garbage of {len} bytes"
        );
    }
    let (img, ..) = build(65536, 16, 3, 1);
    for cut in 0..120 {
        let mut t = img[..cut].to_vec();
        let r = check_vec(&mut t, None, None).0;
        if cut < 104 {
            assert!(r.is_err(), "header cut at {cut}");
        }
    }
    // The header alone, the tables gone: a report full of corruptions, no panic.
    let mut t = img[..4096].to_vec();
    let r = report(check_vec(&mut t, Some(Repair::All), None).0);
    assert!(r.corruptions > 0, "{r:#?}");
}

#[test]
fn absurd_sizes_are_refused_or_bounded() {
    let (img, l2, _) = build(65536, 16, 3, 1);
    // l1_size beyond QEMU's limit: refused at the header.
    let mut h = img.clone();
    set32(&mut h, 36, u32::MAX);
    assert!(check_vec(&mut h, None, None).0.is_err());
    // The largest L1 QEMU accepts, pointing past the end of the file: read in chunks of
    // zeroes, one corruption for the reference.
    let mut h = img.clone();
    set32(&mut h, 36, (32 << 20) / 8);
    set64(&mut h, 40, 1 << 40);
    let r = report(check_vec(&mut h, None, None).0);
    assert!(r.corruptions >= 1, "{r:#?}");
    // A huge reftable: refused at the header, or bounded when just within QEMU's limit.
    let mut h = img.clone();
    set32(&mut h, 56, u32::MAX);
    assert!(check_vec(&mut h, None, None).0.is_err());
    let mut h = img.clone();
    set32(&mut h, 56, (8 << 20) / 65536);
    set64(&mut h, 48, 1 << 40);
    let r = report(check_vec(&mut h.clone(), None, None).0);
    assert!(r.corruptions > 0, "{r:#?}");
    // -r all rebuilds the refcount structure where it belongs and leaves a clean image.
    let r = report(check_vec(&mut h, Some(Repair::All), None).0);
    assert_eq!(
        (r.corruptions, r.leaks, r.check_errors),
        (0, 0, 0),
        "{r:#?}"
    );
    assert!(r.corruptions_fixed > 0, "{r:#?}");
    let r = report(check_vec(&mut h, None, None).0);
    assert_eq!(
        (r.corruptions, r.leaks, r.allocated_clusters),
        (0, 0, 1),
        "{r:#?}"
    );
    // An L2 entry at 2^55 and a compressed entry with the largest sector count.
    let mut h = img.clone();
    set64(&mut h, l2 + 8, (1 << 55) | 1 << 63);
    set64(&mut h, l2 + 16, 1 << 62 | 0xff << 54 | 0x1000);
    let r = report(check_vec(&mut h, None, None).0);
    assert!(r.corruptions >= 2, "{r:#?}");
    assert!(r
        .messages
        .iter()
        .any(|m| m.contains("exceeding the end of the file")));
    // A refblock far past the end of the file under -r all: the file is not grown to it
    // (QEMU tries and, refused by the file system, rebuilds); the structure is rebuilt.
    let mut h = img.clone();
    set64(&mut h, 65536 + 8, 1 << 60);
    let len = h.len();
    let r = report(check_vec(&mut h, Some(Repair::All), None).0);
    assert!(
        r.messages
            .iter()
            .any(|m| m == "ERROR could not resize image: File too large"),
        "{r:#?}"
    );
    assert_eq!(
        (r.corruptions, r.leaks, r.corruptions_fixed),
        (0, 0, 1),
        "{r:#?}"
    );
    assert!(h.len() < len + (1 << 20));
    // Within the memory budget the file is grown to cover the refblock, as QEMU does.
    let mut h = img.clone();
    set64(
        &mut h,
        65536 + 8,
        (len as u64 + 3 * 65536).next_multiple_of(65536),
    );
    let r = report(check_vec(&mut h, Some(Repair::All), None).0);
    assert_eq!(
        (r.corruptions, r.leaks, r.check_errors),
        (0, 0, 0),
        "{r:#?}"
    );
    assert!(h.len() > len + 3 * 65536, "grown to hold the refblock");
    // Snapshots: 65536 entries of zeroes past the end of the file, then too much extra data.
    let mut h = img.clone();
    set32(&mut h, 60, 65536);
    set64(&mut h, 64, 1 << 30);
    let r = report(check_vec(&mut h, None, None).0);
    assert!(r.corruptions >= 1, "{r:#?}");
    let mut h = img.clone();
    let at = (h.len() as u64).next_multiple_of(65536);
    h.resize(at as usize + 65536, 0);
    set32(&mut h, at + 36, 5000);
    set32(&mut h, 60, 1);
    set64(&mut h, 64, at);
    let r = report(check_vec(&mut h, None, None).0);
    assert!(
        r.check_errors > 0
            && r.messages
                .iter()
                .any(|m| m.contains("Too much extra metadata")),
        "{r:#?}"
    );
}

#[test]
fn memory_budget_turns_into_check_errors() {
    let (mut img, ..) = build(512, 64, 3, 4);
    // A file claimed to be 2^50 bytes long with 512-byte clusters: over INT_MAX clusters.
    let (r, _) = drive(Checker::new(1 << 50, None), |op| {
        if let Some(Segment::Buf(b)) = op.segments.first_mut() {
            let out = b.as_mut_slice();
            let start = (op.offset as usize).min(img.len());
            let n = (img.len() - start).min(out.len());
            out[..n].copy_from_slice(&img[start..start + n]);
            out[n..].fill(0);
            return Ok(n);
        }
        Ok(0)
    });
    assert!(report(r).check_errors > 0);
    // A budget smaller than the image's refcount arrays (one 512-byte block each).
    let r = report(check_vec(&mut img, None, Some(1000)).0);
    assert!(r.check_errors > 0, "{r:#?}");
    assert!(r
        .messages
        .iter()
        .any(|m| m.contains("Cannot allocate memory")));
    let r = report(check_vec(&mut img, None, None).0);
    assert_eq!(r.check_errors, 0);
}

#[test]
fn io_errors_end_the_check_with_check_errors() {
    let (img, ..) = build(4096, 16, 3, 3);
    let total = {
        let mut i = img.clone();
        check_vec(&mut i, None, None).1.ops
    };
    assert!(total > 5);
    for fail_at in 0..total {
        for repair in [None, Some(Repair::All)] {
            let mut disk = img.clone();
            let mut n = 0;
            let (r, _) = drive(Checker::new(disk.len() as u64, repair), |op| {
                n += 1;
                if n - 1 == fail_at {
                    return Err(IoError {
                        kind: std::io::ErrorKind::Other,
                        raw_os_error: Some(5),
                    });
                }
                match (op.kind, op.segments.first_mut()) {
                    (IoKind::Read, Some(Segment::Buf(b))) => {
                        let out = b.as_mut_slice();
                        let start = (op.offset as usize).min(disk.len());
                        let k = (disk.len() - start).min(out.len());
                        out[..k].copy_from_slice(&disk[start..start + k]);
                        out[k..].fill(0);
                        Ok(k)
                    }
                    (IoKind::Write, Some(Segment::Buf(b))) => {
                        let end = op.offset as usize + b.len();
                        disk.resize(disk.len().max(end), 0);
                        disk[op.offset as usize..end].copy_from_slice(b.as_slice());
                        Ok(b.len())
                    }
                    _ => Ok(0),
                }
            });
            match r {
                Err(OpenError::Io(_)) => {
                    assert_eq!(fail_at, 0, "only the header read fails the open")
                }
                Err(e) => panic!("unexpected {e}"),
                Ok(r) => assert!(r.check_errors > 0, "op {fail_at} failed unnoticed: {r:#?}"),
            }
        }
    }
}

#[test]
fn messages_are_bounded() {
    // 512-byte clusters, 12000 leaked clusters: more lines than the cap.
    let (mut img, ..) = build(512, 16, 3, 1);
    let cs = 512usize;
    let rt = u64::from_be_bytes(img[48..56].try_into().unwrap()) as usize;
    let start = img.len() / cs;
    img.resize(img.len() + 12000 * cs, 0);
    let entries = 256usize;
    for c in start..start + 12000 {
        let rb_index = c / entries;
        let mut rb = u64::from_be_bytes(
            img[rt + rb_index * 8..rt + rb_index * 8 + 8]
                .try_into()
                .unwrap(),
        ) as usize;
        if rb == 0 {
            // Give the range a refblock at the end of the file (itself leaked too).
            rb = img.len();
            img.resize(rb + cs, 0);
            img[rt + rb_index * 8..rt + rb_index * 8 + 8]
                .copy_from_slice(&(rb as u64).to_be_bytes());
        }
        refcount::set(&mut img[rb..rb + cs], 4, c % entries, 1);
    }
    let r = report(check_vec(&mut img, None, None).0);
    assert!(r.leaks >= 12000, "{}", r.leaks);
    assert!(r.messages.len() <= 10_001, "{}", r.messages.len());
    assert!(r
        .messages
        .last()
        .is_some_and(|m| m.contains("more lines not shown")));
}

#[test]
fn random_mutations_never_panic() {
    let bases = [
        build(512, 16, 3, 6).0,
        build(4096, 1, 3, 5).0,
        build(65536, 16, 2, 3).0,
        build(4096, 16, 2, 8).0,
    ];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..300 {
        let base = &bases[round % bases.len()];
        let mut img = base.clone();
        // Mutate metadata: mostly the first clusters (header, reftable, refblock, L1, L2).
        let meta_end = img
            .len()
            .min(if round % 3 == 0 { img.len() } else { 6 * 4096 });
        for _ in 0..1 + rand() % 8 {
            let at = (rand() as usize) % meta_end;
            match rand() % 4 {
                0 => img[at] ^= 1 << (rand() % 8),
                1 => img[at] = rand() as u8,
                2 if at + 8 <= img.len() => img[at..at + 8].copy_from_slice(&rand().to_be_bytes()),
                _ => img[at] = 0,
            }
        }
        if rand() % 5 == 0 {
            let cut = (rand() as usize) % img.len();
            img.truncate(cut.max(1));
        }
        let repair = [None, Some(Repair::Leaks), Some(Repair::All)][(rand() % 3) as usize];
        let (r, _) = check_vec(&mut img, repair, Some(64 << 20));
        if let (Ok(r), Some(Repair::All)) = (&r, repair) {
            // After a successful full repair, a second check finds no more than the
            // first one left.
            let again = report(check_vec(&mut img, None, Some(64 << 20)).0);
            if r.check_errors == 0 {
                assert!(
                    again.corruptions <= r.corruptions,
                    "round {round}: {r:#?} then {again:#?}"
                );
            }
        }
    }
}
