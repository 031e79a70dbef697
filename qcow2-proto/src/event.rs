//! What the core reports back to the runtime.

use crate::error::{OpenError, RequestError};
use crate::info::ImageInfo;
use crate::request::{Outcome, ReqId};

/// An event from [`Image::poll_event`](crate::Image::poll_event).
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// Opening (or creating) finished; requests may be submitted.
    Opened(Box<ImageInfo>),
    /// Opening failed; the engine accepts nothing more.
    OpenFailed(OpenError),
    /// A request finished. Its guest buffer is no longer referenced by any op.
    Done {
        /// The request.
        req: ReqId,
        /// Its result.
        result: Result<Outcome, RequestError>,
    },
    /// The engine stopped accepting writes for good (fail-stop). Emitted once; reopen the
    /// image to go on.
    Poisoned(RequestError),
}
