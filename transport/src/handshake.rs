//! The application handshake: the hello each side sends first on the stream, its encoding, and
//! the checks on the peer's hello. Synchronous, over slices; the endpoint does the I/O.
//!
//! Not TLS: by the time a hello is read, TLS has already proved that the peer holds a
//! certificate signed by the cluster CA.
//!
//! # Encoding
//!
//! A hello travels as the payload of one uncompressed frame of at most [`HELLO_BYTES_MAX`]
//! bytes. All integers are big-endian; strings are UTF-8 with a one-byte length.
//!
//! ```text
//! protocol_version: u32      first, so that any future version can still say which it is
//! cluster_id:       u8 length + bytes
//! node_id:          16 bytes
//! node_name:        u8 length + bytes
//! listen_address:   u8 tag (0 none, 4 IPv4, 6 IPv6) + 4 or 16 address bytes + u16 port
//! ```
//!
//! Nothing may follow. A peer whose version differs is refused from the version alone, so a
//! later version may change everything after the first four bytes.
//!
//! # Order and refusals
//!
//! The dialer sends its hello first. The listener checks it and admits the connection before it
//! answers, so a dialer never hears a hello on a connection the listener refused; the dialer then
//! checks the listener's hello the same way. A refusal closes the QUIC connection with a
//! [`CloseCode`] and a sentence for the other side's log. When the listener refuses because it
//! keeps another connection to the dialing node ([`CloseCode::Replaced`]), the sentence ends with
//! `(node <32 hex digits>)`, the listener's node id, so the dialer learns which node it reached
//! and waits for the kept connection to end instead of redialing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::counters::RefusalReason;
use crate::events::CloseCode;

/// The protocol this build speaks, framing and what the node puts in frames together. Peers
/// must speak the same one. 2: frames start with a channel byte (replication or membership),
/// and replication has snapshots. 3: envelopes and snapshot records may carry yrs records.
pub const PROTOCOL_VERSION: u32 = 3;
/// The largest hello frame payload accepted.
pub const HELLO_BYTES_MAX: usize = 1024;

/// What each side says about itself before any other frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub protocol_version: u32,
    /// The cluster the sender belongs to; must equal ours.
    pub cluster_id: String,
    /// The sender's node id, for life.
    pub node_id: [u8; 16],
    /// The sender's human-readable name.
    pub node_name: String,
    /// Where the sender accepts connections, if it says.
    pub listen_address: Option<SocketAddr>,
}

