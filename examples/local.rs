//! The actors crate alone, as an in-process worker pool: no NATS, no
//! network. Registers a handler, submits a batch with mixed priorities,
//! follows the events, cancels one task, waits until idle, and prints the
//! records, the error list and the stats.
//!
//! Run: `cargo run --example local`

use std::sync::Arc;
use std::time::Duration;

use dispatcher_actors::{
    handler_fn, Dispatcher, DispatcherConfig, EventBody, Handlers, NodeId, NullSink, Priority,
    SubmitOptions, TaskError, TaskKind, TaskSpec,
};
use serde_json::json;

#[actix::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut handlers = Handlers::new();
    // Squares a number, reporting progress; odd numbers fail once, to show
    // retries.
    handlers.insert(
        TaskKind::new("square")?,
        handler_fn(|ctx, payload| async move {
            let n = payload["n"]
                .as_i64()
                .ok_or_else(|| TaskError::permanent("payload needs an integer `n`"))?;
            ctx.progress(50, "thinking");
            tokio::time::sleep(Duration::from_millis(20)).await;
            if n % 2 == 1 && ctx.attempt() == 1 {
                return Err(TaskError::new("odd numbers fail their first attempt"));
            }
            Ok(json!({ "square": n * n }))
        }),
    );

    let mut config = DispatcherConfig::new(NodeId::new("local")?);
    config.workers = 4;
    config.defaults.backoff.initial_ms = 50;
    let dispatcher = Dispatcher::start(config, handlers, Arc::new(NullSink))?;

    // Print every event as it happens.
    let mut events = dispatcher.subscribe();
    actix::spawn(async move {
        while let Ok(e) = events.recv().await {
            let extra = match &e.body {
                EventBody::Completed { result, .. } => result.to_string(),
                EventBody::Retrying { error, .. } | EventBody::Failed { error, .. } => {
                    error.to_string()
                }
                EventBody::Progress { progress, message } => format!("{progress}% {message}"),
                _ => String::new(),
            };
            println!(
                "{:>10} {:<9} attempt {} {extra}",
                e.task_id,
                e.name().as_str(),
                e.attempt
            );
        }
    });

    let specs = (1..=6)
        .map(|n| {
            let priority = if n == 6 {
                Priority::Critical
            } else {
                Priority::Normal
            };
            TaskSpec::new("square", json!({ "n": n }))
                .with_id(format!("square-{n}"))
                .with_priority(priority)
        })
        .collect();
    let results = dispatcher
        .submit_batch(specs, None, SubmitOptions::default())
        .await;
    for r in &results {
        if let Err(e) = r {
            println!("refused: {e}");
        }
    }
    let doomed = dispatcher
        .submit(TaskSpec::new("square", json!({ "n": 99 })).with_priority(Priority::Low))
        .await?;
    println!(
        "cancel {}: {:?}",
        doomed.id,
        dispatcher.cancel(&doomed.id).await?
    );

    dispatcher.wait_idle().await;
    for record in dispatcher.list(Default::default()).await? {
        println!(
            "{:<40} {:<10} attempts {} result {}",
            record.id,
            record.status.as_str(),
            record.attempt,
            record.result.unwrap_or_default()
        );
    }
    println!("errors: {}", dispatcher.errors(10).await?.len());
    println!(
        "stats: {}",
        serde_json::to_string(&dispatcher.stats().await?)?
    );
    dispatcher.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
