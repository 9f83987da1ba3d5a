//! The dispatcher's actor system, with no transport in it: an in-process
//! task dispatcher (a supervised worker pool) that the NATS adapter wires to
//! the network.
//!
//! # Layout
//!
//! - [`task`]: the task model and its validation.
//! - [`event`]: task and node events, and the [`EventSink`] they leave through.
//! - [`handler`]: the [`TaskHandler`] trait and the [`TaskContext`] it gets.
//! - [`error`]: the protocol's error codes and [`DispatchError`].
//! - [`record`]: task records, the error list and stats.
//! - [`config`]: bounds and policies.
//! - [`dispatcher`]: the [`Dispatcher`] handle, the crate's entry point.
//! - [`delivery`]: the seam to transports that keep tasks durably.
//! - `supervisor`, `worker`, `registry`, `metrics`: one actor each.
//! - `queue`: the bounded priority queue.
#![warn(missing_docs)]

pub mod config;
pub mod delivery;
pub mod dispatcher;
mod emitter;
pub mod error;
pub mod event;
pub mod handler;
pub mod metrics;
pub mod queue;
pub mod record;
pub mod registry;
pub mod supervisor;
pub mod task;
pub mod time;
pub mod worker;

pub use config::{ConfigError, DispatcherConfig, RestartPolicy, MAX_WORKERS};
pub use delivery::{Delivery, DeliveryHandle, Settlement};
pub use dispatcher::{
    CancelOutcome, Dispatcher, ListFilter, ShutdownReport, SubmitOptions, Submitted,
};
pub use error::{DispatchError, ErrorCode, ErrorInfo};
pub use event::{
    EventBody, EventSink, NodeEvent, NodeEventBody, NodeEventName, NullSink, TaskEvent,
    TaskEventName, TaskStatus, WorkerInfo, WorkerState,
};
pub use handler::{
    handler_fn, FnHandler, Handlers, Placement, TaskContext, TaskError, TaskHandler,
};
pub use record::{ErrorEntry, Stats, TaskRecord};
pub use task::{
    Backoff, BackoffSpec, NodeId, Priority, ResourceMode, ResourceSpec, Task, TaskDefaults, TaskId,
    TaskKind, TaskSpec,
};
pub use time::{Timestamp, TimestampError};
