//! Collection definitions in the engine: where they are stored (a replicated system collection),
//! how reads apply their field policies to concurrent values, and how local writes are checked
//! against their schemas.
//!
//! A definition is the record `_collections/NAME` (see `crdt::collection`), so it replicates
//! like any record and every node resolves with the same rules once they have synced. The engine
//! caches parsed definitions and forgets one whenever its record changes, locally or from a
//! peer. Resolution happens at read time, from the set of concurrent values the document keeps
//! (see `docs/policies.md`): nothing is rewritten when a policy changes, and the next read on any
//! node resolves by the new policy.

use std::collections::HashMap;
use std::sync::Arc;

use crdt::clock::Timestamp;
use crdt::collection::{DEFINITIONS_COLLECTION, Definition};
use crdt::key::RecordKey;
use crdt::policy::{Candidate, OperationId, Policy, Resolution, resolve};
use crdt::record::{Operation, Record, RecordView};
use serde_json::{Map, Value};

use super::{Body, Document, Engine, EngineError, WriteOutcome};

/// The most parsed definitions kept; beyond it the cache starts over (they reload on demand).
const CACHED_DEFINITIONS_MAX: usize = 4096;

/// Parsed definitions by collection name; `None` caches "no definition".
#[derive(Default)]
pub(crate) struct Definitions {
    cached: HashMap<String, Option<Arc<Definition>>>,
}

impl Definitions {
    /// Forgets the cached definition of the collection whose definition record `key` is.
    pub(crate) fn changed(&mut self, key: &RecordKey) {
        if key.collection() == DEFINITIONS_COLLECTION {
            self.cached.remove(key.id());
        }
    }
}

/// Whether `collection` is one of Concord's own (names starting with `_`), which clients cannot
/// write through the record API.
pub fn is_system_collection(collection: &str) -> bool {
    collection.starts_with('_')
}

impl Engine {
    /// The definition of `collection`, if one has been defined (here or on any peer this node
    /// has synced with). A definition record that does not parse counts as none, with a warning.
    pub fn definition(&mut self, collection: &str) -> Result<Option<Arc<Definition>>, EngineError> {
        if is_system_collection(collection) {
            return Ok(None);
        }
        if let Some(cached) = self.definitions.cached.get(collection) {
            return Ok(cached.clone());
        }
        let key = RecordKey::new(DEFINITIONS_COLLECTION, collection)
            .map_err(|error| EngineError::Storage(format!("bad collection name: {error}")))?;
        let stored = match self.take_document(&key)? {
            Some(document) => {
                let view = document.body.view(&key);
                self.put_back(key.clone(), document);
                view?.value
            }
            None => None,
        };
        let definition = stored.and_then(|record| match Definition::from_record(&record) {
            Ok(definition) => Some(Arc::new(definition)),
            Err(error) => {
                tracing::warn!(collection, %error, "ignoring a collection definition that does not parse");
                None
            }
        });
        if self.definitions.cached.len() >= CACHED_DEFINITIONS_MAX {
            self.definitions.cached.clear();
        }
        self.definitions.cached.insert(collection.to_owned(), definition.clone());
        Ok(definition)
    }

    /// Stores `definition` as the definition of `collection`: a write to its record in the
    /// system collection, which replicates like any other.
    pub fn define_collection(
        &mut self,
        collection: &str,
        definition: &Definition,
    ) -> Result<WriteOutcome, EngineError> {
        if is_system_collection(collection) {
            return Err(EngineError::SystemCollection(collection.to_owned()));
        }
        let key = RecordKey::new(DEFINITIONS_COLLECTION, collection)
            .and_then(|key| RecordKey::new(collection, "-").map(|_| key))
            .map_err(|error| EngineError::BadRequest(error.to_string()))?;
        let outcome = self.write_document(key.clone(), Operation::Replace(definition.to_record()))?;
        self.definitions.changed(&key);
        Ok(outcome)
    }

    /// A record's view with its collection's policies applied (see [`resolve_view`]).
    pub(super) fn resolved_view(
        &mut self,
        key: &RecordKey,
        document: &Document,
        view: RecordView,
    ) -> Result<RecordView, EngineError> {
        if view.conflicts.is_empty() {
            return Ok(view);
        }
        let definition = self.definition(key.collection())?;
        resolve_view(key, document, definition.as_deref(), view)
    }
}

/// The fields that local writes write whole (see `crdt::record::WriteOptions`): those whose
/// declared policy resolves concurrent values other than automerge's own way.
pub(super) fn whole_fields(definition: Option<&Definition>) -> Vec<String> {
    let Some(definition) = definition else { return Vec::new() };
    definition
        .fields
        .keys()
        .filter(|name| !matches!(definition.policy(name), Policy::Lww | Policy::Counter))
        .cloned()
        .collect()
}

