//! A blocking runtime for the [`qcow2_proto`] engine.
//!
//! Each call submits one request, then executes the engine's ops one after another with
//! positional reads and writes, `fdatasync` and `fallocate`, until the request is done. All
//! format logic lives in the engine; this crate only moves bytes.
//!
//! ```
//! use qcow2_sync::{CreateOptions, Image, OpenOptions};
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("disk.qcow2");
//! let mut img = Image::create(&path, &CreateOptions::new(64 << 20), &OpenOptions::default())?;
//! img.write_at(b"hello, qcow2", 1 << 20)?;
//! img.flush()?;
//! drop(img);
//!
//! let mut img = Image::open(&path, &OpenOptions::default())?;
//! let mut buf = [0u8; 12];
//! img.read_at(&mut buf, 1 << 20)?;
//! assert_eq!(&buf, b"hello, qcow2");
//! assert_eq!(img.len(), 64 << 20);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

mod chain;
pub mod exec;
mod file;
mod io_adapter;
mod lock;

use std::fs::{File, OpenOptions as FsOpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

pub use chain::{BackingPolicy, Chain};
pub use file::HostFile;
pub use io_adapter::ImageIo;
pub use lock::{lock_image, LockMode};
pub use qcow2_proto::{
    Allocation, AmendError, AmendOptions, BitmapData, BlockStatus, CheckReport, CreateOptions,
    ImageInfo, Limits, OpenError, Preallocation, Repair, RequestError, SnapshotRef,
};
use qcow2_proto::{
    CacheMode, Event, Feature, ImageConfig, IoError, IoOp, Outcome, Request, SubmitError, Target,
};

use exec::{Executor, Guest};

/// Largest piece of a guest buffer sent as one request (well below the engine's limit).
const MAX_PIECE: usize = 256 << 20;

/// QEMU's cache modes.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum Cache {
    /// Host page cache; writes durable on flush.
    #[default]
    WriteBack,
    /// Host page cache; every write durable before it completes.
    WriteThrough,
    /// O_DIRECT; writes durable on flush.
    None,
    /// O_DIRECT; every write durable before it completes.
    DirectSync,
    /// Host page cache; flushes are ignored (for scratch images).
    Unsafe,
}

impl Cache {
    /// Parses qemu's spelling (`writeback`, `writethrough`, `none`, `directsync`, `unsafe`).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "writeback" => Self::WriteBack,
            "writethrough" => Self::WriteThrough,
            "none" | "off" => Self::None,
            "directsync" => Self::DirectSync,
            "unsafe" => Self::Unsafe,
            _ => return None,
        })
    }

    /// Whether the mode bypasses the host page cache (`O_DIRECT`).
    pub fn direct(self) -> bool {
        matches!(self, Self::None | Self::DirectSync)
    }

    /// The engine's durability mode for this cache mode.
    pub fn mode(self) -> CacheMode {
        match self {
            Self::WriteThrough | Self::DirectSync => CacheMode::WriteThrough,
            _ => CacheMode::WriteBack,
        }
    }
}

