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
//!   restored from an old copy, or a confused count heals at a summary. Only the changes sent
//!   since the previous summary arrived stay believed held on top of it: a summary crosses the
//!   changes in flight, and taking it literally would send them again. A change sent before that
//!   and still missing was lost, and goes again; so does everything, at once, after the node
//!   reports a dropped message ([`Replica::handle_transmit_dropped`]).
//! - **Changes** `{envelopes}`: envelopes the receiver lacks, oldest first per origin, in chunks
//!   of at most `chunk_envelopes_max` envelopes and about `chunk_bytes_max` bytes.
//! - **Credit** `{envelopes, durable}`: the receiver has made that many envelopes durable (or
//!   found them to be duplicates), named in `durable`; the sender may send that many more, and
//!   counts them as acknowledged (see [`Replica::poll_acknowledged`]). A summary acknowledges
//!   its version vector too, which is how changes a peer got some other way (in a snapshot, or
//!   relayed by a third node) count.
//!
//! - **Peers** `{addresses}`: peer exchange, handled by the node (which dials addresses it does
//!   not know); the core ignores it.
//! - **Lazy** `{origins}`: the origins the sender gets first from another peer; the receiver
//!   relays them lazily (see "Lazy relay" below).
//! - **Snapshot** `{records}`: whole documents, for a peer being bootstrapped (see below), in key
//!   order, in chunks, under the same credit as changes (one record counts as one envelope).
//! - **SnapshotEnd** `{version_vector}`: the snapshot is complete. With the records before it,
//!   the receiver holds every change in `version_vector` (the sender's gap-free prefix per origin
//!   when the snapshot began).
//!
//! Both directions run at once and independently: each side streams what the other lacks.
//!
//! # Bootstrap and the log floor
//! The node's change log need not go back to the beginning: it is trimmed by age (retention),
//! and a node that was itself bootstrapped never had the early changes as envelopes. Per origin,
//! the *log floor* is the sequence from which the log holds every change this node holds; below
//! it the changes are only inside the documents. A peer is sent a snapshot instead of changes
//! when it lacks a change below a floor (it is further behind than the log), or when it holds
//! none of the changes we hold (a brand-new node: replaying all history would cost more than the
//! documents). The snapshot's records are read when they are sent, so each holds at least the
//! state at the start; the version vector sent at the end is the state at the start, so it never
//! claims more than the records hold. Afterwards the ordinary exchange sends the changes made
//! since, from the log. The receiver raises its own floors for the origins the snapshot brought
//! (see [`raise_log_floors`]): it holds those changes without their envelopes.
//!
//! # Bounded memory and backpressure
//! The core never queues envelopes for a peer. It remembers, per peer, what the peer holds and
//! how much credit it has, and reads the next envelopes from the change log (the
//! [`Source`] the node passes in) only when credit allows. A slow or stalled peer therefore
//! costs a version vector, not a buffer, and catches up from the log when it drains. Envelopes
//! received and not yet durable are bounded by the credit this node granted: a peer that sends
//! beyond it is refused with [`ProtocolError::CreditExceeded`].
//!
//! # Relay and catch-up
//! New local changes, and changes from a peer, are pushed to every other peer that lacks them
//! (unless it asked for them lazily, below) once they are in the log: they appear there, and the
//! per-peer difference picks them up. The node may say so before its flush makes them durable
//! ([`Replica::handle_available`]), so the next hop's apply and flush overlap this node's flush;
//! credit and summaries wait for durability ([`Replica::handle_durable`]). A chain A–B–C
//! converges though A and C never talk. A change is never sent to a peer known to hold it
//! and never applied twice (the node's version vector deduplicates by origin and sequence), so
//! nothing loops. A node that reconnects exchanges summaries and receives exactly the
//! differences: catch-up costs O(missing changes), not O(dataset).
//!
//! # Lazy relay
//! In a full mesh every node hears a change from its origin directly, so relaying it on sends
//! each peer a duplicate: twice the envelopes on the wire, and a decode and a dedup for nothing
//! (1.88 envelopes per delivery in the simulation's clean three-node mesh). So the receiver of a
//! duplicate (a copy of a change it already received, applied yet or not) asks the peer that
//! sent it to relay that origin *lazily* (a **Lazy** message with its whole list), as Plumtree's
//! PRUNE does, when another connected peer is that origin's *eager source*: the last peer to
//! bring one of its changes first while relaying it eagerly. The eager source itself is never
//! asked, so every origin keeps an eager path, and neither is a peer about its own changes
//! ([`Replica::handle_peer_identified`]). A peer relays a
//! lazy origin only as far as its last summaries show the receiver still lacking what the
//! relayer held a summary earlier: a change it had a whole summary interval to get from its
//! origin. When the eager source disconnects, every peer asked about its origins is asked to
//! relay them eagerly again (Plumtree's GRAFT), and duplicates choose a new one. A partition
//! that does not break the connection costs the lazy path's latency, two summary intervals at
//! most, never a change. In the simulation's clean mesh, lazy relay brings the envelopes sent
//! down to 1.03 per delivery, and believing the changes in flight past a summary (see
//! "Protocol") to 1.02.
//!
//! # Example
//! ```
//! use std::time::Instant;
//! use crdt::envelope::Envelope;
//! use crdt::identity::OriginId;
//! use crdt::key::RecordKey;
//! use crdt::replica::{LogFloors, Message, Replica, Settings, SnapshotRecord, Source};
//! use crdt::version_vector::VersionVector;
//!
//! struct Empty;
//! impl Source for Empty {
//!     fn changes(&self, _origin: &OriginId, _from: u64, _limit: usize) -> Vec<Envelope> { Vec::new() }
//!     fn records(&self, _after: Option<&RecordKey>, _limit: usize) -> Vec<SnapshotRecord> { Vec::new() }
//! }
//!
//! let now = Instant::now();
//! let mut replica = Replica::new(VersionVector::new(), LogFloors::new(), Settings::default(), now);
//! replica.handle_peer_connected(now, 1);
//! // The first thing said to a new peer is a summary of what we hold.
//! let (peer, message) = replica.poll_transmit().expect("a summary");
//! assert_eq!(peer, 1);
//! assert!(matches!(message, Message::Summary { .. }));
//! assert!(replica.poll_apply().is_none());
//! # let _ = Empty;
//! ```

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::envelope::{DocumentKind, Envelope};
use crate::identity::{NodeId, OriginId};
use crate::key::RecordKey;
use crate::version_vector::VersionVector;

/// How many summaries from a peer may predate a snapshot's end before we stop assuming that
/// (the end was lost): see `Peer::unconfirmed`.
const UNCONFIRMED_SUMMARIES: u32 = 3;

/// How many windows of envelopes a peer may have pending here before it counts as breaking the
/// protocol (see `check_credit`).
const PENDING_WINDOWS_MAX: u32 = 4;

