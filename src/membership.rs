//! Membership: which nodes of the cluster are alive, suspected or down, decided by the SWIM
//! protocol (the foca crate) and disseminated by piggybacking on its probes.
//!
//! This module is sans-IO: no sockets, no clock, no tasks. Time comes in as an [`Instant`],
//! randomness as a seed, and what to send comes out as bytes for a member; the mesh (`mesh.rs`)
//! carries the bytes over each peer's QUIC connection and turns the events into effects. It does
//! not decide what a down member means for replication; that is the mesh's business.
//!
//! # Driving it
//! 1. Feed input: [`Membership::handle_data`] for bytes a peer sent on the membership channel,
//!    [`Membership::announce`] when a connection to a node opens, and
//!    [`Membership::handle_timeout`] once [`Membership::poll_timeout`] has passed.
//! 2. After every input, drain [`Membership::poll_transmit`] (bytes to send; losing some is
//!    fine) and then [`Membership::poll_event`] (member state changes), until both are `None`.
//!
//! ```
//! # use std::time::{Duration, Instant};
//! use concord::membership::{MemberIdentity, MemberState, Membership, MembershipEvent, MembershipSettings};
//!
//! let now = Instant::now();
//! let identity = |byte: u8| MemberIdentity { node_id: [byte; 16], address: None, renewal: 1 };
//! let settings = MembershipSettings::default();
//! let mut first = Membership::new(identity(1), settings.clone(), [1; 32]).unwrap();
//! let mut second = Membership::new(identity(2), settings, [2; 32]).unwrap();
//! // A connection to the first node opened: the second asks to join through it.
//! second.announce(now, identity(1)).unwrap();
//! while let Some((member, bytes)) = second.poll_transmit() {
//!     assert_eq!(member.node_id, [1; 16]);
//!     first.handle_data(now, second.identity().node_id, &bytes).unwrap();
//! }
//! let event = first.poll_event().unwrap();
//! assert!(matches!(event, MembershipEvent::Member { state: MemberState::Alive, .. }));
//! ```
//!
//! # Identity
//! A member is a node id (for life), the peer address it advertises, and a renewal counter. The
//! node id is what identifies a member: a newer identity with the same node id (a higher
//! renewal, as after a restart, whose counter starts from the wall clock) replaces the older
//! one. When the cluster declares a live node down, the node renews itself (renewal + 1) and
//! rejoins at once.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::{NonZeroU8, NonZeroUsize};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut};
use foca::{Foca, Header, Member, Message, NoCustomBroadcast, Notification, Runtime, State, Timer};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::Serialize;

/// Bytes queued to send at most; beyond it new messages are dropped (and counted): SWIM
/// tolerates loss, and the mesh drains this after every input, so it is never reached when
/// driven as documented.
pub const TRANSMITS_MAX: usize = 1024;
/// Events queued at most. At the bound a state change is not lost: it is reported by a later
/// call, once there is room again.
pub const EVENTS_MAX: usize = 1024;
/// Timers pending at most. foca keeps a handful plus one per suspected member; beyond the bound
/// a timer is dropped (and counted), and foca recovers with its next probe cycle.
pub const TIMERS_MAX: usize = 16_384;
/// The largest membership message, sent or accepted.
pub const MESSAGE_BYTES_MAX: usize = 8 * 1024;

/// Who a member is. See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemberIdentity {
    /// The node id, for life (hex elsewhere).
    pub node_id: [u8; 16],
    /// Where the node accepts peer connections, if it advertises an address.
    pub address: Option<SocketAddr>,
    /// Higher wins among identities of the same node id: bumped by a restart and by a rejoin.
    pub renewal: u64,
}

impl foca::Identity for MemberIdentity {
    type Addr = [u8; 16];

    fn renew(&self) -> Option<Self> {
        Some(MemberIdentity { renewal: self.renewal.checked_add(1)?, ..*self })
    }

    fn addr(&self) -> [u8; 16] {
        self.node_id
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        (self.renewal, self.address) > (adversary.renewal, adversary.address)
    }
}

/// Each member's state, by hex node id: the view status shows.
pub type MemberStates = BTreeMap<String, MemberState>;

/// How a member looks from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    Alive,
    /// Missed its probes; declared down unless it refutes this in time.
    Suspect,
    /// Declared down by the cluster: it stays down until it rejoins with a renewed identity.
    Down,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Down => "down",
        }
    }

    fn of(state: State) -> MemberState {
        match state {
            State::Alive => MemberState::Alive,
            State::Suspect => MemberState::Suspect,
            State::Down => MemberState::Down,
        }
    }
}

