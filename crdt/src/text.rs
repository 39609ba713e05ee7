//! Collaborative texts: a Yjs-compatible document (update format v1, state vector v1) held by
//! yrs, behind bounds that untrusted bytes must pass before yrs ever decodes them.
//!
//! A [`TextDocument`] is a yrs `Doc` that Yjs clients can sync with: it applies their binary
//! updates, answers state vectors with diffs, and saves itself as one update. Its root `Y.Text`s
//! can be read as plain text, and edited server-side with [`TextDocument::insert_text`] and
//! [`TextDocument::delete_text`], which return the update the edit made.
//!
//! # Why the bounds
//! yrs 0.28.1 cannot be handed untrusted bytes directly:
//! - its `Any` decoder recurses once per nesting level with no limit, so a small update with
//!   deeply nested maps or arrays overflows the stack and aborts the process;
//! - several malformed fields make it panic in debug builds (client ids over 53 bits, signed
//!   varints over 63 bits, clock arithmetic past `u32` or `i32`) or silently misread them in
//!   release builds;
//! - it reads legacy `ContentJSON` and XML hooks differently from Yjs, so the two would disagree
//!   about every byte after them;
//! - it deletes and garbage-collects nested shared types by recursion, so a document whose types
//!   nest thousands deep (a 120 KiB update suffices) aborts the process when the outermost one is
//!   deleted;
//! - it integrates a struct that arrives ahead of its client's earlier ones behind a placeholder
//!   range, and panics (or, in release builds, corrupts its block list) when a later struct
//!   straddles the placeholder, which honest peers can send;
//! - it fails half-way through an update whose item names as its parent an item that holds no
//!   shared type (Yjs turns such an item into a garbage-collected range);
//! - when it cuts off the part of an incoming struct that it already holds, the rest keeps the
//!   parent the struct stated even if it lands next to an item of another type, which corrupts
//!   that type's length counters (an underflow: a panic in debug builds).
//!
//! So every update, whether it comes from a peer, a client or the disk, first passes
//! [`validate_update`] (see `text/bounds.rs`: size, structure, lengths, varints, `Any` and JSON
//! nesting). Then the document decides which of its structs yrs can integrate without keeping
//! anything pending, cuts off what it already holds (see `text/batch.rs`), and holds the
//! others back itself; and the
//! type-nesting guard (see `text/nesting.rs`) turns into garbage-collected ranges the structs
//! that would nest types too deep or that name a parent holding no type. Only then does yrs see
//! the update. Every yrs error becomes a [`TextError`].
//!
//! # Failure leaves the document unchanged
//! yrs has no rollback: an update that fails half-way through integration leaves half of it in
//! the document. A `TextDocument` therefore keeps a checkpoint (a saved state) and the log of
//! the updates applied since, and when yrs fails or panics while applying an update (the apply
//! runs under `catch_unwind`), it throws the yrs document away and rebuilds it from the
//! checkpoint and the log. Nothing known makes yrs fail on what reaches it; the rebuild is the
//! safety net. The log is compacted into a new checkpoint whenever it outgrows the checkpoint,
//! so the extra memory is at most about twice the document's encoded size. A panic inside yrs
//! leaks the transaction it happened in (dropping it would run yrs's commit on a broken state,
//! and a second panic during unwinding aborts), and the default panic hook still prints the
//! panic message to standard error.
//!
//! # Determinism
//! Client ids are the caller's, the yrs document is built with a fixed guid, and the digest is
//! computed from a canonical form, so everything here is a function of the inputs. (yrs draws a
//! random client id for each subdocument it decodes; that id is never encoded nor returned.)

mod batch;
mod bounds;
mod digest;
mod nesting;
mod reading;
#[cfg(test)]
mod tests;

use std::mem::ManuallyDrop;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};

use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{
    ClientID, Doc, GetString, IdSet, OffsetKind, Options, ReadTxn, StateVector, Text, Transact, TransactionMut, Update,
    WriteTxn,
};

use batch::Batch;
pub use bounds::CLIENT_ID_MAX;
use bounds::{Block, Id, Visitor};
use nesting::{NestingIndex, Placement};

/// The largest nesting depth any [`TextLimits`] can allow: larger settings are lowered to it,
/// so yrs's recursive handling of values and types stays far from the end of the stack.
pub const NESTING_DEPTH_CEILING: usize = 100;

