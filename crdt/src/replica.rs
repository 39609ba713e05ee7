//! The replication core: a sans-IO state machine that decides what to send to which peer and
//! what to apply, so that every node ends up holding every change, with bounded memory.
//!
//! It owns no socket, disk, clock or task. The node feeds it events through `handle_*` (time is
//! an argument) and drains what to do through `poll_*`, after every input, in this order:
//! [`Replica::poll_apply`] (changes to apply and persist), [`Replica::poll_transmit`] (messages to
//! send), then [`Replica::poll_timeout`] (when to call [`Replica::handle_timeout`] next).
//!
//! # Protocol
//! - **Summary** `{version_vector, credit}`: what the sender holds, and how many envelopes it can
//!   accept right now. Sent when a connection opens and every `summary_interval`. The receiver
//!   takes it as the truth about that peer: what it believes the peer holds is replaced by the
//!   summary, and its credit for the peer by the summary's credit. So a lost message, a peer
//!   restored from an old copy, or a confused count heals at the next summary.
//! - **Changes** `{envelopes}`: envelopes the receiver lacks, oldest first per origin, in chunks
//!   of at most `chunk_envelopes_max` envelopes and about `chunk_bytes_max` bytes.
//! - **Credit** `{envelopes, durable}`: the receiver has made that many envelopes durable (or
//!   found them to be duplicates), named in `durable`; the sender may send that many more, and
//!   counts them as acknowledged (see [`Replica::poll_acknowledged`]).
//!
//! - **Peers** `{addresses}`: peer exchange, handled by the node (which dials addresses it does
//!   not know); the core ignores it.
//!
//! Both directions run at once and independently: each side streams what the other lacks.
//!
//! # Bounded memory and backpressure
//! The core never queues envelopes for a peer. It remembers, per peer, what the peer holds and
//! how much credit it has, and reads the next envelopes from the change log (the
//! [`ChangeLog`] the node passes in) only when credit allows. A slow or stalled peer therefore
//! costs a version vector, not a buffer, and catches up from the log when it drains. Envelopes
//! received and not yet durable are bounded by the credit this node granted: a peer that sends
//! beyond it is refused with [`ProtocolError::CreditExceeded`].
//!
//! # Relay and catch-up
//! New local changes, and changes from a peer once durable, are pushed to every other peer that
//! lacks them (they appear in the log, and the per-peer difference picks them up), so a chain
//! A–B–C converges though A and C never talk. A change is never sent to a peer known to hold it
//! and never applied twice (the node's version vector deduplicates by origin and sequence), so
//! nothing loops. A node that reconnects exchanges summaries and receives exactly the
//! differences: catch-up costs O(missing changes), not O(dataset).
//!
//! # Example
//! ```
//! use std::time::Instant;
//! use crdt::envelope::Envelope;
//! use crdt::identity::OriginId;
//! use crdt::replica::{ChangeLog, Message, Replica, Settings};
//! use crdt::version_vector::VersionVector;
//!
//! struct EmptyLog;
//! impl ChangeLog for EmptyLog {
//!     fn read(&self, _origin: &OriginId, _from: u64, _limit: usize) -> Vec<Envelope> { Vec::new() }
//! }
//!
//! let now = Instant::now();
//! let mut replica = Replica::new(VersionVector::new(), Settings::default(), now);
//! replica.handle_peer_connected(now, 1);
//! // The first thing said to a new peer is a summary of what we hold.
//! let (peer, message) = replica.poll_transmit().expect("a summary");
//! assert_eq!(peer, 1);
//! assert!(matches!(message, Message::Summary { .. }));
//! assert!(replica.poll_apply().is_none());
//! # let _ = EmptyLog;
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::envelope::Envelope;
use crate::identity::OriginId;
use crate::version_vector::VersionVector;

/// The node's name for a connected peer (one per connection).
pub type PeerId = u64;

/// The largest encoded message accepted from a peer.
pub const MESSAGE_BYTES_MAX: usize = 16 << 20;

