//! [`Emitter`]: the one path every task event takes out of the actors — to
//! the Registry, the Metrics, in-process subscribers and the [`EventSink`].
//! Not an actor: a cheap, thread-safe handle the Supervisor and Workers share.

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use tokio::sync::broadcast;

use crate::event::{EventBody, EventSink, NodeEvent, NodeEventBody, TaskEvent};
use crate::metrics::{Metrics, Observe};
use crate::registry::{RecordEvent, Registry};
use crate::task::{NodeId, TaskId, TaskKind};

/// Fans events out; never blocks.
#[derive(Clone)]
pub(crate) struct Emitter {
    node: NodeId,
    sink: Arc<dyn EventSink>,
    registry: Addr<Registry>,
    metrics: Addr<Metrics>,
    subscribers: broadcast::Sender<TaskEvent>,
}

impl Emitter {
    pub(crate) fn new(
        node: NodeId,
        sink: Arc<dyn EventSink>,
        registry: Addr<Registry>,
        metrics: Addr<Metrics>,
        subscribers: broadcast::Sender<TaskEvent>,
    ) -> Self {
        Self {
            node,
            sink,
            registry,
            metrics,
            subscribers,
        }
    }

    pub(crate) fn node(&self) -> &NodeId {
        &self.node
    }

    /// Emits a task event stamped now, by this node.
    pub(crate) fn task(&self, id: &TaskId, kind: &TaskKind, attempt: u32, body: EventBody) {
        self.task_timed(id, kind, attempt, body, None);
    }

    /// Emits a task event that ends an attempt of `duration`.
    pub(crate) fn task_timed(
        &self,
        id: &TaskId,
        kind: &TaskKind,
        attempt: u32,
        body: EventBody,
        duration: Option<Duration>,
    ) {
        let event = TaskEvent::now(id.clone(), kind.clone(), attempt, self.node.clone(), body);
        self.emit(event, duration);
    }

    /// Emits `event` as it is (made by this node).
    pub(crate) fn emit(&self, event: TaskEvent, duration: Option<Duration>) {
        self.sink.task_event(&event);
        self.metrics.do_send(Observe {
            event: event.name(),
            duration,
        });
        if self.subscribers.receiver_count() > 0 {
            // Only fails when every receiver is gone, which the check makes rare.
            let _ = self.subscribers.send(event.clone());
        }
        self.registry.do_send(RecordEvent(event));
    }

    /// Emits a node event.
    pub(crate) fn node_event(&self, body: NodeEventBody) {
        self.sink
            .node_event(&NodeEvent::now(self.node.clone(), body));
    }
}
