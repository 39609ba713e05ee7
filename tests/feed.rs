//! The change feed against a real node: SSE with event ids equal to feed sequences and
//! `Last-Event-ID` resume, NDJSON with `Accept: application/x-ndjson`, and live delivery.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::{Node, read_ndjson, record_path, temporary_directory};

/// Reads `count` SSE events (id and parsed data) from a streaming response.
async fn read_sse(response: &mut reqwest::Response, count: usize) -> Vec<(u64, Value)> {
    let mut events = Vec::new();
    let mut pending = String::new();
    while events.len() < count {
        let chunk = response.chunk().await.unwrap().expect("stream ended early");
        pending.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = pending.find("\n\n") {
            let block: String = pending.drain(..end + 2).collect();
            let mut id = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("id:") {
                    id = Some(value.trim().parse::<u64>().unwrap());
                } else if let Some(value) = line.strip_prefix("data:") {
                    data = Some(serde_json::from_str::<Value>(value.trim()).unwrap());
                }
            }
            if let (Some(id), Some(data)) = (id, data) {
                events.push((id, data));
            }
        }
    }
    events
}

#[tokio::test]
async fn sse_resumes_exactly_where_the_consumer_stopped() {
    let directory = temporary_directory();
    let node = Node::start(directory.path()).await;
    for index in 0..5 {
        node.put("c", &format!("r{index}"), json!({"i": index})).await;
    }
    node.call(Method::DELETE, &record_path("c", "r1"), None).await;

    let mut response = node.request(Method::GET, "/v1/changes").send().await.unwrap();
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let first = read_sse(&mut response, 3).await;
    assert_eq!(first.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(first[0].1["sequence"], json!(1));
    assert_eq!(first[0].1["collection"], json!("c"));
    drop(response);

    // Resume with Last-Event-ID: the next event is 4, nothing skipped or repeated.
    let mut response = node.request(Method::GET, "/v1/changes").header("last-event-id", "3").send().await.unwrap();
    let rest = read_sse(&mut response, 3).await;
    assert_eq!(rest.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![4, 5, 6]);
    assert_eq!(rest[2].1["deleted"], json!(true));
    assert_eq!(rest[2].1["id"], json!("r1"));

    // Live: a new write arrives on the open stream.
    node.put("c", "live", json!({"fresh": true})).await;
    let live = tokio::time::timeout(Duration::from_secs(30), read_sse(&mut response, 1)).await.expect("live event");
    assert_eq!(live[0].0, 7);
    assert_eq!(live[0].1["value"], json!({"fresh": true}));
}

#[tokio::test]
async fn ndjson_feed_with_since() {
    let directory = temporary_directory();
    let node = Node::start(directory.path()).await;
    for index in 0..4 {
        node.put("c", &format!("r{index}"), json!({"i": index})).await;
    }
    let mut response =
        node.request(Method::GET, "/v1/changes?since=2").header("accept", "application/x-ndjson").send().await.unwrap();
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let events = read_ndjson(&mut response, 2).await;
    assert_eq!(events[0]["sequence"], json!(3));
    assert_eq!(events[1]["sequence"], json!(4));
    assert_eq!(events[1]["value"], json!({"i": 3}));

    // A Last-Event-ID that is not a sequence is refused clearly.
    let response = node.request(Method::GET, "/v1/changes").header("last-event-id", "abc").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 400);
}

/// With `--feed-retention-seconds`, the node trims old events on its own (here after 2 s); a consumer asking for
/// events retention took gets 410 with the floor (never a stream that silently skips them), and
/// one that resumes at the floor or later is served.
#[tokio::test]
async fn a_since_behind_retention_gets_410_with_the_floor() {
    let directory = temporary_directory();
    let node = Node::start_with(directory.path(), &["--feed-retention-seconds", "2"]).await;
    for index in 0..3 {
        node.put("c", &format!("r{index}"), json!({"i": index})).await;
    }
    // The node's tick trims once the events are two seconds old (hang guard: a minute).
    let mut floor = 0;
    for _ in 0..600 {
        floor = node.status().await["feed_floor"].as_u64().unwrap();
        if floor == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(floor, 3, "the node trimmed its feed");
    assert!(node.metrics().await.contains("concord_feed_entries_trimmed_total 3"));
    for (accept, since) in [("text/event-stream", 0), ("application/x-ndjson", 2)] {
        let response = node
            .request(Method::GET, &format!("/v1/changes?since={since}"))
            .header("accept", accept)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 410);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["floor"], json!(3));
        assert!(body["error"].as_str().unwrap().contains("trimmed it through 3"), "{body}");
    }
    // From the floor on, the feed goes on as before.
    let mut response =
        node.request(Method::GET, "/v1/changes?since=3").header("accept", "application/x-ndjson").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    node.put("c", "r3", json!({"i": 3})).await;
    let events =
        tokio::time::timeout(Duration::from_secs(30), read_ndjson(&mut response, 1)).await.expect("live event");
    assert_eq!(events[0]["sequence"], json!(4));
}

/// Damage on disk does not stop the feed: an entry that does not decode is served as a
/// `damaged` event, an event whose record does not load says so instead of claiming a delete,
/// and the events after both are served, on a first page and to a live stream alike.
#[tokio::test]
async fn damaged_feed_entries_and_records_are_served_as_damage_and_the_feed_goes_on() {
    let directory = temporary_directory();
    let mut node = Node::start(directory.path()).await;
    for index in 1..=4 {
        node.put("c", &format!("r{index}"), json!({"i": index})).await;
    }
    node.terminate();

    // Feed entry 2 (r2) becomes bytes that do not decode, and r3's document garbage.
    let store = store::Store::open(directory.path()).unwrap();
    let mut batch = store::WriteBatch::default();
    batch.put_feed(2, b"\xc1 not a feed entry");
    batch.put_document(b"c\0r3", b"\xc1 not a document");
    store.commit(batch).unwrap();
    drop(store);

    node.restart().await;
    let mut response =
        node.request(Method::GET, "/v1/changes?since=0").header("accept", "application/x-ndjson").send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let events = read_ndjson(&mut response, 4).await;
    let sequences: Vec<u64> = events.iter().map(|event| event["sequence"].as_u64().unwrap()).collect();
    assert_eq!(sequences, [1, 2, 3, 4]);
    assert_eq!((events[0]["value"].clone(), events[0].get("damage")), (json!({"i": 1}), None));

    assert_eq!(events[1]["kind"], json!("damaged"));
    assert_eq!(events[1]["damage"]["first"], json!(2));
    assert!(events[1]["damage"]["reason"].as_str().unwrap().contains("feed 2"), "{}", events[1]);

    assert_eq!((events[2]["kind"].clone(), events[2]["id"].clone()), (json!("record"), json!("r3")));
    assert_eq!((events[2]["deleted"].clone(), events[2]["value"].clone()), (json!(false), Value::Null));
    assert!(events[2]["damage"]["reason"].as_str().unwrap().contains("c/r3"), "{}", events[2]);

    assert_eq!(events[3]["value"], json!({"i": 4}));
    // The stream goes on live past the damage.
    node.put("c", "r5", json!({"i": 5})).await;
    let live = tokio::time::timeout(Duration::from_secs(30), read_ndjson(&mut response, 1)).await.expect("live event");
    assert_eq!((live[0]["sequence"].clone(), live[0]["value"].clone()), (json!(5), json!({"i": 5})));
    assert_eq!(support::metric(&node.metrics().await, "concord_feed_events_damaged_total"), 2);
}
