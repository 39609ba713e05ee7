//! What a text document shows, root type by root type, in a form two documents can be compared
//! by: the engine trusts a compaction save only if it reloads to the same digest *and* reads the
//! same (yrs 0.28 can integrate a saved state in another order than the updates it came from).

use serde_json::{Map, Value};
use yrs::types::ToJson;
use yrs::types::text::YChange;
use yrs::{Any, Out, ReadTxn, Text};

/// Every root type that shows something, as `(name, content)`, sorted by name. A root's content
/// does not depend on the type yrs was told it is (a root that only remote updates touched is of
/// no type yet, one that a local edit touched is a text): its item list is read as a `Y.Text`
/// reads it (strings, embeds, nested types, formatting), and its entries as a `Y.Map`'s. Text
/// with no formatting, embeds nor entries is the plain string; anything else is a JSON object
/// `{"delta": [...], "entries": {...}}` whose delta holds plain strings and
/// `{"insert": ..., "attributes": {...}}` chunks, adjacent strings with equal attributes joined.
/// Values are rendered as yrs's JSON with map keys sorted. Roots that show nothing are left out.
pub(super) fn render<T: ReadTxn>(txn: &T) -> Vec<(String, String)> {
    let names: Vec<String> = txn.root_refs().map(|(name, _)| name.to_owned()).collect();
    let mut reading: Vec<(String, String)> =
        names.into_iter().filter_map(|name| root(txn, &name).map(|content| (name, content))).collect();
    reading.sort();
    reading
}

/// One root's content, or `None` when it shows nothing.
fn root<T: ReadTxn>(txn: &T, name: &str) -> Option<String> {
    let text = txn.get_text(name)?;
    let mut chunks: Vec<(Value, Map<String, Value>)> = Vec::new();
    for chunk in text.diff(txn, YChange::identity) {
        let mut attributes: Vec<(String, Value)> = chunk
            .attributes
            .map(|attributes| attributes.iter().map(|(key, value)| (key.to_string(), json(value))).collect())
            .unwrap_or_default();
        attributes.sort_by(|left, right| left.0.cmp(&right.0));
        let attributes: Map<String, Value> = attributes.into_iter().collect();
        let insert = match chunk.insert {
            Out::Any(Any::String(string)) => Value::String(string.to_string()),
            other => json(&other.to_json(txn)),
        };
        match (chunks.last_mut(), &insert) {
            (Some((Value::String(previous), previous_attributes)), Value::String(string))
                if *previous_attributes == attributes =>
            {
                previous.push_str(string);
            }
            _ => chunks.push((insert, attributes)),
        }
    }
    chunks.retain(|(insert, _)| !matches!(insert, Value::String(string) if string.is_empty()));
    let entries = match txn.get_map(name).map(|map| json(&map.to_json(txn))) {
        Some(Value::Object(entries)) => entries,
        Some(other) => Map::from_iter([(String::new(), other)]),
        None => Map::new(),
    };
    if entries.is_empty() {
        match chunks.as_slice() {
            [] => return None,
            [(Value::String(plain), attributes)] if attributes.is_empty() => return Some(plain.clone()),
            _ => {}
        }
    }
    let delta = chunks
        .into_iter()
        .map(|(insert, attributes)| match insert {
            Value::String(_) if attributes.is_empty() => insert,
            _ => {
                let mut chunk = Map::from_iter([("insert".to_owned(), insert)]);
                if !attributes.is_empty() {
                    chunk.insert("attributes".to_owned(), Value::Object(attributes));
                }
                Value::Object(chunk)
            }
        })
        .collect();
    let mut object = Map::from_iter([("delta".to_owned(), Value::Array(delta))]);
    if !entries.is_empty() {
        object.insert("entries".to_owned(), Value::Object(entries));
    }
    Some(Value::Object(object).to_string())
}

/// A yrs value as JSON with map keys sorted; a value JSON cannot hold is written as its debug
/// form, so it still compares.
fn json(value: &Any) -> Value {
    sorted(serde_json::to_value(value).unwrap_or_else(|_| Value::String(format!("{value:?}"))))
}

/// `value` with every map's keys in order, whether or not `serde_json` keeps insertion order (its
/// `preserve_order` feature) and whatever order yrs's hash maps gave them in.
fn sorted(value: Value) -> Value {
    match value {
        Value::Object(entries) => {
            let mut entries: Vec<(String, Value)> = entries.into_iter().collect();
            entries.sort_by(|left, right| left.0.cmp(&right.0));
            Value::Object(entries.into_iter().map(|(key, value)| (key, sorted(value))).collect())
        }
        Value::Array(values) => Value::Array(values.into_iter().map(sorted).collect()),
        other => other,
    }
}
