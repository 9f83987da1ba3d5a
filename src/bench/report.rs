//! The tables `dispatcher bench` prints and the JSON it writes: each
//! figure's median over the repetitions, its ceiling and the ratios, and
//! the machine the run was on.

use std::process::Command;

use dispatcher_nats::Mode;
use serde_json::{json, Value};

use super::goals::{self, Verdict};
use super::{BenchArgs, Column, Figures};

/// A row of the table: a figure, its label and how to print it.
struct Row {
    key: &'static str,
    label: String,
    get: fn(&Figures) -> Option<f64>,
    format: fn(f64) -> String,
}

fn rows(window: u64) -> Vec<Row> {
    let ms = |us: f64| {
        let ms = us / 1000.0;
        if ms < 10.0 {
            format!("{ms:.3}")
        } else {
            format!("{ms:.1}")
        }
    };
    vec![
        Row {
            key: "throughput_per_s",
            label: format!("throughput, window {window} (tasks/s)"),
            get: |f| f.throughput_per_s,
            format: |v| format!("{v:.0}"),
        },
        Row {
            key: "p50_us",
            label: "p50, one at a time (ms)".into(),
            get: |f| f.p50_us,
            format: ms,
        },
        Row {
            key: "p99_us",
            label: "p99, one at a time (ms)".into(),
            get: |f| f.p99_us,
            format: ms,
        },
        Row {
            key: "p999_us",
            label: "p99.9, one at a time (ms)".into(),
            get: |f| f.p999_us,
            format: ms,
        },
        Row {
            key: "p99_window_us",
            label: format!("p99, window {window} (ms)"),
            get: |f| f.p99_window_us,
            format: ms,
        },
        Row {
            key: "cpu_s_per_1000",
            label: "CPU s per 1000 tasks".into(),
            get: |f| f.cpu_s_per_1000,
            format: |v| format!("{v:.3}"),
        },
        Row {
            key: "rss_mib",
            label: "peak RSS (MiB)".into(),
            get: |f| f.rss_mib,
            format: |v| format!("{v:.1}"),
        },
    ]
}

/// What `nproc` says (else the parallelism the process may use).
pub(super) fn nproc() -> u64 {
    Command::new("nproc")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(0, |n| n.get() as u64))
}

/// The CPU model from `/proc/cpuinfo`.
pub(super) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// The mode's table, and its JSON: medians per column, and per figure the
/// ceiling, the ratios and every repetition.
pub(super) fn summarise(args: &BenchArgs, mode: Mode, reps: &[Vec<Figures>]) -> (String, Value) {
    let rows = rows(args.window);
    let medians: Vec<Figures> = reps
        .iter()
        .map(|runs| {
            let m =
                |get: fn(&Figures) -> Option<f64>| median(runs.iter().filter_map(get).collect());
            Figures {
                throughput_per_s: m(|f| f.throughput_per_s),
                p50_us: m(|f| f.p50_us),
                p99_us: m(|f| f.p99_us),
                p999_us: m(|f| f.p999_us),
                p99_window_us: m(|f| f.p99_window_us),
                cpu_s_per_1000: m(|f| f.cpu_s_per_1000),
                rss_mib: m(|f| f.rss_mib),
            }
        })
        .collect();
    let [ceiling, direct, submit] = [&medians[0], &medians[1], &medians[2]];
    let ratio = |row: &Row, f: &Figures| match ((row.get)(f), (row.get)(ceiling)) {
        (Some(d), Some(c)) if c > 0.0 => Some(d / c),
        _ => None,
    };
    let cell = |v: Option<f64>, format: fn(f64) -> String| v.map_or_else(|| "-".to_owned(), format);
    let ceiling_kind = match mode {
        Mode::Core => "bare core NATS responder",
        Mode::JetStream => "bare JetStream work queue and pull consumer",
    };
    let mut table = format!(
        "mode {} (ceiling: {ceiling_kind})\n{:<34}{:>12}{:>21}{:>21}{:>16}{:>16}\n",
        mode.as_str(),
        "figure",
        "ceiling",
        Column::Direct.title(),
        Column::Submit.title(),
        "direct/ceiling",
        "submit/ceiling"
    );
    let mut figures = Vec::new();
    for row in &rows {
        let ratios = (ratio(row, direct), ratio(row, submit));
        table.push_str(&format!(
            "{:<34}{:>12}{:>21}{:>21}{:>16}{:>16}\n",
            row.label,
            cell((row.get)(ceiling), row.format),
            cell((row.get)(direct), row.format),
            cell((row.get)(submit), row.format),
            cell(ratios.0, |v| format!("{v:.2}")),
            cell(ratios.1, |v| format!("{v:.2}")),
        ));
        let reps_of = |i: usize| reps[i].iter().map(row.get).collect::<Vec<_>>();
        figures.push(json!({
            "figure": row.key,
            "label": row.label,
            "ceiling": (row.get)(ceiling),
            "direct": (row.get)(direct),
            "submit": (row.get)(submit),
            "ratio_direct": ratios.0,
            "ratio_submit": ratios.1,
            "reps": {
                Column::Ceiling.as_str(): reps_of(0),
                Column::Direct.as_str(): reps_of(1),
                Column::Submit.as_str(): reps_of(2),
            },
        }));
    }
    let mut checks = Vec::new();
    if goals::apply_to(args) {
        table.push_str(&format!(
            "\ntargets (ratio to the ceiling)\n{:<34}{:>12}{:>12}{:>21}{:>21}\n",
            "figure", "must", "aim", "direct", "submit"
        ));
    } else {
        table.push_str(&format!("\n{}\n", goals::NOT_JUDGED));
    }
    for goal in goals::ratios(mode)
        .into_iter()
        .filter(|_| goals::apply_to(args))
    {
        let row = rows
            .iter()
            .find(|r| r.key == goal.key)
            .expect("every goal is a figure of the table");
        let (d, s) = (ratio(row, direct), ratio(row, submit));
        let verdict = |v: Option<f64>| {
            let judged = goal.judge(v);
            match (v, judged) {
                (Some(v), _) => format!("{v:.2} {}", judged.as_str()),
                (None, _) => Verdict::Unknown.as_str().to_owned(),
            }
        };
        table.push_str(&format!(
            "{:<34}{:>12}{:>12}{:>21}{:>21}\n",
            goal.label,
            goal.bound(goals::Goal::must),
            goal.bound(goals::Goal::aim),
            verdict(d),
            verdict(s),
        ));
        checks.push(goal.check(&[("direct", d), ("submit", s)]));
    }
    let report = json!({
        "ceiling": ceiling_kind,
        "targets": checks,
        "columns": {
            Column::Ceiling.as_str(): ceiling,
            Column::Direct.as_str(): direct,
            Column::Submit.as_str(): submit,
        },
        "figures": figures,
    });
    (table, report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(median(Vec::new()), None);
    }
}
