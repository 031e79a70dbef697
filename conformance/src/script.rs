//! Random guest scripts for the model-based properties, with shrinking.
//!
//! Offsets and lengths are generated independently of the disk size and clipped to the
//! current size when the script runs, so a shrunk script stays meaningful on any geometry.

use quickcheck::{Arbitrary, Gen};

/// Largest generated offset (scripts run on disks of a few MiB; offsets wrap around).
pub const MAX_OFFSET: u64 = 8 << 20;
/// Smallest size a [`Op::Resize`] asks for.
pub const MIN_RESIZE: u64 = 512 << 10;
/// Largest size a [`Op::Resize`] asks for.
pub const MAX_RESIZE: u64 = 6 << 20;

/// One guest operation.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Op {
    /// Write `len` bytes of pattern `seed` at `offset`.
    Write {
        /// Guest offset (wrapped to the disk size).
        offset: u64,
        /// Length (clipped at the end of the disk).
        len: u32,
        /// Pattern seed.
        seed: u32,
    },
    /// Read and compare with the model.
    Read {
        /// Guest offset (wrapped to the disk size).
        offset: u64,
        /// Length (clipped at the end of the disk).
        len: u32,
    },
    /// Write zeroes, releasing host space when `unmap`.
    Zeroes {
        /// Guest offset (wrapped to the disk size).
        offset: u64,
        /// Length (clipped at the end of the disk).
        len: u32,
        /// Whether host space may go.
        unmap: bool,
    },
    /// Discard (whole clusters inside the range read as zero afterwards).
    Discard {
        /// Guest offset (wrapped to the disk size).
        offset: u64,
        /// Length (clipped at the end of the disk).
        len: u32,
    },
    /// Guest flush.
    Flush,
    /// Close the image and open it again.
    Reopen,
    /// Change the virtual size (shrinking consents to losing data).
    Resize {
        /// New size, a multiple of 512 in `MIN_RESIZE..=MAX_RESIZE`.
        size: u64,
    },
}

/// A sequence of guest operations.
#[derive(Clone, Eq, PartialEq)]
pub struct Script {
    /// The operations, in order.
    pub ops: Vec<Op>,
}

/// One operation per line, numbered like the failure messages' steps.
impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, op) in self.ops.iter().enumerate() {
            writeln!(f, "  {i:3}: {op:?}")?;
        }
        Ok(())
    }
}

fn below(g: &mut Gen, n: u64) -> u64 {
    u64::arbitrary(g) % n
}

/// Offsets that hit interesting spots: byte-granular, sector-aligned, or near a power-of-two
/// boundary (cluster, L2 table and refcount block boundaries of every cluster size).
fn offset(g: &mut Gen) -> u64 {
    match below(g, 4) {
        0 => below(g, MAX_OFFSET),
        1 => below(g, MAX_OFFSET) / 512 * 512,
        _ => {
            let unit = 512u64 << below(g, 12);
            let base = below(g, MAX_OFFSET / unit + 1) * unit;
            let jitter = [0u64, 0, 0, 512, 1, 4096]
                .get(below(g, 6) as usize)
                .copied()
                .unwrap_or(0);
            if below(g, 2) == 0 {
                base + jitter
            } else {
                base.saturating_sub(jitter)
            }
        }
    }
}

fn len(g: &mut Gen) -> u32 {
    (match below(g, 4) {
        0 => below(g, 600) + 1,
        1 => (below(g, 128) + 1) * 512,
        2 => (below(g, 8) + 1) * 4096,
        _ => below(g, 320 << 10) + 1,
    }) as u32
}

impl Arbitrary for Op {
    fn arbitrary(g: &mut Gen) -> Self {
        match below(g, 100) {
            0..35 => Op::Write {
                offset: offset(g),
                len: len(g),
                seed: u32::arbitrary(g),
            },
            35..55 => Op::Read {
                offset: offset(g),
                len: len(g),
            },
            55..67 => Op::Zeroes {
                offset: offset(g),
                len: len(g),
                unmap: bool::arbitrary(g),
            },
            67..77 => Op::Discard {
                offset: offset(g),
                len: len(g),
            },
            77..85 => Op::Flush,
            85..92 => Op::Reopen,
            _ => Op::Resize {
                size: (MIN_RESIZE + below(g, MAX_RESIZE - MIN_RESIZE + 1)) / 512 * 512,
            },
        }
    }

