//! The audit trail: an append-only, hash-chained log of applied changes (when, which record,
//! the origin node, the authenticated principal, the fields changed), its verification, its
//! retention anchor, and its JSON-lines export. Pure: time, identities and entries are
//! arguments; the node stores entries (store keyspace `audit`) and reads files.
//!
//! # The chain
//! Entry `n` (sequences count from 1) carries the hash of entry `n - 1` (all zeros for entry 1)
//! and its own hash: blake3 over a length-prefixed encoding of every other field (see
//! [`AuditEntry::computed_hash`]). [`Chain`] hands out entries in order:
//!
//! ```
//! use crdt::audit::{Anchor, Chain, verify};
//! use crdt::key::RecordKey;
//!
//! let key = RecordKey::new("orders", "o-1").expect("a valid key");
//! let mut chain = Chain::new();
//! let first = chain.append(1_000, &key, "hq", "token:ops", ["status"]).expect("short names");
//! let second = chain.append(2_000, &key, "store-1", "peer:store-1", ["price", "status"]).expect("short names");
//! assert_eq!(second.previous_hash, first.hash);
//! let verified = verify([first, second], Anchor::GENESIS).expect("an intact log");
//! assert_eq!(verified.head, chain.head());
//! // After a restart, the node resumes from the last stored entry (or the anchor, when empty).
//! let chain = Chain::resume(verified.head);
//! ```
//!
//! # What verification detects
//! [`verify`] reads entries in sequence order from an [`Anchor`] (genesis, or the last entry
//! trimmed away) and reports the first problem as a [`Tamper`] with the sequence it concerns:
//! - **Altered**: an entry's content no longer matches its hash, or an entry's `previous_hash`
//!   does not match the entry before it (the earlier entry was changed and its hash recomputed;
//!   reported at the earlier entry, or at the first entry when it does not match the anchor).
//! - **Removed**: a sequence is missing (reported at the first missing sequence), including
//!   entries missing between the anchor and the first entry.
//! - **Reordered**: the missing sequence appears later (within [`REORDER_WINDOW`] entries;
//!   further away it is reported as Removed), or a sequence repeats or goes back.
//!
//! What it cannot detect without something kept outside the log: removal of the *last* entries
//! (what remains is a valid, shorter chain), and a rewrite of the last entries with recomputed
//! hashes. Pass a head saved elsewhere (an earlier export's last entry, a status page, a
//! notary) to [`verify_through`] and those are caught too. Likewise someone who rewrites the
//! trim anchor together with the entries after it cannot be caught without an outside copy of
//! the anchor.
//!
//! # Retention
//! The node deletes a prefix of the log (entries older than the retention, [`trim_point`]) and
//! keeps the anchor (the last deleted entry's sequence and hash) in the same batch. Verification
//! of what remains starts from that anchor, and an export starts with it.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::io::{BufRead, Read};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::key::RecordKey;

/// The longest origin or principal name, in bytes.
pub const NAME_BYTES_MAX: usize = 256;
/// The most field names an entry lists; the rest are counted in `fields_omitted`.
pub const FIELD_NAMES_MAX: usize = 256;
/// The most bytes of field names an entry lists; the rest are counted in `fields_omitted`.
pub const FIELD_NAMES_BYTES_MAX: usize = 16 << 10;
/// The largest encoded entry, in the store and as a JSON line.
pub const AUDIT_ENTRY_BYTES_MAX: usize = 64 << 10;
/// How far ahead [`verify`] looks for a missing sequence before calling it removed.
pub const REORDER_WINDOW: usize = 1024;

/// A blake3 hash: hex in JSON, bytes in MessagePack.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Digest(pub [u8; 32]);

impl fmt::Display for Digest {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "Digest({self})")
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&hex::encode(self.0))
        } else {
            serializer.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Digest, D::Error> {
        let bytes = if deserializer.is_human_readable() {
            hex::decode(String::deserialize(deserializer)?).map_err(serde::de::Error::custom)?
        } else {
            serde_bytes::ByteBuf::deserialize(deserializer)?.into_vec()
        };
        <[u8; 32]>::try_from(bytes).map(Digest).map_err(|_| serde::de::Error::custom("a digest is 32 bytes"))
    }
}

/// One applied change, linked to the entry before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "EntryWire", try_from = "EntryWire")]
pub struct AuditEntry {
    /// From 1, without gaps.
    pub sequence: u64,
    /// When the change was applied here, in milliseconds since the Unix epoch, as given.
    pub time_ms: u64,
    pub key: RecordKey,
    /// The node that made the change.
    pub origin: String,
    /// Who is answerable for it here: the API token's name for a local write, the peer
    /// certificate's name for a change received from a peer.
    pub principal: String,
    /// The top-level fields the change touched, sorted and distinct.
    pub fields: Vec<String>,
    /// Fields changed but not listed, beyond [`FIELD_NAMES_MAX`] or [`FIELD_NAMES_BYTES_MAX`].
    pub fields_omitted: u64,
    /// The previous entry's hash; all zeros for sequence 1.
    pub previous_hash: Digest,
    /// [`AuditEntry::computed_hash`] when the entry was made.
    pub hash: Digest,
}

