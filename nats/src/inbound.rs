//! What a message on an entry point becomes: the one place that decides
//! whether a message from the wire is a valid task.
//!
//! Every entry point reads its messages here — a submission on
//! `<p>.submit.<kind>`, a task published straight onto
//! `<p>.tasks.<kind>.<priority>` (core ingest), and a task a node pulls
//! from the stream — so "accepted" always means "runnable": the gateway
//! stores only a body that [`Reader::stored_body`] has read back through
//! [`Reader::queued`], the very function that reads it when it is pulled.
//!
//! Nothing here allocates more than the limits allow, and nothing here can
//! take the process down: a panic while reading a message is caught and
//! becomes a refusal with code `internal`.

use std::panic::{catch_unwind, AssertUnwindSafe};

use dispatcher_actors::{ErrorCode, ErrorInfo, Priority, Task, TaskDefaults, TaskSpec};
use sha2::{Digest, Sha256};

use crate::codec::{BincodeTask, Codec, CodecError, Decoded, Limits};
use crate::subjects::{Subjects, CONTENT_TYPE_JSON};

/// Why a message is not a task, with what could be read of it.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    /// The task id the body named, if it could be read.
    pub id: Option<String>,
    /// The kind, from the subject (or the body), if it could be read.
    pub kind: Option<String>,
    /// What is wrong.
    pub error: ErrorInfo,
}

impl Refusal {
    fn new(kind: Option<&str>, error: ErrorInfo) -> Self {
        Self {
            id: None,
            kind: kind.map(str::to_owned),
            error,
        }
    }

    /// A body the codec refused, with its id if one can still be read.
    fn codec(kind: Option<&str>, e: &CodecError, codec: Codec, body: &[u8]) -> Self {
        Self {
            id: readable_id(codec, body),
            ..Self::new(kind, e.to_info())
        }
    }
}

/// The id a refused body names, if it can be read at all (for the
/// `rejected` event): only on the error path, with the same bounds.
fn readable_id(codec: Codec, body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: Option<String>,
    }
    match codec {
        Codec::Json => serde_json::from_slice::<IdOnly>(body).ok()?.id,
        Codec::Bincode => BincodeTask::read_id(body),
    }
}

/// A submission: one task, or a batch whose elements stand alone.
#[derive(Debug)]
pub enum Submission {
    /// An object body.
    One(Result<Task, Refusal>),
    /// An array body.
    Batch(Vec<Result<Task, Refusal>>),
}

/// Reads messages as tasks, with one deployment's subjects, limits and
/// defaults.
#[derive(Clone, Debug)]
pub struct Reader {
    subjects: Subjects,
    limits: Limits,
    defaults: TaskDefaults,
}

impl Reader {
    /// A reader for `subjects`, holding bodies to `limits` and filling
    /// what a task leaves out from `defaults`.
    pub fn new(subjects: Subjects, limits: Limits, defaults: TaskDefaults) -> Self {
        Self {
            subjects,
            limits,
            defaults,
        }
    }

