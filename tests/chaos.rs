//! The chaos harness (issue 4): five real `concord` node processes on loopback, every link
//! between them through a fault-injecting UDP relay, concurrent clients writing through the HTTP
//! API of random nodes, and a seeded nemesis that kills, pauses, partitions and degrades the
//! network about every 10 s. After healing everything it checks that no acknowledged write was
//! lost, that every counter holds exactly its acknowledged increments, that all digests are equal
//! within 60 s of the heal, and that no node's memory grew without bound, and prints a summary.
//!
//! # Running it
//!
//! ```sh
//! cargo test --test chaos -- --nocapture                                   # the short default run
//! CONCORD_CHAOS_SECONDS=600 cargo test --release --test chaos -- --nocapture # ten minutes of faults
//! CONCORD_CHAOS_SEED=12345 cargo test --test chaos -- --nocapture          # replay a fault schedule
//! ```
//! `CONCORD_CHAOS_SECONDS` is how long the workload and the nemesis run (default 45); setup, the
//! heal, convergence and the checks come on top. `CONCORD_CHAOS_SEED` fixes the seed (default:
//! from the clock); the seed is printed first, and the same seed gives the same fault schedule
//! (which faults, on which nodes and links, for how long). Process timing is not replayed: which
//! writes land during a fault differs from run to run. `CONCORD_CHAOS_CACHE_DOCUMENTS` sets the
//! nodes' `cache_documents` (default 512).
//!
//! # Setup
//!
//! Each node listens for peers on its own loopback port and advertises a relay in front of it
//! (`--advertise-peer`), and its seeds are other nodes' relays, so every connection between two
//! nodes goes through the relay of the node that was dialed. A node dials from its one peer
//! socket, so the relay knows which node a datagram comes from: a fault on the link between `a`
//! and `b` is set on `a`'s relay for datagrams from `b` and on `b`'s relay for those from `a`.
//! Nodes run with small caches (512 documents, 16 MiB sled cache) so they reach their memory
//! plateau early and a leak shows as growth.
//!
//! # Workload and what an acknowledgement implies
//!
//! Each writer creates records of its own (`records/w<writer>-<serial>`), edits their `field`,
//! deletes some, and increments shared counters (`counters/c<k>`, field `n`), each operation on a
//! random node. A write answered 200 is acknowledged. A write that never reached a node
//! (connection refused) did not happen. Anything else (a timeout, a reset, another status) is
//! *unknown*: it may or may not have been applied, and may still be applied later (a paused node
//! resumes with the request in hand).
//! - A writer edits or deletes a record only through a node whose copy already shows the writer's
//!   last acknowledged value for it (read first), so each acknowledged write causally follows the
//!   previous one and the last acknowledged value must win. Once a write to a record is unknown,
//!   its writer leaves it alone, and it may end as either outcome.
//! - Counters: with `acked` the sum of acknowledged increments and `unknown` the sum of unknown
//!   ones, each node must read `acked <= value <= acked + unknown` (exactly `acked` when no
//!   increment was unknown).
//!
//! # Nemesis
//!
//! Every 8 to 12 s it takes the next fault from a shuffled round of the four kinds, holds it for
//! 3 to 7 s and undoes it: kill -9 a node and start it again (same data directory); SIGSTOP a node
//! and SIGCONT it; partition the nodes into two sides (one or two nodes against the rest); and
//! degrade links (5-25 % loss, 5-25 % duplication, 1-20 ms delay plus up to 40 ms jitter, on some
//! or all links). A quarter of the kill, pause and partition steps also degrade links meanwhile.
//! The last fault is a partition left in place while the writers go on, for the heal to undo, so
//! the time to converge measures a real catch-up.
//!
//! # Checks after the heal (all relays clean, every node running)
//!
//! - Every node holds every acknowledged record with its last acknowledged value, no record whose
//!   deletion was acknowledged, and no record nobody wrote; unknown outcomes are allowed either way.
//! - Every counter is within its bounds above, on every node.
//! - All nodes report equal digests and version vectors within 60 s of the heal (the only timing
//!   assertion).
//! - Every RSS sample (once a second per node) is below a bound ([`RSS_BOUND_BASE_KIB`] plus the
//!   cache's share), and no node's largest sample in the second half of the run exceeds its
//!   largest in the first half by more than [`RSS_GROWTH_BASE_KIB`] plus the cache's share.
//! - No node process exited on its own.
//!
//! `CONCORD_CHAOS_RSS_TRACE=1` prints every node's RSS samples (seconds, MiB) with the summary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::cluster::{certificates, free_udp_port, start_peer_with, try_converge_within, wait_for_peer};
use support::relay::{Faults, Relay, RelayCounters};
use support::{Node, Random, record_path, temporary_directory, try_proc_status_kib};