/// Where a (possibly trimmed) log starts: the sequence and hash of the entry just before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anchor {
    pub sequence: u64,
    pub hash: Digest,
}

/// Why an entry could not be appended. The chain did not change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    #[error("{what} is {bytes} bytes; the limit is {NAME_BYTES_MAX}")]
    NameTooLong { what: &'static str, bytes: usize },
    #[error("the audit log has used every sequence number")]
    SequenceExhausted,
}

/// Why bytes or a line are not an entry or an anchor.
#[derive(Debug, thiserror::Error)]
pub enum AuditDecodeError {
    #[error("audit entry is {0} bytes; the limit is {AUDIT_ENTRY_BYTES_MAX}")]
    TooLarge(usize),
    #[error("audit entry does not decode: {0}")]
    Malformed(#[from] rmp_serde::decode::Error),
    #[error("audit entry does not parse: {0}")]
    Json(#[from] serde_json::Error),
    #[error("an anchor is 40 bytes, not {0}")]
    Anchor(usize),
}

/// Which kind of tampering [`verify`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TamperKind {
    Altered,
    Removed,
    Reordered,
}

/// The first problem [`verify`] found, and the sequence it concerns (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("audit entry {sequence} was {}", match .kind { TamperKind::Altered => "altered", TamperKind::Removed => "removed", TamperKind::Reordered => "moved" })]
pub struct Tamper {
    pub sequence: u64,
    pub kind: TamperKind,
}

/// What an intact log held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// How many entries were checked.
    pub entries: u64,
    /// The last entry's sequence and hash (the anchor when there were none): save it outside the
    /// log to detect later removals of the tail with [`verify_through`].
    pub head: Anchor,
}

impl Anchor {
    /// The start of a log that was never trimmed.
    pub const GENESIS: Anchor = Anchor { sequence: 0, hash: Digest([0; 32]) };

    /// The anchor that `entry` leaves when it is the last entry trimmed, or the head it makes.
    pub fn of(entry: &AuditEntry) -> Anchor {
        Anchor { sequence: entry.sequence, hash: entry.hash }
    }

    /// 40 bytes for the store's metadata: the sequence (u64 big-endian) and the hash.
    pub fn encode(&self) -> [u8; 40] {
        let mut bytes = [0; 40];
        bytes[..8].copy_from_slice(&self.sequence.to_be_bytes());
        bytes[8..].copy_from_slice(&self.hash.0);
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Anchor, AuditDecodeError> {
        let bytes = <&[u8; 40]>::try_from(bytes).map_err(|_| AuditDecodeError::Anchor(bytes.len()))?;
        let mut sequence = [0; 8];
        sequence.copy_from_slice(&bytes[..8]);
        let mut hash = [0; 32];
        hash.copy_from_slice(&bytes[8..]);
        Ok(Anchor { sequence: u64::from_be_bytes(sequence), hash: Digest(hash) })
    }

    /// The first line of an export of a trimmed log: `{"anchor":{"sequence":n,"hash":"..."}}`.
    pub fn to_json_line(&self) -> String {
        serde_json::json!({ "anchor": self }).to_string()
    }
}

impl AuditEntry {
    /// blake3 over a length-prefixed encoding of every field but `hash`: a domain tag, the
    /// sequence and time (u64 big-endian), collection, id, origin and principal (each a u64
    /// big-endian length and the bytes), the field count and each field the same way, the
    /// omitted count, and the previous hash. Length prefixes make the encoding unambiguous.
    pub fn computed_hash(&self) -> Digest {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"concord audit v1\0");
        hasher.update(&self.sequence.to_be_bytes());
        hasher.update(&self.time_ms.to_be_bytes());
        let texts = [self.key.collection(), self.key.id(), self.origin.as_str(), self.principal.as_str()];
        for text in texts {
            hash_text(&mut hasher, text);
        }
        hasher.update(&(self.fields.len() as u64).to_be_bytes());
        for field in &self.fields {
            hash_text(&mut hasher, field);
        }
        hasher.update(&self.fields_omitted.to_be_bytes());
        hasher.update(&self.previous_hash.0);
        Digest(*hasher.finalize().as_bytes())
    }

    /// The MessagePack encoding for the store: the fields as an array, without their names
    /// (about 80 bytes less per entry than a map; an entry is written for every applied change).
    /// [`AuditEntry::decode`] also reads the map form, which stores written before session 7 hold.
    pub fn encode(&self) -> Vec<u8> {
        // Plain data into a Vec cannot fail.
        rmp_serde::to_vec(self).unwrap_or_default()
    }

