//! Helpers for the check tests: tiny executors for [`Checker`] (over a file and over a
//! `Vec`), `qemu-img` wrappers, and pokes at an image's metadata.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use qcow2_proto::check::Checker;
use qcow2_proto::format::header::Header;
use qcow2_proto::format::refcount;
use qcow2_proto::{CheckReport, IoError, IoKind, IoOp, OpenError, Repair, Segment, Target};

/// Most ops a check of a test image may take (a hang shows up as a failure).
const MAX_OPS: u64 = 5_000_000;

fn io_err(e: &std::io::Error) -> IoError {
    IoError::from(e)
}

/// Runs one op against `file`, like a runtime would.
fn exec_file(file: &File, op: &mut IoOp, writable: bool) -> Result<usize, IoError> {
    assert_eq!(op.target, Target::Image);
    assert!(op.segments.len() <= 1, "checker ops carry one buffer");
    match op.kind {
        IoKind::Read => {
            let Some(Segment::Buf(b)) = op.segments.first_mut() else {
                panic!("read without a buffer")
            };
            let buf = b.as_mut_slice();
            let mut done = 0;
            while done < buf.len() {
                match file.read_at(&mut buf[done..], op.offset + done as u64) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) => return Err(io_err(&e)),
                }
            }
            buf[done..].fill(0);
            Ok(done)
        }
        IoKind::Write => {
            assert!(writable, "a check without repair must not write");
            let Some(Segment::Buf(b)) = op.segments.first() else {
                panic!("write without a buffer")
            };
            file.write_all_at(b.as_slice(), op.offset)
                .map_err(|e| io_err(&e))?;
            Ok(b.len())
        }
        IoKind::Flush => {
            assert!(writable, "a check without repair must not flush");
            file.sync_data().map(|()| 0).map_err(|e| io_err(&e))
        }
        IoKind::SetLen => {
            assert!(writable, "a check without repair must not resize");
            file.set_len(op.offset).map(|()| 0).map_err(|e| io_err(&e))
        }
        other => panic!("unexpected op kind {other:?}"),
    }
}

/// What a checker run did besides reporting.
#[derive(Debug, Default, Clone, Copy)]
pub struct OpStats {
    pub ops: u64,
    pub writes: u64,
    pub flushes: u64,
    /// Whether the last op was a flush (after any write).
    pub ends_with_flush: bool,
}

/// Drives `checker` to its result, running each op with `exec`.
pub fn drive(
    mut checker: Checker,
    mut exec: impl FnMut(&mut IoOp) -> Result<usize, IoError>,
) -> (Result<CheckReport, OpenError>, OpStats) {
    let mut stats = OpStats::default();
    loop {
        let mut progressed = false;
        while let Some(mut op) = checker.poll_io() {
            progressed = true;
            stats.ops += 1;
            assert!(stats.ops < MAX_OPS, "checker issued too many ops");
            match op.kind {
                IoKind::Write | IoKind::SetLen => {
                    stats.writes += 1;
                    stats.ends_with_flush = false;
                }
                IoKind::Flush => {
                    stats.flushes += 1;
                    stats.ends_with_flush = true;
                }
                _ => {}
            }
            let r = exec(&mut op);
            checker.complete(op, r);
        }
        if let Some(result) = checker.poll_result() {
            assert!(checker.poll_result().is_none(), "the result comes once");
            assert!(checker.poll_io().is_none(), "no ops after the result");
            return (result, stats);
        }
        assert!(progressed, "checker stalled: no op and no result");
    }
}

/// Checks the image file at `path` with our checker.
pub fn check_file(
    path: &Path,
    repair: Option<Repair>,
) -> (Result<CheckReport, OpenError>, OpStats) {
    let writable = repair.is_some();
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .expect("open image");
    let len = file.metadata().expect("stat").len();
    drive(Checker::new(len, repair), |op| {
        exec_file(&file, op, writable)
    })
}

