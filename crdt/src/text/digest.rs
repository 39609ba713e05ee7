//! The canonical digest of a text document: a blake3 hash of its state that does not depend on
//! the order in which updates arrived, nor on how yrs happens to have split or merged its structs.
//!
//! The input is the document's whole state as one update (what `save` returns, pending structs
//! included), read by the bounds scanner. From it the digest takes three sections, each per
//! client in ascending order:
//!
//! 1. the clock ranges the document holds a struct for (items and garbage-collected ranges;
//!    skipped gaps are not held);
//! 2. the clock ranges that are deleted: the delete set, garbage-collected ranges and
//!    garbage-collected item content, merged. A deleted range is compared by its ids only,
//!    because garbage collection erases its content (and, for collected ranges, its position);
//! 3. every live (held, not deleted) clock unit, with its left and right origin, its parent when
//!    it states one, and its content, written as maximal runs: a unit continues the run before
//!    it when it follows it in the same client's clock, its origin is the run's last unit, it has
//!    the same right origin, and both hold string or `Any` content. That is exactly how yrs
//!    splits and merges items, so the runs are the same however the structs were cut.
//!
//! Map entries of `Any` values, and object members of JSON embeds and format attributes, are
//! hashed in key order, because yrs writes maps in the order of its hash maps.

use std::collections::BTreeMap;

use super::bounds::{self, AnySink, Block, Content, Id, Parent, Reader, Visitor};

/// Domain separation for the digest's hash.
const DIGEST_CONTEXT: &str = "concord text digest v1";

/// What the digest keeps of one struct.
#[derive(Debug)]
struct Held<'a> {
    clock: u32,
    length: u32,
    block: Block<'a>,
}

/// Collects the state, per client, from a scan of the saved update.
#[derive(Debug, Default)]
struct Collector<'a> {
    held: BTreeMap<u64, Vec<Held<'a>>>,
    deleted: BTreeMap<u64, Vec<(u32, u32)>>,
}

impl<'a> Visitor<'a> for Collector<'a> {
    fn block(&mut self, id: Id, length: u32, block: Block<'a>, _encoded: &'a [u8]) {
        if length == 0 || block == Block::Skip {
            return;
        }
        self.held.entry(id.client).or_default().push(Held { clock: id.clock, length, block });
    }

    fn deleted(&mut self, id: Id, length: u32) {
        self.deleted.entry(id.client).or_default().push((id.clock, id.clock + length));
    }
}

/// Sorts ranges and merges those that overlap or touch.
fn coalesce(mut ranges: Vec<(u32, u32)>) -> Vec<(u32, u32)> {
    ranges.sort_unstable();
    let mut merged: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// Feeds length-prefixed, typed fields to a blake3 hash.
///
/// The fields are gathered in a buffer and hashed in one go, which gives the same hash as feeding
/// them one by one (blake3 hashes a stream) for a fraction of the cost: most writers hash a few
/// dozen bytes, and blake3's incremental update has a fixed cost per call that was most of the
/// digest's time. A writer that gathers more than [`Writer::BUFFER_MAX`] bytes (a large text)
/// passes them on to a hasher, so the buffer stays bounded.
#[derive(Debug)]
struct Writer {
    buffer: Vec<u8>,
    /// Created once the buffer first overflows.
    hasher: Option<Box<blake3::Hasher>>,
}

impl Writer {
    const BUFFER_MAX: usize = 64 << 10;

    fn new(context: &str) -> Writer {
        let mut writer = Writer { buffer: Vec::with_capacity(96), hasher: None };
        writer.bytes(context.as_bytes());
        writer
    }

    /// Appends bytes as they are (no length prefix).
    fn raw(&mut self, bytes: &[u8]) {
        if self.buffer.len() + bytes.len() > Self::BUFFER_MAX {
            let hasher = self.hasher.get_or_insert_with(Box::default);
            hasher.update(&self.buffer);
            self.buffer.clear();
            if bytes.len() > Self::BUFFER_MAX {
                hasher.update(bytes);
                return;
            }
        }
        self.buffer.extend_from_slice(bytes);
    }

    fn u8(&mut self, value: u8) {
        self.raw(&[value]);
    }

    fn u32(&mut self, value: u32) {
        self.raw(&value.to_le_bytes());
    }

    fn u64(&mut self, value: u64) {
        self.raw(&value.to_le_bytes());
    }

    fn bytes(&mut self, value: &[u8]) {
        self.u64(value.len() as u64);
        self.raw(value);
    }

    fn id(&mut self, id: Option<Id>) {
        match id {
            None => self.u8(0),
            Some(id) => {
                self.u8(1);
                self.u64(id.client);
                self.u32(id.clock);
            }
        }
    }

    fn ranges(&mut self, per_client: &BTreeMap<u64, Vec<(u32, u32)>>) {
        self.u64(per_client.len() as u64);
        for (client, ranges) in per_client {
            self.u64(*client);
            self.u64(ranges.len() as u64);
            for (start, end) in ranges {
                self.u32(*start);
                self.u32(*end);
            }
        }
    }

    fn finish(self) -> [u8; 32] {
        match self.hasher {
            None => *blake3::hash(&self.buffer).as_bytes(),
            Some(mut hasher) => {
                hasher.update(&self.buffer);
                *hasher.finalize().as_bytes()
            }
        }
    }
}

/// A map or array being hashed by [`AnyHasher`].
#[derive(Debug)]
enum OpenValue<'a> {
    Array(Writer),
    Map { count: u64, key: Option<&'a str>, entries: Vec<[u8; 32]> },
}

/// Hashes one `Any` value with maps in key order, without recursion.
#[derive(Debug, Default)]
struct AnyHasher<'a> {
    open: Vec<OpenValue<'a>>,
    result: Option<[u8; 32]>,
}

