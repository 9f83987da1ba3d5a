//! A core-mode node against a real nats-server, driven as a foreign client
//! would: subjects spelled out, JSON by hand. Every wait has a deadline.

use std::time::Duration;

use async_nats::HeaderMap;
use dispatcher_actors::{handler_fn, DispatcherConfig, Handlers, NodeId, TaskKind};
use dispatcher_nats::codec::Limits;
use dispatcher_nats::{LocalServer, Node, NodeError, NodeOptions};
use serde_json::{json, Value};

mod common;

use common::{next_json, request_raw, DEADLINE};

async fn start_node(server: &LocalServer, prefix: &str) -> (async_nats::Client, Node) {
    let node = try_start_node(server, prefix).await.unwrap();
    (async_nats::connect(server.url()).await.unwrap(), node)
}

/// Starts the node `node-1` on its own connection.
async fn try_start_node(server: &LocalServer, prefix: &str) -> Result<Node, NodeError> {
    let mut handlers = Handlers::new();
    handlers.insert(
        TaskKind::new("echo").unwrap(),
        handler_fn(|_ctx, p| async move { Ok(p) }),
    );
    handlers.insert(
        TaskKind::new("wait").unwrap(),
        handler_fn(|ctx, _p| async move {
            ctx.cancelled().await;
            Err(dispatcher_actors::TaskError::new("cancelled"))
        }),
    );
    let mut config = DispatcherConfig::new(NodeId::new("node-1").unwrap());
    config.workers = 2;
    let options = NodeOptions {
        prefix: prefix.to_owned(),
        limits: Limits {
            max_payload: 2048,
            max_depth: 8,
        },
        heartbeat_interval: Duration::from_millis(50),
        shutdown_timeout: Duration::from_secs(5),
        ..NodeOptions::default()
    };
    let nats = async_nats::connect(server.url()).await.unwrap();
    Node::start(nats, config, handlers, options).await
}

