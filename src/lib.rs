//! The Concord node: configuration, the record engine (cache, group commit, change feed), the
//! HTTP API, the CLI and its HTTP client. The `concord` binary in `main.rs` is a thin shell over
//! this library, so benches and tests can drive the engine directly.

pub mod api;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod connector;
pub mod demo;
pub mod engine;
pub mod membership;
pub mod mesh;
pub mod metrics;
pub mod node;
pub mod replication;
