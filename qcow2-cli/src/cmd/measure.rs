//! `measure`: the file size a new image needs, empty (`--size`) or converted from a source
//! image, as qemu-img prints it (`required size`, `fully allocated size`, `bitmaps size`).
//! The numbers come from `qcow2_proto::measure`; this module reads the options and walks
//! the source's block status.

use qcow2_proto::measure::{self, DataCount, MeasureOptions, Source};
use qcow2_proto::Preallocation;
use serde_json::{Map, Value};

use qcow2_sync::SnapshotRef;

use crate::cmd::create::{plan, split_options};
use crate::disk::{resolve_format, Disk, DiskOptions, Format};
use crate::error::{CliError, CmdResult};
use crate::json::to_qemu_pretty;
use crate::size::{parse_size, SizeError};
use crate::{MeasureArgs, OutputFormat};

/// Options of qemu's `file` driver: measure accepts them for every format and ignores them.
const FILE_OPTIONS: [&str; 2] = ["nocow", "extent_size_hint"];

/// qcow2 options that play no part in measuring (qemu accepts and ignores them).
const IGNORED_QCOW2: [&str; 4] = [
    "data_file",
    "data_file_raw",
    "compression_type",
    "encryption",
];

/// What to measure for.
struct Target {
    format: Format,
    /// The qcow2 options; `create.size` is `--size`, else `-o size=`, else 0.
    qcow2: MeasureOptions,
}

/// `--size`, parsed like qemu-img's `cvtnum("image size", ...)`.
fn parse_image_size(s: &str) -> Result<u64, CliError> {
    let out_of_range = || {
        CliError::new("Invalid image size specified. Must be between 0 and 9223372036854775807.")
    };
    if s.starts_with('-') {
        return Err(out_of_range());
    }
    match parse_size(s) {
        Ok(n) if n <= i64::MAX as u64 => Ok(n),
        Ok(_) | Err(SizeError::TooLarge) => Err(out_of_range()),
        Err(SizeError::Invalid) => Err(CliError::new(format!(
            "Invalid image size specified: '{s}'."
        ))),
    }
}

/// A qemu boolean option value.
fn on_off(key: &str, v: &str) -> Result<bool, String> {
    let on = ["on", "yes", "true", "y"].contains(&v);
    if on || ["off", "no", "false", "n"].contains(&v) {
        Ok(on)
    } else {
        Err(format!("Parameter '{key}' expects 'on' or 'off'"))
    }
}

