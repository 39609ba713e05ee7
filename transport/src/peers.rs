//! The table of live connections, at most one per remote node, and the rule that decides which
//! connection survives when there are two.
//!
//! No I/O and no awaiting: callers hold the table's lock only for a lookup or an insert.
//!
//! # Duplicates
//!
//! When two nodes dial each other at the same moment, both sides end up with two connections.
//! Both sides must keep the same one without talking about it, so the rule only uses facts both
//! sides know: the connection dialed by the node with the lower node id wins. When both
//! connections were dialed by the same node (it restarted, or dialed twice), the newer one wins:
//! the older is most likely dead already, and only the receiving side can even see both.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::events::{CloseCode, DisconnectReason, PeerId, PeerInfo};

/// One admitted connection, shared by the table, `Endpoint::send` and the connection's task.
#[derive(Debug)]
pub(crate) struct PeerHandle {
    pub(crate) info: PeerInfo,
    /// The node that dialed this connection: ours or the peer's.
    pub(crate) dialer_node_id: [u8; 16],
    /// The send queue; its receiver is the connection's writer.
    pub(crate) queue: SendQueue,
    /// The QUIC connection, for closing it from outside its task.
    pub(crate) connection: quinn::Connection,
    /// Set before the connection is closed from outside its task, so the task reports why.
    close_reason: Mutex<Option<DisconnectReason>>,
    /// Set by the first [`PeerHandle::close`]; never cleared.
    closing: AtomicBool,
    /// Closes (its sender drops) once the connection's task has delivered `Disconnected`.
    finished: watch::Receiver<()>,
}

/// Why a frame was not queued.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The peer's queue is at `send_queue_frames_max` frames or `send_queue_bytes_max` bytes.
    /// Nothing was queued: the caller waits, drops the frame, or disconnects the peer.
    #[error("the peer's send queue is full")]
    Full,
    /// No such connection (never was, or it has disconnected). Nothing was queued.
    #[error("the peer is not connected")]
    NotConnected,
    /// The payload is over `frame_bytes_max`; the peer would refuse it. Nothing was queued.
    #[error("the frame has {bytes} bytes, more than the {bytes_max}-byte limit")]
    TooLarge { bytes: usize, bytes_max: usize },
}

/// What the connection's task keeps of its own admission.
#[derive(Debug)]
pub(crate) struct Admitted {
    pub(crate) handle: Arc<PeerHandle>,
    pub(crate) queue: mpsc::Receiver<Bytes>,
    /// Dropped after `Disconnected` is delivered; that wakes whoever waits on `finished`.
    pub(crate) finished: watch::Sender<()>,
    /// The connection this one replaced, whose task must finish before `Connected` is sent.
    pub(crate) replaced: Option<Arc<PeerHandle>>,
}

/// Why a connection was not admitted.
#[derive(Debug)]
pub(crate) enum AdmitError {
    /// Another connection to this node is kept (see the module doc).
    Duplicate,
    /// `peers_max` nodes are connected.
    Full,
}

/// The sending half of one peer's queue, bounded in frames (by the channel) and in payload
/// bytes (by a counter the writer decrements).
#[derive(Debug)]
pub(crate) struct SendQueue {
    sender: mpsc::Sender<Bytes>,
    /// Payload bytes queued: added by `enqueue`, taken off by `dequeued`.
    queued_bytes: AtomicUsize,
    queue_bytes_max: usize,
}

impl SendQueue {
    pub(crate) fn new(queue_frames_max: usize, queue_bytes_max: usize) -> (SendQueue, mpsc::Receiver<Bytes>) {
        let (sender, receiver) = mpsc::channel(queue_frames_max);
        (SendQueue { sender, queued_bytes: AtomicUsize::new(0), queue_bytes_max }, receiver)
    }

