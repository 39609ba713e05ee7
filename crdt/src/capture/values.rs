//! Column values between PostgreSQL's text format and record fields, both ways.
//!
//! | PostgreSQL                           | record field                                       |
//! |--------------------------------------|----------------------------------------------------|
//! | `smallint`, `integer`, `bigint`, `oid` | number (integer)                                 |
//! | `real`, `double precision`           | number; `NaN`, `Infinity`, `-Infinity` as strings  |
//! | `numeric`                            | number when a double holds it exactly, else the decimal as a string (no precision is lost) |
//! | `boolean`                            | `true` / `false`                                   |
//! | `json`, `jsonb`                      | the JSON value itself (at most 64 levels deep)     |
//! | one-dimensional arrays               | arrays of the element type's fields; `NULL` elements are `null` |
//! | everything else (`text`, `varchar`, `uuid`, `date`, `timestamp[tz]`, `interval`, `bytea`, ...) | its text form as a string |
//! | `NULL`                               | `null` (so is a JSON `null` in a `json`/`jsonb` column, which goes back as SQL `NULL`) |
//!
//! Arrays with several dimensions or explicit bounds stay strings in PostgreSQL's literal form,
//! so nothing is lost either way. Writing back, a field must have a type the column can take (a
//! string fits any column: PostgreSQL parses it); anything else is a [`ValueError`], which the
//! connector turns into a quarantine entry rather than a guess.

use serde_json::{Number, Value};

use crate::body::kind_of;
use crate::json::check_depth;

/// How a column's values map, by the type's OID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Boolean,
    Integer,
    Float,
    Numeric,
    Json,
    Text,
    /// A one-dimensional array of the element type (by OID).
    Array(u32),
}

fn kind(type_oid: u32) -> Kind {
    match type_oid {
        16 => Kind::Boolean,
        20 | 21 | 23 | 26 => Kind::Integer,
        700 | 701 => Kind::Float,
        1700 => Kind::Numeric,
        114 | 3802 => Kind::Json,
        1000 => Kind::Array(16),
        1005 => Kind::Array(21),
        1007 => Kind::Array(23),
        1016 => Kind::Array(20),
        1028 => Kind::Array(26),
        1021 => Kind::Array(700),
        1022 => Kind::Array(701),
        1231 => Kind::Array(1700),
        199 => Kind::Array(114),
        3807 => Kind::Array(3802),
        // Arrays of types that map to strings: text, varchar, bpchar, name, uuid, date, time,
        // timestamp, timestamptz, interval, bytea.
        1009 => Kind::Array(25),
        1015 => Kind::Array(1043),
        1014 => Kind::Array(1042),
        1003 => Kind::Array(19),
        2951 => Kind::Array(2950),
        1182 => Kind::Array(1082),
        1183 => Kind::Array(1083),
        1115 => Kind::Array(1114),
        1185 => Kind::Array(1184),
        1187 => Kind::Array(1186),
        1001 => Kind::Array(17),
        _ => Kind::Text,
    }
}

/// What a field of this kind should be, for error messages.
fn expected(kind: Kind) -> &'static str {
    match kind {
        Kind::Boolean => "a boolean",
        Kind::Integer => "an integer",
        Kind::Float | Kind::Numeric => "a number",
        Kind::Json => "any JSON value",
        Kind::Text => "a string",
        Kind::Array(_) => "an array",
    }
}

/// Why a value could not be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("the column (type oid {type_oid}) takes {expected}, not {found}")]
    Mismatch { type_oid: u32, expected: &'static str, found: &'static str },
    #[error("PostgreSQL text cannot hold a NUL character")]
    Nul,
    #[error("{text:?} is not {expected}")]
    Unreadable { text: String, expected: &'static str },
    #[error("json column: {0}")]
    Json(String),
}

