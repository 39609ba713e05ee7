//! `concord bench`: an end-to-end load generator against real nodes on loopback, each figure
//! printed beside the ceiling measured in the same run.
//!
//! The ceilings come first: a sled batch-and-flush rate through the `store` crate, a QUIC round
//! trip through the `transport` crate, and the automerge change rate through `crdt::record`.
//! Then nodes run as `concord start` processes of this binary (`process`: each with its own
//! runtime, sled store, HTTP API and QUIC endpoint under a fresh cluster CA) and are driven over
//! HTTP: acknowledged writes/s on one node and on three, replication latency at fixed offered
//! loads (a write at A matched on B's and C's change feeds), catch-up of a node that was offline,
//! bootstrap of a new node, and the memory and disk each record takes. A figure that could not be
//! taken is reported as not measured, with the reason.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};

use process::{CpuShares, NodeProcess, NodeSettings};

mod process;

/// Every node name the bench gives a certificate.
const NAMES: [&str; 5] = ["solo", "joiner", "node-a", "node-b", "node-c"];
/// How long to wait for nodes to agree before the figure is not measured.
const CONVERGENCE_DEADLINE: Duration = Duration::from_secs(900);
/// Concurrent HTTP clients for the throughput phases.
const CLIENTS: usize = 64;
/// Writes in flight at most during the latency phases; the schedule keeps running regardless.
const LATENCY_IN_FLIGHT_MAX: usize = 512;
/// Concurrent clients posting batches, and the writes in each batch.
const BATCH_CLIENTS: usize = 8;
const BATCH_WRITES: u64 = 100;

/// What one run measures, and for how long.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Settings {
    pub quick: bool,
    /// Records written to the single node (bootstrap, RSS and disk per record).
    pub records: u64,
    /// New records written while a node is offline (catch-up).
    pub catch_up_records: u64,
    /// Records changed on both sides while a node is offline (catch-up).
    pub catch_up_shared: u64,
    /// How long each throughput phase writes.
    #[serde(serialize_with = "seconds")]
    pub throughput_duration: Duration,
    /// How long each latency phase offers its load.
    #[serde(serialize_with = "seconds")]
    pub latency_duration: Duration,
    /// Threads each node's rounds of writes use.
    pub write_workers: usize,
}

fn seconds<S: serde::Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64())
}

impl Settings {
    /// The quick run (under a minute) or the full one; `records` overrides N.
    pub fn new(quick: bool, records: Option<u64>, write_workers: Option<usize>) -> Settings {
        let records = records.unwrap_or(if quick { 10_000 } else { 1_000_000 }).max(10);
        let (throughput_duration, latency_duration) = if quick {
            (Duration::from_secs(3), Duration::from_secs(3))
        } else {
            (Duration::from_secs(10), Duration::from_secs(10))
        };
        let catch_up_records = if quick { records / 2 } else { records };
        Settings {
            quick,
            records,
            catch_up_records,
            catch_up_shared: (records / 10).max(10),
            throughput_duration,
            latency_duration,
            write_workers: write_workers.unwrap_or_else(crate::engine::default_workers).max(1),
        }
    }
}

/// One measured figure, or the reason it was not measured.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub key: String,
    pub label: String,
    /// `None` when not measured.
    pub value: Option<f64>,
    pub unit: &'static str,
    /// The key of the ceiling this figure is compared with.
    pub ceiling: Option<String>,
    /// value / ceiling (for latencies: how many round trips).
    pub ratio: Option<f64>,
    pub note: String,
}

impl Figure {
    fn new(key: &str, label: &str, value: f64, unit: &'static str) -> Figure {
        let value = value.is_finite().then_some(value);
        Figure {
            key: key.to_owned(),
            label: label.to_owned(),
            value,
            unit,
            ceiling: None,
            ratio: None,
            note: String::new(),
        }
    }

    fn missing(key: &str, label: &str, unit: &'static str, reason: &str) -> Figure {
        Figure {
            key: key.to_owned(),
            label: label.to_owned(),
            value: None,
            unit,
            ceiling: None,
            ratio: None,
            note: format!("not measured: {reason}"),
        }
    }

    fn note(mut self, note: impl Into<String>) -> Figure {
        self.note = note.into();
        self
    }
}

/// Everything one run produced: what `--json` writes.
#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: Value,
    pub settings: Settings,
    pub figures: Vec<Figure>,
    pub seconds: f64,
}

