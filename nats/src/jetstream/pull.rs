//! The pull loop: one durable pull consumer per (kind, priority) this node
//! serves, shared by every node that serves that kind. The loop pulls only
//! as many tasks as the local queue has room for, always the highest
//! priority first, so a `critical` task published behind a backlog of
//! `low` ones starts next.
//!
//! A pull is a request to the server, so the loop pulls only from the
//! consumers that may have something: those whose subject saw a publish (a
//! core subscription on `<p>.tasks.>` rings the bell), those whose last pull
//! came back full, and, every `idle_poll`, all of them (redeliveries after
//! a nak with delay or a lapsed lease ring no bell).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::Message;
use dispatcher_actors::{
    DeliveryHandle, Dispatcher, ErrorCode, ErrorInfo, EventBody, Priority, Settlement,
    SubmitOptions, Task, TaskRecord, TaskStatus,
};
use futures::StreamExt;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::cancels::PendingCancels;
use super::delivery::{DeliveryContext, JsDelivery};
use super::records::RecordMirror;
use super::{Durable, JetStreamOptions};
use crate::codec::{Codec, Decoded, Limits};
use crate::subjects::{Subjects, HEADER_ACCEPTED, HEADER_CONTENT_TYPE, HEADER_REPLAY};

/// How long a pull after a bell waits for the message the bell announced.
const BELL_WAIT: Duration = Duration::from_millis(20);

/// How long a pull may go without an answer before it is given up.
const PULL_STALL: Duration = Duration::from_secs(5);

/// One consumer and whether it may have messages.
struct Source {
    consumer: PullConsumer,
    maybe: Arc<AtomicBool>,
    /// Rung by the bell, but the last pull came back empty.
    recheck: AtomicBool,
    /// The bell rang for it (as opposed to the idle poll).
    rung: Arc<AtomicBool>,
}

/// Why the consumers could not be made.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PullError(pub String);

/// Creates (or finds) the consumers and starts the loop; abort the handle
/// to stop pulling.
#[allow(clippy::too_many_arguments)]
pub async fn start(
    client: async_nats::Client,
    durable: &Durable,
    subjects: Subjects,
    dispatcher: Dispatcher,
    limits: Limits,
    options: &JetStreamOptions,
    ctx: DeliveryContext,
    cancels: PendingCancels,
    mirror: RecordMirror,
) -> Result<Pulling, PullError> {
    let mut levels: Vec<Vec<Source>> = Vec::new();
    // Queue subject → (may have messages, the bell rang for it).
    type Flags = (Arc<AtomicBool>, Arc<AtomicBool>);
    let mut by_subject: HashMap<String, Flags> = HashMap::new();
    for priority in Priority::ALL {
        let mut level = Vec::new();
        for kind in dispatcher.kinds() {
            let name = subjects.consumer(&kind, priority);
            let filter = subjects.task(&kind, priority);
            let mut consumer: PullConsumer = durable
                .tasks
                .get_or_create_consumer(
                    &name,
                    pull::Config {
                        durable_name: Some(name.clone()),
                        filter_subject: filter.clone(),
                        ack_policy: AckPolicy::Explicit,
                        ack_wait: options.ack_wait,
                        max_deliver: -1,
                        max_ack_pending: options.max_ack_pending,
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| PullError(format!("creating consumer {name}: {e}")))?;
            // A server that does not know a field drops it: check that the
            // filter arrived, or the consumer would take every kind.
            let info = consumer
                .info()
                .await
                .map_err(|e| PullError(format!("reading consumer {name}: {e}")))?;
            if info.config.filter_subject != filter {
                return Err(PullError(format!(
                    "consumer {name} filters {:?}, not {filter:?}: delete it \
                     (nats consumer rm {} {name}) and start again",
                    info.config.filter_subject,
                    durable.tasks.cached_info().config.name
                )));
            }
            let maybe = Arc::new(AtomicBool::new(true));

            let rung = Arc::new(AtomicBool::new(false));
            by_subject.insert(filter, (maybe.clone(), rung.clone()));
            level.push(Source {
                consumer,
                maybe,
                recheck: AtomicBool::new(false),
                rung,
            });
        }
        levels.push(level);
    }

    let bell = Arc::new(Notify::new());
    let mut doorbell = client
        .subscribe(subjects.tasks_all())
        .await
        .map_err(|e| PullError(format!("subscribing to {}: {e}", subjects.tasks_all())))?;
    let ring = bell.clone();
    let ringer = tokio::spawn(async move {
        while let Some(msg) = doorbell.next().await {
            if let Some((maybe, rung)) = by_subject.get(msg.subject.as_str()) {
                rung.store(true, Ordering::Relaxed);
                maybe.store(true, Ordering::Relaxed);
                ring.notify_one();
            }
        }
    });

    let puller = Puller {
        mirror,
        leases: subjects.leases(dispatcher.node().as_str()),
        client: client.clone(),
        subjects,
        dispatcher,
        limits,
        ctx,
        cancels,
        fetch_batch: options.fetch_batch.max(1),
    };
    let idle_poll = options.idle_poll;
    let (stop, stopped) = watch::channel(false);
    let looping = tokio::spawn(async move { puller.run(levels, bell, idle_poll, stopped).await });
    Ok(Pulling {
        stop,
        looping,
        ringer,
    })
}

/// The running pull loop.
pub struct Pulling {
    stop: watch::Sender<bool>,
    looping: JoinHandle<()>,
    ringer: JoinHandle<()>,
}

impl Pulling {
    /// Stops pulling once the pull under way (if any) has handed its
    /// messages to the actors: a pull cut short would leave what it
    /// fetched unacknowledged until the ack wait runs out.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.ringer.abort();
        let mut looping = self.looping;
        if tokio::time::timeout(PULL_STALL * 2, &mut looping)
            .await
            .is_err()
        {
            looping.abort();
        }
    }
}

