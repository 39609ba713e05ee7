//! Counters the transport keeps while it runs, and the snapshot the node renders.
//!
//! Plain relaxed atomics: each counter is exact on its own, a snapshot is not one instant across
//! counters. Not a metrics exporter: the node decides how to show them.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a peer was refused before it could deliver a frame. Counted per reason, on whichever side
/// saw it (a refusal during TLS is usually seen by both).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RefusalReason {
    /// The dialer presented no client certificate.
    NoCertificate,
    /// A certificate not signed by the cluster CA, or otherwise not acceptable (wrong key usage,
    /// bad signature).
    UntrustedCertificate,
    /// A certificate outside its validity period.
    ExpiredCertificate,
    /// Any other TLS failure (no common ALPN protocol, no common cipher suite, ...).
    OtherTls,
    /// The peer's hello names another cluster.
    ClusterMismatch,
    /// The peer's hello names another protocol version.
    ProtocolMismatch,
    /// The peer's hello was malformed, or did not arrive in time.
    BadHandshake,
    /// The peer is this node.
    SelfConnection,
    /// `peers_max` connections are already up.
    PeersFull,
    /// `handshakes_max` handshakes were already in progress.
    Busy,
}

impl RefusalReason {
    /// Every reason, in a stable order.
    pub const ALL: [RefusalReason; 10] = [
        RefusalReason::NoCertificate,
        RefusalReason::UntrustedCertificate,
        RefusalReason::ExpiredCertificate,
        RefusalReason::OtherTls,
        RefusalReason::ClusterMismatch,
        RefusalReason::ProtocolMismatch,
        RefusalReason::BadHandshake,
        RefusalReason::SelfConnection,
        RefusalReason::PeersFull,
        RefusalReason::Busy,
    ];

    /// A snake_case name for metrics labels and logs.
    pub fn name(self) -> &'static str {
        match self {
            RefusalReason::NoCertificate => "no_certificate",
            RefusalReason::UntrustedCertificate => "untrusted_certificate",
            RefusalReason::ExpiredCertificate => "expired_certificate",
            RefusalReason::OtherTls => "other_tls",
            RefusalReason::ClusterMismatch => "cluster_mismatch",
            RefusalReason::ProtocolMismatch => "protocol_mismatch",
            RefusalReason::BadHandshake => "bad_handshake",
            RefusalReason::SelfConnection => "self_connection",
            RefusalReason::PeersFull => "peers_full",
            RefusalReason::Busy => "busy",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The live counters, shared by every task of one endpoint.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) frames_sent: AtomicU64,
    pub(crate) payload_bytes_sent: AtomicU64,
    pub(crate) wire_bytes_sent: AtomicU64,
    pub(crate) frames_received: AtomicU64,
    pub(crate) payload_bytes_received: AtomicU64,
    pub(crate) wire_bytes_received: AtomicU64,
    pub(crate) bad_frames: AtomicU64,
    pub(crate) send_queue_full: AtomicU64,
    pub(crate) connections_accepted: AtomicU64,
    pub(crate) connections_dialed: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) duplicates_closed: AtomicU64,
    refused: [AtomicU64; RefusalReason::ALL.len()],
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, amount: u64) {
        counter.fetch_add(amount, Ordering::Relaxed);
    }

    pub(crate) fn refuse(&self, reason: RefusalReason) {
        Counters::add(&self.refused[reason.index()], 1);
    }

    pub(crate) fn snapshot(&self) -> CountersSnapshot {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        CountersSnapshot {
            frames_sent: load(&self.frames_sent),
            payload_bytes_sent: load(&self.payload_bytes_sent),
            wire_bytes_sent: load(&self.wire_bytes_sent),
            frames_received: load(&self.frames_received),
            payload_bytes_received: load(&self.payload_bytes_received),
            wire_bytes_received: load(&self.wire_bytes_received),
            bad_frames: load(&self.bad_frames),
            send_queue_full: load(&self.send_queue_full),
            connections_accepted: load(&self.connections_accepted),
            connections_dialed: load(&self.connections_dialed),
            reconnects: load(&self.reconnects),
            duplicates_closed: load(&self.duplicates_closed),
            refused: std::array::from_fn(|index| load(&self.refused[index])),
        }
    }
}