/// The largest state vector [`TextDocument::diff`] accepts, in bytes (about 80 000 clients).
pub const STATE_VECTOR_BYTES_MAX: usize = 1 << 20;

/// The log is not compacted before it holds this many bytes, however small the checkpoint.
const COMPACTION_FLOOR_BYTES: usize = 64 * 1024;

/// The guid of every text document's yrs `Doc` (Yjs only uses it to tell subdocuments apart).
const DOCUMENT_GUID: &str = "concord-text";

/// Bounds on untrusted input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextLimits {
    /// The largest update accepted by [`TextDocument::apply_update`] and [`validate_update`], and
    /// the largest later update accepted by [`TextDocument::load`], in bytes. Default 1 MiB.
    pub update_bytes_max: usize,
    /// How deeply maps and arrays may enclose one another inside one `Any` value (and objects and
    /// arrays inside the JSON of an embed or a format attribute), and how deeply shared types may
    /// nest (a type directly inside a root type is at depth 1). Default 32; values above
    /// [`NESTING_DEPTH_CEILING`] count as the ceiling.
    pub nesting_depth_max: usize,
    /// The largest saved state [`TextDocument::load`] accepts, and the most a document retains
    /// (its last checkpoint plus the updates applied since) before `apply_update` refuses more,
    /// in bytes. Default 64 MiB.
    pub document_bytes_max: usize,
}

impl Default for TextLimits {
    /// 1 MiB updates, nesting 32 deep, 64 MiB documents.
    fn default() -> TextLimits {
        TextLimits { update_bytes_max: 1 << 20, nesting_depth_max: 32, document_bytes_max: 64 << 20 }
    }
}

impl TextLimits {
    /// The nesting depth in force: the setting, at most [`NESTING_DEPTH_CEILING`].
    pub(crate) fn depth(&self) -> usize {
        self.nesting_depth_max.min(NESTING_DEPTH_CEILING)
    }
}

/// What was wrong with a text update, a state vector, an edit or a saved document.
///
/// Offsets are byte positions in the input that was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("update is {length} bytes; the limit is {maximum}")]
    UpdateTooLarge { length: usize, maximum: usize },
    #[error("document would retain {length} bytes; the limit is {maximum}")]
    DocumentTooLarge { length: usize, maximum: usize },
    #[error("state vector is {length} bytes; the limit is {maximum}")]
    StateVectorTooLarge { length: usize, maximum: usize },
    #[error("input ends early at byte {offset}")]
    UnexpectedEnd { offset: usize },
    #[error("length {length} at byte {offset} points past the end ({remaining} bytes remain)")]
    LengthPastEnd { offset: usize, length: u64, remaining: usize },
    #[error("count {count} at byte {offset} cannot fit in the {remaining} bytes that remain")]
    CountPastEnd { offset: usize, count: u64, remaining: usize },
    #[error("varint at byte {offset} is too long or too large for its field")]
    InvalidVarint { offset: usize },
    #[error("client id {client} at byte {offset} does not fit in 53 bits")]
    ClientIdTooLarge { offset: usize, client: u64 },
    #[error("clock {clock} at byte {offset} exceeds {}", i32::MAX)]
    ClockTooLarge { offset: usize, clock: u64 },
    #[error("client {client} appears twice in one section (byte {offset})")]
    DuplicateClient { offset: usize, client: u64 },
    #[error("garbage-collected or skipped range of length 0 at byte {offset}")]
    EmptyBlock { offset: usize },
    #[error("unknown content reference in info byte {info:#04x} at byte {offset}")]
    UnknownContentRef { offset: usize, info: u8 },
    #[error("{what} at byte {offset} is not supported: yrs 0.28.1 and Yjs read it differently")]
    UnsupportedContent { offset: usize, what: &'static str },
    #[error("unknown shared type reference {type_ref} at byte {offset}")]
    UnknownTypeRef { offset: usize, type_ref: u8 },
    #[error("unknown value tag {tag} at byte {offset}")]
    UnknownAnyTag { offset: usize, tag: u8 },
    #[error("parent info {value} at byte {offset} is neither 0 (nested) nor 1 (root)")]
    InvalidParentInfo { offset: usize, value: u32 },
    #[error("struct refers to a later struct of its own client at byte {offset}")]
    ForwardReference { offset: usize },
    #[error("value at byte {offset} nests maps and arrays deeper than {maximum}")]
    NestingTooDeep { offset: usize, maximum: usize },
    #[error("string at byte {offset} is not UTF-8")]
    InvalidUtf8 { offset: usize },
    #[error("JSON text at byte {offset} does not parse")]
    InvalidJson { offset: usize },
    #[error("delete set range of length 0 at byte {offset}")]
    EmptyDeleteRange { offset: usize },
    #[error("delete set of client {client} is not sorted or overlaps itself at byte {offset}")]
    UnorderedDeleteSet { offset: usize, client: u64 },
    #[error("{offset} bytes were read but more follow")]
    TrailingBytes { offset: usize },
    #[error("yrs could not decode the update: {0}")]
    Decode(String),
    #[error("yrs could not integrate the update: {0}")]
    Integrate(String),
    #[error("yrs panicked on the update; the document was rebuilt without it")]
    Panicked,
    #[error("the document is busy or was left locked by a failure")]
    Busy,
    #[error("yrs panicked while rendering the document's content")]
    RenderingPanicked,
    #[error("the document could not be rebuilt after a failed update: {0}")]
    RecoveryFailed(String),
    #[error("index {index} is past the end of the text ({length} UTF-16 code units)")]
    IndexOutOfRange { index: u32, length: u32 },
    #[error("index {index} falls between the two halves of a surrogate pair")]
    SplitsSurrogatePair { index: u32 },
}