/// What changed, as [`Membership::poll_event`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipEvent {
    /// A member is new to this node, changed state, or replaced its identity (a restart: the
    /// address may be new too).
    Member { identity: MemberIdentity, state: MemberState },
    /// The cluster had declared this node down; it rejoined as `identity`.
    Rejoined { identity: MemberIdentity },
    /// The cluster declared this node down and it cannot renew its identity (the counter is
    /// exhausted): it stays out of the membership until restarted.
    Defunct,
}

/// Failure-detector timings. Detection of a dead member takes about one `probe_period` to
/// suspect it plus `suspect_timeout` to declare it down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipSettings {
    /// How often a random member is probed.
    pub probe_period: Duration,
    /// How long a direct probe waits for its answer before asking others to probe indirectly.
    /// Less than `probe_period`.
    pub probe_rtt: Duration,
    /// How long a suspected member has to refute the suspicion before it is declared down.
    pub suspect_timeout: Duration,
}

impl Default for MembershipSettings {
    /// Tuned for a LAN: a dead member is declared down in about four seconds.
    fn default() -> MembershipSettings {
        MembershipSettings {
            probe_period: Duration::from_secs(1),
            probe_rtt: Duration::from_millis(300),
            suspect_timeout: Duration::from_secs(3),
        }
    }
}

impl MembershipSettings {
    /// Checks that foca can run with these timings.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.probe_rtt.is_zero() || self.suspect_timeout.is_zero() {
            return Err(SettingsError("probe and suspicion times must not be zero"));
        }
        if self.probe_rtt >= self.probe_period {
            return Err(SettingsError("the probe period must be longer than the probe round trip"));
        }
        Ok(())
    }

    fn foca_config(&self) -> foca::Config {
        let mut config = foca::Config::simple();
        config.probe_period = self.probe_period;
        config.probe_rtt = self.probe_rtt;
        config.suspect_to_down_after = self.suspect_timeout;
        config.num_indirect_probes = NonZeroUsize::MIN.saturating_add(2);
        config.max_transmissions = NonZeroU8::MIN.saturating_add(9);
        // The node id is the address, so down members cost one entry each, forever: the
        // number of nodes ever seen, not the number of restarts.
        config.remove_down_after = None;
        config.max_packet_size = NonZeroUsize::MIN.saturating_add(MESSAGE_BYTES_MAX - 1);
        // A node wrongly declared down learns it and rejoins with a renewed identity.
        config.notify_down_members = true;
        config.periodic_announce =
            Some(foca::PeriodicParams { frequency: Duration::from_secs(30), num_members: NonZeroUsize::MIN });
        config.periodic_announce_to_down_members =
            Some(foca::PeriodicParams { frequency: Duration::from_secs(10), num_members: NonZeroUsize::MIN });
        config.periodic_gossip = Some(foca::PeriodicParams {
            frequency: Duration::from_millis(200),
            num_members: NonZeroUsize::MIN.saturating_add(2),
        });
        config
    }
}

/// Timings foca cannot run with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid membership settings: {0}")]
pub struct SettingsError(&'static str);

/// Why an input was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// The bytes are not a membership message this node accepts (garbage, too large, trailing
    /// bytes, or a message claiming to come from this node). Nothing changed.
    #[error("malformed membership message: {0}")]
    Malformed(String),
    /// The message names another sender than the node whose connection carried it. Nothing
    /// changed.
    #[error("membership message from {claimed} arrived on the connection of {connection}")]
    WrongSender { claimed: String, connection: String },
    /// foca failed while handling a valid input; its state may have changed partly, and it
    /// resumes with its next probe cycle.
    #[error("membership protocol: {0}")]
    Protocol(String),
}

impl MembershipError {
    fn from_foca(error: foca::Error) -> MembershipError {
        match error {
            foca::Error::DataTooBig
            | foca::Error::MalformedPacket
            | foca::Error::Decode(_)
            | foca::Error::DataFromOurselves
            | foca::Error::IndirectForOurselves => MembershipError::Malformed(error.to_string()),
            other => MembershipError::Protocol(other.to_string()),
        }
    }
}

/// Counts of what the bounded queues dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropCounts {
    pub transmits: u64,
    pub timers: u64,
}

/// The membership of one node: foca plus bounded queues for its timers and outputs.
pub struct Membership {
    foca: Foca<MemberIdentity, WireCodec, SmallRng, NoCustomBroadcast>,
    outputs: Outputs,
    /// The last state reported per node id, so events say only what changed.
    reported: BTreeMap<[u8; 16], (MemberIdentity, MemberState)>,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Membership")
            .field("identity", self.foca.identity())
            .field("members", &self.reported.len())
            .finish_non_exhaustive()
    }
}

