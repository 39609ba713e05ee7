//! Micro-benchmarks of replication without the network: a merge of concurrent changes, the wire
//! encoding of a full Changes message, catch-up of N changes through the sans-IO replication
//! core (two cores exchanging in memory, applying into real records), and the automerge record
//! path against plain yrs maps on the same operation mix.
//!
//! Run with `cargo bench --bench replication`. Results and method are in BENCHMARKS.md.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crdt::clock::Timestamp;
use crdt::envelope::{DocumentKind, Envelope};
use crdt::identity::{NodeId, OriginId};
use crdt::key::RecordKey;
use crdt::memory::MemorySource;
use crdt::record::{Operation, Record};
use crdt::replica::{Apply, Durable, LogFloors, Message, Replica, Settings};
use crdt::version_vector::VersionVector;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::{Map, Value, json};
use yrs::{Map as _, Transact as _};

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// The operation mix both record paths run: a create, then field patches, one in five a counter.
fn operation(index: u64) -> Operation {
    match index % 5 {
        0 => Operation::Replace(object(json!({"name": format!("customer {index}"), "city": "Zürich", "orders": 0}))),
        4 => Operation::Increment { field: "visits".into(), by: 1 },
        _ => {
            let status = ["new", "paid", "sent"][index as usize % 3];
            Operation::MergePatch(object(json!({"orders": index, "status": status})))
        }
    }
}

/// `count` envelopes written at one origin, over `records` records.
fn history(origin_byte: u8, records: u64, count: u64) -> (Vec<Envelope>, BTreeMap<RecordKey, Record>) {
    let origin = OriginId([origin_byte; 16]);
    let mut documents: BTreeMap<RecordKey, Record> = BTreeMap::new();
    let mut envelopes = Vec::new();
    for index in 0..count {
        let key = RecordKey::new("customers", &format!("c{}", index % records)).expect("valid key");
        let record = documents.entry(key.clone()).or_default();
        let timestamp = Timestamp { wall_ms: index, logical: 0 };
        // Every operation changes its record: a create first, then the mix with fresh values.
        let operation = if index < records { operation(0) } else { operation(index) };
        let Some(change) = record.write(&key, &origin, timestamp, &operation).expect("write") else { continue };
        envelopes.push(Envelope {
            origin,
            node: NodeId([origin_byte; 16]),
            sequence: envelopes.len() as u64 + 1,
            timestamp,
            key,
            kind: DocumentKind::Record,
            change,
        });
    }
    (envelopes, documents)
}

