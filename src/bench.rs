//! `dispatcher bench`: the end-to-end speed of a node against a live NATS
//! server, next to what the same server does with no dispatcher at all.
//!
//! For each mode (`core`, `jetstream`) three columns are measured on the
//! same server with the same payload:
//!
//! - **ceiling**: a bare async-nats responder on its own thread and
//!   connection takes each task message (a core subscription, or a durable
//!   pull consumer on a work-queue stream), publishes `started`, acks
//!   (JetStream), and publishes `completed`: the least any dispatcher has to
//!   do on this server;
//! - **direct**: a real `dispatcher serve` child process, fed by publishing
//!   straight onto `<p>.tasks.echo.normal` (a JetStream publish with
//!   `Nats-Msg-Id` in mode `jetstream`);
//! - **submit**: the same through `<p>.submit.echo` requests.
//!
//! One driver times every column alike, each task from its publish to its
//! `completed` message: a closed loop with `--window` tasks in flight for
//! throughput and the p99 under that load, then one task at a time for the
//! latency percentiles. Its bookkeeping is a map of in-flight start instants
//! and fixed-size histograms, so memory does not grow with `--tasks`. Every
//! wait has a deadline; a run that stalls, or whose node exits, fails with
//! the mode, the column and the number of tasks missing.
//!
//! # Layout
//!
//! - `target`: the driver's loop and what it drives (ceiling or node).
//! - `responder`: the ceiling's bare responder thread.
//! - `node`: the measured node as a child process, its CPU time and RSS.
//! - `report`: the tables and the JSON.
//! - `goals`: the project's targets, checked on each run.
//! - `scaling`: `--scaling`, throughput as jetstream nodes are added.
//! - `feed`: publishing and awaiting tasks for `--scaling` and `--memory`.
//! - `memory`: `--memory`, the node's RSS under a backlog and with many records.

mod feed;
mod goals;
mod memory;
mod node;
mod report;
mod responder;
mod scaling;
mod target;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use clap::{Args, ValueEnum};
use dispatcher_nats::{LocalServer, LocalServerError, Mode};
use serde::Serialize;
use serde_json::json;

use crate::config::parse_duration;
use crate::credentials::{redact, ServerUrls};
use node::clock_ticks;
use report::{cpu_model, nproc, summarise};
use target::Target;

/// The kind every measured task has: the built-in `echo` returns its payload.
const KIND: &str = "echo";
/// The ceiling's durable pull consumer.
const CEILING_CONSUMER: &str = "responder";
/// How long a node or responder may take to be ready.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long a node (30 s shutdown timeout) or responder may take to stop.
const STOP_DEADLINE: Duration = Duration::from_secs(40);

/// `dispatcher bench` settings.
#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// NATS server to measure against. Without it, a private nats-server
    /// (JetStream, file storage, a free port) is started and stopped at the
    /// end; DISPATCH_NATS_URL is not read, so a bench never loads a shared
    /// server by accident. Streams made on a given server are deleted after
    /// each run.
    #[arg(long, env = "DISPATCH_BENCH_NATS_URL")]
    pub nats_url: Option<String>,
    /// Modes to measure: core, jetstream or both.
    #[arg(long, env = "DISPATCH_BENCH_MODE", value_enum, default_value_t = BenchMode::Both)]
    pub mode: BenchMode,
    /// Tasks of each throughput run.
    #[arg(long, env = "DISPATCH_BENCH_TASKS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub tasks: u64,
    /// Tasks in flight during a throughput run (closed loop: one goes out
    /// as one completes); the p99 under load is taken at this window.
    #[arg(long, env = "DISPATCH_BENCH_WINDOW", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub window: u64,
    /// Tasks timed one at a time for p50, p99 and p99.9 (at most --tasks).
    #[arg(long, env = "DISPATCH_BENCH_LATENCY_TASKS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub latency_tasks: u64,
    /// Bytes of each task's JSON payload (an object padded to this size).
    #[arg(long, env = "DISPATCH_BENCH_PAYLOAD_BYTES", default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(16..=1_000_000))]
    pub payload_bytes: u64,
    /// Worker slots of the measured node (`serve --workers`).
    #[arg(long, env = "DISPATCH_BENCH_WORKERS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=10))]
    pub workers: u64,
    /// Repetitions of each measurement; the table shows each figure's median.
    #[arg(long, env = "DISPATCH_BENCH_REPS", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub reps: u64,
    /// Fail when no task completes for this long (a node that exits fails
    /// the run at once).
    #[arg(long, env = "DISPATCH_BENCH_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Also write every figure, ceiling, ratio and repetition, and the
    /// machine, as JSON to this file.
    #[arg(long, env = "DISPATCH_BENCH_JSON")]
    pub json: Option<PathBuf>,
    /// Instead of the table above: run 1, 2, … up to this many jetstream
    /// nodes in turn on `sleep` tasks of 10 ms and report how throughput
    /// grows with the node count.
    #[arg(long, value_name = "NODES", num_args = 0..=1, default_missing_value = "3",
          default_value_t = 0)]
    pub scaling: u64,
    /// Tasks per node in a --scaling run.
    #[arg(long, default_value_t = 2_000)]
    pub scaling_tasks: u64,
    /// Instead of the table above: the node's memory with
    /// --memory-backlog tasks waiting in the stream, and after
    /// --memory-records finished tasks (their records kept).
    #[arg(long)]
    pub memory: bool,
    /// Tasks waiting in the stream in a --memory run.
    #[arg(long, default_value_t = 1_000_000)]
    pub memory_backlog: u64,
    /// Finished tasks in a --memory run.
    #[arg(long, default_value_t = 100_000)]
    pub memory_records: u64,
}

