//! An io_uring runtime for the [`qcow2_proto`] engine.
//!
//! The ops of the engine's plans become submission entries (vectored reads and writes,
//! `fdatasync`, `fallocate`), submitted in batches: everything the engine yields between two
//! waits goes to the kernel with one `io_uring_enter`, adjacent reads (or writes) of a batch
//! joined into one entry. Completions go straight back into the engine. While the requests run
//! sequentially, the callers woken by one batch of completions have their next requests
//! taken in together, so that they join ([`Image::joined_ops`] counts them): sequential
//! 8 KiB writes into a growing image at depth 16 gained 16-51% in two A/B runs
//! (BENCHMARKS.md). The image file is registered with the ring (no descriptor lookup per
//! entry).
//! Buffers are not registered: guest buffers arrive with each request from the caller, and
//! pinning them per request costs more than the lookup it saves; the core's metadata buffers
//! are off the hot path.
//!
//! # Where progress happens: on the callers' threads
//! One loop per open image owns the engine and the ring, behind a lock. [`Image`] handles
//! (`Clone + Send + Sync`) queue a command and then run the loop themselves, on the caller's
//! thread: the command goes into the engine and its ops into the ring at once. While a
//! caller waits for its reply, it drives the ring: one waiting caller at a time reaps,
//! waiting for the ring's descriptor in its own reactor (async-io's, which `smol::block_on`
//! runs on the calling thread) and feeding completions back. The kernel posts a completion
//! from the thread that submitted it, so a request submitted and reaped by its caller never
//! crosses threads.
//!
//! # Polling
//! Before the reaper sleeps in the reactor (about ten system calls and a wake-up, against
//! one `pread`), it polls the completion queue, yielding to its executor between looks, for
//! a window that adapts to the waits it sees, as QEMU's iothreads do: waits up to
//! [`OpenOptions::poll_max`] (default [`DEFAULT_POLL_MAX`], 256 µs) are polled for, longer
//! ones close the window. On this project's machine that took random 8 KiB reads at depth 1
//! from 0.9-1.0x to 1.2-1.3x a raw file's `pread`, for 1.6-1.8x the CPU time per request
//! (the thread does not sleep while its I/O is in flight); `Some(Duration::ZERO)` turns it
//! off (BENCHMARKS.md, "Polling the completion queue").
//!
//! The ring is cooperative (`IORING_SETUP_COOP_TASKRUN`): the kernel does not interrupt a
//! thread busy in user space to post the completions of the ops it submitted, it flags
//! them, and the polling reaper enters the kernel to post its own when it sees the flag. A
//! thread that waits is woken at once; one busy elsewhere posts them at its next system
//! call or timer tick. On this project's 2-vCPU guest, whose disk interrupts all land on one
//! vCPU, the interrupt the kernel otherwise sends a reaper polling on the other cost about
//! 20 µs a request: random 8 KiB I/O with a flush every 4th write at depth 1 went from 0.84x
//! to 0.96x a raw file (BENCHMARKS.md, "Completions posted cooperatively").
//! [`OpenOptions::interrupt_submitters`] asks for the interrupts back, for threads that spin
//! in user space on tickless CPUs.
//!
//! The same `async fn`s work
//! - from async code on any executor (`img.read_at(buf, 0).await`), and
//! - from blocking code (`futures_lite::future::block_on(img.read_at(buf, 0))`); there the
//!   async-io reactor thread watches the ring, one hand-off per wait.
//!
//! A ring thread per image covers what no caller waits for: ops of futures dropped before
//! their reply, write-back after the last reply, the close after the last handle. It reaps
//! only while I/O is in flight and no caller does, looks in every 10 ms while a caller holds
//! the reaper role (a future that is never polled again slows the others, never stalls
//! them), and ends the loop. Ops the kernel cancelled because the thread that submitted them
//! exited (they had not started) are submitted again. `hub.rs` has the details.
//!
//! # Buffers
//! Guest buffers are moved into the driver and boxed, so their memory stays at one address
//! until the request is done, even when the caller gave up waiting; the core's buffers have
//! stable addresses by contract. Under `O_DIRECT` (`cache=none`/`directsync`) a guest buffer
//! that is not 4 KiB aligned goes through an aligned bounce buffer; [`IoBuf`] never does.
//! [`Image::bounced_bytes`] reports the bytes copied. All unsafe code is in `ring.rs`; the
//! crate's `UNSAFE.md` lists every block.
//!
//! ```
//! use futures_lite::future::block_on;
//! use qcow2_uring::{CreateOptions, IoBuf, OpenOptions};
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("disk.qcow2");
//! let img = qcow2_uring::create(&path, &CreateOptions::new(64 << 20), &OpenOptions::default())?;
//! let mut buf = IoBuf::zeroed(4096);
//! buf.as_mut_slice().fill(7);
//! let (r, _buf) = block_on(img.write_at(buf, 1 << 20));
//! r?;
//! block_on(img.flush())?;
//! let (r, back) = block_on(img.read_at(vec![0u8; 4096], 1 << 20));
//! r?;
//! assert!(back.iter().all(|&b| b == 7));
//! block_on(img.close())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod hub;
mod join;
mod ring;
mod window;

