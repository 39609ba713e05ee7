//! What the transport tells the node, and the words both share: peer ids, events, disconnect
//! reasons and the application close codes on the wire.

use std::fmt;
use std::net::SocketAddr;

use bytes::Bytes;

use crate::counters::RefusalReason;

/// One connection to a peer, from the handshake to the disconnect.
///
/// Never reused while the endpoint lives: a reconnect to the same node gets a new `PeerId`, after
/// the old one's [`PeerEvent::Disconnected`]. The node keeps its own map from
/// [`PeerEvent::Connected::node_id`] to the current `PeerId`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub(crate) u64);

impl PeerId {
    /// The number behind the id, for logs and metrics labels.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "peer#{}", self.0)
    }
}

/// Who opened a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// This endpoint dialed the peer.
    Dialed,
    /// The peer dialed this endpoint.
    Accepted,
}

/// A connected peer, as [`crate::Endpoint::peers`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// This connection.
    pub peer_id: PeerId,
    /// The peer's node id, from its hello.
    pub node_id: [u8; 16],
    /// The peer's node name, from its hello (informational; see [`crate::tls`]).
    pub node_name: String,
    /// The peer's address as this endpoint sees it.
    pub address: SocketAddr,
    /// Where the peer says it accepts connections, from its hello.
    pub listen_address: Option<SocketAddr>,
    /// Who dialed.
    pub direction: Direction,
}

/// What the transport delivers on its one bounded event channel.
///
/// For one `peer_id` the order is always `Connected`, any number of `Frame`s in the order the
/// peer sent them, then `Disconnected`. When a duplicate connection replaces an older one to the
/// same node, the older one's `Disconnected` comes before the newer one's `Connected`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// A peer passed TLS and the handshake. Frames may be sent to `peer_id` from now on.
    Connected {
        peer_id: PeerId,
        node_id: [u8; 16],
        node_name: String,
        address: SocketAddr,
        listen_address: Option<SocketAddr>,
    },
    /// One frame's payload, decompressed.
    Frame { peer_id: PeerId, bytes: Bytes },
    /// The connection is gone; frames still queued for it were dropped.
    Disconnected { peer_id: PeerId, reason: DisconnectReason },
}

/// Why a connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DisconnectReason {
    /// This endpoint is shutting down, or the node dropped the event receiver.
    Shutdown,
    /// Another connection to the same node won (see [`crate::Endpoint`] on duplicates).
    Replaced,
    /// The peer sent bytes that are not a valid frame, or a frame over the limit. Counted in
    /// `bad_frames`.
    BadFrame(String),
    /// The peer ended its stream: it is shutting down.
    StreamFinished,
    /// The peer closed the connection with this application code and reason.
    PeerClosed { code: u64, reason: String },
    /// The connection failed: idle timeout, reset, or a transport error.
    ConnectionLost(String),
    /// This node closed it with [`crate::Endpoint::disconnect`], for this reason.
    Requested(String),
}

impl DisconnectReason {
    pub(crate) fn close_code(&self) -> CloseCode {
        match self {
            DisconnectReason::Replaced => CloseCode::Replaced,
            DisconnectReason::BadFrame(_) => CloseCode::BadFrame,
            DisconnectReason::Requested(_) => CloseCode::Requested,
            DisconnectReason::Shutdown
            | DisconnectReason::StreamFinished
            | DisconnectReason::PeerClosed { .. }
            | DisconnectReason::ConnectionLost(_) => CloseCode::Closing,
        }
    }

    pub(crate) fn from_connection_error(error: &quinn::ConnectionError) -> DisconnectReason {
        match error {
            // The peer applied the duplicate rule before we did; the outcome is the same.
            quinn::ConnectionError::ApplicationClosed(close)
                if close.error_code.into_inner() == CloseCode::Replaced as u64 =>
            {
                DisconnectReason::Replaced
            }
            quinn::ConnectionError::ApplicationClosed(close) => DisconnectReason::PeerClosed {
                code: close.error_code.into_inner(),
                reason: String::from_utf8_lossy(&close.reason).into_owned(),
            },
            quinn::ConnectionError::LocallyClosed => DisconnectReason::Shutdown,
            other => DisconnectReason::ConnectionLost(other.to_string()),
        }
    }
}

