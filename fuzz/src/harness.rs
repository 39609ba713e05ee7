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

use crdt::clock::Timestamp;
use crdt::envelope::Envelope;
use crdt::identity::OriginId;
use crdt::json::{DEPTH_MAX, JsonError};
use crdt::key::RecordKey;
use crdt::record::{Operation, OperationError, Record, RecordView};
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
        for (number, operation) in operations.iter().enumerate() {
            let origin = replica_origin(number % 2);
            if let Err(error) = record.write(&key, &origin, tick(number as u64), operation) {
                panic!("base record write {operation:?} failed: {error}");
            }
        }
        let saved = record.save();
        (record, saved)
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
///
/// Never a panic. Whatever loads reads without panicking and survives save/load with the same
/// version and view. A failed apply leaves the version unchanged; a successful one reports
/// whether the version moved, is idempotent, survives save/load, and leaves the record writable.
pub fn record_changes(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut bytes = rest.to_vec();
    if mode & 1 == 1 {
        fix_chunk_checksums(&mut bytes);
    }
    let (base, saved) = base_record();
    match mode >> 1 & 3 {
        0 => {
            if let Ok(record) = Record::load(&bytes, &[]) {
                check_loaded(&record);
            }
        }
        1 => {
            if let Ok(record) = Record::load(saved, &[&bytes]) {
                check_loaded(&record);
            }
        }
        _ => apply_to_base(base, &bytes),
    }
}

fn apply_to_base(base: &Record, bytes: &[u8]) {
    let mut record = base.clone();
    let version = record.version();
    match record.apply_changes(bytes) {
        Err(_) => assert_eq!(record.version(), version, "a failed apply_changes changed the record"),
        Ok(changed) => {
            assert_eq!(changed, record.version() != version, "apply_changes misreported whether it changed");
            check_loaded(&record);
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

/// What must hold of any record that loaded: it reads (or fails to read) without panicking, and
/// save/load round-trips it.
fn check_loaded(record: &Record) {
    let _ = record.view();
    let _ = record.is_live();
    assert_save_load_round_trips(record);
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
/// `validate_update` refusal is also an `apply_update` refusal; an accepted one survives
/// save/load with the same digest and texts, is a no-op the second time, and the document then
/// syncs to a new replica through `diff`. The bytes as a state vector make `diff` fail or answer,
/// never panic.
pub fn text_update(data: &[u8]) {
    let limits = TextLimits::default();
    let valid = validate_update(data, &limits).is_ok();

    let mut empty = TextDocument::new(1);
    check_text_apply(&mut empty, data, &limits, valid);

    let mut document = match TextDocument::load(2, base_text(), &[], &limits) {
        Ok(document) => document,
        Err(error) => panic!("the base text does not load: {error}"),
    };
    check_text_apply(&mut document, data, &limits, valid);
    let _ = document.diff(data);
}

fn check_text_apply(document: &mut TextDocument, update: &[u8], limits: &TextLimits, valid: bool) {
    const NAMES: [&str; 3] = ["text", "title", ""];
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

    let saved = document.save();
    let loaded = match TextDocument::load(document.client_id(), &saved, &[], limits) {
        Ok(loaded) => loaded,
        Err(error) => panic!("a saved text document does not load: {error}"),
    };
    assert_eq!(loaded.digest(), document.digest(), "save/load changed the digest");
    for name in NAMES {
        assert_eq!(loaded.text(name), document.text(name), "save/load changed root text {name:?}");
    }

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
