//! How large a qcow2 image will be, as `qemu-img measure -O qcow2` computes it.
//!
//! QEMU's rules (block/qcow2.c, `qcow2_measure`, `qcow2_calc_prealloc_size`,
//! `qcow2_refcount_metadata_size`; block/qcow2-bitmap.c,
//! `qcow2_get_persistent_dirty_bitmap_size`):
//!
//! * The virtual size is rounded up to whole clusters (the target's clusters).
//! * **fully allocated** = that size + one header cluster + every L2 table the size needs +
//!   the L1 table in whole clusters + the refcount blocks and table that count all of these
//!   clusters and themselves (the least fixed point).
//! * **required** = fully allocated − the virtual size + the source's data: the bytes of the
//!   target clusters holding data the source reports allocated and not reading as zero
//!   ([`DataCount`]); all of the virtual size when a backing file is named (nothing is known
//!   to be shared with it) or when `preallocation` is `falloc` or `full`; nothing without a
//!   source. Metadata is counted for a fully allocated image either way.
//! * **bitmaps** (only when both the target and the source can hold persistent bitmaps, i.e.
//!   compat 1.1): each bitmap's data clusters and its table in whole clusters, plus the
//!   bitmap directory in whole clusters.
//! * Only the size of `-o size=`/`--size` is held to the L1 limit (32 MiB of L1), even when a
//!   source image gives the size actually measured; a source's size is not checked.
//!
//! The same functions serve any caller planning an image (a converter sizing its target, a
//! provisioning tool): they are pure and allocate nothing.

use crate::config::{CreateOptions, Preallocation};
use crate::create::geometry;
use crate::error::CreateError;
use crate::format::{Geometry, MAX_L1_BYTES};
use crate::info::BitmapInfo;

/// Bytes of an L1 table entry and of a refcount table entry.
const TABLE_ENTRY: u64 = 8;
/// Bytes of a bitmap table entry.
const BITMAP_TABLE_ENTRY: u64 = 8;
/// Bytes of a bitmap directory entry before its name.
const BITMAP_DIR_ENTRY: u64 = 24;
/// Smallest cluster size with extended L2 entries: 32 subclusters of 512 bytes.
const MIN_EXTENDED_L2_CLUSTER: u64 = 16384;

/// What the target image would be: qemu-img's `-o` options.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct MeasureOptions {
    /// Cluster size, refcount width, compat version and preallocation; `size` is the size
    /// given with `--size` or `-o size=` (0 when none was). A backing file, when named,
    /// makes every cluster of a source count as data (nothing is known to be shared with
    /// it). `lazy_refcounts` and the backing format play no part.
    pub create: CreateOptions,
    /// `extended_l2`: 128-bit L2 entries (twice the L2 tables).
    pub extended_l2: bool,
}

impl MeasureOptions {
    /// qemu-img's defaults for a target of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self {
            create: CreateOptions::new(size),
            extended_l2: false,
        }
    }
}

/// The image a measurement starts from (`qemu-img measure FILENAME`).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Source<'a> {
    /// Its virtual size in bytes.
    pub size: u64,
    /// Bytes of target clusters holding its data, as [`DataCount`] counts them (ignored with
    /// a backing file or full preallocation).
    pub data: u64,
    /// Its persistent bitmaps, or `None` when it cannot have any (raw images, compat 0.10).
    pub bitmaps: Option<&'a [BitmapInfo]>,
}

/// The sizes qemu-img prints.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Measurement {
    /// Bytes the new image needs (`required`).
    pub required: u64,
    /// Bytes the image takes with every cluster allocated (`fully-allocated`).
    pub fully_allocated: u64,
    /// Bytes needed to copy the source's persistent bitmaps (`bitmaps`), when both the source
    /// and the target can hold them.
    pub bitmaps: Option<u64>,
}

/// Options that cannot be measured, with QEMU's messages.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum MeasureError {
    /// The cluster size or refcount width is invalid.
    #[error(transparent)]
    Create(CreateError),
    /// Extended L2 entries need clusters of at least 16 KiB.
    #[error("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")]
    ExtendedL2ClusterSize,
    /// compat=0.10 has 16-bit refcounts only.
    #[error(
        "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"
    )]
    RefcountBitsNeedV3,
    /// The size needs more L1 table than QEMU allows, or more bytes than 64 bits count.
    #[error("The image size is too large (try using a larger cluster size)")]
    SizeTooLarge,
}

