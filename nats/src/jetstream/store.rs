//! The gateway's durable submit: the task record is created in KV with
//! create-if-absent (so `duplicate_id` holds across nodes and restarts),
//! then the task is published to `<p>.tasks.<kind>.<priority>` with
//! `Nats-Msg-Id` = task id, and the reply goes out only once JetStream has
//! acknowledged it. The tasks of a batch are stored concurrently.

use async_nats::jetstream::kv::CreateErrorKind;
use async_nats::HeaderMap;
use bytes::Bytes;
use dispatcher_actors::{
    DispatchError, Dispatcher, EventBody, Submitted, Task, TaskRecord, TaskStatus,
};
use futures::future::join_all;
use tracing::warn;

use super::records::RecordMirror;
use super::Durable;
use crate::inbound::digest;
use crate::subjects::{
    Subjects, CONTENT_TYPE_JSON, HEADER_ACCEPTED, HEADER_CONTENT_TYPE, HEADER_MSG_ID,
};

/// Stores validated tasks durably.
#[derive(Clone)]
pub struct DurableStore {
    durable: Durable,
    subjects: Subjects,
    dispatcher: Dispatcher,
    mirror: RecordMirror,
    duplicate_window: std::time::Duration,
}

impl DurableStore {
    /// A store on `durable`; the records it creates seed `mirror`;
    /// `duplicate_window` is the task stream's.
    pub fn new(
        durable: Durable,
        subjects: Subjects,
        dispatcher: Dispatcher,
        mirror: RecordMirror,
        duplicate_window: std::time::Duration,
    ) -> Self {
        Self {
            durable,
            subjects,
            dispatcher,
            mirror,
            duplicate_window,
        }
    }

    /// Stores each task with its body (from
    /// [`Reader::stored_body`](crate::inbound::Reader::stored_body));
    /// answers in the same order. Every refusal also goes out as a
    /// `rejected` event.
    pub async fn submit(
        &self,
        tasks: Vec<(Task, Vec<u8>)>,
    ) -> Vec<Result<Submitted, DispatchError>> {
        join_all(tasks.into_iter().map(|(t, body)| self.one(t, body))).await
    }

    async fn one(&self, task: Task, body: Vec<u8>) -> Result<Submitted, DispatchError> {
        let result = self.store(&task, body.into()).await;
        match &result {
            Ok(_) => self.dispatcher.announce(
                &task,
                EventBody::Accepted {
                    priority: task.priority,
                },
            ),
            Err(e) => self.dispatcher.reject(
                Some(task.id.as_str()),
                Some(task.kind.as_str()),
                e.to_info(),
            ),
        }
        result
    }

    async fn store(&self, task: &Task, body: Bytes) -> Result<Submitted, DispatchError> {
        let id = task.id.as_str();
        let mut record = TaskRecord::queued(task, self.dispatcher.node());
        record.node = None;
        record.digest = Some(digest(&body));
        let value = serde_json::to_vec(&record).map_err(|e| internal(&e))?;
        match self.durable.records.create(id, value.into()).await {
            // If this node runs it, its first write needs no read.
            Ok(revision) => self.mirror.seed(record, Some(revision)),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {
                return self.again(task, body).await;
            }
            Err(e) => {
                return Err(DispatchError::Unavailable(format!(
                    "the task record could not be stored: {e}"
                )))
            }
        }
        let stored = self.publish(task, body).await;
        if let Err(e) = stored {
            // Free the id so that the client may try again.
            if let Err(del) = self.durable.records.delete(id).await {
                warn!(task_id = %id, error = %del, "Record of an unstored task not removed.");
            }
            return Err(DispatchError::Unavailable(format!(
                "JetStream did not store the task: {e}"
            )));
        }
        Ok(Submitted {
            id: task.id.clone(),
            kind: task.kind.clone(),
            priority: task.priority,
        })
    }
}

impl DurableStore {
    /// Publishes the task with `Nats-Msg-Id` = its id, retried with the
    /// same id (a retry of a publish that was stored after all is dropped
    /// as a duplicate). Answers whether JetStream had it already.
    async fn publish(&self, task: &Task, body: Bytes) -> Result<bool, String> {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_MSG_ID, task.id.as_str());
        headers.insert(HEADER_CONTENT_TYPE, CONTENT_TYPE_JSON);
        headers.insert(HEADER_ACCEPTED, "1");
        let subject = self.subjects.task(task.kind.as_str(), task.priority);
        let mut last = String::new();
        let mut pause = std::time::Duration::from_millis(100);
        for _ in 0..4 {
            let stored = match self
                .durable
                .js
                .publish_with_headers(subject.clone(), headers.clone(), body.clone())
                .await
            {
                Ok(ack) => ack.await.map(|a| a.duplicate).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match stored {
                Ok(duplicate) => return Ok(duplicate),
                Err(e) => last = e,
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
        Err(last)
    }

    /// A submission whose id has a record already. A client that retries
    /// a submit whose reply it never got (the server went away between the
    /// record and the publish) should not be told `duplicate_id` for a
    /// task that was never queued: if the record is still `queued` and
    /// younger than the duplicate window, the task is published again
    /// with the same `Nats-Msg-Id`, and JetStream says whether it had it.
    async fn again(&self, task: &Task, body: Bytes) -> Result<Submitted, DispatchError> {
        let duplicate = || Err(DispatchError::DuplicateId(task.id.clone()));
        let Ok(Some(bytes)) = self.durable.records.get(task.id.as_str()).await else {
            return duplicate();
        };
        let Ok(record) = serde_json::from_slice::<TaskRecord>(&bytes) else {
            return duplicate();
        };
        let age_ms = record
            .created_at
            .ms_until(dispatcher_actors::Timestamp::now());
        // Only the very same body may be published again: the record
        // names it (records written before digests existed name none).
        let same_body = record.digest.as_deref().is_none_or(|d| d == digest(&body));
        if record.status != TaskStatus::Queued
            || u128::from(age_ms) >= self.duplicate_window.as_millis()
            || !same_body
        {
            return duplicate();
        }
        match self.publish(task, body).await {
            Ok(false) => Ok(Submitted {
                id: task.id.clone(),
                kind: task.kind.clone(),
                priority: task.priority,
            }),
            _ => duplicate(),
        }
    }
}

fn internal(e: &serde_json::Error) -> DispatchError {
    DispatchError::Unavailable(format!("the task could not be encoded: {e}"))
}