const NAMES: [&str; 5] = ["alpha", "bravo", "charlie", "delta", "echo"];
const WRITERS: usize = 6;
const COUNTERS: u64 = 8;
/// A client gives up on a request after this long; the write is then unknown.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
const CHAOS_SECONDS_DEFAULT: u64 = 45;
/// The issue's requirement: all digests equal within this long after the heal.
const CONVERGENCE_REQUIRED: Duration = Duration::from_secs(60);
/// How long to keep waiting past the requirement, to report how long convergence did take.
const CONVERGENCE_GUARD: Duration = Duration::from_secs(120);
/// Every RSS sample stays below this plus [`DOCUMENT_KIB`] per cached document (so 210 MiB with
/// the default 512): a node holds its cached documents (~18 KB each live, per `tests/memory.rs`;
/// ~9 MiB for 512), a 16 MiB sled cache, and bounded queues and credit windows, over a baseline
/// of ~30 MiB; measured peaks are under 80 MiB. A leak proportional to the traffic crosses it in
/// a long run.
const RSS_BOUND_BASE_KIB: u64 = 192 * 1024;
/// What a cached document may cost, for the bounds: twice the ~18 KB measured.
const DOCUMENT_KIB: u64 = 36;
/// The most a node's largest RSS sample in the second half of the run may exceed its largest in
/// the first half, plus [`DOCUMENT_KIB`] / 2 per cached document (the cache may still be filling
/// in a short run with a large cache): once the caches are full, memory stays flat.
const RSS_GROWTH_BASE_KIB: u64 = 64 * 1024;
/// The last fault, a partition, lasts at least this long and is undone by the heal.
const FINAL_PARTITION_MIN: Duration = Duration::from_secs(6);
/// The nodes' document cache (`CONCORD_CHAOS_CACHE_DOCUMENTS` changes it), and sled's cache.
const CACHE_DOCUMENTS_DEFAULT: u64 = 512;
const STORE_CACHE_BYTES: u64 = 16 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_under_a_nemesis_lose_no_acknowledged_write_and_converge() {
    let seconds: u64 = std::env::var("CONCORD_CHAOS_SECONDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(CHAOS_SECONDS_DEFAULT);
    let seed: u64 =
        std::env::var("CONCORD_CHAOS_SEED").ok().and_then(|value| value.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
                % 1_000_000_000
        });
    println!("chaos: seed {seed} (replay with CONCORD_CHAOS_SEED={seed}), {seconds} s of faults");
    let root = temporary_directory();
    let mut cluster = Cluster::start(root.path()).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let random = Random::new(seed ^ (writer as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            tokio::spawn(write(writer, random, cluster.apis.clone(), stop.clone()))
        })
        .collect();
    let mut nemesis = Nemesis::new(seed);
    nemesis.run(&mut cluster, Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::SeqCst);
    let mut ledgers = Vec::new();
    for writer in writers {
        ledgers.push(writer.await.unwrap());
    }

    cluster.heal().await;
    let healed = Instant::now();
    let nodes: Vec<&Node> = cluster.nodes.iter().collect();
    let converged = try_converge_within(&nodes, CONVERGENCE_GUARD).await;
    let convergence = healed.elapsed();
    cluster.sample_rss();

    let mut anomalies = Vec::new();
    match &converged {
        Ok(elapsed) if *elapsed <= CONVERGENCE_REQUIRED => {}
        Ok(elapsed) => anomalies.push(format!("digests equal only {elapsed:.1?} after the heal (required: 60 s)")),
        Err(report) => anomalies.push(format!("digests not equal {CONVERGENCE_GUARD:?} after the heal:{report}")),
    }
    let checked = check_records(&cluster, &ledgers, &mut anomalies).await;
    let counters = check_counters(&cluster, &ledgers, &mut anomalies).await;
    let memory = cluster.check_memory(&mut anomalies);
    anomalies.extend(cluster.anomalies.iter().cloned());

    let summary = Summary {
        seed,
        seconds,
        ledgers: &ledgers,
        nemesis: &nemesis,
        relays: cluster.relays.iter().map(Relay::counters).collect(),
        convergence: converged.as_ref().map(|_| convergence).ok(),
        checked,
        counters,
        memory,
        anomalies: &anomalies,
    };
    println!("{summary}");
    let shown: Vec<String> = anomalies.iter().take(20).map(|anomaly| anomaly.chars().take(400).collect()).collect();
    assert!(
        anomalies.is_empty(),
        "chaos run with seed {seed} found {} anomalies (all in the summary above), the first:\n{}",
        anomalies.len(),
        shown.join("\n")
    );
}