/// Checks `opts` as `qcow2_measure` does (cluster size, refcount width, the L1 limit for
/// `opts.create.size`) and returns the target's geometry, whose cluster size a
/// [`DataCount`] needs.
pub fn target_geometry(opts: &MeasureOptions) -> Result<Geometry, MeasureError> {
    // QEMU checks the cluster size, then the refcount width against the version; what
    // else creating refuses (lazy refcounts with compat=0.10, a backing file with
    // preallocation) is no matter for measuring.
    let mut layout = CreateOptions::new(0);
    layout.cluster_size = opts.create.cluster_size;
    layout.refcount_bits = opts.create.refcount_bits;
    layout.version = opts.create.version;
    let checked = geometry(&layout);
    if let Err(CreateError::ClusterSize) = checked {
        return Err(MeasureError::Create(CreateError::ClusterSize));
    }
    let cs = u64::from(opts.create.cluster_size);
    if opts.extended_l2 && cs < MIN_EXTENDED_L2_CLUSTER {
        return Err(MeasureError::ExtendedL2ClusterSize);
    }
    let mut geo = checked.map_err(|e| match e {
        CreateError::NeedsV3(_) => MeasureError::RefcountBitsNeedV3,
        other => MeasureError::Create(other),
    })?;
    if opts.extended_l2 {
        // 16-byte entries: half as many per table.
        geo.l2_bits -= 1;
    }
    // QEMU rounds with wrapping arithmetic: a size within a cluster of 2^64 passes as 0.
    let size = opts.create.size.wrapping_add(cs - 1) & !(cs - 1);
    if geo.l1_entries_for(size) * TABLE_ENTRY > MAX_L1_BYTES {
        return Err(MeasureError::SizeTooLarge);
    }
    Ok(geo)
}

/// Measures a qcow2 target for `opts`, created empty (`source` = `None`) or converted from
/// `source`.
pub fn measure(
    opts: &MeasureOptions,
    source: Option<&Source<'_>>,
) -> Result<Measurement, MeasureError> {
    let geo = target_geometry(opts)?;
    let size = source.map_or(opts.create.size, |s| s.size);
    let virtual_size = size
        .checked_next_multiple_of(geo.cluster_size())
        .ok_or(MeasureError::SizeTooLarge)?;
    let data = match (opts.create.preallocation, source) {
        (Preallocation::Falloc | Preallocation::Full, _) => virtual_size,
        (_, Some(_)) if opts.create.backing_file.is_some() => virtual_size,
        (_, Some(s)) => s.data,
        (_, None) => 0,
    };
    let fully_allocated = prealloc_size(&geo, virtual_size).ok_or(MeasureError::SizeTooLarge)?;
    let bitmaps = match source.and_then(|s| s.bitmaps) {
        Some(list) if opts.create.version >= 3 => Some(bitmaps_size(list, size, &geo)),
        _ => None,
    };
    Ok(Measurement {
        required: (fully_allocated - virtual_size)
            .checked_add(data)
            .ok_or(MeasureError::SizeTooLarge)?,
        fully_allocated,
        bitmaps,
    })
}

/// QEMU's `qcow2_calc_prealloc_size`: the file size of a fully allocated image of
/// `virtual_size` bytes (whole clusters), metadata included; `None` past 64 bits.
fn prealloc_size(geo: &Geometry, virtual_size: u64) -> Option<u64> {
    let cs = geo.cluster_size();
    let l2_tables = geo.l1_entries_for(virtual_size);
    let l1_bytes = geo.round_up(l2_tables * TABLE_ENTRY);
    let meta = cs + l2_tables * cs + l1_bytes;
    let with_data = meta.checked_add(virtual_size)?;
    let (blocks, table) = refcount_metadata_clusters(geo, with_data / cs);
    with_data.checked_add((blocks + table) * cs)
}

/// QEMU's `qcow2_refcount_metadata_size` (without its generous increase): the refcount
/// blocks and refcount table clusters that count `clusters` other clusters and themselves,
/// as the least fixed point.
pub fn refcount_metadata_clusters(geo: &Geometry, clusters: u64) -> (u64, u64) {
    let per_table_cluster = geo.cluster_size() / TABLE_ENTRY;
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let next_blocks = (clusters + blocks + table).div_ceil(geo.rb_entries());
        let next_table = next_blocks.div_ceil(per_table_cluster);
        if (next_blocks, next_table) == (blocks, table) {
            return (blocks, table);
        }
        (blocks, table) = (next_blocks, next_table);
    }
}

