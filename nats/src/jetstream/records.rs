//! The KV mirror of task records (bucket `dispatch_tasks`, key = task id,
//! value = the record of PROTOCOL.md). Whichever node holds a task writes
//! its record, off the hot path: events go into a bounded buffer, and a
//! writer folds them into one KV write per task.
//!
//! A change that ends a task is written at once. Any other (queued,
//! running, retrying) waits up to `linger` for what follows, so a task that
//! ends within it costs one write, not one per step: a short task's record
//! goes from `queued` (or nothing, if it was published straight to the
//! queue) to its end, and a long one's shows `running` at most `linger`
//! after it started.
//!
//! Progress is folded in the same way, throttled: a task's progress alone
//! is written at most once per [`PROGRESS_EVERY`] (and never sooner than
//! `linger` after it was reported), and whatever progress waits is folded
//! into the task's next write, so its last value is in the record no later
//! than the write that ends it. Only a task's latest progress is kept
//! between writes ([`LatestProgress`]): a handler that reports in a tight
//! loop costs the writer one entry per task, not one per report.
//!
//! Writes are fenced by revision: a node that lost a task to redelivery
//! (its lease lapsed, another node runs a later attempt) finds a newer
//! attempt in KV and discards its stale write, counted in `stale`.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{self, UpdateErrorKind};
use dispatcher_actors::{EventBody, EventSink, NodeEvent, TaskEvent, TaskRecord, TaskStatus};
use futures::future::join_all;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::cluster::HeldDeliveries;
use progress::LatestProgress;

mod progress;

/// Operations the writer takes from its buffer at a time.
const BATCH: usize = 512;
/// Tries of one fenced update before giving up; failures other than a
/// stale revision (the server is away) back off from 100 ms, doubling, so
/// the tries span about 25 s.
const TRIES: usize = 8;
/// Records of unfinished tasks kept with their revision, so the next write
/// of the same task needs no read; past this the cache starts over.
const CACHE: usize = 100_000;

/// A task's progress alone is written at most once per this interval (a
/// constant, not derived from the linger: the linger bounds how stale a
/// state change may be, this how often a long task's record is rewritten).
pub const PROGRESS_EVERY: Duration = Duration::from_millis(500);

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
    /// The task's latest progress waits in [`LatestProgress`].
    Progress(String),
    /// A record to start from: stored already at `revision` (by the
    /// gateway of this node), or, without one, to create if absent (a task
    /// published straight to the queue has no record yet).
    Seed(Box<TaskRecord>, Option<u64>),
    /// Write everything pending now, then say so.
    Drain(oneshot::Sender<()>),
    /// Write this task's pending changes now, then say so.
    Flush(String, oneshot::Sender<()>),
}

/// An [`EventSink`] that mirrors task events into KV records.
#[derive(Clone)]
pub struct RecordMirror {
    tx: mpsc::Sender<Op>,
    stats: Arc<MirrorStats>,
    progress: LatestProgress,
}

