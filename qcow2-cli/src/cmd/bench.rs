//! `bench`: sequential and random reads and writes at 4, 64 and 256 KiB against a fully
//! allocated qcow2 image, a growing (empty) qcow2 image and a raw file, all through the same
//! blocking path and cache flags, with each qcow2 figure as a ratio to raw. Reads of the
//! growing image are left out: its clusters are unallocated, so they cost no I/O.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qcow2_sync::{Cache, CreateOptions, Image, OpenOptions};
use serde_json::json;

use crate::cmd::{create::create_raw, parse_cache, parse_size_arg};
use crate::disk::{engine_error, Disk, Format};
use crate::error::{strerror, CliError, CmdResult};
use crate::raw::{AlignedBuf, RawDisk};
use crate::BenchArgs;

/// Block sizes measured.
const BLOCK_SIZES: [u64; 3] = [4 << 10, 64 << 10, 256 << 10];

/// What a run does.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Pattern {
    SeqRead,
    RandRead,
    SeqWrite,
    RandWrite,
}

impl Pattern {
    const ALL: [Self; 4] = [
        Self::SeqRead,
        Self::RandRead,
        Self::SeqWrite,
        Self::RandWrite,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::SeqRead => "seq-read",
            Self::RandRead => "rand-read",
            Self::SeqWrite => "seq-write",
            Self::RandWrite => "rand-write",
        }
    }

    fn writes(self) -> bool {
        matches!(self, Self::SeqWrite | Self::RandWrite)
    }

    fn random(self) -> bool {
        matches!(self, Self::RandRead | Self::RandWrite)
    }
}

/// The images compared.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Kind {
    Raw,
    Full,
    Grow,
}

impl Kind {
    const ALL: [Self; 3] = [Self::Raw, Self::Full, Self::Grow];

    fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Full => "qcow2-full",
            Self::Grow => "qcow2-grow",
        }
    }
}

/// One measurement.
#[derive(Debug)]
struct Sample {
    pattern: Pattern,
    block_size: u64,
    kind: Kind,
    ops: u64,
    bytes: u64,
    elapsed: Duration,
    fdatasyncs: Option<u64>,
}

