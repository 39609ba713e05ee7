//! Test support: starts real `concord` node processes on loopback, each with its own sled store
//! in a temporary directory, and talks to them over HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod cluster;
pub mod postgres;
pub mod relay;

/// A node process. Killed (SIGKILL) when dropped, unless already stopped.
pub struct Node {
    pub child: Option<Child>,
    pub data_dir: PathBuf,
    pub api: String,
    pub token: Option<String>,
    pub http: reqwest::Client,
    extra_arguments: Vec<String>,
}

/// The temporary folder a test's nodes live in; removed when dropped.
pub fn temporary_directory() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("concord-test-").tempdir().expect("temporary directory")
}

fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_concord")
}

impl Node {
    /// Starts a node on an ephemeral loopback port with its data in `data_dir`.
    pub async fn start(data_dir: &Path) -> Node {
        Node::start_with(data_dir, &[]).await
    }

    pub async fn start_with(data_dir: &Path, extra_arguments: &[&str]) -> Node {
        let mut node = Node {
            child: None,
            data_dir: data_dir.to_path_buf(),
            api: String::new(),
            token: None,
            http: reqwest::Client::new(),
            extra_arguments: extra_arguments.iter().map(|argument| argument.to_string()).collect(),
        };
        node.launch().await;
        node
    }

    async fn launch(&mut self) {
        let address_file = self.data_dir.join("api.addr");
        let _ = std::fs::remove_file(&address_file);
        let child = Command::new(binary())
            .arg("start")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-api", "127.0.0.1:0"])
            .args(&self.extra_arguments)
            // `CONCORD_TEST_LOG` (a `RUST_LOG` filter) shows more of the nodes' logs when a test
            // is being diagnosed.
            .env("RUST_LOG", std::env::var("CONCORD_TEST_LOG").unwrap_or_else(|_| "error".to_owned()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn concord");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(address) = std::fs::read_to_string(&address_file) {
                self.api = format!("http://{address}");
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|child| child.try_wait().ok().flatten()) {
                panic!("node exited before listening: {status}");
            }
            assert!(Instant::now() < deadline, "node did not start listening within 60 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("node is running");
        signal(&child, "TERM");
        child.wait().expect("wait for node")
    }

    pub async fn restart(&mut self) {
        self.kill();
        self.launch().await;
    }

    /// Starts a node that was killed again, with the same data directory and arguments.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "the node is still running");
        self.launch().await;
    }

    /// SIGSTOP: the process stops where it is, sockets open, until [`Node::resume`].
    pub fn pause(&self) {
        signal(self.child.as_ref().expect("node is running"), "STOP");
    }

    /// SIGCONT after [`Node::pause`].
    pub fn resume(&self) {
        signal(self.child.as_ref().expect("node is running"), "CONT");
    }

    /// How the process ended, if it has (a crash, say); `None` while it runs or after [`Node::kill`].
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|child| child.try_wait().ok().flatten())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("node is running").id()
    }

    /// The node's resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        self.proc_status_kib("VmRSS")
    }

    /// The node's peak resident set size since it started (the high-water mark) in KiB, from /proc.
    pub fn peak_rss_kib(&self) -> u64 {
        self.proc_status_kib("VmHWM")
    }

    fn proc_status_kib(&self, field: &str) -> u64 {
        proc_status_kib(self.pid(), field)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api)
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, self.url(path));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends a request with an optional JSON body; returns the status and the JSON answer.
    pub async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.request(method, path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request reaches the node");
        let status = response.status().as_u16();
        let text = response.text().await.expect("response body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn put(&self, collection: &str, id: &str, value: Value) -> Value {
        let (status, body) = self.call(reqwest::Method::PUT, &record_path(collection, id), Some(value)).await;
        assert_eq!(status, 200, "PUT {collection}/{id}: {body}");
        body
    }

    pub async fn get(&self, collection: &str, id: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, &record_path(collection, id), None).await
    }

    pub async fn status(&self) -> Value {
        let (status, body) = self.call(reqwest::Method::GET, "/v1/status", None).await;
        assert_eq!(status, 200, "status: {body}");
        body
    }

    /// `GET /metrics`: the Prometheus text.
    pub async fn metrics(&self) -> String {
        let response = self.request(reqwest::Method::GET, "/metrics").send().await.expect("request reaches the node");
        assert_eq!(response.status().as_u16(), 200, "metrics");
        response.text().await.expect("metrics body")
    }

    /// Every live record of `collection`, by id, read page by page.
    pub async fn list_all(&self, collection: &str) -> std::collections::BTreeMap<String, Value> {
        let mut records = std::collections::BTreeMap::new();
        let mut after: Option<String> = None;
        loop {
            let mut path = format!("/v1/collections/{collection}/records?limit=1000");
            if let Some(after) = &after {
                path.push_str(&format!("&after={after}"));
            }
            let (status, body) = self.call(reqwest::Method::GET, &path, None).await;
            assert_eq!(status, 200, "{path}: {body}");
            for record in body["records"].as_array().unwrap() {
                records.insert(record["id"].as_str().unwrap().to_owned(), record["value"].clone());
            }
            match body["next"].as_str() {
                Some(next) => after = Some(next.to_owned()),
                None => return records,
            }
        }
    }

    /// Runs the CLI against this node; returns (exit success, stdout, stderr).
    pub fn cli(&self, arguments: &[&str]) -> (bool, String, String) {
        let mut command = Command::new(binary());
        command.args(arguments).env("CONCORD_API", &self.api).env_remove("CONCORD_TOKEN");
        if let Some(token) = &self.token {
            command.env("CONCORD_TOKEN", token);
        }
        let output = command.output().expect("run concord CLI");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads `count` NDJSON lines from a streaming response, parsed.
pub async fn read_ndjson(response: &mut reqwest::Response, count: usize) -> Vec<Value> {
    let mut pending = Vec::new();
    let mut values = Vec::new();
    while values.len() < count {
        let chunk = response.chunk().await.expect("read the stream").expect("stream ended early");
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|&byte| byte == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            values.push(serde_json::from_slice(&line).expect("an NDJSON line is JSON"));
        }
    }
    values
}

