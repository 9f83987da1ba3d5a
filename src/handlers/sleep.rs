//! `sleep`: waits `{"ms": N}` milliseconds, reporting `{"steps": K}`
//! progress events evenly on the way; stops early when cancelled.

use std::time::Duration;

use async_trait::async_trait;
use dispatcher_actors::{Placement, TaskContext, TaskError, TaskHandler};
use serde_json::{json, Value};

/// The `sleep` handler.
pub struct Sleep;

#[async_trait]
impl TaskHandler for Sleep {
    async fn run(&self, ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
        let ms = payload["ms"].as_u64().ok_or_else(|| {
            TaskError::permanent("payload needs `ms`, a whole number of milliseconds")
        })?;
        let steps = payload["steps"].as_u64().unwrap_or(0).min(100);
        let parts = steps.max(1);
        let slice = Duration::from_millis(ms) / parts as u32;
        for step in 1..=parts {
            tokio::select! {
                _ = tokio::time::sleep(slice) => {}
                _ = ctx.cancelled() => return Err(TaskError::new("cancelled while sleeping")),
            }
            if let Some(percent) = (step * 100).checked_div(steps) {
                ctx.progress(percent as u8, format!("step {step} of {steps}"));
            }
        }
        Ok(json!({ "slept_ms": ms }))
    }

    fn placement(&self) -> Placement {
        Placement::EventLoop
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dispatcher_actors::{TaskId, TaskKind};

    fn ctx() -> (TaskContext, impl Fn()) {
        let (c, token) = TaskContext::detached(
            TaskId::new("t").unwrap(),
            TaskKind::new("sleep").unwrap(),
            Duration::from_secs(10),
        );
        (c, move || token.cancel())
    }

    #[tokio::test]
    async fn sleeps_and_stops_when_cancelled() {
        let (c, _) = ctx();
        assert_eq!(
            Sleep.run(c, json!({"ms": 1, "steps": 2})).await.unwrap(),
            json!({"slept_ms": 1})
        );
        let (c, cancel) = ctx();
        cancel();
        assert!(Sleep.run(c, json!({"ms": 60_000})).await.is_err());
        let (c, _) = ctx();
        assert!(!Sleep.run(c, json!({})).await.unwrap_err().is_retryable());
    }
}
