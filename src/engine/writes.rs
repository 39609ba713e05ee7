//! Local record writes, and rounds of them whose CRDT work runs on several cores.
//!
//! A write has three steps:
//! 1. **prepare**, on the engine thread: take the document out of the cache (or load it), look up
//!    the collection's definition, and tick the clock;
//! 2. **work**, anywhere: the schema check, the fields the write touches (for the audit entry),
//!    automerge's or yrs's transaction, and reading the record back with its policies applied for
//!    the answer. This is pure work on a document the write owns, and it was about 70% of the
//!    engine thread's time per write (BENCHMARKS.md, session 11);
//! 3. **finish**, on the engine thread, in the order the writes arrived: the next sequence of
//!    this node's origin, staging in the group commit's batch, the audit entry, and the document
//!    back into the cache.
//!
//! API writes arrive as [`WriteRequest`]s and queue in a [`Round`]. The engine runs a round
//! before any other job and before every commit, so every job still sees the effects of the jobs
//! before it. A round keeps one lane per key: the lane owns the key's document and works its
//! writes in arrival order, so lanes are independent and spread over the engine's workers. A
//! write whose outcome depends on an earlier one in its lane (a schema check, the fields it
//! touches, the digest it replaces) sees that write's result, because the lane works them in
//! order. Everything that is the node's state (sequence, clock, store batch, audit chain,
//! counters) stays on the engine thread, and the writes are staged in arrival order across
//! lanes, so a round stores exactly what the same writes one at a time would.

use std::collections::HashMap;
use std::sync::Arc;

use crdt::clock::Timestamp;
use crdt::collection::Definition;
use crdt::identity::OriginId;
use crdt::key::RecordKey;
use crdt::record::{Operation, OperationError, RecordView, WriteOptions};
use crdt::text::TextLimits;

use super::audit::{Attribution, bounded_name, fields_touched};
use super::collections::{check_schema, resolve_view, whole_fields};
use super::{
    After, Before, Body, Completion, Document, Engine, EngineError, WriteOutcome, is_system_collection, physical_ms,
};

/// A round spreads its work over helper threads only when it holds at least this much work,
/// counted in automerge writes: starting a helper costs tens of microseconds, an automerge write
/// 30 (a creation) to 100, and a yrs write about 20 (BENCHMARKS.md, session 13).
const HELPERS_FROM_WRITES: usize = 8;
/// How many yrs writes count as one automerge write's work when a round decides on helpers.
const YRS_WRITES_PER_AUTOMERGE_WRITE: usize = 4;

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
    /// Every queued write, in arrival order.
    queued: Vec<Queued>,
    /// The keys queued, in order of their first write: one lane each.
    keys: Vec<RecordKey>,
    lanes: HashMap<RecordKey, usize>,
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
    lane: usize,
    operation: Operation,
}

/// The writes of a round to one key, and the document they own while the round runs.
struct Lane {
    key: RecordKey,
    document: Document,
    /// Whether the record existed before the round (else `document` is new and empty).
    existed: bool,
    definition: Option<Arc<Definition>>,
    /// The lane's writes in arrival order.
    steps: Vec<Step>,
}

struct Step {
    operation: Operation,
    timestamp: Timestamp,
    answer: AnswerKind,
    worked: Option<Result<Done, EngineError>>,
}

/// What the work step found for a write that was made.
struct Done {
    /// The change's bytes; `None` when the write changed nothing.
    change: Option<Vec<u8>>,
    answer: Answer,
    fields: Vec<String>,
    before: Before,
    after: After,
}

/// What the work step needs of the engine: read-only, shared by the workers.
struct Context<'engine> {
    origin: &'engine OriginId,
    name: &'engine str,
    text_limits: &'engine TextLimits,
}