/// Runs the bench, prints the table, and writes the report to `json` when given.
pub async fn run(
    quick: bool,
    records: Option<u64>,
    write_workers: Option<usize>,
    json_path: Option<PathBuf>,
) -> anyhow::Result<()> {
    let settings = Settings::new(quick, records, write_workers);
    let started = Instant::now();
    let machine = machine();
    println!(
        "concord bench ({}): {} cores, {} write workers per node, load average {}",
        if quick { "quick" } else { "full" },
        machine["cores"],
        settings.write_workers,
        machine["load_average_before"].as_str().unwrap_or("?")
    );
    let root = tempfile::Builder::new().prefix("concord-bench-").tempdir()?;
    let certs = root.path().join("certs");
    let names: Vec<&str> = NAMES.iter().chain(["ping", "pong"].iter()).copied().collect();
    crate::demo::loopback_certificates(&certs, "bench", &names)?;
    let nodes = NodeSettings {
        binary: std::env::current_exe().context("finding this binary, to start the bench's nodes")?,
        root: root.path().to_path_buf(),
        certs,
        write_workers: settings.write_workers,
        yrs_collection: crate::demo::YRS_COLLECTION.to_owned(),
    };
    let bench = Bench { http: reqwest::Client::new(), nodes, settings };

    let mut figures = Vec::new();
    figures.extend(phase("sled", whole(bench.sled_ceiling().await), SLED_FIGURES));
    figures.extend(phase("QUIC", whole(bench.quic_ceiling().await), QUIC_FIGURES));
    figures.extend(phase("automerge", whole(bench.automerge_ceiling().await), AUTOMERGE_FIGURES));
    figures.extend(phase("yrs", whole(bench.yrs_ceiling().await), YRS_FIGURES));
    println!("  ceilings measured");
    figures.extend(phase("single-node", bench.single_node().await, SINGLE_NODE_FIGURES));
    figures.extend(phase("three-node", bench.cluster().await, CLUSTER_FIGURES));
    attach_ceilings(&mut figures);
    let mut machine = machine;
    machine["load_average_after"] = json!(load_average());
    let report = Report { machine, settings, figures, seconds: started.elapsed().as_secs_f64() };
    print!("{}", table(&report));
    if let Some(path) = json_path {
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// A figure a phase is expected to produce: key, label, unit.
type Expected = (&'static str, &'static str, &'static str);

const SLED_FIGURES: &[Expected] = &[("ceiling.sled_puts_per_second", "sled batch+flush puts/s", "/s")];
const QUIC_FIGURES: &[Expected] = &[("ceiling.quic_rtt_us", "QUIC round trip p50", "µs")];
const AUTOMERGE_FIGURES: &[Expected] = &[("ceiling.automerge_changes_per_second", "automerge changes/s", "/s")];
const YRS_FIGURES: &[Expected] = &[("ceiling.yrs_changes_per_second", "yrs record changes/s", "/s")];
const SINGLE_NODE_FIGURES: &[Expected] = &[
    ("writes.one_node_per_second", "acknowledged writes/s, one node", "/s"),
    ("writes_yrs.one_node_per_second", "acknowledged writes/s, one node, yrs engine", "/s"),
    ("writes_batched.one_node_per_second", "acknowledged writes/s, one node, batches of 100", "/s"),
    ("writes_yrs_batched.one_node_per_second", "acknowledged writes/s, one node, yrs engine, batches of 100", "/s"),
    ("memory.rss_bytes_per_record", "RSS per record", "B"),
    ("disk.bytes_per_record", "disk per record", "B"),
    ("bootstrap.seconds", "bootstrap of a new node", "s"),
    ("bootstrap.records_per_second", "bootstrap rate", "/s"),
    ("disk.stored_bytes_per_record", STORED_BYTES_LABEL, "B"),
];
const STORED_BYTES_LABEL: &str = "stored bytes per record (keys and values, before sled's overhead)";
const CLUSTER_FIGURES: &[Expected] = &[
    ("writes.three_nodes_per_second", "acknowledged writes/s, three nodes", "/s"),
    ("latency.1k.p50_ms", "replication latency p50 at 1k/s", "ms"),
    ("latency.1k.p99_ms", "replication latency p99 at 1k/s", "ms"),
    ("latency.1k.max_ms", "replication latency max at 1k/s", "ms"),
    ("latency.5k.p50_ms", "replication latency p50 at 5k/s", "ms"),
    ("latency.5k.p99_ms", "replication latency p99 at 5k/s", "ms"),
    ("latency.5k.max_ms", "replication latency max at 5k/s", "ms"),
    ("latency_yrs.5k.p50_ms", "replication latency p50 at 5k/s, yrs engine", "ms"),
    ("latency_yrs.5k.p99_ms", "replication latency p99 at 5k/s, yrs engine", "ms"),
    ("latency_yrs.5k.max_ms", "replication latency max at 5k/s, yrs engine", "ms"),
    ("catch_up.new_records_per_second", "catch-up, records new to the node", "/s"),
    ("catch_up.both_changed_records_per_second", "catch-up, records changed on both sides", "/s"),
];

/// The figures a phase measured, and every expected one it did not, marked with the reason.
fn phase(name: &str, result: (Vec<Figure>, anyhow::Result<()>), expected: &[Expected]) -> Vec<Figure> {
    let (mut figures, outcome) = result;
    let reason = match outcome {
        Ok(()) => format!("the {name} phase did not produce it"),
        Err(error) => {
            println!("  the {name} phase stopped: {error:#}");
            format!("the {name} phase stopped: {error:#}")
        }
    };
    for (key, label, unit) in expected {
        if !figures.iter().any(|figure| figure.key == *key) {
            figures.push(Figure::missing(key, label, unit, &reason));
        }
    }
    figures
}

/// A phase that produces its figures all at once.
fn whole(result: anyhow::Result<Vec<Figure>>) -> (Vec<Figure>, anyhow::Result<()>) {
    match result {
        Ok(figures) => (figures, Ok(())),
        Err(error) => (Vec::new(), Err(error)),
    }
}

/// Sets each figure's ceiling and ratio where one applies.
fn attach_ceilings(figures: &mut [Figure]) {
    let value_of =
        |figures: &[Figure], key: &str| figures.iter().find(|figure| figure.key == key).and_then(|figure| figure.value);
    let automerge = value_of(figures, "ceiling.automerge_changes_per_second");
    let yrs = value_of(figures, "ceiling.yrs_changes_per_second");
    let sled = value_of(figures, "ceiling.sled_puts_per_second");
    let round_trip_ms = value_of(figures, "ceiling.quic_rtt_us").map(|micros| micros / 1000.0);
    for figure in figures.iter_mut() {
        let (ceiling_key, ceiling) = if figure.key.starts_with("writes_yrs") {
            ("ceiling.yrs_changes_per_second", yrs)
        } else if figure.key.starts_with("writes") || figure.key.starts_with("catch_up.") {
            ("ceiling.automerge_changes_per_second", automerge)
        } else if figure.key.starts_with("latency") {
            ("ceiling.quic_rtt_us", round_trip_ms)
        } else {
            continue;
        };
        figure.ceiling = Some(ceiling_key.to_owned());
        figure.ratio = match (figure.value, ceiling) {
            (Some(value), Some(ceiling)) if ceiling > 0.0 => Some(value / ceiling),
            _ => None,
        };
        if figure.key.starts_with("writes")
            && let (Some(value), Some(sled)) = (figure.value, sled)
            && sled > 0.0
        {
            let note = format!("{:.3} of sled batch+flush", value / sled);
            figure.note = if figure.note.is_empty() { note } else { format!("{}; {note}", figure.note) };
        }
    }
}

fn table(report: &Report) -> String {
    let mut text = String::new();
    let _ = writeln!(text, "\n{:<48} {:>14}  {:<36} {:>9}  note", "figure", "value", "ceiling", "ratio");
    for figure in &report.figures {
        let value = match figure.value {
            Some(value) => format!("{} {}", human(value), figure.unit),
            None => "not measured".to_owned(),
        };
        let ceiling = figure.ceiling.as_deref().unwrap_or("").trim_start_matches("ceiling.");
        let ratio = match (figure.ratio, figure.key.starts_with("latency")) {
            (Some(ratio), true) => format!("{ratio:.0}× RTT"),
            (Some(ratio), false) => format!("{ratio:.3}"),
            (None, _) => String::new(),
        };
        let _ = writeln!(text, "{:<48} {:>14}  {:<36} {:>9}  {}", figure.label, value, ceiling, ratio, figure.note);
    }
    let _ = writeln!(
        text,
        "\n{:.0} s in all; load average before {}, after {} (a noisy machine: compare ratios, not absolutes)",
        report.seconds,
        report.machine["load_average_before"].as_str().unwrap_or("?"),
        report.machine["load_average_after"].as_str().unwrap_or("?")
    );
    text
}

fn human(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|model| model.trim().to_owned())
        })
        .unwrap_or_default();
    json!({
        "cores": std::thread::available_parallelism().map(|cores| cores.get()).unwrap_or(0),
        "cpu": cpu,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "memory_kb": proc_field("/proc/meminfo", "MemTotal:"),
        "load_average_before": load_average(),
    })
}

