//! Replication inside the engine thread: the sans-IO core (`crdt::replica`) driven with the
//! store as its change log, and its messages handed to the transport through [`Outbound`].
//!
//! Peer input arrives as engine jobs, so it is ordered with local writes and shares their group
//! commit: envelopes from a peer are applied and staged with the batch, and the core hears that
//! they are durable (and grants the peer credit) only after the batch is flushed. What a batch
//! holds is relayed to other peers as soon as it is in the store, before the flush. The engine
//! knows peers by number and bytes only; the node maps them to transport connections.
//!
//! A large frame (a catch-up's) is read ahead ([`PeerFrame::read_ahead`]) before it becomes a
//! job: decoded, and each change that may create a record read the way a record new to this node
//! is stored (see [`crdt::record::Record::first_change`]). That is pure work on the frame's
//! bytes, so the node does it on tokio's blocking pool and the engine thread takes the result. In
//! a catch-up of records new to a node, the engine thread is the bottleneck and reading first
//! changes was a quarter of its time (BENCHMARKS.md, session 16). A live stream's small frames
//! are decoded on the engine thread ([`PeerFrame::read`]), which reads a first change only for a
//! record it lacks.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use crdt::envelope::DocumentKind;
use crdt::identity::OriginId;
use crdt::record::FirstChange;
use crdt::replica::{Acknowledgement, Apply, Durable, Message, PeerId};
use serde::Serialize;

use crate::engine::{Engine, StoreSource};

/// Where the engine's messages for peers go: the node implements it over the transport.
pub trait Outbound: Send {
    /// Queues one encoded message for a peer without blocking. Returns false when the peer's
    /// queue is full or the peer is gone: the message is dropped, and the next summary repairs
    /// what the core believed was sent.
    fn send(&mut self, peer: PeerId, bytes: Vec<u8>) -> bool;
    /// Closes the connection to a peer that broke the protocol.
    fn disconnect(&mut self, peer: PeerId, reason: &str);
    /// Dials an address learned from a peer (peer exchange), unless already connected to it.
    fn connect(&mut self, address: std::net::SocketAddr);
}

/// The most addresses one peer-exchange message may carry; the rest are ignored.
const EXCHANGED_ADDRESSES_MAX: usize = 256;

/// A frame from a peer, decoded: its message, and, for a frame read ahead off the engine thread,
/// what each change in it that could create a record holds when read as a first change.
#[derive(Debug)]
pub struct PeerFrame {
    /// The frame's size on the wire.
    length: usize,
    message: Result<Message, String>,
    /// By origin and sequence, the changes [`Record::first_change`](crdt::record::Record::first_change)
    /// accepts: at most one per envelope of the message, so bounded by the frame.
    first_changes: HashMap<(OriginId, u64), FirstChange>,
}

impl PeerFrame {
    /// Decodes a frame's bytes (after the channel byte); the engine reads each change as a first
    /// change only when it lacks the record.
    pub fn read(bytes: &[u8]) -> PeerFrame {
        let message = Message::decode(bytes).map_err(|error| error.to_string());
        PeerFrame { length: bytes.len(), message, first_changes: HashMap::new() }
    }

    /// Decodes a frame's bytes and reads every automerge change in it that names no dependency
    /// as a first change: work the engine thread then skips, for a frame read off it.
    pub fn read_ahead(bytes: &[u8]) -> PeerFrame {
        let PeerFrame { length, message, mut first_changes } = PeerFrame::read(bytes);
        if let Ok(Message::Changes { envelopes }) = &message {
            for envelope in envelopes.iter().filter(|envelope| envelope.kind == DocumentKind::Record) {
                if let Some(first) = crdt::record::Record::first_change(&envelope.change) {
                    first_changes.insert((envelope.origin, envelope.sequence), first);
                }
            }
        }
        PeerFrame { length, message, first_changes }
    }

    /// The frame's changes read as first changes.
    #[cfg(test)]
    pub(crate) fn first_changes(&self) -> &HashMap<(OriginId, u64), FirstChange> {
        &self.first_changes
    }

    /// A frame of `length` bytes whose reading did not finish (the task reading it stopped): the
    /// engine refuses the peer, as for bytes that do not decode.
    pub fn unreadable(length: usize, reason: String) -> PeerFrame {
        PeerFrame { length, message: Err(reason), first_changes: HashMap::new() }
    }
}

