//! `info`: what qemu-img 10.0 prints, human and `--output=json`, for qcow2 and raw files.

use std::fs::File;
use std::path::{Path, PathBuf};

use qcow2_proto::SnapshotInfo;
use qcow2_sync::ImageInfo;
use serde_json::{json, Map, Value};

use crate::disk::{open_error, resolve_format, Disk, DiskOptions, Format};
use crate::error::{CliError, CmdResult};
use crate::host::allocated_bytes;
use crate::json::{dump_human, to_qemu_pretty};
use crate::size::size_to_str;
use crate::{InfoArgs, OutputFormat};

/// Runs `info`.
pub fn run(a: &InfoArgs) -> CmdResult {
    let (format, _) = resolve_format(&a.filename, a.format.as_deref(), false)?;
    let mut chain = vec![node_info(&a.filename, format, a.force_share)?];
    if a.backing_chain {
        while let Some(next) = backing_of(chain.last().expect("non-empty"), a.force_share)? {
            if chain.len() > 64 {
                return Err(CliError::new("Backing chain is too long (or has a loop)"));
            }
            chain.push(next);
        }
    }
    let mut out = String::new();
    match (a.output, a.backing_chain) {
        (OutputFormat::Json, false) => out = to_qemu_pretty(&chain[0]),
        (OutputFormat::Json, true) => out = to_qemu_pretty(&Value::Array(chain)),
        (OutputFormat::Human, _) => {
            for (i, node) in chain.iter().enumerate() {
                if i > 0 {
                    out.push('\n');
                }
                human(node, &mut out);
            }
        }
    }
    print!("{out}");
    Ok(0)
}

/// The next image of a `--backing-chain` listing.
fn backing_of(node: &Value, force_share: bool) -> Result<Option<Value>, CliError> {
    let Some(full) = node.get("full-backing-filename").and_then(Value::as_str) else {
        return Ok(None);
    };
    let path = PathBuf::from(full);
    let format = match node.get("backing-filename-format").and_then(Value::as_str) {
        Some(f) => Format::parse(f)?,
        None => resolve_format(&path, None, false)?.0,
    };
    node_info(&path, format, force_share).map(Some)
}

/// qemu's `path_combine`: a relative backing name is relative to the image's directory.
fn full_backing_name(image: &Path, backing: &str) -> String {
    if backing.starts_with('/') {
        return backing.to_string();
    }
    let image = image.to_string_lossy();
    match image.rfind('/') {
        Some(p) => format!("{}{}", &image[..=p], backing),
        None => backing.to_string(),
    }
}

/// The protocol ("file") node: the host file itself.
fn file_node(path: &Path, file: &File) -> Result<Value, CliError> {
    let len = file
        .metadata()
        .map_err(|e| open_error(path, &e))?
        .len()
        .next_multiple_of(512);
    let actual = allocated_bytes(file).map_err(|e| open_error(path, &e))?;
    Ok(json!({
        "filename": path.to_string_lossy(),
        "format": "file",
        "dirty-flag": false,
        "actual-size": actual,
        "virtual-size": len,
        "format-specific": { "type": "file", "data": {} },
        "children": [],
    }))
}

/// The `info` object of one image, keys inserted in QAPI schema order.
pub fn node_info(path: &Path, format: Format, force_share: bool) -> Result<Value, CliError> {
    let file = File::open(path).map_err(|e| open_error(path, &e))?;
    let child = file_node(path, &file)?;
    let actual = child["actual-size"].clone();
    let mut m = Map::new();
    m.insert("filename".into(), json!(path.to_string_lossy()));
    m.insert("format".into(), json!(format.name()));
    match format {
        Format::Raw => {
            m.insert("dirty-flag".into(), json!(false));
            m.insert("actual-size".into(), actual);
            m.insert("virtual-size".into(), child["virtual-size"].clone());
        }
        Format::Qcow2 => {
            let opts = DiskOptions {
                force_share,
                read_only: true,
                ..DiskOptions::default()
            };
            let mut disk = Disk::open_with(path, format, opts, false, true)?;
            let info = disk.qcow2().expect("qcow2").info().clone();
            m.insert("dirty-flag".into(), json!(info.dirty));
            m.insert("actual-size".into(), actual);
            m.insert("virtual-size".into(), json!(info.size));
            m.insert("cluster-size".into(), json!(info.cluster_size));
            if info.crypt_method != 0 {
                m.insert("encrypted".into(), json!(true));
            }
            if let Some(backing) = &info.backing_file {
                m.insert("backing-filename".into(), json!(backing));
                m.insert(
                    "full-backing-filename".into(),
                    json!(full_backing_name(path, backing)),
                );
                if let Some(f) = &info.backing_format {
                    m.insert("backing-filename-format".into(), json!(f));
                }
            }
            if !info.snapshots.is_empty() {
                let list: Vec<Value> = info.snapshots.iter().map(snapshot_json).collect();
                m.insert("snapshots".into(), Value::Array(list));
            }
            let data_file_raw = info.data_file.is_some() && info.data_file_raw;
            m.insert(
                "format-specific".into(),
                json!({ "type": "qcow2", "data": qcow2_specific(&info, data_file_raw) }),
            );
        }
    }
    m.insert(
        "children".into(),
        json!([{ "name": "file", "info": child }]),
    );
    Ok(Value::Object(m))
}

