//! Mode `jetstream` against a real nats-server (file storage, its own
//! store directory): durable submits, records in KV, tasks published with
//! no node online, duplicate ids across nodes, strict priority across a
//! backlog, cancel in the stream / queued / running on another node,
//! retries counted by delivery, the dead-letter stream, and a graceful
//! shutdown that hands tasks to another node without waiting for AckWait.
//! Every wait has a deadline; nothing sleeps to wait.

use std::time::Duration;

use async_nats::jetstream;
use dispatcher_actors::TaskDefaults;
use dispatcher_actors::{handler_fn, DispatcherConfig, Handlers, NodeId, TaskError, TaskKind};
use dispatcher_nats::codec::Limits;
use dispatcher_nats::inbound::{digest, Reader};
use dispatcher_nats::{LocalServer, Mode, Node, NodeOptions, Subjects};
use serde_json::{json, Value};

mod common;

use common::{next_json, request, subscribe, DEADLINE};

fn kind(name: &str) -> TaskKind {
    TaskKind::new(name).unwrap()
}

/// `echo`; `fail` (always fails); `gate` (runs until cancelled, or, with
/// `quick`, completes at once).
fn handlers(quick_gate: bool, serve_gate: bool) -> Handlers {
    let mut h = Handlers::new();
    h.insert(kind("echo"), handler_fn(|_ctx, p| async move { Ok(p) }));
    h.insert(
        kind("fail"),
        handler_fn(|_ctx, _p| async move { Err(TaskError::new("always fails")) }),
    );
    if serve_gate {
        h.insert(
            kind("gate"),
            handler_fn(move |ctx, p| async move {
                if !quick_gate {
                    ctx.cancelled().await;
                    return Err(TaskError::new("cancelled"));
                }
                Ok(p)
            }),
        );
    }
    h
}

struct Setup {
    heartbeat: Duration,
    workers: usize,
    queue: usize,
    quick_gate: bool,
    serve_gate: bool,
    record_linger: Duration,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(3600),
            workers: 2,
            queue: 20,
            quick_gate: false,
            serve_gate: true,
            record_linger: NodeOptions::default().jetstream.record_linger,
        }
    }
}

async fn start_node(url: &str, prefix: &str, id: &str, setup: Setup) -> Node {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let mut config = DispatcherConfig::new(NodeId::new(id).unwrap());
    config.workers = setup.workers;
    config.queue_capacity = Some(setup.queue);
    config.keep_alive_interval = Duration::from_secs(5);
    let mut options = NodeOptions {
        prefix: prefix.to_owned(),
        mode: Mode::JetStream,
        heartbeat_interval: setup.heartbeat,
        shutdown_timeout: Duration::from_millis(300),
        ..NodeOptions::default()
    };
    // Waiting pulls outlive every test: nothing may depend on renewing
    // them (new tasks and redeliveries are pushed to them).
    options.jetstream.idle_poll = Duration::from_secs(3600);
    options.jetstream.record_linger = setup.record_linger;
    let nats = async_nats::connect(url).await.unwrap();
    Node::start(
        nats,
        config,
        handlers(setup.quick_gate, setup.serve_gate),
        options,
    )
    .await
    .unwrap()
}

async fn next_event(sub: &mut async_nats::Subscriber) -> Value {
    next_json(sub).await.1
}

/// Events until `id` has one named `name`; answers them all.
async fn until(sub: &mut async_nats::Subscriber, id: &str, name: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let e = next_event(sub).await;
        let done = e["task_id"] == id && e["event"] == name;
        seen.push(e);
        if done {
            return seen;
        }
    }
}

async fn kv_record(client: &async_nats::Client, bucket: &str, id: &str) -> Option<Value> {
    let kv = jetstream::new(client.clone())
        .get_key_value(bucket)
        .await
        .unwrap();
    let bytes = kv.get(id).await.unwrap()?;
    Some(serde_json::from_slice(&bytes).unwrap())
}