/// What the node told the engine about a connected peer.
#[derive(Debug, Clone, Serialize)]
pub struct PeerInfo {
    pub node_id: String,
    pub name: String,
    pub address: String,
}

/// One peer as status reports it: connected ones with their lag, and peers seen before that
/// are disconnected now (without lag: nothing current is known).
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    /// The connection's number, while connected.
    pub peer: Option<PeerId>,
    #[serde(flatten)]
    pub info: PeerInfo,
    pub connected: bool,
    /// Changes we hold that the peer lacks, as far as we know (connected peers only).
    pub peer_lacks: Option<u64>,
    /// Changes the peer holds that we lack, as far as we know (connected peers only).
    pub we_lack: Option<u64>,
    /// Whether we are sending it a snapshot now (connected peers only).
    pub bootstrapping: Option<bool>,
    pub traffic: PeerTraffic,
    /// What the failure detector says (alive, suspect or down), once it has heard of the peer.
    pub state: Option<crate::membership::MemberState>,
}

/// What crossed the wire with one peer (by node id, across reconnections) since this start.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PeerTraffic {
    pub changes_sent: u64,
    pub changes_received: u64,
    pub snapshot_records_sent: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// How many disconnected peers status remembers; the oldest are forgotten first.
const DISCONNECTED_PEERS_MAX: usize = 256;

impl Engine {
    /// Where messages for peers go from now on.
    pub fn set_outbound(&mut self, outbound: Box<dyn Outbound>) {
        self.replication.outbound = Some(outbound);
    }

    pub fn handle_peer_connected(&mut self, peer: PeerId, info: PeerInfo) {
        tracing::info!(peer, name = %info.name, address = %info.address, "peer connected");
        self.replication.disconnected.retain(|(known, _)| known.node_id != info.node_id);
        let info_node = info.node_id.clone();
        self.replication.peers.insert(peer, info);
        self.replication.replica.handle_peer_connected(Instant::now(), peer);
        if let Some(node) = crdt::identity::NodeId::from_hex(&info_node) {
            self.replication.replica.handle_peer_identified(peer, node);
        }
        self.flush_transmits();
        self.exchange_peers();
    }

    /// Tells every peer where the others listen, so a node that knows one seed meets them all.
    fn exchange_peers(&mut self) {
        let addresses: Vec<String> = self.replication.peers.values().map(|info| info.address.clone()).collect();
        let bytes = Message::Peers { addresses }.encode();
        let peers: Vec<PeerId> = self.replication.peers.keys().copied().collect();
        if let Some(outbound) = self.replication.outbound.as_mut() {
            for peer in peers {
                outbound.send(peer, bytes.clone());
            }
        }
    }

    fn dial_exchanged(&mut self, addresses: &[String]) {
        let known: std::collections::BTreeSet<&str> =
            self.replication.peers.values().map(|info| info.address.as_str()).collect();
        let unknown: Vec<std::net::SocketAddr> = addresses
            .iter()
            .take(EXCHANGED_ADDRESSES_MAX)
            .filter(|address| !known.contains(address.as_str()))
            .filter_map(|address| address.parse().ok())
            .collect();
        if let Some(outbound) = self.replication.outbound.as_mut() {
            for address in unknown {
                outbound.connect(address);
            }
        }
    }

    pub fn handle_peer_disconnected(&mut self, peer: PeerId) {
        if let Some(info) = self.replication.peers.remove(&peer) {
            let still_connected = self.replication.peers.values().any(|other| other.node_id == info.node_id);
            if !still_connected {
                self.replication.disconnected.retain(|(known, _)| known.node_id != info.node_id);
                if self.replication.disconnected.len() == DISCONNECTED_PEERS_MAX {
                    self.replication.disconnected.remove(0);
                }
                self.replication.disconnected.push((info, std::time::SystemTime::now()));
            }
        }
        self.replication.acknowledged.remove(&peer);
        self.replication.replica.handle_peer_disconnected(Instant::now(), peer);
    }

