//! The type-nesting guard: keeps shared types (maps, arrays, texts, XML nodes) from nesting deeper
//! than the limit, because yrs deletes and garbage-collects nested types by recursion.
//!
//! In yrs 0.28.1, deleting a shared type calls itself once per level of live types nested inside
//! it, and so does the garbage collection that follows. Twenty thousand nested arrays fit in an
//! update of about 120 KiB, and deleting the outermost one then overflows the stack, which aborts
//! the process: `catch_unwind` cannot help. Nesting is spread over many structs and many updates,
//! and an item's parent is often not written down but inherited from its neighbour (its origin),
//! so the scanner alone cannot see it.
//!
//! The guard keeps a [`NestingIndex`]: for every integrated clock range, an upper bound on the
//! depth of the type that holds it, and whether the range is a type. Before structs are handed
//! to yrs (all at once: see `batch.rs`, which makes sure yrs keeps none of them pending),
//! [`analyze`] works out the same bound for each of them, following parents and neighbours
//! through the structs and the index, and taking the deepest of all readings when they disagree
//! (which honest updates never do). A type that would sit deeper than the limit is handed to yrs
//! as a garbage-collected range instead, and so is an item whose stated parent holds no type
//! (Yjs does the same for those; yrs fails half-way). Whatever was inside such a type then has
//! no parent, and yrs turns it into garbage-collected ranges too. As the bound depends only on
//! the structs, not on the order they arrive in, replicas agree on what is dropped. After yrs has
//! integrated them, [`NestingIndex::record`] adds the ranges that yrs reports as inserted.
//!
//! Depths count types: a root type is depth 0, a type inside it depth 1, and so on.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use super::bounds::{Block, Content, Id, Parent};

/// Where a range of structs sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placement {
    /// An upper bound on the depth of the type holding the range; `None` when no parent could be
    /// found (garbage-collected ranges, or items that yrs turned into garbage for that reason).
    pub parent_depth: Option<u32>,
    /// Whether the range is a single item holding a shared type.
    pub is_type: bool,
}

impl Placement {
    /// The reading that allows for both: the deeper parent, and a type if either is one.
    fn combine(self, other: Placement) -> Placement {
        Placement { parent_depth: self.parent_depth.max(other.parent_depth), is_type: self.is_type || other.is_type }
    }
}

/// An integrated range `[start, end)` of one client, keyed by its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    end: u32,
    placement: Placement,
}

/// The placement of every integrated clock range, per client. Adjacent ranges with the same
/// placement are merged, so one client typing into one text is a single span.
#[derive(Debug, Default, Clone)]
pub(crate) struct NestingIndex {
    clients: HashMap<u64, BTreeMap<u32, Span>>,
}

impl NestingIndex {
    /// The placement of the range holding `id`, if it was integrated.
    pub(crate) fn lookup(&self, id: Id) -> Option<Placement> {
        let spans = self.clients.get(&id.client)?;
        let (_, span) = spans.range(..=id.clock).next_back()?;
        (span.end > id.clock).then_some(span.placement)
    }

    /// Records `[start, end)` of `client`, leaving any part that is already recorded as it is.
    pub(crate) fn insert(&mut self, client: u64, start: u32, end: u32, placement: Placement) {
        if start >= end {
            return;
        }
        let spans = self.clients.entry(client).or_default();
        let mut overlapping: Vec<(u32, u32)> = spans
            .range(..end)
            .rev()
            .take_while(|(_, span)| span.end > start)
            .map(|(span_start, span)| (*span_start, span.end))
            .collect();
        overlapping.reverse();
        let mut cursor = start;
        for (span_start, span_end) in overlapping {
            if span_start > cursor {
                insert_merged(spans, cursor, span_start, placement);
            }
            cursor = cursor.max(span_end);
        }
        if cursor < end {
            insert_merged(spans, cursor, end, placement);
        }
    }

