//! The client commands: each turns its arguments into one HTTP request to a running node and
//! prints the answer as a table or as JSON.

use anyhow::{Context, anyhow, bail};
use futures::StreamExt;
use reqwest::{Method, Url};
use serde_json::{Value, json};

use crate::cli::{
    CertCommand, ClientArgs, CollectionCommand, Command, ConflictsCommand, Output, QuarantineCommand, WriteArgs,
};

mod audit;
mod connectors;

pub use audit::{NOT_INTACT_EXIT_CODE, NotIntact};

/// An HTTP client for one node's API.
#[derive(Debug)]
struct Client {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
}

impl Client {
    fn new(arguments: &ClientArgs) -> anyhow::Result<Client> {
        let base = Url::parse(&arguments.api).with_context(|| format!("--api {:?} is not a URL", arguments.api))?;
        Ok(Client { http: reqwest::Client::new(), base, token: arguments.token.clone() })
    }

    /// The URL for path segments, each percent-encoded as one segment.
    fn url(&self, segments: &[&str]) -> anyhow::Result<Url> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| anyhow!("--api {} cannot have a path", self.base))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    fn request(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        let request = self.http.request(method, url);
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let response = request.send().await.with_context(|| format!("cannot reach the node at {}", self.base))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|body| body.get("error").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or(text);
        bail!("{} {}: {message}", status.as_u16(), status.canonical_reason().unwrap_or(""))
    }

    async fn json(&self, method: Method, segments: &[&str], body: Option<Value>) -> anyhow::Result<Value> {
        let mut request = self.request(method, self.url(segments)?);
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.send(request).await?.json().await.context("the node's answer is not JSON")
    }
}

fn split_key(key: &str) -> anyhow::Result<(&str, &str)> {
    key.split_once('/')
        .filter(|(collection, id)| !collection.is_empty() && !id.is_empty())
        .ok_or_else(|| anyhow!("{key:?} is not COLLECTION/ID"))
}

fn parse_object(json: &str) -> anyhow::Result<Value> {
    let value: Value = serde_json::from_str(json).context("the value is not valid JSON")?;
    if !value.is_object() {
        bail!("the value must be a JSON object");
    }
    Ok(value)
}

