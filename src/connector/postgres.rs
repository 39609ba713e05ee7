//! The PostgreSQL connector: log-based capture (pgoutput over logical replication) into the
//! node, and the node's merged records applied back to the tables, with no echo.
//!
//! One session runs two halves over two connections, and restarts both (with backoff) on any
//! connection error:
//! - **Capture.** On first start the connector creates its replication slot with an exported
//!   snapshot, reads every mapped table inside that snapshot (in pages, so memory stays
//!   bounded), writes the rows to the node, and then streams from the slot's consistent point,
//!   so nothing is missed or seen twice across the hand-off. Each transaction's row changes are
//!   written to the node, and only once they are durable does the slot's confirmed position
//!   advance (and the node's checkpoint with it): a restart resumes without loss, and a change
//!   replayed after a crash sets the same values again, which changes nothing. Tables run with
//!   `REPLICA IDENTITY FULL`, so an update carries its old row and only the columns that really
//!   changed are written: two sites updating different columns of one row both keep theirs.
//! - **Apply.** It follows the node's change feed a page at a time. First it commits a
//!   `concord.sync` message and waits until the capture has read it, so every change committed
//!   in the database before then is in the node. Then it reads each changed record's row (the
//!   page's reads pipelined); a row that differs is read again under a lock and only the
//!   columns that differ are written (insert, update or delete) in a transaction tagged with the
//!   logical decoding message `concord.apply`. The capture drops every transaction that carries that message,
//!   so nothing the connector writes comes back (PostgreSQL 15 has no server-side origin
//!   filter). A record equal to its row writes nothing, so captured changes cost one read. A row
//!   the database refuses (a type mismatch, a constraint) goes to the node's quarantine with the
//!   reason, and the apply goes on.
//!
//! Values are mapped by `crdt::capture::values` (table in its module doc); a NULL column is a
//! `null` field. Record ids are the primary key's text, composite keys joined by `,` with `%`,
//! `,` and `/` percent-encoded.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crdt::capture::pgoutput::{self, Datum, Tuple};
use crdt::capture::values;
use crdt::key::RecordKey;
use crdt::record::Operation;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch};
use tokio_postgres::{Client, NoTls};

use super::{CheckpointStore, Checkpoints, ConnectorDefinition, ConnectorStatus, Control, Retry};
use crate::engine::{EngineError, EngineHandle};

/// The logical decoding message prefix that marks the connector's own transactions.
pub const ECHO_PREFIX: &str = "concord.apply";
/// The prefix of the message the apply commits before it compares rows: once the capture has
/// read its transaction, every transaction committed before it has been captured.
pub const SYNC_PREFIX: &str = "concord.sync";
/// Rows per snapshot page and the most row changes held before they are written to the node.
const ROWS_PER_WRITE: usize = 500;
/// Feed events the apply reads at a time.
const FEED_PAGE: usize = 256;
/// How long the apply waits for the capture to read its sync message before it compares rows
/// with records (so a change the capture has not written yet is not undone); a guard only.
const CAPTURE_WAIT: Duration = Duration::from_secs(2);
/// How long removing a connector waits for its slot to be released before dropping it fails.
const SLOT_RELEASE_WAIT: Duration = Duration::from_secs(10);
/// Backoff between sessions after an error.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The largest pgoutput message accepted from the server (one row change).
const MESSAGE_BYTES_MAX: usize = 64 << 20;
/// Session settings that make text values render the same everywhere.
const SESSION_SETTINGS: &str =
    "SET DateStyle = ISO; SET TimeZone = 'UTC'; SET IntervalStyle = postgres; SET extra_float_digits = 1";

/// Everything a connector task owns.
pub(crate) struct Context {
    pub(crate) definition: ConnectorDefinition,
    pub(crate) checkpoints: Checkpoints,
    pub(crate) engine: EngineHandle,
    pub(crate) status: Arc<Mutex<ConnectorStatus>>,
    pub(crate) control: watch::Receiver<Control>,
    pub(crate) retries: mpsc::Receiver<Retry>,
    pub(crate) store: CheckpointStore,
}

/// `schema.table`, checked to be plain identifiers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: String,
    pub table: String,
}

impl TableName {
    pub fn parse(text: &str) -> Result<TableName, String> {
        let (schema, table) = text.split_once('.').unwrap_or(("public", text));
        for part in [schema, table] {
            if part.is_empty()
                || part.len() > 63
                || !part.chars().all(|character| character.is_ascii_alphanumeric() || character == '_')
            {
                return Err(format!("table {text:?}: names are 1 to 63 ASCII letters, digits or '_' (schema.table)"));
            }
        }
        Ok(TableName { schema: schema.to_owned(), table: table.to_owned() })
    }

    fn quoted(&self) -> String {
        format!("{}.{}", quote(&self.schema), quote(&self.table))
    }
}

fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

/// A column as the catalog describes it.
#[derive(Debug, Clone)]
struct Column {
    name: String,
    type_oid: u32,
    /// `format_type`, for casts: `numeric(10,2)`, `text[]`, ...
    type_name: String,
}

/// A mapped table with its columns and primary key.
#[derive(Debug, Clone)]
struct Table {
    name: TableName,
    collection: String,
    columns: Vec<Column>,
    /// Indexes into `columns`, in column order.
    key: Vec<usize>,
}

impl Table {
    fn column_list(&self, cast_to_text: bool) -> String {
        let list: Vec<String> = self
            .columns
            .iter()
            .map(|column| if cast_to_text { format!("{}::text", quote(&column.name)) } else { quote(&column.name) })
            .collect();
        list.join(", ")
    }

    /// The record key of a row given as text values in column order.
    fn record_key(&self, texts: &[Option<&str>]) -> Result<RecordKey, String> {
        let mut parts = Vec::with_capacity(self.key.len());
        for &index in &self.key {
            match texts.get(index).copied().flatten() {
                Some(text) => parts.push(text),
                None => return Err(format!("{}: a primary key column is NULL or missing", self.name.quoted())),
            }
        }
        RecordKey::new(&self.collection, &encode_id(&parts)).map_err(|error| error.to_string())
    }

    /// Record fields for the named columns (text values in column order; `None` skips).
    fn fields(&self, texts: &[Option<Option<&str>>]) -> Result<Map<String, Value>, String> {
        let mut fields = Map::new();
        for (column, text) in self.columns.iter().zip(texts) {
            let Some(text) = text else { continue };
            let value = match text {
                None => Value::Null,
                Some(text) => values::to_record_value(column.type_oid, text)
                    .map_err(|error| format!("column {:?}: {error}", column.name))?,
            };
            fields.insert(column.name.clone(), value);
        }
        Ok(fields)
    }
}

