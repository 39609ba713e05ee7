//! The HTTP API: records, texts, the change feed, the audit trail, status, health and metrics,
//! behind bearer-token auth and request-size limits. Handlers only translate between HTTP and
//! engine jobs (or, for the audit trail, reads of the store on a blocking thread).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Extension, FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use crdt::body::BodyError;
use crdt::json::{Conflict, JsonError};
use crdt::key::RecordKey;
use crdt::record::{Operation, OperationError, RecordView};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::watch;

mod audit;
mod connectors;

use audit::{audit_export, audit_tail, audit_verify};
use connectors::{add_connector, get_connector, list_connectors, pause_connector, remove_connector, resume_connector};

use crate::config::{Role, Token};
use crate::engine::{EngineError, EngineHandle, FEED_PAGE_MAX, FeedEvent};
use crate::metrics::{Gauges, Metrics};

/// Shared by every handler: one reference count to clone, which axum does for every request
/// (cloning the parts themselves cost a copy of the node's name and a count per part).
#[derive(Debug, Clone)]
pub struct AppState(Arc<AppParts>);

impl AppState {
    pub fn new(parts: AppParts) -> AppState {
        AppState(Arc::new(parts))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppParts;

    fn deref(&self) -> &AppParts {
        &self.0
    }
}

/// What the handlers use.
#[derive(Debug)]
pub struct AppParts {
    pub engine: EngineHandle,
    pub metrics: Arc<Metrics>,
    pub tokens: Arc<Vec<Token>>,
    /// Turns true when the node shuts down, so long-lived feeds end and shutdown can finish.
    pub shutdown: watch::Receiver<bool>,
    /// The peer endpoint, when the node replicates: its counters go to `/metrics`.
    pub transport: Option<transport::Endpoint>,
    /// The node's connectors (`/v1/connectors`).
    pub connectors: crate::connector::Connectors,
}

/// Builds the router. `body_bytes_max` bounds every request body (413 beyond it).
pub fn router(state: AppState, body_bytes_max: usize) -> Router {
    let records = "/v1/collections/{collection}/records";
    let texts = "/v1/collections/{collection}/texts";
    Router::new()
        .route(&format!("{records}/{{id}}"), get(get_record).put(put_record).patch(patch_record).delete(delete_record))
        .route(&format!("{records}/{{id}}/increment"), axum::routing::post(increment_record))
        .route("/v1/collections/{collection}/definition", get(get_definition).put(put_definition))
        .route(records, get(list_records))
        .route(&format!("{texts}/{{id}}"), get(get_text).put(create_text))
        .route(&format!("{texts}/{{id}}/update"), get(get_text_update).post(post_text_update))
        .route(&format!("{texts}/{{id}}/state-vector"), get(get_text_state_vector))
        .route("/v1/batch", axum::routing::post(batch))
        .route("/v1/quarantine", get(list_quarantine))
        .route("/v1/quarantine/{id}", get(get_quarantined).delete(drop_quarantined))
        .route("/v1/quarantine/{id}/retry", axum::routing::post(retry_quarantined))
        .route("/v1/conflicts", get(list_conflicts))
        .route("/v1/conflicts/resolve", axum::routing::post(resolve_conflict))
        .route("/v1/conflicts/{sequence}", get(get_conflict))
        .route("/v1/changes", get(changes))
        .route("/v1/audit", get(audit_tail))
        .route("/v1/audit/export", get(audit_export))
        .route("/v1/audit/verify", get(audit_verify))
        .route("/v1/connectors", get(list_connectors).post(add_connector))
        .route("/v1/connectors/{name}", get(get_connector).delete(remove_connector))
        .route("/v1/connectors/{name}/pause", axum::routing::post(pause_connector))
        .route("/v1/connectors/{name}/resume", axum::routing::post(resume_connector))
        .route("/v1/status", get(status))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(DefaultBodyLimit::max(body_bytes_max))
        .with_state(state)
}

/// An error answer: a status and one clear line, sent as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// More members for the JSON body (a schema violation's field and rule).
    detail: Option<Map<String, Value>>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), detail: None }
    }

    fn not_found(key: &RecordKey) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, format!("{key} does not exist"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = self.detail.unwrap_or_default();
        body.insert("error".into(), Value::String(self.message));
        (self.status, Json(Value::Object(body))).into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        let status = match &error {
            EngineError::Operation(error)
                if matches!(**error, OperationError::FieldName | OperationError::Json(JsonError::TooDeep)) =>
            {
                StatusCode::BAD_REQUEST
            }
            EngineError::Operation(error) if matches!(**error, OperationError::Damaged) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            EngineError::Operation(_) | EngineError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            EngineError::SystemCollection(_) | EngineError::BadRequest(_) => StatusCode::BAD_REQUEST,
            EngineError::Text(_) | EngineError::BadChange { .. } => StatusCode::BAD_REQUEST,
            EngineError::WrongKind { .. } => StatusCode::CONFLICT,
            EngineError::Stopped | EngineError::Storage(_) => StatusCode::SERVICE_UNAVAILABLE,
            EngineError::Corrupt { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            EngineError::FeedTrimmed { .. } => StatusCode::GONE,
        };
        let mut answer = ApiError::new(status, error.to_string());
        if let EngineError::Invalid(violation) = &error
            && let Ok(Value::Object(detail)) = serde_json::to_value(violation.as_ref())
        {
            answer.detail = Some(detail);
        }
        if let EngineError::FeedTrimmed { floor, .. } = error {
            answer.detail = Some(Map::from_iter([("floor".to_owned(), Value::from(floor))]));
        }
        answer
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Who a request acts for, in the audit trail: the bearer token's name, or
/// [`crate::engine::LOCAL_PRINCIPAL`] when the node has no tokens. [`authorize`] adds it to
/// every request it lets through.
#[derive(Debug, Clone)]
pub struct Principal(pub Arc<str>);

/// The role a request needs: reads need `read`, writes `write`, and the audit trail's export
/// and verification (a dump of who did what, and a scan of the whole log) and connectors (they
/// hold database credentials) `admin`.
fn required_role(method: &Method, path: &str) -> Role {
    if matches!(path, "/v1/audit/export" | "/v1/audit/verify") || path.starts_with("/v1/connectors") {
        Role::Admin
    } else if matches!(*method, Method::GET | Method::HEAD) {
        Role::Read
    } else {
        Role::Write
    }
}

/// Checks the bearer token (when tokens are configured), attaches the [`Principal`], and counts
/// the request and its outcome.
async fn authorize(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    state.metrics.requests.inc();
    let required = required_role(request.method(), request.uri().path());
    let response = match check_token(&state.tokens, request.headers(), required) {
        Ok(name) => {
            let name = name.unwrap_or(crate::engine::LOCAL_PRINCIPAL);
            request.extensions_mut().insert(Principal(Arc::from(name)));
            next.run(request).await
        }
        Err(error) => error.into_response(),
    };
    if response.status().is_client_error() {
        state.metrics.client_errors.inc();
    } else if response.status().is_server_error() {
        state.metrics.server_errors.inc();
    }
    response
}

/// The name of the token presented, `None` when the node has no tokens; an error when the
/// request may not pass.
fn check_token<'a>(tokens: &'a [Token], headers: &HeaderMap, required: Role) -> ApiResult<Option<&'a str>> {
    if tokens.is_empty() {
        return Ok(None);
    }
    let unauthorized = |message: &str| ApiError::new(StatusCode::UNAUTHORIZED, message);
    let presented = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing bearer token"))?
        .to_str()
        .ok()
        .and_then(|value| value.strip_prefix("Bearer "))
        .ok_or_else(|| unauthorized("authorization header is not 'Bearer TOKEN'"))?;
    let token = tokens
        .iter()
        .find(|token| constant_time_equal(token.secret.as_bytes(), presented.as_bytes()))
        .ok_or_else(|| unauthorized("invalid bearer token"))?;
    if token.role < required {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("token {:?} has role {:?}; this request needs {required:?}", token.name, token.role),
        ));
    }
    Ok(Some(&token.name))
}

