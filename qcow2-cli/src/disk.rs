//! An image of either format behind one interface: opening (with probing by magic only when
//! no format is given), guest I/O, and block status in qemu's terms.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use qcow2_sync::{lock_image, Allocation, Cache, Image, LockMode, OpenOptions};

use crate::error::{strerror, CliError};
use crate::host;
use crate::prealloc::detect_metadata_preallocation;
use crate::raw::RawDisk;

/// An image format this tool reads and writes.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Format {
    /// qcow2, through the engine.
    Qcow2,
    /// A raw file.
    Raw,
}

impl Format {
    /// Parses `-f`/`-O` values.
    pub fn parse(s: &str) -> Result<Self, CliError> {
        match s {
            "qcow2" => Ok(Self::Qcow2),
            "raw" => Ok(Self::Raw),
            _ => Err(CliError::new(format!(
                "Unknown file format '{s}' (this tool supports qcow2 and raw)"
            ))),
        }
    }

    /// qemu's driver name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
        }
    }
}

/// The qcow2 magic, `QFI\xfb`.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Describes why `path` could not be opened, like qemu (which names the file twice: once
/// for the image, once for its protocol layer).
pub fn open_error(path: &Path, e: &std::io::Error) -> CliError {
    let p = path.display();
    CliError::new(format!(
        "Could not open '{p}': Could not open '{p}': {}",
        strerror(e)
    ))
}

/// Guesses the format by magic only: qcow2 if the file starts with `QFI\xfb`, else raw.
pub fn probe(path: &Path) -> Result<Format, CliError> {
    let mut f = File::open(path).map_err(|e| open_error(path, &e))?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match f.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(open_error(path, &e)),
        }
    }
    Ok(if got == 4 && magic == QCOW2_MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// qemu's warning when a writable image is probed as raw.
pub fn raw_probe_warning(path: &Path) -> String {
    format!(
        "WARNING: Image format was not specified for '{}' and probing guessed raw.\n         \
         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         \
         Specify the 'raw' format explicitly to remove the restrictions.",
        path.display()
    )
}

/// The format to open `path` with: the given one, or the probed one (warning on stderr when
/// a writable open guesses raw; writes to its first sector are then refused).
pub fn resolve_format(
    path: &Path,
    given: Option<&str>,
    writable: bool,
) -> Result<(Format, bool), CliError> {
    match given {
        Some(f) => Ok((Format::parse(f)?, false)),
        None => {
            let f = probe(path)?;
            let guessed_raw = f == Format::Raw;
            if guessed_raw && writable {
                eprintln!("{}", raw_probe_warning(path));
            }
            Ok((f, guessed_raw && writable))
        }
    }
}

/// How to open an image.
#[derive(Clone, Copy, Debug, Default)]
pub struct DiskOptions {
    /// Open read-only.
    pub read_only: bool,
    /// Cache mode.
    pub cache: Cache,
    /// Read-only opens share the image with writers (`-U`).
    pub force_share: bool,
}

/// What a guest range is, in the flags `qemu-img map` prints.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Status {
    /// Length of the extent in bytes.
    pub len: u64,
    /// Allocated in this image (qemu's `present`).
    pub present: bool,
    /// Reads as zero.
    pub zero: bool,
    /// Data is stored.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset, when the range maps to the host file directly.
    pub offset: Option<u64>,
    /// Where in the backing chain the range was found (0: the image itself).
    pub depth: u32,
}

enum Inner {
    Qcow2(Box<Image>),
    Raw(RawDisk),
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Qcow2(_) => f.write_str("Qcow2"),
            Self::Raw(_) => f.write_str("Raw"),
        }
    }
}

/// An open image of either format.
#[derive(Debug)]
pub struct Disk {
    path: PathBuf,
    format: Format,
    inner: Inner,
    /// qemu's metadata-preallocation verdict, computed on the first block-status query.
    prealloc: Option<bool>,
    /// A plain handle on the host file for `lseek` queries.
    host: Option<File>,
}