    /// One frame from a peer, read ([`PeerFrame`]): feed the core, apply what it hands over,
    /// answer.
    pub fn handle_peer_frame(&mut self, peer: PeerId, frame: PeerFrame) {
        let PeerFrame { length, message, first_changes } = frame;
        self.metrics.peer_frames_received.inc();
        self.metrics.peer_bytes_received.add(length as u64);
        self.replication.count_traffic(peer, |traffic| traffic.bytes_received += length as u64);
        let message = match message {
            Ok(message) => message,
            Err(error) => return self.refuse_peer(peer, &format!("undecodable message: {error}")),
        };
        if let Message::Peers { addresses } = &message {
            return self.dial_exchanged(addresses);
        }
        let now = Instant::now();
        match self.replication.replica.handle_peer_message(now, peer, message, &StoreSource(&self.store)) {
            Ok(()) => {}
            // A frame racing its connection's open or close: nothing to answer, nothing broken.
            Err(crdt::replica::ProtocolError::UnknownPeer(_)) => {
                tracing::debug!(peer, "dropping a message from a peer that is not connected");
                return;
            }
            Err(error) => return self.refuse_peer(peer, &error.to_string()),
        }
        self.record_acknowledgements();
        self.replication.first_changes = first_changes;
        while let Some((source, apply)) = self.replication.replica.poll_apply() {
            let durable = self.as_peer(source, |engine| engine.apply_from_peer(source, apply));
            self.replication.durable.push(durable);
        }
        // The core hands over every envelope of a message at once: none is left to use these.
        self.replication.first_changes = HashMap::new();
        self.flush_transmits();
    }

    /// Applies one thing the core handed over. It is consumed either way: a change or record
    /// that cannot apply never will, and holding the peer's credit for it would stall the link.
    fn apply_from_peer(&mut self, source: PeerId, apply: Apply) -> Durable {
        match apply {
            Apply::Change(envelope) => {
                let (origin, sequence, observed) = (envelope.origin, envelope.sequence, envelope.timestamp);
                let peer = self
                    .replication
                    .peers
                    .get(&source)
                    .map_or_else(|| format!("peer {source}"), |info| info.name.clone());
                match self.apply_or_quarantine(envelope, &peer) {
                    Ok(true) => {
                        self.metrics.observe_replication_latency(observed);
                        self.metrics.changes_applied.inc();
                    }
                    Ok(false) => {}
                    Err(error) => {
                        tracing::warn!(peer = source, %origin, sequence, %error, "quarantined a change from a peer")
                    }
                }
                self.replication.count_traffic(source, |traffic| traffic.changes_received += 1);
                Durable::Change { source: Some(source), origin, sequence }
            }
            Apply::Record(record) => {
                let key = record.key.clone();
                if let Err(error) = self.apply_snapshot_record(record) {
                    tracing::warn!(peer = source, %key, %error, "refused a snapshot record from a peer");
                }
                self.metrics.snapshot_records_received.inc();
                Durable::Record { source }
            }
            Apply::SnapshotEnd(version_vector) => {
                tracing::info!(peer = source, origins = version_vector.len(), "bootstrapped from a peer's snapshot");
                self.apply_snapshot_end(&version_vector);
                Durable::SnapshotEnd { source, version_vector }
            }
        }
    }

    /// Periodic work: summaries (anti-entropy) to peers that are due one, and log retention.
    pub fn replication_tick(&mut self) {
        let now = Instant::now();
        self.trim_log_if_due(now);
        let due = self.replication.replica.poll_timeout().is_some_and(|due| due <= now);
        if due {
            self.replication.replica.handle_timeout(now, &StoreSource(&self.store));
            self.flush_transmits();
        }
    }

    /// During a group commit, once the batch is in the store and before its flush: its changes go
    /// to peers that lack them (`Replica::handle_available`). Every process start is a new
    /// origin, so a crash during the flush cannot reuse what was sent; the peers hand it back.
    pub(crate) fn relay_available(&mut self) {
        if self.replication.durable.is_empty() {
            return;
        }
        let replication = &mut self.replication;
        replication.replica.handle_available(Instant::now(), &replication.durable, &StoreSource(&self.store));
        self.flush_transmits();
    }

