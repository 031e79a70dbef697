//! An io_uring runtime for the [`qcow2_proto`] engine.
//!
//! Every op of the engine's plans becomes one submission entry (vectored reads and writes,
//! `fdatasync`, `fallocate`), submitted in batches: everything the engine yields between two
//! waits goes to the kernel with one `io_uring_enter`. Completions go straight back into the
//! engine. The image file is registered with the ring (no descriptor lookup per entry).
//! Buffers are not registered: guest buffers arrive with each request from the caller, and
//! pinning them per request costs more than the lookup it saves; the core's metadata buffers
//! are off the hot path.
//!
//! # Where progress happens: a ring thread per image
//! Each open image has one thread that owns the engine and the ring. [`Image`] handles
//! (`Clone + Send + Sync`) send it commands and wake it through an eventfd the ring polls;
//! replies come back through channels, so the same `async fn`s work
//! - from async code on any executor (`img.read_at(buf, 0).await`), and
//! - from blocking code (`futures_lite::future::block_on(img.read_at(buf, 0))`).
//!
//! Why a thread rather than caller-driven progress: completions must be reaped and buffers
//! kept alive even when no caller is polling (a dropped future, an idle executor), and a
//! single owner keeps the core single-threaded without locks. The cost is one cross-thread
//! wake-up per batch of requests.
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

mod ring;

use std::fs::File;
use std::path::Path;

use qcow2_async::Driver;
pub use qcow2_async::{
    Allocation, BlockStatus, BufResult, Cache, CheckReport, CreateOptions, Error, GuestBuf, Image,
    ImageInfo, IoBuf, OpenOptions, Preallocation, Repair, RequestError,
};
use qcow2_sync::exec::Executor;
use qcow2_sync::{drive_open, engine_config, open_engine, open_file, Chain};

/// Opens the image at `path` (reading its header and tables before returning; a dirty
/// image opened writable is repaired first).
pub fn open(path: impl AsRef<Path>, options: &OpenOptions) -> Result<Image, Error> {
    let path = path.as_ref();
    // The ring first: a kernel without io_uring fails here, before anything else happens.
    let ring = ring::Ring::new(256)?;
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
    let ring = ring::Ring::new(256)?;
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
    ring::Ring::new(4).map(drop)
}

fn start(
    ring: ring::Ring,
    engine: qcow2_proto::Image,
    info: ImageInfo,
    files: (File, Chain),
    exec: Executor,
    options: &OpenOptions,
) -> Result<Image, Error> {
    let wake = ring::EventWake::new()?;
    let (driver, image) = Driver::start(engine, info, Some(Box::new(wake.clone())));
    driver.count(exec.syncs, exec.bounced);
    let cache = options.cache;
    std::thread::Builder::new()
        .name("qcow2-uring".into())
        .spawn(move || ring::run(ring, driver, files, wake, cache))
        .map_err(|source| Error::Runtime {
            what: "spawning the ring thread",
            source,
        })?;
    Ok(image)
}
