//! What the Registry keeps and answers with: the [`TaskRecord`] of one task,
//! an [`ErrorEntry`] of the error list, and the [`Stats`] snapshot.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ErrorInfo;
use crate::event::{EventBody, TaskEvent, TaskStatus};
use crate::task::{NodeId, Priority, Task, TaskId, TaskKind};
use crate::time::Timestamp;

/// Everything known about one task (PROTOCOL.md's task record). Every field
/// is always present on the wire; unknown ones are `null`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// The task's id.
    pub id: TaskId,
    /// Its kind.
    pub kind: TaskKind,
    /// Its priority.
    pub priority: Priority,
    /// Where it stands.
    pub status: TaskStatus,
    /// The current or last attempt (0 before the first starts).
    pub attempt: u32,
    /// Attempts in all.
    pub max_attempts: u32,
    /// The node holding or last holding it.
    pub node: Option<NodeId>,
    /// The worker slot running or last running it.
    pub worker: Option<u8>,
    /// Last reported progress, 0..=100.
    pub progress: Option<u8>,
    /// Last progress message.
    pub message: Option<String>,
    /// When it was accepted.
    pub created_at: Timestamp,
    /// When its latest attempt started.
    pub started_at: Option<Timestamp>,
    /// When it reached a final state.
    pub finished_at: Option<Timestamp>,
    /// The handler's result, once completed.
    pub result: Option<Value>,
    /// The latest attempt's error.
    pub error: Option<ErrorInfo>,
    /// The task's tags.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Where a durable transport stores the task: the SHA-256 (hex) of
    /// the body it was stored with. It ties the record to that one
    /// message, so that another message reusing the id is told apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

impl TaskRecord {
    /// The record of a task just accepted.
    pub fn queued(task: &Task, node: &NodeId) -> Self {
        Self {
            id: task.id.clone(),
            kind: task.kind.clone(),
            priority: task.priority,
            status: TaskStatus::Queued,
            attempt: task.attempt.saturating_sub(1),
            max_attempts: task.max_attempts,
            node: Some(node.clone()),
            worker: None,
            progress: None,
            message: None,
            created_at: task.created_at,
            started_at: None,
            finished_at: None,
            result: None,
            error: None,
            tags: task.tags.clone(),
            digest: None,
        }
    }

    /// Folds one event into the record.
    pub fn apply(&mut self, event: &TaskEvent) {
        if self.status.is_final() {
            return;
        }
        if let Some(status) = event.status() {
            self.status = status;
        }
        self.attempt = self.attempt.max(event.attempt);
        self.node = Some(event.node.clone());
        match &event.body {
            EventBody::Accepted { priority } => self.priority = *priority,
            EventBody::Rejected { .. } => {}
            EventBody::Started { worker } => {
                self.worker = Some(*worker);
                self.started_at = Some(event.ts);
                self.progress = None;
                self.message = None;
            }
            EventBody::Progress { progress, message } => {
                self.progress = Some(*progress);
                self.message = Some(message.clone());
            }
            EventBody::Retrying { error, .. } => self.error = Some(error.clone()),
            EventBody::Completed { result, .. } => {
                self.result = Some(result.clone());
                self.error = None;
                self.progress = Some(100);
            }
            EventBody::Failed { error, .. } => self.error = Some(error.clone()),
            EventBody::TimedOut { timeout_ms } => {
                self.error = Some(ErrorInfo::new(
                    crate::error::ErrorCode::Timeout,
                    format!("the attempt ran past its timeout of {timeout_ms} ms"),
                ))
            }
            EventBody::Cancelled { reason } => self.message = Some(reason.clone()),
        }
        if self.status.is_final() {
            self.finished_at = Some(event.ts);
        }
    }
}

/// One failed attempt in the error list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorEntry {
    /// The task.
    pub task_id: TaskId,
    /// Its kind.
    pub kind: TaskKind,
    /// The attempt that failed.
    pub attempt: u32,
    /// Why.
    pub error: ErrorInfo,
    /// When.
    pub ts: Timestamp,
    /// What the attempt led to: `retrying`, `failed` or `timed_out`.
    #[serde(default)]
    pub status: Option<TaskStatus>,
    /// The node that ran the attempt.
    #[serde(default)]
    pub node: Option<NodeId>,
}

impl ErrorEntry {
    /// The entry of `event`, if it is a failed attempt (`retrying`,
    /// `failed` or `timed_out`).
    pub fn of(event: &TaskEvent) -> Option<Self> {
        let error = match &event.body {
            EventBody::Retrying { error, .. } | EventBody::Failed { error, .. } => error.clone(),
            EventBody::TimedOut { timeout_ms } => ErrorInfo::new(
                crate::error::ErrorCode::Timeout,
                format!("the attempt ran past its timeout of {timeout_ms} ms"),
            ),
            _ => return None,
        };
        Some(Self {
            task_id: event.task_id.clone(),
            kind: event.kind.clone(),
            attempt: event.attempt,
            error,
            ts: event.ts,
            status: event.status(),
            node: Some(event.node.clone()),
        })
    }
}

/// Counters and gauges of one dispatcher (PROTOCOL.md's `stats`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Tasks accepted.
    pub submitted: u64,
    /// Tasks completed.
    pub completed: u64,
    /// Tasks failed for good.
    pub failed: u64,
    /// Tasks cancelled.
    pub cancelled: u64,
    /// Tasks whose last attempt timed out.
    pub timed_out: u64,
    /// Submissions rejected.
    pub rejected: u64,
    /// Attempts that failed and were retried.
    pub retried: u64,
    /// Tasks running now.
    pub running: u64,
    /// Tasks waiting now (queued or waiting to retry).
    pub queued: u64,
    /// Worker slots in service (not disabled).
    pub workers: u64,
    /// Worker restarts since start.
    pub worker_restarts: u64,
    /// Mean duration of finished attempts, ms.
    pub avg_ms: f64,
    /// Median duration, ms.
    pub p50_ms: f64,
    /// 99th percentile duration, ms.
    pub p99_ms: f64,
}
