//! The pull loop: one durable pull consumer per (kind, priority) this node
//! serves, shared by every node that serves that kind.
//!
//! Each consumer has one pull outstanding at a time. While it may have
//! messages (a pull just brought some), that is a no-wait pull of as many
//! as the local queue has room for, highest priority first, renewed while
//! they come back full. Otherwise it is a *waiting pull* of one message,
//! so that a task (new, or redelivered after a nak delay or a lapsed
//! lease) is pushed to the node the moment the stream has it. Waiting
//! pulls do not count against the room (a node holds at most its queue's
//! capacity plus one task per consumer), and they stay out while the
//! queue is full, so a `critical` task published behind a backlog of
//! `low` ones is pushed as soon as there is room and starts next.
//!
//! Every pull is answered on one subscription of this node's, not a
//! subscription per pull: tasks come with their consumer in their ack
//! subject, statuses on `<inbox>.<consumer>.<pull>`. A waiting pull lasts
//! `idle_poll`, then is renewed; pulls are sent anew at once when the
//! connection to the server was made anew (the server forgets a
//! connection's pulls when it goes).

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::consumer::pull::BatchConfig;
use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::Message;
use async_nats::StatusCode;
use dispatcher_actors::{Dispatcher, Priority, SubmitOptions, TaskId};
use futures::future::join_all;
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::cancels::PendingCancels;
use super::delivery::DeliveryContext;
use super::intake::Intake;
use super::records::RecordMirror;
use super::{Durable, JetStreamOptions};
use crate::codec::Limits;
use crate::inbound::Reader;
use crate::subjects::Subjects;

/// How long past its end a pull may go without an answer before it is
/// taken for lost (a no-wait pull ends at once).
const PULL_STALL: Duration = Duration::from_secs(5);

/// How often the loop looks for lost pulls and a new connection.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Messages handed to the actors at once, at most.
const HAND_OVER: usize = 512;

/// How long shutdown waits for answers to pulls already sent.
const DRAIN: Duration = Duration::from_secs(5);

/// One consumer, and what the loop asked of it.
struct Source {
    consumer: PullConsumer,
    /// The pull outstanding, if any.
    open: Option<Pull>,
    /// It may have more messages: the last pull brought some (all it
    /// asked for, if it was a no-wait pull).
    more: bool,
    /// Not pulled until the next check (the server refused a pull).
    paused: bool,
}

/// A pull the server has not finished answering.
struct Pull {
    id: u64,
    asked: usize,
    got: usize,
    waiting: bool,
    /// Taken for lost if still open then.
    deadline: Instant,
}

/// Why the consumers could not be made.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PullError(pub String);

/// Creates (or finds) the consumers and starts the loop; stop it with
/// [`Pulling::stop`].
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
    let mut sources = Vec::new();
    let mut by_name = HashMap::new();
    for priority in Priority::ALL {
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
                        max_deliver: options.max_deliveries,
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
            if info.config.max_deliver != options.max_deliveries {
                // Made by an older node without a delivery bound: update it.
                let mut config = info.config.clone();
                config.max_deliver = options.max_deliveries;
                if let Err(e) = durable.tasks.create_consumer(config).await {
                    warn!(consumer = %name, error = %e, "Delivery bound of the consumer not updated.");
                }
            }
            if info.config.filter_subject != filter {
                return Err(PullError(format!(
                    "consumer {name} filters {:?}, not {filter:?}: delete it \
                     (nats consumer rm {} {name}) and start again",
                    info.config.filter_subject,
                    durable.tasks.cached_info().config.name
                )));
            }
            by_name.insert(name, sources.len());
            sources.push(Source {
                consumer,
                open: None,
                more: true,
                paused: false,
            });
        }
    }
    let inbox = client.new_inbox();
    let answers = client
        .subscribe(format!("{inbox}.>"))
        .await
        .map_err(|e| PullError(format!("subscribing to pull answers: {e}")))?;
    let puller = Puller {
        leases: subjects.leases(dispatcher.node().as_str()),
        intake: Intake {
            reader: Reader::new(subjects, limits, dispatcher.config().defaults),
            dispatcher: dispatcher.clone(),
            ctx,
            cancels,
            mirror,
            records: durable.records.clone(),
            crash_budget: options.crash_budget,
        },
        js: durable.js.clone(),
        client,
        dispatcher,
        fetch_batch: options.fetch_batch.max(1),
        wait: options.idle_poll.max(Duration::from_millis(10)),
        inbox,
        sources,
        by_name,
        next_pull: 0,
    };
    let (stop, stopped) = watch::channel(false);
    let looping = tokio::spawn(puller.run(answers, stopped));
    Ok(Pulling { stop, looping })
}