impl Engine {
    fn work_context(&self) -> Context<'_> {
        Context { origin: &self.identity.origin, name: &self.identity.name, text_limits: &self.text_limits }
    }

    /// Queues the writes of `request` for the next round, each in the lane of its key.
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
            let round = &mut self.round;
            let lane = *round.lanes.entry(key).or_insert_with_key(|key| {
                round.keys.push(key.clone());
                round.keys.len() - 1
            });
            round.queued.push(Queued { request: index, position, lane, operation });
        }
    }

    /// Runs the queued writes: prepares each lane and ticks the clock for each write in arrival
    /// order, works the lanes on the engine's workers, and finishes each write in arrival order.
    /// A request whose writes are all done gets its reply queued in `completions`, released
    /// after the commit.
    pub(super) fn run_round(&mut self, completions: &mut Vec<Completion>) {
        let queued = std::mem::take(&mut self.round.queued);
        let keys = std::mem::take(&mut self.round.keys);
        self.round.lanes.clear();
        let mut lanes: Vec<Result<Lane, EngineError>> = keys.into_iter().map(|key| self.prepare_lane(key)).collect();
        let mut order = Vec::with_capacity(queued.len());
        for Queued { request, position, lane, operation } in queued {
            if let Ok(lane) = &mut lanes[lane] {
                let answer = self.round.requests[request].answer;
                let timestamp = self.clock.tick(physical_ms());
                lane.steps.push(Step { operation, timestamp, answer, worked: None });
            }
            order.push((request, position, lane));
        }
        let mut ready: Vec<&mut Lane> = lanes.iter_mut().filter_map(|lane| lane.as_mut().ok()).collect();
        let on_helpers = work_all(&mut ready, self.workers, &self.work_context());
        self.metrics.write_rounds.inc();
        self.metrics.write_round_writes.add(order.len() as u64);
        self.metrics.write_lanes_on_helpers.add(on_helpers);
        let mut finished = vec![0; lanes.len()];
        for (request, position, lane) in order {
            let outcome = match &mut lanes[lane] {
                Err(error) => Err(error.duplicate()),
                Ok(Lane { key, document, steps, .. }) => {
                    let step = &mut steps[finished[lane]];
                    finished[lane] += 1;
                    let principal = self.round.requests[request].principal.clone();
                    self.finish_step(key, document, step, Some(&principal))
                }
            };
            self.settle(request, position, outcome, completions);
        }
        for lane in lanes.into_iter().flatten() {
            if lane.document.stored {
                self.put_back(lane.key, lane.document);
            }
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
        let mut lane = self.prepare_lane_of(key)?;
        let timestamp = self.clock.tick(physical_ms());
        lane.steps.push(Step { operation, timestamp, answer, worked: None });
        work_lane(&mut lane, &self.work_context());
        let Lane { key, mut document, mut steps, .. } = lane;
        let outcome = match steps.first_mut() {
            Some(step) => self.finish_step(&key, &mut document, step, principal),
            None => Err(EngineError::BadRequest("a write without its step".into())),
        };
        if document.stored {
            self.put_back(key, document);
        }
        outcome
    }

    /// The first step of a lane, on the engine thread: the key's document and definition. On an
    /// error the document is back in the cache.
    fn prepare_lane(&mut self, key: RecordKey) -> Result<Lane, EngineError> {
        if is_system_collection(key.collection()) {
            return Err(EngineError::SystemCollection(key.collection().to_owned()));
        }
        self.prepare_lane_of(key)
    }

    /// [`Engine::prepare_lane`] without the system-collection check.
    fn prepare_lane_of(&mut self, key: RecordKey) -> Result<Lane, EngineError> {
        let definition = self.definition(key.collection())?;
        let found = self.take_document(&key)?;
        let existed = found.is_some();
        let document = match found {
            Some(document) => document,
            None => self.empty_document(self.record_kind(&key)),
        };
        Ok(Lane { key, document, existed, definition, steps: Vec::new() })
    }

    /// The last step of a write, on the engine thread: the envelope and the staging of its
    /// change, attributed to `principal` when given.
    fn finish_step(
        &mut self,
        key: &RecordKey,
        document: &mut Document,
        step: &mut Step,
        principal: Option<&str>,
    ) -> Result<WriteOutcome<Answer>, EngineError> {
        let done = step
            .worked
            .take()
            .unwrap_or_else(|| Err(EngineError::BadRequest("a write finished before its work".into())))?;
        let Done { change, answer, fields, before, after } = done;
        let Some(change) = change else { return Ok(WriteOutcome { changed: false, answer, envelope: None }) };
        let envelope = self.local_envelope(key, document.body.kind(), step.timestamp, change);
        let previous = principal.map(|principal| {
            let attribution = Attribution::Local { principal: bounded_name(principal), fields: Some(fields) };
            self.audit.attribution.replace(attribution)
        });
        self.stage_bytes(document, key, envelope.kind, &envelope.change, Some(&envelope));
        self.stage_logged(&envelope, before, after, true);
        if let Some(previous) = previous {
            self.audit.attribution = previous;
        }
        Ok(WriteOutcome { changed: true, answer, envelope: Some(envelope) })
    }
}

