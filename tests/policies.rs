//! Declared conflict policies over real QUIC: two node processes, partitioned by a UDP relay,
//! write the same record concurrently; after the heal both read the values the policies say,
//! and both ledgers recorded the conflicts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::cluster::{certificates, converge, peer_address, start_peer, start_peer_listening, until_peer};
use support::relay::Relay;
use support::{record_path, temporary_directory};

const RECONNECT_GUARD: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_across_a_partition_resolve_by_the_declared_policies() {
    let root = temporary_directory();
    let certs = root.path().join("certs");
    certificates(&certs, "test-cluster", &["hq", "store-1"]);
    let hq = start_peer(root.path(), &certs, "hq", &[]).await;
    let link = Relay::start(peer_address(&hq).parse().unwrap()).await;
    // The store listens on an address no one can dial, so every packet crosses the relay.
    let store = start_peer_listening(root.path(), &certs, "store-1", "0.0.0.0:0", &[link.address.to_string()]).await;
    let definition = "[fields.status]\npolicy = \"ordered\"\norder = [\"draft\", \"approved\", \"shipped\"]\n\
                      [fields.price]\npolicy = \"max\"\n[fields.owner]\npolicy = \"priority\"\npriority = [\"hq\", \"store-1\"]\n\
                      [fields.tags]\npolicy = \"union\"\n\
                      [fields.floor]\npolicy = \"min\"\n[fields.note]\npolicy = \"latest\"\n[fields.visits]\npolicy = \"counter\"\n\
                      [fields.label]\npolicy = \"lww\"\n";
    let response = hq.request(Method::PUT, "/v1/collections/orders/definition").body(definition).send().await.unwrap();
    assert_eq!(response.status(), 200);
    hq.put("orders", "o1", json!({"status": "draft", "price": 10, "owner": "nobody", "tags": ["a"], "floor": 9, "note": "n", "label": "l"}))
        .await;
    converge(&[&hq, &store]).await;

    link.partition(true);
    until_peer(&store, "hq", false, RECONNECT_GUARD).await;
    let patch = |body: Value| (Method::PATCH, record_path("orders", "o1"), Some(body));
    let increment = format!("{}/increment", record_path("orders", "o1"));
    let (method, path, body) = patch(
        json!({"status": "approved", "price": 50, "owner": "from-hq", "tags": ["b"], "floor": 3, "note": "hq", "label": "hq"}),
    );
    assert_eq!(hq.call(method, &path, body).await.0, 200);
    assert_eq!(hq.call(Method::POST, &increment, Some(json!({"field": "visits", "by": 2}))).await.0, 200);
    // The store writes later (by the wall clock), so `latest` picks it.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (method, path, body) = patch(
        json!({"status": "shipped", "price": 20, "owner": "from-store", "tags": ["c"], "floor": 7, "note": "store", "label": "store"}),
    );
    assert_eq!(store.call(method, &path, body).await.0, 200);
    assert_eq!(store.call(Method::POST, &increment, Some(json!({"field": "visits", "by": 5}))).await.0, 200);
    link.partition(false);
    until_peer(&store, "hq", true, RECONNECT_GUARD).await;
    converge(&[&hq, &store]).await;

    let expected = json!({"status": "shipped", "price": 50, "owner": "from-hq", "tags": ["b", "c"], "floor": 3,
                          "note": "store", "visits": 7});
    let mut labels = Vec::new();
    for node in [&hq, &store] {
        let (status, read) = node.get("orders", "o1").await;
        assert_eq!(status, 200);
        let mut value = read["value"].clone();
        labels.push(value.as_object_mut().unwrap().remove("label").unwrap());
        assert_eq!(value, expected, "{read}");
        assert_eq!(read["conflicts"].as_array().unwrap().len(), 7, "{read}");
        let (_, ledger) = node.call(Method::GET, "/v1/conflicts?collection=orders", None).await;
        let fields: std::collections::BTreeSet<&str> =
            ledger["conflicts"].as_array().unwrap().iter().filter_map(|entry| entry["field"].as_str()).collect();
        assert_eq!(
            fields.into_iter().collect::<Vec<_>>(),
            ["/floor", "/label", "/note", "/owner", "/price", "/status", "/tags"],
            "{ledger}"
        );
    }
    // lww: automerge's deterministic winner, the same on both.
    assert_eq!(labels[0], labels[1]);
    assert!(labels[0] == json!("hq") || labels[0] == json!("store"));
}