    fn shrink(&self) -> Box<dyn Iterator<Item = Self>> {
        let mut out = Vec::new();
        let smaller = |x: u64| {
            let mut v = Vec::new();
            if x > 0 {
                v.push(x / 2);
                if x % 512 != 0 {
                    v.push(x / 512 * 512);
                }
            }
            v
        };
        match *self {
            Op::Write { offset, len, seed } => {
                out.extend(
                    smaller(u64::from(len))
                        .into_iter()
                        .filter(|&l| l > 0)
                        .map(|l| Op::Write {
                            offset,
                            len: l as u32,
                            seed,
                        }),
                );
                out.extend(smaller(offset).into_iter().map(|o| Op::Write {
                    offset: o,
                    len,
                    seed,
                }));
            }
            Op::Read { offset, len } => {
                out.extend(
                    smaller(u64::from(len))
                        .into_iter()
                        .filter(|&l| l > 0)
                        .map(|l| Op::Read {
                            offset,
                            len: l as u32,
                        }),
                );
                out.extend(
                    smaller(offset)
                        .into_iter()
                        .map(|o| Op::Read { offset: o, len }),
                );
            }
            Op::Zeroes { offset, len, unmap } => {
                if unmap {
                    out.push(Op::Zeroes {
                        offset,
                        len,
                        unmap: false,
                    });
                }
                out.extend(
                    smaller(u64::from(len))
                        .into_iter()
                        .filter(|&l| l > 0)
                        .map(|l| Op::Zeroes {
                            offset,
                            len: l as u32,
                            unmap,
                        }),
                );
                out.extend(smaller(offset).into_iter().map(|o| Op::Zeroes {
                    offset: o,
                    len,
                    unmap,
                }));
            }
            Op::Discard { offset, len } => {
                out.extend(
                    smaller(u64::from(len))
                        .into_iter()
                        .filter(|&l| l > 0)
                        .map(|l| Op::Discard {
                            offset,
                            len: l as u32,
                        }),
                );
                out.extend(
                    smaller(offset)
                        .into_iter()
                        .map(|o| Op::Discard { offset: o, len }),
                );
            }
            Op::Reopen => out.push(Op::Flush),
            Op::Flush => {}
            Op::Resize { size } => {
                let toward = (4u64 << 20).max(MIN_RESIZE);
                if size != toward {
                    out.push(Op::Resize { size: toward });
                }
            }
        }
        Box::new(out.into_iter())
    }
}

impl Arbitrary for Script {
    fn arbitrary(g: &mut Gen) -> Self {
        let n = 1 + below(g, g.size().max(1) as u64) as usize;
        Script {
            ops: (0..n).map(|_| Op::arbitrary(g)).collect(),
        }
    }

    fn shrink(&self) -> Box<dyn Iterator<Item = Self>> {
        let ops = self.ops.clone();
        let n = ops.len();
        let mut out = Vec::new();
        // Remove chunks, largest first; then simplify single operations.
        let mut chunk = n / 2;
        while chunk >= 1 {
            let mut start = 0;
            while start < n {
                let mut v = ops.clone();
                v.drain(start..(start + chunk).min(n));
                if !v.is_empty() {
                    out.push(Script { ops: v });
                }
                start += chunk;
            }
            chunk /= 2;
        }
        for (i, op) in ops.iter().enumerate() {
            for simpler in op.shrink() {
                let mut v = ops.clone();
                v[i] = simpler;
                out.push(Script { ops: v });
            }
        }
        Box::new(out.into_iter())
    }
}

/// The absolute range an op touches on a disk of `size` bytes (offset wrapped, length
/// clipped), or `None` when it touches nothing.
pub fn clip(offset: u64, len: u32, size: u64) -> Option<(u64, u64)> {
    if size == 0 {
        return None;
    }
    let offset = offset % size;
    let len = u64::from(len).min(size - offset);
    (len > 0).then_some((offset, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shrinking_only_makes_smaller_scripts() {
        let mut g = Gen::from_size_and_seed(30, 7);
        let s = Script::arbitrary(&mut g);
        for t in s.shrink() {
            assert!(t.ops.len() <= s.ops.len());
            assert!(!t.ops.is_empty());
            assert_ne!(t, s);
        }
    }

    #[test]
    fn clip_wraps_and_clips() {
        assert_eq!(clip(10, 100, 50), Some((10, 40)));
        assert_eq!(clip(60, 5, 50), Some((10, 5)));
        assert_eq!(clip(60, 5, 0), None);
    }
}
