//! The command-line client against a real node: every client command, both output formats, the
//! environment fallbacks, and one clear line with a non-zero exit on error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use support::{Node, temporary_directory};

#[tokio::test]
async fn client_commands_work_end_to_end() {
    let directory = temporary_directory();
    let node = Node::start(directory.path()).await;

    let (ok, stdout, stderr) = node.cli(&["put", "customers/c1", r#"{"name":"Ada","city":"London"}"#]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("customers/c1") && stdout.contains("\"Ada\""), "{stdout}");

    let (ok, stdout, _) = node.cli(&["patch", "customers/c1", r#"{"city":null,"vip":true}"#, "--output", "json"]);
    assert!(ok);
    let record: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(record["value"], json!({"name": "Ada", "vip": true}));

    let (ok, stdout, _) = node.cli(&["incr", "customers/c1", "visits", "3", "--output", "json"]);
    assert!(ok);
    let record: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(record["value"]["visits"], json!(3));
    let (ok, stdout, _) = node.cli(&["incr", "customers/c1", "visits", "-1", "--output", "json"]);
    assert!(ok);
    assert_eq!(serde_json::from_str::<Value>(stdout.trim()).unwrap()["value"]["visits"], json!(2));

    let (ok, stdout, _) = node.cli(&["get", "customers/c1", "--output", "json"]);
    assert!(ok);
    assert_eq!(
        serde_json::from_str::<Value>(stdout.trim()).unwrap()["value"],
        json!({"name": "Ada", "vip": true, "visits": 2})
    );

    node.cli(&["put", "customers/c2", r#"{"name":"Grace"}"#]);
    let (ok, stdout, _) = node.cli(&["ls", "customers"]);
    assert!(ok);
    assert!(stdout.contains("c1") && stdout.contains("Grace"), "{stdout}");

    let (ok, stdout, _) = node.cli(&["del", "customers/c2"]);
    assert!(ok);
    assert_eq!(stdout.trim(), "deleted customers/c2");

    let (ok, stdout, _) = node.cli(&["status", "--output", "json"]);
    assert!(ok);
    let status: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(status["record_count"], json!(1));

    let (ok, stdout, _) = node.cli(&["status"]);
    assert!(ok && stdout.contains("record_count") && stdout.contains("digest"), "{stdout}");
}

#[tokio::test]
async fn watch_prints_the_feed_from_a_sequence() {
    let directory = temporary_directory();
    let node = Node::start(directory.path()).await;
    for index in 0..3 {
        node.put("c", &format!("r{index}"), json!({"i": index})).await;
    }
    // `watch` follows for ever; read its first lines and stop it.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["watch", "--since", "1", "--output", "json", "--api", &node.api])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines: Vec<Value> = {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .take(2)
            .map(|line| serde_json::from_str(&line.unwrap()).unwrap())
            .collect()
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(lines[0]["sequence"], json!(2));
    assert_eq!(lines[1]["id"], json!("r2"));
}

#[tokio::test]
async fn errors_exit_non_zero_with_one_clear_line() {
    let directory = temporary_directory();
    let node = Node::start(directory.path()).await;
    let cases: [(&[&str], &str); 4] = [
        (&["get", "customers/missing"], "404"),
        (&["put", "customers/c1", "{not json"], "not valid JSON"),
        (&["get", "no-slash"], "is not COLLECTION/ID"),
        (&["put", "bad collection/x", "{}"], "400"),
    ];
    for (arguments, expected) in cases {
        let (ok, _, stderr) = node.cli(arguments);
        assert!(!ok, "{arguments:?} should fail");
        assert_eq!(stderr.trim().lines().count(), 1, "{arguments:?}: {stderr}");
        assert!(stderr.starts_with("error: ") && stderr.contains(expected), "{arguments:?}: {stderr}");
    }
    // An unreachable node is one line too.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(["status", "--api", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot reach the node") && stderr.trim().lines().count() == 1, "{stderr}");
}

/// `concord collection define|show` and a schema at work: a write that breaks it is refused
/// with 422 naming the field and the rule; `concord conflicts ls` and `resolve` answer; the
/// system collection cannot be written through the record API.
#[tokio::test]
async fn collections_are_defined_and_their_schemas_enforced() {
    let directory = temporary_directory();
    let node = Node::start(directory.path()).await;
    let file = directory.path().join("orders.toml");
    std::fs::write(
        &file,
        "[fields.status]\npolicy = \"ordered\"\norder = [\"draft\", \"approved\", \"shipped\"]\ntype = \"string\"\nrequired = true\n\
         [fields.price]\npolicy = \"max\"\ntype = \"number\"\nminimum = 0\n",
    )
    .unwrap();
    let (ok, stdout, stderr) = node.cli(&["collection", "define", "orders", "--file", file.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("defined orders"), "{stdout}");
    let (ok, stdout, _) = node.cli(&["collection", "show", "orders", "--output", "json"]);
    assert!(ok);
    let shown: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(shown["definition"]["fields"]["price"]["policy"], json!("max"), "{shown}");

    let (ok, _, stderr) = node.cli(&["put", "orders/o1", r#"{"status":"draft","price":-5}"#]);
    assert!(!ok);
    assert!(stderr.contains("422") && stderr.contains("price") && stderr.contains("minimum"), "{stderr}");
    let (ok, _, stderr) = node.cli(&["put", "orders/o1", r#"{"price":5}"#]);
    assert!(!ok);
    assert!(stderr.contains("status") && stderr.contains("required"), "{stderr}");
    let (ok, _, stderr) = node.cli(&["put", "orders/o1", r#"{"status":"draft","price":5}"#]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = node.cli(&["patch", "orders/o1", r#"{"status":null}"#]);
    assert!(!ok, "removing a required field is refused");
    assert!(stderr.contains("required"), "{stderr}");

    let (ok, stdout, _) = node.cli(&["conflicts", "ls", "--output", "json"]);
    assert!(ok);
    assert_eq!(serde_json::from_str::<Value>(stdout.trim()).unwrap()["conflicts"], json!([]));
    let (ok, stdout, stderr) =
        node.cli(&["conflicts", "resolve", "orders/o1", "price", "--value", "7", "--output", "json"]);
    assert!(ok, "{stderr}");
    assert_eq!(serde_json::from_str::<Value>(stdout.trim()).unwrap()["value"]["price"], json!(7));

    let (ok, _, stderr) = node.cli(&["put", "_collections/orders", r#"{"definition":"{}"}"#]);
    assert!(!ok);
    assert!(stderr.contains("reserved"), "{stderr}");
    let (ok, _, stderr) = node.cli(&["collection", "define", "orders", "--file", "/nonexistent"]);
    assert!(!ok && stderr.lines().count() == 1, "{stderr}");
}
