//! Local record writes, and rounds of them whose CRDT work runs on several cores.
//!
//! A write has three steps:
//! 1. **prepare**, on the engine thread: take the document out of the cache (or load it), check
//!    the collection's schema, and tick the clock;
//! 2. **work**, anywhere: the fields the write touches (for the audit entry), automerge's or yrs's
//!    transaction, and reading the record back for the answer. This is pure work on a document
//!    the write owns, and it was about 70% of the engine thread's time per write (BENCHMARKS.md,
//!    session 11);
//! 3. **finish**, on the engine thread, in the order the writes arrived: policies on the answer,
//!    the next sequence of this node's origin, staging in the group commit's batch, the audit
//!    entry, and the document back into the cache.
//!
//! API writes arrive as [`WriteRequest`]s and queue in a [`Round`]. The engine runs a round
//! before any other job and before every commit, so every job still sees the effects of the jobs
//! before it. A round holds each key at most once (a second write to a key runs the round
//! first), so its documents are independent and their work spreads over the engine's workers.
//! Everything that is the node's state (sequence, clock, store batch, audit chain, counters)
//! stays on the engine thread, and a round's results are staged in arrival order, so a round
//! stores exactly what the same writes one at a time would.

use std::collections::HashSet;
use std::sync::Arc;

use crdt::clock::Timestamp;
use crdt::identity::OriginId;
use crdt::key::RecordKey;
use crdt::record::{Operation, OperationError, RecordView, WriteOptions};
use crdt::text::TextLimits;

use super::audit::{Attribution, bounded_name, fields_touched};
use super::{Before, Body, Completion, Document, Engine, EngineError, WriteOutcome, is_system_collection, physical_ms};

/// What a write answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AnswerKind {
    /// The record as reads return it, its policies applied.
    View,
    /// Only its version: a batch's answer, which saves reading the record back.
    Version,
}

/// A write's answer, of the kind asked for.
#[derive(Debug, Clone)]
pub(crate) enum Answer {
    View(RecordView),
    Version(String),
}

impl Answer {
    /// The record's version, which either kind has.
    pub(crate) fn into_version(self) -> String {
        match self {
            Answer::View(view) => view.version,
            Answer::Version(version) => version,
        }
    }

    /// The record; an error for an answer that holds only the version (asked for as
    /// [`AnswerKind::Version`], so never by a caller that wants the record).
    pub(crate) fn into_view(self) -> Result<RecordView, EngineError> {
        match self {
            Answer::View(view) => Ok(view),
            Answer::Version(_) => Err(EngineError::BadRequest("a version-only write answer has no record".into())),
        }
    }
}

/// How a finished request hands its outcomes back: one per write, in order.
pub(crate) type WriteReply = Box<dyn FnOnce(Vec<Result<WriteOutcome<Answer>, EngineError>>) + Send>;

/// Local writes on behalf of one principal, answered together once their group commit is
/// durable (an API write is one, a batch many).
pub(crate) struct WriteRequest {
    pub writes: Vec<(RecordKey, Operation)>,
    pub principal: Arc<str>,
    pub answer: AnswerKind,
    pub reply: WriteReply,
}

/// The writes queued for the next round, and the requests they belong to.
#[derive(Default)]
pub(crate) struct Round {
    requests: Vec<PendingRequest>,
    queued: Vec<Queued>,
    keys: HashSet<RecordKey>,
}

impl Round {
    pub(crate) fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }
}

struct PendingRequest {
    principal: Arc<str>,
    answer: AnswerKind,
    outcomes: Vec<Option<Result<WriteOutcome<Answer>, EngineError>>>,
    waiting: usize,
    reply: Option<WriteReply>,
}

struct Queued {
    request: usize,
    position: usize,
    key: RecordKey,
    operation: Operation,
}

/// A write between its steps: the document it owns and what each step found.
struct Write {
    key: RecordKey,
    operation: Operation,
    document: Document,
    /// Whether the record existed before (else `document` is new and empty).
    existed: bool,
    whole_fields: Vec<String>,
    timestamp: Timestamp,
    answer: AnswerKind,
    worked: Option<Worked>,
}

/// What the work step found.
struct Worked {
    fields: Vec<String>,
    before: Before,
    /// The change's bytes (`None`: the write changed nothing) and the answer before policies.
    result: Result<(Option<Vec<u8>>, Answer), EngineError>,
}

