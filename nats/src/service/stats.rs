//! The `stats` answer: in mode `jetstream` the cluster's figures at the
//! top level (the live nodes' counters and gauges summed, their durations
//! merged) and the task stream's backlog; in mode `core` the answering
//! node's own. See docs/protocol.md, *Whose `stats`*.

use std::collections::BTreeMap;

use dispatcher_actors::{DispatchError, Dispatcher, ErrorInfo};
use futures::StreamExt;
use serde_json::{json, Map, Value};

use super::{unavailable, Shared};
use crate::jetstream::cluster::{Cluster, NodeFigures};

/// The reply to `stats`.
pub(super) async fn answer(
    d: &Dispatcher,
    shared: Option<&Shared>,
    cluster: &Cluster,
) -> Result<Value, ErrorInfo> {
    let info = |e: DispatchError| e.to_info();
    let stats = d.stats().await.map_err(info)?;
    let durations = d.durations().await.map_err(info)?;
    // This node's own figures are read live, the others' from their
    // latest snapshots (all read at one instant); the top level is the
    // sum of `nodes`.
    let me = d.node().as_str();
    let mut figures = cluster.figures();
    figures.retain(|f| f.node != me);
    figures.push(NodeFigures {
        node: me.to_owned(),
        seen_ms_ago: 0,
        taking_work: json!(stats.workers > 0),
        stats: json!(stats),
        durations: json!(durations),
    });
    figures.sort_by(|a, b| a.node.cmp(&b.node));
    let nodes: Vec<Value> = figures
        .iter()
        .map(|f| {
            json!({
                "node": f.node,
                "seen_ms_ago": f.seen_ms_ago,
                "stats": f.stats,
                "taking_work": f.taking_work,
            })
        })
        .collect();
    let merged = merge(&figures);
    let mut reply = json!({
        "ok": true,
        "scope": "node",
        "node": me,
        "stats": stats,
        "cluster": {"nodes": nodes.len(), "totals": counters_of(&merged)},
        "nodes": nodes,
    });
    if let Some(shared) = shared {
        reply["scope"] = json!("cluster");
        reply["stats"] = merged;
        reply["backlog"] = json!(backlog(shared).await?);
    }
    Ok(reply)
}

/// The counters and gauges of `stats`, summed over nodes.
const SUMMED: [&str; 11] = [
    "submitted",
    "completed",
    "failed",
    "cancelled",
    "timed_out",
    "rejected",
    "retried",
    "running",
    "queued",
    "workers",
    "worker_restarts",
];

