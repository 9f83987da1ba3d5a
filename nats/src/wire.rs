//! Reply bodies of protocol v1: `{"ok": true, …}` or `{"ok": false,
//! "error": {…}}`.

use bytes::Bytes;
use dispatcher_actors::{DispatchError, ErrorInfo, Submitted};
use serde_json::{json, Value};

/// `{"ok": true, "id", "kind", "priority"}`
pub fn submitted(s: &Submitted) -> Value {
    json!({"ok": true, "id": s.id, "kind": s.kind, "priority": s.priority})
}

/// `{"ok": false, "error": {…}}`
pub fn error(info: &ErrorInfo) -> Value {
    json!({"ok": false, "error": info})
}

/// The reply to one submission.
pub fn submit_result(r: &Result<Submitted, DispatchError>) -> Value {
    match r {
        Ok(s) => submitted(s),
        Err(e) => error(&e.to_info()),
    }
}

/// `{"ok": true, "results": [...]}`
pub fn batch(results: Vec<Value>) -> Value {
    json!({"ok": true, "results": results})
}

/// A reply as bytes.
pub fn body(v: &Value) -> Bytes {
    Bytes::from(v.to_string())
}
