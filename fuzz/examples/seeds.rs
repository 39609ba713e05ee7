//! The seed generator: writes the committed seed corpus `fuzz/corpus/<target>/` from real
//! messages made with Concord's own code (encoded envelopes, saved record documents and change
//! bytes, Yjs updates, JSON bodies, stored version vectors, store keys, operation scripts,
//! replication messages, stored document entries, HTTP request bodies), and
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
use crdt::replica::{LogFloors, Message, SnapshotRecord};
use crdt::text::{TextDocument, TextLimits};
use crdt::version_vector::VersionVector;
use serde_bytes::ByteBuf;
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
    // Bytes that `Record::load_applying` answers for in the places the harness puts them (see
    // `harness::check_load_applying`) that the seeds above do not reach: a change to the base's
    // first change alone, a change concurrent with the base's follow-up, and a delete.
    let stored = harness::stored_base();
    let mut on_first = Record::load(&stored.first, &[]).expect("the base's first change loads");
    let after_first = on_first
        .write(
            &harness::fuzz_key(),
            &OriginId([3; 16]),
            timestamp(51),
            &Operation::MergePatch(object(json!({"name": "ACME 1", "address": {"zip": "8000"}}))),
        )
        .expect("seed write on the first change succeeds")
        .expect("it changes something");
    seeds.add("load-applying-change-to-first", &[&[APPLY][..], &after_first].concat());
    // Concurrent with the stored base's follow-up, over the same fields: conflicts after it.
    let mut on_base = base.clone();
    let concurrent = on_base
        .write(
            &harness::fuzz_key(),
            &OriginId([3; 16]),
            timestamp(52),
            &Operation::MergePatch(object(json!({"name": "ACME 4", "fuzz": {"x": 1}}))),
        )
        .expect("seed write on the base succeeds")
        .expect("it changes something");
    seeds.add("load-applying-concurrent", &[&[INCREMENT][..], &concurrent].concat());
    // A delete: the record is live before it and deleted after, so liveness at the heads before
    // differs from liveness after (three minutes of fuzzing without this seed never got there).
    let mut on_base = base.clone();
    let delete = on_base
        .write(&harness::fuzz_key(), &OriginId([3; 16]), timestamp(53), &Operation::Delete)
        .expect("seed delete on the base succeeds")
        .expect("it changes something");
    seeds.add("load-applying-delete", &[&[APPLY][..], &delete].concat());
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

    // replica_messages: scripts around real messages (see `harness::replica_messages`).
    let envelopes: Vec<Envelope> = changes
        .iter()
        .enumerate()
        .map(|(index, (_, change))| Envelope {
            origin: OriginId([1; 16]),
            node: NodeId([1; 16]),
            sequence: index as u64 + 1,
            timestamp: timestamp(index as u64),
            key: key("fuzz", "a"),
            kind: DocumentKind::Record,
            change: change.clone(),
        })
        .collect();
    let saved_record = saved_after.last().map(|(_, saved)| saved.clone()).unwrap_or_default();
    let snapshot_record =
        SnapshotRecord { key: key("fuzz", "b"), kind: DocumentKind::Record, parts: vec![ByteBuf::from(saved_record)] };
    let mut held = VersionVector::new();
    for sequence in 1..=3 {
        held.insert(OriginId([1; 16]), sequence);
    }
    let mut seeds = Seeds::new("replica_messages", harness::replica_messages);
    let summary = |version_vector: VersionVector, credit: u32| Message::Summary {
        version_vector,
        credit,
        snapshots: 0,
        receiving: false,
        epoch: 1,
    };
    // A new peer holding nothing: it is bootstrapped with a snapshot, reports credit, catches up.
    seeds.add(
        "bootstrap-a-new-peer",
        &Script::new(0x3f, 5, 2)
            .connect()
            .message(0, &summary(VersionVector::new(), 16))
            .message(0, &Message::Credit { envelopes: 8, durable: vec![], epoch: 1 })
            .message(0, &summary(held.clone(), 16))
            .durable(255)
            .bytes,
    );
    // A peer sends real changes, the node makes them durable and relays them to another peer.
    seeds.add(
        "changes-relayed",
        &Script::new(0x2f, 2, 0)
            .connect()
            .connect()
            .message(0, &summary(held.clone(), 16))
            .message(1, &summary(held.clone(), 16))
            .message(0, &Message::Changes { envelopes: envelopes.clone() })
            .durable(255)
            .message(1, &Message::Credit { envelopes: 4, durable: vec![(OriginId([1; 16]), 4)], epoch: 1 })
            .local_write()
            .timeout(200)
            .bytes,
    );
    // A snapshot arrives whole (records, then its end) and is made durable.
    seeds.add(
        "snapshot-received",
        &Script::new(0x1f, 0, 0)
            .connect()
            .message(0, &summary(held.clone(), 16))
            .message(0, &Message::Snapshot { snapshot: 1, records: vec![snapshot_record.clone()] })
            .message(0, &Message::SnapshotEnd { snapshot: 1, records: 1, version_vector: held.clone() })
            .durable(255)
            .durable(255)
            .bytes,
    );
    // A snapshot whose end counts more records than came: dropped, and a summary says so.
    seeds.add(
        "snapshot-incomplete",
        &Script::new(0x1f, 1, 0)
            .connect()
            .message(0, &Message::Snapshot { snapshot: 2, records: vec![snapshot_record.clone(); 2] })
            .message(0, &Message::SnapshotEnd { snapshot: 2, records: 5, version_vector: held.clone() })
            .bytes,
    );
    // A peer sends more than two windows of changes: refused, then it is unknown.
    seeds.add(
        "credit-overrun",
        &Script::new(0x10, 0, 0)
            .connect()
            .message(0, &Message::Changes { envelopes: envelopes.clone() })
            .message(0, &Message::Changes { envelopes: envelopes.clone() })
            .message(0, &Message::Peers { addresses: vec!["127.0.0.1:7001".into()] })
            .bytes,
    );
    // The largest sequences: a change at u64::MAX, made durable, and a snapshot end claiming it.
    // (The peer grants no credit here: with credit, the core sends the change back to the very
    // peer that holds it, `regressions/replica_messages/resends-u64-max-to-a-peer-that-holds-it`.)
    let mut everything = VersionVector::new();
    everything.insert(OriginId([1; 16]), u64::MAX);
    let mut last = envelopes[0].clone();
    last.sequence = u64::MAX;
    seeds.add(
        "u64-max-sequences",
        &Script::new(0x3f, 3, 1)
            .connect()
            .message(0, &Message::Changes { envelopes: vec![last] })
            .durable(255)
            .message(0, &Message::SnapshotEnd { snapshot: 0, records: 0, version_vector: everything })
            .trim(0, 3)
            .timeout(255)
            .bytes,
    );
    // The log is trimmed, so a peer that lacks the trimmed changes gets a snapshot.
    seeds.add(
        "trimmed-log-snapshot",
        &Script::new(0x3f, 6, 3).trim(0, 4).connect().message(0, &summary(VersionVector::new(), 16)).bytes,
    );
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for (index, length) in [32usize, 96, 256].into_iter().enumerate() {
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

    // stored_documents: document entries with increments as the engine stores them, meta values
    // and a change-log entry.
    let mut seeds = Seeds::new("stored_documents", harness::stored_documents);
    let (_, first_change) = &changes[0];
    let record_saved = &saved_after[2].1;
    let later: Vec<&[u8]> = changes[3..].iter().map(|(_, change)| change.as_slice()).collect();
    seeds.add("record-saved-and-increments", &stored_document(DocumentKind::Record, record_saved, &later));
    seeds.add("record-new", &stored_document(DocumentKind::Record, &[], &[first_change]));
    seeds.add("record-saved", &stored_document(DocumentKind::Record, &saved_after[5].1, &[]));
    let mut stored_text = TextDocument::new(42);
    let first_update = stored_text.insert_text("text", 0, "stored text").expect("seed text edit");
    let text_saved = stored_text.save();
    let second_update = stored_text.insert_text("text", 6, " and more").expect("seed text edit");
    let third_update = stored_text.delete_text("text", 0, 3).expect("seed text edit");
    seeds.add(
        "text-saved-and-increments",
        &stored_document(DocumentKind::Text, &text_saved, &[&second_update, &third_update]),
    );
    seeds.add("text-new", &stored_document(DocumentKind::Text, &[], &[&first_update]));
    seeds.add("text-created-empty", &stored_document(DocumentKind::Text, &TextDocument::new(1).save(), &[]));
    seeds.add("meta-version-vector", &[&[1][..], &rmp_serde::to_vec(&vector).expect("encodes")].concat());
    let floors: LogFloors = [(OriginId([1; 16]), 4), (OriginId([2; 16]), u64::MAX)].into_iter().collect();
    seeds.add("meta-log-floors", &[&[2][..], &rmp_serde::to_vec(&floors).expect("encodes")].concat());
    seeds.add("log-entry", &[&[3][..], &envelopes[1].encode()].concat());
    seeds.report();

    // http_bodies: an endpoint byte (0 PUT, 1 PATCH, 2 increment, modulo 3; 0xff a batch) and a
    // request body.
    let mut seeds = Seeds::new("http_bodies", harness::http_bodies);
    seeds.add("put", &body(0, br#"{"name":"ACME","visits":3,"tags":["a"],"nested":{"x":null}}"#));
    seeds.add("patch", &body(1, br#"{"name":null,"visits":7,"address":{"city":"Basel","zip":null}}"#));
    seeds.add("increment", &body(2, br#"{"field":"visits","by":5}"#));
    seeds.add("increment-default", &body(2, br#"{"field":"new counter"}"#));
    seeds.add("increment-integer-field", &body(2, br#"{"field":"n","by":-9007199254740985}"#));
    seeds.add("increment-not-a-counter", &body(2, br#"{"field":"name","by":1}"#));
    seeds.add("increment-overflow", &body(2, br#"{"field":"visits","by":9007199254740992}"#));
    seeds.add("increment-by-float", &body(2, br#"{"field":"visits","by":1.0}"#));
    seeds.add("increment-by-u64", &body(2, br#"{"field":"visits","by":18446744073709551615}"#));
    seeds.add("increment-no-field", &body(2, br#"{"by":1}"#));
    seeds.add("increment-empty-field", &body(2, br#"{"field":""}"#));
    seeds.add("not-an-object", &body(0, b"[1,2]"));
    seeds.add("null", &body(1, b"null"));
    seeds.add("string", &body(2, br#""visits""#));
    seeds.add("malformed", &body(0, br#"{"a":"#));
    seeds.add("patch-deep", &[&[1][..], nested_object(64).as_bytes()].concat());
    // 0xff: POST /v1/batch.
    seeds.add(
        "batch",
        &body(
            0xff,
            br#"[{"op":"put","collection":"c","id":"1","value":{"a":1}},{"op":"patch","collection":"c","id":"1","value":{"a":null}},{"op":"increment","collection":"c","id":"2","field":"n","by":2},{"op":"delete","collection":"c","id":"3"}]"#,
        ),
    );
    seeds.add("batch-bad-write", &body(0xff, br#"[{"op":"put","collection":"c","id":"1"}]"#));
    seeds.report();

    pgoutput_seeds();
}

/// `pgoutput_decode`: every message kind as PostgreSQL sends it, with values of each mapped type.
fn pgoutput_seeds() {
    use crdt::capture::pgoutput::{Column, Datum, Message as Pg, Relation, Tuple, encode};
    let mut seeds = Seeds::new("pgoutput_decode", harness::pgoutput_decode);
    let column = |key: bool, name: &str, type_oid: u32| Column { key, name: name.into(), type_oid, type_modifier: -1 };
    let relation = Relation {
        id: 16_385,
        namespace: "public".into(),
        name: "customers".into(),
        replica_identity: b'f',
        columns: vec![
            column(true, "id", 23),
            column(false, "name", 25),
            column(false, "score", 1700),
            column(false, "tags", 1009),
            column(false, "profile", 3802),
            column(false, "active", 16),
            column(false, "since", 1184),
        ],
    };
    let text = |value: &str| Datum::Text(value.into());
    let row = |id: &str, name: &str| {
        Tuple(vec![
            text(id),
            text(name),
            text("12.50"),
            text(r#"{vip,"a, b",NULL,"say \"hi\""}"#),
            text(r#"{"tier": "gold", "visits": [1, 2.5, null]}"#),
            text("t"),
            text("2026-11-23 10:00:00+00"),
        ])
    };
    let mut toasted = row("1", "Ada");
    toasted.0[4] = Datum::UnchangedToast;
    toasted.0[3] = Datum::Null;
    let messages = [
        ("begin", Pg::Begin { final_lsn: 0x16B_3748, commit_time: 786_000_000_000, transaction: 731 }),
        ("commit", Pg::Commit { commit_lsn: 0x16B_3748, end_lsn: 0x16B_3778, commit_time: 786_000_000_000 }),
        ("origin", Pg::Origin { commit_lsn: 7, name: "site-b".into() }),
        ("relation", Pg::Relation(relation)),
        ("type", Pg::Type { id: 16_400, namespace: "public".into(), name: "mood".into() }),
        ("insert", Pg::Insert { relation: 16_385, new: row("1", "Ada Lovelace") }),
        ("update-full", Pg::Update { relation: 16_385, key: None, old: Some(row("1", "Ada")), new: toasted }),
        (
            "update-key",
            Pg::Update { relation: 16_385, key: Some(row("1", "Ada")), old: None, new: row("2", "Zürich ☕") },
        ),
        ("update-plain", Pg::Update { relation: 16_385, key: None, old: None, new: row("3", "-0.000") }),
        ("delete", Pg::Delete { relation: 16_385, old: row("1", "Ada") }),
        ("truncate", Pg::Truncate { relations: vec![16_385, 16_390], cascade: true, restart_identity: true }),
        (
            "message",
            Pg::Message { transactional: true, lsn: 99, prefix: "concord.apply".into(), content: b"hq".to_vec() },
        ),
    ];
    for (name, message) in &messages {
        seeds.add(name, &encode(message));
    }
    seeds.report();
}

/// A `replica_messages` script, step by step (the layout is on `harness::replica_messages`).
struct Script {
    bytes: Vec<u8>,
}

impl Script {
    /// Settings byte, `local` changes of the node's own in its log, `records` stored documents.
    fn new(settings: u8, local: u8, records: u8) -> Script {
        // settings, chunk bytes (16 << 7), then the node's own changes, each with a key byte
        let mut bytes = vec![settings, 7, local];
        bytes.extend((0..local).map(|index| index % 4));
        bytes.push(records);
        for index in 0..records {
            // key, kind (record), one part of four bytes
            bytes.extend([index, 1, 1, 4, 0x85, 0x6f, 0x4a, 0x83]);
        }
        Script { bytes }
    }

    fn step(mut self, step: u8, peer: u8, arguments: &[u8]) -> Script {
        self.bytes.extend([step, peer]);
        self.bytes.extend_from_slice(arguments);
        self
    }

    fn connect(self) -> Script {
        self.step(0, 0, &[])
    }

    /// A real message from peer number `peer`, through `Message::decode`.
    fn message(self, peer: u8, message: &Message) -> Script {
        let encoded = message.encode();
        let length = u16::try_from(encoded.len()).expect("a seed message fits the 2-byte length");
        self.step(8, peer, &[&length.to_be_bytes()[..], &encoded].concat())
    }

    fn durable(self, count: u8) -> Script {
        self.step(9, 0, &[count])
    }

    fn local_write(self) -> Script {
        self.step(10, 0, &[1])
    }

    fn timeout(self, fiftieths: u8) -> Script {
        self.step(11, 0, &[fiftieths])
    }

    fn trim(self, origin: u8, floor: u8) -> Script {
        self.step(12, 0, &[origin, floor])
    }
}

/// An `http_bodies` input: the endpoint byte, then the body.
fn body(endpoint: u8, text: &[u8]) -> Vec<u8> {
    [&[endpoint][..], text].concat()
}

/// A `stored_documents` input for a document entry and its increments.
fn stored_document(kind: DocumentKind, saved: &[u8], increments: &[&[u8]]) -> Vec<u8> {
    let entry = harness::encode_document_entry(kind, saved);
    let mut bytes = vec![0];
    bytes.extend(u16::try_from(entry.len()).expect("a seed entry fits").to_be_bytes());
    bytes.extend(entry);
    bytes.push(increments.len() as u8);
    for increment in increments {
        bytes.extend(u16::try_from(increment.len()).expect("a seed increment fits").to_be_bytes());
        bytes.extend_from_slice(increment);
    }
    bytes
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
