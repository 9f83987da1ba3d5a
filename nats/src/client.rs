//! A typed client for Rust programs that submit tasks to dispatcher nodes
//! and watch them, over NATS and protocol v1 (PROTOCOL.md). Clients in other
//! languages speak the same JSON directly; this module adds nothing to the
//! wire.
//!
//! [`Client`] owns no connection of its own: it wraps an
//! [`async_nats::Client`] and a subject prefix. Submissions go to
//! `<p>.submit.<kind>`, control requests to `<p>.api.*`, and events are read
//! from `<p>.events.*.<id>.*`. Every failure is a [`ClientError`].
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use dispatcher_actors::{EventBody, TaskSpec};
//! use dispatcher_nats::client::Client;
//! use serde_json::json;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let nats = async_nats::connect("nats://127.0.0.1:4222").await?;
//! let client = Client::new(nats, "dispatch")?;
//!
//! // Subscribes to the task's events first, then submits, so none is missed.
//! let spec = TaskSpec::new("echo", json!({"n": 7}));
//! let last = client.submit_and_wait(spec, Duration::from_secs(10)).await?;
//! if let EventBody::Completed { result, .. } = &last.body {
//!     println!("{} completed: {result}", last.task_id);
//! }
//!
//! let stats = client.stats().await?;
//! println!("{} completed so far", stats.completed);
//! # Ok(())
//! # }
//! ```

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::{RequestErrorKind, Subscriber};
use dispatcher_actors::dispatcher::CancelOutcome;
use dispatcher_actors::{
    ErrorCode, ErrorEntry, ErrorInfo, EventBody, ListFilter, Stats, TaskEvent, TaskId, TaskKind,
    TaskRecord, TaskSpec,
};
use futures::{Stream, StreamExt};
use serde::de::{DeserializeOwned, Error as _};
use serde_json::{json, Map, Value};
use tokio::time::Instant;
use tracing::{debug, warn};

pub use crate::jetstream::errors::ErrorFilter;
use crate::subjects::{ApiEndpoint, InvalidPrefix, Subjects};

/// How long a request waits for its reply unless [`Client::with_timeout`]
/// says otherwise.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a [`Client`] call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A node answered `{"ok": false, "error": …}`, or a `rejected` event
    /// ended a [`Client::wait`]: the server's code, message and field.
    #[error("rejected by the dispatcher: {0}")]
    Rejected(ErrorInfo),
    /// The request was not sent: a kind or id that cannot be a subject
    /// token, or a spec without a kind. Carries the code a node would have
    /// answered with.
    #[error("invalid request, not sent: {0}")]
    Invalid(ErrorInfo),
    /// Nobody listens on the subject: no dispatcher node is connected to
    /// this NATS server under this prefix.
    #[error(
        "no dispatcher node answers on `{subject}`: is one running, connected to the same \
         NATS server, with the same --prefix?"
    )]
    NoResponders {
        /// The request's subject.
        subject: String,
    },
    /// No reply, or no final event, in time.
    #[error("nothing arrived on `{subject}` within {after:?}")]
    Timeout {
        /// The request's subject, or the events subject [`Client::wait`] watched.
        subject: String,
        /// How long the call waited.
        after: Duration,
    },
    /// NATS failed: the connection, a subscription, or a message over the
    /// server's size limit.
    #[error("NATS failed on `{subject}`")]
    Nats {
        /// The subject of the request or subscription.
        subject: String,
        /// What NATS said.
        #[source]
        source: async_nats::Error,
    },
    /// A reply that is not protocol v1 (a node of another version, or
    /// something else answering on the subject).
    #[error("the reply on `{subject}` is not a protocol v1 answer")]
    Decode {
        /// The request's subject.
        subject: String,
        /// What did not fit.
        #[source]
        source: serde_json::Error,
    },
}

impl ClientError {
    /// The protocol error code of [`ClientError::Rejected`] and
    /// [`ClientError::Invalid`]; `None` for transport failures.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Rejected(info) | ClientError::Invalid(info) => Some(info.code),
            _ => None,
        }
    }

    fn nats(subject: &str, source: impl Into<async_nats::Error>) -> Self {
        ClientError::Nats {
            subject: subject.to_owned(),
            source: source.into(),
        }
    }

    fn decode(subject: &str, source: serde_json::Error) -> Self {
        ClientError::Decode {
            subject: subject.to_owned(),
            source,
        }
    }
}

