//! Connectors: external databases brought into the mesh and kept in step with it, both ways.
//!
//! A connector belongs to one node. Its definition (a DSN and tables mapped to collections) and
//! its checkpoints (the confirmed WAL position of the capture, the feed position of the apply)
//! live in the node's store under one meta entry, written through the engine's group commit, so
//! a restart resumes where the last durable checkpoint left off. [`Connectors`] owns the running
//! tasks: one per connector, started at boot and by `POST /v1/connectors`, paused, resumed and
//! removed through the API (`concord connector ...`). PostgreSQL is the one kind so far
//! (`postgres`).

pub mod postgres;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::engine::{EngineError, EngineHandle};

/// The meta entry holding every connector's definition and checkpoints.
const CONNECTORS_META: &str = "connectors";
/// The most connectors one node runs.
pub const CONNECTORS_MAX: usize = 32;
/// The most tables one connector maps.
pub const TABLES_MAX: usize = 256;
/// Quarantine retries queued for one connector before the API answers 503.
const RETRY_QUEUE_MAX: usize = 64;

/// A table and the collection its rows become records of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableMapping {
    /// `schema.table`, or `table` for `public.table`.
    pub table: String,
    pub collection: String,
}

/// What an operator declares: where the database is and which tables map to which collections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorDefinition {
    pub name: String,
    /// Only `postgres` so far.
    #[serde(default = "postgres_kind")]
    pub kind: String,
    /// A libpq-style `key=value` string or a `postgresql://` URL.
    pub dsn: String,
    pub tables: Vec<TableMapping>,
    /// Default `concord_<name>`.
    #[serde(default)]
    pub publication: Option<String>,
    /// Default `concord_<name>`.
    #[serde(default)]
    pub slot: Option<String>,
}

fn postgres_kind() -> String {
    "postgres".to_owned()
}

impl ConnectorDefinition {
    pub fn publication(&self) -> String {
        self.publication.clone().unwrap_or_else(|| format!("concord_{}", self.name.replace('-', "_")))
    }

    pub fn slot(&self) -> String {
        self.slot.clone().unwrap_or_else(|| format!("concord_{}", self.name.replace('-', "_")))
    }

    /// Checks names and the mapping; the database itself is checked when the connector starts.
    pub fn validate(&self) -> Result<(), String> {
        let simple = |text: &str| {
            !text.is_empty()
                && text.len() <= 63
                && text
                    .chars()
                    .all(|character| character.is_ascii_alphanumeric() || character == '_' || character == '-')
        };
        if !simple(&self.name) {
            return Err(format!("connector name {:?} must be 1 to 63 ASCII letters, digits, '_' or '-'", self.name));
        }
        if self.kind != "postgres" {
            return Err(format!("unknown connector kind {:?}: the one kind is \"postgres\"", self.kind));
        }
        for name in [self.publication(), self.slot()] {
            if !name
                .chars()
                .all(|character| character.is_ascii_lowercase() || character.is_ascii_digit() || character == '_')
                || name.is_empty()
                || name.len() > 63
            {
                return Err(format!(
                    "publication and slot names must be 1 to 63 lowercase letters, digits or '_', not {name:?}"
                ));
            }
        }
        if self.tables.is_empty() || self.tables.len() > TABLES_MAX {
            return Err(format!("a connector maps 1 to {TABLES_MAX} tables, not {}", self.tables.len()));
        }
        let mut collections = std::collections::BTreeSet::new();
        let mut tables = std::collections::BTreeSet::new();
        for mapping in &self.tables {
            crdt::key::validate_collection(&mapping.collection).map_err(|error| error.to_string())?;
            if mapping.collection.starts_with('_') {
                return Err(format!("collection {:?} is a system collection", mapping.collection));
            }
            postgres::TableName::parse(&mapping.table)?;
            if !collections.insert(&mapping.collection) || !tables.insert(&mapping.table) {
                return Err(format!(
                    "table {:?} or collection {:?} is mapped twice",
                    mapping.table, mapping.collection
                ));
            }
        }
        self.dsn.parse::<tokio_postgres::Config>().map_err(|error| format!("the DSN does not parse: {error}"))?;
        Ok(())
    }
}

/// Where a connector is, kept durable in the store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoints {
    pub paused: bool,
    /// The initial snapshot was loaded and streaming takes over from `confirmed_lsn`.
    pub snapshot_done: bool,
    /// Every change before this WAL position is durable in the node.
    pub confirmed_lsn: u64,
    /// Every feed event up to this sequence was applied to the database (or quarantined).
    pub applied_feed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredConnector {
    definition: ConnectorDefinition,
    checkpoints: Checkpoints,
}

