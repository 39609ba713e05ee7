//! The node's side of the mesh: binds the QUIC endpoint, turns transport events into engine
//! jobs, hands the engine an [`Outbound`] that queues its messages on the transport, and runs
//! the membership (SWIM failure detection, `membership.rs`) over the same connections.
//!
//! Every frame starts with a channel byte: [`CHANNEL_REPLICATION`] frames go to the engine,
//! [`CHANNEL_MEMBERSHIP`] frames to the membership task, and a frame on any other channel
//! disconnects its peer. The membership task never waits on the engine: what it decides shows
//! in status through a watch channel the engine reads.
//!
//! The engine knows peers as numbers; the transport's peer ids are those numbers. Frames are
//! submitted to the engine without waiting for their commit, so a peer's frames are applied in
//! order and in group commits; when the engine's queue is full, this task waits, the transport's
//! event queue fills, and QUIC flow control slows the sender: backpressure end to end.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use tokio::sync::{mpsc, watch};
use transport::{Endpoint, EndpointConfig, NodeCertificates, PeerEvent};

use crate::engine::{EngineHandle, Identity};
use crate::membership::{
    MemberIdentity, MemberState, MemberStates, Membership, MembershipError, MembershipEvent, MembershipSettings,
};
use crate::metrics::Metrics;
use crate::replication::{Outbound, PeerFrame, PeerInfo};

/// The first byte of a frame that carries a replication message.
pub const CHANNEL_REPLICATION: u8 = 0;
/// The first byte of a frame that carries a membership (SWIM) message.
pub const CHANNEL_MEMBERSHIP: u8 = 1;
/// Inputs waiting for the membership task; the relay waits for room (the task never blocks).
const MEMBERSHIP_INPUTS_MAX: usize = 1024;
/// Frames at least this large (a catch-up's, of up to 256 changes) are read ahead on tokio's
/// blocking pool (see [`PeerFrame::read_ahead`]); smaller ones, a live stream's, are decoded on
/// the engine thread as they are handled. Reading ahead on the relay task itself held up the
/// HTTP requests and feeds sharing the runtime's workers: three-node throughput fell by a tenth.
const READ_AHEAD_FROM_BYTES: usize = 32 << 10;

/// How often the engine checks whether anti-entropy summaries are due.
const TICK_INTERVAL: Duration = Duration::from_millis(100);

/// Where and how this node meets its peers.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    pub listen_peer: SocketAddr,
    pub seeds: Vec<SocketAddr>,
    pub certs_dir: PathBuf,
    /// Must match the cluster id in the CA certificate, when given.
    pub cluster: Option<String>,
    /// The peer address to tell other nodes, when it is not `listen_peer` (an unspecified IP,
    /// NAT, a proxy). Without it, a node bound to an unspecified IP advertises none.
    pub advertise_peer: Option<SocketAddr>,
    /// Failure-detector timings.
    pub membership: MembershipSettings,
}

/// The running mesh; dropping it does not stop it: call [`Mesh::shutdown`].
#[derive(Debug)]
pub struct Mesh {
    pub endpoint: Endpoint,
}

impl Mesh {
    pub async fn shutdown(&self) {
        self.endpoint.shutdown().await;
    }
}

/// The transport's send queues, as the engine's [`Outbound`].
struct TransportOutbound {
    endpoint: Endpoint,
    peers: Arc<Mutex<HashMap<u64, transport::PeerId>>>,
}

/// `bytes` behind its channel byte, as one frame.
fn framed(channel: u8, bytes: &[u8]) -> transport::Bytes {
    let mut frame = Vec::with_capacity(bytes.len() + 1);
    frame.push(channel);
    frame.extend_from_slice(bytes);
    transport::Bytes::from(frame)
}

impl Outbound for TransportOutbound {
    fn send(&mut self, peer: u64, bytes: Vec<u8>) -> bool {
        let peer_id = self.peers.lock().unwrap_or_else(PoisonError::into_inner).get(&peer).copied();
        match peer_id {
            Some(peer_id) => self.endpoint.send(peer_id, framed(CHANNEL_REPLICATION, &bytes)).is_ok(),
            None => false,
        }
    }

    fn connect(&mut self, address: SocketAddr) {
        if let Err(error) = self.endpoint.connect_learned(address) {
            tracing::debug!(%address, %error, "not dialing an exchanged peer address");
        }
    }

    fn disconnect(&mut self, peer: u64, reason: &str) {
        let peer_id = self.peers.lock().unwrap_or_else(PoisonError::into_inner).remove(&peer);
        if let Some(peer_id) = peer_id {
            self.endpoint.disconnect(peer_id, reason);
        }
    }
}

