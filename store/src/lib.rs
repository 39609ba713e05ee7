//! Concord's durable store: sled 0.34.7 behind a small interface of byte keys and byte values.
//!
//! The store knows nothing of records, peers or CRDTs: the node encodes values, the store
//! persists them.
//!
//! # Keyspaces
//!
//! Everything lives in sled's default tree, each keyspace under its own prefix byte, so that one
//! [`WriteBatch`] commits atomically across all of them:
//!
//! | keyspace   | key                                                            | value                                |
//! |------------|----------------------------------------------------------------|--------------------------------------|
//! | documents  | `d` + document key (at most [`MAX_DOCUMENT_KEY`] bytes)        | compacted document and its metadata  |
//! | increments | `i` + key length (u16 BE) + document key + index (u32 BE)      | a change appended after the document |
//! | log        | `L` + origin (16 bytes) + sequence of the page's first entry   | a page of change-log entries         |
//! | feed       | `F` + feed sequence of the page's first entry (u64 BE)         | a page of local change-feed entries  |
//! | meta       | `m` + name                                                     | identity, version vector, counters   |
//! | audit      | `A` + audit sequence of the page's first entry (u64 BE)        | a page of audit-trail entries        |
//! | conflicts  | `c` + conflict sequence (u64 BE)                               | a conflict-ledger entry              |
//! | quarantine | `q` + quarantine id (u64 BE)                                   | a change held back, with its reason  |
//!
//! Big-endian integers make sled's byte order the numeric order, and the length in front of the
//! document key keeps the increments of document `ab` apart from those of document `a`. The meta
//! entry `format` holds `concord-store` + the format version (u32 BE): it is written when the
//! store is created, checked on every open, and [`WriteBatch::put_meta`] refuses the name.
//!
//! The feed, the audit trail and each origin's change log are journals: numbered entries mostly
//! appended at the end and trimmed from the front, stored as pages of consecutive entries, so
//! that a commit of many changes adds a few sled entries to each instead of one per change (see
//! `journal`). A page's value starts with a byte saying whether its entries are plain or one zstd
//! frame, and most are compressed (format 3).
//!
//! [`Store::open`] brings older stores up to date before anything else reads them:
//! - format 1 stored one entry per key under `f`, `a` and `l`: they move into pages;
//! - format 2 stored pages without the leading byte: each page is stored again with it,
//!   compressed where that is smaller.
//!
//! Both go in chunks of sled batches and resume where they stopped if interrupted; the format
//! marker changes last.
//!
//! # One writer, one flusher
//!
//! [`Store::apply`] and [`Store::flush`] are the only write path and the only place that
//! flushes ([`Store::commit`] is both at once): the first applies a batch, visible to reads at
//! once, and the second calls sled's `flush()`, returning once the batch is durable. sled 0.34.7
//! deadlocks when several tasks call `flush_async` concurrently (sled issue #1308), so the node
//! commits from one thread; the store also serialises commits behind a mutex, so clones of a
//! [`Store`] cannot flush concurrently either.
//!
//! sled's `flush()` writes the log with `sync_file_range` on Linux: a committed batch survives a
//! crash of the process, but there is no promise for a power loss (neither file metadata nor the
//! drive's cache is synced; sled's background thread calls `fsync` about every 500 ms).
//!
//! Each read method sees whole batches, even when it makes several sled reads (a document's value
//! and its increments are two): a commit holds a write lock while sled applies the batch, and each
//! read method holds a read lock. Readers may see a batch before its flush has ended.
//!
//! # Damaged folders
//!
//! A damaged folder is input. [`Store::open`] returns an [`OpenError`] naming the folder and the
//! problem. sled can panic on damaged files: panics are caught and turned into errors, on open as
//! on every later read and commit. Before sled starts, the store checks the checksums of `conf`
//! and of the snapshot sled would load, to name the damaged file (sled's own errors for them are
//! vague or misleading).
//!
//! sled's recovery replays the log in `db` and ends the replay at the first torn or corrupt
//! message, or at a damaged blob (`blobs/`) that a message points to. That is what a crash needs,
//! but it also means damage in the middle of the log silently drops every later batch: the store
//! then opens, without an error, with a prefix of what was committed. An empty `conf` is
//! rewritten by sled.

mod error;
mod files;
mod journal;
mod keys;

use journal::Journal;

use std::any::Any;
use std::fmt;
use std::fs;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread;
use std::time::{Duration, Instant};