/// A connector's state as `concord connector status` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectorStatus {
    pub name: String,
    /// `starting`, `snapshot`, `streaming`, `paused`, `error` (retrying) or `removed`.
    pub state: String,
    pub tables: Vec<TableMapping>,
    pub publication: String,
    pub slot: String,
    pub snapshot_rows_loaded: u64,
    pub snapshot_rows_total: u64,
    /// The capture's confirmed position, durable in the node.
    pub confirmed_lsn: String,
    /// The server's current WAL position when last asked.
    pub server_lsn: String,
    /// WAL bytes the slot holds back: the server's position minus the slot's confirmed one.
    pub slot_lag_bytes: u64,
    pub applied_feed: u64,
    /// Times the apply found the feed trimmed past its position and resynced the tables from
    /// the records.
    pub resyncs: u64,
    pub rows_captured: u64,
    pub rows_applied: u64,
    /// Transactions the capture skipped because this connector wrote them (no echo).
    pub echoes_skipped: u64,
    /// Feed events the apply skipped because the node could not read them (damage on disk):
    /// their rows stay as they were.
    pub damaged_events_skipped: u64,
    pub apply_errors: u64,
    pub capture_errors: u64,
    pub last_error: Option<String>,
}

/// What the API can ask a running connector to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Run,
    Pause,
    Stop,
}

/// A quarantined apply to retry: the entry and the record it was for.
#[derive(Debug, Clone)]
pub struct Retry {
    pub quarantine_id: u64,
    pub collection: String,
    pub id: String,
}

/// One running connector's handles.
struct Running {
    control: watch::Sender<Control>,
    status: Arc<Mutex<ConnectorStatus>>,
    retries: mpsc::Sender<Retry>,
    task: tokio::task::JoinHandle<()>,
}

/// Errors the connector API answers with.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("{0}")]
    Invalid(String),
    #[error("no connector named {0:?}")]
    NotFound(String),
    #[error("a connector named {0:?} exists")]
    Exists(String),
    #[error("this node runs at most {CONNECTORS_MAX} connectors")]
    TooMany,
    #[error("connector {0:?} has too many retries queued; try again")]
    Busy(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// The node's connectors: definitions, checkpoints and running tasks.
#[derive(Clone)]
pub struct Connectors {
    inner: Arc<tokio::sync::Mutex<BTreeMap<String, Running>>>,
    /// Held across each read-modify-write of the meta entry.
    meta: Arc<tokio::sync::Mutex<()>>,
    engine: EngineHandle,
}

impl std::fmt::Debug for Connectors {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Connectors").finish_non_exhaustive()
    }
}

impl Connectors {
    /// Starts every connector stored in the node, plus `configured` ones (from the config file)
    /// not stored yet.
    pub async fn start(
        engine: EngineHandle,
        configured: Vec<ConnectorDefinition>,
    ) -> Result<Connectors, ConnectorError> {
        let connectors = Connectors { inner: Default::default(), meta: Default::default(), engine };
        for definition in &configured {
            definition.validate().map_err(ConnectorError::Invalid)?;
        }
        let stored = connectors
            .update(move |stored| {
                for definition in configured {
                    match stored.get_mut(&definition.name) {
                        Some(existing) => existing.definition = definition,
                        None => {
                            let connector = StoredConnector { definition, checkpoints: Checkpoints::default() };
                            stored.insert(connector.definition.name.clone(), connector);
                        }
                    }
                }
                stored.clone()
            })
            .await?;
        let mut running = connectors.inner.lock().await;
        for (name, connector) in stored {
            running.insert(name, connectors.launch(connector));
        }
        drop(running);
        Ok(connectors)
    }

    async fn load(&self) -> Result<BTreeMap<String, StoredConnector>, ConnectorError> {
        let bytes =
            self.engine.call(|engine| engine.store().meta(CONNECTORS_META)).await?.map_err(EngineError::from)?;
        match bytes {
            Some(bytes) => rmp_serde::from_slice(&bytes).map_err(|error| {
                ConnectorError::Engine(EngineError::Corrupt {
                    key: "meta connectors".into(),
                    reason: error.to_string(),
                })
            }),
            None => Ok(BTreeMap::new()),
        }
    }

    /// Reads the meta entry, lets `change` edit it, and writes it back (durable on return).
    async fn update<T>(
        &self,
        change: impl FnOnce(&mut BTreeMap<String, StoredConnector>) -> T,
    ) -> Result<T, ConnectorError> {
        let _guard = self.meta.lock().await;
        let mut stored = self.load().await?;
        let result = change(&mut stored);
        let bytes = rmp_serde::to_vec_named(&stored).unwrap_or_default();
        self.engine.call(move |engine| engine.stage_meta(CONNECTORS_META, &bytes)).await?;
        Ok(result)
    }