/// A record's view with its collection's policies applied: each top-level field with
/// concurrent values shows the value its policy resolves to. `conflicts` still lists every
/// concurrent value, until a later write supersedes them.
pub(super) fn resolve_view(
    key: &RecordKey,
    document: &Document,
    definition: Option<&Definition>,
    mut view: RecordView,
) -> Result<RecordView, EngineError> {
    if view.conflicts.is_empty() {
        return Ok(view);
    }
    let Body::Record(record) = &document.body else { return Ok(view) };
    let Some(definition) = definition else { return Ok(view) };
    let Some(value) = view.value.as_mut() else { return Ok(view) };
    for conflict in &view.conflicts {
        let Some(field) = top_level_field(&conflict.field) else { continue };
        let policy = definition.policy(&field);
        if matches!(policy, Policy::Lww | Policy::Counter) {
            continue;
        }
        if let Some(resolution) = resolve_field(key, record, &field, policy)? {
            value.insert(field, resolution.value);
        }
    }
    Ok(view)
}

/// Checks a local write against its collection's schema before it is made: the record as it
/// would read afterwards must pass. Deletes always pass.
pub(super) fn check_schema(
    key: &RecordKey,
    document: &Document,
    definition: Option<&Definition>,
    operation: &Operation,
) -> Result<(), EngineError> {
    let Some(definition) = definition else { return Ok(()) };
    if definition.fields.is_empty() {
        return Ok(());
    }
    let mut current = match operation {
        Operation::Delete => return Ok(()),
        Operation::Replace(_) => Map::new(),
        Operation::MergePatch(_) | Operation::Increment { .. } => {
            let view = document.body.view(key)?;
            resolve_view(key, document, Some(definition), view)?.value.unwrap_or_default()
        }
    };
    let after = match operation {
        Operation::Replace(fields) => fields.clone(),
        Operation::MergePatch(patch) => match crdt::json::merge_patch(Some(&Value::Object(current)), patch) {
            Value::Object(after) => after,
            _ => Map::new(),
        },
        Operation::Increment { field, by } => {
            let sum = current.get(field).and_then(Value::as_i64).unwrap_or(0).saturating_add(*by);
            current.insert(field.clone(), Value::from(sum));
            current
        }
        Operation::Delete => return Ok(()),
    };
    crdt::schema::validate(definition, &after).map_err(|violation| EngineError::Invalid(Box::new(violation)))
}

impl Engine {
    /// Checks a change from elsewhere against its collection's schema before it is applied:
    /// applied to a copy of the record, the record must still pass (a deleted one always does).
    /// Costs a copy of the record, so only for collections whose definition declares fields.
    pub(super) fn check_peer_schema(
        &mut self,
        document: &Document,
        envelope: &crdt::envelope::Envelope,
    ) -> Result<(), EngineError> {
        let Body::Record(record) = &document.body else { return Ok(()) };
        if envelope.kind != crdt::envelope::DocumentKind::Record {
            return Ok(());
        }
        let Some(definition) = self.definition(envelope.key.collection())? else { return Ok(()) };
        if definition.fields.is_empty() {
            return Ok(());
        }
        let mut trial = record.as_ref().clone();
        // Bytes that do not apply are refused by the apply itself, with its own reason.
        if trial.apply_changes(&envelope.change).is_err() {
            return Ok(());
        }
        let Ok(view) = trial.view() else { return Ok(()) };
        let Some(value) = view.value else { return Ok(()) };
        crdt::schema::validate(&definition, &value).map_err(|violation| EngineError::Invalid(Box::new(violation)))
    }
}

/// How `field`'s concurrent values in `record` resolve under `policy`. `None` when the field has
/// no value.
pub(crate) fn resolve_field(
    key: &RecordKey,
    record: &Record,
    field: &str,
    policy: &Policy,
) -> Result<Option<Resolution>, EngineError> {
    let candidates = candidates(key, record, field, policy)?;
    Ok(resolve(policy, &candidates))
}

/// `field`'s concurrent values as candidates. Writers and times are read from the changes'
/// metadata only when the policy needs them (`latest`, `priority`), since that walks the history.
pub(crate) fn candidates(
    key: &RecordKey,
    record: &Record,
    field: &str,
    policy: &Policy,
) -> Result<Vec<Candidate>, EngineError> {
    let needs_writer = matches!(policy, Policy::Latest | Policy::Priority(_));
    let values = record
        .concurrent_values(field)
        .map_err(|error| EngineError::Corrupt { key: key.to_string(), reason: error.to_string() })?;
    Ok(values
        .into_iter()
        .map(|concurrent| {
            let (time_ms, writer) =
                if needs_writer { record.operation_writer(&concurrent.actor, concurrent.counter) } else { None }
                    .unwrap_or((0, None));
            // A change without a writer's name (an older node's) ranks as its origin's hex.
            let origin = writer.unwrap_or_else(|| hex::encode(&concurrent.actor));
            Candidate::new(
                concurrent.value,
                &origin,
                Timestamp { wall_ms: time_ms, logical: 0 },
                OperationId::from_lamport(concurrent.counter, &concurrent.actor),
            )
        })
        .collect())
}

/// The field name a JSON Pointer names when it points at a top-level field.
fn top_level_field(pointer: &str) -> Option<String> {
    let field = pointer.strip_prefix('/')?;
    if field.contains('/') {
        return None;
    }
    Some(field.replace("~1", "/").replace("~0", "~"))
}
