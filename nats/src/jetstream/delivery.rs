//! [`JsDelivery`]: one JetStream delivery of a task, as the actors'
//! [`Delivery`]. In-progress acks while the node holds it; ack when it
//! completed; nak with the backoff delay when another attempt follows; nak
//! at once when the node hands it back; term when it ended otherwise, with
//! a copy to the dead-letter stream when its attempts are spent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_nats::jetstream::message::{AckKind, Acker};
use async_nats::jetstream::Context;
use bytes::Bytes;
use dispatcher_actors::{Delivery, ErrorInfo, Settlement, TaskStatus, Timestamp};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::cluster::HeldDeliveries;
use super::records::RecordMirror;

/// Longest a delivery given back for another attempt waits for its record
/// write (the server may be away; the record write goes on retrying).
const RECORD_BEFORE_RETRY: std::time::Duration = std::time::Duration::from_secs(2);
use crate::subjects::{Subjects, HEADER_MSG_ID};

/// Counters of what deliveries did, shared by a node's deliveries.
#[derive(Debug, Default)]
pub struct DeliveryStats {
    /// Tasks copied to the dead-letter stream.
    pub dead_lettered: AtomicU64,
    /// Acks (of any kind) the server did not take.
    pub ack_failures: AtomicU64,
}

/// What a delivery needs besides its acker: where dead letters go.
#[derive(Clone)]
pub struct DeliveryContext {
    /// JetStream, to publish dead letters.
    pub js: Context,
    /// Subjects, for the dead-letter subject.
    pub subjects: Subjects,
    /// This node's id, stamped on dead letters.
    pub node: String,
    /// Shared counters.
    pub stats: Arc<DeliveryStats>,
    /// The deliveries this node holds (published with heartbeats).
    pub held: HeldDeliveries,
    /// Where acks go out, in order.
    pub acks: Acks,
    /// The KV record mirror: a delivery given back for another attempt
    /// waits until the record says which attempt ended.
    pub mirror: Option<RecordMirror>,
}

/// What the ack sender is handed.
enum AckOp {
    Send(Arc<Acker>, AckKind, String),
    Drained(oneshot::Sender<()>),
}

/// Sends every ack, in-progress ack, nak and term of a node's deliveries
/// from one task, in the order they were asked for (no task spawned per
/// ack), and can wait until all asked so far went out. The queue holds at
/// most a settle and a few keep-alives per delivery held.
#[derive(Clone)]
pub struct Acks {
    tx: mpsc::UnboundedSender<AckOp>,
}

impl Acks {
    /// Starts the sender on the current runtime.
    pub fn start(client: async_nats::Client, stats: Arc<DeliveryStats>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(op) = rx.recv().await {
                match op {
                    AckOp::Send(acker, kind, id) => {
                        if let Err(e) = acker.ack_with(kind).await {
                            stats.ack_failures.fetch_add(1, Ordering::Relaxed);
                            warn!(task_id = %id, error = %e, "Acknowledgement not sent.");
                        }
                    }
                    AckOp::Drained(done) => {
                        let _ = client.flush().await;
                        let _ = done.send(());
                    }
                }
            }
        });
        Self { tx }
    }

    fn send(&self, acker: Arc<Acker>, kind: AckKind, id: String) {
        let _ = self.tx.send(AckOp::Send(acker, kind, id));
    }

    /// Waits until every ack asked for before the call was sent and flushed.
    pub async fn drain(&self) {
        let (done, drained) = oneshot::channel();
        if self.tx.send(AckOp::Drained(done)).is_ok() {
            let _ = drained.await;
        }
    }
}

/// One delivery of one task.
pub struct JsDelivery {
    acker: Arc<Acker>,
    ctx: DeliveryContext,
    ack: String,
    id: String,
    kind: String,
    attempt: u32,
    body: Bytes,
}

impl JsDelivery {
    /// Wraps the acker of a delivered message carrying `body`; `ack` is
    /// the delivery's ack subject, noted as held until settled.
    pub fn new(
        acker: Acker,
        ctx: DeliveryContext,
        ack: String,
        id: String,
        kind: String,
        attempt: u32,
        body: Bytes,
    ) -> Self {
        ctx.held.insert(&id, &ack);
        Self {
            acker: Arc::new(acker),
            ctx,
            ack,
            id,
            kind,
            attempt,
            body,
        }
    }

    /// Settles a delivery that never reached the actors.
    pub fn settle_now(self, settlement: Settlement) {
        Box::new(self).settle(settlement);
    }

    /// Removes an invalid message for good (it was answered with a
    /// `rejected` event).
    pub fn terminate(self) {
        self.ctx.held.remove(&self.id, &self.ack);
        self.ctx.acks.send(self.acker, AckKind::Term, self.id);
    }
}

impl Delivery for JsDelivery {
    fn keep_alive(&self) {
        self.ctx
            .acks
            .send(self.acker.clone(), AckKind::Progress, self.id.clone());
    }

    fn settle(self: Box<Self>, settlement: Settlement) {
        let JsDelivery {
            acker,
            ctx,
            ack,
            id,
            kind,
            attempt,
            body,
        } = *self;
        ctx.held.remove(&id, &ack);
        let acks = ctx.acks.clone();
        let kind_of_ack = match settlement {
            Settlement::Done(TaskStatus::Completed, _) => AckKind::Ack,
            Settlement::Done(status @ (TaskStatus::Failed | TaskStatus::TimedOut), error) => {
                // The copy must be stored before the term removes the task.
                tokio::spawn(async move {
                    dead_letter(&ctx, &id, &kind, attempt, status, error, body).await;
                    ctx.acks.send(acker, AckKind::Term, id);
                });
                return;
            }
            Settlement::Done(_, _) => AckKind::Term,
            Settlement::Retry { delay } => {
                // The next delivery counts its attempt from the record:
                // the `retrying` write goes first.
                let Some(mirror) = ctx.mirror.clone() else {
                    acks.send(acker, AckKind::Nak(Some(delay)), id);
                    return;
                };
                tokio::spawn(async move {
                    mirror.flush(&id, RECORD_BEFORE_RETRY).await;
                    acks.send(acker, AckKind::Nak(Some(delay)), id);
                });
                return;
            }
            Settlement::Release => AckKind::Nak(None),
        };
        acks.send(acker, kind_of_ack, id);
    }
}

/// Copies a task whose attempts are spent to `<p>.dead.<kind>`, with its
/// last error, and waits for JetStream to store it (retried a few times:
/// the term that follows removes the original).
pub async fn dead_letter(
    ctx: &DeliveryContext,
    id: &str,
    kind: &str,
    attempts: u32,
    status: TaskStatus,
    error: Option<ErrorInfo>,
    body: Bytes,
) {
    let task: serde_json::Value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| json!(String::from_utf8_lossy(&body).into_owned()));
    let letter = json!({
        "id": id,
        "kind": kind,
        "status": status,
        "attempts": attempts,
        "error": error,
        "node": ctx.node,
        "ts": Timestamp::now(),
        "task": task,
    });
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(HEADER_MSG_ID, format!("{id}:dead:{attempts}").as_str());
    let payload = Bytes::from(letter.to_string());
    for _ in 0..3 {
        let published = ctx
            .js
            .publish_with_headers(ctx.subjects.dead(kind), headers.clone(), payload.clone())
            .await;
        let stored = match published {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match stored {
            Ok(()) => {
                ctx.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(e) => warn!(task_id = %id, error = %e, "Dead letter not stored; retrying."),
        }
    }
    warn!(task_id = %id, "Dead letter lost after 3 tries.");
}
