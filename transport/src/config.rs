//! How an endpoint is configured: who it is, where it listens, and every limit and timer.
//!
//! Not parsing: the node builds an [`EndpointConfig`] from its own configuration file.

use std::net::SocketAddr;
use std::time::Duration;

use crate::certificates::NodeCertificates;
use crate::frame::{COMPRESSION_BYTES_MIN_DEFAULT, FRAME_BYTES_MAX_DEFAULT, FrameLimits};
use crate::handshake::HELLO_BYTES_MAX;

/// Everything [`crate::Endpoint::bind`] needs. Build it with [`EndpointConfig::new`], then
/// adjust fields.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct EndpointConfig {
    /// The UDP address to bind; port 0 picks a free port.
    pub bind_address: SocketAddr,
    /// The address told to peers in the hello. `None` advertises the bound address when it is
    /// a specific IP (not `0.0.0.0` or `::`), and nothing otherwise.
    pub listen_address: Option<SocketAddr>,
    /// The cluster this node belongs to; peers with another are refused.
    pub cluster_id: String,
    /// This node's id for life.
    pub node_id: [u8; 16],
    /// This node's name, sent in the hello.
    pub node_name: String,
    /// The CA, certificate and key to authenticate with.
    pub certificates: NodeCertificates,
    /// Addresses to dial from the start and redial forever (see [`crate::Endpoint::connect`]).
    pub seeds: Vec<SocketAddr>,
    /// Bounds on frames, queues and peers.
    pub limits: Limits,
    /// Timeouts and intervals.
    pub timing: Timing,
    /// The protocol version to announce; tests set another to be refused.
    #[cfg(test)]
    pub(crate) protocol_version: u32,
}

impl EndpointConfig {
    /// A configuration with the default [`Limits`] and [`Timing`] and no seeds.
    pub fn new(
        bind_address: SocketAddr,
        cluster_id: impl Into<String>,
        node_id: [u8; 16],
        node_name: impl Into<String>,
        certificates: NodeCertificates,
    ) -> EndpointConfig {
        EndpointConfig {
            bind_address,
            listen_address: None,
            cluster_id: cluster_id.into(),
            node_id,
            node_name: node_name.into(),
            certificates,
            seeds: Vec::new(),
            limits: Limits::default(),
            timing: Timing::default(),
            #[cfg(test)]
            protocol_version: crate::handshake::PROTOCOL_VERSION,
        }
    }

    /// Checks what [`crate::Endpoint::bind`] cannot work with; the problem as a sentence.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let limits = &self.limits;
        if self.cluster_id.is_empty() || self.cluster_id.len() > 255 {
            return Err("the cluster id must have 1 to 255 bytes".to_owned());
        }
        if self.node_name.is_empty() || self.node_name.len() > 255 {
            return Err("the node name must have 1 to 255 bytes".to_owned());
        }
        if self.cluster_id.chars().chain(self.node_name.chars()).any(char::is_control) {
            return Err("the cluster id and node name must not contain control characters".to_owned());
        }
        if limits.frame_bytes_max < HELLO_BYTES_MAX || limits.frame_bytes_max > FRAME_BYTES_MAX_LIMIT {
            return Err(format!("frame_bytes_max must be between {HELLO_BYTES_MAX} and {FRAME_BYTES_MAX_LIMIT}"));
        }
        for (name, value) in [
            ("send_queue_frames_max", limits.send_queue_frames_max),
            ("send_queue_bytes_max", limits.send_queue_bytes_max),
            ("event_queue_events_max", limits.event_queue_events_max),
            ("peers_max", limits.peers_max),
            ("handshakes_max", limits.handshakes_max),
        ] {
            if value == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        let timing = &self.timing;
        if timing.keep_alive.is_zero() || timing.keep_alive >= timing.idle_timeout {
            return Err("keep_alive must be positive and shorter than idle_timeout".to_owned());
        }
        if timing.handshake_timeout.is_zero() || timing.redial_delay_min.is_zero() {
            return Err("handshake_timeout and redial_delay_min must be positive".to_owned());
        }
        Ok(())
    }
}

/// The largest `frame_bytes_max` accepted: 1 GiB (the wire length is a u32 in any case).
pub const FRAME_BYTES_MAX_LIMIT: usize = 1024 * 1024 * 1024;

/// Bounds on everything that holds bytes. Memory for one peer is at most about
/// `send_queue_bytes_max + 2 * frame_bytes_max` (queue, a frame being written, a frame being
/// read), plus QUIC's own windows; the event channel holds at most `event_queue_events_max`
/// events of at most `frame_bytes_max` each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// The largest frame payload, on the wire and decompressed (default 16 MiB). A peer that
    /// sends more is disconnected; `send` refuses more.
    pub frame_bytes_max: usize,
    /// Payloads at least this large are compressed when that makes them smaller (default 4 KiB).
    pub compression_bytes_min: usize,
    /// Frames queued for one peer before `send` answers `Full` (default 1024).
    pub send_queue_frames_max: usize,
    /// Payload bytes queued for one peer before `send` answers `Full` (default 64 MiB). A frame
    /// is always accepted into an empty queue, so any frame within `frame_bytes_max` can be
    /// sent.
    pub send_queue_bytes_max: usize,
    /// Capacity of the event channel to the node (default 1024). When it is full, reading from
    /// peers pauses, and QUIC flow control pushes back on them.
    pub event_queue_events_max: usize,
    /// Connected peers at most (default 256); more are refused after their hello.
    pub peers_max: usize,
    /// Incoming handshakes in progress at most (default 64); more are refused at once.
    pub handshakes_max: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            compression_bytes_min: COMPRESSION_BYTES_MIN_DEFAULT,
            send_queue_frames_max: 1024,
            send_queue_bytes_max: 64 * 1024 * 1024,
            event_queue_events_max: 1024,
            peers_max: 256,
            handshakes_max: 64,
        }
    }
}

impl Limits {
    pub(crate) fn frame_limits(&self) -> FrameLimits {
        FrameLimits { frame_bytes_max: self.frame_bytes_max, compression_bytes_min: self.compression_bytes_min }
    }
}

/// Timeouts and intervals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Timing {
    /// TLS plus the hello exchange must finish within this (default 10 s).
    pub handshake_timeout: Duration,
    /// A connection with no traffic for this long is dead (default 30 s; QUIC takes the
    /// smaller of the two sides' values).
    pub idle_timeout: Duration,
    /// A keep-alive is sent after this much silence (default 5 s).
    pub keep_alive: Duration,
    /// The first redial delay (default 100 ms); it doubles on every failure.
    pub redial_delay_min: Duration,
    /// The largest redial delay (default 10 s).
    pub redial_delay_max: Duration,
    /// How long `shutdown` lets connections flush their queues before closing them (default 5 s).
    pub shutdown_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            redial_delay_min: Duration::from_millis(100),
            redial_delay_max: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(5),
        }
    }
}