pub use error::{OpenError, ReadError, WriteError};
pub use journal::JournalItem;
pub use keys::{Keyspace, MAX_DOCUMENT_KEY};

use keys::FORMAT_META;

/// The first bytes of the format marker.
const FORMAT_MAGIC: &[u8] = b"concord-store";
/// sled's page cache, in bytes, unless the caller chooses: enough for the hot part of the index
/// and recent values, small enough that memory does not grow with the data set.
pub const CACHE_BYTES_DEFAULT: u64 = 64 << 20;
/// The version of the key layout this build reads and writes.
pub const FORMAT_VERSION: u32 = 3;
/// How many format 1 journal entries [`Store::open`] moves per sled batch.
const MIGRATION_CHUNK: usize = 4096;
/// How many format 2 pages (up to 16 KiB each) [`Store::open`] stores again per sled batch.
const PAGE_MIGRATION_CHUNK: usize = 256;
/// The meta entry naming the last page a format 2 migration has stored again (the migration's
/// own; `WriteBatch::put_meta` refuses it as it refuses the marker).
const FORMAT_2_PROGRESS_META: &str = "format-2-pages-done-through";

/// A handle on an open store. Clones share the same sled database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    directory: Arc<PathBuf>,
    locks: Arc<Locks>,
    /// Journal pages decompressed last (see [`journal::PageCache`]).
    pages: Arc<journal::PageCache>,
    /// Each journal's last entry number, as the last commits left it (see [`journal::Tails`]).
    tails: Arc<journal::Tails>,
}

#[derive(Debug, Default)]
struct Locks {
    /// Held for a whole commit, flush included: one flusher at a time.
    commit: Mutex<()>,
    /// Written while sled applies a batch, read by every read.
    visibility: RwLock<()>,
}

/// A batch [`Store::apply`] made visible, to pass to [`Store::flush`] to make it durable.
#[must_use = "an applied batch is not durable until it is flushed"]
#[derive(Debug)]
pub struct Applied {
    /// Whether the batch held anything.
    flush: bool,
}

/// Writes to apply together with [`Store::commit`]. Later operations on a key replace earlier
/// ones in the same batch.
#[derive(Debug, Default)]
pub struct WriteBatch {
    batch: sled::Batch,
    feed: journal::Pending,
    audit: journal::Pending,
    /// Per origin.
    log: std::collections::BTreeMap<[u8; 16], journal::Pending>,
    operations: usize,
    /// The first refused operation; [`Store::commit`] returns it and writes nothing.
    refused: Option<WriteError>,
}

/// What one keyspace holds: see [`Store::usage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyspaceUsage {
    pub keyspace: Keyspace,
    pub entries: u64,
    pub key_bytes: u64,
    pub value_bytes: u64,
}

impl KeyspaceUsage {
    fn empty(keyspace: Keyspace) -> KeyspaceUsage {
        KeyspaceUsage { keyspace, entries: 0, key_bytes: 0, value_bytes: 0 }
    }
}

/// A document's value and the increments stored after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDocument {
    pub value: Vec<u8>,
    /// `(index, bytes)` in index order.
    pub increments: Vec<(u32, Vec<u8>)>,
}

impl Store {
    /// Opens or creates the store at `directory` (creates the folder). Checks the format marker.
    ///
    /// A missing or empty folder becomes a new store. A folder with files in it must hold a
    /// sled database carrying the format marker, which is the first thing written to a new store:
    /// a folder left by a first open that was interrupted is refused and can be deleted.
    ///
    /// sled lets go of a store a little after its last handle is dropped, so opening a store that
    /// was open in this process a moment ago waits up to 2 seconds for that.
    pub fn open(directory: &Path) -> Result<Store, OpenError> {
        Store::open_with_cache(directory, CACHE_BYTES_DEFAULT)
    }

    /// Like [`Store::open`], with sled's page cache capped at `cache_bytes`. sled's own default
    /// is 1 GiB, which lets a node's memory grow with its data set; ours is [`CACHE_BYTES_DEFAULT`].
    pub fn open_with_cache(directory: &Path, cache_bytes: u64) -> Result<Store, OpenError> {
        let path = || directory.to_path_buf();
        let fresh = prepare_directory(directory)?;
        if !fresh {
            wait_for_lock(directory);
            let problem = files::check(directory).map_err(|source| OpenError::Directory { path: path(), source })?;
            if let Some(reason) = problem {
                return Err(OpenError::Corrupt { path: path(), reason });
            }
        }
        let db = during_open(directory, "opening it", || {
            sled::Config::new().path(directory).cache_capacity(cache_bytes).open()
        })?;
        let marker_key = keys::meta(FORMAT_META);
        match during_open(directory, "reading the format marker", || db.get(&marker_key))? {
            Some(marker) => match check_format(&marker, directory)? {
                1 => migrate_format_1(&db, directory)?,
                2 => migrate_format_2(&db, directory)?,
                _ => {}
            },
            None if fresh => mark_current_format(&db, directory, sled::Batch::default())?,
            None => return Err(OpenError::NotAStore { path: path(), reason: "no format marker" }),
        }
        Ok(Store {
            db,
            directory: Arc::new(path()),
            locks: Arc::default(),
            pages: Arc::default(),
            tails: Arc::default(),
        })
    }

