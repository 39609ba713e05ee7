//! Node configuration: the TOML config file, command-line overrides, and API tokens.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

pub const DEFAULT_API_ADDRESS: &str = "127.0.0.1:7700";
pub const DEFAULT_DATA_DIR: &str = "concord-data";

/// What a token may do. Each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Write,
    Admin,
}

/// A bearer token: its name (for logs and audit), the secret clients send, and its role.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Token {
    pub name: String,
    pub secret: String,
    pub role: Role,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Token").field("name", &self.name).field("role", &self.role).finish_non_exhaustive()
    }
}

/// The config file (`--config node.toml`). Every key is optional; flags override them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub name: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub listen_api: Option<SocketAddr>,
    /// A TOML file holding `[[tokens]]` entries, kept apart from the config so secrets can have
    /// their own permissions.
    pub tokens_file: Option<PathBuf>,
    #[serde(default)]
    pub tokens: Vec<Token>,
    /// The UDP address for QUIC peer connections; without it the node does not replicate.
    pub listen_peer: Option<SocketAddr>,
    /// Seed peers to dial.
    #[serde(default)]
    pub peers: Vec<SocketAddr>,
    /// The peer address other nodes should dial, when it is not `listen_peer`.
    pub advertise_peer: Option<SocketAddr>,
    /// How often the failure detector probes a random member (default 1000).
    pub membership_probe_period_ms: Option<u64>,
    /// How long a suspected member has to refute before it is declared down (default 3000).
    pub membership_suspect_timeout_ms: Option<u64>,
    /// The folder with `ca.pem` and this node's `<name>.pem` and `<name>.key`.
    pub certs_dir: Option<PathBuf>,
    /// The cluster id; must match the CA's.
    pub cluster: Option<String>,
    pub cache_documents: Option<usize>,
    /// How many threads a round of local writes spreads its CRDT work over (default: one per
    /// core, at most 8).
    pub write_workers: Option<usize>,
    /// sled's page cache, in bytes.
    pub store_cache_bytes: Option<u64>,
    pub body_bytes_max: Option<usize>,
    /// How long the change log keeps changes, in seconds.
    pub log_retention_seconds: Option<u64>,
    /// Collections on the yrs record engine (last writer wins per field, no counters).
    #[serde(default)]
    pub yrs_collections: Vec<String>,
    /// How long the audit trail keeps entries, in seconds (default 90 days; 0 keeps them all).
    pub audit_retention_seconds: Option<u64>,
    /// How long the change feed keeps events, in seconds (default 7 days; 0 keeps them all).
    pub feed_retention_seconds: Option<u64>,
    /// Database connectors (`[[connectors]]` with `[[connectors.tables]]`); see README.
    #[serde(default)]
    pub connectors: Vec<crate::connector::ConnectorDefinition>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    tokens: Vec<Token>,
}

/// The settings a node runs with, after the file and the flags are combined.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: Option<String>,
    pub data_dir: PathBuf,
    pub listen_api: SocketAddr,
    pub tokens: Vec<Token>,
    /// Peer replication, when `listen_peer` is set.
    pub mesh: Option<crate::mesh::MeshConfig>,
    pub cache_documents: usize,
    pub write_workers: usize,
    pub store_cache_bytes: u64,
    pub body_bytes_max: usize,
    pub log_retention: std::time::Duration,
    /// Collections on the yrs record engine.
    pub yrs_collections: Vec<String>,
    /// How long the audit trail keeps entries; zero keeps them all.
    pub audit_retention: std::time::Duration,
    /// How long the change feed keeps events; zero keeps them all.
    pub feed_retention: std::time::Duration,
    /// Connectors declared in the config file (started with the ones added through the API).
    pub connectors: Vec<crate::connector::ConnectorDefinition>,
}

/// Command-line values that override the config file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub name: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub listen_api: Option<SocketAddr>,
    pub tokens_file: Option<PathBuf>,
    pub listen_peer: Option<SocketAddr>,
    pub peers: Vec<SocketAddr>,
    pub advertise_peer: Option<SocketAddr>,
    pub certs_dir: Option<PathBuf>,
    pub cluster: Option<String>,
    pub log_retention_seconds: Option<u64>,
    pub yrs_collections: Vec<String>,
    pub audit_retention_seconds: Option<u64>,
    pub feed_retention_seconds: Option<u64>,
}