/// The work step of every lane, on the engine thread and, for a round with enough automerge
/// writes, up to `workers - 1` helpers. Each thread takes the next lane nobody has taken, so a
/// helper that the machine schedules late (the other core is often busy with HTTP and the
/// peers) only does less: the engine thread never waits for a lane nobody has started. Each lane
/// owns its document, so the threads share only `context`. Returns how many lanes helpers
/// worked.
fn work_all(lanes: &mut [&mut Lane], workers: usize, context: &Context<'_>) -> u64 {
    let (automerge, yrs) = lanes.iter().fold((0, 0), |(automerge, yrs), lane| match lane.document.body {
        Body::Record(_) => (automerge + lane.steps.len(), yrs),
        _ => (automerge, yrs + lane.steps.len()),
    });
    let work = automerge + yrs / YRS_WRITES_PER_AUTOMERGE_WRITE;
    let helpers = if work >= HELPERS_FROM_WRITES { workers.saturating_sub(1).min(lanes.len() - 1) } else { 0 };
    if helpers == 0 {
        lanes.iter_mut().for_each(|lane| work_lane(lane, context));
        return 0;
    }
    let queue = std::sync::Mutex::new(lanes.iter_mut());
    let next = || queue.lock().ok().and_then(|mut queue| queue.next());
    let drain = || {
        let mut worked = 0;
        while let Some(lane) = next() {
            work_lane(lane, context);
            worked += 1;
        }
        worked
    };
    std::thread::scope(|scope| {
        let helpers: Vec<_> = (0..helpers).map(|_| scope.spawn(drain)).collect();
        drain();
        // A helper that panicked has already failed the scope; it counts nothing here.
        helpers.into_iter().filter_map(|helper| helper.join().ok()).sum()
    })
}

/// The work step of a lane's writes, in order: pure work on the document the lane owns.
fn work_lane(lane: &mut Lane, context: &Context<'_>) {
    let Lane { key, document, existed, definition, steps } = lane;
    let definition = definition.as_deref();
    let whole_fields = whole_fields(definition);
    // Whether the node's record count and digest hold the document: once stored, or once an
    // earlier write of the lane changed it (that write's finish stores it).
    let mut counted = document.stored;
    let mut exists = *existed;
    for step in steps {
        let done = (|| {
            check_schema(key, document, definition, &step.operation)?;
            let fields = fields_touched(exists.then_some(&*document), key, &step.operation);
            let before = Before::counted(document, key, counted);
            let change = match &mut document.body {
                Body::Record(record) => {
                    let options = WriteOptions { writer: Some(context.name), whole_fields: &whole_fields };
                    record.write_with(key, context.origin, options, step.timestamp, &step.operation)?
                }
                Body::Map(record) => {
                    record.write(&step.operation, context.text_limits).map_err(OperationError::from)?
                }
                Body::Text(_) => {
                    return Err(EngineError::WrongKind { key: key.clone(), actual: "text", expected: "record" });
                }
            };
            if change.is_some() {
                counted = true;
                exists = true;
            }
            let answer = match (step.answer, &document.body) {
                (AnswerKind::Version, Body::Record(record)) => Answer::Version(record.version()),
                (AnswerKind::Version, Body::Map(record)) => Answer::Version(record.version()),
                (AnswerKind::Version, body) => Answer::Version(body.view(key)?.version),
                (AnswerKind::View, body) => Answer::View(resolve_view(key, document, definition, body.view(key)?)?),
            };
            Ok(Done { change, answer, fields, before, after: After::of(document, key) })
        })();
        step.worked = Some(done);
    }
}
