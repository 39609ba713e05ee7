//! Two real engines (each with its own sled store on disk) exchanging change envelopes by hand:
//! the path replication will drive. Applying an envelope twice is a no-op, both sides converge to
//! the same digest, concurrent same-field writes show as conflicts, and bad bytes are refused.
//! The audit trail names who made and who delivered each change, and retention never trims a
//! log that does not verify.
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
    start_with_retention(directory, name, engine::LOG_RETENTION_DEFAULT).await
}

async fn start_with_retention(
    directory: &std::path::Path,
    name: &str,
    log_retention: std::time::Duration,
) -> EngineHandle {
    start_with(directory, name, |settings| settings.log_retention = log_retention).await
}

/// An engine with the tests' settings (a small cache, summaries every 100 ms) changed by
/// `adjust`, and the node's timer: anti-entropy summaries when due.
async fn start_with(directory: &std::path::Path, name: &str, adjust: impl FnOnce(&mut EngineSettings)) -> EngineHandle {
    start_counted(directory, name, adjust, Arc::new(Metrics::default())).await
}

/// [`start_with`], counting in `metrics`.
async fn start_counted(
    directory: &std::path::Path,
    name: &str,
    adjust: impl FnOnce(&mut EngineSettings),
    metrics: Arc<Metrics>,
) -> EngineHandle {
    let store = store::Store::open(directory).expect("open store");
    let mut settings = EngineSettings {
        name: Some(name.into()),
        cache_documents: NonZeroUsize::new(64).expect("non-zero"),
        replication: crdt::replica::Settings {
            summary_interval: std::time::Duration::from_millis(100),
            ..Default::default()
        },
        ..EngineSettings::default()
    };
    adjust(&mut settings);
    let (engine, _thread) = engine::start(store, settings, metrics).expect("engine");
    let ticking = engine.clone();
    tokio::spawn(async move {
        while ticking.submit(|engine| engine.replication_tick()).await.is_ok() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    });
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

/// The fields of the conflict ledger's entries, oldest first.
async fn ledger_fields(engine: &EngineHandle) -> Vec<String> {
    let (entries, _) = engine.call(|engine| engine.conflicts_page(None, 0, 100)).await.unwrap().unwrap();
    entries.into_iter().map(|(_, entry)| entry.field).collect()
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

/// A peer change that does not apply leaves its record as it was, both when the record is built
/// from the store for the apply and when it is only in the batch so far (the store does not
/// have it yet, so its document must not be thrown away: an engine that applied in place and
/// dropped the document on error would lose it; tried in session 17, see BENCHMARKS.md).
#[tokio::test]
async fn a_refused_change_leaves_its_record_as_it_was_whether_built_from_the_store_or_the_batch() {
    let source_directory = tempfile::tempdir().unwrap();
    let source = start(source_directory.path(), "source").await;
    let first = write(&source, "o1", Operation::Replace(object(json!({"a": 1})))).await;
    let second = write(&source, "o1", Operation::MergePatch(object(json!({"b": 2})))).await;
    let mut bad = second.clone();
    bad.change = vec![0x85, 0x6f, 0x4a, 0x83, 1, 2, 3];
    let key = first.key.clone();
    // In one engine job: apply `staged` (if any), offer `bad`, then read the record.
    let refused_then_read = |target: EngineHandle, staged: Option<Envelope>| {
        let (bad, key) = (bad.clone(), key.clone());
        async move {
            target
                .call(move |engine| {
                    if let Some(staged) = staged {
                        engine.apply_envelope(staged).unwrap();
                    }
                    let refused = engine.apply_envelope(bad).is_err();
                    let read = engine.read_record(key).map(|read| read.and_then(|read| read.view.value));
                    (refused, read.map(|value| value.map(Value::Object)))
                })
                .await
                .unwrap()
        }
    };

    // In the batch: the record is staged (unbuilt) and refused a change in the same job.
    let directory = tempfile::tempdir().unwrap();
    let target = start(directory.path(), "in-batch").await;
    let (refused, value) = refused_then_read(target, Some(first.clone())).await;
    assert!(refused);
    assert_eq!(value.unwrap(), Some(json!({"a": 1})), "a record only in the batch survives a refused change");

    // From the store: committed, then refused a change, read, and changed by a good one.
    let directory = tempfile::tempdir().unwrap();
    let target = start(directory.path(), "from-store").await;
    assert!(apply(&target, first).await);
    let (refused, value) = refused_then_read(target.clone(), None).await;
    assert!(refused);
    assert_eq!(value.unwrap(), Some(json!({"a": 1})), "a record built from the store survives a refused change");
    assert!(apply(&target, second).await);
    let read = target.call(move |engine| engine.read_record(key)).await.unwrap().unwrap();
    assert_eq!(read.and_then(|read| read.view.value).map(Value::Object), Some(json!({"a": 1, "b": 2})));
}

/// A field's conflict is recorded in the ledger once: a later change to another field of the
/// same record leaves the conflict as it was and records nothing (the signatures before and
/// after the change are equal; the engine reads the ones before only when there are conflicts
/// after).
#[tokio::test]
async fn a_conflict_is_recorded_once_although_later_changes_to_other_fields_arrive() {
    let directories: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let first = start(directories[0].path(), "first").await;
    let second = start(directories[1].path(), "second").await;
    let target = start(directories[2].path(), "target").await;
    let created = write(&first, "o1", Operation::Replace(object(json!({"status": "new"})))).await;
    assert!(apply(&second, created.clone()).await);
    assert!(apply(&target, created).await);
    let paid = write(&first, "o1", Operation::MergePatch(object(json!({"status": "paid"})))).await;
    let cancelled = write(&second, "o1", Operation::MergePatch(object(json!({"status": "cancelled"})))).await;
    assert!(apply(&target, paid).await);
    assert!(apply(&target, cancelled).await);
    assert_eq!(ledger_fields(&target).await, ["/status"]);

    // Another field, written after `paid` but concurrent with `cancelled`: status stays in
    // conflict, with the same values, and the ledger gains nothing.
    let quantity = write(&first, "o1", Operation::MergePatch(object(json!({"qty": 3})))).await;
    assert!(apply(&target, quantity).await);
    let key = RecordKey::new("orders", "o1").unwrap();
    let read = target.call(move |engine| engine.read_record(key)).await.unwrap().unwrap().unwrap();
    assert_eq!(read.view.value.as_ref().unwrap()["qty"], json!(3));
    assert_eq!(read.view.conflicts.len(), 1, "{:?}", read.view.conflicts);
    assert_eq!(ledger_fields(&target).await, ["/status"]);
}

/// The same, on a node that holds the record only as bytes each time a change arrives (a cache
/// of one document, and another record read in between): each change is applied by loading the
/// record with it (`Record::load_applying`), and the conflict signatures before it are read at
/// the record's old heads. The conflict is recorded once, and the node's digest agrees with a
/// node that applied the same changes to the record built in its cache.
#[tokio::test]
async fn a_conflict_is_recorded_once_on_a_record_rebuilt_with_each_change() {
    let directories: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let first = start(directories[0].path(), "first").await;
    let second = start(directories[1].path(), "second").await;
    let metrics = Arc::new(Metrics::default());
    let one_document = |settings: &mut EngineSettings| settings.cache_documents = NonZeroUsize::MIN;
    let target = start_counted(directories[2].path(), "target", one_document, metrics.clone()).await;
    // Another record, built (a first change alone is read without building): a read of it
    // pushes `o1` out of the target's cache.
    let other = write(&first, "o2", Operation::Replace(object(json!({"other": true})))).await;
    let other_patch = write(&first, "o2", Operation::MergePatch(object(json!({"patched": true})))).await;
    for engine in [&second, &target] {
        assert!(apply(engine, other.clone()).await);
        assert!(apply(engine, other_patch.clone()).await);
    }
    let evict = |target: &EngineHandle| {
        let target = target.clone();
        async move {
            let key = RecordKey::new("orders", "o2").unwrap();
            target.call(move |engine| engine.read_record(key)).await.unwrap().unwrap().expect("o2 is held");
        }
    };
    let created = write(&first, "o1", Operation::Replace(object(json!({"status": "new"})))).await;
    assert!(apply(&second, created.clone()).await);
    assert!(apply(&target, created).await);
    let paid = write(&first, "o1", Operation::MergePatch(object(json!({"status": "paid"})))).await;
    let cancelled = write(&second, "o1", Operation::MergePatch(object(json!({"status": "cancelled"})))).await;
    evict(&target).await;
    assert!(apply(&target, paid.clone()).await);
    evict(&target).await;
    assert!(apply(&target, cancelled).await);
    assert_eq!(ledger_fields(&target).await, ["/status"]);
    let quantity = write(&first, "o1", Operation::MergePatch(object(json!({"qty": 3})))).await;
    evict(&target).await;
    assert!(apply(&target, quantity.clone()).await);
    assert_eq!(ledger_fields(&target).await, ["/status"], "the conflict was there before the change");
    // `o2`'s patch, and each change to `o1`, loaded with the record.
    assert_eq!(metrics.records_rebuilt_with_change.get(), 4);

    assert!(apply(&second, paid).await);
    assert!(apply(&second, quantity).await);
    let (second_status, target_status) = (status(&second).await, status(&target).await);
    assert_eq!(second_status.digest, target_status.digest.clone(), "rebuilt as the cached record was changed");
    let key = RecordKey::new("orders", "o1").unwrap();
    let read = target.call(move |engine| engine.read_record(key)).await.unwrap().unwrap().unwrap();
    assert_eq!(read.view.value.as_ref().unwrap()["qty"], json!(3));
    assert_eq!(read.view.conflicts.len(), 1, "{:?}", read.view.conflicts);
}

/// Delivers one engine's messages to other engines' job queues in order, as the transport's
/// one stream per peer does.
struct Wire {
    /// For each peer id the sender uses: a queue to a task that hands frames to the engine it
    /// reaches, under the peer id that engine uses for the sender.
    routes: std::collections::BTreeMap<u64, tokio::sync::mpsc::UnboundedSender<Vec<u8>>>,
}

impl Wire {
    fn new(routes: std::collections::BTreeMap<u64, (EngineHandle, u64)>) -> Wire {
        let routes = routes
            .into_iter()
            .map(|(peer, (engine, back))| {
                let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
                tokio::spawn(async move {
                    while let Some(bytes) = receiver.recv().await {
                        let _ = engine
                            .call(move |engine| {
                                engine.handle_peer_frame(back, concord::replication::PeerFrame::read(&bytes))
                            })
                            .await;
                    }
                });
                (peer, sender)
            })
            .collect();
        Wire { routes }
    }
}

impl concord::replication::Outbound for Wire {
    fn send(&mut self, peer: u64, bytes: Vec<u8>) -> bool {
        self.routes.get(&peer).is_some_and(|route| route.send(bytes).is_ok())
    }

    fn disconnect(&mut self, peer: u64, reason: &str) {
        panic!("peer {peer} disconnected: {reason}");
    }

    /// The in-memory wire is fixed by the test; exchanged addresses are not dialed.
    fn connect(&mut self, _address: std::net::SocketAddr) {}
}

/// Connects engines along `links` (pairs of indexes); peer ids are the other engine's index.
async fn wire(engines: &[EngineHandle], links: &[(usize, usize)]) {
    for (index, engine) in engines.iter().enumerate() {
        let mut routes = std::collections::BTreeMap::new();
        for &(first, second) in links {
            if first == index {
                routes.insert(second as u64, (engines[second].clone(), index as u64));
            } else if second == index {
                routes.insert(first as u64, (engines[first].clone(), index as u64));
            }
        }
        let wire = Wire::new(routes);
        engine.call(move |engine| engine.set_outbound(Box::new(wire))).await.unwrap();
    }
    for &(first, second) in links {
        for (this, other) in [(first, second), (second, first)] {
            let info = concord::replication::PeerInfo {
                node_id: engines[other].identity.node.to_string(),
                name: format!("engine-{other}"),
                address: "memory".into(),
            };
            engines[this].call(move |engine| engine.handle_peer_connected(other as u64, info)).await.unwrap();
        }
    }
    // Frames travel on spawned tasks, so wait until each side has handled the other's first
    // summary: a write made before that could reach a peer judged brand new, which is sent a
    // snapshot instead of the changes (under load, the audit test saw exactly that).
    for &(first, second) in links {
        for (this, other) in [(first, second), (second, first)] {
            let name = format!("engine-{other}");
            let mut heard = false;
            for _ in 0..3_000 {
                heard = status(&engines[this])
                    .await
                    .peers
                    .iter()
                    .any(|peer| peer.info.name == name && peer.connected && peer.traffic.bytes_received > 0);
                if heard {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            assert!(heard, "engine-{this} never heard from {name}");
        }
    }
}

async fn wait_for_equal_digests(engines: &[EngineHandle]) -> Vec<engine::Status> {
    for _ in 0..3_000 {
        let mut statuses = Vec::new();
        for engine in engines {
            statuses.push(status(engine).await);
        }
        if statuses
            .windows(2)
            .all(|pair| pair[0].digest == pair[1].digest && pair[0].version_vector == pair[1].version_vector)
        {
            return statuses;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let mut report = String::new();
    for engine in engines {
        let status = status(engine).await;
        let peers = engine.call(|engine| engine.peer_statuses()).await.unwrap();
        report.push_str(&format!(
            "\n{} digest {} vv {} peers {:?}",
            status.name, status.digest, status.version_vector, peers
        ));
    }
    panic!("engines did not converge within the hang guard:{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_engines_replicate_concurrent_writes_and_converge() {
    let directories: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut engines = Vec::new();
    for (index, directory) in directories.iter().enumerate() {
        engines.push(start(directory.path(), &format!("engine-{index}")).await);
    }
    wire(&engines, &[(0, 1), (1, 2), (0, 2)]).await;

    let mut writers = Vec::new();
    for (index, engine) in engines.iter().enumerate() {
        let engine = engine.clone();
        writers.push(tokio::spawn(async move {
            for round in 0..100 {
                write(
                    &engine,
                    &format!("shared-{}", round % 10),
                    Operation::MergePatch(object(json!({ format!("from{index}"): round, "same": index }))),
                )
                .await;
                let key = RecordKey::new("orders", "counter").unwrap();
                engine
                    .call(move |engine| engine.write_record(key, Operation::Increment { field: "n".into(), by: 1 }))
                    .await
                    .unwrap()
                    .unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let statuses = wait_for_equal_digests(&engines).await;
    assert_eq!(statuses[0].record_count, 11);
    let key = RecordKey::new("orders", "counter").unwrap();
    for engine in &engines {
        let key = key.clone();
        let read = engine.call(move |engine| engine.read_record(key)).await.unwrap().unwrap().unwrap();
        assert_eq!(read.view.value.unwrap()["n"], json!(300), "every increment on every engine counts once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_engines_converges_through_the_middle_one() {
    let directories: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut engines = Vec::new();
    for (index, directory) in directories.iter().enumerate() {
        engines.push(start(directory.path(), &format!("engine-{index}")).await);
    }
    // Before wiring, the ends write; then only 0–1 and 1–2 are linked.
    write(&engines[0], "left", Operation::Replace(object(json!({"side": "left"})))).await;
    write(&engines[2], "right", Operation::Replace(object(json!({"side": "right"})))).await;
    wire(&engines, &[(0, 1), (1, 2)]).await;
    write(&engines[0], "later", Operation::Replace(object(json!({"n": 1})))).await;
    let statuses = wait_for_equal_digests(&engines).await;
    assert_eq!(statuses[2].record_count, 3);
}

async fn read_value(engine: &EngineHandle, id: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let key = RecordKey::new("orders", id).unwrap();
    engine.call(move |engine| engine.read_record(key)).await.unwrap().unwrap().and_then(|read| read.view.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_engine_bootstraps_from_documents_not_history() {
    let directories: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let engines = vec![start(directories[0].path(), "engine-0").await, start(directories[1].path(), "engine-1").await];
    // 200 changes to 5 records, a deleted record, and a text.
    for round in 0..200 {
        write(&engines[0], &format!("order-{}", round % 5), Operation::Increment { field: "n".into(), by: 1 }).await;
    }
    write(&engines[0], "gone", Operation::Replace(object(json!({"a": 1})))).await;
    write(&engines[0], "gone", Operation::Delete).await;
    let text_key = RecordKey::new("notes", "readme").unwrap();
    let mut text = crdt::text::TextDocument::new(7);
    let update = text.insert_text("body", 0, "hello").unwrap();
    engines[0].call(move |engine| engine.apply_text_update(text_key, update)).await.unwrap().unwrap();

    wire(&engines, &[(0, 1)]).await;
    let statuses = wait_for_equal_digests(&engines).await;
    assert_eq!(statuses[1].record_count, 6);
    assert_eq!(read_value(&engines[1], "order-3").await.unwrap()["n"], json!(40));
    assert_eq!(read_value(&engines[1], "gone").await, None, "the delete came with the document");
    let text_key = RecordKey::new("notes", "readme").unwrap();
    let plain = engines[1].call(move |engine| engine.text_plain(text_key, "body".into())).await.unwrap().unwrap();
    assert_eq!(plain.as_deref(), Some("hello"));

    // Documents crossed, not the 203 changes, and the new engine knows its log lacks them.
    let peers = engines[0].call(|engine| engine.peer_statuses()).await.unwrap();
    assert_eq!(peers[0].traffic.snapshot_records_sent, 7);
    assert_eq!(peers[0].traffic.changes_sent, 0);
    let origin = statuses[0].origin.clone();
    let floors = engines[1].call(|engine| engine.log_floors()).await.unwrap();
    assert_eq!(
        floors.iter().map(|(origin, floor)| (origin.to_string(), *floor)).collect::<Vec<_>>(),
        vec![(origin, 204)]
    );
    // The feed of the new engine shows each document once, from the snapshot.
    let events = engines[1].call(|engine| engine.feed_page(0, 100)).await.unwrap().unwrap();
    assert_eq!(events.len(), 7);
    assert!(events.iter().all(|event| event.origin_sequence == 0));

    // Later writes on either side travel as changes.
    write(&engines[1], "order-0", Operation::Increment { field: "n".into(), by: 5 }).await;
    write(&engines[0], "order-1", Operation::Increment { field: "n".into(), by: 5 }).await;
    wait_for_equal_digests(&engines).await;
    assert_eq!(read_value(&engines[0], "order-0").await.unwrap()["n"], json!(45));
    assert_eq!(read_value(&engines[1], "order-1").await.unwrap()["n"], json!(45));
    let peers = engines[0].call(|engine| engine.peer_statuses()).await.unwrap();
    assert_eq!((peers[0].traffic.snapshot_records_sent, peers[0].traffic.changes_sent), (7, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_trims_the_log_and_a_peer_behind_it_is_bootstrapped() {
    let directories: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let retention = std::time::Duration::from_millis(500);
    let engines = vec![
        start_with_retention(directories[0].path(), "engine-0", retention).await,
        start(directories[1].path(), "engine-1").await,
    ];
    wire(&engines, &[(0, 1)]).await;
    for round in 0..20 {
        write(&engines[0], &format!("order-{}", round % 4), Operation::Increment { field: "n".into(), by: 1 }).await;
    }
    wait_for_equal_digests(&engines).await;
    // Engine 1 goes away; engine 0 writes on.
    for (engine, other) in [(&engines[0], 1), (&engines[1], 0)] {
        engine.call(move |engine| engine.handle_peer_disconnected(other)).await.unwrap();
    }
    for round in 0..20 {
        write(&engines[0], &format!("order-{}", round % 4), Operation::Increment { field: "n".into(), by: 1 }).await;
    }
    write(&engines[1], "order-9", Operation::Replace(object(json!({"offline": true})))).await;
    // Past the retention period every change of engine 0 is trimmed (the ticker runs trimming).
    let origin = status(&engines[0]).await.origin;
    let mut trimmed = false;
    for _ in 0..500 {
        let floors = engines[0].call(|engine| engine.log_floors()).await.unwrap();
        if floors.iter().any(|(floor_origin, floor)| floor_origin.to_string() == origin && *floor == 41) {
            trimmed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(trimmed, "the log was not trimmed within the hang guard");
    let remaining = engines[0]
        .call(|engine| {
            let origin = engine.identity().origin;
            engine.store().log_range(origin.as_bytes(), 1, 100).unwrap().len()
        })
        .await
        .unwrap();
    assert_eq!(remaining, 0);

    // Back together: engine 1 lacks changes below the floor, so it gets documents; its own
    // offline write flows out as a change.
    for (engine, other) in [(&engines[0], 1u64), (&engines[1], 0)] {
        let info = concord::replication::PeerInfo {
            node_id: other.to_string(),
            name: format!("engine-{other}"),
            address: "memory".into(),
        };
        engine.call(move |engine| engine.handle_peer_connected(other, info)).await.unwrap();
    }
    wait_for_equal_digests(&engines).await;
    assert_eq!(read_value(&engines[1], "order-2").await.unwrap()["n"], json!(10));
    assert_eq!(read_value(&engines[0], "order-9").await.unwrap()["offline"], json!(true));
    let peers = engines[0].call(|engine| engine.peer_statuses()).await.unwrap();
    assert_eq!(peers[0].traffic.snapshot_records_sent, 4, "a snapshot of each of its documents");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_text_exists_on_every_replica_before_its_first_edit() {
    let directories: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let engines = vec![start(directories[0].path(), "engine-0").await, start(directories[1].path(), "engine-1").await];
    wire(&engines, &[(0, 1)]).await;
    write(&engines[1], "o1", Operation::Replace(object(json!({"a": 1})))).await;
    let key = RecordKey::new("notes", "empty").unwrap();
    let created = engines[0].call(move |engine| engine.create_text(key)).await.unwrap().unwrap();
    assert!(created);
    let statuses = wait_for_equal_digests(&engines).await;
    assert_eq!((statuses[0].record_count, statuses[1].record_count), (2, 2));
    let key = RecordKey::new("notes", "empty").unwrap();
    let plain = engines[1].call(move |engine| engine.text_plain(key, "body".into())).await.unwrap().unwrap();
    assert_eq!(plain.as_deref(), Some(""), "the empty text exists on the other replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_changed_in_a_batch_survive_eviction_from_a_tiny_cache() {
    // With one cached document, every group commit of concurrent writes to several records
    // evicts documents that have uncommitted changes; they must come back with those changes.
    let directory = tempfile::tempdir().unwrap();
    let store = store::Store::open(directory.path()).expect("open store");
    let settings = EngineSettings {
        name: Some("tiny".into()),
        cache_documents: NonZeroUsize::new(1).expect("non-zero"),
        ..EngineSettings::default()
    };
    let (engine, _thread) = engine::start(store, settings, Arc::new(Metrics::default())).expect("engine");
    let mut writers = Vec::new();
    for writer in 0..32 {
        let engine = engine.clone();
        writers.push(tokio::spawn(async move {
            for round in 0..40 {
                let key = RecordKey::new("orders", &format!("r{}", (writer + round) % 8)).unwrap();
                let increment = Operation::Increment { field: "n".into(), by: 1 };
                engine.call(move |engine| engine.write_record(key, increment)).await.unwrap().unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let mut total = 0;
    for record in 0..8 {
        let value = read_value(&engine, &format!("r{record}")).await.expect("the record reads");
        total += value["n"].as_i64().unwrap();
    }
    assert_eq!(total, 32 * 40, "every acknowledged increment counts once");
}

/// Found by fuzzing (`fuzz/regressions/text_update/save-load-reorders-text`): the save of this
/// accepted update reloads to the same digest with the root text reordered. Compaction must
/// refuse that save (it compares readings as well as digests), so the text reads the same after
/// compaction and after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_whose_save_reads_reordered_is_not_compacted() {
    let directory = tempfile::tempdir().unwrap();
    let settings = || EngineSettings {
        name: Some("compacting".into()),
        cache_documents: NonZeroUsize::new(64).expect("non-zero"),
        text_limits: Default::default(),
        replication: Default::default(),
        log_retention: engine::LOG_RETENTION_DEFAULT,
        ..EngineSettings::default()
    };
    let key = RecordKey::new("docs", "reordered").unwrap();
    let update = include_bytes!("../fuzz/regressions/text_update/save-load-reorders-text").to_vec();
    let metrics = Arc::new(Metrics::default());
    let (engine, thread) =
        engine::start(store::Store::open(directory.path()).unwrap(), settings(), metrics.clone()).expect("engine");
    let read = |engine: &EngineHandle| {
        let (engine, key) = (engine.clone(), key.clone());
        async move { engine.call(move |engine| engine.text_plain(key, "text".into())).await.unwrap().unwrap() }
    };
    let changed = {
        let key = key.clone();
        engine.call(move |engine| engine.apply_text_update(key, update)).await.unwrap().unwrap()
    };
    assert!(changed);
    let before = read(&engine).await.expect("the text exists");

    // Enough further updates (to another root) to queue the document for compaction.
    let mut author = crdt::text::TextDocument::new(99);
    for index in 0..engine::INCREMENTS_COMPACT_AT {
        let edit = author.insert_text("title", index, "x").unwrap();
        let key = key.clone();
        assert!(engine.call(move |engine| engine.apply_text_update(key, edit)).await.unwrap().unwrap());
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while metrics.compactions.get() + metrics.compactions_refused.get() == 0 {
        assert!(std::time::Instant::now() < deadline, "the document was never compacted");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Refused, perhaps more than once: a refused document is queued again by its next update.
    assert!(metrics.compactions_refused.get() >= 1);
    assert_eq!(metrics.compactions.get(), 0, "a save that reads reordered replaced the increments");
    assert_eq!(read(&engine).await.as_deref(), Some(before.as_str()));

    drop(engine);
    thread.join().unwrap().unwrap();
    let (engine, _thread) =
        engine::start(store::Store::open(directory.path()).unwrap(), settings(), Arc::new(Metrics::default()))
            .expect("engine");
    assert_eq!(read(&engine).await.as_deref(), Some(before.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_larger_than_a_snapshot_record_travels_in_pieces() {
    // Nine updates of about a megabyte each: over the 8 MiB a snapshot record carries.
    let directories: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let engines = vec![start(directories[0].path(), "engine-0").await, start(directories[1].path(), "engine-1").await];
    let mut text = crdt::text::TextDocument::new(7);
    let chunk = "abcdefghij".repeat(100_000);
    for index in 0..9u32 {
        let update = text.insert_text("body", index * 1_000_000, &chunk).unwrap();
        let key = RecordKey::new("notes", "large").unwrap();
        engines[0].call(move |engine| engine.apply_text_update(key, update)).await.unwrap().unwrap();
    }
    wire(&engines, &[(0, 1)]).await;
    wait_for_equal_digests(&engines).await;
    let key = RecordKey::new("notes", "large").unwrap();
    let plain = engines[1].call(move |engine| engine.text_plain(key, "body".into())).await.unwrap().unwrap();
    assert_eq!(plain.map(|plain| plain.len()), Some(9_000_000));
    let peers = engines[0].call(|engine| engine.peer_statuses()).await.unwrap();
    assert!(peers[0].traffic.snapshot_records_sent >= 2, "one document, several records: {:?}", peers[0].traffic);
}

async fn start_with_yrs(directory: &std::path::Path, name: &str) -> EngineHandle {
    start_with(directory, name, |settings| settings.yrs_collections = ["events".to_owned()].into_iter().collect()).await
}

async fn write_event(engine: &EngineHandle, id: &str, operation: Operation) -> Result<bool, engine::EngineError> {
    let key = RecordKey::new("events", id).unwrap();
    engine.call(move |engine| engine.write_record(key, operation)).await.unwrap().map(|outcome| outcome.changed)
}

async fn read_event(engine: &EngineHandle, id: &str) -> Option<serde_json::Value> {
    let key = RecordKey::new("events", id).unwrap();
    let read = engine.call(move |engine| engine.read_record(key)).await.unwrap().unwrap();
    read.and_then(|read| read.view.value).map(serde_json::Value::Object)
}

/// A collection declared on the yrs record engine: writes, concurrent patches and deletes on
/// three engines converge to the same values and digests, counters are refused, the documents
/// are yrs documents (a node on the automerge engine would refuse them as the wrong kind), they
/// compact, reload after a restart, and bootstrap a new engine from snapshots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_on_the_yrs_engine_replicates_compacts_and_bootstraps() {
    let directories: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut engines = Vec::new();
    for (index, directory) in directories.iter().take(3).enumerate() {
        engines.push(start_with_yrs(directory.path(), &format!("engine-{index}")).await);
    }
    wire(&engines, &[(0, 1), (1, 2), (0, 2)]).await;
    let mut writers = Vec::new();
    for (index, engine) in engines.iter().enumerate() {
        let engine = engine.clone();
        writers.push(tokio::spawn(async move {
            for round in 0..100 {
                let patch = json!({ format!("from{index}"): round, "same": index, "nested": {"round": round} });
                write_event(&engine, &format!("shared-{}", round % 10), Operation::MergePatch(object(patch)))
                    .await
                    .expect("write");
            }
            write_event(&engine, &format!("own-{index}"), Operation::Replace(object(json!({"by": index}))))
                .await
                .expect("write");
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    write_event(&engines[0], "own-0", Operation::Delete).await.expect("delete");
    let statuses = wait_for_equal_digests(&engines).await;
    assert_eq!(statuses[0].record_count, 12, "10 shared, 3 own, 1 deleted");
    for engine in &engines {
        assert_eq!(read_event(engine, "own-0").await, None);
        assert_eq!(read_event(engine, "own-2").await, Some(json!({"by": 2})));
        let shared = read_event(engine, "shared-3").await.expect("live");
        assert_eq!(shared, read_event(&engines[0], "shared-3").await.unwrap(), "every engine reads the same");
        for index in 0..3 {
            assert_eq!(shared[format!("from{index}")], json!(93), "each engine's own field survives");
        }
        assert!(matches!(shared["same"].as_u64(), Some(0..=2)));
    }
    // No counters on this engine: a clear refusal, and nothing changes.
    let refused = write_event(&engines[1], "shared-1", Operation::Increment { field: "n".into(), by: 1 }).await;
    assert!(refused.unwrap_err().to_string().contains("no counters"));

    // 10 writes to each shared record per engine: 30 increments each, and 70 more compact them.
    for round in 0..70 {
        write_event(&engines[0], "shared-5", Operation::MergePatch(object(json!({"late": round})))).await.unwrap();
    }
    wait_for_equal_digests(&engines).await;

    // A new engine joins and is bootstrapped from documents.
    let joiner = start_with_yrs(directories[3].path(), "engine-3").await;
    let mut all = engines.clone();
    all.push(joiner.clone());
    wire(&all, &[(0, 3)]).await;
    let statuses = wait_for_equal_digests(&[engines[0].clone(), joiner.clone()]).await;
    assert_eq!(statuses[1].record_count, 12);
    assert_eq!(read_event(&joiner, "shared-5").await.unwrap()["late"], json!(69));
    let peers = engines[0].call(|engine| engine.peer_statuses()).await.unwrap();
    let to_joiner = peers.iter().find(|peer| peer.info.name == "engine-3").expect("joiner");
    assert_eq!(to_joiner.traffic.snapshot_records_sent, 13, "12 live records and the tombstone travel as documents");
}

/// Records on the yrs engine compact after 64 increments and read the same after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yrs_records_compact_and_reload_after_a_restart() {
    let directory = tempfile::tempdir().unwrap();
    let settings = || EngineSettings {
        name: Some("restarting".into()),
        yrs_collections: ["events".to_owned()].into_iter().collect(),
        ..EngineSettings::default()
    };
    let metrics = Arc::new(Metrics::default());
    let (engine, thread) =
        engine::start(store::Store::open(directory.path()).unwrap(), settings(), metrics.clone()).unwrap();
    for round in 0..150 {
        write_event(
            &engine,
            &format!("e{}", round % 2),
            Operation::MergePatch(object(json!({"round": round, "tag": "x"}))),
        )
        .await
        .unwrap();
    }
    write_event(&engine, "e1", Operation::Delete).await.unwrap();
    // Let the idle engine compact: both documents passed 64 increments.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let before = status(&engine).await;
    let compactions = metrics.compactions.get();
    assert!(compactions >= 2, "both documents compacted: {compactions}");
    drop(engine);
    thread.join().unwrap().unwrap();

    let (engine, _thread) =
        engine::start(store::Store::open(directory.path()).unwrap(), settings(), Arc::new(Metrics::default())).unwrap();
    let after = status(&engine).await;
    assert_eq!((after.digest, after.record_count), (before.digest, 1));
    assert_eq!(read_event(&engine, "e0").await, Some(json!({"round": 148, "tag": "x"})));
    assert_eq!(read_event(&engine, "e1").await, None);
    assert!(write_event(&engine, "e0", Operation::MergePatch(object(json!({"round": 149})))).await.unwrap());
}

/// Declared field policies on three engines that receive the same concurrent writes in three
/// different orders: every engine reads the same resolved values, the ones the policies say,
/// and lists the concurrent values as conflicts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_policies_resolve_concurrent_writes_identically_in_every_delivery_order() {
    let directories: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut engines = Vec::new();
    for (index, directory) in directories.iter().enumerate() {
        engines.push(start(directory.path(), &format!("engine-{index}")).await);
    }
    let definition = crdt::collection::Definition::from_toml(
        r#"
        [fields.status]
        policy = "ordered"
        order = ["draft", "approved", "shipped"]
        [fields.price]
        policy = "max"
        [fields.owner]
        policy = "priority"
        priority = ["engine-2", "engine-0"]
        [fields.tags]
        policy = "union"
        [fields.note]
        policy = "latest"
        "#,
    )
    .unwrap();
    let defined = engines[0]
        .call(move |engine| engine.define_collection("orders", &definition))
        .await
        .unwrap()
        .unwrap()
        .envelope
        .unwrap();
    let base = write(
        &engines[0],
        "o1",
        Operation::Replace(object(
            json!({"status": "draft", "price": 10, "owner": "nobody", "tags": ["a"], "note": "n"}),
        )),
    )
    .await;
    for engine in &engines[1..] {
        apply(engine, defined.clone()).await;
        apply(engine, base.clone()).await;
    }
    let patches = [
        json!({"status": "shipped", "price": 5, "owner": "from0", "tags": ["a", "b"], "note": "zero"}),
        json!({"status": "approved", "price": 50, "owner": "from1", "tags": ["c"], "note": "one"}),
        json!({"status": "draft", "price": 20, "owner": "from2", "tags": ["d"], "note": "two"}),
    ];
    let mut changes = Vec::new();
    for (engine, patch) in engines.iter().zip(patches) {
        changes.push(write(engine, "o1", Operation::MergePatch(object(patch))).await);
        // Distinct wall-clock milliseconds, so `latest` has a clear answer: the last writer.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    for (engine, order) in engines.iter().zip([[2, 1], [0, 2], [1, 0]]) {
        for index in order {
            apply(engine, changes[index].clone()).await;
        }
    }
    let mut reads = Vec::new();
    for engine in &engines {
        let key = RecordKey::new("orders", "o1").unwrap();
        reads.push(engine.call(move |engine| engine.read_record(key)).await.unwrap().unwrap().unwrap().view);
    }
    let expected = object(json!({
        "status": "shipped",
        "price": 50,
        "owner": "from2",
        "tags": ["a", "b", "c", "d"],
        "note": "two",
    }));
    for read in &reads {
        assert_eq!(read.value.as_ref().unwrap(), &expected);
        let fields: Vec<&str> = read.conflicts.iter().map(|conflict| conflict.field.as_str()).collect();
        assert_eq!(fields, ["/note", "/owner", "/price", "/status", "/tags"]);
        // engine-2's "draft" equalled the value it had, so it wrote nothing to `status`.
        let counts: Vec<usize> = read.conflicts.iter().map(|conflict| conflict.values.len()).collect();
        assert_eq!(counts, [3, 3, 3, 2, 3], "{:?}", read.conflicts);
    }
    // Each engine's ledger recorded the conflicts it saw merge, resolved by the policies, once
    // per field although two changes merged into each (the second grew the set of values).
    for engine in &engines {
        let (entries, _) = engine.call(|engine| engine.conflicts_page(Some("orders"), 0, 100)).await.unwrap().unwrap();
        let latest: std::collections::BTreeMap<String, &crdt::ledger::LedgerEntry> =
            entries.iter().map(|(_, entry)| (entry.field.clone(), entry)).collect();
        assert_eq!(latest.keys().collect::<Vec<_>>(), ["/note", "/owner", "/price", "/status", "/tags"]);
        assert_eq!(latest["/price"].winner, json!(50));
        assert_eq!(latest["/price"].policy.name(), "max");
        assert_eq!(latest["/tags"].winner, json!(["a", "b", "c", "d"]));
        assert_eq!(latest["/owner"].candidates.len(), 3);
        assert!(latest["/owner"].candidates.iter().any(|candidate| candidate.origin == "engine-2"));
        assert!(entries.len() <= 10, "no entry twice for the same set of values: {}", entries.len());
    }
    let fingerprints: Vec<[u8; 32]> = {
        let mut all = Vec::new();
        for engine in &engines {
            let (entries, _) = engine.call(|engine| engine.conflicts_page(None, 0, 100)).await.unwrap().unwrap();
            let last = entries.iter().rev().find(|(_, entry)| entry.field == "/price").unwrap().1.fingerprint;
            all.push(last);
        }
        all
    };
    assert!(fingerprints.windows(2).all(|pair| pair[0] == pair[1]), "the same conflict has the same fingerprint");

    // Manual resolution: a value over the concurrent ones, and the entries marked resolved.
    let key = RecordKey::new("orders", "o1").unwrap();
    let resolved = engines[0]
        .call(move |engine| engine.resolve_conflict(key, "price", json!(42), "operator"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resolved.answer.value.unwrap()["price"], json!(42));
    assert!(resolved.answer.conflicts.iter().all(|conflict| conflict.field != "/price"));
    let (entries, _) = engines[0].call(|engine| engine.conflicts_page(None, 0, 100)).await.unwrap().unwrap();
    for (_, entry) in entries.iter().filter(|(_, entry)| entry.field == "/price") {
        let resolution = entry.resolution.as_ref().expect("resolved");
        assert_eq!((resolution.value.clone(), resolution.principal.as_str()), (json!(42), "operator"));
    }
    assert!(entries.iter().filter(|(_, entry)| entry.field == "/note").all(|(_, entry)| !entry.is_resolved()));

    // A later write supersedes the concurrent values: no conflict, and the written value shows.
    write(&engines[1], "o1", Operation::MergePatch(object(json!({"status": "approved"})))).await;
    assert_eq!(read_value(&engines[1], "o1").await.unwrap()["status"], json!("approved"));
    // The definition itself replicated: every engine shows it.
    for engine in &engines {
        let definition = engine.call(|engine| engine.definition("orders")).await.unwrap().unwrap();
        assert!(definition.is_some());
    }
}

async fn audit_entries(engine: &EngineHandle) -> Vec<crdt::audit::AuditEntry> {
    engine.call(|engine| engine::audit_page(engine.store(), 0, 1000)).await.unwrap().unwrap().entries
}

async fn verify_audit(engine: &EngineHandle) -> engine::AuditCheck {
    engine.call(|engine| engine::verify_store(engine.store(), None)).await.unwrap().unwrap()
}

/// (origin, principal, fields) of each entry.
fn attributions(entries: &[crdt::audit::AuditEntry]) -> Vec<(String, String, Vec<String>)> {
    entries.iter().map(|entry| (entry.origin.clone(), entry.principal.clone(), entry.fields.clone())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_entries_name_the_origin_and_the_peer_that_delivered_each_change() {
    let directories: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut engines = Vec::new();
    for (index, directory) in directories.iter().enumerate() {
        engines.push(start(directory.path(), &format!("engine-{index}")).await);
    }
    // A chain: engine 2 hears of engine 0's changes only through engine 1.
    wire(&engines, &[(0, 1), (1, 2)]).await;
    let key = RecordKey::new("orders", "o1").unwrap();
    let replace = Operation::Replace(object(json!({"status": "new", "qty": 1})));
    engines[0].call(move |engine| engine.write_record_as(key, replace, "ops")).await.unwrap().unwrap();
    let text_key = RecordKey::new("notes", "n1").unwrap();
    let update = crdt::text::TextDocument::new(7).insert_text("body", 0, "hi").unwrap();
    engines[0]
        .call(move |engine| engine.with_principal("editor", |engine| engine.apply_text_update(text_key, update)))
        .await
        .unwrap()
        .unwrap();
    let missing = RecordKey::new("orders", "o2").unwrap();
    let deleted = engines[0].call(move |engine| engine.write_record(missing, Operation::Delete)).await.unwrap();
    assert!(!deleted.unwrap().changed);
    write(&engines[0], "o2", Operation::MergePatch(object(json!({"x": null, "y": 1})))).await;
    wait_for_equal_digests(&engines).await;

    let text = |values: &[&str]| values.iter().map(|value| value.to_string()).collect::<Vec<_>>();
    let made = |principal: &str, fields: &[&str]| ("engine-0".to_owned(), principal.to_owned(), text(fields));
    assert_eq!(
        attributions(&audit_entries(&engines[0]).await),
        vec![made("ops", &["qty", "status"]), made("editor", &["*"]), made("local", &["x", "y"])],
        "a delete of a record that does not exist changes nothing"
    );
    let received = |origin: &str, principal: &str| (origin.to_owned(), principal.to_owned(), text(&["*"]));
    assert_eq!(attributions(&audit_entries(&engines[1]).await), vec![received("engine-0", "engine-0"); 3]);
    // Engine 2 never met engine 0: the origin is its node id, the principal the peer between.
    let origin_id = engines[0].identity.node.to_string();
    assert_eq!(attributions(&audit_entries(&engines[2]).await), vec![received(&origin_id, "engine-1"); 3]);
    for engine in &engines {
        let check = verify_audit(engine).await;
        assert_eq!(check.outcome.map(|verified| verified.entries), Ok(3));
        assert_eq!(engine.call(|engine| engine.status().audit.sequence).await.unwrap(), 3);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_retention_trims_behind_an_anchor_but_never_a_log_that_does_not_verify() {
    let directory = tempfile::tempdir().unwrap();
    let settings = EngineSettings {
        name: Some("hq".into()),
        audit_retention: std::time::Duration::from_millis(1),
        ..EngineSettings::default()
    };
    let store = store::Store::open(directory.path()).unwrap();
    let (engine, _thread) = engine::start(store, settings, Arc::new(Metrics::default())).unwrap();
    for index in 0..3 {
        write(&engine, &format!("o{index}"), Operation::Replace(object(json!({"n": index})))).await;
    }
    // Entry 2 altered behind the engine's back: trimming would delete the evidence, so it waits.
    let original = engine.call(|engine| engine.store().audit_entry(2).unwrap().unwrap()).await.unwrap();
    let mut altered = crdt::audit::AuditEntry::decode(&original).unwrap();
    altered.principal = "someone-else".into();
    let put = |bytes: Vec<u8>| {
        move |engine: &mut engine::Engine| {
            let mut batch = store::WriteBatch::default();
            batch.put_audit(2, &bytes);
            engine.store().commit(batch).unwrap();
        }
    };
    engine.call(put(altered.encode())).await.unwrap();
    let trim_until = |anchor_sequence: u64| {
        let engine = engine.clone();
        async move {
            for _ in 0..3_000 {
                let now = engine
                    .call(|engine| {
                        engine.retention_tick();
                        engine.status().audit.anchor_sequence
                    })
                    .await
                    .unwrap();
                if now == anchor_sequence {
                    return true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            false
        }
    };
    // Once every entry is older than the retention, the next trimming step would take all three.
    let newest_ms = audit_entries(&engine).await[2].time_ms;
    let now_ms = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    while now_ms() <= newest_ms + 1 {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    engine.call(|engine| engine.retention_tick()).await.unwrap();
    assert_eq!(engine.call(|engine| engine.status().audit.anchor_sequence).await.unwrap(), 0);
    assert_eq!(audit_entries(&engine).await.len(), 3);
    let check = verify_audit(&engine).await;
    assert_eq!(check.outcome, Err(crdt::audit::Tamper { sequence: 2, kind: crdt::audit::TamperKind::Altered }));

    // Put back: now it trims (at the next interval) and the rest verifies from the anchor.
    engine.call(put(original)).await.unwrap();
    assert!(trim_until(3).await, "not trimmed within the hang guard");
    assert!(audit_entries(&engine).await.is_empty());
    let check = verify_audit(&engine).await;
    assert_eq!(check.anchor.sequence, 3);
    assert_eq!(check.outcome.map(|verified| (verified.entries, verified.head)), Ok((0, check.anchor)));
    write(&engine, "o9", Operation::Replace(object(json!({"n": 9})))).await;
    let entries = audit_entries(&engine).await;
    assert_eq!(entries.iter().map(|entry| entry.sequence).collect::<Vec<_>>(), [4]);
    assert_eq!(entries[0].previous_hash, check.anchor.hash);
}

/// Starts an engine over `directory` whose feed keeps events for `feed_retention`, with its
/// thread (so a test can stop it and reopen the store).
fn start_feed_engine(
    directory: &std::path::Path,
    feed_retention: std::time::Duration,
) -> (EngineHandle, std::thread::JoinHandle<Result<(), engine::EngineError>>, Arc<Metrics>) {
    let settings = EngineSettings { name: Some("feed".into()), feed_retention, ..EngineSettings::default() };
    let metrics = Arc::new(Metrics::default());
    let (engine, thread) = engine::start(store::Store::open(directory).unwrap(), settings, metrics.clone()).unwrap();
    (engine, thread, metrics)
}

async fn feed_page(engine: &EngineHandle, after: u64) -> Result<Vec<u64>, engine::EngineError> {
    let page = engine.call(move |engine| engine.feed_page(after, 100)).await.unwrap();
    page.map(|events| events.iter().map(|event| event.sequence).collect())
}

/// Waits until the wall clock is past `ms` (ms since the epoch).
async fn wait_past(ms: u64) {
    let now_ms = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    while now_ms() <= ms {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// Feed retention goes by when an entry was appended here (a change relayed late with an old
/// timestamp is kept), trims only the oldest run, raises a floor that a restart keeps, and
/// refuses reads from below the floor rather than skipping events silently. Zero keeps all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_retention_trims_by_append_time_and_refuses_reads_below_its_floor() {
    let origin_directory = tempfile::tempdir().unwrap();
    let directory = tempfile::tempdir().unwrap();
    let origin = start(origin_directory.path(), "origin").await;
    let mut relayed = write(&origin, "late", Operation::Replace(object(json!({"n": 1})))).await;
    // Made an hour ago at its origin, and relayed only now.
    relayed.timestamp.wall_ms -= 3_600_000;

    let minute = std::time::Duration::from_secs(60);
    let (engine, thread, _) = start_feed_engine(directory.path(), minute);
    assert!(apply(&engine, relayed).await);
    write(&engine, "local", Operation::Replace(object(json!({"n": 2})))).await;
    engine.call(|engine| engine.retention_tick()).await.unwrap();
    assert_eq!(feed_page(&engine, 0).await.unwrap(), [1, 2], "appended a moment ago: kept for a minute");
    assert_eq!(status(&engine).await.feed_floor, 0);
    drop(engine);
    thread.join().unwrap().unwrap();

    // With a millisecond's retention both are old: one step trims them, and the floor is 2.
    let (engine, thread, metrics) = start_feed_engine(directory.path(), std::time::Duration::from_millis(1));
    let appended = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    wait_past(appended + 1).await;
    engine.call(|engine| engine.retention_tick()).await.unwrap();
    assert_eq!(metrics.feed_entries_trimmed.get(), 2);
    assert_eq!(status(&engine).await.feed_floor, 2);
    for after in [0, 1] {
        match feed_page(&engine, after).await {
            Err(engine::EngineError::FeedTrimmed { after: refused, floor: 2 }) => assert_eq!(refused, after),
            other => panic!("a read after {after}, below the floor, answered {other:?}"),
        }
    }
    assert_eq!(feed_page(&engine, 2).await.unwrap(), Vec::<u64>::new());
    // The next step is a second away (a tenth of the period, at least a second): a new event stays.
    write(&engine, "third", Operation::Replace(object(json!({"n": 3})))).await;
    engine.call(|engine| engine.retention_tick()).await.unwrap();
    assert_eq!(feed_page(&engine, 2).await.unwrap(), [3]);
    assert_eq!(engine.call(|engine| engine.store().feed_range(0, 10).unwrap().len()).await.unwrap(), 1);
    drop(engine);
    thread.join().unwrap().unwrap();

    // A restart keeps the floor (the store has nothing below it), and zero retention keeps all.
    let (engine, _thread, metrics) = start_feed_engine(directory.path(), std::time::Duration::ZERO);
    engine.call(|engine| engine.retention_tick()).await.unwrap();
    assert_eq!(metrics.feed_entries_trimmed.get(), 0);
    assert_eq!(engine.call(|engine| engine.feed_bounds()).await.unwrap(), engine::FeedBounds { floor: 2, sequence: 3 });
    assert!(matches!(feed_page(&engine, 1).await, Err(engine::EngineError::FeedTrimmed { after: 1, floor: 2 })));
    assert_eq!(feed_page(&engine, 2).await.unwrap(), [3]);
}

/// Feed entries that do not decode count as old: retention trims a leading run of them with the
/// old entries around them, and stops at the first recent entry that reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_retention_trims_damaged_entries_with_the_old_ones() {
    let directory = tempfile::tempdir().unwrap();
    let (engine, thread, _) = start_feed_engine(directory.path(), std::time::Duration::from_secs(60));
    for name in ["a", "b", "c", "d"] {
        write(&engine, name, Operation::Replace(object(json!({"n": name})))).await;
    }
    drop(engine);
    thread.join().unwrap().unwrap();
    let store = store::Store::open(directory.path()).unwrap();
    let mut batch = store::WriteBatch::default();
    for sequence in [1, 2, 4] {
        batch.put_feed(sequence, b"\xc1 damaged");
    }
    store.commit(batch).unwrap();
    drop(store);

    // Entry 3 is recent and reads: the run trimmed is 1 and 2, and 4 stays behind 3.
    let (engine, _thread, metrics) = start_feed_engine(directory.path(), std::time::Duration::from_secs(60));
    engine.call(|engine| engine.retention_tick()).await.unwrap();
    assert_eq!(metrics.feed_entries_trimmed.get(), 2);
    assert_eq!(status(&engine).await.feed_floor, 2);
    let events = engine.call(|engine| engine.feed_page(2, 10)).await.unwrap().unwrap();
    let served: Vec<(u64, &str)> = events.iter().map(|event| (event.sequence, event.kind)).collect();
    assert_eq!(served, [(3, "record"), (4, "damaged")]);
    assert_eq!(metrics.feed_events_damaged.get(), 1);
}

/// One trimming step deletes at most 4,096 feed entries, so a long backlog never stalls writes;
/// a full step makes the next one due at once, and retention emptying the feed leaves the floor
/// at the last sequence handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_trimming_is_bounded_per_step() {
    let directory = tempfile::tempdir().unwrap();
    let (engine, _thread, metrics) = start_feed_engine(directory.path(), std::time::Duration::from_millis(1));
    engine
        .call(|engine| {
            for index in 0..4100 {
                let key = RecordKey::new("orders", &format!("o{index}")).unwrap();
                engine.write_record(key, Operation::Replace(object(json!({"n": index})))).unwrap();
            }
        })
        .await
        .unwrap();
    let appended = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    wait_past(appended + 1).await;
    engine.call(|engine| engine.retention_tick()).await.unwrap();
    assert_eq!(metrics.feed_entries_trimmed.get(), 4096);
    assert_eq!(status(&engine).await.feed_floor, 4096);
    engine.call(|engine| engine.retention_tick()).await.unwrap();
    assert_eq!(metrics.feed_entries_trimmed.get(), 4100);
    assert_eq!(
        engine.call(|engine| engine.feed_bounds()).await.unwrap(),
        engine::FeedBounds { floor: 4100, sequence: 4100 }
    );
    assert!(engine.call(|engine| engine.store().feed_last().unwrap()).await.unwrap().is_none());
}

/// A change from a peer that cannot be applied goes to the quarantine with its reason and
/// counts as received (the version vector holds it), other changes keep flowing, and the
/// quarantine lists, retries (the reason is kept up to date) and drops it, also after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unappliable_change_goes_to_quarantine_and_blocks_nothing() {
    let directory = tempfile::tempdir().unwrap();
    let source_directory = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::default());
    let settings = || EngineSettings { name: Some("target".into()), ..EngineSettings::default() };
    let (engine, thread) =
        engine::start(store::Store::open(directory.path()).unwrap(), settings(), metrics.clone()).unwrap();
    let source = start(source_directory.path(), "source").await;
    let mut bad = write(&source, "bad", Operation::Replace(object(json!({"a": 1})))).await;
    bad.change = vec![0x85, 0x6f, 0x4a, 0x83, 1, 2, 3];
    let good = write(&source, "good", Operation::Replace(object(json!({"b": 2})))).await;
    let (origin, sequence) = (bad.origin, bad.sequence);
    let refused = engine.call(move |engine| engine.apply_or_quarantine(bad, "source")).await.unwrap();
    assert!(refused.is_err());
    assert!(engine.call(move |engine| engine.apply_or_quarantine(good, "source")).await.unwrap().unwrap());
    assert_eq!(read_value(&engine, "good").await.unwrap(), object(json!({"b": 2})));
    let status = status(&engine).await;
    assert_eq!(status.quarantined, 1);
    let vector = &status.version_vector[origin.to_string()];
    assert_eq!(vector["contiguous"], json!(sequence + 1), "both count as received: {vector}");
    assert_eq!(metrics.quarantined.get(), 1);

    let page = engine.call(|engine| engine.quarantine_page(0, 10)).await.unwrap().unwrap();
    assert_eq!(page.len(), 1);
    let (id, entry) = &page[0];
    assert_eq!(entry.peer, "source");
    assert!(entry.reason.contains("does not apply"), "{}", entry.reason);
    let summary = entry.summary(*id);
    assert_eq!((summary["collection"].as_str(), summary["record"].as_str()), (Some("orders"), Some("bad")));
    let id = *id;
    let retried = engine.call(move |engine| engine.retry_quarantined(id)).await.unwrap().unwrap();
    assert!(matches!(retried, Some(Err(ref reason)) if reason.contains("does not apply")), "{retried:?}");
    let entry = engine.call(move |engine| engine.quarantined(id)).await.unwrap().unwrap().unwrap();
    assert_eq!(entry.retries, 1);

    drop(engine);
    thread.join().unwrap().unwrap();
    let (engine, _thread) =
        engine::start(store::Store::open(directory.path()).unwrap(), settings(), Arc::new(Metrics::default())).unwrap();
    assert_eq!(status_of(&engine).await.quarantined, 1, "the quarantine survives a restart");
    assert!(engine.call(move |engine| engine.drop_quarantined(id)).await.unwrap().unwrap());
    assert!(!engine.call(move |engine| engine.drop_quarantined(id)).await.unwrap().unwrap());
    assert_eq!(status_of(&engine).await.quarantined, 0);
    assert!(engine.call(move |engine| engine.retry_quarantined(id)).await.unwrap().unwrap().is_none());
}

/// A peer's change of 70 bytes that declares eight million operations (automerge's run-length
/// encoding allows it; the `record_changes` fuzz target found it costing 3 GB) is refused before
/// automerge reads it, for a record new to the node and for one it holds: it goes to the
/// quarantine with the bound as its reason, and the record keeps its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_declaring_more_operations_than_the_bound_is_quarantined_unread() {
    let directory = tempfile::tempdir().unwrap();
    let source_directory = tempfile::tempdir().unwrap();
    let (engine, _thread) = engine::start(
        store::Store::open(directory.path()).unwrap(),
        EngineSettings { name: Some("target".into()), ..EngineSettings::default() },
        Arc::new(Metrics::default()),
    )
    .unwrap();
    let source = start(source_directory.path(), "source").await;
    // The fuzz regression: a mode byte, then the change.
    let declaring =
        include_bytes!("../fuzz/regressions/record_changes/operations-declared-by-run-lengths-mode-0")[1..].to_vec();
    let held = write(&source, "held", Operation::Replace(object(json!({"a": 1})))).await;
    assert!(engine.call(move |engine| engine.apply_or_quarantine(held, "source")).await.unwrap().unwrap());
    for id in ["new", "held"] {
        let mut envelope = write(&source, id, Operation::Replace(object(json!({"b": 2})))).await;
        envelope.change = declaring.clone();
        let refused = engine.call(move |engine| engine.apply_or_quarantine(envelope, "source")).await.unwrap();
        assert!(refused.is_err(), "{id}: {refused:?}");
    }
    assert_eq!(read_value(&engine, "held").await.unwrap(), object(json!({"a": 1})));
    assert!(read_value(&engine, "new").await.is_none());
    let page = engine.call(|engine| engine.quarantine_page(0, 10)).await.unwrap().unwrap();
    assert_eq!(page.len(), 2);
    for (_, entry) in &page {
        assert!(entry.reason.contains("declare more than"), "{}", entry.reason);
    }

    // A first change that names actors besides its author (another fuzz regression: automerge
    // panics applying it) is not stored unbuilt, where it would fail to build later: it is
    // refused now.
    let naming_others =
        include_bytes!("../fuzz/regressions/record_changes/first-change-naming-other-actors")[1..].to_vec();
    let mut envelope = write(&source, "named", Operation::Replace(object(json!({"c": 3})))).await;
    envelope.change = naming_others;
    assert!(engine.call(move |engine| engine.apply_or_quarantine(envelope, "source")).await.unwrap().is_err());
    assert!(read_value(&engine, "named").await.is_none());
    assert_eq!(status_of(&engine).await.quarantined, 3);
}

async fn status_of(engine: &EngineHandle) -> engine::Status {
    status(engine).await
}

/// A peer's change that would break the collection's schema here is quarantined with the field
/// and the rule, other records keep flowing, and once the definition is fixed a retry applies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_breaks_the_schema_is_quarantined_and_retried_after_the_fix() {
    let directory = tempfile::tempdir().unwrap();
    let source_directory = tempfile::tempdir().unwrap();
    let engine = start(directory.path(), "target").await;
    let source = start(source_directory.path(), "source").await;
    let strict = crdt::collection::Definition::from_toml("[fields.price]\ntype = \"number\"\nminimum = 0\n").unwrap();
    engine.call(move |engine| engine.define_collection("orders", &strict)).await.unwrap().unwrap();
    let negative = write(&source, "o1", Operation::Replace(object(json!({"price": -5})))).await;
    let fine = write(&source, "o2", Operation::Replace(object(json!({"price": 5})))).await;
    let refused = engine.call(move |engine| engine.apply_or_quarantine(negative, "source")).await.unwrap();
    let reason = refused.unwrap_err().to_string();
    assert!(reason.contains("price") && reason.contains("minimum"), "{reason}");
    assert!(engine.call(move |engine| engine.apply_or_quarantine(fine, "source")).await.unwrap().unwrap());
    assert_eq!(read_value(&engine, "o1").await, None, "the violating change is not applied");
    assert_eq!(read_value(&engine, "o2").await.unwrap(), object(json!({"price": 5})));

    let page = engine.call(|engine| engine.quarantine_page(0, 10)).await.unwrap().unwrap();
    let id = page[0].0;
    let still = engine.call(move |engine| engine.retry_quarantined(id)).await.unwrap().unwrap();
    assert!(matches!(still, Some(Err(_))), "the definition is unchanged: {still:?}");
    let relaxed = crdt::collection::Definition::from_toml("[fields.price]\ntype = \"number\"\n").unwrap();
    engine.call(move |engine| engine.define_collection("orders", &relaxed)).await.unwrap().unwrap();
    let applied = engine.call(move |engine| engine.retry_quarantined(id)).await.unwrap().unwrap();
    assert!(matches!(applied, Some(Ok(true))), "{applied:?}");
    assert_eq!(read_value(&engine, "o1").await.unwrap(), object(json!({"price": -5})));
    assert_eq!(status(&engine).await.quarantined, 0);
}

/// Records new to a node arrive as their first change and are stored without being built
/// (`Record::first_change`); everything else about them must be as if they had been built: the
/// same reads, record count and digest as the writer's, a second change in the same batch, a
/// read before the commit, eviction from a tiny cache before the commit, a change after the
/// commit, and a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_new_to_a_node_are_stored_from_their_first_change_and_behave_as_built() {
    let writer_directory = tempfile::tempdir().unwrap();
    let reader_directory = tempfile::tempdir().unwrap();
    let writer = start(writer_directory.path(), "writer").await;
    let metrics = Arc::new(Metrics::default());
    let open_reader = |metrics: Arc<Metrics>| {
        let store = store::Store::open(reader_directory.path()).expect("open store");
        let settings = EngineSettings {
            name: Some("reader".into()),
            cache_documents: NonZeroUsize::new(2).expect("non-zero"),
            ..EngineSettings::default()
        };
        engine::start(store, settings, metrics).expect("engine")
    };
    let (reader, thread) = open_reader(metrics.clone());

    let mut envelopes = Vec::new();
    for index in 0..12 {
        let fields = json!({"name": format!("customer {index}"), "tags": ["a", index], "address": {"city": "Zürich"}});
        envelopes.push(write(&writer, &format!("o{index}"), Operation::Replace(object(fields))).await);
    }
    // A second change to a record, and a record created by an increment (its genesis needs the
    // building way), then deleted.
    envelopes.push(write(&writer, "o3", Operation::MergePatch(object(json!({"name": "renamed"})))).await);
    envelopes.push(write(&writer, "visits", Operation::Increment { field: "count".into(), by: 2 }).await);
    envelopes.push(write(&writer, "visits", Operation::Delete).await);

    // All in one engine job: one batch, one commit, a cache of two documents.
    let key = RecordKey::new("orders", "o3").unwrap();
    let unbuilt_key = RecordKey::new("orders", "o7").unwrap();
    let (applied, read, unbuilt_read) = reader
        .call(move |engine| {
            let applied: Vec<bool> =
                envelopes.into_iter().map(|envelope| engine.apply_envelope(envelope).unwrap()).collect();
            (applied, engine.read_record(key).unwrap(), engine.read_record(unbuilt_key).unwrap())
        })
        .await
        .unwrap();
    assert!(applied.iter().all(|applied| *applied), "every envelope applied: {applied:?}");
    assert_eq!(read.unwrap().view.value.unwrap()["name"], json!("renamed"), "read before the commit");
    assert_eq!(
        unbuilt_read.unwrap().view.value.unwrap(),
        object(json!({"name": "customer 7", "tags": ["a", 7], "address": {"city": "Zürich"}})),
        "a record staged unbuilt, read before the commit"
    );
    assert_eq!(metrics.records_stored_unbuilt.get(), 12, "the twelve creations by replace were stored unbuilt");
    assert_eq!(metrics.records_read_unbuilt.get(), 1, "o7 was read from its first change, o3 was built");

    let check = |reader: EngineHandle| {
        let writer = writer.clone();
        async move {
            let (written, stored) = (status(&writer).await, status(&reader).await);
            assert_eq!(stored.digest, written.digest);
            assert_eq!((stored.record_count, written.record_count), (12, 12));
            for index in [0, 3, 11, 5] {
                let key = RecordKey::new("orders", &format!("o{index}")).unwrap();
                let read = |engine: &EngineHandle| {
                    let (engine, key) = (engine.clone(), key.clone());
                    async move { engine.call(move |engine| engine.read_record(key)).await.unwrap().unwrap().unwrap() }
                };
                assert_eq!(read(&reader).await.view, read(&writer).await.view);
            }
        }
    };
    check(reader.clone()).await;
    assert_eq!(metrics.records_read_unbuilt.get(), 4, "o0, o11 and o5 were read from their first changes");
    // Written over after the commit: built from its first change, which the engine kept after the
    // commit and must forget now (the tiny cache soon evicts the built record: a kept first
    // change read then would be the old value).
    let later = write(&writer, "o5", Operation::MergePatch(object(json!({"vip": true})))).await;
    assert!(apply(&reader, later).await);
    // Two other built records fill the cache of two, so o5 is evicted before it is read.
    reader
        .call(|engine| {
            for id in ["visits", "o3"] {
                engine.read_record(RecordKey::new("orders", id).unwrap()).unwrap();
            }
        })
        .await
        .unwrap();
    check(reader.clone()).await;

    drop(reader);
    thread.join().unwrap().unwrap();
    let (reopened, _thread) = open_reader(Arc::new(Metrics::default()));
    check(reopened).await;
}

/// Writes queued while the engine is busy run as one round, their CRDT work spread over the
/// workers (see `engine/writes.rs`), and store exactly what the same writes one at a time
/// would: every outcome in its place, sequences without holes in arrival order, a job queued
/// after the writes sees them, and the audit trail names the principal and fields of each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_queued_together_run_as_one_round_and_store_what_one_at_a_time_would() {
    for workers in [1, 4] {
        let directory = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::default());
        let settings = EngineSettings { name: Some("rounds".into()), workers, ..EngineSettings::default() };
        let store = store::Store::open(directory.path()).unwrap();
        let (engine, _thread) = engine::start(store, settings, metrics.clone()).unwrap();
        let key = |id: &str| RecordKey::new("orders", id).unwrap();
        let account = RecordKey::new("accounts", "a").unwrap();
        let strict =
            crdt::collection::Definition::from_toml("[fields.balance]\ntype = \"number\"\nminimum = 0\n").unwrap();
        engine.call(move |engine| engine.define_collection("accounts", &strict)).await.unwrap().unwrap();
        // Holds the engine so that everything below queues behind it, in the order polled.
        engine.submit(|_| std::thread::sleep(std::time::Duration::from_millis(100))).await.unwrap();
        let singles = futures::future::join_all((0..64).map(|index| {
            engine.write(key(&format!("r{index}")), Operation::Replace(object(json!({"n": index}))), "alice".into())
        }));
        let batch = engine.write_versions(
            vec![
                (key("same"), Operation::Replace(object(json!({"a": 1})))),
                (key("same"), Operation::MergePatch(object(json!({"b": 2})))),
                (RecordKey::new("_collections", "orders").unwrap(), Operation::Replace(object(json!({})))),
                (key("same"), Operation::Increment { field: "c".into(), by: 5 }),
                (key("missing"), Operation::Delete),
                (key("r3"), Operation::MergePatch(object(json!({"m": true})))),
                // Checked against the record as the writes before them in the round left it:
                // 5 - 3 passes only after the replace, and 2 - 10 breaks the minimum.
                (account.clone(), Operation::Replace(object(json!({"balance": 5})))),
                (account.clone(), Operation::Increment { field: "balance".into(), by: -3 }),
                (account.clone(), Operation::Increment { field: "balance".into(), by: -10 }),
                (account.clone(), Operation::Increment { field: "balance".into(), by: 1 }),
            ],
            "bob".into(),
        );
        let read = engine.call(|engine| engine.read_record(RecordKey::new("orders", "same").unwrap()));
        // Unconstrained: tokio's cooperative budget would make a send that runs out of it wait
        // for a later poll, behind the writes polled after it.
        let (singles, batch, read) = tokio::task::unconstrained(async { futures::join!(singles, batch, read) }).await;

        let mut sequences = Vec::new();
        for (index, outcome) in singles.into_iter().enumerate() {
            let outcome = outcome.unwrap();
            assert!(outcome.changed);
            assert_eq!(outcome.answer.value, Some(object(json!({"n": index}))), "write {index} answers its record");
            sequences.push(outcome.envelope.unwrap().sequence);
        }
        let batch = batch.unwrap();
        assert_eq!(batch.len(), 10, "one outcome per write, in order");
        assert!(matches!(batch[8], Err(engine::EngineError::Invalid(_))), "{:?}", batch[8]);
        assert!(matches!(batch[2], Err(engine::EngineError::SystemCollection(_))), "{:?}", batch[2]);
        let missing = batch[4].as_ref().unwrap();
        assert!(!missing.changed && missing.envelope.is_none(), "a delete of nothing changes nothing");
        let mut versions = Vec::new();
        for position in [0, 1, 3, 5, 6, 7, 9] {
            let outcome = batch[position].as_ref().unwrap();
            assert!(outcome.changed, "write {position} of the batch changed its record");
            versions.push(outcome.answer.clone());
            sequences.push(outcome.envelope.as_ref().unwrap().sequence);
        }
        versions.dedup();
        assert_eq!(versions.len(), 7, "each change of the batch has its own version");
        let first = sequences[0];
        assert_eq!(sequences, (first..first + 71).collect::<Vec<_>>(), "sequences in arrival order, without holes");

        let same = read.unwrap().unwrap().expect("the job after the writes sees them");
        assert_eq!(same.view.value, Some(object(json!({"a": 1, "b": 2, "c": 5}))));
        let r3 = engine.call(|engine| engine.read_record(RecordKey::new("orders", "r3").unwrap())).await.unwrap();
        assert_eq!(
            r3.unwrap().unwrap().view.value,
            Some(object(json!({"n": 3, "m": true}))),
            "two writes to r3 in order"
        );
        let balance = engine.call(move |engine| engine.read_record(account)).await.unwrap().unwrap();
        assert_eq!(balance.unwrap().view.value, Some(object(json!({"balance": 3}))));
        let status = status(&engine).await;
        // The definition is a record too, and its change is in the feed.
        assert_eq!(status.record_count, 67);
        assert_eq!(status.feed_sequence, 72);

        let entries = audit_entries(&engine).await;
        let attributed = attributions(&entries);
        assert_eq!(attributed.len(), 72);
        assert_eq!(attributed[6], ("rounds".into(), "alice".into(), vec!["n".to_owned()]));
        let batch_entries: Vec<_> =
            attributed[65..].iter().map(|(_, principal, fields)| (principal.as_str(), fields.clone())).collect();
        assert_eq!(
            batch_entries,
            [
                ("bob", vec!["a".to_owned()]),
                ("bob", vec!["b".to_owned()]),
                ("bob", vec!["c".to_owned()]),
                ("bob", vec!["m".to_owned()]),
                ("bob", vec!["balance".to_owned()]),
                ("bob", vec!["balance".to_owned()]),
                ("bob", vec!["balance".to_owned()]),
            ],
            "workers = {workers}"
        );
        assert!(verify_audit(&engine).await.outcome.is_ok(), "the chain verifies");
        assert_eq!(metrics.write_round_writes.get(), 74, "every API write ran in a round");
        assert!(metrics.write_rounds.get() >= 1);
        if workers == 1 {
            assert_eq!(metrics.write_lanes_on_helpers.get(), 0, "one worker is the engine thread alone");
        }
    }
}

/// A round of yrs writes large enough to spread over helpers stores what the engine thread alone
/// would: every write answers its own record and version, two writes to one key apply in order,
/// and the sequences follow arrival order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_of_yrs_writes_on_helpers_stores_what_the_engine_thread_alone_would() {
    let mut reads = Vec::new();
    for workers in [1, 4] {
        let directory = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::default());
        let settings = EngineSettings {
            name: Some("yrs rounds".into()),
            workers,
            yrs_collections: ["events".to_owned()].into_iter().collect(),
            ..EngineSettings::default()
        };
        let (engine, _thread) =
            engine::start(store::Store::open(directory.path()).unwrap(), settings, metrics.clone()).unwrap();
        let key = |index: usize| RecordKey::new("events", &format!("e{}", index % 100)).unwrap();
        engine.submit(|_| std::thread::sleep(std::time::Duration::from_millis(100))).await.unwrap();
        // 120 writes over 100 keys: the last 20 patch records written earlier in the round.
        // Unconstrained, so that they are sent in the order polled (see the test above).
        let outcomes = tokio::task::unconstrained(futures::future::join_all((0..120).map(|index| {
            let operation = if index < 100 {
                Operation::Replace(object(json!({"n": index})))
            } else {
                Operation::MergePatch(object(json!({"late": index})))
            };
            engine.write(key(index), operation, "alice".into())
        })))
        .await;
        let mut sequences = Vec::new();
        let mut versions = std::collections::HashSet::new();
        for (index, outcome) in outcomes.into_iter().enumerate() {
            let outcome = outcome.unwrap();
            let expected = if index < 100 { json!({"n": index}) } else { json!({"n": index - 100, "late": index}) };
            assert_eq!(outcome.answer.value, Some(object(expected)), "workers = {workers}, write {index}");
            assert!(versions.insert(outcome.answer.version.clone()), "write {index} has a version of its own");
            sequences.push(outcome.envelope.unwrap().sequence);
        }
        assert_eq!(sequences, (1..=120).collect::<Vec<_>>(), "sequences in arrival order");
        assert_eq!(metrics.write_rounds.get(), 1, "one round");
        if workers == 1 {
            assert_eq!(metrics.write_lanes_on_helpers.get(), 0);
        }
        let read = engine
            .call(move |engine| {
                (0..100).map(|index| engine.read_record(key(index)).unwrap().unwrap().view.value).collect::<Vec<_>>()
            })
            .await
            .unwrap();
        reads.push((read, status(&engine).await.record_count));
    }
    assert_eq!(reads[0], reads[1], "the same records with and without helpers");
}

/// Opens an engine named `name` on `directory` with `metrics` and the given log retention,
/// without the test ticker (the caller ticks).
fn open_engine(
    directory: &std::path::Path,
    name: &str,
    metrics: Arc<Metrics>,
    log_retention: std::time::Duration,
) -> (EngineHandle, std::thread::JoinHandle<Result<(), engine::EngineError>>) {
    let store = store::Store::open(directory).expect("open store");
    let settings = EngineSettings {
        name: Some(name.into()),
        cache_documents: NonZeroUsize::new(4).expect("non-zero"),
        log_retention,
        ..EngineSettings::default()
    };
    engine::start(store, settings, metrics).expect("engine")
}

/// A record that is still its first change is stored once, in the change log, with the document
/// entry pointing at it (local creations and a peer's alike); before retention trims such a
/// change, the document gets its bytes back, so every record reads the same after the trim and
/// after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_change_is_stored_once_and_kept_when_retention_trims_the_log() {
    let directory = tempfile::tempdir().unwrap();
    let peer_directory = tempfile::tempdir().unwrap();
    let peer = start(peer_directory.path(), "peer").await;
    let metrics = Arc::new(Metrics::default());
    let (engine, thread) =
        open_engine(directory.path(), "keeper", metrics.clone(), std::time::Duration::from_millis(300));
    let mut creations = Vec::new();
    for index in 0..6 {
        let fields = object(json!({"name": format!("customer {index}"), "city": "Zürich", "orders": index}));
        creations.push(write(&engine, &format!("local-{index}"), Operation::Replace(fields)).await);
    }
    for index in 0..6 {
        let fields = object(json!({"name": format!("remote {index}"), "tags": ["a", index]}));
        let envelope = write(&peer, &format!("remote-{index}"), Operation::Replace(fields)).await;
        assert!(apply(&engine, envelope.clone()).await);
        creations.push(envelope);
    }
    // Changed again: the first change stays a pointer, the second is an increment.
    write(&engine, "local-0", Operation::MergePatch(object(json!({"vip": true})))).await;

    let document_sizes = |engine: &EngineHandle| {
        let keys: Vec<RecordKey> = creations.iter().map(|envelope| envelope.key.clone()).collect();
        let engine = engine.clone();
        async move {
            engine
                .call(move |engine| {
                    keys.iter()
                        .map(|key| engine.store().document_value(&key.to_bytes()).unwrap().unwrap().len())
                        .collect::<Vec<_>>()
                })
                .await
                .unwrap()
        }
    };
    for (size, creation) in document_sizes(&engine).await.into_iter().zip(&creations) {
        // A pointer: the kind, no bytes, and (origin, sequence), where MessagePack takes one or
        // two bytes for each of the origin's 16 bytes, so 33 to 56 bytes in all.
        assert!(size <= 56 && size < creation.change.len(), "{}: {size} bytes, a pointer", creation.key);
    }
    let reads = |engine: &EngineHandle| {
        let keys: Vec<RecordKey> = creations.iter().map(|envelope| envelope.key.clone()).collect();
        let engine = engine.clone();
        async move {
            let mut values = Vec::new();
            for key in keys {
                let read = engine.call(move |engine| engine.read_record(key)).await.unwrap().unwrap();
                values.push(read.expect("the record reads").view);
            }
            values
        }
    };
    let before = reads(&engine).await;
    assert_eq!(before[0].value.as_ref().unwrap()["vip"], json!(true));
    let digest = status(&engine).await.digest;

    // Past the retention period the ticks trim all 13 changes; the 12 pointed at get their bytes.
    for _ in 0..500 {
        if metrics.log_entries_trimmed.get() == 13 {
            break;
        }
        engine.submit(|engine| engine.replication_tick()).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(metrics.log_entries_trimmed.get(), 13, "the log was not trimmed within the hang guard");
    assert_eq!(metrics.first_changes_kept.get(), 12);
    for (size, creation) in document_sizes(&engine).await.into_iter().zip(&creations) {
        assert!(size > creation.change.len(), "{}: {size} bytes, the change itself", creation.key);
    }
    assert_eq!(reads(&engine).await, before);

    drop(engine);
    thread.join().unwrap().unwrap();
    let (reopened, _thread) =
        open_engine(directory.path(), "keeper", Arc::new(Metrics::default()), engine::LOG_RETENTION_DEFAULT);
    assert_eq!(reads(&reopened).await, before, "after a restart, built from the store");
    assert_eq!(status(&reopened).await.digest, digest);
}

/// A document entry that points at a change the log no longer holds (damage on disk) reads as
/// a damaged document with the reason, and the node goes on serving other records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_whose_first_change_is_gone_from_the_log_reads_as_damaged() {
    let directory = tempfile::tempdir().unwrap();
    let (engine, thread) =
        open_engine(directory.path(), "damaged", Arc::new(Metrics::default()), engine::LOG_RETENTION_DEFAULT);
    let envelope = write(&engine, "lost", Operation::Replace(object(json!({"name": "Ada"})))).await;
    write(&engine, "kept", Operation::Replace(object(json!({"name": "Grace"})))).await;
    engine
        .call(move |engine| {
            let mut batch = store::WriteBatch::default();
            batch.remove_log(envelope.origin.as_bytes(), envelope.sequence);
            engine.store().commit(batch).unwrap();
        })
        .await
        .unwrap();
    drop(engine);
    thread.join().unwrap().unwrap();
    let (engine, _thread) =
        open_engine(directory.path(), "damaged", Arc::new(Metrics::default()), engine::LOG_RETENTION_DEFAULT);
    let read = engine.call(|engine| engine.read_record(RecordKey::new("orders", "lost").unwrap())).await.unwrap();
    match read {
        Err(engine::EngineError::Corrupt { reason, .. }) => {
            assert!(reason.contains("not in the change log"), "{reason}")
        }
        other => panic!("expected a damaged document, got {other:?}"),
    }
    assert_eq!(read_value(&engine, "kept").await.unwrap()["name"], json!("Grace"));
}