#[actix::test]
async fn a_submitted_task_is_answered_and_its_events_published() {
    let server = LocalServer::start().unwrap();
    let (client, node) = start_node(&server, "dispatch").await;
    let mut events = client.subscribe("dispatch.events.*.job-1.*").await.unwrap();
    client.flush().await.unwrap();

    let reply = request_raw(
        &client,
        "dispatch.submit.echo",
        br#"{"id":"job-1","payload":{"n":7},"priority":"high"}"#,
    )
    .await;
    assert_eq!(
        reply,
        json!({"ok": true, "id": "job-1", "kind": "echo", "priority": "high"})
    );

    let mut names = Vec::new();
    loop {
        let (subject, e) = next_json(&mut events).await;
        let name = e["event"].as_str().unwrap().to_owned();
        assert_eq!(subject, format!("dispatch.events.echo.job-1.{name}"));
        for field in ["task_id", "kind", "status", "attempt", "node", "ts"] {
            assert!(e.get(field).is_some(), "{name} lacks {field}: {e}");
        }
        assert_eq!(e["node"], "node-1");
        names.push(name.clone());
        if name == "completed" {
            assert_eq!(e["result"], json!({"n": 7}));
            assert!(e["duration_ms"].is_u64());
            break;
        }
    }
    assert_eq!(names, ["accepted", "started", "completed"]);

    let generated = request_raw(&client, "dispatch.submit.echo", br#"{"payload":1}"#).await;
    let id = generated["id"].as_str().unwrap();
    assert_eq!(uuid_version(id), Some('7'), "{id}");
    node.shutdown().await;
}

fn uuid_version(id: &str) -> Option<char> {
    (id.len() == 36).then(|| id.chars().nth(14)).flatten()
}

#[actix::test]
async fn bad_input_gets_a_clear_error_and_a_rejected_event_and_the_node_goes_on() {
    let server = LocalServer::start().unwrap();
    let (client, node) = start_node(&server, "p2").await;
    let mut rejected = client.subscribe("p2.events.*.*.rejected").await.unwrap();
    client.flush().await.unwrap();

    let big = format!(r#"{{"payload":"{}"}}"#, "x".repeat(4096));
    let deep = format!(r#"{{"payload":{}1{}}}"#, "[".repeat(20), "]".repeat(20));
    let cases: Vec<(Vec<u8>, &str, Option<&str>)> = vec![
        (b"{oops".to_vec(), "invalid_json", None),
        (b"42".to_vec(), "invalid_json", None),
        (
            br#"{"priority": 5}"#.to_vec(),
            "invalid_field",
            Some("priority"),
        ),
        (
            br#"{"timeout_ms": "x"}"#.to_vec(),
            "invalid_field",
            Some("timeout_ms"),
        ),
        (
            br#"{"priority": "urgent"}"#.to_vec(),
            "invalid_field",
            Some("priority"),
        ),
        (
            br#"{"timeout_ms": 0}"#.to_vec(),
            "invalid_field",
            Some("timeout_ms"),
        ),
        (
            br#"{"max_attempts": 101}"#.to_vec(),
            "invalid_field",
            Some("max_attempts"),
        ),
        (br#"{"id": "a b"}"#.to_vec(), "invalid_field", Some("id")),
        (
            br#"{"kind": "other"}"#.to_vec(),
            "kind_mismatch",
            Some("kind"),
        ),
        (big.into_bytes(), "payload_too_large", None),
        (b"{\"id\":\"\xff\"}".to_vec(), "invalid_json", None),
        (deep.into_bytes(), "invalid_json", None),
    ];
    for (body, code, field) in cases {
        let reply = request_raw(&client, "p2.submit.echo", &body).await;
        assert_eq!(reply["ok"], false, "{reply}");
        assert_eq!(reply["error"]["code"], code, "{reply}");
        assert_eq!(reply["error"]["field"].as_str(), field, "{reply}");
        assert!(!reply["error"]["message"].as_str().unwrap().is_empty());
        let (_, event) = next_json(&mut rejected).await;
        assert_eq!(event["error"]["code"], code);
        assert!(event["status"].is_null());
    }

    let mut headers = HeaderMap::new();
    headers.insert("Content-Type", "text/xml");
    let msg = tokio::time::timeout(
        DEADLINE,
        client.request_with_headers("p2.submit.echo", headers, "<task/>".into()),
    )
    .await
    .unwrap()
    .unwrap();
    let reply: Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(reply["error"]["code"], "unsupported_content_type");

    request_raw(&client, "p2.submit.echo", br#"{"id": "dup"}"#).await;
    let dup = request_raw(&client, "p2.submit.echo", br#"{"id": "dup"}"#).await;
    assert_eq!(dup["error"]["code"], "duplicate_id");

    let batch = request_raw(
        &client,
        "p2.submit.echo",
        br#"[{"id": "b1"}, {"priority": 5}, {"id": "b3"}]"#,
    )
    .await;
    assert_eq!(batch["ok"], true);
    let results = batch["results"].as_array().unwrap();
    assert_eq!(results[0]["id"], "b1");
    assert_eq!(results[1]["error"]["field"], "priority");
    assert_eq!(results[2]["id"], "b3");

    let fine = request_raw(
        &client,
        "p2.submit.echo",
        br#"{"payload": "still serving"}"#,
    )
    .await;
    assert_eq!(fine["ok"], true);
    node.shutdown().await;
}

#[actix::test]
async fn tasks_published_onto_the_queue_run_and_the_subject_is_authoritative() {
    let server = LocalServer::start().unwrap();
    let (client, node) = start_node(&server, "p3").await;
    let mut events = client.subscribe("p3.events.>").await.unwrap();
    client.flush().await.unwrap();

    client
        .publish(
            "p3.tasks.echo.low",
            br#"{"id": "q1", "payload": 5}"#.to_vec().into(),
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    while !seen.contains(&"completed".to_owned()) {
        let (_, e) = next_json(&mut events).await;
        if e["task_id"] == "q1" {
            if e["event"] == "accepted" {
                assert_eq!(e["priority"], "low");
            }
            seen.push(e["event"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(seen.iter().filter(|n| *n == "accepted").count(), 1);

    let mismatch = request_raw(&client, "p3.tasks.echo.low", br#"{"priority": "high"}"#).await;
    assert_eq!(mismatch["error"]["code"], "invalid_field");
    assert_eq!(mismatch["error"]["field"], "priority");
    let wrong_kind = request_raw(&client, "p3.tasks.echo.low", br#"{"kind": "sleep"}"#).await;
    assert_eq!(wrong_kind["error"]["code"], "kind_mismatch");
    let bad_priority = request_raw(&client, "p3.tasks.echo.urgent", br#"{}"#).await;
    assert_eq!(bad_priority["error"]["code"], "invalid_field");
    node.shutdown().await;
}

#[actix::test]
async fn a_node_announces_itself_beats_and_says_goodbye() {
    let server = LocalServer::start().unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut nodes = client.subscribe("p4.nodes.>").await.unwrap();
    let mut metrics = client.subscribe("p4.metrics.node-1").await.unwrap();
    client.flush().await.unwrap();
    let (_, node) = start_node(&server, "p4").await;

    let (subject, online) = next_json(&mut nodes).await;
    assert_eq!(subject, "p4.nodes.node-1.online");
    assert_eq!(online["workers"], 2);
    assert_eq!(online["kinds"], json!(["echo", "wait"]));
    let (subject, beat) = next_json(&mut nodes).await;
    assert_eq!(subject, "p4.nodes.node-1.heartbeat");
    assert_eq!(beat["workers"].as_array().unwrap().len(), 2);
    let (_, snapshot) = next_json(&mut metrics).await;
    assert!(snapshot["stats"]["workers"].is_u64());

    node.shutdown().await;
    loop {
        let (subject, _) = next_json(&mut nodes).await;
        if subject == "p4.nodes.node-1.offline" {
            break;
        }
    }
}

#[actix::test]
async fn the_control_api_answers_as_a_micro_service() {
    let server = LocalServer::start().unwrap();
    let (client, node) = start_node(&server, "p5").await;
    let mut events = client.subscribe("p5.events.*.long.*").await.unwrap();
    client.flush().await.unwrap();

    request_raw(
        &client,
        "p5.submit.echo",
        br#"{"id": "e1", "payload": [1]}"#,
    )
    .await;
    request_raw(&client, "p5.submit.wait", br#"{"id": "long"}"#).await;
    loop {
        let (_, e) = next_json(&mut events).await;
        if e["event"] == "started" {
            break;
        }
    }
    // e1 may still be finishing; poll its status until it is completed.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let record = loop {
        let r = request_raw(&client, "p5.api.status", br#"{"id": "e1"}"#).await;
        if r["task"]["status"] == "completed" {
            break r["task"].clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "e1 never completed: {r}"
        );
    };
    for field in [
        "id",
        "kind",
        "priority",
        "status",
        "attempt",
        "max_attempts",
        "node",
        "worker",
        "progress",
        "message",
        "created_at",
        "started_at",
        "finished_at",
        "result",
        "error",
    ] {
        assert!(
            record.get(field).is_some(),
            "record lacks {field}: {record}"
        );
    }
    assert_eq!(record["result"], json!([1]));

    let list = request_raw(&client, "p5.api.list", br#"{"status": "running"}"#).await;
    let ids: Vec<_> = list["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].clone())
        .collect();
    assert_eq!(ids, [json!("long")]);
    let cancel = request_raw(&client, "p5.api.cancel", br#"{"id": "long"}"#).await;
    assert_eq!(cancel, json!({"ok": true, "status": "cancelling"}));
    loop {
        let (_, e) = next_json(&mut events).await;
        if e["event"] == "cancelled" {
            break;
        }
    }
    let again = request_raw(&client, "p5.api.cancel", br#"{"id": "long"}"#).await;
    assert_eq!(again["error"]["code"], "already_finished");
    let missing = request_raw(&client, "p5.api.status", br#"{"id": "nope"}"#).await;
    assert_eq!(missing["error"]["code"], "not_found");
    let bad = request_raw(&client, "p5.api.status", br#"{"id": 5}"#).await;
    assert_eq!(bad["error"]["field"], "id");
    let bad_limit = request_raw(&client, "p5.api.list", br#"{"limit": 0}"#).await;
    assert_eq!(bad_limit["error"]["field"], "limit");

    let stats = request_raw(&client, "p5.api.stats", b"{}").await;
    assert_eq!(stats["stats"]["submitted"], 2);
    assert_eq!(stats["stats"]["completed"], 1);
    assert_eq!(stats["stats"]["cancelled"], 1);
    let errors = request_raw(&client, "p5.api.errors", b"{}").await;
    assert_eq!(errors["ok"], true);

    let ping = request_raw(&client, "$SRV.PING.dispatch", b"").await;
    assert_eq!(ping["name"], "dispatch");
    let info = request_raw(&client, "$SRV.INFO.dispatch", b"").await;
    let subjects: Vec<_> = info["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["subject"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        subjects.contains(&"p5.api.status".to_owned()),
        "{subjects:?}"
    );
    node.shutdown().await;
}

#[actix::test]
async fn a_node_refuses_the_id_of_a_live_node_and_takes_it_once_free() {
    let server = LocalServer::start().unwrap();
    let (client, first) = start_node(&server, "p6").await;

    // The live node answers for its id, with its id; nobody answers for
    // another.
    let reply = tokio::time::timeout(DEADLINE, client.request("p6.probe.node-1", "{}".into()))
        .await
        .expect("answered in time")
        .expect("a live node answers its probe");
    let body: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(body, json!({"node": "node-1"}));
    let none = client.request("p6.probe.node-2", "{}".into()).await;
    assert_eq!(
        none.unwrap_err().kind(),
        async_nats::RequestErrorKind::NoResponders
    );

    // A second node with the same id is refused, naming the id.
    let err = match try_start_node(&server, "p6").await {
        Ok(_) => panic!("a second node-1 started"),
        Err(e) => e,
    };
    assert!(matches!(err, NodeError::Probe(_)), "{err:?}");
    assert!(err.to_string().contains("`node-1`"), "{err}");

    // The first one goes on serving, alone.
    let reply = request_raw(&client, "p6.submit.echo", br#"{"id":"after","payload":1}"#).await;
    assert_eq!(reply["ok"], true, "{reply}");
    let reply = client
        .request("p6.probe.node-1", "{}".into())
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&reply.payload).unwrap()["node"],
        "node-1"
    );

    // Once it is offline, the id is free at once.
    first.shutdown().await;
    let again = try_start_node(&server, "p6").await.expect("the id is free");
    again.shutdown().await;
}
