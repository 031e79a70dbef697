//! The compressed-cluster codec: pure functions, the way QEMU (de)compresses clusters.
//!
//! ```text
//! compression_type (header byte 104)   stream of one compressed cluster
//!   0 zlib                              raw deflate (no zlib header), windowBits -12
//!                                       (4 KiB window), level 6, memLevel 9
//!   1 zstd                              zstd frame(s), default level (3)
//!
//! Compressed cluster descriptor, x = 62 - (cluster_bits - 8)
//!   bits  0..x   host byte offset (not aligned; bits above 55 always 0)
//!   bits  x..62  512-byte sectors that [offset, offset + len) touches, minus one
//!   bit   62     compressed (bit 63, COPIED, is never set)
//! ```
//!
//! A compressed cluster's stream is stored byte-packed; its descriptor only records the
//! 512-byte sectors it touches, so the reader gets up to 511 bytes past the end of the
//! stream (often the start of the next one). Decompression therefore stops as soon as a
//! whole cluster is out and never looks at what follows. A cluster is only stored
//! compressed when its stream is shorter than the cluster ([`max_compressed_len`]);
//! otherwise QEMU writes it as a normal cluster.
//!
//! References, in QEMU: `block/qcow2-threads.c` (`qcow2_zlib_compress`,
//! `qcow2_zlib_decompress`, `qcow2_zstd_compress`, `qcow2_zstd_decompress`),
//! `block/qcow2.c` (`qcow2_co_pwritev_compressed_task`: output buffer of
//! `cluster_size - 1` bytes), `block/qcow2-cluster.c`
//! (`qcow2_alloc_compressed_cluster_offset`, `qcow2_parse_compressed_l2_entry`).
//!
//! Every call sets up a fresh (de)compression context, as QEMU does.

use zlib_rs::{DeflateConfig, DeflateFlush, InflateFlush, Method, Status, Strategy};
use zstd::zstd_safe::{self, zstd_sys, CCtx, DCtx, InBuffer, OutBuffer};

use crate::format::entry::COMPRESSED;
use crate::format::{MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};

/// The deflate window QEMU uses: 2^12 = 4 KiB (inflate is set up the same way).
const ZLIB_WINDOW_BITS: u8 = 12;
/// Compressed descriptors count 512-byte sectors.
const SECTOR: u64 = 512;

/// How compressed clusters are encoded: the header's `compression_type` byte.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
#[non_exhaustive]
pub enum CompressionType {
    /// 0: raw deflate with a 4 KiB window (the only type of v2 images and the default).
    Zlib,
    /// 1: zstd (needs incompatible feature bit 3).
    Zstd,
}

impl CompressionType {
    /// The type for the header's `compression_type` byte (0 zlib, 1 zstd), `None` when
    /// unknown.
    pub fn from_header(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Self::Zlib),
            1 => Some(Self::Zstd),
            _ => None,
        }
    }

    /// The header's `compression_type` byte for this type.
    pub fn header_value(self) -> u8 {
        match self {
            Self::Zlib => 0,
            Self::Zstd => 1,
        }
    }
}

impl std::fmt::Display for CompressionType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Zlib => "zlib",
            Self::Zstd => "zstd",
        })
    }
}

/// A compressed cluster cannot be decoded, or data cannot be encoded.
///
/// QEMU reports every decoding failure as an I/O error (`-EIO`) of the read.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The stream ended, or its bytes ran out, before it produced the whole cluster.
    #[error(
        "{kind} compressed cluster is truncated: it decompresses to {produced} of {expected} bytes"
    )]
    Truncated {
        /// The compression type.
        kind: CompressionType,
        /// Bytes produced before the stream ended.
        produced: usize,
        /// The cluster size.
        expected: usize,
    },
    /// A zstd frame goes on past the end of the cluster. (A longer zlib stream is cut at
    /// the cluster's end without error, as QEMU does.)
    #[error("zstd compressed cluster decompresses to more than {expected} bytes")]
    Overlong {
        /// The cluster size.
        expected: usize,
    },
    /// The stream is not valid compressed data.
    #[error("invalid {kind} compressed data: {reason}")]
    Corrupt {
        /// The compression type.
        kind: CompressionType,
        /// The decoder's message, e.g. "invalid distance too far back".
        reason: &'static str,
    },
    /// No memory for a zstd context.
    #[error("cannot allocate a zstd context")]
    NoMemory,
    /// The compressor failed (not for lack of room: that is `Ok(None)`).
    #[error("{kind} compression failed: {reason}")]
    Compress {
        /// The compression type.
        kind: CompressionType,
        /// The compressor's message.
        reason: &'static str,
    },
}