/// Joins primary-key texts into a record id (`%`, `,` and `/` percent-encoded).
pub fn encode_id(parts: &[&str]) -> String {
    let encoded: Vec<String> = parts
        .iter()
        .map(|part| {
            let mut encoded = String::with_capacity(part.len());
            for character in part.chars() {
                match character {
                    '%' => encoded.push_str("%25"),
                    ',' => encoded.push_str("%2C"),
                    '/' => encoded.push_str("%2F"),
                    character if character.is_control() => {
                        let mut buffer = [0u8; 4];
                        for byte in character.encode_utf8(&mut buffer).bytes() {
                            encoded.push_str(&format!("%{byte:02X}"));
                        }
                    }
                    character => encoded.push(character),
                }
            }
            encoded
        })
        .collect();
    encoded.join(",")
}

/// Splits a record id back into `count` primary-key texts.
pub fn decode_id(id: &str, count: usize) -> Result<Vec<String>, String> {
    let parts: Vec<&str> = id.split(',').collect();
    if parts.len() != count {
        return Err(format!("record id {id:?} has {} key parts; the table's primary key has {count}", parts.len()));
    }
    parts
        .into_iter()
        .map(|part| {
            let bytes = part.as_bytes();
            let mut decoded = Vec::with_capacity(bytes.len());
            let mut index = 0;
            while index < bytes.len() {
                if bytes[index] == b'%' {
                    let hex =
                        part.get(index + 1..index + 3).ok_or_else(|| format!("bad escape in record id {id:?}"))?;
                    decoded.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad escape in record id {id:?}"))?);
                    index += 3;
                } else {
                    decoded.push(bytes[index]);
                    index += 1;
                }
            }
            String::from_utf8(decoded).map_err(|_| format!("record id {id:?} does not decode to UTF-8"))
        })
        .collect()
}

pub fn format_lsn(lsn: u64) -> String {
    Lsn(lsn).to_pg_string()
}

/// Runs the connector until it is told to stop: sessions, with backoff after errors, and idle
/// while paused.
pub(crate) async fn run(mut context: Context) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let control = *context.control.borrow_and_update();
        match control {
            Control::Stop => return,
            Control::Pause => {
                set_state(&context.status, "paused");
                if context.control.changed().await.is_err() {
                    return;
                }
                continue;
            }
            Control::Run => {}
        }
        match session(&mut context).await {
            Ok(()) => backoff = BACKOFF_MIN,
            Err(error) => {
                tracing::warn!(connector = %context.definition.name, %error, "connector session failed; retrying");
                if let Ok(mut status) = context.status.lock() {
                    status.state = "error".into();
                    status.last_error = Some(error);
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    changed = context.control.changed() => if changed.is_err() { return },
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

fn set_state(status: &Mutex<ConnectorStatus>, state: &str) {
    if let Ok(mut status) = status.lock() {
        state.clone_into(&mut status.state);
    }
}

fn update_status(status: &Mutex<ConnectorStatus>, change: impl FnOnce(&mut ConnectorStatus)) {
    if let Ok(mut status) = status.lock() {
        change(&mut status);
    }
}

/// Opens a SQL connection with the session settings pinned.
async fn connect(dsn: &str) -> Result<Client, String> {
    let (client, connection) =
        tokio_postgres::connect(dsn, NoTls).await.map_err(|error| format!("connecting to the database: {error}"))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "connector SQL connection ended");
        }
    });
    client.batch_execute(SESSION_SETTINGS).await.map_err(|error| sql_error("session settings", &error))?;
    Ok(client)
}

fn sql_error(doing: &str, error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(database) => format!("{doing}: {} ({})", database.message(), database.code().code()),
        None => format!("{doing}: {error}"),
    }
}

/// The replication connection's settings, from the DSN.
fn replication_config(definition: &ConnectorDefinition) -> Result<ReplicationConfig, String> {
    let config: tokio_postgres::Config =
        definition.dsn.parse().map_err(|error| format!("the DSN does not parse: {error}"))?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.to_string_lossy().into_owned(),
        None => "localhost".to_owned(),
    };
    let user = config.get_user().unwrap_or("postgres").to_owned();
    let password = config.get_password().map(|bytes| String::from_utf8_lossy(bytes).into_owned()).unwrap_or_default();
    let database = config.get_dbname().map_or_else(|| user.clone(), str::to_owned);
    let port = config.get_ports().first().copied().unwrap_or(5432);
    Ok(ReplicationConfig::new(host, user, password, database, definition.slot(), definition.publication())
        .with_port(port)
        .with_options("-c datestyle=ISO -c timezone=UTC -c intervalstyle=postgres -c extra_float_digits=1")
        .with_application_name(format!("concord-{}", definition.name))
        .with_max_message_size(MESSAGE_BYTES_MAX)
        .with_status_interval(Duration::from_secs(1))
        .with_buffer_size(1024))
}

