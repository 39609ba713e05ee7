//! The audit trail against real node processes: entries for local writes name the API token
//! (and the fields touched), entries for replicated changes and snapshots name the peer; the
//! log verifies clean; tampering with the store (an altered, a removed, a garbled entry) is
//! found at the right sequence after a restart; an edited export fails offline verification
//! naming the entry or line; retention trims old entries behind an anchor and what remains still
//! verifies, across a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use crdt::audit::AuditEntry;
use reqwest::Method;
use serde_json::{Value, json};
use support::cluster::{certificates, converge, peer_address, start_peer};
use support::{Node, metric, record_path, temporary_directory};

/// Runs the CLI against `node` with `token`; returns the exit code, stdout and stderr.
fn cli(node: &Node, token: Option<&str>, arguments: &[&str]) -> (i32, String, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_concord"));
    command.args(arguments).env("CONCORD_API", &node.api).env_remove("CONCORD_TOKEN");
    if let Some(token) = token {
        command.env("CONCORD_TOKEN", token);
    }
    let output = command.output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Every entry the node keeps, through `GET /v1/audit`, page by page.
async fn entries(node: &Node) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let (status, page) = node.call(Method::GET, &format!("/v1/audit?after={after}&limit=1000"), None).await;
        assert_eq!(status, 200, "{page}");
        let entries = page["entries"].as_array().unwrap().clone();
        let Some(last) = entries.last() else { return all };
        after = last["sequence"].as_u64().unwrap();
        all.extend(entries);
    }
}

async fn verify(node: &Node) -> Value {
    let (status, body) = node.call(Method::GET, "/v1/audit/verify", None).await;
    assert_eq!(status, 200, "{body}");
    body
}

fn key_of(entry: &Value) -> String {
    format!("{}/{}", entry["collection"].as_str().unwrap(), entry["id"].as_str().unwrap())
}

