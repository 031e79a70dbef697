//! From runs to table rows: medians over rounds, and ratios taken within a round (a cell
//! against the `raw` and `qemu` cells of the same round, then the median of those ratios),
//! so that drift between rounds cancels out.

use super::names::{Column, Scenario, State};
use super::workload::Measured;

/// One measured cell of the table.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Cell {
    /// Workload.
    pub scenario: Scenario,
    /// Queue depth.
    pub depth: usize,
    /// Image state (`None` for the raw file).
    pub state: Option<State>,
    /// Who served it.
    pub column: Column,
}

impl Cell {
    /// The state's name, `-` for the raw file.
    pub fn state_name(&self) -> &'static str {
        self.state.map_or("-", State::name)
    }
}

/// One run of a cell.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// What ran.
    pub cell: Cell,
    /// Which round.
    pub round: usize,
    /// What it did.
    pub m: Measured,
}

/// A row of the table: a cell's medians.
#[derive(Clone, Copy, Debug)]
pub struct Row {
    /// What ran.
    pub cell: Cell,
    /// Median MB/s.
    pub mbps: f64,
    /// Median IOPS.
    pub iops: f64,
    /// Median of the per-round ratios to `raw`.
    pub x_raw: Option<f64>,
    /// Median of the per-round ratios to `qemu` on the same state.
    pub x_qemu: Option<f64>,
    /// Median `fdatasync`s per write (write cells of our columns and raw).
    pub syncs_per_write: Option<f64>,
    /// Median microseconds of CPU time per request (every thread of the process; for
    /// `qemu`, the whole `qemu-img` process).
    pub cpu_us: Option<f64>,
    /// Rounds measured.
    pub rounds: usize,
}

/// The median (the mean of the middle two for an even count); `None` when empty.
pub fn median(mut xs: Vec<f64>) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    Some(if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    })
}

/// `a / b`, unless `b` is zero.
fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

/// Where a cell sorts in the table: by scenario, depth, then `raw` first and the states and
/// columns in their table order.
fn table_order(c: &Cell) -> (usize, usize, Option<State>, Column) {
    let scenario = Scenario::ALL.iter().position(|s| *s == c.scenario);
    (scenario.unwrap_or(0), c.depth, c.state, c.column)
}

/// Rows for every cell of `samples`, in table order.
pub fn rows(samples: &[Sample]) -> Vec<Row> {
    let mut cells: Vec<Cell> = Vec::new();
    for s in samples {
        if !cells.contains(&s.cell) {
            cells.push(s.cell);
        }
    }
    cells.sort_by_key(table_order);
    let find = |cell: Cell, round: usize| {
        samples
            .iter()
            .find(|s| s.cell == cell && s.round == round)
            .map(|s| s.m.mbps())
    };
    cells
        .into_iter()
        .map(|cell| {
            let own: Vec<&Sample> = samples.iter().filter(|s| s.cell == cell).collect();
            let raw = Cell {
                state: None,
                column: Column::Raw,
                ..cell
            };
            let qemu = Cell {
                column: Column::Qemu,
                ..cell
            };
            let per_round = |other: Cell| {
                median(
                    own.iter()
                        .filter_map(|s| ratio(s.m.mbps(), find(other, s.round)?))
                        .collect(),
                )
            };
            Row {
                cell,
                mbps: median(own.iter().map(|s| s.m.mbps()).collect()).unwrap_or(0.0),
                iops: median(own.iter().map(|s| s.m.iops()).collect()).unwrap_or(0.0),
                x_raw: per_round(raw),
                x_qemu: if cell.state.is_some() {
                    per_round(qemu)
                } else {
                    None
                },
                syncs_per_write: median(own.iter().filter_map(|s| s.m.syncs_per_write()).collect()),
                cpu_us: median(own.iter().filter_map(|s| s.m.cpu_us_per_op()).collect()),
                rounds: own.len(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0]), Some(3.0));
        assert_eq!(median(vec![5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    fn sample(column: Column, state: Option<State>, round: usize, mb: u64) -> Sample {
        Sample {
            cell: Cell {
                scenario: Scenario::RandWrite8k,
                depth: 1,
                state,
                column,
            },
            round,
            m: Measured {
                ops: mb,
                writes: mb,
                bytes: mb * 1_000_000,
                secs: 1.0,
                syncs: Some(mb / 2),
                cpu: Some(std::time::Duration::from_micros(3 * mb)),
            },
        }
    }

    #[test]
    fn ratios_are_medians_of_same_round_ratios() {
        let g = Some(State::Growing);
        let samples = [
            sample(Column::Qemu, g, 0, 25),
            sample(Column::Uring, g, 0, 50),
            sample(Column::Raw, None, 0, 100),
            sample(Column::Raw, None, 1, 200),
            sample(Column::Uring, g, 1, 100),
            sample(Column::Qemu, g, 1, 100),
            sample(Column::Raw, None, 2, 50),
            sample(Column::Uring, g, 2, 40),
            sample(Column::Qemu, g, 2, 10),
        ];
        let rows = rows(&samples);
        assert_eq!(rows.len(), 3);
        let uring = rows
            .iter()
            .find(|r| r.cell.column == Column::Uring)
            .unwrap();
        assert_eq!(uring.mbps, 50.0);
        assert_eq!(uring.x_raw, Some(0.5)); // 0.5, 0.5, 0.8
        assert_eq!(uring.x_qemu, Some(2.0)); // 2, 1, 4
        assert_eq!(uring.syncs_per_write, Some(0.5));
        assert_eq!(uring.cpu_us, Some(3.0));
        assert_eq!(uring.rounds, 3);
        let order: Vec<Column> = rows.iter().map(|r| r.cell.column).collect();
        assert_eq!(order, [Column::Raw, Column::Uring, Column::Qemu]);
        let raw = &rows[0];
        assert_eq!((raw.x_raw, raw.x_qemu), (Some(1.0), None));
    }
}
