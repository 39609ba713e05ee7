//! Records: a JSON object held as an automerge document, with the four write operations
//! (replace, merge patch, delete, increment), conflict reporting and a replicated tombstone.
//!
//! # Layout of a record document
//! The record's fields live directly in the automerge root map, so concurrent creations of the
//! same record on two nodes merge field by field.
//!
//! - `$cl`, the causal length, says whether the record exists: odd means live, even (or absent)
//!   means deleted. Concurrent writes of `$cl` are all kept by automerge, and the value is their
//!   maximum, so it merges as a max-register. Each odd value is one *life* of the record.
//! - A user field `name` written during life `L` is stored under the root key `"L:name"`. Reads
//!   show only the keys of the current life. Concord's own keys start with `$`, user keys with a
//!   digit, so any field name is allowed and nothing needs escaping.
//!
//! # Delete and concurrent updates: delete wins
//! A delete raises the causal length to the next even number and removes every field. An update
//! made concurrently with the delete does not raise the causal length, so after the merge the
//! record is deleted: the delete wins, on every replica, whatever the delivery order. A write
//! that causally follows a delete (it has seen it) revives the record: it raises the causal length
//! to the next odd number, a new life, and starts from an empty object. An update that was
//! concurrent with the delete and arrives after the revival wrote keys of the old life, so it
//! stays invisible: nothing from before the delete comes back. The first write of a life that
//! changes anything also removes such leftover keys, so they do not accumulate.
//!
//! # Counters
//! `increment` uses automerge's counter type, so concurrent increments add up. Automerge resolves
//! two concurrent *creations* of a counter as a conflict in which one counter, and its
//! increments, loses. To avoid that, a counter field is created by a deterministic genesis change:
//! its actor is derived from the record key, the stored key (which holds the life) and an epoch,
//! and its time is zero, so every node that creates the counter produces the very same change
//! (same hash), and automerge keeps one copy. The epoch is the first whose genesis change is not
//! already in the document's history, so a counter field removed and re-created within one life
//! gets a fresh genesis that concurrent re-creators agree on too. An integer written over a
//! counter becomes an increment by the difference.

use std::borrow::Cow;

pub use automerge::ChangeHash;
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Automerge, AutomergeError, ROOT, ReadDoc, ScalarValue};
use serde_json::{Map, Value};

use crate::clock::Timestamp;
use crate::identity::OriginId;
use crate::json::{self, Conflict, JsonError};
use crate::key::RecordKey;

mod bounds;
mod rebuild;
mod unbuilt;

use bounds::Budget;
pub use bounds::{BoundError, INFLATED_BYTES_MAX, ITEMS_MAX, RECORD_ITEMS_MAX};
pub use rebuild::Rebuilt;

const CAUSAL_LENGTH: &str = "$cl";

/// The longest field name accepted for `increment`, in bytes.
pub const FIELD_BYTES_MAX: usize = 1024;

/// A local write to a record.
#[derive(Debug, Clone, PartialEq)]
pub enum Operation {
    /// The whole object: fields that are not given are removed.
    Replace(Map<String, Value>),
    /// An RFC 7386 JSON Merge Patch: only the named fields change, and `null` deletes.
    MergePatch(Map<String, Value>),
    /// A tombstone that replicates.
    Delete,
    /// Adds `by` to a counter field, creating it at zero first when it is absent.
    Increment { field: String, by: i64 },
}

