//! A decoder for PostgreSQL's `pgoutput` logical decoding messages (protocol version 1, text
//! tuples), the payload of each `XLogData` frame a logical replication slot streams.
//!
//! The bytes come from a database server over the network, so they are untrusted: every length
//! is checked against what remains before anything is allocated, column counts are bounded by
//! PostgreSQL's own limit, strings must be UTF-8 (the connector requires a UTF8 database), and a
//! message with bytes left over is refused. Nothing here panics on any input; the fuzz target
//! `pgoutput_decode` holds it to that.
//!
//! The format is documented in the PostgreSQL manual, "Logical Replication Message Formats".

use std::fmt;

/// PostgreSQL's limit on the columns of a table (`MaxHeapAttributeNumber`); a relation or tuple
/// that claims more is refused before its columns are read.
pub const COLUMNS_MAX: usize = 1600;

/// The relations one `Truncate` message may name. PostgreSQL has no such limit, but every id
/// takes four bytes of the message, so the count is also checked against the bytes present.
pub const TRUNCATE_RELATIONS_MAX: usize = 65_536;

/// One decoded message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// A transaction starts. Its changes follow, then a `Commit`.
    Begin {
        final_lsn: u64,
        commit_time: i64,
        transaction: u32,
    },
    /// A transaction ended; `end_lsn` is where the next one starts, the position to confirm.
    Commit {
        commit_lsn: u64,
        end_lsn: u64,
        commit_time: i64,
    },
    /// The transaction came from another replication origin.
    Origin {
        commit_lsn: u64,
        name: String,
    },
    /// A table's shape; sent before the first change to it in a session and after it changes.
    Relation(Relation),
    /// A user-defined type's name.
    Type {
        id: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation: u32,
        new: Tuple,
    },
    /// `key` holds the old primary key when it changed (replica identity DEFAULT, other columns
    /// NULL); `old` holds the whole old row under replica identity FULL.
    Update {
        relation: u32,
        key: Option<Tuple>,
        old: Option<Tuple>,
        new: Tuple,
    },
    /// `old` holds the key columns (others NULL), or the whole row under replica identity FULL.
    Delete {
        relation: u32,
        old: Tuple,
    },
    Truncate {
        relations: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    /// A logical decoding message (`pg_logical_emit_message`).
    Message {
        transactional: bool,
        lsn: u64,
        prefix: String,
        content: Vec<u8>,
    },
}

/// A table as pgoutput describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub id: u32,
    /// The schema; empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    /// Part of the replica identity key.
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// A row's values in the relation's column order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tuple(pub Vec<Datum>);

/// One column value of a [`Tuple`].
#[derive(Debug, Clone, PartialEq)]
pub enum Datum {
    Null,
    /// A TOASTed value the update did not change: pgoutput does not resend it.
    UnchangedToast,
    /// The value in the type's text output format.
    Text(String),
}

