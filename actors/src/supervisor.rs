//! The Supervisor actor: owns the local priority queue, the worker slots
//! and every task this node holds (queued, waiting to retry, running).
//!
//! It hands tasks to idle Workers, decides what an attempt's outcome means
//! (completed, retry after backoff, failed, timed out, cancelled), restarts
//! crashed Workers one-for-one with backoff and a restart intensity (at
//! most R restarts in T per slot, then the slot is disabled), and runs the
//! graceful shutdown. It keeps no records (the Registry does) and counts
//! nothing (the Metrics do).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use actix::dev::SendError;
use actix::{
    Actor, Addr, Arbiter, AsyncContext, Context, Handler, Message, MessageResult, SpawnHandle,
};
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use crate::config::DispatcherConfig;
use crate::emitter::Emitter;
use crate::error::{DispatchError, ErrorCode, ErrorInfo};
use crate::event::{EventBody, NodeEventBody, WorkerInfo, WorkerState};
use crate::handler::Handlers;
use crate::queue::PriorityQueue;
use crate::task::{Task, TaskId};
use crate::worker::{AttemptOutcome, RunTask, StopAttempt, StopReason, Worker};

/// How often the Supervisor checks that every Worker is still alive.
const HEALTH_INTERVAL: Duration = Duration::from_millis(500);

/// The node's scheduler and the Workers' supervisor.
pub struct Supervisor {
    config: DispatcherConfig,
    handlers: Handlers,
    emitter: Emitter,
    queue: PriorityQueue<Task>,
    /// Tasks waiting out a retry backoff (they count against the capacity).
    waiting: HashMap<TaskId, (Task, SpawnHandle)>,
    running: HashMap<TaskId, Running>,
    slots: Vec<Slot>,
    accepting: bool,
    idle_waiters: Vec<oneshot::Sender<()>>,
    drained_waiters: Vec<oneshot::Sender<()>>,
}

struct Running {
    task: Task,
    slot: usize,
    attempt: u32,
    stop_sent: bool,
}

struct Slot {
    number: u8,
    arbiter: Arbiter,
    worker: Option<Addr<Worker>>,
    /// Bumped at every (re)start; reports from an older Worker are stale.
    generation: u64,
    state: WorkerState,
    task: Option<TaskId>,
    /// Crash times inside the restart window.
    crashes: VecDeque<Instant>,
    restarts: u32,
}

impl Supervisor {
    pub(crate) fn new(config: DispatcherConfig, handlers: Handlers, emitter: Emitter) -> Self {
        let capacity = config.queue_capacity();
        Self {
            config,
            handlers,
            emitter,
            queue: PriorityQueue::new(capacity),
            waiting: HashMap::new(),
            running: HashMap::new(),
            slots: Vec::new(),
            accepting: true,
            idle_waiters: Vec::new(),
            drained_waiters: Vec::new(),
        }
    }

    fn start_worker(&mut self, index: usize, ctx: &mut Context<Self>) {
        let me = ctx.address();
        let handlers = self.handlers.clone();
        let emitter = self.emitter.clone();
        let grace = self.config.cancel_grace;
        let slot = &mut self.slots[index];
        // An arbiter whose thread died refuses work; give the slot a new one.
        if !slot.arbiter.spawn(async {}) {
            warn!(
                worker = slot.number,
                "Worker thread is gone; starting a new one."
            );
            slot.arbiter = Arbiter::new();
        }
        slot.generation += 1;
        let (number, generation) = (slot.number, slot.generation);
        let addr = Worker::start_in_arbiter(&slot.arbiter.handle(), move |_| {
            Worker::new(number, generation, me, handlers, emitter, grace)
        });
        slot.worker = Some(addr);
        slot.state = WorkerState::Idle;
        slot.task = None;
    }

    fn queued(&self) -> usize {
        self.queue.len() + self.waiting.len()
    }

