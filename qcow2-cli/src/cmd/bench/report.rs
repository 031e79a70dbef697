//! Printing rows: a text table per scenario, or one JSON document.

use serde_json::{json, Value};

use super::names::Scenario;
use super::stats::Row;

/// A figure with `places` decimals, or `-`.
fn opt(x: Option<f64>, places: usize) -> String {
    x.map_or_else(|| "-".to_owned(), |x| format!("{x:.places$}"))
}

/// One text table per scenario that has rows: MB/s, IOPS, the ratios, CPU microseconds per
/// request and, for scenarios that write, `fdatasync`s per write.
pub fn tables(rows: &[Row]) -> String {
    let mut out = String::new();
    for scenario in Scenario::ALL {
        let mine: Vec<&Row> = rows
            .iter()
            .filter(|r| r.cell.scenario == scenario)
            .collect();
        if mine.is_empty() {
            continue;
        }
        out.push_str(&format!("\n{}: {}\n", scenario.name(), scenario.describe()));
        out.push_str(&format!(
            "{:>4}  {:<14} {:<6} {:>9} {:>9} {:>6} {:>7} {:>8}",
            "QD", "state", "column", "MB/s", "IOPS", "x raw", "x qemu", "cpu us"
        ));
        if scenario.writes() {
            out.push_str(&format!(" {:>12}", "syncs/write"));
        }
        out.push('\n');
        for r in mine {
            out.push_str(&format!(
                "{:>4}  {:<14} {:<6} {:>9.1} {:>9.0} {:>6} {:>7} {:>8}",
                r.cell.depth,
                r.cell.state_name(),
                r.cell.column.name(),
                r.mbps,
                r.iops,
                opt(r.x_raw, 2),
                opt(r.x_qemu, 2),
                opt(r.cpu_us, 1),
            ));
            if scenario.writes() {
                out.push_str(&format!(" {:>12}", opt(r.syncs_per_write, 3)));
            }
            out.push('\n');
        }
    }
    out
}

/// The rows as JSON objects (`scenario`, `depth`, `state`, `column`, `mbps`, `iops`, and the
/// ratios, `syncs_per_write`, `cpu_us_per_op` and `rounds`; `null` where there is no
/// figure).
pub fn json_rows(rows: &[Row]) -> Vec<Value> {
    rows.iter()
        .map(|r| {
            json!({
                "scenario": r.cell.scenario.name(),
                "depth": r.cell.depth,
                "state": r.cell.state_name(),
                "column": r.cell.column.name(),
                "mbps": r.mbps,
                "iops": r.iops,
                "x_raw": r.x_raw,
                "x_qemu": r.x_qemu,
                "syncs_per_write": r.syncs_per_write,
                "cpu_us_per_op": r.cpu_us,
                "rounds": r.rounds,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::bench::names::{Column, State};
    use crate::cmd::bench::stats::Cell;

    fn row(scenario: Scenario, column: Column, state: Option<State>) -> Row {
        Row {
            cell: Cell {
                scenario,
                depth: 16,
                state,
                column,
            },
            mbps: 123.45,
            iops: 15069.0,
            x_raw: Some(0.5),
            x_qemu: None,
            syncs_per_write: Some(0.25),
            cpu_us: Some(12.5),
            rounds: 3,
        }
    }

    #[test]
    fn json_rows_have_the_documented_shape() {
        let rows = [
            row(Scenario::Create8k, Column::Raw, None),
            row(Scenario::Create8k, Column::Uring, Some(State::BackingExtL2)),
        ];
        let v = json_rows(&rows);
        assert_eq!(v.len(), 2);
        let keys: Vec<&str> = v[1]
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(
            keys,
            [
                "scenario",
                "depth",
                "state",
                "column",
                "mbps",
                "iops",
                "x_raw",
                "x_qemu",
                "syncs_per_write",
                "cpu_us_per_op",
                "rounds"
            ]
        );
        assert_eq!(v[0]["state"], "-");
        assert_eq!(v[1]["state"], "backing-extl2");
        assert_eq!(v[1]["depth"], 16);
        assert!(v[1]["x_qemu"].is_null());
        assert_eq!(v[1]["mbps"], 123.45);
        assert_eq!(v[1]["cpu_us_per_op"], 12.5);
    }

    #[test]
    fn tables_have_a_heading_per_scenario_and_syncs_for_writes() {
        let rows = [
            row(Scenario::Create8k, Column::Raw, None),
            row(Scenario::RandRead8k, Column::Sync, Some(State::Allocated)),
        ];
        let t = tables(&rows);
        assert!(t.contains("\ncreate8k: sequential 8 KiB writes"), "{t}");
        assert!(t.contains("\nrandread8k: random 8 KiB reads"), "{t}");
        let create = t
            .lines()
            .find(|l| l.split_whitespace().nth(2) == Some("raw"))
            .unwrap();
        assert!(create.trim_end().ends_with("0.250"), "{create}");
        let read_head = t
            .lines()
            .skip_while(|l| !l.starts_with("randread8k"))
            .nth(1)
            .unwrap();
        assert!(!read_head.contains("syncs/write"), "{read_head}");
    }
}
