//! The Registry actor: owns every task's [`TaskRecord`] on this node, the
//! error list, and retention. It learns of tasks when they are admitted
//! ([`Admit`]) and folds every later event into their records
//! ([`RecordEvent`]). It does not schedule or run anything.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use actix::{Actor, AsyncContext, Context, Handler, Message, MessageResult};

use crate::dispatcher::ListFilter;
use crate::event::{TaskEvent, TaskStatus};
use crate::record::{ErrorEntry, TaskRecord};
use crate::task::TaskId;

/// Keeps task records and the error list, bounded by age and count.
pub struct Registry {
    records: HashMap<TaskId, Kept>,
    /// Finished tasks, oldest first, with when they finished.
    finished: VecDeque<(TaskId, Instant)>,
    errors: VecDeque<ErrorEntry>,
    retention: Duration,
    cleanup_interval: Duration,
    max_records: usize,
    error_capacity: usize,
}

/// A record as the Registry keeps it: boxed, so that the table moves a
/// pointer per record when it grows, and with a finished task's result as
/// its JSON text (a small object as a `Value` tree takes several times the
/// room of its text). Answers rebuild the record whole.
#[derive(Debug)]
struct Kept {
    record: Box<TaskRecord>,
    result: Option<Box<str>>,
}

impl Kept {
    fn new(record: TaskRecord) -> Self {
        Self {
            record: Box::new(record),
            result: None,
        }
    }

    /// The record, result included.
    fn to_record(&self) -> TaskRecord {
        let mut record = (*self.record).clone();
        if let Some(text) = &self.result {
            record.result = serde_json::from_str(text).ok();
        }
        record
    }

    /// Folds `event` in; answers whether the task has just finished.
    fn apply(&mut self, event: &TaskEvent) -> bool {
        let was_final = self.record.status.is_final();
        self.record.apply(event);
        let finished = !was_final && self.record.status.is_final();
        if finished {
            if let Some(result) = self.record.result.take() {
                match serde_json::to_string(&result) {
                    Ok(text) => self.result = Some(text.into_boxed_str()),
                    Err(_) => self.record.result = Some(result),
                }
            }
        }
        finished
    }
}

impl Registry {
    /// An empty registry.
    pub fn new(
        retention: Duration,
        cleanup_interval: Duration,
        max_records: usize,
        error_capacity: usize,
    ) -> Self {
        Self {
            records: HashMap::new(),
            finished: VecDeque::new(),
            errors: VecDeque::with_capacity(error_capacity.min(1024)),
            retention,
            cleanup_interval,
            max_records,
            error_capacity,
        }
    }

    /// Drops finished records older than the retention, and the oldest
    /// finished ones past `max_records`.
    fn cleanup(&mut self, now: Instant) {
        while let Some((id, finished_at)) = self.finished.front() {
            let expired = now.saturating_duration_since(*finished_at) >= self.retention;
            if !expired && self.records.len() <= self.max_records {
                break;
            }
            self.records.remove(id);
            self.finished.pop_front();
        }
    }

    fn push_error(&mut self, entry: ErrorEntry) {
        if self.errors.len() == self.error_capacity {
            self.errors.pop_front();
        }
        self.errors.push_back(entry);
    }
}

impl Actor for Registry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.cleanup_interval, |act, _ctx| {
            act.cleanup(Instant::now())
        });
    }
}

/// What the Registry made of a task handed to the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// New to this node: recorded.
    New,
    /// Known and not finished: a transport delivered it again (a retry, or
    /// a lapsed lease); the record stays.
    Again,
    /// Known already and not a delivery: a duplicate id.
    Duplicate,
    /// Known and finished here: a delivery of work already done.
    Finished(TaskStatus),
}

/// Records tasks handed to the node; answers per task.
#[derive(Debug, Message)]
#[rtype(result = "Vec<Admission>")]
pub struct Admit {
    /// Records of the tasks, status `queued`, each with whether a transport
    /// delivered it (and so may deliver it again).
    pub records: Vec<(TaskRecord, bool)>,
}

impl Handler<Admit> for Registry {
    type Result = MessageResult<Admit>;

    fn handle(&mut self, msg: Admit, _ctx: &mut Context<Self>) -> Self::Result {
        let admitted = msg
            .records
            .into_iter()
            .map(|(record, delivered)| match self.records.get(&record.id) {
                None => {
                    self.records.insert(record.id.clone(), Kept::new(record));
                    Admission::New
                }
                Some(_) if !delivered => Admission::Duplicate,
                Some(known) if known.record.status.is_final() => {
                    Admission::Finished(known.record.status)
                }
                Some(_) => Admission::Again,
            })
            .collect();
        // Admission can push the count past `max_records`; trim at once so
        // memory stays bounded between cleanup ticks.
        if self.records.len() > self.max_records {
            self.cleanup(Instant::now());
        }
        MessageResult(admitted)
    }
}

