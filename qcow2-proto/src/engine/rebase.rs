//! Changing what an image sits on: a new backing file name in the header (`rebase`), and
//! dropping every mapping so the backing file shows through again (`commit`'s make-empty).

use crate::error::{RequestError, SubmitError};
use crate::format::extension::with_backing;
use crate::format::MAX_BACKING_NAME;
use crate::io::{IoBuf, IoKind};
use crate::request::ReqId;

use super::tasks::Edit;
use super::{Image, Kind, Purpose};

mod sub {
    pub(super) const START: u8 = 0;
    pub(super) const WRITTEN: u8 = 1;
    pub(super) const SYNCED: u8 = 2;
}

impl Image {
    /// Writes a new backing file into the header: `name` (none: the image stands alone) in
    /// `format` (`qcow2`, `raw`, or none to leave the format to probing), the way `qemu-img
    /// rebase` does; nothing else changes (the guest contents are the caller's business:
    /// `rebase` without `-u` first copies what differs). Runs alone, after everything
    /// before it is durable; done once the header is. Takes effect at the next open (the
    /// backing file attached now stays).
    pub fn set_backing(
        &mut self,
        name: Option<&str>,
        format: Option<&str>,
    ) -> Result<ReqId, SubmitError> {
        let too_long = |s: Option<&str>, max: usize| s.is_some_and(|s| s.len() > max);
        if too_long(name, MAX_BACKING_NAME as usize) || too_long(format, 15) {
            return Err(
                RequestError::Options(crate::error::CreateError::BackingNameTooLong).into(),
            );
        }
        // (Set first: the task may run inside the submit.)
        self.new_backing = Some((name.map(str::to_owned), format.map(str::to_owned)));
        self.submit_kind(Kind::SetBacking, 0, 0)
            .inspect_err(|_| self.new_backing = None)
    }

    /// Make-empty: every cluster's mapping dropped, a run at a time (like discard, but
    /// leaving the entries unallocated, not zero).
    pub(super) fn step_make_empty(&mut self, t: u32) -> bool {
        self.step_edits(t, Edit::Full)
    }

    /// Set-backing: wait until everything is durable, write the header and extension area
    /// as [`with_backing`] lays them out, flush.
    pub(super) fn step_set_backing(&mut self, t: u32) -> bool {
        loop {
            let task = self.task(t);
            let (sub, inflight) = (task.sub, task.inflight);
            if task.error.is_some() {
                return inflight == 0;
            }
            if inflight > 0 || !self.op_room(1) {
                return false;
            }
            match sub {
                sub::START => {
                    if self.poisoned.is_none() && !self.wait_all_durable(t) {
                        return false;
                    }
                    if let Err(e) = self.write_backing_header(t) {
                        self.task(t).error = Some(e);
                        continue;
                    }
                    self.task(t).sub = sub::WRITTEN;
                }
                sub::WRITTEN => {
                    self.issue_bare(Purpose::TaskIo { task: t }, IoKind::Flush, 0);
                    let task = self.task(t);
                    task.inflight += 1;
                    task.sub = sub::SYNCED;
                }
                _ => {
                    self.hdr_disk = self.hdr;
                    let (name, format) = self.new_backing.take().unwrap_or_default();
                    if let Some(l) = self.layout.as_mut() {
                        (l.backing_file, l.backing_format) = (name.clone(), format.clone());
                    }
                    if let Some(info) = self.info.as_mut() {
                        (info.backing_file, info.backing_format) = (name, format);
                    }
                    return true;
                }
            }
        }
    }

    /// Lays out the new header and extension area in the header buffer and writes it.
    fn write_backing_header(&mut self, t: u32) -> Result<(), RequestError> {
        let (name, format) = self.new_backing.clone().unwrap_or_default();
        let cs = self.geo.cluster_size() as usize;
        let limit = self.header_buf.len().min(cs);
        let old_end = (self.hdr.backing_file_offset + u64::from(self.hdr.backing_file_size))
            .min(limit as u64) as usize;
        let area = match self.hdr.backing_file_offset {
            0 => limit,
            off => (off as usize).min(limit),
        };
        let cluster0 = &self.header_buf.as_slice()[..limit];
        let laid = with_backing(
            cluster0,
            self.hdr.header_length as usize,
            area,
            name.as_deref(),
            format.as_deref(),
        )
        .map_err(|e| RequestError::Options(crate::error::CreateError::Format(e)))?;
        let Some((bytes, at, len)) = laid else {
            return Err(RequestError::Options(
                crate::error::CreateError::BackingNameTooLong,
            ));
        };
        self.hdr.backing_file_offset = at;
        self.hdr.backing_file_size = len;
        let end = bytes.len().max(old_end);
        let buf = self.header_buf.as_mut_slice();
        buf[..bytes.len()].copy_from_slice(&bytes);
        buf[bytes.len()..end].fill(0);
        self.hdr.encode(buf);
        let n = end.next_multiple_of(512).min(limit);
        let mut out = IoBuf::zeroed(n);
        out.as_mut_slice()
            .copy_from_slice(&self.header_buf.as_slice()[..n]);
        self.issue_buf(Purpose::Header { task: t }, IoKind::Write, 0, out);
        self.task(t).inflight += 1;
        Ok(())
    }
}