/// A dispatcher client: submits tasks, follows their events and calls the
/// control API, all under one subject prefix. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    nats: async_nats::Client,
    subjects: Subjects,
    timeout: Duration,
}

impl Client {
    /// A client on `nats` for the nodes started with `--prefix prefix`
    /// (`dispatch` by default). Fails if the prefix is not dot-separated
    /// tokens of `[A-Za-z0-9_-]`.
    pub fn new(nats: async_nats::Client, prefix: &str) -> Result<Self, InvalidPrefix> {
        Ok(Self {
            nats,
            subjects: Subjects::new(prefix)?,
            timeout: DEFAULT_REQUEST_TIMEOUT,
        })
    }

    /// The same client with `timeout` for each request's reply (default
    /// [`DEFAULT_REQUEST_TIMEOUT`], 10 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The subjects it uses.
    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// The NATS connection underneath.
    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    /// Submits one task on `<p>.submit.<kind>`, `kind` taken from
    /// `spec.kind`, and returns its id (the spec's, or one the node
    /// generated).
    ///
    /// Only the kind is checked here, since it becomes a subject token; the
    /// node validates everything else and a refusal comes back as
    /// [`ClientError::Rejected`] with its code (`invalid_field`,
    /// `duplicate_id`, `queue_full`, …).
    ///
    /// To see every event of the task, subscribe first: use
    /// [`Client::submit_and_wait`], or give the spec an id and call
    /// [`Client::events`] before this.
    pub async fn submit(&self, spec: TaskSpec) -> Result<TaskId, ClientError> {
        let kind = spec_kind(&spec)?;
        let subject = self.subjects.submit(kind.as_str());
        let reply = self.request(&subject, encode_spec(&spec)).await?;
        parse_submitted(&subject, reply).and_then(|r| r.map_err(ClientError::Rejected))
    }

    /// Submits `specs` as one batch on `<p>.submit.<kind>` (an array body)
    /// and returns one result per spec, in order: a bad element fails alone,
    /// with the server's [`ErrorInfo`]. The whole call fails only if the
    /// batch as a whole is refused (for example `payload_too_large`) or does
    /// not reach a node.
    pub async fn submit_batch(
        &self,
        kind: &TaskKind,
        specs: Vec<TaskSpec>,
    ) -> Result<Vec<Result<TaskId, ErrorInfo>>, ClientError> {
        let subject = self.subjects.submit(kind.as_str());
        let body = serde_json::to_vec(&specs).expect("a TaskSpec always serialises to JSON");
        let reply = self.request(&subject, body).await?;
        let mut fields = ok_fields(&subject, reply)?;
        let results: Vec<Value> = take(&subject, &mut fields, "results")?;
        if results.len() != specs.len() {
            return Err(ClientError::decode(
                &subject,
                serde_json::Error::custom(format!(
                    "{} results for a batch of {}",
                    results.len(),
                    specs.len()
                )),
            ));
        }
        results
            .into_iter()
            .map(|r| parse_submitted(&subject, r))
            .collect()
    }

    /// The record of task `id` (`<p>.api.status`); `not_found` comes back as
    /// [`ClientError::Rejected`].
    ///
    /// In mode `core` one node answers, from its own registry: with several
    /// nodes it may be one that never saw the task.
    pub async fn status(&self, id: &TaskId) -> Result<TaskRecord, ClientError> {
        self.api(ApiEndpoint::Status, json!({ "id": id }), "task")
            .await
    }

