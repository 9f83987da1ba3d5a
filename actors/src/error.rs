//! The protocol's error vocabulary: [`ErrorCode`] and the [`ErrorInfo`]
//! object that replies and events carry, plus [`DispatchError`], what the
//! in-process API returns.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::task::TaskId;

/// Every error code of protocol v1: request errors (replies, `rejected`
/// events) and attempt errors (`retrying`, `failed` events).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body is not JSON (or not UTF-8, or nested too deep).
    InvalidJson,
    /// A field has a wrong type or value; `field` names it.
    InvalidField,
    /// The body's `kind` differs from the subject's.
    KindMismatch,
    /// The body is larger than the node accepts.
    PayloadTooLarge,
    /// A task with this id is already known.
    DuplicateId,
    /// The node's queue is at capacity.
    QueueFull,
    /// The `Content-Type` header names a format the node does not speak.
    UnsupportedContentType,
    /// The node cannot serve the request now (shutting down, overloaded).
    Unavailable,
    /// No task with this id is known.
    NotFound,
    /// The task has already reached a final state.
    AlreadyFinished,
    /// A bug or an unexpected failure inside the node.
    Internal,
    /// The handler returned an error.
    HandlerError,
    /// The attempt ran past its `timeout_ms`.
    Timeout,
    /// The worker running the attempt crashed (the handler panicked).
    WorkerCrashed,
    /// A task this one depends on failed.
    DependencyFailed,
    /// No handler serves the task's kind.
    UnknownKind,
    /// The node shut down before the attempt finished.
    Shutdown,
    /// The task was delivered many times without an attempt being
    /// recorded (each node that took it died or gave it back before it
    /// started): a poison task, ended instead of taking nodes down.
    CrashBudgetExhausted,
}

impl ErrorCode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::KindMismatch => "kind_mismatch",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::DuplicateId => "duplicate_id",
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::UnsupportedContentType => "unsupported_content_type",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::NotFound => "not_found",
            ErrorCode::AlreadyFinished => "already_finished",
            ErrorCode::Internal => "internal",
            ErrorCode::HandlerError => "handler_error",
            ErrorCode::Timeout => "timeout",
            ErrorCode::WorkerCrashed => "worker_crashed",
            ErrorCode::DependencyFailed => "dependency_failed",
            ErrorCode::UnknownKind => "unknown_kind",
            ErrorCode::Shutdown => "shutdown",
            ErrorCode::CrashBudgetExhausted => "crash_budget_exhausted",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `error` object of replies and events: `{code, message, field?}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// What kind of error.
    pub code: ErrorCode,
    /// A sentence for people.
    pub message: String,
    /// The request field at fault, if one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ErrorInfo {
    /// An error not tied to a field.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field: None,
        }
    }

    /// An error about one field.
    pub fn field(code: ErrorCode, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field: Some(field.into()),
        }
    }

    /// The same error, reported against `field` (for nested validation).
    pub fn in_field(mut self, field: &str) -> Self {
        self.field = Some(field.to_owned());
        self
    }
}

impl fmt::Display for ErrorInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ErrorInfo {}

/// Why the in-process API refused a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DispatchError {
    /// The task failed validation.
    #[error("{0}")]
    Invalid(ErrorInfo),
    /// A task with this id is already known to this node.
    #[error("a task with id {0} is already known to this node")]
    DuplicateId(TaskId),
    /// The local queue is at capacity.
    #[error("the queue is full ({capacity} tasks); retry later or add nodes")]
    QueueFull {
        /// The queue's capacity.
        capacity: usize,
    },
    /// No task with this id is known.
    #[error("no task with id {0} is known")]
    NotFound(TaskId),
    /// The task already reached a final state.
    #[error("task {0} has already finished")]
    AlreadyFinished(TaskId),
    /// The dispatcher is shutting down or its actors are gone.
    #[error("the dispatcher is unavailable: {0}")]
    Unavailable(String),
}

impl DispatchError {
    /// The protocol code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            DispatchError::Invalid(info) => info.code,
            DispatchError::DuplicateId(_) => ErrorCode::DuplicateId,
            DispatchError::QueueFull { .. } => ErrorCode::QueueFull,
            DispatchError::NotFound(_) => ErrorCode::NotFound,
            DispatchError::AlreadyFinished(_) => ErrorCode::AlreadyFinished,
            DispatchError::Unavailable(_) => ErrorCode::Unavailable,
        }
    }

    /// The wire `error` object.
    pub fn to_info(&self) -> ErrorInfo {
        match self {
            DispatchError::Invalid(info) => info.clone(),
            DispatchError::DuplicateId(_) => ErrorInfo::field(self.code(), "id", self.to_string()),
            other => ErrorInfo::new(other.code(), other.to_string()),
        }
    }
}

impl From<ErrorInfo> for DispatchError {
    fn from(info: ErrorInfo) -> Self {
        DispatchError::Invalid(info)
    }
}