/// Why a local write was refused. The document is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum OperationError {
    #[error("field {0:?} holds a value that is not a number, so it cannot be incremented")]
    NotACounter(String),
    #[error("field name is empty or longer than {FIELD_BYTES_MAX} bytes")]
    FieldName,
    #[error("counter field was re-created more than {COUNTER_EPOCHS_MAX} times")]
    CounterEpochs,
    #[error(transparent)]
    Json(#[from] JsonError),
    #[error("document error: {0}")]
    Document(#[from] AutomergeError),
    #[error(transparent)]
    Map(#[from] crate::map_record::MapRecordError),
    #[error("the record would hold more than {RECORD_ITEMS_MAX} operations and changes")]
    RecordFull,
    #[error("the record's document failed inside automerge (a damaged or crafted history); it is unchanged")]
    Damaged,
}

/// Why stored or received bytes could not become (part of) a record. The document is unchanged
/// when applying changes fails.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record document does not decode: {0}")]
    Decode(AutomergeError),
    #[error("record bytes refused before decoding: {0}")]
    Bound(#[from] BoundError),
    #[error(transparent)]
    Json(#[from] JsonError),
}

/// What a read of a record returns.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordView {
    /// The object, or `None` when the record is deleted (or was never written).
    pub value: Option<Map<String, Value>>,
    /// Fields with concurrent values that no later write has superseded.
    pub conflicts: Vec<Conflict>,
    /// Identifies the document's heads: equal versions mean equal documents.
    pub version: String,
}

/// What a record made of one first change holds: see [`Record::first_change`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FirstChange {
    /// The record's only head: the change's hash.
    pub head: ChangeHash,
    /// Whether the record exists (its causal length is odd).
    pub live: bool,
}

/// One record document.
#[derive(Debug, Clone)]
pub struct Record {
    document: Automerge,
    /// The fields of the record's first replace, until anything else changes the document. A
    /// view then is exactly these fields, without conflicts (the JSON round trip is exact), so a
    /// write's answer needs no read back (`Record::view`).
    first_value: Option<Map<String, Value>>,
    /// A local write has gone through on this document since it last took in bytes from a peer
    /// or the disk, so the next one works in place (see [`Record::write_with`]).
    proven: bool,
}

impl Default for Record {
    fn default() -> Self {
        Record::new()
    }
}

impl Record {
    /// An empty record document: no history, deleted in the sense of never written.
    pub fn new() -> Record {
        Record { document: Automerge::new(), first_value: None, proven: true }
    }

    /// Rebuilds a record from a saved document followed by incremental change bytes.
    /// `saved` may also be change bytes (a document stored as its first change), and an empty
    /// `saved` means a document that starts from nothing (its changes are all in `increments`).
    ///
    /// The parts are loaded as one: automerge then applies all their changes in one batch, where
    /// a load per part applies each part's changes on its own. For a record stored as its first
    /// change and one more (the usual record after an edit) that costs about a third less, and
    /// every build of a record from the store pays it. Parts that do not load that way (a change
    /// whose dependencies are missing, which automerge only keeps back part by part; or damage)
    /// load one after the other as before, so the result is the same.
    pub fn load(saved: &[u8], increments: &[&[u8]]) -> Result<Record, RecordError> {
        let mut budget = Budget::after(0);
        std::iter::once(&saved).chain(increments).try_for_each(|part| budget.charge(part))?;
        if !increments.is_empty()
            && let Ok(document) = decode(|| Automerge::load_with_options(&joined(saved, increments), strict_load()))
        {
            return Ok(Record { document, first_value: None, proven: false });
        }
        decode(|| {
            let mut document = Automerge::new();
            for increment in std::iter::once(&saved).chain(increments).filter(|part| !part.is_empty()) {
                document.load_incremental(increment)?;
            }
            Ok(Record { document, first_value: None, proven: false })
        })
    }

    /// The whole document, compacted.
    pub fn save(&self) -> Vec<u8> {
        self.document.save()
    }

    pub fn heads(&self) -> Vec<ChangeHash> {
        let mut heads = self.document.get_heads();
        heads.sort();
        heads
    }

    /// The heads as text: sorted change hashes in hex, joined by `.`.
    pub fn version(&self) -> String {
        version_of(&self.heads())
    }

    /// Applies change bytes (from an envelope or the disk). Returns whether the document changed;
    /// applying the same bytes twice changes nothing.
    ///
    /// **On error the document may hold part of the bytes** (automerge has no rollback), so a
    /// caller must then throw the record away; [`Record::apply_changes_intact`] does not need
    /// that.
    ///
    /// Changes whose dependencies have not arrived yet (gossip delivers out of order) are kept,
    /// invisible, until they do; they do not count as a change, and `save` includes them.
    pub fn apply_changes(&mut self, bytes: &[u8]) -> Result<bool, RecordError> {
        self.first_value = None;
        self.proven = false;
        Budget::after(self.items()).charge(bytes)?;
        let before = self.document.get_heads();
        decode(|| self.document.load_incremental(bytes))?;
        Ok(self.document.get_heads() != before)
    }

    /// Applies change bytes to a copy and keeps it only when they apply. The engine uses this:
    /// besides leaving the record intact on error, the copy is compact, while applying in place
    /// leaves automerge's columns with slack capacity. Applied in place, an offline edge node
    /// catching up on 100,000 changes peaked at 417 MB instead of about 250 MB
    /// (`tests/edge.rs`), so the copy is cheaper than the memory it saves.
    pub fn apply_changes_intact(&mut self, bytes: &[u8]) -> Result<bool, RecordError> {
        self.apply_changes_keeping(bytes).map(|(changed, _)| changed)
    }

    /// [`Record::apply_changes_intact`], which also hands back the record as it was before the
    /// bytes (the other half of the copy, otherwise dropped): for a caller that compares before
    /// and after only sometimes (the engine's conflict signatures, only when the record has
    /// conflicts after).
    pub fn apply_changes_keeping(&mut self, bytes: &[u8]) -> Result<(bool, Record), RecordError> {
        let mut candidate = self.clone();
        let changed = candidate.apply_changes(bytes)?;
        Ok((changed, std::mem::replace(self, candidate)))
    }

    /// How big the record is, in the unit of the decoding bounds ([`ITEMS_MAX`]): its
    /// operations plus its changes.
    pub fn items(&self) -> u64 {
        items_of(&self.document)
    }

    /// True when the record exists (its causal length is odd).
    pub fn is_live(&self) -> bool {
        causal_length(&self.document) % 2 == 1
    }

    /// [`Record::is_live`] as the record was at `heads` (changes it holds).
    pub fn is_live_at(&self, heads: &[ChangeHash]) -> bool {
        causal_length_at(&self.document, Some(heads)) % 2 == 1
    }

    /// Applies a local write made by `origin` at `timestamp`. Returns the change bytes to put in
    /// an envelope, or `None` when the write changes nothing.
    pub fn write(
        &mut self,
        key: &RecordKey,
        origin: &OriginId,
        timestamp: Timestamp,
        operation: &Operation,
    ) -> Result<Option<Vec<u8>>, OperationError> {
        self.write_with(key, origin, WriteOptions::default(), timestamp, operation)
    }

    /// [`Record::write`], made as `options` say (see [`WriteOptions`]).
    pub fn write_with(
        &mut self,
        key: &RecordKey,
        origin: &OriginId,
        options: WriteOptions<'_>,
        timestamp: Timestamp,
        operation: &Operation,
    ) -> Result<Option<Vec<u8>>, OperationError> {
        validate(operation)?;
        self.first_value = None;
        let heads_before = self.document.get_heads();
        // A record's first write (nothing before it).
        let first_replace = match operation {
            Operation::Replace(fields) if heads_before.is_empty() => Some(fields),
            _ => None,
        };
        // A transaction rolls back by itself on error, but automerge 0.12 panics on some documents
        // that a crafted (checksum-valid) change leaves behind (`save_after` did after one: the
        // corrupted-chunk property in tests/records.rs), and from a panic a copy is the way back.
        // So the first write after the document took in outside bytes works on a copy, kept only
        // if the write goes through; later ones work in place (a copy costs 5–80 µs, growing with
        // the history). An increment (up to three transactions: a new life, the counter's genesis,
        // the increment) always works on a copy.
        let on_copy = (!self.proven && !heads_before.is_empty()) || matches!(operation, Operation::Increment { .. });
        let mut copy = on_copy.then(|| self.document.clone());
        let candidate = copy.as_mut().unwrap_or(&mut self.document);
        let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            write_into(candidate, key, origin, &heads_before, options, timestamp, operation)
        }));
        let change = match written {
            Ok(Ok(change)) => change,
            Ok(Err(error)) => return Err(error),
            Err(_) => {
                if copy.is_none() {
                    self.restore(&heads_before);
                }
                self.proven = false;
                return Err(OperationError::Damaged);
            }
        };
        let Some(change) = change else { return Ok(None) };
        if let Some(copy) = copy {
            self.document = copy;
        }
        self.proven = true;
        self.first_value = first_replace.cloned();
        Ok(Some(change))
    }

    /// After automerge panicked in a write made in place: the document as it was at `heads`
    /// (empty for a first write), if automerge can still build that; it stays as it is if not.
    fn restore(&mut self, heads: &[ChangeHash]) {
        if heads.is_empty() {
            self.document = Automerge::new();
            return;
        }
        let forked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.document.fork_at(heads)));
        if let Ok(Ok(document)) = forked {
            self.document = document;
        }
    }

    /// Reads the record as JSON, with its conflicts and version. A history that automerge cannot
    /// read (a crafted one: counters whose merged sum leaves i64 panic inside automerge in
    /// builds with overflow checks) is an error, not a panic.
    pub fn view(&self) -> Result<RecordView, RecordError> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.read_view())) {
            Ok(result) => result,
            Err(_) => Err(RecordError::Decode(AutomergeError::Fail)),
        }
    }

    fn read_view(&self) -> Result<RecordView, RecordError> {
        let version = self.version();
        if let Some(value) = &self.first_value {
            return Ok(RecordView { value: Some(value.clone()), conflicts: Vec::new(), version });
        }
        if !self.is_live() {
            return Ok(RecordView { value: None, conflicts: Vec::new(), version });
        }
        let prefix = life_prefix(causal_length(&self.document));
        let mut value = Map::new();
        let mut conflicts = Vec::new();
        for key in self.document.keys(ROOT) {
            let Some(field) = key.strip_prefix(prefix.as_str()) else { continue };
            let path = format!("/{}", json::escape_pointer(field));
            if let Some(child) = json::read_slot(&self.document, &ROOT, key.as_str().into(), &path, 0, &mut conflicts)?
            {
                value.insert(field.to_owned(), child);
            }
        }
        Ok(RecordView { value: Some(value), conflicts, version })
    }
}