/// The record field for a column value given in PostgreSQL's text output format.
pub fn to_record_value(type_oid: u32, text: &str) -> Result<Value, ValueError> {
    let kind = kind(type_oid);
    let unreadable = || ValueError::Unreadable { text: text.chars().take(64).collect(), expected: expected(kind) };
    Ok(match kind {
        Kind::Boolean => match text {
            "t" | "true" => Value::Bool(true),
            "f" | "false" => Value::Bool(false),
            _ => return Err(unreadable()),
        },
        Kind::Integer => Value::from(text.parse::<i64>().map_err(|_| unreadable())?),
        Kind::Float => match text {
            "NaN" | "Infinity" | "-Infinity" => Value::String(text.to_owned()),
            _ => {
                let float = text.parse::<f64>().map_err(|_| unreadable())?;
                Number::from_f64(float).map_or_else(|| Value::String(text.to_owned()), Value::Number)
            }
        },
        Kind::Numeric => numeric(text).ok_or_else(unreadable)?,
        Kind::Json => {
            let value: Value = serde_json::from_str(text).map_err(|error| ValueError::Json(error.to_string()))?;
            check_depth(&value).map_err(|error| ValueError::Json(error.to_string()))?;
            value
        }
        Kind::Text => Value::String(text.to_owned()),
        Kind::Array(element) => match parse_array(text) {
            Some(items) => Value::Array(
                items
                    .into_iter()
                    .map(|item| item.map_or(Ok(Value::Null), |item| to_record_value(element, &item)))
                    .collect::<Result<_, _>>()?,
            ),
            None => Value::String(text.to_owned()),
        },
    })
}

/// A `numeric` as a JSON number when a double (or an i64) holds it exactly, else as its decimal
/// string; `None` if it is not a decimal at all.
fn numeric(text: &str) -> Option<Value> {
    if matches!(text, "NaN" | "Infinity" | "-Infinity") {
        return Some(Value::String(text.to_owned()));
    }
    let canonical = canonical_decimal(text)?;
    if !canonical.contains('.') {
        if let Ok(integer) = canonical.parse::<i64>() {
            return Some(Value::from(integer));
        }
        return Some(Value::String(text.to_owned()));
    }
    let float = text.parse::<f64>().ok()?;
    let exact = canonical_decimal(&format!("{float}")).is_some_and(|back| back == canonical);
    Some(match (exact, Number::from_f64(float)) {
        (true, Some(number)) => Value::Number(number),
        _ => Value::String(text.to_owned()),
    })
}

/// A plain decimal (`-12.3400`) without redundant zeros (`-12.34`); `None` if `text` is not one.
fn canonical_decimal(text: &str) -> Option<String> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() && fraction.is_empty()
        || !whole.bytes().chain(fraction.bytes()).all(|byte| byte.is_ascii_digit())
    {
        return None;
    }
    let whole = whole.trim_start_matches('0');
    let fraction = fraction.trim_end_matches('0');
    let mut canonical = String::with_capacity(text.len() + 1);
    if negative && !(whole.is_empty() && fraction.is_empty()) {
        canonical.push('-');
    }
    canonical.push_str(if whole.is_empty() { "0" } else { whole });
    if !fraction.is_empty() {
        canonical.push('.');
        canonical.push_str(fraction);
    }
    Some(canonical)
}

/// The text PostgreSQL should parse for `value` in a column of type `type_oid`; `None` for NULL.
pub fn to_sql_text(type_oid: u32, value: &Value) -> Result<Option<String>, ValueError> {
    let kind = kind(type_oid);
    let mismatch = || ValueError::Mismatch { type_oid, expected: expected(kind), found: kind_of(value) };
    let text = match (kind, value) {
        (_, Value::Null) => return Ok(None),
        (Kind::Json, value) => serde_json::to_string(value).map_err(|error| ValueError::Json(error.to_string()))?,
        (_, Value::String(text)) => text.clone(),
        (Kind::Boolean, Value::Bool(flag)) => if *flag { "t" } else { "f" }.to_owned(),
        (Kind::Integer, Value::Number(number)) => match (number.as_i64(), number.as_u64(), number.as_f64()) {
            (Some(integer), _, _) => integer.to_string(),
            (None, Some(integer), _) => integer.to_string(),
            (None, None, Some(float)) if float.fract() == 0.0 && float.abs() < 9.2e18 => (float as i64).to_string(),
            _ => return Err(mismatch()),
        },
        (Kind::Float | Kind::Numeric, Value::Number(number)) => match (number.as_i64(), number.as_f64()) {
            (Some(integer), _) => integer.to_string(),
            // Rust's shortest round-trip form, never with an exponent, so `numeric` keeps it exact.
            (None, Some(float)) if number.is_f64() => format!("{float}"),
            _ => number.to_string(),
        },
        (Kind::Array(element), Value::Array(items)) => {
            let mut literal = String::from("{");
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    literal.push(',');
                }
                if matches!(item, Value::Array(_)) && self::kind(element) != Kind::Json {
                    // Nested arrays would be a second dimension, which PostgreSQL requires to be
                    // rectangular; they stay strings in the record (see the module docs).
                    return Err(ValueError::Mismatch {
                        type_oid,
                        expected: "a one-dimensional array",
                        found: "a nested array",
                    });
                }
                match to_sql_text(element, item)? {
                    None => literal.push_str("NULL"),
                    Some(text) => quote_element(&mut literal, &text),
                }
            }
            literal.push('}');
            literal
        }
        _ => return Err(mismatch()),
    };
    if text.contains('\0') {
        return Err(ValueError::Nul);
    }
    Ok(Some(text))
}