/// How to open an image.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct OpenOptions {
    /// Open read-only.
    pub read_only: bool,
    /// Cache mode.
    pub cache: Cache,
    /// L2 cache budget in bytes (default: QEMU's).
    pub l2_cache_bytes: Option<u64>,
    /// Refcount cache budget in bytes (default: QEMU's).
    pub refcount_cache_bytes: Option<u64>,
    /// Open images that use features this engine cannot do I/O with (backing files,
    /// encryption, ...) for their metadata only (`info`); every data request then fails
    /// with `Unsupported`.
    pub inspect_only: bool,
    /// Open for [`Image::check`] only (like qemu-img check): images with the dirty or corrupt
    /// bit open writable so that a repair can fix them; data requests are refused.
    pub check_only: bool,
    /// Read-only opens only: take QEMU's locks sharing every permission, so that an image
    /// another process writes can be inspected (qemu-img's `-U`). Without it, an image in
    /// use by a writer (QEMU or ours) is refused with [`Error::Locked`].
    pub force_share: bool,
    /// Whether backing files named inside the image are opened (they always are
    /// read-only, locked as a reader, with the same cache mode).
    pub backing: BackingPolicy,
    /// Host space allocated ahead of new clusters, in steps of this many bytes (see
    /// [`ImageConfig::grow_step`]); `None`: [`DEFAULT_GROW_STEP`], `Some(0)`: off.
    pub grow_step: Option<u64>,
    /// The io_uring runtime only: the longest wait for a completion that a waiting caller
    /// polls for (yielding to its executor between looks) before it sleeps; the poll
    /// window adapts to the waits seen, as QEMU's `poll-max-ns` does. `None`: the runtime's
    /// default (`qcow2_uring::DEFAULT_POLL_MAX`, 256 µs); `Some(Duration::ZERO)`: never
    /// poll (least CPU, more latency). The other runtimes ignore it.
    pub poll_max: Option<std::time::Duration>,
    /// The io_uring runtime only: let the kernel interrupt a thread busy in user space to
    /// post the completions of the ops it submitted (an inter-processor interrupt each, as
    /// io_uring does by default). Off (the default), the ring is set up with
    /// `IORING_SETUP_COOP_TASKRUN`: such completions are posted when that thread next enters
    /// the kernel (a waiting thread is woken at once; a busy one at its next system call or
    /// timer tick), and a polling reaper posts its own as soon as the kernel flags them. On
    /// this project's 2-vCPU guest that took 8 KiB random I/O with a flush every 4th write
    /// at depth 1 from 0.84x to 0.96x a raw file (`qcow2_uring` crate docs). Set it where
    /// threads that submit to the image spin in user space without system calls on tickless
    /// (`nohz_full`) CPUs. The other runtimes ignore it.
    pub interrupt_submitters: bool,
}

/// The default step of host space allocated ahead of new clusters: 128 MiB (QEMU's
/// `preallocate` filter takes the same steps).
///
/// Not less: ext4 caps an unwritten extent at 32,767 blocks (128 MiB less 4 KiB), so a step
/// this large lays out at least two extents, which moves a fresh file's extent tree out of
/// the inode (it holds four). With a 64 MiB step a fresh image's file sat at exactly four
/// extents while its first step filled, and (as far as measurements show) each 8 KiB write
/// that converted its blocks pushed the tree out and folded it back: sequential writes at
/// depth 1 ran at 4.0-4.8k a second, against 10.4-11.2k with this step (BENCHMARKS.md,
/// "Host allocation").
pub const DEFAULT_GROW_STEP: u64 = 128 << 20;

impl OpenOptions {
    /// Read-only options.
    pub fn read_only() -> Self {
        Self {
            read_only: true,
            ..Self::default()
        }
    }
}

