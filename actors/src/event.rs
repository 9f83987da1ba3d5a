//! Events: what happens to a task ([`TaskEvent`]) and to a node
//! ([`NodeEvent`]), their wire vocabularies, and the [`EventSink`] trait
//! through which they leave the actor system.
//!
//! A [`TaskEvent`] serialises to the flat JSON object of PROTOCOL.md
//! (`event`, `task_id`, `kind`, `status`, `attempt`, `node`, `ts` and the
//! event's own fields), and reads back from it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ErrorInfo;
use crate::task::{NodeId, Priority, TaskId, TaskKind};
use crate::time::Timestamp;

/// The name of a task event (the last subject token).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskEventName {
    /// Stored and queued.
    Accepted,
    /// Refused; never queued.
    Rejected,
    /// An attempt began on a worker.
    Started,
    /// The handler reported progress.
    Progress,
    /// An attempt failed; another follows after `retry_in_ms`.
    Retrying,
    /// Final: the handler returned a result.
    Completed,
    /// Final: the last attempt failed.
    Failed,
    /// Final: the last attempt ran out of time.
    TimedOut,
    /// Final: cancelled.
    Cancelled,
}

impl TaskEventName {
    /// Every event name.
    pub const ALL: [TaskEventName; 9] = [
        TaskEventName::Accepted,
        TaskEventName::Rejected,
        TaskEventName::Started,
        TaskEventName::Progress,
        TaskEventName::Retrying,
        TaskEventName::Completed,
        TaskEventName::Failed,
        TaskEventName::TimedOut,
        TaskEventName::Cancelled,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskEventName::Accepted => "accepted",
            TaskEventName::Rejected => "rejected",
            TaskEventName::Started => "started",
            TaskEventName::Progress => "progress",
            TaskEventName::Retrying => "retrying",
            TaskEventName::Completed => "completed",
            TaskEventName::Failed => "failed",
            TaskEventName::TimedOut => "timed_out",
            TaskEventName::Cancelled => "cancelled",
        }
    }

    /// True for the four events that end a task.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskEventName::Completed
                | TaskEventName::Failed
                | TaskEventName::TimedOut
                | TaskEventName::Cancelled
        )
    }
}

/// Where a task stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Waiting for a worker.
    Queued,
    /// On a worker.
    Running,
    /// Waiting out the backoff before its next attempt.
    Retrying,
    /// Final: succeeded.
    Completed,
    /// Final: attempts spent.
    Failed,
    /// Final: the last attempt timed out.
    TimedOut,
    /// Final: cancelled.
    Cancelled,
}

impl TaskStatus {
    /// Every status.
    pub const ALL: [TaskStatus; 7] = [
        TaskStatus::Queued,
        TaskStatus::Running,
        TaskStatus::Retrying,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::TimedOut,
        TaskStatus::Cancelled,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Running => "running",
            TaskStatus::Retrying => "retrying",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::TimedOut => "timed_out",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// True once the task can change no more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskStatus::Completed
                | TaskStatus::Failed
                | TaskStatus::TimedOut
                | TaskStatus::Cancelled
        )
    }
}

/// What an event says, beyond the common fields.
#[derive(Clone, Debug, PartialEq)]
pub enum EventBody {
    /// Stored and queued.
    Accepted {
        /// The task's priority.
        priority: Priority,
    },
    /// Refused.
    Rejected {
        /// Why.
        error: ErrorInfo,
        /// The subject the refused message came on (so that a refusal
        /// whose id could not be read can still be traced to its source).
        subject: Option<String>,
    },
    /// An attempt began.
    Started {
        /// Worker slot, 1..=10.
        worker: u8,
    },
    /// The handler reported progress.
    Progress {
        /// 0..=100.
        progress: u8,
        /// The handler's words.
        message: String,
    },
    /// An attempt failed and another follows.
    Retrying {
        /// Why the attempt failed.
        error: ErrorInfo,
        /// Delay before the next attempt.
        retry_in_ms: u64,
    },
    /// Succeeded.
    Completed {
        /// The handler's result.
        result: Value,
        /// Time of the successful attempt.
        duration_ms: u64,
    },
    /// The last attempt failed.
    Failed {
        /// Why.
        error: ErrorInfo,
        /// Time of the last attempt.
        duration_ms: u64,
    },
    /// The last attempt ran out of time.
    TimedOut {
        /// The limit it ran into.
        timeout_ms: u64,
    },
    /// Cancelled.
    Cancelled {
        /// Who or what cancelled it.
        reason: String,
    },
}

