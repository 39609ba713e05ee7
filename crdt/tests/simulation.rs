//! Deterministic simulation of the replication core: several replicas over a seeded, faulty
//! network (loss, duplication, reordering, partitions, restarts, change-log trimming) with real
//! record documents. Every seed must end with all replicas holding the same changes and the
//! same records.
//!
//! As the node does, a simulated node relays a local write as soon as it is in its log
//! (`Replica::handle_available`) and reports it durable one step later; a restart in between is a
//! crash that loses the write here while peers may already hold it.
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
use crdt::memory::MemorySource;
use crdt::record::{Operation, Record};
use crdt::replica::{Apply, Durable, LogFloors, Message, PeerId, Replica, Settings};
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

/// What a simulated node keeps: its change log and records (`memory`), what it holds durably and
/// its log floors. Everything here is durable the moment it is written, except the local writes
/// in `SimulatedNode::volatile`.
#[derive(Default)]
struct Storage {
    memory: MemorySource<Record>,
    held: VersionVector,
    floors: LogFloors,
}

/// One simulated node: the replication core plus what the real node does around it (apply,
/// persist, report durable).
struct SimulatedNode {
    replica: Replica,
    storage: Storage,
    node: NodeId,
    origin: OriginId,
    next_sequence: u64,
    incarnation: u8,
    /// Local writes in the log and relayed, not yet durable, oldest first: a crash undoes them.
    volatile: Vec<Volatile>,
}

/// A local write not yet durable, with what it replaced.
struct Volatile {
    key: RecordKey,
    before: Option<Record>,
    origin: OriginId,
    sequence: u64,
}

impl SimulatedNode {
    fn new(index: u8, now: Instant, settings: &Settings) -> SimulatedNode {
        SimulatedNode {
            replica: Replica::new(VersionVector::new(), LogFloors::new(), settings.clone(), now),
            storage: Storage::default(),
            node: NodeId([index; 16]),
            origin: OriginId([index; 16]),
            next_sequence: 1,
            incarnation: 0,
            volatile: Vec::new(),
        }
    }

    /// A process restart: the core starts over from what is durable, with a fresh origin. Local
    /// writes not yet durable are lost (a crash during the flush). Returns how many were.
    fn restart(&mut self, index: u8, now: Instant, settings: &Settings) -> usize {
        let lost = self.volatile.len();
        for write in self.volatile.drain(..).rev() {
            match write.before {
                Some(record) => self.storage.memory.records.insert(write.key, record),
                None => self.storage.memory.records.remove(&write.key),
            };
            self.storage.memory.log.remove(&(write.origin, write.sequence));
        }
        self.replica = Replica::new(self.storage.held.clone(), self.storage.floors.clone(), settings.clone(), now);
        self.incarnation += 1;
        let mut origin = [index; 16];
        origin[15] = self.incarnation;
        origin[14] = 0xee;
        self.origin = OriginId(origin);
        self.next_sequence = 1;
        lost
    }

