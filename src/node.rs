//! Runs one node until told to stop.

use std::future::Future;

use anyhow::Context as _;
use dispatcher_nats::Node;
use tracing::info;

use crate::config::ServeConfig;
use crate::handlers::{builtin_handlers, HandlerOptions};

/// Connects, starts the node, waits for `shutdown`, then stops gracefully.
/// Must run inside an actix System.
pub async fn run(config: ServeConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let dispatcher_config = config
        .dispatcher_config()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    let client = config
        .connection
        .connect(&format!("dispatcher node {}", dispatcher_config.node))
        .await?;
    let handlers = builtin_handlers(&HandlerOptions {
        enable_chaos: config.enable_chaos,
        exec_allow: config.exec_allow.clone(),
    });
    let node = Node::start(client, dispatcher_config, handlers, config.node_options())
        .await
        .context("starting the node")?;
    shutdown.await;
    info!(node = %node.node_id(), "Draining.");
    let report = node.shutdown().await;
    info!(
        finished = report.finished,
        interrupted = report.interrupted,
        unstarted = report.unstarted,
        "Stopped."
    );
    Ok(())
}
