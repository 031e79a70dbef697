//! The named things a benchmark table is made of: scenarios, image states and columns, the
//! cells that are measured, and the `--scenarios`/`--states`/`--columns`/`--depths` lists.

use crate::error::CliError;

/// What the requests of one run are.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Pattern {
    /// Reads in order, from the start of the disk to its end at the most.
    SeqRead,
    /// Writes in order, from the start of the disk to its end at the most.
    SeqWrite,
    /// Reads at random blocks.
    RandRead,
    /// Writes at random blocks.
    RandWrite,
    /// Reads and writes at random blocks (`read_pct` percent reads).
    RandRw,
}

impl Pattern {
    /// Every pattern, in `--rw` spelling order.
    pub const ALL: [Self; 5] = [
        Self::SeqRead,
        Self::SeqWrite,
        Self::RandRead,
        Self::RandWrite,
        Self::RandRw,
    ];

    /// The `--rw` spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::SeqRead => "seqread",
            Self::SeqWrite => "seqwrite",
            Self::RandRead => "randread",
            Self::RandWrite => "randwrite",
            Self::RandRw => "randrw",
        }
    }

    /// Parses a `--rw` value.
    pub fn parse(s: &str) -> Result<Self, CliError> {
        Self::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| unknown("--rw value", s, Self::ALL.map(Self::name).as_slice()))
    }

    /// Whether offsets are random (else sequential).
    pub fn random(self) -> bool {
        matches!(self, Self::RandRead | Self::RandWrite | Self::RandRw)
    }

    /// The share of reads, in percent, for a pattern that does not mix (`None` if it does).
    pub fn fixed_read_pct(self) -> Option<u32> {
        match self {
            Self::SeqRead | Self::RandRead => Some(100),
            Self::SeqWrite | Self::RandWrite => Some(0),
            Self::RandRw => None,
        }
    }
}

/// A named workload of the table.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Scenario {
    /// Sequential 256 KiB writes into a fresh image (a large file create).
    Create256k,
    /// Sequential 8 KiB writes into a fresh image.
    Create8k,
    /// Sequential 256 KiB reads.
    SeqRead256k,
    /// Sequential 8 KiB reads.
    SeqRead8k,
    /// Random 8 KiB reads.
    RandRead8k,
    /// Random 8 KiB writes.
    RandWrite8k,
    /// Mail server: random 8 KiB, half reads, a flush after every 4th write.
    Mail8k,
    /// Random 8 KiB, 70% reads.
    Mixed8k,
}

impl Scenario {
    /// Every scenario, in table order.
    pub const ALL: [Self; 8] = [
        Self::Create256k,
        Self::Create8k,
        Self::SeqRead256k,
        Self::SeqRead8k,
        Self::RandRead8k,
        Self::RandWrite8k,
        Self::Mail8k,
        Self::Mixed8k,
    ];