/// Polls the KV record until `check` holds (records are written off the
/// hot path, just after the events).
async fn record_until(
    client: &async_nats::Client,
    bucket: &str,
    id: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(r) = kv_record(client, bucket, id).await {
            if check(&r) {
                return r;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "record of {id} not as expected within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes to the task records bucket so far: the last sequence of its
/// stream (every create and update is one message).
async fn record_writes(client: &async_nats::Client, subjects: &Subjects) -> u64 {
    let mut stream = jetstream::new(client.clone())
        .get_stream(Subjects::kv_stream(&subjects.bucket_tasks()))
        .await
        .unwrap();
    stream.info().await.unwrap().state.last_sequence
}

#[actix::test]
async fn a_task_that_ends_within_the_linger_costs_one_record_write() {
    let server = LocalServer::start().unwrap();
    let setup = Setup {
        record_linger: Duration::from_secs(3600),
        ..Setup::default()
    };
    let node = start_node(&server.url(), "jl", "n1", setup).await;
    let subjects = Subjects::new("jl").unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let mut events = subscribe(&client, format!("{}.events.>", subjects.prefix())).await;

    // Through submit: the gateway creates the record, the node takes it
    // (a write fenced by revision, against a cancel of the control API)
    // and writes its end; `started` is folded into that write.
    let r = request(&client, subjects.submit("echo"), json!({"id": "s1"})).await;
    assert_eq!(r["ok"], true);
    until(&mut events, "s1", "completed").await;
    let record = record_until(&client, &subjects.bucket_tasks(), "s1", |r| {
        r["status"] == "completed"
    })
    .await;
    assert!(record["started_at"].is_string(), "{record}");
    assert_eq!(record_writes(&client, &subjects).await, 3);

    // Straight onto the queue: no record yet; the node that pulls it
    // creates it before it runs (so that no other message with its id can
    // claim it), and writes its end.
    js.publish(
        subjects.task("echo", dispatcher_actors::Priority::Normal),
        json!({"id": "d1"}).to_string().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    until(&mut events, "d1", "completed").await;
    record_until(&client, &subjects.bucket_tasks(), "d1", |r| {
        r["status"] == "completed"
    })
    .await;
    assert_eq!(record_writes(&client, &subjects).await, 5);
    node.shutdown().await;
}

#[actix::test]
async fn a_running_record_waits_the_linger_and_shutdown_writes_what_waits() {
    let server = LocalServer::start().unwrap();
    let subjects = Subjects::new("jw").unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut events = subscribe(&client, format!("{}.events.>", subjects.prefix())).await;

    // A short linger: a task that keeps running shows `running`.
    let setup = Setup {
        record_linger: Duration::from_millis(100),
        ..Setup::default()
    };
    let node = start_node(&server.url(), "jw", "n1", setup).await;
    let r = request(&client, subjects.submit("gate"), json!({"id": "g1"})).await;
    assert_eq!(r["ok"], true);
    until(&mut events, "g1", "started").await;
    let running = record_until(&client, &subjects.bucket_tasks(), "g1", |r| {
        r["status"] == "running"
    })
    .await;
    assert_eq!(running["node"], "n1");
    node.shutdown().await;

    // A linger longer than the test: only shutdown writes the running
    // record of the task it interrupts, and it does before it returns.
    let setup = Setup {
        record_linger: Duration::from_secs(3600),
        ..Setup::default()
    };
    let node = start_node(&server.url(), "jw", "n2", setup).await;
    until(&mut events, "g1", "started").await;
    let report = node.shutdown().await;
    assert_eq!(report.interrupted, 1, "{report:?}");
    let record = kv_record(&client, &subjects.bucket_tasks(), "g1")
        .await
        .expect("the record");
    assert_eq!(record["status"], "retrying", "{record}");
    assert_eq!(record["node"], "n2");
    assert_eq!(record["attempt"], 2);
}

#[actix::test]
async fn a_submitted_task_is_durable_and_its_record_shared_in_kv() {
    let server = LocalServer::start().unwrap();
    let node = start_node(&server.url(), "j1", "n1", Setup::default()).await;
    let subjects = Subjects::new("j1").unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut events = subscribe(&client, subjects.task_events("t1")).await;

    let reply = request(
        &client,
        subjects.submit("echo"),
        json!({"id": "t1", "payload": {"x": 1}, "priority": "high"}),
    )
    .await;
    assert_eq!(
        reply,
        json!({"ok": true, "id": "t1", "kind": "echo", "priority": "high"})
    );
    let seen = until(&mut events, "t1", "completed").await;
    let names: Vec<_> = seen.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert!(
        names.contains(&"accepted") && names.contains(&"started"),
        "{names:?}"
    );
    assert_eq!(seen.last().unwrap()["result"], json!({"x": 1}));

    // Any language reads the record with a plain KV get.
    let record = record_until(&client, &subjects.bucket_tasks(), "t1", |r| {
        r["status"] == "completed"
    })
    .await;
    assert_eq!(record["node"], "n1");
    assert_eq!(record["attempt"], 1);
    assert_eq!(record["result"], json!({"x": 1}));
    // The control API answers from KV.
    let status = request(
        &client,
        subjects.api(dispatcher_nats::ApiEndpoint::Status),
        json!({"id": "t1"}),
    )
    .await;
    assert_eq!(status["task"]["status"], "completed");
    // Stats: this node, and the backlog of each consumer it made.
    let stats = request(
        &client,
        subjects.api(dispatcher_nats::ApiEndpoint::Stats),
        json!({}),
    )
    .await;
    assert_eq!(stats["node"], "n1");
    let backlog = stats["backlog"]
        .as_array()
        .expect("backlog in jetstream mode");
    let echo_high = backlog
        .iter()
        .find(|c| c["subject"] == "j1.tasks.echo.high")
        .expect("a consumer for echo, high");
    assert_eq!(echo_high["consumer"], "echo_high");
    assert_eq!(echo_high["pending"], 0);
    // The work-queue stream is empty again: the task was acked.
    let mut stream = jetstream::new(client.clone())
        .get_stream(subjects.stream_tasks())
        .await
        .unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 0);
    node.shutdown().await;
}

#[actix::test]
async fn a_task_published_with_no_node_online_runs_when_one_starts() {
    let server = LocalServer::start().unwrap();
    let subjects = Subjects::new("j2").unwrap();
    // A first node creates the stream, then goes away.
    start_node(&server.url(), "j2", "n1", Setup::default())
        .await
        .shutdown()
        .await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    js.publish(
        subjects.task("echo", dispatcher_actors::Priority::Normal),
        json!({"id": "offline-1", "payload": "hi"})
            .to_string()
            .into(),
    )
    .await
    .unwrap()
    .await
    .expect("stored while no node is online");
    let mut events = subscribe(&client, subjects.task_events("offline-1")).await;
    let node = start_node(&server.url(), "j2", "n2", Setup::default()).await;
    let seen = until(&mut events, "offline-1", "completed").await;
    // Published straight to the queue: the node that takes it says accepted.
    assert_eq!(seen[0]["event"], "accepted");
    assert_eq!(seen.last().unwrap()["node"], "n2");
    // The node that pulled it created its record.
    let record = record_until(&client, &subjects.bucket_tasks(), "offline-1", |r| {
        r["status"] == "completed"
    })
    .await;
    assert_eq!(record["result"], "hi");
    node.shutdown().await;
}

#[actix::test]
async fn duplicate_ids_are_refused_across_nodes() {
    let server = LocalServer::start().unwrap();
    let a = start_node(&server.url(), "j3", "a", Setup::default()).await;
    let b = start_node(&server.url(), "j3", "b", Setup::default()).await;
    let subjects = Subjects::new("j3").unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut codes = Vec::new();
    for _ in 0..6 {
        let r = request(&client, subjects.submit("echo"), json!({"id": "same"})).await;
        codes.push(if r["ok"] == true {
            "ok".to_owned()
        } else {
            r["error"]["code"].as_str().unwrap().to_owned()
        });
    }
    assert_eq!(codes[0], "ok");
    assert!(codes[1..].iter().all(|c| c == "duplicate_id"), "{codes:?}");
    a.shutdown().await;
    b.shutdown().await;
}

#[actix::test]
async fn a_critical_task_starts_next_behind_a_backlog_of_low_ones() {
    let server = LocalServer::start().unwrap();
    let subjects = Subjects::new("j4").unwrap();
    let node = start_node(
        &server.url(),
        "j4",
        "n1",
        Setup {
            workers: 1,
            queue: 1,
            ..Setup::default()
        },
    )
    .await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut started = subscribe(&client, format!("{}.events.*.*.started", subjects.prefix())).await;
    // Hold the only worker.
    let r = request(&client, subjects.submit("gate"), json!({"id": "blocker"})).await;
    assert_eq!(r["ok"], true);
    assert_eq!(next_event(&mut started).await["task_id"], "blocker");
    // 10 000 low tasks, then one critical, all durable before going on.
    let js = jetstream::new(client.clone());
    let low = subjects.task("echo", dispatcher_actors::Priority::Low);
    for chunk in 0..20 {
        let mut acks = Vec::new();
        for i in chunk * 500..(chunk + 1) * 500 {
            let body = json!({"id": format!("low-{i}")}).to_string();
            acks.push(js.publish(low.clone(), body.into()).await.unwrap());
        }
        for ack in acks {
            ack.await.unwrap();
        }
    }
    let critical = subjects.task("echo", dispatcher_actors::Priority::Critical);
    js.publish(critical, json!({"id": "urgent"}).to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
    // Free the worker: at most the one low task already queued on the
    // node may go first; then the critical one.
    let r = request(
        &client,
        subjects.api(dispatcher_nats::ApiEndpoint::Cancel),
        json!({"id": "blocker"}),
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    let mut order = Vec::new();
    while order.len() < 2 {
        let e = next_event(&mut started).await;
        order.push(e["task_id"].as_str().unwrap().to_owned());
        if order.last().unwrap() == "urgent" {
            break;
        }
    }
    assert!(order.contains(&"urgent".to_owned()), "started: {order:?}");
    node.shutdown().await;
}

#[actix::test]
async fn cancel_works_in_the_stream_queued_and_running_on_another_node() {
    let server = LocalServer::start().unwrap();
    let subjects = Subjects::new("j5").unwrap();
    let node = start_node(
        &server.url(),
        "j5",
        "holder",
        Setup {
            workers: 1,
            queue: 1,
            ..Setup::default()
        },
    )
    .await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut events = subscribe(&client, format!("{}.events.>", subjects.prefix())).await;
    for id in ["running", "queued", "in-stream"] {
        let r = request(&client, subjects.submit("gate"), json!({"id": id})).await;
        assert_eq!(r["ok"], true, "{r}");
    }
    until(&mut events, "running", "started").await;
    // The queued one is on the node, the last in the stream (queue of 1).
    let running = record_until(&client, &subjects.bucket_tasks(), "running", |r| {
        r["status"] == "running"
    })
    .await;
    // A running task's record names its delivery, for a reclaim.
    assert!(
        running["ack"]
            .as_str()
            .is_some_and(|a| a.starts_with("$JS.ACK.")),
        "{running}"
    );

    // A second node that holds none of them takes the cancel requests: the
    // service's queue group may send each to either node.
    let other = start_node(
        &server.url(),
        "j5",
        "other",
        Setup {
            serve_gate: false,
            ..Setup::default()
        },
    )
    .await;
    let api = subjects.api(dispatcher_nats::ApiEndpoint::Cancel);
    // No node has taken it: its record ends `cancelled` at once, and the
    // holder terminates its message when it pulls it.
    let r = request(&client, api.clone(), json!({"id": "in-stream"})).await;
    assert_eq!(r, json!({"ok": true, "status": "cancelled"}));
    record_until(&client, &subjects.bucket_tasks(), "in-stream", |r| {
        r["status"] == "cancelled"
    })
    .await;
    // The others are held: the holder cancels them on a request in the
    // cancel bucket.
    for id in ["queued", "running"] {
        let r = request(&client, api.clone(), json!({"id": id})).await;
        assert_eq!(r["ok"], true, "{id}: {r}");
    }
    let mut cancelled = std::collections::BTreeSet::new();
    let mut started_after = Vec::new();
    while cancelled.len() < 3 {
        let e = next_event(&mut events).await;
        match e["event"].as_str().unwrap() {
            "cancelled" => {
                cancelled.insert(e["task_id"].as_str().unwrap().to_owned());
            }
            "started" => started_after.push(e["task_id"].as_str().unwrap().to_owned()),
            _ => {}
        }
    }
    assert!(
        !started_after.contains(&"in-stream".to_owned()),
        "a task cancelled in the stream never runs: {started_after:?}"
    );
    for id in ["in-stream", "queued", "running"] {
        record_until(&client, &subjects.bucket_tasks(), id, |r| {
            r["status"] == "cancelled"
        })
        .await;
    }
    // Cancelling again is refused as finished.
    let r = request(&client, api, json!({"id": "running"})).await;
    assert_eq!(r["error"]["code"], "already_finished", "{r}");
    node.shutdown().await;
    other.shutdown().await;
}

#[actix::test]
async fn retries_count_deliveries_and_spent_tasks_go_to_the_dead_letter_stream() {
    let server = LocalServer::start().unwrap();
    let subjects = Subjects::new("j6").unwrap();
    let node = start_node(&server.url(), "j6", "n1", Setup::default()).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut events = subscribe(&client, subjects.task_events("doomed")).await;
    let r = request(
        &client,
        subjects.submit("fail"),
        json!({"id": "doomed", "max_attempts": 3, "backoff": {"initial_ms": 10, "max_ms": 20}}),
    )
    .await;
    assert_eq!(r["ok"], true);
    let seen = until(&mut events, "doomed", "failed").await;
    let attempts: Vec<(String, u64)> = seen
        .iter()
        .filter(|e| e["event"] != "accepted")
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_owned(),
                e["attempt"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        attempts,
        [
            ("started".to_owned(), 1),
            ("retrying".to_owned(), 1),
            ("started".to_owned(), 2),
            ("retrying".to_owned(), 2),
            ("started".to_owned(), 3),
            ("failed".to_owned(), 3),
        ]
    );
    // The dead letter, with the last error and the task to replay.
    let js = jetstream::new(client.clone());
    let stream = js.get_stream(subjects.stream_dead()).await.unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let letter = loop {
        match stream
            .get_last_raw_message_by_subject(&subjects.dead("fail"))
            .await
        {
            Ok(m) => break m,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("no dead letter within 10 s: {e}"),
        }
    };
    let letter: Value = serde_json::from_slice(&letter.payload).unwrap();
    assert_eq!(letter["id"], "doomed");
    assert_eq!(letter["attempts"], 3);
    assert_eq!(letter["error"]["message"], "always fails");
    assert_eq!(letter["task"]["max_attempts"], 3);
    node.shutdown().await;
}

#[actix::test]
async fn graceful_shutdown_hands_tasks_to_another_node_at_once() {
    let server = LocalServer::start().unwrap();
    let subjects = Subjects::new("j7").unwrap();
    // The first node's gate never opens by itself.
    let first = start_node(
        &server.url(),
        "j7",
        "first",
        Setup {
            workers: 1,
            queue: 5,
            ..Setup::default()
        },
    )
    .await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut events = subscribe(&client, format!("{}.events.>", subjects.prefix())).await;
    for i in 0..6 {
        let r = request(
            &client,
            subjects.submit("gate"),
            json!({"id": format!("g{i}")}),
        )
        .await;
        assert_eq!(r["ok"], true);
    }
    until(&mut events, "g0", "started").await;
    record_until(&client, &subjects.bucket_tasks(), "g0", |r| {
        r["status"] == "running"
    })
    .await;
    let report = first.shutdown().await;
    assert_eq!(report.interrupted, 1, "{report:?}");

    // The second node completes all six well before AckWait (30 s) would
    // have given them back.
    let second = start_node(
        &server.url(),
        "j7",
        "second",
        Setup {
            quick_gate: true,
            ..Setup::default()
        },
    )
    .await;
    let mut done = std::collections::BTreeSet::new();
    while done.len() < 6 {
        let e = next_event(&mut events).await;
        if e["event"] == "completed" {
            assert_eq!(e["node"], "second");
            done.insert(e["task_id"].as_str().unwrap().to_owned());
        }
    }
    // The interrupted attempt counts: g0 ran its second attempt.
    let g0 = record_until(&client, &subjects.bucket_tasks(), "g0", |r| {
        r["status"] == "completed"
    })
    .await;
    assert_eq!(g0["attempt"], 2);
    second.shutdown().await;
}

#[actix::test]
async fn a_retried_submit_whose_first_publish_was_lost_is_queued_not_refused() {
    let server = LocalServer::start().unwrap();
    let subjects = Subjects::new("j8").unwrap();
    let node = start_node(&server.url(), "j8", "n1", Setup::default()).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    // As if a gateway had stored the record and lost the server before the
    // publish: a `queued` record, no message.
    let kv = jetstream::new(client.clone())
        .get_key_value(subjects.bucket_tasks())
        .await
        .unwrap();
    // The record names the body the gateway stored: the same request
    // makes the same body.
    let reader = Reader::new(subjects.clone(), Limits::default(), TaskDefaults::default());
    let task = reader
        .queued(
            &subjects.task("echo", dispatcher_actors::Priority::Normal),
            None,
            json!({"id": "lost-1", "payload": 7}).to_string().as_bytes(),
        )
        .unwrap();
    let body_digest = digest(&reader.stored_body(&task).unwrap());
    let record = json!({
        "id": "lost-1", "kind": "echo", "priority": "normal", "status": "queued",
        "attempt": 1, "max_attempts": 3, "node": null, "worker": null,
        "progress": null, "message": null,
        "created_at": dispatcher_actors::Timestamp::now(),
        "started_at": null, "finished_at": null, "result": null, "error": null,
        "digest": body_digest,
    });
    kv.create("lost-1", record.to_string().into())
        .await
        .unwrap();
    let mut events = subscribe(&client, subjects.task_events("lost-1")).await;
    // Another body under its id is not the lost one: a duplicate.
    let r = request(
        &client,
        subjects.submit("echo"),
        json!({"id": "lost-1", "payload": 8}),
    )
    .await;
    assert_eq!(r["error"]["code"], "duplicate_id", "{r}");
    let r = request(
        &client,
        subjects.submit("echo"),
        json!({"id": "lost-1", "payload": 7}),
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    let seen = until(&mut events, "lost-1", "completed").await;
    assert_eq!(seen.last().unwrap()["result"], 7);
    // Now it is no longer queued: the same id again is a duplicate.
    let r = request(&client, subjects.submit("echo"), json!({"id": "lost-1"})).await;
    assert_eq!(r["error"]["code"], "duplicate_id", "{r}");
    node.shutdown().await;
}

#[actix::test]
async fn a_late_result_of_a_superseded_attempt_does_not_overwrite_the_record() {
    let server = LocalServer::start().unwrap();
    let subjects = Subjects::new("j9").unwrap();
    let node = start_node(
        &server.url(),
        "j9",
        "slow",
        Setup {
            heartbeat: Duration::from_millis(100),
            ..Setup::default()
        },
    )
    .await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut events = subscribe(&client, subjects.task_events("late")).await;
    let mut metrics = subscribe(&client, subjects.metrics("slow")).await;
    let r = request(&client, subjects.submit("gate"), json!({"id": "late"})).await;
    assert_eq!(r["ok"], true);
    until(&mut events, "late", "started").await;
    record_until(&client, &subjects.bucket_tasks(), "late", |r| {
        r["status"] == "running"
    })
    .await;

    // Meanwhile another node took the task over and runs attempt 2.
    let kv = jetstream::new(client.clone())
        .get_key_value(subjects.bucket_tasks())
        .await
        .unwrap();
    let mut newer = kv_record(&client, &subjects.bucket_tasks(), "late")
        .await
        .unwrap();
    newer["attempt"] = json!(2);
    newer["node"] = json!("other");
    kv.put("late", newer.to_string().into()).await.unwrap();

    // The slow node's attempt 1 ends late: its write is discarded, counted.
    let r = request(
        &client,
        subjects.api(dispatcher_nats::ApiEndpoint::Cancel),
        json!({"id": "late"}),
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    until(&mut events, "late", "cancelled").await;
    let counted = tokio::time::timeout(DEADLINE, async {
        loop {
            let snapshot = next_event(&mut metrics).await;
            if snapshot["records"]["stale"].as_u64().unwrap_or(0) >= 1 {
                break;
            }
        }
    })
    .await;
    assert!(counted.is_ok(), "no stale write counted within 10 s");
    let record = kv_record(&client, &subjects.bucket_tasks(), "late")
        .await
        .unwrap();
    assert_eq!(record["attempt"], 2, "{record}");
    assert_eq!(record["node"], "other", "{record}");
    assert_eq!(record["status"], "running", "{record}");
    // The control API answers from KV, the cluster's view, not from this
    // node's registry (which holds its own, cancelled, attempt 1).
    let status = request(
        &client,
        subjects.api(dispatcher_nats::ApiEndpoint::Status),
        json!({"id": "late"}),
    )
    .await;
    assert_eq!(status["task"]["node"], "other", "{status}");
    let list = request(
        &client,
        subjects.api(dispatcher_nats::ApiEndpoint::List),
        json!({"kind": "gate"}),
    )
    .await;
    assert_eq!(list["tasks"][0]["node"], "other", "{list}");
    assert_eq!(list["tasks"][0]["attempt"], 2, "{list}");
    node.shutdown().await;
}
