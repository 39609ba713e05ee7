//! Map records: the yrs record engine, a JSON record held as a Y.Map for collections that need
//! a high write rate, with last-writer-wins fields and no counters.
//!
//! # What this engine has, beside the automerge engine ([`crate::record`])
//! | feature | automerge records | map records |
//! |---|---|---|
//! | replace, merge patch, delete | yes | yes |
//! | a delete wins over concurrent updates; a later write revives | yes | yes |
//! | concurrent writes to different fields both kept | yes | yes |
//! | concurrent writes to one field | one winner, the others shown as a conflict | one winner (Yjs's rule for map keys), no conflict shown |
//! | merge of concurrent writes inside a nested object | field by field | the whole top-level field is one value: last writer wins |
//! | counters (`increment`) | yes, concurrent increments add | refused: no counters |
//! | integers | i64 and u64 | i64 (a u64 above i64's range is refused) |
//! | cost of a small write (`benches/replication.rs`) | tens of µs, growing with history | a few µs |
//!
//! # Layout
//! The record lives in the root Y.Map named `record`, with the same life scheme as automerge
//! records: the key `$cl:N` marks causal length `N`, and the record's causal length is the
//! largest such key present (concurrent writers of the same `N` write the same key, so the
//! maximum is the same on every replica). Odd means live. A user field `name` written during
//! life `L` is stored under `L:name`, and reads show only the current life's keys. A delete
//! writes the next even `$cl` and removes every field; a write that follows a delete writes the
//! next odd one and starts from an empty object; an update made concurrently with a delete wrote
//! keys of the old life, so it stays invisible. Each write that changes something also removes
//! keys of earlier lives and older `$cl` keys, so they do not accumulate.
//!
//! The document is a [`TextDocument`], so every byte from a peer or the disk passes the same
//! bounds and guards as collaborative texts before yrs decodes it.

use std::cell::Cell;

use serde_json::Value;
use yrs::types::ToJson;
use yrs::{Any, Map as _, MapRef, Number, Out, ReadTxn, WriteTxn};

use crate::json::{self, JsonError};
use crate::record::{Operation, RecordView};
use crate::text::{TextDocument, TextError, TextLimits};

/// The root map holding the record.
const ROOT: &str = "record";
/// The start of every causal-length key.
const CAUSAL_LENGTH_PREFIX: &str = "$cl:";

/// Why a write to a map record was refused. The document is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum MapRecordError {
    #[error("the yrs record engine has no counters: declare the collection with the automerge engine to increment")]
    NoCounters,
    #[error("integer {0} is above i64's range, which the yrs record engine cannot hold")]
    IntegerRange(u64),
    #[error("value nests deeper than {0} levels, the yrs record engine's limit")]
    TooDeep(usize),
    #[error("the write would make an update of about {estimate} bytes; peers accept at most {maximum}")]
    TooLarge { estimate: usize, maximum: usize },
    #[error(transparent)]
    Json(#[from] JsonError),
    #[error(transparent)]
    Document(#[from] TextError),
}

/// One record held as a Y.Map.
pub struct MapRecord {
    document: TextDocument,
    /// The digest, computed when first asked for after a change.
    digest: Cell<Option<[u8; 32]>>,
}

impl std::fmt::Debug for MapRecord {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("MapRecord").field("document", &self.document).finish_non_exhaustive()
    }
}

impl MapRecord {
    /// An empty record (never written) whose local writes are made as yrs client `client_id`.
    pub fn new(client_id: u64) -> MapRecord {
        MapRecord { document: TextDocument::new(client_id), digest: Cell::new(None) }
    }

    /// Rebuilds a record from a save and the updates applied after it, under `limits`.
    pub fn load(client_id: u64, saved: &[u8], updates: &[&[u8]], limits: &TextLimits) -> Result<MapRecord, TextError> {
        Ok(MapRecord { document: TextDocument::load(client_id, saved, updates, limits)?, digest: Cell::new(None) })
    }

    /// The whole state as one Yjs update.
    pub fn save(&self) -> Vec<u8> {
        self.document.save()
    }

    /// Applies a Yjs update from a peer or the disk; see [`TextDocument::apply_update`].
    pub fn apply_update(&mut self, update: &[u8], limits: &TextLimits) -> Result<bool, TextError> {
        let changed = self.document.apply_update(update, limits)?;
        if changed {
            self.digest.set(None);
        }
        Ok(changed)
    }