/// The stats of several nodes as one: each counter and gauge summed;
/// `avg_ms` the mean of every node's attempts (each node's mean weighted by
/// its number of ended attempts, so exact); `p50_ms` and `p99_ms` read from
/// the nodes' duration distributions merged (each node's durations are
/// rounded to two significant digits, so within 5 %).
fn merge(figures: &[NodeFigures]) -> Value {
    let mut out = Map::new();
    for key in SUMMED {
        let sum: u64 = figures.iter().filter_map(|f| f.stats[key].as_u64()).sum();
        out.insert(key.to_owned(), json!(sum));
    }
    let mut buckets: BTreeMap<u64, u64> = BTreeMap::new();
    let (mut weighted, mut total) = (0.0, 0u64);
    for f in figures {
        let pairs: Vec<(u64, u64)> =
            serde_json::from_value(f.durations.clone()).unwrap_or_default();
        let count: u64 = pairs.iter().map(|(_, n)| n).sum();
        weighted += f.stats["avg_ms"].as_f64().unwrap_or(0.0) * count as f64;
        total += count;
        for (us, n) in pairs {
            *buckets.entry(us).or_default() += n;
        }
    }
    let quantile = |q: f64| -> f64 {
        let rank = ((q * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (us, n) in &buckets {
            seen += n;
            if seen >= rank {
                return *us as f64 / 1000.0;
            }
        }
        0.0
    };
    let (avg, p50, p99) = if total == 0 {
        (0.0, 0.0, 0.0)
    } else {
        (weighted / total as f64, quantile(0.5), quantile(0.99))
    };
    out.insert("avg_ms".to_owned(), json!(avg));
    out.insert("p50_ms".to_owned(), json!(p50));
    out.insert("p99_ms".to_owned(), json!(p99));
    Value::Object(out)
}

/// The summed counters of merged stats (`cluster.totals`).
fn counters_of(merged: &Value) -> Value {
    let totals: Map<String, Value> = SUMMED
        .iter()
        .map(|k| ((*k).to_owned(), merged[*k].clone()))
        .collect();
    Value::Object(totals)
}

/// What the task stream holds, per subject (kind and priority), served or
/// not: `messages` stored (waiting or delivered and unacknowledged), and,
/// where a node made the consumer of that subject, its `consumer` name,
/// `pending` (not delivered yet) and `unacknowledged`; without one,
/// `consumer` is null and every message is pending.
async fn backlog(shared: &Shared) -> Result<Vec<Value>, ErrorInfo> {
    let mut by_subject: BTreeMap<String, Value> = BTreeMap::new();
    let mut counts = shared
        .tasks
        .info_with_subjects(shared.subjects.tasks_all())
        .await
        .map_err(|e| unavailable("reading the task stream", e))?;
    while let Some(entry) = counts.next().await {
        let (subject, messages) = entry.map_err(|e| unavailable("reading the task stream", e))?;
        by_subject.insert(
            subject.clone(),
            json!({
                "subject": subject,
                "kind": shared.subjects.token(&subject, 1),
                "priority": shared.subjects.token(&subject, 2),
                "messages": messages,
                "consumer": null,
                "pending": messages,
                "unacknowledged": 0,
            }),
        );
    }
    let mut consumers = shared.tasks.consumers();
    while let Some(info) = consumers.next().await {
        let info = info.map_err(|e| unavailable("reading the consumers", e))?;
        let subject = info.config.filter_subject.clone();
        let entry = by_subject.entry(subject.clone()).or_insert_with(|| {
            json!({
                "subject": subject,
                "kind": shared.subjects.token(&subject, 1),
                "priority": shared.subjects.token(&subject, 2),
                "messages": 0,
            })
        });
        entry["consumer"] = json!(info.name);
        entry["pending"] = json!(info.num_pending);
        entry["unacknowledged"] = json!(info.num_ack_pending);
    }
    Ok(by_subject.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, stats: Value, durations: Value) -> NodeFigures {
        NodeFigures {
            node: name.into(),
            seen_ms_ago: 0,
            stats,
            durations,
            taking_work: json!(true),
        }
    }

    #[test]
    fn counters_are_summed_and_durations_merged() {
        // a: 3 attempts of 1 ms (mean 1); b: 1 attempt of 100 ms.
        let a = node(
            "a",
            json!({"completed": 3, "workers": 4, "avg_ms": 1.0, "p50_ms": 1.0, "p99_ms": 1.0}),
            json!([[1000, 3]]),
        );
        let b = node(
            "b",
            json!({"completed": 1, "failed": 2, "workers": 2, "avg_ms": 100.0}),
            json!([[100_000, 1]]),
        );
        let m = merge(&[a, b]);
        assert_eq!(m["completed"], 4);
        assert_eq!(m["failed"], 2);
        assert_eq!(m["workers"], 6);
        assert_eq!(m["avg_ms"], 103.0 / 4.0);
        assert_eq!(m["p50_ms"], 1.0);
        assert_eq!(m["p99_ms"], 100.0);
        assert_eq!(counters_of(&m)["completed"], 4);
        assert!(counters_of(&m).get("avg_ms").is_none());
        let none = merge(&[]);
        assert_eq!(
            (none["completed"].as_u64(), none["p99_ms"].as_f64()),
            (Some(0), Some(0.0))
        );
    }
}
