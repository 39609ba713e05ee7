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

/// mimalloc for every binary that links the node: the `concord` binary, its tests and benches.
/// The engine thread allocates and frees many small automerge buffers per write, and with
/// glibc's allocator that was about a quarter of its time; mimalloc made the engine's writes
/// 37–48% faster (BENCHMARKS.md, session 7). See also [`tune_memory`].
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process; `main` calls it first thing.
///
/// mimalloc reserves large aligned arenas, and where the kernel backs anonymous memory with
/// huge pages whenever it can (`/sys/kernel/mm/transparent_hugepage/enabled` = `always`, as on
/// these machines) every first touch of an arena region makes 2 MiB resident: a node started at
/// 55 MB instead of 12 MB, and peaked 50–90 MB higher under load (session 7, `tests/memory.rs`
/// and `tests/edge.rs`). A failure (an old kernel) only costs that memory: `main` logs it once
/// logging is set up and goes on.
pub fn tune_memory() -> std::io::Result<()> {
    rustix::thread::disable_transparent_huge_pages(true).map_err(std::io::Error::from)
}
