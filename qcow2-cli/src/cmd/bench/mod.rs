//! `bench`: our runtimes against the raw file and QEMU's qcow2 driver.
//!
//! The table runs eight named scenarios (`create256k`, `create8k`, `seqread256k`,
//! `seqread8k`, `randread8k`, `randwrite8k`, `mail8k`, `mixed8k`) at queue depths 1, 8 and 16
//! on five image states (`allocated`, `growing`, `metadata`, `backing`, `backing-extl2`)
//! with five columns (`raw`: a fully written raw file through the same flags, the physical
//! limit; `sync`, `smol`, `uring`: our runtimes; `qemu`: `qemu-img bench`). Every figure is
//! the median of several interleaved rounds, and its ratios to `raw` and `qemu` are medians
//! of ratios taken within a round. `bench run` is one run on a given image, for scripts.
//! See BENCHMARKS.md for the method.

mod cpu;
mod drivers;
mod images;
mod names;
mod progress;
mod qemu;
mod report;
mod single;
mod stats;
mod table;
mod workload;

use std::path::{Path, PathBuf};
use std::time::Duration;

use qcow2_sync::Cache;
use serde_json::json;

use crate::cmd::{parse_cache, parse_size_arg};
use crate::error::{CliError, CmdResult};
use crate::runtime::Runtime;
use crate::{BenchArgs, BenchCommand};
use names::{parse_depths, parse_list, Column, Scenario, State};
use table::Settings;

/// Image size of the full table.
const FULL_SIZE: u64 = 1 << 30;
/// Image size with `--quick`.
const QUICK_SIZE: u64 = 256 << 20;

/// Runs `bench` or `bench run`.
pub fn run(a: &BenchArgs) -> CmdResult {
    match &a.command {
        Some(BenchCommand::Run(r)) => single::run(r),
        None => run_table(a),
    }
}

/// The settings `a` asks for, with the `--quick` or full defaults for what it leaves out.
fn settings(a: &BenchArgs) -> Result<Settings, CliError> {
    let size = match &a.size {
        Some(s) => parse_size_arg(s, "image size")?,
        None if a.quick => QUICK_SIZE,
        None => FULL_SIZE,
    };
    if size < 1 << 20 || size % (256 << 10) != 0 {
        return Err(CliError::new(
            "bench: the image size must be a multiple of 256 KiB, at least 1 MiB",
        ));
    }
    let seconds = a.seconds.unwrap_or(if a.quick { 0.1 } else { 0.4 });
    if !(seconds.is_finite() && seconds > 0.0) {
        return Err(CliError::new("bench: --seconds must be positive"));
    }
    let rounds = a.rounds.unwrap_or(if a.quick { 2 } else { 3 });
    if rounds == 0 {
        return Err(CliError::new("bench: --rounds must be at least 1"));
    }
    let (depths, states): (&[usize], &[State]) = if a.quick {
        (
            &[1, 16],
            &[State::Allocated, State::Growing, State::Backing],
        )
    } else {
        (&[1, 8, 16], &State::ALL)
    };
    let columns = parse_list(a.columns.as_deref(), "column", &Column::ALL)?;
    if a.columns.is_some() && columns.contains(&Column::Uring) {
        Runtime::Uring.available()?;
    }
    Ok(Settings {
        size,
        seconds,
        rounds,
        depths: parse_depths(a.depths.as_deref(), depths)?,
        scenarios: parse_list(a.scenarios.as_deref(), "scenario", &Scenario::ALL)?,
        states: parse_list(a.states.as_deref(), "state", states)?,
        columns,
        cache: parse_cache(a.cache.as_deref(), Cache::None)?,
        poll_max: a.poll_max_us.map(Duration::from_micros),
        interrupt_submitters: a.interrupt_submitters,
        seed: a.seed,
    })
}

/// Where the scratch directory goes: `--dir`, else the first of the temp directory,
/// `/var/tmp` and the current directory where O_DIRECT works (it fails on tmpfs).
fn scratch_base(a: &BenchArgs, direct: bool) -> PathBuf {
    if let Some(d) = &a.dir {
        return d.clone();
    }
    let candidates = [
        std::env::temp_dir(),
        PathBuf::from("/var/tmp"),
        PathBuf::from("."),
    ];
    if direct {
        for c in &candidates {
            if c.is_dir() && images::direct_io_works(c) {
                return c.clone();
            }
        }
    }
    candidates[0].clone()
}