/// The operations that wrote a field's concurrent values, as (counter, actor), sorted.
pub type WritingOperations = Vec<(u64, Vec<u8>)>;

/// One of a top-level field's concurrent values, with what conflict resolution needs to know
/// about the operation that wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConcurrentValue {
    pub value: Value,
    /// The automerge actor that wrote it: the writing node's origin (16 bytes), or a counter
    /// genesis actor.
    pub actor: Vec<u8>,
    /// The operation's counter: with the actor, automerge's own total order of operations.
    pub counter: u64,
}

impl Record {
    /// The user fields of the current life that hold concurrent values, in key order, each with
    /// the operations (counter, actor) that wrote its values, sorted: what the conflict ledger
    /// compares before and after an apply. One pass over the life's keys, which flags the
    /// conflicted ones, then one automerge seek per conflicted field; no value is read (the
    /// ledger reads the values of the fields whose signature changed). A seek per field, as
    /// before, cost more than the apply itself (BENCHMARKS.md, session 12).
    pub fn conflict_signatures(&self) -> Vec<(String, WritingOperations)> {
        self.signatures_at(None)
    }

    /// [`Record::conflict_signatures`] as the record was at `heads` (changes it holds): the
    /// signatures before a change, read from the record after it.
    pub fn conflict_signatures_at(&self, heads: &[ChangeHash]) -> Vec<(String, WritingOperations)> {
        self.signatures_at(Some(heads))
    }