    /// Decodes bytes from the store, at most [`AUDIT_ENTRY_BYTES_MAX`].
    pub fn decode(bytes: &[u8]) -> Result<AuditEntry, AuditDecodeError> {
        if bytes.len() > AUDIT_ENTRY_BYTES_MAX {
            return Err(AuditDecodeError::TooLarge(bytes.len()));
        }
        Ok(rmp_serde::from_slice(bytes)?)
    }

    /// One line of the JSON-lines export, without the newline.
    pub fn to_json_line(&self) -> String {
        // Plain data with string keys always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses one line of an export, at most [`AUDIT_ENTRY_BYTES_MAX`] bytes.
    pub fn from_json_line(line: &str) -> Result<AuditEntry, AuditDecodeError> {
        if line.len() > AUDIT_ENTRY_BYTES_MAX {
            return Err(AuditDecodeError::TooLarge(line.len()));
        }
        Ok(serde_json::from_str(line)?)
    }
}

fn hash_text(hasher: &mut blake3::Hasher, text: &str) {
    hasher.update(&(text.len() as u64).to_be_bytes());
    hasher.update(text.as_bytes());
}

/// The writing end of the log: the last entry's sequence and hash, and nothing else. The node
/// appends, stages the entry in the same store batch as the change it records, and, when it
/// starts, resumes from the last stored entry (or from the trim anchor when none is left).
#[derive(Debug, Clone, Default)]
pub struct Chain {
    head: Anchor,
}

impl Chain {
    /// An empty log.
    pub fn new() -> Chain {
        Chain::default()
    }

    /// A log whose last entry (or trim anchor) is `head`.
    pub fn resume(head: Anchor) -> Chain {
        Chain { head }
    }

    /// The last entry's sequence and hash.
    pub fn head(&self) -> Anchor {
        self.head
    }

    /// Makes the next entry. `fields` are sorted and deduplicated, and listed up to the bounds
    /// ([`FIELD_NAMES_MAX`], [`FIELD_NAMES_BYTES_MAX`]), the rest counted. Refuses an origin or
    /// principal over [`NAME_BYTES_MAX`] bytes; the chain is unchanged then.
    pub fn append<I, S>(
        &mut self,
        time_ms: u64,
        key: &RecordKey,
        origin: &str,
        principal: &str,
        fields: I,
    ) -> Result<AuditEntry, AuditError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        for (what, name) in [("origin", origin), ("principal", principal)] {
            if name.len() > NAME_BYTES_MAX {
                return Err(AuditError::NameTooLong { what, bytes: name.len() });
            }
        }
        let sequence = self.head.sequence.checked_add(1).ok_or(AuditError::SequenceExhausted)?;
        let (fields, fields_omitted) = bounded_fields(fields);
        let mut entry = AuditEntry {
            sequence,
            time_ms,
            key: key.clone(),
            origin: origin.to_owned(),
            principal: principal.to_owned(),
            fields,
            fields_omitted,
            previous_hash: self.head.hash,
            hash: Digest::default(),
        };
        entry.hash = entry.computed_hash();
        self.head = Anchor::of(&entry);
        Ok(entry)
    }
}

fn bounded_fields<I, S>(fields: I) -> (Vec<String>, u64)
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut all: Vec<String> = fields.into_iter().map(|field| field.as_ref().to_owned()).collect();
    all.sort();
    all.dedup();
    let mut listed = Vec::new();
    let mut bytes = 0usize;
    let mut omitted = 0u64;
    for field in all {
        if listed.len() < FIELD_NAMES_MAX && bytes + field.len() <= FIELD_NAMES_BYTES_MAX {
            bytes += field.len();
            listed.push(field);
        } else {
            omitted += 1;
        }
    }
    (listed, omitted)
}

/// Checks that `entries`, in the order given, are an intact chain starting right after `anchor`.
/// Stops at the first problem. Removal of the last entries is not detectable here: see
/// [`verify_through`].
pub fn verify<I: IntoIterator<Item = AuditEntry>>(entries: I, anchor: Anchor) -> Result<Verified, Tamper> {
    verify_decoded(entries, anchor, None)
}

/// Like [`verify`], and also checks the entries against `head`, a sequence and hash saved
/// outside the log: the entry at `head.sequence` must be there with that hash. So removing or
/// rewriting the last entries is detected too (as Removed, at the first missing sequence, or as
/// Altered). Entries after the head (the log grew since) are checked as usual.
pub fn verify_through<I: IntoIterator<Item = AuditEntry>>(
    entries: I,
    anchor: Anchor,
    head: Anchor,
) -> Result<Verified, Tamper> {
    verify_decoded(entries, anchor, Some(head))
}

