//! Edge cases of a core-mode node against a real nats-server, driven as a
//! foreign client would (subjects spelled out, JSON by hand): workers that
//! crash until their slot is disabled, shutdown interrupting running work,
//! a full queue, and handlers that ignore cancellation or run past their
//! timeout. Every wait has a deadline; nothing sleeps to wait.

use std::time::Duration;

use dispatcher_actors::{
    handler_fn, DispatcherConfig, Handlers, NodeId, RestartPolicy, ShutdownReport, TaskError,
    TaskKind,
};
use dispatcher_nats::{LocalServer, Node, NodeOptions};
use futures::StreamExt;
use serde_json::{json, Value};

mod common;

use common::{next_json, request, subscribe, DEADLINE};

/// The handlers every node here serves:
/// - `echo` answers its payload;
/// - `wait` runs until cancelled, then stops;
/// - `boom` panics;
/// - `stubborn` never finishes and never looks at its cancellation token.
fn handlers() -> Handlers {
    let mut handlers = Handlers::new();
    handlers.insert(
        TaskKind::new("echo").unwrap(),
        handler_fn(|_ctx, p| async move { Ok(p) }),
    );
    handlers.insert(
        TaskKind::new("wait").unwrap(),
        handler_fn(|ctx, _p| async move {
            ctx.cancelled().await;
            Err(TaskError::new("stopped on request"))
        }),
    );
    handlers.insert(
        TaskKind::new("boom").unwrap(),
        handler_fn(|_ctx, _p| async move { Ok(explode()) }),
    );
    handlers.insert(
        TaskKind::new("stubborn").unwrap(),
        handler_fn(|_ctx, _p| async move {
            let mut ticks = 0u64;
            while ticks < u64::MAX {
                tokio::time::sleep(Duration::from_millis(5)).await;
                ticks += 1;
            }
            Ok(json!(ticks))
        }),
    );
    handlers
}

fn explode() -> Value {
    panic!("boom handler exploded on purpose")
}

/// Starts `node-1` under `prefix` with one worker, then lets `configure`
/// adjust the settings; answers a separate client connection and the node.
async fn start_node(
    server: &LocalServer,
    prefix: &str,
    configure: impl FnOnce(&mut DispatcherConfig, &mut NodeOptions),
) -> (async_nats::Client, Node) {
    start_node_at(&server.url(), prefix, configure).await
}

async fn start_node_at(
    url: &str,
    prefix: &str,
    configure: impl FnOnce(&mut DispatcherConfig, &mut NodeOptions),
) -> (async_nats::Client, Node) {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let mut config = DispatcherConfig::new(NodeId::new("node-1").unwrap());
    config.workers = 1;
    let mut options = NodeOptions {
        prefix: prefix.to_owned(),
        // Quiet: no heartbeat in the node subjects during a test.
        heartbeat_interval: Duration::from_secs(3600),
        shutdown_timeout: Duration::from_secs(5),
        ..NodeOptions::default()
    };
    configure(&mut config, &mut options);
    let nats = async_nats::connect(url).await.unwrap();
    let node = Node::start(nats, config, handlers(), options)
        .await
        .unwrap();
    (async_nats::connect(url).await.unwrap(), node)
}

/// Reads events until one named `last`; answers all of them, in order.
async fn events_until(sub: &mut async_nats::Subscriber, last: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let (subject, e) = next_json(sub).await;
        let name = e["event"].as_str().unwrap().to_owned();
        assert!(subject.ends_with(&format!(".{name}")), "{subject}: {e}");
        seen.push(e);
        if name == last {
            return seen;
        }
    }
}

fn names(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect()
}

/// Reads node events until one named `name`, skipping `online` and
/// `heartbeat`; any other event first is a failure.
async fn node_event(sub: &mut async_nats::Subscriber, name: &str) -> Value {
    loop {
        let (subject, e) = next_json(sub).await;
        match e["event"].as_str().unwrap() {
            "online" | "heartbeat" => continue,
            n => {
                assert_eq!(n, name, "unexpected node event on {subject}: {e}");
                return e;
            }
        }
    }
}

