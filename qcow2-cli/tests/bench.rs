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
