//! The mapping between JSON values and automerge values, both ways.
//!
//! | JSON                          | automerge                | back to JSON                  |
//! |-------------------------------|--------------------------|-------------------------------|
//! | object                        | map                      | object (keys sorted)          |
//! | array                         | list                     | array                         |
//! | string                        | string scalar            | string                        |
//! | `true` / `false`              | boolean                  | boolean                       |
//! | `null`                        | null                     | null                          |
//! | integer in the i64 range      | int                      | the same integer              |
//! | integer above `i64::MAX`      | uint                     | the same integer              |
//! | any other number              | f64                      | the same number (`1.0` stays `1.0`) |
//! | (not written from JSON)       | counter                  | its current integer value     |
//! | (not written from JSON)       | timestamp                | integer milliseconds          |
//! | (not written from JSON)       | bytes                    | array of byte values          |
//! | (not written from JSON)       | text object              | string                        |
//! | (not written from JSON)       | unknown scalar, NaN/inf  | null                          |
//!
//! So any JSON value round-trips exactly (a property test checks it). Writes are diffs: a value
//! equal to what is stored produces no operation, nested objects and arrays are updated in place
//! rather than replaced (so concurrent edits inside them merge), and an integer written over a
//! counter becomes an increment by the difference (so concurrent increments still add up).

use std::borrow::Cow;

use automerge::{AutomergeError, ObjId, ObjType, Prop, ReadDoc, ScalarValue, transaction::Transactable};
use serde_json::{Map, Number, Value};

/// How deeply JSON values may nest. Deeper input is refused before it reaches the document, and
/// documents from a peer or the disk that are deeper fail to read rather than overflow the stack.
pub const DEPTH_MAX: usize = 64;

/// Why a value could not be read or written. On a write error the caller discards the
/// transaction, so the document is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error("value nests deeper than {DEPTH_MAX} levels")]
    TooDeep,
    #[error("counter would leave ±2^53: {current} + {by}")]
    CounterOverflow { current: i64, by: i64 },
    #[error("document error: {0}")]
    Document(#[from] AutomergeError),
}

/// The largest counter value, and increment, in magnitude: 2^53, what JSON numbers and
/// JavaScript clients hold exactly. With every replica inside it, even 1,024 replicas
/// incrementing concurrently cannot push the merged sum past i64.
pub const COUNTER_MAGNITUDE_MAX: i64 = 1 << 53;

/// Whether `current + by` stays within [`COUNTER_MAGNITUDE_MAX`] (and `by` does too).
pub fn check_counter(current: i64, by: i64) -> Result<(), JsonError> {
    let within = |value: i64| value.checked_abs().is_some_and(|magnitude| magnitude <= COUNTER_MAGNITUDE_MAX);
    match current.checked_add(by) {
        Some(total) if within(by) && within(total) => Ok(()),
        _ => Err(JsonError::CounterOverflow { current, by }),
    }
}

/// A field whose concurrent writes have not been superseded: every value, the winner included.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Conflict {
    /// JSON Pointer (RFC 6901) to the field, such as `/address/city`.
    pub field: String,
    /// Every concurrent value; `value` on the record shows the deterministic winner.
    pub values: Vec<Value>,
}

/// Checks that `value` nests at most [`DEPTH_MAX`] levels, without recursion.
pub fn check_depth(value: &Value) -> Result<(), JsonError> {
    check_and_count(value).map(|_| ())
}

/// Checks that `value` nests at most [`DEPTH_MAX`] levels, without recursion, and counts its
/// values other than `null`: objects, arrays and scalars. Writing a value takes at least one
/// automerge operation for each of them that ends up stored, so the count is a floor on what a
/// record holding `value` holds.
pub fn check_and_count(value: &Value) -> Result<u64, JsonError> {
    let mut pending = vec![(value, 1usize)];
    let mut values = 0u64;
    while let Some((value, depth)) = pending.pop() {
        if depth > DEPTH_MAX {
            return Err(JsonError::TooDeep);
        }
        if !value.is_null() {
            values += 1;
        }
        match value {
            Value::Array(items) => pending.extend(items.iter().map(|item| (item, depth + 1))),
            Value::Object(map) => pending.extend(map.values().map(|item| (item, depth + 1))),
            _ => {}
        }
    }
    Ok(values)
}

