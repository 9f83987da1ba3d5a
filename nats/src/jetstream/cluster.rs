//! The cluster as one node sees it, and fast reclaim of a dead node's
//! tasks.
//!
//! Every node publishes a metrics snapshot with each heartbeat, listing the
//! ack subjects of the deliveries it holds (`held`), and the same list on
//! `<p>.leases.<node>` whenever it changes (at most every 200 ms). Every
//! node keeps the latest of these for every other. A node whose snapshots stop for three
//! heartbeat intervals without an `offline` event is dead: the live node
//! with the smallest id naks every delivery the dead node held (from its
//! last snapshot, and from the KV records of tasks it was running), so
//! JetStream redelivers them at once instead of after `AckWait`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use dispatcher_actors::NodeEventName;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::subjects::Subjects;

/// Missed heartbeat intervals after which a node is taken for dead.
pub const MISSED_HEARTBEATS: u32 = 3;
/// Ack subjects remembered per node at most (deltas between full lists).
const MAX_HELD: usize = 100_000;
/// Records a reclaim reads at most, looking for the dead node's tasks.
const MAX_RECLAIM_SCAN: usize = 100_000;

/// How often a node publishes its leases when they changed.
pub const LEASES_EVERY: Duration = Duration::from_millis(200);

/// Deliveries this node holds: task id → ack subject.
#[derive(Clone, Default)]
pub struct HeldDeliveries {
    map: Arc<Mutex<HashMap<String, String>>>,
    changes: Arc<AtomicU64>,
}

impl HeldDeliveries {
    /// Notes a delivery.
    pub fn insert(&self, id: &str, ack: &str) {
        self.map
            .lock()
            .expect("not poisoned")
            .insert(id.to_owned(), ack.to_owned());
        self.changes.fetch_add(1, Ordering::Relaxed);
    }

    /// Forgets a delivery (settled).
    pub fn remove(&self, id: &str, ack: &str) {
        let mut held = self.map.lock().expect("not poisoned");
        if held.get(id).is_some_and(|a| a == ack) {
            held.remove(id);
            self.changes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Changes so far (to publish only when something changed).
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    /// The ack subject of `id`'s delivery, if held.
    pub fn ack_of(&self, id: &str) -> Option<String> {
        self.map.lock().expect("not poisoned").get(id).cloned()
    }

    /// Every ack subject held.
    pub fn acks(&self) -> Vec<String> {
        self.map
            .lock()
            .expect("not poisoned")
            .values()
            .cloned()
            .collect()
    }
}

/// Publishes this node's leases on `<p>.leases.<node>` whenever they
/// changed, at most every [`LEASES_EVERY`], so that a node that dies is
/// known to have held what it pulled a moment before.
pub fn publish_leases(
    client: async_nats::Client,
    subjects: &Subjects,
    node: String,
    held: HeldDeliveries,
) -> JoinHandle<()> {
    let subject = subjects.leases(&node);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(LEASES_EVERY);
        let mut published = 0;
        loop {
            tick.tick().await;
            let changes = held.changes();
            if changes == published {
                continue;
            }
            published = changes;
            let body = json!({"node": node, "held": held.acks()}).to_string();
            if let Err(e) = client.publish(subject.clone(), body.into()).await {
                warn!(error = %e, "Leases not published.");
            }
        }
    })
}

/// What is known of one node.
#[derive(Clone, Debug)]
struct Peer {
    last_seen: Instant,
    snapshot: Value,
    held: Vec<String>,
    gone: bool,
}

/// The cluster view: live nodes, their latest figures, reclaims done.
#[derive(Clone)]
pub struct Cluster {
    me: String,
    peers: Arc<Mutex<BTreeMap<String, Peer>>>,
    reclaimed: Arc<AtomicU64>,
    interval: Duration,
}

impl Cluster {
    /// Nodes seen alive, with their latest metrics snapshot.
    pub fn nodes(&self) -> Vec<Value> {
        let peers = self.peers.lock().expect("not poisoned");
        peers
            .iter()
            .filter(|(_, p)| !p.gone)
            .map(|(id, p)| {
                json!({
                    "node": id,
                    "seen_ms_ago": p.last_seen.elapsed().as_millis() as u64,
                    "stats": p.snapshot.get("stats").cloned().unwrap_or(Value::Null),
                })
            })
            .collect()
    }

    /// Deliveries naked on behalf of dead nodes so far.
    pub fn reclaimed(&self) -> u64 {
        self.reclaimed.load(Ordering::Relaxed)
    }

    /// Nodes taken for dead now (not seen for the missed intervals and not
    /// gone already), if this node is the one to reclaim for them.
    fn dead_to_reclaim(&self) -> Vec<(String, Vec<String>)> {
        let limit = self.interval * MISSED_HEARTBEATS;
        let mut peers = self.peers.lock().expect("not poisoned");
        let live_min = peers
            .iter()
            .filter(|(id, p)| !p.gone && (p.last_seen.elapsed() < limit || **id == self.me))
            .map(|(id, _)| id.clone())
            .chain([self.me.clone()])
            .min();
        let mine = live_min.as_deref() == Some(self.me.as_str());
        let mut dead = Vec::new();
        for (id, peer) in peers.iter_mut() {
            if *id != self.me && !peer.gone && peer.last_seen.elapsed() >= limit {
                peer.gone = true;
                if mine {
                    dead.push((id.clone(), std::mem::take(&mut peer.held)));
                }
            }
        }
        dead
    }
}