/// A message between two replicas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// What the sender holds, and how many envelopes it can accept now.
    Summary { version_vector: VersionVector, credit: u32 },
    /// Envelopes the receiver lacks.
    Changes { envelopes: Vec<Envelope> },
    /// The receiver may send this many more envelopes; `durable` names the ones it made durable
    /// (or already held), so writers waiting for acknowledgements by peers can count them.
    Credit { envelopes: u32, durable: Vec<(OriginId, u64)> },
    /// Peer exchange: addresses where the sender's peers listen. The node dials those it is not
    /// connected to; the replication core ignores this message.
    Peers { addresses: Vec<String> },
}

/// Why bytes are not a message.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message is {0} bytes; the limit is {MESSAGE_BYTES_MAX}")]
    TooLarge(usize),
    #[error("message does not decode: {0}")]
    Malformed(#[from] rmp_serde::decode::Error),
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        // Encoding plain structs into a Vec cannot fail.
        rmp_serde::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
        if bytes.len() > MESSAGE_BYTES_MAX {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        Ok(rmp_serde::from_slice(bytes)?)
    }
}

/// A peer broke the protocol; the node should disconnect it. The core forgot the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("peer {peer} sent {pending} envelopes not yet durable, beyond the {granted} it was granted")]
    CreditExceeded { peer: PeerId, pending: u32, granted: u32 },
    #[error("message from peer {0}, which is not connected")]
    UnknownPeer(PeerId),
}

/// Where the core reads envelopes to send: the node's change log.
pub trait ChangeLog {
    /// Envelopes of `origin` with sequence `>= from`, ascending, at most `limit`. Sequences the
    /// log does not hold are skipped.
    fn read(&self, origin: &OriginId, from: u64, limit: usize) -> Vec<Envelope>;
}

/// Tuning. The defaults suit a LAN or WAN mesh of a handful to dozens of nodes.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Envelopes a peer may send us before we acknowledge them durable.
    pub window_envelopes: u32,
    /// The most envelopes in one Changes message.
    pub chunk_envelopes_max: usize,
    /// A Changes message stops growing once its change bytes pass this.
    pub chunk_bytes_max: usize,
    /// How often each peer gets a summary (anti-entropy).
    pub summary_interval: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            window_envelopes: 4096,
            chunk_envelopes_max: 256,
            chunk_bytes_max: 1 << 20,
            summary_interval: Duration::from_secs(5),
        }
    }
}

/// What the core knows about one connected peer.
#[derive(Debug)]
struct Peer {
    /// What the peer holds: its last summary, plus what it sent us and we sent it since.
    known: VersionVector,
    /// Envelopes we may still send it.
    credit: u32,
    /// Envelopes it sent us that are not yet durable here: credit we owe it later.
    pending: u32,
    /// Credit we owe it now (durable or duplicate), sent with the next transmit round.
    owed: u32,
    /// Which of the envelopes it sent are durable here since the last credit we sent it.
    owed_durable: Vec<(OriginId, u64)>,
    /// When it is due its next summary.
    summary_due: Instant,
}

/// How far apart this node and one peer are, in changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PeerLag {
    /// Changes we hold that the peer lacks, as far as we know.
    pub peer_lacks: u64,
    /// Changes the peer holds that we lack, as far as we know.
    pub we_lack: u64,
}

/// The replication state machine of one node. See the module doc for how to drive it.
#[derive(Debug)]
pub struct Replica {
    /// What this node holds durably.
    local: VersionVector,
    settings: Settings,
    peers: BTreeMap<PeerId, Peer>,
    transmits: VecDeque<(PeerId, Message)>,
    applies: VecDeque<(PeerId, Envelope)>,
    /// Envelopes peers said they hold durably, for [`Replica::poll_acknowledged`].
    acknowledged: VecDeque<(PeerId, OriginId, u64)>,
}

