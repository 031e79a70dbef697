//! The `qemu` column: `qemu-img bench -t CACHE -i io_uring` on the same image file, for the
//! scenarios it can run (one direction, sequential or a fixed stride). It takes a request
//! count, not a time: the caller sizes the count from what the cell's neighbours did, and
//! the figure is qemu-img's own "Run completed in X seconds" (opening and closing excluded).

use std::path::Path;
use std::process::Command;

use qcow2_sync::Cache;

use super::cpu;
use super::names::{Pattern, Scenario};
use super::workload::Measured;

/// The program run.
const QEMU_IMG: &str = "qemu-img";

/// qemu-img's version line, or why the column is absent.
pub fn probe() -> Result<String, String> {
    match Command::new(QEMU_IMG).arg("--version").output() {
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("qemu-img")
            .to_owned()),
        Ok(out) => Err(format!(
            "qemu-img --version failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("qemu-img not found ({e})")),
    }
}

/// qemu's spelling of a cache mode.
pub fn cache_name(c: Cache) -> &'static str {
    match c {
        Cache::WriteBack => "writeback",
        Cache::WriteThrough => "writethrough",
        Cache::None => "none",
        Cache::DirectSync => "directsync",
        Cache::Unsafe => "unsafe",
    }
}

/// Greatest common divisor.
fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The stride, in blocks, standing in for random offsets: near 0.618 of the disk and prime
/// to the number of blocks, so one pass visits every block once, consecutive requests far
/// apart.
pub fn stride_blocks(blocks: u64) -> u64 {
    if blocks <= 2 {
        return 1;
    }
    let mut s = ((blocks as f64 * 0.618) as u64) | 1;
    while gcd(s, blocks) != 1 {
        s += 2;
    }
    s
}

/// One `qemu-img bench` run of `count` requests of `scenario` at `depth` on the qcow2 image
/// at `path` of `size` bytes (one pass at the most: never more requests than blocks).
pub fn run(
    path: &Path,
    cache: Cache,
    scenario: Scenario,
    depth: usize,
    count: u64,
    size: u64,
) -> Result<Measured, String> {
    let bs = scenario.block_size();
    let blocks = (size / bs).max(1);
    let count = count.clamp(1, blocks);
    let step = match scenario.rw() {
        Pattern::RandRead | Pattern::RandWrite => stride_blocks(blocks) * bs,
        _ => bs,
    };
    let mut cmd = Command::new(QEMU_IMG);
    cmd.args([
        "bench",
        "-f",
        "qcow2",
        "-t",
        cache_name(cache),
        "-i",
        "io_uring",
    ])
    .args(["-d", &depth.to_string(), "-c", &count.to_string()])
    .args(["-s", &bs.to_string(), "-S", &step.to_string()])
    .arg("--pattern=165");
    if scenario.writes() {
        cmd.arg("-w");
    }
    let cpu = cpu::children();
    let out = cmd
        .arg(path)
        .output()
        .map_err(|e| format!("qemu-img bench: {e}"))?;
    // The whole process: start-up and opening the image too (a few ms).
    let cpu = cpu.zip(cpu::children()).map(|(a, b)| b.saturating_sub(a));
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "qemu-img bench failed: {}{}",
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let secs = parse_seconds(&text)
        .ok_or_else(|| format!("qemu-img bench: no run time in its output: {text}"))?;
    Ok(Measured {
        ops: count,
        writes: if scenario.writes() { count } else { 0 },
        bytes: count * bs,
        secs,
        syncs: None,
        cpu,
    })
}

/// The seconds of qemu-img bench's `Run completed in X seconds.` line.
pub fn parse_seconds(out: &str) -> Option<f64> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Run completed in "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_time_is_read_from_the_output() {
        let out = "Sending 1000 write requests, 8192 bytes each, 16 in parallel \
                   (starting at offset 0, step size 8192)\nRun completed in 0.123 seconds.\n";
        assert_eq!(parse_seconds(out), Some(0.123));
        assert_eq!(parse_seconds("nothing"), None);
    }

    #[test]
    fn the_stride_visits_every_block_once() {
        for blocks in [1u64, 2, 3, 1000, 32768, 131_072] {
            let s = stride_blocks(blocks);
            assert_eq!(gcd(s, blocks.max(1)), 1, "{blocks}");
            if blocks <= 1000 {
                let mut seen = vec![false; blocks as usize];
                for i in 0..blocks {
                    seen[(i * s % blocks) as usize] = true;
                }
                assert!(seen.iter().all(|&b| b), "{blocks}");
            }
        }
    }
}
