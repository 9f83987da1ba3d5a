//! What a delivered task message becomes: a task for the actors, with its
//! delivery, or, when it is invalid, cancelled, or out of attempts, a
//! delivery settled here with the event that says why.

use async_nats::jetstream::Message;
use dispatcher_actors::{
    DeliveryHandle, Dispatcher, ErrorCode, ErrorInfo, EventBody, Priority, Settlement, Task,
    TaskRecord, TaskStatus,
};

use super::cancels::PendingCancels;
use super::delivery::{DeliveryContext, JsDelivery};
use super::records::RecordMirror;
use crate::codec::{Codec, Decoded, Limits};
use crate::subjects::{Subjects, HEADER_ACCEPTED, HEADER_CONTENT_TYPE, HEADER_REPLAY};

/// Reads delivered messages for the pull loop.
pub(super) struct Intake {
    pub(super) subjects: Subjects,
    pub(super) dispatcher: Dispatcher,
    pub(super) limits: Limits,
    pub(super) ctx: DeliveryContext,
    pub(super) cancels: PendingCancels,
    pub(super) mirror: RecordMirror,
}

impl Intake {
    /// Hands one delivered message to the actors, or settles it here when
    /// it is invalid, cancelled, or out of attempts.
    pub(super) async fn take(&self, msg: Message) -> Option<(Task, DeliveryHandle, bool)> {
        let delivered = msg.info().map(|i| i.delivered.max(1) as u32).unwrap_or(1);
        let ack = msg
            .reply
            .as_ref()
            .map(|r| r.to_string())
            .unwrap_or_default();
        let (msg, acker) = msg.split();
        let kind = self.subjects.token(&msg.subject, 1).map(str::to_owned);
        let priority = self
            .subjects
            .token(&msg.subject, 2)
            .and_then(Priority::parse);
        let header = |name: &str| {
            msg.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        let accepted_before = header(HEADER_ACCEPTED).is_some();
        let replay = header(HEADER_REPLAY).is_some();
        let decoded = Codec::from_content_type(header(HEADER_CONTENT_TYPE).as_deref())
            .and_then(|c| c.decode(&msg.payload, &self.limits));
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
        let mut spec = match decoded {
            Ok(Decoded::One(spec)) => *spec,
            Ok(Decoded::Batch(_)) => {
                let info = ErrorInfo::new(
                    ErrorCode::InvalidJson,
                    "one task per message on the queue; send batches to the submit subject",
                );
                self.dispatcher.reject(None, kind.as_deref(), info);
                delivery("_", "_").terminate();
                return None;
            }
            Err(e) => {
                self.dispatcher.reject(None, kind.as_deref(), e.to_info());
                delivery("_", "_").terminate();
                return None;
            }
        };
        let priority = priority.expect("consumers filter on valid priorities");
        if let Some(p) = spec.priority.as_deref().filter(|p| *p != priority.as_str()) {
            let info = ErrorInfo::field(
                ErrorCode::InvalidField,
                "priority",
                format!(
                    "priority {p:?} in the body differs from priority {:?} of the subject",
                    priority.as_str()
                ),
            );
            self.dispatcher
                .reject(spec.id.as_deref(), kind.as_deref(), info);
            delivery("_", "_").terminate();
            return None;
        }
        spec.priority = Some(priority.as_str().to_owned());
        // Only the id is kept for a refusal: the payload is not copied.
        let spec_id = spec.id.clone();
        let mut task = match self.dispatcher.validate(spec, kind.as_deref()) {
            Ok(task) => task,
            Err(info) => {
                self.dispatcher
                    .reject(spec_id.as_deref(), kind.as_deref(), info);
                delivery("_", "_").terminate();
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
                    reason: "cancelled on request before it started".to_owned(),
                },
            );
            delivery(&id, &kind).settle_now(Settlement::Done(TaskStatus::Cancelled, None));
            return None;
        }
        if delivered > task.max_attempts {
            // Delivered again after its last attempt began: the node that
            // held it stopped before it ended.
            task.attempt = task.max_attempts;
            let error = ErrorInfo::new(
                ErrorCode::WorkerCrashed,
                format!(
                    "delivered {delivered} times, past max_attempts {}: the node running \
                     its last attempt stopped",
                    task.max_attempts
                ),
            );
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
        if replay && delivered == 1 {
            self.dispatcher.forget_finished(&task.id).await;
        }
        let emit_accepted = delivered == 1 && !accepted_before;
        if emit_accepted {
            // Published straight to the queue: no record yet.
            let mut record = TaskRecord::queued(&task, self.dispatcher.node());
            record.node = None;
            self.mirror.seed(record, None);
        }
        let handle = DeliveryHandle::new(delivery(&id, &kind));
        Some((task, handle, emit_accepted))
    }
}
