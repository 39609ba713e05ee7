//! Collection definitions: per-field policy and schema, and a default policy, parsed from TOML or
//! JSON (the same structure), checked, and encoded as canonical JSON so a definition can be
//! stored as a replicated record. Not here: resolving conflicts (`policy`), validating records
//! (`schema`), or where definitions are stored (the node).
//!
//! ```toml
//! [default]              # optional; lww unless given; lww, latest or priority
//! policy = "lww"
//!
//! [fields.status]
//! policy = "ordered"     # lww, latest, priority, max, min, counter, union, ordered
//! order = ["draft", "approved", "shipped"]
//! type = "string"        # string, number, integer, boolean, object, array
//! required = true
//!
//! [fields.price]
//! policy = "max"
//! type = "number"
//! minimum = 0
//! maximum = 1000000
//!
//! [fields.owner]
//! policy = "priority"
//! priority = ["hq", "store-1", "store-2"]
//!
//! [fields.notes]         # no policy: the default policy
//! type = "string"
//! nullable = true        # null allowed beside the type
//! max_bytes = 4096
//! enum = ["a", "b"]      # (also possible) the only values allowed
//! ```
//!
//! A field's `policy` names how its concurrent values resolve; the other keys are its schema.
//! Unknown keys are refused, so a typo is an error rather than a rule silently not applied.
//!
//! # Storing definitions
//! [`Definition::to_record`] gives the record to store in the system collection
//! [`DEFINITIONS_COLLECTION`] under the collection's name: one field, [`DEFINITION_FIELD`], whose
//! value is the canonical JSON text. One string field, not the structure spread over record
//! fields, so two concurrent definitions of one collection resolve as a whole (the newer write
//! wins, as for any `lww` field) and never merge into a hybrid that neither side wrote.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

use crate::canonical::{canonical, compare_numbers};
use crate::policy::{LIST_MEMBERS_MAX, MEMBER_BYTES_MAX, Policy, PolicyError, PolicyText};
use crate::record::FIELD_BYTES_MAX;
use crate::schema::{FieldType, Schema};

/// The largest definition accepted, in bytes, both as given (TOML or JSON text) and as
/// canonical JSON.
pub const DEFINITION_BYTES_MAX: usize = 64 << 10;
/// The most fields a definition may declare.
pub const FIELDS_MAX: usize = 256;
/// The system collection that holds every collection's definition, one record per collection
/// (record id = collection name). Collections starting with `_` are reserved for the system
/// (see `key`), so clients cannot write it as an ordinary collection.
pub const DEFINITIONS_COLLECTION: &str = "_collections";
/// The field of a definition record that holds the definition's canonical JSON text.
pub const DEFINITION_FIELD: &str = "definition";

/// A collection's rules: how each field's concurrent values resolve and what values it accepts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Definition {
    /// The policy of every field that names none, declared or not. `lww`, `latest` or
    /// `priority`: the policies that make sense for a value of any type.
    pub default_policy: Policy,
    /// Declared fields by name (top-level record fields).
    pub fields: BTreeMap<String, Field>,
}

/// One declared field.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Field {
    /// The field's policy; `None` follows the definition's default policy.
    pub policy: Option<Policy>,
    pub schema: Schema,
}

