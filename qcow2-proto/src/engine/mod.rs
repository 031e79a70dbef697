//! The engine (stub while the real one is written).

use crate::{CreateOptions, Event, ImageConfig, ImageInfo, IoError, IoOp, ReqId, Request, SubmitError};

/// The qcow2 engine.
#[derive(Debug)]
pub struct Image {
    _config: ImageConfig,
}

impl Image {
    /// Starts opening an image.
    pub fn open(config: ImageConfig) -> Self {
        Self { _config: config }
    }
    /// Starts creating an image.
    pub fn create(config: ImageConfig, _opts: CreateOptions) -> Self {
        Self { _config: config }
    }
    /// Submits a request.
    pub fn submit(&mut self, _req: Request) -> Result<ReqId, SubmitError> {
        Err(SubmitError::NotOpen)
    }
    /// Completes an op.
    pub fn complete(&mut self, _op: IoOp, _result: Result<usize, IoError>) {}
    /// Next op.
    pub fn poll_io(&mut self) -> Option<IoOp> {
        None
    }
    /// Next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        None
    }
    /// Info.
    pub fn info(&self) -> Option<&ImageInfo> {
        None
    }
}
