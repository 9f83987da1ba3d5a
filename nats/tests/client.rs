//! The typed client against a core-mode node on a real nats-server:
//! submissions, rejections, batches, events, the control API, and the
//! errors a caller sees when nobody answers. Every wait has a deadline.

use std::future::Future;
use std::time::Duration;

use dispatcher_actors::dispatcher::CancelOutcome;
use dispatcher_actors::{
    handler_fn, DispatcherConfig, ErrorCode, EventBody, Handlers, ListFilter, NodeId, Priority,
    TaskError, TaskEventName, TaskId, TaskKind, TaskRecord, TaskSpec, TaskStatus,
};
use dispatcher_nats::codec::Limits;
use dispatcher_nats::{Client, ClientError, LocalServer, Node, NodeOptions};
use futures::StreamExt;
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(10);

/// A node as in `node.rs`, plus a `fail` kind that fails for good; returns
/// a client on its own connection.
async fn start_node(server: &LocalServer, prefix: &str) -> (Client, Node) {
    let mut handlers = Handlers::new();
    handlers.insert(
        TaskKind::new("echo").unwrap(),
        handler_fn(|_ctx, p| async move { Ok(p) }),
    );
    handlers.insert(
        TaskKind::new("wait").unwrap(),
        handler_fn(|ctx, _p| async move {
            ctx.cancelled().await;
            Err(TaskError::new("cancelled"))
        }),
    );
    handlers.insert(
        TaskKind::new("fail").unwrap(),
        handler_fn(|_ctx, _p| async move { Err(TaskError::permanent("always fails")) }),
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
    let node = Node::start(nats, config, handlers, options).await.unwrap();
    let nats = async_nats::connect(server.url()).await.unwrap();
    (Client::new(nats, prefix).unwrap(), node)
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
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} within 10 s"))
}

/// Polls `id`'s record until it is in `status`.
async fn status_becomes(client: &Client, id: &TaskId, status: TaskStatus) -> TaskRecord {
    eventually(&format!("{id} {}", status.as_str()), || async {
        let record = client.status(id).await.expect("status");
        (record.status == status).then_some(record)
    })
    .await
}

fn id(s: &str) -> TaskId {
    TaskId::new(s).unwrap()
}

#[actix::test]
async fn submit_and_wait_returns_the_completed_event_with_the_result() {
    let server = LocalServer::start().unwrap();
    let (client, node) = start_node(&server, "c1").await;

    let spec = TaskSpec::new("echo", json!({"n": 7}))
        .with_id("job-1")
        .with_priority(Priority::High);
    let last = client.submit_and_wait(spec, DEADLINE).await.unwrap();
    assert_eq!(last.task_id, id("job-1"));
    assert_eq!(last.kind.as_str(), "echo");
    assert_eq!(last.node.as_str(), "node-1");
    match &last.body {
        EventBody::Completed { result, .. } => assert_eq!(result, &json!({"n": 7})),
        other => panic!("expected completed, got {other:?}"),
    }

    // Without an id, one is made up front and the events still arrive.
    let last = client
        .submit_and_wait(TaskSpec::new("echo", json!("hi")), DEADLINE)
        .await
        .unwrap();
    assert_eq!(last.name(), TaskEventName::Completed);
    assert_eq!(last.task_id.as_str().len(), 36, "{}", last.task_id);

    // A failing task is not an error of the call: its `failed` event is the answer.
    let spec = TaskSpec::new("fail", json!(null)).with_max_attempts(1);
    let last = client.submit_and_wait(spec, DEADLINE).await.unwrap();
    match &last.body {
        EventBody::Failed { error, .. } => assert_eq!(error.code, ErrorCode::HandlerError),
        other => panic!("expected failed, got {other:?}"),
    }
    node.shutdown().await;
}

