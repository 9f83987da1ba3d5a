//! Task records follow the task in mode `jetstream`, against a real
//! nats-server: a running task's progress reaches its KV record
//! (throttled, the last value kept by the final write), and a cancel of a
//! task no node has taken ends its record `cancelled` at once, with the
//! event, even when no node serves its kind; a node that pulls it later
//! terminates it unrun. A cancel racing a node that takes the task has
//! one winner. Every wait has a deadline; nothing sleeps to wait.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_nats::jetstream;
use dispatcher_actors::{
    handler_fn, DispatcherConfig, Handlers, NodeId, TaskError, TaskHandler, TaskKind,
};
use dispatcher_nats::{ApiEndpoint, LocalServer, Mode, Node, NodeOptions, Subjects};
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
    // Throttled: the record's create, its claim, then at most one write
    // per 500 ms of the run so far (and one at its start), not one per
    // report (101 of them).
    let writes = record_writes(&client, &subjects).await - before;
    eprintln!(
        "{writes} record writes for 101 reports in {:?}",
        begun.elapsed()
    );
    let allowed = 2 + 2 + begun.elapsed().as_millis() as u64 / 500;
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

#[actix::test]
async fn a_cancel_of_a_task_no_node_serves_ends_it_at_once_and_it_never_runs() {
    let server = LocalServer::start().unwrap();
    let subjects = Subjects::new("rc").unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut events = subscribe(&client, format!("{}.events.>", subjects.prefix())).await;
    // The only node serves `echo`, not `lonely`.
    let mut handlers = Handlers::new();
    handlers.insert(kind("echo"), handler_fn(|_ctx, p| async move { Ok(p) }));
    let first = start_node(
        &server.url(),
        "rc",
        "first",
        handlers,
        NodeOptions::default().jetstream.record_linger,
    )
    .await;

    // In mode jetstream the gateway stores any valid kind, for whichever
    // node serves it.
    let r = request(&client, subjects.submit("lonely"), json!({"id": "c1"})).await;
    assert_eq!(
        r,
        json!({"ok": true, "id": "c1", "kind": "lonely", "priority": "normal"})
    );
    let queued = record_until(&client, &subjects, "c1", |r| r["status"] == "queued").await;
    assert_eq!(queued["node"], Value::Null, "{queued}");

    let asked = tokio::time::Instant::now();
    let r = request(
        &client,
        subjects.api(ApiEndpoint::Cancel),
        json!({"id": "c1"}),
    )
    .await;
    assert_eq!(r, json!({"ok": true, "status": "cancelled"}));
    let seen = until(&mut events, "c1", "cancelled").await;
    let event = seen.last().unwrap().clone();
    let record = record_until(&client, &subjects, "c1", |r| r["status"] == "cancelled").await;
    eprintln!(
        "cancel of a task no node serves: reply, event and record within {:?}",
        asked.elapsed()
    );
    assert_eq!(event["attempt"], 1, "{event}");
    assert_eq!(event["node"], "first", "{event}");
    assert_eq!(record["attempt"], 1, "{record}");
    assert_eq!(record["finished_at"], event["ts"], "{record} {event}");
    assert_eq!(record["message"], event["reason"], "{record} {event}");
    let r = request(
        &client,
        subjects.api(ApiEndpoint::Cancel),
        json!({"id": "c1"}),
    )
    .await;
    assert_eq!(r["error"]["code"], "already_finished", "{r}");

    // A node that serves the kind comes: it pulls the cancelled task first
    // and terminates it; a later task of the kind runs, as a barrier.
    let mut handlers = Handlers::new();
    handlers.insert(kind("lonely"), handler_fn(|_ctx, p| async move { Ok(p) }));
    let second = start_node(
        &server.url(),
        "rc",
        "second",
        handlers,
        NodeOptions::default().jetstream.record_linger,
    )
    .await;
    let r = request(&client, subjects.submit("lonely"), json!({"id": "c2"})).await;
    assert_eq!(r["ok"], true, "{r}");
    let seen = until(&mut events, "c2", "completed").await;
    let about_c1: Vec<&Value> = seen.iter().filter(|e| e["task_id"] == "c1").collect();
    assert!(
        about_c1.is_empty(),
        "c1 never runs nor is cancelled again: {about_c1:?}"
    );
    // Its message is gone from the stream, its record unchanged.
    let js = jetstream::new(client.clone());
    eventually(DEADLINE, || async {
        let mut stream = js.get_stream(subjects.stream_tasks()).await.unwrap();
        (stream.info().await.unwrap().state.messages == 0).then_some(())
    })
    .await;
    // Whatever the pull of it did is said by now: a second barrier.
    let r = request(&client, subjects.submit("lonely"), json!({"id": "c3"})).await;
    assert_eq!(r["ok"], true, "{r}");
    let seen = until(&mut events, "c3", "completed").await;
    let about_c1: Vec<&Value> = seen.iter().filter(|e| e["task_id"] == "c1").collect();
    assert!(
        about_c1.is_empty(),
        "c1 never runs nor is cancelled again: {about_c1:?}"
    );
    assert_eq!(kv_record(&client, &subjects, "c1").await.unwrap(), record);
    first.shutdown().await;
    second.shutdown().await;
}

