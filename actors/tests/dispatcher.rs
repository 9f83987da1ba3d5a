//! The actor system end to end, in process: no NATS. Events are read from
//! the dispatcher's subscription and a recording sink; every wait has a
//! deadline.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dispatcher_actors::{
    handler_fn, Backoff, CancelOutcome, Delivery, DeliveryHandle, DispatchError, Dispatcher,
    DispatcherConfig, ErrorCode, EventBody, EventSink, Handlers, ListFilter, NodeEvent,
    NodeEventBody, NodeId, Placement, Priority, RestartPolicy, Settlement, SubmitOptions,
    TaskError, TaskEvent, TaskEventName, TaskId, TaskKind, TaskSpec, TaskStatus,
};
use serde_json::{json, Value};
use tokio::sync::broadcast;

const DEADLINE: Duration = Duration::from_secs(10);

#[derive(Default)]
struct NodeEvents(Mutex<Vec<NodeEvent>>);

impl EventSink for NodeEvents {
    fn task_event(&self, _event: &TaskEvent) {}
    fn node_event(&self, event: &NodeEvent) {
        self.0.lock().unwrap().push(event.clone());
    }
}

impl NodeEvents {
    async fn wait_for(&self, pred: impl Fn(&NodeEvent) -> bool) -> NodeEvent {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(e) = self.0.lock().unwrap().iter().find(|e| pred(e)) {
                return e.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node event never came"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn kind(s: &str) -> TaskKind {
    TaskKind::new(s).unwrap()
}

/// Handlers for the tests: echo, sleep (ms), fail (fails the first N
/// attempts), panic, hang (ignores cancellation), block (CPU-bound
/// rendezvous), where (the thread it runs on); `panic-loop`, `hang-loop`
/// and `where-loop` are the same on the event loop.
/// How many `block` tasks have arrived.
type Rendezvous = Arc<AtomicUsize>;

fn handlers(rendezvous: Option<Rendezvous>) -> Handlers {
    let mut h = Handlers::new();
    h.insert(kind("echo"), handler_fn(|_ctx, p| async move { Ok(p) }));
    h.insert(
        kind("sleep"),
        handler_fn(|ctx, p| async move {
            let ms = p["ms"].as_u64().unwrap_or(0);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(ms)) => Ok(json!("slept")),
                _ = ctx.cancelled() => Err(TaskError::new("cancelled")),
            }
        }),
    );
    h.insert(
        kind("fail"),
        handler_fn(|ctx, p| async move {
            if u64::from(ctx.attempt()) <= p["times"].as_u64().unwrap_or(u64::MAX) {
                Err(TaskError::new(format!("failure {}", ctx.attempt())))
            } else {
                Ok(json!({"attempt": ctx.attempt()}))
            }
        }),
    );
    h.insert(
        kind("permanent"),
        handler_fn(|_ctx, _p| async move { Err(TaskError::permanent("cannot work")) }),
    );
    h.insert(
        kind("panic"),
        handler_fn(|_ctx, _p: Value| async move {
            if true {
                panic!("boom in handler");
            }
            Ok(Value::Null)
        }),
    );
    h.insert(
        kind("hang"),
        handler_fn(|_ctx, _p| async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(Value::Null)
        }),
    );
    let thread = || json!(format!("{:?}", std::thread::current().id()));
    h.insert(
        kind("where"),
        handler_fn(move |_ctx, _p| async move { Ok(thread()) }),
    );
    h.insert(
        kind("where-loop"),
        handler_fn(move |_ctx, _p| async move { Ok(thread()) })
            .with_placement(Placement::EventLoop),
    );
    h.insert(
        kind("panic-loop"),
        handler_fn(|_ctx, _p: Value| async move {
            if true {
                panic!("boom in handler");
            }
            Ok(Value::Null)
        })
        .with_placement(Placement::EventLoop),
    );
    h.insert(
        kind("hang-loop"),
        handler_fn(|_ctx, _p| async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(Value::Null)
        })
        .with_placement(Placement::EventLoop),
    );
    if let Some(r) = rendezvous {
        h.insert(
            kind("block"),
            handler_fn(move |_ctx, _p| {
                let r = r.clone();
                async move {
                    // Blocks this worker's thread until the other `block`
                    // task has arrived too: only parallel workers meet.
                    r.fetch_add(1, Ordering::SeqCst);
                    let deadline = std::time::Instant::now() + DEADLINE;
                    while r.load(Ordering::SeqCst) < 2 {
                        if std::time::Instant::now() > deadline {
                            return Err(TaskError::permanent("the other worker never ran"));
                        }
                        std::thread::yield_now();
                    }
                    Ok(json!("met"))
                }
            }),
        );
    }
    h
}

