//! Journals: the feed, the audit trail and each origin's change log, numbered entries mostly
//! appended in order, stored as pages of consecutive entries (one sled entry per page instead of
//! one per entry).
//!
//! A node appends a log entry, a feed entry and an audit entry for every change it stores. As
//! sled entries of their own, they were three of a write's four inserts, and sled splits a leaf
//! every few inserts and copies its parent to do so. A commit's entries of one journal go into as few pages as the
//! limits allow ([`PAGE_ENTRIES_MAX`], [`PAGE_BYTES_MAX`]).
//!
//! A page is stored under the number of its first entry. Its entries are each stored as its
//! length (LEB128) and its bytes; an entry's number is the page's plus its position. Pages never
//! overlap, so the page holding entry `n` is the last one stored at or below `n`. Appending
//! needs the number of the journal's last entry, which the store remembers from its own commits
//! ([`Tails`]; one read of the last page when it does not); removing or replacing an entry
//! rewrites its page.
//!
//! Since store format 3 a page's value starts with a byte saying how the entries follow:
//! [`PAGE_PLAIN`] as they are, or [`PAGE_COMPRESSED`] as one zstd frame. A page is compressed
//! when that makes it smaller and its entries take at most [`COMPRESSED_PAGE_MAX`] bytes, which is
//! every page of more than one entry; that bound is also the most a stored frame may decompress
//! to, so a damaged or hostile frame cannot make a read allocate more. A page of one small entry
//! stays plain ([`COMPRESS_SINGLE_FROM`]). The entries of one journal
//! repeat themselves (an origin's changes share headers and field names, feed and audit entries
//! share keys and principals): on the bench's records the log's and the feed's pages shrink
//! about fivefold, the audit trail's about twofold (its hash chain does not compress).

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::BTreeMap;

use crate::error::{ReadError, WriteError};
use crate::keys::Keyspace;

/// At most this many entries share a page.
pub(crate) const PAGE_ENTRIES_MAX: usize = 128;
/// A page is closed once its value reaches this many bytes (an entry larger than this gets a
/// page of its own). Small pages keep sled's nodes small and a read of one entry cheap.
pub(crate) const PAGE_BYTES_MAX: usize = 16 << 10;

/// A stored page's first byte: its entries follow as they are.
pub(crate) const PAGE_PLAIN: u8 = 0;
/// A stored page's first byte: its entries follow as one zstd frame.
pub(crate) const PAGE_COMPRESSED: u8 = 1;
/// Entries of fewer bytes are stored plain: a zstd frame's own header would eat most of the gain.
const COMPRESS_FROM: usize = 64;
/// A page of one entry is compressed only from this many bytes. Alone, a small entry shrinks
/// little (an automerge change is already packed, an audit entry's hashes do not compress), and
/// at low write rates, where every commit writes one-entry pages, the zstd frames were 7% of a
/// replicating node's engine thread (BENCHMARKS.md, session 18).
const COMPRESS_SINGLE_FROM: usize = 1024;
/// Pages whose entries take more bytes are stored plain, and a compressed page may decompress to
/// at most this many. A page of more than one entry always fits (see [`PageBuilder::takes`]);
/// only an entry bigger than a page gets a plain page of its own.
pub(crate) const COMPRESSED_PAGE_MAX: usize = PAGE_BYTES_MAX + 16;
/// zstd's fastest regular level: on the bench's pages level 3 saved 1–5% more.
const PAGE_ZSTD_LEVEL: i32 = 1;

thread_local! {
    /// One zstd context per thread, reused: commits run on one thread, reads on a few.
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// The stored value of a page holding `entries`: compressed when that is smaller, else plain.
pub(crate) fn pack(entries: &[u8]) -> Vec<u8> {
    if (COMPRESS_FROM..=COMPRESSED_PAGE_MAX).contains(&entries.len()) {
        let compressed = COMPRESSOR.with(|cell| {
            let mut cell = cell.borrow_mut();
            if cell.is_none() {
                *cell = zstd::bulk::Compressor::new(PAGE_ZSTD_LEVEL).ok();
            }
            cell.as_mut()?.compress(entries).ok()
        });
        if let Some(compressed) = compressed.filter(|compressed| compressed.len() < entries.len()) {
            let mut stored = Vec::with_capacity(compressed.len() + 1);
            stored.push(PAGE_COMPRESSED);
            stored.extend_from_slice(&compressed);
            return stored;
        }
    }
    let mut stored = Vec::with_capacity(entries.len() + 1);
    stored.push(PAGE_PLAIN);
    stored.extend_from_slice(entries);
    stored
}

/// The entries of a stored page: borrowed from a plain page, decompressed from a compressed one.
pub(crate) fn unpack<'a>(keyspace: Keyspace, key: &[u8], stored: &'a [u8]) -> Result<Cow<'a, [u8]>, ReadError> {
    let corrupt = |reason| ReadError::CorruptValue { keyspace, key: key.to_vec(), reason };
    match stored.split_first() {
        Some((&PAGE_PLAIN, entries)) => Ok(Cow::Borrowed(entries)),
        Some((&PAGE_COMPRESSED, frame)) => {
            let entries = DECOMPRESSOR.with(|cell| {
                let mut cell = cell.borrow_mut();
                if cell.is_none() {
                    *cell = zstd::bulk::Decompressor::new().ok();
                }
                cell.as_mut()?.decompress(frame, COMPRESSED_PAGE_MAX).ok().filter(|entries| !entries.is_empty())
            });
            entries.map(Cow::Owned).ok_or_else(|| {
                corrupt("its compressed entries are damaged, missing, or decompress past the page limit")
            })
        }
        Some(_) => Err(corrupt("its first byte names no page encoding")),
        None => Err(corrupt("the page has no encoding byte")),
    }
}

