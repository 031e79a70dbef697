//! `qemu-img` and `qemu-io`: the reference implementation the suite interoperates with.
//!
//! Cases that need them call [`Qemu::require`]: when the tools are missing the case fails if
//! the `CI` environment variable is set, and otherwise prints a skip line and returns.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The located qemu tools.
#[derive(Clone, Debug)]
pub struct Qemu {
    img: PathBuf,
    io: PathBuf,
}

/// Whether this is a CI run (`CI` set and not empty, `0` or `false`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// `qemu-img check --output=json` counters (absent fields are zero, as qemu-img omits them).
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct QemuCheck {
    /// `corruptions`.
    pub corruptions: u64,
    /// `leaks`.
    pub leaks: u64,
    /// `check-errors`.
    pub check_errors: u64,
    /// The whole output, for failure messages.
    pub json: String,
}

/// One `qemu-img check --output=json [-r MODE]` run, as it ended.
#[derive(Clone, Debug)]
pub struct CheckRun {
    /// Exit status: 0 consistent, 1 check failed, 2 corruptions, 3 leaks only.
    pub status: i32,
    /// The report; `None` when qemu-img printed none (the check could not complete).
    pub json: Option<Value>,
    /// The detail lines qemu-img printed on stderr.
    pub stderr: String,
}

impl CheckRun {
    /// A field of the report, 0 when absent (qemu-img omits zero counters).
    pub fn field(&self, name: &str) -> u64 {
        self.json
            .as_ref()
            .and_then(|v| v.get(name))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }
}

/// A `qemu-io` process holding an image open; killed on drop.
#[derive(Debug)]
pub struct Held {
    child: std::process::Child,
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl QemuCheck {
    /// Whether the image has no corruption, no leak and no check error.
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0
    }
}

impl Qemu {
    /// Finds `qemu-img` and `qemu-io` in `PATH`.
    pub fn find() -> Option<Self> {
        Some(Self {
            img: which("qemu-img")?,
            io: which("qemu-io")?,
        })
    }

    /// The tools, for `case`; `None` (after a printed skip line) when they are missing outside
    /// CI.
    ///
    /// # Panics
    /// When they are missing and `CI` is set: interop must never be skipped silently there.
    pub fn require(case: &str) -> Option<Self> {
        if let Some(q) = Self::find() {
            return Some(q);
        }
        assert!(
            !in_ci(),
            "{case}: qemu-img/qemu-io not found in PATH, and CI is set (install qemu-utils)"
        );
        println!("skipped: {case} needs qemu-img and qemu-io (install qemu-utils)");
        None
    }

    /// The tools for `case`, which runs without them (with a printed line) outside CI.
    ///
    /// # Panics
    /// When they are missing and `CI` is set.
    pub fn optional(case: &str) -> Option<Self> {
        if let Some(q) = Self::find() {
            return Some(q);
        }
        assert!(
            !in_ci(),
            "{case}: qemu-img/qemu-io not found in PATH, and CI is set (install qemu-utils)"
        );
        println!("{case}: qemu-img/qemu-io not found; running without the qemu checks");
        None
    }

