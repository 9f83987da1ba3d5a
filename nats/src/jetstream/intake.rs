//! What a delivered task message becomes: a task for the actors, with its
//! delivery, or, when it is invalid, forged, cancelled, or out of
//! attempts, a delivery settled here with the event that says why.
//!
//! A message is read by [`Reader::queued`], the same function the gateway
//! checked it with. One that cannot be read is poison: it is terminated
//! on its first delivery and copied to the dead-letter stream with the
//! reason, and it never reaches the actors.
//!
//! A readable message runs only if the task's KV record belongs to it: the
//! record names the digest of the body it was stored with. With no record
//! (a task published straight to the queue) the node creates one first,
//! create-if-absent, so two messages with one id cannot both claim it. A
//! message whose id has a record for another body, or whose task has
//! finished, is refused with `duplicate_id` and never runs: re-running a
//! finished task is the `replay` API's job.
//!
//! A record that no node has taken yet (`queued`, without a `node`) is
//! taken with a write fenced by its revision before the task runs, so
//! that it and a cancel by the control API cannot both win: a message
//! whose record was cancelled that way is terminated when pulled, without
//! an event (the API published it), and never runs.

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use async_nats::jetstream::Message;
use dispatcher_actors::{
    DeliveryHandle, Dispatcher, ErrorCode, ErrorInfo, EventBody, Settlement, Task, TaskRecord,
    TaskStatus,
};
use tracing::warn;

use super::cancels::PendingCancels;
use super::delivery::{DeliveryContext, JsDelivery};
use super::records::RecordMirror;
use crate::inbound::{digest, Reader, Refusal};
use crate::subjects::{HEADER_ACCEPTED, HEADER_CONTENT_TYPE, HEADER_REPLAY};

/// How long a delivery whose record could not be read waits before it is
/// offered again.
const UNVERIFIED_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads delivered messages for the pull loop.
pub(super) struct Intake {
    pub(super) reader: Reader,
    pub(super) dispatcher: Dispatcher,
    pub(super) ctx: DeliveryContext,
    pub(super) cancels: PendingCancels,
    pub(super) mirror: RecordMirror,
    pub(super) records: kv::Store,
    /// Deliveries that may begin no attempt before the task fails
    /// `crash_budget_exhausted`.
    pub(super) crash_budget: u32,
}

/// Whether a message may run, by the task's record.
enum Claim {
    /// The record is this message's and the task is not over; `created`
    /// when this node made the record (the task was published straight
    /// to the queue); `attempts`: the attempts it records as begun.
    Run { created: bool, attempts: u32 },
    /// The record is this message's, and the task is over: a delivery of
    /// work already done.
    Over,
    /// The record belongs to another message.
    Forged(String),
    /// The record could not be read or made.
    Unverified(String),
}