/// Checks an in-memory image (reads past the end are zero-filled; writes grow it).
pub fn check_vec(
    disk: &mut Vec<u8>,
    repair: Option<Repair>,
    memory_limit: Option<u64>,
) -> (Result<CheckReport, OpenError>, OpStats) {
    let mut checker = Checker::new(disk.len() as u64, repair);
    if let Some(limit) = memory_limit {
        checker = checker.with_memory_limit(limit);
    }
    drive(checker, |op| {
        let Some(Segment::Buf(b)) = op.segments.first_mut() else {
            return Ok(match op.kind {
                IoKind::SetLen => {
                    // Keep test memory sane: refuse absurd lengths like a full disk would.
                    if op.offset > 1 << 32 {
                        return Err(IoError {
                            kind: std::io::ErrorKind::StorageFull,
                            raw_os_error: Some(27),
                        });
                    }
                    disk.resize(op.offset as usize, 0);
                    0
                }
                _ => 0,
            });
        };
        let off = op.offset;
        match op.kind {
            IoKind::Read => {
                let out = b.as_mut_slice();
                let start = off.min(disk.len() as u64) as usize;
                let n = (disk.len() - start).min(out.len());
                out[..n].copy_from_slice(&disk[start..start + n]);
                out[n..].fill(0);
                Ok(n)
            }
            IoKind::Write => {
                let end = off as usize + b.len();
                if end > 1 << 32 {
                    return Err(IoError {
                        kind: std::io::ErrorKind::StorageFull,
                        raw_os_error: Some(27),
                    });
                }
                if disk.len() < end {
                    disk.resize(end, 0);
                }
                disk[off as usize..end].copy_from_slice(b.as_slice());
                Ok(b.len())
            }
            other => panic!("unexpected op kind {other:?}"),
        }
    })
}

// ---- qemu -------------------------------------------------------------------------------

