//! The audit trail over HTTP: a page of entries (`GET /v1/audit`), the JSON-lines export
//! (`GET /v1/audit/export`) and verification on the node (`GET /v1/audit/verify`). The log is
//! read from the store on a blocking thread, a page at a time, not through the engine's job
//! queue, so a long export or verification does not hold up writes. Not the entries' format or
//! checks (`crdt::audit`), nor how entries are made (`engine::audit`).

use std::collections::VecDeque;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use crdt::audit::{Anchor, AuditEntry};
use serde::Deserialize;
use serde_json::{Value, json};
use store::Store;

use super::{ApiError, ApiResult, AppState};
use crate::engine::{self, AUDIT_PAGE_MAX, AuditPage, EngineError};

/// How many entries `GET /v1/audit` returns when the request does not say.
const TAIL_LIMIT_DEFAULT: usize = 100;

#[derive(Debug, Deserialize)]
pub(super) struct TailQuery {
    /// Entries with a sequence above this (default 0: from the start of what is kept).
    #[serde(default)]
    after: u64,
    /// At most this many (default 100, at most 1,000; 0 gives only the anchor and head).
    limit: Option<usize>,
}

/// `GET /v1/audit?after=SEQ&limit=N`: entries after `after`, oldest first, with the log's
/// anchor and head (`engine::AuditPage`).
pub(super) async fn audit_tail(
    State(state): State<AppState>,
    Query(query): Query<TailQuery>,
) -> ApiResult<Json<AuditPage>> {
    let limit = query.limit.unwrap_or(TAIL_LIMIT_DEFAULT).min(AUDIT_PAGE_MAX);
    let store = store_of(&state).await?;
    let page = blocking(move || engine::audit_page(&store, query.after, limit)).await?;
    Ok(Json(page))
}

#[derive(Debug, Deserialize)]
pub(super) struct VerifyQuery {
    /// A head kept elsewhere, `SEQUENCE:HASH`: the log must still hold that entry, unchanged.
    head: Option<String>,
}

/// `GET /v1/audit/verify[?head=SEQ:HASH]`: verifies the log on the node. Answers 200 either
/// way: `{"ok": true, "entries", "anchor", "head"}` for an intact log, or `{"ok": false,
/// "tamper": {"sequence", "kind"}, "error", "anchor"}` with the first problem.
pub(super) async fn audit_verify(
    State(state): State<AppState>,
    Query(query): Query<VerifyQuery>,
) -> ApiResult<Json<Value>> {
    let head = query
        .head
        .as_deref()
        .map(engine::parse_head)
        .transpose()
        .map_err(|problem| ApiError::new(StatusCode::BAD_REQUEST, format!("head: {problem}")))?;
    let store = store_of(&state).await?;
    let check = blocking(move || engine::verify_store(&store, head)).await?;
    let body = match check.outcome {
        Ok(verified) => {
            json!({ "ok": true, "entries": verified.entries, "anchor": check.anchor, "head": verified.head })
        }
        Err(tamper) => json!({ "ok": false, "tamper": tamper, "error": tamper.to_string(), "anchor": check.anchor }),
    };
    Ok(Json(body))
}

/// `GET /v1/audit/export`: JSON lines, the anchor line first when the log was trimmed, then
/// every entry through the newest one when the export began, read a page at a time (memory
/// stays bounded whatever the log's length). A stored entry that does not decode is left out
/// (verifying the export then reports it removed). If retention trims entries not yet sent,
/// the body ends with an error rather than with a gap: export again.
pub(super) async fn audit_export(State(state): State<AppState>) -> ApiResult<Response> {
    let store = store_of(&state).await?;
    let (anchor, end) = {
        let store = store.clone();
        blocking(move || {
            let anchor = engine::stored_anchor(&store)?;
            let end = store.audit_last()?.map_or(anchor.sequence, |(sequence, _)| sequence);
            Ok((anchor, end))
        })
        .await?
    };
    let mut first = Vec::new();
    if anchor != Anchor::GENESIS {
        first.push(Bytes::from(format!("{}\n", anchor.to_json_line())));
    }
    let cursor = ExportCursor { store, after: anchor.sequence, end, pending: first.into(), finished: false };
    let lines = futures::stream::unfold(cursor, |mut cursor| async move {
        let item = cursor.next_chunk().await?;
        Some((item, cursor))
    });
    let content_type = HeaderValue::from_static("application/x-ndjson");
    Ok(([(header::CONTENT_TYPE, content_type)], Body::from_stream(lines)).into_response())
}

/// Where an export stands: the last sequence sent and the last to send.
struct ExportCursor {
    store: Store,
    after: u64,
    end: u64,
    pending: VecDeque<Bytes>,
    finished: bool,
}

impl ExportCursor {
    /// The next chunk of lines (one page), an error, or `None` at the end.
    async fn next_chunk(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        if let Some(chunk) = self.pending.pop_front() {
            return Some(Ok(chunk));
        }
        if self.finished || self.after >= self.end {
            return None;
        }
        let (store, after) = (self.store.clone(), self.after);
        let page = blocking(move || {
            let entries = engine::export_page(&store, after, AUDIT_PAGE_MAX)?;
            // A gap at the start of the page may be retention at work: then the anchor moved.
            let trimmed = match entries.first() {
                Some(entry) if entry.sequence > after + 1 => engine::stored_anchor(&store)?.sequence > after,
                None => engine::stored_anchor(&store)?.sequence > after,
                Some(_) => false,
            };
            Ok((entries, trimmed))
        })
        .await;
        let (entries, trimmed) = match page {
            Ok(page) => page,
            Err(error) => return Some(self.fail(error.message)),
        };
        if trimmed {
            return Some(self.fail("retention trimmed the audit log during the export; export again".to_owned()));
        }
        let Some(last) = entries.last() else {
            self.finished = true;
            return None;
        };
        self.after = last.sequence;
        let mut chunk = String::new();
        for entry in entries.iter().filter(|entry| entry.sequence <= self.end) {
            chunk.push_str(&AuditEntry::to_json_line(entry));
            chunk.push('\n');
        }
        Some(Ok(Bytes::from(chunk)))
    }

    fn fail(&mut self, message: String) -> Result<Bytes, std::io::Error> {
        tracing::warn!(%message, "ending an audit export");
        self.finished = true;
        Err(std::io::Error::other(message))
    }
}

/// A handle on the store, from the engine.
async fn store_of(state: &AppState) -> ApiResult<Store> {
    Ok(state.engine.call(|engine| engine.store().clone()).await?)
}

/// Runs a store read on the blocking pool (sled blocks).
async fn blocking<T: Send + 'static>(read: impl FnOnce() -> Result<T, EngineError> + Send + 'static) -> ApiResult<T> {
    match tokio::task::spawn_blocking(read).await {
        Ok(result) => Ok(result?),
        Err(error) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("reading the audit log: {error}"))),
    }
}