/// Runs one client command.
pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Start(_) | Command::Demo { .. } | Command::Bench { .. } => {
            unreachable!("start, demo and bench are handled by main")
        }
        Command::Cert(command) => certificate(command)?,
        Command::Audit(command) => audit::run(command).await?,
        Command::Connector(command) => connectors::run(command).await?,
        Command::Peers(arguments) => {
            let client = Client::new(&arguments)?;
            let status = client.json(Method::GET, &["v1", "status"], None).await?;
            match arguments.output {
                Output::Json => println!("{}", status["peers"]),
                Output::Table => {
                    println!(
                        "{:<20} {:<24} {:<34} {:<12} {:<8} {:>10} {:>10} {:>10} {:>10}",
                        "NAME", "ADDRESS", "NODE", "STATE", "MEMBER", "THEY LACK", "WE LACK", "SENT", "RECEIVED"
                    );
                    for peer in status["peers"].as_array().into_iter().flatten() {
                        let state = if peer["connected"] == Value::Bool(true) { "connected" } else { "disconnected" };
                        println!(
                            "{:<20} {:<24} {:<34} {:<12} {:<8} {:>10} {:>10} {:>10} {:>10}",
                            peer["name"].as_str().unwrap_or(""),
                            peer["address"].as_str().unwrap_or(""),
                            peer["node_id"].as_str().unwrap_or(""),
                            state,
                            peer["state"].as_str().unwrap_or("-"),
                            peer["peer_lacks"],
                            peer["we_lack"],
                            peer["traffic"]["changes_sent"],
                            peer["traffic"]["changes_received"]
                        );
                    }
                }
            }
        }
        Command::Put(arguments) => write_record(Method::PUT, &arguments).await?,
        Command::Patch(arguments) => write_record(Method::PATCH, &arguments).await?,
        Command::Get(arguments) => {
            let (collection, id) = split_key(&arguments.key)?;
            let client = Client::new(&arguments.client)?;
            let record = client.json(Method::GET, &["v1", "collections", collection, "records", id], None).await?;
            print_record(&record, arguments.client.output);
        }
        Command::Del(arguments) => {
            let (collection, id) = split_key(&arguments.key)?;
            let client = Client::new(&arguments.client)?;
            let record = client.json(Method::DELETE, &["v1", "collections", collection, "records", id], None).await?;
            match arguments.client.output {
                Output::Json => println!("{record}"),
                Output::Table => println!("deleted {collection}/{id}"),
            }
        }
        Command::Incr(arguments) => {
            let (collection, id) = split_key(&arguments.key)?;
            let client = Client::new(&arguments.client)?;
            let body = json!({ "field": arguments.field, "by": arguments.by });
            let path = ["v1", "collections", collection, "records", id, "increment"];
            let record = client.json(Method::POST, &path, Some(body)).await?;
            print_record(&record, arguments.client.output);
        }
        Command::Ls(arguments) => {
            let client = Client::new(&arguments.client)?;
            let mut url = client.url(&["v1", "collections", &arguments.collection, "records"])?;
            url.query_pairs_mut()
                .append_pair("prefix", &arguments.prefix)
                .append_pair("limit", &arguments.limit.to_string());
            if let Some(after) = &arguments.after {
                url.query_pairs_mut().append_pair("after", after);
            }
            let page: Value = client.send(client.request(Method::GET, url)).await?.json().await?;
            print_list(&page, arguments.client.output);
        }
        Command::Watch(arguments) => watch(&arguments.client, arguments.since).await?,
        Command::Collection(CollectionCommand::Define { name, file, client }) => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let node = Client::new(&client)?;
            let request = node.request(Method::PUT, node.url(&["v1", "collections", &name, "definition"])?).body(text);
            let answer: Value = node.send(request).await?.json().await.context("the node's answer is not JSON")?;
            match client.output {
                Output::Json => println!("{answer}"),
                Output::Table => println!("defined {name}: {}", answer["definition"]),
            }
        }
        Command::Conflicts(ConflictsCommand::Ls { collection, since, limit, client }) => {
            let node = Client::new(&client)?;
            let mut url = node.url(&["v1", "conflicts"])?;
            url.query_pairs_mut().append_pair("since", &since.to_string()).append_pair("limit", &limit.to_string());
            if let Some(collection) = &collection {
                url.query_pairs_mut().append_pair("collection", collection);
            }
            let page: Value = node.send(node.request(Method::GET, url)).await?.json().await?;
            match client.output {
                Output::Json => println!("{page}"),
                Output::Table => {
                    for entry in page["conflicts"].as_array().into_iter().flatten() {
                        println!(
                            "{:>6}  {}/{}  {}  {}  winner {}  {}",
                            entry["sequence"],
                            entry["collection"].as_str().unwrap_or("?"),
                            entry["id"].as_str().unwrap_or("?"),
                            entry["field"].as_str().unwrap_or("?"),
                            entry["policy"]["policy"].as_str().or(entry["policy"].as_str()).unwrap_or("?"),
                            entry["winner"],
                            if entry["resolution"].is_null() { "open" } else { "resolved" },
                        );
                    }
                }
            }
        }
        Command::Quarantine(command) => quarantine(command).await?,
        Command::Conflicts(ConflictsCommand::Show { sequence, client }) => {
            let node = Client::new(&client)?;
            let entry = node.json(Method::GET, &["v1", "conflicts", &sequence.to_string()], None).await?;
            match client.output {
                Output::Json => println!("{entry}"),
                Output::Table => println!("{}", serde_json::to_string_pretty(&entry)?),
            }
        }
        Command::Conflicts(ConflictsCommand::Resolve { key, field, value, client }) => {
            let (collection, id) = split_key(&key)?;
            let value: Value = serde_json::from_str(&value).context("--value is not JSON")?;
            let node = Client::new(&client)?;
            let body = json!({ "collection": collection, "id": id, "field": field, "value": value });
            let record = node.json(Method::POST, &["v1", "conflicts", "resolve"], Some(body)).await?;
            print_record(&record, client.output);
        }
        Command::Collection(CollectionCommand::Show { name, client }) => {
            let node = Client::new(&client)?;
            let answer = node.json(Method::GET, &["v1", "collections", &name, "definition"], None).await?;
            match client.output {
                Output::Json => println!("{answer}"),
                Output::Table => println!("{}", serde_json::to_string_pretty(&answer["definition"])?),
            }
        }
        Command::Status(arguments) => {
            let client = Client::new(&arguments)?;
            let status = client.json(Method::GET, &["v1", "status"], None).await?;
            match arguments.output {
                Output::Json => println!("{status}"),
                Output::Table => print_fields(&status),
            }
        }
    }
    Ok(())
}

/// `quarantine ls|show|retry|drop`.
async fn quarantine(command: QuarantineCommand) -> anyhow::Result<()> {
    let (client, answer) = match command {
        QuarantineCommand::Ls { after, limit, client } => {
            let node = Client::new(&client)?;
            let mut url = node.url(&["v1", "quarantine"])?;
            url.query_pairs_mut().append_pair("after", &after.to_string()).append_pair("limit", &limit.to_string());
            let page: Value = node.send(node.request(Method::GET, url)).await?.json().await?;
            if client.output == Output::Table {
                println!("{} in quarantine", page["size"]);
                for entry in page["entries"].as_array().into_iter().flatten() {
                    println!(
                        "{:>6}  {}/{}  from {}  {}",
                        entry["id"],
                        entry["collection"].as_str().unwrap_or("?"),
                        entry["record"].as_str().unwrap_or("?"),
                        entry["peer"].as_str().unwrap_or("?"),
                        entry["reason"].as_str().unwrap_or("?"),
                    );
                }
                return Ok(());
            }
            (client, page)
        }
        QuarantineCommand::Show { id, client } => {
            let node = Client::new(&client)?;
            let answer = node.json(Method::GET, &["v1", "quarantine", &id.to_string()], None).await?;
            (client, answer)
        }
        QuarantineCommand::Retry { id, client } => {
            let node = Client::new(&client)?;
            let answer = node.json(Method::POST, &["v1", "quarantine", &id.to_string(), "retry"], None).await?;
            (client, answer)
        }
        QuarantineCommand::Drop { id, client } => {
            let node = Client::new(&client)?;
            let answer = node.json(Method::DELETE, &["v1", "quarantine", &id.to_string()], None).await?;
            (client, answer)
        }
    };
    match client.output {
        Output::Json => println!("{answer}"),
        Output::Table => println!("{}", serde_json::to_string_pretty(&answer)?),
    }
    Ok(())
}

