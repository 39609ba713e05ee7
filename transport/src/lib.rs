//! Concord's transport: frames of bytes between authenticated peers over QUIC.
//!
//! It knows peers, certificates and frames, and never what a frame means: no record, document
//! or store type appears here, and the crate depends on none of ours. The node turns frames into
//! envelopes and back.
//!
//! # What it does
//!
//! An [`Endpoint`] binds one UDP socket with quinn. It accepts connections and dials the
//! addresses it is given ([`EndpointConfig::seeds`], [`Endpoint::connect`]), redialing each one
//! forever with exponential backoff (100 ms doubling to 10 s, plus up to 25 % jitter) until
//! [`Endpoint::shutdown`]. Every connection carries one long-lived bidirectional stream with
//! frames in both directions. The node hears about peers and frames on one bounded channel of
//! [`PeerEvent`]s and sends with [`Endpoint::send`], which queues onto a bounded per-peer queue
//! and answers [`SendError::Full`] instead of waiting or buffering without bound.
//! [`Endpoint::disconnect`] closes one connection (say, a peer whose frames broke the
//! application protocol); [`Endpoint::peers`] and [`Endpoint::counters`] report.
//!
//! # Authentication
//!
//! TLS 1.3 (rustls with the ring provider only) with mutual authentication against the cluster
//! CA, ALPN `concord/1`. A peer without a client certificate, with a certificate from another
//! CA, or with an expired certificate is refused during TLS, before any application byte. Any
//! certificate the cluster CA signed is a member; names in it are not checked, because a dialer
//! knows only an address (see [`tls`] for the server-name scheme). [`certificates`] creates the
//! CA and node certificates and loads them. There is no plaintext mode and no way to skip
//! verification.
//!
//! # The handshake
//!
//! After TLS, the dialer opens the stream and sends its [`Hello`]: protocol version, cluster id,
//! node id, node name and listen address. The listener checks it, admits the connection, and
//! answers with its own hello, which the dialer checks in turn. A peer of another protocol
//! version or cluster, or the node itself, is refused: the connection is closed with a
//! [`CloseCode`] and a sentence, and both sides log it ("peer 'b1' at 10.0.0.2:7000 is in cluster
//! 'b', we are 'a'" on one side, "the peer refused us: node 'a1' is in cluster 'a', and you are in
//! cluster 'b'" on the other). Refusals are counted by [`RefusalReason`]. No frame is delivered
//! from a connection before its handshake passed.
//!
//! Two nodes that dial each other at once keep exactly one connection: the one dialed by the
//! lower node id (the rule is in the `peers` module). The node sees the loser's `Disconnected` before the winner's
//! `Connected`.
//!
//! # Frames
//!
//! `length: u32 BE | flags: u8 | payload`, where flag bit 0 marks a zstd-compressed payload and
//! the other bits must be zero. Payloads of 4 KiB or more are compressed when that makes them
//! smaller. Decoding is synchronous over a buffer ([`frame`]); the async code only reads and
//! writes. A write gathers every frame queued at that moment (up to 1 MiB) into one write.
//!
//! # Limits
//!
//! Every bound is in [`Limits`] and [`Timing`]:
//!
//! - `frame_bytes_max` (16 MiB) bounds a frame on the wire and after decompression; a peer that
//!   sends a longer length, a reserved flag, corrupt zstd or a bomb is disconnected (only that
//!   peer), logged, and counted in `bad_frames`. Hellos are at most 1 KiB.
//! - `send_queue_frames_max` (1024) and `send_queue_bytes_max` (64 MiB) bound each peer's
//!   queue; past them `send` answers `Full`.
//! - `event_queue_events_max` (1024) bounds the event channel; while it is full, reading stops
//!   and QUIC flow control pushes back on the peers.
//! - `peers_max` (256) connected peers and `handshakes_max` (64) handshakes in progress; more
//!   are refused.
//! - At most 4 bidirectional streams per connection and no unidirectional ones; 30 s idle
//!   timeout with a keep-alive every 5 s; 10 s for TLS plus the hello.
//!
//! # Start-up
//!
//! The node calls [`install_crypto_provider`] first thing, then builds an [`EndpointConfig`] from
//! [`NodeCertificates::load`] and calls [`Endpoint::bind`] (see its example).

pub mod certificates;
pub mod frame;
pub mod handshake;

pub mod tls;

mod backoff;
mod config;
mod connection;
mod counters;
mod endpoint;
mod events;
mod peers;

#[cfg(test)]
mod tests;

pub use bytes::Bytes;
pub use certificates::{NodeCertificates, Validity, create_cluster_ca, issue_node_certificate};
pub use config::{EndpointConfig, FRAME_BYTES_MAX_LIMIT, Limits, Timing};
pub use counters::{CountersSnapshot, RefusalReason};
pub use endpoint::{BindError, ConnectError, DIAL_TARGETS_MAX, Endpoint, LEARNED_FAILURES_MAX};
pub use events::{CloseCode, Direction, DisconnectReason, PeerEvent, PeerId, PeerInfo};
pub use handshake::{Hello, PROTOCOL_VERSION};
pub use peers::SendError;

/// Makes ring the process-wide rustls crypto provider. Call it first thing in `main`, before
/// anything else uses rustls. Calling it again, or after another provider was installed, does
/// nothing. The transport itself always passes ring explicitly, so it works either way.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
