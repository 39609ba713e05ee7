//! Hybrid logical clocks: wall-clock milliseconds plus a logical counter, so that timestamps
//! respect causality even when node clocks disagree.
//!
//! The clock never reads the time itself: callers pass the physical time in, which keeps this
//! crate deterministic.

use serde::{Deserialize, Serialize};

/// A hybrid-logical-clock timestamp. Ordered by wall time, then by the logical counter. Ties
/// between origins are broken by the caller (by origin id), never here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Timestamp {
    /// Milliseconds since the Unix epoch, as the latest clock that influenced this one saw it.
    pub wall_ms: u64,
    /// Breaks ties between events within the same millisecond.
    pub logical: u32,
}

/// How far ahead of local physical time a remote timestamp may be before it is refused, so a
/// peer with a wild clock cannot drag every node's clock into the future.
pub const DRIFT_MS_MAX: u64 = 60_000;

/// A remote timestamp was too far in the future; the clock did not change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("remote timestamp {remote_ms} ms is {ahead_ms} ms ahead of local time; the limit is {DRIFT_MS_MAX} ms")]
pub struct DriftError {
    pub remote_ms: u64,
    pub ahead_ms: u64,
}

/// The clock state of one node: the last timestamp it issued or observed.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    last: Timestamp,
}

impl Clock {
    pub fn new() -> Clock {
        Clock::default()
    }

    /// The latest timestamp issued or observed.
    pub fn last(&self) -> Timestamp {
        self.last
    }

    /// A new timestamp for a local event, strictly greater than every earlier one.
    pub fn tick(&mut self, physical_ms: u64) -> Timestamp {
        self.last = if physical_ms > self.last.wall_ms {
            Timestamp { wall_ms: physical_ms, logical: 0 }
        } else {
            successor(self.last)
        };
        self.last
    }

    /// Merges a remote timestamp so later local events order after it.
    pub fn observe(&mut self, remote: Timestamp, physical_ms: u64) -> Result<(), DriftError> {
        let ahead_ms = remote.wall_ms.saturating_sub(physical_ms);
        if ahead_ms > DRIFT_MS_MAX {
            return Err(DriftError { remote_ms: remote.wall_ms, ahead_ms });
        }
        if remote > self.last {
            self.last = remote;
        }
        Ok(())
    }
}

fn successor(timestamp: Timestamp) -> Timestamp {
    match timestamp.logical.checked_add(1) {
        Some(logical) => Timestamp { wall_ms: timestamp.wall_ms, logical },
        // The logical counter is spent: borrow the next millisecond, which stays monotonic.
        None => Timestamp { wall_ms: timestamp.wall_ms + 1, logical: 0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_strictly_increasing_even_when_time_goes_back() {
        let mut clock = Clock::new();
        let first = clock.tick(1_000);
        let second = clock.tick(1_000);
        let third = clock.tick(900);
        assert!(first < second && second < third);
        assert_eq!(clock.tick(2_000), Timestamp { wall_ms: 2_000, logical: 0 });
    }

    #[test]
    fn observing_a_remote_timestamp_orders_later_events_after_it() {
        let mut clock = Clock::new();
        clock.observe(Timestamp { wall_ms: 5_000, logical: 7 }, 4_000).unwrap();
        assert!(clock.tick(4_500) > Timestamp { wall_ms: 5_000, logical: 7 });
        let error = clock.observe(Timestamp { wall_ms: 1_000_000, logical: 0 }, 4_000).unwrap_err();
        assert_eq!(error.ahead_ms, 996_000);
    }

    #[test]
    fn logical_overflow_borrows_a_millisecond() {
        let mut clock = Clock { last: Timestamp { wall_ms: 10, logical: u32::MAX } };
        assert_eq!(clock.tick(5), Timestamp { wall_ms: 11, logical: 0 });
    }
}