fn constant_time_equal(left: &[u8], right: &[u8]) -> bool {
    left.len() == right.len() && left.iter().zip(right).fold(0u8, |difference, (a, b)| difference | (a ^ b)) == 0
}

/// A request body that must be a JSON object: 413 beyond the size limit, 400 with the parser's
/// message when it is not JSON, 400 when it is JSON but not an object (`crdt::body::object`).
struct JsonObject(Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(request, state).await?;
        crdt::body::object(&bytes).map(JsonObject).map_err(bad_body)
    }
}

fn bad_body(error: BodyError) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, error.to_string())
}

async fn body_bytes<S: Send + Sync>(request: Request, state: &S) -> ApiResult<Bytes> {
    Bytes::from_request(request, state)
        .await
        .map_err(|rejection| ApiError::new(rejection.status(), rejection.body_text()))
}

fn record_key(collection: &str, id: &str) -> ApiResult<RecordKey> {
    RecordKey::new(collection, id).map_err(|error| ApiError::new(StatusCode::BAD_REQUEST, error.to_string()))
}

/// A record as the API returns it.
#[derive(Debug, Serialize, Deserialize)]
pub struct RecordBody {
    pub collection: String,
    pub id: String,
    pub value: Option<Map<String, Value>>,
    pub version: String,
    pub conflicts: Vec<Conflict>,
}