/// Reads the mapped tables from the catalog and prepares them: primary key required, replica
/// identity full, all in the publication.
async fn prepare(sql: &Client, definition: &ConnectorDefinition) -> Result<Vec<Table>, String> {
    let mut tables = Vec::new();
    for mapping in &definition.tables {
        let name = TableName::parse(&mapping.table)?;
        let quoted = name.quoted();
        let rows = sql
            .query(
                "SELECT a.attname::text, a.atttypid::int8, format_type(a.atttypid, a.atttypmod), \
                 COALESCE(a.attnum = ANY(i.indkey), false) \
                 FROM pg_attribute a LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
                 WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                &[&quoted],
            )
            .await
            .map_err(|error| sql_error(&format!("reading the columns of {quoted}"), &error))?;
        let mut columns = Vec::new();
        let mut key = Vec::new();
        for row in rows {
            let oid: i64 = row.get(1);
            if row.get::<_, bool>(3) {
                key.push(columns.len());
            }
            columns.push(Column { name: row.get(0), type_oid: oid as u32, type_name: row.get(2) });
        }
        if key.is_empty() {
            return Err(format!("table {quoted} has no primary key: its rows would have no record id"));
        }
        let identity: Option<i8> = sql
            .query_one(
                "SELECT relreplident::\"char\"::int2::int8 FROM pg_class WHERE oid = $1::text::regclass",
                &[&quoted],
            )
            .await
            .ok()
            .map(|row| row.get::<_, i64>(0) as i8);
        if identity != Some(b'f' as i8) {
            sql.batch_execute(&format!("ALTER TABLE {quoted} REPLICA IDENTITY FULL"))
                .await
                .map_err(|error| sql_error(&format!("setting REPLICA IDENTITY FULL on {quoted}"), &error))?;
        }
        tables.push(Table { name, collection: mapping.collection.clone(), columns, key });
    }
    let publication = definition.publication();
    let exists = sql
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&publication])
        .await
        .map_err(|error| sql_error("reading publications", &error))?
        .is_some();
    if !exists {
        let list: Vec<String> = tables.iter().map(|table| table.name.quoted()).collect();
        sql.batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert, update, delete')",
            quote(&publication),
            list.join(", ")
        ))
        .await
        .map_err(|error| sql_error("creating the publication", &error))?;
    } else {
        for table in &tables {
            let listed = sql
                .query_opt(
                    "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                    &[&publication, &table.name.schema, &table.name.table],
                )
                .await
                .map_err(|error| sql_error("reading the publication", &error))?
                .is_some();
            if !listed {
                sql.batch_execute(&format!(
                    "ALTER PUBLICATION {} ADD TABLE {}",
                    quote(&publication),
                    table.name.quoted()
                ))
                .await
                .map_err(|error| sql_error("adding a table to the publication", &error))?;
            }
        }
    }
    Ok(tables)
}

/// One session: connect, prepare, snapshot if needed, then capture and apply until the control
/// changes (`Ok`) or something fails (`Err`).
async fn session(context: &mut Context) -> Result<(), String> {
    set_state(&context.status, "starting");
    let definition = context.definition.clone();
    let sql = connect(&definition.dsn).await?;
    let tables = Arc::new(prepare(&sql, &definition).await?);
    let config = replication_config(&definition)?;
    let mut replication = if context.checkpoints.snapshot_done {
        let lsn = Lsn(context.checkpoints.confirmed_lsn);
        ReplicationClient::connect(config.with_start_lsn(lsn).with_ack_lsn(lsn))
            .await
            .map_err(|error| format!("starting replication: {error}"))?
    } else {
        set_state(&context.status, "snapshot");
        let (client, consistent_point) = snapshot(context, &sql, &tables, config).await?;
        context.checkpoints.snapshot_done = true;
        context.checkpoints.confirmed_lsn = consistent_point;
        context
            .store
            .save_capture(&definition.name, true, consistent_point)
            .await
            .map_err(|error| error.to_string())?;
        client
    };
    replication.wait_started().await.map_err(|error| format!("starting replication: {error}"))?;
    update_status(&context.status, |status| {
        status.state = "streaming".into();
        status.last_error = None;
    });
    let (captured_sender, captured) = watch::channel(context.checkpoints.confirmed_lsn);
    let apply_sql = connect(&definition.dsn).await?;
    let shared = Shared {
        definition: definition.clone(),
        tables: tables.clone(),
        engine: context.engine.clone(),
        status: context.status.clone(),
        store: context.store.clone(),
        node: context.engine.identity.name.clone(),
    };
    let mut control = context.control.clone();
    let result = {
        let capture = capture(&shared, &mut replication, &sql, captured_sender, context.checkpoints.confirmed_lsn);
        let apply = apply(&shared, apply_sql, &mut context.retries, captured, context.checkpoints.applied_feed);
        tokio::select! {
            result = capture => result,
            result = apply => result,
            _ = control.wait_for(|control| *control != Control::Run) => Ok(()),
        }
    };
    // Re-read the durable positions for the next session.
    if let Ok(status) = context.status.lock() {
        context.checkpoints.applied_feed = status.applied_feed;
        if let Ok(lsn) = Lsn::parse(&status.confirmed_lsn) {
            context.checkpoints.confirmed_lsn = lsn.0;
        }
    }
    replication.abort();
    result
}

/// What the capture and the apply both need.
struct Shared {
    definition: ConnectorDefinition,
    tables: Arc<Vec<Table>>,
    engine: EngineHandle,
    status: Arc<Mutex<ConnectorStatus>>,
    store: CheckpointStore,
    node: String,
}

impl Shared {
    fn principal(&self) -> String {
        format!("connector:{}", self.definition.name)
    }

    /// Writes row changes to the node; durable when this returns. A change the node refuses
    /// (a schema rule, a bad id) is counted and logged, and the rest go on.
    async fn write(&self, changes: Vec<RowChange>) -> Result<(), String> {
        if changes.is_empty() {
            return Ok(());
        }
        let principal = self.principal();
        let count = changes.len() as u64;
        let errors = self
            .engine
            .call(move |engine| {
                let mut errors = Vec::new();
                for change in changes {
                    let result = match change {
                        RowChange::Delete(key) => {
                            engine.write_record_as(key, Operation::Delete, &principal).map(|_| ())
                        }
                        RowChange::Set(key, fields) => {
                            // A NULL column is a null field, which a merge patch cannot set: the
                            // changed fields are laid over the current value and written whole
                            // (writes are diff-based, so only those fields change).
                            let current = engine
                                .read_record(key.clone())
                                .ok()
                                .flatten()
                                .and_then(|read| read.view.value)
                                .unwrap_or_default();
                            let mut value = current;
                            value.extend(fields);
                            engine.write_record_as(key, Operation::Replace(value), &principal).map(|_| ())
                        }
                    };
                    if let Err(error) = result {
                        errors.push(error.to_string());
                    }
                }
                errors
            })
            .await
            .map_err(|error| format!("writing to the node: {error}"))?;
        update_status(&self.status, |status| {
            status.rows_captured += count - errors.len() as u64;
            status.capture_errors += errors.len() as u64;
            if let Some(error) = errors.last() {
                status.last_error = Some(format!("capture: {error}"));
            }
        });
        for error in errors {
            tracing::warn!(connector = %self.definition.name, %error, "a captured row was refused by the node");
        }
        Ok(())
    }

    fn table_of_collection(&self, collection: &str) -> Option<&Table> {
        self.tables.iter().find(|table| table.collection == collection)
    }
}

/// A row change on its way to the node.
enum RowChange {
    Set(RecordKey, Map<String, Value>),
    Delete(RecordKey),
}

