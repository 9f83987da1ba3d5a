//! [`Publisher`]: the [`EventSink`] that puts task and node events on
//! NATS. Each event is serialised once, on the thread where it happens, and
//! handed to a bounded buffer; one background task publishes from it. When
//! the buffer is full the event is dropped, counted and logged: events
//! never block a worker.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use dispatcher_actors::{EventSink, NodeEvent, TaskEvent};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::subjects::Subjects;

/// What the background task is handed.
enum Out {
    /// An event (or snapshot) to publish.
    Publish(String, Bytes),
    /// Tell the sender once everything before this has gone out.
    Drained(oneshot::Sender<()>),
}

/// Publishes events; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    subjects: Subjects,
    tx: mpsc::Sender<Out>,
    dropped: Arc<AtomicU64>,
}

impl Publisher {
    /// Starts the background publishing task on the current tokio runtime.
    /// `buffer` bounds the events waiting to go out.
    pub fn start(client: async_nats::Client, subjects: Subjects, buffer: usize) -> Self {
        let (tx, mut rx) = mpsc::channel::<Out>(buffer.max(1));
        tokio::spawn(async move {
            while let Some(out) = rx.recv().await {
                match out {
                    Out::Publish(subject, body) => {
                        if let Err(e) = client.publish(subject.clone(), body).await {
                            warn!(subject = %subject, error = %e, "Event not published.");
                        }
                    }
                    Out::Drained(done) => {
                        let _ = client.flush().await;
                        let _ = done.send(());
                    }
                }
            }
        });
        Self {
            subjects,
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Events dropped so far because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits until every event queued before the call has been handed to
    /// the server (published and flushed). Used at shutdown.
    pub async fn drain(&self) {
        let (done, drained) = oneshot::channel();
        if self.tx.send(Out::Drained(done)).await.is_ok() {
            let _ = drained.await;
        }
    }

    /// Queues `body` for `subject`, or counts it dropped.
    pub fn send(&self, subject: String, body: Bytes) {
        if self.tx.try_send(Out::Publish(subject, body)).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            // Log the first drop and then every thousandth, not each one.
            if n == 1 || n.is_multiple_of(1000) {
                warn!(dropped = n, "Event buffer full; events dropped.");
            }
        }
    }
}

impl EventSink for Publisher {
    fn task_event(&self, event: &TaskEvent) {
        let subject =
            self.subjects
                .event(event.kind.as_str(), event.task_id.as_str(), event.name());
        match serde_json::to_vec(event) {
            Ok(body) => self.send(subject, body.into()),
            Err(e) => warn!(task_id = %event.task_id, error = %e, "Event not serialisable."),
        }
    }

    fn node_event(&self, event: &NodeEvent) {
        let subject = self.subjects.node_event(event.node.as_str(), event.name());
        match serde_json::to_vec(event) {
            Ok(body) => self.send(subject, body.into()),
            Err(e) => warn!(node = %event.node, error = %e, "Event not serialisable."),
        }
    }
}
