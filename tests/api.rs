//! The HTTP API against a real node process: record operations, listing, texts, status, metrics,
//! and every error class (400, 401, 403, 404, 409, 413, 422).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use reqwest::Method;
use serde_json::{Value, json};
use support::{Node, record_path, temporary_directory};

#[tokio::test]
async fn record_operations_round_trip() {
    let directory = temporary_directory();
    let node = Node::start(directory.path()).await;

    let body = node
        .put("customers", "c1", json!({"name": "Ada", "tags": ["a", "b"], "address": {"city": "Zürich"}, "score": 1.5}))
        .await;
    assert_eq!(body["value"], json!({"name": "Ada", "tags": ["a", "b"], "address": {"city": "Zürich"}, "score": 1.5}));
    assert_eq!(body["conflicts"], json!([]));
    let version = body["version"].as_str().unwrap().to_owned();
    assert!(!version.is_empty());

    let (status, read) = node.get("customers", "c1").await;
    assert_eq!(status, 200);
    assert_eq!(
        read,
        json!({"collection": "customers", "id": "c1", "value": body["value"], "version": version, "conflicts": []})
    );

    // Replacing with the same value changes nothing, so the version stays.
    let again = node.put("customers", "c1", body["value"].clone()).await;
    assert_eq!(again["version"], Value::String(version.clone()));

    // Merge patch: only named fields change, null deletes, nested objects merge.
    let (status, patched) = node
        .call(
            Method::PATCH,
            &record_path("customers", "c1"),
            Some(json!({"score": null, "address": {"zip": "8000"}, "vip": true})),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(
        patched["value"],
        json!({"name": "Ada", "tags": ["a", "b"], "address": {"city": "Zürich", "zip": "8000"}, "vip": true})
    );

    // Replace removes fields that are not given.
    let replaced = node.put("customers", "c1", json!({"name": "Ada Lovelace"})).await;
    assert_eq!(replaced["value"], json!({"name": "Ada Lovelace"}));

    // Increment creates a counter and adds to it.
    let path = format!("{}/increment", record_path("customers", "c1"));
    let (status, _) = node.call(Method::POST, &path, Some(json!({"field": "visits", "by": 5}))).await;
    assert_eq!(status, 200);
    let (_, incremented) = node.call(Method::POST, &path, Some(json!({"field": "visits"}))).await;
    assert_eq!(incremented["value"]["visits"], json!(6));

    // Delete, then the record is gone; deleting again is 404; a later write revives it empty.
    let (status, _) = node.call(Method::DELETE, &record_path("customers", "c1"), None).await;
    assert_eq!(status, 200);
    assert_eq!(node.get("customers", "c1").await.0, 404);
    assert_eq!(node.call(Method::DELETE, &record_path("customers", "c1"), None).await.0, 404);
    let revived = node.put("customers", "c1", json!({"name": "Grace"})).await;
    assert_eq!(revived["value"], json!({"name": "Grace"}));

    // Ids with spaces and unicode travel percent-encoded.
    let (status, body) =
        node.call(Method::PUT, "/v1/collections/customers/records/ACME%20Z%C3%BCrich", Some(json!({"n": 1}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], json!("ACME Zürich"));
}

#[tokio::test]
async fn listing_paginates_by_prefix_and_skips_deleted_records() {
    let directory = temporary_directory();
    let node = Node::start(directory.path()).await;
    for index in 0..25 {
        node.put("orders", &format!("o-{index:03}"), json!({"n": index})).await;
    }
    node.put("orders", "x-1", json!({"n": -1})).await;
    node.put("other", "o-000", json!({"n": 0})).await;
    node.call(Method::DELETE, &record_path("orders", "o-003"), None).await;

    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut path = "/v1/collections/orders/records?prefix=o-&limit=10".to_owned();
        if let Some(after) = &after {
            path.push_str(&format!("&after={after}"));
        }
        let (status, page) = node.call(Method::GET, &path, None).await;
        assert_eq!(status, 200, "{page}");
        for record in page["records"].as_array().unwrap() {
            seen.push(record["id"].as_str().unwrap().to_owned());
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..25).filter(|&index| index != 3).map(|index| format!("o-{index:03}")).collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn errors_are_clear_and_typed() {
    let directory = temporary_directory();
    let node = Node::start(directory.path()).await;

    // 400: malformed JSON names the problem; a non-object body; an invalid key; a bad increment.
    let response = node
        .request(Method::PUT, &record_path("c", "1"))
        .body("{\"a\": ")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let message = response.json::<Value>().await.unwrap()["error"].as_str().unwrap().to_owned();
    assert!(message.contains("malformed JSON") && message.contains("line 1"), "{message}");
    let (status, body) = node.call(Method::PUT, &record_path("c", "1"), Some(json!([1, 2]))).await;
    assert_eq!((status, body["error"].as_str().unwrap()), (400, "body must be a JSON object, not an array"));
    let (status, body) = node.call(Method::PUT, &record_path("bad%20collection", "1"), Some(json!({}))).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) =
        node.call(Method::POST, &format!("{}/increment", record_path("c", "1")), Some(json!({"by": 1}))).await;
    assert_eq!(status, 400);
    let mut deep = json!(1);
    for _ in 0..100 {
        deep = json!({ "d": deep });
    }
    let (status, body) = node.call(Method::PUT, &record_path("c", "deep"), Some(deep)).await;
    assert_eq!(status, 400, "{body}");

    // 404: a record that was never written.
    let (status, body) = node.get("c", "missing").await;
    assert_eq!(status, 404);
    assert!(body["error"].as_str().unwrap().contains("c/missing"));

    // 413: a body over the limit (1 MiB by default).
    // The server answers before reading the whole body and closes that connection, so send it
    // on a client of its own rather than poison the shared connection pool.
    let big = json!({ "blob": "x".repeat(2 << 20) });
    let response = reqwest::Client::new().put(node.url(&record_path("c", "big"))).json(&big).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 413);

    // 422: incrementing a string field.
    node.put("c", "s", json!({"name": "text"})).await;
    let (status, body) =
        node.call(Method::POST, &format!("{}/increment", record_path("c", "s")), Some(json!({"field": "name"}))).await;
    assert_eq!(status, 422, "{body}");

    // 409: a text document read as a record.
    let (status, _) = node.call(Method::PUT, "/v1/collections/docs/texts/t1", None).await;
    assert_eq!(status, 201);
    assert_eq!(node.get("docs", "t1").await.0, 409);

    // The node is still healthy after all of that, and counted the errors.
    assert_eq!(node.call(Method::GET, "/health/ready", None).await.0, 200);
    let metrics = node.request(Method::GET, "/metrics").send().await.unwrap().text().await.unwrap();
    let client_errors =
        metrics.lines().find_map(|line| line.strip_prefix("concord_http_client_errors_total ")).unwrap();
    assert!(client_errors.parse::<u64>().unwrap() >= 8, "{metrics}");
    // Every group commit that wrote something flushed once, and the flush is timed on its own.
    let value = |name: &str| -> f64 {
        metrics.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok()).unwrap()
    };
    assert!(value("concord_store_flush_seconds_count") >= 1.0, "{metrics}");
    assert!(value("concord_store_flush_seconds_count") <= value("concord_commit_latency_seconds_count"));
    assert!(value("concord_store_flush_seconds_sum") <= value("concord_commit_latency_seconds_sum"));
}

