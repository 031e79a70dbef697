//! The requests of one run, handed out to its workers (threads or tasks) from one shared
//! counter: request `i` is the same request for every runtime and every worker count, given
//! the seed (offsets and the read/write choice are a hash of the seed and `i`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::cpu;
use super::names::Pattern;

/// What a run does, whoever runs it.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    /// Request pattern.
    pub rw: Pattern,
    /// Request size in bytes.
    pub bs: u64,
    /// Requests in flight.
    pub depth: usize,
    /// Wall time after which no request is started.
    pub runtime: Duration,
    /// Seed of the offsets and the read/write choice.
    pub seed: u64,
    /// Percent of reads (`RandRw`; the other patterns fix it).
    pub read_pct: u32,
    /// A flush after every this many writes (0: none).
    pub flush_every: u64,
}

/// splitmix64: request `i`'s random word, from the seed alone.
pub fn mix(seed: u64, i: u64) -> u64 {
    let mut z = seed
        .wrapping_add(i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One request.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Req {
    /// Guest offset.
    pub offset: u64,
    /// A write (else a read).
    pub write: bool,
    /// A flush follows, once the write is done.
    pub flush_after: bool,
}

/// The requests of one run, shared by its workers.
#[derive(Debug)]
pub struct Workload {
    spec: Spec,
    blocks: u64,
    read_pct: u32,
    deadline: Instant,
    next: AtomicU64,
    writes: AtomicU64,
}

impl Workload {
    /// A run over a disk of `disk_size` bytes, starting now.
    pub fn new(spec: Spec, disk_size: u64) -> Self {
        Self {
            spec,
            blocks: (disk_size / spec.bs).max(1),
            read_pct: spec.rw.fixed_read_pct().unwrap_or(spec.read_pct.min(100)),
            deadline: Instant::now() + spec.runtime,
            next: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        }
    }

    /// The request `i` of the run (no clock, no end).
    pub fn request(&self, i: u64) -> Req {
        let word = mix(self.spec.seed, i);
        let block = if self.spec.rw.random() {
            word % self.blocks
        } else {
            i % self.blocks
        };
        let write = (word >> 32) % 100 >= u64::from(self.read_pct);
        Req {
            offset: block * self.spec.bs,
            write,
            flush_after: false,
        }
    }

    /// The next request, or `None` once the time is up or a sequential run reached the end
    /// of the disk. The first request is always handed out, however loaded the machine.
    pub fn next(&self) -> Option<Req> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        if i > 0 && Instant::now() >= self.deadline {
            return None;
        }
        if !self.spec.rw.random() && i >= self.blocks {
            return None;
        }
        let mut req = self.request(i);
        if req.write && self.spec.flush_every > 0 {
            let n = self.writes.fetch_add(1, Ordering::Relaxed) + 1;
            req.flush_after = n % self.spec.flush_every == 0;
        }
        Some(req)
    }
}

/// What one worker did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tally {
    /// Reads done.
    pub reads: u64,
    /// Writes done.
    pub writes: u64,
    /// Flush requests done.
    pub flushes: u64,
    /// When the worker's last request completed.
    pub last: Option<Instant>,
}

impl Tally {
    /// Counts a completed request.
    pub fn done(&mut self, req: Req) {
        if req.write {
            self.writes += 1;
        } else {
            self.reads += 1;
        }
        self.last = Some(Instant::now());
    }

    /// Counts a completed flush request.
    pub fn flushed(&mut self) {
        self.flushes += 1;
        self.last = Some(Instant::now());
    }

    /// Adds another worker's tally.
    pub fn merge(mut self, other: Tally) -> Tally {
        self.reads += other.reads;
        self.writes += other.writes;
        self.flushes += other.flushes;
        self.last = self.last.max(other.last);
        self
    }
}

/// The outcome of one run.
#[derive(Clone, Copy, Debug)]
pub struct Measured {
    /// Reads and writes done (flushes are not requests that move data).
    pub ops: u64,
    /// Writes among them.
    pub writes: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// From the first submission to the last completion.
    pub secs: f64,
    /// `fdatasync`s issued while the requests ran (`None`: not counted).
    pub syncs: Option<u64>,
    /// CPU time used while the requests ran, every thread (`None`: not measured).
    pub cpu: Option<Duration>,
}

/// When a run started, on the wall clock and on the process's CPU clock.
#[derive(Clone, Copy, Debug)]
pub struct Start {
    at: Instant,
    cpu: Duration,
}