/// Describes why the qcow2 image at `path` could not be opened, like qemu-img.
pub fn qcow2_open_error(path: &Path, e: &qcow2_sync::Error) -> CliError {
    let p = path.display();
    match e {
        qcow2_sync::Error::File { source, .. } => open_error(path, source),
        qcow2_sync::Error::BackingFile {
            path: backing,
            source,
            ..
        } => CliError::new(format!(
            "Could not open '{p}': Could not open backing file: Could not open '{}': {}",
            backing.display(),
            strerror(source)
        )),
        // (qemu-img names the data file alone.)
        qcow2_sync::Error::DataFile {
            path: data, source, ..
        } => CliError::new(format!(
            "Could not open '{p}': Could not open '{}': {}",
            data.display(),
            strerror(source)
        )),
        qcow2_sync::Error::Open(qcow2_sync::OpenError::Backing { reason, .. }) => CliError::new(
            format!("Could not open '{p}': Could not open backing file: {reason}"),
        ),
        _ => CliError::new(format!("Could not open '{p}': {}", engine_error(e))),
    }
}

/// Turns a runtime error into a message.
pub fn engine_error(e: &qcow2_sync::Error) -> String {
    match e {
        qcow2_sync::Error::File { source, .. } => strerror(source),
        other => other.to_string(),
    }
}

impl Disk {
    /// Opens `path` as `format`.
    pub fn open(
        path: &Path,
        format: Format,
        opts: DiskOptions,
        protect_sector0: bool,
    ) -> Result<Self, CliError> {
        Self::open_with(path, format, opts, protect_sector0, false)
    }

    /// Opens `path` as `format`; `inspect_only` lets the engine open images whose features
    /// it cannot do I/O with, for metadata queries.
    pub fn open_with(
        path: &Path,
        format: Format,
        opts: DiskOptions,
        protect_sector0: bool,
        inspect_only: bool,
    ) -> Result<Self, CliError> {
        Self::open_mode(path, format, opts, protect_sector0, inspect_only)
    }

    fn open_mode(
        path: &Path,
        format: Format,
        opts: DiskOptions,
        protect_sector0: bool,
        inspect_only: bool,
    ) -> Result<Self, CliError> {
        let inner = match format {
            Format::Qcow2 => {
                let o = OpenOptions {
                    read_only: opts.read_only || inspect_only,
                    cache: opts.cache,
                    inspect_only,
                    force_share: opts.force_share,
                    ..OpenOptions::default()
                };
                let img = Image::open(path, &o).map_err(|e| qcow2_open_error(path, &e))?;
                Inner::Qcow2(Box::new(img))
            }
            Format::Raw => {
                let raw = RawDisk::open(path, opts.read_only, opts.cache, protect_sector0)
                    .map_err(|e| open_error(path, &e))?;
                let mode = match (opts.read_only, opts.force_share) {
                    (false, _) => LockMode::Write,
                    (true, false) => LockMode::Read,
                    (true, true) => LockMode::ForceShare,
                };
                lock_image(raw.file(), path, mode).map_err(|e| qcow2_open_error(path, &e))?;
                Inner::Raw(raw)
            }
        };
        Ok(Self {
            path: path.to_owned(),
            format,
            inner,
            prealloc: None,
            host: None,
        })
    }

    /// Opens the internal snapshot `snapshot` of the qcow2 image at `path`, read-only.
    pub fn open_snapshot(
        path: &Path,
        format: Format,
        snapshot: &qcow2_sync::SnapshotRef,
        opts: DiskOptions,
    ) -> Result<Self, CliError> {
        if format != Format::Qcow2 {
            return Err(CliError::new(format!(
                "Failed to load snapshot: Block format '{}' used by device '' does not support temporarily loading internal snapshots",
                format.name()
            )));
        }
        let o = OpenOptions {
            read_only: true,
            cache: opts.cache,
            force_share: opts.force_share,
            ..OpenOptions::default()
        };
        let img = Image::open_snapshot(path, snapshot, &o).map_err(|e| match e {
            qcow2_sync::Error::Open(qcow2_sync::OpenError::SnapshotNotFound) => {
                CliError::new("Failed to load snapshot: Can't find snapshot")
            }
            e => qcow2_open_error(path, &e),
        })?;
        Ok(Self::from_image(path, img))
    }

