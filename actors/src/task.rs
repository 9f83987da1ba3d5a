//! The task model: ids, priorities, retry policy, the client's [`TaskSpec`]
//! and its validation into a runnable [`Task`].
//!
//! Everything a client may send is checked here, field by field, so that the
//! in-process API and every transport reject the same inputs with the same
//! errors.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ErrorCode, ErrorInfo};
use crate::time::Timestamp;

/// Longest task kind, in characters.
pub const MAX_KIND_LEN: usize = 64;
/// Longest task id, in characters.
pub const MAX_ID_LEN: usize = 128;
/// Longest node id, in characters.
pub const MAX_NODE_ID_LEN: usize = 128;
/// Largest `timeout_ms` a task may ask for (24 h).
pub const MAX_TIMEOUT_MS: u64 = 86_400_000;
/// Largest `max_attempts` a task may ask for.
pub const MAX_ATTEMPTS: u32 = 100;
/// Most tags on one task.
pub const MAX_TAGS: usize = 64;
/// Longest tag key, in bytes.
pub const MAX_TAG_KEY_LEN: usize = 64;
/// Longest tag value, in bytes.
pub const MAX_TAG_VALUE_LEN: usize = 256;

/// True if `s` is a protocol token: `[A-Za-z0-9_-]+`, at most `max` chars.
pub fn is_token(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

macro_rules! token_newtype {
    ($(#[$meta:meta])* $name:ident, $max:expr, $what:literal) => {
        $(#[$meta])*
        ///
        /// Shared text: a clone (every event, record and message carries
        /// one) copies a pointer, not the string.
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Checks `s` against `[A-Za-z0-9_-]+` and the length limit.
            pub fn new(s: impl Into<String>) -> Result<Self, ErrorInfo> {
                let s = s.into();
                if is_token(&s, $max) {
                    Ok(Self(Arc::from(s)))
                } else {
                    Err(ErrorInfo::field(
                        ErrorCode::InvalidField,
                        $what,
                        format!(
                            concat!($what, " must be 1 to {} characters of A-Z, a-z, 0-9, `_` or `-`, got {:?}"),
                            $max,
                            truncate_for_message(&s)
                        ),
                    ))
                }
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                String::deserialize(deserializer).map(|s| Self(Arc::from(s)))
            }
        }
    };
}

token_newtype!(
    /// A task's id: client-given, or a UUIDv7 made by [`TaskId::generate`].
    TaskId,
    MAX_ID_LEN,
    "id"
);
token_newtype!(
    /// A task's kind: names the handler that runs it and a subject token.
    TaskKind,
    MAX_KIND_LEN,
    "kind"
);
token_newtype!(
    /// A node's id: unique per process, a subject token.
    NodeId,
    MAX_NODE_ID_LEN,
    "node"
);

impl TaskId {
    /// A fresh, time-ordered id (UUIDv7).
    pub fn generate() -> Self {
        Self(Arc::from(uuid::Uuid::now_v7().to_string()))
    }
}

impl TaskKind {
    /// The stand-in kind (`_`) used in `rejected` events when no valid kind
    /// could be read.
    pub fn unknown() -> Self {
        Self(Arc::from("_"))
    }
}

fn truncate_for_message(s: &str) -> String {
    const SHOW: usize = 40;
    if s.chars().count() <= SHOW {
        s.to_owned()
    } else {
        let head: String = s.chars().take(SHOW).collect();
        format!("{head}…")
    }
}

/// How urgent a task is; served `critical` first, then `high`, `normal`,
/// `low`, FIFO within one priority.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Served before everything else.
    Critical,
    /// Served before `normal` and `low`.
    High,
    /// The default.
    Normal,
    /// Served last.
    Low,
}

impl Priority {
    /// Every priority, most urgent first (the order they are served in).
    pub const ALL: [Priority; 4] = [
        Priority::Critical,
        Priority::High,
        Priority::Normal,
        Priority::Low,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    /// 0 for `critical` … 3 for `low`: an index into per-priority arrays.
    pub fn rank(self) -> usize {
        self as usize
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Priority {
    type Err = ErrorInfo;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s).ok_or_else(|| {
            ErrorInfo::field(
                ErrorCode::InvalidField,
                "priority",
                "priority must be one of critical, high, normal, low",
            )
        })
    }
}

/// Exponential backoff between attempts: `initial × multiplier^(n-1)`,
/// capped at `max`, with up to 10 % random jitter subtracted.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Backoff {
    /// Delay after the first failed attempt, in ms.
    pub initial_ms: u64,
    /// Largest delay, in ms.
    pub max_ms: u64,
    /// Growth per failed attempt (1.0 ..= 100.0).
    pub multiplier: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial_ms: 500,
            max_ms: 60_000,
            multiplier: 2.0,
        }
    }
}

