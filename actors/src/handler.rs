//! The handler side: the [`TaskHandler`] trait that runs a task's work, the
//! [`TaskContext`] it gets (progress, cancellation, deadline, attempt), the
//! [`TaskError`] it returns, and [`Handlers`], the kind → handler table.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::task::{TaskId, TaskKind};

/// Runs the work of one kind of task.
///
/// A handler should watch [`TaskContext::cancelled`] in long work: on
/// cancel, timeout or shutdown the worker first asks politely, and after a
/// grace period drops the handler's future.
///
/// ```
/// use dispatcher_actors::{TaskContext, TaskError, TaskHandler};
/// use serde_json::Value;
///
/// struct Upper;
///
/// #[async_trait::async_trait]
/// impl TaskHandler for Upper {
///     async fn run(&self, ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
///         let text = payload.as_str().ok_or_else(|| TaskError::permanent("payload must be a string"))?;
///         ctx.progress(100, "done");
///         Ok(Value::String(text.to_uppercase()))
///     }
/// }
/// ```
#[async_trait]
pub trait TaskHandler: Send + Sync + 'static {
    /// Runs one attempt of a task.
    async fn run(&self, ctx: TaskContext, payload: Value) -> Result<Value, TaskError>;

    /// Where this handler's attempts run: [`Placement::Thread`] unless the
    /// handler says otherwise.
    fn placement(&self) -> Placement {
        Placement::Thread
    }
}

/// Where a handler's attempts run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Placement {
    /// On the worker slot's own thread (the default): the handler may
    /// block or compute for as long as it likes, and attempts on different
    /// slots run in parallel. Handing an attempt to the thread and its
    /// outcome back costs two thread wake-ups.
    #[default]
    Thread,
    /// On the dispatcher's event loop, beside its actors (and, in a node,
    /// its NATS connection): for handlers that only await — I/O, timers,
    /// child processes — and do little work between awaits. No thread
    /// hand-off, so the cheapest way to run short tasks; but a handler
    /// that blocks here stalls the whole node, so never place CPU-bound or
    /// blocking work on it.
    EventLoop,
}

/// A handler from an async closure.
///
/// ```
/// use dispatcher_actors::{handler_fn, TaskError};
/// let echo = handler_fn(|_ctx, payload| async move { Ok::<_, TaskError>(payload) });
/// ```
pub fn handler_fn<F, Fut>(f: F) -> FnHandler<F>
where
    F: Fn(TaskContext, Value) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, TaskError>> + Send + 'static,
{
    FnHandler {
        f,
        placement: Placement::Thread,
    }
}

/// A [`TaskHandler`] made by [`handler_fn`].
pub struct FnHandler<F> {
    f: F,
    placement: Placement,
}

impl<F> FnHandler<F> {
    /// Runs the handler's attempts at `placement` (a thread of their own
    /// unless told otherwise).
    ///
    /// ```
    /// use dispatcher_actors::{handler_fn, Placement, TaskError};
    /// // Only awaits: cheapest on the event loop.
    /// let echo = handler_fn(|_ctx, payload| async move { Ok::<_, TaskError>(payload) })
    ///     .with_placement(Placement::EventLoop);
    /// ```
    pub fn with_placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }
}

#[async_trait]
impl<F, Fut> TaskHandler for FnHandler<F>
where
    F: Fn(TaskContext, Value) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, TaskError>> + Send + 'static,
{
    async fn run(&self, ctx: TaskContext, payload: Value) -> Result<Value, TaskError> {
        (self.f)(ctx, payload).await
    }

    fn placement(&self) -> Placement {
        self.placement
    }
}

/// Why an attempt failed, as the handler says it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TaskError {
    message: String,
    retryable: bool,
}

impl TaskError {
    /// A failure that is retried while attempts remain.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
        }
    }

    /// A failure that no retry can fix: the task fails at once.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
    }

    /// The handler's words.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// False if retrying cannot help.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }
}

type ProgressFn = Arc<dyn Fn(u8, String) + Send + Sync>;

/// What a handler knows about the attempt it runs.
#[derive(Clone)]
pub struct TaskContext {
    id: TaskId,
    kind: TaskKind,
    attempt: u32,
    max_attempts: u32,
    deadline: Instant,
    cancel: CancellationToken,
    progress: ProgressFn,
}

impl fmt::Debug for TaskContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskContext")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("attempt", &self.attempt)
            .field("max_attempts", &self.max_attempts)
            .field("cancelled", &self.cancel.is_cancelled())
            .finish()
    }
}

impl TaskContext {
    pub(crate) fn new(
        id: TaskId,
        kind: TaskKind,
        attempt: u32,
        max_attempts: u32,
        deadline: Instant,
        cancel: CancellationToken,
        progress: ProgressFn,
    ) -> Self {
        Self {
            id,
            kind,
            attempt,
            max_attempts,
            deadline,
            cancel,
            progress,
        }
    }

    /// A context outside any dispatcher, for testing handlers: progress goes
    /// nowhere, the deadline is `timeout` from now, and the returned token
    /// cancels it.
    pub fn detached(id: TaskId, kind: TaskKind, timeout: Duration) -> (Self, CancellationToken) {
        let cancel = CancellationToken::new();
        let ctx = Self::new(
            id,
            kind,
            1,
            1,
            Instant::now() + timeout,
            cancel.clone(),
            Arc::new(|_, _| {}),
        );
        (ctx, cancel)
    }

    /// The task's id.
    pub fn id(&self) -> &TaskId {
        &self.id
    }

    /// The task's kind.
    pub fn kind(&self) -> &TaskKind {
        &self.kind
    }

    /// This attempt, 1-based.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Attempts in all.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// When this attempt times out.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Time left before the timeout.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Reports progress (clamped to 0..=100) as a `progress` event.
    pub fn progress(&self, percent: u8, message: impl Into<String>) {
        (self.progress)(percent.min(100), message.into());
    }

    /// True once the attempt is cancelled (cancel, timeout or shutdown).
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Resolves once the attempt is cancelled.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    /// The attempt's cancellation token, to hand to child work.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

/// The kind → handler table a dispatcher serves.
#[derive(Clone, Default)]
pub struct Handlers {
    map: HashMap<String, Arc<dyn TaskHandler>>,
}

impl fmt::Debug for Handlers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.kinds()).finish()
    }
}

impl Handlers {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the handler of `kind`.
    pub fn insert(&mut self, kind: TaskKind, handler: impl TaskHandler) -> &mut Self {
        self.map.insert(kind.as_str().to_owned(), Arc::new(handler));
        self
    }

    /// Adds (or replaces) a shared handler.
    pub fn insert_arc(&mut self, kind: TaskKind, handler: Arc<dyn TaskHandler>) -> &mut Self {
        self.map.insert(kind.as_str().to_owned(), handler);
        self
    }

    /// Builder form of [`Handlers::insert`].
    pub fn with(mut self, kind: TaskKind, handler: impl TaskHandler) -> Self {
        self.insert(kind, handler);
        self
    }

    /// The handler of `kind`.
    pub fn get(&self, kind: &str) -> Option<Arc<dyn TaskHandler>> {
        self.map.get(kind).cloned()
    }

    /// The kinds served, sorted.
    pub fn kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = self.map.keys().cloned().collect();
        kinds.sort();
        kinds
    }
}
