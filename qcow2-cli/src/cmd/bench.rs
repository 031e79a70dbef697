//! `bench`: sequential and random reads and writes at 4, 64 and 256 KiB against a fully
//! allocated qcow2 image, a growing (empty) qcow2 image and a raw file, with the same cache
//! flags, at each queue depth asked for (`--depths`), through each runtime asked for
//! (`--runtime`); each qcow2 figure is a ratio to the raw file at the same depth, measured in
//! the same run. The raw file at depth N is N threads doing positional I/O. Reads of the
//! growing image are left out: its clusters are unallocated, so they cost no I/O.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use qcow2_proto::IoBuf;
use qcow2_sync::{Cache, CreateOptions, Image, OpenOptions};
use serde_json::json;

use crate::cmd::{create::create_raw, parse_cache, parse_size_arg};
use crate::disk::{engine_error, Disk, Format};
use crate::error::{strerror, CliError, CmdResult};
use crate::raw::{AlignedBuf, RawDisk};
use crate::runtime::Runtime;
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
    /// The runtime driving a qcow2 image (`None` for the raw file).
    runtime: Option<Runtime>,
    depth: usize,
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

    fn runtime_name(&self) -> &'static str {
        self.runtime.map_or("-", Runtime::name)
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

/// The offsets one run visits, shared by its workers (threads or tasks).
struct Plan {
    pattern: Pattern,
    bs: u64,
    blocks: u64,
    /// A growing image stays growing: sequential writes never wrap around.
    no_wrap: bool,
    deadline: Instant,
    next: AtomicU64,
}

impl Plan {
    /// The next offset, or `None` once the run is over. Every run does at least one
    /// request, however loaded the machine.
    fn next(&self, rng: &mut Rng) -> Option<u64> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        if i > 0 && Instant::now() >= self.deadline {
            return None;
        }
        let block = if self.pattern.random() {
            rng.next() % self.blocks
        } else {
            if self.no_wrap && i >= self.blocks {
                return None;
            }
            i % self.blocks
        };
        Some(block * self.bs)
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

    fn open_options(&self) -> OpenOptions {
        OpenOptions {
            cache: self.cache,
            ..OpenOptions::default()
        }
    }

    fn run(
        &self,
        pattern: Pattern,
        bs: u64,
        kind: Kind,
        runtime: Option<Runtime>,
        depth: usize,
    ) -> Result<Sample, CliError> {
        if kind == Kind::Grow {
            self.fresh_grow()?;
        }
        let plan = Plan {
            pattern,
            bs,
            blocks: (self.size / bs).max(1),
            no_wrap: kind == Kind::Grow && pattern.writes(),
            deadline: Instant::now() + self.run_time,
            next: AtomicU64::new(0),
        };
        let start = Instant::now();
        let what = |e: &dyn std::fmt::Display| {
            let name = runtime.map_or("raw", Runtime::name);
            fail(&format!("{} {} ({name})", kind.name(), pattern.name()), e)
        };
        let (ops, fdatasyncs) = match runtime {
            None => self
                .run_raw(&plan, depth)
                .map_err(|e| what(&strerror(&e)))?,
            Some(Runtime::Sync) => self.run_sync(&plan, kind).map_err(|e| what(&e))?,
            Some(rt) => self
                .run_async(&plan, kind, rt, depth)
                .map_err(|e| what(&e))?,
        };
        Ok(Sample {
            pattern,
            block_size: bs,
            kind,
            runtime,
            depth,
            ops,
            bytes: ops * bs,
            elapsed: start.elapsed(),
            fdatasyncs: pattern.writes().then_some(fdatasyncs),
        })
    }

