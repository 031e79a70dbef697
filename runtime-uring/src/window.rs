//! The reaper's poll window: how long it looks at the completion queue (yielding to its
//! executor between looks) before it sleeps in the reactor.
//!
//! Sleeping costs a waiting caller the reactor's system calls and a wake-up; on this
//! project's KVM guest that was most of what a depth-1 request paid beyond the device
//! (BENCHMARKS.md, "Polling the completion queue"). Looking costs CPU for as long as the
//! look lasts, so the window adapts to the waits it sees, as QEMU's iothreads do
//! (`poll-max-ns`): a wait within the window keeps it, a longer wait within the maximum
//! doubles it, and a wait past the maximum halves it, down to zero. A device slower than
//! the maximum is thus never polled for more than a few waits, and a maximum of zero turns
//! polling off.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The default maximum: waits up to this long are polled for.
pub const DEFAULT_POLL_MAX: Duration = Duration::from_micros(256);

/// The first window once waits are short enough to poll for, and the smallest.
const START_NS: u64 = 4_000;

/// The current window, shared by whoever is the reaper.
pub(crate) struct Window {
    ns: AtomicU64,
    max_ns: u64,
}

impl Window {
    /// A window that adapts up to `max` (closed until the first short wait).
    pub(crate) fn new(max: Duration) -> Self {
        Self {
            ns: AtomicU64::new(0),
            max_ns: u64::try_from(max.as_nanos()).unwrap_or(u64::MAX),
        }
    }

    /// How long to poll before sleeping.
    pub(crate) fn get(&self) -> Duration {
        Duration::from_nanos(self.ns.load(Ordering::Relaxed))
    }

    /// Adapts the window to a wait that took `waited` (polling and sleeping together).
    pub(crate) fn record(&self, waited: Duration) {
        let cur = self.ns.load(Ordering::Relaxed);
        let next = next_window(cur, self.max_ns, waited);
        if next != cur {
            self.ns.store(next, Ordering::Relaxed);
        }
    }
}

/// The window after a wait of `waited` with window `cur` (both bounded by `max`).
fn next_window(cur: u64, max: u64, waited: Duration) -> u64 {
    let ns = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
    if max == 0 {
        0
    } else if ns > max {
        // Too slow to poll for: back off (to nothing, a few such waits on).
        let half = cur / 2;
        if half < START_NS {
            0
        } else {
            half
        }
    } else if ns <= cur {
        cur
    } else {
        cur.saturating_mul(2).clamp(START_NS.min(max), max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 256_000;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn short_waits_open_the_window_up_to_what_they_take() {
        let mut w = 0;
        let mut steps = 0;
        while w < 100_000 {
            w = next_window(w, MAX, us(100));
            steps += 1;
            assert!(steps < 10, "the window never covered a 100 us wait: {w}");
        }
        // Covered: it stays, and does not grow past what the waits need.
        assert_eq!(next_window(w, MAX, us(100)), w);
        assert!(w <= 2 * 100_000);
    }

    #[test]
    fn the_window_never_passes_the_maximum() {
        let mut w = 0;
        for _ in 0..40 {
            w = next_window(w, MAX, us(250));
            assert!(w <= MAX);
        }
        assert_eq!(w, MAX);
    }

    #[test]
    fn long_waits_close_the_window() {
        let mut w = MAX;
        for _ in 0..7 {
            w = next_window(w, MAX, us(5_000));
        }
        assert_eq!(w, 0, "a slow device is still polled for");
        // And a closed window stays closed while waits stay long.
        assert_eq!(next_window(0, MAX, us(5_000)), 0);
    }

    #[test]
    fn one_long_wait_only_halves_the_window() {
        assert_eq!(next_window(128_000, MAX, us(900)), 64_000);
    }

    #[test]
    fn a_zero_maximum_never_polls() {
        assert_eq!(next_window(0, 0, us(1)), 0);
        assert_eq!(next_window(0, 0, Duration::ZERO), 0);
        let w = Window::new(Duration::ZERO);
        w.record(us(1));
        assert_eq!(w.get(), Duration::ZERO);
    }

    #[test]
    fn a_small_maximum_is_reached_not_passed() {
        assert_eq!(next_window(0, 1_000, us(0)), 0, "a wait the window covers");
        assert_eq!(next_window(0, 1_000, Duration::from_nanos(500)), 1_000);
    }
}