use std::fs::File;
use std::path::Path;

use qcow2_async::Driver;
pub use qcow2_async::{
    Allocation, BlockStatus, BufResult, Cache, CheckReport, CreateOptions, Error, GuestBuf, Image,
    ImageInfo, IoBuf, OpenOptions, Preallocation, Repair, RequestError,
};
use qcow2_sync::exec::Executor;
use qcow2_sync::{drive_open, engine_config, open_engine, open_file, Chain};
pub use window::DEFAULT_POLL_MAX;

/// Opens the image at `path` (reading its header and tables before returning; a dirty
/// image opened writable is repaired first).
pub fn open(path: impl AsRef<Path>, options: &OpenOptions) -> Result<Image, Error> {
    let path = path.as_ref();
    // The ring first: a kernel without io_uring fails here, before anything else happens.
    let ring = ring::Ring::new(256, options.interrupt_submitters)?;
    let file = open_file(path, options, false)?;
    let mut exec = Executor::for_cache(options.cache);
    let mut chain = Chain::new(Some(path));
    let (engine, info) = open_engine(&file, &mut chain, options, &mut exec)?;
    start(ring, engine, info, (file, chain), exec, options)
}

/// Creates (or truncates) `path` as a new qcow2 image and opens it writable.
pub fn create(
    path: impl AsRef<Path>,
    create: &CreateOptions,
    options: &OpenOptions,
) -> Result<Image, Error> {
    let path = path.as_ref();
    let ring = ring::Ring::new(256, options.interrupt_submitters)?;
    let file = open_file(path, options, true)?;
    let mut engine = qcow2_proto::Image::create(engine_config(&file, options)?, create.clone());
    let mut exec = Executor::for_cache(options.cache);
    let mut chain = Chain::new(Some(path));
    if let Some(name) = &create.data_file {
        chain.create_data_file(name, options)?;
    }
    let info = drive_open(&mut engine, &file, &mut chain, options, &mut exec)?;
    start(ring, engine, info, (file, chain), exec, options)
}

/// Whether this kernel lets us set up a ring with every opcode the runtime needs; the
/// error names what is missing.
pub fn probe() -> Result<(), Error> {
    ring::Ring::new(4, true).map(drop)
}

fn start(
    ring: ring::Ring,
    engine: qcow2_proto::Image,
    info: ImageInfo,
    files: (File, Chain),
    exec: Executor,
    options: &OpenOptions,
) -> Result<Image, Error> {
    let hub = hub::Hub::new(&ring, options.poll_max.unwrap_or(DEFAULT_POLL_MAX))?;
    let pump = hub::RingPump(hub.clone());
    let (driver, image) = Driver::start(engine, info, Some(Box::new(pump)));
    driver.count(exec.syncs, exec.bounced);
    hub.install(ring::Loop::new(ring, driver, files, options.cache));
    std::thread::Builder::new()
        .name("qcow2-uring".into())
        .spawn(move || hub::run(hub))
        .map_err(|source| Error::Runtime {
            what: "spawning the ring thread",
            source,
        })?;
    Ok(image)
}