/// Why a definition was refused. Nothing was stored or changed. `field` is `None` for the
/// `[default]` table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefinitionError {
    #[error("definition is {0} bytes; the limit is {DEFINITION_BYTES_MAX}")]
    TooLarge(usize),
    /// The text is not TOML or JSON of the definition's shape: unknown keys, wrong value types.
    #[error("definition does not parse: {0}")]
    Syntax(String),
    #[error("definition declares {0} fields; the limit is {FIELDS_MAX}")]
    TooManyFields(usize),
    #[error("a field name is empty or longer than {FIELD_BYTES_MAX} bytes ({0} bytes)")]
    FieldName(usize),
    #[error("{}: {source}", place(.field))]
    Policy { field: Option<String>, source: PolicyError },
    #[error("the default policy must be lww, latest or priority, not {0}")]
    DefaultPolicy(&'static str),
    #[error("{}: unknown type {kind:?}; the types are string, number, integer, boolean, object and array", place(.field))]
    UnknownType { field: Option<String>, kind: String },
    #[error("{}: policy {policy} does not work on {kind} values", place(.field))]
    PolicyType { field: Option<String>, policy: &'static str, kind: &'static str },
    #[error("{}: {constraint} does not apply to {kind} fields", place(.field))]
    Constraint { field: Option<String>, constraint: &'static str, kind: &'static str },
    #[error("{}: minimum {minimum} is greater than maximum {maximum}", place(.field))]
    Range { field: Option<String>, minimum: Number, maximum: Number },
    #[error("{}: enum member {member} is not allowed: {reason}", place(.field))]
    EnumMember { field: Option<String>, member: String, reason: String },
    #[error("{}: lattice member {member} breaks the field's own schema: {reason}", place(.field))]
    LatticeMember { field: Option<String>, member: String, reason: String },
}

fn place(field: &Option<String>) -> String {
    match field {
        Some(name) => format!("field {name:?}"),
        None => "the default policy".to_owned(),
    }
}

/// The shape of a definition in TOML and JSON.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DefinitionText {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    default: Option<PolicyText>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    fields: BTreeMap<String, FieldText>,
}

/// The shape of one field in TOML and JSON: its policy and parameters, then its schema.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FieldText {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    priority: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    order: Option<Vec<Value>>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    nullable: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    required: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    minimum: Option<Number>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    maximum: Option<Number>,
    #[serde(default, rename = "enum", skip_serializing_if = "Option::is_none")]
    values: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_items: Option<u64>,
}

fn is_false(flag: &bool) -> bool {
    !flag
}

impl Definition {
    /// Parses and checks a definition written in TOML.
    pub fn from_toml(text: &str) -> Result<Definition, DefinitionError> {
        check_size(text.len())?;
        let parsed: DefinitionText =
            toml::from_str(text).map_err(|error| DefinitionError::Syntax(error.to_string()))?;
        Definition::from_text(parsed)
    }

    /// Parses and checks a definition written in JSON: the same structure as TOML, and the
    /// form [`Definition::encode`] writes.
    pub fn from_json(text: &str) -> Result<Definition, DefinitionError> {
        check_size(text.len())?;
        let parsed: DefinitionText =
            serde_json::from_str(text).map_err(|error| DefinitionError::Syntax(error.to_string()))?;
        Definition::from_text(parsed)
    }

    /// The canonical JSON text: keys sorted, no whitespace, defaults left out. Equal definitions
    /// give equal text, and [`Definition::from_json`] reads it back.
    pub fn encode(&self) -> String {
        // Plain data with string keys always converts to a JSON value.
        canonical(&serde_json::to_value(self.to_text()).unwrap_or(Value::Null))
    }

    /// The canonical text's blake3 digest: equal definitions, equal digests.
    pub fn digest(&self) -> [u8; 32] {
        *blake3::hash(self.encode().as_bytes()).as_bytes()
    }

    /// The record to store in [`DEFINITIONS_COLLECTION`]: `{"definition": "<canonical JSON>"}`.
    pub fn to_record(&self) -> Map<String, Value> {
        let mut record = Map::new();
        record.insert(DEFINITION_FIELD.to_owned(), Value::String(self.encode()));
        record
    }

    /// The definition held by a record of [`DEFINITIONS_COLLECTION`], checked again: a stored
    /// definition comes from a peer or the disk.
    pub fn from_record(record: &Map<String, Value>) -> Result<Definition, DefinitionError> {
        match record.get(DEFINITION_FIELD) {
            Some(Value::String(text)) => Definition::from_json(text),
            _ => Err(DefinitionError::Syntax(format!("the record has no string field {DEFINITION_FIELD:?}"))),
        }
    }

    /// The policy of top-level field `field`.
    pub fn policy(&self, field: &str) -> &Policy {
        self.fields.get(field).and_then(|field| field.policy.as_ref()).unwrap_or(&self.default_policy)
    }

