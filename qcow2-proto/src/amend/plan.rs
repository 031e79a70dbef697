//! What an amend refuses, and the header writes of its changes.

use std::collections::VecDeque;

use crate::check::pass::Req;
use crate::error::{AmendError, RequestError};
use crate::format::extension::{relayout, FeatureTable, Relayout};
use crate::format::header::{compat, incompat, Header, V2_HEADER_LEN, V3_HEADER_LEN};
use crate::format::Layout;

use super::{AmendOptions, Image};

/// Bytes of the header's first sector: a write inside it is atomic.
const SECTOR: usize = 512;

/// Whether lazy refcounts are on.
pub(super) fn lazy(h: &Header) -> bool {
    h.compatible_features & compat::LAZY_REFCOUNTS != 0
}

/// The refusals, in QEMU's order, before anything is written.
pub(super) fn refuse(o: &AmendOptions, layout: &Layout, img: &Image) -> Result<(), AmendError> {
    o.validate()?;
    let h = &layout.header;
    let version = o.version.unwrap_or(h.version);
    if o.lazy_refcounts == Some(true) && !lazy(h) && version < 3 {
        return Err(AmendError::LazyRefcountsNeedV3);
    }
    let now = 1u32 << h.refcount_order;
    let bits = o.refcount_bits.unwrap_or(now);
    if bits != now && version < 3 && bits != 16 {
        return Err(AmendError::RefcountWidthNeedsV3);
    }
    if version > h.version && img.snapshots.iter().any(|s| s.disk_size.is_none()) {
        return Err(AmendError::UpgradeSnapshotTable);
    }
    if version < h.version {
        if bits != 16 {
            return Err(AmendError::DowngradeRefcountBits);
        }
        if h.incompatible_features & incompat::DATA_FILE != 0 {
            return Err(AmendError::DowngradeDataFile);
        }
        // (The engine never leaves the dirty bit set on an image it has open writable.)
        let left = h.incompatible_features & !(incompat::COMPRESSION | incompat::DIRTY);
        if left != 0 {
            return Err(AmendError::DowngradeIncompatible(left));
        }
        let other_size = |s: &crate::info::SnapshotInfo| {
            s.vm_state_size > u64::from(u32::MAX) || s.disk_size.is_some_and(|d| d != img.size)
        };
        if img.snapshots.iter().any(other_size) {
            return Err(AmendError::DowngradeSnapshots);
        }
        if layout.ext.bitmaps.is_some() {
            return Err(AmendError::DowngradeBitmaps);
        }
    }
    Ok(())
}

/// Cluster 0 laid out for `version` as QEMU's `qcow2_update_header` writes it: 72 header
/// bytes and no feature-name table for version 2; 112 bytes, QEMU's feature-name table and
/// every feature bit cleared (but lazy refcounts, with `lazy`) for an upgrade to version 3
/// (without the table when it does not fit, as in QEMU); every other extension and the
/// backing file name kept.
pub(super) fn relaid(
    cluster0: &[u8],
    layout: &Layout,
    version: u32,
    lazy: bool,
) -> Result<Vec<u8>, RequestError> {
    let h = layout.header;
    let len = cluster0.len();
    let name_at = h.backing_file_offset as usize;
    let name_end = name_at
        .saturating_add(h.backing_file_size as usize)
        .min(len);
    let name = (name_at != 0).then(|| &cluster0[name_at.min(len)..name_end]);
    let format = layout
        .ext
        .backing_format
        .map(|r| &cluster0[r.start..r.start + r.len]);
    let v3 = version >= 3;
    let spec = Relayout {
        header_len: h.header_length as usize,
        area: if name_at == 0 { len } else { name_at.min(len) },
        new_header_len: if v3 { V3_HEADER_LEN } else { V2_HEADER_LEN } as usize,
        name,
        format,
        features: if v3 {
            FeatureTable::Default
        } else {
            FeatureTable::Drop
        },
        drop_bitmaps: false,
    };
    let lay = |spec: &Relayout<'_>| {
        relayout(cluster0, spec).map_err(|e| RequestError::CheckFailed(e.into()))
    };
    // Like QEMU, the feature-name table is left out when it does not fit.
    let laid = match lay(&spec)? {
        None if v3 => lay(&Relayout {
            features: FeatureTable::Drop,
            ..spec
        })?,
        laid => laid,
    };
    let (mut bytes, at, n) = laid.ok_or(AmendError::HeaderTooLarge)?;
    let mut new = h;
    new.version = version;
    new.backing_file_offset = at;
    new.backing_file_size = n;
    if v3 && h.version < 3 {
        new.incompatible_features = 0;
        new.compatible_features = if lazy { compat::LAZY_REFCOUNTS } else { 0 };
        new.autoclear_features = 0;
        new.refcount_order = 4;
        new.header_length = V3_HEADER_LEN;
        new.compression_type = 0;
    }
    new.encode(&mut bytes);
    Ok(bytes)
}

