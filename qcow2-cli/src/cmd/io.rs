//! `io`: a small qemu-io. Runs `read`, `write`, `discard`, `flush` and `length` commands
//! (from `-c`, or one a line from stdin) against one image and prints what qemu-io prints.
//! The exit status is 1 when any command failed (including a `read -P` mismatch).

use std::io::BufRead;
use std::time::{Duration, Instant};

use qcow2_sync::Cache;

use crate::cmd::parse_cache;
use crate::disk::{resolve_format, Disk, DiskOptions};
use crate::error::CmdResult;
use crate::size::{parse_size, size_to_str};
use crate::IoArgs;

/// qemu-io's `cvtstr`: `1 KiB`, `48.116 MiB`, `500 bytes`.
pub fn cvtstr(value: f64) -> String {
    const UNITS: [(f64, &str); 6] = [
        ((1u64 << 60) as f64, " EiB"),
        ((1u64 << 50) as f64, " PiB"),
        ((1u64 << 40) as f64, " TiB"),
        ((1u64 << 30) as f64, " GiB"),
        ((1u64 << 20) as f64, " MiB"),
        ((1u64 << 10) as f64, " KiB"),
    ];
    let (mut s, suffix) = match UNITS.iter().find(|(unit, _)| value >= *unit) {
        Some((unit, suffix)) => (format!("{:.3}", value / unit), *suffix),
        None => (format!("{value:.6}"), " bytes"),
    };
    match s.find(".000") {
        Some(i) => {
            s.truncate(i);
            s.push_str(suffix);
        }
        None => s.push_str(suffix),
    }
    s
}

/// qemu-io's `timestr` (without the fixed-time flags).
pub fn timestr(d: Duration) -> String {
    let secs = d.as_secs();
    let frac = f64::from(d.subsec_nanos()) / 1e9;
    if secs == 0 {
        format!("{frac:05.2} sec")
    } else {
        format!(
            "{}:{:02}:{:05.2}",
            secs / 3600,
            (secs / 60) % 60,
            (secs % 60) as f64 + frac
        )
    }
}

/// qemu-io's report of one request: `wrote 65536/65536 bytes at offset 0` and the timing.
pub fn report(op: &str, offset: u64, count: u64, elapsed: Duration) -> String {
    let t = elapsed.as_secs_f64().max(1e-9);
    format!(
        "{op} {count}/{count} bytes at offset {offset}\n{}, 1 ops; {} ({}/sec and {:.4} ops/sec)\n",
        cvtstr(count as f64),
        timestr(elapsed),
        cvtstr(count as f64 / t),
        1.0 / t
    )
}

/// qemu-io's `dump_buffer` (`read -v`).
fn dump_buffer(buf: &[u8], offset: u64) -> String {
    let mut out = String::new();
    for (i, line) in buf.chunks(16).enumerate() {
        out.push_str(&format!("{:08x}:  ", offset + i as u64 * 16));
        for b in line {
            out.push_str(&format!("{b:02x} "));
        }
        out.push(' ');
        for &b in line {
            out.push(if b.is_ascii_alphanumeric() {
                b as char
            } else {
                '.'
            });
        }
        out.push('\n');
    }
    out
}

/// Parses a pattern byte like C's `strtol(s, NULL, 0)`: `0x` hex, leading-`0` octal, decimal.
fn parse_pattern(s: &str) -> Option<u8> {
    let v = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        i64::from_str_radix(h, 16).ok()?
    } else if s.len() > 1 && s.starts_with('0') {
        i64::from_str_radix(&s[1..], 8).ok()?
    } else {
        s.parse().ok()?
    };
    u8::try_from(v).ok()
}

/// Why a command failed: qemu-io prints usage errors on stderr and the rest on stdout.
enum Failure {
    /// A line for stdout.
    Out(String),
    /// A line for stderr (and optionally a usage line for stdout first).
    Err(String, Option<&'static str>),
    /// Only the usage line, on stdout.
    Usage(&'static str),
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Self::Out(s)
    }
}

const READ_USAGE: &str =
    "read [-abCqrv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset";
const WRITE_USAGE: &str =
    "write [-bcCfnqruz] [-P pattern | -s source_file] off len -- writes a number of bytes at a specified offset";
const DISCARD_USAGE: &str =
    "discard [-Cq] off len -- discards a number of bytes at a specified offset";

/// A parsed command line: flags (with their values) and positional words.
struct Parsed<'a> {
    flags: Vec<(char, Option<&'a str>)>,
    args: Vec<&'a str>,
}

impl Parsed<'_> {
    fn has(&self, c: char) -> bool {
        self.flags.iter().any(|(f, _)| *f == c)
    }

    fn value(&self, c: char) -> Option<&str> {
        self.flags
            .iter()
            .rev()
            .find(|(f, _)| *f == c)
            .and_then(|(_, v)| *v)
    }
}