    /// Cancels task `id` (`<p>.api.cancel`): [`CancelOutcome::Cancelled`] if
    /// it was waiting, [`CancelOutcome::Cancelling`] if it is running (its
    /// `cancelled` event follows once the handler stops). A finished task
    /// gives [`ClientError::Rejected`] with `already_finished`.
    pub async fn cancel(&self, id: &TaskId) -> Result<CancelOutcome, ClientError> {
        let subject = self.subjects.api(ApiEndpoint::Cancel);
        let word: String = self
            .api(ApiEndpoint::Cancel, json!({ "id": id }), "status")
            .await?;
        [CancelOutcome::Cancelled, CancelOutcome::Cancelling]
            .into_iter()
            .find(|o| o.as_str() == word)
            .ok_or_else(|| {
                ClientError::decode(
                    &subject,
                    serde_json::Error::custom(format!(
                        "cancel status {word:?} is neither `cancelled` nor `cancelling`"
                    )),
                )
            })
    }

    /// Runs a task whose attempts were spent again, from its dead letter
    /// (`<p>.api.replay`, mode `jetstream`). Its record starts over at
    /// `queued`, and the dead letter is removed.
    pub async fn replay(&self, id: &TaskId) -> Result<(), ClientError> {
        let _: bool = self
            .api(ApiEndpoint::Replay, json!({ "id": id }), "replayed")
            .await?;
        Ok(())
    }

    /// Task records matching `filter`, newest first (`<p>.api.list`): the
    /// first page only (see [`Client::list_page`] for the rest). The node
    /// caps `limit` at 10 000 and refuses 0.
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<TaskRecord>, ClientError> {
        Ok(self.list_page(filter, None).await?.0)
    }

    /// One page of task records matching `filter`, newest first, from
    /// `cursor` on (the first page with `None`), and the cursor of the
    /// next page (`None` after the last). A page may hold fewer than
    /// `filter.limit` records, even none, and still have a next one (a
    /// node reads a bounded part of the records per request): follow
    /// the cursor until it is `None`.
    ///
    /// ```no_run
    /// # use dispatcher_actors::ListFilter;
    /// # async fn run(client: dispatcher_nats::Client) -> Result<(), dispatcher_nats::ClientError> {
    /// let filter = ListFilter { limit: 1000, ..ListFilter::default() };
    /// let mut cursor = None;
    /// loop {
    ///     let (tasks, next) = client.list_page(&filter, cursor.as_deref()).await?;
    ///     println!("{} records", tasks.len());
    ///     match next {
    ///         Some(next) => cursor = Some(next),
    ///         None => break,
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn list_page(
        &self,
        filter: &ListFilter,
        cursor: Option<&str>,
    ) -> Result<(Vec<TaskRecord>, Option<String>), ClientError> {
        let mut body = Map::new();
        if let Some(status) = filter.status {
            body.insert("status".into(), status.as_str().into());
        }
        if let Some(kind) = &filter.kind {
            body.insert("kind".into(), kind.as_str().into());
        }
        body.insert("limit".into(), filter.limit.into());
        if let Some(cursor) = cursor {
            body.insert("cursor".into(), cursor.into());
        }
        let subject = self.subjects.api(ApiEndpoint::List);
        let reply = self
            .request(&subject, Value::Object(body).to_string().into_bytes())
            .await?;
        let mut fields = ok_fields(&subject, reply)?;
        let tasks = take(&subject, &mut fields, "tasks")?;
        // A node from before paging sends no `next`: one page in all.
        let next = match fields.remove("next") {
            None | Some(Value::Null) => None,
            Some(Value::String(next)) => Some(next),
            Some(other) => {
                return Err(ClientError::decode(
                    &subject,
                    serde_json::Error::custom(format!("`next` is not a string: {other}")),
                ))
            }
        };
        Ok((tasks, next))
    }

    /// The latest `limit` failed attempts, newest first (`<p>.api.errors`).
    pub async fn errors(&self, limit: usize) -> Result<Vec<ErrorEntry>, ClientError> {
        self.errors_matching(&ErrorFilter::default(), limit).await
    }

    /// The latest `limit` failed attempts that pass `filter` (kind, and
    /// the status the attempt led to: `retrying`, `failed` or
    /// `timed_out`), newest first (`<p>.api.errors`). In mode
    /// `jetstream` the list is the whole cluster's and outlives nodes.
    pub async fn errors_matching(
        &self,
        filter: &ErrorFilter,
        limit: usize,
    ) -> Result<Vec<ErrorEntry>, ClientError> {
        let mut body = json!({ "limit": limit });
        if let Some(kind) = &filter.kind {
            body["kind"] = kind.as_str().into();
        }
        if let Some(status) = filter.status {
            body["status"] = status.as_str().into();
        }
        self.api(ApiEndpoint::Errors, body, "errors").await
    }

