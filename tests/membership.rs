//! Failure detection and membership between real node processes over QUIC on loopback: a node
//! killed with -9 is declared down by the survivors and seen alive again after its restart, and
//! a node that one peer cannot reach directly but another can is not declared down (SWIM's
//! indirect probes) while writes still converge through the middle node. A peer that sends a
//! frame on an unknown channel, or garbage on the membership channel, is disconnected.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;
use support::cluster::{
    certificates, converge, free_udp_port, peer_address, peer_entry, start_peer, start_peer_with, wait_for_peer,
};
use support::relay::Relay;
use support::{Node, record_path, temporary_directory};

fn is_alive(entry: &serde_json::Value) -> bool {
    entry["state"] == "alive" && entry["connected"] == true
}

/// Waits until each node sees every other one alive and connected.
async fn wait_all_alive(nodes: &[(&str, &Node)]) {
    for (observer_name, observer) in nodes {
        for (name, _) in nodes {
            if name != observer_name {
                wait_for_peer(observer, name, "alive and connected", is_alive).await;
            }
        }
    }
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the metrics:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_is_declared_down_then_seen_alive_again_and_catches_up() {
    let root = temporary_directory();
    let certs = root.path().join("certs");
    certificates(&certs, "test-cluster", &["first", "second", "third"]);
    let first = start_peer(root.path(), &certs, "first", &[]).await;
    let second = start_peer(root.path(), &certs, "second", &[peer_address(&first)]).await;
    let mut third = start_peer(root.path(), &certs, "third", &[peer_address(&first), peer_address(&second)]).await;
    wait_all_alive(&[("first", &first), ("second", &second), ("third", &third)]).await;
    for (index, node) in [&first, &second, &third].into_iter().enumerate() {
        node.put("c", &format!("before{index}"), json!({"index": index})).await;
    }
    converge(&[&first, &second, &third]).await;

    third.kill();
    let killed = Instant::now();
    for survivor in [&first, &second] {
        wait_for_peer(survivor, "third", "down", |entry| entry["state"] == "down").await;
    }
    let declared_down = killed.elapsed();
    eprintln!("both survivors declared the killed node down {declared_down:?} after the kill");
    // Down also closes the connection (QUIC's idle timeout alone would take 30 s).
    let entry = peer_entry(&first, "third").await.unwrap();
    assert_eq!(entry["connected"], false, "{entry}");
    let metrics = first.request(Method::GET, "/metrics").send().await.unwrap().text().await.unwrap();
    assert!(metric(&metrics, "concord_members_down_total") >= 1, "{metrics}");
    let (ok, stdout, stderr) = first.cli(&["status"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains(r#""state":"down""#), "concord status shows the down member: {stdout}");
    let (ok, stdout, stderr) = first.cli(&["peers"]);
    assert!(ok, "{stderr}");
    let line = stdout.lines().find(|line| line.starts_with("third")).unwrap();
    assert!(line.contains("down"), "concord peers shows the down member: {stdout}");
    // The survivors still agree on who is alive: each other.
    assert!(is_alive(&peer_entry(&first, "second").await.unwrap()));

    for round in 0..20 {
        first.put("c", &format!("while-down{round}"), json!({"round": round})).await;
    }
    // The restarted node has a new renewal and a new port: it replaces its old identity.
    third.restart().await;
    wait_all_alive(&[("first", &first), ("second", &second), ("third", &third)]).await;
    converge(&[&first, &second, &third]).await;
    for round in 0..20 {
        assert_eq!(
            third.get("c", &format!("while-down{round}")).await.0,
            200,
            "while-down{round} on the restarted node"
        );
    }
    assert_eq!(third.get("c", "before0").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reachable_only_through_another_is_not_declared_down() {
    let root = temporary_directory();
    let certs = root.path().join("certs");
    certificates(&certs, "test-cluster", &["first", "second", "third"]);
    // The first and third nodes advertise a relay in front of themselves, so the two of them
    // dial each other only through relays; both dial the second directly, and it dials no one.
    let first_port = free_udp_port();
    let first_relay = Relay::start(([127, 0, 0, 1], first_port).into()).await;
    let first_listen = format!("127.0.0.1:{first_port}");
    let first_advertised = first_relay.address.to_string();
    let first = start_peer_with(
        root.path(),
        &certs,
        "first",
        &[],
        &["--listen-peer", &first_listen, "--advertise-peer", &first_advertised],
    )
    .await;
    let second = start_peer(root.path(), &certs, "second", std::slice::from_ref(&first_listen)).await;
    let third_port = free_udp_port();
    let third_relay = Relay::start(([127, 0, 0, 1], third_port).into()).await;
    let third_listen = format!("127.0.0.1:{third_port}");
    let third_advertised = third_relay.address.to_string();
    let third = start_peer_with(
        root.path(),
        &certs,
        "third",
        &[peer_address(&second)],
        &["--listen-peer", &third_listen, "--advertise-peer", &third_advertised],
    )
    .await;
    wait_all_alive(&[("first", &first), ("second", &second), ("third", &third)]).await;
    assert_eq!(peer_entry(&first, "third").await.unwrap()["address"], third_advertised.as_str());

    // Cut first <-> third; both still reach the second.
    first_relay.partition(true);
    third_relay.partition(true);
    for round in 0..20 {
        first.put("left", &format!("l{round}"), json!({"round": round})).await;
        third.put("right", &format!("r{round}"), json!({"round": round})).await;
    }
    // Several probe periods and suspicion timeouts (1 s and 3 s): neither side may call the
    // other down, since the second node answers their indirect probes.
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(12) {
        for (observer, name) in [(&first, "third"), (&third, "first"), (&second, "first"), (&second, "third")] {
            let entry = peer_entry(observer, name).await.unwrap();
            assert_ne!(entry["state"], "down", "{} declared {name} down: {entry}", observer.api);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The partition holds: the third node never acknowledges a write to the first directly.
    let path = format!("{}?acks=2&timeout_ms=1000", record_path("left", "acked"));
    let (status, body) = first.call(Method::PUT, &path, Some(json!({"n": 1}))).await;
    assert_eq!(status, 504, "{body}");
    // Writes from both sides converge through the second node.
    converge(&[&first, &second, &third]).await;
    for round in 0..20 {
        assert_eq!(third.get("left", &format!("l{round}")).await.0, 200);
        assert_eq!(first.get("right", &format!("r{round}")).await.0, 200);
    }
    let metrics = first.request(Method::GET, "/metrics").send().await.unwrap().text().await.unwrap();
    assert_eq!(metric(&metrics, "concord_members_down_total"), 0, "{metrics}");
}

/// A raw transport endpoint with a valid certificate, to send frames a node would never send.
fn raw_peer(
    certs: &std::path::Path,
    name: &str,
    node_id: u8,
) -> (transport::Endpoint, tokio::sync::mpsc::Receiver<transport::PeerEvent>) {
    transport::install_crypto_provider();
    let certificates = transport::NodeCertificates::load(certs, name).unwrap();
    let config = transport::EndpointConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        "test-cluster",
        [node_id; 16],
        name,
        certificates,
    );
    transport::Endpoint::bind(config).unwrap()
}

/// Dials `address` and returns the connection once the handshake is done.
async fn connect(
    endpoint: &transport::Endpoint,
    events: &mut tokio::sync::mpsc::Receiver<transport::PeerEvent>,
    address: &str,
) -> transport::PeerId {
    endpoint.connect(address.parse().unwrap()).unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(30), events.recv()).await.unwrap().unwrap() {
            transport::PeerEvent::Connected { peer_id, .. } => return peer_id,
            _ => continue,
        }
    }
}

/// Waits for the node to close the connection, and returns the reason it gave.
async fn disconnected(events: &mut tokio::sync::mpsc::Receiver<transport::PeerEvent>) -> String {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), events.recv()).await.unwrap().unwrap() {
            transport::PeerEvent::Disconnected { reason, .. } => return format!("{reason:?}"),
            _ => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_on_an_unknown_channel_or_with_bad_membership_bytes_disconnect_the_peer() {
    let root = temporary_directory();
    let certs = root.path().join("certs");
    certificates(&certs, "test-cluster", &["first", "rogue"]);
    let first = start_peer(root.path(), &certs, "first", &[]).await;
    let (endpoint, mut events) = raw_peer(&certs, "rogue", 0xEE);

    let peer_id = connect(&endpoint, &mut events, &peer_address(&first)).await;
    endpoint.send(peer_id, transport::Bytes::from_static(&[7, 1, 2, 3])).unwrap();
    let reason = disconnected(&mut events).await;
    assert!(reason.contains("unknown channel"), "{reason}");

    // The transport redials; this time a membership frame of garbage.
    let peer_id = connect(&endpoint, &mut events, &peer_address(&first)).await;
    endpoint.send(peer_id, transport::Bytes::from_static(&[1, 0xFF, 0xFF, 0xFF])).unwrap();
    let reason = disconnected(&mut events).await;
    assert!(reason.contains("bad membership message"), "{reason}");

    let metrics = first.request(Method::GET, "/metrics").send().await.unwrap().text().await.unwrap();
    assert!(metric(&metrics, "concord_peer_protocol_errors_total") >= 2, "{metrics}");
    assert_eq!(first.call(Method::GET, "/health/ready", None).await.0, 200, "the node keeps serving");
    endpoint.shutdown().await;
}
