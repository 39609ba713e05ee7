//! Bounds on how much work automerge bytes declare, checked before automerge reads bytes that
//! came from a peer or the disk.
//!
//! automerge's format run-length encodes its columns, so a few bytes can declare any number of
//! operations: a 70-byte change declaring eight million operations made automerge allocate 3 GB
//! and spend minutes (the `record_changes` fuzz target found it). A deflated chunk or column
//! inflates without a bound as well. automerge 0.12 has no limit of its own, so [`Budget`] walks
//! the chunk and column headers and adds up the runs of every column, inflating deflated parts
//! under a byte budget. The walk takes time linear in the bytes (inflated ones included) and
//! allocates only the inflated parts and each chunk's list of columns, and a record refuses
//! bytes that overdraw the budget before automerge sees them.
//!
//! The unit is an *item*: one entry of a column, which is one operation, one change or one
//! predecessor or successor reference. A chunk costs the largest column it holds, so a change
//! costs about its operation count and a saved document its operations plus its changes.

use std::io::Read;

/// The most items that the bytes of one load or apply of a record may declare. Loading a
/// million small operations costs automerge about 300 MB and a second, so this bounds the
/// memory and time that any one input can make a node spend.
pub const ITEMS_MAX: u64 = 1 << 20;

/// The largest record a local write may make, in operations plus changes: half of
/// [`ITEMS_MAX`], so that a record written within it always loads, with room left for the
/// concurrent writes of other nodes that arrive on top.
pub const RECORD_ITEMS_MAX: u64 = ITEMS_MAX / 2;

/// The most bytes that the deflated chunks and columns of one load may inflate to.
pub const INFLATED_BYTES_MAX: u64 = 64 << 20;

/// Why bytes were refused before automerge read them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoundError {
    #[error("the bytes declare more than {ITEMS_MAX} operations, changes and references in all")]
    Items,
    #[error("deflated parts of the bytes inflate to more than {INFLATED_BYTES_MAX} bytes")]
    Inflated,
    #[error("malformed automerge bytes: {0}")]
    Malformed(&'static str),
}

/// The start of every automerge chunk.
const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const CHECKSUM_BYTES: usize = 4;
const HASH_BYTES: u64 = 32;
/// The most bytes of a LEB128 number of 64 bits.
const LEB128_BYTES_MAX: usize = 10;

/// A column specification's type (its low three bits) and whether the column is deflated.
const TYPE_MASK: u64 = 0b0111;
const DEFLATE_BIT: u64 = 0b1000;
const BOOLEAN: u64 = 4;
const STRING: u64 = 5;
const RAW_VALUE: u64 = 7;

/// Chunk types: a saved document, a change, a deflated change.
pub(super) const DOCUMENT_CHUNK: u8 = 0;
pub(super) const CHANGE_CHUNK: u8 = 1;
pub(super) const COMPRESSED_CHANGE_CHUNK: u8 = 2;

/// One automerge chunk, read from its header: the magic bytes, a checksum, the chunk type and
/// the body's length as LEB128, then the body.
#[derive(Debug)]
pub(super) struct Chunk<'bytes> {
    pub(super) kind: u8,
    /// The whole chunk, header included.
    pub(super) whole: &'bytes [u8],
    pub(super) body: &'bytes [u8],
}

impl<'bytes> Chunk<'bytes> {
    /// The chunk at the start of `bytes`, and the bytes after it.
    pub(super) fn split(bytes: &'bytes [u8]) -> Result<(Chunk<'bytes>, &'bytes [u8]), BoundError> {
        let mut input = Cursor(bytes);
        if input.take(MAGIC.len() as u64)? != MAGIC {
            return Err(BoundError::Malformed("a chunk does not start with automerge's magic bytes"));
        }
        input.take(CHECKSUM_BYTES as u64)?;
        let kind = input.take(1)?[0];
        let length = input.unsigned()?;
        let body = input.take(length)?;
        let whole = &bytes[..bytes.len() - input.0.len()];
        Ok((Chunk { kind, whole, body }, input.0))
    }

    /// How many changes an uncompressed change chunk depends on (the first number of its body);
    /// `None` for any other chunk.
    pub(super) fn dependency_count(&self) -> Option<u64> {
        (self.kind == CHANGE_CHUNK).then(|| Cursor(self.body).unsigned().ok()).flatten()
    }
}