fn config(workers: usize) -> DispatcherConfig {
    let mut c = DispatcherConfig::new(NodeId::new("test-node").unwrap());
    c.workers = workers;
    c.cancel_grace = Duration::from_millis(100);
    c.defaults.backoff = Backoff {
        initial_ms: 5,
        max_ms: 20,
        multiplier: 2.0,
    };
    c.restart = RestartPolicy {
        max_restarts: 3,
        within: Duration::from_secs(60),
        backoff_initial: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
    };
    c
}

fn start(workers: usize) -> (Dispatcher, Arc<NodeEvents>) {
    let sink = Arc::new(NodeEvents::default());
    let d = Dispatcher::start(config(workers), handlers(None), sink.clone()).unwrap();
    (d, sink)
}

/// Events of task `id` up to and including its final one.
async fn until_final(rx: &mut broadcast::Receiver<TaskEvent>, id: &TaskId) -> Vec<TaskEvent> {
    let mut seen = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        loop {
            let e = rx.recv().await.expect("event stream");
            if &e.task_id == id {
                let done = e.name().is_final();
                seen.push(e);
                if done {
                    return;
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("task {id} did not finish; saw {seen:?}"));
    seen
}

fn names(events: &[TaskEvent]) -> Vec<TaskEventName> {
    events.iter().map(|e| e.name()).collect()
}

async fn next_named(
    rx: &mut broadcast::Receiver<TaskEvent>,
    id: &TaskId,
    name: TaskEventName,
) -> TaskEvent {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let e = rx.recv().await.expect("event stream");
            if &e.task_id == id && e.name() == name {
                return e;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {name:?} event for {id}"))
}

#[actix::test]
async fn a_task_runs_to_completion_with_its_events_in_order() {
    let (d, _) = start(2);
    let mut rx = d.subscribe();
    let s = d
        .submit(TaskSpec::new("echo", json!({"x": 1})))
        .await
        .unwrap();
    assert_eq!(s.priority, Priority::Normal);
    let events = until_final(&mut rx, &s.id).await;
    assert_eq!(
        names(&events),
        [
            TaskEventName::Accepted,
            TaskEventName::Started,
            TaskEventName::Completed
        ]
    );
    match &events[2].body {
        EventBody::Completed { result, .. } => assert_eq!(result, &json!({"x": 1})),
        other => panic!("{other:?}"),
    }
    assert!(events
        .iter()
        .all(|e| e.attempt == 1 && e.node.as_str() == "test-node"));
    d.wait_idle().await;
    let rec = d.status(&s.id).await.unwrap();
    assert_eq!(rec.status, TaskStatus::Completed);
    assert_eq!(rec.result, Some(json!({"x": 1})));
    let stats = d.stats().await.unwrap();
    assert_eq!((stats.submitted, stats.completed, stats.workers), (1, 1, 2));
}

#[actix::test]
async fn higher_priorities_run_first_then_fifo() {
    let (d, _) = start(1);
    let mut rx = d.subscribe();
    let blocker = d
        .submit(TaskSpec::new("sleep", json!({"ms": 300})).with_id("blocker"))
        .await
        .unwrap();
    next_named(&mut rx, &blocker.id, TaskEventName::Started).await;
    for (id, p) in [
        ("low1", Priority::Low),
        ("low2", Priority::Low),
        ("normal", Priority::Normal),
        ("high", Priority::High),
        ("crit", Priority::Critical),
    ] {
        d.submit(
            TaskSpec::new("echo", json!(null))
                .with_id(id)
                .with_priority(p),
        )
        .await
        .unwrap();
    }
    let mut started = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while started.len() < 5 {
            let e = rx.recv().await.unwrap();
            if e.name() == TaskEventName::Started {
                started.push(e.task_id.as_str().to_owned());
            }
        }
    })
    .await
    .expect("all tasks started");
    assert_eq!(started, ["crit", "high", "normal", "low1", "low2"]);
}

#[actix::test]
async fn failed_attempts_retry_with_backoff_then_succeed() {
    let (d, _) = start(2);
    let mut rx = d.subscribe();
    let s = d
        .submit(TaskSpec::new("fail", json!({"times": 2})).with_max_attempts(3))
        .await
        .unwrap();
    let events = until_final(&mut rx, &s.id).await;
    let retries: Vec<_> = events
        .iter()
        .filter(|e| e.name() == TaskEventName::Retrying)
        .collect();
    assert_eq!(retries.len(), 2);
    for (i, r) in retries.iter().enumerate() {
        assert_eq!(r.attempt, i as u32 + 1);
        match &r.body {
            EventBody::Retrying { error, retry_in_ms } => {
                assert_eq!(error.code, ErrorCode::HandlerError);
                assert!(*retry_in_ms <= 20);
            }
            other => panic!("{other:?}"),
        }
    }
    let last = events.last().unwrap();
    assert_eq!(last.name(), TaskEventName::Completed);
    assert_eq!(last.attempt, 3);
    assert_eq!(d.stats().await.unwrap().retried, 2);
    assert_eq!(d.errors(10).await.unwrap().len(), 2);
}

#[actix::test]
async fn attempts_spent_or_permanent_errors_fail_the_task() {
    let (d, _) = start(2);
    let mut rx = d.subscribe();
    let spent = d
        .submit(TaskSpec::new("fail", json!({})).with_max_attempts(2))
        .await
        .unwrap();
    let events = until_final(&mut rx, &spent.id).await;
    assert_eq!(names(&events).last(), Some(&TaskEventName::Failed));
    assert_eq!(events.last().unwrap().attempt, 2);

    let perm = d
        .submit(TaskSpec::new("permanent", json!({})).with_max_attempts(5))
        .await
        .unwrap();
    let events = until_final(&mut rx, &perm.id).await;
    assert!(!names(&events).contains(&TaskEventName::Retrying));
    assert_eq!(names(&events).last(), Some(&TaskEventName::Failed));
}

#[actix::test]
async fn timeouts_retry_then_time_out() {
    let (d, _) = start(2);
    let mut rx = d.subscribe();
    let s = d
        .submit(
            TaskSpec::new("sleep", json!({"ms": 5000}))
                .with_timeout_ms(30)
                .with_max_attempts(2),
        )
        .await
        .unwrap();
    let events = until_final(&mut rx, &s.id).await;
    let retry = events
        .iter()
        .find(|e| e.name() == TaskEventName::Retrying)
        .expect("retrying");
    match &retry.body {
        EventBody::Retrying { error, .. } => assert_eq!(error.code, ErrorCode::Timeout),
        other => panic!("{other:?}"),
    }
    let last = events.last().unwrap();
    assert_eq!(last.body, EventBody::TimedOut { timeout_ms: 30 });
    assert_eq!(last.attempt, 2);
}

#[actix::test]
async fn a_handler_that_ignores_cancellation_is_dropped_after_the_grace() {
    let (d, _) = start(1);
    let mut rx = d.subscribe();
    // On its slot's thread, then on the event loop.
    for kind in ["hang", "hang-loop"] {
        let s = d
            .submit(
                TaskSpec::new(kind, json!({}))
                    .with_timeout_ms(20)
                    .with_max_attempts(1),
            )
            .await
            .unwrap();
        let events = until_final(&mut rx, &s.id).await;
        assert_eq!(
            events.last().unwrap().name(),
            TaskEventName::TimedOut,
            "{kind}"
        );
        // The slot is free again: the next task runs.
        let next = d.submit(TaskSpec::new("echo", json!(1))).await.unwrap();
        assert_eq!(
            until_final(&mut rx, &next.id).await.last().unwrap().name(),
            TaskEventName::Completed
        );
    }
}

#[actix::test]
async fn a_panic_fails_the_attempt_restarts_the_worker_and_the_node_goes_on() {
    let (d, sink) = start(1);
    let mut rx = d.subscribe();
    // On its slot's thread, then on the event loop.
    for (restarts, kind) in [(1, "panic"), (2, "panic-loop")] {
        let s = d
            .submit(TaskSpec::new(kind, json!({})).with_max_attempts(1))
            .await
            .unwrap();
        let events = until_final(&mut rx, &s.id).await;
        match &events.last().unwrap().body {
            EventBody::Failed { error, .. } => {
                assert_eq!(error.code, ErrorCode::WorkerCrashed);
                assert!(
                    error.message.contains("boom in handler"),
                    "{}",
                    error.message
                );
            }
            other => panic!("{kind}: {other:?}"),
        }
        let restarted = sink
            .wait_for(|e| {
                matches!(e.body, NodeEventBody::WorkerRestarted { restarts: r, .. } if r == restarts)
            })
            .await;
        assert!(matches!(
            restarted.body,
            NodeEventBody::WorkerRestarted { worker: 1, .. }
        ));
        let next = d.submit(TaskSpec::new("echo", json!(2))).await.unwrap();
        assert_eq!(
            until_final(&mut rx, &next.id).await.last().unwrap().name(),
            TaskEventName::Completed
        );
        assert_eq!(
            d.stats().await.unwrap().worker_restarts,
            u64::from(restarts)
        );
    }
}

#[actix::test]
async fn a_slot_crashing_past_the_restart_intensity_is_disabled() {
    let (d, sink) = start(1);
    let mut rx = d.subscribe();
    // max_restarts is 3: the fourth crash within the window disables the slot.
    for i in 0..4 {
        let s = d
            .submit(
                TaskSpec::new("panic", json!({}))
                    .with_max_attempts(1)
                    .with_id(format!("p{i}")),
            )
            .await
            .unwrap();
        until_final(&mut rx, &s.id).await;
        if i < 3 {
            sink.wait_for(|e| matches!(e.body, NodeEventBody::WorkerRestarted { restarts, .. } if restarts == i + 1)).await;
        }
    }
    sink.wait_for(|e| matches!(e.body, NodeEventBody::WorkerDisabled { worker: 1, .. }))
        .await;
    let err = d.submit(TaskSpec::new("echo", json!(1))).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::Unavailable);
    assert_eq!(d.stats().await.unwrap().workers, 0);
}

