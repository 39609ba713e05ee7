//! The store's behaviour on healthy folders: round trips, batches, key encodings, pagination, and
//! the errors for folders that are not Concord stores.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use store::{
    FORMAT_VERSION, Keyspace, MAX_DOCUMENT_KEY, OpenError, ReadError, Store, StoredDocument, WriteBatch, WriteError,
};

const ORIGIN_A: [u8; 16] = [1; 16];
/// Differs from `ORIGIN_A` in its last byte only, so its log keys sort right after.
const ORIGIN_B: [u8; 16] = {
    let mut origin = [1; 16];
    origin[15] = 2;
    origin
};

fn folder() -> (tempfile::TempDir, PathBuf) {
    let temporary = tempfile::tempdir().expect("a temporary folder");
    let directory = temporary.path().join("store");
    (temporary, directory)
}

fn commit(store: &Store, fill: impl FnOnce(&mut WriteBatch)) {
    let mut batch = WriteBatch::default();
    fill(&mut batch);
    store.commit(batch).expect("commit");
}

fn keys(listed: Vec<Vec<u8>>) -> Vec<String> {
    listed.into_iter().map(|key| String::from_utf8(key).expect("a UTF-8 key")).collect()
}

#[test]
fn everything_committed_is_read_back_after_reopening() {
    let (_temporary, directory) = folder();
    let store = Store::open(&directory).expect("create");
    commit(&store, |batch| {
        batch.put_document(b"doc", b"compacted");
        // Out of order and across a byte boundary: the store returns index order.
        for index in [256, 3, 255, 0] {
            batch.put_increment(b"doc", index, format!("change {index}").as_bytes());
        }
        for sequence in [1, 2, 3, 300] {
            batch.put_log(&ORIGIN_A, sequence, format!("a{sequence}").as_bytes());
        }
        for sequence in 1..=5 {
            batch.put_feed(sequence, format!("feed {sequence}").as_bytes());
        }
        batch.put_meta("identity", b"me");
    });
    commit(&store, |batch| batch.put_meta("counter", &7_u64.to_be_bytes()));
    drop(store);

    let store = Store::open(&directory).expect("reopen");
    let document = store.document(b"doc").expect("read");
    let increments = [0, 3, 255, 256].map(|index| (index, format!("change {index}").into_bytes())).to_vec();
    assert_eq!(document, Some(StoredDocument { value: b"compacted".to_vec(), increments }));
    assert_eq!(store.document(b"missing").expect("read"), None);

    let log = store.log_range(&ORIGIN_A, 2, 10).expect("read");
    assert_eq!(log, vec![(2, b"a2".to_vec()), (3, b"a3".to_vec()), (300, b"a300".to_vec())]);
    assert_eq!(store.log_range(&ORIGIN_A, 0, 2).expect("read").len(), 2);
    assert_eq!(store.log_range(&ORIGIN_A, 301, 10).expect("read"), vec![]);
    assert_eq!(store.log_entry(&ORIGIN_A, 300).expect("read"), Some(b"a300".to_vec()));
    assert_eq!(store.log_entry(&ORIGIN_A, 4).expect("read"), None);

    let feed = store.feed_range(2, 2).expect("read");
    assert_eq!(feed, vec![(3, b"feed 3".to_vec()), (4, b"feed 4".to_vec())]);
    assert_eq!(store.feed_range(5, 10).expect("read"), vec![]);
    assert_eq!(store.feed_range(u64::MAX, 10).expect("read"), vec![]);
    assert_eq!(store.feed_range(0, 0).expect("read"), vec![]);

    assert_eq!(store.meta("identity").expect("read"), Some(b"me".to_vec()));
    assert_eq!(store.meta("counter").expect("read"), Some(7_u64.to_be_bytes().to_vec()));
    assert_eq!(store.meta("absent").expect("read"), None);
    assert!(store.size_on_disk().expect("size") > 0);
}

#[test]
fn removals_are_committed() {
    let (_temporary, directory) = folder();
    let store = Store::open(&directory).expect("create");
    commit(&store, |batch| {
        batch.put_document(b"doc", b"value");
        batch.put_increment(b"doc", 0, b"zero");
        batch.put_increment(b"doc", 1, b"one");
        batch.put_log(&ORIGIN_A, 1, b"entry");
    });
    commit(&store, |batch| {
        batch.remove_increment(b"doc", 0);
        batch.remove_log(&ORIGIN_A, 1);
    });
    let document = store.document(b"doc").expect("read").expect("present");
    assert_eq!(document.increments, vec![(1, b"one".to_vec())]);
    assert_eq!(store.log_entry(&ORIGIN_A, 1).expect("read"), None);
    commit(&store, |batch| batch.remove_document(b"doc"));
    assert_eq!(store.document(b"doc").expect("read"), None);
}

#[test]
fn a_batch_is_visible_whole() {
    let (_temporary, directory) = folder();
    let store = Store::open(&directory).expect("create");
    let mut batch = WriteBatch::default();
    assert!(batch.is_empty());
    batch.put_document(b"doc", b"v");
    batch.put_increment(b"doc", 0, b"i");
    batch.put_log(&ORIGIN_A, 1, b"l");
    batch.put_feed(1, b"f");
    batch.put_meta("m", b"m");
    assert_eq!(batch.len(), 5);
    store.commit(batch).expect("commit");
    assert!(store.document(b"doc").expect("read").is_some());
    assert!(store.log_entry(&ORIGIN_A, 1).expect("read").is_some());
    assert_eq!(store.feed_range(0, 10).expect("read").len(), 1);
    assert!(store.meta("m").expect("read").is_some());
    store.commit(WriteBatch::default()).expect("an empty batch commits");

    // A reader never sees a document's value from one batch with increments from another.
    let writer = store.clone();
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (store, done) = (store.clone(), done.clone());
        thread::spawn(move || {
            let mut reads = 0_u64;
            while !done.load(Ordering::Relaxed) || reads == 0 {
                let document = store.document(b"pair").expect("read");
                if let Some(document) = document {
                    assert_eq!(document.increments, vec![(0, document.value.clone())]);
                }
                reads += 1;
            }
        })
    };
    for round in 0_u32..200 {
        commit(&writer, |batch| {
            batch.put_document(b"pair", &round.to_be_bytes());
            batch.put_increment(b"pair", 0, &round.to_be_bytes());
        });
    }
    done.store(true, Ordering::Relaxed);
    reader.join().expect("the reader saw only whole batches");
}

