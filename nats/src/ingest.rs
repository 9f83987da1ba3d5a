//! Ingest: tasks published straight onto `<p>.tasks.<kind>.<priority>`.
//! The subject's tokens are authoritative: a body whose `kind` or
//! `priority` disagrees is rejected. [`Mode::Core`](crate::node::Mode)
//! reads them from a queue-group subscription (at most once); the
//! JetStream mode, with durable pull consumers, slots in beside it.

use dispatcher_actors::{Dispatcher, ErrorCode, ErrorInfo, Priority, SubmitOptions, TaskSpec};
use futures::StreamExt;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::codec::{Decoded, Limits};
use crate::gateway::{decode, with_waiting};
use crate::subjects::{Subjects, QUEUE_GROUP};
use crate::wire;

/// Most messages handed to the actors in one batch.
const BATCH: usize = 256;

/// Consecutive messages of one kind: the kind and (position, spec) pairs.
type Run = (Option<String>, Vec<(usize, TaskSpec)>);

/// Takes tasks from the core-mode queue until the returned task is aborted.
/// Messages that are waiting are taken together: each run of one kind is
/// queued in one batch (two actor messages), in the order they came.
pub async fn start_core(
    client: async_nats::Client,
    subjects: Subjects,
    dispatcher: Dispatcher,
    limits: Limits,
) -> Result<JoinHandle<()>, async_nats::SubscribeError> {
    let mut sub = client
        .queue_subscribe(subjects.tasks_any(), QUEUE_GROUP.to_owned())
        .await?;
    Ok(tokio::spawn(async move {
        while let Some(first) = sub.next().await {
            let msgs = with_waiting(&mut sub, first, BATCH);
            let mut replies: Vec<Option<serde_json::Value>> = Vec::with_capacity(msgs.len());
            let mut runs: Vec<Run> = Vec::new();
            for (i, msg) in msgs.iter().enumerate() {
                match prepare(&subjects, &dispatcher, &limits, msg) {
                    Ok((kind, spec)) => {
                        replies.push(None);
                        match runs.last_mut() {
                            Some((k, run)) if *k == kind => run.push((i, spec)),
                            _ => runs.push((kind, vec![(i, spec)])),
                        }
                    }
                    Err(reply) => replies.push(Some(reply)),
                }
            }
            for (kind, run) in runs {
                let (positions, specs): (Vec<usize>, Vec<TaskSpec>) = run.into_iter().unzip();
                let results = dispatcher
                    .submit_batch(specs, kind.as_deref(), SubmitOptions::default())
                    .await;
                for (i, r) in positions.into_iter().zip(results) {
                    replies[i] = Some(wire::submit_result(&r));
                }
            }
            for (msg, reply) in msgs.iter().zip(replies) {
                if let (Some(to), Some(reply)) = (&msg.reply, reply) {
                    if let Err(e) = client.publish(to.clone(), wire::body(&reply)).await {
                        warn!(error = %e, "Task reply not sent.");
                    }
                }
            }
        }
    }))
}

/// Reads one queue message as a task spec for the kind of its subject, or
/// answers the error reply (the refusal is also a `rejected` event).
fn prepare(
    subjects: &Subjects,
    dispatcher: &Dispatcher,
    limits: &Limits,
    msg: &async_nats::Message,
) -> Result<(Option<String>, TaskSpec), serde_json::Value> {
    let kind = subjects.token(&msg.subject, 1);
    let reject = |info: ErrorInfo, id: Option<&str>| {
        dispatcher.reject(id, kind, info.clone());
        wire::error(&info)
    };
    let token = subjects.token(&msg.subject, 2).unwrap_or("");
    let Some(priority) = Priority::parse(token) else {
        let info = ErrorInfo::field(
            ErrorCode::InvalidField,
            "priority",
            format!("the subject's priority {token:?} must be one of critical, high, normal, low"),
        );
        return Err(reject(info, None));
    };
    let mut spec = match decode(msg, limits) {
        Ok(Decoded::One(spec)) => *spec,
        Ok(Decoded::Batch(_)) => {
            let info = ErrorInfo::new(
                ErrorCode::InvalidJson,
                "one task per message on the queue; send batches to the submit subject",
            );
            return Err(reject(info, None));
        }
        Err(e) => return Err(reject(e.to_info(), None)),
    };
    if let Some(p) = spec.priority.as_deref().filter(|p| *p != priority.as_str()) {
        let info = ErrorInfo::field(
            ErrorCode::InvalidField,
            "priority",
            format!(
                "priority {p:?} in the body differs from priority {:?} of the subject",
                priority.as_str()
            ),
        );
        return Err(reject(info, spec.id.as_deref()));
    }
    spec.priority = Some(priority.as_str().to_owned());
    Ok((kind.map(str::to_owned), spec))
}
