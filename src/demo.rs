//! `concord demo`: a three-node cluster on loopback that shows replication, conflicts and
//! offline catch-up, then exits 0 only if every node converged to the same state.
//!
//! The nodes run in this process (each with its own sled store, API and QUIC endpoint, talking
//! over real sockets with mutual TLS), so the demo needs no setup and cleans up after itself.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::NodeConfig;
use crate::mesh::MeshConfig;

const NAMES: [&str; 3] = ["hq", "store-1", "store-2"];
/// How long to wait for convergence before calling the run a failure.
const CONVERGENCE_DEADLINE: Duration = Duration::from_secs(60);

/// The collection the demo's and the bench's nodes keep on the yrs record engine.
pub const YRS_COLLECTION: &str = "events";

/// One node of the demo, running as tasks of this process (`concord bench` runs its nodes as
/// processes of their own instead: see `bench::process`).
pub(crate) struct DemoNode {
    pub(crate) name: &'static str,
    pub(crate) api: String,
    pub(crate) peer: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl DemoNode {
    pub(crate) async fn start(
        root: &Path,
        certs: &Path,
        name: &'static str,
        seeds: Vec<SocketAddr>,
        online: bool,
        write_workers: usize,
    ) -> anyhow::Result<DemoNode> {
        let data_dir = root.join(name);
        std::fs::create_dir_all(&data_dir)?;
        for file in [crate::node::API_ADDRESS_FILE, crate::node::PEER_ADDRESS_FILE] {
            let _ = std::fs::remove_file(data_dir.join(file));
        }
        let mesh = online.then(|| MeshConfig {
            listen_peer: SocketAddr::from(([127, 0, 0, 1], 0)),
            seeds,
            certs_dir: certs.to_path_buf(),
            cluster: None,
            advertise_peer: None,
            membership: crate::membership::MembershipSettings::default(),
        });
        let config = NodeConfig {
            name: Some(name.to_owned()),
            data_dir: data_dir.clone(),
            listen_api: SocketAddr::from(([127, 0, 0, 1], 0)),
            tokens: Vec::new(),
            mesh,
            cache_documents: 4096,
            write_workers,
            store_cache_bytes: store::CACHE_BYTES_DEFAULT,
            body_bytes_max: 1 << 20,
            log_retention: crate::engine::LOG_RETENTION_DEFAULT,
            yrs_collections: vec![YRS_COLLECTION.to_owned()],
            audit_retention: crate::engine::AUDIT_RETENTION_DEFAULT,
            feed_retention: crate::engine::FEED_RETENTION_DEFAULT,
            connectors: Vec::new(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(crate::node::run_until(config, async move {
            let _ = stopped.await;
        }));
        let api = format!("http://{}", wait_for_file(&data_dir.join(crate::node::API_ADDRESS_FILE)).await?);
        let peer = if online {
            Some(wait_for_file(&data_dir.join(crate::node::PEER_ADDRESS_FILE)).await?.parse()?)
        } else {
            None
        };
        Ok(DemoNode { name, api, peer, stop: Some(stop), task: Some(task) })
    }

    pub(crate) async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.context("node task")??;
        }
        Ok(())
    }
}

async fn wait_for_file(path: &Path) -> anyhow::Result<String> {
    for _ in 0..600 {
        if let Ok(text) = std::fs::read_to_string(path) {
            return Ok(text);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("{} did not appear: the node did not start", path.display())
}

/// A small HTTP client for the demo's requests.
struct Api {
    http: reqwest::Client,
}

impl Api {
    async fn send(&self, method: reqwest::Method, url: String, body: Option<Value>) -> anyhow::Result<Value> {
        let mut request = self.http.request(method, &url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.with_context(|| url.clone())?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{url}: {status}: {body}");
        }
        Ok(body)
    }

    async fn put(&self, node: &DemoNode, collection: &str, id: &str, value: Value) -> anyhow::Result<Value> {
        self.send(reqwest::Method::PUT, format!("{}/v1/collections/{collection}/records/{id}", node.api), Some(value))
            .await
    }

    async fn patch(&self, node: &DemoNode, collection: &str, id: &str, value: Value) -> anyhow::Result<Value> {
        self.send(reqwest::Method::PATCH, format!("{}/v1/collections/{collection}/records/{id}", node.api), Some(value))
            .await
    }

    async fn increment(
        &self,
        node: &DemoNode,
        collection: &str,
        id: &str,
        field: &str,
        by: i64,
    ) -> anyhow::Result<Value> {
        let url = format!("{}/v1/collections/{collection}/records/{id}/increment", node.api);
        self.send(reqwest::Method::POST, url, Some(json!({"field": field, "by": by}))).await
    }

    async fn get(&self, node: &DemoNode, collection: &str, id: &str) -> Option<Value> {
        self.send(reqwest::Method::GET, format!("{}/v1/collections/{collection}/records/{id}", node.api), None)
            .await
            .ok()
    }

    async fn status(&self, node: &DemoNode) -> anyhow::Result<Value> {
        self.send(reqwest::Method::GET, format!("{}/v1/status", node.api), None).await
    }

    /// Writes `count` records to `node`, 32 at a time.
    async fn write_many(&self, node: &DemoNode, collection: &str, prefix: &str, count: usize) -> anyhow::Result<()> {
        let results: Vec<anyhow::Result<Value>> = futures::stream::iter(0..count)
            .map(|index| {
                let value = json!({"site": node.name, "n": index, "note": format!("written at {} while the demo ran", node.name)});
                async move { self.put(node, collection, &format!("{prefix}-{index:05}"), value).await }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        results.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
        Ok(())
    }

    /// Waits until all nodes report the same digest and version vector; returns how long it took.
    async fn converge(&self, nodes: &[&DemoNode]) -> anyhow::Result<(Duration, String)> {
        let started = Instant::now();
        while started.elapsed() < CONVERGENCE_DEADLINE {
            let mut statuses = Vec::new();
            for node in nodes {
                statuses.push(self.status(node).await?);
            }
            let same = statuses.windows(2).all(|pair| {
                pair[0]["digest"] == pair[1]["digest"] && pair[0]["version_vector"] == pair[1]["version_vector"]
            });
            if same {
                return Ok((started.elapsed(), statuses[0]["digest"].as_str().unwrap_or("").to_owned()));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        bail!("the nodes did not converge within {CONVERGENCE_DEADLINE:?}")
    }
}

fn milliseconds(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted.get(index).copied().unwrap_or_default()
}

/// Step 1 on one node: 200 customers and 10 widget sales.
async fn write_at_once(api: &Api, node: &DemoNode) -> anyhow::Result<()> {
    api.write_many(node, "customers", &format!("{}-customer", node.name), 200).await?;
    for _ in 0..10 {
        api.increment(node, "inventory", "widget", "sold", 1).await?;
    }
    Ok(())
}

/// Runs the demo in `root` (a temporary folder when `None`). Returns whether all converged.
/// A fresh cluster CA for `cluster` in `certs`, and a day-long certificate for each of `names`
/// on 127.0.0.1: what a local cluster (the demo, `concord bench`) needs.
pub(crate) fn loopback_certificates(certs: &Path, cluster: &str, names: &[&str]) -> anyhow::Result<()> {
    transport::create_cluster_ca(certs, cluster)?;
    for name in names {
        transport::issue_node_certificate(
            certs,
            name,
            &["127.0.0.1".parse()?],
            &[],
            transport::Validity::days_from_now(1),
        )?;
    }
    Ok(())
}

pub async fn run(root: Option<PathBuf>) -> anyhow::Result<bool> {
    let temporary = tempfile::Builder::new().prefix("concord-demo-").tempdir()?;
    let root = root.unwrap_or_else(|| temporary.path().to_path_buf());
    let certs = root.join("certs");
    loopback_certificates(&certs, "demo", &NAMES)?;
    let api = Api { http: reqwest::Client::new() };

    println!("Concord demo: three nodes on loopback, QUIC with mutual TLS under a fresh cluster CA");
    println!("  data and certificates in {}", root.display());
    let hq = DemoNode::start(&root, &certs, NAMES[0], vec![], true, crate::engine::default_workers()).await?;
    let hq_peer = hq.peer.context("hq has a peer address")?;
    let store_one =
        DemoNode::start(&root, &certs, NAMES[1], vec![hq_peer], true, crate::engine::default_workers()).await?;
    let store_one_peer = store_one.peer.context("store-1 has a peer address")?;
    let mut store_two =
        DemoNode::start(&root, &certs, NAMES[2], vec![hq_peer, store_one_peer], true, crate::engine::default_workers())
            .await?;
    for node in [&hq, &store_one, &store_two] {
        println!(
            "  {:<8} api {}  peer {}",
            node.name,
            node.api,
            node.peer.map(|peer| peer.to_string()).unwrap_or_default()
        );
    }

    println!("\n1. All three sites write at once");
    let started = Instant::now();
    let (first, second, third) =
        tokio::join!(write_at_once(&api, &hq), write_at_once(&api, &store_one), write_at_once(&api, &store_two));
    first?;
    second?;
    third?;
    let written = started.elapsed();
    let (converged, digest) = api.converge(&[&hq, &store_one, &store_two]).await?;
    println!("   600 records and 30 counter increments written in {}", milliseconds(written));
    println!("   every node holds all of them {} later (digest {}…)", milliseconds(converged), &digest[..16]);
    let widget = api.get(&hq, "inventory", "widget").await.unwrap_or(Value::Null);
    println!("   inventory/widget sold = {} (10 increments on each node add up)", widget["value"]["sold"]);

    println!("\n2. store-2 goes offline; everyone keeps writing");
    api.put(&hq, "orders", "o-1", json!({"status": "new", "qty": 1, "customer": "hq-customer-00001"})).await?;
    api.converge(&[&hq, &store_one, &store_two]).await?;
    store_two.stop().await?;
    store_two = DemoNode::start(&root, &certs, NAMES[2], vec![], false, crate::engine::default_workers()).await?;
    api.patch(&hq, "orders", "o-1", json!({"status": "paid", "qty": 3})).await?;
    api.patch(&store_two, "orders", "o-1", json!({"status": "cancelled", "note": "customer called the shop"})).await?;
    api.increment(&hq, "inventory", "widget", "sold", 5).await?;
    api.increment(&store_two, "inventory", "widget", "sold", 7).await?;
    let (online_writes, offline_writes) = tokio::join!(
        async {
            api.write_many(&hq, "orders", "hq-order", 1000).await?;
            api.write_many(&store_one, "orders", "store-1-order", 1000).await
        },
        api.write_many(&store_two, "orders", "store-2-order", 300)
    );
    online_writes?;
    offline_writes?;
    println!("   online:  hq and store-1 wrote 2000 orders, set orders/o-1 status \"paid\" and qty 3, sold 5 widgets");
    println!("   offline: store-2 wrote 300 orders, set orders/o-1 status \"cancelled\" and a note, sold 7 widgets");

    println!("\n3. store-2 reconnects and catches up in both directions");
    store_two.stop().await?;
    let reconnected = Instant::now();
    store_two =
        DemoNode::start(&root, &certs, NAMES[2], vec![hq_peer, store_one_peer], true, crate::engine::default_workers())
            .await?;
    let (_, digest) = api.converge(&[&hq, &store_one, &store_two]).await?;
    let catch_up = reconnected.elapsed();
    println!(
        "   caught up in {} (restart included): 2000+ changes in, 300+ out (digest {}…)",
        milliseconds(catch_up),
        &digest[..16]
    );
    let order = api.get(&store_two, "orders", "o-1").await.unwrap_or(Value::Null);
    println!("   orders/o-1 on every node: {}", order["value"]);
    for conflict in order["conflicts"].as_array().into_iter().flatten() {
        println!(
            "   conflict on {}: concurrent values {} → {} wins on every node (kept visible until a later write)",
            conflict["field"].as_str().unwrap_or(""),
            conflict["values"],
            order["value"][conflict["field"].as_str().unwrap_or("").trim_start_matches('/')]
        );
    }
    println!(
        "   fields changed on only one side were both kept: qty {} and note {}",
        order["value"]["qty"], order["value"]["note"]
    );
    let widget = api.get(&store_two, "inventory", "widget").await.unwrap_or(Value::Null);
    println!("   inventory/widget sold = {} (30 + 5 online + 7 offline)", widget["value"]["sold"]);

    println!("\n4. Replication latency: a write on hq becoming readable on store-1 and store-2");
    let mut latencies = Vec::new();
    for index in 0..50 {
        let id = format!("latency-{index}");
        let written = Instant::now();
        api.put(&hq, "probes", &id, json!({"n": index})).await?;
        for node in [&store_one, &store_two] {
            while api.get(node, "probes", &id).await.is_none() {
                if written.elapsed() > CONVERGENCE_DEADLINE {
                    bail!("{id} never reached {}", node.name);
                }
            }
        }
        latencies.push(written.elapsed());
    }
    latencies.sort();
    println!(
        "   over 50 writes: p50 {}, p99 {}, max {} (write acknowledged on hq, then readable on both)",
        milliseconds(percentile(&latencies, 0.5)),
        milliseconds(percentile(&latencies, 0.99)),
        milliseconds(latencies[latencies.len() - 1])
    );

    let (_, digest) = api.converge(&[&hq, &store_one, &store_two]).await?;
    let statuses = [api.status(&hq).await?, api.status(&store_one).await?, api.status(&store_two).await?];
    let converged = statuses.iter().all(|status| status["digest"] == statuses[0]["digest"]);
    println!("\n5. Result");
    for (node, status) in [&hq, &store_one, &store_two].iter().zip(&statuses) {
        println!(
            "   {:<8} {} records, digest {}…",
            node.name,
            status["record_count"],
            &status["digest"].as_str().unwrap_or("")[..16]
        );
    }
    if converged {
        println!("   all three nodes hold the same state (digest {}…)", &digest[..16]);
    } else {
        println!("   the nodes differ");
    }
    let mut nodes = [hq, store_one, store_two];
    for node in &mut nodes {
        node.stop().await?;
    }
    Ok(converged)
}