/// Binds the peer endpoint and starts relaying between it and the engine until `stop`.
pub async fn start(
    config: &MeshConfig,
    engine: &EngineHandle,
    identity: &Identity,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Mesh> {
    let certificates = NodeCertificates::load(&config.certs_dir, &identity.name).with_context(|| {
        format!("loading the certificate for node {:?} from {}", identity.name, config.certs_dir.display())
    })?;
    let cluster = certificates.cluster_id().to_owned();
    if let Some(expected) = &config.cluster
        && expected != &cluster
    {
        bail!("--cluster is {expected:?} but the CA in {} is for cluster {cluster:?}", config.certs_dir.display());
    }
    let mut endpoint_config = EndpointConfig::new(
        config.listen_peer,
        cluster.clone(),
        *identity.node.as_bytes(),
        identity.name.clone(),
        certificates,
    );
    endpoint_config.seeds = config.seeds.clone();
    endpoint_config.listen_address = config.advertise_peer;
    let (endpoint, events) = Endpoint::bind(endpoint_config).context("binding the peer endpoint")?;
    tracing::info!(address = %endpoint.local_address(), cluster, "peer endpoint listening");

    let membership = start_membership(config, &endpoint, identity, engine, metrics.clone(), stop.clone()).await?;
    let peers = Arc::new(Mutex::new(HashMap::new()));
    let outbound = TransportOutbound { endpoint: endpoint.clone(), peers: peers.clone() };
    engine.submit(move |engine| engine.set_outbound(Box::new(outbound))).await.context("engine stopped")?;
    let relay = Relay { engine: engine.clone(), endpoint: endpoint.clone(), peers, membership, metrics };
    tokio::spawn(relay.run(events));
    tokio::spawn(tick(engine.clone(), stop));
    Ok(Mesh { endpoint })
}

/// Starts the membership task for this node and shows its view to the engine's status.
async fn start_membership(
    config: &MeshConfig,
    endpoint: &Endpoint,
    identity: &Identity,
    engine: &EngineHandle,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<mpsc::Sender<MembershipInput>> {
    // The renewal starts from the wall clock, so a restarted node's identity replaces the one
    // the cluster remembers (a clock set back by more than the downtime delays that until the
    // old identity is declared down and this one is announced again).
    let renewal = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as u64);
    let member = MemberIdentity { node_id: *identity.node.as_bytes(), address: endpoint.listen_address(), renewal };
    let seed = crate::membership::random_seed()
        .map_err(|error| anyhow::anyhow!("no randomness to seed the membership: {error}"))?;
    let membership = Membership::new(member, config.membership.clone(), seed).context("starting the membership")?;
    let (view, states) = watch::channel(MemberStates::new());
    engine.submit(move |engine| engine.set_member_states(states)).await.context("engine stopped")?;
    let (inputs, receiver) = mpsc::channel(MEMBERSHIP_INPUTS_MAX);
    let task = MembershipTask {
        membership,
        endpoint: endpoint.clone(),
        connections: HashMap::new(),
        nodes: HashMap::new(),
        view,
        metrics,
    };
    tokio::spawn(task.run(receiver, stop));
    Ok(inputs)
}

/// Moves transport events to the engine and to the membership task.
struct Relay {
    engine: EngineHandle,
    endpoint: Endpoint,
    peers: Arc<Mutex<HashMap<u64, transport::PeerId>>>,
    membership: mpsc::Sender<MembershipInput>,
    metrics: Arc<Metrics>,
}

/// Reads a large replication frame ahead, off the engine thread, on the blocking pool.
async fn read_ahead(bytes: bytes::Bytes) -> PeerFrame {
    let length = bytes.len();
    match tokio::task::spawn_blocking(move || PeerFrame::read_ahead(&bytes)).await {
        Ok(frame) => frame,
        Err(error) => PeerFrame::unreadable(length, format!("the frame could not be read: {error}")),
    }
}

impl Relay {
    /// Feeds transport events on until the endpoint shuts down and closes the channel (reading
    /// to the end lets the endpoint's shutdown finish without waiting on a full queue).
    async fn run(self, mut events: mpsc::Receiver<PeerEvent>) {
        while let Some(event) = events.recv().await {
            if self.handle(event).await.is_err() {
                // The engine stopped; keep draining so the endpoint can shut down.
                while events.recv().await.is_some() {}
                return;
            }
        }
    }

    async fn handle(&self, event: PeerEvent) -> Result<(), crate::engine::EngineError> {
        match event {
            PeerEvent::Connected { peer_id, node_id, node_name, address, listen_address } => {
                self.peers.lock().unwrap_or_else(PoisonError::into_inner).insert(peer_id.get(), peer_id);
                let info = PeerInfo {
                    node_id: hex::encode(node_id),
                    name: node_name,
                    address: listen_address.unwrap_or(address).to_string(),
                };
                self.engine.submit(move |engine| engine.handle_peer_connected(peer_id.get(), info)).await?;
                // The membership task ends only with the node; nothing to do if it is gone.
                let _ = self.membership.send(MembershipInput::Connected { peer_id, node_id, listen_address }).await;
                Ok(())
            }
            PeerEvent::Frame { peer_id, bytes } => match bytes.first() {
                Some(&CHANNEL_REPLICATION) => {
                    let bytes = bytes.slice(1..);
                    // A live stream's small frame is decoded by the engine, which reads a change
                    // as a first change only when it lacks the record.
                    let ahead =
                        if bytes.len() >= READ_AHEAD_FROM_BYTES { Some(read_ahead(bytes.clone()).await) } else { None };
                    let peer = peer_id.get();
                    let frame = move || ahead.unwrap_or_else(|| PeerFrame::read(&bytes));
                    self.engine.submit(move |engine| engine.handle_peer_frame(peer, frame())).await
                }
                Some(&CHANNEL_MEMBERSHIP) => {
                    let _ = self.membership.send(MembershipInput::Frame { peer_id, bytes: bytes.slice(1..) }).await;
                    Ok(())
                }
                channel => {
                    tracing::warn!(
                        peer = peer_id.get(),
                        ?channel,
                        "disconnecting a peer that sent a frame on no known channel"
                    );
                    self.metrics.peer_protocol_errors.inc();
                    self.endpoint.disconnect(peer_id, "frame on an unknown channel");
                    Ok(())
                }
            },
            PeerEvent::Disconnected { peer_id, reason } => {
                tracing::info!(peer = peer_id.get(), ?reason, "peer disconnected");
                self.peers.lock().unwrap_or_else(PoisonError::into_inner).remove(&peer_id.get());
                let _ = self.membership.send(MembershipInput::Disconnected { peer_id }).await;
                self.engine.submit(move |engine| engine.handle_peer_disconnected(peer_id.get())).await
            }
        }
    }
}

/// What the relay tells the membership task.
enum MembershipInput {
    Connected {
        peer_id: transport::PeerId,
        node_id: [u8; 16],
        listen_address: Option<SocketAddr>,
    },
    /// A membership message, channel byte removed.
    Frame {
        peer_id: transport::PeerId,
        bytes: transport::Bytes,
    },
    Disconnected {
        peer_id: transport::PeerId,
    },
}

/// The async shell around [`Membership`]: feeds it connections, frames and due timers, sends
/// what it produces over the connections, and acts on its verdicts.
struct MembershipTask {
    membership: Membership,
    endpoint: Endpoint,
    /// The current connection to each connected node, by node id (one per node: the transport
    /// resolves duplicates); at most the transport's peer limit.
    connections: HashMap<[u8; 16], transport::PeerId>,
    /// The node behind each connection, for the sender check on membership messages.
    nodes: HashMap<transport::PeerId, [u8; 16]>,
    /// Each member's state by hex node id, read by the engine for status.
    view: watch::Sender<MemberStates>,
    metrics: Arc<Metrics>,
}

impl MembershipTask {
    async fn run(mut self, mut inputs: mpsc::Receiver<MembershipInput>, mut stop: watch::Receiver<bool>) {
        loop {
            let deadline = self.membership.poll_timeout().map(tokio::time::Instant::from_std);
            tokio::select! {
                input = inputs.recv() => match input {
                    Some(input) => self.handle_input(input),
                    None => return,
                },
                () = sleep_until(deadline) => {
                    if let Err(error) = self.membership.handle_timeout(Instant::now()) {
                        tracing::debug!(%error, "membership timer");
                    }
                }
                () = stopped(&mut stop) => return,
            }
            self.flush();
        }
    }

    fn handle_input(&mut self, input: MembershipInput) {
        match input {
            MembershipInput::Connected { peer_id, node_id, listen_address } => {
                self.connections.insert(node_id, peer_id);
                self.nodes.insert(peer_id, node_id);
                // Joining through every new connection is cheap and heals a membership that
                // lost track of a node: the answer lists every member the peer knows.
                let to = MemberIdentity { node_id, address: listen_address, renewal: 0 };
                if let Err(error) = self.membership.announce(Instant::now(), to) {
                    tracing::debug!(%error, "announcing to a new peer");
                }
            }
            MembershipInput::Frame { peer_id, bytes } => {
                let Some(&node_id) = self.nodes.get(&peer_id) else { return };
                match self.membership.handle_data(Instant::now(), node_id, &bytes) {
                    Ok(()) => {}
                    Err(error @ (MembershipError::Malformed(_) | MembershipError::WrongSender { .. })) => {
                        tracing::warn!(peer = peer_id.get(), %error, "disconnecting a peer that broke the membership protocol");
                        self.metrics.peer_protocol_errors.inc();
                        self.endpoint.disconnect(peer_id, "bad membership message");
                    }
                    Err(error) => tracing::debug!(peer = peer_id.get(), %error, "membership message"),
                }
            }
            MembershipInput::Disconnected { peer_id } => {
                if let Some(node_id) = self.nodes.remove(&peer_id)
                    && self.connections.get(&node_id) == Some(&peer_id)
                {
                    self.connections.remove(&node_id);
                }
            }
        }
    }

    /// Sends what the membership produced and acts on its events.
    fn flush(&mut self) {
        while let Some((member, bytes)) = self.membership.poll_transmit() {
            match self.connections.get(&member.node_id) {
                // A full queue drops the message: SWIM tolerates loss.
                Some(&peer_id) => {
                    let _ = self.endpoint.send(peer_id, framed(CHANNEL_MEMBERSHIP, &bytes));
                }
                // No connection: dial the member (a no-op while already dialing) and drop this
                // message; the next probe or announce finds the connection.
                None => self.dial(&member),
            }
        }
        while let Some(event) = self.membership.poll_event() {
            self.handle_event(event);
        }
    }

    fn dial(&self, member: &MemberIdentity) {
        if let Some(address) = member.address
            && let Err(error) = self.endpoint.connect_learned(address)
        {
            tracing::debug!(%address, %error, "not dialing a member");
        }
    }

    fn handle_event(&mut self, event: MembershipEvent) {
        let (member, state) = match event {
            MembershipEvent::Member { identity, state } => (identity, state),
            MembershipEvent::Rejoined { identity } => {
                return tracing::warn!(renewal = identity.renewal, "the cluster declared this node down; rejoined");
            }
            MembershipEvent::Defunct => {
                return tracing::error!("the cluster declared this node down and it cannot rejoin until restarted");
            }
        };
        let node = hex::encode(member.node_id);
        let mut before = None;
        self.view.send_modify(|states| before = states.insert(node.clone(), state));
        match state {
            MemberState::Down if before != Some(MemberState::Down) => {
                tracing::warn!(node, address = ?member.address, "member declared down");
                self.metrics.members_down.inc();
                if let Some(&peer_id) = self.connections.get(&member.node_id) {
                    self.endpoint.disconnect(peer_id, "declared down by the membership");
                }
            }
            MemberState::Suspect if before != Some(MemberState::Suspect) => {
                tracing::info!(node, address = ?member.address, "member suspected");
            }
            MemberState::Alive => {
                if before.is_some_and(|before| before != MemberState::Alive) {
                    tracing::info!(node, address = ?member.address, "member alive again");
                }
                if !self.connections.contains_key(&member.node_id) {
                    self.dial(&member);
                }
            }
            MemberState::Down | MemberState::Suspect => {}
        }
    }
}

/// Resolves at `deadline`, or never without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn tick(engine: EngineHandle, mut stop: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(TICK_INTERVAL);
    loop {
        tokio::select! {
            _ = interval.tick() => {
                if engine.submit(|engine| engine.replication_tick()).await.is_err() {
                    return;
                }
            }
            _ = stopped(&mut stop) => return,
        }
    }
}

