//! [`Node`]: one dispatcher node on NATS — the Dispatcher's actors, the
//! event publisher, the submit gateway, ingest, and the `online`,
//! `heartbeat`, metrics and `offline` announcements. The binary's one
//! entry point into this crate. A node refuses to start with the id of
//! another live node (see [`crate::probe`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use dispatcher_actors::{
    ConfigError, Dispatcher, DispatcherConfig, EventSink, Handlers, NodeEvent, NodeEventBody,
    NodeId, ShutdownReport,
};
use serde_json::json;
use tokio::task::JoinHandle;
use tracing::info;

use crate::codec::Limits;
use crate::jetstream::cancels::{self, PendingCancels};
use crate::jetstream::cluster::{self, Cluster, HeldDeliveries};
use crate::jetstream::delivery::{Acks, DeliveryContext, DeliveryStats};
use crate::jetstream::errors::ErrorLog;
use crate::jetstream::pull::Pulling;
use crate::jetstream::records::RecordMirror;
use crate::jetstream::store::DurableStore;
use crate::jetstream::{pull, JetStreamOptions, SetupError};
use crate::probe::{self, ProbeAnswers, ProbeError};
use crate::publisher::Publisher;
use crate::service::Shared;
use crate::subjects::{InvalidPrefix, Subjects};
use crate::{gateway, ingest, jetstream, service};

/// How long shutdown waits for the last task records to be written.
const MIRROR_DRAIN: Duration = Duration::from_secs(10);

/// How tasks reach the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Queue-group subscription: at most once, lowest latency.
    Core,
    /// JetStream pull consumers: at least once, shared task state in KV.
    JetStream,
}

impl Mode {
    /// The mode's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Core => "core",
            Mode::JetStream => "jetstream",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "core" => Ok(Mode::Core),
            "jetstream" => Ok(Mode::JetStream),
            other => Err(format!("unknown mode {other:?}: use core or jetstream")),
        }
    }
}