/// The five nodes, the relay in front of each, and what the harness saw of them.
struct Cluster {
    nodes: Vec<Node>,
    /// `relays[i]` is in front of `nodes[i]`: everyone dials node `i` through it.
    relays: Vec<Relay>,
    /// Node `i`'s own peer socket, the client address its relays see.
    peer_sockets: Vec<SocketAddr>,
    /// Each node's current API address, for the writers (a restart changes it).
    apis: Arc<RwLock<Vec<String>>>,
    paused: Vec<bool>,
    cache_documents: u64,
    started: Instant,
    /// (seconds since start, RSS in KiB) per node, once a second.
    rss: Vec<Vec<(f64, u64)>>,
    anomalies: Vec<String>,
}

impl Cluster {
    async fn start(root: &std::path::Path) -> Cluster {
        let cache_documents: u64 = std::env::var("CONCORD_CHAOS_CACHE_DOCUMENTS")
            .ok()
            .and_then(|value| value.parse().ok())
            .unwrap_or(CACHE_DOCUMENTS_DEFAULT);
        let certs = root.join("certs");
        certificates(&certs, "chaos-cluster", &NAMES);
        let ports: Vec<u16> = NAMES.iter().map(|_| free_udp_port()).collect();
        let peer_sockets: Vec<SocketAddr> =
            ports.iter().map(|port| SocketAddr::from(([127, 0, 0, 1], *port))).collect();
        let mut relays = Vec::new();
        for socket in &peer_sockets {
            relays.push(Relay::start(*socket).await);
        }
        let mut nodes = Vec::new();
        for (index, name) in NAMES.iter().enumerate() {
            // Node i dials the relays of nodes i+1 and i+2: every pair has a seed one way, and
            // seeds are redialed forever, the rest is learned.
            let seeds: Vec<String> =
                [1, 2].iter().map(|step| relays[(index + step) % NAMES.len()].address.to_string()).collect();
            let config = root.join(format!("{name}.toml"));
            std::fs::write(
                &config,
                format!("cache_documents = {cache_documents}\nstore_cache_bytes = {STORE_CACHE_BYTES}\n"),
            )
            .unwrap();
            let listen = peer_sockets[index].to_string();
            let advertise = relays[index].address.to_string();
            let arguments =
                ["--listen-peer", &listen, "--advertise-peer", &advertise, "--config", config.to_str().unwrap()];
            nodes.push(start_peer_with(root, &certs, name, &seeds, &arguments).await);
        }
        for observer in &nodes {
            for name in NAMES {
                if observer.data_dir.file_name().unwrap() != name {
                    wait_for_peer(observer, name, "alive and connected", |peer| {
                        peer["state"] == "alive" && peer["connected"] == true
                    })
                    .await;
                }
            }
        }
        let apis = Arc::new(RwLock::new(nodes.iter().map(|node| node.api.clone()).collect()));
        Cluster {
            nodes,
            relays,
            peer_sockets,
            apis,
            paused: vec![false; NAMES.len()],
            cache_documents,
            started: Instant::now(),
            rss: vec![Vec::new(); NAMES.len()],
            anomalies: Vec::new(),
        }
    }

    /// Sets `faults` on the link between nodes `a` and `b`, both ways.
    fn link(&self, a: usize, b: usize, faults: Faults) {
        self.relays[a].set_client_faults(self.peer_sockets[b], faults);
        self.relays[b].set_client_faults(self.peer_sockets[a], faults);
    }

    fn kill(&mut self, index: usize) {
        self.nodes[index].kill();
        self.paused[index] = false;
    }

    async fn start_again(&mut self, index: usize) {
        self.nodes[index].start_again().await;
        self.apis.write().unwrap()[index] = self.nodes[index].api.clone();
    }

    fn pause(&mut self, index: usize) {
        self.nodes[index].pause();
        self.paused[index] = true;
    }

    fn resume(&mut self, index: usize) {
        self.nodes[index].resume();
        self.paused[index] = false;
    }

