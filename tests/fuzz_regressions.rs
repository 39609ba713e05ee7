//! Replays the fuzzing inputs on stable, in the default `cargo test`: every file in
//! `fuzz/corpus/<target>/` (the seed corpus) and `fuzz/regressions/<target>/` (minimised crashes)
//! goes through the harness function of its target, the very code the libFuzzer targets run
//! (`fuzz/src/harness.rs`, included below). The harnesses assert the properties, so a test fails
//! when any input panics. See `fuzz/README.md`.

#[path = "../fuzz/src/harness.rs"]
mod harness;
#[path = "../fuzz/src/known_open.rs"]
mod known_open;

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// Regressions for bugs that are known and not fixed yet, from `fuzz/known-open.toml` (which
/// `scripts/fuzz` reads too). They must still panic, with the message the file names, so they
/// stay honest; once a fix makes one pass, this test says so and the entry is removed, turning
/// it into an ordinary regression. Entries that need overflow checks only panic in builds that
/// have them (debug assertions on, as in `cargo test`); elsewhere either outcome is accepted.
fn known_open() -> Vec<known_open::KnownOpen> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join("known-open.toml");
    match known_open::read(&path) {
        Ok(known) => known,
        Err(error) => panic!("{error}"),
    }
}

fn files_in(folder: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(folder) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.is_file() && !path.file_name().is_some_and(|name| name.to_string_lossy().starts_with('.')))
        .collect();
    files.sort();
    files
}

fn replay(target: &str) {
    let Some(harness) = harness::by_name(target) else { panic!("no fuzz target named {target}") };
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = files_in(&fuzz.join("corpus").join(target));
    assert!(!corpus.is_empty(), "no seed corpus for {target}: run the seed generator (fuzz/README.md)");
    let regressions = files_in(&fuzz.join("regressions").join(target));

    let known = known_open();
    let mut failures = Vec::new();
    for path in corpus.iter().chain(&regressions) {
        let data = match fs::read(path) {
            Ok(data) => data,
            Err(error) => panic!("cannot read {}: {error}", path.display()),
        };
        let name = path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
        let open = known.iter().find(|open| open.target == target && open.regression == name);
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| harness(&data)));
        match (outcome, open) {
            (Ok(()), None) => {}
            (Ok(()), Some(open)) if open.overflow_checks && !cfg!(debug_assertions) => {}
            (Ok(()), Some(_)) => {
                failures.push(format!("{} passes now: remove it from fuzz/known-open.toml", path.display()))
            }
            (Err(_), None) => failures.push(format!("{} panicked (message above)", path.display())),
            (Err(payload), Some(open)) => {
                let message = known_open::panic_message(payload.as_ref());
                if !message.contains(&open.panic) {
                    failures.push(format!(
                        "{} panics with {message:?}, not with {:?} as fuzz/known-open.toml says",
                        path.display(),
                        open.panic
                    ));
                }
            }
        }
    }
    for open in known.iter().filter(|open| open.target == target) {
        if !regressions.iter().any(|path| path.file_name().is_some_and(|name| *name == *open.regression)) {
            failures.push(format!(
                "fuzz/known-open.toml names {}/{}, which is not in fuzz/regressions",
                open.target, open.regression
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{target}: {} of {} inputs failed:\n{}",
        failures.len(),
        corpus.len() + regressions.len(),
        failures.join("\n")
    );
}

#[test]
fn envelope_decode() {
    replay("envelope_decode");
}

#[test]
fn record_key() {
    replay("record_key");
}

#[test]
fn record_changes() {
    replay("record_changes");
}

#[test]
fn record_convergence() {
    replay("record_convergence");
}

#[test]
fn text_update() {
    replay("text_update");
}

#[test]
fn json_operations() {
    replay("json_operations");
}

#[test]
fn version_vector() {
    replay("version_vector");
}

#[test]
fn replica_messages() {
    replay("replica_messages");
}

#[test]
fn stored_documents() {
    replay("stored_documents");
}

#[test]
fn http_bodies() {
    replay("http_bodies");
}

#[test]
fn sha256_matches_the_standard_test_vectors() {
    let hex = |digest: [u8; 32]| digest.iter().map(|byte| format!("{byte:02x}")).collect::<String>();
    assert_eq!(hex(harness::sha256(b"")), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    assert_eq!(hex(harness::sha256(b"abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    assert_eq!(
        hex(harness::sha256(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")),
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
    );
}

#[test]
fn chunk_checksums_are_recomputed_as_automerge_computes_them() {
    let (_, saved) = harness::base_record();
    let mut damaged = saved.clone();
    damaged[4..8].copy_from_slice(&[0; 4]);
    harness::fix_chunk_checksums(&mut damaged);
    assert_eq!(&damaged, saved, "the recomputed checksum differs from automerge's");
}

/// A copy of the engine's private `DocumentEntry` (`src/engine.rs`), to pin the harness's own
/// decoder and encoder of stored document entries to the format the engine writes.
#[derive(serde::Serialize)]
struct DocumentEntry {
    kind: crdt::envelope::DocumentKind,
    #[serde(with = "serde_bytes")]
    saved: Vec<u8>,
}

#[test]
fn document_entries_are_decoded_as_the_engine_writes_them() {
    use crdt::envelope::DocumentKind;
    for (kind, length) in [(DocumentKind::Record, 0), (DocumentKind::Text, 200), (DocumentKind::Record, 70_000)] {
        let saved: Vec<u8> = (0..length).map(|index| index as u8).collect();
        let engine = rmp_serde::to_vec(&DocumentEntry { kind, saved: saved.clone() }).unwrap_or_default();
        assert_eq!(harness::encode_document_entry(kind, &saved), engine, "the harness encodes entries differently");
        assert_eq!(harness::decode_document_entry(&engine).ok(), Some((kind, saved.as_slice())));
    }
}

#[test]
fn the_known_open_list_names_real_targets() {
    let targets = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join("fuzz_targets");
    for open in known_open() {
        let target = targets.join(format!("{}.rs", open.target));
        assert!(target.is_file(), "fuzz/known-open.toml names {}, which is not a fuzz target", open.target);
    }
}

#[test]
fn known_open_files_are_checked() {
    let entry = "[[open]]\ntarget = \"t\"\nregression = \"r\"\npanic = \"p\"\ndescription = \"d\"\n";
    let parsed = known_open::parse(entry).expect("a well-formed entry");
    assert_eq!(
        parsed,
        vec![known_open::KnownOpen {
            target: "t".into(),
            regression: "r".into(),
            panic: "p".into(),
            overflow_checks: false,
            description: "d".into(),
        }]
    );
    assert_eq!(
        known_open::matching(&parsed, "t", "assertion failed: p and more").map(|open| open.regression.as_str()),
        Some("r")
    );
    assert_eq!(known_open::matching(&parsed, "other", "p"), None);
    assert_eq!(known_open::matching(&parsed, "t", "q"), None);
    assert_eq!(known_open::parse("").expect("no entries"), Vec::new());
    for bad in [
        entry.replace("panic = \"p\"", "panic = \"\""),
        entry.replace("description = \"d\"\n", ""),
        entry.replace("regression", "file"),
        format!("{entry}overflow_checks = \"yes\"\n"),
        format!("{entry}{entry}"),
        format!("{entry}[other]\n"),
        "open = 1\n".to_owned(),
    ] {
        assert!(known_open::parse(&bad).is_err(), "accepted {bad:?}");
    }
}

#[test]
fn pgoutput_decode() {
    replay("pgoutput_decode");
}
