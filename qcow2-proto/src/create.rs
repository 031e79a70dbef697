//! The layout of a new image: header, refcount table, refcount blocks and L1, like qemu-img
//! lays them out (cluster 0 header, then reftable, refblocks and L1; a 64 KiB image has its
//! reftable at 0x10000, refblock 0 at 0x20000 and L1 at 0x30000).
//!
//! [`Image::create`](crate::Image::create) writes this layout through ops and then opens
//! the result, so preallocation and everything after run through the ordinary engine.

use zerocopy::IntoBytes;

use crate::config::CreateOptions;
use crate::error::CreateError;
use crate::format::extension::{self, default_feature_names};
use crate::format::header::{compat, Header, V2_HEADER_LEN, V3_HEADER_LEN};
use crate::format::{refcount, Geometry, MAX_L1_BYTES};

/// A fresh image: byte ranges to write, and the file length.
#[derive(Debug)]
pub struct InitialImage {
    /// Writes at host offsets, in any order.
    pub writes: Vec<(u64, Vec<u8>)>,
    /// The file length after the writes.
    pub file_len: u64,
    /// The virtual size (rounded up to 512 bytes).
    pub size: u64,
}

/// Checks `opts` like qemu-img does and returns the cluster geometry.
pub fn geometry(opts: &CreateOptions) -> Result<Geometry, CreateError> {
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err(CreateError::ClusterSize);
    }
    let rb = opts.refcount_bits;
    if !rb.is_power_of_two() || rb > 64 {
        return Err(CreateError::RefcountBits);
    }
    if opts.extended_l2 && opts.version < 3 {
        return Err(CreateError::ExtendedL2NeedsV3);
    }
    if opts.extended_l2 && cs < 1 << crate::format::MIN_EXTENDED_CLUSTER_BITS {
        return Err(CreateError::ExtendedL2ClusterSize);
    }
    if opts.backing_file.is_some()
        && opts.preallocation != crate::config::Preallocation::Off
        && !opts.extended_l2
    {
        // (With extended L2 entries, preallocated subclusters stay unallocated and read
        // through to the backing file.)
        return Err(CreateError::BackingWithPreallocation);
    }
    if opts.data_file_raw && opts.data_file.is_none() {
        return Err(CreateError::RawDataWithoutDataFile);
    }
    if opts.data_file_raw && opts.backing_file.is_some() {
        return Err(CreateError::BackingWithRawDataFile);
    }
    if opts.version == 2 {
        if opts.data_file.is_some() {
            return Err(CreateError::NeedsV3("data_file"));
        }
        if rb != 16 {
            return Err(CreateError::NeedsV3("refcount_bits other than 16"));
        }
        if opts.lazy_refcounts {
            return Err(CreateError::NeedsV3("lazy_refcounts"));
        }
        if opts.compression_type != crate::codec::CompressionType::Zlib {
            return Err(CreateError::NeedsV3("compression_type=zstd"));
        }
    }
    Ok(Geometry::with_l2(
        cs.trailing_zeros(),
        rb.trailing_zeros(),
        opts.extended_l2,
    ))
}

