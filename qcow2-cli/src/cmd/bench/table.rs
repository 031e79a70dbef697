//! The full table: which cells run, in which order, and running them.
//!
//! Cells are grouped by (scenario, depth). A group runs `rounds` rounds back to back; a round
//! runs every cell of the group once, in an order shuffled per round (a fixed order biases
//! a column by its neighbour: the host's write-back cache carries one run's cost into the
//! next), except that in the first round `qemu` cells run last, so that their request count
//! can be sized from what the other columns did.

use std::time::Duration;

use qcow2_sync::{Cache, OpenOptions};

use super::drivers::{self, Engine};
use super::images::Scratch;
use super::names::{Column, Scenario, State};
use super::progress::Bar;
use super::qemu;
use super::stats::{Cell, Sample};
use super::workload::{mix, Measured, Spec};
use crate::runtime::Runtime;

/// What the table covers and how long each run lasts.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Image size in bytes.
    pub size: u64,
    /// Seconds a run lasts at the most.
    pub seconds: f64,
    /// Rounds of every cell.
    pub rounds: usize,
    /// Queue depths.
    pub depths: Vec<usize>,
    /// Scenarios.
    pub scenarios: Vec<Scenario>,
    /// Image states.
    pub states: Vec<State>,
    /// Columns (without `qemu` when qemu-img is missing).
    pub columns: Vec<Column>,
    /// Cache mode of every run.
    pub cache: Cache,
    /// The uring runtime's poll maximum (`None`: its default).
    pub poll_max: Option<Duration>,
    /// The uring runtime interrupts submitting threads for their completions.
    pub interrupt_submitters: bool,
    /// Seed of the random offsets and of the run order.
    pub seed: u64,
}

/// The cells of one (scenario, depth).
#[derive(Clone, Debug)]
pub struct Group {
    /// Workload.
    pub scenario: Scenario,
    /// Queue depth.
    pub depth: usize,
    /// Cells, in table order.
    pub cells: Vec<Cell>,
}

/// The groups the settings select: for each scenario and depth, `raw` and every chosen
/// column on every chosen state the scenario is measured on. A group without a qcow2 cell
/// is left out, unless `raw` is the only column asked for.
pub fn plan(s: &Settings) -> Vec<Group> {
    let raw_only = s.columns == [Column::Raw];
    let mut groups = Vec::new();
    for &scenario in &s.scenarios {
        for &depth in &s.depths {
            let mut cells = Vec::new();
            if s.columns.contains(&Column::Raw) {
                cells.push(Cell {
                    scenario,
                    depth,
                    state: None,
                    column: Column::Raw,
                });
            }
            for &state in scenario.states().iter().filter(|t| s.states.contains(t)) {
                for &column in &s.columns {
                    if column != Column::Raw && column.runs(scenario, depth) {
                        cells.push(Cell {
                            scenario,
                            depth,
                            state: Some(state),
                            column,
                        });
                    }
                }
            }
            if raw_only || cells.iter().any(|c| c.column != Column::Raw) {
                groups.push(Group {
                    scenario,
                    depth,
                    cells,
                });
            }
        }
    }
    groups
}

