//! Task records follow the task in mode `jetstream`, against a real
//! nats-server: a running task's progress reaches its KV record
//! (throttled, the last value kept by the final write). Every wait has a
//! deadline; nothing sleeps to wait.

use std::time::Duration;

use async_nats::jetstream;
use dispatcher_actors::{
    handler_fn, DispatcherConfig, Handlers, NodeId, TaskError, TaskHandler, TaskKind,
};
use dispatcher_nats::{LocalServer, Mode, Node, NodeOptions, Subjects};
use serde_json::{json, Value};
use tokio::sync::watch;

mod common;

use common::{eventually, next_json, request, subscribe, DEADLINE};

fn kind(name: &str) -> TaskKind {
    TaskKind::new(name).unwrap()
}

/// A handler that reports `first`, waits until `gate` opens, reports
/// `last` ("almost"), then completes, or with `fail`, fails for good.
fn gated(gate: watch::Receiver<bool>, first: &[u8], last: u8, fail: bool) -> impl TaskHandler {
    let first = first.to_vec();
    handler_fn(move |ctx, p| {
        let (mut gate, first) = (gate.clone(), first.clone());
        async move {
            for (i, percent) in first.iter().enumerate() {
                ctx.progress(*percent, format!("step {i}"));
            }
            let _ = gate.wait_for(|open| *open).await;
            ctx.progress(last, "almost");
            if fail {
                return Err(TaskError::permanent("failed at the end"));
            }
            Ok(p)
        }
    })
}

async fn start_node(
    url: &str,
    prefix: &str,
    id: &str,
    handlers: Handlers,
    linger: Duration,
) -> Node {
    start_sized(url, prefix, id, handlers, linger, (2, 20)).await
}

/// A node with `workers` and a local queue of `queue`.
async fn start_sized(
    url: &str,
    prefix: &str,
    id: &str,
    handlers: Handlers,
    linger: Duration,
    (workers, queue): (usize, usize),
) -> Node {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let mut config = DispatcherConfig::new(NodeId::new(id).unwrap());
    config.workers = workers;
    config.queue_capacity = Some(queue);
    config.keep_alive_interval = Duration::from_secs(5);
    let mut options = NodeOptions {
        prefix: prefix.to_owned(),
        mode: Mode::JetStream,
        heartbeat_interval: Duration::from_secs(3600),
        shutdown_timeout: Duration::from_millis(300),
        ..NodeOptions::default()
    };
    options.jetstream.idle_poll = Duration::from_secs(3600);
    options.jetstream.record_linger = linger;
    let nats = async_nats::connect(url).await.unwrap();
    Node::start(nats, config, handlers, options).await.unwrap()
}

async fn kv_record(client: &async_nats::Client, subjects: &Subjects, id: &str) -> Option<Value> {
    let kv = jetstream::new(client.clone())
        .get_key_value(subjects.bucket_tasks())
        .await
        .unwrap();
    let bytes = kv.get(id).await.unwrap()?;
    Some(serde_json::from_slice(&bytes).unwrap())
}

/// Polls the KV record of `id` until `check` holds.
async fn record_until(
    client: &async_nats::Client,
    subjects: &Subjects,
    id: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    eventually(DEADLINE, || async {
        kv_record(client, subjects, id).await.filter(|r| check(r))
    })
    .await
}

/// Writes to the task records bucket so far (each create and update is
/// one message of its stream).
async fn record_writes(client: &async_nats::Client, subjects: &Subjects) -> u64 {
    let mut stream = jetstream::new(client.clone())
        .get_stream(Subjects::kv_stream(&subjects.bucket_tasks()))
        .await
        .unwrap();
    stream.info().await.unwrap().state.last_sequence
}

/// Events until `id` has one named `name`; answers them all.
async fn until(sub: &mut async_nats::Subscriber, id: &str, name: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let e = next_json(sub).await.1;
        let done = e["task_id"] == id && e["event"] == name;
        seen.push(e);
        if done {
            return seen;
        }
    }
}

#[actix::test]
async fn progress_reaches_the_record_while_the_task_runs() {
    let server = LocalServer::start().unwrap();
    let subjects = Subjects::new("rp").unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut events = subscribe(&client, format!("{}.events.>", subjects.prefix())).await;
    let (open, gate) = watch::channel(false);
    // A burst of reports: only some reach KV, the last one among them.
    let burst: Vec<u8> = (0..100).map(|i| (i % 42) as u8).chain([42]).collect();
    let mut handlers = Handlers::new();
    handlers.insert(kind("report"), gated(gate, &burst, 77, false));
    let node = start_node(
        &server.url(),
        "rp",
        "n1",
        handlers,
        NodeOptions::default().jetstream.record_linger,
    )
    .await;

    let before = record_writes(&client, &subjects).await;
    let begun = tokio::time::Instant::now();
    let r = request(&client, subjects.submit("report"), json!({"id": "p1"})).await;
    assert_eq!(r["ok"], true, "{r}");
    until(&mut events, "p1", "started").await;
    let running = record_until(&client, &subjects, "p1", |r| r["progress"] == 42).await;
    assert_eq!(running["status"], "running", "{running}");
    assert_eq!(running["message"], "step 100", "{running}");
    // Throttled: the record's create, then at most one write per 500 ms
    // of the run so far (and one at its start), not one per report (101
    // of them).
    let writes = record_writes(&client, &subjects).await - before;
    eprintln!(
        "{writes} record writes for 101 reports in {:?}",
        begun.elapsed()
    );
    let allowed = 1 + 2 + begun.elapsed().as_millis() as u64 / 500;
    assert!(
        writes <= allowed,
        "{writes} record writes for 101 reports in {:?}",
        begun.elapsed()
    );

    // The last report and the end: the record keeps the last message.
    open.send(true).unwrap();
    until(&mut events, "p1", "completed").await;
    let done = record_until(&client, &subjects, "p1", |r| r["status"] == "completed").await;
    assert_eq!(done["message"], "almost", "{done}");
    assert_eq!(done["progress"], 100, "{done}");
    node.shutdown().await;
}

#[actix::test]
async fn the_last_progress_is_folded_into_the_final_write() {
    let server = LocalServer::start().unwrap();
    let subjects = Subjects::new("rf").unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut events = subscribe(&client, format!("{}.events.>", subjects.prefix())).await;
    let (open, gate) = watch::channel(false);
    let mut handlers = Handlers::new();
    handlers.insert(kind("report"), gated(gate, &[10], 77, true));
    // A linger longer than the test: nothing but the end is written.
    let node = start_node(
        &server.url(),
        "rf",
        "n1",
        handlers,
        Duration::from_secs(3600),
    )
    .await;
    let r = request(
        &client,
        subjects.submit("report"),
        json!({"id": "p2", "max_attempts": 1}),
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    let seen = until(&mut events, "p2", "progress").await;
    assert_eq!(seen.last().unwrap()["progress"], 10);
    let before = record_writes(&client, &subjects).await;
    open.send(true).unwrap();
    let seen = until(&mut events, "p2", "failed").await;
    assert!(
        seen.iter()
            .any(|e| e["event"] == "progress" && e["progress"] == 77),
        "{seen:?}"
    );
    let done = record_until(&client, &subjects, "p2", |r| r["status"] == "failed").await;
    assert_eq!(done["progress"], 77, "{done}");
    assert_eq!(done["message"], "almost", "{done}");
    // One write for the end, with the progress in it.
    assert_eq!(record_writes(&client, &subjects).await - before, 1);
    node.shutdown().await;
}
