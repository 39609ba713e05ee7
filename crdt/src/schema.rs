//! Schema validation: whether a record's value (a JSON object) keeps what its collection
//! declares for each field: type, whether `null` is allowed, presence, numeric range, enum
//! members, lattice membership, and sizes. A refusal is a [`Violation`] that names the field and
//! the rule, ready for a 422 body. Not here: parsing definitions (`collection`) or deciding what
//! happens to a refused change (the node answers 422 to a client and quarantines a peer's change).
//!
//! | rule        | declared as                | holds when                                                  |
//! |-------------|----------------------------|-------------------------------------------------------------|
//! | `required`  | `required = true`          | the field is present (a present `null` is checked by `type`)|
//! | `type`      | `type = "string"` ...      | the value is of the type; `null` only with `nullable = true`|
//! | `enum`      | `enum = [...]`             | the value equals a member (exact JSON equality)             |
//! | `order`     | `policy = "ordered"` with a `type` | the value is a member of the lattice                |
//! | `minimum`   | `minimum = n`              | a number is at least `n` (other values: see `type`)         |
//! | `maximum`   | `maximum = n`              | a number is at most `n`                                     |
//! | `max_bytes` | `max_bytes = n`            | a string has at most `n` UTF-8 bytes; any other value at most `n` bytes of canonical JSON |
//! | `max_items` | `max_items = n`            | an array has at most `n` elements                           |
//!
//! Fields the definition does not name are not checked. Types: `integer` is a number without a
//! fractional part (`2.0` is an integer, as in JSON Schema); `number` is any number.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

use crate::canonical::{canonical, compare_numbers};
use crate::collection::{Definition, Field};
use crate::policy::Policy;

/// The JSON type a field must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    String,
    Number,
    Integer,
    Boolean,
    Object,
    Array,
}

impl FieldType {
    /// The type named `name` as definitions spell it.
    pub fn from_name(name: &str) -> Option<FieldType> {
        Some(match name {
            "string" => FieldType::String,
            "number" => FieldType::Number,
            "integer" => FieldType::Integer,
            "boolean" => FieldType::Boolean,
            "object" => FieldType::Object,
            "array" => FieldType::Array,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Number => "number",
            FieldType::Integer => "integer",
            FieldType::Boolean => "boolean",
            FieldType::Object => "object",
            FieldType::Array => "array",
        }
    }

    /// Whether `value` is of this type (`null` never is).
    pub fn admits(self, value: &Value) -> bool {
        match (self, value) {
            (FieldType::String, Value::String(_))
            | (FieldType::Number, Value::Number(_))
            | (FieldType::Boolean, Value::Bool(_))
            | (FieldType::Object, Value::Object(_))
            | (FieldType::Array, Value::Array(_)) => true,
            (FieldType::Integer, Value::Number(number)) => is_integer(number),
            _ => false,
        }
    }
}

fn is_integer(number: &Number) -> bool {
    number.is_i64() || number.is_u64() || number.as_f64().is_some_and(|float| float.fract() == 0.0)
}

impl fmt::Display for FieldType {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// What one field declares about its values. The default declares nothing: any value, or none.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Schema {
    /// The type values must have; `None` allows any.
    pub kind: Option<FieldType>,
    /// Whether `null` is allowed beside `kind` (only meaningful with a `kind`).
    pub nullable: bool,
    /// Whether the field must be present.
    pub required: bool,
    /// The smallest number allowed, inclusive.
    pub minimum: Option<Number>,
    /// The greatest number allowed, inclusive.
    pub maximum: Option<Number>,
    /// The only values allowed (`enum` in definitions).
    pub values: Option<Vec<Value>>,
    /// The most UTF-8 bytes of a string, or canonical JSON bytes of any other value (`max_bytes`).
    pub bytes_max: Option<u64>,
    /// The most elements of an array (`max_items`).
    pub items_max: Option<u64>,
}

/// Which declaration a value broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    Required,
    Type,
    Enum,
    Order,
    Minimum,
    Maximum,
    MaxBytes,
    MaxItems,
}

