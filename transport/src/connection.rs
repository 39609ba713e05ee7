//! One connection after QUIC has set it up: the hello exchange on its stream, admission into the
//! peer table, then a reader and a writer that move frames until it ends.
//!
//! Async code here only fills and drains buffers; frames and hellos are decoded by the
//! synchronous [`crate::frame`] and [`crate::handshake`]. Not the accept loop or the redialing
//! (see [`crate::endpoint`]).

use std::fmt;
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use quinn::{ConnectionError, RecvStream, SendStream};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::counters::{Counters, RefusalReason};
use crate::endpoint::{Phase, Shared, TaskContext, wait_draining, wait_stopped};
use crate::events::{CloseCode, Direction, DisconnectReason, PeerEvent, PeerInfo};
use crate::frame::{self, DecodeError, FrameLimits};
use crate::handshake::{HELLO_BYTES_MAX, Hello, Refusal};
use crate::peers::{AdmitError, Admitted, PeerHandle};
use crate::tls::SERVER_NAME;

/// The most bytes taken from QUIC per read.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// A write gathers queued frames until it holds this many bytes (a single frame may be larger).
const WRITE_BATCH_BYTES: usize = 1024 * 1024;

/// Hellos are single uncompressed frames of at most [`HELLO_BYTES_MAX`] bytes.
const HELLO_LIMITS: FrameLimits = FrameLimits { frame_bytes_max: HELLO_BYTES_MAX, compression_bytes_min: usize::MAX };

/// A connection that passed TLS and the hello check and is in the peer table.
#[derive(Debug)]
pub(crate) struct Handshaken {
    connection: quinn::Connection,
    send: SendStream,
    recv: RecvStream,
    /// Bytes read after the peer's hello: the start of its first frames.
    buffer: BytesMut,
    admitted: Admitted,
    /// Our hello frame, when it is still to be written (the accepting side writes it only
    /// after admission, so a dialer never hears a hello from a connection that was refused).
    hello_to_write: Option<Vec<u8>>,
}

impl Handshaken {
    pub(crate) fn node_id(&self) -> [u8; 16] {
        self.admitted.handle.info.node_id
    }
}

/// Why a connection did not get through the handshake.
#[derive(Debug)]
pub(crate) enum HandshakeFailure {
    /// The dial could not start (an unusable address, or the endpoint is closing).
    Connect(quinn::ConnectError),
    /// QUIC or TLS failed, or the peer closed the connection.
    Connection(ConnectionError),
    /// The peer reset or stopped the stream.
    Stream(String),
    /// The peer's hello frame is malformed or too large.
    BadHello(DecodeError),
    /// The peer ended the stream before its hello.
    Finished,
    /// We refused the peer's hello.
    Refused(Refusal),
    /// We keep another connection to this node (see [`crate::peers`]).
    Duplicate { node_id: [u8; 16] },
    /// `peers_max` nodes are connected.
    PeersFull,
}

impl HandshakeFailure {
    /// The refusal to count, if this was one (a peer that cannot be reached is not).
    pub(crate) fn refusal_reason(&self) -> Option<RefusalReason> {
        match self {
            HandshakeFailure::Connect(_) | HandshakeFailure::Duplicate { .. } => None,
            HandshakeFailure::Connection(error) => refusal_of_connection_error(error),
            HandshakeFailure::Stream(_) | HandshakeFailure::BadHello(_) | HandshakeFailure::Finished => {
                Some(RefusalReason::BadHandshake)
            }
            HandshakeFailure::Refused(refusal) => Some(refusal.reason()),
            HandshakeFailure::PeersFull => Some(RefusalReason::PeersFull),
        }
    }

    /// The node behind a connection refused as a duplicate, by us or by the peer: the dialer
    /// then waits for the kept connection to end instead of redialing.
    pub(crate) fn duplicate_node_id(&self) -> Option<[u8; 16]> {
        match self {
            HandshakeFailure::Duplicate { node_id } => Some(*node_id),
            HandshakeFailure::Connection(ConnectionError::ApplicationClosed(close))
                if close.error_code.into_inner() == CloseCode::Replaced as u64 =>
            {
                node_id_in_replaced_phrase(&close.reason)
            }
            _ => None,
        }
    }