#[actix::test]
async fn a_cancel_racing_a_node_that_takes_the_task_has_one_winner() {
    let server = LocalServer::start().unwrap();
    let subjects = Subjects::new("rr").unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut events = subscribe(&client, format!("{}.events.>", subjects.prefix())).await;
    // One worker, a short queue, tasks of a few ms: most tasks wait in
    // the stream when their cancel comes, some are being pulled.
    let mut handlers = Handlers::new();
    handlers.insert(
        kind("work"),
        handler_fn(|_ctx, p| async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(p)
        }),
    );
    let node = start_sized(
        &server.url(),
        "rr",
        "n1",
        handlers,
        NodeOptions::default().jetstream.record_linger,
        (1, 1),
    )
    .await;

    // All stored, then each cancelled in turn: the cancel of one the node
    // holds frees room, and the node pulls the next one as its cancel
    // comes.
    const N: usize = 60;
    for i in 0..N {
        let r = request(
            &client,
            subjects.submit("work"),
            json!({"id": format!("t{i}")}),
        )
        .await;
        assert_eq!(r["ok"], true, "{r}");
    }
    let mut replies = BTreeMap::new();
    for i in 0..N {
        let id = format!("t{i}");
        let r = request(
            &client,
            subjects.api(ApiEndpoint::Cancel),
            json!({"id": id}),
        )
        .await;
        let outcome = match (&r["ok"], &r["status"]) {
            (Value::Bool(true), Value::String(s)) => s.clone(),
            _ => r["error"]["code"].as_str().unwrap().to_owned(),
        };
        replies.insert(id, outcome);
    }
    // Every task ends; the events of each, in order.
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut ended = BTreeSet::new();
    let mut before_start = 0;
    while ended.len() < N {
        let e = next_json(&mut events).await.1;
        let (id, name) = (e["task_id"].as_str().unwrap(), e["event"].as_str().unwrap());
        if matches!(name, "completed" | "cancelled") {
            ended.insert(id.to_owned());
        }
        if name == "cancelled" && e["reason"] == "cancelled on request before it started" {
            before_start += 1;
        }
        seen.entry(id.to_owned()).or_default().push(name.to_owned());
    }
    for (id, outcome) in &replies {
        let names = &seen[id];
        let end = names.last().unwrap().as_str();
        let record = record_until(&client, &subjects, id, |r| {
            r["status"] == "completed" || r["status"] == "cancelled"
        })
        .await;
        // The record tells the same end as the events.
        assert_eq!(record["status"], end, "{id}: {names:?} {record}");
        assert_eq!(
            names
                .iter()
                .filter(|n| *n == "completed" || *n == "cancelled")
                .count(),
            1,
            "{id}: one end: {names:?}"
        );
        match outcome.as_str() {
            // Cancelled before any node took it: it never started.
            "cancelled" => assert!(
                !names.iter().any(|n| n == "started"),
                "{id} cancelled at once but started: {names:?}"
            ),
            "cancelling" | "already_finished" => {}
            other => panic!("{id}: unexpected cancel reply {other}"),
        }
    }
    eprintln!(
        "{before_start} cancelled before any node took them; cancel replies: {:?}",
        replies.values().fold(BTreeMap::new(), |mut m, o| {
            *m.entry(o.as_str()).or_insert(0) += 1;
            m
        })
    );
    node.shutdown().await;
}