    /// The policy for a conflict at JSON Pointer `pointer` (as `json::Conflict::field` gives it).
    /// At a top-level field (`/price`) it is the field's policy. Deeper (`/address/city`), it is
    /// the top-level field's policy when that policy judges writes rather than values (`lww`,
    /// `latest`, `priority`), and the default policy otherwise: a `union` field's conflicting
    /// element, or a member of a `max` field's object, is not a value that policy can rank.
    pub fn policy_at(&self, pointer: &str) -> &Policy {
        let Some(path) = pointer.strip_prefix('/') else { return &self.default_policy };
        let (top, deeper) = match path.split_once('/') {
            Some((top, _)) => (top, true),
            None => (path, false),
        };
        let field = top.replace("~1", "/").replace("~0", "~");
        let policy = self.policy(&field);
        if deeper && !matches!(policy, Policy::Lww | Policy::Latest | Policy::Priority(_)) {
            return &self.default_policy;
        }
        policy
    }

    /// Checks a definition built in code as the parsers check what they read.
    pub fn check(&self) -> Result<(), DefinitionError> {
        Definition::from_text(self.to_text()).map(|_| ())
    }

    fn to_text(&self) -> DefinitionText {
        let default = (self.default_policy != Policy::Lww).then(|| PolicyText::from(&self.default_policy));
        let fields = self.fields.iter().map(|(name, field)| (name.clone(), field_text(field))).collect();
        DefinitionText { default, fields }
    }

    fn from_text(text: DefinitionText) -> Result<Definition, DefinitionError> {
        if text.fields.len() > FIELDS_MAX {
            return Err(DefinitionError::TooManyFields(text.fields.len()));
        }
        let default_policy = match text.default {
            None => Policy::Lww,
            Some(default) => {
                let policy = Policy::from_parts(&default.policy, default.priority, default.order)
                    .map_err(|source| DefinitionError::Policy { field: None, source })?;
                if !matches!(policy, Policy::Lww | Policy::Latest | Policy::Priority(_)) {
                    return Err(DefinitionError::DefaultPolicy(policy.name()));
                }
                policy
            }
        };
        let mut fields = BTreeMap::new();
        for (name, field) in text.fields {
            if name.is_empty() || name.len() > FIELD_BYTES_MAX {
                return Err(DefinitionError::FieldName(name.len()));
            }
            let field = parse_field(&name, field)?;
            fields.insert(name, field);
        }
        let definition = Definition { default_policy, fields };
        check_size(definition.encode().len())?;
        Ok(definition)
    }
}

fn check_size(bytes: usize) -> Result<(), DefinitionError> {
    if bytes > DEFINITION_BYTES_MAX {
        return Err(DefinitionError::TooLarge(bytes));
    }
    Ok(())
}

fn field_text(field: &Field) -> FieldText {
    let policy = field.policy.as_ref().map(PolicyText::from);
    let schema = &field.schema;
    FieldText {
        policy: policy.as_ref().map(|policy| policy.policy.clone()),
        priority: policy.as_ref().and_then(|policy| policy.priority.clone()),
        order: policy.and_then(|policy| policy.order),
        kind: schema.kind.map(|kind| kind.name().to_owned()),
        nullable: schema.nullable,
        required: schema.required,
        minimum: schema.minimum.clone(),
        maximum: schema.maximum.clone(),
        values: schema.values.clone(),
        max_bytes: schema.bytes_max,
        max_items: schema.items_max,
    }
}