impl RecordBody {
    fn new(key: &RecordKey, view: RecordView) -> RecordBody {
        RecordBody {
            collection: key.collection().to_owned(),
            id: key.id().to_owned(),
            value: view.value,
            version: view.version,
            conflicts: view.conflicts,
        }
    }
}

async fn get_record(
    State(state): State<AppState>,
    Path((collection, id)): Path<(String, String)>,
) -> ApiResult<Json<RecordBody>> {
    let key = record_key(&collection, &id)?;
    let read = state.engine.call({
        let key = key.clone();
        move |engine| engine.read_record(key)
    });
    match read.await?? {
        Some(read) => Ok(Json(RecordBody::new(&read.key, read.view))),
        None => Err(ApiError::not_found(&key)),
    }
}

/// Options every record write takes in its query string.
#[derive(Debug, Default, Deserialize)]
struct WriteQuery {
    /// Answer only once this many peers hold the change durably (default 0: local durability).
    #[serde(default)]
    acks: usize,
    /// How long to wait for `acks`, in milliseconds (default 5,000, at most 60,000).
    timeout_ms: Option<u64>,
}

const ACKS_TIMEOUT_MS_DEFAULT: u64 = 5_000;
const ACKS_TIMEOUT_MS_MAX: u64 = 60_000;

async fn write(
    state: &AppState,
    key: RecordKey,
    operation: Operation,
    query: WriteQuery,
    principal: Principal,
) -> ApiResult<Json<RecordBody>> {
    let started = Instant::now();
    let is_delete = operation == Operation::Delete;
    let outcome = state.engine.write(key.clone(), operation, principal.0).await?;
    state.metrics.write_latency.observe(started.elapsed());
    if is_delete && !outcome.changed {
        return Err(ApiError::not_found(&key));
    }
    if let (Some(envelope), true) = (&outcome.envelope, query.acks > 0) {
        await_acknowledgements(state, envelope.origin, envelope.sequence, &query).await?;
    }
    Ok(Json(RecordBody::new(&key, outcome.answer)))
}

/// `PUT /v1/collections/{c}/definition`: the body is a definition in JSON, or TOML (anything that
/// is not a JSON object). It is stored as a replicated record, so every node resolves with it
/// once they have synced. Answers the definition as stored (canonical JSON).
async fn put_definition(
    State(state): State<AppState>,
    Path(collection): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let text =
        std::str::from_utf8(&body).map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "definition is not UTF-8"))?;
    let definition = if text.trim_start().starts_with('{') {
        crdt::collection::Definition::from_json(text)
    } else {
        crdt::collection::Definition::from_toml(text)
    }
    .map_err(|error| ApiError::new(StatusCode::BAD_REQUEST, error.to_string()))?;
    let stored = definition.clone();
    let name = collection.clone();
    let outcome = state.engine.call(move |engine| engine.define_collection(&name, &stored)).await??;
    Ok(Json(serde_json::json!({
        "collection": collection,
        "definition": serde_json::from_str::<Value>(&definition.encode()).unwrap_or(Value::Null),
        "version": outcome.answer.version,
    })))
}

/// `GET /v1/collections/{c}/definition`: the definition in force on this node, 404 if none.
async fn get_definition(State(state): State<AppState>, Path(collection): Path<String>) -> ApiResult<Json<Value>> {
    let name = collection.clone();
    let definition = state.engine.call(move |engine| engine.definition(&name)).await??;
    let Some(definition) = definition else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("collection {collection:?} has no definition")));
    };
    Ok(Json(serde_json::json!({
        "collection": collection,
        "definition": serde_json::from_str::<Value>(&definition.encode()).unwrap_or(Value::Null),
    })))
}