/// Removes records of admitted tasks that were then refused (queue full).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Forget {
    /// The tasks.
    pub ids: Vec<TaskId>,
}

impl Handler<Forget> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Forget, _ctx: &mut Context<Self>) {
        for id in msg.ids {
            self.records.remove(&id);
        }
    }
}

/// Removes the record of a finished task, so that the task may run again
/// (an operator replays it from the dead letters). A task not finished is
/// left alone.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ForgetFinished(pub TaskId);

impl Handler<ForgetFinished> for Registry {
    type Result = ();

    fn handle(&mut self, msg: ForgetFinished, _ctx: &mut Context<Self>) {
        if self
            .records
            .get(&msg.0)
            .is_some_and(|k| k.record.status.is_final())
        {
            self.records.remove(&msg.0);
        }
    }
}

/// Folds an event into its task's record (and the error list).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct RecordEvent(pub TaskEvent);

impl Handler<RecordEvent> for Registry {
    type Result = ();

    fn handle(&mut self, RecordEvent(event): RecordEvent, _ctx: &mut Context<Self>) {
        if let Some(entry) = ErrorEntry::of(&event) {
            self.push_error(entry);
        }
        let Some(kept) = self.records.get_mut(&event.task_id) else {
            return;
        };
        if kept.apply(&event) {
            self.finished
                .push_back((event.task_id.clone(), Instant::now()));
        }
    }
}

/// One task's record.
#[derive(Debug, Message)]
#[rtype(result = "Option<TaskRecord>")]
pub struct GetTask {
    /// The task.
    pub id: TaskId,
}

impl Handler<GetTask> for Registry {
    type Result = Option<TaskRecord>;

    fn handle(&mut self, msg: GetTask, _ctx: &mut Context<Self>) -> Self::Result {
        self.records.get(&msg.id).map(Kept::to_record)
    }
}

/// Records matching a filter, newest first.
#[derive(Debug, Message)]
#[rtype(result = "Vec<TaskRecord>")]
pub struct ListTasks {
    /// Which ones.
    pub filter: ListFilter,
}

impl Handler<ListTasks> for Registry {
    type Result = MessageResult<ListTasks>;

    fn handle(&mut self, msg: ListTasks, _ctx: &mut Context<Self>) -> Self::Result {
        let f = &msg.filter;
        let mut matching: Vec<&Kept> = self
            .records
            .values()
            .filter(|k| f.status.is_none_or(|s| k.record.status == s))
            .filter(|k| f.kind.as_ref().is_none_or(|kind| &k.record.kind == kind))
            .collect();
        matching.sort_unstable_by(|a, b| {
            b.record
                .created_at
                .cmp(&a.record.created_at)
                .then_with(|| b.record.id.cmp(&a.record.id))
        });
        MessageResult(
            matching
                .into_iter()
                .take(f.limit)
                .map(Kept::to_record)
                .collect(),
        )
    }
}

/// The latest failed attempts, newest first.
#[derive(Debug, Message)]
#[rtype(result = "Vec<ErrorEntry>")]
pub struct GetErrors {
    /// At most this many.
    pub limit: usize,
}

impl Handler<GetErrors> for Registry {
    type Result = MessageResult<GetErrors>;

    fn handle(&mut self, msg: GetErrors, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.errors.iter().rev().take(msg.limit).cloned().collect())
    }
}

/// How many records are kept (for tests and metrics).
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct CountRecords;

impl Handler<CountRecords> for Registry {
    type Result = usize;

    fn handle(&mut self, _msg: CountRecords, _ctx: &mut Context<Self>) -> usize {
        self.records.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ErrorCode, ErrorInfo};
    use crate::event::EventBody;
    use crate::task::{NodeId, TaskDefaults, TaskSpec};
    use serde_json::json;

    /// A submitted (not delivered) task's record.
    fn record(id: &str) -> (TaskRecord, bool) {
        let task = TaskSpec::new("echo", json!(null))
            .with_id(id)
            .into_task(None, &TaskDefaults::default())
            .unwrap();
        (TaskRecord::queued(&task, &NodeId::new("n").unwrap()), false)
    }

    /// A delivered task's record.
    fn delivered(id: &str) -> (TaskRecord, bool) {
        (record(id).0, true)
    }