    fn launch(&self, connector: StoredConnector) -> Running {
        let initial = if connector.checkpoints.paused { Control::Pause } else { Control::Run };
        let (control, control_receiver) = watch::channel(initial);
        let (retries, retry_receiver) = mpsc::channel(RETRY_QUEUE_MAX);
        let status = Arc::new(Mutex::new(ConnectorStatus {
            name: connector.definition.name.clone(),
            state: "starting".into(),
            tables: connector.definition.tables.clone(),
            publication: connector.definition.publication(),
            slot: connector.definition.slot(),
            confirmed_lsn: postgres::format_lsn(connector.checkpoints.confirmed_lsn),
            applied_feed: connector.checkpoints.applied_feed,
            ..ConnectorStatus::default()
        }));
        let context = postgres::Context {
            definition: connector.definition,
            checkpoints: connector.checkpoints,
            engine: self.engine.clone(),
            status: status.clone(),
            control: control_receiver,
            retries: retry_receiver,
            store: CheckpointStore { connectors: self.clone() },
        };
        let task = tokio::spawn(postgres::run(context));
        Running { control, status, retries, task }
    }

    /// Adds and starts a connector.
    pub async fn add(&self, definition: ConnectorDefinition) -> Result<ConnectorStatus, ConnectorError> {
        definition.validate().map_err(ConnectorError::Invalid)?;
        let mut running = self.inner.lock().await;
        if running.contains_key(&definition.name) {
            return Err(ConnectorError::Exists(definition.name));
        }
        if running.len() >= CONNECTORS_MAX {
            return Err(ConnectorError::TooMany);
        }
        let connector = StoredConnector { definition: definition.clone(), checkpoints: Checkpoints::default() };
        let kept = connector.clone();
        self.update(move |stored| stored.insert(kept.definition.name.clone(), kept)).await?;
        let handle = self.launch(connector);
        let status = handle.status.lock().map(|status| status.clone()).unwrap_or_default();
        running.insert(definition.name, handle);
        Ok(status)
    }

    pub async fn list(&self) -> Vec<ConnectorStatus> {
        let running = self.inner.lock().await;
        running.values().map(|running| running.status.lock().map(|status| status.clone()).unwrap_or_default()).collect()
    }

    pub async fn status(&self, name: &str) -> Result<ConnectorStatus, ConnectorError> {
        let running = self.inner.lock().await;
        let connector = running.get(name).ok_or_else(|| ConnectorError::NotFound(name.to_owned()))?;
        Ok(connector.status.lock().map(|status| status.clone()).unwrap_or_default())
    }

    /// Pauses or resumes a connector; the choice is durable.
    pub async fn set_paused(&self, name: &str, paused: bool) -> Result<ConnectorStatus, ConnectorError> {
        let running = self.inner.lock().await;
        let connector = running.get(name).ok_or_else(|| ConnectorError::NotFound(name.to_owned()))?;
        self.update(|stored| {
            if let Some(entry) = stored.get_mut(name) {
                entry.checkpoints.paused = paused;
            }
        })
        .await?;
        connector.control.send_replace(if paused { Control::Pause } else { Control::Run });
        Ok(connector.status.lock().map(|status| status.clone()).unwrap_or_default())
    }

    /// Stops and forgets a connector. With `drop_slot`, its replication slot is dropped too
    /// (else the database keeps WAL for it until an operator drops it).
    pub async fn remove(&self, name: &str, drop_slot: bool) -> Result<(), ConnectorError> {
        let mut running = self.inner.lock().await;
        let connector = running.remove(name).ok_or_else(|| ConnectorError::NotFound(name.to_owned()))?;
        connector.control.send_replace(Control::Stop);
        let _ = connector.task.await;
        let removed = self.update(|stored| stored.remove(name)).await?;
        if drop_slot && let Some(removed) = removed {
            postgres::drop_slot(&removed.definition).await.map_err(ConnectorError::Invalid)?;
        }
        Ok(())
    }

    /// Queues a quarantined apply for its connector to try again.
    pub async fn retry(&self, connector: &str, retry: Retry) -> Result<(), ConnectorError> {
        let running = self.inner.lock().await;
        let handle = running.get(connector).ok_or_else(|| ConnectorError::NotFound(connector.to_owned()))?;
        handle.retries.try_send(retry).map_err(|_| ConnectorError::Busy(connector.to_owned()))
    }

    /// Stops every connector (node shutdown); checkpoints already durable stay.
    pub async fn shutdown(&self) {
        let mut running = self.inner.lock().await;
        for (_, connector) in std::mem::take(&mut *running) {
            connector.control.send_replace(Control::Stop);
            let _ = connector.task.await;
        }
    }

