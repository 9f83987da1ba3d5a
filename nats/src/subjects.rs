//! Every NATS subject, stream, bucket, queue-group and header name the
//! dispatcher uses, built from one prefix. Nothing else in the workspace
//! spells a subject.

use dispatcher_actors::task::is_token;
use dispatcher_actors::{NodeEventName, Priority, TaskEventName};

/// Queue group of the submit gateway and core-mode ingest.
pub const QUEUE_GROUP: &str = "dispatchers";
/// Name of the control API's micro service.
pub const SERVICE_NAME: &str = "dispatch";
/// JetStream stream that holds the task queue (default prefix).
pub const STREAM_TASKS: &str = "DISPATCH_TASKS";
/// KV bucket of task records (default prefix).
pub const KV_BUCKET: &str = "dispatch_tasks";
/// Header naming the body's format.
pub const HEADER_CONTENT_TYPE: &str = "Content-Type";
/// JetStream's de-duplication header.
pub const HEADER_MSG_ID: &str = "Nats-Msg-Id";
/// Set on tasks the submit gateway stored (it published `accepted`).
pub const HEADER_ACCEPTED: &str = "Dispatch-Accepted";
/// Set on a task replayed from the dead letters: it runs again even where
/// it finished before.
pub const HEADER_REPLAY: &str = "Dispatch-Replay";
/// Content type of JSON bodies (the default).
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// Content type of bincode bodies.
pub const CONTENT_TYPE_BINCODE: &str = "application/x-bincode";

/// The control API's endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApiEndpoint {
    /// One task's record.
    Status,
    /// Cancel a task.
    Cancel,
    /// Records by status and kind.
    List,
    /// The error list.
    Errors,
    /// Counters and gauges.
    Stats,
    /// The live nodes.
    Nodes,
    /// Run a dead task again (mode `jetstream`).
    Replay,
}

impl ApiEndpoint {
    /// Every endpoint.
    pub const ALL: [ApiEndpoint; 7] = [
        ApiEndpoint::Status,
        ApiEndpoint::Cancel,
        ApiEndpoint::List,
        ApiEndpoint::Errors,
        ApiEndpoint::Stats,
        ApiEndpoint::Nodes,
        ApiEndpoint::Replay,
    ];

    /// The endpoint's name (last subject token).
    pub fn as_str(self) -> &'static str {
        match self {
            ApiEndpoint::Status => "status",
            ApiEndpoint::Cancel => "cancel",
            ApiEndpoint::List => "list",
            ApiEndpoint::Errors => "errors",
            ApiEndpoint::Stats => "stats",
            ApiEndpoint::Nodes => "nodes",
            ApiEndpoint::Replay => "replay",
        }
    }
}

/// A prefix that is not a dot-separated list of `[A-Za-z0-9_-]+` tokens.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid subject prefix {0:?}: use dot-separated tokens of A-Z, a-z, 0-9, `_` or `-`")]
pub struct InvalidPrefix(pub String);

/// Builds every subject from the prefix (`dispatch` by default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Default for Subjects {
    fn default() -> Self {
        Self {
            prefix: "dispatch".to_owned(),
        }
    }
}

