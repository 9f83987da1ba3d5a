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