    /// Wraps an already open qcow2 image.
    pub fn from_image(path: &Path, img: Image) -> Self {
        Self {
            path: path.to_owned(),
            format: Format::Qcow2,
            inner: Inner::Qcow2(Box::new(img)),
            prealloc: None,
            host: None,
        }
    }

    /// The qcow2 image, if it is one.
    pub fn qcow2(&mut self) -> Option<&mut Image> {
        match &mut self.inner {
            Inner::Qcow2(img) => Some(img),
            Inner::Raw(_) => None,
        }
    }

    /// The raw image, if it is one.
    pub fn raw(&mut self) -> Option<&mut RawDisk> {
        match &mut self.inner {
            Inner::Raw(r) => Some(r),
            Inner::Qcow2(_) => None,
        }
    }

    /// Virtual size in bytes.
    pub fn len(&self) -> u64 {
        match &self.inner {
            Inner::Qcow2(img) => img.len(),
            Inner::Raw(r) => r.len(),
        }
    }

    /// Reads guest bytes.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), String> {
        match &mut self.inner {
            Inner::Qcow2(img) => img.read_at(buf, offset).map_err(|e| engine_error(&e)),
            Inner::Raw(r) => r.read_at(buf, offset).map_err(|e| strerror(&e)),
        }
    }

    /// Writes guest bytes.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), String> {
        match &mut self.inner {
            Inner::Qcow2(img) => img.write_at(buf, offset).map_err(|e| engine_error(&e)),
            Inner::Raw(r) => r.write_at(buf, offset).map_err(|e| strerror(&e)),
        }
    }

    /// Makes a range read as zero.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), String> {
        match &mut self.inner {
            Inner::Qcow2(img) => img
                .write_zeroes(offset, len, unmap)
                .map_err(|e| engine_error(&e)),
            Inner::Raw(r) => r.write_zeroes(offset, len, unmap).map_err(|e| strerror(&e)),
        }
    }

    /// Discards a range.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), String> {
        match &mut self.inner {
            Inner::Qcow2(img) => img.discard(offset, len).map_err(|e| engine_error(&e)),
            Inner::Raw(r) => r.discard(offset, len).map_err(|e| strerror(&e)),
        }
    }

    /// Changes the virtual size (a raw file's length; a qcow2 image's header size; growing
    /// only: data past a smaller size would be refused).
    pub fn resize(&mut self, size: u64) -> Result<(), String> {
        match &mut self.inner {
            Inner::Qcow2(img) => img.resize(size, false).map_err(|e| engine_error(&e)),
            Inner::Raw(r) => r.resize(size).map_err(|e| strerror(&e)),
        }
    }

    /// Makes completed writes durable.
    pub fn flush(&mut self) -> Result<(), String> {
        match &mut self.inner {
            Inner::Qcow2(img) => img.flush().map_err(|e| engine_error(&e)),
            Inner::Raw(r) => r.flush().map_err(|e| strerror(&e)),
        }
    }

    /// `fdatasync` calls issued so far.
    pub fn flush_count(&self) -> u64 {
        match &self.inner {
            Inner::Qcow2(img) => img.flush_count(),
            Inner::Raw(r) => r.flush_count(),
        }
    }

    /// Writes everything back and closes the image.
    pub fn close(self) -> Result<(), String> {
        match self.inner {
            Inner::Qcow2(img) => img.close().map_err(|e| engine_error(&e)),
            Inner::Raw(mut r) => r.flush().map_err(|e| strerror(&e)),
        }
    }

    fn host_file(&mut self) -> Option<&File> {
        if self.host.is_none() {
            self.host = File::open(&self.path).ok();
        }
        self.host.as_ref()
    }

    /// The extent at `offset` (at most `max` bytes, `max` > 0), with qemu's flags: for
    /// qcow2 the engine's block status, refined by the host file's holes for data clusters
    /// when the image looks metadata-preallocated; for raw, the file's data and holes.
    pub fn status(&mut self, offset: u64, max: u64) -> Result<Status, String> {
        match self.format {
            Format::Raw => Ok(self.raw_status(offset, max)),
            Format::Qcow2 => self.qcow2_status(offset, max),
        }
    }

    fn raw_status(&mut self, offset: u64, max: u64) -> Status {
        let file_len = match &self.inner {
            Inner::Raw(r) => r.file_len(),
            Inner::Qcow2(_) => 0,
        };
        let ext = self
            .host_file()
            .and_then(|f| host::extent_at(f, file_len, offset, max));
        let (len, hole) = match ext {
            Some(e) => (e.len, e.hole),
            None => (max, false),
        };
        Status {
            len,
            present: true,
            zero: hole,
            data: !hole,
            compressed: false,
            offset: Some(offset),
            depth: 0,
        }
    }

    /// The file of the layer at `depth` of the backing chain (0: the image), as qemu names
    /// it in `map`.
    pub fn layer_name(&self, depth: u32) -> String {
        match (&self.inner, depth) {
            (Inner::Qcow2(img), d) if d > 0 => img
                .backing_paths()
                .get(d as usize - 1)
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            _ => self.path.display().to_string(),
        }
    }

    fn qcow2_status(&mut self, offset: u64, max: u64) -> Result<Status, String> {
        let Inner::Qcow2(img) = &mut self.inner else {
            unreachable!("qcow2 status of a raw image")
        };
        let bs = img
            .block_status(offset, max)
            .map_err(|e| engine_error(&e))?;
        let len = bs.len.clamp(1, max);
        let depth = bs.depth;
        let layer = (depth > 0)
            .then(|| {
                img.backing_paths()
                    .get(depth as usize - 1)
                    .map(|p| p.to_path_buf())
            })
            .flatten();
        let mut st = match bs.allocation {
            Allocation::Unallocated => Status {
                len,
                present: false,
                zero: true,
                data: false,
                compressed: false,
                offset: None,
                depth: 0,
            },
            // (qemu-img map shows the reserved host offset.)
            Allocation::Reserved { host } => Status {
                len,
                present: false,
                zero: true,
                data: false,
                compressed: false,
                offset: Some(host),
                depth: 0,
            },
            Allocation::Zero { host } => Status {
                len,
                present: true,
                zero: true,
                data: false,
                compressed: false,
                offset: host,
                depth: 0,
            },
            Allocation::Data { host } => Status {
                len,
                present: true,
                zero: false,
                data: true,
                compressed: false,
                offset: Some(host),
                depth: 0,
            },
            Allocation::Compressed => Status {
                len,
                present: true,
                zero: false,
                data: true,
                compressed: true,
                offset: None,
                depth: 0,
            },
            _ => Status {
                len,
                present: true,
                zero: false,
                data: true,
                compressed: false,
                offset: None,
                depth: 0,
            },
        };
        st.depth = depth;
        match (layer, st.offset) {
            (None, Some(host_offset)) if st.data && !st.compressed => {
                self.refine_by_host(&mut st, host_offset)
            }
            (Some(path), Some(at)) if st.data && probe(&path).ok() == Some(Format::Raw) => {
                // A raw file in the chain: its holes read as zero, as qemu reports them.
                if let Ok(f) = File::open(&path) {
                    let file_len = f.metadata().map_or(0, |m| m.len());
                    if let Some(ext) = host::extent_at(&f, file_len, at, st.len) {
                        st.len = ext.len.min(st.len);
                        st.zero = ext.hole;
                        st.data = !ext.hole;
                    }
                }
            }
            _ => {}
        }
        Ok(st)
    }

    /// qemu's `BDRV_BLOCK_RECURSE`: for metadata-preallocated images, ask the host file
    /// whether a data extent is a hole (then it reads as zero) and stop at its boundary.
    fn refine_by_host(&mut self, st: &mut Status, host_offset: u64) {
        if self.prealloc.is_none() {
            let verdict = match &mut self.inner {
                Inner::Qcow2(img) => detect_metadata_preallocation(img).unwrap_or(false),
                _ => false,
            };
            self.prealloc = Some(verdict);
        }
        if self.prealloc != Some(true) {
            return;
        }
        let Some(file) = self.host_file() else { return };
        let Ok(meta) = file.metadata() else { return };
        let Some(ext) = host::extent_at(file, meta.len(), host_offset, st.len) else {
            return;
        };
        if ext.eof && ext.hole {
            st.zero = true;
        } else {
            st.len = ext.len.min(st.len);
            st.zero |= ext.hole;
        }
    }
}

