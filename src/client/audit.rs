//! `concord audit tail|export|verify`: the audit trail from the command line. `tail` and `export`
//! read the node's HTTP API; `verify` asks the node, or checks an exported file offline with
//! `crdt::audit::verify_json_lines` (no node needed). A log that is not intact ends the command
//! with [`NotIntact`] (exit code [`NOT_INTACT_EXIT_CODE`]) and one line naming where.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use reqwest::Method;
use serde_json::Value;

use super::Client;
use crate::cli::{AuditCommand, AuditExportArgs, AuditTailArgs, AuditVerifyArgs, ClientArgs, Output};

/// The exit code of a verification that found tampering (1 is any other failure).
pub const NOT_INTACT_EXIT_CODE: u8 = 2;
/// How many entries `tail` asks for at once.
const TAIL_PAGE: u64 = 1000;
/// How often `tail --follow` asks for new entries.
const FOLLOW_INTERVAL: Duration = Duration::from_secs(1);

/// The audit log (on the node or in a file) is not intact: the message names the entry or line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotIntact(pub String);

pub(super) async fn run(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Tail(arguments) => tail(arguments).await,
        AuditCommand::Export(arguments) => export(arguments).await,
        AuditCommand::Verify(arguments) => verify(arguments).await,
    }
}

async fn page(client: &Client, after: u64, limit: u64) -> anyhow::Result<Value> {
    let mut url = client.url(&["v1", "audit"])?;
    url.query_pairs_mut().append_pair("after", &after.to_string()).append_pair("limit", &limit.to_string());
    client.send(client.request(Method::GET, url)).await?.json().await.context("the node's answer is not JSON")
}

/// The newest `lines` entries, then (with `--follow`) new ones as they come.
async fn tail(arguments: AuditTailArgs) -> anyhow::Result<()> {
    let client = Client::new(&arguments.client)?;
    let ends = page(&client, 0, 0).await?;
    let head = ends["head"]["sequence"].as_u64().unwrap_or(0);
    let anchor = ends["anchor"]["sequence"].as_u64().unwrap_or(0);
    let mut after = head.saturating_sub(arguments.lines).max(anchor);
    loop {
        let answer = page(&client, after, TAIL_PAGE).await?;
        let entries = answer["entries"].as_array().cloned().unwrap_or_default();
        for entry in &entries {
            print_entry(entry, arguments.client.output);
            after = entry["sequence"].as_u64().unwrap_or(after).max(after);
        }
        if entries.len() as u64 == TAIL_PAGE {
            continue;
        }
        if !arguments.follow {
            return Ok(());
        }
        tokio::time::sleep(FOLLOW_INTERVAL).await;
    }
}