    /// Records what yrs reports it inserted (`inserted`, per client), placing each range as the
    /// analysis of the structs it came from found.
    pub(crate) fn record(&mut self, analysis: &Analysis, inserted: &[(u64, Vec<Range<u32>>)]) {
        for (client, ranges) in inserted {
            for range in ranges {
                for (start, end, placement) in analysis.placements(*client, range.clone()) {
                    self.insert(*client, start, end, placement);
                }
            }
        }
    }
}

/// Inserts a span that overlaps none, merging it with equal neighbours that touch it.
fn insert_merged(spans: &mut BTreeMap<u32, Span>, mut start: u32, mut end: u32, placement: Placement) {
    if !placement.is_type {
        let left = spans.range(..start).next_back().map(|(left_start, left)| (*left_start, *left));
        if let Some((left_start, left)) = left
            && left.end == start
            && left.placement == placement
        {
            spans.remove(&left_start);
            start = left_start;
        }
        if let Some(right) = spans.get(&end).copied()
            && right.placement == placement
        {
            spans.remove(&end);
            end = right.end;
        }
    }
    spans.insert(start, Span { end, placement });
}

/// How an item finds its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ParentSpec {
    /// A root type.
    Root,
    /// The type held by the item with this id.
    Nested(Id),
    /// The parent of its left neighbour (origin), or else of its right one (right origin).
    Neighbours(Option<Id>, Option<Id>),
}

/// The structure of one struct, as the guard needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Gc,
    Item { parent: ParentSpec, is_type: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Struct {
    id: Id,
    length: u32,
    kind: Kind,
}

/// The structs handed to yrs in one go, in order.
#[derive(Debug, Default, Clone)]
pub(crate) struct Collected {
    structs: Vec<Struct>,
}

impl Collected {
    /// Adds a struct of `length` clock units at `id` (empty items and skipped ranges, which yrs
    /// never integrates, are left out by the caller).
    pub(crate) fn push(&mut self, id: Id, length: u32, block: &Block<'_>) {
        let kind = match block {
            Block::Skip | Block::Gc => Kind::Gc,
            Block::Item(item) => {
                let parent = match item.parent {
                    Some(Parent::Named(_)) => ParentSpec::Root,
                    Some(Parent::Nested(id)) => ParentSpec::Nested(id),
                    None => ParentSpec::Neighbours(item.origin, item.right_origin),
                };
                Kind::Item { parent, is_type: matches!(item.content, Content::Type { .. }) }
            }
        };
        self.structs.push(Struct { id, length, kind });
    }

    /// Adds the tail of an item whose head the document already holds: it has its client's
    /// previous clock as origin, and finds its parent through its neighbours.
    pub(crate) fn push_tail(&mut self, id: Id, length: u32, right_origin: Option<Id>) {
        let origin = id.clock.checked_sub(1).map(|clock| Id { client: id.client, clock });
        let kind = Kind::Item { parent: ParentSpec::Neighbours(origin, right_origin), is_type: false };
        self.structs.push(Struct { id, length, kind });
    }
}

/// Per client, the structs of one source as `(start, end, struct index)`, sorted by start.
type Lookup = HashMap<u64, Vec<(u32, u32, usize)>>;

/// The outcome of [`analyze`]: a parent-depth bound for every struct, and which structs must be
/// handed to yrs as garbage-collected ranges instead.
#[derive(Debug)]
pub(crate) struct Analysis {
    structs: Vec<Struct>,
    /// Per struct, the bound on its parent's depth (`None`: no parent found).
    parent_depths: Vec<Option<u32>>,
    /// Per struct: a type nested too deep, or an item whose stated parent holds no type.
    offending: Vec<bool>,
    /// Per source, per client: `(start, end, struct index)` sorted by start, not overlapping.
    lookups: Vec<Lookup>,
}

impl Analysis {
    /// Indices of the structs that contain `id`, one per source at most.
    fn containing(&self, id: Id) -> impl Iterator<Item = usize> + '_ {
        self.lookups.iter().filter_map(move |lookup| {
            let runs = lookup.get(&id.client)?;
            let position = runs.partition_point(|(start, _, _)| *start <= id.clock);
            let (_, end, index) = *runs.get(position.checked_sub(1)?)?;
            (end > id.clock).then_some(index)
        })
    }

    /// Whether struct `index` (in the order it was pushed) must become a garbage-collected range.
    pub(crate) fn is_offending(&self, index: usize) -> bool {
        self.offending.get(index).copied().unwrap_or(false)
    }

    fn placement_of(&self, index: usize) -> Placement {
        match self.structs[index].kind {
            _ if self.offending[index] => Placement { parent_depth: None, is_type: false },
            Kind::Gc => Placement { parent_depth: None, is_type: false },
            Kind::Item { is_type, .. } => Placement { parent_depth: self.parent_depths[index], is_type },
        }
    }

    /// Splits `range` of `client` into pieces, each placed as the structs that cover it (the
    /// combination when several do). Parts no struct covers are left out.
    fn placements(&self, client: u64, range: Range<u32>) -> Vec<(u32, u32, Placement)> {
        let mut pieces: Vec<(u32, u32, Placement)> = Vec::new();
        for lookup in &self.lookups {
            let Some(runs) = lookup.get(&client) else { continue };
            let first = runs.partition_point(|(_, end, _)| *end <= range.start);
            let mut source_pieces = Vec::new();
            for (start, end, index) in &runs[first..] {
                if *start >= range.end {
                    break;
                }
                let start = (*start).max(range.start);
                let end = (*end).min(range.end);
                if start < end {
                    source_pieces.push((start, end, self.placement_of(*index)));
                }
            }
            pieces = overlay(&pieces, &source_pieces);
        }
        pieces
    }
}