#[actix::test]
async fn a_slot_that_keeps_crashing_is_restarted_then_disabled() {
    let server = LocalServer::start().unwrap();
    let (client, node) = start_node(&server, "e1", |config, _| {
        config.restart = RestartPolicy {
            max_restarts: 1,
            within: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(1),
            backoff_max: Duration::from_millis(5),
        };
    })
    .await;
    let mut nodes = subscribe(&client, "e1.nodes.node-1.*").await;
    let mut events = subscribe(&client, "e1.events.boom.boom-1.*").await;
    let mut rejected = subscribe(&client, "e1.events.*.*.rejected").await;

    let reply = request(
        &client,
        "e1.submit.boom",
        json!({
            "id": "boom-1",
            "max_attempts": 2,
            "backoff": {"initial_ms": 10, "max_ms": 10, "multiplier": 1.0},
        }),
    )
    .await;
    assert_eq!(reply["ok"], true, "{reply}");

    // Attempt 1 crashes the worker (restart 1), attempt 2 crashes the
    // restarted one: past one restart in 60 s the slot is disabled.
    let seen = events_until(&mut events, "failed").await;
    assert_eq!(
        names(&seen),
        ["accepted", "started", "retrying", "started", "failed"]
    );
    let retrying = &seen[2];
    assert_eq!(retrying["attempt"], 1);
    assert_eq!(retrying["status"], "retrying");
    assert_eq!(retrying["error"]["code"], "worker_crashed", "{retrying}");
    assert!(retrying["retry_in_ms"].is_u64(), "{retrying}");
    let failed = &seen[4];
    assert_eq!(failed["attempt"], 2);
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["error"]["code"], "worker_crashed", "{failed}");
    let message = failed["error"]["message"].as_str().unwrap();
    assert!(message.contains("boom handler exploded"), "{failed}");

    let restarted = node_event(&mut nodes, "worker_restarted").await;
    assert_eq!(restarted["node"], "node-1");
    assert_eq!(restarted["worker"], 1);
    assert_eq!(restarted["restarts"], 1);
    assert!(restarted["ts"].is_string(), "{restarted}");
    let reason = restarted["reason"].as_str().unwrap();
    assert!(reason.contains("panicked"), "{restarted}");

    let disabled = node_event(&mut nodes, "worker_disabled").await;
    assert_eq!(disabled["node"], "node-1");
    assert_eq!(disabled["worker"], 1);
    assert_eq!(disabled["restarts"], 1);
    assert!(disabled["ts"].is_string(), "{disabled}");
    let reason = disabled["reason"].as_str().unwrap();
    assert!(reason.contains("boom handler exploded"), "{disabled}");

    // With no slot in service the node refuses work instead of queueing it.
    let refused = request(&client, "e1.submit.echo", json!({"id": "late"})).await;
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(refused["error"]["code"], "unavailable", "{refused}");
    let (_, event) = next_json(&mut rejected).await;
    assert_eq!(event["task_id"], "late");
    assert_eq!(event["error"]["code"], "unavailable");

    let stats = request(&client, "e1.api.stats", json!({})).await;
    assert_eq!(stats["stats"]["workers"], 0, "{stats}");
    assert_eq!(stats["stats"]["worker_restarts"], 1, "{stats}");
    assert_eq!(stats["stats"]["failed"], 1, "{stats}");
    node.shutdown().await;
}

#[actix::test]
async fn shutdown_interrupts_a_running_task_and_cancels_a_queued_one() {
    let server = LocalServer::start().unwrap();
    let (client, node) = start_node(&server, "e2", |_, options| {
        options.shutdown_timeout = Duration::from_millis(200);
    })
    .await;
    let mut nodes = subscribe(&client, "e2.nodes.node-1.*").await;
    let mut running = subscribe(&client, "e2.events.wait.w1.*").await;
    let mut queued = subscribe(&client, "e2.events.wait.w2.*").await;

    let reply = request(&client, "e2.submit.wait", json!({"id": "w1"})).await;
    assert_eq!(reply["ok"], true, "{reply}");
    events_until(&mut running, "started").await;
    let reply = request(&client, "e2.submit.wait", json!({"id": "w2"})).await;
    assert_eq!(reply["ok"], true, "{reply}");
    events_until(&mut queued, "accepted").await;

    let report = tokio::time::timeout(DEADLINE, node.shutdown())
        .await
        .expect("shutdown within 10 s");
    assert_eq!(
        report,
        ShutdownReport {
            finished: 0,
            interrupted: 1,
            unstarted: 1,
        }
    );

    // Core mode keeps no copy to hand back: the interrupted attempt fails
    // with code `shutdown`, the unstarted task is cancelled.
    let seen = events_until(&mut running, "failed").await;
    assert_eq!(names(&seen), ["failed"]);
    let failed = &seen[0];
    assert_eq!(failed["attempt"], 1);
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["error"]["code"], "shutdown", "{failed}");
    let seen = events_until(&mut queued, "cancelled").await;
    assert_eq!(names(&seen), ["cancelled"]);
    assert_eq!(seen[0]["status"], "cancelled");
    assert!(!seen[0]["reason"].as_str().unwrap().is_empty());

    let offline = node_event(&mut nodes, "offline").await;
    assert_eq!(offline["node"], "node-1");
    assert_eq!(offline["reason"], "shutdown");
}

