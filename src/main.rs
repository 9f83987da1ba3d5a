//! The `dispatcher` command: run a node, or submit a task to one.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use dispatcher::config::{Connection, ServeConfig, CONFIG_ENV, CONFIG_FLAG};
use dispatcher::credentials::redact;
use dispatcher::demo::DemoArgs;
use dispatcher::watch::Tracker;
use dispatcher_actors::{
    ErrorCode, ErrorInfo, EventBody, ListFilter, NodeEvent, TaskEvent, TaskKind, TaskSpec,
    TaskStatus,
};
use dispatcher_nats::client::ErrorFilter;
use dispatcher_nats::{ApiEndpoint, Client, ClientError, Subjects};
use futures::StreamExt;
use serde_json::json;

// A node allocates a few dozen small objects per task (events, records,
// messages) from several threads; mimalloc makes that a fraction of what
// the system allocator costs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An actor-based, distributed task dispatcher on NATS.
///
/// Nodes take tasks from NATS subjects, run them on up to ten supervised
/// workers, and publish progress and completion events back. Every flag
/// can also be set with a DISPATCH_* environment variable, or in a TOML
/// file named by --config (keys are the long flag names); flags beat
/// variables, which beat the file.
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    /// TOML file with settings (keys: the long flag names, e.g. `workers = 4`).
    #[arg(long = CONFIG_FLAG, global = true, env = CONFIG_ENV)]
    config: Option<std::path::PathBuf>,
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "DISPATCH_LOG_FORMAT",
        default_value = "human"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node until SIGINT or SIGTERM, then shut down gracefully.
    ///
    /// Example: dispatcher serve --nats-url nats://127.0.0.1:4222 --workers 10
    Serve(Box<ServeConfig>),
    /// Submit one task through `<prefix>.submit.<kind>`; with --wait, follow
    /// its events to the end and exit non-zero unless it completed.
    ///
    /// Example: dispatcher submit sleep '{"ms": 500, "steps": 5}' --wait
    Submit(SubmitArgs),
    /// Show one task's record (control API `status`).
    ///
    /// Example: dispatcher status 0193f0c2-…
    Status(IdArgs),
    /// Cancel a queued or running task (control API `cancel`).
    Cancel(IdArgs),
    /// List task records, newest first (control API `list`), a page at a
    /// time: the reply's `next`, given as --cursor, is the next page.
    ///
    /// Example: dispatcher list --status failed --limit 20 [--cursor 81234]
    List(ListArgs),
    /// Show counters and durations (jetstream mode: the cluster's; core
    /// mode: the answering node's), per-node figures and (jetstream mode)
    /// the stream backlog per kind and priority (control API `stats`).
    Stats(ConnArgs),
    /// Show the latest failed attempts, newest first (control API
    /// `errors`; jetstream mode: the whole cluster's, kept across restarts).
    ///
    /// Example: dispatcher errors --kind report --status failed
    Errors(ErrorsArgs),
    /// List live nodes (from their heartbeats), with their figures.
    Nodes(ConnArgs),
    /// The dead letters (jetstream mode): tasks whose attempts were spent.
    ///
    /// Example: dispatcher dead list --kind report; dispatcher dead replay 0193f0c2-…
    Dead(dispatcher::dead::DeadArgs),
    /// Follow tasks live: a progress bar per task while it waits or runs,
    /// a line when it ends, and node events (restarts, online, offline).
    ///
    /// Example: dispatcher watch --kind sleep
    Watch(WatchArgs),
    /// Run a demonstration: a node with ten workers and a mixed batch
    /// (priorities, progress, a retry, a panic, a timeout, a cancel),
    /// shown live and summed up in a table. Starts a private nats-server
    /// when none answers at --nats-url.
    Demo(DemoArgs),
    /// Measure end-to-end speed: throughput and latency of a real node
    /// (a child `serve` process, fed directly and through submit) next to
    /// a bare NATS ceiling on the same server, in modes core and jetstream.
    /// Starts a private nats-server unless --nats-url is given. Progress on
    /// stderr, the table on stdout.
    ///
    /// Example: dispatcher bench --tasks 20000 --reps 3 --json bench.json
    Bench(dispatcher::bench::BenchArgs),
}

