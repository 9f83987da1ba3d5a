//! The Supervisor's control messages: cancel, gauges, worker states,
//! waiting for idleness, and the graceful shutdown.

use actix::{AsyncContext, Context, Handler, Message, MessageResult};
use tokio::sync::oneshot;
use tracing::info;

use super::{Held, Supervisor};
use crate::delivery::Settlement;
use crate::event::WorkerInfo;
use crate::task::TaskId;
use crate::worker::{StopAttempt, StopReason};

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
        if let Some(Held { task, delivery }) = self.queue.remove_first(|h| h.task.id == msg.id) {
            self.cancel_unstarted(&task, &msg.reason, delivery);
            self.notify_waiters();
            return MessageResult(CancelReply::Cancelled);
        }
        if let Some((task, handle)) = self.waiting.remove(&msg.id) {
            ctx.cancel_future(handle);
            self.cancel_unstarted(&task, &msg.reason, None);
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
        let workers = self
            .slots
            .iter()
            .map(|s| WorkerInfo {
                worker: s.number,
                state: s.state,
                task_id: s.task.clone(),
                restarts: s.restarts,
            })
            .collect();
        MessageResult(workers)
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

/// Stops taking tasks. Tasks not started are handed back to their
/// transport (if delivered) or cancelled. Answers how many there were and
/// a receiver that resolves once nothing runs.
#[derive(Debug, Message)]
#[rtype(result = "(usize, oneshot::Receiver<()>)")]
pub struct BeginShutdown;

impl Handler<BeginShutdown> for Supervisor {
    type Result = MessageResult<BeginShutdown>;

    fn handle(&mut self, _msg: BeginShutdown, ctx: &mut Context<Self>) -> Self::Result {
        self.accepting = false;
        let reason = "the node shut down before the task started";
        let mut unstarted = 0;
        for Held { task, delivery } in self.queue.drain() {
            match delivery {
                // Handed back: the transport gives it to another node now.
                Some(d) => d.settle(Settlement::Release),
                None => self.cancel_unstarted(&task, reason, None),
            }
            unstarted += 1;
        }
        for (_, (task, handle)) in std::mem::take(&mut self.waiting) {
            ctx.cancel_future(handle);
            self.cancel_unstarted(&task, reason, None);
            unstarted += 1;
        }
        info!(
            running = self.running.len(),
            unstarted, "Shutting down: taking no new tasks."
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

/// Stops the Workers and their threads.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct StopWorkers;

impl Handler<StopWorkers> for Supervisor {
    type Result = ();

    fn handle(&mut self, _msg: StopWorkers, _ctx: &mut Context<Self>) {
        for slot in &mut self.slots {
            slot.stop();
        }
        info!("Workers stopped.");
    }
}
