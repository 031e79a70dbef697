//! `convert`: copy one or more images (concatenated) into a new or existing one, keeping it
//! sparse: ranges the source reports as zero or unallocated are skipped, and so are runs of
//! zero bytes at least `-S` long (default 4 KiB) inside data.
//!
//! With a backing file for the target (`-B`, or `-o backing_file=`), the target is created
//! as its overlay and, as qemu-img does, only what the source's top layer stores is copied:
//! what the source leaves to its own backing chain is left unallocated (the new backing file
//! is taken to hold the same), zeroes are written as zeroes, except past the end of the new
//! backing file, where the target reads as zero anyway.

use std::collections::VecDeque;

use std::path::Path;

use qcow2_proto::{BitmapData, BitmapInfo};
use qcow2_sync::{Cache, OpenOptions};

use crate::cmd::create::{add_backing_options, create_image, plan, split_options, wants_help};
use crate::cmd::{parse_cache, parse_size_arg};
use crate::disk::{
    backing_path, engine_error, l2_slice_end, open_backing, qcow2_open_error, resolve_format, Disk,
    DiskOptions, Format, Status,
};
use crate::error::{CliError, CmdResult};
use crate::progress::Progress;
use crate::runtime::Runtime;
use crate::ConvertArgs;

/// Bytes copied per read, like qemu-img's buffer.
const CHUNK: u64 = 2 << 20;
/// Sector size of the zero scan.
const SECTOR: usize = 512;
/// Writes an async runtime keeps in flight.
const WINDOW: usize = 8;