/// Builds and checks one field: its policy, its schema, that they fit together, and that the
/// enum and lattice members keep the schema.
fn parse_field(name: &str, text: FieldText) -> Result<Field, DefinitionError> {
    let at = || Some(name.to_owned());
    let policy = match text.policy {
        Some(policy) => Some(
            Policy::from_parts(&policy, text.priority, text.order)
                .map_err(|source| DefinitionError::Policy { field: at(), source })?,
        ),
        None if text.priority.is_some() || text.order.is_some() => {
            let parameter = if text.priority.is_some() { "priority" } else { "order" };
            let source = PolicyError::Unexpected { policy: "(default)", parameter };
            return Err(DefinitionError::Policy { field: at(), source });
        }
        None => None,
    };
    let kind = match text.kind {
        Some(kind) => Some(FieldType::from_name(&kind).ok_or(DefinitionError::UnknownType { field: at(), kind })?),
        None => None,
    };
    let schema = Schema {
        kind,
        nullable: text.nullable,
        required: text.required,
        minimum: text.minimum,
        maximum: text.maximum,
        values: text.values,
        bytes_max: text.max_bytes,
        items_max: text.max_items,
    };
    check_constraints(name, &schema)?;
    if let Some(policy) = &policy {
        check_policy_type(name, policy, schema.kind)?;
    }
    check_enum(name, &schema)?;
    if let Some(Policy::Ordered(members)) = &policy {
        for member in members {
            schema.check(name, member).map_err(|violation| DefinitionError::LatticeMember {
                field: at(),
                member: canonical(member),
                reason: violation.message,
            })?;
        }
    }
    Ok(Field { policy, schema })
}

/// Refuses constraints that can never apply to the declared type, and an empty range.
fn check_constraints(name: &str, schema: &Schema) -> Result<(), DefinitionError> {
    let kind_name = schema.kind.map_or("untyped", FieldType::name);
    let refuse =
        |constraint| Err(DefinitionError::Constraint { field: Some(name.to_owned()), constraint, kind: kind_name });
    let numeric = matches!(schema.kind, None | Some(FieldType::Number | FieldType::Integer));
    if schema.minimum.is_some() && !numeric {
        return refuse("minimum");
    }
    if schema.maximum.is_some() && !numeric {
        return refuse("maximum");
    }
    if schema.items_max.is_some() && !matches!(schema.kind, None | Some(FieldType::Array)) {
        return refuse("max_items");
    }
    if schema.nullable && schema.kind.is_none() {
        return refuse("nullable");
    }
    if let (Some(minimum), Some(maximum)) = (&schema.minimum, &schema.maximum)
        && compare_numbers(minimum, maximum).is_gt()
    {
        return Err(DefinitionError::Range {
            field: Some(name.to_owned()),
            minimum: minimum.clone(),
            maximum: maximum.clone(),
        });
    }
    Ok(())
}

/// Refuses a policy that cannot rank the declared type's values.
fn check_policy_type(name: &str, policy: &Policy, kind: Option<FieldType>) -> Result<(), DefinitionError> {
    let Some(kind) = kind else { return Ok(()) };
    let fits = match policy {
        Policy::Max | Policy::Min | Policy::Counter => matches!(kind, FieldType::Number | FieldType::Integer),
        Policy::Union => kind == FieldType::Array,
        Policy::Ordered(_) => !matches!(kind, FieldType::Object | FieldType::Array),
        Policy::Lww | Policy::Latest | Policy::Priority(_) => true,
    };
    if fits {
        return Ok(());
    }
    Err(DefinitionError::PolicyType { field: Some(name.to_owned()), policy: policy.name(), kind: kind.name() })
}

