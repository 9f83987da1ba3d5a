//! The Supervisor actor: owns the local priority queue, the worker slots
//! and every task this node holds (queued, waiting to retry, running).
//!
//! It hands tasks to idle Workers, decides what an attempt's outcome means
//! (completed, retry after backoff, failed, timed out, cancelled), settles
//! a transport's [`Delivery`](crate::delivery::Delivery) when it is done
//! with a task, restarts crashed Workers (see `slots`), and answers control
//! requests and the graceful shutdown (see `control`). It keeps no records
//! (the Registry does) and counts nothing (the Metrics do).

mod control;
mod slots;

use std::collections::HashMap;
use std::time::Duration;

use actix::dev::SendError;
use actix::{Actor, AsyncContext, Context, Handler, Message, MessageResult, SpawnHandle};
use tokio::sync::{oneshot, watch};
use tracing::{debug, info};

pub use control::{
    BeginShutdown, CancelReply, CancelTask, Gauges, GetGauges, GetWorkers, InterruptRunning,
    StopWorkers, WaitIdle,
};

use crate::config::DispatcherConfig;
use crate::delivery::{DeliveryHandle, Settlement};
use crate::emitter::Emitter;
use crate::error::{DispatchError, ErrorCode, ErrorInfo};
use crate::event::{EventBody, TaskStatus, WorkerState};
use crate::handler::Handlers;
use crate::queue::PriorityQueue;
use crate::task::{Task, TaskId};
use crate::worker::{AttemptOutcome, RunTask};
use slots::Slot;

/// The node's scheduler and the Workers' supervisor.
pub struct Supervisor {
    config: DispatcherConfig,
    handlers: Handlers,
    emitter: Emitter,
    queue: PriorityQueue<Held>,
    /// Tasks waiting out a local retry backoff (they count against the
    /// capacity). Delivered tasks wait in their transport instead.
    waiting: HashMap<TaskId, (Task, SpawnHandle)>,
    running: HashMap<TaskId, Running>,
    slots: Vec<Slot>,
    accepting: bool,
    /// Free places in the queue, for transports that pull only what fits.
    room: watch::Sender<usize>,
    idle_waiters: Vec<oneshot::Sender<()>>,
    drained_waiters: Vec<oneshot::Sender<()>>,
}

/// A task this node holds, with the transport's delivery if it has one.
#[derive(Debug)]
pub struct Held {
    /// The task.
    pub task: Task,
    /// The transport's handle, settled when the node is done with the task.
    pub delivery: Option<DeliveryHandle>,
}

struct Running {
    task: Task,
    delivery: Option<DeliveryHandle>,
    slot: usize,
    attempt: u32,
    stop_sent: bool,
}

impl Supervisor {
    pub(crate) fn new(
        config: DispatcherConfig,
        handlers: Handlers,
        emitter: Emitter,
        room: watch::Sender<usize>,
    ) -> Self {
        let capacity = config.queue_capacity();
        room.send_replace(capacity);
        Self {
            config,
            handlers,
            emitter,
            queue: PriorityQueue::new(capacity),
            waiting: HashMap::new(),
            running: HashMap::new(),
            slots: Vec::new(),
            accepting: true,
            room,
            idle_waiters: Vec::new(),
            drained_waiters: Vec::new(),
        }
    }

    fn queued(&self) -> usize {
        self.queue.len() + self.waiting.len()
    }