/// Appends `text` as a double-quoted array element (always valid input for any element type).
fn quote_element(literal: &mut String, text: &str) {
    literal.push('"');
    for character in text.chars() {
        if matches!(character, '"' | '\\') {
            literal.push('\\');
        }
        literal.push(character);
    }
    literal.push('"');
}

/// The elements of a one-dimensional array literal as PostgreSQL's `array_out` writes it
/// (`{1,NULL,"a b","say \"hi\""}`); `None` for anything else (several dimensions, explicit
/// bounds like `[0:1]={...}`, or malformed text), which the caller keeps as a string.
pub fn parse_array(text: &str) -> Option<Vec<Option<String>>> {
    let inner = text.strip_prefix('{')?.strip_suffix('}')?;
    let mut items = Vec::new();
    if inner.is_empty() {
        return Some(items);
    }
    let mut characters = inner.chars().peekable();
    loop {
        if characters.peek() == Some(&'"') {
            characters.next();
            let mut item = String::new();
            loop {
                match characters.next()? {
                    '"' => break,
                    '\\' => item.push(characters.next()?),
                    character => item.push(character),
                }
            }
            items.push(Some(item));
        } else {
            let mut item = String::new();
            while let Some(&character) = characters.peek() {
                if character == ',' {
                    break;
                }
                if matches!(character, '{' | '}' | '"' | '\\') {
                    return None;
                }
                item.push(character);
                characters.next();
            }
            if item.is_empty() {
                return None;
            }
            items.push(if item.eq_ignore_ascii_case("NULL") { None } else { Some(item) });
        }
        match characters.next() {
            None => return Some(items),
            Some(',') => {}
            Some(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    const BOOL: u32 = 16;
    const INT4: u32 = 23;
    const INT8: u32 = 20;
    const TEXT: u32 = 25;
    const FLOAT8: u32 = 701;
    const NUMERIC: u32 = 1700;
    const JSONB: u32 = 3802;
    const UUID: u32 = 2950;
    const TIMESTAMPTZ: u32 = 1184;
    const TEXT_ARRAY: u32 = 1009;
    const INT4_ARRAY: u32 = 1007;
    const JSONB_ARRAY: u32 = 3807;

    #[test]
    fn each_kind_reads_as_documented() {
        let cases = [
            (BOOL, "t", json!(true)),
            (BOOL, "f", json!(false)),
            (INT4, "-42", json!(-42)),
            (INT8, "9223372036854775807", json!(9_223_372_036_854_775_807i64)),
            (FLOAT8, "1.5", json!(1.5)),
            (FLOAT8, "NaN", json!("NaN")),
            (FLOAT8, "-Infinity", json!("-Infinity")),
            (NUMERIC, "12.50", json!(12.5)),
            (NUMERIC, "7.000", json!(7)),
            (NUMERIC, "0.1", json!(0.1)),
            (NUMERIC, "3.14159265358979323846", json!("3.14159265358979323846")),
            (NUMERIC, "123456789012345678901234567890", json!("123456789012345678901234567890")),
            (NUMERIC, "NaN", json!("NaN")),
            (JSONB, r#"{"a": [1, "x", null]}"#, json!({"a": [1, "x", null]})),
            (JSONB, r#""just a string""#, json!("just a string")),
            (TEXT, "Zürich", json!("Zürich")),
            (UUID, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
            (TIMESTAMPTZ, "2026-11-23 10:00:00+00", json!("2026-11-23 10:00:00+00")),
            (
                TEXT_ARRAY,
                r#"{vip,"a, b",NULL,"NULL","say \"hi\""}"#,
                json!(["vip", "a, b", null, "NULL", "say \"hi\""]),
            ),
            (INT4_ARRAY, "{1,2,NULL}", json!([1, 2, null])),
            (INT4_ARRAY, "{}", json!([])),
            (INT4_ARRAY, "{{1,2},{3,4}}", json!("{{1,2},{3,4}}")),
            (INT4_ARRAY, "[0:1]={1,2}", json!("[0:1]={1,2}")),
            (JSONB_ARRAY, r#"{"{\"a\": 1}",null}"#, json!([{"a": 1}, null])),
        ];
        for (type_oid, text, expected) in cases {
            assert_eq!(to_record_value(type_oid, text).unwrap(), expected, "{type_oid} {text:?}");
        }
    }

    #[test]
    fn each_kind_writes_back_text_postgresql_reads_to_the_same_value() {
        let cases = [
            (BOOL, json!(true), "t"),
            (INT4, json!(-42), "-42"),
            (INT4, json!(7.0), "7"),
            (FLOAT8, json!(1.5), "1.5"),
            (NUMERIC, json!("3.14159265358979323846"), "3.14159265358979323846"),
            (JSONB, json!({"a": [1, null]}), r#"{"a":[1,null]}"#),
            (JSONB, json!("text"), r#""text""#),
            (TEXT, json!("Zürich"), "Zürich"),
            (
                TEXT_ARRAY,
                json!(["vip", "a, b", null, "NULL", "say \"hi\""]),
                r#"{"vip","a, b",NULL,"NULL","say \"hi\""}"#,
            ),
            (INT4_ARRAY, json!([1, null]), r#"{"1",NULL}"#),
            (JSONB_ARRAY, json!([[1, 2], {"a": "b"}, null]), r#"{"[1,2]","{\"a\":\"b\"}",NULL}"#),
            (INT4_ARRAY, json!("{{1,2},{3,4}}"), "{{1,2},{3,4}}"),
        ];
        for (type_oid, value, expected) in cases {
            assert_eq!(to_sql_text(type_oid, &value).unwrap().as_deref(), Some(expected), "{type_oid} {value}");
        }
        assert_eq!(to_sql_text(TEXT, &Value::Null), Ok(None));
    }

    #[test]
    fn a_field_the_column_cannot_take_is_an_error_that_says_so() {
        let error = to_sql_text(INT4, &json!({"a": 1})).unwrap_err();
        assert_eq!(error.to_string(), "the column (type oid 23) takes an integer, not an object");
        assert!(to_sql_text(INT4, &json!(1.5)).is_err());
        assert!(to_sql_text(BOOL, &json!(1)).is_err());
        assert!(to_sql_text(TEXT, &json!(1)).is_err());
        assert!(to_sql_text(INT4_ARRAY, &json!([[1]])).is_err());
        assert_eq!(to_sql_text(TEXT, &json!("a\0b")), Err(ValueError::Nul));
        assert!(to_record_value(INT4, "twelve").is_err());
        assert!(to_record_value(BOOL, "maybe").is_err());
    }

    #[test]
    fn json_deeper_than_the_record_limit_is_refused() {
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        assert!(matches!(to_record_value(JSONB, &deep), Err(ValueError::Json(_))));
        let shallow = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(to_record_value(JSONB, &shallow).is_ok());
    }

    proptest! {
        #[test]
        fn array_literals_round_trip(items in proptest::collection::vec(proptest::option::of("[^\\x00]{0,12}"), 0..8)) {
            let value = Value::Array(items.iter().map(|item| item.clone().map_or(Value::Null, Value::String)).collect());
            let literal = to_sql_text(TEXT_ARRAY, &value).unwrap().unwrap();
            prop_assert_eq!(parse_array(&literal), Some(items));
        }

        #[test]
        fn numbers_read_back_to_what_was_written(float in proptest::num::f64::NORMAL | proptest::num::f64::SUBNORMAL | proptest::num::f64::ZERO) {
            let value = Value::Number(Number::from_f64(float).unwrap());
            let text = to_sql_text(FLOAT8, &value).unwrap().unwrap();
            prop_assert_eq!(to_record_value(FLOAT8, &text).unwrap().as_f64(), Some(float));
        }

        #[test]
        fn numeric_text_never_loses_digits(whole in 0u64..u64::MAX, fraction in "[0-9]{0,20}") {
            let text = if fraction.is_empty() { whole.to_string() } else { format!("{whole}.{fraction}") };
            let value = to_record_value(NUMERIC, &text).unwrap();
            let back = to_sql_text(NUMERIC, &value).unwrap().unwrap();
            prop_assert_eq!(canonical_decimal(&back), canonical_decimal(&text));
        }
    }
}
