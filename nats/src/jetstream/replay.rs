//! The `replay` API: a task whose attempts were spent runs again, from its
//! dead letter. This is the one way a finished task runs again — a task
//! published on the queue with the id of a task that has a record is
//! refused `duplicate_id` — and it is an endpoint of its own
//! (`<p>.api.replay`), so that NATS permissions can grant it to operators
//! and not to every client.
//!
//! The task's record is reset to `queued` for the body stored anew (its
//! digest, checked when a node pulls it), the task is published with
//! `Dispatch-Replay`, and only then is the dead letter removed.

use async_nats::jetstream::kv::Operation;
use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use dispatcher_actors::{
    DispatchError, ErrorCode, ErrorInfo, NodeId, Priority, Task, TaskId, TaskKind, TaskRecord,
    TaskSpec,
};
use serde_json::Value;

use crate::inbound::{digest, Reader};
use crate::subjects::{
    Subjects, CONTENT_TYPE_JSON, HEADER_ACCEPTED, HEADER_CONTENT_TYPE, HEADER_MSG_ID, HEADER_REPLAY,
};

/// Dead letters read at most, newest first, looking for a task's.
pub const MAX_SCAN: u64 = 100_000;

/// Replays task `id` from its dead letter; answers the task as stored
/// again (the caller announces its `accepted`).
pub async fn replay(
    js: &jetstream::Context,
    subjects: &Subjects,
    reader: &Reader,
    node: &NodeId,
    id: &TaskId,
) -> Result<Task, ErrorInfo> {
    let unavailable = |what: &str, e: &dyn std::fmt::Display| {
        DispatchError::Unavailable(format!("{what}: {e}")).to_info()
    };
    let mut dead = js
        .get_stream(subjects.stream_dead())
        .await
        .map_err(|e| unavailable("the dead-letter stream", &e))?;
    let Some((seq, letter)) = find(&mut dead, id).await? else {
        return Err(ErrorInfo::field(
            ErrorCode::NotFound,
            "id",
            format!("no dead letter for task {id}"),
        ));
    };
    let invalid = |message: String| ErrorInfo::new(ErrorCode::InvalidField, message);
    let spec: TaskSpec = serde_json::from_value(letter["task"].clone())
        .map_err(|e| invalid(format!("the dead letter of {id} holds no task: {e}")))?;
    let kind = TaskKind::new(letter["kind"].as_str().unwrap_or_default()).map_err(|e| {
        invalid(format!(
            "the dead letter of {id} names no kind: {}",
            e.message
        ))
    })?;
    let priority = spec
        .priority
        .as_deref()
        .and_then(Priority::parse)
        .unwrap_or(Priority::Normal);
    let body = serde_json::to_vec(&spec).map_err(|e| unavailable("encoding", &e))?;
    let subject = subjects.task(kind.as_str(), priority);
    let task = reader
        .queued(&subject, Some(CONTENT_TYPE_JSON), &body)
        .map_err(|r| {
            invalid(format!(
                "the dead task is not valid any more: {}",
                r.error.message
            ))
        })?;
    if task.id != *id {
        return Err(invalid(format!(
            "the dead letter of {id} holds task {}",
            task.id
        )));
    }
    let body = reader.stored_body(&task).map_err(|r| r.error)?;
    let records = js
        .get_key_value(subjects.bucket_tasks())
        .await
        .map_err(|e| unavailable("the task records", &e))?;
    let mut record = TaskRecord::queued(&task, node);
    record.node = None;
    record.attempt = 0;
    record.digest = Some(digest(&body));
    let value = serde_json::to_vec(&record).map_err(|e| unavailable("encoding", &e))?;
    let entry = records
        .entry(id.as_str())
        .await
        .map_err(|e| unavailable("the task record", &e))?;
    let written = match entry {
        Some(entry) if entry.operation == Operation::Put => {
            let old: Option<TaskRecord> = serde_json::from_slice(&entry.value).ok();
            if old.is_some_and(|r| !r.status.is_final()) {
                return Err(ErrorInfo::field(
                    ErrorCode::InvalidField,
                    "id",
                    format!("task {id} is not over; only a finished task is replayed"),
                ));
            }
            records
                .update(id.as_str(), value.into(), entry.revision)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        _ => records
            .create(id.as_str(), value.into())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
    };
    written.map_err(|e| unavailable("the task record was not reset (try again)", &e))?;
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_MSG_ID, format!("{id}:replay:{seq}").as_str());
    headers.insert(HEADER_CONTENT_TYPE, CONTENT_TYPE_JSON);
    headers.insert(HEADER_ACCEPTED, "1");
    headers.insert(HEADER_REPLAY, "1");
    let published = js
        .publish_with_headers(
            subjects.task(task.kind.as_str(), task.priority),
            headers,
            body.into(),
        )
        .await
        .map_err(|e| unavailable("JetStream", &e))?;
    published
        .await
        .map_err(|e| unavailable("JetStream did not store the replayed task", &e))?;
    dead.delete_message(seq)
        .await
        .map_err(|e| unavailable("replayed, but the dead letter was not removed", &e))?;
    Ok(task)
}

/// The newest dead letter of task `id`, with its sequence.
async fn find(dead: &mut stream::Stream, id: &TaskId) -> Result<Option<(u64, Value)>, ErrorInfo> {
    let state = dead
        .info()
        .await
        .map_err(|e| DispatchError::Unavailable(format!("the dead-letter stream: {e}")).to_info())?
        .state
        .clone();
    if state.messages == 0 {
        return Ok(None);
    }
    let floor = state
        .first_sequence
        .max(state.last_sequence.saturating_sub(MAX_SCAN));
    let mut seq = state.last_sequence;
    while seq >= floor && seq > 0 {
        if let Ok(msg) = dead.get_raw_message(seq).await {
            if let Ok(letter) = serde_json::from_slice::<Value>(&msg.payload) {
                if letter["id"] == id.as_str() {
                    return Ok(Some((seq, letter)));
                }
            }
        }
        seq -= 1;
    }
    Ok(None)
}
