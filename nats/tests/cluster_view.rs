//! One truth for the cluster (mode `jetstream`), against a real nats-server:
//! `stats` sums what every node saw, `errors` lists every node's failed
//! attempts and outlives them, `list` pages through 100 000 records with a
//! cursor, requests are answered concurrently, and the backlog counts tasks
//! of kinds no node serves. Every wait has a deadline; nothing sleeps to
//! wait, and timings are printed, not asserted.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use dispatcher_actors::{
    handler_fn, DispatcherConfig, EventBody, Handlers, ListFilter, NodeId, TaskError, TaskKind,
    TaskSpec, TaskStatus,
};
use dispatcher_nats::client::ErrorFilter;
use dispatcher_nats::{Client, LocalServer, Mode, Node, NodeOptions, Subjects};
use futures::future::join_all;
use futures::StreamExt;
use serde_json::{json, Value};

mod common;

use common::{eventually, request, subscribe, DEADLINE};

fn kind(name: &str) -> TaskKind {
    TaskKind::new(name).unwrap()
}

/// `echo` and every kind of `failing` (each attempt fails).
fn handlers(failing: &[&str]) -> Handlers {
    let mut h = Handlers::new();
    h.insert(kind("echo"), handler_fn(|_ctx, p| async move { Ok(p) }));
    for name in failing {
        h.insert(
            kind(name),
            handler_fn(|_ctx, _p| async move { Err(TaskError::new("always fails")) }),
        );
    }
    h
}

async fn start_node(url: &str, prefix: &str, id: &str, failing: &[&str]) -> Node {
    start_node_in(Mode::JetStream, url, prefix, id, failing).await
}

async fn start_node_in(mode: Mode, url: &str, prefix: &str, id: &str, failing: &[&str]) -> Node {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let mut config = DispatcherConfig::new(NodeId::new(id).unwrap());
    config.workers = 4;
    config.queue_capacity = Some(100);
    config.keep_alive_interval = Duration::from_secs(5);
    config.defaults.backoff.initial_ms = 1;
    config.defaults.backoff.max_ms = 1;
    let mut options = NodeOptions {
        prefix: prefix.to_owned(),
        mode,
        // Snapshots often, so the cluster's figures catch up fast.
        heartbeat_interval: Duration::from_millis(100),
        shutdown_timeout: Duration::from_millis(300),
        ..NodeOptions::default()
    };
    options.jetstream.idle_poll = Duration::from_secs(3600);
    let nats = async_nats::connect(url).await.unwrap();
    Node::start(nats, config, handlers(failing), options)
        .await
        .unwrap()
}

async fn client(url: &str, prefix: &str) -> Client {
    let nats = async_nats::connect(url).await.unwrap();
    Client::new(nats, prefix).unwrap()
}

