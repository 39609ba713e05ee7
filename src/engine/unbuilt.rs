//! Records stored straight from their first change and not built since: their bytes, staged until
//! the commit and then kept for a while, so reads of the newest records touch neither the store
//! nor the change log.
//!
//! A record new to this node is stored as the change that created it (`stage_first_change`), and
//! in the store that is a pointer into the change log. Serving it to a change feed then cost a
//! document read, a log page's decompression and a parse, per event: a quarter of a replica's
//! engine time at 5k writes/s (BENCHMARKS.md, session 14). Readers follow the newest records, so
//! the bytes of the latest ones stay here after the commit, within a budget. An entry is exactly
//! what the store holds for its record until the record is built; building it removes the entry
//! (`Engine::build_document`), and every change to a stored record builds it first.

use std::collections::HashMap;

use crdt::key::RecordKey;
use lru::LruCache;

/// The most bytes of first changes kept after their commit.
pub(super) const KEPT_BYTES_MAX: usize = 4 << 20;
/// The most first changes kept after their commit.
pub(super) const KEPT_ENTRIES_MAX: usize = 16_384;

#[derive(Debug)]
pub(super) struct Unbuilt {
    /// Staged in the batch being built: the store lacks them until the commit, so they are never
    /// evicted (the batch bounds them).
    staged: HashMap<RecordKey, Vec<u8>>,
    /// Committed, least recently stored or read first, within the budget.
    kept: LruCache<RecordKey, Vec<u8>>,
    kept_bytes: usize,
}

impl Unbuilt {
    pub(super) fn new() -> Unbuilt {
        Unbuilt { staged: HashMap::new(), kept: LruCache::unbounded(), kept_bytes: 0 }
    }

    /// The first change `key` is stored as, if it is one of those staged or kept.
    pub(super) fn get(&mut self, key: &RecordKey) -> Option<&[u8]> {
        match self.staged.get(key) {
            Some(bytes) => Some(bytes),
            None => self.kept.get(key).map(Vec::as_slice),
        }
    }

    /// `key` is stored as `change` in the batch being built.
    pub(super) fn stage(&mut self, key: RecordKey, change: Vec<u8>) {
        self.forget_kept(&key);
        self.staged.insert(key, change);
    }

    /// `key` was built: its document, not these bytes, is what the engine changes from now on.
    pub(super) fn remove(&mut self, key: &RecordKey) {
        self.staged.remove(key);
        self.forget_kept(key);
    }

    /// The batch is durable: what it staged is kept, the oldest dropped past the budget.
    pub(super) fn committed(&mut self) {
        for (key, change) in self.staged.drain() {
            if change.len() > KEPT_BYTES_MAX {
                continue;
            }
            self.kept_bytes += change.len();
            if let Some(replaced) = self.kept.put(key, change) {
                self.kept_bytes -= replaced.len();
            }
        }
        while self.kept_bytes > KEPT_BYTES_MAX || self.kept.len() > KEPT_ENTRIES_MAX {
            let Some((_, change)) = self.kept.pop_lru() else { break };
            self.kept_bytes -= change.len();
        }
    }

    fn forget_kept(&mut self, key: &RecordKey) {
        if let Some(change) = self.kept.pop(key) {
            self.kept_bytes -= change.len();
        }
    }

    #[cfg(test)]
    fn kept(&self) -> (usize, usize) {
        (self.kept.len(), self.kept_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(index: usize) -> RecordKey {
        RecordKey::new("orders", &format!("o{index}")).expect("a valid key")
    }

    #[test]
    fn staged_changes_stay_until_the_commit_then_keep_within_the_budget() {
        let mut unbuilt = Unbuilt::new();
        let change = vec![7; 1_000];
        // More than the budget in one batch: none of it may go before the commit.
        let staged = KEPT_BYTES_MAX / change.len() + 10;
        for index in 0..staged {
            unbuilt.stage(key(index), change.clone());
        }
        assert!((0..staged).all(|index| unbuilt.get(&key(index)).is_some()));
        unbuilt.committed();
        let (entries, bytes) = unbuilt.kept();
        assert!(bytes <= KEPT_BYTES_MAX && entries == KEPT_BYTES_MAX / change.len(), "{entries} entries, {bytes} B");
        assert_eq!(bytes, entries * change.len());
        // Small changes are bounded by count instead.
        for index in 0..KEPT_ENTRIES_MAX + 5 {
            unbuilt.stage(key(staged + index), vec![1; 10]);
        }
        unbuilt.committed();
        assert_eq!(unbuilt.kept().0, KEPT_ENTRIES_MAX);
        assert!(unbuilt.get(&key(staged + KEPT_ENTRIES_MAX + 4)).is_some());
        assert!(unbuilt.get(&key(0)).is_none(), "the oldest went first");
    }

    #[test]
    fn a_built_record_is_forgotten_staged_or_kept() {
        let mut unbuilt = Unbuilt::new();
        unbuilt.stage(key(1), vec![1; 10]);
        unbuilt.committed();
        unbuilt.stage(key(2), vec![2; 20]);
        unbuilt.remove(&key(1));
        unbuilt.remove(&key(2));
        assert!(unbuilt.get(&key(1)).is_none() && unbuilt.get(&key(2)).is_none());
        unbuilt.committed();
        assert_eq!(unbuilt.kept(), (0, 0));
        // A change larger than the whole budget is not kept at all.
        unbuilt.stage(key(3), vec![3; KEPT_BYTES_MAX + 1]);
        assert!(unbuilt.get(&key(3)).is_some());
        unbuilt.committed();
        assert_eq!(unbuilt.kept(), (0, 0));
    }
}