/// The running pull loop.
pub struct Pulling {
    stop: watch::Sender<bool>,
    looping: JoinHandle<()>,
}

impl Pulling {
    /// Stops pulling: no new pulls go out, and what the pulls already sent
    /// still bring is handed to the actors (to be handed back at
    /// shutdown), not left unacknowledged until the ack wait runs out.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let mut looping = self.looping;
        if tokio::time::timeout(DRAIN * 2, &mut looping).await.is_err() {
            looping.abort();
        }
    }
}

struct Puller {
    intake: Intake,
    js: async_nats::jetstream::Context,
    client: async_nats::Client,
    leases: String,
    dispatcher: Dispatcher,
    fetch_batch: usize,
    /// How long a waiting pull lasts.
    wait: Duration,
    inbox: String,
    /// Highest priority first.
    sources: Vec<Source>,
    /// Consumer name → place in `sources`.
    by_name: HashMap<String, usize>,
    next_pull: u64,
}

impl Puller {
    async fn run(
        mut self,
        mut answers: async_nats::Subscriber,
        mut stopped: watch::Receiver<bool>,
    ) {
        let mut room = self.dispatcher.room();
        let mut check = tokio::time::interval(CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stats = self.client.statistics();
        let mut connects = stats.connects.load(std::sync::atomic::Ordering::Relaxed);
        let mut arrived = Vec::new();
        loop {
            let free = *room.borrow_and_update();
            self.plan(free).await;
            tokio::select! {
                biased;
                _ = stopped.changed() => break,
                msg = answers.next() => {
                    let Some(msg) = msg else { return };
                    self.answer(msg, &mut arrived);
                    while arrived.len() < HAND_OVER {
                        match answers.next().now_or_never() {
                            Some(Some(msg)) => self.answer(msg, &mut arrived),
                            _ => break,
                        }
                    }
                    self.hand_over(std::mem::take(&mut arrived)).await;
                }
                changed = room.changed() => if changed.is_err() { return },
                _ = check.tick() => {
                    let now = stats.connects.load(std::sync::atomic::Ordering::Relaxed);
                    self.forget_lost(now != connects);
                    connects = now;
                }
            }
        }
        // Stopped: no new pulls; take what those sent still bring.
        if let Err(e) = answers.drain().await {
            debug!(error = %e, "Pull answers not drained.");
        }
        let deadline = Instant::now() + DRAIN;
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, answers.next()).await {
            self.answer(msg, &mut arrived);
            if arrived.len() >= HAND_OVER {
                self.hand_over(std::mem::take(&mut arrived)).await;
            }
        }
        self.hand_over(arrived).await;
        // The server still holds this node's waiting pulls, and a task
        // nak'ed at shutdown that it tries on one of them first comes back
        // with its delivery count unchanged (as if the attempt had not
        // been). It drops pulls nobody listens to when it counts them:
        // asking each consumer's info makes it do so now.
        for source in &mut self.sources {
            if let Err(e) = source.consumer.info().await {
                debug!(error = %e, "Consumer info not read at stop.");
            }
        }
    }

    /// Sends a pull to each consumer with none outstanding, highest
    /// priority first, if the queue has any `room`: a no-wait pull for as
    /// many as fit (room less what no-wait pulls already asked for) to one
    /// that may have more, none if nothing fits, a waiting pull of one to
    /// the others.
    async fn plan(&mut self, room: usize) {
        if room == 0 {
            return;
        }
        let reserved: usize = self
            .sources
            .iter()
            .filter_map(|s| s.open.as_ref())
            .filter(|p| !p.waiting)
            .map(|p| p.asked - p.got)
            .sum();
        let mut free = room.saturating_sub(reserved);
        for source in 0..self.sources.len() {
            let s = &self.sources[source];
            if s.open.is_some() || s.paused {
                continue;
            }
            if s.more {
                if free == 0 {
                    // Taken when there is room again.
                    continue;
                }
                let want = free.min(self.fetch_batch);
                if self.pull(source, want, false).await {
                    free -= want;
                }
            } else {
                self.pull(source, 1, true).await;
            }
        }
    }