/// The automerge scalar for a JSON scalar; `None` for objects and arrays.
pub fn scalar_from_json(value: &Value) -> Option<ScalarValue> {
    Some(match value {
        Value::Null => ScalarValue::Null,
        Value::Bool(flag) => ScalarValue::Boolean(*flag),
        Value::String(text) => ScalarValue::Str(text.as_str().into()),
        Value::Number(number) => number_to_scalar(number),
        Value::Array(_) | Value::Object(_) => return None,
    })
}

fn number_to_scalar(number: &Number) -> ScalarValue {
    if let Some(integer) = number.as_i64() {
        ScalarValue::Int(integer)
    } else if let Some(integer) = number.as_u64() {
        ScalarValue::Uint(integer)
    } else {
        // serde_json only produces finite floats, so this always has a value.
        ScalarValue::F64(number.as_f64().unwrap_or(0.0))
    }
}

/// `value` as automerge's hydrate value, for writing a whole tree in one batch of ops: objects
/// as maps, arrays as lists, and the rest as [`scalar_from_json`] makes them.
pub fn hydrate(value: &Value) -> automerge::hydrate::Value {
    use automerge::hydrate;
    match value {
        Value::Object(members) => hydrate::Value::Map(hydrate::Map::from(
            members
                .iter()
                .map(|(key, member)| (key.clone(), hydrate(member)))
                .collect::<std::collections::HashMap<_, _>>(),
        )),
        Value::Array(items) => hydrate::Value::List(hydrate::List::from(items.iter().map(hydrate).collect::<Vec<_>>())),
        scalar => hydrate::Value::Scalar(scalar_from_json(scalar).unwrap_or(ScalarValue::Null)),
    }
}

/// The JSON value for an automerge scalar.
pub fn scalar_to_json(scalar: &ScalarValue) -> Value {
    match scalar {
        ScalarValue::Null | ScalarValue::Unknown { .. } => Value::Null,
        ScalarValue::Boolean(flag) => Value::Bool(*flag),
        ScalarValue::Str(text) => Value::String(text.to_string()),
        ScalarValue::Int(integer) | ScalarValue::Timestamp(integer) => Value::from(*integer),
        ScalarValue::Uint(integer) => Value::from(*integer),
        ScalarValue::Counter(counter) => Value::from(i64::from(counter)),
        ScalarValue::F64(float) => Number::from_f64(*float).map_or(Value::Null, Value::Number),
        ScalarValue::Bytes(bytes) => Value::Array(bytes.iter().map(|&byte| Value::from(byte)).collect()),
    }
}

/// Reads the JSON value stored in `slot` of object `object`, collecting conflicts beneath `path`.
pub fn read_value<D: ReadDoc>(
    document: &D,
    value: &automerge::Value<'_>,
    id: &ObjId,
    path: &str,
    depth: usize,
    conflicts: &mut Vec<Conflict>,
) -> Result<Value, JsonError> {
    if depth > DEPTH_MAX {
        return Err(JsonError::TooDeep);
    }
    Ok(match value {
        automerge::Value::Scalar(scalar) => scalar_to_json(scalar),
        automerge::Value::Object(ObjType::Map | ObjType::Table) => {
            let mut map = Map::new();
            for key in document.keys(id) {
                let child_path = format!("{path}/{}", escape_pointer(&key));
                if let Some(child) = read_slot(document, id, key.as_str().into(), &child_path, depth, conflicts)? {
                    map.insert(key, child);
                }
            }
            Value::Object(map)
        }
        automerge::Value::Object(ObjType::List) => {
            let mut items = Vec::with_capacity(document.length(id));
            for index in 0..document.length(id) {
                let child_path = format!("{path}/{index}");
                if let Some(child) = read_slot(document, id, index.into(), &child_path, depth, conflicts)? {
                    items.push(child);
                }
            }
            Value::Array(items)
        }
        automerge::Value::Object(ObjType::Text) => Value::String(document.text(id)?),
    })
}