/// The longest stream QEMU stores compressed for clusters of `1 << cluster_bits` bytes:
/// one byte less than the cluster. Pass `out` of this length to [`compress`] to decide
/// like QEMU whether a cluster is stored compressed.
pub const fn max_compressed_len(cluster_bits: u32) -> usize {
    (1 << cluster_bits) - 1
}

/// Decompresses one cluster: fills `out` (the cluster) from the start of `input`.
///
/// `input` is what the descriptor covers, so bytes after the end of the stream are
/// normal and never read once `out` is full. As in QEMU:
///
/// * zlib: one inflate with `Z_FINISH` and windowBits -12 must fill `out`; a stream that
///   ends, or input that runs out, before that is [`CodecError::Truncated`]; a stream
///   that goes on past `out` is cut there (QEMU accepts its `Z_BUF_ERROR`).
/// * zstd: streaming decompression, across as many frames as it takes, until `out` is
///   full; a frame still unfinished then is [`CodecError::Overlong`]; a call that makes
///   no progress (input exhausted) is [`CodecError::Truncated`].
///
/// ```
/// use qcow2_proto::codec::{compress, decompress, max_compressed_len, CompressionType};
///
/// let cluster: Vec<u8> = b"qcow2 ".iter().copied().cycle().take(65536).collect();
/// for kind in [CompressionType::Zlib, CompressionType::Zstd] {
///     let mut stream = vec![0; max_compressed_len(16)];
///     let len = compress(kind, &cluster, &mut stream)?.expect("text compresses");
///     // On disk the stream is padded to whole sectors (or followed by the next one).
///     let sectors = len.div_ceil(512) * 512;
///     let mut back = vec![0; cluster.len()];
///     decompress(kind, &stream[..sectors], &mut back)?;
///     assert_eq!(back, cluster);
/// }
/// # Ok::<(), qcow2_proto::codec::CodecError>(())
/// ```
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
    match kind {
        CompressionType::Zlib => inflate(input, out),
        CompressionType::Zstd => zstd_decompress(input, out),
    }
}

/// Compresses `input` (one cluster) into `out`: the stream's length, or `None` when it
/// does not fit in `out`.
///
/// QEMU compresses into `cluster_size - 1` bytes ([`max_compressed_len`]) and writes the
/// cluster uncompressed when that fails. zlib: level 6 (`Z_DEFAULT_COMPRESSION`),
/// windowBits -12, memLevel 9, default strategy, one deflate with `Z_FINISH`. zstd:
/// default parameters (level 3), one `ZSTD_compressStream2` with `ZSTD_e_end`, which
/// records the content size in the frame. See [`decompress`] for an example.
pub fn compress(
    kind: CompressionType,
    input: &[u8],
    out: &mut [u8],
) -> Result<Option<usize>, CodecError> {
    match kind {
        CompressionType::Zlib => deflate(input, out),
        CompressionType::Zstd => zstd_compress(input, out),
    }
}

/// The L2 entry of a compressed cluster whose stream of `len` bytes is at host byte
/// offset `host`, in an image with `cluster_bits`; `None` when QEMU would not write it:
/// `cluster_bits` outside 9..=21, `len` 0 or not below the cluster size (such a cluster
/// is stored uncompressed), or `host` beyond the offset field (bits above 55 must be 0,
/// and fewer bits exist for clusters over 16 KiB).
///
/// The sector count is QEMU's `(host + len - 1) / 512 - host / 512`: the sectors after
/// the one holding `host` that the stream touches. It always fits its `cluster_bits - 8`
/// bits for such a `len`. [`L2Entry::mapping`](crate::format::entry::L2Entry::mapping)
/// decodes the entry to `host` and the length of those sectors from `host` on, at most
/// 511 bytes more than `len`.
pub fn compressed_entry(host: u64, len: u64, cluster_bits: u32) -> Option<u64> {
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits)
        || len == 0
        || len > max_compressed_len(cluster_bits) as u64
    {
        return None;
    }
    let x = 62 - (cluster_bits - 8);
    if host >= 1 << x.min(56) {
        return None;
    }
    let sectors = (host + len - 1) / SECTOR - host / SECTOR;
    debug_assert!(sectors < 1 << (cluster_bits - 8), "len < cluster size fits");
    Some(COMPRESSED | sectors << x | host)
}