    /// Whether the address turned out to be this node, by our check or the peer's.
    pub(crate) fn is_self_connection(&self) -> bool {
        match self {
            HandshakeFailure::Refused(Refusal::SelfConnection { .. }) => true,
            HandshakeFailure::Connection(error) => application_close_code(error) == Some(CloseCode::SelfConnection),
            _ => false,
        }
    }
}

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeFailure::Connect(error) => write!(formatter, "cannot dial: {error}"),
            HandshakeFailure::Connection(ConnectionError::ApplicationClosed(close)) => {
                write!(formatter, "the peer refused us: {}", String::from_utf8_lossy(&close.reason))
            }
            HandshakeFailure::Connection(error) => match refusal_of_connection_error(error) {
                Some(_) => write!(formatter, "TLS handshake failed: {error}"),
                None => write!(formatter, "connection failed: {error}"),
            },
            HandshakeFailure::Stream(problem) => write!(formatter, "the handshake stream failed: {problem}"),
            HandshakeFailure::BadHello(error) => write!(formatter, "bad hello frame: {error}"),
            HandshakeFailure::Finished => formatter.write_str("the peer ended the stream before its hello"),
            HandshakeFailure::Refused(refusal) => write!(formatter, "refused: {refusal}"),
            HandshakeFailure::Duplicate { .. } => {
                formatter.write_str("a connection to this node is already kept; closed the new one")
            }
            HandshakeFailure::PeersFull => formatter.write_str("refused: peers_max peers are connected"),
        }
    }
}

/// Dials `address` and runs the handshake as the dialing side: TLS, our hello, the peer's
/// hello, admission.
pub(crate) async fn dial(shared: &Shared, address: SocketAddr) -> Result<Handshaken, HandshakeFailure> {
    let connecting = shared.quinn.connect(address, SERVER_NAME).map_err(HandshakeFailure::Connect)?;
    let connection = connecting.await.map_err(HandshakeFailure::Connection)?;
    let (mut send, mut recv) = connection.open_bi().await.map_err(HandshakeFailure::Connection)?;
    let hello = hello_frame(&shared.hello);
    send.write_all(&hello).await.map_err(write_failure)?;
    Counters::add(&shared.counters.wire_bytes_sent, hello.len() as u64);
    let mut buffer = BytesMut::new();
    let peer_hello = read_hello(shared, &connection, &mut recv, &mut buffer).await?;
    let admitted = admit(shared, &connection, peer_hello, Direction::Dialed)?;
    Ok(Handshaken { connection, send, recv, buffer, admitted, hello_to_write: None })
}

/// Runs the handshake for a connection a peer dialed: TLS, the peer's hello, admission. Our
/// hello is written by [`run`].
pub(crate) async fn accept(shared: &Shared, incoming: quinn::Incoming) -> Result<Handshaken, HandshakeFailure> {
    let connecting = incoming.accept().map_err(HandshakeFailure::Connection)?;
    let connection = connecting.await.map_err(HandshakeFailure::Connection)?;
    let (send, mut recv) = connection.accept_bi().await.map_err(HandshakeFailure::Connection)?;
    let mut buffer = BytesMut::new();
    let peer_hello = read_hello(shared, &connection, &mut recv, &mut buffer).await?;
    let admitted = admit(shared, &connection, peer_hello, Direction::Accepted)?;
    let hello_to_write = Some(hello_frame(&shared.hello));
    Ok(Handshaken { connection, send, recv, buffer, admitted, hello_to_write })
}

fn hello_frame(hello: &Hello) -> Vec<u8> {
    let mut output = Vec::new();
    // A hello is at most a few hundred bytes (strings are cut at 255), under the hello limit.
    let encoded = frame::encode(&hello.encode(), &HELLO_LIMITS, &mut output);
    debug_assert!(encoded.is_ok(), "a hello fits its frame limit");
    output
}