/// Why bytes are not a pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    Empty,
    /// The message ends before a field it must have.
    Truncated {
        field: &'static str,
        offset: usize,
    },
    UnknownMessage(u8),
    /// A tuple or relation claims more columns than PostgreSQL allows (or a negative count).
    TooManyColumns(i64),
    TooManyRelations(i64),
    /// A tuple value of a kind other than `n`, `u`, `t` (binary values are never requested).
    UnknownDatum(u8),
    /// An update or delete names an old-tuple kind other than `K` or `O`, or a new tuple lacks `N`.
    UnexpectedTupleMarker {
        expected: &'static str,
        found: u8,
    },
    NegativeLength {
        field: &'static str,
        length: i32,
    },
    NotUtf8 {
        field: &'static str,
    },
    UnterminatedString {
        field: &'static str,
    },
    TrailingBytes(usize),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Empty => write!(formatter, "empty message"),
            DecodeError::Truncated { field, offset } => {
                write!(formatter, "message ends at byte {offset}, inside {field}")
            }
            DecodeError::UnknownMessage(tag) => write!(formatter, "unknown message type {:?}", char::from(*tag)),
            DecodeError::TooManyColumns(count) => write!(formatter, "{count} columns (at most {COLUMNS_MAX})"),
            DecodeError::TooManyRelations(count) => {
                write!(formatter, "truncate of {count} relations (at most {TRUNCATE_RELATIONS_MAX})")
            }
            DecodeError::UnknownDatum(kind) => write!(formatter, "unknown tuple value kind {:?}", char::from(*kind)),
            DecodeError::UnexpectedTupleMarker { expected, found } => {
                write!(formatter, "expected tuple marker {expected}, found {:?}", char::from(*found))
            }
            DecodeError::NegativeLength { field, length } => write!(formatter, "{field} has length {length}"),
            DecodeError::NotUtf8 { field } => write!(formatter, "{field} is not UTF-8"),
            DecodeError::UnterminatedString { field } => write!(formatter, "{field} has no terminating NUL"),
            DecodeError::TrailingBytes(count) => write!(formatter, "{count} bytes after the end of the message"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Decodes one whole message.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    let mut reader = Reader { bytes, offset: 0 };
    let tag = reader.u8("message type").map_err(|_| DecodeError::Empty)?;
    let message = match tag {
        b'B' => Message::Begin {
            final_lsn: reader.u64("final LSN")?,
            commit_time: reader.i64("commit time")?,
            transaction: reader.u32("transaction id")?,
        },
        b'C' => {
            let _flags = reader.u8("commit flags")?;
            Message::Commit {
                commit_lsn: reader.u64("commit LSN")?,
                end_lsn: reader.u64("end LSN")?,
                commit_time: reader.i64("commit time")?,
            }
        }
        b'O' => Message::Origin { commit_lsn: reader.u64("origin LSN")?, name: reader.string("origin name")? },
        b'R' => Message::Relation(relation(&mut reader)?),
        b'Y' => Message::Type {
            id: reader.u32("type id")?,
            namespace: reader.string("type namespace")?,
            name: reader.string("type name")?,
        },
        b'I' => {
            let relation = reader.u32("relation id")?;
            reader.marker(b"N", "N")?;
            Message::Insert { relation, new: tuple(&mut reader)? }
        }
        b'U' => {
            let relation = reader.u32("relation id")?;
            let (mut key, mut old) = (None, None);
            match reader.marker(b"KON", "K, O or N")? {
                b'K' => {
                    key = Some(tuple(&mut reader)?);
                    reader.marker(b"N", "N")?;
                }
                b'O' => {
                    old = Some(tuple(&mut reader)?);
                    reader.marker(b"N", "N")?;
                }
                _ => {}
            }
            Message::Update { relation, key, old, new: tuple(&mut reader)? }
        }
        b'D' => {
            let relation = reader.u32("relation id")?;
            reader.marker(b"KO", "K or O")?;
            Message::Delete { relation, old: tuple(&mut reader)? }
        }
        b'T' => {
            let count = reader.u32("relation count")?;
            let count_usize = usize::try_from(count).unwrap_or(usize::MAX);
            if count_usize > TRUNCATE_RELATIONS_MAX {
                return Err(DecodeError::TooManyRelations(i64::from(count)));
            }
            let options = reader.u8("truncate options")?;
            reader.expect_remaining(count_usize.saturating_mul(4), "truncated relation ids")?;
            let mut relations = Vec::with_capacity(count_usize);
            for _ in 0..count_usize {
                relations.push(reader.u32("truncated relation id")?);
            }
            Message::Truncate { relations, cascade: options & 1 != 0, restart_identity: options & 2 != 0 }
        }
        b'M' => {
            let transactional = reader.u8("message flags")? & 1 != 0;
            let lsn = reader.u64("message LSN")?;
            let prefix = reader.string("message prefix")?;
            let length = reader.length("message content")?;
            let content = reader.take(length, "message content")?.to_vec();
            Message::Message { transactional, lsn, prefix, content }
        }
        other => return Err(DecodeError::UnknownMessage(other)),
    };
    match reader.remaining() {
        0 => Ok(message),
        left => Err(DecodeError::TrailingBytes(left)),
    }
}

fn relation(reader: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let id = reader.u32("relation id")?;
    let namespace = reader.string("relation namespace")?;
    let name = reader.string("relation name")?;
    let replica_identity = reader.u8("replica identity")?;
    let count = reader.column_count()?;
    // Each column takes at least 1 + 1 + 4 + 4 bytes.
    reader.expect_remaining(count.saturating_mul(10), "relation columns")?;
    let mut columns = Vec::with_capacity(count);
    for _ in 0..count {
        columns.push(Column {
            key: reader.u8("column flags")? & 1 != 0,
            name: reader.string("column name")?,
            type_oid: reader.u32("column type")?,
            type_modifier: reader.i32("column type modifier")?,
        });
    }
    Ok(Relation { id, namespace, name, replica_identity, columns })
}

