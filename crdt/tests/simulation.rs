//! Deterministic simulation of the replication core: several replicas over a seeded, faulty
//! network (loss, duplication, reordering, partitions, restarts) with real record documents.
//! Every seed must end with all replicas holding the same changes and the same records.
//!
//! `CONCORD_SIMULATION_SEEDS` sets how many seeds run (default 300); `CONCORD_SIMULATION_SEED`
//! replays one. A failure prints its seed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crdt::clock::Timestamp;
use crdt::envelope::{DocumentKind, Envelope};
use crdt::identity::{NodeId, OriginId};
use crdt::key::RecordKey;
use crdt::record::{Operation, Record};
use crdt::replica::{ChangeLog, Message, PeerId, Replica, Settings};
use crdt::version_vector::VersionVector;
use serde_json::json;

/// A small deterministic random source (SplitMix64).
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut value = self.0;
        value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        value ^ (value >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Default)]
struct MemoryLog(BTreeMap<(OriginId, u64), Envelope>);

impl ChangeLog for MemoryLog {
    fn read(&self, origin: &OriginId, from: u64, limit: usize) -> Vec<Envelope> {
        self.0.range((*origin, from)..=(*origin, u64::MAX)).take(limit).map(|(_, envelope)| envelope.clone()).collect()
    }
}

/// One simulated node: the replication core plus what the real node does around it (apply,
/// persist, report durable). Everything here is durable the moment it is applied.
struct SimulatedNode {
    replica: Replica,
    log: MemoryLog,
    records: BTreeMap<RecordKey, Record>,
    node: NodeId,
    origin: OriginId,
    next_sequence: u64,
    incarnation: u8,
}

impl SimulatedNode {
    fn new(index: u8, now: Instant, settings: &Settings) -> SimulatedNode {
        SimulatedNode {
            replica: Replica::new(VersionVector::new(), settings.clone(), now),
            log: MemoryLog::default(),
            records: BTreeMap::new(),
            node: NodeId([index; 16]),
            origin: OriginId([index; 16]),
            next_sequence: 1,
            incarnation: 0,
        }
    }

    /// A process restart: the core starts over from what is durable, with a fresh origin.
    fn restart(&mut self, index: u8, now: Instant, settings: &Settings) {
        let mut durable = VersionVector::new();
        for (origin, sequence) in self.log.0.keys() {
            durable.insert(*origin, *sequence);
        }
        self.replica = Replica::new(durable, settings.clone(), now);
        self.incarnation += 1;
        let mut origin = [index; 16];
        origin[15] = self.incarnation;
        origin[14] = 0xee;
        self.origin = OriginId(origin);
        self.next_sequence = 1;
    }

    fn write(&mut self, now: Instant, key: RecordKey, operation: Operation, wall_ms: u64) {
        let record = self.records.entry(key.clone()).or_default();
        let timestamp = Timestamp { wall_ms, logical: 0 };
        let change = match record.write(&key, &self.origin, timestamp, &operation) {
            Ok(Some(change)) => change,
            Ok(None) => return,
            Err(error) => panic!("write {operation:?} on {key} failed: {error}"),
        };
        let envelope = Envelope {
            origin: self.origin,
            node: self.node,
            sequence: self.next_sequence,
            timestamp,
            key,
            kind: DocumentKind::Record,
            change,
        };
        self.next_sequence += 1;
        self.log.0.insert((envelope.origin, envelope.sequence), envelope.clone());
        self.replica.handle_durable(now, &[(None, envelope.origin, envelope.sequence)], &self.log);
    }

    /// Applies what the core handed over, then reports it durable.
    fn apply_pending(&mut self, now: Instant) {
        let mut durable = Vec::new();
        while let Some((peer, envelope)) = self.replica.poll_apply() {
            let id = (envelope.origin, envelope.sequence);
            if !self.log.0.contains_key(&id) {
                let record = self.records.entry(envelope.key.clone()).or_default();
                record.apply_changes(&envelope.change).unwrap();
                self.log.0.insert(id, envelope);
            }
            durable.push((Some(peer), id.0, id.1));
        }
        if !durable.is_empty() {
            self.replica.handle_durable(now, &durable, &self.log);
        }
        while self.replica.poll_acknowledged().is_some() {}
    }
}

