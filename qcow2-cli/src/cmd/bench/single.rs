//! `qcow2 bench run`: one run on a given image, for scripts and other harnesses. It prints
//! exactly one line, `RESULT mbps=<float> iops=<float> secs=<float>`, timed from the first
//! submission until the last request completes.

use std::time::Duration;

use qcow2_sync::{Cache, OpenOptions};

use super::drivers::{self, Engine};
use super::names::Pattern;
use super::workload::Spec;
use crate::cmd::parse_size_arg;
use crate::disk::{resolve_format, Format};
use crate::error::{CliError, CmdResult};
use crate::runtime::Runtime;
use crate::BenchRunArgs;

/// The line `bench run` prints.
pub fn result_line(mbps: f64, iops: f64, secs: f64) -> String {
    format!("RESULT mbps={mbps:.3} iops={iops:.3} secs={secs:.6}")
}

/// Runs `bench run`.
pub fn run(a: &BenchRunArgs) -> CmdResult {
    let rw = Pattern::parse(&a.rw)?;
    let bs = parse_size_arg(&a.bs, "block size")?;
    if bs == 0 || bs % 512 != 0 {
        return Err(CliError::new(format!(
            "bench run: the block size must be a positive multiple of 512 (got {bs})"
        )));
    }
    if !(1..=256).contains(&a.depth) {
        return Err(CliError::new("bench run: --depth must be 1 to 256"));
    }
    if !(a.runtime.is_finite() && a.runtime > 0.0) {
        return Err(CliError::new(
            "bench run: --runtime must be a positive number of seconds",
        ));
    }
    if a.read_pct > 100 {
        return Err(CliError::new("bench run: --read-pct must be 0 to 100"));
    }
    let (format, _) = resolve_format(&a.image, a.format.as_deref(), false)?;
    let engine = match format {
        Format::Raw => Engine::Raw,
        Format::Qcow2 => Engine::Qcow2(Runtime::parse_or_default(a.engine.as_deref())?),
    };
    let cache = if a.direct {
        Cache::None
    } else {
        Cache::WriteBack
    };
    let spec = Spec {
        rw,
        bs,
        depth: a.depth,
        runtime: Duration::from_secs_f64(a.runtime),
        seed: a.seed,
        read_pct: a.read_pct,
        flush_every: a.flush_every,
    };
    let options = OpenOptions {
        cache,
        poll_max: a.poll_max_us.map(Duration::from_micros),
        interrupt_submitters: a.interrupt_submitters,
        ..OpenOptions::default()
    };
    let m = drivers::run(engine, &a.image, &options, spec)
        .map_err(|e| CliError::new(format!("bench run: {}: {e}", a.image.display())))?;
    println!("{}", result_line(m.mbps(), m.iops(), m.secs));
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_result_line_has_three_fields() {
        let l = result_line(12.5, 1600.0, 2.0);
        assert_eq!(l, "RESULT mbps=12.500 iops=1600.000 secs=2.000000");
    }
}