impl Sample {
    fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9) / 1e6
    }

    fn iops(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// xorshift64*: a fast, seeded generator for random offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

struct Bench {
    dir: PathBuf,
    size: u64,
    run_time: Duration,
    cache: Cache,
}

fn fail(what: &str, e: impl std::fmt::Display) -> CliError {
    CliError::new(format!("bench: {what}: {e}"))
}

/// Whether O_DIRECT works in `dir`.
fn direct_io_works(dir: &Path) -> bool {
    let path = dir.join("direct-probe");
    let ok = (|| -> std::io::Result<()> {
        std::fs::write(&path, [])?;
        let f = crate::raw::open_file(&path, true, Cache::None)?;
        let buf = AlignedBuf::new(4096);
        std::os::unix::fs::FileExt::write_all_at(&f, buf.as_slice(), 0)
    })()
    .is_ok();
    let _ = std::fs::remove_file(&path);
    ok
}

impl Bench {
    fn path(&self, kind: Kind) -> PathBuf {
        self.dir.join(match kind {
            Kind::Raw => "bench.raw",
            Kind::Full => "full.qcow2",
            Kind::Grow => "grow.qcow2",
        })
    }

    /// Creates the raw file and the fully allocated qcow2 image, both filled with data.
    fn prepare(&self) -> Result<(), CliError> {
        let chunk = vec![0x5au8; 1 << 20];
        let raw_path = self.path(Kind::Raw);
        create_raw(&raw_path, self.size, qcow2_sync::Preallocation::Off)
            .map_err(|e| fail("create raw", strerror(&e)))?;
        let mut raw = RawDisk::open(&raw_path, false, Cache::WriteBack, false)
            .map_err(|e| fail("open raw", strerror(&e)))?;
        let mut img = Image::create(
            self.path(Kind::Full),
            &CreateOptions::new(self.size),
            &OpenOptions::default(),
        )
        .map_err(|e| fail("create qcow2", engine_error(&e)))?;
        let mut off = 0;
        while off < self.size {
            let n = (self.size - off).min(chunk.len() as u64) as usize;
            raw.write_at(&chunk[..n], off)
                .map_err(|e| fail("fill raw", strerror(&e)))?;
            img.write_at(&chunk[..n], off)
                .map_err(|e| fail("fill qcow2", engine_error(&e)))?;
            off += n as u64;
        }
        raw.flush().map_err(|e| fail("flush raw", strerror(&e)))?;
        img.close()
            .map_err(|e| fail("close qcow2", engine_error(&e)))
    }

    /// A fresh, empty qcow2 image.
    fn fresh_grow(&self) -> Result<(), CliError> {
        let img = Image::create(
            self.path(Kind::Grow),
            &CreateOptions::new(self.size),
            &OpenOptions::default(),
        )
        .map_err(|e| fail("create growing qcow2", engine_error(&e)))?;
        img.close()
            .map_err(|e| fail("close growing qcow2", engine_error(&e)))
    }

    fn open(&self, kind: Kind) -> Result<Disk, CliError> {
        let path = self.path(kind);
        match kind {
            Kind::Raw => {
                let raw = RawDisk::open(&path, false, self.cache, false)
                    .map_err(|e| fail("open raw", strerror(&e)))?;
                Ok(Disk::from_raw(&path, raw))
            }
            Kind::Full | Kind::Grow => {
                let o = OpenOptions {
                    cache: self.cache,
                    ..OpenOptions::default()
                };
                let img =
                    Image::open(&path, &o).map_err(|e| fail("open qcow2", engine_error(&e)))?;
                Ok(Disk::from_image(&path, img))
            }
        }
    }

    fn run(&self, pattern: Pattern, bs: u64, kind: Kind) -> Result<Sample, CliError> {
        if kind == Kind::Grow {
            self.fresh_grow()?;
        }
        let mut disk = self.open(kind)?;
        let mut buf = AlignedBuf::new(bs as usize);
        buf.as_mut_slice().fill(0xa5);
        let blocks = (self.size / bs).max(1);
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ bs);
        let syncs_before = disk.flush_count();
        let (mut ops, mut i) = (0u64, 0u64);
        let start = Instant::now();
        loop {
            if start.elapsed() >= self.run_time {
                break;
            }
            let block = if pattern.random() {
                rng.next() % blocks
            } else if kind == Kind::Grow && pattern.writes() && i >= blocks {
                break; // a growing image stays growing: never wrap around
            } else {
                i % blocks
            };
            i += 1;
            let offset = block * bs;
            let r = if pattern.writes() {
                disk.write_at(buf.as_slice(), offset)
            } else {
                disk.read_at(buf.as_mut_slice(), offset)
            };
            r.map_err(|e| {
                fail(
                    &format!("{} {} at {offset}", kind.name(), pattern.name()),
                    e,
                )
            })?;
            ops += 1;
        }
        if pattern.writes() {
            disk.flush().map_err(|e| fail("flush", e))?;
        }
        let elapsed = start.elapsed();
        let fdatasyncs = pattern.writes().then(|| disk.flush_count() - syncs_before);
        disk.close().map_err(|e| fail("close", e))?;
        Ok(Sample {
            pattern,
            block_size: bs,
            kind,
            ops,
            bytes: ops * bs,
            elapsed,
            fdatasyncs,
        })
    }
}

fn bs_name(bs: u64) -> String {
    format!("{}k", bs >> 10)
}

fn ratio(samples: &[Sample], s: &Sample) -> Option<f64> {
    if s.kind == Kind::Raw {
        return None;
    }
    let raw = samples
        .iter()
        .find(|r| r.kind == Kind::Raw && r.pattern == s.pattern && r.block_size == s.block_size)?;
    (raw.mb_per_s() > 0.0).then(|| s.mb_per_s() / raw.mb_per_s())
}

