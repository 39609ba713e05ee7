//! The known-open fuzzing findings, read from `fuzz/known-open.toml`: bugs recorded as
//! regressions but not fixed yet. Compiled into `tests/fuzz_regressions.rs` (which requires each
//! to still panic) and into `examples/replay.rs` (which `scripts/fuzz` uses to tell a known-open
//! crash from a new one), so the list lives in one place. Uses only std and `toml`.

use std::path::Path;

/// One known-open bug.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownOpen {
    /// The fuzz target that finds it.
    pub target: String,
    /// Its minimised input's file name in `fuzz/regressions/<target>/`.
    pub regression: String,
    /// A substring of the panic message the harness raises for it.
    pub panic: String,
    /// Whether it only panics in builds with overflow checks.
    pub overflow_checks: bool,
    /// What is wrong.
    pub description: String,
}

/// The entries of a known-open file (`[[open]]` tables; see `fuzz/known-open.toml`).
pub fn parse(text: &str) -> Result<Vec<KnownOpen>, String> {
    let table: toml::Table = toml::from_str(text).map_err(|error| error.to_string())?;
    if let Some(key) = table.keys().find(|key| *key != "open") {
        return Err(format!("unknown key {key:?}: only [[open]] tables belong here"));
    }
    let Some(entries) = table.get("open") else { return Ok(Vec::new()) };
    let Some(entries) = entries.as_array() else { return Err("`open` is not an array of tables".to_owned()) };
    let mut known = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let entry = entry.as_table().ok_or_else(|| format!("open entry {index} is not a table"))?;
        let text = |key: &str| match entry.get(key) {
            Some(toml::Value::String(value)) if !value.is_empty() => Ok(value.clone()),
            Some(_) => Err(format!("open entry {index}: `{key}` is not a non-empty string")),
            None => Err(format!("open entry {index}: `{key}` is missing")),
        };
        let overflow_checks = match entry.get("overflow_checks") {
            None => false,
            Some(toml::Value::Boolean(value)) => *value,
            Some(_) => return Err(format!("open entry {index}: `overflow_checks` is not a boolean")),
        };
        const KEYS: [&str; 5] = ["target", "regression", "panic", "overflow_checks", "description"];
        if let Some(key) = entry.keys().find(|key| !KEYS.contains(&key.as_str())) {
            return Err(format!("open entry {index}: unknown key {key:?}"));
        }
        let open = KnownOpen {
            target: text("target")?,
            regression: text("regression")?,
            panic: text("panic")?,
            overflow_checks,
            description: text("description")?,
        };
        if known.iter().any(|other: &KnownOpen| other.target == open.target && other.regression == open.regression) {
            return Err(format!("{}/{} is listed twice", open.target, open.regression));
        }
        known.push(open);
    }
    Ok(known)
}

/// The entries of the known-open file at `path`.
pub fn read(path: &Path) -> Result<Vec<KnownOpen>, String> {
    let text = std::fs::read_to_string(path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    parse(&text).map_err(|error| format!("{}: {error}", path.display()))
}

/// The known-open bug a panic of `target` with `message` is, if any.
pub fn matching<'a>(known: &'a [KnownOpen], target: &str, message: &str) -> Option<&'a KnownOpen> {
    known.iter().find(|open| open.target == target && message.contains(&open.panic))
}

/// The message of a caught panic (`panic!` payloads are a `&str` or a `String`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(message), _) => (*message).to_owned(),
        (None, Some(message)) => message.clone(),
        (None, None) => "(a panic without a message)".to_owned(),
    }
}