#[tokio::test]
async fn local_writes_name_their_token_and_the_fields_touched() {
    let directory = temporary_directory();
    let tokens = directory.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        "[[tokens]]\nname = \"reader\"\nsecret = \"reader-secret-0123456789\"\nrole = \"read\"\n\
         [[tokens]]\nname = \"orders-app\"\nsecret = \"writer-secret-0123456789\"\nrole = \"write\"\n\
         [[tokens]]\nname = \"auditor\"\nsecret = \"admin-secret-01234567890\"\nrole = \"admin\"\n",
    )
    .unwrap();
    let arguments = ["--tokens-file", tokens.to_str().unwrap(), "--name", "hq"];
    let mut node = Node::start_with(&directory.path().join("data"), &arguments).await;
    node.token = Some("writer-secret-0123456789".into());

    node.put("orders", "o1", json!({"status": "new", "qty": 1, "note": "x"})).await;
    let (status, _) = node.call(Method::PATCH, &record_path("orders", "o1"), Some(json!({"status": "paid"}))).await;
    assert_eq!(status, 200);
    // A replace lists what it added, changed or removed, not what stayed the same.
    node.put("orders", "o1", json!({"status": "paid", "qty": 2, "price": 9})).await;
    let path = format!("{}/increment", record_path("orders", "o1"));
    assert_eq!(node.call(Method::POST, &path, Some(json!({"field": "visits"}))).await.0, 200);
    // Writing the same value again changes nothing and makes no entry.
    node.put("orders", "o1", json!({"status": "paid", "qty": 2, "price": 9, "visits": 1})).await;
    assert_eq!(node.call(Method::DELETE, &record_path("orders", "o1"), None).await.0, 200);
    let batch = json!([{"op": "put", "collection": "orders", "id": "o2", "value": {"a": 1}}]);
    assert_eq!(node.call(Method::POST, "/v1/batch", Some(batch)).await.0, 200);
    assert_eq!(node.call(Method::PUT, "/v1/collections/docs/texts/t1", None).await.0, 201);

    let all = entries(&node).await;
    let summary: Vec<(u64, String, Value)> =
        all.iter().map(|entry| (entry["sequence"].as_u64().unwrap(), key_of(entry), entry["fields"].clone())).collect();
    assert_eq!(
        summary,
        vec![
            (1, "orders/o1".to_owned(), json!(["note", "qty", "status"])),
            (2, "orders/o1".to_owned(), json!(["status"])),
            (3, "orders/o1".to_owned(), json!(["note", "price", "qty"])),
            (4, "orders/o1".to_owned(), json!(["visits"])),
            (5, "orders/o1".to_owned(), json!(["*"])),
            (6, "orders/o2".to_owned(), json!(["a"])),
            (7, "docs/t1".to_owned(), json!(["*"])),
        ]
    );
    for entry in &all {
        assert_eq!(
            (entry["origin"].as_str(), entry["principal"].as_str()),
            (Some("hq"), Some("orders-app")),
            "{entry}"
        );
    }
    assert_eq!(node.status().await["audit"]["sequence"], json!(7));
    assert_eq!(metric(&node.metrics().await, "concord_audit_entries_total"), 7);

    // Reading the log needs `read`; exporting and verifying it need `admin`.
    node.token = Some("reader-secret-0123456789".into());
    assert_eq!(node.call(Method::GET, "/v1/audit?limit=2", None).await.0, 200);
    assert_eq!(node.call(Method::GET, "/v1/audit/verify", None).await.0, 403);
    assert_eq!(node.call(Method::GET, "/v1/audit/export", None).await.0, 403);
    let (code, _, stderr) = cli(&node, Some("reader-secret-0123456789"), &["audit", "verify"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("403"), "{stderr}");

    node.token = Some("admin-secret-01234567890".into());
    let clean = verify(&node).await;
    assert_eq!((clean["ok"].clone(), clean["entries"].clone()), (json!(true), json!(7)), "{clean}");
    assert_eq!(clean["head"]["hash"], all[6]["hash"]);
    let (code, stdout, stderr) = cli(&node, node.token.as_deref(), &["audit", "verify"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("intact: 7 entries"), "{stdout}");
    let (code, stdout, stderr) = cli(&node, node.token.as_deref(), &["audit", "tail", "-n", "2", "--output", "json"]);
    assert_eq!(code, 0, "{stderr}");
    let tail: Vec<Value> = stdout.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(tail, all[5..].to_vec());
    let (code, stdout, _) = cli(&node, node.token.as_deref(), &["audit", "tail"]);
    assert_eq!(code, 0);
    assert_eq!(stdout.lines().count(), 7, "{stdout}");
    assert!(
        stdout.lines().next().unwrap().contains("orders/o1  origin hq  by orders-app  note,qty,status"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_changes_and_snapshots_name_the_peer() {
    let root = temporary_directory();
    let certs = root.path().join("certs");
    certificates(&certs, "audit-cluster", &["first", "second"]);
    let first = start_peer(root.path(), &certs, "first", &[]).await;
    // Before the second node exists: it receives this as a snapshot record.
    first.put("orders", "early", json!({"n": 1})).await;
    let second = start_peer(root.path(), &certs, "second", &[peer_address(&first)]).await;
    converge(&[&first, &second]).await;
    // Now as a change.
    first.put("orders", "later", json!({"n": 2})).await;
    converge(&[&first, &second]).await;

    let made = entries(&first).await;
    assert_eq!(made.len(), 2);
    for entry in &made {
        assert_eq!((entry["origin"].as_str(), entry["principal"].as_str()), (Some("first"), Some("local")), "{entry}");
        assert_eq!(entry["fields"], json!(["n"]));
    }
    let received = entries(&second).await;
    let keys: Vec<String> = received.iter().map(key_of).collect();
    assert_eq!(keys, ["orders/early", "orders/later"], "{received:?}");
    for entry in &received {
        assert_eq!((entry["origin"].as_str(), entry["principal"].as_str()), (Some("first"), Some("first")), "{entry}");
        assert_eq!(entry["fields"], json!(["*"]));
    }
    for node in [&first, &second] {
        let verdict = verify(node).await;
        assert_eq!((verdict["ok"].clone(), verdict["entries"].clone()), (json!(true), json!(2)), "{verdict}");
    }
}

/// Stops `node` cleanly, applies `tamper` to its store, and starts it again.
async fn tamper_with(node: &mut Node, tamper: impl FnOnce(&store::Store)) {
    assert!(node.terminate().success());
    {
        let store = store::Store::open(&node.data_dir).unwrap();
        tamper(&store);
    }
    node.start_again().await;
}

fn stored_entry(store: &store::Store, sequence: u64) -> Vec<u8> {
    store.audit_entry(sequence).unwrap().unwrap_or_else(|| panic!("no audit entry {sequence}"))
}

fn put_entry(store: &store::Store, sequence: u64, bytes: &[u8]) {
    let mut batch = store::WriteBatch::default();
    batch.put_audit(sequence, bytes);
    store.commit(batch).unwrap();
}

/// Verification on the node and by the CLI both name the sequence and the kind.
async fn assert_tampered(node: &Node, sequence: u64, kind: &str) {
    let verdict = verify(node).await;
    assert_eq!(verdict["ok"], json!(false), "{verdict}");
    assert_eq!(verdict["tamper"], json!({"sequence": sequence, "kind": kind}), "{verdict}");
    let (code, _, stderr) = cli(node, None, &["audit", "verify"]);
    assert_eq!(code, 2, "{stderr}");
    let word = if kind == "reordered" { "moved" } else { kind };
    assert!(stderr.contains(&format!("audit entry {sequence} was {word}")), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

#[tokio::test]
async fn tampering_with_the_store_is_found_where_it_happened() {
    let directory = temporary_directory();
    let mut node = Node::start_with(directory.path(), &["--name", "hq"]).await;
    for index in 0..10 {
        node.put("orders", &format!("o{index}"), json!({"n": index})).await;
    }
    assert_eq!(verify(&node).await["ok"], json!(true));

    // An entry altered in place: another principal, the hash left as it was.
    let mut original = Vec::new();
    tamper_with(&mut node, |store| {
        original = stored_entry(store, 4);
        let mut entry = AuditEntry::decode(&original).unwrap();
        entry.principal = "someone-else".into();
        put_entry(store, 4, &entry.encode());
    })
    .await;
    assert_tampered(&node, 4, "altered").await;

    // Put back, and an entry removed instead.
    let mut seventh = Vec::new();
    tamper_with(&mut node, |store| {
        put_entry(store, 4, &original);
        seventh = stored_entry(store, 7);
        let mut batch = store::WriteBatch::default();
        batch.remove_audit(7);
        store.commit(batch).unwrap();
    })
    .await;
    assert_tampered(&node, 7, "removed").await;

    // Put back, and an entry rewritten with its hash recomputed: the next entry's link gives it
    // away, at the rewritten entry.
    tamper_with(&mut node, |store| {
        put_entry(store, 7, &seventh);
        let mut entry = AuditEntry::decode(&stored_entry(store, 6)).unwrap();
        entry.fields = vec!["secret".into()];
        entry.hash = entry.computed_hash();
        put_entry(store, 6, &entry.encode());
    })
    .await;
    assert_tampered(&node, 6, "altered").await;

    // The newest entry garbled: the node still starts, new entries follow it, and verification
    // names it.
    let directory = temporary_directory();
    let mut node = Node::start_with(directory.path(), &["--name", "hq"]).await;
    for index in 0..3 {
        node.put("orders", &format!("o{index}"), json!({"n": index})).await;
    }
    tamper_with(&mut node, |store| put_entry(store, 3, b"\x93garbage")).await;
    node.put("orders", "after", json!({"n": 4})).await;
    assert_eq!(node.status().await["audit"]["sequence"], json!(4));
    assert_tampered(&node, 3, "altered").await;
    let listed: Vec<u64> = entries(&node).await.iter().map(|entry| entry["sequence"].as_u64().unwrap()).collect();
    assert_eq!(listed, [1, 2, 4], "a damaged entry is left out of listings");
}

#[tokio::test]
async fn an_edited_export_fails_offline_verification() {
    let directory = temporary_directory();
    let node = Node::start_with(&directory.path().join("data"), &["--name", "hq"]).await;
    for index in 0..6 {
        node.put("orders", &format!("o{index}"), json!({"n": index, "by": "ops"})).await;
    }
    let file = directory.path().join("audit.jsonl");
    let file_name = file.to_str().unwrap();
    let (code, stdout, stderr) = cli(&node, None, &["audit", "export", "--output", file_name]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.is_empty());
    let head_line = stderr.lines().next().unwrap();
    assert!(head_line.starts_with("exported 6 audit entries to"), "{stderr}");
    let head = head_line.rsplit("head ").next().unwrap().to_owned();
    assert!(head.starts_with("6:"), "{head}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().count(), 6);
    assert!(!directory.path().join("audit.jsonl.partial").exists());

    let (code, stdout, stderr) = cli(&node, None, &["audit", "verify", "--file", file_name, "--head", &head]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("intact: 6 entries"), "{stdout}");

    let check = |edited: String| {
        std::fs::write(&file, edited).unwrap();
        let (code, _, stderr) = cli(&node, None, &["audit", "verify", "--file", file_name, "--head", &head]);
        (code, stderr.trim().to_owned())
    };
    let lines: Vec<&str> = text.lines().collect();
    // A field changed on the third line.
    let mut edited = lines.clone();
    let altered = lines[2].replace("\"principal\":\"local\"", "\"principal\":\"root\"");
    assert_ne!(altered, lines[2]);
    edited[2] = &altered;
    let (code, message) = check(edited.join("\n"));
    assert_eq!(code, 2, "{message}");
    assert!(message.ends_with("audit entry 3 was altered"), "{message}");
    // The fifth line removed.
    let mut edited = lines.clone();
    edited.remove(4);
    let (code, message) = check(edited.join("\n"));
    assert_eq!((code, message.ends_with("audit entry 5 was removed")), (2, true), "{message}");
    // The newest line removed: only the kept head shows it.
    let (code, message) = check(lines[..5].join("\n"));
    assert_eq!((code, message.ends_with("audit entry 6 was removed")), (2, true), "{message}");
    // A line that is not an entry.
    let mut edited = lines.clone();
    edited[1] = "{\"sequence\": \"two\"}";
    let (code, message) = check(edited.join("\n"));
    assert_eq!(code, 2, "{message}");
    assert!(message.contains("line 2:"), "{message}");
    // A file that is not there is a failure to verify, not tampering.
    let (code, _, stderr) = cli(&node, None, &["audit", "verify", "--file", "/nonexistent/audit.jsonl"]);
    assert_eq!(code, 1, "{stderr}");
}

#[tokio::test]
async fn retention_trims_old_entries_and_the_rest_still_verifies() {
    let directory = temporary_directory();
    let data = directory.path().join("data");
    let mut node = Node::start_with(&data, &["--name", "hq", "--audit-retention-seconds", "1"]).await;
    for index in 0..5 {
        node.put("orders", &format!("o{index}"), json!({"n": index})).await;
    }
    // Entries older than a second go, a step at a time; the hang guard is 60 s.
    let started = Instant::now();
    while node.status().await["audit"]["anchor_sequence"] != json!(5) {
        assert!(started.elapsed() < Duration::from_secs(60), "not trimmed: {}", node.status().await["audit"]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(entries(&node).await.is_empty());
    assert!(metric(&node.metrics().await, "concord_audit_entries_trimmed_total") >= 5);
    let verdict = verify(&node).await;
    assert_eq!(verdict["ok"], json!(true), "{verdict}");
    assert_eq!(verdict["anchor"]["sequence"], json!(5));

    // After a restart with only the anchor left, the log goes on from it.
    assert!(node.terminate().success());
    node.start_again().await;
    for index in 5..8 {
        node.put("orders", &format!("o{index}"), json!({"n": index})).await;
    }
    let verdict = verify(&node).await;
    assert_eq!(verdict["ok"], json!(true), "{verdict}");
    assert_eq!(verdict["head"]["sequence"], json!(8));
    let anchor = verdict["anchor"]["sequence"].as_u64().unwrap();
    assert!(anchor >= 5);
    assert_eq!(anchor + verdict["entries"].as_u64().unwrap(), 8, "{verdict}");

    // The export starts with the anchor and verifies offline.
    let file = directory.path().join("audit.jsonl");
    let (code, _, stderr) = cli(&node, None, &["audit", "export", "--output", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with("{\"anchor\":{"), "{text}");
    // Retention may have moved on since the verification above, never back.
    let first_line: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert!(first_line["anchor"]["sequence"].as_u64().unwrap() >= anchor, "{text}");
    let (code, stdout, stderr) = cli(&node, None, &["audit", "verify", "--file", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("head 8:"), "{stdout}");
}