/// Errors of this runtime.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Opening or creating the file failed.
    #[error("{}: {source}", path.display())]
    File {
        /// The path.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The engine refused the image.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// A request failed.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The engine stopped producing work before finishing a request (a bug).
    #[error("internal error: the engine stalled")]
    Stalled,
    /// Another process (QEMU, or another user of this library) holds the image in a way that
    /// conflicts with this open.
    #[error("Failed to get {}\"{perm}\" lock\nIs another process using the image [{}]?", if *shared { "shared " } else { "" }, path.display())]
    Locked {
        /// The image.
        path: std::path::PathBuf,
        /// QEMU's name of the permission (`write`, `resize`, ...).
        perm: &'static str,
        /// The conflict is with a permission we would not share (rather than one we need).
        shared: bool,
    },
    /// A dirty image opened writable could not be repaired.
    #[error("the dirty image could not be repaired: {corruptions} corruptions remain; see `qcow2 check`")]
    DirtyRepair {
        /// Corruptions left after the repair.
        corruptions: u64,
    },
    /// The image was closed (or its driver stopped) before the request could run.
    #[error("the image is closed")]
    Closed,
    /// A backing file could not be opened.
    #[error("Could not open backing file '{name}' ({}): {source}", path.display())]
    BackingFile {
        /// The name stored in the image.
        name: String,
        /// Where that name led.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The external data file could not be opened.
    #[error("Could not open data file '{name}' ({}): {source}", path.display())]
    DataFile {
        /// The name stored in the image.
        name: String,
        /// Where that name led.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The image names an external data file and the open's policy refuses the files an
    /// image names.
    #[error(
        "The image needs its data file '{name}', and opening the files an image names was refused"
    )]
    DataFileRefused {
        /// The name stored in the image.
        name: String,
    },
    /// The image names a backing file and the open's policy refuses backing files.
    #[error("The image needs its backing file '{name}', and opening backing files was refused")]
    BackingRefused {
        /// The name stored in the image.
        name: String,
    },
    /// The image names a backing file that is not a plain file (another protocol, or a
    /// relative name for an image opened without a path).
    #[error("Backing file '{name}' cannot be opened: only plain files are supported (relative names need the image's path)")]
    BackingUnsupported {
        /// The name stored in the image.
        name: String,
    },
    /// The runtime could not set itself up (an async runtime's ring or driver).
    #[error("{what}: {source}")]
    Runtime {
        /// What was being set up.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

impl From<SubmitError> for Error {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Refused(r) => Self::Request(r),
            _ => Self::Stalled,
        }
    }
}

/// A qcow2 image opened with the blocking runtime.
#[derive(Debug)]
pub struct Image<F: HostFile = File> {
    engine: qcow2_proto::Image,
    file: F,
    chain: Chain,
    exec: exec::Executor,
    info: ImageInfo,
    closed: bool,
}

/// Opens (or creates and truncates) the host file at `path` as `options` say (`O_DIRECT`
/// for `none` and `directsync`) and takes QEMU's image locks on it. Shared by every runtime.
pub fn open_file(path: &Path, options: &OpenOptions, create: bool) -> Result<File, Error> {
    let write = create || !options.read_only;
    let mut o = FsOpenOptions::new();
    o.read(true).write(write);
    if create {
        o.create(true).truncate(true);
    }
    if options.cache.direct() {
        o.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
    }
    let file = o.open(path).map_err(|source| Error::File {
        path: path.to_owned(),
        source,
    })?;
    let mode = match (write, options.force_share) {
        (true, _) => LockMode::Write,
        (false, false) => LockMode::Read,
        (false, true) => LockMode::ForceShare,
    };
    lock_image(&file, path, mode)?;
    Ok(file)
}

/// The engine configuration for a host file opened with `options`.
pub fn engine_config<F: HostFile>(file: &F, options: &OpenOptions) -> Result<ImageConfig, Error> {
    let len = file.len().map_err(|source| Error::File {
        path: "<image>".into(),
        source,
    })?;
    let mut config = ImageConfig::new(len);
    config.read_only = options.read_only;
    config.cache_mode = options.cache.mode();
    config.l2_cache_bytes = options.l2_cache_bytes;
    config.refcount_cache_bytes = options.refcount_cache_bytes;
    config.inspect_only = options.inspect_only;
    config.check_only = options.check_only;
    config.skip_backing = options.backing == BackingPolicy::Skip;
    config.grow_step = options.grow_step.unwrap_or(DEFAULT_GROW_STEP);
    Ok(config)
}

/// Runs one op on the file it targets: the image, or a file of its backing chain.
pub fn run_op<F: HostFile>(
    exec: &mut Executor,
    file: &F,
    chain: &Chain,
    op: &mut IoOp,
    guest: &mut Guest<'_>,
) -> Result<usize, IoError> {
    match op.target {
        Target::Image => exec.run(file, op, guest),
        Target::Backing(d) => exec.run(chain.file(d).ok_or_else(chain::missing)?, op, guest),
        Target::DataFile => exec.run(chain.data_file().ok_or_else(chain::missing)?, op, guest),
        _ => Err(chain::missing()),
    }
}

/// What an open waits for.
enum Opening {
    Done(Box<ImageInfo>),
    Backing { depth: u32, name: String },
    DataFile { name: String },
}

