//! [`Image`]: the cloneable handle callers hold; every method is one command to the driver.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_channel::{Receiver, Sender};
use qcow2_proto::{BlockStatus, CheckReport, ImageInfo, Outcome, Repair, Request};

use crate::buf::{unbox, BufResult, GuestBuf};
use crate::Error;

/// Largest piece of a guest buffer sent as one engine request (below the engine's limit).
const MAX_PIECE: usize = 256 << 20;

/// One step of a runtime's progress, driven by a waiting caller (see [`Pump::step`]).
pub type Step<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// How a runtime whose driver does not just sleep on the command channel makes progress for
/// its callers (the io_uring runtime: callers submit and reap themselves).
pub trait Pump: Send + Sync {
    /// A command was queued, or a handle dropped: take it in now.
    fn kick(&self);
    /// Called while a caller waits for its reply: a future that drives the runtime. The
    /// caller polls its reply first and drops the future once the reply is there; a future
    /// that resolves is asked for again. `None` (the default): the driver makes progress
    /// by itself, the caller just waits.
    fn step(&self) -> Option<Step<'_>> {
        None
    }
    /// A caller got its reply and stops driving.
    fn leave(&self) {}
}

/// Counters and facts shared by the handles and the driver.
pub(crate) struct Shared {
    pub(crate) info: ImageInfo,
    pub(crate) size: AtomicU64,
    pub(crate) syncs: AtomicU64,
    pub(crate) bounced: AtomicU64,
    pub(crate) joined: AtomicU64,
    pub(crate) pump: Option<Box<dyn Pump>>,
}

/// One request on its way to the driver.
pub struct Cmd {
    pub(crate) req: Request,
    pub(crate) buf: Option<Box<dyn GuestBuf>>,
    /// Byte offset into `buf` of the request's first byte (large buffers go in pieces).
    pub(crate) base: usize,
    pub(crate) reply: oneshot::Sender<Reply>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cmd").field("req", &self.req).finish()
    }
}

/// The driver's answer: the result, and the guest buffer back.
pub(crate) struct Reply {
    pub(crate) result: Result<Outcome, Error>,
    pub(crate) buf: Option<Box<dyn GuestBuf>>,
}

/// An open qcow2 image on an async runtime. Cheap to clone; `Send + Sync`; any number of
/// requests may be in flight from any number of tasks or threads.
///
/// Buffers are moved in and handed back with the result ([`BufResult`]), so a request the
/// caller stops waiting for keeps its buffer alive until its I/O has finished.
///
/// The image is closed when [`close`](Self::close) is called, or in the background once the
/// last handle is dropped; only `close` reports when that has finished.
pub struct Image {
    /// `None` only while dropping: the sender goes before the driver is woken, so a driver
    /// that sleeps outside the channel sees it closed when the last handle is gone.
    tx: Option<Sender<Cmd>>,
    shared: Arc<Shared>,
}

impl Clone for Image {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(p) = &self.shared.pump {
            p.kick();
            p.leave();
        }
    }
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("size", &self.len())
            .finish_non_exhaustive()
    }
}

impl Image {
    pub(crate) fn new(info: ImageInfo, pump: Option<Box<dyn Pump>>) -> (Self, Receiver<Cmd>) {
        let (tx, rx) = async_channel::unbounded();
        let shared = Arc::new(Shared {
            size: AtomicU64::new(info.size),
            info,
            syncs: AtomicU64::new(0),
            bounced: AtomicU64::new(0),
            joined: AtomicU64::new(0),
            pump,
        });
        (
            Self {
                tx: Some(tx),
                shared,
            },
            rx,
        )
    }

    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    async fn call(
        &self,
        req: Request,
        buf: Option<Box<dyn GuestBuf>>,
        base: usize,
    ) -> (Result<Outcome, Error>, Option<Box<dyn GuestBuf>>) {
        let (reply, rx) = oneshot::channel();
        let cmd = Cmd {
            req,
            buf,
            base,
            reply,
        };
        let tx = self.tx.as_ref().expect("only taken in drop");
        if let Err(e) = tx.try_send(cmd) {
            return (Err(Error::Closed), e.into_inner().buf);
        }
        let pump = self.shared.pump.as_deref();
        if let Some(p) = pump {
            p.kick();
        }
        let reply = match rx.try_recv() {
            Ok(r) => Some(r),
            Err(oneshot::TryRecvError::Disconnected) => None,
            Err(oneshot::TryRecvError::Empty) => {
                let mut rx = rx.into_future();
                loop {
                    let Some(step) = pump.and_then(|p| p.step()) else {
                        break (&mut rx).await.ok();
                    };
                    // (The reply is polled first: a step is dropped unpolled once it is there.)
                    let replied = async { Some((&mut rx).await.ok()) };
                    let stepped = async {
                        step.await;
                        None
                    };
                    if let Some(r) = futures_lite::future::or(replied, stepped).await {
                        break r;
                    }
                }
            }
        };
        if let Some(p) = pump {
            p.leave();
        }
        match reply {
            Some(r) => (r.result, r.buf),
            // The driver drops a request only by replying (its pending entry replies on
            // drop), so this is a driver that died with the buffer: nothing to give back.
            None => (Err(Error::Closed), None),
        }
    }