#[derive(Debug, Deserialize)]
struct ConflictsQuery {
    collection: Option<String>,
    /// Entries after this ledger sequence (default 0: from the start).
    #[serde(default)]
    since: u64,
    limit: Option<usize>,
}

/// A ledger entry as the API shows it: the entry with its sequence.
fn conflict_json(sequence: u64, entry: &crdt::ledger::LedgerEntry) -> Value {
    let mut value = serde_json::to_value(entry).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut value {
        map.insert("sequence".into(), Value::from(sequence));
    }
    value
}

/// `GET /v1/conflicts?collection=&since=&limit=`: ledger entries in order; `next` continues.
async fn list_conflicts(State(state): State<AppState>, Query(query): Query<ConflictsQuery>) -> ApiResult<Json<Value>> {
    let limit = query.limit.unwrap_or(100);
    let (entries, next) = state
        .engine
        .call(move |engine| engine.conflicts_page(query.collection.as_deref(), query.since, limit))
        .await??;
    let conflicts: Vec<Value> = entries.iter().map(|(sequence, entry)| conflict_json(*sequence, entry)).collect();
    Ok(Json(serde_json::json!({ "conflicts": conflicts, "next": next })))
}

async fn get_conflict(State(state): State<AppState>, Path(sequence): Path<u64>) -> ApiResult<Json<Value>> {
    let entry = state.engine.call(move |engine| engine.conflict(sequence)).await??;
    match entry {
        Some(entry) => Ok(Json(conflict_json(sequence, &entry))),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, format!("no conflict {sequence} in the ledger"))),
    }
}

#[derive(Debug, Deserialize)]
struct Resolution {
    collection: String,
    id: String,
    field: String,
    value: Value,
}

/// The API token's name, or `local` when the node has no tokens.
fn principal(tokens: &[Token], headers: &HeaderMap) -> String {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    presented
        .and_then(|presented| {
            tokens.iter().find(|token| constant_time_equal(token.secret.as_bytes(), presented.as_bytes()))
        })
        .map_or_else(|| "local".to_owned(), |token| token.name.clone())
}

/// `POST /v1/conflicts/resolve {collection, id, field, value}`: writes `value` over the field's
/// concurrent values and marks this node's ledger entries for it resolved.
async fn resolve_conflict(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(resolution): Json<Resolution>,
) -> ApiResult<Json<RecordBody>> {
    let key = record_key(&resolution.collection, &resolution.id)?;
    let principal = principal(&state.tokens, &headers);
    let outcome = state
        .engine
        .call({
            let key = key.clone();
            move |engine| engine.resolve_conflict(key, &resolution.field, resolution.value, &principal)
        })
        .await??;
    Ok(Json(RecordBody::new(&key, outcome.answer)))
}

#[derive(Debug, Deserialize)]
struct QuarantineQuery {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

/// `GET /v1/quarantine?after=&limit=`: changes from peers that could not be applied.
async fn list_quarantine(
    State(state): State<AppState>,
    Query(query): Query<QuarantineQuery>,
) -> ApiResult<Json<Value>> {
    let limit = query.limit.unwrap_or(100);
    let (entries, size) = state
        .engine
        .call(move |engine| engine.quarantine_page(query.after, limit).map(|page| (page, engine.quarantine_size())))
        .await??;
    let entries: Vec<Value> = entries.iter().map(|(id, entry)| entry.summary(*id)).collect();
    Ok(Json(serde_json::json!({ "entries": entries, "size": size })))
}

fn not_quarantined(id: u64) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("nothing in quarantine with id {id}"))
}

async fn get_quarantined(State(state): State<AppState>, Path(id): Path<u64>) -> ApiResult<Json<Value>> {
    let entry = state.engine.call(move |engine| engine.quarantined(id)).await??;
    let entry = entry.ok_or_else(|| not_quarantined(id))?;
    let mut summary = entry.summary(id);
    if let (Value::Object(map), Ok(envelope)) = (&mut summary, crdt::envelope::Envelope::decode(&entry.envelope)) {
        map.insert("change_hex".into(), Value::String(hex::encode(&envelope.change)));
    }
    Ok(Json(summary))
}

