//! The record engine: one thread that owns the document cache and the store, runs every read and
//! write against them, and acknowledges writes only after the group commit that made them durable.
//!
//! Callers hand the engine jobs (closures) through a bounded queue. The engine runs as many queued
//! jobs as it can (up to [`BATCH_JOBS_MAX`]), commits everything they wrote in one store batch with
//! one flush, and only then releases their replies. So many concurrent writers share one flush, and
//! this thread is the single path that ever flushes sled (concurrent `flush_async` calls deadlock
//! in sled 0.34.7, issue #1308). sled is synchronous, so none of this runs on the async runtime.
//!
//! When a commit fails the engine stops: the replies of that batch are dropped (their callers see
//! an error, and nothing unacknowledged is claimed durable), and the node shuts down rather than
//! keep serving from a cache that is ahead of the disk.

use std::collections::{HashSet, VecDeque};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crdt::clock::{Clock, Timestamp};
use crdt::envelope::{DocumentKind, Envelope};
use crdt::identity::{NodeId, OriginId};
use crdt::key::RecordKey;
use crdt::map_record::MapRecord;
use crdt::record::{ChangeHash, FirstChange, Operation, OperationError, Record, RecordError, RecordView};
use crdt::text::{TextDocument, TextError, TextLimits};
use crdt::version_vector::VersionVector;
use lru::LruCache;
use serde::{Deserialize, Serialize};
use store::{Store, WriteBatch};
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::Metrics;

mod audit;
mod collections;
mod conflicts;
mod disposal;
mod feed;
mod quarantine;
mod snapshots;
mod unbuilt;
mod writes;

pub use audit::{
    ALL_FIELDS, AUDIT_PAGE_MAX, AUDIT_RETENTION_DEFAULT, AuditCheck, AuditPage, AuditStatus, LOCAL_PRINCIPAL,
    audit_page, export_page, parse_head, stored_anchor, verify_store,
};
pub use conflicts::CONFLICTS_PAGE_MAX;
use feed::FeedEntry;
pub use feed::{FEED_RETENTION_DEFAULT, FeedBounds, FeedDamage, FeedEvent};
pub use quarantine::{QUARANTINE_ENTRIES_MAX, QUARANTINE_PAGE_MAX, QuarantineEntry};

pub use collections::is_system_collection;

pub(crate) use snapshots::StoreSource;
pub use snapshots::{LOG_RETENTION_DEFAULT, SNAPSHOT_RECORD_BYTES_MAX};
use writes::{Answer, AnswerKind, WriteRequest};

/// A group commit slower than this is logged with its size.
const SLOW_COMMIT: Duration = Duration::from_millis(50);

/// The most jobs that share one group commit.
pub const BATCH_JOBS_MAX: usize = 512;
/// How many jobs may wait for the engine before callers wait for room.
pub const QUEUE_JOBS_MAX: usize = 4096;
/// A record with this many incremental changes is compacted when the engine is idle.
pub const INCREMENTS_COMPACT_AT: u32 = 64;
/// The most threads a round of local writes spreads its CRDT work over.
pub const WORKERS_MAX: usize = 8;

/// The most entries one trimming step deletes from a journal (the change log, the feed, the
/// audit trail), so trimming never stalls writes for long.
const TRIM_ENTRIES_PER_STEP: usize = 4096;

/// When a journal is next trimmed by age: the change log (`snapshots`), the feed (`feed`) and
/// the audit trail (`audit`) each keep one.
#[derive(Debug)]
pub(crate) struct Retention {
    pub(crate) period: Duration,
    next_due: Instant,
}

impl Retention {
    pub(crate) fn new(period: Duration) -> Retention {
        Retention { period, next_due: Instant::now() }
    }

    /// Whether a trimming step is due at `now`. If so, the next one is scheduled a tenth of the
    /// period later, between once a second and once a minute.
    fn take_due(&mut self, now: Instant) -> bool {
        if now < self.next_due {
            return false;
        }
        self.next_due = now + (self.period / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        true
    }

    /// The step just taken was full, so more may be due: the next one may run at once.
    fn again(&mut self, now: Instant) {
        self.next_due = now;
    }

    /// Entries from before this time (ms since the Unix epoch) are past the period.
    fn cutoff_ms(&self) -> u64 {
        physical_ms().saturating_sub(u64::try_from(self.period.as_millis()).unwrap_or(u64::MAX))
    }
}

/// A Yjs update v1 that holds nothing (no structs, no deletions): how a text's creation travels.
const EMPTY_TEXT_UPDATE: [u8; 2] = [0, 0];
/// The most feed events one page returns.
pub const FEED_PAGE_MAX: usize = 512;
/// The most records one listing page returns, and the most keys it scans.
pub const LIST_LIMIT_MAX: usize = 1000;

/// Why a job failed. Unless said otherwise, nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the engine has stopped (storage failure or shutdown)")]
    Stopped,
    #[error("storage error: {0}")]
    Storage(String),
    #[error("stored document {key} is damaged: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("{key} is a {actual}, not a {expected}")]
    WrongKind { key: RecordKey, actual: &'static str, expected: &'static str },
    #[error(transparent)]
    Operation(Box<OperationError>),
    #[error(transparent)]
    Text(Box<TextError>),
    #[error("change for {key} does not apply: {reason}")]
    BadChange { key: RecordKey, reason: String },
    #[error("collection {0:?} is reserved for Concord's own records (names starting with '_')")]
    SystemCollection(String),
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Invalid(Box<crdt::schema::Violation>),
    #[error(
        "the feed no longer holds the events after {after}: retention trimmed it through {floor}; \
         read the records, then follow the feed from the sequence status reports"
    )]
    FeedTrimmed { after: u64, floor: u64 },
}

impl EngineError {
    /// The same error again: for each write of a round's lane that failed as a whole (see
    /// `writes`). Those fail before any operation runs, so every kind they can be is copied
    /// exactly; any other keeps its message.
    fn duplicate(&self) -> EngineError {
        match self {
            EngineError::Stopped => EngineError::Stopped,
            EngineError::Storage(message) => EngineError::Storage(message.clone()),
            EngineError::Corrupt { key, reason } => EngineError::Corrupt { key: key.clone(), reason: reason.clone() },
            EngineError::WrongKind { key, actual, expected } => {
                EngineError::WrongKind { key: key.clone(), actual, expected }
            }
            EngineError::SystemCollection(collection) => EngineError::SystemCollection(collection.clone()),
            EngineError::BadRequest(message) => EngineError::BadRequest(message.clone()),
            other => EngineError::Storage(other.to_string()),
        }
    }
}

impl From<OperationError> for EngineError {
    fn from(error: OperationError) -> Self {
        EngineError::Operation(Box::new(error))
    }
}

impl From<TextError> for EngineError {
    fn from(error: TextError) -> Self {
        EngineError::Text(Box::new(error))
    }
}

impl From<store::ReadError> for EngineError {
    fn from(error: store::ReadError) -> Self {
        EngineError::Storage(error.to_string())
    }
}

/// Who this node is, and which incarnation is running.
#[derive(Debug, Clone)]
pub struct Identity {
    pub node: NodeId,
    pub name: String,
    /// Fresh for every process start: see `crdt::identity`.
    pub origin: OriginId,
}

/// What the store keeps under a document key: the kind and the compacted document. Incremental
/// changes live beside it in the store's increments keyspace.
#[derive(Serialize, Deserialize)]
struct DocumentEntry {
    kind: DocumentKind,
    #[serde(with = "serde_bytes")]
    saved: Vec<u8>,
    /// When set, the document is still its first change, `saved` is empty, and the change's
    /// bytes are those of this (origin, sequence) in the change log, which holds them anyway:
    /// stored once instead of twice (BENCHMARKS.md, session 11). Log retention writes the bytes
    /// back into the entry before it trims that change (`snapshots`). Entries written before
    /// this field have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    logged: Option<(OriginId, u64)>,
}

