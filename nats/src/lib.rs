//! The dispatcher's NATS adapter.
//!
//! # Layout
//!
//! - [`subjects`]: every subject, stream, bucket and header name, from one prefix.
//! - [`codec`]: JSON and bincode bodies, checked against the limits.
//! - [`local_server`]: a private `nats-server` for tests and the demo.
//!
//! The submit gateway, ingest, event publisher, control service and client
//! are not built yet (see the open issue).
#![warn(missing_docs)]

pub mod codec;
pub mod local_server;
pub mod subjects;

pub use local_server::{LocalServer, LocalServerError};
pub use subjects::{ApiEndpoint, Subjects};
