//! Identities: the stable id of a node, and the origin id of one incarnation of it.
//!
//! A node keeps its [`NodeId`] for life. Every process start takes a fresh random [`OriginId`]
//! (chosen by the caller, since this crate has no randomness), which is also the automerge actor
//! of every change that incarnation makes. Sequences count per origin from 1. So a crash that
//! lost unflushed writes, or a restore from an old copy of the data directory, can never reuse an
//! (origin, sequence) or (actor, sequence) pair: the restarted process is a new origin.

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! id_type {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub [u8; 16]);

        impl $name {
            pub fn as_bytes(&self) -> &[u8; 16] {
                &self.0
            }

            /// Parses the 32-digit lowercase hex form produced by `Display`.
            pub fn from_hex(text: &str) -> Option<$name> {
                let bytes = hex::decode(text).ok()?;
                Some($name(bytes.try_into().ok()?))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(formatter, "{}({})", stringify!($name), self)
            }
        }
    };
}

id_type!(
    /// The stable identity of a node, created with its store.
    NodeId
);
id_type!(
    /// One incarnation (process start) of a node: the origin of its changes and their automerge actor.
    OriginId
);

impl OriginId {
    /// The automerge actor for changes made by this origin.
    pub fn actor(&self) -> automerge::ActorId {
        automerge::ActorId::from(&self.0[..])
    }

    /// The yrs client id for this origin: its first eight bytes folded into the 53 bits a
    /// JavaScript number holds exactly, as Yjs clients require.
    pub fn text_client_id(&self) -> u64 {
        let mut head = [0u8; 8];
        head.copy_from_slice(&self.0[..8]);
        u64::from_be_bytes(head) & ((1 << 53) - 1)
    }
}
