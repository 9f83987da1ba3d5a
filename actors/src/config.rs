//! [`DispatcherConfig`]: every bound and policy of the actor system, with
//! the defaults DESIGN.md names.

use std::time::Duration;

use crate::task::{NodeId, TaskDefaults};

/// Most worker slots one node runs.
pub const MAX_WORKERS: usize = 10;

/// How the Supervisor restarts crashed workers (OTP's one-for-one with
/// restart intensity).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RestartPolicy {
    /// At most this many restarts of one slot …
    pub max_restarts: u32,
    /// … within this window; past it the slot is disabled.
    pub within: Duration,
    /// First restart delay; doubles per restart inside the window.
    pub backoff_initial: Duration,
    /// Largest restart delay.
    pub backoff_max: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restarts: 5,
            within: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// Everything the actor system needs to know.
#[derive(Clone, Debug, PartialEq)]
pub struct DispatcherConfig {
    /// This node's id, stamped on every event.
    pub node: NodeId,
    /// Worker slots, 1..=[`MAX_WORKERS`].
    pub workers: usize,
    /// Tasks the local queue holds (queued plus waiting to retry); `None`
    /// means `workers × 100`.
    pub queue_capacity: Option<usize>,
    /// Defaults for fields a task leaves out.
    pub defaults: TaskDefaults,
    /// How long a cancelled or timed-out handler may take to stop on its
    /// own before its future is dropped.
    pub cancel_grace: Duration,
    /// Worker restarts.
    pub restart: RestartPolicy,
    /// How often a transport's lease on each task this node holds is
    /// renewed ([`Delivery::keep_alive`](crate::delivery::Delivery::keep_alive)).
    pub keep_alive_interval: Duration,
    /// How long finished tasks stay in the registry.
    pub retention: Duration,
    /// How often finished tasks past `retention` are removed.
    pub cleanup_interval: Duration,
    /// Most task records kept; past it the oldest finished ones go first.
    pub max_records: usize,
    /// Most entries in the error list (a ring: the oldest go first).
    pub error_capacity: usize,
    /// Events buffered per in-process subscriber; a slower subscriber
    /// skips ahead (and is told how many it missed).
    pub subscriber_buffer: usize,
}

impl DispatcherConfig {
    /// The defaults, with `node` as the node id.
    pub fn new(node: NodeId) -> Self {
        Self {
            node,
            workers: MAX_WORKERS,
            queue_capacity: None,
            defaults: TaskDefaults::default(),
            cancel_grace: Duration::from_secs(2),
            restart: RestartPolicy::default(),
            keep_alive_interval: Duration::from_secs(10),
            retention: Duration::from_secs(24 * 3600),
            cleanup_interval: Duration::from_secs(60),
            max_records: 100_000,
            error_capacity: 1_000,
            subscriber_buffer: 4_096,
        }
    }

    /// The queue capacity in effect.
    pub fn queue_capacity(&self) -> usize {
        self.queue_capacity.unwrap_or(self.workers * 100)
    }

    /// Checks every bound; the message says what to change.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.workers == 0 || self.workers > MAX_WORKERS {
            return Err(ConfigError(format!(
                "workers must be 1 to {MAX_WORKERS}, got {}",
                self.workers
            )));
        }
        if self.queue_capacity() == 0 {
            return Err(ConfigError("queue capacity must be at least 1".into()));
        }
        if self.max_records == 0 {
            return Err(ConfigError("max_records must be at least 1".into()));
        }
        if self.error_capacity == 0 {
            return Err(ConfigError("error_capacity must be at least 1".into()));
        }
        if self.subscriber_buffer == 0 {
            return Err(ConfigError("subscriber_buffer must be at least 1".into()));
        }
        if self.cleanup_interval.is_zero() {
            return Err(ConfigError("cleanup_interval must be above zero".into()));
        }
        if self.keep_alive_interval.is_zero() {
            return Err(ConfigError("keep_alive_interval must be above zero".into()));
        }
        if self.restart.within.is_zero() {
            return Err(ConfigError("restart window must be above zero".into()));
        }
        Ok(())
    }
}

/// A configuration value out of bounds.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_count_is_bounded() {
        let mut c = DispatcherConfig::new(NodeId::new("n").unwrap());
        assert!(c.validate().is_ok());
        c.workers = 0;
        assert!(c.validate().unwrap_err().0.contains("1 to 10"));
        c.workers = 11;
        assert!(c.validate().is_err());
        c.workers = 3;
        assert_eq!(c.queue_capacity(), 300);
    }
}
