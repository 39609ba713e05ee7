//! The bench's nodes: each one a `concord start` process of this same binary, as an operator
//! runs it, so that each node has its own async runtime, engine thread and sled instance, and the
//! load generator shares none of them.
//!
//! Nodes in the bench's own process (as `concord demo` runs them) measured something else: sled
//! 0.34 serialises every batch and read of a process behind one global lock, so three nodes in one
//! process stalled each other's commits, and the load generator's HTTP client ran on the nodes'
//! worker threads (BENCHMARKS.md, session 18).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long a node gets to write its API address after it starts, and to exit once asked.
const START_DEADLINE: Duration = Duration::from_secs(60);
const STOP_DEADLINE: Duration = Duration::from_secs(120);

/// What a bench node runs with, beside its name and seeds.
#[derive(Debug, Clone)]
pub(crate) struct NodeSettings {
    /// The binary to run (`concord` itself).
    pub(crate) binary: PathBuf,
    /// The folder each node's data directory, config and log go in.
    pub(crate) root: PathBuf,
    pub(crate) certs: PathBuf,
    pub(crate) write_workers: usize,
    /// A collection on the yrs record engine.
    pub(crate) yrs_collection: String,
}

/// One running node process. Dropping it kills the process, so a failed phase leaves none behind.
#[derive(Debug)]
pub(crate) struct NodeProcess {
    pub(crate) name: &'static str,
    pub(crate) api: String,
    pub(crate) peer: Option<SocketAddr>,
    child: tokio::process::Child,
    log: PathBuf,
}

impl NodeProcess {
    /// Starts `name` on loopback ports the kernel picks, dialling `seeds`, and returns once it
    /// has written its API address (and, `online`, its peer address). Offline, it has no peer
    /// endpoint at all. The data directory is `root/name`, kept across restarts.
    pub(crate) async fn start(
        settings: &NodeSettings,
        name: &'static str,
        seeds: &[SocketAddr],
        online: bool,
    ) -> anyhow::Result<NodeProcess> {
        let data_dir = settings.root.join(name);
        std::fs::create_dir_all(&data_dir)?;
        for file in [crate::node::API_ADDRESS_FILE, crate::node::PEER_ADDRESS_FILE] {
            let _ = std::fs::remove_file(data_dir.join(file));
        }
        let config_path = settings.root.join(format!("{name}.toml"));
        std::fs::write(&config_path, config(settings, name, &data_dir, seeds, online)?)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let log = settings.root.join(format!("{name}.log"));
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let child = tokio::process::Command::new(&settings.binary)
            .arg("start")
            .arg("--config")
            .arg(&config_path)
            .stdin(std::process::Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} for {name}", settings.binary.display()))?;
        let mut node = NodeProcess { name, api: String::new(), peer: None, child, log };
        node.api = format!("http://{}", node.address_file(&data_dir.join(crate::node::API_ADDRESS_FILE)).await?);
        if online {
            node.peer = Some(node.address_file(&data_dir.join(crate::node::PEER_ADDRESS_FILE)).await?.parse()?);
        }
        Ok(node)
    }

