//! `qcow2`: a qemu-img-compatible command-line tool over this project's qcow2 engine.
//!
//! The commands take qemu-img's option spellings (`-f`, `-O`, `-o key=value`, `-q`, `-p`,
//! `-U`, `--output=json`, size suffixes) and print what qemu-img 10.0 prints, so scripts
//! written for `qemu-img` run unchanged. `io` is a small qemu-io, `bench` compares the
//! engine with a raw file.

#![forbid(unsafe_code)]

mod cmd;
mod disk;
mod error;
mod host;
mod json;
mod prealloc;
mod progress;
mod raw;
mod runtime;
mod size;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use error::CliError;

/// qemu-img-compatible qcow2 tool.
#[derive(Debug, Parser)]
#[command(name = "qcow2", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show an image's format, sizes and format-specific data.
    Info(InfoArgs),
    /// Check an image's metadata for consistency, optionally repairing it.
    Check(CheckArgs),
    /// Create a new image.
    Create(CreateArgs),
    /// Convert (copy) images from one format to another.
    Convert(ConvertArgs),
    /// Show how an image's guest ranges are stored.
    Map(MapArgs),
    /// Compute the file size a new image needs (empty, or converted from an image).
    Measure(MeasureArgs),
    /// Compare two images' guest contents.
    Compare(CompareArgs),
    /// Change an image's virtual size.
    Resize(ResizeArgs),
    /// Change an image's format options (compat, lazy_refcounts, refcount_bits, size).
    Amend(AmendArgs),
    /// Change an image's backing file (copying what differs, unless `-u`).
    Rebase(RebaseArgs),
    /// List, create or delete an image's internal snapshots
    Snapshot(SnapshotArgs),
    /// Read a persistent dirty bitmap's dirty ranges (`--dump`)
    Bitmap(BitmapArgs),
    /// Write an image's changes into its backing file.
    Commit(CommitArgs),
    /// Run qemu-io-like commands (`read`, `write`, `discard`, `flush`) on an image.
    Io(IoArgs),
    /// Measure our runtimes against a raw file and QEMU (MB/s, IOPS, ratios), or one run.
    Bench(BenchArgs),
}

/// `--output` formats.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, ValueEnum)]
pub enum OutputFormat {
    /// Text for people.
    #[default]
    Human,
    /// JSON exactly as qemu-img prints it.
    Json,
}

/// `info` options.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Image format (qcow2 or raw); probed by magic when absent.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// Share the image with a process that writes it (qemu-img's `-U`): read-only opens
    /// take no conflicting lock.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Show the whole backing chain.
    #[arg(long = "backing-chain")]
    pub backing_chain: bool,
    /// The image.
    pub filename: PathBuf,
}

/// `check` options.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Image format; probed by magic when absent.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Repair `leaks` or `all` problems.
    #[arg(short = 'r', long = "repair")]
    pub repair: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// Quiet: print nothing on success.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Cache mode.
    #[arg(short = 'T', long = "cache")]
    pub cache: Option<String>,
    /// Share the image with a process that writes it (qemu-img's `-U`): read-only opens
    /// take no conflicting lock.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The image.
    pub filename: PathBuf,
}

/// `create` options.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Image format (default raw, as qemu-img).
    #[arg(short = 'f', long = "format", default_value = "raw")]
    pub format: String,
    /// Format options `key=value,...` (`-o help` lists them).
    #[arg(short = 'o', long = "options")]
    pub options: Vec<String>,
    /// Quiet: do not print the `Formatting` line.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Backing file (not supported yet).
    #[arg(short = 'b', long = "backing")]
    pub backing: Option<String>,
    /// Backing file format (not supported yet).
    #[arg(short = 'F', long = "backing-format")]
    pub backing_format: Option<String>,
    /// Do not open the backing file (not supported yet).
    #[arg(short = 'u')]
    pub unsafe_backing: bool,
    /// qemu objects such as secrets (not supported yet).
    #[arg(long)]
    pub object: Vec<String>,
    /// The new image.
    pub filename: Option<PathBuf>,
    /// Virtual size (suffixes k, M, G, T, P, E).
    pub size: Option<String>,
}