/// How many decompressed pages a [`PageCache`] keeps.
pub(crate) const CACHED_PAGES: usize = 16;

/// The pages decompressed last, so that reads of neighbouring entries decompress their page once.
///
/// Reads come in runs on one page: a catch-up of records changed on both sides builds each
/// record from its first change, which is a pointer into the change log (one page read per
/// record, and a page holds up to 128 of an origin's changes); a feed reader at the tail reads
/// the last feed page after every commit; every commit reads each journal's last page. A hit
/// needs no invalidation: a page is found by its key and its stored bytes, and the same
/// compressed bytes always decompress to the same entries. Plain pages are not cached (reading
/// them costs nothing). At most [`CACHED_PAGES`] pages of at most [`COMPRESSED_PAGE_MAX`] bytes
/// each, with their compressed bytes.
#[derive(Debug, Default)]
pub(crate) struct PageCache {
    /// Most recently used last.
    pages: std::sync::Mutex<std::collections::VecDeque<CachedPage>>,
}

#[derive(Debug)]
struct CachedPage {
    key: Box<[u8]>,
    stored: Box<[u8]>,
    entries: std::sync::Arc<[u8]>,
}

/// A page's entries: borrowed from a plain page, or shared with the cache.
pub(crate) enum PageEntries<'a> {
    Plain(&'a [u8]),
    Decompressed(std::sync::Arc<[u8]>),
}

impl std::ops::Deref for PageEntries<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            PageEntries::Plain(entries) => entries,
            PageEntries::Decompressed(entries) => entries,
        }
    }
}

impl PageCache {
    /// [`unpack`], through the cache.
    pub(crate) fn unpack<'a>(
        &self,
        keyspace: Keyspace,
        key: &[u8],
        stored: &'a [u8],
    ) -> Result<PageEntries<'a>, ReadError> {
        if stored.first() != Some(&PAGE_COMPRESSED) {
            return match unpack(keyspace, key, stored)? {
                Cow::Borrowed(entries) => Ok(PageEntries::Plain(entries)),
                Cow::Owned(entries) => Ok(PageEntries::Decompressed(entries.into())),
            };
        }
        if let Some(entries) = self.find(key, stored) {
            return Ok(PageEntries::Decompressed(entries));
        }
        let entries: std::sync::Arc<[u8]> = unpack(keyspace, key, stored)?.into_owned().into();
        let mut pages = self.pages.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if pages.len() >= CACHED_PAGES {
            pages.pop_front();
        }
        pages.push_back(CachedPage { key: key.into(), stored: stored.into(), entries: entries.clone() });
        Ok(PageEntries::Decompressed(entries))
    }

    fn find(&self, key: &[u8], stored: &[u8]) -> Option<std::sync::Arc<[u8]>> {
        let mut pages = self.pages.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let position = pages.iter().rposition(|page| *page.key == *key)?;
        if *pages[position].stored != *stored {
            // The page was stored again since: what is cached is stale.
            pages.remove(position);
            return None;
        }
        let page = pages.remove(position)?;
        let entries = page.entries.clone();
        pages.push_back(page);
        Some(entries)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.pages.lock().map(|pages| pages.len()).unwrap_or_default()
    }
}

/// Where one journal's pages live: under a key prefix (its keyspace's byte, and for the log
/// the origin), each page under the prefix and its first entry's number (u64 BE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Journal {
    pub(crate) keyspace: Keyspace,
    prefix: Vec<u8>,
}

impl Journal {
    /// The journal of a keyspace numbered by a u64 alone (feed, audit).
    pub(crate) fn numbered(keyspace: Keyspace) -> Journal {
        Journal { keyspace, prefix: vec![keyspace.prefix()] }
    }

    /// The change log of one origin.
    pub(crate) fn log(origin: &[u8; 16]) -> Journal {
        let mut prefix = Vec::with_capacity(17);
        prefix.push(Keyspace::Log.prefix());
        prefix.extend_from_slice(origin);
        Journal { keyspace: Keyspace::Log, prefix }
    }

    /// The journal and number of a format 1 entry's key in `keyspace` (see
    /// `keys::FORMAT_1_JOURNALS`); `None` for a key of the wrong length.
    pub(crate) fn format_1(keyspace: Keyspace, key: &[u8]) -> Option<(Journal, u64)> {
        let number = |bytes: &[u8]| <[u8; 8]>::try_from(bytes).ok().map(u64::from_be_bytes);
        match keyspace {
            Keyspace::Log if key.len() == 25 => {
                let origin = <[u8; 16]>::try_from(&key[1..17]).ok()?;
                Some((Journal::log(&origin), number(&key[17..])?))
            }
            Keyspace::Feed | Keyspace::Audit if key.len() == 9 => {
                Some((Journal::numbered(keyspace), number(&key[1..])?))
            }
            _ => None,
        }
    }

    pub(crate) fn key(&self, number: u64) -> Vec<u8> {
        let mut key = Vec::with_capacity(self.prefix.len() + 8);
        key.extend_from_slice(&self.prefix);
        key.extend_from_slice(&number.to_be_bytes());
        key
    }

    /// The number a page key of this journal ends with.
    pub(crate) fn number(&self, key: &[u8]) -> Result<u64, ReadError> {
        key.strip_prefix(self.prefix.as_slice())
            .and_then(|number| <[u8; 8]>::try_from(number).ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| ReadError::Corrupt { keyspace: self.keyspace, key: key.to_vec() })
    }
}