/// A timer foca asked for, ordered by deadline and then by when it was asked for.
#[derive(Debug)]
struct Scheduled {
    deadline: Instant,
    sequence: u64,
    timer: Timer<MemberIdentity>,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.deadline, self.sequence) == (other.deadline, other.sequence)
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.deadline, self.sequence).cmp(&(other.deadline, other.sequence))
    }
}

/// What foca produced, waiting to be drained.
#[derive(Default)]
struct Outputs {
    timers: BinaryHeap<Reverse<Scheduled>>,
    next_sequence: u64,
    transmits: VecDeque<(MemberIdentity, Vec<u8>)>,
    events: VecDeque<MembershipEvent>,
    dropped: DropCounts,
}

/// foca's [`Runtime`] for one call: `now` turns its relative timers into deadlines.
struct CallRuntime<'a> {
    now: Instant,
    outputs: &'a mut Outputs,
}

impl Runtime<MemberIdentity> for CallRuntime<'_> {
    fn notify(&mut self, notification: Notification<'_, MemberIdentity>) {
        // Member changes are read from foca's state after each call (see `report_changes`),
        // which also catches suspicions; only this node's own fate comes from here.
        let event = match notification {
            Notification::Rejoin(identity) => MembershipEvent::Rejoined { identity: *identity },
            Notification::Defunct => MembershipEvent::Defunct,
            _ => return,
        };
        if self.outputs.events.len() < EVENTS_MAX {
            self.outputs.events.push_back(event);
        }
    }

    fn send_to(&mut self, to: MemberIdentity, data: &[u8]) {
        if self.outputs.transmits.len() < TRANSMITS_MAX {
            self.outputs.transmits.push_back((to, data.to_vec()));
        } else {
            self.outputs.dropped.transmits += 1;
        }
    }

    fn submit_after(&mut self, timer: Timer<MemberIdentity>, after: Duration) {
        if self.outputs.timers.len() >= TIMERS_MAX {
            self.outputs.dropped.timers += 1;
            return;
        }
        let sequence = self.outputs.next_sequence;
        self.outputs.next_sequence += 1;
        self.outputs.timers.push(Reverse(Scheduled { deadline: self.now + after, sequence, timer }));
    }
}

impl Membership {
    /// A node that knows no one yet. `seed` seeds the randomness of probe and gossip choices
    /// (take it from the operating system: see [`random_seed`]).
    pub fn new(
        identity: MemberIdentity,
        settings: MembershipSettings,
        seed: [u8; 32],
    ) -> Result<Membership, SettingsError> {
        settings.validate()?;
        let foca = Foca::new(identity, settings.foca_config(), SmallRng::from_seed(seed), WireCodec);
        Ok(Membership { foca, outputs: Outputs::default(), reported: BTreeMap::new() })
    }

    /// This node's current identity (renewed after a rejoin).
    pub fn identity(&self) -> &MemberIdentity {
        self.foca.identity()
    }

    /// Asks `to` to let this node join (and to tell it the members it knows). Only `to`'s node
    /// id must be right; its renewal may be anything.
    pub fn announce(&mut self, now: Instant, to: MemberIdentity) -> Result<(), MembershipError> {
        let result = self.foca.announce(to, CallRuntime { now, outputs: &mut self.outputs });
        self.report_changes();
        result.map_err(MembershipError::from_foca)
    }

    /// Bytes that node `from` sent on the membership channel. `from` is the node id its
    /// connection authenticated; a message naming another sender is refused.
    pub fn handle_data(&mut self, now: Instant, from: [u8; 16], bytes: &[u8]) -> Result<(), MembershipError> {
        if bytes.len() > MESSAGE_BYTES_MAX {
            return Err(MembershipError::Malformed(format!("{} bytes; the limit is {MESSAGE_BYTES_MAX}", bytes.len())));
        }
        let header =
            WireCodec.read_header(&mut &bytes[..]).map_err(|error| MembershipError::Malformed(error.to_string()))?;
        if header.src.node_id != from {
            return Err(MembershipError::WrongSender {
                claimed: hex::encode(header.src.node_id),
                connection: hex::encode(from),
            });
        }
        let result = self.foca.handle_data(bytes, CallRuntime { now, outputs: &mut self.outputs });
        self.report_changes();
        result.map_err(MembershipError::from_foca)
    }

