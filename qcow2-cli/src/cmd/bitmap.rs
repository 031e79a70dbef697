//! `bitmap`: persistent dirty bitmaps, as `qemu-img bitmap` edits them: `--add [-g SIZE]`,
//! `--remove`, `--clear`, `--enable`, `--disable`, `--merge SOURCE [-b FILE [-F FMT]]`,
//! applied in command-line order to one bitmap and stored when the image is closed. And
//! `--dump NAME` (ours), printing a bitmap's dirty ranges (what a backup tool otherwise
//! reads through qemu-nbd's dirty-bitmap export), human or `--output=json` as
//! `[{"start":..,"length":..}, ...]`.

use std::path::Path;

use qcow2_sync::{BitmapData, RequestError};
use serde_json::json;

use crate::cmd::parse_size_arg;
use crate::disk::{qcow2_open_error, resolve_format, Format};
use crate::error::{CliError, CmdResult};
use crate::{BitmapArgs, OutputFormat};

/// One editing action.
#[derive(Clone, Debug, Eq, PartialEq)]
enum Action {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Action {
    fn name(&self) -> &'static str {
        match self {
            Self::Add => "add",
            Self::Remove => "remove",
            Self::Clear => "clear",
            Self::Enable => "enable",
            Self::Disable => "disable",
            Self::Merge(_) => "merge",
        }
    }
}

/// The actions `a` asks for, in the order `argv` gives them (qemu-img applies them so).
fn actions(a: &BitmapArgs, argv: &[String]) -> Vec<Action> {
    let mut out = Vec::new();
    let mut merges = a.merge.iter();
    for arg in argv.iter().skip_while(|s| *s != "bitmap") {
        let action = match arg.as_str() {
            "--add" => Action::Add,
            "--remove" => Action::Remove,
            "--clear" => Action::Clear,
            "--enable" => Action::Enable,
            "--disable" => Action::Disable,
            "--" => break,
            s if s == "--merge" || s.starts_with("--merge=") => match merges.next() {
                Some(m) => Action::Merge(m.clone()),
                None => continue,
            },
            _ => continue,
        };
        if !out.contains(&action) || matches!(action, Action::Merge(_)) {
            out.push(action);
        }
    }
    out
}

/// Runs `bitmap`.
pub fn run(a: &BitmapArgs) -> CmdResult {
    let argv: Vec<String> = std::env::args().collect();
    let actions = actions(a, &argv);
    if actions.is_empty() && !a.dump {
        return Err(CliError::new(
            "Need at least one of --add, --remove, --clear, --enable, --disable, --merge or --dump",
        ));
    }
    if a.dump && !actions.is_empty() {
        return Err(CliError::new(
            "--dump cannot be combined with editing actions",
        ));
    }
    if a.granularity.is_some() && !actions.contains(&Action::Add) {
        return Err(CliError::new("granularity only supported with --add"));
    }
    if a.source_file.is_some() && !actions.iter().any(|x| matches!(x, Action::Merge(_))) {
        return Err(CliError::new("-b requires --merge"));
    }
    if a.source_format.is_some() && a.source_file.is_none() {
        return Err(CliError::new("-F requires -b"));
    }
    let [file, name] = a.args.as_slice() else {
        return Err(crate::cmd::usage(
            "bitmap",
            "Expecting filename and bitmap name",
        ));
    };
    let granularity = match &a.granularity {
        Some(g) => Some(parse_size_arg(g, "granularity")?),
        None => None,
    };
    let path = Path::new(file);
    if a.dump {
        return dump(a, path, name);
    }
    let (format, _) = resolve_format(path, a.format.as_deref(), true)?;
    if format != Format::Qcow2 {
        return Err(CliError::new(format!(
            "Operation {} on bitmap {name} failed: Can't store persistent bitmaps to {file}: Operation not supported",
            actions[0].name()
        )));
    }
    let mut img = qcow2_sync::Image::open(path, &qcow2_sync::OpenOptions::default())
        .map_err(|e| qcow2_open_error(path, &e))?;
    let mut result = Ok(0);
    for action in &actions {
        if let Err(e) = apply(&mut img, a, action, name, granularity, file) {
            result = Err(CliError::new(format!(
                "Operation {} on bitmap {name} failed: {e}",
                action.name()
            )));
            break;
        }
    }
    // What was done before a failure is stored, as qemu-img stores it.
    img.close().map_err(|e| {
        CliError::new(format!(
            "Could not store bitmaps of '{file}': {}",
            crate::disk::engine_error(&e)
        ))
    })?;
    result
}