impl Rule {
    /// The rule's name, as definitions spell the declaration.
    pub fn name(self) -> &'static str {
        match self {
            Rule::Required => "required",
            Rule::Type => "type",
            Rule::Enum => "enum",
            Rule::Order => "order",
            Rule::Minimum => "minimum",
            Rule::Maximum => "maximum",
            Rule::MaxBytes => "max_bytes",
            Rule::MaxItems => "max_items",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// A value that breaks its collection's schema. Serializes as the body of a 422 answer:
/// `{"field": "price", "rule": "minimum", "message": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Violation {
    /// The top-level field.
    pub field: String,
    pub rule: Rule,
    /// One sentence for people, naming the field, the rule and the limit.
    pub message: String,
}

/// Checks `record` against `definition`: fields in name order, rules in the order of the module
/// table; the first violation is returned.
pub fn validate(definition: &Definition, record: &Map<String, Value>) -> Result<(), Violation> {
    for (name, field) in &definition.fields {
        match record.get(name) {
            Some(value) => check_field(name, field, value)?,
            None if field.schema.required => {
                return Err(violation(name, Rule::Required, format!("field {name:?} is required")));
            }
            None => {}
        }
    }
    Ok(())
}

/// Checks one present value of field `name` against its declaration, lattice membership
/// included: a field with an `ordered` policy and a declared `type` holds only lattice members
/// (or `null` when nullable). Without a `type`, any value is accepted and values outside the
/// lattice rank lowest.
pub fn check_field(name: &str, field: &Field, value: &Value) -> Result<(), Violation> {
    field.schema.check(name, value)?;
    if let Some(policy @ Policy::Ordered(_)) = &field.policy
        && field.schema.kind.is_some()
        && !value.is_null()
        && policy.lattice_rank(value) == 0
    {
        let message = format!("field {name:?} is {}, which is not in its lattice", describe(value));
        return Err(violation(name, Rule::Order, message));
    }
    Ok(())
}

impl Schema {
    /// Checks a present value of field `name` against every rule but `required` and `order`.
    pub fn check(&self, name: &str, value: &Value) -> Result<(), Violation> {
        self.check_type(name, value)?;
        if value.is_null() && self.kind.is_some() {
            return Ok(());
        }
        if let Some(values) = &self.values
            && !values.contains(value)
        {
            let message = format!("field {name:?} is {}, which is not one of its enum values", describe(value));
            return Err(violation(name, Rule::Enum, message));
        }
        self.check_range(name, value)?;
        self.check_sizes(name, value)
    }

    fn check_type(&self, name: &str, value: &Value) -> Result<(), Violation> {
        let Some(kind) = self.kind else { return Ok(()) };
        if value.is_null() {
            if self.nullable {
                return Ok(());
            }
            return Err(violation(
                name,
                Rule::Type,
                format!("field {name:?} must be {} {kind}, not null", article(kind)),
            ));
        }
        if !kind.admits(value) {
            let message = format!("field {name:?} must be {} {kind}, not {}", article(kind), describe(value));
            return Err(violation(name, Rule::Type, message));
        }
        Ok(())
    }

    fn check_range(&self, name: &str, value: &Value) -> Result<(), Violation> {
        let Value::Number(number) = value else { return Ok(()) };
        if let Some(minimum) = &self.minimum
            && compare_numbers(number, minimum).is_lt()
        {
            return Err(violation(
                name,
                Rule::Minimum,
                format!("field {name:?} is {number}, below its minimum {minimum}"),
            ));
        }
        if let Some(maximum) = &self.maximum
            && compare_numbers(number, maximum).is_gt()
        {
            return Err(violation(
                name,
                Rule::Maximum,
                format!("field {name:?} is {number}, above its maximum {maximum}"),
            ));
        }
        Ok(())
    }

    fn check_sizes(&self, name: &str, value: &Value) -> Result<(), Violation> {
        if let Some(bytes_max) = self.bytes_max {
            let (bytes, what) = match value {
                Value::String(text) => (text.len(), "UTF-8 bytes"),
                other => (canonical(other).len(), "bytes of JSON"),
            };
            if u64::try_from(bytes).unwrap_or(u64::MAX) > bytes_max {
                let message = format!("field {name:?} is {bytes} {what}; its max_bytes is {bytes_max}");
                return Err(violation(name, Rule::MaxBytes, message));
            }
        }
        if let (Some(items_max), Value::Array(items)) = (self.items_max, value)
            && u64::try_from(items.len()).unwrap_or(u64::MAX) > items_max
        {
            let message = format!("field {name:?} has {} items; its max_items is {items_max}", items.len());
            return Err(violation(name, Rule::MaxItems, message));
        }
        Ok(())
    }
}

fn violation(field: &str, rule: Rule, message: String) -> Violation {
    Violation { field: field.to_owned(), rule, message }
}

fn article(kind: FieldType) -> &'static str {
    if matches!(kind, FieldType::Integer | FieldType::Object | FieldType::Array) { "an" } else { "a" }
}