/// What is left to spend on one load or apply: items and inflated bytes.
#[derive(Debug)]
pub(crate) struct Budget {
    items: u64,
    inflated: u64,
}

impl Budget {
    /// The budget of bytes applied to a record that already holds `items` (see
    /// [`super::Record::items`]).
    pub(crate) fn after(items: u64) -> Budget {
        Budget { items: ITEMS_MAX.saturating_sub(items), inflated: INFLATED_BYTES_MAX }
    }

    /// Spends what `bytes` (any number of automerge chunks) declare, or refuses them.
    pub(crate) fn charge(&mut self, mut bytes: &[u8]) -> Result<(), BoundError> {
        while !bytes.is_empty() {
            let (chunk, rest) = Chunk::split(bytes)?;
            match chunk.kind {
                DOCUMENT_CHUNK => self.document(chunk.body)?,
                CHANGE_CHUNK => self.change(chunk.body)?,
                COMPRESSED_CHANGE_CHUNK => {
                    let inflated = self.inflate(chunk.body)?;
                    self.change(&inflated)?;
                }
                3 => return Err(BoundError::Malformed("bundle chunks are not accepted")),
                _ => return Err(BoundError::Malformed("unknown chunk type")),
            }
            bytes = rest;
        }
        Ok(())
    }

    fn change(&mut self, body: &[u8]) -> Result<(), BoundError> {
        let mut input = Cursor(body);
        let dependencies = input.unsigned()?;
        input.take(dependencies.checked_mul(HASH_BYTES).ok_or(BoundError::Malformed("dependency count"))?)?;
        input.prefixed()?; // actor
        input.unsigned()?; // sequence number
        input.unsigned()?; // start operation
        input.signed()?; // time
        input.prefixed()?; // message
        let other_actors = input.unsigned()?;
        for _ in 0..other_actors {
            // Each takes at least one byte, so a huge count ends at the end of the input.
            input.prefixed()?;
        }
        let columns = Columns::read(&mut input)?;
        let items = self.columns(&columns, &mut input)?;
        self.spend(items)
    }

    fn document(&mut self, body: &[u8]) -> Result<(), BoundError> {
        let mut input = Cursor(body);
        let actors = input.unsigned()?;
        for _ in 0..actors {
            input.prefixed()?;
        }
        let heads = input.unsigned()?;
        input.take(heads.checked_mul(HASH_BYTES).ok_or(BoundError::Malformed("head count"))?)?;
        let change_columns = Columns::read(&mut input)?;
        let operation_columns = Columns::read(&mut input)?;
        let changes = self.columns(&change_columns, &mut input)?;
        let operations = self.columns(&operation_columns, &mut input)?;
        self.spend(changes.saturating_add(operations))
    }

    /// The largest item count among `columns`, whose data comes next in `input`.
    fn columns(&mut self, columns: &Columns, input: &mut Cursor<'_>) -> Result<u64, BoundError> {
        let mut largest = 0;
        for &(specification, length) in &columns.0 {
            let mut data = input.take(length)?;
            let inflated;
            if specification & DEFLATE_BIT != 0 {
                inflated = self.inflate(data)?;
                data = &inflated;
            }
            largest = largest.max(column_items(specification, data, self.items)?);
        }
        Ok(largest)
    }

    fn spend(&mut self, items: u64) -> Result<(), BoundError> {
        self.items = self.items.checked_sub(items).ok_or(BoundError::Items)?;
        Ok(())
    }

    fn inflate(&mut self, deflated: &[u8]) -> Result<Vec<u8>, BoundError> {
        let mut inflated = Vec::new();
        flate2::bufread::DeflateDecoder::new(deflated)
            .take(self.inflated.saturating_add(1))
            .read_to_end(&mut inflated)
            .map_err(|_| BoundError::Malformed("a deflated part does not inflate"))?;
        self.inflated = self.inflated.checked_sub(inflated.len() as u64).ok_or(BoundError::Inflated)?;
        Ok(inflated)
    }
}

/// A chunk's column metadata: (specification, data length) of each column, in order.
struct Columns(Vec<(u64, u64)>);

