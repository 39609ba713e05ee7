//! Real node processes replicating over QUIC with mutual TLS on loopback: concurrent writers on
//! three nodes converge to equal digests with every acknowledged write everywhere, a node killed
//! with -9 mid-write catches up after its restart, and a node with a certificate from another CA
//! is refused while the cluster keeps serving. Other bad peers and bad bytes on the peer port are
//! in `tests/refusals.rs`; a long offline period in `tests/edge.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::cluster::{certificates, converge, peer_address, start_peer};
use support::{metric, record_path, temporary_directory};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_with_concurrent_writers_converge_over_quic() {
    let root = temporary_directory();
    let certs = root.path().join("certs");
    certificates(&certs, "test-cluster", &["first", "second", "third"]);
    let first = start_peer(root.path(), &certs, "first", &[]).await;
    let second = start_peer(root.path(), &certs, "second", &[peer_address(&first)]).await;
    let third = start_peer(root.path(), &certs, "third", &[peer_address(&first), peer_address(&second)]).await;

    // Concurrent writers on every node: own records, shared records with conflicting fields,
    // and a shared counter. Every acknowledged write is recorded.
    let mut writers = Vec::new();
    for (index, node) in [&first, &second, &third].into_iter().enumerate() {
        let http = node.http.clone();
        let api = node.api.clone();
        writers.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for round in 0..60 {
                let id = format!("n{index}-{round}");
                let value = json!({"writer": index, "round": round});
                let response = http.put(format!("{api}{}", record_path("own", &id))).json(&value).send().await.unwrap();
                assert_eq!(response.status().as_u16(), 200);
                acknowledged.push((id, value));
                let patch = json!({ format!("field{index}"): round, "contested": index });
                let url = format!("{api}{}", record_path("shared", &format!("s{}", round % 5)));
                assert_eq!(http.patch(url).json(&patch).send().await.unwrap().status().as_u16(), 200);
                let url = format!("{api}{}/increment", record_path("shared", "counter"));
                assert_eq!(http.post(url).json(&json!({"field": "n"})).send().await.unwrap().status().as_u16(), 200);
            }
            acknowledged
        }));
    }
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.unwrap());
    }
    converge(&[&first, &second, &third]).await;

    for node in [&first, &second, &third] {
        for (id, value) in &acknowledged {
            let (status, body) = node.get("own", id).await;
            assert_eq!((status, &body["value"]), (200, value), "{id} on {}", node.api);
        }
        let (_, counter) = node.get("shared", "counter").await;
        assert_eq!(counter["value"]["n"], json!(180), "every increment on every node counts once");
        let (_, shared) = node.get("shared", "s0").await;
        for index in 0..3 {
            assert!(shared["value"][format!("field{index}")].is_number(), "different fields all survive: {shared}");
        }
    }
    let status = first.status().await;
    assert_eq!(status["peers"].as_array().unwrap().len(), 2, "{status}");
    let metrics = first.metrics().await;
    assert_eq!(metric(&metrics, "concord_peers"), 2, "{metrics}");
    assert!(metrics.contains("concord_peer_lag_changes{peer=\"second\",direction=\"we_lack\"} 0"), "{metrics}");
    // Per-peer traffic: first sent its own writes to each peer and received theirs.
    for peer in ["second", "third"] {
        for name in ["concord_peer_changes_sent_total", "concord_peer_changes_received_total"] {
            let value = metrics
                .lines()
                .find_map(|line| line.strip_prefix(&format!("{name}{{peer=\"{peer}\"}} ")))
                .and_then(|value| value.parse::<u64>().ok())
                .unwrap_or(0);
            assert!(value > 0, "{name} for {peer}: {metrics}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_write_catches_up_and_loses_nothing_acknowledged() {
    let root = temporary_directory();
    let certs = root.path().join("certs");
    certificates(&certs, "test-cluster", &["first", "second"]);
    let first = start_peer(root.path(), &certs, "first", &[]).await;
    let mut second = start_peer(root.path(), &certs, "second", &[peer_address(&first)]).await;

    for round in 0..50 {
        first.put("c", &format!("a{round}"), json!({"round": round})).await;
        second.put("c", &format!("b{round}"), json!({"round": round})).await;
    }
    second.kill();
    // Status keeps the lost peer, marked disconnected (noticed when the failure detector declares
    // it down, or QUIC's idle timeout fires).
    let mut noticed = false;
    for _ in 0..1_500 {
        let status = first.status().await;
        noticed = status["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|peer| peer["name"] == "second" && peer["connected"] == false);
        if noticed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(noticed, "the first node shows the second as disconnected: {}", first.status().await["peers"]);
    // The first node keeps writing while the second is down.
    for round in 0..50 {
        first.put("c", &format!("offline{round}"), json!({"round": round})).await;
    }
    // The restarted node has a new origin; its peer address is new too, so it dials the first.
    second.restart().await;
    converge(&[&first, &second]).await;
    for round in 0..50 {
        for id in [format!("a{round}"), format!("b{round}"), format!("offline{round}")] {
            assert_eq!(second.get("c", &id).await.0, 200, "{id} on the restarted node");
            assert_eq!(first.get("c", &id).await.0, 200, "{id} on the first node");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_from_another_ca_are_refused_and_the_cluster_keeps_serving() {
    let root = temporary_directory();
    let certs = root.path().join("certs");
    let foreign = root.path().join("foreign");
    certificates(&certs, "test-cluster", &["first"]);
    certificates(&foreign, "test-cluster", &["intruder"]);
    let first = start_peer(root.path(), &certs, "first", &[]).await;
    first.put("c", "before", json!({"from": "first"})).await;
    let before = first.metrics().await;
    let intruder = start_peer(root.path(), &foreign, "intruder", &[peer_address(&first)]).await;
    intruder.put("c", "x", json!({"from": "intruder"})).await;
    first.put("c", "y", json!({"from": "first"})).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(first.get("c", "x").await.0, 404, "nothing from the intruder was applied");
    let status: Value = first.status().await;
    assert_eq!(status["peers"], json!([]), "the intruder is not a peer");
    let metrics = first.metrics().await;
    assert_eq!(metric(&metrics, "concord_writes_total"), metric(&before, "concord_writes_total") + 1, "{metrics}");
    assert_eq!(metric(&metrics, "concord_peers"), 0, "{metrics}");
    let refused = "concord_transport_refused_untrusted_certificate_total";
    assert!(metric(&metrics, refused) > metric(&before, refused), "the refusal is counted: {metrics}");
    for id in ["before", "y"] {
        let (status, body) = first.get("c", id).await;
        assert_eq!((status, &body["value"]), (200, &json!({"from": "first"})), "{id} is still readable");
    }
}

#[test]
fn the_demo_converges_and_says_so() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_concord")).arg("demo").output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("all three nodes hold the same state"), "{stdout}");
    assert!(stdout.contains("conflict on /status"), "the demo shows the conflict it staged:\n{stdout}");
    assert!(stdout.contains("inventory/widget sold = 42"), "counters add up across the offline period:\n{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_with_acks_waits_for_that_many_peers() {
    let root = temporary_directory();
    let certs = root.path().join("certs");
    certificates(&certs, "test-cluster", &["first", "second", "third"]);
    let first = start_peer(root.path(), &certs, "first", &[]).await;
    let second = start_peer(root.path(), &certs, "second", &[peer_address(&first)]).await;
    let third = start_peer(root.path(), &certs, "third", &[peer_address(&first)]).await;
    // Wait until both peers are connected to the first node.
    for _ in 0..600 {
        if first.status().await["peers"].as_array().is_some_and(|peers| peers.len() == 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    for round in 0..20 {
        let path = format!("{}?acks=2", record_path("acked", &format!("r{round}")));
        let (status, body) = first.call(Method::PUT, &path, Some(json!({"round": round}))).await;
        assert_eq!(status, 200, "{body}");
        // Acknowledged by both peers means durable, and so readable, on both right now.
        assert_eq!(second.get("acked", &format!("r{round}")).await.0, 200);
        assert_eq!(third.get("acked", &format!("r{round}")).await.0, 200);
    }

    let path = format!("{}?acks=3&timeout_ms=300", record_path("acked", "too-many"));
    let (status, body) = first.call(Method::PUT, &path, Some(json!({"n": 1}))).await;
    assert_eq!(status, 504, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(message.contains("2 of the 3 peers"), "{message}");
    // The write itself is durable locally and replicates anyway.
    assert_eq!(first.get("acked", "too-many").await.0, 200);

    // The CLI passes --acks too.
    let (ok, _, stderr) = first.cli(&["put", "acked/from-cli", r#"{"n":2}"#, "--acks", "2"]);
    assert!(ok, "{stderr}");
    assert_eq!(third.get("acked", "from-cli").await.0, 200);
}

/// A peer that gets a change inside a snapshot never names it in a credit message; its summary
/// says it holds it, and that counts. Before, such a write waited out its whole timeout (seen
/// as a rare 504 in `tests/refusals.rs`, when the write raced the peer's first summary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_counts_the_acknowledgement_of_a_peer_that_got_it_in_a_snapshot() {
    let root = temporary_directory();
    let certs = root.path().join("certs");
    certificates(&certs, "test-cluster", &["first", "second"]);
    let first = start_peer(root.path(), &certs, "first", &[]).await;
    let path = format!("{}?acks=1&timeout_ms=60000", record_path("early", "waiting"));
    // The write is made with no peer connected, so the new peer, holding none of the first
    // node's changes, is bootstrapped from a snapshot that holds it.
    let write = first.call(Method::PUT, &path, Some(json!({"n": 1})));
    let join = async {
        while first.get("early", "waiting").await.0 != 200 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        start_peer(root.path(), &certs, "second", &[peer_address(&first)]).await
    };
    let ((status, body), second) = tokio::join!(write, join);
    assert_eq!(status, 200, "{body}");
    assert_eq!(second.get("early", "waiting").await.0, 200);
    let records = metric(&second.metrics().await, "concord_snapshot_records_received_total");
    assert_eq!(records, 1, "the change came in a snapshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_learn_each_other_from_a_chain_of_seeds() {
    let root = temporary_directory();
    let certs = root.path().join("certs");
    certificates(&certs, "test-cluster", &["first", "second", "third"]);
    let first = start_peer(root.path(), &certs, "first", &[]).await;
    let second = start_peer(root.path(), &certs, "second", &[peer_address(&first)]).await;
    // The third node is told only about the second.
    let third = start_peer(root.path(), &certs, "third", &[peer_address(&second)]).await;
    let mut meshed = false;
    for _ in 0..600 {
        let counts = [
            first.status().await["peers"].as_array().map_or(0, Vec::len),
            third.status().await["peers"].as_array().map_or(0, Vec::len),
        ];
        if counts == [2, 2] {
            meshed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(meshed, "first: {}, third: {}", first.status().await["peers"], third.status().await["peers"]);
    // First and third now talk directly: a write on one reaches the other with two acks.
    let (status, body) =
        first.call(Method::PUT, &format!("{}?acks=2", record_path("c", "direct")), Some(json!({"n": 1}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(third.get("c", "direct").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_heals_and_writes_from_both_sides_converge() {
    let root = temporary_directory();
    let certs = root.path().join("certs");
    certificates(&certs, "test-cluster", &["first", "second"]);
    let first = start_peer(root.path(), &certs, "first", &[]).await;
    // The second node reaches the first only through the fault-injecting relay.
    let relay = support::relay::Relay::start(peer_address(&first).parse().unwrap()).await;
    let second = start_peer(root.path(), &certs, "second", &[relay.address.to_string()]).await;
    first.put("orders", "o-1", json!({"status": "new", "qty": 1})).await;
    converge(&[&first, &second]).await;

    relay.partition(true);
    for round in 0..20 {
        first.put("left", &format!("l{round}"), json!({"round": round})).await;
        second.put("right", &format!("r{round}"), json!({"round": round})).await;
    }
    first.call(Method::PATCH, &record_path("orders", "o-1"), Some(json!({"status": "paid"}))).await;
    second.call(Method::PATCH, &record_path("orders", "o-1"), Some(json!({"qty": 2}))).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(second.get("left", "l0").await.0, 404, "the partition holds");

    relay.partition(false);
    converge(&[&first, &second]).await;
    for round in 0..20 {
        assert_eq!(second.get("left", &format!("l{round}")).await.0, 200);
        assert_eq!(first.get("right", &format!("r{round}")).await.0, 200);
    }
    let (_, order) = first.get("orders", "o-1").await;
    assert_eq!(
        order["value"],
        json!({"status": "paid", "qty": 2}),
        "edits to different fields on both sides both survive"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_joins_a_running_cluster_and_bootstraps_from_snapshots() {
    let root = temporary_directory();
    let certs = root.path().join("certs");
    certificates(&certs, "test-cluster", &["first", "second", "third"]);
    let first = start_peer(root.path(), &certs, "first", &[]).await;
    let second = start_peer(root.path(), &certs, "second", &[peer_address(&first)]).await;
    // History: 30 records, each patched 10 times, on both nodes: 300 changes.
    for round in 0..10 {
        for index in 0..30 {
            let node = if index % 2 == 0 { &first } else { &second };
            let (status, _) = node
                .call(Method::PATCH, &record_path("orders", &format!("o{index}")), Some(json!({ "round": round })))
                .await;
            assert_eq!(status, 200);
        }
    }
    converge(&[&first, &second]).await;

    // The new node knows one seed, meets the other through it, and is bootstrapped from
    // documents: it receives 30 records, not the 300 changes of their history.
    let third = start_peer(root.path(), &certs, "third", &[peer_address(&first)]).await;
    converge(&[&first, &second, &third]).await;
    for index in 0..30 {
        let (status, body) = third.get("orders", &format!("o{index}")).await;
        assert_eq!((status, &body["value"]["round"]), (200, &json!(9)));
    }
    let metrics = third.metrics().await;
    let records = metric(&metrics, "concord_snapshot_records_received_total");
    assert!((30..=60).contains(&records), "one snapshot, or at most one from each peer: {records}\n{metrics}");
    let status = third.status().await;
    let changes_received: u64 = status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|peer| peer["traffic"]["changes_received"].as_u64().unwrap())
        .sum();
    assert!(changes_received < 300, "history was not replayed: {changes_received} changes\n{status}");

    // It is a full member: its writes reach the others, and theirs reach it.
    let (status, _) = third.call(Method::PATCH, &record_path("orders", "o1"), Some(json!({ "from": "third" }))).await;
    assert_eq!(status, 200);
    let (status, _) = first.call(Method::PATCH, &record_path("orders", "o2"), Some(json!({ "from": "first" }))).await;
    assert_eq!(status, 200);
    converge(&[&first, &second, &third]).await;
    assert_eq!(second.get("orders", "o1").await.1["value"]["from"], json!("third"));
    assert_eq!(third.get("orders", "o2").await.1["value"]["from"], json!("first"));
}
