//! The submit gateway: `<p>.submit.<kind>` requests in queue group
//! `dispatchers`. Decodes (codec) and validates, then, in mode `core`, hands
//! the task to this node's Dispatcher (that is how `duplicate_id` and
//! `queue_full` can be answered truthfully), or in mode `jetstream` stores it
//! durably ([`DurableStore`]) for any node to run; replies as PROTOCOL.md
//! says. Refusals also go out as `rejected` events.

use std::sync::Arc;

use dispatcher_actors::{DispatchError, Dispatcher, SubmitOptions, Submitted, Task};
use futures::{FutureExt, StreamExt};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::codec::Limits;
use crate::inbound::{Reader, Refusal, Submission};
use crate::jetstream::store::DurableStore;
use crate::subjects::{Subjects, HEADER_CONTENT_TYPE, QUEUE_GROUP};
use crate::wire;

/// Most requests answered together.
const BATCH: usize = 256;

/// Serves submissions until the returned task is aborted. Requests that
/// are waiting are taken together (at most `max_inflight` at once), and
/// the tasks of each kind among them queued or stored in one batch, so
/// that a busy gateway does not pay two actor round trips per request.
pub async fn start(
    client: async_nats::Client,
    subjects: Subjects,
    dispatcher: Dispatcher,
    limits: Limits,
    max_inflight: usize,
    store: Option<DurableStore>,
) -> Result<JoinHandle<()>, async_nats::SubscribeError> {
    let mut sub = client
        .queue_subscribe(subjects.submit_any(), QUEUE_GROUP.to_owned())
        .await?;
    let max_inflight = max_inflight.clamp(1, Semaphore::MAX_PERMITS);
    let permits = Arc::new(Semaphore::new(max_inflight));
    let most = BATCH.min(max_inflight);
    let reader = Reader::new(subjects, limits, dispatcher.config().defaults);
    Ok(tokio::spawn(async move {
        while let Some(first) = sub.next().await {
            let msgs = with_waiting(&mut sub, first, most);
            // `msgs.len() <= most <= max_inflight`, so the permits exist.
            let Ok(permit) = permits.clone().acquire_many_owned(msgs.len() as u32).await else {
                break;
            };
            let (client, dispatcher, store) = (client.clone(), dispatcher.clone(), store.clone());
            let reader = reader.clone();
            tokio::spawn(async move {
                let intake = Intake {
                    dispatcher: &dispatcher,
                    reader: &reader,
                    store: store.as_ref(),
                };
                let replies = handle(&intake, &msgs).await;
                for (msg, reply) in msgs.into_iter().zip(replies) {
                    if let Some(to) = msg.reply.filter(|to| reader.subjects().is_reply_safe(to)) {
                        if let Err(e) = client.publish(to, wire::body(&reply)).await {
                            warn!(error = %e, "Submit reply not sent.");
                        }
                    }
                }
                drop(permit);
            });
        }
    }))
}

/// `first` and the messages already waiting behind it on `sub`, at most
/// `most` in all: read together, handled as a batch.
pub(crate) fn with_waiting(
    sub: &mut async_nats::Subscriber,
    first: async_nats::Message,
    most: usize,
) -> Vec<async_nats::Message> {
    let mut msgs = vec![first];
    while msgs.len() < most {
        match sub.next().now_or_never() {
            Some(Some(msg)) => msgs.push(msg),
            _ => break,
        }
    }
    msgs
}

/// A message's `Content-Type` header, if any.
pub(crate) fn content_type(msg: &async_nats::Message) -> Option<&str> {
    msg.headers
        .as_ref()
        .and_then(|h| h.get(HEADER_CONTENT_TYPE))
        .map(|v| v.as_str())
}

/// Where valid submissions go.
struct Intake<'a> {
    dispatcher: &'a Dispatcher,
    reader: &'a Reader,
    store: Option<&'a DurableStore>,
}

