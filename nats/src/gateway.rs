//! The submit gateway: `<p>.submit.<kind>` requests in queue group
//! `dispatchers`. Decodes (codec) and validates, then, in mode `core`, hands
//! the task to this node's Dispatcher (that is how `duplicate_id` and
//! `queue_full` can be answered truthfully), or in mode `jetstream` stores it
//! durably ([`DurableStore`]) for any node to run; replies as PROTOCOL.md
//! says. Refusals also go out as `rejected` events.

use std::sync::Arc;

use dispatcher_actors::{DispatchError, Dispatcher, SubmitOptions, Submitted, TaskSpec};
use futures::{FutureExt, StreamExt};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::codec::{Codec, CodecError, Decoded, Limits};
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
    Ok(tokio::spawn(async move {
        while let Some(first) = sub.next().await {
            let msgs = with_waiting(&mut sub, first, most);
            // `msgs.len() <= most <= max_inflight`, so the permits exist.
            let Ok(permit) = permits.clone().acquire_many_owned(msgs.len() as u32).await else {
                break;
            };
            let (client, subjects, dispatcher, store) = (
                client.clone(),
                subjects.clone(),
                dispatcher.clone(),
                store.clone(),
            );
            tokio::spawn(async move {
                let intake = Intake {
                    dispatcher: &dispatcher,
                    store: store.as_ref(),
                };
                let replies = handle(&subjects, &intake, &limits, &msgs).await;
                for (msg, reply) in msgs.into_iter().zip(replies) {
                    if let Some(to) = msg.reply {
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

/// Reads a message's codec and body.
pub(crate) fn decode(msg: &async_nats::Message, limits: &Limits) -> Result<Decoded, CodecError> {
    let content_type = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(HEADER_CONTENT_TYPE))
        .map(|v| v.as_str());
    Codec::from_content_type(content_type)?.decode(&msg.payload, limits)
}

/// Where valid submissions go.
struct Intake<'a> {
    dispatcher: &'a Dispatcher,
    store: Option<&'a DurableStore>,
}

impl Intake<'_> {
    async fn submit(
        &self,
        specs: Vec<TaskSpec>,
        kind: Option<&str>,
    ) -> Vec<Result<Submitted, DispatchError>> {
        let Some(store) = self.store else {
            return self
                .dispatcher
                .submit_batch(specs, kind, SubmitOptions::default())
                .await;
        };
        let mut results: Vec<Option<Result<Submitted, DispatchError>>> = Vec::new();
        let mut valid = Vec::new();
        for spec in specs {
            let (id, body_kind) = (spec.id.clone(), spec.kind.clone());
            match self.dispatcher.validate(spec, kind) {
                Ok(task) => {
                    results.push(None);
                    valid.push(task);
                }
                Err(info) => {
                    let shown = kind.or(body_kind.as_deref());
                    self.dispatcher.reject(id.as_deref(), shown, info.clone());
                    results.push(Some(Err(DispatchError::Invalid(info))));
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

/// The tasks of one kind among the requests handled together.
struct Group<'a> {
    kind: Option<&'a str>,
    slots: Vec<Slot>,
    specs: Vec<TaskSpec>,
}

/// Adds a task to the group of its kind.
fn add<'a>(groups: &mut Vec<Group<'a>>, kind: Option<&'a str>, slot: Slot, spec: TaskSpec) {
    let at = match groups.iter().position(|g| g.kind == kind) {
        Some(at) => at,
        None => {
            groups.push(Group {
                kind,
                slots: Vec::new(),
                specs: Vec::new(),
            });
            groups.len() - 1
        }
    };
    groups[at].slots.push(slot);
    groups[at].specs.push(spec);
}

/// Answers each of `msgs`, in order.
async fn handle(
    subjects: &Subjects,
    intake: &Intake<'_>,
    limits: &Limits,
    msgs: &[async_nats::Message],
) -> Vec<Value> {
    let dispatcher = intake.dispatcher;
    let mut replies = Vec::with_capacity(msgs.len());
    let mut groups: Vec<Group> = Vec::new();
    for (i, msg) in msgs.iter().enumerate() {
        let kind = subjects.token(&msg.subject, 1);
        let reply = match decode(msg, limits) {
            Err(e) => {
                let info = e.to_info();
                dispatcher.reject(None, kind, info.clone());
                Reply::Ready(wire::error(&info))
            }
            Ok(Decoded::One(spec)) => {
                add(&mut groups, kind, (i, None), *spec);
                Reply::One(None)
            }
            Ok(Decoded::Batch(items)) => {
                let mut elements = Vec::with_capacity(items.len());
                for (j, item) in items.into_iter().enumerate() {
                    match item {
                        Ok(spec) => {
                            add(&mut groups, kind, (i, Some(j)), spec);
                            elements.push(None);
                        }
                        Err(e) => {
                            let info = e.to_info();
                            dispatcher.reject(None, kind, info.clone());
                            elements.push(Some(wire::error(&info)));
                        }
                    }
                }
                Reply::Batch(elements)
            }
        };
        replies.push(reply);
    }
    for group in groups {
        let results = intake.submit(group.specs, group.kind).await;
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
