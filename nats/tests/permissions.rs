//! The shipped NATS permissions (`deploy/nats/dispatch.conf`) against a
//! real nats-server started with that very file (only the passwords are
//! filled in; port and store are the launcher's): a node runs as `node` in
//! both modes without a single permission violation; a `client` can do
//! every documented client workflow; a `client` is refused every privileged
//! subject, and what it tried changed nothing, not even through a reply
//! subject; `producer` may use the direct queue and `admin` may call
//! `replay`; the prefix script gives a working configuration for another
//! prefix. Subjects are spelt out, as a deployment's configuration spells
//! them. Every wait has a deadline; nothing sleeps to wait.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use async_nats::{ConnectOptions, Event};
use dispatcher_actors::{
    handler_fn, DispatcherConfig, EventBody, Handlers, NodeId, TaskError, TaskKind, TaskSpec,
};
use dispatcher_nats::{Client, LocalServer, Mode, Node, NodeOptions};
use serde_json::{json, Value};

mod common;

use common::{next_json, request, subscribe, DEADLINE};

/// The shipped configuration.
const CONF: &str = include_str!("../../deploy/nats/dispatch.conf");
/// The users it defines.
const USERS: [&str; 4] = ["node", "client", "producer", "admin"];
/// The JetStream API prefix under which clients reach the records bucket.
const CLIENT_JS_API: &str = "JS.dispatch.API";

fn password(user: &str) -> String {
    format!("{user}-test-password")
}

/// `conf` with its placeholder passwords filled in; nothing else changes.
fn with_passwords(conf: &str) -> String {
    let mut out = conf.to_owned();
    for user in USERS {
        let placeholder = format!("CHANGE_ME_{}_PASSWORD", user.to_uppercase());
        assert!(out.contains(&placeholder), "{placeholder} in the config");
        out = out.replace(&placeholder, &password(user));
    }
    out
}

fn start_server(conf: &str) -> LocalServer {
    LocalServer::start_with_config(&with_passwords(conf))
        .expect("nats-server with deploy/nats/dispatch.conf")
}

/// A connection as `user` that records every error the server sends it.
struct Conn {
    nats: async_nats::Client,
    errors: Arc<Mutex<Vec<String>>>,
}

async fn connect(server: &LocalServer, user: &str) -> Conn {
    let errors = Arc::new(Mutex::new(Vec::new()));
    let seen = errors.clone();
    let nats = ConnectOptions::with_user_and_password(user.to_owned(), password(user))
        .event_callback(move |event| {
            let seen = seen.clone();
            async move {
                if let Event::ServerError(e) = event {
                    seen.lock().expect("not poisoned").push(e.to_string());
                }
            }
        })
        .connect(server.url())
        .await
        .unwrap_or_else(|e| panic!("connecting as {user}: {e}"));
    Conn { nats, errors }
}

impl Conn {
    fn violations(&self) -> Vec<String> {
        self.errors
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|e| e.to_lowercase().contains("permissions violation"))
            .cloned()
            .collect()
    }

    /// Waits until the server has reported a violation naming `what`
    /// (`publish to "<subject>"` or `subscription to "<subject>"`).
    async fn refused(&self, what: &str) {
        let needle = what.to_lowercase();
        eventually(&format!("a permissions violation for {what}"), || async {
            self.violations()
                .iter()
                .any(|v| v.to_lowercase().contains(&needle))
                .then_some(())
        })
        .await;
    }

    /// Publishes `body` on `subject` and waits until the server refuses it.
    async fn refused_publish(&self, subject: &str, body: Value) {
        self.nats
            .publish(subject.to_owned(), body.to_string().into())
            .await
            .unwrap();
        self.nats.flush().await.unwrap();
        self.refused(&format!("publish to \"{subject}\"")).await;
    }

    /// Subscribes to `subject` and waits until the server refuses it.
    async fn refused_subscription(&self, subject: &str) {
        let _sub = self.nats.subscribe(subject.to_owned()).await.unwrap();
        self.nats.flush().await.unwrap();
        self.refused(&format!("subscription to \"{subject}\""))
            .await;
    }

    /// Publishes on `subject` and checks, after a round trip to the server,
    /// that nothing was refused.
    async fn allowed_publish(&self, subject: &str, body: Value) {
        self.nats
            .publish(subject.to_owned(), body.to_string().into())
            .await
            .unwrap();
        self.nats.flush().await.unwrap();
        self.assert_no_violations();
    }

    fn assert_no_violations(&self) {
        let v = self.violations();
        assert!(v.is_empty(), "permission violations: {v:?}");
    }
}