/// Runs `convert`.
pub fn run(a: &ConvertArgs) -> CmdResult {
    let target_format = Format::parse(&a.target_format)?;
    let opts = split_options(&a.options);
    if a.compress && target_format == Format::Raw {
        return Err(CliError::new(
            "Compression not supported for this file format",
        ));
    }
    if a.compress && opts.iter().any(|(k, v)| k == "preallocation" && v != "off") {
        return Err(CliError::new(
            "Compression and preallocation not supported at the same time",
        ));
    }
    if wants_help(&opts) {
        return crate::cmd::create::run(&crate::CreateArgs {
            format: a.target_format.clone(),
            options: a.options.clone(),
            quiet: false,
            backing: None,
            backing_format: None,
            unsafe_backing: false,
            object: Vec::new(),
            filename: None,
            size: None,
        });
    }
    let (dst_path, sources) = a.files.split_last().expect("clap requires two files");
    let sparse = match a.sparse_size.as_deref() {
        None => 4096,
        Some(s) => {
            let v = parse_size_arg(s, "buffer size for sparse output")?;
            if v % SECTOR as u64 != 0 || v > 16 << 20 {
                return Err(CliError::new(
                    "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16MiB",
                ));
            }
            v
        }
    };
    let runtime = Runtime::parse_or_default(a.runtime.as_deref())?;
    let src_cache = parse_cache(a.source_cache.as_deref(), Cache::WriteBack)?;
    let dst_cache = parse_cache(a.target_cache.as_deref(), Cache::WriteBack)?;

    let snapshot = a.snapshot.as_deref().map(qcow2_sync::SnapshotRef::parse);
    if snapshot.is_some() && sources.len() > 1 {
        return Err(CliError::new(
            "No support for concatenating multiple snapshot",
        ));
    }
    let mut srcs = Vec::new();
    for path in sources {
        let (format, _) = resolve_format(path, a.format.as_deref(), false)?;
        let opts = DiskOptions {
            read_only: true,
            cache: src_cache,
            force_share: a.force_share,
        };
        srcs.push(match &snapshot {
            Some(s) => Disk::open_snapshot(path, format, s, opts)?,
            None => Disk::open(path, format, opts, false)?,
        });
    }
    let total: u64 = srcs.iter().map(Disk::len).sum();
    let bitmaps = match a.bitmaps {
        true => source_bitmaps(a, sources, target_format)?,
        false => Vec::new(),
    };

    let dst_name = dst_path.display();
    let mut opts = opts;
    let backing = if a.no_create {
        if !opts.is_empty() {
            return Err(CliError::new(
                "-o has no effect when skipping image creation",
            ));
        }
        a.backing.clone().map(|name| (name, None))
    } else {
        target_backing(a, target_format, &mut opts)?
    };
    if backing.is_some() {
        if a.target_is_zero {
            // (qemu-img 10.0 reports this and exits with status 0, having done nothing.)
            return Err(CliError::with_code(
                0,
                "Cannot use --target-is-zero when the destination image has a backing file",
            ));
        }
        if srcs.len() > 1 {
            return Err(CliError::new(
                "Having a backing file for the target makes no sense when concatenating multiple input images",
            ));
        }
    }
    if !a.no_create {
        if let Some((_, None)) = &backing {
            return Err(CliError::new(
                "Use of backing file requires explicit backing format",
            ));
        }
        // Options qemu rejects while parsing them are reported alone; what its image
        // creation rejects, as an error converting to the format.
        let plan = plan(target_format, &opts, Some(total)).map_err(CliError::new)?;
        let creating = |e: String| {
            CliError::new(format!(
                "{dst_name}: error while converting {}: {e}",
                target_format.name()
            ))
        };
        if let Some(e) = plan.late_error {
            return Err(creating(e));
        }
        create_image(dst_path, &plan).map_err(creating)?;
    }
    let mut dst = Sink::open(dst_path, target_format, dst_cache, runtime)?;
    if dst.len() < total {
        return Err(CliError::new(format!(
            "Target image is too small: {} bytes for {total} bytes of source data",
            dst.len()
        )));
    }
    // The new backing file's length: past it, zeroes need not be written (unknown with
    // `-n`, as for qemu).
    let backing = backing.map(|(name, format)| {
        let format = format.and_then(|f| Format::parse(&f).ok());
        let opts = DiskOptions {
            read_only: true,
            force_share: true,
            ..DiskOptions::default()
        };
        let path = backing_path(dst_path, &name);
        let len = match a.no_create {
            true => None,
            false => open_backing(&path, format, opts, true)
                .ok()
                .map(|d| d.len()),
        };
        TargetBacking { len }
    });
    let target_zero = backing.is_none() && (!a.no_create || a.target_is_zero);

    // Progress counts the bytes the sources store as data, as qemu-img's does.
    let mut data_total = 0u64;
    for src in &mut srcs {
        data_total += data_bytes(src, backing)?;
    }
    let mut progress = Progress::new(a.progress && !a.quiet, 1.0);
    progress.set(0.0);
    let compress = match a.compress {
        true => Some(dst.cluster_size().filter(|cs| {
            // Whole target clusters per source: several sources must fill whole clusters.
            srcs.iter().rev().skip(1).all(|s| s.len() % cs == 0)
        })),
        false => None,
    };
    let compress = match compress {
        Some(None) => {
            return Err(CliError::new(
                "Compressed output of several sources needs every source but the last to be a whole number of target clusters",
            ))
        }
        Some(Some(cs)) => Some(cs),
        None => None,
    };
    let mut copier = Copier {
        dst: &mut dst,
        compress,
        target_zero,
        backing,
        sparse,
        data_total,
        data_done: 0,
        progress: &mut progress,
    };
    let mut base = 0;
    for src in &mut srcs {
        copier.copy(src, base)?;
        base += src.len();
    }
    progress.set(100.0);
    progress.end();
    dst.close()
        .map_err(|e| CliError::new(format!("error while closing {dst_name}: {e}")))?;
    if a.bitmaps {
        copy_bitmaps(dst_path, &bitmaps)?;
    }
    Ok(0)
}

/// `--bitmaps`: the source's persistent bitmaps (name, granularity, enabled, bits), read
/// before anything is written; an inconsistent one fails the conversion, or with
/// `--skip-broken-bitmaps` is left out with a warning (qemu-img's words).
fn source_bitmaps(
    a: &ConvertArgs,
    sources: &[std::path::PathBuf],
    target: Format,
) -> Result<Vec<(BitmapInfo, BitmapData)>, CliError> {
    let [source] = sources else {
        return Err(CliError::new(
            "Copying bitmaps only possible with single source",
        ));
    };
    if target != Format::Qcow2 {
        return Err(CliError::new(format!(
            "Format driver '{}' does not support bitmaps",
            a.target_format
        )));
    }
    let (format, _) = resolve_format(source, a.format.as_deref(), false)?;
    if format != Format::Qcow2 {
        return Err(CliError::new("Source lacks bitmap support"));
    }
    let options = qcow2_sync::OpenOptions {
        read_only: true,
        force_share: a.force_share,
        ..qcow2_sync::OpenOptions::default()
    };
    let mut img = qcow2_sync::Image::open(source, &options)
        .map_err(|e| crate::disk::qcow2_open_error(source, &e))?;
    let mut out = Vec::new();
    for b in img.info().bitmaps.clone() {
        if b.in_use {
            if !a.skip_broken_bitmaps {
                return Err(CliError::new(format!(
                    "Cannot copy inconsistent bitmap '{}'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it",
                    b.name
                )));
            }
            eprintln!("qcow2: warning: Skipping inconsistent bitmap '{}'", b.name);
            continue;
        }
        let data = img.read_bitmap(&b.name).map_err(|e| {
            CliError::new(format!(
                "Failed to read bitmap {}: {}",
                b.name,
                engine_error(&e)
            ))
        })?;
        out.push((b, data));
    }
    Ok(out)
}