    /// The `--scenarios` spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::Create256k => "create256k",
            Self::Create8k => "create8k",
            Self::SeqRead256k => "seqread256k",
            Self::SeqRead8k => "seqread8k",
            Self::RandRead8k => "randread8k",
            Self::RandWrite8k => "randwrite8k",
            Self::Mail8k => "mail8k",
            Self::Mixed8k => "mixed8k",
        }
    }

    /// One line saying what the scenario does (the table's heading).
    pub fn describe(self) -> &'static str {
        match self {
            Self::Create256k => "sequential 256 KiB writes (large file create)",
            Self::Create8k => "sequential 8 KiB writes (large file create)",
            Self::SeqRead256k => "sequential 256 KiB reads",
            Self::SeqRead8k => "sequential 8 KiB reads",
            Self::RandRead8k => "random 8 KiB reads",
            Self::RandWrite8k => "random 8 KiB writes",
            Self::Mail8k => "random 8 KiB, 50% reads, a flush after every 4th write (mail server)",
            Self::Mixed8k => "random 8 KiB, 70% reads / 30% writes",
        }
    }

    /// The request pattern.
    pub fn rw(self) -> Pattern {
        match self {
            Self::Create256k | Self::Create8k => Pattern::SeqWrite,
            Self::SeqRead256k | Self::SeqRead8k => Pattern::SeqRead,
            Self::RandRead8k => Pattern::RandRead,
            Self::RandWrite8k => Pattern::RandWrite,
            Self::Mail8k | Self::Mixed8k => Pattern::RandRw,
        }
    }

    /// Request size in bytes.
    pub fn block_size(self) -> u64 {
        match self {
            Self::Create256k | Self::SeqRead256k => 256 << 10,
            _ => 8 << 10,
        }
    }

    /// Percent of requests that are reads.
    pub fn read_pct(self) -> u32 {
        match self {
            Self::Mail8k => 50,
            Self::Mixed8k => 70,
            s => s.rw().fixed_read_pct().unwrap_or(0),
        }
    }

    /// A flush after every this many writes (0: none).
    pub fn flush_every(self) -> u64 {
        match self {
            Self::Mail8k => 4,
            _ => 0,
        }
    }

    /// Whether the scenario writes at all.
    pub fn writes(self) -> bool {
        self.read_pct() < 100
    }

    /// Whether `qemu-img bench` can run it: one direction, sequential or a fixed stride.
    pub fn qemu_can_run(self) -> bool {
        !matches!(self, Self::Mail8k | Self::Mixed8k)
    }

    /// The image states worth measuring this scenario on (see BENCHMARKS.md):
    /// - creates write fresh images (on `allocated` they would be overwrites, which
    ///   `randwrite8k` on `allocated` already measures); 256 KiB writes cover whole
    ///   clusters, so `backing-extl2` would take the same path as `backing`;
    /// - reads of a growing or metadata-preallocated image read nothing (zeros without I/O,
    ///   or holes of the host file), so reads run on `allocated` and through a backing file;
    ///   the extended-L2 overlay reads the same way as the plain one;
    /// - random writes run on every state (allocated: overwrites in place);
    /// - the mixes run on `allocated`, `growing` and `backing`.
    pub fn states(self) -> &'static [State] {
        use State::*;
        match self {
            Self::Create256k => &[Growing, Metadata, Backing],
            Self::Create8k => &[Growing, Metadata, Backing, BackingExtL2],
            Self::SeqRead256k | Self::SeqRead8k | Self::RandRead8k => &[Allocated, Backing],
            Self::RandWrite8k => &[Allocated, Growing, Metadata, Backing, BackingExtL2],
            Self::Mail8k | Self::Mixed8k => &[Allocated, Growing, Backing],
        }
    }
}

/// What a qcow2 image holds when a run starts.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Ord, PartialOrd, Hash)]
pub enum State {
    /// Every cluster written (reused across runs: writes overwrite in place).
    Allocated,
    /// Empty, no backing file (fresh for every run that writes).
    Growing,
    /// `preallocation=metadata`: every cluster mapped, the host file sparse.
    Metadata,
    /// Empty over a fully written raw backing file: the copy-on-write path.
    Backing,
    /// The same with extended L2 entries (subclusters).
    BackingExtL2,
}

impl State {
    /// Every state, in table order.
    pub const ALL: [Self; 5] = [
        Self::Allocated,
        Self::Growing,
        Self::Metadata,
        Self::Backing,
        Self::BackingExtL2,
    ];

    /// The `--states` spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::Allocated => "allocated",
            Self::Growing => "growing",
            Self::Metadata => "metadata",
            Self::Backing => "backing",
            Self::BackingExtL2 => "backing-extl2",
        }
    }
}

/// Who serves the requests.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Ord, PartialOrd, Hash)]
pub enum Column {
    /// The raw file, fully written, same flags: the physical limit.
    Raw,
    /// Our blocking runtime (depth 1 only).
    Sync,
    /// Our smol runtime.
    Smol,
    /// Our io_uring runtime.
    Uring,
    /// `qemu-img bench` (QEMU's qcow2 driver, io_uring).
    Qemu,
}

impl Column {
    /// Every column, in table order.
    pub const ALL: [Self; 5] = [Self::Raw, Self::Sync, Self::Smol, Self::Uring, Self::Qemu];

    /// The `--columns` spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Sync => "sync",
            Self::Smol => "smol",
            Self::Uring => "uring",
            Self::Qemu => "qemu",
        }
    }

    /// Whether the column runs at `depth` for `scenario`.
    pub fn runs(self, scenario: Scenario, depth: usize) -> bool {
        match self {
            Self::Sync => depth == 1,
            Self::Qemu => scenario.qemu_can_run(),
            _ => true,
        }
    }
}

/// Items of a named set that `--x a,b,c` can select.
pub trait Named: Copy + Eq + 'static {
    /// Every item, in table order.
    fn all() -> &'static [Self];
    /// The item's name.
    fn item_name(self) -> &'static str;
}

macro_rules! named {
    ($t:ty) => {
        impl Named for $t {
            fn all() -> &'static [Self] {
                &<$t>::ALL
            }
            fn item_name(self) -> &'static str {
                self.name()
            }
        }
    };
}
named!(Scenario);
named!(State);
named!(Column);