#[test]
fn refused_batches_write_nothing() {
    let (_temporary, directory) = folder();
    let store = Store::open(&directory).expect("create");

    let mut batch = WriteBatch::default();
    batch.put_feed(1, b"before");
    batch.put_document(&[b'k'; MAX_DOCUMENT_KEY + 1], b"too long");
    batch.put_meta("after", b"after");
    let error = store.commit(batch).expect_err("a key over the limit");
    assert!(matches!(error, WriteError::KeyTooLong { length: 1025, maximum: 1024 }));
    assert!(error.to_string().contains("1025"), "{error}");

    let mut batch = WriteBatch::default();
    batch.put_increment(&[b'k'; MAX_DOCUMENT_KEY + 1], 0, b"too long");
    assert!(matches!(store.commit(batch), Err(WriteError::KeyTooLong { .. })));

    let mut batch = WriteBatch::default();
    batch.put_feed(2, b"before");
    batch.put_meta("format", b"mine");
    assert!(matches!(store.commit(batch), Err(WriteError::ReservedMeta { .. })));

    assert_eq!(store.feed_range(0, 10).expect("read"), vec![]);
    assert_eq!(store.meta("after").expect("read"), None);
    drop(store);
    Store::open(&directory).expect("the format marker is intact");

    let store = Store::open(&directory).expect("reopen");
    commit(&store, |batch| batch.put_document(&[b'k'; MAX_DOCUMENT_KEY], b"at the limit"));
    assert!(store.document(&[b'k'; MAX_DOCUMENT_KEY]).expect("read").is_some());
    assert_eq!(store.document(&[b'k'; MAX_DOCUMENT_KEY + 1]).expect("read"), None);
}

#[test]
fn keyspaces_and_keys_do_not_mix() {
    let (_temporary, directory) = folder();
    let store = Store::open(&directory).expect("create");
    commit(&store, |batch| {
        batch.put_document(b"a", b"document a");
        batch.put_document(b"ab", b"document ab");
        // The index of "a"'s increment starts with the byte 'b'.
        batch.put_increment(b"a", u32::from_be_bytes(*b"bxyz"), b"a's");
        batch.put_increment(b"ab", 1, b"ab's");
        batch.put_log(&ORIGIN_A, 1, b"a1");
        batch.put_log(&ORIGIN_A, u64::MAX, b"a-max");
        batch.put_log(&ORIGIN_B, 0, b"b0");
        batch.put_log(&ORIGIN_B, 2, b"b2");
        batch.put_feed(1, b"feed");
        batch.put_meta("a", b"meta");
    });
    let a = store.document(b"a").expect("read").expect("present");
    assert_eq!(a.increments, vec![(u32::from_be_bytes(*b"bxyz"), b"a's".to_vec())]);
    let ab = store.document(b"ab").expect("read").expect("present");
    assert_eq!(ab.increments, vec![(1, b"ab's".to_vec())]);

    let log_a = store.log_range(&ORIGIN_A, 0, 10).expect("read");
    assert_eq!(log_a, vec![(1, b"a1".to_vec()), (u64::MAX, b"a-max".to_vec())]);
    let log_b = store.log_range(&ORIGIN_B, 0, 10).expect("read");
    assert_eq!(log_b, vec![(0, b"b0".to_vec()), (2, b"b2".to_vec())]);
    assert_eq!(store.log_range(&[0; 16], 0, 10).expect("read"), vec![]);

    assert_eq!(keys(store.document_keys(b"", None, 10).expect("list")), ["a", "ab"]);
    assert_eq!(store.feed_range(0, 10).expect("read").len(), 1);
}