/// What a write batch does to one journal: entries put or removed, and how far to trim it.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    /// In the order they were made; `None` removes.
    operations: Vec<(u64, Option<Vec<u8>>)>,
    /// Remove every entry numbered at most this.
    trim_through: Option<u64>,
}

impl Pending {
    pub(crate) fn put(&mut self, number: u64, value: &[u8]) {
        self.operations.push((number, Some(value.to_vec())));
    }

    pub(crate) fn remove(&mut self, number: u64) {
        self.operations.push((number, None));
    }

    pub(crate) fn trim_through(&mut self, number: u64) {
        self.trim_through = Some(self.trim_through.map_or(number, |earlier| earlier.max(number)));
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.operations.is_empty() && self.trim_through.is_none()
    }

    /// The operations in number order, the last one made for a number replacing the others.
    fn sorted(mut self) -> Vec<(u64, Option<Vec<u8>>)> {
        // Stable, so that of equal numbers the one made last comes last.
        self.operations.sort_by_key(|(number, _)| *number);
        let mut sorted: Vec<(u64, Option<Vec<u8>>)> = Vec::with_capacity(self.operations.len());
        for (number, value) in self.operations {
            match sorted.last_mut() {
                Some(last) if last.0 == number => last.1 = value,
                _ => sorted.push((number, value)),
            }
        }
        sorted
    }
}

/// A page being filled.
#[derive(Debug)]
pub(crate) struct PageBuilder {
    first: u64,
    count: usize,
    bytes: Vec<u8>,
}

impl PageBuilder {
    pub(crate) fn new(first: u64, value: &[u8]) -> PageBuilder {
        let mut page = PageBuilder { first, count: 0, bytes: Vec::with_capacity(value.len() + 2) };
        page.push(value);
        page
    }

    /// Whether entry `number` continues this page within the limits.
    pub(crate) fn takes(&self, number: u64, value: &[u8]) -> bool {
        self.first.checked_add(self.count as u64) == Some(number)
            && self.count < PAGE_ENTRIES_MAX
            && self.bytes.len().saturating_add(value.len()) < PAGE_BYTES_MAX
    }

    pub(crate) fn push(&mut self, value: &[u8]) {
        let mut length = value.len() as u64;
        loop {
            let byte = (length & 0x7f) as u8;
            length >>= 7;
            if length == 0 {
                self.bytes.push(byte);
                break;
            }
            self.bytes.push(byte | 0x80);
        }
        self.bytes.extend_from_slice(value);
        self.count += 1;
    }

    /// The page's key and stored value: compressed as [`pack`] decides, except that a page of
    /// one entry under [`COMPRESS_SINGLE_FROM`] bytes stays plain.
    pub(crate) fn into_entry(self, journal: &Journal) -> (Vec<u8>, Vec<u8>) {
        let value = if self.count == 1 && self.bytes.len() < COMPRESS_SINGLE_FROM {
            let mut stored = Vec::with_capacity(self.bytes.len() + 1);
            stored.push(PAGE_PLAIN);
            stored.extend_from_slice(&self.bytes);
            stored
        } else {
            pack(&self.bytes)
        };
        (journal.key(self.first), value)
    }
}

/// Packs entries in ascending number order into pages, a new page at every gap or limit.
pub(crate) fn pages<'a>(entries: impl IntoIterator<Item = (u64, &'a [u8])>) -> Vec<PageBuilder> {
    let mut pages: Vec<PageBuilder> = Vec::new();
    for (number, value) in entries {
        match pages.last_mut() {
            Some(page) if page.takes(number, value) => page.push(value),
            _ => pages.push(PageBuilder::new(number, value)),
        }
    }
    pages
}

/// Pages entries of several journals given in key order (each journal's entries together, in
/// ascending numbers): the stored keys and values.
pub(crate) fn paged(entries: &[(Journal, u64, &[u8])]) -> Vec<(Vec<u8>, Vec<u8>)> {
    entries
        .chunk_by(|one, next| one.0 == next.0)
        .flat_map(|run| {
            let journal = &run[0].0;
            pages(run.iter().map(|(_, number, value)| (*number, *value)))
                .into_iter()
                .map(|page| page.into_entry(journal))
        })
        .collect()
}

/// Stages a journal's pending operations into `batch`, reading what `tree` holds of it.
///
/// The usual case appends: every number is past the journal's last entry, and the new entries
/// become new pages. Which numbers are past it comes from `last` when the caller knows it (see
/// [`Tails`]), else from a read of the last page. Operations on numbers the journal may already
/// hold (a removal, a trim, a put that replaces) read the pages they reach, and those pages are
/// stored again as they come out (split at any gap, under their first entry).
///
/// Returns the number of the journal's last entry once the batch is applied (`Some(None)` for an
/// empty journal), or `None` when this stage cannot tell without a read (it rewrote pages).
pub(crate) fn stage(
    tree: &sled::Tree,
    cache: &PageCache,
    journal: &Journal,
    pending: Pending,
    last: Tail,
    batch: &mut sled::Batch,
) -> Result<Tail, WriteError> {
    let trim_through = pending.trim_through;
    let operations = pending.sorted();
    let last = match last {
        Some(last) => last,
        None => last_number(tree, cache, journal)?,
    };
    let held = operations.partition_point(|(number, _)| last.is_some_and(|last| *number <= last));
    let (within, beyond) = operations.split_at(held);
    let rewrites = !within.is_empty() || trim_through.is_some();
    if rewrites {
        rewrite(tree, cache, journal, within, trim_through, batch)?;
    }
    let appended: Vec<(u64, &[u8])> =
        beyond.iter().filter_map(|(number, value)| Some((*number, value.as_deref()?))).collect();
    let after = appended.last().map(|(number, _)| *number).or(last);
    for page in pages(appended) {
        let (key, value) = page.into_entry(journal);
        batch.insert(key, value);
    }
    Ok((!rewrites).then_some(after))
}