    /// Sends one pull; false if it could not be sent (the loop tries
    /// again after its next check).
    async fn pull(&mut self, source: usize, batch: usize, waiting: bool) -> bool {
        let id = self.next_pull;
        self.next_pull += 1;
        let config = BatchConfig {
            batch,
            expires: waiting.then_some(self.wait),
            no_wait: !waiting,
            ..Default::default()
        };
        let reply = format!("{}.{source}.{id}", self.inbox);
        let sent = self.sources[source]
            .consumer
            .request_batch(config, reply.into())
            .await;
        if let Err(e) = sent {
            warn!(error = %e, "Pull not sent.");
            return false;
        }
        let lasts = if waiting { self.wait } else { Duration::ZERO };
        let s = &mut self.sources[source];
        s.more = false;
        s.open = Some(Pull {
            id,
            asked: batch,
            got: 0,
            waiting,
            deadline: Instant::now() + lasts + PULL_STALL,
        });
        true
    }

    /// Takes one message from the answers subscription: a delivered task
    /// (into `arrived`), or a status that ends a pull.
    fn answer(&mut self, msg: async_nats::Message, arrived: &mut Vec<Message>) {
        let status = msg.status.unwrap_or(StatusCode::OK);
        if status == StatusCode::OK {
            let msg = Message {
                message: msg,
                context: self.js.clone(),
            };
            let source = msg
                .info()
                .ok()
                .and_then(|info| self.by_name.get(info.consumer).copied());
            arrived.push(msg);
            // A task of a pull given up on is handed over all the same.
            if let Some(source) = source {
                let s = &mut self.sources[source];
                if let Some(open) = s.open.as_mut() {
                    open.got += 1;
                    if open.got >= open.asked {
                        s.more = true;
                        s.open = None;
                    }
                }
            }
            return;
        }
        if status == StatusCode::IDLE_HEARTBEAT {
            return;
        }
        let refused = status != StatusCode::TIMEOUT && status != StatusCode::NOT_FOUND;
        if refused {
            debug!(status = %status, description = ?msg.description, "Pull ended by the server.");
        }
        // `<inbox>.<source>.<pull>`
        let mut tokens = msg.subject.as_str().rsplit('.');
        let id = tokens.next().and_then(|t| t.parse::<u64>().ok());
        let source = tokens.next().and_then(|t| t.parse::<usize>().ok());
        if let (Some(id), Some(s)) = (id, source.and_then(|i| self.sources.get_mut(i))) {
            if s.open.as_ref().is_some_and(|p| p.id == id) {
                // Fewer than asked (a waiting pull that brought its task
                // ends without a status): nothing more for now.
                s.open = None;
                s.more = false;
                if refused {
                    // Not asked again before the next check, so that a
                    // server that keeps refusing is not asked in a loop.
                    s.paused = true;
                }
            }
        }
    }

    /// Gives up on pulls the server should have answered by now (every
    /// pull, if the connection was made anew: the server forgot them).
    fn forget_lost(&mut self, reconnected: bool) {
        let now = Instant::now();
        let mut lost = 0;
        for s in &mut self.sources {
            s.paused = false;
            if s.open
                .as_ref()
                .is_some_and(|p| reconnected || p.deadline <= now)
            {
                s.open = None;
                s.more = true;
                lost += 1;
            }
        }
        if lost > 0 && !reconnected {
            warn!(pulls = lost, "Pulls got no answer; pulling anew.");
        }
    }

    /// Hands delivered messages to the actors, in two batches (whether the
    /// node or the gateway emitted `accepted`), not one by one.
    async fn hand_over(&self, messages: Vec<Message>) {
        if messages.is_empty() {
            return;
        }
        self.announce_leases(&messages).await;
        let (mut fresh, mut known) = (Vec::new(), Vec::new());
        // Each is checked against its record; the checks go out together.
        let taken = join_all(messages.into_iter().map(|msg| self.intake.take(msg))).await;
        for (task, handle, emit) in taken.into_iter().flatten() {
            if emit {
                fresh.push((task, handle));
            } else {
                known.push((task, handle));
            }
        }
        let ids: Vec<TaskId> = fresh
            .iter()
            .chain(&known)
            .map(|(task, _)| task.id.clone())
            .collect();
        for (batch, emit_accepted) in [(fresh, true), (known, false)] {
            if batch.is_empty() {
                continue;
            }
            let options = SubmitOptions {
                emit_accepted,
                past_capacity: true,
            };
            for r in self.dispatcher.submit_delivered_batch(batch, options).await {
                if let Err(e) = r {
                    debug!(error = %e, "Delivered task not queued.");
                }
            }
        }
        // A cancel request that came after the intake checked for one,
        // and before the Supervisor held the task, found it nowhere.
        for id in ids {
            if self.intake.cancels.contains(id.as_str()) {
                let _ = self.dispatcher.cancel(&id).await;
            }
        }
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
}