impl Backoff {
    /// The delay before the attempt after `failed_attempt` (1-based), without jitter.
    pub fn base_delay(&self, failed_attempt: u32) -> Duration {
        let exp = failed_attempt.saturating_sub(1).min(64) as i32;
        let ms = (self.initial_ms as f64) * self.multiplier.powi(exp);
        let ms = if ms.is_finite() {
            ms.min(self.max_ms as f64)
        } else {
            self.max_ms as f64
        };
        Duration::from_millis(ms.max(0.0) as u64)
    }

    /// The delay before the attempt after `failed_attempt`, with jitter.
    pub fn delay(&self, failed_attempt: u32) -> Duration {
        let base = self.base_delay(failed_attempt);
        let jitter = rand::random::<f64>() * 0.1;
        base.mul_f64(1.0 - jitter)
    }
}

/// A client's partial backoff: missing fields take the node's defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BackoffSpec {
    /// Delay after the first failed attempt, in ms.
    #[serde(default)]
    pub initial_ms: Option<u64>,
    /// Largest delay, in ms.
    #[serde(default)]
    pub max_ms: Option<u64>,
    /// Growth per failed attempt.
    #[serde(default)]
    pub multiplier: Option<f64>,
}

/// How a task holds a named resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceMode {
    /// Shared with other readers.
    Read,
    /// One writer, no readers.
    Write,
    /// Nobody else.
    Exclusive,
}

/// A resource lock a task asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceSpec {
    /// The resource's name (a token).
    pub name: String,
    /// How it is held.
    pub mode: ResourceMode,
}

/// What a client sends to submit a task: every field optional. Turn it into
/// a [`Task`] with [`TaskSpec::into_task`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Client-given id; a UUIDv7 is generated if absent.
    #[serde(default)]
    pub id: Option<String>,
    /// If present, must equal the kind the task is submitted under.
    #[serde(default)]
    pub kind: Option<String>,
    /// Anything; handed to the handler.
    #[serde(default)]
    pub payload: Value,
    /// `critical`, `high`, `normal` or `low`.
    #[serde(default)]
    pub priority: Option<String>,
    /// Per-attempt time limit, 1 ..= 86 400 000 ms.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Attempts in all, 1 ..= 100.
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Retry delays.
    #[serde(default)]
    pub backoff: Option<BackoffSpec>,
    /// Tasks that must complete first (not supported yet).
    #[serde(default)]
    pub depends_on: Option<Vec<String>>,
    /// Resource locks (not supported yet).
    #[serde(default)]
    pub resources: Option<Vec<ResourceSpec>>,
    /// Earliest start, RFC 3339 (not supported yet).
    #[serde(default)]
    pub not_before: Option<String>,
    /// Free-form labels.
    #[serde(default)]
    pub tags: Option<BTreeMap<String, String>>,
}

impl TaskSpec {
    /// A spec with just a kind and a payload.
    pub fn new(kind: impl Into<String>, payload: Value) -> Self {
        Self {
            kind: Some(kind.into()),
            payload,
            ..Self::default()
        }
    }

    /// Sets the id.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets the priority.
    pub fn with_priority(mut self, priority: Priority) -> Self {
        self.priority = Some(priority.as_str().to_owned());
        self
    }

    /// Sets the per-attempt timeout.
    pub fn with_timeout_ms(mut self, ms: u64) -> Self {
        self.timeout_ms = Some(ms);
        self
    }