/// A journal's last entry number as far as it is known: `None` unknown (to be read), `Some(None)`
/// an empty journal, `Some(Some(n))` entry `n`.
pub(crate) type Tail = Option<Option<u64>>;

/// How many journals [`Tails`] remembers (the feed, the audit trail, and the change log of each
/// origin a node has stored changes of); past that it starts again from none.
pub(crate) const TAILS_MAX: usize = 4096;

/// The number of each journal's last entry, as the commits that appended to it left it, so that a
/// commit does not read each journal's last page to tell its appends apart (a reverse scan in
/// sled and a decompression: a tenth of a replicating node's engine thread at 1k writes/s).
///
/// Only [`crate::Store::apply`] changes journals once the store is open, under its commit lock,
/// and it records a journal's new last number only after sled applied the batch; a stage that
/// rewrote pages (a removal, a replacement, a trim) forgets the journal, and a failed apply
/// forgets them all, so a remembered number is never stale. A number below the truth is the
/// one that would corrupt: a put between it and the real end would be taken for an append and
/// start a page inside another (one above it only sends a put the slower way, through
/// `rewrite`).
#[derive(Debug, Default)]
pub(crate) struct Tails {
    last: std::sync::Mutex<std::collections::HashMap<Vec<u8>, Option<u64>>>,
}

impl Tails {
    /// The journal's last number if remembered (`Some(None)`: known to be empty).
    pub(crate) fn get(&self, journal: &Journal) -> Tail {
        self.lock().get(&journal.prefix).copied()
    }

    /// Records what [`stage`] returned for `journal`, once its batch is applied.
    pub(crate) fn set(&self, journal: &Journal, after: Tail) {
        let mut last = self.lock();
        match after {
            None => {
                last.remove(&journal.prefix);
            }
            Some(after) => {
                if last.len() >= TAILS_MAX && !last.contains_key(&journal.prefix) {
                    last.clear();
                }
                last.insert(journal.prefix.clone(), after);
            }
        }
    }

    /// Forgets every journal (after a batch that may or may not have been applied).
    pub(crate) fn forget_all(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<Vec<u8>, Option<u64>>> {
        self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Applies operations on numbers at or below the journal's last entry, and a trim, to the
/// pages they reach.
fn rewrite(
    tree: &sled::Tree,
    cache: &PageCache,
    journal: &Journal,
    operations: &[(u64, Option<Vec<u8>>)],
    trim_through: Option<u64>,
    batch: &mut sled::Batch,
) -> Result<(), WriteError> {
    let mut entries: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut read = |key: &[u8], value: &[u8], entries: &mut BTreeMap<u64, Vec<u8>>| -> Result<(), ReadError> {
        let first = journal.number(key)?;
        let value = cache.unpack(journal.keyspace, key, value)?;
        for entry in Page::new(journal.keyspace, key, first, &value) {
            let (number, value) = entry?;
            entries.insert(number, value.to_vec());
        }
        batch.remove(key);
        Ok(())
    };
    // The pages a trim reaches start at or below its number.
    let mut reached_through = None;
    if let Some(through) = trim_through {
        for stored in tree.range(journal.key(0)..=journal.key(through)) {
            let (key, value) = stored.map_err(ReadError::from)?;
            read(&key, &value, &mut entries)?;
        }
        reached_through = entries.last_key_value().map(|(number, _)| *number);
    }
    // Each operation's page, unless a page read already covers its number.
    for (number, _) in operations {
        if reached_through.is_some_and(|through| *number <= through) || entries.contains_key(number) {
            continue;
        }
        let page = tree.range(journal.key(0)..=journal.key(*number)).next_back();
        if let Some(stored) = page {
            let (key, value) = stored.map_err(ReadError::from)?;
            read(&key, &value, &mut entries)?;
        }
    }
    if let Some(through) = trim_through {
        entries = entries.split_off(&through.saturating_add(1));
        if through == u64::MAX {
            entries.clear();
        }
    }
    for (number, value) in operations {
        match value {
            Some(value) => entries.insert(*number, value.clone()),
            None => entries.remove(number),
        };
    }
    for page in pages(entries.iter().map(|(number, value)| (*number, value.as_slice()))) {
        let (key, value) = page.into_entry(journal);
        batch.insert(key, value);
    }
    Ok(())
}

/// The entries of a page (as [`unpack`] gives them), in order.
pub(crate) struct Page<'a> {
    keyspace: Keyspace,
    key: &'a [u8],
    next: Option<u64>,
    rest: &'a [u8],
}

impl<'a> Page<'a> {
    pub(crate) fn new(keyspace: Keyspace, key: &'a [u8], first: u64, value: &'a [u8]) -> Page<'a> {
        Page { keyspace, key, next: Some(first), rest: value }
    }

    fn corrupt(&mut self, reason: &'static str) -> ReadError {
        self.rest = &[];
        ReadError::CorruptValue { keyspace: self.keyspace, key: self.key.to_vec(), reason }
    }
}

impl<'a> Iterator for Page<'a> {
    type Item = Result<(u64, &'a [u8]), ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let Some(number) = self.next else {
            return Some(Err(self.corrupt("its entries number past u64::MAX")));
        };
        let mut length: u64 = 0;
        let mut read = 0;
        loop {
            let Some(&byte) = self.rest.get(read) else {
                return Some(Err(self.corrupt("an entry's length is cut short")));
            };
            if read == 9 && byte > 1 {
                return Some(Err(self.corrupt("an entry's length does not fit 64 bits")));
            }
            length |= u64::from(byte & 0x7f) << (7 * read);
            read += 1;
            if byte & 0x80 == 0 {
                break;
            }
        }
        let rest = &self.rest[read..];
        let Some(value) = usize::try_from(length).ok().and_then(|length| rest.get(..length)) else {
            return Some(Err(self.corrupt("an entry is longer than the page")));
        };
        self.rest = &rest[value.len()..];
        self.next = number.checked_add(1);
        Some(Ok((number, value)))
    }
}