/// QEMU's `qcow2_get_persistent_dirty_bitmap_size`: every bitmap of an image of `size` bytes
/// fully allocated in `geo`'s clusters, with its table and directory entry.
fn bitmaps_size(bitmaps: &[BitmapInfo], size: u64, geo: &Geometry) -> u64 {
    let mut total = 0;
    let mut directory = 0;
    for b in bitmaps {
        let bits = size.div_ceil(b.granularity.max(1));
        let clusters = bits.div_ceil(8).div_ceil(geo.cluster_size());
        total += clusters * geo.cluster_size() + geo.round_up(clusters * BITMAP_TABLE_ENTRY);
        directory += (BITMAP_DIR_ENTRY + b.name.len() as u64).next_multiple_of(8);
    }
    total + geo.round_up(directory)
}

/// Counts a source's data in target clusters the way `qcow2_measure` walks the source's
/// block status: start at offset 0, ask for the extent there, feed it to
/// [`DataCount::extent`] and ask again where that says, until the source's end.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct DataCount {
    cluster_size: u64,
    bytes: u64,
}

impl DataCount {
    /// A count in clusters of `cluster_size` bytes (the target's, a power of two).
    pub fn new(cluster_size: u64) -> Self {
        Self {
            cluster_size,
            bytes: 0,
        }
    }

    /// Takes the extent of `len` bytes at `offset`; `data` when it is allocated and does not
    /// read as zero (QEMU: `DATA | ALLOCATED` without `ZERO`). A data extent counts from the
    /// start of its first target cluster to the end of its last; returns the offset to ask
    /// about next (past that last cluster, for data).
    pub fn extent(&mut self, offset: u64, len: u64, data: bool) -> u64 {
        let end = offset.saturating_add(len);
        if !data {
            return end;
        }
        let mask = self.cluster_size - 1;
        let end = end.saturating_add(mask) & !mask;
        self.bytes += end - (offset & !mask);
        end
    }