/// The error for a name not in `known`.
fn unknown(what: &str, got: &str, known: &[&str]) -> CliError {
    CliError::new(format!(
        "bench: unknown {what} '{got}' (expected one of: {})",
        known.join(", ")
    ))
}

/// Parses a comma list of names (`None`: `default`), kept in table order without repeats.
pub fn parse_list<T: Named>(
    list: Option<&str>,
    what: &str,
    default: &[T],
) -> Result<Vec<T>, CliError> {
    let Some(list) = list else {
        return Ok(default.to_vec());
    };
    let names: Vec<&str> = T::all().iter().map(|t| t.item_name()).collect();
    let mut chosen = Vec::new();
    for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        let t = T::all()
            .iter()
            .find(|t| t.item_name() == word)
            .ok_or_else(|| unknown(what, word, &names))?;
        chosen.push(*t);
    }
    if chosen.is_empty() {
        return Err(CliError::new(format!("bench: no {what} given")));
    }
    Ok(T::all()
        .iter()
        .copied()
        .filter(|t| chosen.contains(t))
        .collect())
}

/// Parses `--depths` (`None`: `default`): queue depths from 1 to 256, sorted, no repeats.
pub fn parse_depths(list: Option<&str>, default: &[usize]) -> Result<Vec<usize>, CliError> {
    let Some(list) = list else {
        return Ok(default.to_vec());
    };
    let mut depths = Vec::new();
    for d in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        match d.parse::<usize>() {
            Ok(n @ 1..=256) => depths.push(n),
            _ => {
                return Err(CliError::new(format!(
                    "bench: invalid depth '{d}' (expected 1 to 256)"
                )))
            }
        }
    }
    if depths.is_empty() {
        return Err(CliError::new("bench: no depth given"));
    }
    depths.sort_unstable();
    depths.dedup();
    Ok(depths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_keep_table_order_and_drop_repeats() {
        let s = parse_list::<Scenario>(Some("mail8k, create8k,mail8k"), "scenario", &[]).unwrap();
        assert_eq!(s, [Scenario::Create8k, Scenario::Mail8k]);
        let c = parse_list::<Column>(None, "column", &Column::ALL).unwrap();
        assert_eq!(c, Column::ALL);
        let st = parse_list::<State>(Some("backing-extl2,allocated"), "state", &[]).unwrap();
        assert_eq!(st, [State::Allocated, State::BackingExtL2]);
    }

    #[test]
    fn unknown_names_are_errors_naming_the_choices() {
        let e = parse_list::<Scenario>(Some("create8k,bogus"), "scenario", &[]).unwrap_err();
        assert!(
            e.message.contains("unknown scenario 'bogus'"),
            "{}",
            e.message
        );
        assert!(e.message.contains("create256k, create8k"), "{}", e.message);
        let e = parse_list::<Column>(Some(","), "column", &[]).unwrap_err();
        assert!(e.message.contains("no column"), "{}", e.message);
        assert!(Pattern::parse("write").is_err());
        assert_eq!(Pattern::parse("randrw").unwrap(), Pattern::RandRw);
    }

    #[test]
    fn depths_are_sorted_and_bounded() {
        assert_eq!(parse_depths(Some("16,1,8,1"), &[]).unwrap(), [1, 8, 16]);
        assert_eq!(parse_depths(None, &[1, 16]).unwrap(), [1, 16]);
        assert!(parse_depths(Some("0"), &[]).is_err());
        assert!(parse_depths(Some("257"), &[]).is_err());
        assert!(parse_depths(Some("x"), &[]).is_err());
    }

    #[test]
    fn scenarios_match_their_names() {
        assert_eq!(Scenario::Mail8k.read_pct(), 50);
        assert_eq!(Scenario::Mail8k.flush_every(), 4);
        assert_eq!(Scenario::Mixed8k.read_pct(), 70);
        assert_eq!(Scenario::Create256k.block_size(), 256 << 10);
        assert_eq!(Scenario::Create8k.rw(), Pattern::SeqWrite);
        assert!(!Scenario::SeqRead8k.writes());
        assert!(!Column::Sync.runs(Scenario::RandRead8k, 8));
        assert!(!Column::Qemu.runs(Scenario::Mixed8k, 1));
        // Reads never run on images that hold nothing.
        for s in Scenario::ALL.iter().filter(|s| !s.writes()) {
            assert!(!s.states().contains(&State::Growing), "{s:?}");
        }
    }
}
