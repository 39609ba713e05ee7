//! Version vectors over origins, with gaps: what a node holds, summarised per origin as a
//! contiguous prefix of sequences plus any ranges received beyond it (gossip delivers out of
//! order, so holes are normal and temporary).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::identity::OriginId;

/// What one origin's changes a node holds: every sequence in `1..=contiguous`, plus `beyond`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginRange {
    /// Every sequence from 1 up to and including this one is held.
    pub contiguous: u64,
    /// Disjoint, non-adjacent inclusive ranges `start -> end` above `contiguous + 1`.
    pub beyond: BTreeMap<u64, u64>,
}

impl OriginRange {
    pub fn contains(&self, sequence: u64) -> bool {
        if sequence == 0 {
            return false;
        }
        if sequence <= self.contiguous {
            return true;
        }
        self.beyond.range(..=sequence).next_back().is_some_and(|(_, &end)| sequence <= end)
    }

    /// Adds `sequence`; returns false if it was already held.
    pub fn insert(&mut self, sequence: u64) -> bool {
        if sequence == 0 || self.contains(sequence) {
            return false;
        }
        let mut start = sequence;
        let mut end = sequence;
        if let Some((&below_start, &below_end)) = self.beyond.range(..sequence).next_back()
            && below_end + 1 == sequence
        {
            start = below_start;
            self.beyond.remove(&below_start);
        }
        // A peer can name any sequence, u64::MAX included: nothing lies above it.
        if let Some(above_end) = sequence.checked_add(1).and_then(|above| self.beyond.remove(&above)) {
            end = above_end;
        }
        if start == self.contiguous.saturating_add(1) {
            self.contiguous = end;
        } else {
            self.beyond.insert(start, end);
        }
        true
    }

    /// Adds every sequence in `start..=end`.
    pub fn insert_range(&mut self, start: u64, end: u64) {
        let mut start = start.max(1);
        let mut end = end;
        if end < start || end <= self.contiguous {
            return;
        }
        let touching: Vec<u64> = self
            .beyond
            .range(..=end.saturating_add(1))
            .filter(|&(_, &range_end)| range_end.saturating_add(1) >= start)
            .map(|(&range_start, _)| range_start)
            .collect();
        for range_start in touching {
            if let Some(range_end) = self.beyond.remove(&range_start) {
                start = start.min(range_start);
                end = end.max(range_end);
            }
        }
        if start <= self.contiguous.saturating_add(1) {
            self.contiguous = end;
        } else {
            self.beyond.insert(start, end);
        }
    }

    /// The inclusive ranges of sequences held here, in order.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let prefix = (self.contiguous > 0).then_some((1, self.contiguous));
        prefix.into_iter().chain(self.beyond.iter().map(|(&start, &end)| (start, end)))
    }

    /// The inclusive ranges held here and not by `other`, in order.
    pub fn missing_from(&self, other: &OriginRange) -> Vec<(u64, u64)> {
        let mut missing = Vec::new();
        for (start, end) in self.ranges() {
            // The first sequence of this range not yet accounted for; `None` once the other side
            // holds everything up to u64::MAX.
            let mut next = Some(start);
            for (other_start, other_end) in other.ranges() {
                let Some(from) = next else { break };
                if other_end < from || other_start > end {
                    continue;
                }
                if other_start > from {
                    missing.push((from, other_start - 1));
                }
                next = other_end.checked_add(1);
                if next.is_none_or(|after| after > end) {
                    next = None;
                    break;
                }
            }
            if let Some(from) = next {
                missing.push((from, end));
            }
        }
        missing
    }

    /// The highest sequence held, contiguous or not.
    pub fn highest(&self) -> u64 {
        self.beyond.values().next_back().copied().unwrap_or(self.contiguous).max(self.contiguous)
    }
}

/// Per origin, which sequences a node holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionVector {
    origins: BTreeMap<OriginId, OriginRange>,
}

impl VersionVector {
    pub fn new() -> VersionVector {
        VersionVector::default()
    }

    pub fn contains(&self, origin: &OriginId, sequence: u64) -> bool {
        self.origins.get(origin).is_some_and(|range| range.contains(sequence))
    }

    /// Records that (origin, sequence) is held; returns false if it already was.
    pub fn insert(&mut self, origin: OriginId, sequence: u64) -> bool {
        self.origins.entry(origin).or_default().insert(sequence)
    }