impl EventBody {
    /// The event's name.
    pub fn name(&self) -> TaskEventName {
        match self {
            EventBody::Accepted { .. } => TaskEventName::Accepted,
            EventBody::Rejected { .. } => TaskEventName::Rejected,
            EventBody::Started { .. } => TaskEventName::Started,
            EventBody::Progress { .. } => TaskEventName::Progress,
            EventBody::Retrying { .. } => TaskEventName::Retrying,
            EventBody::Completed { .. } => TaskEventName::Completed,
            EventBody::Failed { .. } => TaskEventName::Failed,
            EventBody::TimedOut { .. } => TaskEventName::TimedOut,
            EventBody::Cancelled { .. } => TaskEventName::Cancelled,
        }
    }

    /// The task's status after this event (`None` for `rejected`).
    pub fn status(&self) -> Option<TaskStatus> {
        Some(match self {
            EventBody::Accepted { .. } => TaskStatus::Queued,
            EventBody::Rejected { .. } => return None,
            EventBody::Started { .. } | EventBody::Progress { .. } => TaskStatus::Running,
            EventBody::Retrying { .. } => TaskStatus::Retrying,
            EventBody::Completed { .. } => TaskStatus::Completed,
            EventBody::Failed { .. } => TaskStatus::Failed,
            EventBody::TimedOut { .. } => TaskStatus::TimedOut,
            EventBody::Cancelled { .. } => TaskStatus::Cancelled,
        })
    }
}

/// Something that happened to a task.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(try_from = "WireEvent")]
pub struct TaskEvent {
    /// The task.
    pub task_id: TaskId,
    /// Its kind.
    pub kind: TaskKind,
    /// The attempt the event is about (1-based; on `retrying`, the one that failed).
    pub attempt: u32,
    /// The node that saw it happen.
    pub node: NodeId,
    /// When.
    pub ts: Timestamp,
    /// What happened.
    pub body: EventBody,
}

impl TaskEvent {
    /// An event stamped now.
    pub fn now(
        task_id: TaskId,
        kind: TaskKind,
        attempt: u32,
        node: NodeId,
        body: EventBody,
    ) -> Self {
        Self {
            task_id,
            kind,
            attempt,
            node,
            ts: Timestamp::now(),
            body,
        }
    }

    /// The event's name.
    pub fn name(&self) -> TaskEventName {
        self.body.name()
    }

    /// The task's status after this event.
    pub fn status(&self) -> Option<TaskStatus> {
        self.body.status()
    }
}

impl Serialize for TaskEvent {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        WireEventRef::from(self).serialize(serializer)
    }
}

/// [`WireEvent`] borrowed from a [`TaskEvent`]: an event is serialised
/// without a copy of its result or strings.
#[derive(Serialize)]
struct WireEventRef<'a> {
    event: TaskEventName,
    task_id: &'a TaskId,
    kind: &'a TaskKind,
    status: Option<TaskStatus>,
    attempt: u32,
    node: &'a NodeId,
    ts: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    priority: Option<Priority>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a ErrorInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    worker: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    progress: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_in_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<&'a str>,
}

impl<'a> From<&'a TaskEvent> for WireEventRef<'a> {
    fn from(e: &'a TaskEvent) -> Self {
        let mut w = WireEventRef {
            event: e.body.name(),
            status: e.body.status(),
            task_id: &e.task_id,
            kind: &e.kind,
            attempt: e.attempt,
            node: &e.node,
            ts: e.ts,
            priority: None,
            error: None,
            worker: None,
            progress: None,
            message: None,
            retry_in_ms: None,
            result: None,
            duration_ms: None,
            timeout_ms: None,
            reason: None,
            subject: None,
        };
        match &e.body {
            EventBody::Accepted { priority } => w.priority = Some(*priority),
            EventBody::Rejected { error, subject } => {
                w.error = Some(error);
                w.subject = subject.as_deref();
            }
            EventBody::Started { worker } => w.worker = Some(*worker),
            EventBody::Progress { progress, message } => {
                w.progress = Some(*progress);
                w.message = Some(message);
            }
            EventBody::Retrying { error, retry_in_ms } => {
                w.error = Some(error);
                w.retry_in_ms = Some(*retry_in_ms);
            }
            EventBody::Completed {
                result,
                duration_ms,
            } => {
                w.result = Some(result);
                w.duration_ms = Some(*duration_ms);
            }
            EventBody::Failed { error, duration_ms } => {
                w.error = Some(error);
                w.duration_ms = Some(*duration_ms);
            }
            EventBody::TimedOut { timeout_ms } => w.timeout_ms = Some(*timeout_ms),
            EventBody::Cancelled { reason } => w.reason = Some(reason),
        }
        w
    }
}

