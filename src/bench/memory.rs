//! `dispatcher bench --memory`: the node's resident memory (a) while a
//! large backlog waits in the stream, and (b) once many finished task
//! records are kept in its registry. Both should stay bounded: a node
//! pulls only as far ahead as its queue allows, and the registry is capped
//! by `--max-records` (100 000).

use std::time::Instant;

use anyhow::{bail, Context as _};
use async_nats::jetstream;
use async_nats::HeaderMap;
use dispatcher_actors::{Priority, TaskEventName};
use dispatcher_nats::{Mode, Subjects};
use futures::StreamExt;
use serde_json::{json, Value};

use super::node::NodeProcess;
use super::target::delete_all;
use super::BenchArgs;

/// Publish acknowledgements awaited together.
const CHUNK: usize = 1_000;
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
    Ok(json!({"backlog": backlog, "records": records}))
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
    let body = json!({"payload": {"ms": 600_000}}).to_string();
    let every = (tasks / SAMPLES).max(1);
    let mut samples = Vec::new();
    let started = Instant::now();
    let mut sent = 0;
    while sent < tasks {
        // Chunks end on the sample points.
        let n = (tasks - sent).min(CHUNK as u64).min(every - sent % every);
        let mut acks = Vec::with_capacity(n as usize);
        for _ in 0..n {
            acks.push(js.publish(subject.clone(), body.clone().into()).await?);
        }
        for ack in acks {
            tokio::time::timeout(args.timeout, std::future::IntoFuture::into_future(ack))
                .await
                .context("no publish acknowledgement in time")??;
        }
        let before = sent;
        sent += n;
        if before / every != sent / every {
            node.check()?;
            samples.push(mib(node.rss_kib()));
            eprintln!(
                "memory: {sent} tasks waiting, node RSS {:.1} MiB",
                samples.last().unwrap_or(&0.0)
            );
        }
    }
    let peak = mib(node.peak_rss_kib());
    drop(node); // killed: its sleeping tasks need not finish
    delete_all(
        client,
        &[subjects.stream_tasks(), subjects.stream_dead()],
        &[subjects.bucket_tasks(), subjects.bucket_cancels()],
    )
    .await;
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
    let payload = "x".repeat(args.payload_bytes as usize);
    let mut sent = 0;
    let mut done = 0;
    while sent < tasks {
        let n = (tasks - sent).min(CHUNK as u64);
        let mut acks = Vec::with_capacity(n as usize);
        for i in sent..sent + n {
            let body = json!({"id": format!("r{i}"), "payload": payload}).to_string();
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("r{i}").as_str());
            acks.push(
                js.publish_with_headers(subject.clone(), headers, body.into())
                    .await?,
            );
        }
        for ack in acks {
            tokio::time::timeout(args.timeout, std::future::IntoFuture::into_future(ack))
                .await
                .context("no publish acknowledgement in time")??;
        }
        sent += n;
        // Keep the backlog short: wait for most of this chunk.
        while done + (CHUNK as u64) < sent {
            next(args, &mut completed, &mut node, tasks - done).await?;
            done += 1;
        }
    }
    while done < tasks {
        next(args, &mut completed, &mut node, tasks - done).await?;
        done += 1;
    }
    let rss = mib(node.rss_kib());
    let peak = mib(node.peak_rss_kib());
    node.stop().await?;
    delete_all(
        client,
        &[subjects.stream_tasks(), subjects.stream_dead()],
        &[subjects.bucket_tasks(), subjects.bucket_cancels()],
    )
    .await;
    Ok(json!({
        "tasks": tasks,
        "records_kept": tasks.min(100_000),
        "rss_mib": rss,
        "peak_rss_mib": peak,
    }))
}

async fn next(
    args: &BenchArgs,
    completed: &mut async_nats::Subscriber,
    node: &mut NodeProcess,
    missing: u64,
) -> anyhow::Result<()> {
    match tokio::time::timeout(args.timeout, completed.next()).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => bail!("the NATS connection closed"),
        Err(_) => {
            node.check()?;
            bail!(
                "{missing} tasks missing: none completed for {:?}",
                args.timeout
            )
        }
    }
}
