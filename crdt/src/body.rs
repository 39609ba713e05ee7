//! Request bodies as record operations: the bytes a client sends to the HTTP API for a replace,
//! a merge patch or an increment, turned into an [`Operation`] or an error that names the
//! problem. Pure, so the node's API and the fuzzer run the very same parsing.

use serde_json::{Map, Value};

use crate::key::{KeyError, RecordKey};
use crate::record::Operation;

/// The most writes one batch (`POST /v1/batch`) may carry.
pub const BATCH_WRITES_MAX: usize = 1000;

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
    #[error("a batch must be a JSON array of writes, not {0}")]
    NotABatch(&'static str),
    #[error("a batch holds {0} writes; the limit is {BATCH_WRITES_MAX}")]
    BatchTooLarge(usize),
    #[error("write {index} of the batch: {reason}")]
    BatchWrite { index: usize, reason: String },
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

/// Parses a batch of writes: a JSON array of at most [`BATCH_WRITES_MAX`] objects, each
/// `{"op": "put"|"patch"|"delete"|"increment", "collection": ..., "id": ...}` plus `"value"`
/// (an object) for put and patch, or `"field"` and optionally `"by"` for increment. The whole
/// batch is refused, naming the first bad write, if any write is malformed.
pub fn batch(bytes: &[u8]) -> Result<Vec<(RecordKey, Operation)>, BodyError> {
    let writes = match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Array(writes)) => writes,
        Ok(other) => return Err(BodyError::NotABatch(kind_of(&other))),
        Err(error) => return Err(BodyError::Malformed(error.to_string())),
    };
    if writes.len() > BATCH_WRITES_MAX {
        return Err(BodyError::BatchTooLarge(writes.len()));
    }
    writes
        .into_iter()
        .enumerate()
        .map(|(index, write)| batch_write(write).map_err(|reason| BodyError::BatchWrite { index, reason }))
        .collect()
}

fn batch_write(write: Value) -> Result<(RecordKey, Operation), String> {
    let Value::Object(mut write) = write else { return Err(format!("must be an object, not {}", kind_of(&write))) };
    let text = |write: &Map<String, Value>, name: &str| match write.get(name) {
        Some(Value::String(text)) => Ok(text.clone()),
        _ => Err(format!("needs \"{name}\": a string")),
    };
    let key = RecordKey::new(&text(&write, "collection")?, &text(&write, "id")?)
        .map_err(|error: KeyError| error.to_string())?;
    let value = |write: &mut Map<String, Value>| match write.remove("value") {
        Some(Value::Object(value)) => Ok(value),
        Some(other) => Err(format!("\"value\" must be an object, not {}", kind_of(&other))),
        None => Err("needs \"value\": an object".to_owned()),
    };
    let operation = match text(&write, "op")?.as_str() {
        "put" => Operation::Replace(value(&mut write)?),
        "patch" => Operation::MergePatch(value(&mut write)?),
        "delete" => Operation::Delete,
        "increment" => increment(&write).map_err(|error| error.to_string())?,
        other => return Err(format!("unknown \"op\" {other:?}: use put, patch, delete or increment")),
    };
    Ok((key, operation))
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

    #[test]
    fn batches_become_writes_or_name_the_bad_one() {
        let writes = batch(
            br#"[{"op":"put","collection":"c","id":"1","value":{"a":1}},
                 {"op":"patch","collection":"c","id":"1","value":{"a":null}},
                 {"op":"increment","collection":"c","id":"2","field":"n","by":2},
                 {"op":"delete","collection":"c","id":"3"}]"#,
        )
        .expect("a valid batch");
        let operations: Vec<&Operation> = writes.iter().map(|(_, operation)| operation).collect();
        assert!(matches!(operations[0], Operation::Replace(value) if value["a"] == 1));
        assert!(matches!(operations[1], Operation::MergePatch(value) if value["a"].is_null()));
        assert_eq!(operations[2], &Operation::Increment { field: "n".into(), by: 2 });
        assert_eq!(operations[3], &Operation::Delete);
        assert_eq!(writes[3].0.to_string(), RecordKey::new("c", "3").unwrap().to_string());

        assert_eq!(batch(b"{}"), Err(BodyError::NotABatch("an object")));
        let refused =
            batch(br#"[{"op":"put","collection":"c","id":"1","value":{}}, {"op":"put","collection":"c","id":"1"}]"#);
        assert!(matches!(refused, Err(BodyError::BatchWrite { index: 1, .. })), "{refused:?}");
        let refused = batch(br#"[{"op":"rename","collection":"c","id":"1"}]"#);
        assert!(matches!(refused, Err(BodyError::BatchWrite { index: 0, reason }) if reason.contains("unknown")));
        let refused = batch(br#"[{"op":"delete","collection":"","id":"1"}]"#);
        assert!(matches!(refused, Err(BodyError::BatchWrite { index: 0, .. })));
        let too_many =
            format!("[{}]", vec![r#"{"op":"delete","collection":"c","id":"1"}"#; BATCH_WRITES_MAX + 1].join(","));
        assert_eq!(batch(too_many.as_bytes()), Err(BodyError::BatchTooLarge(BATCH_WRITES_MAX + 1)));
        let most = format!("[{}]", vec![r#"{"op":"delete","collection":"c","id":"1"}"#; BATCH_WRITES_MAX].join(","));
        assert_eq!(batch(most.as_bytes()).map(|writes| writes.len()), Ok(BATCH_WRITES_MAX));
    }
}
