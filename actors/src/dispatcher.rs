//! [`Dispatcher`]: the handle through which everything outside the actor
//! system talks to it — the in-process API for Rust users, and what the
//! NATS adapter calls.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::config::{ConfigError, DispatcherConfig};
use crate::error::{DispatchError, ErrorInfo};
use crate::event::{EventSink, TaskEvent, TaskStatus, WorkerInfo};
use crate::handler::Handlers;
use crate::record::{ErrorEntry, Stats, TaskRecord};
use crate::task::{NodeId, Priority, Task, TaskId, TaskKind, TaskSpec};

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
}

impl Default for SubmitOptions {
    fn default() -> Self {
        Self {
            emit_accepted: true,
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
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<()>,
}

impl Dispatcher {
    /// Starts the Supervisor (with its Workers), the Registry and the
    /// Metrics actors. Must be called inside a running actix `System`.
    pub fn start(
        config: DispatcherConfig,
        handlers: Handlers,
        sink: Arc<dyn EventSink>,
    ) -> Result<Self, ConfigError> {
        let _ = (config, handlers, sink);
        unimplemented!("in progress")
    }

    /// This node's id.
    pub fn node(&self) -> &NodeId {
        unimplemented!("in progress")
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &DispatcherConfig {
        unimplemented!("in progress")
    }

    /// The kinds it has handlers for, sorted.
    pub fn kinds(&self) -> Vec<String> {
        unimplemented!("in progress")
    }

    /// Validates `spec` against this node's defaults without submitting it.
    /// `kind` is the subject's kind, if the spec came from one.
    pub fn validate(&self, spec: TaskSpec, kind: Option<&str>) -> Result<Task, ErrorInfo> {
        let _ = (spec, kind);
        unimplemented!("in progress")
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
        let _ = (spec, kind, options);
        unimplemented!("in progress")
    }

    /// Queues an already validated task. Every refusal also goes out as a
    /// `rejected` event.
    pub async fn submit_task(
        &self,
        task: Task,
        options: SubmitOptions,
    ) -> Result<Submitted, DispatchError> {
        let _ = (task, options);
        unimplemented!("in progress")
    }

    /// Validates and queues many tasks; each succeeds or fails alone, and
    /// the answers come in the same order.
    pub async fn submit_batch(
        &self,
        specs: Vec<TaskSpec>,
        kind: Option<&str>,
        options: SubmitOptions,
    ) -> Vec<Result<Submitted, DispatchError>> {
        let _ = (specs, kind, options);
        unimplemented!("in progress")
    }

    /// Publishes a `rejected` event for input that could not even be read
    /// as a task (bad JSON, wrong content type …) and counts it. `id` and
    /// `kind` are whatever could be read, if anything.
    pub fn reject(&self, id: Option<&str>, kind: Option<&str>, error: ErrorInfo) {
        let _ = (id, kind, error);
        unimplemented!("in progress")
    }

    /// Cancels a queued, retrying or running task.
    pub async fn cancel(&self, id: &TaskId) -> Result<CancelOutcome, DispatchError> {
        let _ = id;
        unimplemented!("in progress")
    }

    /// The record of one task.
    pub async fn status(&self, id: &TaskId) -> Result<TaskRecord, DispatchError> {
        let _ = id;
        unimplemented!("in progress")
    }

    /// Records matching `filter`, newest first.
    pub async fn list(&self, filter: ListFilter) -> Result<Vec<TaskRecord>, DispatchError> {
        let _ = filter;
        unimplemented!("in progress")
    }

    /// The latest failed attempts, newest first.
    pub async fn errors(&self, limit: usize) -> Result<Vec<ErrorEntry>, DispatchError> {
        let _ = limit;
        unimplemented!("in progress")
    }

    /// Counters, gauges and durations.
    pub async fn stats(&self) -> Result<Stats, DispatchError> {
        unimplemented!("in progress")
    }

    /// Each worker slot's state.
    pub async fn workers(&self) -> Result<Vec<WorkerInfo>, DispatchError> {
        unimplemented!("in progress")
    }

    /// Every task event from now on (a slow subscriber skips ahead with
    /// `RecvError::Lagged`).
    pub fn subscribe(&self) -> broadcast::Receiver<TaskEvent> {
        unimplemented!("in progress")
    }

    /// Resolves once nothing is queued, waiting to retry, or running.
    pub async fn wait_idle(&self) {
        unimplemented!("in progress")
    }

    /// Stops taking tasks, lets running ones finish within `timeout`, then
    /// stops them (attempt error `shutdown`); tasks not started are
    /// cancelled. The actors stop afterwards.
    pub async fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        let _ = timeout;
        unimplemented!("in progress")
    }
}