/// Checks an untrusted update v1 against `limits` without applying it: its size, its whole
/// structure, and the nesting of the values it holds (see `text/bounds.rs`). How deeply shared
/// types nest depends on the document, so only [`TextDocument::apply_update`] looks at that.
pub fn validate_update(update: &[u8], limits: &TextLimits) -> Result<(), TextError> {
    if update.len() > limits.update_bytes_max {
        return Err(TextError::UpdateTooLarge { length: update.len(), maximum: limits.update_bytes_max });
    }
    bounds::scan_update(update, limits.depth(), &mut bounds::Ignore)
}

/// Checks an untrusted state vector v1: at most [`STATE_VECTOR_BYTES_MAX`] bytes, a count that
/// fits, client ids within 53 bits, clocks within 32 bits, no client twice, no trailing bytes.
pub fn validate_state_vector(state_vector: &[u8]) -> Result<(), TextError> {
    if state_vector.len() > STATE_VECTOR_BYTES_MAX {
        return Err(TextError::StateVectorTooLarge { length: state_vector.len(), maximum: STATE_VECTOR_BYTES_MAX });
    }
    bounds::scan_state_vector(state_vector).map(|_| ())
}

/// Why an update was not applied.
#[derive(Debug)]
enum Failure {
    /// Refused before yrs touched the document, which is unchanged.
    Refused(TextError),
    /// yrs failed part-way: the document must be rebuilt.
    Damaged(TextError),
}

impl Failure {
    fn into_error(self) -> TextError {
        match self {
            Failure::Refused(error) | Failure::Damaged(error) => error,
        }
    }
}

/// What yrs reported about a successful apply.
#[derive(Debug)]
struct Applied {
    /// Whether yrs integrated or deleted anything, or put deletions aside.
    changed: bool,
    /// The ranges yrs inserted, per client.
    inserted: Vec<(u64, Vec<Range<u32>>)>,
    /// Structs yrs kept pending after all, taken back from it (not expected: see `batch.rs`).
    pending: Option<Vec<u8>>,
}

/// A Yjs-compatible collaborative document whose root `Y.Text`s Concord serves.
pub struct TextDocument {
    client_id: u64,
    doc: Doc,
    /// Where every integrated range sits, for the type-nesting guard.
    nesting: NestingIndex,
    /// Structs received but not yet integrated (something they depend on is missing), as updates.
    held: Vec<Vec<u8>>,
    /// What the held structs wait for: they are offered to yrs again once one of these ids is
    /// integrated (or at the next integration at all, when `held_unplanned` is set).
    held_awaits: Vec<Id>,
    /// Whether the held updates include some that were never planned (taken back from yrs).
    held_unplanned: bool,
    /// The clock ranges the held updates cover, per client, merged.
    held_covered: Vec<(u64, u32, u32)>,
    /// A saved state the document can be rebuilt from.
    checkpoint: Vec<u8>,
    /// Updates applied (or made) since the checkpoint, in order.
    log: Vec<Vec<u8>>,
    /// The total length of `log`.
    log_bytes: usize,
}