    /// Every node running and resumed, every relay clean.
    async fn heal(&mut self) {
        for index in 0..NAMES.len() {
            if self.paused[index] {
                self.resume(index);
            }
            if self.nodes[index].child.is_none() {
                self.start_again(index).await;
            }
        }
        for relay in &self.relays {
            relay.heal();
        }
    }

    /// Waits `duration`, sampling every node's RSS once a second.
    async fn wait(&mut self, duration: Duration) {
        let until = Instant::now() + duration;
        loop {
            self.sample_rss();
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            tokio::time::sleep(left.min(Duration::from_secs(1))).await;
        }
    }

    /// One RSS sample per running node; notes a node that exited on its own.
    fn sample_rss(&mut self) {
        let now = self.started.elapsed().as_secs_f64();
        for (index, node) in self.nodes.iter_mut().enumerate() {
            if let Some(status) = node.exit_status() {
                self.anomalies.push(format!("{} exited on its own at {now:.1} s: {status}", NAMES[index]));
                node.child = None;
                continue;
            }
            let Some(child) = &node.child else { continue };
            if let Some(kib) = try_proc_status_kib(child.id(), "VmRSS") {
                self.rss[index].push((now, kib));
            }
        }
    }

    /// Checks the RSS samples against the bound and for growth; returns (min, max, growth) per node.
    fn check_memory(&self, anomalies: &mut Vec<String>) -> Vec<(u64, u64, i64)> {
        let bound = RSS_BOUND_BASE_KIB + self.cache_documents * DOCUMENT_KIB;
        let growth_max = RSS_GROWTH_BASE_KIB + self.cache_documents * DOCUMENT_KIB / 2;
        let middle = self.started.elapsed().as_secs_f64() / 2.0;
        let mut memory = Vec::new();
        for (index, samples) in self.rss.iter().enumerate() {
            let largest = |keep: &dyn Fn(f64) -> bool| {
                samples.iter().filter(|(time, _)| keep(*time)).map(|(_, kib)| *kib).max().unwrap_or(0)
            };
            let minimum = samples.iter().map(|(_, kib)| *kib).min().unwrap_or(0);
            let maximum = largest(&|_| true);
            let growth = largest(&|time| time >= middle) as i64 - largest(&|time| time < middle) as i64;
            if maximum >= bound {
                anomalies.push(format!("{}: RSS reached {maximum} KiB (bound {bound} KiB)", NAMES[index]));
            }
            if growth > growth_max as i64 {
                anomalies.push(format!(
                    "{}: RSS grew by {growth} KiB from the first half of the run to the second (at most {growth_max} KiB)",
                    NAMES[index]
                ));
            }
            memory.push((minimum, maximum, growth));
            if std::env::var_os("CONCORD_CHAOS_RSS_TRACE").is_some() {
                eprintln!(
                    "{} {:?}",
                    NAMES[index],
                    samples.iter().map(|(t, k)| (*t as u64, k / 1024)).collect::<Vec<_>>()
                );
            }
        }
        memory
    }
}

/// The kinds of fault the nemesis injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Kill,
    Pause,
    Partition,
    Degrade,
}

/// The seeded fault schedule, and what it did.
struct Nemesis {
    random: Random,
    round: Vec<Fault>,
    /// How many times each kind was injected (degraded links count one per link).
    injected: BTreeMap<&'static str, u64>,
    log: Vec<String>,
}

impl Nemesis {
    fn new(seed: u64) -> Nemesis {
        Nemesis { random: Random::new(seed), round: Vec::new(), injected: BTreeMap::new(), log: Vec::new() }
    }

    fn next_fault(&mut self) -> Fault {
        if self.round.is_empty() {
            self.round = vec![Fault::Kill, Fault::Pause, Fault::Partition, Fault::Degrade];
            self.random.shuffle(&mut self.round);
        }
        self.round.pop().unwrap()
    }

    fn note(&mut self, cluster: &Cluster, what: String) {
        let line = format!("[{:6.1} s] nemesis: {what}", cluster.started.elapsed().as_secs_f64());
        println!("{line}");
        self.log.push(line);
    }