/// The most origins a peer may ask us to relay lazily; the rest of a longer list is ignored (it
/// only costs the peer latency, never correctness).
pub const LAZY_ORIGINS_MAX: usize = 4096;

/// The node's name for a connected peer (one per connection).
pub type PeerId = u64;

/// The largest encoded message accepted from a peer.
pub const MESSAGE_BYTES_MAX: usize = 16 << 20;

/// Per origin, the sequence from which the change log holds every change this node holds (an
/// origin absent here has its whole history in the log).
pub type LogFloors = BTreeMap<OriginId, u64>;

/// A message between two replicas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// What the sender holds, and how many envelopes it can accept now. `snapshots` counts the
    /// snapshots the sender has finished receiving from the recipient on this connection
    /// (applied durably, or dropped as incomplete): a summary that predates a snapshot's end
    /// does not yet show what it brought. `receiving` says the sender is taking a snapshot from
    /// some peer now: a brand-new node joining several peers is bootstrapped by one of them.
    /// `epoch` numbers the sender's summaries on this connection, from 1 (see `Credit`).
    Summary { version_vector: VersionVector, credit: u32, snapshots: u32, receiving: bool, epoch: u32 },
    /// Envelopes the receiver lacks.
    Changes { envelopes: Vec<Envelope> },
    /// The receiver may send this many more envelopes; `durable` names the ones it made durable
    /// (or already held), so writers waiting for acknowledgements by peers can count them.
    /// `epoch` is the sender's latest summary: a grant from before a summary is already counted
    /// in that summary's credit, so the peer ignores it (no double grant).
    Credit { envelopes: u32, durable: Vec<(OriginId, u64)>, epoch: u32 },
    /// Peer exchange: addresses where the sender's peers listen. The node dials those it is not
    /// connected to; the replication core ignores this message.
    Peers { addresses: Vec<String> },
    /// The origins whose new changes the sender gets from another peer first: the receiver
    /// stops relaying them as they arrive and sends them only when the sender's summaries show
    /// it still lacks them (see "Lazy relay" in the module doc). The whole list each time, at
    /// most [`LAZY_ORIGINS_MAX`]; it replaces the one before.
    Lazy { origins: Vec<OriginId> },
    /// Whole documents for a peer being bootstrapped; `snapshot` numbers the snapshot on this
    /// connection, from 1.
    Snapshot { snapshot: u32, records: Vec<SnapshotRecord> },
    /// Snapshot number `snapshot` is complete after `records` records: with them, the receiver
    /// holds `version_vector`. A receiver that got fewer (a frame was dropped) ignores it.
    SnapshotEnd { snapshot: u32, records: u64, version_vector: VersionVector },
}

/// One document in a snapshot: its stored state as parts to apply in order, each one the kind
/// of bytes a change of that kind is (automerge chunks, or Yjs updates v1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub key: RecordKey,
    pub kind: DocumentKind,
    pub parts: Vec<ByteBuf>,
}

impl SnapshotRecord {
    /// About how many bytes the record takes in a message.
    pub fn size(&self) -> usize {
        self.parts.iter().map(|part| part.len()).sum::<usize>() + self.key.to_bytes().len()
    }
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

/// Where the core reads what it sends: the node's change log and documents.
pub trait Source {
    /// Envelopes of `origin` with sequence `>= from`, ascending, at most `limit`. Sequences the
    /// log does not hold are skipped.
    fn changes(&self, origin: &OriginId, from: u64, limit: usize) -> Vec<Envelope>;
    /// Documents in key order after `after` (from the first when `None`), at most `limit`, as
    /// they are durably stored. A large document may come as several records with the same key,
    /// in order and all in the same answer. An empty answer means there are no more.
    fn records(&self, after: Option<&RecordKey>, limit: usize) -> Vec<SnapshotRecord>;
}

/// Something the node must apply and persist, then report through [`Replica::handle_durable`].
#[derive(Debug, Clone, PartialEq)]
pub enum Apply {
    /// A change envelope; report [`Durable::Change`].
    Change(Envelope),
    /// A document from a snapshot, to merge into the local one; report [`Durable::Record`].
    Record(SnapshotRecord),
    /// A snapshot is complete: the node now holds `version_vector` too. The node merges it into
    /// its version vector and raises its log floors with [`raise_log_floors`] in the same write
    /// as the records before it (or after them); then it reports [`Durable::SnapshotEnd`].
    SnapshotEnd(VersionVector),
}

/// What became durable on this node.
#[derive(Debug, Clone, PartialEq)]
pub enum Durable {
    /// A change: a local write (`source: None`) or one from [`Apply::Change`].
    Change { source: Option<PeerId>, origin: OriginId, sequence: u64 },
    /// A snapshot record from [`Apply::Record`], merged or refused.
    Record { source: PeerId },
    /// An [`Apply::SnapshotEnd`], with everything before it.
    SnapshotEnd { source: PeerId, version_vector: VersionVector },
}

/// Raises `floors` for a snapshot that brought `snapshot` to a node that held `held` before: for
/// every origin of which the snapshot brought changes the node did not hold, the log now lacks
/// them, so the floor moves past the snapshot's prefix. The node and the core both apply it.
pub fn raise_log_floors(floors: &mut LogFloors, held: &VersionVector, snapshot: &VersionVector) {
    for (origin, range) in snapshot.origins() {
        if held.contiguous(origin) < range.contiguous {
            let floor = floors.entry(*origin).or_insert(1);
            *floor = (*floor).max(range.contiguous.saturating_add(1));
        }
    }
}

/// Tuning. The defaults suit a LAN or WAN mesh of a handful to dozens of nodes.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Envelopes a peer may send us before we acknowledge them durable. Every peer has its own
    /// window, so a node that reconnects to several peers at once has up to this many envelopes
    /// from each in flight: 4,096 let a node catching up from four peers after a partition grow
    /// by ~50 MB more than 1,024 did (tests/chaos.rs seed 72038096, RSS traced).
    pub window_envelopes: u32,
    /// The most envelopes (or snapshot records) in one message.
    pub chunk_envelopes_max: usize,
    /// A Changes or Snapshot message stops growing once its bytes pass this.
    pub chunk_bytes_max: usize,
    /// How often each peer gets a summary (anti-entropy).
    pub summary_interval: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            window_envelopes: 1024,
            chunk_envelopes_max: 256,
            chunk_bytes_max: 1 << 20,
            summary_interval: Duration::from_secs(5),
        }
    }
}

/// A snapshot being sent to a peer.
#[derive(Debug)]
struct OutgoingSnapshot {
    /// The last record sent.
    after: Option<RecordKey>,
    /// Records sent so far.
    records: u64,
    /// What this node held when the snapshot began (gap-free prefixes only).
    version_vector: VersionVector,
}

/// A snapshot being received from a peer.
#[derive(Debug, Clone, Copy)]
struct IncomingSnapshot {
    snapshot: u32,
    records: u64,
    /// When its last records arrived: an end that was lost must not leave it "receiving".
    last_arrival: Instant,
}

