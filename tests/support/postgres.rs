//! Test support: real PostgreSQL 15 servers for the connector tests, each with its own data
//! directory in a temporary folder and its own ephemeral loopback port, run as the `postgres`
//! user (the tests run as root, which PostgreSQL refuses), stopped and removed when dropped.
//!
//! A fresh data directory is a copy of a template made by `initdb` once and kept in Cargo's
//! target temporary folder: copying takes a tenth of the time `initdb` does. The servers' folders
//! live in `/dev/shm` where it exists (the data is thrown away anyway).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

/// Where the PostgreSQL 15 programs are installed.
const PROGRAMS: &str = "/usr/lib/postgresql/15/bin";

/// Hang guard for a server to accept connections (never a speed assertion).
const READY_GUARD: Duration = Duration::from_secs(60);

/// How long one connection attempt during start-up may take.
const CONNECT_GUARD: Duration = Duration::from_secs(2);

/// How long a fast shutdown may take before the server is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// How many ports to try when another process takes the chosen one first.
const START_ATTEMPTS: usize = 5;

/// Server settings: logical replication on, durability off (the data is thrown away), small.
const SETTINGS: &[&str] = &[
    "listen_addresses=127.0.0.1",
    "wal_level=logical",
    "max_wal_senders=10",
    "max_replication_slots=10",
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "autovacuum=off",
    "shared_buffers=16MB",
    "max_connections=40",
];

/// A running PostgreSQL 15 server with one open SQL connection to it. Stopped (fast shutdown,
/// then SIGKILL) and its directory removed when dropped.
pub struct Postgres {
    server: Child,
    port: u16,
    client: Client,
    /// The temporary folder: `data/` (the data directory), `sockets/` (the Unix socket) and
    /// `server.log` (the server's output). Removed after [`Drop`] has stopped the server.
    directory: tempfile::TempDir,
}

impl Postgres {
    /// Starts a fresh server and waits until it accepts connections.
    pub async fn start() -> Postgres {
        let directory = tempfile::Builder::new()
            .prefix("concord-postgres-")
            .tempdir_in(base_directory())
            .expect("temporary directory");
        let (user, group) = account();
        std::os::unix::fs::chown(directory.path(), Some(user), Some(group)).expect("chown the temporary directory");
        let data = directory.path().join("data");
        let sockets = directory.path().join("sockets");
        std::fs::create_dir(&sockets).expect("socket directory");
        std::os::unix::fs::chown(&sockets, Some(user), Some(group)).expect("chown the socket directory");
        prepare_data_directory(directory.path(), &data).await;

        let log_path = directory.path().join("server.log");
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).expect("server log");
            let log_start = log.metadata().expect("server log").len();
            let server = as_postgres("postgres", directory.path())
                .arg("-D")
                .arg(&data)
                .arg("-p")
                .arg(port.to_string())
                .arg("-k")
                .arg(&sockets)
                .args(SETTINGS.iter().flat_map(|setting| ["-c", setting]))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("server log"))
                .stderr(log)
                .spawn()
                .expect("spawn postgres");
            let mut starting = Starting { server: Some(server), log_path: &log_path, log_start };
            match starting.wait_ready(port, &data).await {
                Some(client) => {
                    let server = starting.server.take().expect("the server is running");
                    return Postgres { server, port, client, directory };
                }
                // Another process took the port between choosing and binding: another port.
                None => continue,
            }
        }
        panic!("PostgreSQL could not bind a port in {START_ATTEMPTS} attempts:\n{}", log_tail(&log_path));
    }

    /// A libpq key=value connection string for this server.
    pub fn dsn(&self) -> String {
        dsn(self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The harness's own SQL connection.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Runs `sql` (one or several statements); fails the test with the server's error.
    pub async fn execute(&self, sql: &str) {
        if let Err(error) = self.try_execute(sql).await {
            panic!("{sql}: {error}");
        }
    }

    /// Runs `sql` (one or several statements); the server's error as text.
    pub async fn try_execute(&self, sql: &str) -> Result<(), String> {
        self.client.batch_execute(sql).await.map_err(|error| describe(&error))
    }

    /// Runs `sql` as a simple query: each row's columns as text, NULL as `None`.
    pub async fn query_strings(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        let messages =
            self.client.simple_query(sql).await.unwrap_or_else(|error| panic!("{sql}: {}", describe(&error)));
        messages
            .iter()
            .filter_map(|message| match message {
                SimpleQueryMessage::Row(row) => {
                    Some((0..row.len()).map(|column| row.get(column).map(str::to_owned)).collect())
                }
                _ => None,
            })
            .collect()
    }

    /// The server's log so far (its last lines).
    pub fn log(&self) -> String {
        log_tail(&self.directory.path().join("server.log"))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        stop(&mut self.server);
    }
}

/// A server between spawn and ready; stops it if dropped before it is handed over.
struct Starting<'a> {
    server: Option<Child>,
    log_path: &'a Path,
    /// Where this attempt's output starts in the log.
    log_start: u64,
}

