//! Conflict ledger entries: the record of one field's concurrent values being resolved (the
//! record, the field, every candidate with its origin and clock, the winner and the policy),
//! whether someone resolved it by hand, and its bounded binary encoding for the store. Not here:
//! detecting conflicts or storing entries (the node), or resolving them (`policy`).
//!
//! Entries are bounded by construction, so encoding never fails and always fits
//! [`LEDGER_ENTRY_BYTES_MAX`]: at most [`CANDIDATES_MAX`] candidates are kept (the winner and the
//! most recent by operation id; `candidates_omitted` counts the rest), and a value over
//! [`VALUE_BYTES_MAX`] bytes of canonical JSON is replaced by a summary
//! `{"$omitted": {"bytes": n, "blake3": "<hex of its canonical text>"}}`.
//!
//! The same structure serializes to JSON for the HTTP API (values as JSON, operation ids and the
//! fingerprint in hex) and to MessagePack for the store ([`LedgerEntry::encode`], values as
//! canonical JSON text, so decoding them goes through serde_json's recursion limit and
//! [`json::check_depth`](crate::json::check_depth)).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Value, json};

use crate::canonical::canonical;
use crate::clock::Timestamp;
use crate::json::check_depth;
use crate::key::RecordKey;
use crate::policy::{Candidate, OperationId, Policy, Resolution, normalize};

/// The largest encoded entry accepted from the store.
pub const LEDGER_ENTRY_BYTES_MAX: usize = 2 << 20;
/// The most candidates an entry keeps.
pub const CANDIDATES_MAX: usize = 64;
/// The largest value an entry keeps whole, in bytes of canonical JSON.
pub const VALUE_BYTES_MAX: usize = 16 << 10;
/// The longest field pointer, origin or principal an entry keeps, in bytes; longer ones are cut
/// at a character boundary.
pub const TEXT_BYTES_MAX: usize = 1024;

/// One conflict: a field of a record that held concurrent values, and how they resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "EntryWire", try_from = "EntryWire")]
pub struct LedgerEntry {
    pub key: RecordKey,
    /// JSON Pointer to the field (`/status`, `/address/city`).
    pub field: String,
    /// The policy the field had when the conflict was detected.
    pub policy: Policy,
    /// The distinct candidates, in the order of [`normalize`] (operation id ascending).
    pub candidates: Vec<Candidate>,
    /// Candidates left out because there were more than [`CANDIDATES_MAX`].
    pub candidates_omitted: u64,
    /// The resolved value.
    pub winner: Value,
    /// The winning candidate's operation; `None` when the value was merged (`union`).
    pub winner_operation: Option<OperationId>,
    /// blake3 over the key, the field and every candidate's operation id: the same conflict
    /// detected on several nodes, or several times, has the same fingerprint.
    pub fingerprint: [u8; 32],
    /// When the node detected the conflict (milliseconds since the Unix epoch, as given).
    pub detected_at_ms: u64,
    /// Set once someone wrote a value that supersedes the candidates.
    pub resolution: Option<ManualResolution>,
}

/// A value written by hand over a conflict's candidates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManualResolution {
    pub value: Value,
    pub resolved_at_ms: u64,
    /// Who resolved it: the API token name.
    pub principal: String,
}

/// Why bytes are not a ledger entry.
#[derive(Debug, thiserror::Error)]
pub enum LedgerDecodeError {
    #[error("ledger entry is {0} bytes; the limit is {LEDGER_ENTRY_BYTES_MAX}")]
    TooLarge(usize),
    #[error("ledger entry does not decode: {0}")]
    Malformed(#[from] rmp_serde::decode::Error),
}

impl LedgerEntry {
    /// The entry for `candidates` of `field` in record `key`, resolved under `policy` into
    /// `resolution` (what [`resolve`](crate::policy::resolve) returned for them), detected at
    /// `detected_at_ms`. Bounds the entry as the module doc says.
    pub fn new(
        key: RecordKey,
        field: &str,
        policy: &Policy,
        candidates: &[Candidate],
        resolution: &Resolution,
        detected_at_ms: u64,
    ) -> LedgerEntry {
        let all = normalize(candidates);
        let fingerprint = fingerprint(&key, field, &all);
        let winner_operation = resolution.winner.as_ref().map(|winner| winner.operation.clone());
        let total = all.len();
        // Keep the winner and the most recent others, then restore the normalized order.
        let mut kept: Vec<Candidate> = all.into_iter().rev().collect();
        if let Some(position) =
            kept.iter().position(|candidate| Some(&candidate.operation) == winner_operation.as_ref())
        {
            let winner = kept.remove(position);
            kept.insert(0, winner);
        }
        kept.truncate(CANDIDATES_MAX);
        kept.sort_by(|left, right| left.operation.cmp(&right.operation));
        let candidates_omitted = u64::try_from(total - kept.len()).unwrap_or(u64::MAX);
        let candidates = kept
            .into_iter()
            .map(|candidate| Candidate {
                value: bounded(&candidate.value),
                origin: cut(&candidate.origin),
                timestamp: candidate.timestamp,
                operation: candidate.operation,
            })
            .collect();
        LedgerEntry {
            key,
            field: cut(field),
            policy: policy.clone(),
            candidates,
            candidates_omitted,
            winner: bounded(&resolution.value),
            winner_operation,
            fingerprint,
            detected_at_ms,
            resolution: None,
        }
    }