    /// The counters and gauges of `<p>.api.stats`: in mode `jetstream`
    /// the whole cluster's (the live nodes' summed, durations merged), in
    /// mode `core` those of the node that answers.
    pub async fn stats(&self) -> Result<Stats, ClientError> {
        self.api(ApiEndpoint::Stats, json!({}), "stats").await
    }

    /// Subscribes to task `id`'s events (`<p>.events.*.<id>.*`). The
    /// subscription is in place on the server when this returns, so a task
    /// submitted afterwards is seen from its `accepted` event on.
    ///
    /// The stream yields events in the order they arrive and ends after the
    /// final one (`completed`, `failed`, `timed_out` or `cancelled`), or if
    /// the connection closes. Messages that are not task events are skipped
    /// with a warning.
    pub async fn events(&self, id: &TaskId) -> Result<TaskEvents, ClientError> {
        let subject = self.subjects.task_events(id.as_str());
        let sub = self
            .nats
            .subscribe(subject.clone())
            .await
            .map_err(|e| ClientError::nats(&subject, e))?;
        self.nats
            .flush()
            .await
            .map_err(|e| ClientError::nats(&subject, e))?;
        Ok(TaskEvents {
            sub: Some(sub),
            subject,
        })
    }

    /// Waits up to `within` for task `id`'s final event and returns it,
    /// whatever it is: inspect [`TaskEvent::body`] for the result or the
    /// error.
    ///
    /// A `rejected` event for the id ends the wait with
    /// [`ClientError::Rejected`] (a task published straight onto the queue
    /// and refused there), except `duplicate_id`, which leaves the first
    /// task running. Events published before this call are not seen: for a
    /// task that may already have finished, check [`Client::status`]; to
    /// submit and wait without a race, use [`Client::submit_and_wait`].
    pub async fn wait(&self, id: &TaskId, within: Duration) -> Result<TaskEvent, ClientError> {
        let deadline = Instant::now() + within;
        let events = self.events_by(id, deadline, within).await?;
        wait_final(events, deadline, within, true).await
    }

    /// Subscribes to the task's events, submits it, and waits up to
    /// `within` (submission included) for its final event. A spec without
    /// an id gets a fresh UUIDv7 here, so that the events can be followed
    /// from the start. A refused submission returns
    /// [`ClientError::Rejected`]; a task that runs and fails returns its
    /// `failed` (or `timed_out`, `cancelled`) event.
    pub async fn submit_and_wait(
        &self,
        mut spec: TaskSpec,
        within: Duration,
    ) -> Result<TaskEvent, ClientError> {
        let deadline = Instant::now() + within;
        let kind = spec_kind(&spec)?;
        let id = match &spec.id {
            Some(id) => TaskId::new(id.as_str()).map_err(ClientError::Invalid)?,
            None => TaskId::generate(),
        };
        spec.id = Some(id.as_str().to_owned());
        let events = self.events_by(&id, deadline, within).await?;
        let subject = self.subjects.submit(kind.as_str());
        let timeout = self
            .timeout
            .min(deadline.saturating_duration_since(Instant::now()));
        let reply = self
            .request_within(&subject, encode_spec(&spec), timeout)
            .await?;
        let submitted = parse_submitted(&subject, reply)?.map_err(ClientError::Rejected)?;
        debug!(task_id = %submitted, kind = %kind, "Task submitted, waiting for its end.");
        // The submission was accepted: later `rejected` events for this id
        // come from someone else's resubmission and do not end the wait.
        wait_final(events, deadline, within, false).await
    }

    /// [`Client::events`], given up at `deadline`.
    async fn events_by(
        &self,
        id: &TaskId,
        deadline: Instant,
        within: Duration,
    ) -> Result<TaskEvents, ClientError> {
        tokio::time::timeout_at(deadline, self.events(id))
            .await
            .map_err(|_| ClientError::Timeout {
                subject: self.subjects.task_events(id.as_str()),
                after: within,
            })?
    }

