//! What is particular to the io_uring runtime: bounce accounting under O_DIRECT, requests
//! abandoned by their callers, handles on many threads.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use futures_lite::future::block_on;
use qcow2_uring::{Cache, CreateOptions, GuestBuf, Image, IoBuf, OpenOptions};

/// A buffer whose bytes start one byte past a page boundary: never O_DIRECT-ready.
struct Misaligned {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

impl Misaligned {
    fn new(fill: u8, len: usize) -> Self {
        let mem = vec![fill; len + 8192];
        let start = (4096 - mem.as_ptr() as usize % 4096) % 4096 + 1;
        Self { mem, start, len }
    }
}

impl GuestBuf for Misaligned {
    fn as_slice(&self) -> &[u8] {
        &self.mem[self.start..self.start + self.len]
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + self.len]
    }
}

/// A new image of `size` bytes in a temporary directory (kept while the first value lives).
fn scratch(size: u64, options: &OpenOptions) -> (tempfile::TempDir, std::path::PathBuf, Image) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.qcow2");
    let img = qcow2_uring::create(&path, &CreateOptions::new(size), options).unwrap();
    (dir, path, img)
}

fn direct() -> OpenOptions {
    OpenOptions {
        cache: Cache::None,
        ..OpenOptions::default()
    }
}

#[test]
fn aligned_buffers_skip_the_bounce_and_others_are_counted() {
    let (_dir, _path, img) = scratch(16 << 20, &direct());
    // Creating patches a few header bytes in place (a sector read-modify-write).
    let base = img.bounced_bytes();
    let mut buf = IoBuf::zeroed(65536);
    buf.as_mut_slice().fill(0x11);
    let (r, _) = block_on(img.write_at(buf, 1 << 20));
    r.unwrap();
    let (r, back) = block_on(img.read_at(IoBuf::zeroed(65536), 1 << 20));
    r.unwrap();
    assert!(back.as_slice().iter().all(|&b| b == 0x11));
    assert_eq!(
        img.bounced_bytes(),
        base,
        "page-aligned buffers went through a bounce"
    );

    let (r, _) = block_on(img.write_at(Misaligned::new(0x22, 8192), 2 << 20));
    r.unwrap();
    let (r, back) = block_on(img.read_at(Misaligned::new(0, 8192), 2 << 20));
    r.unwrap();
    assert!(back.as_slice().iter().all(|&b| b == 0x22));
    assert_eq!(
        img.bounced_bytes() - base,
        2 * 8192,
        "each misaligned byte bounced once"
    );

    // Unaligned guest offsets under O_DIRECT: read-modify-write of the edge sectors.
    let (r, _) = block_on(img.write_at(vec![0x33u8; 100], (1 << 20) + 7));
    r.unwrap();
    let (r, back) = block_on(img.read_at(vec![0u8; 200], 1 << 20));
    r.unwrap();
    assert!(back[..7].iter().all(|&b| b == 0x11));
    assert!(back[7..107].iter().all(|&b| b == 0x33));
    assert!(back[107..].iter().all(|&b| b == 0x11));
    block_on(img.close()).unwrap();
}

#[test]
fn abandoned_requests_finish_and_keep_the_image_sound() {
    let (_dir, _path, img) = scratch(64 << 20, &direct());
    let mut cx = Context::from_waker(Waker::noop());
    for i in 0..64u64 {
        // Sent on the first poll, then dropped: the ring keeps each buffer until its I/O ends.
        let mut buf = IoBuf::zeroed(65536);
        buf.as_mut_slice().fill(i as u8 + 1);
        let mut w = pin!(img.write_at(buf, i << 20));
        assert!(matches!(
            w.as_mut().poll(&mut cx),
            Poll::Pending | Poll::Ready(_)
        ));
        let mut r = pin!(img.read_at(IoBuf::zeroed(65536), (i ^ 7) << 20));
        let _ = r.as_mut().poll(&mut cx);
    }
    block_on(img.flush()).unwrap();
    for i in 0..64u64 {
        let (r, back) = block_on(img.read_at(vec![0u8; 65536], i << 20));
        r.unwrap();
        assert!(
            back.iter().all(|&b| b == i as u8 + 1),
            "an abandoned write completed before the flush must be there"
        );
    }
    let report = block_on(img.check(None)).unwrap();
    assert_eq!((report.corruptions, report.leaks), (0, 0), "{report:?}");
    block_on(img.close()).unwrap();
}

#[test]
fn handles_are_shared_across_threads() {
    let (_dir, path, img) = scratch(64 << 20, &OpenOptions::default());
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let img = img.clone();
            s.spawn(move || {
                for i in 0..16u64 {
                    let at = (t * 16 + i) << 20;
                    let (r, _) = block_on(img.write_at(vec![(t * 16 + i) as u8; 4096], at));
                    r.unwrap();
                }
            });
        }
    });
    for n in 0..64u64 {
        let (r, back) = block_on(img.read_at(vec![0u8; 4096], n << 20));
        r.unwrap();
        assert!(back.iter().all(|&b| b == n as u8));
    }
    block_on(img.close()).unwrap();
    let img = qcow2_uring::open(&path, &OpenOptions::read_only()).unwrap();
    let report = block_on(img.check(None)).unwrap();
    assert_eq!((report.corruptions, report.leaks), (0, 0), "{report:?}");
}