    fn signatures_at(&self, heads: Option<&[ChangeHash]>) -> Vec<(String, WritingOperations)> {
        let life = causal_length_at(&self.document, heads);
        if life.is_multiple_of(2) {
            return Vec::new();
        }
        let prefix = life_prefix(life);
        let range = match heads {
            None => self.document.map_range(ROOT, prefix.clone()..),
            Some(heads) => self.document.map_range_at(ROOT, prefix.clone().., heads),
        };
        let conflicted: Vec<String> = range
            .take_while(|item| item.key.starts_with(prefix.as_str()))
            .filter(|item| item.conflict)
            .map(|item| item.key.into_owned())
            .collect();
        let mut signatures = Vec::new();
        for key in conflicted {
            let Some(field) = key.strip_prefix(prefix.as_str()) else { continue };
            let all = match heads {
                None => self.document.get_all(ROOT, key.as_str()),
                Some(heads) => self.document.get_all_at(ROOT, key.as_str(), heads),
            };
            let Ok(all) = all else { continue };
            if all.len() < 2 {
                continue;
            }
            let mut operations: WritingOperations = all.iter().map(|(_, id)| operation_of(id)).collect();
            operations.sort();
            signatures.push((field.to_owned(), operations));
        }
        signatures
    }

    /// Every concurrent value of top-level field `field` (of the current life): one when there
    /// is no conflict, none when the field is absent or the record deleted.
    pub fn concurrent_values(&self, field: &str) -> Result<Vec<ConcurrentValue>, RecordError> {
        if !self.is_live() {
            return Ok(Vec::new());
        }
        let stored = stored_key(causal_length(&self.document), field);
        let all = self.document.get_all(ROOT, stored.as_str()).map_err(JsonError::from)?;
        let mut values = Vec::with_capacity(all.len());
        for (value, id) in &all {
            let mut nested = Vec::new();
            let json = json::read_value(&self.document, value, id, "", 1, &mut nested)?;
            let (counter, actor) = operation_of(id);
            values.push(ConcurrentValue { value: json, actor, counter });
        }
        Ok(values)
    }

