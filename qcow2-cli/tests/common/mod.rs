//! Helpers shared by the integration tests: running our binary and qemu's tools in a
//! per-test temporary directory.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// Our binary.
pub const QCOW2: &str = env!("CARGO_BIN_EXE_qcow2");

/// Whether `qemu-img` and `qemu-io` can run. When they cannot: panics if `CI` is set,
/// else prints why the test is skipped and returns false (the conformance suite's rule).
pub fn have_qemu() -> bool {
    qcow2_conformance::qemu::Qemu::require("qcow2-cli tests").is_some()
}

/// A test's scratch directory.
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    /// A new empty directory.
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// A path inside it.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `program` with `args` in the directory.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        Command::new(program)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("spawn")
    }

    /// Runs our tool.
    pub fn ours(&self, args: &[&str]) -> Output {
        self.run(QCOW2, args)
    }

    /// Runs qemu-img.
    pub fn qemu_img(&self, args: &[&str]) -> Output {
        self.run("qemu-img", args)
    }

    /// Runs qemu-io.
    pub fn qemu_io(&self, args: &[&str]) -> Output {
        self.run("qemu-io", args)
    }

    /// Runs qemu-img and asserts it succeeded.
    pub fn qemu_img_ok(&self, args: &[&str]) -> String {
        ok(&self.qemu_img(args), &format!("qemu-img {args:?}"))
    }

    /// `qemu-img create -q -f qcow2 [-o OPTIONS] -b BACKING -F FORMAT NAME [SIZE]`.
    pub fn qemu_overlay(
        &self,
        name: &str,
        backing: &str,
        format: &str,
        options: &str,
        size: Option<&str>,
    ) {
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !options.is_empty() {
            args.extend(["-o", options]);
        }
        args.extend(["-b", backing, "-F", format, name]);
        args.extend(size);
        self.qemu_img_ok(&args);
    }

    /// A chain made by qemu: `base.raw` (4 MiB, sparse, two written ranges) under
    /// `mid.qcow2` (data, zeroes, a discard) under `top.qcow2` (4 KiB clusters, 6 MiB, data
    /// and zeroes); returns the top's name.
    pub fn qemu_chain(&self) -> &'static str {
        self.qemu_img_ok(&["create", "-q", "-f", "raw", "base.raw", "4M"]);
        let base = [
            "-f",
            "raw",
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write 3M 64k",
            "base.raw",
        ];
        self.qemu_io_ok(&base);
        self.qemu_overlay("mid.qcow2", "base.raw", "raw", "", None);
        let c = ["write -P 2 64k 64k", "write -z 512k 128k", "discard 3M 64k"];
        self.qemu_io_ok(&["-c", c[0], "-c", c[1], "-c", c[2], "mid.qcow2"]);
        self.qemu_overlay(
            "top.qcow2",
            "mid.qcow2",
            "qcow2",
            "cluster_size=4096",
            Some("6M"),
        );
        self.qemu_io_ok(&[
            "-c",
            "write -P 3 1M 3k",
            "-c",
            "write -z 2M 64k",
            "top.qcow2",
        ]);
        "top.qcow2"
    }

    /// Runs qemu-io and asserts it succeeded.
    pub fn qemu_io_ok(&self, args: &[&str]) -> String {
        ok(&self.qemu_io(args), &format!("qemu-io {args:?}"))
    }

    /// Runs the qemu-io `commands` (`write -P 1 0 64k`, ...) on `file` of format `fmt`.
    pub fn qemu_io_cmds(&self, fmt: &str, file: &str, commands: &[&str]) {
        let mut args = vec!["-f", fmt];
        for c in commands {
            args.extend(["-c", c]);
        }
        args.push(file);
        self.qemu_io_ok(&args);
    }

    /// Runs our tool and asserts it succeeded.
    pub fn ours_ok(&self, args: &[&str]) -> String {
        ok(&self.ours(args), &format!("qcow2 {args:?}"))
    }
}

/// The stdout of a successful run (panics with stderr otherwise).
pub fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed with {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8")
}