    /// When [`Membership::handle_timeout`] is next due, if anything is scheduled.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.outputs.timers.peek().map(|Reverse(scheduled)| scheduled.deadline)
    }

    /// Runs every timer due at `now`, oldest first. Returns the first failure, after running
    /// them all.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), MembershipError> {
        let mut first_error = None;
        while let Some(Reverse(scheduled)) = self.outputs.timers.peek() {
            if scheduled.deadline > now {
                break;
            }
            let Some(Reverse(scheduled)) = self.outputs.timers.pop() else { break };
            let result = self.foca.handle_timer(scheduled.timer, CallRuntime { now, outputs: &mut self.outputs });
            if let Err(error) = result {
                first_error.get_or_insert(error);
            }
        }
        self.report_changes();
        first_error.map_or(Ok(()), |error| Err(MembershipError::from_foca(error)))
    }

    /// The next message to send: who to, and the bytes.
    pub fn poll_transmit(&mut self) -> Option<(MemberIdentity, Vec<u8>)> {
        self.outputs.transmits.pop_front()
    }

    /// The next change in membership.
    pub fn poll_event(&mut self) -> Option<MembershipEvent> {
        let event = self.outputs.events.pop_front();
        if self.outputs.events.is_empty() {
            // Changes held back while the queue was full.
            self.report_changes();
        }
        event
    }

    /// Every member this node knows of (itself excluded), with its state.
    pub fn members(&self) -> impl Iterator<Item = (&MemberIdentity, MemberState)> {
        self.foca.iter_membership_state().map(|member| (member.id(), MemberState::of(member.state())))
    }

    /// What the bounded queues dropped so far.
    pub fn dropped(&self) -> DropCounts {
        self.outputs.dropped
    }

    /// Queues an event for every member whose identity or state differs from what was last
    /// reported. A change that finds the queue full stays unreported and is found next time.
    fn report_changes(&mut self) {
        for member in self.foca.iter_membership_state() {
            let current = (*member.id(), MemberState::of(member.state()));
            if self.reported.get(&current.0.node_id) == Some(&current) {
                continue;
            }
            if self.outputs.events.len() >= EVENTS_MAX {
                return;
            }
            self.reported.insert(current.0.node_id, current);
            self.outputs.events.push_back(MembershipEvent::Member { identity: current.0, state: current.1 });
        }
    }
}

/// 32 bytes from the operating system, to seed [`Membership::new`].
pub fn random_seed() -> Result<[u8; 32], getrandom::Error> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)?;
    Ok(seed)
}

/// Why membership bytes do not decode, or do not fit the buffer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("the message ends early")]
    Truncated,
    #[error("unknown message kind {0}")]
    UnknownMessage(u8),
    #[error("unknown member state {0}")]
    UnknownState(u8),
    #[error("unknown address kind {0}")]
    UnknownAddress(u8),
    /// Encoding only: the buffer has no room; nothing was written.
    #[error("no room to encode")]
    NoRoom,
}

/// The wire format of membership messages, all integers big-endian:
///
/// ```text
/// identity: node id (16 bytes), renewal (u64), address kind (u8: 0 none, 4 IPv4, 6 IPv6),
///           then 4 or 16 address bytes and a u16 port unless none
/// member:   identity, incarnation (u16), state (u8: 0 alive, 1 suspect, 2 down)
/// header:   source identity, source incarnation (u16), destination identity, message kind (u8)
///           and its fields: a probe number (u8), after an identity for the indirect kinds
/// ```
///
/// foca frames the members after the header itself (a u16 count, then the members).
#[derive(Debug, Clone, Copy)]
struct WireCodec;

const MESSAGE_PING: u8 = 0;
const MESSAGE_ACK: u8 = 1;
const MESSAGE_PING_REQUEST: u8 = 2;
const MESSAGE_INDIRECT_PING: u8 = 3;
const MESSAGE_INDIRECT_ACK: u8 = 4;
const MESSAGE_FORWARDED_ACK: u8 = 5;
const MESSAGE_ANNOUNCE: u8 = 6;
const MESSAGE_FEED: u8 = 7;
const MESSAGE_GOSSIP: u8 = 8;
const MESSAGE_BROADCAST: u8 = 9;
const MESSAGE_TURN_UNDEAD: u8 = 10;

fn identity_length(identity: &MemberIdentity) -> usize {
    16 + 8
        + 1
        + match identity.address {
            None => 0,
            Some(SocketAddr::V4(_)) => 4 + 2,
            Some(SocketAddr::V6(_)) => 16 + 2,
        }
}

