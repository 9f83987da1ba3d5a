//! The dispatcher's NATS adapter.
//!
//! # Layout
//!
//! - [`node`]: a whole node, the binary's entry point.
//! - [`probe`]: one live node per id: the check at start, the answers while live.
//! - [`publisher`]: the event sink that publishes to NATS.
//! - [`service`]: the control API, as the micro service `dispatch`.
//! - [`subjects`]: every subject, stream, bucket and header name, from one prefix.
//! - [`wire`]: reply bodies.
//! - [`codec`]: JSON and bincode bodies, checked against the limits.
//! - [`inbound`]: the one reading of a message as a task, for every entry point.
//! - [`gateway`]: the submit gateway.
//! - [`ingest`]: tasks published straight onto the queue (mode `core`).
//! - [`jetstream`]: mode `jetstream`: streams, pull consumers, deliveries, KV records.
//! - [`local_server`]: a private `nats-server` for tests and the demo, also
//!   from a configuration file (accounts, users, permissions).
//! - [`client`]: the typed Rust client: submit, follow events, control API.
//!
#![warn(missing_docs)]

pub mod client;
pub mod codec;
pub mod gateway;
pub mod inbound;
pub mod ingest;
pub mod jetstream;
pub mod local_server;
pub mod node;
pub mod probe;
pub mod publisher;
pub mod service;
pub mod subjects;
pub mod wire;

pub use client::{Client, ClientError};
pub use local_server::{LocalServer, LocalServerError};
pub use node::{Mode, Node, NodeError, NodeOptions};
pub use subjects::{ApiEndpoint, Subjects};