/// What the work step needs of the engine: read-only, shared by the workers.
struct Context<'engine> {
    origin: &'engine OriginId,
    name: &'engine str,
    text_limits: &'engine TextLimits,
}

impl Engine {
    /// Queues the writes of `request` for the next round. A key already queued runs the round
    /// first, so a round holds each key once and a request's writes to one key apply in order.
    pub(super) fn queue_writes(&mut self, request: WriteRequest, completions: &mut Vec<Completion>) {
        let index = self.round.requests.len();
        let count = request.writes.len();
        self.round.requests.push(PendingRequest {
            principal: request.principal,
            answer: request.answer,
            outcomes: (0..count).map(|_| None).collect(),
            waiting: count,
            reply: Some(request.reply),
        });
        if count == 0 {
            self.answer_request(index, completions);
        }
        for (position, (key, operation)) in request.writes.into_iter().enumerate() {
            if self.round.keys.contains(&key) {
                self.run_round(completions);
            }
            self.round.keys.insert(key.clone());
            self.round.queued.push(Queued { request: index, position, key, operation });
        }
    }

    /// Runs the queued writes: prepares each in order, works them on the engine's workers, and
    /// finishes each in order. A request whose writes are all done gets its reply queued in
    /// `completions`, released after the commit.
    pub(super) fn run_round(&mut self, completions: &mut Vec<Completion>) {
        let queued = std::mem::take(&mut self.round.queued);
        self.round.keys.clear();
        let mut writes = Vec::with_capacity(queued.len());
        for Queued { request, position, key, operation } in queued {
            let answer = self.round.requests[request].answer;
            let prepared = if is_system_collection(key.collection()) {
                Err(EngineError::SystemCollection(key.collection().to_owned()))
            } else {
                self.prepare_write(key, operation, answer)
            };
            match prepared {
                Ok(write) => writes.push((request, position, write)),
                Err(error) => self.settle(request, position, Err(error), completions),
            }
        }
        let context =
            Context { origin: &self.identity.origin, name: &self.identity.name, text_limits: &self.text_limits };
        work_all(&mut writes, self.workers, &context);
        for (request, position, write) in writes {
            let principal = self.round.requests[request].principal.clone();
            let outcome = self.finish_write(write, Some(&principal));
            self.settle(request, position, outcome, completions);
        }
        if self.round.requests.iter().all(|request| request.reply.is_none()) {
            self.round.requests.clear();
        }
    }

    fn settle(
        &mut self,
        request: usize,
        position: usize,
        outcome: Result<WriteOutcome<Answer>, EngineError>,
        completions: &mut Vec<Completion>,
    ) {
        let pending = &mut self.round.requests[request];
        pending.outcomes[position] = Some(outcome);
        pending.waiting -= 1;
        if pending.waiting == 0 {
            self.answer_request(request, completions);
        }
    }

    fn answer_request(&mut self, request: usize, completions: &mut Vec<Completion>) {
        let pending = &mut self.round.requests[request];
        let Some(reply) = pending.reply.take() else { return };
        let outcomes: Vec<_> = std::mem::take(&mut pending.outcomes).into_iter().flatten().collect();
        completions.push(Box::new(move || reply(outcomes)));
    }

    /// One local write, all three steps at once (for writes the engine makes inside other jobs:
    /// definitions, conflict resolutions, the connector). With a `principal`, the audit entry
    /// names it and the fields the write touched; without, the attribution in force applies.
    pub(super) fn write_now(
        &mut self,
        key: RecordKey,
        operation: Operation,
        principal: Option<&str>,
        answer: AnswerKind,
    ) -> Result<WriteOutcome<Answer>, EngineError> {
        let mut write = self.prepare_write(key, operation, answer)?;
        let context =
            Context { origin: &self.identity.origin, name: &self.identity.name, text_limits: &self.text_limits };
        work(&mut write, &context);
        self.finish_write(write, principal)
    }