/// Stdout as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Parses JSON output.
pub fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{s}"))
}

/// Removes `key` from every object in `v`, recursively.
pub fn strip_key(v: &mut Value, key: &str) {
    match v {
        Value::Object(m) => {
            m.remove(key);
            for x in m.values_mut() {
                strip_key(x, key);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| strip_key(x, key)),
        _ => {}
    }
}

/// Asserts two JSON documents are equal field by field, naming the first difference.
pub fn assert_json_eq(ours: &Value, theirs: &Value, what: &str) {
    fn walk(a: &Value, b: &Value, path: &str, what: &str) {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                for k in x.keys().chain(y.keys()) {
                    match (x.get(k), y.get(k)) {
                        (Some(p), Some(q)) => walk(p, q, &format!("{path}.{k}"), what),
                        (p, q) => panic!("{what}: field {path}.{k}: ours {p:?}, qemu {q:?}"),
                    }
                }
            }
            (Value::Array(x), Value::Array(y)) => {
                assert_eq!(
                    x.len(),
                    y.len(),
                    "{what}: length of {path}: ours {a}, qemu {b}"
                );
                for (i, (p, q)) in x.iter().zip(y).enumerate() {
                    walk(p, q, &format!("{path}[{i}]"), what);
                }
            }
            _ => assert_eq!(a, b, "{what}: field {path}"),
        }
    }
    walk(ours, theirs, "", what);
}

/// The path as a string.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Stderr with the program-name prefix (`qcow2: ` / `qemu-img: `) taken off each line, for
/// comparing messages.
pub fn messages(out: &Output) -> String {
    stderr(out)
        .lines()
        .map(|l| {
            let l = l
                .strip_prefix("qcow2: ")
                .or_else(|| l.strip_prefix("qemu-img: "))
                .unwrap_or(l);
            let l = l
                .strip_prefix("warning: ")
                .map(|w| format!("warning: {w}"))
                .unwrap_or_else(|| l.to_string());
            format!("{l}\n")
        })
        .collect()
}

/// Stderr messages as [`messages`] gives them, with qemu-img's name in its pointers to a
/// command's help (`Try 'qemu-img rebase --help' for more info`) put as ours.
pub fn messages_as_ours(out: &Output) -> String {
    messages(out).replace("Try 'qemu-img ", "Try 'qcow2 ")
}

/// Asserts that our run and qemu-img's of `what` printed the same, exited alike and said
/// the same messages.
pub fn assert_same_outcome(ours: &Output, theirs: &Output, what: &str) {
    assert_eq!(stdout(ours), stdout(theirs), "stdout of {what}");
    assert_eq!(
        ours.status.code(),
        theirs.status.code(),
        "status of {what}; ours said: {}",
        stderr(ours)
    );
    assert_eq!(
        messages_as_ours(ours),
        messages_as_ours(theirs),
        "messages of {what}"
    );
}

/// Two scratch directories prepared alike: one for our tool, one for qemu-img.
pub struct Twins {
    /// Where our tool runs.
    pub ours: Scratch,
    /// Where qemu-img runs.
    pub qemu: Scratch,
}

impl Twins {
    /// Two directories, each prepared by `setup`.
    pub fn new(setup: impl Fn(&Scratch)) -> Self {
        let twins = Self {
            ours: Scratch::new(),
            qemu: Scratch::new(),
        };
        setup(&twins.ours);
        setup(&twins.qemu);
        twins
    }

    /// Runs the command `args` with our tool and with qemu-img, each in its directory, and
    /// asserts the same stdout, exit status and messages; returns whether it succeeded.
    pub fn run_both(&self, args: &[&str]) -> bool {
        let ours = self.ours.ours(args);
        let theirs = self.qemu.qemu_img(args);
        assert_same_outcome(&ours, &theirs, &format!("{args:?}"));
        ours.status.success()
    }