#[test]
fn audit_conflicts_and_quarantine_keep_numbered_entries_apart() {
    let (_temporary, directory) = folder();
    let store = Store::open(&directory).expect("create");
    assert_eq!(store.audit_last().expect("read"), None);
    assert_eq!(store.conflict_last().expect("read"), None);
    assert_eq!(store.quarantine_last().expect("read"), None);
    let numbered = |name: &str, number: u64| (number, format!("{name} {number}").into_bytes());
    commit(&store, |batch| {
        // Out of order: the store returns number order.
        for sequence in [256, 1, u64::MAX, 3, 2] {
            batch.put_audit(sequence, &numbered("audit", sequence).1);
        }
        for sequence in [2, 1] {
            batch.put_conflict(sequence, &numbered("conflict", sequence).1);
        }
        batch.put_quarantine(7, &numbered("quarantine", 7).1);
        batch.put_feed(1, b"feed");
        batch.put_meta("audit_anchor", b"anchor");
    });
    drop(store);

    let store = Store::open(&directory).expect("reopen");
    let audit = |sequences: &[u64]| sequences.iter().map(|&sequence| numbered("audit", sequence)).collect::<Vec<_>>();
    assert_eq!(store.audit_range(0, 3).expect("read"), audit(&[1, 2, 3]));
    assert_eq!(store.audit_range(3, 10).expect("read"), audit(&[256, u64::MAX]));
    assert_eq!(store.audit_range(u64::MAX, 10).expect("read"), vec![]);
    assert_eq!(store.audit_range(0, 0).expect("read"), vec![]);
    assert_eq!(store.audit_last().expect("read"), Some(numbered("audit", u64::MAX)));
    assert_eq!(store.audit_entry(256).expect("read"), Some(numbered("audit", 256).1));
    assert_eq!(store.audit_entry(4).expect("read"), None);

    assert_eq!(store.conflict_range(0, 10).expect("read"), vec![numbered("conflict", 1), numbered("conflict", 2)]);
    assert_eq!(store.conflict_range(1, 10).expect("read"), vec![numbered("conflict", 2)]);
    assert_eq!(store.conflict_last().expect("read"), Some(numbered("conflict", 2)));
    assert_eq!(store.conflict(1).expect("read"), Some(numbered("conflict", 1).1));

    assert_eq!(store.quarantine_range(0, 10).expect("read"), vec![numbered("quarantine", 7)]);
    assert_eq!(store.quarantine_range(7, 10).expect("read"), vec![]);
    assert_eq!(store.quarantined(7).expect("read"), Some(numbered("quarantine", 7).1));
    assert_eq!(store.quarantined(1).expect("read"), None);

    // The other keyspaces are untouched.
    assert_eq!(store.feed_range(0, 10).expect("read"), vec![(1, b"feed".to_vec())]);
    assert_eq!(store.meta("audit_anchor").expect("read"), Some(b"anchor".to_vec()));

    let mut batch = WriteBatch::default();
    batch.remove_audit(1);
    batch.remove_audit(2);
    batch.remove_conflict(2);
    batch.remove_quarantine(7);
    assert_eq!(batch.len(), 4);
    store.commit(batch).expect("commit");
    assert_eq!(store.audit_range(0, 1).expect("read"), audit(&[3]));
    assert_eq!(store.conflict_last().expect("read"), Some(numbered("conflict", 1)));
    assert_eq!(store.quarantine_last().expect("read"), None);
    assert_eq!(store.quarantine_range(0, 10).expect("read"), vec![]);
}

#[test]
fn numbered_keys_of_the_wrong_length_are_corrupt() {
    let (_temporary, directory) = folder();
    drop(Store::open(&directory).expect("create"));
    insert_raw(&directory, &[b'A', 0, 0, 1]);
    insert_raw(&directory, &[b'c', 0, 0, 0, 0, 0, 0, 0, 1, 9]);
    insert_raw(&directory, &[b'q', 1]);
    let store = Store::open(&directory).expect("open");
    let error = store.audit_range(0, 10).expect_err("a short audit key");
    assert!(matches!(error, ReadError::Corrupt { keyspace: Keyspace::Audit, .. }), "{error}");
    assert!(error.to_string().contains("audit keyspace"), "{error}");
    assert!(matches!(store.audit_last(), Err(ReadError::Corrupt { keyspace: Keyspace::Audit, .. })));
    assert!(matches!(store.conflict_range(0, 10), Err(ReadError::Corrupt { keyspace: Keyspace::Conflicts, .. })));
    assert!(matches!(store.conflict_last(), Err(ReadError::Corrupt { keyspace: Keyspace::Conflicts, .. })));
    assert!(matches!(store.quarantine_range(0, 10), Err(ReadError::Corrupt { keyspace: Keyspace::Quarantine, .. })));
    assert!(matches!(store.quarantine_last(), Err(ReadError::Corrupt { keyspace: Keyspace::Quarantine, .. })));
}

#[test]
fn document_keys_paginate() {
    let (_temporary, directory) = folder();
    let store = Store::open(&directory).expect("create");
    commit(&store, |batch| {
        for key in ["", "a", "ab", "abc", "abd", "b", "ba"] {
            batch.put_document(key.as_bytes(), b"v");
        }
    });
    let list = |prefix: &str, after: Option<&str>, limit| {
        keys(store.document_keys(prefix.as_bytes(), after.map(str::as_bytes), limit).expect("list"))
    };
    assert_eq!(list("", None, 100), ["", "a", "ab", "abc", "abd", "b", "ba"]);
    assert_eq!(list("a", None, 100), ["a", "ab", "abc", "abd"]);
    assert_eq!(list("ab", None, 100), ["ab", "abc", "abd"]);
    assert_eq!(list("b", None, 100), ["b", "ba"]);
    assert_eq!(list("c", None, 100), Vec::<String>::new());

    // Page through "a" two at a time.
    assert_eq!(list("a", None, 2), ["a", "ab"]);
    assert_eq!(list("a", Some("ab"), 2), ["abc", "abd"]);
    assert_eq!(list("a", Some("abd"), 2), Vec::<String>::new());

    // `after` is strict, may be absent from the store, and may lie outside the prefix.
    assert_eq!(list("a", Some("a"), 100), ["ab", "abc", "abd"]);
    assert_eq!(list("a", Some("abca"), 100), ["abd"]);
    assert_eq!(list("b", Some("a"), 100), ["b", "ba"]);
    assert_eq!(list("a", Some("b"), 100), Vec::<String>::new());
    assert_eq!(list("", Some(""), 100), ["a", "ab", "abc", "abd", "b", "ba"]);
    assert_eq!(list("a", None, 0), Vec::<String>::new());
}

/// Writes `key` straight into sled, under the store, as if the disk had been damaged.
fn insert_raw(directory: &Path, key: &[u8]) {
    insert_raw_entries(directory, &[(key, b"value")]);
}

/// Writes entries straight into sled, under the store.
fn insert_raw_entries(directory: &Path, entries: &[(&[u8], &[u8])]) {
    let db = sled::open(directory).expect("open with sled");
    for (key, value) in entries {
        db.insert(key, *value).expect("insert");
    }
    db.flush().expect("flush");
}

