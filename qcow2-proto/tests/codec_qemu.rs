//! The compressed-cluster codec against QEMU, both ways:
//!
//! * every cluster of a `qemu-img convert -c` image, zlib and zstd, at cluster sizes from
//!   512 bytes to 2 MiB, decompresses with [`decompress`] to the source file's bytes;
//! * clusters compressed with [`compress`], put in place of QEMU's streams (with entries
//!   from [`compressed_entry`]), read back through `qemu-img compare`, and the image still
//!   passes `qemu-img check`.
//!
//! Without qemu-img the tests print a notice and pass, except under CI (`CI` set), where
//! they fail.

use std::path::Path;
use std::process::Command;

use qcow2_proto::codec::{
    compress, compressed_entry, decompress, max_compressed_len, CompressionType,
};
use qcow2_proto::format::entry::{L1Entry, L2Entry, Mapping};

const CLUSTER_SIZES: [usize; 4] = [512, 4096, 65536, 2 << 20];

fn have_qemu_img() -> bool {
    match Command::new("qemu-img").arg("--version").output() {
        Ok(o) if o.status.success() => true,
        _ if std::env::var_os("CI").is_some() => panic!("qemu-img is required under CI"),
        _ => {
            eprintln!("NOTICE: qemu-img not found: skipping the QEMU codec interop test");
            false
        }
    }
}

/// Runs qemu-img; its exit status.
fn qemu_img(args: &[&str]) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

fn qemu_img_ok(args: &[&str]) {
    let (code, text) = qemu_img(args);
    assert_eq!(code, 0, "qemu-img {args:?}:\n{text}");
}