/// getopt-style parsing: `allowed` lists flag letters, a `:` after one takes a value.
fn parse_opts<'a>(
    words: &[&'a str],
    allowed: &str,
    cmd: &str,
    usage: &'static str,
) -> Result<Parsed<'a>, Failure> {
    getopt(words, allowed).map_err(|e| Failure::Err(format!("{cmd}: {e}"), Some(usage)))
}

fn getopt<'a>(words: &[&'a str], allowed: &str) -> Result<Parsed<'a>, String> {
    // GNU getopt: options may follow positional words; `--` ends option parsing.
    let mut flags = Vec::new();
    let mut args = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let w = words[i];
        i += 1;
        if w == "--" {
            args.extend_from_slice(&words[i..]);
            break;
        }
        if !w.starts_with('-') || w.len() == 1 {
            args.push(w);
            continue;
        }
        let body = &w[1..];
        for (j, c) in body.char_indices() {
            let pos = allowed
                .find(c)
                .filter(|_| c != ':')
                .ok_or_else(|| format!("invalid option -- '{c}'"))?;
            if allowed[pos + 1..].starts_with(':') {
                let rest = &body[j + c.len_utf8()..];
                let v = if !rest.is_empty() {
                    rest
                } else {
                    i += 1;
                    *words
                        .get(i - 1)
                        .ok_or_else(|| format!("option requires an argument -- '{c}'"))?
                };
                flags.push((c, Some(v)));
                break;
            }
            flags.push((c, None));
        }
    }
    Ok(Parsed { flags, args })
}

fn offset_and_len(args: &[&str], cmd: &str) -> Result<(u64, u64), Failure> {
    if args.len() < 2 {
        return Err(Failure::Err(
            format!(
                "bad argument count {} to {cmd}, expected at least 2 arguments",
                args.len()
            ),
            None,
        ));
    }
    if args.len() > 2 {
        let usage = match cmd {
            "read" => READ_USAGE,
            "write" => WRITE_USAGE,
            _ => DISCARD_USAGE,
        };
        return Err(Failure::Usage(usage));
    }
    let num = |s: &str| {
        parse_size(s).map_err(|_| {
            Failure::Out(format!(
                "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {s}"
            ))
        })
    };
    Ok((num(args[0])?, num(args[1])?))
}

/// Runs one command line; `false` when the command failed (after printing why).
fn command(disk: &mut Disk, line: &str, out: &mut String) -> bool {
    let words: Vec<&str> = line.split_whitespace().collect();
    let Some((&name, rest)) = words.split_first() else {
        return true;
    };
    let r = match name {
        "read" | "r" => read(disk, rest, out),
        "write" | "w" => write(disk, rest, out),
        "discard" | "d" => discard(disk, rest, out),
        "flush" | "f" => disk
            .flush()
            .map(|()| true)
            .map_err(|e| Failure::Out(format!("flush failed: {e}"))),
        "length" | "l" => {
            out.push_str(&format!("{}\n", size_to_str(disk.len())));
            Ok(true)
        }
        "help" | "?" => {
            out.push_str(
                "read [-P pattern] [-q] [-v] off len -- read and optionally verify\n\
                 write [-P pattern | -z [-u]] [-f] [-q] off len -- write a pattern or zeroes\n\
                 discard [-q] off len -- discard a range\n\
                 flush -- make completed writes durable\n\
                 length -- print the image's virtual size\n",
            );
            Ok(true)
        }
        other => Err(Failure::Err(format!("command \"{other}\" not found"), None)),
    };
    match r {
        Ok(ok) => ok,
        Err(Failure::Out(e)) => {
            out.push_str(&e);
            out.push('\n');
            false
        }
        Err(Failure::Usage(u)) => {
            out.push_str(u);
            out.push('\n');
            false
        }
        Err(Failure::Err(e, usage)) => {
            print!("{out}");
            out.clear();
            if let Some(u) = usage {
                println!("{u}");
            }
            eprintln!("{e}");
            false
        }
    }
}

fn read(disk: &mut Disk, words: &[&str], out: &mut String) -> Result<bool, Failure> {
    let p = parse_opts(words, "P:qvC", "read", READ_USAGE)?;
    let (off, len) = offset_and_len(&p.args, "read")?;
    let pattern = p
        .value('P')
        .map(|v| parse_pattern(v).ok_or(format!("{v} is not a valid pattern byte")))
        .transpose()?;
    let mut buf = vec![0u8; usize::try_from(len).map_err(|_| "length too large".to_string())?];
    let start = Instant::now();
    disk.read_at(&mut buf, off)
        .map_err(|e| format!("read failed: {e}"))?;
    let elapsed = start.elapsed();
    let mut ok = true;
    if let Some(pat) = pattern {
        if buf.iter().any(|&b| b != pat) {
            out.push_str(&format!(
                "Pattern verification failed at offset {off}, {len} bytes\n"
            ));
            ok = false;
        }
    }
    if p.has('v') {
        out.push_str(&dump_buffer(&buf, off));
    }
    if !p.has('q') {
        out.push_str(&report("read", off, len, elapsed));
    }
    Ok(ok)
}

