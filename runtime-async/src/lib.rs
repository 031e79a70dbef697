//! The async front shared by the async runtimes (`qcow2-smol`, `qcow2-uring`).
//!
//! An async runtime is two halves joined by a channel:
//! - [`Image`], the handle callers hold: cloneable, `Send + Sync`, every method one command.
//!   Guest buffers are moved in and come back with the result ([`BufResult`]), so a caller
//!   that stops waiting never frees memory an I/O still targets.
//! - [`Driver`], the single owner of the engine (quinn's driver-task pattern). The runtime's
//!   loop waits for a command or a finished I/O, feeds it in, starts the ops the engine
//!   yields, and calls [`Driver::events`] to answer finished requests. Where a runtime puts
//!   that loop (a smol task; the callers themselves, through a [`Pump`]) is its own business.
//!
//! Options, cache modes and errors are the blocking runtime's, re-exported.
//!
//! ```
//! use qcow2_async::{guest_req, Driver, GuestSlot};
//! use qcow2_proto::{CreateOptions, Image as Engine, ImageConfig};
//! use qcow2_sync::exec::{Executor, Guest};
//!
//! // A toy runtime: a host file in memory, every op run at once on the driver's thread.
//! let file = tempfile::tempfile()?;
//! let mut exec = Executor::new(false, false);
//! let mut engine = Engine::create(ImageConfig::new(0), CreateOptions::new(1 << 20));
//! let (mut chain, options) = (qcow2_sync::Chain::new(None), qcow2_sync::OpenOptions::default());
//! let info = qcow2_sync::drive_open(&mut engine, &file, &mut chain, &options, &mut exec)?;
//! let (mut driver, image) = Driver::start(engine, info, None);
//!
//! let run = async {
//!     let write = image.write_at(b"hello".to_vec(), 4096);
//!     let drive = async {
//!         loop {
//!             let cmd = driver.recv().await;
//!             driver.take(cmd);
//!             while let Some(mut op) = driver.engine.poll_io() {
//!                 let r = match guest_req(&op).and_then(|r| driver.guest(r)) {
//!                     Some((GuestSlot::Owned(buf), 0)) => {
//!                         exec.run(&file, &mut op, &mut Guest::Write(buf.as_slice()))
//!                     }
//!                     _ => exec.run(&file, &mut op, &mut Guest::None),
//!                 };
//!                 driver.engine.complete(op, r);
//!             }
//!             driver.events();
//!         }
//!     };
//!     futures_lite::future::or(write, drive).await
//! };
//! let (result, buf) = futures_lite::future::block_on(run);
//! result?;
//! assert_eq!(buf, b"hello");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

mod buf;
mod driver;
mod handle;

pub use buf::{BufResult, GuestBuf};
pub use driver::{guest_req, Driver, GuestSlot};
pub use handle::{Cmd, Image, Pump, Step};
pub use qcow2_proto::{
    Allocation, BlockStatus, CheckReport, CreateOptions, ImageInfo, IoBuf, Preallocation, Repair,
    RequestError,
};
pub use qcow2_sync::{Cache, Error, OpenOptions};
