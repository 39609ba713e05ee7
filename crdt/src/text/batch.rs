//! Deciding which structs yrs may integrate now, so that yrs never keeps structs pending and
//! never meets a clock gap; the rest is held back by the document until it can.
//!
//! Yjs keeps a struct pending while a struct it depends on is missing: its client's earlier
//! structs, its origins, or its stated parent. yrs 0.28.1 does that too for origins and parents,
//! but a struct that is only missing its client's earlier structs it integrates at once, behind a
//! placeholder ("skip") range; and its code for later filling a placeholder mishandles a struct
//! that straddles one (a garbage-collected range covering a placeholder and a struct already
//! held makes it subtract past zero: a panic in debug builds, a corrupted block list in release
//! builds). Honest peers send such ranges: a peer answering our state vector sends from the
//! start of the gap. And a struct kept pending inside yrs escapes the type-nesting guard, which
//! must see every struct that yrs integrates.
//!
//! So a [`Batch`] (everything held back so far, merged with the new update) is planned here the
//! way yrs would integrate it: each client's run is cut into segments at its skipped ranges;
//! segments that start past the document's clock for their client wait; in the others, structs
//! are taken in clock order for as long as everything each one depends on is in the document or
//! already taken. What is taken goes to yrs, which then finds nothing missing; what is not is
//! encoded back into one update and held, with the ids it waits for.
//!
//! What is taken is also cut here, not by yrs: a struct the document already holds is left
//! out, and one whose head it holds is written as its tail, with its client's previous clock as
//! origin and no stated parent, as Yjs integrates it. yrs would keep the parent the struct
//! states, even when the tail lands next to an item of another type (forged updates only), and
//! that corrupts the type's length counters.

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::bounds::{Block, Content, Id, IgnoreAny, Reader, Visitor, walk_any};
use super::nesting::{Analysis, Collected};

/// Info byte of a garbage-collected range.
const INFO_GC: u8 = 0;
/// Info byte of a skipped range.
const INFO_SKIP: u8 = 10;
/// Info bit: the item has a left origin.
const INFO_HAS_ORIGIN: u8 = 0b1000_0000;
/// Info bit: the item has a right origin.
const INFO_HAS_RIGHT_ORIGIN: u8 = 0b0100_0000;
const CONTENT_DELETED: u8 = 1;
const CONTENT_STRING: u8 = 4;
const CONTENT_ANY: u8 = 8;

/// Writes a lib0 unsigned varint.
pub(crate) fn write_var(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// One struct of a batch.
#[derive(Debug, Clone, Copy)]
struct Entry<'a> {
    id: Id,
    length: u32,
    block: Block<'a>,
    /// Its encoding, from its info byte on.
    encoded: &'a [u8],
}

impl Entry<'_> {
    fn end(&self) -> u32 {
        self.id.clock + self.length
    }

    /// What the struct needs before it can be integrated, given its client's clock: its right
    /// origin and stated parent, and its origin unless yrs will cut the struct's known start off
    /// (the part that remains then has its client's previous clock as origin).
    fn dependencies(&self, clock: u32) -> [Option<Id>; 3] {
        match self.block {
            Block::Item(item) if self.length > 0 => {
                let origin = item.origin.filter(|_| self.id.clock >= clock);
                let parent = match item.parent {
                    Some(super::bounds::Parent::Nested(parent)) => Some(parent),
                    _ => None,
                };
                [origin, item.right_origin, parent]
            }
            _ => [None; 3],
        }
    }
}

/// Consecutive structs of one client, with no skipped range between them.
#[derive(Debug, Clone)]
struct Segment<'a> {
    client: u64,
    start: u32,
    entries: Vec<Entry<'a>>,
}

/// An update cut into segments, collected by scanning it (a [`Visitor`]).
#[derive(Debug, Default)]
pub(crate) struct Batch<'a> {
    /// Segments in the order of the update: grouped by client, in clock order within a client.
    segments: Vec<Segment<'a>>,
    /// Whether the last struct read was a skipped range (the next struct opens a segment).
    after_skip: bool,
    delete_set: &'a [u8],
}