/// A snapshot as `info --output=json` lists it.
pub fn snapshot_json(s: &SnapshotInfo) -> Value {
    let mut m = Map::new();
    m.insert("id".into(), json!(s.id));
    m.insert("name".into(), json!(s.name));
    m.insert("vm-state-size".into(), json!(s.vm_state_size));
    m.insert("date-sec".into(), json!(s.date_sec));
    m.insert("date-nsec".into(), json!(s.date_nsec));
    m.insert(
        "vm-clock-sec".into(),
        json!(s.vm_clock_nsec / 1_000_000_000),
    );
    m.insert(
        "vm-clock-nsec".into(),
        json!(s.vm_clock_nsec % 1_000_000_000),
    );
    if let Some(icount) = s.icount {
        m.insert("icount".into(), json!(icount));
    }
    Value::Object(m)
}

/// `format-specific.data` of a qcow2 image (ImageInfoSpecificQCow2, schema order).
fn qcow2_specific(info: &ImageInfo, data_file_raw: bool) -> Value {
    let v3 = info.version >= 3;
    let mut m = Map::new();
    m.insert("compat".into(), json!(if v3 { "1.1" } else { "0.10" }));
    if let Some(df) = &info.data_file {
        m.insert("data-file".into(), json!(df));
        m.insert("data-file-raw".into(), json!(data_file_raw));
    }
    if v3 {
        m.insert("extended-l2".into(), json!(info.extended_l2));
        m.insert("lazy-refcounts".into(), json!(info.lazy_refcounts));
        m.insert("corrupt".into(), json!(info.corrupt));
    }
    m.insert("refcount-bits".into(), json!(info.refcount_bits));
    match info.crypt_method {
        0 => {}
        1 => {
            m.insert("encrypt".into(), json!({ "format": "aes" }));
        }
        _ => {
            // The LUKS header details (cipher, slots, ...) are not in the engine's ImageInfo.
            m.insert("encrypt".into(), json!({ "format": "luks" }));
        }
    }
    if v3 && !info.bitmaps.is_empty() {
        let list: Vec<Value> = info
            .bitmaps
            .iter()
            .map(|b| {
                let mut flags = Vec::new();
                if b.in_use {
                    flags.push("in-use");
                }
                if b.auto {
                    flags.push("auto");
                }
                let mut bm = Map::new();
                bm.insert("name".into(), json!(b.name));
                bm.insert("granularity".into(), json!(b.granularity));
                bm.insert("flags".into(), json!(flags));
                Value::Object(bm)
            })
            .collect();
        m.insert("bitmaps".into(), Value::Array(list));
    }
    m.insert(
        "compression-type".into(),
        json!(if info.compression_type == 1 {
            "zstd"
        } else {
            "zlib"
        }),
    );
    Value::Object(m)
}

