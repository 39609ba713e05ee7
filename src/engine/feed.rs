//! The change feed in the engine: what each entry stores, pages of events for readers, and
//! retention, which trims entries older than `feed_retention` and raises the feed's floor.
//!
//! Every change that makes a record or text visible here appends a feed entry (its key, origin,
//! sequence and timestamp, and when it was appended). Readers page through it with `after`
//! semantics, and an event carries the record's value as it is when served. Retention deletes the
//! oldest entries, a bounded number per step, once they were appended longer ago than the period
//! (by this node's clock, so a change relayed late is kept as long as one made here). Everything
//! at or below the *floor* is gone: a reader asking for events after a sequence below it would
//! silently miss some, so it gets [`EngineError::FeedTrimmed`] instead (HTTP 410), and resyncs
//! by listing the records and then following the feed from the sequence `status` reports.
//!
//! Damage on disk does not stop the feed. An entry or page that does not read is served as one
//! event of kind `damaged` that covers its sequences, and an event whose record does not load
//! carries the reason instead of a value; readers go on past both (see [`FeedDamage`]).

use std::time::{Duration, Instant};

use crdt::clock::Timestamp;
use crdt::envelope::{DocumentKind, Envelope};
use crdt::identity::OriginId;
use crdt::key::RecordKey;
use serde::{Deserialize, Serialize};
use store::{JournalItem, Store};

use super::{Engine, EngineError, FEED_PAGE_MAX, TRIM_ENTRIES_PER_STEP};

/// The default feed retention: a week, as the change log's, so a consumer that was away for
/// days resumes where it stopped.
pub const FEED_RETENTION_DEFAULT: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// What the store keeps per feed sequence.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FeedEntry {
    pub key: RecordKey,
    pub kind: DocumentKind,
    pub origin: OriginId,
    pub sequence: u64,
    pub timestamp: Timestamp,
    /// When this node appended the entry (ms since the Unix epoch): what retention goes by.
    /// Zero in entries stored before it was kept; those go by `timestamp`.
    #[serde(default)]
    pub appended_ms: u64,
}

impl FeedEntry {
    /// The feed entry of a change envelope, appended at `appended_ms`.
    pub(super) fn of(envelope: &Envelope, appended_ms: u64) -> FeedEntry {
        FeedEntry {
            key: envelope.key.clone(),
            kind: envelope.kind,
            origin: envelope.origin,
            sequence: envelope.sequence,
            timestamp: envelope.timestamp,
            appended_ms,
        }
    }

    /// When the entry was appended, as well as it is known.
    fn appended(&self) -> u64 {
        if self.appended_ms == 0 { self.timestamp.wall_ms } else { self.appended_ms }
    }
}

/// One event of the change feed.
#[derive(Debug, Clone, Serialize)]
pub struct FeedEvent {
    pub sequence: u64,
    pub collection: String,
    pub id: String,
    pub kind: &'static str,
    /// The record's value when the event is served (later events for the record follow), or
    /// `null` for a deleted record or a text.
    pub value: Option<serde_json::Value>,
    pub deleted: bool,
    pub version: String,
    pub origin: String,
    pub origin_sequence: u64,
    pub timestamp: Timestamp,
    /// Set when the event could not be served as it was stored; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub damage: Option<FeedDamage>,
}

/// Why a feed event carries no value: its feed entries on disk, or its record, are damaged.
///
/// For kind `damaged` the entries from `first` through the event's sequence did not read, so
/// which records they named is unknown (collection and id are empty); a consumer that must not
/// miss a change resyncs as after [`EngineError::FeedTrimmed`]. For a record or text event, its
/// entry read but the record did not load: `value` is absent and `deleted` false, and the record
/// reads as damaged until a later change or a snapshot replaces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FeedDamage {
    pub first: u64,
    pub reason: String,
}