impl fmt::Display for DisconnectReason {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DisconnectReason::Shutdown => formatter.write_str("shutting down"),
            DisconnectReason::Replaced => formatter.write_str("replaced by another connection to the same node"),
            DisconnectReason::BadFrame(problem) => write!(formatter, "bad frame: {problem}"),
            DisconnectReason::StreamFinished => formatter.write_str("the peer ended its stream"),
            DisconnectReason::PeerClosed { code, reason } => {
                let name = CloseCode::from_u64(*code).map_or("unknown", CloseCode::name);
                write!(formatter, "closed by the peer ({name}): {reason}")
            }
            DisconnectReason::ConnectionLost(problem) => write!(formatter, "connection lost: {problem}"),
            DisconnectReason::Requested(reason) => write!(formatter, "disconnected by this node: {reason}"),
        }
    }
}

/// The application error codes in a QUIC CONNECTION_CLOSE. The reason phrase beside the code is
/// a human-readable sentence for the other side's log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum CloseCode {
    /// An orderly close: shutdown, or the other side ended its stream.
    Closing = 0,
    /// Another connection between the same two nodes was kept.
    Replaced = 1,
    /// The peer sent a malformed or oversized frame.
    BadFrame = 2,
    /// The peer's hello was malformed or late.
    BadHandshake = 3,
    /// The peers are in different clusters.
    ClusterMismatch = 4,
    /// The peers speak different protocol versions.
    ProtocolMismatch = 5,
    /// The node dialed itself.
    SelfConnection = 6,
    /// The closing side has `peers_max` peers already.
    PeersFull = 7,
    /// The closing node asked for it (`Endpoint::disconnect`), for example because the peer's
    /// frames broke the application protocol.
    Requested = 8,
}

impl CloseCode {
    const ALL: [CloseCode; 9] = [
        CloseCode::Closing,
        CloseCode::Replaced,
        CloseCode::BadFrame,
        CloseCode::BadHandshake,
        CloseCode::ClusterMismatch,
        CloseCode::ProtocolMismatch,
        CloseCode::SelfConnection,
        CloseCode::PeersFull,
        CloseCode::Requested,
    ];

    /// The code for a number read off the wire, if it is one of ours.
    pub fn from_u64(code: u64) -> Option<CloseCode> {
        CloseCode::ALL.into_iter().find(|candidate| *candidate as u64 == code)
    }

    /// A snake_case name for logs.
    pub fn name(self) -> &'static str {
        match self {
            CloseCode::Closing => "closing",
            CloseCode::Replaced => "replaced",
            CloseCode::BadFrame => "bad_frame",
            CloseCode::BadHandshake => "bad_handshake",
            CloseCode::ClusterMismatch => "cluster_mismatch",
            CloseCode::ProtocolMismatch => "protocol_mismatch",
            CloseCode::SelfConnection => "self_connection",
            CloseCode::PeersFull => "peers_full",
            CloseCode::Requested => "requested",
        }
    }

    pub(crate) fn varint(self) -> quinn::VarInt {
        quinn::VarInt::from_u32(self as u32)
    }

    /// The refusal a peer's close with this code during the handshake means.
    pub(crate) fn refusal(self) -> Option<RefusalReason> {
        match self {
            CloseCode::BadHandshake => Some(RefusalReason::BadHandshake),
            CloseCode::ClusterMismatch => Some(RefusalReason::ClusterMismatch),
            CloseCode::ProtocolMismatch => Some(RefusalReason::ProtocolMismatch),
            CloseCode::SelfConnection => Some(RefusalReason::SelfConnection),
            CloseCode::PeersFull => Some(RefusalReason::PeersFull),
            CloseCode::Closing | CloseCode::Replaced | CloseCode::BadFrame | CloseCode::Requested => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_round_trip() {
        for code in CloseCode::ALL {
            assert_eq!(CloseCode::from_u64(code as u64), Some(code));
            assert_eq!(code.varint().into_inner(), code as u64);
        }
        assert_eq!(CloseCode::from_u64(99), None);
    }
}