struct Puller {
    mirror: RecordMirror,
    client: async_nats::Client,
    leases: String,
    subjects: Subjects,
    dispatcher: Dispatcher,
    limits: Limits,
    ctx: DeliveryContext,
    cancels: PendingCancels,
    fetch_batch: usize,
}

impl Puller {
    async fn run(
        self,
        levels: Vec<Vec<Source>>,
        bell: Arc<Notify>,
        idle_poll: Duration,
        mut stopped: watch::Receiver<bool>,
    ) {
        let mut room = self.dispatcher.room();
        let mut poll = tokio::time::interval(idle_poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut empty_rounds = 0u32;
        loop {
            if *stopped.borrow() {
                return;
            }
            let free = *room.borrow_and_update();
            if free == 0 {
                tokio::select! {
                    changed = room.changed() => if changed.is_err() { return },
                    _ = stopped.changed() => return,
                }
                continue;
            }
            let pulled = self.round(&levels, free).await;
            if pulled > 0 {
                empty_rounds = 0;
                continue;
            }
            if levels
                .iter()
                .flatten()
                .any(|s| s.maybe.load(Ordering::Relaxed))
            {
                // A bell rang during the round.
                continue;
            }
            // A bell may ring before the stream has stored its message: a
            // consumer rung for that came back empty is looked at again
            // shortly, a few times, before the loop waits.
            let empty: Vec<&Source> = levels
                .iter()
                .flatten()
                .filter(|s| s.recheck.swap(false, Ordering::Relaxed))
                .collect();
            if !empty.is_empty() && empty_rounds < 2 {
                // Wait briefly for the message the bell announced: a pull
                // of one that returns as soon as the stream has it.
                empty_rounds += 1;
                for source in empty {
                    self.pull(source, 1, Some(BELL_WAIT)).await;
                    source.maybe.store(true, Ordering::Relaxed);
                }
                continue;
            }
            empty_rounds = 0;
            tokio::select! {
                _ = stopped.changed() => return,
                _ = bell.notified() => {}
                _ = poll.tick() => {
                    for s in levels.iter().flatten() {
                        s.maybe.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    /// Pulls from the consumers that may have messages, highest priority
    /// first, up to `free` tasks. Returns how many it pulled.
    async fn round(&self, levels: &[Vec<Source>], mut free: usize) -> usize {
        let mut pulled = 0;
        for level in levels {
            for source in level {
                if free == 0 {
                    return pulled;
                }
                if !source.maybe.swap(false, Ordering::Relaxed) {
                    continue;
                }
                let rung = source.rung.swap(false, Ordering::Relaxed);
                let want = free.min(self.fetch_batch);
                let got = self.pull(source, want, None).await;
                if got == want {
                    // Full: there is likely more.
                    source.maybe.store(true, Ordering::Relaxed);
                }
                if got == 0 && rung {
                    source.recheck.store(true, Ordering::Relaxed);
                }
                pulled += got;
                free = free.saturating_sub(got);
            }
        }
        pulled
    }

    /// Pulls up to `want` messages from `source` and hands them to the
    /// actors; answers how many. Without `wait`, a no-wait pull; with it,
    /// the pull waits that long for the first message.
    async fn pull(&self, source: &Source, want: usize, wait: Option<Duration>) -> usize {
        let batch = match wait {
            None => source.consumer.fetch().max_messages(want).messages().await,
            Some(wait) => {
                source
                    .consumer
                    .batch()
                    .max_messages(want)
                    .expires(wait)
                    .messages()
                    .await
            }
        };
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(e) => {
                warn!(error = %e, "Pull failed.");
                source.maybe.store(true, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
                return 0;
            }
        };
        let mut messages = Vec::with_capacity(want);
        loop {
            // A pull request lost in a reconnect is never answered: give
            // up on it rather than wait for ever (what it may still
            // deliver comes back after the ack wait).
            let next = tokio::time::timeout(PULL_STALL, batch.next()).await;
            match next {
                Ok(Some(Ok(msg))) => messages.push(msg),
                Ok(Some(Err(e))) => {
                    debug!(error = %e, "Pull ended early.");
                    break;
                }
                Ok(None) => break,
                Err(_) => {
                    warn!("A pull got no answer; pulling anew.");
                    source.maybe.store(true, Ordering::Relaxed);
                    break;
                }
            }
        }
        let got = messages.len();
        self.announce_leases(&messages).await;
        // Handed to the actors in two batches (whether the node or the
        // gateway emitted `accepted`), not one by one.
        let (mut fresh, mut known) = (Vec::new(), Vec::new());
        for msg in messages {
            if let Some((task, handle, emit)) = self.take(msg).await {
                if emit {
                    fresh.push((task, handle));
                } else {
                    known.push((task, handle));
                }
            }
        }
        for (batch, emit_accepted) in [(fresh, true), (known, false)] {
            if batch.is_empty() {
                continue;
            }
            for r in self
                .dispatcher
                .submit_delivered_batch(batch, SubmitOptions { emit_accepted })
                .await
            {
                if let Err(e) = r {
                    debug!(error = %e, "Delivered task not queued.");
                }
            }
        }
        got
    }

    /// Tells the other nodes, before any of them runs, which deliveries
    /// this node now holds: if it dies, they are given back at once.
    async fn announce_leases(&self, messages: &[Message]) {
        let add: Vec<&str> = messages
            .iter()
            .filter_map(|m| m.reply.as_ref().map(|r| r.as_str()))
            .collect();
        if add.is_empty() {
            return;
        }
        let body = serde_json::json!({"node": self.dispatcher.node(), "add": add}).to_string();
        if let Err(e) = self.client.publish(self.leases.clone(), body.into()).await {
            debug!(error = %e, "Leases not announced.");
        }
    }

    /// Hands one delivered message to the actors, or settles it here when
    /// it is invalid, cancelled, or out of attempts.
    async fn take(&self, msg: Message) -> Option<(Task, DeliveryHandle, bool)> {
        let delivered = msg.info().map(|i| i.delivered.max(1) as u32).unwrap_or(1);
        let ack = msg
            .reply
            .as_ref()
            .map(|r| r.to_string())
            .unwrap_or_default();
        let (msg, acker) = msg.split();
        let kind = self.subjects.token(&msg.subject, 1).map(str::to_owned);
        let priority = self
            .subjects
            .token(&msg.subject, 2)
            .and_then(Priority::parse);
        let header = |name: &str| {
            msg.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        let accepted_before = header(HEADER_ACCEPTED).is_some();
        let replay = header(HEADER_REPLAY).is_some();
        let decoded = Codec::from_content_type(header(HEADER_CONTENT_TYPE).as_deref())
            .and_then(|c| c.decode(&msg.payload, &self.limits));
        let delivery = |id: &str, kind: &str| {
            JsDelivery::new(
                acker,
                self.ctx.clone(),
                ack,
                id.to_owned(),
                kind.to_owned(),
                delivered,
                msg.payload.clone(),
            )
        };
        let mut spec = match decoded {
            Ok(Decoded::One(spec)) => *spec,
            Ok(Decoded::Batch(_)) => {
                let info = ErrorInfo::new(
                    ErrorCode::InvalidJson,
                    "one task per message on the queue; send batches to the submit subject",
                );
                self.dispatcher.reject(None, kind.as_deref(), info);
                delivery("_", "_").terminate();
                return None;
            }
            Err(e) => {
                self.dispatcher.reject(None, kind.as_deref(), e.to_info());
                delivery("_", "_").terminate();
                return None;
            }
        };
        let priority = priority.expect("consumers filter on valid priorities");
        if let Some(p) = spec.priority.as_deref().filter(|p| *p != priority.as_str()) {
            let info = ErrorInfo::field(
                ErrorCode::InvalidField,
                "priority",
                format!(
                    "priority {p:?} in the body differs from priority {:?} of the subject",
                    priority.as_str()
                ),
            );
            self.dispatcher
                .reject(spec.id.as_deref(), kind.as_deref(), info);
            delivery("_", "_").terminate();
            return None;
        }
        spec.priority = Some(priority.as_str().to_owned());
        // Only the id is kept for a refusal: the payload is not copied.
        let spec_id = spec.id.clone();
        let mut task = match self.dispatcher.validate(spec, kind.as_deref()) {
            Ok(task) => task,
            Err(info) => {
                self.dispatcher
                    .reject(spec_id.as_deref(), kind.as_deref(), info);
                delivery("_", "_").terminate();
                return None;
            }
        };
        task.attempt = delivered;
        let id = task.id.as_str().to_owned();
        let kind = task.kind.as_str().to_owned();
        if self.cancels.contains(&id) {
            self.dispatcher.announce(
                &task,
                EventBody::Cancelled {
                    reason: "cancelled on request before it started".to_owned(),
                },
            );
            delivery(&id, &kind).settle_now(Settlement::Done(TaskStatus::Cancelled, None));
            return None;
        }
        if delivered > task.max_attempts {
            // Delivered again after its last attempt began: the node that
            // held it stopped before it ended.
            task.attempt = task.max_attempts;
            let error = ErrorInfo::new(
                ErrorCode::WorkerCrashed,
                format!(
                    "delivered {delivered} times, past max_attempts {}: the node running \
                     its last attempt stopped",
                    task.max_attempts
                ),
            );
            self.dispatcher.announce(
                &task,
                EventBody::Failed {
                    error: error.clone(),
                    duration_ms: 0,
                },
            );
            delivery(&id, &kind).settle_now(Settlement::Done(TaskStatus::Failed, Some(error)));
            return None;
        }
        if replay && delivered == 1 {
            self.dispatcher.forget_finished(&task.id).await;
        }
        let emit_accepted = delivered == 1 && !accepted_before;
        if emit_accepted {
            // Published straight to the queue: no record yet.
            let mut record = TaskRecord::queued(&task, self.dispatcher.node());
            record.node = None;
            self.mirror.seed(record, None);
        }
        let handle = DeliveryHandle::new(delivery(&id, &kind));
        Some((task, handle, emit_accepted))
    }
}