    fn in_service(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.state != WorkerState::Disabled)
            .count()
    }

    /// Hands queued tasks to idle workers, most urgent first.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        while let Some(index) = self
            .slots
            .iter()
            .position(|s| s.state == WorkerState::Idle && s.worker.is_some())
        {
            let Some(task) = self.queue.pop() else { break };
            if self.handlers.get(task.kind.as_str()).is_none() {
                let error = ErrorInfo::new(
                    ErrorCode::UnknownKind,
                    format!(
                        "no handler serves kind {:?} on this node",
                        task.kind.as_str()
                    ),
                );
                self.emitter.task_timed(
                    &task.id,
                    &task.kind,
                    task.attempt,
                    EventBody::Failed {
                        error,
                        duration_ms: 0,
                    },
                    Some(Duration::ZERO),
                );
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
                    self.running.insert(
                        task.id.clone(),
                        Running {
                            task,
                            slot: index,
                            attempt,
                            stop_sent: false,
                        },
                    );
                }
                Err(SendError::Full(_)) | Err(SendError::Closed(_)) => {
                    let priority = task.priority;
                    self.queue.push_front(priority, task);
                    self.crash_slot(index, "the worker stopped unexpectedly".to_owned(), ctx);
                }
            }
        }
        self.notify_waiters();
    }

    fn notify_waiters(&mut self) {
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

    /// A worker crashed: restart it after a backoff, or disable its slot
    /// past the restart intensity.
    fn crash_slot(&mut self, index: usize, reason: String, ctx: &mut Context<Self>) {
        let policy = self.config.restart;
        let accepting = self.accepting;
        let slot = &mut self.slots[index];
        slot.worker = None;
        slot.task = None;
        slot.generation += 1;
        let now = Instant::now();
        slot.crashes.push_back(now);
        while slot
            .crashes
            .front()
            .is_some_and(|t| now.duration_since(*t) > policy.within)
        {
            slot.crashes.pop_front();
        }
        let recent = slot.crashes.len() as u32;
        if recent > policy.max_restarts || !accepting {
            slot.state = WorkerState::Disabled;
            if accepting {
                error!(
                    worker = slot.number,
                    restarts = slot.restarts,
                    error = %reason,
                    "Worker crashed {recent} times within {:?}; slot disabled.",
                    policy.within
                );
                let body = NodeEventBody::WorkerDisabled {
                    worker: slot.number,
                    restarts: slot.restarts,
                    reason,
                };
                self.emitter.node_event(body);
            }
            return;
        }
        slot.state = WorkerState::Restarting;
        let delay = policy
            .backoff_initial
            .saturating_mul(1u32 << (recent - 1).min(16))
            .min(policy.backoff_max);
        warn!(worker = slot.number, error = %reason, delay_ms = delay.as_millis() as u64, "Worker crashed; restarting it.");
        ctx.run_later(delay, move |act, ctx| act.restart_slot(index, reason, ctx));
    }

    fn restart_slot(&mut self, index: usize, reason: String, ctx: &mut Context<Self>) {
        if self.slots[index].state != WorkerState::Restarting {
            return;
        }
        self.start_worker(index, ctx);
        let slot = &mut self.slots[index];
        slot.restarts += 1;
        info!(
            worker = slot.number,
            restarts = slot.restarts,
            "Worker restarted."
        );
        let body = NodeEventBody::WorkerRestarted {
            worker: slot.number,
            restarts: slot.restarts,
            reason,
        };
        self.emitter.node_event(body);
        self.pump(ctx);
    }

    /// An attempt failed: retry after the backoff if it may, else fail it.
    fn attempt_failed(
        &mut self,
        mut task: Task,
        attempt: u32,
        error: ErrorInfo,
        retryable: bool,
        elapsed: Duration,
        ctx: &mut Context<Self>,
    ) {
        if retryable && attempt < task.max_attempts && self.accepting {
            let delay = task.backoff.delay(attempt);
            debug!(task_id = %task.id, attempt, error = %error, "Attempt failed; retrying.");
            self.emitter.task_timed(
                &task.id,
                &task.kind,
                attempt,
                EventBody::Retrying {
                    error,
                    retry_in_ms: delay.as_millis() as u64,
                },
                Some(elapsed),
            );
            task.attempt = attempt + 1;
            let id = task.id.clone();
            let handle = ctx.run_later(delay, move |act, ctx| {
                if let Some((task, _)) = act.waiting.remove(&id) {
                    let priority = task.priority;
                    act.queue.push_unbounded(priority, task);
                    act.pump(ctx);
                }
            });
            self.waiting.insert(task.id.clone(), (task, handle));
        } else {
            self.emitter.task_timed(
                &task.id,
                &task.kind,
                attempt,
                EventBody::Failed {
                    error,
                    duration_ms: elapsed.as_millis() as u64,
                },
                Some(elapsed),
            );
        }
    }

    fn cancel_unstarted(&mut self, task: &Task, reason: &str) {
        self.emitter.task(
            &task.id,
            &task.kind,
            task.attempt,
            EventBody::Cancelled {
                reason: reason.to_owned(),
            },
        );
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        for n in 1..=self.config.workers {
            self.slots.push(Slot {
                number: n as u8,
                arbiter: Arbiter::new(),
                worker: None,
                generation: 0,
                state: WorkerState::Idle,
                task: None,
                crashes: VecDeque::new(),
                restarts: 0,
            });
            self.start_worker(n - 1, ctx);
        }
        ctx.run_interval(HEALTH_INTERVAL, |act, ctx| {
            let dead: Vec<usize> = act
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| {
                    matches!(s.state, WorkerState::Idle | WorkerState::Busy)
                        && s.worker.as_ref().is_some_and(|w| !w.connected())
                })
                .map(|(i, _)| i)
                .collect();
            for index in dead {
                let lost = act.slots[index].task.clone();
                act.crash_slot(index, "the worker stopped unexpectedly".to_owned(), ctx);
                if let Some(run) = lost.and_then(|id| act.running.remove(&id)) {
                    let error = ErrorInfo::new(
                        ErrorCode::WorkerCrashed,
                        format!("worker {} stopped unexpectedly", index + 1),
                    );
                    act.attempt_failed(run.task, run.attempt, error, true, Duration::ZERO, ctx);
                }
            }
            act.pump(ctx);
        });
        info!(node = %self.emitter.node(), workers = self.config.workers, capacity = self.queue.capacity(), "Supervisor started.");
    }
}