    pub fn get(&self, origin: &OriginId) -> Option<&OriginRange> {
        self.origins.get(origin)
    }

    pub fn origins(&self) -> impl Iterator<Item = (&OriginId, &OriginRange)> {
        self.origins.iter()
    }

    pub fn len(&self) -> usize {
        self.origins.len()
    }

    /// Per origin, the inclusive ranges held here and not in `other`.
    pub fn missing_from(&self, other: &VersionVector) -> Vec<(OriginId, Vec<(u64, u64)>)> {
        let empty = OriginRange::default();
        self.origins
            .iter()
            .map(|(origin, range)| (*origin, range.missing_from(other.origins.get(origin).unwrap_or(&empty))))
            .filter(|(_, missing)| !missing.is_empty())
            .collect()
    }

    /// How many sequences are held here and not in `other`.
    pub fn count_missing_from(&self, other: &VersionVector) -> u64 {
        self.missing_from(other)
            .iter()
            .flat_map(|(_, ranges)| ranges)
            .fold(0u64, |total, (start, end)| total.saturating_add(end.saturating_sub(*start)).saturating_add(1))
    }

    /// Adds everything `other` holds.
    pub fn merge(&mut self, other: &VersionVector) {
        for (origin, range) in &other.origins {
            for (start, end) in range.ranges() {
                self.insert_range(*origin, start, end);
            }
        }
    }

    /// Records that every sequence of `origin` in `start..=end` is held.
    pub fn insert_range(&mut self, origin: OriginId, start: u64, end: u64) {
        self.origins.entry(origin).or_default().insert_range(start, end);
    }

    pub fn is_empty(&self) -> bool {
        self.origins.is_empty()
    }

    /// The same holdings in canonical form: ranges with `end < start` dropped, a range starting
    /// at 0 read from 1 (sequence 0 does not exist), overlapping and touching ranges merged, a
    /// range that meets the prefix joined to it, and origins that hold nothing left out. It
    /// holds everything [`VersionVector::contains`] finds in the original, and for a well-formed
    /// vector nothing more. A version vector decoded from a peer may be any shape; the
    /// replication core takes it only through this.
    pub fn normalized(&self) -> VersionVector {
        let mut normalized = VersionVector::new();
        for (origin, range) in &self.origins {
            let mut clean = OriginRange::default();
            if range.contiguous > 0 {
                clean.insert_range(1, range.contiguous);
            }
            for (&start, &end) in &range.beyond {
                let start = start.max(1);
                if end >= start {
                    clean.insert_range(start, end);
                }
            }
            if clean.contiguous > 0 || !clean.beyond.is_empty() {
                normalized.origins.insert(*origin, clean);
            }
        }
        normalized
    }

    /// The sequence each origin is held up to without a gap (0 when it is not held from 1).
    pub fn contiguous(&self, origin: &OriginId) -> u64 {
        self.origins.get(origin).map_or(0, |range| range.contiguous)
    }

