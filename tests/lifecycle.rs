//! A task's life over NATS with the built-in handlers: priority order,
//! retries (`chaos` `fail_times`), timeouts, a panic the node survives
//! (`worker_restarted`), and cancel of a queued task. Subjects are spelled
//! out as a foreign client would; every wait has a deadline.

use std::time::Duration;

use dispatcher::handlers::{builtin_handlers, ExecOptions, HandlerOptions};
use dispatcher_actors::{Backoff, DispatcherConfig, NodeId};
use dispatcher_nats::{LocalServer, Node, NodeOptions};
use futures::StreamExt;
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(10);

async fn node(server: &LocalServer, prefix: &str, workers: usize) -> (async_nats::Client, Node) {
    let mut config = DispatcherConfig::new(NodeId::new("life").unwrap());
    config.workers = workers;
    config.defaults.backoff = Backoff {
        initial_ms: 10,
        max_ms: 50,
        multiplier: 2.0,
    };
    config.restart.backoff_initial = Duration::from_millis(10);
    config.cancel_grace = Duration::from_millis(100);
    let handlers = builtin_handlers(&HandlerOptions {
        enable_chaos: true,
        ..HandlerOptions::default()
    })
    .unwrap();
    let options = NodeOptions {
        prefix: prefix.to_owned(),
        ..NodeOptions::default()
    };
    let nats = async_nats::connect(server.url()).await.unwrap();
    let node = Node::start(nats, config, handlers, options).await.unwrap();
    (async_nats::connect(server.url()).await.unwrap(), node)
}

async fn submit(client: &async_nats::Client, subject: &str, body: Value) -> Value {
    let msg = tokio::time::timeout(
        DEADLINE,
        client.request(subject.to_owned(), body.to_string().into()),
    )
    .await
    .expect("reply within 10 s")
    .unwrap();
    let reply: Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    reply
}

/// Events on `sub` until `id` has a final one; returns them in order.
async fn until_final(sub: &mut async_nats::Subscriber, id: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let msg = tokio::time::timeout(DEADLINE, sub.next())
            .await
            .expect("event within 10 s")
            .unwrap();
        let e: Value = serde_json::from_slice(&msg.payload).unwrap();
        if e["task_id"] == id {
            let done = matches!(
                e["event"].as_str(),
                Some("completed" | "failed" | "timed_out" | "cancelled")
            );
            seen.push(e);
            if done {
                return seen;
            }
        }
    }
}

fn names(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect()
}

#[actix::test]
async fn retries_with_backoff_then_succeeds_and_timeouts_end_timed_out() {
    let server = LocalServer::start().unwrap();
    let (client, node) = node(&server, "l1", 2).await;
    let mut events = client.subscribe("l1.events.>").await.unwrap();
    client.flush().await.unwrap();

    submit(
        &client,
        "l1.submit.chaos",
        json!({"id": "flaky", "payload": {"fail_times": 2}, "max_attempts": 3}),
    )
    .await;
    let events_flaky = until_final(&mut events, "flaky").await;
    assert_eq!(
        names(&events_flaky),
        [
            "accepted",
            "started",
            "retrying",
            "started",
            "retrying",
            "started",
            "completed"
        ]
    );
    let retrying: Vec<_> = events_flaky
        .iter()
        .filter(|e| e["event"] == "retrying")
        .collect();
    assert_eq!(retrying[0]["attempt"], 1);
    assert_eq!(retrying[1]["attempt"], 2);
    assert_eq!(retrying[0]["error"]["code"], "handler_error");
    assert!(retrying[0]["retry_in_ms"].is_u64());
    assert_eq!(events_flaky.last().unwrap()["attempt"], 3);

    submit(
        &client,
        "l1.submit.sleep",
        json!({"id": "slow", "payload": {"ms": 60000}, "timeout_ms": 20, "max_attempts": 2}),
    )
    .await;
    let slow = until_final(&mut events, "slow").await;
    let retry = slow
        .iter()
        .find(|e| e["event"] == "retrying")
        .expect("a retry");
    assert_eq!(retry["error"]["code"], "timeout");
    let last = slow.last().unwrap();
    assert_eq!(last["event"], "timed_out");
    assert_eq!(last["timeout_ms"], 20);
    assert_eq!(last["status"], "timed_out");

    submit(
        &client,
        "l1.submit.chaos",
        json!({"id": "doomed", "payload": {"fail": "no luck"}, "max_attempts": 2}),
    )
    .await;
    let doomed = until_final(&mut events, "doomed").await;
    let last = doomed.last().unwrap();
    assert_eq!(last["event"], "failed");
    assert_eq!(last["error"]["message"], "no luck");
    assert!(last["duration_ms"].is_u64());
    node.shutdown().await;
}

#[actix::test]
async fn a_panic_restarts_the_worker_and_the_node_keeps_serving() {
    let server = LocalServer::start().unwrap();
    let (client, node) = node(&server, "l2", 1).await;
    let mut events = client.subscribe("l2.events.>").await.unwrap();
    let mut restarted = client
        .subscribe("l2.nodes.life.worker_restarted")
        .await
        .unwrap();
    client.flush().await.unwrap();

    submit(
        &client,
        "l2.submit.chaos",
        json!({"id": "boom", "payload": {"panic": true}, "max_attempts": 1}),
    )
    .await;
    let boom = until_final(&mut events, "boom").await;
    let last = boom.last().unwrap();
    assert_eq!(last["event"], "failed");
    assert_eq!(last["error"]["code"], "worker_crashed");
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("panic requested"),
        "{last}"
    );
    let msg = tokio::time::timeout(DEADLINE, restarted.next())
        .await
        .expect("worker_restarted")
        .unwrap();
    let e: Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(e["worker"], 1);

    submit(
        &client,
        "l2.submit.echo",
        json!({"id": "after", "payload": 1}),
    )
    .await;
    assert_eq!(
        until_final(&mut events, "after").await.last().unwrap()["event"],
        "completed"
    );
    node.shutdown().await;
}