    /// Sends `body` to `<p>.api.<endpoint>` and reads `field` of the ok
    /// reply.
    async fn api<T: DeserializeOwned>(
        &self,
        endpoint: ApiEndpoint,
        body: Value,
        field: &str,
    ) -> Result<T, ClientError> {
        let subject = self.subjects.api(endpoint);
        let reply = self
            .request(&subject, body.to_string().into_bytes())
            .await?;
        let mut fields = ok_fields(&subject, reply)?;
        take(&subject, &mut fields, field)
    }

    async fn request(&self, subject: &str, body: Vec<u8>) -> Result<Value, ClientError> {
        self.request_within(subject, body, self.timeout).await
    }

    async fn request_within(
        &self,
        subject: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let request = async_nats::Request::new()
            .payload(body.into())
            .timeout(Some(timeout));
        let msg = self
            .nats
            .send_request(subject.to_owned(), request)
            .await
            .map_err(|e| match e.kind() {
                RequestErrorKind::NoResponders => ClientError::NoResponders {
                    subject: subject.to_owned(),
                },
                RequestErrorKind::TimedOut => ClientError::Timeout {
                    subject: subject.to_owned(),
                    after: timeout,
                },
                _ => ClientError::nats(subject, e),
            })?;
        serde_json::from_slice(&msg.payload).map_err(|e| ClientError::decode(subject, e))
    }
}

/// The events of one task, as [`Client::events`] returns them: a
/// [`Stream`] of [`TaskEvent`]s that ends after the final event.
/// Dropping it unsubscribes.
#[derive(Debug)]
pub struct TaskEvents {
    sub: Option<Subscriber>,
    subject: String,
}

impl TaskEvents {
    /// The subject it listens on.
    pub fn subject(&self) -> &str {
        &self.subject
    }
}

impl Stream for TaskEvents {
    type Item = TaskEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<TaskEvent>> {
        loop {
            let Some(sub) = self.sub.as_mut() else {
                return Poll::Ready(None);
            };
            let Some(msg) = futures::ready!(sub.poll_next_unpin(cx)) else {
                self.sub = None;
                return Poll::Ready(None);
            };
            match serde_json::from_slice::<TaskEvent>(&msg.payload) {
                Ok(event) => {
                    if event.name().is_final() {
                        self.sub = None;
                    }
                    return Poll::Ready(Some(event));
                }
                Err(e) => {
                    warn!(subject = %msg.subject, error = %e, "Skipped a message that is not a task event.");
                }
            }
        }
    }
}

/// Reads `events` until the final one, or until `deadline`.
async fn wait_final(
    mut events: TaskEvents,
    deadline: Instant,
    within: Duration,
    stop_on_rejected: bool,
) -> Result<TaskEvent, ClientError> {
    let timeout = |events: &TaskEvents| ClientError::Timeout {
        subject: events.subject.clone(),
        after: within,
    };
    loop {
        let next = tokio::time::timeout_at(deadline, events.next())
            .await
            .map_err(|_| timeout(&events))?;
        let Some(event) = next else {
            return Err(ClientError::nats(
                &events.subject,
                "the subscription ended before the task's final event (connection closed?)",
            ));
        };
        if event.name().is_final() {
            return Ok(event);
        }
        if let EventBody::Rejected { error, .. } = event.body {
            if stop_on_rejected && error.code != ErrorCode::DuplicateId {
                return Err(ClientError::Rejected(error));
            }
        }
    }
}

/// The kind a spec is submitted under, checked as a subject token.
fn spec_kind(spec: &TaskSpec) -> Result<TaskKind, ClientError> {
    let kind = spec.kind.as_deref().ok_or_else(|| {
        ClientError::Invalid(ErrorInfo::field(
            ErrorCode::InvalidField,
            "kind",
            "kind is required: it names the submit subject (TaskSpec::new sets it)",
        ))
    })?;
    TaskKind::new(kind).map_err(ClientError::Invalid)
}

fn encode_spec(spec: &TaskSpec) -> Vec<u8> {
    serde_json::to_vec(spec).expect("a TaskSpec always serialises to JSON")
}