    /// Only the gap-free prefix of each origin: what a snapshot can promise to hold whole.
    pub fn contiguous_prefix(&self) -> VersionVector {
        let origins = self
            .origins
            .iter()
            .filter(|(_, range)| range.contiguous > 0)
            .map(|(origin, range)| (*origin, OriginRange { contiguous: range.contiguous, beyond: BTreeMap::new() }))
            .collect();
        VersionVector { origins }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_malformed_version_vector_normalizes_to_what_it_validly_holds() {
        let origin = OriginId([7; 16]);
        let mut range = OriginRange { contiguous: 3, beyond: BTreeMap::new() };
        range.beyond.insert(9, 2); // end before start
        range.beyond.insert(0, 0); // sequence 0 does not exist
        range.beyond.insert(1, 0); // end before start
        range.beyond.insert(2, 6); // overlaps the prefix
        range.beyond.insert(8, 10);
        let mut origins = BTreeMap::new();
        origins.insert(origin, range);
        origins.insert(OriginId([8; 16]), OriginRange { contiguous: 0, beyond: [(5, 1)].into_iter().collect() });
        let normalized = VersionVector { origins }.normalized();
        assert_eq!(normalized.len(), 1);
        let held = normalized.get(&origin).unwrap();
        assert_eq!((held.contiguous, held.beyond.clone()), (6, [(8, 10)].into_iter().collect()));
        assert_eq!(normalized.count_missing_from(&VersionVector::new()), 9);
    }

    #[test]
    fn nothing_is_missing_from_a_range_that_holds_the_largest_sequence() {
        let mut held = OriginRange::default();
        held.insert(u64::MAX);
        assert_eq!(held.missing_from(&held.clone()), Vec::<(u64, u64)>::new());
        let mut more = held.clone();
        more.insert_range(u64::MAX - 5, u64::MAX);
        assert_eq!(more.missing_from(&held), vec![(u64::MAX - 5, u64::MAX - 1)]);
    }

    #[test]
    fn the_largest_sequence_is_held_without_overflow() {
        let mut range = OriginRange::default();
        assert!(range.insert(u64::MAX));
        assert!(range.contains(u64::MAX) && !range.insert(u64::MAX));
        range.insert_range(u64::MAX - 2, u64::MAX);
        assert_eq!(range.missing_from(&OriginRange::default()), vec![(u64::MAX - 2, u64::MAX)]);
    }

    #[test]
    fn holes_fill_into_the_contiguous_prefix() {
        let mut range = OriginRange::default();
        assert!(range.insert(3));
        assert!(range.insert(5));
        assert!(!range.insert(3));
        assert_eq!((range.contiguous, range.beyond.len()), (0, 2));
        assert!(range.insert(1));
        assert!(range.insert(2));
        assert_eq!(range.contiguous, 3);
        assert!(range.insert(4));
        assert_eq!((range.contiguous, range.beyond.len(), range.highest()), (5, 0, 5));
        assert!(!range.contains(0) && !range.contains(6));
    }

    proptest! {
        /// Normalizing keeps exactly the sequences some part of the original claims, so it never
        /// drops one that `contains` finds in the original (the core relies on this to not send
        /// a peer what it said it holds).
        #[test]
        fn normalizing_keeps_every_claimed_sequence(
            contiguous in 0u64..20,
            beyond in proptest::collection::btree_map(0u64..30, 0u64..30, 0..6),
        ) {
            let origin = OriginId([3; 16]);
            let raw = OriginRange { contiguous, beyond: beyond.clone() };
            let vector = VersionVector { origins: [(origin, raw.clone())].into_iter().collect() };
            let normalized = vector.normalized();
            for sequence in 0..40 {
                let claimed = sequence >= 1
                    && (sequence <= contiguous || beyond.iter().any(|(&start, &end)| start <= sequence && sequence <= end));
                prop_assert_eq!(normalized.contains(&origin, sequence), claimed, "sequence {}", sequence);
                if raw.contains(sequence) {
                    prop_assert!(normalized.contains(&origin, sequence), "normalizing dropped {}", sequence);
                }
            }
        }

        #[test]
        fn range_inserts_match_single_inserts(ranges in proptest::collection::vec((1u64..50, 0u64..6), 0..20)) {
            let mut by_range = OriginRange::default();
            let mut by_sequence = OriginRange::default();
            for &(start, length) in &ranges {
                by_range.insert_range(start, start + length);
                for sequence in start..=start + length { by_sequence.insert(sequence); }
            }
            prop_assert_eq!(by_range, by_sequence);
        }

        #[test]
        fn missing_from_is_the_set_difference(
            ours in proptest::collection::btree_set(1u64..40, 0..40),
            theirs in proptest::collection::btree_set(1u64..40, 0..40),
        ) {
            let mut our_range = OriginRange::default();
            for &sequence in &ours { our_range.insert(sequence); }
            let mut their_range = OriginRange::default();
            for &sequence in &theirs { their_range.insert(sequence); }
            let missing: Vec<u64> = our_range.missing_from(&their_range).into_iter().flat_map(|(start, end)| start..=end).collect();
            let expected: Vec<u64> = ours.difference(&theirs).copied().collect();
            prop_assert_eq!(missing, expected);
        }

        #[test]
        fn any_insertion_order_gives_the_same_summary(mut sequences in proptest::collection::vec(1u64..64, 0..80)) {
            let mut forward = OriginRange::default();
            for &sequence in &sequences { forward.insert(sequence); }
            sequences.reverse();
            let mut backward = OriginRange::default();
            for &sequence in &sequences { backward.insert(sequence); }
            prop_assert_eq!(&forward, &backward);
            for sequence in 1..70 {
                prop_assert_eq!(forward.contains(sequence), sequences.contains(&sequence));
            }
        }
    }
}
