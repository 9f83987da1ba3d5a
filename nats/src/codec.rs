//! The wire format of submissions: [`Codec::Json`] (the default) or
//! [`Codec::Bincode`], picked from the `Content-Type` header, and the
//! checks every body passes before it is read as a task — size, UTF-8,
//! nesting depth — each failing with the protocol's error code.
//!
//! Decoding is bounded whatever the body claims: a JSON body (and the
//! JSON payload inside a bincode body) is measured for depth before it is
//! parsed, and bincode runs with a limit on what it may allocate, so a
//! length prefix of 2^62 is an error, not an allocation.

use dispatcher_actors::{ErrorCode, ErrorInfo, TaskSpec};
use serde::{Deserialize, Serialize};

use crate::subjects::{CONTENT_TYPE_BINCODE, CONTENT_TYPE_JSON};

/// Limits on a body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest body, in bytes (default 1 MiB).
    pub max_payload: usize,
    /// Deepest JSON nesting (default 64).
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload: 1024 * 1024,
            max_depth: 64,
        }
    }
}

/// Why a body could not be read as a task.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The `Content-Type` is neither JSON nor bincode.
    #[error("unsupported content type `{0}`; use application/json or application/x-bincode")]
    UnsupportedContentType(String),
    /// The body is over the size limit.
    #[error("body is {size} bytes; the limit is {limit}")]
    TooLarge {
        /// The body's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The body is not UTF-8.
    #[error("body is not valid UTF-8")]
    NotUtf8,
    /// The body nests deeper than the limit.
    #[error("JSON nested deeper than {0} levels")]
    TooDeep(usize),
    /// Not JSON at all.
    #[error("invalid JSON: {0}")]
    Json(serde_json::Error),
    /// JSON, but not an object or an array of objects.
    #[error("the body must be a JSON object (one task) or an array (a batch), got {0}")]
    NotAnObject(&'static str),
    /// A field has the wrong type.
    #[error("{field}: {message}")]
    Field {
        /// The field's path.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// Not a bincode task.
    #[error("invalid bincode body: {0}")]
    Bincode(String),
}

impl CodecError {
    /// The protocol's error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            CodecError::UnsupportedContentType(_) => ErrorCode::UnsupportedContentType,
            CodecError::TooLarge { .. } => ErrorCode::PayloadTooLarge,
            CodecError::NotUtf8
            | CodecError::TooDeep(_)
            | CodecError::Json(_)
            | CodecError::NotAnObject(_)
            | CodecError::Bincode(_) => ErrorCode::InvalidJson,
            CodecError::Field { .. } => ErrorCode::InvalidField,
        }
    }

    /// The wire `error` object.
    pub fn to_info(&self) -> ErrorInfo {
        match self {
            CodecError::Field { field, .. } => {
                ErrorInfo::field(self.code(), field.clone(), self.to_string())
            }
            other => ErrorInfo::new(other.code(), other.to_string()),
        }
    }
}

/// A decoded submission: one task, or a batch whose elements are decoded
/// one by one (a bad element fails alone).
#[derive(Debug)]
pub enum Decoded {
    /// An object body.
    One(Box<TaskSpec>),
    /// An array body.
    Batch(Vec<Result<TaskSpec, CodecError>>),
}

/// The body formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// UTF-8 JSON (no `Content-Type`, or `application/json`).
    Json,
    /// bincode v2, standard configuration, of [`BincodeTask`].
    Bincode,
}

impl Codec {
    /// Picks the codec from a `Content-Type` header value (parameters such
    /// as `; charset=utf-8` are ignored).
    pub fn from_content_type(value: Option<&str>) -> Result<Self, CodecError> {
        let Some(value) = value else {
            return Ok(Codec::Json);
        };
        let mime = value.split(';').next().unwrap_or("").trim();
        match mime.to_ascii_lowercase().as_str() {
            "" | CONTENT_TYPE_JSON => Ok(Codec::Json),
            CONTENT_TYPE_BINCODE => Ok(Codec::Bincode),
            _ => Err(CodecError::UnsupportedContentType(value.to_owned())),
        }
    }

    /// Checks and decodes a submission body.
    pub fn decode(self, body: &[u8], limits: &Limits) -> Result<Decoded, CodecError> {
        if body.len() > limits.max_payload {
            return Err(CodecError::TooLarge {
                size: body.len(),
                limit: limits.max_payload,
            });
        }
        match self {
            Codec::Json => decode_json(body, limits),
            Codec::Bincode => {
                let (task, read): (BincodeTask, usize) =
                    bincode::serde::decode_from_slice(body, bincode_config())
                        .map_err(|e| CodecError::Bincode(e.to_string()))?;
                if read != body.len() {
                    return Err(CodecError::Bincode(format!(
                        "{} bytes follow the task",
                        body.len() - read
                    )));
                }
                task.into_spec(limits).map(|s| Decoded::One(Box::new(s)))
            }
        }
    }
}