    /// Waits for a file the node writes once it listens, failing early if the process exits.
    async fn address_file(&mut self, path: &Path) -> anyhow::Result<String> {
        let started = Instant::now();
        while started.elapsed() < START_DEADLINE {
            if let Ok(text) = std::fs::read_to_string(path)
                && !text.is_empty()
            {
                return Ok(text.trim().to_owned());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited while starting ({status}); see {}", self.name, self.log.display());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bail!("{} did not write {} in {START_DEADLINE:?}; see {}", self.name, path.display(), self.log.display())
    }

    /// The process's resident memory, from /proc.
    pub(crate) fn rss_bytes(&self) -> anyhow::Result<u64> {
        let pid = self.child.id().context("the node has exited")?;
        super::proc_field(&format!("/proc/{pid}/status"), "VmRSS:")
            .map(|kilobytes| kilobytes * 1024)
            .with_context(|| format!("no VmRSS for {}", self.name))
    }

    /// Asks the node to stop (SIGTERM, as an operator's service manager would) and waits for a
    /// clean exit.
    pub(crate) async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(pid) = self.child.id() else { return Ok(()) };
        let pid = rustix::process::Pid::from_raw(pid as i32).context("a process id out of range")?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .with_context(|| format!("signalling {}", self.name))?;
        let status = match tokio::time::timeout(STOP_DEADLINE, self.child.wait()).await {
            Ok(status) => status?,
            Err(_) => {
                self.child.kill().await?;
                bail!("{} did not stop within {STOP_DEADLINE:?}; see {}", self.name, self.log.display());
            }
        };
        if !status.success() {
            bail!("{} stopped with {status}; see {}", self.name, self.log.display());
        }
        Ok(())
    }
}

/// The CPU time (user and system, all threads) process `pid` (or `self`) has used so far, from
/// /proc/PID/stat.
pub(crate) fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: the fields are counted after it.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let user: u64 = fields.nth(11)?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some((user + system) as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// The jiffies the whole machine has spent busy, and in all, from /proc/stat.
pub(crate) fn machine_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> =
        stat.lines().next()?.split_whitespace().skip(1).map(|field| field.parse().unwrap_or(0)).collect();
    let total: u64 = fields.iter().sum();
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Where the machine's CPU went over a phase: each node's cores, the load generator's (this
/// process), and the share of the machine that was busy.
#[derive(Debug)]
pub(crate) struct CpuShares {
    started: Instant,
    /// Each process's name, its /proc name (a pid, or `self`), and its CPU time at the start.
    processes: Vec<(&'static str, String, Option<f64>)>,
    machine: Option<(u64, u64)>,
}

impl CpuShares {
    pub(crate) fn start(nodes: &[&NodeProcess]) -> CpuShares {
        // A node that has exited has no pid: its name reads no /proc entry, and its share is "?".
        let pid = |node: &NodeProcess| node.child.id().map_or_else(|| "exited".to_owned(), |pid| pid.to_string());
        let nodes = nodes.iter().map(|node| (node.name, pid(node)));
        let processes = nodes
            .chain([("the load generator", "self".to_owned())])
            .map(|(name, pid)| {
                let before = cpu_seconds(&pid);
                (name, pid, before)
            })
            .collect();
        CpuShares { started: Instant::now(), processes, machine: machine_jiffies() }
    }

    /// "node-a 0.52 cores, …, the load generator 0.20 cores; the machine 81% busy", for what each
    /// process used since the start.
    pub(crate) fn since(&self) -> String {
        let elapsed = self.started.elapsed().as_secs_f64();
        let parts: Vec<String> = self
            .processes
            .iter()
            .map(|(name, pid, before)| match (before, cpu_seconds(pid)) {
                (Some(before), Some(after)) => format!("{name} {:.2} cores", (after - before) / elapsed),
                _ => format!("{name} ? cores"),
            })
            .collect();
        let busy = match (self.machine, machine_jiffies()) {
            (Some((busy_before, total_before)), Some((busy, total))) if total > total_before => {
                format!("{:.0}%", 100.0 * (busy - busy_before) as f64 / (total - total_before) as f64)
            }
            _ => "?".to_owned(),
        };
        format!("{}; the machine {busy} busy", parts.join(", "))
    }
}

/// The node's config file: loopback ports the kernel picks, the bench's certificates, and the
/// settings `concord demo` gives its nodes.
fn config(
    settings: &NodeSettings,
    name: &str,
    data_dir: &Path,
    seeds: &[SocketAddr],
    online: bool,
) -> anyhow::Result<String> {
    let text = |value: &str| toml::Value::String(value.to_owned());
    let path = |path: &Path| path.to_str().map(text).context("a bench path that is not UTF-8");
    let mut table = toml::Table::new();
    table.insert("name".into(), text(name));
    table.insert("data_dir".into(), path(data_dir)?);
    table.insert("listen_api".into(), text("127.0.0.1:0"));
    table.insert("certs_dir".into(), path(&settings.certs)?);
    table.insert("cache_documents".into(), toml::Value::Integer(4096));
    table.insert("write_workers".into(), toml::Value::Integer(settings.write_workers as i64));
    table.insert("yrs_collections".into(), toml::Value::Array(vec![text(&settings.yrs_collection)]));
    if online {
        table.insert("listen_peer".into(), text("127.0.0.1:0"));
        let peers = seeds.iter().map(|seed| text(&seed.to_string())).collect();
        table.insert("peers".into(), toml::Value::Array(peers));
    }
    Ok(toml::to_string(&table)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_times_are_read_for_this_process_and_the_machine() {
        let before = cpu_seconds("self").expect("this process's CPU time");
        let started = Instant::now();
        let mut spin = 0_u64;
        while started.elapsed() < Duration::from_millis(300) {
            spin = std::hint::black_box(spin.wrapping_add(1));
        }
        let after = cpu_seconds("self").expect("this process's CPU time");
        assert!(after - before >= 0.1, "300 ms of spinning counted as {} s", after - before);
        let (busy, total) = machine_jiffies().expect("the machine's jiffies");
        assert!(busy > 0 && busy <= total);
        assert_eq!(cpu_seconds("no-such-process"), None);
    }

    #[test]
    fn a_node_s_config_is_one_the_node_reads_back() {
        let directory = tempfile::tempdir().unwrap();
        let settings = NodeSettings {
            binary: PathBuf::from("concord"),
            root: directory.path().to_path_buf(),
            certs: directory.path().join("certs"),
            write_workers: 3,
            yrs_collection: "events".to_owned(),
        };
        let seed: SocketAddr = "127.0.0.1:7411".parse().unwrap();
        let path = directory.path().join("node.toml");
        std::fs::write(&path, config(&settings, "node-a", &directory.path().join("node-a"), &[seed], true).unwrap())
            .unwrap();
        let loaded = crate::config::NodeConfig::load(crate::config::Overrides {
            config: Some(path.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(loaded.name.as_deref(), Some("node-a"));
        assert_eq!(loaded.write_workers, 3);
        assert_eq!(loaded.yrs_collections, ["events"]);
        let mesh = loaded.mesh.expect("an online node replicates");
        assert_eq!(mesh.seeds, [seed]);
        assert_eq!(mesh.listen_peer.port(), 0);

        std::fs::write(&path, config(&settings, "node-c", &directory.path().join("node-c"), &[seed], false).unwrap())
            .unwrap();
        let offline =
            crate::config::NodeConfig::load(crate::config::Overrides { config: Some(path), ..Default::default() })
                .unwrap();
        assert!(offline.mesh.is_none(), "an offline node has no peer endpoint");
    }
}