impl Replica {
    /// A replica over what the node holds durably now (its version vector).
    pub fn new(local: VersionVector, settings: Settings, _now: Instant) -> Replica {
        Replica {
            local,
            settings,
            peers: BTreeMap::new(),
            transmits: VecDeque::new(),
            applies: VecDeque::new(),
            acknowledged: VecDeque::new(),
        }
    }

    /// What this node holds durably.
    pub fn version_vector(&self) -> &VersionVector {
        &self.local
    }

    pub fn handle_peer_connected(&mut self, now: Instant, peer: PeerId) {
        let state = Peer {
            known: VersionVector::new(),
            credit: 0,
            pending: 0,
            owed: 0,
            owed_durable: Vec::new(),
            summary_due: now + self.settings.summary_interval,
        };
        self.peers.insert(peer, state);
        self.send_summary(peer);
    }

    /// Forgets the peer. Envelopes it sent that are still being applied are kept: they are
    /// valid changes whoever delivered them.
    pub fn handle_peer_disconnected(&mut self, _now: Instant, peer: PeerId) {
        self.peers.remove(&peer);
    }

    pub fn handle_peer_message(
        &mut self,
        _now: Instant,
        peer: PeerId,
        message: Message,
        log: &impl ChangeLog,
    ) -> Result<(), ProtocolError> {
        let window = self.settings.window_envelopes;
        let state = self.peers.get_mut(&peer).ok_or(ProtocolError::UnknownPeer(peer))?;
        match message {
            Message::Summary { version_vector, credit } => {
                state.known = version_vector;
                state.credit = credit.min(window);
                self.pump(peer, log);
            }
            Message::Credit { envelopes, durable } => {
                state.credit = state.credit.saturating_add(envelopes).min(window);
                // Bounded by the frame size; the node keeps only what a waiting writer needs.
                self.acknowledged.extend(durable.into_iter().map(|(origin, sequence)| (peer, origin, sequence)));
                self.pump(peer, log);
            }
            Message::Peers { .. } => {}
            Message::Changes { envelopes } => {
                for envelope in envelopes {
                    state.known.insert(envelope.origin, envelope.sequence);
                    if self.local.contains(&envelope.origin, envelope.sequence) {
                        state.owed += 1;
                        state.owed_durable.push((envelope.origin, envelope.sequence));
                    } else {
                        state.pending += 1;
                        self.applies.push_back((peer, envelope));
                    }
                }
                // A peer may overrun by what was in flight when a summary reset its credit, so
                // the bound is two windows.
                let granted = window.saturating_mul(2);
                if state.pending > granted {
                    let pending = state.pending;
                    self.forget(peer);
                    return Err(ProtocolError::CreditExceeded { peer, pending, granted });
                }
                self.flush_credit();
            }
        }
        Ok(())
    }

    /// These envelopes are now durable here: local writes (`None`) or envelopes from
    /// [`Replica::poll_apply`] (`Some(peer)`, whether or not they changed anything). Grants the
    /// senders credit and relays the changes to every peer that lacks them.
    pub fn handle_durable(&mut self, _now: Instant, durable: &[(Option<PeerId>, OriginId, u64)], log: &impl ChangeLog) {
        for (source, origin, sequence) in durable {
            self.local.insert(*origin, *sequence);
            if let Some(peer) = source.and_then(|peer| self.peers.get_mut(&peer)) {
                peer.pending = peer.pending.saturating_sub(1);
                peer.owed += 1;
                peer.owed_durable.push((*origin, *sequence));
            }
        }
        self.flush_credit();
        let peers: Vec<PeerId> = self.peers.keys().copied().collect();
        for peer in peers {
            self.pump(peer, log);
        }
    }

    pub fn handle_timeout(&mut self, now: Instant, log: &impl ChangeLog) {
        let due: Vec<PeerId> =
            self.peers.iter().filter(|(_, state)| state.summary_due <= now).map(|(&peer, _)| peer).collect();
        for peer in due {
            if let Some(state) = self.peers.get_mut(&peer) {
                state.summary_due = now + self.settings.summary_interval;
            }
            self.send_summary(peer);
            self.pump(peer, log);
        }
    }