    /// Hands queued tasks to idle workers, most urgent first, then tells
    /// whoever waits for room or idleness.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        while let Some(index) = self
            .slots
            .iter()
            .position(|s| s.state == WorkerState::Idle && s.worker.is_some())
        {
            let Some(Held { task, delivery }) = self.queue.pop() else {
                break;
            };
            if self.handlers.get(task.kind.as_str()).is_none() {
                let error = unknown_kind(&task);
                let body = EventBody::Failed {
                    error,
                    duration_ms: 0,
                };
                self.finish(&task, task.attempt, body, Duration::ZERO, delivery);
                continue;
            }
            let slot = &mut self.slots[index];
            let Some(worker) = slot.worker.as_ref() else {
                break;
            };
            let msg = RunTask {
                id: task.id.clone(),
                kind: task.kind.clone(),
                payload: task.payload.clone(),
                attempt: task.attempt,
                max_attempts: task.max_attempts,
                timeout: task.timeout,
            };
            match worker.try_send(msg) {
                Ok(()) => {
                    slot.state = WorkerState::Busy;
                    slot.task = Some(task.id.clone());
                    let attempt = task.attempt;
                    let run = Running {
                        task,
                        delivery,
                        slot: index,
                        attempt,
                        stop_sent: false,
                    };
                    self.running.insert(run.task.id.clone(), run);
                }
                Err(SendError::Full(_)) | Err(SendError::Closed(_)) => {
                    let priority = task.priority;
                    self.queue.push_front(priority, Held { task, delivery });
                    self.crash_slot(index, "the worker stopped unexpectedly".to_owned(), ctx);
                }
            }
        }
        self.notify_waiters();
    }

    fn notify_waiters(&mut self) {
        // A node that cannot run work takes none: no room while it shuts
        // down or while every slot is disabled (a transport that pulls
        // stops pulling, and starts again when a slot is back).
        let room = if !self.accepting || self.in_service() == 0 {
            0
        } else {
            self.queue.capacity().saturating_sub(self.queued())
        };
        self.room.send_if_modified(|r| {
            let changed = *r != room;
            *r = room;
            changed
        });
        if self.running.is_empty() {
            for tx in self.drained_waiters.drain(..) {
                let _ = tx.send(());
            }
            if self.queued() == 0 {
                for tx in self.idle_waiters.drain(..) {
                    let _ = tx.send(());
                }
            }
        }
    }

    /// Emits a final event and settles the delivery as done.
    fn finish(
        &mut self,
        task: &Task,
        attempt: u32,
        body: EventBody,
        elapsed: Duration,
        delivery: Option<DeliveryHandle>,
    ) {
        let status = body.status().unwrap_or(TaskStatus::Failed);
        let error = match &body {
            EventBody::Failed { error, .. } => Some(error.clone()),
            EventBody::TimedOut { timeout_ms } => Some(ErrorInfo::new(
                ErrorCode::Timeout,
                format!("the attempt timed out after {timeout_ms} ms"),
            )),
            _ => None,
        };
        self.emitter
            .task_timed(&task.id, &task.kind, attempt, body, Some(elapsed));
        if let Some(d) = delivery {
            d.settle(Settlement::Done(status, error));
        }
    }

    /// An attempt failed: retry after the backoff if it may (locally, or by
    /// the transport delivering it again), else fail the task.
    fn attempt_failed(&mut self, failure: Failure, ctx: &mut Context<Self>) {
        let Failure {
            mut task,
            attempt,
            error,
            retryable,
            elapsed,
            delivery,
        } = failure;
        if !(retryable && attempt < task.max_attempts && self.accepting) {
            let body = EventBody::Failed {
                error,
                duration_ms: elapsed.as_millis() as u64,
            };
            self.finish(&task, attempt, body, elapsed, delivery);
            return;
        }
        let delay = task.backoff.delay(attempt);
        debug!(task_id = %task.id, attempt, error = %error, "Attempt failed; retrying.");
        let body = EventBody::Retrying {
            error,
            retry_in_ms: delay.as_millis() as u64,
        };
        self.emitter
            .task_timed(&task.id, &task.kind, attempt, body, Some(elapsed));
        if let Some(d) = delivery {
            d.settle(Settlement::Retry { delay });
            return;
        }
        task.attempt = attempt + 1;
        let id = task.id.clone();
        let handle = ctx.run_later(delay, move |act, ctx| {
            if let Some((task, _)) = act.waiting.remove(&id) {
                let priority = task.priority;
                let held = Held {
                    task,
                    delivery: None,
                };
                act.queue.push_unbounded(priority, held);
                act.pump(ctx);
            }
        });
        self.waiting.insert(task.id.clone(), (task, handle));
    }

    fn cancel_unstarted(&mut self, task: &Task, reason: &str, delivery: Option<DeliveryHandle>) {
        let body = EventBody::Cancelled {
            reason: reason.to_owned(),
        };
        self.finish(task, task.attempt, body, Duration::ZERO, delivery);
    }

    /// Queues a task new to this node, unless the queue is full (and the
    /// task may not go past capacity).
    fn push_new(
        &mut self,
        held: Held,
        emit_accepted: bool,
        past_capacity: bool,
    ) -> Result<(), DispatchError> {
        let capacity = self.queue.capacity();
        if !past_capacity && self.queued() >= capacity {
            // A delivered task goes back to its transport at once, not
            // after the lease lapses.
            if let Some(d) = held.delivery {
                d.settle(Settlement::Release);
            }
            return Err(DispatchError::QueueFull { capacity });
        }
        let task = &held.task;
        if emit_accepted {
            let body = EventBody::Accepted {
                priority: task.priority,
            };
            self.emitter.task(&task.id, &task.kind, task.attempt, body);
        }
        let priority = task.priority;
        if past_capacity {
            self.queue.push_unbounded(priority, held);
            return Ok(());
        }
        self.queue
            .push(priority, held)
            .map_err(|crate::queue::Full(held)| {
                if let Some(d) = held.delivery {
                    d.settle(Settlement::Release);
                }
                DispatchError::QueueFull { capacity }
            })
    }

    /// If `id` is held already (a transport delivered it again because its
    /// lease lapsed), swaps in the new delivery, the live one, and answers
    /// `None`; else hands `delivery` back.
    fn replace_delivery(
        &mut self,
        id: &TaskId,
        delivery: DeliveryHandle,
    ) -> Option<DeliveryHandle> {
        if let Some(run) = self.running.get_mut(id) {
            run.delivery = Some(delivery);
            return None;
        }
        if let Some(held) = self.queue.iter_mut().find(|h| &h.task.id == id) {
            held.delivery = Some(delivery);
            return None;
        }
        Some(delivery)
    }
}

