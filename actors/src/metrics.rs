//! The Metrics actor: counts what happens to tasks and keeps a histogram of
//! attempt durations. Gauges (running, queued, workers) belong to the
//! Supervisor and are merged in by the [`Dispatcher`](crate::Dispatcher).

use std::time::Duration;

use actix::{Actor, Context, Handler, Message, MessageResult};
use hdrhistogram::Histogram;

use crate::event::TaskEventName;
use crate::record::Stats;

/// Counters and the duration histogram.
pub struct Metrics {
    counts: Counts,
    /// Attempt durations in microseconds.
    durations: Histogram<u64>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    submitted: u64,
    completed: u64,
    failed: u64,
    cancelled: u64,
    timed_out: u64,
    rejected: u64,
    retried: u64,
}

/// Longest duration the histogram tells apart (24 h, in µs); longer ones
/// count as this.
const MAX_TRACKED_US: u64 = 86_400_000_000;

impl Metrics {
    /// Zeroed metrics.
    pub fn new() -> Self {
        Self {
            counts: Counts::default(),
            durations: Histogram::new_with_bounds(1, MAX_TRACKED_US, 3)
                .expect("histogram bounds are constants and valid"),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Actor for Metrics {
    type Context = Context<Self>;
}

/// A task event happened; `duration` is the attempt's, when it ended one.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Observe {
    /// Which event.
    pub event: TaskEventName,
    /// How long the attempt took, for events that end one.
    pub duration: Option<Duration>,
}

impl Handler<Observe> for Metrics {
    type Result = ();

    fn handle(&mut self, msg: Observe, _ctx: &mut Context<Self>) {
        let c = &mut self.counts;
        match msg.event {
            TaskEventName::Accepted => c.submitted += 1,
            TaskEventName::Rejected => c.rejected += 1,
            TaskEventName::Retrying => c.retried += 1,
            TaskEventName::Completed => c.completed += 1,
            TaskEventName::Failed => c.failed += 1,
            TaskEventName::TimedOut => c.timed_out += 1,
            TaskEventName::Cancelled => c.cancelled += 1,
            TaskEventName::Started | TaskEventName::Progress => {}
        }
        if let Some(d) = msg.duration {
            let us = (d.as_micros() as u64).clamp(1, MAX_TRACKED_US);
            self.durations.saturating_record(us);
        }
    }
}

/// The counters and durations (gauges left at zero).
#[derive(Debug, Message)]
#[rtype(result = "Stats")]
pub struct GetStats;

impl Handler<GetStats> for Metrics {
    type Result = MessageResult<GetStats>;

    fn handle(&mut self, _msg: GetStats, _ctx: &mut Context<Self>) -> Self::Result {
        let c = self.counts;
        let h = &self.durations;
        let ms = |us: f64| us / 1000.0;
        let (avg, p50, p99) = if h.is_empty() {
            (0.0, 0.0, 0.0)
        } else {
            (
                ms(h.mean()),
                ms(h.value_at_quantile(0.5) as f64),
                ms(h.value_at_quantile(0.99) as f64),
            )
        };
        MessageResult(Stats {
            submitted: c.submitted,
            completed: c.completed,
            failed: c.failed,
            cancelled: c.cancelled,
            timed_out: c.timed_out,
            rejected: c.rejected,
            retried: c.retried,
            avg_ms: avg,
            p50_ms: p50,
            p99_ms: p99,
            ..Stats::default()
        })
    }
}

/// The attempt durations as `(µs, count)` pairs, ascending, each
/// duration rounded to two significant digits (at most 5 % off), so that
/// a node can publish them compactly and the durations of several nodes
/// can be merged into one distribution.
#[derive(Debug, Message)]
#[rtype(result = "Vec<(u64, u64)>")]
pub struct GetDurations;

impl Handler<GetDurations> for Metrics {
    type Result = MessageResult<GetDurations>;

    fn handle(&mut self, _msg: GetDurations, _ctx: &mut Context<Self>) -> Self::Result {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for v in self.durations.iter_recorded() {
            let us = round_two_digits(v.value_iterated_to());
            match out.last_mut() {
                Some((last, n)) if *last == us => *n += v.count_at_value(),
                _ => out.push((us, v.count_at_value())),
            }
        }
        MessageResult(out)
    }
}

/// `v` rounded to two significant digits (`1234` → `1200`).
fn round_two_digits(v: u64) -> u64 {
    let mut step = 1;
    while v / step >= 100 {
        step *= 10;
    }
    (v + step / 2) / step * step
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix::test]
    async fn counts_events_and_durations() {
        let m = Metrics::new().start();
        let observe = |event, ms: Option<u64>| Observe {
            event,
            duration: ms.map(Duration::from_millis),
        };
        m.do_send(observe(TaskEventName::Accepted, None));
        m.do_send(observe(TaskEventName::Accepted, None));
        m.do_send(observe(TaskEventName::Retrying, Some(10)));
        m.do_send(observe(TaskEventName::Completed, Some(20)));
        m.do_send(observe(TaskEventName::Failed, Some(30)));
        m.do_send(observe(TaskEventName::Rejected, None));
        let s = m.send(GetStats).await.unwrap();
        assert_eq!(
            (s.submitted, s.completed, s.failed, s.retried, s.rejected),
            (2, 1, 1, 1, 1)
        );
        assert!((s.avg_ms - 20.0).abs() < 0.1, "{}", s.avg_ms);
        assert!((s.p50_ms - 20.0).abs() < 0.1, "{}", s.p50_ms);
        assert!((s.p99_ms - 30.0).abs() < 0.1, "{}", s.p99_ms);
        let d = m.send(GetDurations).await.unwrap();
        assert_eq!(d, vec![(10_000, 1), (20_000, 1), (30_000, 1)]);
        assert_eq!(round_two_digits(1234), 1200);
        assert_eq!(round_two_digits(99), 99);
        assert_eq!(round_two_digits(995), 1000);
    }
}
