//! Hand-built images for the hostile-header cases, independent of the engine's own layout
//! code: a minimal valid image, and setters for every header field.
//!
//! ```text
//! cluster 0  header (+ extensions)
//! cluster 1  refcount table: one entry -> cluster 2
//! cluster 2  refcount block: clusters 0..=3 have refcount 1
//! cluster 3  L1 table (all zero: nothing allocated)
//! ```

use std::path::Path;

/// Byte offsets of the header fields (docs/interop/qcow2.txt, "Header").
pub mod field {
    /// `magic`, u32.
    pub const MAGIC: usize = 0;
    /// `version`, u32.
    pub const VERSION: usize = 4;
    /// `backing_file_offset`, u64.
    pub const BACKING_FILE_OFFSET: usize = 8;
    /// `backing_file_size`, u32.
    pub const BACKING_FILE_SIZE: usize = 16;
    /// `cluster_bits`, u32.
    pub const CLUSTER_BITS: usize = 20;
    /// `size`, u64.
    pub const SIZE: usize = 24;
    /// `crypt_method`, u32.
    pub const CRYPT_METHOD: usize = 32;
    /// `l1_size`, u32.
    pub const L1_SIZE: usize = 36;
    /// `l1_table_offset`, u64.
    pub const L1_TABLE_OFFSET: usize = 40;
    /// `refcount_table_offset`, u64.
    pub const REFCOUNT_TABLE_OFFSET: usize = 48;
    /// `refcount_table_clusters`, u32.
    pub const REFCOUNT_TABLE_CLUSTERS: usize = 56;
    /// `nb_snapshots`, u32.
    pub const NB_SNAPSHOTS: usize = 60;
    /// `snapshots_offset`, u64.
    pub const SNAPSHOTS_OFFSET: usize = 64;
    /// `incompatible_features`, u64 (v3).
    pub const INCOMPATIBLE: usize = 72;
    /// `compatible_features`, u64 (v3).
    pub const COMPATIBLE: usize = 80;
    /// `autoclear_features`, u64 (v3).
    pub const AUTOCLEAR: usize = 88;
    /// `refcount_order`, u32 (v3).
    pub const REFCOUNT_ORDER: usize = 96;
    /// `header_length`, u32 (v3).
    pub const HEADER_LENGTH: usize = 100;
}

/// The feature name table extension's type.
pub const FEATURE_NAME_TABLE: u32 = 0x6803_f857;

/// An image as bytes, with big-endian field setters.
#[derive(Clone, Debug)]
pub struct ImageBytes {
    /// The whole file.
    pub bytes: Vec<u8>,
    /// Cluster size the image was built with.
    pub cluster_size: u64,
}

impl ImageBytes {
    /// A minimal valid, empty image: version 2 or 3, 2^`cluster_bits` byte clusters, 16-bit
    /// refcounts, `size` virtual bytes (at most one L2 table's coverage).
    ///
    /// # Panics
    /// If `size` needs more than one L1 entry.
    pub fn valid(version: u32, cluster_bits: u32, size: u64) -> Self {
        let cs = 1u64 << cluster_bits;
        assert!(size <= cs * (cs / 8), "one L1 entry only");
        let mut me = Self {
            bytes: vec![0; 4 * cs as usize],
            cluster_size: cs,
        };
        me.set_u32(field::MAGIC, 0x5146_49fb);
        me.set_u32(field::VERSION, version);
        me.set_u32(field::CLUSTER_BITS, cluster_bits);
        me.set_u64(field::SIZE, size);
        me.set_u32(field::L1_SIZE, 1);
        me.set_u64(field::L1_TABLE_OFFSET, 3 * cs);
        me.set_u64(field::REFCOUNT_TABLE_OFFSET, cs);
        me.set_u32(field::REFCOUNT_TABLE_CLUSTERS, 1);
        if version >= 3 {
            me.set_u32(field::REFCOUNT_ORDER, 4);
            me.set_u32(field::HEADER_LENGTH, 112);
        }
        me.set_u64(cs as usize, 2 * cs);
        for c in 0..4 {
            let at = 2 * cs as usize + 2 * c;
            me.bytes[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
        }
        me
    }

    /// The default hostile base: version 3, 64 KiB clusters, 16 MiB.
    pub fn v3() -> Self {
        Self::valid(3, 16, 16 << 20)
    }

    /// Sets a big-endian u32 at byte `at`.
    pub fn set_u32(&mut self, at: usize, v: u32) -> &mut Self {
        self.bytes[at..at + 4].copy_from_slice(&v.to_be_bytes());
        self
    }

    /// Sets a big-endian u64 at byte `at`.
    pub fn set_u64(&mut self, at: usize, v: u64) -> &mut Self {
        self.bytes[at..at + 8].copy_from_slice(&v.to_be_bytes());
        self
    }

    /// Reads the big-endian u64 at byte `at`.
    pub fn u64_at(&self, at: usize) -> u64 {
        be64(&self.bytes, at as u64)
    }

    /// Puts a feature name table at byte 112 (after a 112-byte v3 header) naming
    /// `(kind, bit, name)` entries, followed by the end marker.
    pub fn feature_names(&mut self, entries: &[(u8, u8, &str)]) -> &mut Self {
        let at = 112;
        let len = 48 * entries.len();
        self.set_u32(at, FEATURE_NAME_TABLE);
        self.set_u32(at + 4, len as u32);
        for (i, &(kind, bit, name)) in entries.iter().enumerate() {
            let e = at + 8 + 48 * i;
            self.bytes[e] = kind;
            self.bytes[e + 1] = bit;
            self.bytes[e + 2..e + 2 + name.len()].copy_from_slice(name.as_bytes());
        }
        let end = at + 8 + len.next_multiple_of(8);
        self.bytes[end..end + 8].fill(0);
        self
    }

    /// Writes the file.
    ///
    /// # Panics
    /// On I/O errors.
    pub fn write(&self, path: &Path) {
        std::fs::write(path, &self.bytes).expect("writing a test image");
    }
}

/// The big-endian `u64` at byte `at` of an image's bytes.
pub fn be64(bytes: &[u8], at: u64) -> u64 {
    let at = at as usize;
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}