/// A date as qemu prints snapshot dates (`%Y-%m-%d %H:%M:%S`), in UTC.
fn format_date(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn u64_of(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// qemu's snapshot table (`Snapshot list:`, the column names, a row per snapshot), for
/// snapshots as [`snapshot_json`] gives them.
pub fn snapshot_table(snaps: &[Value]) -> String {
    let mut out = String::from("Snapshot list:\n");
    out.push_str(&format!(
        "{:<7} {:<16} {:>8}{:>20}{:>16}{:>11}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    ));
    for snap in snaps {
        out.push_str(&snapshot_row(snap));
        out.push('\n');
    }
    out
}

/// One row of qemu's snapshot table (`ID TAG VM_SIZE DATE VM_CLOCK ICOUNT`).
fn snapshot_row(s: &Value) -> String {
    let str_of = |k: &str| s.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let clock = u64_of(s, "vm-clock-sec") * 1_000_000_000 + u64_of(s, "vm-clock-nsec");
    let secs = clock / 1_000_000_000;
    let clock_str = format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        (clock / 1_000_000) % 1000
    );
    let icount = s
        .get("icount")
        .and_then(Value::as_u64)
        .map(|i| i.to_string())
        .unwrap_or_default();
    format!(
        "{:<7} {:<16} {:>8}{:>20}{:>16}{:>11}",
        str_of("id"),
        str_of("name"),
        size_to_str(u64_of(s, "vm-state-size")),
        format_date(u64_of(s, "date-sec")),
        clock_str,
        icount
    )
}

/// The human form of one `info` object.
fn human(node: &Value, out: &mut String) {
    let s = |k: &str| {
        node.get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let vsize = u64_of(node, "virtual-size");
    out.push_str(&format!("image: {}\n", s("filename")));
    out.push_str(&format!("file format: {}\n", s("format")));
    out.push_str(&format!(
        "virtual size: {} ({vsize} bytes)\n",
        size_to_str(vsize)
    ));
    out.push_str(&format!(
        "disk size: {}\n",
        size_to_str(u64_of(node, "actual-size"))
    ));
    if node.get("encrypted") == Some(&Value::Bool(true)) {
        out.push_str("encrypted: yes\n");
    }
    if let Some(cs) = node.get("cluster-size").and_then(Value::as_u64) {
        out.push_str(&format!("cluster_size: {cs}\n"));
    }
    if node.get("dirty-flag") == Some(&Value::Bool(true)) {
        out.push_str("cleanly shut down: no\n");
    }
    if let Some(b) = node.get("backing-filename").and_then(Value::as_str) {
        out.push_str(&format!("backing file: {b}"));
        let full = s("full-backing-filename");
        if full != b {
            out.push_str(&format!(" (actual path: {full})"));
        }
        out.push('\n');
        if let Some(f) = node.get("backing-filename-format").and_then(Value::as_str) {
            out.push_str(&format!("backing file format: {f}\n"));
        }
    }
    if let Some(Value::Array(snaps)) = node.get("snapshots") {
        out.push_str(&snapshot_table(snaps));
    }
    if let Some(Value::Object(data)) = node.get("format-specific").and_then(|f| f.get("data")) {
        if !data.is_empty() {
            out.push_str("Format specific information:\n");
            dump_human(data, 1, out);
        }
    }
    if let Some(Value::Array(children)) = node.get("children") {
        for child in children {
            let name = child.get("name").and_then(Value::as_str).unwrap_or("");
            let info = &child["info"];
            let len = u64_of(info, "virtual-size");
            out.push_str(&format!("Child node '/{name}':\n"));
            out.push_str(&format!(
                "    filename: {}\n",
                info.get("filename").and_then(Value::as_str).unwrap_or("")
            ));
            out.push_str("    protocol type: file\n");
            out.push_str(&format!(
                "    file length: {} ({len} bytes)\n",
                size_to_str(len)
            ));
            out.push_str(&format!(
                "    disk size: {}\n",
                size_to_str(u64_of(info, "actual-size"))
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_civil() {
        assert_eq!(format_date(0), "1970-01-01 00:00:00");
        assert_eq!(format_date(1_795_639_217), "2026-11-25 20:40:17");
        assert_eq!(format_date(951_782_400), "2000-02-29 00:00:00");
    }

    #[test]
    fn backing_names_resolve_like_qemu() {
        assert_eq!(
            full_backing_name(Path::new("top.qcow2"), "base.qcow2"),
            "base.qcow2"
        );
        assert_eq!(
            full_backing_name(Path::new("/tmp/cq/top.qcow2"), "base.qcow2"),
            "/tmp/cq/base.qcow2"
        );
        assert_eq!(
            full_backing_name(Path::new("d/top.qcow2"), "/abs/b"),
            "/abs/b"
        );
    }
}
