//! `dispatcher demo`: a node with ten workers and a mixed batch of tasks
//! (priorities, progress, a retry, a panic, a timeout, a cancel), shown
//! live and summed up in a table. Uses the NATS server at `--nats-url` if
//! one answers, else starts a private `nats-server` and stops it on exit.
//! Everything goes over NATS, as it would between separate processes.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Args;
use dispatcher_actors::{
    BackoffSpec, DispatcherConfig, NodeEvent, TaskEvent, TaskEventName, TaskSpec, MAX_WORKERS,
};
use dispatcher_nats::{
    ApiEndpoint, LocalServer, LocalServerError, Mode, Node, NodeOptions, Subjects,
};
use futures::StreamExt;
use serde_json::{json, Value};
use tracing::info;

use crate::config::{default_node_id, parse_duration, Connection};
use crate::credentials::{redact, redact_urls};
use crate::handlers::{builtin_handlers, HandlerOptions};
use crate::watch::Tracker;

/// `dispatcher demo` settings.
#[derive(Args, Clone, Debug)]
pub struct DemoArgs {
    /// NATS connection; when no server answers, a private one is started.
    #[command(flatten)]
    pub connection: Connection,
    /// Give up if the batch has not finished within this.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub deadline: Duration,
    /// Print every event as a line instead of drawing progress bars.
    #[arg(long)]
    pub plain: bool,
}

/// One task of the batch and the end it should reach.
struct Planned {
    spec: TaskSpec,
    kind: &'static str,
    expect: TaskEventName,
    what: &'static str,
}

/// Runs the demo; `Ok(true)` when every task ended as planned.
pub async fn run(args: DemoArgs) -> anyhow::Result<bool> {
    let (client, _server) = connect_or_start(&args.connection).await?;
    let suffix: u32 = rand::random::<u32>() & 0xff_ffff;
    let prefix = format!("demo-{suffix:06x}");
    let subjects = Subjects::new(&prefix)?;
    let mut config = DispatcherConfig::new(default_node_id());
    config.workers = MAX_WORKERS;
    // Durable mode when the server has JetStream, as `serve` runs by default.
    let mode = if client.server_info().jetstream {
        Mode::JetStream
    } else {
        eprintln!("The NATS server has no JetStream: the demo runs in core mode.");
        Mode::Core
    };
    let node = Node::start(
        client.clone(),
        config,
        builtin_handlers(&HandlerOptions {
            enable_chaos: true,
            ..HandlerOptions::default()
        })?,
        NodeOptions {
            prefix: prefix.clone(),
            mode,
            heartbeat_interval: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(5),
            ..NodeOptions::default()
        },
    )
    .await
    .context("starting the demo node")?;
    eprintln!(
        "A node with {MAX_WORKERS} workers serves prefix {prefix} in {} mode; \
         in another terminal: dispatcher watch --prefix {prefix}",
        mode.as_str()
    );

    let mut tracker = if args.plain {
        Tracker::plain()
    } else {
        Tracker::new()
    };
    let mut events = client.subscribe(subjects.events_any()).await?;
    let mut nodes = client.subscribe(subjects.nodes_any()).await?;
    client.flush().await?;

    let plan = plan(&prefix);
    submit_all(&client, &subjects, &plan).await?;
    let expected: HashMap<String, &Planned> = plan
        .iter()
        .map(|p| (p.spec.id.clone().expect("planned ids"), p))
        .collect();
    let cancel_id = plan
        .iter()
        .find(|p| p.expect == TaskEventName::Cancelled)
        .and_then(|p| p.spec.id.clone());

    let mut started: Vec<String> = Vec::new();
    let deadline = tokio::time::sleep(args.deadline);
    tokio::pin!(deadline);
    while tracker.ended().len() < plan.len() {
        tokio::select! {
            msg = events.next() => {
                let Some(msg) = msg else { bail!("the NATS connection closed") };
                let Ok(event) = serde_json::from_slice::<TaskEvent>(&msg.payload) else { continue };
                if !expected.contains_key(event.task_id.as_str()) {
                    continue;
                }
                if event.name() == TaskEventName::Started && !started.iter().any(|s| s == event.task_id.as_str()) {
                    started.push(event.task_id.as_str().to_owned());
                    if cancel_id.as_deref() == Some(event.task_id.as_str()) {
                        cancel(&client, &subjects, event.task_id.as_str()).await?;
                    }
                }
                tracker.on_task(&event);
            }
            msg = nodes.next() => {
                if let Some(event) = msg.and_then(|m| serde_json::from_slice::<NodeEvent>(&m.payload).ok()) {
                    tracker.on_node(&event);
                }
            }
            _ = &mut deadline => {
                tracker.clear();
                bail!(
                    "{} of {} tasks ended within {:?}",
                    tracker.ended().len(),
                    plan.len(),
                    args.deadline
                );
            }
        }
    }
    tracker.clear();

    let stats = node.dispatcher().stats().await?;
    let all_as_planned = print_summary(&plan, &tracker, &started);
    println!(
        "\nnode: {} submitted, {} completed, {} failed, {} timed out, {} cancelled, \
         {} retried, {} worker restart(s); p50 {:.0} ms, p99 {:.0} ms",
        stats.submitted,
        stats.completed,
        stats.failed,
        stats.timed_out,
        stats.cancelled,
        stats.retried,
        stats.worker_restarts,
        stats.p50_ms,
        stats.p99_ms,
    );
    node.shutdown().await;
    Ok(all_as_planned)
}

