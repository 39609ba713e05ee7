//! The store's errors, one enum per operation: opening, reading and writing.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use crate::keys::Keyspace;

/// Why [`Store::open`](crate::Store::open) failed.
#[derive(Debug, Error)]
pub enum OpenError {
    /// The path exists and is not a folder.
    #[error("{} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    /// The folder or one of sled's files in it could not be created or read.
    #[error("could not create or read the store folder {}: {source}", path.display())]
    Directory { path: PathBuf, source: io::Error },
    /// The folder holds something other than a Concord store.
    #[error("{} is not a Concord store ({reason})", path.display())]
    NotAStore { path: PathBuf, reason: &'static str },
    /// The store was written by another version of this crate.
    #[error("{} was written by store format {found}, this build reads {supported}", path.display())]
    Version { path: PathBuf, found: u32, supported: u32 },
    /// sled refused to open the folder (locked by another process, unreadable, bad `conf`, ...).
    #[error("sled could not open {}: {source}", path.display())]
    Sled { path: PathBuf, source: sled::Error },
    /// The files are damaged: sled reported corruption or panicked, or the format marker is garbled.
    #[error("{} is corrupt: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
}

/// Why a read failed.
#[derive(Debug, Error)]
pub enum ReadError {
    /// sled returned an error.
    #[error("sled could not read: {0}")]
    Sled(#[from] sled::Error),
    /// A key on disk does not have the shape its keyspace requires.
    #[error("corrupt key in the {keyspace} keyspace: {} bytes {key:02x?}", key.len())]
    Corrupt { keyspace: Keyspace, key: Vec<u8> },
    /// A value on disk does not have the shape its keyspace requires (a journal page).
    #[error("corrupt value in the {keyspace} keyspace under key {key:02x?}: {reason}")]
    CorruptValue { keyspace: Keyspace, key: Vec<u8>, reason: &'static str },
    /// sled panicked, which it does on some damaged files.
    #[error("sled panicked while reading (the store is probably damaged): {message}")]
    Panicked { message: String },
}

/// Why [`Store::commit`](crate::Store::commit) failed. Unless noted, nothing of the batch was applied.
#[derive(Debug, Error)]
pub enum WriteError {
    /// A document key is longer than [`MAX_DOCUMENT_KEY`](crate::MAX_DOCUMENT_KEY).
    #[error("document key is {length} bytes, the most the store accepts is {maximum}")]
    KeyTooLong { length: usize, maximum: usize },
    /// The meta name is the store's own format marker.
    #[error("meta name {name:?} is reserved by the store")]
    ReservedMeta { name: String },
    /// Reading the journal pages the batch changes failed.
    #[error("could not read the journal pages the batch changes: {0}")]
    Read(#[from] ReadError),
    /// sled could not apply the batch.
    #[error("sled could not apply the batch: {0}")]
    Apply(#[source] sled::Error),
    /// The batch was applied, and is visible to readers, but sled could not make it durable.
    #[error("sled applied the batch but could not flush it to disk: {0}")]
    Flush(#[source] sled::Error),
    /// sled panicked, which it does on some damaged files. The batch may have been applied.
    #[error("sled panicked while writing (the store is probably damaged): {message}")]
    Panicked { message: String },
}