/// One action; the error text follows qemu-img's.
fn apply(
    img: &mut qcow2_sync::Image,
    a: &BitmapArgs,
    action: &Action,
    name: &str,
    granularity: Option<u64>,
    file: &str,
) -> Result<(), String> {
    let cs = img.info().cluster_size;
    let r = match action {
        Action::Add => {
            let g = granularity.unwrap_or(cs.clamp(4096, 65536));
            img.bitmap_add(name, g, true)
        }
        Action::Remove => img.bitmap_remove(name),
        Action::Clear => img.bitmap_clear(name),
        Action::Enable => img.bitmap_enable(name, true),
        Action::Disable => img.bitmap_enable(name, false),
        Action::Merge(source) => {
            let data = merge_source(img, a, source)?;
            img.bitmap_merge(name, &data)
        }
    };
    r.map_err(|e| message(&e, name, file))
}

/// The bits of `--merge`'s source bitmap: of `-b`'s image, or of this one.
fn merge_source(
    img: &mut qcow2_sync::Image,
    a: &BitmapArgs,
    source: &str,
) -> Result<BitmapData, String> {
    let read = match &a.source_file {
        Some(f) => {
            let path = Path::new(f);
            let (format, _) = resolve_format(path, a.source_format.as_deref(), false)
                .map_err(|e| e.to_string())?;
            if format != Format::Qcow2 {
                return Err(format!("Dirty bitmap '{source}' not found"));
            }
            let options = qcow2_sync::OpenOptions {
                read_only: true,
                ..qcow2_sync::OpenOptions::default()
            };
            let mut src = qcow2_sync::Image::open(path, &options)
                .map_err(|e| qcow2_open_error(path, &e).to_string())?;
            src.read_bitmap(source)
        }
        None => img.read_bitmap(source),
    };
    read.map_err(|e| message(&e, source, ""))
}

/// qemu-img's words for a failed bitmap action on bitmap `name` of `file`.
fn message(e: &qcow2_sync::Error, name: &str, file: &str) -> String {
    let qcow2_sync::Error::Request(r) = e else {
        return crate::disk::engine_error(e);
    };
    match r {
        RequestError::BitmapNotFound => format!("Dirty bitmap '{name}' not found"),
        RequestError::BitmapExists => format!("Bitmap already exists: {name}"),
        RequestError::BitmapInconsistent => format!(
            "Bitmap '{name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk"
        ),
        RequestError::BitmapName if name.is_empty() => "Bitmap name cannot be empty".into(),
        RequestError::BitmapName => format!(
            "Can't make bitmap '{name}' persistent in '{file}': Name length exceeds maximum (1023 characters)"
        ),
        RequestError::BitmapsNeedV3 => format!(
            "Can't make bitmap '{name}' persistent in '{file}': Cannot store dirty bitmaps in qcow2 v2 files"
        ),
        r => r.to_string(),
    }
}

/// `--dump`: the bitmap's dirty ranges.
fn dump(a: &BitmapArgs, path: &Path, name: &str) -> CmdResult {
    let (format, _) = resolve_format(path, a.format.as_deref(), false)?;
    if format != Format::Qcow2 {
        return Err(CliError::new(format!("Dirty bitmap '{name}' not found")));
    }
    let options = qcow2_sync::OpenOptions {
        read_only: true,
        force_share: a.force_share,
        ..qcow2_sync::OpenOptions::default()
    };
    let mut img =
        qcow2_sync::Image::open(path, &options).map_err(|e| qcow2_open_error(path, &e))?;
    let data = img.read_bitmap(name).map_err(|e| match e {
        qcow2_sync::Error::Request(RequestError::BitmapNotFound) => {
            CliError::new(format!("Dirty bitmap '{name}' not found"))
        }
        e => CliError::new(format!(
            "Could not read bitmap '{name}': {}",
            crate::disk::engine_error(&e)
        )),
    })?;
    let ranges = data.dirty_ranges();
    match a.output {
        OutputFormat::Json => {
            let list: Vec<_> = ranges
                .iter()
                .map(|&(start, length)| json!({ "start": start, "length": length }))
                .collect();
            println!("{}", serde_json::Value::Array(list));
        }
        OutputFormat::Human => {
            println!("{:<16}Length", "Offset");
            for (start, length) in ranges {
                println!("{start:<#16x}{length:#x}");
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(line: &str) -> Vec<Action> {
        let argv: Vec<String> = line.split(' ').map(str::to_owned).collect();
        let cli = crate::Cli::try_parse_from(&argv).expect("parses");
        let crate::Command::Bitmap(a) = cli.command else {
            panic!("a bitmap command");
        };
        actions(&a, &argv)
    }

    #[test]
    fn actions_keep_command_line_order() {
        assert_eq!(
            parse("qcow2 bitmap --merge s --add -b x.qcow2 f.qcow2 b"),
            [Action::Merge("s".into()), Action::Add]
        );
        assert_eq!(
            parse("qcow2 bitmap --disable --clear --merge=a --merge b f b"),
            [
                Action::Disable,
                Action::Clear,
                Action::Merge("a".into()),
                Action::Merge("b".into())
            ]
        );
        assert_eq!(parse("qcow2 bitmap --dump f b"), []);
    }
}