impl std::fmt::Debug for TextDocument {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("TextDocument")
            .field("client_id", &self.client_id)
            .field("held_bytes", &self.held.iter().map(Vec::len).sum::<usize>())
            .field("checkpoint_bytes", &self.checkpoint.len())
            .field("log_updates", &self.log.len())
            .field("log_bytes", &self.log_bytes)
            .finish_non_exhaustive()
    }
}

impl TextDocument {
    /// An empty document whose local edits are made as `client_id`.
    ///
    /// Yjs client ids are JavaScript safe integers, so only the low 53 bits of `client_id` are
    /// kept (see [`CLIENT_ID_MAX`]); callers should pick ids below 2^53 so that they stay
    /// distinct. Two documents editing concurrently must not share a client id.
    pub fn new(client_id: u64) -> TextDocument {
        let client_id = client_id & CLIENT_ID_MAX;
        let mut options = Options::with_guid_and_client_id(DOCUMENT_GUID.into(), ClientID::new(client_id));
        // Yjs counts text positions in UTF-16 code units.
        options.offset_kind = OffsetKind::Utf16;
        TextDocument {
            client_id,
            doc: Doc::with_options(options),
            nesting: NestingIndex::default(),
            held: Vec::new(),
            held_awaits: Vec::new(),
            held_unplanned: false,
            held_covered: Vec::new(),
            checkpoint: Vec::new(),
            log: Vec::new(),
            log_bytes: 0,
        }
    }

    /// The client id local edits are made as (the low 53 bits of the one given).
    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    /// Rebuilds a document from a saved state (from [`TextDocument::save`]; empty means an empty
    /// document) plus the updates applied after it, in order.
    ///
    /// The disk is not trusted either: `saved` may be at most `limits.document_bytes_max` bytes
    /// and each update at most `limits.update_bytes_max`, and all of them go through the same
    /// bounds and guards as [`TextDocument::apply_update`]. The first one refused fails the load.
    pub fn load(
        client_id: u64,
        saved: &[u8],
        updates: &[&[u8]],
        limits: &TextLimits,
    ) -> Result<TextDocument, TextError> {
        if saved.len() > limits.document_bytes_max {
            return Err(TextError::DocumentTooLarge { length: saved.len(), maximum: limits.document_bytes_max });
        }
        let mut document = TextDocument::new(client_id);
        if !saved.is_empty() {
            document.integrate(saved, limits.depth()).map_err(Failure::into_error)?;
        }
        document.checkpoint = saved.to_vec();
        for update in updates {
            document.apply_update(update, limits)?;
        }
        Ok(document)
    }

    /// Applies a Yjs binary update (v1) from an untrusted source.
    ///
    /// Returns `Ok(true)` if the document's state changed: new structs or deletions, including
    /// ones held back until the structs they depend on arrive; `Ok(false)` if the update was
    /// already fully contained, so applying an update twice is a no-op. On error the document is
    /// unchanged.
    ///
    /// Structs that yrs could not integrate safely are integrated as garbage-collected ranges of
    /// the same length, as Yjs does for the second kind: shared types that would nest deeper
    /// than `limits.nesting_depth_max`, and items whose stated parent holds no shared type.
    pub fn apply_update(&mut self, update: &[u8], limits: &TextLimits) -> Result<bool, TextError> {
        if update.len() > limits.update_bytes_max {
            return Err(TextError::UpdateTooLarge { length: update.len(), maximum: limits.update_bytes_max });
        }
        let retained = self.retained_bytes().saturating_add(update.len());
        if retained > limits.document_bytes_max {
            return Err(TextError::DocumentTooLarge { length: retained, maximum: limits.document_bytes_max });
        }
        match self.integrate(update, limits.depth()) {
            Ok(false) => Ok(false),
            Ok(true) => {
                self.remember(update.to_vec());
                Ok(true)
            }
            Err(Failure::Refused(error)) => Err(error),
            Err(Failure::Damaged(error)) => {
                self.rebuild()?;
                Err(error)
            }
        }
    }

