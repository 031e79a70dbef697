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
    // Scattered requests, and a sequential stream (whose requests an awake reaper is left
    // to take in: here the ring thread's look every 10 ms does).
    for step in [1 << 20, 65536] {
        let (_dir, _path, img) = scratch(64 << 20, &direct());
        // Polled once (so it submitted and became the one reaping the ring), then left alone.
        let mut cx = Context::from_waker(Waker::noop());
        let mut stalled = Box::pin(img.write_at(IoBuf::zeroed(65536), 0));
        let _ = stalled.as_mut().poll(&mut cx);
        let (done, finished) = std::sync::mpsc::channel();
        let other = img.clone();
        std::thread::spawn(move || {
            for i in 0..32u64 {
                let (r, _) = block_on(other.write_at(IoBuf::zeroed(65536), (1 << 20) + i * step));
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
}

#[test]
fn every_poll_window_serves_the_same_requests() {
    // Off (the reactor's wait only), the default, and a maximum so large that the reaper
    // polls through every wait: the same writes from four threads land and read back,
    // with completions posted cooperatively (the default) and by interrupting the
    // submitting thread. (Four threads submit: completions of one thread's ops wait for
    // that thread while another reaps.)
    let windows = [
        Some(std::time::Duration::ZERO),
        None,
        Some(std::time::Duration::from_secs(1)),
    ];
    for (poll_max, interrupt_submitters) in
        windows.into_iter().flat_map(|w| [(w, false), (w, true)])
    {
        let options = OpenOptions {
            poll_max,
            interrupt_submitters,
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
                "{poll_max:?} interrupt {interrupt_submitters}: write {n}"
            );
        }
        block_on(img.close()).unwrap();
        let img = qcow2_uring::open(&path, &OpenOptions::read_only()).unwrap();
        let report = block_on(img.check(None)).unwrap();
        assert_eq!((report.corruptions, report.leaks), (0, 0), "{report:?}");
    }
}

/// Each 512-byte sector of chunk `offset` of a stream stamped with its own guest offset.
fn stamped(offset: u64, len: usize) -> IoBuf {
    let mut buf = IoBuf::zeroed(len);
    for (i, sector) in buf.as_mut_slice().chunks_mut(512).enumerate() {
        sector[..8].copy_from_slice(&(offset + i as u64 * 512 + 1).to_le_bytes());
    }
    buf
}

/// `depth` callers on one task, each taking the next `bs` bytes of `0..end` until none are
/// left: sequential requests in flight together, as a guest streaming a file. Reads return
/// their chunks by offset.
fn stream(img: &Image, depth: usize, bs: usize, end: u64, write: bool) -> Vec<(u64, IoBuf)> {
    let next = std::cell::Cell::new(0u64);
    let workers: Vec<_> = (0..depth)
        .map(|_| async {
            let mut got = Vec::new();
            loop {
                let at = next.get();
                if at >= end {
                    return got;
                }
                next.set(at + bs as u64);
                let (r, buf) = if write {
                    img.write_at(stamped(at, bs), at).await
                } else {
                    // (Filled: a byte the read leaves alone shows.)
                    let mut buf = IoBuf::zeroed(bs);
                    buf.as_mut_slice().fill(0xEE);
                    img.read_at(buf, at).await
                };
                r.unwrap();
                if !write {
                    got.push((at, buf));
                }
            }
        })
        .collect();
    let mut chunks: Vec<_> = qcow2_conformance::async_rt::join_all(workers)
        .into_iter()
        .flatten()
        .collect();
    chunks.sort_by_key(|(at, _)| *at);
    chunks
}

#[test]
fn sequential_requests_in_flight_are_joined_and_land_in_place() {
    for options in [direct(), OpenOptions::default()] {
        let (_dir, path, img) = scratch(64 << 20, &options);
        let end = 16 << 20;
        stream(&img, 16, 8192, end, true);
        let joined = img.joined_ops();
        assert!(joined > 0, "no write was joined ({:?})", options.cache);
        for (at, buf) in stream(&img, 16, 8192, end, false) {
            assert!(
                buf.as_slice() == stamped(at, 8192).as_slice(),
                "chunk at {at} ({:?})",
                options.cache
            );
        }
        assert!(img.joined_ops() > joined, "no read was joined");
        block_on(img.close()).unwrap();
        let img = qcow2_uring::open(&path, &OpenOptions::read_only()).unwrap();
        for at in (0..end).step_by(1 << 20) {
            let (r, back) = block_on(img.read_at(IoBuf::zeroed(8192), at));
            r.unwrap();
            assert!(back.as_slice() == stamped(at, 8192).as_slice(), "at {at}");
        }
        let report = block_on(img.check(None)).unwrap();
        assert_eq!((report.corruptions, report.leaks), (0, 0), "{report:?}");
    }
}

#[test]
fn joined_reads_cut_short_by_the_end_of_file_read_as_each_alone() {
    // A raw backing file cut short by someone else while the overlay is open: the engine
    // still reads it to its old length, so a joined read that runs into the new end of
    // file comes back short. Its ops go again one by one and read what each would have
    // alone (the part past the end as zeros).
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = (dir.path().join("base.raw"), dir.path().join("top.qcow2"));
    let end = 4 << 20;
    let mut data = Vec::with_capacity(end as usize);
    for at in (0..end).step_by(8192) {
        data.extend_from_slice(stamped(at, 8192).as_slice());
    }
    std::fs::write(&base, &data).unwrap();
    let create = CreateOptions {
        backing_file: Some("base.raw".into()),
        backing_format: Some("raw".into()),
        ..CreateOptions::new(end)
    };
    let img = qcow2_uring::create(&top, &create, &direct()).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&base)
        .unwrap()
        .set_len(end - (1 << 20) - 12 * 1024)
        .unwrap();

    let alone: Vec<IoBuf> = (0..end)
        .step_by(8192)
        .map(|at| {
            let (r, buf) = block_on(img.read_at(IoBuf::zeroed(8192), at));
            r.unwrap();
            buf
        })
        .collect();
    let cut = alone
        .iter()
        .filter(|b| b.as_slice().iter().all(|&x| x == 0))
        .count();
    assert!(cut > 0 && cut < alone.len(), "{cut} zero chunks");
    let joined = img.joined_ops();
    for round in 0..8 {
        let chunks = stream(&img, 16, 8192, end, false);
        assert_eq!(chunks.len(), alone.len());
        for ((at, buf), want) in chunks.iter().zip(&alone) {
            assert!(
                buf.as_slice() == want.as_slice(),
                "round {round}: chunk at {at}"
            );
        }
    }
    assert!(img.joined_ops() > joined, "no read was joined");
    block_on(img.close()).unwrap();
}
