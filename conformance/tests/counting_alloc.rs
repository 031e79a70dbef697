//! The counting allocator counts this thread's allocations, and only while asked to.

use qcow2_conformance::counting_alloc::{count, installed, CountingAlloc};

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

#[test]
fn counts_this_threads_allocations_only() {
    assert!(installed());
    let (a, v) = count(|| std::hint::black_box(vec![0u8; 1000]));
    assert_eq!((a.count, a.bytes, a.first_sizes[0]), (1, 1000, 1000));
    drop(v);
    // Spawning allocates on this thread; what the other thread allocates is not counted.
    let (a, n) = count(|| {
        std::thread::scope(|s| {
            s.spawn(|| std::hint::black_box(vec![1u8; 1_000_003]).len())
                .join()
        })
    });
    assert_eq!(n.ok(), Some(1_000_003));
    assert!(a.count > 0 && a.bytes < 1_000_003, "{a:?}");
    let (a, n) = count(|| (0..100u64).sum::<u64>());
    assert_eq!((a.count, n), (0, 4950));
}
