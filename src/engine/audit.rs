//! The audit trail in the node: one hash-chained entry ([`crdt::audit`]) for every change the
//! engine applies (local writes, changes from peers, snapshot records), staged in the same store
//! batch as the change, so both are durable together; who brought the change (an API token, a
//! peer); retention (the oldest entries are deleted behind an anchor kept in the store's
//! metadata); and reading the log back for `tail`, `export` and `verify`.
//!
//! It is not the chain's format or its checks (pure, in `crdt::audit`), and not the HTTP side
//! (`api`).
//!
//! # What an entry says
//! - **time**: the engine's physical clock when the change was applied here, in milliseconds.
//! - **origin**: the name of the node that made the change: this node's name for a local write;
//!   for a change from a peer, the name of the node that made it (the envelope's node id) when
//!   this node knows that node as a peer, connected or remembered, else that node id in hex; for
//!   a snapshot record, which merges a whole document rather than one change, the delivering
//!   peer's name.
//! - **principal**: the API token's name for a local write (`local` when the node has no tokens,
//!   or for engine callers that name none); the delivering peer's certificate name for a change
//!   or snapshot record from a peer.
//! - **fields**: for a local record write, the top-level fields the operation touched: a merge
//!   patch's keys, an increment's field, `*` for a delete, and for a replace the fields whose
//!   values differ from the record before it (added, changed or removed). `*` for a text, and for
//!   everything from a peer: the origin's own entry lists the fields, and working them out here
//!   would cost two document reads per change on the replication path.
//!
//! # Reading the log
//! [`audit_page`], [`verify_store`] and [`export_page`] read the store directly (reads only,
//! which a [`Store`] serves beside the engine's commits), so a long verification or export runs
//! on a blocking thread instead of stalling the engine's writes.

use std::cell::Cell;
use std::time::{Duration, Instant};

use crdt::audit::{Anchor, AuditEntry, Chain, Digest, NAME_BYTES_MAX, Tamper, Verified};
use crdt::identity::NodeId;
use crdt::key::RecordKey;
use crdt::record::Operation;
use crdt::replica::PeerId;
use serde::Serialize;
use serde_json::{Map, Value};
use store::Store;

use super::collections::is_system_collection;
use super::writes::{Answer, AnswerKind};
use super::{Document, Engine, EngineError, Retention, TRIM_ENTRIES_PER_STEP, WriteOutcome, physical_ms};

/// How long audit entries are kept unless configured: 90 days.
pub const AUDIT_RETENTION_DEFAULT: Duration = Duration::from_secs(90 * 24 * 60 * 60);
/// The principal of a local write made without a token (a node without tokens, or an engine
/// caller that names none).
pub const LOCAL_PRINCIPAL: &str = "local";
/// The field list of a change whose fields are not worked out: a delete, a text, a peer's change.
pub const ALL_FIELDS: &str = "*";
/// The most entries one page of [`audit_page`] or [`export_page`] returns.
pub const AUDIT_PAGE_MAX: usize = 1000;
/// The meta entry that holds the trim anchor ([`Anchor::encode`]).
const ANCHOR_META: &str = "audit_anchor";
/// How many times [`verify_store`] starts again when retention trimmed the log under it.
const VERIFY_ATTEMPTS_MAX: usize = 3;

/// The audit state the engine thread keeps.
#[derive(Debug)]
pub(crate) struct AuditTrail {
    /// The last entry made (staged or durable): the next entry links to it.
    chain: Chain,
    /// The last entry trimmed away (genesis before any): where the log starts. Updated when a
    /// trim is staged, so the next step continues after it.
    anchor: Anchor,
    /// How long entries are kept; a zero period keeps them all.
    retention: Retention,
    /// Who the change being applied now is attributed to, set around a write or a peer's
    /// message; `None` outside them (an engine caller that names no one).
    pub(super) attribution: Option<Attribution>,
}

#[derive(Debug, Clone)]
pub(super) enum Attribution {
    /// An API request or another local caller. `fields`, for a record write, are those the
    /// operation touched; `None` lists [`ALL_FIELDS`].
    Local { principal: String, fields: Option<Vec<String>> },
    /// A change or snapshot record delivered by the peer with this certificate name.
    Peer { name: String },
}