fn corrupt(kind: CompressionType, reason: &'static str) -> CodecError {
    CodecError::Corrupt { kind, reason }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
    let kind = CompressionType::Zlib;
    let mut z = zlib_rs::Inflate::new(false, ZLIB_WINDOW_BITS);
    let status = z.decompress(input, out, InflateFlush::Finish);
    let produced = z.total_out() as usize;
    match status {
        Ok(Status::StreamEnd | Status::BufError) if produced == out.len() => Ok(()),
        Ok(_) => Err(CodecError::Truncated {
            kind,
            produced,
            expected: out.len(),
        }),
        Err(e) => Err(corrupt(kind, z.error_message().unwrap_or(e.as_str()))),
    }
}

fn deflate(input: &[u8], out: &mut [u8]) -> Result<Option<usize>, CodecError> {
    let mut z = zlib_rs::Deflate::new_with_config(DeflateConfig {
        level: 6,
        method: Method::Deflated,
        window_bits: -i32::from(ZLIB_WINDOW_BITS),
        mem_level: 9,
        strategy: Strategy::Default,
    });
    match z.compress(input, out, DeflateFlush::Finish) {
        Ok(Status::StreamEnd) => Ok(Some(z.total_out() as usize)),
        // Out of room (QEMU: Z_OK, -ENOMEM, written uncompressed).
        Ok(Status::Ok | Status::BufError) => Ok(None),
        Err(e) => Err(CodecError::Compress {
            kind: CompressionType::Zlib,
            reason: z.error_message().unwrap_or(e.as_str()),
        }),
    }
}

fn zstd_decompress(input: &[u8], out: &mut [u8]) -> Result<(), CodecError> {
    let kind = CompressionType::Zstd;
    let expected = out.len();
    let mut dctx = DCtx::try_create().ok_or(CodecError::NoMemory)?;
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    let mut left = 0;
    while outb.pos() < expected {
        let (in_before, out_before) = (inb.pos(), outb.pos());
        left = dctx
            .decompress_stream(&mut outb, &mut inb)
            .map_err(|code| corrupt(kind, zstd_safe::get_error_name(code)))?;
        if inb.pos() == in_before && outb.pos() == out_before {
            return Err(CodecError::Truncated {
                kind,
                produced: out_before,
                expected,
            });
        }
    }
    if left > 0 {
        return Err(CodecError::Overlong { expected });
    }
    Ok(())
}