/// Connects to the configured server, or starts a private one when none
/// answers. The server, if started, lives as long as the returned guard.
async fn connect_or_start(
    connection: &Connection,
) -> anyhow::Result<(async_nats::Client, Option<LocalServer>)> {
    let mut probe = connection.clone();
    probe.max_reconnects = 1;
    probe.connect_timeout = probe.connect_timeout.min(Duration::from_secs(2));
    match probe.connect("dispatcher demo").await {
        Ok(client) => {
            eprintln!(
                "Using the NATS server at {}.",
                redact_urls(&connection.nats_url)
            );
            Ok((client, None))
        }
        Err(e) => {
            info!(error = %redact(&format!("{e:#}")), "No NATS server answers; starting a private one.");
            let server = tokio::task::spawn_blocking(LocalServer::start)
                .await?
                .map_err(|e| match e {
                    LocalServerError::NotInstalled => anyhow::anyhow!(
                        "no NATS server answers at {} and nats-server is not installed: \
                         install it with `sudo apt-get install nats-server` (or run scripts/demo, \
                         which does), or point --nats-url at a server",
                        redact_urls(&connection.nats_url)
                    ),
                    other => anyhow::Error::new(other),
                })?;
            eprintln!(
                "No NATS server answers at {}; started a private nats-server at {} \
                 (stopped when the demo ends).",
                redact_urls(&connection.nats_url),
                server.url()
            );
            let client = async_nats::ConnectOptions::new()
                .name("dispatcher demo")
                .connect(server.url())
                .await
                .with_context(|| format!("connecting to the private server at {}", server.url()))?;
            Ok((client, Some(server)))
        }
    }
}

fn spec(prefix: &str, n: usize, kind: &str, payload: Value, priority: &str) -> TaskSpec {
    let mut spec = TaskSpec::new(kind, payload).with_id(format!("{prefix}-{n:02}"));
    spec.priority = Some(priority.to_owned());
    spec
}

/// The batch: more sleeps than workers so priorities show, and one task
/// for each way a task can end.
fn plan(prefix: &str) -> Vec<Planned> {
    let mut plan = Vec::new();
    let mut n = 0;
    let mut next = || {
        n += 1;
        n
    };
    for _ in 0..14 {
        plan.push(Planned {
            spec: spec(
                prefix,
                next(),
                "sleep",
                json!({"ms": 2000, "steps": 10}),
                "low",
            ),
            kind: "sleep",
            expect: TaskEventName::Completed,
            what: "2 s of work in 10 progress steps",
        });
    }
    for _ in 0..4 {
        plan.push(Planned {
            spec: spec(
                prefix,
                next(),
                "sleep",
                json!({"ms": 1000, "steps": 4}),
                "normal",
            ),
            kind: "sleep",
            expect: TaskEventName::Completed,
            what: "1 s of work, ahead of the queued low ones",
        });
    }
    for _ in 0..2 {
        plan.push(Planned {
            spec: spec(
                prefix,
                next(),
                "echo",
                json!({"hello": "world"}),
                "critical",
            ),
            kind: "echo",
            expect: TaskEventName::Completed,
            what: "submitted last, starts before every queued task",
        });
    }
    let mut retry = spec(prefix, next(), "chaos", json!({"fail_times": 2}), "high");
    retry.max_attempts = Some(3);
    retry.backoff = Some(BackoffSpec {
        initial_ms: Some(200),
        max_ms: Some(1000),
        multiplier: Some(2.0),
    });
    plan.push(Planned {
        spec: retry,
        kind: "chaos",
        expect: TaskEventName::Completed,
        what: "fails twice, retried with backoff",
    });
    let mut panic = spec(prefix, next(), "chaos", json!({"panic": true}), "high");
    panic.max_attempts = Some(1);
    plan.push(Planned {
        spec: panic,
        kind: "chaos",
        expect: TaskEventName::Failed,
        what: "panics; the worker is restarted",
    });
    let mut slow = spec(prefix, next(), "chaos", json!({"sleep_ms": 60_000}), "high");
    slow.timeout_ms = Some(1000);
    slow.max_attempts = Some(1);
    plan.push(Planned {
        spec: slow,
        kind: "chaos",
        expect: TaskEventName::TimedOut,
        what: "runs past its 1 s timeout",
    });
    plan.push(Planned {
        spec: spec(
            prefix,
            next(),
            "sleep",
            json!({"ms": 60_000, "steps": 60}),
            "high",
        ),
        kind: "sleep",
        expect: TaskEventName::Cancelled,
        what: "cancelled once it runs",
    });
    plan
}

