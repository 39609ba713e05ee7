//! Bootstrap and retention in the engine: the store as the replication core's [`Source`]
//! (change log and documents), merging snapshot records from a peer, and trimming the change
//! log by age, which raises the log floors.
//!
//! The policy, in short (ARCHITECTURE.md has the whole of it): the change log keeps every change
//! younger than `log_retention` (by its origin's clock), and always everything at and above an
//! origin's first gap. Older entries are deleted a few thousand at a time, and each origin's
//! *log floor* moves past them. A peer that lacks a change below a floor, or holds none of what
//! this node holds, is sent documents (a snapshot) instead of changes.

use std::time::{Duration, Instant};

use crdt::envelope::{DocumentKind, Envelope};
use crdt::identity::OriginId;
use crdt::key::RecordKey;
use crdt::replica::{SnapshotRecord, Source};
use crdt::version_vector::VersionVector;
use serde_bytes::ByteBuf;
use store::Store;

use super::feed::FeedEntry;
use super::{
    After, Before, Document, DocumentEntry, Engine, EngineError, TRIM_ENTRIES_PER_STEP, encode_entry, physical_ms,
};

/// The most bytes one snapshot record carries. A larger document travels as several records
/// with the same key, each a run of its stored parts; compaction never makes one part larger
/// than this (see `compact_some`), so every stored document can travel.
pub const SNAPSHOT_RECORD_BYTES_MAX: usize = 8 << 20;

/// The default retention: a week, so a site offline for days still catches up from the log.
pub const LOG_RETENTION_DEFAULT: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// The store as the replication core reads it: durable state only (the engine's staged batch
/// is not in sled until it commits).
pub(crate) struct StoreSource<'a>(pub &'a Store);

impl Source for StoreSource<'_> {
    fn changes(&self, origin: &OriginId, from: u64, limit: usize) -> Vec<Envelope> {
        match self.0.log_range(origin.as_bytes(), from, limit) {
            Ok(entries) => entries
                .into_iter()
                .filter_map(|(sequence, bytes)| match Envelope::decode(&bytes) {
                    Ok(envelope) => Some(envelope),
                    Err(error) => {
                        tracing::warn!(%origin, sequence, %error, "skipping a change-log entry that does not decode");
                        None
                    }
                })
                .collect(),
            Err(error) => {
                tracing::warn!(%origin, %error, "cannot read the change log");
                Vec::new()
            }
        }
    }

    fn records(&self, after: Option<&RecordKey>, limit: usize) -> Vec<SnapshotRecord> {
        let after = after.map(RecordKey::to_bytes);
        let keys = match self.0.document_keys(&[], after.as_deref(), limit) {
            Ok(keys) => keys,
            Err(error) => {
                tracing::warn!(%error, "cannot list documents for a snapshot");
                return Vec::new();
            }
        };
        keys.iter().flat_map(|key| snapshot_records(self.0, key)).collect()
    }
}

/// One stored document as snapshot records: its saved state and its increments as separate
/// parts, applied one by one at the peer, in runs of at most [`SNAPSHOT_RECORD_BYTES_MAX`] bytes
/// (one record unless the document is large). None, logged, when it cannot travel. (Parts joined
/// into one automerge input lost a non-canonical change that loaded alone: found by the
/// `record_changes` fuzzer.)
fn snapshot_records(store: &Store, key_bytes: &[u8]) -> Vec<SnapshotRecord> {
    snapshot_parts(store, key_bytes).map(|(key, kind, parts)| split_into_records(key, kind, parts)).unwrap_or_default()
}

/// Runs of parts of at most [`SNAPSHOT_RECORD_BYTES_MAX`] bytes each, as records of `key`.
fn split_into_records(key: RecordKey, kind: DocumentKind, parts: Vec<ByteBuf>) -> Vec<SnapshotRecord> {
    let mut records: Vec<SnapshotRecord> = Vec::new();
    let mut run: Vec<ByteBuf> = Vec::new();
    let mut run_bytes = 0;
    for part in parts {
        if !run.is_empty() && run_bytes + part.len() > SNAPSHOT_RECORD_BYTES_MAX {
            records.push(SnapshotRecord { key: key.clone(), kind, parts: std::mem::take(&mut run) });
            run_bytes = 0;
        }
        run_bytes += part.len();
        run.push(part);
    }
    if !run.is_empty() {
        records.push(SnapshotRecord { key, kind, parts: run });
    }
    records
}