/// `POST /v1/quarantine/{id}/retry`: applies the change again; 200 and `applied` when it went
/// in (the entry is gone), 422 with the new reason when it still does not apply.
async fn retry_quarantined(State(state): State<AppState>, Path(id): Path<u64>) -> ApiResult<Json<Value>> {
    // A record a connector could not write: its connector tries again.
    if let Some(entry) = state.engine.call(move |engine| engine.quarantined(id)).await??
        && let (Some(connector), Some((collection, record))) = (entry.connector, entry.record)
    {
        let retry = crate::connector::Retry { quarantine_id: id, collection, id: record };
        state.connectors.retry(&connector, retry).await?;
        return Ok(Json(serde_json::json!({ "id": id, "queued": true, "connector": connector })));
    }
    match state.engine.call(move |engine| engine.retry_quarantined(id)).await?? {
        None => Err(not_quarantined(id)),
        Some(Ok(changed)) => Ok(Json(serde_json::json!({ "id": id, "applied": true, "changed": changed }))),
        Some(Err(reason)) => {
            Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("still does not apply: {reason}")))
        }
    }
}

async fn drop_quarantined(State(state): State<AppState>, Path(id): Path<u64>) -> ApiResult<Json<Value>> {
    if state.engine.call(move |engine| engine.drop_quarantined(id)).await?? {
        Ok(Json(serde_json::json!({ "id": id, "dropped": true })))
    } else {
        Err(not_quarantined(id))
    }
}

/// One write's outcome in a batch answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct BatchResult {
    pub collection: String,
    pub id: String,
    /// The HTTP status the write would have had on its own.
    pub status: u16,
    /// The record's version after the write, when it was accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `POST /v1/batch`: up to [`crdt::body::BATCH_WRITES_MAX`] writes in one request and one
/// engine job, so they share one group commit (see `crdt::body::batch` for the format). Each
/// write succeeds or fails on its own, as it would alone; the answer lists every outcome in
/// order, and every accepted write is durable when it arrives. With `acks`, the answer waits
/// for the peers to hold every accepted write.
async fn batch(
    State(state): State<AppState>,
    Query(query): Query<WriteQuery>,
    Extension(principal): Extension<Principal>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let started = Instant::now();
    let writes = crdt::body::batch(&body).map_err(bad_body)?;
    let written: Vec<(RecordKey, bool)> =
        writes.iter().map(|(key, operation)| (key.clone(), *operation == Operation::Delete)).collect();
    let outcomes = state.engine.write_versions(writes, principal.0).await?;
    state.metrics.write_latency.observe(started.elapsed());
    let mut results = Vec::with_capacity(outcomes.len());
    let mut envelopes = Vec::new();
    for ((key, is_delete), outcome) in written.into_iter().zip(outcomes) {
        let (status, version, error) = match outcome {
            Ok(outcome) if is_delete && !outcome.changed => {
                (StatusCode::NOT_FOUND, None, Some(ApiError::not_found(&key).message))
            }
            Ok(outcome) => {
                if let Some(envelope) = &outcome.envelope {
                    envelopes.push((envelope.origin, envelope.sequence));
                }
                (StatusCode::OK, Some(outcome.answer), None)
            }
            Err(error) => {
                let error = ApiError::from(error);
                (error.status, None, Some(error.message))
            }
        };
        results.push(BatchResult {
            collection: key.collection().to_owned(),
            id: key.id().to_owned(),
            status: status.as_u16(),
            version,
            error,
        });
    }
    if query.acks > 0 {
        for (origin, sequence) in envelopes {
            await_acknowledgements(&state, origin, sequence, &query).await?;
        }
    }
    Ok(Json(serde_json::json!({ "results": results })))
}

/// Waits until `query.acks` peers hold the change durably; 504 with the count reached otherwise.
/// The write itself is durable here either way.
async fn await_acknowledgements(
    state: &AppState,
    origin: crdt::identity::OriginId,
    sequence: u64,
    query: &WriteQuery,
) -> ApiResult<()> {
    let needed = query.acks;
    let timeout =
        std::time::Duration::from_millis(query.timeout_ms.unwrap_or(ACKS_TIMEOUT_MS_DEFAULT).min(ACKS_TIMEOUT_MS_MAX));
    let receiver = state.engine.call(move |engine| engine.await_acknowledgements(origin, sequence, needed)).await?;
    if let Ok(Ok(_)) = tokio::time::timeout(timeout, receiver).await {
        return Ok(());
    }
    let reached = state.engine.call(move |engine| engine.acknowledgement_count(&origin, sequence)).await?;
    Err(ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        format!(
            "the write is durable here, but only {reached} of the {needed} peers asked for stored it within {} ms",
            timeout.as_millis()
        ),
    ))
}