impl AuditTrail {
    /// Resumes the log from the store: after its last entry, or after the trim anchor when
    /// retention left no entry. A damaged anchor is an error, like any damaged metadata; a
    /// damaged last entry is logged and followed (verification reports it).
    pub(crate) fn open(store: &Store, retention: Duration) -> Result<AuditTrail, EngineError> {
        let anchor = stored_anchor(store)?;
        let head = match store.audit_last()? {
            Some((sequence, _)) if sequence <= anchor.sequence => anchor,
            Some((sequence, bytes)) => match AuditEntry::decode(&bytes) {
                Ok(entry) if entry.sequence == sequence => Anchor::of(&entry),
                _ => {
                    tracing::warn!(
                        sequence,
                        "the last audit entry is damaged; new entries follow it, and verify reports it"
                    );
                    Anchor { sequence, hash: Digest::default() }
                }
            },
            None => anchor,
        };
        Ok(AuditTrail { chain: Chain::resume(head), anchor, retention: Retention::new(retention), attribution: None })
    }
}

/// The audit log's ends, as status reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AuditStatus {
    /// The newest entry's sequence (the anchor's when the log is empty).
    pub sequence: u64,
    /// The newest entry's hash: keep it elsewhere to detect a later removal of the newest
    /// entries (`concord audit verify --head SEQUENCE:HASH`).
    pub hash: Digest,
    /// The last sequence trimmed away by retention (0 before any).
    pub anchor_sequence: u64,
}

/// Attribution and staging.
impl Engine {
    /// Applies a local record write on behalf of `principal` (an API token's name), and records
    /// the fields it touched in the audit entry. [`Engine::write_record`] is this with
    /// [`LOCAL_PRINCIPAL`].
    pub fn write_record_as(
        &mut self,
        key: RecordKey,
        operation: Operation,
        principal: &str,
    ) -> Result<WriteOutcome, EngineError> {
        self.write_attributed_as(key, operation, principal, AnswerKind::View)?.try_map_answer(Answer::into_view)
    }

    /// [`Engine::write_record_as`] answering only the record's version, as a batch does: it
    /// saves reading the record back.
    pub fn write_version_as(
        &mut self,
        key: RecordKey,
        operation: Operation,
        principal: &str,
    ) -> Result<WriteOutcome<String>, EngineError> {
        self.write_attributed_as(key, operation, principal, AnswerKind::Version)?
            .try_map_answer(|answer| Ok(answer.into_version()))
    }

    fn write_attributed_as(
        &mut self,
        key: RecordKey,
        operation: Operation,
        principal: &str,
        answer: AnswerKind,
    ) -> Result<WriteOutcome<Answer>, EngineError> {
        if is_system_collection(key.collection()) {
            return Err(EngineError::SystemCollection(key.collection().to_owned()));
        }
        self.write_now(key, operation, Some(principal), answer)
    }

    /// Runs `work` with the changes it makes attributed to `principal` (texts, say), listing
    /// [`ALL_FIELDS`] unless a record write inside says otherwise.
    pub fn with_principal<T>(&mut self, principal: &str, work: impl FnOnce(&mut Engine) -> T) -> T {
        let attribution = Attribution::Local { principal: bounded_name(principal), fields: None };
        let previous = self.audit.attribution.replace(attribution);
        let result = work(self);
        self.audit.attribution = previous;
        result
    }

    /// Runs `work` with the changes it applies attributed to the connected peer `peer`.
    pub(crate) fn as_peer<T>(&mut self, peer: PeerId, work: impl FnOnce(&mut Engine) -> T) -> T {
        let name = match self.replication.peers.get(&peer) {
            Some(info) => bounded_name(&info.name),
            None => format!("peer {peer}"),
        };
        let previous = self.audit.attribution.replace(Attribution::Peer { name });
        let result = work(self);
        self.audit.attribution = previous;
        result
    }

    /// Stages the audit entry of a change to `key` made by node `node` (see the module doc).
    pub(super) fn stage_audit_change(&mut self, key: &RecordKey, node: NodeId) {
        let origin = self.node_name(node);
        let (principal, fields) = match &self.audit.attribution {
            Some(Attribution::Local { principal, fields }) => {
                (principal.clone(), fields.clone().unwrap_or_else(|| vec![ALL_FIELDS.to_owned()]))
            }
            Some(Attribution::Peer { name }) => (name.clone(), vec![ALL_FIELDS.to_owned()]),
            None => (LOCAL_PRINCIPAL.to_owned(), vec![ALL_FIELDS.to_owned()]),
        };
        self.stage_audit_entry(key, &origin, &principal, fields);
    }