/// What the core knows about one connected peer.
#[derive(Debug)]
struct Peer {
    /// What the peer holds: its last summary, plus what it sent us and we sent it since.
    known: VersionVector,
    /// The snapshot being sent, if any; changes wait until it ends.
    snapshot: Option<OutgoingSnapshot>,
    /// Snapshots whose end we sent on this connection.
    snapshots_sent: u32,
    /// What snapshots the peer has not yet confirmed gave it. Merged into its summaries until
    /// one counts them: a summary that left before a snapshot was applied must not start
    /// another. A lost end is never counted, so after `UNCONFIRMED_SUMMARIES` summaries and
    /// `unconfirmed_until`, whichever is later, summaries are believed again.
    unconfirmed: VersionVector,
    unconfirmed_until: Option<Instant>,
    /// Summaries received since the last snapshot end was sent.
    unconfirmed_summaries: u32,
    /// The snapshot being received from the peer.
    incoming: Option<IncomingSnapshot>,
    /// Snapshots from the peer finished here (applied durably, or dropped as incomplete).
    snapshots_finished: u32,
    /// The peer held none of what we hold at its first summary (and has not since): bootstrap it.
    brand_new: bool,
    /// The peer's last summary said it is receiving a snapshot (from anyone): wait for that.
    receiving: bool,
    /// Whether a summary arrived on this connection yet.
    summarized: bool,
    /// Changes we sent it since its last summary arrived: in flight, or not yet durable there,
    /// when the next one left it. Believed held on top of that summary (see "Protocol").
    sent_since_summary: VersionVector,
    /// A message to it was dropped since its last summary: believe the next one alone.
    transmit_dropped: bool,
    /// Envelopes we may still send it.
    credit: u32,
    /// Envelopes it sent us that are not yet durable here: credit we owe it later.
    pending: u32,
    /// Credit we owe it now (durable or duplicate), sent with the next transmit round.
    owed: u32,
    /// Summaries we sent it on this connection: our grants' epoch.
    summaries_sent: u32,
    /// The epoch of the latest summary it sent us that we applied.
    peer_epoch: u32,
    /// Which of the envelopes it sent are durable here since the last credit we sent it.
    owed_durable: Vec<(OriginId, u64)>,
    /// When it is due its next summary.
    summary_due: Instant,
    /// Origins it asked us to relay lazily (it gets them first from another peer).
    lazy: BTreeSet<OriginId>,
    /// What we held when its last summary arrived, and when the one before arrived: lazy
    /// origins are sent only up to the latter, so a change it lacks at a summary is one it had a
    /// whole summary interval to get elsewhere.
    held_at_summary: VersionVector,
    lazy_through: VersionVector,
    /// Origins we asked it to relay lazily, and whether it has yet to hear the current list.
    asked_lazy: BTreeSet<OriginId>,
    asked_lazy_changed: bool,
    /// The node it is, once the node says ([`Replica::handle_peer_identified`]).
    node: Option<NodeId>,
}

/// How far apart this node and one peer are, in changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PeerLag {
    /// Changes we hold that the peer lacks, as far as we know.
    pub peer_lacks: u64,
    /// Changes the peer holds that we lack, as far as we know.
    pub we_lack: u64,
    /// Whether we are sending it a snapshot now.
    pub bootstrapping: bool,
}

/// Counts since the core started, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Statistics {
    /// Snapshots begun for peers.
    pub snapshots_started: u64,
    /// Snapshots completed to peers (their end was sent).
    pub snapshots_sent: u64,
    /// Snapshot records sent.
    pub snapshot_records_sent: u64,
    /// Snapshots received whole and durable here.
    pub snapshots_received: u64,
    /// Snapshots received with records missing (a frame was dropped), and so not applied.
    pub snapshots_incomplete: u64,
}

/// The replication state machine of one node. See the module doc for how to drive it.
#[derive(Debug)]
pub struct Replica {
    /// What this node holds durably.
    local: VersionVector,
    /// What its log holds, durable or about to be (see [`Replica::handle_available`]): what it
    /// sends from. Always holds `local`.
    available: VersionVector,
    /// Below these, per origin, the log lacks changes this node holds.
    floors: LogFloors,
    settings: Settings,
    peers: BTreeMap<PeerId, Peer>,
    transmits: VecDeque<(PeerId, Message)>,
    applies: VecDeque<(PeerId, Apply)>,
    /// What peers said they hold durably, for [`Replica::poll_acknowledged`].
    acknowledged: VecDeque<(PeerId, Acknowledgement)>,
    /// Per origin, the peer that last brought one of its changes first while relaying it
    /// eagerly: duplicates from other peers are asked to relay that origin lazily.
    eager_sources: BTreeMap<OriginId, PeerId>,
    /// Every change received from a peer since this start, applied yet or not: a copy that
    /// arrives while the first is still being applied is a duplicate too.
    received: VersionVector,
    statistics: Statistics,
}

/// What a peer said it holds durably (see [`Replica::poll_acknowledged`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acknowledgement {
    /// One change, named in a credit message.
    Change { origin: OriginId, sequence: u64 },
    /// Every change in a summary's version vector (normalized): a node summarizes only what it
    /// holds durably.
    Holds(VersionVector),
}

impl Replica {
    /// A replica over what the node holds durably now (its version vector) and its log floors.
    pub fn new(local: VersionVector, floors: LogFloors, settings: Settings, _now: Instant) -> Replica {
        Replica {
            available: local.clone(),
            local,
            floors,
            settings,
            peers: BTreeMap::new(),
            transmits: VecDeque::new(),
            applies: VecDeque::new(),
            acknowledged: VecDeque::new(),
            eager_sources: BTreeMap::new(),
            received: VersionVector::new(),
            statistics: Statistics::default(),
        }
    }

    /// What this node holds durably.
    pub fn version_vector(&self) -> &VersionVector {
        &self.local
    }

    pub fn log_floors(&self) -> &LogFloors {
        &self.floors
    }

    pub fn statistics(&self) -> Statistics {
        self.statistics
    }

    pub fn handle_peer_connected(&mut self, now: Instant, peer: PeerId) {
        let state = Peer {
            known: VersionVector::new(),
            snapshot: None,
            snapshots_sent: 0,
            unconfirmed: VersionVector::new(),
            unconfirmed_until: None,
            unconfirmed_summaries: 0,
            incoming: None,
            snapshots_finished: 0,
            brand_new: false,
            receiving: false,
            summarized: false,
            sent_since_summary: VersionVector::new(),
            transmit_dropped: false,
            credit: 0,
            pending: 0,
            owed: 0,
            summaries_sent: 0,
            peer_epoch: 0,
            owed_durable: Vec::new(),
            summary_due: now + self.settings.summary_interval,
            lazy: BTreeSet::new(),
            held_at_summary: VersionVector::new(),
            lazy_through: VersionVector::new(),
            asked_lazy: BTreeSet::new(),
            asked_lazy_changed: false,
            node: None,
        };
        self.peers.insert(peer, state);
        self.send_summary(now, peer);
    }

