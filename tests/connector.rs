//! The PostgreSQL connector end to end: two sites, each a real PostgreSQL 15 (started by
//! `support::postgres`) and a real `concord` node, the nodes peers over QUIC on loopback, each
//! node with a connector to its own database. Rows flow both ways, merge by the collection's
//! policies, survive restarts and offline spells, never echo, and rows one database refuses go
//! to quarantine while the rest flows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use support::cluster::{certificates, free_udp_port, peer_address, start_peer_listening};
use support::postgres::Postgres;
use support::relay::Relay;
use support::{Node, temporary_directory};

/// Hang guard for anything the tests wait for (never a speed assertion).
const GUARD: Duration = Duration::from_secs(90);

const SCHEMA: &str = "CREATE TABLE customers (
    id integer PRIMARY KEY,
    name text NOT NULL,
    city text,
    score numeric(10, 2),
    tags text[],
    profile jsonb,
    active boolean,
    since timestamptz
)";

/// The collection's definition: concurrent scores resolve to the highest.
const DEFINITION: &str = r#"{"fields": {"score": {"policy": "max", "type": "number", "nullable": true}}}"#;

/// Two sites: a database and a node each, the nodes peers (shop reaches hq through a relay the
/// tests can partition), a connector on each.
struct Sites {
    _root: tempfile::TempDir,
    databases: [Postgres; 2],
    nodes: [Node; 2],
    link: Relay,
}