fn tuple(reader: &mut Reader<'_>) -> Result<Tuple, DecodeError> {
    let count = reader.column_count()?;
    // Each value takes at least its kind byte.
    reader.expect_remaining(count, "tuple values")?;
    let mut values = Vec::with_capacity(count);
    for _ in 0..count {
        let value = match reader.u8("tuple value kind")? {
            b'n' => Datum::Null,
            b'u' => Datum::UnchangedToast,
            b't' => {
                let length = reader.length("tuple value")?;
                let bytes = reader.take(length, "tuple value")?;
                let text = std::str::from_utf8(bytes).map_err(|_| DecodeError::NotUtf8 { field: "tuple value" })?;
                Datum::Text(text.to_owned())
            }
            other => return Err(DecodeError::UnknownDatum(other)),
        };
        values.push(value);
    }
    Ok(Tuple(values))
}

/// A cursor over a message's bytes; every read checks what remains.
struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.offset
    }

    fn expect_remaining(&self, needed: usize, field: &'static str) -> Result<(), DecodeError> {
        if needed > self.remaining() {
            return Err(DecodeError::Truncated { field, offset: self.bytes.len() });
        }
        Ok(())
    }

    fn take(&mut self, count: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        self.expect_remaining(count, field)?;
        let taken = &self.bytes[self.offset..self.offset + count];
        self.offset += count;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut array = [0u8; N];
        array.copy_from_slice(self.take(N, field)?);
        Ok(array)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn i16(&mut self, field: &'static str) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(field)?))
    }

    /// A non-negative Int32 length.
    fn length(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let length = self.i32(field)?;
        usize::try_from(length).map_err(|_| DecodeError::NegativeLength { field, length })
    }

    /// An Int16 column count within [`COLUMNS_MAX`].
    fn column_count(&mut self) -> Result<usize, DecodeError> {
        let count = self.i16("column count")?;
        match usize::try_from(count) {
            Ok(count) if count <= COLUMNS_MAX => Ok(count),
            _ => Err(DecodeError::TooManyColumns(i64::from(count))),
        }
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let rest = &self.bytes[self.offset..];
        let end = rest.iter().position(|&byte| byte == 0).ok_or(DecodeError::UnterminatedString { field })?;
        let text = std::str::from_utf8(&rest[..end]).map_err(|_| DecodeError::NotUtf8 { field })?;
        self.offset += end + 1;
        Ok(text.to_owned())
    }

    /// One byte that must be one of `allowed`.
    fn marker(&mut self, allowed: &[u8], expected: &'static str) -> Result<u8, DecodeError> {
        let found = self.u8("tuple marker")?;
        if allowed.contains(&found) { Ok(found) } else { Err(DecodeError::UnexpectedTupleMarker { expected, found }) }
    }
}