struct InFlight {
    deliver_at: Duration,
    from: usize,
    to: usize,
    /// The connection it was sent on; messages of a closed connection are lost.
    connection: u64,
    message: Message,
}

struct Faults {
    loss_percent: u64,
    duplicate_percent: u64,
    delay_ms_max: u64,
    partitions: bool,
    restarts: bool,
}

struct Simulation {
    random: Random,
    start: Instant,
    elapsed: Duration,
    settings: Settings,
    nodes: Vec<SimulatedNode>,
    /// Connection id per connected pair (lower index first); the peer id on each side is the
    /// other node's index.
    connections: BTreeMap<(usize, usize), u64>,
    next_connection: u64,
    in_flight: Vec<InFlight>,
    faults: Faults,
    /// Nodes on side A of the current partition, if any.
    partition: Option<BTreeSet<usize>>,
    /// Envelopes put in Changes messages, counted once per send (before loss or duplication).
    envelopes_sent: u64,
}

impl Simulation {
    fn new(seed: u64, node_count: usize, faults: Faults) -> Simulation {
        let start = Instant::now();
        let settings = Settings {
            window_envelopes: 16,
            chunk_envelopes_max: 5,
            chunk_bytes_max: 4096,
            summary_interval: Duration::from_millis(500),
        };
        let nodes = (0..node_count).map(|index| SimulatedNode::new(index as u8 + 1, start, &settings)).collect();
        let mut simulation = Simulation {
            random: Random(seed),
            start,
            elapsed: Duration::ZERO,
            settings,
            nodes,
            connections: BTreeMap::new(),
            next_connection: 1,
            in_flight: Vec::new(),
            faults,
            partition: None,
            envelopes_sent: 0,
        };
        for first in 0..node_count {
            for second in first + 1..node_count {
                simulation.connect(first, second);
            }
        }
        simulation
    }

    fn now(&self) -> Instant {
        self.start + self.elapsed
    }

    fn connect(&mut self, first: usize, second: usize) {
        let connection = self.next_connection;
        self.next_connection += 1;
        self.connections.insert((first, second), connection);
        let now = self.now();
        self.nodes[first].replica.handle_peer_connected(now, second as PeerId);
        self.nodes[second].replica.handle_peer_connected(now, first as PeerId);
    }

    fn disconnect(&mut self, first: usize, second: usize) {
        if self.connections.remove(&(first, second)).is_some() {
            let now = self.now();
            self.nodes[first].replica.handle_peer_disconnected(now, second as PeerId);
            self.nodes[second].replica.handle_peer_disconnected(now, first as PeerId);
        }
    }

    fn partitioned(&self, first: usize, second: usize) -> bool {
        self.partition.as_ref().is_some_and(|side| side.contains(&first) != side.contains(&second))
    }

    /// Moves every node's outputs onto the network.
    fn collect_transmits(&mut self) {
        for from in 0..self.nodes.len() {
            let now = self.now();
            self.nodes[from].apply_pending(now);
            while let Some((peer, message)) = self.nodes[from].replica.poll_transmit() {
                let to = peer as usize;
                let pair = (from.min(to), from.max(to));
                let Some(&connection) = self.connections.get(&pair) else { continue };
                if let Message::Changes { envelopes } = &message {
                    self.envelopes_sent += envelopes.len() as u64;
                }
                if self.random.chance(self.faults.loss_percent) {
                    continue;
                }
                let copies = if self.random.chance(self.faults.duplicate_percent) { 2 } else { 1 };
                for _ in 0..copies {
                    let delay = Duration::from_millis(1 + self.random.below(self.faults.delay_ms_max.max(1)));
                    self.in_flight.push(InFlight {
                        deliver_at: self.elapsed + delay,
                        from,
                        to,
                        connection,
                        message: message.clone(),
                    });
                }
            }
        }
    }

