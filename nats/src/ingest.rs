//! Ingest: tasks published straight onto `<p>.tasks.<kind>.<priority>`.
//! The subject's tokens are authoritative: a body whose `kind` or
//! `priority` disagrees is rejected. [`Mode::Core`](crate::node::Mode)
//! reads them from a queue-group subscription (at most once); the
//! JetStream mode, with durable pull consumers, slots in beside it.

use dispatcher_actors::{Dispatcher, SubmitOptions, Task};
use futures::StreamExt;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::codec::Limits;
use crate::gateway::{content_type, reject, with_waiting};
use crate::inbound::Reader;
use crate::subjects::{Subjects, QUEUE_GROUP};
use crate::wire;

/// Most messages handed to the actors in one batch.
const BATCH: usize = 256;

/// Consecutive messages of one kind: the kind and (position, task) pairs.
type Run = (String, Vec<(usize, Task)>);

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
    let reader = Reader::new(subjects, limits, dispatcher.config().defaults);
    Ok(tokio::spawn(async move {
        while let Some(first) = sub.next().await {
            let msgs = with_waiting(&mut sub, first, BATCH);
            let mut replies: Vec<Option<serde_json::Value>> = Vec::with_capacity(msgs.len());
            let mut runs: Vec<Run> = Vec::new();
            for (i, msg) in msgs.iter().enumerate() {
                let subject = msg.subject.as_str();
                match reader.queued(subject, content_type(msg), &msg.payload) {
                    Ok(task) => {
                        replies.push(None);
                        match runs.last_mut() {
                            Some((k, run)) if k == task.kind.as_str() => run.push((i, task)),
                            _ => runs.push((task.kind.as_str().to_owned(), vec![(i, task)])),
                        }
                    }
                    Err(refusal) => {
                        reject(&dispatcher, subject, &refusal);
                        replies.push(Some(wire::error(&refusal.error)));
                    }
                }
            }
            for (_, run) in runs {
                let (positions, tasks): (Vec<usize>, Vec<Task>) = run.into_iter().unzip();
                let results = dispatcher
                    .submit_tasks(tasks, SubmitOptions::default())
                    .await;
                for (i, r) in positions.into_iter().zip(results) {
                    replies[i] = Some(wire::submit_result(&r));
                }
            }
            for (msg, reply) in msgs.iter().zip(replies) {
                let to = msg
                    .reply
                    .as_ref()
                    .filter(|to| reader.subjects().is_reply_safe(to));
                if let (Some(to), Some(reply)) = (to, reply) {
                    if let Err(e) = client.publish(to.clone(), wire::body(&reply)).await {
                        warn!(error = %e, "Task reply not sent.");
                    }
                }
            }
        }
    }))
}