impl Columns {
    fn read(input: &mut Cursor<'_>) -> Result<Columns, BoundError> {
        let count = input.unsigned()?;
        let mut columns = Vec::new();
        for _ in 0..count {
            // Each pair takes at least two bytes, so the vector grows with the input only.
            columns.push((input.unsigned()?, input.unsigned()?));
        }
        Ok(Columns(columns))
    }
}

/// How many entries a column holds, stopping as soon as it passes `most`. Raw value columns
/// hold bytes whose count another column gives, so they count nothing.
fn column_items(specification: u64, data: &[u8], most: u64) -> Result<u64, BoundError> {
    let kind = specification & TYPE_MASK;
    let mut input = Cursor(data);
    let mut items: u64 = 0;
    while !input.is_empty() {
        let added = match kind {
            RAW_VALUE => return Ok(0),
            // Alternating runs of false and true, each a count.
            BOOLEAN => input.unsigned()?,
            // Run-length encoded: a positive count and one value repeated, a negative count and
            // that many literal values, or zero and a count of nulls.
            _ => match input.signed()? {
                count if count > 0 => {
                    input.skip_value(kind)?;
                    count.unsigned_abs()
                }
                count if count < 0 => {
                    let count = count.unsigned_abs();
                    for _ in 0..count {
                        input.skip_value(kind)?;
                    }
                    count
                }
                _ => input.unsigned()?,
            },
        };
        items = items.saturating_add(added);
        if items > most {
            return Err(BoundError::Items);
        }
    }
    Ok(items)
}

/// Reads automerge's encodings from the front of a byte slice.
struct Cursor<'bytes>(&'bytes [u8]);

