//! The endpoint: binds the UDP socket, accepts and dials peers, and is the node's handle for
//! sending, listing peers, reading counters and shutting down.
//!
//! Not the per-connection work (see [`crate::connection`]) and not the bytes on the wire (see
//! [`crate::frame`] and [`crate::handshake`]).

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::{debug, info, warn};

use crate::backoff::{Backoff, random_u64};
use crate::config::{EndpointConfig, Limits, Timing};
use crate::connection::{self, HandshakeFailure};
use crate::counters::{Counters, CountersSnapshot, RefusalReason};
use crate::events::{CloseCode, Direction, DisconnectReason, PeerEvent, PeerId, PeerInfo};
use crate::handshake::Hello;
use crate::peers::{PeerTable, SendError};
use crate::tls::TlsConfigError;

/// Where the endpoint is in its life. Only ever moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    /// Accepting, dialing and moving frames.
    Running,
    /// `shutdown` was called: no new connections; writers flush their queues and end their
    /// streams; readers still deliver.
    Draining,
    /// The flush time is over: everything closes now and events are only delivered if there is
    /// room.
    Stopped,
}

/// Why [`Endpoint::bind`] failed. Nothing is left running.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// A value in the configuration cannot work.
    #[error("invalid endpoint configuration: {0}")]
    InvalidConfig(String),
    /// The certificates cannot be turned into TLS configurations.
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    /// The TLS configuration has no cipher suite QUIC can use (cannot happen with ring).
    #[error("the TLS configuration has no cipher suite QUIC can use")]
    NoQuicCipherSuite,
    /// The UDP socket could not be bound.
    #[error("cannot bind UDP {address}: {source}")]
    Socket { address: SocketAddr, source: std::io::Error },
    /// `bind` was called outside a Tokio runtime.
    #[error("Endpoint::bind must be called inside a Tokio runtime")]
    NoRuntime,
}

/// Why [`Endpoint::connect`] did not start dialing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// `shutdown` was called.
    #[error("the endpoint is shut down")]
    ShutDown,
    /// Already dialing [`DIAL_TARGETS_MAX`] addresses.
    #[error("already dialing {DIAL_TARGETS_MAX} addresses")]
    TooManyTargets,
}

/// The most addresses dialed at once (seeds and learned ones together).
pub const DIAL_TARGETS_MAX: usize = 1024;

/// How many failed attempts in a row end the dialing of a learned address (about two minutes
/// with the default backoff). A peer that comes back is learned again, or dials us.
pub const LEARNED_FAILURES_MAX: u64 = 12;

/// A QUIC endpoint that accepts and dials cluster peers. Cheap to clone; all clones are the same
/// endpoint.
///
/// # Use
///
/// ```no_run
/// # async fn example(config: transport::EndpointConfig) -> Result<(), Box<dyn std::error::Error>> {
/// transport::install_crypto_provider();
/// let (endpoint, mut events) = transport::Endpoint::bind(config)?;
/// while let Some(event) = events.recv().await {
///     match event {
///         transport::PeerEvent::Connected { peer_id, node_name, .. } => {
///             println!("{node_name} connected");
///             // Backpressure is the caller's: `Full` means "not now".
///             let _ = endpoint.send(peer_id, bytes::Bytes::from_static(b"hello"));
///         }
///         transport::PeerEvent::Frame { peer_id, bytes } => println!("{peer_id}: {} bytes", bytes.len()),
///         transport::PeerEvent::Disconnected { peer_id, reason } => println!("{peer_id} left: {reason}"),
///     }
/// }
/// endpoint.shutdown().await;
/// # Ok(())
/// # }
/// ```
///
/// Call [`Endpoint::shutdown`] before dropping the last clone: the endpoint's tasks run until
/// then.
#[derive(Clone)]
pub struct Endpoint {
    shared: Arc<Shared>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Endpoint")
            .field("local_address", &self.shared.local_address)
            .field("node_name", &self.shared.hello.node_name)
            .finish_non_exhaustive()
    }
}

