//! The control API as the NATS micro service `dispatch`: endpoints
//! `<p>.api.status|cancel|list|errors|stats`, discoverable through
//! `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS`. Replies follow PROTOCOL.md:
//! `{"ok": true, …}` or `{"ok": false, "error": {…}}`.
//!
//! In mode `core` a node answers from its own registry, and the service's
//! queue group sends each request to one node: with several core nodes, a
//! status request may reach a node that never saw the task. In mode
//! `jetstream`, `status` and `list` read the shared KV records (any node
//! answers for the whole cluster); `cancel` of a task no node has taken
//! yet ends its record `cancelled` at once, and of a task another node
//! holds (or held last) goes through the cancel bucket.

use async_nats::jetstream::kv;
use async_nats::service::{Service, ServiceExt};
use dispatcher_actors::{
    CancelOutcome, DispatchError, Dispatcher, ErrorCode, ErrorInfo, EventBody, ListFilter, TaskId,
    TaskKind, TaskRecord, TaskStatus,
};
use std::panic::AssertUnwindSafe;

use futures::{FutureExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tracing::warn;

use crate::jetstream::cancels::Unheld;
use crate::jetstream::cluster::Cluster;
use crate::jetstream::records::RecordMirror;
use crate::jetstream::{cancels, replay};
use crate::subjects::{ApiEndpoint, Subjects, QUEUE_GROUP, SERVICE_NAME};
use crate::wire;

/// Keys a cluster-wide `list` reads at most.
pub const MAX_LIST_SCAN: usize = 100_000;

/// The shared state of mode `jetstream`.
#[derive(Clone)]
pub struct Shared {
    /// Task records.
    pub records: kv::Store,
    /// Cancel requests.
    pub cancels: kv::Store,
    /// The task stream, for the backlog of its consumers.
    pub tasks: async_nats::jetstream::stream::Stream,
    /// JetStream, for replays.
    pub js: async_nats::jetstream::Context,
    /// The subjects of the deployment.
    pub subjects: Subjects,
    /// Reads tasks as the nodes do, for replays.
    pub reader: crate::inbound::Reader,
    /// This node's record mirror, told of records the service writes.
    pub mirror: RecordMirror,
}

/// Most records or errors one `list` or `errors` request returns.
pub const MAX_LIST_LIMIT: usize = 10_000;

/// Starts the service; its endpoints are served until the tasks are aborted.
pub async fn start(
    client: async_nats::Client,
    subjects: Subjects,
    dispatcher: Dispatcher,
    shared: Option<Shared>,
    cluster: Cluster,
) -> Result<(Service, Vec<JoinHandle<()>>), async_nats::Error> {
    let service = client
        .service_builder()
        .description("dispatcher control API: status, cancel, list, errors, stats, nodes, replay")
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
        let shared = shared.clone();
        let cluster = cluster.clone();
        let reply_subjects = subjects.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(request) = requests.next().await {
                // Answered only on a reply subject where a node's publish
                // means nothing (not a KV key, an ack, the JetStream API).
                let safe = request
                    .message
                    .reply
                    .as_ref()
                    .is_some_and(|to| reply_subjects.is_reply_safe(to));
                if !safe {
                    warn!(
                        endpoint = endpoint.as_str(),
                        "Control request with an unsafe reply subject ignored."
                    );
                    continue;
                }
                let context = Context {
                    dispatcher: &dispatcher,
                    shared: shared.as_ref(),
                    cluster: &cluster,
                };
                // No request can take the node down: a panic answers `internal`.
                let reply = AssertUnwindSafe(answer(endpoint, &context, &request.message.payload))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|_| {
                        wire::error(&ErrorInfo::new(
                            ErrorCode::Internal,
                            "the request could not be answered",
                        ))
                    });
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

/// What an answer may read.
struct Context<'a> {
    dispatcher: &'a Dispatcher,
    shared: Option<&'a Shared>,
    cluster: &'a Cluster,
}

async fn answer(endpoint: ApiEndpoint, context: &Context<'_>, body: &[u8]) -> Value {
    match try_answer(endpoint, context, body).await {
        Ok(v) => v,
        Err(info) => wire::error(&info),
    }
}

async fn try_answer(
    endpoint: ApiEndpoint,
    context: &Context<'_>,
    body: &[u8],
) -> Result<Value, ErrorInfo> {
    let (d, shared) = (context.dispatcher, context.shared);
    let info = |e: DispatchError| e.to_info();
    match endpoint {
        ApiEndpoint::Status => {
            let req: IdRequest = parse(body, false)?;
            let id = TaskId::new(req.id)?;
            if let Some(shared) = shared {
                if let Some(task) = stored_record(shared, &id).await? {
                    return Ok(json!({"ok": true, "task": task}));
                }
            }
            let task = d.status(&id).await.map_err(info)?;
            Ok(json!({"ok": true, "task": task}))
        }
        ApiEndpoint::Cancel => {
            let req: IdRequest = parse(body, false)?;
            let id = TaskId::new(req.id)?;
            match (d.cancel(&id).await, shared) {
                (Ok(outcome), _) => Ok(json!({"ok": true, "status": outcome.as_str()})),
                (Err(DispatchError::NotFound(_)), Some(shared)) => {
                    let unheld = cancels::cancel_unheld(&shared.records, &id, d.node())
                        .await
                        .map_err(|e| unavailable("cancelling the task", e))?;
                    match unheld {
                        Unheld::Missing => return Err(info(DispatchError::NotFound(id))),
                        Unheld::Finished => return Err(info(DispatchError::AlreadyFinished(id))),
                        Unheld::Cancelled {
                            event,
                            record,
                            revision,
                        } => {
                            // The mirror starts from the record written, so
                            // the event finds its change there already.
                            shared.mirror.seed(*record, Some(revision));
                            d.announce_event(event);
                            let status = CancelOutcome::Cancelled.as_str();
                            return Ok(json!({"ok": true, "status": status}));
                        }
                        Unheld::Held => {}
                    }
                    cancels::request(&shared.cancels, &id).await.map_err(|e| {
                        info(DispatchError::Unavailable(format!(
                            "the cancel request could not be stored: {e}"
                        )))
                    })?;
                    Ok(json!({"ok": true, "status": CancelOutcome::Cancelling.as_str()}))
                }
                (Err(e), _) => Err(info(e)),
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
            let tasks = match shared {
                Some(shared) => list_stored(shared, &filter).await?,
                None => d.list(filter).await.map_err(info)?,
            };
            Ok(json!({"ok": true, "tasks": tasks}))
        }
        ApiEndpoint::Errors => {
            let req: LimitRequest = parse(body, true)?;
            let errors = d.errors(limit(req.limit)?).await.map_err(info)?;
            Ok(json!({"ok": true, "errors": errors}))
        }
        ApiEndpoint::Stats => {
            let stats = d.stats().await.map_err(info)?;
            let nodes = context.cluster.nodes();
            let mut reply = json!({
                "ok": true,
                "node": d.node(),
                "stats": stats,
                "cluster": {"nodes": nodes.len(), "totals": totals(&nodes)},
                "nodes": nodes,
            });
            if let Some(shared) = shared {
                reply["backlog"] = json!(backlog(shared).await?);
            }
            Ok(reply)
        }
        ApiEndpoint::Nodes => Ok(json!({"ok": true, "nodes": context.cluster.nodes()})),
        ApiEndpoint::Replay => {
            let req: IdRequest = parse(body, false)?;
            let id = TaskId::new(req.id)?;
            let Some(shared) = shared else {
                return Err(ErrorInfo::new(
                    ErrorCode::Unavailable,
                    "replay needs mode jetstream (dead letters live in JetStream)",
                ));
            };
            let task =
                replay::replay(&shared.js, &shared.subjects, &shared.reader, d.node(), &id).await?;
            d.announce(
                &task,
                EventBody::Accepted {
                    priority: task.priority,
                },
            );
            Ok(json!({"ok": true, "id": id, "replayed": true}))
        }
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> ErrorInfo {
    DispatchError::Unavailable(format!("{what}: {e}")).to_info()
}

/// The shared record of `id`, if KV has one.
async fn stored_record(shared: &Shared, id: &TaskId) -> Result<Option<TaskRecord>, ErrorInfo> {
    let Some(bytes) = shared
        .records
        .get(id.as_str())
        .await
        .map_err(|e| unavailable("reading the task record", e))?
    else {
        return Ok(None);
    };
    Ok(serde_json::from_slice(&bytes).ok())
}

/// Records from KV that match `filter`, newest first; reads at most
/// [`MAX_LIST_SCAN`] keys.
async fn list_stored(shared: &Shared, filter: &ListFilter) -> Result<Vec<TaskRecord>, ErrorInfo> {
    let keys = shared
        .records
        .keys()
        .await
        .map_err(|e| unavailable("listing task records", e))?;
    let records = shared.records.clone();
    let mut found: Vec<TaskRecord> = keys
        .take(MAX_LIST_SCAN)
        .filter_map(|k| async move { k.ok() })
        .map(|key| {
            let records = records.clone();
            async move { records.get(key).await.ok().flatten() }
        })
        .buffer_unordered(64)
        .filter_map(|bytes| async move { serde_json::from_slice::<TaskRecord>(&bytes?).ok() })
        .filter(|r| {
            let keep = filter.status.is_none_or(|s| r.status == s)
                && filter.kind.as_ref().is_none_or(|k| &r.kind == k);
            async move { keep }
        })
        .collect()
        .await;
    found.sort_by_key(|r| std::cmp::Reverse(r.created_at));
    found.truncate(filter.limit);
    Ok(found)
}

/// Sums the counters of the nodes' latest snapshots.
fn totals(nodes: &[Value]) -> Value {
    const SUMMED: [&str; 11] = [
        "submitted",
        "completed",
        "failed",
        "cancelled",
        "timed_out",
        "rejected",
        "retried",
        "running",
        "queued",
        "workers",
        "worker_restarts",
    ];
    let mut totals = serde_json::Map::new();
    for key in SUMMED {
        let sum: u64 = nodes.iter().filter_map(|n| n["stats"][key].as_u64()).sum();
        totals.insert(key.to_owned(), json!(sum));
    }
    Value::Object(totals)
}

/// Tasks waiting in the stream and delivered but unacknowledged, per
/// consumer (kind and priority).
async fn backlog(shared: &Shared) -> Result<Vec<Value>, ErrorInfo> {
    let mut consumers = shared.tasks.consumers();
    let mut out = Vec::new();
    while let Some(info) = consumers.next().await {
        let info = info.map_err(|e| unavailable("reading the consumers", e))?;
        out.push(json!({
            "consumer": info.name,
            "subject": info.config.filter_subject,
            "pending": info.num_pending,
            "unacknowledged": info.num_ack_pending,
        }));
    }
    Ok(out)
}
