//! Records that are still one first change, read without building their automerge document:
//! the head and liveness a node needs to store one, and the view it needs to serve one.
//!
//! A node stores a record new to it as the change that created it and builds the document when
//! the record is next changed (ARCHITECTURE.md). Building costs automerge a whole load and the drop after, so a
//! replica that serves each new record once (a change-feed subscriber, a GET) spent most of its
//! time there (BENCHMARKS.md, session 8). A first change has no dependencies and no operation in
//! it supersedes another, so its operations *are* the document: reading them gives the same
//! head, liveness and view. Anything this reader does not cover exactly (text or table objects,
//! marks, deletes, increments, a slot written twice, nesting past [`DEPTH_MAX`]) is `None`, and
//! the caller builds the record, so the two ways can only agree. The `record_changes` fuzz
//! target and a property test check that they do.

use std::collections::{BTreeMap, HashMap};

use automerge::legacy::{ElementId, Key, ObjectId, OpId, OpType};
use automerge::{ActorId, ChangeHash, ObjType, ScalarValue};
use serde_json::{Map, Value};

use super::bounds::Chunk;
use super::{Budget, CAUSAL_LENGTH, FirstChange, Record, RecordView, life_prefix, parse_change, version_of};
use crate::json::{self, DEPTH_MAX};

impl Record {
    /// Reads change bytes that would start a record, without building the document: the head
    /// the record would have and whether it would be live. Building a record from its first
    /// change costs automerge a whole load (and the drop after), which dominated catch-up of
    /// records new to a node, while parsing and checking the change is a fraction of it.
    ///
    /// `None` unless the bytes are exactly one well-formed change with no dependencies, sequence
    /// 1, no actor but its author, no operation that supersedes another (no predecessors: nothing in it can conflict),
    /// and at most one write of the causal length, a plain non-negative integer; and operations
    /// this reader covers exactly, the ones [`Record::first_change_view`] reads (each inside the
    /// root or an object the change made before it). Anything else (a held-back change, several
    /// changes, an increment's genesis, an operation inside an object the change never made,
    /// which automerge 0.12 panics on applying: the fuzz regression
    /// `record_changes/first-change-op-in-an-object-it-never-made`) goes the building way, where
    /// automerge's refusal is an error. The fuzz target `record_changes` checks that whatever
    /// this accepts loads as a record with that head and liveness.
    pub fn first_change(bytes: &[u8]) -> Option<FirstChange> {
        let parsed = Parsed::read(bytes)?;
        Objects::gather(&parsed)?;
        Some(FirstChange { head: parsed.head, live: parsed.is_live() })
    }

    /// The view of the record that change bytes accepted by [`Record::first_change`] would
    /// build, read from the change's operations: the same value, no conflicts (nothing in a
    /// first change is concurrent) and the same version. `None` when the change holds anything
    /// this reader does not cover exactly (see the module documentation): build the record then.
    pub fn first_change_view(bytes: &[u8]) -> Option<RecordView> {
        let parsed = Parsed::read(bytes)?;
        let version = version_of(&[parsed.head]);
        if !parsed.is_live() {
            // A deleted record reads as nothing, whatever the change holds.
            return Some(RecordView { value: None, conflicts: Vec::new(), version });
        }
        let objects = Objects::gather(&parsed)?;
        let prefix = life_prefix(parsed.causal_length.unwrap_or(0));
        let Made::Map(root) = objects.made.get(&None)? else { return None };
        let mut value = Map::new();
        for (key, slot) in root {
            let Some(field) = key.strip_prefix(prefix.as_str()) else { continue };
            value.insert(field.to_owned(), objects.render(slot, 1)?);
        }
        Some(RecordView { value: Some(value), conflicts: Vec::new(), version })
    }
}

/// Whether `bytes` start as an uncompressed automerge change chunk that names at least one
/// dependency (read from its header and the first number of its body). Anything else (a
/// compressed chunk, bytes that are no change) is `false`, and the full parse decides.
fn names_dependencies(bytes: &[u8]) -> bool {
    Chunk::split(bytes).ok().and_then(|(chunk, _)| chunk.dependency_count()).is_some_and(|count| count > 0)
}

/// A first change, checked and decoded.
struct Parsed {
    head: ChangeHash,
    causal_length: Option<u64>,
    change: automerge::ExpandedChange,
}