impl<'a> AnyHasher<'a> {
    fn emit(&mut self, hash: [u8; 32]) {
        match self.open.last_mut() {
            None => self.result = Some(hash),
            Some(OpenValue::Array(writer)) => {
                writer.raw(&hash);
            }
            Some(OpenValue::Map { key, entries, .. }) => {
                let mut entry = Writer::new("any map entry");
                entry.bytes(key.take().unwrap_or_default().as_bytes());
                entry.raw(&hash);
                entries.push(entry.finish());
            }
        }
    }
}

impl<'a> AnySink<'a> for AnyHasher<'a> {
    fn scalar(&mut self, tag: u8, payload: &'a [u8]) {
        let mut writer = Writer::new("any scalar");
        writer.u8(tag);
        if tag == bounds::ANY_INTEGER {
            // Hash the number, not its (possibly overlong) varint.
            let value = Reader::new(payload).read_var_i64().unwrap_or_default();
            writer.u64(value as u64);
        } else {
            writer.bytes(payload);
        }
        let hash = writer.finish();
        self.emit(hash);
    }

    fn begin_map(&mut self, count: u64) {
        self.open.push(OpenValue::Map { count, key: None, entries: Vec::new() });
    }

    fn begin_array(&mut self, count: u64) {
        let mut writer = Writer::new("any array");
        writer.u64(count);
        self.open.push(OpenValue::Array(writer));
    }

    fn key(&mut self, key: &'a str) {
        if let Some(OpenValue::Map { key: slot, .. }) = self.open.last_mut() {
            *slot = Some(key);
        }
    }

    fn end(&mut self) {
        let hash = match self.open.pop() {
            Some(OpenValue::Array(writer)) => writer.finish(),
            Some(OpenValue::Map { count, mut entries, .. }) => {
                entries.sort_unstable();
                let mut writer = Writer::new("any map");
                writer.u64(count);
                for entry in &entries {
                    writer.raw(entry);
                }
                writer.finish()
            }
            None => return,
        };
        self.emit(hash);
    }
}

/// Hashes `count` `Any` values encoded back to back, one hash per value.
fn hash_any_values(values: &[u8], count: u32) -> Vec<[u8; 32]> {
    let mut reader = Reader::new(values);
    let mut hashes = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let mut hasher = AnyHasher::default();
        if bounds::walk_any(&mut reader, usize::MAX, &mut hasher).is_err() {
            break;
        }
        hashes.push(hasher.result.unwrap_or_default());
    }
    hashes
}

/// Hashes a JSON text with object members in key order. The text passed the bounds scanner, so
/// its depth is bounded (and serde_json stops at 128 levels); a text that does not parse is
/// hashed as it is.
fn hash_json(text: &str) -> [u8; 32] {
    fn feed(writer: &mut Writer, value: &serde_json::Value) {
        match value {
            serde_json::Value::Null => writer.u8(0),
            serde_json::Value::Bool(value) => {
                writer.u8(1);
                writer.u8(u8::from(*value));
            }
            serde_json::Value::Number(number) => {
                writer.u8(2);
                writer.bytes(number.to_string().as_bytes());
            }
            serde_json::Value::String(string) => {
                writer.u8(3);
                writer.bytes(string.as_bytes());
            }
            serde_json::Value::Array(values) => {
                writer.u8(4);
                writer.u64(values.len() as u64);
                for value in values {
                    feed(writer, value);
                }
            }
            serde_json::Value::Object(members) => {
                writer.u8(5);
                writer.u64(members.len() as u64);
                let mut sorted: Vec<_> = members.iter().collect();
                sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
                for (key, value) in sorted {
                    writer.bytes(key.as_bytes());
                    feed(writer, value);
                }
            }
        }
    }
    let mut writer = Writer::new("json");
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(value) => feed(&mut writer, &value),
        Err(_) => {
            writer.u8(255);
            writer.bytes(text.as_bytes());
        }
    }
    writer.finish()
}

