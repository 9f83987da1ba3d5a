//! `chaos`: misbehaves on request, for demos and fault tests. Payload
//! fields, combinable: `{"fail_times": N}` fails attempts 1..=N (by
//! attempt number, so it holds across redelivery), `{"fail": "msg"}`
//! fails, `{"panic": true}` panics, `{"sleep_ms": N}` sleeps first
//! (honouring cancellation unless `{"ignore_cancel": true}`).

use std::time::Duration;

use async_trait::async_trait;
use dispatcher_actors::{Placement, TaskContext, TaskError, TaskHandler};
use serde_json::{json, Value};

/// The `chaos` handler.
pub struct Chaos;

#[async_trait]
impl TaskHandler for Chaos {
    async fn run(&self, ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
        if let Some(ms) = payload["sleep_ms"].as_u64() {
            let nap = tokio::time::sleep(Duration::from_millis(ms));
            if payload["ignore_cancel"].as_bool() == Some(true) {
                nap.await;
            } else {
                tokio::select! {
                    _ = nap => {}
                    _ = ctx.cancelled() => return Err(TaskError::new("cancelled while sleeping")),
                }
            }
        }
        if let Some(n) = payload["fail_times"].as_u64() {
            if u64::from(ctx.attempt()) <= n {
                return Err(TaskError::new(format!(
                    "chaos: failing attempt {} of the first {n}",
                    ctx.attempt()
                )));
            }
        }
        if let Some(msg) = payload["fail"].as_str() {
            return Err(TaskError::new(msg));
        }
        if payload["panic"].as_bool() == Some(true) {
            panic!("chaos: panic requested by the task");
        }
        Ok(json!({ "attempt": ctx.attempt() }))
    }

    fn placement(&self) -> Placement {
        Placement::EventLoop
    }
}