async fn put_record(
    State(state): State<AppState>,
    Path((collection, id)): Path<(String, String)>,
    Query(query): Query<WriteQuery>,
    Extension(principal): Extension<Principal>,
    JsonObject(value): JsonObject,
) -> ApiResult<Json<RecordBody>> {
    write(&state, record_key(&collection, &id)?, Operation::Replace(value), query, principal).await
}

async fn patch_record(
    State(state): State<AppState>,
    Path((collection, id)): Path<(String, String)>,
    Query(query): Query<WriteQuery>,
    Extension(principal): Extension<Principal>,
    JsonObject(patch): JsonObject,
) -> ApiResult<Json<RecordBody>> {
    write(&state, record_key(&collection, &id)?, Operation::MergePatch(patch), query, principal).await
}

async fn delete_record(
    State(state): State<AppState>,
    Path((collection, id)): Path<(String, String)>,
    Query(query): Query<WriteQuery>,
    Extension(principal): Extension<Principal>,
) -> ApiResult<Json<RecordBody>> {
    write(&state, record_key(&collection, &id)?, Operation::Delete, query, principal).await
}

async fn increment_record(
    State(state): State<AppState>,
    Path((collection, id)): Path<(String, String)>,
    Query(query): Query<WriteQuery>,
    Extension(principal): Extension<Principal>,
    JsonObject(body): JsonObject,
) -> ApiResult<Json<RecordBody>> {
    let operation = crdt::body::increment(&body).map_err(bad_body)?;
    write(&state, record_key(&collection, &id)?, operation, query, principal).await
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    #[serde(default)]
    prefix: String,
    after: Option<String>,
    limit: Option<usize>,
}

/// A listing page as the API returns it.
#[derive(Debug, Serialize, Deserialize)]
pub struct ListBody {
    pub records: Vec<RecordBody>,
    /// Pass as `after` for the next page; absent at the end.
    pub next: Option<String>,
}

async fn list_records(
    State(state): State<AppState>,
    Path(collection): Path<String>,
    Query(query): Query<ListQuery>,
) -> ApiResult<Json<ListBody>> {
    crdt::key::validate_collection(&collection)
        .map_err(|error| ApiError::new(StatusCode::BAD_REQUEST, error.to_string()))?;
    let limit = query.limit.unwrap_or(100);
    let page = state
        .engine
        .call(move |engine| engine.list_records(&collection, &query.prefix, query.after.as_deref(), limit))
        .await??;
    let records = page.records.into_iter().map(|read| RecordBody::new(&read.key, read.view)).collect();
    Ok(Json(ListBody { records, next: page.next }))
}

#[derive(Debug, Deserialize)]
struct TextQuery {
    #[serde(default = "default_text_name")]
    name: String,
}

fn default_text_name() -> String {
    "content".to_owned()
}

async fn create_text(
    State(state): State<AppState>,
    Path((collection, id)): Path<(String, String)>,
    Extension(principal): Extension<Principal>,
) -> ApiResult<Response> {
    let key = record_key(&collection, &id)?;
    let created = state
        .engine
        .call(move |engine| engine.with_principal(&principal.0, |engine| engine.create_text(key)))
        .await??;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(serde_json::json!({ "collection": collection, "id": id, "created": created }))).into_response())
}

async fn get_text(
    State(state): State<AppState>,
    Path((collection, id)): Path<(String, String)>,
    Query(query): Query<TextQuery>,
) -> ApiResult<Json<Value>> {
    let key = record_key(&collection, &id)?;
    let name = query.name.clone();
    let text = state.engine.call({
        let key = key.clone();
        move |engine| engine.text_plain(key, name)
    });
    let text = text.await??.ok_or_else(|| ApiError::not_found(&key))?;
    Ok(Json(serde_json::json!({ "collection": collection, "id": id, "name": query.name, "text": text })))
}

