//! The cluster as one node sees it, and fast reclaim of a dead node's
//! tasks.
//!
//! Every node publishes a metrics snapshot with each heartbeat, listing the
//! ack subjects of the deliveries it holds (`held`), and the same list on
//! `<p>.leases.<node>` whenever it changes (at most every 200 ms). Every
//! node keeps the latest of these for every other. A node whose snapshots stop for three
//! heartbeat intervals without an `offline` event is dead: the live node
//! with the smallest id naks every delivery the dead node held (from its
//! last snapshot and the leases it announced since), so JetStream
//! redelivers them at once instead of after `AckWait`.
//!
//! What comes on these subjects is data, never an instruction: a node is
//! known only from its `online` event or its snapshots (each must name the
//! node of its subject), leases count only for a node known so, and only
//! ack subjects of this deployment's own task consumers are kept — so a
//! message can make a node nak no subject but a real delivery's, and the
//! cost of a reclaim is bounded by [`MAX_HELD`] naks per dead node, with
//! no read of the task records. NATS permissions (`deploy/nats/`) keep
//! clients off these subjects altogether.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dispatcher_actors::{NodeEventName, Priority};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::subjects::Subjects;

/// Missed heartbeat intervals after which a node is taken for dead.
pub const MISSED_HEARTBEATS: u32 = 3;
/// Ack subjects remembered per node at most (deltas between full lists).
const MAX_HELD: usize = 100_000;

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

impl Peer {
    fn new() -> Self {
        Self {
            last_seen: Instant::now(),
            snapshot: Value::Null,
            held: Vec::new(),
            gone: false,
        }
    }
}