/// Calls `f` until it returns `Some`, for at most [`DEADLINE`].
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    tokio::time::timeout(DEADLINE, async {
        loop {
            if let Some(v) = f().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} within {DEADLINE:?}"))
}

/// Every permission violation the server logged for `user`.
fn logged_violations(server: &LocalServer, user: &str) -> Vec<String> {
    let who = format!("\"{user}\"");
    server
        .log()
        .lines()
        .filter(|l| l.contains("Violation") && l.contains(&who))
        .map(str::to_owned)
        .collect()
}

/// The node's permissions sufficed for everything it did.
fn assert_node_never_refused(server: &LocalServer) {
    let refused = logged_violations(server, "node");
    assert!(refused.is_empty(), "the node was refused: {refused:#?}");
}

/// `echo`; `fail` always fails; `gate` runs until cancelled.
fn handlers() -> Handlers {
    let mut h = Handlers::new();
    h.insert(
        TaskKind::new("echo").unwrap(),
        handler_fn(|_ctx, p| async move { Ok(p) }),
    );
    h.insert(
        TaskKind::new("fail").unwrap(),
        handler_fn(|_ctx, _p| async move { Err(TaskError::new("always fails")) }),
    );
    h.insert(
        TaskKind::new("gate").unwrap(),
        handler_fn(|ctx, _p| async move {
            ctx.cancelled().await;
            Err(TaskError::new("cancelled"))
        }),
    );
    h
}

/// A node connected as `node`, with one worker and room for one task more
/// (so that a third task waits in the stream); heartbeats and metrics
/// every 200 ms, so that watchers see some.
async fn start_node(server: &LocalServer, prefix: &str, mode: Mode) -> Node {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let mut config = DispatcherConfig::new(NodeId::new("perm-node").unwrap());
    config.workers = 1;
    config.queue_capacity = Some(1);
    config.keep_alive_interval = Duration::from_secs(5);
    let mut options = NodeOptions {
        prefix: prefix.to_owned(),
        mode,
        heartbeat_interval: Duration::from_millis(200),
        shutdown_timeout: Duration::from_millis(300),
        ..NodeOptions::default()
    };
    options.jetstream.idle_poll = Duration::from_secs(3600);
    let nats = connect(server, "node").await.nats;
    Node::start(nats, config, handlers(), options)
        .await
        .expect("a node starts with the node user's permissions")
}

/// Events until `id` has one named `name`; answers them all.
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

/// The records bucket as a client reaches it: through the JetStream API
/// prefix the configuration imports.
async fn client_records(conn: &Conn, bucket: &str) -> kv::Store {
    let mut js = jetstream::with_prefix(conn.nats.clone(), CLIENT_JS_API);
    js.set_timeout(Duration::from_secs(2));
    js.get_key_value(bucket)
        .await
        .unwrap_or_else(|e| panic!("a client opens the bucket {bucket}: {e}"))
}

/// Polls `records` until `id`'s record has `status`.
async fn record_with_status(records: &kv::Store, id: &str, status: &str) -> Value {
    eventually(&format!("record of {id} {status}"), || async {
        let bytes = records.get(id).await.unwrap()?;
        let record: Value = serde_json::from_slice(&bytes).unwrap();
        (record["status"] == status).then_some(record)
    })
    .await
}

#[actix::test]
async fn a_client_can_do_every_documented_workflow() {
    let server = start_server(CONF);
    let node = start_node(&server, "dispatch", Mode::JetStream).await;
    let client = connect(&server, "client").await;
    let nats = &client.nats;
    let mut events = subscribe(nats, "dispatch.events.>").await;
    let mut nodes = subscribe(nats, "dispatch.nodes.>").await;
    let mut metrics = subscribe(nats, "dispatch.metrics.>").await;

    // Submit, and watch the task's events until it completes.
    let r = request(
        nats,
        "dispatch.submit.echo",
        json!({"id": "p1", "payload": {"n": 1}}),
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["id"], "p1");
    let seen = until(&mut events, "p1", "completed").await;
    assert_eq!(seen.last().unwrap()["result"], json!({"n": 1}));

    // Node events and metrics snapshots reach watchers.
    let (subject, _) = next_json(&mut nodes).await;
    assert!(
        subject.starts_with("dispatch.nodes.perm-node."),
        "{subject}"
    );
    let (subject, snapshot) = next_json(&mut metrics).await;
    assert_eq!(subject, "dispatch.metrics.perm-node");
    assert_eq!(snapshot["node"], "perm-node");

    // The task record, read with a plain KV get.
    let records = client_records(&client, "dispatch_tasks").await;
    let record = record_with_status(&records, "p1", "completed").await;
    assert_eq!(record["kind"], "echo");

    // The control API.
    let r = request(nats, "dispatch.api.status", json!({"id": "p1"})).await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["task"]["status"], "completed");
    let r = request(nats, "dispatch.api.list", json!({"kind": "echo"})).await;
    assert_eq!(r["ok"], true, "{r}");
    assert!(r["tasks"].as_array().is_some_and(|t| !t.is_empty()), "{r}");
    let r = request(nats, "dispatch.api.stats", json!({})).await;
    assert_eq!(r["ok"], true, "{r}");
    let r = request(nats, "dispatch.api.nodes", json!({})).await;
    assert_eq!(r["ok"], true, "{r}");
    let r = request(nats, "dispatch.api.errors", json!({})).await;
    assert_eq!(r["ok"], true, "{r}");

    // Cancel a task running, one queued on the node, and one still in the
    // stream (no node took it: the node ends its record at once, a
    // compare-and-set on the record).
    for id in ["g1", "g2", "g3"] {
        let r = request(nats, "dispatch.submit.gate", json!({"id": id})).await;
        assert_eq!(r["ok"], true, "{r}");
    }
    until(&mut events, "g1", "started").await;
    let r = request(nats, "dispatch.api.cancel", json!({"id": "g3"})).await;
    assert_eq!(r, json!({"ok": true, "status": "cancelled"}));
    for id in ["g2", "g1"] {
        let r = request(nats, "dispatch.api.cancel", json!({"id": id})).await;
        assert_eq!(r["ok"], true, "{id}: {r}");
    }
    for id in ["g1", "g2", "g3"] {
        record_with_status(&records, id, "cancelled").await;
    }

    // A task whose attempts are spent: its dead letter is stored.
    let r = request(
        nats,
        "dispatch.submit.fail",
        json!({"id": "f1", "max_attempts": 1}),
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    until(&mut events, "f1", "failed").await;
    let observer = jetstream::new(connect(&server, "node").await.nats);
    let dead = observer.get_stream("DISPATCH_DEAD").await.unwrap();
    eventually("the dead letter of f1", || async {
        (dead.get_info().await.unwrap().state.messages == 1).then_some(())
    })
    .await;
    let r = request(nats, "dispatch.api.errors", json!({})).await;
    assert!(r["errors"].as_array().is_some_and(|e| !e.is_empty()), "{r}");

    // Service discovery.
    for subject in ["$SRV.PING", "$SRV.PING.dispatch", "$SRV.INFO.dispatch"] {
        let r = request(nats, subject, json!({})).await;
        assert_eq!(r["name"], "dispatch", "{subject}: {r}");
    }
    let r = request(nats, "$SRV.STATS.dispatch", json!({})).await;
    assert!(r["endpoints"].is_array(), "{r}");

    // The typed client.
    let typed = Client::new(nats.clone(), "dispatch").unwrap();
    let last = typed
        .submit_and_wait(TaskSpec::new("echo", json!({"n": 2})), DEADLINE)
        .await
        .unwrap();
    assert!(
        matches!(&last.body, EventBody::Completed { result, .. } if *result == json!({"n": 2})),
        "{last:?}"
    );
    assert!(typed.stats().await.unwrap().completed >= 2);

    client.assert_no_violations();
    // The node's shutdown too: hand-backs, the last records, `offline`.
    node.shutdown().await;
    assert_node_never_refused(&server);
}

#[actix::test]
async fn a_client_is_refused_every_privileged_subject_and_changes_nothing() {
    let server = start_server(CONF);
    let node = start_node(&server, "dispatch", Mode::JetStream).await;
    // What the test reads the truth from: a trusted connection.
    let observer = connect(&server, "node").await.nats;
    let js = jetstream::new(observer.clone());
    let records = js.get_key_value("dispatch_tasks").await.unwrap();
    let client = connect(&server, "client").await;
    let nats = &client.nats;
    let mut events = subscribe(nats, "dispatch.events.>").await;

    // A finished task, and one running (until cancelled) with its delivery.
    let r = request(nats, "dispatch.submit.echo", json!({"id": "done-1"})).await;
    assert_eq!(r["ok"], true, "{r}");
    until(&mut events, "done-1", "completed").await;
    record_with_status(&records, "done-1", "completed").await;
    let done = records.entry("done-1").await.unwrap().unwrap();
    let r = request(nats, "dispatch.submit.gate", json!({"id": "run-1"})).await;
    assert_eq!(r["ok"], true, "{r}");
    until(&mut events, "run-1", "started").await;
    let running = eventually("run-1's record with its ack subject", || async {
        let bytes = records.get("run-1").await.unwrap()?;
        let r: Value = serde_json::from_slice(&bytes).unwrap();
        (r["status"] == "running" && r["ack"].is_string()).then_some(r)
    })
    .await;
    let ack = running["ack"].as_str().unwrap().to_owned();
    let tasks = js.get_stream("DISPATCH_TASKS").await.unwrap();
    let consumers = tasks.get_info().await.unwrap().state.consumer_count;
    assert_eq!(
        tasks
            .consumer_info("gate_normal")
            .await
            .unwrap()
            .num_ack_pending,
        1
    );

    // Every privileged publish is refused.
    let attacks = [
        (
            "dispatch.leases.fake",
            json!({"node": "fake", "add": ["$KV.dispatch_tasks.done-1", ack]}),
        ),
        (
            "dispatch.nodes.fake.online",
            json!({"node": "fake", "event": "online"}),
        ),
        (
            "dispatch.nodes.perm-node.offline",
            json!({"node": "perm-node", "event": "offline"}),
        ),
        (
            "dispatch.metrics.fake",
            json!({"node": "fake", "held": [ack]}),
        ),
        (
            "dispatch.events.echo.done-1.completed",
            json!({"task_id": "done-1", "event": "completed", "result": "forged"}),
        ),
        ("$KV.dispatch_tasks.done-1", json!("-NAK")),
        ("$KV.dispatch_tasks.someid", json!({"status": "completed"})),
        (
            "$KV.dispatch_cancels.run-1",
            json!({"requested_at": "2026-01-01T00:00:00.000Z"}),
        ),
        ("$KV.dispatch_cancels.someid", json!({})),
        (&ack, json!("+TERM")),
        ("$JS.ACK.DISPATCH_TASKS.x.1.1.1.1.1", json!("+ACK")),
        (
            "dispatch.dead.echo",
            json!({"id": "done-1", "kind": "echo"}),
        ),
        (
            "dispatch.errors.echo",
            json!({"task_id": "done-1", "kind": "echo", "attempt": 1,
                   "error": {"code": "handler_error", "message": "forged"},
                   "ts": "2026-01-01T00:00:00.000Z"}),
        ),
        ("dispatch.tasks.echo.normal", json!({"id": "sneak-1"})),
        ("dispatch.tasks.echo.critical", json!({"id": "sneak-2"})),
        ("otherprefix.submit.echo", json!({"id": "other-1"})),
        ("otherprefix.api.cancel", json!({"id": "run-1"})),
        ("dispatch.api.replay", json!({"id": "done-1"})),
        ("$JS.API.STREAM.DELETE.DISPATCH_TASKS", json!({})),
        ("$JS.API.STREAM.PURGE.DISPATCH_TASKS", json!({})),
        ("$JS.API.STREAM.PURGE.KV_dispatch_tasks", json!({})),
        ("$JS.API.STREAM.DELETE.KV_dispatch_tasks", json!({})),
        (
            "$JS.API.CONSUMER.CREATE.DISPATCH_TASKS",
            json!({"stream_name": "DISPATCH_TASKS", "config": {"ack_policy": "explicit"}}),
        ),
        (
            "$JS.API.CONSUMER.MSG.NEXT.DISPATCH_TASKS.echo_normal",
            json!({"batch": 1}),
        ),
        ("$JS.API.STREAM.INFO.KV_dispatch_tasks", json!({})),
        ("JS.dispatch.API.STREAM.INFO.DISPATCH_TASKS", json!({})),
        (
            "JS.dispatch.API.STREAM.MSG.GET.DISPATCH_TASKS",
            json!({"seq": 1}),
        ),
        ("JS.dispatch.API.STREAM.INFO.KV_dispatch_cancels", json!({})),
        (
            "JS.dispatch.API.DIRECT.GET.DISPATCH_ERRORS",
            json!({"seq": 1}),
        ),
        ("JS.dispatch.API.STREAM.PURGE.KV_dispatch_tasks", json!({})),
        ("JS.dispatch.API.$KV.dispatch_tasks.done-1", json!("-NAK")),
        ("_INBOX.node.1", json!({"forged": "reply"})),
    ];
    for (subject, body) in &attacks {
        client.refused_publish(subject, body.clone()).await;
    }
    // And what would let it watch the node's side.
    for subject in [
        "dispatch.leases.>",
        "dispatch.tasks.>",
        "dispatch.submit.>",
        "dispatch.api.>",
        "$KV.>",
        "$JS.>",
    ] {
        client.refused_subscription(subject).await;
    }

    // A KV write through the KV API fails, and so does the unprefixed
    // JetStream API.
    let client_view = client_records(&client, "dispatch_tasks").await;
    assert!(client_view
        .put("done-1", "overwritten".into())
        .await
        .is_err());
    let mut plain = jetstream::new(nats.clone());
    plain.set_timeout(Duration::from_secs(2));
    assert!(plain.get_key_value("dispatch_tasks").await.is_err());

    // Allowed requests whose reply subject names a privileged subject: the
    // reply goes back into the clients' account, where nothing stores it.
    // Each is followed by the same request answered normally, so that it
    // was handled before the checks below.
    let injections = [
        (
            "JS.dispatch.API.STREAM.INFO.KV_dispatch_tasks",
            "$KV.dispatch_tasks.done-1",
            json!({}),
        ),
        (
            "JS.dispatch.API.DIRECT.GET.KV_dispatch_tasks.$KV.dispatch_tasks.done-1",
            "$KV.dispatch_tasks.done-1",
            json!({}),
        ),
        (
            "JS.dispatch.API.STREAM.INFO.KV_dispatch_tasks",
            ack.as_str(),
            json!({}),
        ),
        (
            "dispatch.api.status",
            "$KV.dispatch_tasks.done-1",
            json!({"id": "done-1"}),
        ),
        ("dispatch.api.stats", ack.as_str(), json!({})),
        (
            "dispatch.api.stats",
            "$KV.dispatch_cancels.run-1",
            json!({}),
        ),
        (
            "dispatch.submit.echo",
            "$KV.dispatch_tasks.done-1",
            json!({}),
        ),
        (
            "dispatch.submit.echo",
            "dispatch.tasks.echo.normal",
            json!({}),
        ),
        ("$SRV.PING.dispatch", "dispatch.leases.fake", json!({})),
    ];
    for (subject, reply, body) in &injections {
        nats.publish_with_reply(
            subject.to_string(),
            reply.to_string(),
            body.to_string().into(),
        )
        .await
        .unwrap();
        let answer = nats
            .request(subject.to_string(), body.to_string().into())
            .await;
        assert!(answer.is_ok(), "{subject}: {answer:?}");
    }

    // Nothing changed: the finished task's record, the running task (still
    // running, its delivery still held, no cancel request), the streams and
    // consumers; no task the client slipped in ran or was recorded.
    let now = records.entry("done-1").await.unwrap().unwrap();
    assert_eq!(now.revision, done.revision, "the record was rewritten");
    assert_eq!(now.value, done.value);
    let cancels = js.get_stream("KV_dispatch_cancels").await.unwrap();
    assert_eq!(
        cancels.get_info().await.unwrap().state.messages,
        0,
        "a cancel request was stored"
    );
    assert!(records.get("someid").await.unwrap().is_none());
    let r = request(nats, "dispatch.api.status", json!({"id": "run-1"})).await;
    assert_eq!(r["task"]["status"], "running", "{r}");
    assert_eq!(
        tasks
            .consumer_info("gate_normal")
            .await
            .unwrap()
            .num_ack_pending,
        1
    );
    let mut tasks = js.get_stream("DISPATCH_TASKS").await.unwrap();
    assert_eq!(tasks.info().await.unwrap().state.consumer_count, consumers);
    let mut dead = js.get_stream("DISPATCH_DEAD").await.unwrap();
    assert_eq!(dead.info().await.unwrap().state.messages, 0);
    let mut kv_stream = js.get_stream("KV_dispatch_tasks").await.unwrap();
    assert!(kv_stream.info().await.unwrap().state.messages >= 2);

    // The running task ends as asked, and the node runs the next.
    let r = request(nats, "dispatch.api.cancel", json!({"id": "run-1"})).await;
    assert_eq!(r["ok"], true, "{r}");
    let mut seen = until(&mut events, "run-1", "cancelled").await;
    let r = request(nats, "dispatch.submit.echo", json!({"id": "after-1"})).await;
    assert_eq!(r["ok"], true, "{r}");
    seen.extend(until(&mut events, "after-1", "completed").await);
    for e in &seen {
        let id = e["task_id"].as_str().unwrap_or_default();
        assert!(
            !["sneak-1", "sneak-2", "other-1"].contains(&id),
            "a task the client slipped in ran: {e}"
        );
        assert_ne!(e["result"], "forged", "{e}");
    }
    assert!(records.get("sneak-1").await.unwrap().is_none());
    assert!(records.get("sneak-2").await.unwrap().is_none());
    // The refusals are in the server's log, under the client's name.
    assert!(logged_violations(&server, "client").len() >= attacks.len());
    node.shutdown().await;
    assert_node_never_refused(&server);
}

#[actix::test]
async fn a_producer_may_use_the_direct_queue_and_an_admin_may_call_replay() {
    let server = start_server(CONF);
    let node = start_node(&server, "dispatch", Mode::JetStream).await;

    let producer = connect(&server, "producer").await;
    let mut events = subscribe(&producer.nats, "dispatch.events.*.direct-1.*").await;
    let ack = jetstream::new(producer.nats.clone())
        .publish(
            "dispatch.tasks.echo.normal",
            json!({"id": "direct-1", "payload": "straight"})
                .to_string()
                .into(),
        )
        .await
        .unwrap()
        .await
        .expect("JetStream acknowledges a producer's task through the import");
    assert_eq!(ack.stream, "DISPATCH_TASKS");
    let seen = until(&mut events, "direct-1", "completed").await;
    assert_eq!(seen.last().unwrap()["result"], "straight");
    producer.assert_no_violations();
    producer
        .refused_publish("dispatch.api.replay", json!({"id": "direct-1"}))
        .await;
    producer
        .refused_publish("dispatch.leases.fake", json!({"node": "fake"}))
        .await;
    producer
        .refused_publish("$KV.dispatch_tasks.direct-1", json!({}))
        .await;

    let admin = connect(&server, "admin").await;
    admin
        .allowed_publish("dispatch.api.replay", json!({"id": "direct-1"}))
        .await;
    let r = request(
        &admin.nats,
        "dispatch.api.status",
        json!({"id": "direct-1"}),
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    admin
        .refused_publish("dispatch.tasks.echo.normal", json!({"id": "direct-2"}))
        .await;

    node.shutdown().await;
    assert_node_never_refused(&server);
}

#[actix::test]
async fn a_core_mode_node_runs_under_the_node_permissions() {
    let server = start_server(CONF);
    let node = start_node(&server, "dispatch", Mode::Core).await;
    let client = connect(&server, "client").await;
    let mut events = subscribe(&client.nats, "dispatch.events.>").await;

    let r = request(&client.nats, "dispatch.submit.echo", json!({"id": "c1"})).await;
    assert_eq!(r["ok"], true, "{r}");
    until(&mut events, "c1", "completed").await;
    let r = request(&client.nats, "dispatch.api.status", json!({"id": "c1"})).await;
    assert_eq!(r["task"]["status"], "completed", "{r}");
    let r = request(&client.nats, "$SRV.PING.dispatch", json!({})).await;
    assert_eq!(r["name"], "dispatch", "{r}");

    let producer = connect(&server, "producer").await;
    producer
        .allowed_publish("dispatch.tasks.echo.normal", json!({"id": "c2"}))
        .await;
    until(&mut events, "c2", "completed").await;
    client.assert_no_violations();
    client
        .refused_publish("dispatch.tasks.echo.normal", json!({"id": "c3"}))
        .await;

    node.shutdown().await;
    assert_node_never_refused(&server);
}

#[actix::test]
async fn the_prefix_script_gives_a_working_configuration_for_another_prefix() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats/adapt-prefix.sh");
    let output = std::process::Command::new("sh")
        .arg(&script)
        .arg("acme.jobs")
        .stdin(
            std::fs::File::open(
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats/dispatch.conf"),
            )
            .unwrap(),
        )
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let conf = String::from_utf8(output.stdout).unwrap();
    let server = start_server(&conf);
    let node = start_node(&server, "acme.jobs", Mode::JetStream).await;
    let client = connect(&server, "client").await;
    let mut events = subscribe(&client.nats, "acme.jobs.events.>").await;

    let r = request(&client.nats, "acme.jobs.submit.echo", json!({"id": "a1"})).await;
    assert_eq!(r["ok"], true, "{r}");
    until(&mut events, "a1", "completed").await;
    let records = client_records(&client, "acme_jobs_tasks").await;
    record_with_status(&records, "a1", "completed").await;
    let r = request(&client.nats, "acme.jobs.api.stats", json!({})).await;
    assert_eq!(r["ok"], true, "{r}");
    client.assert_no_violations();

    client
        .refused_publish("acme.jobs.leases.fake", json!({"node": "fake"}))
        .await;
    client
        .refused_publish("dispatch.submit.echo", json!({"id": "a2"}))
        .await;
    client
        .refused_publish("$KV.acme_jobs_tasks.a1", json!({}))
        .await;
    node.shutdown().await;
    assert_node_never_refused(&server);
}