/// Reads the peer's hello frame and checks it; on refusal, closes the connection with the
/// refusal's code and a sentence for the peer's log.
async fn read_hello(
    shared: &Shared,
    connection: &quinn::Connection,
    recv: &mut RecvStream,
    buffer: &mut BytesMut,
) -> Result<Hello, HandshakeFailure> {
    let payload = loop {
        match frame::decode(buffer, &HELLO_LIMITS) {
            Ok(Some(payload)) => break payload,
            Ok(None) => {}
            Err(error) => {
                let phrase = format!("node '{}' could not read your hello frame: {error}", shared.hello.node_name);
                connection.close(CloseCode::BadHandshake.varint(), phrase.as_bytes());
                return Err(HandshakeFailure::BadHello(error));
            }
        }
        match recv.read_chunk(READ_CHUNK_BYTES, true).await {
            Ok(Some(chunk)) => {
                Counters::add(&shared.counters.wire_bytes_received, chunk.bytes.len() as u64);
                buffer.extend_from_slice(&chunk.bytes);
            }
            Ok(None) => {
                connection.close(CloseCode::BadHandshake.varint(), b"the stream ended before your hello");
                return Err(HandshakeFailure::Finished);
            }
            Err(error) => return Err(read_failure(error)),
        }
    };
    shared.hello.check_peer(&payload, connection.remote_address()).map_err(|refusal| {
        connection.close(refusal.close_code().varint(), refusal.phrase_for_peer(&shared.hello.node_name).as_bytes());
        HandshakeFailure::Refused(refusal)
    })
}

fn admit(
    shared: &Shared,
    connection: &quinn::Connection,
    hello: Hello,
    direction: Direction,
) -> Result<Admitted, HandshakeFailure> {
    let dialer_node_id = match direction {
        Direction::Dialed => shared.hello.node_id,
        Direction::Accepted => hello.node_id,
    };
    let info = PeerInfo {
        peer_id: shared.next_peer_id(),
        node_id: hello.node_id,
        node_name: hello.node_name,
        address: connection.remote_address(),
        listen_address: hello.listen_address,
        direction,
    };
    let node_id = info.node_id;
    let admitted = shared.peer_table().admit(info, dialer_node_id, connection.clone(), &shared.limits);
    match admitted {
        Ok(admitted) => {
            if let Some(replaced) = &admitted.replaced {
                Counters::add(&shared.counters.duplicates_closed, 1);
                replaced.close(
                    DisconnectReason::Replaced,
                    CloseCode::Replaced,
                    "replaced by a newer or preferred connection",
                );
            }
            Ok(admitted)
        }
        Err(AdmitError::Duplicate) => {
            Counters::add(&shared.counters.duplicates_closed, 1);
            connection.close(CloseCode::Replaced.varint(), replaced_phrase(shared.hello.node_id).as_bytes());
            Err(HandshakeFailure::Duplicate { node_id })
        }
        Err(AdmitError::Full) => {
            let phrase =
                format!("node '{}' has its maximum of {} peers", shared.hello.node_name, shared.limits.peers_max);
            connection.close(CloseCode::PeersFull.varint(), phrase.as_bytes());
            Err(HandshakeFailure::PeersFull)
        }
    }
}