/// `--bitmaps`: the bitmaps added to the (closed) target, with their bits and flags.
fn copy_bitmaps(dst: &Path, bitmaps: &[(BitmapInfo, BitmapData)]) -> Result<(), CliError> {
    if bitmaps.is_empty() {
        return Ok(());
    }
    let mut img = qcow2_sync::Image::open(dst, &qcow2_sync::OpenOptions::default())
        .map_err(|e| crate::disk::qcow2_open_error(dst, &e))?;
    let mut result = Ok(());
    // (In QEMU's order, the last first: it names the last that exists already.)
    for (b, data) in bitmaps.iter().rev() {
        let r = img
            .bitmap_add(&b.name, b.granularity, b.auto)
            .and_then(|()| img.bitmap_merge(&b.name, data));
        if let Err(e) = r {
            let e = match e {
                qcow2_sync::Error::Request(qcow2_sync::RequestError::BitmapExists) => {
                    format!("Bitmap already exists: {}", b.name)
                }
                e => engine_error(&e),
            };
            result = Err(CliError::new(format!(
                "Failed to create bitmap {}: {e}",
                b.name
            )));
            break;
        }
    }
    img.close().map_err(|e| CliError::new(engine_error(&e)))?;
    result
}

fn read_error(offset: u64, e: &str) -> CliError {
    CliError::new(format!("error while reading at byte {offset}: {e}"))
}

fn write_error(offset: u64, e: &str) -> CliError {
    CliError::new(format!("error while writing at byte {offset}: {e}"))
}

/// The target's backing file (`-B`), as the copy needs it.
#[derive(Clone, Copy, Debug)]
struct TargetBacking {
    /// Its virtual size, when known.
    len: Option<u64>,
}

/// The target's backing file: `-B` and `-F` (which win over `-o backing_file=` and
/// `backing_fmt=`, being added after them), with its format if one is given.
fn target_backing(
    a: &ConvertArgs,
    format: Format,
    opts: &mut Vec<(String, String)>,
) -> Result<Option<(String, Option<String>)>, CliError> {
    if format == Format::Raw {
        if a.backing.is_some() {
            return Err(CliError::new(
                "Backing file not supported for file format 'raw'",
            ));
        }
        if a.backing_format.is_some() {
            return Err(CliError::new(
                "Backing file format not supported for file format 'raw'",
            ));
        }
    }
    let (name, format) =
        add_backing_options(opts, a.backing.as_deref(), a.backing_format.as_deref());
    Ok(name.map(|name| (name, format)))
}

/// What convert does with an extent of a source.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Kind {
    /// Leave the target unallocated there (its backing file shows).
    Skip,
    /// Zeroes.
    Zero,
    /// Data to copy.
    Data,
}

/// qemu's largest request (`BDRV_REQUEST_MAX_BYTES`): one block-status query covers at most
/// this much.
const MAX_REQUEST: u64 = (i32::MAX as u64 >> 9) << 9;