#[tokio::test]
async fn tokens_gate_every_request_by_role() {
    let directory = temporary_directory();
    let tokens = directory.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        "[[tokens]]\nname = \"reader\"\nsecret = \"reader-secret-0123456789\"\nrole = \"read\"\n\
         [[tokens]]\nname = \"writer\"\nsecret = \"writer-secret-0123456789\"\nrole = \"write\"\n",
    )
    .unwrap();
    let data = directory.path().join("data");
    let mut node = Node::start_with(&data, &["--tokens-file", tokens.to_str().unwrap()]).await;

    let (status, body) = node.call(Method::GET, "/v1/status", None).await;
    assert_eq!(status, 401, "{body}");
    node.token = Some("wrong-secret-0123456789".into());
    assert_eq!(node.call(Method::GET, "/v1/status", None).await.0, 401);
    node.token = Some("reader-secret-0123456789".into());
    assert_eq!(node.call(Method::GET, "/v1/status", None).await.0, 200);
    let (status, body) = node.call(Method::PUT, &record_path("c", "1"), Some(json!({"a": 1}))).await;
    assert_eq!(status, 403, "{body}");
    node.token = Some("writer-secret-0123456789".into());
    assert_eq!(node.call(Method::PUT, &record_path("c", "1"), Some(json!({"a": 1}))).await.0, 200);
    assert_eq!(node.get("c", "1").await.0, 200);
}