/// A failed attempt, for [`Supervisor::attempt_failed`].
struct Failure {
    task: Task,
    attempt: u32,
    error: ErrorInfo,
    retryable: bool,
    elapsed: Duration,
    delivery: Option<DeliveryHandle>,
}

fn unknown_kind(task: &Task) -> ErrorInfo {
    ErrorInfo::new(
        ErrorCode::UnknownKind,
        format!(
            "no handler serves kind {:?} on this node",
            task.kind.as_str()
        ),
    )
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.start_slots(ctx);
        ctx.run_interval(self.config.keep_alive_interval, |act, _ctx| {
            let queued = act.queue.iter().filter_map(|h| h.delivery.as_ref());
            let running = act.running.values().filter_map(|r| r.delivery.as_ref());
            for d in queued.chain(running) {
                d.keep_alive();
            }
        });
        info!(
            node = %self.emitter.node(),
            workers = self.config.workers,
            capacity = self.queue.capacity(),
            "Supervisor started."
        );
    }
}

/// Queues admitted tasks; answers per task.
#[derive(Debug, Message)]
#[rtype(result = "Vec<Result<(), DispatchError>>")]
pub struct Enqueue {
    /// Validated, admitted tasks, with their deliveries if a transport
    /// keeps them.
    pub tasks: Vec<Held>,
    /// Emit `accepted` for each task queued.
    pub emit_accepted: bool,
    /// Queue delivered tasks even past capacity (see
    /// [`SubmitOptions`](crate::SubmitOptions)).
    pub past_capacity: bool,
}

impl Handler<Enqueue> for Supervisor {
    type Result = MessageResult<Enqueue>;

    fn handle(&mut self, msg: Enqueue, ctx: &mut Context<Self>) -> Self::Result {
        let results = msg
            .tasks
            .into_iter()
            .map(|held| {
                let refusal = if !self.accepting {
                    Some("the node is shutting down")
                } else if self.in_service() == 0 {
                    Some("every worker slot is disabled after repeated crashes")
                } else {
                    None
                };
                if let Some(why) = refusal {
                    // A delivered task goes back to its transport at once,
                    // for another node, not after its lease lapses.
                    if let Some(d) = held.delivery {
                        d.settle(Settlement::Release);
                    }
                    return Err(DispatchError::Unavailable(why.to_owned()));
                }
                let Held { task, delivery } = held;
                let delivery = match delivery {
                    Some(d) => match self.replace_delivery(&task.id, d) {
                        None => return Ok(()),
                        Some(d) => Some(d),
                    },
                    None => None,
                };
                let past_capacity = msg.past_capacity && delivery.is_some();
                self.push_new(Held { task, delivery }, msg.emit_accepted, past_capacity)
            })
            .collect();
        self.pump(ctx);
        MessageResult(results)
    }
}

