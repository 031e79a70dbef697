//! `check`: qemu-img's report, human or JSON, and its exit codes (0 clean, 2 corruptions,
//! 3 leaks only, 1 failure, 63 for formats without checks). Detail lines go to stderr.

use qcow2_sync::{CheckReport, Image, OpenOptions, Repair};
use serde_json::{json, Map, Value};

use crate::cmd::parse_cache;
use crate::disk::{engine_error, qcow2_open_error, resolve_format, Format};
use crate::error::{CliError, CmdResult};
use crate::json::to_qemu_pretty;
use crate::{CheckArgs, OutputFormat};

/// Exit status for a format that cannot be checked.
pub const EXIT_NO_CHECK: i32 = 63;

/// Runs `check`.
pub fn run(a: &CheckArgs) -> CmdResult {
    let repair = match a.repair.as_deref() {
        None => None,
        Some("leaks") => Some(Repair::Leaks),
        Some("all") => Some(Repair::All),
        Some(other) => {
            return Err(CliError::new(format!(
                "Unknown option value for -r (expecting 'leaks' or 'all'): {other}"
            )))
        }
    };
    let (format, _) = resolve_format(&a.filename, a.format.as_deref(), false)?;
    if format == Format::Raw {
        // qemu opens the image first, so a missing file is still exit status 1.
        std::fs::metadata(&a.filename).map_err(|e| crate::disk::open_error(&a.filename, &e))?;
        return Err(CliError::with_code(
            EXIT_NO_CHECK,
            "This image format does not support checks",
        ));
    }
    let cache = parse_cache(a.cache.as_deref(), qcow2_sync::Cache::WriteBack)?;
    let options = OpenOptions {
        read_only: repair.is_none(),
        cache,
        check_only: true,
        force_share: a.force_share,
        ..OpenOptions::default()
    };
    let report = match Image::open(&a.filename, &options) {
        Ok(mut img) => {
            // The checker double-checks a repaired image itself and reports that second
            // run with the first run's `*-fixed` counts, as qemu-img does.
            img.check(repair)
                .map_err(|e| CliError::new(format!("Check failed: {}", engine_error(&e))))?
        }
        Err(e) => return Err(qcow2_open_error(&a.filename, &e)),
    };
    print_messages(&report);
    if let Some(reason) = &report.failure {
        // qemu-img prints no report when the check could not complete.
        return Err(CliError::new(format!("Check failed: {reason}")));
    }
    let fixed = report.corruptions_fixed > 0 || report.leaks_fixed > 0;
    if fixed && a.output == OutputFormat::Human && !a.quiet {
        print!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
            report.leaks_fixed, report.corruptions_fixed
        );
    }
    if !a.quiet {
        match a.output {
            OutputFormat::Human => print!("{}", human(&report)),
            OutputFormat::Json => print!(
                "{}",
                to_qemu_pretty(&report_json(&report, &a.filename.to_string_lossy()))
            ),
        }
    }
    if report.check_errors > 0 {
        return Err(CliError::new("Check failed"));
    }
    Ok(if report.corruptions > 0 {
        2
    } else if report.leaks > 0 {
        3
    } else {
        0
    })
}

fn print_messages(report: &CheckReport) {
    for m in &report.messages {
        eprintln!("{m}");
    }
}

/// The human report, as qemu-img's `dump_human_image_check`.
pub fn human(r: &CheckReport) -> String {
    let mut out = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        out.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions > 0 {
            out.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks > 0 {
            out.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors > 0 {
            out.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let alloc = r.allocated_clusters as f64;
        out.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            alloc * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / alloc,
            r.compressed_clusters as f64 * 100.0 / alloc
        ));
    }
    if r.image_end_offset != 0 {
        out.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    out
}

/// The JSON report (ImageCheck; optional fields only when non-zero, as qemu).
pub fn report_json(r: &CheckReport, filename: &str) -> Value {
    let mut m = Map::new();
    m.insert("filename".into(), json!(filename));
    m.insert("format".into(), json!("qcow2"));
    // check-errors always; the others only when non-zero, as qemu-img.
    for (k, v) in r.qemu_fields() {
        if v != 0 || k == "check-errors" {
            m.insert(k.into(), json!(v));
        }
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_report_matches_qemu() {
        let r = CheckReport {
            corruptions: 3,
            leaks: 1,
            image_end_offset: 458752,
            total_clusters: 256,
            allocated_clusters: 2,
            ..CheckReport::default()
        };
        assert_eq!(
            human(&r),
            "\n3 errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n\
             \n1 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n\
             2/256 = 0.78% allocated, 0.00% fragmented, 0.00% compressed clusters\nImage end offset: 458752\n"
        );
    }

    #[test]
    fn json_report_matches_qemu_bytes() {
        let r = CheckReport {
            image_end_offset: 393216,
            total_clusters: 64,
            allocated_clusters: 64,
            fragmented_clusters: 64,
            compressed_clusters: 64,
            ..CheckReport::default()
        };
        assert_eq!(
            to_qemu_pretty(&report_json(&r, "comp.qcow2")),
            "{\n    \"image-end-offset\": 393216,\n    \"compressed-clusters\": 64,\n    \"total-clusters\": 64,\n    \
             \"check-errors\": 0,\n    \"allocated-clusters\": 64,\n    \"filename\": \"comp.qcow2\",\n    \
             \"format\": \"qcow2\",\n    \"fragmented-clusters\": 64\n}\n"
        );
    }
}