#[test]
fn keys_of_the_wrong_length_are_corrupt() {
    let (_temporary, directory) = folder();
    drop(Store::open(&directory).expect("create"));

    // A log key three bytes short, within the range of origin A.
    let mut log = vec![b'L'];
    log.extend_from_slice(&ORIGIN_A);
    log.extend_from_slice(&[0, 0, 1, 0, 0]);
    insert_raw(&directory, &log);
    let store = Store::open(&directory).expect("open");
    let error = store.log_range(&ORIGIN_A, 0, 10).expect_err("a short log key");
    assert!(matches!(error, ReadError::Corrupt { keyspace: Keyspace::Log, .. }), "{error}");
    assert!(error.to_string().contains("log keyspace"), "{error}");
    drop(store);

    insert_raw(&directory, &[b'F', 0, 0, 1]);
    let store = Store::open(&directory).expect("open");
    let error = store.feed_range(0, 10).expect_err("a short feed key");
    assert!(matches!(error, ReadError::Corrupt { keyspace: Keyspace::Feed, .. }), "{error}");
    drop(store);

    // An increment key of document "doc" with a two-byte index.
    insert_raw(&directory, b"ddoc");
    insert_raw(&directory, &[b'i', 0, 3, b'd', b'o', b'c', 0, 1]);
    let store = Store::open(&directory).expect("open");
    let error = store.document(b"doc").expect_err("a short increment key");
    assert!(matches!(error, ReadError::Corrupt { keyspace: Keyspace::Increments, .. }), "{error}");
}

#[test]
fn open_creates_missing_folders() {
    let (_temporary, directory) = folder();
    let nested = directory.join("a").join("b");
    let store = Store::open(&nested).expect("create");
    assert_eq!(store.directory(), nested);
    assert!(nested.join("db").is_file());
}

#[test]
fn open_refuses_a_regular_file() {
    let (_temporary, directory) = folder();
    std::fs::write(&directory, b"not a folder").expect("write a file");
    let error = Store::open(&directory).expect_err("a file is not a store");
    assert!(matches!(error, OpenError::NotADirectory { .. }));
    assert_eq!(error.to_string(), format!("{} is not a directory", directory.display()));
}

#[test]
fn open_refuses_a_folder_of_other_files() {
    let (_temporary, directory) = folder();
    std::fs::create_dir(&directory).expect("create a folder");
    std::fs::write(directory.join("notes.txt"), b"hello").expect("write a file");
    let error = Store::open(&directory).expect_err("not a store");
    assert!(matches!(error, OpenError::NotAStore { .. }));
    assert!(error.to_string().contains("is not a Concord store"), "{error}");
    assert!(!directory.join("db").exists(), "sled was let loose in the folder");
}

#[test]
fn open_refuses_a_foreign_sled_database() {
    let (_temporary, directory) = folder();
    insert_raw(&directory, b"someone else's key");
    let error = Store::open(&directory).expect_err("a foreign database");
    assert_eq!(error.to_string(), format!("{} is not a Concord store (no format marker)", directory.display()));

    // An empty sled database is refused as well: only a missing or empty folder is created.
    let (_temporary, directory) = folder();
    drop(sled::open(&directory).expect("create with sled"));
    assert!(matches!(Store::open(&directory), Err(OpenError::NotAStore { .. })));
}

#[test]
fn open_checks_the_format_marker() {
    let (_temporary, directory) = folder();
    drop(Store::open(&directory).expect("create"));
    let db = sled::open(&directory).expect("open with sled");
    let mut marker = b"concord-store".to_vec();
    marker.extend_from_slice(&(FORMAT_VERSION + 1).to_be_bytes());
    db.insert(b"mformat", marker).expect("insert");
    db.flush().expect("flush");
    drop(db);
    let error = Store::open(&directory).expect_err("a newer format");
    assert!(
        matches!(error, OpenError::Version { found, supported: FORMAT_VERSION, .. } if found == FORMAT_VERSION + 1)
    );
    assert_eq!(
        error.to_string(),
        format!(
            "{} was written by store format {}, this build reads {FORMAT_VERSION}",
            directory.display(),
            FORMAT_VERSION + 1
        )
    );

    let db = sled::open(&directory).expect("open with sled");
    db.insert(b"mformat", b"concord".as_slice()).expect("insert");
    db.flush().expect("flush");
    drop(db);
    let error = Store::open(&directory).expect_err("a garbled marker");
    assert!(error.to_string().contains("is corrupt: the format marker is garbled"), "{error}");
}

#[test]
fn a_store_open_elsewhere_is_refused() {
    let (_temporary, directory) = folder();
    let _open = Store::open(&directory).expect("create");
    let error = Store::open(&directory).expect_err("sled locks the folder");
    assert!(matches!(error, OpenError::Sled { .. }));
    assert!(error.to_string().starts_with("sled could not open"), "{error}");
}

#[test]
fn usage_counts_the_entries_and_bytes_of_each_keyspace() {
    let (_temporary, directory) = folder();
    let store = Store::open(&directory).expect("create");
    commit(&store, |batch| {
        batch.put_document(b"doc", b"12345");
        batch.put_increment(b"doc", 0, b"123");
        batch.put_increment(b"doc", 1, b"1");
        batch.put_log(&ORIGIN_A, 1, b"1234567");
        batch.put_feed(1, b"12");
        batch.put_audit(1, b"");
    });
    let usage = store.usage().expect("usage");
    let of = |keyspace: Keyspace| {
        let found = usage.iter().find(|usage| usage.keyspace == keyspace).expect("every keyspace is listed");
        (found.entries, found.key_bytes, found.value_bytes)
    };
    assert_eq!(usage.len(), Keyspace::ALL.len());
    assert_eq!(of(Keyspace::Documents), (1, 4, 5));
    // `i`, a u16 length, the key, a u32 index.
    assert_eq!(of(Keyspace::Increments), (2, 2 * 10, 4));
    // A journal page of one entry: its encoding byte (plain, for so few bytes), the entry's
    // length (one byte) and its bytes.
    assert_eq!(of(Keyspace::Log), (1, 25, 9));
    assert_eq!(of(Keyspace::Feed), (1, 9, 4));
    assert_eq!(of(Keyspace::Audit), (1, 9, 2));
    assert_eq!(of(Keyspace::Conflicts), (0, 0, 0));
    // The format marker is the one meta entry of a new store.
    assert_eq!(of(Keyspace::Meta).0, 1);
}

