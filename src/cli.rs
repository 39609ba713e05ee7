//! The command line: `concord start` runs a node; the other commands are clients of a running
//! node's HTTP API.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "concord",
    version,
    about = "A CRDT replication engine: records and texts that stay in agreement everywhere."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node.
    Start(StartArgs),
    /// Start a three-node cluster on loopback and show replication, conflicts and offline
    /// catch-up; exits 0 only if every node converged.
    Demo {
        /// Keep the nodes' data here instead of a temporary folder.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Measure the ceilings (sled, QUIC, automerge), then writes/s, replication latency,
    /// catch-up, bootstrap, memory and disk per record on nodes started on loopback.
    Bench {
        /// Smaller counts and shorter phases: under a minute.
        #[arg(long)]
        quick: bool,
        /// Also write the figures as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Records for bootstrap, memory and disk per record (default 1,000,000; 10,000 with
        /// --quick); catch-up uses as many (half with --quick).
        #[arg(long)]
        records: Option<u64>,
        /// Threads each node's rounds of writes use (default: one per core, at most 8); 1
        /// measures the engine thread alone.
        #[arg(long)]
        write_workers: Option<usize>,
    },
    /// Replace a record with a JSON object: put COLLECTION/ID '{"name":"Ada"}'.
    Put(WriteArgs),
    /// Apply an RFC 7386 JSON Merge Patch to a record.
    Patch(WriteArgs),
    /// Read a record, with its version and conflicts.
    Get(KeyArgs),
    /// Delete a record (a tombstone that replicates).
    Del(KeyArgs),
    /// Add to a counter field: incr COLLECTION/ID FIELD [BY].
    Incr(IncrArgs),
    /// List the records of a collection.
    Ls(ListArgs),
    /// Follow the change feed.
    Watch(WatchArgs),
    /// Show the node's identity, counts, version vector, digest and peers.
    Status(ClientArgs),
    /// List the node's peers with their lag in each direction.
    Peers(ClientArgs),
    /// Create the cluster CA or issue node certificates.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Define a collection's field policies and schema, or show its definition.
    #[command(subcommand)]
    Collection(CollectionCommand),
    /// The conflict ledger: list, show and resolve conflicts.
    #[command(subcommand)]
    Conflicts(ConflictsCommand),
    /// Changes from peers that could not be applied: list, show, retry or drop them.
    #[command(subcommand)]
    Quarantine(QuarantineCommand),
    /// The audit trail: who changed which record, when, from where. Verification exits 0 when
    /// the log is intact, 2 when it was tampered with, 1 when it could not be checked.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Database connectors (PostgreSQL): add, list, show status, pause, resume, remove.
    #[command(subcommand)]
    Connector(ConnectorCommand),
}

