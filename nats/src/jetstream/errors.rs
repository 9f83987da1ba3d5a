//! The cluster's error list (mode `jetstream`): every node publishes each
//! failed attempt it sees (`retrying`, `failed`, `timed_out`) to
//! `<p>.errors.<kind>`, stored by the bounded stream `<P>_ERRORS`
//! (`--max-errors` messages, the oldest dropped first, and no older than
//! the retention). The `errors` endpoint reads it newest first, so any
//! node answers for the whole cluster, and the list outlives every node.
//!
//! Publishing goes through the node's event publisher (bounded, not
//! awaited): an entry lost there is counted with the dropped events, and
//! the task's own events and record still say what happened.

use async_nats::jetstream::stream::Stream;
use dispatcher_actors::{ErrorEntry, EventSink, NodeEvent, TaskEvent, TaskKind, TaskStatus};

use super::scan::{self, ScanError};
use crate::publisher::Publisher;
use crate::subjects::Subjects;

/// Sequences one `errors` request reads at most (the stream holds
/// `--max-errors` entries; this bounds a stream made with a larger limit).
pub const MAX_SCAN: u64 = 100_000;

/// An [`EventSink`] that publishes failed attempts to the error stream.
pub struct ErrorLog {
    publisher: Publisher,
    subjects: Subjects,
}

impl ErrorLog {
    /// Publishes through `publisher`, under `subjects`.
    pub fn new(publisher: Publisher, subjects: Subjects) -> Self {
        Self {
            publisher,
            subjects,
        }
    }
}

impl EventSink for ErrorLog {
    fn task_event(&self, event: &TaskEvent) {
        let Some(entry) = ErrorEntry::of(event) else {
            return;
        };
        let Ok(body) = serde_json::to_vec(&entry) else {
            return;
        };
        self.publisher
            .send(self.subjects.error(entry.kind.as_str()), body.into());
    }

    fn node_event(&self, _event: &NodeEvent) {}
}

/// Which entries an `errors` request wants.
#[derive(Clone, Debug, Default)]
pub struct ErrorFilter {
    /// Only attempts of tasks of this kind.
    pub kind: Option<TaskKind>,
    /// Only attempts that led to this status (`retrying`, `failed`,
    /// `timed_out`).
    pub status: Option<TaskStatus>,
}

impl ErrorFilter {
    /// Whether `entry` passes.
    pub fn matches(&self, entry: &ErrorEntry) -> bool {
        self.kind.as_ref().is_none_or(|k| &entry.kind == k)
            && self.status.is_none_or(|s| entry.status == Some(s))
    }
}

/// The newest `limit` entries of the error stream that pass `filter`,
/// newest first.
pub async fn newest(
    stream: &Stream,
    filter: &ErrorFilter,
    limit: usize,
) -> Result<Vec<ErrorEntry>, ScanError> {
    let page = scan::backwards(stream, None, limit, MAX_SCAN, |msg| {
        serde_json::from_slice::<ErrorEntry>(&msg.payload)
            .ok()
            .filter(|e| filter.matches(e))
    })
    .await?;
    Ok(page.items)
}
