//! Canonical JSON: one text per value (object keys sorted by their UTF-8 bytes, no whitespace),
//! and an exact total order over JSON numbers. Used wherever equal values must give equal bytes
//! or a deterministic order: sets under the `union` policy, enum and lattice membership, stored
//! collection definitions, ledger entries and hashes. Not a general serializer: it writes
//! `serde_json` values only, and does not read.
//!
//! Numbers keep their JSON form: `1` and `1.0` are different texts (the JSON ↔ automerge mapping
//! keeps them apart too), while [`compare_numbers`] finds them equal.

use std::cmp::Ordering;

use serde_json::{Number, Value};

/// The canonical text of `value`: what `serde_json` writes, with object keys sorted and no
/// whitespace. Iterative, so a deeply nested value cannot overflow the stack here.
pub fn canonical(value: &Value) -> String {
    let mut text = String::new();
    write_canonical(value, &mut text);
    text
}

/// One step of the canonical writer's explicit stack.
enum Step<'a> {
    Value(&'a Value),
    Key(&'a str),
    Text(&'static str),
}

/// Appends the canonical text of `value` to `text`.
pub fn write_canonical(value: &Value, text: &mut String) {
    let mut pending = vec![Step::Value(value)];
    while let Some(step) = pending.pop() {
        match step {
            Step::Text(literal) => text.push_str(literal),
            Step::Key(key) => {
                write_string(key, text);
                text.push(':');
            }
            Step::Value(Value::Array(items)) => {
                text.push('[');
                pending.push(Step::Text("]"));
                for (index, item) in items.iter().enumerate().rev() {
                    pending.push(Step::Value(item));
                    if index > 0 {
                        pending.push(Step::Text(","));
                    }
                }
            }
            Step::Value(Value::Object(map)) => {
                text.push('{');
                pending.push(Step::Text("}"));
                let mut keys: Vec<(&String, &Value)> = map.iter().collect();
                keys.sort_by(|left, right| left.0.as_bytes().cmp(right.0.as_bytes()));
                for (index, (key, item)) in keys.into_iter().enumerate().rev() {
                    pending.push(Step::Value(item));
                    pending.push(Step::Key(key));
                    if index > 0 {
                        pending.push(Step::Text(","));
                    }
                }
            }
            Step::Value(Value::String(string)) => write_string(string, text),
            Step::Value(scalar) => text.push_str(&scalar.to_string()),
        }
    }
}

fn write_string(string: &str, text: &mut String) {
    // A string is always valid JSON text, so serde_json's escaping cannot fail.
    text.push_str(&Value::String(string.to_owned()).to_string());
}

/// Compares two JSON numbers by their exact value, whatever their representation: `1` equals
/// `1.0` and `-0.0` equals `0`, and `u64::MAX` is greater than `1.8e19` exactly as it should be.
/// A total order (serde_json numbers are never NaN or infinite).
pub fn compare_numbers(left: &Number, right: &Number) -> Ordering {
    match (integer(left), integer(right)) {
        (Some(left), Some(right)) => left.cmp(&right),
        (Some(left), None) => float_against_integer(float(right), left).reverse(),
        (None, Some(right)) => float_against_integer(float(left), right),
        (None, None) => float(left).partial_cmp(&float(right)).unwrap_or(Ordering::Equal),
    }
}

fn integer(number: &Number) -> Option<i128> {
    number.as_i64().map(i128::from).or_else(|| number.as_u64().map(i128::from))
}

fn float(number: &Number) -> f64 {
    number.as_f64().unwrap_or(0.0)
}

/// Compares a finite float with an integer exactly, without rounding the integer to a float.
fn float_against_integer(float: f64, integer: i128) -> Ordering {
    // 2^127: every integer here (at most u64::MAX in magnitude) is smaller.
    const BOUND: f64 = 1.7014118346046923e38;
    if float >= BOUND {
        return Ordering::Greater;
    }
    if float < -BOUND {
        return Ordering::Less;
    }
    let whole = float.trunc();
    // Exact: `whole` is an integer of magnitude below 2^127.
    #[allow(clippy::cast_possible_truncation, reason = "whole is an integer within the i128 range")]
    let whole_integer = whole as i128;
    whole_integer.cmp(&integer).then_with(|| (float - whole).partial_cmp(&0.0).unwrap_or(Ordering::Equal))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sorts_keys_at_every_depth_and_writes_no_whitespace() {
        let value = json!({"b": [1, {"z": null, "a": "x\"y"}], "a": 1.5, "é": true, "A": {}});
        assert_eq!(canonical(&value), r#"{"A":{},"a":1.5,"b":[1,{"a":"x\"y","z":null}],"é":true}"#);
        assert_eq!(canonical(&json!([])), "[]");
        assert_eq!(canonical(&json!(1.0)), "1.0");
        assert_eq!(canonical(&json!(1)), "1");
    }

    #[test]
    fn canonical_text_parses_back_to_the_same_value() {
        let value = json!({"k": [u64::MAX, i64::MIN, -0.0, 1e300, "\u{0001}", [[]], {"": ""}]});
        let text = canonical(&value);
        assert_eq!(serde_json::from_str::<Value>(&text).ok(), Some(value));
    }

    #[test]
    fn deep_values_do_not_overflow_the_stack() {
        let mut value = json!(0);
        for _ in 0..100_000 {
            value = Value::Array(vec![value]);
        }
        assert_eq!(canonical(&value).len(), 200_001);
        // serde_json drops values recursively; take it apart iteratively instead.
        let mut current = value;
        while let Value::Array(mut items) = current {
            current = items.pop().unwrap_or(Value::Null);
        }
    }

    #[test]
    fn numbers_compare_by_exact_value() {
        let number = |value: Value| match value {
            Value::Number(number) => number,
            _ => unreachable!("the tests pass numbers"),
        };
        let ordered = [
            json!(-1e300),
            json!(i64::MIN),
            json!(-1.5),
            json!(-1),
            json!(0),
            json!(0.5),
            json!(1),
            json!(9007199254740993_u64),
            json!(9007199254740994.0),
            json!(u64::MAX),
            json!(1e300),
        ];
        for (index, left) in ordered.iter().enumerate() {
            for (other, right) in ordered.iter().enumerate() {
                let expected = index.cmp(&other);
                assert_eq!(compare_numbers(&number(left.clone()), &number(right.clone())), expected, "{left} {right}");
            }
        }
        assert_eq!(compare_numbers(&number(json!(1)), &number(json!(1.0))), Ordering::Equal);
        assert_eq!(compare_numbers(&number(json!(-0.0)), &number(json!(0))), Ordering::Equal);
        assert_eq!(compare_numbers(&number(json!(-0.0)), &number(json!(0.0))), Ordering::Equal);
    }
}