    /// Per-connector lines for `/metrics`.
    pub async fn render_metrics(&self, output: &mut String) {
        use std::fmt::Write;
        let statuses = self.list().await;
        /// Name, kind, help and how to read the value.
        type Family = (&'static str, &'static str, &'static str, fn(&ConnectorStatus) -> u64);
        let families: [Family; 8] = [
            ("concord_connector_slot_lag_bytes", "gauge", "WAL bytes the connector's slot holds back.", |status| {
                status.slot_lag_bytes
            }),
            ("concord_connector_rows_captured_total", "counter", "Row changes captured into the node.", |status| {
                status.rows_captured
            }),
            ("concord_connector_rows_applied_total", "counter", "Row writes applied to the database.", |status| {
                status.rows_applied
            }),
            (
                "concord_connector_apply_errors_total",
                "counter",
                "Applies the database refused (sent to quarantine).",
                |status| status.apply_errors,
            ),
            (
                "concord_connector_capture_errors_total",
                "counter",
                "Captured rows the node refused or could not map (skipped).",
                |status| status.capture_errors,
            ),
            (
                "concord_connector_resyncs_total",
                "counter",
                "Times the apply found the feed trimmed past its position and resynced the tables.",
                |status| status.resyncs,
            ),
            (
                "concord_connector_echoes_skipped_total",
                "counter",
                "Transactions the capture skipped as the connector's own.",
                |status| status.echoes_skipped,
            ),
            (
                "concord_connector_damaged_events_skipped_total",
                "counter",
                "Feed events the apply skipped because the node could not read them.",
                |status| status.damaged_events_skipped,
            ),
        ];
        for (name, kind, help, value) in families {
            let _ = writeln!(output, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for status in &statuses {
                let _ = writeln!(output, "{name}{{connector=\"{}\"}} {}", status.name, value(status));
            }
        }
    }
}

/// Lets a connector task make its checkpoints durable.
#[derive(Clone)]
pub struct CheckpointStore {
    connectors: Connectors,
}

impl std::fmt::Debug for CheckpointStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("CheckpointStore").finish_non_exhaustive()
    }
}

impl CheckpointStore {
    /// Records the capture's position for connector `name` (durable when this returns).
    pub async fn save_capture(
        &self,
        name: &str,
        snapshot_done: bool,
        confirmed_lsn: u64,
    ) -> Result<(), ConnectorError> {
        self.connectors
            .update(|stored| {
                if let Some(entry) = stored.get_mut(name) {
                    entry.checkpoints.snapshot_done = snapshot_done;
                    entry.checkpoints.confirmed_lsn = confirmed_lsn;
                }
            })
            .await
    }

    /// Records the apply's feed position for connector `name` (durable when this returns).
    pub async fn save_apply(&self, name: &str, applied_feed: u64) -> Result<(), ConnectorError> {
        self.connectors
            .update(|stored| {
                if let Some(entry) = stored.get_mut(name) {
                    entry.checkpoints.applied_feed = applied_feed;
                }
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition() -> ConnectorDefinition {
        ConnectorDefinition {
            name: "shop-db".into(),
            kind: "postgres".into(),
            dsn: "host=127.0.0.1 port=5432 user=postgres dbname=postgres".into(),
            tables: vec![TableMapping { table: "public.customers".into(), collection: "customers".into() }],
            publication: None,
            slot: None,
        }
    }

    #[test]
    fn a_good_definition_passes_and_names_its_publication_and_slot() {
        let definition = definition();
        assert_eq!(definition.validate(), Ok(()));
        assert_eq!(definition.slot(), "concord_shop_db");
        assert_eq!(definition.publication(), "concord_shop_db");
    }

    #[test]
    fn each_bad_part_of_a_definition_is_refused_with_its_reason() {
        type Spoil = fn(&mut ConnectorDefinition);
        let cases: [(&str, Spoil); 9] = [
            ("connector name", |definition| definition.name = "no spaces".into()),
            ("connector name", |definition| definition.name = "n".repeat(64)),
            ("unknown connector kind", |definition| definition.kind = "mysql".into()),
            ("slot names", |definition| definition.slot = Some("Upper".into())),
            ("1 to 256 tables", |definition| definition.tables.clear()),
            ("1 to 256 tables", |definition| {
                definition.tables = (0..=TABLES_MAX)
                    .map(|index| TableMapping { table: format!("t{index}"), collection: format!("c{index}") })
                    .collect()
            }),
            ("mapped twice", |definition| {
                definition.tables.push(TableMapping { table: "customers".into(), collection: "customers".into() })
            }),
            ("system collection", |definition| definition.tables[0].collection = "_collections".into()),
            ("DSN", |definition| definition.dsn = "host=127.0.0.1 port=notaport".into()),
        ];
        for (reason, spoil) in cases {
            let mut definition = definition();
            spoil(&mut definition);
            match definition.validate() {
                Err(error) => assert!(error.contains(reason), "{error:?} should mention {reason:?}"),
                Ok(()) => panic!("accepted a definition that should fail on {reason:?}: {definition:?}"),
            }
        }
    }
}