impl DocumentEntry {
    fn decode(key: &RecordKey, bytes: &[u8]) -> Result<DocumentEntry, EngineError> {
        rmp_serde::from_slice(bytes)
            .map_err(|error| EngineError::Corrupt { key: key.to_string(), reason: error.to_string() })
    }

    /// The document's bytes: inline, or its first change read from the change log.
    fn into_saved(self, store: &Store, key: &RecordKey) -> Result<Vec<u8>, EngineError> {
        let Some((origin, sequence)) = self.logged else { return Ok(self.saved) };
        let corrupt = |reason: String| EngineError::Corrupt { key: key.to_string(), reason };
        let Some(bytes) = store.log_entry(origin.as_bytes(), sequence)? else {
            return Err(corrupt(format!("its first change, {origin} {sequence}, is not in the change log")));
        };
        let envelope = Envelope::decode(&bytes)
            .map_err(|error| corrupt(format!("the change log entry of its first change does not decode: {error}")))?;
        if envelope.key != *key {
            return Err(corrupt(format!("the change log entry {origin} {sequence} is a change of {}", envelope.key)));
        }
        Ok(envelope.change)
    }
}

/// The identity and counters kept in the store's metadata.
#[derive(Serialize, Deserialize)]
struct StoredIdentity {
    node: NodeId,
    name: String,
}

#[derive(Default, Serialize, Deserialize)]
struct StoredCounters {
    feed_sequence: u64,
    record_count: u64,
    digest: [u8; 32],
}

/// The record count in the stored meta entry `counters`, for tools that read a stopped node's
/// store (`concord bench`); `None` if the bytes are not counters.
pub fn stored_record_count(counters: &[u8]) -> Option<u64> {
    rmp_serde::from_slice::<StoredCounters>(counters).ok().map(|counters| counters.record_count)
}

enum Body {
    /// Boxed: an automerge document is several KiB inline, a text much less.
    Record(Box<Record>),
    /// A record of a collection on the yrs record engine.
    Map(Box<MapRecord>),
    Text(TextDocument),
}

/// How errors name a document kind.
fn kind_name(kind: DocumentKind) -> &'static str {
    match kind {
        DocumentKind::Record => "record",
        DocumentKind::MapRecord => "yrs record",
        DocumentKind::Text => "text",
    }
}

impl Body {
    fn kind(&self) -> DocumentKind {
        match self {
            Body::Record(_) => DocumentKind::Record,
            Body::Map(_) => DocumentKind::MapRecord,
            Body::Text(_) => DocumentKind::Text,
        }
    }

    /// Whether the document counts as a live record or text for `record_count`.
    fn is_live(&self) -> bool {
        match self {
            Body::Record(record) => record.is_live(),
            Body::Map(record) => record.is_live(),
            Body::Text(_) => true,
        }
    }

    fn save(&self) -> Vec<u8> {
        match self {
            Body::Record(record) => record.save(),
            Body::Map(record) => record.save(),
            Body::Text(text) => text.save(),
        }
    }

    /// Applies change bytes of `kind` (from a peer, a snapshot or the disk). Returns whether the
    /// document changed; on error it is unchanged.
    fn apply(
        &mut self,
        key: &RecordKey,
        kind: DocumentKind,
        bytes: &[u8],
        limits: &TextLimits,
    ) -> Result<bool, EngineError> {
        self.apply_keeping(key, kind, bytes, limits).map(|(changed, _)| changed)
    }

    /// [`Body::apply`], which also hands back an automerge record as it was before the bytes.
    fn apply_keeping(
        &mut self,
        key: &RecordKey,
        kind: DocumentKind,
        bytes: &[u8],
        limits: &TextLimits,
    ) -> Result<(bool, Option<Record>), EngineError> {
        let refused = |reason: String| EngineError::BadChange { key: key.clone(), reason };
        match (self, kind) {
            (Body::Record(record), DocumentKind::Record) => {
                // On a copy: see `Record::apply_changes_intact` for why not in place.
                let (changed, previous) =
                    record.apply_changes_keeping(bytes).map_err(|error| refused(error.to_string()))?;
                Ok((changed, Some(previous)))
            }
            (Body::Map(record), DocumentKind::MapRecord) => record
                .apply_update(bytes, limits)
                .map(|changed| (changed, None))
                .map_err(|error| refused(error.to_string())),
            (Body::Text(text), DocumentKind::Text) => text
                .apply_update(bytes, limits)
                .map(|changed| (changed, None))
                .map_err(|error| refused(error.to_string())),
            (body, _) => Err(EngineError::WrongKind {
                key: key.clone(),
                actual: kind_name(body.kind()),
                expected: kind_name(kind),
            }),
        }
    }

    /// The record as reads return it; an error for a text.
    fn view(&self, key: &RecordKey) -> Result<RecordView, EngineError> {
        let corrupt = |reason: String| EngineError::Corrupt { key: key.to_string(), reason };
        match self {
            Body::Record(record) => record.view().map_err(|error: RecordError| corrupt(error.to_string())),
            Body::Map(record) => record.view().map_err(|error| corrupt(error.to_string())),
            Body::Text(_) => Err(EngineError::WrongKind { key: key.clone(), actual: "text", expected: "record" }),
        }
    }

    /// What the status digest hashes for this document: its key, kind and state.
    fn digest(&self, key: &RecordKey) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&key.to_bytes());
        match self {
            Body::Record(record) => return record_digest(key, &record.heads()),
            Body::Map(record) => {
                hasher.update(b"\0map record\0");
                hasher.update(&record.digest());
            }
            Body::Text(text) => {
                hasher.update(b"\0text\0");
                hasher.update(&text.digest());
            }
        }
        *hasher.finalize().as_bytes()
    }
}

struct Document {
    body: Body,
    /// The index the next incremental change gets; also how many are stored.
    next_increment: u32,
    /// Whether the store holds this document (else it is new, and its first change stores it whole).
    stored: bool,
}

/// What staging a change needs to know about a document from before the change.
struct Before {
    live: bool,
    /// The document's digest term, when it was already counted in the node's digest.
    digest: Option<[u8; 32]>,
}

impl Before {
    fn of(document: &Document, key: &RecordKey) -> Before {
        Before::counted(document, key, document.stored)
    }

    /// `counted`: whether the node's record count and digest already hold the document (it is
    /// stored, or a change to it is staged).
    fn counted(document: &Document, key: &RecordKey, counted: bool) -> Before {
        Before { live: counted && document.body.is_live(), digest: counted.then(|| document.body.digest(key)) }
    }
}

/// The same about a document after the change.
struct After {
    live: bool,
    digest: [u8; 32],
}

impl After {
    fn of(document: &Document, key: &RecordKey) -> After {
        After { live: document.body.is_live(), digest: document.body.digest(key) }
    }
}

/// The digest term of an automerge record with these sorted heads.
fn record_digest(key: &RecordKey, heads: &[ChangeHash]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&key.to_bytes());
    hasher.update(b"\0record\0");
    for head in heads {
        hasher.update(head.as_ref());
    }
    *hasher.finalize().as_bytes()
}

/// A record as reads return it.
#[derive(Debug, Clone)]
pub struct RecordRead {
    pub key: RecordKey,
    pub view: RecordView,
}