/// Feed entries `from..=to` with distinct values.
fn feed_values(from: u64, to: u64) -> Vec<(u64, Vec<u8>)> {
    (from..=to).map(|sequence| (sequence, format!("feed entry {sequence}").into_bytes())).collect()
}

fn entries_of(store: &Store, keyspace: Keyspace) -> u64 {
    store.usage().expect("usage").into_iter().find(|usage| usage.keyspace == keyspace).map_or(0, |usage| usage.entries)
}

#[test]
fn a_commit_stores_its_journal_entries_in_a_few_pages() {
    let (_temporary, directory) = folder();
    let store = Store::open(&directory).expect("create");
    // One commit of 300 entries and one of 5: three pages, then one more.
    commit(&store, |batch| {
        for (sequence, value) in feed_values(1, 300) {
            batch.put_feed(sequence, &value);
        }
    });
    assert_eq!(entries_of(&store, Keyspace::Feed), 3);
    commit(&store, |batch| {
        for (sequence, value) in feed_values(301, 305) {
            batch.put_feed(sequence, &value);
        }
    });
    assert_eq!(entries_of(&store, Keyspace::Feed), 4);
    drop(store);

    let store = Store::open(&directory).expect("reopen");
    let all = feed_values(1, 305);
    // Every start and length, across page boundaries (128, 256, 300).
    for after in [0, 1, 127, 128, 129, 200, 255, 256, 299, 300, 304] {
        for limit in [1, 2, 100, 1000] {
            let expected: Vec<_> = all.iter().filter(|(sequence, _)| *sequence > after).take(limit).cloned().collect();
            assert_eq!(store.feed_range(after, limit).expect("read"), expected, "after {after}, limit {limit}");
        }
    }
    assert_eq!(store.feed_range(305, 10).expect("read"), vec![]);
    assert_eq!(store.feed_last().expect("read"), all.last().cloned());
}

#[test]
fn audit_entries_are_removed_replaced_and_trimmed_inside_their_pages() {
    let (_temporary, directory) = folder();
    let store = Store::open(&directory).expect("create");
    let value = |sequence: u64, version: &str| format!("audit {sequence} {version}").into_bytes();
    commit(&store, |batch| {
        for sequence in 1..=200 {
            batch.put_audit(sequence, &value(sequence, "first"));
        }
    });
    // Remove one in the middle of the first page, replace one in the second, and append.
    commit(&store, |batch| {
        batch.remove_audit(50);
        batch.put_audit(150, &value(150, "second"));
        batch.put_audit(201, &value(201, "first"));
    });
    assert_eq!(store.audit_entry(50).expect("read"), None);
    assert_eq!(store.audit_entry(49).expect("read"), Some(value(49, "first")));
    assert_eq!(store.audit_entry(51).expect("read"), Some(value(51, "first")));
    assert_eq!(store.audit_entry(150).expect("read"), Some(value(150, "second")));
    assert_eq!(
        store.audit_range(48, 3).expect("read"),
        vec![(49, value(49, "first")), (51, value(51, "first"))]
            .into_iter()
            .chain([(52, value(52, "first"))])
            .collect::<Vec<_>>()
    );
    assert_eq!(store.audit_last().expect("read"), Some((201, value(201, "first"))));

    // A trim that ends inside a page keeps the rest of it.
    let mut batch = WriteBatch::default();
    batch.trim_audit_through(140);
    store.commit(batch).expect("trim");
    assert_eq!(store.audit_entry(140).expect("read"), None);
    let rest = store.audit_range(0, 1000).expect("read");
    assert_eq!(rest.first(), Some(&(141, value(141, "first"))));
    assert_eq!(rest.len(), 61);
    assert!(rest.contains(&(150, value(150, "second"))));
    // And one past the end empties the journal.
    let mut batch = WriteBatch::default();
    batch.trim_audit_through(u64::MAX);
    store.commit(batch).expect("trim all");
    assert_eq!(store.audit_last().expect("read"), None);
    assert_eq!(entries_of(&store, Keyspace::Audit), 0);
}

#[test]
fn a_feed_trim_keeps_what_follows_it_and_appends_in_the_same_batch() {
    let (_temporary, directory) = folder();
    let value = |sequence: u64| format!("feed entry {sequence} {}", "x".repeat((sequence % 7) as usize)).into_bytes();
    {
        let store = Store::open(&directory).expect("create");
        commit(&store, |batch| {
            for sequence in 1..=300 {
                batch.put_feed(sequence, &value(sequence));
            }
        });
        // Retention trims through 120 while the same batch appends 301.
        commit(&store, |batch| {
            batch.trim_feed_through(120);
            batch.put_feed(301, &value(301));
        });
        let rest = store.feed_range(0, 1000).expect("read");
        assert_eq!(rest.first(), Some(&(121, value(121))));
        assert_eq!(rest.len(), 181);
        assert_eq!(store.feed_last().expect("read"), Some((301, value(301))));
    }
    // The trim is durable: a reopened store starts at the same entry.
    let store = Store::open(&directory).expect("reopen");
    assert_eq!(store.feed_range(0, 1).expect("read"), vec![(121, value(121))]);
    let mut batch = WriteBatch::default();
    batch.trim_feed_through(u64::MAX);
    store.commit(batch).expect("trim all");
    assert_eq!(store.feed_last().expect("read"), None);
    assert_eq!(entries_of(&store, Keyspace::Feed), 0);
}