    /// Asserts that `file` is the same image in both directories: the same guest contents
    /// (`qemu-img compare`), the same size and backing file, and (qcow2) clean.
    pub fn assert_same_image(&self, file: &str, what: &str) {
        let (a, b) = (self.ours.path(file), self.qemu.path(file));
        let out = self.ours.qemu_img(&["compare", "-U", s(&a), s(&b)]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{what}: {file} differs from qemu-img's: {}{}",
            stdout(&out),
            stderr(&out)
        );
        let info = |sc: &Scratch| {
            let v = json(&sc.qemu_img_ok(&["info", "-U", "--output=json", file]));
            let field = |k: &str| v.get(k).cloned().unwrap_or(Value::Null);
            [
                "format",
                "virtual-size",
                "backing-filename",
                "backing-filename-format",
            ]
            .map(field)
        };
        assert_eq!(info(&self.ours), info(&self.qemu), "{what}: info of {file}");
        if file.ends_with(".qcow2") {
            self.ours.qemu_img_ok(&["check", file]);
        }
    }
}

/// One run of `qemu-img map --output=json` without its host offset.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct MapRun {
    /// Guest offset.
    pub start: u64,
    /// Length.
    pub length: u64,
    /// Layer of the chain.
    pub depth: u64,
    /// Allocated in that layer.
    pub present: bool,
    /// Reads as zero.
    pub zero: bool,
    /// Stores data.
    pub data: bool,
}

/// How `file` is allocated, layer by layer, as `qemu-img map` says, without host offsets
/// (runs that then look alike are merged: where data lands in the file is the engine's
/// business).
pub fn map_shape(sc: &Scratch, file: &str) -> Vec<MapRun> {
    let v = json(&sc.qemu_img_ok(&["map", "-U", "--output=json", file]));
    let mut runs: Vec<MapRun> = Vec::new();
    for e in v.as_array().expect("map is an array") {
        let num = |k: &str| e[k].as_u64().expect("number");
        let flag = |k: &str| e[k].as_bool().expect("bool");
        let run = MapRun {
            start: num("start"),
            length: num("length"),
            depth: num("depth"),
            present: flag("present"),
            zero: flag("zero"),
            data: flag("data"),
        };
        match runs.last_mut() {
            Some(last)
                if (last.depth, last.present, last.zero, last.data)
                    == (run.depth, run.present, run.zero, run.data) =>
            {
                last.length += run.length
            }
            _ => runs.push(run),
        }
    }
    runs
}

impl Scratch {
    /// Three qcow2 files made by qemu: `base.qcow2` (4 MiB, data) under `mid.qcow2`
    /// (`mid_cluster` clusters; data over the base's and past it, a zero cluster) under
    /// `top.qcow2` (compat 0.10, 6 MiB: longer than the others; data, zeroes); and
    /// `before.raw` and `mid.raw`, what the top and the middle show.
    pub fn qemu_chain3(&self, mid_cluster: &str) {
        self.qemu_img_ok(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
        self.qemu_io_cmds("qcow2", "base.qcow2", &["write -P 1 0 1M"]);
        let o = format!("cluster_size={mid_cluster}");
        self.qemu_overlay("mid.qcow2", "base.qcow2", "qcow2", &o, None);
        self.qemu_io_cmds(
            "qcow2",
            "mid.qcow2",
            &["write -P 2 512k 1M", "write -z 3M 64k"],
        );
        self.qemu_overlay("top.qcow2", "mid.qcow2", "qcow2", "compat=0.10", Some("6M"));
        self.qemu_io_cmds(
            "qcow2",
            "top.qcow2",
            &["write -P 3 1M 4k", "write -z 0 64k", "write -P 4 5M 64k"],
        );
        self.qemu_img_ok(&["convert", "-O", "raw", "top.qcow2", "before.raw"]);
        self.qemu_img_ok(&["convert", "-O", "raw", "mid.qcow2", "mid.raw"]);
    }
}

/// A command line written as one string: words split at spaces, `''` for an empty one.
pub fn args(line: &str) -> Vec<&str> {
    line.split_whitespace()
        .map(|w| if w == "''" { "" } else { w })
        .collect()
}
