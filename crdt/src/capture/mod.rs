//! Change data capture from databases, the pure parts: decoding PostgreSQL's logical replication
//! stream (`pgoutput`) and mapping column values to record fields and back. The connector in the
//! node (`src/connector/`) does the I/O; everything here is driven by tests and fuzzers alone.

pub mod pgoutput;
pub mod values;