    /// The document's state vector, v1 encoding.
    pub fn state_vector(&self) -> Vec<u8> {
        match self.doc.try_transact() {
            Ok(txn) => txn.state_vector().encode_v1(),
            // Only a failure that is rebuilt at once locks the document; answer "nothing".
            Err(_) => StateVector::default().encode_v1(),
        }
    }

    /// An update v1 holding everything the holder of `state_vector` (v1) lacks: the structs past
    /// its clocks, held-back structs included, and the whole delete set (like Yjs's
    /// `encodeStateAsUpdate(doc, stateVector)`). The state vector is checked first (see
    /// [`validate_state_vector`]).
    pub fn diff(&self, state_vector: &[u8]) -> Result<Vec<u8>, TextError> {
        validate_state_vector(state_vector)?;
        if !self.held.is_empty() {
            let saved = self.save();
            return catch_unwind(|| yrs::diff_updates_v1(&saved, state_vector))
                .map_err(|_| TextError::Panicked)?
                .map_err(|error| TextError::Decode(error.to_string()));
        }
        let state_vector =
            StateVector::decode_v1(state_vector).map_err(|error| TextError::Decode(error.to_string()))?;
        let txn = self.doc.try_transact().map_err(|_| TextError::Busy)?;
        Ok(txn.encode_state_as_update_v1(&state_vector))
    }

    /// The plain text of the root `Y.Text` called `name` ("" if there is none). Embedded shared
    /// types are written out as yrs renders them.
    pub fn text(&self, name: &str) -> String {
        let Ok(txn) = self.doc.try_transact() else {
            return String::new();
        };
        txn.get_text(name).map(|text| text.get_string(&txn)).unwrap_or_default()
    }

    /// Everything the document shows: each root type that shows something, as `(name, content)`,
    /// sorted by name. A root reads the same whatever type yrs was told it is (only local edits
    /// tell it; remote updates leave roots untyped): plain text (as [`TextDocument::text`] gives
    /// it) when it has no formatting, embeds nor map entries, else a JSON object with its Yjs
    /// delta and its entries (see `text/reading.rs`).
    ///
    /// Two documents with the same digest hold the same structs, but yrs 0.28 may integrate a
    /// saved state in another order than the updates it came from (found by fuzzing), so the
    /// same digest does not imply the same text: whoever replaces a document by its save (the
    /// engine's compaction) must also compare readings. Fails only if the document is locked or
    /// yrs panics while rendering a nested type.
    pub fn reading(&self) -> Result<Vec<(String, String)>, TextError> {
        let txn = self.doc.try_transact().map_err(|_| TextError::Busy)?;
        catch_unwind(AssertUnwindSafe(|| reading::render(&txn))).map_err(|_| TextError::RenderingPanicked)
    }

    /// The whole state as one update v1, held-back structs and pending deletions included, so
    /// that nothing acknowledged is lost on reload.
    pub fn save(&self) -> Vec<u8> {
        let state = match self.doc.try_transact() {
            Ok(txn) => txn.encode_state_as_update_v1(&StateVector::default()),
            // Unreachable in practice (see `state_vector`); the checkpoint and log are the state.
            Err(_) => return self.checkpoint.clone(),
        };
        if self.held.is_empty() {
            return state;
        }
        let parts: Vec<&[u8]> = std::iter::once(&state).chain(&self.held).map(Vec::as_slice).collect();
        // Not expected to fail: the parts are yrs's encoding and held structs that passed the bounds.
        merge_guarded(&parts).unwrap_or(state)
    }

    /// A blake3 hash of a canonical encoding of the state: two documents have the same digest
    /// exactly when they hold the same structs (live content with its origins and parents, and
    /// the ids of deleted ranges) and the same deletions, whatever order updates arrived in and
    /// however yrs split its items. See `text/digest.rs`.
    pub fn digest(&self) -> [u8; 32] {
        let state = self.save();
        digest::digest_of_state(&state).unwrap_or_else(|| {
            // Not reachable: yrs's own encoding always passes the scanner.
            let mut hasher = blake3::Hasher::new();
            hasher.update(b"concord text digest of raw state v1");
            hasher.update(&state);
            *hasher.finalize().as_bytes()
        })
    }