    /// Queues one payload, or says why not. Never waits.
    pub(crate) fn enqueue(&self, bytes: Bytes) -> Result<(), SendError> {
        let length = bytes.len();
        let queued = self.queued_bytes.fetch_add(length, Ordering::AcqRel);
        if queued > 0 && queued.saturating_add(length) > self.queue_bytes_max {
            self.queued_bytes.fetch_sub(length, Ordering::AcqRel);
            return Err(SendError::Full);
        }
        self.sender.try_send(bytes).map_err(|error| {
            self.queued_bytes.fetch_sub(length, Ordering::AcqRel);
            match error {
                mpsc::error::TrySendError::Full(_) => SendError::Full,
                mpsc::error::TrySendError::Closed(_) => SendError::NotConnected,
            }
        })
    }

    /// The writer took a payload of `length` bytes off the queue.
    pub(crate) fn dequeued(&self, length: usize) {
        self.queued_bytes.fetch_sub(length, Ordering::AcqRel);
    }

    /// Frames in the queue now.
    #[cfg(test)]
    pub(crate) fn queued_frames(&self) -> usize {
        self.sender.max_capacity() - self.sender.capacity()
    }
}

impl PeerHandle {
    /// Closes the connection from outside its task; the task reports `reason`. Returns false,
    /// doing nothing, if it was closed this way before.
    pub(crate) fn close(&self, reason: DisconnectReason, code: CloseCode, phrase: &str) -> bool {
        if self.closing.swap(true, Ordering::AcqRel) {
            return false;
        }
        *self.close_reason.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason);
        self.connection.close(code.varint(), phrase.as_bytes());
        true
    }

    /// Whether [`PeerHandle::close`] was called: the connection takes no more frames.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// The reason set by [`PeerHandle::close`], if it was called.
    pub(crate) fn take_close_reason(&self) -> Option<DisconnectReason> {
        self.close_reason.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    /// Waits until the connection's task has delivered its `Disconnected` event.
    pub(crate) async fn finished(&self) {
        let mut finished = self.finished.clone();
        // `changed` fails once the sender is dropped, which is the only thing that happens to it.
        while finished.changed().await.is_ok() {}
    }
}

/// Which of two connections to the same node survives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Survivor {
    Existing,
    Candidate,
}

/// The duplicate rule (see the module doc), from the two connections' dialers.
pub(crate) fn survivor(existing_dialer: [u8; 16], candidate_dialer: [u8; 16]) -> Survivor {
    if candidate_dialer <= existing_dialer { Survivor::Candidate } else { Survivor::Existing }
}

/// The live connections.
#[derive(Debug, Default)]
pub(crate) struct PeerTable {
    by_node: HashMap<[u8; 16], Arc<PeerHandle>>,
    by_peer: HashMap<PeerId, Arc<PeerHandle>>,
}

impl PeerTable {
    /// Admits a connection that passed the handshake, replacing a losing duplicate.
    pub(crate) fn admit(
        &mut self,
        info: PeerInfo,
        dialer_node_id: [u8; 16],
        connection: quinn::Connection,
        limits: &crate::config::Limits,
    ) -> Result<Admitted, AdmitError> {
        let replaced = match self.by_node.get(&info.node_id) {
            Some(existing) => match survivor(existing.dialer_node_id, dialer_node_id) {
                Survivor::Existing => return Err(AdmitError::Duplicate),
                Survivor::Candidate => Some(existing.clone()),
            },
            None if self.by_node.len() >= limits.peers_max => return Err(AdmitError::Full),
            None => None,
        };
        if let Some(replaced) = &replaced {
            self.by_peer.remove(&replaced.info.peer_id);
        }
        let (queue_sender, queue) = SendQueue::new(limits.send_queue_frames_max, limits.send_queue_bytes_max);
        let (finished, finished_receiver) = watch::channel(());
        let handle = Arc::new(PeerHandle {
            info,
            dialer_node_id,
            queue: queue_sender,
            connection,
            close_reason: Mutex::new(None),
            closing: AtomicBool::new(false),
            finished: finished_receiver,
        });
        self.by_node.insert(handle.info.node_id, handle.clone());
        self.by_peer.insert(handle.info.peer_id, handle.clone());
        Ok(Admitted { handle, queue, finished, replaced })
    }