#[test]
fn each_origin_has_its_own_log_pages_and_holes_are_filled_in_place() {
    let (_temporary, directory) = folder();
    let store = Store::open(&directory).expect("create");
    let value = |origin: u8, sequence: u64| format!("{origin}:{sequence}").into_bytes();
    // Origin B's sequences continue origin A's numbers: the pages must not mix them.
    commit(&store, |batch| {
        for sequence in 1..=200 {
            batch.put_log(&ORIGIN_A, sequence, &value(1, sequence));
        }
        for sequence in 201..=203 {
            batch.put_log(&ORIGIN_B, sequence, &value(2, sequence));
        }
    });
    // A hole at 201, filled by a later commit, as a change relayed late does.
    commit(&store, |batch| {
        for sequence in 202..=210 {
            batch.put_log(&ORIGIN_A, sequence, &value(1, sequence));
        }
    });
    assert_eq!(store.log_entry(&ORIGIN_A, 201).expect("read"), None);
    commit(&store, |batch| batch.put_log(&ORIGIN_A, 201, &value(1, 201)));
    let expected_a: Vec<(u64, Vec<u8>)> = (1..=210).map(|sequence| (sequence, value(1, sequence))).collect();
    assert_eq!(store.log_range(&ORIGIN_A, 0, 1000).expect("read"), expected_a);
    assert_eq!(store.log_range(&ORIGIN_A, 199, 3).expect("read"), expected_a[198..201].to_vec());
    let expected_b: Vec<(u64, Vec<u8>)> = (201..=203).map(|sequence| (sequence, value(2, sequence))).collect();
    assert_eq!(store.log_range(&ORIGIN_B, 1, 1000).expect("read"), expected_b);
    assert_eq!(store.log_entry(&ORIGIN_B, 202).expect("read"), Some(value(2, 202)));

    // Trimming the oldest 150 of origin A, one removal each, as retention does.
    commit(&store, |batch| {
        for sequence in 1..=150 {
            batch.remove_log(&ORIGIN_A, sequence);
        }
    });
    assert_eq!(store.log_range(&ORIGIN_A, 0, 1000).expect("read"), expected_a[150..].to_vec());
    assert_eq!(store.log_entry(&ORIGIN_A, 150).expect("read"), None);
    assert_eq!(store.log_range(&ORIGIN_B, 0, 1000).expect("read"), expected_b);
    assert!(entries_of(&store, Keyspace::Log) <= 4, "a few pages: {}", entries_of(&store, Keyspace::Log));
}

#[test]
fn a_damaged_journal_page_is_an_error_and_appends_go_on() {
    let (_temporary, directory) = folder();
    let store = Store::open(&directory).expect("create");
    commit(&store, |batch| batch.put_feed(1, b"first"));
    drop(store);
    // Page 2 is plain and says its one entry is 9 bytes long, and holds 2.
    insert_raw_entries(&directory, &[(&[b'F', 0, 0, 0, 0, 0, 0, 0, 2], &[0, 9, 1, 2])]);
    let store = Store::open(&directory).expect("open");
    let error = store.feed_range(0, 10).expect_err("a damaged page");
    assert!(matches!(error, ReadError::CorruptValue { keyspace: Keyspace::Feed, .. }), "{error}");
    assert!(error.to_string().contains("longer than the page"), "{error}");
    assert!(store.feed_last().is_err());
    assert_eq!(store.feed_range(0, 1).expect("the page before"), vec![(1, b"first".to_vec())]);
    commit(&store, |batch| batch.put_feed(3, b"third"));
    assert_eq!(store.feed_range(2, 10).expect("past the damage"), vec![(3, b"third".to_vec())]);
    drop(store);
    // Page 4 says it is compressed, and holds no zstd frame.
    insert_raw_entries(&directory, &[(&[b'F', 0, 0, 0, 0, 0, 0, 0, 4], &[1, 0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3])]);
    let store = Store::open(&directory).expect("open");
    let error = store.feed_range(3, 10).expect_err("a damaged compressed page");
    assert!(error.to_string().contains("compressed entries are damaged"), "{error}");
    assert!(store.feed_last().is_err());
    commit(&store, |batch| batch.put_feed(5, b"fifth"));
    assert_eq!(store.feed_range(4, 10).expect("past the damage"), vec![(5, b"fifth".to_vec())]);
}

/// A page's entries as format 2 stored them: each as its length (one byte here) and its bytes.
fn format_2_page(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut page = Vec::new();
    for entry in entries {
        page.push(u8::try_from(entry.len()).expect("a short entry"));
        page.extend_from_slice(entry);
    }
    page
}

