//! Concord's pure core: records as automerge documents (or, for high-rate collections, as yrs
//! maps), collaborative texts as yrs documents, change envelopes, version vectors, hybrid logical
//! clocks, the replication core, HTTP request bodies as record operations, and the rules around
//! records: collection definitions, conflict policies, schema validation, conflict ledger
//! entries and the hash-chained audit trail.
//!
//! Nothing in this crate touches a socket, the disk or the clock: time and identities are
//! arguments, so every behaviour here can be driven deterministically by tests and fuzzers.
//! `cargo tree -p concord-crdt -e normal` shows no tokio, sled or quinn, and a test checks it.

pub mod audit;
pub mod body;
pub mod canonical;
pub mod capture;
pub mod clock;
pub mod collection;
pub mod envelope;
pub mod identity;
pub mod json;
pub mod key;
pub mod ledger;
pub mod map_record;
pub mod memory;
pub mod policy;
pub mod record;
pub mod replica;
pub mod schema;
pub mod text;
pub mod version_vector;