    /// Stages the audit entry of a snapshot record merged into `key`: origin and principal are
    /// the delivering peer (a snapshot merges a whole document, not one node's change).
    pub(super) fn stage_audit_snapshot(&mut self, key: &RecordKey) {
        let name = match &self.audit.attribution {
            Some(Attribution::Peer { name }) => name.clone(),
            Some(Attribution::Local { principal, .. }) => principal.clone(),
            None => LOCAL_PRINCIPAL.to_owned(),
        };
        self.stage_audit_entry(key, &name, &name, [ALL_FIELDS]);
    }

    fn stage_audit_entry<I, S>(&mut self, key: &RecordKey, origin: &str, principal: &str, fields: I)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        match self.audit.chain.append(physical_ms(), key, origin, principal, fields) {
            Ok(entry) => {
                self.batch.put_audit(entry.sequence, &entry.encode());
                self.metrics.audit_entries.inc();
            }
            // Names are bounded before they get here, so only an exhausted u64 lands here.
            Err(error) => tracing::error!(%key, %error, "could not add an audit entry"),
        }
    }

    /// The name of node `node`: this node's, a peer's (connected or remembered), else its id.
    fn node_name(&self, node: NodeId) -> String {
        if node == self.identity.node {
            return bounded_name(&self.identity.name);
        }
        let id = node.to_string();
        let connected = self.replication.peers.values();
        let remembered = self.replication.disconnected.iter().map(|(info, _)| info);
        match connected.chain(remembered).find(|info| info.node_id == id) {
            Some(info) => bounded_name(&info.name),
            None => id,
        }
    }
}

/// The top-level fields a local record write to `document` (`None`: a new record) touches (see
/// the module doc). A replace compares with the record before it; a record that does not read
/// lists the new keys.
pub(super) fn fields_touched(document: Option<&Document>, key: &RecordKey, operation: &Operation) -> Vec<String> {
    match operation {
        Operation::Delete => vec![ALL_FIELDS.to_owned()],
        Operation::Increment { field, .. } => vec![field.clone()],
        Operation::MergePatch(patch) => patch.keys().cloned().collect(),
        Operation::Replace(value) => match document.and_then(|document| document.body.view(key).ok()?.value) {
            Some(before) => changed_fields(&before, value),
            None => value.keys().cloned().collect(),
        },
    }
}

/// Retention, and the log's ends.
impl Engine {
    /// Deletes the oldest entries (older than the retention, by their time), a bounded number
    /// per step, and stores the anchor in the same batch. Only an intact run is trimmed: when the
    /// entries to delete do not verify from the anchor, nothing is trimmed and the evidence
    /// stays (logged at every step).
    pub(crate) fn trim_audit_if_due(&mut self, now: Instant) {
        if self.audit.retention.period.is_zero() || !self.audit.retention.take_due(now) {
            return;
        }
        let cutoff_ms = self.audit.retention.cutoff_ms();
        let stored = match self.store.audit_range(self.audit.anchor.sequence, TRIM_ENTRIES_PER_STEP) {
            Ok(stored) => stored,
            Err(error) => return tracing::warn!(%error, "cannot read the audit log to trim it"),
        };
        let full_step = stored.len() == TRIM_ENTRIES_PER_STEP;
        // Only the leading run that decodes can be trimmed; a damaged entry stops it.
        let entries: Vec<AuditEntry> = stored
            .into_iter()
            .map_while(|(sequence, bytes)| AuditEntry::decode(&bytes).ok().filter(|entry| entry.sequence == sequence))
            .collect();
        let Some(point) = crdt::audit::trim_point(&entries, cutoff_ms) else { return };
        let trimmed = &entries[..entries.iter().take_while(|entry| entry.sequence <= point.sequence).count()];
        if let Err(tamper) = crdt::audit::verify(trimmed.iter().cloned(), self.audit.anchor) {
            return tracing::warn!(%tamper, "not trimming the audit log: it does not verify, and trimming would delete the evidence");
        }
        self.batch.trim_audit_through(point.sequence);
        self.batch.put_meta(ANCHOR_META, &point.encode());
        self.audit.anchor = point;
        self.metrics.audit_entries_trimmed.add(trimmed.len() as u64);
        if full_step && trimmed.len() == entries.len() {
            // More may be due: come back at the next tick rather than an interval later.
            self.audit.retention.again(now);
        }
    }

