//! The node's side of the mesh: binds the QUIC endpoint, turns transport events into engine
//! jobs, and hands the engine an [`Outbound`] that queues its messages on the transport.
//!
//! The engine knows peers as numbers; the transport's peer ids are those numbers. Frames are
//! submitted to the engine without waiting for their commit, so a peer's frames are applied in
//! order and in group commits; when the engine's queue is full, this task waits, the transport's
//! event queue fills, and QUIC flow control slows the sender: backpressure end to end.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::sync::watch;
use transport::{Endpoint, EndpointConfig, NodeCertificates, PeerEvent};

use crate::engine::{EngineHandle, Identity};
use crate::replication::{Outbound, PeerInfo};

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

impl Outbound for TransportOutbound {
    fn send(&mut self, peer: u64, bytes: Vec<u8>) -> bool {
        let peer_id = self.peers.lock().unwrap_or_else(PoisonError::into_inner).get(&peer).copied();
        match peer_id {
            Some(peer_id) => self.endpoint.send(peer_id, transport::Bytes::from(bytes)).is_ok(),
            None => false,
        }
    }

    fn connect(&mut self, address: SocketAddr) {
        if let Err(error) = self.endpoint.connect(address) {
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
    let (endpoint, events) = Endpoint::bind(endpoint_config).context("binding the peer endpoint")?;
    tracing::info!(address = %endpoint.local_address(), cluster, "peer endpoint listening");

    let peers = Arc::new(Mutex::new(HashMap::new()));
    let outbound = TransportOutbound { endpoint: endpoint.clone(), peers: peers.clone() };
    engine.submit(move |engine| engine.set_outbound(Box::new(outbound))).await.context("engine stopped")?;
    tokio::spawn(relay_events(events, engine.clone(), peers));
    tokio::spawn(tick(engine.clone(), stop));
    Ok(Mesh { endpoint })
}

/// Feeds transport events to the engine until the endpoint shuts down and closes the channel
/// (reading to the end lets the endpoint's shutdown finish without waiting on a full queue).
async fn relay_events(
    mut events: tokio::sync::mpsc::Receiver<PeerEvent>,
    engine: EngineHandle,
    peers: Arc<Mutex<HashMap<u64, transport::PeerId>>>,
) {
    while let Some(event) = events.recv().await {
        let submitted = match event {
            PeerEvent::Connected { peer_id, node_id, node_name, address, listen_address } => {
                peers.lock().unwrap_or_else(PoisonError::into_inner).insert(peer_id.get(), peer_id);
                let info = PeerInfo {
                    node_id: hex::encode(node_id),
                    name: node_name,
                    address: listen_address.unwrap_or(address).to_string(),
                };
                engine.submit(move |engine| engine.handle_peer_connected(peer_id.get(), info)).await
            }
            PeerEvent::Frame { peer_id, bytes } => {
                engine.submit(move |engine| engine.handle_peer_frame(peer_id.get(), &bytes)).await
            }
            PeerEvent::Disconnected { peer_id, reason } => {
                tracing::info!(peer = peer_id.get(), ?reason, "peer disconnected");
                peers.lock().unwrap_or_else(PoisonError::into_inner).remove(&peer_id.get());
                engine.submit(move |engine| engine.handle_peer_disconnected(peer_id.get())).await
            }
        };
        if submitted.is_err() {
            // The engine stopped; keep draining so the endpoint can shut down.
            while events.recv().await.is_some() {}
            return;
        }
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