/// Encodes a message in pgoutput's format: the inverse of [`decode`], for tests, fuzz seeds and
/// benchmarks (the connector only decodes).
pub fn encode(message: &Message) -> Vec<u8> {
    let mut bytes = Vec::new();
    let string = |bytes: &mut Vec<u8>, text: &str| {
        bytes.extend_from_slice(text.as_bytes());
        bytes.push(0);
    };
    let tuple = |bytes: &mut Vec<u8>, tuple: &Tuple| {
        bytes.extend_from_slice(&(tuple.0.len() as i16).to_be_bytes());
        for datum in &tuple.0 {
            match datum {
                Datum::Null => bytes.push(b'n'),
                Datum::UnchangedToast => bytes.push(b'u'),
                Datum::Text(text) => {
                    bytes.push(b't');
                    bytes.extend_from_slice(&(text.len() as i32).to_be_bytes());
                    bytes.extend_from_slice(text.as_bytes());
                }
            }
        }
    };
    match message {
        Message::Begin { final_lsn, commit_time, transaction } => {
            bytes.push(b'B');
            bytes.extend_from_slice(&final_lsn.to_be_bytes());
            bytes.extend_from_slice(&commit_time.to_be_bytes());
            bytes.extend_from_slice(&transaction.to_be_bytes());
        }
        Message::Commit { commit_lsn, end_lsn, commit_time } => {
            bytes.extend_from_slice(&[b'C', 0]);
            bytes.extend_from_slice(&commit_lsn.to_be_bytes());
            bytes.extend_from_slice(&end_lsn.to_be_bytes());
            bytes.extend_from_slice(&commit_time.to_be_bytes());
        }
        Message::Origin { commit_lsn, name } => {
            bytes.push(b'O');
            bytes.extend_from_slice(&commit_lsn.to_be_bytes());
            string(&mut bytes, name);
        }
        Message::Relation(relation) => {
            bytes.push(b'R');
            bytes.extend_from_slice(&relation.id.to_be_bytes());
            string(&mut bytes, &relation.namespace);
            string(&mut bytes, &relation.name);
            bytes.push(relation.replica_identity);
            bytes.extend_from_slice(&(relation.columns.len() as i16).to_be_bytes());
            for column in &relation.columns {
                bytes.push(u8::from(column.key));
                string(&mut bytes, &column.name);
                bytes.extend_from_slice(&column.type_oid.to_be_bytes());
                bytes.extend_from_slice(&column.type_modifier.to_be_bytes());
            }
        }
        Message::Type { id, namespace, name } => {
            bytes.push(b'Y');
            bytes.extend_from_slice(&id.to_be_bytes());
            string(&mut bytes, namespace);
            string(&mut bytes, name);
        }
        Message::Insert { relation, new } => {
            bytes.push(b'I');
            bytes.extend_from_slice(&relation.to_be_bytes());
            bytes.push(b'N');
            tuple(&mut bytes, new);
        }
        Message::Update { relation, key, old, new } => {
            bytes.push(b'U');
            bytes.extend_from_slice(&relation.to_be_bytes());
            if let Some(old) = old {
                bytes.push(b'O');
                tuple(&mut bytes, old);
            } else if let Some(key) = key {
                bytes.push(b'K');
                tuple(&mut bytes, key);
            }
            bytes.push(b'N');
            tuple(&mut bytes, new);
        }
        Message::Delete { relation, old } => {
            bytes.push(b'D');
            bytes.extend_from_slice(&relation.to_be_bytes());
            bytes.push(b'O');
            tuple(&mut bytes, old);
        }
        Message::Truncate { relations, cascade, restart_identity } => {
            bytes.push(b'T');
            bytes.extend_from_slice(&(relations.len() as u32).to_be_bytes());
            bytes.push(u8::from(*cascade) | (u8::from(*restart_identity) << 1));
            for relation in relations {
                bytes.extend_from_slice(&relation.to_be_bytes());
            }
        }
        Message::Message { transactional, lsn, prefix, content } => {
            bytes.push(b'M');
            bytes.push(u8::from(*transactional));
            bytes.extend_from_slice(&lsn.to_be_bytes());
            string(&mut bytes, prefix);
            bytes.extend_from_slice(&(content.len() as i32).to_be_bytes());
            bytes.extend_from_slice(content);
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn customers() -> Relation {
        Relation {
            id: 16_385,
            namespace: "public".into(),
            name: "customers".into(),
            replica_identity: b'f',
            columns: vec![
                Column { key: true, name: "id".into(), type_oid: 23, type_modifier: -1 },
                Column { key: false, name: "name".into(), type_oid: 25, type_modifier: -1 },
                Column { key: false, name: "notes".into(), type_oid: 25, type_modifier: -1 },
            ],
        }
    }

    fn row(id: &str, name: Option<&str>) -> Tuple {
        Tuple(vec![
            Datum::Text(id.into()),
            name.map_or(Datum::Null, |name| Datum::Text(name.into())),
            Datum::UnchangedToast,
        ])
    }

    fn every_kind() -> Vec<Message> {
        vec![
            Message::Begin { final_lsn: 0x16B_3748, commit_time: 786_000_000_000, transaction: 731 },
            Message::Commit { commit_lsn: 0x16B_3748, end_lsn: 0x16B_3778, commit_time: 786_000_000_000 },
            Message::Origin { commit_lsn: 7, name: "site-b".into() },
            Message::Relation(customers()),
            Message::Type { id: 16_400, namespace: "public".into(), name: "mood".into() },
            Message::Insert { relation: 16_385, new: row("1", Some("Ada Lovelace")) },
            Message::Update { relation: 16_385, key: None, old: None, new: row("1", Some("Ada")) },
            Message::Update { relation: 16_385, key: Some(row("1", None)), old: None, new: row("2", Some("Ada")) },
            Message::Update { relation: 16_385, key: None, old: Some(row("1", Some("A"))), new: row("1", None) },
            Message::Delete { relation: 16_385, old: row("1", None) },
            Message::Truncate { relations: vec![16_385, 16_390], cascade: true, restart_identity: false },
            Message::Message {
                transactional: true,
                lsn: 99,
                prefix: "concord.apply".into(),
                content: b"node-a".to_vec(),
            },
        ]
    }

    #[test]
    fn every_message_kind_decodes_to_what_was_encoded() {
        for message in every_kind() {
            assert_eq!(decode(&encode(&message)), Ok(message));
        }
    }

    #[test]
    fn an_insert_laid_out_by_hand_from_the_manual_decodes() {
        // INSERT INTO t VALUES (1, 'é') for t (id int, name text), relation id 0x4001.
        let bytes = b"I\x00\x00\x40\x01N\x00\x02t\x00\x00\x00\x011t\x00\x00\x00\x02\xc3\xa9";
        assert_eq!(
            decode(bytes),
            Ok(Message::Insert {
                relation: 0x4001,
                new: Tuple(vec![Datum::Text("1".into()), Datum::Text("é".into())])
            })
        );
    }

    #[test]
    fn every_truncation_of_every_message_is_an_error() {
        for message in every_kind() {
            let bytes = encode(&message);
            for length in 0..bytes.len() {
                assert!(decode(&bytes[..length]).is_err(), "{message:?} cut at {length}");
            }
        }
    }

    #[test]
    fn bytes_after_a_message_are_refused() {
        let mut bytes = encode(&Message::Delete { relation: 1, old: row("1", None) });
        bytes.push(0);
        assert_eq!(decode(&bytes), Err(DecodeError::TrailingBytes(1)));
    }

    #[test]
    fn column_counts_are_bounded_before_anything_is_allocated() {
        let mut bytes = b"I\x00\x00\x00\x01N".to_vec();
        bytes.extend_from_slice(&1601i16.to_be_bytes());
        assert_eq!(decode(&bytes), Err(DecodeError::TooManyColumns(1601)));
        let mut bytes = b"I\x00\x00\x00\x01N".to_vec();
        bytes.extend_from_slice(&(-1i16).to_be_bytes());
        assert_eq!(decode(&bytes), Err(DecodeError::TooManyColumns(-1)));
        // 1,600 claimed but nothing follows: refused by length, not by reading 1,600 times.
        let mut bytes = b"I\x00\x00\x00\x01N".to_vec();
        bytes.extend_from_slice(&1600i16.to_be_bytes());
        assert!(matches!(decode(&bytes), Err(DecodeError::Truncated { .. })));
    }

    #[test]
    fn value_lengths_are_checked_against_the_message() {
        let mut bytes = b"I\x00\x00\x00\x01N\x00\x01t".to_vec();
        bytes.extend_from_slice(&i32::MAX.to_be_bytes());
        assert!(matches!(decode(&bytes), Err(DecodeError::Truncated { field: "tuple value", .. })));
        let mut bytes = b"I\x00\x00\x00\x01N\x00\x01t".to_vec();
        bytes.extend_from_slice(&(-5i32).to_be_bytes());
        assert_eq!(decode(&bytes), Err(DecodeError::NegativeLength { field: "tuple value", length: -5 }));
        let mut bytes = b"T".to_vec();
        bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(decode(&bytes), Err(DecodeError::TooManyRelations(_))));
    }

    #[test]
    fn malformed_parts_get_their_own_errors() {
        assert_eq!(decode(b""), Err(DecodeError::Empty));
        assert_eq!(decode(b"Z"), Err(DecodeError::UnknownMessage(b'Z')));
        assert_eq!(
            decode(b"I\x00\x00\x00\x01X"),
            Err(DecodeError::UnexpectedTupleMarker { expected: "N", found: b'X' })
        );
        assert_eq!(decode(b"I\x00\x00\x00\x01N\x00\x01b"), Err(DecodeError::UnknownDatum(b'b')));
        assert_eq!(
            decode(b"I\x00\x00\x00\x01N\x00\x01t\x00\x00\x00\x01\xff"),
            Err(DecodeError::NotUtf8 { field: "tuple value" })
        );
        assert_eq!(
            decode(b"Y\x00\x00\x00\x01public"),
            Err(DecodeError::UnterminatedString { field: "type namespace" })
        );
        for error in [DecodeError::Empty, DecodeError::TooManyColumns(2000), DecodeError::TrailingBytes(3)] {
            assert!(!error.to_string().is_empty());
        }
    }
}
