//! The seed generator: writes the committed seed corpus `fuzz/corpus/<target>/` from real
//! messages made with Concord's own code (encoded envelopes, saved record documents and change
//! bytes, Yjs updates, JSON bodies, stored version vectors, store keys, operation scripts), and
//! checks each seed against its harness as it goes.
//!
//! Run from anywhere, on stable: `cargo run --manifest-path fuzz/Cargo.toml --example seeds`.
//! It overwrites the files it names and leaves every other file in the corpus alone.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use concord_fuzz::harness;
use crdt::clock::Timestamp;
use crdt::envelope::{DocumentKind, Envelope};
use crdt::identity::{NodeId, OriginId};
use crdt::key::RecordKey;
use crdt::record::{Operation, Record};
use crdt::text::{TextDocument, TextLimits};
use crdt::version_vector::VersionVector;
use serde_json::{Map, Value, json};
use yrs::types::xml::{XmlElementPrelim, XmlFragment, XmlTextPrelim};
use yrs::{Any, Array, ArrayPrelim, Doc, Map as _, MapPrelim, ReadTxn, StateVector, Text, TextPrelim, Transact};

/// Collects the seeds of one target and writes them.
struct Seeds {
    folder: PathBuf,
    run: fn(&[u8]),
    count: usize,
    bytes: usize,
}

impl Seeds {
    fn new(target: &str, run: fn(&[u8])) -> Seeds {
        let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
        fs::create_dir_all(&folder).expect("the corpus folder can be created");
        Seeds { folder, run, count: 0, bytes: 0 }
    }

    fn add(&mut self, name: &str, data: &[u8]) {
        (self.run)(data);
        fs::write(self.folder.join(name), data).expect("the seed can be written");
        self.count += 1;
        self.bytes += data.len();
    }