/// Runs an opening (or creating) engine's plan to its end with blocking I/O, opening the
/// backing files it names into `chain` as `options` allow: the async runtimes open this
/// way too (opening reads a few tables, once).
pub fn drive_open<F: HostFile>(
    engine: &mut qcow2_proto::Image,
    file: &F,
    chain: &mut Chain,
    options: &OpenOptions,
    exec: &mut Executor,
) -> Result<ImageInfo, Error> {
    loop {
        let next = drive_until(engine, file, chain, exec, &mut Guest::None, |ev| match ev {
            Event::Opened(info) => Some(Ok(Opening::Done(info))),
            Event::OpenFailed(e) => Some(Err(e.into())),
            Event::OpenBacking { depth, name, .. } => Some(Ok(Opening::Backing { depth, name })),
            Event::OpenDataFile { name } => Some(Ok(Opening::DataFile { name })),
            _ => None,
        })?;
        match next {
            Opening::Done(info) => return Ok(*info),
            Opening::Backing { depth, name } => {
                let len = chain.open(depth, &name, options)?;
                engine.attach_backing(depth, len);
            }
            Opening::DataFile { name } => {
                let len = chain.open_data_file(&name, options)?;
                engine.attach_data_file(len);
            }
        }
    }
}

/// Runs one request to its end with blocking I/O.
fn drive_request<F: HostFile>(
    engine: &mut qcow2_proto::Image,
    file: &F,
    chain: &Chain,
    exec: &mut Executor,
    req: Request,
    guest: &mut Guest<'_>,
) -> Result<Outcome, Error> {
    let id = engine.submit(req)?;
    drive_until(engine, file, chain, exec, guest, |ev| match ev {
        Event::Done { req, result } if req == id => Some(result.map_err(Error::Request)),
        _ => None,
    })
}

/// Executes the engine's ops one after another until `done` turns an event into the result.
fn drive_until<F: HostFile, T>(
    engine: &mut qcow2_proto::Image,
    file: &F,
    chain: &Chain,
    exec: &mut Executor,
    guest: &mut Guest<'_>,
    mut done: impl FnMut(Event) -> Option<Result<T, Error>>,
) -> Result<T, Error> {
    loop {
        let mut progressed = false;
        while let Some(mut op) = engine.poll_io() {
            progressed = true;
            let r = run_op(exec, file, chain, &mut op, guest);
            engine.complete(op, r);
        }
        while let Some(ev) = engine.poll_event() {
            progressed = true;
            if let Some(result) = done(ev) {
                return result;
            }
        }
        if !progressed {
            return Err(Error::Stalled);
        }
    }
}

/// Opens the image in `file` with blocking I/O. A dirty image (lazy refcounts, not closed
/// cleanly) opened writable is repaired first, as QEMU does on open: its refcounts are
/// rebuilt in check mode and the dirty bit cleared. Every runtime opens this way.
pub fn open_engine<F: HostFile>(
    file: &F,
    chain: &mut Chain,
    options: &OpenOptions,
    exec: &mut Executor,
) -> Result<(qcow2_proto::Image, ImageInfo), Error> {
    let mut engine = qcow2_proto::Image::open(engine_config(file, options)?);
    match drive_open(&mut engine, file, chain, options, exec) {
        Ok(info) => Ok((engine, info)),
        Err(Error::Open(OpenError::Unsupported(Feature::DirtyImageRepair))) => {
            repair_dirty(file, options, exec)?;
            let mut engine = qcow2_proto::Image::open(engine_config(file, options)?);
            let info = drive_open(&mut engine, file, chain, options, exec)?;
            Ok((engine, info))
        }
        Err(e) => Err(e),
    }
}