#[actix::test]
async fn higher_priorities_start_first_and_a_queued_task_can_be_cancelled() {
    let server = LocalServer::start().unwrap();
    let (client, node) = node(&server, "l3", 1).await;
    let mut started = client.subscribe("l3.events.*.*.started").await.unwrap();
    let mut cancelled = client.subscribe("l3.events.*.*.cancelled").await.unwrap();
    client.flush().await.unwrap();

    submit(
        &client,
        "l3.submit.sleep",
        json!({"id": "blocker", "payload": {"ms": 60000}}),
    )
    .await;
    let first = tokio::time::timeout(DEADLINE, started.next())
        .await
        .unwrap()
        .unwrap();
    assert!(first.subject.as_str().contains(".blocker."));
    for (id, priority) in [
        ("low1", "low"),
        ("low2", "low"),
        ("gone", "low"),
        ("high", "high"),
        ("crit", "critical"),
    ] {
        submit(
            &client,
            "l3.submit.echo",
            json!({"id": id, "priority": priority}),
        )
        .await;
    }
    let msg = tokio::time::timeout(
        DEADLINE,
        client.request("l3.api.cancel", r#"{"id": "gone"}"#.into()),
    )
    .await
    .unwrap()
    .unwrap();
    let reply: Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(reply, json!({"ok": true, "status": "cancelled"}));
    let c = tokio::time::timeout(DEADLINE, cancelled.next())
        .await
        .unwrap()
        .unwrap();
    assert!(c.subject.as_str().contains(".gone."));

    // Free the worker: everything queued behind the blocker starts now.
    let msg = tokio::time::timeout(
        DEADLINE,
        client.request("l3.api.cancel", r#"{"id": "blocker"}"#.into()),
    )
    .await
    .unwrap()
    .unwrap();
    let reply: Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(reply["status"], "cancelling");

    let mut order = Vec::new();
    while order.len() < 4 {
        let msg = tokio::time::timeout(DEADLINE, started.next())
            .await
            .expect("started")
            .unwrap();
        let e: Value = serde_json::from_slice(&msg.payload).unwrap();
        order.push(e["task_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(order, ["crit", "high", "low1", "low2"]);
    node.shutdown().await;
}

#[actix::test]
async fn exec_runs_allowed_programs_and_kills_them_on_timeout() {
    let server = LocalServer::start().unwrap();
    let agent = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/agent.py");
    let mut config = DispatcherConfig::new(NodeId::new("exec").unwrap());
    config.workers = 2;
    config.cancel_grace = Duration::from_millis(100);
    let handlers = builtin_handlers(&HandlerOptions {
        exec: ExecOptions {
            allow: vec![agent.to_owned()],
            env: std::env::var_os("PATH")
                .map(|path| ("PATH".to_owned(), path))
                .into_iter()
                .collect(),
            ..ExecOptions::default()
        },
        ..HandlerOptions::default()
    })
    .unwrap();
    let options = NodeOptions {
        prefix: "l4".to_owned(),
        ..NodeOptions::default()
    };
    let nats = async_nats::connect(server.url()).await.unwrap();
    let node = Node::start(nats, config, handlers, options).await.unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut events = client.subscribe("l4.events.>").await.unwrap();
    client.flush().await.unwrap();

    submit(
        &client,
        "l4.submit.exec",
        json!({"id": "x1", "payload": {"program": agent, "input": {"n": 1}}}),
    )
    .await;
    let x1 = until_final(&mut events, "x1").await;
    let progress = x1
        .iter()
        .find(|e| e["event"] == "progress")
        .expect("progress from stdout");
    assert_eq!(progress["progress"], 50);
    assert_eq!(progress["message"], "halfway");
    assert_eq!(
        x1.last().unwrap()["result"],
        json!({"id": "x1", "attempt": 1, "echo": {"n": 1}})
    );

    submit(&client, "l4.submit.exec", json!({"id": "x2", "max_attempts": 1, "payload": {"program": agent, "input": {"fail": "disk full"}}})).await;
    let x2 = until_final(&mut events, "x2").await;
    let msg = x2.last().unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(msg.contains("disk full"), "{msg}");

    submit(&client, "l4.submit.exec", json!({"id": "x3", "max_attempts": 1, "timeout_ms": 200, "payload": {"program": agent, "input": {"hang": true}}})).await;
    assert_eq!(
        until_final(&mut events, "x3").await.last().unwrap()["event"],
        "timed_out"
    );

    submit(&client, "l4.submit.exec", json!({"id": "x4", "max_attempts": 3, "payload": {"program": "/bin/sh", "args": ["-c", "true"]}})).await;
    let x4 = until_final(&mut events, "x4").await;
    assert_eq!(
        names(&x4),
        ["accepted", "started", "failed"],
        "not allowed is final at once"
    );
    node.shutdown().await;
}