    async fn run(&mut self, cluster: &mut Cluster, duration: Duration) {
        let end = Instant::now() + duration;
        let first = self.random.duration(Duration::from_secs(2), Duration::from_secs(4));
        cluster.wait(first).await;
        loop {
            let period = self.random.duration(Duration::from_secs(8), Duration::from_secs(12));
            let hold = self.random.duration(Duration::from_secs(3), Duration::from_secs(7));
            let step_started = Instant::now();
            if step_started + hold + FINAL_PARTITION_MIN > end {
                break;
            }
            let fault = self.next_fault();
            let overlay = fault != Fault::Degrade && self.random.chance(25);
            let degraded = if fault == Fault::Degrade || overlay { self.degrade(cluster) } else { Vec::new() };
            match fault {
                Fault::Kill => {
                    let index = self.random.below(NAMES.len() as u64) as usize;
                    self.note(cluster, format!("kill -9 {}, start it again after {hold:.1?}", NAMES[index]));
                    *self.injected.entry("kill -9 and restart").or_default() += 1;
                    cluster.kill(index);
                    cluster.wait(hold).await;
                    cluster.start_again(index).await;
                }
                Fault::Pause => {
                    let index = self.random.below(NAMES.len() as u64) as usize;
                    self.note(cluster, format!("SIGSTOP {} for {hold:.1?}", NAMES[index]));
                    *self.injected.entry("SIGSTOP and SIGCONT").or_default() += 1;
                    cluster.pause(index);
                    cluster.wait(hold).await;
                    cluster.resume(index);
                }
                Fault::Partition => {
                    let (minority, majority) = self.partition(cluster, hold, "then healed");
                    cluster.wait(hold).await;
                    for a in &minority {
                        for b in &majority {
                            cluster.link(*a, *b, Faults::default());
                        }
                    }
                }
                Fault::Degrade => {
                    self.note(cluster, format!("degraded links held for {hold:.1?}"));
                    cluster.wait(hold).await;
                }
            }
            for (a, b) in degraded {
                cluster.link(a, b, Faults::default());
            }
            let rest = period.saturating_sub(step_started.elapsed());
            let rest = rest.min(end.saturating_duration_since(Instant::now()));
            cluster.wait(rest).await;
        }
        // The last fault is not undone here: the heal does it, so the time to converge measures
        // a real catch-up (nodes declared down across the cut, changes on both sides).
        let left = end.saturating_duration_since(Instant::now());
        self.partition(cluster, left, "until the heal");
        cluster.wait(left).await;
    }

    /// Cuts one or two random nodes off from the rest; returns the two sides.
    fn partition(&mut self, cluster: &Cluster, hold: Duration, until: &str) -> (Vec<usize>, Vec<usize>) {
        let mut order: Vec<usize> = (0..NAMES.len()).collect();
        self.random.shuffle(&mut order);
        let size = self.random.between(1, 2) as usize;
        let (minority, majority) = order.split_at(size);
        let names = |side: &[usize]| side.iter().map(|index| NAMES[*index]).collect::<Vec<_>>().join(",");
        self.note(cluster, format!("partition {} | {} for {hold:.1?} ({until})", names(minority), names(majority)));
        *self.injected.entry("partition").or_default() += 1;
        let cut = Faults { partitioned: true, ..Faults::default() };
        for a in minority {
            for b in majority {
                cluster.link(*a, *b, cut);
            }
        }
        (minority.to_vec(), majority.to_vec())
    }

    /// Adds loss, duplication and delay to some or all links; returns the links.
    fn degrade(&mut self, cluster: &Cluster) -> Vec<(usize, usize)> {
        let mut links: Vec<(usize, usize)> =
            (0..NAMES.len()).flat_map(|a| (a + 1..NAMES.len()).map(move |b| (a, b))).collect();
        if self.random.chance(50) {
            self.random.shuffle(&mut links);
            links.truncate(self.random.between(3, 6) as usize);
        }
        let faults = Faults {
            partitioned: false,
            loss_percent: self.random.between(5, 25) as u8,
            duplicate_percent: self.random.between(5, 25) as u8,
            delay: self.random.duration(Duration::from_millis(1), Duration::from_millis(20)),
            jitter: self.random.duration(Duration::from_millis(0), Duration::from_millis(40)),
        };
        let names: Vec<String> = links.iter().map(|(a, b)| format!("{}-{}", NAMES[*a], NAMES[*b])).collect();
        self.note(
            cluster,
            format!(
                "degrade {} links ({}): {} % loss, {} % duplication, {:?} delay + up to {:?} jitter",
                links.len(),
                names.join(" "),
                faults.loss_percent,
                faults.duplicate_percent,
                faults.delay,
                faults.jitter
            ),
        );
        *self.injected.entry("degraded link (loss, duplication, delay)").or_default() += links.len() as u64;
        for (a, b) in &links {
            cluster.link(*a, *b, faults);
        }
        links
    }
}