/// Lays out an empty image for `opts`.
pub fn initial_image(opts: &CreateOptions) -> Result<InitialImage, CreateError> {
    let geo = geometry(opts)?;
    let size = opts
        .size
        .checked_next_multiple_of(512)
        .ok_or(CreateError::SizeTooLarge)?;
    let l1_entries = geo.l1_entries_for(size);
    if l1_entries * 8 > MAX_L1_BYTES || size > i64::MAX as u64 {
        return Err(CreateError::SizeTooLarge);
    }
    let cs = geo.cluster_size();
    let l1_clusters = (l1_entries * 8).div_ceil(cs).max(1);
    // Fixed point: header + reftable + refblocks + L1 must all be counted by the refblocks.
    let (mut rt_clusters, mut rb_count) = (1u64, 1u64);
    loop {
        let total = 1 + rt_clusters + rb_count + l1_clusters;
        let rb_needed = total.div_ceil(geo.rb_entries());
        let rt_needed = (rb_needed * 8).div_ceil(cs);
        if rb_needed <= rb_count && rt_needed <= rt_clusters {
            break;
        }
        rb_count = rb_count.max(rb_needed);
        rt_clusters = rt_clusters.max(rt_needed);
    }
    let reftable_offset = cs;
    let refblocks_offset = reftable_offset + rt_clusters * cs;
    let l1_offset = refblocks_offset + rb_count * cs;
    let total_clusters = 1 + rt_clusters + rb_count + l1_clusters;

    let v3 = opts.version >= 3;
    let header = Header {
        version: if v3 { 3 } else { 2 },
        cluster_bits: geo.cluster_bits,
        size,
        l1_size: l1_entries as u32,
        l1_table_offset: l1_offset,
        refcount_table_offset: reftable_offset,
        refcount_table_clusters: rt_clusters as u32,
        compatible_features: if opts.lazy_refcounts {
            compat::LAZY_REFCOUNTS
        } else {
            0
        },
        refcount_order: geo.refcount_order,
        header_length: if v3 { V3_HEADER_LEN } else { V2_HEADER_LEN },
        compression_type: opts.compression_type.header_value(),
        incompatible_features: if opts.compression_type == crate::codec::CompressionType::Zlib {
            0
        } else {
            crate::format::header::incompat::COMPRESSION
        } | if opts.data_file.is_some() {
            crate::format::header::incompat::DATA_FILE
        } else {
            0
        } | if opts.extended_l2 {
            crate::format::header::incompat::EXTENDED_L2
        } else {
            0
        },
        autoclear_features: if opts.data_file_raw {
            crate::format::header::autoclear::RAW_DATA
        } else {
            0
        },
        ..Header::default()
    };
    let mut header = header;
    let mut cluster0 = vec![0u8; cs as usize];
    // Header extensions as QEMU orders them: backing format, data file name, feature names
    // (left out for small clusters to keep room), the end marker; then the backing file
    // name.
    let mut exts: Vec<(u32, Vec<u8>)> = Vec::new();
    if let Some(f) = &opts.backing_format {
        exts.push((extension::BACKING_FORMAT, f.as_bytes().to_vec()));
    }
    if let Some(f) = &opts.data_file {
        let room = cs as usize - header.header_length as usize - 16;
        if f.len() > room.min(crate::format::MAX_BACKING_NAME as usize) {
            return Err(CreateError::DataFileNameTooLong);
        }
        exts.push((extension::DATA_FILE, f.as_bytes().to_vec()));
    }
    if v3 && cs > 4096 {
        exts.push((
            extension::FEATURE_NAMES,
            default_feature_names().as_bytes().to_vec(),
        ));
    }
    let mut at = header.header_length as usize;
    for (kind, data) in exts {
        let end = at + 8 + data.len().next_multiple_of(8);
        if end + 8 > cluster0.len() {
            return Err(CreateError::BackingNameTooLong);
        }
        cluster0[at..at + 4].copy_from_slice(&kind.to_be_bytes());
        cluster0[at + 4..at + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
        cluster0[at + 8..at + 8 + data.len()].copy_from_slice(&data);
        at = end;
    }
    at += 8; // the end marker (zeros)
    if let Some(name) = &opts.backing_file {
        let n = name.as_bytes();
        if n.len() > crate::format::MAX_BACKING_NAME as usize || at + n.len() > cluster0.len() {
            return Err(CreateError::BackingNameTooLong);
        }
        cluster0[at..at + n.len()].copy_from_slice(n);
        header.backing_file_offset = at as u64;
        header.backing_file_size = n.len() as u32;
    }
    header.encode(&mut cluster0);
    // The whole first cluster is written, as qemu-img does (and qemu-img's heuristics on
    // allocated host space then see the same file).

    let mut reftable = vec![0u8; (rt_clusters * cs) as usize];
    for i in 0..rb_count {
        let off = refblocks_offset + i * cs;
        reftable[i as usize * 8..i as usize * 8 + 8].copy_from_slice(&off.to_be_bytes());
    }
    let mut refblocks = vec![0u8; (rb_count * cs) as usize];
    let per_block = geo.rb_entries();
    for c in 0..total_clusters {
        let block = (c / per_block) as usize;
        let slice = &mut refblocks[block * cs as usize..(block + 1) * cs as usize];
        refcount::set(slice, geo.refcount_order, (c % per_block) as usize, 1);
    }
    let l1 = vec![0u8; (l1_entries * 8) as usize];
    let file_len = l1_offset + (l1_entries * 8).max(8);
    let writes = vec![
        (0, cluster0),
        (reftable_offset, reftable),
        (refblocks_offset, refblocks),
        (l1_offset, l1),
    ];
    Ok(InitialImage {
        writes,
        file_len,
        size,
    })
}