/// xorshift64*: deterministic incompressible bytes.
fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            (s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// Mixed content, 14 MiB and 3 sectors (so the last cluster is partial): random runs
/// (one long enough to cover whole 2 MiB clusters), zeros, repeating text, and text
/// sprinkled with random bytes, in runs that do not line up with clusters.
fn source() -> Vec<u8> {
    let mut v = Vec::new();
    let text = |len: usize, noisy: bool, seed: u64| {
        let line = b"The quick qcow2 image packs compressed clusters end to end.\n";
        let mut t: Vec<u8> = line.iter().copied().cycle().take(len).collect();
        if noisy {
            let r = random(len / 64 + 1, seed);
            for (i, b) in r.into_iter().enumerate() {
                if let Some(x) = t.get_mut(i * 64 + (i % 61)) {
                    *x = b;
                }
            }
        }
        t
    };
    v.extend(text(2_300_000, false, 0));
    v.extend(random(70_001, 1));
    v.extend(vec![0; 4_500_000]);
    v.extend(text(2_200_003, true, 2));
    v.extend(random(4_600_000, 3));
    v.extend(text(5_000, false, 0));
    v.extend(vec![0; 7_777]);
    let total = (14 << 20) + 3 * 512;
    if v.len() < total {
        let more = total - v.len();
        v.extend(text(more, true, 5));
    }
    v.truncate(total);
    v
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// One guest cluster of an image: its mapping and where its L2 entry is in the file.
struct Cluster {
    index: usize,
    mapping: Mapping,
    entry_at: Option<usize>,
}

/// The image's cluster_bits, compression type and guest clusters, parsed directly.
fn parse(img: &[u8]) -> (u32, CompressionType, Vec<Cluster>) {
    assert_eq!(&img[..4], b"QFI\xfb");
    assert_eq!(be32(img, 4), 3, "version");
    let cb = be32(img, 20);
    let size = be64(img, 24);
    let l1_size = be32(img, 36) as usize;
    let l1_off = be64(img, 40) as usize;
    let header_length = be32(img, 100);
    let ct = if header_length > 104 { img[104] } else { 0 };
    let kind = CompressionType::from_header(ct).expect("known compression type");
    let cs = 1usize << cb;
    let per_l2 = cs / 8;
    let n = size.div_ceil(cs as u64) as usize;
    let mut clusters = Vec::with_capacity(n);
    for index in 0..n {
        let l1i = index / per_l2;
        assert!(l1i < l1_size);
        let l2 = L1Entry(be64(img, l1_off + l1i * 8)).l2_offset() as usize;
        let (mapping, entry_at) = if l2 == 0 {
            (Mapping::Unallocated, None)
        } else {
            let at = l2 + (index % per_l2) * 8;
            (L2Entry(be64(img, at)).mapping(cb), Some(at))
        };
        clusters.push(Cluster {
            index,
            mapping,
            entry_at,
        });
    }
    (cb, kind, clusters)
}

/// The source's bytes of guest cluster `index`, zero-padded to a whole cluster.
fn expected(src: &[u8], index: usize, cs: usize) -> Vec<u8> {
    let start = (index * cs).min(src.len());
    let mut v = src[start..(start + cs).min(src.len())].to_vec();
    v.resize(cs, 0);
    v
}

fn convert(dir: &Path, raw: &str, cs: usize, kind: CompressionType) -> String {
    let img = dir.join(format!("c{cs}-{kind}.qcow2"));
    let img = img.to_str().unwrap().to_owned();
    let opts = format!("cluster_size={cs},compression_type={kind}");
    qemu_img_ok(&[
        "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", &opts, raw, &img,
    ]);
    img
}

fn setup() -> Option<(tempfile::TempDir, Vec<u8>, String)> {
    if !have_qemu_img() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = source();
    let raw = dir.path().join("src.raw");
    std::fs::write(&raw, &src).unwrap();
    let raw = raw.to_str().unwrap().to_owned();
    Some((dir, src, raw))
}

#[test]
fn qemu_compressed_clusters_decompress_to_the_source() {
    let Some((dir, src, raw)) = setup() else {
        return;
    };
    for kind in [CompressionType::Zlib, CompressionType::Zstd] {
        for cs in CLUSTER_SIZES {
            let img = std::fs::read(convert(dir.path(), &raw, cs, kind)).unwrap();
            let (cb, got_kind, clusters) = parse(&img);
            assert_eq!((1usize << cb, got_kind), (cs, kind));
            let (mut compressed, mut data, mut zero) = (0, 0, 0);
            let mut out = vec![0; cs];
            for c in &clusters {
                let want = expected(&src, c.index, cs);
                match c.mapping {
                    Mapping::Unallocated | Mapping::Zero { .. } => {
                        zero += 1;
                        assert!(
                            want.iter().all(|&b| b == 0),
                            "{kind} {cs}: cluster {}",
                            c.index
                        );
                    }
                    Mapping::Data { host, .. } => {
                        data += 1;
                        let host = host as usize;
                        assert!(
                            img[host..host + cs] == want[..],
                            "{kind} {cs}: data {}",
                            c.index
                        );
                    }
                    Mapping::Compressed { host, len } => {
                        compressed += 1;
                        let (host, len) = (host as usize, len as usize);
                        assert!(host + len <= img.len(), "{kind} {cs}: stream past EOF");
                        out.fill(0xaa);
                        decompress(kind, &img[host..host + len], &mut out).unwrap_or_else(|e| {
                            panic!("{kind} {cs}: cluster {} at {host:#x}: {e}", c.index)
                        });
                        assert!(out == want, "{kind} {cs}: cluster {} differs", c.index);
                    }
                }
            }
            eprintln!("{kind} {cs}: {compressed} compressed, {data} data, {zero} zero clusters");
            assert!(compressed > 0 && data > 0 && zero > 0, "{kind} {cs}: mix");
        }
    }
}

#[test]
fn qemu_reads_clusters_we_compress() {
    let Some((dir, src, raw)) = setup() else {
        return;
    };
    for kind in [CompressionType::Zlib, CompressionType::Zstd] {
        for cs in CLUSTER_SIZES {
            let path = convert(dir.path(), &raw, cs, kind);
            let mut img = std::fs::read(&path).unwrap();
            let (cb, _, clusters) = parse(&img);
            let mut streams: Vec<(usize, usize, &Cluster)> = clusters
                .iter()
                .filter_map(|c| match c.mapping {
                    Mapping::Compressed { host, len } => Some((host as usize, len as usize, c)),
                    _ => None,
                })
                .collect();
            streams.sort_by_key(|s| s.0);
            let (mut replaced, mut entries, mut too_long) = (0, 0, 0);
            let mut buf = vec![0; max_compressed_len(cb)];
            for (i, &(host, len, c)) in streams.iter().enumerate() {
                // QEMU's stream ends somewhere in its last sector, where the next one may
                // start: ours may use the bytes up to whichever comes first.
                let room = match streams.get(i + 1) {
                    Some(&(next, ..)) => (host + len).min(next) - host,
                    None => len,
                };
                let want = expected(&src, c.index, cs);
                let Some(n) = compress(kind, &want, &mut buf).unwrap() else {
                    too_long += 1;
                    continue;
                };
                if n > room {
                    too_long += 1;
                    continue;
                }
                // Ours, then QEMU's leftover bytes up to the end of the sector.
                img[host..host + n].copy_from_slice(&buf[..n]);
                replaced += 1;
                // Describe exactly our stream, when that keeps the host clusters it
                // touches (their refcounts count compressed clusters).
                let entry = compressed_entry(host as u64, n as u64, cb).unwrap();
                let Mapping::Compressed { host: h, len: l } = L2Entry(entry).mapping(cb) else {
                    panic!("not a compressed entry");
                };
                assert_eq!(h as usize, host);
                assert!(l as usize >= n && l as usize <= len);
                if (host + l as usize - 1) >> cb == (host + len - 1) >> cb {
                    let at = c.entry_at.unwrap();
                    img[at..at + 8].copy_from_slice(&entry.to_be_bytes());
                    entries += 1;
                }
            }
            eprintln!(
                "{kind} {cs}: {} compressed clusters: {replaced} replaced by ours ({entries} \
                 with our entry), {too_long} where ours is longer",
                streams.len()
            );
            assert!(replaced > 0 && entries > 0, "{kind} {cs}: none replaced");
            std::fs::write(&path, &img).unwrap();
            qemu_img_ok(&["compare", "-f", "raw", "-F", "qcow2", &raw, &path]);
            qemu_img_ok(&["check", &path]);
        }
    }
}
