//! Fuzz harnesses for Concord's pure core: one function per fuzz target, each taking raw bytes
//! and panicking exactly when a property of `crdt` is broken (an error returned for bad input is
//! fine; a panic, a wrong answer or a divergence is a bug).
//!
//! The same file is compiled twice: into the `concord_fuzz` library that the libFuzzer targets in
//! `fuzz/fuzz_targets/` call, and, on stable, into the root package's test
//! `tests/fuzz_regressions.rs` (through `#[path]`), which replays the committed corpus and every
//! minimised crash. So it uses only std, `crdt`, `serde_json` and `rmp_serde`, which the root
//! package has, and decodes its structured inputs (operation scripts) itself from the bytes with
//! [`Bytes`], a cursor that reads zeros once the input is exhausted.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crdt::body::{BodyError, BodyKind};
use crdt::capture::{pgoutput, values};
use crdt::clock::Timestamp;
use crdt::envelope::{DocumentKind, Envelope};
use crdt::identity::{NodeId, OriginId};
use crdt::json::{COUNTER_MAGNITUDE_MAX, DEPTH_MAX, JsonError};
use crdt::key::RecordKey;
use crdt::map_record::MapRecord;
use crdt::record::{Operation, OperationError, Record, RecordView};
use crdt::replica::{
    Apply, Durable, LAZY_ORIGINS_MAX, LogFloors, Message, PeerId, ProtocolError, Replica as Core, Settings,
    SnapshotRecord,
};
use crdt::text::{TextDocument, TextLimits, validate_update};
use crdt::version_vector::{OriginRange, VersionVector};
use serde_json::{Map, Value};

// ---------------------------------------------------------------------------------------------
// Shared pieces
// ---------------------------------------------------------------------------------------------

/// A cursor over the fuzzer's bytes. Reads past the end give zeros, so every input is a complete
/// script and a short input is simply a script that does little.
#[derive(Debug)]
pub struct Bytes<'a> {
    data: &'a [u8],
    position: usize,
}

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Bytes<'a> {
        Bytes { data, position: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.position >= self.data.len()
    }

    pub fn byte(&mut self) -> u8 {
        let byte = self.data.get(self.position).copied().unwrap_or(0);
        self.position += 1;
        byte
    }

    /// A number below `bound` (which must not be 0).
    pub fn below(&mut self, bound: usize) -> usize {
        usize::from(self.byte()) % bound
    }

    pub fn u64(&mut self) -> u64 {
        let mut value = 0u64;
        for _ in 0..8 {
            value = value << 8 | u64::from(self.byte());
        }
        value
    }

    /// Up to `length` bytes, fewer at the end of the input.
    pub fn take(&mut self, length: usize) -> &'a [u8] {
        let start = self.position.min(self.data.len());
        let end = start.saturating_add(length).min(self.data.len());
        self.position = self.position.saturating_add(length);
        &self.data[start..end]
    }
}

/// The harness of the fuzz target called `name`, for the stable-toolchain tools (replay,
/// minimize) that take a target by name.
pub fn by_name(name: &str) -> Option<fn(&[u8])> {
    let run: fn(&[u8]) = match name {
        "envelope_decode" => envelope_decode,
        "record_key" => record_key,
        "record_changes" => record_changes,
        "record_convergence" => record_convergence,
        "text_update" => text_update,
        "json_operations" => json_operations,
        "version_vector" => version_vector,
        "replica_messages" => replica_messages,
        "stored_documents" => stored_documents,
        "http_bodies" => http_bodies,
        "pgoutput_decode" => pgoutput_decode,
        _ => return None,
    };
    Some(run)
}

/// The key every fuzzed record is written under.
pub fn fuzz_key() -> RecordKey {
    match RecordKey::new("fuzz", "record-1") {
        Ok(key) => key,
        Err(error) => panic!("the fuzz key is valid: {error}"),
    }
}

/// The origin of replica `number` (0, 1, 2, ...).
pub fn replica_origin(number: usize) -> OriginId {
    OriginId([number as u8 + 1; 16])
}

/// A timestamp for the `tick`-th write of a replica.
pub fn tick(tick: u64) -> Timestamp {
    Timestamp { wall_ms: 1_700_000_000_000 + tick, logical: 0 }
}

/// Exact JSON equality: like `==`, but `-0.0` differs from `0.0` and `1.0` from `1`.
pub fn exactly_equal(left: &Value, right: &Value) -> bool {
    match (left, right) {
        (Value::Number(left), Value::Number(right)) => match (left.as_f64(), right.as_f64()) {
            _ if left.is_f64() != right.is_f64() => false,
            (Some(left_float), Some(right_float)) if left.is_f64() => left_float.to_bits() == right_float.to_bits(),
            _ => left == right,
        },
        (Value::Array(left), Value::Array(right)) => {
            left.len() == right.len() && left.iter().zip(right).all(|(left, right)| exactly_equal(left, right))
        }
        (Value::Object(left), Value::Object(right)) => maps_exactly_equal(left, right),
        _ => left == right,
    }
}

pub fn maps_exactly_equal(left: &Map<String, Value>, right: &Map<String, Value>) -> bool {
    left.len() == right.len()
        && left.iter().all(|(key, value)| right.get(key).is_some_and(|other| exactly_equal(value, other)))
}

/// How many levels `value` nests, counted as `crdt::json::check_depth` documents them: a scalar
/// or an empty container is 1 level, a container is one more than its deepest member.
pub fn nesting(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(nesting).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(nesting).max().unwrap_or(0),
        _ => 1,
    }
}

/// RFC 7386 JSON Merge Patch, written from the RFC's pseudo-code, as the reference.
pub fn merge_patch_reference(target: &Value, patch: &Value) -> Value {
    let Value::Object(patch) = patch else { return patch.clone() };
    let mut result = match target {
        Value::Object(target) => target.clone(),
        _ => Map::new(),
    };
    for (key, value) in patch {
        if value.is_null() {
            result.remove(key);
        } else {
            let merged = merge_patch_reference(result.get(key).unwrap_or(&Value::Null), value);
            result.insert(key.clone(), merged);
        }
    }
    Value::Object(result)
}

/// A record must read without error here (its content came from valid writes).
#[track_caller]
fn view_of(record: &Record) -> RecordView {
    match record.view() {
        Ok(view) => view,
        Err(error) => panic!("record does not read: {error}"),
    }
}