    /// Removes a connection if it is still in the table (a replaced one already is not).
    pub(crate) fn remove(&mut self, peer_id: PeerId, node_id: [u8; 16]) {
        self.by_peer.remove(&peer_id);
        if self.by_node.get(&node_id).is_some_and(|current| current.info.peer_id == peer_id) {
            self.by_node.remove(&node_id);
        }
    }

    pub(crate) fn get(&self, peer_id: PeerId) -> Option<Arc<PeerHandle>> {
        self.by_peer.get(&peer_id).cloned()
    }

    pub(crate) fn by_node(&self, node_id: &[u8; 16]) -> Option<Arc<PeerHandle>> {
        self.by_node.get(node_id).cloned()
    }

    /// A connection to the node at `address`: one whose remote address is `address` (a node
    /// dials from its listening socket, so this is also how it is seen when it dialed us), or
    /// that advertised `address` as its listen address.
    pub(crate) fn by_address(&self, address: SocketAddr) -> Option<Arc<PeerHandle>> {
        self.by_node
            .values()
            .find(|handle| handle.info.address == address || handle.info.listen_address == Some(address))
            .cloned()
    }

    pub(crate) fn list(&self) -> Vec<PeerInfo> {
        let mut peers: Vec<PeerInfo> = self.by_peer.values().map(|handle| handle.info.clone()).collect();
        peers.sort_by_key(|info| info.peer_id);
        peers
    }

    pub(crate) fn all(&self) -> Vec<Arc<PeerHandle>> {
        self.by_peer.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOW: [u8; 16] = [1; 16];
    const HIGH: [u8; 16] = [2; 16];

    #[test]
    fn the_lower_dialer_wins_whichever_arrives_first() {
        assert_eq!(survivor(HIGH, LOW), Survivor::Candidate);
        assert_eq!(survivor(LOW, HIGH), Survivor::Existing);
    }

    #[test]
    fn the_queue_holds_exactly_its_frame_limit() {
        let (queue, mut receiver) = SendQueue::new(3, usize::MAX);
        for _ in 0..3 {
            queue.enqueue(Bytes::from_static(b"x")).unwrap();
        }
        assert_eq!(queue.enqueue(Bytes::from_static(b"x")), Err(SendError::Full));
        assert_eq!(queue.queued_frames(), 3);
        let taken = receiver.try_recv().unwrap();
        queue.dequeued(taken.len());
        queue.enqueue(Bytes::from_static(b"x")).unwrap();
        assert_eq!(queue.enqueue(Bytes::from_static(b"x")), Err(SendError::Full), "full again");
    }

    #[test]
    fn the_queue_holds_at_most_its_byte_limit_but_always_one_frame() {
        let (queue, mut receiver) = SendQueue::new(100, 10);
        queue.enqueue(Bytes::from(vec![0u8; 6])).unwrap();
        queue.enqueue(Bytes::from(vec![0u8; 4])).unwrap();
        assert_eq!(queue.enqueue(Bytes::from(vec![0u8; 1])), Err(SendError::Full), "10 bytes queued");
        for _ in 0..2 {
            let taken = receiver.try_recv().unwrap();
            queue.dequeued(taken.len());
        }
        // An empty queue takes one frame of any size, so every frame within the frame limit can
        // be sent; then it is full again.
        queue.enqueue(Bytes::from(vec![0u8; 50])).unwrap();
        assert_eq!(queue.enqueue(Bytes::from(vec![0u8; 1])), Err(SendError::Full));
    }

    #[test]
    fn a_closed_queue_is_not_connected() {
        let (queue, receiver) = SendQueue::new(2, 100);
        drop(receiver);
        assert_eq!(queue.enqueue(Bytes::from_static(b"x")), Err(SendError::NotConnected));
    }

    #[test]
    fn the_newer_of_two_from_one_dialer_wins() {
        assert_eq!(survivor(LOW, LOW), Survivor::Candidate);
        assert_eq!(survivor(HIGH, HIGH), Survivor::Candidate);
    }
}