/// Creates the slot with an exported snapshot, loads every table inside it, and returns the
/// replication client (started) and the slot's consistent point.
async fn snapshot(
    context: &Context,
    sql: &Client,
    tables: &[Table],
    config: ReplicationConfig,
) -> Result<(ReplicationClient, u64), String> {
    let definition = &context.definition;
    let slot = definition.slot();
    // A slot left by an interrupted snapshot: its snapshot is gone, so start over.
    sql.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .map_err(|error| sql_error("dropping a leftover slot", &error))?;
    let mut replication =
        ReplicationClient::connect_gated(config).await.map_err(|error| format!("opening replication: {error}"))?;
    let rows = replication
        .simple_query(&format!("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT", quote(&slot)))
        .await
        .map_err(|error| format!("creating the replication slot: {error}"))?;
    let text = |column: usize| -> Result<String, String> {
        rows.first()
            .and_then(|row| row.get(column).cloned().flatten())
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .ok_or_else(|| "CREATE_REPLICATION_SLOT answered without a row".to_owned())
    };
    let consistent_point = Lsn::parse(&text(1)?).map_err(|error| format!("consistent point: {error}"))?.0;
    let snapshot_name = text(2)?;
    if !snapshot_name.chars().all(|character| character.is_ascii_hexdigit() || character == '-') {
        return Err(format!("unexpected snapshot name {snapshot_name:?}"));
    }
    sql.batch_execute(&format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{snapshot_name}'"
    ))
    .await
    .map_err(|error| sql_error("opening the snapshot", &error))?;
    let result = load_tables(context, sql, tables).await;
    let _ = sql.batch_execute(if result.is_ok() { "COMMIT" } else { "ROLLBACK" }).await;
    result?;
    replication.start().await.map_err(|error| format!("starting replication: {error}"))?;
    Ok((replication, consistent_point))
}

/// Reads each table in pages through a cursor and writes the rows to the node.
async fn load_tables(context: &Context, sql: &Client, tables: &[Table]) -> Result<(), String> {
    let shared = Shared {
        definition: context.definition.clone(),
        tables: Arc::new(tables.to_vec()),
        engine: context.engine.clone(),
        status: context.status.clone(),
        store: context.store.clone(),
        node: String::new(),
    };
    let mut total = 0u64;
    for table in tables {
        let row = sql
            .query_one(&format!("SELECT count(*) FROM {}", table.name.quoted()), &[])
            .await
            .map_err(|error| sql_error("counting rows", &error))?;
        total += row.get::<_, i64>(0) as u64;
    }
    update_status(&context.status, |status| {
        status.snapshot_rows_total = total;
        status.snapshot_rows_loaded = 0;
    });
    for table in tables {
        sql.batch_execute(&format!(
            "DECLARE concord_snapshot NO SCROLL CURSOR FOR SELECT {} FROM {}",
            table.column_list(false),
            table.name.quoted()
        ))
        .await
        .map_err(|error| sql_error("opening a snapshot cursor", &error))?;
        loop {
            let messages = sql
                .simple_query(&format!("FETCH {ROWS_PER_WRITE} FROM concord_snapshot"))
                .await
                .map_err(|error| sql_error("reading the snapshot", &error))?;
            let mut changes = Vec::new();
            let mut fetched = 0usize;
            for message in &messages {
                let tokio_postgres::SimpleQueryMessage::Row(row) = message else { continue };
                fetched += 1;
                let texts: Vec<Option<&str>> = (0..table.columns.len()).map(|index| row.get(index)).collect();
                match row_change(table, &texts) {
                    Ok(change) => changes.push(change),
                    Err(error) => {
                        tracing::warn!(connector = %context.definition.name, %error, "a snapshot row was skipped");
                        update_status(&context.status, |status| status.capture_errors += 1);
                    }
                }
            }
            if fetched == 0 {
                break;
            }
            let loaded = fetched as u64;
            shared.write(changes).await?;
            update_status(&context.status, |status| status.snapshot_rows_loaded += loaded);
        }
        sql.batch_execute("CLOSE concord_snapshot").await.map_err(|error| sql_error("closing the cursor", &error))?;
    }
    Ok(())
}

/// A whole row (text values in column order) as a change.
fn row_change(table: &Table, texts: &[Option<&str>]) -> Result<RowChange, String> {
    let key = table.record_key(texts)?;
    let named: Vec<Option<Option<&str>>> = texts.iter().map(|text| Some(*text)).collect();
    Ok(RowChange::Set(key, table.fields(&named)?))
}

/// A transaction being read from the stream.
#[derive(Default)]
struct Transaction {
    /// It carries the connector's message: its changes are dropped.
    echo: bool,
    changes: Vec<RowChange>,
}

/// Streams the slot into the node until an error; advances the slot after each durable
/// transaction.
async fn capture(
    shared: &Shared,
    replication: &mut ReplicationClient,
    sql: &Client,
    captured: watch::Sender<u64>,
    confirmed_from: u64,
) -> Result<(), String> {
    let mut relations: HashMap<u32, (pgoutput::Relation, Option<usize>)> = HashMap::new();
    let mut transaction: Option<Transaction> = None;
    let mut confirmed = confirmed_from;
    let mut saved = confirmed_from;
    let mut lag_tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let event = tokio::select! {
            event = replication.recv() => event.map_err(|error| format!("replication stream: {error}"))?,
            _ = lag_tick.tick() => {
                if confirmed != saved {
                    shared.store.save_capture(&shared.definition.name, true, confirmed).await.map_err(|error| error.to_string())?;
                    saved = confirmed;
                }
                refresh_lag(shared, sql).await;
                continue;
            }
        };
        let Some(event) = event else { return Err("the replication stream ended".into()) };
        match event {
            ReplicationEvent::Begin { .. } => transaction = Some(Transaction::default()),
            ReplicationEvent::Message { prefix, transactional, .. } => {
                if transactional
                    && prefix == ECHO_PREFIX
                    && let Some(transaction) = &mut transaction
                {
                    transaction.echo = true;
                    transaction.changes.clear();
                }
            }
            ReplicationEvent::XLogData { data, .. } => {
                let message = pgoutput::decode(&data).map_err(|error| format!("decoding pgoutput: {error}"))?;
                let Some(current) = &mut transaction else { continue };
                let change = match decode_change(shared, &mut relations, message) {
                    Ok(change) => change,
                    Err(error) => {
                        // A row the mapping cannot read (say JSON nested deeper than records
                        // allow) is counted and reported; the stream goes on.
                        tracing::warn!(connector = %shared.definition.name, %error, "a captured row was skipped");
                        update_status(&shared.status, |status| {
                            status.capture_errors += 1;
                            status.last_error = Some(format!("capture: {error}"));
                        });
                        None
                    }
                };
                if let Some(change) = change
                    && !current.echo
                {
                    current.changes.extend(change);
                    if current.changes.len() >= ROWS_PER_WRITE {
                        shared.write(std::mem::take(&mut current.changes)).await?;
                    }
                }
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                if let Some(done) = transaction.take() {
                    if done.echo {
                        update_status(&shared.status, |status| status.echoes_skipped += 1);
                    }
                    shared.write(done.changes).await?;
                }
                confirmed = end_lsn.0;
                replication.update_applied_lsn(end_lsn);
                captured.send_replace(confirmed);
                update_status(&shared.status, |status| status.confirmed_lsn = format_lsn(confirmed));
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                if transaction.is_none() && wal_end.0 > *captured.borrow() {
                    captured.send_replace(wal_end.0);
                }
            }
            ReplicationEvent::StoppedAt { .. } => return Err("the replication stream stopped".into()),
        }
    }
}