/// Where a backing file name leads, as qemu resolves it for the image at `image`
/// (`bdrv_get_full_backing_filename_from_filename`): absolute names stay, relative ones are
/// taken from the image's directory.
pub fn backing_path(image: &Path, name: &str) -> PathBuf {
    match Path::new(name) {
        p if p.is_absolute() => p.to_owned(),
        p => image.parent().unwrap_or(Path::new("")).join(p),
    }
}

/// Opens a backing file given on the command line, as `format` or probed by magic; the
/// error is qemu's message for it, which does not name the file a second time.
pub fn open_backing(
    path: &Path,
    format: Option<Format>,
    opts: DiskOptions,
    inspect_only: bool,
) -> Result<Disk, String> {
    let named = format!("Could not open '{}': ", path.display());
    let inner = |e: CliError| match e.message.strip_prefix(&named) {
        Some(rest) => rest.to_owned(),
        None => e.message,
    };
    let format = match format {
        Some(f) => f,
        None => probe(path).map_err(inner)?,
    };
    Disk::open_with(path, format, opts, false, inspect_only).map_err(inner)
}

/// qemu's `bdrv_find_backing_image`: the depth (1: the image's backing file) of the file of
/// `img`'s chain that `name` names, taking `name` as each layer in turn would (relative to
/// its directory) and comparing canonical paths.
pub fn find_backing_layer(img: &Image, image_path: &Path, name: &str) -> Option<u32> {
    let mut namer = image_path;
    for (depth, layer) in (1..).zip(img.backing_paths()) {
        let same = (
            backing_path(namer, name).canonicalize(),
            layer.canonicalize(),
        );
        if matches!(same, (Ok(a), Ok(b)) if a == b) {
            return Some(depth);
        }
        namer = layer;
    }
    None
}