fn print_entry(entry: &Value, output: Output) {
    match output {
        Output::Json => println!("{entry}"),
        Output::Table => {
            let text = |name: &str| entry[name].as_str().unwrap_or("").to_owned();
            let mut fields: Vec<String> =
                entry["fields"].as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_owned).collect();
            if let Some(omitted) = entry["fields_omitted"].as_u64().filter(|&omitted| omitted > 0) {
                fields.push(format!("(+{omitted} more)"));
            }
            println!(
                "{:>8}  {}  {}/{}  origin {}  by {}  {}",
                entry["sequence"],
                utc(entry["time_ms"].as_u64().unwrap_or(0)),
                text("collection"),
                text("id"),
                text("origin"),
                text("principal"),
                fields.join(",")
            );
        }
    }
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ` (proleptic Gregorian, UTC).
fn utc(ms: u64) -> String {
    let (days, rest) = (ms / 86_400_000, ms % 86_400_000);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01.
    let shifted = days as i64 + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    let (hours, minutes, seconds, millis) = (rest / 3_600_000, rest / 60_000 % 60, rest / 1000 % 60, rest % 1000);
    format!("{year:04}-{month:02}-{day:02}T{hours:02}:{minutes:02}:{seconds:02}.{millis:03}Z")
}

/// Streams the export to a file (written beside it and renamed once complete) or stdout, and
/// prints how many entries came and the head to stderr.
async fn export(arguments: AuditExportArgs) -> anyhow::Result<()> {
    let client_arguments = ClientArgs { api: arguments.api, token: arguments.token, output: Output::Json };
    let client = Client::new(&client_arguments)?;
    let response = client.send(client.request(Method::GET, client.url(&["v1", "audit", "export"])?)).await?;
    let partial = arguments.output.as_ref().map(|path| partial_path(path));
    let mut writer: Box<dyn Write> = match &partial {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    let result = copy_export(response, &mut writer).await;
    let summary = match result.and_then(|summary| writer.flush().map(|()| summary).context("writing the export")) {
        Ok(summary) => summary,
        Err(error) => {
            drop(writer);
            if let Some(partial) = &partial {
                let _ = std::fs::remove_file(partial);
            }
            return Err(error);
        }
    };
    drop(writer);
    if let (Some(partial), Some(output)) = (&partial, &arguments.output) {
        std::fs::rename(partial, output).with_context(|| format!("moving the export to {}", output.display()))?;
    }
    let destination = arguments.output.as_ref().map_or("stdout".to_owned(), |path| path.display().to_string());
    match summary.head {
        Some(head) => eprintln!(
            "exported {} audit entries to {destination}; head {head}\n\
             keep the head elsewhere; `concord audit verify --head {head}` then also finds removed newest entries",
            summary.entries
        ),
        None => eprintln!("exported {} audit entries to {destination}", summary.entries),
    }
    Ok(())
}

fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|name| name.to_os_string()).unwrap_or_default();
    name.push(".partial");
    path.with_file_name(name)
}

/// What an export held: its entry count and its last line's sequence and hash.
struct ExportSummary {
    entries: u64,
    head: Option<String>,
}

/// Copies the body to `writer` chunk by chunk, keeping only the line in progress and the last
/// complete one (each bounded like an entry).
async fn copy_export(response: reqwest::Response, writer: &mut dyn Write) -> anyhow::Result<ExportSummary> {
    let mut body = response.bytes_stream();
    let mut current = Vec::new();
    let mut last = Vec::new();
    let mut lines = 0u64;
    let mut anchored = false;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("the export broke off")?;
        writer.write_all(&chunk).context("writing the export")?;
        for piece in chunk.split_inclusive(|&byte| byte == b'\n') {
            current.extend_from_slice(piece);
            if current.len() > crdt::audit::AUDIT_ENTRY_BYTES_MAX + 1 {
                bail!("the export holds a line longer than {} bytes", crdt::audit::AUDIT_ENTRY_BYTES_MAX);
            }
            if current.ends_with(b"\n") {
                if lines == 0 {
                    anchored = current.starts_with(b"{\"anchor\"");
                }
                lines += 1;
                last = std::mem::take(&mut current);
            }
        }
    }
    let entries = lines - u64::from(anchored);
    let head = serde_json::from_slice::<Value>(&last).ok().and_then(|line| {
        let line = line.get("anchor").unwrap_or(&line);
        Some(format!("{}:{}", line["sequence"].as_u64()?, line["hash"].as_str()?))
    });
    Ok(ExportSummary { entries, head })
}

/// Verifies a file offline, or the node's log.
async fn verify(arguments: AuditVerifyArgs) -> anyhow::Result<()> {
    let head = arguments.head.as_deref().map(crate::engine::parse_head).transpose().map_err(anyhow::Error::msg)?;
    let output = arguments.client.output;
    if let Some(file) = arguments.file {
        return verify_file(file, head, output).await;
    }
    let client = Client::new(&arguments.client)?;
    let mut url = client.url(&["v1", "audit", "verify"])?;
    if let Some(head) = &arguments.head {
        url.query_pairs_mut().append_pair("head", head);
    }
    let answer: Value =
        client.send(client.request(Method::GET, url)).await?.json().await.context("the node's answer is not JSON")?;
    if output == Output::Json {
        println!("{answer}");
    }
    if answer["ok"] != Value::Bool(true) {
        let message = answer["error"].as_str().unwrap_or("the audit log is not intact");
        return Err(NotIntact(format!("the node's audit log is not intact: {message}")).into());
    }
    if output == Output::Table {
        println!(
            "intact: {} entries after sequence {}; head {}:{}",
            answer["entries"],
            answer["anchor"]["sequence"],
            answer["head"]["sequence"],
            answer["head"]["hash"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

async fn verify_file(file: PathBuf, head: Option<crdt::audit::Anchor>, output: Output) -> anyhow::Result<()> {
    let opened = std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?;
    let result = tokio::task::spawn_blocking(move || {
        crdt::audit::verify_json_lines(std::io::BufReader::new(opened), None, head)
    })
    .await
    .context("verification task")?;
    let verified = match result {
        Ok(verified) => verified,
        Err(crdt::audit::VerifyError::Tamper(tamper)) => {
            return Err(NotIntact(format!("{} is not intact: {tamper}", file.display())).into());
        }
        Err(crdt::audit::VerifyError::Import(error)) => {
            return Err(NotIntact(format!("{} is not intact: {error}", file.display())).into());
        }
    };
    match output {
        Output::Json => {
            println!("{}", serde_json::json!({ "ok": true, "entries": verified.entries, "head": verified.head }))
        }
        Output::Table => {
            println!("intact: {} entries; head {}:{}", verified.entries, verified.head.sequence, verified.head.hash)
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_827_696_789), "2000-02-29T12:34:56.789Z");
        assert_eq!(utc(1_700_000_000_000), "2023-11-14T22:13:20.000Z");
    }
}