/// `convert` options.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Source format; probed by magic when absent.
    #[arg(short = 'f', long = "source-format")]
    pub format: Option<String>,
    /// Target format (default raw).
    #[arg(short = 'O', long = "target-format", default_value = "raw")]
    pub target_format: String,
    /// Target format options `key=value,...`.
    #[arg(short = 'o', long = "options")]
    pub options: Vec<String>,
    /// Show progress.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Do not create the target; it must exist.
    #[arg(short = 'n', long = "no-create")]
    pub no_create: bool,
    /// Consecutive zero bytes that make a hole in the target (default 4k; 0 = copy all).
    #[arg(short = 'S', long = "sparse-size")]
    pub sparse_size: Option<String>,
    /// Target cache mode.
    #[arg(short = 't', long = "target-cache")]
    pub target_cache: Option<String>,
    /// Source cache mode.
    #[arg(short = 'T', long = "source-cache")]
    pub source_cache: Option<String>,
    /// Share the image with a process that writes it (qemu-img's `-U`): read-only opens
    /// take no conflicting lock.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Compress the target (not supported yet).
    #[arg(short = 'c', long = "compress")]
    pub compress: bool,
    /// Backing file of the target: it is created as an overlay of it, and only what the
    /// source's top layer stores is copied.
    #[arg(short = 'B', long = "backing", visible_alias = "target-backing")]
    pub backing: Option<String>,
    /// Format of the target's backing file.
    #[arg(short = 'F', long = "backing-format")]
    pub backing_format: Option<String>,
    /// Parallel requests (accepted; this tool copies sequentially).
    #[arg(short = 'm', long = "parallel")]
    pub parallel: Option<u32>,
    /// Out-of-order writes (accepted; this tool copies in order).
    #[arg(short = 'W', long = "oob-writes")]
    pub out_of_order: bool,
    /// The target is known to read as zero already.
    #[arg(long = "target-is-zero")]
    pub target_is_zero: bool,
    /// Copy an internal snapshot of the source instead of its current contents:
    /// `snapshot.id=ID`, `snapshot.name=NAME`, or a bare ID or name.
    #[arg(short = 'l', long = "snapshot")]
    pub snapshot: Option<String>,
    /// Copy the source's persistent bitmaps (qcow2 to qcow2, one source).
    #[arg(long)]
    pub bitmaps: bool,
    /// With `--bitmaps`: leave out inconsistent bitmaps (with a warning) instead of failing.
    #[arg(long = "skip-broken-bitmaps", requires = "bitmaps")]
    pub skip_broken_bitmaps: bool,
    /// Runtime writing a qcow2 target: sync, smol or uring (default: uring where the kernel
    /// has io_uring, else sync). The async ones keep several writes in flight.
    #[arg(long)]
    pub runtime: Option<String>,
    /// Source images (concatenated) and the target.
    #[arg(required = true, num_args = 2..)]
    pub files: Vec<PathBuf>,
}

/// `map` options.
#[derive(Debug, Args)]
pub struct MapArgs {
    /// Image format; probed by magic when absent.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// First guest byte to report.
    #[arg(short = 's', long = "start-offset")]
    pub start_offset: Option<String>,
    /// Bytes to report.
    #[arg(short = 'l', long = "max-length")]
    pub max_length: Option<String>,
    /// Share the image with a process that writes it (qemu-img's `-U`): read-only opens
    /// take no conflicting lock.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The image.
    pub filename: PathBuf,
}

/// `measure` options.
#[derive(Debug, Args)]
pub struct MeasureArgs {
    /// Source image format; probed by magic when absent.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Target format (default raw, as qemu-img).
    #[arg(short = 'O', long = "target-format", default_value = "raw")]
    pub target_format: String,
    /// Target format options `key=value,...`.
    #[arg(short = 'o', long = "options")]
    pub options: Vec<String>,
    /// Measure a new empty image of this virtual size instead of a source image.
    #[arg(short = 's', long = "size", allow_hyphen_values = true)]
    pub size: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// Internal snapshot of the source to measure (not supported yet).
    #[arg(short = 'l', long = "snapshot")]
    pub snapshot: Option<String>,
    /// Share the image with a process that writes it (qemu-img's `-U`): read-only opens
    /// take no conflicting lock.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The source is a qemu option string (not supported yet).
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// qemu objects such as secrets (not supported yet).
    #[arg(long)]
    pub object: Vec<String>,
    /// The source image (instead of `--size`).
    pub filename: Option<PathBuf>,
}

