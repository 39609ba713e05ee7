//! Record addressing: a collection name and a record id, validated and bounded.
//!
//! Allowed characters, so that keys are safe in URLs, log lines and the store's key encoding:
//! - a collection is 1 to 64 bytes of ASCII letters, digits, `_`, `-` and `.`, starting with a
//!   letter or a digit;
//! - an id is 1 to 256 bytes of UTF-8 with no control characters and no `/`.
//!
//! Collections whose name starts with `_` are reserved for Concord's own system collections.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest collection name, in bytes.
pub const COLLECTION_BYTES_MAX: usize = 64;
/// The longest record id, in bytes.
pub const ID_BYTES_MAX: usize = 256;

/// Why a collection or id was refused. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("collection name is empty")]
    CollectionEmpty,
    #[error("collection name is {0} bytes; the limit is {COLLECTION_BYTES_MAX}")]
    CollectionTooLong(usize),
    #[error(
        "collection name {0:?} has a character outside ASCII letters, digits, '_', '-' and '.', or does not start with a letter or digit"
    )]
    CollectionCharacter(String),
    #[error("record id is empty")]
    IdEmpty,
    #[error("record id is {0} bytes; the limit is {ID_BYTES_MAX}")]
    IdTooLong(usize),
    #[error("record id {0:?} contains a control character or '/'")]
    IdCharacter(String),
    #[error("stored key is not a collection and an id separated by a NUL byte")]
    Encoding,
}

/// The address of one document: a collection and an id within it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "(String, String)", into = "(String, String)")]
pub struct RecordKey {
    collection: String,
    id: String,
}

impl RecordKey {
    pub fn new(collection: &str, id: &str) -> Result<RecordKey, KeyError> {
        validate_collection(collection)?;
        validate_id(id)?;
        Ok(RecordKey { collection: collection.to_owned(), id: id.to_owned() })
    }

    pub fn collection(&self) -> &str {
        &self.collection
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The store key: `collection NUL id`. Neither part may contain NUL, so it is unambiguous,
    /// and all records of a collection share the prefix `collection NUL`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.collection.len() + 1 + self.id.len());
        bytes.extend_from_slice(self.collection.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(self.id.as_bytes());
        bytes
    }

    /// The inverse of [`RecordKey::to_bytes`]; bytes read from disk are validated again.
    pub fn from_bytes(bytes: &[u8]) -> Result<RecordKey, KeyError> {
        let separator = bytes.iter().position(|&byte| byte == 0).ok_or(KeyError::Encoding)?;
        let collection = std::str::from_utf8(&bytes[..separator]).map_err(|_| KeyError::Encoding)?;
        let id = std::str::from_utf8(&bytes[separator + 1..]).map_err(|_| KeyError::Encoding)?;
        RecordKey::new(collection, id)
    }

    /// The store-key prefix shared by every record of `collection`.
    pub fn collection_prefix(collection: &str) -> Result<Vec<u8>, KeyError> {
        validate_collection(collection)?;
        let mut bytes = collection.as_bytes().to_vec();
        bytes.push(0);
        Ok(bytes)
    }
}

impl fmt::Display for RecordKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}/{}", self.collection, self.id)
    }
}

impl TryFrom<(String, String)> for RecordKey {
    type Error = KeyError;
    fn try_from((collection, id): (String, String)) -> Result<Self, Self::Error> {
        RecordKey::new(&collection, &id)
    }
}

impl From<RecordKey> for (String, String) {
    fn from(key: RecordKey) -> Self {
        (key.collection, key.id)
    }
}

pub fn validate_collection(collection: &str) -> Result<(), KeyError> {
    if collection.is_empty() {
        return Err(KeyError::CollectionEmpty);
    }
    if collection.len() > COLLECTION_BYTES_MAX {
        return Err(KeyError::CollectionTooLong(collection.len()));
    }
    let allowed = |character: char| character.is_ascii_alphanumeric() || "_-.".contains(character);
    let first_allowed = collection.starts_with(|character: char| character.is_ascii_alphanumeric() || character == '_');
    if !first_allowed || !collection.chars().all(allowed) {
        return Err(KeyError::CollectionCharacter(collection.to_owned()));
    }
    Ok(())
}

pub fn validate_id(id: &str) -> Result<(), KeyError> {
    if id.is_empty() {
        return Err(KeyError::IdEmpty);
    }
    if id.len() > ID_BYTES_MAX {
        return Err(KeyError::IdTooLong(id.len()));
    }
    if id.chars().any(|character| character.is_control() || character == '/') {
        return Err(KeyError::IdCharacter(id.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_keys_and_round_trips_bytes() {
        let key = RecordKey::new("customers", "ACME Corp — Zürich").unwrap();
        assert_eq!(RecordKey::from_bytes(&key.to_bytes()).unwrap(), key);
        assert!(key.to_bytes().starts_with(&RecordKey::collection_prefix("customers").unwrap()));
    }

    #[test]
    fn refuses_bad_keys() {
        assert_eq!(RecordKey::new("", "x"), Err(KeyError::CollectionEmpty));
        assert!(matches!(RecordKey::new("a b", "x"), Err(KeyError::CollectionCharacter(_))));
        assert!(matches!(RecordKey::new("-a", "x"), Err(KeyError::CollectionCharacter(_))));
        assert!(matches!(RecordKey::new(&"c".repeat(65), "x"), Err(KeyError::CollectionTooLong(65))));
        assert_eq!(RecordKey::new("c", ""), Err(KeyError::IdEmpty));
        assert!(matches!(RecordKey::new("c", "a/b"), Err(KeyError::IdCharacter(_))));
        assert!(matches!(RecordKey::new("c", "a\nb"), Err(KeyError::IdCharacter(_))));
        assert!(matches!(RecordKey::new("c", &"i".repeat(257)), Err(KeyError::IdTooLong(257))));
        assert_eq!(RecordKey::from_bytes(b"no-separator"), Err(KeyError::Encoding));
        assert_eq!(RecordKey::from_bytes(b"c\0\xff"), Err(KeyError::Encoding));
    }
}
