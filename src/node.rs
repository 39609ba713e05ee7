//! Running a node: open the store, start the engine, serve the API, and shut down gracefully on
//! SIGINT or SIGTERM (or when the engine stops after a storage failure).

use std::num::NonZeroUsize;
use std::sync::Arc;

use anyhow::Context;
use axum::serve::{Listener, ListenerExt};
use crdt::text::TextLimits;
use store::Store;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{self, AppParts, AppState};
use crate::config::NodeConfig;
use crate::engine::{self, EngineSettings};
use crate::metrics::Metrics;

/// The file in the data directory that holds the API's bound address, written once the API
/// listens, so scripts and tests that start a node on port 0 can find it.
pub const API_ADDRESS_FILE: &str = "api.addr";
/// Likewise for the peer (QUIC) address, when the node replicates.
pub const PEER_ADDRESS_FILE: &str = "peer.addr";

/// Runs a node until SIGINT or SIGTERM.
pub async fn run(config: NodeConfig) -> anyhow::Result<()> {
    run_until(config, async {
        let signal = shutdown_signal().await;
        tracing::info!(signal, "shutting down");
    })
    .await
}

/// Runs a node until `stop` resolves (or the engine stops after a storage failure).
pub async fn run_until(config: NodeConfig, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let data_dir = config.data_dir.clone();
    let cache_bytes = config.store_cache_bytes;
    let store = tokio::task::spawn_blocking(move || Store::open_with_cache(&data_dir, cache_bytes))
        .await
        .context("store opening task")?
        .with_context(|| format!("opening the store in {}", config.data_dir.display()))?;
    let metrics = Arc::new(Metrics::default());
    let settings = EngineSettings {
        name: config.name.clone(),
        cache_documents: NonZeroUsize::new(config.cache_documents).unwrap_or(NonZeroUsize::MIN),
        workers: config.write_workers,
        text_limits: TextLimits::default(),
        replication: crdt::replica::Settings::default(),
        log_retention: config.log_retention,
        yrs_collections: config.yrs_collections.iter().cloned().collect(),
        audit_retention: config.audit_retention,
        feed_retention: config.feed_retention,
    };
    let (engine, engine_thread) = engine::start(store, settings, metrics.clone()).context("starting the engine")?;
    let identity = engine.identity.clone();
    tracing::info!(node = %identity.node, name = %identity.name, origin = %identity.origin, "node identity");

    let (stop_sender, stop) = watch::channel(false);
    let mesh = match &config.mesh {
        Some(mesh_config) => {
            let mesh = crate::mesh::start(mesh_config, &engine, &identity, metrics.clone(), stop.clone()).await?;
            write_address_file(&config.data_dir, PEER_ADDRESS_FILE, mesh.endpoint.local_address())?;
            Some(mesh)
        }
        None => None,
    };

    let listener = TcpListener::bind(config.listen_api)
        .await
        .with_context(|| format!("binding the API to {}", config.listen_api))?;
    let address = listener.local_addr().context("reading the API address")?;
    if config.tokens.is_empty() {
        tracing::warn!(%address, "no API tokens configured: serving on loopback only, without authentication");
    }
    write_address_file(&config.data_dir, API_ADDRESS_FILE, address)?;
    tracing::info!("API listening on http://{address}");

    let connectors = crate::connector::Connectors::start(engine.clone(), config.connectors.clone())
        .await
        .context("starting the connectors")?;
    let state = AppState::new(AppParts {
        connectors: connectors.clone(),
        engine: engine.clone(),
        metrics,
        tokens: Arc::new(config.tokens.clone()),
        shutdown: stop.clone(),
        transport: mesh.as_ref().map(|mesh| mesh.endpoint.clone()),
    });
    let app = api::router(state, config.body_bytes_max);
    // Started once nothing above can fail: it holds an engine handle until the node stops.
    let retention_ticker = tokio::spawn(retention_ticks(engine.clone(), stop.clone()));
    let mut server_stop = stop.clone();
    let server = tokio::spawn(async move {
        axum::serve(without_delay(listener), app)
            .with_graceful_shutdown(async move {
                let _ = server_stop.wait_for(|&stopping| stopping).await;
            })
            .await
    });

    let mut engine_done = tokio::task::spawn_blocking(move || engine_thread.join());
    let mut engine_result = None;
    tokio::select! {
        () = shutdown => {}
        result = &mut engine_done => engine_result = Some(result),
    }
    stop_sender.send_replace(true);
    connectors.shutdown().await;
    drop(connectors);
    if let Some(mesh) = &mesh {
        mesh.shutdown().await;
    }
    server.await.context("API server task")?.context("API server")?;
    // It holds an engine handle; the engine ends once every handle is gone.
    let _ = retention_ticker.await;
    drop(engine);
    let result = match engine_result {
        Some(result) => result,
        None => engine_done.await,
    };
    match result.context("engine task")? {
        Ok(Ok(())) => {
            tracing::info!("stopped; every acknowledged write is durable");
            Ok(())
        }
        Ok(Err(error)) => Err(error).context("the engine stopped"),
        Err(_) => anyhow::bail!("the engine thread panicked"),
    }
}

/// How often the engine is asked to trim the audit trail and the feed (it trims only when due).
const RETENTION_TICK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Asks the engine for its periodic retention work until the node stops.
async fn retention_ticks(engine: engine::EngineHandle, mut stop: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(RETENTION_TICK_INTERVAL);
    loop {
        tokio::select! {
            _ = interval.tick() => {
                if engine.submit(|engine| engine.retention_tick()).await.is_err() {
                    return;
                }
            }
            () = stopped(&mut stop) => return,
        }
    }
}

/// Resolves once the node is stopping (or the stop signal is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|&stopping| stopping).await;
}

/// Writes `address` to `name` in the data directory, atomically (readers never see half).
fn write_address_file(data_dir: &std::path::Path, name: &str, address: std::net::SocketAddr) -> anyhow::Result<()> {
    let path = data_dir.join(name);
    let temporary = data_dir.join(format!("{name}.tmp"));
    std::fs::write(&temporary, address.to_string()).with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, &path).with_context(|| format!("writing {}", path.display()))
}

/// The API's connections with TCP_NODELAY. Without it, a change-feed line written while the
/// previous one is unacknowledged waits for the client's delayed ACK (Nagle's algorithm): this
/// put about 20 ms on every replicated write's way to a feed reader on loopback (BENCHMARKS.md,
/// session 8).
fn without_delay(listener: TcpListener) -> impl Listener<Io = tokio::net::TcpStream, Addr = std::net::SocketAddr> {
    listener.tap_io(|stream| {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY on an API connection");
        }
    })
}

async fn shutdown_signal() -> &'static str {
    let interrupt = tokio::signal::ctrl_c();
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(terminate) => terminate,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the node");
            let _ = interrupt.await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = interrupt => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn api_connections_are_accepted_without_nagle_s_delay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding on loopback");
        let address = listener.local_addr().expect("the bound address");
        let mut listener = without_delay(listener);
        let client = tokio::net::TcpStream::connect(address).await.expect("connecting");
        let (accepted, _) = listener.accept().await;
        assert!(accepted.nodelay().expect("reading TCP_NODELAY"), "an accepted API connection delays small writes");
        drop(client);
    }
}