/// Which modes `dispatcher bench` measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchMode {
    /// Mode `core` only.
    Core,
    /// Mode `jetstream` only.
    Jetstream,
    /// Both, core first.
    Both,
}

/// What is measured: the bare ceiling, or a node fed one of two ways.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Column {
    Ceiling,
    Direct,
    Submit,
}

impl Column {
    const ALL: [Column; 3] = [Column::Ceiling, Column::Direct, Column::Submit];

    fn as_str(self) -> &'static str {
        match self {
            Column::Ceiling => "ceiling",
            Column::Direct => "direct",
            Column::Submit => "submit",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Column::Ceiling => "ceiling",
            Column::Direct => "dispatcher (direct)",
            Column::Submit => "dispatcher (submit)",
        }
    }
}

/// One measurement of one column.
#[derive(Clone, Copy, Debug, Default, Serialize)]
struct Figures {
    throughput_per_s: Option<f64>,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    p999_us: Option<f64>,
    p99_window_us: Option<f64>,
    /// The node's CPU time (the ceiling: its responder thread's) over the
    /// throughput run.
    cpu_s_per_1000: Option<f64>,
    /// The node's peak resident set (VmHWM); none for the ceiling.
    rss_mib: Option<f64>,
}

/// Runs the benchmark: measures, prints the tables, writes `--json`.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let (url, server) = server(&args).await?;
    let probe = connect(&url, "dispatcher bench").await?;
    let info = probe.server_info();
    let modes = match args.mode {
        BenchMode::Core => vec![Mode::Core],
        BenchMode::Jetstream => vec![Mode::JetStream],
        BenchMode::Both => vec![Mode::Core, Mode::JetStream],
    };
    if modes.contains(&Mode::JetStream) && !info.jetstream {
        bail!(
            "the NATS server at {} has no JetStream: start it with -js, or pass --mode core",
            redact(&url).into_owned()
        );
    }
    let machine = json!({
        "nproc": nproc(),
        "clk_tck": clock_ticks(),
        "cpu_model": cpu_model(),
        "nats_server": info.version,
        "server": if server.is_some() { "private, started by the bench".to_owned() } else { redact(&url).into_owned() },
    });
    drop(probe);
    if args.memory {
        if !info.jetstream {
            bail!("--memory runs a jetstream node: the NATS server has no JetStream");
        }
        let memory = memory::run(&args, &url).await?;
        if let Some(path) = &args.json {
            let doc = json!({"machine": machine, "memory": memory});
            std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
        return Ok(());
    }
    if args.scaling > 0 {
        if !info.jetstream {
            bail!("--scaling runs jetstream nodes: the NATS server has no JetStream");
        }
        let scaling = scaling::run(&args, &url).await?;
        if let Some(path) = &args.json {
            let doc = json!({"machine": machine, "scaling": scaling});
            std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
        return Ok(());
    }
    eprintln!(
        "Measuring {} task(s) per run, window {}, {} B payloads, {} worker(s), {} repetition(s).",
        args.tasks, args.window, args.payload_bytes, args.workers, args.reps
    );
    let mut reports = serde_json::Map::new();
    let mut tables = Vec::new();
    for mode in modes {
        let mut reps: Vec<Vec<Figures>> = vec![Vec::new(); Column::ALL.len()];
        for rep in 1..=args.reps {
            for (i, column) in Column::ALL.into_iter().enumerate() {
                let tag = format!("{} {} {rep}/{}", mode.as_str(), column.title(), args.reps);
                let figures = measure(&args, &url, mode, column, &tag)
                    .await
                    .with_context(|| format!("mode {}, {}", mode.as_str(), column.title()))?;
                reps[i].push(figures);
            }
        }
        let (table, report) = summarise(&args, mode, &reps);
        tables.push(table);
        reports.insert(mode.as_str().to_owned(), report);
    }
    drop(server);
    let text = |key: &str| machine[key].as_str().unwrap_or_default().to_owned();
    println!(
        "machine: {} CPU(s) (nproc), {}; nats-server {} ({})",
        machine["nproc"],
        text("cpu_model"),
        text("nats_server"),
        text("server")
    );
    println!(
        "{} tasks per throughput run, {} timed one at a time, window {}, {} B payload, \
         {} worker(s); median of {} repetition(s)",
        args.tasks,
        args.latency_tasks.min(args.tasks),
        args.window,
        args.payload_bytes,
        args.workers,
        args.reps
    );
    for table in tables {
        println!("\n{table}");
    }
    if let Some(path) = &args.json {
        let doc = json!({
            "settings": {
                "tasks": args.tasks,
                "latency_tasks": args.latency_tasks.min(args.tasks),
                "window": args.window,
                "payload_bytes": args.payload_bytes,
                "workers": args.workers,
                "reps": args.reps,
            },
            "machine": machine,
            "modes": reports,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("Wrote {}.", path.display());
    }
    Ok(())
}

/// `--nats-url`, or a private server kept alive by the returned guard.
async fn server(args: &BenchArgs) -> anyhow::Result<(String, Option<LocalServer>)> {
    if let Some(url) = &args.nats_url {
        return Ok((url.clone(), None));
    }
    let server = tokio::task::spawn_blocking(LocalServer::start)
        .await?
        .map_err(|e| match e {
            LocalServerError::NotInstalled => anyhow!(
                "nats-server is not installed: install it with `sudo apt-get install nats-server` \
                 (or run scripts/test, which does), or point --nats-url at a server"
            ),
            other => anyhow::Error::new(other),
        })?;
    eprintln!(
        "Started a private nats-server at {} (stopped at the end).",
        server.url()
    );
    Ok((server.url(), Some(server)))
}

/// Connects to `url`, logging in with the credentials it carries.
async fn connect(url: &str, name: &str) -> anyhow::Result<async_nats::Client> {
    let servers = ServerUrls::parse(&[url.to_owned()])?;
    let shown = servers.shown();
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5));
    if let Some(login) = servers.login {
        options = login.apply(options)?;
    }
    options
        .connect(servers.addrs)
        .await
        .with_context(|| format!("connecting to NATS at {shown}"))
}

/// Starts one column's target, measures it, stops it. In mode core,
/// where NATS delivers at most once, a run that lost tasks is measured
/// once more before it counts as failed; in mode jetstream a lost task
/// fails the run at once.
async fn measure(
    args: &BenchArgs,
    url: &str,
    mode: Mode,
    column: Column,
    tag: &str,
) -> anyhow::Result<Figures> {
    let mut tries = if mode == Mode::Core { 2 } else { 1 };
    let figures = loop {
        tries -= 1;
        let mut target = Target::start(args, url, mode, column).await?;
        let result = target.measure(args, tag).await;
        let stopped = target.stop().await;
        match result {
            Err(e) if tries > 0 && e.chain().any(|c| c.is::<target::Stalled>()) => {
                eprintln!("{tag}: {e:#} (core NATS delivers at most once); measuring again.");
            }
            result => {
                let figures = result?;
                stopped?;
                break figures;
            }
        }
    };
    let ms = |v: Option<f64>| v.unwrap_or(0.0) / 1000.0;
    eprintln!(
        "{tag}: {:.0} tasks/s; one at a time p50 {:.3} ms, p99 {:.3} ms; p99 at window {} {:.3} ms",
        figures.throughput_per_s.unwrap_or(0.0),
        ms(figures.p50_us),
        ms(figures.p99_us),
        args.window,
        ms(figures.p99_window_us),
    );
    Ok(figures)
}
