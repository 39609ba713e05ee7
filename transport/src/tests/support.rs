//! Test helpers: clusters of certificates in temporary directories, endpoints on 127.0.0.1 port
//! 0, and waits with hang guards (never speed assertions).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use tempfile::TempDir;
use tokio::sync::mpsc;

use crate::certificates::{NodeCertificates, Validity, create_cluster_ca, issue_node_certificate};
use crate::config::EndpointConfig;
use crate::endpoint::Endpoint;
use crate::events::{PeerEvent, PeerId};
use crate::frame::{self, FrameLimits};
use crate::handshake::{HELLO_BYTES_MAX, Hello, PROTOCOL_VERSION};

/// How long any single wait may take before the test fails as hung.
pub(crate) const HANG_GUARD: Duration = Duration::from_secs(30);

pub(crate) fn init() {
    crate::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A cluster CA in a temporary directory, issuing node certificates valid for 127.0.0.1.
pub(crate) struct Cluster {
    pub(crate) directory: TempDir,
    pub(crate) cluster_id: String,
}

impl Cluster {
    pub(crate) fn new(cluster_id: &str) -> Cluster {
        init();
        let directory = tempfile::tempdir().unwrap();
        create_cluster_ca(directory.path(), cluster_id).unwrap();
        Cluster { directory, cluster_id: cluster_id.to_owned() }
    }

    pub(crate) fn node(&self, name: &str) -> NodeCertificates {
        self.node_valid(name, Validity::days_from_now(1))
    }

    /// Issues a certificate for `name`, or loads the one issued before.
    pub(crate) fn node_valid(&self, name: &str, validity: Validity) -> NodeCertificates {
        if !self.directory.path().join(format!("{name}.pem")).exists() {
            let localhost = [IpAddr::V4(Ipv4Addr::LOCALHOST)];
            issue_node_certificate(self.directory.path(), name, &localhost, &["localhost".to_owned()], validity)
                .unwrap();
        }
        NodeCertificates::load(self.directory.path(), name).unwrap()
    }

    /// A certificate that expired yesterday.
    pub(crate) fn expired_node(&self, name: &str) -> NodeCertificates {
        let now = SystemTime::now();
        let day = Duration::from_secs(24 * 60 * 60);
        self.node_valid(name, Validity { not_before: now - 10 * day, not_after: now - day })
    }

    /// A configuration for node `name` with node id `[id; 16]`, on 127.0.0.1 port 0.
    pub(crate) fn config(&self, name: &str, id: u8) -> EndpointConfig {
        config(&self.cluster_id, name, id, self.node(name))
    }
}

pub(crate) fn config(cluster_id: &str, name: &str, id: u8, certificates: NodeCertificates) -> EndpointConfig {
    let mut config = EndpointConfig::new(localhost(0), cluster_id, [id; 16], name, certificates);
    // Quick redials keep the reconnect tests short; the doubling is unit-tested in `backoff`.
    config.timing.redial_delay_max = Duration::from_millis(500);
    config
}

pub(crate) fn localhost(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

pub(crate) type Events = mpsc::Receiver<PeerEvent>;

pub(crate) fn bind(config: EndpointConfig) -> (Endpoint, Events) {
    Endpoint::bind(config).unwrap()
}

/// Awaits `future`, failing the test if it takes longer than [`HANG_GUARD`].
pub(crate) async fn guard<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(HANG_GUARD, future).await {
        Ok(value) => value,
        Err(_) => panic!("hung waiting for {what}"),
    }
}

pub(crate) async fn next_event(events: &mut Events) -> PeerEvent {
    guard("an event", events.recv()).await.expect("the event channel is open")
}

/// The next `Connected`, skipping nothing: any other event first fails the test.
pub(crate) async fn expect_connected(events: &mut Events) -> (PeerId, String) {
    match next_event(events).await {
        PeerEvent::Connected { peer_id, node_name, .. } => (peer_id, node_name),
        other => panic!("expected Connected, got {other:?}"),
    }
}

pub(crate) async fn expect_frame(events: &mut Events, expected_peer_id: PeerId) -> Bytes {
    match next_event(events).await {
        PeerEvent::Frame { peer_id, bytes } if peer_id == expected_peer_id => bytes,
        other => panic!("expected a frame from {expected_peer_id}, got {other:?}"),
    }
}

/// Polls `condition` every 10 ms until it holds, failing the test after [`HANG_GUARD`].
pub(crate) async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    guard(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Connects `dialer` to `listener`, returning each side's peer id for the other.
pub(crate) async fn connect_pair(
    dialer: &Endpoint,
    dialer_events: &mut Events,
    listener: &Endpoint,
    listener_events: &mut Events,
) -> (PeerId, PeerId) {
    dialer.connect(listener.local_address()).unwrap();
    let (listener_peer, _) = expect_connected(dialer_events).await;
    let (dialer_peer, _) = expect_connected(listener_events).await;
    (listener_peer, dialer_peer)
}

/// Proves `listener` still serves good peers: a fresh node connects and a frame goes each way.
pub(crate) async fn assert_serves_a_good_peer(cluster: &Cluster, listener: &Endpoint, listener_events: &mut Events) {
    let (good, mut good_events) = bind(cluster.config("good-peer", 200));
    let (listener_peer, good_peer) = connect_pair(&good, &mut good_events, listener, listener_events).await;
    good.send(listener_peer, Bytes::from_static(b"ping")).unwrap();
    assert_eq!(expect_frame(listener_events, good_peer).await, "ping");
    listener.send(good_peer, Bytes::from_static(b"pong")).unwrap();
    assert_eq!(expect_frame(&mut good_events, listener_peer).await, "pong");
    good.shutdown().await;
    match next_event(listener_events).await {
        PeerEvent::Disconnected { peer_id, .. } => assert_eq!(peer_id, good_peer),
        other => panic!("expected the good peer to disconnect, got {other:?}"),
    }
}

/// A hand-driven client for feeding an endpoint bytes no `Endpoint` would send.
pub(crate) struct RawPeer {
    pub(crate) quinn: quinn::Endpoint,
    pub(crate) connection: quinn::Connection,
    pub(crate) send: quinn::SendStream,
    pub(crate) recv: quinn::RecvStream,
}

impl RawPeer {
    /// Connects with `client_config`; `Err` if TLS or the connection fails.
    pub(crate) async fn connect(
        address: SocketAddr,
        client_config: rustls::ClientConfig,
    ) -> Result<RawPeer, quinn::ConnectionError> {
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client_config).unwrap();
        let mut quinn = quinn::Endpoint::client(localhost(0)).unwrap();
        quinn.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let connection = guard("TLS", quinn.connect(address, crate::tls::SERVER_NAME).unwrap()).await?;
        let (send, recv) = guard("a stream", connection.open_bi()).await?;
        Ok(RawPeer { quinn, connection, send, recv })
    }

    /// Sends `hello`'s frame and reads the endpoint's hello back.
    pub(crate) async fn handshake(&mut self, hello: &Hello) -> Result<Hello, String> {
        let mut frame_bytes = Vec::new();
        let limits = FrameLimits { frame_bytes_max: HELLO_BYTES_MAX, compression_bytes_min: usize::MAX };
        frame::encode(&hello.encode(), &limits, &mut frame_bytes).unwrap();
        self.send.write_all(&frame_bytes).await.map_err(|error| error.to_string())?;
        let mut buffer = BytesMut::new();
        loop {
            if let Some(payload) = frame::decode(&mut buffer, &limits).unwrap() {
                return Hello::decode(&payload).map_err(|error| error.to_string());
            }
            match guard("the endpoint's hello", self.recv.read_chunk(4096, true)).await {
                Ok(Some(chunk)) => buffer.extend_from_slice(&chunk.bytes),
                Ok(None) => return Err("stream ended".to_owned()),
                Err(error) => return Err(error.to_string()),
            }
        }
    }

    /// Waits until the endpoint closes the connection, and returns how.
    pub(crate) async fn closed(&self) -> quinn::ConnectionError {
        guard("the endpoint to close the connection", self.connection.closed()).await
    }
}

pub(crate) fn hello(cluster_id: &str, name: &str, id: u8) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        cluster_id: cluster_id.to_owned(),
        node_id: [id; 16],
        node_name: name.to_owned(),
        listen_address: None,
    }
}

/// `length` pseudo-random bytes from `seed` (xorshift): incompressible, so frames of it go on
/// the wire uncompressed and at full length.
pub(crate) fn noise(seed: u64, length: usize) -> Vec<u8> {
    let mut state = seed | 1;
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}
