//! One op at a time, for the sans-IO machines the engine runs over the file (the checker,
//! the amender): the op ready to go, the op outstanding, and its result coming back as
//! the buffer and the byte count.

use crate::io::{IoBuf, IoError, IoOp, OpId, Segment};

use super::pass::Req;

/// The result of an op as a machine takes it: the buffer (empty for flushes) and the bytes
/// transferred.
pub(crate) type OpResult = Result<(IoBuf, usize), IoError>;

/// The op slot of a machine with at most one op outstanding.
#[derive(Debug, Default)]
pub(crate) struct Serial {
    next_id: u32,
    outstanding: Option<OpId>,
    ready: Option<IoOp>,
}

impl Serial {
    /// Whether no op is ready or outstanding (the machine may step).
    pub fn idle(&self) -> bool {
        self.outstanding.is_none() && self.ready.is_none()
    }

    /// Whether an op waits to be taken.
    pub fn has_ready(&self) -> bool {
        self.ready.is_some()
    }

    /// Makes `req` the next op.
    pub fn set(&mut self, req: Req) {
        let id = OpId(self.next_id);
        self.next_id = self.next_id.wrapping_add(1);
        self.ready = Some(req.into_op(id));
    }

    /// Takes the ready op; it is outstanding from now on.
    pub fn take(&mut self) -> Option<IoOp> {
        let op = self.ready.take()?;
        self.outstanding = Some(op.id);
        Some(op)
    }

    /// The outstanding op's result (`None` for an op this slot did not issue).
    pub fn complete(&mut self, op: IoOp, result: Result<usize, IoError>) -> Option<OpResult> {
        if self.outstanding != Some(op.id) {
            return None;
        }
        self.outstanding = None;
        let buf = op.segments.into_iter().find_map(|s| match s {
            Segment::Buf(b) => Some(b),
            _ => None,
        });
        Some(match (result, buf) {
            (Ok(n), Some(buf)) => Ok((buf, n)),
            (Ok(n), None) => Ok((IoBuf::zeroed(0), n)),
            (Err(e), _) => Err(e),
        })
    }
}
