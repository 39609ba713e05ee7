//! Damaged folders: a real store is written, closed, damaged on disk, and opened again. Opening must
//! either fail with an error naming the folder, or return a prefix of what was committed; never
//! panic, never hang.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use store::{ReadError, Store, WriteBatch};

/// Batches written before the store is closed and reopened (which makes sled write a snapshot).
const FIRST_BATCHES: u64 = 40;
/// Batches written after the reopen.
const ALL_BATCHES: u64 = 80;
/// The batch that also writes a value large enough for sled to keep it in a file under `blobs/`.
const LARGE_BATCH: u64 = 20;
/// Long enough for sled on a slow machine; a hang fails the test instead of blocking it.
const DEADLINE: Duration = Duration::from_secs(60);

fn origin(batch: u64) -> [u8; 16] {
    [(batch % 2) as u8 + 1; 16]
}

fn document_key(batch: u64) -> Vec<u8> {
    format!("doc{}", batch % 7).into_bytes()
}

fn value(batch: u64, what: u8) -> Vec<u8> {
    let length = if what == b'L' { 200_000 } else { 50 + (batch as usize * 13) % 200 };
    (0..length).map(|at| what ^ (batch as u8).wrapping_add(at as u8)).collect()
}

/// Batch `batch` (from 1): one entry in every keyspace, and a large value (a sled blob) in batch 20.
fn batch(batch: u64) -> WriteBatch {
    let mut write = WriteBatch::default();
    write.put_feed(batch, &value(batch, b'f'));
    write.put_log(&origin(batch), batch, &value(batch, b'l'));
    write.put_document(&document_key(batch), &value(batch, b'd'));
    write.put_increment(&document_key(batch), batch as u32, &value(batch, b'i'));
    write.put_meta("batches", &batch.to_be_bytes());
    if batch == LARGE_BATCH {
        write.put_document(b"large", &value(batch, b'L'));
    }
    write
}

/// Writes batches 1..=ALL_BATCHES, closing and reopening the store halfway.
fn populate(directory: &Path) {
    for (first, last) in [(1, FIRST_BATCHES), (FIRST_BATCHES + 1, ALL_BATCHES)] {
        let store = Store::open(directory).expect("open the store to populate it");
        for number in first..=last {
            store.commit(batch(number)).expect("commit a batch");
        }
    }
}

/// Checks that the store holds exactly batches 1..=k for some k, and returns k.
fn committed_prefix(store: &Store) -> Result<u64, ReadError> {
    let Some(counter) = store.meta("batches")? else {
        assert!(store.feed_range(0, usize::MAX)?.is_empty());
        return Ok(0);
    };
    let count = u64::from_be_bytes(counter.as_slice().try_into().expect("an 8-byte counter"));
    assert!(count <= ALL_BATCHES, "counter {count} beyond what was written");

    let feed = store.feed_range(0, usize::MAX)?;
    let expected: Vec<_> = (1..=count).map(|number| (number, value(number, b'f'))).collect();
    assert_eq!(feed, expected, "the feed is not the first {count} batches");

    for side in 1..=2 {
        let log = store.log_range(&origin(side), 0, usize::MAX)?;
        let expected: Vec<_> = (1..=count)
            .filter(|number| origin(*number) == origin(side))
            .map(|number| (number, value(number, b'l')))
            .collect();
        assert_eq!(log, expected, "the log of origin {side} is not a prefix");
    }

    for slot in 0..7 {
        let key = document_key(slot);
        let numbers: Vec<u64> = (1..=count).filter(|number| document_key(*number) == key).collect();
        let document = store.document(&key)?;
        match numbers.last() {
            None => assert_eq!(document, None),
            Some(last) => {
                let document = document.expect("a committed document");
                assert_eq!(document.value, value(*last, b'd'));
                let increments: Vec<_> = numbers.iter().map(|number| (*number as u32, value(*number, b'i'))).collect();
                assert_eq!(document.increments, increments);
            }
        }
    }
    let large = store.document(b"large")?.map(|document| document.value);
    assert_eq!(large, (count >= LARGE_BATCH).then(|| value(LARGE_BATCH, b'L')));
    Ok(count)
}

/// What opening a damaged folder did.
#[derive(Debug)]
enum Outcome {
    /// `Store::open` failed; the message.
    Refused(String),
    /// The store opened and holds the first `k` batches.
    Prefix(u64),
    /// The store opened, and a read failed; the message.
    ReadFailed(String),
}

/// Opens the folder and reads everything back, on another thread so that a hang fails the test.
fn open_damaged(directory: &Path) -> Outcome {
    let (sender, receiver) = mpsc::channel();
    let path = directory.to_path_buf();
    thread::spawn(move || {
        let outcome = match Store::open(&path) {
            Err(error) => {
                let message = error.to_string();
                assert!(message.contains(&path.display().to_string()), "the error does not name the folder: {message}");
                Outcome::Refused(message)
            }
            Ok(store) => match committed_prefix(&store) {
                Ok(count) => Outcome::Prefix(count),
                Err(error) => Outcome::ReadFailed(error.to_string()),
            },
        };
        let _ = sender.send(outcome);
    });
    match receiver.recv_timeout(DEADLINE) {
        Ok(outcome) => outcome,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("opening {} hangs", directory.display()),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            panic!("opening or reading {} panicked (see above)", directory.display())
        }
    }
}

