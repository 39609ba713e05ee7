//! Change envelopes: one local write, wrapped with everything replication needs to route,
//! deduplicate and order it, and their bounded wire encoding.

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::identity::{NodeId, OriginId};
use crate::key::RecordKey;

/// The largest encoded envelope accepted from a peer or the disk.
pub const ENVELOPE_BYTES_MAX: usize = 4 << 20;

/// Which CRDT a document is, and so how its change bytes are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DocumentKind {
    /// A JSON record: the change bytes are automerge changes.
    Record,
    /// A collaborative text: the change bytes are a Yjs update (v1).
    Text,
    /// A JSON record held as a Y.Map (the yrs record engine, [`crate::map_record`]): the change
    /// bytes are a Yjs update (v1).
    MapRecord,
}

/// One local write as it travels: (origin, sequence) names it uniquely and for ever.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The incarnation that made the write.
    pub origin: OriginId,
    /// The node that incarnation belongs to.
    pub node: NodeId,
    /// Per-origin sequence, from 1, without gaps at the origin.
    pub sequence: u64,
    /// When the write was made, on the origin's hybrid logical clock.
    pub timestamp: Timestamp,
    pub key: RecordKey,
    pub kind: DocumentKind,
    /// Automerge change bytes or a Yjs update, as `kind` says.
    #[serde(with = "serde_bytes")]
    pub change: Vec<u8>,
}

/// Why bytes are not an envelope.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("envelope is {0} bytes; the limit is {ENVELOPE_BYTES_MAX}")]
    TooLarge(usize),
    #[error("envelope does not decode: {0}")]
    Malformed(#[from] rmp_serde::decode::Error),
}

impl Envelope {
    pub fn encode(&self) -> Vec<u8> {
        // Encoding plain structs into a Vec cannot fail.
        rmp_serde::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
        if bytes.len() > ENVELOPE_BYTES_MAX {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        Ok(rmp_serde::from_slice(bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        Envelope {
            origin: OriginId([7; 16]),
            node: NodeId([1; 16]),
            sequence: 42,
            timestamp: Timestamp { wall_ms: 1_700_000_000_000, logical: 3 },
            key: RecordKey::new("orders", "o-1").unwrap(),
            kind: DocumentKind::Record,
            change: vec![1, 2, 3],
        }
    }

    #[test]
    fn round_trips() {
        let envelope = sample();
        assert_eq!(Envelope::decode(&envelope.encode()).unwrap(), envelope);
    }

    #[test]
    fn refuses_garbage_truncation_and_oversize() {
        let bytes = sample().encode();
        for length in 0..bytes.len() {
            assert!(Envelope::decode(&bytes[..length]).is_err(), "prefix of {length} bytes decoded");
        }
        assert!(matches!(Envelope::decode(&vec![0u8; ENVELOPE_BYTES_MAX + 1]), Err(DecodeError::TooLarge(_))));
    }

    #[test]
    fn refuses_an_invalid_key_inside_a_well_formed_envelope() {
        let mut bytes = sample().encode();
        let position = bytes.windows(6).position(|window| window == b"orders").unwrap();
        bytes[position] = b' ';
        assert!(Envelope::decode(&bytes).is_err());
    }
}
