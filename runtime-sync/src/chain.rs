//! The files of an image's backing chain, and its external data file, opened as the engine
//! names them.
//!
//! The engine decides everything about the format (it reads the backing-format extension
//! or probes the header); this module only resolves names and opens files: backing files
//! read-only, with the image's cache mode and QEMU's locks (a reader's: nobody may write
//! the backing file meanwhile, unless `force_share`); the data file with the image's
//! writability and locks (QEMU opens it as a child of the image, with the same
//! permissions), under the same policy as backing files.

use std::fs::File;
use std::path::{Path, PathBuf};

use qcow2_proto::{IoError, Target};

use crate::{open_file, Error, HostFile, OpenOptions};

/// What an op for a file the chain does not have fails with.
pub(crate) fn missing() -> IoError {
    IoError::from(&std::io::Error::from(std::io::ErrorKind::NotFound))
}

/// Whether an image may open the backing files it names.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum BackingPolicy {
    /// Open them (relative names against the directory of the file naming them), as QEMU
    /// does.
    #[default]
    Follow,
    /// Refuse to open any file named inside an image (for untrusted images): opening an
    /// image with a backing file fails with [`Error::BackingRefused`].
    Refuse,
    /// Open the image without its backing file, for metadata work (`create -u`,
    /// `rebase -u`): requests that need the backing file's data fail with
    /// `Unsupported(BackingFile)`.
    Skip,
}

/// The opened backing files, by depth (index 0 is depth 1).
#[derive(Debug, Default)]
pub struct Chain {
    /// Path of the image itself, when known (relative names resolve against its
    /// directory).
    image: Option<PathBuf>,
    files: Vec<(PathBuf, File)>,
    /// The image's external data file.
    data: Option<(PathBuf, File)>,
}

impl Chain {
    /// An empty chain for the image at `image` (`None`: an image without a path, whose
    /// relative backing names cannot be resolved).
    pub fn new(image: Option<&Path>) -> Self {
        Self {
            image: image.map(Path::to_owned),
            files: Vec::new(),
            data: None,
        }
    }

    /// The image's external data file, once opened.
    pub fn data_file(&self) -> Option<&File> {
        self.data.as_ref().map(|(_, f)| f)
    }

    /// Path of the external data file, once opened.
    pub fn data_path(&self) -> Option<&Path> {
        self.data.as_ref().map(|(p, _)| p.as_path())
    }

    /// Creates (or truncates) the data file `name` for an image being created at the
    /// chain's image path, as `qemu-img create -o data_file=` does; the engine then sets its
    /// length when it asks for it.
    pub fn create_data_file(&mut self, name: &str, options: &OpenOptions) -> Result<(), Error> {
        let path = resolve(name, self.image.as_deref())?;
        let file = open_file(&path, options, true).map_err(|e| data_error(e, name, &path))?;
        self.data = Some((path, file));
        Ok(())
    }

    /// Opens the external data file `name` named by the image (relative to the image's
    /// directory), writable when the image is; returns its length. A file created by
    /// [`create_data_file`](Self::create_data_file) is reused.
    pub fn open_data_file(&mut self, name: &str, options: &OpenOptions) -> Result<u64, Error> {
        if self.data.is_none() {
            if options.backing == BackingPolicy::Refuse {
                return Err(Error::DataFileRefused {
                    name: name.to_owned(),
                });
            }
            let path = resolve(name, self.image.as_deref())?;
            let file = open_file(&path, options, false).map_err(|e| data_error(e, name, &path))?;
            self.data = Some((path, file));
        }
        let (path, file) = self.data.as_ref().expect("just opened");
        HostFile::len(file).map_err(|source| Error::DataFile {
            name: name.to_owned(),
            path: path.clone(),
            source,
        })
    }

    /// The file at `depth` (1 = the image's backing file).
    pub fn file(&self, depth: u32) -> Option<&File> {
        self.files.get(depth as usize - 1).map(|(_, f)| f)
    }

    /// The file for an op of `target`: `image`, or one of the chain.
    pub fn pick<'a>(&'a self, image: &'a File, target: Target) -> Result<&'a File, IoError> {
        match target {
            Target::Image => Ok(image),
            Target::Backing(d) => self.file(d).ok_or_else(missing),
            Target::DataFile => self.data_file().ok_or_else(missing),
            _ => Err(missing()),
        }
    }

    /// Paths of the opened backing files, top down.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _)| p.as_path())
    }

    /// Opens the file named `name` by the image at `depth - 1`; returns its length.
    pub fn open(&mut self, depth: u32, name: &str, options: &OpenOptions) -> Result<u64, Error> {
        if options.backing == BackingPolicy::Refuse {
            return Err(Error::BackingRefused {
                name: name.to_owned(),
            });
        }
        let namer = match depth {
            1 => self.image.as_deref(),
            d => self.files.get(d as usize - 2).map(|(p, _)| p.as_path()),
        };
        let path = resolve(name, namer)?;
        let backing = OpenOptions {
            read_only: true,
            ..*options
        };
        let file = open_file(&path, &backing, false).map_err(|e| match e {
            Error::File { source, .. } => Error::BackingFile {
                name: name.to_owned(),
                path: path.clone(),
                source,
            },
            e => e,
        })?;
        let len = HostFile::len(&file).map_err(|source| Error::BackingFile {
            name: name.to_owned(),
            path: path.clone(),
            source,
        })?;
        self.files.truncate(depth as usize - 1);
        self.files.push((path, file));
        Ok(len)
    }
}

fn data_error(e: Error, name: &str, path: &Path) -> Error {
    match e {
        Error::File { source, .. } => Error::DataFile {
            name: name.to_owned(),
            path: path.to_owned(),
            source,
        },
        e => e,
    }
}

/// The path a backing name stands for: `file:` prefixes dropped; relative names against
/// the directory of `namer` (the file that names it). Other protocols are not files.
fn resolve(name: &str, namer: Option<&Path>) -> Result<PathBuf, Error> {
    let name = name.strip_prefix("file:").unwrap_or(name);
    let protocol = name
        .split_once(':')
        .is_some_and(|(p, _)| !p.is_empty() && !p.contains('/'));
    if protocol || name.is_empty() {
        return Err(Error::BackingUnsupported {
            name: name.to_owned(),
        });
    }
    let path = Path::new(name);
    if path.is_absolute() {
        return Ok(path.to_owned());
    }
    match namer {
        Some(p) => Ok(p.parent().unwrap_or(Path::new("")).join(path)),
        None => Err(Error::BackingUnsupported {
            name: name.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_like_qemu() {
        let img = Path::new("/vm/disks/top.qcow2");
        let r = |n| resolve(n, Some(img)).map_err(|e| e.to_string());
        assert_eq!(r("base.qcow2").unwrap(), Path::new("/vm/disks/base.qcow2"));
        assert_eq!(
            r("../b/base.raw").unwrap(),
            Path::new("/vm/disks/../b/base.raw")
        );
        assert_eq!(r("/abs/base").unwrap(), Path::new("/abs/base"));
        assert_eq!(r("file:base").unwrap(), Path::new("/vm/disks/base"));
        assert_eq!(r("./a:b").unwrap(), Path::new("/vm/disks/./a:b"));
        assert!(r("nbd:localhost:10809").is_err());
        assert!(r("json:{}").is_err());
        assert!(resolve("rel", None).is_err());
        assert_eq!(
            resolve("base", Some(Path::new("top"))).unwrap(),
            Path::new("base")
        );
    }
}