fn put_identity(buffer: &mut impl BufMut, identity: &MemberIdentity) {
    buffer.put_slice(&identity.node_id);
    buffer.put_u64(identity.renewal);
    match identity.address {
        None => buffer.put_u8(0),
        Some(address) => {
            match address.ip() {
                IpAddr::V4(ip) => {
                    buffer.put_u8(4);
                    buffer.put_slice(&ip.octets());
                }
                IpAddr::V6(ip) => {
                    buffer.put_u8(6);
                    buffer.put_slice(&ip.octets());
                }
            }
            buffer.put_u16(address.port());
        }
    }
}

fn take<const N: usize>(buffer: &mut impl Buf) -> Result<[u8; N], CodecError> {
    let mut bytes = [0u8; N];
    if buffer.remaining() < N {
        return Err(CodecError::Truncated);
    }
    buffer.copy_to_slice(&mut bytes);
    Ok(bytes)
}

fn take_identity(buffer: &mut impl Buf) -> Result<MemberIdentity, CodecError> {
    let node_id = take::<16>(buffer)?;
    let renewal = u64::from_be_bytes(take(buffer)?);
    let address = match take::<1>(buffer)?[0] {
        0 => None,
        4 => Some(IpAddr::V4(Ipv4Addr::from(take::<4>(buffer)?))),
        6 => Some(IpAddr::V6(Ipv6Addr::from(take::<16>(buffer)?))),
        kind => return Err(CodecError::UnknownAddress(kind)),
    };
    let address = match address {
        Some(ip) => Some(SocketAddr::new(ip, u16::from_be_bytes(take(buffer)?))),
        None => None,
    };
    Ok(MemberIdentity { node_id, address, renewal })
}

/// A message's kind byte and the identity and probe number it carries, if any.
fn message_parts(message: &Message<MemberIdentity>) -> (u8, Option<&MemberIdentity>, Option<u8>) {
    match message {
        Message::Ping(probe) => (MESSAGE_PING, None, Some(*probe)),
        Message::Ack(probe) => (MESSAGE_ACK, None, Some(*probe)),
        Message::PingReq { target, probe_number } => (MESSAGE_PING_REQUEST, Some(target), Some(*probe_number)),
        Message::IndirectPing { origin, probe_number } => (MESSAGE_INDIRECT_PING, Some(origin), Some(*probe_number)),
        Message::IndirectAck { target, probe_number } => (MESSAGE_INDIRECT_ACK, Some(target), Some(*probe_number)),
        Message::ForwardedAck { origin, probe_number } => (MESSAGE_FORWARDED_ACK, Some(origin), Some(*probe_number)),
        Message::Announce => (MESSAGE_ANNOUNCE, None, None),
        Message::Feed => (MESSAGE_FEED, None, None),
        Message::Gossip => (MESSAGE_GOSSIP, None, None),
        Message::Broadcast => (MESSAGE_BROADCAST, None, None),
        Message::TurnUndead => (MESSAGE_TURN_UNDEAD, None, None),
    }
}

fn take_message(buffer: &mut impl Buf) -> Result<Message<MemberIdentity>, CodecError> {
    let kind = take::<1>(buffer)?[0];
    let message = match kind {
        MESSAGE_PING => Message::Ping(take::<1>(buffer)?[0]),
        MESSAGE_ACK => Message::Ack(take::<1>(buffer)?[0]),
        MESSAGE_PING_REQUEST..=MESSAGE_FORWARDED_ACK => {
            let member = take_identity(buffer)?;
            let probe_number = take::<1>(buffer)?[0];
            match kind {
                MESSAGE_PING_REQUEST => Message::PingReq { target: member, probe_number },
                MESSAGE_INDIRECT_PING => Message::IndirectPing { origin: member, probe_number },
                MESSAGE_INDIRECT_ACK => Message::IndirectAck { target: member, probe_number },
                _ => Message::ForwardedAck { origin: member, probe_number },
            }
        }
        MESSAGE_ANNOUNCE => Message::Announce,
        MESSAGE_FEED => Message::Feed,
        MESSAGE_GOSSIP => Message::Gossip,
        MESSAGE_BROADCAST => Message::Broadcast,
        MESSAGE_TURN_UNDEAD => Message::TurnUndead,
        other => return Err(CodecError::UnknownMessage(other)),
    };
    Ok(message)
}

impl WireCodec {
    fn read_header(&self, buffer: &mut impl Buf) -> Result<Header<MemberIdentity>, CodecError> {
        let src = take_identity(buffer)?;
        let src_incarnation = u16::from_be_bytes(take(buffer)?);
        let dst = take_identity(buffer)?;
        let message = take_message(buffer)?;
        Ok(Header { src, src_incarnation, dst, message })
    }
}

impl foca::Codec<MemberIdentity> for WireCodec {
    type Error = CodecError;