impl<'a> Visitor<'a> for Batch<'a> {
    fn block(&mut self, id: Id, length: u32, block: Block<'a>, encoded: &'a [u8]) {
        if block == Block::Skip {
            self.after_skip = true;
            return;
        }
        let opens = self.after_skip || self.segments.last().is_none_or(|segment| segment.client != id.client);
        if opens {
            self.segments.push(Segment { client: id.client, start: id.clock, entries: Vec::new() });
            self.after_skip = false;
        }
        if let Some(segment) = self.segments.last_mut() {
            segment.entries.push(Entry { id, length, block, encoded });
        }
    }

    fn deleted(&mut self, _id: Id, _length: u32) {}

    fn delete_set(&mut self, encoded: &'a [u8]) {
        self.delete_set = encoded;
    }
}

/// Which structs of a batch go to yrs now: per segment, how many leading ones; and the
/// document's clock for each client of the batch.
#[derive(Debug)]
pub(crate) struct Plan {
    taken: Vec<usize>,
    clocks: HashMap<u64, u32>,
    /// What the structs left out wait for: each of these ids (until one is present, nothing
    /// left out can go).
    awaits: Vec<Id>,
}

impl Plan {
    /// The ids that what is left out waits for.
    pub(crate) fn awaits(&self) -> &[Id] {
        &self.awaits
    }

    fn clock(&self, client: u64) -> u32 {
        self.clocks.get(&client).copied().unwrap_or_default()
    }
}

/// A struct as it goes to yrs.
#[derive(Debug)]
enum Outgoing<'a> {
    /// As it came.
    Whole(&'a Entry<'a>),
    /// Only its tail from `clock` on: the document already holds the rest.
    Tail { entry: &'a Entry<'a>, clock: u32 },
}

impl Outgoing<'_> {
    fn clock(&self) -> u32 {
        match self {
            Outgoing::Whole(entry) => entry.id.clock,
            Outgoing::Tail { clock, .. } => *clock,
        }
    }

    fn end(&self) -> u32 {
        match self {
            Outgoing::Whole(entry) | Outgoing::Tail { entry, .. } => entry.end(),
        }
    }
}

impl<'a> Batch<'a> {
    /// Plans the batch against `clock`, the document's clock for each client.
    pub(crate) fn plan(&self, clock: &impl Fn(u64) -> u32) -> Plan {
        let mut taken = vec![0usize; self.segments.len()];
        let clocks: HashMap<u64, u32> =
            self.segments.iter().map(|segment| (segment.client, clock(segment.client))).collect();
        let clock = |client: u64| clocks.get(&client).copied().unwrap_or_else(|| clock(client));
        // Segments per client, and the clock each has reached so far.
        let mut by_client: HashMap<u64, Vec<usize>> = HashMap::new();
        for (index, segment) in self.segments.iter().enumerate() {
            by_client.entry(segment.client).or_default().push(index);
        }
        let mut reached: Vec<u32> = self.segments.iter().map(|segment| segment.start).collect();
        let present = |id: Id, reached: &[u32]| {
            id.clock < clock(id.client)
                || by_client.get(&id.client).is_some_and(|segments| {
                    segments.iter().any(|&index| self.segments[index].start <= id.clock && id.clock < reached[index])
                })
        };
        // Segments waiting for a client to reach a clock: client -> clock -> segments.
        let mut waiting: HashMap<u64, BTreeMap<u32, Vec<usize>>> = HashMap::new();
        let mut queue: VecDeque<usize> = (0..self.segments.len())
            .filter(|&index| self.segments[index].start <= clock(self.segments[index].client))
            .collect();
        while let Some(index) = queue.pop_front() {
            let segment = &self.segments[index];
            let known = clock(segment.client);
            let before = reached[index];
            let mut blocked = None;
            while let Some(entry) = segment.entries.get(taken[index]) {
                if entry.end() > known
                    && let Some(missing) =
                        entry.dependencies(known).into_iter().flatten().find(|id| !present(*id, &reached))
                {
                    blocked = Some(missing);
                    break;
                }
                taken[index] += 1;
                reached[index] = entry.end();
            }
            if let Some(missing) = blocked {
                waiting.entry(missing.client).or_default().entry(missing.clock).or_default().push(index);
            }
            // Wake the segments waiting for what this one has just reached.
            if reached[index] > before
                && let Some(clocks) = waiting.get_mut(&segment.client)
            {
                let woken: Vec<u32> = clocks.range(segment.start..reached[index]).map(|(clock, _)| *clock).collect();
                for clock in woken {
                    queue.extend(clocks.remove(&clock).unwrap_or_default());
                }
            }
        }
        let mut awaits: Vec<Id> = waiting
            .iter()
            .flat_map(|(client, clocks)| clocks.keys().map(|clock| Id { client: *client, clock: *clock }))
            .collect();
        for segment in &self.segments {
            if segment.start > clock(segment.client) {
                // A segment past its client's clock waits for the clock to reach its start.
                awaits.push(Id { client: segment.client, clock: segment.start - 1 });
            }
        }
        Plan { taken, clocks, awaits }
    }