#[test]
fn a_format_2_store_has_its_pages_stored_again_compressed_and_resumes_where_it_stopped() {
    let (_temporary, directory) = folder();
    drop(Store::open(&directory).expect("create"));
    let mut raw: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut marker = b"concord-store".to_vec();
    marker.extend_from_slice(&2u32.to_be_bytes());
    raw.push((b"mformat".to_vec(), marker));
    // 600 feed pages of ten entries (more than two migration chunks of 256 pages).
    let feed = feed_values(1, 6000);
    for page in feed.chunks(10) {
        let values: Vec<Vec<u8>> = page.iter().map(|(_, value)| value.clone()).collect();
        raw.push((numbered(b'F', page[0].0), format_2_page(&values)));
    }
    // A migration that stopped after feed page 311: the audit trail and 32 pages are already
    // stored again (here plain, format 3's byte 0 in front), and the progress entry says so.
    // Prefixing them a second time would read as damage.
    let audit: Vec<Vec<u8>> = (1..=4u64).map(|sequence| format!("audit {sequence}").into_bytes()).collect();
    let mut stopped = vec![0];
    stopped.extend(format_2_page(&audit));
    raw.push((numbered(b'A', 1), stopped));
    for (_, value) in
        raw.iter_mut().filter(|(key, _)| key[0] == b'F' && key.as_slice() <= numbered(b'F', 311).as_slice())
    {
        value.insert(0, 0);
    }
    raw.push((b"mformat-2-pages-done-through".to_vec(), numbered(b'F', 311)));
    let log_a: Vec<(u64, Vec<u8>)> =
        (1..=40u64).map(|sequence| (sequence, format!("a change of origin a, {sequence}").into_bytes())).collect();
    raw.push((
        log_key(b'L', &ORIGIN_A, 1),
        format_2_page(&log_a.iter().map(|(_, value)| value.clone()).collect::<Vec<_>>()),
    ));
    raw.push((log_key(b'L', &ORIGIN_B, 7), format_2_page(&[b"b7".to_vec()])));
    let borrowed: Vec<(&[u8], &[u8])> = raw.iter().map(|(key, value)| (key.as_slice(), value.as_slice())).collect();
    insert_raw_entries(&directory, &borrowed);

    let store = Store::open(&directory).expect("open and migrate");
    assert_eq!(store.feed_range(0, 10_000).expect("read"), feed);
    let audit_read: Vec<(u64, Vec<u8>)> = (1..=4u64).zip(audit).collect();
    assert_eq!(store.audit_range(0, 10).expect("read"), audit_read);
    assert_eq!(store.log_range(&ORIGIN_A, 0, 100).expect("read"), log_a);
    assert_eq!(store.log_range(&ORIGIN_B, 0, 100).expect("read"), vec![(7, b"b7".to_vec())]);
    commit(&store, |batch| batch.put_feed(6001, b"new"));
    assert_eq!(store.feed_last().expect("read"), Some((6001, b"new".to_vec())));
    drop(store);

    let db = sled::open(&directory).expect("open with sled");
    let mut current = b"concord-store".to_vec();
    current.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    assert_eq!(db.get(b"mformat").expect("read").as_deref(), Some(current.as_slice()));
    assert_eq!(db.get(b"mformat-2-pages-done-through").expect("read"), None);
    // The pages the migration stored again are compressed (byte 1), the 32 it had done before
    // it stopped are as they were (byte 0), and so is the log page of one short entry.
    let first_bytes: Vec<(u8, u8)> =
        db.iter().map(|entry| entry.expect("read")).map(|(key, value)| (key[0], value[0])).collect();
    let count = |prefix: u8, encoding: u8| first_bytes.iter().filter(|found| **found == (prefix, encoding)).count();
    assert_eq!((count(b'F', 1), count(b'F', 0)), (568, 33), "the page of entry 6001 is short, so plain");
    assert_eq!((count(b'L', 1), count(b'L', 0)), (1, 1));
    assert_eq!(count(b'A', 0), 1);
}

/// A raw key of a keyspace numbered by a u64 alone: `prefix` + the number (BE).
fn numbered(prefix: u8, number: u64) -> Vec<u8> {
    let mut key = vec![prefix];
    key.extend_from_slice(&number.to_be_bytes());
    key
}

/// A raw log key: `prefix` (format 1's `l`, or `L`) + origin + sequence (BE).
fn log_key(prefix: u8, origin: &[u8; 16], sequence: u64) -> Vec<u8> {
    let mut key = vec![prefix];
    key.extend_from_slice(origin);
    key.extend_from_slice(&sequence.to_be_bytes());
    key
}

#[test]
fn a_format_1_store_has_its_journals_moved_into_pages() {
    let (_temporary, directory) = folder();
    drop(Store::open(&directory).expect("create"));
    // Format 1: the marker says 1, and each feed, audit and log entry has a key of its own under
    // `f`, `a` and `l`. 5,000 feed entries take two migration chunks.
    let mut marker = b"concord-store".to_vec();
    marker.extend_from_slice(&1u32.to_be_bytes());
    let feed: Vec<(Vec<u8>, Vec<u8>)> =
        feed_values(1, 5000).into_iter().map(|(sequence, value)| (numbered(b'f', sequence), value)).collect();
    let audit: Vec<(Vec<u8>, Vec<u8>)> = [3u64, 4, 9]
        .iter()
        .map(|&sequence| (numbered(b'a', sequence), format!("audit {sequence}").into_bytes()))
        .collect();
    // Log entries of two origins whose sequences run on from one to the other.
    let log: Vec<(Vec<u8>, Vec<u8>)> = (1..=3u64)
        .map(|sequence| (log_key(b'l', &ORIGIN_A, sequence), format!("a{sequence}").into_bytes()))
        .chain((4..=5u64).map(|sequence| (log_key(b'l', &ORIGIN_B, sequence), format!("b{sequence}").into_bytes())))
        .collect();
    let mut raw: Vec<(&[u8], &[u8])> = vec![(b"mformat", &marker)];
    raw.extend(feed.iter().chain(&audit).chain(&log).map(|(key, value)| (key.as_slice(), value.as_slice())));
    insert_raw_entries(&directory, &raw);

    let store = Store::open(&directory).expect("open and migrate");
    assert_eq!(store.feed_range(0, 10_000).expect("read"), feed_values(1, 5000));
    assert_eq!(store.feed_range(4095, 2).expect("read"), feed_values(4096, 4097));
    let audit_read: Vec<(u64, Vec<u8>)> =
        [3u64, 4, 9].iter().map(|&sequence| (sequence, format!("audit {sequence}").into_bytes())).collect();
    assert_eq!(store.audit_range(0, 10).expect("read"), audit_read);
    let log_a: Vec<(u64, Vec<u8>)> =
        (1..=3u64).map(|sequence| (sequence, format!("a{sequence}").into_bytes())).collect();
    let log_b: Vec<(u64, Vec<u8>)> =
        (4..=5u64).map(|sequence| (sequence, format!("b{sequence}").into_bytes())).collect();
    assert_eq!(store.log_range(&ORIGIN_A, 0, 10).expect("read"), log_a);
    assert_eq!(store.log_range(&ORIGIN_B, 0, 10).expect("read"), log_b);
    assert_eq!(entries_of(&store, Keyspace::Log), 2);
    // Every entry moved: `usage` refuses keys outside the keyspaces, so none is left under `f`,
    // `a` or `l`; 5,000 consecutive entries in chunks of 4,096 make 32 + 8 pages.
    assert_eq!(entries_of(&store, Keyspace::Feed), 40);
    assert_eq!(entries_of(&store, Keyspace::Audit), 2);
    commit(&store, |batch| batch.put_feed(5001, b"new"));
    drop(store);

    let store = Store::open(&directory).expect("reopen as this build's format");
    assert_eq!(store.feed_last().expect("read"), Some((5001, b"new".to_vec())));
    drop(store);
    let db = sled::open(&directory).expect("open with sled");
    let mut current = b"concord-store".to_vec();
    current.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    assert_eq!(db.get(b"mformat").expect("read").as_deref(), Some(current.as_slice()));
}

