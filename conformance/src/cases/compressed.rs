//! Compressed clusters (zlib and zstd) in images `qemu-img convert -c` makes: read byte for
//! byte at every cluster size; written over (copy-on-write from the decompressed cluster,
//! zeroes, discards) as qemu-io writes a twin; a damaged stream is a typed corruption.

use std::path::Path;

use qcow2_proto::{Allocation, CorruptReason, RequestError};

use super::must;
use crate::harness::{Disk, Error, Harness, Mode};
use crate::model::{pattern, Model};
use crate::qemu::Qemu;
use crate::verify::{our_check_clean, scratch};

/// A source that compresses in places and not in others: pattern data (incompressible),
/// repeated text, zeros, and a partial last cluster.
fn source(size: u64) -> Model {
    let mut m = Model::new(size);
    m.write(0, &pattern(3, 0, 200_000));
    let text: Vec<u8> = b"qcow2 compressed cluster test line\n"
        .iter()
        .copied()
        .cycle()
        .take(700_000)
        .collect();
    m.write(300_000, &text);
    m.write(size - 70_000, &pattern(4, size - 70_000, 69_999));
    m
}

/// `qemu-img convert -c` of `raw` into `path`.
pub(crate) fn convert_c(q: &Qemu, raw: &Path, path: &Path, options: &str) {
    q.img(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        options,
        &raw.display().to_string(),
        &path.display().to_string(),
    ]);
}

const LAYOUTS: [&str; 7] = [
    "cluster_size=65536,compression_type=zlib",
    "cluster_size=65536,compression_type=zstd",
    "cluster_size=512,compression_type=zlib",
    "cluster_size=4096,compression_type=zstd",
    "cluster_size=2097152,compression_type=zlib",
    "cluster_size=16384,compat=0.10",
    "cluster_size=4096,compression_type=zlib",
];

/// Every layout reads as its source, whole and in unaligned pieces, and block status
/// calls the compressed clusters so.
pub fn reads_qemu_compressed<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("compressed::reads_qemu_compressed") else {
        return;
    };
    let size = 3 << 20;
    let model = source(size);
    for layout in LAYOUTS {
        let dir = scratch();
        let raw = dir.path().join("src.raw");
        model.write_raw(&raw).expect("raw source");
        let path = dir.path().join("c.qcow2");
        convert_c(&q, &raw, &path, layout);
        let mut disk = must(h.open(&path, Mode::read_only()), layout);
        let mut want = vec![0u8; size as usize];
        model.read(0, &mut want);
        super::assert_reads_as(&mut disk, &want, layout);
        let s = must(disk.block_status(300_000, 4096), "block status");
        assert_eq!(s.allocation, Allocation::Compressed, "{layout}: {s:?}");
        must(disk.close(), "close");
    }
}

/// Writes over compressed clusters (partial: the rest of the cluster comes from its
/// decompressed contents), zeroes and discards, on one copy through us and on a twin with
/// qemu-io: the same guest contents, and both checks clean (no leaked or doubly freed
/// compressed space).
pub fn writes_over_compressed<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("compressed::writes_over_compressed") else {
        return;
    };
    let size = 3 << 20;
    let model = source(size);
    for layout in [LAYOUTS[0], LAYOUTS[1], LAYOUTS[3], LAYOUTS[5]] {
        let dir = scratch();
        let raw = dir.path().join("src.raw");
        model.write_raw(&raw).expect("raw source");
        let ours = dir.path().join("ours.qcow2");
        let twin = dir.path().join("twin.qcow2");
        convert_c(&q, &raw, &ours, layout);
        convert_c(&q, &raw, &twin, layout);
        let v3 = !layout.contains("compat=0.10");
        let mut cmds = vec![
            "write -P 0x61 301000 100",
            "write -P 0x62 400000 70000",
            "write -P 0x63 655360 65536",
            "write -z 800001 3000",
            "write -z 1048576 131072",
        ];
        if v3 {
            cmds.push("discard 1310720 262144");
        }
        let mut disk = must(h.open(&ours, Mode::writable()), layout);
        for c in &cmds {
            let w: Vec<&str> = c.split(' ').collect();
            let (off, len) = (
                w[w.len() - 2].parse::<u64>().unwrap(),
                w[w.len() - 1].parse::<u64>().unwrap(),
            );
            match w[1] {
                "-P" => {
                    let byte = u8::from_str_radix(&w[2][2..], 16).unwrap();
                    must(disk.write_at(&vec![byte; len as usize], off), c);
                }
                "-z" => must(disk.write_zeroes(off, len, false), c),
                _ => must(disk.discard(off, len), c),
            }
        }
        must(disk.close(), "close");
        let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
        q.io(&twin, &cmds);
        assert_eq!(
            q.compare_status(&ours, &twin),
            0,
            "{layout}: differs from qemu-io's twin"
        );
        q.assert_clean(&ours, layout);
        must(our_check_clean(h, &ours), layout);
    }
}

