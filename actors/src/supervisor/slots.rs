//! The Supervisor's worker slots: each has its own thread (an Arbiter) for
//! handlers placed on a thread, and a Worker actor beside the Supervisor.
//! Starting Workers, noticing crashes (a handler panic, or a Worker gone
//! without a word), and restarting them one-for-one with backoff, up to
//! the restart intensity (R restarts in T per slot) after which the slot
//! is disabled.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use actix::{Actor, Addr, Arbiter, AsyncContext, Context};
use tracing::{error, info, warn};

use super::{Failure, Supervisor};
use crate::error::{ErrorCode, ErrorInfo};
use crate::event::{NodeEventBody, WorkerState};
use crate::task::TaskId;
use crate::worker::Worker;

/// How often the Supervisor checks that every Worker is still alive.
const HEALTH_INTERVAL: Duration = Duration::from_millis(500);

pub(super) struct Slot {
    pub(super) number: u8,
    arbiter: Arbiter,
    pub(super) worker: Option<Addr<Worker>>,
    /// Bumped at every (re)start; reports from an older Worker are stale.
    pub(super) generation: u64,
    pub(super) state: WorkerState,
    pub(super) task: Option<TaskId>,
    /// Crash times inside the restart window.
    crashes: VecDeque<Instant>,
    pub(super) restarts: u32,
}

impl Slot {
    pub(super) fn set_idle(&mut self) {
        self.state = WorkerState::Idle;
        self.task = None;
    }

    /// Stops the Worker and its thread for good.
    pub(super) fn stop(&mut self) {
        self.worker = None;
        self.state = WorkerState::Disabled;
        self.arbiter.stop();
    }
}

impl Supervisor {
    pub(super) fn start_slots(&mut self, ctx: &mut Context<Self>) {
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
        ctx.run_interval(HEALTH_INTERVAL, |act, ctx| act.check_workers(ctx));
    }

    pub(super) fn in_service(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.state != WorkerState::Disabled)
            .count()
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
        // The Worker lives here, beside the Supervisor: handing it an
        // attempt and hearing back cost no thread wake-up. Handlers placed
        // on a thread run on the slot's Arbiter.
        let thread = slot.arbiter.handle();
        let addr = Worker::new(number, generation, me, handlers, emitter, grace, thread).start();
        slot.worker = Some(addr);
        slot.set_idle();
    }

    /// Finds Workers that died without reporting (their mailbox is closed)
    /// and treats them as crashed; their task's attempt failed.
    fn check_workers(&mut self, ctx: &mut Context<Self>) {
        let dead: Vec<usize> = self
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
            let lost = self.slots[index].task.clone();
            self.crash_slot(index, "the worker stopped unexpectedly".to_owned(), ctx);
            if let Some(run) = lost.and_then(|id| self.running.remove(&id)) {
                let error = ErrorInfo::new(
                    ErrorCode::WorkerCrashed,
                    format!("worker {} stopped unexpectedly", index + 1),
                );
                let failure = Failure {
                    task: run.task,
                    attempt: run.attempt,
                    error,
                    retryable: true,
                    elapsed: Duration::ZERO,
                    delivery: run.delivery,
                };
                self.attempt_failed(failure, ctx);
            }
        }
        self.pump(ctx);
    }

    /// A worker crashed: restart it after a backoff, or disable its slot
    /// past the restart intensity.
    pub(super) fn crash_slot(&mut self, index: usize, reason: String, ctx: &mut Context<Self>) {
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
        if !accepting {
            // Shutting down: nothing to restart for.
            slot.state = WorkerState::Disabled;
            return;
        }
        if recent > policy.max_restarts {
            slot.state = WorkerState::Disabled;
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
            // With no slot left in service the node takes no more work.
            self.notify_waiters();
            return;
        }
        slot.state = WorkerState::Restarting;
        let delay = policy
            .backoff_initial
            .saturating_mul(1u32 << (recent - 1).min(16))
            .min(policy.backoff_max);
        warn!(
            worker = slot.number,
            error = %reason,
            delay_ms = delay.as_millis() as u64,
            "Worker crashed; restarting it."
        );
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
}
