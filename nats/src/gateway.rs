//! The submit gateway: `<p>.submit.<kind>` requests in queue group
//! `dispatchers`. Decodes (codec) and validates, then, in mode `core`, hands
//! the task to this node's Dispatcher (that is how `duplicate_id` and
//! `queue_full` can be answered truthfully), or in mode `jetstream` stores it
//! durably ([`DurableStore`]) for any node to run; replies as PROTOCOL.md
//! says. Refusals also go out as `rejected` events.

use std::sync::Arc;

use dispatcher_actors::{DispatchError, Dispatcher, SubmitOptions, Submitted, TaskSpec};
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::codec::{Codec, CodecError, Decoded, Limits};
use crate::jetstream::store::DurableStore;
use crate::subjects::{Subjects, HEADER_CONTENT_TYPE, QUEUE_GROUP};
use crate::wire;

/// Serves submissions until the returned task is aborted.
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
    let permits = Arc::new(Semaphore::new(max_inflight.max(1)));
    Ok(tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let Ok(permit) = permits.clone().acquire_owned().await else {
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
                let reply = handle(&subjects, &intake, &limits, &msg).await;
                if let Some(to) = msg.reply {
                    if let Err(e) = client.publish(to, wire::body(&reply)).await {
                        warn!(error = %e, "Submit reply not sent.");
                    }
                }
                drop(permit);
            });
        }
    }))
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

async fn handle(
    subjects: &Subjects,
    intake: &Intake<'_>,
    limits: &Limits,
    msg: &async_nats::Message,
) -> Value {
    let dispatcher = intake.dispatcher;
    let kind = subjects.token(&msg.subject, 1);
    match decode(msg, limits) {
        Err(e) => {
            let info = e.to_info();
            dispatcher.reject(None, kind, info.clone());
            wire::error(&info)
        }
        Ok(Decoded::One(spec)) => {
            let r = intake
                .submit(vec![*spec], kind)
                .await
                .pop()
                .unwrap_or_else(|| {
                    Err(DispatchError::Unavailable("no answer for the task".into()))
                });
            wire::submit_result(&r)
        }
        Ok(Decoded::Batch(items)) => {
            let mut replies: Vec<Option<Value>> = Vec::with_capacity(items.len());
            let mut specs: Vec<TaskSpec> = Vec::new();
            for item in items {
                match item {
                    Ok(spec) => {
                        replies.push(None);
                        specs.push(spec);
                    }
                    Err(e) => {
                        let info = e.to_info();
                        dispatcher.reject(None, kind, info.clone());
                        replies.push(Some(wire::error(&info)));
                    }
                }
            }
            let mut results = intake.submit(specs, kind).await.into_iter();
            let replies = replies
                .into_iter()
                .map(|r| {
                    r.unwrap_or_else(|| match results.next() {
                        Some(r) => wire::submit_result(&r),
                        None => wire::error(&dispatcher_actors::ErrorInfo::new(
                            dispatcher_actors::ErrorCode::Internal,
                            "no answer for this element",
                        )),
                    })
                })
                .collect();
            wire::batch(replies)
        }
    }
}