    fn encode_header(&mut self, header: &Header<MemberIdentity>, mut buffer: impl BufMut) -> Result<(), CodecError> {
        let (kind, member, probe_number) = message_parts(&header.message);
        let length = identity_length(&header.src)
            + 2
            + identity_length(&header.dst)
            + 1
            + member.map_or(0, identity_length)
            + usize::from(probe_number.is_some());
        if buffer.remaining_mut() < length {
            return Err(CodecError::NoRoom);
        }
        put_identity(&mut buffer, &header.src);
        buffer.put_u16(header.src_incarnation);
        put_identity(&mut buffer, &header.dst);
        buffer.put_u8(kind);
        if let Some(member) = member {
            put_identity(&mut buffer, member);
        }
        if let Some(probe_number) = probe_number {
            buffer.put_u8(probe_number);
        }
        Ok(())
    }

    fn decode_header(&mut self, mut buffer: impl Buf) -> Result<Header<MemberIdentity>, CodecError> {
        self.read_header(&mut buffer)
    }

    fn encode_member(&mut self, member: &Member<MemberIdentity>, mut buffer: impl BufMut) -> Result<(), CodecError> {
        if buffer.remaining_mut() < identity_length(member.id()) + 2 + 1 {
            return Err(CodecError::NoRoom);
        }
        put_identity(&mut buffer, member.id());
        buffer.put_u16(member.incarnation());
        buffer.put_u8(match member.state() {
            State::Alive => 0,
            State::Suspect => 1,
            State::Down => 2,
        });
        Ok(())
    }

