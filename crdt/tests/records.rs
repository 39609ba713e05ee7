//! Tests the record layer (`crdt::record` over `crdt::json`) as replicas would use it: the exact
//! JSON round trip, `$` field names, RFC 7386 merge patches, writes that change nothing,
//! convergence whatever the delivery order, the delete-wins tombstone and revival, counters, and
//! corrupt bytes.

use std::collections::BTreeMap;

use crdt::clock::Timestamp;
use crdt::identity::OriginId;
use crdt::json::{Conflict, JsonError};
use crdt::key::RecordKey;
use crdt::record::{
    BoundError, FIELD_BYTES_MAX, ITEMS_MAX, Operation, OperationError, RECORD_ITEMS_MAX, Record, RecordError,
    RecordView, WritingOperations,
};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::{Map, Value, json};

// ---------------------------------------------------------------------------------------------
// Replicas
// ---------------------------------------------------------------------------------------------

fn record_key() -> RecordKey {
    RecordKey::new("tests", "record-1").expect("the test key is valid")
}

/// One replica of the record: its document, the origin its writes come from, and a clock.
#[derive(Debug, Clone)]
struct Replica {
    record: Record,
    origin: OriginId,
    wall_ms: u64,
}

impl Replica {
    fn new(number: u8) -> Replica {
        Replica { record: Record::new(), origin: OriginId([number; 16]), wall_ms: 0 }
    }

    /// Another replica, with origin `number`, that starts from this replica's document.
    fn fork(&self, number: u8) -> Replica {
        Replica { record: self.record.clone(), origin: OriginId([number; 16]), wall_ms: self.wall_ms }
    }

    #[allow(clippy::result_large_err, reason = "the crate's own error type, as `Record::write` returns it")]
    fn try_write(&mut self, operation: &Operation) -> Result<Option<Vec<u8>>, OperationError> {
        self.wall_ms += 1;
        let timestamp = Timestamp { wall_ms: 1_700_000_000_000 + self.wall_ms, logical: 0 };
        self.record.write(&record_key(), &self.origin, timestamp, operation)
    }

    /// A write that must succeed; returns its change bytes, if any.
    fn write(&mut self, operation: &Operation) -> Option<Vec<u8>> {
        match self.try_write(operation) {
            Ok(change) => change,
            Err(error) => panic!("write {operation:?} failed: {error}"),
        }
    }

    /// A write that must succeed and change something; returns its change bytes.
    fn write_changing(&mut self, operation: &Operation) -> Vec<u8> {
        self.write(operation).unwrap_or_else(|| panic!("write {operation:?} changed nothing"))
    }

    /// A write from a generated sequence: refusals (a counter over a non-number) are allowed and
    /// must leave the document unchanged.
    fn write_lenient(&mut self, operation: &Operation) -> Option<Vec<u8>> {
        let version = self.record.version();
        match self.try_write(operation) {
            Ok(change) => change,
            Err(OperationError::NotACounter(_)) => {
                assert_eq!(self.record.version(), version, "a refused write changed the document");
                None
            }
            Err(error) => panic!("write {operation:?} failed: {error}"),
        }
    }

    fn receive(&mut self, changes: &[u8]) -> bool {
        match self.record.apply_changes(changes) {
            Ok(changed) => changed,
            Err(error) => panic!("changes do not apply: {error}"),
        }
    }

    fn receive_all(&mut self, changes: &[Vec<u8>]) {
        for change in changes {
            self.receive(change);
        }
    }

    fn view(&self) -> RecordView {
        match self.record.view() {
            Ok(view) => view,
            Err(error) => panic!("record does not read: {error}"),
        }
    }

    fn value(&self) -> Option<Map<String, Value>> {
        self.view().value
    }
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

/// The exact text of a value: unlike `==` on numbers, it tells `-0.0` from `0.0`.
fn text<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("JSON values serialize")
}

/// Asserts that a record reads exactly `expected`, down to the spelling of every number.
#[track_caller]
fn assert_exact(actual: &Option<Map<String, Value>>, expected: &Map<String, Value>) {
    let Some(actual) = actual else { panic!("record is deleted, expected {}", text(expected)) };
    assert_eq!(actual, expected);
    assert_eq!(text(actual), text(expected));
}

/// The value with every `-0.0` turned into `0.0`.
fn without_negative_zero(value: &Value) -> Value {
    match value {
        Value::Number(number) if number.as_f64().is_some_and(|float| float == 0.0 && number.is_f64()) => json!(0.0),
        Value::Array(items) => Value::Array(items.iter().map(without_negative_zero).collect()),
        Value::Object(map) => {
            Value::Object(map.iter().map(|(name, member)| (name.clone(), without_negative_zero(member))).collect())
        }
        other => other.clone(),
    }
}

/// Like [`assert_exact`], for a write over an earlier value. Exact except for the sign of a float
/// zero: automerge skips a put whose value is `==` to the current one, and `-0.0 == 0.0`, so
/// `-0.0` written over `0.0` (or the reverse) keeps the old sign (see
/// `negative_zero_replaces_zero`).
#[track_caller]
fn assert_rewritten(actual: &Option<Map<String, Value>>, expected: &Map<String, Value>) {
    let Some(actual) = actual else { panic!("record is deleted, expected {}", text(expected)) };
    assert_eq!(actual, expected);
    let expected = Value::Object(expected.clone());
    assert_eq!(text(&without_negative_zero(&Value::Object(actual.clone()))), text(&without_negative_zero(&expected)));
}

/// Asserts that replicas hold the same document and read the same.
#[track_caller]
fn assert_same(replicas: &[&Replica]) {
    let first = replicas[0].view();
    for replica in &replicas[1..] {
        assert_eq!(replica.view(), first, "replicas {:?} and {:?} differ", replicas[0].origin, replica.origin);
    }
}

/// RFC 7386 `MergePatch(Target, Patch)`, word for word, over `serde_json` values.
fn merge_patch_reference(target: &Value, patch: &Value) -> Value {
    let Value::Object(patch) = patch else { return patch.clone() };
    let mut result = match target {
        Value::Object(target) => target.clone(),
        _ => Map::new(),
    };
    for (name, value) in patch {
        if value.is_null() {
            result.remove(name);
        } else {
            let current = result.get(name).cloned().unwrap_or(Value::Null);
            result.insert(name.clone(), merge_patch_reference(&current, value));
        }
    }
    Value::Object(result)
}

/// Permutes `items` with a small deterministic generator seeded by `seed` (Fisher-Yates).
fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut state = seed | 1;
    for index in (1..items.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let other = usize::try_from(state % (index as u64 + 1)).unwrap_or(0);
        items.swap(index, other);
    }
}

const PERMUTATIONS_OF_THREE: [[usize; 3]; 6] = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];

/// The proptest configuration: `cases` cases unless `PROPTEST_CASES` says otherwise.
fn config(cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

/// Field names: mostly a few shared ones (so writes collide), plus `$` names, JSON Pointer
/// specials, the empty name and arbitrary unicode.
fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec!["a", "b", "c", "name", "n"]).prop_map(String::from),
        2 => prop::sample::select(vec!["$", "$cl", "$$cl", "$a", "$$", "$$$x", "", "~", "a/b", "~1", "ü", "🦀 crab"])
            .prop_map(String::from),
        1 => "(?s).{0,6}",
    ]
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        prop::sample::select(vec![
            0.0,
            -0.0,
            1.0,
            -0.5,
            0.1,
            2.5,
            1e300,
            -1e-300,
            f64::MAX,
            f64::MIN,
            f64::MIN_POSITIVE,
            5e-324,
            9_007_199_254_740_993.0,
        ]),
        (-1000i32..1000).prop_map(f64::from),
        any::<f64>().prop_filter("JSON numbers are finite", |number| number.is_finite()),
    ]
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (-3i64..3).prop_map(Value::from),
        Just(Value::from(i64::MIN)),
        Just(Value::from(i64::MAX)),
        ((i64::MAX as u64 + 1)..=u64::MAX).prop_map(Value::from),
        Just(Value::from(u64::MAX)),
        float().prop_map(Value::from),
        "(?s).{0,12}".prop_map(Value::String),
        prop::sample::select(vec!["", "red", "Zürich", "日本語", "🦀", "\u{0}", "line\nbreak"]).prop_map(Value::from),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(field_name(), inner, 0..4)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

fn json_object() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map(field_name(), json_value(), 0..6).prop_map(|map| map.into_iter().collect())
}

/// Objects whose root names all start with `$`, including the user field `$cl`.
fn dollar_object() -> impl Strategy<Value = Map<String, Value>> {
    let name = prop_oneof![
        prop::sample::select(vec!["$cl", "$$cl", "$$$cl", "$", "$$", "$a"]).prop_map(String::from),
        "\\$[$a-z]{0,4}",
    ];
    prop::collection::btree_map(name, json_value(), 1..6).prop_map(|map| map.into_iter().collect())
}

/// The field names used by the replication properties: few, so that writes collide.
const FIELDS: [&str; 5] = ["a", "b", "n", "$x", "$cl"];

fn small_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        (-3i64..4).prop_map(Value::from),
        prop::sample::select(vec!["red", "green", "blue"]).prop_map(Value::from),
        Just(json!(1.5)),
        any::<bool>().prop_map(Value::Bool),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map(prop::sample::select(FIELDS.to_vec()).prop_map(String::from), inner, 0..3)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

fn small_object() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map(prop::sample::select(FIELDS.to_vec()).prop_map(String::from), small_value(), 0..4)
        .prop_map(|map| map.into_iter().collect())
}

fn operation() -> impl Strategy<Value = Operation> {
    prop_oneof![
        3 => small_object().prop_map(Operation::Replace),
        3 => small_object().prop_map(Operation::MergePatch),
        1 => Just(Operation::Delete),
        3 => (prop::sample::select(FIELDS.to_vec()), -5i64..=5)
            .prop_map(|(field, by)| Operation::Increment { field: field.to_owned(), by }),
    ]
}

/// A write that does not delete, to race against a delete.
fn update() -> impl Strategy<Value = Operation> {
    operation().prop_filter("not a delete", |operation| *operation != Operation::Delete)
}

fn nonzero_increment() -> impl Strategy<Value = i64> {
    prop_oneof![-100i64..0, 1i64..=100]
}

