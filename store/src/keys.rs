//! Key encodings: a prefix byte per keyspace, then big-endian fields, so that sled's byte order is the
//! order the store reads in.

use std::fmt;

use crate::ReadError;

/// The longest document key the store accepts, in bytes.
pub const MAX_DOCUMENT_KEY: usize = 1024;

/// The name of the meta entry holding the format marker; `WriteBatch::put_meta` refuses it.
pub(crate) const FORMAT_META: &str = "format";

/// The keyspaces sharing sled's default tree, each under its own prefix byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyspace {
    /// `d` + document key.
    Documents,
    /// `i` + key length (u16 BE) + document key + index (u32 BE).
    Increments,
    /// `L` + origin (16 bytes) + the sequence (u64 BE) of a page's first entry (see `journal`).
    Log,
    /// `F` + the feed sequence (u64 BE) of a page's first entry (see `journal`).
    Feed,
    /// `m` + name (UTF-8).
    Meta,
    /// `A` + the audit sequence (u64 BE) of a page's first entry (see `journal`).
    Audit,
    /// `c` + conflict sequence (u64 BE).
    Conflicts,
    /// `q` + quarantine id (u64 BE).
    Quarantine,
}

impl Keyspace {
    /// Every keyspace, in prefix-byte order.
    pub const ALL: [Keyspace; 8] = [
        Keyspace::Audit,
        Keyspace::Feed,
        Keyspace::Log,
        Keyspace::Conflicts,
        Keyspace::Documents,
        Keyspace::Increments,
        Keyspace::Meta,
        Keyspace::Quarantine,
    ];

    /// The byte every key of this keyspace starts with.
    pub(crate) const fn prefix(self) -> u8 {
        match self {
            Keyspace::Documents => b'd',
            Keyspace::Increments => b'i',
            Keyspace::Log => b'L',
            Keyspace::Feed => b'F',
            Keyspace::Meta => b'm',
            Keyspace::Audit => b'A',
            Keyspace::Conflicts => b'c',
            Keyspace::Quarantine => b'q',
        }
    }
}

impl fmt::Display for Keyspace {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Keyspace::Documents => "documents",
            Keyspace::Increments => "increments",
            Keyspace::Log => "log",
            Keyspace::Feed => "feed",
            Keyspace::Meta => "meta",
            Keyspace::Audit => "audit",
            Keyspace::Conflicts => "conflicts",
            Keyspace::Quarantine => "quarantine",
        })
    }
}

/// A prefix byte and a u64: the feed, audit, conflicts and quarantine keys.
pub(crate) const NUMBERED_KEY_LENGTH: usize = 1 + 8;

/// Where format 1 kept the journals, one entry per key: the feed and the audit trail as prefix
/// byte + number, the log as prefix byte + origin + sequence. Format 2 moved them into pages
/// under their keyspaces' prefixes (see `Store::open`).
pub(crate) const FORMAT_1_JOURNALS: [(u8, Keyspace); 3] =
    [(b'f', Keyspace::Feed), (b'a', Keyspace::Audit), (b'l', Keyspace::Log)];

pub(crate) fn document(key: &[u8]) -> Vec<u8> {
    let mut encoded = Vec::with_capacity(1 + key.len());
    encoded.push(Keyspace::Documents.prefix());
    encoded.extend_from_slice(key);
    encoded
}

/// The key of a document, without the prefix byte.
pub(crate) fn document_key(stored: &[u8]) -> Result<&[u8], ReadError> {
    match stored.split_first() {
        Some((&prefix, key)) if prefix == Keyspace::Documents.prefix() => Ok(key),
        _ => Err(corrupt(Keyspace::Documents, stored)),
    }
}

/// The prefix shared by all increments of one document; `None` if the key is longer than
/// [`MAX_DOCUMENT_KEY`].
pub(crate) fn increment_prefix(key: &[u8]) -> Option<Vec<u8>> {
    if key.len() > MAX_DOCUMENT_KEY {
        return None;
    }
    let length = u16::try_from(key.len()).ok()?;
    let mut encoded = Vec::with_capacity(1 + 2 + key.len() + 4);
    encoded.push(Keyspace::Increments.prefix());
    encoded.extend_from_slice(&length.to_be_bytes());
    encoded.extend_from_slice(key);
    Some(encoded)
}

pub(crate) fn increment(key: &[u8], index: u32) -> Option<Vec<u8>> {
    let mut encoded = increment_prefix(key)?;
    encoded.extend_from_slice(&index.to_be_bytes());
    Some(encoded)
}