fn zstd_compress(input: &[u8], out: &mut [u8]) -> Result<Option<usize>, CodecError> {
    let kind = CompressionType::Zstd;
    let fail = |reason| CodecError::Compress { kind, reason };
    let mut cctx = CCtx::try_create().ok_or(CodecError::NoMemory)?;
    let room = out.len();
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    match cctx.compress_stream2(&mut outb, &mut inb, zstd_sys::ZSTD_EndDirective::ZSTD_e_end) {
        Ok(0) => Ok(Some(outb.pos())),
        // More to flush than room left (QEMU: -ENOMEM, written uncompressed).
        Ok(more) if more > room - outb.pos() => Ok(None),
        Ok(_) => Err(fail("the frame did not end")),
        Err(code)
            if zstd_safe::is_error_kind(
                code,
                zstd_sys::ZSTD_ErrorCode::ZSTD_error_dstSize_tooSmall,
            ) =>
        {
            Ok(None)
        }
        Err(code) => Err(fail(zstd_safe::get_error_name(code))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::entry::{L2Entry, Mapping, COPIED};

    const KINDS: [CompressionType; 2] = [CompressionType::Zlib, CompressionType::Zstd];
    const CLUSTER_BITS: [u32; 4] = [9, 12, 16, 21];

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

    fn text(len: usize) -> Vec<u8> {
        let words = [
            "qcow2 ",
            "cluster ",
            "refcount ",
            "L2 table ",
            "zstd ",
            "deflate\n",
        ];
        let mut v = Vec::with_capacity(len + 16);
        let mut i = 0usize;
        while v.len() < len {
            v.extend_from_slice(words[(i * 7 + i / 3) % words.len()].as_bytes());
            v.extend_from_slice(format!("{i} ").as_bytes());
            i += 1;
        }
        v.truncate(len);
        v
    }

    /// Compresses `data` into QEMU's buffer of a cluster minus one byte.
    fn compressed(kind: CompressionType, data: &[u8]) -> Option<Vec<u8>> {
        let mut buf = vec![0; data.len() - 1];
        let n = compress(kind, data, &mut buf).unwrap()?;
        buf.truncate(n);
        Some(buf)
    }

    /// Sector padding as found on disk: the stream, then garbage up to the next sector.
    fn padded(stream: &[u8]) -> Vec<u8> {
        let mut v = stream.to_vec();
        let pad = v.len().div_ceil(512) * 512 - v.len();
        v.extend(random(pad, 99));
        v
    }

    #[test]
    fn from_header_knows_zlib_and_zstd() {
        assert_eq!(CompressionType::from_header(0), Some(CompressionType::Zlib));
        assert_eq!(CompressionType::from_header(1), Some(CompressionType::Zstd));
        assert_eq!(CompressionType::from_header(2), None);
        assert_eq!(CompressionType::from_header(255), None);
        for kind in KINDS {
            assert_eq!(
                CompressionType::from_header(kind.header_value()),
                Some(kind)
            );
        }
    }

    #[test]
    fn round_trips_at_every_cluster_size() {
        for kind in KINDS {
            for cb in CLUSTER_BITS {
                let cs = 1usize << cb;
                for (name, data) in [("zeros", vec![0; cs]), ("text", text(cs))] {
                    let stream = compressed(kind, &data)
                        .unwrap_or_else(|| panic!("{kind} {name} {cs}: did not compress"));
                    assert!(stream.len() < cs, "{kind} {name} {cs}");
                    let mut back = vec![0xaa; cs];
                    decompress(kind, &padded(&stream), &mut back).unwrap();
                    assert!(back == data, "{kind} {name} {cs}: round trip differs");
                    // The exact stream, without padding, decodes too.
                    decompress(kind, &stream, &mut back).unwrap();
                    assert!(back == data, "{kind} {name} {cs}: round trip differs");
                }
                // Half random, half zeros: compresses, only just.
                let mut mixed = random(cs / 2, cb.into());
                mixed.resize(cs, 0);
                let stream = compressed(kind, &mixed).expect("half zeros compress");
                let mut back = vec![0; cs];
                decompress(kind, &padded(&stream), &mut back).unwrap();
                assert!(back == mixed, "{kind} mixed {cs}: round trip differs");
            }
        }
    }

    #[test]
    fn incompressible_data_does_not_fit() {
        for kind in KINDS {
            for cb in CLUSTER_BITS {
                let cs = 1usize << cb;
                let data = random(cs, cb.into());
                assert_eq!(compressed(kind, &data), None, "{kind} {cs}");
                // With room to spare it is stored (bigger than the input), and decodes.
                // (deflate with a 4 KiB window can rarely store blocks raw: the data left
                // the window before the block ends, so Huffman-coded random data grows.)
                let mut big = vec![0; cs + cs / 16 + 1024];
                let n = compress(kind, &data, &mut big).unwrap().expect("fits");
                assert!(n > max_compressed_len(cb));
                let mut back = vec![0; cs];
                decompress(kind, &big[..n], &mut back).unwrap();
                assert!(back == data);
            }
            // No room at all.
            assert_eq!(compress(kind, &text(4096), &mut []).unwrap(), None);
        }
    }

    /// A tiny independent inflater, after zlib's contrib/puff: the output of a raw deflate
    /// stream and the longest back-reference distance in it (zlib-rs always keeps a 32 KiB
    /// window, and C zlib checks the window only across calls, so neither can tell).
    fn puff(input: &[u8]) -> Result<(Vec<u8>, usize), &'static str> {
        const LBASE: [u16; 29] = [
            3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99,
            115, 131, 163, 195, 227, 258,
        ];
        const LEXT: [u8; 29] = [
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
        ];
        const DBASE: [u16; 30] = [
            1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025,
            1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
        ];
        const DEXT: [u8; 30] = [
            0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12,
            12, 13, 13,
        ];
        const ORDER: [usize; 19] = [
            16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
        ];
        struct Bits<'a>(&'a [u8], usize, u64, u32);
        impl Bits<'_> {
            fn get(&mut self, n: u32) -> Result<usize, &'static str> {
                while self.3 < n {
                    let b = *self.0.get(self.1).ok_or("input ends")?;
                    self.1 += 1;
                    self.2 |= u64::from(b) << self.3;
                    self.3 += 8;
                }
                let v = (self.2 & ((1 << n) - 1)) as usize;
                self.2 >>= n;
                self.3 -= n;
                Ok(v)
            }
            /// Canonical Huffman decoding with `(count per length, symbols by code)`.
            fn decode(&mut self, h: &([i32; 16], Vec<u16>)) -> Result<usize, &'static str> {
                let (mut code, mut first, mut index) = (0i32, 0i32, 0i32);
                for len in 1..16 {
                    code |= self.get(1)? as i32;
                    let count = h.0[len];
                    if code - count < first {
                        return Ok(h.1[(index + code - first) as usize].into());
                    }
                    index += count;
                    first = (first + count) << 1;
                    code <<= 1;
                }
                Err("bad code")
            }
        }
        fn huffman(lengths: &[u8]) -> ([i32; 16], Vec<u16>) {
            let mut count = [0i32; 16];
            lengths.iter().for_each(|&l| count[l as usize] += 1);
            count[0] = 0;
            let mut symbols: Vec<(u8, u16)> = (0..lengths.len() as u16)
                .filter(|&s| lengths[s as usize] > 0)
                .map(|s| (lengths[s as usize], s))
                .collect();
            symbols.sort();
            (count, symbols.into_iter().map(|(_, s)| s).collect())
        }
        let mut bits = Bits(input, 0, 0, 0);
        let (mut out, mut max_dist) = (Vec::new(), 0);
        loop {
            let last = bits.get(1)? == 1;
            let (lens, dists) = match bits.get(2)? {
                0 => {
                    (bits.2, bits.3) = (0, 0);
                    let len = bits.get(16)?;
                    if bits.get(16)? != !len & 0xffff {
                        return Err("bad stored lengths");
                    }
                    for _ in 0..len {
                        out.push(bits.get(8)? as u8);
                    }
                    if last {
                        return Ok((out, max_dist));
                    }
                    continue;
                }
                1 => {
                    let mut l = [8u8; 288];
                    l[144..256].fill(9);
                    l[256..280].fill(7);
                    (huffman(&l), huffman(&[5; 30]))
                }
                2 => {
                    let (nlen, ndist, ncode) =
                        (bits.get(5)? + 257, bits.get(5)? + 1, bits.get(4)? + 4);
                    let mut cl = [0u8; 19];
                    for &i in &ORDER[..ncode] {
                        cl[i] = bits.get(3)? as u8;
                    }
                    let cl = huffman(&cl);
                    let mut l = Vec::new();
                    while l.len() < nlen + ndist {
                        let (value, n) = match bits.decode(&cl)? {
                            s @ 0..=15 => (s as u8, 1),
                            16 => (*l.last().ok_or("repeat first")?, 3 + bits.get(2)?),
                            17 => (0, 3 + bits.get(3)?),
                            _ => (0, 11 + bits.get(7)?),
                        };
                        l.extend(std::iter::repeat_n(value, n));
                    }
                    (huffman(&l[..nlen]), huffman(&l[nlen..nlen + ndist]))
                }
                _ => return Err("bad block type"),
            };
            loop {
                match bits.decode(&lens)? {
                    s @ 0..=255 => out.push(s as u8),
                    256 => break,
                    s => {
                        let s = s - 257;
                        let len = usize::from(*LBASE.get(s).ok_or("bad length")?)
                            + bits.get(LEXT[s].into())?;
                        let d = bits.decode(&dists)?;
                        let dist = usize::from(*DBASE.get(d).ok_or("bad distance")?)
                            + bits.get(DEXT[d].into())?;
                        if dist > out.len() {
                            return Err("distance before the start");
                        }
                        max_dist = max_dist.max(dist);
                        for _ in 0..len {
                            out.push(out[out.len() - dist]);
                        }
                    }
                }
            }
            if last {
                return Ok((out, max_dist));
            }
        }
    }

    #[test]
    fn zlib_streams_stay_in_a_4k_window() {
        // 6000 random bytes repeated: a 32 KiB window would match at distance 6000.
        let unit = random(6000, 7);
        let repeats: Vec<u8> = unit.iter().copied().cycle().take(65536).collect();
        let mut big = vec![0; 1 << 21];
        for data in [repeats.clone(), text(1 << 21), text(65536), vec![0; 4096]] {
            let n = compress(CompressionType::Zlib, &data, &mut big)
                .unwrap()
                .unwrap();
            let (out, max_dist) = puff(&big[..n]).unwrap();
            assert!(out == data, "puff disagrees");
            assert!(max_dist <= 4096, "distance {max_dist}");
        }
        // The check itself works: a 32 KiB-window stream has the far matches...
        let mut wide = zlib_rs::Deflate::new(6, false, 15);
        assert_eq!(
            wide.compress(&repeats, &mut big, DeflateFlush::Finish),
            Ok(Status::StreamEnd)
        );
        let far = &big[..wide.total_out() as usize];
        assert!(puff(far).unwrap().1 > 4096);
        // ...and, like QEMU's single inflate call, decompress accepts them: the check of
        // windowBits only applies to distances before the start of the call's output.
        let mut out = vec![0; 65536];
        decompress(CompressionType::Zlib, far, &mut out).unwrap();
        assert!(out == repeats);
    }

    #[test]
    fn truncated_streams_are_typed_errors() {
        for kind in KINDS {
            let cs = 65536;
            let data = text(cs);
            let stream = compressed(kind, &data).unwrap();
            let mut out = vec![0; cs];
            // (Without its last byte a zlib stream may well produce the whole cluster.)
            for cut in [0, 1, 5, stream.len() / 2, stream.len() - 10] {
                match decompress(kind, &stream[..cut], &mut out) {
                    Err(CodecError::Truncated {
                        kind: k,
                        produced,
                        expected,
                    }) => {
                        assert_eq!((k, expected), (kind, cs));
                        assert!(produced < cs);
                    }
                    other => panic!("{kind} cut at {cut}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn short_streams_are_errors() {
        // A stream of half a cluster, read into a whole one.
        let half = text(32768);
        let mut out = vec![0; 65536];
        let z = compressed(CompressionType::Zlib, &half).unwrap();
        assert_eq!(
            decompress(CompressionType::Zlib, &padded(&z), &mut out),
            Err(CodecError::Truncated {
                kind: CompressionType::Zlib,
                produced: 32768,
                expected: 65536
            })
        );
        let z = compressed(CompressionType::Zstd, &half).unwrap();
        // Nothing after the frame: no progress.
        assert_eq!(
            decompress(CompressionType::Zstd, &z, &mut out),
            Err(CodecError::Truncated {
                kind: CompressionType::Zstd,
                produced: 32768,
                expected: 65536
            })
        );
        // Sector padding after the frame is read as the next frame, and is not one.
        let mut zeros = z.clone();
        zeros.resize(z.len().div_ceil(512) * 512, 0);
        assert!(matches!(
            decompress(CompressionType::Zstd, &zeros, &mut out),
            Err(CodecError::Corrupt {
                kind: CompressionType::Zstd,
                ..
            })
        ));
    }

    #[test]
    fn zstd_reads_several_frames() {
        let data = text(65536);
        let mut input = compressed(CompressionType::Zstd, &data[..40000]).unwrap();
        input.extend(compressed(CompressionType::Zstd, &data[40000..]).unwrap());
        let mut out = vec![0; 65536];
        decompress(CompressionType::Zstd, &padded(&input), &mut out).unwrap();
        assert!(out == data);
    }

    #[test]
    fn longer_streams_cut_for_zlib_and_fail_for_zstd() {
        let data = text(8192);
        let mut out = vec![0; 4096];
        let z = compressed(CompressionType::Zlib, &data).unwrap();
        decompress(CompressionType::Zlib, &z, &mut out).unwrap();
        assert!(out[..] == data[..4096]);
        let z = compressed(CompressionType::Zstd, &data).unwrap();
        assert_eq!(
            decompress(CompressionType::Zstd, &z, &mut out),
            Err(CodecError::Overlong { expected: 4096 })
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut out = vec![0; 4096];
        for kind in KINDS {
            for seed in 0..200u64 {
                let len = (seed as usize * 37) % 3000;
                let junk = random(len, seed);
                assert!(decompress(kind, &junk, &mut out).is_err(), "{kind} {seed}");
            }
            for junk in [vec![0u8; 512], vec![0xff; 512], vec![]] {
                assert!(decompress(kind, &junk, &mut out).is_err(), "{kind}");
            }
            // Flipped bytes in a valid stream: an error or other data, never a panic.
            let good = compressed(kind, &text(4096)).unwrap();
            for i in 0..good.len() {
                let mut bad = good.clone();
                bad[i] ^= 0x5a;
                let _ = decompress(kind, &bad, &mut out);
            }
        }
        // Zeros are a non-final stored block with lengths 0 and 0 (not complements).
        assert_eq!(
            decompress(CompressionType::Zlib, &[0; 512], &mut out),
            Err(CodecError::Corrupt {
                kind: CompressionType::Zlib,
                reason: "invalid stored block lengths"
            })
        );
        assert_eq!(
            decompress(CompressionType::Zstd, &[0; 512], &mut out),
            Err(CodecError::Corrupt {
                kind: CompressionType::Zstd,
                reason: "Unknown frame descriptor"
            })
        );
    }

    #[test]
    fn an_empty_cluster_needs_nothing() {
        for kind in KINDS {
            decompress(kind, &[], &mut []).unwrap();
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let e = CodecError::Truncated {
            kind: CompressionType::Zstd,
            produced: 3,
            expected: 512,
        };
        assert_eq!(
            e.to_string(),
            "zstd compressed cluster is truncated: it decompresses to 3 of 512 bytes"
        );
        assert!(std::mem::size_of::<CodecError>() <= 32);
    }

    /// Checks `compressed_entry(host, len, cb)` against the decoder in `format::entry`.
    fn check_entry(host: u64, len: u64, cb: u32) {
        let e = compressed_entry(host, len, cb)
            .unwrap_or_else(|| panic!("cb {cb} host {host:#x} len {len}: refused"));
        assert_eq!(e & (COMPRESSED | COPIED), COMPRESSED);
        let Mapping::Compressed { host: h, len: l } = L2Entry(e).mapping(cb) else {
            panic!("not compressed");
        };
        assert_eq!(h, host, "cb {cb} len {len}");
        // The decoded length covers exactly the sectors touched.
        assert!(
            l >= len && l - len < SECTOR,
            "cb {cb} host {host:#x} {len} -> {l}"
        );
        assert_eq!((h + l) % SECTOR, 0);
        assert_eq!(
            (h + l) / SECTOR,
            (host + len).div_ceil(SECTOR),
            "cb {cb} host {host:#x} {len}"
        );
    }

    #[test]
    fn descriptors_round_trip_for_every_cluster_size() {
        for cb in MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS {
            let cs = 1u64 << cb;
            let x = 62 - (cb - 8);
            let limit = 1u64 << x.min(56);
            let max = max_compressed_len(cb) as u64;
            let hosts = [
                1,
                511,
                512,
                513,
                cs - 1,
                cs,
                cs + 511,
                3 * cs + 100,
                limit - cs - 1,
                limit - SECTOR,
                limit - 1,
            ];
            for host in hosts {
                for len in [1, 2, 511, 512, 513, cs / 2, max - 1, max] {
                    if len >= 1 && len <= max {
                        check_entry(host, len, cb);
                    }
                }
            }
            // The worst case fills the sector field exactly when cb == 9.
            let e = compressed_entry(511, max, cb).unwrap();
            let sectors = (e & !COMPRESSED) >> x;
            assert_eq!(sectors, cs / SECTOR);
            assert!(sectors < 1 << (cb - 8));
            // Refused: empty, not smaller than a cluster, offset beyond the field.
            assert_eq!(compressed_entry(4096, 0, cb), None);
            assert_eq!(compressed_entry(4096, cs, cb), None);
            assert_eq!(compressed_entry(limit, 1, cb), None);
            assert_eq!(compressed_entry(u64::MAX, 1, cb), None);
        }
        assert_eq!(compressed_entry(0x10000, 100, 8), None);
        assert_eq!(compressed_entry(0x10000, 100, 22), None);
    }

    #[test]
    fn descriptors_match_qemu_examples() {
        // 64 KiB clusters, one sector at 0x80000 (written by qemu-img convert -c).
        assert_eq!(
            compressed_entry(0x80000, 300, 16),
            Some(0x4000_0000_0008_0000)
        );
        // 2 MiB clusters, 5 sectors at 0xa00000 (iotest 214).
        assert_eq!(
            compressed_entry(0xa0_0000, 4 * 512 + 1, 21),
            Some(0x4008_0000_00a0_0000)
        );
        // A stream packed right after another one, crossing a sector boundary.
        assert_eq!(
            compressed_entry(0x8004f, 0x200, 16),
            Some(0x4000_0000_0008_004f | 1 << 54)
        );
    }
}