impl Parsed {
    fn read(bytes: &[u8]) -> Option<Parsed> {
        // Most changes a node receives are not first changes, and parsing one verifies its hash:
        // a look at the header turns those away first.
        if names_dependencies(bytes) {
            return None;
        }
        // Parsing walks every operation the bytes declare, and `decode` allocates them all.
        Budget::after(0).charge(bytes).ok()?;
        let change = parse_change(bytes)?;
        // A change with no dependencies can name no other actor: automerge 0.12 registers the
        // actors of first changes only, and panics on applying one that names another.
        if !change.deps().is_empty() || change.seq() != 1 || !change.other_actor_ids().is_empty() {
            return None;
        }
        // `decode` trusts what `try_from` verified, but it is automerge's legacy path: a panic
        // in it is a refusal, never a crash.
        let expanded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| change.decode())).ok()?;
        let mut causal_length = None;
        for operation in &expanded.operations {
            if !operation.pred.is_empty() {
                return None;
            }
            let is_causal_length = matches!(operation.obj, ObjectId::Root)
                && matches!(&operation.key, Key::Map(key) if key.as_str() == CAUSAL_LENGTH);
            if !is_causal_length {
                continue;
            }
            let length = match &operation.action {
                OpType::Put(ScalarValue::Uint(length)) if !operation.insert => *length,
                OpType::Put(ScalarValue::Int(length)) if !operation.insert => u64::try_from(*length).ok()?,
                _ => return None,
            };
            if causal_length.replace(length).is_some() {
                return None;
            }
        }
        Some(Parsed { head: change.hash(), causal_length, change: expanded })
    }

    fn is_live(&self) -> bool {
        self.causal_length.unwrap_or(0) % 2 == 1
    }
}

/// What one slot of a map or list holds: a scalar, or an object the change made (named by its
/// operation's counter; every operation of a change has the change's actor).
enum Slot<'change> {
    Scalar(&'change ScalarValue),
    Object(u64),
}

/// An object the change made, with what the change put in it.
enum Made<'change> {
    /// Keys in order, as automerge lists them.
    Map(BTreeMap<&'change str, Slot<'change>>),
    /// Elements as inserted: (the element it was inserted after, `None` for the head; its own
    /// counter; its slot).
    List(Vec<(Option<u64>, u64, Slot<'change>)>),
}

/// Every object of a first change, the root (`None`) included.
struct Objects<'change> {
    made: HashMap<Option<u64>, Made<'change>>,
}