    fn write(&mut self, now: Instant, key: RecordKey, operation: Operation, wall_ms: u64) {
        let before = self.storage.memory.records.get(&key).cloned();
        let record = self.storage.memory.records.entry(key.clone()).or_default();
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
            key: key.clone(),
            kind: DocumentKind::Record,
            change,
        };
        self.next_sequence += 1;
        let (origin, sequence) = (envelope.origin, envelope.sequence);
        self.storage.memory.log.insert((origin, sequence), envelope);
        let available = [Durable::Change { source: None, origin, sequence }];
        self.replica.handle_available(now, &available, &self.storage.memory);
        self.volatile.push(Volatile { key, before, origin, sequence });
    }

    /// The flush: local writes in the log become durable.
    fn flush(&mut self, now: Instant) {
        let mut durable = Vec::new();
        for write in self.volatile.drain(..) {
            self.storage.held.insert(write.origin, write.sequence);
            durable.push(Durable::Change { source: None, origin: write.origin, sequence: write.sequence });
        }
        if !durable.is_empty() {
            self.replica.handle_durable(now, &durable, &self.storage.memory);
        }
    }

    /// Makes pending local writes durable, then applies what the core handed over and reports
    /// it durable.
    fn apply_pending(&mut self, now: Instant) {
        self.flush(now);
        let mut durable = Vec::new();
        while let Some((peer, apply)) = self.replica.poll_apply() {
            match apply {
                Apply::Change(envelope) => {
                    let id = (envelope.origin, envelope.sequence);
                    if self.storage.held.insert(id.0, id.1) {
                        let record = self.storage.memory.records.entry(envelope.key.clone()).or_default();
                        record.apply_changes(&envelope.change).unwrap();
                        self.storage.memory.log.insert(id, envelope);
                    }
                    durable.push(Durable::Change { source: Some(peer), origin: id.0, sequence: id.1 });
                }
                Apply::Record(snapshot) => {
                    let record = self.storage.memory.records.entry(snapshot.key.clone()).or_default();
                    for part in &snapshot.parts {
                        record.apply_changes(part).unwrap();
                    }
                    durable.push(Durable::Record { source: peer });
                }
                Apply::SnapshotEnd(version_vector) => {
                    crdt::replica::raise_log_floors(&mut self.storage.floors, &self.storage.held, &version_vector);
                    self.storage.held.merge(&version_vector);
                    durable.push(Durable::SnapshotEnd { source: peer, version_vector });
                }
            }
        }
        if !durable.is_empty() {
            self.replica.handle_durable(now, &durable, &self.storage.memory);
        }
        while self.replica.poll_acknowledged().is_some() {}
    }

    /// Retention: drops the log's oldest `count` entries of `origin` within its gap-free prefix.
    fn trim_log(&mut self, origin: OriginId, count: u64) {
        let floor = self.storage.floors.get(&origin).copied().unwrap_or(1);
        let last = (floor + count - 1).min(self.storage.held.contiguous(&origin));
        if last < floor {
            return;
        }
        for sequence in floor..=last {
            self.storage.memory.log.remove(&(origin, sequence));
        }
        self.storage.floors.insert(origin, last + 1);
        self.replica.handle_log_trimmed(origin, last + 1);
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
    trims: bool,
}