/// A compressed stream overwritten with garbage: reading that cluster fails with a typed
/// corruption, other clusters still read.
pub fn damaged_stream_is_corruption<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("compressed::damaged_stream_is_corruption") else {
        return;
    };
    let size = 1 << 20;
    let mut model = Model::new(size);
    let text: Vec<u8> = b"0123456789abcdef"
        .iter()
        .copied()
        .cycle()
        .take(size as usize)
        .collect();
    model.write(0, &text);
    let dir = scratch();
    let raw = dir.path().join("src.raw");
    model.write_raw(&raw).expect("raw source");
    let path = dir.path().join("c.qcow2");
    convert_c(&q, &raw, &path, "cluster_size=65536");
    // Find cluster 3's stream through block status? qemu-img map --output=json has no
    // offsets for compressed clusters: read the L2 entry instead.
    let bytes = std::fs::read(&path).unwrap();
    let be = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
    let l1 = be(40) as usize;
    let l2 = (be(l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = be(l2 + 3 * 8);
    assert!(
        entry & (1 << 62) != 0,
        "cluster 3 is not compressed: {entry:#x}"
    );
    let host = (entry & ((1 << 54) - 1)) as usize; // x = 62 - (16 - 8) = 54 offset bits
    let mut damaged = bytes.clone();
    for b in &mut damaged[host..host + 40] {
        *b ^= 0x5a;
    }
    std::fs::write(&path, &damaged).unwrap();
    let mut disk = must(h.open(&path, Mode::read_only()), "open");
    let mut buf = vec![0u8; 4096];
    match disk.read_at(&mut buf, 3 * 65536 + 4096) {
        Err(Error::Request(RequestError::Corrupt(c))) => {
            assert_eq!(c.reason, CorruptReason::BadCompressedData, "{c}")
        }
        other => panic!("reading a damaged compressed cluster: {other:?}"),
    }
    must(
        disk.read_at(&mut buf, 65536),
        "an intact compressed cluster",
    );
    assert!(buf[..] == text[65536..65536 + 4096]);
}

/// Compressed writes through us (`convert -c`'s path) into images qemu-img made: streams
/// packed several to a cluster, incompressible clusters written as they are, the partial
/// last cluster; qemu-img reads them as the source, checks clean, maps them compressed;
/// rewriting and discarding some of them leaves no leak; writes that are not one whole
/// unallocated cluster are typed errors.
pub fn we_write_compressed<H: Harness>(h: &H) {
    crate::require!(h, real_files);
    let Some(q) = Qemu::require("compressed::we_write_compressed") else {
        return;
    };
    let size: u64 = (3 << 20) + 5120;
    let model = source(size);
    for layout in [
        "cluster_size=65536,compression_type=zlib",
        "cluster_size=4096,compression_type=zstd",
        "cluster_size=16384,compat=0.10",
        "cluster_size=512",
        "cluster_size=2097152,compression_type=zstd",
    ] {
        let dir = scratch();
        let raw = dir.path().join("src.raw");
        model.write_raw(&raw).expect("raw source");
        let path = dir.path().join("c.qcow2");
        q.create(&path, layout, size);
        let mut disk = must(h.open(&path, Mode::writable()), layout);
        let cs = disk.info().cluster_size;
        let mut at = 0;
        while at < size {
            let n = cs.min(size - at);
            let mut buf = vec![0u8; n as usize];
            model.read(at, &mut buf);
            if buf.iter().any(|&b| b != 0) {
                must(
                    disk.write_compressed(&buf, at),
                    format!("{layout}: cluster {at:#x}"),
                );
            }
            at += n;
        }
        // Not one whole cluster, or an allocated one: refused.
        for (off, len) in [(cs / 2, cs / 2), (0, cs)] {
            let buf = vec![1u8; len as usize];
            match disk.write_compressed(&buf, off) {
                Err(Error::Request(RequestError::CompressedWrite(_))) => {}
                other => panic!("{layout}: compressed write at {off:#x}+{len:#x}: {other:?}"),
            }
        }
        must(disk.close(), "close");
        q.assert_clean(&path, layout);
        if let Err(e) = q.same_as_raw(&path, &raw) {
            panic!("{layout}: qemu-img reads our compressed image differently: {e}");
        }
        let map = q.img(&["map", "--output=json", &path.display().to_string()]);
        assert!(
            map.contains("\"compressed\": true"),
            "{layout}: nothing compressed:\n{map}"
        );
        // Rewrite and discard some compressed clusters: the shared clusters' refcounts
        // must come down exactly.
        let mut disk = must(h.open(&path, Mode::writable()), layout);
        must(disk.write_at(&[0x77; 3000], 310_000), "rewrite");
        if !layout.contains("compat=0.10") {
            must(disk.discard(400_000, 300_000), "discard");
        }
        must(disk.close(), "close");
        q.assert_clean(&path, &format!("{layout} after rewrites"));
        must(our_check_clean(h, &path), layout);
    }
}
