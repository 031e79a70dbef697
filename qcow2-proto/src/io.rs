//! I/O operations the core asks a runtime to perform, and the buffers they carry.
//!
//! Contract (see the crate doc): every [`IoOp`] returned by
//! [`Image::poll_io`](crate::Image::poll_io) may be started at once, concurrently with every
//! other outstanding op, in any order. Outstanding ops never share a guest span or an owned
//! buffer. Every op goes back to the core through
//! [`Image::complete`](crate::Image::complete), with the buffers it carried, whether it
//! succeeded or not.

use arrayvec::ArrayVec;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::request::ReqId;

/// Identifies one outstanding I/O operation.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct OpId(pub(crate) u32);

impl OpId {
    /// The raw value, for runtimes that need a `u64` token (io_uring's `user_data`).
    pub fn as_u64(self) -> u64 {
        u64::from(self.0)
    }
}

/// Which file an op targets. The runtime opened each of them.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
#[non_exhaustive]
pub enum Target {
    /// The qcow2 image file itself.
    Image,
    /// A file of the backing chain: 1 is the image's backing file, 2 that file's backing
    /// file, and so on (the runtime opened each one when
    /// [`Event::OpenBacking`](crate::Event::OpenBacking) asked for it). Only read.
    Backing(u32),
    /// The image's external data file (opened when
    /// [`Event::OpenDataFile`](crate::Event::OpenDataFile) asked for it, writable with the
    /// image): guest data at host offsets equal to the guest offsets.
    DataFile,
}

/// What to do at [`IoOp::offset`].
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
#[non_exhaustive]
pub enum IoKind {
    /// Read into the segments, in order, from `offset`. A read past the end of the file
    /// fills the rest of the segments with zeroes and reports the bytes actually read.
    Read,
    /// Write the segments, in order, at `offset` (a vectored write).
    Write,
    /// Make every completed write to the target durable (`fdatasync`).
    Flush,
    /// Set the target's length to `offset`.
    SetLen,
    /// Deallocate `len` bytes at `offset` (punch a hole, keep the size); reads return zeroes.
    PunchHole {
        /// Bytes to deallocate.
        len: u64,
    },
    /// Make `len` bytes at `offset` read as zero, allocating them (`fallocate` zero range,
    /// or plain zero writes where that is missing). May extend the file.
    WriteZeroes {
        /// Bytes to zero.
        len: u64,
    },
    /// Allocate `len` bytes at `offset` without changing contents (`fallocate` mode 0).
    Allocate {
        /// Bytes to allocate.
        len: u64,
    },
    /// Fill the guest segments with zeroes. Touches no file.
    ZeroFill,
    /// Decompress a compressed cluster: CPU work the runtime runs where it likes (another
    /// thread, say) by calling [`decompress_op`]. Touches no file. Segments: the compressed
    /// bytes (a buffer), a scratch buffer of `cluster_size` bytes, and the output (a guest
    /// span or a buffer), which gets the decompressed cluster's bytes from `skip` on.
    Decompress {
        /// Bytes of the decompressed cluster.
        cluster_size: u32,
        /// Bytes of the cluster before the output's first byte.
        skip: u32,
        /// zstd (else zlib).
        zstd: bool,
    },
    /// Compress a guest cluster: CPU work the runtime runs where it likes by calling
    /// [`compress_op`]. Touches no file. Segments: the guest span (a whole cluster, or the
    /// image's partial last one), and an output buffer of `cluster_size` bytes, which
    /// `compress_op` cuts to the stream's length (to 0 when compressing does not pay).
    Compress {
        /// Bytes of a cluster (a shorter input is padded with zeroes).
        cluster_size: u32,
        /// zstd (else zlib).
        zstd: bool,
    },
}

/// Size of one [`Page`]; core buffers are aligned to it.
pub const PAGE_SIZE: usize = 4096;

/// One 4 KiB aligned block of memory; [`IoBuf`]s are made of these.
#[derive(Clone, Copy, Debug, FromBytes, Immutable, IntoBytes, KnownLayout)]
#[repr(C, align(4096))]
pub struct Page([u8; PAGE_SIZE]);