/// Why bytes are not a hello.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HelloDecodeError {
    /// The bytes end inside a field.
    #[error("the hello ends inside the {0} field")]
    Truncated(&'static str),
    /// A string field is not UTF-8.
    #[error("the {0} field is not UTF-8")]
    NotUtf8(&'static str),
    /// A string field has a control character (it would end up in log lines).
    #[error("the {0} field has a control character")]
    ControlCharacter(&'static str),
    /// The address tag is not 0, 4 or 6.
    #[error("unknown listen address tag {0}")]
    UnknownAddressTag(u8),
    /// Bytes follow the last field.
    #[error("{0} bytes follow the hello")]
    TrailingBytes(usize),
}

/// Why a peer's hello was refused. The connection is closed with the matching
/// [`crate::CloseCode`] and this text as the reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The peer speaks another protocol version.
    #[error("peer {peer} speaks protocol {peer_version}, we speak {our_version}")]
    ProtocolMismatch { peer: String, peer_version: u32, our_version: u32 },
    /// The peer belongs to another cluster.
    #[error("peer {peer} is in cluster '{peer_cluster_id}', we are '{our_cluster_id}'")]
    ClusterMismatch { peer: String, peer_cluster_id: String, our_cluster_id: String },
    /// The peer is this node (a seed list that names ourselves, or a loop through an address
    /// translation).
    #[error("peer {peer} is this node itself")]
    SelfConnection { peer: String },
    /// The peer's hello is malformed.
    #[error("peer {peer} sent a malformed hello: {error}")]
    Malformed { peer: String, error: HelloDecodeError },
}

impl Refusal {
    /// What the refused peer is told in the close reason: the same facts, from its side.
    pub(crate) fn phrase_for_peer(&self, our_node_name: &str) -> String {
        let us = our_node_name.escape_debug();
        match self {
            Refusal::ProtocolMismatch { peer_version, our_version, .. } => {
                format!("node '{us}' speaks protocol {our_version}, and you speak {peer_version}")
            }
            Refusal::ClusterMismatch { peer_cluster_id, our_cluster_id, .. } => {
                format!("node '{us}' is in cluster '{our_cluster_id}', and you are in cluster '{peer_cluster_id}'")
            }
            Refusal::SelfConnection { .. } => format!("you are node '{us}' itself"),
            Refusal::Malformed { error, .. } => format!("node '{us}' could not read your hello: {error}"),
        }
    }

    pub(crate) fn close_code(&self) -> CloseCode {
        match self {
            Refusal::ProtocolMismatch { .. } => CloseCode::ProtocolMismatch,
            Refusal::ClusterMismatch { .. } => CloseCode::ClusterMismatch,
            Refusal::SelfConnection { .. } => CloseCode::SelfConnection,
            Refusal::Malformed { .. } => CloseCode::BadHandshake,
        }
    }

    pub(crate) fn reason(&self) -> RefusalReason {
        match self {
            Refusal::ProtocolMismatch { .. } => RefusalReason::ProtocolMismatch,
            Refusal::ClusterMismatch { .. } => RefusalReason::ClusterMismatch,
            Refusal::SelfConnection { .. } => RefusalReason::SelfConnection,
            Refusal::Malformed { .. } => RefusalReason::BadHandshake,
        }
    }
}

impl Hello {
    /// The hello as a frame payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut output = Vec::with_capacity(64);
        output.extend_from_slice(&self.protocol_version.to_be_bytes());
        put_string(&mut output, &self.cluster_id);
        output.extend_from_slice(&self.node_id);
        put_string(&mut output, &self.node_name);
        match self.listen_address {
            None => output.push(0),
            Some(SocketAddr::V4(address)) => {
                output.push(4);
                output.extend_from_slice(&address.ip().octets());
                output.extend_from_slice(&address.port().to_be_bytes());
            }
            Some(SocketAddr::V6(address)) => {
                output.push(6);
                output.extend_from_slice(&address.ip().octets());
                output.extend_from_slice(&address.port().to_be_bytes());
            }
        }
        output
    }

    /// The protocol version alone: all a peer of another version can rely on.
    pub fn decode_version(bytes: &[u8]) -> Result<u32, HelloDecodeError> {
        Reader { bytes }.u32("protocol_version")
    }

    /// Parses a whole hello of this protocol version.
    pub fn decode(bytes: &[u8]) -> Result<Hello, HelloDecodeError> {
        let mut reader = Reader { bytes };
        let hello = Hello {
            protocol_version: reader.u32("protocol_version")?,
            cluster_id: reader.string("cluster_id")?,
            node_id: reader.array("node_id")?,
            node_name: reader.string("node_name")?,
            listen_address: reader.address()?,
        };
        if !reader.bytes.is_empty() {
            return Err(HelloDecodeError::TrailingBytes(reader.bytes.len()));
        }
        Ok(hello)
    }

    /// Checks a peer's hello payload against ours. `peer_address` names the peer in the
    /// refusal when its hello cannot even say its name.
    pub fn check_peer(&self, payload: &[u8], peer_address: SocketAddr) -> Result<Hello, Refusal> {
        let unnamed = || format!("at {peer_address}");
        let peer_version =
            Hello::decode_version(payload).map_err(|error| Refusal::Malformed { peer: unnamed(), error })?;
        if peer_version != self.protocol_version {
            // The rest may follow another layout; use the name only if it happens to parse.
            let peer = Hello::decode(payload).map(|hello| describe(&hello, peer_address)).unwrap_or_else(|_| unnamed());
            return Err(Refusal::ProtocolMismatch { peer, peer_version, our_version: self.protocol_version });
        }
        let hello = Hello::decode(payload).map_err(|error| Refusal::Malformed { peer: unnamed(), error })?;
        let peer = describe(&hello, peer_address);
        if hello.cluster_id != self.cluster_id {
            return Err(Refusal::ClusterMismatch {
                peer,
                peer_cluster_id: hello.cluster_id,
                our_cluster_id: self.cluster_id.clone(),
            });
        }
        if hello.node_id == self.node_id {
            return Err(Refusal::SelfConnection { peer });
        }
        Ok(hello)
    }
}

/// `'name' at address`, for log lines and refusals.
fn describe(hello: &Hello, address: SocketAddr) -> String {
    format!("'{}' at {address}", hello.node_name.escape_debug())
}