    /// The subjects it reads.
    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// The limits it holds bodies to.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Reads a submission that came on `subject` (`<p>.submit.<kind>`)
    /// with the given `Content-Type`. An error refuses the whole message;
    /// the elements of a batch are refused one by one.
    pub fn submission(
        &self,
        subject: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Submission, Refusal> {
        guard(None, || self.read_submission(subject, content_type, body))
    }

    fn read_submission(
        &self,
        subject: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Submission, Refusal> {
        let kind = self.subjects.token(subject, 1);
        Ok(match self.decode(kind, content_type, body)? {
            Decoded::One(spec) => Submission::One(self.validate(*spec, kind)),
            Decoded::Batch(items) => Submission::Batch(
                items
                    .into_iter()
                    .map(|item| match item {
                        Ok(spec) => self.validate(spec, kind),
                        Err(e) => Err(Refusal::new(kind, e.to_info())),
                    })
                    .collect(),
            ),
        })
    }

    /// Reads one task from the queue subject it came on
    /// (`<p>.tasks.<kind>.<priority>`), as published by a client or
    /// pulled from the stream. The subject's kind and priority are
    /// authoritative: a body that names others is refused.
    pub fn queued(
        &self,
        subject: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Task, Refusal> {
        guard(self.subjects.token(subject, 1), || {
            self.read_queued(subject, content_type, body)
        })
    }

    fn read_queued(
        &self,
        subject: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Task, Refusal> {
        let kind = self.subjects.token(subject, 1);
        let token = self.subjects.token(subject, 2).unwrap_or("");
        let Some(priority) = Priority::parse(token) else {
            let error = ErrorInfo::field(
                ErrorCode::InvalidField,
                "priority",
                format!(
                    "the subject's priority {:?} must be one of critical, high, normal, low",
                    shorten(token)
                ),
            );
            return Err(Refusal::new(kind, error));
        };
        let mut spec = match self.decode(kind, content_type, body)? {
            Decoded::One(spec) => *spec,
            Decoded::Batch(_) => {
                let error = ErrorInfo::new(
                    ErrorCode::InvalidJson,
                    "one task per message on the queue; send batches to the submit subject",
                );
                return Err(Refusal::new(kind, error));
            }
        };
        if let Some(p) = spec.priority.as_deref().filter(|p| *p != priority.as_str()) {
            let error = ErrorInfo::field(
                ErrorCode::InvalidField,
                "priority",
                format!(
                    "priority {:?} in the body differs from priority {:?} of the subject",
                    shorten(p),
                    priority.as_str()
                ),
            );
            return Err(Refusal {
                id: spec.id.take(),
                ..Refusal::new(kind, error)
            });
        }
        spec.priority = Some(priority.as_str().to_owned());
        self.validate(spec, kind)
    }

    /// The body the gateway stores for `task` on its queue subject: the
    /// task with every field filled in, as JSON, read back here exactly
    /// as the node that pulls it will read it. A task whose stored form
    /// would be refused (over the size limit once its defaults are filled
    /// in, say) is refused now, at submit, instead of after `accepted`.
    pub fn stored_body(&self, task: &Task) -> Result<Vec<u8>, Refusal> {
        let kind = Some(task.kind.as_str());
        let refuse = |error: ErrorInfo| Refusal {
            id: Some(task.id.as_str().to_owned()),
            ..Refusal::new(kind, error)
        };
        let body = serde_json::to_vec(&task.to_spec()).map_err(|e| {
            refuse(ErrorInfo::new(
                ErrorCode::Internal,
                format!("the task could not be encoded: {e}"),
            ))
        })?;
        let subject = self.subjects.task(task.kind.as_str(), task.priority);
        match self.queued(&subject, Some(CONTENT_TYPE_JSON), &body) {
            Ok(_) => Ok(body),
            Err(refusal) => {
                let mut error = refusal.error;
                error.message = format!(
                    "the task as stored for the nodes would be refused: {}",
                    error.message
                );
                Err(refuse(error))
            }
        }
    }

    /// Picks the codec and decodes the body within the limits.
    fn decode(
        &self,
        kind: Option<&str>,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Decoded, Refusal> {
        let codec =
            Codec::from_content_type(content_type).map_err(|e| Refusal::new(kind, e.to_info()))?;
        codec
            .decode(body, &self.limits)
            .map_err(|e| Refusal::codec(kind, &e, codec, body))
    }

    fn validate(&self, spec: TaskSpec, kind: Option<&str>) -> Result<Task, Refusal> {
        let id = spec.id.clone();
        let body_kind = spec.kind.clone();
        spec.into_task(kind, &self.defaults)
            .map_err(|error| Refusal {
                id,
                kind: kind.map(str::to_owned).or(body_kind),
                error,
            })
    }
}

/// The SHA-256 of a stored task body, in hex: a task record names the
/// body it was stored with, so that a node can tell the message a record
/// belongs to from another message that reuses its id.
pub fn digest(body: &[u8]) -> String {
    let hash = Sha256::digest(body);
    let mut hex = String::with_capacity(64);
    for byte in hash {
        hex.push(char::from(HEX[usize::from(byte >> 4)]));
        hex.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    hex
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Runs `read`, turning a panic into a refusal: no message can take the
/// process down.
fn guard<T>(kind: Option<&str>, read: impl FnOnce() -> Result<T, Refusal>) -> Result<T, Refusal> {
    catch_unwind(AssertUnwindSafe(read)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(error = %what, "Reading a message panicked; it is refused.");
        Err(Refusal::new(
            kind,
            ErrorInfo::new(ErrorCode::Internal, "the message could not be read"),
        ))
    })
}

/// At most 64 characters of `s`, for an error message.
fn shorten(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reader() -> Reader {
        Reader::new(
            Subjects::default(),
            Limits::default(),
            TaskDefaults::default(),
        )
    }

    #[test]
    fn a_queued_task_takes_kind_and_priority_from_its_subject() {
        let task = reader()
            .queued(
                "dispatch.tasks.echo.high",
                None,
                br#"{"id": "q1", "payload": 1}"#,
            )
            .unwrap();
        assert_eq!(task.kind.as_str(), "echo");
        assert_eq!(task.priority, Priority::High);
        let refusal = reader()
            .queued(
                "dispatch.tasks.echo.high",
                None,
                br#"{"id": "q2", "priority": "low"}"#,
            )
            .unwrap_err();
        assert_eq!(refusal.id.as_deref(), Some("q2"));
        assert_eq!(refusal.error.field.as_deref(), Some("priority"));
        let refusal = reader()
            .queued("dispatch.tasks.echo.urgent", None, b"{}")
            .unwrap_err();
        assert_eq!(refusal.error.code, ErrorCode::InvalidField);
        let refusal = reader()
            .queued("dispatch.tasks.echo.low", None, b"[{}]")
            .unwrap_err();
        assert_eq!(refusal.error.code, ErrorCode::InvalidJson);
    }

    #[test]
    fn a_body_that_grows_past_the_limit_when_stored_is_refused_at_submit() {
        let limits = Limits {
            max_payload: 200,
            max_depth: 64,
        };
        let reader = Reader::new(Subjects::default(), limits, TaskDefaults::default());
        // Under the limit as sent; the stored form adds every default.
        let body = format!(r#"{{"id": "big", "payload": "{}"}}"#, "x".repeat(150));
        assert!(body.len() <= 200);
        let Submission::One(Ok(task)) = reader
            .submission("dispatch.submit.echo", None, body.as_bytes())
            .unwrap()
        else {
            panic!("the body itself is valid");
        };
        let refusal = reader.stored_body(&task).unwrap_err();
        assert_eq!(refusal.error.code, ErrorCode::PayloadTooLarge);
        assert_eq!(refusal.id.as_deref(), Some("big"));
        // A small task's stored form reads back as the same task.
        let reader = super::tests::reader();
        let small = reader
            .queued("dispatch.tasks.echo.normal", None, br#"{"id": "s"}"#)
            .unwrap();
        let stored = reader.stored_body(&small).unwrap();
        let again = reader
            .queued("dispatch.tasks.echo.normal", None, &stored)
            .unwrap();
        assert_eq!(again.to_spec(), small.to_spec());
    }

    #[test]
    fn a_deep_bincode_payload_is_refused_at_submit_and_on_the_queue() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let body = BincodeTask {
            id: Some("deep".into()),
            payload: nested(70).into_bytes(),
            ..BincodeTask::default()
        }
        .encode();
        let ct = Some("application/x-bincode");
        let refusal = reader()
            .submission("dispatch.submit.echo", ct, &body)
            .unwrap_err();
        assert_eq!(refusal.error.code, ErrorCode::InvalidJson);
        let refusal = reader()
            .queued("dispatch.tasks.echo.normal", ct, &body)
            .unwrap_err();
        assert_eq!(refusal.error.code, ErrorCode::InvalidJson);
    }

    #[test]
    fn a_batch_refuses_its_elements_one_by_one() {
        let Submission::Batch(items) = reader()
            .submission(
                "dispatch.submit.echo",
                None,
                br#"[{"id": "a"}, {"id": "b c"}, 3]"#,
            )
            .unwrap()
        else {
            panic!("a batch");
        };
        assert!(items[0].is_ok());
        let refused = items[1].as_ref().unwrap_err();
        assert_eq!(refused.id.as_deref(), Some("b c"));
        assert_eq!(refused.kind.as_deref(), Some("echo"));
        assert!(items[2].is_err());
    }

    #[test]
    fn digests_name_the_body() {
        assert_eq!(
            digest(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_ne!(
            digest(json!({"a": 1}).to_string().as_bytes()),
            digest(b"{}")
        );
    }
}