/// Queues admitted tasks; answers per task.
#[derive(Debug, Message)]
#[rtype(result = "Vec<Result<(), DispatchError>>")]
pub struct Enqueue {
    /// Validated, admitted tasks.
    pub tasks: Vec<Task>,
    /// Emit `accepted` for each queued task.
    pub emit_accepted: bool,
}

impl Handler<Enqueue> for Supervisor {
    type Result = MessageResult<Enqueue>;

    fn handle(&mut self, msg: Enqueue, ctx: &mut Context<Self>) -> Self::Result {
        let capacity = self.queue.capacity();
        let in_service = self.in_service();
        let results = msg
            .tasks
            .into_iter()
            .map(|task| {
                if !self.accepting {
                    return Err(DispatchError::Unavailable(
                        "the node is shutting down".to_owned(),
                    ));
                }
                if in_service == 0 {
                    return Err(DispatchError::Unavailable(
                        "every worker slot is disabled after repeated crashes".to_owned(),
                    ));
                }
                if self.queued() >= capacity {
                    return Err(DispatchError::QueueFull { capacity });
                }
                if msg.emit_accepted {
                    self.emitter.task(
                        &task.id,
                        &task.kind,
                        task.attempt,
                        EventBody::Accepted {
                            priority: task.priority,
                        },
                    );
                }
                let priority = task.priority;
                self.queue
                    .push(priority, task)
                    .map_err(|_| DispatchError::QueueFull { capacity })
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
        debug_assert_eq!(run.slot, index);
        let Running { task, attempt, .. } = run;
        let elapsed = msg.elapsed;
        let duration_ms = elapsed.as_millis() as u64;
        if let AttemptOutcome::Panicked(why) = &msg.outcome {
            let why = why.clone();
            self.crash_slot(index, format!("handler panicked: {why}"), ctx);
        } else {
            let slot = &mut self.slots[index];
            slot.state = WorkerState::Idle;
            slot.task = None;
        }
        let (id, kind) = (task.id.clone(), task.kind.clone());
        match msg.outcome {
            AttemptOutcome::Completed(result) => self.emitter.task_timed(
                &id,
                &kind,
                attempt,
                EventBody::Completed {
                    result,
                    duration_ms,
                },
                Some(elapsed),
            ),
            AttemptOutcome::Failed(err) => {
                let retryable = err.is_retryable();
                let error = ErrorInfo::new(ErrorCode::HandlerError, err.message());
                self.attempt_failed(task, attempt, error, retryable, elapsed, ctx);
            }
            AttemptOutcome::Panicked(why) => {
                let error = ErrorInfo::new(
                    ErrorCode::WorkerCrashed,
                    format!("worker {} crashed: handler panicked: {why}", msg.slot),
                );
                self.attempt_failed(task, attempt, error, true, elapsed, ctx);
            }
            AttemptOutcome::TimedOut => {
                let timeout_ms = task.timeout_ms();
                if attempt < task.max_attempts && self.accepting {
                    let error = ErrorInfo::new(
                        ErrorCode::Timeout,
                        format!("the attempt ran past its timeout of {timeout_ms} ms"),
                    );
                    self.attempt_failed(task, attempt, error, true, elapsed, ctx);
                } else {
                    self.emitter.task_timed(
                        &id,
                        &kind,
                        attempt,
                        EventBody::TimedOut { timeout_ms },
                        Some(elapsed),
                    );
                }
            }
            AttemptOutcome::Cancelled(reason) => self.emitter.task_timed(
                &id,
                &kind,
                attempt,
                EventBody::Cancelled { reason },
                Some(elapsed),
            ),
            AttemptOutcome::Shutdown => {
                let error = ErrorInfo::new(
                    ErrorCode::Shutdown,
                    "the node shut down before the attempt finished",
                );
                self.attempt_failed(task, attempt, error, false, elapsed, ctx);
            }
            AttemptOutcome::UnknownKind => {
                let error = ErrorInfo::new(
                    ErrorCode::UnknownKind,
                    format!("no handler serves kind {:?} on this node", kind.as_str()),
                );
                self.attempt_failed(task, attempt, error, false, elapsed, ctx);
            }
        }
        self.pump(ctx);
    }
}

/// What the Supervisor did with a cancel request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReply {
    /// It was queued or waiting to retry: cancelled now.
    Cancelled,
    /// It is running: its worker was told to stop.
    Cancelling,
    /// This Supervisor does not hold it.
    NotHeld,
}

/// Cancels a task this node holds.
#[derive(Debug, Message)]
#[rtype(result = "CancelReply")]
pub struct CancelTask {
    /// The task.
    pub id: TaskId,
    /// Who or what asked, for the `cancelled` event.
    pub reason: String,
}

impl Handler<CancelTask> for Supervisor {
    type Result = MessageResult<CancelTask>;