/// qemu-img's `convert_iteration_sectors`: what to do with the source extent at `off`
/// (target offset `at`), and how long it is.
///
/// With a target backing file only the source's top layer counts, as
/// `bdrv_block_status_above(source, its backing file)` sees it: what the top layer leaves
/// to its backing chain is skipped, in runs as qemu's qcow2 driver reports them (to the end
/// of an L2 slice), which read as zero when they start past the end of the source's backing
/// file (or it has none); zeroes past the end of the target's backing file need no writing.
fn next_extent(
    src: &mut Disk,
    off: u64,
    at: u64,
    backing: Option<TargetBacking>,
) -> Result<(Kind, u64), CliError> {
    let mut max = src.len() - off;
    let status =
        |src: &mut Disk, off: u64, max: u64| src.status(off, max).map_err(|e| read_error(off, &e));
    let Some(b) = backing else {
        let st = status(src, off, max)?;
        return Ok((if st.zero { Kind::Zero } else { Kind::Data }, st.len));
    };
    max = max.min(MAX_REQUEST);
    let past_backing = match b.len {
        Some(end) if at >= end => true,
        Some(end) => {
            max = max.min(end - at);
            false
        }
        None => false,
    };
    let st = status(src, off, max)?;
    let in_top = |st: &Status| st.depth == 0 && st.present;
    if in_top(&st) {
        let kind = match (st.zero, past_backing) {
            (false, _) => Kind::Data,
            (true, false) => Kind::Zero,
            (true, true) => Kind::Skip,
        };
        return Ok((kind, st.len));
    }
    let zero = st.depth == 0 && !past_backing;
    let cluster = src.qcow2().map_or(512, |img| img.info().cluster_size);
    let limit = max.min(l2_slice_end(off, cluster) - off);
    let mut n = st.len.min(limit);
    while n < limit {
        let next = status(src, off + n, limit - n)?;
        if in_top(&next) {
            break;
        }
        n += next.len.min(limit - n);
    }
    Ok((if zero { Kind::Zero } else { Kind::Skip }, n))
}

/// Bytes `src` stores as data (not zero, not unallocated; with a target backing file, in
/// its top layer only).
fn data_bytes(src: &mut Disk, backing: Option<TargetBacking>) -> Result<u64, CliError> {
    let (mut off, len, mut sum) = (0, src.len(), 0);
    while off < len {
        let (kind, n) = next_extent(src, off, off, backing)?;
        if kind == Kind::Data {
            sum += n;
        }
        off += n;
    }
    Ok(sum)
}

/// A write in flight on an async runtime; it hands its buffer back for reuse.
type WriteTask = smol::Task<(Result<(), String>, Vec<u8>)>;

/// The target: a disk written one request at a time, or a qcow2 image on an async runtime
/// with up to [`WINDOW`] writes in flight (convert writes disjoint ranges, so they may
/// complete in any order).
enum Sink {
    Disk(Disk),
    Async {
        img: qcow2_async::Image,
        inflight: VecDeque<WriteTask>,
        spare: Vec<Vec<u8>>,
    },
}

impl Sink {
    fn open(
        path: &std::path::Path,
        format: Format,
        cache: Cache,
        rt: Runtime,
    ) -> Result<Self, CliError> {
        let opts = OpenOptions {
            cache,
            ..OpenOptions::default()
        };
        match (format, rt.open_async(path, &opts)) {
            (Format::Qcow2, Some(img)) => {
                let img = img.map_err(|e| qcow2_open_error(path, &e))?;
                Ok(Self::Async {
                    img,
                    inflight: VecDeque::new(),
                    spare: Vec::new(),
                })
            }
            _ => Ok(Self::Disk(Disk::open(
                path,
                format,
                DiskOptions {
                    read_only: false,
                    cache,
                    force_share: false,
                },
                false,
            )?)),
        }
    }

    fn len(&self) -> u64 {
        match self {
            Self::Disk(d) => d.len(),
            Self::Async { img, .. } => img.len(),
        }
    }

    /// Waits for in-flight writes until fewer than `keep` remain.
    fn drain(&mut self, keep: usize) -> Result<(), String> {
        if let Self::Async {
            inflight, spare, ..
        } = self
        {
            while inflight.len() > keep {
                let task = inflight.pop_front().expect("non-empty");
                let (r, buf) = smol::block_on(task);
                spare.push(buf);
                r?;
            }
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), String> {
        self.drain(WINDOW - 1)?;
        match self {
            Self::Disk(d) => d.write_at(buf, offset),
            Self::Async {
                img,
                inflight,
                spare,
            } => {
                let mut data = spare.pop().unwrap_or_default();
                data.clear();
                data.extend_from_slice(buf);
                let img = img.clone();
                inflight.push_back(smol::spawn(async move {
                    let (r, data) = img.write_at(data, offset).await;
                    (r.map_err(|e| engine_error(&e)), data)
                }));
                Ok(())
            }
        }
    }

    /// The target's cluster size (a qcow2 target).
    fn cluster_size(&mut self) -> Option<u64> {
        match self {
            Self::Disk(d) => d.qcow2().map(|img| img.info().cluster_size),
            Self::Async { img, .. } => Some(img.info().cluster_size),
        }
    }

    /// Writes one whole cluster compressed (after the writes in flight).
    fn write_compressed(&mut self, buf: &[u8], offset: u64) -> Result<(), String> {
        self.drain(0)?;
        match self {
            Self::Disk(d) => match d.qcow2() {
                Some(img) => img
                    .write_compressed(buf, offset)
                    .map_err(|e| engine_error(&e)),
                None => Err("Compression not supported for this file format".into()),
            },
            Self::Async { img, .. } => smol::block_on(img.write_compressed(buf.to_vec(), offset))
                .0
                .map_err(|e| engine_error(&e)),
        }
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), String> {
        match self {
            Self::Disk(d) => d.write_zeroes(offset, len, unmap),
            Self::Async { img, .. } => {
                smol::block_on(img.write_zeroes(offset, len, unmap)).map_err(|e| engine_error(&e))
            }
        }
    }

    fn close(mut self) -> Result<(), String> {
        self.drain(0)?;
        match self {
            Self::Disk(d) => d.close(),
            Self::Async { img, .. } => smol::block_on(img.close()).map_err(|e| engine_error(&e)),
        }
    }
}

struct Copier<'a> {
    dst: &'a mut Sink,
    /// `-c`: write whole target clusters of this size compressed.
    compress: Option<u64>,
    target_zero: bool,
    backing: Option<TargetBacking>,
    sparse: u64,
    data_total: u64,
    data_done: u64,
    progress: &'a mut Progress,
}