    fn report(&self) {
        println!("{:>4} seeds {:>8} bytes  {}", self.count, self.bytes, self.folder.display());
    }
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

fn key(collection: &str, id: &str) -> RecordKey {
    RecordKey::new(collection, id).expect("seed keys are valid")
}

fn timestamp(wall_ms: u64) -> Timestamp {
    Timestamp { wall_ms: 1_700_000_000_000 + wall_ms, logical: 0 }
}

/// Record writes as the engine makes them: (name, operation) in order, by two origins.
fn record_history() -> Vec<(&'static str, Operation)> {
    vec![
        (
            "replace",
            Operation::Replace(object(json!({"name": "ACME", "tags": ["a", "b"], "address": {"city": "Bern"}}))),
        ),
        ("merge-patch", Operation::MergePatch(object(json!({"address": {"zip": "3000", "city": null}, "price": 1.5})))),
        ("increment", Operation::Increment { field: "visits".into(), by: 3 }),
        ("increment-negative", Operation::Increment { field: "visits".into(), by: -10 }),
        ("delete", Operation::Delete),
        ("revive", Operation::Replace(object(json!({"name": "ACME 2", "n": -0.0, "big": u64::MAX})))),
    ]
}

fn main() {
    let mut record = Record::new();
    let record_key = key("orders", "o-1");
    let origins = [OriginId([7; 16]), OriginId([8; 16])];
    let mut changes: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut saved_after: Vec<(&str, Vec<u8>)> = Vec::new();
    for (index, (name, operation)) in record_history().into_iter().enumerate() {
        let change = record
            .write(&record_key, &origins[index % 2], timestamp(index as u64), &operation)
            .expect("seed writes succeed")
            .expect("seed writes change something");
        changes.push((name, change));
        saved_after.push((name, record.save()));
    }

    // envelope_decode: envelopes around real change bytes and a real Yjs update.
    let mut seeds = Seeds::new("envelope_decode", harness::envelope_decode);
    for (sequence, (name, change)) in changes.iter().enumerate() {
        let envelope = Envelope {
            origin: origins[sequence % 2],
            node: NodeId([1; 16]),
            sequence: sequence as u64 + 1,
            timestamp: timestamp(sequence as u64),
            key: record_key.clone(),
            kind: DocumentKind::Record,
            change: change.clone(),
        };
        seeds.add(&format!("record-{name}"), &envelope.encode());
    }
    let mut text = TextDocument::new(5);
    let update = text.insert_text("body", 0, "Grüße 🌍").expect("seed text edit");
    let text_envelope = Envelope {
        origin: OriginId([9; 16]),
        node: NodeId([2; 16]),
        sequence: u64::MAX,
        timestamp: Timestamp { wall_ms: u64::MAX, logical: u32::MAX },
        key: key("_notes", "ACME Corp — Zürich"),
        kind: DocumentKind::Text,
        change: update,
    };
    seeds.add("text-extremes", &text_envelope.encode());
    let empty = Envelope { change: Vec::new(), key: key("a", "b"), sequence: 0, ..text_envelope };
    seeds.add("empty-change", &empty.encode());
    seeds.report();

    // record_key: store keys as the engine writes them.
    let mut seeds = Seeds::new("record_key", harness::record_key);
    seeds.add("plain", &key("orders", "o-1").to_bytes());
    seeds.add("unicode-id", &key("customers", "ACME Corp — Zürich 🌍").to_bytes());
    seeds.add("system-collection", &key("_feed", "x.y-z").to_bytes());
    seeds.add("longest", &key(&"c".repeat(64), &"i".repeat(256)).to_bytes());
    seeds.add("prefix-only", b"orders\0");
    seeds.report();

    // record_changes: a mode byte (bit 0: recompute chunk checksums; bits 1-2: 0 load as a
    // document, 1 load as an increment after the base record, 2 apply_changes to the base
    // record), then real bytes.
    const LOAD: u8 = 0b001;
    const INCREMENT: u8 = 0b011;
    const APPLY: u8 = 0b101;
    let mut seeds = Seeds::new("record_changes", harness::record_changes);
    for (index, (name, change)) in changes.iter().enumerate() {
        let mode = if index % 2 == 0 { APPLY } else { INCREMENT };
        seeds.add(&format!("change-{name}"), &[&[mode][..], change].concat());
    }
    for (index, (name, saved)) in saved_after.iter().enumerate() {
        let mode = if index % 2 == 0 { LOAD } else { APPLY };
        seeds.add(&format!("saved-after-{name}"), &[&[mode][..], saved].concat());
    }
    let all: Vec<u8> = changes.iter().flat_map(|(_, change)| change.clone()).collect();
    seeds.add("changes-concatenated", &[&[APPLY][..], &all].concat());
    seeds.add("changes-concatenated-load", &[&[LOAD][..], &all].concat());
    seeds.add("saved-empty", &[LOAD]);
    // Changes made on top of the harness's base record, so they apply rather than wait.
    let (base, _) = harness::base_record();
    let mut on_base = base.clone();
    let follow_up = on_base
        .write(
            &harness::fuzz_key(),
            &OriginId([3; 16]),
            timestamp(50),
            &Operation::MergePatch(object(json!({"price": null, "new": [1, {"x": true}]}))),
        )
        .expect("seed write on the base succeeds")
        .expect("it changes something");
    seeds.add("change-on-base", &[&[APPLY][..], &follow_up].concat());
    seeds.add("change-on-base-increment", &[&[INCREMENT][..], &follow_up].concat());
    seeds.report();

    // record_convergence: scripts (see `harness::record_convergence` for the byte layout).
    let mut seeds = Seeds::new("record_convergence", harness::record_convergence);
    // Concurrent increments of "n" at all three replicas (+5, +7, -1), then full delivery. (With
    // +i64::MAX instead of -1 the sum overflows: `fuzz/regressions/record_convergence/`.)
    seeds.add("concurrent-increments", &[0, 5, 2, 4, 5, 1, 5, 2, 4, 7, 2, 5, 2, 2]);
    // r0 replaces {a: -118}; everyone syncs; r0 deletes while r1 patches {b: 1}; r2 syncs and
    // writes again after seeing the delete (a revival).
    seeds.add(
        "delete-wins-and-revival",
        &[0, 0, 1, 0, 2, 10, 21, 22, 23, 0, 4, 1, 2, 1, 1, 2, 129, 23, 2, 0, 1, 0, 8, 1],
    );
    // Concurrent writes of the same field by three replicas: a conflict everywhere.
    seeds.add("same-field-conflict", &[0, 0, 1, 0, 2, 1, 1, 0, 1, 0, 2, 2, 2, 2, 1, 0, 8, 2]);
    // Nested objects merged by patches at two replicas, with partial deliveries in between.
    seeds.add(
        "nested-merge",
        &[0, 0, 1, 1, 12, 1, 0, 2, 50, 15, 16, 17, 1, 2, 1, 1, 12, 1, 2, 8, 3, 2, 2, 1, 1, 12, 1, 6, 7, 4],
    );
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for (index, length) in [24usize, 48, 96, 160, 256].into_iter().enumerate() {
        let script: Vec<u8> = (0..length)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        seeds.add(&format!("random-{index}"), &script);
    }
    seeds.report();

    // text_update: real Yjs updates (v1) and state vectors.
    let mut seeds = Seeds::new("text_update", harness::text_update);
    let limits = TextLimits::default();
    let mut alice = TextDocument::new(100);
    let mut bob = TextDocument::new(200);
    let first = alice.insert_text("text", 0, "hello world").expect("seed edit");
    let concurrent = bob.insert_text("text", 0, "¡hola! ").expect("seed edit");
    bob.apply_update(&first, &limits).expect("seed apply");
    let after = bob.insert_text("text", 14, " 🌍").expect("seed edit");
    let deletion = bob.delete_text("text", 2, 4).expect("seed edit");
    seeds.add("insert", &first);
    seeds.add("insert-concurrent", &concurrent);
    seeds.add("insert-after-remote", &after);
    seeds.add("delete", &deletion);
    seeds.add("saved-state", &bob.save());
    seeds.add("state-vector", &bob.state_vector());
    let mut on_base = TextDocument::load(300, harness::base_text(), &[], &limits).expect("the base loads");
    seeds.add("insert-into-base", &on_base.insert_text("text", 3, "XYZ").expect("seed edit"));
    seeds.add("delete-in-base", &on_base.delete_text("text", 0, 2).expect("seed edit"));
    for (index, update) in yrs_updates().iter().enumerate() {
        seeds.add(&format!("yrs-{index}"), update);
    }
    seeds.report();

    // json_operations: request bodies.
    let mut seeds = Seeds::new("json_operations", harness::json_operations);
    seeds.add("simple", br#"{"name":"ACME","active":true,"score":12,"note":null}"#);
    seeds.add(
        "numbers",
        br#"{"int":-9223372036854775808,"uint":18446744073709551615,"float":1.0,"negzero":-0.0,"tiny":5e-324,"huge":1.7976931348623157e308}"#,
    );
    seeds.add(
        "nested",
        br#"{"address":{"city":"Bern","geo":[46.9,7.4]},"tags":["a",["b",{"c":null}]],"empty":{},"list":[]}"#,
    );
    seeds.add("keys", br#"{"":1,"a/b":2,"~0":3,"$cl":4,"1:x":5,"\u00e9\ud83c\udf0d":"\u0000"}"#);
    seeds.add("patch-nulls", br#"{"a":null,"b":{"c":null,"d":{"e":null,"f":1}},"g":[null]}"#);
    seeds.add("duplicate-keys", br#"{"a":1,"a":{"b":2}}"#);
    seeds.add("depth-64", nested_object(63).as_bytes());
    seeds.add("depth-65", nested_object(64).as_bytes());
    seeds.add("not-an-object", b"[1,2,3]");
    seeds.report();

    // version_vector: a length byte, a stored version vector, then an insert script.
    let mut seeds = Seeds::new("version_vector", harness::version_vector);
    let mut vector = VersionVector::new();
    for sequence in [1, 2, 3, 5, 9, 10, 11] {
        vector.insert(OriginId([1; 16]), sequence);
    }
    vector.insert(OriginId([2; 16]), 4);
    let meta = rmp_serde::to_vec(&vector).expect("a version vector encodes");
    assert!(meta.len() < 256, "the seed meta fits the length byte");
    seeds.add("holes", &[&[meta.len() as u8][..], &meta, &[0, 4, 3, 7, 9, 8, 12, 3, 1, 6, 0]].concat());
    seeds.add("empty-then-inserts", &[0, 0, 1, 0, 3, 0, 2, 4, 1, 10, 0, 0, 0, 0, 0, 0, 0, 9, 13, 0]);
    let empty = rmp_serde::to_vec(&VersionVector::new()).expect("a version vector encodes");
    seeds.add("empty-meta", &[&[empty.len() as u8][..], &empty].concat());
    seeds.report();
}

/// A JSON object whose field nests `levels` objects deep: `{"a":{"a":...{"a":0}...}}`.
fn nested_object(levels: usize) -> String {
    let mut text = String::from("{\"a\":");
    for _ in 0..levels {
        text.push_str("{\"a\":");
    }
    text.push('0');
    text.push_str(&"}".repeat(levels + 1));
    text
}

fn any_value(json: &str) -> Any {
    Any::from_json(json).expect("seed JSON parses")
}

/// Updates made with yrs itself, as a Yjs client would send them: formatted text and embeds,
/// maps and arrays with nested values, nested shared types, XML, deletions, and the whole state.
fn yrs_updates() -> Vec<Vec<u8>> {
    let doc = Doc::with_client_id(11);
    let mut updates = Vec::new();
    let text = doc.get_or_insert_text("text");
    let map = doc.get_or_insert_map("map");
    let array = doc.get_or_insert_array("array");
    let fragment = doc.get_or_insert_xml_fragment("xml");
    let mut step = |change: &dyn Fn(&mut yrs::TransactionMut<'_>)| {
        let mut txn = doc.transact_mut();
        change(&mut txn);
        updates.push(txn.encode_update_v1());
    };
    step(&|txn| text.insert(txn, 0, "hello world, héllo 🌍"));
    step(&|txn| {
        let bold: HashMap<Arc<str>, Any> = HashMap::from([("bold".into(), Any::Bool(true))]);
        text.insert_with_attributes(txn, 5, " there", bold);
        text.insert_embed(txn, 2, any_value(r#"{"image":{"src":"a.png","size":[1,2]}}"#));
    });
    step(&|txn| text.remove_range(txn, 1, 3));
    step(&|txn| {
        map.insert(txn, "number", 42);
        map.insert(txn, "float", 1.5);
        map.insert(txn, "string", "value");
        map.insert(txn, "nested", any_value(r#"{"a":{"b":{"c":[1,[2,[3,{"d":"e"}]]]}},"list":[true,false,null]}"#));
        map.insert(txn, "buffer", Any::Buffer(Arc::from(vec![1u8, 2, 3].as_slice())));
    });
    step(&|txn| {
        array.insert_range(txn, 0, [any_value("1"), any_value(r#"[[[]]]"#), any_value("\"s\"")]);
        let inner = array.insert(txn, 1, MapPrelim::default());
        let list = inner.insert(txn, "list", ArrayPrelim::default());
        list.insert(txn, 0, TextPrelim::new("inner text"));
    });
    step(&|txn| {
        array.remove_range(txn, 0, 2);
        map.remove(txn, "float");
    });
    step(&|txn| {
        let paragraph = fragment.insert(txn, 0, XmlElementPrelim::empty("p"));
        paragraph.insert(txn, 0, XmlTextPrelim::new("xml text"));
    });
    updates.push(doc.transact().encode_state_as_update_v1(&StateVector::default()));
    updates
}
