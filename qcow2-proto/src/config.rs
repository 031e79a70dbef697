//! Configuration: how an image is opened, and how a new one is laid out.

/// When writes become durable.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum CacheMode {
    /// Writes are durable after the next [`Request::Flush`](crate::Request::Flush).
    #[default]
    WriteBack,
    /// Every write is durable when it completes (concurrent writes share one flush).
    WriteThrough,
}

/// Bounds on concurrency and request size; every pool is sized from these at open.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Limits {
    /// Requests in flight at once; more get [`SubmitError::Busy`](crate::SubmitError::Busy).
    pub max_requests: usize,
    /// Largest request length in bytes.
    pub max_request_bytes: u64,
    /// Longest backing chain opened (files below the image); a longer one, or a loop,
    /// fails the open with [`BackingError::TooDeep`](crate::BackingError::TooDeep).
    pub max_backing_depth: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_requests: 64,
            max_request_bytes: 1 << 30,
            max_backing_depth: 64,
        }
    }
}

/// How to open an image.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct ImageConfig {
    /// Refuse every write; the file is never modified.
    pub read_only: bool,
    /// Durability of writes.
    pub cache_mode: CacheMode,
    /// L2 cache budget in bytes; `None` = QEMU's default (cover the whole image, at most
    /// 32 MiB).
    pub l2_cache_bytes: Option<u64>,
    /// Refcount cache budget in bytes; `None` = four clusters, like QEMU.
    pub refcount_cache_bytes: Option<u64>,
    /// Concurrency and size limits.
    pub limits: Limits,
    /// The host file's length in bytes when it was opened (the runtime knows it; the core
    /// places new clusters from it).
    pub file_len: u64,
    /// Open images using features this engine cannot do I/O with (backing files,
    /// encryption, ...) for their metadata only; every data request then fails with
    /// [`RequestError::Unsupported`](crate::RequestError::Unsupported). Implies read-only.
    pub inspect_only: bool,
    /// Open for `check` only (QEMU's check mode): images with the dirty or corrupt bit open
    /// writable so that [`Request::Check`](crate::Request::Check) can repair them; every data
    /// request is refused.
    pub check_only: bool,
    /// Do not open the backing file the image names (for metadata work: `create -u`,
    /// `rebase -u`, `info`). Reads and copy-on-write that need its data fail with
    /// [`RequestError::Unsupported`](crate::RequestError::Unsupported)`(BackingFile)`.
    pub skip_backing: bool,
    /// Keep host space allocated ahead of the allocation point, in steps of this many
    /// bytes ([`IoKind::Allocate`](crate::IoKind::Allocate) past the end of the file),
    /// so that writes into new clusters do not extend the file one at a time (which
    /// filesystems serialize); the file is cut back to its last used cluster at
    /// [`Request::Close`](crate::Request::Close). A crash may leave the unused tail,
    /// which holds nothing. A step never exceeds the guest disk's size (rounded up to a
    /// MiB). 0: off (the default here; the runtimes turn it on).
    ///
    /// While it is on, a flush after allocating writes costs one `fdatasync` instead of
    /// two: the refcounts of the next clusters (an eighth of a step) are written ahead of
    /// their allocation, and data going into space never written before, for clusters
    /// that read as zero, need not be durable before the L2 entries that map it. A crash
    /// then leaves the clusters counted ahead and not yet used as leaked (`qemu-img check`
    /// reports them; `-r leaks` repairs them); a clean close leaves none.
    ///
    /// In-place writes that run sequentially get the same step of host space allocated
    /// ahead of them inside the file (`fallocate` changes no content): a
    /// metadata-preallocated image's clusters are holes until written, and the file
    /// system takes writes into allocated space faster (sequential 8 KiB writes at depth 1
    /// went from about 0.4x to about 1x of a raw file's). Creation with
    /// [`Preallocation::Metadata`] allocates nothing ahead: the new file is as sparse as
    /// qemu-img's.
    pub grow_step: u64,
}

/// Which internal snapshot to open, as qemu-img's `-l` names it.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum SnapshotRef {
    /// `snapshot.id=ID`.
    Id(String),
    /// `snapshot.name=NAME`.
    Name(String),
    /// `snapshot.id=ID,snapshot.name=NAME`: both must match.
    IdAndName(String, String),
    /// A bare `-l ID_OR_NAME`: the snapshot with this ID, else the one with this name.
    IdOrName(String),
}