/// The outcome of a write that was accepted.
#[derive(Debug, Clone)]
pub struct WriteOutcome<A = RecordView> {
    /// False when the write changed nothing (no envelope, no feed event).
    pub changed: bool,
    /// What the write answers with: the record as reads return it, or only its version
    /// ([`Engine::write_version_as`]).
    pub answer: A,
    /// The envelope that carries the change, when there was one.
    pub envelope: Option<Envelope>,
}

impl<A> WriteOutcome<A> {
    /// The same outcome with its answer converted.
    fn try_map_answer<B>(
        self,
        convert: impl FnOnce(A) -> Result<B, EngineError>,
    ) -> Result<WriteOutcome<B>, EngineError> {
        Ok(WriteOutcome { changed: self.changed, answer: convert(self.answer)?, envelope: self.envelope })
    }
}

/// What `GET /v1/status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub node_id: String,
    pub name: String,
    pub origin: String,
    pub record_count: u64,
    pub feed_sequence: u64,
    /// Every feed event at or below it was trimmed by retention.
    pub feed_floor: u64,
    pub version_vector: serde_json::Value,
    pub digest: String,
    pub peers: Vec<crate::replication::PeerStatus>,
    /// Entries in this node's conflict ledger.
    pub conflicts: u64,
    /// Conflicts recorded per change applied from peers since this start.
    pub conflict_rate: f64,
    /// Changes from peers in quarantine.
    pub quarantined: u64,
    /// The audit log's newest entry and trim anchor.
    pub audit: AuditStatus,
}

/// A listing page.
#[derive(Debug, Clone)]
pub struct ListPage {
    pub records: Vec<RecordRead>,
    /// Pass as `after` to continue; `None` when the collection is exhausted.
    pub next: Option<String>,
}

/// A document as [`Engine::find_document`] finds it.
enum Found {
    Built(Document),
    Bytes { kind: DocumentKind, saved: Vec<u8>, increments: Vec<(u32, Vec<u8>)> },
}

/// The engine's state, owned by its thread.
pub struct Engine {
    pub(crate) store: Store,
    batch: WriteBatch,
    cache: LruCache<RecordKey, Document>,
    /// Documents changed in the batch not yet committed: the store does not have them yet, so
    /// the cache must not drop them.
    dirty: HashSet<RecordKey>,
    /// Dirty documents the cache evicted, kept until the commit (bounded by the batch).
    evicted_dirty: std::collections::HashMap<RecordKey, Document>,
    /// Evicted documents on their way to be freed off this thread.
    disposal: disposal::Disposal<Document>,
    /// Records new to this node stored straight from their first change, without building them
    /// (see [`Engine::stage_first_change`]): their bytes until the commit, so a read or change in
    /// the same batch builds them from these, not from a store that lacks them, and the newest
    /// ones after it, so a change feed serving them reads neither the store nor the log.
    unbuilt: unbuilt::Unbuilt,
    identity: Identity,
    clock: Clock,
    pub(crate) next_sequence: u64,
    version_vector: VersionVector,
    /// Per origin, below which the change log lacks changes this node holds (see `snapshots`).
    log_floors: crdt::replica::LogFloors,
    floors_dirty: bool,
    retention: Retention,
    /// The audit trail's chain, retention and the attribution of the change being applied.
    audit: audit::AuditTrail,
    /// The feed's floor and retention (see `feed`).
    feed: feed::Feed,
    counters: StoredCounters,
    counters_dirty: bool,
    compaction: VecDeque<RecordKey>,
    compaction_queued: HashSet<RecordKey>,
    text_limits: TextLimits,
    yrs_collections: std::collections::BTreeSet<String>,
    definitions: collections::Definitions,
    ledger: conflicts::Ledger,
    quarantine: quarantine::Quarantine,
    /// Local writes queued for the next round (see `writes`).
    round: writes::Round,
    /// How many threads a round's CRDT work may use, the engine thread included.
    workers: usize,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) replication: crate::replication::Replication,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Engine")
            .field("identity", &self.identity)
            .field("cached_documents", &self.cache.len())
            .field("feed_sequence", &self.counters.feed_sequence)
            .finish_non_exhaustive()
    }
}

type Completion = Box<dyn FnOnce() + Send>;

/// What the engine thread is asked to do.
enum Job {
    /// Any work on the engine; its completion runs after the group commit.
    Run(Box<dyn FnOnce(&mut Engine) -> Completion + Send>),
    /// Local record writes, queued for a round (see `writes`).
    Write(WriteRequest),
}

/// A cheap handle that async code uses to run jobs on the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: mpsc::Sender<Job>,
    /// The latest durable feed sequence, for change-feed subscribers.
    pub feed: watch::Receiver<u64>,
    pub identity: Identity,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("EngineHandle").field("identity", &self.identity).finish()
    }
}

impl EngineHandle {
    /// Queues `work` for the engine thread without waiting for it to run: resolves once the
    /// queue has room, so a producer faster than the engine is slowed to its pace.
    pub async fn submit<F>(&self, work: F) -> Result<(), EngineError>
    where
        F: FnOnce(&mut Engine) + Send + 'static,
    {
        let job = Job::Run(Box::new(move |engine| {
            work(engine);
            Box::new(|| {})
        }));
        self.jobs.send(job).await.map_err(|_| EngineError::Stopped)
    }

    /// Runs `work` on the engine thread; resolves after the group commit that covers it.
    pub async fn call<T, F>(&self, work: F) -> Result<T, EngineError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Engine) -> T + Send + 'static,
    {
        let (reply, receiver) = oneshot::channel();
        let job = Job::Run(Box::new(move |engine| {
            let result = work(engine);
            Box::new(move || {
                let _ = reply.send(result);
            })
        }));
        self.jobs.send(job).await.map_err(|_| EngineError::Stopped)?;
        receiver.await.map_err(|_| EngineError::Stopped)
    }

    /// A local record write on behalf of `principal` (see [`Engine::write_record_as`]); resolves
    /// after the group commit that covers it. Writes queued together share their CRDT work
    /// across the engine's workers (see `writes`).
    pub async fn write(
        &self,
        key: RecordKey,
        operation: Operation,
        principal: Arc<str>,
    ) -> Result<WriteOutcome, EngineError> {
        let outcomes = self.queue_writes(vec![(key, operation)], principal, AnswerKind::View).await?;
        let outcome = outcomes.into_iter().next().ok_or(EngineError::Stopped)?;
        outcome?.try_map_answer(Answer::into_view)
    }

    /// Local record writes on behalf of `principal`, each answered with the record's version
    /// alone, as a batch is (see [`Engine::write_version_as`]): one outcome per write, in
    /// order, after the group commit that covers them.
    pub async fn write_versions(
        &self,
        writes: Vec<(RecordKey, Operation)>,
        principal: Arc<str>,
    ) -> Result<Vec<Result<WriteOutcome<String>, EngineError>>, EngineError> {
        let outcomes = self.queue_writes(writes, principal, AnswerKind::Version).await?;
        Ok(outcomes
            .into_iter()
            .map(|outcome| outcome.and_then(|outcome| outcome.try_map_answer(|answer| Ok(answer.into_version()))))
            .collect())
    }

    async fn queue_writes(
        &self,
        writes: Vec<(RecordKey, Operation)>,
        principal: Arc<str>,
        answer: AnswerKind,
    ) -> Result<Vec<Result<WriteOutcome<Answer>, EngineError>>, EngineError> {
        let (reply, receiver) = oneshot::channel();
        let reply: writes::WriteReply = Box::new(move |outcomes| {
            let _ = reply.send(outcomes);
        });
        let job = Job::Write(WriteRequest { writes, principal, answer, reply });
        self.jobs.send(job).await.map_err(|_| EngineError::Stopped)?;
        receiver.await.map_err(|_| EngineError::Stopped)
    }
}

