//! Request bodies as record operations: the bytes a client sends to the HTTP API for a replace,
//! a merge patch or an increment, turned into an [`Operation`] or an error that names the
//! problem. Pure, so the node's API and the fuzzer run the very same parsing.

use serde_json::{Map, Value};

use crate::record::Operation;

/// Which write a body is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// `PUT`: the body is the whole object.
    Replace,
    /// `PATCH`: the body is an RFC 7386 merge patch.
    MergePatch,
    /// `POST .../increment`: the body is `{"field": "name", "by": n}`; `by` defaults to 1.
    Increment,
}

/// Why a body is not an operation. Every variant is the client's mistake (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("malformed JSON: {0}")]
    Malformed(String),
    #[error("body must be a JSON object, not {0}")]
    NotAnObject(&'static str),
    #[error("body needs \"field\": a string")]
    Field,
    #[error("\"by\" must be an integer in the i64 range")]
    By,
}

/// Parses `bytes` as the body of a `kind` write.
pub fn operation(kind: BodyKind, bytes: &[u8]) -> Result<Operation, BodyError> {
    let body = object(bytes)?;
    match kind {
        BodyKind::Replace => Ok(Operation::Replace(body)),
        BodyKind::MergePatch => Ok(Operation::MergePatch(body)),
        BodyKind::Increment => increment(&body),
    }
}

/// Parses `bytes` as a JSON object.
pub fn object(bytes: &[u8]) -> Result<Map<String, Value>, BodyError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(BodyError::NotAnObject(kind_of(&other))),
        Err(error) => Err(BodyError::Malformed(error.to_string())),
    }
}

/// The increment an object asks for: `field` must be a string, `by` an integer in the i64 range
/// (1 when absent). Other members are ignored.
pub fn increment(body: &Map<String, Value>) -> Result<Operation, BodyError> {
    let field = match body.get("field") {
        Some(Value::String(field)) => field.clone(),
        _ => return Err(BodyError::Field),
    };
    let by = match body.get("by") {
        None => 1,
        Some(value) => value.as_i64().ok_or(BodyError::By)?,
    };
    Ok(Operation::Increment { field, by })
}

/// A JSON value's kind, as error messages name it.
pub fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_become_operations_or_name_the_problem() {
        let increment = operation(BodyKind::Increment, br#"{"field":"n","by":-3}"#);
        assert_eq!(increment, Ok(Operation::Increment { field: "n".into(), by: -3 }));
        let default = operation(BodyKind::Increment, br#"{"field":"n"}"#);
        assert_eq!(default, Ok(Operation::Increment { field: "n".into(), by: 1 }));
        assert_eq!(operation(BodyKind::Increment, br#"{"field":1}"#), Err(BodyError::Field));
        assert_eq!(operation(BodyKind::Increment, br#"{"field":"n","by":1.5}"#), Err(BodyError::By));
        assert_eq!(operation(BodyKind::Increment, br#"{"field":"n","by":9223372036854775808}"#), Err(BodyError::By));
        assert_eq!(operation(BodyKind::Replace, b"[1]"), Err(BodyError::NotAnObject("an array")));
        assert!(matches!(operation(BodyKind::MergePatch, b"{"), Err(BodyError::Malformed(_))));
        let patch = operation(BodyKind::MergePatch, br#"{"a":null}"#);
        assert!(matches!(patch, Ok(Operation::MergePatch(map)) if map.get("a") == Some(&Value::Null)));
    }
}
