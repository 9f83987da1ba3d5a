//! `dispatcher bench --scaling`: 1, 2, … jetstream nodes on one server
//! share a backlog of `sleep` tasks of 10 ms, each node with `--workers`
//! workers. Throughput should grow with the node count (about 100 tasks/s
//! per worker slot at 10 ms a task).

use std::time::{Duration, Instant};

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

/// How long each task sleeps.
const SLEEP_MS: u64 = 10;
/// Publish acknowledgements awaited together.
const CHUNK: usize = 500;

/// Runs 1..=`args.scaling` nodes in turn; prints a table and answers it
/// as JSON.
pub(super) async fn run(args: &BenchArgs, url: &str) -> anyhow::Result<Value> {
    let client = super::connect(url, "dispatcher bench --scaling").await?;
    let mut rows = Vec::new();
    let mut single = None;
    for nodes in 1..=args.scaling {
        let tasks = args.scaling_tasks * nodes;
        let rate = one(args, url, &client, nodes, tasks)
            .await
            .with_context(|| format!("scaling with {nodes} node(s)"))?;
        let base = *single.get_or_insert(rate);
        eprintln!("scaling: {nodes} node(s), {tasks} tasks: {rate:.0} tasks/s");
        rows.push(json!({
            "nodes": nodes,
            "tasks": tasks,
            "tasks_per_s": rate,
            "per_node": rate / nodes as f64,
            "vs_one_node": rate / base,
        }));
    }
    println!(
        "\nscaling: jetstream nodes of {} worker(s) on one server, `sleep` tasks of {SLEEP_MS} ms \
         (ideal: {} tasks/s per node)",
        args.workers,
        args.workers * 1000 / SLEEP_MS
    );
    println!(
        "{:>5} {:>7} {:>10} {:>10} {:>12}",
        "nodes", "tasks", "tasks/s", "per node", "vs 1 node"
    );
    for r in &rows {
        println!(
            "{:>5} {:>7} {:>10.0} {:>10.0} {:>12.2}",
            r["nodes"].as_u64().unwrap_or(0),
            r["tasks"].as_u64().unwrap_or(0),
            r["tasks_per_s"].as_f64().unwrap_or(0.0),
            r["per_node"].as_f64().unwrap_or(0.0),
            r["vs_one_node"].as_f64().unwrap_or(0.0),
        );
    }
    Ok(json!({"sleep_ms": SLEEP_MS, "workers": args.workers, "runs": rows}))
}

/// One run: `nodes` node processes, `tasks` tasks; answers tasks per second
/// from the first publish to the last `completed`.
async fn one(
    args: &BenchArgs,
    url: &str,
    client: &async_nats::Client,
    nodes: u64,
    tasks: u64,
) -> anyhow::Result<f64> {
    let prefix = format!(
        "bench-scale{nodes}-{:06x}",
        rand::random::<u32>() & 0xff_ffff
    );
    let subjects = Subjects::new(&prefix)?;
    let mut running = Vec::new();
    for i in 1..=nodes {
        running.push(
            NodeProcess::start(
                client,
                url,
                &subjects,
                Mode::JetStream,
                args.workers,
                &format!("n{i}"),
            )
            .await?,
        );
    }
    let mut completed = client
        .subscribe(subjects.event("sleep", "*", TaskEventName::Completed))
        .await?;
    client.flush().await?;
    let js = jetstream::new(client.clone());
    let subject = subjects.task("sleep", Priority::Normal);
    let body = json!({"payload": {"ms": SLEEP_MS}});
    let started = Instant::now();
    let ids: Vec<u64> = (0..tasks).collect();
    for chunk in ids.chunks(CHUNK) {
        let mut acks = Vec::with_capacity(chunk.len());
        for i in chunk {
            let mut task = body.clone();
            task["id"] = json!(format!("s{i}"));
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("s{i}").as_str());
            acks.push(
                js.publish_with_headers(subject.clone(), headers, task.to_string().into())
                    .await?,
            );
        }
        for ack in acks {
            tokio::time::timeout(args.timeout, std::future::IntoFuture::into_future(ack))
                .await
                .context("no publish acknowledgement in time")??;
        }
    }
    let mut done = 0;
    while done < tasks {
        match tokio::time::timeout(args.timeout, completed.next()).await {
            Ok(Some(_)) => done += 1,
            Ok(None) => bail!("the NATS connection closed"),
            Err(_) => {
                for node in &mut running {
                    node.check()?;
                }
                bail!(
                    "{} of {tasks} tasks missing: none completed for {:?}",
                    tasks - done,
                    args.timeout
                );
            }
        }
    }
    let rate = tasks as f64 / started.elapsed().as_secs_f64().max(f64::EPSILON);
    for node in &mut running {
        node.stop().await?;
    }
    delete_all(
        client,
        &[subjects.stream_tasks(), subjects.stream_dead()],
        &[subjects.bucket_tasks(), subjects.bucket_cancels()],
    )
    .await;
    tokio::time::sleep(Duration::ZERO).await;
    Ok(rate)
}