/// Reads one map key or list index: the winning value, recording a conflict when several
/// concurrent values are visible there.
pub fn read_slot<D: ReadDoc>(
    document: &D,
    object: &ObjId,
    prop: Prop,
    path: &str,
    depth: usize,
    conflicts: &mut Vec<Conflict>,
) -> Result<Option<Value>, JsonError> {
    // One seek: automerge's `get` is the last of what `get_all` returns (the highest operation
    // id wins), so the winner is taken from the same list.
    let all = document.get_all(object, prop)?;
    if all.len() > 1 {
        let mut values = Vec::with_capacity(all.len());
        for (value, id) in &all {
            let mut nested = Vec::new();
            values.push(read_value(document, value, id, path, depth + 1, &mut nested)?);
        }
        conflicts.push(Conflict { field: path.to_owned(), values });
    }
    match all.last() {
        Some((value, id)) => Ok(Some(read_value(document, value, id, path, depth + 1, conflicts)?)),
        None => Ok(None),
    }
}

/// RFC 7386 on one value: objects merge member by member, `null` removes a member, anything
/// else replaces. Recursive, so callers bound the patch's depth first ([`check_depth`]).
pub fn merge_patch(current: Option<&Value>, patch: &Map<String, Value>) -> Value {
    let mut merged = match current {
        Some(Value::Object(object)) => object.clone(),
        _ => Map::new(),
    };
    for (member, value) in patch {
        match value {
            Value::Null => {
                merged.remove(member);
            }
            Value::Object(inner) => {
                let next = merge_patch(merged.get(member), inner);
                merged.insert(member.clone(), next);
            }
            other => {
                merged.insert(member.clone(), other.clone());
            }
        }
    }
    Value::Object(merged)
}

/// Escapes a key for a JSON Pointer (RFC 6901).
pub fn escape_pointer(key: &str) -> Cow<'_, str> {
    if key.contains(['~', '/']) { Cow::Owned(key.replace('~', "~0").replace('/', "~1")) } else { Cow::Borrowed(key) }
}

/// What is currently stored in a slot, owned so the transaction can be mutated afterwards.
enum Current {
    Absent,
    Map(ObjId),
    List(ObjId),
    Counter(i64),
    Scalar(ScalarValue),
    Other,
}

fn current<T: Transactable + ReadDoc>(transaction: &T, object: &ObjId, prop: Prop) -> Result<Current, JsonError> {
    Ok(match transaction.get(object, prop)? {
        None => Current::Absent,
        Some((automerge::Value::Object(ObjType::Map), id)) => Current::Map(id),
        Some((automerge::Value::Object(ObjType::List), id)) => Current::List(id),
        Some((automerge::Value::Scalar(scalar), _)) => match scalar.as_ref() {
            ScalarValue::Counter(counter) => Current::Counter(i64::from(counter)),
            other => Current::Scalar(other.clone()),
        },
        Some(_) => Current::Other,
    })
}

/// Makes `prop` of `object` hold `desired`, writing only what differs.
pub fn update_slot<T: Transactable + ReadDoc>(
    transaction: &mut T,
    object: &ObjId,
    prop: Prop,
    desired: &Value,
) -> Result<(), JsonError> {
    match (current(transaction, object, prop.clone())?, desired) {
        (Current::Map(id), Value::Object(map)) => update_map(transaction, &id, map),
        (Current::List(id), Value::Array(items)) => update_list(transaction, &id, items),
        (Current::Counter(value), Value::Number(number)) if number.as_i64().is_some() => {
            let target = number.as_i64().unwrap_or(value);
            let by = target
                .checked_sub(value)
                .ok_or(JsonError::CounterOverflow { current: value, by: target.saturating_sub(value) })?;
            check_counter(value, by)?;
            if by != 0 {
                transaction.increment(object, prop, by)?;
            }
            Ok(())
        }
        (Current::Scalar(scalar), desired) => match scalar_from_json(desired) {
            Some(wanted) if identical(&wanted, &scalar) => Ok(()),
            // automerge skips a put of a value `==` to the current one, and `-0.0 == 0.0`: remove
            // the old value first so the sign of zero is written too.
            Some(wanted) if wanted == scalar => {
                transaction.delete(object, prop.clone())?;
                match prop {
                    Prop::Seq(index) => insert_fresh(transaction, object, index, desired),
                    Prop::Map(_) => put_fresh(transaction, object, prop, desired),
                }
            }
            _ => put_fresh(transaction, object, prop, desired),
        },
        _ => put_fresh(transaction, object, prop, desired),
    }
}

