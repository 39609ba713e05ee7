//! Replicating nodes for tests: a cluster CA and node certificates made by `concord cert`, node
//! processes that listen for peers, and a wait until nodes hold the same state.

use std::path::Path;
use std::time::{Duration, Instant};

use super::Node;

/// How long [`converge`] waits before failing the test as hung.
pub const CONVERGENCE_GUARD: Duration = Duration::from_secs(60);

/// Runs the `concord` CLI and fails the test if it fails.
pub fn concord(arguments: &[&str]) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_concord")).args(arguments).output().unwrap();
    assert!(output.status.success(), "concord {arguments:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// A CA for `cluster` in `directory` and certificates for `names`.
pub fn certificates(directory: &Path, cluster: &str, names: &[&str]) {
    let directory = directory.to_str().unwrap();
    concord(&["cert", "ca", "--dir", directory, "--cluster", cluster]);
    for name in names {
        concord(&["cert", "node", "--dir", directory, "--name", name, "--ip", "127.0.0.1"]);
    }
}

/// A node named `name` in `root/name`, listening for peers on 127.0.0.1 and dialing `seeds`.
pub async fn start_peer(root: &Path, certs: &Path, name: &str, seeds: &[String]) -> Node {
    start_peer_listening(root, certs, name, "127.0.0.1:0", seeds).await
}

/// Like [`start_peer`], listening for peers on `listen_peer`. A node bound to `0.0.0.0` tells
/// its peers no listen address, so they know it only by the address its packets come from.
pub async fn start_peer_listening(root: &Path, certs: &Path, name: &str, listen_peer: &str, seeds: &[String]) -> Node {
    let mut arguments = vec![
        "--name".to_owned(),
        name.to_owned(),
        "--listen-peer".to_owned(),
        listen_peer.to_owned(),
        "--certs".to_owned(),
        certs.to_str().unwrap().to_owned(),
    ];
    for seed in seeds {
        arguments.push("--peer".to_owned());
        arguments.push(seed.clone());
    }
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    Node::start_with(&root.join(name), &arguments).await
}

/// The node's bound peer (QUIC) address, as it wrote it to `peer.addr`.
pub fn peer_address(node: &Node) -> String {
    std::fs::read_to_string(node.data_dir.join("peer.addr")).unwrap()
}

/// Waits until every node reports the same digest and version vector; returns how long it took.
/// Fails after [`CONVERGENCE_GUARD`].
pub async fn converge(nodes: &[&Node]) -> Duration {
    converge_within(nodes, CONVERGENCE_GUARD).await
}

/// [`converge`] with another hang guard.
pub async fn converge_within(nodes: &[&Node], guard: Duration) -> Duration {
    let started = Instant::now();
    while started.elapsed() < guard {
        let mut statuses = Vec::new();
        for node in nodes {
            statuses.push(node.status().await);
        }
        let same = statuses.windows(2).all(|pair| {
            pair[0]["digest"] == pair[1]["digest"] && pair[0]["version_vector"] == pair[1]["version_vector"]
        });
        if same {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut report = String::new();
    for node in nodes {
        let status = node.status().await;
        report.push_str(&format!("\n{} {} peers {}", status["name"], status["digest"], status["peers"]));
    }
    panic!("nodes did not converge within the {guard:?} hang guard:{report}");
}

/// Polls `condition` on `node`'s status every 20 ms until it holds; fails after `guard`.
pub async fn until_status(node: &Node, what: &str, guard: Duration, condition: impl Fn(&serde_json::Value) -> bool) {
    let started = Instant::now();
    loop {
        let status = node.status().await;
        if condition(&status) {
            return;
        }
        assert!(started.elapsed() < guard, "{what}: not within {guard:?}; status {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `node` reports the peer named `peer` as connected (or, with `connected` false, as
/// disconnected); fails after `guard`.
pub async fn until_peer(node: &Node, peer: &str, connected: bool, guard: Duration) {
    until_status(node, &format!("{peer} connected: {connected}"), guard, |status| {
        status["peers"].as_array().is_some_and(|peers| {
            peers.iter().any(|candidate| candidate["name"] == peer && candidate["connected"] == connected)
        })
    })
    .await;
}