impl<'change> Objects<'change> {
    fn gather(parsed: &'change Parsed) -> Option<Objects<'change>> {
        let actor = &parsed.change.actor_id;
        let mut made = HashMap::new();
        made.insert(None, Made::Map(BTreeMap::new()));
        // Each list element's list, so an insertion can be checked to follow one of its own.
        let mut lists_of_elements: HashMap<u64, Option<u64>> = HashMap::new();
        let mut counter = parsed.change.start_op.get();
        for operation in &parsed.change.operations {
            let object = match &operation.obj {
                ObjectId::Root => None,
                ObjectId::Id(id) => Some(own_counter(id, actor)?),
            };
            // An object cannot be put inside itself (only crafted bytes would try).
            if object == Some(counter) {
                return None;
            }
            let slot = match &operation.action {
                OpType::Put(scalar) => Slot::Scalar(scalar),
                OpType::Make(ObjType::Map) => {
                    made.insert(Some(counter), Made::Map(BTreeMap::new()));
                    Slot::Object(counter)
                }
                OpType::Make(ObjType::List) => {
                    made.insert(Some(counter), Made::List(Vec::new()));
                    Slot::Object(counter)
                }
                _ => return None,
            };
            match (made.get_mut(&object)?, &operation.key, operation.insert) {
                (Made::Map(entries), Key::Map(key), false) => {
                    if entries.insert(key.as_str(), slot).is_some() {
                        return None;
                    }
                }
                (Made::List(elements), Key::Seq(after), true) => {
                    let after = match after {
                        ElementId::Head => None,
                        ElementId::Id(id) => {
                            let after = own_counter(id, actor)?;
                            // An element follows one inserted before it in the same list.
                            if lists_of_elements.get(&after) != Some(&object) {
                                return None;
                            }
                            Some(after)
                        }
                    };
                    elements.push((after, counter, slot));
                    lists_of_elements.insert(counter, object);
                }
                _ => return None,
            }
            counter = counter.checked_add(1)?;
        }
        Some(Objects { made })
    }

    /// The JSON of `slot` at nesting `depth` (a top-level field is 1), as `json::read_value`
    /// reads it from the built document.
    fn render(&self, slot: &Slot<'change>, depth: usize) -> Option<Value> {
        if depth > DEPTH_MAX {
            return None;
        }
        let object = match slot {
            Slot::Scalar(scalar) => return Some(json::scalar_to_json(scalar)),
            Slot::Object(object) => self.made.get(&Some(*object))?,
        };
        match object {
            Made::Map(entries) => {
                let mut map = Map::new();
                for (key, slot) in entries {
                    map.insert((*key).to_owned(), self.render(slot, depth + 1)?);
                }
                Some(Value::Object(map))
            }
            Made::List(elements) => {
                let mut items = Vec::with_capacity(elements.len());
                for slot in list_order(elements)? {
                    items.push(self.render(slot, depth + 1)?);
                }
                Some(Value::Array(items))
            }
        }
    }
}

/// The counter of an operation id of this change, or `None` for another actor's.
fn own_counter(id: &OpId, actor: &ActorId) -> Option<u64> {
    (id.actor() == actor).then(|| id.counter())
}

/// A list's elements in automerge's order (RGA): each element directly follows the one it was
/// inserted after, and of elements inserted after the same one, the later insertion (the higher
/// operation id) comes first. That is a pre-order walk of the tree of insertions, children by
/// descending id, done with a stack so a long list cannot exhaust the call stack.
fn list_order<'list, 'change>(
    elements: &'list [(Option<u64>, u64, Slot<'change>)],
) -> Option<Vec<&'list Slot<'change>>> {
    let mut children: HashMap<Option<u64>, Vec<usize>> = HashMap::new();
    for (index, (after, _, _)) in elements.iter().enumerate() {
        children.entry(*after).or_default().push(index);
    }
    // Insertion order is ascending id, so pushing children in that order pops the highest first.
    let mut stack: Vec<usize> = children.get(&None).cloned().unwrap_or_default();
    let mut ordered = Vec::with_capacity(elements.len());
    while let Some(index) = stack.pop() {
        let (_, element, slot) = &elements[index];
        ordered.push(slot);
        if let Some(after) = children.get(&Some(*element)) {
            stack.extend_from_slice(after);
        }
    }
    (ordered.len() == elements.len()).then_some(ordered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Timestamp;
    use crate::identity::OriginId;
    use crate::key::RecordKey;
    use crate::record::{Operation, WriteOptions};

    /// The header look agrees with the full parse on what names dependencies, and turns away
    /// nothing else.
    #[test]
    fn the_header_look_turns_away_changes_with_dependencies_only() {
        let key = RecordKey::new("orders", "o1").expect("a valid key");
        let origin = OriginId([4; 16]);
        let mut record = Record::default();
        let mut changes = Vec::new();
        for (wall_ms, fields) in [(1, serde_json::json!({"n": 1})), (2, serde_json::json!({"m": 2}))] {
            let operation = Operation::MergePatch(fields.as_object().cloned().unwrap_or_default());
            let options = WriteOptions { writer: None, whole_fields: &[] };
            let timestamp = Timestamp { wall_ms, logical: 0 };
            changes.push(record.write_with(&key, &origin, options, timestamp, &operation).unwrap().unwrap());
        }
        let dependencies = |bytes: &[u8]| automerge::Change::try_from(bytes).unwrap().deps().len();
        assert_eq!((dependencies(&changes[0]), dependencies(&changes[1])), (0, 1));
        assert!(!names_dependencies(&changes[0]) && Record::first_change(&changes[0]).is_some());
        assert!(names_dependencies(&changes[1]) && Record::first_change(&changes[1]).is_none());
        // Bytes cut inside the header, or that are no change, are left to the full parse.
        for cut in 0..11 {
            assert!(!names_dependencies(&changes[1][..cut]), "cut at {cut}");
        }
        assert!(!names_dependencies(b"not a change at all"));
    }
}