/// The operations the writers do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Operation {
    Create,
    Edit,
    Delete,
    Increment,
}

/// How a write ended, as far as its client can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Answered 200.
    Acknowledged,
    /// Never reached a node (connection refused): not applied.
    Failed,
    /// Timed out, reset, or answered another status: applied or not, maybe later.
    Unknown,
}

#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    attempted: u64,
    acknowledged: u64,
    failed: u64,
    unknown: u64,
    /// Edits and deletes not sent because the chosen node had not yet seen the record's last
    /// acknowledged value.
    skipped: u64,
}

/// What one writer knows about its writes.
#[derive(Default)]
struct Ledger {
    /// Per record this writer created: the states it may be in now (`None`: absent). One state
    /// means certain; more than one follow an unknown write, after which the writer leaves it.
    records: BTreeMap<String, Vec<Option<Value>>>,
    /// Per counter: the sums of acknowledged and of unknown increments.
    increments: BTreeMap<u64, (u64, u64)>,
    tallies: BTreeMap<Operation, Tally>,
    /// Answers other than 200, by status code.
    statuses: BTreeMap<u16, u64>,
}

/// One writer: random operations on random nodes until `stop`; returns its ledger.
async fn write(writer: usize, mut random: Random, apis: Arc<RwLock<Vec<String>>>, stop: Arc<AtomicBool>) -> Ledger {
    // No pooled connections: a request to a killed node is refused before it is sent, so it did
    // not happen, instead of failing on a stale connection with an unknown outcome.
    let http =
        reqwest::Client::builder().timeout(REQUEST_TIMEOUT).pool_max_idle_per_host(0).build().expect("HTTP client");
    let mut ledger = Ledger::default();
    // Records whose state is certain and present: the ones to edit or delete.
    let mut live: Vec<String> = Vec::new();
    let mut serial = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let node = random.below(NAMES.len() as u64) as usize;
        let api = apis.read().unwrap()[node].clone();
        let operation = match random.below(100) {
            0..30 => Operation::Create,
            30..60 => Operation::Edit,
            60..70 => Operation::Delete,
            _ => Operation::Increment,
        };
        let operation =
            if live.is_empty() && operation != Operation::Increment { Operation::Create } else { operation };
        match operation {
            Operation::Create => {
                serial += 1;
                let id = format!("w{writer}-{serial:06}");
                let value = json!({"writer": writer, "serial": serial, "field": format!("{id}/0")});
                let request = http.put(format!("{api}{}", record_path("records", &id))).json(&value);
                let outcome = send(request, &mut ledger, operation).await;
                match outcome {
                    Outcome::Acknowledged => {
                        ledger.records.insert(id.clone(), vec![Some(value)]);
                        live.push(id);
                    }
                    Outcome::Unknown => {
                        ledger.records.insert(id, vec![None, Some(value)]);
                    }
                    Outcome::Failed => {}
                }
            }
            Operation::Edit | Operation::Delete => {
                let position = random.below(live.len() as u64) as usize;
                let id = live[position].clone();
                let current = ledger.records[&id][0].clone().expect("a live record is present");
                let url = format!("{api}{}", record_path("records", &id));
                // Read first: send only through a node that has seen the last acknowledged value.
                let seen = match http.get(&url).send().await {
                    Ok(response) if response.status().as_u16() == 200 => {
                        response.json::<Value>().await.is_ok_and(|body| body["value"] == current)
                    }
                    _ => false,
                };
                let tally = ledger.tallies.entry(operation).or_default();
                if !seen {
                    tally.skipped += 1;
                } else if operation == Operation::Edit {
                    let edit = random.next_u64() % 1_000_000;
                    let field = format!("{id}/{edit}");
                    let mut next = current.clone();
                    next["field"] = json!(field);
                    let outcome = send(http.patch(&url).json(&json!({ "field": field })), &mut ledger, operation).await;
                    match outcome {
                        Outcome::Acknowledged => ledger.records.insert(id, vec![Some(next)]),
                        Outcome::Unknown => {
                            live.swap_remove(position);
                            ledger.records.insert(id, vec![Some(current), Some(next)])
                        }
                        Outcome::Failed => None,
                    };
                } else {
                    let outcome = send(http.delete(&url), &mut ledger, operation).await;
                    match outcome {
                        Outcome::Acknowledged => {
                            live.swap_remove(position);
                            ledger.records.insert(id, vec![None]);
                        }
                        Outcome::Unknown => {
                            live.swap_remove(position);
                            ledger.records.insert(id, vec![Some(current), None]);
                        }
                        Outcome::Failed => {}
                    }
                }
            }
            Operation::Increment => {
                let counter = random.below(COUNTERS);
                let by = random.between(1, 5);
                let url = format!("{api}{}/increment", record_path("counters", &format!("c{counter}")));
                let outcome = send(http.post(url).json(&json!({"field": "n", "by": by})), &mut ledger, operation).await;
                let sums = ledger.increments.entry(counter).or_default();
                match outcome {
                    Outcome::Acknowledged => sums.0 += by,
                    Outcome::Unknown => sums.1 += by,
                    Outcome::Failed => {}
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(random.below(20))).await;
    }
    ledger
}

/// Sends a write and tallies how it ended.
async fn send(request: reqwest::RequestBuilder, ledger: &mut Ledger, operation: Operation) -> Outcome {
    let outcome = match request.send().await {
        Ok(response) if response.status().as_u16() == 200 => Outcome::Acknowledged,
        Ok(response) => {
            *ledger.statuses.entry(response.status().as_u16()).or_default() += 1;
            Outcome::Unknown
        }
        Err(error) if error.is_connect() => Outcome::Failed,
        Err(_) => Outcome::Unknown,
    };
    let tally = ledger.tallies.entry(operation).or_default();
    tally.attempted += 1;
    match outcome {
        Outcome::Acknowledged => tally.acknowledged += 1,
        Outcome::Failed => tally.failed += 1,
        Outcome::Unknown => tally.unknown += 1,
    }
    outcome
}

/// What the record check covered, per node.
#[derive(Default)]
struct RecordsChecked {
    present: usize,
    deleted: usize,
    uncertain: usize,
}

/// Every node holds each writer's records as its ledger allows, and nothing else.
async fn check_records(cluster: &Cluster, ledgers: &[Ledger], anomalies: &mut Vec<String>) -> RecordsChecked {
    let mut checked = RecordsChecked::default();
    for states in ledgers.iter().flat_map(|ledger| ledger.records.values()) {
        match states.as_slice() {
            [Some(_)] => checked.present += 1,
            [None] => checked.deleted += 1,
            _ => checked.uncertain += 1,
        }
    }
    for (index, node) in cluster.nodes.iter().enumerate() {
        let held = node.list_all("records").await;
        let mut known = BTreeSet::new();
        for (id, states) in ledgers.iter().flat_map(|ledger| ledger.records.iter()) {
            known.insert(id.as_str());
            let actual = held.get(id).cloned();
            if states.contains(&actual) {
                continue;
            }
            let what = match (states.as_slice(), &actual) {
                ([Some(_)], None) => "an acknowledged record is missing",
                ([None], Some(_)) => "a record whose deletion was acknowledged is back",
                ([Some(_)], Some(_)) => "the last acknowledged edit is not what the record holds",
                _ => "a record after an unknown write is in none of its possible states",
            };
            anomalies.push(format!("{}: {what}: records/{id} is {actual:?}, expected one of {states:?}", NAMES[index]));
        }
        for id in held.keys().filter(|id| !known.contains(id.as_str())) {
            anomalies.push(format!("{}: records/{id} exists, but no writer wrote it", NAMES[index]));
        }
    }
    checked
}

/// Every counter on every node is within [acknowledged, acknowledged + unknown]; returns
/// (counter, acknowledged, unknown, values on the nodes) per counter.
async fn check_counters(
    cluster: &Cluster,
    ledgers: &[Ledger],
    anomalies: &mut Vec<String>,
) -> Vec<(u64, u64, u64, BTreeSet<u64>)> {
    let mut counters = Vec::new();
    for counter in 0..COUNTERS {
        let (acknowledged, unknown) = ledgers
            .iter()
            .filter_map(|ledger| ledger.increments.get(&counter))
            .fold((0, 0), |(acknowledged, unknown), sums| (acknowledged + sums.0, unknown + sums.1));
        let mut values = BTreeSet::new();
        for (index, node) in cluster.nodes.iter().enumerate() {
            let (status, body) = node.get("counters", &format!("c{counter}")).await;
            let value = if status == 404 { 0 } else { body["value"]["n"].as_u64().unwrap_or(u64::MAX) };
            values.insert(value);
            if value < acknowledged || value > acknowledged + unknown {
                anomalies.push(format!(
                    "{}: counters/c{counter} reads {value} ({status} {body}), acknowledged increments sum to \
                     {acknowledged} and unknown ones to {unknown}",
                    NAMES[index]
                ));
            }
        }
        counters.push((counter, acknowledged, unknown, values));
    }
    counters
}

/// The table printed at the end of a run.
struct Summary<'a> {
    seed: u64,
    seconds: u64,
    ledgers: &'a [Ledger],
    nemesis: &'a Nemesis,
    relays: Vec<RelayCounters>,
    convergence: Option<Duration>,
    checked: RecordsChecked,
    counters: Vec<(u64, u64, u64, BTreeSet<u64>)>,
    memory: Vec<(u64, u64, i64)>,
    anomalies: &'a [String],
}