/// A journal's last page: its key, its value and its first entry's number.
fn last_page(tree: &sled::Tree, journal: &Journal) -> Result<Option<(sled::IVec, sled::IVec, u64)>, ReadError> {
    let Some(stored) = tree.range(journal.key(0)..=journal.key(u64::MAX)).next_back() else { return Ok(None) };
    let (key, value) = stored?;
    let first = journal.number(&key)?;
    Ok(Some((key, value, first)))
}

/// The number of a journal's last entry, which tells appends from operations on held entries.
/// A damaged last page counts as ending at its first entry: appends go on, and reads of that
/// page report the damage.
fn last_number(tree: &sled::Tree, cache: &PageCache, journal: &Journal) -> Result<Option<u64>, ReadError> {
    let Some((key, value, first)) = last_page(tree, journal)? else { return Ok(None) };
    let Ok(value) = cache.unpack(journal.keyspace, &key, &value) else { return Ok(Some(first)) };
    let mut last = first;
    for entry in Page::new(journal.keyspace, &key, first, &value) {
        match entry {
            Ok((number, _)) => last = number,
            Err(_) => return Ok(Some(first)),
        }
    }
    Ok(Some(last))
}

/// The last entry of a journal: its number and bytes.
pub(crate) fn last(
    tree: &sled::Tree,
    cache: &PageCache,
    journal: &Journal,
) -> Result<Option<(u64, Vec<u8>)>, ReadError> {
    let Some((key, value, first)) = last_page(tree, journal)? else { return Ok(None) };
    let value = cache.unpack(journal.keyspace, &key, &value)?;
    let mut last = None;
    for entry in Page::new(journal.keyspace, &key, first, &value) {
        last = Some(entry?);
    }
    match last {
        Some((number, value)) => Ok(Some((number, value.to_vec()))),
        None => {
            Err(ReadError::CorruptValue { keyspace: journal.keyspace, key: key.to_vec(), reason: "the page is empty" })
        }
    }
}

/// What a read of a journal that goes past damage finds, in number order.
#[derive(Debug)]
pub enum JournalItem {
    /// An entry: its number and bytes.
    Entry(u64, Vec<u8>),
    /// Numbers from `first` whose page does not read, through `through`, the number before the
    /// next page; `None` when no page follows (the damage runs to the journal's end).
    Damaged { first: u64, through: Option<u64>, error: ReadError },
}

/// Entries numbered `from` or above, ascending, at most `limit`; the first damaged page fails
/// the read.
pub(crate) fn range(
    tree: &sled::Tree,
    cache: &PageCache,
    journal: &Journal,
    from: u64,
    limit: usize,
) -> Result<Vec<(u64, Vec<u8>)>, ReadError> {
    readable_range(tree, cache, journal, from, limit)?
        .into_iter()
        .map(|found| match found {
            JournalItem::Entry(number, value) => Ok((number, value)),
            JournalItem::Damaged { error, .. } => Err(error),
        })
        .collect()
}

/// Entries numbered `from` or above, ascending, at most `limit` items, reading past damage: a
/// page that does not unpack, or the rest of one from an entry that does not parse, is one
/// [`JournalItem::Damaged`] item, and the read goes on with the next page. Only sled's own errors
/// and a damaged page key fail it.
pub(crate) fn readable_range(
    tree: &sled::Tree,
    cache: &PageCache,
    journal: &Journal,
    from: u64,
    limit: usize,
) -> Result<Vec<JournalItem>, ReadError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    // The page holding `from`, if any, starts at or below it.
    let start = match tree.range(journal.key(0)..=journal.key(from)).next_back() {
        Some(stored) => journal.number(&stored?.0)?,
        None => from,
    };
    let mut found = Vec::new();
    let mut stored_pages = tree.range(journal.key(start)..=journal.key(u64::MAX)).peekable();
    while let Some(stored) = stored_pages.next() {
        let (key, value) = stored?;
        let first = journal.number(&key)?;
        let next_page = match stored_pages.peek() {
            Some(Ok((next_key, _))) => Some(journal.number(next_key)?),
            Some(Err(_)) | None => None,
        };
        // What is unreadable from `unreadable` on, up to the next page.
        let damaged = |unreadable: u64, error| {
            let through = next_page.map(|next| next.saturating_sub(1));
            let first = unreadable.max(from);
            (through.is_none_or(|through| first <= through)).then_some(JournalItem::Damaged { first, through, error })
        };
        let entries = match cache.unpack(journal.keyspace, &key, &value) {
            Ok(entries) => entries,
            Err(error) => {
                found.extend(damaged(first, error));
                if found.len() >= limit {
                    return Ok(found);
                }
                continue;
            }
        };
        let mut next = first;
        for entry in Page::new(journal.keyspace, &key, first, &entries) {
            match entry {
                Ok((number, value)) => {
                    next = number.saturating_add(1);
                    if number >= from {
                        found.push(JournalItem::Entry(number, value.to_vec()));
                    }
                }
                Err(error) => found.extend(damaged(next, error)),
            }
            if found.len() >= limit {
                return Ok(found);
            }
        }
    }
    Ok(found)
}

