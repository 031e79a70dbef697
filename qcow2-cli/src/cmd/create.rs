//! `create`, and the `-o key=value` creation options it shares with `convert`.

use std::fs::OpenOptions as FsOpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use qcow2_proto::CreateError;
use qcow2_sync::{CreateOptions, Image, OpenOptions, Preallocation};

use crate::disk::{engine_error, Format};
use crate::error::{strerror, CliError, CmdResult};
use crate::size::parse_size;
use crate::CreateArgs;

/// Options qemu knows that this tool does not implement yet, with what they are.
const NOT_YET: [(&str, &str); 2] = [("encryption", "encryption"), ("encrypt.", "encryption")];

/// `-o help` for each format.
fn help(format: Format) -> String {
    let rows: &[(&str, &str)] = match format {
        Format::Qcow2 => &[
            ("backing_file=<str>", "File name of a base image"),
            (
                "backing_fmt=<str>",
                "Image format of the base image (qcow2 or raw)",
            ),
            ("cluster_size=<size>", "qcow2 cluster size"),
            (
                "compat=<str>",
                "Compatibility level (v2 [0.10] or v3 [1.1])",
            ),
            (
                "compression_type=<str>",
                "Compression method used for image cluster compression (zlib or zstd)",
            ),
            (
                "extended_l2=<bool (on/off)>",
                "Extended L2 tables (off only)",
            ),
            (
                "lazy_refcounts=<bool (on/off)>",
                "Postpone refcount updates",
            ),
            (
                "preallocation=<str>",
                "Preallocation mode (allowed values: off, metadata, falloc, full)",
            ),
            (
                "refcount_bits=<num>",
                "Width of a reference count entry in bits",
            ),
            ("size=<size>", "Virtual disk size"),
        ],
        Format::Raw => &[
            (
                "preallocation=<str>",
                "Preallocation mode (allowed values: off, falloc, full)",
            ),
            ("size=<size>", "Virtual disk size"),
        ],
    };
    let mut out = format!("Supported {} options:\n", format.name());
    for (name, what) in rows {
        out.push_str(&format!("  {name:<22} - {what}\n"));
    }
    out.push_str("\nNot supported yet: encryption, encrypt.*.\n");
    out
}

/// Splits qemu option strings (`a=b,c=d`, `,,` for a literal comma) into key/value pairs.
pub fn split_options(opts: &[String]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for s in opts {
        let mut items = Vec::new();
        let mut cur = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    cur.push(',');
                } else {
                    items.push(std::mem::take(&mut cur));
                }
            } else {
                cur.push(c);
            }
        }
        items.push(cur);
        for item in items.into_iter().filter(|i| !i.is_empty()) {
            match item.split_once('=') {
                Some((k, v)) => out.push((k.to_string(), v.to_string())),
                None => out.push((item, String::new())),
            }
        }
    }
    out
}

