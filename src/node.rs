//! Runs one node until told to stop.

use std::future::Future;

use anyhow::Context as _;
use dispatcher_actors::Handlers;
use dispatcher_nats::Node;
use tracing::info;

use crate::config::ServeConfig;
use crate::handlers::{builtin_handlers, HandlerOptions};

/// Connects, starts the node with the built-in handlers, waits for
/// `shutdown`, then stops gracefully. Must run inside an actix System.
pub async fn run(config: ServeConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_with(config, |_| Ok(()), shutdown).await
}

/// As [`run`], with `register` adding handlers of one's own next to the
/// built-ins (see `examples/custom_handler.rs`).
pub async fn run_with(
    config: ServeConfig,
    register: impl FnOnce(&mut Handlers) -> anyhow::Result<()>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let dispatcher_config = config
        .dispatcher_config()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    // Checked before connecting: a bad --exec-allow entry stops `serve` at once.
    let mut handlers = builtin_handlers(&HandlerOptions {
        enable_chaos: config.enable_chaos,
        exec: config.exec_options()?,
    })
    .context("invalid exec configuration")?;
    register(&mut handlers)?;
    let client = config
        .connection
        .connect(&format!("dispatcher node {}", dispatcher_config.node))
        .await?;
    let node = Node::start(client, dispatcher_config, handlers, config.node_options())
        .await
        .context("starting the node")?;
    info!(node = %node.node_id(), kinds = ?node.dispatcher().kinds(), "Serving.");
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

/// Ctrl-C (SIGINT) or SIGTERM, whichever comes first.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