/// Saving and loading a record keeps its version and what it reads as.
#[track_caller]
fn assert_save_load_round_trips(record: &Record) {
    let loaded = match Record::load(&record.save(), &[]) {
        Ok(loaded) => loaded,
        Err(error) => panic!("a saved record does not load: {error}"),
    };
    assert_eq!(loaded.version(), record.version(), "save/load changed the version");
    assert_eq!(loaded.is_live(), record.is_live(), "save/load changed liveness");
    match (loaded.view(), record.view()) {
        (Ok(loaded), Ok(original)) => assert_eq!(loaded, original, "save/load changed the view"),
        (Err(_), Err(_)) => {}
        (loaded, original) => panic!("save/load changed whether the record reads: {loaded:?} vs {original:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// envelope_decode
// ---------------------------------------------------------------------------------------------

/// Arbitrary bytes through `Envelope::decode`: never a panic; a decoded envelope re-encodes to
/// bytes that decode to the same envelope, its encoding is canonical, and its key is valid.
pub fn envelope_decode(data: &[u8]) {
    let Ok(envelope) = Envelope::decode(data) else { return };
    let encoded = envelope.encode();
    let again = match Envelope::decode(&encoded) {
        Ok(again) => again,
        Err(error) => panic!("a re-encoded envelope does not decode: {error}"),
    };
    assert_eq!(again, envelope, "envelope changed in an encode/decode round trip");
    assert_eq!(again.encode(), encoded, "envelope encoding is not canonical");
    let key = &envelope.key;
    assert_eq!(RecordKey::new(key.collection(), key.id()).as_ref(), Ok(key), "decoded a key that does not validate");
    assert_eq!(RecordKey::from_bytes(&key.to_bytes()).as_ref(), Ok(key), "key store encoding does not round trip");
}

// ---------------------------------------------------------------------------------------------
// record_key
// ---------------------------------------------------------------------------------------------

/// Arbitrary bytes through `RecordKey::from_bytes` (keys read back from the store): never a
/// panic, and an accepted key is exactly the inverse of `to_bytes`.
pub fn record_key(data: &[u8]) {
    let Ok(key) = RecordKey::from_bytes(data) else { return };
    assert_eq!(key.to_bytes(), data, "from_bytes accepted bytes that to_bytes does not give back");
    assert_eq!(RecordKey::new(key.collection(), key.id()).as_ref(), Ok(&key), "from_bytes skipped validation");
    match RecordKey::collection_prefix(key.collection()) {
        Ok(prefix) => assert!(data.starts_with(&prefix), "key does not start with its collection prefix"),
        Err(error) => panic!("the collection of a valid key has no prefix: {error}"),
    }
    assert_eq!(key.to_string(), format!("{}/{}", key.collection(), key.id()));
}

// ---------------------------------------------------------------------------------------------
// record_changes
// ---------------------------------------------------------------------------------------------

/// automerge's chunk magic bytes.
const CHUNK_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

/// A record with some history (several lives, a counter, nested values) and its saved form, the
/// state that fuzzed change bytes are applied to.
pub fn base_record() -> &'static (Record, Vec<u8>) {
    static BASE: OnceLock<(Record, Vec<u8>)> = OnceLock::new();
    BASE.get_or_init(|| {
        let (record, _) = write_base();
        let saved = record.save();
        (record, saved)
    })
}

/// The base record's writes, made on a new record: the record, and the change bytes of each
/// write in order (the first increment of a field returns two changes: the counter's genesis and
/// the increment). Writes are deterministic (fixed origins and times), so every call makes the
/// same changes.
fn write_base() -> (Record, Vec<Vec<u8>>) {
    let key = fuzz_key();
    let mut record = Record::new();
    let operations = [
        Operation::Replace(object(
            serde_json::json!({"name": "ACME", "tags": ["a", "b"], "address": {"city": "Bern"}}),
        )),
        Operation::Increment { field: "visits".into(), by: 3 },
        Operation::MergePatch(object(serde_json::json!({"address": {"zip": "3000"}, "tags": null}))),
        Operation::Delete,
        Operation::Replace(object(serde_json::json!({"name": "ACME 2", "price": 1.5, "n": -7}))),
        Operation::Increment { field: "visits".into(), by: -1 },
    ];
    let mut changes = Vec::with_capacity(operations.len());
    for (number, operation) in operations.iter().enumerate() {
        let origin = replica_origin(number % 2);
        match record.write(&key, &origin, tick(number as u64), operation) {
            Ok(Some(change)) => changes.push(change),
            Ok(None) => panic!("base record write {operation:?} changed nothing"),
            Err(error) => panic!("base record write {operation:?} failed: {error}"),
        }
    }
    (record, changes)
}

/// The base record as a node that never compacted it stores it, the form
/// `Record::load_applying` rebuilds from: its first change as the saved part, then one
/// increment per later write (the change bytes the write returned).
#[derive(Debug)]
pub struct StoredBase {
    pub first: Vec<u8>,
    pub increments: Vec<Vec<u8>>,
    /// A later write to the base by its last writer (a merge patch over fields the base holds),
    /// as the change a peer sends: a valid change to apply after fuzzed stored parts.
    pub follow_up: Vec<u8>,
}

impl StoredBase {
    pub fn increments(&self) -> Vec<&[u8]> {
        self.increments.iter().map(Vec::as_slice).collect()
    }
}

/// The [`StoredBase`] of [`base_record`]: the same history, so change bytes made on the base
/// (the seeds' `change-on-base`) are whole with these parts and reach `load_applying`'s load.
pub fn stored_base() -> &'static StoredBase {
    static STORED: OnceLock<StoredBase> = OnceLock::new();
    STORED.get_or_init(|| {
        let (mut record, mut changes) = write_base();
        let first = changes.remove(0);
        let patch = Operation::MergePatch(object(serde_json::json!({"name": "ACME 3", "n": null, "fuzz": [1]})));
        let follow_up = match record.write(&fuzz_key(), &replica_origin(1), tick(6), &patch) {
            Ok(Some(change)) => change,
            other => panic!("the follow-up write to the base gave {other:?}"),
        };
        let stored = StoredBase { first, increments: changes, follow_up };
        match Record::load(&stored.first, &stored.increments()) {
            Ok(loaded) => assert_eq!(loaded.heads(), base_record().0.heads(), "the stored base is another history"),
            Err(error) => panic!("the stored base does not load: {error}"),
        }
        stored
    })
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

/// Bytes as record history, as they come from a peer or the disk. The first byte is a mode. Bit
/// 0: recompute the checksum of every automerge chunk in the rest first (so the fuzzer's
/// mutations reach the chunk decoders instead of stopping at the checksum check). Bits 1-2: how
/// the rest is used: 0 as a saved document (`Record::load`), 1 as an increment after a real
/// saved document (`Record::load(saved, [rest])`), 2 and 3 as change bytes for `apply_changes`
/// on a record with state. (One use per input keeps executions fast; the fuzzer flips the bits.)
/// Whatever the mode, the rest also goes through `Record::load_applying` with the base stored as
/// its changes (see [`check_load_applying`]).
///
/// The properties are what the node relies on (see [`check_stored_record`]): never a panic;
/// whatever loads reads without panicking; a save is trusted only when it reloads to the same
/// heads, and then it reads the same. A failed apply leaves the version unchanged; a successful
/// one reports whether the version moved, is idempotent, reloads from the bytes the node stores
/// (the base's save plus the change bytes as an increment) to the same heads and view, travels
/// in a snapshot, and leaves the record writable. `load_applying`, which a node runs on a peer's
/// change before it builds the record, answers only what building and applying would give.
pub fn record_changes(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut bytes = rest.to_vec();
    if mode & 1 == 1 {
        fix_chunk_checksums(&mut bytes);
    }
    check_first_change(&bytes);
    check_load_applying(&bytes);
    let (base, saved) = base_record();
    match mode >> 1 & 3 {
        0 => {
            if let Ok(record) = Record::load(&bytes, &[]) {
                check_stored_record(&record, None);
            }
        }
        1 => {
            if let Ok(record) = Record::load(saved, &[&bytes]) {
                check_stored_record(&record, Some((saved, &[&bytes])));
            }
        }
        _ => apply_to_base(base, saved, &bytes),
    }
}

/// A node stores a record new to it straight from a first change that `Record::first_change`
/// reads, without building it: the bytes must then apply to an empty record as the building path
/// would, and load to that head and liveness. A node also serves such a record from
/// `Record::first_change_view`: that must be the built record's view.
fn check_first_change(bytes: &[u8]) {
    let Some(first) = Record::first_change(bytes) else { return };
    let mut applied = Record::new();
    match applied.apply_changes_intact(bytes) {
        Ok(changed) => assert!(changed, "a first change that changes nothing"),
        Err(error) => panic!("a first change read without building does not apply: {error}"),
    }
    let loaded = match Record::load(bytes, &[]) {
        Ok(loaded) => loaded,
        Err(error) => panic!("a first change read without building does not load: {error}"),
    };
    for record in [&applied, &loaded] {
        assert_eq!(record.heads(), vec![first.head], "a first change read to another head");
        assert_eq!(record.is_live(), first.live, "a first change read to another liveness");
    }
    if let Some(viewed) = Record::first_change_view(bytes) {
        match loaded.view() {
            Ok(built) => assert_eq!(viewed, built, "a first change viewed without building reads otherwise"),
            Err(error) => panic!("a first change viewed without building does not read when built: {error}"),
        }
    }
}

/// A node applies a peer's change to a record it stores only as parts (a first change and
/// increments) by `Record::load_applying` when that answers, and by building the record and
/// applying the change (the way checked below) when it declines. The bytes take, in turn, each
/// place in that call that a peer or the disk fills: the change to the base as stored; the
/// change to a record stored as the base's first change alone; the first part (with the base's
/// first change as the change); a stored increment after the base's, with a valid change after
/// them; that increment and again as the change (which the parts then hold). Never a panic, and
/// every answer must be the other way's (see [`assert_load_applying_agrees`]). All five run on
/// every input: `load_applying` declines bytes that are not whole change chunks in its header
/// walk, so only the inputs that reach its load cost more, and a mode bit per place left each
/// place a fifth of them (a one-byte step from a seed went unfound for three minutes).
fn check_load_applying(bytes: &[u8]) {
    let stored = stored_base();
    let mut increments = stored.increments();
    assert_load_applying_agrees(&stored.first, &increments, bytes);
    assert_load_applying_agrees(&stored.first, &[], bytes);
    assert_load_applying_agrees(bytes, &[], &stored.first);
    increments.push(bytes);
    assert_load_applying_agrees(&stored.first, &increments, &stored.follow_up);
    assert_load_applying_agrees(&stored.first, &increments, bytes);
}

/// When `Record::load_applying` answers, the node takes its answer for what the building way
/// (`Record::load` of the parts, a copy kept as the record before, `apply_changes_intact` of the
/// change) would have given: that way must then succeed, with the same record (heads, items,
/// view, liveness, conflict signatures), the same heads before and the same `changed`; the
/// record read at the heads before must be the record before (the engine reads its liveness and
/// conflict signatures there); and the node goes on writing to it, so a write must make the same
/// change on both.
#[track_caller]
fn assert_load_applying_agrees(saved: &[u8], increments: &[&[u8]], change: &[u8]) {
    let Some(rebuilt) = Record::load_applying(saved, increments, change) else { return };
    let mut record = match Record::load(saved, increments) {
        Ok(record) => record,
        Err(error) => panic!("load_applying rebuilt from parts that do not load: {error}"),
    };
    let before = record.clone();
    let changed = match record.apply_changes_intact(change) {
        Ok(changed) => changed,
        Err(error) => panic!("load_applying applied a change that does not apply: {error}"),
    };
    let mut rebuilt_record = rebuilt.record;
    assert_eq!(rebuilt.changed, changed, "load_applying misreported whether the change was new");
    assert_eq!(rebuilt.before, before.heads(), "load_applying reported other heads before the change");
    assert_eq!(rebuilt_record.heads(), record.heads(), "load_applying rebuilt other heads");
    assert_eq!(rebuilt_record.items(), record.items(), "load_applying rebuilt another number of items");
    assert_eq!(rebuilt_record.view().ok(), record.view().ok(), "load_applying rebuilt a record that reads otherwise");
    assert_eq!(rebuilt_record.is_live(), record.is_live(), "load_applying rebuilt another liveness");
    assert_eq!(
        rebuilt_record.conflict_signatures(),
        record.conflict_signatures(),
        "load_applying rebuilt other conflict signatures"
    );
    assert_eq!(
        rebuilt_record.conflict_signatures_at(&rebuilt.before),
        before.conflict_signatures(),
        "the rebuilt record read at the heads before has other conflict signatures than the record before"
    );
    assert_eq!(
        rebuilt_record.is_live_at(&rebuilt.before),
        before.is_live(),
        "the rebuilt record read at the heads before has another liveness than the record before"
    );
    let patch = Operation::MergePatch(object(serde_json::json!({"fuzz": 1})));
    let written = rebuilt_record.write(&fuzz_key(), &replica_origin(5), tick(100), &patch).ok().flatten();
    let expected = record.write(&fuzz_key(), &replica_origin(5), tick(100), &patch).ok().flatten();
    assert_eq!(written, expected, "a write to the rebuilt record made another change");
}

fn apply_to_base(base: &Record, saved: &[u8], bytes: &[u8]) {
    let mut record = base.clone();
    let version = record.version();
    match record.apply_changes_intact(bytes) {
        Err(_) => assert_eq!(record.version(), version, "a failed apply_changes changed the record"),
        Ok(changed) => {
            assert_eq!(changed, record.version() != version, "apply_changes misreported whether it changed");
            // The node stores accepted change bytes as they came, as an increment after the saved
            // document, and rebuilds the record from exactly those parts after a restart.
            match Record::load(saved, &[bytes]) {
                Ok(reloaded) => {
                    assert_eq!(reloaded.heads(), record.heads(), "the stored parts reload to other heads");
                    assert_same_reading(&reloaded, &record, "reloading the stored parts");
                }
                Err(error) => panic!("accepted change bytes, stored as an increment, do not reload: {error}"),
            }
            check_stored_record(&record, Some((saved, &[bytes])));
            match record.apply_changes(bytes) {
                Ok(again) => assert!(!again, "applying the same change bytes twice changed the record twice"),
                Err(error) => panic!("change bytes that applied once fail the second time: {error}"),
            }
            // The node keeps writing to records it received history for.
            let patch = Operation::MergePatch(object(serde_json::json!({"fuzz": 1, "visits": null})));
            for operation in [patch, Operation::Increment { field: "visits".into(), by: 1 }, Operation::Delete] {
                let version = record.version();
                match record.write(&fuzz_key(), &replica_origin(5), tick(100), &operation) {
                    Ok(_) if operation == Operation::Delete => {
                        assert!(!record.is_live(), "a delete that succeeded left the record live");
                    }
                    Ok(_) => {}
                    Err(_) => assert_eq!(record.version(), version, "a refused write changed the record"),
                }
            }
        }
    }
}

/// What the node relies on for a record it holds: it reads (or fails to read) without
/// panicking; its `save()` is trusted only when it reloads to the same heads (the engine's
/// `compact_some`/`snapshot_reloads` guard: otherwise the increments stay), and such a save then
/// reads the same. When `stored` names the parts the node keeps (a save the engine wrote, plus
/// accepted change bytes), a snapshot carries them as separate parts (empty ones left out), and
/// a new peer's `apply_changes` of each part in turn must give the same heads and reading.
fn check_stored_record(record: &Record, stored: Option<(&[u8], &[&[u8]])>) {
    let _ = record.view();
    let _ = record.is_live();
    assert_save_trusted_only_when_it_reloads(record);
    if let Some((saved, increments)) = stored {
        let mut peer = Record::new();
        for part in std::iter::once(saved).chain(increments.iter().copied()).filter(|part| !part.is_empty()) {
            if let Err(error) = peer.apply_changes(part) {
                panic!("a snapshot part of the record does not apply at a new peer: {error}");
            }
        }
        assert_eq!(peer.heads(), record.heads(), "a snapshot of the record gives a new peer other heads");
        assert_same_reading(&peer, record, "a snapshot");
    }
}

/// The engine's compaction guard, as a property: a save that does not load, or loads to other
/// heads, is never used (fine); one that loads to the same heads must read the same.
#[track_caller]
fn assert_save_trusted_only_when_it_reloads(record: &Record) {
    let Ok(loaded) = Record::load(&record.save(), &[]) else { return };
    if loaded.heads() == record.heads() {
        assert_same_reading(&loaded, record, "a save that reloads to the same heads");
    }
}

#[track_caller]
fn assert_same_reading(loaded: &Record, record: &Record, what: &str) {
    assert_eq!(loaded.is_live(), record.is_live(), "{what} changed liveness");
    match (loaded.view(), record.view()) {
        (Ok(loaded), Ok(original)) => assert_eq!(loaded, original, "{what} changed the view"),
        (Err(_), Err(_)) => {}
        (loaded, original) => panic!("{what} changed whether the record reads: {loaded:?} vs {original:?}"),
    }
}

/// Recomputes the checksum of each uncompressed automerge chunk (document, change or bundle) in
/// `bytes`, walking chunk after chunk while they are well-framed. Compressed chunks are left
/// alone: their checksum covers the inflated data.
pub fn fix_chunk_checksums(bytes: &mut [u8]) {
    let mut start = 0;
    while bytes.len() >= start + 10 && bytes[start..start + 4] == CHUNK_MAGIC {
        let chunk_type = bytes[start + 8];
        let Some((length, length_bytes)) = read_leb128(&bytes[start + 9..]) else { return };
        let data_start = start + 9 + length_bytes;
        let Some(data_end) = usize::try_from(length).ok().and_then(|length| data_start.checked_add(length)) else {
            return;
        };
        if data_end > bytes.len() {
            return;
        }
        if chunk_type != 2 {
            let mut hashed = vec![chunk_type];
            write_leb128(&mut hashed, length);
            hashed.extend_from_slice(&bytes[data_start..data_end]);
            let hash = sha256(&hashed);
            bytes[start + 4..start + 8].copy_from_slice(&hash[..4]);
        }
        start = data_end;
    }
}

fn read_leb128(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (index, &byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f).checked_shl(7 * index as u32)?;
        if byte & 0x80 == 0 {
            return Some((value, index + 1));
        }
    }
    None
}

fn write_leb128(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 & 0x7f | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// SHA-256 (FIPS 180-4), in std-only code because the stable test crate has no SHA-256 crate.
pub fn sha256(message: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
        0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
        0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
        0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
        0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
        0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
        0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut state: [u32; 8] =
        [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];
    let mut padded = message.to_vec();
    padded.push(0x80);
    while padded.len() % 64 != 56 {
        padded.push(0);
    }
    padded.extend_from_slice(&((message.len() as u64).wrapping_mul(8)).to_be_bytes());
    for block in padded.chunks_exact(64) {
        let mut schedule = [0u32; 64];
        for (word, bytes) in schedule.iter_mut().zip(block.chunks_exact(4)) {
            *word = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
        for index in 16..64 {
            let s0 = schedule[index - 15].rotate_right(7)
                ^ schedule[index - 15].rotate_right(18)
                ^ (schedule[index - 15] >> 3);
            let s1 = schedule[index - 2].rotate_right(17)
                ^ schedule[index - 2].rotate_right(19)
                ^ (schedule[index - 2] >> 10);
            schedule[index] = schedule[index - 16].wrapping_add(s0).wrapping_add(schedule[index - 7]).wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = state;
        for (&constant, &word) in K.iter().zip(&schedule) {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let choose = (e & f) ^ (!e & g);
            let temp1 = h.wrapping_add(s1).wrapping_add(choose).wrapping_add(constant).wrapping_add(word);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let majority = (a & b) ^ (a & c) ^ (b & c);
            let temp2 = s0.wrapping_add(majority);
            h = g;
            g = f;
            f = e;
            e = d.wrapping_add(temp1);
            d = c;
            c = b;
            b = a;
            a = temp1.wrapping_add(temp2);
        }
        for (word, add) in state.iter_mut().zip([a, b, c, d, e, f, g, h]) {
            *word = word.wrapping_add(add);
        }
    }
    let mut digest = [0u8; 32];
    for (bytes, word) in digest.chunks_exact_mut(4).zip(state) {
        bytes.copy_from_slice(&word.to_be_bytes());
    }
    digest
}

// ---------------------------------------------------------------------------------------------
// record_convergence
// ---------------------------------------------------------------------------------------------

/// How many replicas a convergence script runs.
pub const REPLICAS: usize = 3;
/// The most steps one script runs (each write clones the document, so this bounds the time).
const SCRIPT_STEPS_MAX: usize = 24;

/// One replica in a convergence script.
#[derive(Debug, Clone)]
struct Replica {
    record: Record,
    origin: OriginId,
    ticks: u64,
}

/// A script of writes at three replicas, interleaved with partial deliveries, then every change
/// delivered to every replica in an order chosen by the bytes, with duplicates and bundles. All
/// replicas must end with the same version and read the same (value and conflicts); every write
/// either succeeds or is refused with an error that leaves the document unchanged.
///
/// Script, byte by byte (see `script_step` and `value`): each step's first byte picks the replica
/// (`% 3`) and the action (`/ 3 % 8`: 0-4 write, 5-6 deliver one change, 7 deliver all so far);
/// a write's next byte picks the operation, then its fields and values. After the script, for
/// each replica: one byte for how many duplicates to add, then one byte per delivery position to
/// shuffle, and one byte per delivery to decide whether it goes bundled with the next.
pub fn record_convergence(data: &[u8]) {
    let mut bytes = Bytes::new(data);
    let key = fuzz_key();
    let mut replicas: Vec<Replica> = (0..REPLICAS)
        .map(|number| Replica { record: Record::new(), origin: replica_origin(number), ticks: 0 })
        .collect();
    let mut changes: Vec<Vec<u8>> = Vec::new();

    let mut steps = 0;
    while !bytes.is_empty() && steps < SCRIPT_STEPS_MAX {
        steps += 1;
        let step = bytes.byte();
        let replica = &mut replicas[usize::from(step) % REPLICAS];
        match usize::from(step) / REPLICAS % 8 {
            0..=4 => {
                let operation = operation(&mut bytes);
                if let Some(change) = write_checked(replica, &key, &operation) {
                    changes.push(change);
                }
            }
            5 | 6 => {
                if !changes.is_empty() {
                    let change = &changes[bytes.below(changes.len().min(256))];
                    deliver(replica, change);
                }
            }
            _ => {
                for change in &changes {
                    deliver(replica, change);
                }
            }
        }
    }

    for replica in &mut replicas {
        let mut order: Vec<usize> = (0..changes.len()).collect();
        if !changes.is_empty() {
            for _ in 0..bytes.below(4) {
                order.push(bytes.below(changes.len().min(256)));
            }
        }
        // Fisher-Yates with the bytes as the randomness.
        for index in (1..order.len()).rev() {
            let other = bytes.below(index + 1);
            order.swap(index, other);
        }
        let mut position = 0;
        while position < order.len() {
            if bytes.byte() & 1 == 1 && position + 1 < order.len() {
                let mut bundle = changes[order[position]].clone();
                bundle.extend_from_slice(&changes[order[position + 1]]);
                deliver(replica, &bundle);
                position += 2;
            } else {
                deliver(replica, &changes[order[position]]);
                position += 1;
            }
        }
    }

    // A replica that starts afresh and receives everything in the order it was made.
    let mut fresh = Record::new();
    for change in &changes {
        if let Err(error) = fresh.apply_changes(change) {
            panic!("a change does not apply in order: {error}");
        }
    }

    let first = &replicas[0].record;
    let view = view_of(first);
    for (number, replica) in replicas.iter().enumerate().skip(1) {
        assert_eq!(replica.record.version(), first.version(), "replica {number} has another version than replica 0");
        assert_eq!(view_of(&replica.record), view, "replica {number} reads differently from replica 0");
    }
    assert_eq!(fresh.version(), first.version(), "in-order delivery gives another version");
    assert_eq!(view_of(&fresh), view, "in-order delivery reads differently");
    assert_save_load_round_trips(first);
}

/// Delivers change bytes that a replica made: they must apply.
fn deliver(replica: &mut Replica, change: &[u8]) {
    if let Err(error) = replica.record.apply_changes(change) {
        panic!("change bytes made by a replica do not apply: {error}");
    }
}

/// Writes at a replica. A refusal must be one a valid script can cause, and leave the document
/// unchanged. Returns the change bytes, if the write changed anything.
fn write_checked(replica: &mut Replica, key: &RecordKey, operation: &Operation) -> Option<Vec<u8>> {
    replica.ticks += 1;
    let version = replica.record.version();
    match replica.record.write(key, &replica.origin, tick(replica.ticks), operation) {
        Ok(Some(change)) => {
            assert_ne!(replica.record.version(), version, "a write returned changes but kept the version");
            Some(change)
        }
        Ok(None) => {
            assert_eq!(replica.record.version(), version, "a write that changed nothing moved the version");
            None
        }
        Err(error) => {
            assert_eq!(replica.record.version(), version, "a refused write ({error}) changed the record");
            match error {
                OperationError::NotACounter(_)
                | OperationError::FieldName
                | OperationError::Json(JsonError::CounterOverflow { .. }) => None,
                other => panic!("write {operation:?} failed unexpectedly: {other}"),
            }
        }
    }
}

/// The field names scripts use: a few ordinary ones, one that looks like Concord's own causal
/// length key, one that looks like a stored key, and the empty name.
const FIELDS: [&str; 7] = ["a", "b", "n", "$cl", "1:a", "", "x/y~"];

fn field(bytes: &mut Bytes<'_>) -> String {
    FIELDS[bytes.below(FIELDS.len())].to_owned()
}

/// A small JSON value; containers nest at most `depth` more levels.
fn value(bytes: &mut Bytes<'_>, depth: usize) -> Value {
    let choice = bytes.below(16);
    match choice {
        0 => Value::Null,
        1 => Value::Bool(bytes.byte() & 1 == 1),
        2..=4 => Value::from(i64::from(bytes.byte()) - 128),
        5 => Value::from([i64::MIN, i64::MAX, -1, 0][bytes.below(4)]),
        6 => Value::from(u64::MAX - u64::from(bytes.byte())),
        7 => Value::from([0.5, -0.0, 0.0, 1.0, 1e300, -2.5e-300][bytes.below(6)]),
        8 | 9 => Value::from(["", "x", "héllo", "a/b", "🌍"][bytes.below(5)]),
        10 | 11 if depth > 0 => {
            let length = bytes.below(4);
            Value::Array((0..length).map(|_| value(bytes, depth - 1)).collect())
        }
        12..=15 if depth > 0 => Value::Object(small_object(bytes, depth - 1)),
        _ => Value::from(u64::from(bytes.byte())),
    }
}

fn small_object(bytes: &mut Bytes<'_>, depth: usize) -> Map<String, Value> {
    let length = bytes.below(4);
    (0..length).map(|_| (field(bytes), value(bytes, depth))).collect()
}

fn operation(bytes: &mut Bytes<'_>) -> Operation {
    match bytes.below(8) {
        0 | 1 => Operation::Replace(small_object(bytes, 2)),
        2 | 3 => Operation::MergePatch(small_object(bytes, 2)),
        4 => Operation::Delete,
        _ => {
            let field = field(bytes);
            let by = match bytes.below(8) {
                0 => i64::MAX,
                1 => i64::MIN,
                2 => -1,
                3 => 1_000_000_007,
                _ => i64::from(bytes.byte() as i8),
            };
            Operation::Increment { field, by }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// text_update
// ---------------------------------------------------------------------------------------------

/// A text document with content (two root texts, an insertion by another client, a deletion),
/// saved: the state that fuzzed updates are applied to.
pub fn base_text() -> &'static Vec<u8> {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| {
        let mut document = TextDocument::new(21);
        let mut other = TextDocument::new(22);
        let limits = TextLimits::default();
        let edits = [
            document.insert_text("text", 0, "hello world"),
            other.insert_text("text", 0, "Grüße 🌍 "),
            document.insert_text("title", 0, "Notes"),
            document.delete_text("text", 5, 6),
        ];
        for edit in edits {
            match edit {
                Ok(update) => {
                    let _ = document.apply_update(&update, &limits);
                    let _ = other.apply_update(&update, &limits);
                }
                Err(error) => panic!("base text edit failed: {error}"),
            }
        }
        document.save()
    })
}

/// Arbitrary bytes as a Yjs update (v1) applied with default limits, to an empty document and to
/// one with content: never a panic; a refused update leaves the digest unchanged and a
/// `validate_update` refusal is also an `apply_update` refusal. An accepted one is what the node
/// then relies on: the stored parts (the document's saved state plus the update as an increment)
/// reload to the same digest and texts, and travel in a snapshot to a new peer with the same
/// digest; a `save()` is trusted only when it reloads to the same digest and reading (the
/// engine's compaction guard), and then it must read the same; the update is a no-op the second time; and
/// `diff` from the empty state vector syncs a new replica to the same digest. The bytes as a
/// state vector make `diff` fail or answer, never panic.
pub fn text_update(data: &[u8]) {
    let limits = TextLimits::default();
    let valid = validate_update(data, &limits).is_ok();

    let mut empty = TextDocument::new(1);
    check_text_apply(&mut empty, &[], data, &limits, valid);

    let mut document = match TextDocument::load(2, base_text(), &[], &limits) {
        Ok(document) => document,
        Err(error) => panic!("the base text does not load: {error}"),
    };
    check_text_apply(&mut document, base_text(), data, &limits, valid);
    let _ = document.diff(data);
}

/// The root texts the text harnesses compare.
const TEXT_NAMES: [&str; 3] = ["text", "title", ""];

fn check_text_apply(document: &mut TextDocument, saved: &[u8], update: &[u8], limits: &TextLimits, valid: bool) {
    let digest = document.digest();
    let changed = match document.apply_update(update, limits) {
        Ok(changed) => changed,
        Err(_) => {
            assert_eq!(document.digest(), digest, "a refused update changed the document");
            return;
        }
    };
    assert!(valid, "apply_update accepted an update that validate_update refuses");
    if !changed {
        assert_eq!(document.digest(), digest, "an update reported as no change changed the digest");
    }
    check_stored_text(document, saved, &[update], limits);

    match document.apply_update(update, limits) {
        Ok(again) => assert!(!again, "applying the same update twice changed the document twice"),
        Err(error) => panic!("an update that applied once fails the second time: {error}"),
    }

    // A new replica syncs from nothing: the empty state vector is one zero byte.
    let mut replica = TextDocument::new(3);
    match document.diff(&[0]) {
        Ok(diff) => {
            if let Err(error) = replica.apply_update(&diff, limits) {
                panic!("a full diff does not apply to an empty replica: {error}");
            }
        }
        Err(error) => panic!("diff from the empty state vector failed: {error}"),
    }
    assert_eq!(replica.digest(), document.digest(), "a replica synced with diff has another digest");
}

/// What the node relies on for a text it holds as `saved` plus `increments` (the engine's
/// stored parts): they reload to the same digest and texts; a snapshot (the non-empty parts, each
/// applied as an update at a new peer) gives the same digest and texts; and `save()` is trusted
/// only when it reloads to the same digest and reading, in which case it must read the same.
fn check_stored_text(document: &TextDocument, saved: &[u8], increments: &[&[u8]], limits: &TextLimits) {
    match TextDocument::load(document.client_id(), saved, increments, limits) {
        Ok(reloaded) => assert_same_text(&reloaded, document, "reloading the stored parts"),
        Err(error) => panic!("the stored parts of an accepted text do not reload: {error}"),
    }
    let mut peer = TextDocument::new(4);
    for part in std::iter::once(saved).chain(increments.iter().copied()).filter(|part| !part.is_empty()) {
        if let Err(error) = peer.apply_update(part, limits) {
            panic!("a snapshot part of an accepted text does not apply at a new peer: {error}");
        }
    }
    assert_same_text(&peer, document, "a snapshot");
    check_trusted_save(document, limits);
}

/// The engine's compaction guard for texts (`snapshot_reloads` in `src/engine.rs`): a `save()`
/// replaces the stored parts only when it reloads with the same digest *and* the same reading
/// (`TextDocument::reading`), and a save it trusts must read the same. yrs 0.28 can integrate a
/// save in another order than the updates it came from, so the same digest alone does not imply
/// the same text (`regressions/text_update/save-load-reorders-text`); such a save is refused and
/// never used.
fn check_trusted_save(document: &TextDocument, limits: &TextLimits) {
    let reading = document.reading();
    let Ok(loaded) = TextDocument::load(document.client_id(), &document.save(), &[], limits) else { return };
    let trusted = loaded.digest() == document.digest() && reading.is_ok() && loaded.reading() == reading;
    if trusted {
        for name in TEXT_NAMES {
            assert_eq!(loaded.text(name), document.text(name), "a save the engine trusts changed root text {name:?}");
        }
    }
}

/// `other` must have `document`'s digest and read like it.
#[track_caller]
fn assert_same_text(other: &TextDocument, document: &TextDocument, what: &str) {
    assert!(other.digest() == document.digest(), "{what} changed the digest");
    for name in TEXT_NAMES {
        assert_eq!(other.text(name), document.text(name), "{what} changed root text {name:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// json_operations
// ---------------------------------------------------------------------------------------------

/// Arbitrary bytes as a JSON request body. If they are an object: `Replace` on a new record
/// reads back exactly (numbers keep their kind, `-0.0` stays) when every field nests at most
/// [`DEPTH_MAX`] levels, and is refused with `TooDeep`, changing nothing, otherwise; repeating it
/// changes nothing; `MergePatch` with it matches the RFC 7386 reference on that record and on a
/// new one; and a `Replace` after the patch reads back exactly again.
pub fn json_operations(data: &[u8]) {
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(data) else { return };
    let key = fuzz_key();
    let origin = replica_origin(0);
    let within = body.values().all(|value| nesting(value) <= DEPTH_MAX);

    let mut record = Record::new();
    let replace = Operation::Replace(body.clone());
    match record.write(&key, &origin, tick(1), &replace) {
        Ok(_) if within => {}
        Ok(_) => panic!("a value nesting deeper than {DEPTH_MAX} levels was written"),
        Err(OperationError::Json(JsonError::TooDeep)) if !within => {
            assert_eq!(record.version(), Record::new().version(), "a refused write changed the record");
            return;
        }
        Err(error) => panic!("Replace failed: {error}"),
    }
    assert_reads_exactly(&record, &body, "Replace");
    match record.write(&key, &origin, tick(2), &replace) {
        Ok(None) => {}
        Ok(Some(_)) => panic!("repeating a Replace changed the record"),
        Err(error) => panic!("repeating a Replace failed: {error}"),
    }

    let patch = Operation::MergePatch(body.clone());
    let patched = merge_patch_reference(&Value::Object(body.clone()), &Value::Object(body.clone()));
    if let Err(error) = record.write(&key, &origin, tick(3), &patch) {
        panic!("MergePatch failed: {error}");
    }
    assert_reads_exactly(&record, as_object(&patched), "MergePatch over the same object");

    let mut fresh = Record::new();
    if let Err(error) = fresh.write(&key, &origin, tick(1), &patch) {
        panic!("MergePatch on a new record failed: {error}");
    }
    let expected = merge_patch_reference(&Value::Object(Map::new()), &Value::Object(body.clone()));
    assert_reads_exactly(&fresh, as_object(&expected), "MergePatch on a new record");

    if let Err(error) = record.write(&key, &origin, tick(4), &replace) {
        panic!("Replace after MergePatch failed: {error}");
    }
    assert_reads_exactly(&record, &body, "Replace after MergePatch");
    assert_save_load_round_trips(&record);
}

fn as_object(value: &Value) -> &Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("merge patch of objects gave a non-object: {other}"),
    }
}

#[track_caller]
fn assert_reads_exactly(record: &Record, expected: &Map<String, Value>, what: &str) {
    let view = view_of(record);
    let Some(value) = view.value else { panic!("after {what} the record reads as deleted") };
    assert!(
        maps_exactly_equal(&value, expected),
        "after {what} the record reads {} instead of {}",
        Value::Object(value.clone()),
        Value::Object(expected.clone())
    );
    assert!(view.conflicts.is_empty(), "a single writer's record has conflicts: {:?}", view.conflicts);
}

// ---------------------------------------------------------------------------------------------
// version_vector
// ---------------------------------------------------------------------------------------------

/// A version vector as stored in the node's meta (`rmp_serde`), then inserts, checked against a
/// plain model. Bytes: one byte `n`, then `n` bytes of stored meta (decoded; an empty vector if
/// they do not decode), then a script of inserts: per insert, one byte picks the origin (`% 3`)
/// and how to pick the sequence (small, 8 bytes big-endian, or next to what is held).
///
/// Never a panic. A decoded vector re-encodes to one equal to it. When the starting vector is
/// well-formed (as the node writes it), each insert reports correctly whether it was new, every
/// sequence probed is held exactly when the model holds it, and the ranges stay well-formed.
pub fn version_vector(data: &[u8]) {
    let mut bytes = Bytes::new(data);
    let meta_length = usize::from(bytes.byte());
    let meta = bytes.take(meta_length);
    let mut vector = match rmp_serde::from_slice::<VersionVector>(meta) {
        Ok(vector) => {
            let encoded = rmp_serde::to_vec(&vector).unwrap_or_default();
            match rmp_serde::from_slice::<VersionVector>(&encoded) {
                Ok(again) => assert_eq!(again, vector, "version vector changed in an encode/decode round trip"),
                Err(error) => panic!("a re-encoded version vector does not decode: {error}"),
            }
            vector
        }
        Err(_) => VersionVector::new(),
    };
    let origins: Vec<OriginId> =
        vector.origins().map(|(origin, _)| *origin).take(2).chain([replica_origin(0)]).collect();
    let well_formed = vector.origins().all(|(_, range)| range_well_formed(range));
    // The model: what each origin held at the start, plus what was inserted since.
    let start = vector.clone();
    let mut inserted: BTreeMap<OriginId, Vec<u64>> = BTreeMap::new();

    let mut inserts = 0;
    while !bytes.is_empty() && inserts < 256 {
        inserts += 1;
        let choice = bytes.byte();
        let origin = origins[usize::from(choice) % origins.len()];
        let held = vector.get(&origin).cloned().unwrap_or_default();
        let sequence = match usize::from(choice) / 3 % 6 {
            0 | 1 => u64::from(bytes.byte() % 32),
            2 => bytes.u64(),
            3 => held.contiguous.saturating_add(u64::from(bytes.byte() % 4)),
            4 => held.highest().saturating_add(u64::from(bytes.byte() % 4)),
            _ => u64::MAX - u64::from(bytes.byte() % 4),
        };
        let model_held = model_contains(&start, &inserted, &origin, sequence);
        let new = vector.insert(origin, sequence);
        if !well_formed {
            continue;
        }
        assert_eq!(new, sequence != 0 && !model_held, "insert({sequence}) misreported whether it was new");
        if sequence != 0 {
            inserted.entry(origin).or_default().push(sequence);
        }
        let range = vector.get(&origin).cloned().unwrap_or_default();
        assert!(range_well_formed(&range), "insert({sequence}) left ill-formed ranges: {range:?}");
        for probe in [0, 1, sequence.wrapping_sub(1), sequence, sequence.wrapping_add(1), u64::MAX] {
            assert_eq!(
                vector.contains(&origin, probe),
                model_contains(&start, &inserted, &origin, probe),
                "contains({probe}) disagrees with the model after insert({sequence}); ranges {range:?}"
            );
        }
    }
}

/// As `OriginRange` documents: ranges beyond the prefix are disjoint, not adjacent, ordered,
/// start above `contiguous + 1` and end at or after their start.
fn range_well_formed(range: &OriginRange) -> bool {
    let mut floor = range.contiguous.saturating_add(1);
    for (&start, &end) in &range.beyond {
        if start <= floor || end < start {
            return false;
        }
        floor = end.saturating_add(1);
    }
    true
}

fn model_contains(
    start: &VersionVector,
    inserted: &BTreeMap<OriginId, Vec<u64>>,
    origin: &OriginId,
    sequence: u64,
) -> bool {
    if sequence == 0 {
        return false;
    }
    let initially = start.get(origin).is_some_and(|range| {
        sequence <= range.contiguous || range.beyond.iter().any(|(&first, &last)| first <= sequence && sequence <= last)
    });
    initially || inserted.get(origin).is_some_and(|sequences| sequences.contains(&sequence))
}

// ---------------------------------------------------------------------------------------------
// replica_messages
// ---------------------------------------------------------------------------------------------

/// The node's durable state as the replication core reads it: the change log and the stored
/// documents (as the snapshot records they would travel as). The harness's node "applies" what
/// the core hands over by storing it here, as the engine does, and only then reports it durable.
pub type MemorySource = crdt::memory::MemorySource<SnapshotRecord>;

/// The origin of the harness's own node.
const LOCAL_ORIGIN: OriginId = OriginId([0xaa; 16]);

/// What the harness knows about one fake peer, to check the core against.
#[derive(Debug, Default)]
struct FakePeer {
    connected: bool,
    /// Envelopes and records the core may still send it: set by its summaries, raised by its
    /// credit messages, as the protocol says.
    credit_to_core: u32,
    /// The epoch of its latest summary the core applied: older summaries are ignored whole, and
    /// older credit messages grant nothing.
    epoch_to_core: u32,
    /// What the core granted it: its summaries' credit plus its credit messages since.
    allowance: u32,
    /// It never sent more than its allowance on this connection.
    honest: bool,
    /// Envelopes and records it sent that the core handed over and the node has not yet
    /// reported durable (duplicates of what the node holds are not handed over).
    pending: u64,
    /// Records sent to it per snapshot number, to check each snapshot's end.
    snapshot_records: BTreeMap<u32, u64>,
    /// What it is known to hold: its last summary, plus what it sent and was sent since.
    known: VersionVector,
}

/// A key from a small set, so records and envelopes collide.
fn small_key(bytes: &mut Bytes) -> RecordKey {
    const IDS: [&str; 4] = ["a", "b", "c", "ACME Corp — Zürich"];
    match RecordKey::new("fuzz", IDS[bytes.below(IDS.len())]) {
        Ok(key) => key,
        Err(error) => panic!("the fuzz keys are valid: {error}"),
    }
}

/// One of three origins (the node's own among them), or any origin.
fn some_origin(bytes: &mut Bytes) -> OriginId {
    match bytes.below(5) {
        0 => LOCAL_ORIGIN,
        1 | 2 => replica_origin(bytes.below(2)),
        3 => replica_origin(2),
        _ => {
            let mut origin = [0; 16];
            origin.iter_mut().for_each(|byte| *byte = bytes.byte());
            OriginId(origin)
        }
    }
}

/// A sequence: small, near the top of the range, or any.
fn some_sequence(bytes: &mut Bytes) -> u64 {
    match bytes.below(4) {
        0 | 1 => u64::from(bytes.byte() % 24),
        2 => u64::MAX - u64::from(bytes.byte() % 3),
        _ => bytes.u64(),
    }
}

/// A version vector as a peer may send it: up to three origins, each with a prefix and up to
/// three ranges beyond, which need not be well-formed (it comes off the wire).
fn some_version_vector(bytes: &mut Bytes) -> VersionVector {
    let mut origins: BTreeMap<OriginId, OriginRange> = BTreeMap::new();
    for _ in 0..bytes.below(4) {
        let origin = some_origin(bytes);
        let mut range = OriginRange { contiguous: some_sequence(bytes), beyond: BTreeMap::new() };
        for _ in 0..bytes.below(4) {
            let start = some_sequence(bytes);
            let end = if bytes.below(4) == 0 {
                some_sequence(bytes)
            } else {
                start.saturating_add(u64::from(bytes.byte() % 4))
            };
            range.beyond.insert(start, end);
        }
        origins.insert(origin, range);
    }
    // `VersionVector` is a struct of one field, encoded as a one-element array.
    match rmp_serde::to_vec(&(origins,)).map(|encoded| rmp_serde::from_slice::<VersionVector>(&encoded)) {
        Ok(Ok(vector)) => vector,
        other => panic!("a version vector built from its parts does not decode: {other:?}"),
    }
}

/// A document kind: mostly automerge records, sometimes texts and yrs records.
fn some_kind(bytes: &mut Bytes) -> DocumentKind {
    match bytes.below(8) {
        0 | 1 => DocumentKind::Text,
        2 => DocumentKind::MapRecord,
        _ => DocumentKind::Record,
    }
}

fn some_envelope(bytes: &mut Bytes) -> Envelope {
    let origin = some_origin(bytes);
    let sequence = some_sequence(bytes);
    let key = small_key(bytes);
    let kind = some_kind(bytes);
    let length = bytes.below(24);
    let change = bytes.take(length).to_vec();
    Envelope { origin, node: NodeId([7; 16]), sequence, timestamp: tick(sequence % 1000), key, kind, change }
}

fn some_snapshot_record(bytes: &mut Bytes) -> SnapshotRecord {
    let key = small_key(bytes);
    let kind = some_kind(bytes);
    let parts = (0..bytes.below(3))
        .map(|_| {
            let length = bytes.below(16);
            bytes.take(length).to_vec().into()
        })
        .collect();
    SnapshotRecord { key, kind, parts }
}

/// Whether `inner` holds nothing `outer` lacks, for a well-formed `outer` (each held stretch is
/// one range there). Written here, not with `VersionVector::missing_from`, which it checks.
fn covered_by(inner: &VersionVector, outer: &VersionVector) -> bool {
    inner.origins().all(|(origin, range)| {
        let held: Vec<(u64, u64)> = outer.get(origin).map(|range| range.ranges().collect()).unwrap_or_default();
        range.ranges().filter(|(start, end)| start <= end).all(|(start, end)| {
            let start = start.max(1);
            start > end || held.iter().any(|&(first, last)| first <= start && end <= last)
        })
    })
}

/// The replication core (`crdt::replica::Replica`) driven by a fake peer and a fake node. Bytes:
/// a settings byte (window 1-16 envelopes, chunks of 1-8), a byte for the node's own changes in
/// its log (0-7) and a byte for its stored documents (0-3), then steps: one byte picks the step
/// (`% 13`: connect a new peer, disconnect one, a Summary, Changes, Credit, Snapshot,
/// SnapshotEnd or Peers from a peer, a message decoded from raw bytes (2-byte big-endian length),
/// report handed-out applies durable, a local write, time passes, the log is trimmed), then a
/// byte for the peer (any peer ever connected, or a new id), then the step's arguments.
///
/// Never a panic. A `ProtocolError` only for a peer that is not connected, or that has more
/// envelopes and records pending here than four windows (and never for one that stayed within
/// what it was granted). Per input, each peer gets at most `window + 3` messages, none empty, no
/// chunk over `chunk_envelopes_max`; the core never sends a peer more envelopes and records than
/// the credit it granted; every envelope sent is one from the log; a snapshot's end counts the
/// records sent in it and claims no more than the node holds; no envelope goes to a peer known
/// to hold it (its last summary, plus what it sent and was sent since); every message survives the wire
/// encoding. What the core hands over to apply from a peer is exactly what it sent that the node
/// did not hold. `version_vector()` never shrinks, stays well-formed, and grows only by what was
/// reported durable or by a snapshot end; the log floors never fall and stay at most one past
/// the gap-free prefix.
pub fn replica_messages(data: &[u8]) {
    let mut bytes = Bytes::new(data);
    let settings_byte = bytes.byte();
    let settings = Settings {
        window_envelopes: 1 + u32::from(settings_byte % 16),
        chunk_envelopes_max: 1 + usize::from(settings_byte >> 4) % 8,
        chunk_bytes_max: 16 << (bytes.below(8)),
        summary_interval: Duration::from_secs(5),
    };
    let window = settings.window_envelopes;
    let start = Instant::now();
    let mut now = start;

    let mut source = MemorySource::default();
    let mut local = VersionVector::new();
    let mut next_local = 1u64;
    for _ in 0..bytes.below(8) {
        let key = small_key(&mut bytes);
        let envelope = Envelope {
            origin: LOCAL_ORIGIN,
            node: NodeId([1; 16]),
            sequence: next_local,
            timestamp: tick(next_local),
            key,
            kind: DocumentKind::Record,
            change: vec![next_local as u8; 3],
        };
        local.insert(LOCAL_ORIGIN, next_local);
        source.log.insert((LOCAL_ORIGIN, next_local), envelope);
        next_local += 1;
    }
    for _ in 0..bytes.below(4) {
        let record = some_snapshot_record(&mut bytes);
        source.records.insert(record.key.clone(), record);
    }
    let mut replica = Core::new(local, LogFloors::new(), settings.clone(), now);
    let mut peers: Vec<FakePeer> = Vec::new();
    // Handed out by `poll_apply`, not yet reported durable: (peer, what).
    let mut outstanding: Vec<(PeerId, Apply)> = Vec::new();

    let mut steps = 0;
    while !bytes.is_empty() && steps < 96 {
        steps += 1;
        let before = replica.version_vector().clone();
        let floors_before = replica.log_floors().clone();
        // What may join the version vector in this step.
        let mut may_grow = before.clone();
        let step = bytes.below(13);
        // The peer a message step comes from: any peer ever connected, or one never connected.
        let peer_index = bytes.below(peers.len() + 1);
        let peer_id = peer_index as PeerId;
        let mut sent: Option<Message> = None;
        match step {
            0 => {
                peers.push(FakePeer { connected: true, honest: true, ..FakePeer::default() });
                replica.handle_peer_connected(now, peers.len() as PeerId - 1);
                if bytes.below(2) == 0 {
                    replica.handle_peer_identified(peers.len() as PeerId - 1, NodeId([bytes.byte() % 3; 16]));
                }
            }
            1 => {
                if let Some(peer) = peers.get_mut(peer_index) {
                    peer.connected = false;
                }
                replica.handle_peer_disconnected(now, peer_id);
            }
            2 => {
                let version_vector = some_version_vector(&mut bytes);
                let credit = match bytes.below(4) {
                    0 => u32::MAX,
                    1 => 0,
                    _ => u32::from(bytes.byte() % 24),
                };
                let snapshots = u32::from(bytes.byte() % 4);
                let receiving = bytes.below(4) == 0;
                let epoch = u32::from(bytes.byte() % 8);
                sent = Some(Message::Summary { version_vector, credit, snapshots, receiving, epoch });
            }
            3 => {
                let envelopes = (0..bytes.below(40)).map(|_| some_envelope(&mut bytes)).collect();
                sent = Some(Message::Changes { envelopes });
            }
            4 => {
                let envelopes = if bytes.below(8) == 0 { u32::MAX } else { u32::from(bytes.byte() % 24) };
                let durable =
                    (0..bytes.below(4)).map(|_| (some_origin(&mut bytes), some_sequence(&mut bytes))).collect();
                let epoch = u32::from(bytes.byte() % 8);
                sent = Some(Message::Credit { envelopes, durable, epoch });
            }
            5 => {
                let snapshot = u32::from(bytes.byte() % 4);
                let records = (0..bytes.below(40)).map(|_| some_snapshot_record(&mut bytes)).collect();
                sent = Some(Message::Snapshot { snapshot, records });
            }
            6 => {
                let snapshot = u32::from(bytes.byte() % 4);
                let records = if bytes.below(2) == 0 { u64::from(bytes.byte() % 8) } else { bytes.u64() };
                sent =
                    Some(Message::SnapshotEnd { snapshot, records, version_vector: some_version_vector(&mut bytes) });
            }
            7 => {
                sent = Some(if bytes.below(2) == 0 {
                    Message::Peers { addresses: vec!["127.0.0.1:1".into(); bytes.below(3)] }
                } else {
                    Message::Lazy { origins: (0..bytes.below(6)).map(|_| some_origin(&mut bytes)).collect() }
                });
            }
            8 => {
                let length = usize::from(bytes.byte()) << 8 | usize::from(bytes.byte());
                if let Ok(message) = Message::decode(bytes.take(length)) {
                    assert_round_trips(&message);
                    sent = Some(message);
                }
            }
            9 => {
                // The node commits what it was handed (a byte-chosen prefix, in order) and
                // reports it durable, as the engine does after a group commit.
                let count = bytes.below(outstanding.len() + 1);
                let mut durable = Vec::new();
                for (source_peer, apply) in outstanding.drain(..count) {
                    match apply {
                        Apply::Change(envelope) => {
                            may_grow.insert(envelope.origin, envelope.sequence);
                            durable.push(Durable::Change {
                                source: Some(source_peer),
                                origin: envelope.origin,
                                sequence: envelope.sequence,
                            });
                            source.log.entry((envelope.origin, envelope.sequence)).or_insert(envelope);
                            if let Some(peer) = peers.get_mut(source_peer as usize) {
                                peer.pending = peer.pending.saturating_sub(1);
                            }
                        }
                        Apply::Record(record) => {
                            durable.push(Durable::Record { source: source_peer });
                            source.records.insert(record.key.clone(), record);
                            if let Some(peer) = peers.get_mut(source_peer as usize) {
                                peer.pending = peer.pending.saturating_sub(1);
                            }
                        }
                        Apply::SnapshotEnd(version_vector) => {
                            may_grow.merge(&version_vector);
                            durable.push(Durable::SnapshotEnd { source: source_peer, version_vector });
                        }
                    }
                }
                replica.handle_durable(now, &durable, &source);
            }
            10 => {
                let envelope = Envelope {
                    origin: LOCAL_ORIGIN,
                    node: NodeId([1; 16]),
                    sequence: next_local,
                    timestamp: tick(next_local),
                    key: small_key(&mut bytes),
                    kind: DocumentKind::Record,
                    change: vec![next_local as u8; 2],
                };
                let durable = [Durable::Change { source: None, origin: LOCAL_ORIGIN, sequence: next_local }];
                may_grow.insert(LOCAL_ORIGIN, next_local);
                source.log.insert((LOCAL_ORIGIN, next_local), envelope);
                next_local += 1;
                replica.handle_durable(now, &durable, &source);
            }
            11 => {
                now += Duration::from_millis(u64::from(bytes.byte()) * 50);
                replica.handle_timeout(now, &source);
            }
            _ => {
                // The engine trims the log within an origin's gap-free prefix and raises its floor.
                let origins: Vec<(OriginId, u64)> =
                    replica.version_vector().origins().map(|(origin, range)| (*origin, range.contiguous)).collect();
                if let Some(&(origin, contiguous)) = origins.get(bytes.below(origins.len().max(1))) {
                    let floor = contiguous.saturating_add(1).min(u64::from(bytes.byte() % 8).saturating_add(1));
                    let current = replica.log_floors().get(&origin).copied().unwrap_or(1);
                    if floor > current {
                        let trimmed: Vec<(OriginId, u64)> =
                            source.log.range((origin, 0)..(origin, floor)).map(|(key, _)| *key).collect();
                        for key in trimmed {
                            source.log.remove(&key);
                        }
                        replica.handle_log_trimmed(origin, floor);
                    }
                }
            }
        }

        if let Some(message) = sent {
            deliver_message(&mut replica, &mut peers, peer_id, message, now, &source, window, &mut outstanding);
        }
        drain_transmits(&mut replica, &mut peers, &settings, &source);
        while replica.poll_acknowledged().is_some() {}
        assert!(replica.poll_apply().is_none(), "the core handed over something to apply outside a peer message");

        let after = replica.version_vector();
        assert!(covered_by(&before, after), "the version vector shrank");
        assert!(covered_by(after, &may_grow), "the version vector grew by what was not reported durable");
        for (origin, range) in after.origins() {
            assert!(range_well_formed(range), "the version vector of {origin:?} became ill-formed: {range:?}");
        }
        for (origin, floor) in &floors_before {
            assert!(replica.log_floors().get(origin).is_some_and(|now| now >= floor), "a log floor fell");
        }
        for (origin, &floor) in replica.log_floors() {
            let contiguous = after.contiguous(origin);
            assert!(
                floor <= contiguous.saturating_add(1),
                "floor {floor} of {origin:?} is past its prefix {contiguous}"
            );
        }
        let _ = replica.peer_lags();
        let _ = replica.poll_timeout();
    }
}

#[track_caller]
fn assert_round_trips(message: &Message) {
    match Message::decode(&message.encode()) {
        Ok(again) => assert_eq!(&again, message, "a message changed in an encode/decode round trip"),
        Err(error) => panic!("an encoded message does not decode: {error}"),
    }
}

/// Delivers a message from fake peer `peer_id` and checks the core's verdict and what it hands
/// over to apply.
#[allow(clippy::too_many_arguments)]
fn deliver_message(
    replica: &mut Core,
    peers: &mut [FakePeer],
    peer_id: PeerId,
    message: Message,
    now: Instant,
    source: &MemorySource,
    window: u32,
    outstanding: &mut Vec<(PeerId, Apply)>,
) {
    let connected = peers.get(peer_id as usize).is_some_and(|peer| peer.connected);
    let held = replica.version_vector().clone();
    // What the peer's message does to its account, as the protocol says.
    let mut expected_applies = 0u64;
    if let Some(peer) = peers.get_mut(peer_id as usize).filter(|_| connected) {
        let sent = match &message {
            Message::Changes { envelopes } => {
                expected_applies =
                    envelopes.iter().filter(|envelope| !held.contains(&envelope.origin, envelope.sequence)).count()
                        as u64;
                Some(envelopes.len())
            }
            Message::Snapshot { records, .. } => {
                expected_applies = records.len() as u64;
                Some(records.len())
            }
            Message::Summary { credit, version_vector, epoch, .. } => {
                if *epoch >= peer.epoch_to_core {
                    peer.epoch_to_core = *epoch;
                    peer.credit_to_core = (*credit).min(window);
                    // As the core reads it: normalized (a property test in `version_vector`
                    // checks that this keeps exactly what the vector claims). The raw vector may
                    // be ill-formed, where `insert` is not defined.
                    peer.known = version_vector.normalized();
                }
                None
            }
            Message::Credit { envelopes, epoch, .. } => {
                if *epoch >= peer.epoch_to_core {
                    peer.credit_to_core = peer.credit_to_core.saturating_add(*envelopes).min(window);
                }
                None
            }
            _ => None,
        };
        if let Message::Changes { envelopes } = &message {
            envelopes.iter().for_each(|envelope| {
                peer.known.insert(envelope.origin, envelope.sequence);
            });
        }
        if let Some(count) = sent.map(|count| u32::try_from(count).unwrap_or(u32::MAX)) {
            match peer.allowance.checked_sub(count) {
                Some(left) => peer.allowance = left,
                None => {
                    peer.allowance = 0;
                    peer.honest = false;
                }
            }
        }
        peer.pending += expected_applies;
    }
    let complete_end = matches!(&message, Message::SnapshotEnd { .. });
    let result = replica.handle_peer_message(now, peer_id, message, source);
    let mut applies = 0u64;
    let mut ends = 0;
    while let Some((from, apply)) = replica.poll_apply() {
        assert_eq!(from, peer_id, "an apply is attributed to another peer");
        match &apply {
            Apply::SnapshotEnd(version_vector) => {
                ends += 1;
                assert!(complete_end, "a snapshot end handed over for a message that is not one");
                let _ = version_vector;
            }
            _ => applies += 1,
        }
        outstanding.push((from, apply));
    }
    assert!(ends <= 1, "one snapshot end handed over more than once");
    match result {
        Err(ProtocolError::UnknownPeer(peer)) => {
            assert_eq!(peer, peer_id);
            assert!(!connected, "a connected peer was called unknown");
        }
        Err(ProtocolError::CreditExceeded { peer, pending, granted }) => {
            assert_eq!(peer, peer_id);
            assert!(connected, "an unknown peer was said to overrun its credit");
            let fake = &mut peers[peer_id as usize];
            assert!(!fake.honest, "a peer that stayed within its credit was refused ({pending} > {granted})");
            assert_eq!(u64::from(pending), fake.pending, "the core counts other pending envelopes than it handed over");
            assert!(pending > granted && granted == window.saturating_mul(4), "refused within the bound");
            fake.connected = false;
            assert_eq!(applies, expected_applies, "the core handed over other envelopes than it lacked");
        }
        Ok(()) => {
            assert!(connected, "a message from an unknown peer was accepted");
            let fake = &peers[peer_id as usize];
            assert_eq!(applies, expected_applies, "the core handed over other envelopes than it lacked");
            assert!(fake.pending <= u64::from(window) * 4, "{} pending from a peer beyond four windows", fake.pending);
            if fake.honest {
                assert!(fake.pending <= u64::from(window), "an honest peer has more pending than one window");
            }
        }
    }
}

/// Drains what the core sends after an input and checks it against the protocol.
fn drain_transmits(replica: &mut Core, peers: &mut [FakePeer], settings: &Settings, source: &MemorySource) {
    let mut per_peer: BTreeMap<PeerId, u32> = BTreeMap::new();
    while let Some((peer_id, message)) = replica.poll_transmit() {
        let count = per_peer.entry(peer_id).or_default();
        *count += 1;
        assert!(*count <= settings.window_envelopes + 3, "peer {peer_id} was sent {count} messages for one input");
        let Some(peer) = peers.get_mut(peer_id as usize).filter(|peer| peer.connected) else {
            panic!("a message for peer {peer_id}, which is not connected: {message:?}");
        };
        assert_round_trips(&message);
        match &message {
            Message::Summary { version_vector, credit, .. } => {
                assert_eq!(version_vector, replica.version_vector(), "a summary that is not what the node holds");
                assert!(*credit <= settings.window_envelopes, "a summary grants more than the window");
                peer.allowance = *credit;
            }
            Message::Credit { envelopes, durable, .. } => {
                assert!(*envelopes > 0 && durable.len() <= *envelopes as usize, "a credit message that grants nothing");
                peer.allowance = peer.allowance.saturating_add(*envelopes);
            }
            Message::Changes { envelopes } => {
                spend(peer, envelopes.len(), settings, "envelopes");
                let mut last: BTreeMap<OriginId, u64> = BTreeMap::new();
                for envelope in envelopes {
                    assert!(
                        source.log.get(&(envelope.origin, envelope.sequence)) == Some(envelope),
                        "an envelope sent that is not in the log"
                    );
                    assert!(
                        !peer.known.contains(&envelope.origin, envelope.sequence),
                        "sent ({:?}, {}) to a peer known to hold it",
                        envelope.origin,
                        envelope.sequence
                    );
                    peer.known.insert(envelope.origin, envelope.sequence);
                    let previous = last.insert(envelope.origin, envelope.sequence);
                    assert!(previous.is_none_or(|previous| previous < envelope.sequence), "changes not oldest first");
                }
            }
            Message::Snapshot { snapshot, records } => {
                spend(peer, records.len(), settings, "records");
                *peer.snapshot_records.entry(*snapshot).or_default() += records.len() as u64;
            }
            Message::SnapshotEnd { snapshot, records, version_vector } => {
                let sent = peer.snapshot_records.remove(snapshot).unwrap_or(0);
                assert_eq!(*records, sent, "a snapshot end counts other records than were sent");
                assert!(covered_by(version_vector, replica.version_vector()), "a snapshot end claims more than held");
            }
            Message::Peers { .. } => panic!("the core sent a Peers message"),
            Message::Lazy { origins } => {
                assert!(origins.len() <= LAZY_ORIGINS_MAX, "a lazy list of {} origins", origins.len());
                assert!(origins.windows(2).all(|pair| pair[0] < pair[1]), "a lazy list not sorted or with repeats");
            }
        }
    }
}

/// The core sends `count` envelopes or records to a peer: never none, never more than a chunk,
/// never more than the peer's credit.
#[track_caller]
fn spend(peer: &mut FakePeer, count: usize, settings: &Settings, what: &str) {
    assert!(count > 0 && count <= settings.chunk_envelopes_max, "a message of {count} {what}");
    let count = u32::try_from(count).unwrap_or(u32::MAX);
    assert!(count <= peer.credit_to_core, "sent {count} {what} with credit for {}", peer.credit_to_core);
    peer.credit_to_core -= count;
}

// ---------------------------------------------------------------------------------------------
// stored_documents
// ---------------------------------------------------------------------------------------------

/// Decodes a stored document entry as the engine writes it (`src/engine.rs`, `DocumentEntry`:
/// `rmp_serde` of `{kind, saved}` with `saved` as msgpack bin, which `rmp_serde` writes as a
/// two-element array). The engine's derived decoder also takes the map form, which it never
/// writes; here that is an error, so such inputs simply stop early.
pub fn decode_document_entry(bytes: &[u8]) -> Result<(DocumentKind, &[u8]), rmp_serde::decode::Error> {
    rmp_serde::from_slice::<(DocumentKind, &[u8])>(bytes)
}

/// Encodes a document entry exactly as the engine does (`tests/fuzz_regressions.rs` checks this
/// against a copy of the engine's struct): an array of the kind and `saved` as bin.
pub fn encode_document_entry(kind: DocumentKind, saved: &[u8]) -> Vec<u8> {
    let mut encoded = vec![0x92];
    encoded.extend(rmp_serde::to_vec(&kind).unwrap_or_default());
    let length = saved.len();
    if let Ok(length) = u8::try_from(length) {
        encoded.extend([0xc4, length]);
    } else if let Ok(length) = u16::try_from(length) {
        encoded.push(0xc5);
        encoded.extend(length.to_be_bytes());
    } else {
        encoded.push(0xc6);
        encoded.extend(u32::try_from(length).unwrap_or(u32::MAX).to_be_bytes());
    }
    encoded.extend_from_slice(saved);
    encoded
}

/// What the node reads from its store, which disk damage turns into arbitrary bytes. The first
/// byte picks what (`% 4`) and bit 2 recomputes automerge chunk checksums:
/// - 0: a document: a 2-byte big-endian length and that many bytes of document entry, then one
///   byte for the number of increments (`% 4`), each a 2-byte length and its bytes. A record
///   loads with `Record::load(saved, increments)`, a text with `TextDocument::load`;
/// - 1: the meta `version_vector` (`rmp_serde` of `VersionVector`);
/// - 2: the meta `log_floors` (`rmp_serde` of `LogFloors`, origin to floor);
/// - 3: a change-log entry (`Envelope::decode`).
///
/// Never a panic: a value that does not decode or load is an error. A decoded entry, version
/// vector, floors or envelope encodes back to itself. A document that loads reads without
/// panicking and loads again to the same heads (or text digest); its save is trusted only when
/// it reloads to the same heads (a text: digest and reading), and then it reads the same. A version vector from
/// disk, merged into an empty one, is well-formed and holds the same sequences.
pub fn stored_documents(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut bytes = Bytes::new(rest);
    match mode % 4 {
        0 => {
            let length = usize::from(bytes.byte()) << 8 | usize::from(bytes.byte());
            let mut entry = bytes.take(length).to_vec();
            let mut increments: Vec<Vec<u8>> = (0..bytes.below(4))
                .map(|_| {
                    let length = usize::from(bytes.byte()) << 8 | usize::from(bytes.byte());
                    bytes.take(length).to_vec()
                })
                .collect();
            if mode & 4 != 0 {
                if let Ok((kind, saved)) = decode_document_entry(&entry) {
                    let mut saved = saved.to_vec();
                    fix_chunk_checksums(&mut saved);
                    entry = encode_document_entry(kind, &saved);
                }
                increments.iter_mut().for_each(|increment| fix_chunk_checksums(increment));
            }
            stored_document(&entry, &increments);
        }
        1 => {
            let Ok(vector) = rmp_serde::from_slice::<VersionVector>(rest) else { return };
            let encoded = rmp_serde::to_vec(&vector).unwrap_or_default();
            assert_eq!(rmp_serde::from_slice::<VersionVector>(&encoded).ok().as_ref(), Some(&vector), "round trip");
            let mut merged = VersionVector::new();
            merged.merge(&vector);
            for (origin, range) in merged.origins() {
                assert!(range_well_formed(range), "merging a stored vector gave ill-formed ranges for {origin:?}");
            }
            let _ =
                (vector.contiguous_prefix(), merged.count_missing_from(&vector), vector.count_missing_from(&vector));
            // The node starts its replication core over the stored vector; a new peer that holds
            // nothing and has credit is then sent what the log holds (here: nothing).
            let now = Instant::now();
            let mut core = Core::new(vector, LogFloors::new(), Settings::default(), now);
            core.handle_peer_connected(now, 1);
            let summary = Message::Summary {
                version_vector: VersionVector::new(),
                credit: 16,
                snapshots: 0,
                receiving: false,
                epoch: 1,
            };
            let _ = core.handle_peer_message(now, 1, summary, &MemorySource::default());
            let _ = core.peer_lags();
        }
        2 => {
            let Ok(floors) = rmp_serde::from_slice::<LogFloors>(rest) else { return };
            let encoded = rmp_serde::to_vec(&floors).unwrap_or_default();
            assert_eq!(rmp_serde::from_slice::<LogFloors>(&encoded).ok().as_ref(), Some(&floors), "round trip");
        }
        _ => envelope_decode(rest),
    }
}

fn stored_document(entry: &[u8], increments: &[Vec<u8>]) {
    let Ok((kind, saved)) = decode_document_entry(entry) else { return };
    let encoded = encode_document_entry(kind, saved);
    assert_eq!(decode_document_entry(&encoded).ok(), Some((kind, saved)), "a document entry does not round trip");
    let increments: Vec<&[u8]> = increments.iter().map(Vec::as_slice).collect();
    match kind {
        DocumentKind::Record => {
            let Ok(record) = Record::load(saved, &increments) else { return };
            match Record::load(saved, &increments) {
                Ok(again) => assert_eq!(again.heads(), record.heads(), "loading the same parts twice differs"),
                Err(error) => panic!("stored parts loaded once and then failed: {error}"),
            }
            check_stored_record(&record, None);
        }
        DocumentKind::Text => {
            let limits = TextLimits::default();
            let Ok(document) = TextDocument::load(9, saved, &increments, &limits) else { return };
            match TextDocument::load(9, saved, &increments, &limits) {
                Ok(again) => assert_same_text(&again, &document, "loading the same parts twice"),
                Err(error) => panic!("stored parts loaded once and then failed: {error}"),
            }
            for name in TEXT_NAMES {
                let _ = document.text(name);
            }
            check_trusted_save(&document, &limits);
        }
        DocumentKind::MapRecord => {
            let limits = TextLimits::default();
            let Ok(record) = MapRecord::load(9, saved, &increments, &limits) else { return };
            match MapRecord::load(9, saved, &increments, &limits) {
                Ok(again) => assert_eq!(again.digest(), record.digest(), "loading the same parts twice differs"),
                Err(error) => panic!("stored parts loaded once and then failed: {error}"),
            }
            let _ = record.view();
            let _ = record.is_live();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// http_bodies
// ---------------------------------------------------------------------------------------------

/// A record as the HTTP API meets it: several lives, a counter `visits`, a string `name`.
pub fn base_http_record() -> &'static Record {
    &base_record().0
}

/// Bytes as an HTTP request body, through `crdt::body::operation` (the parsing the API runs).
/// The first byte picks the endpoint (`% 3`: PUT replace, PATCH merge patch, POST increment),
/// the rest is the body.
///
/// The first byte that sends an `http_bodies` input to `POST /v1/batch`'s parser.
const BATCH_ENDPOINT: u8 = 0xff;

/// A batch body: never a panic; accepted exactly when it is a JSON array of at most
/// `BATCH_WRITES_MAX` writes, each of which names a valid key and a known op with its members;
/// and then each write is what its object says.
fn batch_body(body: &[u8]) {
    let parsed = serde_json::from_slice::<Value>(body);
    match (crdt::body::batch(body), parsed) {
        (Ok(writes), Ok(Value::Array(items))) => {
            assert!(items.len() <= crdt::body::BATCH_WRITES_MAX, "an oversized batch was accepted");
            assert_eq!(writes.len(), items.len(), "a batch lost or gained writes");
            for ((key, operation), item) in writes.iter().zip(&items) {
                assert_eq!(item["collection"].as_str(), Some(key.collection()), "a write moved collection");
                assert_eq!(item["id"].as_str(), Some(key.id()), "a write moved record");
                let expected = match item["op"].as_str() {
                    Some("put") => Operation::Replace(as_object(&item["value"]).clone()),
                    Some("patch") => Operation::MergePatch(as_object(&item["value"]).clone()),
                    Some("delete") => Operation::Delete,
                    Some("increment") => Operation::Increment {
                        field: item["field"].as_str().unwrap_or_default().to_owned(),
                        by: item.get("by").map_or(Some(1), Value::as_i64).unwrap_or_default(),
                    },
                    other => panic!("op {other:?} was accepted"),
                };
                assert_eq!(operation, &expected, "a write is not what its object says");
            }
        }
        (Err(BodyError::Malformed(_)), Err(_)) => {}
        (Err(BodyError::NotABatch(named)), Ok(value)) => assert_eq!(named, crdt::body::kind_of(&value)),
        (Err(BodyError::BatchTooLarge(count)), Ok(Value::Array(items))) => {
            assert_eq!(count, items.len());
            assert!(count > crdt::body::BATCH_WRITES_MAX);
        }
        (Err(BodyError::BatchWrite { index, .. }), Ok(Value::Array(items))) => assert!(index < items.len()),
        (result, parsed) => panic!("batch parsed as {result:?}, JSON says {parsed:?}"),
    }
}

/// Never a panic. The body is refused exactly when it is not a JSON object (naming the JSON
/// kind), or, for an increment, when `field` is not a string or `by` is present and not an
/// integer in the i64 range. A parsed operation, written to a record with history: a replace
/// reads back exactly (or is refused as too deep, changing nothing); a merge patch matches the
/// RFC 7386 reference over what the record read before (or is refused as too deep); an
/// increment of a counter or an absent field adds `by` (or is refused for overflow, changing
/// nothing), of any other field is refused as not a counter; a refused write changes nothing.
pub fn http_bodies(data: &[u8]) {
    let Some((&endpoint, body)) = data.split_first() else { return };
    if endpoint == BATCH_ENDPOINT {
        return batch_body(body);
    }
    let kind = match endpoint % 3 {
        0 => BodyKind::Replace,
        1 => BodyKind::MergePatch,
        _ => BodyKind::Increment,
    };
    let parsed = serde_json::from_slice::<Value>(body);
    let operation = match (crdt::body::operation(kind, body), &parsed) {
        (Ok(operation), Ok(Value::Object(_))) => operation,
        (Err(BodyError::Malformed(_)), Err(_)) => return,
        (Err(BodyError::NotAnObject(named)), Ok(value)) if !value.is_object() => {
            assert_eq!(named, crdt::body::kind_of(value), "a refusal names the wrong kind");
            return;
        }
        (Err(BodyError::Field), Ok(Value::Object(map))) if kind == BodyKind::Increment => {
            assert!(!matches!(map.get("field"), Some(Value::String(_))), "a string field was refused");
            return;
        }
        (Err(BodyError::By), Ok(Value::Object(map))) if kind == BodyKind::Increment => {
            assert!(map.get("by").is_some_and(|by| by.as_i64().is_none()), "an i64 \"by\" was refused");
            return;
        }
        (result, parsed) => panic!("body parsed as {result:?}, JSON says {parsed:?}"),
    };
    let mut record = base_http_record().clone();
    let before = view_of(&record);
    let version = record.version();
    let result = record.write(&fuzz_key(), &replica_origin(4), tick(200), &operation);
    if result.is_err() {
        assert_eq!(record.version(), version, "a refused write changed the record");
    }
    match (&operation, result) {
        (Operation::Replace(fields), Ok(_)) => assert_reads_exactly(&record, fields, "Replace over history"),
        (Operation::MergePatch(patch), Ok(_)) => {
            let start = Value::Object(before.value.unwrap_or_default());
            let expected = merge_patch_reference(&start, &Value::Object(patch.clone()));
            assert_reads_exactly(&record, as_object(&expected), "MergePatch over history");
        }
        (Operation::Replace(fields) | Operation::MergePatch(fields), Err(error)) => {
            let within = fields.values().all(|value| nesting(value) <= DEPTH_MAX);
            assert!(
                !within && matches!(error, OperationError::Json(JsonError::TooDeep)),
                "a body within the depth limit was refused: {error}"
            );
        }
        (Operation::Increment { field, by }, result) => {
            let old = before.value.as_ref().and_then(|value| value.get(field));
            // An absent field starts at 0; an integer becomes a counter; anything else is not one.
            let current = match old {
                None => Some(0),
                Some(Value::Number(number)) if !number.is_f64() => number.as_i64(),
                Some(_) => None,
            };
            let within = |value: i64| value.checked_abs().is_some_and(|magnitude| magnitude <= COUNTER_MAGNITUDE_MAX);
            let valid_name = !field.is_empty() && field.len() <= crdt::record::FIELD_BYTES_MAX;
            match result {
                Ok(None) if *by == 0 => assert_eq!(record.version(), version, "an increment by 0 changed the record"),
                Ok(_) => {
                    let sum = current.and_then(|current| current.checked_add(*by));
                    assert!(valid_name && sum.is_some_and(within) && within(*by), "increment {by} of {old:?} accepted");
                    let now = view_of(&record).value.and_then(|value| value.get(field).cloned());
                    let expected = if *by == 0 && old.is_none() { None } else { sum.map(Value::from) };
                    assert_eq!(now, expected, "increment by {by} of {old:?}");
                }
                Err(OperationError::FieldName) => assert!(!valid_name, "field name {field:?} refused"),
                Err(OperationError::NotACounter(_)) => assert!(current.is_none(), "{old:?} is not a counter?"),
                Err(OperationError::Json(JsonError::CounterOverflow { .. })) => {
                    let sum = current.and_then(|current| current.checked_add(*by));
                    assert!(!(sum.is_some_and(within) && within(*by)), "increment {by} of {old:?} refused");
                }
                Err(error) => panic!("increment {field:?} by {by} of {old:?} failed: {error}"),
            }
        }
        (Operation::Delete, _) => panic!("a body became a delete"),
    }
}

// ---------------------------------------------------------------------------------------------
// pgoutput_decode
// ---------------------------------------------------------------------------------------------

/// The column types whose text values every decoded tuple value is also read as: each mapping
/// of `crdt::capture::values` (booleans, integers, floats, numeric, JSON, text and arrays).
const VALUE_TYPES: [u32; 9] = [16, 23, 701, 1700, 3802, 25, 1007, 1009, 3807];

/// Arbitrary bytes as a message from a PostgreSQL server's logical replication stream: decoding
/// never panics, a decoded message encodes to bytes that decode to it again, and every text value
/// read as a record field of any mapped type writes back to text that reads as the same field
/// (JSON columns excepted from the equality: serde_json's float parsing is not exact to the bit).
pub fn pgoutput_decode(data: &[u8]) {
    let Ok(message) = pgoutput::decode(data) else { return };
    let again = pgoutput::decode(&pgoutput::encode(&message));
    assert_eq!(again.as_ref(), Ok(&message), "a decoded message did not survive encoding");
    let tuples: Vec<&pgoutput::Tuple> = match &message {
        pgoutput::Message::Insert { new, .. } => vec![new],
        pgoutput::Message::Update { key, old, new, .. } => key.iter().chain(old.iter()).chain([new]).collect(),
        pgoutput::Message::Delete { old, .. } => vec![old],
        _ => Vec::new(),
    };
    let texts = tuples.into_iter().flat_map(|tuple| tuple.0.iter()).filter_map(|datum| match datum {
        pgoutput::Datum::Text(text) => Some(text.as_str()),
        _ => None,
    });
    for text in texts.take(16) {
        for type_oid in VALUE_TYPES {
            let Ok(field) = values::to_record_value(type_oid, text) else { continue };
            let Ok(written) = values::to_sql_text(type_oid, &field) else { continue };
            let Some(written) = written else { panic!("{text:?} as type {type_oid} wrote back as NULL") };
            let back = values::to_record_value(type_oid, &written);
            if type_oid != 3802 && type_oid != 3807 {
                assert_eq!(back.as_ref(), Ok(&field), "type {type_oid}: {text:?} wrote back as {written:?}");
            } else {
                assert!(back.is_ok(), "type {type_oid}: {text:?} wrote back as unreadable {written:?}");
            }
        }
    }
}