/// The flat JSON shape of a task event on the wire, as read.
#[derive(Deserialize)]
struct WireEvent {
    event: TaskEventName,
    task_id: TaskId,
    kind: TaskKind,
    attempt: u32,
    node: NodeId,
    ts: Timestamp,
    #[serde(default)]
    priority: Option<Priority>,
    #[serde(default)]
    error: Option<ErrorInfo>,
    #[serde(default)]
    worker: Option<u8>,
    #[serde(default)]
    progress: Option<u8>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    retry_in_ms: Option<u64>,
    #[serde(default)]
    result: Option<Value>,
    #[serde(default)]
    duration_ms: Option<u64>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    subject: Option<String>,
}

impl TryFrom<WireEvent> for TaskEvent {
    type Error = String;

    fn try_from(w: WireEvent) -> Result<Self, Self::Error> {
        fn need<T>(v: Option<T>, event: TaskEventName, field: &str) -> Result<T, String> {
            v.ok_or_else(|| format!("`{}` event without `{field}`", event.as_str()))
        }
        let name = w.event;
        let body = match name {
            TaskEventName::Accepted => EventBody::Accepted {
                priority: need(w.priority, name, "priority")?,
            },
            TaskEventName::Rejected => EventBody::Rejected {
                error: need(w.error, name, "error")?,
                subject: w.subject,
            },
            TaskEventName::Started => EventBody::Started {
                worker: need(w.worker, name, "worker")?,
            },
            TaskEventName::Progress => EventBody::Progress {
                progress: need(w.progress, name, "progress")?,
                message: w.message.unwrap_or_default(),
            },
            TaskEventName::Retrying => EventBody::Retrying {
                error: need(w.error, name, "error")?,
                retry_in_ms: need(w.retry_in_ms, name, "retry_in_ms")?,
            },
            TaskEventName::Completed => EventBody::Completed {
                result: w.result.unwrap_or(Value::Null),
                duration_ms: need(w.duration_ms, name, "duration_ms")?,
            },
            TaskEventName::Failed => EventBody::Failed {
                error: need(w.error, name, "error")?,
                duration_ms: need(w.duration_ms, name, "duration_ms")?,
            },
            TaskEventName::TimedOut => EventBody::TimedOut {
                timeout_ms: need(w.timeout_ms, name, "timeout_ms")?,
            },
            TaskEventName::Cancelled => EventBody::Cancelled {
                reason: w.reason.unwrap_or_default(),
            },
        };
        Ok(TaskEvent {
            task_id: w.task_id,
            kind: w.kind,
            attempt: w.attempt,
            node: w.node,
            ts: w.ts,
            body,
        })
    }
}

/// The name of a node event (the last subject token).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeEventName {
    /// The node is ready.
    Online,
    /// The node is alive (every 5 s by default).
    Heartbeat,
    /// The node stopped.
    Offline,
    /// A crashed worker was started again.
    WorkerRestarted,
    /// A worker crashed too often and its slot is off.
    WorkerDisabled,
}

impl NodeEventName {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeEventName::Online => "online",
            NodeEventName::Heartbeat => "heartbeat",
            NodeEventName::Offline => "offline",
            NodeEventName::WorkerRestarted => "worker_restarted",
            NodeEventName::WorkerDisabled => "worker_disabled",
        }
    }
}

/// What a worker slot is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Waiting for a task.
    Idle,
    /// Running a task.
    Busy,
    /// Crashed; a fresh worker starts after a backoff.
    Restarting,
    /// Crashed past the restart intensity; the slot is off.
    Disabled,
}

impl WorkerState {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Idle => "idle",
            WorkerState::Busy => "busy",
            WorkerState::Restarting => "restarting",
            WorkerState::Disabled => "disabled",
        }
    }
}

/// One worker slot in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Slot number, 1..=10.
    pub worker: u8,
    /// What it is doing.
    pub state: WorkerState,
    /// The task it runs, if busy.
    #[serde(default)]
    pub task_id: Option<TaskId>,
    /// Restarts of this slot so far.
    pub restarts: u32,
}

/// Something that happened to a node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeEvent {
    /// The node.
    pub node: NodeId,
    /// When.
    pub ts: Timestamp,
    /// What happened.
    #[serde(flatten)]
    pub body: NodeEventBody,
}

impl NodeEvent {
    /// An event stamped now.
    pub fn now(node: NodeId, body: NodeEventBody) -> Self {
        Self {
            node,
            ts: Timestamp::now(),
            body,
        }
    }

    /// The event's name.
    pub fn name(&self) -> NodeEventName {
        self.body.name()
    }
}

/// What a node event says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum NodeEventBody {
    /// The node is ready to take tasks.
    Online {
        /// Worker slots.
        workers: usize,
        /// The node's software version.
        version: String,
        /// Kinds it serves.
        kinds: Vec<String>,
    },
    /// The node is alive.
    Heartbeat {
        /// Each worker slot.
        workers: Vec<WorkerInfo>,
        /// Tasks waiting in the node's queue.
        queued: usize,
        /// Tasks running.
        running: usize,
    },
    /// The node stopped.
    Offline {
        /// Why.
        reason: String,
    },
    /// A crashed worker was started again.
    WorkerRestarted {
        /// Slot number.
        worker: u8,
        /// Restarts of this slot so far.
        restarts: u32,
        /// What crashed it.
        reason: String,
    },
    /// A worker crashed past the restart intensity; its slot is off.
    WorkerDisabled {
        /// Slot number.
        worker: u8,
        /// Restarts of this slot so far.
        restarts: u32,
        /// What crashed it last.
        reason: String,
    },
}

