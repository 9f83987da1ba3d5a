//! What a cluster tells its users, checked from outside against real
//! nats-server processes: a node that cannot run work takes none, and a
//! node that was not running for a while does not take its live peers for
//! dead on what it knew before. Every wait has a deadline.

use std::time::Duration;

use dispatcher_actors::{handler_fn, DispatcherConfig, Handlers, NodeId, RestartPolicy, TaskKind};
use dispatcher_nats::{LocalServer, Mode, Node, NodeOptions};
use serde_json::json;

mod common;

use common::{next_json, request, subscribe};

fn kind(name: &str) -> TaskKind {
    TaskKind::new(name).unwrap()
}

/// A jetstream node with one worker serving `echo`, and `boom` (panics)
/// if `with_boom`; a slot that crashes once is disabled.
async fn start_node(url: &str, id: &str, with_boom: bool) -> Node {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let mut config = DispatcherConfig::new(NodeId::new(id).unwrap());
    config.workers = 1;
    config.restart = RestartPolicy {
        max_restarts: 0,
        ..RestartPolicy::default()
    };
    let mut handlers = Handlers::new();
    handlers.insert(kind("echo"), handler_fn(|_ctx, p| async move { Ok(p) }));
    if with_boom {
        handlers.insert(
            kind("boom"),
            handler_fn(|_ctx, _p| async move { panic!("boom") }),
        );
    }
    let mut options = NodeOptions {
        mode: Mode::JetStream,
        heartbeat_interval: Duration::from_millis(200),
        shutdown_timeout: Duration::from_millis(300),
        ..NodeOptions::default()
    };
    options.jetstream.idle_poll = Duration::from_millis(200);
    let nats = async_nats::connect(url).await.unwrap();
    Node::start(nats, config, handlers, options).await.unwrap()
}

