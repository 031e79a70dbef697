//! `bench` runs every scenario and reports machine-readable results.

mod common;

use common::{json, Scratch};

#[test]
fn bench_json_covers_every_scenario() {
    let sc = Scratch::new();
    let dir = sc.path("");
    let out = sc.ours_ok(&[
        "bench",
        "--json",
        "--size",
        "1M",
        "--seconds",
        "0.02",
        "--dir",
        dir.to_str().unwrap(),
    ]);
    let doc = json(&out);
    let results = doc["results"].as_array().unwrap();
    // 3 block sizes x (4 scenarios for raw and full + 2 write scenarios for the growing image).
    assert_eq!(results.len(), 3 * (4 + 4 + 2), "{out}");
    for r in results {
        assert!(r["ops"].as_u64().unwrap() > 0, "{r}");
        assert!(r["mb_per_s"].as_f64().unwrap() > 0.0, "{r}");
        let writes = r["scenario"].as_str().unwrap().ends_with("write");
        assert_eq!(r["fdatasyncs"].is_u64(), writes, "{r}");
        assert_eq!(r["ratio_to_raw"].is_f64(), r["image"] != "raw", "{r}");
    }
    // The scratch images are gone afterwards.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}

#[test]
fn bench_table_has_ratios() {
    let sc = Scratch::new();
    let dir = sc.path("");
    let out = sc.ours_ok(&[
        "bench",
        "-t",
        "writeback",
        "--size",
        "512k",
        "--seconds",
        "0.01",
        "--dir",
        dir.to_str().unwrap(),
    ]);
    assert!(
        out.starts_with("qcow2 bench: 512 KiB images, 0.01 s per run, cache=writeback"),
        "{out}"
    );
    assert!(out.contains("x raw"));
    assert!(
        out.lines()
            .any(|l| l.starts_with("rand-write") && l.contains("qcow2-grow")),
        "{out}"
    );
}

#[test]
fn bench_runs_every_runtime_at_every_depth() {
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
        "0.01",
        "--runtime",
        "sync,smol,uring",
        "--depths",
        "1,4",
        "--dir",
        dir.to_str().unwrap(),
    ]);
    let doc = json(&out);
    let results = doc["results"].as_array().unwrap();
    let count = |image: &str, runtime: Option<&str>, depth: u64| {
        results
            .iter()
            .filter(|r| {
                r["image"] == image && r["runtime"].as_str() == runtime && r["depth"] == depth
            })
            .count()
    };
    for depth in [1, 4] {
        // 3 block sizes x 4 scenarios for raw and full, x 2 write scenarios growing.
        assert_eq!(count("raw", None, depth), 12, "{out}");
        for rt in ["smol", "uring"] {
            assert_eq!(
                count("qcow2-full", Some(rt), depth),
                12,
                "{rt} {depth}: {out}"
            );
            assert_eq!(
                count("qcow2-grow", Some(rt), depth),
                6,
                "{rt} {depth}: {out}"
            );
        }
    }
    // The blocking runtime runs one request at a time: depth 1 only.
    assert_eq!(count("qcow2-full", Some("sync"), 1), 12, "{out}");
    assert_eq!(count("qcow2-full", Some("sync"), 4), 0, "{out}");
    for r in results {
        assert!(r["ops"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(r["ratio_to_raw"].is_f64(), r["image"] != "raw", "{r}");
    }
    let bad = sc.ours(&["bench", "--runtime", "tokio"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        common::stderr(&bad).contains("Unknown runtime 'tokio' (expected sync, smol or uring)"),
        "{}",
        common::stderr(&bad)
    );
}
