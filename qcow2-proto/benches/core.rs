//! The engine alone, with a null-I/O driver: what one core spends per request when the
//! disk costs nothing. Guest data ops complete at once without moving a byte; the
//! metadata ops (none once the caches are warm) are served from memory. Every iteration
//! submits a batch of requests at once (queue depth `DEPTH`) and drains them; the
//! counters are per request, and divan's allocation profiler counts heap allocations.
//!
//! Run: `cargo bench -p qcow2-proto --bench core`.

use qcow2_proto::{CreateOptions, Event, Image, ImageConfig, IoKind, IoOp, Request, Segment};

#[global_allocator]
static ALLOC: divan::AllocProfiler = divan::AllocProfiler::system();

const SIZE: u64 = 256 << 20;
const DEPTH: usize = 16;
const BLOCK: u64 = 4096;

fn main() {
    divan::main();
}

/// Serves an op: metadata from `disk`; guest data not at all (null I/O).
fn serve(op: &mut IoOp, disk: &mut Vec<u8>) -> usize {
    let mut pos = op.offset as usize;
    let n = op.len() as usize;
    match op.kind {
        IoKind::Read | IoKind::Write => {
            for seg in op.segments.iter_mut() {
                let len = seg.len();
                if op.kind == IoKind::Write && disk.len() < pos + len {
                    disk.resize(pos + len, 0);
                }
                match (op.kind, seg) {
                    (IoKind::Read, Segment::Buf(b)) => {
                        let s = b.as_mut_slice();
                        let end = (pos + s.len()).min(disk.len());
                        let have = end.saturating_sub(pos);
                        s[..have].copy_from_slice(&disk[pos..pos + have]);
                    }
                    (IoKind::Write, Segment::Buf(b)) => {
                        disk[pos..pos + b.len()].copy_from_slice(b.as_slice());
                    }
                    (IoKind::Write, Segment::Zeroes(z)) => disk[pos..pos + *z].fill(0),
                    _ => {}
                }
                pos += len;
            }
        }
        IoKind::SetLen => disk.resize(op.offset as usize, 0),
        _ => {}
    }
    n
}

/// Runs the engine until `done` requests finished.
fn drain(img: &mut Image, disk: &mut Vec<u8>, mut done: usize) {
    while done > 0 {
        while let Some(mut op) = img.poll_io() {
            let n = serve(&mut op, disk);
            img.complete(op, Ok(n));
        }
        while let Some(ev) = img.poll_event() {
            match ev {
                Event::Done { result, .. } => {
                    result.expect("request");
                    done -= 1;
                }
                Event::Opened(_) => done -= 1,
                Event::OpenFailed(e) => panic!("{e}"),
                _ => {}
            }
        }
    }
}

/// A fully allocated image, open, every table cached.
fn allocated() -> (Image, Vec<u8>) {
    let mut disk = Vec::new();
    let mut o = CreateOptions::new(SIZE);
    o.preallocation = qcow2_proto::Preallocation::Metadata;
    let mut img = Image::create(ImageConfig::new(0), o);
    drain(&mut img, &mut disk, 1);
    // Warm the caches: one read per cluster.
    for c in (0..SIZE).step_by(64 << 10) {
        img.submit(Request::Read {
            offset: c,
            len: BLOCK,
        })
        .unwrap();
        drain(&mut img, &mut disk, 1);
    }
    (img, disk)
}

/// xorshift: the offsets of random requests.
fn offsets(n: usize) -> Vec<u64> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % (SIZE / BLOCK) * BLOCK
        })
        .collect()
}

fn run(bencher: divan::Bencher, write: bool) {
    let (mut img, mut disk) = allocated();
    let offs = offsets(1 << 16);
    let mut i = 0;
    bencher
        .counter(divan::counter::ItemsCount::new(DEPTH))
        .bench_local(|| {
            for _ in 0..DEPTH {
                let offset = offs[i % offs.len()];
                i += 1;
                let r = if write {
                    Request::Write { offset, len: BLOCK }
                } else {
                    Request::Read { offset, len: BLOCK }
                };
                img.submit(r).unwrap();
            }
            drain(&mut img, &mut disk, DEPTH);
        });
}

/// Random 4 KiB reads of allocated clusters.
#[divan::bench]
fn allocated_read_4k(bencher: divan::Bencher) {
    run(bencher, false);
}

/// Random 4 KiB writes into allocated clusters (in place: no allocation, no metadata).
#[divan::bench]
fn inplace_write_4k(bencher: divan::Bencher) {
    run(bencher, true);
}

/// Probe: one allocation per iteration, to show what the profiler reports.
#[divan::bench]
fn probe(bencher: divan::Bencher) {
    bencher.bench_local(|| divan::black_box(vec![0u8; 64]));
}