/// `compare` options.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Format of the first image.
    #[arg(short = 'f', long = "a-format")]
    pub format_a: Option<String>,
    /// Format of the second image.
    #[arg(short = 'F', long = "b-format")]
    pub format_b: Option<String>,
    /// Strict mode: allocation must match too.
    #[arg(short = 's', long = "strict")]
    pub strict: bool,
    /// Show progress.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Cache mode for both images.
    #[arg(short = 'T', long = "cache")]
    pub cache: Option<String>,
    /// Share the image with a process that writes it (qemu-img's `-U`): read-only opens
    /// take no conflicting lock.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// First image.
    pub a: PathBuf,
    /// Second image.
    pub b: PathBuf,
}

/// `resize` options.
#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// Image format; probed by magic when absent.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Allow shrinking (data past the new end is lost).
    #[arg(long)]
    pub shrink: bool,
    /// Preallocation of the new area (only `off` is supported).
    #[arg(long)]
    pub preallocation: Option<String>,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Share the image with a process that writes it (qemu-img's `-U`): read-only opens
    /// take no conflicting lock.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The image.
    pub filename: PathBuf,
    /// New size, or `+SIZE` / `-SIZE` relative to the current one.
    #[arg(allow_hyphen_values = true)]
    pub size: String,
}

/// `amend` options.
#[derive(Debug, Args)]
pub struct AmendArgs {
    /// Image format; probed by magic when absent.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Format options to change (`compat=`, `lazy_refcounts=`, `refcount_bits=`, `size=`;
    /// `help` lists them).
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Show progress.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Allow changes qemu-img only makes when forced (LUKS keyslots; nothing here).
    #[arg(long)]
    pub force: bool,
    /// Cache mode (accepted for compatibility; amend writes through and flushes).
    #[arg(short = 't', long = "cache")]
    pub cache: Option<String>,
    /// The image.
    pub filenames: Vec<std::path::PathBuf>,
}

/// `bitmap` options.
#[derive(Debug, Args)]
pub struct BitmapArgs {
    /// Print the bitmap's dirty ranges (start and length in guest bytes).
    #[arg(long)]
    pub dump: bool,
    /// Add the bitmap, empty and enabled (`--add --disable`: disabled).
    #[arg(long)]
    pub add: bool,
    /// Remove the bitmap.
    #[arg(long)]
    pub remove: bool,
    /// Clear the bitmap.
    #[arg(long)]
    pub clear: bool,
    /// Enable the bitmap: it records the writes that follow.
    #[arg(long)]
    pub enable: bool,
    /// Disable the bitmap.
    #[arg(long)]
    pub disable: bool,
    /// Merge bitmap SOURCE (of this image, or of `-b`'s) into the bitmap.
    #[arg(long, value_name = "SOURCE")]
    pub merge: Vec<String>,
    /// Bytes per bit of a bitmap `--add` creates (default: the cluster size, within 4 KiB
    /// to 64 KiB).
    #[arg(short = 'g', long = "granularity")]
    pub granularity: Option<String>,
    /// The image `--merge` reads its source bitmap from.
    #[arg(short = 'b', long = "source-file")]
    pub source_file: Option<String>,
    /// The format of `-b`'s image.
    #[arg(short = 'F', long = "source-format")]
    pub source_format: Option<String>,
    /// Image format; probed by magic when absent.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Output format of `--dump`.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// Share the image with a process that writes it (qemu-img's `-U`).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The image, then the bitmap's name.
    pub args: Vec<String>,
}

/// `snapshot` options.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// List the snapshots (the default).
    #[arg(short = 'l')]
    pub list: bool,
    /// Create a snapshot named NAME.
    #[arg(short = 'c', value_name = "NAME")]
    pub create: Option<String>,
    /// Revert the image to snapshot NAME (an ID, else a name).
    #[arg(short = 'a', value_name = "NAME")]
    pub apply: Option<String>,
    /// Delete snapshot NAME (by name).
    #[arg(short = 'd', value_name = "NAME")]
    pub delete: Option<String>,
    /// Image format; probed by magic when absent.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Quiet (the list is printed all the same, as qemu-img does).
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Share the image with a process that writes it (qemu-img's `-U`).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The image.
    pub filenames: Vec<PathBuf>,
}