/// State shared by the endpoint's handle and all its tasks.
pub(crate) struct Shared {
    pub(crate) quinn: quinn::Endpoint,
    /// Our hello, as sent to every peer.
    pub(crate) hello: Hello,
    pub(crate) limits: Limits,
    pub(crate) timing: Timing,
    pub(crate) counters: Counters,
    local_address: SocketAddr,
    peers: Mutex<PeerTable>,
    next_peer_id: AtomicU64,
    pub(crate) phase: watch::Sender<Phase>,
    /// What a new task needs; taken by `shutdown`, after which no task starts.
    spawner: Mutex<Option<TaskContext>>,
    /// Closes when every task has ended (each holds a sender through its `TaskContext`).
    tasks_ended: Mutex<Option<mpsc::Receiver<()>>>,
    /// Addresses with a dial task, so `connect` to one of them is a no-op.
    dial_targets: Mutex<HashSet<SocketAddr>>,
    /// Bounds incoming handshakes in progress.
    handshake_permits: Arc<Semaphore>,
    runtime: tokio::runtime::Handle,
}

/// What every task holds: the shared state, the event sender, and a token whose drop tells
/// `shutdown` the task has ended.
#[derive(Clone)]
pub(crate) struct TaskContext {
    pub(crate) shared: Arc<Shared>,
    pub(crate) events: mpsc::Sender<PeerEvent>,
    _alive: mpsc::Sender<()>,
}

impl Shared {
    pub(crate) fn peer_table(&self) -> MutexGuard<'_, PeerTable> {
        self.peers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn next_peer_id(&self) -> PeerId {
        PeerId(self.next_peer_id.fetch_add(1, Ordering::Relaxed))
    }

    fn context(&self) -> Option<TaskContext> {
        self.spawner.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn dial_targets(&self) -> MutexGuard<'_, HashSet<SocketAddr>> {
        self.dial_targets.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Resolves once the endpoint is draining or stopped.
pub(crate) async fn wait_draining(phase: &mut watch::Receiver<Phase>) {
    let _ = phase.wait_for(|phase| *phase != Phase::Running).await;
}

/// Resolves once the endpoint is stopped.
pub(crate) async fn wait_stopped(phase: &mut watch::Receiver<Phase>) {
    let _ = phase.wait_for(|phase| *phase == Phase::Stopped).await;
}

impl Endpoint {
    /// Binds `config.bind_address`, starts accepting peers and dialing `config.seeds`, and
    /// returns the endpoint with the receiving end of its event channel (capacity
    /// `limits.event_queue_events_max`). Must be called inside a Tokio runtime.
    pub fn bind(config: EndpointConfig) -> Result<(Endpoint, mpsc::Receiver<PeerEvent>), BindError> {
        config.validate().map_err(BindError::InvalidConfig)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| BindError::NoRuntime)?;
        let transport = Arc::new(transport_config(&config.timing)?);

        let server_crypto = QuicServerConfig::try_from(config.certificates.server_config()?)
            .map_err(|_| BindError::NoQuicCipherSuite)?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server_config.transport_config(transport.clone());
        server_config.max_incoming(config.limits.handshakes_max.saturating_mul(2));
        let client_crypto = QuicClientConfig::try_from(config.certificates.client_config()?)
            .map_err(|_| BindError::NoQuicCipherSuite)?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(client_crypto));
        client_config.transport_config(transport);

        let mut quinn = quinn::Endpoint::server(server_config, config.bind_address)
            .map_err(|source| BindError::Socket { address: config.bind_address, source })?;
        quinn.set_default_client_config(client_config);
        let local_address =
            quinn.local_addr().map_err(|source| BindError::Socket { address: config.bind_address, source })?;
        let listen_address =
            config.listen_address.or_else(|| (!local_address.ip().is_unspecified()).then_some(local_address));

        #[cfg(test)]
        let protocol_version = config.protocol_version;
        #[cfg(not(test))]
        let protocol_version = crate::handshake::PROTOCOL_VERSION;
        let hello = Hello {
            protocol_version,
            cluster_id: config.cluster_id.clone(),
            node_id: config.node_id,
            node_name: config.node_name.clone(),
            listen_address,
        };

        let (events, events_receiver) = mpsc::channel(config.limits.event_queue_events_max);
        let (alive, tasks_ended) = mpsc::channel(1);
        let (phase, _) = watch::channel(Phase::Running);
        let shared = Arc::new(Shared {
            quinn,
            hello,
            limits: config.limits,
            timing: config.timing,
            counters: Counters::default(),
            local_address,
            peers: Mutex::new(PeerTable::default()),
            next_peer_id: AtomicU64::new(1),
            phase,
            spawner: Mutex::new(None),
            tasks_ended: Mutex::new(Some(tasks_ended)),
            dial_targets: Mutex::new(HashSet::new()),
            handshake_permits: Arc::new(Semaphore::new(config.limits.handshakes_max)),
            runtime,
        });
        let context = TaskContext { shared: shared.clone(), events, _alive: alive };
        *shared.spawner.lock().unwrap_or_else(PoisonError::into_inner) = Some(context.clone());
        shared.runtime.spawn(accept_loop(context));

        let endpoint = Endpoint { shared };
        info!(
            address = %local_address, node_name = %endpoint.shared.hello.node_name,
            cluster_id = %endpoint.shared.hello.cluster_id, "transport listening"
        );
        for seed in config.seeds {
            // Cannot fail: nothing has shut the endpoint down yet.
            let _ = endpoint.connect(seed);
        }
        Ok((endpoint, events_receiver))
    }

