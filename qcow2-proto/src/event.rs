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
    /// Opening needs a backing file: the one named `name` by the image at depth
    /// `depth - 1` (0 is the image itself). The runtime resolves the name (relative names
    /// against the directory of the file that names it), applies its policy, opens the
    /// file read-only and answers with [`Image::attach_backing`](crate::Image::attach_backing),
    /// or gives up on the open. Ops for it then come with target
    /// [`Target::Backing(depth)`](crate::Target::Backing).
    OpenBacking {
        /// Position in the chain (1 = the image's own backing file).
        depth: u32,
        /// The file name as stored in the image.
        name: String,
        /// The format named by the backing-format header extension, if any (`qcow2`,
        /// `raw`); without one the engine probes the file's header.
        format: Option<String>,
    },
    /// Opening needs the image's external data file, named `name` by the image (its
    /// data-file header extension). The runtime resolves the name like a backing file's
    /// (relative to the image's directory), applies its policy, opens it with the image's
    /// writability and answers with
    /// [`Image::attach_data_file`](crate::Image::attach_data_file), or gives up on the open.
    /// Guest data ops then come with target [`Target::DataFile`](crate::Target::DataFile).
    OpenDataFile {
        /// The file name as stored in the image.
        name: String,
    },
    /// The engine stopped accepting writes for good (fail-stop). Emitted once; reopen the
    /// image to go on.
    Poisoned(RequestError),
}
