//! The conflict ledger in the engine: every time bytes from a peer (a change or a snapshot) give
//! a record's field a new set of concurrent values, an entry records the field, every value
//! with its origin and clock, the winner and the policy; and manual resolution writes a value
//! that supersedes them and marks the entries resolved.
//!
//! Detection compares the record's conflicted fields before and after the apply, by the
//! operations that wrote their values, so a conflict is recorded once when it appears (or
//! gains a value), not again at every later change to the record. Local writes never create a
//! conflict: they supersede what they have seen. Each node keeps its own ledger of what it saw
//! merge; the entries' fingerprints are equal across nodes for the same conflict.

use std::collections::BTreeMap;

use crdt::key::RecordKey;
use crdt::ledger::LedgerEntry;
use crdt::record::{Operation, Record};
use serde_json::{Map, Value};

use super::collections::candidates;
use super::{Body, Document, Engine, EngineError, WriteOutcome, physical_ms};

/// The most ledger entries one listing returns, and the most it scans to fill a filtered page.
pub const CONFLICTS_PAGE_MAX: usize = 1000;
/// The most ledger entries a manual resolution scans for the entries it resolves.
const RESOLVE_SCAN_MAX: usize = 100_000;

/// Where the ledger is: the next entry's sequence and how many it holds.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    pub(crate) next_sequence: u64,
}

/// A record's conflicted fields, each with the operations that wrote its concurrent values.
pub(crate) type Signatures = BTreeMap<String, crdt::record::WritingOperations>;

/// The conflicted fields of `document`, when it is an automerge record (the only kind that
/// keeps concurrent values).
pub(crate) fn signatures(document: &Document) -> Signatures {
    let Body::Record(record) = &document.body else { return Signatures::new() };
    signatures_of(record)
}

pub(crate) fn signatures_of(record: &Record) -> Signatures {
    record.conflict_signatures().into_iter().collect()
}

/// [`signatures`] of `document` as it was at `heads` (changes it holds).
pub(crate) fn signatures_at(document: &Document, heads: &[crdt::record::ChangeHash]) -> Signatures {
    let Body::Record(record) = &document.body else { return Signatures::new() };
    record.conflict_signatures_at(heads).into_iter().collect()
}

impl Engine {
    /// After bytes from elsewhere changed `document`: a ledger entry for every field whose set of
    /// concurrent values is new since `before` (the signatures before the change, asked for only
    /// when the record has conflicts after it), resolved under the collection's policy.
    pub(super) fn record_conflicts(
        &mut self,
        key: &RecordKey,
        document: &Document,
        before: impl FnOnce() -> Signatures,
    ) -> Result<(), EngineError> {
        let Body::Record(record) = &document.body else { return Ok(()) };
        let after = signatures_of(record);
        if after.is_empty() {
            return Ok(());
        }
        let before = before();
        let fresh: Vec<&String> = after
            .iter()
            .filter(|(field, operations)| before.get(*field) != Some(operations))
            .map(|(field, _)| field)
            .collect();
        if fresh.is_empty() {
            return Ok(());
        }
        let definition = self.definition(key.collection())?;
        for field in fresh {
            let policy = definition.as_ref().map(|definition| definition.policy(field).clone()).unwrap_or_default();
            // A field whose values do not read (nested past the depth bound, from a crafted
            // peer) gets no entry: the read of the record reports it.
            let candidates = match candidates(key, record, field, &policy) {
                Ok(candidates) => candidates,
                Err(EngineError::Corrupt { .. }) => continue,
                Err(error) => return Err(error),
            };
            let Some(resolution) = crdt::policy::resolve(&policy, &candidates) else { continue };
            let pointer = format!("/{}", crdt::json::escape_pointer(field));
            let entry = LedgerEntry::new(key.clone(), &pointer, &policy, &candidates, &resolution, physical_ms());
            let sequence = self.ledger.next_sequence;
            self.ledger.next_sequence += 1;
            self.batch.put_conflict(sequence, &entry.encode());
            self.metrics.conflicts.add(key.collection(), policy.name());
        }
        Ok(())
    }

    /// Ledger entries after `since` (by sequence), of `collection` if given: at most `limit`,
    /// scanning at most [`CONFLICTS_PAGE_MAX`] entries. Returns them with the sequence to
    /// continue after.
    pub fn conflicts_page(
        &self,
        collection: Option<&str>,
        since: u64,
        limit: usize,
    ) -> Result<(Vec<(u64, LedgerEntry)>, u64), EngineError> {
        let limit = limit.clamp(1, CONFLICTS_PAGE_MAX);
        let scanned = self.store.conflict_range(since, CONFLICTS_PAGE_MAX)?;
        let mut next = since;
        let mut entries = Vec::new();
        for (sequence, bytes) in scanned {
            next = sequence;
            let entry = decode_entry(sequence, &bytes)?;
            if collection.is_none_or(|collection| entry.key.collection() == collection) {
                entries.push((sequence, entry));
                if entries.len() == limit {
                    break;
                }
            }
        }
        Ok((entries, next))
    }

    /// One ledger entry.
    pub fn conflict(&self, sequence: u64) -> Result<Option<LedgerEntry>, EngineError> {
        self.store.conflict(sequence)?.map(|bytes| decode_entry(sequence, &bytes)).transpose()
    }

    /// Writes `value` to `field` of `key` as `principal`, superseding its concurrent values
    /// everywhere once it replicates, and marks this node's open ledger entries for that field
    /// resolved (scanning at most the newest [`RESOLVE_SCAN_MAX`] entries).
    pub fn resolve_conflict(
        &mut self,
        key: RecordKey,
        field: &str,
        value: Value,
        principal: &str,
    ) -> Result<WriteOutcome, EngineError> {
        if value.is_null() {
            return Err(EngineError::BadRequest("a resolution needs a value; to remove the field, patch it".into()));
        }
        let mut patch = Map::new();
        patch.insert(field.to_owned(), value.clone());
        let outcome = self.write_record_as(key.clone(), Operation::MergePatch(patch), principal)?;
        let pointer = format!("/{}", crdt::json::escape_pointer(field));
        let first = self.ledger.next_sequence.saturating_sub(RESOLVE_SCAN_MAX as u64);
        let mut after = first.saturating_sub(1);
        loop {
            let page = self.store.conflict_range(after, CONFLICTS_PAGE_MAX)?;
            let Some((last, _)) = page.last() else { break };
            after = *last;
            for (sequence, bytes) in page {
                let mut entry = decode_entry(sequence, &bytes)?;
                if entry.key == key && entry.field == pointer && !entry.is_resolved() {
                    entry.resolve(&value, physical_ms(), principal);
                    self.batch.put_conflict(sequence, &entry.encode());
                }
            }
        }
        Ok(outcome)
    }
}

fn decode_entry(sequence: u64, bytes: &[u8]) -> Result<LedgerEntry, EngineError> {
    LedgerEntry::decode(bytes)
        .map_err(|error| EngineError::Corrupt { key: format!("conflict {sequence}"), reason: error.to_string() })
}