fn write(disk: &mut Disk, words: &[&str], out: &mut String) -> Result<bool, Failure> {
    let p = parse_opts(words, "P:zuqfcC", "write", WRITE_USAGE)?;
    if p.has('c') {
        return Err("write: compressed writes (-c) are not supported yet"
            .to_string()
            .into());
    }
    if p.has('z') && p.has('P') {
        return Err(
            "Only one of -z, -P, and -s can be specified at the same time"
                .to_string()
                .into(),
        );
    }
    if p.has('u') && !p.has('z') {
        return Err("-u requires -z to be specified".to_string().into());
    }
    let (off, len) = offset_and_len(&p.args, "write")?;
    let start = Instant::now();
    if p.has('z') {
        disk.write_zeroes(off, len, p.has('u'))
            .map_err(|e| format!("write failed: {e}"))?;
    } else {
        let pattern = match p.value('P') {
            Some(v) => parse_pattern(v).ok_or(format!("{v} is not a valid pattern byte"))?,
            None => 0xcd,
        };
        let buf = vec![pattern; usize::try_from(len).map_err(|_| "length too large".to_string())?];
        disk.write_at(&buf, off)
            .map_err(|e| format!("write failed: {e}"))?;
    }
    if p.has('f') {
        disk.flush().map_err(|e| format!("write failed: {e}"))?;
    }
    let elapsed = start.elapsed();
    if !p.has('q') {
        out.push_str(&report("wrote", off, len, elapsed));
    }
    Ok(true)
}

fn discard(disk: &mut Disk, words: &[&str], out: &mut String) -> Result<bool, Failure> {
    let p = parse_opts(words, "qC", "discard", DISCARD_USAGE)?;
    let (off, len) = offset_and_len(&p.args, "discard")?;
    let start = Instant::now();
    disk.discard(off, len)
        .map_err(|e| format!("discard failed: {e}"))?;
    let elapsed = start.elapsed();
    if !p.has('q') {
        out.push_str(&report("discard", off, len, elapsed));
    }
    Ok(true)
}

/// Runs `io`.
pub fn run(a: &IoArgs) -> CmdResult {
    let cache = if a.nocache {
        Cache::None
    } else {
        parse_cache(a.cache.as_deref(), Cache::WriteBack)?
    };
    let (format, protect) = resolve_format(&a.filename, a.format.as_deref(), !a.read_only)?;
    let mut disk = Disk::open(
        &a.filename,
        format,
        DiskOptions {
            force_share: a.force_share,
            read_only: a.read_only,
            cache,
        },
        protect,
    )?;
    let mut failed = false;
    let mut run_line = |disk: &mut Disk, line: &str| {
        let mut out = String::new();
        if !command(disk, line, &mut out) {
            failed = true;
        }
        print!("{out}");
    };
    if a.commands.is_empty() {
        for line in std::io::stdin().lock().lines() {
            let line = line?;
            if matches!(line.trim(), "quit" | "q") {
                break;
            }
            run_line(&mut disk, &line);
        }
    } else {
        for c in &a.commands {
            run_line(&mut disk, c);
        }
    }
    if let Err(e) = disk.close() {
        println!("close failed: {e}");
        failed = true;
    }
    Ok(i32::from(failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cvtstr_matches_qemu_io() {
        assert_eq!(cvtstr(65536.0), "64 KiB");
        assert_eq!(cvtstr(1024.0), "1 KiB");
        assert_eq!(cvtstr(500.0), "500 bytes");
        assert_eq!(cvtstr(3145728.0), "3 MiB");
        assert_eq!(cvtstr(48.116 * 1048576.0), "48.116 MiB");
    }

    #[test]
    fn report_lines() {
        let r = report("wrote", 0, 65536, Duration::from_millis(10));
        assert!(r.starts_with("wrote 65536/65536 bytes at offset 0\n64 KiB, 1 ops; 00.01 sec (6.250 MiB/sec and 100.0000 ops/sec)\n"), "{r}");
    }

    #[test]
    fn getopt_like_qemu_io() {
        let p = getopt(&["-zu", "-q", "0", "64k"], "P:zuq").unwrap();
        assert!(p.has('z') && p.has('u') && p.has('q'));
        assert_eq!(p.args, ["0", "64k"]);
        let p = getopt(&["-P0xab", "1", "2"], "P:q").unwrap();
        assert_eq!(p.value('P'), Some("0xab"));
        let p = getopt(&["-P", "171", "1", "2"], "P:q").unwrap();
        assert_eq!(p.value('P'), Some("171"));
        assert!(getopt(&["-x"], "q").is_err());
        assert_eq!(parse_pattern("0xcd"), Some(0xcd));
        assert_eq!(parse_pattern("017"), Some(15));
        assert_eq!(parse_pattern("256"), None);
    }

    #[test]
    fn dumps_like_qemu_io() {
        let mut buf = vec![0x11u8; 32];
        buf[0] = 0xcd;
        assert_eq!(
            dump_buffer(&buf, 0).lines().next().unwrap(),
            "00000000:  cd 11 11 11 11 11 11 11 11 11 11 11 11 11 11 11  ................"
        );
    }
}