/// Strings longer than 255 bytes are cut at a character boundary. The endpoint refuses such
/// names in its configuration, so this only keeps the encoder total.
fn put_string(output: &mut Vec<u8>, value: &str) {
    let mut end = value.len().min(u8::MAX as usize);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    output.push(end as u8);
    output.extend_from_slice(&value.as_bytes()[..end]);
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize, field: &'static str) -> Result<&'a [u8], HelloDecodeError> {
        if self.bytes.len() < count {
            return Err(HelloDecodeError::Truncated(field));
        }
        let (taken, rest) = self.bytes.split_at(count);
        self.bytes = rest;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], HelloDecodeError> {
        let mut array = [0u8; N];
        array.copy_from_slice(self.take(N, field)?);
        Ok(array)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, HelloDecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    fn string(&mut self, field: &'static str) -> Result<String, HelloDecodeError> {
        let [length] = self.array(field)?;
        let bytes = self.take(usize::from(length), field)?;
        let string = String::from_utf8(bytes.to_vec()).map_err(|_| HelloDecodeError::NotUtf8(field))?;
        if string.chars().any(char::is_control) {
            return Err(HelloDecodeError::ControlCharacter(field));
        }
        Ok(string)
    }

    fn address(&mut self) -> Result<Option<SocketAddr>, HelloDecodeError> {
        const FIELD: &str = "listen_address";
        let [tag] = self.array(FIELD)?;
        let ip = match tag {
            0 => return Ok(None),
            4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>(FIELD)?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>(FIELD)?)),
            other => return Err(HelloDecodeError::UnknownAddressTag(other)),
        };
        let port = u16::from_be_bytes(self.array(FIELD)?);
        Ok(Some(SocketAddr::new(ip, port)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(cluster_id: &str, node_id: u8) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            cluster_id: cluster_id.to_owned(),
            node_id: [node_id; 16],
            node_name: format!("node-{node_id}"),
            listen_address: Some("127.0.0.1:7000".parse().unwrap()),
        }
    }

    fn address() -> SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    #[test]
    fn hellos_round_trip() {
        for listen_address in [None, Some("10.1.2.3:7000".parse().unwrap()), Some("[::1]:7001".parse().unwrap())] {
            let original = Hello { listen_address, ..hello("a", 1) };
            assert_eq!(Hello::decode(&original.encode()), Ok(original));
        }
    }

    #[test]
    fn the_largest_hello_fits_the_limit() {
        let largest = Hello {
            cluster_id: "c".repeat(255),
            node_name: "n".repeat(255),
            listen_address: Some("[::1]:7001".parse().unwrap()),
            ..hello("a", 1)
        };
        assert!(largest.encode().len() <= HELLO_BYTES_MAX);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = hello("a", 1).encode();
        for end in 0..bytes.len() {
            assert!(Hello::decode(&bytes[..end]).is_err(), "prefix of {end} bytes");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Hello::decode(&longer), Err(HelloDecodeError::TrailingBytes(1)));
    }

    #[test]
    fn a_matching_peer_is_accepted() {
        let peer = hello("a", 2);
        assert_eq!(hello("a", 1).check_peer(&peer.encode(), address()), Ok(peer));
    }

    #[test]
    fn another_cluster_is_refused_with_both_names() {
        let refusal = hello("a", 1).check_peer(&hello("b", 2).encode(), address()).unwrap_err();
        assert_eq!(refusal.to_string(), "peer 'node-2' at 127.0.0.1:9 is in cluster 'b', we are 'a'");
        assert_eq!(refusal.phrase_for_peer("node-1"), "node 'node-1' is in cluster 'a', and you are in cluster 'b'");
    }

    #[test]
    fn another_version_is_refused_even_if_the_rest_is_unreadable() {
        let future = PROTOCOL_VERSION + 1;
        let mut bytes = future.to_be_bytes().to_vec();
        bytes.extend_from_slice(b"a future layout");
        let refusal = hello("a", 1).check_peer(&bytes, address()).unwrap_err();
        assert_eq!(
            refusal.to_string(),
            format!("peer at 127.0.0.1:9 speaks protocol {future}, we speak {PROTOCOL_VERSION}")
        );
    }

    #[test]
    fn ourselves_is_refused() {
        let refusal = hello("a", 1).check_peer(&hello("a", 1).encode(), address()).unwrap_err();
        assert!(matches!(refusal, Refusal::SelfConnection { .. }));
    }

    #[test]
    fn garbage_is_malformed() {
        let mut bytes = PROTOCOL_VERSION.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[1, b'a', 0xff]);
        let refusal = hello("a", 1).check_peer(&bytes, address()).unwrap_err();
        assert!(matches!(refusal, Refusal::Malformed { error: HelloDecodeError::Truncated("node_id"), .. }));
        let mut bytes = PROTOCOL_VERSION.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[1, 0xff]);
        let refusal = hello("a", 1).check_peer(&bytes, address()).unwrap_err();
        assert!(matches!(refusal, Refusal::Malformed { error: HelloDecodeError::NotUtf8("cluster_id"), .. }));
        let sneaky = Hello { node_name: "n1\nFAKE LOG LINE".to_owned(), ..hello("a", 2) };
        let refusal = hello("a", 1).check_peer(&sneaky.encode(), address()).unwrap_err();
        assert!(matches!(refusal, Refusal::Malformed { error: HelloDecodeError::ControlCharacter("node_name"), .. }));
    }
}