/// Adds `-b` and `-F` (`backing`, `format`) to the `-o` options, after them: they win over
/// `backing_file=` and `backing_fmt=`, as in qemu-img. Returns the backing file and format
/// the options then name.
pub fn add_backing_options(
    opts: &mut Vec<(String, String)>,
    backing: Option<&str>,
    format: Option<&str>,
) -> (Option<String>, Option<String>) {
    if let Some(b) = backing {
        opts.push(("backing_file".into(), b.into()));
    }
    if let Some(f) = format {
        opts.push(("backing_fmt".into(), f.into()));
    }
    let last = |k: &str| {
        opts.iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    (last("backing_file"), last("backing_fmt"))
}

/// Whether the options ask for help.
pub fn wants_help(opts: &[(String, String)]) -> bool {
    opts.iter()
        .any(|(k, v)| v.is_empty() && (k == "help" || k == "?"))
}

/// Parses boolean option `key`'s value `v` as qemu does (`on`/`off` and friends).
pub fn parse_bool(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

/// Parses size option `key`'s value `v` as qemu does, with its message on failure.
pub fn parse_size_opt(key: &str, v: &str) -> Result<u64, String> {
    parse_size(v).map_err(|_| {
        format!(
            "Parameter '{key}' expects a non-negative number below 2^64\n\
             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively."
        )
    })
}

/// What to create: the validated options and qemu's `Formatting ...` line.
#[derive(Debug)]
pub struct Plan {
    /// The format.
    pub format: Format,
    /// Virtual size.
    pub size: u64,
    /// qcow2 layout (also carries the preallocation for raw).
    pub qcow2: CreateOptions,
    /// The options as qemu echoes them (`fmt=qcow2 cluster_size=65536 ...`).
    pub echo: String,
    /// An error qemu reports only after printing the `Formatting` line.
    pub late_error: Option<String>,
}

/// Validates creation options like qemu: errors in the spelling of options fail at once;
/// errors in their values are returned in `late_error`, reported after the echo line.
/// `size` is the positional size (or the source size for `convert`).
pub fn plan(format: Format, opts: &[(String, String)], size: Option<u64>) -> Result<Plan, String> {
    let mut cluster_size: Option<u64> = None;
    let mut refcount_bits: Option<u64> = None;
    let mut opt_size: Option<u64> = None;
    let mut strings: Vec<(&str, String)> = Vec::new();
    let set_string = |strings: &mut Vec<(&str, String)>, k: &'static str, v: &str| {
        strings.retain(|(key, _)| *key != k);
        strings.push((k, v.to_string()));
    };
    for (k, v) in opts {
        if let Some((_, what)) = NOT_YET
            .iter()
            .find(|(name, _)| k == name || (name.ends_with('.') && k.starts_with(name)))
        {
            if format == Format::Qcow2 {
                return Err(format!(
                    "Option '{k}' is not supported yet ({what} are not implemented)"
                ));
            }
        }
        match (format, k.as_str()) {
            (_, "size") => opt_size = Some(parse_size_opt(k, v)?),
            (_, "preallocation") => set_string(&mut strings, "preallocation", v),
            (Format::Qcow2, "cluster_size") => cluster_size = Some(parse_size_opt(k, v)?),
            (Format::Qcow2, "refcount_bits") => {
                refcount_bits = Some(
                    v.parse()
                        .map_err(|_| format!("Parameter '{k}' expects a number"))?,
                )
            }
            (Format::Qcow2, "compat") => set_string(&mut strings, "compat", v),
            (Format::Qcow2, "backing_file") => set_string(&mut strings, "backing_file", v),
            (Format::Qcow2, "backing_fmt") => set_string(&mut strings, "backing_fmt", v),
            (Format::Qcow2, "data_file") => set_string(&mut strings, "data_file", v),
            (Format::Qcow2, "data_file_raw") => {
                parse_bool(k, v)?;
                set_string(&mut strings, "data_file_raw", v);
            }
            (Format::Raw, "backing_file" | "backing_fmt") => {
                return Err("Backing file not supported for file format 'raw'".into())
            }
            (Format::Qcow2, "lazy_refcounts") => {
                parse_bool(k, v)?;
                set_string(&mut strings, "lazy_refcounts", v);
            }
            (Format::Qcow2, "extended_l2") => {
                parse_bool(k, v)?;
                set_string(&mut strings, "extended_l2", v);
            }
            (Format::Qcow2, "compression_type") => set_string(&mut strings, "compression_type", v),
            _ => return Err(format!("Invalid parameter '{k}'")),
        }
    }
    let size = match (size, opt_size) {
        (Some(_), Some(_)) => return Err("The image size must be specified only once".into()),
        (Some(s), None) | (None, Some(s)) => s,
        (None, None) => return Err("Image creation needs a size parameter".into()),
    };
    let get = |k: &str| {
        strings
            .iter()
            .find(|(key, _)| *key == k)
            .map(|(_, v)| v.clone())
    };
    let mut late_error = None;
    let mut late = |e: String| {
        if late_error.is_none() {
            late_error = Some(e);
        }
    };
    let preallocation = match get("preallocation").as_deref() {
        None | Some("off") => Preallocation::Off,
        Some("metadata") if format == Format::Qcow2 => Preallocation::Metadata,
        Some("metadata") => {
            late("Unsupported preallocation mode: metadata".into());
            Preallocation::Off
        }
        Some("falloc") => Preallocation::Falloc,
        Some("full") => Preallocation::Full,
        Some(other) => {
            late(format!(
                "Parameter 'preallocation' does not accept value '{other}'"
            ));
            Preallocation::Off
        }
    };
    let mut qcow2 = CreateOptions::new(size);
    qcow2.preallocation = preallocation;
    let mut echo = format!("fmt={}", format.name());
    match format {
        Format::Raw => {
            echo.push_str(&format!(" size={size}"));
            if let Some(p) = get("preallocation") {
                echo.push_str(&format!(" preallocation={p}"));
            }
        }
        Format::Qcow2 => {
            let cs = cluster_size.unwrap_or(65536);
            let rb = refcount_bits.unwrap_or(16);
            echo.push_str(&format!(" cluster_size={cs}"));
            echo.push_str(&format!(
                " extended_l2={}",
                get("extended_l2").unwrap_or_else(|| "off".into())
            ));
            if let Some(p) = get("preallocation") {
                echo.push_str(&format!(" preallocation={p}"));
            }
            echo.push_str(&format!(
                " compression_type={}",
                get("compression_type").unwrap_or_else(|| "zlib".into())
            ));
            echo.push_str(&format!(" size={size}"));
            if let Some(c) = get("compat") {
                echo.push_str(&format!(" compat={c}"));
            }
            qcow2.backing_file = get("backing_file");
            qcow2.backing_format = get("backing_fmt");
            if let Some(b) = &qcow2.backing_file {
                echo.push_str(&format!(" backing_file={b}"));
            }
            if let Some(f) = &qcow2.backing_format {
                echo.push_str(&format!(" backing_fmt={f}"));
            }
            qcow2.data_file = get("data_file");
            if let Some(d) = &qcow2.data_file {
                echo.push_str(&format!(" data_file={d}"));
            }
            if let Some(r) = get("data_file_raw") {
                echo.push_str(&format!(" data_file_raw={r}"));
                qcow2.data_file_raw = parse_bool("data_file_raw", &r).unwrap_or(false);
            }
            let lazy = get("lazy_refcounts");
            echo.push_str(&format!(
                " lazy_refcounts={}",
                lazy.clone().unwrap_or_else(|| "off".into())
            ));
            echo.push_str(&format!(" refcount_bits={rb}"));

            qcow2.version = match get("compat").as_deref() {
                None | Some("1.1") | Some("v3") => 3,
                Some("0.10") | Some("v2") => 2,
                Some(other) => {
                    late(format!(
                        "Parameter 'version' does not accept value '{other}'"
                    ));
                    3
                }
            };
            qcow2.lazy_refcounts = lazy
                .as_deref()
                .is_some_and(|v| parse_bool("lazy_refcounts", v).unwrap_or(false));
            if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
                late("Cluster size must be a power of two between 512 and 2048k".into());
            }
            qcow2.extended_l2 =
                get("extended_l2").is_some_and(|v| parse_bool("extended_l2", &v).unwrap_or(false));
            if qcow2.extended_l2 && qcow2.version < 3 {
                late(CreateError::ExtendedL2NeedsV3.to_string());
            }
            if qcow2.extended_l2 && cs < 16384 {
                late(CreateError::ExtendedL2ClusterSize.to_string());
            }
            if !rb.is_power_of_two() || rb > 64 {
                late("Refcount width must be a power of two and may not exceed 64 bits".into());
            }
            if qcow2.version == 2 && rb != 16 {
                late("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)".into());
            }
            if qcow2.backing_file.is_some()
                && preallocation != Preallocation::Off
                && !qcow2.extended_l2
            {
                late("Backing file and preallocation can only be used at the same time if extended_l2 is on".into());
            }
            qcow2.compression_type = match get("compression_type").as_deref() {
                None | Some("zlib") => qcow2_proto::codec::CompressionType::Zlib,
                Some("zstd") => qcow2_proto::codec::CompressionType::Zstd,
                Some(other) => {
                    late(format!(
                        "Parameter 'compression-type' does not accept value '{other}'"
                    ));
                    qcow2_proto::codec::CompressionType::Zlib
                }
            };
            if qcow2.version == 2
                && qcow2.compression_type != qcow2_proto::codec::CompressionType::Zlib
            {
                late("Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)".into());
            }
            if qcow2.version == 2 && qcow2.data_file.is_some() {
                late("External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)".into());
            }
            if qcow2.data_file_raw && qcow2.data_file.is_none() {
                late("data-file-raw requires data-file".into());
            }
            if qcow2.version == 2 && qcow2.lazy_refcounts {
                late("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)".into());
            }
            qcow2.cluster_size = cs.min(u64::from(u32::MAX)) as u32;
            qcow2.refcount_bits = rb.min(u64::from(u32::MAX)) as u32;
        }
    }
    Ok(Plan {
        format,
        size,
        qcow2,
        echo,
        late_error,
    })
}