#[derive(clap::Args)]
struct WatchArgs {
    #[command(flatten)]
    connection: Connection,
    /// Only tasks of this kind.
    #[arg(long, conflicts_with = "id")]
    kind: Option<String>,
    /// Only this task.
    #[arg(long)]
    id: Option<String>,
    /// Print each event's JSON on its own line instead of drawing bars.
    #[arg(long)]
    json: bool,
    /// Exit after this many tasks have ended.
    #[arg(long)]
    count: Option<usize>,
}

#[derive(clap::Args)]
struct ConnArgs {
    #[command(flatten)]
    connection: Connection,
}

#[derive(clap::Args)]
struct IdArgs {
    #[command(flatten)]
    connection: Connection,
    /// The task's id.
    id: String,
}

#[derive(clap::Args)]
struct ListArgs {
    #[command(flatten)]
    connection: Connection,
    /// Only tasks in this status (queued, running, retrying, completed, failed, timed_out, cancelled).
    #[arg(long)]
    status: Option<String>,
    /// Only tasks of this kind.
    #[arg(long)]
    kind: Option<String>,
    /// At most this many.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Where to go on: the `next` of the previous page.
    #[arg(long)]
    cursor: Option<String>,
}

#[derive(clap::Args)]
struct ErrorsArgs {
    #[command(flatten)]
    connection: Connection,
    /// Only attempts that led to this status (retrying, failed, timed_out).
    #[arg(long)]
    status: Option<String>,
    /// Only attempts of tasks of this kind.
    #[arg(long)]
    kind: Option<String>,
    /// At most this many.
    #[arg(long, default_value_t = 100)]
    limit: usize,
}

#[derive(clap::Args)]
struct SubmitArgs {
    #[command(flatten)]
    connection: Connection,
    /// The task's kind (names its handler).
    kind: String,
    /// The payload, as JSON.
    #[arg(default_value = "null")]
    payload: String,
    /// Task id; a UUIDv7 is made if absent.
    #[arg(long)]
    id: Option<String>,
    /// critical, high, normal or low.
    #[arg(long)]
    priority: Option<String>,
    /// Per-attempt timeout.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Attempts in all.
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Follow the task's events until it ends.
    #[arg(long)]
    wait: bool,
    /// Seconds to wait for a reply.
    #[arg(long, default_value_t = 10)]
    reply_timeout: u64,
}

