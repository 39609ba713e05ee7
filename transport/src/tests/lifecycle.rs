//! Connections over time: backpressure at the queue limits, redialing a restarted listener,
//! duplicate connections, and a graceful shutdown.

use std::time::Duration;

use bytes::Bytes;

use crate::config::EndpointConfig;
use crate::endpoint::{BindError, Endpoint};
use crate::events::{Direction, DisconnectReason, PeerEvent, PeerId};
use crate::peers::SendError;
use crate::tests::support::{
    Cluster, Events, bind, connect_pair, eventually, expect_connected, expect_frame, guard, localhost, next_event,
};

/// 64 KiB that zstd cannot shrink, numbered in the first four bytes.
fn incompressible(index: u32) -> Bytes {
    let mut payload = crate::tests::support::noise(u64::from(index).wrapping_mul(0x9e37_79b9_7f4a_7c15), 64 * 1024);
    payload[..4].copy_from_slice(&index.to_be_bytes());
    Bytes::from(payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_send_queue_answers_full_at_its_limit_and_recovers() {
    let cluster = Cluster::new("a");
    let mut sender_config = cluster.config("sender", 1);
    sender_config.limits.send_queue_frames_max = 8;
    let mut receiver_config = cluster.config("receiver", 2);
    receiver_config.limits.event_queue_events_max = 2;
    let (sender, mut sender_events) = bind(sender_config);
    let (receiver, mut receiver_events) = bind(receiver_config);
    let (receiver_peer, sender_peer) = connect_pair(&sender, &mut sender_events, &receiver, &mut receiver_events).await;

    // The receiver's node reads nothing now: its event channel fills, its reader stops, QUIC
    // flow control stops the sender's writer, and the sender's queue fills up to its limit.
    let mut sent: u32 = 0;
    let mut full_in_a_row = 0;
    guard("the send queue to stay full", async {
        while full_in_a_row < 50 {
            match sender.send(receiver_peer, incompressible(sent)) {
                Ok(()) => {
                    sent += 1;
                    full_in_a_row = 0;
                }
                Err(SendError::Full) => {
                    full_in_a_row += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(error) => panic!("unexpected {error}"),
            }
        }
    })
    .await;
    assert_eq!(sender.queued_frames(receiver_peer), Some(8), "the queue holds exactly its limit");
    assert_eq!(receiver_events.len(), 2, "the event channel holds exactly its limit");
    assert!(sender.counters().send_queue_full >= 50);

    // The node reads again: everything accepted arrives, in order, and sending works again.
    for index in 0..sent {
        let bytes = expect_frame(&mut receiver_events, sender_peer).await;
        assert_eq!(bytes, incompressible(index), "frame {index}");
    }
    sender.send(receiver_peer, incompressible(sent)).unwrap();
    assert_eq!(expect_frame(&mut receiver_events, sender_peer).await, incompressible(sent));
    sender.shutdown().await;
    receiver.shutdown().await;
}

/// Binds `config` on its port, retrying while the old socket is still being released.
async fn bind_again(config: EndpointConfig) -> (Endpoint, Events) {
    guard("the port to be free again", async {
        loop {
            match Endpoint::bind(config.clone()) {
                Ok(bound) => return bound,
                Err(BindError::Socket { .. }) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(error) => panic!("{error}"),
            }
        }
    })
    .await
}

async fn until_closed(events: &mut Events) {
    guard("the event channel to close", async { while events.recv().await.is_some() {} }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialer_reconnects_after_the_listener_restarts_on_the_same_port() {
    let cluster = Cluster::new("a");
    let (listener, mut listener_events) = bind(cluster.config("listener", 1));
    let address = listener.local_address();
    let mut dialer_config = cluster.config("dialer", 2);
    dialer_config.seeds = vec![address];
    let (dialer, mut dialer_events) = bind(dialer_config);
    let (first_peer, _) = expect_connected(&mut dialer_events).await;
    expect_connected(&mut listener_events).await;

    listener.shutdown().await;
    until_closed(&mut listener_events).await;
    drop(listener);
    match next_event(&mut dialer_events).await {
        PeerEvent::Disconnected { peer_id, .. } => assert_eq!(peer_id, first_peer),
        other => panic!("expected the listener to go, got {other:?}"),
    }

    let mut restarted_config = cluster.config("listener", 1);
    restarted_config.bind_address = localhost(address.port());
    let (restarted, mut restarted_events) = bind_again(restarted_config).await;
    let (second_peer, node_name) = expect_connected(&mut dialer_events).await;
    assert_eq!(node_name, "listener");
    assert_ne!(second_peer, first_peer, "a new connection gets a new peer id");
    let (dialer_peer, _) = expect_connected(&mut restarted_events).await;
    dialer.send(second_peer, Bytes::from_static(b"welcome back")).unwrap();
    assert_eq!(expect_frame(&mut restarted_events, dialer_peer).await, "welcome back");
    assert!(dialer.counters().reconnects >= 1);
    dialer.shutdown().await;
    restarted.shutdown().await;
}

/// Drains events until `endpoint` has exactly one peer and no event is pending, and returns the
/// peer id of the last `Connected`, checking that every earlier one was disconnected.
async fn settled_peer(endpoint: &Endpoint, events: &mut Events) -> PeerId {
    let mut connected: Vec<PeerId> = Vec::new();
    guard("one peer to remain", async {
        loop {
            while let Ok(event) = events.try_recv() {
                match event {
                    PeerEvent::Connected { peer_id, .. } => connected.push(peer_id),
                    PeerEvent::Disconnected { peer_id, reason } => {
                        assert_eq!(reason, DisconnectReason::Replaced);
                        connected.retain(|candidate| *candidate != peer_id);
                    }
                    PeerEvent::Frame { .. } => panic!("no frames were sent"),
                }
            }
            let peers = endpoint.peers();
            if connected.len() == 1 && peers.len() == 1 && peers[0].peer_id == connected[0] {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    connected[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_dialing_each_other_keep_the_connection_the_lower_id_dialed() {
    let cluster = Cluster::new("a");
    let (low, mut low_events) = bind(cluster.config("low", 1));
    let (high, mut high_events) = bind(cluster.config("high", 2));
    low.connect(high.local_address()).unwrap();
    high.connect(low.local_address()).unwrap();

    // Either connection may come up first; the one low dialed is the one both sides end with.
    eventually(
        "low to keep the connection it dialed",
        || matches!(low.peers().as_slice(), [peer] if peer.direction == Direction::Dialed),
    )
    .await;
    eventually(
        "high to keep the connection low dialed",
        || matches!(high.peers().as_slice(), [peer] if peer.direction == Direction::Accepted),
    )
    .await;
    let low_peer = settled_peer(&low, &mut low_events).await;
    let high_peer = settled_peer(&high, &mut high_events).await;

    // Stable: a pause in which churn would show, then the same single connection carries frames.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(low_events.try_recv().is_err() && high_events.try_recv().is_err(), "no churn");
    low.send(low_peer, Bytes::from_static(b"from low")).unwrap();
    assert_eq!(expect_frame(&mut high_events, high_peer).await, "from low");
    high.send(high_peer, Bytes::from_static(b"from high")).unwrap();
    assert_eq!(expect_frame(&mut low_events, low_peer).await, "from high");
    low.shutdown().await;
    high.shutdown().await;
}

/// A node listening on every address, and the address of it on 127.0.0.2: the same socket, but
/// an address its own outgoing packets (from 127.0.0.1) never show, so a dialer cannot tell it
/// already has a connection to that node.
fn bind_on_every_address(cluster: &Cluster, name: &str, id: u8) -> (Endpoint, Events, std::net::SocketAddr) {
    let mut config = cluster.config(name, id);
    config.bind_address = "0.0.0.0:0".parse().unwrap();
    let (endpoint, events) = bind(config);
    let other_address = std::net::SocketAddr::new([127, 0, 0, 2].into(), endpoint.local_address().port());
    (endpoint, events, other_address)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_connection_from_the_lower_id_replaces_the_earlier_one_in_order() {
    let cluster = Cluster::new("a");
    let (low, mut low_events) = bind(cluster.config("low", 1));
    let (high, mut high_events, high_other_address) = bind_on_every_address(&cluster, "high", 2);
    high.connect(low.local_address()).unwrap();
    let (high_from_low, _) = expect_connected(&mut low_events).await;
    let (low_from_high, _) = expect_connected(&mut high_events).await;

    // Now the lower id dials too: its connection wins on both sides, and each side hears the
    // old connection's Disconnected before the new one's Connected.
    low.connect(high_other_address).unwrap();
    for (events, old) in [(&mut low_events, high_from_low), (&mut high_events, low_from_high)] {
        match next_event(events).await {
            PeerEvent::Disconnected { peer_id, reason } => {
                assert_eq!(peer_id, old);
                assert_eq!(reason, DisconnectReason::Replaced);
            }
            other => panic!("expected the old connection to go first, got {other:?}"),
        }
        let (new, _) = expect_connected(events).await;
        assert_ne!(new, old);
    }
    assert_eq!(low.peers()[0].direction, Direction::Dialed);
    assert!(low.counters().duplicates_closed + high.counters().duplicates_closed >= 1);
    low.shutdown().await;
    high.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_connection_from_the_higher_id_is_closed_and_not_retried() {
    let cluster = Cluster::new("a");
    let (low, mut low_events, low_other_address) = bind_on_every_address(&cluster, "low", 1);
    let (high, mut high_events) = bind(cluster.config("high", 2));
    low.connect(high.local_address()).unwrap();
    let (high_peer, _) = expect_connected(&mut low_events).await;
    let (low_peer, _) = expect_connected(&mut high_events).await;

    high.connect(low_other_address).unwrap();
    eventually("the duplicate to be closed", || low.counters().duplicates_closed >= 1).await;
    // A pause in which redials would show (they start at 100 ms): the dialer learned from the
    // close which node it reached, and waits for the kept connection instead.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(high.counters().reconnects, 0, "no redial while the kept connection is up");
    assert_eq!(low.counters().duplicates_closed, 1);
    assert!(low_events.try_recv().is_err() && high_events.try_recv().is_err(), "the kept connection never blinked");
    assert_eq!(low.peers().len(), 1);
    assert_eq!(low.peers()[0].peer_id, high_peer);
    high.send(low_peer, Bytes::from_static(b"same connection")).unwrap();
    assert_eq!(expect_frame(&mut low_events, high_peer).await, "same connection");
    low.shutdown().await;
    high.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_to_a_node_already_connected_at_that_address_waits() {
    let cluster = Cluster::new("a");
    let (low, mut low_events) = bind(cluster.config("low", 1));
    let (high, mut high_events) = bind(cluster.config("high", 2));
    let (_, low_peer) = connect_pair(&low, &mut low_events, &high, &mut high_events).await;

    // high sees low's connection coming from low's listening address, so it does not dial.
    high.connect(low.local_address()).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(low.counters().duplicates_closed + high.counters().duplicates_closed, 0);
    assert!(low_events.try_recv().is_err() && high_events.try_recv().is_err());

    // When that connection ends, high's dial takes over: low restarts on the same port, and
    // high (which never dialed before) connects to it.
    let address = low.local_address();
    low.shutdown().await;
    until_closed(&mut low_events).await;
    drop(low);
    match next_event(&mut high_events).await {
        PeerEvent::Disconnected { peer_id, .. } => assert_eq!(peer_id, low_peer),
        other => panic!("expected low to go, got {other:?}"),
    }
    let mut restarted_config = cluster.config("low", 1);
    restarted_config.bind_address = address;
    let (restarted, mut restarted_events) = bind_again(restarted_config).await;
    let (new_low_peer, _) = expect_connected(&mut high_events).await;
    expect_connected(&mut restarted_events).await;
    assert_ne!(new_low_peer, low_peer);
    assert_eq!(high.peers()[0].direction, Direction::Dialed);
    assert_eq!(high.peers()[0].peer_id, new_low_peer);
    restarted.shutdown().await;
    high.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_queued_frames_then_ends_the_event_channel() {
    let cluster = Cluster::new("a");
    let (leaving, mut leaving_events) = bind(cluster.config("leaving", 1));
    let (staying, mut staying_events) = bind(cluster.config("staying", 2));
    let (staying_peer, leaving_peer) = connect_pair(&leaving, &mut leaving_events, &staying, &mut staying_events).await;

    for index in 0..100u32 {
        leaving.send(staying_peer, Bytes::from(index.to_be_bytes().to_vec())).unwrap();
    }
    let shutdown = tokio::spawn({
        let leaving = leaving.clone();
        async move { leaving.shutdown().await }
    });
    for index in 0..100u32 {
        assert_eq!(expect_frame(&mut staying_events, leaving_peer).await, index.to_be_bytes().to_vec());
    }
    match next_event(&mut staying_events).await {
        PeerEvent::Disconnected { peer_id, .. } => assert_eq!(peer_id, leaving_peer),
        other => panic!("expected the leaving peer to go, got {other:?}"),
    }
    match next_event(&mut leaving_events).await {
        PeerEvent::Disconnected { peer_id, reason } => {
            assert_eq!(peer_id, staying_peer);
            assert_eq!(reason, DisconnectReason::Shutdown);
        }
        other => panic!("expected our side to report the shutdown, got {other:?}"),
    }
    until_closed(&mut leaving_events).await;
    guard("shutdown", shutdown).await.unwrap();
    assert_eq!(leaving.send(staying_peer, Bytes::from_static(b"late")), Err(SendError::NotConnected));
    assert!(leaving.connect(staying.local_address()).is_err());
    staying.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_refuses_configurations_that_cannot_work() {
    let cluster = Cluster::new("a");
    let base = cluster.config("node", 1);
    let mut broken: Vec<(&str, EndpointConfig)> = Vec::new();
    let mut config = base.clone();
    config.limits.event_queue_events_max = 0;
    broken.push(("an event channel of no capacity", config));
    let mut config = base.clone();
    config.limits.send_queue_frames_max = 0;
    broken.push(("a send queue of no capacity", config));
    let mut config = base.clone();
    config.limits.frame_bytes_max = 100;
    broken.push(("frames smaller than a hello", config));
    let mut config = base.clone();
    config.timing.keep_alive = config.timing.idle_timeout;
    broken.push(("a keep-alive no shorter than the idle timeout", config));
    let mut config = base.clone();
    config.node_name = "line\nbreak".to_owned();
    broken.push(("a control character in the node name", config));
    for (what, config) in broken {
        assert!(matches!(Endpoint::bind(config), Err(BindError::InvalidConfig(_))), "{what}");
    }
    let in_use = bind(base.clone()).0;
    let mut config = base;
    config.bind_address = in_use.local_address();
    assert!(matches!(Endpoint::bind(config), Err(BindError::Socket { .. })), "a port in use");
    in_use.shutdown().await;
}

#[test]
fn bind_needs_a_runtime() {
    let cluster = Cluster::new("a");
    assert!(matches!(Endpoint::bind(cluster.config("node", 1)), Err(BindError::NoRuntime)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_closes_one_connection_and_the_dialer_comes_back() {
    let cluster = Cluster::new("a");
    let (listener, mut listener_events) = bind(cluster.config("listener", 1));
    let mut dialer_config = cluster.config("dialer", 2);
    dialer_config.seeds = vec![listener.local_address()];
    let (dialer, mut dialer_events) = bind(dialer_config);
    let (listener_peer, _) = expect_connected(&mut dialer_events).await;
    let (dialer_peer, _) = expect_connected(&mut listener_events).await;

    assert!(listener.disconnect(dialer_peer, "your frames broke the protocol"));
    assert!(!listener.disconnect(dialer_peer, "twice"), "already going");
    assert_eq!(listener.send(dialer_peer, Bytes::from_static(b"late")), Err(SendError::NotConnected));
    match next_event(&mut listener_events).await {
        PeerEvent::Disconnected { peer_id, reason } => {
            assert_eq!(peer_id, dialer_peer);
            assert_eq!(reason, DisconnectReason::Requested("your frames broke the protocol".to_owned()));
        }
        other => panic!("expected our disconnect, got {other:?}"),
    }
    match next_event(&mut dialer_events).await {
        PeerEvent::Disconnected { peer_id, reason } => {
            assert_eq!(peer_id, listener_peer);
            let expected = DisconnectReason::PeerClosed {
                code: crate::CloseCode::Requested as u64,
                reason: "your frames broke the protocol".to_owned(),
            };
            assert_eq!(reason, expected);
        }
        other => panic!("expected the peer's disconnect, got {other:?}"),
    }
    // The dialer redials after its backoff and gets a new connection.
    let (again, _) = expect_connected(&mut dialer_events).await;
    assert_ne!(again, listener_peer);
    expect_connected(&mut listener_events).await;
    dialer.shutdown().await;
    listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learned_address_that_never_answers_is_given_up_and_dial_targets_are_bounded() {
    crate::tests::support::init();
    let cluster = Cluster::new("test-cluster");
    let mut config = cluster.config("dialer", 1);
    config.timing.handshake_timeout = Duration::from_millis(50);
    config.timing.redial_delay_min = Duration::from_millis(5);
    config.timing.redial_delay_max = Duration::from_millis(10);
    let (endpoint, _events) = bind(config);
    // A socket that never answers: the address stays silent for the whole test.
    let silent = std::net::UdpSocket::bind(localhost(0)).unwrap();
    let silent_address = silent.local_addr().unwrap();
    endpoint.connect_learned(silent_address).unwrap();
    eventually("the learned address to be given up", || endpoint.dialing() == 0).await;
    assert_eq!(endpoint.counters().reconnects, crate::endpoint::LEARNED_FAILURES_MAX - 1);
    // A seed is dialed for as long as the endpoint runs.
    endpoint.connect(silent_address).unwrap();
    tokio::time::sleep(Duration::from_millis(50) * u32::try_from(crate::endpoint::LEARNED_FAILURES_MAX).unwrap() * 2)
        .await;
    assert_eq!(endpoint.dialing(), 1);
    // However many addresses peers mention, the dialer holds at most DIAL_TARGETS_MAX.
    let mut refused = 0;
    for port in 1..=u16::try_from(crate::endpoint::DIAL_TARGETS_MAX).unwrap() + 10 {
        let address = std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2)), port);
        if let Err(crate::endpoint::ConnectError::TooManyTargets) = endpoint.connect_learned(address) {
            refused += 1;
        }
    }
    assert_eq!(refused, 11, "one target was already taken by the seed");
    assert!(endpoint.dialing() <= crate::endpoint::DIAL_TARGETS_MAX);
    endpoint.shutdown().await;
}
