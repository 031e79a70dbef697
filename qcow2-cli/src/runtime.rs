//! Which runtime drives qcow2 images (`--runtime sync|smol|uring`), and opening images with
//! the async ones.

use std::path::Path;

use qcow2_sync::OpenOptions;

use crate::error::CliError;

/// One of the engine's runtimes.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Runtime {
    /// `qcow2-sync`: one request at a time, blocking syscalls.
    Sync,
    /// `qcow2-smol`: a driver task, ops on smol's blocking pool.
    Smol,
    /// `qcow2-uring`: a ring thread, ops as io_uring entries.
    Uring,
}

impl Runtime {
    /// Every runtime, in the order tables list them.
    pub const ALL: [Self; 3] = [Self::Sync, Self::Smol, Self::Uring];

    /// The name `--runtime` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sync => "sync",
            Self::Smol => "smol",
            Self::Uring => "uring",
        }
    }

    /// Parses a `--runtime` value.
    pub fn parse(s: &str) -> Result<Self, CliError> {
        Self::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| {
                CliError::new(format!(
                    "Unknown runtime '{s}' (expected sync, smol or uring)"
                ))
            })
    }

    /// Parses an optional `--runtime` value; the default is the fastest available: io_uring
    /// when this kernel offers it, else the blocking runtime.
    pub fn parse_or_default(s: Option<&str>) -> Result<Self, CliError> {
        match s {
            Some(s) => {
                let r = Self::parse(s)?;
                r.available()?;
                Ok(r)
            }
            None if Self::Uring.available().is_ok() => Ok(Self::Uring),
            None => Ok(Self::Sync),
        }
    }

    /// Whether the runtime can run here (io_uring may be missing or disabled).
    pub fn available(self) -> Result<(), CliError> {
        match self {
            Self::Uring => qcow2_uring::probe()
                .map_err(|e| CliError::new(format!("the uring runtime is unavailable: {e}"))),
            _ => Ok(()),
        }
    }

    /// Opens a qcow2 image with an async runtime; `None` for the blocking one.
    pub fn open_async(
        self,
        path: &Path,
        options: &OpenOptions,
    ) -> Option<Result<qcow2_async::Image, qcow2_sync::Error>> {
        match self {
            Self::Sync => None,
            Self::Smol => Some(smol::block_on(qcow2_smol::open(path, options))),
            Self::Uring => Some(qcow2_uring::open(path, options)),
        }
    }
}