    /// Sets the number of attempts.
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    /// Sets the backoff.
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = Some(BackoffSpec {
            initial_ms: Some(backoff.initial_ms),
            max_ms: Some(backoff.max_ms),
            multiplier: Some(backoff.multiplier),
        });
        self
    }

    /// Validates every field and fills defaults. `kind` is the kind the task
    /// is submitted under (a subject token, or the in-process caller's);
    /// `None` means the spec's own `kind` field must be present.
    pub fn into_task(self, kind: Option<&str>, defaults: &TaskDefaults) -> Result<Task, ErrorInfo> {
        let kind = match (kind, self.kind.as_deref()) {
            (Some(subject), Some(body)) if subject != body => {
                return Err(ErrorInfo::field(
                    ErrorCode::KindMismatch,
                    "kind",
                    format!(
                        "kind {:?} in the body differs from kind {:?} of the subject",
                        truncate_for_message(body),
                        truncate_for_message(subject)
                    ),
                ));
            }
            (Some(k), _) | (None, Some(k)) => TaskKind::new(k)?,
            (None, None) => {
                return Err(ErrorInfo::field(
                    ErrorCode::InvalidField,
                    "kind",
                    "kind is required",
                ))
            }
        };
        let id = match self.id {
            Some(id) => TaskId::new(id)?,
            None => TaskId::generate(),
        };
        let priority = match self.priority.as_deref() {
            Some(p) => p.parse()?,
            None => defaults.priority,
        };
        let timeout_ms = self.timeout_ms.unwrap_or(defaults.timeout_ms);
        if !(1..=MAX_TIMEOUT_MS).contains(&timeout_ms) {
            return Err(ErrorInfo::field(
                ErrorCode::InvalidField,
                "timeout_ms",
                format!("timeout_ms must be 1 to {MAX_TIMEOUT_MS} (24 h), got {timeout_ms}"),
            ));
        }
        let max_attempts = self.max_attempts.unwrap_or(defaults.max_attempts);
        if !(1..=MAX_ATTEMPTS).contains(&max_attempts) {
            return Err(ErrorInfo::field(
                ErrorCode::InvalidField,
                "max_attempts",
                format!("max_attempts must be 1 to {MAX_ATTEMPTS}, got {max_attempts}"),
            ));
        }
        let backoff = validate_backoff(self.backoff, defaults.backoff)?;
        let tags = self.tags.unwrap_or_default();
        validate_tags(&tags)?;
        if let Some(deps) = &self.depends_on {
            for dep in deps {
                TaskId::new(dep.as_str()).map_err(|e| e.in_field("depends_on"))?;
            }
            if !deps.is_empty() {
                return Err(not_supported_yet("depends_on"));
            }
        }
        if let Some(resources) = &self.resources {
            for r in resources {
                if !is_token(&r.name, MAX_KIND_LEN) {
                    return Err(ErrorInfo::field(
                        ErrorCode::InvalidField,
                        "resources",
                        format!(
                            "resource names must be 1 to {MAX_KIND_LEN} characters of A-Z, a-z, 0-9, `_` or `-`, got {:?}",
                            truncate_for_message(&r.name)
                        ),
                    ));
                }
            }
            if !resources.is_empty() {
                return Err(not_supported_yet("resources"));
            }
        }
        if let Some(nb) = &self.not_before {
            Timestamp::parse(nb).map_err(|_| {
                ErrorInfo::field(
                    ErrorCode::InvalidField,
                    "not_before",
                    format!(
                        "not_before must be an RFC 3339 time such as 2026-11-22T12:00:00.000Z, got {:?}",
                        truncate_for_message(nb)
                    ),
                )
            })?;
            return Err(not_supported_yet("not_before"));
        }
        Ok(Task {
            id,
            kind,
            payload: self.payload,
            priority,
            timeout: Duration::from_millis(timeout_ms),
            max_attempts,
            backoff,
            tags,
            attempt: 1,
            created_at: Timestamp::now(),
        })
    }
}

fn not_supported_yet(field: &str) -> ErrorInfo {
    ErrorInfo::field(
        ErrorCode::InvalidField,
        field,
        format!("{field} is not supported yet by this node; submit the task without it"),
    )
}

fn validate_backoff(spec: Option<BackoffSpec>, defaults: Backoff) -> Result<Backoff, ErrorInfo> {
    let Some(spec) = spec else {
        return Ok(defaults);
    };
    let b = Backoff {
        initial_ms: spec.initial_ms.unwrap_or(defaults.initial_ms),
        max_ms: spec.max_ms.unwrap_or(defaults.max_ms),
        multiplier: spec.multiplier.unwrap_or(defaults.multiplier),
    };
    let bad = |field: &str, msg: String| {
        Err(ErrorInfo::field(
            ErrorCode::InvalidField,
            format!("backoff.{field}"),
            msg,
        ))
    };
    if b.initial_ms > MAX_TIMEOUT_MS {
        return bad(
            "initial_ms",
            format!(
                "backoff.initial_ms must be at most {MAX_TIMEOUT_MS}, got {}",
                b.initial_ms
            ),
        );
    }
    if b.max_ms < b.initial_ms || b.max_ms > MAX_TIMEOUT_MS {
        return bad(
            "max_ms",
            format!(
                "backoff.max_ms must be between initial_ms ({}) and {MAX_TIMEOUT_MS}, got {}",
                b.initial_ms, b.max_ms
            ),
        );
    }
    if !(b.multiplier.is_finite() && (1.0..=100.0).contains(&b.multiplier)) {
        return bad(
            "multiplier",
            format!(
                "backoff.multiplier must be 1.0 to 100.0, got {}",
                b.multiplier
            ),
        );
    }
    Ok(b)
}