#[actix::test]
async fn cancel_works_for_queued_and_running_tasks() {
    let (d, _) = start(1);
    let mut rx = d.subscribe();
    let running = d
        .submit(TaskSpec::new("sleep", json!({"ms": 60_000})))
        .await
        .unwrap();
    next_named(&mut rx, &running.id, TaskEventName::Started).await;
    let queued = d.submit(TaskSpec::new("echo", json!(1))).await.unwrap();

    assert_eq!(
        d.cancel(&queued.id).await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert_eq!(
        d.cancel(&running.id).await.unwrap(),
        CancelOutcome::Cancelling
    );
    let events = until_final(&mut rx, &running.id).await;
    assert_eq!(events.last().unwrap().name(), TaskEventName::Cancelled);
    let q = d.status(&queued.id).await.unwrap();
    assert_eq!(q.status, TaskStatus::Cancelled);
    assert!(q.started_at.is_none());

    assert!(matches!(
        d.cancel(&running.id).await,
        Err(DispatchError::AlreadyFinished(_))
    ));
    assert!(matches!(
        d.cancel(&TaskId::new("nope").unwrap()).await,
        Err(DispatchError::NotFound(_))
    ));
}

#[actix::test]
async fn cancel_reaches_a_task_waiting_to_retry() {
    let mut c = config(1);
    c.defaults.backoff = Backoff {
        initial_ms: 60_000,
        max_ms: 60_000,
        multiplier: 1.0,
    };
    let d = Dispatcher::start(c, handlers(None), Arc::new(NodeEvents::default())).unwrap();
    let mut rx = d.subscribe();
    let s = d
        .submit(TaskSpec::new("fail", json!({})).with_max_attempts(3))
        .await
        .unwrap();
    next_named(&mut rx, &s.id, TaskEventName::Retrying).await;
    assert_eq!(d.cancel(&s.id).await.unwrap(), CancelOutcome::Cancelled);
    next_named(&mut rx, &s.id, TaskEventName::Cancelled).await;
    d.wait_idle().await;
}

#[actix::test]
async fn duplicates_full_queues_and_bad_specs_are_refused_and_reported() {
    let mut c = config(1);
    c.queue_capacity = Some(2);
    let d = Dispatcher::start(c, handlers(None), Arc::new(NodeEvents::default())).unwrap();
    let mut rx = d.subscribe();
    let blocker = d
        .submit(TaskSpec::new("sleep", json!({"ms": 60_000})).with_id("b"))
        .await
        .unwrap();
    next_named(&mut rx, &blocker.id, TaskEventName::Started).await;

    let dup = d
        .submit(TaskSpec::new("echo", json!(1)).with_id("b"))
        .await
        .unwrap_err();
    assert_eq!(dup.code(), ErrorCode::DuplicateId);
    next_named(&mut rx, &blocker.id, TaskEventName::Rejected).await;

    d.submit(TaskSpec::new("echo", json!(1)).with_id("q1"))
        .await
        .unwrap();
    d.submit(TaskSpec::new("echo", json!(1)).with_id("q2"))
        .await
        .unwrap();
    let full = d
        .submit(TaskSpec::new("echo", json!(1)).with_id("q3"))
        .await
        .unwrap_err();
    assert_eq!(full.code(), ErrorCode::QueueFull);
    // A refused task leaves no record, so its id may be used again.
    assert!(matches!(
        d.status(&TaskId::new("q3").unwrap()).await,
        Err(DispatchError::NotFound(_))
    ));

    let results = d
        .submit_batch(
            vec![
                TaskSpec::new("echo", json!(1)).with_id("ok?"),
                TaskSpec::new("echo", json!(1)).with_timeout_ms(0),
            ],
            None,
            Default::default(),
        )
        .await;
    assert_eq!(
        results[0].as_ref().unwrap_err().code(),
        ErrorCode::InvalidField
    );
    assert_eq!(
        results[1].as_ref().unwrap_err().code(),
        ErrorCode::InvalidField
    );
    let stats = d.stats().await.unwrap();
    assert_eq!(stats.rejected, 4);
    d.cancel(&blocker.id).await.unwrap();
}

#[actix::test]
async fn an_unknown_kind_fails_with_unknown_kind() {
    let (d, _) = start(1);
    let mut rx = d.subscribe();
    let s = d
        .submit(TaskSpec::new("nobody-serves-this", json!(1)))
        .await
        .unwrap();
    let events = until_final(&mut rx, &s.id).await;
    match &events.last().unwrap().body {
        EventBody::Failed { error, .. } => assert_eq!(error.code, ErrorCode::UnknownKind),
        other => panic!("{other:?}"),
    }
}

#[actix::test]
async fn cpu_bound_handlers_on_two_workers_run_in_parallel() {
    let shared = Arc::new(AtomicUsize::new(0));
    let d = Dispatcher::start(
        config(2),
        handlers(Some(shared)),
        Arc::new(NodeEvents::default()),
    )
    .unwrap();
    let mut events = d.subscribe();
    let a = d.submit(TaskSpec::new("block", json!(null))).await.unwrap();
    let b = d.submit(TaskSpec::new("block", json!(null))).await.unwrap();
    let mut pending = vec![a.id, b.id];
    tokio::time::timeout(DEADLINE * 2, async {
        while !pending.is_empty() {
            let e = events.recv().await.unwrap();
            if e.name().is_final() && pending.contains(&e.task_id) {
                match &e.body {
                    EventBody::Completed { result, .. } => assert_eq!(result, &json!("met")),
                    other => panic!("{other:?}"),
                }
                pending.retain(|id| id != &e.task_id);
            }
        }
    })
    .await
    .expect("both tasks finished");
}

#[actix::test]
async fn each_placement_runs_where_it_says() {
    let (d, _) = start(2);
    let mut rx = d.subscribe();
    let here = format!("{:?}", std::thread::current().id());
    let mut ran_on = Vec::new();
    for k in ["where-loop", "where"] {
        let s = d.submit(TaskSpec::new(k, json!({}))).await.unwrap();
        let done = next_named(&mut rx, &s.id, TaskEventName::Completed).await;
        match done.body {
            EventBody::Completed { result, .. } => ran_on.push(result),
            other => panic!("{other:?}"),
        }
    }
    // On the event loop: this thread, the Supervisor's. On a thread: the
    // slot's own.
    assert_eq!(ran_on[0], json!(here));
    assert_ne!(ran_on[1], json!(here));
}

#[actix::test]
async fn list_filters_by_status_and_kind_newest_first() {
    let (d, _) = start(2);
    for i in 0..3 {
        d.submit(TaskSpec::new("echo", json!(i)).with_id(format!("e{i}")))
            .await
            .unwrap();
    }
    d.wait_idle().await;
    let mut rx = d.subscribe();
    let f = d
        .submit(TaskSpec::new("permanent", json!(null)).with_id("f"))
        .await
        .unwrap();
    until_final(&mut rx, &f.id).await;
    let done = d
        .list(ListFilter {
            status: Some(TaskStatus::Completed),
            kind: None,
            limit: 2,
        })
        .await
        .unwrap();
    assert_eq!(done.len(), 2);
    assert!(done.iter().all(|r| r.status == TaskStatus::Completed));
    let failed = d
        .list(ListFilter {
            status: None,
            kind: Some(kind("permanent")),
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].id.as_str(), "f");
}

#[actix::test]
async fn shutdown_lets_running_tasks_finish_and_cancels_unstarted_ones() {
    let (d, _) = start(1);
    let mut rx = d.subscribe();
    let running = d
        .submit(TaskSpec::new("sleep", json!({"ms": 50})))
        .await
        .unwrap();
    next_named(&mut rx, &running.id, TaskEventName::Started).await;
    let queued = d.submit(TaskSpec::new("echo", json!(1))).await.unwrap();
    let report = d.shutdown(DEADLINE).await;
    assert_eq!(
        (report.finished, report.interrupted, report.unstarted),
        (1, 0, 1)
    );
    assert_eq!(
        until_final(&mut rx, &running.id)
            .await
            .last()
            .unwrap()
            .name(),
        TaskEventName::Completed
    );
    // The unstarted task was cancelled before the running one finished.
    let q = d.status(&queued.id).await.unwrap();
    assert_eq!(q.status, TaskStatus::Cancelled);
    assert!(q.started_at.is_none());
    let after = d.submit(TaskSpec::new("echo", json!(1))).await.unwrap_err();
    assert_eq!(after.code(), ErrorCode::Unavailable);
}

#[actix::test]
async fn shutdown_stops_tasks_still_running_at_the_timeout() {
    let (d, _) = start(1);
    let mut rx = d.subscribe();
    let s = d
        .submit(TaskSpec::new("sleep", json!({"ms": 60_000})))
        .await
        .unwrap();
    next_named(&mut rx, &s.id, TaskEventName::Started).await;
    let report = d.shutdown(Duration::from_millis(50)).await;
    assert_eq!(report.interrupted, 1);
    match &until_final(&mut rx, &s.id).await.last().unwrap().body {
        EventBody::Failed { error, .. } => assert_eq!(error.code, ErrorCode::Shutdown),
        other => panic!("{other:?}"),
    }
}

/// A delivery that records what the Supervisor did with it.
#[derive(Clone, Default)]
struct Recorded {
    keep_alives: Arc<AtomicUsize>,
    settled: Arc<Mutex<Vec<Settlement>>>,
}

impl Delivery for Recorded {
    fn keep_alive(&self) {
        self.keep_alives.fetch_add(1, Ordering::SeqCst);
    }
    fn settle(self: Box<Self>, settlement: Settlement) {
        self.settled.lock().unwrap().push(settlement);
    }
}

impl Recorded {
    async fn settled(&self) -> Settlement {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(s) = self.settled.lock().unwrap().first() {
                return s.clone();
            }
            assert!(tokio::time::Instant::now() < deadline, "never settled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn delivered_task(d: &Dispatcher, spec: TaskSpec, attempt: u32) -> dispatcher_actors::Task {
    let mut task = d.validate(spec, None).unwrap();
    task.attempt = attempt;
    task
}

#[actix::test]
async fn a_delivered_task_is_kept_alive_and_settled_when_done() {
    let mut c = config(1);
    c.keep_alive_interval = Duration::from_millis(10);
    let d = Dispatcher::start(c, handlers(None), Arc::new(NodeEvents::default())).unwrap();
    let mut rx = d.subscribe();
    let rec = Recorded::default();
    let task = delivered_task(&d, TaskSpec::new("sleep", json!({"ms": 60_000})), 1);
    let id = task.id.clone();
    d.submit_delivered(
        task,
        DeliveryHandle::new(rec.clone()),
        SubmitOptions::default(),
    )
    .await
    .unwrap();
    next_named(&mut rx, &id, TaskEventName::Started).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while rec.keep_alives.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no keep-alive while running"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    d.cancel(&id).await.unwrap();
    assert_eq!(
        rec.settled().await,
        Settlement::Done(TaskStatus::Cancelled, None)
    );

    // Delivered again after it finished here: settled at once, not run.
    let again = Recorded::default();
    let mut task = delivered_task(&d, TaskSpec::new("echo", json!(1)), 2);
    task.id = id.clone();
    let err = d
        .submit_delivered(
            task,
            DeliveryHandle::new(again.clone()),
            SubmitOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, DispatchError::AlreadyFinished(_)));
    assert_eq!(
        again.settled().await,
        Settlement::Done(TaskStatus::Cancelled, None)
    );
}

#[actix::test]
async fn a_delivered_task_retries_through_its_transport_with_the_delivery_count() {
    let (d, _) = start(1);
    let mut rx = d.subscribe();
    let first = Recorded::default();
    let task = delivered_task(
        &d,
        TaskSpec::new("fail", json!({"times": 1})).with_max_attempts(2),
        1,
    );
    let id = task.id.clone();
    d.submit_delivered(
        task.clone(),
        DeliveryHandle::new(first.clone()),
        SubmitOptions::default(),
    )
    .await
    .unwrap();
    let retrying = next_named(&mut rx, &id, TaskEventName::Retrying).await;
    assert_eq!(retrying.attempt, 1);
    assert!(matches!(first.settled().await, Settlement::Retry { .. }));
    // Nothing is kept locally: the transport owns the retry.
    d.wait_idle().await;
    assert_eq!(d.stats().await.unwrap().queued, 0);

    // The transport delivers it again, as attempt 2: it runs and completes.
    let second = Recorded::default();
    let mut again = task;
    again.attempt = 2;
    d.submit_delivered(
        again,
        DeliveryHandle::new(second.clone()),
        SubmitOptions {
            emit_accepted: false,
            ..SubmitOptions::default()
        },
    )
    .await
    .unwrap();
    let done = next_named(&mut rx, &id, TaskEventName::Completed).await;
    assert_eq!(done.attempt, 2);
    assert_eq!(
        second.settled().await,
        Settlement::Done(TaskStatus::Completed, None)
    );
}

#[actix::test]
async fn shutdown_hands_delivered_tasks_back() {
    let (d, _) = start(1);
    let mut rx = d.subscribe();
    let running = Recorded::default();
    let queued = Recorded::default();
    let long = delivered_task(&d, TaskSpec::new("sleep", json!({"ms": 60_000})), 1);
    let long_id = long.id.clone();
    d.submit_delivered(
        long,
        DeliveryHandle::new(running.clone()),
        SubmitOptions::default(),
    )
    .await
    .unwrap();
    next_named(&mut rx, &long_id, TaskEventName::Started).await;
    let waiting = delivered_task(&d, TaskSpec::new("echo", json!(1)), 1);
    d.submit_delivered(
        waiting,
        DeliveryHandle::new(queued.clone()),
        SubmitOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(*d.room().borrow(), d.config().queue_capacity() - 1);

    let report = d.shutdown(Duration::from_millis(20)).await;
    assert_eq!((report.unstarted, report.interrupted), (1, 1));
    assert_eq!(queued.settled().await, Settlement::Release);
    assert_eq!(running.settled().await, Settlement::Release);
    let handed_back = next_named(&mut rx, &long_id, TaskEventName::Retrying).await;
    match handed_back.body {
        EventBody::Retrying { error, retry_in_ms } => {
            assert_eq!(error.code, ErrorCode::Shutdown);
            assert_eq!(retry_in_ms, 0);
        }
        other => panic!("{other:?}"),
    }
    // Delivered after the shutdown began: refused, and handed back at once.
    let late = Recorded::default();
    let task = delivered_task(&d, TaskSpec::new("echo", json!(2)), 1);
    let refused = d
        .submit_delivered(
            task,
            DeliveryHandle::new(late.clone()),
            SubmitOptions::default(),
        )
        .await;
    assert!(
        matches!(refused, Err(DispatchError::Unavailable(_))),
        "{refused:?}"
    );
    assert_eq!(late.settled().await, Settlement::Release);
}