// ---------------------------------------------------------------------------------------------
// 1. The JSON round trip
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(512))]

    /// Any JSON object reads back exactly after a replace, after save and load, after load of a
    /// saved document plus later change bytes, and on a replica fed only change bytes.
    #[test]
    fn json_round_trip_is_exact(first in json_object(), second in json_object()) {
        let mut writer = Replica::new(1);
        let first_change = writer.write_changing(&Operation::Replace(first.clone()));
        assert_exact(&writer.value(), &first);

        let saved = writer.record.save();
        let loaded = Record::load(&saved, &[]).expect("a saved record loads");
        prop_assert_eq!(loaded.view().expect("loaded record reads"), writer.view());

        // The second replace is a diff against the first: the result must still be exact.
        let second_change = writer.write(&Operation::Replace(second.clone()));
        let same = |value: &Map<String, Value>| text(&without_negative_zero(&Value::Object(value.clone())));
        prop_assert_eq!(second_change.is_none(), same(&first) == same(&second));
        assert_rewritten(&writer.value(), &second);

        let increments: Vec<&[u8]> = second_change.iter().map(Vec::as_slice).collect();
        let loaded = Record::load(&saved, &increments).expect("a saved record plus increments loads");
        prop_assert_eq!(loaded.view().expect("loaded record reads"), writer.view());

        let mut reader = Replica::new(2);
        prop_assert!(reader.receive(&first_change));
        assert_exact(&reader.value(), &first);
        if let Some(change) = &second_change {
            prop_assert!(reader.receive(change));
        }
        prop_assert_eq!(reader.view(), writer.view());

        let reloaded = Record::load(&writer.record.save(), &[]).expect("a saved record loads");
        prop_assert_eq!(reloaded.view().expect("loaded record reads"), writer.view());
    }
}

#[test]
fn json_numbers_keep_their_kind() {
    let value = object(json!({
        "integer": 1,
        "float_one": 1.0,
        "negative_half": -0.5,
        "negative_zero": -0.0,
        "minimum": i64::MIN,
        "maximum": i64::MAX,
        "above_i64": (i64::MAX as u64) + 1,
        "u64_maximum": u64::MAX,
        "tiny": 5e-324,
        "huge": 1.7976931348623157e308,
        "text": "日本語 🦀 \u{0}",
        "nested": {"list": [1, 1.0, [], {}, null, true]},
    }));
    let mut replica = Replica::new(1);
    replica.write_changing(&Operation::Replace(value.clone()));
    assert_exact(&replica.value(), &value);
    let loaded = Record::load(&replica.record.save(), &[]).expect("a saved record loads");
    assert_exact(&loaded.view().expect("loaded record reads").value, &value);
}

/// Writing `-0.0` over `0.0` (and the reverse) is a change in the JSON text, so it should show.
#[test]
fn negative_zero_replaces_zero() {
    let mut replica = Replica::new(1);
    replica.write_changing(&Operation::Replace(object(json!({"x": 0.0, "list": [0.0]}))));
    let negative = object(json!({"x": -0.0, "list": [-0.0]}));
    replica.write_changing(&Operation::Replace(negative.clone()));
    assert_exact(&replica.value(), &negative);
    let positive = object(json!({"x": 0.0, "list": [0.0]}));
    replica.write_changing(&Operation::MergePatch(positive.clone()));
    assert_exact(&replica.value(), &positive);
}

// ---------------------------------------------------------------------------------------------
// 2. `$` field names
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(256))]

    /// User fields starting with `$` (including `$cl` itself) round-trip and never change
    /// whether the record exists.
    #[test]
    fn dollar_field_names_round_trip_without_touching_the_causal_length(
        fields in dollar_object(),
        patch in dollar_object(),
        by in nonzero_increment(),
    ) {
        let mut replica = Replica::new(1);
        replica.write_changing(&Operation::Replace(fields.clone()));
        assert_exact(&replica.value(), &fields);
        prop_assert!(replica.record.is_live());

        replica.write(&Operation::MergePatch(patch.clone()));
        let patched = merge_patch_reference(&Value::Object(fields.clone()), &Value::Object(patch));
        assert_rewritten(&replica.value(), &object(patched.clone()));
        prop_assert!(replica.record.is_live());

        // Removing every user field, `$cl` included, leaves an existing, empty record.
        let removal: Map<String, Value> = object(patched).keys().map(|name| (name.clone(), Value::Null)).collect();
        replica.write(&Operation::MergePatch(removal));
        assert_exact(&replica.value(), &Map::new());
        prop_assert!(replica.record.is_live());

        replica.write_changing(&Operation::Increment { field: "$cl".to_owned(), by });
        assert_exact(&replica.value(), &object(json!({"$cl": by})));
        prop_assert!(replica.record.is_live());

        replica.write_changing(&Operation::Delete);
        prop_assert_eq!(replica.value(), None);
        replica.write_changing(&Operation::Replace(fields.clone()));
        assert_exact(&replica.value(), &fields);

        let loaded = Record::load(&replica.record.save(), &[]).expect("a saved record loads");
        prop_assert_eq!(loaded.view().expect("loaded record reads"), replica.view());
    }
}

#[test]
fn a_user_field_named_like_the_causal_length_is_only_data() {
    let mut replica = Replica::new(1);
    // Even "causal lengths" as data must not delete the record.
    for value in [json!(2), json!(0), json!(4u64), json!("2"), json!(null)] {
        let fields = object(json!({"$cl": value, "$$cl": 6, "plain": 1}));
        replica.write(&Operation::Replace(fields.clone()));
        assert!(replica.record.is_live());
        assert_exact(&replica.value(), &fields);
    }
    replica.write_changing(&Operation::MergePatch(object(json!({"$cl": null}))));
    assert_exact(&replica.value(), &object(json!({"$$cl": 6, "plain": 1})));
    assert!(replica.record.is_live());
}

// ---------------------------------------------------------------------------------------------
// 3. Merge patches
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(512))]

    /// Replace then merge patch reads exactly as the RFC 7386 reference computes.
    #[test]
    fn merge_patch_matches_the_rfc_7386_reference(
        target in json_object(),
        patches in prop::collection::vec(json_object(), 1..4),
    ) {
        let mut replica = Replica::new(1);
        replica.write_changing(&Operation::Replace(target.clone()));
        let mut expected = Value::Object(target);
        for patch in patches {
            replica.write(&Operation::MergePatch(patch.clone()));
            expected = merge_patch_reference(&expected, &Value::Object(patch));
            assert_rewritten(&replica.value(), &object(expected.clone()));
        }
        let loaded = Record::load(&replica.record.save(), &[]).expect("a saved record loads");
        prop_assert_eq!(loaded.view().expect("loaded record reads"), replica.view());
    }

    /// A merge patch on a record that does not exist (never written, or deleted) patches an empty
    /// object.
    #[test]
    fn merge_patch_on_a_missing_record_patches_an_empty_object(before in json_object(), patch in json_object()) {
        let expected = object(merge_patch_reference(&json!({}), &Value::Object(patch.clone())));

        let mut fresh = Replica::new(1);
        fresh.write_changing(&Operation::MergePatch(patch.clone()));
        assert_exact(&fresh.value(), &expected);

        let mut deleted = Replica::new(2);
        deleted.write_changing(&Operation::Replace(before));
        deleted.write_changing(&Operation::Delete);
        deleted.write_changing(&Operation::MergePatch(patch));
        assert_exact(&deleted.value(), &expected);
    }
}

#[test]
fn merge_patch_edge_cases() {
    let target = json!({
        "title": "Goodbye!",
        "author": {"givenName": "John", "familyName": "Doe"},
        "tags": ["example", "sample"],
        "content": "This will be unchanged",
        "number": 7,
        "list": [1, 2, 3],
    });
    let patch = json!({
        "title": "Hello!",
        "phoneNumber": "+01-123-456-7890",
        "author": {"familyName": null, "middle": {"deep": null, "kept": [null]}},
        "tags": ["example"],
        "number": {"now": "an object", "gone": null},
        "list": {"a": {"b": null}},
        "absent": null,
        "new": {"x": null, "y": {"z": null}},
    });
    let expected = json!({
        "title": "Hello!",
        "author": {"givenName": "John", "middle": {"kept": [null]}},
        "tags": ["example"],
        "content": "This will be unchanged",
        "phoneNumber": "+01-123-456-7890",
        "number": {"now": "an object"},
        "list": {"a": {}},
        "new": {"y": {}},
    });
    assert_eq!(merge_patch_reference(&target, &patch), expected);
    let mut replica = Replica::new(1);
    replica.write_changing(&Operation::Replace(object(target)));
    replica.write_changing(&Operation::MergePatch(object(patch)));
    assert_exact(&replica.value(), &object(expected));
}

// ---------------------------------------------------------------------------------------------
// 4. Replace, and writes that change nothing
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(512))]

    /// Replace removes fields not given; repeating a replace or a merge patch changes nothing.
    #[test]
    fn replace_removes_absent_fields_and_repeated_writes_change_nothing(
        first in json_object(),
        second in json_object(),
        patch in json_object(),
    ) {
        let mut replica = Replica::new(1);
        replica.write_changing(&Operation::Replace(first.clone()));
        prop_assert_eq!(replica.write(&Operation::Replace(first)), None);

        replica.write(&Operation::Replace(second.clone()));
        assert_rewritten(&replica.value(), &second);
        let version = replica.record.version();
        prop_assert_eq!(replica.write(&Operation::Replace(second.clone())), None);
        prop_assert_eq!(replica.record.version(), version);

        replica.write(&Operation::MergePatch(patch.clone()));
        let version = replica.record.version();
        prop_assert_eq!(replica.write(&Operation::MergePatch(patch)), None);
        prop_assert_eq!(replica.record.version(), version);
    }
}