    fn handle(&mut self, msg: CancelTask, ctx: &mut Context<Self>) -> Self::Result {
        if let Some(task) = self.queue.remove_first(|t| t.id == msg.id) {
            self.cancel_unstarted(&task, &msg.reason);
            self.notify_waiters();
            return MessageResult(CancelReply::Cancelled);
        }
        if let Some((task, handle)) = self.waiting.remove(&msg.id) {
            ctx.cancel_future(handle);
            self.cancel_unstarted(&task, &msg.reason);
            self.notify_waiters();
            return MessageResult(CancelReply::Cancelled);
        }
        if let Some(run) = self.running.get_mut(&msg.id) {
            if !run.stop_sent {
                run.stop_sent = true;
                if let Some(worker) = &self.slots[run.slot].worker {
                    worker.do_send(StopAttempt {
                        id: msg.id,
                        reason: StopReason::Cancel(msg.reason),
                    });
                }
            }
            return MessageResult(CancelReply::Cancelling);
        }
        MessageResult(CancelReply::NotHeld)
    }
}

/// The Supervisor's gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Tasks running.
    pub running: u64,
    /// Tasks queued or waiting to retry.
    pub queued: u64,
    /// Worker slots in service.
    pub workers: u64,
    /// Worker restarts since start.
    pub worker_restarts: u64,
}

