//! Bad bytes on a running node's peer port, at node level: garbage UDP datagrams, a member with a
//! valid cluster certificate that sends bytes that are not replication messages or a frame over
//! the size limit, and a peer with the wrong cluster id. After each, the node still serves reads
//! and writes, an earlier acknowledged write is still there, a good peer still replicates, the bad
//! peer is not connected, and the counters in `/metrics` that name the problem went up.
//!
//! The misbehaving members are built with the transport crate's public API (`Endpoint::bind`,
//! `send`) and a certificate from `concord cert node`; a peer with a certificate from another CA
//! is covered by `tests/cluster.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use support::cluster::{certificates, peer_address, start_peer, until_peer, until_status};
use support::{Node, metric, noise, record_path, temporary_directory};
use tempfile::TempDir;
use transport::{Bytes, CloseCode, DisconnectReason, Endpoint, EndpointConfig, NodeCertificates, PeerEvent, PeerId};

/// How long any single wait may take before the test fails as hung.
const HANG_GUARD: Duration = Duration::from_secs(30);
const CLUSTER: &str = "test-cluster";

/// A node under attack ("first"), with a good peer ("second") connected to it, a write
/// acknowledged before anything bad happened, and a certificate for a misbehaving member.
struct Target {
    /// Holds the nodes' data and certificates; removed when dropped.
    _root: TempDir,
    certs: PathBuf,
    first: Node,
    second: Node,
}

impl Target {
    async fn start() -> Target {
        let root = temporary_directory();
        let certs = root.path().join("certs");
        certificates(&certs, CLUSTER, &["first", "second", "member"]);
        let first = start_peer(root.path(), &certs, "first", &[]).await;
        let second = start_peer(root.path(), &certs, "second", &[peer_address(&first)]).await;
        // Connected first, and the acknowledgement may take up to the hang guard: on a loaded
        // machine (the whole suite in parallel on two cores) the default 5 s ran out once.
        until_peer(&first, "second", true, Duration::from_secs(60)).await;
        let path = format!("{}?acks=1&timeout_ms={}", record_path("c", "acknowledged"), HANG_GUARD.as_millis());
        let (status, body) = first.call(Method::PUT, &path, Some(acknowledged())).await;
        assert_eq!(status, 200, "the good peer acknowledges a write before the test: {body}");
        Target { _root: root, certs, first, second }
    }

    fn peer_address(&self) -> SocketAddr {
        peer_address(&self.first).parse().unwrap()
    }

    /// Everything that must hold after a bad peer: `first` serves reads and writes, the write
    /// acknowledged at the start reads back, the good peer is still its only connected peer and
    /// acknowledges a new write, and the bad peer (when it got as far as being named) is not
    /// connected.
    async fn assert_still_serving(&self, case: &str, bad_peer: Option<&str>) {
        until_status(&self.first, &format!("{case}: only the good peer is connected"), HANG_GUARD, |status| {
            connected_names(status) == ["second"]
        })
        .await;
        if let Some(name) = bad_peer {
            let status = self.first.status().await;
            let peers = status["peers"].as_array().unwrap();
            assert!(
                peers.iter().all(|peer| peer["name"] != name || peer["connected"] == false),
                "{case}: {name} is not connected: {status}"
            );
        }
        assert_eq!(self.first.call(Method::GET, "/health/ready", None).await.0, 200, "{case}");
        let (status, body) = self.first.get("c", "acknowledged").await;
        assert_eq!((status, &body["value"]), (200, &acknowledged()), "{case}: the earlier write is still readable");
        let id = format!("after {case}").replace(' ', "-");
        let value = json!({"after": case});
        let (status, body) =
            self.first.call(Method::PUT, &format!("{}?acks=1", record_path("c", &id)), Some(value.clone())).await;
        assert_eq!(status, 200, "{case}: a write after it is acknowledged by the good peer: {body}");
        let (status, body) = self.first.get("c", &id).await;
        assert_eq!((status, &body["value"]), (200, &value), "{case}: and reads back");
        let (status, body) = self.second.get("c", &id).await;
        assert_eq!((status, &body["value"]), (200, &value), "{case}: and reached the good peer");
    }
}

fn acknowledged() -> serde_json::Value {
    json!({"written": "before anything bad happened"})
}

fn connected_names(status: &serde_json::Value) -> Vec<String> {
    let peers = status["peers"].as_array().unwrap();
    peers
        .iter()
        .filter(|peer| peer["connected"] == true)
        .map(|peer| peer["name"].as_str().unwrap().to_owned())
        .collect()
}