/// One live node's figures, as its latest snapshot gave them.
#[derive(Clone, Debug)]
pub struct NodeFigures {
    /// The node.
    pub node: String,
    /// How long ago it was last heard of.
    pub seen_ms_ago: u64,
    /// Its `stats`.
    pub stats: Value,
    /// Its attempt durations, `[[µs, count], …]` (two significant digits).
    pub durations: Value,
    /// Whether it takes work (a slot in service).
    pub taking_work: Value,
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
                    "taking_work": p.snapshot.get("taking_work").cloned().unwrap_or(Value::Null),
                })
            })
            .collect()
    }

    /// The live nodes' latest figures, from their latest snapshots, read
    /// at one instant (for cluster-wide stats).
    pub fn figures(&self) -> Vec<NodeFigures> {
        let peers = self.peers.lock().expect("not poisoned");
        peers
            .iter()
            .filter(|(_, p)| !p.gone)
            .map(|(id, p)| {
                let field = |name: &str| p.snapshot.get(name).cloned().unwrap_or(Value::Null);
                NodeFigures {
                    node: id.clone(),
                    seen_ms_ago: p.last_seen.elapsed().as_millis() as u64,
                    stats: field("stats"),
                    durations: field("durations"),
                    taking_work: field("taking_work"),
                }
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

    /// Forgets when the live peers were last seen, as if each had just
    /// been: after this node itself was not running, silence it could not
    /// hear is no evidence. Answers how many peers that touched.
    fn judge_from_now(&self) -> usize {
        let mut peers = self.peers.lock().expect("not poisoned");
        let now = Instant::now();
        let mut n = 0;
        for peer in peers.values_mut().filter(|p| !p.gone) {
            peer.last_seen = now;
            n += 1;
        }
        n
    }

    /// Takes a message on a node subject (`<p>.metrics.<node>`,
    /// `<p>.leases.<node>`, `<p>.nodes.<node>.online|offline`). Messages
    /// there are data, never instructions: a node is known only from its
    /// `online` event or its metrics snapshots, each of which must name
    /// the node of its subject; leases are kept only for nodes known so,
    /// and only the ack subjects of this deployment's own consumers.
    fn take(&self, acks: &AckSubjects, from: &str, msg: &NodeMessage) {
        let mut peers = self.peers.lock().expect("not poisoned");
        match msg {
            NodeMessage::Online => {
                peers.insert(from.to_owned(), Peer::new());
            }
            NodeMessage::Offline => {
                if let Some(p) = peers.get_mut(from) {
                    p.gone = true;
                }
            }
            NodeMessage::Snapshot(snapshot) => {
                let held = acks.keep(strings(&snapshot["held"]));
                peers.insert(
                    from.to_owned(),
                    Peer {
                        snapshot: snapshot.clone(),
                        held,
                        ..Peer::new()
                    },
                );
            }
            NodeMessage::Leases { held, add } => {
                let Some(peer) = peers.get_mut(from) else {
                    return;
                };
                if peer.gone {
                    return;
                }
                peer.last_seen = Instant::now();
                if let Some(held) = held {
                    peer.held = acks.keep(held.iter().cloned());
                }
                peer.held.extend(acks.keep(add.iter().cloned()));
                if peer.held.len() > MAX_HELD {
                    let excess = peer.held.len() - MAX_HELD;
                    peer.held.drain(..excess);
                }
            }
        }
    }
}

/// A message on a node subject, read.
#[derive(Debug)]
enum NodeMessage {
    Online,
    Offline,
    Snapshot(Value),
    Leases {
        held: Option<Vec<String>>,
        add: Vec<String>,
    },
}

/// The body of `<p>.leases.<node>`.
#[derive(serde::Deserialize)]
struct LeasesBody {
    node: String,
    #[serde(default)]
    held: Option<Vec<String>>,
    #[serde(default)]
    add: Vec<String>,
}

/// Reads a message on a node subject that came from node `from` (the
/// subject's token): `None` unless its body names the same node.
fn read(kind: Source, from: &str, payload: &[u8]) -> Option<NodeMessage> {
    let names = |node: Option<&str>| node == Some(from);
    match kind {
        Source::Metrics => {
            let snapshot: Value = serde_json::from_slice(payload).ok()?;
            names(snapshot["node"].as_str()).then_some(NodeMessage::Snapshot(snapshot))
        }
        Source::Leases => {
            let body: LeasesBody = serde_json::from_slice(payload).ok()?;
            names(Some(&body.node)).then_some(NodeMessage::Leases {
                held: body.held,
                add: body.add,
            })
        }
        Source::Online | Source::Offline => {
            let event: Value = serde_json::from_slice(payload).ok()?;
            names(event["node"].as_str()).then_some(if kind == Source::Online {
                NodeMessage::Online
            } else {
                NodeMessage::Offline
            })
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Metrics,
    Leases,
    Online,
    Offline,
}

fn strings(v: &Value) -> impl Iterator<Item = String> + '_ {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
}

/// Which ack subjects are this deployment's: `$JS.ACK.<stream>.<consumer>.`
/// followed by the delivery's numbers (and, on newer servers, with a
/// domain and account hash before the stream), where the stream is this
/// prefix's task stream and the consumer one a node of it makes
/// (`<kind>_<priority>`). Nothing else is ever acted on.
#[derive(Clone, Debug)]
pub struct AckSubjects {
    stream: String,
}

impl AckSubjects {
    /// The ack subjects of `subjects`' task stream.
    pub fn new(subjects: &Subjects) -> Self {
        Self {
            stream: subjects.stream_tasks(),
        }
    }

    /// Whether `ack` is an ack subject of one of this deployment's task
    /// deliveries.
    pub fn is_own(&self, ack: &str) -> bool {
        let Some(rest) = ack.strip_prefix("$JS.ACK.") else {
            return false;
        };
        let tokens: Vec<&str> = rest.split('.').collect();
        // v1: stream, consumer, delivered, stream seq, consumer seq, time, pending.
        // v2: domain, account hash, stream, consumer, the five numbers, a token.
        let (stream, consumer, numbers) = match tokens.len() {
            7 => (tokens[0], tokens[1], &tokens[2..7]),
            9 | 10 => (tokens[2], tokens[3], &tokens[4..9]),
            _ => return false,
        };
        let own_consumer = consumer.rsplit_once('_').is_some_and(|(kind, priority)| {
            dispatcher_actors::task::is_token(kind, dispatcher_actors::task::MAX_KIND_LEN)
                && Priority::parse(priority).is_some()
        });
        // The domain, account hash and final token are printable ASCII, no
        // wildcard: what the node publishes on is one literal subject.
        let literal = tokens.iter().all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>')
        });
        stream == self.stream
            && own_consumer
            && literal
            && numbers
                .iter()
                .all(|n| !n.is_empty() && n.len() <= 20 && n.bytes().all(|b| b.is_ascii_digit()))
    }

    /// The ones of `acks` that are own, at most [`MAX_HELD`].
    fn keep(&self, acks: impl Iterator<Item = String>) -> Vec<String> {
        acks.filter(|a| self.is_own(a)).take(MAX_HELD).collect()
    }
}

/// Starts watching the cluster; the returned tasks run until aborted.
/// With `reclaim` (mode `jetstream`) it also gives a dead node's
/// deliveries back to the queue.
pub async fn start(
    client: async_nats::Client,
    subjects: &Subjects,
    me: String,
    interval: Duration,
    reclaim: bool,
) -> Result<(Cluster, Vec<JoinHandle<()>>), async_nats::SubscribeError> {
    let cluster = Cluster {
        me,
        peers: Arc::new(Mutex::new(BTreeMap::new())),
        reclaimed: Arc::new(AtomicU64::new(0)),
        interval,
    };
    let acks = AckSubjects::new(subjects);
    let mut metrics = client.subscribe(subjects.metrics("*")).await?;
    let mut offline = client
        .subscribe(subjects.node_event("*", NodeEventName::Offline))
        .await?;
    let mut online = client
        .subscribe(subjects.node_event("*", NodeEventName::Online))
        .await?;
    let mut leases = client.subscribe(subjects.leases_any()).await?;
    let view = cluster.clone();
    let node_of = {
        let subjects = subjects.clone();
        move |subject: &str| subjects.token(subject, 1).map(str::to_owned)
    };
    let listen = tokio::spawn(async move {
        loop {
            let (source, msg) = tokio::select! {
                Some(msg) = metrics.next() => (Source::Metrics, msg),
                Some(msg) = leases.next() => (Source::Leases, msg),
                Some(msg) = online.next() => (Source::Online, msg),
                Some(msg) = offline.next() => (Source::Offline, msg),
                else => return,
            };
            let Some(from) = node_of(msg.subject.as_str()) else {
                continue;
            };
            if let Some(read) = read(source, &from, &msg.payload) {
                view.take(&acks, &from, &read);
            }
        }
    });
    if !reclaim {
        return Ok((cluster, vec![listen]));
    }
    let view = cluster.clone();
    let watchdog = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = Instant::now();
        loop {
            tick.tick().await;
            let gap = last.elapsed();
            last = Instant::now();
            if gap >= interval * 2 {
                // This node was not running (stopped, starved): what it
                // knows of the others is as old as the gap. Nobody is
                // taken for dead on that; they are judged from now on.
                let peers = view.judge_from_now();
                warn!(
                    paused_ms = gap.as_millis() as u64,
                    peers,
                    "This node was not running for a while; its peers are judged again from now."
                );
                continue;
            }
            for (node, held) in view.dead_to_reclaim() {
                let n = give_back(&client, held).await;
                view.reclaimed.fetch_add(n, Ordering::Relaxed);
                info!(node = %node, naked = n, "Node missed {MISSED_HEARTBEATS} heartbeats; its tasks go back to the queue.");
            }
        }
    });
    Ok((cluster, vec![listen, watchdog]))
}