    /// The bound UDP address (with the real port when bound to port 0).
    pub fn local_address(&self) -> SocketAddr {
        self.shared.local_address
    }

    /// The address this endpoint tells peers in its hello, if any.
    pub fn listen_address(&self) -> Option<SocketAddr> {
        self.shared.hello.listen_address
    }

    /// Queues one frame for `peer_id`. Never waits: a full queue is the caller's backpressure.
    pub fn send(&self, peer_id: PeerId, bytes: Bytes) -> Result<(), SendError> {
        let bytes_max = self.shared.limits.frame_bytes_max;
        if bytes.len() > bytes_max {
            return Err(SendError::TooLarge { bytes: bytes.len(), bytes_max });
        }
        if *self.shared.phase.borrow() != Phase::Running {
            return Err(SendError::NotConnected);
        }
        let handle = self.shared.peer_table().get(peer_id).ok_or(SendError::NotConnected)?;
        if handle.is_closing() {
            return Err(SendError::NotConnected);
        }
        let result = handle.queue.enqueue(bytes);
        if result == Err(SendError::Full) {
            Counters::add(&self.shared.counters.send_queue_full, 1);
        }
        result
    }

    /// Closes the connection to `peer_id` now and tells the peer `reason` (keep it short: it
    /// travels in the QUIC close frame). Frames still queued for it are dropped; its
    /// `Disconnected` follows with [`DisconnectReason::Requested`]. If this endpoint dialed the
    /// peer, it redials after the backoff. Returns whether `peer_id` was connected.
    pub fn disconnect(&self, peer_id: PeerId, reason: &str) -> bool {
        let Some(handle) = self.shared.peer_table().get(peer_id) else { return false };
        let closed = handle.close(DisconnectReason::Requested(reason.to_owned()), CloseCode::Requested, reason);
        if closed {
            info!(%peer_id, node_name = %handle.info.node_name, reason, "disconnecting a peer");
        }
        closed
    }

    /// Dials `address` now and again whenever the connection is lost, forever, with
    /// exponential backoff plus jitter, until `shutdown`. A no-op if `address` is already being
    /// dialed. Stops by itself if `address` turns out to be this node.
    pub fn connect(&self, address: SocketAddr) -> Result<(), ConnectError> {
        self.dial(address, None)
    }

    /// Like [`Endpoint::connect`], for an address learned from a peer (which may be stale: a
    /// node that restarted on another port, or one that is gone): dialing stops after
    /// [`LEARNED_FAILURES_MAX`] failed attempts in a row, so dead addresses do not pile up.
    pub fn connect_learned(&self, address: SocketAddr) -> Result<(), ConnectError> {
        self.dial(address, Some(LEARNED_FAILURES_MAX))
    }

    fn dial(&self, address: SocketAddr, failures_max: Option<u64>) -> Result<(), ConnectError> {
        let context = self.shared.context().ok_or(ConnectError::ShutDown)?;
        let mut targets = self.shared.dial_targets();
        if targets.contains(&address) {
            return Ok(());
        }
        if targets.len() >= DIAL_TARGETS_MAX {
            return Err(ConnectError::TooManyTargets);
        }
        targets.insert(address);
        self.shared.runtime.spawn(dial_loop(context, address, failures_max));
        Ok(())
    }