/// A short description of a value for a message: scalars as JSON (strings cut at 64 bytes),
/// objects and arrays by kind.
fn describe(value: &Value) -> String {
    match value {
        Value::Object(_) => "an object".to_owned(),
        Value::Array(_) => "an array".to_owned(),
        Value::String(text) if text.len() > 64 => {
            let mut end = 64;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let quoted = canonical(&Value::String(text[..end].to_owned()));
            // The text ends with an ASCII quote, so cutting it off keeps a char boundary.
            format!("{}…\"", &quoted[..quoted.len() - 1])
        }
        other => canonical(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const DEFINITION: &str = r#"
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
        [fields.quantity]
        type = "integer"
        nullable = true
        [fields.tags]
        policy = "union"
        type = "array"
        max_items = 3
        [fields.notes]
        type = "string"
        max_bytes = 8
        [fields.color]
        enum = ["red", "green", 3]
        [fields.blob]
        max_bytes = 10
        [fields.flag]
        type = "boolean"
        [fields.address]
        type = "object"
        [fields.stage]
        policy = "ordered"
        order = ["a", "b"]
    "#;

    fn definition() -> Definition {
        Definition::from_toml(DEFINITION).expect("the test definition is valid")
    }

    fn check(record: Value) -> Result<(), Violation> {
        let Value::Object(record) = record else { unreachable!("tests pass objects") };
        validate(&definition(), &record)
    }

    fn rule_of(record: Value) -> Option<(String, Rule)> {
        check(record).err().map(|violation| (violation.field, violation.rule))
    }

    #[test]
    fn a_record_that_keeps_every_rule_is_valid() {
        let record = json!({
            "status": "approved", "price": 12.5, "quantity": null, "tags": ["a", "b"], "notes": "short",
            "color": 3, "blob": [1, 2], "flag": false, "address": {"city": "Zürich"}, "stage": "zzz",
            "undeclared": {"anything": [1, 2, 3]}
        });
        assert_eq!(check(record), Ok(()));
        assert_eq!(check(json!({"status": "draft", "quantity": 2.0})), Ok(()));
    }

    #[test]
    fn each_rule_is_named_with_its_field() {
        let some = |field: &str, rule| Some((field.to_owned(), rule));
        assert_eq!(rule_of(json!({})), some("status", Rule::Required));
        assert_eq!(rule_of(json!({"status": null})), some("status", Rule::Type));
        assert_eq!(rule_of(json!({"status": 1})), some("status", Rule::Type));
        assert_eq!(rule_of(json!({"status": "lost"})), some("status", Rule::Order));
        assert_eq!(rule_of(json!({"status": "draft", "price": "1"})), some("price", Rule::Type));
        assert_eq!(rule_of(json!({"status": "draft", "price": -0.5})), some("price", Rule::Minimum));
        assert_eq!(rule_of(json!({"status": "draft", "price": 1000001})), some("price", Rule::Maximum));
        assert_eq!(rule_of(json!({"status": "draft", "quantity": 1.5})), some("quantity", Rule::Type));
        assert_eq!(rule_of(json!({"status": "draft", "tags": [1, 2, 3, 4]})), some("tags", Rule::MaxItems));
        assert_eq!(rule_of(json!({"status": "draft", "notes": "ééééé"})), some("notes", Rule::MaxBytes));
        assert_eq!(rule_of(json!({"status": "draft", "color": "blue"})), some("color", Rule::Enum));
        assert_eq!(rule_of(json!({"status": "draft", "color": 3.0})), some("color", Rule::Enum));
        assert_eq!(rule_of(json!({"status": "draft", "blob": [1, 2, 3, 4, 5]})), some("blob", Rule::MaxBytes));
        assert_eq!(rule_of(json!({"status": "draft", "flag": "yes"})), some("flag", Rule::Type));
        assert_eq!(rule_of(json!({"status": "draft", "address": []})), some("address", Rule::Type));
    }

    #[test]
    fn messages_name_the_field_the_value_and_the_limit() {
        let violation = check(json!({"status": "draft", "price": -3})).expect_err("below the minimum");
        assert_eq!(violation.message, "field \"price\" is -3, below its minimum 0");
        let body = serde_json::to_value(&violation).expect("serializes");
        assert_eq!(body, json!({"field": "price", "rule": "minimum", "message": violation.message}));
        let violation = check(json!({"status": 7})).expect_err("wrong type");
        assert_eq!(violation.message, "field \"status\" must be a string, not 7");
        let violation = check(json!({"status": "x".repeat(100)})).expect_err("not in the lattice");
        assert!(violation.message.starts_with("field \"status\" is \"xxxx"), "{}", violation.message);
        assert!(violation.message.len() < 160, "{}", violation.message);
        let violation = check(json!({"status": "é".repeat(100)})).expect_err("not in the lattice");
        assert!(violation.message.contains('…'), "{}", violation.message);
    }

    #[test]
    fn an_untyped_ordered_field_accepts_strangers() {
        assert_eq!(check(json!({"status": "draft", "stage": {"not": "a member"}})), Ok(()));
    }

    #[test]
    fn integers_follow_json_schema() {
        for value in [json!(1), json!(-1), json!(u64::MAX), json!(2.0), json!(-0.0)] {
            assert!(FieldType::Integer.admits(&value), "{value}");
        }
        for value in [json!(1.5), json!("1"), json!(null)] {
            assert!(!FieldType::Integer.admits(&value), "{value}");
        }
    }
}