/// Like the binary: the node runs in its own actix System, which ends as
/// soon as `shutdown` returns. Every event of the shutdown, and `offline`,
/// must be out by then.
#[actix::test]
async fn shutdown_has_published_everything_when_it_returns() {
    const QUEUED: usize = 300;
    let server = LocalServer::start().unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut events = subscribe(&client, "e6.events.>").await;
    let mut offline = subscribe(&client, "e6.nodes.node-1.offline").await;

    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let url = server.url();
    let thread = std::thread::spawn(move || {
        actix::System::new().block_on(async move {
            let (_, node) = start_node_at(&url, "e6", |config, options| {
                config.queue_capacity = Some(QUEUED + 10);
                options.shutdown_timeout = Duration::from_millis(200);
            })
            .await;
            let _ = ready_tx.send(());
            let _ = stop_rx.await;
            node.shutdown().await
        })
    });
    tokio::time::timeout(DEADLINE, ready_rx)
        .await
        .expect("node up within 10 s")
        .unwrap();

    let reply = request(&client, "e6.submit.wait", json!({"id": "w1"})).await;
    assert_eq!(reply["ok"], true, "{reply}");
    loop {
        let (_, e) = next_json(&mut events).await;
        if e["task_id"] == "w1" && e["event"] == "started" {
            break;
        }
    }
    let batch: Vec<Value> = (0..QUEUED)
        .map(|i| json!({"id": format!("q{i}")}))
        .collect();
    let reply = request(&client, "e6.submit.wait", Value::Array(batch)).await;
    let results = reply["results"].as_array().unwrap();
    assert!(results.iter().all(|r| r["ok"] == true), "{reply}");

    stop_tx.send(()).unwrap();
    let joined = tokio::task::spawn_blocking(move || thread.join());
    let report = tokio::time::timeout(DEADLINE, joined)
        .await
        .expect("shutdown within 10 s")
        .unwrap()
        .expect("node thread");
    assert_eq!(report.interrupted, 1, "{report:?}");
    assert_eq!(report.unstarted, QUEUED, "{report:?}");

    // The node's runtime is gone now: whatever was not sent is lost.
    let mut cancelled = 0;
    let mut failed = 0;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while cancelled < QUEUED || failed < 1 {
        let Ok(Some(msg)) = tokio::time::timeout_at(deadline, events.next()).await else {
            break;
        };
        let e: Value = serde_json::from_slice(&msg.payload).unwrap();
        match e["event"].as_str().unwrap() {
            "cancelled" => cancelled += 1,
            "failed" => {
                assert_eq!(e["error"]["code"], "shutdown", "{e}");
                failed += 1;
            }
            _ => {}
        }
    }
    assert_eq!(
        (cancelled, failed),
        (QUEUED, 1),
        "events published before shutdown returned (cancelled, failed)"
    );
    let goodbye = tokio::time::timeout(DEADLINE, offline.next()).await;
    assert!(
        matches!(goodbye, Ok(Some(_))),
        "no offline event from a node whose shutdown returned"
    );
}

#[actix::test]
async fn a_full_queue_rejects_and_the_node_goes_on() {
    let server = LocalServer::start().unwrap();
    let (client, node) = start_node(&server, "e3", |config, _| {
        config.queue_capacity = Some(1);
    })
    .await;
    let mut b1 = subscribe(&client, "e3.events.wait.b1.*").await;
    let mut b2 = subscribe(&client, "e3.events.wait.b2.*").await;
    let mut rejected = subscribe(&client, "e3.events.*.*.rejected").await;
    let mut after = subscribe(&client, "e3.events.echo.b3.*").await;

    let reply = request(&client, "e3.submit.wait", json!({"id": "b1"})).await;
    assert_eq!(reply["ok"], true, "{reply}");
    events_until(&mut b1, "started").await;
    let reply = request(&client, "e3.submit.wait", json!({"id": "b2"})).await;
    assert_eq!(reply["ok"], true, "{reply}");

    let full = request(&client, "e3.submit.wait", json!({"id": "b3"})).await;
    assert_eq!(full["ok"], false, "{full}");
    assert_eq!(full["error"]["code"], "queue_full", "{full}");
    assert!(!full["error"]["message"].as_str().unwrap().is_empty());
    let (subject, event) = next_json(&mut rejected).await;
    assert_eq!(subject, "e3.events.wait.b3.rejected");
    assert_eq!(event["error"]["code"], "queue_full", "{event}");

    // Queued first, so that b2 does not start when b1 stops.
    let cancel = request(&client, "e3.api.cancel", json!({"id": "b2"})).await;
    assert_eq!(cancel, json!({"ok": true, "status": "cancelled"}));
    let cancel = request(&client, "e3.api.cancel", json!({"id": "b1"})).await;
    assert_eq!(cancel, json!({"ok": true, "status": "cancelling"}));
    let seen = events_until(&mut b2, "cancelled").await;
    assert_eq!(names(&seen), ["accepted", "cancelled"]);
    let seen = events_until(&mut b1, "cancelled").await;
    assert_eq!(names(&seen), ["cancelled"]);

    // The refused id was never taken: it may be submitted again.
    let reply = request(
        &client,
        "e3.submit.echo",
        json!({"id": "b3", "payload": "after"}),
    )
    .await;
    assert_eq!(reply["ok"], true, "{reply}");
    let seen = events_until(&mut after, "completed").await;
    assert_eq!(names(&seen), ["accepted", "started", "completed"]);
    assert_eq!(seen[2]["result"], "after");
    node.shutdown().await;
}