/// Whether qemu-img and qemu-io can be used; without them the qemu tests fail under CI
/// and are skipped otherwise.
pub fn have_qemu() -> bool {
    let ok = ["qemu-img", "qemu-io"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "qemu-img/qemu-io are required when CI is set"
        );
        eprintln!("skipping: qemu-img or qemu-io not found");
    }
    ok
}

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img check --output=json`, parsed.
#[derive(Debug, Clone)]
pub struct QemuCheck {
    /// Exit code (0 clean, 1 check failed, 2 corruptions, 3 leaks).
    pub code: i32,
    /// The numeric JSON fields (absent ones are 0, as qemu-img omits zeroes).
    pub fields: BTreeMap<String, u64>,
    pub stderr: String,
}

impl QemuCheck {
    pub fn get(&self, key: &str) -> u64 {
        self.fields.get(key).copied().unwrap_or(0)
    }
}

/// `qemu-img check --output=json [-r repair] path`, parsed.
pub fn qemu_check(path: &Path, repair: Option<&str>) -> QemuCheck {
    let p = path.to_str().expect("utf-8 path");
    let mut args = vec!["check", "-f", "qcow2", "--output=json"];
    if let Some(r) = repair {
        args.extend(["-r", r]);
    }
    args.push(p);
    qemu_check_args(&args)
}

/// `qemu-img` with `args` (a `check --output=json` command line), parsed.
pub fn qemu_check_args(args: &[&str]) -> QemuCheck {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut fields = BTreeMap::new();
    for line in stdout.lines() {
        let line = line.trim().trim_end_matches(',');
        if let Some((k, v)) = line.split_once(':') {
            if let Ok(n) = v.trim().parse::<u64>() {
                fields.insert(k.trim().trim_matches('"').to_string(), n);
            }
        }
    }
    QemuCheck {
        code: out.status.code().unwrap_or(-1),
        fields,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// At most the first 60 lines of `text`.
fn short(text: &str) -> String {
    let mut out: String = text.lines().take(60).collect::<Vec<_>>().join("\n");
    if text.lines().count() > 60 {
        out.push_str("\n...");
    }
    out
}

/// Asserts that our report carries the same numbers as qemu-img's JSON.
pub fn assert_same(ours: &Result<CheckReport, OpenError>, q: &QemuCheck, what: &str) {
    let ours = match ours {
        Ok(r) => r,
        // Both refused the image (QEMU at open, or its check failed).
        Err(_) if q.code == 1 => return,
        Err(e) => panic!(
            "{what}: our check failed to start ({e}); qemu (exit {}) said {:?}: {}",
            q.code,
            q.fields,
            short(&q.stderr)
        ),
    };
    let ctx = || {
        format!(
            "{what}\nours: {ours:#?}\nqemu (exit {}): {:?}\n{}",
            q.code,
            q.fields,
            short(&q.stderr)
        )
    };
    if q.code == 1 {
        assert!(
            ours.check_errors > 0,
            "qemu's check failed but ours did not: {}",
            ctx()
        );
        return;
    }
    for (key, value) in ours.qemu_fields() {
        assert_eq!(value, q.get(key), "field {key} differs: {}", ctx());
    }
    let code = if ours.corruptions > 0 {
        2
    } else if ours.leaks > 0 {
        3
    } else {
        0
    };
    assert_eq!(code, q.code, "exit code differs: {}", ctx());
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("qcow2-check-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---- pokes ------------------------------------------------------------------------------

/// The header fields the pokes need.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    pub cluster_bits: u32,
    pub cluster_size: u64,
    pub order: u32,
    pub rb_bits: u32,
    pub l1_offset: u64,
    pub l1_size: u32,
    pub reftable_offset: u64,
    pub reftable_entries: u64,
    pub version: u32,
    /// Extended L2 entries (16 bytes: entry, subcluster bitmap).
    pub extended: bool,
}

pub fn read_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).expect("open");
    let mut b = vec![0; len];
    let n = f.read_at(&mut b, off).expect("read");
    b[n..].fill(0);
    b
}

pub fn write_at(path: &Path, off: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).expect("open");
    f.write_all_at(bytes, off).expect("write");
}

pub fn u64_at(path: &Path, off: u64) -> u64 {
    u64::from_be_bytes(read_at(path, off, 8).try_into().expect("8 bytes"))
}

pub fn set_u64(path: &Path, off: u64, v: u64) {
    write_at(path, off, &v.to_be_bytes());
}

pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").len()
}

pub fn meta(path: &Path) -> Meta {
    let h = Header::decode(&read_at(path, 0, 4096)).expect("header");
    let cb = h.cluster_bits;
    Meta {
        cluster_bits: cb,
        cluster_size: 1 << cb,
        order: h.refcount_order,
        rb_bits: cb + 3 - h.refcount_order,
        l1_offset: h.l1_table_offset,
        l1_size: h.l1_size,
        reftable_offset: h.refcount_table_offset,
        reftable_entries: u64::from(h.refcount_table_clusters) << (cb - 3),
        version: h.version,
        extended: h.incompatible_features & 16 != 0,
    }
}

const MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Where the refcount of `cluster` is stored: (refblock offset, index), if it has a refblock.
pub fn refcount_slot(path: &Path, m: &Meta, cluster: u64) -> Option<(u64, usize)> {
    let index = cluster >> m.rb_bits;
    if index >= m.reftable_entries {
        return None;
    }
    let rb = u64_at(path, m.reftable_offset + index * 8) & !0x1ff;
    (rb != 0).then_some((rb, (cluster & ((1 << m.rb_bits) - 1)) as usize))
}

pub fn get_refcount(path: &Path, m: &Meta, cluster: u64) -> u64 {
    let Some((rb, i)) = refcount_slot(path, m, cluster) else {
        return 0;
    };
    refcount::get(&read_at(path, rb, m.cluster_size as usize), m.order, i)
}

pub fn set_refcount(path: &Path, m: &Meta, cluster: u64, value: u64) -> bool {
    let Some((rb, i)) = refcount_slot(path, m, cluster) else {
        return false;
    };
    if value > refcount::max(m.order) {
        return false;
    }
    let mut block = read_at(path, rb, m.cluster_size as usize);
    refcount::set(&mut block, m.order, i, value);
    write_at(path, rb, &block);
    true
}

/// The active L2 entries in guest order: (host offset of the entry, value), non-zero only.
pub fn l2_entries(path: &Path, m: &Meta) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for i in 0..u64::from(m.l1_size) {
        let l2 = u64_at(path, m.l1_offset + i * 8) & MASK;
        if l2 == 0 {
            continue;
        }
        let table = read_at(path, l2, m.cluster_size as usize);
        let step = if m.extended { 16 } else { 8 };
        for (j, e) in table.chunks_exact(step).enumerate() {
            let v = u64::from_be_bytes(e[..8].try_into().expect("8"));
            if v != 0 {
                out.push((l2 + (j * step) as u64, v));
            }
        }
    }
    out
}

/// The first active L2 entry mapping a standard data cluster: (entry offset, value).
pub fn first_data_entry(path: &Path, m: &Meta) -> Option<(u64, u64)> {
    l2_entries(path, m)
        .into_iter()
        .find(|&(_, v)| v & (1 << 62) == 0 && v & 1 == 0 && v & MASK != 0)
}

/// Copies `from` to a new file `to`.
pub fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).expect("copy image");
}