async fn post_text_update(
    State(state): State<AppState>,
    Path((collection, id)): Path<(String, String)>,
    Extension(principal): Extension<Principal>,
    request: Request,
) -> ApiResult<Json<Value>> {
    let key = record_key(&collection, &id)?;
    let update = body_bytes(request, &()).await?.to_vec();
    let changed = state
        .engine
        .call(move |engine| engine.with_principal(&principal.0, |engine| engine.apply_text_update(key, update)))
        .await??;
    Ok(Json(serde_json::json!({ "changed": changed })))
}

#[derive(Debug, Deserialize)]
struct UpdateQuery {
    /// A base64url state vector; without it, the whole document.
    since: Option<String>,
}

async fn get_text_update(
    State(state): State<AppState>,
    Path((collection, id)): Path<(String, String)>,
    Query(query): Query<UpdateQuery>,
) -> ApiResult<Response> {
    let key = record_key(&collection, &id)?;
    let state_vector = match query.since {
        Some(text) => base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text.trim_end_matches('='))
            .map_err(|error| ApiError::new(StatusCode::BAD_REQUEST, format!("since is not base64url: {error}")))?,
        None => vec![0],
    };
    let update = state.engine.call({
        let key = key.clone();
        move |engine| engine.text_diff(key, state_vector)
    });
    let update = update.await??.ok_or_else(|| ApiError::not_found(&key))?;
    Ok(binary(update))
}