    /// The newest entry made and the trim anchor.
    pub fn audit_status(&self) -> AuditStatus {
        let head = self.audit.chain.head();
        AuditStatus { sequence: head.sequence, hash: head.hash, anchor_sequence: self.audit.anchor.sequence }
    }
}

/// The top-level fields whose values differ between `before` and `after`, or that only one has.
fn changed_fields(before: &Map<String, Value>, after: &Map<String, Value>) -> Vec<String> {
    let changed = after.iter().filter(|(field, value)| before.get(*field) != Some(value)).map(|(field, _)| field);
    let removed = before.keys().filter(|field| !after.contains_key(*field));
    changed.chain(removed).cloned().collect()
}

/// `name` cut to at most [`NAME_BYTES_MAX`] bytes at a character boundary, so an entry is
/// never refused for a long token, node or certificate name.
pub(super) fn bounded_name(name: &str) -> String {
    let mut end = name.len().min(NAME_BYTES_MAX);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_owned()
}

/// Parses a head kept elsewhere, `SEQUENCE:HASH` (the hash in hex), as status, verify and
/// export print it.
pub fn parse_head(text: &str) -> Result<Anchor, String> {
    let problem = || format!("{text:?} is not SEQUENCE:HASH (a number, a colon and 64 hex digits)");
    let (sequence, hash) = text.split_once(':').ok_or_else(problem)?;
    let sequence = sequence.trim().parse::<u64>().map_err(|_| problem())?;
    let bytes = hex::decode(hash.trim()).map_err(|_| problem())?;
    let hash = <[u8; 32]>::try_from(bytes).map_err(|_| problem())?;
    Ok(Anchor { sequence, hash: Digest(hash) })
}

/// The trim anchor in the store (genesis before any trim).
pub fn stored_anchor(store: &Store) -> Result<Anchor, EngineError> {
    match store.meta(ANCHOR_META)? {
        Some(bytes) => Anchor::decode(&bytes)
            .map_err(|error| EngineError::Corrupt { key: format!("meta {ANCHOR_META}"), reason: error.to_string() }),
        None => Ok(Anchor::GENESIS),
    }
}

/// The newest durable entry's sequence and hash; the anchor when the log is empty. A damaged
/// newest entry gives its sequence with a zero hash.
pub fn stored_head(store: &Store) -> Result<Anchor, EngineError> {
    let anchor = stored_anchor(store)?;
    Ok(match store.audit_last()? {
        Some((sequence, _)) if sequence <= anchor.sequence => anchor,
        Some((sequence, bytes)) => match AuditEntry::decode(&bytes) {
            Ok(entry) if entry.sequence == sequence => Anchor::of(&entry),
            _ => Anchor { sequence, hash: Digest::default() },
        },
        None => anchor,
    })
}

/// One page of the log for `GET /v1/audit`.
#[derive(Debug, Clone, Serialize)]
pub struct AuditPage {
    /// Entries with sequence above `after`, oldest first. A stored entry that does not decode is
    /// left out (logged); verification reports it.
    pub entries: Vec<AuditEntry>,
    /// The last entry trimmed away (sequence 0 before any).
    pub anchor: Anchor,
    /// The newest durable entry (the anchor when the log is empty).
    pub head: Anchor,
}

/// Entries with sequence above `after`, at most `limit` (capped at [`AUDIT_PAGE_MAX`]; 0 gives
/// only the anchor and head), with the log's ends.
pub fn audit_page(store: &Store, after: u64, limit: usize) -> Result<AuditPage, EngineError> {
    let anchor = stored_anchor(store)?;
    let head = stored_head(store)?;
    let entries = export_page(store, after, limit)?;
    Ok(AuditPage { entries, anchor, head })
}

/// Entries with sequence above `after`, at most `limit` (capped at [`AUDIT_PAGE_MAX`]), leaving
/// out (and logging) any that does not decode or sits under another sequence than its own.
pub fn export_page(store: &Store, after: u64, limit: usize) -> Result<Vec<AuditEntry>, EngineError> {
    let stored = store.audit_range(after, limit.min(AUDIT_PAGE_MAX))?;
    Ok(stored
        .into_iter()
        .filter_map(|(sequence, bytes)| match AuditEntry::decode(&bytes) {
            Ok(entry) if entry.sequence == sequence => Some(entry),
            Ok(entry) => {
                tracing::warn!(sequence, claimed = entry.sequence, "an audit entry is stored under another sequence");
                Some(entry)
            }
            Err(error) => {
                tracing::warn!(sequence, %error, "leaving out an audit entry that does not decode");
                None
            }
        })
        .collect())
}