/// Rebuilds the refcounts of a dirty image and clears its dirty bit.
fn repair_dirty<F: HostFile>(
    file: &F,
    options: &OpenOptions,
    exec: &mut Executor,
) -> Result<(), Error> {
    let check = OpenOptions {
        check_only: true,
        ..*options
    };
    let mut engine = qcow2_proto::Image::open(engine_config(file, &check)?);
    let mut chain = Chain::new(None);
    drive_open(&mut engine, file, &mut chain, &check, exec)?;
    let repair = Request::Check {
        repair: Some(Repair::All),
    };
    if let Outcome::Check(report) =
        drive_request(&mut engine, file, &chain, exec, repair, &mut Guest::None)?
    {
        if report.corruptions > 0 || report.check_errors > 0 {
            return Err(Error::DirtyRepair {
                corruptions: report.corruptions,
            });
        }
    }
    drive_request(
        &mut engine,
        file,
        &chain,
        exec,
        Request::Close,
        &mut Guest::None,
    )
    .map(drop)
}

impl Image<File> {
    /// Opens the image at `path`.
    pub fn open(path: impl AsRef<Path>, options: &OpenOptions) -> Result<Self, Error> {
        let path = path.as_ref();
        let file = open_file(path, options, false)?;
        Self::open_in(file, Chain::new(Some(path)), options)
    }

    /// Opens the contents of the internal snapshot `snapshot` of the image at `path`,
    /// read-only (what `qemu-img convert -l` reads): reads see the disk as it was when the
    /// snapshot was taken.
    pub fn open_snapshot(
        path: impl AsRef<Path>,
        snapshot: &SnapshotRef,
        options: &OpenOptions,
    ) -> Result<Self, Error> {
        let path = path.as_ref();
        let options = OpenOptions {
            read_only: true,
            ..*options
        };
        let file = open_file(path, &options, false)?;
        let config = engine_config(&file, &options)?;
        let engine = qcow2_proto::Image::open_snapshot(config, snapshot.clone());
        Self::finish_open(engine, file, Chain::new(Some(path)), &options)
    }

    /// Creates (or truncates) `path` as a new qcow2 image and opens it writable.
    pub fn create(
        path: impl AsRef<Path>,
        create: &CreateOptions,
        options: &OpenOptions,
    ) -> Result<Self, Error> {
        let path = path.as_ref();
        let file = open_file(path, options, true)?;
        let mut chain = Chain::new(Some(path));
        if let Some(name) = &create.data_file {
            chain.create_data_file(name, options)?;
        }
        let engine = qcow2_proto::Image::create(engine_config(&file, options)?, create.clone());
        Self::finish_open(engine, file, chain, options)
    }
}

impl<F: HostFile> Image<F> {
    /// Opens an image in an already opened host file (backing files named with relative
    /// names cannot be found: use [`Image::open`] for those, or `open_in`).
    pub fn from_file(file: F, options: &OpenOptions) -> Result<Self, Error> {
        Self::open_in(file, Chain::new(None), options)
    }

    /// Opens an image in an already opened host file, its backing files into `chain`
    /// (made with the image's path, for relative names).
    pub fn open_in(file: F, mut chain: Chain, options: &OpenOptions) -> Result<Self, Error> {
        let mut exec = Executor::for_cache(options.cache);
        let (engine, info) = open_engine(&file, &mut chain, options, &mut exec)?;
        Ok(Self {
            engine,
            file,
            chain,
            exec,
            info,
            closed: false,
        })
    }

    /// Formats an (empty) host file as a new image and opens it.
    pub fn create_in(
        file: F,
        create: &CreateOptions,
        options: &OpenOptions,
    ) -> Result<Self, Error> {
        let engine = qcow2_proto::Image::create(engine_config(&file, options)?, create.clone());
        Self::finish_open(engine, file, Chain::new(None), options)
    }

    fn finish_open(
        mut engine: qcow2_proto::Image,
        file: F,
        mut chain: Chain,
        options: &OpenOptions,
    ) -> Result<Self, Error> {
        let mut exec = Executor::for_cache(options.cache);
        let info = drive_open(&mut engine, &file, &mut chain, options, &mut exec)?;
        Ok(Self {
            engine,
            file,
            chain,
            exec,
            info,
            closed: false,
        })
    }