fn table(samples: &[Sample]) -> String {
    let mut out = format!(
        "{:<11} {:>5}  {:<11} {:>10} {:>10} {:>7} {:>10}\n",
        "scenario", "bs", "image", "MB/s", "IOPS", "x raw", "fdatasync"
    );
    for s in samples {
        let r = ratio(samples, s).map_or_else(|| "-".to_string(), |r| format!("{r:.2}"));
        let syncs = s
            .fdatasyncs
            .map_or_else(|| "-".to_string(), |n| n.to_string());
        out.push_str(&format!(
            "{:<11} {:>5}  {:<11} {:>10.1} {:>10.0} {:>7} {:>10}\n",
            s.pattern.name(),
            bs_name(s.block_size),
            s.kind.name(),
            s.mb_per_s(),
            s.iops(),
            r,
            syncs
        ));
    }
    out
}

fn cache_name(c: Cache) -> &'static str {
    match c {
        Cache::WriteBack => "writeback",
        Cache::WriteThrough => "writethrough",
        Cache::None => "none",
        Cache::DirectSync => "directsync",
        Cache::Unsafe => "unsafe",
    }
}

/// Runs `bench`.
pub fn run(a: &BenchArgs) -> CmdResult {
    let mut cache = parse_cache(a.cache.as_deref(), Cache::None)?;
    let size = match &a.size {
        Some(s) => parse_size_arg(s, "image size")?,
        None if a.quick => 64 << 20,
        None => 256 << 20,
    };
    if size < 256 << 10 {
        return Err(CliError::new(
            "bench: the image size must be at least 256 KiB",
        ));
    }
    let seconds = a.seconds.unwrap_or(if a.quick { 0.25 } else { 1.0 });
    let base = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("qcow2-bench")
        .tempdir_in(&base)
        .map_err(|e| fail("temp dir", e))?;
    let mut note = None;
    if matches!(cache, Cache::None | Cache::DirectSync) && !direct_io_works(dir.path()) {
        note = Some(format!(
            "note: O_DIRECT is not supported in {}; using cache=writeback instead of cache={}",
            base.display(),
            cache_name(cache)
        ));
        cache = Cache::WriteBack;
    }
    let bench = Bench {
        dir: dir.path().to_owned(),
        size,
        run_time: Duration::from_secs_f64(seconds),
        cache,
    };
    if !a.json {
        if let Some(n) = &note {
            eprintln!("{n}");
        }
        println!(
            "qcow2 bench: {} images, {seconds} s per run, cache={}, in {}",
            crate::size::size_to_str(size),
            cache_name(cache),
            base.display()
        );
    }
    bench.prepare()?;
    let mut samples = Vec::new();
    for bs in BLOCK_SIZES {
        for pattern in Pattern::ALL {
            for kind in Kind::ALL {
                // Reads of a growing image hit no clusters (zero-fill without I/O): not measured.
                if kind == Kind::Grow && !pattern.writes() {
                    continue;
                }
                samples.push(bench.run(pattern, bs, kind)?);
            }
        }
    }
    if a.json {
        let results: Vec<_> = samples
            .iter()
            .map(|s| {
                json!({
                    "scenario": s.pattern.name(),
                    "block_size": s.block_size,
                    "image": s.kind.name(),
                    "ops": s.ops,
                    "bytes": s.bytes,
                    "seconds": s.elapsed.as_secs_f64(),
                    "mb_per_s": s.mb_per_s(),
                    "iops": s.iops(),
                    "ratio_to_raw": ratio(&samples, s),
                    "fdatasyncs": s.fdatasyncs,
                })
            })
            .collect();
        let doc = json!({
            "image_size": size,
            "seconds_per_run": seconds,
            "cache": cache_name(cache),
            "note": note,
            "format": Format::Qcow2.name(),
            "results": results,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).map_err(|e| fail("json", e))?
        );
    } else {
        print!("{}", table(&samples));
    }
    Ok(0)
}