    fn decode_member(&mut self, mut buffer: impl Buf) -> Result<Member<MemberIdentity>, CodecError> {
        let identity = take_identity(&mut buffer)?;
        let incarnation = u16::from_be_bytes(take(&mut buffer)?);
        let state = match take::<1>(&mut buffer)?[0] {
            0 => State::Alive,
            1 => State::Suspect,
            2 => State::Down,
            other => return Err(CodecError::UnknownState(other)),
        };
        Ok(Member::new(identity, incarnation, state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(byte: u8, renewal: u64) -> MemberIdentity {
        MemberIdentity {
            node_id: [byte; 16],
            address: Some(SocketAddr::from(([127, 0, 0, 1], 7000 + u16::from(byte)))),
            renewal,
        }
    }

    /// Memberships exchanging bytes in memory under a fake clock, advanced in 50 ms steps.
    /// Silenced nodes neither send nor receive.
    struct Network {
        nodes: Vec<Membership>,
        silenced: Vec<bool>,
        events: Vec<Vec<MembershipEvent>>,
        now: Instant,
    }

    impl Network {
        fn new(count: u8) -> Network {
            let nodes: Vec<Membership> = (1..=count)
                .map(|byte| Membership::new(identity(byte, 1), MembershipSettings::default(), [byte; 32]).unwrap())
                .collect();
            Network {
                silenced: vec![false; nodes.len()],
                events: vec![Vec::new(); nodes.len()],
                nodes,
                now: Instant::now(),
            }
        }

        /// Node `from` joins through node `to`, as when their connection opens.
        fn announce(&mut self, from: usize, to: usize) {
            let target = MemberIdentity { renewal: 0, ..*self.nodes[to].identity() };
            self.nodes[from].announce(self.now, target).unwrap();
            self.deliver();
        }

        fn run_for(&mut self, duration: Duration) {
            let end = self.now + duration;
            while self.now < end {
                self.now += Duration::from_millis(50);
                for node in &mut self.nodes {
                    if node.poll_timeout().is_some_and(|due| due <= self.now) {
                        // Timer failures are foca recovering from a dropped message; none here.
                        node.handle_timeout(self.now).unwrap();
                    }
                }
                self.deliver();
            }
        }

        /// Delivers every queued message (and the answers) until all queues are empty.
        fn deliver(&mut self) {
            for _round in 0..1000 {
                let mut any = false;
                for index in 0..self.nodes.len() {
                    while let Some((to, bytes)) = self.nodes[index].poll_transmit() {
                        any = true;
                        let target = self.nodes.iter().position(|node| node.identity().node_id == to.node_id);
                        let Some(target) = target else { continue };
                        if self.silenced[index] || self.silenced[target] {
                            continue;
                        }
                        let from = self.nodes[index].identity().node_id;
                        if let Err(error) = self.nodes[target].handle_data(self.now, from, &bytes) {
                            assert!(!matches!(error, MembershipError::Malformed(_)), "{error}");
                        }
                    }
                    while let Some(event) = self.nodes[index].poll_event() {
                        self.events[index].push(event);
                    }
                }
                if !any {
                    return;
                }
            }
            panic!("messages kept flowing");
        }

        fn state_of(&self, observer: usize, node_id: [u8; 16]) -> Option<MemberState> {
            self.nodes[observer].members().find(|(member, _)| member.node_id == node_id).map(|(_, state)| state)
        }
    }

    #[test]
    fn three_nodes_join_through_one_and_see_each_other_alive() {
        let mut network = Network::new(3);
        network.announce(1, 0);
        network.announce(2, 0);
        network.run_for(Duration::from_secs(5));
        for observer in 0..3 {
            for other in 0..3u8 {
                if usize::from(other) != observer {
                    assert_eq!(network.state_of(observer, [other + 1; 16]), Some(MemberState::Alive));
                }
            }
        }
        // The third node learned of the second without ever announcing to it.
        assert!(
            network.events[2].contains(&MembershipEvent::Member {
                identity: *network.nodes[1].identity(),
                state: MemberState::Alive
            })
        );
    }

    #[test]
    fn a_silent_member_is_suspected_then_declared_down_and_a_restart_rejoins() {
        let mut network = Network::new(3);
        network.announce(1, 0);
        network.announce(2, 0);
        network.run_for(Duration::from_secs(3));
        network.silenced[2] = true;
        network.run_for(Duration::from_secs(10));
        let silent = *network.nodes[2].identity();
        for observer in [0, 1] {
            assert_eq!(network.state_of(observer, silent.node_id), Some(MemberState::Down));
            let states: Vec<MemberState> = network.events[observer]
                .iter()
                .filter_map(|event| match event {
                    MembershipEvent::Member { identity, state } if identity.node_id == silent.node_id => Some(*state),
                    _ => None,
                })
                .collect();
            assert_eq!(states, [MemberState::Alive, MemberState::Suspect, MemberState::Down], "observer {observer}");
        }
        // A restart: same node id, a higher renewal, a new address.
        let restarted = MemberIdentity {
            address: Some(SocketAddr::from(([127, 0, 0, 1], 9999))),
            renewal: silent.renewal + 1000,
            ..silent
        };
        network.nodes[2] = Membership::new(restarted, MembershipSettings::default(), [42; 32]).unwrap();
        network.silenced[2] = false;
        network.announce(2, 0);
        network.run_for(Duration::from_secs(3));
        for observer in [0, 1] {
            let seen = network.nodes[observer].members().find(|(member, _)| member.node_id == silent.node_id);
            assert_eq!(seen.map(|(member, state)| (*member, state)), Some((restarted, MemberState::Alive)));
        }
    }

    #[test]
    fn a_member_wrongly_declared_down_renews_itself_and_rejoins() {
        let mut network = Network::new(3);
        network.announce(1, 0);
        network.announce(2, 0);
        network.run_for(Duration::from_secs(3));
        network.silenced[2] = true;
        network.run_for(Duration::from_secs(10));
        assert_eq!(network.state_of(0, [3; 16]), Some(MemberState::Down));
        // The silence ends without a restart: the periodic announce to down members tells it.
        network.silenced[2] = false;
        let mut healed = false;
        for _second in 0..120 {
            network.run_for(Duration::from_secs(1));
            healed =
                (0..3).all(|observer| network.nodes[observer].members().all(|(_, state)| state == MemberState::Alive));
            if healed {
                break;
            }
        }
        assert!(healed, "every node sees every other alive within two minutes of the silence ending");
        let renewed = *network.nodes[2].identity();
        assert!(renewed.renewal > 1, "{renewed:?}");
        assert!(network.events[2].contains(&MembershipEvent::Rejoined { identity: renewed }));
        assert_eq!(network.state_of(0, [3; 16]), Some(MemberState::Alive));
        assert_eq!(network.state_of(1, [3; 16]), Some(MemberState::Alive));
    }

    #[test]
    fn queues_are_bounded_and_count_what_they_drop() {
        let now = Instant::now();
        let mut node = Membership::new(identity(1, 1), MembershipSettings::default(), [1; 32]).unwrap();
        for _ in 0..TRANSMITS_MAX + 10 {
            node.announce(now, identity(2, 0)).unwrap();
        }
        assert_eq!(node.dropped().transmits, 10);
        let mut queued = 0;
        while node.poll_transmit().is_some() {
            queued += 1;
        }
        assert_eq!(queued, TRANSMITS_MAX);
    }

    #[test]
    fn held_back_events_are_reported_once_there_is_room() {
        let now = Instant::now();
        let mut node = Membership::new(identity(1, 1), MembershipSettings::default(), [1; 32]).unwrap();
        // Fill the event queue with announcements from many distinct nodes.
        let members = EVENTS_MAX + 5;
        for index in 0..members {
            let mut sender = Membership::new(
                MemberIdentity { node_id: index_id(index), address: None, renewal: 1 },
                MembershipSettings::default(),
                [7; 32],
            )
            .unwrap();
            sender.announce(now, identity(1, 0)).unwrap();
            let (_, bytes) = sender.poll_transmit().unwrap();
            node.handle_data(now, index_id(index), &bytes).unwrap();
        }
        let mut seen = std::collections::BTreeSet::new();
        while let Some(event) = node.poll_event() {
            if let MembershipEvent::Member { identity, state: MemberState::Alive } = event {
                seen.insert(identity.node_id);
            }
        }
        assert_eq!(seen.len(), members, "no member is lost at the bound");
    }

    fn index_id(index: usize) -> [u8; 16] {
        let mut id = [0xAA; 16];
        id[..8].copy_from_slice(&(index as u64).to_be_bytes());
        id
    }

    #[test]
    fn garbage_and_impersonation_are_error_values() {
        let now = Instant::now();
        let mut node = Membership::new(identity(1, 1), MembershipSettings::default(), [1; 32]).unwrap();
        assert!(matches!(node.handle_data(now, [2; 16], b""), Err(MembershipError::Malformed(_))));
        assert!(matches!(node.handle_data(now, [2; 16], b"garbage"), Err(MembershipError::Malformed(_))));
        let oversized = vec![0u8; MESSAGE_BYTES_MAX + 1];
        assert!(matches!(node.handle_data(now, [2; 16], &oversized), Err(MembershipError::Malformed(_))));

        // A valid announce from node 2, arriving over node 3's connection.
        let mut sender = Membership::new(identity(2, 1), MembershipSettings::default(), [2; 32]).unwrap();
        sender.announce(now, identity(1, 0)).unwrap();
        let (_, bytes) = sender.poll_transmit().unwrap();
        assert!(matches!(node.handle_data(now, [3; 16], &bytes), Err(MembershipError::WrongSender { .. })));
        // Trailing bytes after an announce, and every truncation of it, are refused too.
        let mut trailing = bytes.clone();
        trailing.extend_from_slice(&[0, 0, 0]);
        assert!(matches!(node.handle_data(now, [2; 16], &trailing), Err(MembershipError::Malformed(_))));
        for end in 0..bytes.len() {
            assert!(node.handle_data(now, [2; 16], &bytes[..end]).is_err(), "truncated at {end}");
        }
        // Pseudo-random bytes behind a valid header prefix: errors or ignored, never a panic.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for length in 0..2000usize {
            let mut noise = bytes[..length.min(bytes.len())].to_vec();
            for _ in 0..(length % 97) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                noise.push(state as u8);
            }
            let _ = node.handle_data(now, [2; 16], &noise);
        }
        assert!(node.members().all(|(member, _)| member.node_id == [2; 16]), "noise made up no members");
    }

    #[test]
    fn every_message_kind_round_trips() {
        use foca::Codec;
        let source = identity(1, 5);
        let destination = MemberIdentity { address: Some("[::1]:7001".parse().unwrap()), ..identity(2, 6) };
        let third = MemberIdentity { address: None, ..identity(3, 7) };
        let messages = [
            Message::Ping(1),
            Message::Ack(2),
            Message::PingReq { target: third, probe_number: 3 },
            Message::IndirectPing { origin: third, probe_number: 4 },
            Message::IndirectAck { target: third, probe_number: 5 },
            Message::ForwardedAck { origin: third, probe_number: 6 },
            Message::Announce,
            Message::Feed,
            Message::Gossip,
            Message::Broadcast,
            Message::TurnUndead,
        ];
        for message in messages {
            let header = Header { src: source, src_incarnation: 9, dst: destination, message };
            let mut bytes = Vec::new();
            WireCodec.encode_header(&header, &mut bytes).unwrap();
            let mut reader = &bytes[..];
            assert_eq!(WireCodec.decode_header(&mut reader).unwrap(), header);
            assert!(reader.is_empty());
            let mut small = bytes::BytesMut::new().limit(bytes.len() - 1);
            assert_eq!(WireCodec.encode_header(&header, &mut small), Err(CodecError::NoRoom));
            assert!(small.get_ref().is_empty(), "nothing written without room");
        }
        let member = Member::new(destination, 3, State::Suspect);
        let mut bytes = Vec::new();
        WireCodec.encode_member(&member, &mut bytes).unwrap();
        assert_eq!(WireCodec.decode_member(&bytes[..]).unwrap(), member);
    }
}