    /// The peer is `node` (as its certificate says). Its own changes are then never asked of it
    /// lazily: they reach us straight from it, and our credit acknowledges them to it at once,
    /// which its writers waiting for acknowledgements count on.
    pub fn handle_peer_identified(&mut self, peer: PeerId, node: NodeId) {
        if let Some(state) = self.peers.get_mut(&peer) {
            state.node = Some(node);
        }
    }

    /// The node dropped a message the core gave it for `peer` (its queue was full): the peer's
    /// next summary is believed alone, so whatever the message carried goes again.
    pub fn handle_transmit_dropped(&mut self, peer: PeerId) {
        if let Some(state) = self.peers.get_mut(&peer) {
            state.transmit_dropped = true;
        }
    }

    /// Forgets the peer. Envelopes it sent that are still being applied are kept: they are
    /// valid changes whoever delivered them.
    pub fn handle_peer_disconnected(&mut self, _now: Instant, peer: PeerId) {
        self.forget(peer);
    }

    pub fn handle_peer_message(
        &mut self,
        now: Instant,
        peer: PeerId,
        message: Message,
        source: &impl Source,
    ) -> Result<(), ProtocolError> {
        let window = self.settings.window_envelopes;
        let state = self.peers.get_mut(&peer).ok_or(ProtocolError::UnknownPeer(peer))?;
        match message {
            Message::Summary { version_vector, credit, snapshots, receiving, epoch } => {
                if epoch < state.peer_epoch {
                    // Overtaken by a newer summary: nothing in it is news.
                    return Ok(());
                }
                state.peer_epoch = epoch;
                state.lazy_through = std::mem::replace(&mut state.held_at_summary, self.available.clone());
                state.known = version_vector.normalized();
                self.acknowledged.push_back((peer, Acknowledgement::Holds(state.known.clone())));
                let sent = std::mem::take(&mut state.sent_since_summary);
                if !std::mem::take(&mut state.transmit_dropped) {
                    state.known.merge(&sent);
                }
                state.unconfirmed_summaries = state.unconfirmed_summaries.saturating_add(1);
                let given_up = state.unconfirmed_summaries > UNCONFIRMED_SUMMARIES
                    && state.unconfirmed_until.is_none_or(|until| now >= until);
                if snapshots >= state.snapshots_sent || given_up {
                    state.unconfirmed = VersionVector::new();
                    state.unconfirmed_until = None;
                } else {
                    state.known.merge(&state.unconfirmed);
                }
                // Judged on a connection's first summary (later, a peer may simply not have
                // received the first changes yet), and dropped once the peer holds something.
                state.brand_new = (state.brand_new || !state.summarized) && holds_none_of(&state.known, &self.local);
                state.summarized = true;
                state.receiving = receiving;
                state.credit = credit.min(window);
                self.pump(now, peer, source);
            }
            Message::Credit { envelopes, durable, epoch } => {
                if epoch >= state.peer_epoch {
                    state.credit = state.credit.saturating_add(envelopes).min(window);
                }
                // Bounded by the frame size; the node keeps only what a waiting writer needs.
                self.acknowledged.extend(
                    durable.into_iter().map(|(origin, sequence)| (peer, Acknowledgement::Change { origin, sequence })),
                );
                self.pump(now, peer, source);
            }
            Message::Peers { .. } => {}
            Message::Lazy { origins } => {
                state.lazy = origins.into_iter().take(LAZY_ORIGINS_MAX).collect();
                // Changes of origins no longer lazy may be due at once.
                self.pump(now, peer, source);
            }
            Message::Changes { envelopes } => {
                let mut duplicates = BTreeSet::new();
                let mut first = BTreeSet::new();
                for envelope in envelopes {
                    state.known.insert(envelope.origin, envelope.sequence);
                    let first_copy = self.received.insert(envelope.origin, envelope.sequence);
                    if !first_copy || self.available.contains(&envelope.origin, envelope.sequence) {
                        if state.node != Some(envelope.node) {
                            duplicates.insert(envelope.origin);
                        }
                    } else if !state.asked_lazy.contains(&envelope.origin) {
                        first.insert(envelope.origin);
                    }
                    if self.local.contains(&envelope.origin, envelope.sequence) {
                        state.owed += 1;
                        state.owed_durable.push((envelope.origin, envelope.sequence));
                    } else {
                        state.pending += 1;
                        self.applies.push_back((peer, Apply::Change(envelope)));
                    }
                }
                for origin in first {
                    self.eager_sources.insert(origin, peer);
                }
                self.ask_lazy(peer, duplicates);
                return self.check_credit(peer);
            }
            Message::Snapshot { snapshot, records } => {
                let count = records.len() as u64;
                match state.incoming.as_mut() {
                    Some(incoming) if incoming.snapshot == snapshot => {
                        incoming.records += count;
                        incoming.last_arrival = now;
                    }
                    // Records of an older snapshot still merge, but count for nothing.
                    Some(incoming) if incoming.snapshot > snapshot => {}
                    _ => state.incoming = Some(IncomingSnapshot { snapshot, records: count, last_arrival: now }),
                }
                state.pending = state.pending.saturating_add(u32::try_from(records.len()).unwrap_or(u32::MAX));
                self.applies.extend(records.into_iter().map(|record| (peer, Apply::Record(record))));
                return self.check_credit(peer);
            }
            Message::SnapshotEnd { snapshot, records, version_vector } => {
                let version_vector = version_vector.normalized();
                let received = match state.incoming {
                    Some(incoming) if incoming.snapshot == snapshot => incoming.records,
                    _ => 0,
                };
                state.incoming = None;
                if received == records {
                    state.known.merge(&version_vector);
                    self.applies.push_back((peer, Apply::SnapshotEnd(version_vector)));
                } else {
                    // A frame was lost: what arrived merged, but the version vector would claim
                    // too much. Our next summary tells the peer what we really hold.
                    state.snapshots_finished += 1;
                    self.statistics.snapshots_incomplete += 1;
                    self.send_summary(now, peer);
                }
            }
        }
        Ok(())
    }

    /// The changes among `items` are in the node's log now and will be durable once its flush
    /// completes: relays them to every peer that lacks them, while the node flushes. Nothing
    /// else counts them yet: summaries still say only what is durable, and the senders get
    /// their credit from [`Replica::handle_durable`], which the node calls with the same items
    /// after the flush. Records and snapshot ends are ignored here.
    ///
    /// Sending before the flush is safe because every process start is a new origin: a crash
    /// that loses these changes here cannot reuse their sequences, and the peers that got them
    /// hand them back at the next exchange. A write acknowledged to its client was durable
    /// first, as before. Calling this is optional; without it changes are relayed once durable.
    pub fn handle_available(&mut self, now: Instant, items: &[Durable], source: &impl Source) {
        let mut any = false;
        for item in items {
            if let Durable::Change { origin, sequence, .. } = item {
                any |= self.available.insert(*origin, *sequence);
            }
        }
        if any {
            self.pump_all(now, source);
        }
    }

