//! `dispatcher bench --scaling`: 1, 2, … jetstream nodes on one server
//! share a backlog of `sleep` tasks of 10 ms, each node with `--workers`
//! workers. Throughput should grow with the node count (about 100 tasks/s
//! per worker slot at 10 ms a task).

use std::time::Instant;

use anyhow::Context as _;
use async_nats::jetstream;
use dispatcher_actors::{Priority, TaskEventName};
use dispatcher_nats::{Mode, Subjects};
use serde_json::{json, Value};

use super::feed::{await_completed, clean_up, publish};
use super::node::NodeProcess;
use super::BenchArgs;

/// How long each task sleeps.
const SLEEP_MS: u64 = 10;

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
    let started = Instant::now();
    publish(
        &js,
        &subject,
        "s",
        0..tasks,
        &json!({"ms": SLEEP_MS}),
        args.timeout,
    )
    .await?;
    await_completed(&mut completed, &mut running, tasks, args.timeout).await?;
    let rate = tasks as f64 / started.elapsed().as_secs_f64().max(f64::EPSILON);
    for node in &mut running {
        node.stop().await?;
    }
    clean_up(client, &subjects).await;
    Ok(rate)
}
