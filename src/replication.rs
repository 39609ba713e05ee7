//! Replication inside the engine thread: the sans-IO core (`crdt::replica`) driven with the
//! store as its change log, and its messages handed to the transport through [`Outbound`].
//!
//! Peer input arrives as engine jobs, so it is ordered with local writes and shares their group
//! commit: envelopes from a peer are applied and staged with the batch, and the core hears that
//! they are durable (and grants the peer credit) only after the batch is flushed. The engine
//! knows peers by number and bytes only; the node maps them to transport connections.

use std::collections::BTreeMap;
use std::time::Instant;

use crdt::envelope::Envelope;
use crdt::identity::OriginId;
use crdt::replica::{ChangeLog, Message, PeerId};
use serde::Serialize;
use store::Store;

use crate::engine::Engine;

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
    /// What the failure detector says (alive, suspect or down), once it has heard of the peer.
    pub state: Option<crate::membership::MemberState>,
}

/// How many disconnected peers status remembers; the oldest are forgotten first.
const DISCONNECTED_PEERS_MAX: usize = 256;

/// The change log in the store, read by the core to send peers what they lack.
pub(crate) struct StoreLog<'a>(pub &'a Store);

impl ChangeLog for StoreLog<'_> {
    fn read(&self, origin: &OriginId, from: u64, limit: usize) -> Vec<Envelope> {
        match self.0.log_range(origin.as_bytes(), from, limit) {
            Ok(entries) => entries
                .into_iter()
                .filter_map(|(sequence, bytes)| match Envelope::decode(&bytes) {
                    Ok(envelope) => Some(envelope),
                    Err(error) => {
                        tracing::warn!(%origin, sequence, %error, "skipping a change-log entry that does not decode");
                        None
                    }
                })
                .collect(),
            Err(error) => {
                tracing::warn!(%origin, %error, "cannot read the change log");
                Vec::new()
            }
        }
    }
}

impl Engine {
    /// Where messages for peers go from now on.
    pub fn set_outbound(&mut self, outbound: Box<dyn Outbound>) {
        self.replication.outbound = Some(outbound);
    }

    pub fn handle_peer_connected(&mut self, peer: PeerId, info: PeerInfo) {
        tracing::info!(peer, name = %info.name, address = %info.address, "peer connected");
        self.replication.disconnected.retain(|(known, _)| known.node_id != info.node_id);
        self.replication.peers.insert(peer, info);
        self.replication.replica.handle_peer_connected(Instant::now(), peer);
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

    /// One frame from a peer: decode, feed the core, apply what it hands over, answer.
    pub fn handle_peer_frame(&mut self, peer: PeerId, bytes: &[u8]) {
        self.metrics.peer_frames_received.inc();
        self.metrics.peer_bytes_received.add(bytes.len() as u64);
        let message = match Message::decode(bytes) {
            Ok(message) => message,
            Err(error) => return self.refuse_peer(peer, &format!("undecodable message: {error}")),
        };
        if let Message::Peers { addresses } = &message {
            return self.dial_exchanged(addresses);
        }
        let now = Instant::now();
        let log = StoreLog(&self.store);
        match self.replication.replica.handle_peer_message(now, peer, message, &log) {
            Ok(()) => {}
            // A frame racing its connection's open or close: nothing to answer, nothing broken.
            Err(crdt::replica::ProtocolError::UnknownPeer(_)) => {
                tracing::debug!(peer, "dropping a message from a peer that is not connected");
                return;
            }
            Err(error) => return self.refuse_peer(peer, &error.to_string()),
        }
        self.record_acknowledgements();
        while let Some((source, envelope)) = self.replication.replica.poll_apply() {
            let id = (envelope.origin, envelope.sequence);
            let observed = envelope.timestamp;
            match self.apply_envelope(envelope) {
                Ok(true) => self.metrics.observe_replication_latency(observed),
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(peer, origin = %id.0, sequence = id.1, %error, "refused a change from a peer")
                }
            }
            // Consumed either way: a change that cannot apply never will, and holding the peer's
            // credit for it would stall the link.
            self.replication.durable.push((Some(source), id.0, id.1));
        }
        self.flush_transmits();
    }

    /// Periodic work: summaries (anti-entropy) to peers that are due one.
    pub fn replication_tick(&mut self) {
        let now = Instant::now();
        let due = self.replication.replica.poll_timeout().is_some_and(|due| due <= now);
        if due {
            self.replication.replica.handle_timeout(now, &StoreLog(&self.store));
            self.flush_transmits();
        }
    }

    /// After a group commit: what it made durable goes to the core, which grants credit and
    /// relays to peers that lack it.
    pub(crate) fn after_commit(&mut self) {
        if self.replication.durable.is_empty() {
            return;
        }
        let durable = std::mem::take(&mut self.replication.durable);
        self.replication.replica.handle_durable(Instant::now(), &durable, &StoreLog(&self.store));
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
        while let Some((peer, origin, sequence)) = self.replication.replica.poll_acknowledged() {
            if self.replication.peers.contains_key(&peer) {
                self.replication.acknowledged.entry(peer).or_default().insert(origin, sequence);
                any = true;
            }
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
                state: self.member_state(&info.node_id),
            }
        });
        let disconnected = self.replication.disconnected.iter().map(|(info, _)| PeerStatus {
            peer: None,
            info: info.clone(),
            connected: false,
            peer_lacks: None,
            we_lack: None,
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
            let sent = match self.replication.outbound.as_mut() {
                Some(outbound) => outbound.send(peer, bytes),
                None => false,
            };
            if sent {
                self.metrics.peer_frames_sent.inc();
                self.metrics.peer_bytes_sent.add(length);
            } else {
                self.metrics.peer_frames_dropped.inc();
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
    /// What the current batch makes durable: `(source peer, origin, sequence)`.
    pub(crate) durable: Vec<(Option<PeerId>, OriginId, u64)>,
    /// Per connected peer, what it said it holds durably (from its credit messages).
    pub(crate) acknowledged: BTreeMap<PeerId, crdt::version_vector::VersionVector>,
    /// Peers seen before and not connected now, with when they left, oldest first.
    pub(crate) disconnected: Vec<(PeerInfo, std::time::SystemTime)>,
    pub(crate) waiters: Vec<Waiter>,
    /// The membership's view, shared by the mesh's membership task (none without a mesh).
    pub(crate) member_states: Option<tokio::sync::watch::Receiver<crate::membership::MemberStates>>,
}
