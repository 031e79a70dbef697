//! Guest operations that both the harness and qemu-io perform, for cases that mirror our
//! writes on a twin image written by QEMU.

use super::must;
use crate::harness::Disk;
use crate::model::Model;

/// One guest operation both qemu-io and the harness can perform.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Step {
    /// `write -P byte offset len`.
    Write { offset: u64, len: u64, byte: u8 },
    /// `write -z [-u] offset len`.
    Zero { offset: u64, len: u64, unmap: bool },
    /// `discard offset len`.
    Discard { offset: u64, len: u64 },
}

impl Step {
    /// The qemu-io command.
    pub(crate) fn qemu_io(self) -> String {
        match self {
            Self::Write { offset, len, byte } => format!("write -P {byte:#x} {offset} {len}"),
            Self::Zero { offset, len, unmap } => {
                format!("write -z {}{offset} {len}", if unmap { "-u " } else { "" })
            }
            Self::Discard { offset, len } => format!("discard {offset} {len}"),
        }
    }

    /// Performs it through the harness (failing the case on an error).
    pub(crate) fn apply<D: Disk>(self, disk: &mut D) {
        let r = match self {
            Self::Write { offset, len, byte } => disk.write_at(&vec![byte; len as usize], offset),
            Self::Zero { offset, len, unmap } => disk.write_zeroes(offset, len, unmap),
            Self::Discard { offset, len } => disk.discard(offset, len),
        };
        must(r, format!("{self:?}"));
    }

    /// What it does to the guest (`cs`: the cluster size, for discards).
    pub(crate) fn apply_to_model(self, model: &mut Model, cs: u64) {
        match self {
            Self::Write { offset, len, byte } => model.write(offset, &vec![byte; len as usize]),
            Self::Zero { offset, len, .. } => model.zero(offset, len),
            Self::Discard { offset, len } => model.discard(offset, len, cs),
        }
    }
}