    /// The time (milliseconds, as its writer's clock gave it) and the writing node's name (when
    /// the change carries one, see [`WriteOptions::writer`]) of the change that made operation
    /// (`actor`, `counter`), if the document holds it. Walks the history: for conflicts only.
    pub fn operation_writer(&self, actor: &[u8], counter: u64) -> Option<(u64, Option<String>)> {
        self.document
            .get_changes(&[])
            .into_iter()
            .find(|change| {
                change.actor_id().to_bytes() == actor
                    && change.start_op().get() <= counter
                    && counter < change.start_op().get() + change.len() as u64
            })
            .map(|change| (u64::try_from(change.timestamp()).unwrap_or(0), change.message().map(str::to_owned)))
    }
}

/// The body of [`Record::write_with`]: `operation` on `candidate` (the record's document or a
/// copy of it), then the change it made. Runs under `catch_unwind`.
fn write_into(
    candidate: &mut Automerge,
    key: &RecordKey,
    origin: &OriginId,
    heads_before: &[ChangeHash],
    options: WriteOptions<'_>,
    timestamp: Timestamp,
    operation: &Operation,
) -> Result<Option<Vec<u8>>, OperationError> {
    let WriteOptions { writer, whole_fields } = options;
    let whole = |field: &str| whole_fields.iter().any(|whole| whole == field);
    candidate.set_actor(origin.actor());
    let options = || {
        let options = CommitOptions::default().with_time(i64::try_from(timestamp.wall_ms).unwrap_or(i64::MAX));
        match writer {
            Some(name) => options.with_message(name),
            None => options,
        }
    };
    match operation {
        // A first replace writes every key at once: automerge splices its op set once for the
        // batch instead of once per key and nested value. The keys and values are those the
        // general path below writes into an empty document.
        Operation::Replace(fields) if heads_before.is_empty() => transact(candidate, options(), |transaction| {
            let mut root = std::collections::HashMap::with_capacity(fields.len() + 1);
            root.insert(CAUSAL_LENGTH.to_owned(), automerge::hydrate::Value::Scalar(ScalarValue::Uint(1)));
            for (field, value) in fields {
                root.insert(stored_key(1, field), json::hydrate(value));
            }
            transaction.init_root_from_hydrate(&automerge::hydrate::Map::from(root))?;
            Ok(())
        })?,
        Operation::Delete => {
            if causal_length(candidate) % 2 == 1 {
                transact(candidate, options(), |transaction| {
                    bump_causal_length(transaction)?;
                    remove_fields(transaction, None)
                })?;
            }
        }
        Operation::Replace(fields) => transact(candidate, options(), |transaction| {
            let life = enter_life(transaction)?;
            let prefix = life_prefix(life);
            let (whole_given, in_place): (Map<String, Value>, Map<String, Value>) =
                fields.clone().into_iter().partition(|(field, _)| whole(field));
            json::update_map_filtered(
                transaction,
                &ROOT,
                &in_place,
                |field| Cow::Owned(format!("{prefix}{field}")),
                |stored| stored.strip_prefix(prefix.as_str()).filter(|field| !whole(field)).map(Cow::Borrowed),
            )?;
            for field in whole_fields.iter().filter(|field| !whole_given.contains_key(field.as_str())) {
                let stored = stored_key(life, field);
                if transaction.get(ROOT, stored.as_str())?.is_some() {
                    transaction.delete(ROOT, stored.as_str())?;
                }
            }
            for (field, value) in &whole_given {
                write_whole(transaction, &stored_key(life, field), value)?;
            }
            tidy(transaction, life)
        })?,
        Operation::MergePatch(patch) => transact(candidate, options(), |transaction| {
            let life = enter_life(transaction)?;
            for (field, value) in patch {
                let stored = stored_key(life, field);
                if whole(field) && !value.is_null() {
                    let merged = match value {
                        Value::Object(members) => {
                            json::merge_patch(read_stored(transaction, &stored)?.as_ref(), members)
                        }
                        other => other.clone(),
                    };
                    write_whole(transaction, &stored, &merged)?;
                    continue;
                }
                json::merge_patch_slot(transaction, &ROOT, stored.into(), value)?;
            }
            tidy(transaction, life)
        })?,
        Operation::Increment { by: 0, .. } => {}
        Operation::Increment { field, by } => increment(candidate, key, field, *by, options)?,
    }
    if candidate.get_heads() == heads_before {
        return Ok(None);
    }
    Ok(Some(candidate.save_after(heads_before)))
}