#[test]
fn writes_that_change_nothing_return_none() {
    let mut replica = Replica::new(1);
    assert_eq!(replica.write(&Operation::Delete), None, "delete of a never-written record");
    assert_eq!(replica.write(&Operation::Increment { field: "n".to_owned(), by: 0 }), None);
    assert_eq!(replica.record.version(), "");
    assert_eq!(replica.value(), None);

    replica.write_changing(&Operation::Replace(object(json!({"a": 1, "n": 1}))));
    replica.write_changing(&Operation::Increment { field: "counter".to_owned(), by: 2 });
    let version = replica.record.version();
    assert_eq!(replica.write(&Operation::MergePatch(object(json!({"absent": null})))), None);
    assert_eq!(replica.write(&Operation::MergePatch(object(json!({"a": 1, "counter": 2})))), None);
    assert_eq!(replica.write(&Operation::MergePatch(Map::new())), None);
    assert_eq!(replica.write(&Operation::Replace(object(json!({"a": 1, "n": 1, "counter": 2})))), None);
    assert_eq!(replica.write(&Operation::Increment { field: "counter".to_owned(), by: 0 }), None);
    assert_eq!(replica.write(&Operation::Increment { field: "a".to_owned(), by: 0 }), None);
    assert_eq!(replica.record.version(), version);

    replica.write_changing(&Operation::Replace(object(json!({"only": true}))));
    assert_exact(&replica.value(), &object(json!({"only": true})));

    replica.write_changing(&Operation::Delete);
    let version = replica.record.version();
    assert_eq!(replica.write(&Operation::Delete), None, "delete of a deleted record");
    assert_eq!(replica.write(&Operation::Increment { field: "n".to_owned(), by: 0 }), None);
    assert_eq!(replica.record.version(), version);
    assert_eq!(replica.value(), None);
}

// ---------------------------------------------------------------------------------------------
// 5. Two replicas
// ---------------------------------------------------------------------------------------------

/// The conflicted fields of a record and their writing operations, from each live field's
/// concurrent values: the slow, obvious form of `Record::conflict_signatures`.
fn signatures_from_concurrent_values(record: &Record) -> Vec<(String, WritingOperations)> {
    let Some(value) = record.view().expect("view").value else { return Vec::new() };
    let mut signatures: Vec<(String, WritingOperations)> = value
        .keys()
        .filter_map(|field| {
            let values = record.concurrent_values(field).expect("concurrent values");
            let mut operations: WritingOperations =
                values.iter().map(|concurrent| (concurrent.counter, concurrent.actor.clone())).collect();
            operations.sort();
            (operations.len() >= 2).then(|| (field.clone(), operations))
        })
        .collect();
    signatures.sort();
    signatures
}

proptest! {
    #![proptest_config(config(1_000))]

    /// From a shared base, two replicas write independently, then exchange changes: both, and
    /// observers that receive the two sets in either order, end identical.
    #[test]
    fn two_replicas_converge_in_either_order(
        base in prop::collection::vec(operation(), 0..4),
        first_operations in prop::collection::vec(operation(), 0..6),
        second_operations in prop::collection::vec(operation(), 0..6),
    ) {
        let mut first = Replica::new(1);
        for operation in &base {
            first.write_lenient(operation);
        }
        let mut second = first.fork(2);
        let mut observer_one = first.fork(3);
        let mut observer_two = first.fork(4);

        let first_changes: Vec<Vec<u8>> = first_operations.iter().filter_map(|operation| first.write_lenient(operation)).collect();
        let second_changes: Vec<Vec<u8>> = second_operations.iter().filter_map(|operation| second.write_lenient(operation)).collect();

        first.receive_all(&second_changes);
        second.receive_all(&first_changes);
        observer_one.receive_all(&first_changes);
        observer_one.receive_all(&second_changes);
        observer_two.receive_all(&second_changes);
        observer_two.receive_all(&first_changes);
        assert_same(&[&first, &second, &observer_one, &observer_two]);
        prop_assert_eq!(first.record.heads(), second.record.heads());
        // The ledger's one-pass signatures agree with every field's concurrent values.
        let mut signatures = first.record.conflict_signatures();
        signatures.sort();
        prop_assert_eq!(signatures, signatures_from_concurrent_values(&first.record));

        // And after more writes on the merged state, they still converge.
        let more_first: Vec<Vec<u8>> = second_operations.iter().filter_map(|operation| first.write_lenient(operation)).collect();
        let more_second: Vec<Vec<u8>> = first_operations.iter().filter_map(|operation| second.write_lenient(operation)).collect();
        first.receive_all(&more_second);
        second.receive_all(&more_first);
        assert_same(&[&first, &second]);
    }
}

/// The changes of a history with concurrency: one writer's operations, a second writer (forked
/// from the first) making its own, then the first writer's operations again.
fn history_of_two_writers(first_operations: &[Operation], second_operations: &[Operation]) -> Vec<Vec<u8>> {
    let mut first = Replica::new(1);
    let mut changes: Vec<Vec<u8>> =
        first_operations.iter().filter_map(|operation| first.write_lenient(operation)).collect();
    let mut second = first.fork(2);
    changes.extend(second_operations.iter().filter_map(|operation| second.write_lenient(operation)));
    changes.extend(first_operations.iter().filter_map(|operation| first.write_lenient(operation)));
    changes
}

proptest! {
    #![proptest_config(config(500))]

    /// A record loads the same from a saved part and increments, in any order and with any of
    /// them left out (so with changes whose dependencies are missing), as a record fed the same
    /// parts one at a time: `Record::load` loads them in one go when it can, part by part when
    /// not.
    #[test]
    fn a_record_loads_from_its_parts_as_it_would_from_each_in_turn(
        first_operations in prop::collection::vec(operation(), 1..5),
        second_operations in prop::collection::vec(operation(), 0..5),
        saved_at in 0usize..4,
        seed in any::<u64>(),
        left_out in prop::option::of(0usize..10),
    ) {
        let changes = history_of_two_writers(&first_operations, &second_operations);
        prop_assume!(!changes.is_empty());
        // A saved document of the first few changes (or none), then the rest in any order.
        let saved_count = saved_at.min(changes.len());
        let mut saved = Replica::new(5);
        saved.receive_all(&changes[..saved_count]);
        let saved = if saved_count == 0 { Vec::new() } else { saved.record.save() };
        let mut increments: Vec<Vec<u8>> = changes[saved_count..].to_vec();
        shuffle(&mut increments, seed);
        if let Some(index) = left_out.filter(|index| *index < increments.len()) {
            increments.remove(index);
        }
        let parts: Vec<&[u8]> = increments.iter().map(Vec::as_slice).collect();

        let loaded = Record::load(&saved, &parts).expect("the parts load");
        let mut fed = if saved.is_empty() { Record::new() } else { Record::load(&saved, &[]).expect("it loads") };
        for part in &parts {
            fed.apply_changes(part).expect("a part applies");
        }
        prop_assert_eq!(loaded.heads(), fed.heads());
        prop_assert_eq!(loaded.view().ok(), fed.view().ok());
        // The same operations and changes, though not saved byte for byte alike: a save lists
        // the changes in the order they were applied.
        prop_assert_eq!(loaded.items(), fed.items());
    }
}

proptest! {
    #![proptest_config(config(500))]

    /// `Record::load_applying` gives what building a record from its parts and then applying a
    /// change gives: the same record, heads before, answer and conflict signatures before and
    /// after, for a change that is new, already held, or whose dependencies are missing. It
    /// declines (`None`) only when the parts and the change are not one whole history.
    #[test]
    fn a_record_rebuilt_with_a_change_is_the_record_built_then_changed(
        first_operations in prop::collection::vec(operation(), 1..5),
        second_operations in prop::collection::vec(operation(), 0..5),
        seed in any::<u64>(),
        applied in 0usize..12,
        left_out in prop::option::of(0usize..12),
    ) {
        let changes = history_of_two_writers(&first_operations, &second_operations);
        prop_assume!(changes.len() >= 2);
        // Stored as the engine stores a record: its first change, then increments in any order.
        let saved = changes[0].clone();
        let change = changes[applied % changes.len()].clone();
        let mut increments: Vec<Vec<u8>> = changes[1..].iter().filter(|part| **part != change).cloned().collect();
        shuffle(&mut increments, seed);
        if let Some(index) = left_out.filter(|index| *index < increments.len()) {
            increments.remove(index);
        }
        let parts: Vec<&[u8]> = increments.iter().map(Vec::as_slice).collect();

        let before = Record::load(&saved, &parts).expect("the parts load");
        let mut built = before.clone();
        let changed = built.apply_changes(&change).expect("the change applies");
        let rebuilt = Record::load_applying(&saved, &parts, &change);

        // Whole: every dependency of the stored changes is among them, and so is every
        // dependency of the change's changes, once they are added.
        let stored: Vec<automerge::Change> = std::iter::once(saved.as_slice())
            .chain(parts.iter().copied())
            .flat_map(changes_of)
            .collect();
        let all: Vec<automerge::Change> = stored.iter().cloned().chain(changes_of(&change)).collect();
        let closed = |changes: &[automerge::Change]| {
            changes.iter().all(|header| header.deps().iter().all(|dependency| changes.iter().any(|other| other.hash() == *dependency)))
        };
        let whole = closed(&stored) && closed(&all);
        prop_assert_eq!(rebuilt.is_some(), whole, "declined a whole history, or took a broken one");
        let Some(rebuilt) = rebuilt else { return Ok(()) };
        prop_assert_eq!(rebuilt.changed, changed);
        prop_assert_eq!(&rebuilt.before, &before.heads());
        prop_assert_eq!(rebuilt.record.heads(), built.heads());
        prop_assert_eq!(rebuilt.record.view().ok(), built.view().ok());
        prop_assert_eq!(rebuilt.record.items(), built.items());
        prop_assert_eq!(rebuilt.record.conflict_signatures(), built.conflict_signatures());
        prop_assert_eq!(rebuilt.record.conflict_signatures_at(&rebuilt.before), before.conflict_signatures());
        prop_assert_eq!(rebuilt.record.is_live_at(&rebuilt.before), before.is_live());
        prop_assert_eq!(rebuilt.record.is_live(), built.is_live());
    }
}

/// The changes of change bytes: one change chunk or several back to back (a counter's genesis
/// and its increment), split by the length in each chunk's header.
fn changes_of(mut bytes: &[u8]) -> Vec<automerge::Change> {
    let mut changes = Vec::new();
    while !bytes.is_empty() {
        // The magic bytes, the checksum, the chunk type, then the length as ULEB128.
        let mut length = 0usize;
        let mut at = 9;
        for shift in (0..).step_by(7) {
            let byte = bytes[at];
            at += 1;
            length |= usize::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
        }
        let (chunk, rest) = bytes.split_at(at + length);
        changes.push(automerge::Change::try_from(chunk).expect("a change chunk"));
        bytes = rest;
    }
    changes
}