/// Creates the image `plan` describes at `path` and closes it.
pub fn create_image(path: &Path, plan: &Plan) -> Result<(), String> {
    match plan.format {
        Format::Qcow2 => {
            // The backing file was checked already (or `-u` says not to): the new image is
            // only formatted, never read through it.
            let options = OpenOptions {
                backing: qcow2_sync::BackingPolicy::Skip,
                ..OpenOptions::default()
            };
            let img = Image::create(path, &plan.qcow2, &options).map_err(|e| engine_error(&e))?;
            img.close().map_err(|e| engine_error(&e))
        }
        Format::Raw => {
            create_raw(path, plan.size, plan.qcow2.preallocation).map_err(|e| strerror(&e))
        }
    }
}

/// Creates a raw file of `size` bytes with the given preallocation.
pub fn create_raw(path: &Path, size: u64, prealloc: Preallocation) -> std::io::Result<()> {
    // qemu sizes block devices in sectors.
    let size = size.next_multiple_of(512);
    let file = FsOpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    match prealloc {
        Preallocation::Off | Preallocation::Metadata => {
            file.set_len(size)?;
            allocate_first_block(&file, size)?;
        }
        Preallocation::Falloc => {
            if size > 0
                && rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, size)
                    .is_err()
            {
                file.set_len(size)?;
            }
            allocate_first_block(&file, size)?;
        }
        Preallocation::Full => {
            let zeroes = vec![0u8; 1 << 20];
            let mut pos = 0;
            while pos < size {
                let n = (size - pos).min(zeroes.len() as u64) as usize;
                file.write_all_at(&zeroes[..n], pos)?;
                pos += n as u64;
            }
            file.set_len(size)?;
        }
    }
    Ok(())
}

