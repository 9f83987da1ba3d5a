//! `dispatcher bench` end to end: a short run with its own private
//! nats-server (no --nats-url), both modes, every column; checks the exit
//! status and the JSON it writes, never the timings.

use std::process::Command;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_dispatcher");

#[test]
fn a_short_bench_reports_every_column() {
    let json = tempfile::NamedTempFile::new().expect("temp file");
    let out = Command::new(BIN)
        .args([
            "bench", "--tasks", "300", "--reps", "1", "--window", "64", "--json",
        ])
        .arg(json.path())
        // The bench must start its own server: nothing may point it elsewhere.
        .env_remove("DISPATCH_BENCH_NATS_URL")
        .env_remove("DISPATCH_CONFIG")
        .output()
        .expect("run dispatcher bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains("mode core") && stdout.contains("mode jetstream"),
        "{stdout}"
    );

    let doc: Value = serde_json::from_slice(&std::fs::read(json.path()).expect("the JSON file"))
        .expect("valid JSON");
    assert_eq!(doc["settings"]["tasks"], 300);
    assert!(
        doc["machine"]["nproc"].as_u64().is_some_and(|n| n > 0),
        "{doc}"
    );
    assert!(doc["machine"]["nats_server"].is_string(), "{doc}");
    for mode in ["core", "jetstream"] {
        let columns = &doc["modes"][mode]["columns"];
        for column in ["ceiling", "direct", "submit"] {
            let figures = &columns[column];
            let number = |key: &str| {
                figures[key]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{mode} {column} {key}: {figures}"))
            };
            assert!(
                number("throughput_per_s") > 0.0,
                "{mode} {column}: {figures}"
            );
            let (p50, p99, p999) = (number("p50_us"), number("p99_us"), number("p999_us"));
            assert!(
                0.0 < p50 && p50 <= p99 && p99 <= p999,
                "{mode} {column}: {figures}"
            );
            assert!(number("p99_window_us") > 0.0, "{mode} {column}: {figures}");
            if column != "ceiling" {
                assert!(number("rss_mib") > 0.0, "{mode} {column}: {figures}");
                assert!(
                    number("cpu_s_per_1000") >= 0.0,
                    "{mode} {column}: {figures}"
                );
            }
        }
        let throughput = doc["modes"][mode]["figures"]
            .as_array()
            .and_then(|f| f.iter().find(|f| f["figure"] == "throughput_per_s"))
            .expect("a throughput figure");
        for ratio in ["ratio_direct", "ratio_submit"] {
            assert!(
                throughput[ratio].as_f64().is_some_and(|r| r > 0.0),
                "{mode} {ratio}: {throughput}"
            );
        }
        assert_eq!(
            throughput["reps"]["direct"].as_array().map(Vec::len),
            Some(1)
        );
        // The project's targets, judged on the run's own ratios.
        let targets = doc["modes"][mode]["targets"].as_array().expect("targets");
        let figures: Vec<_> = targets.iter().map(|t| t["figure"].clone()).collect();
        assert_eq!(figures, ["throughput_per_s", "p50_us", "p99_us"], "{mode}");
        let judged = &targets[0]["direct"];
        assert_eq!(judged["value"], throughput["ratio_direct"], "{mode}");
        assert!(judged["must_met"].is_boolean() && judged["aim_met"].is_boolean());
    }
    assert!(
        stdout.contains("targets (ratio to the ceiling)"),
        "{stdout}"
    );
}

#[test]
fn bench_explains_itself() {
    let out = Command::new(BIN)
        .args(["bench", "--help"])
        .output()
        .expect("run dispatcher bench --help");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--nats-url",
        "--tasks",
        "--window",
        "--reps",
        "--mode",
        "--json",
    ] {
        assert!(text.contains(flag), "{flag}: {text}");
    }
    assert!(text.contains("private nats-server"), "{text}");
}

#[test]
fn the_scaling_run_reports_each_node_count() {
    let json = tempfile::NamedTempFile::new().expect("temp file");
    let out = Command::new(BIN)
        .args([
            "bench",
            "--scaling",
            "2",
            "--scaling-tasks",
            "100",
            "--json",
        ])
        .arg(json.path())
        .env_remove("DISPATCH_BENCH_NATS_URL")
        .env_remove("DISPATCH_CONFIG")
        .output()
        .expect("run dispatcher bench --scaling");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let doc: Value = serde_json::from_slice(&std::fs::read(json.path()).expect("the JSON file"))
        .expect("valid JSON");
    let runs = doc["scaling"]["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2, "{doc}");
    for (i, run) in runs.iter().enumerate() {
        assert_eq!(run["nodes"], i as u64 + 1);
        assert_eq!(run["tasks"], 100 * (i as u64 + 1));
        assert!(
            run["tasks_per_s"].as_f64().is_some_and(|r| r > 0.0),
            "{doc}"
        );
    }
}

#[test]
fn the_memory_run_reports_both_figures() {
    let json = tempfile::NamedTempFile::new().expect("temp file");
    let out = Command::new(BIN)
        .args([
            "bench",
            "--memory",
            "--memory-backlog",
            "2000",
            "--memory-records",
            "500",
            "--json",
        ])
        .arg(json.path())
        .env_remove("DISPATCH_BENCH_NATS_URL")
        .env_remove("DISPATCH_CONFIG")
        .output()
        .expect("run dispatcher bench --memory");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let doc: Value = serde_json::from_slice(&std::fs::read(json.path()).expect("the JSON file"))
        .expect("valid JSON");
    let memory = &doc["memory"];
    assert_eq!(memory["backlog"]["tasks"], 2000);
    assert_eq!(
        memory["backlog"]["rss_samples_mib"]
            .as_array()
            .map(Vec::len),
        Some(10)
    );
    assert!(
        memory["backlog"]["peak_rss_mib"]
            .as_f64()
            .is_some_and(|m| m > 0.0),
        "{doc}"
    );
    assert_eq!(memory["records"]["tasks"], 500);
    assert!(
        memory["records"]["rss_mib"]
            .as_f64()
            .is_some_and(|m| m > 0.0),
        "{doc}"
    );
}