#[actix::test]
async fn a_handler_that_ignores_cancellation_is_dropped_after_the_grace() {
    let server = LocalServer::start().unwrap();
    let (client, node) = start_node(&server, "e4", |config, _| {
        config.cancel_grace = Duration::from_millis(50);
    })
    .await;
    let mut stubborn = subscribe(&client, "e4.events.stubborn.s1.*").await;
    let mut echo = subscribe(&client, "e4.events.echo.*.*").await;

    let reply = request(&client, "e4.submit.stubborn", json!({"id": "s1"})).await;
    assert_eq!(reply["ok"], true, "{reply}");
    events_until(&mut stubborn, "started").await;
    let cancel = request(&client, "e4.api.cancel", json!({"id": "s1"})).await;
    assert_eq!(cancel, json!({"ok": true, "status": "cancelling"}));
    let seen = events_until(&mut stubborn, "cancelled").await;
    assert_eq!(names(&seen), ["cancelled"]);
    assert_eq!(seen[0]["status"], "cancelled");
    assert_eq!(seen[0]["attempt"], 1);
    assert!(!seen[0]["reason"].as_str().unwrap().is_empty());

    // The only worker is free again.
    let reply = request(&client, "e4.submit.echo", json!({"id": "x1", "payload": 1})).await;
    assert_eq!(reply["ok"], true, "{reply}");
    let seen = events_until(&mut echo, "completed").await;
    assert_eq!(seen.last().unwrap()["task_id"], "x1");
    assert_eq!(seen.last().unwrap()["result"], 1);

    let status = request(&client, "e4.api.status", json!({"id": "s1"})).await;
    assert_eq!(status["task"]["status"], "cancelled", "{status}");
    node.shutdown().await;
}

#[actix::test]
async fn a_handler_past_its_timeout_is_retried_then_timed_out() {
    let server = LocalServer::start().unwrap();
    let (client, node) = start_node(&server, "e5", |config, _| {
        config.cancel_grace = Duration::from_millis(50);
    })
    .await;
    let mut stubborn = subscribe(&client, "e5.events.stubborn.t1.*").await;
    let mut echo = subscribe(&client, "e5.events.echo.*.*").await;

    let reply = request(
        &client,
        "e5.submit.stubborn",
        json!({
            "id": "t1",
            "timeout_ms": 100,
            "max_attempts": 2,
            "backoff": {"initial_ms": 10, "max_ms": 10, "multiplier": 1.0},
        }),
    )
    .await;
    assert_eq!(reply["ok"], true, "{reply}");
    let seen = events_until(&mut stubborn, "timed_out").await;
    assert_eq!(
        names(&seen),
        ["accepted", "started", "retrying", "started", "timed_out"]
    );
    let retrying = &seen[2];
    assert_eq!(retrying["attempt"], 1);
    assert_eq!(retrying["error"]["code"], "timeout", "{retrying}");
    let timed_out = &seen[4];
    assert_eq!(timed_out["attempt"], 2);
    assert_eq!(timed_out["status"], "timed_out");
    assert_eq!(timed_out["timeout_ms"], 100);

    let reply = request(&client, "e5.submit.echo", json!({"id": "x2", "payload": 2})).await;
    assert_eq!(reply["ok"], true, "{reply}");
    let seen = events_until(&mut echo, "completed").await;
    assert_eq!(seen.last().unwrap()["task_id"], "x2");
    assert_eq!(seen.last().unwrap()["result"], 2);

    let stats = request(&client, "e5.api.stats", json!({})).await;
    assert_eq!(stats["stats"]["timed_out"], 1, "{stats}");
    node.shutdown().await;
}