/// Writes zeroes over the first block, as qemu's `allocate_first_block` does so that the
/// file's block size can be probed: 4 KiB, or one sector for smaller files.
fn allocate_first_block(file: &std::fs::File, size: u64) -> std::io::Result<()> {
    if size == 0 {
        return Ok(());
    }
    let n = if size < 4096 { 512 } else { 4096 };
    file.write_all_at(&[0u8; 4096][..n], 0)
}

fn parse_image_size(s: &str) -> Result<u64, CliError> {
    if s.starts_with('-') {
        return Err(CliError::new(
            "Invalid image size specified. Must be between 0 and 9223372036854775807.",
        ));
    }
    let size = parse_size(s)
        .map_err(|_| CliError::new(format!("Invalid image size specified: '{s}'.")))?;
    if size > i64::MAX as u64 {
        return Err(CliError::new(
            "Invalid image size specified. Must be between 0 and 9223372036854775807.",
        ));
    }
    Ok(size)
}

/// Checks the backing file of a new image as qemu-img does, and returns its virtual size
/// (`None` with `-u`, which does not open it): the format must be given; the file,
/// resolved against the new image's directory, must open as that format.
fn backing_size(
    image: &Path,
    backing: &str,
    format: Option<&str>,
    unsafe_backing: bool,
) -> Result<Option<u64>, String> {
    let path = crate::disk::backing_path(image, backing);
    let Some(format) = format else {
        let detected = crate::disk::probe(&path)
            .map(|f| format!("\nDetected format of {}.", f.name()))
            .unwrap_or_default();
        return Err(format!(
            "Backing file specified without backing format{detected}"
        ));
    };
    if unsafe_backing {
        return Ok(None);
    }
    let format = Format::parse(format)
        .map_err(|e| format!("{}\nCould not open backing image.", e.message))?;
    let opts = crate::disk::DiskOptions {
        read_only: true,
        force_share: true,
        ..Default::default()
    };
    let disk = crate::disk::open_backing(&path, Some(format), opts, true)
        .map_err(|m| format!("{m}\nCould not open backing image."))?;
    Ok(Some(disk.len()))
}