/// Reads `-o` for `format` as `qemu-img measure` does: the option list is checked like
/// `create`'s (the same parser), options that only matter for creating are accepted and
/// ignored, and the values measuring uses are checked with `qcow2_measure`'s messages.
fn target(format: Format, options: &[String], size: Option<u64>) -> Result<Target, CliError> {
    let invalid = |e: String| {
        CliError::new(format!(
            "{e}\nInvalid options for file format '{}'",
            format.name()
        ))
    };
    let qcow2 = format == Format::Qcow2;
    let mut rest = Vec::new();
    let mut extended_l2 = false;
    for (k, v) in split_options(options) {
        match k.as_str() {
            k if FILE_OPTIONS.contains(&k) => {}
            "extended_l2" if qcow2 => extended_l2 = on_off(&k, &v).map_err(invalid)?,
            "encrypt.format" if qcow2 && v == "luks" => {
                return Err(CliError::new(
                    "encrypt.format=luks is not supported yet (encryption is not implemented)",
                ))
            }
            k if qcow2 && (IGNORED_QCOW2.contains(&k) || k.starts_with("encrypt.")) => {}
            _ => rest.push((k, v)),
        }
    }
    // `create`'s plan checks the spelling of the rest and the syntax of their values; its
    // checks of the values themselves are create's, so its late error is not used.
    let opt_size = rest.iter().any(|(k, _)| k == "size");
    let p = plan(format, &rest, if opt_size { None } else { Some(0) }).map_err(invalid)?;
    let last = |key: &str| {
        rest.iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let mut qcow2_opts = MeasureOptions {
        create: p.qcow2,
        extended_l2,
    };
    qcow2_opts.create.size = size.unwrap_or(p.size);
    if qcow2 {
        qcow2_opts.create.version = match last("compat") {
            None | Some("1.1") => 3,
            Some("0.10") => 2,
            Some(v) => return Err(CliError::new(format!("Invalid compatibility level: '{v}'"))),
        };
        // The plan maps the four modes and leaves anything else `off`.
        if let Some(v) = last("preallocation") {
            if v != "off" && qcow2_opts.create.preallocation == Preallocation::Off {
                return Err(CliError::new(format!("invalid parameter value: {v}")));
            }
        }
    }
    Ok(Target {
        format,
        qcow2: qcow2_opts,
    })
}

/// The bytes of target clusters holding the source's data, walking its block status
/// through the whole backing chain as `qcow2_measure` does.
fn count_data(disk: &mut Disk, cluster_size: u64) -> Result<u64, CliError> {
    let size = disk.len();
    let mut count = DataCount::new(cluster_size);
    let mut offset = 0;
    while offset < size {
        let st = disk
            .status(offset, size - offset)
            .map_err(|e| CliError::new(format!("Unable to get block status: {e}")))?;
        offset = count.extent(offset, st.len, st.present && st.data && !st.zero);
    }
    Ok(count.bytes())
}

/// Runs `measure`.
pub fn run(a: &MeasureArgs) -> CmdResult {
    if !a.object.is_empty() {
        return Err(CliError::new(
            "--object is not supported yet (encryption is not implemented)",
        ));
    }
    let size = a.size.as_deref().map(parse_image_size).transpose()?;
    let filename = a.filename.as_deref();
    if filename.is_none() && (a.image_opts || a.format.is_some() || a.snapshot.is_some()) {
        return Err(CliError::new(
            "--image-opts, -f, and -l require a filename argument.",
        ));
    }
    if filename.is_some() && size.is_some() {
        return Err(CliError::new(
            "--size N cannot be used together with a filename.",
        ));
    }
    if filename.is_none() && size.is_none() {
        return Err(CliError::new(
            "Either --size N or one filename must be specified.",
        ));
    }
    if a.image_opts {
        return Err(CliError::new("--image-opts is not supported yet"));
    }
    let mut source = match filename {
        Some(path) => {
            let (format, _) = resolve_format(path, a.format.as_deref(), false)?;
            let opts = DiskOptions {
                read_only: true,
                force_share: a.force_share,
                ..DiskOptions::default()
            };
            Some(match a.snapshot.as_deref() {
                Some(l) => Disk::open_snapshot(path, format, &SnapshotRef::parse(l), opts)?,
                None => Disk::open(path, format, opts, false)?,
            })
        }
        None => None,
    };
    let t = target(Format::parse(&a.target_format)?, &a.options, size)?;
    let m = match (t.format, source.as_mut()) {
        (Format::Raw, Some(disk)) => raw_measurement(disk.len()),
        (Format::Raw, None) => raw_measurement(t.qcow2.create.size.next_multiple_of(512)),
        (Format::Qcow2, None) => measure::measure(&t.qcow2, None).map_err(measure_error)?,
        (Format::Qcow2, Some(disk)) => {
            let geo = measure::target_geometry(&t.qcow2).map_err(measure_error)?;
            let data = if t.qcow2.create.backing_file.is_some() {
                0
            } else {
                count_data(disk, geo.cluster_size())?
            };
            let bitmaps = disk
                .qcow2()
                .map(|img| img.info())
                .filter(|info| info.version >= 3)
                .map(|info| info.bitmaps.clone());
            let src = Source {
                size: disk.len(),
                data,
                bitmaps: bitmaps.as_deref(),
            };
            measure::measure(&t.qcow2, Some(&src)).map_err(measure_error)?
        }
    };
    print!("{}", output(&m, a.output));
    Ok(0)
}

fn measure_error(e: measure::MeasureError) -> CliError {
    CliError::new(e.to_string())
}

/// qemu's `raw_measure`: a raw image is its size, every byte of it.
fn raw_measurement(size: u64) -> measure::Measurement {
    measure::Measurement {
        required: size,
        fully_allocated: size,
        bitmaps: None,
    }
}

/// The measurement as qemu-img prints it.
fn output(m: &measure::Measurement, format: OutputFormat) -> String {
    match format {
        OutputFormat::Human => {
            let mut s = format!(
                "required size: {}\nfully allocated size: {}\n",
                m.required, m.fully_allocated
            );
            if let Some(b) = m.bitmaps {
                s.push_str(&format!("bitmaps size: {b}\n"));
            }
            s
        }
        OutputFormat::Json => {
            // Inserted in QAPI schema order (BlockMeasureInfo); printed in qemu's order.
            let mut obj = Map::new();
            obj.insert("required".into(), m.required.into());
            obj.insert("fully-allocated".into(), m.fully_allocated.into());
            if let Some(b) = m.bitmaps {
                obj.insert("bitmaps".into(), b.into());
            }
            to_qemu_pretty(&Value::Object(obj))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(format: Format, o: &str) -> Result<MeasureOptions, String> {
        target(format, &[o.to_string()], Some(1 << 30))
            .map(|t| t.qcow2)
            .map_err(|e| e.message)
    }

    #[test]
    fn reads_options_like_qemu_measure() {
        let o = opts(
            Format::Qcow2,
            "cluster_size=4k,compat=0.10,preallocation=metadata,lazy_refcounts=on",
        )
        .unwrap();
        assert_eq!(o.create.cluster_size, 4096);
        assert_eq!(o.create.version, 2);
        assert_eq!(o.create.preallocation, Preallocation::Metadata);
        assert_eq!(o.create.size, 1 << 30);
        let o = opts(
            Format::Qcow2,
            "extended_l2=yes,backing_file=b,compression_type=zstd,nocow=on,encrypt.format=aes",
        )
        .unwrap();
        assert!(o.extended_l2 && o.create.backing_file.is_some());
        // `--size` wins over `-o size=`.
        assert_eq!(opts(Format::Qcow2, "size=2G").unwrap().create.size, 1 << 30);
        let t = target(Format::Qcow2, &["size=2G".into()], None).unwrap();
        assert_eq!(t.qcow2.create.size, 2 << 30);
    }

    #[test]
    fn refuses_options_like_qemu_measure() {
        assert_eq!(
            opts(Format::Qcow2, "foo=bar").unwrap_err(),
            "Invalid parameter 'foo'\nInvalid options for file format 'qcow2'"
        );
        assert_eq!(
            opts(Format::Raw, "cluster_size=4k").unwrap_err(),
            "Invalid parameter 'cluster_size'\nInvalid options for file format 'raw'"
        );
        assert_eq!(
            opts(Format::Qcow2, "extended_l2=maybe").unwrap_err(),
            "Parameter 'extended_l2' expects 'on' or 'off'\nInvalid options for file format 'qcow2'"
        );
        assert_eq!(
            opts(Format::Qcow2, "compat=v3").unwrap_err(),
            "Invalid compatibility level: 'v3'"
        );
        assert_eq!(
            opts(Format::Qcow2, "preallocation=bogus").unwrap_err(),
            "invalid parameter value: bogus"
        );
        assert!(opts(Format::Raw, "preallocation=bogus").is_ok());
    }

    #[test]
    fn parses_sizes_like_cvtnum() {
        assert_eq!(parse_image_size("1G").unwrap(), 1 << 30);
        let range = "Invalid image size specified. Must be between 0 and 9223372036854775807.";
        for bad in ["-1", "8E", "9223372036854775808", "99999999999999999999"] {
            assert_eq!(parse_image_size(bad).unwrap_err().message, range, "{bad}");
        }
        assert_eq!(
            parse_image_size("1X").unwrap_err().message,
            "Invalid image size specified: '1X'."
        );
    }

    #[test]
    fn prints_like_qemu_img() {
        let m = measure::Measurement {
            required: 1,
            fully_allocated: 2,
            bitmaps: Some(3),
        };
        assert_eq!(
            output(&m, OutputFormat::Json),
            "{\n    \"bitmaps\": 3,\n    \"required\": 1,\n    \"fully-allocated\": 2\n}\n"
        );
        assert_eq!(
            output(&m, OutputFormat::Human),
            "required size: 1\nfully allocated size: 2\nbitmaps size: 3\n"
        );
    }
}
