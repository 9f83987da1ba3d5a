//! What the `--scaling` and `--memory` runs share: feeding tasks straight
//! onto a JetStream queue subject, waiting for their `completed` events,
//! and removing a run's streams and buckets.

use std::ops::Range;
use std::time::Duration;

use anyhow::{bail, Context as _};
use async_nats::jetstream;
use async_nats::HeaderMap;
use dispatcher_nats::subjects::HEADER_MSG_ID;
use dispatcher_nats::Subjects;
use futures::StreamExt;
use serde_json::{json, Value};

use super::node::NodeProcess;
use super::target::delete_all;

/// Publish acknowledgements awaited together.
pub(super) const CHUNK: u64 = 1_000;

/// Publishes the tasks `<tag><i>` for `i` in `ids` with `payload` onto
/// `subject` (`Nats-Msg-Id` = id), awaiting the acks a chunk at a time.
pub(super) async fn publish(
    js: &jetstream::Context,
    subject: &str,
    tag: &str,
    ids: Range<u64>,
    payload: &Value,
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut next = ids.start;
    while next < ids.end {
        let end = (next + CHUNK).min(ids.end);
        let mut acks = Vec::with_capacity((end - next) as usize);
        for i in next..end {
            let id = format!("{tag}{i}");
            let mut headers = HeaderMap::new();
            headers.insert(HEADER_MSG_ID, id.as_str());
            let body = json!({"id": id, "payload": payload}).to_string();
            acks.push(
                js.publish_with_headers(subject.to_owned(), headers, body.into())
                    .await?,
            );
        }
        for ack in acks {
            tokio::time::timeout(timeout, std::future::IntoFuture::into_future(ack))
                .await
                .context("no publish acknowledgement in time")??;
        }
        next = end;
    }
    Ok(())
}

/// Takes `count` messages from `completed`; fails if none comes for
/// `timeout`, naming a node that exited if one did.
pub(super) async fn await_completed(
    completed: &mut async_nats::Subscriber,
    nodes: &mut [NodeProcess],
    count: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    for done in 0..count {
        match tokio::time::timeout(timeout, completed.next()).await {
            Ok(Some(_)) => {}
            Ok(None) => bail!("the NATS connection closed"),
            Err(_) => {
                for node in nodes.iter_mut() {
                    node.check()?;
                }
                bail!(
                    "{} of {count} tasks missing: none completed for {timeout:?}",
                    count - done
                );
            }
        }
    }
    Ok(())
}

/// Deletes the streams and buckets a node made under `subjects`.
pub(super) async fn clean_up(client: &async_nats::Client, subjects: &Subjects) {
    delete_all(
        client,
        &[subjects.stream_tasks(), subjects.stream_dead()],
        &[subjects.bucket_tasks(), subjects.bucket_cancels()],
    )
    .await;
}