/// Naks every delivery a dead node held (ack subjects checked on the way
/// in, at most [`MAX_HELD`]). Answers how many naks went out.
async fn give_back(client: &async_nats::Client, held: Vec<String>) -> u64 {
    let acks: std::collections::BTreeSet<String> = held.into_iter().collect();
    let mut naked = 0;
    for ack in acks {
        if client.publish(ack, "-NAK".into()).await.is_ok() {
            naked += 1;
        }
    }
    let _ = client.flush().await;
    naked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_own_ack_subjects_are_kept() {
        let acks = AckSubjects::new(&Subjects::default());
        assert!(acks.is_own("$JS.ACK.DISPATCH_TASKS.echo_normal.1.22.3.1700000000000000000.0"));
        assert!(acks.is_own(
            "$JS.ACK.hub.ACCHASH.DISPATCH_TASKS.echo_low.1.22.3.1700000000000000000.0.abc"
        ));
        for bad in [
            "evil.subject",
            "otherprefix.api.cancel",
            "$KV.dispatch_cancels.t1",
            "$KV.dispatch_tasks.t1",
            "$JS.ACK.OTHER_TASKS.echo_normal.1.22.3.1700000000000000000.0",
            "$JS.ACK.DISPATCH_TASKS.echo_urgent.1.22.3.1700000000000000000.0",
            "$JS.ACK.DISPATCH_TASKS.echo_normal.1.x.3.1700000000000000000.0",
            "$JS.ACK.DISPATCH_TASKS.echo_normal.1.22.3",
            "$JS.ACK.DISPATCH_TASKS.echo_normal.1.22.3.4.5.>",
            // Found by the fuzz target `wire_bodies`: a control character,
            // white space or a wildcard in the domain, hash or last token.
            "$JS.ACK.hub.ACC\u{8}ASH.DISPATCH_TASKS.echo_low.1.22.3.1700000000000000000.0.abc",
            "$JS.ACK.hub.ACC HASH.DISPATCH_TASKS.echo_low.1.22.3.1700000000000000000.0.abc",
            "$JS.ACK.*.ACCHASH.DISPATCH_TASKS.echo_low.1.22.3.1700000000000000000.0.abc",
            "$JS.ACK.hub.ACCHASH.DISPATCH_TASKS.echo_low.1.22.3.1700000000000000000.0.>",
            "$JS.ACK.hub.ACCHASH.DISPATCH_TASKS.echo_low.1.22.3.1700000000000000000.0.",
        ] {
            assert!(!acks.is_own(bad), "{bad}");
        }
    }

    /// Makes `node` last seen four intervals ago.
    fn age(c: &Cluster, node: &str) {
        let mut peers = c.peers.lock().unwrap();
        let peer = peers.get_mut(node).unwrap();
        peer.last_seen = Instant::now()
            .checked_sub(c.interval * (MISSED_HEARTBEATS + 1))
            .unwrap();
    }

    fn cluster() -> Cluster {
        Cluster {
            me: "me".into(),
            peers: Arc::new(Mutex::new(BTreeMap::new())),
            reclaimed: Arc::new(AtomicU64::new(0)),
            interval: Duration::from_millis(100),
        }
    }

    #[test]
    fn after_its_own_pause_a_node_judges_its_peers_from_now() {
        let c = cluster();
        let acks = AckSubjects::new(&Subjects::default());
        let online = read(Source::Online, "peer", br#"{"node": "peer"}"#).unwrap();
        c.take(&acks, "peer", &online);
        // Silent for longer than three intervals, as seen by a node that
        // was itself stopped all that time.
        age(&c, "peer");
        assert_eq!(c.judge_from_now(), 1);
        assert!(
            c.dead_to_reclaim().is_empty(),
            "taken for dead on a stale view"
        );
        age(&c, "peer");
        assert_eq!(
            c.dead_to_reclaim().len(),
            1,
            "silence measured after the resume counts"
        );
    }

    #[test]
    fn leases_of_unknown_nodes_and_bodies_naming_others_are_ignored() {
        let c = cluster();
        let acks = AckSubjects::new(&Subjects::default());
        let own = "$JS.ACK.DISPATCH_TASKS.echo_normal.1.22.3.1700000000000000000.0";
        let lease = format!(r#"{{"node": "ghost", "add": ["evil.subject", "{own}"]}}"#);
        if let Some(m) = read(Source::Leases, "ghost", lease.as_bytes()) {
            c.take(&acks, "ghost", &m);
        }
        assert!(c.peers.lock().unwrap().is_empty(), "a lease makes no node");
        // A body that names another node than its subject is not read.
        assert!(read(Source::Online, "a", br#"{"node": "b"}"#).is_none());
        let online = read(Source::Online, "real", br#"{"node": "real"}"#).unwrap();
        c.take(&acks, "real", &online);
        let lease = format!(r#"{{"node": "real", "add": ["evil.subject", "{own}"]}}"#);
        let m = read(Source::Leases, "real", lease.as_bytes()).unwrap();
        c.take(&acks, "real", &m);
        assert_eq!(c.peers.lock().unwrap()["real"].held, vec![own.to_owned()]);
        age(&c, "real");
        let dead = c.dead_to_reclaim();
        assert_eq!(dead, vec![("real".to_owned(), vec![own.to_owned()])]);
    }
}
