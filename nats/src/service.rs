//! The control API as the NATS micro service `dispatch`: endpoints
//! `<p>.api.status|cancel|list|errors|stats`, discoverable through
//! `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS`. Replies follow PROTOCOL.md:
//! `{"ok": true, …}` or `{"ok": false, "error": {…}}`.
//!
//! In mode `core` a node answers from its own registry, and the service's
//! queue group sends each request to one node: with several core nodes, a
//! status request may reach a node that never saw the task.

use async_nats::service::{Service, ServiceExt};
use dispatcher_actors::{
    DispatchError, Dispatcher, ErrorCode, ErrorInfo, ListFilter, TaskId, TaskKind, TaskStatus,
};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tracing::warn;

use crate::subjects::{ApiEndpoint, Subjects, QUEUE_GROUP, SERVICE_NAME};
use crate::wire;

/// Most records or errors one `list` or `errors` request returns.
pub const MAX_LIST_LIMIT: usize = 10_000;

/// Starts the service; its endpoints are served until the tasks are aborted.
pub async fn start(
    client: async_nats::Client,
    subjects: Subjects,
    dispatcher: Dispatcher,
) -> Result<(Service, Vec<JoinHandle<()>>), async_nats::Error> {
    let service = client
        .service_builder()
        .description("dispatcher control API: status, cancel, list, errors, stats")
        .queue_group(QUEUE_GROUP)
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await?;
    let mut tasks = Vec::new();
    for endpoint in ApiEndpoint::ALL {
        let mut requests = service
            .endpoint_builder()
            .name(endpoint.as_str())
            .add(subjects.api(endpoint))
            .await?;
        let dispatcher = dispatcher.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(request) = requests.next().await {
                let reply = answer(endpoint, &dispatcher, &request.message.payload).await;
                if let Err(e) = request.respond(Ok(wire::body(&reply))).await {
                    warn!(error = %e, "Control reply not sent.");
                }
            }
        }));
    }
    Ok((service, tasks))
}

#[derive(Deserialize, Default)]
struct IdRequest {
    id: String,
}

#[derive(Deserialize, Default)]
struct ListRequest {
    status: Option<String>,
    kind: Option<String>,
    limit: Option<usize>,
}

#[derive(Deserialize, Default)]
struct LimitRequest {
    limit: Option<usize>,
}

fn parse<T: for<'de> Deserialize<'de> + Default>(
    body: &[u8],
    empty_ok: bool,
) -> Result<T, ErrorInfo> {
    if body.iter().all(u8::is_ascii_whitespace) && empty_ok {
        return Ok(T::default());
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ErrorInfo::new(ErrorCode::InvalidJson, format!("invalid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ErrorInfo::new(
            ErrorCode::InvalidJson,
            "the request must be a JSON object",
        ));
    }
    serde_path_to_error::deserialize(v).map_err(|e| {
        ErrorInfo::field(
            ErrorCode::InvalidField,
            e.path().to_string(),
            e.inner().to_string(),
        )
    })
}

fn limit(requested: Option<usize>) -> Result<usize, ErrorInfo> {
    match requested.unwrap_or(100) {
        n @ 1..=MAX_LIST_LIMIT => Ok(n),
        n => Err(ErrorInfo::field(
            ErrorCode::InvalidField,
            "limit",
            format!("limit must be 1 to {MAX_LIST_LIMIT}, got {n}"),
        )),
    }
}

async fn answer(endpoint: ApiEndpoint, d: &Dispatcher, body: &[u8]) -> Value {
    match try_answer(endpoint, d, body).await {
        Ok(v) => v,
        Err(info) => wire::error(&info),
    }
}

async fn try_answer(
    endpoint: ApiEndpoint,
    d: &Dispatcher,
    body: &[u8],
) -> Result<Value, ErrorInfo> {
    let info = |e: DispatchError| e.to_info();
    match endpoint {
        ApiEndpoint::Status | ApiEndpoint::Cancel => {
            let req: IdRequest = parse(body, false)?;
            let id = TaskId::new(req.id)?;
            if endpoint == ApiEndpoint::Status {
                let task = d.status(&id).await.map_err(info)?;
                Ok(json!({"ok": true, "task": task}))
            } else {
                let outcome = d.cancel(&id).await.map_err(info)?;
                Ok(json!({"ok": true, "status": outcome.as_str()}))
            }
        }
        ApiEndpoint::List => {
            let req: ListRequest = parse(body, true)?;
            let status = match req.status.as_deref() {
                None => None,
                Some(s) => Some(TaskStatus::parse(s).ok_or_else(|| {
                    ErrorInfo::field(
                        ErrorCode::InvalidField,
                        "status",
                        "status must be one of queued, running, retrying, completed, failed, timed_out, cancelled",
                    )
                })?),
            };
            let kind = req.kind.map(TaskKind::new).transpose()?;
            let filter = ListFilter {
                status,
                kind,
                limit: limit(req.limit)?,
            };
            let tasks = d.list(filter).await.map_err(info)?;
            Ok(json!({"ok": true, "tasks": tasks}))
        }
        ApiEndpoint::Errors => {
            let req: LimitRequest = parse(body, true)?;
            let errors = d.errors(limit(req.limit)?).await.map_err(info)?;
            Ok(json!({"ok": true, "errors": errors}))
        }
        ApiEndpoint::Stats => {
            let stats = d.stats().await.map_err(info)?;
            Ok(json!({"ok": true, "stats": stats}))
        }
    }
}