impl std::fmt::Display for Summary<'_> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            formatter,
            "\n=== chaos summary: seed {}, {} s of faults, {} nodes, {} writers ===",
            self.seed,
            self.seconds,
            NAMES.len(),
            WRITERS
        )?;
        writeln!(
            formatter,
            "{:<10} {:>10} {:>13} {:>8} {:>8} {:>8}",
            "operation", "attempted", "acknowledged", "failed", "unknown", "skipped"
        )?;
        for operation in [Operation::Create, Operation::Edit, Operation::Delete, Operation::Increment] {
            let mut total = Tally::default();
            for tally in self.ledgers.iter().filter_map(|ledger| ledger.tallies.get(&operation)) {
                total.attempted += tally.attempted;
                total.acknowledged += tally.acknowledged;
                total.failed += tally.failed;
                total.unknown += tally.unknown;
                total.skipped += tally.skipped;
            }
            writeln!(
                formatter,
                "{:<10} {:>10} {:>13} {:>8} {:>8} {:>8}",
                format!("{operation:?}").to_lowercase(),
                total.attempted,
                total.acknowledged,
                total.failed,
                total.unknown,
                total.skipped
            )?;
        }
        let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
        for (status, count) in self.ledgers.iter().flat_map(|ledger| ledger.statuses.iter()) {
            *statuses.entry(*status).or_default() += count;
        }
        writeln!(formatter, "answers other than 200 (counted as unknown): {statuses:?}")?;
        writeln!(formatter, "{:<42} {:>6}", "fault", "count")?;
        for (kind, count) in &self.nemesis.injected {
            writeln!(formatter, "{kind:<42} {count:>6}")?;
        }
        let mut relays = RelayCounters::default();
        for counters in &self.relays {
            relays.forwarded += counters.forwarded;
            relays.dropped += counters.dropped;
            relays.duplicated += counters.duplicated;
            relays.delayed += counters.delayed;
            relays.overflowed += counters.overflowed;
        }
        writeln!(
            formatter,
            "relay datagrams: {} forwarded at once, {} dropped, {} duplicated, {} delayed, {} dropped on a full delay queue",
            relays.forwarded, relays.dropped, relays.duplicated, relays.delayed, relays.overflowed
        )?;
        match self.convergence {
            Some(elapsed) => writeln!(
                formatter,
                "time to converge after the heal: {:.2} s (required: at most 60 s)",
                elapsed.as_secs_f64()
            )?,
            None => writeln!(formatter, "time to converge after the heal: not within {CONVERGENCE_GUARD:?}")?,
        }
        writeln!(
            formatter,
            "records checked on every node: {} present, {} deleted, {} after an unknown write (either outcome allowed)",
            self.checked.present, self.checked.deleted, self.checked.uncertain
        )?;
        writeln!(formatter, "{:<8} {:>13} {:>9} {:>16}", "counter", "acknowledged", "unknown", "values on nodes")?;
        for (counter, acknowledged, unknown, values) in &self.counters {
            writeln!(
                formatter,
                "{:<8} {acknowledged:>13} {unknown:>9} {:>16}",
                format!("c{counter}"),
                format!("{values:?}")
            )?;
        }
        writeln!(
            formatter,
            "{:<8} {:>14} {:>14} {:>24}",
            "node", "RSS min KiB", "RSS max KiB", "growth 1st->2nd half KiB"
        )?;
        for (index, (minimum, maximum, growth)) in self.memory.iter().enumerate() {
            writeln!(formatter, "{:<8} {minimum:>14} {maximum:>14} {growth:>24}", NAMES[index])?;
        }
        if self.anomalies.is_empty() {
            writeln!(formatter, "anomalies: none")?;
        } else {
            writeln!(formatter, "anomalies ({}):", self.anomalies.len())?;
            for anomaly in self.anomalies {
                writeln!(formatter, "  {anomaly}")?;
            }
        }
        Ok(())
    }
}