/// A stored document's key, kind and non-empty parts, or `None` (logged) when it cannot travel.
fn snapshot_parts(store: &Store, key_bytes: &[u8]) -> Option<(RecordKey, DocumentKind, Vec<ByteBuf>)> {
    let key = match RecordKey::from_bytes(key_bytes) {
        Ok(key) => key,
        Err(error) => {
            tracing::warn!(%error, "leaving a document with a damaged key out of a snapshot");
            return None;
        }
    };
    let stored = match store.document(key_bytes) {
        Ok(Some(stored)) => stored,
        Ok(None) => return None,
        Err(error) => {
            tracing::warn!(%key, %error, "leaving a document that does not read out of a snapshot");
            return None;
        }
    };
    let decoded = DocumentEntry::decode(&key, &stored.value).map(|entry| (entry.kind, entry.into_saved(store, &key)));
    let (kind, saved) = match decoded {
        Ok((kind, Ok(saved))) => (kind, saved),
        Ok((_, Err(error))) | Err(error) => {
            tracing::warn!(%key, %error, "leaving a damaged document out of a snapshot");
            return None;
        }
    };
    let parts: Vec<ByteBuf> = std::iter::once(saved)
        .chain(stored.increments.into_iter().map(|(_, bytes)| bytes))
        .filter(|part| !part.is_empty())
        .map(ByteBuf::from)
        .collect();
    if let Some(part) = parts.iter().find(|part| part.len() > SNAPSHOT_RECORD_BYTES_MAX) {
        // Not made by this node (compaction keeps parts below the bound): an old store.
        tracing::warn!(%key, bytes = part.len(), "leaving a document with a part too large for a message out of a snapshot");
        return None;
    }
    Some((key, kind, parts))
}

impl Engine {
    /// Merges a document from a peer's snapshot into the local one. Returns whether it changed.
    /// The parts go through the same checked paths as changes; a refused part leaves the
    /// document as it was.
    pub(crate) fn apply_snapshot_record(&mut self, record: SnapshotRecord) -> Result<bool, EngineError> {
        let key = record.key.clone();
        let mut document = match self.take_document(&key)? {
            Some(document) => document,
            None => self.empty_document(record.kind),
        };
        let result = self.merge_snapshot_record(&mut document, &record);
        if document.stored {
            self.put_back(key, document);
        }
        result
    }

    fn merge_snapshot_record(&mut self, document: &mut Document, record: &SnapshotRecord) -> Result<bool, EngineError> {
        let before = Before::of(document, &record.key);
        let signatures = super::conflicts::signatures(document);
        // A text's saved state may be larger than one update may be; the document bound holds.
        let limits = crdt::text::TextLimits {
            update_bytes_max: self.text_limits.update_bytes_max.max(self.text_limits.document_bytes_max),
            ..self.text_limits
        };
        let mut changed = false;
        for part in &record.parts {
            let part_changed = document.body.apply(&record.key, record.kind, part, &limits)?;
            // Applied parts are kept as the document's increments whether or not they showed:
            // a part held back for missing dependencies is state all the same.
            self.stage_bytes(document, &record.key, record.kind, part, None);
            changed |= part_changed;
        }
        if changed {
            self.record_conflicts(&record.key, document, || signatures)?;
        }
        // The document took a whole other history in: compact it soon.
        if self.compaction_queued.insert(record.key.clone()) {
            self.compaction.push_back(record.key.clone());
        }
        let timestamp = self.clock.tick(physical_ms());
        // A snapshot is not one change: its feed event names no origin (all zeros, sequence 0).
        let feed = changed.then(|| FeedEntry {
            key: record.key.clone(),
            kind: record.kind,
            origin: OriginId([0; 16]),
            sequence: 0,
            timestamp,
            appended_ms: timestamp.wall_ms,
        });
        self.stage_accounting(&record.key, before, After::of(document, &record.key), feed);
        self.stage_audit_snapshot(&record.key);
        Ok(changed)
    }