/// The order of a group's cells in `round`: shuffled by the seed, `qemu` last in round 0.
pub fn order(cells: &[Cell], round: usize, seed: u64) -> Vec<Cell> {
    let mut v = cells.to_vec();
    for i in (1..v.len()).rev() {
        let j = (mix(seed ^ 0x5eed, (round * 1000 + i) as u64) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    if round == 0 {
        v.sort_by_key(|c| c.column == Column::Qemu);
    }
    v
}

/// Runs every group, counting the runs on `bar`; runs that fail are left out and named in
/// the notes returned.
pub fn run_all(
    s: &Settings,
    groups: &[Group],
    scratch: &Scratch,
    bar: &mut Bar,
) -> (Vec<Sample>, Vec<String>) {
    let mut samples: Vec<Sample> = Vec::new();
    let mut notes = Vec::new();
    for (gi, g) in groups.iter().enumerate() {
        for round in 0..s.rounds {
            for cell in order(&g.cells, round, s.seed ^ gi as u64) {
                let label = format!(
                    "{} QD{} {} {} (round {})",
                    g.scenario.name(),
                    g.depth,
                    cell.state_name(),
                    cell.column.name(),
                    round + 1
                );
                bar.starting(&label);
                match run_cell(s, scratch, cell, &samples) {
                    Ok(m) => samples.push(Sample { cell, round, m }),
                    Err(e) => notes.push(format!("{label}: {e}")),
                }
                bar.finished();
            }
        }
    }
    bar.clear();
    (samples, notes)
}

/// The workload of `scenario` at `depth`.
pub fn spec(s: &Settings, scenario: Scenario, depth: usize) -> Spec {
    Spec {
        rw: scenario.rw(),
        bs: scenario.block_size(),
        depth,
        runtime: Duration::from_secs_f64(s.seconds),
        seed: s.seed,
        read_pct: scenario.read_pct(),
        flush_every: scenario.flush_every(),
    }
}

/// Requests a `qemu` run of `cell` is given: its last run's rate, else the slowest rate
/// measured in its group so far (a short run rather than a long one), times the run time.
pub fn qemu_count(s: &Settings, cell: Cell, done: &[Sample]) -> u64 {
    let last = done
        .iter()
        .rev()
        .find(|x| x.cell == cell)
        .map(|x| x.m.iops());
    let slowest = done
        .iter()
        .filter(|x| x.cell.scenario == cell.scenario && x.cell.depth == cell.depth)
        .map(|x| x.m.iops())
        .reduce(f64::min);
    let iops = last.or(slowest).unwrap_or(1000.0);
    ((iops * s.seconds).ceil() as u64).max(16)
}

/// Runs one cell once: on the raw file, or on its state's image (fresh unless allocated).
fn run_cell(
    s: &Settings,
    scratch: &Scratch,
    cell: Cell,
    done: &[Sample],
) -> Result<Measured, String> {
    let spec = spec(s, cell.scenario, cell.depth);
    let options = OpenOptions {
        cache: s.cache,
        poll_max: s.poll_max,
        interrupt_submitters: s.interrupt_submitters,
        ..OpenOptions::default()
    };
    let Some(state) = cell.state else {
        return drivers::run(Engine::Raw, &scratch.raw(), &options, spec);
    };
    let path = scratch.image_for(state).map_err(|e| e.message)?;
    let ours = |rt| drivers::run(Engine::Qcow2(rt), &path, &options, spec);
    let r = match cell.column {
        Column::Raw => unreachable!("raw cells have no state"),
        Column::Sync => ours(Runtime::Sync),
        Column::Smol => ours(Runtime::Smol),
        Column::Uring => ours(Runtime::Uring),
        Column::Qemu => qemu::run(
            &path,
            s.cache,
            cell.scenario,
            cell.depth,
            qemu_count(s, cell, done),
            s.size,
        ),
    };
    scratch.done_with(&path);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            size: 1 << 30,
            seconds: 0.5,
            rounds: 3,
            depths: vec![1, 8, 16],
            scenarios: Scenario::ALL.to_vec(),
            states: State::ALL.to_vec(),
            columns: Column::ALL.to_vec(),
            cache: Cache::None,
            poll_max: None,
            interrupt_submitters: false,
            seed: 42,
        }
    }

    #[test]
    fn the_full_plan_has_the_documented_cells() {
        let groups = plan(&settings());
        assert_eq!(groups.len(), 8 * 3);
        let cells: usize = groups.iter().map(|g| g.cells.len()).sum();
        // Per scenario: raw at each depth, then states x (smol, uring, qemu?) + sync at QD1.
        let per = |states: usize, qemu: bool| {
            let cols = 2 + usize::from(qemu);
            3 + 3 * states * cols + states
        };
        let expected =
            per(3, true) + per(4, true) + 3 * per(2, true) + per(5, true) + 2 * per(3, false);
        assert_eq!(cells, expected);
        // No reads of an image that holds nothing.
        assert!(!groups
            .iter()
            .flat_map(|g| &g.cells)
            .any(|c| { !c.scenario.writes() && c.state == Some(State::Growing) }));
    }

    #[test]
    fn filters_narrow_the_plan() {
        let mut s = settings();
        s.scenarios = vec![Scenario::RandRead8k];
        s.states = vec![State::Growing];
        assert!(
            plan(&s).is_empty(),
            "reads of a growing image are not measured"
        );
        s.columns = vec![Column::Raw];
        assert_eq!(plan(&s).len(), 3);
        s.states = vec![State::Allocated];
        s.columns = vec![Column::Sync, Column::Uring];
        s.depths = vec![8];
        let g = plan(&s);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].cells.len(), 1, "{:?}", g[0].cells);
        assert_eq!(g[0].cells[0].column, Column::Uring);
    }

    #[test]
    fn qemu_counts_follow_the_measured_rates() {
        let s = settings();
        let cell = |column, state| Cell {
            scenario: Scenario::RandWrite8k,
            depth: 1,
            state,
            column,
        };
        let qemu = cell(Column::Qemu, Some(State::Growing));
        let m = |ops: u64| Measured {
            ops,
            writes: ops,
            bytes: ops * 8192,
            secs: 1.0,
            syncs: None,
            cpu: None,
        };
        assert_eq!(qemu_count(&s, qemu, &[]), 500);
        let mut done = vec![
            Sample {
                cell: cell(Column::Raw, None),
                round: 0,
                m: m(10_000),
            },
            Sample {
                cell: cell(Column::Uring, Some(State::Growing)),
                round: 0,
                m: m(2_000),
            },
        ];
        // The slowest neighbour first, then the cell's own last rate.
        assert_eq!(qemu_count(&s, qemu, &done), 1000);
        done.push(Sample {
            cell: qemu,
            round: 0,
            m: m(4_000),
        });
        assert_eq!(qemu_count(&s, qemu, &done), 2000);
    }

    #[test]
    fn orders_are_shuffles_with_qemu_last_at_first() {
        let g = &plan(&settings())[0];
        let first = order(&g.cells, 0, 7);
        assert_eq!(first.last().unwrap().column, Column::Qemu);
        for round in 0..4 {
            let mut o = order(&g.cells, round, 7);
            assert_eq!(o, order(&g.cells, round, 7), "deterministic");
            o.sort_by_key(|c| (c.state, c.column));
            let mut want = g.cells.clone();
            want.sort_by_key(|c| (c.state, c.column));
            assert_eq!(o, want);
        }
    }
}
