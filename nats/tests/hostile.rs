//! Hostile input against real nodes on a real nats-server: every entry
//! point (submit, the core queue, the stream, the control API, the node
//! subjects), JSON and bincode alike. Each finding of the security review
//! has a test here that failed before the fix: the 13-byte bincode body
//! that aborted the process, the forged lease that made a node publish on
//! any subject, the task accepted and then silently refused, and the
//! finished task run again from the queue. Every wait has a deadline.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::HeaderMap;
use dispatcher_actors::{handler_fn, DispatcherConfig, Handlers, NodeId, TaskKind};
use dispatcher_nats::codec::{BincodeTask, Limits};
use dispatcher_nats::{LocalServer, Mode, Node, NodeOptions};
use futures::StreamExt;
use serde_json::{json, Value};

mod common;

use common::{next_json, request, request_raw, subscribe, DEADLINE};

const BINCODE: &str = "application/x-bincode";

/// The 13 bytes: a string whose length prefix claims 2^62 bytes.
fn huge_prefix() -> Vec<u8> {
    let mut body = vec![0x01, 0xfd];
    body.extend_from_slice(&(1u64 << 62).to_le_bytes());
    body.extend_from_slice(b"abc");
    body
}

fn bincode_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Content-Type", BINCODE);
    h
}

async fn start_node(url: &str, id: &str, mode: Mode, limits: Limits) -> Node {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let mut config = DispatcherConfig::new(NodeId::new(id).unwrap());
    config.workers = 2;
    let mut handlers = Handlers::new();
    handlers.insert(
        TaskKind::new("echo").unwrap(),
        handler_fn(|_ctx, p| async move { Ok(p) }),
    );
    let mut options = NodeOptions {
        mode,
        limits,
        heartbeat_interval: Duration::from_millis(100),
        shutdown_timeout: Duration::from_millis(300),
        ..NodeOptions::default()
    };
    options.jetstream.idle_poll = Duration::from_secs(3600);
    let nats = async_nats::connect(url).await.unwrap();
    Node::start(nats, config, handlers, options).await.unwrap()
}

/// Events until one of `id` named `name`; answers them all.
async fn until(sub: &mut async_nats::Subscriber, id: &str, name: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let (_, e) = next_json(sub).await;
        let done = e["task_id"] == id && e["event"] == name;
        seen.push(e);
        if done {
            return seen;
        }
    }
}

/// The next `rejected` event.
async fn next_rejected(sub: &mut async_nats::Subscriber) -> Value {
    loop {
        let (_, e) = next_json(sub).await;
        if e["event"] == "rejected" {
            return e;
        }
    }
}

