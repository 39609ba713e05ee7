//! A bounded, non-recursive scanner over the Yjs binary formats (update v1 and state vector v1),
//! run on untrusted bytes before any of them reach yrs's decoder.
//!
//! yrs 0.28.1 decodes nested `Any` values recursively and without a depth bound, trusts some
//! fields that it then uses in debug-checked arithmetic, and differs from Yjs on a few content
//! kinds. This scanner walks the whole structure with an explicit stack and accepts only input on
//! which yrs and Yjs agree and which yrs can decode and integrate without panicking:
//!
//! - every length or count must fit in the bytes that remain, so a forged length never makes
//!   anyone reserve memory for data that is not there;
//! - varints are at most 10 bytes and must fit their field without losing bits; signed varints
//!   must fit in 63 bits of magnitude (yrs shifts by 69 or negates `i64::MIN` otherwise);
//! - client ids must fit in 53 bits (yrs `debug_assert`s it, and silently truncates in release);
//! - clocks, and clock plus length, must stay at or below `i32::MAX` (yrs subtracts clocks as
//!   `i32`, and adds them as `u32`);
//! - maps and arrays inside an `Any` value, and objects and arrays inside the JSON text of an
//!   embed or a format attribute, may enclose one another at most `nesting_depth_max` deep;
//! - strings must be UTF-8 and the JSON of embeds and format attributes must parse;
//! - content and type references must be ones both Yjs and yrs read the same way;
//! - the delete set must be sorted, non-overlapping and free of empty ranges (yrs assumes so);
//! - each client appears at most once per section, and no bytes may follow the delete set.
//!
//! The walk reports what it finds to a [`Visitor`], so the same code validates (with
//! [`Ignore`]), feeds the type-nesting guard and computes the canonical digest.

use std::collections::HashSet;

use super::TextError;

/// The largest client id Yjs can represent: ids are JavaScript safe integers below 2^53.
pub const CLIENT_ID_MAX: u64 = (1 << 53) - 1;

/// The largest clock, and the largest clock plus length, accepted anywhere in an update.
pub(crate) const CLOCK_MAX: u32 = i32::MAX as u32;

/// Info byte of a garbage-collected range.
const INFO_GC: u8 = 0;
/// Info byte of a skipped range (a gap inside a merged update).
const INFO_SKIP: u8 = 10;
/// Info bit: the item has a left origin.
const INFO_HAS_ORIGIN: u8 = 0b1000_0000;
/// Info bit: the item has a right origin.
const INFO_HAS_RIGHT_ORIGIN: u8 = 0b0100_0000;
/// Info bit: the item is a map entry (it has a parent sub key).
const INFO_HAS_PARENT_SUB: u8 = 0b0010_0000;
/// The low five bits of the info byte are the content reference.
const INFO_CONTENT_MASK: u8 = 0b0001_1111;

const CONTENT_DELETED: u8 = 1;
const CONTENT_JSON: u8 = 2;
const CONTENT_BINARY: u8 = 3;
const CONTENT_STRING: u8 = 4;
const CONTENT_EMBED: u8 = 5;
const CONTENT_FORMAT: u8 = 6;
const CONTENT_TYPE: u8 = 7;
const CONTENT_ANY: u8 = 8;
const CONTENT_DOC: u8 = 9;

/// Shared type references (the byte after a type content's info).
pub(crate) const TYPE_ARRAY: u8 = 0;
pub(crate) const TYPE_MAP: u8 = 1;
pub(crate) const TYPE_TEXT: u8 = 2;
pub(crate) const TYPE_XML_ELEMENT: u8 = 3;
pub(crate) const TYPE_XML_FRAGMENT: u8 = 4;
const TYPE_XML_HOOK: u8 = 5;
pub(crate) const TYPE_XML_TEXT: u8 = 6;
const TYPE_WEAK_LINK: u8 = 7;

