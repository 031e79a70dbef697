//! The interface a runtime implements to run the suite: open or create an image at a path and
//! drive it through a blocking [`Disk`].
//!
//! The interface is blocking on purpose: an async runtime implements it with `block_on`, so
//! one case list serves every runtime.

use std::fmt;
use std::path::Path;

use qcow2_proto::{
    BlockStatus, CheckReport, CreateOptions, ImageInfo, OpenError, Repair, RequestError,
};

/// What an instantiation can do; cases that need more print a skip line and return.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct Caps {
    /// Images live in real files at the given paths (needed to interoperate with qemu-img).
    pub real_files: bool,
    /// [`Disk::flush_count`] counts the host flushes (`fdatasync`) exactly.
    pub flush_count: bool,
    /// Write-through opens are honoured (every write durable before it completes).
    pub write_through: bool,
    /// Opens with [`Mode::direct`] bypass the host page cache (`O_DIRECT`).
    pub direct_io: bool,
    /// Steady-state requests are expected to perform no heap allocation in the engine and
    /// the runtime (checked by the counting allocator `instantiate!` installs).
    pub alloc_free: bool,
    /// [`Disk::run_batch`] runs its requests concurrently (all in flight at once).
    pub concurrent: bool,
}

/// One request of a concurrent batch ([`Disk::run_batch`]).
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum BatchOp {
    /// Read `len` bytes at `offset`.
    Read {
        /// Guest offset.
        offset: u64,
        /// Bytes.
        len: usize,
    },
    /// Write `data` at `offset`.
    Write {
        /// Guest offset.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Write zeroes.
    Zeroes {
        /// Guest offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// Let host space go.
        unmap: bool,
    },
    /// Discard whole clusters.
    Discard {
        /// Guest offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Flush.
    Flush,
}

/// When writes become durable, as QEMU's cache modes name it.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum Durability {
    /// Writes are durable after the next flush (`writeback`).
    #[default]
    WriteBack,
    /// Every write is durable before it completes (`writethrough`).
    WriteThrough,
}

/// How a case wants an image opened.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct Mode {
    /// Refuse writes; the file is never modified.
    pub read_only: bool,
    /// Write-back or write-through.
    pub durability: Durability,
    /// Bypass the host page cache (QEMU's `cache=none` / `directsync`).
    pub direct: bool,
    /// Read-only: share the image with a writer (qemu-img's `-U`) instead of being refused
    /// by its lock.
    pub force_share: bool,
    /// Open for [`Disk::check`] only, as `qemu-img check` opens (QEMU's check mode):
    /// images with the dirty or corrupt bit open, writable unless `read_only`, so that a
    /// repair can fix them; guest requests are refused.
    pub check_only: bool,
    /// Refuse to open backing files named inside the image (the untrusted-image policy).
    pub refuse_backing: bool,
    /// Host space allocated ahead ([`ImageConfig::grow_step`](qcow2_proto::ImageConfig));
    /// `None`: the runtime's default (on), `Some(0)`: off.
    pub grow_step: Option<u64>,
}

impl Mode {
    /// Writable, write-back.
    pub fn writable() -> Self {
        Self::default()
    }

    /// Read-only.
    pub fn read_only() -> Self {
        Self {
            read_only: true,
            ..Self::default()
        }
    }

    /// Read-only beside a writer (`-U`).
    pub fn shared_reader() -> Self {
        Self {
            read_only: true,
            force_share: true,
            ..Self::default()
        }
    }

    /// Writable, write-through.
    pub fn write_through() -> Self {
        Self {
            durability: Durability::WriteThrough,
            ..Self::default()
        }
    }

    /// For `check` only (`qemu-img check`): writable when `repair` is set, else read-only.
    pub fn check_only(repair: bool) -> Self {
        Self {
            read_only: !repair,
            check_only: true,
            ..Self::default()
        }
    }

    /// Writable, write-back, bypassing the host page cache (`cache=none`).
    pub fn direct() -> Self {
        Self {
            direct: true,
            ..Self::default()
        }
    }
}

/// A failure reported by a harness: the engine's typed errors, or anything else the runtime
/// ran into (file errors, a stalled engine), as text.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Error {
    /// The engine refused to open (or create) the image.
    Open(OpenError),
    /// A request failed.
    Request(RequestError),
    /// Anything else: host file errors, internal errors of the runtime.
    Other(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Open(e) => write!(f, "open failed: {e}"),
            Self::Request(e) => write!(f, "request failed: {e}"),
            Self::Other(e) => write!(f, "runtime error: {e}"),
        }
    }
}

impl std::error::Error for Error {}

/// A runtime under test: creates and opens images.
pub trait Harness {
    /// An open image.
    type Disk: Disk;

    /// The runtime's name, for skip lines and failure messages.
    fn name(&self) -> &'static str;

    /// What this instantiation can do.
    fn caps(&self) -> Caps;

    /// Creates (or truncates) `path` as a new image laid out by `options` and opens it.
    fn create(&self, path: &Path, options: &CreateOptions, mode: Mode)
        -> Result<Self::Disk, Error>;

    /// Opens the existing image at `path`.
    fn open(&self, path: &Path, mode: Mode) -> Result<Self::Disk, Error>;
}

/// An open image, driven one blocking request at a time.
pub trait Disk {
    /// Reads `buf.len()` guest bytes at `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), Error>;
    /// Writes `buf` at guest `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), Error>;
    /// Writes one cluster compressed (`offset` cluster aligned, `buf` a whole cluster or
    /// the image's partial last one, the cluster unallocated).
    fn write_compressed(&mut self, buf: &[u8], offset: u64) -> Result<(), Error>;
    /// Makes `len` guest bytes at `offset` read as zero; `unmap` lets host space go.
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), Error>;
    /// Discards the whole clusters inside the range.
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), Error>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> Result<(), Error>;
    /// Changes the virtual size; `shrink` consents to dropping data past the new end.
    fn resize(&mut self, size: u64, shrink: bool) -> Result<(), Error>;
    /// Describes the first extent of the guest range at `offset`.
    fn block_status(&mut self, offset: u64, len: u64) -> Result<BlockStatus, Error>;
    /// Checks the metadata, repairing what `repair` allows.
    fn check(&mut self, repair: Option<Repair>) -> Result<CheckReport, Error>;
    /// Virtual size in bytes.
    fn len(&self) -> u64;
    /// Whether the virtual size is zero.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// What the image is, as the engine reported it at open.
    fn info(&self) -> &ImageInfo;
    /// Host flushes (`fdatasync`) issued since the image was opened.
    fn flush_count(&self) -> u64;
    /// Writes everything back, marks the image clean and closes it.
    fn close(self) -> Result<(), Error>;
    /// Runs every request of `batch` at once (all in flight together, from separate tasks)
    /// and returns each one's result in order: the data for reads, empty otherwise. `None`
    /// when the runtime runs one request at a time (no [`Caps::concurrent`]).
    fn run_batch(&mut self, batch: &[BatchOp]) -> Option<Vec<Result<Vec<u8>, Error>>> {
        let _ = batch;
        None
    }
}

/// Skips the calling case (with a printed line) unless the harness has every named
/// capability.
///
/// ```text
/// require!(h, real_files, flush_count);
/// ```
#[macro_export]
macro_rules! require {
    ($h:expr, $($cap:ident),+ $(,)?) => {
        let caps = $crate::harness::Harness::caps($h);
        $(
            if !caps.$cap {
                println!(
                    "skipped: runtime `{}` lacks the capability `{}`",
                    $crate::harness::Harness::name($h),
                    stringify!($cap),
                );
                return;
            }
        )+
    };
}
