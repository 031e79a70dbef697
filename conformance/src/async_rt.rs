//! The harness for the async runtimes (features `smol` and `uring`): both hand out the same
//! [`qcow2_async::Image`] handle, so one disk type serves them, driven with `block_on`.

use std::future::Future;
use std::marker::PhantomData;
use std::path::Path;
use std::pin::Pin;
use std::task::Poll;

use futures_lite::future::{block_on, poll_fn};
use qcow2_async::{Image, OpenOptions};
use qcow2_proto::{BlockStatus, CheckReport, CreateOptions, ImageInfo, Repair};

use crate::harness::{BatchOp, Caps, Disk, Error, Harness, Mode};
use crate::sync::{error, options};

/// How an async runtime opens images (each runtime's harness module implements it).
pub trait Opener {
    /// The runtime's name.
    const NAME: &'static str;
    /// Creates and opens an image.
    fn create(path: &Path, c: &CreateOptions, o: &OpenOptions) -> Result<Image, qcow2_sync::Error>;
    /// Opens an image.
    fn open(path: &Path, o: &OpenOptions) -> Result<Image, qcow2_sync::Error>;
}

/// Runs the suite on an async runtime's [`Image`] over real files.
pub struct AsyncHarness<R>(PhantomData<R>);

impl<R> AsyncHarness<R> {
    /// The harness.
    pub const fn new() -> Self {
        Self(PhantomData)
    }
}

impl<R> Default for AsyncHarness<R> {
    fn default() -> Self {
        Self::new()
    }
}

impl<R> std::fmt::Debug for AsyncHarness<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AsyncHarness")
    }
}

impl<R: Opener> Harness for AsyncHarness<R> {
    type Disk = AsyncDisk;

    fn name(&self) -> &'static str {
        R::NAME
    }

    fn caps(&self) -> Caps {
        Caps {
            real_files: true,
            flush_count: true,
            write_through: true,
            direct_io: true,
            // Commands and replies travel through channels, one allocation each.
            alloc_free: false,
            concurrent: true,
        }
    }

    fn create(&self, path: &Path, c: &CreateOptions, mode: Mode) -> Result<AsyncDisk, Error> {
        R::create(path, c, &options(mode))
            .map(AsyncDisk::new)
            .map_err(error)
    }

    fn open(&self, path: &Path, mode: Mode) -> Result<AsyncDisk, Error> {
        R::open(path, &options(mode))
            .map(AsyncDisk::new)
            .map_err(error)
    }
}

/// An image open in an async runtime. Dropping it closes the image and waits, as the
/// blocking runtime does, so a case may reopen the file at once.
#[derive(Debug)]
pub struct AsyncDisk {
    img: Option<Image>,
}

impl AsyncDisk {
    fn new(img: Image) -> Self {
        Self { img: Some(img) }
    }

    fn img(&self) -> &Image {
        self.img.as_ref().expect("present until close")
    }
}

impl Drop for AsyncDisk {
    fn drop(&mut self) {
        if let Some(img) = self.img.take() {
            let _ = block_on(img.close());
        }
    }
}

/// Polls every future until all are done: one task, all requests in flight together.
pub fn join_all<F: Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    block_on(poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *o = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }));
    out.into_iter().map(|o| o.expect("all ready")).collect()
}

async fn batch_op(img: &Image, op: &BatchOp) -> Result<Vec<u8>, Error> {
    let r = match op {
        BatchOp::Read { offset, len } => {
            let (r, buf) = img.read_at(vec![0u8; *len], *offset).await;
            return r.map(|()| buf).map_err(error);
        }
        BatchOp::Write { offset, data } => img.write_at(data.clone(), *offset).await.0,
        BatchOp::Zeroes { offset, len, unmap } => img.write_zeroes(*offset, *len, *unmap).await,
        BatchOp::Discard { offset, len } => img.discard(*offset, *len).await,
        BatchOp::Flush => img.flush().await,
    };
    r.map(|()| Vec::new()).map_err(error)
}

impl Disk for AsyncDisk {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let (r, got) = block_on(self.img().read_at(vec![0u8; buf.len()], offset));
        buf.copy_from_slice(&got);
        r.map_err(error)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), Error> {
        block_on(self.img().write_at(buf.to_vec(), offset))
            .0
            .map_err(error)
    }

    fn write_compressed(&mut self, buf: &[u8], offset: u64) -> Result<(), Error> {
        block_on(self.img().write_compressed(buf.to_vec(), offset))
            .0
            .map_err(error)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), Error> {
        block_on(self.img().write_zeroes(offset, len, unmap)).map_err(error)
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), Error> {
        block_on(self.img().discard(offset, len)).map_err(error)
    }

    fn flush(&mut self) -> Result<(), Error> {
        block_on(self.img().flush()).map_err(error)
    }

    fn resize(&mut self, size: u64, shrink: bool) -> Result<(), Error> {
        block_on(self.img().resize(size, shrink)).map_err(error)
    }

    fn block_status(&mut self, offset: u64, len: u64) -> Result<BlockStatus, Error> {
        block_on(self.img().block_status(offset, len)).map_err(error)
    }

    fn check(&mut self, repair: Option<Repair>) -> Result<CheckReport, Error> {
        block_on(self.img().check(repair)).map_err(error)
    }

    fn len(&self) -> u64 {
        self.img().len()
    }

    fn info(&self) -> &ImageInfo {
        self.img().info()
    }

    fn flush_count(&self) -> u64 {
        self.img().flush_count()
    }

    fn close(mut self) -> Result<(), Error> {
        let img = self.img.take().expect("present until close");
        block_on(img.close()).map_err(error)
    }

    fn run_batch(&mut self, batch: &[BatchOp]) -> Option<Vec<Result<Vec<u8>, Error>>> {
        let img = self.img();
        Some(join_all(batch.iter().map(|op| batch_op(img, op)).collect()))
    }
}