/// A record stored as a saved document, or a change that is no single change chunk, goes the
/// building way: `load_applying` reads each part as change chunks or declines.
#[test]
fn a_record_rebuilt_with_a_change_declines_saved_documents_and_damaged_bytes() {
    let mut writer = Replica::new(1);
    let first = writer.write_changing(&Operation::Replace(object(json!({"a": 1}))));
    let second = writer.write_changing(&Operation::MergePatch(object(json!({"b": 2}))));
    let third = writer.write_changing(&Operation::MergePatch(object(json!({"c": 3}))));
    let saved = Record::load(&first, &[&second]).expect("it loads").save();
    assert!(Record::load_applying(&saved, &[], &third).is_none());
    let truncated = &third[..third.len() - 1];
    assert!(Record::load_applying(&first, &[&second], truncated).is_none());
    // Two changes back to back are read as two.
    let joined: Vec<u8> = [second.as_slice(), third.as_slice()].concat();
    let rebuilt = Record::load_applying(&first, &[], &joined).expect("two changes");
    assert_eq!(rebuilt.record.heads(), writer.record.heads());
    assert!(Record::load_applying(&first, &[], b"not a change").is_none());
    assert!(Record::load_applying(&[], &[], &first).is_none());
    let rebuilt = Record::load_applying(&first, &[&second], &third).expect("one whole history");
    assert!(rebuilt.changed);
    assert_eq!(rebuilt.record.heads(), writer.record.heads());
}

#[test]
fn edits_to_different_fields_both_survive() {
    let mut first = Replica::new(1);
    first.write_changing(&Operation::Replace(object(json!({"name": "Ada", "address": {"city": "London"}}))));
    let mut second = first.fork(2);

    let one = first.write_changing(&Operation::MergePatch(object(json!({"name": "Ada Lovelace"}))));
    let two = second.write_changing(&Operation::MergePatch(object(json!({"address": {"zip": "W1"}, "born": 1815}))));
    // A replace that leaves a field as it was does not touch it, so it merges too.
    let three = first.write_changing(&Operation::Replace(object(
        json!({"name": "Ada Lovelace", "address": {"city": "London"}, "title": "Countess"}),
    )));
    second.receive(&one);
    second.receive(&three);
    first.receive(&two);
    let expected = object(json!({
        "name": "Ada Lovelace",
        "address": {"city": "London", "zip": "W1"},
        "born": 1815,
        "title": "Countess",
    }));
    assert_exact(&first.value(), &expected);
    assert_same(&[&first, &second]);
    assert!(first.view().conflicts.is_empty());
}

#[test]
fn concurrent_edits_of_one_field_conflict_with_the_same_winner_everywhere() {
    let mut first = Replica::new(1);
    first.write_changing(&Operation::Replace(object(
        json!({"color": "red", "address": {"city": "Paris"}, "a/b": 0, "$x": 0}),
    )));
    let mut second = first.fork(2);

    let one = first.write_changing(&Operation::MergePatch(object(
        json!({"color": "green", "address": {"city": "Lyon"}, "a/b": 1, "$x": 1}),
    )));
    let two = second.write_changing(&Operation::Replace(object(
        json!({"color": "blue", "address": {"city": "Nice"}, "a/b": 2, "$x": 2}),
    )));
    first.receive(&two);
    second.receive(&one);
    assert_same(&[&first, &second]);

    let view = first.view();
    let value = view.value.clone().expect("record is live");
    let mut conflicts: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for Conflict { field, values } in &view.conflicts {
        let mut values = values.clone();
        values.sort_by_key(text);
        assert!(conflicts.insert(field.clone(), values).is_none(), "field {field} reported twice");
    }
    let expected: BTreeMap<String, Vec<Value>> = [
        ("/color", vec![json!("blue"), json!("green")]),
        ("/address/city", vec![json!("Lyon"), json!("Nice")]),
        ("/a~1b", vec![json!(1), json!(2)]),
        ("/$x", vec![json!(1), json!(2)]),
    ]
    .into_iter()
    .map(|(field, values)| (field.to_owned(), values))
    .collect();
    assert_eq!(conflicts, expected);
    // The winner is one of the values, and (checked by `assert_same`) the same on both replicas.
    assert!(["green", "blue"].contains(&value["color"].as_str().expect("color is text")));

    // The ledger's signatures: the top-level fields in conflict (not `address`, whose conflict is
    // inside it), each with the two writing operations in order, the same on both replicas.
    let signatures = first.record.conflict_signatures();
    let fields: Vec<&str> = signatures.iter().map(|(field, _)| field.as_str()).collect();
    assert_eq!(fields, ["$x", "a/b", "color"]);
    for (field, operations) in &signatures {
        let actors: Vec<&[u8]> = operations.iter().map(|(_, actor)| actor.as_slice()).collect();
        assert_eq!(operations.len(), 2, "{field}");
        assert!(operations.is_sorted(), "{field}: {operations:?}");
        assert!(actors.contains(&[1_u8; 16].as_slice()) && actors.contains(&[2_u8; 16].as_slice()), "{field}");
    }
    assert_eq!(signatures, second.record.conflict_signatures());

    // A later write supersedes the conflict.
    let three = second.write_changing(&Operation::MergePatch(object(json!({"color": "black"}))));
    first.receive(&three);
    assert_same(&[&first, &second]);
    assert!(first.view().conflicts.iter().all(|conflict| conflict.field != "/color"));
    let fields: Vec<String> = first.record.conflict_signatures().into_iter().map(|(field, _)| field).collect();
    assert_eq!(fields, ["$x", "a/b"]);
    first.write_changing(&Operation::Delete);
    assert_eq!(first.record.conflict_signatures(), Vec::new(), "a deleted record has no conflicts");
}

// ---------------------------------------------------------------------------------------------
// 6. Duplicates
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(1_000))]

    /// Applying the same change bytes a second time reports no change and changes nothing.
    #[test]
    fn applying_the_same_changes_twice_is_a_no_op(operations in prop::collection::vec(operation(), 1..8)) {
        let mut writer = Replica::new(1);
        let mut reader = Replica::new(2);
        let mut all = Vec::new();
        for operation in &operations {
            if let Some(change) = writer.write_lenient(operation) {
                prop_assert!(reader.receive(&change), "new changes change the record");
                let view = reader.view();
                prop_assert!(!reader.receive(&change), "the same changes again change nothing");
                prop_assert_eq!(reader.view(), view);
                all.push(change);
            }
        }
        prop_assert_eq!(reader.view(), writer.view());
        // Everything again, and the whole saved document as change bytes, change nothing.
        for change in &all {
            prop_assert!(!reader.receive(change));
        }
        prop_assert!(!reader.receive(&writer.record.save()));
        prop_assert_eq!(reader.view(), writer.view());
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Delete wins over a concurrent update; a later write revives from empty
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(384))]

    #[test]
    fn delete_wins_over_a_concurrent_update_and_a_later_write_revives_from_empty(
        base in small_object(),
        update in update(),
        revival in prop_oneof![
            small_object().prop_map(Operation::Replace),
            small_object().prop_map(Operation::MergePatch),
            (prop::sample::select(FIELDS.to_vec()), nonzero_increment())
                .prop_map(|(field, by)| Operation::Increment { field: field.to_owned(), by }),
        ],
        reviver_is_first in any::<bool>(),
    ) {
        let mut first = Replica::new(1);
        first.write_changing(&Operation::Replace(base));
        let mut second = first.fork(2);

        let delete = first.write_changing(&Operation::Delete);
        let Some(concurrent) = second.write_lenient(&update) else { return Ok(()) };
        first.receive(&concurrent);
        second.receive(&delete);
        prop_assert_eq!(first.value(), None);
        prop_assert_eq!(second.value(), None);
        assert_same(&[&first, &second]);

        let (reviver, other) = if reviver_is_first { (&mut first, &mut second) } else { (&mut second, &mut first) };
        let change = reviver.write_changing(&revival);
        let expected = match &revival {
            Operation::Replace(fields) => fields.clone(),
            Operation::MergePatch(patch) => object(merge_patch_reference(&json!({}), &Value::Object(patch.clone()))),
            Operation::Increment { field, by } => [(field.clone(), json!(by))].into_iter().collect(),
            Operation::Delete => unreachable!("revivals are not deletes"),
        };
        assert_exact(&reviver.value(), &expected);
        other.receive(&change);
        assert_same(&[&first, &second]);
    }
}

#[test]
fn delete_wins_in_either_delivery_order() {
    let mut first = Replica::new(1);
    first.write_changing(&Operation::Replace(object(json!({"a": 1}))));
    let mut second = first.fork(2);
    let mut observer = first.fork(3);

    let update = second.write_changing(&Operation::MergePatch(object(json!({"a": 2, "b": 3}))));
    let delete = first.write_changing(&Operation::Delete);
    observer.receive(&update);
    assert_exact(&observer.value(), &object(json!({"a": 2, "b": 3})));
    observer.receive(&delete);
    first.receive(&update);
    second.receive(&delete);
    for replica in [&first, &second, &observer] {
        assert_eq!(replica.value(), None);
        assert!(!replica.record.is_live());
    }
    assert_same(&[&first, &second, &observer]);

    // A write that has seen the delete revives from an empty object.
    let revival = observer.write_changing(&Operation::MergePatch(object(json!({"c": 4}))));
    assert_exact(&observer.value(), &object(json!({"c": 4})));
    first.receive(&revival);
    second.receive(&revival);
    assert_same(&[&first, &second, &observer]);
}

/// The module doc: after a revival "nothing from before the delete, nor any straggling
/// concurrent update, comes back". Here the straggler reaches the reviver after the revival.
#[test]
fn an_update_concurrent_with_a_delete_does_not_come_back_after_a_revival() {
    let mut first = Replica::new(1);
    first.write_changing(&Operation::Replace(object(json!({"x": 1}))));
    let mut second = first.fork(2);

    let straggler = second.write_changing(&Operation::MergePatch(object(json!({"x": 2, "stale": true}))));
    let delete = first.write_changing(&Operation::Delete);
    let revival = first.write_changing(&Operation::Replace(object(json!({"y": 1}))));
    first.receive(&straggler);
    second.receive(&delete);
    second.receive(&revival);
    assert_same(&[&first, &second]);
    assert_exact(&first.value(), &object(json!({"y": 1})));
}