/// `rebase` options.
#[derive(Debug, Args)]
pub struct RebaseArgs {
    /// Image format; probed by magic when absent.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Cache mode of the image.
    #[arg(short = 't', long = "cache")]
    pub cache: Option<String>,
    /// Cache mode of the old and new backing files.
    #[arg(short = 'T', long = "backing-cache")]
    pub backing_cache: Option<String>,
    /// The new backing file (`""`: none).
    #[arg(short = 'b', long = "backing")]
    pub backing: Option<String>,
    /// Format of the new backing file.
    #[arg(short = 'F', long = "backing-format")]
    pub backing_format: Option<String>,
    /// Unsafe: only change the name in the header; the old backing file is not opened.
    #[arg(short = 'u', long = "backing-unsafe")]
    pub unsafe_rebase: bool,
    /// Compress the data copied (not supported yet).
    #[arg(short = 'c', long = "compress")]
    pub compress: bool,
    /// Open the new backing file sharing it with writers.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Show progress.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// qemu objects such as secrets (not supported yet).
    #[arg(long)]
    pub object: Vec<String>,
    /// The image is a qemu option string (not supported yet).
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// The image.
    pub files: Vec<PathBuf>,
}

/// `commit` options.
#[derive(Debug, Args)]
pub struct CommitArgs {
    /// Image format; probed by magic when absent.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Cache mode of the image and the file committed into.
    #[arg(short = 't', long = "cache")]
    pub cache: Option<String>,
    /// The file of the backing chain to commit into (default: the backing file); implies
    /// `-d`.
    #[arg(short = 'b', long = "base")]
    pub base: Option<String>,
    /// Do not empty the image afterwards.
    #[arg(short = 'd', long = "drop")]
    pub drop: bool,
    /// I/O rate limit in bytes per second (not supported yet).
    #[arg(short = 'r', long = "rate-limit")]
    pub rate_limit: Option<String>,
    /// Show progress.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// qemu objects such as secrets (not supported yet).
    #[arg(long)]
    pub object: Vec<String>,
    /// The image is a qemu option string (not supported yet).
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// The image.
    pub files: Vec<PathBuf>,
}

/// `io` options.
#[derive(Debug, Args)]
pub struct IoArgs {
    /// Image format; probed by magic when absent.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Cache mode (writeback, writethrough, none, directsync, unsafe).
    #[arg(short = 't', long = "cache")]
    pub cache: Option<String>,
    /// Shortcut for `-t none`.
    #[arg(short = 'n', long = "nocache")]
    pub nocache: bool,
    /// Open read-only.
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,
    /// A command to run; repeat for several, run in order. Without `-c`, commands are read
    /// from standard input, one a line.
    #[arg(short = 'c', long = "cmd")]
    pub commands: Vec<String>,
    /// Share the image with a process that writes it (qemu-img's `-U`): read-only opens
    /// take no conflicting lock.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The image.
    pub filename: PathBuf,
}

/// `bench` options: the full table, or `bench run` for one run.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    /// One run on a given image instead of the table.
    #[command(subcommand)]
    pub command: Option<BenchCommand>,
    /// Cache mode of every run: none (O_DIRECT, the default), writeback, writethrough,
    /// directsync or unsafe.
    #[arg(short = 't', long = "cache")]
    pub cache: Option<String>,
    /// About a minute: 256 MiB images, 0.1 s runs, 2 rounds, depths 1 and 16, states
    /// allocated, growing and backing (the filters below override these).
    #[arg(long)]
    pub quick: bool,
    /// Print `{"rows":[{scenario, depth, state, column, mbps, iops, ...}]}`.
    #[arg(long)]
    pub json: bool,
    /// Directory for the scratch files (default: the temp directory, else /var/tmp, else
    /// the current one: the first where O_DIRECT works, which it does not on tmpfs).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Image size (default 1G, 256M with --quick).
    #[arg(long)]
    pub size: Option<String>,
    /// Seconds a run lasts at the most (default 0.4, 0.1 with --quick).
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Rounds of every cell; figures are their medians (default 3, 2 with --quick).
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Scenarios, comma-separated: create256k, create8k, seqread256k, seqread8k,
    /// randread8k, randwrite8k, mail8k, mixed8k (default: all).
    #[arg(long)]
    pub scenarios: Option<String>,
    /// Queue depths, comma-separated (default 1,8,16).
    #[arg(long)]
    pub depths: Option<String>,
    /// Image states, comma-separated: allocated, growing, metadata, backing, backing-extl2
    /// (default: all).
    #[arg(long)]
    pub states: Option<String>,
    /// Columns, comma-separated: raw, sync, smol, uring, qemu (default: all; qemu only
    /// where qemu-img is installed).
    #[arg(long)]
    pub columns: Option<String>,
    /// Seed of the random offsets and of the run order.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// The uring runtime's poll maximum in microseconds: waits for a completion up to this
    /// long are polled for rather than slept through (default 256; 0: never poll).
    #[arg(long = "poll-max-us")]
    pub poll_max_us: Option<u64>,
    /// The uring runtime: the kernel interrupts a submitting thread busy in user space to
    /// post its completions (io_uring's default) instead of flagging them for it.
    #[arg(long = "interrupt-submitters")]
    pub interrupt_submitters: bool,
}

