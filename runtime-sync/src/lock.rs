//! Image locking as QEMU does it, so that QEMU and we see each other.
//!
//! QEMU describes an open image by the permissions it holds (consistent read, write, write
//! unchanged, resize) and those it does not share with other users. It takes a shared OFD
//! byte-range lock on byte `100 + p` for each permission `p` it holds and on byte `200 + p`
//! for each it does not share. An open conflicts when another open file description locks
//! `200 + p` for a permission it needs, or `100 + p` for one it will not share. Locks belong
//! to the open file description: they go when the file is closed.
//!
//! A writer holds consistent read, write and resize and shares neither write nor resize; a
//! reader holds consistent read and shares neither write nor resize either (it expects the
//! image not to change under it); with `force_share` (`-U`) a reader shares everything.

use std::fs::File;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use nix::libc;

use crate::Error;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
/// QEMU's names of the permissions, by bit.
const NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const CONSISTENT_READ: i64 = 0;
const WRITE: i64 = 1;
const RESIZE: i64 = 3;

/// How an image is opened, for locking.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum LockMode {
    /// Writable: nobody else may write or resize.
    Write,
    /// Read-only: nobody else may write or resize meanwhile.
    Read,
    /// Read-only, sharing everything (`-U`, `--force-share`): no conflict with writers.
    ForceShare,
}

impl LockMode {
    /// Permissions held and permissions not shared.
    fn perms(self) -> (&'static [i64], &'static [i64]) {
        match self {
            Self::Write => (&[CONSISTENT_READ, WRITE, RESIZE], &[WRITE, RESIZE]),
            Self::Read => (&[CONSISTENT_READ], &[WRITE, RESIZE]),
            Self::ForceShare => (&[CONSISTENT_READ], &[]),
        }
    }
}

fn flock(kind: libc::c_int, byte: i64) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    }
}

/// Whether another open file description holds a lock on `byte`.
fn taken(file: &File, byte: i64) -> Result<bool, Errno> {
    let mut fl = flock(libc::F_WRLCK, byte);
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut fl))?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Takes QEMU's locks on `file` for `mode`, then checks for conflicts with other users.
/// Filesystems without OFD locks are used unlocked, as QEMU does.
pub fn lock_image(file: &File, path: &Path, mode: LockMode) -> Result<(), Error> {
    let (held, unshared) = mode.perms();
    let bytes = held
        .iter()
        .map(|p| PERM_BASE + p)
        .chain(unshared.iter().map(|p| SHARED_BASE + p));
    for byte in bytes {
        match fcntl(file, FcntlArg::F_OFD_SETLK(&flock(libc::F_RDLCK, byte))) {
            Ok(_) => {}
            Err(Errno::EAGAIN | Errno::EACCES) => {}
            // No OFD locks here (old kernel, some network filesystems): go on unlocked.
            Err(_) => return Ok(()),
        }
    }
    // A conflict may be a ghost for a moment: a file closed just now lives on (locks and
    // all) in any child this process forked before it and that has not yet reached exec.
    // So a conflict counts once it has lasted a little while.
    let mut tries = 0;
    loop {
        match conflict(file, held, unshared) {
            None => return Ok(()),
            Some((perm, shared)) if tries >= GHOST_RETRIES => {
                return Err(Error::Locked {
                    path: path.to_owned(),
                    perm: NAMES[perm as usize],
                    shared,
                })
            }
            Some(_) => {
                tries += 1;
                std::thread::sleep(GHOST_WAIT);
            }
        }
    }
}

/// How often, and how long apart, a conflict is looked at again before it counts.
const GHOST_RETRIES: u32 = 10;
const GHOST_WAIT: std::time::Duration = std::time::Duration::from_millis(10);

/// The first conflicting permission, in QEMU's order: held ones (whose "write" lock we
/// cannot get), then unshared ones (whose "shared" lock we cannot get).
fn conflict(file: &File, held: &[i64], unshared: &[i64]) -> Option<(i64, bool)> {
    let taken = |byte: i64| taken(file, byte).unwrap_or(false);
    if let Some(&p) = held.iter().find(|&&p| taken(SHARED_BASE + p)) {
        return Some((p, false));
    }
    unshared
        .iter()
        .find(|&&p| taken(PERM_BASE + p))
        .map(|&p| (p, true))
}