    /// The folder the store lives in.
    pub fn directory(&self) -> &Path {
        &self.directory
    }

    /// The meta entry `name`.
    pub fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, ReadError> {
        self.read(|| Ok(self.db.get(keys::meta(name))?.map(|value| value.to_vec())))
    }

    /// The document under `key` with its increments; `None` if no value is stored under `key`
    /// (increments without a value are not returned) or if `key` is over [`MAX_DOCUMENT_KEY`].
    pub fn document(&self, key: &[u8]) -> Result<Option<StoredDocument>, ReadError> {
        let Some(prefix) = keys::increment_prefix(key) else {
            return Ok(None);
        };
        self.read(|| {
            let Some(value) = self.db.get(keys::document(key))? else {
                return Ok(None);
            };
            let increments = self
                .db
                .scan_prefix(&prefix)
                .map(|entry| {
                    let (stored, value) = entry?;
                    Ok((keys::increment_index(&stored, prefix.len())?, value.to_vec()))
                })
                .collect::<Result<_, ReadError>>()?;
            Ok(Some(StoredDocument { value: value.to_vec(), increments }))
        })
    }

    /// The value stored under document `key`, without its increments.
    pub fn document_value(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ReadError> {
        self.read(|| Ok(self.db.get(keys::document(key))?.map(|value| value.to_vec())))
    }

    /// Keys of documents whose key starts with `prefix`, strictly after `after` if given, at most `limit`.
    pub fn document_keys(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<Vec<u8>>, ReadError> {
        let start = keys::document(prefix);
        let lower = match after.map(keys::document) {
            Some(after) if after >= start => Bound::Excluded(after),
            _ => Bound::Included(start.clone()),
        };
        self.collect((lower, Bound::Unbounded), limit, |stored, _| {
            if stored.starts_with(&start) { keys::document_key(stored).map(|key| Some(key.to_vec())) } else { Ok(None) }
        })
    }

    /// The log entry of `origin` at `sequence`.
    pub fn log_entry(&self, origin: &[u8; 16], sequence: u64) -> Result<Option<Vec<u8>>, ReadError> {
        self.read(|| journal::entry(&self.db, &self.pages, &Journal::log(origin), sequence))
    }

    /// Entries of one origin with sequence >= from, ascending, at most `limit`.
    pub fn log_range(&self, origin: &[u8; 16], from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, ReadError> {
        self.read(|| journal::range(&self.db, &self.pages, &Journal::log(origin), from, limit))
    }

    /// Feed entries with feed sequence > after, ascending, at most `limit`.
    pub fn feed_range(&self, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, ReadError> {
        let Some(from) = after.checked_add(1) else { return Ok(Vec::new()) };
        self.read(|| journal::range(&self.db, &self.pages, &Journal::numbered(Keyspace::Feed), from, limit))
    }

    /// Feed items with feed sequence > after, ascending, at most `limit`, reading past damaged
    /// pages and entries (each run of them is one [`JournalItem::Damaged`]).
    pub fn feed_items(&self, after: u64, limit: usize) -> Result<Vec<JournalItem>, ReadError> {
        let Some(from) = after.checked_add(1) else { return Ok(Vec::new()) };
        self.read(|| journal::readable_range(&self.db, &self.pages, &Journal::numbered(Keyspace::Feed), from, limit))
    }

    /// The feed entry with the highest sequence, if any.
    pub fn feed_last(&self) -> Result<Option<(u64, Vec<u8>)>, ReadError> {
        self.read(|| journal::last(&self.db, &self.pages, &Journal::numbered(Keyspace::Feed)))
    }

    /// The audit entry at `sequence`.
    pub fn audit_entry(&self, sequence: u64) -> Result<Option<Vec<u8>>, ReadError> {
        self.read(|| journal::entry(&self.db, &self.pages, &Journal::numbered(Keyspace::Audit), sequence))
    }

    /// Audit entries with sequence > after, ascending, at most `limit`.
    pub fn audit_range(&self, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, ReadError> {
        let Some(from) = after.checked_add(1) else { return Ok(Vec::new()) };
        self.read(|| journal::range(&self.db, &self.pages, &Journal::numbered(Keyspace::Audit), from, limit))
    }

    /// The audit entry with the highest sequence, if any.
    pub fn audit_last(&self) -> Result<Option<(u64, Vec<u8>)>, ReadError> {
        self.read(|| journal::last(&self.db, &self.pages, &Journal::numbered(Keyspace::Audit)))
    }

    /// The conflict entry at `sequence`.
    pub fn conflict(&self, sequence: u64) -> Result<Option<Vec<u8>>, ReadError> {
        self.numbered_entry(Keyspace::Conflicts, sequence)
    }

    /// Conflict entries with sequence > after, ascending, at most `limit`.
    pub fn conflict_range(&self, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, ReadError> {
        self.numbered_range(Keyspace::Conflicts, after, limit)
    }

    /// The conflict entry with the highest sequence, if any.
    pub fn conflict_last(&self) -> Result<Option<(u64, Vec<u8>)>, ReadError> {
        self.numbered_last(Keyspace::Conflicts)
    }

    /// The quarantined change with id `id`.
    pub fn quarantined(&self, id: u64) -> Result<Option<Vec<u8>>, ReadError> {
        self.numbered_entry(Keyspace::Quarantine, id)
    }

    /// Quarantined changes with id > after, ascending, at most `limit`.
    pub fn quarantine_range(&self, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, ReadError> {
        self.numbered_range(Keyspace::Quarantine, after, limit)
    }

    /// The quarantined change with the highest id, if any.
    pub fn quarantine_last(&self) -> Result<Option<(u64, Vec<u8>)>, ReadError> {
        self.numbered_last(Keyspace::Quarantine)
    }

    /// Applies the batch atomically and then flushes (sled `flush()`), returning only once durable:
    /// [`Store::apply`] then [`Store::flush`].
    pub fn commit(&self, batch: WriteBatch) -> Result<(), WriteError> {
        let applied = self.apply(batch)?;
        self.flush(applied)
    }

    /// Applies the batch atomically: readers see it from now on, and it is durable once the
    /// returned [`Applied`] is passed to [`Store::flush`]. A crash before that may lose it (and
    /// any batch applied after it), never part of it.
    ///
    /// Only [`Store::flush`] makes a batch durable as far as the store's callers know (sled's own
    /// background thread also flushes about every 500 ms, which nothing here counts on). sled
    /// 0.34.7 deadlocks when several tasks call flush_async concurrently (sled issue #1308), so
    /// the node applies and flushes from one thread only. Applies are also serialised by a lock
    /// shared by all clones of the store.
    ///
    /// Applying reads the last page of each journal (feed, audit, an origin's log) the batch
    /// writes to, unless an earlier commit left that journal's last entry number in memory
    /// (`journal::Tails`), and the pages its removals and trims reach (see `journal`).
    pub fn apply(&self, batch: WriteBatch) -> Result<Applied, WriteError> {
        let WriteBatch { batch: mut staged, feed, audit, log, operations, refused } = batch;
        if let Some(refused) = refused {
            return Err(refused);
        }
        if operations == 0 {
            return Ok(Applied { flush: false });
        }
        let _committing = self.locks.commit.lock().unwrap_or_else(PoisonError::into_inner);
        // Only commits change the tree, so the journals are read without blocking readers.
        let tails = guarded(|| -> Result<Vec<(Journal, journal::Tail)>, WriteError> {
            let numbered =
                [(Journal::numbered(Keyspace::Feed), feed), (Journal::numbered(Keyspace::Audit), audit)].into_iter();
            let logs = log.into_iter().map(|(origin, pending)| (Journal::log(&origin), pending));
            let mut tails = Vec::new();
            for (journal, pending) in numbered.chain(logs) {
                if !pending.is_empty() {
                    let known = self.tails.get(&journal);
                    let after = journal::stage(&self.db, &self.pages, &journal, pending, known, &mut staged)?;
                    tails.push((journal, after));
                }
            }
            Ok(tails)
        })
        .map_err(|message| WriteError::Panicked { message })??;
        let _applying = self.locks.visibility.write().unwrap_or_else(PoisonError::into_inner);
        let applied = guarded(|| self.db.apply_batch(staged)).map_err(|message| WriteError::Panicked { message });
        if !matches!(applied, Ok(Ok(()))) {
            self.tails.forget_all();
        }
        applied?.map_err(WriteError::Apply)?;
        for (journal, after) in tails {
            self.tails.set(&journal, after);
        }
        Ok(Applied { flush: true })
    }

    /// Makes what [`Store::apply`] applied durable (and every batch applied before it).
    pub fn flush(&self, applied: Applied) -> Result<(), WriteError> {
        if applied.flush {
            // One flush at a time, whichever clone of the store calls it (sled issue #1308).
            let _committing = self.locks.commit.lock().unwrap_or_else(PoisonError::into_inner);
            guarded(|| self.db.flush())
                .map_err(|message| WriteError::Panicked { message })?
                .map_err(WriteError::Flush)?;
        }
        Ok(())
    }

    /// How many entries and bytes of keys and values each keyspace holds: a scan of the whole
    /// store, for benchmarks and diagnosis (seconds at millions of entries), not for a hot path.
    pub fn usage(&self) -> Result<Vec<KeyspaceUsage>, ReadError> {
        self.read(|| {
            let mut usage: Vec<KeyspaceUsage> = Keyspace::ALL.into_iter().map(KeyspaceUsage::empty).collect();
            for entry in self.db.iter() {
                let (key, value) = entry?;
                let found =
                    key.first().and_then(|&prefix| usage.iter_mut().find(|usage| usage.keyspace.prefix() == prefix));
                // Every key the store writes starts with a keyspace's prefix byte.
                let Some(slot) = found else {
                    return Err(ReadError::Corrupt { keyspace: Keyspace::Meta, key: key.to_vec() });
                };
                slot.entries += 1;
                slot.key_bytes += key.len() as u64;
                slot.value_bytes += value.len() as u64;
            }
            Ok(usage)
        })
    }

    /// The bytes the store's files take on disk, as sled counts them.
    pub fn size_on_disk(&self) -> Result<u64, ReadError> {
        self.read(|| Ok(self.db.size_on_disk()?))
    }

    fn numbered_entry(&self, keyspace: Keyspace, number: u64) -> Result<Option<Vec<u8>>, ReadError> {
        self.read(|| Ok(self.db.get(keys::numbered(keyspace, number))?.map(|value| value.to_vec())))
    }

    fn numbered_range(&self, keyspace: Keyspace, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, ReadError> {
        let Some(from) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let range = keys::numbered(keyspace, from)..=keys::numbered(keyspace, u64::MAX);
        self.collect(range, limit, |stored, value| Ok(Some((keys::number(keyspace, stored)?, value.to_vec()))))
    }

    fn numbered_last(&self, keyspace: Keyspace) -> Result<Option<(u64, Vec<u8>)>, ReadError> {
        let range = keys::numbered(keyspace, 0)..=keys::numbered(keyspace, u64::MAX);
        self.read(|| match self.db.range(range).next_back() {
            Some(entry) => {
                let (stored, value) = entry?;
                Ok(Some((keys::number(keyspace, &stored)?, value.to_vec())))
            }
            None => Ok(None),
        })
    }

    /// Runs a read under the visibility lock, turning a sled panic into an error.
    fn read<T>(&self, operation: impl FnOnce() -> Result<T, ReadError>) -> Result<T, ReadError> {
        let _reading = self.locks.visibility.read().unwrap_or_else(PoisonError::into_inner);
        guarded(operation).map_err(|message| ReadError::Panicked { message })?
    }

    /// Decodes the entries of `range` in order until `decode` returns `None` or `limit` are found.
    fn collect<K: AsRef<[u8]>, T>(
        &self,
        range: impl RangeBounds<K>,
        limit: usize,
        decode: impl Fn(&[u8], &[u8]) -> Result<Option<T>, ReadError>,
    ) -> Result<Vec<T>, ReadError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.read(|| {
            let mut found = Vec::new();
            for entry in self.db.range(range) {
                let (stored, value) = entry?;
                let Some(item) = decode(&stored, &value)? else {
                    break;
                };
                found.push(item);
                if found.len() >= limit {
                    break;
                }
            }
            Ok(found)
        })
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.debug_struct("Store").field("directory", &self.directory).finish_non_exhaustive()
    }
}

impl WriteBatch {
    /// Stores `value` as the document under `key`. A key longer than [`MAX_DOCUMENT_KEY`] makes
    /// the whole batch fail at commit with [`WriteError::KeyTooLong`].
    pub fn put_document(&mut self, key: &[u8], value: &[u8]) {
        if self.accept_key(key) {
            self.insert(keys::document(key), value);
        }
    }

    /// Removes the document under `key` (not its increments).
    pub fn remove_document(&mut self, key: &[u8]) {
        if self.accept_key(key) {
            self.remove(keys::document(key));
        }
    }

    /// Stores increment `index` of the document under `key`. A key longer than
    /// [`MAX_DOCUMENT_KEY`] makes the whole batch fail at commit with [`WriteError::KeyTooLong`].
    pub fn put_increment(&mut self, key: &[u8], index: u32, value: &[u8]) {
        if let Some(encoded) = self.increment_key(key, index) {
            self.insert(encoded, value);
        }
    }

    /// Removes increment `index` of the document under `key`.
    pub fn remove_increment(&mut self, key: &[u8], index: u32) {
        if let Some(encoded) = self.increment_key(key, index) {
            self.remove(encoded);
        }
    }

    /// Stores the log entry of `origin` at `sequence`.
    pub fn put_log(&mut self, origin: &[u8; 16], sequence: u64, value: &[u8]) {
        self.log.entry(*origin).or_default().put(sequence, value);
        self.operations += 1;
    }

    /// Removes the log entry of `origin` at `sequence`.
    pub fn remove_log(&mut self, origin: &[u8; 16], sequence: u64) {
        self.log.entry(*origin).or_default().remove(sequence);
        self.operations += 1;
    }

    /// Stores the feed entry at `sequence`: cheapest after the feed's last entry (see
    /// `journal`).
    pub fn put_feed(&mut self, sequence: u64, value: &[u8]) {
        self.feed.put(sequence, value);
        self.operations += 1;
    }

    /// Removes every feed entry numbered `sequence` or less (retention). The trim applies before
    /// the batch's other feed operations, whatever their order: entries the batch puts stay.
    pub fn trim_feed_through(&mut self, sequence: u64) {
        self.feed.trim_through(sequence);
        self.operations += 1;
    }

    /// Stores the audit entry at `sequence`: cheapest after the audit trail's last entry.
    pub fn put_audit(&mut self, sequence: u64, value: &[u8]) {
        self.audit.put(sequence, value);
        self.operations += 1;
    }

    /// Removes the audit entry at `sequence`.
    pub fn remove_audit(&mut self, sequence: u64) {
        self.audit.remove(sequence);
        self.operations += 1;
    }

    /// Removes every audit entry numbered `sequence` or less (retention). The trim applies before
    /// the batch's other audit operations, whatever their order: entries the batch puts stay.
    pub fn trim_audit_through(&mut self, sequence: u64) {
        self.audit.trim_through(sequence);
        self.operations += 1;
    }

    /// Stores the conflict entry at `sequence`.
    pub fn put_conflict(&mut self, sequence: u64, value: &[u8]) {
        self.insert(keys::numbered(Keyspace::Conflicts, sequence).to_vec(), value);
    }

    /// Removes the conflict entry at `sequence`.
    pub fn remove_conflict(&mut self, sequence: u64) {
        self.remove(keys::numbered(Keyspace::Conflicts, sequence).to_vec());
    }

    /// Stores the quarantined change with id `id`.
    pub fn put_quarantine(&mut self, id: u64, value: &[u8]) {
        self.insert(keys::numbered(Keyspace::Quarantine, id).to_vec(), value);
    }

    /// Removes the quarantined change with id `id` (dropped, or retried successfully).
    pub fn remove_quarantine(&mut self, id: u64) {
        self.remove(keys::numbered(Keyspace::Quarantine, id).to_vec());
    }

    /// Stores the meta entry `name`. The name `format` is the store's own: using it makes the
    /// whole batch fail at commit with [`WriteError::ReservedMeta`].
    pub fn put_meta(&mut self, name: &str, value: &[u8]) {
        if name == FORMAT_META || name == FORMAT_2_PROGRESS_META {
            self.refuse(WriteError::ReservedMeta { name: name.to_owned() });
        } else {
            self.insert(keys::meta(name), value);
        }
    }

    /// The number of operations accepted so far.
    pub fn len(&self) -> usize {
        self.operations
    }

    /// Whether no operation has been accepted.
    pub fn is_empty(&self) -> bool {
        self.operations == 0
    }

    fn insert(&mut self, key: Vec<u8>, value: &[u8]) {
        self.batch.insert(key, value);
        self.operations += 1;
    }

    fn remove(&mut self, key: Vec<u8>) {
        self.batch.remove(key);
        self.operations += 1;
    }

    fn accept_key(&mut self, key: &[u8]) -> bool {
        if key.len() > MAX_DOCUMENT_KEY {
            self.refuse(WriteError::KeyTooLong { length: key.len(), maximum: MAX_DOCUMENT_KEY });
            return false;
        }
        true
    }

    fn increment_key(&mut self, key: &[u8], index: u32) -> Option<Vec<u8>> {
        if self.accept_key(key) { keys::increment(key, index) } else { None }
    }

    fn refuse(&mut self, error: WriteError) {
        self.refused.get_or_insert(error);
    }
}

/// Creates the folder if needed; returns whether it is new (missing or empty), after refusing a
/// path that is not a folder or a folder that holds files but no sled database.
fn prepare_directory(directory: &Path) -> Result<bool, OpenError> {
    let directory_error = |source| OpenError::Directory { path: directory.to_path_buf(), source };
    match fs::metadata(directory) {
        Ok(metadata) if !metadata.is_dir() => Err(OpenError::NotADirectory { path: directory.to_path_buf() }),
        Ok(_) => {
            let mut entries = fs::read_dir(directory).map_err(directory_error)?;
            if entries.next().is_none() {
                Ok(true)
            } else if directory.join("db").is_file() {
                Ok(false)
            } else {
                Err(OpenError::NotAStore {
                    path: directory.to_path_buf(),
                    reason: "the folder is not empty and has no sled `db` file",
                })
            }
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(directory).map_err(directory_error)?;
            Ok(true)
        }
        Err(error) => Err(directory_error(error)),
    }
}

/// How long [`Store::open`] waits for sled's lock on `db` to be released by a store dropped in this process.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// Waits, at most [`LOCK_WAIT`], until nobody holds the lock sled takes on `db`.
///
/// sled releases the lock when the last of its internal handles on `db` goes, which can be on one
/// of its background threads a little after the last [`Store`] was dropped; opening the store
/// again at once would fail with "could not acquire lock". If the lock is still held after the
/// wait (another process has the store open), sled reports it.
fn wait_for_lock(directory: &Path) {
    let Ok(file) = fs::File::open(directory.join("db")) else {
        return;
    };
    let started = Instant::now();
    while let Err(fs::TryLockError::WouldBlock) = file.try_lock() {
        if started.elapsed() >= LOCK_WAIT {
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Checks the format marker's magic bytes and version: this build's, or format 1 or 2, which
/// [`migrate_format_1`] and [`migrate_format_2`] bring up to date.
fn check_format(marker: &[u8], directory: &Path) -> Result<u32, OpenError> {
    let version =
        marker.strip_prefix(FORMAT_MAGIC).and_then(|version| <[u8; 4]>::try_from(version).ok()).map(u32::from_be_bytes);
    match version {
        Some(found @ (1 | 2 | FORMAT_VERSION)) => Ok(found),
        Some(found) => Err(OpenError::Version { path: directory.to_path_buf(), found, supported: FORMAT_VERSION }),
        None => Err(OpenError::Corrupt {
            path: directory.to_path_buf(),
            reason: format!("the format marker is garbled ({} bytes)", marker.len()),
        }),
    }
}

/// Moves a format 1 store's journals (an entry per key) into pages, then marks the store with
/// this build's format. Each sled batch pages [`MIGRATION_CHUNK`] entries and removes them, so an
/// interrupted migration goes on from where it stopped at the next open; the marker changes
/// only once none is left.
fn migrate_format_1(db: &sled::Db, directory: &Path) -> Result<(), OpenError> {
    for (legacy, keyspace) in keys::FORMAT_1_JOURNALS {
        loop {
            let chunk = during_open(directory, "reading format 1 journal entries", || {
                db.scan_prefix([legacy]).take(MIGRATION_CHUNK).collect::<sled::Result<Vec<_>>>()
            })?;
            if chunk.is_empty() {
                break;
            }
            let mut batch = sled::Batch::default();
            let mut entries = Vec::with_capacity(chunk.len());
            for (key, value) in &chunk {
                let Some((journal, number)) = Journal::format_1(keyspace, key) else {
                    return Err(OpenError::Corrupt {
                        path: directory.to_path_buf(),
                        reason: format!("a format 1 {keyspace} entry has a malformed key {:02x?}", &key[..]),
                    });
                };
                batch.remove(key);
                entries.push((journal, number, &value[..]));
            }
            for (key, value) in journal::paged(&entries) {
                batch.insert(key, value);
            }
            during_open(directory, "moving format 1 journal entries into pages", || db.apply_batch(batch))?;
        }
    }
    mark_current_format(db, directory, sled::Batch::default())
}

/// Stores every page of a format 2 store's journals again with format 3's leading byte
/// (compressed where that is smaller), then marks the store format 3.
///
/// Pages are visited in key order, [`PAGE_MIGRATION_CHUNK`] per sled batch, and each batch also
/// records the last key it stored in the meta entry [`FORMAT_2_PROGRESS_META`], so an
/// interrupted migration resumes after it instead of prefixing a page twice.
fn migrate_format_2(db: &sled::Db, directory: &Path) -> Result<(), OpenError> {
    let progress_key = keys::meta(FORMAT_2_PROGRESS_META);
    let mut done_through: Option<Vec<u8>> =
        during_open(directory, "reading the migration's progress", || db.get(&progress_key))?.map(|key| key.to_vec());
    for keyspace in [Keyspace::Audit, Keyspace::Feed, Keyspace::Log] {
        let prefix = keyspace.prefix();
        loop {
            let start = match &done_through {
                Some(key) if key.first() == Some(&prefix) => Bound::Excluded(key.clone()),
                Some(key) if key.first() > Some(&prefix) => break,
                _ => Bound::Included(vec![prefix]),
            };
            let chunk = during_open(directory, "reading format 2 pages", || {
                db.range((start, Bound::Excluded(vec![prefix + 1])))
                    .take(PAGE_MIGRATION_CHUNK)
                    .collect::<sled::Result<Vec<_>>>()
            })?;
            let Some((last, _)) = chunk.last() else { break };
            let mut batch = sled::Batch::default();
            for (key, value) in &chunk {
                batch.insert(key, journal::pack(value));
            }
            batch.insert(progress_key.as_slice(), last);
            done_through = Some(last.to_vec());
            during_open(directory, "storing format 2 pages again", || db.apply_batch(batch))?;
        }
    }
    let mut batch = sled::Batch::default();
    batch.remove(progress_key);
    mark_current_format(db, directory, batch)
}

/// Writes this build's format marker with `batch` and flushes: a new store's first write, and a
/// migration's last.
fn mark_current_format(db: &sled::Db, directory: &Path, mut batch: sled::Batch) -> Result<(), OpenError> {
    let mut marker = FORMAT_MAGIC.to_vec();
    marker.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    batch.insert(keys::meta(FORMAT_META), marker);
    during_open(directory, "writing the format marker", || {
        db.apply_batch(batch)?;
        db.flush()
    })?;
    Ok(())
}

/// Runs a sled operation of [`Store::open`], turning its error or panic into an [`OpenError`].
fn during_open<T>(directory: &Path, doing: &str, operation: impl FnOnce() -> sled::Result<T>) -> Result<T, OpenError> {
    let path = directory.to_path_buf();
    match guarded(operation) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(sled::Error::Corruption { at, .. })) => Err(OpenError::Corrupt {
            path,
            reason: match at {
                Some(at) => format!("sled found corrupted data at {at:?}"),
                None => "sled found corrupted data".to_owned(),
            },
        }),
        Ok(Err(source)) => Err(OpenError::Sled { path, source }),
        Err(message) => Err(OpenError::Corrupt { path, reason: format!("sled panicked while {doing}: {message}") }),
    }
}

/// Runs `operation`, turning a panic into its message.
fn guarded<T>(operation: impl FnOnce() -> T) -> Result<T, String> {
    panic::catch_unwind(AssertUnwindSafe(operation)).map_err(|payload| panic_message(&*payload))
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guarded_turns_a_panic_into_its_message() {
        assert_eq!(guarded(|| 7), Ok(7));
        assert_eq!(guarded(|| -> u8 { panic!("static message") }), Err("static message".to_owned()));
        assert_eq!(guarded(|| -> u8 { panic!("formatted {}", 7) }), Err("formatted 7".to_owned()));
    }

    #[test]
    fn format_marker_is_checked() {
        let directory = Path::new("/store");
        let mut marker = FORMAT_MAGIC.to_vec();
        marker.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        assert!(check_format(&marker, directory).is_ok());
        assert!(matches!(check_format(FORMAT_MAGIC, directory), Err(OpenError::Corrupt { .. })));
        assert!(matches!(check_format(b"", directory), Err(OpenError::Corrupt { .. })));
        marker.push(0);
        assert!(matches!(check_format(&marker, directory), Err(OpenError::Corrupt { .. })));
    }
}