fn verify_decoded<I: IntoIterator<Item = AuditEntry>>(
    entries: I,
    anchor: Anchor,
    head: Option<Anchor>,
) -> Result<Verified, Tamper> {
    verify_stream(entries.into_iter().map(Ok::<_, Infallible>), anchor, head).map_err(|failure| match failure {
        Failure::Tamper(tamper) => tamper,
        Failure::Input(never) => match never {},
    })
}

/// Why a JSON-lines export does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Tamper(#[from] Tamper),
    #[error(transparent)]
    Import(#[from] ImportError),
}

/// A line of an export that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ImportError {
    /// From 1.
    pub line: u64,
    pub reason: String,
}

/// Why [`verify_stream`] stopped: tampering, or an entry that could not be read.
enum Failure<E> {
    Tamper(Tamper),
    Input(E),
}

fn verify_stream<I, E>(mut entries: I, anchor: Anchor, head: Option<Anchor>) -> Result<Verified, Failure<E>>
where
    I: Iterator<Item = Result<AuditEntry, E>>,
{
    let tamper = |sequence, kind| Err(Failure::Tamper(Tamper { sequence, kind }));
    if let Some(head) = head
        && head.sequence == anchor.sequence
        && head.hash != anchor.hash
    {
        return tamper(anchor.sequence, TamperKind::Altered);
    }
    let mut window: VecDeque<Result<AuditEntry, E>> = VecDeque::new();
    let mut last = anchor;
    let mut count = 0u64;
    while let Some(next) = window.pop_front().or_else(|| entries.next()) {
        let entry = next.map_err(Failure::Input)?;
        let Some(expected) = last.sequence.checked_add(1) else {
            return tamper(entry.sequence, TamperKind::Reordered);
        };
        if entry.sequence < expected {
            return tamper(entry.sequence, TamperKind::Reordered);
        }
        if entry.sequence > expected {
            while window.len() < REORDER_WINDOW {
                let Some(item) = entries.next() else { break };
                window.push_back(item);
            }
            let later = window.iter().any(|item| matches!(item, Ok(later) if later.sequence == expected));
            return tamper(expected, if later { TamperKind::Reordered } else { TamperKind::Removed });
        }
        if entry.computed_hash() != entry.hash {
            return tamper(entry.sequence, TamperKind::Altered);
        }
        if entry.previous_hash != last.hash {
            let culprit = if last.sequence == anchor.sequence { entry.sequence } else { last.sequence };
            return tamper(culprit, TamperKind::Altered);
        }
        if let Some(head) = head
            && head.sequence == entry.sequence
            && head.hash != entry.hash
        {
            return tamper(entry.sequence, TamperKind::Altered);
        }
        last = Anchor::of(&entry);
        count += 1;
    }
    if let Some(head) = head
        && head.sequence > last.sequence
    {
        return tamper(last.sequence + 1, TamperKind::Removed);
    }
    Ok(Verified { entries: count, head: last })
}

/// Where to cut for retention: the anchor of the last entry of the leading run of `entries`
/// (oldest first) whose time is before `cutoff_ms`; `None` when the first entry is recent
/// enough. The run stops at the first recent entry even if older ones follow (clocks can step
/// back), so the log stays a contiguous suffix. The node deletes entries up to the anchor's
/// sequence and stores the anchor in the same batch.
pub fn trim_point<'a, I: IntoIterator<Item = &'a AuditEntry>>(entries: I, cutoff_ms: u64) -> Option<Anchor> {
    entries.into_iter().take_while(|entry| entry.time_ms < cutoff_ms).last().map(Anchor::of)
}

/// One line of an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// The trim anchor; only as the first line.
    Anchor(Anchor),
    Entry(AuditEntry),
}

/// Reads an export line by line, each at most [`AUDIT_ENTRY_BYTES_MAX`] bytes, without reading a
/// longer line into memory. Blank lines are skipped. Stops after the first error.
#[derive(Debug)]
pub struct JsonLines<R> {
    reader: R,
    line: u64,
    items: u64,
    failed: bool,
}

/// Reads the JSON lines of an export from `reader`.
pub fn read_json_lines<R: BufRead>(reader: R) -> JsonLines<R> {
    JsonLines { reader, line: 0, items: 0, failed: false }
}

impl<R: BufRead> Iterator for JsonLines<R> {
    type Item = Result<Line, ImportError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        loop {
            self.line += 1;
            let mut buffer = Vec::new();
            let limit = AUDIT_ENTRY_BYTES_MAX as u64 + 1;
            match (&mut self.reader).take(limit).read_until(b'\n', &mut buffer) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(error) => return Some(self.fail(format!("could not be read: {error}"))),
            }
            if buffer.len() > AUDIT_ENTRY_BYTES_MAX && buffer.last() != Some(&b'\n') {
                return Some(self.fail(format!("longer than {AUDIT_ENTRY_BYTES_MAX} bytes")));
            }
            if buffer.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let parsed = self.parse(&buffer);
            if parsed.is_err() {
                self.failed = true;
            }
            self.items += 1;
            return Some(parsed);
        }
    }
}