/// The counters at one moment, for the node to render. All count since the endpoint was bound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CountersSnapshot {
    /// Frames written to peers.
    pub frames_sent: u64,
    /// Payload bytes of those frames, before compression.
    pub payload_bytes_sent: u64,
    /// Bytes written to streams: headers plus payloads after compression (hellos included).
    pub wire_bytes_sent: u64,
    /// Frames delivered as [`crate::PeerEvent::Frame`].
    pub frames_received: u64,
    /// Payload bytes of those frames, after decompression.
    pub payload_bytes_received: u64,
    /// Bytes read from streams (hellos included).
    pub wire_bytes_received: u64,
    /// Malformed or oversized frames; each disconnected its peer.
    pub bad_frames: u64,
    /// [`crate::SendError::Full`] answers.
    pub send_queue_full: u64,
    /// Connections a peer dialed that passed the handshake.
    pub connections_accepted: u64,
    /// Connections this endpoint dialed that passed the handshake.
    pub connections_dialed: u64,
    /// Dial attempts after the first for the same address (after a failure or a disconnect).
    pub reconnects: u64,
    /// Connections closed because another connection to the same node won.
    pub duplicates_closed: u64,
    refused: [u64; RefusalReason::ALL.len()],
}

impl CountersSnapshot {
    /// Peers refused for `reason`.
    pub fn refused(&self, reason: RefusalReason) -> u64 {
        self.refused[reason.index()]
    }

    /// Peers refused for any reason.
    pub fn refused_total(&self) -> u64 {
        self.refused.iter().sum()
    }

    /// Every counter as `(name, value)`, refusals as `refused_<reason>`, in a stable order.
    pub fn fields(&self) -> Vec<(&'static str, u64)> {
        let mut fields = vec![
            ("frames_sent", self.frames_sent),
            ("payload_bytes_sent", self.payload_bytes_sent),
            ("wire_bytes_sent", self.wire_bytes_sent),
            ("frames_received", self.frames_received),
            ("payload_bytes_received", self.payload_bytes_received),
            ("wire_bytes_received", self.wire_bytes_received),
            ("bad_frames", self.bad_frames),
            ("send_queue_full", self.send_queue_full),
            ("connections_accepted", self.connections_accepted),
            ("connections_dialed", self.connections_dialed),
            ("reconnects", self.reconnects),
            ("duplicates_closed", self.duplicates_closed),
        ];
        fields.extend(RefusalReason::ALL.iter().map(|reason| (refused_name(*reason), self.refused(*reason))));
        fields
    }
}

fn refused_name(reason: RefusalReason) -> &'static str {
    match reason {
        RefusalReason::NoCertificate => "refused_no_certificate",
        RefusalReason::UntrustedCertificate => "refused_untrusted_certificate",
        RefusalReason::ExpiredCertificate => "refused_expired_certificate",
        RefusalReason::OtherTls => "refused_other_tls",
        RefusalReason::ClusterMismatch => "refused_cluster_mismatch",
        RefusalReason::ProtocolMismatch => "refused_protocol_mismatch",
        RefusalReason::BadHandshake => "refused_bad_handshake",
        RefusalReason::SelfConnection => "refused_self_connection",
        RefusalReason::PeersFull => "refused_peers_full",
        RefusalReason::Busy => "refused_busy",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_index_their_own_slot() {
        for (index, reason) in RefusalReason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), index);
        }
        let counters = Counters::default();
        counters.refuse(RefusalReason::Busy);
        counters.refuse(RefusalReason::Busy);
        counters.refuse(RefusalReason::NoCertificate);
        let snapshot = counters.snapshot();
        assert_eq!(snapshot.refused(RefusalReason::Busy), 2);
        assert_eq!(snapshot.refused(RefusalReason::NoCertificate), 1);
        assert_eq!(snapshot.refused_total(), 3);
        assert!(snapshot.fields().contains(&("refused_busy", 2)));
    }
}