    async fn call_plain(&self, req: Request) -> Result<Outcome, Error> {
        self.call(req, None, 0).await.0
    }

    async fn with_buf<B: GuestBuf>(
        &self,
        buf: B,
        offset: u64,
        request: fn(u64, u64) -> Request,
    ) -> BufResult<(), B> {
        let len = buf.as_slice().len();
        let mut buf: Box<dyn GuestBuf> = Box::new(buf);
        let mut base = 0;
        loop {
            let n = (len - base).min(MAX_PIECE);
            let (r, back) = self
                .call(request(offset + base as u64, n as u64), Some(buf), base)
                .await;
            buf = back.expect("the qcow2 driver died holding a guest buffer");
            if let Err(e) = r {
                return (Err(e), unbox(buf));
            }
            base += n;
            if base >= len {
                break;
            }
        }
        (Ok(()), unbox(buf))
    }

    /// Reads `buf.len()` guest bytes at `offset` into `buf`.
    pub async fn read_at<B: GuestBuf>(&self, buf: B, offset: u64) -> BufResult<(), B> {
        self.with_buf(buf, offset, |offset, len| Request::Read { offset, len })
            .await
    }

    /// Writes `buf` at guest `offset`.
    pub async fn write_at<B: GuestBuf>(&self, buf: B, offset: u64) -> BufResult<(), B> {
        self.with_buf(buf, offset, |offset, len| Request::Write { offset, len })
            .await
    }

    /// Writes one cluster compressed (`qemu-img convert -c`): `offset` cluster aligned,
    /// `buf` a whole cluster (or the image's partial last one), the cluster unallocated.
    pub async fn write_compressed<B: GuestBuf>(&self, buf: B, offset: u64) -> BufResult<(), B> {
        self.with_buf(buf, offset, |offset, len| Request::WriteCompressed {
            offset,
            len,
        })
        .await
    }

    /// Makes `len` guest bytes at `offset` read as zero; `unmap` lets host space go.
    pub async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), Error> {
        self.call_plain(Request::WriteZeroes { offset, len, unmap })
            .await
            .map(drop)
    }

    /// Discards whole clusters inside the range.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.call_plain(Request::Discard { offset, len })
            .await
            .map(drop)
    }

    /// Makes every write completed before this call durable.
    pub async fn flush(&self) -> Result<(), Error> {
        self.call_plain(Request::Flush).await.map(drop)
    }

    /// Changes the virtual size; `shrink` consents to dropping data past the new end.
    pub async fn resize(&self, size: u64, shrink: bool) -> Result<(), Error> {
        self.call_plain(Request::Resize { size, shrink }).await?;
        self.shared.size.store(size, Ordering::Relaxed);
        Ok(())
    }

    /// Describes the first extent of the guest range at `offset` (at most `len` bytes).
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus, Error> {
        match self
            .call_plain(Request::BlockStatus { offset, len })
            .await?
        {
            Outcome::Status(s) => Ok(s),
            _ => Err(Error::Stalled),
        }
    }

    /// Checks the metadata, repairing what `repair` allows.
    pub async fn check(&self, repair: Option<Repair>) -> Result<CheckReport, Error> {
        match self.call_plain(Request::Check { repair }).await? {
            Outcome::Check(report) => Ok(*report),
            _ => Err(Error::Stalled),
        }
    }

    /// Counts the host clusters below byte `end` the image accounts as in use, up to `limit`.
    pub async fn count_used_clusters(&self, end: u64, limit: u64) -> Result<u64, Error> {
        match self
            .call_plain(Request::CountRefcounted { end, limit })
            .await?
        {
            Outcome::Count(n) => Ok(n),
            _ => Err(Error::Stalled),
        }
    }

    /// Writes everything back, marks the image clean and closes it; returns once the file
    /// is closed (its locks released). Requests sent after this (from other handles) fail.
    pub async fn close(self) -> Result<(), Error> {
        // Read-only images too: the answer comes once the file (and its locks) is closed.
        self.call_plain(Request::Close).await.map(drop)
    }

    /// Virtual size in bytes.
    pub fn len(&self) -> u64 {
        self.shared.size.load(Ordering::Relaxed)
    }

    /// Whether the virtual size is zero.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the image is, as the engine reported it at open.
    pub fn info(&self) -> &ImageInfo {
        &self.shared.info
    }

    /// Host flushes (`fdatasync`) issued so far.
    pub fn flush_count(&self) -> u64 {
        self.shared.syncs.load(Ordering::Relaxed)
    }

    /// Guest bytes copied through aligned bounce buffers for `O_DIRECT` so far.
    pub fn bounced_bytes(&self) -> u64 {
        self.shared.bounced.load(Ordering::Relaxed)
    }

    /// Reads and writes submitted joined with adjacent ones (one vectored entry for a run of
    /// them) so far: the io_uring runtime joins what callers queue together while their
    /// requests run sequentially; 0 on the other runtimes.
    pub fn joined_ops(&self) -> u64 {
        self.shared.joined.load(Ordering::Relaxed)
    }
}