impl Subjects {
    /// Subjects under `prefix`.
    pub fn new(prefix: &str) -> Result<Self, InvalidPrefix> {
        if prefix.split('.').all(|t| is_token(t, 64)) {
            Ok(Self {
                prefix: prefix.to_owned(),
            })
        } else {
            Err(InvalidPrefix(prefix.to_owned()))
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<p>.submit.<kind>`
    pub fn submit(&self, kind: &str) -> String {
        format!("{}.submit.{kind}", self.prefix)
    }

    /// `<p>.submit.*`: every submit subject.
    pub fn submit_any(&self) -> String {
        format!("{}.submit.*", self.prefix)
    }

    /// `<p>.tasks.<kind>.<priority>`
    pub fn task(&self, kind: &str, priority: Priority) -> String {
        format!("{}.tasks.{kind}.{}", self.prefix, priority.as_str())
    }

    /// `<p>.tasks.*.*`: every task queue subject.
    pub fn tasks_any(&self) -> String {
        format!("{}.tasks.*.*", self.prefix)
    }

    /// `<p>.events.<kind>.<id>.<event>`
    pub fn event(&self, kind: &str, id: &str, event: TaskEventName) -> String {
        format!("{}.events.{kind}.{id}.{}", self.prefix, event.as_str())
    }

    /// `<p>.events.>`: every task event.
    pub fn events_any(&self) -> String {
        format!("{}.events.>", self.prefix)
    }

    /// `<p>.events.<kind>.>`: every event of one kind's tasks.
    pub fn kind_events(&self, kind: &str) -> String {
        format!("{}.events.{kind}.>", self.prefix)
    }

    /// `<p>.events.*.<id>.*`: every event of one task.
    pub fn task_events(&self, id: &str) -> String {
        format!("{}.events.*.{id}.*", self.prefix)
    }

    /// `<p>.nodes.<node>.<event>`
    pub fn node_event(&self, node: &str, event: NodeEventName) -> String {
        format!("{}.nodes.{node}.{}", self.prefix, event.as_str())
    }

    /// `<p>.nodes.>`: every node event.
    pub fn nodes_any(&self) -> String {
        format!("{}.nodes.>", self.prefix)
    }

    /// `<p>.probe.<node>`: answered by the live node with this id, asked
    /// by a node about to start with it (one live node per id). Not under
    /// `<p>.nodes.>`, so that subscribers of node events neither receive
    /// probes nor delay them, and so that permissions can keep clients off.
    pub fn node_probe(&self, node: &str) -> String {
        format!("{}.probe.{node}", self.prefix)
    }

    /// `<p>.metrics.<node>`
    pub fn metrics(&self, node: &str) -> String {
        format!("{}.metrics.{node}", self.prefix)
    }

    /// `<p>.tasks.>`: the subjects of the task stream.
    pub fn tasks_all(&self) -> String {
        format!("{}.tasks.>", self.prefix)
    }

    /// `<p>.dead.<kind>`: dead letters of a kind.
    pub fn dead(&self, kind: &str) -> String {
        format!("{}.dead.{kind}", self.prefix)
    }

    /// `<p>.dead.>`: the subjects of the dead-letter stream.
    pub fn dead_all(&self) -> String {
        format!("{}.dead.>", self.prefix)
    }

    /// `<p>.errors.<kind>`: a failed attempt of a task of `kind`, kept in
    /// the error stream (mode `jetstream`).
    pub fn error(&self, kind: &str) -> String {
        format!("{}.errors.{kind}", self.prefix)
    }

    /// `<p>.errors.*`: the subjects of the error stream.
    pub fn errors_all(&self) -> String {
        format!("{}.errors.*", self.prefix)
    }

    /// The prefix as a name token: `.` and `-` become `_`.
    fn name_token(&self) -> String {
        self.prefix.replace(['.', '-'], "_")
    }

    /// The task stream: `DISPATCH_TASKS` for the default prefix.
    pub fn stream_tasks(&self) -> String {
        format!("{}_TASKS", self.name_token().to_uppercase())
    }

    /// The dead-letter stream: `DISPATCH_DEAD` for the default prefix.
    pub fn stream_dead(&self) -> String {
        format!("{}_DEAD", self.name_token().to_uppercase())
    }

    /// The error stream: `DISPATCH_ERRORS` for the default prefix.
    pub fn stream_errors(&self) -> String {
        format!("{}_ERRORS", self.name_token().to_uppercase())
    }

    /// The KV bucket of task records: `dispatch_tasks` for the default prefix.
    pub fn bucket_tasks(&self) -> String {
        format!("{}_tasks", self.name_token())
    }

    /// The KV bucket of cancel requests: `dispatch_cancels`.
    pub fn bucket_cancels(&self) -> String {
        format!("{}_cancels", self.name_token())
    }

    /// The stream behind a KV bucket (JetStream's convention): `KV_<bucket>`.
    pub fn kv_stream(bucket: &str) -> String {
        format!("KV_{bucket}")
    }

    /// The subjects of a KV bucket's stream: `$KV.<bucket>.>`.
    pub fn kv_subjects(bucket: &str) -> String {
        format!("$KV.{bucket}.>")
    }

    /// The durable consumer of one queue subject: `echo_high`.
    pub fn consumer(&self, kind: &str, priority: Priority) -> String {
        format!("{kind}_{}", priority.as_str())
    }

    /// `<p>.leases.<node>`: the deliveries a node holds (mode `jetstream`),
    /// published as they change, for fast reclaim.
    pub fn leases(&self, node: &str) -> String {
        format!("{}.leases.{node}", self.prefix)
    }

    /// `<p>.leases.*`
    pub fn leases_any(&self) -> String {
        format!("{}.leases.*", self.prefix)
    }

    /// `<p>.api.<endpoint>`
    pub fn api(&self, endpoint: ApiEndpoint) -> String {
        format!("{}.api.{}", self.prefix, endpoint.as_str())
    }

    /// Whether a node may answer a request on `reply`, the reply subject
    /// the requester chose. A reply goes out with the node's rights, so it
    /// must not land where a node's publish means something: nowhere under
    /// this prefix, nor under `$JS.`, `$KV.`, `$SRV.`, `$SYS.` or any other
    /// `$` subject (acks, KV writes, the JetStream API), and never on a
    /// subject with wildcards or empty tokens. Inboxes (`_INBOX.…`, or any
    /// other prefix a client picks) pass.
    pub fn is_reply_safe(&self, reply: &str) -> bool {
        let own = reply
            .strip_prefix(self.prefix.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'));
        !reply.is_empty()
            && !reply.starts_with('$')
            && !own
            && reply.len() <= 512
            && reply.split('.').all(|t| {
                !t.is_empty()
                    && t != "*"
                    && t != ">"
                    && !t
                        .bytes()
                        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
            })
    }

    /// The token at `index` (0-based, after the prefix) of `subject`, if it
    /// is under this prefix: `kind` of a submit subject is token 1.
    pub fn token<'a>(&self, subject: &'a str, index: usize) -> Option<&'a str> {
        subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('.')?
            .split('.')
            .nth(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_protocol_subjects() {
        let s = Subjects::default();
        assert_eq!(s.submit("echo"), "dispatch.submit.echo");
        assert_eq!(s.submit_any(), "dispatch.submit.*");
        assert_eq!(s.task("echo", Priority::High), "dispatch.tasks.echo.high");
        assert_eq!(s.tasks_any(), "dispatch.tasks.*.*");
        assert_eq!(
            s.event("echo", "t1", TaskEventName::TimedOut),
            "dispatch.events.echo.t1.timed_out"
        );
        assert_eq!(s.events_any(), "dispatch.events.>");
        assert_eq!(s.kind_events("echo"), "dispatch.events.echo.>");
        assert_eq!(s.task_events("t1"), "dispatch.events.*.t1.*");
        assert_eq!(
            s.node_event("n1", NodeEventName::WorkerRestarted),
            "dispatch.nodes.n1.worker_restarted"
        );
        assert_eq!(s.nodes_any(), "dispatch.nodes.>");
        assert_eq!(s.metrics("n1"), "dispatch.metrics.n1");
        assert_eq!(s.node_probe("n1"), "dispatch.probe.n1");
        assert_eq!(s.api(ApiEndpoint::Stats), "dispatch.api.stats");
        assert_eq!(s.tasks_all(), "dispatch.tasks.>");
        assert_eq!(s.dead("echo"), "dispatch.dead.echo");
        assert_eq!(s.stream_tasks(), STREAM_TASKS);
        assert_eq!(s.stream_dead(), "DISPATCH_DEAD");
        assert_eq!(s.stream_errors(), "DISPATCH_ERRORS");
        assert_eq!(s.error("echo"), "dispatch.errors.echo");
        assert_eq!(s.errors_all(), "dispatch.errors.*");
        assert_eq!(s.bucket_tasks(), KV_BUCKET);
        assert_eq!(s.bucket_cancels(), "dispatch_cancels");
        assert_eq!(s.consumer("echo", Priority::Low), "echo_low");
        let other = Subjects::new("acme.jobs-2").unwrap();
        assert_eq!(other.stream_tasks(), "ACME_JOBS_2_TASKS");
        assert_eq!(other.bucket_tasks(), "acme_jobs_2_tasks");
    }

    #[test]
    fn replies_go_only_to_inboxes() {
        let s = Subjects::default();
        for ok in ["_INBOX.abc.1", "_R_.x.y", "my-app.inbox.7", "dispatcher.x"] {
            assert!(s.is_reply_safe(ok), "{ok}");
        }
        for bad in [
            "",
            "$KV.dispatch_tasks.t1",
            "$JS.ACK.DISPATCH_TASKS.echo_normal.1.2.3.4.5",
            "$JS.API.STREAM.DELETE.DISPATCH_TASKS",
            "$SRV.PING",
            "dispatch.tasks.echo.normal",
            "dispatch.leases.n1",
            "dispatch",
            "_INBOX.*",
            "_INBOX.>",
            "a..b",
        ] {
            assert!(!s.is_reply_safe(bad), "{bad}");
        }
    }

    #[test]
    fn prefixes_are_checked_and_tokens_read_back() {
        let s = Subjects::new("acme.jobs").unwrap();
        assert_eq!(s.submit("echo"), "acme.jobs.submit.echo");
        assert_eq!(s.token("acme.jobs.tasks.echo.low", 1), Some("echo"));
        assert_eq!(s.token("acme.jobs.tasks.echo.low", 2), Some("low"));
        assert_eq!(s.token("other.tasks.echo.low", 1), None);
        assert!(Subjects::new("").is_err());
        assert!(Subjects::new("a..b").is_err());
        assert!(Subjects::new("a.*").is_err());
        assert!(Subjects::new("a b").is_err());
    }
}