/// `Any` value tags, as written by lib0's `writeAny` and read by yrs's `Any::decode`.
pub(crate) const ANY_UNDEFINED: u8 = 127;
pub(crate) const ANY_NULL: u8 = 126;
pub(crate) const ANY_INTEGER: u8 = 125;
pub(crate) const ANY_FLOAT32: u8 = 124;
pub(crate) const ANY_FLOAT64: u8 = 123;
pub(crate) const ANY_BIGINT: u8 = 122;
pub(crate) const ANY_FALSE: u8 = 121;
pub(crate) const ANY_TRUE: u8 = 120;
pub(crate) const ANY_STRING: u8 = 119;
pub(crate) const ANY_MAP: u8 = 118;
pub(crate) const ANY_ARRAY: u8 = 117;
pub(crate) const ANY_BUFFER: u8 = 116;

/// A struct id: the client that created it and its position in that client's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Id {
    pub client: u64,
    pub clock: u32,
}

/// An item's parent, when the item states it (it does only when it has no origin at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Parent<'a> {
    /// A root type, by name.
    Named(&'a str),
    /// A nested type, by the id of the item that holds it.
    Nested(Id),
}

/// What an item holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Content<'a> {
    /// A tombstone of the given length whose content was garbage collected.
    Deleted,
    /// An opaque byte buffer.
    Binary(&'a [u8]),
    /// A string (its length is counted in UTF-16 code units).
    String(&'a str),
    /// A rich-text embed, as JSON text.
    Embed(&'a str),
    /// A rich-text formatting attribute: a key and a JSON value.
    Format { key: &'a str, value: &'a str },
    /// A nested shared type; XML elements also carry a tag name.
    Type { type_ref: u8, name: Option<&'a str> },
    /// `count` `Any` values, encoded back to back in `values`.
    Any { count: u32, values: &'a [u8] },
    /// A subdocument: its guid and its options as one `Any` value.
    Doc { guid: &'a str, options: &'a [u8] },
}

/// An item's header and content, as found in the update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Item<'a> {
    pub origin: Option<Id>,
    pub right_origin: Option<Id>,
    /// Present exactly when the item has neither origin.
    pub parent: Option<Parent<'a>>,
    /// The map key, present only when the item states its parent and is a map entry.
    pub parent_sub: Option<&'a str>,
    pub content: Content<'a>,
}

/// One struct of a client's run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Block<'a> {
    /// A garbage-collected range.
    Gc,
    /// A gap: the update does not hold this range.
    Skip,
    Item(Item<'a>),
}

/// Receives what the scanner finds, in the order it appears in the bytes.
pub(crate) trait Visitor<'a> {
    /// A struct of `length` clock units starting at `id` (`length` may be 0 for an empty item,
    /// which yrs drops); `encoded` is its encoding, from its info byte on.
    fn block(&mut self, id: Id, length: u32, block: Block<'a>, encoded: &'a [u8]);
    /// A range of the delete set.
    fn deleted(&mut self, id: Id, length: u32);
    /// The encoding of the whole delete set, once it has been read.
    fn delete_set(&mut self, _encoded: &'a [u8]) {}
}

/// A visitor that keeps nothing: scanning with it only validates.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Ignore;

impl Visitor<'_> for Ignore {
    fn block(&mut self, _id: Id, _length: u32, _block: Block<'_>, _encoded: &[u8]) {}
    fn deleted(&mut self, _id: Id, _length: u32) {}
}

/// A cursor over untrusted bytes whose every read is bounds-checked.
#[derive(Debug, Clone)]
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, offset: 0 }
    }

    pub(crate) fn offset(&self) -> usize {
        self.offset
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.offset
    }

    pub(crate) fn read_u8(&mut self) -> Result<u8, TextError> {
        let byte = *self.bytes.get(self.offset).ok_or(TextError::UnexpectedEnd { offset: self.offset })?;
        self.offset += 1;
        Ok(byte)
    }

    /// Takes the next `length` bytes, refusing a length past the end.
    pub(crate) fn take(&mut self, length: u64) -> Result<&'a [u8], TextError> {
        let remaining = self.remaining();
        let length = usize::try_from(length)
            .ok()
            .filter(|length| *length <= remaining)
            .ok_or(TextError::LengthPastEnd { offset: self.offset, length, remaining })?;
        let slice = &self.bytes[self.offset..self.offset + length];
        self.offset += length;
        Ok(slice)
    }

    /// An unsigned LEB128 varint (lib0 `writeVarUint`): at most 10 bytes, no bit lost.
    pub(crate) fn read_var_u64(&mut self) -> Result<u64, TextError> {
        let start = self.offset;
        let mut value: u64 = 0;
        for index in 0..10u32 {
            let byte = self.read_u8()?;
            let payload = u64::from(byte & 0x7f);
            let shift = 7 * index;
            if shift == 63 && payload > 1 {
                return Err(TextError::InvalidVarint { offset: start });
            }
            value |= payload << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(TextError::InvalidVarint { offset: start })
    }

    /// An unsigned varint that must fit in 32 bits (yrs reads these fields as `u32`).
    pub(crate) fn read_var_u32(&mut self) -> Result<u32, TextError> {
        let start = self.offset;
        let value = self.read_var_u64()?;
        u32::try_from(value).map_err(|_| TextError::InvalidVarint { offset: start })
    }

    /// A signed varint (lib0 `writeVarInt`): the first byte holds a continuation bit, a sign
    /// bit and 6 bits of magnitude, each further byte 7 bits. The magnitude must fit in 63 bits.
    pub(crate) fn read_var_i64(&mut self) -> Result<i64, TextError> {
        let start = self.offset;
        let first = self.read_u8()?;
        let negative = first & 0x40 != 0;
        let mut magnitude = u64::from(first & 0x3f);
        let mut more = first & 0x80 != 0;
        let mut shift = 6u32;
        while more {
            if shift > 62 {
                return Err(TextError::InvalidVarint { offset: start });
            }
            let byte = self.read_u8()?;
            let payload = u64::from(byte & 0x7f);
            if shift == 62 && payload > 1 {
                return Err(TextError::InvalidVarint { offset: start });
            }
            magnitude |= payload << shift;
            more = byte & 0x80 != 0;
            shift += 7;
        }
        let magnitude = i64::try_from(magnitude).map_err(|_| TextError::InvalidVarint { offset: start })?;
        Ok(if negative { -magnitude } else { magnitude })
    }

    /// A count of things that each take at least one byte: it may not exceed what remains.
    pub(crate) fn read_count(&mut self) -> Result<u32, TextError> {
        let offset = self.offset;
        let count = self.read_var_u32()?;
        let remaining = self.remaining();
        if usize::try_from(count).map_or(true, |count| count > remaining) {
            return Err(TextError::CountPastEnd { offset, count: u64::from(count), remaining });
        }
        Ok(count)
    }

    /// A length-prefixed byte buffer (lib0 `writeVarUint8Array`).
    pub(crate) fn read_buffer(&mut self) -> Result<&'a [u8], TextError> {
        let length = self.read_var_u32()?;
        self.take(u64::from(length))
    }

    /// A length-prefixed UTF-8 string (lib0 `writeVarString`).
    pub(crate) fn read_string(&mut self) -> Result<&'a str, TextError> {
        let offset = self.offset;
        let bytes = self.read_buffer()?;
        std::str::from_utf8(bytes).map_err(|_| TextError::InvalidUtf8 { offset })
    }

    /// A client id, which must be a JavaScript safe integer.
    fn read_client(&mut self) -> Result<u64, TextError> {
        let offset = self.offset;
        let client = self.read_var_u64()?;
        if client > CLIENT_ID_MAX {
            return Err(TextError::ClientIdTooLarge { offset, client });
        }
        Ok(client)
    }

    /// A clock, which must not exceed [`CLOCK_MAX`].
    fn read_clock(&mut self) -> Result<u32, TextError> {
        let offset = self.offset;
        let clock = self.read_var_u32()?;
        if clock > CLOCK_MAX {
            return Err(TextError::ClockTooLarge { offset, clock: u64::from(clock) });
        }
        Ok(clock)
    }

    fn read_id(&mut self) -> Result<Id, TextError> {
        let client = self.read_client()?;
        let clock = self.read_clock()?;
        Ok(Id { client, clock })
    }
}