/// What [`verify_store`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditCheck {
    /// Where verification started: the trim anchor.
    pub anchor: Anchor,
    /// The entries checked and the head, or the first problem.
    pub outcome: Result<Verified, Tamper>,
}

/// Verifies the durable log from its anchor through the newest entry at the start (entries
/// added meanwhile are left for the next run), and through `head` when given (a head kept
/// elsewhere: then removal or rewriting of the newest entries is found too). Reads a page at a
/// time; memory stays bounded. A stored entry that does not decode counts as altered. When
/// retention trims the log during the run, it starts again from the new anchor.
pub fn verify_store(store: &Store, head: Option<Anchor>) -> Result<AuditCheck, EngineError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let anchor = stored_anchor(store)?;
        let end = store.audit_last()?.map_or(anchor.sequence, |(sequence, _)| sequence);
        let check = verify_from(store, anchor, end, head)?;
        let trimmed_meanwhile = check.outcome.is_err() && stored_anchor(store)? != anchor;
        if !trimmed_meanwhile || attempt >= VERIFY_ATTEMPTS_MAX {
            return Ok(check);
        }
    }
}

fn verify_from(store: &Store, anchor: Anchor, end: u64, head: Option<Anchor>) -> Result<AuditCheck, EngineError> {
    let read_error: Cell<Option<EngineError>> = Cell::new(None);
    let damaged: Cell<Option<u64>> = Cell::new(None);
    let mut after = anchor.sequence;
    let mut page: std::vec::IntoIter<(u64, Vec<u8>)> = Vec::new().into_iter();
    let entries = std::iter::from_fn(|| {
        loop {
            if let Some((sequence, bytes)) = page.next() {
                after = sequence;
                if sequence > end {
                    return None;
                }
                return match AuditEntry::decode(&bytes) {
                    Ok(entry) => Some(entry),
                    Err(_) => {
                        damaged.set(Some(sequence));
                        None
                    }
                };
            }
            if after >= end {
                return None;
            }
            match store.audit_range(after, AUDIT_PAGE_MAX) {
                Ok(next) if next.is_empty() => return None,
                Ok(next) => page = next.into_iter(),
                Err(error) => {
                    read_error.set(Some(error.into()));
                    return None;
                }
            }
        }
    });
    let outcome = match head {
        Some(head) => crdt::audit::verify_through(entries, anchor, head),
        None => crdt::audit::verify(entries, anchor),
    };
    if let Some(error) = read_error.take() {
        return Err(error);
    }
    // The entries stopped at a damaged one: that is the first problem unless one came earlier.
    let outcome = match (damaged.get(), outcome) {
        (Some(sequence), Err(tamper)) if tamper.sequence < sequence => Err(tamper),
        (Some(sequence), _) => Err(Tamper { sequence, kind: crdt::audit::TamperKind::Altered }),
        (None, outcome) => outcome,
    };
    Ok(AuditCheck { anchor, outcome })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    #[test]
    fn a_replace_lists_added_changed_and_removed_fields() {
        let before = object(serde_json::json!({"same": 1, "changed": "a", "removed": true}));
        let after = object(serde_json::json!({"same": 1, "changed": "b", "added": [1]}));
        let mut fields = changed_fields(&before, &after);
        fields.sort();
        assert_eq!(fields, ["added", "changed", "removed"]);
        assert!(changed_fields(&after, &after).is_empty());
    }

    #[test]
    fn a_head_parses_from_sequence_and_hash() {
        let hash = "ab".repeat(32);
        assert_eq!(parse_head(&format!("7:{hash}")), Ok(Anchor { sequence: 7, hash: Digest([0xab; 32]) }));
        for bad in ["7", "x:ab", &format!("7:{}", "ab".repeat(31)), &format!("-1:{hash}"), "7:zz"] {
            assert!(parse_head(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_are_cut_at_a_character_boundary() {
        assert_eq!(bounded_name("ops"), "ops");
        let long = "é".repeat(NAME_BYTES_MAX);
        let cut = bounded_name(&long);
        assert!(cut.len() <= NAME_BYTES_MAX && cut.len() >= NAME_BYTES_MAX - 1);
        assert!(cut.chars().all(|character| character == 'é'));
    }
}