#[tokio::test]
async fn refuses_to_start_on_a_public_address_without_tokens() {
    let directory = temporary_directory();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["start", "--listen-api", "0.0.0.0:0", "--data-dir"])
        .arg(directory.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("non-loopback"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one clear line: {stderr}");
}

#[tokio::test]
async fn texts_apply_yjs_updates_and_serve_diffs() {
    use crdt::text::TextDocument;
    let directory = temporary_directory();
    let node = Node::start(directory.path()).await;

    let mut author = TextDocument::new(42);
    let update = author.insert_text("content", 0, "hello world").unwrap();
    let response = node
        .request(Method::POST, "/v1/collections/docs/texts/readme/update")
        .body(update.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["changed"], json!(true));
    // The same update again changes nothing.
    let response =
        node.request(Method::POST, "/v1/collections/docs/texts/readme/update").body(update).send().await.unwrap();
    assert_eq!(response.json::<Value>().await.unwrap()["changed"], json!(false));

    let (status, text) = node.call(Method::GET, "/v1/collections/docs/texts/readme?name=content", None).await;
    assert_eq!((status, text["text"].clone()), (200, json!("hello world")));

    // A fresh Yjs peer catches up from the node's full state.
    let full = node
        .request(Method::GET, "/v1/collections/docs/texts/readme/update")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let mut reader = TextDocument::new(7);
    reader.apply_update(&full, &Default::default()).unwrap();
    assert_eq!(reader.text("content"), "hello world");

    // Garbage is refused with 400, and the document is untouched.
    let response = node
        .request(Method::POST, "/v1/collections/docs/texts/readme/update")
        .body(vec![0xff; 64])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let (_, text) = node.call(Method::GET, "/v1/collections/docs/texts/readme?name=content", None).await;
    assert_eq!(text["text"], json!("hello world"));
}

#[tokio::test]
async fn status_reports_identity_counts_and_an_order_independent_digest() {
    let first_directory = temporary_directory();
    let second_directory = temporary_directory();
    let first = Node::start(first_directory.path()).await;
    let second = Node::start(second_directory.path()).await;
    let empty = first.status().await;
    assert_eq!(empty["record_count"], json!(0));
    assert_eq!(empty["digest"], second.status().await["digest"]);

    first.put("c", "1", json!({"a": 1})).await;
    first.put("c", "2", json!({"b": 2})).await;
    let status = first.status().await;
    assert_eq!(status["record_count"], json!(2));
    assert_eq!(status["feed_sequence"], json!(2));
    assert_ne!(status["digest"], empty["digest"]);
    assert_eq!(status["version_vector"][status["origin"].as_str().unwrap()]["contiguous"], json!(2));
    for field in ["node_id", "name", "origin"] {
        assert!(status[field].as_str().is_some_and(|value| !value.is_empty()), "{field} in {status}");
    }
}

/// `POST /v1/batch`: many writes in one request, each succeeding or failing on its own, all
/// accepted ones durable (they survive a kill -9 right after the answer); a malformed batch or
/// one over the limit is refused whole.
#[tokio::test]
async fn a_batch_applies_writes_independently_and_durably() {
    let directory = temporary_directory();
    let mut node = Node::start(directory.path()).await;
    let mut writes: Vec<Value> = (0..200)
        .map(|index| json!({"op": "put", "collection": "orders", "id": format!("o{index}"), "value": {"n": index}}))
        .collect();
    writes.push(json!({"op": "patch", "collection": "orders", "id": "o1", "value": {"paid": true}}));
    writes.push(json!({"op": "increment", "collection": "orders", "id": "o2", "field": "n", "by": 40}));
    writes.push(json!({"op": "delete", "collection": "orders", "id": "o3"}));
    writes.push(json!({"op": "delete", "collection": "orders", "id": "never"}));
    writes.push(json!({"op": "increment", "collection": "orders", "id": "o1", "field": "paid"}));
    let (status, body) = node.call(Method::POST, "/v1/batch", Some(Value::Array(writes))).await;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 205);
    assert!(results[..203].iter().all(|result| result["status"] == 200 && result["version"].is_string()));
    assert_eq!((results[203]["status"].as_u64(), results[203]["id"].as_str()), (Some(404), Some("never")));
    assert_eq!(results[204]["status"], 422);
    assert!(results[204]["error"].as_str().unwrap().contains("not a number"), "{}", results[204]);
    // A batch answers only versions (it does not read the records back): the versions reads give.
    for (index, id) in [(200, "o1"), (199, "o199"), (201, "o2")] {
        assert_eq!(results[index]["version"], node.get("orders", id).await.1["version"], "the version of {id}");
    }

    node.kill();
    node.start_again().await;
    assert_eq!(node.get("orders", "o1").await.1["value"], json!({"n": 1, "paid": true}));
    assert_eq!(node.get("orders", "o2").await.1["value"], json!({"n": 42}));
    assert_eq!(node.get("orders", "o3").await.0, 404);
    assert_eq!(node.get("orders", "o199").await.1["value"], json!({"n": 199}));
    assert_eq!(node.status().await["record_count"], 199);

    let (status, body) = node.call(Method::POST, "/v1/batch", Some(json!({"op": "put"}))).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("JSON array"), "{body}");
    let bad = json!([{"op": "put", "collection": "orders", "id": "ok", "value": {}}, {"op": "put", "collection": "orders", "id": "x"}]);
    let (status, body) = node.call(Method::POST, "/v1/batch", Some(bad)).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().starts_with("write 1 of the batch"), "{body}");
    assert_eq!(node.get("orders", "ok").await.0, 404, "a malformed batch writes nothing");
    let too_many: Vec<Value> =
        (0..1001).map(|index| json!({"op": "delete", "collection": "orders", "id": format!("o{index}")})).collect();
    let (status, body) = node.call(Method::POST, "/v1/batch", Some(Value::Array(too_many))).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("limit is 1000"), "{body}");
}

