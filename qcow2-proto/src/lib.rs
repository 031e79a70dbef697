//! A sans-IO qcow2 engine.
//!
//! `qcow2-proto` is a deterministic state machine: it never performs I/O, reads a clock,
//! spawns a thread or awaits. Guest requests go in, I/O operations with explicit flush
//! barriers come out, completions go back in. Runtimes (`qcow2-sync`, and later async and
//! io_uring ones) open the files and execute the ops.
//!
//! # The contract
//!
//! * [`Image::open`] (or [`Image::create`]) returns an engine whose first [`Image::poll_io`]
//!   calls ask for the header; opening ends with [`Event::Opened`] or [`Event::OpenFailed`].
//! * **In:** [`Image::submit`] a [`Request`] (`Busy` is backpressure: pools never grow);
//!   [`Image::complete`] each op with its result, handing back the op itself and so every
//!   owned buffer it carried, whether it succeeded or not.
//! * **Out:** [`Image::poll_io`] yields ops that may all be issued at once, concurrently, in
//!   any order: ordering is enforced by withholding ops, never by asking the runtime to
//!   sequence them. [`Image::poll_event`] yields finished requests, open results and
//!   poisoning.
//! * After every `submit` and `complete`, drain both `poll_io` and `poll_event`.
//! * Guest data is never copied: ops name spans of the request's buffer
//!   ([`Segment::Guest`]); outstanding ops never share a span or an owned buffer.
//! * Fail-stop: a failed metadata write or flush poisons the engine: in-flight requests fail,
//!   new ones are refused, reopening is the way out. A failed data write fails only its
//!   request.
//! * Crash safety: refcounts before references, references dropped before refcounts,
//!   data before mappings, tables before pointers (rules A-D of DESIGN.md), enforced by the
//!   order in which cached metadata is written back; a guest flush costs two `fdatasync`s in
//!   steady state, one while the image grows ahead
//!   ([`ImageConfig::grow_step`]): then the refcounts of the next clusters are written ahead
//!   of their allocation, and data going into host space never written before, for
//!   clusters that read as zero, may reach the disk after the L2 entry that maps it (without
//!   the data, the cluster still reads as zero: nothing readable changes but what the guest
//!   wrote).
//!
//! # Format features
//!
//! * **Backing chains.** A qcow2 backing file is a nested, read-only [`Image`] inside the
//!   engine; its ops come out with their [`Target`] one level down (`Backing(d)`), so a
//!   chain of any depth (up to [`Limits::max_backing_depth`]) is engines inside engines.
//!   The runtime resolves names ([`Event::OpenBacking`]) under its policy and answers with
//!   [`Image::attach_backing`]. Reads of unallocated clusters fall through; partial writes
//!   copy head and tail from the chain in the same vectored write as the data; zero flags
//!   (v3) keep backing data from showing through again. A write that continues a
//!   sequential stream defers its copy instead: its data goes out alone, the stream's next
//!   writes into the same clusters *join* the allocation (they go out at once instead of
//!   waiting for it, extending one written range), and the copy is read and written only
//!   for what that range does not reach; while other requests are in flight the read waits
//!   for the data write too, so a stream that fills the cluster copies nothing. The
//!   clusters are linked only once every joined write is done (rule C), and each joined
//!   request finishes after the link. Writes also join allocations that copy nothing
//!   (fresh clusters in host space allocated ahead).
//! * **Compressed clusters** (zlib, zstd) are read as their stream and turned into guest
//!   bytes by an [`IoKind::Decompress`] op the runtime runs ([`decompress_op`]), so
//!   CPU work stays out of the state machine and never blocks it; writing them is
//!   [`Request::WriteCompressed`].
//! * **External data files**: guest data goes to [`Target::DataFile`] at the guest offset,
//!   without refcounts.
//! * **Extended L2 entries (subclusters).** 128-bit entries: the standard descriptor and a
//!   bitmap saying, per 1/32 of the cluster, "allocated", "reads as zeros" or neither. The
//!   engine reads, maps and merges extents per subcluster. A partial write into an
//!   unallocated cluster allocates it and copies only the partly written subclusters at
//!   its edges (from where they read: the backing file, or zeros); the others stay
//!   unallocated or zero. A write into an allocated cluster whose subclusters are not yet
//!   allocated goes in place and sets their bits only once the data is written (rule C).
//!   Write-zeroes of whole subclusters only edits the bitmap. A cluster shared with a
//!   snapshot and partly allocated is first copied whole with its bitmap, then written in
//!   place. Invalid bitmaps are corruption ([`CorruptReason::InvalidSubclusterBitmap`]).
//! * **Internal snapshots** ([`Image::snapshot_create`], [`Image::snapshot_apply`],
//!   [`Image::snapshot_delete`]) are exclusive tasks around one tree walk (one more
//!   reference, one less, or COPIED recomputed). New tables are written first and the header
//!   switches to them after a write-back cycle (rule D); an apply writes a new active L1
//!   elsewhere and switches to it atomically; references are dropped only after the switch is
//!   durable (rule B). A crash can leave COPIED flags that disagree with refcounts (as
//!   QEMU's operations can), never a refcount below its references.
//!   [`Image::open_snapshot`] reads a snapshot without applying it.
//! * **Amend** ([`Image::amend`], [`AmendOptions`]): compat upgrade and downgrade, lazy
//!   refcounts, refcount width, as `qemu-img amend` does them and in its order, as one
//!   exclusive task over the file (like check) after which the engine reads its metadata
//!   again. A new refcount width is a new structure written in free space and switched in
//!   by one header-sector write (rule D); refusals ([`AmendError`]) come before any write.
//! * **Persistent dirty bitmaps** are read with [`Image::read_bitmap`] and maintained on a
//!   writable image: the open marks every bitmap in use (durably, before any write), every
//!   write, write-zeroes and discard sets its range in the enabled ones, and the close
//!   ([`Request::Close`]) stores them back with new tables and directory, then switches
//!   the header extension in stages that each leave cluster 0 valid whatever part of them
//!   a crash lets through (sector writes; a new extension committed by its 8-byte head
//!   over the old end marker; the autoclear bit cleared around writes that could tear).
//!   A crash before that leaves the bitmaps in use (stale), as QEMU leaves them, never a
//!   bitmap that claims to be valid and misses a write. Edits ([`Image::bitmap_add`],
//!   `bitmap_remove`, `bitmap_clear`, `bitmap_enable`, `bitmap_merge`) are made in memory
//!   and stored the same way. A resize resizes them; a snapshot apply marks the whole disk.
//!   A damaged directory cannot be maintained: a writable open then clears the bitmaps'
//!   autoclear bit, so that nobody trusts them.
//!
//! # Example: a complete (tiny) runtime over an in-memory file
//!
//! ```
//! use qcow2_proto::{CreateOptions, Event, Image, ImageConfig, IoKind, IoOp, Request, Segment};
//!
//! // The "disk": a Vec. A real runtime does pread/pwrite/fdatasync here.
//! fn run(op: &mut IoOp, disk: &mut Vec<u8>, guest: &mut [u8]) -> usize {
//!     let mut pos = op.offset as usize;
//!     match op.kind {
//!         IoKind::Read | IoKind::Write | IoKind::ZeroFill => {
//!             for seg in op.segments.iter_mut() {
//!                 let len = seg.len();
//!                 if op.kind == IoKind::Write && disk.len() < pos + len {
//!                     disk.resize(pos + len, 0);
//!                 }
//!                 let from_disk = |d: &Vec<u8>, p: usize, out: &mut [u8]| {
//!                     for (i, b) in out.iter_mut().enumerate() {
//!                         *b = d.get(p + i).copied().unwrap_or(0);
//!                     }
//!                 };
//!                 match (op.kind, seg) {
//!                     (IoKind::ZeroFill, Segment::Guest { start, len, .. }) => guest[*start..*start + *len].fill(0),
//!                     (IoKind::Read, Segment::Guest { start, len, .. }) => from_disk(disk, pos, &mut guest[*start..*start + *len]),
//!                     (IoKind::Read, Segment::Buf(b)) => from_disk(disk, pos, b.as_mut_slice()),
//!                     (IoKind::Write, Segment::Guest { start, len, .. }) => disk[pos..pos + *len].copy_from_slice(&guest[*start..*start + *len]),
//!                     (IoKind::Write, Segment::Buf(b)) => disk[pos..pos + b.len()].copy_from_slice(b.as_slice()),
//!                     (IoKind::Write, Segment::Zeroes(n)) => disk[pos..pos + *n].fill(0),
//!                     _ => {}
//!                 }
//!                 pos += len;
//!             }
//!         }
//!         IoKind::SetLen => disk.resize(op.offset as usize, 0),
//!         _ => {} // flush, hole punching: nothing to do in memory
//!     }
//!     op.len() as usize
//! }
//!
//! // Drive the engine until `req` (or opening, for `None`) finishes.
//! fn drive(img: &mut Image, disk: &mut Vec<u8>, guest: &mut [u8]) -> Event {
//!     loop {
//!         while let Some(mut op) = img.poll_io() {
//!             let n = run(&mut op, disk, guest);
//!             img.complete(op, Ok(n));
//!         }
//!         if let Some(ev) = img.poll_event() {
//!             return ev;
//!         }
//!     }
//! }
//!
//! let mut disk = Vec::new();
//! let mut img = Image::create(ImageConfig::new(0), CreateOptions::new(1 << 20));
//! assert!(matches!(drive(&mut img, &mut disk, &mut []), Event::Opened(_)));
//!
//! let mut data = vec![0xab; 4096];
//! img.submit(Request::Write { offset: 8192, len: 4096 }).unwrap();
//! assert!(matches!(drive(&mut img, &mut disk, &mut data), Event::Done { result: Ok(_), .. }));
//! img.submit(Request::Flush).unwrap();
//! drive(&mut img, &mut disk, &mut []);
//!
//! let mut back = vec![0; 4096];
//! img.submit(Request::Read { offset: 8192, len: 4096 }).unwrap();
//! drive(&mut img, &mut disk, &mut back);
//! assert_eq!(back, data);
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod amend;
pub mod check;
pub mod codec;
mod config;
pub mod create;
mod engine;
mod error;
mod event;
pub mod format;
mod info;
mod io;
pub mod measure;
mod request;

pub use amend::AmendOptions;
pub use check::{CheckReport, Repair};
pub use config::{CacheMode, CreateOptions, ImageConfig, Limits, Preallocation, SnapshotRef};
pub use engine::Image;
pub use error::{
    AmendError, BackingError, CorruptReason, Corruption, CreateError, Feature, FormatError,
    OpenError, RequestError, Structure, SubmitError, Table,
};
pub use event::Event;
pub use info::{BitmapData, BitmapInfo, ImageInfo, SnapshotInfo};
pub use io::{
    compress_op, decompress_op, IoBuf, IoError, IoKind, IoOp, OpId, Page, Segment, Segments,
    Target, PAGE_SIZE,
};
pub use request::{Allocation, BlockStatus, Outcome, ReqId, Request};