#[actix::test]
async fn events_stream_from_accepted_to_the_final_event_and_end() {
    let server = LocalServer::start().unwrap();
    let (client, node) = start_node(&server, "c2").await;

    let task = id("streamed");
    let events = client.events(&task).await.unwrap();
    assert_eq!(events.subject(), "c2.events.*.streamed.*");
    let submitted = client
        .submit(TaskSpec::new("echo", json!([1, 2])).with_id("streamed"))
        .await
        .unwrap();
    assert_eq!(submitted, task);
    let seen: Vec<_> = tokio::time::timeout(DEADLINE, events.collect::<Vec<_>>())
        .await
        .expect("the stream ends after the final event");
    let names: Vec<_> = seen.iter().map(|e| e.name()).collect();
    assert_eq!(
        names,
        [
            TaskEventName::Accepted,
            TaskEventName::Started,
            TaskEventName::Completed
        ]
    );
    assert!(seen.iter().all(|e| e.task_id == task));

    // `wait` on a task submitted after it subscribed.
    let waiter = {
        let client = client.clone();
        tokio::spawn(async move { client.wait(&id("later"), DEADLINE).await })
    };
    // The waiter subscribes inside the spawned task; submit once its
    // subscription exists, seen by the server as interest on the subject.
    eventually("the waiter's subscription", || async {
        let probe = client
            .nats()
            .request("c2.events.echo.later.probe", "".into());
        match tokio::time::timeout(Duration::from_millis(100), probe).await {
            // A subscriber is there, it just does not reply.
            Err(_) => Some(()),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::TimedOut => Some(()),
            Ok(_) => None,
        }
    })
    .await;
    client
        .submit(TaskSpec::new("echo", json!(3)).with_id("later"))
        .await
        .unwrap();
    let last = waiter.await.unwrap().unwrap();
    assert_eq!(last.name(), TaskEventName::Completed);
    node.shutdown().await;
}

#[actix::test]
async fn a_bad_submission_is_rejected_with_the_servers_code_and_field() {
    let server = LocalServer::start().unwrap();
    let (client, node) = start_node(&server, "c3").await;

    let mut spec = TaskSpec::new("echo", json!(1));
    spec.priority = Some("urgent".to_owned());
    let err = client.submit(spec.clone()).await.unwrap_err();
    match &err {
        ClientError::Rejected(info) => {
            assert_eq!(info.code, ErrorCode::InvalidField);
            assert_eq!(info.field.as_deref(), Some("priority"));
            assert!(
                info.message.contains("critical, high, normal, low"),
                "{info}"
            );
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert!(
        err.to_string()
            .starts_with("rejected by the dispatcher: invalid_field"),
        "{err}"
    );
    let err = client.submit_and_wait(spec, DEADLINE).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidField), "{err:?}");

    client
        .submit(TaskSpec::new("echo", json!(1)).with_id("dup"))
        .await
        .unwrap();
    let err = client
        .submit(TaskSpec::new("echo", json!(1)).with_id("dup"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::DuplicateId), "{err:?}");

    let big = TaskSpec::new("echo", json!("x".repeat(4096)));
    let err = client.submit(big).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PayloadTooLarge), "{err:?}");

    // A kind that cannot be a subject token is refused before sending.
    let err = client
        .submit(TaskSpec::new("no.such", json!(1)))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Invalid(_)), "{err:?}");
    assert_eq!(err.code(), Some(ErrorCode::InvalidField));
    node.shutdown().await;
}

#[actix::test]
async fn a_batch_answers_per_element_and_a_bad_one_fails_alone() {
    let server = LocalServer::start().unwrap();
    let (client, node) = start_node(&server, "c4").await;

    let mut bad = TaskSpec::new("echo", json!(2)).with_id("b2");
    bad.timeout_ms = Some(0);
    let specs = vec![
        TaskSpec::new("echo", json!(1)).with_id("b1"),
        bad,
        TaskSpec::new("echo", json!(3)).with_id("b3"),
    ];
    let kind = TaskKind::new("echo").unwrap();
    let results = client.submit_batch(&kind, specs).await.unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(results[0], Ok(id("b1")));
    let err = results[1].as_ref().unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidField);
    assert_eq!(err.field.as_deref(), Some("timeout_ms"));
    assert_eq!(results[2], Ok(id("b3")));

    let done = status_becomes(&client, &id("b3"), TaskStatus::Completed).await;
    assert_eq!(done.result, Some(json!(3)));
    let err = client.status(&id("b2")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err:?}");

    // A batch over the size limit is refused as a whole.
    let huge = vec![TaskSpec::new("echo", json!("y".repeat(4096)))];
    let err = client.submit_batch(&kind, huge).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PayloadTooLarge), "{err:?}");
    node.shutdown().await;
}

