//! `dispatcher bench --memory`: the node's resident memory (a) while a
//! large backlog waits in the stream, and (b) once many finished task
//! records are kept in its registry. Both should stay bounded: a node
//! pulls only as far ahead as its queue allows, and the registry is capped
//! by `--max-records` (100 000).

use std::time::Instant;

use anyhow::Context as _;
use async_nats::jetstream;
use dispatcher_actors::{Priority, TaskEventName};
use dispatcher_nats::{Mode, Subjects};
use serde_json::{json, Value};

use super::feed::{await_completed, clean_up, publish, CHUNK};
use super::goals;
use super::node::NodeProcess;
use super::BenchArgs;
/// RSS samples taken while the backlog is published.
const SAMPLES: u64 = 10;

fn mib(kib: Option<u64>) -> f64 {
    kib.unwrap_or(0) as f64 / 1024.0
}

/// Runs both measurements; prints them and answers them as JSON.
pub(super) async fn run(args: &BenchArgs, url: &str) -> anyhow::Result<Value> {
    let client = super::connect(url, "dispatcher bench --memory").await?;
    let backlog = waiting(args, url, &client).await.context("backlog")?;
    let records = finished(args, url, &client).await.context("records")?;
    println!(
        "\nmemory of one jetstream node ({} worker(s))",
        args.workers
    );
    println!(
        "  {} tasks waiting in the stream: RSS {:.1} MiB after the first {}, {:.1} MiB at the end, peak {:.1} MiB",
        backlog["tasks"],
        backlog["first_rss_mib"].as_f64().unwrap_or(0.0),
        backlog["tasks"].as_u64().unwrap_or(0) / SAMPLES,
        backlog["last_rss_mib"].as_f64().unwrap_or(0.0),
        backlog["peak_rss_mib"].as_f64().unwrap_or(0.0),
    );
    println!(
        "  {} finished tasks (records kept: {}): RSS {:.1} MiB, peak {:.1} MiB",
        records["tasks"],
        records["records_kept"],
        records["rss_mib"].as_f64().unwrap_or(0.0),
        records["peak_rss_mib"].as_f64().unwrap_or(0.0),
    );
    // The targets hold for the default sizes; other sizes are reported, not
    // judged.
    let mut targets = Vec::new();
    if args.memory_backlog == 1_000_000 && args.memory_records == 100_000 {
        let peak = |v: &Value| v["peak_rss_mib"].as_f64();
        let first = backlog["first_rss_mib"].as_f64().unwrap_or(0.0);
        let last = backlog["last_rss_mib"].as_f64().unwrap_or(f64::INFINITY);
        let flat = goals::flat(first, last);
        println!("\ntargets (MiB)");
        for (goal, value) in [
            (goals::BACKLOG_RSS, peak(&backlog)),
            (goals::RECORDS_RSS, peak(&records)),
        ] {
            let mut verdict = goal.judge(value).as_str().to_owned();
            let mut check = goal.check(&[("node", value)]);
            if goal.key == goals::BACKLOG_RSS.key {
                verdict.push_str(if flat { ", flat" } else { ", NOT FLAT" });
                check["flat"] = json!(flat);
            }
            println!(
                "  {:<40} must {:<10} aim {:<10} {:.1}: {verdict}",
                goal.label,
                goal.bound(goals::Goal::must),
                goal.bound(goals::Goal::aim),
                value.unwrap_or(0.0),
            );
            targets.push(check);
        }
    }
    Ok(json!({"backlog": backlog, "records": records, "targets": targets}))
}

/// Publishes `--memory-backlog` long `sleep` tasks: the node holds a few,
/// the rest wait in the stream; RSS is sampled as the backlog grows.
async fn waiting(
    args: &BenchArgs,
    url: &str,
    client: &async_nats::Client,
) -> anyhow::Result<Value> {
    let tasks = args.memory_backlog;
    let prefix = format!("bench-mem-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let subjects = Subjects::new(&prefix)?;
    let mut node = NodeProcess::start(
        client,
        url,
        &subjects,
        Mode::JetStream,
        args.workers,
        "node",
    )
    .await?;
    let js = jetstream::new(client.clone());
    let subject = subjects.task("sleep", Priority::Normal);
    let payload = json!({"ms": 600_000});
    let every = (tasks / SAMPLES).max(1);
    let mut samples = Vec::new();
    let started = Instant::now();
    let mut sent = 0;
    while sent < tasks {
        // Published between the sample points.
        let end = (sent + every).min(tasks);
        publish(&js, &subject, "m", sent..end, &payload, args.timeout).await?;
        sent = end;
        node.check()?;
        samples.push(mib(node.rss_kib()));
        eprintln!(
            "memory: {sent} tasks waiting, node RSS {:.1} MiB",
            samples.last().unwrap_or(&0.0)
        );
    }
    let peak = mib(node.peak_rss_kib());
    drop(node); // killed: its sleeping tasks need not finish
    clean_up(client, &subjects).await;
    Ok(json!({
        "tasks": tasks,
        "published_in_s": started.elapsed().as_secs_f64(),
        "rss_samples_mib": samples,
        "first_rss_mib": samples.first(),
        "last_rss_mib": samples.last(),
        "peak_rss_mib": peak,
    }))
}

/// Runs `--memory-records` `echo` tasks to their end; the node keeps their
/// records (up to its `--max-records`).
async fn finished(
    args: &BenchArgs,
    url: &str,
    client: &async_nats::Client,
) -> anyhow::Result<Value> {
    let tasks = args.memory_records;
    let prefix = format!("bench-rec-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let subjects = Subjects::new(&prefix)?;
    let mut node = NodeProcess::start(
        client,
        url,
        &subjects,
        Mode::JetStream,
        args.workers,
        "node",
    )
    .await?;
    let mut completed = client
        .subscribe(subjects.event("echo", "*", TaskEventName::Completed))
        .await?;
    client.flush().await?;
    let js = jetstream::new(client.clone());
    let subject = subjects.task("echo", Priority::Normal);
    let payload = json!("x".repeat(args.payload_bytes as usize));
    let mut sent = 0;
    while sent < tasks {
        let end = (sent + CHUNK).min(tasks);
        publish(&js, &subject, "r", sent..end, &payload, args.timeout).await?;
        // Keep the backlog short: wait for this chunk before the next.
        await_completed(
            &mut completed,
            std::slice::from_mut(&mut node),
            end - sent,
            args.timeout,
        )
        .await?;
        sent = end;
    }
    let rss = mib(node.rss_kib());
    let peak = mib(node.peak_rss_kib());
    node.stop().await?;
    clean_up(client, &subjects).await;
    Ok(json!({
        "tasks": tasks,
        "records_kept": tasks.min(100_000),
        "rss_mib": rss,
        "peak_rss_mib": peak,
    }))
}