impl Copier<'_> {
    fn copy(&mut self, src: &mut Disk, base: u64) -> Result<(), CliError> {
        if let Some(cs) = self.compress {
            return self.copy_compressed(src, base, cs);
        }
        let len = src.len();
        let mut buf = vec![0u8; CHUNK as usize];
        let mut off = 0;
        while off < len {
            let (kind, n) = next_extent(src, off, base + off, self.backing)?;
            if kind == Kind::Skip {
                off += n;
                continue;
            }
            if kind == Kind::Zero && self.sparse > 0 {
                self.zero(base + off, n)?;
                off += n;
                continue;
            }
            let end = off + n;
            while off < end {
                let n = (end - off).min(CHUNK);
                let chunk = &mut buf[..n as usize];
                src.read_at(chunk, off).map_err(|e| read_error(off, &e))?;
                self.write(chunk, base + off)?;
                off += n;
                if kind == Kind::Data {
                    self.data_done += n;
                    if self.data_total > 0 {
                        self.progress
                            .set((self.data_done as f64 * 100.0 / self.data_total as f64) as f32);
                    }
                }
            }
        }
        Ok(())
    }

    /// `-c`: every target cluster holding data written compressed (whole: what the
    /// source shows there, its backing files included), as qemu-img does; clusters the
    /// source leaves to the target's backing file, or that read as zero, are not written.
    fn copy_compressed(&mut self, src: &mut Disk, base: u64, cs: u64) -> Result<(), CliError> {
        let len = src.len();
        let mut buf = vec![0u8; cs as usize];
        let mut off = 0;
        while off < len {
            let n = cs.min(len - off);
            let (kind, run) = next_extent(src, off, base + off, self.backing)?;
            if kind != Kind::Data && run >= n {
                if kind == Kind::Zero {
                    self.zero(base + off, n)?;
                }
                off += n;
                continue;
            }
            let chunk = &mut buf[..n as usize];
            src.read_at(chunk, off).map_err(|e| read_error(off, &e))?;
            if chunk.iter().all(|&b| b == 0) {
                self.zero(base + off, n)?;
            } else {
                self.dst
                    .write_compressed(chunk, base + off)
                    .map_err(|e| write_error(base + off, &e))?;
            }
            self.data_done += n;
            if self.data_total > 0 {
                let done = self.data_done.min(self.data_total);
                self.progress
                    .set((done as f64 * 100.0 / self.data_total as f64) as f32);
            }
            off += n;
        }
        Ok(())
    }

    fn zero(&mut self, offset: u64, len: u64) -> Result<(), CliError> {
        if self.target_zero {
            return Ok(());
        }
        self.dst
            .write_zeroes(offset, len, true)
            .map_err(|e| write_error(offset, &e))
    }

    /// Writes `buf` at `offset`, leaving out zero runs of at least `sparse` bytes.
    fn write(&mut self, buf: &[u8], offset: u64) -> Result<(), CliError> {
        if self.sparse == 0 {
            return self
                .dst
                .write_at(buf, offset)
                .map_err(|e| write_error(offset, &e));
        }
        for (start, len, zero) in runs(buf, offset, self.sparse as usize) {
            let at = offset + start as u64;
            if zero {
                self.zero(at, len as u64)?;
            } else {
                self.dst
                    .write_at(&buf[start..start + len], at)
                    .map_err(|e| write_error(at, &e))?;
            }
        }
        Ok(())
    }
}