    fn event(id: &str, body: EventBody) -> TaskEvent {
        TaskEvent::now(
            TaskId::new(id).unwrap(),
            crate::task::TaskKind::new("echo").unwrap(),
            1,
            NodeId::new("n").unwrap(),
            body,
        )
    }

    #[actix::test]
    async fn admits_once_and_folds_events() {
        let reg = Registry::new(Duration::from_secs(60), Duration::from_secs(60), 100, 10).start();
        let ok = reg
            .send(Admit {
                records: vec![record("a"), delivered("b")],
            })
            .await
            .unwrap();
        assert_eq!(ok, vec![Admission::New, Admission::New]);
        let again = reg
            .send(Admit {
                records: vec![record("a"), delivered("b")],
            })
            .await
            .unwrap();
        assert_eq!(again, vec![Admission::Duplicate, Admission::Again]);

        reg.do_send(RecordEvent(event("a", EventBody::Started { worker: 2 })));
        reg.do_send(RecordEvent(event(
            "a",
            EventBody::Completed {
                result: json!({"x": [1, "two", null], "y": 7.5}),
                duration_ms: 3,
            },
        )));
        let a = reg
            .send(GetTask {
                id: TaskId::new("a").unwrap(),
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(a.status, TaskStatus::Completed);
        assert_eq!(a.worker, Some(2));
        // Kept as text, answered as the same value, by status and by list.
        assert_eq!(a.result, Some(json!({"x": [1, "two", null], "y": 7.5})));
        let listed = reg
            .send(ListTasks {
                filter: ListFilter {
                    status: Some(TaskStatus::Completed),
                    ..ListFilter::default()
                },
            })
            .await
            .unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].result, a.result);
        assert!(a.started_at.is_some() && a.finished_at.is_some());
        let redelivered = reg
            .send(Admit {
                records: vec![delivered("a")],
            })
            .await
            .unwrap();
        assert_eq!(
            redelivered,
            vec![Admission::Finished(TaskStatus::Completed)]
        );

        let running = reg
            .send(ListTasks {
                filter: ListFilter {
                    status: Some(TaskStatus::Queued),
                    ..ListFilter::default()
                },
            })
            .await
            .unwrap();
        assert_eq!(running.len(), 1);
        assert_eq!(running[0].id.as_str(), "b");
    }

    #[actix::test]
    async fn error_list_is_a_bounded_ring() {
        let reg = Registry::new(Duration::from_secs(60), Duration::from_secs(60), 100, 3).start();
        for i in 0..5 {
            reg.do_send(RecordEvent(event(
                &format!("t{i}"),
                EventBody::Failed {
                    error: ErrorInfo::new(ErrorCode::HandlerError, format!("e{i}")),
                    duration_ms: 1,
                },
            )));
        }
        let errors = reg.send(GetErrors { limit: 10 }).await.unwrap();
        let ids: Vec<_> = errors
            .iter()
            .map(|e| e.task_id.as_str().to_owned())
            .collect();
        assert_eq!(ids, ["t4", "t3", "t2"]);
    }

    #[actix::test]
    async fn finished_records_expire_and_are_capped() {
        let reg = Registry::new(Duration::ZERO, Duration::from_millis(10), 100, 10).start();
        reg.send(Admit {
            records: vec![record("old"), record("live")],
        })
        .await
        .unwrap();
        reg.do_send(RecordEvent(event(
            "old",
            EventBody::Cancelled { reason: "x".into() },
        )));
        // Zero retention: the cleanup tick removes the finished record but
        // never a live one.
        let deadline = Instant::now() + Duration::from_secs(10);
        while reg.send(CountRecords).await.unwrap() != 1 {
            assert!(Instant::now() < deadline, "finished record never expired");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(reg
            .send(GetTask {
                id: TaskId::new("live").unwrap()
            })
            .await
            .unwrap()
            .is_some());

        let capped =
            Registry::new(Duration::from_secs(3600), Duration::from_secs(3600), 2, 10).start();
        for id in ["a", "b"] {
            capped
                .send(Admit {
                    records: vec![record(id)],
                })
                .await
                .unwrap();
            capped.do_send(RecordEvent(event(
                id,
                EventBody::Cancelled { reason: "x".into() },
            )));
        }
        capped
            .send(Admit {
                records: vec![record("c")],
            })
            .await
            .unwrap();
        assert_eq!(capped.send(CountRecords).await.unwrap(), 2);
        assert!(capped
            .send(GetTask {
                id: TaskId::new("a").unwrap()
            })
            .await
            .unwrap()
            .is_none());
    }
}