/// A collection declared on the yrs engine (`--yrs-collection`) serves the same record API,
/// without counters (422) and without conflicts.
#[tokio::test]
async fn a_yrs_collection_serves_the_record_api_without_counters() {
    let directory = temporary_directory();
    let node = Node::start_with(directory.path(), &["--yrs-collection", "events"]).await;
    let body = node.put("events", "e1", json!({"kind": "click", "at": {"x": 1, "y": 2}, "n": 7})).await;
    assert_eq!(body["value"], json!({"kind": "click", "at": {"x": 1, "y": 2}, "n": 7}));
    assert_eq!(body["conflicts"], json!([]));
    let (status, patched) =
        node.call(Method::PATCH, &record_path("events", "e1"), Some(json!({"n": null, "at": {"y": 3}}))).await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["value"], json!({"kind": "click", "at": {"x": 1, "y": 3}}));
    let path = format!("{}/increment", record_path("events", "e1"));
    let (status, refused) = node.call(Method::POST, &path, Some(json!({"field": "n"}))).await;
    assert_eq!(status, 422);
    assert!(refused["error"].as_str().unwrap().contains("no counters"), "{refused}");
    // A batch answers versions on this engine too: the versions reads give.
    let writes = json!([
        {"op": "put", "collection": "events", "id": "e2", "value": {"kind": "view"}},
        {"op": "patch", "collection": "events", "id": "e1", "value": {"seen": true}},
        {"op": "patch", "collection": "events", "id": "e2", "value": {"n": 2}},
    ]);
    let (status, batch) = node.call(Method::POST, "/v1/batch", Some(writes)).await;
    assert_eq!(status, 200, "{batch}");
    let results = batch["results"].as_array().unwrap();
    assert_eq!(results[1]["version"], node.get("events", "e1").await.1["version"], "the version of e1");
    assert_eq!(results[2]["version"], node.get("events", "e2").await.1["version"], "the version of e2");
    assert_ne!(results[0]["version"], results[2]["version"], "each write answers the version it made");
    assert_eq!(node.call(Method::DELETE, &record_path("events", "e1"), None).await.0, 200);
    assert_eq!(node.get("events", "e1").await.0, 404);
    // Other collections stay on automerge, counters included.
    let path = format!("{}/increment", record_path("customers", "c1"));
    assert_eq!(node.call(Method::POST, &path, Some(json!({"field": "n"}))).await.0, 200);
}

/// A definition through `PUT /v1/collections/{c}/definition` (TOML or JSON); a write that
/// breaks its schema gets 422 with the field and the rule; a bad definition is refused whole.
#[tokio::test]
async fn definitions_are_stored_and_schema_violations_named() {
    let directory = temporary_directory();
    let node = Node::start(directory.path()).await;
    let response = node
        .request(Method::PUT, "/v1/collections/orders/definition")
        .body("[fields.price]\npolicy = \"max\"\ntype = \"number\"\nminimum = 0\n")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (status, shown) = node.call(Method::GET, "/v1/collections/orders/definition", None).await;
    assert_eq!(status, 200);
    assert_eq!(shown["definition"]["fields"]["price"]["minimum"], json!(0), "{shown}");
    let (status, body) = node.call(Method::PUT, &record_path("orders", "o1"), Some(json!({"price": -3}))).await;
    assert_eq!(status, 422);
    assert_eq!((body["field"].as_str(), body["rule"].as_str()), (Some("price"), Some("minimum")), "{body}");
    assert!(body["error"].as_str().unwrap().contains("price"));
    let response = node
        .request(Method::PUT, "/v1/collections/orders/definition")
        .body(r#"{"fields": {"price": {"policy": "biggest"}}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(node.call(Method::GET, "/v1/collections/none/definition", None).await.0, 404);
    assert_eq!(node.call(Method::PUT, &record_path("orders", "o1"), Some(json!({"price": 3}))).await.0, 200);
}