    /// After a group commit: what it made durable goes to the core, which grants credit and
    /// relays to peers that lack it (if `relay_available` did not already).
    pub(crate) fn after_commit(&mut self) {
        if std::mem::take(&mut self.replication.floors_changed) {
            for (origin, floor) in self.log_floors() {
                self.replication.replica.handle_log_trimmed(origin, floor);
            }
        }
        if self.replication.durable.is_empty() {
            return;
        }
        let durable = std::mem::take(&mut self.replication.durable);
        self.replication.replica.handle_durable(Instant::now(), &durable, &StoreSource(&self.store));
        self.flush_transmits();
    }

    /// Resolves, through the returned receiver, once `needed` connected peers hold (origin,
    /// sequence) durably, with how many do. Dropping the receiver abandons the wait.
    pub fn await_acknowledgements(
        &mut self,
        origin: OriginId,
        sequence: u64,
        needed: usize,
    ) -> tokio::sync::oneshot::Receiver<usize> {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let count = self.acknowledgement_count(&origin, sequence);
        if count >= needed {
            let _ = sender.send(count);
        } else {
            self.replication.waiters.retain(|waiter| !waiter.sender.is_closed());
            if self.replication.waiters.len() < WAITERS_MAX {
                self.replication.waiters.push(Waiter { origin, sequence, needed, sender });
            }
        }
        receiver
    }

    /// How many connected peers hold (origin, sequence) durably, as far as they told us.
    pub fn acknowledgement_count(&self, origin: &OriginId, sequence: u64) -> usize {
        self.replication.acknowledged.values().filter(|held| held.contains(origin, sequence)).count()
    }

    fn record_acknowledgements(&mut self) {
        let mut any = false;
        // Writers wait only for this process's own changes, so only those are kept: what a peer
        // says it holds of other origins would only grow the map.
        let own = self.identity().origin;
        let issued = self.next_sequence.saturating_sub(1);
        while let Some((peer, acknowledgement)) = self.replication.replica.poll_acknowledged() {
            let (start, end) = match acknowledgement {
                Acknowledgement::Change { origin, sequence } if origin == own => (sequence, sequence),
                // A summary counts too: a peer that got the change in a snapshot, or from a third
                // node, never names it in a credit message. Only its gap-free prefix is taken, so
                // what a peer claims cannot fragment the map.
                Acknowledgement::Holds(version_vector) => (1, version_vector.contiguous(&own)),
                Acknowledgement::Change { .. } => continue,
            };
            let end = end.min(issued);
            if start == 0 || start > end || !self.replication.peers.contains_key(&peer) {
                continue;
            }
            self.replication.acknowledged.entry(peer).or_default().insert_range(own, start, end);
            any = true;
        }
        if !any || self.replication.waiters.is_empty() {
            return;
        }
        let waiters = std::mem::take(&mut self.replication.waiters);
        for waiter in waiters {
            let count = self.acknowledgement_count(&waiter.origin, waiter.sequence);
            if count >= waiter.needed {
                let _ = waiter.sender.send(count);
            } else if !waiter.sender.is_closed() {
                self.replication.waiters.push(waiter);
            }
        }
    }

    pub fn peer_statuses(&self) -> Vec<PeerStatus> {
        let lags = self.replication.replica.peer_lags();
        let connected = self.replication.peers.iter().map(|(&peer, info)| {
            let lag = lags.get(&peer);
            PeerStatus {
                peer: Some(peer),
                info: info.clone(),
                connected: true,
                peer_lacks: lag.map(|lag| lag.peer_lacks),
                we_lack: lag.map(|lag| lag.we_lack),
                bootstrapping: lag.map(|lag| lag.bootstrapping),
                traffic: self.replication.traffic.get(&info.node_id).copied().unwrap_or_default(),
                state: self.member_state(&info.node_id),
            }
        });
        let disconnected = self.replication.disconnected.iter().map(|(info, _)| PeerStatus {
            peer: None,
            info: info.clone(),
            connected: false,
            peer_lacks: None,
            we_lack: None,
            bootstrapping: None,
            traffic: self.replication.traffic.get(&info.node_id).copied().unwrap_or_default(),
            state: self.member_state(&info.node_id),
        });
        connected.chain(disconnected).collect()
    }

    /// Where the membership's view comes from from now on.
    pub fn set_member_states(&mut self, states: tokio::sync::watch::Receiver<crate::membership::MemberStates>) {
        self.replication.member_states = Some(states);
    }

