//! Ingest: tasks published straight onto `<p>.tasks.<kind>.<priority>`.
//! The subject's tokens are authoritative: a body whose `kind` or
//! `priority` disagrees is rejected. [`Mode::Core`](crate::node::Mode)
//! reads them from a queue-group subscription (at most once); the
//! JetStream mode, with durable pull consumers, slots in beside it.

use dispatcher_actors::{Dispatcher, ErrorCode, ErrorInfo, Priority, SubmitOptions};
use futures::StreamExt;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::codec::{Decoded, Limits};
use crate::gateway::decode;
use crate::subjects::{Subjects, QUEUE_GROUP};
use crate::wire;

/// Takes tasks from the core-mode queue until the returned task is aborted.
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
        while let Some(msg) = sub.next().await {
            let reply = take(&subjects, &dispatcher, &limits, &msg).await;
            if let Some(to) = msg.reply {
                if let Err(e) = client.publish(to, wire::body(&reply)).await {
                    warn!(error = %e, "Task reply not sent.");
                }
            }
        }
    }))
}

async fn take(
    subjects: &Subjects,
    dispatcher: &Dispatcher,
    limits: &Limits,
    msg: &async_nats::Message,
) -> serde_json::Value {
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
        return reject(info, None);
    };
    let mut spec = match decode(msg, limits) {
        Ok(Decoded::One(spec)) => *spec,
        Ok(Decoded::Batch(_)) => {
            let info = ErrorInfo::new(
                ErrorCode::InvalidJson,
                "one task per message on the queue; send batches to the submit subject",
            );
            return reject(info, None);
        }
        Err(e) => return reject(e.to_info(), None),
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
        return reject(info, spec.id.as_deref());
    }
    spec.priority = Some(priority.as_str().to_owned());
    let r = dispatcher
        .submit_spec(
            spec,
            kind,
            SubmitOptions {
                emit_accepted: true,
            },
        )
        .await;
    wire::submit_result(&r)
}
