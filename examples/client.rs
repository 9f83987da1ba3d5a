//! The typed Rust client against a running node: submits a `sleep` task
//! (`{"ms": 500, "steps": 5}`) and prints its events until the final one.
//!
//! Run a nats-server and a node, then the example:
//!
//! ```text
//! nats-server &
//! cargo run -- serve &
//! cargo run --example client
//! ```
//!
//! `DISPATCH_NATS_URL` names the server (default `nats://127.0.0.1:4222`),
//! `DISPATCH_PREFIX` the subject prefix (default `dispatch`).

use std::process::ExitCode;
use std::time::Duration;

use dispatcher_actors::{EventBody, TaskId, TaskSpec};
use dispatcher_nats::Client;
use futures::StreamExt;
use serde_json::json;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The message, then its causes.
            let mut line = format!("error: {e}");
            let mut source = e.source();
            while let Some(cause) = source {
                line.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("{line}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let url =
        std::env::var("DISPATCH_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let prefix = std::env::var("DISPATCH_PREFIX").unwrap_or_else(|_| "dispatch".to_owned());
    let nats = async_nats::connect(url.as_str())
        .await
        .map_err(|e| format!("connecting to {url}: {e}"))?;
    let client = Client::new(nats, &prefix)?.with_timeout(Duration::from_secs(5));

    // Subscribe before submitting, so that no event is missed: that needs
    // the id up front.
    let id = TaskId::generate();
    let mut events = client.events(&id).await?;
    let spec = TaskSpec::new("sleep", json!({"ms": 500, "steps": 5})).with_id(id.as_str());
    client.submit(spec).await?;
    println!("submitted {id}");

    let watch = async {
        while let Some(event) = events.next().await {
            let what = match &event.body {
                EventBody::Accepted { priority } => format!("priority {priority}"),
                EventBody::Started { worker } => format!("on worker {worker}"),
                EventBody::Progress { progress, message } => format!("{progress:>3}% {message}"),
                EventBody::Completed {
                    result,
                    duration_ms,
                } => format!("{result} in {duration_ms} ms"),
                EventBody::Retrying { error, retry_in_ms } => {
                    format!("{error}; next attempt in {retry_in_ms} ms")
                }
                EventBody::Failed { error, .. } | EventBody::Rejected { error, .. } => {
                    error.to_string()
                }
                EventBody::TimedOut { timeout_ms } => format!("after {timeout_ms} ms"),
                EventBody::Cancelled { reason } => reason.clone(),
            };
            println!(
                "{} {:<9} attempt {} on {}: {what}",
                event.ts,
                event.name().as_str(),
                event.attempt,
                event.node
            );
        }
    };
    tokio::time::timeout(Duration::from_secs(30), watch)
        .await
        .map_err(|_| format!("task {id} did not finish within 30 s"))?;

    Ok(())
}