/// Adds a length to a clock, refusing to pass [`CLOCK_MAX`].
fn clock_end(offset: usize, clock: u32, length: u32) -> Result<u32, TextError> {
    clock
        .checked_add(length)
        .filter(|end| *end <= CLOCK_MAX)
        .ok_or(TextError::ClockTooLarge { offset, clock: u64::from(clock) + u64::from(length) })
}

/// Walks a whole update v1, checking it against the bounds and reporting it to `visitor`.
///
/// `depth_max` bounds how many maps and arrays (or JSON objects and arrays) may enclose one
/// another inside a single value.
pub(crate) fn scan_update<'a, V: Visitor<'a>>(
    bytes: &'a [u8],
    depth_max: usize,
    visitor: &mut V,
) -> Result<(), TextError> {
    let mut reader = Reader::new(bytes);

    let client_count = reader.read_count()?;
    let mut clients = HashSet::new();
    for _ in 0..client_count {
        let struct_count = reader.read_count()?;
        let offset = reader.offset();
        let client = reader.read_client()?;
        if !clients.insert(client) {
            return Err(TextError::DuplicateClient { offset, client });
        }
        let mut clock = reader.read_clock()?;
        for _ in 0..struct_count {
            let offset = reader.offset();
            let id = Id { client, clock };
            let info = reader.read_u8()?;
            let (length, block) = match info {
                INFO_GC | INFO_SKIP => {
                    let length = reader.read_var_u32()?;
                    if length == 0 {
                        return Err(TextError::EmptyBlock { offset });
                    }
                    (length, if info == INFO_GC { Block::Gc } else { Block::Skip })
                }
                _ => {
                    let (length, item) = scan_item(&mut reader, id, info, depth_max)?;
                    (length, Block::Item(item))
                }
            };
            clock = clock_end(offset, clock, length)?;
            visitor.block(id, length, block, &bytes[offset..reader.offset()]);
        }
    }

    let delete_set_start = reader.offset();
    let client_count = reader.read_count()?;
    let mut clients = HashSet::new();
    for _ in 0..client_count {
        let offset = reader.offset();
        let client = reader.read_client()?;
        if !clients.insert(client) {
            return Err(TextError::DuplicateClient { offset, client });
        }
        let range_count = reader.read_count()?;
        let mut previous_end = 0;
        for _ in 0..range_count {
            let offset = reader.offset();
            let clock = reader.read_clock()?;
            let length = reader.read_var_u32()?;
            if length == 0 {
                return Err(TextError::EmptyDeleteRange { offset });
            }
            if clock < previous_end {
                return Err(TextError::UnorderedDeleteSet { offset, client });
            }
            previous_end = clock_end(offset, clock, length)?;
            visitor.deleted(Id { client, clock }, length);
        }
    }

    if reader.remaining() > 0 {
        return Err(TextError::TrailingBytes { offset: reader.offset() });
    }
    visitor.delete_set(&bytes[delete_set_start..]);
    Ok(())
}