/// Overlays two sorted lists of non-overlapping pieces: where they overlap, the placements
/// combine. The result is sorted and non-overlapping too.
fn overlay(first: &[(u32, u32, Placement)], second: &[(u32, u32, Placement)]) -> Vec<(u32, u32, Placement)> {
    let mut bounds: Vec<u32> = first.iter().chain(second).flat_map(|(start, end, _)| [*start, *end]).collect();
    bounds.sort_unstable();
    bounds.dedup();
    let covering = |pieces: &[(u32, u32, Placement)], start: u32| -> Option<Placement> {
        let position = pieces.partition_point(|(piece_start, _, _)| *piece_start <= start);
        let (_, end, placement) = *pieces.get(position.checked_sub(1)?)?;
        (end > start).then_some(placement)
    };
    let mut result: Vec<(u32, u32, Placement)> = Vec::new();
    for window in bounds.windows(2) {
        let (start, end) = (window[0], window[1]);
        let placement = match (covering(first, start), covering(second, start)) {
            (Some(a), Some(b)) => a.combine(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => continue,
        };
        match result.last_mut() {
            Some(last) if last.1 == start && last.2 == placement => last.1 = end,
            _ => result.push((start, end, placement)),
        }
    }
    result
}

/// Progress of the depth-first walk over one struct.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Visit {
    New,
    /// On the walk's stack: reaching it again means a cycle, which only forged updates have.
    Active,
    Done(Option<u32>),
}

/// One struct being resolved by the walk.
#[derive(Debug)]
struct Frame {
    index: usize,
    /// Structs whose parent bound feeds this one's, with the depth added.
    edges: Vec<(usize, u32)>,
    next: usize,
    best: Option<u32>,
}