/// The fields of `{"ok": true, …}`, or the error of `{"ok": false, "error": …}`.
fn ok_fields(subject: &str, reply: Value) -> Result<Map<String, Value>, ClientError> {
    let Value::Object(mut fields) = reply else {
        return Err(ClientError::decode(
            subject,
            serde_json::Error::custom("the reply is not a JSON object"),
        ));
    };
    match fields.get("ok") {
        Some(Value::Bool(true)) => Ok(fields),
        Some(Value::Bool(false)) => {
            Err(ClientError::Rejected(take(subject, &mut fields, "error")?))
        }
        _ => Err(ClientError::decode(
            subject,
            serde_json::Error::custom("the reply has no boolean `ok`"),
        )),
    }
}

/// Removes and decodes `field`.
fn take<T: DeserializeOwned>(
    subject: &str,
    fields: &mut Map<String, Value>,
    field: &str,
) -> Result<T, ClientError> {
    let value = fields.remove(field).ok_or_else(|| {
        ClientError::decode(
            subject,
            serde_json::Error::custom(format!("the reply has no `{field}`")),
        )
    })?;
    serde_json::from_value(value).map_err(|e| {
        ClientError::decode(
            subject,
            serde_json::Error::custom(format!("`{field}`: {e}")),
        )
    })
}

/// One submit reply: the id, or the refusal. `Err` only for a reply that is
/// not protocol v1.
fn parse_submitted(subject: &str, reply: Value) -> Result<Result<TaskId, ErrorInfo>, ClientError> {
    match ok_fields(subject, reply) {
        Ok(mut fields) => {
            // Checked, since ids become subject tokens (`events`, `wait`).
            let id: String = take(subject, &mut fields, "id")?;
            TaskId::new(id)
                .map(Ok)
                .map_err(|e| ClientError::decode(subject, serde_json::Error::custom(e.message)))
        }
        Err(ClientError::Rejected(info)) => Ok(Err(info)),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUBJECT: &str = "dispatch.submit.echo";

    #[test]
    fn submit_replies_are_read_as_protocol_v1_says() {
        let ok = json!({"ok": true, "id": "t1", "kind": "echo", "priority": "normal"});
        assert_eq!(
            parse_submitted(SUBJECT, ok).unwrap(),
            Ok(TaskId::new("t1").unwrap())
        );
        let refused = json!({"ok": false, "error": {
            "code": "invalid_field", "field": "priority", "message": "priority must be one of critical, high, normal, low"
        }});
        let info = parse_submitted(SUBJECT, refused).unwrap().unwrap_err();
        assert_eq!(info.code, ErrorCode::InvalidField);
        assert_eq!(info.field.as_deref(), Some("priority"));
    }

    #[test]
    fn replies_that_are_not_protocol_v1_are_decode_errors() {
        for reply in [
            json!([1, 2]),
            json!({"id": "t1"}),
            json!({"ok": "yes"}),
            json!({"ok": true}),
            json!({"ok": true, "id": "a b"}),
            json!({"ok": false, "error": "nope"}),
        ] {
            let err = parse_submitted(SUBJECT, reply.clone()).unwrap_err();
            assert!(
                matches!(err, ClientError::Decode { .. }),
                "{reply}: {err:?}"
            );
        }
    }

    #[test]
    fn specs_need_a_kind_that_is_a_token() {
        let err = spec_kind(&TaskSpec::default()).unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::InvalidField));
        let err = spec_kind(&TaskSpec::new("a.b", Value::Null)).unwrap_err();
        assert!(matches!(err, ClientError::Invalid(_)), "{err:?}");
        assert_eq!(
            spec_kind(&TaskSpec::new("echo", Value::Null))
                .unwrap()
                .as_str(),
            "echo"
        );
    }

    #[test]
    fn errors_read_clearly() {
        let err = ClientError::NoResponders {
            subject: SUBJECT.into(),
        };
        assert!(err.to_string().contains("--prefix"), "{err}");
        let err = ClientError::Rejected(ErrorInfo::new(ErrorCode::QueueFull, "the queue is full"));
        assert_eq!(
            err.to_string(),
            "rejected by the dispatcher: queue_full: the queue is full"
        );
        assert_eq!(err.code(), Some(ErrorCode::QueueFull));
    }
}
