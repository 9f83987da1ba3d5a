//! Cancel requests across nodes. A task that no node has taken yet (its
//! record `queued`, without a `node`) is cancelled at once by whoever
//! answers the request ([`cancel_unheld`]): its record is written
//! `cancelled` with a compare-and-set on the revision read, the same
//! fence a node's claim of it passes ([`intake`](super::intake)), so
//! exactly one of the two wins; the message stays in the stream until a
//! node serving its kind pulls it and terminates it, unrun and unsaid
//! (finding one message in a work-queue stream would mean reading its
//! subject's backlog, and a purge by subject would take every task of the
//! kind and priority).
//!
//! A cancel of a task a node holds, or held last, is written to the KV
//! bucket `dispatch_cancels`; every node watches that bucket: the node
//! holding the task cancels it at once, and every node remembers the id so
//! that a task still in the stream is terminated, never run, when it is
//! pulled.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use async_nats::jetstream::kv::{self, UpdateErrorKind};
use dispatcher_actors::{
    Dispatcher, EventBody, NodeId, TaskEvent, TaskId, TaskRecord, TaskStatus, Timestamp,
};
use futures::StreamExt;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// Ids with a cancel request, bounded (the oldest are forgotten first).
#[derive(Clone)]
pub struct PendingCancels {
    inner: Arc<Mutex<Bounded>>,
}

struct Bounded {
    ids: HashSet<String>,
    order: VecDeque<String>,
    max: usize,
}

impl PendingCancels {
    /// An empty set holding at most `max` ids.
    pub fn new(max: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Bounded {
                ids: HashSet::new(),
                order: VecDeque::new(),
                max: max.max(1),
            })),
        }
    }

    /// Whether `id` has a cancel request.
    pub fn contains(&self, id: &str) -> bool {
        self.inner.lock().expect("not poisoned").ids.contains(id)
    }

    /// Remembers `id`.
    pub fn insert(&self, id: &str) {
        let mut b = self.inner.lock().expect("not poisoned");
        if b.ids.insert(id.to_owned()) {
            b.order.push_back(id.to_owned());
            while b.order.len() > b.max {
                if let Some(old) = b.order.pop_front() {
                    b.ids.remove(&old);
                }
            }
        }
    }
}

/// The reason on the `cancelled` event of a task cancelled before it
/// started.
pub const BEFORE_START: &str = "cancelled on request before it started";

/// Tries of [`cancel_unheld`] against a record that keeps changing.
const TRIES: usize = 5;

/// What [`cancel_unheld`] found.
#[derive(Debug)]
pub enum Unheld {
    /// No node had taken the task: its record is `cancelled` now, at
    /// `revision`, by `event`, which is still to be published.
    Cancelled {
        /// The `cancelled` event, made by the node that answered.
        event: TaskEvent,
        /// The record as written.
        record: Box<TaskRecord>,
        /// Its revision.
        revision: u64,
    },
    /// A node holds the task or held it last (running, retrying, or
    /// queued by a node): the cancel goes through the bucket.
    Held,
    /// The task is over.
    Finished,
    /// It has no (readable) record.
    Missing,
}

/// Cancels `id` at once if no node has taken it (its record is `queued`
/// without a `node`): the record becomes `cancelled`, written by `node`
/// with a compare-and-set on the revision read, so that a node taking the
/// task at the same moment (its claim is fenced the same way) and this
/// cancel cannot both win. The event is the caller's to publish.
pub async fn cancel_unheld(
    records: &kv::Store,
    id: &TaskId,
    node: &NodeId,
) -> Result<Unheld, String> {
    for _ in 0..TRIES {
        let entry = records
            .entry(id.as_str())
            .await
            .map_err(|e| e.to_string())?;
        let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
            return Ok(Unheld::Missing);
        };
        let Ok(mut record) = serde_json::from_slice::<TaskRecord>(&entry.value) else {
            return Ok(Unheld::Missing);
        };
        if record.status.is_final() {
            return Ok(Unheld::Finished);
        }
        if record.status != TaskStatus::Queued || record.node.is_some() {
            return Ok(Unheld::Held);
        }
        // The attempt it was queued for, as its `accepted` said.
        let event = TaskEvent::now(
            id.clone(),
            record.kind.clone(),
            record.attempt + 1,
            node.clone(),
            EventBody::Cancelled {
                reason: BEFORE_START.to_owned(),
            },
        );
        record.apply(&event);
        let value = serde_json::to_vec(&record).map_err(|e| e.to_string())?;
        match records
            .update(id.as_str(), value.into(), entry.revision)
            .await
        {
            Ok(revision) => {
                return Ok(Unheld::Cancelled {
                    event,
                    record: Box::new(record),
                    revision,
                })
            }
            // A node took it, or another cancel came first: look again.
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => continue,
            Err(e) => return Err(e.to_string()),
        }
    }
    // Still changing: the bucket reaches whoever holds it.
    Ok(Unheld::Held)
}

/// Records a cancel request for `id` (any node acts on it).
pub async fn request(cancels: &kv::Store, id: &TaskId) -> Result<(), async_nats::Error> {
    let value = serde_json::json!({ "requested_at": Timestamp::now() }).to_string();
    cancels.put(id.as_str(), value.into()).await?;
    Ok(())
}

/// Watches the bucket: remembers each request and cancels the task if this
/// node holds it.
pub async fn watch(
    cancels: kv::Store,
    pending: PendingCancels,
    dispatcher: Dispatcher,
) -> Result<JoinHandle<()>, async_nats::Error> {
    let mut entries = cancels.watch_with_history(">").await?;
    Ok(tokio::spawn(async move {
        while let Some(entry) = entries.next().await {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    warn!(error = %e, "Cancel watch interrupted.");
                    continue;
                }
            };
            if entry.operation != kv::Operation::Put {
                continue;
            }
            pending.insert(&entry.key);
            let Ok(id) = TaskId::new(entry.key.as_str()) else {
                continue;
            };
            match dispatcher.cancel(&id).await {
                Ok(outcome) => {
                    debug!(task_id = %id, outcome = outcome.as_str(), "Cancelled on request.")
                }
                Err(e) => debug!(task_id = %id, error = %e, "Cancel request: not held here."),
            }
        }
    }))
}