/// The small record the write phases put: four fields, one of them 16 hex digits that differ
/// from record to record and do not compress, as a real record's name or reference would not;
/// without it every record would be the next one's near copy, and disk per record would flatter.
fn small_record(index: u64) -> Value {
    let reference = blake3::hash(&index.to_le_bytes()).to_hex();
    json!({"n": index, "site": "bench", "note": "a small record", "ref": &reference[..16]})
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| text.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A `NAME: value kB` field of a /proc file, in kB.
fn proc_field(path: &str, name: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find(|line| line.starts_with(name))?.split_whitespace().nth(1)?.parse().ok()
}

/// The bytes of every file under `directory` (apparent sizes).
fn directory_bytes(directory: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(directory)? {
        let entry = entry?;
        let metadata = entry.metadata()?;
        total += if metadata.is_dir() { directory_bytes(&entry.path())? } else { metadata.len() };
    }
    Ok(total)
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted.get(index).copied().unwrap_or_default()
}

fn milliseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// What a run of concurrent writers achieved.
struct Hammered {
    acknowledged: u64,
    refused: u64,
    elapsed: Duration,
}

impl Hammered {
    fn rate(&self) -> f64 {
        self.acknowledged as f64 / self.elapsed.as_secs_f64()
    }
}

struct Bench {
    http: reqwest::Client,
    /// The nodes' binary and settings, and the run's temporary folder (`nodes.root`).
    nodes: NodeSettings,
    settings: Settings,
}

impl Bench {
    /// Batches of 1,000 small puts, one commit (apply + flush) each.
    async fn sled_ceiling(&self) -> anyhow::Result<Vec<Figure>> {
        let directory = self.nodes.root.join("sled-ceiling");
        let duration = if self.settings.quick { Duration::from_secs(1) } else { Duration::from_secs(3) };
        let (puts, elapsed) = tokio::task::spawn_blocking(move || -> anyhow::Result<(u64, Duration)> {
            let store = store::Store::open(&directory)?;
            let value = [7_u8; 100];
            let started = Instant::now();
            let mut puts = 0_u64;
            while started.elapsed() < duration {
                let mut batch = store::WriteBatch::default();
                for _ in 0..1000 {
                    batch.put_document(format!("bench/{puts:012}").as_bytes(), &value);
                    puts += 1;
                }
                store.commit(batch)?;
            }
            Ok((puts, started.elapsed()))
        })
        .await??;
        Ok(vec![
            Figure::new(
                "ceiling.sled_puts_per_second",
                "sled batch+flush puts/s",
                puts as f64 / elapsed.as_secs_f64(),
                "/s",
            )
            .note("batches of 1,000 100-byte puts, one commit each"),
        ])
    }

    /// Two endpoints on loopback under the cluster CA, small frames bounced back and forth.
    async fn quic_ceiling(&self) -> anyhow::Result<Vec<Figure>> {
        let rounds = if self.settings.quick { 500 } else { 3000 };
        let bind = |name: &str, node_id: u8, seeds: Vec<std::net::SocketAddr>| -> anyhow::Result<_> {
            let certificates = transport::NodeCertificates::load(&self.nodes.certs, name)?;
            let cluster = certificates.cluster_id().to_owned();
            let mut config = transport::EndpointConfig::new(
                std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                cluster,
                [node_id; 16],
                name,
                certificates,
            );
            config.seeds = seeds;
            Ok(transport::Endpoint::bind(config)?)
        };
        let (pong, mut pong_events) = bind("pong", 2, Vec::new())?;
        let (ping, mut ping_events) = bind("ping", 1, vec![pong.local_address()])?;
        let result = async {
            let deadline = Duration::from_secs(10);
            let to_pong = tokio::time::timeout(deadline, connected(&mut ping_events)).await??;
            let to_ping = tokio::time::timeout(deadline, connected(&mut pong_events)).await??;
            let frame = transport::Bytes::from_static(&[42; 64]);
            let mut round_trips = Vec::with_capacity(rounds);
            for round in 0..rounds + 50 {
                let started = Instant::now();
                ping.send(to_pong, frame.clone())?;
                next_frame(&mut pong_events).await?;
                pong.send(to_ping, frame.clone())?;
                next_frame(&mut ping_events).await?;
                if round >= 50 {
                    round_trips.push(started.elapsed());
                }
            }
            round_trips.sort();
            Ok::<_, anyhow::Error>(round_trips)
        }
        .await;
        ping.shutdown().await;
        pong.shutdown().await;
        let round_trips = result?;
        let p50 = percentile(&round_trips, 0.5);
        Ok(vec![Figure::new("ceiling.quic_rtt_us", "QUIC round trip p50", p50.as_secs_f64() * 1e6, "µs").note(
            format!(
                "{rounds} ping-pongs of 64-byte frames; p99 {:.0} µs",
                percentile(&round_trips, 0.99).as_secs_f64() * 1e6
            ),
        )])
    }

    /// Small merge patches through `Record::write` over 1,000 records, with the change bytes.
    async fn automerge_ceiling(&self) -> anyhow::Result<Vec<Figure>> {
        let duration = if self.settings.quick { Duration::from_secs(1) } else { Duration::from_secs(3) };
        let (changes, elapsed) = tokio::task::spawn_blocking(move || -> anyhow::Result<(u64, Duration)> {
            use crdt::record::{Operation, Record};
            let origin = crdt::identity::OriginId([3; 16]);
            let mut records = Vec::new();
            for index in 0..1000_u64 {
                let key = crdt::key::RecordKey::new("bench", &format!("r{index}"))?;
                let mut record = Record::new();
                let timestamp = crdt::clock::Timestamp { wall_ms: index, logical: 0 };
                record.write(
                    &key,
                    &origin,
                    timestamp,
                    &Operation::Replace(object(json!({"n": index, "site": "bench"}))),
                )?;
                records.push((key, record));
            }
            let started = Instant::now();
            let mut changes = 0_u64;
            while started.elapsed() < duration {
                for _ in 0..100 {
                    let slot = (changes % 1000) as usize;
                    let (key, record) = &mut records[slot];
                    let timestamp = crdt::clock::Timestamp { wall_ms: 1000 + changes, logical: 0 };
                    let patch = Operation::MergePatch(object(json!({"n": changes, "note": "a small patch"})));
                    if record.write(key, &origin, timestamp, &patch)?.is_some() {
                        changes += 1;
                    }
                }
            }
            Ok((changes, started.elapsed()))
        })
        .await??;
        Ok(vec![
            Figure::new(
                "ceiling.automerge_changes_per_second",
                "automerge changes/s",
                changes as f64 / elapsed.as_secs_f64(),
                "/s",
            )
            .note("Record::write of 2-field merge patches over 1,000 records, one core"),
        ])
    }

    /// The same patches through `MapRecord::write`, the yrs record engine.
    async fn yrs_ceiling(&self) -> anyhow::Result<Vec<Figure>> {
        let duration = if self.settings.quick { Duration::from_secs(1) } else { Duration::from_secs(3) };
        let (changes, elapsed) = tokio::task::spawn_blocking(move || -> anyhow::Result<(u64, Duration)> {
            use crdt::map_record::MapRecord;
            use crdt::record::Operation;
            let limits = crdt::text::TextLimits::default();
            let mut records = Vec::new();
            for index in 0..1000_u64 {
                let mut record = MapRecord::new(3);
                record.write(&Operation::Replace(object(json!({"n": index, "site": "bench"}))), &limits)?;
                records.push(record);
            }
            let started = Instant::now();
            let mut changes = 0_u64;
            while started.elapsed() < duration {
                for _ in 0..100 {
                    let record = &mut records[(changes % 1000) as usize];
                    let patch = Operation::MergePatch(object(json!({"n": changes, "note": "a small patch"})));
                    if record.write(&patch, &limits)?.is_some() {
                        changes += 1;
                    }
                }
            }
            Ok((changes, started.elapsed()))
        })
        .await??;
        Ok(vec![
            Figure::new(
                "ceiling.yrs_changes_per_second",
                "yrs record changes/s",
                changes as f64 / elapsed.as_secs_f64(),
                "/s",
            )
            .note("MapRecord::write of the same patches, one core"),
        ])
    }

    async fn start(
        &self,
        name: &'static str,
        seeds: Vec<std::net::SocketAddr>,
        online: bool,
    ) -> anyhow::Result<NodeProcess> {
        NodeProcess::start(&self.nodes, name, &seeds, online).await
    }

    async fn commit_totals(&self, node: &NodeProcess) -> anyhow::Result<CommitTotals> {
        let response = self.http.get(format!("{}/metrics", node.api)).send().await?.error_for_status()?;
        Ok(CommitTotals::parse(&response.text().await?))
    }

    async fn status(&self, node: &NodeProcess) -> anyhow::Result<Value> {
        let response = self.http.get(format!("{}/v1/status", node.api)).send().await?.error_for_status()?;
        Ok(response.json().await?)
    }

    /// Waits until every node reports the same digest and version vector.
    async fn converge(&self, nodes: &[&NodeProcess]) -> anyhow::Result<Duration> {
        let started = Instant::now();
        while started.elapsed() < CONVERGENCE_DEADLINE {
            let mut statuses = Vec::new();
            for node in nodes {
                statuses.push(self.status(node).await?);
            }
            if statuses.windows(2).all(|pair| {
                pair[0]["digest"] == pair[1]["digest"] && pair[0]["version_vector"] == pair[1]["version_vector"]
            }) {
                return Ok(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bail!("the nodes did not converge within {CONVERGENCE_DEADLINE:?}")
    }

    /// `CLIENTS` concurrent writers over `apis` until `deadline` or until `count` writes were
    /// issued. Records are `{collection}/{prefix}{index}`; with `patches`, every fourth write is
    /// a merge patch of the previous index instead of a put.
    async fn hammer(
        &self,
        apis: &[String],
        collection: &str,
        prefix: &str,
        deadline: Option<Duration>,
        count: Option<u64>,
        patches: bool,
    ) -> Hammered {
        let next = AtomicU64::new(0);
        let acknowledged = AtomicU64::new(0);
        let refused = AtomicU64::new(0);
        let started = Instant::now();
        let client = |worker: usize| {
            let (next, acknowledged, refused) = (&next, &acknowledged, &refused);
            let api = &apis[worker % apis.len()];
            async move {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if count.is_some_and(|count| index >= count)
                        || deadline.is_some_and(|deadline| started.elapsed() >= deadline)
                    {
                        return;
                    }
                    let patch = patches && index % 4 == 3;
                    let (method, id, body) = if patch {
                        (reqwest::Method::PATCH, index - 1, json!({"n": index, "patched": true}))
                    } else {
                        (reqwest::Method::PUT, index, small_record(index))
                    };
                    let url = format!("{api}/v1/collections/{collection}/records/{prefix}{id}");
                    match self.http.request(method, url).json(&body).send().await {
                        Ok(response) if response.status() == reqwest::StatusCode::OK => {
                            let _ = response.bytes().await;
                            acknowledged.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        };
        futures::future::join_all((0..CLIENTS).map(client)).await;
        Hammered { acknowledged: acknowledged.into_inner(), refused: refused.into_inner(), elapsed: started.elapsed() }
    }

    /// `BATCH_CLIENTS` concurrent clients posting batches of `BATCH_WRITES` writes (3 puts of new
    /// records to 1 patch) to `POST /v1/batch` until `duration` has passed.
    async fn hammer_batches(&self, api: &str, collection: &str, duration: Duration) -> Hammered {
        let next = AtomicU64::new(0);
        let acknowledged = AtomicU64::new(0);
        let refused = AtomicU64::new(0);
        let started = Instant::now();
        let client = |_worker: usize| {
            let (next, acknowledged, refused) = (&next, &acknowledged, &refused);
            async move {
                while started.elapsed() < duration {
                    let first = next.fetch_add(BATCH_WRITES, Ordering::Relaxed);
                    let writes: Vec<Value> = (first..first + BATCH_WRITES)
                        .map(|index| {
                            if index % 4 == 3 {
                                json!({"op": "patch", "collection": collection, "id": format!("b{}", index - 1),
                                       "value": {"n": index, "patched": true}})
                            } else {
                                json!({"op": "put", "collection": collection, "id": format!("b{index}"),
                                       "value": small_record(index)})
                            }
                        })
                        .collect();
                    let response = self.http.post(format!("{api}/v1/batch")).json(&writes).send().await;
                    let body: Option<Value> = match response {
                        Ok(response) if response.status() == reqwest::StatusCode::OK => response.json().await.ok(),
                        _ => None,
                    };
                    let succeeded = body
                        .as_ref()
                        .and_then(|body| body["results"].as_array())
                        .map_or(0, |results| results.iter().filter(|result| result["status"] == 200).count() as u64);
                    acknowledged.fetch_add(succeeded, Ordering::Relaxed);
                    refused.fetch_add(BATCH_WRITES - succeeded, Ordering::Relaxed);
                }
            }
        };
        futures::future::join_all((0..BATCH_CLIENTS).map(client)).await;
        Hammered { acknowledged: acknowledged.into_inner(), refused: refused.into_inner(), elapsed: started.elapsed() }
    }

    /// One node: writes/s, then filled to N records for RSS and disk per record, then a new
    /// node bootstraps from it.
    async fn single_node(&self) -> (Vec<Figure>, anyhow::Result<()>) {
        let mut figures = Vec::new();
        let result = self.single_node_phases(&mut figures).await;
        for name in ["solo", "joiner"] {
            let _ = std::fs::remove_dir_all(self.nodes.root.join(name));
        }
        (figures, result)
    }

    async fn single_node_phases(&self, figures: &mut Vec<Figure>) -> anyhow::Result<()> {
        let mut solo = self.start("solo", Vec::new(), true).await?;
        let rss_before = solo.rss_bytes()?;
        let disk_before = directory_bytes(&self.nodes.root.join("solo"))?;
        let result = async {
            let apis = [solo.api.clone()];
            let run = self.hammer(&apis, "throughput", "w", Some(self.settings.throughput_duration), None, true).await;
            figures.push(
                Figure::new("writes.one_node_per_second", "acknowledged writes/s, one node", run.rate(), "/s")
                    .note(format!("{CLIENTS} HTTP clients, 3 puts : 1 patch, {} refused", run.refused)),
            );
            let yrs = crate::demo::YRS_COLLECTION;
            let yrs_run = self.hammer(&apis, yrs, "w", Some(self.settings.throughput_duration), None, true).await;
            figures.push(
                Figure::new(
                    "writes_yrs.one_node_per_second",
                    "acknowledged writes/s, one node, yrs engine",
                    yrs_run.rate(),
                    "/s",
                )
                .note(format!("the same load on a collection of the yrs record engine, {} refused", yrs_run.refused)),
            );
            println!("  one node, yrs engine: {:.0} writes/s", yrs_run.rate());
            for (key, label, collection) in [
                ("writes_batched.one_node_per_second", "acknowledged writes/s, one node, batches of 100", "batched"),
                ("writes_yrs_batched.one_node_per_second", "acknowledged writes/s, one node, yrs engine, batches of 100", yrs),
            ] {
                let batched = self.hammer_batches(&solo.api, collection, self.settings.throughput_duration).await;
                figures.push(Figure::new(key, label, batched.rate(), "/s").note(format!(
                    "{BATCH_CLIENTS} HTTP clients posting /v1/batch of {BATCH_WRITES} writes (3 puts : 1 patch); a write counts once its batch is answered and it succeeded; {} refused",
                    batched.refused
                )));
                println!("  {label}: {:.0}/s", batched.rate());
            }
            let held = self.status(&solo).await?["record_count"].as_u64().unwrap_or(0);
            let missing = self.settings.records.saturating_sub(held);
            let fill = self.hammer(&apis, "fill", "f", None, Some(missing), false).await;
            let records = self.status(&solo).await?["record_count"].as_u64().unwrap_or(0);
            if records == 0 {
                bail!("the node holds no records");
            }
            let rss_after = solo.rss_bytes()?;
            let disk_after = directory_bytes(&self.nodes.root.join("solo"))?;
            figures.push(
                Figure::new(
                    "memory.rss_bytes_per_record",
                    "RSS per record",
                    rss_after.saturating_sub(rss_before) as f64 / records as f64,
                    "B",
                )
                .note(format!(
                    "the node process's VmRSS {} → {} MB over {records} records{}",
                    rss_before >> 20,
                    rss_after >> 20,
                    if records < 100_000 { "; the bounded caches are still filling at this N" } else { "" }
                )),
            );
            figures.push(
                Figure::new(
                    "disk.bytes_per_record",
                    "disk per record",
                    disk_after.saturating_sub(disk_before) as f64 / records as f64,
                    "B",
                )
                .note(format!("data dir {} MB, history, log and feed included", disk_after >> 20)),
            );
            let filled = if fill.acknowledged > 0 { format!(" at {:.0}/s", fill.rate()) } else { String::new() };
            println!("  one node: {:.0} writes/s; holds {records} records{filled}", run.rate());

            let solo_peer = solo.peer.context("the solo node has a peer address")?;
            let started = Instant::now();
            let mut joiner = self.start("joiner", vec![solo_peer], true).await?;
            let converged = self.converge(&[&solo, &joiner]).await;
            let elapsed = started.elapsed();
            joiner.stop().await?;
            converged?;
            figures.push(
                Figure::new("bootstrap.seconds", "bootstrap of a new node", elapsed.as_secs_f64(), "s")
                    .note(format!("{records} records, from start to equal digests")),
            );
            figures.push(Figure::new(
                "bootstrap.records_per_second",
                "bootstrap rate",
                records as f64 / elapsed.as_secs_f64(),
                "/s",
            ));
            Ok::<_, anyhow::Error>(())
        }
        .await;
        let stopped = solo.stop().await;
        result?;
        stopped?;
        figures.push(self.disk_breakdown().await);
        Ok(())
    }

    /// Where the single node's disk went: the entries and bytes of each keyspace (a scan of the
    /// stopped node's store), against the records it holds.
    async fn disk_breakdown(&self) -> Figure {
        let directory = self.nodes.root.join("solo");
        let usage = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let store = store::Store::open(&directory)?;
            let counters = store.meta("counters")?.unwrap_or_default();
            Ok((store.usage()?, crate::engine::stored_record_count(&counters)))
        })
        .await;
        let missing = |reason: &str| Figure::missing("disk.stored_bytes_per_record", STORED_BYTES_LABEL, "B", reason);
        let (usage, records) = match usage {
            Ok(Ok((usage, Some(records)))) if records > 0 => (usage, records),
            Ok(Ok(_)) => return missing("no records counted"),
            Ok(Err(error)) => return missing(&error.to_string()),
            Err(error) => return missing(&error.to_string()),
        };
        let total: u64 = usage.iter().map(|keyspace| keyspace.key_bytes + keyspace.value_bytes).sum();
        let parts: Vec<String> = usage
            .iter()
            .filter(|keyspace| keyspace.entries > 0)
            .map(|keyspace| {
                format!(
                    "{} {:.2}/record × {:.0} B",
                    keyspace.keyspace,
                    keyspace.entries as f64 / records as f64,
                    (keyspace.key_bytes + keyspace.value_bytes) as f64 / keyspace.entries as f64
                )
            })
            .collect();
        Figure::new("disk.stored_bytes_per_record", STORED_BYTES_LABEL, total as f64 / records as f64, "B")
            .note(format!("{records} records: {}", parts.join(", ")))
    }

    /// Three nodes: writes/s, latency at 1k/s and 5k/s, then catch-up of the third.
    async fn cluster(&self) -> (Vec<Figure>, anyhow::Result<()>) {
        let mut figures = Vec::new();
        let result = self.cluster_nodes(&mut figures).await;
        (figures, result)
    }

    async fn cluster_nodes(&self, figures: &mut Vec<Figure>) -> anyhow::Result<()> {
        let mut node_a = self.start("node-a", Vec::new(), true).await?;
        let peer_a = node_a.peer.context("node-a has a peer address")?;
        let mut node_b = self.start("node-b", vec![peer_a], true).await?;
        let peer_b = node_b.peer.context("node-b has a peer address")?;
        let mut node_c = self.start("node-c", vec![peer_a, peer_b], true).await?;
        let result = self.cluster_phases(&node_a, &node_b, &mut node_c, [peer_a, peer_b], figures).await;
        let mut stopped = Ok(());
        for node in [&mut node_a, &mut node_b, &mut node_c] {
            stopped = stopped.and(node.stop().await);
        }
        result?;
        stopped
    }

    async fn cluster_phases(
        &self,
        node_a: &NodeProcess,
        node_b: &NodeProcess,
        node_c: &mut NodeProcess,
        seeds: [std::net::SocketAddr; 2],
        figures: &mut Vec<Figure>,
    ) -> anyhow::Result<()> {
        self.converge(&[node_a, node_b, node_c]).await?;
        let apis = [node_a.api.clone(), node_b.api.clone(), node_c.api.clone()];
        let run = self.hammer(&apis, "throughput", "w", Some(self.settings.throughput_duration), None, true).await;
        figures.push(
            Figure::new("writes.three_nodes_per_second", "acknowledged writes/s, three nodes", run.rate(), "/s").note(
                format!("{CLIENTS} HTTP clients spread over the three, 3 puts : 1 patch, {} refused", run.refused),
            ),
        );
        println!("  three nodes: {:.0} writes/s", run.rate());
        self.converge(&[node_a, node_b, node_c]).await?;

        // The last phase offers the same load on a collection of the yrs record engine: the same
        // HTTP, engine, mesh and feed path with a cheaper CRDT, so what is automerge's share of
        // the latency shows.
        let automerge = |rate, name, collection| Latency { rate, name, collection, key: "latency", label: "" };
        let phases = [
            automerge(1000, "1k", "latency_1k"),
            automerge(5000, "5k", "latency_5k"),
            Latency {
                rate: 5000,
                name: "5k",
                collection: crate::demo::YRS_COLLECTION,
                key: "latency_yrs",
                label: ", yrs engine",
            },
        ];
        for phase in phases {
            let measured = self.latency(node_a, [node_b, node_c], phase).await?;
            figures.extend(measured);
            self.converge(&[node_a, node_b, node_c]).await?;
        }

        // Catch-up of records new to the node.
        node_c.stop().await?;
        let count = self.settings.catch_up_records;
        let online = [node_a.api.clone(), node_b.api.clone()];
        let written = self.hammer(&online, "catch_up", "n", None, Some(count), false).await;
        self.converge(&[node_a, node_b]).await?;
        let started = Instant::now();
        *node_c = self.start("node-c", seeds.to_vec(), true).await?;
        self.converge(&[node_a, node_b, node_c]).await?;
        let elapsed = started.elapsed();
        figures.push(
            Figure::new(
                "catch_up.new_records_per_second",
                "catch-up, records new to the node",
                written.acknowledged as f64 / elapsed.as_secs_f64(),
                "/s",
            )
            .note(format!(
                "{} records written while node-c was offline; {:.1} s from its restart to equal digests",
                written.acknowledged,
                elapsed.as_secs_f64()
            )),
        );
        println!("  catch-up of {} new records: {:.1} s", written.acknowledged, elapsed.as_secs_f64());

        // Catch-up of records changed on both sides.
        let shared = self.settings.catch_up_shared.min(written.acknowledged);
        node_c.stop().await?;
        *node_c = self.start("node-c", Vec::new(), false).await?;
        let offline = self.patch_range(&node_c.api, shared, "offline").await?;
        node_c.stop().await?;
        let online = self.patch_range(&node_a.api, shared, "online").await?;
        let started = Instant::now();
        *node_c = self.start("node-c", seeds.to_vec(), true).await?;
        self.converge(&[node_a, node_b, node_c]).await?;
        let elapsed = started.elapsed();
        figures.push(
            Figure::new(
                "catch_up.both_changed_records_per_second",
                "catch-up, records changed on both sides",
                shared as f64 / elapsed.as_secs_f64(),
                "/s",
            )
            .note(format!(
                "{shared} records patched on node-a ({online} acknowledged) and on node-c offline ({offline}); {:.1} s \
                 from its restart to equal digests",
                elapsed.as_secs_f64()
            )),
        );
        println!("  catch-up of {shared} records changed on both sides: {:.1} s", elapsed.as_secs_f64());
        Ok(())
    }

    /// Patches `catch_up/n0 .. n{count}` on `api`, 64 at a time; returns how many were acknowledged.
    async fn patch_range(&self, api: &str, count: u64, side: &str) -> anyhow::Result<u64> {
        let acknowledged = futures::stream::iter(0..count)
            .map(|index| {
                let url = format!("{api}/v1/collections/catch_up/records/n{index}");
                let body = json!({ side: index, "side": side });
                async move {
                    matches!(
                        self.http.patch(url).json(&body).send().await,
                        Ok(response) if response.status() == reqwest::StatusCode::OK
                    )
                }
            })
            .buffer_unordered(CLIENTS)
            .filter(|acknowledged| futures::future::ready(*acknowledged))
            .count()
            .await;
        Ok(acknowledged as u64)
    }

    /// Writes at the phase's rate to `writer` on a fixed schedule and matches each key on the
    /// change feeds of `readers`. Latency is from the scheduled time of a write (so a slow
    /// acknowledgement counts against it) to the moment the last reader's feed carries it.
    async fn latency(
        &self,
        writer: &NodeProcess,
        readers: [&NodeProcess; 2],
        phase: Latency,
    ) -> anyhow::Result<Vec<Figure>> {
        let Latency { rate, name, collection, key, label: engine } = phase;
        let collection = collection.to_owned();
        let probes: Arc<Mutex<HashMap<String, Probe>>> = Arc::default();
        let mut feeds = Vec::new();
        for (reader_index, reader) in readers.iter().enumerate() {
            let since = self.status(reader).await?["feed_sequence"].as_u64().unwrap_or(0);
            let response = self
                .http
                .get(format!("{}/v1/changes?since={since}", reader.api))
                .header(reqwest::header::ACCEPT, "application/x-ndjson")
                .send()
                .await?
                .error_for_status()?;
            feeds.push(tokio::spawn(follow_feed(response, collection.clone(), reader_index, probes.clone())));
        }
        let commits_before = [self.commit_totals(writer).await?, self.commit_totals(readers[0]).await?];
        let cpu = CpuShares::start(&[writer, readers[0], readers[1]]);
        let in_flight = Arc::new(tokio::sync::Semaphore::new(LATENCY_IN_FLIGHT_MAX));
        let acknowledged = Arc::new(AtomicU64::new(0));
        let total = rate * self.settings.latency_duration.as_secs();
        let started = Instant::now();
        // The schedule runs on a thread of its own: tokio's timer rounds every sleep up to the
        // next millisecond, which at 5k/s would issue each write up to a millisecond late and
        // charge that to the nodes. A thread's sleep overshoots by tens of microseconds (the
        // note reports how late writes went out).
        let writes = {
            let (runtime, http, probes) = (tokio::runtime::Handle::current(), self.http.clone(), probes.clone());
            let (acknowledged, api) = (acknowledged.clone(), writer.api.clone());
            let collection = collection.clone();
            tokio::task::spawn_blocking(move || {
                let mut writes = Vec::with_capacity(total as usize);
                for issued in 0..total {
                    let scheduled = started + Duration::from_secs_f64(issued as f64 / rate as f64);
                    if let Some(ahead) = scheduled.checked_duration_since(Instant::now()) {
                        std::thread::sleep(ahead);
                    }
                    let id = format!("p{issued}");
                    probes
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(id.clone(), Probe { scheduled, sent: None, acknowledged: None, seen: [None, None] });
                    let url = format!("{api}/v1/collections/{collection}/records/{id}");
                    let (http, in_flight, acknowledged) = (http.clone(), in_flight.clone(), acknowledged.clone());
                    let probes = probes.clone();
                    writes.push(runtime.spawn(async move {
                        let Ok(_permit) = in_flight.acquire_owned().await else { return };
                        let sent = Instant::now();
                        if let Ok(response) = http.put(url).json(&json!({"n": 1, "site": "bench"})).send().await
                            && response.status() == reqwest::StatusCode::OK
                        {
                            let now = Instant::now();
                            acknowledged.fetch_add(1, Ordering::Relaxed);
                            if let Some(probe) = probes.lock().unwrap_or_else(PoisonError::into_inner).get_mut(&id) {
                                probe.sent = Some(sent);
                                probe.acknowledged = Some(now);
                            }
                        }
                    }));
                }
                writes
            })
            .await?
        };
        let offered_for = started.elapsed();
        futures::future::join_all(writes).await;
        let acknowledged_for = started.elapsed();
        let cpu = cpu.since();
        let acknowledged = acknowledged.load(Ordering::Relaxed);
        let waited = Instant::now();
        loop {
            let pending = probes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
                .filter(|probe| probe.seen.iter().any(Option::is_none))
                .count() as u64;
            if pending <= total - acknowledged || waited.elapsed() > Duration::from_secs(30) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for feed in feeds {
            feed.abort();
        }
        let commits_after = [self.commit_totals(writer).await?, self.commit_totals(readers[0]).await?];
        let (mut latencies, mut acknowledgements, mut after_acknowledgement) = (Vec::new(), Vec::new(), Vec::new());
        let mut late = Vec::new();
        for probe in probes.lock().unwrap_or_else(PoisonError::into_inner).values() {
            let (Some(sent), Some(acknowledged)) = (probe.sent, probe.acknowledged) else { continue };
            late.push(sent.saturating_duration_since(probe.scheduled));
            acknowledgements.push(acknowledged.saturating_duration_since(probe.scheduled));
            let (Some(first), Some(second)) = (probe.seen[0], probe.seen[1]) else { continue };
            let readable = first.max(second);
            latencies.push(readable.saturating_duration_since(probe.scheduled));
            after_acknowledgement.push(readable.saturating_duration_since(acknowledged));
        }
        for list in [&mut latencies, &mut acknowledgements, &mut after_acknowledgement, &mut late] {
            list.sort();
        }
        if latencies.is_empty() {
            bail!("no write at {name}/s reached both readers");
        }
        let achieved = acknowledged as f64 / acknowledged_for.as_secs_f64();
        let note = format!(
            "offered {total} writes over {:.1} s, {acknowledged} acknowledged ({achieved:.0}/s), {} seen on both; \
             sent p50 {:.0} µs p99 {:.0} µs after the scheduled time; from the scheduled time: acknowledged p50 {:.1} \
             ms p99 {:.1} ms; from the acknowledgement to readable on both: p50 {:.1} ms p99 {:.1} ms",
            offered_for.as_secs_f64(),
            latencies.len(),
            percentile(&late, 0.5).as_secs_f64() * 1e6,
            percentile(&late, 0.99).as_secs_f64() * 1e6,
            milliseconds(percentile(&acknowledgements, 0.5)),
            milliseconds(percentile(&acknowledgements, 0.99)),
            milliseconds(percentile(&after_acknowledgement, 0.5)),
            milliseconds(percentile(&after_acknowledgement, 0.99)),
        );
        let [writer_commits, reader_commits] = [0, 1].map(|node| commits_after[node].since(&commits_before[node]));
        let note = format!(
            "{note}; group commits on the writer {writer_commits}, on a reader {reader_commits}; CPU while writing: {cpu}"
        );
        let note =
            if achieved < rate as f64 * 0.9 { format!("{note}; the offered load was not sustained") } else { note };
        println!(
            "  latency at {name}/s{engine}: p50 {:.1} ms, p99 {:.1} ms",
            milliseconds(percentile(&latencies, 0.5)),
            milliseconds(percentile(&latencies, 0.99))
        );
        let label = |what: &str| format!("replication latency {what} at {name}/s{engine}");
        Ok(vec![
            Figure::new(
                &format!("{key}.{name}.p50_ms"),
                &label("p50"),
                milliseconds(percentile(&latencies, 0.5)),
                "ms",
            )
            .note(note),
            Figure::new(
                &format!("{key}.{name}.p99_ms"),
                &label("p99"),
                milliseconds(percentile(&latencies, 0.99)),
                "ms",
            ),
            Figure::new(
                &format!("{key}.{name}.max_ms"),
                &label("max"),
                milliseconds(percentile(&latencies, 1.0)),
                "ms",
            ),
        ])
    }
}

/// A node's group commits so far, from its metrics: how many, and the time they took in all,
/// flushes included and flushes alone.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct CommitTotals {
    commits: f64,
    commit_seconds: f64,
    flush_seconds: f64,
}

impl CommitTotals {
    /// Reads the totals from a node's `/metrics` text.
    fn parse(metrics: &str) -> CommitTotals {
        let value = |name: &str| {
            metrics
                .lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        CommitTotals {
            commits: value("concord_commit_latency_seconds_count"),
            commit_seconds: value("concord_commit_latency_seconds_sum"),
            flush_seconds: value("concord_store_flush_seconds_sum"),
        }
    }

    /// The commits made since `before`, with their mean time and mean flush.
    fn since(&self, before: &CommitTotals) -> String {
        let commits = self.commits - before.commits;
        let mean = |seconds: f64| if commits > 0.0 { seconds * 1e3 / commits } else { 0.0 };
        format!(
            "{commits:.0}, {:.2} ms each of which the flush {:.2} ms",
            mean(self.commit_seconds - before.commit_seconds),
            mean(self.flush_seconds - before.flush_seconds)
        )
    }
}

/// One latency phase: the offered writes per second and its name, the collection written, and
/// the figures' key prefix and label suffix.
#[derive(Clone, Copy)]
struct Latency {
    rate: u64,
    name: &'static str,
    collection: &'static str,
    key: &'static str,
    label: &'static str,
}

/// A write under observation: when it was due, and when each reader's feed carried it.
struct Probe {
    scheduled: Instant,
    /// When the request went out: after its schedule, by the scheduler's lateness, or by waiting
    /// for one of the writes in flight.
    sent: Option<Instant>,
    /// When node A acknowledged the write.
    acknowledged: Option<Instant>,
    seen: [Option<Instant>; 2],
}

/// The fields of a feed line the latency phases look at; the rest (the value) is skipped.
#[derive(serde::Deserialize)]
struct FeedLine<'a> {
    #[serde(borrow)]
    collection: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
}

/// Reads an NDJSON change feed and stamps each probe of `collection` it carries. The load
/// generator shares the machine with the nodes it measures, so it reads each chunk's lines in
/// place and takes the probes' lock once per chunk.
async fn follow_feed(
    response: reqwest::Response,
    collection: String,
    reader: usize,
    probes: Arc<Mutex<HashMap<String, Probe>>>,
) {
    let mut stream = response.bytes_stream();
    let mut buffer: Vec<u8> = Vec::new();
    while let Some(Ok(chunk)) = stream.next().await {
        let now = Instant::now();
        buffer.extend_from_slice(&chunk);
        let Some(complete) = buffer.iter().rposition(|&byte| byte == b'\n') else { continue };
        {
            let mut probes = probes.lock().unwrap_or_else(PoisonError::into_inner);
            for line in buffer[..complete].split(|&byte| byte == b'\n') {
                let Ok(event) = serde_json::from_slice::<FeedLine<'_>>(line) else { continue };
                if event.collection != collection.as_str() {
                    continue;
                }
                if let Some(probe) = probes.get_mut(event.id.as_ref()) {
                    probe.seen[reader].get_or_insert(now);
                }
            }
        }
        buffer.drain(..=complete);
    }
}

async fn connected(
    events: &mut tokio::sync::mpsc::Receiver<transport::PeerEvent>,
) -> anyhow::Result<transport::PeerId> {
    loop {
        match events.recv().await {
            Some(transport::PeerEvent::Connected { peer_id, .. }) => return Ok(peer_id),
            Some(_) => {}
            None => bail!("the endpoint closed before connecting"),
        }
    }
}

async fn next_frame(events: &mut tokio::sync::mpsc::Receiver<transport::PeerEvent>) -> anyhow::Result<()> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await? {
            Some(transport::PeerEvent::Frame { .. }) => return Ok(()),
            Some(transport::PeerEvent::Disconnected { reason, .. }) => bail!("the peer disconnected: {reason}"),
            Some(_) => {}
            None => bail!("the endpoint closed"),
        }
    }
}

fn object(value: Value) -> serde_json::Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => serde_json::Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_totals_read_a_node_s_metrics_and_say_what_a_phase_added() {
        let metrics = crate::metrics::Metrics::default();
        let gauges = crate::metrics::Gauges { quarantine_size: 0, store_bytes: 0, records: 0, feed_sequence: 0 };
        let before = CommitTotals::parse(&metrics.render(&gauges));
        assert_eq!(before, CommitTotals::default());
        for _ in 0..4 {
            metrics.observe_commit(Duration::from_millis(2), 10);
            metrics.flush_latency.observe(Duration::from_millis(1));
        }
        let after = CommitTotals::parse(&metrics.render(&gauges));
        assert_eq!(after.commits, 4.0);
        assert!((after.commit_seconds - 0.008).abs() < 1e-9, "{after:?}");
        assert!((after.flush_seconds - 0.004).abs() < 1e-9, "{after:?}");
        assert_eq!(after.since(&before), "4, 2.00 ms each of which the flush 1.00 ms");
        assert_eq!(after.since(&after), "0, 0.00 ms each of which the flush 0.00 ms");
    }
}