/// The writes that put `bytes` at the start of the file: what lies past the first sector
/// first, flushed (the current header does not reach there when it fits in one sector),
/// then the first sector in one write, flushed.
pub(super) fn header_writes(bytes: &[u8]) -> VecDeque<Req> {
    let mut reqs = VecDeque::new();
    if bytes.len() > SECTOR {
        reqs.push_back(Req::Write {
            offset: SECTOR as u64,
            data: bytes[SECTOR..].to_vec(),
        });
        reqs.push_back(Req::Flush);
    }
    let mut first = bytes[..bytes.len().min(SECTOR)].to_vec();
    first.resize(SECTOR, 0);
    reqs.push_back(Req::Write {
        offset: 0,
        data: first,
    });
    reqs.push_back(Req::Flush);
    reqs
}

/// Lazy refcounts on or off: the compatible features word, then a flush. (The engine keeps
/// refcounts exact even with lazy refcounts on, so turning them off has nothing to repair
/// first.)
pub(super) fn lazy_writes(h: &Header, on: bool) -> VecDeque<Req> {
    let features = if on {
        h.compatible_features | compat::LAZY_REFCOUNTS
    } else {
        h.compatible_features & !compat::LAZY_REFCOUNTS
    };
    VecDeque::from([
        Req::Write {
            offset: 80,
            data: features.to_be_bytes().to_vec(),
        },
        Req::Flush,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::extension::{BACKING_FORMAT, FEATURE_NAMES};

    /// The first 512 bytes of a version 2 cluster 0 with a backing format extension and a
    /// name.
    fn v2_cluster0() -> Vec<u8> {
        let mut c = vec![0u8; 512];
        let h = Header {
            version: 2,
            cluster_bits: 12,
            size: 1 << 20,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            backing_file_offset: 96,
            backing_file_size: 4,
            refcount_table_offset: 4096,
            refcount_table_clusters: 1,
            l1_table_offset: 8192,
            l1_size: 1,
            ..Header::default()
        };
        h.encode(&mut c);
        c[72..76].copy_from_slice(&BACKING_FORMAT.to_be_bytes());
        c[76..80].copy_from_slice(&5u32.to_be_bytes());
        c[80..85].copy_from_slice(b"qcow2");
        c[96..100].copy_from_slice(b"base");
        c
    }

    #[test]
    fn upgrade_lays_out_like_qemu_and_drops_the_table_when_it_does_not_fit() {
        let mut c = v2_cluster0();
        let layout = Layout::parse(&c, false).unwrap();
        // 512 bytes: no room for the feature table (QEMU leaves it out too, with 512-byte
        // clusters).
        let bytes = relaid(&c, &layout, 3, true).unwrap();
        let h = Header::decode(&bytes).unwrap();
        assert_eq!((h.version, h.header_length, h.refcount_order), (3, 112, 4));
        assert_eq!(h.compatible_features, compat::LAZY_REFCOUNTS);
        assert_eq!(&bytes[112..116], &BACKING_FORMAT.to_be_bytes());
        assert_eq!(&bytes[128..136], &[0; 8]);
        assert_eq!((h.backing_file_offset, h.backing_file_size), (136, 4));
        assert_eq!(&bytes[136..140], b"base");
        // With a cluster's room, the table follows the backing format, as in QEMU.
        c.resize(4096, 0);
        let layout = Layout::parse(&c, false).unwrap();
        let bytes = relaid(&c, &layout, 3, false).unwrap();
        assert_eq!(&bytes[128..132], &FEATURE_NAMES.to_be_bytes());
        assert!(bytes.len() > SECTOR);
        // Written past the first sector first, flushed, then the first sector alone.
        let reqs = header_writes(&bytes);
        assert!(matches!(reqs[0], Req::Write { offset: 512, .. }));
        assert!(matches!(reqs[1], Req::Flush));
        assert!(matches!(&reqs[2], Req::Write { offset: 0, data } if data.len() == SECTOR));
        assert!(matches!(reqs[3], Req::Flush));
        // And back: version 2 has no table and a 72-byte header.
        let layout = Layout::parse(&bytes, false).unwrap();
        let back = relaid(&bytes, &layout, 2, false).unwrap();
        assert_eq!(back[..100], v2_cluster0()[..100]);
    }

    #[test]
    fn options_are_checked_before_the_image() {
        let bad = AmendOptions {
            refcount_bits: Some(3),
            ..AmendOptions::default()
        };
        assert_eq!(bad.validate(), Err(AmendError::RefcountWidth));
        let v4 = AmendOptions {
            version: Some(4),
            ..AmendOptions::default()
        };
        assert_eq!(v4.validate(), Err(AmendError::UnknownVersion(4)));
        for bits in [1, 2, 4, 8, 16, 32, 64] {
            let o = AmendOptions {
                refcount_bits: Some(bits),
                ..AmendOptions::default()
            };
            assert_eq!(o.validate(), Ok(()));
        }
    }
}