/// Equality that tells `-0.0` from `0.0`, so a write of either over the other is not a no-op.
fn identical(left: &ScalarValue, right: &ScalarValue) -> bool {
    match (left, right) {
        (ScalarValue::F64(left), ScalarValue::F64(right)) => left.to_bits() == right.to_bits(),
        _ => left == right,
    }
}

/// Makes map `id` hold exactly the keys of `desired`.
pub fn update_map<T: Transactable + ReadDoc>(
    transaction: &mut T,
    id: &ObjId,
    desired: &Map<String, Value>,
) -> Result<(), JsonError> {
    update_map_filtered(transaction, id, desired, same_key, |key| Some(same_key(key)))
}

fn same_key(key: &str) -> Cow<'_, str> {
    Cow::Borrowed(key)
}

/// Like [`update_map`] for a map whose stored keys differ from the user's keys: `stored` maps a
/// user key to its stored key, and `user` maps a stored key back (`None` for keys that are not
/// the user's, which are left alone).
pub fn update_map_filtered<T, S, U>(
    transaction: &mut T,
    id: &ObjId,
    desired: &Map<String, Value>,
    stored: S,
    user: U,
) -> Result<(), JsonError>
where
    T: Transactable + ReadDoc,
    S: for<'a> Fn(&'a str) -> Cow<'a, str>,
    U: for<'a> Fn(&'a str) -> Option<Cow<'a, str>>,
{
    let stale: Vec<String> =
        transaction.keys(id).filter(|key| user(key).is_some_and(|name| !desired.contains_key(name.as_ref()))).collect();
    for key in stale {
        transaction.delete(id, key.as_str())?;
    }
    for (key, value) in desired {
        update_slot(transaction, id, stored(key).as_ref().into(), value)?;
    }
    Ok(())
}

/// Applies an RFC 7386 merge patch `value` to map key `prop` of `object`: `null` removes the key,
/// an object patches an existing object member by member, anything else is written.
pub fn merge_patch_slot<T: Transactable + ReadDoc>(
    transaction: &mut T,
    object: &ObjId,
    prop: Prop,
    value: &Value,
) -> Result<(), JsonError> {
    match (value, current(transaction, object, prop.clone())?) {
        (Value::Null, Current::Absent) => Ok(()),
        (Value::Null, _) => Ok(transaction.delete(object, prop)?),
        (Value::Object(patch), Current::Map(id)) => {
            for (key, member) in patch {
                merge_patch_slot(transaction, &id, key.as_str().into(), member)?;
            }
            Ok(())
        }
        (Value::Object(_), _) => put_fresh(transaction, object, prop, &without_nulls(value)),
        (_, _) => update_slot(transaction, object, prop, value),
    }
}