    /// The bytes counted so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(size: u64, cluster_size: u32, refcount_bits: u32) -> MeasureOptions {
        let mut o = MeasureOptions::new(size);
        o.create.cluster_size = cluster_size;
        o.create.refcount_bits = refcount_bits;
        o
    }

    fn sizes(o: &MeasureOptions) -> (u64, u64) {
        let m = measure(o, None).unwrap();
        (m.required, m.fully_allocated)
    }

    #[test]
    fn matches_qemu_img_without_a_source() {
        // Numbers printed by qemu-img 10.0.2 `measure -O qcow2 --size ...`.
        assert_eq!(sizes(&opts(1 << 30, 65536, 16)), (393216, 1074135040));
        assert_eq!(sizes(&opts(0, 65536, 16)), (196608, 196608));
        assert_eq!(sizes(&opts(1, 65536, 16)), (327680, 393216));
        assert_eq!(sizes(&opts(3 << 29, 65536, 16)), (458752, 1611071488));
        assert_eq!(sizes(&opts(1 << 30, 4096, 16)), (2637824, 1076379648));
        assert_eq!(sizes(&opts(1 << 30, 8192, 16)), (1343488, 1075085312));
        let mut o = opts(10 << 30, 2 << 20, 16);
        o.create.preallocation = Preallocation::Metadata;
        assert_eq!(sizes(&o).1, 10747904000);
        let mut o = opts(1 << 30, 65536, 16);
        o.extended_l2 = true;
        assert_eq!(sizes(&o), (524288, 1074266112));
        let o = opts(1 << 61, 2 << 20, 16);
        assert_eq!(sizes(&o), (10995174998016, 2305854004388691968));
    }

    #[test]
    fn preallocation_and_backing_files_count_every_cluster() {
        let mut o = opts(1 << 30, 65536, 16);
        o.create.preallocation = Preallocation::Full;
        let m = measure(&o, None).unwrap();
        assert_eq!(m.required, m.fully_allocated);
        o.create.backing_file = Some("base.qcow2".into());
        // Creating refuses a backing file with preallocation; measuring does not.
        assert_eq!(measure(&o, None).unwrap().required, m.fully_allocated);
        o.create.preallocation = Preallocation::Off;
        // Without a source a backing file changes nothing.
        assert_eq!(sizes(&o), (393216, 1074135040));
        let src = Source {
            size: 1 << 20,
            data: 0,
            bitmaps: None,
        };
        let m = measure(&o, Some(&src)).unwrap();
        assert_eq!(m.required, m.fully_allocated);
    }

    #[test]
    fn counts_source_data_in_target_clusters() {
        let mut c = DataCount::new(65536);
        assert_eq!(c.extent(0, 4096, true), 65536);
        assert_eq!(c.extent(65536, 100 << 10, false), 167936);
        assert_eq!(c.extent(167936, 1, true), 196608);
        assert_eq!(c.bytes(), 131072);
        // The 64 MiB image qemu-io wrote 100k+10k, zeroes at 1M..2M and one byte at 3M.
        let src = Source {
            size: 64 << 20,
            data: 131072,
            bitmaps: Some(&[]),
        };
        let m = measure(&MeasureOptions::new(0), Some(&src)).unwrap();
        assert_eq!(
            (m.required, m.fully_allocated, m.bitmaps),
            (458752, 67436544, Some(0))
        );
    }

    #[test]
    fn sizes_bitmaps_like_qemu() {
        let bitmaps = [
            BitmapInfo {
                name: "bm0".into(),
                granularity: 65536,
                in_use: false,
                auto: true,
                table_offset: 0,
                table_size: 0,
            },
            BitmapInfo {
                name: "bitmap-with-long-name".into(),
                granularity: 512,
                in_use: false,
                auto: true,
                table_offset: 0,
                table_size: 0,
            },
        ];
        let src = Source {
            size: 64 << 20,
            data: 0,
            bitmaps: Some(&bitmaps),
        };
        let m = measure(&MeasureOptions::new(0), Some(&src)).unwrap();
        assert_eq!(m.bitmaps, Some(327680));
        let m = measure(&opts(0, 512, 16), Some(&src)).unwrap();
        assert_eq!(m.bitmaps, Some(18432));
        let mut v2 = MeasureOptions::new(0);
        v2.create.version = 2;
        assert_eq!(measure(&v2, Some(&src)).unwrap().bitmaps, None);
    }

    #[test]
    fn refuses_what_qemu_refuses() {
        let err = |o: &MeasureOptions| measure(o, None).unwrap_err().to_string();
        assert_eq!(
            err(&opts(1, 3072, 16)),
            "Cluster size must be a power of two between 512 and 2048k"
        );
        assert_eq!(
            err(&opts(1, 65536, 3)),
            "Refcount width must be a power of two and may not exceed 64 bits"
        );
        let mut o = opts(1, 65536, 8);
        o.create.version = 2;
        assert!(err(&o).starts_with("Different refcount widths than 16 bits"));
        let mut o = opts(1, 4096, 16);
        o.extended_l2 = true;
        assert!(err(&o).starts_with("Extended L2 entries are only supported"));
        assert!(err(&opts(1 << 50, 512, 16)).starts_with("The image size is too large"));
        assert!(err(&opts(i64::MAX as u64, 2 << 20, 16)).starts_with("The image size is too"));
        // Lazy refcounts with compat 0.10 are not measure's business.
        let mut o = opts(1, 65536, 16);
        o.create.version = 2;
        o.create.lazy_refcounts = true;
        assert!(measure(&o, None).is_ok());
    }

    #[test]
    fn checks_only_the_option_size_with_a_source() {
        // qemu-img measures `-o size=<2^64-1>` with a source: the option's size wraps to 0.
        let mut o = MeasureOptions::new(u64::MAX);
        let src = Source {
            size: 64 << 20,
            data: 0,
            bitmaps: None,
        };
        assert_eq!(measure(&o, Some(&src)).unwrap().fully_allocated, 67436544);
        o.create.size = 1 << 50;
        o.create.cluster_size = 512;
        assert_eq!(
            measure(&o, Some(&src)).unwrap_err(),
            MeasureError::SizeTooLarge
        );
    }

    #[test]
    fn refcount_fixed_point_counts_itself() {
        let geo = Geometry::new(16, 4);
        assert_eq!(refcount_metadata_clusters(&geo, 1), (1, 1));
        // 32768 entries per block: 32767 clusters + the block + the table need two blocks.
        assert_eq!(refcount_metadata_clusters(&geo, 32767), (2, 1));
        let geo = Geometry::new(9, 6);
        // 64 entries per refblock, 64 per table cluster.
        assert_eq!(refcount_metadata_clusters(&geo, 62), (1, 1));
        assert_eq!(refcount_metadata_clusters(&geo, 63), (2, 1));
    }
}