/// The entry numbered `number`.
pub(crate) fn entry(
    tree: &sled::Tree,
    cache: &PageCache,
    journal: &Journal,
    number: u64,
) -> Result<Option<Vec<u8>>, ReadError> {
    Ok(range(tree, cache, journal, number, 1)?.into_iter().find(|(found, _)| *found == number).map(|(_, value)| value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(page: &[u8], first: u64) -> Result<Vec<(u64, Vec<u8>)>, ReadError> {
        Page::new(Keyspace::Feed, b"key", first, page).map(|entry| entry.map(|(n, v)| (n, v.to_vec()))).collect()
    }

    #[test]
    fn pages_round_trip_and_split_at_gaps_and_limits() {
        let big = vec![7u8; PAGE_BYTES_MAX];
        let values: Vec<(u64, Vec<u8>)> = (1..=300u64)
            .map(|number| (number, format!("entry {number}").into_bytes()))
            .chain([(302, Vec::new()), (303, vec![1; 200]), (304, big.clone()), (305, b"after".to_vec())])
            .collect();
        let built = pages(values.iter().map(|(number, value)| (*number, value.as_slice())));
        let firsts: Vec<u64> = built.iter().map(|page| page.first).collect();
        // 128 per page, a new page at the gap before 302 and for the entry over the byte limit,
        // and one after it.
        assert_eq!(firsts, vec![1, 129, 257, 302, 304, 305]);
        let mut read = Vec::new();
        for page in built {
            let first = page.first;
            let (key, stored) = page.into_entry(&Journal::numbered(Keyspace::Feed));
            assert!(stored.len() <= PAGE_BYTES_MAX + 5);
            let bytes = unpack(Keyspace::Feed, &key, &stored).expect("unpacks");
            read.extend(entries(&bytes, first).expect("decodes"));
        }
        assert_eq!(read, values);
    }

    #[test]
    fn pages_are_compressed_when_that_makes_them_smaller() {
        let journal = Journal::numbered(Keyspace::Feed);
        let stored = |values: &[Vec<u8>]| {
            let built = pages(values.iter().enumerate().map(|(index, value)| (index as u64 + 1, value.as_slice())));
            assert_eq!(built.len(), 1);
            let plain = built[0].bytes.len();
            let (key, stored) = built.into_iter().next().expect("one page").into_entry(&journal);
            let unpacked = unpack(Keyspace::Feed, &key, &stored).expect("unpacks").into_owned();
            let read: Vec<Vec<u8>> =
                entries(&unpacked, 1).expect("decodes").into_iter().map(|(_, value)| value).collect();
            assert_eq!(read, values);
            (stored[0], stored.len(), plain)
        };
        // A commit's feed entries: alike but for the key and sequence.
        let alike: Vec<Vec<u8>> =
            (0..100).map(|n| format!("{{\"key\":\"customer-{n}\",\"at\":{n}}}").into_bytes()).collect();
        let (encoding, length, plain) = stored(&alike);
        assert_eq!(encoding, PAGE_COMPRESSED);
        assert!(length * 3 < plain, "{length} of {plain}");
        // Bytes that do not repeat, and too few bytes to gain from a frame.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<Vec<u8>> = (0..20)
            .map(|_| {
                (0..32)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        state as u8
                    })
                    .collect()
            })
            .collect();
        assert_eq!(stored(&noise).0, PAGE_PLAIN);
        assert_eq!(stored(&[b"short".to_vec()]).0, PAGE_PLAIN);
        // A lone entry is compressed only from COMPRESS_SINGLE_FROM bytes (its length prefix
        // included), however well it shrinks.
        let repetitive = |length: usize| "a change ".repeat(length / 9 + 1).into_bytes()[..length].to_vec();
        assert_eq!(stored(&[repetitive(COMPRESS_SINGLE_FROM - 3)]).0, PAGE_PLAIN);
        assert_eq!(stored(&[repetitive(COMPRESS_SINGLE_FROM - 2)]).0, PAGE_COMPRESSED);
        assert_eq!(stored(&[repetitive(200), repetitive(200)]).0, PAGE_COMPRESSED, "two entries are");
        // One entry over the bound of a compressed page stays plain however well it would shrink.
        let (encoding, length, plain) = stored(&[vec![0; COMPRESSED_PAGE_MAX]]);
        assert_eq!((encoding, length), (PAGE_PLAIN, plain + 1));
    }

    #[test]
    fn damaged_and_oversized_compressed_pages_are_errors() {
        let compressed = |bytes: &[u8]| {
            let mut stored = vec![PAGE_COMPRESSED];
            stored.extend(zstd::bulk::compress(bytes, 1).expect("compresses"));
            stored
        };
        let reason = |stored: &[u8]| match unpack(Keyspace::Audit, b"key", stored) {
            Err(ReadError::CorruptValue { keyspace: Keyspace::Audit, reason, .. }) => reason,
            other => panic!("expected a damaged page, got {other:?}"),
        };
        assert!(reason(&[]).contains("no encoding byte"));
        assert!(reason(&[2, 1, 0]).contains("names no page encoding"));
        assert!(reason(&[PAGE_COMPRESSED, 1, 2, 3]).contains("damaged"));
        // A frame holding a byte more than a page may: a bomb is refused, not inflated.
        assert!(reason(&compressed(&vec![0; COMPRESSED_PAGE_MAX + 1])).contains("past the page limit"));
        assert!(reason(&compressed(&vec![0; 64 << 20])).contains("past the page limit"));
        let mut cut = compressed(&[5; 4000]);
        cut.truncate(cut.len() - 2);
        assert!(reason(&cut).contains("damaged"));
        assert_eq!(
            unpack(Keyspace::Audit, b"key", &compressed(&vec![0; COMPRESSED_PAGE_MAX])).expect("fits").len(),
            COMPRESSED_PAGE_MAX
        );
    }

    #[test]
    fn damaged_pages_are_errors_not_panics() {
        let damaged: [(&[u8], &str); 4] = [
            (&[5, 1, 2], "longer than the page"),
            (&[0x80], "cut short"),
            (&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f], "64 bits"),
            (&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01], "64 bits"),
        ];
        for (page, reason) in damaged {
            let error = entries(page, 1).expect_err("damaged");
            assert!(matches!(error, ReadError::CorruptValue { keyspace: Keyspace::Feed, .. }), "{error}");
            assert!(error.to_string().contains(reason), "{error}");
        }
        // Two entries numbered from u64::MAX: the second has no number.
        let error = entries(&[1, 9, 1, 9], u64::MAX).expect_err("past u64::MAX");
        assert!(error.to_string().contains("past u64::MAX"), "{error}");
        assert_eq!(entries(&[1, 9], u64::MAX).expect("one entry"), vec![(u64::MAX, vec![9])]);
    }

    #[test]
    fn any_bytes_decode_to_entries_or_an_error() {
        // Every page of up to three bytes, then pseudo-random pages of up to 64: the decoder
        // returns entries that tile the page exactly, or stops at an error, and never panics.
        let mut pages: Vec<Vec<u8>> = Vec::new();
        let alphabet = [0u8, 1, 2, 0x7f, 0x80, 0x81, 0xff];
        for a in alphabet {
            pages.push(vec![a]);
            for b in alphabet {
                pages.push(vec![a, b]);
                for c in alphabet {
                    pages.push(vec![a, b, c]);
                }
            }
        }
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let length = (state % 65) as usize;
            pages.push((0..length).map(|index| (state >> (index % 8 * 8)) as u8 ^ index as u8).collect());
        }
        let length_bytes = |length: usize| (usize::BITS - length.leading_zeros()).div_ceil(7).max(1) as usize;
        for page in pages {
            let mut covered = 0;
            let mut failed = false;
            let mut expected_number = u64::MAX - 2;
            for entry in Page::new(Keyspace::Audit, b"key", u64::MAX - 2, &page) {
                match entry {
                    Ok((number, value)) => {
                        assert_eq!(number, expected_number);
                        expected_number = expected_number.wrapping_add(1);
                        covered += length_bytes(value.len()) + value.len();
                    }
                    Err(_) => failed = true,
                }
            }
            // Lengths may be written with more bytes than needed (a zero continuation byte).
            assert!(covered <= page.len(), "{page:?}");
            assert!(failed || page.is_empty() || covered > 0, "{page:?}");
            // The same bytes as a stored page's: errors, never a panic.
            for encoding in [PAGE_COMPRESSED, 2] {
                let mut stored = vec![encoding];
                stored.extend_from_slice(&page);
                assert!(unpack(Keyspace::Audit, b"key", &stored).is_err(), "{stored:?}");
            }
        }
    }

    #[test]
    fn a_read_past_damage_reports_each_damaged_run_and_goes_on() {
        let database = sled::Config::new().temporary(true).open().expect("a temporary sled");
        let tree: &sled::Tree = &database;
        let journal = Journal::numbered(Keyspace::Feed);
        let value = |number: u64| format!("entry {number}").into_bytes();
        // Pages 1..=3, 4..=6, 7..=9 and 10..=12, stored as a commit stores them.
        for first in [1u64, 4, 7, 10] {
            let built = pages(
                (first..first + 3)
                    .map(|number| (number, value(number)))
                    .collect::<Vec<_>>()
                    .iter()
                    .map(|(number, value)| (*number, value.as_slice())),
            );
            for page in built {
                let (key, stored) = page.into_entry(&journal);
                tree.insert(key, stored).expect("insert");
            }
        }
        // The second page does not unpack; the fourth has a good entry, then one cut short.
        tree.insert(journal.key(4), vec![PAGE_COMPRESSED, 1, 2, 3]).expect("insert");
        let mut cut = vec![PAGE_PLAIN];
        cut.push(8);
        cut.extend(value(10));
        cut.extend([9, b'e']);
        tree.insert(journal.key(10), cut).expect("insert");

        let summary = |items: Vec<JournalItem>| -> Vec<String> {
            items
                .into_iter()
                .map(|item| match item {
                    JournalItem::Entry(number, bytes) => {
                        assert_eq!(bytes, value(number));
                        number.to_string()
                    }
                    JournalItem::Damaged { first, through, error } => {
                        assert!(matches!(error, ReadError::CorruptValue { keyspace: Keyspace::Feed, .. }));
                        format!("damaged {first}..{through:?}")
                    }
                })
                .collect()
        };
        // One cache across the reads, as a store has: damage reads the same through it.
        let cache = PageCache::default();
        let all = summary(readable_range(tree, &cache, &journal, 1, 100).expect("reads"));
        assert_eq!(all, ["1", "2", "3", "damaged 4..Some(6)", "7", "8", "9", "10", "damaged 11..None"]);
        // From inside a damaged page, the run starts where the read does.
        assert_eq!(summary(readable_range(tree, &cache, &journal, 5, 2).expect("reads")), ["damaged 5..Some(6)", "7"]);
        // A limit counts a damaged run as one item.
        assert_eq!(
            summary(readable_range(tree, &cache, &journal, 2, 3).expect("reads")),
            ["2", "3", "damaged 4..Some(6)"]
        );
        assert_eq!(summary(readable_range(tree, &cache, &journal, 12, 5).expect("reads")), ["damaged 12..None"]);
        // The strict read fails at the first damage it reaches, and not before.
        assert_eq!(range(tree, &cache, &journal, 1, 3).expect("before the damage").len(), 3);
        assert!(range(tree, &cache, &journal, 1, 4).is_err());
        assert_eq!(range(tree, &cache, &journal, 7, 4).expect("between the damage").len(), 4);
        assert!(range(tree, &cache, &journal, 7, 5).is_err());
    }

    #[test]
    fn tails_remember_each_journal_forget_on_request_and_are_bounded() {
        let tails = Tails::default();
        let feed = Journal::numbered(Keyspace::Feed);
        assert_eq!(tails.get(&feed), None, "nothing is known at first");
        tails.set(&feed, Some(None));
        assert_eq!(tails.get(&feed), Some(None), "known to be empty");
        tails.set(&feed, Some(Some(7)));
        assert_eq!(tails.get(&feed), Some(Some(7)));
        tails.set(&feed, None);
        assert_eq!(tails.get(&feed), None, "a rewritten journal is read again");
        for origin in 0..TAILS_MAX as u32 + 10 {
            let mut bytes = [0_u8; 16];
            bytes[..4].copy_from_slice(&origin.to_be_bytes());
            tails.set(&Journal::log(&bytes), Some(Some(u64::from(origin))));
            assert!(tails.len() <= TAILS_MAX);
        }
        tails.set(&feed, Some(Some(9)));
        tails.forget_all();
        assert_eq!((tails.get(&feed), tails.len()), (None, 0));
    }

    #[test]
    fn the_page_cache_decompresses_a_page_once_notices_a_page_stored_again_and_is_bounded() {
        let cache = PageCache::default();
        let page = |first: u64, text: &str| {
            let values: Vec<Vec<u8>> = (0..100).map(|number| format!("{text} entry {number}").into_bytes()).collect();
            let built = pages(values.iter().enumerate().map(|(index, value)| (first + index as u64, value.as_slice())));
            assert_eq!(built.len(), 1);
            built.into_iter().next().map(|page| page.into_entry(&Journal::numbered(Keyspace::Feed))).expect("a page")
        };
        let (key, stored) = page(1, "first");
        assert_eq!(stored[0], PAGE_COMPRESSED);
        let entries = |stored: &[u8]| match cache.unpack(Keyspace::Feed, &key, stored).expect("unpacks") {
            PageEntries::Decompressed(entries) => entries,
            PageEntries::Plain(_) => panic!("a compressed page reads as plain"),
        };
        let read = entries(&stored);
        assert_eq!(*read, *unpack(Keyspace::Feed, &key, &stored).expect("unpacks"));
        // The second read is the first one's bytes, not a second decompression.
        assert!(std::sync::Arc::ptr_eq(&read, &entries(&stored)));
        assert_eq!(cache.len(), 1);

        // The same key stored again with other entries reads those, never the cached ones.
        let (again, restored) = page(1, "second");
        assert_eq!(again, key);
        let reread = entries(&restored);
        assert_eq!(*reread, *unpack(Keyspace::Feed, &key, &restored).expect("unpacks"));
        assert_ne!(*reread, *read);
        assert_eq!(cache.len(), 1);

        // Plain pages are read in place and not kept.
        let plain = pack(b"short");
        assert!(matches!(cache.unpack(Keyspace::Feed, b"plain", &plain), Ok(PageEntries::Plain(b"short"))));
        assert_eq!(cache.len(), 1);

        // Damage is an error, and not kept either.
        assert!(cache.unpack(Keyspace::Feed, b"damaged", &[PAGE_COMPRESSED, 1, 2, 3]).is_err());
        assert_eq!(cache.len(), 1);

        for first in 0..(CACHED_PAGES as u64 + 5) {
            let (key, stored) = page(1_000 * (first + 1), "many");
            cache.unpack(Keyspace::Feed, &key, &stored).expect("unpacks");
        }
        assert_eq!(cache.len(), CACHED_PAGES);
    }

    #[test]
    fn the_last_operation_on_a_number_wins() {
        let mut pending = Pending::default();
        for (number, value) in [(3, "c"), (1, "a"), (3, "C"), (2, "b"), (4, "d")] {
            pending.put(number, value.as_bytes());
        }
        pending.remove(2);
        pending.remove(4);
        pending.put(4, b"D");
        let sorted: Vec<(u64, Option<Vec<u8>>)> = pending.sorted();
        let expected: Vec<(u64, Option<Vec<u8>>)> =
            vec![(1, Some(b"a".to_vec())), (2, None), (3, Some(b"C".to_vec())), (4, Some(b"D".to_vec()))];
        assert_eq!(sorted, expected);
    }
}
