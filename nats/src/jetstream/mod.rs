//! Mode `jetstream`: at-least-once delivery and shared task state.
//!
//! - [`setup`]: creates or checks the task stream, the dead-letter stream and
//!   the KV buckets at start-up.
//! - [`store`]: the gateway's durable submit (KV create, then a JetStream
//!   publish whose acknowledgement is awaited).
//! - [`pull`]: durable pull consumers per (kind, priority): a waiting pull
//!   on each, and no-wait pulls highest priority first, within the local
//!   queue's room.
//! - `intake`: what a delivered message becomes (a task, or a delivery
//!   settled at once).
//! - [`delivery`]: the actors' [`Delivery`](dispatcher_actors::Delivery) on a
//!   JetStream message: in-progress, ack, nak with delay, term, dead letter.
//! - [`records`]: the KV mirror of task records, fenced by revision.
//! - [`replay`]: the `replay` API: a dead task runs again.
//! - [`cancels`]: cancel requests for tasks no node (or another node) holds.
//! - [`cluster`]: the live nodes, and fast reclaim of a dead node's tasks.
//! - [`errors`]: the cluster's error list, a bounded stream every node
//!   publishes its failed attempts to.
//! - [`scan`]: reads a stream backwards by sequence, a page at a time
//!   (`list` over the record bucket, `errors`).

pub mod cancels;
pub mod cluster;
pub mod delivery;
pub mod errors;
mod intake;
pub mod pull;
pub mod records;
pub mod replay;
pub mod scan;
pub mod setup;
pub mod store;

use std::time::Duration;

pub use async_nats::jetstream::stream::StorageType;
pub use setup::{setup, Durable, SetupError};

/// JetStream settings of a node.
#[derive(Clone, Debug)]
pub struct JetStreamOptions {
    /// Storage of the streams and buckets (file).
    pub storage: StorageType,
    /// Replicas of the streams and buckets (1; up to 5 in a cluster).
    pub replicas: usize,
    /// Window in which a re-published task id is dropped as a duplicate (2 min).
    pub duplicate_window: Duration,
    /// How long a delivery may go without an ack or in-progress ack before
    /// JetStream redelivers it (30 s). The node sends in-progress acks
    /// every `keep_alive_interval` of the actors' configuration.
    pub ack_wait: Duration,
    /// Unacknowledged deliveries per consumer across all nodes (10 000).
    pub max_ack_pending: i64,
    /// Deliveries of one message at most (200), a bound on a message that
    /// takes down every node that pulls it in a way no check catches; past
    /// it the server stops delivering it. Invalid messages are removed on
    /// their first delivery, and a task's own attempts stop at its
    /// `max_attempts` long before.
    pub max_deliveries: i64,
    /// Deliveries of one task that may begin no attempt (20): given back
    /// unstarted at shutdown, or taken by a node that died before the
    /// attempt was recorded. Past it the task fails
    /// `crash_budget_exhausted` with a dead letter, so a task that takes
    /// its node down before it even starts cannot do so for ever.
    pub crash_budget: u32,
    /// How long a consumer's waiting pull lasts at the server before it is
    /// renewed (5 s). The server pushes a task, new or redelivered, to a
    /// waiting pull at once.
    pub idle_poll: Duration,
    /// Most messages one pull asks for (256).
    pub fetch_batch: usize,
    /// How long a KV record change that does not end its task waits for
    /// the next one, so that a short task's record is written once (50 ms).
    /// Progress waits at least this long, and at most one write per
    /// [`records::PROGRESS_EVERY`] (500 ms) per task.
    pub record_linger: Duration,
    /// Task records' lifetime in KV (24 h).
    pub retention: Duration,
    /// Cancel requests remembered for tasks not pulled yet (100 000).
    pub max_pending_cancels: usize,
    /// Failed attempts the error stream keeps, cluster-wide (1 000; the
    /// oldest go first). Set when the stream is created.
    pub max_errors: i64,
}

impl Default for JetStreamOptions {
    fn default() -> Self {
        Self {
            storage: StorageType::File,
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 10_000,
            max_deliveries: 200,
            crash_budget: 20,
            idle_poll: Duration::from_secs(5),
            fetch_batch: 256,
            record_linger: Duration::from_millis(50),
            retention: Duration::from_secs(24 * 3600),
            max_pending_cancels: 100_000,
            max_errors: 1_000,
        }
    }
}