fn validate_tags(tags: &BTreeMap<String, String>) -> Result<(), ErrorInfo> {
    if tags.len() > MAX_TAGS {
        return Err(ErrorInfo::field(
            ErrorCode::InvalidField,
            "tags",
            format!("at most {MAX_TAGS} tags, got {}", tags.len()),
        ));
    }
    for (k, v) in tags {
        if k.is_empty() || k.len() > MAX_TAG_KEY_LEN || v.len() > MAX_TAG_VALUE_LEN {
            return Err(ErrorInfo::field(
                ErrorCode::InvalidField,
                "tags",
                format!(
                    "tag keys must be 1 to {MAX_TAG_KEY_LEN} bytes and values at most {MAX_TAG_VALUE_LEN} bytes (key {:?})",
                    truncate_for_message(k)
                ),
            ));
        }
    }
    Ok(())
}

/// The node's defaults for fields a task leaves out.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TaskDefaults {
    /// Default per-attempt timeout (30 000 ms).
    pub timeout_ms: u64,
    /// Default attempts (3).
    pub max_attempts: u32,
    /// Default priority (`normal`).
    pub priority: Priority,
    /// Default backoff (500 ms doubling to 60 s).
    pub backoff: Backoff,
}

impl Default for TaskDefaults {
    fn default() -> Self {
        Self {
            timeout_ms: 30_000,
            max_attempts: 3,
            priority: Priority::Normal,
            backoff: Backoff::default(),
        }
    }
}

/// A validated task, ready to queue.
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    /// Unique id.
    pub id: TaskId,
    /// Names the handler.
    pub kind: TaskKind,
    /// Handed to the handler.
    pub payload: Value,
    /// Queue order.
    pub priority: Priority,
    /// Per-attempt time limit.
    pub timeout: Duration,
    /// Attempts in all.
    pub max_attempts: u32,
    /// Delay between attempts.
    pub backoff: Backoff,
    /// Free-form labels.
    pub tags: BTreeMap<String, String>,
    /// The attempt this delivery starts at (1 unless a transport redelivered it).
    pub attempt: u32,
    /// When the task was first accepted.
    pub created_at: Timestamp,
}

impl Task {
    /// `timeout` in whole milliseconds.
    pub fn timeout_ms(&self) -> u64 {
        self.timeout.as_millis() as u64
    }