/// A put (`Some`) or a removal of entry `.0.1` of journal `.0.0`.
type JournalOperation = ((u8, u64), Option<Vec<u8>>);

/// A small deterministic generator (xorshift), so that a failing sequence is the same every run.
struct Sequence(u64);

impl Sequence {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

#[test]
fn journals_read_as_a_model_of_their_operations_through_appends_removals_replacements_and_trims() {
    // Commits append to the audit trail and to two origins' logs, and now and then remove or
    // replace an entry (the last one too), trim, or fill a hole below the end: every case where
    // the store's memory of each journal's last entry (`journal::Tails`) must be forgotten or
    // moved. After each commit every journal reads as the model says, through this handle and
    // through one opened afresh at the end.
    let (_temporary, directory) = folder();
    let mut model: std::collections::BTreeMap<(u8, u64), Vec<u8>> = std::collections::BTreeMap::new();
    let mut random = Sequence(0x9e37_79b9_7f4a_7c15);
    let mut next = [1_u64; 3];
    let value = |journal: u8, number: u64, round: u64| {
        format!("{journal}/{number}/{round} {}", "v".repeat((number % 90) as usize)).into_bytes()
    };
    let read = |store: &Store, journal: u8| -> Vec<(u64, Vec<u8>)> {
        match journal {
            0 => store.audit_range(0, usize::MAX).expect("audit"),
            1 => store.log_range(&ORIGIN_A, 0, usize::MAX).expect("log A"),
            _ => store.log_range(&ORIGIN_B, 0, usize::MAX).expect("log B"),
        }
    };
    let expected = |model: &std::collections::BTreeMap<(u8, u64), Vec<u8>>, journal: u8| -> Vec<(u64, Vec<u8>)> {
        model.range((journal, 0)..=(journal, u64::MAX)).map(|((_, number), value)| (*number, value.clone())).collect()
    };
    {
        let store = Store::open(&directory).expect("create");
        for round in 0..300_u64 {
            let mut batch = WriteBatch::default();
            // A trim applies before the batch's other operations on its journal, whatever their
            // order: the model applies them after it.
            let mut operations: Vec<JournalOperation> = Vec::new();
            let mut trim = None;
            for _ in 0..=random.next(4) {
                let journal = random.next(3) as u8;
                let put = |batch: &mut WriteBatch, number: u64, bytes: &[u8]| match journal {
                    0 => batch.put_audit(number, bytes),
                    1 => batch.put_log(&ORIGIN_A, number, bytes),
                    _ => batch.put_log(&ORIGIN_B, number, bytes),
                };
                let remove = |batch: &mut WriteBatch, number: u64| match journal {
                    0 => batch.remove_audit(number),
                    1 => batch.remove_log(&ORIGIN_A, number),
                    _ => batch.remove_log(&ORIGIN_B, number),
                };
                let last = next[journal as usize] - 1;
                match random.next(10) {
                    // Append one or a run.
                    0..=5 => {
                        for _ in 0..=random.next(3) {
                            let number = next[journal as usize];
                            next[journal as usize] += 1 + random.next(2);
                            let bytes = value(journal, number, round);
                            put(&mut batch, number, &bytes);
                            operations.push(((journal, number), Some(bytes)));
                        }
                    }
                    // Remove the last entry, or one below it.
                    6 if last > 0 => {
                        let number = if random.next(2) == 0 { last } else { 1 + random.next(last) };
                        remove(&mut batch, number);
                        operations.push(((journal, number), None));
                    }
                    // Replace or fill in an entry at or below the end.
                    7 if last > 0 => {
                        let number = 1 + random.next(last);
                        let bytes = value(journal, number, round + 1000);
                        put(&mut batch, number, &bytes);
                        operations.push(((journal, number), Some(bytes)));
                    }
                    // Trim the audit trail, now and then all of it.
                    8 if journal == 0 && last > 0 => {
                        let through = if random.next(4) == 0 { u64::MAX } else { random.next(last + 1) };
                        batch.trim_audit_through(through);
                        trim = Some(trim.map_or(through, |earlier: u64| earlier.max(through)));
                    }
                    _ => {}
                }
            }
            store.commit(batch).expect("commit");
            if let Some(through) = trim {
                model.retain(|(other, number), _| *other != 0 || *number > through);
            }
            for (key, value) in operations {
                match value {
                    Some(value) => model.insert(key, value),
                    None => model.remove(&key),
                };
            }
            for journal in 0..3 {
                assert_eq!(read(&store, journal), expected(&model, journal), "journal {journal} after round {round}");
            }
            let last_audit =
                model.range((0, 0)..=(0, u64::MAX)).next_back().map(|((_, number), value)| (*number, value.clone()));
            assert_eq!(store.audit_last().expect("audit last"), last_audit, "the last audit entry after round {round}");
        }
    }
    let reopened = Store::open(&directory).expect("reopen");
    for journal in 0..3 {
        assert_eq!(read(&reopened, journal), expected(&model, journal), "journal {journal} reopened");
    }
}