    /// The raw file: `depth` threads, each with its own buffer, positional I/O on one file.
    fn run_raw(&self, plan: &Plan, depth: usize) -> std::io::Result<(u64, u64)> {
        let file = crate::raw::open_file(&self.path(Kind::Raw), true, self.cache)?;
        let ops = std::thread::scope(|s| {
            let workers: Vec<_> = (0..depth)
                .map(|t| {
                    let file = &file;
                    s.spawn(move || -> std::io::Result<u64> {
                        let mut buf = AlignedBuf::new(plan.bs as usize);
                        buf.as_mut_slice().fill(0xa5);
                        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ plan.bs ^ t as u64);
                        let mut ops = 0;
                        while let Some(off) = plan.next(&mut rng) {
                            if plan.pattern.writes() {
                                file.write_all_at(buf.as_slice(), off)?;
                            } else {
                                file.read_exact_at(buf.as_mut_slice(), off)?;
                            }
                            ops += 1;
                        }
                        Ok(ops)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("bench worker panicked"))
                .sum::<std::io::Result<u64>>()
        })?;
        if plan.pattern.writes() && self.cache != Cache::Unsafe {
            file.sync_data()?;
            return Ok((ops, 1));
        }
        Ok((ops, 0))
    }

    /// The blocking runtime: one request at a time.
    fn run_sync(&self, plan: &Plan, kind: Kind) -> Result<(u64, u64), String> {
        let path = self.path(kind);
        let img = Image::open(&path, &self.open_options()).map_err(|e| engine_error(&e))?;
        let mut disk = Disk::from_image(&path, img);
        let mut buf = AlignedBuf::new(plan.bs as usize);
        buf.as_mut_slice().fill(0xa5);
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ plan.bs);
        let before = disk.flush_count();
        let mut ops = 0;
        while let Some(off) = plan.next(&mut rng) {
            if plan.pattern.writes() {
                disk.write_at(buf.as_slice(), off)?;
            } else {
                disk.read_at(buf.as_mut_slice(), off)?;
            }
            ops += 1;
        }
        if plan.pattern.writes() {
            disk.flush()?;
        }
        let syncs = disk.flush_count() - before;
        disk.close()?;
        Ok((ops, syncs))
    }

    /// An async runtime: `depth` tasks with a request each in flight.
    fn run_async(
        &self,
        plan: &Plan,
        kind: Kind,
        rt: Runtime,
        depth: usize,
    ) -> Result<(u64, u64), String> {
        let img = rt
            .open_async(&self.path(kind), &self.open_options())
            .expect("an async runtime")
            .map_err(|e| engine_error(&e))?;
        let before = img.flush_count();
        let ex = smol::LocalExecutor::new();
        let workers: Vec<_> = (0..depth)
            .map(|t| {
                let img = &img;
                ex.spawn(async move {
                    let mut buf = IoBuf::zeroed(plan.bs as usize);
                    buf.as_mut_slice().fill(0xa5);
                    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ plan.bs ^ t as u64);
                    let mut ops = 0u64;
                    while let Some(off) = plan.next(&mut rng) {
                        let (r, back) = if plan.pattern.writes() {
                            img.write_at(buf, off).await
                        } else {
                            img.read_at(buf, off).await
                        };
                        buf = back;
                        r.map_err(|e| engine_error(&e))?;
                        ops += 1;
                    }
                    Ok::<u64, String>(ops)
                })
            })
            .collect();
        let ops = smol::block_on(ex.run(async {
            let mut sum = 0;
            for w in workers {
                sum += w.await?;
            }
            if plan.pattern.writes() {
                img.flush().await.map_err(|e| engine_error(&e))?;
            }
            Ok::<u64, String>(sum)
        }))?;
        drop(ex);
        let syncs = img.flush_count() - before;
        smol::block_on(img.close()).map_err(|e| engine_error(&e))?;
        Ok((ops, syncs))
    }
}

fn bs_name(bs: u64) -> String {
    format!("{}k", bs >> 10)
}

fn ratio(samples: &[Sample], s: &Sample) -> Option<f64> {
    if s.kind == Kind::Raw {
        return None;
    }
    let raw = samples.iter().find(|r| {
        r.kind == Kind::Raw
            && r.pattern == s.pattern
            && r.block_size == s.block_size
            && r.depth == s.depth
    })?;
    (raw.mb_per_s() > 0.0).then(|| s.mb_per_s() / raw.mb_per_s())
}

fn table(samples: &[Sample]) -> String {
    let mut out = format!(
        "{:<11} {:>5} {:>5}  {:<11} {:<7} {:>10} {:>10} {:>7} {:>10}\n",
        "scenario", "bs", "depth", "image", "runtime", "MB/s", "IOPS", "x raw", "fdatasync"
    );
    for s in samples {
        let r = ratio(samples, s).map_or_else(|| "-".to_string(), |r| format!("{r:.2}"));
        let syncs = s
            .fdatasyncs
            .map_or_else(|| "-".to_string(), |n| n.to_string());
        out.push_str(&format!(
            "{:<11} {:>5} {:>5}  {:<11} {:<7} {:>10.1} {:>10.0} {:>7} {:>10}\n",
            s.pattern.name(),
            bs_name(s.block_size),
            s.depth,
            s.kind.name(),
            s.runtime_name(),
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
    let runtimes = match a.runtime.as_deref() {
        None => vec![Runtime::parse_or_default(None)?],
        Some(list) => list
            .split(',')
            .map(|r| Runtime::parse_or_default(Some(r.trim())))
            .collect::<Result<Vec<_>, _>>()?,
    };
    let depths = match a.depths.as_deref() {
        None => vec![1],
        Some(list) => list
            .split(',')
            .map(|d| match d.trim().parse::<usize>() {
                Ok(n @ 1..=256) => Ok(n),
                _ => Err(CliError::new(format!(
                    "bench: invalid depth '{d}' (expected 1 to 256)"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
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
        let names: Vec<_> = runtimes.iter().map(|r| r.name()).collect();
        println!(
            "qcow2 bench: {} images, {seconds} s per run, cache={}, runtimes {}, depths {:?}, in {}",
            crate::size::size_to_str(size),
            cache_name(cache),
            names.join(","),
            depths,
            base.display()
        );
    }
    bench.prepare()?;
    let mut samples = Vec::new();
    for bs in BLOCK_SIZES {
        for pattern in Pattern::ALL {
            for &depth in &depths {
                samples.push(bench.run(pattern, bs, Kind::Raw, None, depth)?);
                for &rt in &runtimes {
                    // The blocking runtime runs one request at a time.
                    if rt == Runtime::Sync && depth > 1 {
                        continue;
                    }
                    for kind in [Kind::Full, Kind::Grow] {
                        // Reads of a growing image hit no clusters (zero-fill, no I/O).
                        if kind == Kind::Grow && !pattern.writes() {
                            continue;
                        }
                        samples.push(bench.run(pattern, bs, kind, Some(rt), depth)?);
                    }
                }
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
                    "runtime": s.runtime.map(Runtime::name),
                    "depth": s.depth,
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