#[actix::test]
async fn stats_of_three_nodes_is_the_sum_of_what_was_seen() {
    let server = LocalServer::start().expect("nats-server");
    let prefix = "sum";
    let mut nodes = Vec::new();
    for id in ["n1", "n2", "n3"] {
        nodes.push(start_node(&server.url(), prefix, id, &["fail"]).await);
    }
    let client = client(&server.url(), prefix).await;
    let mut events = subscribe(client.nats(), client.subjects().events_any()).await;
    let (echoes, fails) = (30, 6);
    let mut ids = HashSet::new();
    for i in 0..echoes + fails {
        let spec = if i < echoes {
            TaskSpec::new("echo", json!(i))
        } else {
            let mut spec = TaskSpec::new("fail", json!(i));
            spec.max_attempts = Some(2);
            spec
        };
        ids.insert(client.submit(spec).await.unwrap());
    }
    // Count what every node did, as an observer sees it.
    let (mut completed, mut failed, mut retried, mut accepted) = (0u64, 0u64, 0u64, 0u64);
    let mut ended = 0;
    let mut per_node = std::collections::BTreeMap::<String, u64>::new();
    while ended < ids.len() {
        let msg = tokio::time::timeout(DEADLINE, events.next())
            .await
            .expect("events within 10 s")
            .unwrap();
        let e: dispatcher_actors::TaskEvent = serde_json::from_slice(&msg.payload).unwrap();
        if !ids.contains(&e.task_id) {
            continue;
        }
        match &e.body {
            EventBody::Accepted { .. } => accepted += 1,
            EventBody::Completed { .. } => completed += 1,
            EventBody::Failed { .. } => failed += 1,
            EventBody::Retrying { .. } => retried += 1,
            _ => {}
        }
        if e.name().is_final() {
            ended += 1;
            *per_node.entry(e.node.to_string()).or_default() += 1;
        }
    }
    assert_eq!((completed, failed, retried), (echoes, fails, fails));
    println!("tasks ended per node: {per_node:?}");
    // Whichever node answers, once the snapshots caught up the top level
    // is the cluster's.
    let reply = eventually(DEADLINE, || {
        let nats = client.nats().clone();
        let subject = client.subjects().api(dispatcher_nats::ApiEndpoint::Stats);
        async move {
            let r = request(&nats, subject, json!({})).await;
            let s = &r["stats"];
            let caught_up = s["completed"] == completed
                && s["failed"] == failed
                && s["retried"] == retried
                && s["submitted"] == accepted
                && r["nodes"].as_array().is_some_and(|n| n.len() == 3);
            caught_up.then_some(r)
        }
    })
    .await;
    assert_eq!(reply["scope"], "cluster");
    assert!(["n1", "n2", "n3"].contains(&reply["node"].as_str().unwrap()));
    assert_eq!(reply["stats"]["workers"], 12, "gauges summed: {reply}");
    assert_eq!(reply["stats"]["running"], 0);
    assert_eq!(reply["cluster"]["nodes"], 3);
    assert!(
        reply["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["taking_work"] == true),
        "{reply}"
    );
    assert_eq!(reply["cluster"]["totals"]["completed"], completed);
    // The top level is the sum of the per-node figures beside it.
    for key in ["submitted", "completed", "failed", "retried", "workers"] {
        let sum: u64 = reply["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["stats"][key].as_u64().unwrap())
            .sum();
        assert_eq!(reply["stats"][key], sum, "{key}: {reply}");
    }
    let (avg, p50, p99) = (
        reply["stats"]["avg_ms"].as_f64().unwrap(),
        reply["stats"]["p50_ms"].as_f64().unwrap(),
        reply["stats"]["p99_ms"].as_f64().unwrap(),
    );
    assert!(avg > 0.0 && p50 > 0.0 && p99 >= p50, "{}", reply["stats"]);
    // The typed client reads the same top level.
    let stats = client.stats().await.unwrap();
    assert_eq!(stats.completed, completed);
    for node in nodes {
        node.shutdown().await;
    }
}

#[actix::test]
async fn errors_are_the_clusters_and_outlive_every_node() {
    let server = LocalServer::start().expect("nats-server");
    let prefix = "errs";
    let a = start_node(&server.url(), prefix, "a", &["fail_a"]).await;
    let b = start_node(&server.url(), prefix, "b", &["fail_b"]).await;
    let client = client(&server.url(), prefix).await;
    for k in ["fail_a", "fail_b"] {
        let mut spec = TaskSpec::new(k, json!(null));
        spec.max_attempts = Some(2);
        let last = client.submit_and_wait(spec, DEADLINE).await.expect("ends");
        assert!(matches!(last.body, EventBody::Failed { .. }), "{last:?}");
    }
    let both = |errors: &[dispatcher_actors::ErrorEntry]| {
        let nodes: HashSet<_> = errors
            .iter()
            .filter_map(|e| e.node.as_ref().map(|n| n.to_string()))
            .collect();
        (errors.len() == 4 && nodes.len() == 2).then_some(())
    };
    // Every node answers with every node's errors.
    eventually(DEADLINE, || async {
        both(&client.errors(100).await.unwrap())
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
    // A new node on the same server, serving neither kind, still has them.
    let c = start_node(&server.url(), prefix, "c", &[]).await;
    // (A request that races the new node's first subscriptions may find
    // no responder: asked again until one answers.)
    let errors = eventually(DEADLINE, || async { client.errors(100).await.ok() }).await;
    assert!(both(&errors).is_some(), "{errors:?}");
    // Newest first: the second task's attempts come first.
    assert_eq!(errors[0].kind.as_str(), "fail_b");
    assert_eq!(errors[0].status, Some(TaskStatus::Failed));
    assert_eq!(errors[1].status, Some(TaskStatus::Retrying));
    assert_eq!(errors[3].kind.as_str(), "fail_a");
    // Filters.
    let only_a = ErrorFilter {
        kind: Some(kind("fail_a")),
        status: None,
    };
    let found = client.errors_matching(&only_a, 100).await.unwrap();
    assert_eq!(found.len(), 2);
    assert!(found
        .iter()
        .all(|e| e.kind.as_str() == "fail_a" && e.node.as_ref().map(|n| n.as_str()) == Some("a")));
    let failed = ErrorFilter {
        kind: None,
        status: Some(TaskStatus::Failed),
    };
    let found = client.errors_matching(&failed, 100).await.unwrap();
    assert_eq!(found.len(), 2);
    let found = client.errors_matching(&failed, 1).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].kind.as_str(), "fail_b");
    // A status that is not an attempt's outcome is refused.
    let reply = request(
        client.nats(),
        client.subjects().api(dispatcher_nats::ApiEndpoint::Errors),
        json!({"status": "completed"}),
    )
    .await;
    assert_eq!(reply["error"]["code"], "invalid_field", "{reply}");
    c.shutdown().await;
}

/// A record as docs/protocol.md shows it.
fn record(id: &str, status: &str, created_ms: u64) -> Value {
    let created =
        time::OffsetDateTime::UNIX_EPOCH + Duration::from_millis(1_800_000_000_000 + created_ms);
    let ts = created
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    json!({
        "id": id, "kind": "echo", "priority": "normal", "status": status,
        "attempt": 1, "max_attempts": 3, "node": "writer", "worker": 1,
        "progress": 100, "message": null, "created_at": ts, "started_at": ts,
        "finished_at": ts, "result": {"n": created_ms}, "error": null,
    })
}

#[actix::test]
async fn list_pages_through_100_000_records_newest_first() {
    const RECORDS: usize = 100_000;
    const BATCH: usize = 5_000;
    let server = LocalServer::start().expect("nats-server");
    let prefix = "many";
    let node = start_node(&server.url(), prefix, "lister", &[]).await;
    let client = client(&server.url(), prefix)
        .await
        .with_timeout(Duration::from_secs(30));
    let subjects = Subjects::new(prefix).unwrap();
    let kv = jetstream::new(client.nats().clone())
        .get_key_value(subjects.bucket_tasks())
        .await
        .unwrap();
    // Batches one after the other, each pipelined: a record of a later
    // batch is written after every record of an earlier one. Every
    // 10 000th record is `failed`, the others `completed`.
    let started = Instant::now();
    for batch in 0..RECORDS / BATCH {
        let puts = (batch * BATCH..(batch + 1) * BATCH).map(|i| {
            let status = if i % 10_000 == 0 {
                "failed"
            } else {
                "completed"
            };
            let body = serde_json::to_vec(&record(&format!("t{i:06}"), status, i as u64)).unwrap();
            let kv = kv.clone();
            async move { kv.put(format!("t{i:06}"), body.into()).await }
        });
        for put in join_all(puts).await {
            put.unwrap();
        }
    }
    kv.put(
        "newest",
        serde_json::to_vec(&record("newest", "completed", RECORDS as u64))
            .unwrap()
            .into(),
    )
    .await
    .unwrap();
    println!("{} records written in {:?}", RECORDS + 1, started.elapsed());

    // The first page of one is the record written last.
    let one = ListFilter {
        limit: 1,
        ..ListFilter::default()
    };
    let (first, next) = client.list_page(&one, None).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].id.as_str(), "newest");
    assert!(next.is_some());

    // Every record once, newest write first, following `next`.
    let filter = ListFilter {
        limit: 1000,
        ..ListFilter::default()
    };
    let mut cursor: Option<String> = None;
    let mut seen = Vec::with_capacity(RECORDS + 1);
    let mut pages = Vec::new();
    loop {
        let t = Instant::now();
        let (tasks, next) = client.list_page(&filter, cursor.as_deref()).await.unwrap();
        pages.push(t.elapsed());
        seen.extend(tasks.into_iter().map(|r| r.id.as_str().to_owned()));
        match next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    assert_eq!(seen.len(), RECORDS + 1);
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), RECORDS + 1, "no duplicates");
    assert_eq!(seen[0], "newest");
    let batch_of = |id: &str| id[1..].parse::<usize>().unwrap() / BATCH;
    for pair in seen[1..].windows(2) {
        assert!(
            batch_of(&pair[0]) >= batch_of(&pair[1]),
            "write order: {pair:?}"
        );
    }
    pages.sort();
    println!(
        "list: {} pages of 1000; page time median {:?}, max {:?}",
        pages.len(),
        pages[pages.len() / 2],
        pages[pages.len() - 1]
    );

    // A filter that matches few: pages may come back short, even empty,
    // but following `next` finds every match and nothing is cut off.
    let failed = ListFilter {
        status: Some(TaskStatus::Failed),
        limit: 1000,
        ..ListFilter::default()
    };
    let mut cursor: Option<String> = None;
    let mut found = Vec::new();
    let mut requests = 0;
    loop {
        let (tasks, next) = client.list_page(&failed, cursor.as_deref()).await.unwrap();
        requests += 1;
        found.extend(tasks.into_iter().map(|r| r.id.as_str().to_owned()));
        match next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    let expected: Vec<String> = (0..RECORDS)
        .rev()
        .filter(|i| i % 10_000 == 0)
        .map(|i| format!("t{i:06}"))
        .collect();
    assert_eq!(found, expected);
    println!("list --status failed: {requests} requests to walk {RECORDS} records");

    // Several requests at once are answered side by side (all within the
    // deadline; the time is printed, not asserted).
    let t = Instant::now();
    let replies = join_all((0..4).map(|_| {
        let client = client.clone();
        let filter = filter.clone();
        async move {
            tokio::time::timeout(DEADLINE, client.list_page(&filter, None))
                .await
                .expect("answered within the deadline")
        }
    }))
    .await;
    for reply in replies {
        assert_eq!(reply.unwrap().0.len(), 1000);
    }
    println!(
        "4 concurrent list pages of 1000 answered in {:?}",
        t.elapsed()
    );

    // A cursor that is not one is refused.
    let reply = request(
        client.nats(),
        subjects.api(dispatcher_nats::ApiEndpoint::List),
        json!({"cursor": "abc"}),
    )
    .await;
    assert_eq!(reply["error"]["field"], "cursor", "{reply}");
    node.shutdown().await;
}

