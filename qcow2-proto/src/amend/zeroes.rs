//! The downgrade's walk over every L2 table (active and snapshots'): zero clusters to
//! expand (version 2 has no zero flag) and, for a zstd image, compressed clusters (which
//! refuse the downgrade). Nothing is written until the whole walk is done.
//!
//! As in QEMU's `qcow2_expand_zero_clusters`: an allocated zero cluster is filled with
//! zeroes and loses its flag; an unallocated one becomes unallocated without a backing
//! file, and gets a new cluster of zeroes with one (refcount: the L2 table's, COPIED when
//! that is 1). New clusters are taken past the end of the file.

use std::collections::{BTreeMap, VecDeque};

use crate::check::pass::Req;
use crate::error::{AmendError, RequestError};
use crate::format::entry::{L1Entry, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use crate::format::Layout;
use crate::io::{IoBuf, IoError};

use super::{io_error, Image};

/// An L2 table with zero entries to expand.
#[derive(Debug)]
struct Edit {
    /// Host offset of the table.
    offset: u64,
    /// Its new contents.
    table: Vec<u8>,
    /// Data clusters of allocated zero clusters, to fill with zeroes first.
    zero: Vec<u64>,
}

/// What the outstanding read is.
#[derive(Clone, Copy, Debug)]
enum Wait {
    L1,
    L2(u64),
}

/// The walk, one table read at a time.
#[derive(Debug)]
pub(super) struct Scan {
    cluster_size: u64,
    backing: bool,
    zstd: bool,
    /// L1 tables still to read: `(offset, entries)`.
    tables: Vec<(u64, u32)>,
    /// Every L2 table with the number of L1 entries naming it (its refcount), read in
    /// offset order once every L1 is.
    l2s: BTreeMap<u64, u64>,
    /// The next L2 table to read.
    next_l2: u64,
    edits: Vec<Edit>,
    /// New clusters of zeroes: `(host offset, refcount)`.
    allocs: Vec<(u64, u64)>,
    /// Where the next new cluster goes.
    next_free: u64,
    waiting: Option<Wait>,
}

/// The expansion's writes, in order.
#[derive(Debug, Default)]
pub(super) struct Expansion {
    /// Zeroes into every cluster the expansion links (and flush).
    pub zeroes: VecDeque<Req>,
    /// `(cluster index, refcount)` of the new clusters: the refcount structure must count
    /// them before the L2 tables are written.
    pub allocs: Vec<(u64, u64)>,
    /// The L2 tables (and flush).
    pub tables: VecDeque<Req>,
}

impl Scan {
    /// A walk over the active L1 table and every snapshot's.
    pub fn new(layout: &Layout, img: &Image) -> Self {
        let h = layout.header;
        let mut tables = vec![(h.l1_table_offset, h.l1_size)];
        tables.extend(img.snapshots.iter().map(|s| (s.l1_table_offset, s.l1_size)));
        tables.reverse();
        Self {
            cluster_size: img.cluster_size,
            backing: h.backing_file_offset != 0,
            zstd: h.compression_type != 0,
            tables,
            l2s: BTreeMap::new(),
            next_l2: 0,
            edits: Vec::new(),
            allocs: Vec::new(),
            next_free: img.file_len.next_multiple_of(img.cluster_size),
            waiting: None,
        }
    }

    /// Takes the last read's result and asks for the next read; `None` once done.
    pub fn step(
        &mut self,
        input: Option<Result<(IoBuf, usize), IoError>>,
    ) -> Result<Option<Req>, RequestError> {
        if let (Some(input), Some(wait)) = (input, self.waiting.take()) {
            let (buf, _) = input.map_err(io_error)?;
            match wait {
                Wait::L1 => {
                    for e in buf.as_slice().chunks_exact(8) {
                        let off = L1Entry(u64::from_be_bytes(e.try_into().expect("8"))).l2_offset();
                        if off != 0 {
                            *self.l2s.entry(off).or_insert(0) += 1;
                        }
                    }
                }
                Wait::L2(offset) => self.scan(offset, buf.as_slice())?,
            }
        }
        while let Some((off, entries)) = self.tables.pop() {
            if off != 0 && entries != 0 {
                self.waiting = Some(Wait::L1);
                let len = entries as usize * 8;
                return Ok(Some(Req::Read { offset: off, len }));
            }
        }
        if let Some((&off, _)) = self.l2s.range(self.next_l2..).next() {
            self.next_l2 = off + 1;
            self.waiting = Some(Wait::L2(off));
            let len = self.cluster_size as usize;
            return Ok(Some(Req::Read { offset: off, len }));
        }
        Ok(None)
    }

    /// One L2 table: records its expansion, or refuses.
    fn scan(&mut self, offset: u64, bytes: &[u8]) -> Result<(), RequestError> {
        let refcount = self.l2s.get(&offset).copied().unwrap_or(1);
        let mut table = bytes[..self.cluster_size as usize].to_vec();
        let mut zero = Vec::new();
        let mut changed = false;
        for e in table.chunks_exact_mut(8) {
            let entry = u64::from_be_bytes((&*e).try_into().expect("8"));
            if entry & COMPRESSED != 0 {
                if self.zstd {
                    return Err(AmendError::DowngradeZstd.into());
                }
                continue;
            }
            if entry & ZERO == 0 {
                continue;
            }
            let host = entry & OFFSET_MASK;
            let new = if host != 0 {
                zero.push(host);
                entry & !ZERO
            } else if self.backing {
                let host = self.next_free;
                self.next_free += self.cluster_size;
                self.allocs.push((host, refcount));
                zero.push(host);
                if refcount == 1 {
                    host | COPIED
                } else {
                    host
                }
            } else {
                0
            };
            e.copy_from_slice(&new.to_be_bytes());
            changed = true;
        }
        if changed {
            self.edits.push(Edit {
                offset,
                table,
                zero,
            });
        }
        Ok(())
    }

    /// The expansion's writes: zeroes into every cluster the expansion links, flushed;
    /// then (once the new clusters are counted) the L2 tables in place (every entry's old
    /// and new value read alike, so a table torn at any sector is fine), flushed.
    pub fn expansion(self) -> Expansion {
        let mut x = Expansion::default();
        let cs = self.cluster_size as usize;
        for e in &self.edits {
            for &host in &e.zero {
                x.zeroes.push_back(Req::Write {
                    offset: host,
                    data: vec![0; cs],
                });
            }
        }
        if !x.zeroes.is_empty() {
            x.zeroes.push_back(Req::Flush);
        }
        for e in self.edits {
            x.tables.push_back(Req::Write {
                offset: e.offset,
                data: e.table,
            });
        }
        if !x.tables.is_empty() {
            x.tables.push_back(Req::Flush);
        }
        let cb = self.cluster_size.trailing_zeros();
        x.allocs = self.allocs.iter().map(|&(h, r)| (h >> cb, r)).collect();
        x
    }
}
