//! `concord connector ...`: the connector commands, clients of `/v1/connectors`. `add` draws
//! the initial snapshot's progress (indicatif) from the connector's status until it streams.

use std::time::Duration;

use anyhow::{Context, bail};
use reqwest::Method;
use serde_json::{Value, json};

use super::Client;
use crate::cli::{ConnectorCommand, Output};

/// How often `add` asks for the snapshot's progress.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);

pub(super) async fn run(command: ConnectorCommand) -> anyhow::Result<()> {
    match command {
        ConnectorCommand::Add { name, dsn, tables, publication, slot, no_wait, client: arguments } => {
            let mut mappings = Vec::new();
            for table in &tables {
                let Some((table, collection)) = table.split_once('=') else {
                    bail!("--table {table:?} is not TABLE=COLLECTION");
                };
                mappings.push(json!({ "table": table, "collection": collection }));
            }
            let definition = json!({
                "name": name, "kind": "postgres", "dsn": dsn, "tables": mappings,
                "publication": publication, "slot": slot,
            });
            let client = Client::new(&arguments)?;
            let status = client.json(Method::POST, &["v1", "connectors"], Some(definition)).await?;
            if no_wait {
                print_status(&status, arguments.output);
                return Ok(());
            }
            let status = wait_for_snapshot(&client, &name).await?;
            print_status(&status, arguments.output);
        }
        ConnectorCommand::Ls(arguments) => {
            let client = Client::new(&arguments)?;
            let list = client.json(Method::GET, &["v1", "connectors"], None).await?;
            match arguments.output {
                Output::Json => println!("{list}"),
                Output::Table => {
                    println!(
                        "{:<20} {:<10} {:<14} {:>12} {:>10} {:>10} {:>8}",
                        "NAME", "STATE", "CONFIRMED", "LAG BYTES", "CAPTURED", "APPLIED", "ERRORS"
                    );
                    for connector in list["connectors"].as_array().into_iter().flatten() {
                        println!(
                            "{:<20} {:<10} {:<14} {:>12} {:>10} {:>10} {:>8}",
                            connector["name"].as_str().unwrap_or(""),
                            connector["state"].as_str().unwrap_or(""),
                            connector["confirmed_lsn"].as_str().unwrap_or(""),
                            connector["slot_lag_bytes"],
                            connector["rows_captured"],
                            connector["rows_applied"],
                            connector["apply_errors"].as_u64().unwrap_or(0)
                                + connector["capture_errors"].as_u64().unwrap_or(0),
                        );
                    }
                }
            }
        }
        ConnectorCommand::Status { name, client: arguments } => {
            let client = Client::new(&arguments)?;
            let status = client.json(Method::GET, &["v1", "connectors", &name], None).await?;
            print_status(&status, arguments.output);
        }
        ConnectorCommand::Pause { name, client: arguments } => {
            let client = Client::new(&arguments)?;
            let status = client.json(Method::POST, &["v1", "connectors", &name, "pause"], None).await?;
            print_status(&status, arguments.output);
        }
        ConnectorCommand::Resume { name, client: arguments } => {
            let client = Client::new(&arguments)?;
            let status = client.json(Method::POST, &["v1", "connectors", &name, "resume"], None).await?;
            print_status(&status, arguments.output);
        }
        ConnectorCommand::Remove { name, drop_slot, client: arguments } => {
            let client = Client::new(&arguments)?;
            let mut url = client.url(&["v1", "connectors", &name])?;
            if drop_slot {
                url.query_pairs_mut().append_pair("drop_slot", "true");
            }
            let answer: Value = client
                .send(client.request(Method::DELETE, url))
                .await?
                .json()
                .await
                .context("the node's answer is not JSON")?;
            match arguments.output {
                Output::Json => println!("{answer}"),
                Output::Table => println!("removed {name}{}", if drop_slot { " and its slot" } else { "" }),
            }
        }
    }
    Ok(())
}

/// Polls the connector until its snapshot is loaded, drawing a progress bar; fails if the
/// connector reports an error before streaming.
async fn wait_for_snapshot(client: &Client, name: &str) -> anyhow::Result<Value> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} rows ({per_sec}, {eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(format!("{name}: snapshot"));
    loop {
        let status = client.json(Method::GET, &["v1", "connectors", name], None).await?;
        bar.set_length(status["snapshot_rows_total"].as_u64().unwrap_or(0));
        bar.set_position(status["snapshot_rows_loaded"].as_u64().unwrap_or(0));
        match status["state"].as_str().unwrap_or("") {
            "streaming" | "paused" => {
                bar.finish_with_message(format!("{name}: snapshot loaded, streaming"));
                return Ok(status);
            }
            "error" => {
                bar.abandon();
                bail!("connector {name}: {}", status["last_error"].as_str().unwrap_or("failed"));
            }
            _ => tokio::time::sleep(PROGRESS_INTERVAL).await,
        }
    }
}

fn print_status(status: &Value, output: Output) {
    match output {
        Output::Json => println!("{status}"),
        Output::Table => {
            let field = |name: &str| match &status[name] {
                Value::String(text) => text.clone(),
                Value::Null => "-".to_owned(),
                other => other.to_string(),
            };
            for name in [
                "name",
                "state",
                "publication",
                "slot",
                "confirmed_lsn",
                "server_lsn",
                "slot_lag_bytes",
                "snapshot_rows_loaded",
                "snapshot_rows_total",
                "rows_captured",
                "rows_applied",
                "echoes_skipped",
                "damaged_events_skipped",
                "apply_errors",
                "capture_errors",
                "applied_feed",
                "last_error",
            ] {
                println!("{name:<22} {}", field(name));
            }
            for table in status["tables"].as_array().into_iter().flatten() {
                println!(
                    "{:<22} {} -> {}",
                    "table",
                    table["table"].as_str().unwrap_or(""),
                    table["collection"].as_str().unwrap_or("")
                );
            }
        }
    }
}