/// Turns one pgoutput message into row changes (or remembers a relation).
fn decode_change(
    shared: &Shared,
    relations: &mut HashMap<u32, (pgoutput::Relation, Option<usize>)>,
    message: pgoutput::Message,
) -> Result<Option<Vec<RowChange>>, String> {
    let table_of = |relations: &HashMap<u32, (pgoutput::Relation, Option<usize>)>, id: u32| {
        relations.get(&id).and_then(|(relation, table)| table.map(|table| (relation.clone(), &shared.tables[table])))
    };
    match message {
        pgoutput::Message::Relation(relation) => {
            let table = shared
                .tables
                .iter()
                .position(|table| table.name.schema == relation.namespace && table.name.table == relation.name);
            relations.insert(relation.id, (relation, table));
            Ok(None)
        }
        pgoutput::Message::Insert { relation, new } => {
            let Some((relation, table)) = table_of(relations, relation) else { return Ok(None) };
            Ok(Some(vec![tuple_change(table, &relation, None, &new)?]))
        }
        pgoutput::Message::Update { relation, key, old, new } => {
            let Some((relation, table)) = table_of(relations, relation) else { return Ok(None) };
            let mut changes = Vec::new();
            // Under REPLICA IDENTITY FULL the old row comes whole; were the identity changed
            // behind the connector's back, only the old key comes, and every column counts.
            if let Some(previous) = old.as_ref().or(key.as_ref()) {
                let old_key = table.record_key(&tuple_texts(table, &relation, previous))?;
                let new_key = table.record_key(&tuple_texts(table, &relation, &new))?;
                if old_key != new_key {
                    // The primary key changed: the old record goes, the new one is the whole row.
                    changes.push(RowChange::Delete(old_key));
                    changes.push(tuple_change(table, &relation, None, &new)?);
                    return Ok(Some(changes));
                }
            }
            changes.push(tuple_change(table, &relation, old.as_ref(), &new)?);
            Ok(Some(changes))
        }
        pgoutput::Message::Delete { relation, old } => {
            let Some((relation, table)) = table_of(relations, relation) else { return Ok(None) };
            Ok(Some(vec![RowChange::Delete(table.record_key(&tuple_texts(table, &relation, &old))?)]))
        }
        _ => Ok(None),
    }
}

/// A tuple's text values in the table's column order (by name; unchanged TOAST and unknown
/// columns are `None`).
fn tuple_texts<'a>(table: &Table, relation: &pgoutput::Relation, tuple: &'a Tuple) -> Vec<Option<&'a str>> {
    table
        .columns
        .iter()
        .map(|column| {
            let index = relation.columns.iter().position(|candidate| candidate.name == column.name)?;
            match tuple.0.get(index)? {
                Datum::Text(text) => Some(text.as_str()),
                Datum::Null | Datum::UnchangedToast => None,
            }
        })
        .collect()
}

/// The change a new tuple makes: every column, or with `old` only those that differ from it.
fn tuple_change(
    table: &Table,
    relation: &pgoutput::Relation,
    old: Option<&Tuple>,
    new: &Tuple,
) -> Result<RowChange, String> {
    let key = table.record_key(&tuple_texts(table, relation, new))?;
    let datum = |tuple: &Tuple, name: &str| {
        relation.columns.iter().position(|column| column.name == name).and_then(|index| tuple.0.get(index).cloned())
    };
    let texts: Vec<Option<Option<String>>> = table
        .columns
        .iter()
        .map(|column| {
            let new_datum = datum(new, &column.name)?;
            if matches!(new_datum, Datum::UnchangedToast) {
                return None;
            }
            if let Some(old) = old
                && datum(old, &column.name).as_ref() == Some(&new_datum)
            {
                return None;
            }
            match new_datum {
                Datum::Text(text) => Some(Some(text)),
                _ => Some(None),
            }
        })
        .collect();
    let borrowed: Vec<Option<Option<&str>>> =
        texts.iter().map(|text| text.as_ref().map(|text| text.as_deref())).collect();
    Ok(RowChange::Set(key, table.fields(&borrowed)?))
}

