//! [`Dispatcher`]: the handle through which everything outside the actor
//! system talks to it — the in-process API for Rust users, and what the
//! NATS adapter calls.

use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr, MailboxError};
use tokio::sync::{broadcast, watch};
use tracing::info;

use crate::config::{ConfigError, DispatcherConfig};
use crate::delivery::{DeliveryHandle, Settlement};
use crate::emitter::Emitter;
use crate::error::{DispatchError, ErrorInfo};
use crate::event::{EventBody, EventSink, TaskEvent, TaskStatus, WorkerInfo};
use crate::handler::Handlers;
use crate::metrics::{self, Metrics};
use crate::record::{ErrorEntry, Stats, TaskRecord};
use crate::registry::{self, Admission, Registry};
use crate::supervisor::{self, CancelReply, Held, Supervisor};
use crate::task::{
    is_token, NodeId, Priority, Task, TaskId, TaskKind, TaskSpec, MAX_ID_LEN, MAX_KIND_LEN,
};

/// What a successful submission returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submitted {
    /// The task's id (generated if the spec had none).
    pub id: TaskId,
    /// Its kind.
    pub kind: TaskKind,
    /// Its priority.
    pub priority: Priority,
}

/// How a transport hands a task over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubmitOptions {
    /// Emit the `accepted` event once queued (false when a gateway already
    /// emitted it for this task).
    pub emit_accepted: bool,
    /// Queue delivered tasks even past the queue's capacity: the transport
    /// bounds what it hands over itself (the JetStream puller may receive
    /// one task more than there is room for from each consumer it waits
    /// on), and a delivery handed back would count as an attempt.
    pub past_capacity: bool,
}

impl Default for SubmitOptions {
    fn default() -> Self {
        Self {
            emit_accepted: true,
            past_capacity: false,
        }
    }
}

/// What `cancel` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The task was queued or waiting to retry; it is cancelled now.
    Cancelled,
    /// The task is running; its handler has been told to stop, and the
    /// `cancelled` event follows once it has.
    Cancelling,
}

impl CancelOutcome {
    /// The wire word (`cancelled` / `cancelling`).
    pub fn as_str(self) -> &'static str {
        match self {
            CancelOutcome::Cancelled => "cancelled",
            CancelOutcome::Cancelling => "cancelling",
        }
    }
}

/// Which records `list` returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListFilter {
    /// Only tasks in this status.
    pub status: Option<TaskStatus>,
    /// Only tasks of this kind.
    pub kind: Option<TaskKind>,
    /// At most this many, newest first.
    pub limit: usize,
}

impl Default for ListFilter {
    fn default() -> Self {
        Self {
            status: None,
            kind: None,
            limit: 100,
        }
    }
}

/// What a graceful shutdown did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Running tasks that finished within the timeout.
    pub finished: usize,
    /// Running tasks stopped at the timeout (attempt error `shutdown`).
    pub interrupted: usize,
    /// Tasks that had not started (cancelled, or handed back to the transport).
    pub unstarted: usize,
}

/// A handle to a running dispatcher. Cheap to clone; every clone talks to
/// the same actors.
///
/// ```no_run
/// use std::sync::Arc;
/// use dispatcher_actors::{handler_fn, Dispatcher, DispatcherConfig, Handlers, NodeId, NullSink, TaskError, TaskKind, TaskSpec};
///
/// #[actix::main]
/// async fn main() {
///     let mut handlers = Handlers::new();
///     handlers.insert(TaskKind::new("double").unwrap(), handler_fn(|_ctx, payload| async move {
///         let n = payload.as_i64().ok_or_else(|| TaskError::permanent("payload must be an integer"))?;
///         Ok(serde_json::json!(n * 2))
///     }));
///     let config = DispatcherConfig::new(NodeId::new("local").unwrap());
///     let dispatcher = Dispatcher::start(config, handlers, Arc::new(NullSink)).unwrap();
///     let submitted = dispatcher.submit(TaskSpec::new("double", serde_json::json!(21))).await.unwrap();
///     dispatcher.wait_idle().await;
///     let record = dispatcher.status(&submitted.id).await.unwrap();
///     assert_eq!(record.result, Some(serde_json::json!(42)));
/// }
/// ```
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