/// Settings for [`start`].
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub name: Option<String>,
    pub cache_documents: NonZeroUsize,
    pub text_limits: TextLimits,
    pub replication: crdt::replica::Settings,
    /// How long the change log keeps a change (see `snapshots`).
    pub log_retention: Duration,
    /// How many threads a round of local writes may spread its CRDT work over, the engine
    /// thread included (see `writes`).
    pub workers: usize,
    /// Collections whose new records use the yrs record engine ([`crdt::map_record`]) instead
    /// of automerge. Every node must declare the same ones.
    pub yrs_collections: std::collections::BTreeSet<String>,
    /// How long audit entries are kept; zero keeps them all (see `audit`).
    pub audit_retention: Duration,
    /// How long feed entries are kept; zero keeps them all (see `feed`).
    pub feed_retention: Duration,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            name: None,
            cache_documents: NonZeroUsize::new(4096).unwrap_or(NonZeroUsize::MIN),
            workers: default_workers(),
            text_limits: TextLimits::default(),
            replication: crdt::replica::Settings::default(),
            log_retention: LOG_RETENTION_DEFAULT,
            yrs_collections: Default::default(),
            audit_retention: AUDIT_RETENTION_DEFAULT,
            feed_retention: FEED_RETENTION_DEFAULT,
        }
    }
}

/// The workers a round of writes uses unless configured: one per core, at most
/// [`WORKERS_MAX`].
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |cores| cores.get()).min(WORKERS_MAX)
}

/// Opens the engine over `store` on its own thread. The returned join handle yields the error
/// that stopped the engine, if any; it ends cleanly once every [`EngineHandle`] is dropped.
pub fn start(
    store: Store,
    settings: EngineSettings,
    metrics: Arc<Metrics>,
) -> Result<(EngineHandle, std::thread::JoinHandle<Result<(), EngineError>>), EngineError> {
    let identity = load_identity(&store, settings.name)?;
    let version_vector = match store.meta("version_vector")? {
        Some(bytes) => decode_meta(&bytes, "version_vector")?,
        None => VersionVector::new(),
    };
    let log_floors: crdt::replica::LogFloors = match store.meta("log_floors")? {
        Some(bytes) => decode_meta(&bytes, "log_floors")?,
        None => Default::default(),
    };
    let counters: StoredCounters = match store.meta("counters")? {
        Some(bytes) => decode_meta(&bytes, "counters")?,
        None => StoredCounters::default(),
    };
    let audit = audit::AuditTrail::open(&store, settings.audit_retention)?;
    let mut batch = WriteBatch::default();
    batch.put_meta(
        "identity",
        &rmp_serde::to_vec(&StoredIdentity { node: identity.node, name: identity.name.clone() }).unwrap_or_default(),
    );
    store.commit(batch).map_err(|error| EngineError::Storage(error.to_string()))?;
    let quarantine_state = quarantine::open(&store)?;
    let ledger_next = store.conflict_last()?.map_or(1, |(sequence, _)| sequence + 1);
    let (feed_sender, feed) = watch::channel(counters.feed_sequence);
    let feed_state = feed::Feed::new(
        feed::stored_floor(&store, counters.feed_sequence),
        counters.feed_sequence,
        settings.feed_retention,
    );
    let engine = Engine {
        store,
        batch: WriteBatch::default(),
        cache: LruCache::new(settings.cache_documents),
        dirty: HashSet::new(),
        evicted_dirty: Default::default(),
        disposal: disposal::Disposal::start("concord-disposal"),
        unbuilt: unbuilt::Unbuilt::new(),
        identity: identity.clone(),
        clock: Clock::new(),
        next_sequence: 1,
        version_vector: version_vector.clone(),
        log_floors: log_floors.clone(),
        floors_dirty: false,
        retention: Retention::new(settings.log_retention),
        audit,
        feed: feed_state,
        counters,
        counters_dirty: false,
        compaction: VecDeque::new(),
        compaction_queued: HashSet::new(),
        text_limits: settings.text_limits,
        yrs_collections: settings.yrs_collections,
        definitions: Default::default(),
        ledger: conflicts::Ledger { next_sequence: ledger_next },
        round: writes::Round::default(),
        workers: settings.workers.clamp(1, WORKERS_MAX),
        quarantine: quarantine_state,
        metrics,
        replication: crate::replication::Replication {
            replica: crdt::replica::Replica::new(version_vector, log_floors, settings.replication, Instant::now()),
            outbound: None,
            peers: Default::default(),
            durable: Vec::new(),
            floors_changed: false,
            traffic: Default::default(),
            acknowledged: Default::default(),
            disconnected: Vec::new(),
            waiters: Vec::new(),
            first_changes: std::collections::HashMap::new(),
            member_states: None,
        },
    };
    let (jobs, receiver) = mpsc::channel(QUEUE_JOBS_MAX);
    let thread = std::thread::Builder::new()
        .name("concord-engine".into())
        .spawn(move || engine.run(receiver, feed_sender))
        .map_err(|error| EngineError::Storage(format!("could not start the engine thread: {error}")))?;
    Ok((EngineHandle { jobs, feed, identity }, thread))
}

fn load_identity(store: &Store, name: Option<String>) -> Result<Identity, EngineError> {
    let stored: Option<StoredIdentity> = match store.meta("identity")? {
        Some(bytes) => Some(decode_meta(&bytes, "identity")?),
        None => None,
    };
    let node = match &stored {
        Some(stored) => stored.node,
        None => NodeId(random_bytes()?),
    };
    let name = name.or(stored.map(|stored| stored.name)).unwrap_or_else(|| format!("node-{}", &node.to_string()[..8]));
    Ok(Identity { node, name, origin: OriginId(random_bytes()?) })
}

fn random_bytes() -> Result<[u8; 16], EngineError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|error| EngineError::Storage(format!("no randomness for an identity: {error}")))?;
    Ok(bytes)
}

fn decode_meta<T: for<'de> Deserialize<'de>>(bytes: &[u8], name: &str) -> Result<T, EngineError> {
    rmp_serde::from_slice(bytes)
        .map_err(|error| EngineError::Corrupt { key: format!("meta {name}"), reason: error.to_string() })
}

fn physical_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_millis() as u64).unwrap_or(0)
}