#[test]
fn requests_after_close_fail_cleanly() {
    let (_dir, _path, img) = scratch(1 << 20, &OpenOptions::default());
    let other = img.clone();
    block_on(img.close()).unwrap();
    let (r, buf) = block_on(other.write_at(vec![1u8; 512], 0));
    assert!(r.is_err(), "a write after close must fail");
    assert_eq!(buf.len(), 512, "and hand its buffer back");
}

#[test]
fn more_requests_than_the_engine_takes_at_once() {
    // The engine takes 64 requests at a time; the rest wait in the driver's backlog and go
    // in as room appears.
    let (_dir, _path, img) = scratch(64 << 20, &OpenOptions::default());
    let writes: Vec<_> = (0..300u64)
        .map(|i| img.write_at(vec![(i % 251) as u8 + 1; 4096], i * 65536 + 512))
        .collect();
    for (r, _) in qcow2_conformance::async_rt::join_all(writes) {
        r.unwrap();
    }
    let reads: Vec<_> = (0..300u64)
        .map(|i| img.read_at(vec![0u8; 4096], i * 65536 + 512))
        .collect();
    for (i, (r, buf)) in qcow2_conformance::async_rt::join_all(reads)
        .into_iter()
        .enumerate()
    {
        r.unwrap();
        assert!(buf.iter().all(|&b| b == (i % 251) as u8 + 1), "request {i}");
    }
    block_on(img.close()).unwrap();
}

#[test]
fn threads_that_submit_and_exit_lose_no_op() {
    // Callers submit from their own threads, and the kernel cancels what an exiting thread
    // submitted that had not started (often another caller's ops, write-back, or a flush).
    // Cancelled ops go again; every write here must land and every flush succeed.
    let (_dir, _path, img) = scratch(64 << 20, &OpenOptions::default());
    let at = |round: u64, t: u64| (round * 8 + t) << 16;
    for round in 0..8u64 {
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let img = img.clone();
                s.spawn(move || {
                    let fill = (round * 8 + t) as u8 + 1;
                    if t % 2 == 0 {
                        // Sent on the first poll, then the thread is gone.
                        let mut cx = Context::from_waker(Waker::noop());
                        let mut w = pin!(img.write_at(vec![fill; 65536], at(round, t)));
                        let _ = w.as_mut().poll(&mut cx);
                    } else {
                        let (r, _) = block_on(img.write_at(vec![fill; 65536], at(round, t)));
                        r.unwrap();
                    }
                });
            }
        });
    }
    block_on(img.flush()).unwrap();
    for (round, t) in (0..8u64).flat_map(|r| (0..8u64).map(move |t| (r, t))) {
        let (r, back) = block_on(img.read_at(vec![0u8; 65536], at(round, t)));
        r.unwrap();
        let fill = (round * 8 + t) as u8 + 1;
        assert!(back.iter().all(|&b| b == fill), "write {round}/{t} lost");
    }
    let report = block_on(img.check(None)).unwrap();
    assert_eq!((report.corruptions, report.leaks), (0, 0), "{report:?}");
    block_on(img.close()).unwrap();
}

#[test]
fn a_reaper_nobody_polls_does_not_stall_other_callers() {
    let (_dir, _path, img) = scratch(64 << 20, &direct());
    // Polled once (so it submitted and became the one reaping the ring), then left alone.
    let mut cx = Context::from_waker(Waker::noop());
    let mut stalled = Box::pin(img.write_at(IoBuf::zeroed(65536), 0));
    let _ = stalled.as_mut().poll(&mut cx);
    let (done, finished) = std::sync::mpsc::channel();
    let other = img.clone();
    std::thread::spawn(move || {
        for i in 0..16u64 {
            let (r, _) = block_on(other.write_at(IoBuf::zeroed(65536), (i + 1) << 20));
            r.unwrap();
        }
        block_on(other.flush()).unwrap();
        done.send(()).unwrap();
    });
    finished
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("requests of other callers finish while a reaper is not polled");
    drop(stalled);
    block_on(img.close()).unwrap();
}

#[test]
fn every_poll_window_serves_the_same_requests() {
    // Off (the reactor's wait only), the default, and a maximum so large that the reaper
    // polls through every wait: the same writes from four threads land and read back.
    for poll_max in [
        Some(std::time::Duration::ZERO),
        None,
        Some(std::time::Duration::from_secs(1)),
    ] {
        let options = OpenOptions {
            poll_max,
            ..direct()
        };
        let (_dir, path, img) = scratch(64 << 20, &options);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let img = img.clone();
                s.spawn(move || {
                    for i in 0..32u64 {
                        let mut buf = IoBuf::zeroed(8192);
                        buf.as_mut_slice().fill((t * 32 + i) as u8 + 1);
                        let (r, _) = block_on(img.write_at(buf, (t * 32 + i) << 18));
                        r.unwrap();
                    }
                });
            }
        });
        block_on(img.flush()).unwrap();
        for n in 0..128u64 {
            let (r, back) = block_on(img.read_at(IoBuf::zeroed(8192), n << 18));
            r.unwrap();
            let fill = n as u8 + 1;
            assert!(
                back.as_slice().iter().all(|&b| b == fill),
                "{poll_max:?}: write {n}"
            );
        }
        block_on(img.close()).unwrap();
        let img = qcow2_uring::open(&path, &OpenOptions::read_only()).unwrap();
        let report = block_on(img.check(None)).unwrap();
        assert_eq!((report.corruptions, report.leaks), (0, 0), "{report:?}");
    }
}