    fn run(&mut self, req: Request, mut guest: Guest<'_>) -> Result<Outcome, Error> {
        drive_request(
            &mut self.engine,
            &self.file,
            &self.chain,
            &mut self.exec,
            req,
            &mut guest,
        )
    }

    /// Reads `buf.len()` guest bytes at `offset`.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let mut done = 0;
        // Requests larger than the engine's limit go in pieces.
        for piece in buf.chunks_mut(MAX_PIECE) {
            let len = piece.len() as u64;
            self.run(
                Request::Read {
                    offset: offset + done,
                    len,
                },
                Guest::Read(piece),
            )?;
            done += len;
        }
        Ok(())
    }

    /// Writes `buf` at guest `offset`.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), Error> {
        let mut done = 0;
        for piece in buf.chunks(MAX_PIECE) {
            let len = piece.len() as u64;
            self.run(
                Request::Write {
                    offset: offset + done,
                    len,
                },
                Guest::Write(piece),
            )?;
            done += len;
        }
        Ok(())
    }

    /// Writes one cluster compressed (`qemu-img convert -c`): `offset` cluster aligned,
    /// `buf` a whole cluster (or the image's partial last one), the cluster unallocated.
    /// Written as it is when compressing does not pay.
    pub fn write_compressed(&mut self, buf: &[u8], offset: u64) -> Result<(), Error> {
        let len = buf.len() as u64;
        self.run(Request::WriteCompressed { offset, len }, Guest::Write(buf))
            .map(drop)
    }

    /// Makes `len` guest bytes at `offset` read as zero; `unmap` lets host space go.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), Error> {
        self.run(Request::WriteZeroes { offset, len, unmap }, Guest::None)
            .map(drop)
    }

    /// Discards whole clusters inside the range.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), Error> {
        self.run(Request::Discard { offset, len }, Guest::None)
            .map(drop)
    }

    /// Makes every completed write durable.
    pub fn flush(&mut self) -> Result<(), Error> {
        self.run(Request::Flush, Guest::None).map(drop)
    }

    /// Changes the virtual size; `shrink` consents to dropping data past the new end.
    pub fn resize(&mut self, size: u64, shrink: bool) -> Result<(), Error> {
        self.run(Request::Resize { size, shrink }, Guest::None)?;
        self.info.size = size;
        Ok(())
    }

    /// Describes the first extent of the guest range at `offset` (at most `len` bytes).
    pub fn block_status(&mut self, offset: u64, len: u64) -> Result<BlockStatus, Error> {
        match self.run(Request::BlockStatus { offset, len }, Guest::None)? {
            Outcome::Status(s) => Ok(s),
            _ => Err(Error::Stalled),
        }
    }

    /// Checks the metadata, repairing what `repair` allows.
    pub fn check(&mut self, repair: Option<Repair>) -> Result<CheckReport, Error> {
        match self.run(Request::Check { repair }, Guest::None)? {
            Outcome::Check(report) => Ok(*report),
            _ => Err(Error::Stalled),
        }
    }

    /// Drops every mapping: the whole image reads through to its backing file again
    /// (`qemu-img commit`'s emptying of the overlay).
    pub fn make_empty(&mut self) -> Result<(), Error> {
        self.run(Request::MakeEmpty, Guest::None).map(drop)
    }

    /// Writes a new backing file name (none: no backing file) and format into the header,
    /// durably, as `qemu-img rebase -u` does; the guest contents are the caller's business.
    /// The backing file opened now stays attached until the image is opened again.
    pub fn set_backing(&mut self, name: Option<&str>, format: Option<&str>) -> Result<(), Error> {
        let id = self.engine.set_backing(name, format)?;
        self.wait_done(id)?;
        self.info.backing_file = name.map(str::to_owned);
        self.info.backing_format = format.map(str::to_owned);
        Ok(())
    }

    /// Changes format options as `qemu-img amend -o` does (compat upgrade, lazy refcounts,
    /// `refcount_bits`, compat downgrade, in that order), durably. A refusal
    /// ([`RequestError::Amend`]) leaves the image as it
    /// was. [`info`](Self::info) shows the new options afterwards.
    pub fn amend(&mut self, options: AmendOptions) -> Result<(), Error> {
        let id = self.engine.amend(options)?;
        self.wait_and_refresh_info(id)
    }

    /// Creates internal snapshot `name` of the image's current contents (no VM state),
    /// dated now, durably, as `qemu-img snapshot -c` does.
    pub fn snapshot_create(&mut self, name: &str) -> Result<(), Error> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        // (QEMU dates snapshots in microseconds.)
        let date = (now.as_secs() as u32, now.subsec_micros() * 1000);
        let id = self.engine.snapshot_create(name, date, 0)?;
        self.wait_and_refresh_info(id)
    }

    /// Deletes the internal snapshot `which` names, durably, as `qemu-img snapshot -d`
    /// does (by ID, else by name, for a bare name).
    pub fn snapshot_delete(&mut self, which: &SnapshotRef) -> Result<(), Error> {
        let id = self.engine.snapshot_delete(which.clone())?;
        self.wait_and_refresh_info(id)
    }

    /// Reads the bits of persistent bitmap `name` (what a backup tool needs:
    /// [`BitmapData::dirty_ranges`]).
    pub fn read_bitmap(&mut self, name: &str) -> Result<BitmapData, Error> {
        let id = self.engine.read_bitmap(name)?;
        match self.wait_outcome(id)? {
            Outcome::Bitmap(b) => Ok(*b),
            _ => Err(Error::Stalled),
        }
    }

    /// Adds persistent bitmap `name`, empty, with `granularity` bytes per bit; `enabled`:
    /// it records every write from now on. Like every bitmap edit, it is made in memory
    /// and stored when the image is closed, as `qemu-img bitmap --add` does.
    ///
    /// ```
    /// # let dir = std::env::temp_dir().join(format!("qcow2-doc-bitmap-{}", std::process::id()));
    /// # std::fs::create_dir_all(&dir).unwrap();
    /// # let path = dir.join("disk.qcow2");
    /// use qcow2_sync::{CreateOptions, Image, OpenOptions};
    ///
    /// let mut img = Image::create(&path, &CreateOptions::new(1 << 20), &OpenOptions::default())?;
    /// img.bitmap_add("backup-0", 65536, true)?;
    /// img.write_at(&[1; 512], 3 << 16)?;
    /// img.close()?;
    ///
    /// let mut img = Image::open(&path, &OpenOptions { read_only: true, ..Default::default() })?;
    /// assert_eq!(img.read_bitmap("backup-0")?.dirty_ranges(), vec![(3 << 16, 65536)]);
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok::<(), qcow2_sync::Error>(())
    /// ```
    pub fn bitmap_add(&mut self, name: &str, granularity: u64, enabled: bool) -> Result<(), Error> {
        let r = self.engine.bitmap_add(name, granularity, enabled);
        self.bitmap_edit(r)
    }

    /// Removes persistent bitmap `name` (stored at close; see [`bitmap_add`](Self::bitmap_add)).
    pub fn bitmap_remove(&mut self, name: &str) -> Result<(), Error> {
        let r = self.engine.bitmap_remove(name);
        self.bitmap_edit(r)
    }

    /// Clears persistent bitmap `name` (stored at close).
    pub fn bitmap_clear(&mut self, name: &str) -> Result<(), Error> {
        let r = self.engine.bitmap_clear(name);
        self.bitmap_edit(r)
    }

    /// Enables or disables persistent bitmap `name` (stored at close).
    pub fn bitmap_enable(&mut self, name: &str, enabled: bool) -> Result<(), Error> {
        let r = self.engine.bitmap_enable(name, enabled);
        self.bitmap_edit(r)
    }

    /// Merges `source`'s dirty ranges (read with [`read_bitmap`](Self::read_bitmap), from
    /// this image or another of the same size) into persistent bitmap `name` (stored at
    /// close).
    pub fn bitmap_merge(&mut self, name: &str, source: &BitmapData) -> Result<(), Error> {
        let r = self.engine.bitmap_merge(name, source);
        self.bitmap_edit(r)
    }

    /// Reverts the image to the internal snapshot `which` names (which stays), durably,
    /// as `qemu-img snapshot -a` does.
    pub fn snapshot_apply(&mut self, which: &SnapshotRef) -> Result<(), Error> {
        let id = self.engine.snapshot_apply(which.clone())?;
        self.wait_and_refresh_info(id)
    }

    /// Drives the engine until request `id` (a snapshot operation or an amend, which may
    /// change the size, the version or `refcount_bits`) is done, then takes the
    /// engine's info anew.
    fn wait_and_refresh_info(&mut self, id: qcow2_proto::ReqId) -> Result<(), Error> {
        self.wait_done(id)?;
        // (An apply may change the size too.)
        self.refresh_info();
        Ok(())
    }

    /// Takes the engine's view of the image (snapshots, bitmaps, size) after a change.
    fn refresh_info(&mut self) {
        if let Some(info) = self.engine.info() {
            self.info = info.clone();
        }
    }

    /// A bitmap edit's result, with the listing brought up to date.
    fn bitmap_edit(&mut self, r: Result<(), RequestError>) -> Result<(), Error> {
        self.refresh_info();
        Ok(r?)
    }

    /// Drives the engine until request `id` (submitted through an engine method) is done.
    fn wait_done(&mut self, id: qcow2_proto::ReqId) -> Result<(), Error> {
        self.wait_outcome(id).map(drop)
    }

    /// Drives the engine until request `id` is done; its outcome.
    fn wait_outcome(&mut self, id: qcow2_proto::ReqId) -> Result<Outcome, Error> {
        let mut outcome = None;
        drive_until(
            &mut self.engine,
            &self.file,
            &self.chain,
            &mut self.exec,
            &mut Guest::None,
            |ev| match ev {
                Event::Done { req, result } if req == id => Some(match result {
                    Ok(o) => {
                        outcome = Some(o);
                        Ok(())
                    }
                    Err(e) => Err(Error::Request(e)),
                }),
                _ => None,
            },
        )?;
        outcome.ok_or(Error::Stalled)
    }

    /// Counts the host clusters below byte `end` that the image accounts as in use, up to
    /// `limit` (qemu-img's metadata-preallocation test needs it).
    pub fn count_used_clusters(&mut self, end: u64, limit: u64) -> Result<u64, Error> {
        match self.run(Request::CountRefcounted { end, limit }, Guest::None)? {
            Outcome::Count(n) => Ok(n),
            _ => Err(Error::Stalled),
        }
    }

    /// Virtual size in bytes.
    pub fn len(&self) -> u64 {
        self.info.size
    }

    /// Whether the virtual size is zero.
    pub fn is_empty(&self) -> bool {
        self.info.size == 0
    }

    /// What the image is.
    pub fn info(&self) -> &ImageInfo {
        &self.info
    }

    /// Paths of the backing files opened, top down (depth 1 first).
    pub fn backing_paths(&self) -> Vec<&Path> {
        self.chain.paths().collect()
    }

    /// The host file.
    pub fn file(&self) -> &F {
        &self.file
    }

    /// Bytes copied through aligned bounce buffers for O_DIRECT so far.
    pub fn bounced_bytes(&self) -> u64 {
        self.exec.bounced
    }

    /// fdatasync calls issued so far.
    pub fn flush_count(&self) -> u64 {
        self.exec.syncs
    }

    /// A `Read + Write + Seek` view of the guest disk.
    pub fn io(&mut self) -> ImageIo<'_, F> {
        ImageIo::new(self)
    }

    /// Writes everything back, marks the image clean and closes it.
    pub fn close(mut self) -> Result<(), Error> {
        self.close_inner()
    }

    fn close_inner(&mut self) -> Result<(), Error> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        if self.info.read_only {
            return Ok(());
        }
        self.run(Request::Close, Guest::None).map(drop)
    }
}

impl<F: HostFile> Drop for Image<F> {
    fn drop(&mut self) {
        let _ = self.close_inner();
    }
}