/// Checks `enum`: 1 to [`LIST_MEMBERS_MAX`] distinct scalar members (`null` included), each at
/// most [`MEMBER_BYTES_MAX`] bytes of JSON, each keeping the rest of the schema.
fn check_enum(name: &str, schema: &Schema) -> Result<(), DefinitionError> {
    let Some(values) = &schema.values else { return Ok(()) };
    let refuse = |member: String, reason: String| {
        Err(DefinitionError::EnumMember { field: Some(name.to_owned()), member, reason })
    };
    if values.is_empty() {
        return refuse("(none)".to_owned(), "enum is empty".to_owned());
    }
    if values.len() > LIST_MEMBERS_MAX {
        return refuse(format!("{} members", values.len()), format!("the limit is {LIST_MEMBERS_MAX}"));
    }
    let without_enum = Schema { values: None, ..schema.clone() };
    for (index, member) in values.iter().enumerate() {
        let text = canonical(member);
        if matches!(member, Value::Array(_) | Value::Object(_)) {
            return refuse(text, "enum members are strings, numbers, booleans or null".to_owned());
        }
        if text.len() > MEMBER_BYTES_MAX {
            return refuse(text, format!("an enum member is at most {MEMBER_BYTES_MAX} bytes of JSON"));
        }
        if values[..index].contains(member) {
            return refuse(text, "it is listed twice".to_owned());
        }
        if let Err(violation) = without_enum.check(name, member) {
            return refuse(text, violation.message);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The example of issue 6.
    const EXAMPLE: &str = r#"
        [fields.status]
        policy = "ordered"
        order = ["draft", "approved", "shipped"]
        type = "string"
        required = true
        [fields.price]
        policy = "max"
        type = "number"
        minimum = 0
        maximum = 1000000
        [fields.owner]
        policy = "priority"
        priority = ["hq", "store-1", "store-2"]
        [fields.tags]
        policy = "union"
        type = "array"
        max_items = 64
        [fields.visits]
        policy = "counter"
        [fields.updated]
        policy = "latest"
        [fields.notes]
        type = "string"
        max_bytes = 4096
    "#;

    fn error_of_toml(text: &str) -> DefinitionError {
        Definition::from_toml(text).expect_err("the definition is refused")
    }

    #[test]
    fn the_issue_example_parses_into_policies_and_schemas() {
        let definition = Definition::from_toml(EXAMPLE).expect("valid");
        assert_eq!(definition.default_policy, Policy::Lww);
        assert_eq!(definition.fields.len(), 7);
        let status = &definition.fields["status"];
        assert_eq!(status.policy, Some(Policy::Ordered(vec![json!("draft"), json!("approved"), json!("shipped")])));
        assert_eq!(status.schema.kind, Some(FieldType::String));
        assert!(status.schema.required);
        let price = &definition.fields["price"].schema;
        assert_eq!((price.minimum.clone(), price.maximum.clone()), (Some(0.into()), Some(1_000_000.into())));
        assert_eq!(
            definition.policy("owner"),
            &Policy::Priority(vec!["hq".into(), "store-1".into(), "store-2".into()])
        );
        assert_eq!(definition.policy("tags"), &Policy::Union);
        assert_eq!(definition.fields["tags"].schema.items_max, Some(64));
        assert_eq!(definition.policy("visits"), &Policy::Counter);
        assert_eq!(definition.policy("updated"), &Policy::Latest);
        assert_eq!(definition.policy("notes"), &Policy::Lww);
        assert_eq!(definition.fields["notes"].schema.bytes_max, Some(4096));
        assert_eq!(definition.policy("undeclared"), &Policy::Lww);
    }

    #[test]
    fn toml_and_json_give_the_same_definition_and_the_encoding_is_canonical() {
        let from_toml = Definition::from_toml(EXAMPLE).expect("valid");
        let encoded = from_toml.encode();
        let from_json = Definition::from_json(&encoded).expect("its own encoding parses");
        assert_eq!(from_json, from_toml);
        assert_eq!(from_json.encode(), encoded);
        assert_eq!(from_json.digest(), from_toml.digest());
        assert!(encoded.starts_with(r#"{"fields":{"notes":{"max_bytes":4096,"type":"string"},"owner":"#), "{encoded}");
        // The same definition written differently, in JSON with whitespace and another key order.
        let spaced = r#"{ "fields": { "visits": {"policy": "counter"}, "updated": {"policy": "latest"},
            "notes": {"type": "string", "max_bytes": 4096, "required": false},
            "status": {"required": true, "type": "string", "policy": "ordered", "order": ["draft", "approved", "shipped"]},
            "price": {"policy": "max", "type": "number", "minimum": 0, "maximum": 1000000},
            "owner": {"policy": "priority", "priority": ["hq", "store-1", "store-2"]},
            "tags": {"policy": "union", "type": "array", "max_items": 64} } }"#;
        assert_eq!(Definition::from_json(spaced).expect("valid").encode(), encoded);
        assert_eq!(Definition::default().encode(), "{}");
    }

    #[test]
    fn definitions_round_trip_through_their_record() {
        let definition =
            Definition::from_toml("[default]\npolicy = \"priority\"\npriority = [\"hq\"]\n").expect("valid");
        let record = definition.to_record();
        assert_eq!(record[DEFINITION_FIELD], json!(r#"{"default":{"policy":"priority","priority":["hq"]}}"#));
        assert_eq!(Definition::from_record(&record), Ok(definition));
        assert!(matches!(Definition::from_record(&Map::new()), Err(DefinitionError::Syntax(_))));
        assert!(crate::key::RecordKey::new(DEFINITIONS_COLLECTION, "orders").is_ok());
    }

    #[test]
    fn policy_at_follows_json_pointers() {
        let definition = Definition::from_toml(
            "[default]\npolicy = \"latest\"\n[fields.owner]\npolicy = \"priority\"\npriority = [\"hq\"]\n\
             [fields.tags]\npolicy = \"union\"\n[fields.\"a/b\"]\npolicy = \"max\"\n",
        )
        .expect("valid");
        assert_eq!(definition.policy_at("/owner"), definition.policy("owner"));
        assert_eq!(definition.policy_at("/owner/name"), definition.policy("owner"));
        assert_eq!(definition.policy_at("/tags"), &Policy::Union);
        assert_eq!(definition.policy_at("/tags/0"), &Policy::Latest);
        assert_eq!(definition.policy_at("/a~1b"), &Policy::Max);
        assert_eq!(definition.policy_at("/other"), &Policy::Latest);
        assert_eq!(definition.policy_at(""), &Policy::Latest);
    }

    #[test]
    fn mistakes_are_named() {
        let policy_error = |text: &str| match error_of_toml(text) {
            DefinitionError::Policy { field, source } => (field, source),
            other => panic!("expected a policy error, got {other}"),
        };
        let (field, source) = policy_error("[fields.a]\npolicy = \"newest\"\n");
        assert_eq!((field.as_deref(), source), (Some("a"), PolicyError::Unknown("newest".into())));
        let (_, source) = policy_error("[fields.a]\npolicy = \"ordered\"\norder = [\"x\", \"y\", \"x\"]\n");
        assert_eq!(source, PolicyError::Duplicate { parameter: "order", member: "\"x\"".into() });
        let (_, source) = policy_error("[fields.a]\npolicy = \"priority\"\npriority = []\n");
        assert_eq!(source, PolicyError::Empty { parameter: "priority" });
        let (_, source) = policy_error("[fields.a]\npolicy = \"ordered\"\n");
        assert_eq!(source, PolicyError::Missing { policy: "ordered", parameter: "order" });
        let (_, source) = policy_error("[fields.a]\norder = [1]\n");
        assert!(matches!(source, PolicyError::Unexpected { parameter: "order", .. }));
        let (field, _) = policy_error("[default]\npolicy = \"bogus\"\n");
        assert_eq!(field, None);

        assert_eq!(error_of_toml("[default]\npolicy = \"max\"\n"), DefinitionError::DefaultPolicy("max"));
        assert!(matches!(error_of_toml("[fields.a]\ntype = \"text\"\n"), DefinitionError::UnknownType { .. }));
        assert!(matches!(
            error_of_toml("[fields.a]\npolicy = \"max\"\ntype = \"string\"\n"),
            DefinitionError::PolicyType { .. }
        ));
        assert!(matches!(
            error_of_toml("[fields.a]\npolicy = \"union\"\ntype = \"object\"\n"),
            DefinitionError::PolicyType { .. }
        ));
        assert!(matches!(
            error_of_toml("[fields.a]\npolicy = \"counter\"\ntype = \"boolean\"\n"),
            DefinitionError::PolicyType { .. }
        ));
        assert!(matches!(
            error_of_toml("[fields.a]\ntype = \"string\"\nminimum = 1\n"),
            DefinitionError::Constraint { constraint: "minimum", kind: "string", .. }
        ));
        assert!(matches!(
            error_of_toml("[fields.a]\ntype = \"string\"\nmax_items = 1\n"),
            DefinitionError::Constraint { constraint: "max_items", .. }
        ));
        assert!(matches!(
            error_of_toml("[fields.a]\nnullable = true\n"),
            DefinitionError::Constraint { constraint: "nullable", .. }
        ));
        assert!(matches!(error_of_toml("[fields.a]\nminimum = 5\nmaximum = 4.5\n"), DefinitionError::Range { .. }));
        assert!(matches!(error_of_toml("[fields.a]\nenum = []\n"), DefinitionError::EnumMember { .. }));
        assert!(matches!(error_of_toml("[fields.a]\nenum = [1, 1]\n"), DefinitionError::EnumMember { .. }));
        assert!(matches!(error_of_toml("[fields.a]\nenum = [[1]]\n"), DefinitionError::EnumMember { .. }));
        assert!(matches!(
            error_of_toml("[fields.a]\ntype = \"string\"\nenum = [\"a\", 2]\n"),
            DefinitionError::EnumMember { .. }
        ));
        assert!(matches!(
            error_of_toml("[fields.a]\npolicy = \"ordered\"\norder = [\"low\", 5]\ntype = \"string\"\n"),
            DefinitionError::LatticeMember { .. }
        ));
        assert!(matches!(
            error_of_toml("[fields.a]\npolicy = \"ordered\"\norder = [1, 20]\ntype = \"integer\"\nmaximum = 10\n"),
            DefinitionError::LatticeMember { .. }
        ));
        // A typo is an error, not a rule silently left out.
        assert!(matches!(error_of_toml("[fields.a]\npolcy = \"max\"\n"), DefinitionError::Syntax(_)));
        assert!(matches!(error_of_toml("name = \"orders\"\n"), DefinitionError::Syntax(_)));
        assert!(matches!(error_of_toml("[fields.a]\nmax_bytes = -1\n"), DefinitionError::Syntax(_)));
        assert!(matches!(Definition::from_json("[1]"), Err(DefinitionError::Syntax(_))));
        assert!(matches!(error_of_toml("[fields.\"\"]\n"), DefinitionError::FieldName(0)));
    }

    #[test]
    fn error_messages_say_where() {
        let message = error_of_toml("[fields.a]\npolicy = \"ordered\"\norder = [\"x\", \"x\"]\n").to_string();
        assert_eq!(message, "field \"a\": \"order\" names \"x\" twice");
        let message = error_of_toml("[default]\npolicy = \"priority\"\npriority = []\n").to_string();
        assert_eq!(message, "the default policy: \"priority\" is empty");
    }

    #[test]
    fn size_and_field_count_are_limited() {
        let too_many: String = (0..=FIELDS_MAX).map(|index| format!("[fields.f{index}]\n")).collect();
        assert_eq!(error_of_toml(&too_many), DefinitionError::TooManyFields(FIELDS_MAX + 1));
        let enough: String = (0..FIELDS_MAX).map(|index| format!("[fields.f{index}]\n")).collect();
        assert_eq!(Definition::from_toml(&enough).map(|definition| definition.fields.len()), Ok(FIELDS_MAX));
        let large = format!("# {}\n", "x".repeat(DEFINITION_BYTES_MAX));
        assert_eq!(error_of_toml(&large), DefinitionError::TooLarge(large.len()));
        assert!(matches!(
            Definition::from_json(&" ".repeat(DEFINITION_BYTES_MAX + 1)),
            Err(DefinitionError::TooLarge(_))
        ));
        // The canonical encoding is limited too, which a definition built in code can exceed.
        let nodes: Vec<String> = (0..LIST_MEMBERS_MAX).map(|index| format!("{index:0>200}")).collect();
        let policy = Policy::priority(nodes).expect("valid");
        let field = Field { policy: Some(policy), schema: Schema::default() };
        let mut definition = Definition::default();
        definition.fields.insert("a".into(), field.clone());
        assert_eq!(definition.check(), Ok(()));
        definition.fields.insert("b".into(), field);
        assert!(matches!(definition.check(), Err(DefinitionError::TooLarge(bytes)) if bytes > DEFINITION_BYTES_MAX));
    }

    #[test]
    fn definitions_built_in_code_are_checked_too() {
        let mut definition = Definition::default();
        definition
            .fields
            .insert("a".into(), Field { policy: Some(Policy::Ordered(vec![])), schema: Schema::default() });
        assert!(definition.check().is_err());
        definition.fields.insert("a".into(), Field { policy: Some(Policy::Max), schema: Schema::default() });
        assert_eq!(definition.check(), Ok(()));
    }
}