/// A field of `/proc/<pid>/status` given in kB (`VmRSS`, `VmHWM`, ...), in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    try_proc_status_kib(pid, field).unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// Like [`proc_status_kib`], or `None` if the process is gone or has no such field (a zombie).
pub fn try_proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The value of the unlabelled sample `name` in Prometheus text; fails the test if it is absent.
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in the metrics:\n{text}"))
}

/// `length` pseudo-random bytes from `seed` (xorshift): incompressible noise.
pub fn noise(seed: u64, length: usize) -> Vec<u8> {
    let mut state = seed | 1;
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A small seeded pseudo-random generator (SplitMix64): the same seed gives the same sequence,
/// so a test that draws its choices from it can be replayed.
#[derive(Clone, Debug)]
pub struct Random(u64);

impl Random {
    pub fn new(seed: u64) -> Random {
        Random(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut value = self.0;
        value = (value ^ (value >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        value = (value ^ (value >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        value ^ (value >> 31)
    }

    /// A value in `0..bound` (0 when `bound` is 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 { 0 } else { self.next_u64() % bound }
    }

    /// A value in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high - low + 1)
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u8) -> bool {
        self.below(100) < u64::from(percent)
    }

    /// A duration in `low..=high`, in milliseconds.
    pub fn duration(&mut self, low: Duration, high: Duration) -> Duration {
        Duration::from_millis(self.between(low.as_millis() as u64, high.as_millis() as u64))
    }

    /// A random element of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// `items` in a random order (Fisher–Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for index in (1..items.len()).rev() {
            items.swap(index, self.below(index as u64 + 1) as usize);
        }
    }
}

pub fn record_path(collection: &str, id: &str) -> String {
    format!("/v1/collections/{collection}/records/{id}")
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill").arg(format!("-{name}")).arg(child.id().to_string()).status().expect("run kill");
    assert!(status.success(), "kill -{name} failed");
}
