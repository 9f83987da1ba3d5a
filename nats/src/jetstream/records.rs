//! The KV mirror of task records (bucket `dispatch_tasks`, key = task id,
//! value = the record of PROTOCOL.md). Whichever node holds a task writes
//! its record at every change of state, off the hot path: events go into a
//! bounded buffer, and a writer applies them in batches, one KV update per
//! task per batch, the tasks of a batch concurrently.
//!
//! Writes are fenced by revision: a node that lost a task to redelivery
//! (its lease lapsed, another node runs a later attempt) finds a newer
//! attempt in KV and discards its stale write, counted in `stale`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{self, UpdateErrorKind};
use dispatcher_actors::{EventBody, EventSink, NodeEvent, TaskEvent, TaskRecord};
use futures::future::join_all;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::cluster::HeldDeliveries;

/// Events a batch takes at most.
const BATCH: usize = 512;
/// Tries of one fenced update before giving up; failures other than a
/// stale revision (the server is away) back off from 100 ms, doubling, so
/// the tries span about 25 s.
const TRIES: usize = 8;
/// Records of unfinished tasks kept with their revision, so the next write
/// of the same task needs no read; past this the cache starts over.
const CACHE: usize = 100_000;

/// A record as this node last wrote it, and its revision.
type Cached = (TaskRecord, u64);

/// Counters of the mirror.
#[derive(Debug, Default)]
pub struct MirrorStats {
    /// Records written.
    pub written: AtomicU64,
    /// Writes discarded because KV held a newer attempt.
    pub stale: AtomicU64,
    /// Events dropped because the buffer was full.
    pub dropped: AtomicU64,
    /// Writes that failed.
    pub failed: AtomicU64,
}

/// What the writer is handed.
enum Op {
    /// A task event to fold into the record.
    Event(TaskEvent),
    /// A record to start from: stored already at `revision` (by the
    /// gateway of this node), or, without one, to create if absent (a task
    /// published straight to the queue has no record yet).
    Seed(Box<TaskRecord>, Option<u64>),
}

impl Op {
    fn task_id(&self) -> &str {
        match self {
            Op::Event(e) => e.task_id.as_str(),
            Op::Seed(r, _) => r.id.as_str(),
        }
    }
}

/// An [`EventSink`] that mirrors task events into KV records.
#[derive(Clone)]
pub struct RecordMirror {
    tx: mpsc::Sender<Op>,
    stats: Arc<MirrorStats>,
}

impl RecordMirror {
    /// Starts the writer; `buffer` bounds the events waiting. A running
    /// task's record names the ack subject of its delivery (from `held`),
    /// so that a live node can give it back if this one dies.
    pub fn start(records: kv::Store, buffer: usize, held: HeldDeliveries) -> Self {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let stats = Arc::new(MirrorStats::default());
        tokio::spawn(write(records, rx, stats.clone(), held));
        Self { tx, stats }
    }

    /// The counters.
    pub fn stats(&self) -> &MirrorStats {
        &self.stats
    }

    /// Hands the writer a task's first record: stored at `revision`
    /// already, or (without) to be created if absent. Saves a read.
    pub fn seed(&self, record: TaskRecord, revision: Option<u64>) {
        self.send(Op::Seed(Box::new(record), revision));
    }

    fn send(&self, op: Op) {
        if self.tx.try_send(op).is_err() {
            let n = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n == 1 || n.is_multiple_of(1000) {
                warn!(
                    dropped = n,
                    "Record mirror buffer full; record updates dropped."
                );
            }
        }
    }
}

impl EventSink for RecordMirror {
    fn task_event(&self, event: &TaskEvent) {
        // The gateway wrote the queued record; progress is not worth a
        // write each; a rejected task has no record.
        if matches!(
            event.body,
            EventBody::Accepted { .. } | EventBody::Progress { .. } | EventBody::Rejected { .. }
        ) {
            return;
        }
        self.send(Op::Event(event.clone()));
    }

    fn node_event(&self, _event: &NodeEvent) {}
}

async fn write(
    records: kv::Store,
    mut rx: mpsc::Receiver<Op>,
    stats: Arc<MirrorStats>,
    held: HeldDeliveries,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut cache: HashMap<String, Cached> = HashMap::new();
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let mut by_task: HashMap<String, Vec<Op>> = HashMap::new();
        for op in batch.drain(..) {
            by_task.entry(op.task_id().to_owned()).or_default().push(op);
        }
        if cache.len() > CACHE {
            cache.clear();
        }
        let written = join_all(by_task.into_iter().map(|(id, ops)| {
            let ack = held.ack_of(&id);
            let cached = cache.remove(&id);
            async {
                let (cached, events) = seed(&records, &id, ops, cached).await;
                let kept = if events.is_empty() {
                    cached
                } else {
                    apply(&records, &id, events, ack, cached, &stats).await
                };
                (id, kept)
            }
        }))
        .await;
        for (id, kept) in written {
            if let Some(kept) = kept {
                cache.insert(id, kept);
            }
        }
    }
}