fn merge(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("merge");
    // Two replicas edit the same record concurrently, 50 changes each; merge one into the other.
    let key = RecordKey::new("customers", "shared").expect("valid key");
    let mut base = Record::new();
    base.write(&key, &OriginId([9; 16]), Timestamp::default(), &operation(0)).expect("write");
    let mut first = base.clone();
    let mut second = base.clone();
    let mut second_changes = Vec::new();
    for index in 1..=50u64 {
        let timestamp = Timestamp { wall_ms: index, logical: 0 };
        first.write(&key, &OriginId([1; 16]), timestamp, &operation(index)).expect("write");
        if let Some(change) = second.write(&key, &OriginId([2; 16]), timestamp, &operation(index + 1)).expect("write") {
            second_changes.push(change);
        }
    }
    group.throughput(Throughput::Elements(second_changes.len() as u64));
    group.bench_function("50 concurrent changes into a record", |bencher| {
        bencher.iter_batched(
            || first.clone(),
            |mut record| {
                for change in &second_changes {
                    record.apply_changes(change).expect("apply");
                }
                record
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn wire(criterion: &mut Criterion) {
    let (envelopes, _) = history(1, 64, 256);
    let message = Message::Changes { envelopes };
    let encoded = message.encode();
    let mut group = criterion.benchmark_group("wire");
    group.throughput(Throughput::Elements(256));
    group.bench_function("encode a Changes message of 256 envelopes", |bencher| bencher.iter(|| message.encode()));
    group.bench_function("decode a Changes message of 256 envelopes", |bencher| {
        bencher.iter(|| Message::decode(&encoded).expect("decodes"))
    });
    group.finish();
}

/// A node holding `envelopes` (and the records they made) catches up one that shares the first
/// `shared` of them; the cores exchange in memory and the receiver applies into real records.
/// Returns how many changes crossed.
fn catch_up(envelopes: &[Envelope], shared: usize) -> usize {
    let now = Instant::now();
    let mut nodes = [MemorySource::<Record>::default(), MemorySource::<Record>::default()];
    let mut held = [VersionVector::new(), VersionVector::new()];
    for (index, envelope) in envelopes.iter().enumerate() {
        for node in if index < shared { &[0, 1][..] } else { &[0][..] } {
            let record = nodes[*node].records.entry(envelope.key.clone()).or_default();
            record.apply_changes(&envelope.change).expect("apply");
            nodes[*node].log.insert((envelope.origin, envelope.sequence), envelope.clone());
            held[*node].insert(envelope.origin, envelope.sequence);
        }
    }
    let mut replicas = [
        Replica::new(held[0].clone(), LogFloors::new(), Settings::default(), now),
        Replica::new(held[1].clone(), LogFloors::new(), Settings::default(), now),
    ];
    replicas[0].handle_peer_connected(now, 1);
    replicas[1].handle_peer_connected(now, 0);
    let mut crossed = 0;
    loop {
        let mut moved = false;
        for from in 0..2 {
            while let Some((_, message)) = replicas[from].poll_transmit() {
                moved = true;
                if let Message::Changes { envelopes } = &message {
                    crossed += envelopes.len();
                }
                let to = 1 - from;
                replicas[to].handle_peer_message(now, from as u64, message, &nodes[to]).expect("protocol");
                let mut durable = Vec::new();
                while let Some((source, apply)) = replicas[to].poll_apply() {
                    if let Apply::Change(envelope) = apply {
                        let record = nodes[to].records.entry(envelope.key.clone()).or_default();
                        record.apply_changes(&envelope.change).expect("apply");
                        durable.push(Durable::Change {
                            source: Some(source),
                            origin: envelope.origin,
                            sequence: envelope.sequence,
                        });
                        nodes[to].log.insert((envelope.origin, envelope.sequence), envelope);
                    }
                }
                replicas[to].handle_durable(now, &durable, &nodes[to]);
            }
        }
        if !moved {
            return crossed;
        }
    }
}

fn catch_up_benchmark(criterion: &mut Criterion) {
    let (envelopes, _) = history(1, 1_000, 12_000);
    let mut group = criterion.benchmark_group("catch-up");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(10_000));
    group.bench_function("10,000 missed changes over 1,000 records, in memory", |bencher| {
        bencher.iter(|| assert_eq!(catch_up(&envelopes, 2_000), 10_000))
    });
    group.finish();
}

fn engines(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("record engines");
    group.throughput(Throughput::Elements(100));
    let origin = OriginId([1; 16]);
    group.bench_function("automerge record: 100 operations of the mix", |bencher| {
        bencher.iter(|| {
            let key = RecordKey::new("customers", "c1").expect("valid key");
            let mut record = Record::new();
            for index in 0..100u64 {
                let timestamp = Timestamp { wall_ms: index, logical: 0 };
                record.write(&key, &origin, timestamp, &operation(index)).expect("write");
            }
            record
        })
    });
    group.bench_function("yrs map: 100 operations of the mix", |bencher| {
        bencher.iter(|| {
            let document = yrs::Doc::with_client_id(1);
            let map = document.get_or_insert_map("record");
            let mut updates = Vec::with_capacity(100);
            for index in 0..100u64 {
                let mut transaction = document.transact_mut();
                match operation(index) {
                    Operation::Replace(fields) | Operation::MergePatch(fields) => {
                        for (field, value) in fields {
                            map.insert(&mut transaction, field, value.to_string());
                        }
                    }
                    // No counters in a yrs map: last writer wins on a number.
                    Operation::Increment { field, by } => {
                        map.insert(&mut transaction, field, by as f64 + index as f64);
                    }
                    Operation::Delete => {}
                }
                updates.push(transaction.encode_update_v1());
            }
            updates
        })
    });
    group.finish();
}

criterion_group!(benches, merge, wire, catch_up_benchmark, engines);
criterion_main!(benches);