// ---------------------------------------------------------------------------------------------
// 8. Counters
// ---------------------------------------------------------------------------------------------

/// The state of the record before three replicas increment counter `n` concurrently.
#[derive(Debug, Clone, Copy)]
enum CounterBase {
    /// The record was never written.
    NeverWritten,
    /// The record exists without `n`.
    LiveWithoutCounter,
    /// `n` is a counter holding this value.
    Counter(i64),
    /// `n` was a counter, then the record was deleted (`times` deletes and re-creations).
    Deleted { times: u8 },
    /// `n` was a counter, then removed by a replace.
    Removed,
}

fn counter_base() -> impl Strategy<Value = CounterBase> {
    prop_oneof![
        Just(CounterBase::NeverWritten),
        Just(CounterBase::LiveWithoutCounter),
        (-50i64..50).prop_map(CounterBase::Counter),
        (1u8..4).prop_map(|times| CounterBase::Deleted { times }),
        Just(CounterBase::Removed),
    ]
}

fn build_counter_base(base: CounterBase) -> (Replica, i64) {
    let mut replica = Replica::new(10);
    let increment = |by| Operation::Increment { field: "n".to_owned(), by };
    let start = match base {
        CounterBase::NeverWritten => 0,
        CounterBase::LiveWithoutCounter => {
            replica.write_changing(&Operation::Replace(object(json!({"other": 1}))));
            0
        }
        CounterBase::Counter(value) => {
            replica.write_changing(&Operation::Replace(object(json!({"other": 1}))));
            replica.write(&increment(value));
            value
        }
        CounterBase::Deleted { times } => {
            for time in 0..times {
                replica.write_changing(&increment(i64::from(time) + 7));
                replica.write_changing(&Operation::Delete);
            }
            0
        }
        CounterBase::Removed => {
            replica.write_changing(&increment(9));
            replica.write_changing(&Operation::Replace(object(json!({"other": 1}))));
            0
        }
    };
    (replica, start)
}

proptest! {
    #![proptest_config(config(256))]

    /// Increments made concurrently on three replicas add up, in every delivery order, whether the
    /// counter existed before or is created concurrently (also after a delete or a removal).
    #[test]
    fn concurrent_increments_add_up_in_every_delivery_order(
        base in counter_base(),
        increments in prop::collection::vec(prop::collection::vec(nonzero_increment(), 1..4), 3),
    ) {
        let (base_replica, start) = build_counter_base(base);
        let mut replicas: Vec<Replica> = (0..3u8).map(|number| base_replica.fork(number + 1)).collect();
        let mut changes: Vec<Vec<Vec<u8>>> = Vec::new();
        for (replica, amounts) in replicas.iter_mut().zip(&increments) {
            let mut mine = Vec::new();
            for &by in amounts {
                let change = replica.write_changing(&Operation::Increment { field: "n".to_owned(), by });
                mine.push(change);
            }
            changes.push(mine);
        }
        let total: i64 = start + increments.iter().flatten().sum::<i64>();
        let mut expected = base_replica.value().unwrap_or_default();
        if matches!(base, CounterBase::Deleted { .. }) {
            expected = Map::new();
        }
        expected.insert("n".to_owned(), json!(total));

        let mut observers = Vec::new();
        for (index, order) in PERMUTATIONS_OF_THREE.iter().enumerate() {
            let mut observer = base_replica.fork(20 + u8::try_from(index).unwrap_or(0));
            for &source in order {
                observer.receive_all(&changes[source]);
            }
            assert_exact(&observer.value(), &expected);
            observers.push(observer);
        }
        for (index, replica) in replicas.iter_mut().enumerate() {
            for source in [(index + 1) % 3, (index + 2) % 3] {
                replica.receive_all(&changes[source]);
            }
            assert_exact(&replica.value(), &expected);
        }
        let mut all: Vec<&Replica> = replicas.iter().collect();
        all.extend(observers.iter());
        assert_same(&all);
    }
}

/// A replica holding back a write over a counter, waiting for the counter's creation, releases
/// it when its own increment creates the counter: the increment then answers as on a replica
/// that had the write all along (not a counter), and changes nothing. It used to try every
/// creation epoch against a value none of them can win over (a fuzz finding, session 17).
#[test]
fn an_increment_that_releases_a_write_over_its_counter_answers_as_a_replica_that_had_it() {
    let mut creator = Replica::new(1);
    let created = creator.write_changing(&Operation::Increment { field: "n".into(), by: 1 });
    // The first increment's bytes are the record's new life and the increment, by the creator,
    // and between them the counter's creation: the deterministic genesis, by an actor of its own.
    let chunks = automerge::Automerge::load(&created).expect("loads").get_changes(&[]);
    let without_genesis: Vec<u8> = chunks
        .iter()
        .filter(|change| change.actor_id().to_bytes() == creator.origin.0.as_slice())
        .flat_map(|change| change.raw_bytes().to_vec())
        .collect();
    assert_eq!(chunks.len(), 3);

    let mut writer = creator.fork(2);
    let overwritten = writer.write_changing(&Operation::MergePatch(object(json!({"n": "text"}))));
    assert!(matches!(
        writer.try_write(&Operation::Increment { field: "n".into(), by: 1 }),
        Err(OperationError::NotACounter(field)) if field == "n"
    ));

    // A replica with the new life, the increment and the write over it, but not the creation:
    // the increment and the write are held back.
    let mut holder = Replica::new(3);
    holder.receive(&without_genesis);
    assert!(!holder.receive(&overwritten));
    let version = holder.record.version();
    assert!(matches!(
        holder.try_write(&Operation::Increment { field: "n".into(), by: 1 }),
        Err(OperationError::NotACounter(field)) if field == "n"
    ));
    assert_eq!(holder.record.version(), version, "a refused increment changed the record");
    holder.receive(&created);
    assert_same(&[&writer, &holder]);
}

#[test]
fn a_counter_recreated_after_a_delete_starts_from_zero_and_recreators_agree() {
    let mut first = Replica::new(1);
    first.write_changing(&Operation::Increment { field: "n".to_owned(), by: 5 });
    let mut second = first.fork(2);
    let mut third = first.fork(3);
    let delete = first.write_changing(&Operation::Delete);
    second.receive(&delete);
    third.receive(&delete);

    let one = second.write_changing(&Operation::Increment { field: "n".to_owned(), by: 2 });
    let two = third.write_changing(&Operation::Increment { field: "n".to_owned(), by: 4 });
    assert_exact(&second.value(), &object(json!({"n": 2})));
    for replica in [&mut first, &mut second, &mut third] {
        replica.receive(&one);
        replica.receive(&two);
        assert_exact(&replica.value(), &object(json!({"n": 6})));
    }
    assert_same(&[&first, &second, &third]);
}

/// A re-creator that never saw the counter's first genesis (the counter was created
/// concurrently with the delete) still agrees with one that did.
#[test]
fn counter_recreators_agree_even_when_one_never_saw_the_first_counter() {
    let mut first = Replica::new(1);
    first.write_changing(&Operation::Replace(object(json!({"other": 1}))));
    let mut second = first.fork(2);
    let mut third = first.fork(3);

    // The counter is created on `first` while `second` deletes the record.
    let creation = first.write_changing(&Operation::Increment { field: "n".to_owned(), by: 5 });
    let delete = second.write_changing(&Operation::Delete);
    first.receive(&delete);
    third.receive(&delete);
    // `first` has seen the creation (epoch 0), `third` has not; both re-create concurrently.
    let one = first.write_changing(&Operation::Increment { field: "n".to_owned(), by: 2 });
    let two = third.write_changing(&Operation::Increment { field: "n".to_owned(), by: 4 });
    for replica in [&mut first, &mut second, &mut third] {
        replica.receive(&creation);
        replica.receive(&delete);
        replica.receive(&one);
        replica.receive(&two);
    }
    assert_same(&[&first, &second, &third]);
    assert_exact(&first.value(), &object(json!({"n": 6})));
}

#[test]
fn an_integer_written_over_a_counter_is_an_increment_by_the_difference() {
    let mut first = Replica::new(1);
    first.write_changing(&Operation::Replace(object(json!({"name": "stock"}))));
    first.write_changing(&Operation::Increment { field: "n".to_owned(), by: 3 });
    let mut second = first.fork(2);
    let mut third = first.fork(3);

    let replace = first.write_changing(&Operation::Replace(object(json!({"name": "stock", "n": 10}))));
    assert_exact(&first.value(), &object(json!({"name": "stock", "n": 10})));
    let increment = second.write_changing(&Operation::Increment { field: "n".to_owned(), by: 5 });
    let patch = third.write_changing(&Operation::MergePatch(object(json!({"n": 1}))));
    for replica in [&mut first, &mut second, &mut third] {
        replica.receive(&replace);
        replica.receive(&increment);
        replica.receive(&patch);
    }
    // 3 + (10 - 3) + 5 + (1 - 3) = 13
    assert_exact(&first.value(), &object(json!({"name": "stock", "n": 13})));
    assert_same(&[&first, &second, &third]);
    assert!(first.view().conflicts.is_empty());

    // It is still a counter.
    first.write_changing(&Operation::Increment { field: "n".to_owned(), by: -13 });
    assert_exact(&first.value(), &object(json!({"name": "stock", "n": 0})));
}

#[test]
fn an_integer_field_becomes_a_counter_when_incremented() {
    let mut replica = Replica::new(1);
    replica.write_changing(&Operation::Replace(object(json!({"n": 40}))));
    replica.write_changing(&Operation::Increment { field: "n".to_owned(), by: 2 });
    assert_exact(&replica.value(), &object(json!({"n": 42})));
}