    /// A hash of the state that is equal on two replicas exactly when they hold the same
    /// structs and deletions (see [`TextDocument::digest`]).
    pub fn digest(&self) -> [u8; 32] {
        if let Some(digest) = self.digest.get() {
            return digest;
        }
        let digest = self.document.digest();
        self.digest.set(Some(digest));
        digest
    }

    /// True when the record exists (its causal length is odd).
    pub fn is_live(&self) -> bool {
        self.causal_length() % 2 == 1
    }

    fn causal_length(&self) -> u64 {
        self.document
            .read(|txn| match txn.get_map(ROOT) {
                Some(map) => causal_length(txn, &map),
                None => 0,
            })
            .unwrap_or(0)
    }

    /// Applies a local write and returns its update, or `None` when it changes nothing.
    ///
    /// The write is refused, before anything changes, when a value nests deeper than `limits`
    /// allow or the update would be larger than half of `limits.update_bytes_max` by a
    /// conservative estimate: peers apply the update under the same limits, and one they refuse
    /// would never replicate.
    pub fn write(&mut self, operation: &Operation, limits: &TextLimits) -> Result<Option<Vec<u8>>, MapRecordError> {
        let current = self.document.read(|txn| State::read(txn))??;
        let plan = current.plan(operation, limits.depth())?;
        if plan.is_empty() {
            return Ok(None);
        }
        let maximum = limits.update_bytes_max / 2;
        if plan.estimate > maximum {
            return Err(MapRecordError::TooLarge { estimate: plan.estimate, maximum });
        }
        let update = self.document.local_edit(|txn| {
            let map = txn.get_or_insert_map(ROOT);
            for key in &plan.removals {
                map.remove(txn, key);
            }
            for (key, value) in plan.puts {
                map.insert(txn, key, value);
            }
            Ok(())
        })?;
        self.digest.set(None);
        Ok(Some(update))
    }

    /// The record's version, as [`MapRecord::view`] reports it: the first half of its digest, in
    /// hex. Cheaper than a view when only the version is wanted (a batch write's answer).
    pub fn version(&self) -> String {
        hex::encode(&self.digest()[..16])
    }

    /// Reads the record as JSON. Map records never show conflicts; the version is the digest.
    pub fn view(&self) -> Result<RecordView, TextError> {
        let version = self.version();
        let state = self.document.read(|txn| State::read(txn))??;
        let value = (state.life % 2 == 1).then(|| {
            let prefix = life_prefix(state.life);
            state
                .fields
                .into_iter()
                .filter_map(|(key, value)| key.strip_prefix(prefix.as_str()).map(|field| (field.to_owned(), value)))
                .collect()
        });
        Ok(RecordView { value, conflicts: Vec::new(), version })
    }
}

/// The root map's keys as a write needs them.
struct State {
    life: u64,
    /// Every field key (of every life) with its value as JSON.
    fields: Vec<(String, Value)>,
    /// Every causal-length key.
    lengths: Vec<String>,
}

/// What a write does to the root map.
#[derive(Default)]
struct Plan {
    removals: Vec<String>,
    puts: Vec<(String, Any)>,
    /// An upper estimate of the update's size in bytes.
    estimate: usize,
}

impl Plan {
    fn is_empty(&self) -> bool {
        self.removals.is_empty() && self.puts.is_empty()
    }
}

impl State {
    fn read<T: ReadTxn>(txn: &T) -> Result<State, TextError> {
        let mut state = State { life: 0, fields: Vec::new(), lengths: Vec::new() };
        let Some(map) = txn.get_map(ROOT) else { return Ok(state) };
        for (key, value) in map.iter(txn) {
            if let Some(length) = key.strip_prefix(CAUSAL_LENGTH_PREFIX) {
                if let Ok(length) = length.parse::<u64>() {
                    state.life = state.life.max(length);
                }
                state.lengths.push(key.to_owned());
            } else {
                state.fields.push((key.to_owned(), out_to_json(txn, value)));
            }
        }
        Ok(state)
    }

    fn field(&self, key: &str) -> Option<&Value> {
        self.fields.iter().find(|(stored, _)| stored == key).map(|(_, value)| value)
    }