/// A patch applied to nothing: the patch with its `null` members removed, at every depth.
fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, member)| !member.is_null())
                .map(|(key, member)| (key.clone(), without_nulls(member)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn update_list<T: Transactable + ReadDoc>(transaction: &mut T, id: &ObjId, desired: &[Value]) -> Result<(), JsonError> {
    let length = transaction.length(id);
    for (index, value) in desired.iter().enumerate().take(length) {
        update_slot(transaction, id, index.into(), value)?;
    }
    for index in (desired.len()..length).rev() {
        transaction.delete(id, index)?;
    }
    for (index, value) in desired.iter().enumerate().skip(length) {
        insert_fresh(transaction, id, index, value)?;
    }
    Ok(())
}

/// Where a fresh value goes: over a map key or list index, or inserted into a list.
enum Place {
    Put(Prop),
    Insert(usize),
}

/// Writes `value` into `prop` as new objects and scalars, superseding whatever is there.
pub fn put_fresh<T: Transactable>(
    transaction: &mut T,
    object: &ObjId,
    prop: Prop,
    value: &Value,
) -> Result<(), JsonError> {
    write_fresh(transaction, object, Place::Put(prop), value)
}

fn insert_fresh<T: Transactable>(
    transaction: &mut T,
    list: &ObjId,
    index: usize,
    value: &Value,
) -> Result<(), JsonError> {
    write_fresh(transaction, list, Place::Insert(index), value)
}

fn write_fresh<T: Transactable>(
    transaction: &mut T,
    object: &ObjId,
    place: Place,
    value: &Value,
) -> Result<(), JsonError> {
    let object_type = match value {
        Value::Object(_) => ObjType::Map,
        Value::Array(_) => ObjType::List,
        scalar => {
            let scalar = scalar_from_json(scalar).unwrap_or(ScalarValue::Null);
            match place {
                Place::Put(prop) => transaction.put(object, prop, scalar)?,
                Place::Insert(index) => transaction.insert(object, index, scalar)?,
            }
            return Ok(());
        }
    };
    let id = match place {
        Place::Put(prop) => transaction.put_object(object, prop, object_type)?,
        Place::Insert(index) => transaction.insert_object(object, index, object_type)?,
    };
    match value {
        Value::Object(map) => fill_map(transaction, &id, map),
        Value::Array(items) => fill_list(transaction, &id, items),
        _ => Ok(()),
    }
}

fn fill_map<T: Transactable>(transaction: &mut T, id: &ObjId, map: &Map<String, Value>) -> Result<(), JsonError> {
    for (key, value) in map {
        put_fresh(transaction, id, key.as_str().into(), value)?;
    }
    Ok(())
}

fn fill_list<T: Transactable>(transaction: &mut T, id: &ObjId, items: &[Value]) -> Result<(), JsonError> {
    for (index, value) in items.iter().enumerate() {
        insert_fresh(transaction, id, index, value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::{ActorId, AutoCommit, ROOT};
    use serde_json::json;

    #[test]
    fn values_other_than_null_are_counted() {
        let counted = |value: Value| check_and_count(&value).expect("shallow");
        assert_eq!(counted(json!(null)), 0);
        assert_eq!(counted(json!("text")), 1);
        assert_eq!(counted(json!([])), 1);
        assert_eq!(counted(json!([1, null, "x", [true]])), 5);
        assert_eq!(counted(json!({"a": {"b": null, "c": [1, 2]}, "d": 0.5})), 6);
        let mut deep = json!(1);
        for _ in 0..DEPTH_MAX {
            deep = json!([deep]);
        }
        assert!(matches!(check_and_count(&deep), Err(JsonError::TooDeep)));
    }

    /// Three replicas write key `f` concurrently (a scalar, an object, another scalar).
    fn conflicted() -> AutoCommit {
        let values = [json!("left"), json!({"city": "Paris"}), json!(7)];
        let mut replicas: Vec<AutoCommit> =
            (1..=3u8).map(|actor| AutoCommit::new().with_actor(ActorId::from(vec![actor; 16]))).collect();
        for (replica, value) in replicas.iter_mut().zip(&values) {
            put_fresh(replica, &ROOT, "f".into(), value).expect("a fresh value is written");
        }
        let mut merged = replicas.remove(0);
        for mut other in replicas {
            merged.merge(&mut other).expect("merges");
        }
        merged
    }

    #[test]
    fn a_slot_reads_automerge_s_winner_and_lists_every_concurrent_value() {
        let document = conflicted();
        let mut conflicts = Vec::new();
        let read = read_slot(&document, &ROOT, "f".into(), "/f", 0, &mut conflicts).expect("reads");
        let (winner, id) = document.get(&ROOT, "f").expect("reads").expect("f is set");
        let mut unused = Vec::new();
        let expected = read_value(&document, &winner, &id, "/f", 1, &mut unused).expect("reads");
        assert_eq!(read, Some(expected));
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].values.len(), 3);
        let mut empty = Vec::new();
        assert_eq!(read_slot(&document, &ROOT, "missing".into(), "/missing", 0, &mut empty).expect("reads"), None);
        assert!(empty.is_empty());
    }
}