    /// A snapshot from a peer is complete: this node now holds `version_vector` too, without
    /// those changes' envelopes, so the log floors rise past them. Staged with the batch, so it
    /// is durable with (or after) the records before it.
    pub(crate) fn apply_snapshot_end(&mut self, version_vector: &VersionVector) {
        crdt::replica::raise_log_floors(&mut self.log_floors, &self.version_vector, version_vector);
        self.version_vector.merge(version_vector);
        self.counters_dirty = true;
        self.floors_dirty = true;
    }

    /// Deletes change-log entries older than the retention period, a bounded number per call,
    /// and only within each origin's gap-free prefix (so a floor never passes a gap). Runs when
    /// due; the replication core hears of the new floors after the commit.
    pub(crate) fn trim_log_if_due(&mut self, now: Instant) {
        if !self.retention.take_due(now) {
            return;
        }
        let cutoff_ms = self.retention.cutoff_ms();
        let mut budget = TRIM_ENTRIES_PER_STEP;
        let origins: Vec<(OriginId, u64)> =
            self.version_vector.origins().map(|(origin, range)| (*origin, range.contiguous)).collect();
        for (origin, contiguous) in origins {
            if budget == 0 {
                // More to do: come back soon rather than a whole interval later.
                self.retention.again(now);
                break;
            }
            let floor = self.log_floors.get(&origin).copied().unwrap_or(1);
            if floor > contiguous {
                continue;
            }
            let limit = usize::try_from(contiguous - floor + 1).unwrap_or(usize::MAX).min(budget);
            let entries = match self.store.log_range(origin.as_bytes(), floor, limit) {
                Ok(entries) => entries,
                Err(error) => {
                    tracing::warn!(%origin, %error, "cannot read the change log to trim it");
                    continue;
                }
            };
            let mut new_floor = floor;
            for (sequence, bytes) in entries {
                // The log is gap-free up to `contiguous`; a hole means the floor cannot pass it.
                if sequence != new_floor || sequence > contiguous {
                    break;
                }
                // An entry that does not decode is of no use to any peer: trim it too.
                if let Ok(envelope) = Envelope::decode(&bytes)
                    && (envelope.timestamp.wall_ms >= cutoff_ms || !self.keep_first_change(origin, sequence, envelope))
                {
                    break;
                }
                self.batch.remove_log(origin.as_bytes(), sequence);
                budget -= 1;
                new_floor = sequence + 1;
            }
            if new_floor > floor {
                self.log_floors.insert(origin, new_floor);
                self.floors_dirty = true;
                self.metrics.log_entries_trimmed.add(new_floor - floor);
            }
        }
    }

    /// Before the log entry (`origin`, `sequence`) is trimmed: a document still stored as a
    /// pointer to it (see `DocumentEntry::logged`) gets the change's bytes back, in the same
    /// batch. False when that cannot be decided now, because the document changed in the batch
    /// being built: the trim stops there and goes on at a later step.
    fn keep_first_change(&mut self, origin: OriginId, sequence: u64, envelope: Envelope) -> bool {
        if self.dirty.contains(&envelope.key) {
            return false;
        }
        let key_bytes = envelope.key.to_bytes();
        let stored = match self.store.document_value(&key_bytes) {
            Ok(Some(stored)) => stored,
            Ok(None) => return true,
            Err(error) => {
                tracing::warn!(key = %envelope.key, %error, "cannot read a document before trimming its change");
                return false;
            }
        };
        match DocumentEntry::decode(&envelope.key, &stored) {
            Ok(entry) if entry.logged == Some((origin, sequence)) => {
                self.batch.put_document(&key_bytes, &encode_entry(entry.kind, envelope.change));
                self.metrics.first_changes_kept.inc();
            }
            Ok(_) => {}
            // Damaged already; trimming the change does not make it worse.
            Err(error) => tracing::warn!(key = %envelope.key, %error, "a damaged document entry"),
        }
        true
    }
}