#[actix::test]
async fn the_control_api_reads_and_cancels_a_blocking_task() {
    let server = LocalServer::start().unwrap();
    let (client, node) = start_node(&server, "c5").await;

    let long = id("long");
    let mut events = client.events(&long).await.unwrap();
    client
        .submit(TaskSpec::new("wait", json!(null)).with_id("long"))
        .await
        .unwrap();
    loop {
        let e = tokio::time::timeout(DEADLINE, events.next())
            .await
            .expect("started within 10 s")
            .expect("stream open");
        if e.name() == TaskEventName::Started {
            break;
        }
    }

    let record = status_becomes(&client, &long, TaskStatus::Running).await;
    assert_eq!(record.kind.as_str(), "wait");
    assert_eq!(record.attempt, 1);
    assert!(record.worker.is_some());

    let running = client
        .list(&ListFilter {
            status: Some(TaskStatus::Running),
            kind: Some(TaskKind::new("wait").unwrap()),
            limit: 10,
        })
        .await
        .unwrap();
    let ids: Vec<_> = running.iter().map(|r| &r.id).collect();
    assert_eq!(ids, [&long]);

    let none = client
        .list(&ListFilter {
            status: Some(TaskStatus::Running),
            kind: Some(TaskKind::new("echo").unwrap()),
            limit: 10,
        })
        .await
        .unwrap();
    assert!(none.is_empty(), "{none:?}");
    let err = client
        .list(&ListFilter {
            limit: 0,
            ..ListFilter::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidField), "{err:?}");

    let stats = client.stats().await.unwrap();
    assert_eq!(stats.submitted, 1);
    assert_eq!(stats.running, 1);
    assert_eq!(stats.workers, 2);

    // A short wait on the blocked task runs into its deadline.
    let err = client
        .wait(&long, Duration::from_millis(50))
        .await
        .unwrap_err();
    match &err {
        ClientError::Timeout { subject, .. } => assert_eq!(subject, "c5.events.*.long.*"),
        other => panic!("expected Timeout, got {other:?}"),
    }

    assert_eq!(
        client.cancel(&long).await.unwrap(),
        CancelOutcome::Cancelling
    );
    let last = tokio::time::timeout(DEADLINE, events.next())
        .await
        .expect("cancelled within 10 s")
        .expect("stream open");
    assert_eq!(last.name(), TaskEventName::Cancelled);
    assert!(tokio::time::timeout(DEADLINE, events.next())
        .await
        .unwrap()
        .is_none());
    status_becomes(&client, &long, TaskStatus::Cancelled).await;
    let err = client.cancel(&long).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AlreadyFinished), "{err:?}");
    let err = client.status(&id("nope")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err:?}");

    // A failed task shows up in the error list.
    let spec = TaskSpec::new("fail", json!(null))
        .with_id("broken")
        .with_max_attempts(1);
    let last = client.submit_and_wait(spec, DEADLINE).await.unwrap();
    assert_eq!(last.name(), TaskEventName::Failed);
    let entry = eventually("the error entry of `broken`", || async {
        let errors = client.errors(10).await.expect("errors");
        errors.into_iter().find(|e| e.task_id == id("broken"))
    })
    .await;
    assert_eq!(entry.kind.as_str(), "fail");
    assert_eq!(entry.attempt, 1);
    assert_eq!(entry.error.code, ErrorCode::HandlerError);

    let stats = client.stats().await.unwrap();
    assert_eq!(stats.submitted, 2);
    assert_eq!(stats.cancelled, 1);
    assert_eq!(stats.failed, 1);
    node.shutdown().await;
}

#[actix::test]
async fn without_a_node_calls_fail_with_no_responders_and_a_prefix_hint() {
    let server = LocalServer::start().unwrap();
    let nats = async_nats::connect(server.url()).await.unwrap();
    let client = Client::new(nats.clone(), "nobody").unwrap();

    let err = client
        .submit(TaskSpec::new("echo", json!(1)))
        .await
        .unwrap_err();
    match &err {
        ClientError::NoResponders { subject } => assert_eq!(subject, "nobody.submit.echo"),
        other => panic!("expected NoResponders, got {other:?}"),
    }
    assert!(err.to_string().contains("--prefix"), "{err}");
    let err = client.stats().await.unwrap_err();
    assert!(matches!(err, ClientError::NoResponders { .. }), "{err:?}");
    let err = client
        .submit_and_wait(TaskSpec::new("echo", json!(1)), DEADLINE)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::NoResponders { .. }), "{err:?}");

    // Someone listens but never replies: the request times out.
    let _silent = nats.subscribe("nobody.api.stats").await.unwrap();
    nats.flush().await.unwrap();
    let client = client.with_timeout(Duration::from_millis(100));
    let err = client.stats().await.unwrap_err();
    match &err {
        ClientError::Timeout { subject, after } => {
            assert_eq!(subject, "nobody.api.stats");
            assert_eq!(*after, Duration::from_millis(100));
        }
        other => panic!("expected Timeout, got {other:?}"),
    }

    assert!(Client::new(nats, "bad prefix").is_err());
}