impl Sites {
    /// Starts both sites with `setup` run on each database first (and `seed_a` on A's only,
    /// before its connector starts, so it arrives through the snapshot).
    async fn start(setup: &[&str], seed_a: &[&str]) -> Sites {
        let root = temporary_directory();
        let certs = root.path().join("certs");
        certificates(&certs, "test-cluster", &["hq", "shop"]);
        let (a, b) = tokio::join!(Postgres::start(), Postgres::start());
        for database in [&a, &b] {
            for statement in setup {
                database.execute(statement).await;
            }
        }
        for statement in seed_a {
            a.execute(statement).await;
        }
        // Fixed ports, so a node started again is where its peer last saw it.
        let hq_address = format!("127.0.0.1:{}", free_udp_port());
        let hq = start_peer_listening(root.path(), &certs, "hq", &hq_address, &[]).await;
        let link = Relay::start(peer_address(&hq).parse().unwrap()).await;
        let shop_address = format!("127.0.0.1:{}", free_udp_port());
        let shop = start_peer_listening(root.path(), &certs, "shop", &shop_address, &[link.address.to_string()]).await;
        let definition: Value = serde_json::from_str(DEFINITION).unwrap();
        let (status, answer) =
            hq.call(Method::PUT, "/v1/collections/customers/definition", Some(definition.clone())).await;
        assert_eq!(status, 200, "{answer}");
        // Both nodes resolve by the definition before any row arrives.
        let started = Instant::now();
        while shop.call(Method::GET, "/v1/collections/customers/definition", None).await.0 != 200 {
            assert!(started.elapsed() < GUARD, "the definition never reached shop");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let sites = Sites { _root: root, databases: [a, b], nodes: [hq, shop], link };
        for site in 0..2 {
            sites.add_connector(site).await;
        }
        sites
    }

    async fn add_connector(&self, site: usize) {
        add_connector(&self.nodes[site], &self.databases[site].dsn()).await;
    }

    /// Waits until the connector at `site` has captured at least `count` rows.
    async fn captured(&self, site: usize, count: u64) {
        let started = Instant::now();
        loop {
            let connector = self.connector(site).await;
            if connector["rows_captured"].as_u64().unwrap_or(0) >= count {
                return;
            }
            assert!(started.elapsed() < GUARD, "site {site} never captured {count} rows: {connector}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn connector(&self, site: usize) -> Value {
        let (status, answer) = self.nodes[site].call(Method::GET, "/v1/connectors/db", None).await;
        assert_eq!(status, 200, "{answer}");
        answer
    }

    /// Every row of `customers` at `site`, as text, ordered by id.
    async fn rows(&self, site: usize) -> Vec<Vec<Option<String>>> {
        self.databases[site]
            .query_strings("SELECT id, name, city, score, tags, profile, active, since FROM customers ORDER BY id")
            .await
    }

    /// Waits until both databases hold the same rows and `check` accepts them.
    async fn settle(&self, what: &str, check: impl Fn(&[Vec<Option<String>>]) -> bool) -> Vec<Vec<Option<String>>> {
        let started = Instant::now();
        loop {
            let (a, b) = (self.rows(0).await, self.rows(1).await);
            if a == b && check(&a) {
                return a;
            }
            if started.elapsed() > GUARD {
                panic!(
                    "{what}: the sites did not agree within {GUARD:?}\nA: {a:?}\nB: {b:?}\nconnector A: {}\nconnector B: {}",
                    self.connector(0).await,
                    self.connector(1).await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Adds the connector `db` that maps `public.customers` of the database at `dsn` to `customers`.
async fn add_connector(node: &Node, dsn: &str) {
    let (status, answer) = node
        .call(
            Method::POST,
            "/v1/connectors",
            Some(json!({
                "name": "db",
                "dsn": dsn,
                "tables": [{"table": "public.customers", "collection": "customers"}],
            })),
        )
        .await;
    assert_eq!(status, 201, "{answer}");
}

/// Waits until `collection` on `node` holds `count` records; returns them.
async fn records_in(node: &Node, collection: &str, count: usize) -> std::collections::BTreeMap<String, Value> {
    let started = Instant::now();
    loop {
        let records = node.list_all(collection).await;
        if records.len() == count {
            return records;
        }
        assert!(started.elapsed() < GUARD, "{collection}: {} of {count} records", records.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn row_with<'a>(rows: &'a [Vec<Option<String>>], id: &str) -> Option<&'a Vec<Option<String>>> {
    rows.iter().find(|row| row[0].as_deref() == Some(id))
}

fn text(row: &[Option<String>], column: usize) -> Option<&str> {
    row[column].as_deref()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sites_keep_a_table_in_agreement_both_ways_without_echo() {
    let sites = Sites::start(
        &[SCHEMA],
        &["INSERT INTO customers VALUES (1, 'Ada', 'London', 12.50, '{vip,\"early, bird\"}', '{\"tier\": 2}', true, '2026-01-02 03:04:05+00'),
                                        (2, 'Grace', NULL, NULL, NULL, NULL, NULL, NULL)"],
    )
    .await;

    // The snapshot of A's existing rows reaches B, every type intact.
    let rows = sites.settle("snapshot", |rows| rows.len() == 2).await;
    let ada = row_with(&rows, "1").unwrap();
    assert_eq!(text(ada, 3), Some("12.50"));
    assert_eq!(text(ada, 4), Some("{vip,\"early, bird\"}"));
    assert_eq!(text(ada, 5), Some("{\"tier\": 2}"));
    assert_eq!(text(ada, 6), Some("t"));
    assert_eq!(text(ada, 7), Some("2026-01-02 03:04:05+00"));
    let (status, record) = sites.nodes[1].get("customers", "1").await;
    assert_eq!(status, 200);
    assert_eq!(record["value"]["tags"], json!(["vip", "early, bird"]), "{record}");
    assert_eq!(record["value"]["profile"], json!({"tier": 2}));

    // Insert at A, update at B, delete at A: each reaches the other side.
    sites.databases[0].execute("INSERT INTO customers (id, name, city) VALUES (3, 'Linus', 'Helsinki')").await;
    sites.settle("insert at A", |rows| row_with(rows, "3").is_some()).await;
    sites.databases[1].execute("UPDATE customers SET city = 'Arlington', score = 99 WHERE id = 2").await;
    sites.settle("update at B", |rows| row_with(rows, "2").is_some_and(|row| text(row, 2) == Some("Arlington"))).await;
    sites.databases[0].execute("DELETE FROM customers WHERE id = 3").await;
    sites.settle("delete at A", |rows| row_with(rows, "3").is_none()).await;
    sites.databases[1].execute("UPDATE customers SET city = NULL WHERE id = 1").await;
    sites.settle("NULL at B", |rows| row_with(rows, "1").is_some_and(|row| text(row, 2).is_none())).await;

    // Concurrent updates while the sites cannot reach each other: different columns of one row
    // are both kept; the same column resolves by the collection's policy (max), on both
    // databases, and the conflict is in the ledger.
    sites.link.partition(true);
    let captured = [
        sites.connector(0).await["rows_captured"].as_u64().unwrap(),
        sites.connector(1).await["rows_captured"].as_u64().unwrap(),
    ];
    sites.databases[0].execute("UPDATE customers SET name = 'Ada Lovelace', score = 30 WHERE id = 1").await;
    sites.databases[1].execute("UPDATE customers SET city = 'Paris', score = 20 WHERE id = 1").await;
    sites.captured(0, captured[0] + 1).await;
    sites.captured(1, captured[1] + 1).await;
    assert_eq!(sites.nodes[1].get("customers", "1").await.1["value"]["name"], "Ada", "the partition holds");
    sites.link.partition(false);
    let rows = sites
        .settle("concurrent updates", |rows| {
            row_with(rows, "1").is_some_and(|row| {
                text(row, 1) == Some("Ada Lovelace") && text(row, 2) == Some("Paris") && text(row, 3) == Some("30.00")
            })
        })
        .await;
    assert_eq!(rows.len(), 2);
    let (_, ledger) = sites.nodes[1].call(Method::GET, "/v1/conflicts?collection=customers", None).await;
    let conflict = ledger["conflicts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|entry| entry["field"] == "/score")
        .unwrap_or_else(|| panic!("no ledger entry for the score: {ledger}"))
        .clone();
    assert!(conflict["policy"].to_string().contains("max"), "{conflict}");
    assert_eq!(conflict["winner"], 30, "{conflict}");

    // A paused connector applies nothing; resumed (through the CLI), it catches up.
    let (ok, stdout, stderr) = sites.nodes[1].cli(&["connector", "pause", "db"]);
    assert!(ok, "{stdout}{stderr}");
    sites.databases[0].execute("INSERT INTO customers (id, name) VALUES (4, 'Barbara')").await;
    let started = Instant::now();
    while sites.nodes[1].get("customers", "4").await.0 != 200 {
        assert!(started.elapsed() < GUARD, "row 4 never reached shop's node");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(row_with(&sites.rows(1).await, "4").is_none(), "a paused connector wrote to its database");
    assert_eq!(sites.connector(1).await["state"], "paused");
    let (ok, stdout, stderr) = sites.nodes[1].cli(&["connector", "resume", "db"]);
    assert!(ok, "{stdout}{stderr}");
    sites.settle("after resume", |rows| row_with(rows, "4").is_some()).await;
    let (ok, stdout, stderr) = sites.nodes[1].cli(&["connector", "status", "db"]);
    assert!(ok && stdout.contains("streaming"), "{stdout}{stderr}");

    // No echo: once settled, the rows' versions stay where they are and no transaction writes
    // anything (the next transaction id stays put; the WAL position is no measure, since the
    // server writes background records such as running-transaction snapshots on its own).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let databases = &sites.databases;
    let versions = |site: usize| async move {
        let database = &databases[site];
        let rows = database.query_strings("SELECT id, xmin::text FROM customers ORDER BY id").await;
        let next = database.query_strings("SELECT pg_snapshot_xmax(pg_current_snapshot())::text").await;
        (rows, next)
    };
    let before = (versions(0).await, versions(1).await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = (versions(0).await, versions(1).await);
    assert_eq!(before, after, "rows changed or a transaction wrote after the sites settled: an echo");
    for site in 0..2 {
        let connector = sites.connector(site).await;
        assert_eq!(connector["state"], "streaming", "{connector}");
        assert!(connector["echoes_skipped"].as_u64().unwrap() > 0, "the capture never saw its own writes: {connector}");
        assert_eq!(connector["apply_errors"], 0, "{connector}");
    }
    let metrics = sites.nodes[0].metrics().await;
    assert!(metrics.contains("concord_connector_rows_captured_total{connector=\"db\"}"), "{metrics}");
    assert!(metrics.contains("concord_connector_slot_lag_bytes{connector=\"db\"}"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_other_database_refuses_is_quarantined_and_the_rest_flows() {
    let sites = Sites::start(&[SCHEMA], &[]).await;
    // Only B refuses negative scores.
    sites.databases[1].execute("ALTER TABLE customers ADD CONSTRAINT score_positive CHECK (score >= 0)").await;
    sites.databases[0].execute("INSERT INTO customers (id, name, score) VALUES (10, 'negative', -5)").await;
    sites.databases[0].execute("INSERT INTO customers (id, name, score) VALUES (11, 'fine', 5)").await;
    let started = Instant::now();
    let entry = loop {
        let (_, page) = sites.nodes[1].call(Method::GET, "/v1/quarantine", None).await;
        if let Some(entry) = page["entries"].as_array().and_then(|entries| entries.first()).cloned() {
            break entry;
        }
        assert!(started.elapsed() < GUARD, "nothing reached the quarantine: {page} {}", sites.connector(1).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(entry["connector"], "db", "{entry}");
    assert_eq!(entry["record"], "10", "{entry}");
    assert!(entry["reason"].as_str().unwrap().contains("score_positive"), "{entry}");
    // The rest kept flowing.
    let started = Instant::now();
    while row_with(&sites.rows(1).await, "11").is_none() {
        assert!(started.elapsed() < GUARD, "row 11 never reached B");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(row_with(&sites.rows(1).await, "10").is_none());
    assert_eq!(sites.connector(1).await["apply_errors"], 1);

    // Fixed at B, retried through the CLI: the row arrives and the entry leaves.
    sites.databases[1].execute("ALTER TABLE customers DROP CONSTRAINT score_positive").await;
    let id = entry["id"].to_string();
    let (ok, stdout, stderr) = sites.nodes[1].cli(&["quarantine", "retry", &id]);
    assert!(ok, "{stdout}{stderr}");
    sites.settle("after the retry", |rows| rows.len() == 2).await;
    let started = Instant::now();
    loop {
        let (_, page) = sites.nodes[1].call(Method::GET, "/v1/quarantine", None).await;
        if page["entries"].as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(started.elapsed() < GUARD, "the entry stayed: {page}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_offline_and_restarted_mid_stream_catches_up_both_ways_without_loss_or_duplicates() {
    let mut sites = Sites::start(&[SCHEMA], &[]).await;
    // A stream of small transactions at A while B's node is killed and started again.
    let writer = {
        let dsn = sites.databases[0].dsn();
        tokio::spawn(async move {
            let (client, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(connection);
            for id in 100..400 {
                client
                    .execute("INSERT INTO customers (id, name, score) VALUES ($1, 'bulk', $1::int)", &[&id])
                    .await
                    .unwrap();
                if id % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    sites.nodes[1].kill();
    // While B's node is down, both databases change.
    sites.databases[1].execute("INSERT INTO customers (id, name) VALUES (1000, 'written at B offline')").await;
    writer.await.unwrap();
    sites.databases[0].execute("UPDATE customers SET name = 'edited at A' WHERE id = 150").await;
    // A's node restarts too, mid-stream.
    sites.nodes[0].kill();
    sites.databases[0].execute("UPDATE customers SET city = 'Oslo' WHERE id = 200").await;
    sites.nodes[0].start_again().await;
    sites.nodes[1].start_again().await;
    let rows = sites
        .settle("after the restarts", |rows| {
            rows.len() == 301
                && row_with(rows, "150").is_some_and(|row| text(row, 1) == Some("edited at A"))
                && row_with(rows, "200").is_some_and(|row| text(row, 2) == Some("Oslo"))
        })
        .await;
    assert!(row_with(&rows, "1000").is_some());
    // Nothing duplicated: each node holds exactly one record per row.
    for node in &sites.nodes {
        let records = node.list_all("customers").await;
        assert_eq!(records.len(), 301, "{:?}", records.keys().take(5).collect::<Vec<_>>());
    }
}

/// One site, driven the way an operator would: a connector declared in the config file loads a
/// table of existing rows, a second one is added with `concord connector add` (which waits for
/// its snapshot), `ls` and `status` show them, `remove --drop-slot` takes one away with its
/// slot, and after a restart the configured one resumes streaming without a second snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connectors_from_the_config_file_and_the_cli_load_snapshots_and_are_removed_with_their_slots() {
    const ROWS: usize = 1_200;
    let database = Postgres::start().await;
    database.execute(SCHEMA).await;
    database
        .execute(&format!(
            "INSERT INTO customers (id, name, score, active) \
             SELECT n, 'customer ' || n, n / 4.0, n % 2 = 0 FROM generate_series(1, {ROWS}) AS n"
        ))
        .await;
    let root = temporary_directory();
    let config = root.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "[[connectors]]\nname = \"configured\"\ndsn = \"{}\"\ntables = [{{ table = \"public.customers\", collection = \"customers\" }}]\n",
            database.dsn()
        ),
    )
    .unwrap();
    let mut node = Node::start_with(&root.path().join("node"), &["--config", config.to_str().unwrap()]).await;
    let records = records_in(&node, "customers", ROWS).await;
    assert_eq!(records["7"]["score"], json!(1.75), "{}", records["7"]);
    assert_eq!(records["7"]["active"], json!(false));

    let dsn = database.dsn();
    let (ok, stdout, stderr) =
        node.cli(&["connector", "add", "mirror", "--dsn", &dsn, "--table", "public.customers=mirror"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("streaming"), "add returns once the snapshot is loaded: {stdout}");
    let (_, status) = node.call(Method::GET, "/v1/connectors/mirror", None).await;
    assert_eq!(status["snapshot_rows_total"], ROWS, "{status}");
    assert_eq!(status["snapshot_rows_loaded"], ROWS, "{status}");
    records_in(&node, "mirror", ROWS).await;

    let (ok, stdout, stderr) = node.cli(&["connector", "ls"]);
    assert!(ok && stdout.contains("configured") && stdout.contains("mirror"), "{stdout}{stderr}");
    let (ok, stdout, stderr) = node.cli(&["connector", "status", "configured"]);
    assert!(ok && stdout.contains("streaming"), "{stdout}{stderr}");
    let slots = || database.query_strings("SELECT slot_name FROM pg_replication_slots ORDER BY slot_name");
    assert_eq!(slots().await, [[Some("concord_configured".to_owned())], [Some("concord_mirror".to_owned())]]);

    let (ok, stdout, stderr) = node.cli(&["connector", "remove", "mirror", "--drop-slot"]);
    assert!(ok, "{stdout}{stderr}");
    assert_eq!(slots().await, [[Some("concord_configured".to_owned())]]);
    let (status, _) = node.call(Method::GET, "/v1/connectors/mirror", None).await;
    assert_eq!(status, 404);
    // A definition the node refuses is a clear 400, not a connector that fails later.
    let (status, answer) =
        node.call(Method::POST, "/v1/connectors", Some(json!({"name": "bad", "dsn": dsn, "tables": []}))).await;
    assert_eq!(status, 422, "{answer}");
    assert!(answer.to_string().contains("1 to 256 tables"), "{answer}");
    // At most 32 connectors per node (these point at a closed port and retry with backoff).
    for index in 1..32 {
        let definition = json!({
            "name": format!("idle-{index}"),
            "dsn": "host=127.0.0.1 port=1 user=postgres dbname=postgres",
            "tables": [{"table": "customers", "collection": "customers"}],
        });
        let (status, answer) = node.call(Method::POST, "/v1/connectors", Some(definition)).await;
        assert_eq!(status, 201, "connector {index}: {answer}");
    }
    let definition = json!({
        "name": "one-too-many",
        "dsn": dsn,
        "tables": [{"table": "customers", "collection": "customers"}],
    });
    let (status, answer) = node.call(Method::POST, "/v1/connectors", Some(definition)).await;
    assert_eq!(status, 409, "{answer}");
    for index in 1..32 {
        let (status, answer) = node.call(Method::DELETE, &format!("/v1/connectors/idle-{index}"), None).await;
        assert_eq!(status, 200, "{answer}");
    }

    // Restarted, the configured connector resumes from its checkpoint: no second snapshot.
    node.restart().await;
    database.execute("INSERT INTO customers (id, name) VALUES (5000, 'after the restart')").await;
    records_in(&node, "customers", ROWS + 1).await;
    let (_, status) = node.call(Method::GET, "/v1/connectors/configured", None).await;
    assert_eq!(status["state"], "streaming", "{status}");
    assert_eq!(status["snapshot_rows_loaded"], 0, "a second snapshot ran: {status}");
    assert_eq!(status["rows_captured"], 1, "{status}");
}

/// The connector's three rates on one site, printed for BENCHMARKS.md (never asserted: the
/// assertions are that every row arrives): the initial snapshot, the capture of one large
/// transaction, and the apply of records written through the API. `CONCORD_CONNECTOR_ROWS`
/// sets the row count (default 2,000; BENCHMARKS.md used 100,000 in a release build).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_capture_and_apply_rates() {
    let rows: usize = std::env::var("CONCORD_CONNECTOR_ROWS").ok().and_then(|rows| rows.parse().ok()).unwrap_or(2_000);
    let database = Postgres::start().await;
    database.execute(SCHEMA).await;
    let insert = |from: usize, to: usize| {
        format!(
            "INSERT INTO customers (id, name, city, score, active) \
             SELECT n, 'customer ' || n, 'city ' || (n % 100), n / 4.0, n % 2 = 0 FROM generate_series({from}, {to}) AS n"
        )
    };
    database.execute(&insert(1, rows)).await;
    let root = temporary_directory();
    let node = Node::start(&root.path().join("node")).await;

    let started = Instant::now();
    let definition = json!({
        "name": "db",
        "dsn": database.dsn(),
        "tables": [{"table": "public.customers", "collection": "customers"}],
    });
    let (status, answer) = node.call(Method::POST, "/v1/connectors", Some(definition)).await;
    assert_eq!(status, 201, "{answer}");
    loop {
        let (_, connector) = node.call(Method::GET, "/v1/connectors/db", None).await;
        if connector["state"] == "streaming" {
            assert_eq!(connector["snapshot_rows_loaded"], rows, "{connector}");
            break;
        }
        assert!(started.elapsed() < GUARD * 10, "no snapshot: {connector}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let snapshot = started.elapsed();

    let started = Instant::now();
    database.execute(&insert(rows + 1, 2 * rows)).await;
    let captured = loop {
        let (_, connector) = node.call(Method::GET, "/v1/connectors/db", None).await;
        if connector["rows_captured"].as_u64().unwrap() >= (2 * rows) as u64 {
            break started.elapsed();
        }
        assert!(started.elapsed() < GUARD * 10, "capture stalled: {connector}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    let started = Instant::now();
    for chunk in (2 * rows + 1..=3 * rows).collect::<Vec<_>>().chunks(1_000) {
        let writes: Vec<Value> = chunk
            .iter()
            .map(|id| json!({"op": "put", "collection": "customers", "id": id.to_string(), "value": {"id": id, "name": format!("written at the node {id}"), "active": true}}))
            .collect();
        let (status, answer) = node.call(Method::POST, "/v1/batch", Some(Value::Array(writes))).await;
        assert_eq!(status, 200, "{answer}");
    }
    let written = started.elapsed();
    let applied = loop {
        let count = database.query_strings("SELECT count(*) FROM customers").await;
        if count[0][0].as_deref() == Some((3 * rows).to_string().as_str()) {
            break started.elapsed();
        }
        assert!(started.elapsed() < GUARD * 10, "apply stalled: {count:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (_, connector) = node.call(Method::GET, "/v1/connectors/db", None).await;
    assert_eq!(connector["rows_applied"], rows, "{connector}");
    assert_eq!(connector["apply_errors"], 0, "{connector}");
    let rate = |elapsed: Duration| rows as f64 / elapsed.as_secs_f64();
    eprintln!(
        "connector rates, {rows} rows each: snapshot {:.0} rows/s ({snapshot:.2?}), capture of one transaction {:.0} rows/s ({captured:.2?}), apply {:.0} rows/s ({applied:.2?}; the API took the writes in {written:.2?})",
        rate(snapshot),
        rate(captured),
        rate(applied)
    );
}

/// Every mapped type, with the values that trip mappings up (NaN and infinities, digits a double
/// cannot hold, quotes and backslashes inside arrays, NULL elements, empty strings, a second
/// array dimension), written at A reaches B's database with the same text. (`json`, unlike
/// `jsonb`, keeps its input text; the mapping keeps its value, so it is not in the list; and a
/// jsonb JSON `null` is a `null` field like SQL NULL, so it arrives as SQL NULL.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mapped_type_reaches_the_other_database_unchanged() {
    const TYPES: &str = "CREATE TABLE customers (
        id bigint PRIMARY KEY,
        small smallint, real_number real, double_number double precision,
        exact numeric, money_like numeric(12, 2), flag boolean,
        note text, short varchar(10), code char(3), external uuid,
        day date, moment timestamp, instant timestamptz, clock time, span interval, raw bytea,
        document jsonb, numbers integer[], words text[], keys uuid[], documents jsonb[],
        prices numeric[], flags boolean[], doubles double precision[], grid integer[][]
    )";
    const COLUMNS: &str = "id, small, real_number, double_number, exact, money_like, flag, note, short, code, \
        external, day, moment, instant, clock, span, raw, document, numbers, words, keys, documents, prices, \
        flags, doubles, grid";
    let sites = Sites::start(&[TYPES], &[]).await;
    let rows = [
        "(1, -32768, 'NaN', 'Infinity', 3.14159265358979323846264338327950288, 12.30, true,
          'quote '' backslash \\ tab\t unicode ☕ Zürich', 'ten chars.', 'ab', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
          '2026-11-23', '2026-11-23 10:11:12.345678', '2026-11-23 10:11:12+02', '23:59:59.999', '1 year 2 mons 3 days 04:05:06',
          '\\xdeadbeef00', '{\"nested\": {\"list\": [1, 2.5, null, true, \"x\"]}, \"empty\": {}}',
          '{1,NULL,-3}', ARRAY['plain', 'with space', 'with,comma', 'with \"quote\"', 'back\\slash', 'NULL', '', NULL],
          '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}', ARRAY['{\"a\": 1}'::jsonb, '[1, 2]'::jsonb, NULL],
          '{1.5,123456789012345678901234567890.5,NaN}', '{t,f,NULL}', '{NaN,-Infinity,1e300,-0}', '{{1,2},{3,4}}')",
        // (An unconstrained numeric keeps its value, not its trailing zeros: 0.000 would arrive
        // as 0, as the README says; numeric(12, 2) keeps its scale.)
        "(2, 0, -0, 1e-300, 0, 0, false, '', '', '', NULL, 'infinity', '-infinity', 'epoch', '00:00', '0',
          '\\x', '\"just a string\"', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}')",
        "(9223372036854775807, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
          NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
    ];
    for row in rows {
        sites.databases[0].execute(&format!("INSERT INTO customers ({COLUMNS}) VALUES {row}")).await;
    }
    let select = format!("SELECT {COLUMNS} FROM customers ORDER BY id");
    let started = Instant::now();
    let expected = sites.databases[0].query_strings(&select).await;
    loop {
        let arrived = sites.databases[1].query_strings(&select).await;
        if arrived.len() == expected.len() {
            for (expected, arrived) in expected.iter().zip(&arrived) {
                for (column, (expected, arrived)) in COLUMNS.split(", ").zip(expected.iter().zip(arrived)) {
                    assert_eq!(expected, arrived, "column {column} of row {:?}", expected);
                }
            }
            break;
        }
        assert!(
            started.elapsed() < GUARD,
            "B has {} of {} rows: {}",
            arrived.len(),
            expected.len(),
            sites.connector(1).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connector = sites.connector(1).await;
    assert_eq!(connector["apply_errors"], 0, "{connector}");
    assert_eq!(sites.connector(0).await["capture_errors"], 0);
}

/// A connector paused for longer than the node's feed retention finds the feed trimmed past its
/// position when it resumes. It resyncs the table from the records instead of stalling or
/// skipping what it missed: a changed row is updated, a deleted record's row deleted, a new one
/// inserted, and it then follows the feed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_behind_feed_retention_resyncs_its_tables_from_the_records() {
    let root = temporary_directory();
    let database = Postgres::start().await;
    database.execute(SCHEMA).await;
    let node = Node::start_with(&root.path().join("node"), &["--feed-retention-seconds", "2"]).await;
    add_connector(&node, &database.dsn()).await;
    let rows = || async { database.query_strings("SELECT id, name FROM customers ORDER BY id").await };
    let wait_for = |what: &'static str, expected: Vec<Vec<Option<String>>>| {
        let rows = &rows;
        async move {
            let started = Instant::now();
            loop {
                let now = rows().await;
                if now == expected {
                    return;
                }
                assert!(started.elapsed() < GUARD, "{what}: rows {now:?}, expected {expected:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let row = |id: &str, name: &str| vec![Some(id.to_owned()), Some(name.to_owned())];
    for id in ["1", "2", "3"] {
        node.put("customers", id, json!({"id": id.parse::<i64>().unwrap(), "name": format!("first {id}")})).await;
    }
    wait_for("applied", vec![row("1", "first 1"), row("2", "first 2"), row("3", "first 3")]).await;

    let (ok, stdout, stderr) = node.cli(&["connector", "pause", "db"]);
    assert!(ok, "{stdout}{stderr}");
    node.put("customers", "1", json!({"id": 1, "name": "changed 1"})).await;
    let (status, answer) = node.call(Method::DELETE, "/v1/collections/customers/records/2", None).await;
    assert!(status == 200 || status == 204, "{status} {answer}");
    node.put("customers", "5", json!({"id": 5, "name": "new 5"})).await;
    // Retention trims every event the paused connector has not applied.
    let last = node.status().await["feed_sequence"].as_u64().unwrap();
    let started = Instant::now();
    while node.status().await["feed_floor"].as_u64().unwrap() < last {
        assert!(started.elapsed() < GUARD, "the feed was never trimmed: {}", node.status().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, connector) = node.call(Method::GET, "/v1/connectors/db", None).await;
    assert!(connector["applied_feed"].as_u64().unwrap() < last, "{connector}");
    assert_eq!(rows().await.len(), 3, "a paused connector wrote");

    let (ok, stdout, stderr) = node.cli(&["connector", "resume", "db"]);
    assert!(ok, "{stdout}{stderr}");
    wait_for("resynced", vec![row("1", "changed 1"), row("3", "first 3"), row("5", "new 5")]).await;
    let (_, connector) = node.call(Method::GET, "/v1/connectors/db", None).await;
    assert_eq!(connector["resyncs"], 1, "{connector}");
    assert!(node.metrics().await.contains("concord_connector_resyncs_total{connector=\"db\"} 1"));
    // And it follows the feed again.
    node.put("customers", "6", json!({"id": 6, "name": "after 6"})).await;
    wait_for("following", vec![row("1", "changed 1"), row("3", "first 3"), row("5", "new 5"), row("6", "after 6")])
        .await;
}

/// Damage on the node's disk does not stop a connector: a feed entry that does not decode and
/// an event whose record does not load are skipped and counted (their rows stay as they were:
/// nothing is known of the records' values), and the events after them reach the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_skips_damaged_feed_events_and_applies_the_rest() {
    let root = temporary_directory();
    let database = Postgres::start().await;
    database.execute(SCHEMA).await;
    let directory = root.path().join("node");
    let mut node = Node::start(&directory).await;
    add_connector(&node, &database.dsn()).await;
    // Paused (durably), so that the events wait for the damage.
    let (ok, stdout, stderr) = node.cli(&["connector", "pause", "db"]);
    assert!(ok, "{stdout}{stderr}");
    for id in 1..=3 {
        node.put("customers", &id.to_string(), json!({"id": id, "name": format!("first {id}")})).await;
    }
    let mut response =
        node.request(Method::GET, "/v1/changes?since=0").header("accept", "application/x-ndjson").send().await.unwrap();
    let mut sequences = std::collections::BTreeMap::new();
    while sequences.len() < 3 {
        for event in tokio::time::timeout(GUARD, support::read_ndjson(&mut response, 1)).await.expect("the events") {
            if event["collection"] == json!("customers") {
                sequences.insert(event["id"].as_str().unwrap().to_owned(), event["sequence"].as_u64().unwrap());
            }
        }
    }
    drop(response);
    node.terminate();

    // Customer 2's feed entry becomes bytes that do not decode, and customer 3's record garbage.
    let store = store::Store::open(&directory).unwrap();
    let mut batch = store::WriteBatch::default();
    batch.put_feed(sequences["2"], b"\xc1 not a feed entry");
    batch.put_document(b"customers\x003", b"\xc1 not a document");
    store.commit(batch).unwrap();
    drop(store);

    node.restart().await;
    let (ok, stdout, stderr) = node.cli(&["connector", "resume", "db"]);
    assert!(ok, "{stdout}{stderr}");
    node.put("customers", "4", json!({"id": 4, "name": "after 4"})).await;
    let rows = || async { database.query_strings("SELECT id, name FROM customers ORDER BY id").await };
    let row = |id: &str, name: &str| vec![Some(id.to_owned()), Some(name.to_owned())];
    let expected = vec![row("1", "first 1"), row("4", "after 4")];
    let started = Instant::now();
    while rows().await != expected {
        assert!(started.elapsed() < GUARD, "rows {:?}, expected {expected:?}", rows().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, connector) = node.call(Method::GET, "/v1/connectors/db", None).await;
    assert_eq!(connector["damaged_events_skipped"], 2, "{connector}");
    assert!(connector["applied_feed"].as_u64().unwrap() > sequences["3"], "{connector}");
    assert!(node.metrics().await.contains("concord_connector_damaged_events_skipped_total{connector=\"db\"} 2"));
}
