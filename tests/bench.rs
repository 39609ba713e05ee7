//! `concord bench --quick --json`: the run finishes, and the JSON holds every figure with a
//! positive, finite value (timings are never asserted: the machine is noisy).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;

const FIGURES: [&str; 20] = [
    "ceiling.sled_puts_per_second",
    "ceiling.quic_rtt_us",
    "ceiling.automerge_changes_per_second",
    "writes.one_node_per_second",
    "memory.rss_bytes_per_record",
    "disk.bytes_per_record",
    "bootstrap.seconds",
    "bootstrap.records_per_second",
    "writes.three_nodes_per_second",
    "latency.1k.p50_ms",
    "latency.1k.p99_ms",
    "latency.1k.max_ms",
    "latency.5k.p50_ms",
    "latency.5k.p99_ms",
    "latency.5k.max_ms",
    "latency_yrs.5k.p50_ms",
    "latency_yrs.5k.p99_ms",
    "latency_yrs.5k.max_ms",
    "catch_up.new_records_per_second",
    "catch_up.both_changed_records_per_second",
];

#[test]
fn quick_bench_reports_every_figure() {
    let directory = tempfile::Builder::new().prefix("concord-bench-test-").tempdir().unwrap();
    let path = directory.path().join("bench.json");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["bench", "--quick", "--records", "2000", "--json"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("replication latency p99 at 5k/s"), "{stdout}");

    let report: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let figures = report["figures"].as_array().unwrap();
    for key in FIGURES {
        let figure = figures.iter().find(|figure| figure["key"] == key).unwrap_or_else(|| panic!("{key} missing"));
        let value = figure["value"].as_f64().unwrap_or_else(|| panic!("{key} not measured: {figure}"));
        assert!(value.is_finite() && value > 0.0, "{key}: {value}");
    }
    for figure in figures {
        if let Some(ratio) = figure["ratio"].as_f64() {
            assert!(ratio.is_finite() && ratio > 0.0, "{figure}");
        }
    }
    let ratioed =
        ["writes.one_node_per_second", "writes.three_nodes_per_second", "latency.5k.p99_ms", "latency_yrs.5k.p99_ms"];
    for key in ratioed {
        let figure = figures.iter().find(|figure| figure["key"] == key).unwrap();
        assert!(figure["ratio"].as_f64().is_some(), "{key} has no ratio: {figure}");
    }
    assert!(report["machine"]["cores"].as_u64().unwrap() >= 1);
    assert_eq!(report["settings"]["quick"], Value::Bool(true));
    // The nodes ran as processes of their own: the memory figure is a node's, and each latency
    // phase says how late its writes went out and where the machine's CPU went.
    let note = |key: &str| {
        let figure = figures.iter().find(|figure| figure["key"] == key).unwrap();
        figure["note"].as_str().unwrap_or_else(|| panic!("{key} has no note")).to_owned()
    };
    assert!(
        note("memory.rss_bytes_per_record").starts_with("the node process's VmRSS"),
        "{}",
        note("memory.rss_bytes_per_record")
    );
    for key in ["latency.1k.p50_ms", "latency.5k.p50_ms", "latency_yrs.5k.p50_ms"] {
        let note = note(key);
        for part in [
            "after the scheduled time",
            "group commits on the writer",
            "CPU while writing: node-a",
            "the load generator",
            "busy",
        ] {
            assert!(note.contains(part), "{key}'s note lacks {part:?}: {note}");
        }
        assert!(!note.contains("? cores"), "{key}: a CPU time was not read: {note}");
    }
}