/// Asks the server for its WAL position and the slot's lag.
async fn refresh_lag(shared: &Shared, sql: &Client) {
    let slot = shared.definition.slot();
    let row = sql
        .query_opt(
            "SELECT pg_current_wal_lsn()::text, \
             COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::int8 \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await;
    if let Ok(Some(row)) = row {
        let server: String = row.get(0);
        let lag: i64 = row.get(1);
        update_status(&shared.status, |status| {
            status.server_lsn = server;
            status.slot_lag_bytes = lag.max(0) as u64;
        });
    }
}

/// Why one record could not be applied.
enum ApplyError {
    /// The database refused it (or it cannot be mapped): to quarantine.
    Refused(String),
    /// The connection failed: the session restarts.
    Connection(String),
}

impl ApplyError {
    fn from_sql(doing: &str, error: &tokio_postgres::Error) -> ApplyError {
        match error.as_db_error() {
            Some(database) => {
                let class = &database.code().code()[..2];
                // 22: data exception, 23: integrity constraint, 42: a column or type problem.
                if matches!(class, "22" | "23" | "42") {
                    return ApplyError::Refused(format!(
                        "{doing}: {} ({})",
                        database.message(),
                        database.code().code()
                    ));
                }
                ApplyError::Connection(sql_error(doing, error))
            }
            None => ApplyError::Connection(sql_error(doing, error)),
        }
    }
}

/// Follows the node's feed and applies changed records to the tables.
async fn apply(
    shared: &Shared,
    mut sql: Client,
    retries: &mut mpsc::Receiver<Retry>,
    captured: watch::Receiver<u64>,
    mut applied_feed: u64,
) -> Result<(), String> {
    let mut feed = shared.engine.feed.clone();
    loop {
        while let Ok(retry) = retries.try_recv() {
            retry_one(shared, &mut sql, retry).await?;
        }
        let after = applied_feed;
        let page = shared.engine.call(move |engine| engine.feed_page(after, FEED_PAGE)).await;
        let events = match page.map_err(|error| error.to_string())? {
            Ok(events) => events,
            Err(EngineError::FeedTrimmed { floor, .. }) => {
                tracing::warn!(
                    connector = %shared.definition.name,
                    applied_feed,
                    floor,
                    "the feed was trimmed past this connector's position; resyncing the tables from the records"
                );
                applied_feed = resync(shared, &mut sql, &captured).await?;
                shared
                    .store
                    .save_apply(&shared.definition.name, applied_feed)
                    .await
                    .map_err(|error| error.to_string())?;
                update_status(&shared.status, |status| {
                    status.applied_feed = applied_feed;
                    status.resyncs += 1;
                });
                continue;
            }
            Err(error) => return Err(error.to_string()),
        };
        let Some(last) = events.last().map(|event| event.sequence) else {
            tokio::select! {
                changed = feed.changed() => if changed.is_err() { return Err("the node is stopping".into()) },
                Some(retry) = retries.recv() => retry_one(shared, &mut sql, retry).await?,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        };
        // The latest event per record: its value is the record's value now.
        let mut latest: BTreeMap<(String, String), Option<Map<String, Value>>> = BTreeMap::new();
        for event in events {
            if event.kind == "text" {
                continue;
            }
            if let Some(damage) = &event.damage {
                // Nothing is known of the record's value: its row stays as it is.
                tracing::warn!(
                    connector = %shared.definition.name,
                    sequence = event.sequence,
                    collection = %event.collection,
                    id = %event.id,
                    reason = %damage.reason,
                    "skipping a damaged feed event"
                );
                update_status(&shared.status, |status| status.damaged_events_skipped += 1);
                continue;
            }
            let value = match event.value {
                Some(Value::Object(map)) if !event.deleted => Some(map),
                _ => None,
            };
            latest.insert((event.collection, event.id), value);
        }
        apply_records(shared, &mut sql, &captured, latest).await?;
        applied_feed = last;
        shared.store.save_apply(&shared.definition.name, last).await.map_err(|error| error.to_string())?;
        update_status(&shared.status, |status| status.applied_feed = last);
    }
}

/// Makes the rows of mapped collections hold `records` (collection and id to the value now,
/// `None` for deleted): after the capture has caught up, each row that differs is written, and
/// one the database refuses goes to the quarantine.
async fn apply_records(
    shared: &Shared,
    sql: &mut Client,
    captured: &watch::Receiver<u64>,
    records: BTreeMap<(String, String), Option<Map<String, Value>>>,
) -> Result<(), String> {
    let records: Vec<_> = records
        .into_iter()
        .filter_map(|((collection, id), value)| {
            shared.table_of_collection(&collection).map(|table| (table, collection, id, value))
        })
        .collect();
    if records.is_empty() {
        return Ok(());
    }
    wait_for_capture(sql, &shared.node, captured).await;
    let checks = futures::future::join_all(
        records.iter().map(|(table, _, id, value)| needs_write(sql, table, id, value.as_ref())),
    )
    .await;
    for ((table, collection, id, value), check) in records.iter().zip(checks) {
        let result = match check {
            Ok(true) => write_record(shared, sql, table, id, value.as_ref()).await,
            other => other,
        };
        match result {
            Ok(wrote) => {
                if wrote {
                    update_status(&shared.status, |status| status.rows_applied += 1);
                }
            }
            Err(ApplyError::Refused(reason)) => quarantine(shared, collection, id, reason).await?,
            Err(ApplyError::Connection(error)) => return Err(error),
        }
    }
    Ok(())
}

/// Brings the tables up to the records when the feed no longer holds the events after the
/// apply's position (retention trimmed them): every live record of a mapped collection is
/// applied, then every row whose record is deleted here is deleted. A page at a time on both
/// sides, so memory stays bounded. Returns the feed position to follow from: the feed's last
/// sequence before the pass began, so whatever changes during the pass comes again as events.
/// A row with no record here at all is left alone: it is the capture's to bring in.
async fn resync(shared: &Shared, sql: &mut Client, captured: &watch::Receiver<u64>) -> Result<u64, String> {
    let resume = shared.engine.call(|engine| engine.feed_bounds().sequence).await.map_err(|error| error.to_string())?;
    for table in shared.tables.iter() {
        let collection = table.collection.clone();
        let mut after: Option<String> = None;
        loop {
            let (name, from) = (collection.clone(), after.clone());
            let page = shared
                .engine
                .call(move |engine| engine.list_records(&name, "", from.as_deref(), ROWS_PER_WRITE))
                .await
                .map_err(|error| error.to_string())?
                .map_err(|error| error.to_string())?;
            let records = page
                .records
                .into_iter()
                .map(|read| ((collection.clone(), read.key.id().to_owned()), read.view.value))
                .collect();
            apply_records(shared, sql, captured, records).await?;
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        delete_rows_of_deleted_records(shared, sql, captured, table).await?;
    }
    Ok(resume)
}

/// Deletes the rows of `table` whose records are deleted in the node, reading the keys through
/// a cursor a page at a time (`WITH HOLD`, so the rows can be written between fetches).
async fn delete_rows_of_deleted_records(
    shared: &Shared,
    sql: &mut Client,
    captured: &watch::Receiver<u64>,
    table: &Table,
) -> Result<(), String> {
    let keys: Vec<String> =
        table.key.iter().map(|&index| format!("{}::text", quote(&table.columns[index].name))).collect();
    sql.batch_execute(&format!(
        "DECLARE concord_resync NO SCROLL CURSOR WITH HOLD FOR SELECT {} FROM {}",
        keys.join(", "),
        table.name.quoted()
    ))
    .await
    .map_err(|error| sql_error("opening a resync cursor", &error))?;
    let result: Result<(), String> = async {
        loop {
            let messages = sql
                .simple_query(&format!("FETCH {ROWS_PER_WRITE} FROM concord_resync"))
                .await
                .map_err(|error| sql_error("reading row keys", &error))?;
            let mut ids = Vec::new();
            for message in &messages {
                let tokio_postgres::SimpleQueryMessage::Row(row) = message else { continue };
                let parts: Option<Vec<&str>> = (0..keys.len()).map(|index| row.get(index)).collect();
                if let Some(parts) = parts {
                    ids.push(encode_id(&parts));
                }
            }
            if messages.iter().all(|message| !matches!(message, tokio_postgres::SimpleQueryMessage::Row(_))) {
                return Ok(());
            }
            let collection = table.collection.clone();
            let deleted = shared
                .engine
                .call(move |engine| {
                    let mut deleted = BTreeMap::new();
                    for id in ids {
                        let Ok(key) = RecordKey::new(&collection, &id) else { continue };
                        if engine.record_deleted(&key)? {
                            deleted.insert((collection.clone(), id), None);
                        }
                    }
                    Ok::<_, EngineError>(deleted)
                })
                .await
                .map_err(|error| error.to_string())?
                .map_err(|error| error.to_string())?;
            apply_records(shared, sql, captured, deleted).await?;
        }
    }
    .await;
    let closed = sql.batch_execute("CLOSE concord_resync").await;
    result?;
    closed.map_err(|error| sql_error("closing the resync cursor", &error))
}

/// Commits a sync message and waits (a bounded time) until the capture has read it, so every
/// transaction committed before now has been captured and the rows compared next are no newer
/// than the records. (Waiting for `pg_current_wal_lsn()` instead stalls: WAL that belongs to no
/// transaction moves it past the last commit the stream reports, until a keepalive.)
async fn wait_for_capture(sql: &mut Client, node: &str, captured: &watch::Receiver<u64>) {
    // In a transaction committed synchronously, so the server flushes it and the stream carries
    // it at once (a message outside a transaction waits for the WAL writer, up to
    // `wal_writer_delay`, before the stream can send it).
    let Ok(transaction) = sql.transaction().await else { return };
    let _ = transaction.batch_execute("SET LOCAL synchronous_commit = on").await;
    let Ok(row) = transaction
        .query_one("SELECT pg_logical_emit_message(true, $1::text, $2::text)::text", &[&SYNC_PREFIX, &node])
        .await
    else {
        return;
    };
    if transaction.commit().await.is_err() {
        return;
    }
    let Ok(target) = Lsn::parse(row.get::<_, &str>(0)) else { return };
    let mut captured = captured.clone();
    let _ = tokio::time::timeout(CAPTURE_WAIT, captured.wait_for(|lsn| *lsn >= target.0)).await;
}

/// Whether the row differs from the record, by a plain read: most records the feed brings
/// already equal their rows (the capture wrote them, or the apply did), and this settles those
/// in one query, which the apply sends for a whole page at once (tokio-postgres pipelines the
/// queries in flight on one connection).
async fn needs_write(
    sql: &Client,
    table: &Table,
    id: &str,
    value: Option<&Map<String, Value>>,
) -> Result<bool, ApplyError> {
    let query = RowQuery::new(table, id)?;
    let row = sql
        .query_opt(&query.select, &as_parameters(&query.key_parameters))
        .await
        .map_err(|error| ApplyError::from_sql("reading the row", &error))?;
    Ok(plan_write(table, &query.key, &query.condition, row.as_ref(), value)?.is_some())
}

/// How to find a record's row: its key texts, the condition on the primary key and the read of
/// the row's columns as text.
struct RowQuery {
    key: Vec<String>,
    key_parameters: Vec<Option<String>>,
    condition: String,
    select: String,
}

impl RowQuery {
    fn new(table: &Table, id: &str) -> Result<RowQuery, ApplyError> {
        let key = decode_id(id, table.key.len()).map_err(ApplyError::Refused)?;
        let key_parameters = key.iter().cloned().map(Some).collect();
        let condition = key_condition(table, 1);
        let select = format!("SELECT {} FROM {} WHERE {condition}", table.column_list(true), table.name.quoted());
        Ok(RowQuery { key, key_parameters, condition, select })
    }
}

/// Reads the row again under a lock, in a transaction tagged as the connector's, and writes the
/// columns that differ. Returns whether the row changed.
async fn write_record(
    shared: &Shared,
    sql: &mut Client,
    table: &Table,
    id: &str,
    value: Option<&Map<String, Value>>,
) -> Result<bool, ApplyError> {
    let query = RowQuery::new(table, id)?;
    let select = format!("{} FOR UPDATE", query.select);
    let transaction = sql.transaction().await.map_err(|error| ApplyError::from_sql("BEGIN", &error))?;
    // The tag and the locked read go out together (pipelined), the tag first.
    let tag: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&ECHO_PREFIX, &shared.node];
    let read = as_parameters(&query.key_parameters);
    let (tagged, row) = tokio::join!(
        transaction.execute("SELECT pg_logical_emit_message(true, $1::text, $2::text)", &tag),
        transaction.query_opt(&select, &read),
    );
    tagged.map_err(|error| ApplyError::from_sql("tagging the transaction", &error))?;
    let row = row.map_err(|error| ApplyError::from_sql("reading the row", &error))?;
    let Some((statement, parameters)) = plan_write(table, &query.key, &query.condition, row.as_ref(), value)? else {
        // It changed in between to what the record says: nothing to write.
        let _ = transaction.rollback().await;
        return Ok(false);
    };
    transaction
        .execute(&statement, &as_parameters(&parameters))
        .await
        .map_err(|error| ApplyError::from_sql("writing the row", &error))?;
    transaction.commit().await.map_err(|error| ApplyError::from_sql("COMMIT", &error))?;
    Ok(true)
}

/// A statement and its text parameters (`None`: NULL).
type Write = (String, Vec<Option<String>>);

/// The statement (and its parameters) that makes `row` (text columns in table order) hold
/// `value` (`None`: deleted), writing only the columns that differ; `None` if nothing differs.
fn plan_write(
    table: &Table,
    key: &[String],
    condition: &str,
    row: Option<&tokio_postgres::Row>,
    value: Option<&Map<String, Value>>,
) -> Result<Option<Write>, ApplyError> {
    let mut parameters: Vec<Option<String>> = key.iter().cloned().map(Some).collect();
    let statement = match (row, value) {
        (None, None) => None,
        (Some(_), None) => Some(format!("DELETE FROM {} WHERE {condition}", table.name.quoted())),
        (None, Some(value)) => {
            let mut columns = Vec::new();
            let mut placeholders = Vec::new();
            let mut inserted = Vec::new();
            for (index, column) in table.columns.iter().enumerate() {
                let text = match table.key.iter().position(|&key_index| key_index == index) {
                    Some(position) => Some(key[position].clone()),
                    None => match value.get(&column.name) {
                        Some(field) => values::to_sql_text(column.type_oid, field)
                            .map_err(|error| ApplyError::Refused(format!("column {:?}: {error}", column.name)))?,
                        None => continue,
                    },
                };
                inserted.push(text);
                columns.push(quote(&column.name));
                placeholders.push(format!("${}::text::{}", inserted.len(), column.type_name));
            }
            parameters = inserted;
            Some(format!(
                "INSERT INTO {} ({}) VALUES ({})",
                table.name.quoted(),
                columns.join(", "),
                placeholders.join(", ")
            ))
        }
        (Some(row), Some(value)) => {
            let mut assignments = Vec::new();
            for (index, column) in table.columns.iter().enumerate() {
                if table.key.contains(&index) {
                    continue;
                }
                let Some(field) = value.get(&column.name) else { continue };
                let current: Option<&str> = row.get(index);
                let current_value = match current {
                    None => Value::Null,
                    Some(text) => values::to_record_value(column.type_oid, text).unwrap_or(Value::Null),
                };
                if &current_value == field {
                    continue;
                }
                let text = values::to_sql_text(column.type_oid, field)
                    .map_err(|error| ApplyError::Refused(format!("column {:?}: {error}", column.name)))?;
                parameters.push(text);
                assignments.push(format!(
                    "{} = ${}::text::{}",
                    quote(&column.name),
                    parameters.len(),
                    column.type_name
                ));
            }
            (!assignments.is_empty())
                .then(|| format!("UPDATE {} SET {} WHERE {condition}", table.name.quoted(), assignments.join(", ")))
        }
    };
    Ok(statement.map(|statement| (statement, parameters)))
}

/// `"k1" = $start::text::type AND ...` for the primary key.
fn key_condition(table: &Table, start: usize) -> String {
    let parts: Vec<String> = table
        .key
        .iter()
        .enumerate()
        .map(|(position, &index)| {
            let column = &table.columns[index];
            format!("{} = ${}::text::{}", quote(&column.name), start + position, column.type_name)
        })
        .collect();
    parts.join(" AND ")
}

fn as_parameters(parameters: &[Option<String>]) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    parameters.iter().map(|parameter| parameter as &(dyn tokio_postgres::types::ToSql + Sync)).collect()
}

/// Puts a refused apply in the node's quarantine.
async fn quarantine(shared: &Shared, collection: &str, id: &str, reason: String) -> Result<(), String> {
    tracing::warn!(connector = %shared.definition.name, collection, id, %reason, "the database refused a record; quarantined");
    update_status(&shared.status, |status| {
        status.apply_errors += 1;
        status.last_error = Some(format!("apply {collection}/{id}: {reason}"));
    });
    let (connector, collection, id) = (shared.definition.name.clone(), collection.to_owned(), id.to_owned());
    shared
        .engine
        .call(move |engine| engine.quarantine_connector_apply(&connector, &collection, &id, reason))
        .await
        .map_err(|error| error.to_string())
}

/// Applies a quarantined record again (after a fix in the database); on success the entry
/// leaves the quarantine, else it keeps the new reason.
async fn retry_one(shared: &Shared, sql: &mut Client, retry: Retry) -> Result<(), String> {
    let Some(table) = shared.table_of_collection(&retry.collection) else { return Ok(()) };
    let key = RecordKey::new(&retry.collection, &retry.id).map_err(|error| error.to_string())?;
    let value = shared
        .engine
        .call(move |engine| engine.read_record(key))
        .await
        .map_err(|error| error.to_string())?
        .map_err(|error| error.to_string())?
        .and_then(|read| read.view.value);
    let outcome = match write_record(shared, sql, table, &retry.id, value.as_ref()).await {
        Ok(_) => Ok(()),
        Err(ApplyError::Refused(reason)) => Err(reason),
        Err(ApplyError::Connection(error)) => return Err(error),
    };
    let id = retry.quarantine_id;
    shared
        .engine
        .call(move |engine| engine.finish_connector_retry(id, outcome))
        .await
        .map_err(|error| error.to_string())?
        .map_err(|error| error.to_string())
}

/// Drops a removed connector's replication slot.
pub(crate) async fn drop_slot(definition: &ConnectorDefinition) -> Result<(), String> {
    let sql = connect(&definition.dsn).await?;
    // The stopped connector's walsender may still hold the slot for a moment after its
    // connection closed (SQLSTATE 55006, object in use): try again for a few seconds.
    let started = std::time::Instant::now();
    loop {
        let result = sql
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                &[&definition.slot()],
            )
            .await;
        match result {
            Ok(_) => return Ok(()),
            Err(error)
                if error.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE)
                    && started.elapsed() < SLOT_RELEASE_WAIT =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => return Err(sql_error("dropping the slot", &error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_ids_round_trip_through_primary_keys() {
        for parts in [vec!["42"], vec!["a,b", "c/d%e"], vec!["", "x"], vec!["line\nbreak"]] {
            let id = encode_id(&parts);
            assert!(!id.contains('/') && !id.chars().any(char::is_control), "{id}");
            assert_eq!(decode_id(&id, parts.len()).unwrap(), parts);
        }
        assert!(decode_id("a,b", 1).is_err());
        assert!(decode_id("%zz", 1).is_err());
        assert!(decode_id("%", 1).is_err());
    }

    #[test]
    fn table_names_are_plain_identifiers() {
        assert_eq!(TableName::parse("orders").unwrap(), TableName { schema: "public".into(), table: "orders".into() });
        assert_eq!(TableName::parse("shop.orders").unwrap().quoted(), "\"shop\".\"orders\"");
        for bad in ["", "a.b.c", "drop table\"", "a.", ".b"] {
            assert!(TableName::parse(bad).is_err(), "{bad}");
        }
    }
}
