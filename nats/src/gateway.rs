//! The submit gateway: `<p>.submit.<kind>` requests in queue group
//! `dispatchers`. Decodes (codec), hands the task to this node's
//! Dispatcher (core mode: that is how `duplicate_id` and `queue_full` can be
//! answered truthfully), and replies as PROTOCOL.md says. Refusals also go
//! out as `rejected` events (the Dispatcher emits them).

use std::sync::Arc;

use dispatcher_actors::{Dispatcher, SubmitOptions, TaskSpec};
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::codec::{Codec, CodecError, Decoded, Limits};
use crate::subjects::{Subjects, HEADER_CONTENT_TYPE, QUEUE_GROUP};
use crate::wire;

/// Serves submissions until the returned task is aborted.
pub async fn start(
    client: async_nats::Client,
    subjects: Subjects,
    dispatcher: Dispatcher,
    limits: Limits,
    max_inflight: usize,
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
            let (client, subjects, dispatcher) =
                (client.clone(), subjects.clone(), dispatcher.clone());
            tokio::spawn(async move {
                let reply = handle(&subjects, &dispatcher, &limits, &msg).await;
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

async fn handle(
    subjects: &Subjects,
    dispatcher: &Dispatcher,
    limits: &Limits,
    msg: &async_nats::Message,
) -> Value {
    let kind = subjects.token(&msg.subject, 1);
    match decode(msg, limits) {
        Err(e) => {
            let info = e.to_info();
            dispatcher.reject(None, kind, info.clone());
            wire::error(&info)
        }
        Ok(Decoded::One(spec)) => {
            let r = dispatcher
                .submit_spec(*spec, kind, SubmitOptions::default())
                .await;
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
            let mut results = dispatcher
                .submit_batch(specs, kind, SubmitOptions::default())
                .await
                .into_iter();
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