impl FeedEvent {
    /// The event standing for the feed sequences `first..=sequence` that did not read.
    fn damaged(first: u64, sequence: u64, reason: String) -> FeedEvent {
        FeedEvent {
            sequence,
            collection: String::new(),
            id: String::new(),
            kind: "damaged",
            value: None,
            deleted: false,
            version: String::new(),
            origin: String::new(),
            origin_sequence: 0,
            timestamp: Timestamp { wall_ms: 0, logical: 0 },
            damage: Some(FeedDamage { first, reason }),
        }
    }
}

/// The feed's floor in `store`: every entry at or below it is gone. Entries are numbered without
/// gaps from 1, so it is one below the first entry (or the first of a damaged first page), or
/// the last sequence handed out when retention emptied the feed. A store the feed cannot be read
/// from at all is logged and taken as untrimmed.
pub(super) fn stored_floor(store: &Store, feed_sequence: u64) -> u64 {
    match store.feed_items(0, 1) {
        Ok(first) => first.first().map_or(feed_sequence, |item| match item {
            JournalItem::Entry(sequence, _) | JournalItem::Damaged { first: sequence, .. } => {
                sequence.saturating_sub(1)
            }
        }),
        Err(error) => {
            tracing::warn!(%error, "cannot read the feed's first entry; taking the feed as untrimmed");
            0
        }
    }
}

impl Engine {
    /// Feed events with sequence above `after`, at most `limit` (capped at [`FEED_PAGE_MAX`]).
    /// [`EngineError::FeedTrimmed`] when retention deleted events after `after`. Damaged entries
    /// and records become events that say so (see [`FeedDamage`]); only a failing store fails
    /// the page.
    pub fn feed_page(&mut self, after: u64, limit: usize) -> Result<Vec<FeedEvent>, EngineError> {
        if after < self.feed.floor {
            return Err(EngineError::FeedTrimmed { after, floor: self.feed.floor });
        }
        let items = self.store.feed_items(after, limit.clamp(1, FEED_PAGE_MAX))?;
        let mut events = Vec::with_capacity(items.len());
        for item in items {
            let event = match item {
                JournalItem::Entry(sequence, bytes) => match decode(sequence, &bytes) {
                    Ok(entry) => self.feed_event(sequence, entry)?,
                    Err(error) => FeedEvent::damaged(sequence, sequence, error.to_string()),
                },
                JournalItem::Damaged { first, through, error } => {
                    // A damaged last page runs to the last entry the store holds.
                    let through = through.unwrap_or(self.feed.stored).max(first);
                    FeedEvent::damaged(first, through, error.to_string())
                }
            };
            if event.damage.is_some() {
                tracing::warn!(sequence = event.sequence, kind = event.kind, key = %format_args!("{}/{}", event.collection, event.id), "serving a damaged feed event");
                self.metrics.feed_events_damaged.inc();
            }
            events.push(event);
        }
        Ok(events)
    }

    /// The feed's ends: everything at or below the floor is trimmed, and the last sequence
    /// handed out.
    pub fn feed_bounds(&self) -> FeedBounds {
        FeedBounds { floor: self.feed.floor, sequence: self.counters.feed_sequence }
    }

    fn feed_event(&mut self, sequence: u64, entry: FeedEntry) -> Result<FeedEvent, EngineError> {
        let (view, kind) = match entry.kind {
            DocumentKind::Record | DocumentKind::MapRecord => (self.record_view(&entry.key), "record"),
            DocumentKind::Text => (Ok(None), "text"),
        };
        let (value, version, damage) = match view {
            Ok(Some(view)) => (view.value.map(serde_json::Value::Object), view.version, None),
            Ok(None) => (None, String::new(), None),
            Err(error @ (EngineError::Storage(_) | EngineError::Stopped)) => return Err(error),
            Err(error) => (None, String::new(), Some(FeedDamage { first: sequence, reason: error.to_string() })),
        };
        Ok(FeedEvent {
            sequence,
            collection: entry.key.collection().to_owned(),
            id: entry.key.id().to_owned(),
            kind,
            deleted: kind == "record" && value.is_none() && damage.is_none(),
            value,
            version,
            origin: entry.origin.to_string(),
            origin_sequence: entry.sequence,
            timestamp: entry.timestamp,
            damage,
        })
    }