    /// Records that `principal` wrote `value` over the candidates at `resolved_at_ms`.
    pub fn resolve(&mut self, value: &Value, resolved_at_ms: u64, principal: &str) {
        self.resolution = Some(ManualResolution { value: bounded(value), resolved_at_ms, principal: cut(principal) });
    }

    pub fn is_resolved(&self) -> bool {
        self.resolution.is_some()
    }

    /// The MessagePack encoding for the store.
    pub fn encode(&self) -> Vec<u8> {
        // Plain data into a Vec cannot fail; the bounds keep it under the limit.
        rmp_serde::to_vec_named(self).unwrap_or_default()
    }

    /// Decodes bytes from the store, at most [`LEDGER_ENTRY_BYTES_MAX`].
    pub fn decode(bytes: &[u8]) -> Result<LedgerEntry, LedgerDecodeError> {
        if bytes.len() > LEDGER_ENTRY_BYTES_MAX {
            return Err(LedgerDecodeError::TooLarge(bytes.len()));
        }
        Ok(rmp_serde::from_slice(bytes)?)
    }
}

fn fingerprint(key: &RecordKey, field: &str, candidates: &[Candidate]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"concord conflict\0");
    let key = key.to_bytes();
    for part in [key.as_slice(), field.as_bytes()] {
        hasher.update(&(part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    let mut operations: Vec<&OperationId> = candidates.iter().map(|candidate| &candidate.operation).collect();
    operations.dedup();
    for operation in operations {
        hasher.update(&(operation.0.len() as u64).to_be_bytes());
        hasher.update(&operation.0);
    }
    *hasher.finalize().as_bytes()
}

/// `value`, or its summary when its canonical text is over [`VALUE_BYTES_MAX`].
fn bounded(value: &Value) -> Value {
    let text = canonical(value);
    if text.len() <= VALUE_BYTES_MAX {
        return value.clone();
    }
    json!({"$omitted": {"bytes": text.len(), "blake3": blake3::hash(text.as_bytes()).to_hex().as_str()}})
}

/// `text` cut to at most [`TEXT_BYTES_MAX`] bytes at a character boundary.
fn cut(text: &str) -> String {
    let mut end = text.len().min(TEXT_BYTES_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// A JSON value on the wire: itself in JSON, canonical text in MessagePack.
#[derive(Debug, Clone)]
struct WireValue(Value);

impl Serialize for WireValue {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            self.0.serialize(serializer)
        } else {
            serializer.serialize_str(&canonical(&self.0))
        }
    }
}

impl<'de> Deserialize<'de> for WireValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<WireValue, D::Error> {
        let value = if deserializer.is_human_readable() {
            Value::deserialize(deserializer)?
        } else {
            let text = String::deserialize(deserializer)?;
            serde_json::from_str(&text).map_err(serde::de::Error::custom)?
        };
        check_depth(&value).map_err(serde::de::Error::custom)?;
        Ok(WireValue(value))
    }
}

/// A digest: hex in JSON, bytes in MessagePack.
#[derive(Debug, Clone, Copy)]
struct WireDigest([u8; 32]);

impl Serialize for WireDigest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&hex::encode(self.0))
        } else {
            serializer.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for WireDigest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<WireDigest, D::Error> {
        let bytes = if deserializer.is_human_readable() {
            hex::decode(String::deserialize(deserializer)?).map_err(serde::de::Error::custom)?
        } else {
            serde_bytes::ByteBuf::deserialize(deserializer)?.into_vec()
        };
        <[u8; 32]>::try_from(bytes).map(WireDigest).map_err(|_| serde::de::Error::custom("a digest is 32 bytes"))
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CandidateWire {
    value: WireValue,
    origin: String,
    timestamp: Timestamp,
    operation: OperationId,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResolutionWire {
    value: WireValue,
    resolved_at_ms: u64,
    principal: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryWire {
    collection: String,
    id: String,
    field: String,
    policy: Policy,
    candidates: Vec<CandidateWire>,
    candidates_omitted: u64,
    winner: WireValue,
    winner_operation: Option<OperationId>,
    fingerprint: WireDigest,
    detected_at_ms: u64,
    resolution: Option<ResolutionWire>,
}

impl From<LedgerEntry> for EntryWire {
    fn from(entry: LedgerEntry) -> EntryWire {
        let (collection, id) = entry.key.into();
        EntryWire {
            collection,
            id,
            field: entry.field,
            policy: entry.policy,
            candidates: entry
                .candidates
                .into_iter()
                .map(|candidate| CandidateWire {
                    value: WireValue(candidate.value),
                    origin: candidate.origin,
                    timestamp: candidate.timestamp,
                    operation: candidate.operation,
                })
                .collect(),
            candidates_omitted: entry.candidates_omitted,
            winner: WireValue(entry.winner),
            winner_operation: entry.winner_operation,
            fingerprint: WireDigest(entry.fingerprint),
            detected_at_ms: entry.detected_at_ms,
            resolution: entry.resolution.map(|resolution| ResolutionWire {
                value: WireValue(resolution.value),
                resolved_at_ms: resolution.resolved_at_ms,
                principal: resolution.principal,
            }),
        }
    }
}

impl TryFrom<EntryWire> for LedgerEntry {
    type Error = String;

    fn try_from(wire: EntryWire) -> Result<LedgerEntry, String> {
        let key = RecordKey::new(&wire.collection, &wire.id).map_err(|error| error.to_string())?;
        if wire.candidates.len() > CANDIDATES_MAX {
            return Err(format!("{} candidates; the limit is {CANDIDATES_MAX}", wire.candidates.len()));
        }
        let candidates = wire
            .candidates
            .into_iter()
            .map(|candidate| Candidate {
                value: candidate.value.0,
                origin: candidate.origin,
                timestamp: candidate.timestamp,
                operation: candidate.operation,
            })
            .collect();
        Ok(LedgerEntry {
            key,
            field: wire.field,
            policy: wire.policy,
            candidates,
            candidates_omitted: wire.candidates_omitted,
            winner: wire.winner.0,
            winner_operation: wire.winner_operation,
            fingerprint: wire.fingerprint.0,
            detected_at_ms: wire.detected_at_ms,
            resolution: wire.resolution.map(|resolution| ManualResolution {
                value: resolution.value.0,
                resolved_at_ms: resolution.resolved_at_ms,
                principal: resolution.principal,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::resolve;

    fn key() -> RecordKey {
        RecordKey::new("orders", "o-1").expect("valid")
    }

    fn candidate(value: Value, origin: &str, counter: u64) -> Candidate {
        Candidate::new(
            value,
            origin,
            Timestamp { wall_ms: 1_000 + counter, logical: 0 },
            OperationId::from_lamport(counter, &[7; 16]),
        )
    }

    fn entry_for(policy: &Policy, candidates: &[Candidate]) -> LedgerEntry {
        let resolution = resolve(policy, candidates).expect("candidates were given");
        LedgerEntry::new(key(), "/status", policy, candidates, &resolution, 5_000)
    }

    fn sample() -> LedgerEntry {
        let policy = Policy::ordered(vec![json!("draft"), json!("approved"), json!("shipped")]).expect("valid");
        entry_for(&policy, &[candidate(json!("shipped"), "store-1", 2), candidate(json!("approved"), "hq", 3)])
    }

    #[test]
    fn an_entry_holds_the_candidates_the_winner_and_the_policy() {
        let entry = sample();
        assert_eq!(entry.key, key());
        assert_eq!(entry.field, "/status");
        assert_eq!(entry.policy.name(), "ordered");
        assert_eq!(entry.candidates.len(), 2);
        assert_eq!(entry.candidates[0].origin, "store-1");
        assert_eq!(entry.winner, json!("shipped"));
        assert_eq!(entry.winner_operation, Some(OperationId::from_lamport(2, &[7; 16])));
        assert_eq!(entry.detected_at_ms, 5_000);
        assert!(!entry.is_resolved());
    }

    #[test]
    fn the_fingerprint_names_the_conflict_whatever_the_order_or_the_time() {
        let policy = Policy::Lww;
        let first = candidate(json!(1), "a", 1);
        let second = candidate(json!(2), "b", 2);
        let forward = entry_for(&policy, &[first.clone(), second.clone()]);
        let backward = entry_for(&policy, &[second.clone(), first.clone(), second.clone()]);
        assert_eq!(forward.fingerprint, backward.fingerprint);
        assert_eq!(forward.candidates, backward.candidates);
        let other = entry_for(&policy, &[first, candidate(json!(3), "c", 3)]);
        assert_ne!(forward.fingerprint, other.fingerprint);
    }

    #[test]
    fn round_trips_through_the_store_encoding_and_json() {
        let mut entry = sample();
        entry.resolve(&json!("draft"), 9_000, "ops-token");
        assert_eq!(LedgerEntry::decode(&entry.encode()).expect("decodes"), entry);
        let text = serde_json::to_string(&entry).expect("serializes");
        assert!(text.contains(r#""collection":"orders","id":"o-1""#), "{text}");
        assert!(text.contains(r#""winner":"shipped""#), "{text}");
        assert!(
            text.contains(r#""resolution":{"value":"draft","resolved_at_ms":9000,"principal":"ops-token"}"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<LedgerEntry>(&text).expect("parses"), entry);
    }

    #[test]
    fn union_entries_have_a_merged_winner() {
        let entry = entry_for(&Policy::Union, &[candidate(json!(["a"]), "x", 1), candidate(json!(["b"]), "y", 2)]);
        assert_eq!(entry.winner, json!(["a", "b"]));
        assert_eq!(entry.winner_operation, None);
        assert_eq!(LedgerEntry::decode(&entry.encode()).expect("decodes"), entry);
    }

    #[test]
    fn large_values_and_many_candidates_are_bounded() {
        let big = json!("x".repeat(VALUE_BYTES_MAX * 2));
        let mut candidates: Vec<Candidate> = (1..=200).map(|counter| candidate(big.clone(), "a", counter)).collect();
        // The winner under max has the lowest operation id, so it is kept against the recency rule.
        candidates.push(candidate(json!(10), "b", 0));
        let entry = entry_for(&Policy::Max, &candidates);
        assert_eq!(entry.candidates.len(), CANDIDATES_MAX);
        assert_eq!(entry.candidates_omitted, 201 - CANDIDATES_MAX as u64);
        assert_eq!(entry.winner, json!(10));
        assert!(entry.candidates.iter().any(|candidate| candidate.value == json!(10)));
        assert_eq!(entry.candidates[1].value["$omitted"]["bytes"], json!(VALUE_BYTES_MAX * 2 + 2));
        assert!(entry.candidates.windows(2).all(|pair| pair[0].operation < pair[1].operation));
        let encoded = entry.encode();
        assert!(encoded.len() < LEDGER_ENTRY_BYTES_MAX);
        assert_eq!(LedgerEntry::decode(&encoded).expect("decodes"), entry);
        let long = "é".repeat(TEXT_BYTES_MAX);
        let mut resolved = entry;
        resolved.resolve(&big, 1, &long);
        let resolution = resolved.resolution.expect("resolved");
        assert!(resolution.principal.len() <= TEXT_BYTES_MAX && resolution.principal.len() >= TEXT_BYTES_MAX - 1);
        assert!(resolution.value.get("$omitted").is_some());
    }

    #[test]
    fn refuses_oversize_truncated_and_malformed_bytes() {
        assert!(matches!(
            LedgerEntry::decode(&vec![0; LEDGER_ENTRY_BYTES_MAX + 1]),
            Err(LedgerDecodeError::TooLarge(_))
        ));
        let bytes = sample().encode();
        for length in 0..bytes.len() {
            assert!(LedgerEntry::decode(&bytes[..length]).is_err(), "a prefix of {length} bytes decoded");
        }
        // An invalid key, a value nested too deeply, and too many candidates inside well-formed MessagePack.
        let mut wire = EntryWire::from(sample());
        wire.collection = "bad name".to_owned();
        assert!(LedgerEntry::decode(&rmp_serde::to_vec_named(&wire).expect("encodes")).is_err());
        let mut wire = EntryWire::from(sample());
        let deep = format!("{}1{}", "[".repeat(100), "]".repeat(100));
        wire.winner = WireValue(json!(null));
        let mut bytes = rmp_serde::to_vec_named(&wire).expect("encodes");
        let null_text = rmp_serde::to_vec(&"null").expect("encodes");
        let position =
            bytes.windows(null_text.len()).rposition(|window| window == null_text).expect("the winner is there");
        bytes.splice(position..position + null_text.len(), rmp_serde::to_vec(&deep).expect("encodes"));
        assert!(LedgerEntry::decode(&bytes).is_err());
        let mut wire = EntryWire::from(sample());
        let copies = CANDIDATES_MAX + 1;
        let first = wire.candidates.remove(0);
        wire.candidates = (0..copies)
            .map(|_| CandidateWire {
                value: first.value.clone(),
                origin: first.origin.clone(),
                timestamp: first.timestamp,
                operation: first.operation.clone(),
            })
            .collect();
        assert!(LedgerEntry::decode(&rmp_serde::to_vec_named(&wire).expect("encodes")).is_err());
    }
}
