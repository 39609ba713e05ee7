//! The dependency rules of ARCHITECTURE.md, checked with `cargo tree`: the pure core has no I/O
//! crates, and the store and transport crates know nothing of records or of each other.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::process::Command;

/// The crates `package` depends on for normal builds (not dev or build dependencies).
fn normal_dependencies(package: &str) -> BTreeSet<String> {
    let output = Command::new(env!("CARGO"))
        .args(["tree", "--offline", "--edges", "normal", "--prefix", "none", "--format", "{lib}", "--package", package])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(output.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| line.trim().to_owned())
        .filter(|line| !line.is_empty())
        .collect()
}

fn assert_absent(package: &str, forbidden: &[&str]) {
    let dependencies = normal_dependencies(package);
    assert!(dependencies.len() > 1, "cargo tree listed nothing for {package}");
    let found: Vec<&&str> = forbidden.iter().filter(|name| dependencies.contains(**name)).collect();
    assert!(found.is_empty(), "{package} depends on {found:?}");
}

#[test]
fn the_pure_core_has_no_io_crates() {
    assert_absent(
        "concord-crdt",
        &["tokio", "sled", "quinn", "quinn_proto", "rustls", "axum", "hyper", "mio", "store", "transport"],
    );
}

#[test]
fn store_and_transport_know_nothing_of_records() {
    assert_absent("concord-store", &["crdt", "transport", "automerge", "yrs", "tokio"]);
    assert_absent("concord-transport", &["crdt", "store", "automerge", "yrs", "sled"]);
}

#[test]
fn tls_uses_ring_only() {
    assert_absent("concord", &["aws_lc_rs", "aws_lc_sys"]);
}
