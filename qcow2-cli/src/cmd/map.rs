//! `map`: the guest ranges of an image and how they are stored, as qemu-img prints them
//! (JSON: one object per line with merged extents; human: data ranges in hex columns).

use std::io::Write;

use crate::cmd::parse_size_arg;
use crate::disk::{resolve_format, Disk, DiskOptions, Status};
use crate::error::{CliError, CmdResult};
use crate::{MapArgs, OutputFormat};

/// One line of the map.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Depth in the backing chain (0: the image itself).
    pub depth: u64,
    /// Allocated in the image.
    pub present: bool,
    /// Reads as zero.
    pub zero: bool,
    /// Data stored.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset, when mapped directly.
    pub offset: Option<u64>,
}

impl MapEntry {
    fn from_status(start: u64, st: &Status) -> Self {
        Self {
            start,
            length: st.len,
            depth: u64::from(st.depth),
            present: st.present,
            zero: st.zero,
            data: st.data,
            compressed: st.compressed,
            offset: st.offset,
        }
    }

    /// qemu's `entry_mergeable`: same flags, and contiguous host offsets if any.
    fn mergeable(&self, next: &Self) -> bool {
        if self.length == 0
            || self.zero != next.zero
            || self.data != next.data
            || self.compressed != next.compressed
            || self.depth != next.depth
            || self.present != next.present
            || self.offset.is_some() != next.offset.is_some()
        {
            return false;
        }
        match (self.offset, next.offset) {
            (Some(a), Some(b)) => a + self.length == b,
            _ => true,
        }
    }

    /// The JSON line body, exactly as qemu-img prints it.
    pub fn json(&self) -> String {
        let mut s = format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            self.start, self.length, self.depth, self.present, self.zero, self.data, self.compressed
        );
        if let Some(o) = self.offset {
            s.push_str(&format!(", \"offset\": {o}"));
        }
        s.push('}');
        s
    }
}

struct Printer<'a> {
    format: OutputFormat,
    /// The file of each layer of the chain, by depth.
    files: Vec<String>,
    out: std::io::StdoutLock<'a>,
}

impl Printer<'_> {
    /// qemu's `dump_map_entry`; `next` is changed like qemu does for the human form.
    fn dump(&mut self, e: &MapEntry, next: Option<&mut MapEntry>) -> Result<(), CliError> {
        match self.format {
            OutputFormat::Json => {
                let _ = write!(self.out, "{}", e.json());
                if next.is_some() {
                    let _ = writeln!(self.out, ",");
                }
            }
            OutputFormat::Human => {
                if e.data && e.offset.is_none() {
                    let _ = self.out.flush();
                    return Err(CliError::new(
                        "File contains external, encrypted or compressed clusters.",
                    ));
                }
                if e.data && !e.zero {
                    let _ = writeln!(
                        self.out,
                        "{:<16}{:<16}{:<16}{}",
                        hex(e.start),
                        hex(e.length),
                        hex(e.offset.unwrap_or(0)),
                        self.files.get(e.depth as usize).map_or("", String::as_str)
                    );
                }
                // The human form ignores the difference between 0, ZERO and ZERO|DATA.
                if let Some(n) = next {
                    if !n.data || n.zero {
                        n.data = false;
                        n.zero = true;
                    }
                }
            }
        }
        Ok(())
    }
}

/// C's `%#x`: `0` for zero, `0x...` otherwise.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// Runs `map`.
pub fn run(a: &MapArgs) -> CmdResult {
    let (format, _) = resolve_format(&a.filename, a.format.as_deref(), false)?;
    let mut disk = Disk::open(
        &a.filename,
        format,
        DiskOptions {
            force_share: a.force_share,
            read_only: true,
            ..DiskOptions::default()
        },
        false,
    )?;
    let start = a
        .start_offset
        .as_deref()
        .map(|s| parse_size_arg(s, "start offset"))
        .transpose()?
        .unwrap_or(0);
    let max_len = a
        .max_length
        .as_deref()
        .map(|s| parse_size_arg(s, "max length"))
        .transpose()?;
    let mut length = disk.len();
    if let Some(m) = max_len {
        length = length.min(start.saturating_add(m));
    }
    let files = (0..=64).map(|d| disk.layer_name(d)).collect();
    let stdout = std::io::stdout();
    let mut p = Printer {
        format: a.output,
        files,
        out: stdout.lock(),
    };
    match a.output {
        OutputFormat::Json => {
            let _ = write!(p.out, "[");
        }
        OutputFormat::Human => {
            let _ = writeln!(
                p.out,
                "{:<16}{:<16}{:<16}File",
                "Offset", "Length", "Mapped to"
            );
        }
    }
    let mut curr = MapEntry {
        start,
        length: 0,
        depth: 0,
        present: false,
        zero: false,
        data: false,
        compressed: false,
        offset: None,
    };
    while curr.start + curr.length < length {
        let offset = curr.start + curr.length;
        let st = disk
            .status(offset, length - offset)
            .map_err(|e| CliError::new(format!("Could not read file metadata: {e}")))?;
        let mut next = MapEntry::from_status(offset, &st);
        if curr.mergeable(&next) {
            curr.length += next.length;
            continue;
        }
        if curr.length > 0 {
            p.dump(&curr, Some(&mut next))?;
        }
        curr = next;
    }
    p.dump(&curr, None)?;
    if a.output == OutputFormat::Json {
        let _ = writeln!(p.out, "]");
    }
    let _ = p.out.flush();
    Ok(0)
}
