//! The scratch files of a benchmark: the fully written raw file (the `raw` column), the fully
//! allocated qcow2 image and the raw backing file (made once), and a fresh qcow2 image of
//! another state for every run on one (so that growth is measured, not overwrites).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use qcow2_sync::{Cache, CreateOptions, Image, OpenOptions, Preallocation};

use super::names::State;
use crate::cmd::create::create_raw;
use crate::disk::engine_error;
use crate::error::{strerror, CliError};
use crate::host;
use crate::raw::{open_file, AlignedBuf};

/// Byte the prepared files are filled with (not zero: nothing may skip it).
const FILL: u8 = 0x5a;

/// Name of the backing file, relative to the overlays (which sit beside it).
const BACKING: &str = "backing.raw";

/// A benchmark error naming what failed.
fn fail(what: &str, e: impl std::fmt::Display) -> CliError {
    CliError::new(format!("bench: {what}: {e}"))
}

/// The scratch directory and what it holds.
#[derive(Debug)]
pub struct Scratch {
    dir: PathBuf,
    size: u64,
    /// Cache mode used to fill files (O_DIRECT where it works: no page cache left behind).
    fill_cache: Cache,
}

impl Scratch {
    /// Files of `size` bytes in `dir`.
    pub fn new(dir: &Path, size: u64, fill_cache: Cache) -> Self {
        Self {
            dir: dir.to_owned(),
            size,
            fill_cache,
        }
    }

    /// The raw file the `raw` column runs on.
    pub fn raw(&self) -> PathBuf {
        self.dir.join("raw.img")
    }

    fn allocated(&self) -> PathBuf {
        self.dir.join("allocated.qcow2")
    }

    fn fresh(&self) -> PathBuf {
        self.dir.join("fresh.qcow2")
    }

    /// Makes the files that last the whole benchmark: the raw file (if `raw`), the
    /// allocated image and the backing file (if some of `states` need them).
    pub fn prepare(&self, raw: bool, states: &[State]) -> Result<(), CliError> {
        if raw {
            self.fill_raw(&self.raw())?;
        }
        if states.contains(&State::Allocated) {
            self.fill_allocated()?;
        }
        if states
            .iter()
            .any(|s| matches!(s, State::Backing | State::BackingExtL2))
        {
            self.fill_raw(&self.dir.join(BACKING))?;
        }
        Ok(())
    }

    fn fill_raw(&self, path: &Path) -> Result<(), CliError> {
        create_raw(path, self.size, Preallocation::Off)
            .map_err(|e| fail("create raw file", strerror(&e)))?;
        let f = open_file(path, true, self.fill_cache)
            .map_err(|e| fail("open raw file", strerror(&e)))?;
        fill(self.size, |chunk, off| {
            f.write_all_at(chunk, off).map_err(|e| strerror(&e))
        })
        .map_err(|e| fail("fill raw file", e))?;
        f.sync_data()
            .map_err(|e| fail("sync raw file", strerror(&e)))
    }

    fn fill_allocated(&self) -> Result<(), CliError> {
        let path = self.allocated();
        let o = OpenOptions {
            cache: self.fill_cache,
            ..OpenOptions::default()
        };
        let mut img = Image::create(&path, &CreateOptions::new(self.size), &o)
            .map_err(|e| fail("create allocated image", engine_error(&e)))?;
        fill(self.size, |chunk, off| {
            img.write_at(chunk, off).map_err(|e| engine_error(&e))
        })
        .map_err(|e| fail("fill allocated image", e))?;
        img.close()
            .map_err(|e| fail("close allocated image", engine_error(&e)))
    }

    /// The image a run on `state` uses: the allocated image, or a freshly made one.
    pub fn image_for(&self, state: State) -> Result<PathBuf, CliError> {
        if state == State::Allocated {
            return Ok(self.allocated());
        }
        let mut c = CreateOptions::new(self.size);
        match state {
            State::Allocated | State::Growing => {}
            State::Metadata => c.preallocation = Preallocation::Metadata,
            State::Backing | State::BackingExtL2 => {
                c.backing_file = Some(BACKING.to_owned());
                c.backing_format = Some("raw".to_owned());
                c.extended_l2 = state == State::BackingExtL2;
            }
        }
        let path = self.fresh();
        let _ = std::fs::remove_file(&path);
        Image::create(&path, &c, &OpenOptions::default())
            .and_then(Image::close)
            .map_err(|e| fail(&format!("create {} image", state.name()), engine_error(&e)))?;
        Ok(path)
    }

    /// Removes the image a run used, unless it is one that lasts.
    ///
    /// The unwritten (zero-filled) ranges that allocation leaves in a fresh image are written
    /// with zeros first: ext4 then merges the file's extents, where deleting thousands of
    /// small written/unwritten extents on a file system mounted with `discard` issues one
    /// discard each (about 8 s for an image after 0.8 s of random 8 KiB writes, against
    /// 1.3 s with the zeros written first).
    pub fn done_with(&self, path: &Path) {
        if path == self.fresh() {
            let _ = self.write_holes(path);
            let _ = std::fs::remove_file(path);
        }
    }

    /// Writes zeros over the holes (and unwritten extents) of the file at `path`.
    fn write_holes(&self, path: &Path) -> std::io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let f = open_file(path, true, self.fill_cache)?;
        let len = f.metadata()?.len();
        let zeros = AlignedBuf::new(CHUNK as usize);
        let mut off = 0;
        while off < len {
            let Some(ext) = host::extent_at(&f, len, off, len - off) else {
                return Ok(());
            };
            let end = (off + ext.len).min(len);
            if ext.hole {
                // Whole 4 KiB blocks inside the hole (O_DIRECT), never past the end.
                let mut at = off.next_multiple_of(4096);
                let stop = end - end % 4096;
                while at < stop {
                    let n = (stop - at).min(CHUNK) as usize;
                    f.write_all_at(&zeros.as_slice()[..n], at)?;
                    at += n as u64;
                }
            }
            off = end;
        }
        Ok(())
    }
}

/// Writes `size` bytes of [`FILL`] through `write`, 1 MiB at a time from an aligned buffer.
fn fill(size: u64, mut write: impl FnMut(&[u8], u64) -> Result<(), String>) -> Result<(), String> {
    let mut buf = AlignedBuf::new(1 << 20);
    buf.as_mut_slice().fill(FILL);
    let mut off = 0;
    while off < size {
        let n = (size - off).min(1 << 20) as usize;
        write(&buf.as_slice()[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// Whether O_DIRECT works in `dir` (it does not on tmpfs).
pub fn direct_io_works(dir: &Path) -> bool {
    let path = dir.join("direct-probe");
    let ok = (|| -> std::io::Result<()> {
        std::fs::write(&path, [])?;
        let f = open_file(&path, true, Cache::None)?;
        let buf = AlignedBuf::new(4096);
        f.write_all_at(buf.as_slice(), 0)
    })()
    .is_ok();
    let _ = std::fs::remove_file(&path);
    ok
}