/// Submits `{"id": id}` and waits for its completion: the node is alive.
async fn still_runs(client: &async_nats::Client, events: &mut async_nats::Subscriber, id: &str) {
    let reply = request(
        client,
        "dispatch.submit.echo",
        json!({"id": id, "payload": 1}),
    )
    .await;
    assert_eq!(reply["ok"], true, "{reply}");
    until(events, id, "completed").await;
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[actix::test]
async fn the_13_byte_bincode_body_is_refused_on_submit_queue_and_stream() {
    let server = LocalServer::start().expect("nats-server");
    let node = start_node(&server.url(), "n1", Mode::JetStream, Limits::default()).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut events = subscribe(&client, "dispatch.events.>").await;

    // Submit: a clear error in the reply.
    let reply = client
        .request_with_headers(
            "dispatch.submit.echo",
            bincode_headers(),
            huge_prefix().into(),
        )
        .await
        .unwrap();
    let reply: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(reply["ok"], false);
    assert_eq!(reply["error"]["code"], "invalid_json", "{reply}");
    let rejected = next_rejected(&mut events).await;
    assert_eq!(rejected["subject"], "dispatch.submit.echo");
    assert_ne!(rejected["task_id"], "_", "a refusal is an event of its own");

    // Straight into the stream: terminated on its first delivery, with a
    // `rejected` event naming the subject and a dead letter.
    let js = jetstream::new(client.clone());
    js.publish_with_headers(
        "dispatch.tasks.echo.normal",
        bincode_headers(),
        huge_prefix().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let rejected = next_rejected(&mut events).await;
    assert_eq!(rejected["subject"], "dispatch.tasks.echo.normal");
    assert_eq!(rejected["error"]["code"], "invalid_json");
    let dead = js.get_stream("DISPATCH_DEAD").await.unwrap();
    let letter = common::eventually(DEADLINE, || {
        let mut dead = dead.clone();
        async move {
            let info = dead.info().await.ok()?;
            (info.state.messages > 0).then_some(info.state.last_sequence)
        }
    })
    .await;
    let letter: Value =
        serde_json::from_slice(&dead.get_raw_message(letter).await.unwrap().payload).unwrap();
    assert_eq!(letter["error"]["code"], "invalid_json", "{letter}");
    let tasks = js.get_stream("DISPATCH_TASKS").await.unwrap();
    common::eventually(DEADLINE, || {
        let mut tasks = tasks.clone();
        async move { (tasks.info().await.ok()?.state.messages == 0).then_some(()) }
    })
    .await;

    still_runs(&client, &mut events, "after-poison").await;
    node.shutdown().await;
}

#[actix::test]
async fn the_13_byte_bincode_body_is_refused_on_the_core_queue() {
    let server = LocalServer::start().expect("nats-server");
    let node = start_node(&server.url(), "c1", Mode::Core, Limits::default()).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut events = subscribe(&client, "dispatch.events.>").await;
    for subject in ["dispatch.submit.echo", "dispatch.tasks.echo.normal"] {
        let reply = client
            .request_with_headers(subject, bincode_headers(), huge_prefix().into())
            .await
            .unwrap();
        let reply: Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(reply["error"]["code"], "invalid_json", "{subject}: {reply}");
        let rejected = next_rejected(&mut events).await;
        assert_eq!(rejected["subject"], subject);
    }
    still_runs(&client, &mut events, "core-after").await;
    node.shutdown().await;
}

#[actix::test]
async fn accepted_means_runnable() {
    let server = LocalServer::start().expect("nats-server");
    let limits = Limits {
        max_payload: 4096,
        max_depth: 64,
    };
    let node = start_node(&server.url(), "n1", Mode::JetStream, limits).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut events = subscribe(&client, "dispatch.events.>").await;

    // Under the limit as sent, over it once every default is filled in.
    let body = json!({"id": "grows", "payload": "x".repeat(3990)}).to_string();
    assert!(body.len() <= 4096);
    let reply = request_raw(&client, "dispatch.submit.echo", body.as_bytes()).await;
    assert_eq!(reply["error"]["code"], "payload_too_large", "{reply}");
    let first = next_json(&mut events).await.1;
    assert_eq!(
        (first["task_id"].as_str(), first["event"].as_str()),
        (Some("grows"), Some("rejected"))
    );

    // A bincode payload nested past the depth limit.
    let deep = BincodeTask {
        id: Some("deep".into()),
        payload: format!("{}{}", "[".repeat(80), "]".repeat(80)).into_bytes(),
        ..BincodeTask::default()
    };
    let reply = client
        .request_with_headers(
            "dispatch.submit.echo",
            bincode_headers(),
            deep.encode().into(),
        )
        .await
        .unwrap();
    let reply: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(reply["error"]["code"], "invalid_json", "{reply}");
    let first = next_json(&mut events).await.1;
    assert_eq!(
        (first["task_id"].as_str(), first["event"].as_str()),
        (Some("deep"), Some("rejected"))
    );

    // And the same on the queue path: refused on its first delivery, with
    // its id, and no record left `queued`.
    let js = jetstream::new(client.clone());
    js.publish_with_headers(
        "dispatch.tasks.echo.normal",
        bincode_headers(),
        deep.encode().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let rejected = next_rejected(&mut events).await;
    assert_eq!(rejected["task_id"], "deep");
    let records = js.get_key_value("dispatch_tasks").await.unwrap();
    assert!(records.get("deep").await.unwrap().is_none());
    still_runs(&client, &mut events, "small").await;
    node.shutdown().await;
}

#[actix::test]
async fn a_finished_task_is_never_run_again_from_the_queue() {
    let server = LocalServer::start().expect("nats-server");
    let node = start_node(&server.url(), "n1", Mode::JetStream, Limits::default()).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut events = subscribe(&client, "dispatch.events.>").await;
    let reply = request(
        &client,
        "dispatch.submit.echo",
        json!({"id": "t1", "payload": "first"}),
    )
    .await;
    assert_eq!(reply["ok"], true);
    until(&mut events, "t1", "completed").await;

    let js = jetstream::new(client.clone());
    let forge = |headers: &[(&str, &str)]| {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, *v);
        }
        h
    };
    let forgeries = [
        forge(&[]),
        forge(&[("Dispatch-Replay", "1")]),
        forge(&[("Dispatch-Accepted", "1"), ("Dispatch-Replay", "1")]),
    ];
    let mut seen = Vec::new();
    for headers in forgeries.iter().cloned() {
        let body = json!({"id": "t1", "payload": "second"}).to_string();
        js.publish_with_headers("dispatch.tasks.echo.normal", headers, body.into())
            .await
            .unwrap()
            .await
            .unwrap();
        let mut got = until(&mut events, "t1", "rejected").await;
        let rejected = got.last().unwrap().clone();
        assert_eq!(rejected["error"]["code"], "duplicate_id", "{rejected}");
        seen.append(&mut got);
    }
    // Restarted, the node still refuses it.
    node.shutdown().await;
    let node = start_node(&server.url(), "n1", Mode::JetStream, Limits::default()).await;
    let body = json!({"id": "t1", "payload": "third"}).to_string();
    js.publish("dispatch.tasks.echo.normal", body.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut got = until(&mut events, "t1", "rejected").await;
    assert_eq!(got.last().unwrap()["error"]["code"], "duplicate_id");
    seen.append(&mut got);
    // A task after them, as a barrier: nothing of t1 ran meanwhile.
    let reply = request(&client, "dispatch.submit.echo", json!({"id": "t2"})).await;
    assert_eq!(reply["ok"], true);
    seen.append(&mut until(&mut events, "t2", "completed").await);
    let reruns: Vec<&Value> = seen
        .iter()
        .filter(|e| e["task_id"] == "t1" && e["event"] != "rejected")
        .collect();
    assert!(reruns.is_empty(), "t1 ran again: {reruns:?}");
    let records = js.get_key_value("dispatch_tasks").await.unwrap();
    let record: Value = serde_json::from_slice(&records.get("t1").await.unwrap().unwrap()).unwrap();
    assert_eq!(record["status"], "completed");
    assert_eq!(record["result"], "first");
    node.shutdown().await;
}

#[actix::test]
async fn forged_leases_and_node_events_make_no_node_publish_anywhere() {
    let server = LocalServer::start().expect("nats-server");
    let node = start_node(&server.url(), "real", Mode::JetStream, Limits::default()).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut events = subscribe(&client, "dispatch.events.>").await;
    still_runs(&client, &mut events, "done-1").await;
    let watched = [
        "evil.subject",
        "otherprefix.api.cancel",
        "$KV.dispatch_cancels.done-1",
        "$KV.dispatch_tasks.done-1",
        "$JS.ACK.DISPATCH_TASKS.>",
    ];
    let mut traps = Vec::new();
    for subject in watched {
        traps.push(subscribe(&client, subject).await);
    }
    let add = json!(watched[..4]);
    for i in 0..20 {
        let fake = format!("fake-{i}");
        // A forged `online` (which permissions would stop) and leases.
        let online = json!({"event": "online", "node": fake, "ts": "2026-01-01T00:00:00.000Z"});
        client
            .publish(
                format!("dispatch.nodes.{fake}.online"),
                online.to_string().into(),
            )
            .await
            .unwrap();
        let lease = json!({"node": fake, "add": add, "held": add});
        client
            .publish(format!("dispatch.leases.{fake}"), lease.to_string().into())
            .await
            .unwrap();
        // Leases in the name of the real node, naming other subjects.
        let lease = json!({"node": "real", "add": add});
        client
            .publish("dispatch.leases.real", lease.to_string().into())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    // The fake nodes are taken for dead after 3 heartbeats (100 ms): wait
    // for ten of the real node's snapshots, long past that.
    let mut snapshots = subscribe(&client, "dispatch.metrics.real").await;
    for _ in 0..10 {
        next_json(&mut snapshots).await;
    }
    for (subject, trap) in watched.iter().zip(traps.iter_mut()) {
        let got = futures::FutureExt::now_or_never(trap.next());
        assert!(got.is_none(), "a node published on {subject}");
    }
    let js = jetstream::new(client.clone());
    let records = js.get_key_value("dispatch_tasks").await.unwrap();
    let record: Value =
        serde_json::from_slice(&records.get("done-1").await.unwrap().unwrap()).unwrap();
    assert_eq!(record["status"], "completed");
    still_runs(&client, &mut events, "done-2").await;
    node.shutdown().await;
}

/// Malformed bodies on every entry point, JSON and bincode: each gets its
/// exact code, the node stays up, and memory stays bounded.
#[actix::test]
async fn malformed_input_gets_its_code_on_every_entry_point() {
    let server = LocalServer::start().expect("nats-server");
    let limits = Limits {
        max_payload: 64 * 1024,
        max_depth: 16,
    };
    let node = start_node(&server.url(), "c1", Mode::Core, limits).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut events = subscribe(&client, "dispatch.events.>").await;
    let deep_json = format!("{{\"payload\": {}{}}}", "[".repeat(40), "]".repeat(40));
    let deep_bincode = BincodeTask {
        payload: format!("{}{}", "[".repeat(40), "]".repeat(40)).into_bytes(),
        ..BincodeTask::default()
    }
    .encode();
    let mut huge_list = BincodeTask {
        tags: Some(vec![]),
        ..BincodeTask::default()
    }
    .encode();
    huge_list.pop();
    huge_list.push(0xfd);
    huge_list.extend_from_slice(&(1u64 << 40).to_le_bytes());
    let cases: Vec<(Option<&str>, Vec<u8>, &str)> = vec![
        (None, b"{not json".to_vec(), "invalid_json"),
        (None, b"42".to_vec(), "invalid_json"),
        (None, b"\xff\xfe".to_vec(), "invalid_json"),
        (None, deep_json.into_bytes(), "invalid_json"),
        (None, vec![b' '; 64 * 1024 + 1], "payload_too_large"),
        (None, br#"{"priority": 5}"#.to_vec(), "invalid_field"),
        (None, br#"{"id": "a b"}"#.to_vec(), "invalid_field"),
        (None, br#"{"timeout_ms": 0}"#.to_vec(), "invalid_field"),
        (None, br#"{"kind": "other"}"#.to_vec(), "kind_mismatch"),
        (
            Some("text/xml"),
            b"<task/>".to_vec(),
            "unsupported_content_type",
        ),
        (Some(BINCODE), huge_prefix(), "invalid_json"),
        (Some(BINCODE), huge_list, "invalid_json"),
        (Some(BINCODE), deep_bincode, "invalid_json"),
        (Some(BINCODE), b"\xff\xff\xff".to_vec(), "invalid_json"),
    ];
    let before = rss_kib();
    for round in 0..20 {
        for (content_type, body, code) in &cases {
            for subject in ["dispatch.submit.echo", "dispatch.tasks.echo.normal"] {
                let mut headers = HeaderMap::new();
                if let Some(ct) = content_type {
                    headers.insert("Content-Type", *ct);
                }
                let reply = tokio::time::timeout(
                    DEADLINE,
                    client.request_with_headers(subject, headers, body.clone().into()),
                )
                .await
                .expect("a reply within 10 s")
                .unwrap();
                let reply: Value = serde_json::from_slice(&reply.payload).unwrap();
                if round == 0 {
                    assert_eq!(reply["error"]["code"], *code, "{subject}: {reply}");
                }
            }
        }
    }
    // The control API: bad bodies get their codes too.
    for (endpoint, body, code) in [
        ("status", &b"{"[..], "invalid_json"),
        ("status", br#"{"id": 5}"#, "invalid_field"),
        ("status", br#"{"id": "a b"}"#, "invalid_field"),
        ("cancel", br#"[]"#, "invalid_json"),
        ("list", br#"{"limit": 0}"#, "invalid_field"),
        ("list", br#"{"status": "nope"}"#, "invalid_field"),
    ] {
        let reply = request_raw(&client, format!("dispatch.api.{endpoint}"), body).await;
        assert_eq!(reply["error"]["code"], code, "{endpoint}: {reply}");
    }
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 100 * 1024, "RSS grew by {grown} KiB");
    still_runs(&client, &mut events, "alive").await;
    node.shutdown().await;
}

/// A reply subject is taken from the wire too: a request whose reply
/// subject is a KV key, an ack or the JetStream API gets no answer there.
#[actix::test]
async fn replies_never_go_to_a_subject_where_a_publish_means_something() {
    let server = LocalServer::start().expect("nats-server");
    let node = start_node(&server.url(), "n1", Mode::JetStream, Limits::default()).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut events = subscribe(&client, "dispatch.events.>").await;
    still_runs(&client, &mut events, "victim").await;
    let mut trap = subscribe(&client, "$KV.dispatch_tasks.victim").await;
    let forged = [
        ("dispatch.submit.echo", json!({"id": "via-kv"})),
        ("dispatch.api.status", json!({"id": "victim"})),
        ("dispatch.api.stats", json!({})),
    ];
    for (subject, body) in &forged {
        client
            .publish_with_reply(
                *subject,
                "$KV.dispatch_tasks.victim",
                body.to_string().into(),
            )
            .await
            .unwrap();
    }
    // Barriers: the same requests with an inbox are answered.
    for (subject, body) in &forged {
        let reply = request(&client, *subject, body.clone()).await;
        assert!(reply.is_object(), "{reply}");
    }
    assert!(
        futures::FutureExt::now_or_never(trap.next()).is_none(),
        "a node wrote into the KV record"
    );
    let js = jetstream::new(client.clone());
    let records = js.get_key_value("dispatch_tasks").await.unwrap();
    let record: Value =
        serde_json::from_slice(&records.get("victim").await.unwrap().unwrap()).unwrap();
    assert_eq!(record["status"], "completed");
    node.shutdown().await;
}