/// An owned, 4 KiB aligned buffer with a stable address, allocated by the core.
///
/// A runtime may pass it to the kernel (O_DIRECT, io_uring registered buffers); it hands
/// it back inside the op when the op completes.
#[derive(Debug)]
pub struct IoBuf {
    pages: Box<[Page]>,
    len: usize,
}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let pages = vec![Page([0; PAGE_SIZE]); len.div_ceil(PAGE_SIZE).max(1)].into_boxed_slice();
        Self { pages, len }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the buffer can hold without reallocating.
    pub fn capacity(&self) -> usize {
        self.pages.len() * PAGE_SIZE
    }

    /// Changes the length within the capacity (new bytes keep whatever they held).
    ///
    /// # Panics
    /// If `len` exceeds [`capacity`](Self::capacity).
    pub fn resize(&mut self, len: usize) {
        assert!(len <= self.capacity(), "IoBuf::resize beyond capacity");
        self.len = len;
    }

    /// The contents.
    pub fn as_slice(&self) -> &[u8] {
        &self.pages.as_bytes()[..self.len]
    }

    /// The contents, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.pages.as_mut_bytes()[..self.len]
    }
}

/// One piece of an op's memory.
#[derive(Debug)]
#[non_exhaustive]
pub enum Segment {
    /// `len` bytes of the guest buffer of request `req`, starting `start` bytes into it.
    Guest {
        /// The request whose buffer this is.
        req: ReqId,
        /// Byte offset into that request's buffer.
        start: usize,
        /// Length in bytes.
        len: usize,
    },
    /// A buffer owned by the core (metadata or copy-on-write staging).
    Buf(IoBuf),
    /// `len` zero bytes (for writes; a read into it discards the data).
    Zeroes(usize),
}

impl Segment {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Self::Guest { len, .. } | Self::Zeroes(len) => *len,
            Self::Buf(b) => b.len(),
        }
    }

    /// Whether the segment is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The inline segment list of an op: head, body, tail at most.
pub type Segments = ArrayVec<Segment, 3>;

/// One I/O operation to perform.
#[derive(Debug)]
pub struct IoOp {
    /// Identity, for [`Image::complete`](crate::Image::complete).
    pub id: OpId,
    /// The file to act on.
    pub target: Target,
    /// What to do.
    pub kind: IoKind,
    /// Host byte offset in the target (or the new length, for [`IoKind::SetLen`]).
    pub offset: u64,
    /// The memory the op reads into or writes from, in file order.
    pub segments: Segments,
}

impl IoOp {
    /// Total bytes covered by the segments.
    pub fn len(&self) -> u64 {
        self.segments.iter().map(|s| s.len() as u64).sum()
    }

