//! One live node per id. Two nodes with one id would mix their heartbeats,
//! leases and records, and one's `offline` would make the others reclaim
//! the tasks the second still runs. So a node answers requests on
//! `<p>.probe.<node>` for as long as it is live, and a node about to start
//! asks there first ([`ensure_unique`]): an answer means the id is taken
//! and the start is refused.
//!
//! What it does not cover: two nodes started with one id within the same
//! few milliseconds (each asks before the other answers), and a node
//! frozen without its connection closing (`SIGSTOP`: the server keeps
//! its subscription, so the probe waits [`PROBE_TIMEOUT`] for nothing and
//! the start goes on). A node killed outright (`kill -9`) leaves no
//! subscription behind: the server drops it with the connection, and a
//! node restarted with the same id starts at once.

use std::time::Duration;

use bytes::Bytes;
use dispatcher_actors::NodeId;
use futures::StreamExt;
use serde_json::json;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::subjects::Subjects;

/// How long a starting node waits for an answer when something subscribes
/// to its probe subject (a live node answers at once; when nothing
/// subscribes, the server says so at once).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How often a live node logs that another process asked for its id.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Why the probe stopped a start.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// A live node answered for this id.
    #[error(
        "another live node already runs with id `{node}` (it answered on `{subject}`): stop it \
         first, or give this node another id"
    )]
    Taken {
        /// The id.
        node: NodeId,
        /// The probe subject.
        subject: String,
    },
    /// The probe could not be sent, or its subject subscribed to.
    #[error("asking on `{subject}` whether id `{node}` is taken: {source}")]
    Nats {
        /// The id.
        node: NodeId,
        /// The probe subject.
        subject: String,
        /// What NATS said.
        #[source]
        source: async_nats::Error,
    },
}

/// Asks `<p>.probe.<node>` whether a live node has this id: an answer is
/// [`ProbeError::Taken`]; no responders, or no answer within
/// [`PROBE_TIMEOUT`], lets the start go on.
pub async fn ensure_unique(
    client: &async_nats::Client,
    subjects: &Subjects,
    node: &NodeId,
) -> Result<(), ProbeError> {
    use async_nats::RequestErrorKind;
    let subject = subjects.node_probe(node.as_str());
    let request = async_nats::Request::new()
        .payload(Bytes::from_static(b"{}"))
        .timeout(Some(PROBE_TIMEOUT));
    match client.send_request(subject.clone(), request).await {
        Ok(_) => Err(ProbeError::Taken {
            node: node.clone(),
            subject,
        }),
        Err(e) => match e.kind() {
            RequestErrorKind::NoResponders => Ok(()),
            RequestErrorKind::TimedOut => {
                warn!(
                    node = %node,
                    subject = %subject,
                    "Something subscribes to this node's probe subject but did not answer; \
                     taking the id as free."
                );
                Ok(())
            }
            _ => Err(ProbeError::Nats {
                node: node.clone(),
                subject,
                source: e.into(),
            }),
        },
    }
}

/// Answers `<p>.probe.<node>` while the node is live.
pub struct ProbeAnswers {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl ProbeAnswers {
    /// Subscribes to the node's probe subject and answers every request
    /// with `{"node": "<id>"}`. The subscription is made when this
    /// returns (sent before anything the node publishes later).
    pub async fn start(
        client: async_nats::Client,
        subjects: &Subjects,
        node: NodeId,
    ) -> Result<Self, ProbeError> {
        let subject = subjects.node_probe(node.as_str());
        let mut sub = client
            .subscribe(subject.clone())
            .await
            .map_err(|e| ProbeError::Nats {
                node: node.clone(),
                subject: subject.clone(),
                source: e.into(),
            })?;
        let (stop, mut stopped) = oneshot::channel();
        let body = Bytes::from(json!({ "node": node }).to_string());
        let subjects = subjects.clone();
        let task = tokio::spawn(async move {
            let mut warned: Option<Instant> = None;
            loop {
                tokio::select! {
                    msg = sub.next() => {
                        let Some(msg) = msg else { return };
                        let Some(reply) = msg.reply.filter(|to| subjects.is_reply_safe(to)) else { continue };
                        if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                            warned = Some(Instant::now());
                            warn!(node = %node, "Another process asked to start with this node's id; told it the id is taken.");
                        } else {
                            debug!(node = %node, "Answered a probe for this node's id.");
                        }
                        if let Err(e) = client.publish(reply, body.clone()).await {
                            warn!(node = %node, error = %e, "Probe answer not sent.");
                        }
                    }
                    _ = &mut stopped => {
                        let _ = sub.unsubscribe().await;
                        return;
                    }
                }
            }
        });
        Ok(Self { stop, task })
    }

    /// Stops answering: unsubscribes (the next flush carries it to the
    /// server), so that a node started with this id afterwards may run.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}
