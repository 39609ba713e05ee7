//! Prometheus metrics: a handful of counters and histograms on atomics, rendered as the text
//! exposition format. Small on purpose: no registry, no labels beyond what operators need.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, amount: u64) {
        self.0.fetch_add(amount, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds, in seconds, of the latency histogram buckets.
const LATENCY_BOUNDS_SECONDS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BOUNDS_SECONDS.len()],
    count: AtomicU64,
    sum_nanoseconds: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if let Some(index) = LATENCY_BOUNDS_SECONDS.iter().position(|&bound| seconds <= bound) {
            self.buckets[index].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanoseconds.fetch_add(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str, output: &mut String) {
        let _ = writeln!(output, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, bucket) in LATENCY_BOUNDS_SECONDS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(output, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let sum = self.sum_nanoseconds.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(output, "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}");
    }
}

/// The most label pairs a [`LabeledCounter`] keeps apart; the rest count under `other`.
const LABEL_PAIRS_MAX: usize = 1024;

/// A count per pair of labels (such as collection and policy), bounded in size.
#[derive(Debug, Default)]
pub struct LabeledCounter(std::sync::Mutex<std::collections::BTreeMap<(String, String), u64>>);

impl LabeledCounter {
    pub fn add(&self, first: &str, second: &str) {
        let Ok(mut counts) = self.0.lock() else { return };
        let key = if counts.len() < LABEL_PAIRS_MAX || counts.contains_key(&(first.to_owned(), second.to_owned())) {
            (first.to_owned(), second.to_owned())
        } else {
            ("other".to_owned(), "other".to_owned())
        };
        *counts.entry(key).or_default() += 1;
    }

    pub fn total(&self) -> u64 {
        self.0.lock().map(|counts| counts.values().sum()).unwrap_or(0)
    }

    fn render(&self, name: &str, help: &str, labels: [&str; 2], output: &mut String) {
        let _ = writeln!(output, "# HELP {name} {help}\n# TYPE {name} counter");
        let Ok(counts) = self.0.lock() else { return };
        for ((first, second), count) in counts.iter() {
            let (first, second) = (escape_label(first), escape_label(second));
            let _ = writeln!(output, "{name}{{{}=\"{first}\",{}=\"{second}\"}} {count}", labels[0], labels[1]);
        }
    }
}

/// A label value as the exposition format needs it: backslash, quote and newline escaped.
fn escape_label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Everything the node counts.
#[derive(Debug, Default)]
pub struct Metrics {
    pub writes: Counter,
    pub reads: Counter,
    pub requests: Counter,
    pub client_errors: Counter,
    pub server_errors: Counter,
    pub commits: Counter,
    pub committed_operations: Counter,
    pub compactions: Counter,
    pub compactions_refused: Counter,
    pub write_latency: Histogram,
    pub commit_latency: Histogram,
    /// The flush alone: the disk's share of a commit.
    pub flush_latency: Histogram,
    pub peer_frames_sent: Counter,
    pub peer_frames_received: Counter,
    pub peer_frames_dropped: Counter,
    pub peer_bytes_sent: Counter,
    pub peer_bytes_received: Counter,
    pub peer_protocol_errors: Counter,
    /// Documents merged from peers' snapshots.
    pub snapshot_records_received: Counter,
    /// Records new to this node stored straight from a peer's first change, without building
    /// them (the rest of a catch-up builds each record to merge into it).
    pub records_stored_unbuilt: Counter,
    /// Reads served straight from a record's one first change, without building it.
    pub records_read_unbuilt: Counter,
    /// Peers' changes to records stored only as bytes, applied by loading the record with the
    /// change in it (not by building it and applying the change to a copy).
    pub records_rebuilt_with_change: Counter,
    /// Rounds of local writes the engine ran, and the writes in them (see `engine/writes`).
    pub write_rounds: Counter,
    pub write_round_writes: Counter,
    /// Lanes of a round (one key's writes) worked on a helper thread, not the engine thread.
    pub write_lanes_on_helpers: Counter,
    /// Change-log entries deleted by retention.
    pub log_entries_trimmed: Counter,
    /// Documents still stored as a pointer to their first change in the log that got its bytes
    /// back before retention trimmed it.
    pub first_changes_kept: Counter,
    /// Members the failure detector declared down (each time one goes down).
    pub members_down: Counter,
    /// Audit-trail entries made (one per applied change).
    pub audit_entries: Counter,
    /// Audit-trail entries deleted by retention.
    pub audit_entries_trimmed: Counter,
    /// Change-feed entries deleted by retention.
    pub feed_entries_trimmed: Counter,
    /// Feed events served as damaged (an entry, page or record on disk that did not read).
    pub feed_events_damaged: Counter,
    /// From the origin's write (the envelope's clock) to the local apply.
    pub replication_latency: Histogram,
    /// Conflicts recorded in the ledger, by collection and policy.
    pub conflicts: LabeledCounter,
    /// Changes from peers applied here (the denominator of the conflict rate).
    pub changes_applied: Counter,
    /// Changes from peers put in quarantine.
    pub quarantined: Counter,
}

/// Point-in-time values read when the metrics are scraped.
#[derive(Debug, Default)]
pub struct Gauges {
    pub quarantine_size: u64,
    pub store_bytes: u64,
    pub records: u64,
    pub feed_sequence: u64,
}

impl Metrics {
    /// Records how long a change took from its origin's clock to being applied here. Clock skew
    /// between nodes shows up here too; a change stamped in the future counts as zero.
    pub fn observe_replication_latency(&self, origin: crdt::clock::Timestamp) {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_millis() as u64)
            .unwrap_or(0);
        self.replication_latency.observe(Duration::from_millis(now_ms.saturating_sub(origin.wall_ms)));
    }

    pub fn observe_commit(&self, elapsed: Duration, operations: usize) {
        self.commits.inc();
        self.committed_operations.add(operations as u64);
        self.commit_latency.observe(elapsed);
    }

    pub fn render(&self, gauges: &Gauges) -> String {
        let mut output = String::new();
        let counters: [(&str, &str, &Counter); 30] = [
            ("concord_quarantined_total", "Changes from peers put in quarantine.", &self.quarantined),
            ("concord_writes_total", "Local writes that changed a document.", &self.writes),
            ("concord_reads_total", "Document reads.", &self.reads),
            ("concord_http_requests_total", "HTTP API requests.", &self.requests),
            ("concord_http_client_errors_total", "HTTP API requests answered 4xx.", &self.client_errors),
            ("concord_http_server_errors_total", "HTTP API requests answered 5xx.", &self.server_errors),
            ("concord_store_commits_total", "Group commits (one flush each).", &self.commits),
            (
                "concord_store_committed_operations_total",
                "Store operations written by group commits.",
                &self.committed_operations,
            ),
            ("concord_compactions_total", "Documents compacted.", &self.compactions),
            (
                "concord_compactions_refused_total",
                "Compactions skipped because saving the document panicked or its snapshot did not reload to the same state.",
                &self.compactions_refused,
            ),
            ("concord_peer_frames_sent_total", "Messages queued to peers.", &self.peer_frames_sent),
            ("concord_peer_frames_received_total", "Messages received from peers.", &self.peer_frames_received),
            (
                "concord_peer_frames_dropped_total",
                "Messages to peers dropped on a full queue (summaries repair).",
                &self.peer_frames_dropped,
            ),
            ("concord_peer_bytes_sent_total", "Message bytes queued to peers.", &self.peer_bytes_sent),
            ("concord_peer_bytes_received_total", "Message bytes received from peers.", &self.peer_bytes_received),
            (
                "concord_peer_protocol_errors_total",
                "Peers disconnected for breaking the protocol.",
                &self.peer_protocol_errors,
            ),
            (
                "concord_snapshot_records_received_total",
                "Documents merged from peers' snapshots (bootstrap).",
                &self.snapshot_records_received,
            ),
            (
                "concord_records_stored_unbuilt_total",
                "Records new to this node stored straight from a peer's first change, without building them.",
                &self.records_stored_unbuilt,
            ),
            (
                "concord_records_read_unbuilt_total",
                "Reads (GET, listing, change feed) served straight from a record's one first change, without building it.",
                &self.records_read_unbuilt,
            ),
            (
                "concord_records_rebuilt_with_change_total",
                "Peers' changes to records stored only as bytes, applied by loading the record with the change in it.",
                &self.records_rebuilt_with_change,
            ),
            ("concord_write_rounds_total", "Rounds of local writes run by the engine.", &self.write_rounds),
            ("concord_write_round_writes_total", "Local writes run in rounds.", &self.write_round_writes),
            (
                "concord_write_lanes_on_helpers_total",
                "Lanes of a round (one key's writes) worked on a helper thread rather than the engine thread (write_workers).",
                &self.write_lanes_on_helpers,
            ),
            (
                "concord_log_entries_trimmed_total",
                "Change-log entries deleted by retention.",
                &self.log_entries_trimmed,
            ),
            (
                "concord_first_changes_kept_total",
                "Documents stored as their first change in the log that got its bytes back before retention trimmed it.",
                &self.first_changes_kept,
            ),
            ("concord_members_down_total", "Members the failure detector declared down.", &self.members_down),
            ("concord_audit_entries_total", "Audit-trail entries made (one per applied change).", &self.audit_entries),
            (
                "concord_audit_entries_trimmed_total",
                "Audit-trail entries deleted by retention.",
                &self.audit_entries_trimmed,
            ),
            (
                "concord_feed_entries_trimmed_total",
                "Change-feed entries deleted by retention.",
                &self.feed_entries_trimmed,
            ),
            (
                "concord_feed_events_damaged_total",
                "Feed events served as damaged: an entry, page or record on disk that did not read.",
                &self.feed_events_damaged,
            ),
        ];
        for (name, help, counter) in counters {
            let _ = writeln!(output, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", counter.get());
        }
        let gauges: [(&str, &str, u64); 4] = [
            ("concord_quarantine_size", "Changes from peers in quarantine.", gauges.quarantine_size),
            ("concord_store_size_bytes", "Bytes the store occupies on disk.", gauges.store_bytes),
            ("concord_records", "Live records and texts.", gauges.records),
            ("concord_feed_sequence", "The latest local feed sequence.", gauges.feed_sequence),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(output, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        }
        self.conflicts.render(
            "concord_conflicts_total",
            "Conflicts recorded in the conflict ledger.",
            ["collection", "policy"],
            &mut output,
        );
        self.write_latency.render(
            "concord_write_latency_seconds",
            "From receiving a write to acknowledging it durable.",
            &mut output,
        );
        self.commit_latency.render("concord_commit_latency_seconds", "One group commit, flush included.", &mut output);
        self.flush_latency.render(
            "concord_store_flush_seconds",
            "The flush of one group commit (the disk's share of the commit).",
            &mut output,
        );
        self.replication_latency.render(
            "concord_replication_latency_seconds",
            "From a change's origin clock to its apply here.",
            &mut output,
        );
        output
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let metrics = Metrics::default();
        metrics.writes.add(3);
        metrics.write_latency.observe(Duration::from_micros(50));
        metrics.write_latency.observe(Duration::from_millis(3));
        let text = metrics.render(&Gauges { quarantine_size: 0, store_bytes: 10, records: 2, feed_sequence: 3 });
        assert!(text.contains("concord_writes_total 3\n"));
        assert!(text.contains("concord_write_latency_seconds_bucket{le=\"0.0001\"} 1\n"));
        assert!(text.contains("concord_write_latency_seconds_bucket{le=\"0.005\"} 2\n"));
        assert!(text.contains("concord_write_latency_seconds_count 2\n"));
        assert!(text.contains("concord_records 2\n"));
    }
}