impl<R> JsonLines<R> {
    fn fail(&mut self, reason: String) -> Result<Line, ImportError> {
        self.failed = true;
        Err(ImportError { line: self.line, reason })
    }

    fn parse(&self, text: &[u8]) -> Result<Line, ImportError> {
        let error = |reason: String| ImportError { line: self.line, reason };
        let value: Value = serde_json::from_slice(text).map_err(|problem| error(problem.to_string()))?;
        match value {
            Value::Object(mut map) if map.contains_key("anchor") => {
                if self.items > 0 {
                    return Err(error("an anchor line may only come first".to_owned()));
                }
                if map.len() != 1 {
                    return Err(error("an anchor line holds only the anchor".to_owned()));
                }
                let anchor = map.remove("anchor").unwrap_or(Value::Null);
                serde_json::from_value(anchor).map(Line::Anchor).map_err(|problem| error(problem.to_string()))
            }
            other => serde_json::from_value(other).map(Line::Entry).map_err(|problem| error(problem.to_string())),
        }
    }
}

/// Verifies a JSON-lines export read from `reader`: from `anchor` when given, else from the
/// export's anchor line, else from genesis; and through `head` when given (see
/// [`verify_through`]). A line that does not parse is an [`ImportError`] naming the line.
pub fn verify_json_lines<R: BufRead>(
    reader: R,
    anchor: Option<Anchor>,
    head: Option<Anchor>,
) -> Result<Verified, VerifyError> {
    let mut lines = read_json_lines(reader).peekable();
    let mut start = anchor.unwrap_or(Anchor::GENESIS);
    if let Some(Ok(Line::Anchor(found))) = lines.peek() {
        start = anchor.unwrap_or(*found);
        lines.next();
    }
    let entries = lines.map(|line| match line {
        Ok(Line::Entry(entry)) => Ok(entry),
        Ok(Line::Anchor(_)) => Err(ImportError { line: 0, reason: "an anchor line may only come first".to_owned() }),
        Err(error) => Err(error),
    });
    verify_stream(entries, start, head).map_err(|failure| match failure {
        Failure::Tamper(tamper) => VerifyError::Tamper(tamper),
        Failure::Input(error) => VerifyError::Import(error),
    })
}

/// The shape of an entry in JSON and MessagePack: the key as two fields.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryWire {
    sequence: u64,
    time_ms: u64,
    collection: String,
    id: String,
    origin: String,
    principal: String,
    fields: Vec<String>,
    fields_omitted: u64,
    previous_hash: Digest,
    hash: Digest,
}

impl From<AuditEntry> for EntryWire {
    fn from(entry: AuditEntry) -> EntryWire {
        let (collection, id) = entry.key.into();
        EntryWire {
            sequence: entry.sequence,
            time_ms: entry.time_ms,
            collection,
            id,
            origin: entry.origin,
            principal: entry.principal,
            fields: entry.fields,
            fields_omitted: entry.fields_omitted,
            previous_hash: entry.previous_hash,
            hash: entry.hash,
        }
    }
}

impl TryFrom<EntryWire> for AuditEntry {
    type Error = String;