/// A populated store in a fresh temporary folder.
fn populated() -> (tempfile::TempDir, PathBuf) {
    let temporary = tempfile::tempdir().expect("a temporary folder");
    let directory = temporary.path().join("store");
    populate(&directory);
    (temporary, directory)
}

fn snapshot_file(directory: &Path) -> PathBuf {
    fs::read_dir(directory)
        .expect("list the store")
        .map(|entry| entry.expect("a folder entry").path())
        .find(|path| path.file_name().is_some_and(|name| name.to_string_lossy().starts_with("snap.")))
        .expect("sled wrote a snapshot when the store was reopened")
}

/// The files under `blobs/`, oldest first (sled names them after the log position that wrote them).
fn blob_files(directory: &Path) -> Vec<PathBuf> {
    let mut blobs: Vec<(u64, PathBuf)> = fs::read_dir(directory.join("blobs"))
        .expect("list the blobs")
        .map(|entry| {
            let path = entry.expect("a folder entry").path();
            let position = path
                .file_name()
                .and_then(|name| name.to_str()?.parse().ok())
                .expect("a blob named after a log position");
            (position, path)
        })
        .collect();
    blobs.sort();
    assert!(!blobs.is_empty(), "the large value is kept as a blob");
    blobs.into_iter().map(|(_, path)| path).collect()
}

fn newest_blob(directory: &Path) -> PathBuf {
    blob_files(directory).pop().expect("a blob")
}

/// A small deterministic generator, so that a failing case can be replayed.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The length of `db` without the zeros sled leaves at the end of a segment.
fn data_end(directory: &Path) -> usize {
    let bytes = fs::read(directory.join("db")).expect("read db");
    bytes.iter().rposition(|byte| *byte != 0).map_or(0, |last| last + 1)
}

fn truncate(file: &Path, length: u64) {
    fs::OpenOptions::new().write(true).open(file).and_then(|handle| handle.set_len(length)).expect("truncate a file");
}

/// Overwrites `length` bytes at `at` (or up to the end of the file) with random bytes.
fn garble(file: &Path, at: usize, length: usize, random: &mut Random) {
    let mut bytes = fs::read(file).expect("read a file");
    for byte in bytes.iter_mut().skip(at).take(length) {
        *byte = random.next() as u8;
    }
    fs::write(file, bytes).expect("write a file");
}

fn garble_all(file: &Path, seed: u64) {
    garble(file, 0, usize::MAX, &mut Random(seed));
}

/// Overwrites `count` bytes at `at` with their complement.
fn flip(file: &Path, at: usize, count: usize) {
    let mut bytes = fs::read(file).expect("read a file");
    for byte in bytes.iter_mut().skip(at).take(count) {
        *byte = !*byte;
    }
    fs::write(file, bytes).expect("write a file");
}

/// Populates a store, damages it, opens it again and returns what happened.
fn damaged(damage: impl FnOnce(&Path)) -> Outcome {
    let (_temporary, directory) = populated();
    damage(&directory);
    let outcome = open_damaged(&directory);
    // Whatever sled recovered, or refused, it does the same on the next open.
    let again = open_damaged(&directory);
    assert_eq!(format!("{outcome:?}"), format!("{again:?}"), "a second open differs");
    match &outcome {
        Outcome::ReadFailed(message) => println!("opened, then a read failed: {message}"),
        other => println!("{other:?}"),
    }
    outcome
}

fn assert_refused(outcome: &Outcome, expected: &str) {
    match outcome {
        Outcome::Refused(message) => assert!(message.contains(expected), "{message}"),
        other => panic!("expected an error containing {expected:?}, got {other:?}"),
    }
}

#[test]
fn undamaged_store_reads_back_everything() {
    let (_temporary, directory) = populated();
    for name in ["db", "conf", "blobs"] {
        assert!(directory.join(name).exists(), "sled wrote no {name}");
    }
    snapshot_file(&directory);
    newest_blob(&directory);
    let outcome = open_damaged(&directory);
    assert!(matches!(outcome, Outcome::Prefix(ALL_BATCHES)), "{outcome:?}");
}

#[test]
fn db_truncated_to_zero_is_refused() {
    let outcome = damaged(|directory| truncate(&directory.join("db"), 0));
    assert_refused(&outcome, "is corrupt: sled found corrupted data");
}

#[test]
fn db_removed_is_refused() {
    let outcome = damaged(|directory| fs::remove_file(directory.join("db")).expect("remove db"));
    assert_refused(&outcome, "is not a Concord store");
}

#[test]
fn db_overwritten_with_garbage_is_refused() {
    let outcome = damaged(|directory| garble_all(&directory.join("db"), 1));
    assert_refused(&outcome, "is corrupt: sled found corrupted data");
}

