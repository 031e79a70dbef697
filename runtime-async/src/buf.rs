//! Owned guest buffers: callers move them into a request and get them back with its result.

use std::any::Any;

use qcow2_proto::IoBuf;

use crate::Error;

/// The result of a request that took a buffer: the buffer comes back whatever happened.
pub type BufResult<T, B> = (Result<T, Error>, B);

/// Memory a guest read fills or a guest write takes its data from.
///
/// Implemented for `Vec<u8>`, `Box<[u8]>` and the core's page-aligned [`IoBuf`] (which goes
/// to the kernel as it is under `O_DIRECT`; other buffers may need a bounce copy there).
/// The runtime boxes the buffer for the request's lifetime and takes the slice once, so the
/// slice must describe memory owned by the value (every implementation here does).
pub trait GuestBuf: Any + Send + Sync {
    /// The bytes.
    fn as_slice(&self) -> &[u8];
    /// The bytes, writable.
    fn as_mut_slice(&mut self) -> &mut [u8];
}

impl GuestBuf for Vec<u8> {
    fn as_slice(&self) -> &[u8] {
        self
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        self
    }
}

impl GuestBuf for Box<[u8]> {
    fn as_slice(&self) -> &[u8] {
        self
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        self
    }
}

impl GuestBuf for IoBuf {
    fn as_slice(&self) -> &[u8] {
        IoBuf::as_slice(self)
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        IoBuf::as_mut_slice(self)
    }
}

/// Turns a boxed buffer back into the caller's type.
pub(crate) fn unbox<B: GuestBuf>(buf: Box<dyn GuestBuf>) -> B {
    let any: Box<dyn Any> = buf;
    *any.downcast::<B>()
        .unwrap_or_else(|_| unreachable!("a request returns the buffer it was given"))
}