impl Intake<'_> {
    /// Queues (core) or stores (jetstream) valid tasks that came on
    /// `subject`; answers in the same order.
    async fn submit(
        &self,
        subject: &str,
        tasks: Vec<Task>,
    ) -> Vec<Result<Submitted, DispatchError>> {
        let Some(store) = self.store else {
            return self
                .dispatcher
                .submit_tasks(tasks, SubmitOptions::default())
                .await;
        };
        let mut results: Vec<Option<Result<Submitted, DispatchError>>> = Vec::new();
        let mut valid = Vec::new();
        for task in tasks {
            match self.reader.stored_body(&task) {
                Ok(body) => {
                    results.push(None);
                    valid.push((task, body));
                }
                Err(refusal) => {
                    reject(self.dispatcher, subject, &refusal);
                    results.push(Some(Err(DispatchError::Invalid(refusal.error))));
                }
            }
        }
        let mut stored = store.submit(valid).await.into_iter();
        results
            .into_iter()
            .map(|r| {
                r.or_else(|| stored.next()).unwrap_or_else(|| {
                    Err(DispatchError::Unavailable("no answer for the task".into()))
                })
            })
            .collect()
    }
}

/// Publishes the `rejected` event of a refused message.
pub(crate) fn reject(dispatcher: &Dispatcher, subject: &str, refusal: &Refusal) {
    dispatcher.reject_message(
        subject,
        refusal.id.as_deref(),
        refusal.kind.as_deref(),
        refusal.error.clone(),
    );
}

/// What a request's reply is made of, while its tasks are submitted.
enum Reply {
    /// Answered already (it could not be read).
    Ready(Value),
    /// One task: its result, once known.
    One(Option<Value>),
    /// A batch: one reply per element, in order.
    Batch(Vec<Option<Value>>),
}

/// Where a submitted task's result goes: the request, and the element of
/// a batch request.
type Slot = (usize, Option<usize>);

/// The tasks that came on one subject among the requests handled together.
struct Group<'a> {
    subject: &'a str,
    slots: Vec<Slot>,
    tasks: Vec<Task>,
}

/// Adds a task to the group of its subject.
fn add<'a>(groups: &mut Vec<Group<'a>>, subject: &'a str, slot: Slot, task: Task) {
    let at = match groups.iter().position(|g| g.subject == subject) {
        Some(at) => at,
        None => {
            groups.push(Group {
                subject,
                slots: Vec::new(),
                tasks: Vec::new(),
            });
            groups.len() - 1
        }
    };
    groups[at].slots.push(slot);
    groups[at].tasks.push(task);
}

/// Answers each of `msgs`, in order.
async fn handle(intake: &Intake<'_>, msgs: &[async_nats::Message]) -> Vec<Value> {
    let dispatcher = intake.dispatcher;
    let mut replies = Vec::with_capacity(msgs.len());
    let mut groups: Vec<Group> = Vec::new();
    for (i, msg) in msgs.iter().enumerate() {
        let subject = msg.subject.as_str();
        let read = intake
            .reader
            .submission(subject, content_type(msg), &msg.payload);
        let refused = |refusal: Refusal| {
            reject(dispatcher, subject, &refusal);
            Some(wire::error(&refusal.error))
        };
        let reply = match read {
            Err(refusal) => Reply::Ready(refused(refusal).unwrap_or_default()),
            Ok(Submission::One(Ok(task))) => {
                add(&mut groups, subject, (i, None), task);
                Reply::One(None)
            }
            Ok(Submission::One(Err(refusal))) => Reply::One(refused(refusal)),
            Ok(Submission::Batch(items)) => {
                let mut elements = Vec::with_capacity(items.len());
                for (j, item) in items.into_iter().enumerate() {
                    match item {
                        Ok(task) => {
                            add(&mut groups, subject, (i, Some(j)), task);
                            elements.push(None);
                        }
                        Err(refusal) => elements.push(refused(refusal)),
                    }
                }
                Reply::Batch(elements)
            }
        };
        replies.push(reply);
    }
    for group in groups {
        let results = intake.submit(group.subject, group.tasks).await;
        for ((i, element), result) in group.slots.into_iter().zip(results) {
            let value = Some(wire::submit_result(&result));
            match (&mut replies[i], element) {
                (Reply::One(one), None) => *one = value,
                (Reply::Batch(elements), Some(j)) => elements[j] = value,
                _ => {}
            }
        }
    }
    let missing = || {
        wire::error(&dispatcher_actors::ErrorInfo::new(
            dispatcher_actors::ErrorCode::Internal,
            "no answer for this task",
        ))
    };
    replies
        .into_iter()
        .map(|reply| match reply {
            Reply::Ready(value) => value,
            Reply::One(value) => value.unwrap_or_else(missing),
            Reply::Batch(elements) => wire::batch(
                elements
                    .into_iter()
                    .map(|e| e.unwrap_or_else(missing))
                    .collect(),
            ),
        })
        .collect()
}