/// Most bytes a bincode body may make the decoder claim for its strings
/// and lists. Every byte of a real string comes from the body, which is at
/// most `max_payload`, and a tag costs 48 bytes of claim for at least 2 of
/// body; 64 MiB covers any body up to 1 MiB with room to spare and bounds
/// what a forged length prefix can allocate. A node with a larger
/// `--max-payload` gets a larger claim ceiling only through this constant.
pub const BINCODE_CLAIM_LIMIT: usize = 64 * 1024 * 1024;

/// bincode's standard configuration with [`BINCODE_CLAIM_LIMIT`].
fn bincode_config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<BINCODE_CLAIM_LIMIT>,
> {
    bincode::config::standard().with_limit::<BINCODE_CLAIM_LIMIT>()
}

/// Checks that JSON text nests no deeper than `max_depth`.
pub fn check_depth(text: &str, max_depth: usize) -> Result<(), CodecError> {
    if nesting_depth(text) > max_depth {
        return Err(CodecError::TooDeep(max_depth));
    }
    Ok(())
}

fn decode_json(body: &[u8], limits: &Limits) -> Result<Decoded, CodecError> {
    let text = std::str::from_utf8(body).map_err(|_| CodecError::NotUtf8)?;
    check_depth(text, limits.max_depth)?;
    if text.trim_start().starts_with('{') {
        // One task, the common case: read straight into the spec. Any
        // error is found again below, on the way through a JSON value, so
        // that bad input gets the same answer either way (a syntax error
        // after a wrongly typed field is still `invalid_json`).
        let mut de = serde_json::Deserializer::from_str(text);
        if let Ok(spec) = TaskSpec::deserialize(&mut de) {
            if de.end().is_ok() {
                return Ok(Decoded::One(Box::new(spec)));
            }
        }
    }
    let value: serde_json::Value = serde_json::from_str(text).map_err(CodecError::Json)?;
    match value {
        serde_json::Value::Object(_) => spec_from_value(value).map(|s| Decoded::One(Box::new(s))),
        serde_json::Value::Array(items) => Ok(Decoded::Batch(
            items
                .into_iter()
                .map(|item| match item {
                    serde_json::Value::Object(_) => spec_from_value(item),
                    other => Err(CodecError::NotAnObject(json_type(&other))),
                })
                .collect(),
        )),
        other => Err(CodecError::NotAnObject(json_type(&other))),
    }
}

fn spec_from_value(value: serde_json::Value) -> Result<TaskSpec, CodecError> {
    serde_path_to_error::deserialize(value).map_err(|e| CodecError::Field {
        field: e.path().to_string(),
        message: e.inner().to_string(),
    })
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The deepest nesting of `[` and `{` in JSON text (strings skipped).
fn nesting_depth(text: &str) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in text.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// The bincode form of a task: the JSON form's fields, with the payload as
/// the bytes of its JSON text (bincode cannot carry a schemaless value) and
/// `backoff` flattened into three options.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BincodeTask {
    /// Client-given id.
    pub id: Option<String>,
    /// Kind; must equal the subject's.
    pub kind: Option<String>,
    /// The payload's JSON text (empty means `null`).
    pub payload: Vec<u8>,
    /// Priority name.
    pub priority: Option<String>,
    /// Per-attempt timeout.
    pub timeout_ms: Option<u64>,
    /// Attempts in all.
    pub max_attempts: Option<u32>,
    /// Backoff: first delay.
    pub backoff_initial_ms: Option<u64>,
    /// Backoff: largest delay.
    pub backoff_max_ms: Option<u64>,
    /// Backoff: growth.
    pub backoff_multiplier: Option<f64>,
    /// Free-form labels.
    pub tags: Option<Vec<(String, String)>>,
}

