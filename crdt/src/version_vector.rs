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
        if let Some(above_end) = self.beyond.remove(&(sequence + 1)) {
            end = above_end;
        }
        if start == self.contiguous + 1 {
            self.contiguous = end;
        } else {
            self.beyond.insert(start, end);
        }
        true
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

    pub fn is_empty(&self) -> bool {
        self.origins.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

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
