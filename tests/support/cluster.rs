//! Cluster helpers for tests that run several replicating nodes: certificates, starting a node
//! with a peer endpoint, reading its peer address, and waiting on what status reports.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::Node;

/// How long [`converge`] waits before failing the test as hung.
pub const CONVERGENCE_GUARD: Duration = Duration::from_secs(60);

/// Runs the `concord` binary and asserts it succeeded.
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

/// A node named `name` with its data under `root`, its peer endpoint on an ephemeral loopback
/// port, dialing `seeds`.
pub async fn start_peer(root: &Path, certs: &Path, name: &str, seeds: &[String]) -> Node {
    start_peer_with(root, certs, name, seeds, &["--listen-peer", "127.0.0.1:0"]).await
}

/// Like [`start_peer`], with `extra` arguments instead of the default `--listen-peer`.
pub async fn start_peer_with(root: &Path, certs: &Path, name: &str, seeds: &[String], extra: &[&str]) -> Node {
    let mut arguments =
        vec!["--name".to_owned(), name.to_owned(), "--certs".to_owned(), certs.to_str().unwrap().to_owned()];
    for seed in seeds {
        arguments.push("--peer".to_owned());
        arguments.push(seed.clone());
    }
    arguments.extend(extra.iter().map(|argument| argument.to_string()));
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    Node::start_with(&root.join(name), &arguments).await
}

/// Like [`start_peer`], listening for peers on `listen_peer`. A node bound to `0.0.0.0` tells
/// its peers no listen address, so they know it only by the address its packets come from.
pub async fn start_peer_listening(root: &Path, certs: &Path, name: &str, listen_peer: &str, seeds: &[String]) -> Node {
    start_peer_with(root, certs, name, seeds, &["--listen-peer", listen_peer]).await
}

/// The peer address the node bound, from its data directory.
pub fn peer_address(node: &Node) -> String {
    std::fs::read_to_string(node.data_dir.join("peer.addr")).unwrap()
}

/// A UDP port on loopback that was free a moment ago, for a node that must know its port
/// before it starts.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until every node reports the same digest and version vector; returns how long it took.
/// Fails after [`CONVERGENCE_GUARD`].
pub async fn converge(nodes: &[&Node]) -> Duration {
    converge_within(nodes, CONVERGENCE_GUARD).await
}

/// [`converge`] with another hang guard.
pub async fn converge_within(nodes: &[&Node], guard: Duration) -> Duration {
    match try_converge_within(nodes, guard).await {
        Ok(elapsed) => elapsed,
        Err(report) => panic!("nodes did not converge within the {guard:?} hang guard:{report}"),
    }
}

/// Waits until every node reports the same digest and version vector, for at most `guard`;
/// returns how long it took, or each node's digest and peers if they did not converge.
pub async fn try_converge_within(nodes: &[&Node], guard: Duration) -> Result<Duration, String> {
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
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut report = String::new();
    for node in nodes {
        let status = node.status().await;
        report.push_str(&format!("\n{} {} peers {}", status["name"], status["digest"], status["peers"]));
    }
    Err(report)
}

/// The status entry `node` reports for its peer `name`, if any.
pub async fn peer_entry(node: &Node, name: &str) -> Option<Value> {
    node.status().await["peers"].as_array()?.iter().find(|peer| peer["name"] == name).cloned()
}

/// Polls `node`'s status until its entry for peer `name` satisfies `condition`; returns how long
/// that took. The 60 s deadline only guards against a hang.
pub async fn wait_for_peer(node: &Node, name: &str, what: &str, condition: impl Fn(&Value) -> bool) -> Duration {
    let found = |status: &Value| {
        status["peers"].as_array().is_some_and(|peers| peers.iter().any(|peer| peer["name"] == name && condition(peer)))
    };
    until_status(node, &format!("peer {name} {what}"), Duration::from_secs(60), found).await
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

/// Polls `condition` on `node`'s status every 20 ms until it holds, and returns how long that
/// took; fails after `guard`.
pub async fn until_status(node: &Node, what: &str, guard: Duration, condition: impl Fn(&Value) -> bool) -> Duration {
    let started = Instant::now();
    loop {
        let status = node.status().await;
        if condition(&status) {
            return started.elapsed();
        }
        assert!(started.elapsed() < guard, "{what}: not within {guard:?}; status {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