impl BincodeTask {
    /// The bincode form of `spec`.
    pub fn from_spec(spec: &TaskSpec) -> Self {
        let backoff = spec.backoff.clone().unwrap_or_default();
        Self {
            id: spec.id.clone(),
            kind: spec.kind.clone(),
            payload: serde_json::to_vec(&spec.payload).unwrap_or_default(),
            priority: spec.priority.clone(),
            timeout_ms: spec.timeout_ms,
            max_attempts: spec.max_attempts,
            backoff_initial_ms: backoff.initial_ms,
            backoff_max_ms: backoff.max_ms,
            backoff_multiplier: backoff.multiplier,
            tags: spec
                .tags
                .as_ref()
                .map(|t| t.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
        }
    }

    /// The id of a bincode body that is not a valid task otherwise, if
    /// its fields can be read at all (decoded with the same bounds).
    pub fn read_id(body: &[u8]) -> Option<String> {
        let (task, _): (BincodeTask, usize) =
            bincode::serde::decode_from_slice(body, bincode_config()).ok()?;
        task.id
    }

    /// Encodes it.
    pub fn encode(&self) -> Vec<u8> {
        bincode::serde::encode_to_vec(self, bincode::config::standard())
            .expect("encoding plain structs into a Vec cannot fail")
    }

    fn into_spec(self, limits: &Limits) -> Result<TaskSpec, CodecError> {
        let payload = if self.payload.is_empty() {
            serde_json::Value::Null
        } else {
            let text = std::str::from_utf8(&self.payload).map_err(|_| CodecError::Field {
                field: "payload".into(),
                message: "payload bytes are not UTF-8 JSON text".into(),
            })?;
            // The payload sits one level inside the task, as in a JSON body.
            check_depth(text, limits.max_depth.saturating_sub(1))?;
            serde_json::from_str(text).map_err(|e| CodecError::Field {
                field: "payload".into(),
                message: format!("payload bytes are not JSON text: {e}"),
            })?
        };
        let backoff = (self.backoff_initial_ms.is_some()
            || self.backoff_max_ms.is_some()
            || self.backoff_multiplier.is_some())
        .then_some(dispatcher_actors::BackoffSpec {
            initial_ms: self.backoff_initial_ms,
            max_ms: self.backoff_max_ms,
            multiplier: self.backoff_multiplier,
        });
        Ok(TaskSpec {
            id: self.id,
            kind: self.kind,
            payload,
            priority: self.priority,
            timeout_ms: self.timeout_ms,
            max_attempts: self.max_attempts,
            backoff,
            tags: self.tags.map(|t| t.into_iter().collect()),
            ..TaskSpec::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decode(body: &[u8]) -> Result<Decoded, CodecError> {
        Codec::Json.decode(body, &Limits::default())
    }

    fn one(body: &[u8]) -> TaskSpec {
        match decode(body).unwrap() {
            Decoded::One(s) => *s,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reads_an_object_and_a_batch() {
        let s = one(br#"{"id":"a","payload":{"x":1},"priority":"high"}"#);
        assert_eq!(s.id.as_deref(), Some("a"));
        assert_eq!(s.payload, json!({"x": 1}));
        match decode(br#"[{"id":"a"}, 5, {"priority": 5}]"#).unwrap() {
            Decoded::Batch(items) => {
                assert!(items[0].is_ok());
                assert_eq!(
                    items[1].as_ref().unwrap_err().code(),
                    ErrorCode::InvalidJson
                );
                assert_eq!(
                    items[2].as_ref().unwrap_err().code(),
                    ErrorCode::InvalidField
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_duplicate_field_takes_its_last_value() {
        let s = one(br#"{"id": "first", "payload": 1, "id": "last"}"#);
        assert_eq!(s.id.as_deref(), Some("last"));
        assert_eq!(s.payload, json!(1));
    }

    #[test]
    fn every_bad_body_gets_its_code() {
        let cases: Vec<(&[u8], ErrorCode, Option<&str>)> = vec![
            (b"{not json", ErrorCode::InvalidJson, None),
            (b"42", ErrorCode::InvalidJson, None),
            (br#""x""#, ErrorCode::InvalidJson, None),
            (
                br#"{"priority": 5}"#,
                ErrorCode::InvalidField,
                Some("priority"),
            ),
            (
                br#"{"timeout_ms": "x"}"#,
                ErrorCode::InvalidField,
                Some("timeout_ms"),
            ),
            (
                br#"{"backoff": {"multiplier": "x"}}"#,
                ErrorCode::InvalidField,
                Some("backoff.multiplier"),
            ),
            (b"{\"id\": \"\xff\"}", ErrorCode::InvalidJson, None),
            // A syntax error after a wrongly typed field: the syntax wins.
            (br#"{"priority": 5, oops"#, ErrorCode::InvalidJson, None),
            (br#"{"id": "a"} trailing"#, ErrorCode::InvalidJson, None),
        ];
        for (body, code, field) in cases {
            let err = decode(body).unwrap_err();
            assert_eq!(err.code(), code, "{}", String::from_utf8_lossy(body));
            assert_eq!(err.to_info().field.as_deref(), field, "{err}");
        }
    }

    #[test]
    fn size_and_depth_are_bounded() {
        let limits = Limits {
            max_payload: 10,
            max_depth: 3,
        };
        let err = Codec::Json.decode(&[b' '; 11], &limits).unwrap_err();
        assert_eq!(err.code(), ErrorCode::PayloadTooLarge);
        let deep = br#"{"payload": [[[1]]]}"#;
        let limits = Limits {
            max_payload: 1000,
            max_depth: 3,
        };
        assert_eq!(
            Codec::Json.decode(deep, &limits).unwrap_err().code(),
            ErrorCode::InvalidJson
        );
        // Brackets inside strings do not count.
        assert!(Codec::Json
            .decode(br#"{"payload": "[[[[[[\"]]"}"#, &limits)
            .is_ok());
    }

    #[test]
    fn content_types_pick_the_codec() {
        assert_eq!(Codec::from_content_type(None).unwrap(), Codec::Json);
        assert_eq!(
            Codec::from_content_type(Some("application/json; charset=utf-8")).unwrap(),
            Codec::Json
        );
        assert_eq!(
            Codec::from_content_type(Some("application/x-bincode")).unwrap(),
            Codec::Bincode
        );
        let err = Codec::from_content_type(Some("text/xml")).unwrap_err();
        assert_eq!(err.code(), ErrorCode::UnsupportedContentType);
    }

    #[test]
    fn bincode_round_trips_a_task() {
        let spec = TaskSpec::new("echo", json!({"deep": [1, {"a": null}]}))
            .with_id("b1")
            .with_timeout_ms(5)
            .with_backoff(dispatcher_actors::Backoff {
                initial_ms: 1,
                max_ms: 2,
                multiplier: 1.5,
            });
        let bytes = BincodeTask::from_spec(&spec).encode();
        match Codec::Bincode.decode(&bytes, &Limits::default()).unwrap() {
            Decoded::One(back) => assert_eq!(*back, spec),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            Codec::Bincode
                .decode(b"\xff\xff", &Limits::default())
                .unwrap_err()
                .code(),
            ErrorCode::InvalidJson
        );
    }

    /// A bincode body whose first string claims 2^62 bytes: an error, not
    /// an allocation that aborts the process.
    #[test]
    fn a_huge_bincode_length_prefix_is_an_error() {
        let mut body = vec![0x01, 0xfd];
        body.extend_from_slice(&(1u64 << 62).to_le_bytes());
        body.extend_from_slice(b"abc");
        let err = Codec::Bincode
            .decode(&body, &Limits::default())
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidJson);
        // Same for a list (the tags) that claims 2^40 entries.
        let task = BincodeTask {
            tags: Some(vec![]),
            ..BincodeTask::default()
        };
        let mut bytes = task.encode();
        let len = bytes.len();
        bytes.truncate(len - 1);
        bytes.push(0xfd);
        bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let err = Codec::Bincode
            .decode(&bytes, &Limits::default())
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidJson);
    }

    #[test]
    fn a_bincode_payload_is_held_to_the_depth_limit() {
        let limits = Limits {
            max_payload: 1 << 20,
            max_depth: 4,
        };
        let deep = |n: usize| BincodeTask {
            payload: format!("{}{}", "[".repeat(n), "]".repeat(n)).into_bytes(),
            ..BincodeTask::default()
        };
        // As JSON the task would be 1 + n deep.
        assert!(Codec::Bincode.decode(&deep(3).encode(), &limits).is_ok());
        let err = Codec::Bincode
            .decode(&deep(4).encode(), &limits)
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidJson);
        assert!(err.to_string().contains("deeper"), "{err}");
        let err = Codec::Bincode
            .decode(&deep(100).encode(), &Limits::default())
            .unwrap_err();
        assert!(err.to_string().contains("deeper"), "{err}");
    }

    #[test]
    fn bytes_after_a_bincode_task_are_refused() {
        let mut bytes = BincodeTask::default().encode();
        bytes.push(0);
        let err = Codec::Bincode
            .decode(&bytes, &Limits::default())
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidJson);
    }

    /// Found by the fuzz target `codec_json`: without serde_json's
    /// `float_roundtrip`, a long float was read to a value whose JSON
    /// text read back as another (the stored payload differed from the
    /// one submitted).
    #[test]
    fn a_float_reads_back_the_same_once_written() {
        let body = br#"{"payload": [-92233584467440737095516720368547758446744073709551615, 0.1]}"#;
        let first = one(body);
        let again = one(&serde_json::to_vec(&first).unwrap());
        assert_eq!(again, first);
    }

    #[test]
    fn json_round_trips_a_task() {
        let spec = TaskSpec::new("echo", json!([1, 2]))
            .with_id("j1")
            .with_max_attempts(2);
        let text = serde_json::to_vec(&spec).unwrap();
        assert_eq!(one(&text), spec);
    }
}