    fn try_from(wire: EntryWire) -> Result<AuditEntry, String> {
        let key = RecordKey::new(&wire.collection, &wire.id).map_err(|error| error.to_string())?;
        for (what, name) in [("origin", &wire.origin), ("principal", &wire.principal)] {
            if name.len() > NAME_BYTES_MAX {
                return Err(format!("{what} is {} bytes; the limit is {NAME_BYTES_MAX}", name.len()));
            }
        }
        let field_bytes: usize = wire.fields.iter().map(String::len).sum();
        if wire.fields.len() > FIELD_NAMES_MAX || field_bytes > FIELD_NAMES_BYTES_MAX {
            return Err(format!("{} field names of {field_bytes} bytes are over the limits", wire.fields.len()));
        }
        Ok(AuditEntry {
            sequence: wire.sequence,
            time_ms: wire.time_ms,
            key,
            origin: wire.origin,
            principal: wire.principal,
            fields: wire.fields,
            fields_omitted: wire.fields_omitted,
            previous_hash: wire.previous_hash,
            hash: wire.hash,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> RecordKey {
        RecordKey::new("orders", id).expect("valid")
    }

    /// A log of `count` entries, a second apart.
    fn log(count: u64) -> Vec<AuditEntry> {
        let mut chain = Chain::new();
        (1..=count)
            .map(|index| {
                let principal = if index % 2 == 0 { "peer:store-1" } else { "token:ops" };
                chain
                    .append(index * 1_000, &key(&format!("o-{index}")), "hq", principal, ["status", "price"])
                    .expect("bounded")
            })
            .collect()
    }

    fn tamper(sequence: u64, kind: TamperKind) -> Result<Verified, Tamper> {
        Err(Tamper { sequence, kind })
    }

    #[test]
    fn a_clean_log_verifies() {
        let entries = log(10);
        assert_eq!(entries[0].previous_hash, Digest::default());
        assert_eq!(entries[0].fields, vec!["price".to_owned(), "status".to_owned()]);
        let verified = verify(entries.clone(), Anchor::GENESIS).expect("intact");
        assert_eq!(verified, Verified { entries: 10, head: Anchor::of(&entries[9]) });
        assert_eq!(verify(Vec::new(), Anchor::GENESIS), Ok(Verified { entries: 0, head: Anchor::GENESIS }));
        assert_eq!(
            verify_through(entries.clone(), Anchor::GENESIS, Anchor::of(&entries[4])).map(|v| v.entries),
            Ok(10)
        );
    }

    #[test]
    fn an_altered_field_is_found_where_it_is() {
        for sequence in [1, 5, 10] {
            let index = sequence as usize - 1;
            let mut entries = log(10);
            entries[index].principal = "token:intruder".to_owned();
            assert_eq!(verify(entries.clone(), Anchor::GENESIS), tamper(sequence, TamperKind::Altered));
            let mut entries = log(10);
            entries[index].fields.push("secret".to_owned());
            assert_eq!(verify(entries, Anchor::GENESIS), tamper(sequence, TamperKind::Altered));
            let mut entries = log(10);
            entries[index].time_ms += 1;
            assert_eq!(verify(entries, Anchor::GENESIS), tamper(sequence, TamperKind::Altered));
        }
    }

    #[test]
    fn an_altered_entry_with_a_recomputed_hash_breaks_the_next_link() {
        let mut entries = log(10);
        entries[4].origin = "store-9".to_owned();
        entries[4].hash = entries[4].computed_hash();
        assert_eq!(verify(entries, Anchor::GENESIS), tamper(5, TamperKind::Altered));
        // The first entry, relinked to something other than genesis.
        let mut entries = log(3);
        entries[0].previous_hash = Digest([1; 32]);
        entries[0].hash = entries[0].computed_hash();
        assert_eq!(verify(entries, Anchor::GENESIS), tamper(1, TamperKind::Altered));
        // The last one cannot be caught without a head kept elsewhere.
        let mut entries = log(10);
        let head = Anchor::of(&entries[9]);
        entries[9].principal = "token:intruder".to_owned();
        entries[9].hash = entries[9].computed_hash();
        assert!(verify(entries.clone(), Anchor::GENESIS).is_ok());
        assert_eq!(verify_through(entries, Anchor::GENESIS, head), tamper(10, TamperKind::Altered));
    }

    #[test]
    fn a_removed_middle_or_first_entry_is_found() {
        let mut entries = log(10);
        entries.remove(4);
        assert_eq!(verify(entries, Anchor::GENESIS), tamper(5, TamperKind::Removed));
        let mut entries = log(10);
        entries.drain(2..6);
        assert_eq!(verify(entries, Anchor::GENESIS), tamper(3, TamperKind::Removed));
        let mut entries = log(10);
        entries.remove(0);
        assert_eq!(verify(entries, Anchor::GENESIS), tamper(1, TamperKind::Removed));
    }

    #[test]
    fn removed_last_entries_need_a_head_kept_elsewhere() {
        let entries = log(10);
        let head = Anchor::of(&entries[9]);
        let truncated = entries[..7].to_vec();
        // What remains is a valid, shorter chain.
        assert_eq!(verify(truncated.clone(), Anchor::GENESIS).map(|verified| verified.entries), Ok(7));
        assert_eq!(verify_through(truncated, Anchor::GENESIS, head), tamper(8, TamperKind::Removed));
        assert_eq!(verify_through(Vec::new(), Anchor::GENESIS, head), tamper(1, TamperKind::Removed));
    }

    #[test]
    fn reordered_entries_are_found() {
        let entries = log(10);
        let swapped = |order: &[usize]| order.iter().map(|&index| entries[index].clone()).collect::<Vec<_>>();
        assert_eq!(verify(swapped(&[0, 1, 3, 2, 4]), Anchor::GENESIS), tamper(3, TamperKind::Reordered));
        assert_eq!(verify(swapped(&[0, 1, 3, 4, 5, 6, 7, 8, 9, 2]), Anchor::GENESIS), tamper(3, TamperKind::Reordered));
        assert_eq!(verify(swapped(&[1, 0]), Anchor::GENESIS), tamper(1, TamperKind::Reordered));
        assert_eq!(verify(swapped(&[0, 1, 1, 2]), Anchor::GENESIS), tamper(2, TamperKind::Reordered));
    }

    #[test]
    fn a_move_beyond_the_window_reads_as_a_removal() {
        let mut chain = Chain::new();
        let mut entries: Vec<AuditEntry> = (0..REORDER_WINDOW as u64 + 3)
            .map(|index| chain.append(index, &key("o"), "hq", "p", ["f"]).expect("bounded"))
            .collect();
        let moved = entries.remove(1);
        entries.push(moved);
        assert_eq!(verify(entries, Anchor::GENESIS), tamper(2, TamperKind::Removed));
    }

    #[test]
    fn a_trimmed_log_verifies_from_its_anchor() {
        let entries = log(10);
        let anchor = trim_point(&entries, 4_500).expect("entries 1 to 4 are older");
        assert_eq!(anchor, Anchor::of(&entries[3]));
        let remaining = entries[4..].to_vec();
        assert_eq!(verify(remaining.clone(), anchor).map(|verified| verified.entries), Ok(6));
        assert_eq!(verify(remaining.clone(), Anchor::GENESIS), tamper(1, TamperKind::Removed));
        let wrong = Anchor { sequence: 4, hash: Digest([9; 32]) };
        assert_eq!(verify(remaining.clone(), wrong), tamper(5, TamperKind::Altered));
        assert_eq!(verify(entries[5..].to_vec(), anchor), tamper(5, TamperKind::Removed));
        assert_eq!(verify(Vec::new(), anchor), Ok(Verified { entries: 0, head: anchor }));
        assert_eq!(verify_through(remaining, anchor, wrong), tamper(4, TamperKind::Altered));
        assert_eq!(trim_point(&entries, 500), None);
        // The run stops at the first recent entry, even if an older one follows.
        let mut stepped = log(4);
        stepped[2].time_ms = 0;
        assert_eq!(trim_point(&stepped, 1_500), Some(Anchor::of(&stepped[0])));
        assert_eq!(Anchor::decode(&anchor.encode()).ok(), Some(anchor));
        assert!(Anchor::decode(&[0; 39]).is_err());
    }

    #[test]
    fn a_resumed_chain_continues_the_log() {
        let entries = log(3);
        let mut chain = Chain::resume(Anchor::of(&entries[2]));
        let next = chain.append(9_000, &key("o"), "hq", "token:ops", Vec::<String>::new()).expect("bounded");
        assert_eq!(next.sequence, 4);
        let mut all = entries;
        all.push(next);
        assert!(verify(all, Anchor::GENESIS).is_ok());
        let mut full = Chain::resume(Anchor { sequence: u64::MAX, hash: Digest::default() });
        assert_eq!(full.append(0, &key("o"), "a", "b", ["f"]), Err(AuditError::SequenceExhausted));
    }

    #[test]
    fn names_and_fields_are_bounded() {
        let mut chain = Chain::new();
        let long = "x".repeat(NAME_BYTES_MAX + 1);
        assert!(matches!(
            chain.append(0, &key("o"), &long, "p", ["f"]),
            Err(AuditError::NameTooLong { what: "origin", .. })
        ));
        assert!(matches!(
            chain.append(0, &key("o"), "o", &long, ["f"]),
            Err(AuditError::NameTooLong { what: "principal", .. })
        ));
        assert_eq!(chain.head(), Anchor::GENESIS);
        let many: Vec<String> = (0..FIELD_NAMES_MAX + 10).map(|index| format!("f{index:04}")).collect();
        let entry = chain.append(0, &key("o"), "o", "p", &many).expect("bounded");
        assert_eq!((entry.fields.len(), entry.fields_omitted), (FIELD_NAMES_MAX, 10));
        let wide = vec!["w".repeat(FIELD_NAMES_BYTES_MAX - 10), "a".repeat(20), "b".repeat(5)];
        let entry = chain.append(0, &key("o"), "o", "p", &wide).expect("bounded");
        assert_eq!(entry.fields_omitted, 1);
        assert_eq!(entry.fields, vec!["a".repeat(20), "b".repeat(5)]);
        let entry = chain.append(0, &key("o"), "o", "p", ["b", "a", "b"]).expect("bounded");
        assert_eq!(entry.fields, vec!["a", "b"]);
    }

    #[test]
    fn entries_round_trip_and_decoding_is_bounded() {
        let entry = log(2).remove(1);
        assert_eq!(AuditEntry::decode(&entry.encode()).expect("decodes"), entry);
        let line = entry.to_json_line();
        assert!(
            line.starts_with(r#"{"sequence":2,"time_ms":2000,"collection":"orders","id":"o-2","origin":"hq""#),
            "{line}"
        );
        assert_eq!(AuditEntry::from_json_line(&line).expect("parses"), entry);
        let bytes = entry.encode();
        for length in 0..bytes.len() {
            assert!(AuditEntry::decode(&bytes[..length]).is_err(), "a prefix of {length} bytes decoded");
        }
        assert!(matches!(AuditEntry::decode(&vec![0; AUDIT_ENTRY_BYTES_MAX + 1]), Err(AuditDecodeError::TooLarge(_))));
        // Entries stored with their field names (before session 7) still decode, and the
        // array form stores no names.
        let named = rmp_serde::to_vec_named(&entry).expect("encodes");
        assert_eq!(AuditEntry::decode(&named).expect("decodes"), entry);
        assert!(bytes.len() + 80 < named.len(), "{} against {} bytes", bytes.len(), named.len());
        assert!(matches!(
            AuditEntry::from_json_line(&" ".repeat(AUDIT_ENTRY_BYTES_MAX + 1)),
            Err(AuditDecodeError::TooLarge(_))
        ));
        assert!(AuditEntry::from_json_line(&line.replace("\"hq\"", &format!("\"{}\"", "h".repeat(300)))).is_err());
        assert!(AuditEntry::from_json_line(&line.replace("\"orders\"", "\"bad name\"")).is_err());
        assert!(AuditEntry::from_json_line(&line.replace("\"time_ms\"", "\"extra\":1,\"time_ms\"")).is_err());
        let short_hash = line.replace(&entry.hash.to_string(), "abcd");
        assert!(AuditEntry::from_json_line(&short_hash).is_err());
    }

    fn export(anchor: Option<Anchor>, entries: &[AuditEntry]) -> String {
        let mut text = String::new();
        if let Some(anchor) = anchor {
            text.push_str(&anchor.to_json_line());
            text.push('\n');
        }
        for entry in entries {
            text.push_str(&entry.to_json_line());
            text.push('\n');
        }
        text
    }

    #[test]
    fn an_export_verifies_from_its_anchor_line() {
        let entries = log(10);
        let anchor = Anchor::of(&entries[3]);
        let text = export(Some(anchor), &entries[4..]);
        assert_eq!(verify_json_lines(text.as_bytes(), None, None).map(|verified| verified.entries), Ok(6));
        assert_eq!(
            verify_json_lines(text.as_bytes(), Some(Anchor::GENESIS), None),
            Err(VerifyError::Tamper(Tamper { sequence: 1, kind: TamperKind::Removed }))
        );
        let whole = export(None, &entries);
        let head = Anchor::of(&entries[9]);
        assert_eq!(verify_json_lines(whole.as_bytes(), None, Some(head)).map(|verified| verified.head), Ok(head));
        // Blank lines and a missing final newline are fine.
        let loose = format!("\n{}\n\n", whole.trim_end());
        assert!(verify_json_lines(loose.as_bytes(), None, None).is_ok());
        let lines: Vec<Line> = read_json_lines(text.as_bytes()).collect::<Result<_, _>>().expect("parses");
        assert_eq!(lines[0], Line::Anchor(anchor));
        assert_eq!(lines[1], Line::Entry(entries[4].clone()));
    }

    #[test]
    fn a_tampered_export_is_found_and_bad_lines_are_named() {
        let entries = log(5);
        let whole = export(None, &entries);
        let tampered = whole.replace("token:ops", "token:root");
        assert_eq!(
            verify_json_lines(tampered.as_bytes(), None, None),
            Err(VerifyError::Tamper(Tamper { sequence: 1, kind: TamperKind::Altered }))
        );
        let mut lines: Vec<&str> = whole.lines().collect();
        lines.remove(2);
        assert_eq!(
            verify_json_lines(lines.join("\n").as_bytes(), None, None),
            Err(VerifyError::Tamper(Tamper { sequence: 3, kind: TamperKind::Removed }))
        );
        let garbled = whole.replacen("{\"sequence\":3", "{\"sequence\":", 1);
        assert!(matches!(
            verify_json_lines(garbled.as_bytes(), None, None),
            Err(VerifyError::Import(ImportError { line: 3, .. }))
        ));
        let late_anchor = format!("{whole}{}\n", Anchor::GENESIS.to_json_line());
        assert!(matches!(
            verify_json_lines(late_anchor.as_bytes(), None, None),
            Err(VerifyError::Import(ImportError { line: 6, .. }))
        ));
        let long = format!("{whole}{}\n", "x".repeat(AUDIT_ENTRY_BYTES_MAX + 1));
        assert!(matches!(
            verify_json_lines(long.as_bytes(), None, None),
            Err(VerifyError::Import(ImportError { line: 6, .. }))
        ));
        let exact = format!("{}\n", " ".repeat(AUDIT_ENTRY_BYTES_MAX));
        assert_eq!(read_json_lines(exact.as_bytes()).count(), 0);
    }
}