#[actix::test]
async fn a_node_with_every_slot_disabled_takes_no_work() {
    let server = LocalServer::start().expect("nats-server");
    let broken = start_node(&server.url(), "a-broken", true).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut events = subscribe(&client, "dispatch.events.>").await;
    let mut disabled = subscribe(&client, "dispatch.nodes.a-broken.worker_disabled").await;
    // Only the broken node serves `boom`: its one slot crashes, disabled.
    let r = request(
        &client,
        "dispatch.submit.boom",
        json!({"id": "b1", "max_attempts": 1}),
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    next_json(&mut disabled).await;
    // Its waiting pulls (200 ms) run out and are not renewed: three of
    // its snapshots later (200 ms apart), it holds none.
    let mut snapshots = subscribe(&client, "dispatch.metrics.a-broken").await;
    for _ in 0..3 {
        let (_, snapshot) = next_json(&mut snapshots).await;
        assert_eq!(snapshot["stats"]["workers"], 0, "{snapshot}");
        assert_eq!(snapshot["taking_work"], false, "{snapshot}");
    }
    let healthy = start_node(&server.url(), "b-healthy", false).await;
    let ids: Vec<String> = (0..10).map(|i| format!("e{i}")).collect();
    for id in &ids {
        let r = request(&client, "dispatch.submit.echo", json!({"id": id})).await;
        assert_eq!(r["ok"], true, "{r}");
    }
    let mut done = std::collections::BTreeSet::new();
    while done.len() < ids.len() {
        let (_, e) = next_json(&mut events).await;
        // `accepted` comes from whichever gateway stored the task.
        if e["kind"] != "echo" || e["event"] == "accepted" {
            continue;
        }
        assert_ne!(e["node"], "a-broken", "the broken node took a task: {e}");
        if e["event"] == "completed" {
            assert_eq!(e["attempt"], 1, "{e}");
            done.insert(e["task_id"].as_str().unwrap().to_owned());
        }
    }
    healthy.shutdown().await;
    broken.shutdown().await;
}

/// A jetstream node with `workers` workers serving `echo` and `gate` (runs
/// until cancelled), with a crash budget.
async fn start_gated(url: &str, id: &str, workers: usize, crash_budget: u32) -> Node {
    start_gated_polling(url, id, workers, crash_budget, Duration::from_secs(3600)).await
}

async fn start_gated_polling(
    url: &str,
    id: &str,
    workers: usize,
    crash_budget: u32,
    idle_poll: Duration,
) -> Node {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let mut config = DispatcherConfig::new(NodeId::new(id).unwrap());
    config.workers = workers;
    config.queue_capacity = Some(10);
    let mut handlers = Handlers::new();
    handlers.insert(kind("echo"), handler_fn(|_ctx, p| async move { Ok(p) }));
    handlers.insert(
        kind("gate"),
        handler_fn(|ctx, _p| async move {
            ctx.cancelled().await;
            Err(dispatcher_actors::TaskError::new("cancelled"))
        }),
    );
    let mut options = NodeOptions {
        mode: Mode::JetStream,
        heartbeat_interval: Duration::from_millis(200),
        shutdown_timeout: Duration::from_millis(300),
        ..NodeOptions::default()
    };
    options.jetstream.idle_poll = idle_poll;
    options.jetstream.crash_budget = crash_budget;
    let nats = async_nats::connect(url).await.unwrap();
    Node::start(nats, config, handlers, options).await.unwrap()
}

/// Tasks a node held but never started, handed back at a graceful
/// shutdown, have used no attempt: with `max_attempts` 1 they run once, to
/// completion, on the next node, as attempt 1.
#[actix::test]
async fn a_hand_back_uses_no_attempt() {
    let server = LocalServer::start().expect("nats-server");
    let first = start_gated(&server.url(), "first", 1, 20).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut events = subscribe(&client, "dispatch.events.>").await;
    // The one worker is held by a gate; the echoes wait behind it.
    let r = request(
        &client,
        "dispatch.submit.gate",
        json!({"id": "g", "max_attempts": 1}),
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    let ids: Vec<String> = (0..3).map(|i| format!("once-{i}")).collect();
    for id in &ids {
        let r = request(
            &client,
            "dispatch.submit.echo",
            json!({"id": id, "max_attempts": 1}),
        )
        .await;
        assert_eq!(r["ok"], true, "{r}");
    }
    // All four delivered to `first`: its stats say so.
    common::eventually(common::DEADLINE, || {
        let client = client.clone();
        async move {
            let stats = request(&client, "dispatch.api.stats", json!({})).await;
            (stats["stats"]["queued"] == 3 && stats["stats"]["running"] == 1).then_some(())
        }
    })
    .await;
    first.shutdown().await;
    let second = start_gated(&server.url(), "second", 2, 20).await;
    let mut done = std::collections::BTreeSet::new();
    while done.len() < ids.len() {
        let (_, e) = next_json(&mut events).await;
        if e["kind"] != "echo" || e["event"] == "accepted" {
            continue;
        }
        assert_ne!(e["event"], "failed", "{e}");
        if e["event"] == "started" || e["event"] == "completed" {
            assert_eq!(e["node"], "second", "{e}");
            assert_eq!(e["attempt"], 1, "{e}");
        }
        if e["event"] == "completed" {
            done.insert(e["task_id"].as_str().unwrap().to_owned());
        }
    }
    second.shutdown().await;
}

/// A task whose deliveries begin no attempt, again and again, fails with
/// `crash_budget_exhausted` (and is dead-lettered) instead of going round
/// for ever.
#[actix::test]
async fn deliveries_that_begin_no_attempt_are_bounded_by_the_crash_budget() {
    use async_nats::jetstream::{self, consumer::AckPolicy};
    let server = LocalServer::start().expect("nats-server");
    let client = async_nats::connect(server.url()).await.unwrap();
    // A node made the streams and the consumer; it is gone now, and so
    // are its waiting pulls (100 ms) once the server counts none.
    start_gated_polling(&server.url(), "maker", 1, 20, Duration::from_millis(100))
        .await
        .shutdown()
        .await;
    let mut events = subscribe(&client, "dispatch.events.>").await;
    let js = jetstream::new(client.clone());
    let stream = js.get_stream("DISPATCH_TASKS").await.unwrap();
    let mut consumer: jetstream::consumer::PullConsumer =
        stream.get_consumer("echo_normal").await.unwrap();
    common::eventually(common::DEADLINE, || {
        let mut consumer = consumer.clone();
        async move { (consumer.info().await.ok()?.num_waiting == 0).then_some(()) }
    })
    .await;
    js.publish(
        "dispatch.tasks.echo.normal",
        json!({"id": "poisoned"}).to_string().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    // Two deliveries that begin nothing: as if two nodes died on it
    // before it started.
    assert_eq!(
        consumer.info().await.unwrap().config.ack_policy,
        AckPolicy::Explicit
    );
    for _ in 0..2 {
        let mut batch = consumer
            .batch()
            .max_messages(1)
            .expires(Duration::from_secs(5))
            .messages()
            .await
            .unwrap();
        let msg = tokio::time::timeout(common::DEADLINE, futures::StreamExt::next(&mut batch))
            .await
            .expect("a delivery within 10 s")
            .unwrap()
            .unwrap();
        msg.ack_with(async_nats::jetstream::AckKind::Nak(None))
            .await
            .unwrap();
    }
    let node = start_gated(&server.url(), "n1", 1, 1).await;
    loop {
        let (_, e) = next_json(&mut events).await;
        if e["task_id"] != "poisoned" || e["event"] == "accepted" {
            continue;
        }
        assert_eq!(e["event"], "failed", "{e}");
        assert_eq!(e["error"]["code"], "crash_budget_exhausted", "{e}");
        break;
    }
    let dead = js.get_stream("DISPATCH_DEAD").await.unwrap();
    common::eventually(common::DEADLINE, || {
        let mut dead = dead.clone();
        async move { (dead.info().await.ok()?.state.messages == 1).then_some(()) }
    })
    .await;
    node.shutdown().await;
}