/// `bench` subcommands.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// One run on an existing image; prints `RESULT mbps=<float> iops=<float> secs=<float>`.
    Run(BenchRunArgs),
}

/// `bench run` options.
#[derive(Debug, Args)]
pub struct BenchRunArgs {
    /// The image (it is written to by write patterns).
    #[arg(long)]
    pub image: PathBuf,
    /// Image format, qcow2 or raw; probed by magic when absent.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Pattern: seqread, seqwrite, randread, randwrite or randrw (sequential runs stop at
    /// the end of the disk).
    #[arg(long)]
    pub rw: String,
    /// Request size in bytes (suffixes k, M allowed).
    #[arg(long)]
    pub bs: String,
    /// Requests in flight (the sync engine runs one at a time whatever this says).
    #[arg(long, default_value_t = 1)]
    pub depth: usize,
    /// Seconds after which no request is started.
    #[arg(long)]
    pub runtime: f64,
    /// O_DIRECT (cache=none); else the host page cache (writeback).
    #[arg(long)]
    pub direct: bool,
    /// Seed of the random offsets and of the read/write choice.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Percent of reads for randrw.
    #[arg(long = "read-pct", default_value_t = 50)]
    pub read_pct: u32,
    /// A flush after every K writes (0: none).
    #[arg(long = "flush-every", default_value_t = 0)]
    pub flush_every: u64,
    /// Runtime driving a qcow2 image: sync, smol or uring (default: uring where the kernel
    /// has io_uring, else sync).
    #[arg(long)]
    pub engine: Option<String>,
    /// The uring runtime's poll maximum in microseconds (default 256; 0: never poll).
    #[arg(long = "poll-max-us")]
    pub poll_max_us: Option<u64>,
    /// The uring runtime: the kernel interrupts a submitting thread busy in user space to
    /// post its completions (io_uring's default) instead of flagging them for it.
    #[arg(long = "interrupt-submitters")]
    pub interrupt_submitters: bool,
}

fn run(cli: Cli) -> Result<i32, CliError> {
    match cli.command {
        Command::Info(a) => cmd::info::run(&a),
        Command::Check(a) => cmd::check::run(&a),
        Command::Create(a) => cmd::create::run(&a),
        Command::Convert(a) => cmd::convert::run(&a),
        Command::Map(a) => cmd::map::run(&a),
        Command::Measure(a) => cmd::measure::run(&a),
        Command::Compare(a) => cmd::compare::run(&a),
        Command::Resize(a) => cmd::resize::run(&a),
        Command::Amend(a) => cmd::amend::run(&a),
        Command::Rebase(a) => cmd::rebase::run(&a),
        Command::Snapshot(a) => cmd::snapshot::run(&a),
        Command::Bitmap(a) => cmd::bitmap::run(&a),
        Command::Commit(a) => cmd::commit::run(&a),
        Command::Io(a) => cmd::io::run(&a),
        Command::Bench(a) => cmd::bench::run(&a),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // Usage errors exit with 1, like qemu-img; help and version with 0.
            return ExitCode::from(u8::from(e.use_stderr()));
        }
    };
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            if !e.message.is_empty() {
                eprintln!("qcow2: {}", e.message);
            }
            e.code
        }
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}