#[test]
fn incrementing_a_field_that_is_not_a_counter_is_refused() {
    let mut replica = Replica::new(1);
    replica.write_changing(&Operation::Replace(object(json!({
        "text": "seven",
        "float": 1.5,
        "whole_float": 2.0,
        "flag": true,
        "nothing": null,
        "object": {},
        "list": [1],
        "huge": u64::MAX,
    }))));
    let version = replica.record.version();
    for field in ["text", "float", "whole_float", "flag", "nothing", "object", "list", "huge"] {
        match replica.try_write(&Operation::Increment { field: field.to_owned(), by: 1 }) {
            Err(OperationError::NotACounter(name)) => assert_eq!(name, field),
            other => panic!("incrementing {field} gave {other:?}"),
        }
        assert_eq!(replica.record.version(), version);
    }
    for field in [String::new(), "x".repeat(FIELD_BYTES_MAX + 1)] {
        assert!(matches!(replica.try_write(&Operation::Increment { field, by: 1 }), Err(OperationError::FieldName)));
    }
    assert!(replica.try_write(&Operation::Increment { field: "x".repeat(FIELD_BYTES_MAX), by: 1 }).is_ok());
}

#[test]
fn a_counter_that_would_overflow_is_refused() {
    // Counters stay within ±2^53 (what JSON and JavaScript hold exactly), so even many replicas
    // incrementing concurrently cannot overflow the merged sum.
    let limit = crdt::json::COUNTER_MAGNITUDE_MAX;
    let mut replica = Replica::new(1);
    let refused = replica.try_write(&Operation::Increment { field: "n".to_owned(), by: i64::MAX });
    assert!(matches!(refused, Err(OperationError::Json(JsonError::CounterOverflow { .. }))), "{refused:?}");
    replica.write_changing(&Operation::Increment { field: "n".to_owned(), by: limit });
    let version = replica.record.version();
    let refused = replica.try_write(&Operation::Increment { field: "n".to_owned(), by: 1 });
    assert!(matches!(refused, Err(OperationError::Json(JsonError::CounterOverflow { .. }))), "{refused:?}");
    let refused = replica.try_write(&Operation::Replace(object(json!({"n": i64::MIN}))));
    assert!(matches!(refused, Err(OperationError::Json(JsonError::CounterOverflow { .. }))), "{refused:?}");
    assert_eq!(replica.record.version(), version);
    assert_exact(&replica.value(), &object(json!({"n": limit})));
}

// ---------------------------------------------------------------------------------------------
// 9. Three replicas, gossip in any order
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Step {
    Write {
        replica: usize,
        operation: Operation,
    },
    /// Delivers everything `from` holds to `to`, in the order `from` got it.
    Sync {
        from: usize,
        to: usize,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..3usize, operation()).prop_map(|(replica, operation)| Step::Write { replica, operation }),
        1 => (0..3usize, 0..3usize).prop_map(|(from, to)| Step::Sync { from, to }),
    ]
}

proptest! {
    #![proptest_config(config(1_000))]

    /// Random writes at random replicas, with partial syncs between them; then every change goes
    /// to every replica in a random order, with duplicates. All end identical.
    #[test]
    fn three_replicas_converge_whatever_the_delivery_order(
        steps in prop::collection::vec(step(), 1..16),
        seeds in prop::collection::vec(any::<u64>(), 3),
        duplicates in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let mut replicas: Vec<Replica> = (1..=3u8).map(Replica::new).collect();
        let mut held: Vec<Vec<Vec<u8>>> = vec![Vec::new(); 3];
        let mut all: Vec<Vec<u8>> = Vec::new();
        for step in &steps {
            match step {
                Step::Write { replica, operation } => {
                    if let Some(change) = replicas[*replica].write_lenient(operation) {
                        held[*replica].push(change.clone());
                        all.push(change);
                    }
                }
                Step::Sync { from, to } => {
                    for change in held[*from].clone() {
                        replicas[*to].receive(&change);
                        if !held[*to].contains(&change) {
                            held[*to].push(change);
                        }
                    }
                }
            }
        }
        for (replica, seed) in replicas.iter_mut().zip(&seeds) {
            let mut delivery = all.clone();
            for index in &duplicates {
                if !all.is_empty() {
                    delivery.push(index.get(&all).clone());
                }
            }
            shuffle(&mut delivery, *seed);
            replica.receive_all(&delivery);
        }
        let mut observer = Replica::new(4);
        let mut delivery = all.clone();
        delivery.reverse();
        observer.receive_all(&delivery);
        let loaded = Replica { record: Record::load(&replicas[0].record.save(), &[]).expect("a saved record loads"), ..Replica::new(5) };
        assert_same(&[&replicas[0], &replicas[1], &replicas[2], &observer, &loaded]);
    }
}

#[test]
fn changes_delivered_before_their_dependencies_are_kept() {
    let mut writer = Replica::new(1);
    let first = writer.write_changing(&Operation::Replace(object(json!({"a": 1}))));
    let second = writer.write_changing(&Operation::MergePatch(object(json!({"b": 2}))));
    // The counter's genesis change depends on nothing; the increment itself waits for `second`.
    let third = writer.write_changing(&Operation::Increment { field: "n".to_owned(), by: 3 });

    let mut reader = Replica::new(2);
    reader.receive(&third);
    assert!(!reader.receive(&second), "a change without its dependencies is not visible yet");
    assert!(!reader.receive(&second));
    assert_eq!(reader.value(), None);

    // Waiting changes survive save and load.
    let mut reloaded =
        Replica { record: Record::load(&reader.record.save(), &[]).expect("a saved record loads"), ..Replica::new(3) };
    for replica in [&mut reader, &mut reloaded] {
        assert!(replica.receive(&first));
        assert_exact(&replica.value(), &object(json!({"a": 1, "b": 2, "n": 3})));
    }
    assert_same(&[&writer, &reader, &reloaded]);
}

// ---------------------------------------------------------------------------------------------
// 10. Corrupt bytes
// ---------------------------------------------------------------------------------------------

/// A record with some history, for corrupting its bytes.
fn sample_record() -> (Replica, Vec<Vec<u8>>) {
    let mut replica = Replica::new(1);
    let changes = [
        Operation::Replace(object(json!({"name": "Ada", "list": [1, 2.5, "three"], "nested": {"a": null}}))),
        Operation::Increment { field: "n".to_owned(), by: 4 },
        Operation::MergePatch(object(json!({"name": "Ada Lovelace", "$x": true}))),
        Operation::Delete,
        Operation::Replace(object(json!({"revived": "yes"}))),
    ]
    .iter()
    .map(|operation| replica.write_changing(operation))
    .collect();
    (replica, changes)
}

/// Feeds `bytes` to `load` and to `apply_changes` on an empty and on a written record; nothing
/// may panic, `apply_changes` that fails leaves the record unchanged, and one that reports no
/// change leaves it reading the same (it may keep a change whose dependencies are missing).
fn feed(bytes: &[u8], target: &Replica) {
    if let Ok(loaded) = Record::load(bytes, &[]) {
        let _ = loaded.view();
        let _ = loaded.save();
    }
    if let Ok(loaded) = Record::load(&target.record.save(), &[bytes]) {
        let _ = loaded.view();
    }
    for mut record in [Record::new(), target.record.clone()] {
        let view = record.view().ok();
        let saved = record.save();
        match record.apply_changes_intact(bytes) {
            Ok(true) => {
                let _ = record.view();
                let _ = record.save();
            }
            Ok(false) => assert_eq!(record.view().ok(), view),
            Err(_) => {
                assert_eq!(record.view().ok(), view);
                assert_eq!(record.save(), saved);
            }
        }
        let _ = record.write(&record_key(), &OriginId([9; 16]), Timestamp::default(), &Operation::Delete);
    }
}

/// The fuzz harness's SHA-256 (FIPS 180-4) and chunk helpers, shared rather than copied: each
/// automerge chunk carries the first four bytes of the SHA-256 of its type, length and body, and
/// a wrong checksum stops the parser before the interesting decoding begins.
#[allow(dead_code, clippy::all)]
#[path = "../../fuzz/src/harness.rs"]
mod harness;

use harness::sha256;

const CHUNK_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

/// The chunks of automerge bytes, as `(start of the type byte, end of the body)`; stops at the
/// first thing that is not a chunk header.
fn chunk_bounds(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut bounds = Vec::new();
    let mut position = 0;
    while bytes.len() >= position + 9 && bytes[position..position + 4] == CHUNK_MAGIC {
        let header = position + 8;
        let mut length: u64 = 0;
        let mut cursor = header + 1;
        let mut shift = 0;
        loop {
            let Some(&byte) = bytes.get(cursor) else { return bounds };
            length |= u64::from(byte & 0x7f) << shift;
            cursor += 1;
            shift += 7;
            if byte & 0x80 == 0 || shift > 63 {
                break;
            }
        }
        let Some(end) = usize::try_from(length).ok().and_then(|length| cursor.checked_add(length)) else {
            return bounds;
        };
        if end > bytes.len() {
            return bounds;
        }
        bounds.push((header, end));
        position = end;
    }
    bounds
}

/// Recomputes every chunk checksum, so corrupted contents reach automerge's decoders.
fn reseal(bytes: &mut [u8], bounds: &[(usize, usize)]) {
    for &(header, end) in bounds {
        let digest = sha256(&bytes[header..end]);
        bytes[header - 4..header].copy_from_slice(&digest[..4]);
    }
}

