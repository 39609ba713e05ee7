//! Checks of sled's small files (`conf` and the newest `snap.*`) before sled reads them, so that
//! damage to them is reported under the file's name rather than as sled's vaguer errors.

use std::fs;
use std::io;
use std::path::Path;

/// Returns what is wrong with `conf` or the snapshot sled would load, if anything.
pub(crate) fn check(directory: &Path) -> Result<Option<String>, io::Error> {
    if let Some(problem) = check_conf(directory)? {
        return Ok(Some(problem));
    }
    check_snapshot(directory)
}

/// `conf` is text followed by its CRC32 (4 bytes, little-endian). sled rewrites a file of at most
/// 8 bytes; it refuses most damaged ones with a misleading "created using a sled version earlier
/// than 0.29", and only logs a checksum mismatch, running with whatever it parsed.
fn check_conf(directory: &Path) -> Result<Option<String>, io::Error> {
    let bytes = match fs::read(directory.join("conf")) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    if bytes.len() <= 8 || checksum_matches(&bytes, 4) {
        return Ok(None);
    }
    Ok(Some("sled's `conf` file is damaged (checksum mismatch)".to_owned()))
}

/// A snapshot is its content, the content's length (8 bytes) and the content's CRC32 (4 bytes,
/// little-endian). sled loads the snapshot whose path sorts last and refuses a damaged one.
fn check_snapshot(directory: &Path) -> Result<Option<String>, io::Error> {
    let mut newest = None;
    for entry in fs::read_dir(directory)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with("snap.") && !name.ends_with(".in___motion") {
            newest = newest.max(Some(name));
        }
    }
    let Some(name) = newest else {
        return Ok(None);
    };
    let bytes = fs::read(directory.join(&name))?;
    if bytes.len() > 12 && checksum_matches(&bytes, 12) {
        return Ok(None);
    }
    // sled writes `snap.<lsn>.generating`, syncs it and renames it; it writes snapshots only while
    // opening, and picks a leftover `.generating` file as the newest snapshot.
    let interrupted = if name.ends_with(".generating") { "; it is a snapshot write that was interrupted" } else { "" };
    Ok(Some(format!("sled's snapshot file {name} is damaged ({} bytes, checksum mismatch{interrupted})", bytes.len())))
}

/// Whether the CRC32 in the last four bytes matches the bytes before the last `trailer` bytes.
fn checksum_matches(bytes: &[u8], trailer: usize) -> bool {
    let Some(content) = bytes.len().checked_sub(trailer).and_then(|end| bytes.get(..end)) else {
        return false;
    };
    let stored = bytes
        .len()
        .checked_sub(4)
        .and_then(|start| bytes.get(start..))
        .and_then(|tail| <[u8; 4]>::try_from(tail).ok())
        .map(u32::from_le_bytes);
    stored == Some(crc32(content))
}

/// CRC-32 (IEEE), the checksum sled uses (through `crc32fast`).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0_u32;
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn checksum_needs_room_for_the_trailer() {
        assert!(!checksum_matches(b"", 4));
        assert!(!checksum_matches(b"abc", 12));
        let mut conf = b"version: 0.34\n".to_vec();
        let crc = crc32(&conf);
        conf.extend_from_slice(&crc.to_le_bytes());
        assert!(checksum_matches(&conf, 4));
    }
}
