//! `exec`: runs an allow-listed program, no shell, so agents written in any
//! language run as tasks. Payload `{"program": "/path", "args": [...],
//! "input": …}`. The program gets `{"id", "kind", "attempt", "payload"}`
//! (payload = `input`) as one JSON line on stdin; each stdout line
//! `{"progress": P, "message": M}` becomes a progress event and a line
//! `{"result": …}` is the result. A non-zero exit fails the attempt with
//! the tail of stderr. On cancel or timeout the child is killed.

use std::process::Stdio;

use async_trait::async_trait;
use dispatcher_actors::{TaskContext, TaskError, TaskHandler};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

/// Most stderr bytes kept for the error message.
const STDERR_TAIL: usize = 2048;

/// The `exec` handler, with its allow list.
pub struct Exec {
    allow: Vec<String>,
}

impl Exec {
    /// Runs only the programs in `allow` (compared as given).
    pub fn new(allow: Vec<String>) -> Self {
        Self { allow }
    }
}

#[async_trait]
impl TaskHandler for Exec {
    async fn run(&self, ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
        let program = payload["program"]
            .as_str()
            .ok_or_else(|| TaskError::permanent("payload needs `program`"))?;
        if !self.allow.iter().any(|a| a == program) {
            return Err(TaskError::permanent(format!(
                "program {program:?} is not allowed on this node (see --exec-allow)"
            )));
        }
        let args: Vec<String> = match &payload["args"] {
            Value::Null => Vec::new(),
            Value::Array(items) => items
                .iter()
                .map(|a| a.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| TaskError::permanent("`args` must be strings"))?,
            _ => return Err(TaskError::permanent("`args` must be an array of strings")),
        };
        let mut child = Command::new(program)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| TaskError::new(format!("cannot start {program}: {e}")))?;
        let input = json!({
            "id": ctx.id(),
            "kind": ctx.kind(),
            "attempt": ctx.attempt(),
            "payload": payload.get("input").cloned().unwrap_or(Value::Null),
        });
        if let Some(mut stdin) = child.stdin.take() {
            let line = format!("{input}\n");
            // A program that does not read its input may close stdin early.
            let _ = stdin.write_all(line.as_bytes()).await;
        }
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let stderr_tail = tokio::spawn(async move {
            let mut all = Vec::new();
            let _ = (&mut stderr).take(1 << 20).read_to_end(&mut all).await;
            let start = all.len().saturating_sub(STDERR_TAIL);
            String::from_utf8_lossy(&all[start..]).into_owned()
        });
        let mut lines = BufReader::new(stdout).lines();
        let mut result = Value::Null;
        let work = async {
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if let Some(r) = v.get("result") {
                    result = r.clone();
                } else if let Some(p) = v["progress"].as_u64() {
                    let message = v["message"].as_str().unwrap_or("").to_owned();
                    ctx.progress(p.min(100) as u8, message);
                }
            }
            child.wait().await
        };
        let status = tokio::select! {
            status = work => status.map_err(|e| TaskError::new(format!("waiting for {program}: {e}")))?,
            _ = ctx.cancelled() => {
                // kill_on_drop ends the child when this future is dropped;
                // say why the attempt stopped.
                return Err(TaskError::new(format!("{program} stopped: the attempt was cancelled")));
            }
        };
        if status.success() {
            Ok(result)
        } else {
            let tail = stderr_tail.await.unwrap_or_default();
            Err(TaskError::new(format!(
                "{program} exited with {status}: {}",
                tail.trim()
            )))
        }
    }
}