/// Runs automerge's decoder on bytes from a peer or the disk. automerge 0.12 panics, instead of
/// returning an error, on some malformed input whose chunk checksums are valid (one flipped byte
/// in a saved document's change columns panics in `ChangeGraphCols::load`; the corrupted-chunk
/// property in `tests/records.rs` finds it), so one crafted message could crash the node. The
/// panic becomes a decode error. Nothing escapes the closure on a panic: `load` builds a fresh
/// document and `apply_changes` a clone, and both are dropped.
fn decode<T>(decoder: impl FnOnce() -> Result<T, AutomergeError>) -> Result<T, RecordError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(decoder)) {
        Ok(result) => result.map_err(RecordError::Decode),
        Err(_) => Err(RecordError::Decode(AutomergeError::Fail)),
    }
}

/// Parses one change chunk, checksum verified. automerge 0.12 panics on some crafted ones (an
/// operation's actor index or counter past `u32` unwraps in `OpId::new`: the fuzz regressions
/// `record_changes/load-applying-change-*-past-u32`), so the panic is a refusal, as in
/// [`decode`].
fn parse_change(bytes: &[u8]) -> Option<automerge::Change> {
    std::panic::catch_unwind(|| automerge::Change::try_from(bytes)).ok()?.ok()
}

/// A saved document (or first change) and the increments after it, as one run of chunks.
fn joined(saved: &[u8], increments: &[&[u8]]) -> Vec<u8> {
    let length = saved.len() + increments.iter().map(|part| part.len()).sum::<usize>();
    let mut joined = Vec::with_capacity(length);
    joined.extend_from_slice(saved);
    increments.iter().for_each(|part| joined.extend_from_slice(part));
    joined
}

/// A load that fails rather than leave anything out: on a damaged chunk or a change whose
/// dependencies are missing (`load_incremental`, part by part, skips the one and keeps back the
/// other). With `OnPartialLoad::Ignore`, automerge 0.12 drops every change of a load that is
/// partial, so joined parts lost an accepted change when snapshots joined them (the regression
/// `record_changes/snapshot-joined-parts-lose-a-change`, which `Record::load` replays).
fn strict_load() -> automerge::LoadOptions<'static> {
    automerge::LoadOptions::new().on_partial_load(automerge::OnPartialLoad::Error)
}

/// The sorted heads as text: change hashes in hex, joined by `.`.
pub fn version_of(heads: &[ChangeHash]) -> String {
    heads.iter().map(|hash| hash.to_string()).collect::<Vec<_>>().join(".")
}

fn validate(operation: &Operation) -> Result<(), OperationError> {
    match operation {
        Operation::Replace(fields) | Operation::MergePatch(fields) => {
            // Every value that is not `null` ends up stored (a patch's `null` deletes), at an
            // operation or more each: a write with more than the record may hold is refused here,
            // before automerge spends seconds on it (`transact` checks the exact count after).
            let mut values = 0u64;
            for value in fields.values() {
                values = values.saturating_add(json::check_and_count(value)?);
            }
            if values > RECORD_ITEMS_MAX {
                return Err(OperationError::RecordFull);
            }
        }
        Operation::Increment { field, .. } if field.is_empty() || field.len() > FIELD_BYTES_MAX => {
            return Err(OperationError::FieldName);
        }
        Operation::Increment { .. } | Operation::Delete => {}
    }
    Ok(())
}

/// How a write is made, beyond what it writes.
#[derive(Debug, Default, Clone, Copy)]
pub struct WriteOptions<'a> {
    /// The writing node's name, carried in the change's message, where the `priority` conflict
    /// policy reads it ([`Record::operation_writer`]).
    pub writer: Option<&'a str>,
    /// Top-level fields written whole: a new object or array value replaces the field with a
    /// fresh object instead of updating the old one member by member, so concurrent writes of
    /// the field stay separate concurrent values for a policy to resolve (`union`, `max`, ...).
    pub whole_fields: &'a [String],
}

/// The JSON value stored under root key `stored`, if any.
fn read_stored<T: ReadDoc>(transaction: &T, stored: &str) -> Result<Option<Value>, JsonError> {
    let mut conflicts = Vec::new();
    json::read_slot(transaction, &ROOT, stored.into(), "", 0, &mut conflicts)
}

