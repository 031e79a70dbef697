//! Running one workload: on a raw file (`depth` threads doing positional I/O with the cache
//! mode's flags, as fio's psync engine with `numjobs=depth`), through the blocking runtime
//! (one request at a time), or through an async runtime (`depth` tasks on one executor, a
//! request each in flight). The clock runs from the first submission to the last completion;
//! opening, the final flush and closing are outside it. The CPU time of the process (every
//! thread, the runtime's own among them) is taken over the same span.

use std::os::unix::fs::FileExt;
use std::path::Path;

use qcow2_proto::IoBuf;
use qcow2_sync::{Cache, Image, OpenOptions};

use super::workload::{Measured, Spec, Start, Tally, Workload};
use crate::disk::{engine_error, Disk};
use crate::error::strerror;
use crate::raw::{open_file, AlignedBuf};
use crate::runtime::Runtime;

/// What drives a run.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Engine {
    /// A raw file, positional I/O from `depth` threads.
    Raw,
    /// A qcow2 image through one of our runtimes.
    Qcow2(Runtime),
}

/// Byte written by every write request.
const PATTERN: u8 = 0xa5;

/// Runs `spec` on the image at `path`, opened with `options` (the raw file takes only
/// their cache mode), and returns its figures.
pub fn run(
    engine: Engine,
    path: &Path,
    options: &OpenOptions,
    spec: Spec,
) -> Result<Measured, String> {
    match engine {
        Engine::Raw => run_raw(path, options.cache, spec).map_err(|e| strerror(&e)),
        Engine::Qcow2(Runtime::Sync) => run_sync(path, options, spec),
        Engine::Qcow2(rt) => run_async(path, options, rt, spec),
    }
}

/// Whether writes must be durable before they complete.
fn write_through(cache: Cache) -> bool {
    matches!(cache, Cache::WriteThrough | Cache::DirectSync)
}

/// The raw file: `depth` threads, each with its own aligned buffer, on one file handle.
fn run_raw(path: &Path, cache: Cache, spec: Spec) -> std::io::Result<Measured> {
    let file = open_file(path, true, cache)?;
    let size = file.metadata()?.len();
    let work = Workload::new(spec, size);
    let syncs = std::sync::atomic::AtomicU64::new(0);
    let sync = |file: &std::fs::File| -> std::io::Result<()> {
        syncs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if cache != Cache::Unsafe {
            file.sync_data()?;
        }
        Ok(())
    };
    let start = Start::now();
    let tally = std::thread::scope(|s| {
        let workers: Vec<_> = (0..spec.depth)
            .map(|_| {
                let (file, work, sync) = (&file, &work, &sync);
                s.spawn(move || -> std::io::Result<Tally> {
                    let mut buf = AlignedBuf::new(spec.bs as usize);
                    buf.as_mut_slice().fill(PATTERN);
                    let mut t = Tally::default();
                    while let Some(req) = work.next() {
                        if req.write {
                            file.write_all_at(buf.as_slice(), req.offset)?;
                            if write_through(cache) {
                                sync(file)?;
                            }
                        } else {
                            file.read_exact_at(buf.as_mut_slice(), req.offset)?;
                        }
                        t.done(req);
                        if req.flush_after {
                            sync(file)?;
                            t.flushed();
                        }
                    }
                    Ok(t)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("bench worker panicked"))
            .try_fold(Tally::default(), |acc, t| t.map(|t| acc.merge(t)))
    })?;
    let syncs = syncs.load(std::sync::atomic::Ordering::Relaxed);
    let m = Measured::from_tally(tally, spec.bs, start, Some(syncs));
    if tally.writes > 0 && cache != Cache::Unsafe {
        file.sync_data()?;
    }
    Ok(m)
}

/// The blocking runtime: one request at a time, whatever the depth.
fn run_sync(path: &Path, options: &OpenOptions, spec: Spec) -> Result<Measured, String> {
    let img = Image::open(path, options).map_err(|e| engine_error(&e))?;
    let mut img = Disk::from_image(path, img);
    let before = img.flush_count();
    let work = Workload::new(spec, img.len());
    let mut buf = AlignedBuf::new(spec.bs as usize);
    buf.as_mut_slice().fill(PATTERN);
    let mut t = Tally::default();
    let start = Start::now();
    while let Some(req) = work.next() {
        if req.write {
            img.write_at(buf.as_slice(), req.offset)?;
        } else {
            img.read_at(buf.as_mut_slice(), req.offset)?;
        }
        t.done(req);
        if req.flush_after {
            img.flush()?;
            t.flushed();
        }
    }
    let m = Measured::from_tally(t, spec.bs, start, Some(img.flush_count() - before));
    img.close()?;
    Ok(m)
}

/// An async runtime: `depth` tasks on one local executor, a request each in flight.
fn run_async(
    path: &Path,
    options: &OpenOptions,
    rt: Runtime,
    spec: Spec,
) -> Result<Measured, String> {
    let img = rt
        .open_async(path, options)
        .expect("an async runtime")
        .map_err(|e| engine_error(&e))?;
    let before = img.flush_count();
    let work = Workload::new(spec, img.len());
    let ex = smol::LocalExecutor::new();
    let start = Start::now();
    let workers: Vec<_> = (0..spec.depth)
        .map(|_| {
            let (img, work) = (&img, &work);
            ex.spawn(async move {
                let mut buf = IoBuf::zeroed(spec.bs as usize);
                buf.as_mut_slice().fill(PATTERN);
                let mut t = Tally::default();
                while let Some(req) = work.next() {
                    let (r, back) = if req.write {
                        img.write_at(buf, req.offset).await
                    } else {
                        img.read_at(buf, req.offset).await
                    };
                    buf = back;
                    r.map_err(|e| engine_error(&e))?;
                    t.done(req);
                    if req.flush_after {
                        img.flush().await.map_err(|e| engine_error(&e))?;
                        t.flushed();
                    }
                }
                Ok::<Tally, String>(t)
            })
        })
        .collect();
    let tally = smol::block_on(ex.run(async {
        let mut sum = Tally::default();
        for w in workers {
            sum = sum.merge(w.await?);
        }
        Ok::<Tally, String>(sum)
    }))?;
    let m = Measured::from_tally(tally, spec.bs, start, Some(img.flush_count() - before));
    drop(ex);
    smol::block_on(async {
        if tally.writes > 0 {
            img.flush().await?;
        }
        img.close().await
    })
    .map_err(|e| engine_error(&e))?;
    Ok(m)
}