impl Engine {
    fn run(mut self, mut receiver: mpsc::Receiver<Job>, feed: watch::Sender<u64>) -> Result<(), EngineError> {
        loop {
            let first = match receiver.try_recv() {
                Ok(job) => job,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) if !self.compaction.is_empty() => {
                    self.compact_some();
                    self.commit()?;
                    continue;
                }
                Err(mpsc::error::TryRecvError::Empty) => match receiver.blocking_recv() {
                    Some(job) => job,
                    None => break,
                },
            };
            let mut completions = Vec::new();
            self.take_job(first, &mut completions);
            let mut jobs = 1;
            while jobs < BATCH_JOBS_MAX {
                match receiver.try_recv() {
                    Ok(job) => self.take_job(job, &mut completions),
                    Err(_) => break,
                }
                jobs += 1;
            }
            self.run_round(&mut completions);
            if let Err(error) = self.commit() {
                tracing::error!(%error, "group commit failed; stopping the engine");
                return Err(error);
            }
            for completion in completions {
                completion();
            }
            self.after_commit();
            feed.send_replace(self.counters.feed_sequence);
        }
        self.commit()
    }

    /// Runs a job, or queues its writes for the round. Any other job runs after the writes
    /// queued before it, so it sees their effects.
    fn take_job(&mut self, job: Job, completions: &mut Vec<Completion>) {
        match job {
            Job::Write(request) => self.queue_writes(request, completions),
            Job::Run(work) => {
                if !self.round.is_empty() {
                    self.run_round(completions);
                }
                completions.push(work(self));
            }
        }
    }

    /// Periodic work the node asks for about once a second: trimming the audit trail and the
    /// feed by age, each only when due.
    pub fn retention_tick(&mut self) {
        let now = Instant::now();
        self.trim_audit_if_due(now);
        self.trim_feed_if_due(now);
    }

    /// Writes the pending batch and flushes it: the one place the store is flushed. In between,
    /// the changes the batch holds are relayed to peers (`relay_available`), so their apply and
    /// flush overlap this one; writers' replies and peers' credit still wait for the flush.
    fn commit(&mut self) -> Result<(), EngineError> {
        if self.counters_dirty {
            self.batch.put_meta("counters", &rmp_serde::to_vec(&self.counters).unwrap_or_default());
            self.batch.put_meta("version_vector", &rmp_serde::to_vec(&self.version_vector).unwrap_or_default());
            self.counters_dirty = false;
        }
        if self.floors_dirty {
            self.batch.put_meta("log_floors", &rmp_serde::to_vec(&self.log_floors).unwrap_or_default());
            self.floors_dirty = false;
            // The core hears of them once this batch is durable (`after_commit`).
            self.replication.floors_changed = true;
        }
        if self.batch.is_empty() {
            // Reads evict documents too.
            self.disposal.hand_over();
            return Ok(());
        }
        let started = Instant::now();
        let operations = self.batch.len();
        let storage = |error: store::WriteError| EngineError::Storage(error.to_string());
        let applied = self.store.apply(std::mem::take(&mut self.batch)).map_err(storage)?;
        self.feed.stored = self.counters.feed_sequence;
        // The store holds every document the batch changed (durable after the flush below; a
        // crash before it loses the whole batch, and the engine reloads from the store).
        self.dirty.clear();
        for (_, document) in self.evicted_dirty.drain() {
            self.disposal.discard(document);
        }
        self.unbuilt.committed();
        self.relay_available();
        let flushing = Instant::now();
        self.store.flush(applied).map_err(storage)?;
        self.metrics.flush_latency.observe(flushing.elapsed());
        self.disposal.hand_over();
        let elapsed = started.elapsed();
        self.metrics.observe_commit(elapsed, operations);
        if elapsed > SLOW_COMMIT {
            // Stalls of 50–500 ms come from the disk, with sled's flush queued behind other
            // processes' writeback (BENCHMARKS.md, session 9); the size tells them apart from a
            // large batch.
            tracing::warn!(elapsed_ms = elapsed.as_millis() as u64, operations, "slow group commit");
        }
        Ok(())
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Takes the document for `key` out of the cache (loading it from the store on a miss).
    fn take_document(&mut self, key: &RecordKey) -> Result<Option<Document>, EngineError> {
        match self.find_document(key)? {
            None => Ok(None),
            Some(Found::Built(document)) => Ok(Some(document)),
            Some(Found::Bytes { kind, saved, increments }) => {
                self.build_document(key, kind, &saved, &increments).map(Some)
            }
        }
    }

    /// Finds the document for `key`: built (taken out of the cache, or from those kept aside until
    /// the commit) or as bytes (unbuilt, staged in this batch or kept since; or in the store).
    /// Unbuilt bytes are left where they are, since a read of them needs no build; [`Engine::build_document`]
    /// takes them out, and its caller puts the built document back while the key is still dirty,
    /// so the cache keeps it until the commit.
    fn find_document(&mut self, key: &RecordKey) -> Result<Option<Found>, EngineError> {
        if let Some(document) = self.cache.pop(key) {
            return Ok(Some(Found::Built(document)));
        }
        if let Some(document) = self.evicted_dirty.remove(key) {
            return Ok(Some(Found::Built(document)));
        }
        if let Some(change) = self.unbuilt.get(key) {
            return Ok(Some(Found::Bytes {
                kind: DocumentKind::Record,
                saved: change.to_vec(),
                increments: Vec::new(),
            }));
        }
        let Some(stored) = self.store.document(&key.to_bytes())? else { return Ok(None) };
        let entry = DocumentEntry::decode(key, &stored.value)?;
        let kind = entry.kind;
        let saved = entry.into_saved(&self.store, key)?;
        Ok(Some(Found::Bytes { kind, saved, increments: stored.increments }))
    }

    /// Builds a document from its stored bytes: the saved document (or first change) and the
    /// increments after it.
    fn build_document(
        &mut self,
        key: &RecordKey,
        kind: DocumentKind,
        saved: &[u8],
        increments: &[(u32, Vec<u8>)],
    ) -> Result<Document, EngineError> {
        let corrupt = |reason: String| EngineError::Corrupt { key: key.to_string(), reason };
        self.unbuilt.remove(key);
        let next_increment = increments.last().map_or(0, |(index, _)| index + 1);
        let increments: Vec<&[u8]> = increments.iter().map(|(_, bytes)| bytes.as_slice()).collect();
        let body = match kind {
            DocumentKind::Record => {
                Body::Record(Box::new(Record::load(saved, &increments).map_err(|error| corrupt(error.to_string()))?))
            }
            DocumentKind::MapRecord => Body::Map(Box::new(
                MapRecord::load(self.identity.origin.text_client_id(), saved, &increments, &self.text_limits)
                    .map_err(|error| corrupt(error.to_string()))?,
            )),
            DocumentKind::Text => Body::Text(
                TextDocument::load(self.identity.origin.text_client_id(), saved, &increments, &self.text_limits)
                    .map_err(|error| corrupt(error.to_string()))?,
            ),
        };
        Ok(Document { body, next_increment, stored: true })
    }

    /// Returns a document to the cache. One the cache evicts while it has uncommitted changes is
    /// kept aside until the commit: reloading it from the store would lose them (found by the
    /// chaos harness with a small cache).
    fn put_back(&mut self, key: RecordKey, document: Document) {
        if let Some((evicted, document)) = self.cache.push(key.clone(), document) {
            if evicted != key && self.dirty.contains(&evicted) {
                self.evicted_dirty.insert(evicted, document);
            } else {
                self.disposal.discard(document);
            }
        }
    }

    /// The kind a new record of `key`'s collection is created as: the engine its collection
    /// declares.
    fn record_kind(&self, key: &RecordKey) -> DocumentKind {
        if self.yrs_collections.contains(key.collection()) { DocumentKind::MapRecord } else { DocumentKind::Record }
    }

    /// Applies a local record write and stages it for the group commit, attributed to
    /// [`LOCAL_PRINCIPAL`] in the audit trail (see [`Engine::write_record_as`]). System
    /// collections (names starting with `_`) are refused: the engine writes those itself.
    pub fn write_record(&mut self, key: RecordKey, operation: Operation) -> Result<WriteOutcome, EngineError> {
        self.write_record_as(key, operation, LOCAL_PRINCIPAL)
    }

    /// A record write without the system-collection check, attributed as the caller's work is.
    fn write_document(&mut self, key: RecordKey, operation: Operation) -> Result<WriteOutcome, EngineError> {
        self.write_now(key, operation, None, AnswerKind::View)?.try_map_answer(Answer::into_view)
    }

    /// Stamps a local change as the next envelope of this node's current origin.
    fn local_envelope(
        &mut self,
        key: &RecordKey,
        kind: DocumentKind,
        timestamp: Timestamp,
        change: Vec<u8>,
    ) -> Envelope {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        // Durable once this batch commits; the replication core hears of it then.
        self.replication.durable.push(crdt::replica::Durable::Change {
            source: None,
            origin: self.identity.origin,
            sequence,
        });
        Envelope {
            origin: self.identity.origin,
            node: self.identity.node,
            sequence,
            timestamp,
            key: key.clone(),
            kind,
            change,
        }
    }

    /// Applies a change envelope from elsewhere (a peer, in the replication issue). Returns
    /// whether the document changed. An envelope already held, by (origin, sequence), is a no-op;
    /// one whose bytes do not apply is refused and nothing is stored.
    pub fn apply_envelope(&mut self, envelope: Envelope) -> Result<bool, EngineError> {
        if self.version_vector.contains(&envelope.origin, envelope.sequence) {
            return Ok(false);
        }
        self.apply_held_envelope(envelope)
    }

    /// [`Engine::apply_envelope`] without the check that the change is new: for a change the
    /// node already counts as received (a quarantined one being retried).
    fn apply_held_envelope(&mut self, envelope: Envelope) -> Result<bool, EngineError> {
        if let Err(error) = self.clock.observe(envelope.timestamp, physical_ms()) {
            tracing::warn!(origin = %envelope.origin, %error, "not advancing the clock to a remote timestamp");
        }
        let key = envelope.key.clone();
        let mut document = match self.find_document(&key)? {
            Some(Found::Built(document)) => document,
            Some(Found::Bytes { kind, saved, increments }) => {
                if let Some(changed) = self.apply_rebuilding(&envelope, kind, &saved, &increments)? {
                    return Ok(changed);
                }
                self.build_document(&key, kind, &saved, &increments)?
            }
            None => {
                if let Some(first) = self.unbuilt_first_change(&envelope)? {
                    self.stage_first_change(&envelope, first);
                    return Ok(true);
                }
                self.empty_document(envelope.kind)
            }
        };
        let result = self.apply_envelope_in(&mut document, &envelope);
        if document.stored {
            self.put_back(key, document);
        }
        result
    }

    fn apply_envelope_in(&mut self, document: &mut Document, envelope: &Envelope) -> Result<bool, EngineError> {
        self.check_peer_schema(document, envelope)?;
        let before = Before::of(document, &envelope.key);
        let (changed, previous) =
            document.body.apply_keeping(&envelope.key, envelope.kind, &envelope.change, &self.text_limits)?;
        if changed {
            // The signatures before the change are read from the record as it was, and only
            // when there are conflicts after it (a record without conflicts has none new).
            let before = || previous.as_ref().map(conflicts::signatures_of).unwrap_or_default();
            self.record_conflicts(&envelope.key, document, before)?;
        }
        self.stage_change(document, envelope, before, changed);
        Ok(changed)
    }

    /// Applies a change to a record stored only as bytes by loading the record with the change
    /// in it ([`Record::load_applying`]), instead of building it, copying it and applying the
    /// change to the copy: about half the CPU for a small record measured alone, and 10% faster
    /// catching up on records changed on both sides of a partition (BENCHMARKS.md, session 19).
    /// The loaded record is compact, as the copy was. The record before the change is read at
    /// its old heads, for the digest, the count and the conflict signatures. Returns whether the
    /// record changed, or `None` when this way does not apply (a schema to check against the
    /// record before, parts that are not one whole history of changes): the caller builds the
    /// record and applies the change.
    fn apply_rebuilding(
        &mut self,
        envelope: &Envelope,
        kind: DocumentKind,
        saved: &[u8],
        increments: &[(u32, Vec<u8>)],
    ) -> Result<Option<bool>, EngineError> {
        if kind != DocumentKind::Record || !self.needs_no_built_record(envelope)? {
            return Ok(None);
        }
        let parts: Vec<&[u8]> = increments.iter().map(|(_, bytes)| bytes.as_slice()).collect();
        let Some(rebuilt) = Record::load_applying(saved, &parts, &envelope.change) else { return Ok(None) };
        let key = &envelope.key;
        let before = Before {
            live: rebuilt.record.is_live_at(&rebuilt.before),
            digest: Some(record_digest(key, &rebuilt.before)),
        };
        let next_increment = increments.last().map_or(0, |(index, _)| index + 1);
        let heads_before = rebuilt.before;
        let mut document = Document { body: Body::Record(Box::new(rebuilt.record)), next_increment, stored: true };
        if rebuilt.changed {
            self.record_conflicts(key, &document, || conflicts::signatures_at(&document, &heads_before))?;
        }
        self.unbuilt.remove(key);
        self.stage_change(&mut document, envelope, before, rebuilt.changed);
        self.put_back(key.clone(), document);
        self.metrics.records_rebuilt_with_change.inc();
        Ok(Some(rebuilt.changed))
    }

    /// Whether nothing about a peer's change to a record needs the record built before the
    /// change: a record of a user collection without a schema to check.
    fn needs_no_built_record(&mut self, envelope: &Envelope) -> Result<bool, EngineError> {
        if envelope.kind != DocumentKind::Record || is_system_collection(envelope.key.collection()) {
            return Ok(false);
        }
        Ok(self.definition(envelope.key.collection())?.is_none_or(|definition| definition.fields.is_empty()))
    }

    /// What a change that creates a record this node lacks holds, read without building the
    /// record ([`Record::first_change`]), when nothing about it needs the built record: a user
    /// collection without a schema to check (a first change cannot conflict). `None` sends it
    /// the building way.
    fn unbuilt_first_change(&mut self, envelope: &Envelope) -> Result<Option<FirstChange>, EngineError> {
        if !self.needs_no_built_record(envelope)? {
            return Ok(None);
        }
        // Read with its frame, off this thread, when it came from a peer (see `PeerFrame`).
        if let Some(first) = self.replication.first_changes.remove(&(envelope.origin, envelope.sequence)) {
            return Ok(Some(first));
        }
        Ok(Record::first_change(&envelope.change))
    }

    /// Stages a record new to this node from its first change, as [`Engine::stage_change`] does
    /// for a built one, without building it: automerge's load of the change and the drop of the
    /// document were most of the cost of catching up on new records (BENCHMARKS.md). It is
    /// stored as that change (the form a new document always takes, see `stage_bytes`) and built
    /// on first use.
    fn stage_first_change(&mut self, envelope: &Envelope, first: FirstChange) {
        let key = &envelope.key;
        self.batch.put_document(&key.to_bytes(), &encode_logged(DocumentKind::Record, envelope));
        self.dirty.insert(key.clone());
        self.unbuilt.stage(key.clone(), envelope.change.clone());
        let before = Before { live: false, digest: None };
        let after = After { live: first.live, digest: record_digest(key, &[first.head]) };
        self.stage_logged(envelope, before, after, true);
        self.metrics.records_stored_unbuilt.inc();
    }

    fn empty_document(&self, kind: DocumentKind) -> Document {
        let body = match kind {
            DocumentKind::Record => Body::Record(Box::default()),
            DocumentKind::MapRecord => Body::Map(Box::new(MapRecord::new(self.identity.origin.text_client_id()))),
            DocumentKind::Text => Body::Text(TextDocument::new(self.identity.origin.text_client_id())),
        };
        Document { body, next_increment: 0, stored: false }
    }

    /// Stages a change that `document` already holds: its bytes (see [`Engine::stage_bytes`]),
    /// the log entry, the version vector, the record count and the digest. When the change
    /// became visible (one held back for missing dependencies does not), also a feed entry.
    /// Always an audit entry (see `audit`).
    fn stage_change(&mut self, document: &mut Document, envelope: &Envelope, before: Before, visible: bool) {
        self.stage_bytes(document, &envelope.key, envelope.kind, &envelope.change, Some(envelope));
        self.stage_logged(envelope, before, After::of(document, &envelope.key), visible);
    }

    /// What every stored change stages besides the document: the log entry, the version vector,
    /// the accounting (with a feed entry when `visible`) and the audit entry.
    fn stage_logged(&mut self, envelope: &Envelope, before: Before, after: After, visible: bool) {
        self.batch.put_log(envelope.origin.as_bytes(), envelope.sequence, &envelope.encode());
        self.version_vector.insert(envelope.origin, envelope.sequence);
        let feed = visible.then(|| FeedEntry::of(envelope, physical_ms()));
        self.stage_accounting(&envelope.key, before, after, feed);
        self.stage_audit_change(&envelope.key, envelope.node);
    }

    /// Stages change bytes `document` already holds: a new document is stored as its first
    /// change (one store insert; cheaper than a full save, and it keeps exactly the bytes that
    /// were accepted; see `compact_some`), a stored one gains an increment. A first change that
    /// is `logged` (the envelope whose log entry this batch stages) is stored as a pointer to that
    /// entry instead of a second copy of its bytes.
    fn stage_bytes(
        &mut self,
        document: &mut Document,
        key: &RecordKey,
        kind: DocumentKind,
        change: &[u8],
        logged: Option<&Envelope>,
    ) {
        self.dirty.insert(key.clone());
        let key_bytes = key.to_bytes();
        if document.stored {
            self.batch.put_increment(&key_bytes, document.next_increment, change);
            document.next_increment += 1;
            // Every so many increments (not at every one past the mark: a document whose
            // compaction is refused would pay a whole save per write).
            if document.next_increment.is_multiple_of(INCREMENTS_COMPACT_AT)
                && self.compaction_queued.insert(key.clone())
            {
                self.compaction.push_back(key.clone());
            }
        } else {
            let entry = match logged {
                Some(envelope) => encode_logged(kind, envelope),
                None => encode_entry(kind, change.to_vec()),
            };
            self.batch.put_document(&key_bytes, &entry);
            document.next_increment = 0;
            document.stored = true;
        }
    }

    /// After a document changed: the record count, the digest, and the feed entry if any.
    fn stage_accounting(&mut self, key: &RecordKey, before: Before, after: After, feed: Option<FeedEntry>) {
        self.counters_dirty = true;
        self.definitions.changed(key);
        match (before.live, after.live) {
            (false, true) => self.counters.record_count += 1,
            (true, false) => self.counters.record_count = self.counters.record_count.saturating_sub(1),
            _ => {}
        }
        if let Some(digest) = before.digest {
            xor_into(&mut self.counters.digest, &digest);
        }
        xor_into(&mut self.counters.digest, &after.digest);
        let Some(feed) = feed else { return };
        self.counters.feed_sequence += 1;
        self.batch.put_feed(self.counters.feed_sequence, &rmp_serde::to_vec(&feed).unwrap_or_default());
        self.metrics.writes.inc();
    }

    /// Reads a record; `None` when it does not exist or is deleted.
    pub fn read_record(&mut self, key: RecordKey) -> Result<Option<RecordRead>, EngineError> {
        let view = self.record_view(&key)?;
        Ok(view.filter(|view| view.value.is_some()).map(|view| RecordRead { key, view }))
    }

    /// The view of a record document, deleted or not; `None` when there is no document.
    ///
    /// A record that is still one first change and not in the cache (one new to this node, or
    /// written once and evicted) is read from that change without building it
    /// ([`Record::first_change_view`]): building it cost a replica most of its time serving
    /// each new record to a change feed once (BENCHMARKS.md, session 8). Such a record has no
    /// conflicts, so no policy applies to its view.
    fn record_view(&mut self, key: &RecordKey) -> Result<Option<RecordView>, EngineError> {
        let document = match self.find_document(key)? {
            None => return Ok(None),
            Some(Found::Built(document)) => document,
            Some(Found::Bytes { kind, saved, increments }) => {
                let unbuilt = (kind == DocumentKind::Record && increments.is_empty())
                    .then(|| Record::first_change_view(&saved))
                    .flatten();
                if let Some(view) = unbuilt {
                    self.metrics.reads.inc();
                    self.metrics.records_read_unbuilt.inc();
                    return Ok(Some(view));
                }
                self.build_document(key, kind, &saved, &increments)?
            }
        };
        let result = document.body.view(key).and_then(|view| self.resolved_view(key, &document, view));
        self.put_back(key.clone(), document);
        self.metrics.reads.inc();
        result.map(Some)
    }

    /// Whether `key` is a deleted record here (a tombstone), as opposed to a live one or one this
    /// node has never held.
    pub fn record_deleted(&mut self, key: &RecordKey) -> Result<bool, EngineError> {
        match self.record_view(key) {
            Ok(view) => Ok(view.is_some_and(|view| view.value.is_none())),
            Err(EngineError::WrongKind { .. }) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Lists live records of `collection` whose id starts with `prefix`, after id `after`.
    pub fn list_records(
        &mut self,
        collection: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<ListPage, EngineError> {
        let limit = limit.clamp(1, LIST_LIMIT_MAX);
        let collection_prefix = RecordKey::collection_prefix(collection)
            .map_err(|error| EngineError::Storage(format!("bad collection: {error}")))?;
        let mut scan_prefix = collection_prefix.clone();
        scan_prefix.extend_from_slice(prefix.as_bytes());
        let mut cursor = after.map(|after| [collection_prefix.as_slice(), after.as_bytes()].concat());
        let mut records = Vec::new();
        let mut scanned = 0;
        loop {
            let keys = self.store.document_keys(&scan_prefix, cursor.as_deref(), limit - records.len())?;
            if keys.is_empty() {
                return Ok(ListPage { records, next: None });
            }
            cursor = keys.last().cloned();
            for key_bytes in keys {
                scanned += 1;
                let key = RecordKey::from_bytes(&key_bytes).map_err(|error| EngineError::Corrupt {
                    key: format!("{key_bytes:?}"),
                    reason: error.to_string(),
                })?;
                match self.read_record(key.clone()) {
                    Ok(Some(read)) => records.push(read),
                    Ok(None) | Err(EngineError::WrongKind { .. }) => {}
                    Err(error) => return Err(error),
                }
                if records.len() == limit || scanned >= LIST_LIMIT_MAX {
                    // The page is full, or this request scanned its share of tombstones and texts:
                    // the caller continues after the last key examined.
                    let next = Some(key.id().to_owned());
                    return Ok(ListPage { records, next });
                }
            }
        }
    }

    pub fn status(&self) -> Status {
        let version_vector = self
            .version_vector
            .origins()
            .map(|(origin, range)| {
                let beyond: Vec<[u64; 2]> = range.beyond.iter().map(|(&start, &end)| [start, end]).collect();
                (origin.to_string(), serde_json::json!({ "contiguous": range.contiguous, "beyond": beyond }))
            })
            .collect::<serde_json::Map<_, _>>();
        Status {
            node_id: self.identity.node.to_string(),
            name: self.identity.name.clone(),
            origin: self.identity.origin.to_string(),
            record_count: self.counters.record_count,
            feed_sequence: self.counters.feed_sequence,
            feed_floor: self.feed_bounds().floor,
            version_vector: serde_json::Value::Object(version_vector),
            digest: hex::encode(self.counters.digest),
            peers: self.peer_statuses(),
            conflicts: self.ledger.next_sequence.saturating_sub(1),
            conflict_rate: self.metrics.conflicts.total() as f64 / self.metrics.changes_applied.get().max(1) as f64,
            quarantined: self.quarantine.size,
            audit: self.audit_status(),
        }
    }

    /// Per origin, below which the change log lacks changes this node holds.
    pub fn log_floors(&self) -> Vec<(OriginId, u64)> {
        self.log_floors.iter().map(|(origin, floor)| (*origin, *floor)).collect()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Stages the node-local meta entry `name` (connector definitions and checkpoints, which
    /// never replicate) for the group commit: durable once the job's caller hears back.
    pub fn stage_meta(&mut self, name: &str, value: &[u8]) {
        self.batch.put_meta(name, value);
    }

    /// Compacts a few queued documents: saves each whole and drops its increments.
    fn compact_some(&mut self) {
        for _ in 0..16 {
            let Some(key) = self.compaction.pop_front() else { return };
            self.compaction_queued.remove(&key);
            let document = match self.take_document(&key) {
                Ok(Some(document)) => document,
                Ok(None) => continue,
                Err(error) => {
                    tracing::warn!(%key, %error, "skipping compaction of a document that does not load");
                    continue;
                }
            };
            let key_bytes = key.to_bytes();
            let kind = document.body.kind();
            // Saving reads only, but it walks the whole document: a crafted change that applied
            // may still trip a panic in the CRDT library's encoder, and compaction must not take
            // the engine down with it (no such input is known; `write_with` met one on writes).
            let Ok(saved) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| document.body.save())) else {
                tracing::warn!(%key, "not compacting: saving the document panicked");
                self.metrics.compactions_refused.inc();
                self.put_back(key, document);
                continue;
            };
            // A save larger than a snapshot record could not travel to a new peer: the document
            // keeps its increments (each within the bound) instead.
            if saved.len() > SNAPSHOT_RECORD_BYTES_MAX {
                tracing::debug!(%key, bytes = saved.len(), "not compacting: the save would not fit a snapshot record");
                self.put_back(key, document);
                continue;
            }
            // Only a snapshot that loads back to the same state may replace the increments:
            // a crafted change can be accepted yet re-encode into a save that does not load
            // (found by fuzzing automerge 0.12 and yrs 0.28). Then the increments stay.
            if !self.snapshot_reloads(&key, &document.body, &saved) {
                tracing::warn!(%key, "not compacting: the document's snapshot does not load back to the same state");
                self.metrics.compactions_refused.inc();
                self.put_back(key, document);
                continue;
            }
            self.batch.put_document(&key_bytes, &encode_entry(kind, saved));
            self.dirty.insert(key.clone());
            for index in 0..document.next_increment {
                self.batch.remove_increment(&key_bytes, index);
            }
            self.metrics.compactions.inc();
            self.put_back(key, Document { body: document.body, next_increment: 0, stored: true });
        }
    }
}

impl Engine {
    /// Whether `saved` (a save of `body`) loads back to a document with the same digest and, for
    /// a text, the same reading: yrs 0.28 can integrate a text's save in another order than the
    /// updates it came from, reordering the text under the same digest (found by fuzzing).
    fn snapshot_reloads(&self, key: &RecordKey, body: &Body, saved: &[u8]) -> bool {
        match body {
            Body::Record(_) => Record::load(saved, &[])
                .is_ok_and(|record| Body::Record(Box::new(record)).digest(key) == body.digest(key)),
            Body::Map(record) => MapRecord::load(self.identity.origin.text_client_id(), saved, &[], &self.text_limits)
                .is_ok_and(|reloaded| {
                    reloaded.digest() == record.digest()
                        && reloaded.view().ok().map(|view| view.value) == record.view().ok().map(|view| view.value)
                }),
            Body::Text(text) => {
                let Ok(reloaded) =
                    TextDocument::load(self.identity.origin.text_client_id(), saved, &[], &self.text_limits)
                else {
                    return false;
                };
                let reading = text.reading();
                reloaded.digest() == text.digest() && reading.is_ok() && reloaded.reading() == reading
            }
        }
    }
}

/// Text documents: create, apply a Yjs update, state vector, diff, and plain text.
impl Engine {
    fn take_text(&mut self, key: &RecordKey) -> Result<Option<Document>, EngineError> {
        let Some(document) = self.take_document(key)? else { return Ok(None) };
        if !matches!(document.body, Body::Text(_)) {
            let actual = kind_name(document.body.kind());
            self.put_back(key.clone(), document);
            return Err(EngineError::WrongKind { key: key.clone(), actual, expected: "text" });
        }
        Ok(Some(document))
    }

    /// Creates an empty text document if none exists. Returns whether it was created. The
    /// creation is a change like any other (an empty Yjs update), so the text exists on every
    /// replica, and their record counts and digests agree before its first edit.
    pub fn create_text(&mut self, key: RecordKey) -> Result<bool, EngineError> {
        if let Some(document) = self.take_text(&key)? {
            self.put_back(key, document);
            return Ok(false);
        }
        let mut document = self.empty_document(DocumentKind::Text);
        let before = Before::of(&document, &key);
        let timestamp = self.clock.tick(physical_ms());
        let envelope = self.local_envelope(&key, DocumentKind::Text, timestamp, EMPTY_TEXT_UPDATE.to_vec());
        // Not a visible change: no feed event, here or where it is applied.
        self.stage_change(&mut document, &envelope, before, false);
        self.put_back(key, document);
        Ok(true)
    }

    /// Applies a Yjs update to a text document (creating it if absent). Returns whether it changed.
    pub fn apply_text_update(&mut self, key: RecordKey, update: Vec<u8>) -> Result<bool, EngineError> {
        let mut document = match self.take_text(&key)? {
            Some(document) => document,
            None => self.empty_document(DocumentKind::Text),
        };
        let before = Before::of(&document, &key);
        let Body::Text(text) = &mut document.body else { unreachable!("take_text returns texts only") };
        let result = text.apply_update(&update, &self.text_limits);
        if let Ok(true) = result {
            let timestamp = self.clock.tick(physical_ms());
            let envelope = self.local_envelope(&key, DocumentKind::Text, timestamp, update);
            self.stage_change(&mut document, &envelope, before, true);
        }
        if document.stored {
            self.put_back(key, document);
        }
        Ok(result?)
    }

    fn with_text<T>(
        &mut self,
        key: RecordKey,
        read: impl FnOnce(&TextDocument) -> T,
    ) -> Result<Option<T>, EngineError> {
        let Some(document) = self.take_text(&key)? else { return Ok(None) };
        let Body::Text(text) = &document.body else { unreachable!("take_text returns texts only") };
        let result = read(text);
        self.put_back(key, document);
        Ok(Some(result))
    }

    pub fn text_state_vector(&mut self, key: RecordKey) -> Result<Option<Vec<u8>>, EngineError> {
        self.with_text(key, TextDocument::state_vector)
    }

    pub fn text_diff(&mut self, key: RecordKey, state_vector: Vec<u8>) -> Result<Option<Vec<u8>>, EngineError> {
        self.with_text(key, |text| text.diff(&state_vector))?.transpose().map_err(EngineError::from)
    }

    pub fn text_plain(&mut self, key: RecordKey, name: String) -> Result<Option<String>, EngineError> {
        self.with_text(key, |text| text.text(&name))
    }
}

fn encode_entry(kind: DocumentKind, saved: Vec<u8>) -> Vec<u8> {
    rmp_serde::to_vec(&DocumentEntry { kind, saved, logged: None }).unwrap_or_default()
}

/// A document entry whose bytes are `envelope`'s change, kept in the change log.
fn encode_logged(kind: DocumentKind, envelope: &Envelope) -> Vec<u8> {
    let entry = DocumentEntry { kind, saved: Vec::new(), logged: Some((envelope.origin, envelope.sequence)) };
    rmp_serde::to_vec(&entry).unwrap_or_default()
}

fn xor_into(target: &mut [u8; 32], other: &[u8; 32]) {
    for (byte, other) in target.iter_mut().zip(other) {
        *byte ^= other;
    }
}