    /// The task as a submission with every field filled in: what a durable
    /// transport stores, so that whichever node takes it runs it exactly
    /// as validated here.
    pub fn to_spec(&self) -> TaskSpec {
        TaskSpec {
            id: Some(self.id.as_str().to_owned()),
            kind: Some(self.kind.as_str().to_owned()),
            payload: self.payload.clone(),
            priority: Some(self.priority.as_str().to_owned()),
            timeout_ms: Some(self.timeout_ms()),
            max_attempts: Some(self.max_attempts),
            backoff: Some(BackoffSpec {
                initial_ms: Some(self.backoff.initial_ms),
                max_ms: Some(self.backoff.max_ms),
                multiplier: Some(self.backoff.multiplier),
            }),
            depends_on: None,
            resources: None,
            not_before: None,
            tags: (!self.tags.is_empty()).then(|| self.tags.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: Value) -> TaskSpec {
        serde_json::from_value(v).expect("spec")
    }

    #[test]
    fn a_task_round_trips_through_its_full_spec() {
        let task = spec(json!({"id": "t1", "payload": {"a": 1}, "priority": "high",
            "timeout_ms": 500, "max_attempts": 4, "backoff": {"initial_ms": 10},
            "tags": {"team": "x"}}))
        .into_task(Some("echo"), &TaskDefaults::default())
        .unwrap();
        let again = task
            .to_spec()
            .into_task(Some("echo"), &TaskDefaults::default())
            .unwrap();
        assert_eq!(again.id, task.id);
        assert_eq!(again.priority, Priority::High);
        assert_eq!(again.timeout, task.timeout);
        assert_eq!(again.max_attempts, 4);
        assert_eq!(again.backoff, task.backoff);
        assert_eq!(again.tags, task.tags);
        assert_eq!(again.payload, task.payload);
    }

    fn reject(v: Value) -> ErrorInfo {
        spec(v)
            .into_task(Some("echo"), &TaskDefaults::default())
            .expect_err("should be rejected")
    }

    #[test]
    fn defaults_fill_missing_fields() {
        let t = spec(json!({"payload": {"a": 1}}))
            .into_task(Some("echo"), &TaskDefaults::default())
            .unwrap();
        assert_eq!(t.kind.as_str(), "echo");
        assert_eq!(t.priority, Priority::Normal);
        assert_eq!(t.timeout, Duration::from_millis(30_000));
        assert_eq!(t.max_attempts, 3);
        assert_eq!(t.attempt, 1);
        assert_eq!(t.payload, json!({"a": 1}));
        assert!(uuid::Uuid::parse_str(t.id.as_str()).is_ok());
    }

    #[test]
    fn field_errors_name_the_field() {
        let cases = [
            (
                json!({"priority": "urgent"}),
                "priority",
                ErrorCode::InvalidField,
            ),
            (
                json!({"timeout_ms": 0}),
                "timeout_ms",
                ErrorCode::InvalidField,
            ),
            (
                json!({"timeout_ms": 86_400_001u64}),
                "timeout_ms",
                ErrorCode::InvalidField,
            ),
            (
                json!({"max_attempts": 0}),
                "max_attempts",
                ErrorCode::InvalidField,
            ),
            (
                json!({"max_attempts": 101}),
                "max_attempts",
                ErrorCode::InvalidField,
            ),
            (json!({"id": "a b"}), "id", ErrorCode::InvalidField),
            (
                json!({"id": "x".repeat(129)}),
                "id",
                ErrorCode::InvalidField,
            ),
            (json!({"kind": "other"}), "kind", ErrorCode::KindMismatch),
            (
                json!({"depends_on": ["a"]}),
                "depends_on",
                ErrorCode::InvalidField,
            ),
            (
                json!({"resources": [{"name": "gpu0", "mode": "read"}]}),
                "resources",
                ErrorCode::InvalidField,
            ),
            (
                json!({"not_before": "2026-11-22T12:00:00.000Z"}),
                "not_before",
                ErrorCode::InvalidField,
            ),
            (
                json!({"not_before": "tomorrow"}),
                "not_before",
                ErrorCode::InvalidField,
            ),
            (
                json!({"backoff": {"multiplier": 0.5}}),
                "backoff.multiplier",
                ErrorCode::InvalidField,
            ),
            (
                json!({"backoff": {"initial_ms": 10, "max_ms": 5}}),
                "backoff.max_ms",
                ErrorCode::InvalidField,
            ),
        ];
        for (input, field, code) in cases {
            let err = reject(input.clone());
            assert_eq!(err.field.as_deref(), Some(field), "{input}: {err:?}");
            assert_eq!(err.code, code, "{input}: {err:?}");
        }
    }

    #[test]
    fn not_supported_fields_say_so() {
        let err = reject(json!({"depends_on": ["a"]}));
        assert!(err.message.contains("not supported yet"), "{}", err.message);
        // Empty lists ask for nothing and are fine.
        spec(json!({"depends_on": [], "resources": []}))
            .into_task(Some("echo"), &TaskDefaults::default())
            .unwrap();
    }

    #[test]
    fn ids_and_kinds_are_tokens() {
        assert!(TaskId::new("abc-DEF_123").is_ok());
        assert!(TaskId::new("").is_err());
        assert!(TaskId::new("a.b").is_err());
        assert!(TaskId::new("é").is_err());
        assert!(TaskKind::new("k".repeat(64)).is_ok());
        assert!(TaskKind::new("k".repeat(65)).is_err());
    }

    #[test]
    fn backoff_grows_and_caps() {
        let b = Backoff {
            initial_ms: 100,
            max_ms: 1000,
            multiplier: 2.0,
        };
        assert_eq!(b.base_delay(1), Duration::from_millis(100));
        assert_eq!(b.base_delay(2), Duration::from_millis(200));
        assert_eq!(b.base_delay(3), Duration::from_millis(400));
        assert_eq!(b.base_delay(10), Duration::from_millis(1000));
        let d = b.delay(2);
        assert!(d <= Duration::from_millis(200) && d >= Duration::from_millis(180));
    }

    #[test]
    fn priorities_order_most_urgent_first() {
        let mut ps = vec![
            Priority::Low,
            Priority::Critical,
            Priority::Normal,
            Priority::High,
        ];
        ps.sort();
        assert_eq!(ps, Priority::ALL.to_vec());
        assert_eq!(Priority::parse("high"), Some(Priority::High));
        assert_eq!(Priority::parse("HIGH"), None);
    }
}