/// An endpoint for `name` (certificate in `certs`) announcing `cluster`, dialing `target` once:
/// redials are put off for a minute, longer than any test here runs.
fn member_endpoint(
    certs: &Path,
    name: &str,
    cluster: &str,
    target: SocketAddr,
    configure: impl FnOnce(&mut EndpointConfig),
) -> (Endpoint, tokio::sync::mpsc::Receiver<PeerEvent>) {
    transport::install_crypto_provider();
    let certificates = NodeCertificates::load(certs, name).unwrap();
    let mut config = EndpointConfig::new("127.0.0.1:0".parse().unwrap(), cluster, [0x5a; 16], name, certificates);
    config.seeds = vec![target];
    config.timing.redial_delay_min = Duration::from_secs(60);
    config.timing.redial_delay_max = Duration::from_secs(60);
    configure(&mut config);
    Endpoint::bind(config).unwrap()
}

/// The next event about the node named `first`, skipping everything else (the good peer learns
/// the member's address by peer exchange and dials it too).
async fn next_event_from_first(
    events: &mut tokio::sync::mpsc::Receiver<PeerEvent>,
    first: &mut Option<PeerId>,
) -> PeerEvent {
    let wait = async {
        loop {
            let event = events.recv().await.expect("the member's event channel is open");
            match &event {
                PeerEvent::Connected { peer_id, node_name, .. } if node_name == "first" => {
                    *first = Some(*peer_id);
                    return event;
                }
                PeerEvent::Frame { peer_id, .. } | PeerEvent::Disconnected { peer_id, .. }
                    if Some(*peer_id) == *first =>
                {
                    return event;
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(HANG_GUARD, wait).await.expect("hung waiting for an event from the node")
}

/// Connects a member with a valid certificate, sends `payload` as one frame, and returns how the
/// node closed the connection.
async fn send_as_member(target: &Target, payload: Bytes, configure: impl FnOnce(&mut EndpointConfig)) -> (u64, String) {
    let (member, mut events) = member_endpoint(&target.certs, "member", CLUSTER, target.peer_address(), configure);
    let mut first = None;
    let PeerEvent::Connected { peer_id, .. } = next_event_from_first(&mut events, &mut first).await else {
        panic!("the member's first event from the node is not Connected");
    };
    member.send(peer_id, payload).unwrap();
    let closed = loop {
        match next_event_from_first(&mut events, &mut first).await {
            PeerEvent::Frame { .. } => continue,
            PeerEvent::Disconnected { reason: DisconnectReason::PeerClosed { code, reason }, .. } => {
                break (code, reason);
            }
            other => panic!("expected the node to close the member's connection, got {other:?}"),
        }
    };
    member.shutdown().await;
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_on_the_peer_port_are_dropped_and_the_node_keeps_serving() {
    let target = Target::start().await;
    let before = target.first.metrics().await;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let address = target.peer_address();
    let mut sent = 0u64;
    for round in 0..600u64 {
        let connection_id = noise(round, 8);
        // A QUIC v1 Initial: the node derives keys from the connection id and fails to decrypt.
        let mut initial = vec![0xc0 | (round as u8 & 0x0f), 0, 0, 0, 1, 8];
        initial.extend_from_slice(&connection_id);
        initial.push(8);
        initial.extend_from_slice(&noise(round + 1, 8));
        initial.extend_from_slice(&[0x00, 0x44, 0x9a]);
        initial.extend_from_slice(&noise(round + 2, 1_200 - initial.len()));
        // A long header with a version nobody speaks (the node may answer version negotiation).
        let mut unknown_version = vec![0xc0, 0x0a, 0x1a, 0x2a, 0x3a, 8];
        unknown_version.extend_from_slice(&connection_id);
        unknown_version.push(0);
        unknown_version.extend_from_slice(&noise(round + 3, 1_200 - unknown_version.len()));
        // A short header for a connection that does not exist.
        let mut short = vec![0x40 | (round as u8 & 0x3f)];
        short.extend_from_slice(&noise(round + 4, 60 + (round as usize % 1_000)));
        let datagrams = [initial, unknown_version, short, noise(round + 5, round as usize % 1_400), Vec::new()];
        for datagram in datagrams {
            socket.send_to(&datagram, address).unwrap();
            sent += 1;
        }
    }
    target.assert_still_serving("garbage datagrams", None).await;

    // No counter counts undecodable datagrams; what the counters show is that the garbage never
    // became a connection, a refusal or a frame.
    let after = target.first.metrics().await;
    for name in [
        "concord_transport_connections_accepted_total",
        "concord_transport_bad_frames_total",
        "concord_transport_refused_bad_handshake_total",
        "concord_transport_refused_other_tls_total",
        "concord_peer_protocol_errors_total",
    ] {
        assert_eq!(metric(&after, name), metric(&before, name), "{name} after {sent} garbage datagrams");
    }
    assert_eq!(metric(&after, "concord_peers"), 1, "the good peer stayed connected throughout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_sends_bytes_that_are_not_replication_messages_is_disconnected() {
    let target = Target::start().await;
    let wrong_shape = rmp_serde::to_vec(&json!({"Summary": "not a version vector"})).unwrap();
    let cases: [(&str, Vec<u8>); 3] = [
        ("bytes that are not MessagePack", b"\xc1 definitely not a replication message".to_vec()),
        ("MessagePack of the wrong shape", wrong_shape),
        ("incompressible noise", noise(7, 64 * 1024)),
    ];
    for (case, payload) in cases {
        let before = target.first.metrics().await;
        // On the replication channel, so it reaches the message decoder.
        let frame = [&[concord::mesh::CHANNEL_REPLICATION][..], &payload].concat();
        let (code, reason) = send_as_member(&target, Bytes::from(frame), |_| {}).await;
        assert_eq!(code, CloseCode::Requested as u64, "{case}: closed by the node ({reason})");
        assert!(reason.contains("undecodable message"), "{case}: the close says why: {reason}");
        target.assert_still_serving(case, Some("member")).await;
        let after = target.first.metrics().await;
        for name in ["concord_peer_protocol_errors_total", "concord_transport_connections_accepted_total"] {
            assert!(metric(&after, name) > metric(&before, name), "{case}: {name} went up:\n{after}");
        }
        let name = "concord_transport_bad_frames_total";
        assert_eq!(metric(&after, name), metric(&before, name), "{case}: the frame itself was well formed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_sends_a_frame_over_the_limit_is_disconnected() {
    let target = Target::start().await;
    let before = target.first.metrics().await;
    // The node accepts frames up to the default limit. The sender's own limit is configurable, so
    // a member whose limit is twice that can build one byte too many; noise stays incompressible,
    // so the frame goes on the wire at full length.
    let limit = transport::Limits::default().frame_bytes_max;
    let payload = Bytes::from(noise(11, limit + 1));
    let (code, reason) = send_as_member(&target, payload, |config| config.limits.frame_bytes_max = 2 * limit).await;
    assert_eq!(code, CloseCode::BadFrame as u64, "closed by the node as a bad frame ({reason})");
    target.assert_still_serving("an oversized frame", Some("member")).await;
    let after = target.first.metrics().await;
    for name in ["concord_transport_bad_frames_total", "concord_transport_connections_accepted_total"] {
        assert!(metric(&after, name) > metric(&before, name), "{name} went up:\n{after}");
    }
    let name = "concord_peer_protocol_errors_total";
    assert_eq!(metric(&after, name), metric(&before, name), "the transport refused the frame before the engine saw it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_the_wrong_cluster_id_is_refused() {
    let target = Target::start().await;
    let before = target.first.metrics().await;
    // A certificate the cluster CA signed, and a hello that names another cluster.
    let (stranger, mut events) =
        member_endpoint(&target.certs, "member", "another-cluster", target.peer_address(), |_| {});
    let name = "concord_transport_refused_cluster_mismatch_total";
    let started = std::time::Instant::now();
    loop {
        let refused_by_the_node = metric(&target.first.metrics().await, name) > metric(&before, name);
        let refusal_heard = stranger.counters().refused(transport::RefusalReason::ClusterMismatch) > 0;
        if refused_by_the_node && refusal_heard {
            break;
        }
        assert!(
            started.elapsed() < HANG_GUARD,
            "no cluster-mismatch refusal: node {refused_by_the_node}, stranger {refusal_heard}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    target.assert_still_serving("a peer of another cluster", Some("member")).await;
    let after = target.first.metrics().await;
    for name in ["concord_transport_connections_accepted_total", "concord_peer_protocol_errors_total"] {
        assert_eq!(metric(&after, name), metric(&before, name), "{name}: the stranger never got in");
    }
    stranger.shutdown().await;
    while let Ok(event) = events.try_recv() {
        assert!(!matches!(event, PeerEvent::Connected { .. }), "the stranger never connected: {event:?}");
    }
}