/// Runs an admitted connection until it ends: announces it, moves frames both ways, then
/// removes it from the table and announces the disconnect. Returns why it ended.
pub(crate) async fn run(context: &TaskContext, handshaken: Handshaken) -> DisconnectReason {
    let Handshaken { connection, mut send, mut recv, mut buffer, admitted, hello_to_write } = handshaken;
    let Admitted { handle, mut queue, finished, replaced } = admitted;
    let shared = &context.shared;
    let mut phase = shared.phase.subscribe();

    if let Some(hello) = hello_to_write {
        if let Err(error) = send.write_all(&hello).await {
            // Never announced, so nothing to tell the node; `finished` drops on return.
            shared.peer_table().remove(handle.info.peer_id, handle.info.node_id);
            let reason = match write_failure(error) {
                HandshakeFailure::Connection(error) => DisconnectReason::from_connection_error(&error),
                other => DisconnectReason::ConnectionLost(other.to_string()),
            };
            debug!(peer_id = %handle.info.peer_id, %reason, "could not send our hello");
            return reason;
        }
        Counters::add(&shared.counters.wire_bytes_sent, hello.len() as u64);
    }
    if let Some(replaced) = replaced {
        // The node hears the old connection's Disconnected before the new one's Connected.
        tokio::select! {
            () = replaced.finished() => {}
            () = wait_stopped(&mut phase) => {}
        }
    }

    let info = &handle.info;
    let counter = match info.direction {
        Direction::Dialed => &shared.counters.connections_dialed,
        Direction::Accepted => &shared.counters.connections_accepted,
    };
    Counters::add(counter, 1);
    info!(
        peer_id = %info.peer_id, node_name = %info.node_name, address = %info.address,
        direction = ?info.direction, "peer connected"
    );
    let connected = PeerEvent::Connected {
        peer_id: info.peer_id,
        node_id: info.node_id,
        node_name: info.node_name.clone(),
        address: info.address,
        listen_address: info.listen_address,
    };
    let mut reason = if emit(context, &mut phase, connected).await {
        tokio::select! {
            reason = read_frames(context, &handle, &mut recv, &mut buffer) => reason,
            reason = write_frames(context, &handle, &mut send, &mut queue, &connection) => reason,
        }
    } else {
        DisconnectReason::Shutdown
    };
    finish(context, &handle, &connection, &mut reason, &mut phase).await;
    drop(finished);
    reason
}

/// Ends an announced connection: settles on the reason, closes, leaves the table, logs, and
/// tells the node.
async fn finish(
    context: &TaskContext,
    handle: &PeerHandle,
    connection: &quinn::Connection,
    reason: &mut DisconnectReason,
    phase: &mut watch::Receiver<Phase>,
) {
    let shared = &context.shared;
    let info = &handle.info;
    if let Some(close_reason) = handle.take_close_reason() {
        *reason = close_reason;
    } else if *phase.borrow() != Phase::Running && !matches!(reason, DisconnectReason::BadFrame(_)) {
        *reason = DisconnectReason::Shutdown;
    }
    connection.close(reason.close_code().varint(), reason.to_string().as_bytes());
    shared.peer_table().remove(info.peer_id, info.node_id);
    if let DisconnectReason::BadFrame(_) = reason {
        warn!(
            peer_id = %info.peer_id, node_name = %info.node_name, address = %info.address, %reason,
            "disconnected a peer"
        );
    } else {
        info!(peer_id = %info.peer_id, node_name = %info.node_name, %reason, "peer disconnected");
    }
    emit(context, phase, PeerEvent::Disconnected { peer_id: info.peer_id, reason: reason.clone() }).await;
}

/// Delivers one event, waiting for room, unless the endpoint is stopping hard; then only if
/// there is room now. Returns whether it was delivered.
async fn emit(context: &TaskContext, phase: &mut watch::Receiver<Phase>, event: PeerEvent) -> bool {
    if *phase.borrow() == Phase::Stopped {
        return context.events.try_send(event).is_ok();
    }
    tokio::select! {
        biased;
        sent = context.events.send(event) => sent.is_ok(),
        () = wait_stopped(phase) => false,
    }
}