/// A Worker reports that an attempt is over (its work has stopped).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct AttemptFinished {
    /// Slot number, 1-based.
    pub slot: u8,
    /// The reporting Worker's generation.
    pub generation: u64,
    /// The task.
    pub task_id: TaskId,
    /// How it ended.
    pub outcome: AttemptOutcome,
    /// How long it ran.
    pub elapsed: Duration,
}

impl Handler<AttemptFinished> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: AttemptFinished, ctx: &mut Context<Self>) {
        let index = usize::from(msg.slot) - 1;
        if self.slots.get(index).map(|s| s.generation) != Some(msg.generation) {
            debug!(worker = msg.slot, task_id = %msg.task_id, "Stale report from a replaced worker.");
            return;
        }
        let Some(run) = self.running.remove(&msg.task_id) else {
            return;
        };
        let Running {
            task,
            attempt,
            delivery,
            ..
        } = run;
        if let AttemptOutcome::Panicked(why) = &msg.outcome {
            let reason = format!("handler panicked: {why}");
            self.crash_slot(index, reason, ctx);
        } else {
            self.slots[index].set_idle();
        }
        let elapsed = msg.elapsed;
        let duration_ms = elapsed.as_millis() as u64;
        let failure = |error, retryable, task, delivery| Failure {
            task,
            attempt,
            error,
            retryable,
            elapsed,
            delivery,
        };
        match msg.outcome {
            AttemptOutcome::Completed(result) => {
                let body = EventBody::Completed {
                    result,
                    duration_ms,
                };
                self.finish(&task, attempt, body, elapsed, delivery);
            }
            AttemptOutcome::Failed(err) => {
                let error = ErrorInfo::new(ErrorCode::HandlerError, err.message());
                let retryable = err.is_retryable();
                self.attempt_failed(failure(error, retryable, task, delivery), ctx);
            }
            AttemptOutcome::Panicked(why) => {
                let error = ErrorInfo::new(
                    ErrorCode::WorkerCrashed,
                    format!("worker {} crashed: handler panicked: {why}", msg.slot),
                );
                self.attempt_failed(failure(error, true, task, delivery), ctx);
            }
            AttemptOutcome::TimedOut => {
                let timeout_ms = task.timeout_ms();
                if attempt < task.max_attempts && self.accepting {
                    let error = ErrorInfo::new(
                        ErrorCode::Timeout,
                        format!("the attempt ran past its timeout of {timeout_ms} ms"),
                    );
                    self.attempt_failed(failure(error, true, task, delivery), ctx);
                } else {
                    let body = EventBody::TimedOut { timeout_ms };
                    self.finish(&task, attempt, body, elapsed, delivery);
                }
            }
            AttemptOutcome::Cancelled(reason) => {
                let body = EventBody::Cancelled { reason };
                self.finish(&task, attempt, body, elapsed, delivery);
            }
            AttemptOutcome::Shutdown => {
                let error = ErrorInfo::new(
                    ErrorCode::Shutdown,
                    "the node shut down before the attempt finished",
                );
                match delivery {
                    // Handed back: the transport gives it to another node now.
                    Some(d) => {
                        let body = EventBody::Retrying {
                            error,
                            retry_in_ms: 0,
                        };
                        self.emitter
                            .task_timed(&task.id, &task.kind, attempt, body, Some(elapsed));
                        d.settle(Settlement::Release);
                    }
                    None => self.attempt_failed(failure(error, false, task, None), ctx),
                }
            }
            AttemptOutcome::UnknownKind => {
                let error = unknown_kind(&task);
                self.attempt_failed(failure(error, false, task, delivery), ctx);
            }
        }
        self.pump(ctx);
    }
}