/// The index of an increment key found under `increment_prefix(key)`, which is `prefix_length` long.
pub(crate) fn increment_index(stored: &[u8], prefix_length: usize) -> Result<u32, ReadError> {
    trailing(stored, prefix_length.saturating_add(4), Keyspace::Increments).map(u32::from_be_bytes)
}

/// The key of entry `number` in a keyspace keyed by a u64 alone (feed, audit, conflicts,
/// quarantine).
pub(crate) fn numbered(keyspace: Keyspace, number: u64) -> [u8; NUMBERED_KEY_LENGTH] {
    let mut encoded = [0; NUMBERED_KEY_LENGTH];
    encoded[0] = keyspace.prefix();
    encoded[1..].copy_from_slice(&number.to_be_bytes());
    encoded
}

/// The u64 of a key made by [`numbered`] for `keyspace`.
pub(crate) fn number(keyspace: Keyspace, stored: &[u8]) -> Result<u64, ReadError> {
    trailing(stored, NUMBERED_KEY_LENGTH, keyspace).map(u64::from_be_bytes)
}

pub(crate) fn meta(name: &str) -> Vec<u8> {
    let mut encoded = Vec::with_capacity(1 + name.len());
    encoded.push(Keyspace::Meta.prefix());
    encoded.extend_from_slice(name.as_bytes());
    encoded
}

/// The last `N` bytes of a key that must be exactly `length` bytes long.
fn trailing<const N: usize>(stored: &[u8], length: usize, keyspace: Keyspace) -> Result<[u8; N], ReadError> {
    if stored.len() != length {
        return Err(corrupt(keyspace, stored));
    }
    stored
        .get(length.saturating_sub(N)..)
        .and_then(|tail| <[u8; N]>::try_from(tail).ok())
        .ok_or_else(|| corrupt(keyspace, stored))
}

fn corrupt(keyspace: Keyspace, stored: &[u8]) -> ReadError {
    ReadError::Corrupt { keyspace, key: stored.to_vec() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_keyspace_has_its_own_prefix_byte() {
        let all = Keyspace::ALL;
        for (index, keyspace) in all.iter().enumerate() {
            assert!(all[..index].iter().all(|other| other.prefix() != keyspace.prefix()), "{keyspace}");
        }
        assert!(all.windows(2).all(|pair| pair[0].prefix() < pair[1].prefix()), "ALL is in prefix order");
        for (legacy, _) in FORMAT_1_JOURNALS {
            assert!(all.iter().all(|keyspace| keyspace.prefix() != legacy), "format 1's journal prefixes are free");
        }
    }

    #[test]
    fn increments_of_different_documents_do_not_share_a_prefix() {
        let a = increment(b"a", 0x6200_0000).unwrap_or_default();
        let ab = increment_prefix(b"ab").unwrap_or_default();
        assert!(!a.starts_with(&ab));
        assert!(!ab.starts_with(&increment_prefix(b"a").unwrap_or_default()));
    }

    #[test]
    fn keys_longer_than_the_limit_are_refused() {
        assert!(increment_prefix(&[0; MAX_DOCUMENT_KEY]).is_some());
        assert!(increment_prefix(&[0; MAX_DOCUMENT_KEY + 1]).is_none());
    }

    #[test]
    fn short_or_long_keys_are_corrupt_not_panics() {
        for length in 0..40 {
            let stored = vec![b'x'; length];
            assert_eq!(number(Keyspace::Feed, &stored).is_ok(), length == NUMBERED_KEY_LENGTH);
            assert_eq!(number(Keyspace::Audit, &stored).is_ok(), length == NUMBERED_KEY_LENGTH);
            assert_eq!(increment_index(&stored, 5).is_ok(), length == 9);
            assert!(increment_index(&stored, usize::MAX - 2).is_err());
        }
        assert!(document_key(b"").is_err());
        assert!(document_key(b"x").is_err());
        assert_eq!(document_key(b"d").ok(), Some(&b""[..]));
    }

    #[test]
    fn round_trips() {
        assert_eq!(number(Keyspace::Feed, &numbered(Keyspace::Feed, u64::MAX)).ok(), Some(u64::MAX));
        for keyspace in [Keyspace::Audit, Keyspace::Conflicts, Keyspace::Quarantine] {
            assert_eq!(number(keyspace, &numbered(keyspace, 258)).ok(), Some(258));
        }
        let prefix = increment_prefix(b"doc").unwrap_or_default();
        let key = increment(b"doc", 9).unwrap_or_default();
        assert_eq!(increment_index(&key, prefix.len()).ok(), Some(9));
        assert_eq!(document_key(&document(b"doc")).ok(), Some(&b"doc"[..]));
    }
}