#[actix::test]
async fn the_backlog_counts_kinds_no_node_serves() {
    let server = LocalServer::start().expect("nats-server");
    let prefix = "back";
    let node = start_node(&server.url(), prefix, "only-echo", &[]).await;
    let client = client(&server.url(), prefix).await;
    let subjects = Subjects::new(prefix).unwrap();
    let js = jetstream::new(client.nats().clone());
    for i in 0..3 {
        let body = json!({"id": format!("orphan-{i}"), "payload": i}).to_string();
        js.publish(
            subjects.task("nobody", dispatcher_actors::Priority::High),
            body.into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let reply = request(
        client.nats(),
        subjects.api(dispatcher_nats::ApiEndpoint::Stats),
        json!({}),
    )
    .await;
    let backlog = reply["backlog"].as_array().expect("backlog");
    let orphan = backlog
        .iter()
        .find(|b| b["subject"] == "back.tasks.nobody.high")
        .unwrap_or_else(|| panic!("the unserved kind is in the backlog: {reply}"));
    assert_eq!(orphan["kind"], "nobody");
    assert_eq!(orphan["priority"], "high");
    assert_eq!(orphan["messages"], 3);
    assert_eq!(orphan["pending"], 3);
    assert_eq!(orphan["consumer"], Value::Null);
    // Served kinds keep their consumer's figures.
    assert!(
        backlog
            .iter()
            .any(|b| b["kind"] == "echo" && b["consumer"] == "echo_normal"),
        "{reply}"
    );
    node.shutdown().await;
}

#[actix::test]
async fn core_mode_pages_and_filters_the_nodes_own_lists() {
    let server = LocalServer::start().expect("nats-server");
    let prefix = "corelist";
    let node = start_node_in(Mode::Core, &server.url(), prefix, "solo", &["fail"]).await;
    let client = client(&server.url(), prefix).await;
    for i in 0..5 {
        let last = client
            .submit_and_wait(TaskSpec::new("echo", json!(i)), DEADLINE)
            .await
            .unwrap();
        assert!(matches!(last.body, EventBody::Completed { .. }));
    }
    let mut spec = TaskSpec::new("fail", json!(null));
    spec.max_attempts = Some(2);
    client.submit_and_wait(spec, DEADLINE).await.unwrap();
    let filter = ListFilter {
        kind: Some(kind("echo")),
        limit: 2,
        ..ListFilter::default()
    };
    let mut cursor = None;
    let mut pages = Vec::new();
    loop {
        let (tasks, next) = client.list_page(&filter, cursor.as_deref()).await.unwrap();
        pages.push(tasks.len());
        cursor = next;
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(pages, vec![2, 2, 1]);
    // Stats stay the node's own in core mode.
    let reply = request(
        client.nats(),
        client.subjects().api(dispatcher_nats::ApiEndpoint::Stats),
        json!({}),
    )
    .await;
    assert_eq!(reply["scope"], "node", "{reply}");
    assert_eq!(reply["stats"]["completed"], 5);
    // Error filters hold in core mode too.
    let failed = ErrorFilter {
        kind: Some(kind("fail")),
        status: Some(TaskStatus::Failed),
    };
    let found = client.errors_matching(&failed, 10).await.unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(client.errors(10).await.unwrap().len(), 2);
    node.shutdown().await;
}