/// Reads frames and delivers them in order. Pauses while the event channel is full, which
/// stops reading and so lets QUIC flow control push back on the peer.
async fn read_frames(
    context: &TaskContext,
    handle: &PeerHandle,
    recv: &mut RecvStream,
    buffer: &mut BytesMut,
) -> DisconnectReason {
    let shared = &context.shared;
    let limits = shared.limits.frame_limits();
    let mut phase = shared.phase.subscribe();
    loop {
        loop {
            match frame::decode(buffer, &limits) {
                Ok(Some(bytes)) => {
                    Counters::add(&shared.counters.frames_received, 1);
                    Counters::add(&shared.counters.payload_bytes_received, bytes.len() as u64);
                    let event = PeerEvent::Frame { peer_id: handle.info.peer_id, bytes };
                    if !emit(context, &mut phase, event).await {
                        return DisconnectReason::Shutdown;
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    Counters::add(&shared.counters.bad_frames, 1);
                    return DisconnectReason::BadFrame(error.to_string());
                }
            }
        }
        match recv.read_chunk(READ_CHUNK_BYTES, true).await {
            Ok(Some(chunk)) => {
                Counters::add(&shared.counters.wire_bytes_received, chunk.bytes.len() as u64);
                buffer.extend_from_slice(&chunk.bytes);
            }
            Ok(None) => return DisconnectReason::StreamFinished,
            Err(error) => return disconnect_reason(read_failure(error)),
        }
    }
}

/// Writes queued frames, as many per write as are queued (up to [`WRITE_BATCH_BYTES`]). When
/// the endpoint starts shutting down, writes what is queued, ends the stream, and waits for the
/// peer to close the connection once it has read everything.
async fn write_frames(
    context: &TaskContext,
    handle: &PeerHandle,
    send: &mut SendStream,
    queue: &mut mpsc::Receiver<Bytes>,
    connection: &quinn::Connection,
) -> DisconnectReason {
    let shared = &context.shared;
    let mut phase = shared.phase.subscribe();
    let mut batch = Vec::new();
    loop {
        let first = tokio::select! {
            biased;
            () = wait_draining(&mut phase) => None,
            first = queue.recv() => first,
        };
        let Some(first) = first else { break };
        let mut next = Some(first);
        while let Some(bytes) = next {
            add_to_batch(shared, handle, &bytes, &mut batch);
            next = if batch.len() < WRITE_BATCH_BYTES { queue.try_recv().ok() } else { None };
        }
        if let Err(reason) = write_batch(shared, send, &mut batch).await {
            return reason;
        }
    }

    // Draining: what was queued before the shutdown still goes out.
    for _ in 0..shared.limits.send_queue_frames_max {
        let Ok(bytes) = queue.try_recv() else { break };
        add_to_batch(shared, handle, &bytes, &mut batch);
        if batch.len() >= WRITE_BATCH_BYTES && write_batch(shared, send, &mut batch).await.is_err() {
            return DisconnectReason::Shutdown;
        }
    }
    if write_batch(shared, send, &mut batch).await.is_ok() && send.finish().is_ok() {
        tokio::select! {
            _ = connection.closed() => {}
            () = wait_stopped(&mut phase) => {}
        }
    }
    DisconnectReason::Shutdown
}

fn add_to_batch(shared: &Shared, handle: &PeerHandle, bytes: &Bytes, batch: &mut Vec<u8>) {
    handle.queue.dequeued(bytes.len());
    match frame::encode(bytes, &shared.limits.frame_limits(), batch) {
        Ok(()) => {
            Counters::add(&shared.counters.frames_sent, 1);
            Counters::add(&shared.counters.payload_bytes_sent, bytes.len() as u64);
        }
        // `Endpoint::send` refuses frames over the limit, so this is a bug of ours, not the peer's.
        Err(error) => debug_assert!(false, "a queued frame failed to encode: {error}"),
    }
}

async fn write_batch(shared: &Shared, send: &mut SendStream, batch: &mut Vec<u8>) -> Result<(), DisconnectReason> {
    if batch.is_empty() {
        return Ok(());
    }
    send.write_all(batch).await.map_err(|error| disconnect_reason(write_failure(error)))?;
    Counters::add(&shared.counters.wire_bytes_sent, batch.len() as u64);
    batch.clear();
    // One huge frame should not pin its buffer for the rest of the connection.
    if batch.capacity() > 2 * WRITE_BATCH_BYTES {
        batch.shrink_to(WRITE_BATCH_BYTES);
    }
    Ok(())
}

fn read_failure(error: quinn::ReadError) -> HandshakeFailure {
    match error {
        quinn::ReadError::ConnectionLost(error) => HandshakeFailure::Connection(error),
        other => HandshakeFailure::Stream(other.to_string()),
    }
}

fn write_failure(error: quinn::WriteError) -> HandshakeFailure {
    match error {
        quinn::WriteError::ConnectionLost(error) => HandshakeFailure::Connection(error),
        other => HandshakeFailure::Stream(other.to_string()),
    }
}

fn disconnect_reason(failure: HandshakeFailure) -> DisconnectReason {
    match failure {
        HandshakeFailure::Connection(error) => DisconnectReason::from_connection_error(&error),
        other => DisconnectReason::ConnectionLost(other.to_string()),
    }
}

/// The reason sent with [`CloseCode::Replaced`] when a handshake loses to a kept connection.
/// It ends with the closing node's id in hex, in parentheses, so that a dialer that has not seen
/// the closing node's hello yet learns which node it reached (see the `handshake` module doc).
fn replaced_phrase(our_node_id: [u8; 16]) -> String {
    let hex: String = our_node_id.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("another connection between our nodes is kept (node {hex})")
}

fn node_id_in_replaced_phrase(reason: &[u8]) -> Option<[u8; 16]> {
    let hex = reason.strip_suffix(b")")?.rsplit(|byte| *byte == b' ').next()?;
    if hex.len() != 32 {
        return None;
    }
    let mut node_id = [0u8; 16];
    for (byte, pair) in node_id.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(node_id)
}

fn application_close_code(error: &ConnectionError) -> Option<CloseCode> {
    match error {
        ConnectionError::ApplicationClosed(close) => CloseCode::from_u64(close.error_code.into_inner()),
        _ => None,
    }
}

/// The refusal a connection error means: a TLS alert (sent or received), or one of our close
/// codes from the peer's side of the handshake. Timeouts and resets are not refusals.
pub(crate) fn refusal_of_connection_error(error: &ConnectionError) -> Option<RefusalReason> {
    let code = match error {
        ConnectionError::TransportError(error) => u64::from(error.code),
        ConnectionError::ConnectionClosed(close) => u64::from(close.error_code),
        ConnectionError::ApplicationClosed(_) => return application_close_code(error).and_then(CloseCode::refusal),
        _ => return None,
    };
    // QUIC carries a TLS alert as the transport error 0x100 + alert.
    if !(0x100..0x200).contains(&code) {
        return None;
    }
    use rustls::AlertDescription;
    Some(match AlertDescription::from((code & 0xff) as u8) {
        AlertDescription::CertificateRequired => RefusalReason::NoCertificate,
        AlertDescription::CertificateExpired => RefusalReason::ExpiredCertificate,
        AlertDescription::UnknownCA
        | AlertDescription::BadCertificate
        | AlertDescription::UnsupportedCertificate
        | AlertDescription::CertificateUnknown
        | AlertDescription::CertificateRevoked
        | AlertDescription::AccessDenied
        | AlertDescription::DecryptError => RefusalReason::UntrustedCertificate,
        _ => RefusalReason::OtherTls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replaced_phrase_carries_the_node_id() {
        let node_id = [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0, 1, 2, 3, 4, 5, 6, 0xff];
        let phrase = replaced_phrase(node_id);
        assert_eq!(phrase, "another connection between our nodes is kept (node 0123456789abcdef00010203040506ff)");
        assert_eq!(node_id_in_replaced_phrase(phrase.as_bytes()), Some(node_id));
        for other in [&b""[..], b"no id here", b"(node 0123)", b"(node 0123456789abcdef00010203040506zz)"] {
            assert_eq!(node_id_in_replaced_phrase(other), None);
        }
    }
}