/// Starts watching the cluster; the returned tasks run until aborted.
/// With `records` (mode `jetstream`) it also reclaims dead nodes' tasks.
pub async fn start(
    client: async_nats::Client,
    subjects: &Subjects,
    me: String,
    interval: Duration,
    records: Option<kv::Store>,
) -> Result<(Cluster, Vec<JoinHandle<()>>), async_nats::SubscribeError> {
    let cluster = Cluster {
        me,
        peers: Arc::new(Mutex::new(BTreeMap::new())),
        reclaimed: Arc::new(AtomicU64::new(0)),
        interval,
    };
    let mut metrics = client.subscribe(subjects.metrics("*")).await?;
    let mut offline = client
        .subscribe(subjects.node_event("*", NodeEventName::Offline))
        .await?;
    let mut online = client
        .subscribe(subjects.node_event("*", NodeEventName::Online))
        .await?;
    let mut leases = client.subscribe(subjects.leases_any()).await?;
    let view = cluster.clone();
    let listen = tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(msg) = metrics.next() => {
                    let Ok(snapshot) = serde_json::from_slice::<Value>(&msg.payload) else { continue };
                    let Some(node) = snapshot["node"].as_str().map(str::to_owned) else { continue };
                    let held = snapshot["held"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
                        .unwrap_or_default();
                    view.peers.lock().expect("not poisoned").insert(
                        node,
                        Peer { last_seen: Instant::now(), snapshot, held, gone: false },
                    );
                }
                Some(msg) = leases.next() => {
                    // A full list (`held`) replaces; a delta (`add`) adds.
                    let Ok(body) = serde_json::from_slice::<Value>(&msg.payload) else { continue };
                    let Some(node) = body["node"].as_str() else { continue };
                    let strings = |v: &Value| -> Vec<String> {
                        v.as_array()
                            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
                            .unwrap_or_default()
                    };
                    let mut peers = view.peers.lock().expect("not poisoned");
                    let peer = peers.entry(node.to_owned()).or_insert_with(|| Peer {
                        last_seen: Instant::now(),
                        snapshot: Value::Null,
                        held: Vec::new(),
                        gone: false,
                    });
                    peer.last_seen = Instant::now();
                    if body.get("held").is_some() {
                        peer.held = strings(&body["held"]);
                    }
                    peer.held.extend(strings(&body["add"]));
                    if peer.held.len() > MAX_HELD {
                        let excess = peer.held.len() - MAX_HELD;
                        peer.held.drain(..excess);
                    }
                }
                Some(msg) = online.next() => {
                    // Known from its first breath, before its first snapshot.
                    let Ok(event) = serde_json::from_slice::<Value>(&msg.payload) else { continue };
                    let Some(node) = event["node"].as_str() else { continue };
                    view.peers.lock().expect("not poisoned").insert(
                        node.to_owned(),
                        Peer { last_seen: Instant::now(), snapshot: Value::Null, held: Vec::new(), gone: false },
                    );
                }
                Some(msg) = offline.next() => {
                    if let Ok(event) = serde_json::from_slice::<Value>(&msg.payload) {
                        if let Some(node) = event["node"].as_str() {
                            if let Some(p) = view.peers.lock().expect("not poisoned").get_mut(node) {
                                p.gone = true;
                            }
                        }
                    }
                }
                else => return,
            }
        }
    });
    let Some(records) = records else {
        return Ok((cluster, vec![listen]));
    };
    let view = cluster.clone();
    let watchdog = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            for (node, held) in view.dead_to_reclaim() {
                let n = reclaim(&client, &records, &node, held).await;
                view.reclaimed.fetch_add(n, Ordering::Relaxed);
                info!(node = %node, naked = n, "Node missed {MISSED_HEARTBEATS} heartbeats; its tasks go back to the queue.");
            }
        }
    });
    Ok((cluster, vec![listen, watchdog]))
}

/// Naks every delivery `node` held: from its last snapshot, and from the
/// records of tasks it was running. Answers how many naks went out.
async fn reclaim(
    client: &async_nats::Client,
    records: &kv::Store,
    node: &str,
    held: Vec<String>,
) -> u64 {
    let mut acks: std::collections::BTreeSet<String> = held.into_iter().collect();
    match records.keys().await {
        Ok(keys) => {
            let found: Vec<String> = keys
                .take(MAX_RECLAIM_SCAN)
                .filter_map(|k| async move { k.ok() })
                .map(|key| async move { records.get(key).await.ok().flatten() })
                .buffer_unordered(64)
                .filter_map(|bytes| async move {
                    let r: Value = serde_json::from_slice(&bytes?).ok()?;
                    let running = r["status"] == "running";
                    (running && r["node"] == node)
                        .then(|| r["ack"].as_str().map(str::to_owned))
                        .flatten()
                })
                .collect()
                .await;
            acks.extend(found);
        }
        Err(e) => warn!(error = %e, "Records not scanned for a dead node's tasks."),
    }
    let mut naked = 0;
    for ack in acks {
        if client.publish(ack, "-NAK".into()).await.is_ok() {
            naked += 1;
        }
    }
    let _ = client.flush().await;
    naked
}