#[derive(Debug, Subcommand)]
pub enum ConnectorCommand {
    /// Add a PostgreSQL connector and start it; waits for the initial snapshot with a progress
    /// bar unless --no-wait.
    Add {
        name: String,
        /// libpq-style `host=... port=... user=... dbname=...` or a postgresql:// URL.
        #[arg(long)]
        dsn: String,
        /// TABLE=COLLECTION (`schema.table` or `table`; repeatable).
        #[arg(long = "table", required = true)]
        tables: Vec<String>,
        /// Default concord_NAME.
        #[arg(long)]
        publication: Option<String>,
        /// Default concord_NAME.
        #[arg(long)]
        slot: Option<String>,
        /// Return once the connector is added, without waiting for its snapshot.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List the node's connectors.
    Ls(ClientArgs),
    /// One connector's state, positions, lag, counters and last error.
    Status {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Stop capturing and applying until resumed (durable across restarts).
    Pause {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    Resume {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Stop and forget a connector.
    Remove {
        name: String,
        /// Also drop its replication slot (else the database keeps WAL for it).
        #[arg(long)]
        drop_slot: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum QuarantineCommand {
    /// List quarantined changes.
    Ls {
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one quarantined change, its bytes in hex.
    Show {
        id: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Apply a quarantined change again; it leaves the quarantine if it applies.
    Retry {
        id: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove a quarantined change without applying it.
    Drop {
        id: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConflictsCommand {
    /// List ledger entries in order.
    Ls {
        #[arg(long)]
        collection: Option<String>,
        /// Entries after this ledger sequence.
        #[arg(long, default_value_t = 0)]
        since: u64,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one ledger entry with every concurrent value.
    Show {
        sequence: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Write a value that supersedes a field's concurrent values: resolve COLLECTION/ID FIELD --value JSON.
    Resolve {
        key: String,
        field: String,
        #[arg(long)]
        value: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum CollectionCommand {
    /// Store a definition (TOML, or JSON) for collection NAME; it replicates to every node.
    Define {
        name: String,
        /// The definition file (see docs/policies.md).
        #[arg(long)]
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show the definition in force for collection NAME.
    Show {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Show the newest entries; with --follow, keep showing new ones as they come.
    Tail(AuditTailArgs),
    /// Write the log as JSON lines (the trim anchor first when old entries were trimmed) to a
    /// file or stdout, and print its head to stderr: keep that to detect a later removal of the
    /// newest entries.
    Export(AuditExportArgs),
    /// Verify the log on the node, or an exported file offline with --file.
    Verify(AuditVerifyArgs),
}

#[derive(Debug, Args)]
pub struct AuditTailArgs {
    /// How many of the newest entries to show.
    #[arg(short = 'n', long = "lines", default_value_t = 20)]
    pub lines: u64,
    /// Keep showing new entries (polls the node once a second) until interrupted.
    #[arg(long)]
    pub follow: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct AuditExportArgs {
    /// The node's API.
    #[arg(long, env = "CONCORD_API", default_value = "http://127.0.0.1:7700")]
    pub api: String,
    /// A bearer token (the admin role, when the node has tokens).
    #[arg(long, env = "CONCORD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Write to this file (replaced only once the whole export has arrived) instead of stdout.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct AuditVerifyArgs {
    /// Verify this export (JSON lines) offline instead of asking the node.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// A head kept from an earlier export or status, SEQUENCE:HASH: the log must still hold that
    /// entry unchanged, so removing or rewriting the newest entries is found too.
    #[arg(long)]
    pub head: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Create a cluster CA: DIR/ca.pem and DIR/ca.key.
    Ca {
        #[arg(long)]
        dir: PathBuf,
        /// The cluster id every node of this cluster presents.
        #[arg(long, default_value = "concord")]
        cluster: String,
    },
    /// Issue a node certificate signed by the CA in DIR: DIR/NAME.pem and DIR/NAME.key.
    Node {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        /// An IP address the node is reached at (repeatable).
        #[arg(long)]
        ip: Vec<std::net::IpAddr>,
        /// A DNS name the node is reached at (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// How long the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// A TOML config file; flags override its keys.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where the node keeps its store (default ./concord-data).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The node's name (kept in the store once set).
    #[arg(long)]
    pub name: Option<String>,
    /// Address for the HTTP API (default 127.0.0.1:7700; port 0 picks one, written to DATA_DIR/api.addr).
    #[arg(long)]
    pub listen_api: Option<SocketAddr>,
    /// A TOML file of [[tokens]] with name, secret and role (read, write or admin).
    #[arg(long)]
    pub tokens_file: Option<PathBuf>,
    /// UDP address for QUIC connections from peers; enables replication.
    #[arg(long)]
    pub listen_peer: Option<SocketAddr>,
    /// A seed peer's address (repeatable).
    #[arg(long = "peer")]
    pub peers: Vec<SocketAddr>,
    /// The peer address other nodes should dial, when not --listen-peer (needed with 0.0.0.0).
    #[arg(long)]
    pub advertise_peer: Option<SocketAddr>,
    /// The folder with ca.pem and this node's NAME.pem and NAME.key.
    #[arg(long = "certs")]
    pub certs_dir: Option<PathBuf>,
    /// The cluster id; must match the CA's.
    #[arg(long)]
    pub cluster: Option<String>,
    /// How long the change log keeps changes, in seconds (default a week). Peers further behind
    /// are bootstrapped from snapshots.
    #[arg(long)]
    pub log_retention_seconds: Option<u64>,
    /// A collection whose records use the yrs record engine: faster writes, last writer wins per
    /// field, no counters (repeatable; every node must declare the same ones).
    #[arg(long = "yrs-collection")]
    pub yrs_collections: Vec<String>,
    /// How long the audit trail keeps entries, in seconds (default 90 days; 0 keeps them all).
    /// Older entries are deleted behind an anchor that verification starts from.
    #[arg(long)]
    pub audit_retention_seconds: Option<u64>,
    /// How long the change feed keeps events, in seconds (default 7 days; 0 keeps them all). A
    /// consumer that asks for events older than that gets 410 and resyncs from the records.
    #[arg(long)]
    pub feed_retention_seconds: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The node's API.
    #[arg(long, env = "CONCORD_API", default_value = "http://127.0.0.1:7700", global = true)]
    pub api: String,
    /// A bearer token.
    #[arg(long, env = "CONCORD_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table", global = true)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct KeyArgs {
    /// COLLECTION/ID
    pub key: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct WriteArgs {
    /// COLLECTION/ID
    pub key: String,
    /// A JSON object.
    pub json: String,
    /// Answer only once this many peers hold the change durably.
    #[arg(long, default_value_t = 0)]
    pub acks: usize,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct IncrArgs {
    /// COLLECTION/ID
    pub key: String,
    pub field: String,
    #[arg(default_value_t = 1, allow_negative_numbers = true)]
    pub by: i64,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    pub collection: String,
    /// Only ids that start with this.
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// Start after this id (the `next` of a previous page).
    #[arg(long)]
    pub after: Option<String>,
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Start after this feed sequence.
    #[arg(long, default_value_t = 0)]
    pub since: u64,
    #[command(flatten)]
    pub client: ClientArgs,
}
