//! The reference model: what every guest byte must read as.
//!
//! The model is sparse (64 KiB pages, absent pages read as zero) so the same code describes a
//! 4 MiB quickcheck disk and a 512 GiB interop image with a few written extents.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Size of one model page.
pub const PAGE: u64 = 64 << 10;

/// The contents of a virtual disk.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Model {
    size: u64,
    pages: BTreeMap<u64, Box<[u8]>>,
}

impl Model {
    /// A disk of `size` zero bytes.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            pages: BTreeMap::new(),
        }
    }

    /// Virtual size in bytes.
    pub fn len(&self) -> u64 {
        self.size
    }

    /// Whether the size is zero.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Calls `f(page_index, page_offset, span)` for each page piece of `offset..offset + len`.
    fn spans(offset: u64, len: u64, mut f: impl FnMut(u64, usize, usize, usize)) {
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let index = pos / PAGE;
            let in_page = (pos % PAGE) as usize;
            let n = (PAGE as usize - in_page).min((len - done) as usize);
            f(index, in_page, n, done as usize);
            done += n as u64;
        }
    }

    /// Reads `buf.len()` bytes at `offset` (bytes past the end read as zero).
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        Self::spans(offset, buf.len() as u64, |index, at, n, done| {
            let out = &mut buf[done..done + n];
            match self.pages.get(&index) {
                Some(page) => out.copy_from_slice(&page[at..at + n]),
                None => out.fill(0),
            }
        });
    }

    /// Writes `data` at `offset`.
    ///
    /// # Panics
    /// If the write reaches past the end of the disk.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        assert!(
            offset + data.len() as u64 <= self.size,
            "model write past the end"
        );
        Self::spans(offset, data.len() as u64, |index, at, n, done| {
            let page = self
                .pages
                .entry(index)
                .or_insert_with(|| vec![0; PAGE as usize].into());
            page[at..at + n].copy_from_slice(&data[done..done + n]);
        });
    }

    /// Makes `len` bytes at `offset` read as zero.
    pub fn zero(&mut self, offset: u64, len: u64) {
        let end = (offset + len).min(self.size);
        if end <= offset {
            return;
        }
        Self::spans(offset, end - offset, |index, at, n, _| {
            if let Some(page) = self.pages.get_mut(&index) {
                page[at..at + n].fill(0);
            }
        });
        self.pages.retain(|_, page| page.iter().any(|&b| b != 0));
    }

    /// The bytes a discard of `offset..offset + len` zeroes: the whole clusters inside the
    /// range, counting a partial last cluster of the disk when the range reaches the end.
    pub fn discard_range(&self, offset: u64, len: u64, cluster: u64) -> Option<(u64, u64)> {
        let end = (offset + len).min(self.size);
        let start = offset.next_multiple_of(cluster);
        let stop = if end == self.size {
            end
        } else {
            end / cluster * cluster
        };
        (start < stop).then(|| (start, stop - start))
    }

    /// Applies a discard (see [`Model::discard_range`]).
    pub fn discard(&mut self, offset: u64, len: u64, cluster: u64) {
        if let Some((start, n)) = self.discard_range(offset, len, cluster) {
            self.zero(start, n);
        }
    }

    /// Changes the size; bytes past a smaller size are dropped, a larger size reads as zero.
    pub fn resize(&mut self, size: u64) {
        if size < self.size {
            self.zero(size, self.size - size);
        }
        self.size = size;
    }

    /// The guest ranges that may hold non-zero bytes (whole pages), in order.
    pub fn touched(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.pages.keys().map(move |&i| {
            let start = i * PAGE;
            (start, PAGE.min(self.size - start))
        })
    }

    /// Writes the disk as a (sparse) raw file, for `qemu-img compare`.
    pub fn write_raw(&self, path: &Path) -> io::Result<()> {
        let f = File::create(path)?;
        f.set_len(self.size)?;
        for (start, len) in self.touched() {
            f.write_all_at(&self.pages[&(start / PAGE)][..len as usize], start)?;
        }
        Ok(())
    }
}

/// The deterministic byte pattern `seed` makes for a write at `offset`: every byte differs
/// from its neighbours and from the same position under other seeds, so misplaced data shows.
pub fn pattern(seed: u32, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (offset + i)
                .wrapping_mul(0x9e37_79b9)
                .wrapping_add(u64::from(seed).wrapping_mul(0x85eb_ca6b));
            (x ^ (x >> 13) ^ (x >> 29)) as u8 | 1
        })
        .collect()
}

/// The first position where `got` differs from `want`, described for a failure message.
pub fn first_difference(got: &[u8], want: &[u8], base: u64) -> Option<String> {
    let i = got.iter().zip(want).position(|(a, b)| a != b)?;
    let end = (i + 16).min(got.len());
    Some(format!(
        "first difference at guest offset {:#x}: got {:02x?}, want {:02x?}",
        base + i as u64,
        &got[i..end],
        &want[i..end]
    ))
}

/// Length of the synthetic raw backing file the simulator and the fuzz harness attach to
/// every image that names one.
pub const SYNTHETIC_BACKING_LEN: u64 = 3 << 20;

/// Fills `out` with the synthetic backing file at `depth` from byte `pos` (zeros past its
/// end): a pattern that differs per 512-byte sector and never reads as zero.
pub fn synthetic_backing(depth: u32, pos: u64, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        let at = pos + i as u64;
        *b = if at >= SYNTHETIC_BACKING_LEN {
            0
        } else {
            (at / 512)
                .wrapping_mul(31)
                .wrapping_add(u64::from(depth) * 7) as u8
                | 1
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_zero_discard_resize() {
        let mut m = Model::new(4 * PAGE);
        m.write(PAGE - 2, &[1, 2, 3, 4]);
        let mut b = [0u8; 6];
        m.read(PAGE - 3, &mut b);
        assert_eq!(b, [0, 1, 2, 3, 4, 0]);
        m.zero(PAGE - 1, 2);
        m.read(PAGE - 3, &mut b);
        assert_eq!(b, [0, 1, 0, 0, 4, 0]);
        assert_eq!(m.discard_range(100, 3 * 512, 512), Some((512, 1024)));
        assert_eq!(
            m.discard_range(4 * PAGE - 700, 700, 512),
            Some((4 * PAGE - 512, 512))
        );
        m.resize(PAGE);
        m.resize(2 * PAGE);
        m.read(PAGE - 3, &mut b);
        assert_eq!(b, [0, 1, 0, 0, 0, 0]);
        m.zero(0, 2 * PAGE);
        assert_eq!(m.touched().count(), 0);
    }

    #[test]
    fn patterns_differ_by_seed_and_offset() {
        assert_ne!(pattern(1, 0, 64), pattern(2, 0, 64));
        assert_ne!(pattern(1, 0, 64), pattern(1, 1, 64));
        assert!(pattern(7, 3, 4096).iter().all(|&b| b != 0));
    }
}
