//! `amend`: the engine side. The task waits until everything before it is durable, runs the
//! [`Amender`] over the file (its ops pass the overlap checks, like the checker's repairs),
//! and reads the metadata again afterwards, since the header, the refcount structure or L2
//! tables may have changed behind the caches.

use crate::amend::{AmendOptions, Amender};
use crate::check::DEFAULT_MEMORY_LIMIT;
use crate::error::SubmitError;
use crate::request::ReqId;

use super::{Image, Kind};

mod sub {
    pub(super) const START: u8 = 0;
    pub(super) const RUN: u8 = 1;
    pub(super) const RELOAD: u8 = 2;
    pub(super) const END: u8 = 3;
}

impl Image {
    /// Changes the image's format options as `qemu-img amend -o` does: `compat` upgrade
    /// (2 → 3), lazy refcounts on or off, a new refcount width, `compat` downgrade
    /// (3 → 2), in that order. Runs alone, after everything before it is durable; done once
    /// every change is. Refusals ([`AmendError`](crate::AmendError) inside
    /// [`RequestError::Amend`](crate::RequestError::Amend)) leave the image as it was;
    /// every change is crash safe (old or new format, never a mix). The image's
    /// [`info`](Self::info) reflects the changes when the request is done.
    pub fn amend(&mut self, options: AmendOptions) -> Result<ReqId, SubmitError> {
        options
            .validate()
            .map_err(|e| SubmitError::Refused(e.into()))?;
        self.submit_kind(Kind::Amend(options), 0, 0)
    }

    pub(super) fn step_amend(&mut self, t: u32, options: AmendOptions) -> bool {
        loop {
            let task = self.task(t);
            if task.sub != sub::RELOAD && task.sub != sub::END && task.error.is_some() {
                if task.inflight > 0 {
                    return false;
                }
                // Whatever was written, the metadata is read again.
                task.sub = sub::RELOAD;
            }
            match self.task(t).sub {
                sub::START => {
                    if self.poisoned.is_none() && !self.wait_all_durable(t) {
                        return false;
                    }
                    let img = crate::amend::Image {
                        file_len: self.file_end,
                        cluster_size: self.geo.cluster_size(),
                        size: self.hdr.size,
                        snapshots: self
                            .info
                            .as_ref()
                            .map(|i| i.snapshots.clone())
                            .unwrap_or_default(),
                        memory_limit: DEFAULT_MEMORY_LIMIT,
                    };
                    self.amender = Some(Box::new(Amender::new(img, options)));
                    self.task(t).sub = sub::RUN;
                }
                sub::RUN => {
                    let amender = self.amender.as_mut().expect("amending");
                    if let Some(result) = amender.poll_result() {
                        self.amender = None;
                        let task = self.task(t);
                        task.error = result.err();
                        task.sub = sub::RELOAD;
                        continue;
                    }
                    if !self.issue_inner_op(t) {
                        return false;
                    }
                }
                sub::RELOAD => {
                    if self.task(t).inflight > 0 {
                        return false;
                    }
                    self.amender = None;
                    self.task(t).sub = sub::END;
                    if self.poisoned.is_some() {
                        return true;
                    }
                    self.reload(t);
                    return false;
                }
                _ => return self.task(t).inflight == 0 && self.reload_task.is_none(),
            }
        }
    }
}