/// `cert ca` and `cert node`: files only, no node needed.
fn certificate(command: CertCommand) -> anyhow::Result<()> {
    match command {
        CertCommand::Ca { dir, cluster } => {
            let files = transport::create_cluster_ca(&dir, &cluster)?;
            println!(
                "created the CA of cluster {cluster:?}: {} and {}",
                files.certificate_path.display(),
                files.key_path.display()
            );
        }
        CertCommand::Node { dir, name, ip, dns, days } => {
            let files =
                transport::issue_node_certificate(&dir, &name, &ip, &dns, transport::Validity::days_from_now(days))?;
            println!("issued {name}: {} and {}", files.certificate_path.display(), files.key_path.display());
        }
    }
    Ok(())
}

/// `put` and `patch`: send a JSON object to a record and print the record that results.
async fn write_record(method: Method, arguments: &WriteArgs) -> anyhow::Result<()> {
    let (collection, id) = split_key(&arguments.key)?;
    let client = Client::new(&arguments.client)?;
    let body = parse_object(&arguments.json)?;
    let mut url = client.url(&["v1", "collections", collection, "records", id])?;
    if arguments.acks > 0 {
        url.query_pairs_mut().append_pair("acks", &arguments.acks.to_string());
    }
    let response = client.send(client.request(method, url).json(&body)).await?;
    let record: Value = response.json().await.context("the node's answer is not JSON")?;
    print_record(&record, arguments.client.output);
    Ok(())
}

async fn watch(arguments: &ClientArgs, since: u64) -> anyhow::Result<()> {
    let client = Client::new(arguments)?;
    let mut url = client.url(&["v1", "changes"])?;
    url.query_pairs_mut().append_pair("since", &since.to_string());
    let request = client.request(Method::GET, url).header(reqwest::header::ACCEPT, "application/x-ndjson");
    let mut body = client.send(request).await?.bytes_stream();
    let mut pending = Vec::new();
    while let Some(chunk) = body.next().await {
        pending.extend_from_slice(&chunk.context("the change feed broke off")?);
        while let Some(end) = pending.iter().position(|&byte| byte == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let event: Value = serde_json::from_slice(&line).context("a change-feed line is not JSON")?;
            match arguments.output {
                Output::Json => println!("{event}"),
                Output::Table => println!(
                    "{:>8}  {}/{}  {}",
                    event["sequence"],
                    event["collection"].as_str().unwrap_or(""),
                    event["id"].as_str().unwrap_or(""),
                    if let Some(reason) = event["damage"]["reason"].as_str() {
                        format!("damaged: {reason}")
                    } else if event["deleted"] == Value::Bool(true) {
                        "deleted".to_owned()
                    } else {
                        event["value"].to_string()
                    }
                ),
            }
        }
    }
    Ok(())
}

fn print_record(record: &Value, output: Output) {
    match output {
        Output::Json => println!("{record}"),
        Output::Table => {
            println!("{}/{}", record["collection"].as_str().unwrap_or(""), record["id"].as_str().unwrap_or(""));
            println!("  value:    {}", record["value"]);
            println!("  version:  {}", record["version"].as_str().unwrap_or(""));
            for conflict in record["conflicts"].as_array().into_iter().flatten() {
                println!("  conflict: {} has {}", conflict["field"].as_str().unwrap_or(""), conflict["values"]);
            }
        }
    }
}

fn print_list(page: &Value, output: Output) {
    match output {
        Output::Json => println!("{page}"),
        Output::Table => {
            for record in page["records"].as_array().into_iter().flatten() {
                let conflicted = record["conflicts"].as_array().is_some_and(|conflicts| !conflicts.is_empty());
                println!(
                    "{:<32} {}{}",
                    record["id"].as_str().unwrap_or(""),
                    record["value"],
                    if conflicted { "  (conflicts)" } else { "" }
                );
            }
            if let Some(next) = page["next"].as_str() {
                println!("(more: --after {next})");
            }
        }
    }
}

fn print_fields(object: &Value) {
    for (name, value) in object.as_object().into_iter().flatten() {
        match value {
            Value::String(text) => println!("{name:<16} {text}"),
            other => println!("{name:<16} {other}"),
        }
    }
}
