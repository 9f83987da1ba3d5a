//! The Worker actor: runs one attempt at a time. The actor lives beside
//! the Supervisor, on its thread; the handler's future runs where the
//! handler's [`Placement`] says: on the event loop there too, or on the
//! slot's own thread (an Arbiter), so that CPU-bound handlers on two
//! workers run in parallel.
//!
//! It owns the attempt's lifecycle: the `started` event, the handler's
//! future (spawned so that a panic is caught as a `JoinError`), the
//! timeout, and cancellation — first through the [`TaskContext`]'s token,
//! then, after a grace period, by dropping the future. It reports only once
//! the work has really stopped. It does not decide retries or final states:
//! the Supervisor does. After a handler panic it stops itself, and the
//! Supervisor starts a fresh Worker in its slot.

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::dev::ArbiterHandle;
use actix::{
    Actor, ActorContext, ActorFutureExt, Addr, AsyncContext, Context, Handler, Message, WrapFuture,
};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::{AbortHandle, JoinError, JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::emitter::Emitter;
use crate::event::EventBody;
use crate::handler::{Handlers, Placement, TaskContext, TaskError};
use crate::supervisor::{AttemptFinished, Supervisor};
use crate::task::{TaskId, TaskKind};

/// One worker slot's actor.
pub struct Worker {
    slot: u8,
    generation: u64,
    supervisor: Addr<Supervisor>,
    handlers: Handlers,
    emitter: Emitter,
    grace: Duration,
    /// The slot's own thread, where handlers placed on a thread run.
    thread: ArbiterHandle,
    /// Stops the running attempt, if any.
    stop: Option<(TaskId, oneshot::Sender<StopReason>)>,
}

impl Worker {
    pub(crate) fn new(
        slot: u8,
        generation: u64,
        supervisor: Addr<Supervisor>,
        handlers: Handlers,
        emitter: Emitter,
        grace: Duration,
        thread: ArbiterHandle,
    ) -> Self {
        Self {
            slot,
            generation,
            supervisor,
            handlers,
            emitter,
            grace,
            thread,
            stop: None,
        }
    }
}

impl Actor for Worker {
    type Context = Context<Self>;
}

/// Why an attempt is being stopped from outside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// Cancelled, with who or what asked.
    Cancel(String),
    /// The node is shutting down.
    Shutdown,
}

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq)]
pub enum AttemptOutcome {
    /// The handler returned a result.
    Completed(Value),
    /// The handler returned an error.
    Failed(TaskError),
    /// The handler panicked (the message).
    Panicked(String),
    /// The attempt ran past its timeout and has stopped.
    TimedOut,
    /// The attempt was cancelled and has stopped.
    Cancelled(String),
    /// The node shut down and the attempt has stopped.
    Shutdown,
    /// No handler serves the task's kind.
    UnknownKind,
}

/// Runs one attempt. The worker must be idle.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct RunTask {
    /// The task.
    pub id: TaskId,
    /// Its kind.
    pub kind: TaskKind,
    /// Its payload (a copy: the Supervisor keeps the task for retries).
    pub payload: Value,
    /// This attempt, 1-based.
    pub attempt: u32,
    /// Attempts in all.
    pub max_attempts: u32,
    /// This attempt's time limit.
    pub timeout: Duration,
}

impl Handler<RunTask> for Worker {
    type Result = ();

    fn handle(&mut self, msg: RunTask, ctx: &mut Context<Self>) {
        let RunTask {
            id,
            kind,
            payload,
            attempt,
            max_attempts,
            timeout,
        } = msg;
        debug!(worker = self.slot, task_id = %id, attempt, "Attempt starting.");
        let started = Instant::now();
        let slot = self.slot;
        let generation = self.generation;
        let Some(handler) = self.handlers.get(kind.as_str()) else {
            self.supervisor.do_send(AttemptFinished {
                slot,
                generation,
                task_id: id,
                outcome: AttemptOutcome::UnknownKind,
                elapsed: Duration::ZERO,
            });
            return;
        };
        self.emitter
            .task(&id, &kind, attempt, EventBody::Started { worker: slot });

        let (stop_tx, stop_rx) = oneshot::channel();
        self.stop = Some((id.clone(), stop_tx));
        let cancel = CancellationToken::new();
        let done = Arc::new(AtomicBool::new(false));
        let progress = {
            let emitter = self.emitter.clone();
            let (id, kind, done) = (id.clone(), kind.clone(), done.clone());
            Arc::new(move |percent: u8, message: String| {
                if !done.load(Ordering::Acquire) {
                    emitter.task(
                        &id,
                        &kind,
                        attempt,
                        EventBody::Progress {
                            progress: percent,
                            message,
                        },
                    );
                }
            })
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let task_ctx = TaskContext::new(
            id.clone(),
            kind.clone(),
            attempt,
            max_attempts,
            deadline,
            cancel.clone(),
            progress,
        );
        let placement = handler.placement();
        let work = async move { handler.run(task_ctx, payload).await };
        let running = match placement {
            Placement::EventLoop => Running::Local(tokio::task::spawn_local(work)),
            Placement::Thread => Running::on_thread(&self.thread, work),
        };
        let grace = self.grace;
        let attempt_fut = async move {
            let outcome = supervise_attempt(running, deadline, stop_rx, cancel, grace).await;
            done.store(true, Ordering::Release);
            outcome
        };
        ctx.spawn(attempt_fut.into_actor(self).map(
            move |outcome, act: &mut Worker, ctx: &mut Context<Worker>| {
                act.stop = None;
                let crashed = matches!(outcome, AttemptOutcome::Panicked(_));
                act.supervisor.do_send(AttemptFinished {
                    slot,
                    generation,
                    task_id: id,
                    outcome,
                    elapsed: started.elapsed(),
                });
                if crashed {
                    ctx.stop();
                }
            },
        ));
    }
}

/// What a handler's future returns.
type HandlerResult = Result<Value, TaskError>;

/// A handler's future, running on this thread or on the slot's.
enum Running {
    /// Spawned here, on the event loop.
    Local(JoinHandle<HandlerResult>),
    /// Spawned on the slot's thread; its end and its abort handle come
    /// back over channels (closed if the thread is gone).
    Thread {
        ended: oneshot::Receiver<Result<HandlerResult, JoinError>>,
        abort: Option<oneshot::Receiver<AbortHandle>>,
    },
}

/// How a handler's future ended.
enum Ended {
    Ran(HandlerResult),
    Panicked(String),
    /// Aborted, or its thread stopped under it.
    Gone(&'static str),
}

impl Running {
    /// Spawns `work` on `thread`, inside its local task set (so a handler
    /// may spawn local tasks as on any Arbiter).
    fn on_thread(
        thread: &ArbiterHandle,
        work: impl std::future::Future<Output = HandlerResult> + Send + 'static,
    ) -> Self {
        let (ended_tx, ended) = oneshot::channel();
        let (abort_tx, abort) = oneshot::channel();
        // A thread that is gone drops the future, and with it the senders:
        // the attempt then ends as lost.
        thread.spawn(async move {
            let join = tokio::task::spawn_local(work);
            let _ = abort_tx.send(join.abort_handle());
            let _ = ended_tx.send(join.await);
        });
        Running::Thread {
            ended,
            abort: Some(abort),
        }
    }