/// Runs `create`.
pub fn run(a: &CreateArgs) -> CmdResult {
    let format = Format::parse(&a.format)?;
    let opts = split_options(&a.options);
    if wants_help(&opts) {
        print!("{}", help(format));
        return Ok(0);
    }
    let Some(path) = &a.filename else {
        return Err(CliError::new(
            "Expecting image file name\nTry 'qcow2 create --help' for more information",
        ));
    };
    let name = path.display();
    if !a.object.is_empty() {
        return Err(CliError::new(
            "--object is not supported yet (encryption is not implemented)",
        ));
    }
    let mut opts = opts;
    let (backing, backing_format) =
        add_backing_options(&mut opts, a.backing.as_deref(), a.backing_format.as_deref());
    let mut size = a.size.as_deref().map(parse_image_size).transpose()?;
    if let (Format::Qcow2, Some(backing)) = (format, backing) {
        let size_of_backing =
            backing_size(path, &backing, backing_format.as_deref(), a.unsafe_backing)
                .map_err(|e| CliError::new(format!("{name}: {e}")))?;
        if size.is_none() && !opts.iter().any(|(k, _)| k == "size") {
            size = size_of_backing;
        }
    }
    let plan = plan(format, &opts, size).map_err(|e| CliError::new(format!("{name}: {e}")))?;
    if !a.quiet {
        println!("Formatting '{name}', {}", plan.echo);
    }
    if let Some(e) = &plan.late_error {
        return Err(CliError::new(format!("{name}: {e}")));
    }
    create_image(path, &plan).map_err(|e| CliError::new(format!("{name}: {e}")))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo(format: Format, o: &str, size: Option<u64>) -> Result<String, String> {
        let opts = split_options(&[o.to_string()]);
        plan(format, &opts, size).map(|p| p.echo)
    }

    #[test]
    fn echoes_like_qemu() {
        assert_eq!(
            echo(Format::Qcow2, "", Some(67108864)).unwrap(),
            "fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=67108864 lazy_refcounts=off refcount_bits=16"
        );
        assert_eq!(
            echo(Format::Qcow2, "preallocation=full,cluster_size=4k", Some(1 << 20)).unwrap(),
            "fmt=qcow2 cluster_size=4096 extended_l2=off preallocation=full compression_type=zlib size=1048576 lazy_refcounts=off refcount_bits=16"
        );
        assert_eq!(
            echo(Format::Qcow2, "compat=0.10,refcount_bits=8", Some(1 << 30)).unwrap(),
            "fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=1073741824 compat=0.10 lazy_refcounts=off refcount_bits=8"
        );
        assert_eq!(
            echo(Format::Raw, "preallocation=full", Some(1 << 20)).unwrap(),
            "fmt=raw size=1048576 preallocation=full"
        );
    }

    #[test]
    fn rejects_like_qemu() {
        assert_eq!(
            echo(Format::Qcow2, "foo=bar", Some(1)).unwrap_err(),
            "Invalid parameter 'foo'"
        );
        assert_eq!(
            echo(Format::Qcow2, "", None).unwrap_err(),
            "Image creation needs a size parameter"
        );
        assert_eq!(
            echo(Format::Qcow2, "size=1M", Some(1)).unwrap_err(),
            "The image size must be specified only once"
        );
        assert!(echo(Format::Qcow2, "encrypt.format=luks", Some(1))
            .unwrap_err()
            .contains("not supported yet"));
        assert!(echo(Format::Qcow2, "extended_l2=on", Some(1))
            .unwrap()
            .contains("extended_l2=on"));
        for (opts, err) in [
            (
                "extended_l2=on,cluster_size=8k",
                CreateError::ExtendedL2ClusterSize,
            ),
            ("extended_l2=on,compat=0.10", CreateError::ExtendedL2NeedsV3),
        ] {
            let p = plan(Format::Qcow2, &split_options(&[opts.to_string()]), Some(1)).unwrap();
            assert_eq!(p.late_error.unwrap(), err.to_string(), "{opts}");
        }
        let opts = split_options(&["compat=0.10,lazy_refcounts=on".to_string()]);
        let p = plan(Format::Qcow2, &opts, Some(1 << 20)).unwrap();
        assert!(p
            .late_error
            .unwrap()
            .starts_with("Lazy refcounts only supported"));
    }

    #[test]
    fn splits_escaped_commas() {
        assert_eq!(
            split_options(&["a=b,,c,d=e".to_string(), "help".to_string()]),
            vec![
                ("a".into(), "b,c".into()),
                ("d".into(), "e".into()),
                ("help".into(), String::new())
            ]
        );
    }
}
