//! The project's targets for `dispatcher bench` (docs/performance.md):
//! for each figure, a bound that must hold and one to aim for, checked on
//! the run's own medians, so that a run says whether it meets them.
//!
//! Ratios are the dispatcher's figure over the ceiling's of the same run;
//! the memory bounds are the node's resident set in MiB.

use dispatcher_nats::Mode;

use super::BenchArgs;
use serde_json::{json, Value};

/// Which way a figure is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Better {
    Higher,
    Lower,
}

/// One target: a figure (a key of the bench's figures), its bounds.
#[derive(Clone, Copy, Debug)]
pub(super) struct Goal {
    /// The figure's key in the bench's JSON.
    pub(super) key: &'static str,
    /// How the figure reads in the table.
    pub(super) label: &'static str,
    better: Better,
    must: f64,
    aim: f64,
}

/// How a value fares against a goal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// The aim holds (and so the must).
    Aim,
    /// The must holds, the aim does not.
    Must,
    /// The must does not hold.
    Missed,
    /// No value to judge.
    Unknown,
}

impl Verdict {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Verdict::Aim => "aim met",
            Verdict::Must => "must met",
            Verdict::Missed => "MUST MISSED",
            Verdict::Unknown => "-",
        }
    }
}

impl Goal {
    const fn ratio_at_least(key: &'static str, label: &'static str, must: f64, aim: f64) -> Self {
        Self {
            key,
            label,
            better: Better::Higher,
            must,
            aim,
        }
    }

    const fn at_most(key: &'static str, label: &'static str, must: f64, aim: f64) -> Self {
        Self {
            key,
            label,
            better: Better::Lower,
            must,
            aim,
        }
    }

    /// How `value` fares.
    pub(super) fn judge(&self, value: Option<f64>) -> Verdict {
        let Some(v) = value else {
            return Verdict::Unknown;
        };
        let holds = |bound: f64| match self.better {
            Better::Higher => v >= bound,
            Better::Lower => v <= bound,
        };
        if holds(self.aim) {
            Verdict::Aim
        } else if holds(self.must) {
            Verdict::Must
        } else {
            Verdict::Missed
        }
    }

    /// `>= 0.25` or `<= 3`.
    pub(super) fn bound(&self, bound_of: fn(&Goal) -> f64) -> String {
        let sign = match self.better {
            Better::Higher => ">=",
            Better::Lower => "<=",
        };
        format!("{sign} {}", bound_of(self))
    }

    pub(super) fn must(&self) -> f64 {
        self.must
    }

    pub(super) fn aim(&self) -> f64 {
        self.aim
    }

    /// The goal and how each of `values` fares, as JSON.
    pub(super) fn check(self, values: &[(&str, Option<f64>)]) -> Value {
        let mut out = json!({
            "figure": self.key,
            "label": self.label,
            "must": self.bound(Goal::must),
            "aim": self.bound(Goal::aim),
        });
        for (name, value) in values {
            let verdict = self.judge(*value);
            out[*name] = json!({
                "value": value,
                "must_met": matches!(verdict, Verdict::Aim | Verdict::Must),
                "aim_met": verdict == Verdict::Aim,
            });
        }
        out
    }
}

/// Whether the run's settings are those the ratio targets are set for:
/// 64 tasks in flight, 10 workers, 200 B payloads.
pub(super) fn apply_to(args: &BenchArgs) -> bool {
    args.window == 64 && args.workers == 10 && args.payload_bytes == 200
}

/// What the table says instead of the targets under other settings.
pub(super) const NOT_JUDGED: &str =
    "targets: judged only at --window 64 --workers 10 --payload-bytes 200 (the defaults)";

/// The ratio targets of a mode (no-op `echo` tasks, 64 in flight for
/// throughput, one at a time for latency).
pub(super) fn ratios(mode: Mode) -> [Goal; 3] {
    match mode {
        Mode::Core => [
            Goal::ratio_at_least("throughput_per_s", "throughput, window 64", 0.25, 0.5),
            Goal::at_most("p50_us", "p50, one at a time", 3.0, 1.5),
            Goal::at_most("p99_us", "p99, one at a time", 4.0, 2.0),
        ],
        Mode::JetStream => [
            Goal::ratio_at_least("throughput_per_s", "throughput, window 64", 0.25, 0.5),
            Goal::at_most("p50_us", "p50, one at a time", 4.0, 2.0),
            Goal::at_most("p99_us", "p99, one at a time", 7.0, 3.0),
        ],
    }
}

/// Node RSS with a million tasks waiting in the stream (MiB).
pub(super) const BACKLOG_RSS: Goal = Goal::at_most(
    "backlog_rss_mib",
    "node RSS, 1 000 000 tasks waiting",
    100.0,
    50.0,
);

/// Node RSS with 100 000 finished records kept (MiB).
pub(super) const RECORDS_RSS: Goal = Goal::at_most(
    "records_rss_mib",
    "node RSS, 100 000 finished records",
    200.0,
    100.0,
);

/// How much the RSS may grow from the first sample to the last of a
/// backlog run and still count as flat: 10 %, or 2 MiB on a small one.
pub(super) fn flat(first: f64, last: f64) -> bool {
    last <= first + (first * 0.1).max(2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_follow_the_bounds_either_way() {
        let [throughput, p50, _] = ratios(Mode::JetStream);
        assert_eq!(throughput.judge(Some(0.6)), Verdict::Aim);
        assert_eq!(throughput.judge(Some(0.3)), Verdict::Must);
        assert_eq!(throughput.judge(Some(0.2)), Verdict::Missed);
        assert_eq!(p50.judge(Some(1.9)), Verdict::Aim);
        assert_eq!(p50.judge(Some(3.9)), Verdict::Must);
        assert_eq!(p50.judge(Some(4.1)), Verdict::Missed);
        assert_eq!(p50.judge(None), Verdict::Unknown);
        let j = throughput.check(&[("direct", Some(0.3))]);
        assert_eq!(j["must"], ">= 0.25");
        assert_eq!(j["direct"]["must_met"], true);
        assert_eq!(j["direct"]["aim_met"], false);
    }

    #[test]
    fn flat_allows_a_little_growth() {
        assert!(flat(15.0, 16.5));
        assert!(!flat(15.0, 20.0));
        assert!(flat(40.0, 43.0));
        assert!(!flat(40.0, 45.0));
    }
}