/// A parent as the digest writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stated<'a> {
    Named(&'a str),
    Nested(Id),
}

/// The content of a run of live units.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RunContent {
    /// String content, as UTF-16 code units (yrs counts and splits strings in those).
    Units(Vec<u16>),
    /// `Any` content, one hash per value.
    Values(Vec<[u8; 32]>),
    /// Content of length one that never merges: a kind tag and a hash of it.
    Single(u8, [u8; 32]),
}

/// A maximal run of live units of one client.
#[derive(Debug)]
struct Run<'a> {
    client: u64,
    start: u32,
    end: u32,
    origin: Option<Id>,
    right_origin: Option<Id>,
    parent: Option<Stated<'a>>,
    parent_sub: Option<&'a str>,
    content: RunContent,
}

impl Run<'_> {
    fn write(&self, writer: &mut Writer) {
        writer.u64(self.client);
        writer.u32(self.start);
        writer.u32(self.end);
        writer.id(self.origin);
        writer.id(self.right_origin);
        match self.parent {
            None => writer.u8(0),
            Some(Stated::Named(name)) => {
                writer.u8(1);
                writer.bytes(name.as_bytes());
            }
            Some(Stated::Nested(id)) => {
                writer.u8(2);
                writer.id(Some(id));
            }
        }
        match self.parent_sub {
            None => writer.u8(0),
            Some(key) => {
                writer.u8(1);
                writer.bytes(key.as_bytes());
            }
        }
        match &self.content {
            RunContent::Units(units) => {
                writer.u8(1);
                writer.u64(units.len() as u64);
                for unit in units {
                    writer.raw(&unit.to_le_bytes());
                }
            }
            RunContent::Values(values) => {
                writer.u8(2);
                writer.u64(values.len() as u64);
                for value in values {
                    writer.raw(value);
                }
            }
            RunContent::Single(kind, hash) => {
                writer.u8(3);
                writer.u8(*kind);
                writer.raw(hash);
            }
        }
    }
}

/// The content of one item, in a form that can be sliced by clock offset.
#[derive(Debug)]
enum ItemContent {
    Units(Vec<u16>),
    Values(Vec<[u8; 32]>),
    Single(u8, [u8; 32]),
}

fn item_content(content: &Content<'_>) -> Option<ItemContent> {
    let single = |kind: u8, parts: &[&[u8]]| {
        let mut writer = Writer::new("content");
        for part in parts {
            writer.bytes(part);
        }
        ItemContent::Single(kind, writer.finish())
    };
    Some(match *content {
        Content::Deleted => return None,
        Content::String(string) => ItemContent::Units(string.encode_utf16().collect()),
        Content::Any { count, values } => ItemContent::Values(hash_any_values(values, count)),
        Content::Binary(bytes) => single(1, &[bytes]),
        Content::Embed(json) => single(2, &[&hash_json(json)]),
        Content::Format { key, value } => single(3, &[key.as_bytes(), &hash_json(value)]),
        Content::Type { type_ref, name } => single(4, &[&[type_ref], name.unwrap_or_default().as_bytes()]),
        Content::Doc { guid, options } => {
            let options = hash_any_values(options, 1);
            single(5, &[guid.as_bytes(), options.first().map(|hash| &hash[..]).unwrap_or_default()])
        }
    })
}

/// Live parts of `[start, end)` once the sorted, merged `deleted` ranges are taken out.
fn live_parts(start: u32, end: u32, deleted: &[(u32, u32)]) -> Vec<(u32, u32)> {
    let mut parts = Vec::new();
    let mut cursor = start;
    let first = deleted.partition_point(|(_, deleted_end)| *deleted_end <= start);
    for (deleted_start, deleted_end) in &deleted[first..] {
        if *deleted_start >= end {
            break;
        }
        if *deleted_start > cursor {
            parts.push((cursor, *deleted_start));
        }
        cursor = cursor.max(*deleted_end);
    }
    if cursor < end {
        parts.push((cursor, end));
    }
    parts
}