    /// How many addresses are being dialed now (seeds and learned ones).
    pub fn dialing(&self) -> usize {
        self.shared.dial_targets().len()
    }

    /// The connected peers now, by peer id.
    pub fn peers(&self) -> Vec<PeerInfo> {
        self.shared.peer_table().list()
    }

    /// The counters now.
    pub fn counters(&self) -> CountersSnapshot {
        self.shared.counters.snapshot()
    }

    /// Shuts down gracefully: stops accepting and dialing, lets every connection write what is
    /// queued and end its stream, and waits up to `timing.shutdown_timeout` for peers to read
    /// it; then closes what is left. Every connection's `Disconnected` is delivered while there
    /// is room in the event channel, and the channel ends (`recv` gives `None`) once all tasks
    /// are done. Later calls return at once, even while the first is still running.
    pub async fn shutdown(&self) {
        let shared = &self.shared;
        let tasks_ended = shared.tasks_ended.lock().unwrap_or_else(PoisonError::into_inner).take();
        let Some(mut tasks_ended) = tasks_ended else { return };
        shared.spawner.lock().unwrap_or_else(PoisonError::into_inner).take();
        info!(node_name = %shared.hello.node_name, "transport shutting down");
        shared.phase.send_replace(Phase::Draining);
        let timeout = shared.timing.shutdown_timeout;
        if tokio::time::timeout(timeout, tasks_ended.recv()).await.is_err() {
            debug!("connections did not finish within the shutdown timeout; closing them");
        }
        shared.phase.send_replace(Phase::Stopped);
        for handle in shared.peer_table().all() {
            handle.connection.close(CloseCode::Closing.varint(), b"shutting down");
        }
        shared.quinn.close(CloseCode::Closing.varint(), b"shutting down");
        if tokio::time::timeout(timeout, tasks_ended.recv()).await.is_err() {
            warn!("transport tasks did not end after the connections closed");
        }
        // Lets the peers see our CONNECTION_CLOSE before the socket goes away.
        let _ = tokio::time::timeout(timeout, shared.quinn.wait_idle()).await;
    }

    /// The send queue length for one peer (tests of the queue limit).
    #[cfg(test)]
    pub(crate) fn queued_frames(&self, peer_id: PeerId) -> Option<usize> {
        self.shared.peer_table().get(peer_id).map(|handle| handle.queue.queued_frames())
    }
}

