//! `bench`: the single-run mode and a tiny filtered table, checked for the shape of their
//! output and for positive figures (never for speed).

mod common;

use common::{json, stderr, Scratch};

/// Parses `RESULT mbps=<float> iops=<float> secs=<float>`.
fn result_fields(out: &str) -> [f64; 3] {
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line: {out}");
    let rest = lines[0].strip_prefix("RESULT ").expect(out);
    let fields: Vec<(&str, f64)> = rest
        .split(' ')
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect(kv);
            (k, v.parse::<f64>().expect(v))
        })
        .collect();
    let keys: Vec<&str> = fields.iter().map(|f| f.0).collect();
    assert_eq!(keys, ["mbps", "iops", "secs"], "{out}");
    [fields[0].1, fields[1].1, fields[2].1]
}

#[test]
fn bench_run_prints_one_result_line() {
    let sc = Scratch::new();
    let img = sc.path("t.qcow2");
    let raw = sc.path("t.raw");
    sc.ours_ok(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "4M"]);
    sc.ours_ok(&["create", "-q", "-f", "raw", raw.to_str().unwrap(), "4M"]);
    let runs: [(&str, &[&str]); 5] = [
        (
            "t.qcow2",
            &["--rw", "seqwrite", "--bs", "64k", "--engine", "sync"],
        ),
        (
            "t.qcow2",
            &[
                "--rw", "randrw", "--bs", "8192", "--depth", "4", "--engine", "smol",
            ],
        ),
        (
            "t.qcow2",
            &[
                "--rw",
                "randrw",
                "--bs",
                "8k",
                "--depth",
                "8",
                "--read-pct",
                "50",
                "--flush-every",
                "4",
                "--engine",
                "uring",
                "--seed",
                "7",
            ],
        ),
        ("t.qcow2", &["--rw", "seqread", "--bs", "4k", "-f", "qcow2"]),
        (
            "t.raw",
            &[
                "-f",
                "raw",
                "--rw",
                "randwrite",
                "--bs",
                "4k",
                "--depth",
                "2",
            ],
        ),
    ];
    for (file, args) in runs {
        let path = sc.path(file);
        let mut all = vec![
            "bench",
            "run",
            "--image",
            path.to_str().unwrap(),
            "--runtime",
            "0.05",
        ];
        all.extend_from_slice(args);
        let [mbps, iops, secs] = result_fields(&sc.ours_ok(&all));
        assert!(mbps > 0.0 && iops > 0.0 && secs > 0.0, "{all:?}");
    }
    // The image is still sound after the writes.
    sc.ours_ok(&["check", img.to_str().unwrap()]);
    let bad = sc.ours(&[
        "bench",
        "run",
        "--image",
        img.to_str().unwrap(),
        "--rw",
        "write",
        "--bs",
        "4k",
        "--runtime",
        "0.05",
    ]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        stderr(&bad).contains("unknown --rw value 'write'"),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn bench_table_json_has_rows_for_the_filtered_cells() {
    let sc = Scratch::new();
    let dir = sc.path("");
    let out = sc.ours_ok(&[
        "bench",
        "--json",
        "-t",
        "writeback",
        "--size",
        "1M",
        "--seconds",
        "0.02",
        "--rounds",
        "2",
        "--scenarios",
        "create8k,randread8k",
        "--depths",
        "1,2",
        "--states",
        "growing,allocated",
        "--columns",
        "raw,sync,uring",
        "--dir",
        dir.to_str().unwrap(),
    ]);
    let doc = json(&out);
    let rows = doc["rows"].as_array().unwrap();
    let has = |scenario: &str, depth: u64, state: &str, column: &str| {
        rows.iter().any(|r| {
            r["scenario"] == scenario
                && r["depth"] == depth
                && r["state"] == state
                && r["column"] == column
        })
    };
    for depth in [1, 2] {
        assert!(has("create8k", depth, "-", "raw"), "{out}");
        assert!(has("create8k", depth, "growing", "uring"), "{out}");
        assert!(has("randread8k", depth, "allocated", "uring"), "{out}");
        // Creates run on fresh images only; reads never on an empty image.
        assert!(!has("create8k", depth, "allocated", "uring"), "{out}");
        assert!(!has("randread8k", depth, "growing", "uring"), "{out}");
    }
    // The blocking runtime runs at depth 1 only.
    assert!(has("create8k", 1, "growing", "sync"), "{out}");
    assert!(!has("create8k", 2, "growing", "sync"), "{out}");
    // Per scenario: raw, sync and uring at depth 1; raw and uring at depth 2.
    assert_eq!(rows.len(), 2 * (3 + 2), "{out}");
    for r in rows {
        for key in ["scenario", "depth", "state", "column", "mbps", "iops"] {
            assert!(!r[key].is_null(), "{key}: {r}");
        }
        assert!(r["mbps"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["iops"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["rounds"], 2, "{r}");
        assert!(r["x_raw"].as_f64().unwrap() > 0.0, "{r}");
        let writes = r["scenario"] == "create8k";
        assert_eq!(r["syncs_per_write"].is_f64(), writes, "{r}");
    }
    assert!(doc["notes"].as_array().unwrap().is_empty(), "{out}");
    // The scratch files are gone afterwards.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}

#[test]
fn bench_table_text_and_qemu_column() {
    let sc = Scratch::new();
    let dir = sc.path("");
    let out = sc.ours_ok(&[
        "bench",
        "--size",
        "1M",
        "--seconds",
        "0.02",
        "--rounds",
        "1",
        "--scenarios",
        "randwrite8k",
        "--depths",
        "4",
        "--states",
        "backing-extl2",
        "--columns",
        "raw,smol,qemu",
        "--dir",
        dir.to_str().unwrap(),
    ]);
    assert!(out.starts_with("qcow2 bench: 1 MiB images in "), "{out}");
    assert!(
        out.contains("\nrandwrite8k: random 8 KiB writes\n"),
        "{out}"
    );
    assert!(out.contains("syncs/write"), "{out}");
    let row = |col: &str| {
        out.lines()
            .find(|l| l.split_whitespace().nth(2) == Some(col))
            .unwrap_or_else(|| panic!("no {col} row: {out}"))
            .to_owned()
    };
    assert!(row("smol").contains("backing-extl2"), "{out}");
    if common::have_qemu() {
        let q = row("qemu");
        // QEMU's own figure: no sync count, a ratio of 1 to itself.
        assert!(q.contains(" 1.00 "), "{q}");
    } else {
        assert!(out.contains("note: no qemu column"), "{out}");
    }
}

#[test]
fn bench_rejects_unknown_names() {
    let sc = Scratch::new();
    for (flag, value, message) in [
        ("--scenarios", "create8k,bogus", "unknown scenario 'bogus'"),
        ("--states", "full", "unknown state 'full'"),
        ("--columns", "tokio", "unknown column 'tokio'"),
        ("--depths", "0", "invalid depth '0'"),
    ] {
        let out = sc.ours(&["bench", flag, value]);
        assert_eq!(out.status.code(), Some(1), "{flag} {value}");
        assert!(stderr(&out).contains(message), "{flag}: {}", stderr(&out));
    }
    let out = sc.ours(&["bench", "--scenarios", "randread8k", "--states", "growing"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no cell to measure"),
        "{}",
        stderr(&out)
    );
}