/// Resolves once the node is stopping (or the stop signal is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|&stopping| stopping).await;
}

#[cfg(test)]
mod tests {
    use crdt::envelope::DocumentKind;
    use crdt::identity::OriginId;
    use crdt::record::{Operation, Record};
    use crdt::replica::Message;
    use serde_json::json;

    use super::*;
    use crate::replication::tests::envelope;

    /// A frame of `count` record creations, encoded as a peer sends it.
    fn creations(origin: OriginId, count: u64) -> bytes::Bytes {
        let envelopes = (1..=count)
            .map(|sequence| {
                let fields = json!({"n": sequence, "note": "x".repeat(200)});
                let address = (origin, sequence, DocumentKind::Record);
                envelope(&mut Record::default(), address, &format!("o{sequence}"), Operation::Replace, fields)
            })
            .collect();
        bytes::Bytes::from(Message::Changes { envelopes }.encode())
    }

    /// A catch-up's frame is large enough to be read ahead, and reading it on the blocking pool
    /// reads every creation in it.
    #[tokio::test]
    async fn a_catch_up_frame_is_read_ahead_on_the_blocking_pool() {
        let origin = OriginId([4; 16]);
        let bytes = creations(origin, 256);
        assert!(bytes.len() >= READ_AHEAD_FROM_BYTES, "{} bytes", bytes.len());
        let read = read_ahead(bytes.clone()).await;
        assert!(read.first_changes() == PeerFrame::read_ahead(&bytes).first_changes(), "the same first changes");
        assert_eq!(read.first_changes().len(), 256, "every creation read");
        assert!(PeerFrame::read(&bytes).first_changes().is_empty(), "the plain read leaves them to the engine");
    }
}