impl Starting<'_> {
    /// Connects once the server accepts connections; `None` if it exited because the port was
    /// taken. Fails the test if it exits for another reason or is not ready within the guard.
    async fn wait_ready(&mut self, port: u16, data: &Path) -> Option<Client> {
        let started = Instant::now();
        loop {
            let server = self.server.as_mut().expect("the server is running");
            if let Some(status) = server.try_wait().expect("poll postgres") {
                self.server = None;
                let log = std::fs::read(self.log_path).unwrap_or_default();
                let attempt = String::from_utf8_lossy(log.get(self.log_start as usize..).unwrap_or_default());
                if attempt.contains("could not bind") || attempt.contains("Address already in use") {
                    return None;
                }
                panic!("PostgreSQL exited before accepting connections ({status}):\n{}", log_tail(self.log_path));
            }
            // Bounded: whoever else took the port may accept the connection and never answer.
            if let Ok(Some(client)) = tokio::time::timeout(CONNECT_GUARD, connect_to_ours(port, data)).await {
                return Some(client);
            }
            if started.elapsed() > READY_GUARD {
                panic!(
                    "PostgreSQL did not accept connections within {} s:\n{}",
                    READY_GUARD.as_secs(),
                    log_tail(self.log_path)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        if let Some(server) = &mut self.server {
            stop(server);
        }
    }
}

/// A connection to the server on `port` if it is the one serving `data`: the port may belong to
/// another test's server if ours lost the race to bind it.
async fn connect_to_ours(port: u16, data: &Path) -> Option<Client> {
    let (client, connection) = tokio_postgres::connect(&dsn(port), NoTls).await.ok()?;
    tokio::spawn(connection);
    let rows = client.simple_query("SHOW data_directory").await.ok()?;
    let ours = rows.iter().any(|message| match message {
        SimpleQueryMessage::Row(row) => row.get(0) == Some(&*data.to_string_lossy()),
        _ => false,
    });
    ours.then_some(client)
}

fn dsn(port: u16) -> String {
    format!("host=127.0.0.1 port={port} user=postgres dbname=postgres")
}

/// Fast shutdown (SIGINT: SIGTERM's smart shutdown would wait for every client, the connectors'
/// replication sessions included, to leave), then SIGKILL after the grace; reaps the process.
fn stop(server: &mut Child) {
    if matches!(server.try_wait(), Ok(Some(_))) {
        return;
    }
    // The child is the postmaster itself (started with the `postgres` user's ids, no wrapper),
    // and it is not reaped yet, so its pid cannot have been reused.
    let _ = Command::new("kill").arg("-INT").arg(server.id().to_string()).status();
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if matches!(server.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = server.kill();
    let _ = server.wait();
}

/// Where the servers' folders go: shared memory when there is some (creating two thousand files on
/// a disk shared with busy builds takes a second; in memory, a twentieth), else the temporary folder.
fn base_directory() -> PathBuf {
    let shared_memory = Path::new("/dev/shm");
    if shared_memory.is_dir() { shared_memory.to_path_buf() } else { std::env::temp_dir() }
}

/// The `postgres` user's uid and gid.
fn account() -> (u32, u32) {
    static ACCOUNT: OnceLock<(u32, u32)> = OnceLock::new();
    *ACCOUNT.get_or_init(|| {
        let id = |flag: &str| -> u32 {
            let output = Command::new("id").arg(flag).arg("postgres").output().expect("run id");
            assert!(output.status.success(), "no postgres user: {}", String::from_utf8_lossy(&output.stderr));
            String::from_utf8_lossy(&output.stdout).trim().parse().expect("a numeric id")
        };
        (id("-u"), id("-g"))
    })
}

/// A PostgreSQL program run as the `postgres` user, in `directory`, with English messages.
fn as_postgres(program: &str, directory: &Path) -> Command {
    let (user, group) = account();
    let mut command = Command::new(Path::new(PROGRAMS).join(program));
    command.uid(user).gid(group).current_dir(directory).env("LC_ALL", "C").env_remove("PGDATA");
    command
}

/// Fills `data` (not yet existing, in `directory`): a copy of the template, or `initdb` (which
/// then becomes the template) if there is none yet or the copy fails.
async fn prepare_data_directory(directory: &Path, data: &Path) {
    let template = template_path();
    if template.join("PG_VERSION").exists() {
        if copy(&template, data).await {
            return;
        }
        let _ = std::fs::remove_dir_all(data);
    }
    let mut initdb = tokio::process::Command::from(as_postgres("initdb", directory));
    let output = initdb
        .arg("-D")
        .arg(data)
        .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"])
        .output()
        .await
        .expect("run initdb");
    assert!(
        output.status.success(),
        "initdb failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    publish_template(data, &template).await;
}

/// The template data directory, shared by every test binary of this target directory.
fn template_path() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("postgres-15-template")
}

/// Copies a fresh data directory into place as the template (a copy renamed in, so it is whole
/// or absent; if another test published one first, this one is dropped).
async fn publish_template(data: &Path, template: &Path) {
    let parent = template.parent().expect("the template has a parent");
    if std::fs::create_dir_all(parent).is_err() {
        return;
    }
    let Ok(staging) = tempfile::Builder::new().prefix("postgres-15-staging-").tempdir_in(parent) else {
        return;
    };
    let copied = staging.path().join("data");
    if copy(data, &copied).await {
        let _ = std::fs::rename(&copied, template);
    }
}

/// `cp -a`: ownership and modes kept (PostgreSQL wants its data directory 0700 and its own);
/// runs of zeros (most of the preallocated WAL segment) left as holes, to write less.
async fn copy(from: &Path, to: &Path) -> bool {
    let status = tokio::process::Command::new("cp").args(["-a", "--sparse=always"]).arg(from).arg(to).status().await;
    status.is_ok_and(|status| status.success())
}

/// A port free on loopback right now.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// The last lines of the server log.
fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// A database error with its SQLSTATE, detail and hint; any other error as it displays.
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(database) => {
            let mut text = format!("{} ({})", database.message(), database.code().code());
            if let Some(detail) = database.detail() {
                text.push_str(&format!("; detail: {detail}"));
            }
            if let Some(hint) = database.hint() {
                text.push_str(&format!("; hint: {hint}"));
            }
            text
        }
        None => error.to_string(),
    }
}