/// The node's NATS-side settings.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// Subject prefix (`dispatch`).
    pub prefix: String,
    /// Delivery mode.
    pub mode: Mode,
    /// Body size and JSON depth limits.
    pub limits: Limits,
    /// Events waiting to be published, at most (10 000).
    pub event_buffer: usize,
    /// Interval of `heartbeat` events and metrics snapshots (5 s).
    pub heartbeat_interval: Duration,
    /// How long running tasks may take to finish at shutdown (30 s).
    pub shutdown_timeout: Duration,
    /// Submit requests processed at once (256).
    pub max_inflight_requests: usize,
    /// Streams, buckets and consumers of mode `jetstream`.
    pub jetstream: JetStreamOptions,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            prefix: "dispatch".to_owned(),
            mode: Mode::Core,
            limits: Limits::default(),
            event_buffer: 10_000,
            heartbeat_interval: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(30),
            max_inflight_requests: 256,
            jetstream: JetStreamOptions::default(),
        }
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A configuration value is out of bounds.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The subject prefix is not valid.
    #[error(transparent)]
    Prefix(#[from] InvalidPrefix),
    /// Another live node has this node's id, or asking failed.
    #[error(transparent)]
    Probe(#[from] ProbeError),
    /// JetStream could not be set up.
    #[error(transparent)]
    JetStream(#[from] SetupError),
    /// The pull consumers could not be made.
    #[error(transparent)]
    Pull(#[from] pull::PullError),
    /// The cancel bucket could not be watched.
    #[error("watching cancel requests: {0}")]
    Watch(async_nats::Error),
    /// A subscription failed.
    #[error("subscribing: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    /// The control service could not start.
    #[error("starting the control service: {0}")]
    Service(async_nats::Error),
    /// Flushing to the server failed.
    #[error("talking to the NATS server: {0}")]
    Flush(#[from] async_nats::client::FlushError),
}

/// A running node.
pub struct Node {
    dispatcher: Dispatcher,
    publisher: Publisher,
    subjects: Subjects,
    options: NodeOptions,
    service: async_nats::service::Service,
    probe: ProbeAnswers,
    pending_cancels: Option<PendingCancels>,
    acks: Option<Acks>,
    mirror: Option<RecordMirror>,
    pulling: Option<Pulling>,
    intake: Vec<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
}

/// Hands every event to several sinks.
struct Tee(Vec<Arc<dyn EventSink>>);

impl EventSink for Tee {
    fn task_event(&self, event: &dispatcher_actors::TaskEvent) {
        for sink in &self.0 {
            sink.task_event(event);
        }
    }

    fn node_event(&self, event: &NodeEvent) {
        for sink in &self.0 {
            sink.node_event(event);
        }
    }
}

impl Node {
    /// Starts a node inside a running actix System and publishes `online`
    /// once it takes tasks. First of all it makes sure that no live node has
    /// its id ([`NodeError::Probe`] if one has), and answers for the id from
    /// then on, before it takes any work or says `online`.
    pub async fn start(
        client: async_nats::Client,
        config: DispatcherConfig,
        handlers: Handlers,
        options: NodeOptions,
    ) -> Result<Node, NodeError> {
        let subjects = Subjects::new(&options.prefix)?;
        probe::ensure_unique(&client, &subjects, &config.node).await?;
        // Dropped (and so unsubscribed) if the start fails below.
        let probe = ProbeAnswers::start(client.clone(), &subjects, config.node.clone()).await?;
        let publisher = Publisher::start(client.clone(), subjects.clone(), options.event_buffer);
        let js_options = &options.jetstream;
        let held = HeldDeliveries::default();
        let mut js_parts = None;
        let (durable, sink): (_, Arc<dyn EventSink>) = if options.mode == Mode::JetStream {
            if config.keep_alive_interval >= js_options.ack_wait {
                return Err(NodeError::Config(ConfigError(format!(
                    "the keep-alive interval ({:?}) must be shorter than the ack wait ({:?})",
                    config.keep_alive_interval, js_options.ack_wait
                ))));
            }
            let durable = jetstream::setup(client.clone(), &subjects, js_options).await?;
            let mirror = RecordMirror::start(
                durable.records.clone(),
                options.event_buffer,
                js_options.record_linger,
                held.clone(),
            );
            let tee = Tee(vec![
                Arc::new(publisher.clone()),
                Arc::new(mirror.clone()),
                Arc::new(ErrorLog::new(publisher.clone(), subjects.clone())),
            ]);
            js_parts = Some(JsParts {
                held: held.clone(),
                mirror,
                deliveries: Arc::new(DeliveryStats::default()),
            });
            (Some(durable), Arc::new(tee))
        } else {
            (None, Arc::new(publisher.clone()))
        };
        let dispatcher = Dispatcher::start(config, handlers, sink)?;
        let limits = options.limits;
        let store = durable.as_ref().zip(js_parts.as_ref()).map(|(d, parts)| {
            DurableStore::new(
                d.clone(),
                subjects.clone(),
                dispatcher.clone(),
                parts.mirror.clone(),
                js_options.duplicate_window,
            )
        });
        let gateway = gateway::start(
            client.clone(),
            subjects.clone(),
            dispatcher.clone(),
            limits,
            options.max_inflight_requests,
            store,
        )
        .await?;
        let mut intake = Vec::new();
        let mut pending_cancels = None;
        let mut acks = None;
        let mut pulling = None;
        let mirror = js_parts.as_ref().map(|p| p.mirror.clone());
        match &durable {
            None => intake.push(
                ingest::start_core(client.clone(), subjects.clone(), dispatcher.clone(), limits)
                    .await?,
            ),
            Some(durable) => {
                let pending = PendingCancels::new(js_options.max_pending_cancels);
                pending_cancels = Some(pending.clone());
                intake.push(
                    cancels::watch(durable.cancels.clone(), pending.clone(), dispatcher.clone())
                        .await
                        .map_err(NodeError::Watch)?,
                );
                let stats = js_parts
                    .as_ref()
                    .map(|p: &JsParts| p.deliveries.clone())
                    .unwrap_or_default();
                let node_acks = Acks::start(client.clone(), stats.clone());
                acks = Some(node_acks.clone());
                let ctx = DeliveryContext {
                    js: durable.js.clone(),
                    subjects: subjects.clone(),
                    node: dispatcher.node().as_str().to_owned(),
                    stats,
                    held: held.clone(),
                    acks: node_acks,
                    mirror: js_parts.as_ref().map(|p| p.mirror.clone()),
                };
                pulling = Some(
                    pull::start(
                        client.clone(),
                        durable,
                        subjects.clone(),
                        dispatcher.clone(),
                        limits,
                        js_options,
                        ctx,
                        pending,
                        js_parts
                            .as_ref()
                            .map(|p| p.mirror.clone())
                            .expect("set in jetstream mode"),
                    )
                    .await?,
                );
            }
        }
        if durable.is_some() {
            intake.push(cluster::publish_leases(
                client.clone(),
                &subjects,
                dispatcher.node().as_str().to_owned(),
                held.clone(),
            ));
        }
        let (cluster, cluster_tasks) = cluster::start(
            client.clone(),
            &subjects,
            dispatcher.node().as_str().to_owned(),
            options.heartbeat_interval,
            durable.is_some(),
        )
        .await?;
        intake.extend(cluster_tasks);
        let shared = durable.as_ref().map(|d| Shared {
            records: d.records.clone(),
            cancels: d.cancels.clone(),
            tasks: d.tasks.clone(),
            errors: d.errors.clone(),
            js: d.js.clone(),
            subjects: subjects.clone(),
            reader: crate::inbound::Reader::new(
                subjects.clone(),
                limits,
                dispatcher.config().defaults,
            ),
            mirror: mirror.clone().expect("set in jetstream mode"),
        });
        let (service, mut service_tasks) = service::start(
            client.clone(),
            subjects.clone(),
            dispatcher.clone(),
            shared,
            cluster.clone(),
        )
        .await
        .map_err(NodeError::Service)?;
        let heartbeat = tokio::spawn(heartbeats(
            dispatcher.clone(),
            publisher.clone(),
            subjects.clone(),
            options.heartbeat_interval,
            js_parts,
            cluster,
        ));
        client.flush().await?;
        let node = dispatcher.node().clone();
        publisher.node_event(&NodeEvent::now(
            node.clone(),
            NodeEventBody::Online {
                workers: dispatcher.config().workers,
                version: env!("CARGO_PKG_VERSION").to_owned(),
                kinds: dispatcher.kinds(),
            },
        ));
        info!(node = %node, mode = options.mode.as_str(), prefix = subjects.prefix(), "Node online.");
        Ok(Node {
            dispatcher,
            publisher,
            subjects,
            options,
            service,
            probe,
            pending_cancels,
            acks,
            mirror,
            pulling,
            intake,
            tasks: {
                service_tasks.extend([gateway, heartbeat]);
                service_tasks
            },
        })
    }

    /// The node's Dispatcher.
    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// The node's id.
    pub fn node_id(&self) -> &NodeId {
        self.dispatcher.node()
    }

    /// The node's subjects.
    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// Whether this node knows of a cancel request for `id` (mode
    /// `jetstream`: it will not run that task if it pulls it).
    pub fn cancel_requested(&self, id: &str) -> bool {
        self.pending_cancels
            .as_ref()
            .is_some_and(|p| p.contains(id))
    }

    /// Events dropped because the publisher's buffer was full.
    pub fn dropped_events(&self) -> u64 {
        self.publisher.dropped()
    }

    /// Stops taking work, lets running tasks finish within the shutdown
    /// timeout, publishes `offline` and flushes.
    pub async fn shutdown(self) -> ShutdownReport {
        // Stop taking work first: no more pulls (the one under way hands
        // its tasks over, to be given back below), no more submissions.
        if let Some(pulling) = self.pulling {
            pulling.stop().await;
        }
        for t in self.intake.iter().chain(&self.tasks) {
            t.abort();
        }
        if let Err(e) = self.service.stop().await {
            tracing::warn!(error = %e, "Control service did not stop cleanly.");
        }
        let report = self
            .dispatcher
            .shutdown(self.options.shutdown_timeout)
            .await;
        // The naks of the hand-back go out before the node says offline.
        if let Some(acks) = &self.acks {
            acks.drain().await;
        }
        // The last tasks' records are written before the node goes.
        if let Some(mirror) = &self.mirror {
            if tokio::time::timeout(MIRROR_DRAIN, mirror.drain())
                .await
                .is_err()
            {
                tracing::warn!("Task records still unwritten at shutdown; left behind.");
            }
        }
        self.publisher.node_event(&NodeEvent::now(
            self.dispatcher.node().clone(),
            NodeEventBody::Offline {
                reason: "shutdown".to_owned(),
            },
        ));
        // The id is free once the node is offline; the drain's flush
        // carries the unsubscription to the server.
        self.probe.stop().await;
        self.publisher.drain().await;
        info!(node = %self.dispatcher.node(), "Node offline.");
        report
    }
}

/// What mode `jetstream` adds to the metrics snapshot.
struct JsParts {
    held: HeldDeliveries,
    mirror: RecordMirror,
    deliveries: Arc<DeliveryStats>,
}

async fn heartbeats(
    dispatcher: Dispatcher,
    publisher: Publisher,
    subjects: Subjects,
    every: Duration,
    js: Option<JsParts>,
    cluster: Cluster,
) {
    // The first beat goes out at once: a node that dies young is known.
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let (Ok(workers), Ok(stats), Ok(durations)) = (
            dispatcher.workers().await,
            dispatcher.stats().await,
            dispatcher.durations().await,
        ) else {
            return;
        };
        let node = dispatcher.node().clone();
        publisher.node_event(&NodeEvent::now(
            node.clone(),
            NodeEventBody::Heartbeat {
                workers,
                queued: stats.queued as usize,
                running: stats.running as usize,
            },
        ));
        let mut snapshot = json!({
            "node": node,
            "ts": dispatcher_actors::Timestamp::now(),
            "stats": stats,
            "durations": durations,
            "dropped_events": publisher.dropped(),
            "reclaimed": cluster.reclaimed(),
            // A node with no slot in service takes no work (it pulls
            // nothing): say so, for `nodes` and for operators.
            "taking_work": stats.workers > 0,
        });
        if let Some(js) = &js {
            let count = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
            let m = js.mirror.stats();
            snapshot["held"] = json!(js.held.acks());
            snapshot["records"] = json!({
                "written": count(&m.written),
                "stale": count(&m.stale),
                "dropped": count(&m.dropped),
                "failed": count(&m.failed),
            });
            snapshot["dead_lettered"] = json!(count(&js.deliveries.dead_lettered));
            snapshot["ack_failures"] = json!(count(&js.deliveries.ack_failures));
        }
        publisher.send(subjects.metrics(node.as_str()), snapshot.to_string().into());
    }
}
