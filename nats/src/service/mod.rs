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
//!
//! Requests are answered concurrently: each is answered on a task of its
//! own, at most [`MAX_CONCURRENT_REQUESTS`] per endpoint at once (past it,
//! requests wait in the subscription). In mode `jetstream`, `list` pages
//! backwards through the record bucket's stream with a cursor (see
//! [`crate::jetstream::scan`]), `errors` reads the cluster's error stream,
//! and `stats` answers for the cluster: the live nodes' latest figures
//! summed, their durations merged.

use async_nats::jetstream::kv;
use async_nats::service::{Service, ServiceExt};
use dispatcher_actors::{
    CancelOutcome, DispatchError, Dispatcher, ErrorCode, ErrorInfo, EventBody, ListFilter, TaskId,
    TaskKind, TaskRecord, TaskStatus,
};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::jetstream::cancels::Unheld;
use crate::jetstream::cluster::Cluster;
use crate::jetstream::errors::{self, ErrorFilter};
use crate::jetstream::records::RecordMirror;
use crate::jetstream::scan::{self, ScanError};
use crate::jetstream::{cancels, replay};
use crate::subjects::{ApiEndpoint, Subjects, QUEUE_GROUP, SERVICE_NAME};
use crate::wire;

mod stats;

/// Requests one endpoint answers at once, at most.
pub const MAX_CONCURRENT_REQUESTS: usize = 32;

/// Sequences of the record bucket's stream one `list` page reads at most:
/// eight per record asked for, at least 10 000, at most 100 000. A page
/// that runs out of them returns what it found and a `next` cursor.
pub fn list_scan_budget(limit: usize) -> u64 {
    (limit as u64).saturating_mul(8).clamp(10_000, 100_000)
}

/// KV header naming a delete or purge marker.
const KV_OPERATION: &str = "KV-Operation";

/// The shared state of mode `jetstream`.
#[derive(Clone)]
pub struct Shared {
    /// Task records.
    pub records: kv::Store,
    /// Cancel requests.
    pub cancels: kv::Store,
    /// The task stream, for the backlog of its consumers.
    pub tasks: async_nats::jetstream::stream::Stream,
    /// The cluster's error stream.
    pub errors: async_nats::jetstream::stream::Stream,
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
        let context = Arc::new(Context {
            dispatcher: dispatcher.clone(),
            shared: shared.clone(),
            cluster: cluster.clone(),
        });
        let reply_subjects = subjects.clone();
        let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_REQUESTS));
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
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let context = context.clone();
                tokio::spawn(async move {
                    // No request can take the node down: a panic answers `internal`.
                    let reply =
                        AssertUnwindSafe(answer(endpoint, &context, &request.message.payload))
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
                    drop(permit);
                });
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
    cursor: Option<String>,
}

#[derive(Deserialize, Default)]
struct ErrorsRequest {
    limit: Option<usize>,
    kind: Option<String>,
    status: Option<String>,
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

/// The cursor of a `list` request: a decimal number (a stream sequence in
/// mode `jetstream`, an offset in mode `core`).
fn cursor(given: Option<&str>) -> Result<Option<u64>, ErrorInfo> {
    given
        .map(|c| {
            c.parse::<u64>().map_err(|_| {
                ErrorInfo::field(
                    ErrorCode::InvalidField,
                    "cursor",
                    "cursor must be the `next` of a previous reply",
                )
            })
        })
        .transpose()
}

/// What an answer may read.
struct Context {
    dispatcher: Dispatcher,
    shared: Option<Shared>,
    cluster: Cluster,
}

async fn answer(endpoint: ApiEndpoint, context: &Context, body: &[u8]) -> Value {
    match try_answer(endpoint, context, body).await {
        Ok(v) => v,
        Err(info) => wire::error(&info),
    }
}

async fn try_answer(
    endpoint: ApiEndpoint,
    context: &Context,
    body: &[u8],
) -> Result<Value, ErrorInfo> {
    let (d, shared) = (&context.dispatcher, context.shared.as_ref());
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
            let from = cursor(req.cursor.as_deref())?;
            let (tasks, next) = match shared {
                Some(shared) => list_stored(shared, &filter, from).await?,
                None => list_local(d, filter, from).await?,
            };
            Ok(json!({"ok": true, "tasks": tasks, "next": next.map(|n| n.to_string())}))
        }
        ApiEndpoint::Errors => {
            let req: ErrorsRequest = parse(body, true)?;
            let status = match req.status.as_deref() {
                None => None,
                Some(s) => Some(
                    TaskStatus::parse(s)
                        .filter(|s| {
                            matches!(
                                s,
                                TaskStatus::Retrying | TaskStatus::Failed | TaskStatus::TimedOut
                            )
                        })
                        .ok_or_else(|| {
                            ErrorInfo::field(
                                ErrorCode::InvalidField,
                                "status",
                                "status must be one of retrying, failed, timed_out",
                            )
                        })?,
                ),
            };
            let filter = ErrorFilter {
                kind: req.kind.map(TaskKind::new).transpose()?,
                status,
            };
            let limit = limit(req.limit)?;
            let errors = match shared {
                Some(shared) => errors::newest(&shared.errors, &filter, limit)
                    .await
                    .map_err(|e| unavailable("reading the error stream", e))?,
                None => {
                    let mut all = d.errors(usize::MAX).await.map_err(info)?;
                    all.retain(|e| filter.matches(e));
                    all.truncate(limit);
                    all
                }
            };
            Ok(json!({"ok": true, "errors": errors}))
        }
        ApiEndpoint::Stats => stats::answer(d, shared, &context.cluster).await,
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

/// A page of records from KV that match `filter`, newest write first,
/// from the sequence `from` of the bucket's stream down (the newest if
/// `None`); with the cursor to go on from.
async fn list_stored(
    shared: &Shared,
    filter: &ListFilter,
    from: Option<u64>,
) -> Result<(Vec<TaskRecord>, Option<u64>), ErrorInfo> {
    let page = scan::backwards(
        &shared.records.stream,
        from,
        filter.limit,
        list_scan_budget(filter.limit),
        |msg| {
            let marker = msg
                .headers
                .get(KV_OPERATION)
                .is_some_and(|op| op.as_str() != "PUT");
            if marker {
                return None;
            }
            serde_json::from_slice::<TaskRecord>(&msg.payload)
                .ok()
                .filter(|r| {
                    filter.status.is_none_or(|s| r.status == s)
                        && filter.kind.as_ref().is_none_or(|k| &r.kind == k)
                })
        },
    )
    .await
    .map_err(|e: ScanError| unavailable("listing task records", e))?;
    Ok((page.items, page.next))
}

/// A page of this node's own records (mode `core`), newest first; the
/// cursor is the number of records skipped.
async fn list_local(
    d: &Dispatcher,
    mut filter: ListFilter,
    from: Option<u64>,
) -> Result<(Vec<TaskRecord>, Option<u64>), ErrorInfo> {
    let skip = usize::try_from(from.unwrap_or(0)).unwrap_or(usize::MAX);
    let limit = filter.limit;
    filter.limit = skip.saturating_add(limit).saturating_add(1);
    let mut found = d.list(filter).await.map_err(|e| e.to_info())?;
    let more = found.len() > skip.saturating_add(limit);
    let page: Vec<TaskRecord> = found.drain(..).skip(skip).take(limit).collect();
    let next = more.then(|| (skip + limit) as u64);
    Ok((page, next))
}