    /// Runs `program`. A lock conflict is retried for a while: the tests run in parallel,
    /// and a file this process closed just now lives on, with its locks, in a child another
    /// test thread forked and has not yet exec'd (our own opens retry the same way).
    fn run(&self, program: &Path, args: &[&OsStr]) -> Output {
        let mut tries = 0;
        loop {
            let out = Command::new(program)
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
            let stderr = String::from_utf8_lossy(&out.stderr);
            let locked = stderr.contains("Failed to get") && stderr.contains(" lock");
            if out.status.success() || !locked || tries == 20 {
                return out;
            }
            tries += 1;
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    fn describe(program: &Path, args: &[&OsStr], out: &Output) -> String {
        let args: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
        format!(
            "{} {} exited with {}\nstdout: {}\nstderr: {}",
            program.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Runs `qemu-img` with `args` and returns its stdout.
    ///
    /// # Panics
    /// If it exits unsuccessfully.
    pub fn img<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let args: Vec<&OsStr> = args.iter().map(AsRef::as_ref).collect();
        let out = self.run(&self.img, &args);
        assert!(
            out.status.success(),
            "{}",
            Self::describe(&self.img, &args, &out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `qemu-img create -f qcow2 -o OPTIONS PATH SIZE`.
    pub fn create(&self, path: &Path, options: &str, size: u64) {
        let mut args: Vec<OsString> = ["create", "-q", "-f", "qcow2"].map(OsString::from).to_vec();
        if !options.is_empty() {
            args.extend(["-o", options].map(OsString::from));
        }
        args.extend([path.as_os_str().to_owned(), size.to_string().into()]);
        self.img(&args);
    }

    /// `qemu-img create -f qcow2 [-u] [-o OPTIONS] -b BACKING -F FORMAT PATH [SIZE]`: an
    /// overlay (`backing` as stored in it; relative to `path`'s directory).
    pub fn overlay(
        &self,
        path: &Path,
        backing: &str,
        format: &str,
        options: &str,
        size: Option<u64>,
    ) {
        let mut args: Vec<OsString> = ["create", "-q", "-f", "qcow2"].map(OsString::from).to_vec();
        if !options.is_empty() {
            args.extend(["-o", options].map(OsString::from));
        }
        args.extend(["-u", "-b", backing, "-F", format].map(OsString::from));
        args.push(path.as_os_str().to_owned());
        args.extend(size.map(|s| OsString::from(s.to_string())));
        self.img(&args);
    }

    /// Runs the `qemu-io` commands on the qcow2 image at `path`, in one process.
    ///
    /// # Panics
    /// If qemu-io fails or reports a failed command.
    pub fn io<S: AsRef<str>>(&self, path: &Path, commands: &[S]) {
        self.io_as("qcow2", path, commands);
    }

    /// [`io`](Self::io) on an image of format `fmt` (`raw`, `qcow2`).
    ///
    /// # Panics
    /// If qemu-io fails or reports a failed command.
    pub fn io_as<S: AsRef<str>>(&self, fmt: &str, path: &Path, commands: &[S]) {
        let mut args: Vec<OsString> = ["-f", fmt].map(OsString::from).to_vec();
        for c in commands {
            args.extend(["-c", c.as_ref()].map(OsString::from));
        }
        args.push(path.as_os_str().to_owned());
        let args: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
        let out = self.run(&self.io, &args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let failed = text.lines().any(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("failed") || l.contains("error") || l.contains("mismatch")
        });
        assert!(
            out.status.success() && !failed,
            "{}",
            Self::describe(&self.io, &args, &out)
        );
    }

    /// Starts `qemu-io` holding the qcow2 image at `path` open (read-only with
    /// `read_only`) until the returned guard drops; returns once its locks are in place.
    ///
    /// # Panics
    /// If qemu-io cannot start or has not opened the image within ten seconds.
    pub fn hold(&self, path: &Path, read_only: bool) -> Held {
        let mut cmd = Command::new(&self.io);
        cmd.args(["-f", "qcow2"]);
        if read_only {
            cmd.arg("-r");
        }
        let child = cmd
            .arg(path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.io.display()));
        let mut held = Held { child };
        // qemu-io waits at its prompt once the image is open; its OFD locks show in
        // /proc/locks then. (Probing by opening would race with it for the lock.)
        let inode = std::os::unix::fs::MetadataExt::ino(
            &std::fs::metadata(path).expect("the image to hold exists"),
        );
        let needle = format!(":{inode} ");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
            if locks
                .lines()
                .any(|l| l.contains("OFDLCK") && l.contains(&needle))
            {
                break;
            }
            if let Ok(Some(status)) = held.child.try_wait() {
                panic!(
                    "qemu-io exited ({status}) instead of holding {}",
                    path.display()
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "qemu-io did not lock {} within ten seconds",
                path.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        held
    }

    /// Opens `path` with `qemu-io` (read-only with `read_only`) and reads a sector; its
    /// stderr when that fails.
    pub fn io_open(&self, path: &Path, read_only: bool) -> Result<(), String> {
        let mut args: Vec<&OsStr> = vec!["-f".as_ref(), "qcow2".as_ref()];
        if read_only {
            args.push("-r".as_ref());
        }
        args.extend(["-c".as_ref(), "read 0 512".as_ref(), path.as_os_str()]);
        let out = self.run(&self.io, &args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() && err.is_empty() {
            Ok(())
        } else {
            Err(err)
        }
    }

    /// `qemu-img check --output=json`.
    pub fn check(&self, path: &Path) -> QemuCheck {
        let args: [&OsStr; 5] = [
            "check".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "--output=json".as_ref(),
            path.as_ref(),
        ];
        let out = self.run(&self.img, &args);
        let json = String::from_utf8_lossy(&out.stdout).into_owned();
        let v: Value = serde_json::from_str(&json).unwrap_or_else(|e| {
            panic!(
                "qemu-img check printed no JSON ({e}): {}",
                Self::describe(&self.img, &args, &out)
            )
        });
        let field = |name: &str| v.get(name).and_then(Value::as_u64).unwrap_or(0);
        QemuCheck {
            corruptions: field("corruptions"),
            leaks: field("leaks"),
            check_errors: field("check-errors"),
            json,
        }
    }

    /// `qemu-img check -f qcow2 --output=json [-r repair] PATH`, whatever its outcome.
    ///
    /// # Panics
    /// If qemu-img cannot run or prints something that is not JSON.
    pub fn check_run(&self, path: &Path, repair: Option<&str>) -> CheckRun {
        let mut args: Vec<&OsStr> = vec![
            "check".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "--output=json".as_ref(),
        ];
        if let Some(mode) = repair {
            args.push("-r".as_ref());
            args.push(OsStr::new(mode));
        }
        args.push(path.as_os_str());
        let out = self.run(&self.img, &args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let json = (!stdout.trim().is_empty()).then(|| {
            serde_json::from_str(&stdout).unwrap_or_else(|e| {
                panic!(
                    "qemu-img check printed no JSON ({e}): {}",
                    Self::describe(&self.img, &args, &out)
                )
            })
        });
        CheckRun {
            status: out.status.code().unwrap_or(-1),
            json,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `qemu-img compare -q -f qcow2 -F qcow2 A B`: its exit status (0 identical, 1
    /// different, 2 or more when an image could not be opened or read).
    pub fn compare_status(&self, a: &Path, b: &Path) -> i32 {
        let args: [&OsStr; 8] = [
            "compare".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            "qcow2".as_ref(),
            a.as_os_str(),
            b.as_os_str(),
        ];
        self.run(&self.img, &args).status.code().unwrap_or(-1)
    }

    /// Asserts `qemu-img check` finds no corruption and no leak.
    ///
    /// # Panics
    /// Otherwise, with the JSON.
    pub fn assert_clean(&self, path: &Path, context: &str) {
        let c = self.check(path);
        assert!(
            c.is_clean(),
            "{context}: qemu-img check is not clean: {}",
            c.json
        );
    }

    /// `qemu-img compare -f qcow2 -F raw IMAGE RAW`: whether the guest contents are identical.
    ///
    /// # Panics
    /// If qemu-img fails for another reason than a difference.
    pub fn same_as_raw(&self, image: &Path, raw: &Path) -> Result<(), String> {
        let args: [&OsStr; 7] = [
            "compare".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            "raw".as_ref(),
            image.as_ref(),
        ];
        let mut all = args.to_vec();
        all.push(raw.as_os_str());
        let out = self.run(&self.img, &all);
        match out.status.code() {
            Some(0) => Ok(()),
            Some(1) => {
                let verbose: Vec<&OsStr> = all
                    .iter()
                    .copied()
                    .filter(|a| *a != OsStr::new("-q"))
                    .collect();
                let why = self.run(&self.img, &verbose);
                Err(String::from_utf8_lossy(&why.stdout).into_owned())
            }
            _ => panic!("{}", Self::describe(&self.img, &all, &out)),
        }
    }

    /// `qemu-img info --output=json`.
    pub fn info(&self, path: &Path) -> Value {
        let out = self.img(&[
            "info".as_ref(),
            "--output=json".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            path.as_os_str(),
        ]);
        serde_json::from_str(&out).expect("qemu-img info prints JSON")
    }

    /// Converts the qcow2 image (or its internal snapshot `snapshot`) to a raw file.
    pub fn to_raw(&self, image: &Path, snapshot: Option<&str>, raw: &Path) {
        let mut args: Vec<String> = vec![
            "convert".into(),
            "-f".into(),
            "qcow2".into(),
            "-O".into(),
            "raw".into(),
        ];
        if let Some(name) = snapshot {
            args.extend(["-l".into(), format!("snapshot.name={name}")]);
        }
        args.extend([image.display().to_string(), raw.display().to_string()]);
        self.img(&args);
    }
}