impl NodeConfig {
    pub fn load(overrides: Overrides) -> anyhow::Result<NodeConfig> {
        let file = match &overrides.config {
            Some(path) => read_toml::<ConfigFile>(path)?,
            None => ConfigFile::default(),
        };
        let mut tokens = file.tokens;
        if let Some(path) = overrides.tokens_file.as_ref().or(file.tokens_file.as_ref()) {
            tokens.extend(read_toml::<TokensFile>(path)?.tokens);
        }
        for token in &tokens {
            if token.secret.len() < 16 {
                bail!("token {:?} has a secret shorter than 16 characters", token.name);
            }
        }
        let listen_api = match overrides.listen_api.or(file.listen_api) {
            Some(address) => address,
            None => DEFAULT_API_ADDRESS.parse().context("default API address")?,
        };
        let mut seeds = file.peers;
        seeds.extend(overrides.peers);
        let mesh = match overrides.listen_peer.or(file.listen_peer) {
            Some(listen_peer) => Some(crate::mesh::MeshConfig {
                listen_peer,
                seeds,
                certs_dir: overrides
                    .certs_dir
                    .or(file.certs_dir)
                    .context("--listen-peer needs --certs DIR (or certs_dir in the config file)")?,
                cluster: overrides.cluster.or(file.cluster),
                advertise_peer: overrides.advertise_peer.or(file.advertise_peer),
                membership: membership_settings(file.membership_probe_period_ms, file.membership_suspect_timeout_ms)?,
            }),
            None if !seeds.is_empty() => bail!("--peer needs --listen-peer"),
            None => None,
        };
        let config = NodeConfig {
            mesh,
            name: overrides.name.or(file.name),
            data_dir: overrides.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            listen_api,
            tokens,
            cache_documents: file.cache_documents.unwrap_or(4096).max(1),
            write_workers: file.write_workers.unwrap_or_else(crate::engine::default_workers),
            store_cache_bytes: file.store_cache_bytes.unwrap_or(store::CACHE_BYTES_DEFAULT),
            body_bytes_max: file.body_bytes_max.unwrap_or(1 << 20),
            log_retention: overrides
                .log_retention_seconds
                .or(file.log_retention_seconds)
                .map_or(crate::engine::LOG_RETENTION_DEFAULT, std::time::Duration::from_secs),
            yrs_collections: file.yrs_collections.into_iter().chain(overrides.yrs_collections).collect(),
            audit_retention: overrides
                .audit_retention_seconds
                .or(file.audit_retention_seconds)
                .map_or(crate::engine::AUDIT_RETENTION_DEFAULT, std::time::Duration::from_secs),
            feed_retention: overrides
                .feed_retention_seconds
                .or(file.feed_retention_seconds)
                .map_or(crate::engine::FEED_RETENTION_DEFAULT, std::time::Duration::from_secs),
            connectors: file.connectors,
        };
        if config.tokens.is_empty() && !config.listen_api.ip().is_loopback() {
            bail!(
                "refusing to serve the API on non-loopback address {} without tokens: configure [[tokens]] or a tokens_file",
                config.listen_api
            );
        }
        Ok(config)
    }
}

/// The failure detector's timings: the defaults with the file's overrides. The probe's round
/// trip is a third of the probe period.
fn membership_settings(
    probe_period_ms: Option<u64>,
    suspect_timeout_ms: Option<u64>,
) -> anyhow::Result<crate::membership::MembershipSettings> {
    let mut settings = crate::membership::MembershipSettings::default();
    if let Some(period_ms) = probe_period_ms {
        settings.probe_period = Duration::from_millis(period_ms);
        settings.probe_rtt = settings.probe_period / 3;
    }
    if let Some(timeout_ms) = suspect_timeout_ms {
        settings.suspect_timeout = Duration::from_millis(timeout_ms);
    }
    settings.validate().context("membership_probe_period_ms or membership_suspect_timeout_ms")?;
    Ok(settings)
}

fn read_toml<T: for<'de> Deserialize<'de>>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_non_loopback_without_tokens_and_short_secrets() {
        let overrides = Overrides { listen_api: Some("0.0.0.0:7700".parse().unwrap()), ..Overrides::default() };
        let error = NodeConfig::load(overrides).unwrap_err().to_string();
        assert!(error.contains("non-loopback"), "{error}");

        let directory = tempfile::tempdir().unwrap();
        let tokens = directory.path().join("tokens.toml");
        std::fs::write(&tokens, "[[tokens]]\nname = \"app\"\nsecret = \"short\"\nrole = \"write\"\n").unwrap();
        let overrides = Overrides { tokens_file: Some(tokens), ..Overrides::default() };
        assert!(NodeConfig::load(overrides).unwrap_err().to_string().contains("shorter than 16"));
    }

    #[test]
    fn flags_override_the_file() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("node.toml");
        std::fs::write(&path, "name = \"hq\"\nlisten_api = \"127.0.0.1:9000\"\n[[tokens]]\nname = \"app\"\nsecret = \"0123456789abcdef\"\nrole = \"read\"\n").unwrap();
        let overrides = Overrides { config: Some(path), name: Some("edge".into()), ..Overrides::default() };
        let config = NodeConfig::load(overrides).unwrap();
        assert_eq!(config.name.as_deref(), Some("edge"));
        assert_eq!(config.listen_api.port(), 9000);
        assert_eq!(config.tokens[0].role, Role::Read);
    }

    #[test]
    fn membership_timings_and_the_advertised_address_come_from_the_file() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("node.toml");
        let file = "listen_peer = \"0.0.0.0:7800\"\ncerts_dir = \"certs\"\nadvertise_peer = \"10.0.0.1:7800\"\n\
                    membership_probe_period_ms = 600\nmembership_suspect_timeout_ms = 2000\n";
        std::fs::write(&path, file).unwrap();
        let config = NodeConfig::load(Overrides { config: Some(path.clone()), ..Overrides::default() }).unwrap();
        let mesh = config.mesh.unwrap();
        assert_eq!(mesh.advertise_peer, Some("10.0.0.1:7800".parse().unwrap()));
        assert_eq!(mesh.membership.probe_period, Duration::from_millis(600));
        assert_eq!(mesh.membership.probe_rtt, Duration::from_millis(200));
        assert_eq!(mesh.membership.suspect_timeout, Duration::from_millis(2000));

        std::fs::write(&path, file.replace("membership_probe_period_ms = 600", "membership_probe_period_ms = 0"))
            .unwrap();
        let error =
            format!("{:#}", NodeConfig::load(Overrides { config: Some(path), ..Overrides::default() }).unwrap_err());
        assert!(error.contains("membership"), "{error}");
    }
}