    /// Inserts `chunk` into the root `Y.Text` called `name` (created if absent) at `index`,
    /// counted in UTF-16 code units as Yjs does, and returns the update the edit made.
    ///
    /// An index past the end is an error (it is not clamped), and so is one that falls inside a
    /// surrogate pair.
    pub fn insert_text(&mut self, name: &str, index: u32, chunk: &str) -> Result<Vec<u8>, TextError> {
        self.edit(name, |txn, text| {
            check_position(txn, text, index)?;
            text.insert(txn, index, chunk);
            Ok(())
        })
    }

    /// Deletes `length` UTF-16 code units at `index` from the root `Y.Text` called `name`, and
    /// returns the update the edit made. The range must lie within the text and must not cut a
    /// surrogate pair.
    pub fn delete_text(&mut self, name: &str, index: u32, length: u32) -> Result<Vec<u8>, TextError> {
        self.edit(name, |txn, text| {
            let end = index.checked_add(length).ok_or(TextError::IndexOutOfRange { index: u32::MAX, length: 0 })?;
            check_position(txn, text, index)?;
            check_position(txn, text, end)?;
            if length > 0 {
                text.remove_range(txn, index, length);
            }
            Ok(())
        })
    }

    /// Runs a local edit on a root text and returns its update.
    fn edit(
        &mut self,
        name: &str,
        change: impl FnOnce(&mut TransactionMut<'_>, &yrs::TextRef) -> Result<(), TextError>,
    ) -> Result<Vec<u8>, TextError> {
        self.local_edit(|txn| {
            let text = txn.get_or_insert_text(name);
            change(txn, &text)
        })
    }

    /// Runs `read` in a read transaction on the yrs document.
    pub(crate) fn read<T>(&self, read: impl FnOnce(&yrs::Transaction<'_>) -> T) -> Result<T, TextError> {
        let txn = self.doc.try_transact().map_err(|_| TextError::Busy)?;
        Ok(read(&txn))
    }

    /// Runs a local edit that adds only scalar content directly to root types (text, or `Any`
    /// values in a root map) and returns its update. `change` must check everything before it
    /// touches the document: yrs has no rollback.
    pub(crate) fn local_edit(
        &mut self,
        change: impl FnOnce(&mut TransactionMut<'_>) -> Result<(), TextError>,
    ) -> Result<Vec<u8>, TextError> {
        let (update, inserted) = {
            let mut txn = self.doc.try_transact_mut().map_err(|_| TextError::Busy)?;
            change(&mut txn)?;
            (txn.encode_update_v1(), id_set_ranges(txn.insert_set()))
        };
        // Local edits only ever add scalar content to a root type.
        let placement = Placement { parent_depth: Some(0), is_type: false };
        for (client, ranges) in &inserted {
            for range in ranges {
                self.nesting.insert(*client, range.start, range.end, placement);
            }
        }
        self.remember(update.clone());
        Ok(update)
    }

    /// Bytes retained for rebuilding: the checkpoint plus the log.
    fn retained_bytes(&self) -> usize {
        self.checkpoint.len().saturating_add(self.log_bytes)
    }

    /// Appends an applied update to the log, compacting the log into a new checkpoint once it
    /// outgrows the checkpoint.
    fn remember(&mut self, update: Vec<u8>) {
        self.log_bytes = self.log_bytes.saturating_add(update.len());
        self.log.push(update);
        if self.log_bytes > self.checkpoint.len().max(COMPACTION_FLOOR_BYTES) {
            self.checkpoint = self.save();
            self.log.clear();
            self.log_bytes = 0;
        }
    }

    /// Replaces the yrs document with one rebuilt from the checkpoint and the log.
    fn rebuild(&mut self) -> Result<(), TextError> {
        let mut fresh = TextDocument::new(self.client_id);
        let updates = std::iter::once(&self.checkpoint).chain(&self.log).filter(|update| !update.is_empty());
        for update in updates {
            fresh
                .integrate(update, NESTING_DEPTH_CEILING)
                .map_err(|failure| TextError::RecoveryFailed(failure.into_error().to_string()))?;
        }
        self.doc = fresh.doc;
        self.nesting = fresh.nesting;
        self.held = fresh.held;
        self.held_awaits = fresh.held_awaits;
        self.held_unplanned = fresh.held_unplanned;
        self.held_covered = fresh.held_covered;
        Ok(())
    }

    /// Checks `update`, hands yrs what it can integrate, holds the rest back, and offers the held
    /// structs again whenever something they wait for has been integrated.
    fn integrate(&mut self, update: &[u8], depth_max: usize) -> Result<bool, Failure> {
        let mut batch = Batch::default();
        bounds::scan_update(update, depth_max, &mut batch).map_err(Failure::Refused)?;
        let held_before = self.held_covered.clone();
        let step = self.step(&batch, depth_max)?;
        let mut changed = step.changed;
        if let Some(remainder) = step.held {
            // A remainder that is already held (an update received twice) adds nothing.
            let mut covered = held_before.clone();
            covered.extend(held_ranges(std::slice::from_ref(&remainder)));
            let covered = coalesce(covered);
            if covered != held_before {
                self.held.push(remainder);
                self.held_awaits.extend_from_slice(&step.awaits);
                self.held_covered = covered;
            }
        }
        // Offer the held structs again for as long as that integrates something they wait for.
        // What is held passed the bounds when it arrived, so the merge is scanned at the ceiling.
        while !self.held.is_empty() && self.held_may_go()? {
            let parts: Vec<&[u8]> = self.held.iter().map(Vec::as_slice).collect();
            let combined =
                if parts.len() == 1 { parts[0].to_vec() } else { merge_guarded(&parts).map_err(Failure::Damaged)? };
            let mut batch = Batch::default();
            bounds::scan_update(&combined, NESTING_DEPTH_CEILING, &mut batch).map_err(Failure::Damaged)?;
            // The update's own part is in already: any failure now must undo it.
            let step = self.step(&batch, depth_max).map_err(|failure| Failure::Damaged(failure.into_error()))?;
            changed |= step.changed;
            self.held = step.held.into_iter().collect();
            self.held_awaits = step.awaits;
            self.held_unplanned = false;
            self.held_covered = held_ranges(&self.held);
            if !step.progressed {
                break;
            }
        }
        Ok(changed || self.held_covered != held_before)
    }

    /// Whether something the held structs wait for has been integrated.
    fn held_may_go(&self) -> Result<bool, Failure> {
        if self.held_unplanned {
            return Ok(true);
        }
        let txn = self.doc.try_transact().map_err(|_| Failure::Damaged(TextError::Busy))?;
        let clocks = txn.state_vector();
        Ok(self.held_awaits.iter().any(|id| clocks.get(&ClientID::new(id.client)) > id.clock))
    }

    /// Plans a batch against the document, runs the type-nesting guard on what can go, and hands
    /// that to yrs.
    fn step(&mut self, batch: &Batch<'_>, depth_max: usize) -> Result<Step, Failure> {
        let clocks = {
            let txn = self.doc.try_transact().map_err(|_| Failure::Damaged(TextError::Busy))?;
            txn.state_vector()
        };
        let plan = batch.plan(&|client| clocks.get(&ClientID::new(client)));
        let taken = batch.collect_taken(&plan);
        let analysis = nesting::analyze(&[&taken], &self.nesting, depth_max);
        let ready = batch.encode_taken(&plan, &analysis);
        let mut held = batch.encode_held(&plan);

        let decoded =
            Update::decode_v1(&ready).map_err(|error| Failure::Refused(TextError::Decode(error.to_string())))?;
        let applied = apply_guarded(&self.doc, decoded)?;
        self.nesting.record(&analysis, &applied.inserted);
        if let Some(pending) = applied.pending {
            self.held_unplanned = true;
            held = Some(match held {
                None => pending,
                Some(held) => merge_guarded(&[&held, &pending]).map_err(Failure::Damaged)?,
            });
        }
        Ok(Step {
            changed: applied.changed,
            progressed: !applied.inserted.is_empty(),
            held,
            awaits: plan.awaits().to_vec(),
        })
    }
}

/// The outcome of one [`TextDocument::step`].
#[derive(Debug)]
struct Step {
    /// Whether yrs integrated or deleted anything, or put deletions aside.
    changed: bool,
    /// Whether yrs integrated any struct.
    progressed: bool,
    /// What could not go, as one update.
    held: Option<Vec<u8>>,
    /// What that waits for.
    awaits: Vec<Id>,
}

/// Merges updates with yrs, turning its errors and panics into errors.
fn merge_guarded(updates: &[&[u8]]) -> Result<Vec<u8>, TextError> {
    match catch_unwind(|| yrs::merge_updates_v1(updates)) {
        Ok(Ok(merged)) => Ok(merged),
        Ok(Err(error)) => Err(TextError::Decode(error.to_string())),
        Err(_) => Err(TextError::Panicked),
    }
}

/// The clock ranges of the structs in held updates, per client, merged: what is held, whatever
/// way it is split.
fn held_ranges(held: &[Vec<u8>]) -> Vec<(u64, u32, u32)> {
    /// Collects struct ranges.
    #[derive(Debug, Default)]
    struct Ranges(Vec<(u64, u32, u32)>);
    impl Visitor<'_> for Ranges {
        fn block(&mut self, id: Id, length: u32, block: Block<'_>, _encoded: &[u8]) {
            if length > 0 && block != Block::Skip {
                self.0.push((id.client, id.clock, id.clock + length));
            }
        }
        fn deleted(&mut self, _id: Id, _length: u32) {}
    }
    let mut ranges = Ranges::default();
    for update in held {
        // Held updates are this module's own encoding; one that does not scan holds nothing.
        let _ = bounds::scan_update(update, NESTING_DEPTH_CEILING, &mut ranges);
    }
    coalesce(ranges.0)
}

/// Sorts per-client ranges and merges those that overlap or touch.
fn coalesce(mut ranges: Vec<(u64, u32, u32)>) -> Vec<(u64, u32, u32)> {
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u32, u32)> = Vec::with_capacity(ranges.len());
    for (client, start, end) in ranges {
        match merged.last_mut() {
            Some(last) if last.0 == client && start <= last.2 => last.2 = last.2.max(end),
            _ => merged.push((client, start, end)),
        }
    }
    merged
}

/// The ranges of an id set, per client.
fn id_set_ranges(set: &IdSet) -> Vec<(u64, Vec<Range<u32>>)> {
    set.iter().map(|(client, ranges)| (client.get(), ranges.iter().cloned().collect())).collect()
}

/// The pending deletions of a document, compared before and after an apply.
fn pending_deletions<T: ReadTxn>(txn: &T) -> Option<IdSet> {
    txn.store().pending_ds().cloned()
}

/// Applies a decoded update in one transaction, turning yrs errors and panics into failures.
fn apply_guarded(doc: &Doc, update: Update) -> Result<Applied, Failure> {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        // On a panic this transaction is leaked, not dropped: dropping commits, and a commit on
        // a broken state could panic again during unwinding, which aborts.
        let mut txn = ManuallyDrop::new(doc.try_transact_mut().map_err(|_| TextError::Busy)?);
        let before = pending_deletions(&*txn);
        let result = txn.apply_update(update);
        let outcome = match result {
            Ok(()) => {
                // The batch plan leaves yrs nothing to keep pending; should it keep something
                // anyway, take it back so that the guards see it when it is offered again.
                let pending = txn.store_mut().pending_update_mut().and_then(|pending| {
                    pending.missing = StateVector::default();
                    let update = std::mem::replace(&mut pending.update, Update::new());
                    (!update.is_empty()).then(|| update.encode_v1())
                });
                let changed = txn.has_changes() || pending_deletions(&*txn) != before || pending.is_some();
                Ok(Applied { changed, inserted: id_set_ranges(txn.insert_set()), pending })
            }
            Err(error) => Err(TextError::Integrate(error.to_string())),
        };
        txn.commit();
        drop(ManuallyDrop::into_inner(txn));
        outcome
    }));
    match outcome {
        Ok(Ok(applied)) => Ok(applied),
        Ok(Err(error)) => Err(Failure::Damaged(error)),
        Err(_) => Err(Failure::Damaged(TextError::Panicked)),
    }
}

/// Checks that `index` is within `text` and not inside a surrogate pair.
fn check_position(txn: &TransactionMut<'_>, text: &yrs::TextRef, index: u32) -> Result<(), TextError> {
    let length = text.len(txn);
    if index > length {
        return Err(TextError::IndexOutOfRange { index, length });
    }
    if index > 0 && index < length {
        let string = text.get_string(txn);
        let before = string.encode_utf16().nth(index as usize - 1);
        if before.is_some_and(|unit| (0xD800..0xDC00).contains(&unit)) {
            return Err(TextError::SplitsSurrogatePair { index });
        }
    }
    Ok(())
}