#[test]
fn db_torn_tail_keeps_a_prefix() {
    let outcome = damaged(|directory| truncate(&directory.join("db"), data_end(directory) as u64 - 10));
    assert!(matches!(outcome, Outcome::Prefix(_)), "{outcome:?}");
}

#[test]
fn db_bytes_flipped_in_the_middle_of_the_log() {
    // sled cuts the log at the damaged message and keeps everything before it (a prefix), or
    // refuses the file; either is fine, a panic, a hang or a non-prefix is not.
    damaged(|directory| flip(&directory.join("db"), data_end(directory) / 2, 4));
    damaged(|directory| flip(&directory.join("db"), 10, 4));
}

#[test]
fn conf_truncated_to_zero_is_rewritten_by_sled() {
    let outcome = damaged(|directory| truncate(&directory.join("conf"), 0));
    assert!(matches!(outcome, Outcome::Prefix(ALL_BATCHES)), "{outcome:?}");
}

#[test]
fn conf_damage_is_refused() {
    let outcome = damaged(|directory| garble_all(&directory.join("conf"), 2));
    assert_refused(&outcome, "is corrupt: sled's `conf` file is damaged");
    let outcome = damaged(|directory| flip(&directory.join("conf"), 16, 1));
    assert_refused(&outcome, "is corrupt: sled's `conf` file is damaged");
    let outcome = damaged(|directory| truncate(&directory.join("conf"), 20));
    assert_refused(&outcome, "is corrupt: sled's `conf` file is damaged");
}

#[test]
fn snapshot_damage_is_refused() {
    let outcome = damaged(|directory| truncate(&snapshot_file(directory), 0));
    assert_refused(&outcome, "is corrupt: sled's snapshot file snap.");
    let outcome = damaged(|directory| garble_all(&snapshot_file(directory), 3));
    assert_refused(&outcome, "is corrupt: sled's snapshot file snap.");
    let outcome = damaged(|directory| {
        let snapshot = snapshot_file(directory);
        let length = fs::metadata(&snapshot).expect("the snapshot").len() as usize;
        flip(&snapshot, length / 2, 1);
    });
    assert_refused(&outcome, "is corrupt: sled's snapshot file snap.");
}

#[test]
fn snapshot_removed_is_rebuilt_from_the_log() {
    let outcome = damaged(|directory| fs::remove_file(snapshot_file(directory)).expect("remove"));
    assert!(matches!(outcome, Outcome::Prefix(ALL_BATCHES)), "{outcome:?}");
}

#[test]
fn interrupted_snapshot_write_is_refused() {
    // sled writes `snap.<lsn>.generating`, then renames it; a crash in between leaves a partial
    // file that sled 0.34.7 picks as the newest snapshot.
    let outcome = damaged(|directory| {
        let snapshot = snapshot_file(directory);
        let bytes = fs::read(&snapshot).expect("read the snapshot");
        let mut name = snapshot.into_os_string();
        name.push(".generating");
        fs::write(name, &bytes[..bytes.len() / 2]).expect("write a partial snapshot");
    });
    assert_refused(&outcome, "a snapshot write that was interrupted");
}

#[test]
fn blob_damage_is_refused_or_keeps_a_prefix() {
    // sled checks blobs while replaying the log: a damaged blob ends the replay there (a prefix)
    // or, when the snapshot already points at it, makes sled refuse the store.
    damaged(|directory| truncate(&newest_blob(directory), 0));
    damaged(|directory| garble_all(&newest_blob(directory), 4));
    damaged(|directory| flip(&newest_blob(directory), 5000, 4));
    damaged(|directory| {
        let oldest = blob_files(directory).remove(0);
        fs::remove_file(oldest).expect("remove a blob");
    });
}

/// Random damage to random files; `CONCORD_DAMAGE_CASES` sets how many (default 40) and
/// `CONCORD_DAMAGE_SEED` where to start, to replay a failure.
#[test]
fn random_damage_never_panics_or_hangs() {
    let setting =
        |name: &str, default: u64| std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default);
    let cases = setting("CONCORD_DAMAGE_CASES", 40);
    let start = setting("CONCORD_DAMAGE_SEED", 0);
    for seed in start..start + cases {
        let (_temporary, directory) = populated();
        let mut random = Random(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let file = match random.next() % 5 {
            0 | 1 => directory.join("db"),
            2 => directory.join("conf"),
            3 => snapshot_file(&directory),
            _ => {
                let blobs = blob_files(&directory);
                blobs[random.next() as usize % blobs.len()].clone()
            }
        };
        let end = if file.ends_with("db") {
            data_end(&directory)
        } else {
            fs::metadata(&file).expect("the file").len() as usize
        };
        let at = random.next() as usize % end.max(1);
        let damage = match random.next() % 3 {
            0 => {
                truncate(&file, at as u64);
                "truncated"
            }
            1 => {
                flip(&file, at, 1 + random.next() as usize % 8);
                "flipped"
            }
            _ => {
                let length = 1 + random.next() as usize % 4096;
                garble(&file, at, length, &mut random);
                "garbled"
            }
        };
        let outcome = open_damaged(&directory);
        println!("seed {seed}: {} {damage} at {at} of {end}: {outcome:?}", file.display());
    }
}