impl Intake {
    /// Hands one delivered message to the actors, or settles it here when
    /// it is invalid, forged, cancelled, or out of attempts.
    pub(super) async fn take(&self, msg: Message) -> Option<(Task, DeliveryHandle, bool)> {
        let delivered = msg.info().map(|i| i.delivered.max(1) as u32).unwrap_or(1);
        let ack = msg
            .reply
            .as_ref()
            .map(|r| r.to_string())
            .unwrap_or_default();
        let (msg, acker) = msg.split();
        let subject = msg.subject.as_str();
        let header = |name: &str| {
            msg.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        let delivery = |id: &str, kind: &str| {
            JsDelivery::new(
                acker,
                self.ctx.clone(),
                ack,
                id.to_owned(),
                kind.to_owned(),
                delivered,
                msg.payload.clone(),
            )
        };
        let read = self.reader.queued(
            subject,
            header(HEADER_CONTENT_TYPE).as_deref(),
            &msg.payload,
        );
        let mut task = match read {
            Ok(task) => task,
            Err(refusal) => {
                self.poison(subject, &refusal, &msg.payload, delivery);
                return None;
            }
        };
        task.attempt = delivered;
        let id = task.id.as_str().to_owned();
        let kind = task.kind.as_str().to_owned();
        if self.cancels.contains(&id) {
            self.dispatcher.announce(
                &task,
                EventBody::Cancelled {
                    reason: super::cancels::BEFORE_START.to_owned(),
                },
            );
            delivery(&id, &kind).settle_now(Settlement::Done(TaskStatus::Cancelled, None));
            return None;
        }
        let accepted = header(HEADER_ACCEPTED).is_some();
        let (created, attempts) = match self.claim(&task, &msg.payload, accepted).await {
            Claim::Run { created, attempts } => (created, attempts),
            Claim::Over => {
                // Done already (its ack was lost, or it was settled while
                // this copy was on its way, or the control API cancelled
                // it before any node took it): removed, nothing to say.
                delivery(&id, &kind).terminate();
                return None;
            }
            Claim::Forged(why) => {
                let error = ErrorInfo::field(ErrorCode::DuplicateId, "id", why);
                self.dispatcher
                    .reject_message(subject, Some(&id), Some(&kind), error);
                delivery(&id, &kind).terminate();
                return None;
            }
            Claim::Unverified(why) => {
                warn!(task_id = %id, error = %why, "Task record not read; the delivery is offered again.");
                delivery(&id, &kind).settle_now(Settlement::Retry {
                    delay: UNVERIFIED_RETRY,
                });
                return None;
            }
        };
        // An attempt is a run: the next one is the record's count plus
        // one. Deliveries that began no attempt (given back unstarted, or
        // taken by a node that died before it started the task) count
        // only against the crash budget.
        task.attempt = attempts + 1;
        let idle_deliveries = delivered.saturating_sub(1).saturating_sub(attempts);
        let ended = if attempts >= task.max_attempts {
            // Its last attempt began, and the node running it stopped
            // before it ended.
            task.attempt = task.max_attempts;
            Some(ErrorInfo::new(
                ErrorCode::WorkerCrashed,
                format!(
                    "its last attempt ({} of {}) began on a node that stopped before it ended",
                    attempts, task.max_attempts
                ),
            ))
        } else if idle_deliveries > self.crash_budget {
            task.attempt = attempts.max(1);
            Some(ErrorInfo::new(
                ErrorCode::CrashBudgetExhausted,
                format!(
                    "delivered {delivered} times with {attempts} attempts begun: more than \
                     {} deliveries began no attempt",
                    self.crash_budget
                ),
            ))
        } else {
            None
        };
        if let Some(error) = ended {
            self.dispatcher.announce(
                &task,
                EventBody::Failed {
                    error: error.clone(),
                    duration_ms: 0,
                },
            );
            delivery(&id, &kind).settle_now(Settlement::Done(TaskStatus::Failed, Some(error)));
            return None;
        }
        if header(HEADER_REPLAY).is_some() && delivered == 1 {
            // Its record was reset by the replay API (the claim checked
            // that it is this message's): run it here even if this node
            // ran it before.
            self.dispatcher.forget_finished(&task.id).await;
        }
        let handle = DeliveryHandle::new(delivery(&id, &kind));
        Some((task, handle, created))
    }

    /// A message that is not a valid task: a `rejected` event that names
    /// its subject, a copy in the dead-letter stream with the reason, and
    /// a term, all on its first delivery. If a record was stored for this
    /// very body (by a gateway whose limits differ from this node's), it
    /// ends `failed` with the reason instead of waiting forever.
    fn poison(
        &self,
        subject: &str,
        refusal: &Refusal,
        body: &[u8],
        delivery: impl FnOnce(&str, &str) -> JsDelivery,
    ) {
        self.dispatcher.reject_message(
            subject,
            refusal.id.as_deref(),
            refusal.kind.as_deref(),
            refusal.error.clone(),
        );
        let id = refusal
            .id
            .as_deref()
            .filter(|id| dispatcher_actors::TaskId::new(*id).is_ok())
            .map(str::to_owned);
        let kind = self
            .reader
            .subjects()
            .token(subject, 1)
            .unwrap_or("_")
            .to_owned();
        let letter_id = id
            .clone()
            .unwrap_or_else(|| dispatcher_actors::TaskId::generate().as_str().to_owned());
        delivery(&letter_id, &kind).settle_now(Settlement::Done(
            TaskStatus::Failed,
            Some(refusal.error.clone()),
        ));
        if let Some(id) = id {
            let records = self.records.clone();
            let error = refusal.error.clone();
            let body_digest = digest(body);
            tokio::spawn(async move { fail_own_record(&records, &id, &body_digest, error).await });
        }
    }

    /// Reads (or creates) the task's record and says whether this message
    /// may run it. A record found is handed to the mirror with its
    /// revision, so that the next write needs no read.
    async fn claim(&self, task: &Task, body: &[u8], accepted: bool) -> Claim {
        let id = task.id.as_str();
        let body_digest = digest(body);
        for _ in 0..3 {
            let entry = match self.records.entry(id).await {
                Ok(entry) => entry,
                Err(e) => return Claim::Unverified(e.to_string()),
            };
            match entry {
                Some(entry) if entry.operation == Operation::Put => {
                    let Ok(record) = serde_json::from_slice::<TaskRecord>(&entry.value) else {
                        return Claim::Forged(format!(
                            "task {id} has a record that is not a task record"
                        ));
                    };
                    // Records written before digests existed belong to the
                    // message the gateway stored.
                    let own = match record.digest.as_deref() {
                        Some(d) => d == body_digest,
                        None => accepted,
                    };
                    if !own {
                        return Claim::Forged(format!(
                            "task {id} exists already with another body; a task id runs once"
                        ));
                    }
                    if record.status.is_final() {
                        return Claim::Over;
                    }
                    let attempts = record.attempt;
                    if record.status == TaskStatus::Queued && record.node.is_none() {
                        // No node has taken it yet, so the control API may
                        // cancel it at once, with a write fenced by the
                        // same revision: this node takes it only if that
                        // cancel did not come first, and the other way
                        // round. A write lost to a cancel reads the record
                        // again and finds it over.
                        let mut record = record;
                        record.node = Some(self.dispatcher.node().clone());
                        let value = match serde_json::to_vec(&record) {
                            Ok(value) => value,
                            Err(e) => return Claim::Unverified(e.to_string()),
                        };
                        match self.records.update(id, value.into(), entry.revision).await {
                            Ok(revision) => {
                                self.mirror.seed(record, Some(revision));
                                return Claim::Run {
                                    created: false,
                                    attempts,
                                };
                            }
                            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => continue,
                            Err(e) => return Claim::Unverified(e.to_string()),
                        }
                    }
                    self.mirror.seed(record, Some(entry.revision));
                    return Claim::Run {
                        created: false,
                        attempts,
                    };
                }
                _ => {
                    // Created by the node that takes it: held from the
                    // start (a cancel goes through the cancel bucket).
                    let mut record = TaskRecord::queued(task, self.dispatcher.node());
                    record.digest = Some(body_digest.clone());
                    let value = match serde_json::to_vec(&record) {
                        Ok(value) => value,
                        Err(e) => return Claim::Unverified(e.to_string()),
                    };
                    match self.records.create(id, value.into()).await {
                        Ok(revision) => {
                            self.mirror.seed(record, Some(revision));
                            return Claim::Run {
                                created: true,
                                attempts: 0,
                            };
                        }
                        // Another message with this id claimed it first:
                        // read what it wrote.
                        Err(e) if e.kind() == CreateErrorKind::AlreadyExists => continue,
                        Err(e) => return Claim::Unverified(e.to_string()),
                    }
                }
            }
        }
        Claim::Unverified(format!("the record of task {id} kept changing"))
    }
}

/// Ends the record of task `id` `failed` with `error`, if it was stored
/// for the body with `body_digest` and is not over.
async fn fail_own_record(records: &kv::Store, id: &str, body_digest: &str, error: ErrorInfo) {
    let Ok(Some(entry)) = records.entry(id).await else {
        return;
    };
    let Ok(mut record) = serde_json::from_slice::<TaskRecord>(&entry.value) else {
        return;
    };
    if record.digest.as_deref() != Some(body_digest) || record.status.is_final() {
        return;
    }
    record.status = TaskStatus::Failed;
    record.finished_at = Some(dispatcher_actors::Timestamp::now());
    record.error = Some(error);
    let Ok(value) = serde_json::to_vec(&record) else {
        return;
    };
    if let Err(e) = records.update(id, value.into(), entry.revision).await {
        warn!(task_id = %id, error = %e, "Record of a refused task not ended.");
    }
}
