//! The quarantine: changes from peers that could not be applied (they do not decode, do not
//! apply, are of the wrong kind, or would break the collection's schema), kept with the reason instead of being dropped, so an
//! operator can look at them, retry them, or drop them. A quarantined change blocks nothing: it
//! counts as received (version vector and change log), so the peer does not send it again and
//! replication goes on; retrying applies it to the document.

use crdt::envelope::Envelope;
use serde::{Deserialize, Serialize};

use super::{Engine, EngineError, physical_ms};

/// The most quarantine entries one listing returns.
pub const QUARANTINE_PAGE_MAX: usize = 1000;
/// The most quarantined changes kept; beyond it the oldest are dropped (and counted).
pub const QUARANTINE_ENTRIES_MAX: u64 = 100_000;

/// Where the quarantine is: the next id and how many entries it holds.
#[derive(Debug, Default)]
pub(crate) struct Quarantine {
    pub(crate) next_id: u64,
    pub(crate) size: u64,
}

/// One quarantined change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuarantineEntry {
    /// The change as it travelled.
    #[serde(with = "serde_bytes")]
    pub envelope: Vec<u8>,
    pub reason: String,
    /// The peer that delivered it.
    pub peer: String,
    pub quarantined_at_ms: u64,
    pub retries: u32,
    /// For a record a connector could not apply to its database: the connector's name (the
    /// envelope is then empty and `record` names the record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connector: Option<String>,
    /// The record (collection, id) of a connector entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<(String, String)>,
}

impl QuarantineEntry {
    /// The entry as the API shows it: the change's key, origin and sequence instead of its bytes.
    pub fn summary(&self, id: u64) -> serde_json::Value {
        if let (Some(connector), Some((collection, record))) = (&self.connector, &self.record) {
            return serde_json::json!({
                "id": id,
                "collection": collection,
                "record": record,
                "connector": connector,
                "reason": self.reason,
                "quarantined_at_ms": self.quarantined_at_ms,
                "retries": self.retries,
            });
        }
        let envelope = Envelope::decode(&self.envelope).ok();
        serde_json::json!({
            "id": id,
            "collection": envelope.as_ref().map(|envelope| envelope.key.collection().to_owned()),
            "record": envelope.as_ref().map(|envelope| envelope.key.id().to_owned()),
            "origin": envelope.as_ref().map(|envelope| envelope.origin.to_string()),
            "origin_sequence": envelope.as_ref().map(|envelope| envelope.sequence),
            "bytes": self.envelope.len(),
            "reason": self.reason,
            "peer": self.peer,
            "quarantined_at_ms": self.quarantined_at_ms,
            "retries": self.retries,
        })
    }
}

/// The size of the quarantine in `store`, counted at start.
pub(crate) fn open(store: &store::Store) -> Result<Quarantine, EngineError> {
    let mut quarantine = Quarantine { next_id: 1, size: 0 };
    let mut after = 0;
    loop {
        let page = store.quarantine_range(after, QUARANTINE_PAGE_MAX)?;
        let Some((last, _)) = page.last() else { break };
        after = *last;
        quarantine.size += page.len() as u64;
        quarantine.next_id = after + 1;
    }
    Ok(quarantine)
}

impl Engine {
    /// Applies a change from peer `peer`; one that cannot be applied goes to the quarantine
    /// with the reason, and counts as received. Returns whether the document changed.
    pub fn apply_or_quarantine(&mut self, envelope: Envelope, peer: &str) -> Result<bool, EngineError> {
        let kept = envelope.clone();
        match self.apply_envelope(envelope) {
            Ok(changed) => Ok(changed),
            Err(
                error @ (EngineError::BadChange { .. }
                | EngineError::WrongKind { .. }
                | EngineError::Corrupt { .. }
                | EngineError::Invalid(_)),
            ) => {
                self.quarantine(&kept, error.to_string(), peer);
                Err(error)
            }
            Err(other) => Err(other),
        }
    }

    fn quarantine(&mut self, envelope: &Envelope, reason: String, peer: &str) {
        let entry = QuarantineEntry {
            envelope: envelope.encode(),
            reason,
            peer: peer.to_owned(),
            quarantined_at_ms: physical_ms(),
            retries: 0,
            connector: None,
            record: None,
        };
        self.keep_in_quarantine(&entry);
        // Received all the same: the log and the version vector hold it, so nothing waits for it.
        self.batch.put_log(envelope.origin.as_bytes(), envelope.sequence, &envelope.encode());
        self.version_vector.insert(envelope.origin, envelope.sequence);
        self.counters_dirty = true;
        self.metrics.quarantined.inc();
    }

