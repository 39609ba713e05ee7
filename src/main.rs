//! The `concord` binary: parses the command line, runs a node or a client command, and turns any
//! error into one clear line on stderr and a non-zero exit.

use clap::Parser;
use concord::cli::{Cli, Command};
use concord::config::{NodeConfig, Overrides};
use concord::{client, node};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let memory_tuned = concord::tune_memory();
    // TLS uses ring only; installing it before anything else touches rustls.
    transport::install_crypto_provider();
    let cli = Cli::parse();
    // automerge 0.12 instruments its column parser at info level (`add_column`, once per column
    // of every change and document it parses): with those spans on, formatting their fields was
    // 45% of parsing a change in a running node (BENCHMARKS.md, session 16).
    let default_level = match cli.command {
        Command::Start(_) => "info,automerge=warn",
        Command::Demo { .. } | Command::Bench { .. } => "error",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)))
        .with_writer(std::io::stderr)
        .init();
    if let Err(error) = memory_tuned {
        tracing::debug!(%error, "could not turn transparent huge pages off; memory use may be higher");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Start(arguments) => {
                let config = NodeConfig::load(Overrides {
                    config: arguments.config,
                    name: arguments.name,
                    data_dir: arguments.data_dir,
                    listen_api: arguments.listen_api,
                    tokens_file: arguments.tokens_file,
                    listen_peer: arguments.listen_peer,
                    peers: arguments.peers,
                    advertise_peer: arguments.advertise_peer,
                    certs_dir: arguments.certs_dir,
                    cluster: arguments.cluster,
                    log_retention_seconds: arguments.log_retention_seconds,
                    yrs_collections: arguments.yrs_collections,
                    audit_retention_seconds: arguments.audit_retention_seconds,
                    feed_retention_seconds: arguments.feed_retention_seconds,
                })?;
                node::run(config).await
            }
            Command::Demo { dir } => {
                if concord::demo::run(dir).await? {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!("the nodes did not converge"))
                }
            }
            Command::Bench { quick, json, records, write_workers } => {
                concord::bench::run(quick, records, write_workers, json).await
            }
            command => client::run(command).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            // A tampered audit log is an answer, not a failure to get one: its own exit code.
            if error.downcast_ref::<client::NotIntact>().is_some() {
                return std::process::ExitCode::from(client::NOT_INTACT_EXIT_CODE);
            }
            std::process::ExitCode::FAILURE
        }
    }
}