    /// The failure detector's verdict on a node (hex id), if it has one.
    fn member_state(&self, node_id: &str) -> Option<crate::membership::MemberState> {
        self.replication.member_states.as_ref().and_then(|states| states.borrow().get(node_id).copied())
    }

    fn flush_transmits(&mut self) {
        while let Some((peer, message)) = self.replication.replica.poll_transmit() {
            let bytes = message.encode();
            let length = bytes.len() as u64;
            let (changes, records) = match &message {
                Message::Changes { envelopes } => (envelopes.len() as u64, 0),
                Message::Snapshot { records, .. } => (0, records.len() as u64),
                _ => (0, 0),
            };
            let sent = match self.replication.outbound.as_mut() {
                Some(outbound) => outbound.send(peer, bytes),
                None => false,
            };
            if sent {
                self.metrics.peer_frames_sent.inc();
                self.metrics.peer_bytes_sent.add(length);
                self.replication.count_traffic(peer, |traffic| {
                    traffic.bytes_sent += length;
                    traffic.changes_sent += changes;
                    traffic.snapshot_records_sent += records;
                });
            } else {
                self.metrics.peer_frames_dropped.inc();
                self.replication.replica.handle_transmit_dropped(peer);
            }
        }
    }

    fn refuse_peer(&mut self, peer: PeerId, reason: &str) {
        tracing::warn!(peer, reason, "disconnecting a peer that broke the protocol");
        self.metrics.peer_protocol_errors.inc();
        self.handle_peer_disconnected(peer);
        if let Some(outbound) = self.replication.outbound.as_mut() {
            outbound.disconnect(peer, reason);
        }
    }
}

/// The most writes that may wait for peer acknowledgements at once; beyond it a write with
/// `?acks=N` times out at once (and says so).
const WAITERS_MAX: usize = 10_000;

/// A write waiting until enough peers hold it durably.
pub(crate) struct Waiter {
    origin: OriginId,
    sequence: u64,
    needed: usize,
    sender: tokio::sync::oneshot::Sender<usize>,
}

/// The engine's replication state.
pub(crate) struct Replication {
    pub(crate) replica: crdt::replica::Replica,
    pub(crate) outbound: Option<Box<dyn Outbound>>,
    pub(crate) peers: BTreeMap<PeerId, PeerInfo>,
    /// What the current batch makes durable.
    pub(crate) durable: Vec<Durable>,
    /// The log floors changed in the last commit; the core is told after it.
    pub(crate) floors_changed: bool,
    /// Per peer node id, what crossed the wire (connected and remembered peers only).
    pub(crate) traffic: BTreeMap<String, PeerTraffic>,
    /// Per connected peer, what it said it holds durably (from its credit messages).
    pub(crate) acknowledged: BTreeMap<PeerId, crdt::version_vector::VersionVector>,
    /// Peers seen before and not connected now, with when they left, oldest first.
    pub(crate) disconnected: Vec<(PeerInfo, std::time::SystemTime)>,
    pub(crate) waiters: Vec<Waiter>,
    /// The first changes read from the frame being handled (see [`PeerFrame`]).
    pub(crate) first_changes: HashMap<(OriginId, u64), FirstChange>,
    /// The membership's view, shared by the mesh's membership task (none without a mesh).
    pub(crate) member_states: Option<tokio::sync::watch::Receiver<crate::membership::MemberStates>>,
}