    /// A message to send to a peer.
    pub fn poll_transmit(&mut self) -> Option<(PeerId, Message)> {
        self.transmits.pop_front()
    }

    /// An envelope from a peer for the node to apply and persist, then report through
    /// [`Replica::handle_durable`].
    pub fn poll_apply(&mut self) -> Option<(PeerId, Envelope)> {
        self.applies.pop_front()
    }

    /// An envelope a peer says it now holds durably: (peer, origin, sequence).
    pub fn poll_acknowledged(&mut self) -> Option<(PeerId, OriginId, u64)> {
        self.acknowledged.pop_front()
    }

    /// When [`Replica::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.peers.values().map(|state| state.summary_due).min()
    }

    /// How far apart this node and each connected peer are.
    pub fn peer_lags(&self) -> BTreeMap<PeerId, PeerLag> {
        self.peers
            .iter()
            .map(|(&peer, state)| {
                let lag = PeerLag {
                    peer_lacks: self.local.count_missing_from(&state.known),
                    we_lack: state.known.count_missing_from(&self.local),
                };
                (peer, lag)
            })
            .collect()
    }

    fn forget(&mut self, peer: PeerId) {
        self.peers.remove(&peer);
        self.transmits.retain(|(target, _)| *target != peer);
    }

    fn send_summary(&mut self, peer: PeerId) {
        let Some(state) = self.peers.get(&peer) else { return };
        let credit = self.settings.window_envelopes.saturating_sub(state.pending);
        self.transmits.push_back((peer, Message::Summary { version_vector: self.local.clone(), credit }));
    }

    fn flush_credit(&mut self) {
        for (&peer, state) in &mut self.peers {
            if state.owed > 0 {
                let durable = std::mem::take(&mut state.owed_durable);
                self.transmits.push_back((peer, Message::Credit { envelopes: state.owed, durable }));
                state.owed = 0;
            }
        }
    }

    /// Sends the peer what it lacks, oldest first per origin, while it has credit.
    fn pump(&mut self, peer: PeerId, log: &impl ChangeLog) {
        let Some(state) = self.peers.get_mut(&peer) else { return };
        if state.credit == 0 {
            return;
        }
        let mut chunk: Vec<Envelope> = Vec::new();
        let mut chunk_bytes = 0;
        for (origin, ranges) in self.local.missing_from(&state.known) {
            for (start, end) in ranges {
                let mut next = start;
                while next <= end && state.credit > 0 {
                    let room = (self.settings.chunk_envelopes_max - chunk.len()).min(state.credit as usize);
                    let wanted = usize::try_from(end - next + 1).unwrap_or(usize::MAX).min(room);
                    let envelopes = log.read(&origin, next, wanted);
                    let Some(last_sequence) = envelopes.last().map(|envelope| envelope.sequence) else { break };
                    for envelope in envelopes.into_iter().filter(|envelope| envelope.sequence <= end) {
                        state.known.insert(envelope.origin, envelope.sequence);
                        state.credit -= 1;
                        chunk_bytes += envelope.change.len();
                        chunk.push(envelope);
                    }
                    if chunk.len() >= self.settings.chunk_envelopes_max || chunk_bytes >= self.settings.chunk_bytes_max
                    {
                        self.transmits.push_back((peer, Message::Changes { envelopes: std::mem::take(&mut chunk) }));
                        chunk_bytes = 0;
                    }
                    // The log may hold sequences up to u64::MAX; nothing follows that one.
                    match last_sequence.checked_add(1) {
                        Some(after) => next = after,
                        None => break,
                    }
                }
                if state.credit == 0 {
                    break;
                }
            }
        }
        if !chunk.is_empty() {
            self.transmits.push_back((peer, Message::Changes { envelopes: chunk }));
        }
    }
}