impl<'bytes> Cursor<'bytes> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn take(&mut self, count: u64) -> Result<&'bytes [u8], BoundError> {
        let count = usize::try_from(count).ok().filter(|&count| count <= self.0.len());
        let count = count.ok_or(BoundError::Malformed("a length runs past the end of the bytes"))?;
        let (taken, rest) = self.0.split_at(count);
        self.0 = rest;
        Ok(taken)
    }

    /// An unsigned LEB128 number of at most 64 bits.
    fn unsigned(&mut self) -> Result<u64, BoundError> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = self.take(1)?[0];
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                break;
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(BoundError::Malformed("a number does not fit 64 bits"))
    }

    /// A signed LEB128 number of at most 64 bits.
    fn signed(&mut self) -> Result<i64, BoundError> {
        let mut value: i64 = 0;
        let mut shift = 0;
        loop {
            let byte = self.take(1)?[0];
            if shift == 63 && !matches!(byte, 0x00 | 0x7f) {
                return Err(BoundError::Malformed("a number does not fit 64 bits"));
            }
            value |= i64::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                if shift < 64 && byte & 0x40 != 0 {
                    value |= -1 << shift;
                }
                return Ok(value);
            }
        }
    }

    /// A length-prefixed byte string.
    fn prefixed(&mut self) -> Result<&'bytes [u8], BoundError> {
        let length = self.unsigned()?;
        self.take(length)
    }

    /// One value of a run-length encoded column of type `kind`: a length-prefixed string, or a
    /// number, signed or not (only its framing matters here).
    fn skip_value(&mut self, kind: u64) -> Result<(), BoundError> {
        if kind == STRING {
            self.prefixed()?;
            return Ok(());
        }
        for _ in 0..LEB128_BYTES_MAX {
            if self.take(1)?[0] & 0x80 == 0 {
                return Ok(());
            }
        }
        Err(BoundError::Malformed("a number does not fit 64 bits"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unsigned(mut value: u64, out: &mut Vec<u8>) {
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    fn signed(mut value: i64, out: &mut Vec<u8>) {
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            let done = (value == 0 && byte & 0x40 == 0) || (value == -1 && byte & 0x40 != 0);
            out.push(if done { byte } else { byte | 0x80 });
            if done {
                return;
            }
        }
    }

    #[test]
    fn numbers_read_as_leb128_and_refuse_more_than_64_bits() {
        for value in [0, 1, 127, 128, 300, u64::MAX >> 1, u64::MAX] {
            let mut bytes = Vec::new();
            unsigned(value, &mut bytes);
            assert_eq!(Cursor(&bytes).unsigned(), Ok(value));
        }
        for value in [0, 1, -1, 63, -64, 64, -65, i64::MAX, i64::MIN] {
            let mut bytes = Vec::new();
            signed(value, &mut bytes);
            assert_eq!(Cursor(&bytes).signed(), Ok(value), "{value}");
        }
        let eleven = [0xff; 10].iter().copied().chain([0x01]).collect::<Vec<u8>>();
        assert!(Cursor(&eleven).unsigned().is_err());
        assert!(Cursor(&eleven).signed().is_err());
        assert!(Cursor(&[0x80]).unsigned().is_err(), "a number cut short");
    }

    #[test]
    fn columns_count_runs_literals_nulls_and_booleans() {
        // An unsigned column: a run of 5 sevens, literals 1 2 3, 4 nulls.
        let mut column = Vec::new();
        signed(5, &mut column);
        unsigned(7, &mut column);
        signed(-3, &mut column);
        for value in [1, 2, 3] {
            unsigned(value, &mut column);
        }
        signed(0, &mut column);
        unsigned(4, &mut column);
        assert_eq!(column_items(2, &column, u64::MAX), Ok(12));
        assert_eq!(column_items(2, &column, 11), Err(BoundError::Items), "the limit is checked as it counts");
        // A string column: a run of 2 "ab", then a literal "c".
        let column = [2, 2, b'a', b'b', 0x7f, 1, b'c'];
        assert_eq!(column_items(STRING, &column, u64::MAX), Ok(3));
        // Booleans: 3 false, 2 true.
        assert_eq!(column_items(BOOLEAN, &[3, 2], u64::MAX), Ok(5));
        assert_eq!(column_items(RAW_VALUE, &[3, 2, 9], u64::MAX), Ok(0));
        // A literal run longer than its values is malformed, not a long loop.
        let mut column = Vec::new();
        signed(i64::MIN, &mut column);
        unsigned(1, &mut column);
        assert!(matches!(column_items(2, &column, u64::MAX), Err(BoundError::Malformed(_))));
    }

    #[test]
    fn a_deflate_bomb_is_refused_at_the_inflation_budget() {
        use std::io::Write;
        let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..(INFLATED_BYTES_MAX >> 20) + 1 {
            encoder.write_all(&zeros).unwrap();
        }
        let bomb = encoder.finish().unwrap();
        assert!(bomb.len() < 1 << 20, "the bomb is small: {} bytes", bomb.len());
        let mut chunk = MAGIC.to_vec();
        chunk.extend([0; CHECKSUM_BYTES]);
        chunk.push(2);
        unsigned(bomb.len() as u64, &mut chunk);
        chunk.extend(&bomb);
        assert_eq!(Budget::after(0).charge(&chunk), Err(BoundError::Inflated));
    }

    /// Times are signed, and a document's change columns hold their deltas: the extremes take
    /// ten-byte numbers of either sign, which the walk reads as automerge does.
    #[test]
    fn extreme_times_and_deltas_pass_the_walk() {
        use automerge::transaction::{CommitOptions, Transactable};
        // Deltas of -(2^63 - 1) and 2^62 (automerge itself overflows on larger ones).
        for times in [&[i64::MAX / 2, i64::MIN / 2, 0, i64::MIN / 2 + 1][..], &[i64::MIN][..]] {
            let mut document = automerge::Automerge::new();
            for (index, &time) in times.iter().enumerate() {
                let mut transaction = document.transaction();
                transaction.put(automerge::ROOT, "field", (index as i64 + 1) * (i64::MIN / 4)).unwrap();
                transaction.commit_with(CommitOptions::default().with_time(time));
            }
            let saved = document.save();
            assert_eq!(Budget::after(0).charge(&saved), Ok(()), "{times:?}");
            for change in document.get_changes(&[]) {
                assert_eq!(Budget::after(0).charge(change.raw_bytes()), Ok(()), "time {}", change.timestamp());
            }
            assert!(automerge::Automerge::load(&saved).is_ok());
        }
    }

    #[test]
    fn chunks_without_magic_or_of_unknown_type_are_malformed() {
        assert!(matches!(Budget::after(0).charge(b"not automerge"), Err(BoundError::Malformed(_))));
        let mut chunk = MAGIC.to_vec();
        chunk.extend([0; CHECKSUM_BYTES]);
        chunk.extend([9, 0]);
        assert!(matches!(Budget::after(0).charge(&chunk), Err(BoundError::Malformed(_))));
        assert_eq!(Budget::after(0).charge(&[]), Ok(()), "no chunks declare nothing");
    }
}