/// Works out a parent-depth bound for every struct of `sources` (what is about to be handed to
/// yrs) and marks as offending every type that would nest deeper than `depth_max` and every
/// item that names as its parent an item holding no type. Yjs turns the latter into
/// garbage-collected ranges, and yrs fails on them half-way through an update; turning the former
/// into garbage too keeps the nesting bounded whatever order structs arrive in (their contents,
/// and everything inside them, then become garbage-collected ranges on integration).
pub(crate) fn analyze(sources: &[&Collected], index: &NestingIndex, depth_max: usize) -> Analysis {
    let mut structs = Vec::new();
    let mut lookups = Vec::new();
    for source in sources {
        let mut lookup = Lookup::new();
        for block in &source.structs {
            lookup.entry(block.id.client).or_default().push((
                block.id.clock,
                block.id.clock.saturating_add(block.length),
                structs.len(),
            ));
            structs.push(*block);
        }
        for runs in lookup.values_mut() {
            runs.sort_unstable();
        }
        lookups.push(lookup);
    }
    let count = structs.len();
    let mut analysis = Analysis { parent_depths: vec![None; count], offending: vec![false; count], structs, lookups };

    let mut visits = vec![Visit::New; analysis.structs.len()];
    for root in 0..analysis.structs.len() {
        if visits[root] != Visit::New {
            continue;
        }
        let mut stack = vec![open_frame(&mut analysis, index, root)];
        visits[root] = Visit::Active;
        while let Some(frame) = stack.last_mut() {
            if let Some(&(dependency, added)) = frame.edges.get(frame.next) {
                match visits[dependency] {
                    Visit::Done(depth) => {
                        frame.best = frame.best.max(depth.map(|depth| depth.saturating_add(added)));
                        frame.next += 1;
                    }
                    Visit::Active => frame.next += 1,
                    Visit::New => {
                        visits[dependency] = Visit::Active;
                        let frame = open_frame(&mut analysis, index, dependency);
                        stack.push(frame);
                    }
                }
            } else {
                visits[frame.index] = Visit::Done(frame.best);
                analysis.parent_depths[frame.index] = frame.best;
                stack.pop();
            }
        }
    }

    let limit = u32::try_from(depth_max).unwrap_or(u32::MAX);
    for (at, block) in analysis.structs.iter().enumerate() {
        if let (Kind::Item { is_type: true, .. }, Some(parent_depth)) = (block.kind, analysis.parent_depths[at])
            && parent_depth.saturating_add(1) > limit
        {
            analysis.offending[at] = true;
        }
    }
    analysis
}

/// Starts resolving struct `at`: what the index already tells, and which structs of the update
/// its bound depends on. Marks it offending if it states a parent that holds no type.
fn open_frame(analysis: &mut Analysis, index: &NestingIndex, at: usize) -> Frame {
    let mut frame = Frame { index: at, edges: Vec::new(), next: 0, best: None };
    let Kind::Item { parent, .. } = analysis.structs[at].kind else {
        return frame;
    };
    match parent {
        ParentSpec::Root => frame.best = Some(0),
        ParentSpec::Nested(parent) => {
            if let Some(placement) = index.lookup(parent) {
                if placement.is_type {
                    frame.best = placement.parent_depth.map(|depth| depth.saturating_add(1));
                } else if placement.parent_depth.is_some() {
                    analysis.offending[at] = true;
                }
            }
            let dependencies: Vec<usize> = analysis.containing(parent).collect();
            for dependency in dependencies {
                let block = analysis.structs[dependency];
                match block.kind {
                    Kind::Item { is_type: true, .. } if block.id.clock == parent.clock => {
                        frame.edges.push((dependency, 1));
                    }
                    Kind::Item { .. } => analysis.offending[at] = true,
                    Kind::Gc => {}
                }
            }
        }
        ParentSpec::Neighbours(origin, right_origin) => {
            for neighbour in [origin, right_origin].into_iter().flatten() {
                if let Some(placement) = index.lookup(neighbour) {
                    frame.best = frame.best.max(placement.parent_depth);
                }
                for dependency in analysis.containing(neighbour) {
                    if matches!(analysis.structs[dependency].kind, Kind::Item { .. }) {
                        frame.edges.push((dependency, 0));
                    }
                }
            }
        }
    }
    frame
}