    /// Works out the removals and puts `operation` makes, without touching the document.
    fn plan(&self, operation: &Operation, depth_max: usize) -> Result<Plan, MapRecordError> {
        let mut plan = Plan::default();
        let live = self.life % 2 == 1;
        let mut life = self.life;
        match operation {
            Operation::Increment { .. } => return Err(MapRecordError::NoCounters),
            Operation::Delete => {
                if !live {
                    return Ok(plan);
                }
                life += 1;
            }
            Operation::Replace(fields) | Operation::MergePatch(fields) => {
                if !live {
                    life += 1;
                }
                let prefix = life_prefix(life);
                for (field, value) in fields {
                    json::check_depth(value)?;
                    let key = format!("{prefix}{field}");
                    let current = if live { self.field(&key) } else { None };
                    let next = match (operation, value) {
                        (Operation::MergePatch(_), Value::Null) => None,
                        (Operation::MergePatch(_), Value::Object(patch)) => Some(json::merge_patch(current, patch)),
                        _ => Some(value.clone()),
                    };
                    match next {
                        None if current.is_some() => plan.removals.push(key),
                        None => {}
                        Some(next) if current != Some(&next) => {
                            plan.estimate += estimate_bytes(&key, &next);
                            plan.puts.push((key, json_to_any(&next, depth_max)?));
                        }
                        Some(_) => {}
                    }
                }
                if let Operation::Replace(fields) = operation
                    && live
                {
                    for (key, _) in &self.fields {
                        let given = key.strip_prefix(prefix.as_str()).is_some_and(|field| fields.contains_key(field));
                        if key.starts_with(prefix.as_str()) && !given {
                            plan.removals.push(key.clone());
                        }
                    }
                }
            }
        }
        if life != self.life {
            plan.puts.push((format!("{CAUSAL_LENGTH_PREFIX}{life}"), Any::Bool(true)));
        }
        if plan.is_empty() {
            return Ok(plan);
        }
        // Something changes: also remove leftovers of earlier lives and older lengths (a delete
        // removes every field, since the new life is even and holds none).
        let prefix = life_prefix(life);
        for (key, _) in &self.fields {
            if !key.starts_with(prefix.as_str()) && !plan.removals.contains(key) {
                plan.removals.push(key.clone());
            }
        }
        let current_length = format!("{CAUSAL_LENGTH_PREFIX}{life}");
        plan.removals.extend(self.lengths.iter().filter(|key| **key != current_length).cloned());
        Ok(plan)
    }
}

/// An upper estimate of one map entry in a Yjs update: the key, the value's JSON (every number
/// counted as a 9-byte float64), and room for the item's header.
fn estimate_bytes(key: &str, value: &Value) -> usize {
    const ITEM_HEADER: usize = 48;
    let mut numbers = 0;
    let mut pending = vec![value];
    while let Some(value) = pending.pop() {
        match value {
            Value::Number(_) => numbers += 1,
            Value::Array(items) => pending.extend(items),
            Value::Object(members) => pending.extend(members.values()),
            _ => {}
        }
    }
    let json = serde_json::to_string(value).map_or(usize::MAX / 2, |text| text.len());
    key.len() + json + 9 * numbers + ITEM_HEADER
}

fn causal_length<T: ReadTxn>(txn: &T, map: &MapRef) -> u64 {
    map.keys(txn)
        .filter_map(|key| key.strip_prefix(CAUSAL_LENGTH_PREFIX).and_then(|length| length.parse::<u64>().ok()))
        .max()
        .unwrap_or(0)
}

fn life_prefix(life: u64) -> String {
    format!("{life}:")
}

/// JSON to a yrs value: integers stay integers (`Number::Int`), other numbers are `Number`.
fn json_to_any(value: &Value, depth_max: usize) -> Result<Any, MapRecordError> {
    fn convert(value: &Value, depth: usize, depth_max: usize) -> Result<Any, MapRecordError> {
        if depth > depth_max {
            return Err(MapRecordError::TooDeep(depth_max));
        }
        Ok(match value {
            Value::Null => Any::Null,
            Value::Bool(flag) => Any::Bool(*flag),
            Value::Number(number) => match (number.as_i64(), number.as_u64()) {
                (Some(integer), _) => Any::Number(Number::Int(integer)),
                (None, Some(large)) => return Err(MapRecordError::IntegerRange(large)),
                (None, None) => Any::Number(Number::Float(number.as_f64().unwrap_or(0.0))),
            },
            Value::String(text) => Any::from(text.as_str()),
            Value::Array(items) => {
                Any::from(items.iter().map(|item| convert(item, depth + 1, depth_max)).collect::<Result<Vec<_>, _>>()?)
            }
            Value::Object(members) => Any::from(
                members
                    .iter()
                    .map(|(member, item)| Ok((member.clone(), convert(item, depth + 1, depth_max)?)))
                    .collect::<Result<std::collections::HashMap<_, _>, MapRecordError>>()?,
            ),
        })
    }
    convert(value, 1, depth_max)
}