    /// These are now durable here: local writes, or what [`Replica::poll_apply`] handed over
    /// (whether or not it changed anything). Grants the senders credit and relays the changes to
    /// every peer that lacks them (unless [`Replica::handle_available`] did already).
    pub fn handle_durable(&mut self, now: Instant, durable: &[Durable], source: &impl Source) {
        let mut snapshot_arrived = false;
        for item in durable {
            match item {
                Durable::Change { source, origin, sequence } => {
                    self.local.insert(*origin, *sequence);
                    self.available.insert(*origin, *sequence);
                    if let Some(peer) = source.and_then(|peer| self.peers.get_mut(&peer)) {
                        peer.pending = peer.pending.saturating_sub(1);
                        peer.owed += 1;
                        peer.owed_durable.push((*origin, *sequence));
                    }
                }
                Durable::Record { source } => {
                    if let Some(peer) = self.peers.get_mut(source) {
                        peer.pending = peer.pending.saturating_sub(1);
                        peer.owed += 1;
                    }
                }
                Durable::SnapshotEnd { source, version_vector } => {
                    if let Some(peer) = self.peers.get_mut(source) {
                        peer.snapshots_finished += 1;
                    }
                    raise_log_floors(&mut self.floors, &self.local, version_vector);
                    self.local.merge(version_vector);
                    self.available.merge(version_vector);
                    self.statistics.snapshots_received += 1;
                    snapshot_arrived = true;
                }
            }
        }
        self.flush_credit();
        if snapshot_arrived {
            // Every peer hears at once that we hold much more, so none sends it again.
            let peers: Vec<PeerId> = self.peers.keys().copied().collect();
            for peer in peers {
                self.send_summary(now, peer);
            }
        }
        self.pump_all(now, source);
    }

    fn pump_all(&mut self, now: Instant, source: &impl Source) {
        let peers: Vec<PeerId> = self.peers.keys().copied().collect();
        for peer in peers {
            self.pump(now, peer, source);
        }
    }

    /// The node trimmed its change log: below `floor`, `origin`'s changes are in the documents
    /// only. Peers that lack any of them get a snapshot.
    pub fn handle_log_trimmed(&mut self, origin: OriginId, floor: u64) {
        let entry = self.floors.entry(origin).or_insert(1);
        *entry = (*entry).max(floor);
    }

    pub fn handle_timeout(&mut self, now: Instant, source: &impl Source) {
        let due: Vec<PeerId> =
            self.peers.iter().filter(|(_, state)| state.summary_due <= now).map(|(&peer, _)| peer).collect();
        for peer in due {
            if let Some(state) = self.peers.get_mut(&peer) {
                state.summary_due = now + self.settings.summary_interval;
            }
            self.send_summary(now, peer);
            self.pump(now, peer, source);
        }
    }

    /// A message to send to a peer.
    pub fn poll_transmit(&mut self) -> Option<(PeerId, Message)> {
        self.transmits.pop_front()
    }

    /// Something from a peer for the node to apply and persist, then report through
    /// [`Replica::handle_durable`].
    pub fn poll_apply(&mut self) -> Option<(PeerId, Apply)> {
        self.applies.pop_front()
    }