    /// Deletes the oldest feed entries appended before the retention period, a bounded number
    /// per step, and raises the floor past them. Runs when due; a zero period keeps everything.
    /// The run stops at the first recent entry, so the feed stays a gap-free suffix even when
    /// the clock stepped back. Entries and pages that do not read are of use to no reader, so
    /// they are trimmed with the old ones around them.
    pub(crate) fn trim_feed_if_due(&mut self, now: Instant) {
        if self.feed.retention.period.is_zero() || !self.feed.retention.take_due(now) {
            return;
        }
        let cutoff_ms = self.feed.retention.cutoff_ms();
        let items = match self.store.feed_items(self.feed.floor, TRIM_ENTRIES_PER_STEP) {
            Ok(items) => items,
            Err(error) => return tracing::warn!(%error, "cannot read the feed to trim it"),
        };
        let full_step = items.len() == TRIM_ENTRIES_PER_STEP;
        // Through the last of the leading run of old or unreadable items, and how many entries
        // that is.
        let (mut through, mut trimmed, mut old) = (None, 0, 0);
        for item in &items {
            let last = match item {
                JournalItem::Entry(sequence, bytes) => {
                    if decode(*sequence, bytes).is_ok_and(|entry| entry.appended() >= cutoff_ms) {
                        break;
                    }
                    *sequence
                }
                JournalItem::Damaged { first, through, .. } => through.unwrap_or(self.feed.stored).max(*first),
            };
            trimmed += last.saturating_sub(through.unwrap_or(self.feed.floor));
            through = Some(last);
            old += 1;
        }
        let Some(through) = through else { return };
        self.batch.trim_feed_through(through);
        self.feed.floor = through;
        self.metrics.feed_entries_trimmed.add(trimmed);
        if full_step && old == items.len() {
            self.feed.retention.again(now);
        }
    }
}

/// The feed state the engine thread keeps.
#[derive(Debug)]
pub(crate) struct Feed {
    /// Every entry at or below it is trimmed (or staged to be, in the batch being built).
    floor: u64,
    /// The last sequence the store holds an entry for (entries staged since are not in it yet).
    pub(crate) stored: u64,
    retention: super::Retention,
}

impl Feed {
    pub(crate) fn new(floor: u64, stored: u64, retention: Duration) -> Feed {
        Feed { floor, stored, retention: super::Retention::new(retention) }
    }
}

/// The feed's ends, as [`Engine::feed_bounds`] reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FeedBounds {
    /// Every event at or below it is trimmed: reading after a lower sequence fails.
    pub floor: u64,
    /// The last sequence handed out.
    pub sequence: u64,
}

fn decode(sequence: u64, bytes: &[u8]) -> Result<FeedEntry, EngineError> {
    rmp_serde::from_slice(bytes)
        .map_err(|error| EngineError::Corrupt { key: format!("feed {sequence}"), reason: error.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A feed entry as stores before `appended_ms` wrote it.
    #[derive(Serialize)]
    struct EarlierEntry {
        key: RecordKey,
        kind: DocumentKind,
        origin: OriginId,
        sequence: u64,
        timestamp: Timestamp,
    }

    #[test]
    fn entries_stored_before_the_append_time_go_by_their_timestamp() {
        let key = RecordKey::new("orders", "o1").expect("a valid key");
        let timestamp = Timestamp { wall_ms: 1_700_000_000_000, logical: 3 };
        let earlier =
            EarlierEntry { key, kind: DocumentKind::Record, origin: OriginId([7; 16]), sequence: 9, timestamp };
        let bytes = rmp_serde::to_vec(&earlier).expect("encode");
        let entry = decode(1, &bytes).expect("an earlier entry decodes");
        assert_eq!((entry.appended_ms, entry.appended()), (0, timestamp.wall_ms));
        let current = FeedEntry { appended_ms: 1_800_000_000_000, ..entry };
        let again = decode(1, &rmp_serde::to_vec(&current).expect("encode")).expect("decode");
        assert_eq!(again.appended(), 1_800_000_000_000);
        assert!(matches!(decode(5, b"\xc1"), Err(EngineError::Corrupt { .. })));
    }
}
