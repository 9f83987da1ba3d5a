//! Cancel requests across nodes. A cancel that reaches a node not holding
//! the task is written to the KV bucket `dispatch_cancels`; every node
//! watches that bucket: the node holding the task cancels it at once, and
//! every node remembers the id so that a task still in the stream is
//! terminated, never run, when it is pulled.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use async_nats::jetstream::kv;
use dispatcher_actors::{Dispatcher, TaskId, Timestamp};
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