/// Reads one item after its info byte; returns its length in clock units.
fn scan_item<'a>(reader: &mut Reader<'a>, id: Id, info: u8, depth_max: usize) -> Result<(u32, Item<'a>), TextError> {
    let info_offset = reader.offset() - 1;
    let content_ref = info & INFO_CONTENT_MASK;
    // Check the content reference first, so an unknown one is named as such.
    match content_ref {
        CONTENT_DELETED | CONTENT_BINARY | CONTENT_STRING | CONTENT_EMBED | CONTENT_FORMAT | CONTENT_TYPE
        | CONTENT_ANY | CONTENT_DOC => {}
        CONTENT_JSON => {
            // yrs 0.28.1 reads one more string than Yjs writes for this legacy content, so the
            // two would disagree on everything after it. Modern Yjs writes `Any` content instead.
            return Err(TextError::UnsupportedContent { offset: info_offset, what: "legacy JSON content" });
        }
        _ => return Err(TextError::UnknownContentRef { offset: info_offset, info }),
    }

    let read_reference = |reader: &mut Reader<'a>| -> Result<Id, TextError> {
        let offset = reader.offset();
        let reference = reader.read_id()?;
        // A client can only point at its own earlier structs.
        if reference.client == id.client && reference.clock >= id.clock {
            return Err(TextError::ForwardReference { offset });
        }
        Ok(reference)
    };
    let origin = if info & INFO_HAS_ORIGIN != 0 { Some(read_reference(reader)?) } else { None };
    let right_origin = if info & INFO_HAS_RIGHT_ORIGIN != 0 { Some(read_reference(reader)?) } else { None };
    let (parent, parent_sub) = if origin.is_none() && right_origin.is_none() {
        let offset = reader.offset();
        let parent = match reader.read_var_u32()? {
            1 => Parent::Named(reader.read_string()?),
            0 => Parent::Nested(read_reference(reader)?),
            value => return Err(TextError::InvalidParentInfo { offset, value }),
        };
        let parent_sub = if info & INFO_HAS_PARENT_SUB != 0 { Some(reader.read_string()?) } else { None };
        (Some(parent), parent_sub)
    } else {
        (None, None)
    };

    let (length, content) = match content_ref {
        CONTENT_DELETED => (reader.read_var_u32()?, Content::Deleted),
        CONTENT_BINARY => (1, Content::Binary(reader.read_buffer()?)),
        CONTENT_STRING => {
            let offset = reader.offset();
            let string = reader.read_string()?;
            let units = string.encode_utf16().count();
            let length = u32::try_from(units).map_err(|_| TextError::ClockTooLarge { offset, clock: units as u64 })?;
            (length, Content::String(string))
        }
        CONTENT_EMBED => (1, Content::Embed(read_json(reader, depth_max)?)),
        CONTENT_FORMAT => {
            let key = reader.read_string()?;
            let value = read_json(reader, depth_max)?;
            (1, Content::Format { key, value })
        }
        CONTENT_TYPE => {
            let offset = reader.offset();
            let type_ref = reader.read_u8()?;
            let name = match type_ref {
                TYPE_ARRAY | TYPE_MAP | TYPE_TEXT | TYPE_XML_FRAGMENT | TYPE_XML_TEXT => None,
                TYPE_XML_ELEMENT => Some(reader.read_string()?),
                // Yjs writes a hook name that yrs 0.28.1 does not read.
                TYPE_XML_HOOK => return Err(TextError::UnsupportedContent { offset, what: "XML hook" }),
                // A yrs-only experiment that this build of yrs does not decode.
                TYPE_WEAK_LINK => return Err(TextError::UnsupportedContent { offset, what: "weak link" }),
                _ => return Err(TextError::UnknownTypeRef { offset, type_ref }),
            };
            (1, Content::Type { type_ref, name })
        }
        CONTENT_ANY => {
            let count = reader.read_count()?;
            let start = reader.offset();
            for _ in 0..count {
                walk_any(reader, depth_max, &mut IgnoreAny)?;
            }
            (count, Content::Any { count, values: &reader.bytes[start..reader.offset()] })
        }
        // The only reference left is CONTENT_DOC: the match above returned for all others.
        _ => {
            let guid = reader.read_string()?;
            let start = reader.offset();
            walk_any(reader, depth_max, &mut IgnoreAny)?;
            (1, Content::Doc { guid, options: &reader.bytes[start..reader.offset()] })
        }
    };
    Ok((length, Item { origin, right_origin, parent, parent_sub, content }))
}

