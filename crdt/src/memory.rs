//! An in-memory change log and document store: a replication [`Source`] for simulations, tests,
//! benchmarks and fuzzing, where the node's store would be.

use std::collections::BTreeMap;
use std::ops::Bound;

use serde_bytes::ByteBuf;

use crate::envelope::{DocumentKind, Envelope};
use crate::identity::OriginId;
use crate::key::RecordKey;
use crate::record::Record;
use crate::replica::{SnapshotRecord, Source};

/// What a [`MemorySource`] keeps per document: anything it can hand out as a snapshot record.
pub trait Snapshot {
    fn snapshot_record(&self, key: &RecordKey) -> SnapshotRecord;
}

impl Snapshot for SnapshotRecord {
    fn snapshot_record(&self, _key: &RecordKey) -> SnapshotRecord {
        self.clone()
    }
}

impl Snapshot for Record {
    fn snapshot_record(&self, key: &RecordKey) -> SnapshotRecord {
        SnapshotRecord { key: key.clone(), kind: DocumentKind::Record, parts: vec![ByteBuf::from(self.save())] }
    }
}

/// A change log by (origin, sequence) and documents by key.
#[derive(Debug, Clone)]
pub struct MemorySource<Document> {
    pub log: BTreeMap<(OriginId, u64), Envelope>,
    pub records: BTreeMap<RecordKey, Document>,
}

impl<Document> Default for MemorySource<Document> {
    fn default() -> Self {
        MemorySource { log: BTreeMap::new(), records: BTreeMap::new() }
    }
}

impl<Document: Snapshot> Source for MemorySource<Document> {
    fn changes(&self, origin: &OriginId, from: u64, limit: usize) -> Vec<Envelope> {
        self.log
            .range((*origin, from)..=(*origin, u64::MAX))
            .take(limit)
            .map(|(_, envelope)| envelope.clone())
            .collect()
    }

    fn records(&self, after: Option<&RecordKey>, limit: usize) -> Vec<SnapshotRecord> {
        let start = match after {
            Some(key) => Bound::Excluded(key),
            None => Bound::Unbounded,
        };
        self.records
            .range::<RecordKey, _>((start, Bound::Unbounded))
            .take(limit)
            .map(|(key, document)| document.snapshot_record(key))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::NodeId;

    #[test]
    fn reads_changes_of_one_origin_from_a_sequence_and_records_after_a_key() {
        let mut source: MemorySource<Record> = MemorySource::default();
        let origin = OriginId([1; 16]);
        for sequence in 1..=5 {
            let key = RecordKey::new("items", &format!("i{sequence}")).unwrap_or_else(|error| panic!("{error}"));
            let envelope = Envelope {
                origin,
                node: NodeId([1; 16]),
                sequence,
                timestamp: Default::default(),
                key: key.clone(),
                kind: DocumentKind::Record,
                change: Vec::new(),
            };
            source.log.insert((origin, sequence), envelope);
            source.log.insert((OriginId([2; 16]), sequence), source.log[&(origin, sequence)].clone());
            source.records.insert(key, Record::new());
        }
        let sequences: Vec<u64> = source.changes(&origin, 2, 3).iter().map(|envelope| envelope.sequence).collect();
        assert_eq!(sequences, vec![2, 3, 4]);
        let after = RecordKey::new("items", "i3").unwrap_or_else(|error| panic!("{error}"));
        let keys: Vec<String> = source.records(Some(&after), 10).iter().map(|record| record.key.to_string()).collect();
        assert_eq!(keys, vec!["items/i4", "items/i5"]);
    }
}
