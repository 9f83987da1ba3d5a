//! [`Delivery`]: the seam between the actors and a transport that keeps
//! tasks durably (JetStream). A task handed over with a delivery stays the
//! transport's until the Supervisor settles it: the Supervisor keeps the
//! lease alive while it holds the task, and says at the end whether the
//! work is done, should come back later (retry), or is handed back unstarted.
//!
//! Without a delivery (core mode, in-process use) the Supervisor retries
//! locally and a shutdown cancels what has not started.

use std::fmt;
use std::time::Duration;

use crate::error::ErrorInfo;
use crate::event::TaskStatus;

/// What became of a delivered task on this node.
#[derive(Clone, Debug, PartialEq)]
pub enum Settlement {
    /// The task reached a final state (completed, failed, timed out or
    /// cancelled): remove it for good. The error is the last attempt's,
    /// when it failed or timed out (a transport may keep it with a
    /// dead-letter copy).
    Done(TaskStatus, Option<ErrorInfo>),
    /// The attempt failed and another follows: deliver the task again after
    /// `delay` (to any node).
    Retry {
        /// The backoff before the next attempt.
        delay: Duration,
    },
    /// The node gives the task back (shutting down): deliver it again at
    /// once, to another node.
    Release,
}

/// A transport's handle on one delivery of a task. Methods are called on
/// the Supervisor's thread and must return at once (spawn any I/O).
pub trait Delivery: Send + 'static {
    /// The node still holds the task (queued or running): extend the lease
    /// (JetStream: an in-progress ack). Called every keep-alive interval.
    fn keep_alive(&self);

    /// The node is done with this delivery.
    fn settle(self: Box<Self>, settlement: Settlement);
}

/// A boxed [`Delivery`] that can travel in actor messages.
pub struct DeliveryHandle(Box<dyn Delivery>);

impl DeliveryHandle {
    /// Wraps a delivery.
    pub fn new(delivery: impl Delivery) -> Self {
        Self(Box::new(delivery))
    }

    pub(crate) fn keep_alive(&self) {
        self.0.keep_alive();
    }

    pub(crate) fn settle(self, settlement: Settlement) {
        self.0.settle(settlement);
    }
}

impl fmt::Debug for DeliveryHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeliveryHandle")
    }
}
