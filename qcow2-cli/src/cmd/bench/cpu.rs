//! CPU time a run used: this process's, all threads together (our columns and `raw`), or
//! that of the children waited for (`qemu-img bench`), so that the table can show what a
//! request costs besides how fast it went.

use std::time::Duration;

/// CPU time used so far by every thread of this process (nanosecond resolution).
pub fn own() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// CPU time used by the children this process has waited for (`cutime + cstime` of
/// `/proc/self/stat`, in clock ticks: 10 ms on most kernels); `None` where that file is
/// not there or not understood.
pub fn children() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let ticks = children_ticks(&stat)?;
    let hz = rustix::param::clock_ticks_per_second().max(1);
    Some(Duration::from_nanos(
        ticks.saturating_mul(1_000_000_000) / hz,
    ))
}

/// `cutime + cstime` (fields 16 and 17) of a `/proc/<pid>/stat` line. The command name
/// (field 2) is in parentheses and may hold spaces and parentheses itself, so the fields
/// are counted from the last `)`.
fn children_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts at field 3 (the state): fields 16 and 17 are its 14th and 15th.
    let mut fields = rest.split_whitespace().skip(13);
    let cutime: u64 = fields.next()?.parse().ok()?;
    let cstime: u64 = fields.next()?.parse().ok()?;
    Some(cutime + cstime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn childrens_ticks_are_fields_16_and_17() {
        let line = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 200 0 0 \
                    11 12 13 14 20 0 1 0 100 1000 10 18446744073709551615";
        assert_eq!(children_ticks(line), Some(13 + 14));
        assert_eq!(children_ticks("no parentheses here"), None);
        assert_eq!(children_ticks("1 (x) S 1 2"), None);
    }

    #[test]
    fn our_own_cpu_time_moves_with_work() {
        let before = own();
        let mut x = 0u64;
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        assert!(own() > before, "{x}");
    }

    #[test]
    fn childrens_time_is_readable_here() {
        assert!(children().is_some());
    }
}