    /// Advances virtual time by one millisecond: deliveries, timeouts, faults.
    fn step(&mut self) {
        self.elapsed += Duration::from_millis(1);
        let now = self.now();
        let (due, later): (Vec<InFlight>, Vec<InFlight>) =
            std::mem::take(&mut self.in_flight).into_iter().partition(|message| message.deliver_at <= self.elapsed);
        self.in_flight = later;
        for message in due {
            let pair = (message.from.min(message.to), message.from.max(message.to));
            if self.connections.get(&pair) != Some(&message.connection) {
                continue;
            }
            let node = &mut self.nodes[message.to];
            if node.replica.handle_peer_message(now, message.from as PeerId, message.message, &node.log).is_err() {
                self.disconnect(pair.0, pair.1);
            }
        }
        for node in &mut self.nodes {
            if node.replica.poll_timeout().is_some_and(|due| due <= now) {
                node.replica.handle_timeout(now, &node.log);
            }
        }
        self.collect_transmits();
    }

    fn inject_faults(&mut self) {
        let count = self.nodes.len();
        if self.faults.partitions && self.random.chance(1) {
            if self.partition.is_some() {
                self.heal();
            } else {
                let side: BTreeSet<usize> = (0..count).filter(|_| self.random.chance(50)).collect();
                for first in 0..count {
                    for second in first + 1..count {
                        if side.contains(&first) != side.contains(&second) {
                            self.disconnect(first, second);
                        }
                    }
                }
                self.partition = Some(side);
            }
        }
        if self.faults.restarts && self.random.chance(1) {
            let index = self.random.below(count as u64) as usize;
            for other in 0..count {
                if other != index {
                    self.disconnect(index.min(other), index.max(other));
                }
            }
            let now = self.now();
            self.nodes[index].restart(index as u8 + 1, now, &self.settings.clone());
            for other in 0..count {
                if other != index && !self.partitioned(index, other) {
                    self.connect(index.min(other), index.max(other));
                }
            }
        }
    }

    fn heal(&mut self) {
        self.partition = None;
        let count = self.nodes.len();
        for first in 0..count {
            for second in first + 1..count {
                if !self.connections.contains_key(&(first, second)) {
                    self.connect(first, second);
                }
            }
        }
    }

    fn random_write(&mut self) {
        let index = self.random.below(self.nodes.len() as u64) as usize;
        let key = RecordKey::new("items", &format!("item-{}", self.random.below(4))).unwrap();
        let field = ["name", "qty", "status"][self.random.below(3) as usize];
        let value = self.random.below(10);
        let operation = match self.random.below(10) {
            0 => Operation::Delete,
            1..=3 => Operation::Increment { field: "count".into(), by: value as i64 + 1 },
            4..=5 => Operation::Replace(json!({ field: value }).as_object().unwrap().clone()),
            _ => Operation::MergePatch(json!({ field: value }).as_object().unwrap().clone()),
        };
        let now = self.now();
        let wall_ms = self.elapsed.as_millis() as u64;
        self.nodes[index].write(now, key, operation, wall_ms);
    }

    /// Writes for `writing_ms` under faults, heals, then runs until every node holds the same.
    fn run(&mut self, writing_ms: u64) -> Result<Duration, String> {
        self.collect_transmits();
        while self.elapsed < Duration::from_millis(writing_ms) {
            if self.random.chance(4) {
                self.random_write();
            }
            self.inject_faults();
            self.step();
        }
        self.faults.loss_percent = 0;
        self.faults.duplicate_percent = 0;
        self.heal();
        let healed = self.elapsed;
        // Several summary intervals after the heal is the bound: with no faults, two summaries
        // and the credit they carry must finish the exchange.
        let deadline = healed + self.settings.summary_interval * 20;
        while self.elapsed < deadline {
            self.step();
            if self.in_flight.is_empty() && self.converged() {
                return Ok(self.elapsed - healed);
            }
        }
        Err(format!("not converged {:?} after the heal", deadline - healed))
    }

    fn converged(&self) -> bool {
        let first = &self.nodes[0];
        self.nodes.iter().all(|node| {
            node.replica.version_vector() == first.replica.version_vector()
                && node.records.len() == first.records.len()
                && node
                    .records
                    .iter()
                    .zip(&first.records)
                    .all(|((key, record), (other_key, other))| key == other_key && record.version() == other.version())
        })
    }

    fn assert_same_views(&self, seed: u64) {
        let first = &self.nodes[0];
        for (index, node) in self.nodes.iter().enumerate() {
            for (key, record) in &node.records {
                let other = &first.records[key];
                assert_eq!(record.view().unwrap(), other.view().unwrap(), "seed {seed}: node {index} differs on {key}");
            }
            // Every change anyone made is held by everyone.
            assert_eq!(node.log.0.len(), first.log.0.len(), "seed {seed}: node {index} log length");
        }
    }
}

