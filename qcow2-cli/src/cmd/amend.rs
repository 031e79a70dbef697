//! `amend`: change a qcow2 image's format options in place, as `qemu-img amend -o` does:
//! `compat` (upgrade and downgrade), `lazy_refcounts`, `refcount_bits` and `size`;
//! `backing_file`/`backing_fmt` only as they are, creation-only options refused with
//! qemu-img's words.

use std::path::Path;

use qcow2_sync::{AmendOptions, Image, OpenOptions};

use crate::cmd::create::{parse_bool, parse_size_opt, split_options};
use crate::cmd::usage;
use crate::disk::{engine_error, qcow2_open_error, resolve_format, Format};
use crate::error::{CliError, CmdResult};
use crate::progress::Progress;
use crate::AmendArgs;

/// qemu-img's list of qcow2 amend options (`-o help`).
const HELP: &str = "Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.keyslot=<num>  - Select a single keyslot to modify explicitly
  encrypt.new-secret=<str> - New secret to set in the matching keyslots. Empty string to erase
  encrypt.old-secret=<str> - Select all keyslots that match this password
  encrypt.state=<str>    - Select new state of affected keyslots (active/inactive)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size";

/// qcow2 creation options that amend refuses as creation-only.
const CREATE_ONLY: &[&str] = &[
    "cluster_size",
    "preallocation",
    "extended_l2",
    "compression_type",
    "encryption",
    "encrypt.format",
    "encrypt.key-secret",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
];

/// The amend options that take values, as qemu-img parses them (the last of a repeated
/// option wins).
#[derive(Debug, Default)]
struct Parsed {
    compat: Option<String>,
    size: Option<u64>,
    backing_file: Option<String>,
    backing_fmt: Option<String>,
    data_file: Option<String>,
    data_file_raw: Option<bool>,
    lazy_refcounts: Option<bool>,
    refcount_bits: Option<u64>,
    encrypt: bool,
}

/// Parses the options as qemu's option parser does: unknown names and malformed values
/// fail first, whatever the order.
fn parse(opts: &[(String, String)]) -> Result<Parsed, CliError> {
    let mut p = Parsed::default();
    for (k, v) in opts {
        match k.as_str() {
            "compat" => p.compat = Some(v.clone()),
            "size" => p.size = Some(parse_size_opt(k, v).map_err(CliError::new)?),
            "backing_file" => p.backing_file = Some(v.clone()),
            "backing_fmt" => p.backing_fmt = Some(v.clone()),
            "data_file" => p.data_file = Some(v.clone()),
            "data_file_raw" => p.data_file_raw = Some(parse_bool(k, v).map_err(CliError::new)?),
            "lazy_refcounts" => p.lazy_refcounts = Some(parse_bool(k, v).map_err(CliError::new)?),
            "refcount_bits" => {
                let n = v
                    .parse::<u64>()
                    .map_err(|_| CliError::new(format!("Parameter '{k}' expects a number")))?;
                p.refcount_bits = Some(n);
            }
            k if k.starts_with("encrypt.") && !CREATE_ONLY.contains(&k) => p.encrypt = true,
            k if CREATE_ONLY.contains(&k) => {
                return Err(CliError::new(format!(
                    "Invalid parameter '{k}'\nThis option is only supported for image creation"
                )))
            }
            k => return Err(CliError::new(format!("Invalid parameter '{k}'"))),
        }
    }
    Ok(p)
}

/// The engine's options from qemu-img's, checked in the order QEMU's driver checks them
/// (against the open image where QEMU does).
fn engine_options(p: &Parsed, img: &Image) -> Result<AmendOptions, CliError> {
    let mut o = AmendOptions::default();
    if let Some(c) = p.compat.as_deref() {
        o.version = Some(match c {
            "0.10" | "v2" => 2,
            "1.1" | "v3" => 3,
            _ => return Err(CliError::new(format!("Unknown compatibility level {c}"))),
        });
    }
    let info = img.info();
    if p.data_file.is_some() && info.data_file.is_none() {
        return Err(CliError::new(
            "data-file can only be set for images that use an external data file",
        ));
    }
    if p.data_file.is_some() && p.data_file != info.data_file {
        return Err(CliError::new(
            "Changing the external data file's name is not supported yet",
        ));
    }
    if p.data_file_raw == Some(true) && !info.data_file_raw {
        return Err(CliError::new(
            "data-file-raw cannot be set on existing images",
        ));
    }
    if p.data_file_raw == Some(false) && info.data_file_raw {
        return Err(CliError::new("Clearing data-file-raw is not supported yet"));
    }
    o.lazy_refcounts = p.lazy_refcounts;
    if let Some(b) = p.refcount_bits {
        if !(1..=64).contains(&b) || !b.is_power_of_two() {
            return Err(CliError::new(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        o.refcount_bits = Some(b as u32);
    }
    if p.encrypt {
        return Err(CliError::new(
            "Can't amend encryption options - encryption not present",
        ));
    }
    if (p.backing_file.is_some() || p.backing_fmt.is_some())
        && (p.backing_file != info.backing_file || p.backing_fmt != info.backing_format)
    {
        return Err(CliError::new(
            "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.",
        ));
    }
    Ok(o)
}

/// Runs the changes: upgrade, lazy refcounts and refcount width first, then the size, then
/// a downgrade (QEMU's order).
fn amend(img: &mut Image, o: AmendOptions, size: Option<u64>) -> Result<(), String> {
    let version = img.info().version;
    let downgrade = o.version.is_some_and(|v| v < version);
    let first = AmendOptions {
        version: o.version.filter(|_| !downgrade),
        ..o
    };
    if size.is_none() || first != AmendOptions::default() {
        // (Refusals of the downgrade come before anything changes.)
        let all = if size.is_none() { o } else { first };
        img.amend(all).map_err(|e| engine_error(&e))?;
    }
    if let Some(size) = size {
        if size % 512 != 0 {
            return Err("The new size must be a multiple of 512".into());
        }
        img.resize(size, true).map_err(|e| engine_error(&e))?;
        if downgrade {
            let last = AmendOptions {
                version: o.version,
                ..AmendOptions::default()
            };
            img.amend(last).map_err(|e| engine_error(&e))?;
        }
    }
    Ok(())
}

/// Runs `amend`.
pub fn run(a: &AmendArgs) -> CmdResult {
    if a.options.is_empty() {
        return Err(usage("amend", "Must specify options (-o)"));
    }
    let opts = split_options(&a.options);
    if opts
        .iter()
        .any(|(k, v)| v.is_empty() && (k == "help" || k == "?"))
    {
        println!("{HELP}");
        return Ok(0);
    }
    let [path] = a.filenames.as_slice() else {
        return Err(CliError::new("Expecting one image file name"));
    };
    let (format, _) = resolve_format(path, a.format.as_deref(), true)?;
    if format != Format::Qcow2 {
        return Err(CliError::new(format!(
            "Format driver '{}' does not support option amendment",
            format.name()
        )));
    }
    let parsed = parse(&opts)?;
    let mut progress = Progress::new(a.progress && !a.quiet, 1.0);
    progress.set(0.0);
    let mut img = open(path)?;
    let result = engine_options(&parsed, &img)
        .and_then(|o| amend(&mut img, o, parsed.size).map_err(CliError::new));
    let closed = img.close().map_err(|e| CliError::new(engine_error(&e)));
    result.and(closed)?;
    progress.set(100.0);
    progress.end();
    Ok(0)
}

fn open(path: &Path) -> Result<Image, CliError> {
    Image::open(path, &OpenOptions::default()).map_err(|e| qcow2_open_error(path, &e))
}