/// Reads the gauges.
#[derive(Debug, Message)]
#[rtype(result = "Gauges")]
pub struct GetGauges;

impl Handler<GetGauges> for Supervisor {
    type Result = MessageResult<GetGauges>;

    fn handle(&mut self, _msg: GetGauges, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(Gauges {
            running: self.running.len() as u64,
            queued: self.queued() as u64,
            workers: self.in_service() as u64,
            worker_restarts: self.slots.iter().map(|s| u64::from(s.restarts)).sum(),
        })
    }
}

/// Each worker slot's state.
#[derive(Debug, Message)]
#[rtype(result = "Vec<WorkerInfo>")]
pub struct GetWorkers;

impl Handler<GetWorkers> for Supervisor {
    type Result = MessageResult<GetWorkers>;

    fn handle(&mut self, _msg: GetWorkers, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(
            self.slots
                .iter()
                .map(|s| WorkerInfo {
                    worker: s.number,
                    state: s.state,
                    task_id: s.task.clone(),
                    restarts: s.restarts,
                })
                .collect(),
        )
    }
}

/// Resolves once nothing is queued, waiting or running.
#[derive(Debug, Message)]
#[rtype(result = "oneshot::Receiver<()>")]
pub struct WaitIdle;

impl Handler<WaitIdle> for Supervisor {
    type Result = MessageResult<WaitIdle>;

    fn handle(&mut self, _msg: WaitIdle, _ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.idle_waiters.push(tx);
        self.notify_waiters();
        MessageResult(rx)
    }
}

/// Stops taking tasks and cancels those not started. Answers how many were
/// cancelled and a receiver that resolves once nothing runs.
#[derive(Debug, Message)]
#[rtype(result = "(usize, oneshot::Receiver<()>)")]
pub struct BeginShutdown;

impl Handler<BeginShutdown> for Supervisor {
    type Result = MessageResult<BeginShutdown>;

    fn handle(&mut self, _msg: BeginShutdown, ctx: &mut Context<Self>) -> Self::Result {
        self.accepting = false;
        let reason = "the node shut down before the task started";
        let mut unstarted = 0;
        for task in self.queue.drain() {
            self.cancel_unstarted(&task, reason);
            unstarted += 1;
        }
        for (_, (task, handle)) in std::mem::take(&mut self.waiting) {
            ctx.cancel_future(handle);
            self.cancel_unstarted(&task, reason);
            unstarted += 1;
        }
        info!(
            running = self.running.len(),
            unstarted, "Shutting down: no new tasks."
        );
        let (tx, rx) = oneshot::channel();
        self.drained_waiters.push(tx);
        self.notify_waiters();
        MessageResult((unstarted, rx))
    }
}

/// Stops every running attempt (attempt error `shutdown`); answers how many.
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct InterruptRunning;

impl Handler<InterruptRunning> for Supervisor {
    type Result = usize;

    fn handle(&mut self, _msg: InterruptRunning, _ctx: &mut Context<Self>) -> usize {
        let mut n = 0;
        for (id, run) in &mut self.running {
            if let Some(worker) = &self.slots[run.slot].worker {
                worker.do_send(StopAttempt {
                    id: id.clone(),
                    reason: StopReason::Shutdown,
                });
                run.stop_sent = true;
                n += 1;
            }
        }
        n
    }
}

/// Stops the Workers and their threads; the Supervisor then stops too.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct StopWorkers;

impl Handler<StopWorkers> for Supervisor {
    type Result = ();

    fn handle(&mut self, _msg: StopWorkers, _ctx: &mut Context<Self>) {
        for slot in &mut self.slots {
            slot.worker = None;
            slot.state = WorkerState::Disabled;
            slot.arbiter.stop();
        }
        info!("Workers stopped.");
    }
}
