//! The node's configuration: clap flags, each also read from a `DISPATCH_*`
//! environment variable (flags win). Nothing deeper reads the environment.

use std::time::Duration;

use clap::Args;
use dispatcher_actors::{DispatcherConfig, NodeId, MAX_WORKERS};
use dispatcher_nats::codec::Limits;
use dispatcher_nats::{Mode, NodeOptions};

/// Where the NATS server is.
#[derive(Args, Clone, Debug)]
pub struct Connection {
    /// NATS server URL(s), comma-separated.
    #[arg(
        long,
        env = "DISPATCH_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,
    /// Subject prefix shared by nodes and clients.
    #[arg(long, env = "DISPATCH_PREFIX", default_value = "dispatch")]
    pub prefix: String,
}

/// `dispatcher serve` settings.
#[derive(Args, Clone, Debug)]
pub struct ServeConfig {
    /// NATS connection.
    #[command(flatten)]
    pub connection: Connection,
    /// Delivery mode; only `core` (at most once, lowest latency) exists yet.
    #[arg(long, env = "DISPATCH_MODE", default_value = "core")]
    pub mode: Mode,
    /// This node's id (a subject token); default: host name and a random suffix.
    #[arg(long, env = "DISPATCH_NODE_ID")]
    pub node_id: Option<String>,
    /// Worker slots, 1 to 10.
    #[arg(long, env = "DISPATCH_WORKERS", default_value_t = MAX_WORKERS)]
    pub workers: usize,
    /// Tasks the local queue holds; default workers × 100.
    #[arg(long, env = "DISPATCH_QUEUE_CAPACITY")]
    pub queue_capacity: Option<usize>,
    /// Largest submission body, in bytes.
    #[arg(long, env = "DISPATCH_MAX_PAYLOAD", default_value_t = 1024 * 1024)]
    pub max_payload: usize,
    /// Deepest JSON nesting accepted.
    #[arg(long, env = "DISPATCH_MAX_JSON_DEPTH", default_value_t = 64)]
    pub max_json_depth: usize,
    /// Events buffered for publishing; past it they are dropped and counted.
    #[arg(long, env = "DISPATCH_EVENT_BUFFER", default_value_t = 10_000)]
    pub event_buffer: usize,
    /// Seconds running tasks get to finish at shutdown.
    #[arg(long, env = "DISPATCH_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// A program the `exec` handler may run (repeat the flag, or separate
    /// with commas in the variable). Without any, `exec` is not served.
    #[arg(
        long = "exec-allow",
        env = "DISPATCH_EXEC_ALLOW",
        value_delimiter = ','
    )]
    pub exec_allow: Vec<String>,
    /// Register the `chaos` handler (fails, panics, sleeps on request).
    #[arg(long, env = "DISPATCH_ENABLE_CHAOS")]
    pub enable_chaos: bool,
}

impl ServeConfig {
    /// The actors' configuration.
    pub fn dispatcher_config(&self) -> Result<DispatcherConfig, String> {
        let node = match &self.node_id {
            Some(id) => NodeId::new(id.as_str()).map_err(|e| e.message)?,
            None => default_node_id(),
        };
        let mut config = DispatcherConfig::new(node);
        config.workers = self.workers;
        config.queue_capacity = self.queue_capacity;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }

    /// The NATS side's options.
    pub fn node_options(&self) -> NodeOptions {
        NodeOptions {
            prefix: self.connection.prefix.clone(),
            mode: self.mode,
            limits: Limits {
                max_payload: self.max_payload,
                max_depth: self.max_json_depth,
            },
            event_buffer: self.event_buffer,
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout),
            ..NodeOptions::default()
        }
    }
}

/// Host name plus a short random suffix, cut to subject-token characters.
pub fn default_node_id() -> NodeId {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "node".into());
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    let host = if host.is_empty() {
        "node".to_owned()
    } else {
        host
    };
    let suffix: u32 = rand::random::<u32>() & 0xff_ffff;
    NodeId::new(format!("{host}-{suffix:06x}")).expect("sanitised to token characters")
}