#[test]
fn resealing_intact_bytes_changes_nothing() {
    assert_eq!(
        sha256(b"abc").iter().map(|byte| format!("{byte:02x}")).collect::<String>(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let (replica, changes) = sample_record();
    for bytes in [replica.record.save(), changes.concat()] {
        let bounds = chunk_bounds(&bytes);
        assert!(!bounds.is_empty());
        assert_eq!(bounds.last().map(|&(_, end)| end), Some(bytes.len()));
        let mut resealed = bytes.clone();
        reseal(&mut resealed, &bounds);
        assert_eq!(resealed, bytes);
    }
}

/// A saved record with one byte of its change columns flipped and its checksum fixed applies to
/// an empty record, and automerge 0.12 then panics in `save_after` on the next local write (the
/// corrupted-chunk property below found it). The write is an error and the record unchanged.
#[test]
fn a_write_on_a_document_automerge_panics_on_is_an_error_and_changes_nothing() {
    // What `prop::sample::Index::index` computes for the shrunk case.
    let index = |raw: u64, size: usize| ((size as u128 * raw as u128) >> 64) as usize;
    let raw = 6_703_325_032_249_645_806;
    let (replica, _) = sample_record();
    let mut bytes = replica.record.save();
    let bounds = chunk_bounds(&bytes);
    let (header, end) = bounds[index(raw, bounds.len())];
    bytes[header + 1 + index(raw, end - header - 1)] ^= 110;
    let corrupted_bounds = chunk_bounds(&bytes);
    reseal(&mut bytes, &corrupted_bounds);
    let mut record = Record::new();
    assert!(record.apply_changes_intact(&bytes).expect("automerge accepts the crafted bytes"));
    let version = record.version();
    let written = record.write(&record_key(), &OriginId([9; 16]), Timestamp::default(), &Operation::Delete);
    assert!(matches!(written, Err(OperationError::Damaged)), "{written:?}");
    assert_eq!(record.version(), version, "the failed write left no change behind");
    // Another write may go through (it touches other operations) or fail the same way, on a copy
    // again since the document was never proven; either way, never a panic.
    let patch = Operation::MergePatch(object(json!({"name": "Grace"})));
    match record.write(&record_key(), &OriginId([9; 16]), Timestamp::default(), &patch) {
        Ok(Some(_)) => assert_ne!(record.version(), version),
        Err(OperationError::Damaged) => assert_eq!(record.version(), version),
        other => panic!("{other:?}"),
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let (replica, _) = sample_record();
        feed(&bytes, &replica);
        // Garbage behind a valid chunk header, so the parser gets past the magic bytes.
        let saved = replica.record.save();
        let mut prefixed = saved[..saved.len().min(12)].to_vec();
        prefixed.extend_from_slice(&bytes);
        feed(&prefixed, &replica);
    }

    /// Corrupts the contents of real chunks and fixes their checksums, so the corruption reaches
    /// the column decoders.
    #[test]
    fn corrupted_and_resealed_chunks_never_panic(
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
        use_changes in any::<bool>(),
        prefix in any::<prop::sample::Index>(),
    ) {
        let (replica, changes) = sample_record();
        let mut bytes = if use_changes { changes.concat() } else { replica.record.save() };
        let bounds = chunk_bounds(&bytes);
        for (index, mask) in &flips {
            let (header, end) = bounds[index.index(bounds.len())];
            // Anywhere after the chunk type byte: the length and the body.
            let position = header + 1 + index.index(end - header - 1);
            bytes[position] ^= mask;
        }
        let corrupted_bounds = chunk_bounds(&bytes);
        reseal(&mut bytes, &corrupted_bounds);
        feed(&bytes, &Replica::new(2));
        feed(&bytes, &replica);
        // And behind intact changes: the valid prefix of a batch may apply.
        let mut behind = changes[..prefix.index(changes.len() + 1)].concat();
        behind.extend_from_slice(&bytes);
        feed(&behind, &Replica::new(2));
    }

    #[test]
    fn corrupted_documents_never_panic(
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
        use_changes in any::<bool>(),
    ) {
        let (replica, changes) = sample_record();
        let mut bytes = if use_changes { changes.concat() } else { replica.record.save() };
        for (index, mask) in &flips {
            let position = index.index(bytes.len());
            bytes[position] ^= mask;
        }
        feed(&bytes, &Replica::new(2));
        feed(&bytes, &replica);
    }
}

#[test]
fn truncated_documents_and_changes_never_panic() {
    let (replica, changes) = sample_record();
    let saved = replica.record.save();
    for length in 0..saved.len() {
        feed(&saved[..length], &replica);
        // A truncated saved document never loads as something else.
        if let Ok(loaded) = Record::load(&saved[..length], &[]) {
            assert!(loaded.version().is_empty() || loaded.version() == replica.record.version());
        }
    }
    let all = changes.concat();
    for length in 0..all.len() {
        feed(&all[..length], &Replica::new(2));
    }
}

#[test]
fn garbage_from_a_peer_leaves_the_record_unchanged() {
    let (mut replica, _) = sample_record();
    let view = replica.view();
    let saved = replica.record.save();
    for garbage in
        [&b"not automerge"[..], &[0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 1, 2, 3][..], &saved[..saved.len() / 2]]
    {
        if let Ok(changed) = replica.record.apply_changes_intact(garbage) {
            assert!(!changed);
        }
        assert_eq!(replica.view(), view);
    }
}

/// A first change by `actor` of `count` operations: a list and `count - 1` nulls appended to it.
/// automerge's run-length encoding makes it about a hundred bytes whatever the count.
fn declared_operations(count: u64, actor: u8) -> Vec<u8> {
    use automerge::legacy::{ElementId, Key, ObjectId, Op, OpId, OpType, SortedVec};
    let actor = automerge::ActorId::from([actor; 16]);
    let list = Op {
        action: OpType::Make(automerge::ObjType::List),
        obj: ObjectId::Root,
        key: Key::Map("list".into()),
        pred: SortedVec::new(),
        insert: false,
    };
    let elements = (2..=count).map(|counter| Op {
        action: OpType::Put(automerge::ScalarValue::Null),
        obj: ObjectId::Id(OpId::new(1, &actor)),
        key: Key::Seq(if counter == 2 { ElementId::Head } else { ElementId::Id(OpId::new(counter - 1, &actor)) }),
        pred: SortedVec::new(),
        insert: true,
    });
    let expanded = automerge::ExpandedChange {
        operations: std::iter::once(list).chain(elements).collect(),
        actor_id: actor,
        hash: None,
        seq: 1,
        start_op: std::num::NonZeroU64::MIN,
        time: 0,
        message: None,
        deps: Vec::new(),
        extra_bytes: Vec::new(),
        author: None,
    };
    automerge::Change::from(expanded).bytes().to_vec()
}

/// The `record_changes` fuzz target found that 70 bytes declaring eight million operations made
/// automerge allocate 3 GB. Bytes that declare more than `ITEMS_MAX` are refused before
/// automerge reads them, wherever they arrive; within the bound they load.
#[test]
fn bytes_declaring_more_operations_than_the_bound_are_refused_before_decoding() {
    let over = declared_operations(ITEMS_MAX + 1, 7);
    assert!(over.len() < 200, "run-length encoding keeps the change small: {} bytes", over.len());
    let refused = |result: Result<Record, RecordError>| matches!(result, Err(RecordError::Bound(BoundError::Items)));
    assert!(refused(Record::load(&over, &[])), "loaded as a saved document");
    assert!(refused(Record::load(&[], &[&over])), "loaded as an increment");
    let (mut replica, _) = sample_record();
    let view = replica.view();
    assert!(matches!(replica.record.apply_changes_intact(&over), Err(RecordError::Bound(BoundError::Items))));
    assert_eq!(replica.view(), view, "the refused bytes left the record as it was");
    assert_eq!(Record::first_change(&over), None);
    assert_eq!(Record::first_change_view(&over), None);

    // The parts of one load share the bound, and a record's own size counts against what is
    // applied to it.
    let half = declared_operations(ITEMS_MAX / 2 + 1, 7);
    let loaded = Record::load(&half, &[]).expect("half the bound loads");
    assert_eq!(loaded.items(), ITEMS_MAX / 2 + 2, "its operations and its change");
    assert!(refused(Record::load(&half, &[&half])), "two halves exceed the bound");
    let mut applied = Record::new();
    assert!(applied.apply_changes(&half).expect("half the bound applies"));
    let other = declared_operations(ITEMS_MAX / 2 + 1, 8);
    assert!(matches!(applied.apply_changes(&other), Err(RecordError::Bound(BoundError::Items))));
}

/// A local write may not grow a record past `RECORD_ITEMS_MAX`, half the decoding bound, so
/// every record a node writes loads again, with room for what other nodes write concurrently.
/// automerge deflates document columns past 256 bytes, and `Change::bytes` deflates a change
/// past 256 bytes into a compressed chunk (what another automerge implementation may send):
/// both pass the bound's inflating walk and load as the plain bytes do.
#[test]
fn deflated_changes_and_documents_load_under_the_bound() {
    let mut replica = Replica::new(1);
    let long = "concord ".repeat(20_000);
    let list: Vec<Value> = (0..5_000).map(|index| json!(index % 7)).collect();
    let change = replica.write_changing(&Operation::Replace(object(json!({ "long": long, "list": list }))));
    let compressed = automerge::Change::try_from(&change[..]).expect("a change").bytes().to_vec();
    assert_eq!(compressed[8], 2, "a compressed chunk");
    assert!(compressed.len() < long.len() / 10, "its contents are deflated: {} bytes", compressed.len());
    let saved = replica.record.save();
    assert!(saved.len() < long.len() / 10, "the document's columns are deflated: {} bytes", saved.len());
    for parts in [(&compressed[..], &[][..]), (&saved[..], &[][..]), (&[][..], &[&compressed[..]][..])] {
        let loaded = Record::load(parts.0, parts.1).expect("it loads");
        assert_eq!(loaded.view().expect("it reads"), replica.view());
    }
}

#[test]
fn a_write_that_would_grow_the_record_past_its_bound_is_refused_and_changes_nothing() {
    let mut replica = Replica::new(1);
    replica.record = Record::load(&declared_operations(RECORD_ITEMS_MAX - 20, 7), &[]).expect("it loads");
    let version = replica.record.version();
    let long = Operation::MergePatch(object(json!({ "long": vec![Value::Null; 20] })));
    assert!(matches!(replica.try_write(&long), Err(OperationError::RecordFull)));
    assert_eq!(replica.record.version(), version, "the refused write changed the record");
    let short = Operation::MergePatch(object(json!({ "short": vec![Value::Null; 10] })));
    replica.write_changing(&short);
    // The loaded list and its change, then the write: the causal length, a list and ten nulls,
    // and its change.
    assert_eq!(replica.record.items(), RECORD_ITEMS_MAX - 20 + 1 + 13);
}

/// A record's first replace writes its keys in one batch (automerge's hydrate insertion). One that
/// passes the up-front count but not the bound once the causal length and the change are counted
/// is rolled back like any other: the record stays empty, and the next write and a save and load
/// see nothing of it.
#[test]
fn a_first_replace_past_the_bound_rolls_back_its_batch() {
    let mut replica = Replica::new(1);
    let values = usize::try_from(RECORD_ITEMS_MAX).expect("fits") - 2;
    let list: Vec<Value> = (0..values).map(|index| json!(index % 3)).collect();
    let too_large = Operation::Replace(object(json!({ "list": list, "nested": {"a": [1, {"b": null}]} })));
    assert!(matches!(replica.try_write(&too_large), Err(OperationError::RecordFull)));
    assert_eq!(replica.record.items(), 0, "the batch was rolled back");
    assert!(replica.record.view().expect("it reads").value.is_none());
    replica.write_changing(&Operation::Replace(object(json!({"name": "Ada", "tags": ["a", {"b": -0.0}]}))));
    let expected = object(json!({"name": "Ada", "tags": ["a", {"b": -0.0}]}));
    assert_exact(&replica.view().value, &expected);
    let loaded = Record::load(&replica.record.save(), &[]).expect("it loads");
    assert_exact(&loaded.view().expect("it reads").value, &expected);
    // The causal length, the two fields, the list's two items and the nested map's member, and the change.
    assert_eq!(replica.record.items(), 1 + 2 + 2 + 1 + 1);
}

/// After its first replace a record answers views from the fields it was given (no read back).
/// That answer equals what automerge reads back, and it is dropped by anything that changes the
/// document: a concurrent change from a peer (whose conflict must show), or a later write.
#[test]
fn a_first_replace_answers_from_its_fields_until_the_record_changes() {
    let fields = object(json!({"name": "Ada", "score": -0.0, "big": u64::MAX, "tags": ["x", {"y": null}]}));
    let mut first = Replica::new(1);
    let mut second = Replica::new(2);
    let change = first.write_changing(&Operation::Replace(fields.clone()));
    let concurrent = second.write_changing(&Operation::Replace(object(json!({"name": "Grace"}))));
    let view = first.view();
    assert_exact(&view.value, &fields);
    assert!(view.conflicts.is_empty());
    let loaded = Record::load(&first.record.save(), &[]).expect("it loads").view().expect("it reads");
    assert_eq!((text(&loaded.value), loaded.version), (text(&view.value), view.version), "the same as read back");

    // A peer's concurrent first replace: both views show the same conflict on `name`.
    assert!(first.record.apply_changes(&concurrent).expect("it applies"));
    assert!(second.record.apply_changes(&change).expect("it applies"));
    let (merged, other) = (first.view(), second.view());
    assert_eq!(text(&merged.value), text(&other.value));
    assert_eq!(merged.version, other.version);
    assert_eq!(merged.conflicts.iter().map(|conflict| conflict.field.as_str()).collect::<Vec<_>>(), ["/name"]);

    // A later write on a fresh record reads back what it wrote, not the first fields.
    let mut third = Replica::new(3);
    third.write_changing(&Operation::Replace(object(json!({"a": 1}))));
    third.write_changing(&Operation::MergePatch(object(json!({"b": 2}))));
    assert_exact(&third.value(), &object(json!({"a": 1, "b": 2})));
}

/// A write with more values than a record may hold cannot succeed, whatever the record holds,
/// so it is refused before automerge does any work (about 8.5 µs per value in a release build).
#[test]
fn a_write_with_more_values_than_a_record_may_hold_is_refused_up_front() {
    let mut replica = Replica::new(1);
    let values = usize::try_from(RECORD_ITEMS_MAX).expect("fits") + 1;
    // The field's list and its values: one more than the bound.
    let list: Vec<Value> = (0..values - 1).map(|index| json!(index % 3)).collect();
    for operation in [
        Operation::Replace(object(json!({ "list": list.clone() }))),
        Operation::MergePatch(object(json!({ "list": list }))),
    ] {
        assert!(matches!(replica.try_write(&operation), Err(OperationError::RecordFull)));
    }
    assert!(replica.record.view().expect("it reads").value.is_none(), "nothing was written");
}

proptest! {
    #![proptest_config(config(256))]

    /// Reading a first change without building the record (how a node stores records new to it)
    /// agrees with building it: the same head and liveness, for every first write; and a
    /// creation by replace or merge patch takes that path. A second change never does: it has
    /// a dependency.
    #[test]
    fn a_first_change_read_without_building_matches_the_built_record(
        first in operation(),
        second in operation(),
    ) {
        let mut writer = Replica::new(1);
        let Ok(Some(change)) = writer.try_write(&first) else { return Ok(()) };
        let built = Record::load(&change, &[]).expect("a first change loads");
        match Record::first_change(&change) {
            Some(read) => {
                prop_assert_eq!(vec![read.head], built.heads());
                prop_assert_eq!(read.live, built.is_live());
            }
            None => prop_assert!(
                !matches!(first, Operation::Replace(_) | Operation::MergePatch(_)),
                "a creation by {:?} was not read as a first change", first
            ),
        }
        if let Ok(Some(next)) = writer.try_write(&second) {
            prop_assert_eq!(Record::first_change(&next), None);
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// A record that is one first change is served from the change's operations (a replica's
    /// feed and GETs of records new to it): the view equals the built record's, for any JSON
    /// the API accepts, and every creation by replace or merge patch takes that way.
    #[test]
    fn a_first_change_viewed_without_building_reads_as_the_built_record(
        fields in json_object(),
        patch in any::<bool>(),
    ) {
        let mut writer = Replica::new(1);
        let operation = if patch { Operation::MergePatch(fields) } else { Operation::Replace(fields) };
        let Some(change) = writer.write(&operation) else { return Ok(()) };
        let built = Record::load(&change, &[]).expect("a first change loads").view().expect("it reads");
        let viewed = Record::first_change_view(&change);
        prop_assert_eq!(viewed.as_ref(), Some(&built), "a creation by {:?}", operation);
    }
}

/// Builds one change with automerge directly, as any peer could send it: lists with elements
/// inserted at the head, in the middle and after later ones; every scalar type; a field of
/// another life; and nesting.
fn crafted_first_change(live: bool) -> Vec<u8> {
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ObjType, ROOT, ScalarValue};
    let mut document = AutoCommit::new().with_actor(automerge::ActorId::from([7_u8; 16]));
    let write = |document: &mut AutoCommit| -> Result<(), automerge::AutomergeError> {
        document.put(ROOT, "$cl", if live { 1_u64 } else { 2_u64 })?;
        let items = document.put_object(ROOT, "1:items", ObjType::List)?;
        document.insert(&items, 0, "a")?;
        document.insert(&items, 0, "b")?;
        document.insert(&items, 1, "c")?;
        document.insert(&items, 3, "d")?;
        document.insert(&items, 1, "e")?;
        let nested = document.insert_object(&items, 2, ObjType::Map)?;
        document.put(&nested, "deep", ScalarValue::F64(1.5))?;
        let inner = document.put_object(&nested, "list", ObjType::List)?;
        document.insert(&inner, 0, ScalarValue::Null)?;
        document.insert(&inner, 0, ScalarValue::Boolean(true))?;
        document.put(ROOT, "1:when", ScalarValue::Timestamp(1_700_000_000_000))?;
        document.put(ROOT, "1:count", ScalarValue::counter(41))?;
        document.put(ROOT, "1:bytes", ScalarValue::Bytes(vec![1, 2, 255]))?;
        document.put(ROOT, "1:big", ScalarValue::Uint(u64::MAX))?;
        document.put(ROOT, "1:nan", ScalarValue::F64(f64::NAN))?;
        document.put(ROOT, "1:", "an empty field name")?;
        document.put(ROOT, "0:old", "another life")?;
        document.put(ROOT, "$other", "not a field")?;
        Ok(())
    };
    write(&mut document).expect("the crafted change is valid");
    document.commit();
    document.get_last_local_change().expect("a change was made").raw_bytes().to_vec()
}

#[test]
fn a_first_change_with_every_shape_is_viewed_as_automerge_builds_it() {
    for live in [true, false] {
        let change = crafted_first_change(live);
        let built = Record::load(&change, &[]).expect("it loads").view().expect("it reads");
        assert_eq!(Record::first_change_view(&change), Some(built.clone()), "live: {live}");
        if live {
            let value = Value::Object(built.value.expect("a live record"));
            assert_eq!(value["items"], json!(["b", "e", {"deep": 1.5, "list": [true, null]}, "c", "a", "d"]));
            assert_eq!(value["count"], json!(41));
            assert_eq!(value["nan"], Value::Null);
            assert_eq!(value.get("old"), None);
        } else {
            assert_eq!(built.value, None);
        }
    }
}

#[test]
fn a_first_change_the_viewer_does_not_cover_is_left_to_automerge() {
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ObjType, ROOT};
    let mut with_text = AutoCommit::new();
    with_text.put(ROOT, "$cl", 1_u64).expect("put");
    let text = with_text.put_object(ROOT, "1:notes", ObjType::Text).expect("text");
    with_text.splice_text(&text, 0, 0, "hello").expect("splice");
    with_text.commit();
    let change = with_text.get_last_local_change().expect("a change").raw_bytes().to_vec();
    // Read or stored, a first change with what the reader does not cover goes the building way.
    assert_eq!(Record::first_change(&change), None, "text objects are built, not stored unbuilt");
    assert_eq!(Record::first_change_view(&change), None, "text objects are built, not read");
    let mut built = Record::new();
    assert!(built.apply_changes_intact(&change).expect("automerge applies it"));

    let mut writer = Replica::new(1);
    writer.write_changing(&Operation::Replace(object(json!({"name": "Ada"}))));
    let second = writer.write_changing(&Operation::Replace(object(json!({"name": "Grace"}))));
    assert_eq!(Record::first_change_view(&second), None, "a later change");
    assert_eq!(Record::first_change_view(b"not a change"), None, "garbage");
}

#[test]
fn bytes_that_are_not_one_first_change_are_not_read_as_one() {
    let mut writer = Replica::new(1);
    let first = writer.write_changing(&Operation::Replace(object(json!({"name": "Ada"}))));
    assert!(Record::first_change(&first).is_some());
    let mut two = first.clone();
    two.extend_from_slice(&first);
    assert_eq!(Record::first_change(&two), None, "two changes");
    assert_eq!(Record::first_change(&first[..first.len() - 1]), None, "cut short");
    let mut flipped = first.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    assert_eq!(Record::first_change(&flipped), None, "checksum");
    assert_eq!(Record::first_change(b""), None, "empty");
}