    /// The structs that go to yrs, in order: the taken ones, less what the document already
    /// holds. A struct the document holds entirely is left out; one it holds the head of is cut
    /// here rather than by yrs, which keeps the parent the struct states even when it puts the
    /// tail next to a neighbour in another type (only forged updates do that, but it corrupts
    /// yrs's length counters). Empty items, which yrs drops, are left out too.
    fn outgoing(&self, plan: &Plan) -> Vec<(u64, Vec<Outgoing<'_>>)> {
        let mut runs: Vec<(u64, Vec<Outgoing<'_>>)> = Vec::new();
        for (index, segment) in self.segments.iter().enumerate() {
            let known = plan.clock(segment.client);
            let outgoing = segment.entries[..plan.taken[index]].iter().filter_map(|entry| {
                if entry.end() <= known || entry.length == 0 {
                    None
                } else if entry.id.clock < known {
                    Some(Outgoing::Tail { entry, clock: known })
                } else {
                    Some(Outgoing::Whole(entry))
                }
            });
            match runs.last_mut() {
                Some((client, structs)) if *client == segment.client => structs.extend(outgoing),
                _ => runs.push((segment.client, outgoing.collect())),
            }
        }
        runs.retain(|(_, structs)| !structs.is_empty());
        runs
    }

    /// The structs that go to yrs, in the order [`Batch::encode_taken`] writes them, for the
    /// type-nesting guard.
    pub(crate) fn collect_taken(&self, plan: &Plan) -> Collected {
        let mut collected = Collected::default();
        for (_, structs) in self.outgoing(plan) {
            for outgoing in structs {
                match outgoing {
                    Outgoing::Whole(entry) => collected.push(entry.id, entry.length, &entry.block),
                    Outgoing::Tail { entry, clock } => {
                        let id = Id { client: entry.id.client, clock };
                        match entry.block {
                            Block::Item(item) => collected.push_tail(id, entry.end() - clock, item.right_origin),
                            _ => collected.push(id, entry.end() - clock, &entry.block),
                        }
                    }
                }
            }
        }
        collected
    }

    /// Encodes what goes to yrs, with the delete set, writing the structs the guard found
    /// offending as garbage-collected ranges.
    pub(crate) fn encode_taken(&self, plan: &Plan, analysis: &Analysis) -> Vec<u8> {
        let runs = self.outgoing(plan);
        let mut out = Vec::new();
        write_var(runs.len() as u64, &mut out);
        let mut order = 0usize;
        for (client, structs) in &runs {
            let mut body = Vec::new();
            let mut count = 0usize;
            let mut previous_end: Option<u32> = None;
            for outgoing in structs {
                if let Some(end) = previous_end
                    && outgoing.clock() > end
                {
                    body.push(INFO_SKIP);
                    write_var(u64::from(outgoing.clock() - end), &mut body);
                    count += 1;
                }
                if analysis.is_offending(order) {
                    body.push(INFO_GC);
                    write_var(u64::from(outgoing.end() - outgoing.clock()), &mut body);
                } else {
                    match outgoing {
                        Outgoing::Whole(entry) => body.extend_from_slice(entry.encoded),
                        Outgoing::Tail { entry, clock } => encode_tail(entry, *clock, &mut body),
                    }
                }
                order += 1;
                count += 1;
                previous_end = Some(outgoing.end());
            }
            write_var(count as u64, &mut out);
            write_var(*client, &mut out);
            write_var(u64::from(structs.first().map_or(0, Outgoing::clock)), &mut out);
            out.extend_from_slice(&body);
        }
        out.extend_from_slice(self.delete_set);
        out
    }

    /// Encodes what does not go to yrs as one update (with an empty delete set), or `None` if
    /// everything goes.
    pub(crate) fn encode_held(&self, plan: &Plan) -> Option<Vec<u8>> {
        let mut runs: Vec<(u64, Vec<&Entry<'_>>)> = Vec::new();
        for (index, segment) in self.segments.iter().enumerate() {
            let held = &segment.entries[plan.taken[index]..];
            match runs.last_mut() {
                Some((client, entries)) if *client == segment.client => entries.extend(held),
                _ => runs.push((segment.client, held.iter().collect())),
            }
        }
        runs.retain(|(_, entries)| !entries.is_empty());
        if runs.is_empty() {
            return None;
        }
        let mut out = Vec::new();
        write_var(runs.len() as u64, &mut out);
        for (client, entries) in runs {
            let mut body = Vec::new();
            let mut count = 0usize;
            let mut previous_end: Option<u32> = None;
            for entry in &entries {
                if let Some(end) = previous_end
                    && entry.id.clock > end
                {
                    body.push(INFO_SKIP);
                    write_var(u64::from(entry.id.clock - end), &mut body);
                    count += 1;
                }
                body.extend_from_slice(entry.encoded);
                count += 1;
                previous_end = Some(entry.end());
            }
            write_var(count as u64, &mut out);
            write_var(client, &mut out);
            write_var(u64::from(entries.first().map_or(0, |entry| entry.id.clock)), &mut out);
            out.extend_from_slice(&body);
        }
        out.push(0);
        Some(out)
    }
}

/// Encodes the tail of `entry` from `clock` on, as Yjs integrates a struct whose head is known:
/// its origin is its client's previous clock, its parent is found through its neighbours, and
/// a string cut between the halves of a surrogate pair starts with U+FFFD instead of the lone
/// half.
fn encode_tail(entry: &Entry<'_>, clock: u32, out: &mut Vec<u8>) {
    let cut = clock - entry.id.clock;
    let length = entry.length - cut;
    let Block::Item(item) = entry.block else {
        // A garbage-collected range (skipped ranges are not in segments).
        out.push(INFO_GC);
        write_var(u64::from(length), out);
        return;
    };
    let content_ref = match item.content {
        Content::Deleted => CONTENT_DELETED,
        Content::String(_) => CONTENT_STRING,
        Content::Any { .. } => CONTENT_ANY,
        // Other contents are one unit long, so never cut.
        _ => {
            out.extend_from_slice(entry.encoded);
            return;
        }
    };
    let mut info = content_ref | INFO_HAS_ORIGIN;
    if item.right_origin.is_some() {
        info |= INFO_HAS_RIGHT_ORIGIN;
    }
    out.push(info);
    write_var(entry.id.client, out);
    write_var(u64::from(clock - 1), out);
    if let Some(right_origin) = item.right_origin {
        write_var(right_origin.client, out);
        write_var(u64::from(right_origin.clock), out);
    }
    match item.content {
        Content::String(string) => {
            let units: Vec<u16> = string.encode_utf16().skip(cut as usize).collect();
            let tail = String::from_utf16_lossy(&units);
            write_var(tail.len() as u64, out);
            out.extend_from_slice(tail.as_bytes());
        }
        Content::Any { count, values } => {
            let mut reader = Reader::new(values);
            for _ in 0..cut {
                // The values passed the scanner when the update was read.
                if walk_any(&mut reader, usize::MAX, &mut IgnoreAny).is_err() {
                    break;
                }
            }
            write_var(u64::from(count - cut), out);
            out.extend_from_slice(&values[reader.offset()..]);
        }
        _ => write_var(u64::from(length), out),
    }
}