impl RecordMirror {
    /// Starts the writer; `buffer` bounds the events waiting, `linger` is
    /// how long a change that does not end its task may wait for the next
    /// one. A running task's record names the ack subject of its delivery
    /// (from `held`), so that a live node can give it back if this one
    /// dies.
    pub fn start(
        records: kv::Store,
        buffer: usize,
        linger: Duration,
        held: HeldDeliveries,
    ) -> Self {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let stats = Arc::new(MirrorStats::default());
        let progress = LatestProgress::default();
        let writer = Writer {
            records,
            stats: stats.clone(),
            held,
            linger,
            progress: progress.clone(),
            pending: HashMap::new(),
            due: BinaryHeap::new(),
            ready: Vec::new(),
            cache: HashMap::new(),
        };
        tokio::spawn(writer.run(rx));
        Self {
            tx,
            stats,
            progress,
        }
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

    /// Waits until the changes of task `id` handed over before the call
    /// are written (or given up on), at most `within`. A delivery that
    /// comes back for another attempt is handed back only once the record
    /// says which attempt ended, so the next one is counted right.
    pub async fn flush(&self, id: &str, within: Duration) {
        let (done, flushed) = oneshot::channel();
        if self.tx.send(Op::Flush(id.to_owned(), done)).await.is_ok() {
            let _ = tokio::time::timeout(within, flushed).await;
        }
    }

    /// Waits until every change handed over before the call is written
    /// (or given up on). Used at shutdown.
    pub async fn drain(&self) {
        let (done, drained) = oneshot::channel();
        if self.tx.send(Op::Drain(done)).await.is_ok() {
            let _ = drained.await;
        }
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
        match event.body {
            // The gateway wrote the queued record; a rejected task has no
            // record.
            EventBody::Accepted { .. } | EventBody::Rejected { .. } => {}
            // Only the latest counts: kept aside, and the writer told once.
            // Should the buffer be full, the next report tells it, and the
            // task's next change folds it in anyway.
            EventBody::Progress { .. } => {
                let id = event.task_id.as_str();
                if self.progress.put(event) && self.tx.try_send(Op::Progress(id.to_owned())).is_ok()
                {
                    self.progress.told(id);
                }
            }
            _ => self.send(Op::Event(event.clone())),
        }
    }

    fn node_event(&self, _event: &NodeEvent) {}
}

/// A task's changes not written yet.
struct Pending {
    /// The record to start from, from the latest seed.
    seed: Option<(Box<TaskRecord>, Option<u64>)>,
    /// Events to apply, in order.
    events: Vec<TaskEvent>,
    /// When they are to be written at the latest.
    due: Instant,
}

/// Folds changes into records and writes them.
struct Writer {
    records: kv::Store,
    stats: Arc<MirrorStats>,
    held: HeldDeliveries,
    linger: Duration,
    /// Progress reported and not folded in yet.
    progress: LatestProgress,
    /// Changes not written yet, by task.
    pending: HashMap<String, Pending>,
    /// When pending tasks are due, soonest first. An entry whose time is
    /// no longer its task's `due` (the task was written since, or is due
    /// sooner now) is skipped.
    due: BinaryHeap<Reverse<(Instant, String)>>,
    /// Tasks to write in the next round: they ended.
    ready: Vec<String>,
    /// Records of unfinished tasks as last written, and when they were.
    cache: HashMap<String, (Cached, Option<Instant>)>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        let mut ops = Vec::with_capacity(BATCH);
        let mut drains = Vec::new();
        let mut open = true;
        loop {
            if open && self.ready.is_empty() {
                let next = self.due.peek().map(|Reverse((at, _))| *at);
                tokio::select! {
                    n = rx.recv_many(&mut ops, BATCH) => open = n > 0,
                    _ = sleep_until(next) => {}
                }
            }
            // Whatever else waits, without waiting for more.
            while open && ops.len() < BATCH {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            let now = Instant::now();
            let mut flushes = Vec::new();
            for op in ops.drain(..) {
                match op {
                    Op::Drain(done) => drains.push(done),
                    Op::Flush(id, done) => {
                        if self.pending.contains_key(&id) {
                            self.ready.push(id);
                        }
                        flushes.push(done);
                    }
                    op => self.fold(op, now),
                }
            }
            let all = !drains.is_empty() || !open;
            let round = self.take_round(now, all);
            if !round.is_empty() {
                self.write_round(round).await;
            }
            for done in flushes {
                let _ = done.send(());
            }
            if all && self.pending.is_empty() {
                for done in drains.drain(..) {
                    let _ = done.send(());
                }
                if !open {
                    return;
                }
            }
        }
    }

    fn fold(&mut self, op: Op, now: Instant) {
        let (id, ends, throttled) = match &op {
            Op::Event(e) => (
                e.task_id.as_str().to_owned(),
                e.body.status().is_some_and(|s| s.is_final()),
                false,
            ),
            Op::Progress(id) => (id.clone(), false, true),
            Op::Seed(r, _) => (r.id.as_str().to_owned(), false, false),
            Op::Drain(_) | Op::Flush(..) => return,
        };
        // Progress reported before a change that ends an attempt goes in
        // first. (Progress never comes before its attempt's start: if
        // some waits, it came after, and its own word is on its way.)
        let progress = match &op {
            Op::Event(e) if !ends_attempt(&e.body) => None,
            Op::Seed(..) | Op::Drain(_) | Op::Flush(..) => None,
            Op::Event(_) | Op::Progress(_) => self.progress.take(&id),
        };
        if matches!(op, Op::Progress(_)) && progress.is_none() {
            // Folded in already, with a change that came first.
            return;
        }
        let mut due = now + self.linger;
        if throttled {
            if let Some((_, Some(written))) = self.cache.get(&id) {
                due = due.max(*written + PROGRESS_EVERY);
            }
        }
        let pending = match self.pending.entry(id.clone()) {
            Entry::Occupied(entry) => {
                let pending = entry.into_mut();
                if due < pending.due {
                    pending.due = due;
                    self.due.push(Reverse((due, id.clone())));
                }
                pending
            }
            Entry::Vacant(entry) => {
                self.due.push(Reverse((due, id.clone())));
                entry.insert(Pending {
                    seed: None,
                    events: Vec::new(),
                    due,
                })
            }
        };
        if ends {
            self.ready.push(id);
        }
        pending.events.extend(progress);
        match op {
            Op::Event(e) => pending.events.push(e),
            Op::Seed(record, revision) => pending.seed = Some((record, revision)),
            Op::Progress(_) | Op::Drain(_) | Op::Flush(..) => {}
        }
    }