/// A yrs value to JSON. Values a Yjs client may write that JSON lacks: `undefined` reads as
/// null, a binary buffer as an array of byte values, a shared type as its JSON rendering.
fn out_to_json<T: ReadTxn>(txn: &T, value: Out) -> Value {
    match value {
        Out::Any(any) => any_to_json(&any),
        other => any_to_json(&other.to_json(txn)),
    }
}

fn any_to_json(value: &Any) -> Value {
    match value {
        Any::Null | Any::Undefined => Value::Null,
        Any::Bool(flag) => Value::Bool(*flag),
        Any::Number(Number::Int(integer)) => Value::from(*integer),
        Any::Number(Number::Float(number)) => serde_json::Number::from_f64(*number).map_or(Value::Null, Value::Number),
        Any::String(text) => Value::String(text.to_string()),
        Any::Buffer(bytes) => Value::Array(bytes.iter().map(|byte| Value::from(*byte)).collect()),
        Any::Array(items) => Value::Array(items.iter().map(any_to_json).collect()),
        Any::Map(members) => {
            Value::Object(members.iter().map(|(member, item)| (member.clone(), any_to_json(item))).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, json};

    const LIMITS: TextLimits =
        TextLimits { update_bytes_max: 1 << 20, nesting_depth_max: 32, document_bytes_max: 64 << 20 };

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => panic!("not an object"),
        }
    }

    fn value(record: &MapRecord) -> Option<Value> {
        record.view().expect("view").value.map(Value::Object)
    }

    fn sync(from: &MapRecord, to: &mut MapRecord) {
        to.apply_update(&from.save(), &LIMITS).expect("apply");
    }

    #[test]
    fn writes_read_back_with_integers_kept() {
        let mut record = MapRecord::new(1);
        let update = record
            .write(
                &Operation::Replace(object(
                    json!({"name": "Ada", "visits": 3, "ratio": 0.5, "tags": ["a"], "address": {"city": "London"}}),
                )),
                &LIMITS,
            )
            .expect("write");
        assert!(update.is_some());
        assert_eq!(
            value(&record),
            Some(json!({"name": "Ada", "visits": 3, "ratio": 0.5, "tags": ["a"], "address": {"city": "London"}}))
        );
        record
            .write(&Operation::MergePatch(object(json!({"visits": null, "address": {"zip": "N1"}}))), &LIMITS)
            .expect("patch");
        assert_eq!(
            value(&record),
            Some(json!({"name": "Ada", "ratio": 0.5, "tags": ["a"], "address": {"city": "London", "zip": "N1"}}))
        );
        record.write(&Operation::Replace(object(json!({"name": "Bo"}))), &LIMITS).expect("replace");
        assert_eq!(value(&record), Some(json!({"name": "Bo"})));
    }

    #[test]
    fn a_write_that_changes_nothing_makes_no_update() {
        let mut record = MapRecord::new(1);
        record.write(&Operation::Replace(object(json!({"name": "Ada"}))), &LIMITS).expect("write");
        assert!(
            record.write(&Operation::MergePatch(object(json!({"name": "Ada"}))), &LIMITS).expect("patch").is_none()
        );
        assert!(record.write(&Operation::MergePatch(object(json!({"gone": null}))), &LIMITS).expect("patch").is_none());
        record.write(&Operation::Delete, &LIMITS).expect("delete");
        assert!(record.write(&Operation::Delete, &LIMITS).expect("delete").is_none());
    }

    #[test]
    fn counters_and_out_of_range_integers_are_refused() {
        let mut record = MapRecord::new(1);
        let refused = record.write(&Operation::Increment { field: "visits".into(), by: 1 }, &LIMITS);
        assert!(matches!(refused, Err(MapRecordError::NoCounters)));
        let refused = record.write(&Operation::Replace(object(json!({"big": u64::MAX}))), &LIMITS);
        assert!(matches!(refused, Err(MapRecordError::IntegerRange(_))));
        let mut deep = json!(1);
        for _ in 0..40 {
            deep = json!([deep]);
        }
        let refused = record.write(&Operation::Replace(object(json!({"deep": deep}))), &LIMITS);
        assert!(matches!(refused, Err(MapRecordError::TooDeep(32))));
        assert_eq!(value(&record), None, "nothing was written");
    }

    #[test]
    fn a_delete_wins_over_a_concurrent_update_and_a_later_write_revives_empty() {
        let mut first = MapRecord::new(1);
        first.write(&Operation::Replace(object(json!({"name": "Ada", "city": "London"}))), &LIMITS).expect("write");
        let mut second = MapRecord::new(2);
        sync(&first, &mut second);
        first.write(&Operation::Delete, &LIMITS).expect("delete");
        second.write(&Operation::MergePatch(object(json!({"city": "Paris"}))), &LIMITS).expect("patch");
        sync(&first, &mut second);
        sync(&second, &mut first);
        assert_eq!(value(&first), None);
        assert_eq!(value(&second), None);
        assert_eq!(first.digest(), second.digest());
        second.write(&Operation::MergePatch(object(json!({"name": "Bo"}))), &LIMITS).expect("revive");
        sync(&second, &mut first);
        assert_eq!(value(&first), Some(json!({"name": "Bo"})));
        assert_eq!(first.view().expect("view").version, second.view().expect("view").version);
    }

    #[test]
    fn concurrent_writes_to_different_fields_both_survive_and_replicas_agree() {
        let mut first = MapRecord::new(1);
        first.write(&Operation::Replace(object(json!({"name": "Ada"}))), &LIMITS).expect("write");
        let mut second = MapRecord::new(2);
        sync(&first, &mut second);
        first.write(&Operation::MergePatch(object(json!({"city": "London", "tier": "gold"}))), &LIMITS).expect("patch");
        second.write(&Operation::MergePatch(object(json!({"visits": 4, "tier": "silver"}))), &LIMITS).expect("patch");
        let first_update = first.save();
        let second_update = second.save();
        first.apply_update(&second_update, &LIMITS).expect("apply");
        second.apply_update(&first_update, &LIMITS).expect("apply");
        let merged = value(&first).expect("live");
        assert_eq!(Some(merged.clone()), value(&second));
        assert_eq!(merged["city"], json!("London"));
        assert_eq!(merged["visits"], json!(4));
        assert!(merged["tier"] == json!("gold") || merged["tier"] == json!("silver"));
        assert_eq!(first.digest(), second.digest());
    }

    #[test]
    fn a_record_reloads_from_its_save_and_updates() {
        let mut record = MapRecord::new(7);
        let first =
            record.write(&Operation::Replace(object(json!({"name": "Ada"}))), &LIMITS).expect("write").expect("update");
        let second = record
            .write(&Operation::MergePatch(object(json!({"city": "Oslo"}))), &LIMITS)
            .expect("write")
            .expect("update");
        let reloaded = MapRecord::load(7, &[], &[&first, &second], &LIMITS).expect("load");
        assert_eq!(value(&reloaded), value(&record));
        let from_save = MapRecord::load(7, &record.save(), &[], &LIMITS).expect("load");
        assert_eq!(from_save.digest(), record.digest());
    }

    #[test]
    fn what_a_local_write_accepts_a_peer_accepts_and_oversized_writes_are_refused() {
        // The deepest value a local write accepts: arrays and objects, 31 levels around a scalar.
        let mut deepest = json!(1);
        for level in 1..LIMITS.nesting_depth_max {
            deepest = if level % 2 == 0 { json!([deepest]) } else { json!({ "a": deepest }) };
        }
        let too_deep = json!([deepest.clone()]);
        let refused = MapRecord::new(1).write(&Operation::Replace(object(json!({"deep": too_deep}))), &LIMITS);
        assert!(matches!(refused, Err(MapRecordError::TooDeep(32))), "{refused:?}");
        let mut record = MapRecord::new(1);
        let update = record
            .write(&Operation::Replace(object(json!({"deep": deepest, "text": "x".repeat(200_000)}))), &LIMITS)
            .expect("within the limits")
            .expect("update");
        let mut peer = MapRecord::new(2);
        assert!(peer.apply_update(&update, &LIMITS).expect("the peer accepts it"));
        assert_eq!(peer.view().expect("view").value, record.view().expect("view").value);

        let refused = record.write(&Operation::MergePatch(object(json!({"big": "y".repeat(600_000)}))), &LIMITS);
        assert!(matches!(refused, Err(MapRecordError::TooLarge { .. })), "{refused:?}");
        let numbers: Vec<f64> = (0..60_000).map(|number| f64::from(number) + 0.5).collect();
        let refused = record.write(&Operation::MergePatch(object(json!({"numbers": numbers}))), &LIMITS);
        assert!(matches!(refused, Err(MapRecordError::TooLarge { .. })), "{refused:?}");
        assert_eq!(peer.digest(), record.digest(), "refused writes changed nothing");
    }
}
