//! An async runtime for the [`qcow2_proto`] engine on [smol](https://docs.rs/smol).
//!
//! One driver task owns the engine (quinn's driver-task pattern); [`Image`] handles are
//! `Clone + Send + Sync` and send it commands, so any number of tasks, on any executor, may
//! have requests in flight. Each op the engine yields runs on smol's blocking pool
//! (`blocking::unblock`) with the same positional-I/O executor as `qcow2-sync`, so the host
//! file sees many ops at once. Guest buffers are owned: a read's buffer is lent to the one
//! op that fills it (further ops of the same request fill aligned staging buffers copied in
//! afterwards); a write's buffer is shared read-only by all its ops.
//!
//! The driver is spawned on smol's global executor, so a handle works from any executor
//! (or from `smol::block_on` in blocking code). `cache=none` opens the file `O_DIRECT`;
//! guest buffers that are not page-aligned then go through a bounce copy, counted by
//! [`Image::bounced_bytes`] ([`IoBuf`] never needs one).
//!
//! ```
//! use qcow2_smol::{CreateOptions, OpenOptions};
//!
//! smol::block_on(async {
//!     let dir = tempfile::tempdir()?;
//!     let path = dir.path().join("disk.qcow2");
//!     let img = qcow2_smol::create(&path, &CreateOptions::new(64 << 20), &OpenOptions::default())
//!         .await?;
//!     // Requests from many tasks run at once.
//!     let writes: Vec<_> = (0..8u64)
//!         .map(|i| {
//!             let img = img.clone();
//!             smol::spawn(async move { img.write_at(vec![i as u8; 4096], i << 20).await.0 })
//!         })
//!         .collect();
//!     for w in writes {
//!         w.await?;
//!     }
//!     img.flush().await?;
//!     let (r, buf) = img.read_at(vec![0u8; 4096], 3 << 20).await;
//!     r?;
//!     assert!(buf.iter().all(|&b| b == 3));
//!     img.close().await?;
//!     Ok::<(), Box<dyn std::error::Error>>(())
//! })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

mod driver;

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use qcow2_async::Driver;
pub use qcow2_async::{
    Allocation, BlockStatus, BufResult, Cache, CheckReport, CreateOptions, Error, GuestBuf, Image,
    ImageInfo, IoBuf, OpenOptions, Preallocation, Repair, RequestError,
};
use qcow2_sync::exec::Executor;
use qcow2_sync::{drive_open, engine_config, open_engine, open_file, Chain};

/// Opens the image at `path`.
pub async fn open(path: impl AsRef<Path>, options: &OpenOptions) -> Result<Image, Error> {
    let path = path.as_ref().to_owned();
    let options = *options;
    start(options, move |exec| {
        let file = open_file(&path, &options, false)?;
        let mut chain = Chain::new(Some(&path));
        let (engine, info) = open_engine(&file, &mut chain, &options, exec)?;
        Ok((engine, file, chain, info))
    })
    .await
}

/// Creates (or truncates) `path` as a new qcow2 image and opens it writable.
pub async fn create(
    path: impl AsRef<Path>,
    create: &CreateOptions,
    options: &OpenOptions,
) -> Result<Image, Error> {
    let path = path.as_ref().to_owned();
    let (create, options) = (create.clone(), *options);
    start(options, move |exec| {
        let file = open_file(&path, &options, true)?;
        let mut chain = Chain::new(Some(&path));
        if let Some(name) = &create.data_file {
            chain.create_data_file(name, &options)?;
        }
        let mut engine = qcow2_proto::Image::create(engine_config(&file, &options)?, create);
        let info = drive_open(&mut engine, &file, &mut chain, &options, exec)?;
        Ok((engine, file, chain, info))
    })
    .await
}

/// An opening (or creating) plan run with blocking I/O.
type Opened = (qcow2_proto::Image, File, Chain, ImageInfo);

/// Runs the opening plan on the blocking pool, then spawns the driver.
async fn start(
    options: OpenOptions,
    open: impl FnOnce(&mut Executor) -> Result<Opened, Error> + Send + 'static,
) -> Result<Image, Error> {
    let (engine, file, chain, info, exec) = blocking::unblock(move || {
        let mut exec = Executor::for_cache(options.cache);
        let (engine, file, chain, info) = open(&mut exec)?;
        Ok::<_, Error>((engine, file, chain, info, exec))
    })
    .await?;
    let (driver, image) = Driver::start(engine, info, None);
    driver.count(exec.syncs, exec.bounced);
    smol::spawn(driver::run(driver, Arc::new((file, chain)), options.cache)).detach();
    Ok(image)
}