impl SnapshotRef {
    /// Parses qemu-img's `-l` argument: `snapshot.id=ID`, `snapshot.name=NAME` (or both,
    /// comma-separated), or a bare ID or name.
    ///
    /// ```
    /// use qcow2_proto::SnapshotRef;
    /// assert_eq!(SnapshotRef::parse("snapshot.name=s1"), SnapshotRef::Name("s1".into()));
    /// assert_eq!(SnapshotRef::parse("2"), SnapshotRef::IdOrName("2".into()));
    /// ```
    pub fn parse(arg: &str) -> Self {
        if !arg.starts_with("snapshot.") {
            return Self::IdOrName(arg.to_owned());
        }
        let (mut id, mut name) = (None, None);
        for part in arg.split(',') {
            match part.split_once('=') {
                Some(("snapshot.id", v)) => id = Some(v.to_owned()),
                Some(("snapshot.name", v)) => name = Some(v.to_owned()),
                _ => return Self::IdOrName(arg.to_owned()),
            }
        }
        match (id, name) {
            (Some(i), Some(n)) => Self::IdAndName(i, n),
            (Some(i), None) => Self::Id(i),
            (None, Some(n)) => Self::Name(n),
            (None, None) => Self::IdOrName(arg.to_owned()),
        }
    }

    /// The snapshot it names among `snapshots` (ID first, for a bare argument).
    pub fn find<'a>(
        &self,
        snapshots: &'a [crate::info::SnapshotInfo],
    ) -> Option<&'a crate::info::SnapshotInfo> {
        let by = |f: &dyn Fn(&crate::info::SnapshotInfo) -> bool| snapshots.iter().find(|s| f(s));
        match self {
            Self::Id(i) => by(&|s| &s.id == i),
            Self::Name(n) => by(&|s| &s.name == n),
            Self::IdAndName(i, n) => by(&|s| &s.id == i && &s.name == n),
            Self::IdOrName(x) => by(&|s| &s.id == x).or_else(|| by(&|s| &s.name == x)),
        }
    }
}

impl ImageConfig {
    /// A writable, write-back configuration for a file of `file_len` bytes.
    pub fn new(file_len: u64) -> Self {
        Self {
            read_only: false,
            cache_mode: CacheMode::WriteBack,
            l2_cache_bytes: None,
            refcount_cache_bytes: None,
            limits: Limits::default(),
            file_len,
            inspect_only: false,
            check_only: false,
            skip_backing: false,
            grow_step: 0,
        }
    }
}

/// Host preallocation at create (and grow) time, as qemu-img's `preallocation=`.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum Preallocation {
    /// Allocate nothing.
    #[default]
    Off,
    /// Allocate L2 tables and map every cluster; data stays sparse.
    Metadata,
    /// Like `Metadata`, and allocate host space with `fallocate`.
    Falloc,
    /// Like `Metadata`, and write zeroes to every data cluster.
    Full,
}

/// How to lay out a new image, as qemu-img's `-o` options.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct CreateOptions {
    /// Virtual size in bytes (rounded up to 512 like qemu-img).
    pub size: u64,
    /// `cluster_size`: a power of two, 512..=2 MiB.
    pub cluster_size: u32,
    /// `compat`: 2 (0.10) or 3 (1.1).
    pub version: u32,
    /// `refcount_bits`: 1, 2, 4, 8, 16, 32 or 64 (16 only with version 2).
    pub refcount_bits: u32,
    /// `lazy_refcounts` (version 3 only).
    pub lazy_refcounts: bool,
    /// `preallocation`.
    pub preallocation: Preallocation,
    /// `backing_file` (`-b`): the name stored in the image, as given (relative names are
    /// resolved against the image's directory when it is opened).
    pub backing_file: Option<String>,
    /// `backing_fmt` (`-F`): `qcow2` or `raw`, stored in the backing-format extension
    /// (without it, opening probes the backing file).
    pub backing_format: Option<String>,
    /// `compression_type`: how compressed clusters are encoded (zstd needs version 3).
    pub compression_type: crate::codec::CompressionType,
    /// `data_file`: the external data file's name stored in the image (guest data goes
    /// there; relative names are resolved against the image's directory). The runtime
    /// creates the file; the engine sets its length to the virtual size. Version 3 only.
    pub data_file: Option<String>,
    /// `data_file_raw`: keep the data file a valid raw image of the disk (needs
    /// `data_file`, excludes a backing file; implies metadata preallocation, as in QEMU).
    pub data_file_raw: bool,
    /// `extended_l2`: 128-bit L2 entries with subcluster bitmaps (32 subclusters per
    /// cluster; version 3, clusters of at least 16 KiB).
    pub extended_l2: bool,
}

impl CreateOptions {
    /// The preallocation the image gets: with `data_file_raw`, at least the metadata (every
    /// cluster mapped 1:1 into the data file), like `qcow2_co_create`.
    pub fn effective_preallocation(&self) -> Preallocation {
        if self.data_file_raw && self.preallocation == Preallocation::Off {
            Preallocation::Metadata
        } else {
            self.preallocation
        }
    }

    /// qemu-img's defaults: v3, 64 KiB clusters, 16-bit refcounts.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            lazy_refcounts: false,
            preallocation: Preallocation::Off,
            backing_file: None,
            backing_format: None,
            compression_type: crate::codec::CompressionType::Zlib,
            data_file: None,
            data_file_raw: false,
            extended_l2: false,
        }
    }
}