/// The format of the file at `depth` (1: the backing file) of `img`'s chain: what the layer
/// above names in its backing-format extension, else the probed one (as the engine does).
pub fn layer_format(img: &Image, depth: u32) -> Result<Format, CliError> {
    let paths = img.backing_paths();
    let path = paths
        .get(depth as usize - 1)
        .ok_or_else(|| CliError::new("no such layer in the backing chain"))?;
    let named = if depth == 1 {
        img.info().backing_format.clone()
    } else {
        let above = paths[depth as usize - 2];
        let o = OpenOptions {
            read_only: true,
            force_share: true,
            inspect_only: true,
            backing: qcow2_sync::BackingPolicy::Skip,
            ..OpenOptions::default()
        };
        Image::open(above, &o)
            .map_err(|e| qcow2_open_error(above, &e))?
            .info()
            .backing_format
            .clone()
    };
    match named.as_deref().map(Format::parse) {
        Some(Ok(f)) => Ok(f),
        _ => probe(path),
    }
}

/// Where qemu's qcow2 driver ends one block-status answer starting at `offset` (see
/// [`qcow2_proto::format::qemu_l2_slice_end`]); qemu-img's loops step by these answers, and
/// following them keeps our output the same.
pub use qcow2_proto::format::qemu_l2_slice_end as l2_slice_end;