impl Start {
    /// Now.
    pub fn now() -> Self {
        let cpu = cpu::own();
        Self {
            at: Instant::now(),
            cpu,
        }
    }
}

impl Measured {
    /// From the workers' tallies (call it as they finish), timed from `start`: the wall
    /// clock to the last completion, the CPU clock to now.
    pub fn from_tally(t: Tally, bs: u64, start: Start, syncs: Option<u64>) -> Self {
        let cpu = cpu::own().saturating_sub(start.cpu);
        let end = t.last.unwrap_or(start.at);
        let ops = t.reads + t.writes;
        Self {
            ops,
            writes: t.writes,
            bytes: ops * bs,
            secs: end.duration_since(start.at).as_secs_f64(),
            syncs,
            cpu: Some(cpu),
        }
    }

    /// Microseconds of CPU time per request, for runs that measured it.
    pub fn cpu_us_per_op(&self) -> Option<f64> {
        match self.cpu {
            Some(c) if self.ops > 0 => Some(c.as_secs_f64() * 1e6 / self.ops as f64),
            _ => None,
        }
    }

    /// Megabytes (10^6) a second.
    pub fn mbps(&self) -> f64 {
        self.bytes as f64 / self.secs.max(1e-9) / 1e6
    }

    /// Requests a second.
    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.secs.max(1e-9)
    }

    /// `fdatasync`s per write, for runs that wrote and counted them.
    pub fn syncs_per_write(&self) -> Option<f64> {
        match self.syncs {
            Some(s) if self.writes > 0 => Some(s as f64 / self.writes as f64),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rw: Pattern, read_pct: u32, flush_every: u64) -> Spec {
        Spec {
            rw,
            bs: 8192,
            depth: 4,
            runtime: Duration::from_secs(60),
            seed: 42,
            read_pct,
            flush_every,
        }
    }

    #[test]
    fn requests_depend_on_the_seed_only() {
        let a = Workload::new(spec(Pattern::RandRw, 70, 0), 1 << 30);
        let b = Workload::new(spec(Pattern::RandRw, 70, 0), 1 << 30);
        let xs: Vec<_> = (0..100).map(|i| a.request(i)).collect();
        assert_eq!(xs, (0..100).map(|i| b.request(i)).collect::<Vec<_>>());
        let mut other = spec(Pattern::RandRw, 70, 0);
        other.seed = 43;
        let c = Workload::new(other, 1 << 30);
        assert_ne!(xs, (0..100).map(|i| c.request(i)).collect::<Vec<_>>());
        assert!(xs
            .iter()
            .all(|r| r.offset % 8192 == 0 && r.offset < 1 << 30));
    }

    #[test]
    fn read_share_and_flushes_follow_the_spec() {
        let w = Workload::new(spec(Pattern::RandRw, 70, 4), 1 << 30);
        let reqs: Vec<_> = (0..10_000).map(|_| w.next().unwrap()).collect();
        let reads = reqs.iter().filter(|r| !r.write).count();
        assert!((6500..7500).contains(&reads), "{reads}");
        let writes = reqs.iter().filter(|r| r.write).count();
        let flushes = reqs.iter().filter(|r| r.flush_after).count();
        assert_eq!(flushes, writes / 4);
        let r = Workload::new(spec(Pattern::RandRead, 0, 4), 1 << 20);
        assert!((0..100).all(|_| !r.next().unwrap().write));
    }

    #[test]
    fn sequential_runs_stop_at_the_end_of_the_disk() {
        let w = Workload::new(spec(Pattern::SeqWrite, 0, 0), 64 << 10);
        let offsets: Vec<_> = std::iter::from_fn(|| w.next()).map(|r| r.offset).collect();
        assert_eq!(offsets, (0..8).map(|b| b * 8192).collect::<Vec<_>>());
    }

    #[test]
    fn figures_come_from_the_tally() {
        let start = Start::now();
        let mut t = Tally::default();
        t.done(Req {
            offset: 0,
            write: true,
            flush_after: false,
        });
        let t = t.merge(Tally {
            reads: 3,
            ..Tally::default()
        });
        let m = Measured::from_tally(t, 4096, start, Some(2));
        assert_eq!((m.ops, m.writes, m.bytes), (4, 1, 16384));
        assert_eq!(m.syncs_per_write(), Some(2.0));
        assert!(m.mbps() > 0.0 && m.iops() > 0.0);
    }
}