    /// The tasks to write now: those that ended, those due, and with
    /// `all`, every one.
    fn take_round(&mut self, now: Instant, all: bool) -> Vec<(String, Pending)> {
        if all {
            self.due.clear();
            self.ready.clear();
            return self.pending.drain().collect();
        }
        let mut round = Vec::new();
        for id in std::mem::take(&mut self.ready) {
            if let Some(p) = self.pending.remove(&id) {
                round.push((id, p));
            }
        }
        while let Some(Reverse((at, _))) = self.due.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, id))) = self.due.pop() else {
                break;
            };
            if self.pending.get(&id).is_some_and(|p| p.due == at) {
                if let Some(p) = self.pending.remove(&id) {
                    round.push((id, p));
                }
            }
        }
        round
    }

    /// Writes each task's changes, the tasks concurrently.
    async fn write_round(&mut self, round: Vec<(String, Pending)>) {
        if self.cache.len() > CACHE {
            self.cache.clear();
        }
        let (records, stats) = (&self.records, &*self.stats);
        let writes = round.into_iter().map(|(id, pending)| {
            let ack = self.held.ack_of(&id);
            let (cached, written) = self.cache.remove(&id).unzip();
            // Only changes make a write; a seed alone does not.
            let writes = !pending.events.is_empty();
            async move {
                let kept = write_one(records, &id, pending, ack, cached, stats).await;
                let written = if writes {
                    Some(Instant::now())
                } else {
                    written.flatten()
                };
                (id, kept, written)
            }
        });
        for (id, kept, written) in join_all(writes).await {
            if let Some(kept) = kept {
                self.cache.insert(id, (kept, written));
            }
        }
    }
}

/// Whether `body` ends an attempt (its end or a retry).
fn ends_attempt(body: &EventBody) -> bool {
    body.status()
        .is_some_and(|s| s.is_final() || s == TaskStatus::Retrying)
}

/// Sleeps until `at`, or for ever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Writes one task's pending changes: from its seed if it has one (a
/// record to create, with its events applied first, costs one write),
/// else from the cached copy or the stored record.
async fn write_one(
    records: &kv::Store,
    id: &str,
    pending: Pending,
    ack: Option<String>,
    mut cached: Option<Cached>,
    stats: &MirrorStats,
) -> Option<Cached> {
    let Pending { seed, events, .. } = pending;
    match seed {
        Some((record, Some(revision))) => cached = Some((*record, revision)),
        Some((mut record, None)) => {
            if let Some(value) = fold_in(&mut record, &events, ack.as_deref()) {
                // Absent: this is the record; present (another node made
                // it, or the server was away): fold the events into what
                // is there, fenced.
                if let Ok(revision) = records.create(id, value.into()).await {
                    stats.written.fetch_add(1, Ordering::Relaxed);
                    return (!record.status.is_final()).then_some((*record, revision));
                }
            }
        }
        None => {}
    }
    if events.is_empty() {
        return cached;
    }
    apply(records, id, events, ack, cached, stats).await
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
            // already there: this write is stale, unless that end is the
            // very one these events bring (the control API wrote the
            // cancel of a task no node held before it said so).
            let ends_so = events.last().and_then(TaskEvent::status) == Some(record.status);
            if !(ends_so && record.attempt == attempt) {
                stats.stale.fetch_add(1, Ordering::Relaxed);
            }
            return None;
        }
        let value = fold_in(&mut record, &events, ack.as_deref())?;
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

/// Applies `events` (in order) to `record` and encodes it as stored, with
/// `ack` if the task is still running.
fn fold_in(record: &mut TaskRecord, events: &[TaskEvent], ack: Option<&str>) -> Option<Vec<u8>> {
    for event in events {
        record.apply(event);
        record.node = Some(event.node.clone());
    }
    let stored = Stored {
        record,
        ack: ack.filter(|_| !record.status.is_final()),
    };
    serde_json::to_vec(&stored).ok()
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