    /// Whether the segments cover no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Runs an [`IoKind::Decompress`] op: `guest` is the memory of its output segment when that
/// is a guest span (a runtime resolves it as for a read). Returns the output's length; a
/// stream that does not decompress to a whole cluster fails with `InvalidData`.
pub fn decompress_op(op: &mut IoOp, guest: Option<&mut [u8]>) -> Result<usize, IoError> {
    let IoKind::Decompress {
        cluster_size,
        skip,
        zstd,
    } = op.kind
    else {
        return Err(bad_data());
    };
    let kind = if zstd {
        crate::codec::CompressionType::Zstd
    } else {
        crate::codec::CompressionType::Zlib
    };
    let [input, scratch, output] = &mut op.segments[..] else {
        return Err(bad_data());
    };
    let (Segment::Buf(input), Segment::Buf(scratch)) = (input, scratch) else {
        return Err(bad_data());
    };
    let cluster = scratch
        .as_mut_slice()
        .get_mut(..cluster_size as usize)
        .ok_or_else(bad_data)?;
    crate::codec::decompress(kind, input.as_slice(), cluster).map_err(|_| bad_data())?;
    let out = match (output, guest) {
        (Segment::Buf(b), _) => b.as_mut_slice(),
        (Segment::Guest { .. }, Some(g)) => g,
        _ => return Err(bad_data()),
    };
    let src = cluster
        .get(skip as usize..skip as usize + out.len())
        .ok_or_else(bad_data)?;
    out.copy_from_slice(src);
    Ok(out.len())
}

/// Runs an [`IoKind::Compress`] op: `guest` is the memory of its input segment (a runtime
/// resolves it as for a write). The output buffer ends up holding the compressed stream,
/// or empty when the stream would not be shorter than the cluster (QEMU then writes the
/// cluster as it is). Returns the input's length.
pub fn compress_op(op: &mut IoOp, guest: &[u8]) -> Result<usize, IoError> {
    let IoKind::Compress { cluster_size, zstd } = op.kind else {
        return Err(bad_data());
    };
    let kind = if zstd {
        crate::codec::CompressionType::Zstd
    } else {
        crate::codec::CompressionType::Zlib
    };
    let Some(Segment::Buf(out)) = op.segments.last_mut() else {
        return Err(bad_data());
    };
    let cs = cluster_size as usize;
    if guest.len() > cs || out.capacity() < cs {
        return Err(bad_data());
    }
    out.resize(crate::codec::max_compressed_len(
        cluster_size.trailing_zeros(),
    ));
    let padded;
    let input = if guest.len() < cs {
        // The image's partial last cluster: compressed as a whole one, as QEMU does.
        let mut p = vec![0u8; cs];
        p[..guest.len()].copy_from_slice(guest);
        padded = p;
        &padded[..]
    } else {
        guest
    };
    let n = crate::codec::compress(kind, input, out.as_mut_slice()).map_err(|_| bad_data())?;
    out.resize(n.unwrap_or(0));
    Ok(guest.len())
}

fn bad_data() -> IoError {
    IoError {
        kind: std::io::ErrorKind::InvalidData,
        raw_os_error: None,
    }
}

/// A failed I/O, as a small copyable value.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct IoError {
    /// The kind of failure.
    pub kind: std::io::ErrorKind,
    /// The OS error code, when there is one.
    pub raw_os_error: Option<i32>,
}

impl IoError {
    /// `ENOSPC`, the one OS error the core treats apart.
    pub const ENOSPC: i32 = 28;

    /// Whether this is an out-of-space failure.
    pub fn is_no_space(&self) -> bool {
        self.raw_os_error == Some(Self::ENOSPC) || self.kind == std::io::ErrorKind::StorageFull
    }
}

impl From<&std::io::Error> for IoError {
    fn from(e: &std::io::Error) -> Self {
        Self {
            kind: e.kind(),
            raw_os_error: e.raw_os_error(),
        }
    }
}

impl std::fmt::Display for IoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.raw_os_error {
            Some(code) => write!(f, "{} (os error {code})", self.kind),
            None => write!(f, "{}", self.kind),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{compress, CompressionType};

    #[test]
    fn decompress_op_fills_the_output_from_skip() {
        let cluster: Vec<u8> = (0..4096u32).map(|i| (i / 7) as u8).collect();
        let mut packed = IoBuf::zeroed(4096);
        let n = compress(CompressionType::Zlib, &cluster, packed.as_mut_slice())
            .unwrap()
            .unwrap();
        packed.resize(n + 300); // sector padding after the stream
        let mut segments = Segments::new();
        segments.push(Segment::Buf(packed));
        segments.push(Segment::Buf(IoBuf::zeroed(4096)));
        segments.push(Segment::Guest {
            req: ReqId(0),
            start: 0,
            len: 10,
        });
        let kind = IoKind::Decompress {
            cluster_size: 4096,
            skip: 1000,
            zstd: false,
        };
        let mut op = IoOp {
            id: OpId(0),
            target: Target::Image,
            kind,
            offset: 0,
            segments,
        };
        let mut guest = [0u8; 10];
        assert_eq!(decompress_op(&mut op, Some(&mut guest)), Ok(10));
        assert_eq!(guest[..], cluster[1000..1010]);
        // Garbage is a typed error.
        if let Segment::Buf(b) = &mut op.segments[0] {
            b.as_mut_slice().fill(0xff);
        }
        let err = decompress_op(&mut op, Some(&mut guest)).unwrap_err();
        assert_eq!(err.kind, std::io::ErrorKind::InvalidData);
    }
}
