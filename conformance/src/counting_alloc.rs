//! A global allocator that counts the allocations of one thread while asked to.
//!
//! [`instantiate!`](crate::instantiate) installs it in every runtime's conformance binary.
//! Counting is per thread, so the other cases running in parallel do not disturb a
//! measurement. With `QCOW2_ALLOC_TRACE=1` the first counted allocation prints a backtrace.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The counting allocator: [`System`] plus per-thread counters.
#[derive(Debug)]
pub struct CountingAlloc;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static TRACE: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
    static BYTES: Cell<u64> = const { Cell::new(0) };
    static SIZES: Cell<[usize; 8]> = const { Cell::new([0; 8]) };
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

/// Tracks bytes live on this thread while counting (frees of memory allocated before the
/// count started make it lower, never higher).
fn live(delta: i64) {
    if !COUNTING.try_with(Cell::get).unwrap_or(false) {
        return;
    }
    let now = LIVE.with(|l| {
        l.set(l.get() + delta);
        l.get()
    });
    PEAK.with(|p| p.set(p.get().max(now)));
}

fn note(size: usize) {
    let counting = COUNTING.try_with(Cell::get).unwrap_or(false);
    if !counting {
        return;
    }
    let n = COUNT.with(|c| {
        c.set(c.get() + 1);
        c.get()
    });
    BYTES.with(|b| b.set(b.get() + size as u64));
    if n <= 8 {
        SIZES.with(|s| {
            let mut v = s.get();
            v[n as usize - 1] = size;
            s.set(v);
        });
    }
    if n == 1 && TRACE.with(Cell::get) {
        // Stop counting while the backtrace (which allocates) is taken and printed.
        COUNTING.with(|c| c.set(false));
        eprintln!(
            "first counted allocation ({size} bytes):\n{}",
            std::backtrace::Backtrace::force_capture()
        );
        COUNTING.with(|c| c.set(true));
    }
}

// SAFETY: every call is forwarded unchanged to `System`; the counters only read and write
// const-initialised thread locals without destructors, which never allocate.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        live(layout.size() as i64);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        live(layout.size() as i64);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        live(new_size as i64 - layout.size() as i64);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        live(-(layout.size() as i64));
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Allocations counted on this thread during one [`count`] call.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct Allocations {
    /// Number of allocations (including reallocations).
    pub count: u64,
    /// Bytes asked for.
    pub bytes: u64,
    /// Sizes of the first eight.
    pub first_sizes: [usize; 8],
    /// Most bytes live at once.
    pub peak: u64,
}

/// Runs `f` and returns what it allocated on this thread, with its result.
pub fn count<T>(f: impl FnOnce() -> T) -> (Allocations, T) {
    let trace = std::env::var_os("QCOW2_ALLOC_TRACE").is_some_and(|v| v == "1");
    COUNT.with(|c| c.set(0));
    BYTES.with(|b| b.set(0));
    SIZES.with(|s| s.set([0; 8]));
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    TRACE.with(|t| t.set(trace));
    COUNTING.with(|c| c.set(true));
    let out = f();
    COUNTING.with(|c| c.set(false));
    let allocations = Allocations {
        count: COUNT.with(Cell::get),
        bytes: BYTES.with(Cell::get),
        first_sizes: SIZES.with(Cell::get),
        peak: PEAK.with(Cell::get).max(0) as u64,
    };
    (allocations, out)
}

/// Whether [`CountingAlloc`] is this binary's global allocator (it sees a probe allocation).
pub fn installed() -> bool {
    let (a, b) = count(|| std::hint::black_box(Box::new(0u64)));
    drop(b);
    a.count > 0
}