/// Computes the canonical digest of `state`, a whole-document update v1 produced by yrs.
///
/// Returns `None` if `state` does not pass the scanner, which would be a bug: the caller then
/// hashes the bytes as they are. (No depth limit applies here: the scanner and the hashing of
/// `Any` values use explicit stacks, and serde_json stops JSON at 128 levels.)
pub(crate) fn digest_of_state(state: &[u8]) -> Option<[u8; 32]> {
    let mut collector = Collector::default();
    bounds::scan_update(state, usize::MAX, &mut collector).ok()?;

    // Section 1: held ranges.
    let mut held_ranges: BTreeMap<u64, Vec<(u32, u32)>> = BTreeMap::new();
    // Section 2: deleted ranges.
    let mut deleted = std::mem::take(&mut collector.deleted);
    for (client, structs) in &collector.held {
        let ranges = structs.iter().map(|held| (held.clock, held.clock + held.length)).collect();
        held_ranges.insert(*client, coalesce(ranges));
        let erased = structs.iter().filter(|held| match held.block {
            Block::Gc => true,
            Block::Item(item) => item.content == Content::Deleted,
            Block::Skip => false,
        });
        deleted.entry(*client).or_default().extend(erased.map(|held| (held.clock, held.clock + held.length)));
    }
    let deleted: BTreeMap<u64, Vec<(u32, u32)>> =
        deleted.into_iter().map(|(client, ranges)| (client, coalesce(ranges))).collect();

    let mut writer = Writer::new(DIGEST_CONTEXT);
    writer.ranges(&held_ranges);
    writer.ranges(&deleted);

    // Section 3: live runs.
    let mut run_count: u64 = 0;
    let mut runs = Writer::new("runs");
    for (client, structs) in &collector.held {
        let client_deleted = deleted.get(client).map(Vec::as_slice).unwrap_or_default();
        let mut current: Option<Run<'_>> = None;
        for held in structs {
            let Block::Item(item) = held.block else { continue };
            let Some(content) = item_content(&item.content) else { continue };
            for (start, end) in live_parts(held.clock, held.clock + held.length, client_deleted) {
                let offset = (start - held.clock) as usize;
                let length = (end - start) as usize;
                let origin = if offset == 0 { item.origin } else { Some(Id { client: *client, clock: start - 1 }) };
                let piece = match &content {
                    ItemContent::Units(units) => {
                        RunContent::Units(units.get(offset..offset + length).unwrap_or_default().to_vec())
                    }
                    ItemContent::Values(values) => {
                        RunContent::Values(values.get(offset..offset + length).unwrap_or_default().to_vec())
                    }
                    ItemContent::Single(kind, hash) => RunContent::Single(*kind, *hash),
                };
                let continues = current.as_ref().is_some_and(|run| {
                    run.end == start
                        && origin == Some(Id { client: *client, clock: start - 1 })
                        && run.right_origin == item.right_origin
                        && matches!(
                            (&run.content, &piece),
                            (RunContent::Units(_), RunContent::Units(_))
                                | (RunContent::Values(_), RunContent::Values(_))
                        )
                });
                if continues && let Some(run) = current.as_mut() {
                    run.end = end;
                    match (&mut run.content, piece) {
                        (RunContent::Units(units), RunContent::Units(more)) => units.extend(more),
                        (RunContent::Values(values), RunContent::Values(more)) => values.extend(more),
                        _ => {}
                    }
                    continue;
                }
                if let Some(run) = current.take() {
                    run.write(&mut runs);
                    run_count += 1;
                }
                let stated = offset == 0 && item.origin.is_none() && item.right_origin.is_none();
                current = Some(Run {
                    client: *client,
                    start,
                    end,
                    origin,
                    right_origin: item.right_origin,
                    parent: item.parent.filter(|_| stated).map(|parent| match parent {
                        Parent::Named(name) => Stated::Named(name),
                        Parent::Nested(id) => Stated::Nested(id),
                    }),
                    parent_sub: item.parent_sub.filter(|_| stated),
                    content: piece,
                });
            }
        }
        if let Some(run) = current.take() {
            run.write(&mut runs);
            run_count += 1;
        }
    }
    writer.u64(run_count);
    writer.raw(&runs.finish());
    Some(writer.finish())
}

#[cfg(test)]
mod tests {
    use super::Writer;

    /// A writer hashes what it was given as one stream, however much it gathered before passing
    /// it on to its hasher: the same hash as blake3 of the whole input, below and past the buffer.
    #[test]
    fn a_writer_hashes_its_input_as_one_stream_past_its_buffer() {
        for total in [10, Writer::BUFFER_MAX - 1, Writer::BUFFER_MAX + 1, 3 * Writer::BUFFER_MAX + 17] {
            let input: Vec<u8> = (0..total).map(|index| (index * 7 % 251) as u8).collect();
            let mut writer = Writer::new("test");
            let mut expected = Writer::new("test").buffer;
            // Pieces of every size, and one larger than the buffer.
            let mut rest = input.as_slice();
            let mut size = 1;
            while !rest.is_empty() {
                let (piece, after) = rest.split_at(size.min(rest.len()));
                writer.raw(piece);
                expected.extend_from_slice(piece);
                rest = after;
                size = if size > Writer::BUFFER_MAX { 1 } else { size * 3 + 1 };
            }
            assert_eq!(writer.finish(), *blake3::hash(&expected).as_bytes(), "{total} bytes");
        }
    }
}
