//! Micro-benchmarks of the record write path: the CRDT operation alone, and the operation plus a
//! durable group commit through the real engine and sled store in a temporary directory.
//!
//! Run with `cargo bench --bench write_path`. Results and method are in BENCHMARKS.md.

use std::num::NonZeroUsize;
use std::sync::Arc;

use concord::engine::{self, EngineHandle, EngineSettings};
use concord::metrics::Metrics;
use crdt::clock::Timestamp;
use crdt::envelope::{DocumentKind, Envelope};
use crdt::identity::{NodeId, OriginId};
use crdt::key::RecordKey;
use crdt::record::{Operation, Record};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;

fn small_object(index: u64) -> serde_json::Map<String, serde_json::Value> {
    match json!({"name": format!("customer {index}"), "city": "Zürich", "orders": index, "vip": index.is_multiple_of(2)})
    {
        serde_json::Value::Object(map) => map,
        _ => unreachable!(),
    }
}

fn record_operations(criterion: &mut Criterion) {
    let key = RecordKey::new("customers", "c1").expect("valid key");
    let origin = OriginId([1; 16]);
    let mut group = criterion.benchmark_group("record");
    group.throughput(Throughput::Elements(1));
    group.bench_function("create small record", |bencher| {
        let mut index = 0;
        bencher.iter_batched(
            Record::new,
            |mut record| {
                index += 1;
                let timestamp = Timestamp { wall_ms: index, logical: 0 };
                record.write(&key, &origin, timestamp, &Operation::Replace(small_object(index))).expect("write")
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("patch one field of a record", |bencher| {
        let mut record = Record::new();
        record.write(&key, &origin, Timestamp::default(), &Operation::Replace(small_object(0))).expect("write");
        let mut index = 0;
        bencher.iter(|| {
            index += 1;
            let patch = match json!({"orders": index}) {
                serde_json::Value::Object(map) => map,
                _ => unreachable!(),
            };
            record
                .write(&key, &origin, Timestamp { wall_ms: index, logical: 0 }, &Operation::MergePatch(patch))
                .expect("write")
        })
    });
    group.finish();
}

fn durable_writes(criterion: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let mut group = criterion.benchmark_group("engine");
    // 256 concurrent writers share group commits, as concurrent API clients do.
    const CONCURRENT: u64 = 256;
    group.throughput(Throughput::Elements(CONCURRENT));
    // The default spreads a round's CRDT work over every core; one worker is the engine thread
    // alone, as before rounds (BENCHMARKS.md, session 11).
    for (workers, suffix) in [(engine::default_workers(), ""), (1, ", one worker")] {
        let directory = tempfile::tempdir().expect("temporary directory");
        let store = store::Store::open(directory.path()).expect("store");
        let settings = EngineSettings {
            name: Some("bench".into()),
            cache_documents: NonZeroUsize::new(4096).expect("non-zero"),
            workers,
            yrs_collections: ["events".to_owned()].into_iter().collect(),
            ..EngineSettings::default()
        };
        let (engine, _thread) = engine::start(store, settings, Arc::new(Metrics::default())).expect("engine");
        for (name, collection) in [
            ("256 concurrent durable record writes", "customers"),
            ("256 concurrent durable writes, yrs engine", "events"),
        ] {
            let mut round = 0u64;
            group.bench_function(format!("{name}{suffix}"), |bencher| {
                bencher.iter(|| {
                    round += 1;
                    runtime.block_on(async {
                        let mut writes = Vec::with_capacity(CONCURRENT as usize);
                        for writer in 0..CONCURRENT {
                            let engine = engine.clone();
                            let key =
                                RecordKey::new(collection, &format!("c{}", round * CONCURRENT + writer)).expect("key");
                            writes.push(tokio::spawn(async move {
                                let operation = Operation::Replace(small_object(writer));
                                engine.write(key, operation, "bench".into()).await
                            }));
                        }
                        for write in writes {
                            write.await.expect("task").expect("write");
                        }
                    })
                })
            });
        }
    }
    group.finish();
}

/// The peer whose changes the apply benchmarks deliver.
const PEER: u8 = 9;

/// An engine with default settings on a store in `directory`.
fn plain_engine(directory: &std::path::Path) -> EngineHandle {
    let store = store::Store::open(directory).expect("store");
    let settings = EngineSettings { name: Some("bench".into()), ..EngineSettings::default() };
    engine::start(store, settings, Arc::new(Metrics::default())).expect("engine").0
}

/// A change of the peer's, as replication hands it to the engine.
fn peer_envelope(sequence: u64, timestamp: Timestamp, key: RecordKey, change: Vec<u8>) -> Envelope {
    Envelope {
        origin: OriginId([PEER; 16]),
        node: NodeId([PEER; 16]),
        sequence,
        timestamp,
        key,
        kind: DocumentKind::Record,
        change,
    }
}

/// Applies `envelopes` in one engine job: one group commit, as one peer frame's worth is.
fn apply_envelopes(runtime: &tokio::runtime::Runtime, engine: &EngineHandle, envelopes: Vec<Envelope>) {
    let applied = runtime.block_on(engine.call(move |engine| {
        envelopes.into_iter().map(|envelope| engine.apply_envelope(envelope)).collect::<Result<Vec<_>, _>>()
    }));
    assert!(applied.expect("engine").expect("applied").into_iter().all(|changed| changed), "every change applied");
}

/// The peer changes one apply benchmark applies per iteration: one peer frame's worth, applied
/// in one engine job and one group commit.
const APPLY_BATCH: u64 = 256;

/// Whether an apply benchmark's iteration also serves what it applied to a change feed reader.
#[derive(Clone, Copy, PartialEq)]
enum Feed {
    Unread,
    /// After the commit, one feed page of the iteration's events, as `GET /v1/changes` reads it
    /// for a follower at the feed's end.
    Served,
}

/// Benchmarks applying what `envelopes` makes for each iteration (given the engine and the first
/// of the iteration's [`APPLY_BATCH`] sequence numbers) through a real engine and sled store.
fn apply_benchmark(
    criterion: &mut Criterion,
    name: &str,
    feed: Feed,
    mut envelopes: impl FnMut(&tokio::runtime::Runtime, &EngineHandle, u64) -> Vec<Envelope>,
) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let directory = tempfile::tempdir().expect("temporary directory");
    let engine = plain_engine(directory.path());
    let mut first = 1u64;
    let mut group = criterion.benchmark_group("engine");
    group.throughput(Throughput::Elements(APPLY_BATCH));
    group.bench_function(name, |bencher| {
        bencher.iter_batched(
            || {
                let made = envelopes(&runtime, &engine, first);
                first += APPLY_BATCH;
                made
            },
            |envelopes| {
                let after = engine.feed.borrow().to_owned();
                apply_envelopes(&runtime, &engine, envelopes);
                if feed == Feed::Served {
                    let page = runtime.block_on(engine.call(move |engine| engine.feed_page(after, 256)));
                    let events = page.expect("engine").expect("a feed page");
                    assert!(events.len() as u64 == APPLY_BATCH && events.iter().all(|event| event.value.is_some()));
                }
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// Change envelopes from another origin, each creating a record, sequences from `first`.
fn creations(first: u64) -> Vec<Envelope> {
    (first..first + APPLY_BATCH)
        .map(|sequence| {
            let key = RecordKey::new("customers", &format!("peer{sequence}")).expect("key");
            let timestamp = Timestamp { wall_ms: sequence, logical: 0 };
            let operation = Operation::Replace(small_object(sequence));
            let change = Record::default()
                .write(&key, &OriginId([PEER; 16]), timestamp, &operation)
                .expect("write")
                .expect("a change");
            peer_envelope(sequence, timestamp, key, change)
        })
        .collect()
}

/// Catch-up of records new to the node, as the replication loop applies them, and the same
/// with a change feed follower served each batch (a connector or application at the feed's end).
fn peer_applies(criterion: &mut Criterion) {
    apply_benchmark(criterion, "apply 256 peer changes creating records", Feed::Unread, |_, _, first| creations(first));
    apply_benchmark(
        criterion,
        "apply 256 peer changes creating records and serve them to a feed",
        Feed::Served,
        |_, _, first| creations(first),
    );
}

/// Catch-up of records changed on both sides: each record was created here and patched here,
/// and patched concurrently at a peer on two of the same fields, so every apply merges
/// concurrent histories and records conflicts.
fn concurrent_applies(criterion: &mut Criterion) {
    apply_benchmark(
        criterion,
        "apply 256 peer changes concurrent with local ones",
        Feed::Unread,
        |runtime, engine, first| {
            let keys: Vec<RecordKey> = (first..first + APPLY_BATCH)
                .map(|index| RecordKey::new("customers", &format!("both{index}")).expect("key"))
                .collect();
            let created = keys.clone();
            // Created and patched here, in one job; the creations go to the peer.
            let bases = runtime
                .block_on(engine.call(move |engine| {
                    created
                        .into_iter()
                        .enumerate()
                        .map(|(index, key)| {
                            let create = Operation::Replace(small_object(index as u64));
                            let base = engine.write_record(key.clone(), create).expect("create");
                            let patch = Operation::MergePatch(small_object(index as u64 + 1_000_000));
                            engine.write_record(key, patch).expect("patch");
                            base.envelope.expect("a change").change
                        })
                        .collect::<Vec<_>>()
                }))
                .expect("engine");
            keys.into_iter()
                .zip(bases)
                .zip(first..)
                .map(|((key, base), sequence)| {
                    let mut record = Record::load(&base, &[]).expect("base loads");
                    let timestamp = Timestamp { wall_ms: sequence, logical: 0 };
                    let patch = Operation::MergePatch(match json!({"city": "Basel", "orders": sequence}) {
                        serde_json::Value::Object(map) => map,
                        _ => serde_json::Map::new(),
                    });
                    let change =
                        record.write(&key, &OriginId([PEER; 16]), timestamp, &patch).expect("write").expect("a change");
                    peer_envelope(sequence, timestamp, key, change)
                })
                .collect()
        },
    );
}

criterion_group!(benches, record_operations, durable_writes, peer_applies, concurrent_applies);
criterion_main!(benches);