impl Replication {
    /// Counts traffic with a connected peer under its node id.
    fn count_traffic(&mut self, peer: PeerId, count: impl FnOnce(&mut PeerTraffic)) {
        let Some(info) = self.peers.get(&peer) else { return };
        if !self.traffic.contains_key(&info.node_id) {
            // Bounded like status's peers: forget the traffic of peers status forgot.
            let remembered = |node_id: &String| {
                self.peers.values().any(|info| &info.node_id == node_id)
                    || self.disconnected.iter().any(|(info, _)| &info.node_id == node_id)
            };
            if self.traffic.len() >= DISCONNECTED_PEERS_MAX * 2 {
                let forgotten: Vec<String> =
                    self.traffic.keys().filter(|node_id| !remembered(node_id)).cloned().collect();
                for node_id in forgotten {
                    self.traffic.remove(&node_id);
                }
            }
        }
        count(self.traffic.entry(info.node_id.clone()).or_default());
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use crdt::clock::Timestamp;
    use crdt::envelope::Envelope;
    use crdt::identity::NodeId;
    use crdt::key::RecordKey;
    use crdt::record::{Operation, Record, WriteOptions};
    use serde_json::json;

    use super::*;
    use crate::engine::{self, EngineSettings};
    use crate::metrics::Metrics;

    /// Envelope `sequence` of `origin`, as a peer sends it: `operation` (with `fields`) on
    /// `orders/<id>`, written on `record`, stamped as a document of `kind`.
    pub(crate) fn envelope(
        record: &mut Record,
        (origin, sequence, kind): (OriginId, u64, DocumentKind),
        id: &str,
        operation: fn(serde_json::Map<String, serde_json::Value>) -> Operation,
        fields: serde_json::Value,
    ) -> Envelope {
        let key = RecordKey::new("orders", id).expect("a valid key");
        let timestamp = Timestamp { wall_ms: sequence, logical: 0 };
        let options = WriteOptions { writer: None, whole_fields: &[] };
        let operation = operation(fields.as_object().cloned().unwrap_or_default());
        let change = record.write_with(&key, &origin, options, timestamp, &operation).unwrap().unwrap();
        Envelope { origin, node: NodeId([5; 16]), sequence, timestamp, key, kind, change }
    }

    /// A creation and a patch of one record, as a peer's envelopes 1 and 2 of `kind`.
    fn envelopes(origin: OriginId, kind: DocumentKind) -> Vec<Envelope> {
        let mut record = Record::default();
        vec![
            envelope(&mut record, (origin, 1, kind), "o1", Operation::Replace, json!({"n": 1})),
            envelope(&mut record, (origin, 2, kind), "o1", Operation::MergePatch, json!({"m": 2})),
        ]
    }

    #[test]
    fn a_frame_is_read_with_the_first_changes_of_its_automerge_records() {
        let origin = OriginId([4; 16]);
        let records = envelopes(origin, DocumentKind::Record);
        let expected = Record::first_change(&records[0].change).expect("a creation is a first change");
        let frame = PeerFrame::read_ahead(&Message::Changes { envelopes: records }.encode());
        assert_eq!(frame.first_changes, HashMap::from([((origin, 1), expected)]), "the creation, not the patch");
        // Other kinds of document are not read as automerge changes.
        let frame =
            PeerFrame::read_ahead(&Message::Changes { envelopes: envelopes(origin, DocumentKind::MapRecord) }.encode());
        assert!(frame.first_changes.is_empty());
        // Bytes that do not decode are an error for the engine to refuse the peer with.
        let frame = PeerFrame::read_ahead(&[0xc1, 0xff, 0x00]);
        assert!(frame.message.is_err() && frame.first_changes.is_empty());
    }

    /// The engine stores a record new to it from the frame's reading, not a second one: a
    /// reading that (unlike any real one) calls the creation a delete is what it stores.
    #[test]
    fn the_engine_stores_a_new_record_from_its_frame_s_reading() {
        let directory = tempfile::tempdir().unwrap();
        let store = store::Store::open(directory.path()).unwrap();
        let metrics = Arc::new(Metrics::default());
        let (engine, _thread) = engine::start(store, EngineSettings::default(), metrics.clone()).unwrap();
        let origin = OriginId([4; 16]);
        let creation = envelopes(origin, DocumentKind::Record).remove(0);
        let mut frame = PeerFrame::read_ahead(&Message::Changes { envelopes: vec![creation] }.encode());
        let reading = frame.first_changes.get_mut(&(origin, 1)).expect("read with the frame");
        assert!(reading.live);
        reading.live = false;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let status = runtime.block_on(engine.call(move |engine| {
            let info = PeerInfo { node_id: hex::encode([5; 16]), name: "peer".into(), address: "127.0.0.1:1".into() };
            engine.handle_peer_connected(1, info);
            engine.handle_peer_frame(1, frame);
            engine.status()
        }));
        let status = status.unwrap();
        assert_eq!(metrics.records_stored_unbuilt.get(), 1);
        assert_eq!(status.feed_sequence, 1, "the change is stored");
        assert_eq!(status.record_count, 0, "counted as the frame's reading said");
    }
}