fn transport_config(timing: &Timing) -> Result<quinn::TransportConfig, BindError> {
    let idle_timeout = quinn::IdleTimeout::try_from(timing.idle_timeout)
        .map_err(|_| BindError::InvalidConfig("idle_timeout is too long for QUIC".to_owned()))?;
    let mut transport = quinn::TransportConfig::default();
    // One stream carries everything; a few more are allowed for a future protocol version.
    transport.max_concurrent_bidi_streams(4u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    transport.max_idle_timeout(Some(idle_timeout));
    transport.keep_alive_interval(Some(timing.keep_alive));
    transport.datagram_receive_buffer_size(None);
    Ok(transport)
}

/// Accepts incoming connections until the endpoint drains, each handshake in its own task, at
/// most `handshakes_max` at once.
async fn accept_loop(context: TaskContext) {
    let shared = context.shared.clone();
    let mut phase = shared.phase.subscribe();
    loop {
        let incoming = tokio::select! {
            incoming = shared.quinn.accept() => incoming,
            () = wait_draining(&mut phase) => None,
        };
        let Some(incoming) = incoming else { break };
        match shared.handshake_permits.clone().try_acquire_owned() {
            Ok(permit) => {
                shared.runtime.spawn(accept_one(context.clone(), incoming, permit));
            }
            Err(_) => {
                shared.counters.refuse(RefusalReason::Busy);
                warn!(address = %incoming.remote_address(), "refused a peer: too many handshakes in progress");
                incoming.refuse();
            }
        }
    }
}

async fn accept_one(context: TaskContext, incoming: quinn::Incoming, permit: OwnedSemaphorePermit) {
    let shared = context.shared.clone();
    let address = incoming.remote_address();
    let mut phase = shared.phase.subscribe();
    let handshake = tokio::time::timeout(shared.timing.handshake_timeout, connection::accept(&shared, incoming));
    let outcome = tokio::select! {
        outcome = handshake => outcome,
        () = wait_draining(&mut phase) => return,
    };
    drop(permit);
    match outcome {
        Ok(Ok(handshaken)) => {
            connection::run(&context, handshaken).await;
        }
        Ok(Err(failure)) => report_failure(&shared, address, Direction::Accepted, &failure),
        Err(_) => {
            shared.counters.refuse(RefusalReason::BadHandshake);
            warn!(%address, "refused a peer: no handshake within {:?}", shared.timing.handshake_timeout);
        }
    }
}

/// Dials one address until the endpoint drains: after each connection or failed attempt it
/// waits with backoff, and while another connection to the same node is up it waits for that
/// one to end instead of dialing a duplicate.
async fn dial_loop(context: TaskContext, address: SocketAddr, failures_max: Option<u64>) {
    let shared = context.shared.clone();
    let mut phase = shared.phase.subscribe();
    let mut backoff = Backoff::new(shared.timing.redial_delay_min, shared.timing.redial_delay_max);
    let mut known_node_id: Option<[u8; 16]> = None;
    let mut attempts: u64 = 0;
    let mut failures_in_a_row: u64 = 0;
    while *phase.borrow() == Phase::Running {
        let existing = {
            let table = shared.peer_table();
            known_node_id.and_then(|node_id| table.by_node(&node_id)).or_else(|| table.by_address(address))
        };
        if let Some(existing) = existing {
            tokio::select! {
                () = existing.finished() => continue,
                () = wait_draining(&mut phase) => break,
            }
        }
        if attempts > 0 {
            Counters::add(&shared.counters.reconnects, 1);
        }
        attempts += 1;
        let dial = tokio::time::timeout(shared.timing.handshake_timeout, connection::dial(&shared, address));
        let outcome = tokio::select! {
            outcome = dial => outcome,
            () = wait_draining(&mut phase) => break,
        };
        match outcome {
            Ok(Ok(handshaken)) => {
                failures_in_a_row = 0;
                known_node_id = Some(handshaken.node_id());
                let connected_at = tokio::time::Instant::now();
                connection::run(&context, handshaken).await;
                // Only a connection that lasted starts the backoff over, so a peer that is
                // refused or disconnected right after every handshake is redialed ever more
                // slowly, not every `redial_delay_min`.
                if connected_at.elapsed() >= shared.timing.redial_delay_max {
                    backoff.reset();
                }
            }
            Ok(Err(failure)) => {
                failures_in_a_row += 1;
                report_failure(&shared, address, Direction::Dialed, &failure);
                if failure.is_self_connection() {
                    info!(%address, "this address is this node itself; no longer dialing it");
                    break;
                }
                if let Some(node_id) = failure.duplicate_node_id() {
                    known_node_id = Some(node_id);
                }
            }
            Err(_) => {
                failures_in_a_row += 1;
                if failures_in_a_row == 1 {
                    info!(%address, "no answer within {:?}; will keep redialing", shared.timing.handshake_timeout);
                } else {
                    debug!(%address, attempts, "still no answer; will keep redialing");
                }
            }
        }
        if failures_max.is_some_and(|maximum| failures_in_a_row >= maximum) {
            info!(%address, failures_in_a_row, "giving up on a learned address");
            break;
        }
        let delay = backoff.next_delay(random_u64());
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = wait_draining(&mut phase) => break,
        }
    }
    shared.dial_targets().remove(&address);
}

fn report_failure(shared: &Shared, address: SocketAddr, direction: Direction, failure: &HandshakeFailure) {
    let direction = match direction {
        Direction::Dialed => "dialing",
        Direction::Accepted => "accepting",
    };
    match failure.refusal_reason() {
        Some(reason) => {
            shared.counters.refuse(reason);
            warn!(%address, refusal = reason.name(), "{direction} a peer failed: {failure}");
        }
        None => debug!(%address, "{direction} a peer failed: {failure}"),
    }
}