    /// Quarantines a record that connector `connector` could not write to its database.
    pub fn quarantine_connector_apply(&mut self, connector: &str, collection: &str, id: &str, reason: String) {
        let entry = QuarantineEntry {
            envelope: Vec::new(),
            reason,
            peer: String::new(),
            quarantined_at_ms: physical_ms(),
            retries: 0,
            connector: Some(connector.to_owned()),
            record: Some((collection.to_owned(), id.to_owned())),
        };
        self.keep_in_quarantine(&entry);
        self.metrics.quarantined.inc();
    }

    /// Ends a connector's retry of entry `id`: gone on success, kept with the new reason else.
    pub fn finish_connector_retry(&mut self, id: u64, outcome: Result<(), String>) -> Result<(), EngineError> {
        let Some(mut entry) = self.quarantined(id)? else { return Ok(()) };
        match outcome {
            Ok(()) => {
                self.batch.remove_quarantine(id);
                self.quarantine.size = self.quarantine.size.saturating_sub(1);
            }
            Err(reason) => {
                entry.reason = reason;
                entry.retries = entry.retries.saturating_add(1);
                self.batch.put_quarantine(id, &rmp_serde::to_vec_named(&entry).unwrap_or_default());
            }
        }
        Ok(())
    }

    /// Stores `entry` under the next id, dropping the oldest beyond the bound.
    fn keep_in_quarantine(&mut self, entry: &QuarantineEntry) {
        let id = self.quarantine.next_id;
        self.quarantine.next_id += 1;
        self.batch.put_quarantine(id, &rmp_serde::to_vec_named(entry).unwrap_or_default());
        self.quarantine.size += 1;
        if self.quarantine.size > QUARANTINE_ENTRIES_MAX {
            // The oldest entry still there goes; ids are dense enough that this finds it soon.
            if let Ok(page) = self.store.quarantine_range(0, 1)
                && let Some((oldest, _)) = page.first()
            {
                self.batch.remove_quarantine(*oldest);
                self.quarantine.size -= 1;
            }
        }
    }

    /// Entries after id `after`, at most `limit`.
    pub fn quarantine_page(&self, after: u64, limit: usize) -> Result<Vec<(u64, QuarantineEntry)>, EngineError> {
        self.store
            .quarantine_range(after, limit.clamp(1, QUARANTINE_PAGE_MAX))?
            .into_iter()
            .map(|(id, bytes)| Ok((id, decode_entry(id, &bytes)?)))
            .collect()
    }

    pub fn quarantined(&self, id: u64) -> Result<Option<QuarantineEntry>, EngineError> {
        self.store.quarantined(id)?.map(|bytes| decode_entry(id, &bytes)).transpose()
    }

    /// How many changes are in quarantine.
    pub fn quarantine_size(&self) -> u64 {
        self.quarantine.size
    }

    /// Removes entry `id` without applying it. Returns whether it was there.
    pub fn drop_quarantined(&mut self, id: u64) -> Result<bool, EngineError> {
        if self.store.quarantined(id)?.is_none() {
            return Ok(false);
        }
        self.batch.remove_quarantine(id);
        self.quarantine.size = self.quarantine.size.saturating_sub(1);
        Ok(true)
    }

    /// Applies entry `id` again (after a fix: a definition, a new node version). On success the
    /// entry leaves the quarantine; on failure it stays with the new reason. `None` when there
    /// is no such entry.
    pub fn retry_quarantined(&mut self, id: u64) -> Result<Option<Result<bool, String>>, EngineError> {
        let Some(mut entry) = self.quarantined(id)? else { return Ok(None) };
        let envelope = Envelope::decode(&entry.envelope)
            .map_err(|error| EngineError::Corrupt { key: format!("quarantine {id}"), reason: error.to_string() });
        let result = envelope.and_then(|envelope| self.apply_held_envelope(envelope));
        match result {
            Ok(changed) => {
                self.batch.remove_quarantine(id);
                self.quarantine.size = self.quarantine.size.saturating_sub(1);
                Ok(Some(Ok(changed)))
            }
            Err(error) => {
                entry.reason = error.to_string();
                entry.retries = entry.retries.saturating_add(1);
                self.batch.put_quarantine(id, &rmp_serde::to_vec_named(&entry).unwrap_or_default());
                Ok(Some(Err(entry.reason)))
            }
        }
    }
}

fn decode_entry(id: u64, bytes: &[u8]) -> Result<QuarantineEntry, EngineError> {
    rmp_serde::from_slice(bytes)
        .map_err(|error| EngineError::Corrupt { key: format!("quarantine {id}"), reason: error.to_string() })
}