/// Makes root key `stored` hold `value`, written whole (a fresh object for an object or array),
/// unless it holds that value already.
fn write_whole<T: Transactable + ReadDoc>(transaction: &mut T, stored: &str, value: &Value) -> Result<(), JsonError> {
    // Unchanged only when it is the one value there: a write equal to one of several concurrent
    // values must still supersede the others.
    let alone = transaction.get_all(ROOT, stored)?.len() <= 1;
    if alone && read_stored(transaction, stored)?.as_ref() == Some(value) {
        return Ok(());
    }
    if !alone && !matches!(value, Value::Object(_) | Value::Array(_)) {
        return json::put_fresh(transaction, &ROOT, stored.into(), value);
    }
    match value {
        Value::Object(_) | Value::Array(_) => json::put_fresh(transaction, &ROOT, stored.into(), value),
        scalar => json::update_slot(transaction, &ROOT, stored.into(), scalar),
    }
}

/// Runs `body` in one transaction on `document`, committing on success and rolling back on error.
fn transact<F>(document: &mut Automerge, options: CommitOptions, body: F) -> Result<(), OperationError>
where
    F: FnOnce(&mut automerge::transaction::Transaction<'_>) -> Result<(), JsonError>,
{
    let items = items_of(document);
    let mut transaction = document.transaction();
    match body(&mut transaction) {
        // The change itself counts as one item.
        Ok(()) if items.saturating_add(transaction.pending_ops() as u64 + 1) > RECORD_ITEMS_MAX => {
            transaction.rollback();
            Err(OperationError::RecordFull)
        }
        Ok(()) => {
            transaction.commit_with(options);
            Ok(())
        }
        Err(error) => {
            transaction.rollback();
            Err(error.into())
        }
    }
}

fn items_of(document: &Automerge) -> u64 {
    let stats = document.stats();
    stats.num_ops.saturating_add(stats.num_changes)
}

/// The (counter, actor) of the operation that wrote a value: automerge's total order of
/// operations.
fn operation_of(id: &automerge::ObjId) -> (u64, Vec<u8>) {
    match id {
        automerge::ObjId::Id(counter, actor, _) => (*counter, actor.to_bytes().to_vec()),
        automerge::ObjId::Root => (0, Vec::new()),
    }
}

/// The start of every stored key of life `life`.
fn life_prefix(life: u64) -> String {
    format!("{life}:")
}

/// The stored root key for user field `field` during life `life`.
fn stored_key(life: u64, field: &str) -> String {
    format!("{life}:{field}")
}

/// Whether a root key holds a user field (of any life) rather than one of Concord's own.
fn is_field_key(key: &str) -> bool {
    key.starts_with(|character: char| character.is_ascii_digit())
}

fn causal_length<D: ReadDoc>(document: &D) -> u64 {
    causal_length_at(document, None)
}

/// [`causal_length`] as the document was at `heads`, or now for `None`.
fn causal_length_at<D: ReadDoc>(document: &D, heads: Option<&[ChangeHash]>) -> u64 {
    let values = match heads {
        None => document.get_all(ROOT, CAUSAL_LENGTH),
        Some(heads) => document.get_all_at(ROOT, CAUSAL_LENGTH, heads),
    };
    let Ok(values) = values else { return 0 };
    values
        .iter()
        .filter_map(|(value, _)| match value {
            automerge::Value::Scalar(scalar) => match scalar.as_ref() {
                ScalarValue::Uint(length) => Some(*length),
                ScalarValue::Int(length) => u64::try_from(*length).ok(),
                _ => None,
            },
            automerge::Value::Object(_) => None,
        })
        .max()
        .unwrap_or(0)
}

/// Raises the causal length by one; returns the new value (what `causal_length` now reads: the
/// put supersedes every value the transaction sees).
fn bump_causal_length<T: Transactable + ReadDoc>(transaction: &mut T) -> Result<u64, JsonError> {
    let next = causal_length(transaction).saturating_add(1);
    transaction.put(ROOT, CAUSAL_LENGTH, ScalarValue::Uint(next))?;
    Ok(next)
}

/// Removes the user fields of every life except `keep`.
fn remove_fields<T: Transactable + ReadDoc>(transaction: &mut T, keep: Option<u64>) -> Result<(), JsonError> {
    let keep = keep.map(life_prefix);
    let keys: Vec<String> = transaction
        .keys(ROOT)
        .filter(|key| is_field_key(key) && !keep.as_ref().is_some_and(|prefix| key.starts_with(prefix.as_str())))
        .collect();
    for key in keys {
        transaction.delete(ROOT, key.as_str())?;
    }
    Ok(())
}

/// Makes the record live for this write, starting a new, empty life if it is deleted; returns
/// the life the write belongs to.
fn enter_life<T: Transactable + ReadDoc>(transaction: &mut T) -> Result<u64, JsonError> {
    let length = causal_length(transaction);
    if !length.is_multiple_of(2) {
        return Ok(length);
    }
    let life = bump_causal_length(transaction)?;
    remove_fields(transaction, None)?;
    Ok(life)
}

/// Once a write has changed something, removes keys left over from earlier lives (updates that
/// were concurrent with a delete). A write that changes nothing stays a no-op.
fn tidy<T: Transactable + ReadDoc>(transaction: &mut T, life: u64) -> Result<(), JsonError> {
    if transaction.pending_ops() > 0 {
        remove_fields(transaction, Some(life))?;
    }
    Ok(())
}

fn increment<F>(
    document: &mut Automerge,
    key: &RecordKey,
    field: &str,
    by: i64,
    options: F,
) -> Result<(), OperationError>
where
    F: Fn() -> CommitOptions,
{
    let mut life = causal_length(document);
    if life.is_multiple_of(2) {
        transact(document, options(), |transaction| {
            life = enter_life(transaction)?;
            Ok(())
        })?;
    }
    let stored = stored_key(life, field);
    if document.get(ROOT, stored.as_str())?.is_none() {
        apply_counter_genesis(document, key, &stored)?;
    }
    // Read after the genesis: it may have released changes held back for it (see
    // `apply_counter_genesis`), and the field then reads as on a replica that had them all along.
    let current = document.get(ROOT, stored.as_str())?.map(|(value, _)| value.into_owned());
    let current = match current {
        // `apply_counter_genesis` returns only once the field holds a value, or with this error.
        None => return Err(OperationError::CounterEpochs),
        Some(automerge::Value::Scalar(scalar)) => match scalar.as_ref() {
            ScalarValue::Counter(counter) => i64::from(counter),
            ScalarValue::Int(integer) => {
                let integer = *integer;
                transact(document, options(), |transaction| {
                    transaction.put(ROOT, stored.as_str(), ScalarValue::counter(integer))?;
                    Ok(())
                })?;
                integer
            }
            _ => return Err(OperationError::NotACounter(field.to_owned())),
        },
        Some(automerge::Value::Object(_)) => return Err(OperationError::NotACounter(field.to_owned())),
    };
    json::check_counter(current, by)?;
    transact(document, options(), |transaction| {
        transaction.increment(ROOT, stored.as_str(), by)?;
        tidy(transaction, life)
    })
}

/// How many times one counter field can be re-created. Each epoch costs a change in the
/// document's history, so the bound also caps the work a crafted history can cause.
pub const COUNTER_EPOCHS_MAX: u64 = 4096;

/// Applies the deterministic change that creates counter `stored` at zero (see the module doc),
/// of the first epoch after which the field holds a value. The stored key holds the life, so
/// re-creators after the same delete agree even when one of them never received a counter
/// created concurrently with that delete.
fn apply_counter_genesis(document: &mut Automerge, key: &RecordKey, stored: &str) -> Result<(), OperationError> {
    for epoch in 0..COUNTER_EPOCHS_MAX {
        let change = counter_genesis(key, stored, epoch)?;
        if document.get_change_by_hash(&change.hash()).is_some() {
            continue;
        }
        document.apply_changes([change])?;
        // Changes held back waiting for exactly this genesis are released by it. One that
        // removed the counter leaves the field empty again: a replica that received them in
        // order skips this epoch too, so move on to the next one. One that wrote another value
        // over the counter leaves that value, and the caller reads it as that replica would (a
        // value later epochs cannot win over: trying them all was a fuzz finding).
        if document.get(ROOT, stored)?.is_some() {
            return Ok(());
        }
    }
    Err(OperationError::CounterEpochs)
}

fn counter_genesis(key: &RecordKey, stored: &str, epoch: u64) -> Result<automerge::Change, OperationError> {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"concord counter genesis\0");
    hasher.update(&key.to_bytes());
    hasher.update(b"\0");
    hasher.update(stored.as_bytes());
    hasher.update(&epoch.to_le_bytes());
    let actor = ActorId::from(&hasher.finalize().as_bytes()[..16]);
    let mut genesis = Automerge::new().with_actor(actor);
    let mut transaction = genesis.transaction();
    transaction.put(ROOT, stored, ScalarValue::counter(0))?;
    transaction.commit_with(CommitOptions::default().with_time(0));
    genesis.get_last_local_change().ok_or(OperationError::Document(AutomergeError::Fail))
}
