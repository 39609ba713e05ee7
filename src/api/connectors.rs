//! Connectors over HTTP: add, list, show, pause, resume and remove (`/v1/connectors`), for
//! `concord connector ...`. What a connector does is in `crate::connector`.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiResult, AppState};
use crate::connector::{ConnectorDefinition, ConnectorError, ConnectorStatus};

impl From<ConnectorError> for ApiError {
    fn from(error: ConnectorError) -> Self {
        let status = match error {
            ConnectorError::Engine(error) => return ApiError::from(error),
            ConnectorError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ConnectorError::NotFound(_) => StatusCode::NOT_FOUND,
            ConnectorError::Exists(_) | ConnectorError::TooMany => StatusCode::CONFLICT,
            ConnectorError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, error.to_string())
    }
}

/// `GET /v1/connectors`.
pub(super) async fn list_connectors(State(state): State<AppState>) -> Json<Value> {
    Json(json!({ "connectors": state.connectors.list().await }))
}

/// `POST /v1/connectors` with a definition as JSON: adds and starts it.
pub(super) async fn add_connector(
    State(state): State<AppState>,
    Json(definition): Json<ConnectorDefinition>,
) -> ApiResult<(StatusCode, Json<ConnectorStatus>)> {
    Ok((StatusCode::CREATED, Json(state.connectors.add(definition).await?)))
}

/// `GET /v1/connectors/{name}`.
pub(super) async fn get_connector(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<ConnectorStatus>> {
    Ok(Json(state.connectors.status(&name).await?))
}

/// `POST /v1/connectors/{name}/pause`.
pub(super) async fn pause_connector(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<ConnectorStatus>> {
    Ok(Json(state.connectors.set_paused(&name, true).await?))
}

/// `POST /v1/connectors/{name}/resume`.
pub(super) async fn resume_connector(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<ConnectorStatus>> {
    Ok(Json(state.connectors.set_paused(&name, false).await?))
}

#[derive(Debug, Deserialize)]
pub(super) struct RemoveQuery {
    /// Also drop the replication slot (else the database keeps WAL for it).
    #[serde(default)]
    drop_slot: bool,
}

/// `DELETE /v1/connectors/{name}[?drop_slot=true]`.
pub(super) async fn remove_connector(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<RemoveQuery>,
) -> ApiResult<Json<Value>> {
    state.connectors.remove(&name, query.drop_slot).await?;
    Ok(Json(json!({ "name": name, "removed": true, "slot_dropped": query.drop_slot })))
}