fn main() -> ExitCode {
    let cli: Cli = match dispatcher::config::parse_layered(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // A node logs what it does; the client commands print their answers,
    // and only warnings interleave.
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("DISPATCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let result = actix::System::new().block_on(async move {
        match cli.command {
            Command::Serve(config) => {
                dispatcher::node::run(*config, dispatcher::node::shutdown_signal())
                    .await
                    .map(|()| ExitCode::SUCCESS)
            }
            Command::Submit(args) => submit(args).await,
            Command::Status(a) => {
                api(&a.connection, ApiEndpoint::Status, json!({"id": a.id})).await
            }
            Command::Cancel(a) => {
                api(&a.connection, ApiEndpoint::Cancel, json!({"id": a.id})).await
            }
            Command::List(a) => list(a).await,
            Command::Errors(a) => errors(a).await,
            Command::Stats(a) => api(&a.connection, ApiEndpoint::Stats, json!({})).await,
            Command::Nodes(a) => api(&a.connection, ApiEndpoint::Nodes, json!({})).await,
            Command::Dead(a) => dispatcher::dead::run(a).await.map(|found| {
                if found {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(2)
                }
            }),
            Command::Watch(a) => watch(a).await,
            Command::Demo(a) => dispatcher::demo::run(a).await.map(|ok| {
                if ok {
                    ExitCode::SUCCESS
                } else {
                    eprintln!("Some tasks did not end as planned (marked in the table).");
                    ExitCode::FAILURE
                }
            }),
            Command::Bench(a) => dispatcher::bench::run(a).await.map(|()| ExitCode::SUCCESS),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            // Whatever the error quotes, no URL in it shows a password.
            eprintln!("error: {}", redact(&format!("{e:#}")));
            ExitCode::from(2)
        }
    }
}

/// Sends one control request, prints the reply, exits 0 if it says ok.
async fn api(
    connection: &Connection,
    endpoint: ApiEndpoint,
    body: serde_json::Value,
) -> anyhow::Result<ExitCode> {
    let subjects = Subjects::new(&connection.prefix)?;
    let client = connection.connect("dispatcher cli").await?;
    let subject = subjects.api(endpoint);
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(subject.clone(), body.to_string().into()),
    )
    .await
    .context("no reply in time")?
    .with_context(|| {
        format!("no dispatcher node answers on {subject}: is one running with the same --prefix?")
    })?;
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    println!("{}", serde_json::to_string_pretty(&reply)?);
    Ok(if reply["ok"] == true {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// A client of the control API on `connection`.
async fn client(connection: &Connection) -> anyhow::Result<Client> {
    let nats = connection.connect("dispatcher cli").await?;
    Ok(Client::new(nats, &connection.prefix)?)
}

/// Prints a typed reply as the node's JSON: `{"ok": true, …fields}`, or
/// `{"ok": false, "error": …}` for a refusal (exit code 2).
fn print_reply(reply: Result<serde_json::Value, ClientError>) -> anyhow::Result<ExitCode> {
    let (body, code) = match reply {
        Ok(mut fields) => {
            fields["ok"] = true.into();
            (fields, ExitCode::SUCCESS)
        }
        Err(ClientError::Rejected(info) | ClientError::Invalid(info)) => {
            (json!({"ok": false, "error": info}), ExitCode::from(2))
        }
        Err(e) => return Err(e.into()),
    };
    println!("{}", serde_json::to_string_pretty(&body)?);
    Ok(code)
}

/// One page of `list`, with its `next` cursor.
async fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let client = client(&args.connection).await?;
    let reply = async {
        let status = args
            .status
            .map(|s| {
                TaskStatus::parse(&s).ok_or_else(|| {
                    ClientError::Invalid(ErrorInfo::field(
                        ErrorCode::InvalidField,
                        "status",
                        "status must be one of queued, running, retrying, completed, failed, timed_out, cancelled",
                    ))
                })
            })
            .transpose()?;
        let kind = args
            .kind
            .map(TaskKind::new)
            .transpose()
            .map_err(ClientError::Invalid)?;
        let filter = ListFilter {
            status,
            kind,
            limit: args.limit,
        };
        let (tasks, next) = client.list_page(&filter, args.cursor.as_deref()).await?;
        Ok(json!({"tasks": tasks, "next": next}))
    }
    .await;
    print_reply(reply)
}

/// The latest failed attempts, filtered.
async fn errors(args: ErrorsArgs) -> anyhow::Result<ExitCode> {
    let client = client(&args.connection).await?;
    let reply = async {
        let status = args
            .status
            .map(|s| {
                TaskStatus::parse(&s).ok_or_else(|| {
                    ClientError::Invalid(ErrorInfo::field(
                        ErrorCode::InvalidField,
                        "status",
                        "status must be one of retrying, failed, timed_out",
                    ))
                })
            })
            .transpose()?;
        let kind = args
            .kind
            .map(TaskKind::new)
            .transpose()
            .map_err(ClientError::Invalid)?;
        let filter = ErrorFilter { kind, status };
        let errors = client.errors_matching(&filter, args.limit).await?;
        Ok(json!({ "errors": errors }))
    }
    .await;
    print_reply(reply)
}

async fn submit(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let payload: serde_json::Value =
        serde_json::from_str(&args.payload).context("the payload must be JSON")?;
    let subjects = Subjects::new(&args.connection.prefix)?;
    let client = args.connection.connect("dispatcher cli").await?;
    let id = args.id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let mut spec = TaskSpec::new(args.kind.clone(), payload).with_id(id.clone());
    spec.priority = args.priority;
    spec.timeout_ms = args.timeout_ms;
    spec.max_attempts = args.max_attempts;
    // Subscribe before submitting, so no event is missed.
    let mut events = client.subscribe(subjects.task_events(&id)).await?;
    let reply = tokio::time::timeout(
        Duration::from_secs(args.reply_timeout),
        client.request(
            subjects.submit(&args.kind),
            serde_json::to_vec(&spec)?.into(),
        ),
    )
    .await
    .context("no reply in time")?
    .with_context(|| {
        format!(
            "no dispatcher node answers on {}: is one running with the same --prefix?",
            subjects.submit(&args.kind)
        )
    })?;
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    println!("{reply}");
    if reply["ok"] != true {
        return Ok(ExitCode::from(2));
    }
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    while let Some(msg) = events.next().await {
        let Ok(event) = serde_json::from_slice::<TaskEvent>(&msg.payload) else {
            continue;
        };
        let line = match &event.body {
            EventBody::Progress { progress, message } => format!("{progress:>3}% {message}"),
            EventBody::Retrying { error, retry_in_ms } => format!(
                "attempt {} failed ({error}); retry in {retry_in_ms} ms",
                event.attempt
            ),
            EventBody::Completed {
                result,
                duration_ms,
            } => format!("completed in {duration_ms} ms: {result}"),
            EventBody::Failed { error, .. } => format!("failed: {error}"),
            EventBody::TimedOut { timeout_ms } => format!("timed out after {timeout_ms} ms"),
            EventBody::Cancelled { reason } => format!("cancelled: {reason}"),
            other => other.name().as_str().to_owned(),
        };
        println!("{} {line}", event.ts);
        if event.name().is_final() {
            let ok = matches!(event.body, EventBody::Completed { .. });
            return Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
    }
    anyhow::bail!("the connection closed before the task ended")
}

/// Follows task events (and node events) until interrupted, or until
/// `--count` tasks have ended.
async fn watch(args: WatchArgs) -> anyhow::Result<ExitCode> {
    let subjects = Subjects::new(&args.connection.prefix)?;
    let client = args.connection.connect("dispatcher watch").await?;
    let filter = match (&args.id, &args.kind) {
        (Some(id), _) => subjects.task_events(id),
        (None, Some(kind)) => subjects.kind_events(kind),
        (None, None) => subjects.events_any(),
    };
    let mut events = client
        .subscribe(filter.clone())
        .await
        .with_context(|| format!("subscribing to {filter}"))?;
    let mut nodes = client.subscribe(subjects.nodes_any()).await?;
    client.flush().await?;
    eprintln!("Watching {filter}; Ctrl-C to stop.");
    let mut tracker = Tracker::new();
    let mut ended = 0usize;
    let stop = dispatcher::node::shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            msg = events.next() => {
                let Some(msg) = msg else { anyhow::bail!("the NATS connection closed") };
                if args.json {
                    println!("{}", String::from_utf8_lossy(&msg.payload));
                    let is_final = serde_json::from_slice::<TaskEvent>(&msg.payload)
                        .map(|e| e.name().is_final())
                        .unwrap_or(false);
                    ended += usize::from(is_final);
                } else if let Ok(event) = serde_json::from_slice::<TaskEvent>(&msg.payload) {
                    ended += usize::from(tracker.on_task(&event).is_some());
                }
                if args.count.is_some_and(|n| ended >= n) {
                    break;
                }
            }
            msg = nodes.next(), if !args.json => {
                if let Some(event) = msg.and_then(|m| serde_json::from_slice::<NodeEvent>(&m.payload).ok()) {
                    tracker.on_node(&event);
                }
            }
            _ = &mut stop => break,
        }
    }
    tracker.clear();
    Ok(ExitCode::SUCCESS)
}