struct Inner {
    config: DispatcherConfig,
    kinds: Vec<String>,
    supervisor: Addr<Supervisor>,
    registry: Addr<Registry>,
    metrics: Addr<Metrics>,
    subscribers: broadcast::Sender<TaskEvent>,
    room: watch::Receiver<usize>,
    emitter: Emitter,
}

fn finish_results(
    results: Vec<Option<Result<Submitted, DispatchError>>>,
) -> Vec<Result<Submitted, DispatchError>> {
    results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(DispatchError::Unavailable(
                    "no answer for the task".to_owned(),
                ))
            })
        })
        .collect()
}

fn gone(e: MailboxError) -> DispatchError {
    DispatchError::Unavailable(format!("the dispatcher's actors are gone ({e})"))
}

impl Dispatcher {
    /// Starts the Supervisor (with its Workers, each on its own thread),
    /// the Registry and the Metrics actors. Must be called inside a running
    /// actix `System`.
    pub fn start(
        config: DispatcherConfig,
        handlers: Handlers,
        sink: Arc<dyn EventSink>,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let registry = Registry::new(
            config.retention,
            config.cleanup_interval,
            config.max_records,
            config.error_capacity,
        )
        .start();
        let metrics = Metrics::new().start();
        let (subscribers, _) = broadcast::channel(config.subscriber_buffer);
        let emitter = Emitter::new(
            config.node.clone(),
            sink,
            registry.clone(),
            metrics.clone(),
            subscribers.clone(),
        );
        let kinds = handlers.kinds();
        let (room_tx, room) = watch::channel(config.queue_capacity());
        let supervisor =
            Supervisor::new(config.clone(), handlers, emitter.clone(), room_tx).start();
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                kinds,
                supervisor,
                registry,
                metrics,
                subscribers,
                room,
                emitter,
            }),
        })
    }

    /// This node's id.
    pub fn node(&self) -> &NodeId {
        &self.inner.config.node
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &DispatcherConfig {
        &self.inner.config
    }

    /// The kinds it has handlers for, sorted.
    pub fn kinds(&self) -> Vec<String> {
        self.inner.kinds.clone()
    }

    /// Validates `spec` against this node's defaults without submitting it.
    /// `kind` is the subject's kind, if the spec came from one.
    pub fn validate(&self, spec: TaskSpec, kind: Option<&str>) -> Result<Task, ErrorInfo> {
        spec.into_task(kind, &self.inner.config.defaults)
    }

    /// Validates and queues one task (its `kind` field names the handler).
    pub async fn submit(&self, spec: TaskSpec) -> Result<Submitted, DispatchError> {
        self.submit_spec(spec, None, SubmitOptions::default()).await
    }

    /// Validates and queues one task that arrived under `kind` (a subject
    /// token). Every refusal also goes out as a `rejected` event.
    pub async fn submit_spec(
        &self,
        spec: TaskSpec,
        kind: Option<&str>,
        options: SubmitOptions,
    ) -> Result<Submitted, DispatchError> {
        let mut results = self.submit_batch(vec![spec], kind, options).await;
        results.pop().unwrap_or_else(|| {
            Err(DispatchError::Unavailable(
                "no answer for the task".to_owned(),
            ))
        })
    }

    /// Queues an already validated task. Every refusal also goes out as a
    /// `rejected` event.
    pub async fn submit_task(
        &self,
        task: Task,
        options: SubmitOptions,
    ) -> Result<Submitted, DispatchError> {
        let held = Held {
            task,
            delivery: None,
        };
        let mut results = self.submit_held(vec![Ok(held)], options).await;
        results.pop().unwrap_or_else(|| {
            Err(DispatchError::Unavailable(
                "no answer for the task".to_owned(),
            ))
        })
    }

    /// Queues many already validated tasks in two actor messages whatever
    /// their number; each succeeds or fails alone, answered in order.
    /// Every refusal also goes out as a `rejected` event.
    pub async fn submit_tasks(
        &self,
        tasks: Vec<Task>,
        options: SubmitOptions,
    ) -> Vec<Result<Submitted, DispatchError>> {
        let held = tasks
            .into_iter()
            .map(|task| {
                Ok(Held {
                    task,
                    delivery: None,
                })
            })
            .collect();
        self.submit_held(held, options).await
    }

    /// Queues a task that a durable transport delivered, with its handle on
    /// that delivery (settled when the node is done with the task). The
    /// task's `attempt` is the transport's delivery count. A delivery of a
    /// task this node already finished is settled at once and answers
    /// `AlreadyFinished`; one of a task it still holds replaces the old
    /// delivery.
    pub async fn submit_delivered(
        &self,
        task: Task,
        delivery: DeliveryHandle,
        options: SubmitOptions,
    ) -> Result<Submitted, DispatchError> {
        let held = Held {
            task,
            delivery: Some(delivery),
        };
        let mut results = self.submit_held(vec![Ok(held)], options).await;
        results.pop().unwrap_or_else(|| {
            Err(DispatchError::Unavailable(
                "no answer for the task".to_owned(),
            ))
        })
    }

    /// Queues many delivered tasks in two actor messages whatever their
    /// number (see [`Dispatcher::submit_delivered`]); answers in order.
    pub async fn submit_delivered_batch(
        &self,
        tasks: Vec<(Task, DeliveryHandle)>,
        options: SubmitOptions,
    ) -> Vec<Result<Submitted, DispatchError>> {
        let held = tasks
            .into_iter()
            .map(|(task, delivery)| {
                Ok(Held {
                    task,
                    delivery: Some(delivery),
                })
            })
            .collect();
        self.submit_held(held, options).await
    }

    /// Free places in the local queue, updated as they change: a transport
    /// that pulls tasks pulls no more than this.
    pub fn room(&self) -> watch::Receiver<usize> {
        self.inner.room.clone()
    }

    /// Validates and queues many tasks; each succeeds or fails alone, and
    /// the answers come in the same order.
    pub async fn submit_batch(
        &self,
        specs: Vec<TaskSpec>,
        kind: Option<&str>,
        options: SubmitOptions,
    ) -> Vec<Result<Submitted, DispatchError>> {
        let validated = specs
            .into_iter()
            .map(|spec| {
                let id = spec.id.clone();
                let body_kind = spec.kind.clone();
                let held = |task| Held {
                    task,
                    delivery: None,
                };
                self.validate(spec, kind).map(held).map_err(|e| {
                    let shown_kind = kind.or(body_kind.as_deref());
                    self.reject(id.as_deref(), shown_kind, e.clone());
                    DispatchError::Invalid(e)
                })
            })
            .collect();
        self.submit_held(validated, options).await
    }

    /// Admits (registry), then queues (supervisor) the valid tasks among
    /// `tasks`, in two messages whatever their number.
    async fn submit_held(
        &self,
        tasks: Vec<Result<Held, DispatchError>>,
        options: SubmitOptions,
    ) -> Vec<Result<Submitted, DispatchError>> {
        let inner = &self.inner;
        let mut results: Vec<Option<Result<Submitted, DispatchError>>> =
            Vec::with_capacity(tasks.len());
        let mut valid = Vec::new();
        for (i, t) in tasks.into_iter().enumerate() {
            match t {
                Ok(held) => {
                    results.push(None);
                    valid.push((i, held));
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        if valid.is_empty() {
            return finish_results(results);
        }
        let records = valid
            .iter()
            .map(|(_, h)| {
                let record = TaskRecord::queued(&h.task, &inner.config.node);
                (record, h.delivery.is_some())
            })
            .collect();
        let admissions = match inner.registry.send(registry::Admit { records }).await {
            Ok(admissions) => admissions,
            Err(e) => {
                let err = gone(e);
                for (i, h) in &valid {
                    self.reject_task(&h.task, &err);
                    results[*i] = Some(Err(err.clone()));
                }
                return finish_results(results);
            }
        };
        let mut to_queue = Vec::new();
        let mut positions = Vec::new();
        for ((i, held), admission) in valid.into_iter().zip(admissions) {
            let task = &held.task;
            match admission {
                Admission::New | Admission::Again => {
                    let submitted = Submitted {
                        id: task.id.clone(),
                        kind: task.kind.clone(),
                        priority: task.priority,
                    };
                    positions.push((i, submitted, admission, held.delivery.is_some()));
                    to_queue.push(held);
                }
                Admission::Duplicate => {
                    let err = DispatchError::DuplicateId(task.id.clone());
                    self.reject_task(task, &err);
                    results[i] = Some(Err(err));
                }
                Admission::Finished(status) => {
                    let err = DispatchError::AlreadyFinished(task.id.clone());
                    if let Some(d) = held.delivery {
                        d.settle(Settlement::Done(status, None));
                    }
                    results[i] = Some(Err(err));
                }
            }
        }
        if to_queue.is_empty() {
            return finish_results(results);
        }
        let enqueue = supervisor::Enqueue {
            tasks: to_queue,
            emit_accepted: options.emit_accepted,
            past_capacity: options.past_capacity,
        };
        let outcomes = match inner.supervisor.send(enqueue).await {
            Ok(o) => o,
            Err(e) => vec![Err(gone(e)); positions.len()],
        };
        let mut forget = Vec::new();
        for ((i, submitted, admission, delivered), outcome) in positions.into_iter().zip(outcomes) {
            results[i] = Some(match outcome {
                Ok(()) => Ok(submitted),
                Err(err) => {
                    // A delivered task this node cannot take now went back
                    // to its transport for another node: it is not refused.
                    if !delivered {
                        self.reject(
                            Some(submitted.id.as_str()),
                            Some(submitted.kind.as_str()),
                            err.to_info(),
                        );
                    }
                    if admission == Admission::New {
                        forget.push(submitted.id);
                    }
                    Err(err)
                }
            });
        }
        if !forget.is_empty() {
            inner.registry.do_send(registry::Forget { ids: forget });
        }
        finish_results(results)
    }

    fn reject_task(&self, task: &Task, err: &DispatchError) {
        self.reject(
            Some(task.id.as_str()),
            Some(task.kind.as_str()),
            err.to_info(),
        );
    }

    /// Publishes a `rejected` event for a refused task and counts it.
    /// `id` and `kind` are whatever could be read, if anything (see
    /// [`Dispatcher::reject_message`]).
    pub fn reject(&self, id: Option<&str>, kind: Option<&str>, error: ErrorInfo) {
        self.reject_from(None, id, kind, error);
    }

    /// Publishes a `rejected` event for a message that came on `subject`
    /// and was refused, and counts it. `id` and `kind` are whatever could
    /// be read, if anything: an id that is not a valid token is replaced
    /// by a fresh one (so that every refusal is an event of its own, and
    /// `subject` says where it came from), a kind that is not shows as `_`.
    pub fn reject_message(
        &self,
        subject: &str,
        id: Option<&str>,
        kind: Option<&str>,
        error: ErrorInfo,
    ) {
        self.reject_from(Some(subject), id, kind, error);
    }

    fn reject_from(
        &self,
        subject: Option<&str>,
        id: Option<&str>,
        kind: Option<&str>,
        error: ErrorInfo,
    ) {
        let id = id
            .filter(|s| is_token(s, MAX_ID_LEN))
            .and_then(|s| TaskId::new(s).ok())
            .unwrap_or_else(TaskId::generate);
        let kind = kind
            .filter(|s| is_token(s, MAX_KIND_LEN))
            .and_then(|s| TaskKind::new(s).ok())
            .unwrap_or_else(TaskKind::unknown);
        let body = EventBody::Rejected {
            error,
            subject: subject.map(str::to_owned),
        };
        self.inner.emitter.task(&id, &kind, 0, body);
    }

    /// Publishes an event about a task this node does not hold: the
    /// `accepted` of a task a durable transport stored for any node to run,
    /// or the end of one a transport settled without running it (cancelled
    /// before it was pulled, attempts spent).
    pub fn announce(&self, task: &Task, body: EventBody) {
        self.inner
            .emitter
            .task(&task.id, &task.kind, task.attempt, body);
    }

    /// Emits `event`, which this node made (`event.node` is this node)
    /// about a task it does not hold, exactly as it is: a transport that
    /// stored the change the event describes first (e.g. the cancel of a
    /// task still in a durable queue) tells of it with the same time stamp.
    pub fn announce_event(&self, event: TaskEvent) {
        debug_assert_eq!(&event.node, self.node(), "an event of this node");
        self.inner.emitter.emit(event, None);
    }

    /// Forgets a finished task, so that a replay of it runs here again.
    pub async fn forget_finished(&self, id: &TaskId) {
        let _ = self
            .inner
            .registry
            .send(registry::ForgetFinished(id.clone()))
            .await;
    }

    /// Cancels a queued, retrying or running task.
    pub async fn cancel(&self, id: &TaskId) -> Result<CancelOutcome, DispatchError> {
        let reply = self
            .inner
            .supervisor
            .send(supervisor::CancelTask {
                id: id.clone(),
                reason: "cancelled on request".to_owned(),
            })
            .await
            .map_err(gone)?;
        match reply {
            CancelReply::Cancelled => Ok(CancelOutcome::Cancelled),
            CancelReply::Cancelling => Ok(CancelOutcome::Cancelling),
            CancelReply::NotHeld => match self.status(id).await {
                Ok(record) if record.status.is_final() => {
                    Err(DispatchError::AlreadyFinished(id.clone()))
                }
                Ok(_) | Err(DispatchError::NotFound(_)) => Err(DispatchError::NotFound(id.clone())),
                Err(e) => Err(e),
            },
        }
    }

    /// The record of one task.
    pub async fn status(&self, id: &TaskId) -> Result<TaskRecord, DispatchError> {
        self.inner
            .registry
            .send(registry::GetTask { id: id.clone() })
            .await
            .map_err(gone)?
            .ok_or_else(|| DispatchError::NotFound(id.clone()))
    }

    /// Records matching `filter`, newest first.
    pub async fn list(&self, filter: ListFilter) -> Result<Vec<TaskRecord>, DispatchError> {
        self.inner
            .registry
            .send(registry::ListTasks { filter })
            .await
            .map_err(gone)
    }

    /// The latest failed attempts, newest first.
    pub async fn errors(&self, limit: usize) -> Result<Vec<ErrorEntry>, DispatchError> {
        self.inner
            .registry
            .send(registry::GetErrors { limit })
            .await
            .map_err(gone)
    }

    /// Attempt durations as `(µs, count)` pairs, rounded to two
    /// significant digits: mergeable with other dispatchers' (see
    /// [`metrics::GetDurations`]).
    pub async fn durations(&self) -> Result<Vec<(u64, u64)>, DispatchError> {
        self.inner
            .metrics
            .send(metrics::GetDurations)
            .await
            .map_err(gone)
    }

    /// Counters, gauges and durations.
    pub async fn stats(&self) -> Result<Stats, DispatchError> {
        let gauges = self
            .inner
            .supervisor
            .send(supervisor::GetGauges)
            .await
            .map_err(gone)?;
        let mut stats = self
            .inner
            .metrics
            .send(metrics::GetStats)
            .await
            .map_err(gone)?;
        stats.running = gauges.running;
        stats.queued = gauges.queued;
        stats.workers = gauges.workers;
        stats.worker_restarts = gauges.worker_restarts;
        Ok(stats)
    }

    /// Each worker slot's state.
    pub async fn workers(&self) -> Result<Vec<WorkerInfo>, DispatchError> {
        self.inner
            .supervisor
            .send(supervisor::GetWorkers)
            .await
            .map_err(gone)
    }

    /// Every task event from now on (a slow subscriber skips ahead with
    /// `RecvError::Lagged`).
    pub fn subscribe(&self) -> broadcast::Receiver<TaskEvent> {
        self.inner.subscribers.subscribe()
    }

    /// Resolves once nothing is queued, waiting to retry, or running (at
    /// once if the actors are gone).
    pub async fn wait_idle(&self) {
        if let Ok(rx) = self.inner.supervisor.send(supervisor::WaitIdle).await {
            let _ = rx.await;
        }
    }

    /// Stops taking tasks and cancels those not started; lets running ones
    /// finish within `timeout`, then stops them (attempt error `shutdown`,
    /// a `failed` event); finally stops the Workers' threads.
    pub async fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        let sup = &self.inner.supervisor;
        let mut report = ShutdownReport::default();
        let Ok((unstarted, drained)) = sup.send(supervisor::BeginShutdown).await else {
            return report;
        };
        report.unstarted = unstarted;
        let running = sup
            .send(supervisor::GetGauges)
            .await
            .map(|g| g.running as usize)
            .unwrap_or(0);
        if tokio::time::timeout(timeout, drained).await.is_ok() {
            report.finished = running;
        } else {
            report.interrupted = sup.send(supervisor::InterruptRunning).await.unwrap_or(0);
            report.finished = running.saturating_sub(report.interrupted);
            if let Ok((_, drained)) = sup.send(supervisor::BeginShutdown).await {
                // Workers drop a handler's future after the cancel grace at most.
                let _ = tokio::time::timeout(
                    self.inner.config.cancel_grace * 2 + Duration::from_secs(1),
                    drained,
                )
                .await;
            }
        }
        let _ = sup.send(supervisor::StopWorkers).await;
        info!(
            finished = report.finished,
            interrupted = report.interrupted,
            unstarted = report.unstarted,
            "Dispatcher stopped."
        );
        report
    }
}
