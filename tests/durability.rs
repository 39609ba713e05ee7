//! Durability and identity against real node processes: acknowledged writes survive kill -9,
//! graceful shutdown on SIGTERM, and no (origin, sequence) or automerge (actor, sequence) pair is
//! reused after a restart or a restore from an old copy of the data directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::sync::Arc;

use reqwest::Method;
use serde_json::json;
use support::{Node, read_ndjson, record_path, temporary_directory};

#[tokio::test]
async fn every_acknowledged_write_survives_kill_9() {
    let directory = temporary_directory();
    let mut node = Node::start(directory.path()).await;
    let node_arc = Arc::new(std::mem::replace(&mut node.http, reqwest::Client::new()));
    let api = node.api.clone();

    // A burst of concurrent writers: puts, patches and increments. Record what was acknowledged.
    let mut writers = Vec::new();
    for writer in 0..16 {
        let http = node_arc.clone();
        let api = api.clone();
        writers.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for index in 0..150 {
                let id = format!("w{writer}-{index}");
                let url = format!("{api}{}", record_path("burst", &id));
                let value = json!({"writer": writer, "index": index});
                let response = http.put(&url).json(&value).send().await.unwrap();
                assert_eq!(response.status().as_u16(), 200);
                let increment = format!("{api}{}/increment", record_path("counters", &format!("w{writer}")));
                let response = http.post(&increment).json(&json!({"field": "n", "by": 2})).send().await.unwrap();
                assert_eq!(response.status().as_u16(), 200);
                acknowledged.push((id, value));
            }
            acknowledged
        }));
    }
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.unwrap());
    }
    // No graceful anything: SIGKILL right after the last acknowledgement.
    node.kill();
    node.restart().await;

    for (id, value) in &acknowledged {
        let (status, body) = node.get("burst", id).await;
        assert_eq!(status, 200, "acknowledged write {id} lost after kill -9");
        assert_eq!(&body["value"], value);
    }
    for writer in 0..16 {
        let (_, body) = node.get("counters", &format!("w{writer}")).await;
        assert_eq!(body["value"]["n"], json!(300), "every acknowledged increment of w{writer} survives");
    }
    assert_eq!(node.status().await["record_count"], json!(acknowledged.len() + 16));
}

#[tokio::test]
async fn sigterm_shuts_down_cleanly_and_keeps_everything() {
    let directory = temporary_directory();
    let mut node = Node::start(directory.path()).await;
    for index in 0..50 {
        node.put("c", &index.to_string(), json!({"i": index})).await;
    }
    let digest = node.status().await["digest"].clone();
    let status = node.terminate();
    assert!(status.success(), "SIGTERM exit: {status}");
    node.restart().await;
    let after = node.status().await;
    assert_eq!(after["digest"], digest);
    assert_eq!(after["record_count"], json!(50));
}

/// Every (origin, sequence, id) the node ever published, from its change feed.
async fn published(node: &Node) -> Vec<(String, u64, String)> {
    let count = node.status().await["feed_sequence"].as_u64().unwrap() as usize;
    let mut response =
        node.request(Method::GET, "/v1/changes?since=0").header("accept", "application/x-ndjson").send().await.unwrap();
    read_ndjson(&mut response, count)
        .await
        .into_iter()
        .map(|event| {
            let origin = event["origin"].as_str().unwrap().to_owned();
            (origin, event["origin_sequence"].as_u64().unwrap(), event["id"].as_str().unwrap().to_owned())
        })
        .collect()
}

#[tokio::test]
async fn restore_from_an_old_copy_never_reuses_an_origin_sequence_pair() {
    let directory = temporary_directory();
    let data = directory.path().join("data");
    let backup = directory.path().join("backup");
    let mut node = Node::start(&data).await;
    node.put("c", "before-backup", json!({"v": 1})).await;
    let first_origin = node.status().await["origin"].as_str().unwrap().to_owned();
    let node_id = node.status().await["node_id"].clone();
    node.terminate();
    copy_directory(&data, &backup);

    // Life goes on after the backup: more writes, published as (origin, 2), (origin, 3) ...
    node.restart().await;
    node.put("c", "after-backup", json!({"v": 2})).await;
    node.put("c", "before-backup", json!({"v": 3})).await;
    let lost_future = published(&node).await;
    node.kill();

    // Restore the old copy and write again.
    std::fs::remove_dir_all(&data).unwrap();
    copy_directory(&backup, &data);
    node.restart().await;
    let status = node.status().await;
    assert_eq!(status["node_id"], node_id, "the node keeps its identity");
    let restored_origin = status["origin"].as_str().unwrap().to_owned();
    assert_ne!(restored_origin, first_origin);
    node.put("c", "after-restore", json!({"v": 4})).await;
    node.put("c", "before-backup", json!({"v": 5})).await;
    let now = published(&node).await;

    // No (origin, sequence) names two different changes across the two timelines.
    let mut names = std::collections::HashMap::new();
    for (origin, sequence, id) in lost_future.iter().chain(now.iter()) {
        if let Some(previous) = names.insert((origin.clone(), *sequence), id.clone()) {
            assert_eq!(&previous, id, "({origin}, {sequence}) was reused for a different change");
        }
    }
    // The restored process writes as an origin that neither the backup nor the lost timeline used;
    // its automerge actor is the same fresh id, so (actor, sequence) cannot repeat either.
    let origins_now: HashSet<&String> = now.iter().map(|(origin, _, _)| origin).collect();
    let origins_lost: HashSet<&String> = lost_future.iter().map(|(origin, _, _)| origin).collect();
    assert_eq!(origins_now, HashSet::from([&first_origin, &restored_origin]));
    assert_eq!(origins_now.intersection(&origins_lost).collect::<Vec<_>>(), vec![&&first_origin]);
    let (_, record) = node.get("c", "before-backup").await;
    assert_eq!(record["value"], json!({"v": 5}));
}

fn copy_directory(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_directory(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test]
async fn a_damaged_document_on_disk_is_a_clear_error_and_the_node_keeps_serving() {
    let directory = temporary_directory();
    let mut node = Node::start(directory.path()).await;
    node.put("c", "good", json!({"v": 1})).await;
    node.put("c", "damaged", json!({"v": 2})).await;
    node.terminate();

    // Overwrite one document's stored bytes with garbage, as a bad disk might.
    let store = store::Store::open(directory.path()).unwrap();
    let mut batch = store::WriteBatch::default();
    batch.put_document(b"c\0damaged", b"\xc1 not a document");
    store.commit(batch).unwrap();
    drop(store);

    node.restart().await;
    let (status, body) = node.get("c", "damaged").await;
    assert_eq!(status, 500, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(message.contains("c/damaged") && message.contains("damaged"), "{message}");
    let (status, body) = node.get("c", "good").await;
    assert_eq!((status, body["value"].clone()), (200, json!({"v": 1})));
    node.put("c", "new", json!({"v": 3})).await;
    assert_eq!(node.call(Method::GET, "/health/ready", None).await.0, 200);
}