/// Reads the JSON text of an embed or a format attribute and checks it.
fn read_json<'a>(reader: &mut Reader<'a>, depth_max: usize) -> Result<&'a str, TextError> {
    let offset = reader.offset();
    let text = reader.read_string()?;
    check_json(text, depth_max).map_err(|error| match error {
        JsonProblem::TooDeep => TextError::NestingTooDeep { offset, maximum: depth_max },
        JsonProblem::Invalid => TextError::InvalidJson { offset },
    })?;
    Ok(text)
}

/// Why a JSON text was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JsonProblem {
    TooDeep,
    Invalid,
}

/// Checks that `text` nests objects and arrays at most `depth_max` deep (counting brackets
/// outside strings, without recursion) and then that it parses as JSON.
pub(crate) fn check_json(text: &str, depth_max: usize) -> Result<(), JsonProblem> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for byte in text.bytes() {
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > depth_max {
                    return Err(JsonProblem::TooDeep);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    // The bracket count bounds serde_json's recursion; serde_json also stops at 128 levels.
    serde_json::from_str::<serde::de::IgnoredAny>(text).map(|_| ()).map_err(|_| JsonProblem::Invalid)
}

/// Receives the parts of one `Any` value, depth first, from [`walk_any`].
pub(crate) trait AnySink<'a> {
    /// A value that holds no others; `payload` is its encoding after the tag.
    fn scalar(&mut self, tag: u8, payload: &'a [u8]);
    /// A map of `count` entries begins; each entry is a [`AnySink::key`] then a value.
    fn begin_map(&mut self, count: u64);
    /// An array of `count` values begins.
    fn begin_array(&mut self, count: u64);
    /// The key of the next map entry.
    fn key(&mut self, key: &'a str);
    /// The innermost open map or array ends.
    fn end(&mut self);
}

/// An [`AnySink`] that keeps nothing.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct IgnoreAny;

impl AnySink<'_> for IgnoreAny {
    fn scalar(&mut self, _tag: u8, _payload: &[u8]) {}
    fn begin_map(&mut self, _count: u64) {}
    fn begin_array(&mut self, _count: u64) {}
    fn key(&mut self, _key: &str) {}
    fn end(&mut self) {}
}

/// A map or array still being read by [`walk_any`].
#[derive(Debug)]
struct OpenContainer {
    /// Values still to read.
    remaining: u64,
    is_map: bool,
}

/// Reads one `Any` value with an explicit stack, so nesting costs heap, not call stack, and is
/// refused past `depth_max` enclosing maps and arrays.
pub(crate) fn walk_any<'a, S: AnySink<'a>>(
    reader: &mut Reader<'a>,
    depth_max: usize,
    sink: &mut S,
) -> Result<(), TextError> {
    let mut open: Vec<OpenContainer> = Vec::new();
    loop {
        let offset = reader.offset();
        let tag = reader.read_u8()?;
        match tag {
            ANY_UNDEFINED | ANY_NULL | ANY_FALSE | ANY_TRUE => sink.scalar(tag, &[]),
            ANY_INTEGER => {
                let start = reader.offset();
                reader.read_var_i64()?;
                sink.scalar(tag, &reader.bytes[start..reader.offset()]);
            }
            ANY_FLOAT32 => sink.scalar(tag, reader.take(4)?),
            ANY_FLOAT64 | ANY_BIGINT => sink.scalar(tag, reader.take(8)?),
            ANY_STRING => sink.scalar(tag, reader.read_string()?.as_bytes()),
            ANY_BUFFER => sink.scalar(tag, reader.read_buffer()?),
            ANY_MAP | ANY_ARRAY => {
                if open.len() >= depth_max {
                    return Err(TextError::NestingTooDeep { offset, maximum: depth_max });
                }
                let count_offset = reader.offset();
                let count = reader.read_var_u64()?;
                // Each entry takes at least one byte (a map entry at least two).
                let remaining = reader.remaining();
                if usize::try_from(count).map_or(true, |count| count > remaining) {
                    return Err(TextError::CountPastEnd { offset: count_offset, count, remaining });
                }
                let is_map = tag == ANY_MAP;
                if is_map {
                    sink.begin_map(count);
                } else {
                    sink.begin_array(count);
                }
                open.push(OpenContainer { remaining: count, is_map });
            }
            _ => return Err(TextError::UnknownAnyTag { offset, tag }),
        }
        // Move to the next value to read, closing every container that is complete.
        loop {
            let Some(container) = open.last_mut() else {
                return Ok(());
            };
            if container.remaining == 0 {
                open.pop();
                sink.end();
                continue;
            }
            container.remaining -= 1;
            if container.is_map {
                sink.key(reader.read_string()?);
            }
            break;
        }
    }
}

/// Checks a state vector v1 (a count, then client and clock pairs) and returns its entries.
pub(crate) fn scan_state_vector(bytes: &[u8]) -> Result<Vec<(u64, u32)>, TextError> {
    let mut reader = Reader::new(bytes);
    let count = reader.read_count()?;
    let mut entries = Vec::new();
    let mut clients = HashSet::new();
    for _ in 0..count {
        let offset = reader.offset();
        let client = reader.read_client()?;
        if !clients.insert(client) {
            return Err(TextError::DuplicateClient { offset, client });
        }
        let clock = reader.read_var_u32()?;
        entries.push((client, clock));
    }
    if reader.remaining() > 0 {
        return Err(TextError::TrailingBytes { offset: reader.offset() });
    }
    Ok(entries)
}