impl NodeEventBody {
    /// The event's name.
    pub fn name(&self) -> NodeEventName {
        match self {
            NodeEventBody::Online { .. } => NodeEventName::Online,
            NodeEventBody::Heartbeat { .. } => NodeEventName::Heartbeat,
            NodeEventBody::Offline { .. } => NodeEventName::Offline,
            NodeEventBody::WorkerRestarted { .. } => NodeEventName::WorkerRestarted,
            NodeEventBody::WorkerDisabled { .. } => NodeEventName::WorkerDisabled,
        }
    }
}

/// Where events leave the actor system: the NATS publisher, a test
/// recorder, a log. Called on the thread where the event happens, so an
/// implementation must return at once (buffer, never block) and must never
/// panic.
pub trait EventSink: Send + Sync + 'static {
    /// A task event.
    fn task_event(&self, event: &TaskEvent);

    /// A node event (the supervisor emits `worker_restarted` and
    /// `worker_disabled`).
    fn node_event(&self, event: &NodeEvent) {
        let _ = event;
    }
}

/// A sink that drops every event.
#[derive(Clone, Copy, Debug, Default)]
pub struct NullSink;

impl EventSink for NullSink {
    fn task_event(&self, _event: &TaskEvent) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use serde_json::json;

    fn ev(body: EventBody) -> TaskEvent {
        TaskEvent::now(
            TaskId::new("t1").unwrap(),
            TaskKind::new("echo").unwrap(),
            2,
            NodeId::new("n1").unwrap(),
            body,
        )
    }

    #[test]
    fn every_event_round_trips_through_flat_json() {
        let bodies = vec![
            EventBody::Accepted {
                priority: Priority::High,
            },
            EventBody::Rejected {
                error: ErrorInfo::field(ErrorCode::InvalidField, "priority", "bad"),
                subject: Some("dispatch.submit.echo".into()),
            },
            EventBody::Rejected {
                error: ErrorInfo::new(ErrorCode::InvalidJson, "bad"),
                subject: None,
            },
            EventBody::Started { worker: 3 },
            EventBody::Progress {
                progress: 50,
                message: "half".into(),
            },
            EventBody::Retrying {
                error: ErrorInfo::new(ErrorCode::HandlerError, "boom"),
                retry_in_ms: 500,
            },
            EventBody::Completed {
                result: json!({"ok": 1}),
                duration_ms: 12,
            },
            EventBody::Completed {
                result: Value::Null,
                duration_ms: 1,
            },
            EventBody::Failed {
                error: ErrorInfo::new(ErrorCode::WorkerCrashed, "panic"),
                duration_ms: 3,
            },
            EventBody::TimedOut { timeout_ms: 100 },
            EventBody::Cancelled {
                reason: "client".into(),
            },
        ];
        for body in bodies {
            let e = ev(body);
            let v = serde_json::to_value(&e).unwrap();
            assert_eq!(v["event"], e.name().as_str());
            assert_eq!(v["task_id"], "t1");
            assert_eq!(v["kind"], "echo");
            assert_eq!(v["attempt"], 2);
            assert_eq!(v["node"], "n1");
            assert!(v["ts"].as_str().unwrap().ends_with('Z'));
            match e.status() {
                Some(s) => assert_eq!(v["status"], s.as_str()),
                None => assert!(v["status"].is_null()),
            }
            let back: TaskEvent = serde_json::from_value(v).unwrap();
            assert_eq!(back.body, e.body);
        }
    }

    #[test]
    fn completed_carries_result_and_duration() {
        let v = serde_json::to_value(ev(EventBody::Completed {
            result: json!([1, 2]),
            duration_ms: 7,
        }))
        .unwrap();
        assert_eq!(v["result"], json!([1, 2]));
        assert_eq!(v["duration_ms"], 7);
        assert_eq!(v["status"], "completed");
    }

    #[test]
    fn node_events_are_tagged_with_their_name() {
        let e = NodeEvent::now(
            NodeId::new("n1").unwrap(),
            NodeEventBody::WorkerRestarted {
                worker: 2,
                restarts: 1,
                reason: "panic".into(),
            },
        );
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event"], "worker_restarted");
        assert_eq!(v["worker"], 2);
        assert_eq!(v["node"], "n1");
        let back: NodeEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }
}