/// Takes the seeds among `ops` (creating records where asked); answers
/// the record to start from and the events to apply.
async fn seed(
    records: &kv::Store,
    id: &str,
    ops: Vec<Op>,
    mut cached: Option<Cached>,
) -> (Option<Cached>, Vec<TaskEvent>) {
    let mut events = Vec::new();
    for op in ops {
        match op {
            Op::Event(e) => events.push(e),
            Op::Seed(record, Some(revision)) => cached = Some((*record, revision)),
            Op::Seed(record, None) => {
                let Ok(value) = serde_json::to_vec(&*record) else {
                    continue;
                };
                // Absent: this is the record; present (or the server away):
                // read what is there when it is needed.
                if let Ok(revision) = records.create(id, value.into()).await {
                    cached = Some((*record, revision));
                }
            }
        }
    }
    (cached, events)
}

/// Applies `events` (in order) to the stored record of `id`, starting
/// from the cached copy when there is one (a stale revision makes the
/// update fail, and the record is read afresh). Answers the record and
/// revision written, if the task is not finished.
async fn apply(
    records: &kv::Store,
    id: &str,
    events: Vec<TaskEvent>,
    ack: Option<String>,
    mut cached: Option<Cached>,
    stats: &MirrorStats,
) -> Option<Cached> {
    let attempt = events.iter().map(|e| e.attempt).max().unwrap_or(0);
    let mut pause = Duration::from_millis(100);
    for _ in 0..TRIES {
        let (mut record, revision) = match cached.take() {
            Some(cached) => cached,
            None => match read(records, id).await {
                Read::Found(cached) => *cached,
                Read::Gone => return None,
                Read::Failed => {
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                    continue;
                }
            },
        };
        if record.attempt > attempt || (record.attempt == attempt && record.status.is_final()) {
            // A later attempt (another node) or this attempt's end is
            // already there: this write is stale.
            stats.stale.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        for event in &events {
            record.apply(event);
            record.node = Some(event.node.clone());
        }
        let stored = Stored {
            record: &record,
            ack: ack.as_deref().filter(|_| !record.status.is_final()),
        };
        let Ok(value) = serde_json::to_vec(&stored) else {
            return None;
        };
        match records.update(id, value.into(), revision).await {
            Ok(revision) => {
                stats.written.fetch_add(1, Ordering::Relaxed);
                return (!record.status.is_final()).then_some((record, revision));
            }
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => continue,
            Err(e) => {
                debug!(task_id = %id, error = %e, "Record not written; trying again.");
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
        }
    }
    warn!(task_id = %id, "Record not written after {TRIES} tries.");
    stats.failed.fetch_add(1, Ordering::Relaxed);
    None
}

/// A record as stored: the record of PROTOCOL.md, and the ack subject of
/// a running task's delivery. Serialised once, without an intermediate
/// JSON value.
#[derive(serde::Serialize)]
struct Stored<'a> {
    #[serde(flatten)]
    record: &'a TaskRecord,
    #[serde(skip_serializing_if = "Option::is_none")]
    ack: Option<&'a str>,
}

/// What reading a record found.
enum Read {
    Found(Box<Cached>),
    /// No record (expired, never stored, unreadable): nothing to update.
    Gone,
    /// The server did not answer.
    Failed,
}

/// The stored record of `id` and its revision.
async fn read(records: &kv::Store, id: &str) -> Read {
    let entry = match records.entry(id).await {
        Ok(Some(entry)) if entry.operation == kv::Operation::Put => entry,
        Ok(_) => {
            debug!(task_id = %id, "No record to update (expired or never stored).");
            return Read::Gone;
        }
        Err(e) => {
            debug!(task_id = %id, error = %e, "Record not read; trying again.");
            return Read::Failed;
        }
    };
    match serde_json::from_slice::<TaskRecord>(&entry.value) {
        Ok(record) => Read::Found(Box::new((record, entry.revision))),
        Err(_) => {
            warn!(task_id = %id, "Stored record unreadable; not updated.");
            Read::Gone
        }
    }
}