fn seeds() -> Vec<u64> {
    if let Some(seed) = std::env::var("CONCORD_SIMULATION_SEED").ok().and_then(|value| value.parse().ok()) {
        return vec![seed];
    }
    let count = std::env::var("CONCORD_SIMULATION_SEEDS").ok().and_then(|value| value.parse().ok()).unwrap_or(300);
    (1..=count).collect()
}

fn run_seeds(name: &str, nodes: usize, faults: impl Fn() -> Faults) {
    for seed in seeds() {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut simulation = Simulation::new(seed, nodes, faults());
            simulation.run(2_000).map(|_| simulation.assert_same_views(seed))
        }));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(problem)) => panic!("{name}: seed {seed}: {problem} (replay with CONCORD_SIMULATION_SEED={seed})"),
            Err(_) => panic!("{name}: seed {seed} panicked (replay with CONCORD_SIMULATION_SEED={seed})"),
        }
    }
}

#[test]
fn three_replicas_converge_on_a_clean_network() {
    run_seeds("clean", 3, || Faults {
        loss_percent: 0,
        duplicate_percent: 0,
        delay_ms_max: 5,
        partitions: false,
        restarts: false,
    });
}

#[test]
fn three_replicas_converge_through_loss_duplication_and_reordering() {
    run_seeds("lossy", 3, || Faults {
        loss_percent: 10,
        duplicate_percent: 10,
        delay_ms_max: 80,
        partitions: false,
        restarts: false,
    });
}

#[test]
fn four_replicas_converge_through_partitions_and_restarts() {
    run_seeds("partitions", 4, || Faults {
        loss_percent: 5,
        duplicate_percent: 5,
        delay_ms_max: 40,
        partitions: true,
        restarts: true,
    });
}

#[test]
fn a_chain_converges_through_relays() {
    // Nodes 0 and 2 never talk: only the links 0–1 and 1–2 exist.
    for seed in seeds().into_iter().take(50) {
        let mut simulation = Simulation::new(
            seed,
            3,
            Faults { loss_percent: 0, duplicate_percent: 0, delay_ms_max: 10, partitions: false, restarts: false },
        );
        simulation.disconnect(0, 2);
        simulation.collect_transmits();
        for _ in 0..40 {
            simulation.random_write();
            simulation.step();
        }
        let mut quiet = 0;
        while quiet < 2_000 && !(simulation.in_flight.is_empty() && simulation.converged()) {
            simulation.step();
            quiet += 1;
        }
        assert!(simulation.converged(), "seed {seed}: the chain did not converge");
        assert!(!simulation.connections.contains_key(&(0, 2)));
        simulation.assert_same_views(seed);
    }
}

#[test]
fn catch_up_sends_only_what_is_missing() {
    // Two nodes share 200 changes, then one goes away while the other makes 50 more: on
    // reconnect, exactly those 50 cross the wire.
    let mut simulation = Simulation::new(
        7,
        2,
        Faults { loss_percent: 0, duplicate_percent: 0, delay_ms_max: 2, partitions: false, restarts: false },
    );
    simulation.collect_transmits();
    let key = RecordKey::new("items", "shared").unwrap();
    for index in 0..200u64 {
        let now = simulation.now();
        simulation.nodes[0].write(now, key.clone(), Operation::Increment { field: "n".into(), by: 1 }, index);
        simulation.step();
    }
    while !(simulation.in_flight.is_empty() && simulation.converged()) {
        simulation.step();
    }
    simulation.disconnect(0, 1);
    for index in 0..50u64 {
        let now = simulation.now();
        simulation.nodes[0].write(now, key.clone(), Operation::Increment { field: "n".into(), by: 1 }, 1_000 + index);
    }
    simulation.envelopes_sent = 0;
    simulation.connect(0, 1);
    simulation.collect_transmits();
    while !(simulation.in_flight.is_empty() && simulation.converged()) {
        simulation.step();
    }
    let value = simulation.nodes[1].records[&key].view().unwrap().value.unwrap();
    assert_eq!(value["n"], json!(250));
    assert_eq!(simulation.envelopes_sent, 50, "catch-up sends exactly the missing changes, not the dataset");
}