impl Faults {
    /// No loss, duplication, partitions, restarts or trims; delays of a few milliseconds.
    fn clean() -> Faults {
        Faults {
            loss_percent: 0,
            duplicate_percent: 0,
            delay_ms_max: 5,
            partitions: false,
            restarts: false,
            trims: false,
        }
    }
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
    /// Records put in Snapshot messages, counted the same way.
    records_sent: u64,
    /// Lazy-relay lists sent, and local writes made.
    lazy_lists_sent: u64,
    writes: u64,
    /// Local writes that restarts lost after relaying them.
    writes_lost: usize,
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
            records_sent: 0,
            lazy_lists_sent: 0,
            writes: 0,
            writes_lost: 0,
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
        // As the node does from the peer's certificate (node `index` is NodeId([index + 1; 16])).
        self.nodes[first].replica.handle_peer_identified(second as PeerId, NodeId([second as u8 + 1; 16]));
        self.nodes[second].replica.handle_peer_identified(first as PeerId, NodeId([first as u8 + 1; 16]));
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
            self.transmit_from(from);
        }
    }

    /// Moves one node's messages onto the network.
    fn transmit_from(&mut self, from: usize) {
        {
            while let Some((peer, message)) = self.nodes[from].replica.poll_transmit() {
                let to = peer as usize;
                let pair = (from.min(to), from.max(to));
                let Some(&connection) = self.connections.get(&pair) else { continue };
                match &message {
                    Message::Changes { envelopes } => self.envelopes_sent += envelopes.len() as u64,
                    Message::Snapshot { records, .. } => self.records_sent += records.len() as u64,
                    Message::Lazy { .. } => self.lazy_lists_sent += 1,
                    _ => {}
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
            if node
                .replica
                .handle_peer_message(now, message.from as PeerId, message.message, &node.storage.memory)
                .is_err()
            {
                self.disconnect(pair.0, pair.1);
            }
        }
        for node in &mut self.nodes {
            if node.replica.poll_timeout().is_some_and(|due| due <= now) {
                node.replica.handle_timeout(now, &node.storage.memory);
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
            self.writes_lost += self.nodes[index].restart(index as u8 + 1, now, &self.settings.clone());
            for other in 0..count {
                if other != index && !self.partitioned(index, other) {
                    self.connect(index.min(other), index.max(other));
                }
            }
        }
    }

    fn inject_trims(&mut self) {
        if !self.faults.trims || !self.random.chance(2) {
            return;
        }
        let index = self.random.below(self.nodes.len() as u64) as usize;
        let origins: Vec<OriginId> = self.nodes[index].storage.held.origins().map(|(origin, _)| *origin).collect();
        if origins.is_empty() {
            return;
        }
        let origin = origins[self.random.below(origins.len() as u64) as usize];
        let count = 1 + self.random.below(20);
        self.nodes[index].trim_log(origin, count);
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
        self.writes += 1;
        // Relayed at once: the peers may hold it before it is durable here.
        self.transmit_from(index);
    }

    /// Writes for `writing_ms` under faults, heals, then runs until every node holds the same.
    fn run(&mut self, writing_ms: u64) -> Result<Duration, String> {
        self.collect_transmits();
        while self.elapsed < Duration::from_millis(writing_ms) {
            if self.random.chance(4) {
                self.random_write();
            }
            self.inject_faults();
            self.inject_trims();
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
            if self.quiet() && self.converged() {
                return Ok(self.elapsed - healed);
            }
        }
        let states: Vec<String> = self
            .nodes
            .iter()
            .map(|node| {
                let records: Vec<String> = node
                    .storage
                    .memory
                    .records
                    .iter()
                    .map(|(key, record)| {
                        format!("{key} {} {:?}", record.version(), record.view().map(|view| view.value))
                    })
                    .collect();
                format!("{:?} records {records:#?}", node.replica.version_vector())
            })
            .collect();
        Err(format!("not converged {:?} after the heal: {states:#?}", deadline - healed))
    }

    /// Nothing but summaries on the wire: with equal states, nothing more will move.
    fn quiet(&self) -> bool {
        self.in_flight.iter().all(|flight| matches!(flight.message, Message::Summary { .. }))
    }

    fn converged(&self) -> bool {
        let first = &self.nodes[0];
        self.nodes.iter().all(|node| {
            node.replica.version_vector() == first.replica.version_vector()
                && node.storage.memory.records.len() == first.storage.memory.records.len()
                && node
                    .storage
                    .memory
                    .records
                    .iter()
                    .zip(&first.storage.memory.records)
                    .all(|((key, record), (other_key, other))| key == other_key && record.version() == other.version())
        })
    }

    fn assert_same_views(&self, seed: u64) {
        let first = &self.nodes[0];
        for (index, node) in self.nodes.iter().enumerate() {
            for (key, record) in &node.storage.memory.records {
                let other = &first.storage.memory.records[key];
                assert_eq!(record.view().unwrap(), other.view().unwrap(), "seed {seed}: node {index} differs on {key}");
            }
            // Every change anyone made is held by everyone (as an envelope or through a snapshot),
            // and the log holds every change at or above the floors.
            assert_eq!(node.storage.held, first.storage.held, "seed {seed}: node {index} holds other changes");
            for (origin, range) in node.storage.held.origins() {
                let floor = node.storage.floors.get(origin).copied().unwrap_or(1);
                for (start, end) in range.ranges() {
                    for sequence in start.max(floor)..=end {
                        assert!(
                            node.storage.memory.log.contains_key(&(*origin, sequence)),
                            "seed {seed}: node {index} lacks ({origin}, {sequence}) above its floor {floor}"
                        );
                    }
                }
            }
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

/// Runs every seed; returns how many local writes restarts lost after relaying them.
fn run_seeds(name: &str, nodes: usize, faults: impl Fn() -> Faults) -> usize {
    let mut writes_lost = 0;
    for seed in seeds() {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut simulation = Simulation::new(seed, nodes, faults());
            simulation.run(2_000).map(|_| {
                simulation.assert_same_views(seed);
                simulation.writes_lost
            })
        }));
        match outcome {
            Ok(Ok(lost)) => writes_lost += lost,
            Ok(Err(problem)) => panic!("{name}: seed {seed}: {problem} (replay with CONCORD_SIMULATION_SEED={seed})"),
            Err(_) => panic!("{name}: seed {seed} panicked (replay with CONCORD_SIMULATION_SEED={seed})"),
        }
    }
    writes_lost
}

#[test]
fn three_replicas_converge_on_a_clean_network() {
    run_seeds("clean", 3, Faults::clean);
}

/// In a full mesh each node gets a change from its origin directly, so relaying it on would
/// only send duplicates: after the first duplicates, nodes ask each other to relay those origins
/// lazily, and each change crosses the wire about once per peer instead of twice.
#[test]
fn a_full_mesh_sends_each_change_to_each_peer_about_once() {
    let (mut envelopes, mut deliveries, mut lazy_lists) = (0, 0, 0);
    for seed in 0..40 {
        let mut simulation = Simulation::new(seed, 3, Faults::clean());
        simulation.run(2_000).unwrap();
        simulation.assert_same_views(seed);
        envelopes += simulation.envelopes_sent;
        deliveries += simulation.writes * 2;
        lazy_lists += simulation.lazy_lists_sent;
    }
    let ratio = envelopes as f64 / deliveries as f64;
    assert!(ratio < 1.08, "{envelopes} envelopes sent for {deliveries} deliveries ({ratio:.2} each)");
    assert!(lazy_lists > 0, "no node asked for lazy relay");
}

#[test]
fn three_replicas_converge_through_loss_duplication_and_reordering() {
    run_seeds("lossy", 3, || Faults {
        loss_percent: 10,
        duplicate_percent: 10,
        delay_ms_max: 80,
        partitions: false,
        restarts: false,
        trims: false,
    });
}

#[test]
fn four_replicas_converge_through_partitions_and_restarts() {
    let writes_lost = run_seeds("partitions", 4, || Faults {
        loss_percent: 5,
        duplicate_percent: 5,
        delay_ms_max: 40,
        partitions: true,
        restarts: true,
        trims: false,
    });
    // Some restarts fell between a write's relay and its flush, so the peers handed back writes
    // the writer itself lost.
    if seeds().len() >= 100 {
        assert!(writes_lost > 0, "no restart lost a relayed write: the case is not exercised");
    }
}

#[test]
fn four_replicas_converge_while_their_logs_are_trimmed() {
    // Trimming makes peers that fall behind a floor bootstrap from snapshots, mid-fault.
    run_seeds("trims", 4, || Faults {
        loss_percent: 5,
        duplicate_percent: 5,
        delay_ms_max: 40,
        partitions: true,
        restarts: true,
        trims: true,
    });
}

#[test]
fn a_chain_converges_through_relays() {
    // Nodes 0 and 2 never talk: only the links 0–1 and 1–2 exist.
    for seed in seeds().into_iter().take(50) {
        let mut simulation = Simulation::new(
            seed,
            3,
            Faults {
                loss_percent: 0,
                duplicate_percent: 0,
                delay_ms_max: 10,
                partitions: false,
                restarts: false,
                trims: false,
            },
        );
        simulation.disconnect(0, 2);
        simulation.collect_transmits();
        for _ in 0..40 {
            simulation.random_write();
            simulation.step();
        }
        let mut quiet = 0;
        while quiet < 2_000 && !(simulation.quiet() && simulation.converged()) {
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
        Faults {
            loss_percent: 0,
            duplicate_percent: 0,
            delay_ms_max: 2,
            partitions: false,
            restarts: false,
            trims: false,
        },
    );
    simulation.collect_transmits();
    let key = RecordKey::new("items", "shared").unwrap();
    for index in 0..200u64 {
        let now = simulation.now();
        simulation.nodes[0].write(now, key.clone(), Operation::Increment { field: "n".into(), by: 1 }, index);
        simulation.step();
    }
    while !(simulation.quiet() && simulation.converged()) {
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
    while !(simulation.quiet() && simulation.converged()) {
        simulation.step();
    }
    let value = simulation.nodes[1].storage.memory.records[&key].view().unwrap().value.unwrap();
    assert_eq!(value["n"], json!(250));
    assert_eq!(simulation.envelopes_sent, 50, "catch-up sends exactly the missing changes, not the dataset");
}

/// Nodes on a clean network, none connected, for the bootstrap tests. Every message takes 1 ms,
/// so each connection delivers in order, as QUIC's one stream per peer does.
fn quiet_nodes(seed: u64, count: usize) -> Simulation {
    let mut simulation = Simulation::new(
        seed,
        count,
        Faults {
            loss_percent: 0,
            duplicate_percent: 0,
            delay_ms_max: 1,
            partitions: false,
            restarts: false,
            trims: false,
        },
    );
    for first in 0..count {
        for second in first + 1..count {
            simulation.disconnect(first, second);
        }
    }
    simulation
}

fn settle(simulation: &mut Simulation, nodes: &[usize]) {
    for _ in 0..100_000 {
        simulation.collect_transmits();
        let same = nodes.iter().all(|&index| {
            simulation.nodes[index].replica.version_vector() == simulation.nodes[nodes[0]].replica.version_vector()
                && simulation.nodes[index].storage.memory.records.len()
                    == simulation.nodes[nodes[0]].storage.memory.records.len()
        });
        if simulation.in_flight.is_empty() && same {
            return;
        }
        simulation.step();
    }
    panic!("nodes {nodes:?} did not settle");
}

fn write_history(simulation: &mut Simulation, node: usize, records: u64, changes: u64) {
    for index in 0..changes {
        let key = RecordKey::new("items", &format!("item-{}", index % records)).unwrap();
        let now = simulation.now();
        simulation.nodes[node].write(now, key, Operation::Increment { field: "n".into(), by: 1 }, index);
    }
}

#[test]
fn a_brand_new_replica_bootstraps_from_snapshots_not_history() {
    // 600 changes to 12 records: the new node receives 12 documents, not 600 changes.
    let mut simulation = quiet_nodes(11, 2);
    write_history(&mut simulation, 0, 12, 600);
    simulation.connect(0, 1);
    settle(&mut simulation, &[0, 1]);
    assert_eq!(simulation.records_sent, 12);
    assert_eq!(simulation.envelopes_sent, 0, "no history is replayed");
    assert_eq!(simulation.nodes[0].replica.statistics().snapshots_sent, 1);
    assert_eq!(simulation.nodes[1].replica.statistics().snapshots_received, 1);
    let key = RecordKey::new("items", "item-0").unwrap();
    assert_eq!(simulation.nodes[1].storage.memory.records[&key].view().unwrap().value.unwrap()["n"], json!(50));
    // The new node holds the history without its envelopes: its floor says so.
    let origin = simulation.nodes[0].origin;
    assert_eq!(simulation.nodes[1].storage.floors.get(&origin), Some(&601));
    assert!(simulation.nodes[1].storage.memory.log.is_empty());
    // Changes made after the bootstrap flow as changes, both ways.
    simulation.envelopes_sent = 0;
    write_history(&mut simulation, 0, 12, 5);
    let key = RecordKey::new("items", "item-0").unwrap();
    let now = simulation.now();
    simulation.nodes[1].write(now, key.clone(), Operation::Increment { field: "n".into(), by: 1 }, 9_000);
    settle(&mut simulation, &[0, 1]);
    // Six changes; a summary that crossed them on the wire may have one sent twice.
    assert!((6..20).contains(&simulation.envelopes_sent), "{} envelopes", simulation.envelopes_sent);
    assert_eq!(simulation.records_sent, 12, "no second snapshot");
    assert_eq!(simulation.nodes[0].storage.memory.records[&key].view().unwrap().value.unwrap()["n"], json!(52));
    simulation.assert_same_views(11);
}

#[test]
fn a_replica_behind_the_trimmed_log_bootstraps_and_then_bootstraps_others() {
    let mut simulation = quiet_nodes(12, 3);
    simulation.connect(0, 1);
    settle(&mut simulation, &[0, 1]);
    write_history(&mut simulation, 0, 8, 100);
    settle(&mut simulation, &[0, 1]);
    assert_eq!(simulation.records_sent, 0, "a peer that keeps up gets changes");
    // Node 1 goes away; node 0 writes on and trims its log past what node 1 holds.
    simulation.disconnect(0, 1);
    write_history(&mut simulation, 0, 8, 200);
    let origin = simulation.nodes[0].origin;
    simulation.nodes[0].trim_log(origin, 250);
    simulation.envelopes_sent = 0;
    // Meanwhile node 1 wrote too: its change must still reach node 0.
    let key = RecordKey::new("items", "item-3").unwrap();
    let now = simulation.now();
    simulation.nodes[1].write(now, key.clone(), Operation::Increment { field: "n".into(), by: 100 }, 5_000);
    simulation.connect(0, 1);
    settle(&mut simulation, &[0, 1]);
    assert_eq!(simulation.records_sent, 8, "node 1 was behind the floor: a snapshot");
    assert_eq!(
        simulation.envelopes_sent, 1,
        "the snapshot holds everything node 0 held; then node 1 sends its own change"
    );
    assert_eq!(simulation.nodes[0].storage.memory.records[&key].view().unwrap().value.unwrap()["n"], json!(138));
    // Node 2 is brand new and meets only node 1, which itself holds part of history only in
    // its documents: it bootstraps node 2 in turn.
    simulation.records_sent = 0;
    simulation.connect(1, 2);
    settle(&mut simulation, &[1, 2]);
    assert_eq!(simulation.records_sent, 8);
    assert_eq!(simulation.nodes[2].storage.memory.records[&key].view().unwrap().value.unwrap()["n"], json!(138));
    simulation.connect(0, 2);
    settle(&mut simulation, &[0, 1, 2]);
    simulation.assert_same_views(12);
}

/// What happens to the exchange in [`exchange_rounds`].
#[derive(Debug, Clone, Copy)]
enum Disturbance {
    None,
    /// The `index`-th message sent in round `round` is lost.
    Drop {
        round: usize,
        index: usize,
    },
    /// The connection drops after `round` (what is in flight is lost) and reopens at once.
    Reconnect {
        round: usize,
    },
}

/// Two nodes with their own histories meet and exchange in lockstep rounds: what one sends in a
/// round arrives in the next, and each round is half a summary interval. Returns how many rounds
/// until both hold the same changes and records with nothing in flight.
fn exchange_rounds(first_writes: &[(u8, u8)], second_writes: &[(u8, u8)], disturbance: Disturbance) -> usize {
    let mut simulation = quiet_nodes(1, 2);
    for (node, writes) in [(0, first_writes), (1, second_writes)] {
        for (index, &(record, amount)) in writes.iter().enumerate() {
            let key = RecordKey::new("items", &format!("item-{}", record % 8)).unwrap();
            let now = simulation.now();
            let operation = Operation::Increment { field: "n".into(), by: i64::from(amount) + 1 };
            simulation.nodes[node].write(now, key, operation, index as u64);
        }
    }
    let step = simulation.settings.summary_interval / 2;
    let now = simulation.now();
    simulation.nodes[0].replica.handle_peer_connected(now, 1);
    simulation.nodes[1].replica.handle_peer_connected(now, 0);
    let mut in_flight: Vec<(usize, Message)> = Vec::new();
    for round in 1..=1_000 {
        simulation.elapsed += step;
        let now = simulation.now();
        for (to, message) in std::mem::take(&mut in_flight) {
            let node = &mut simulation.nodes[to];
            node.replica.handle_peer_message(now, (1 - to) as PeerId, message, &node.storage.memory).unwrap();
        }
        for node in &mut simulation.nodes {
            node.apply_pending(now);
            if node.replica.poll_timeout().is_some_and(|due| due <= now) {
                node.replica.handle_timeout(now, &node.storage.memory);
            }
        }
        let mut sent = 0;
        for from in 0..2 {
            while let Some((_, message)) = simulation.nodes[from].replica.poll_transmit() {
                let dropped =
                    matches!(disturbance, Disturbance::Drop { round: at, index } if at == round && index == sent);
                sent += 1;
                if !dropped {
                    in_flight.push((1 - from, message));
                }
            }
        }
        if let Disturbance::Reconnect { round: at } = disturbance
            && at == round
        {
            in_flight.clear();
            for (node, peer) in [(0, 1), (1, 0)] {
                simulation.nodes[node].replica.handle_peer_disconnected(now, peer);
            }
            for (node, peer) in [(0, 1), (1, 0)] {
                simulation.nodes[node].replica.handle_peer_connected(now, peer);
            }
        }
        let same = simulation.nodes[0].replica.version_vector() == simulation.nodes[1].replica.version_vector()
            && simulation.nodes[0].storage.memory.records.len() == simulation.nodes[1].storage.memory.records.len();
        if same && in_flight.iter().all(|(_, message)| matches!(message, Message::Summary { .. })) {
            return round;
        }
    }
    panic!("no convergence in 1,000 rounds: {first_writes:?} {second_writes:?} {disturbance:?}");
}

/// The round bound: a summary each way (2 rounds), then per window of credit one round to send
/// and one for the credit to return, plus two rounds of slack for the last credit and the
/// snapshot's end. A lost message or a reconnection costs at most one summary interval (two
/// rounds) to notice and the same exchange again.
fn round_bound(changes: usize, disturbed: bool) -> usize {
    let window = Settings::default().window_envelopes.min(16) as usize;
    let clean = 4 + 2 * changes.div_ceil(window);
    if disturbed { 2 * clean + 2 } else { clean }
}

fn writes() -> impl proptest::strategy::Strategy<Value = Vec<(u8, u8)>> {
    proptest::collection::vec((0u8..8, 0u8..4), 0..120)
}

proptest::proptest! {
    #![proptest_config({
        let mut config = proptest::test_runner::Config::default();
        if std::env::var_os("PROPTEST_CASES").is_none() {
            config.cases = 1_000;
        }
        config
    })]

    /// Two peers finish an exchange in a bounded number of rounds, from any pair of histories
    /// (including a brand-new node, which is bootstrapped from a snapshot), after a dropped
    /// message, and after a reconnection.
    #[test]
    fn an_exchange_finishes_in_bounded_rounds(
        first in writes(),
        second in writes(),
        disturbance_kind in 0u8..3,
        round in 1usize..12,
        index in 0usize..6,
    ) {
        let disturbance = match disturbance_kind {
            0 => Disturbance::None,
            1 => Disturbance::Drop { round, index },
            _ => Disturbance::Reconnect { round },
        };
        let rounds = exchange_rounds(&first, &second, disturbance);
        let bound = round_bound(first.len() + second.len(), !matches!(disturbance, Disturbance::None));
        proptest::prop_assert!(rounds <= bound, "{rounds} rounds, bound {bound}, {disturbance:?}");
    }
}