/// Splits `buf` (guest bytes from `offset`) into runs by 512-byte sectors, `(start, len,
/// zero)`, as qemu-img's `convert` decides what to write and what to leave sparse
/// (`is_allocated_sectors_min`): a run of zeroes at the start counts as zero whatever its
/// length; after data, only zero runs of at least `min` bytes do; and the boundaries after
/// data runs are moved up to the alignment (`min` rounded down to a power of two), so that
/// zero ranges start aligned.
pub fn runs(buf: &[u8], offset: u64, min: usize) -> Vec<(usize, usize, bool)> {
    let zero: Vec<bool> = buf
        .chunks(SECTOR)
        .map(|s| s.iter().all(|&b| b == 0))
        .collect();
    let sectors = |n: usize| (n * SECTOR).min(buf.len());
    let min_sectors = (min / SECTOR).max(1);
    let align = 1u64 << (63 - (min_sectors as u64).leading_zeros());
    let first = offset / SECTOR as u64;
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    let mut at = 0;
    while at < zero.len() {
        let (z, n) = run_min(&zero[at..], first + at as u64, min_sectors, align);
        let (start, end) = (sectors(at), sectors(at + n));
        match out.last_mut() {
            Some(last) if last.2 == z => last.1 += end - start,
            _ => out.push((start, end - start, z)),
        }
        at += n;
    }
    out
}

/// qemu-img's `is_allocated_sectors`: whether the run at the start of `zero` (a flag per
/// sector, the first at guest sector `at`) is zero, and its length, its end moved to the
/// alignment where the buffer goes on with the other kind.
fn same_run(zero: &[bool], at: u64, align: u64) -> (bool, usize) {
    let n = zero.len();
    let mut is_zero = zero[0];
    let mut i = zero.iter().position(|&z| z != is_zero).unwrap_or(n);
    if i == n {
        return (is_zero, i);
    }
    let tail = ((at + i as u64) & (align - 1)) as usize;
    if tail != 0 {
        if is_zero && i <= tail {
            // A short zero run before data is written with it.
            is_zero = false;
        }
        if is_zero {
            i -= tail;
        } else {
            i = (i + align as usize - tail).min(n);
        }
    }
    (is_zero, i)
}

/// qemu-img's `is_allocated_sectors_min`: after data, zero runs shorter than `min` sectors
/// are data too.
fn run_min(zero: &[bool], at: u64, min: usize, align: u64) -> (bool, usize) {
    let min = min.min(zero.len());
    let (is_zero, first) = same_run(zero, at, align);
    if is_zero {
        return (true, first);
    }
    let (mut used, mut checked) = (first, first);
    while checked < zero.len() {
        let (z, n) = same_run(&zero[checked..], at + checked as u64, align);
        checked += n;
        if !z {
            used = checked;
        } else if n >= min {
            break;
        }
    }
    (false, used)
}

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    fn zero_runs_as_qemu_img_cuts_them() {
        let mut buf = vec![0u8; 16384];
        buf[0] = 1; // sector 0 data
        buf[1024] = 1; // sector 2 data: the one-sector zero gap between stays data
                       // Data up to the 4 KiB boundary, then zeroes.
        assert_eq!(
            runs(&buf, 0, 4096),
            vec![(0, 4096, false), (4096, 12288, true)]
        );
        // With -S 512 (alignment one sector) every zero sector after data counts.
        assert_eq!(
            runs(&buf, 0, 512),
            vec![
                (0, 512, false),
                (512, 512, true),
                (1024, 512, false),
                (1536, 14848, true)
            ]
        );
        // A short zero run before data that ends unaligned is data; one that reaches back
        // to an aligned boundary is zero; the alignment is of guest offsets.
        let mut buf = vec![0u8; 8192];
        buf[1536] = 1;
        assert_eq!(
            runs(&buf, 0, 4096),
            vec![(0, 4096, false), (4096, 4096, true)]
        );
        assert_eq!(
            runs(&buf, 3072, 4096),
            vec![(0, 1024, true), (1024, 4096, false), (5120, 3072, true)]
        );
        // A buffer of one kind is one run.
        assert_eq!(runs(&[0u8; 1000], 0, 4096), vec![(0, 1000, true)]);
        assert_eq!(runs(&[1u8; 1000], 0, 4096), vec![(0, 1000, false)]);
    }
}