/// Submits every planned task through `<p>.submit.<kind>`: the sleeps as
/// one batch (an array body), the rest one by one.
async fn submit_all(
    client: &async_nats::Client,
    subjects: &Subjects,
    plan: &[Planned],
) -> anyhow::Result<()> {
    let (sleeps, rest): (Vec<&Planned>, Vec<&Planned>) = plan
        .iter()
        .partition(|p| p.kind == "sleep" && p.expect == TaskEventName::Completed);
    let batch: Vec<&TaskSpec> = sleeps.iter().map(|p| &p.spec).collect();
    let reply = request(
        client,
        &subjects.submit("sleep"),
        serde_json::to_vec(&batch)?,
    )
    .await?;
    let accepted = reply["results"]
        .as_array()
        .map(|r| r.iter().filter(|e| e["ok"] == true).count())
        .unwrap_or(0);
    if accepted != batch.len() {
        bail!(
            "the node accepted {accepted} of {} sleep tasks: {reply}",
            batch.len()
        );
    }
    for p in rest {
        let reply = request(
            client,
            &subjects.submit(p.kind),
            serde_json::to_vec(&p.spec)?,
        )
        .await?;
        if reply["ok"] != true {
            bail!("the node refused a {} task: {reply}", p.kind);
        }
    }
    Ok(())
}

async fn cancel(client: &async_nats::Client, subjects: &Subjects, id: &str) -> anyhow::Result<()> {
    let body = serde_json::to_vec(&json!({ "id": id }))?;
    let reply = request(client, &subjects.api(ApiEndpoint::Cancel), body).await?;
    if reply["ok"] != true {
        bail!("cancelling {id} failed: {reply}");
    }
    Ok(())
}

async fn request(
    client: &async_nats::Client,
    subject: &str,
    body: Vec<u8>,
) -> anyhow::Result<Value> {
    let msg = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(subject.to_owned(), body.into()),
    )
    .await
    .with_context(|| format!("no reply on {subject} within 10 s"))?
    .with_context(|| format!("requesting {subject}"))?;
    serde_json::from_slice(&msg.payload).with_context(|| format!("reply on {subject}"))
}

/// Prints the table; true when every task ended as planned.
fn print_summary(plan: &[Planned], tracker: &Tracker, started: &[String]) -> bool {
    println!(
        "\n{:<4} {:<6} {:<9} {:>5} {:<10} {:>4} {:>7}  what happened",
        "task", "kind", "priority", "start", "status", "try", "ms"
    );
    let mut all = true;
    for (i, p) in plan.iter().enumerate() {
        let id = p.spec.id.as_deref().unwrap_or_default();
        let outcome = &tracker.ended()[id];
        let as_planned = outcome.status == p.expect;
        all &= as_planned;
        let start = started
            .iter()
            .position(|s| s == id)
            .map(|n| (n + 1).to_string())
            .unwrap_or_else(|| "-".into());
        let ms = outcome
            .duration_ms
            .map(|d| d.to_string())
            .unwrap_or_else(|| "-".into());
        let detail = if outcome.detail.is_empty() {
            p.what.to_owned()
        } else {
            format!("{} ({})", p.what, outcome.detail)
        };
        println!(
            "{:<4} {:<6} {:<9} {:>5} {:<10} {:>4} {:>7}  {}{}",
            i + 1,
            p.kind,
            p.spec.priority.as_deref().unwrap_or("normal"),
            start,
            outcome.status.as_str(),
            outcome.attempt,
            ms,
            detail,
            if as_planned {
                ""
            } else {
                "  <- NOT AS PLANNED"
            },
        );
    }
    all
}
