//! Two real engines (each with its own sled store on disk) exchanging change envelopes by hand:
//! the path replication will drive. Applying an envelope twice is a no-op, both sides converge to
//! the same digest, concurrent same-field writes show as conflicts, and bad bytes are refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::num::NonZeroUsize;
use std::sync::Arc;

use concord::engine::{self, EngineHandle, EngineSettings};
use concord::metrics::Metrics;
use crdt::envelope::Envelope;
use crdt::key::RecordKey;
use crdt::record::Operation;
use serde_json::{Value, json};

fn object(value: Value) -> serde_json::Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

async fn start(directory: &std::path::Path, name: &str) -> EngineHandle {
    let store = store::Store::open(directory).expect("open store");
    let settings = EngineSettings {
        name: Some(name.into()),
        cache_documents: NonZeroUsize::new(64).expect("non-zero"),
        text_limits: Default::default(),
    };
    let (engine, _thread) = engine::start(store, settings, Arc::new(Metrics::default())).expect("engine");
    engine
}

async fn write(engine: &EngineHandle, id: &str, operation: Operation) -> Envelope {
    let key = RecordKey::new("orders", id).unwrap();
    let outcome = engine.call(move |engine| engine.write_record(key, operation)).await.unwrap().unwrap();
    outcome.envelope.expect("the write changed something")
}

async fn apply(engine: &EngineHandle, envelope: Envelope) -> bool {
    engine.call(move |engine| engine.apply_envelope(envelope)).await.unwrap().unwrap()
}

async fn status(engine: &EngineHandle) -> engine::Status {
    engine.call(|engine| engine.status()).await.unwrap()
}

#[tokio::test]
async fn envelopes_converge_two_engines_and_apply_once() {
    let first_directory = tempfile::tempdir().unwrap();
    let second_directory = tempfile::tempdir().unwrap();
    let first = start(first_directory.path(), "first").await;
    let second = start(second_directory.path(), "second").await;

    let base = write(&first, "o1", Operation::Replace(object(json!({"status": "new", "qty": 1})))).await;
    assert!(apply(&second, base.clone()).await);
    assert!(!apply(&second, base.clone()).await, "the same envelope twice is a no-op");
    assert_eq!(status(&first).await.digest, status(&second).await.digest);

    // Concurrent: different fields on each side, and the same field with different values.
    let from_first = write(&first, "o1", Operation::MergePatch(object(json!({"status": "paid", "note": "a"})))).await;
    let from_second = write(&second, "o1", Operation::MergePatch(object(json!({"status": "shipped", "qty": 2})))).await;
    assert!(apply(&second, from_first).await);
    assert!(apply(&first, from_second).await);

    let (first_status, second_status) = (status(&first).await, status(&second).await);
    assert_eq!(first_status.digest, second_status.digest, "converged");
    assert_eq!(first_status.record_count, 1);
    assert_eq!(second_status.version_vector, first_status.version_vector);

    let key = RecordKey::new("orders", "o1").unwrap();
    let read = |engine: &EngineHandle| {
        let key = key.clone();
        let engine = engine.clone();
        async move { engine.call(move |engine| engine.read_record(key)).await.unwrap().unwrap().unwrap().view }
    };
    let (first_view, second_view) = (read(&first).await, read(&second).await);
    assert_eq!(first_view, second_view);
    let value = first_view.value.unwrap();
    assert_eq!((value["note"].clone(), value["qty"].clone()), (json!("a"), json!(2)), "different fields both survive");
    assert_eq!(first_view.conflicts.len(), 1);
    assert_eq!(first_view.conflicts[0].field, "/status");
    let mut values = first_view.conflicts[0].values.clone();
    values.sort_by_key(|value| value.to_string());
    assert_eq!(values, vec![json!("paid"), json!("shipped")]);
}

#[tokio::test]
async fn envelopes_with_bad_bytes_are_refused_and_store_nothing() {
    let directory = tempfile::tempdir().unwrap();
    let source_directory = tempfile::tempdir().unwrap();
    let engine = start(directory.path(), "target").await;
    let source = start(source_directory.path(), "source").await;
    let mut envelope = write(&source, "o1", Operation::Replace(object(json!({"a": 1})))).await;
    envelope.change = vec![0x85, 0x6f, 0x4a, 0x83, 1, 2, 3];
    let before = status(&engine).await;
    let error = engine.call(move |engine| engine.apply_envelope(envelope)).await.unwrap().unwrap_err();
    assert!(error.to_string().contains("does not apply"), "{error}");
    let after = status(&engine).await;
    assert_eq!(
        (after.digest, after.feed_sequence, after.version_vector),
        (before.digest, before.feed_sequence, before.version_vector)
    );
}
