//! A stored record rebuilt with a peer's change in one load, and what it was before the change
//! read from its parts' headers.
//!
//! A node that takes in a change to a record it stores only as bytes (not built in its cache)
//! used to build the record, copy it, apply the change to the copy and drop the original
//! ([`Record::apply_changes_intact`] says why the copy). For a small record changed on both
//! sides of a partition that was about 65 µs, against about 34 µs for reading the parts' headers
//! and one load of the parts with the change joined to them (BENCHMARKS.md, session 19).
//!
//! What the apply gave besides the record after the change (its heads before, whether the change
//! was new) is read from the parts: each holds change chunks, whose headers name their hashes
//! and dependencies. The record before the change is the record after it read at those heads
//! (automerge's `*_at` reads), so conflict signatures and liveness before need no second
//! document. Anything else (a part that is a saved document, a change whose dependencies are
//! missing, damage, a result whose heads are not what the headers say) is `None`, and the caller
//! goes the building way, which gives the answer (or the error) it always gave.

use automerge::Automerge;

use super::bounds::{CHANGE_CHUNK, COMPRESSED_CHANGE_CHUNK, Chunk};
use super::{Budget, ChangeHash, Record, decode, joined, parse_change, strict_load};

/// A record rebuilt from its stored parts and a change, in one load.
#[derive(Debug)]
pub struct Rebuilt {
    /// The record with the change.
    pub record: Record,
    /// The record's heads before the change (what its stored parts hold), sorted.
    pub before: Vec<ChangeHash>,
    /// Whether the change was new to the record: `false` when its parts already held it.
    pub changed: bool,
}

/// The hashes of some changes and the hashes they depend on, read from their chunks.
#[derive(Debug, Default)]
struct Headers {
    hashes: Vec<ChangeHash>,
    dependencies: Vec<ChangeHash>,
}

impl Headers {
    /// Adds the changes of `bytes`; `None` unless they are change chunks (plain or compressed)
    /// back to back, each of which checks out. A write can make two changes (a counter's
    /// genesis and the increment), so one part can hold several.
    fn read(&mut self, mut bytes: &[u8]) -> Option<()> {
        while !bytes.is_empty() {
            let (chunk, rest) = Chunk::split(bytes).ok()?;
            if chunk.kind != CHANGE_CHUNK && chunk.kind != COMPRESSED_CHANGE_CHUNK {
                return None;
            }
            let change = parse_change(chunk.whole)?;
            self.hashes.push(change.hash());
            self.dependencies.extend_from_slice(change.deps());
            bytes = rest;
        }
        Some(())
    }

    /// Whether every change these depend on is among them.
    fn is_whole(&self) -> bool {
        self.dependencies.iter().all(|dependency| self.hashes.contains(dependency))
    }

    /// The hashes no change here depends on, sorted: the heads of these changes.
    fn heads(&self) -> Vec<ChangeHash> {
        let mut heads: Vec<ChangeHash> =
            self.hashes.iter().filter(|hash| !self.dependencies.contains(hash)).copied().collect();
        heads.sort();
        heads.dedup();
        heads
    }
}

impl Record {
    /// The record stored as `saved` and `increments` (as [`Record::load`] takes them) with
    /// `change` applied, built in one load. The result is the record that loading the parts and
    /// then applying the change would give, with the heads it had before and whether the change
    /// was new; `None` when this way does not cover the case (see the module documentation) and
    /// the caller must build and apply.
    pub fn load_applying(saved: &[u8], increments: &[&[u8]], change: &[u8]) -> Option<Rebuilt> {
        let mut budget = Budget::after(0);
        let mut stored = Headers::default();
        for part in std::iter::once(&saved).chain(increments) {
            budget.charge(part).ok()?;
            stored.read(part)?;
        }
        if stored.hashes.is_empty() {
            return None;
        }
        let mut all = Headers { hashes: stored.hashes.clone(), dependencies: stored.dependencies.clone() };
        all.read(change)?;
        // The heads are read off the headers only of a whole history: automerge keeps back a
        // change whose dependencies are missing, and it is then no head.
        if !stored.is_whole() || !all.is_whole() {
            return None;
        }
        let before = stored.heads();
        let changed = all.hashes[stored.hashes.len()..].iter().any(|hash| !stored.hashes.contains(hash));
        let mut parts = increments.to_vec();
        if changed {
            budget.charge(change).ok()?;
            parts.push(change);
        }
        let expected = if changed { all.heads() } else { before.clone() };
        let document = decode(|| Automerge::load_with_options(&joined(saved, &parts), strict_load())).ok()?;
        let record = Record { document, first_value: None, proven: false };
        // Not expected to differ; if automerge saw it otherwise, its way decides.
        (record.heads() == expected).then_some(Rebuilt { record, before, changed })
    }
}