    /// The first step, on the engine thread. On an error the document is back in the cache.
    fn prepare_write(
        &mut self,
        key: RecordKey,
        operation: Operation,
        answer: AnswerKind,
    ) -> Result<Write, EngineError> {
        let found = self.take_document(&key)?;
        let existed = found.is_some();
        let document = match found {
            Some(document) => document,
            None => self.empty_document(self.record_kind(&key)),
        };
        let checked = self.check_schema(&key, &document, &operation).and_then(|()| self.whole_fields(key.collection()));
        let whole_fields = match checked {
            Ok(whole_fields) => whole_fields,
            Err(error) => {
                if document.stored {
                    self.put_back(key, document);
                }
                return Err(error);
            }
        };
        let timestamp = self.clock.tick(physical_ms());
        Ok(Write { key, operation, document, existed, whole_fields, timestamp, answer, worked: None })
    }

    /// The last step, on the engine thread: policies on the answer, then the envelope and the
    /// staging of a change. The document goes back into the cache either way.
    fn finish_write(&mut self, write: Write, principal: Option<&str>) -> Result<WriteOutcome<Answer>, EngineError> {
        let Write { key, mut document, worked, timestamp, .. } = write;
        let outcome = match worked {
            Some(worked) => self.stage_write(&key, &mut document, timestamp, worked, principal),
            None => Err(EngineError::BadRequest("a write finished before its work".into())),
        };
        if document.stored {
            self.put_back(key, document);
        }
        outcome
    }

    fn stage_write(
        &mut self,
        key: &RecordKey,
        document: &mut Document,
        timestamp: Timestamp,
        worked: Worked,
        principal: Option<&str>,
    ) -> Result<WriteOutcome<Answer>, EngineError> {
        let (change, answer) = worked.result?;
        let answer = match answer {
            Answer::View(view) => Answer::View(self.resolved_view(key, document, view)?),
            version => version,
        };
        let Some(change) = change else { return Ok(WriteOutcome { changed: false, answer, envelope: None }) };
        let envelope = self.local_envelope(key, document.body.kind(), timestamp, change);
        let previous = principal.map(|principal| {
            let attribution = Attribution::Local { principal: bounded_name(principal), fields: Some(worked.fields) };
            self.audit.attribution.replace(attribution)
        });
        self.stage_change(document, &envelope, worked.before, true);
        if let Some(previous) = previous {
            self.audit.attribution = previous;
        }
        Ok(WriteOutcome { changed: true, answer, envelope: Some(envelope) })
    }
}

/// The work step of every write in `writes`, spread over up to `workers` threads (the engine
/// thread is one of them). Each write owns its document, so the threads share only `context`.
fn work_all(writes: &mut [(usize, usize, Write)], workers: usize, context: &Context<'_>) {
    let workers = workers.clamp(1, writes.len().max(1));
    if workers == 1 {
        writes.iter_mut().for_each(|(_, _, write)| work(write, context));
        return;
    }
    let share = writes.len().div_ceil(workers);
    std::thread::scope(|scope| {
        let mut shares = writes.chunks_mut(share);
        let own = shares.next();
        for share in shares {
            scope.spawn(move || share.iter_mut().for_each(|(_, _, write)| work(write, context)));
        }
        if let Some(own) = own {
            own.iter_mut().for_each(|(_, _, write)| work(write, context));
        }
    });
}

/// The work step: pure work on the document the write owns.
fn work(write: &mut Write, context: &Context<'_>) {
    let Write { key, operation, document, existed, whole_fields, timestamp, answer, .. } = write;
    let fields = fields_touched(existed.then_some(&*document), key, operation);
    let before = Before::of(document, key);
    let change = match &mut document.body {
        Body::Record(record) => {
            let options = WriteOptions { writer: Some(context.name), whole_fields };
            record.write_with(key, context.origin, options, *timestamp, operation).map_err(EngineError::from)
        }
        Body::Map(record) => {
            record.write(operation, context.text_limits).map_err(|error| OperationError::from(error).into())
        }
        Body::Text(_) => Err(EngineError::WrongKind { key: key.clone(), actual: "text", expected: "record" }),
    };
    let result = change.and_then(|change| {
        let answer = match (answer, &document.body) {
            (AnswerKind::Version, Body::Record(record)) => Answer::Version(record.version()),
            (AnswerKind::Version, body) => Answer::Version(body.view(key)?.version),
            (AnswerKind::View, body) => Answer::View(body.view(key)?),
        };
        Ok((change, answer))
    });
    write.worked = Some(Worked { fields, before, result });
}