async fn get_text_state_vector(
    State(state): State<AppState>,
    Path((collection, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let key = record_key(&collection, &id)?;
    let vector = state.engine.call({
        let key = key.clone();
        move |engine| engine.text_state_vector(key)
    });
    Ok(binary(vector.await??.ok_or_else(|| ApiError::not_found(&key))?))
}

fn binary(bytes: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"))], bytes).into_response()
}

#[derive(Debug, Deserialize)]
struct ChangesQuery {
    since: Option<u64>,
}

/// The change feed: SSE by default (event id = feed sequence, so `Last-Event-ID` resumes), or
/// NDJSON with `Accept: application/x-ndjson`. Both carry events with sequence above `since`.
async fn changes(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<ChangesQuery>,
) -> ApiResult<Response> {
    let last_event_id = headers.get("last-event-id").and_then(|value| value.to_str().ok()).map(str::parse::<u64>);
    let since = match (query.since, last_event_id) {
        (Some(since), _) => since,
        (None, Some(Ok(since))) => since,
        (None, Some(Err(_))) => {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "Last-Event-ID is not a feed sequence"));
        }
        (None, None) => 0,
    };
    // The first page is read before the answer starts, so a `since` retention has passed gets
    // 410 rather than a stream that ends at once.
    let first = state.engine.call(move |engine| engine.feed_page(since, FEED_PAGE_MAX)).await??;
    let events = feed_stream(state, since, first);
    let wants_ndjson = headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|accept| accept.contains("application/x-ndjson"));
    if wants_ndjson {
        let lines = events.map(|event| {
            let mut line = serde_json::to_vec(&event).unwrap_or_default();
            line.push(b'\n');
            Ok::<_, Infallible>(Bytes::from(line))
        });
        let content_type = HeaderValue::from_static("application/x-ndjson");
        return Ok(([(header::CONTENT_TYPE, content_type)], Body::from_stream(lines)).into_response());
    }
    let events = events.map(|event| {
        Ok::<_, Infallible>(
            Event::default().id(event.sequence.to_string()).event("change").json_data(&event).unwrap_or_default(),
        )
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
}

/// Feed events after `since` (starting with `first`, the page read after it), then new ones as
/// they become durable, until shutdown or a page fails (such as one retention trimmed while the
/// consumer lagged). Holds at most one page in memory; the HTTP body pulls, so a slow consumer
/// slows only its own stream.
fn feed_stream(state: AppState, since: u64, first: Vec<FeedEvent>) -> impl Stream<Item = FeedEvent> {
    struct Cursor {
        state: AppState,
        after: u64,
        buffer: VecDeque<FeedEvent>,
    }
    let after = first.last().map_or(since, |event| event.sequence);
    let cursor = Cursor { state, after, buffer: VecDeque::from(first) };
    futures::stream::unfold(cursor, |mut cursor| async move {
        loop {
            if let Some(event) = cursor.buffer.pop_front() {
                return Some((event, cursor));
            }
            let after = cursor.after;
            let page = cursor.state.engine.call(move |engine| engine.feed_page(after, FEED_PAGE_MAX)).await;
            let events = match page {
                Ok(Ok(events)) => events,
                Ok(Err(error)) | Err(error) => {
                    tracing::warn!(%error, "ending a change feed");
                    return None;
                }
            };
            if let Some(last) = events.last() {
                cursor.after = last.sequence;
                cursor.buffer.extend(events);
                continue;
            }
            let mut feed = cursor.state.engine.feed.clone();
            let mut shutdown = cursor.state.shutdown.clone();
            tokio::select! {
                changed = feed.wait_for(|&latest| latest > after) => if changed.is_err() { return None },
                _ = shutdown.wait_for(|&stopping| stopping) => return None,
            }
        }
    })
}

async fn status(State(state): State<AppState>) -> ApiResult<Json<crate::engine::Status>> {
    Ok(Json(state.engine.call(|engine| engine.status()).await?))
}

async fn ready(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    state.engine.call(|_| ()).await?;
    Ok(Json(serde_json::json!({ "ready": true })))
}

async fn metrics(State(state): State<AppState>) -> ApiResult<Response> {
    let (gauges, peers) = state
        .engine
        .call(|engine| {
            let status = engine.status();
            let gauges = Gauges {
                quarantine_size: status.quarantined,
                store_bytes: engine.store().size_on_disk().unwrap_or(0),
                records: status.record_count,
                feed_sequence: status.feed_sequence,
            };
            (gauges, status.peers)
        })
        .await?;
    let mut text = state.metrics.render(&gauges);
    render_peer_metrics(&mut text, &peers, state.transport.as_ref());
    state.connectors.render_metrics(&mut text).await;
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"))], text).into_response())
}

/// A peer name as a Prometheus label value: quotes, backslashes and newlines become `_`.
fn metric_label(name: &str) -> String {
    name.replace(['"', '\\', '\n'], "_")
}

/// Lag per connected peer, and the transport's counters (connections, refusals by reason, bad
/// frames, bytes and frames on the wire).
fn render_peer_metrics(
    text: &mut String,
    peers: &[crate::replication::PeerStatus],
    transport: Option<&transport::Endpoint>,
) {
    use std::fmt::Write;
    let name = "concord_peer_lag_changes";
    let _ = writeln!(
        text,
        "# HELP {name} Changes one side holds that the other lacks, per connected peer.\n# TYPE {name} gauge"
    );
    for peer in peers {
        let label = metric_label(&peer.info.name);
        if let (Some(peer_lacks), Some(we_lack)) = (peer.peer_lacks, peer.we_lack) {
            let _ = writeln!(text, "{name}{{peer=\"{label}\",direction=\"peer_lacks\"}} {peer_lacks}");
            let _ = writeln!(text, "{name}{{peer=\"{label}\",direction=\"we_lack\"}} {we_lack}");
        }
    }
    type Field = fn(&crate::replication::PeerTraffic) -> u64;
    let traffic: [(&str, &str, Field); 5] = [
        ("concord_peer_changes_sent_total", "Changes sent to each peer.", |traffic| traffic.changes_sent),
        ("concord_peer_changes_received_total", "Changes received from each peer.", |traffic| traffic.changes_received),
        ("concord_peer_snapshot_records_sent_total", "Documents sent to each peer in snapshots.", |traffic| {
            traffic.snapshot_records_sent
        }),
        ("concord_peer_sent_bytes_total", "Message bytes sent to each peer.", |traffic| traffic.bytes_sent),
        ("concord_peer_received_bytes_total", "Message bytes received from each peer.", |traffic| {
            traffic.bytes_received
        }),
    ];
    for (name, help, value) in traffic {
        let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} counter");
        for peer in peers {
            let label = metric_label(&peer.info.name);
            let _ = writeln!(text, "{name}{{peer=\"{label}\"}} {}", value(&peer.traffic));
        }
    }
    let connected = peers.iter().filter(|peer| peer.connected).count();
    let _ =
        writeln!(text, "# HELP concord_peers Connected peers.\n# TYPE concord_peers gauge\nconcord_peers {connected}");
    if let Some(endpoint) = transport {
        for (field, value) in endpoint.counters().fields() {
            let name = format!("concord_transport_{field}_total");
            let _ = writeln!(text, "# HELP {name} Transport counter {field}.\n# TYPE {name} counter\n{name} {value}");
        }
    }
}