/// Runs the table: prepares the scratch files, runs every cell's rounds, prints the rows.
fn run_table(a: &BenchArgs) -> CmdResult {
    let mut s = settings(a)?;
    let mut notes = Vec::new();
    let wants_direct = matches!(s.cache, Cache::None | Cache::DirectSync);
    let base = scratch_base(a, wants_direct);
    let dir = tempfile::Builder::new()
        .prefix("qcow2-bench")
        .tempdir_in(&base)
        .map_err(|e| CliError::new(format!("bench: temp dir in {}: {e}", base.display())))?;
    if wants_direct && !images::direct_io_works(dir.path()) {
        notes.push(format!(
            "O_DIRECT does not work in {}; cache=writeback instead of cache={}",
            base.display(),
            qemu::cache_name(s.cache)
        ));
        s.cache = Cache::WriteBack;
    }
    let qemu_version = if s.columns.contains(&Column::Qemu) {
        match qemu::probe() {
            Ok(v) => Some(v),
            Err(why) => {
                notes.push(format!("no qemu column: {why}"));
                s.columns.retain(|c| *c != Column::Qemu);
                None
            }
        }
    } else {
        None
    };
    if let Err(why) = Runtime::Uring.available() {
        if s.columns.contains(&Column::Uring) {
            notes.push(format!("no uring column: {}", why.message));
            s.columns.retain(|c| *c != Column::Uring);
        }
    }
    let groups = table::plan(&s);
    if groups.is_empty() {
        return Err(CliError::new(
            "bench: the selection has no cell to measure (reads run on allocated and backing \
             images only, creates on fresh images only; see BENCHMARKS.md)",
        ));
    }
    let states: Vec<State> = groups
        .iter()
        .flat_map(|g| g.cells.iter().filter_map(|c| c.state))
        .collect();
    let needs_raw = groups
        .iter()
        .any(|g| g.cells.iter().any(|c| c.column == Column::Raw));
    let fill_cache = if images::direct_io_works(dir.path()) {
        Cache::None
    } else {
        Cache::WriteBack
    };
    let scratch = images::Scratch::new(dir.path(), s.size, fill_cache);
    if !a.json {
        println!("{}", heading(&s, &base, qemu_version.as_deref()));
    }
    let mut bar =
        progress::Bar::new(groups.iter().map(|g| g.cells.len()).sum::<usize>() * s.rounds);
    bar.starting("writing the raw file, the allocated image and the backing file");
    scratch.prepare(needs_raw, &states)?;
    let (samples, failures) = table::run_all(&s, &groups, &scratch, &mut bar);
    notes.extend(failures);
    let rows = stats::rows(&samples);
    if a.json {
        let doc = json!({
            "rows": report::json_rows(&rows),
            "size": s.size,
            "seconds": s.seconds,
            "rounds": s.rounds,
            "cache": qemu::cache_name(s.cache),
            "seed": s.seed,
            "dir": base.display().to_string(),
            "qemu": qemu_version,
            "notes": notes,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).map_err(|e| CliError::new(e.to_string()))?
        );
    } else {
        print!("{}", report::tables(&rows));
        for n in &notes {
            println!("note: {n}");
        }
    }
    Ok(0)
}

/// The lines above the tables: what was measured, where and how.
fn heading(s: &Settings, base: &Path, qemu: Option<&str>) -> String {
    let depths: Vec<String> = s.depths.iter().map(usize::to_string).collect();
    format!(
        "qcow2 bench: {} images in {}, cache={}, {} s a run, median of {} rounds, depths {}; \
         qemu: {}\nx raw / x qemu: medians of same-round ratios; syncs/write: fdatasyncs \
         while the writes ran",
        crate::size::size_to_str(s.size),
        base.display(),
        qemu::cache_name(s.cache),
        s.seconds,
        s.rounds,
        depths.join(","),
        qemu.unwrap_or("absent"),
    )
}