    /// Resolves once the future has finished or been dropped (safe to
    /// call again if a caller gave up waiting).
    async fn ended(&mut self) -> Ended {
        let joined = match self {
            Running::Local(join) => join.await,
            Running::Thread { ended, .. } => match ended.await {
                Ok(joined) => joined,
                Err(_) => return Ended::Gone("the worker's thread stopped"),
            },
        };
        match joined {
            Ok(result) => Ended::Ran(result),
            Err(e) if e.is_panic() => Ended::Panicked(panic_message(e.into_panic())),
            Err(_) => Ended::Gone("the attempt's task was aborted"),
        }
    }

    /// Drops the future where it runs (at its next await).
    async fn abort(&mut self) {
        match self {
            Running::Local(join) => join.abort(),
            Running::Thread { abort, .. } => {
                if let Some(handle) = abort.take() {
                    if let Ok(handle) = handle.await {
                        handle.abort();
                    }
                }
            }
        }
    }
}

/// Runs the handler's future to its end, or stops it on timeout or a stop
/// request: cancel the token, wait up to `grace`, then drop the future.
/// Returns only once the future has finished or been dropped.
async fn supervise_attempt(
    mut running: Running,
    deadline: tokio::time::Instant,
    stop_rx: oneshot::Receiver<StopReason>,
    cancel: CancellationToken,
    grace: Duration,
) -> AttemptOutcome {
    let stopped = tokio::select! {
        ended = running.ended() => return outcome_of(ended),
        _ = tokio::time::sleep_until(deadline) => AttemptOutcome::TimedOut,
        reason = stop_rx => match reason {
            Ok(StopReason::Cancel(why)) => AttemptOutcome::Cancelled(why),
            Ok(StopReason::Shutdown) | Err(_) => AttemptOutcome::Shutdown,
        },
    };
    cancel.cancel();
    match tokio::time::timeout(grace, running.ended()).await {
        // A panic while stopping is still a crash.
        Ok(Ended::Panicked(why)) => AttemptOutcome::Panicked(why),
        Ok(_) => stopped,
        Err(_) => {
            warn!(
                grace_ms = grace.as_millis() as u64,
                "Handler ignored cancellation; dropping its future."
            );
            running.abort().await;
            // Resolves once the future has been dropped, so nothing of the
            // attempt runs after we report it over.
            let _ = running.ended().await;
            stopped
        }
    }
}

fn outcome_of(ended: Ended) -> AttemptOutcome {
    match ended {
        Ended::Ran(Ok(value)) => AttemptOutcome::Completed(value),
        Ended::Ran(Err(err)) => AttemptOutcome::Failed(err),
        Ended::Panicked(why) => AttemptOutcome::Panicked(why),
        Ended::Gone(why) => AttemptOutcome::Panicked(why.to_owned()),
    }
}

fn panic_message(payload: Box<dyn Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

/// Stops the running attempt, if it is `id`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct StopAttempt {
    /// The task whose attempt to stop.
    pub id: TaskId,
    /// Why.
    pub reason: StopReason,
}

impl Handler<StopAttempt> for Worker {
    type Result = ();

    fn handle(&mut self, msg: StopAttempt, _ctx: &mut Context<Self>) {
        match self.stop.take() {
            Some((id, tx)) if id == msg.id => {
                let _ = tx.send(msg.reason);
            }
            other => self.stop = other,
        }
    }
}