    /// What a peer says it now holds durably: a change it made durable, or a summary's version
    /// vector. The node drains these after each message it hands the core.
    pub fn poll_acknowledged(&mut self) -> Option<(PeerId, Acknowledgement)> {
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
                    peer_lacks: self.local.count_missing_from(&Self::expected_to_hold(state, &self.local)),
                    we_lack: state.known.count_missing_from(&self.local),
                    bootstrapping: state.snapshot.is_some(),
                };
                (peer, lag)
            })
            .collect()
    }

    /// What a peer holds as far as lag goes: what we know it holds, plus the changes of origins
    /// it takes lazily from us that are newer than a summary ago (another peer brings those; we
    /// learn it holds them only at its next summary, so they are not lag).
    fn expected_to_hold(state: &Peer, local: &VersionVector) -> VersionVector {
        let mut expected = state.known.clone();
        for (origin, ranges) in local.missing_from(&state.lazy_through) {
            if state.lazy.contains(&origin) {
                for (start, end) in ranges {
                    expected.insert_range(origin, start, end);
                }
            }
        }
        expected
    }

    /// A peer that sent more than the credit it was granted is forgotten, with an error.
    fn check_credit(&mut self, peer: PeerId) -> Result<(), ProtocolError> {
        // A summary grants credit without knowing what is in flight, so an honest peer may
        // overrun the window by up to a window per summary that crossed its envelopes: one
        // normally (summaries are seconds apart, round trips milliseconds), a few when round
        // trips approach the summary interval. Beyond four windows it is broken or hostile.
        let granted = self.settings.window_envelopes.saturating_mul(PENDING_WINDOWS_MAX);
        let pending = self.peers.get(&peer).map_or(0, |state| state.pending);
        if pending > granted {
            self.forget(peer);
            return Err(ProtocolError::CreditExceeded { peer, pending, granted });
        }
        self.flush_credit();
        Ok(())
    }

    fn forget(&mut self, peer: PeerId) {
        self.peers.remove(&peer);
        self.transmits.retain(|(target, _)| *target != peer);
        // Origins that peer brought first: every other peer relays them eagerly again, and
        // duplicates pick a new eager source.
        let orphaned: BTreeSet<OriginId> =
            self.eager_sources.iter().filter(|(_, source)| **source == peer).map(|(origin, _)| *origin).collect();
        if orphaned.is_empty() {
            return;
        }
        self.eager_sources.retain(|_, source| *source != peer);
        for state in self.peers.values_mut() {
            let before = state.asked_lazy.len();
            state.asked_lazy.retain(|origin| !orphaned.contains(origin));
            state.asked_lazy_changed |= state.asked_lazy.len() != before;
        }
        self.send_lazy_lists();
    }

    /// `peer` sent changes of `duplicates` that this node already held: asks it to relay those
    /// origins lazily, each one that another connected peer brings first (its eager source). The
    /// eager source itself is never asked, so every origin keeps one eager path here.
    fn ask_lazy(&mut self, peer: PeerId, duplicates: BTreeSet<OriginId>) {
        let asked: Vec<OriginId> = duplicates
            .into_iter()
            .filter(|origin| {
                self.eager_sources.get(origin).is_some_and(|source| *source != peer && self.peers.contains_key(source))
            })
            .collect();
        let Some(state) = self.peers.get_mut(&peer) else { return };
        for origin in asked {
            if state.asked_lazy.len() < LAZY_ORIGINS_MAX && state.asked_lazy.insert(origin) {
                state.asked_lazy_changed = true;
            }
        }
        self.send_lazy_lists();
    }

    /// Sends each peer whose lazy list changed the whole list.
    fn send_lazy_lists(&mut self) {
        for (&peer, state) in &mut self.peers {
            if std::mem::take(&mut state.asked_lazy_changed) {
                let origins = state.asked_lazy.iter().copied().collect();
                self.transmits.push_back((peer, Message::Lazy { origins }));
            }
        }
    }

    fn send_summary(&mut self, now: Instant, peer: PeerId) {
        let Some(state) = self.peers.get(&peer) else { return };
        let credit = self.settings.window_envelopes.saturating_sub(state.pending);
        let snapshots = state.snapshots_finished;
        // A snapshot from this very peer does not count (it must be free to send a new one), nor
        // one whose records stopped coming (its end was lost).
        let fresh = |incoming: &IncomingSnapshot| now < incoming.last_arrival + self.settings.summary_interval * 2;
        let receiving =
            self.peers.iter().any(|(&other, state)| other != peer && state.incoming.as_ref().is_some_and(fresh));
        let Some(state) = self.peers.get_mut(&peer) else { return };
        state.summaries_sent = state.summaries_sent.saturating_add(1);
        let epoch = state.summaries_sent;
        let summary = Message::Summary { version_vector: self.local.clone(), credit, snapshots, receiving, epoch };
        self.transmits.push_back((peer, summary));
    }

    fn flush_credit(&mut self) {
        for (&peer, state) in &mut self.peers {
            if state.owed > 0 {
                let durable = std::mem::take(&mut state.owed_durable);
                let epoch = state.summaries_sent;
                self.transmits.push_back((peer, Message::Credit { envelopes: state.owed, durable, epoch }));
                state.owed = 0;
            }
        }
    }

    /// Whether the peer lacks a change below a log floor: the log cannot catch it up.
    fn behind_log(&self, known: &VersionVector) -> bool {
        self.floors.iter().any(|(origin, &floor)| known.contiguous(origin).saturating_add(1) < floor)
    }

    /// Sends the peer what it lacks while it has credit: a snapshot if it needs one, else the
    /// changes it lacks, oldest first per origin.
    fn pump(&mut self, now: Instant, peer: PeerId, source: &impl Source) {
        let Some(state) = self.peers.get(&peer) else { return };
        let wants_snapshot = state.brand_new || self.behind_log(&state.known);
        if wants_snapshot && state.snapshot.is_none() && state.receiving {
            // Another peer is bootstrapping it: neither a second snapshot nor the whole history
            // from the log. Its next summaries show what it lacks after that.
            return;
        }
        if wants_snapshot && state.snapshot.is_none() {
            let version_vector = self.local.contiguous_prefix();
            let Some(state) = self.peers.get_mut(&peer) else { return };
            state.brand_new = false;
            // Nothing gap-free to give (only out-of-order changes): the log sends what it has.
            if !version_vector.is_empty() {
                state.snapshot = Some(OutgoingSnapshot { after: None, records: 0, version_vector });
                self.statistics.snapshots_started += 1;
            }
        }
        if !self.pump_snapshot(now, peer, source) {
            return;
        }
        self.pump_changes(peer, source);
    }

    /// Sends snapshot records while the peer has credit. Returns true when no snapshot is (any
    /// longer) under way, so changes may follow.
    fn pump_snapshot(&mut self, now: Instant, peer: PeerId, source: &impl Source) -> bool {
        let Some(state) = self.peers.get_mut(&peer) else { return false };
        let Some(snapshot) = state.snapshot.as_mut() else { return true };
        while state.credit > 0 {
            let limit = self.settings.chunk_envelopes_max.min(state.credit as usize);
            let records = source.records(snapshot.after.as_ref(), limit);
            let number = state.snapshots_sent + 1;
            if records.is_empty() {
                let version_vector = std::mem::take(&mut snapshot.version_vector);
                let records = snapshot.records;
                state.known.merge(&version_vector);
                state.unconfirmed.merge(&version_vector);
                state.unconfirmed_until = Some(now + self.settings.summary_interval * 2);
                state.unconfirmed_summaries = 0;
                state.snapshot = None;
                state.snapshots_sent = number;
                self.transmits.push_back((peer, Message::SnapshotEnd { snapshot: number, records, version_vector }));
                self.statistics.snapshots_sent += 1;
                return true;
            }
            let mut chunk = Vec::new();
            let mut chunk_bytes = 0;
            // All of the answer goes out: a large document's records must not be split across
            // answers, so the credit may run a few records short (it saturates).
            for record in records {
                snapshot.after = Some(record.key.clone());
                snapshot.records += 1;
                state.credit = state.credit.saturating_sub(1);
                chunk_bytes += record.size();
                chunk.push(record);
                if chunk_bytes >= self.settings.chunk_bytes_max {
                    self.statistics.snapshot_records_sent += chunk.len() as u64;
                    let records = std::mem::take(&mut chunk);
                    self.transmits.push_back((peer, Message::Snapshot { snapshot: number, records }));
                    chunk_bytes = 0;
                }
            }
            if !chunk.is_empty() {
                self.statistics.snapshot_records_sent += chunk.len() as u64;
                self.transmits.push_back((peer, Message::Snapshot { snapshot: number, records: chunk }));
            }
        }
        false
    }

    fn pump_changes(&mut self, peer: PeerId, source: &impl Source) {
        let Some(state) = self.peers.get_mut(&peer) else { return };
        if state.credit == 0 {
            return;
        }
        let mut chunk: Vec<Envelope> = Vec::new();
        let mut chunk_bytes = 0;
        let mut missing = self.available.missing_from(&state.known);
        if !state.lazy.is_empty() {
            // A lazy origin's changes go only as far as what we held a summary ago.
            let lazy_missing: BTreeMap<OriginId, Vec<(u64, u64)>> =
                state.lazy_through.missing_from(&state.known).into_iter().collect();
            for (origin, ranges) in &mut missing {
                if state.lazy.contains(origin) {
                    *ranges = lazy_missing.get(origin).cloned().unwrap_or_default();
                }
            }
        }
        for (origin, ranges) in missing {
            for (start, end) in ranges {
                let mut next = start;
                while next <= end && state.credit > 0 {
                    let room = (self.settings.chunk_envelopes_max - chunk.len()).min(state.credit as usize);
                    let wanted = usize::try_from(end - next + 1).unwrap_or(usize::MAX).min(room);
                    let envelopes = source.changes(&origin, next, wanted);
                    let Some(last_sequence) = envelopes.last().map(|envelope| envelope.sequence) else { break };
                    for envelope in envelopes.into_iter().filter(|envelope| envelope.sequence <= end) {
                        state.known.insert(envelope.origin, envelope.sequence);
                        state.sent_since_summary.insert(envelope.origin, envelope.sequence);
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

/// Whether `peer` holds none of the gap-free changes `local` holds, while `local` holds some: a
/// brand-new node (or one from a cluster that never met this one).
fn holds_none_of(peer: &VersionVector, local: &VersionVector) -> bool {
    let mut any = false;
    for (origin, range) in local.origins() {
        if range.contiguous == 0 {
            continue;
        }
        any = true;
        let overlaps = |held: &crate::version_vector::OriginRange| {
            held.contiguous > 0 || held.beyond.keys().any(|&start| start <= range.contiguous)
        };
        if peer.get(origin).is_some_and(overlaps) {
            return false;
        }
    }
    any
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemorySource;

    struct Empty;
    impl Source for Empty {
        fn changes(&self, _origin: &OriginId, _from: u64, _limit: usize) -> Vec<Envelope> {
            Vec::new()
        }
        fn records(&self, _after: Option<&RecordKey>, _limit: usize) -> Vec<SnapshotRecord> {
            Vec::new()
        }
    }

    /// A connected replica with a log of `origin`'s changes 1..=`count`, and a peer (1) that
    /// has summarized holding nothing, with a full window of credit.
    fn replica_with_log(now: Instant, origin: OriginId, count: u64) -> (Replica, MemorySource<SnapshotRecord>) {
        let mut log = MemorySource::<SnapshotRecord>::default();
        for sequence in 1..=count {
            let key = RecordKey::new("orders", &format!("o{sequence}")).expect("a valid key");
            let envelope = Envelope {
                origin,
                node: crate::identity::NodeId([3; 16]),
                sequence,
                timestamp: crate::clock::Timestamp { wall_ms: sequence, logical: 0 },
                key,
                kind: DocumentKind::Record,
                change: vec![sequence as u8; 8],
            };
            log.log.insert((origin, sequence), envelope);
        }
        let mut replica = Replica::new(VersionVector::new(), LogFloors::new(), Settings::default(), now);
        replica.handle_peer_connected(now, 1);
        replica.handle_peer_message(now, 1, summary_of(VersionVector::new(), 1), &log).expect("a summary");
        while replica.poll_transmit().is_some() {}
        (replica, log)
    }

    fn sent_sequences(replica: &mut Replica) -> Vec<u64> {
        let mut sent = Vec::new();
        while let Some((_, message)) = replica.poll_transmit() {
            if let Message::Changes { envelopes } = message {
                sent.extend(envelopes.iter().map(|envelope| envelope.sequence));
            }
        }
        sent
    }

    #[test]
    fn available_changes_are_relayed_before_they_are_durable_and_claimed_only_after() {
        let now = Instant::now();
        let origin = OriginId([3; 16]);
        let (mut replica, log) = replica_with_log(now, origin, 2);
        let local = |sequence| Durable::Change { source: None, origin, sequence };
        replica.handle_available(now, &[local(1), local(2)], &log);
        assert_eq!(sent_sequences(&mut replica), vec![1, 2], "sent while the node flushes");
        // Not durable yet: a summary does not claim them, and lag counts none held here.
        replica.handle_timeout(now + Settings::default().summary_interval, &log);
        let summaries: Vec<Message> =
            std::iter::from_fn(|| replica.poll_transmit()).map(|(_, message)| message).collect();
        assert!(
            summaries
                .iter()
                .any(|message| matches!(message, Message::Summary { version_vector, .. } if version_vector.is_empty())),
            "{summaries:?}"
        );
        assert_eq!(replica.version_vector().contiguous(&origin), 0);
        // Durable: claimed from now on, and not sent a second time.
        replica.handle_durable(now, &[local(1), local(2)], &log);
        assert_eq!(sent_sequences(&mut replica), Vec::<u64>::new());
        assert_eq!(replica.version_vector().contiguous(&origin), 2);
        // Without the early call, a durable change is relayed then, as before.
        let (mut replica, log) = replica_with_log(now, origin, 1);
        replica.handle_durable(now, &[local(1)], &log);
        assert_eq!(sent_sequences(&mut replica), vec![1]);
    }

    /// A summary that crosses changes in flight does not send them again; a change sent before
    /// the previous summary and still missing was lost, and goes again; after the node dropped a
    /// message, the next summary alone counts. Acknowledgements are the summaries as they are.
    #[test]
    fn a_summary_crossing_changes_in_flight_does_not_send_them_again() {
        let now = Instant::now();
        let origin = OriginId([3; 16]);
        let (mut replica, log) = replica_with_log(now, origin, 2);
        while replica.poll_acknowledged().is_some() {}
        let local = |sequence| Durable::Change { source: None, origin, sequence };
        replica.handle_durable(now, &[local(1), local(2)], &log);
        assert_eq!(sent_sequences(&mut replica), vec![1, 2]);
        // The peer's summary left before 1 and 2 arrived.
        replica.handle_peer_message(now, 1, summary_of(VersionVector::new(), 2), &log).expect("a summary");
        assert_eq!(sent_sequences(&mut replica), Vec::<u64>::new(), "in flight, not lost");
        assert_eq!(replica.poll_acknowledged(), Some((1, Acknowledgement::Holds(VersionVector::new()))));
        assert_eq!(replica.peer_lags()[&1].peer_lacks, 0, "what is in flight is not lag");
        // A summary later they are still missing: lost on the way, so they go again.
        replica.handle_peer_message(now, 1, summary_of(VersionVector::new(), 3), &log).expect("a summary");
        assert_eq!(sent_sequences(&mut replica), vec![1, 2]);
        // The node dropped a message to the peer: the next summary is believed alone.
        replica.handle_transmit_dropped(1);
        replica.handle_peer_message(now, 1, summary_of(VersionVector::new(), 4), &log).expect("a summary");
        assert_eq!(sent_sequences(&mut replica), vec![1, 2]);
        // Once the peer shows them, nothing more goes.
        let mut held = VersionVector::new();
        held.insert(origin, 1);
        held.insert(origin, 2);
        replica.handle_peer_message(now, 1, summary_of(held.clone(), 5), &log).expect("a summary");
        replica.handle_peer_message(now, 1, summary_of(held, 6), &log).expect("a summary");
        assert_eq!(sent_sequences(&mut replica), Vec::<u64>::new());
    }

    #[test]
    fn credits_and_summaries_both_acknowledge() {
        let now = Instant::now();
        let origin = OriginId([3; 16]);
        let mut replica = Replica::new(VersionVector::new(), LogFloors::new(), Settings::default(), now);
        replica.handle_peer_connected(now, 1);
        let credit = Message::Credit { envelopes: 1, durable: vec![(origin, 4)], epoch: 0 };
        replica.handle_peer_message(now, 1, credit, &Empty).expect("a credit");
        assert_eq!(replica.poll_acknowledged(), Some((1, Acknowledgement::Change { origin, sequence: 4 })));
        // A summary acknowledges what it says the peer holds, normalized as the core reads it.
        let mut held = VersionVector::new();
        for sequence in [0, 1, 2, 3] {
            held.insert(origin, sequence);
        }
        let summary = Message::Summary { version_vector: held, credit: 8, snapshots: 0, receiving: false, epoch: 1 };
        replica.handle_peer_message(now, 1, summary, &Empty).expect("a summary");
        let Some((1, Acknowledgement::Holds(acknowledged))) = replica.poll_acknowledged() else {
            panic!("the summary acknowledges")
        };
        assert!((1..=3).all(|sequence| acknowledged.contains(&origin, sequence)));
        assert!(!acknowledged.contains(&origin, 0) && !acknowledged.contains(&origin, 4));
        // A summary overtaken by a newer one says nothing new.
        let stale = Message::Summary {
            version_vector: VersionVector::new(),
            credit: 8,
            snapshots: 0,
            receiving: false,
            epoch: 0,
        };
        replica.handle_peer_message(now, 1, stale, &Empty).expect("a stale summary");
        assert_eq!(replica.poll_acknowledged(), None);
    }

    fn summary_of(version_vector: VersionVector, epoch: u32) -> Message {
        Message::Summary { version_vector, credit: 1024, snapshots: 0, receiving: false, epoch }
    }

    fn lazy_lists(replica: &mut Replica) -> Vec<(PeerId, Vec<OriginId>)> {
        std::iter::from_fn(|| replica.poll_transmit())
            .filter_map(|(peer, message)| match message {
                Message::Lazy { origins } => Some((peer, origins)),
                _ => None,
            })
            .collect()
    }

    /// The receiving side: a duplicate from a peer that is not the origin's eager source asks
    /// it to relay lazily; the eager source is never asked; and when it disconnects, the others
    /// are asked to relay eagerly again.
    #[test]
    fn duplicates_ask_for_lazy_relay_and_losing_the_eager_source_undoes_it() {
        let now = Instant::now();
        let origin = OriginId([3; 16]);
        let log = replica_with_log(now, origin, 3).1;
        let envelope = |sequence| log.log[&(origin, sequence)].clone();
        let mut replica = Replica::new(VersionVector::new(), LogFloors::new(), Settings::default(), now);
        for peer in [1, 2, 3] {
            replica.handle_peer_connected(now, peer);
            replica.handle_peer_message(now, peer, summary_of(VersionVector::new(), 1), &log).expect("a summary");
        }
        let deliver = |replica: &mut Replica, peer, sequence| {
            replica.handle_peer_message(now, peer, Message::Changes { envelopes: vec![envelope(sequence)] }, &log)
        };
        let applied = |replica: &mut Replica, peer, sequence| {
            let change = Durable::Change { source: Some(peer), origin, sequence };
            replica.handle_available(now, std::slice::from_ref(&change), &log);
            replica.handle_durable(now, &[change], &log);
        };
        // Peer 1 brings change 1 first; peer 2's copy is a duplicate.
        deliver(&mut replica, 1, 1).expect("changes");
        applied(&mut replica, 1, 1);
        while replica.poll_transmit().is_some() {}
        deliver(&mut replica, 2, 1).expect("changes");
        assert_eq!(lazy_lists(&mut replica), vec![(2, vec![origin])]);
        // The origin's own node is never asked, even for a duplicate of its own change.
        replica.handle_peer_identified(3, log.log[&(origin, 1)].node);
        deliver(&mut replica, 3, 1).expect("changes");
        assert_eq!(lazy_lists(&mut replica), Vec::new(), "a peer is never asked to relay its own changes lazily");
        replica.handle_peer_identified(3, crate::identity::NodeId([9; 16]));
        // A duplicate from the eager source itself asks nothing (the lazy peer's copy came first).
        deliver(&mut replica, 2, 2).expect("changes");
        applied(&mut replica, 2, 2);
        deliver(&mut replica, 1, 2).expect("changes");
        assert_eq!(lazy_lists(&mut replica), Vec::new(), "the eager source is never asked to be lazy");
        // Peer 3 duplicates too: asked as well.
        deliver(&mut replica, 3, 2).expect("changes");
        assert_eq!(lazy_lists(&mut replica), vec![(3, vec![origin])]);
        // The eager source goes: both are asked to relay eagerly again.
        replica.handle_peer_disconnected(now, 1);
        assert_eq!(lazy_lists(&mut replica), vec![(2, vec![]), (3, vec![])]);
    }

    /// The sending side: a lazy origin's changes are not relayed as they arrive, only those a
    /// summary shows the peer still lacks and that were held a summary earlier; other origins
    /// go as before, and an emptied list makes the origin eager again.
    #[test]
    fn lazy_origins_are_sent_only_when_summaries_show_them_missing() {
        let now = Instant::now();
        let origin = OriginId([3; 16]);
        let other = OriginId([4; 16]);
        let (mut replica, mut log) = replica_with_log(now, origin, 4);
        let mut other_envelope = log.log[&(origin, 1)].clone();
        other_envelope.origin = other;
        log.log.insert((other, 1), other_envelope);
        replica.handle_peer_message(now, 1, Message::Lazy { origins: vec![origin] }, &log).expect("lazy");
        let local = |origin, sequence| Durable::Change { source: None, origin, sequence };
        replica.handle_available(now, &[local(origin, 1), local(origin, 2), local(other, 1)], &log);
        let sent: Vec<(OriginId, u64)> = std::iter::from_fn(|| replica.poll_transmit())
            .filter_map(|(_, message)| match message {
                Message::Changes { envelopes } => Some(envelopes),
                _ => None,
            })
            .flatten()
            .map(|envelope| (envelope.origin, envelope.sequence))
            .collect();
        assert_eq!(sent, vec![(other, 1)], "only the eager origin is relayed as it arrives");
        replica.handle_durable(now, &[local(origin, 1), local(origin, 2), local(other, 1)], &log);
        while replica.poll_transmit().is_some() {}
        // Changes another peer brings are not counted as the peer's lag.
        assert_eq!(replica.peer_lags()[&1].peer_lacks, 0);
        // The first summary after: 1 and 2 were not held at the summary before it, so they wait.
        let mut holds_other = VersionVector::new();
        holds_other.insert(other, 1);
        replica.handle_peer_message(now, 1, summary_of(holds_other.clone(), 2), &log).expect("a summary");
        assert_eq!(sent_sequences(&mut replica), Vec::<u64>::new());
        replica.handle_available(now, &[local(origin, 3)], &log);
        assert_eq!(sent_sequences(&mut replica), Vec::<u64>::new());
        // The next summary still lacks them: what was held at the one before goes, not 3.
        replica.handle_peer_message(now, 1, summary_of(holds_other, 3), &log).expect("a summary");
        assert_eq!(sent_sequences(&mut replica), vec![1, 2]);
        // Eager again: the rest goes at once.
        replica.handle_peer_message(now, 1, Message::Lazy { origins: Vec::new() }, &log).expect("eager");
        assert_eq!(sent_sequences(&mut replica), vec![3]);
        replica.handle_available(now, &[local(origin, 4)], &log);
        assert_eq!(sent_sequences(&mut replica), vec![4]);
    }
}
