//! A userspace UDP relay for fault injection (there is no netem here): peers dial the relay,
//! which forwards each client's datagrams to the target through a socket of its own and the
//! answers back. `partition(true)` drops everything in both directions until healed; [`Faults`]
//! add loss, duplication and delay with jitter (which reorders), for every client or for one
//! client address (one link, when the client is a node's own peer socket).
//!
//! Everything is bounded: datagrams waiting out a delay sit in one queue per relay of at most
//! [`DELAYED_MAX`] entries, and a datagram that finds it full is dropped (counted as overflow).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::Random;

/// The most datagrams a relay holds back for delay at once; beyond it they are dropped.
pub const DELAYED_MAX: usize = 4096;

/// What a relay does to datagrams, in both directions. The default forwards everything at once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Drop every datagram.
    pub partitioned: bool,
    /// The share of datagrams dropped, 0 to 100.
    pub loss_percent: u8,
    /// The share of datagrams sent twice (each copy delayed on its own), 0 to 100.
    pub duplicate_percent: u8,
    /// Every datagram waits this long...
    pub delay: Duration,
    /// ...plus a uniform random share of this, so datagrams overtake each other.
    pub jitter: Duration,
}

impl Faults {
    pub fn is_clean(&self) -> bool {
        *self == Faults::default()
    }

    /// The worse of two settings, field by field.
    fn worst(&self, other: &Faults) -> Faults {
        Faults {
            partitioned: self.partitioned || other.partitioned,
            loss_percent: self.loss_percent.max(other.loss_percent),
            duplicate_percent: self.duplicate_percent.max(other.duplicate_percent),
            delay: self.delay.max(other.delay),
            jitter: self.jitter.max(other.jitter),
        }
    }
}

/// What a relay did, since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayCounters {
    pub forwarded: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub delayed: u64,
    /// Dropped because [`DELAYED_MAX`] datagrams were already waiting.
    pub overflowed: u64,
}

#[derive(Default)]
struct Policy {
    everyone: Faults,
    clients: HashMap<SocketAddr, Faults>,
}

#[derive(Default)]
struct Counters {
    forwarded: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    delayed: AtomicU64,
    overflowed: AtomicU64,
}

/// State shared by a relay's tasks.
struct Shared {
    target: SocketAddr,
    policy: Mutex<Policy>,
    counters: Counters,
    random: Mutex<Random>,
    delayed: mpsc::Sender<Delayed>,
}

/// A datagram waiting out its delay.
struct Delayed {
    due: Instant,
    socket: Arc<UdpSocket>,
    destination: SocketAddr,
    bytes: Vec<u8>,
}

/// A running relay; stops when dropped.
pub struct Relay {
    pub address: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind relay"));
        let address = socket.local_addr().expect("relay address");
        let (delayed, queue) = mpsc::channel(DELAYED_MAX);
        let shared = Arc::new(Shared {
            target,
            policy: Mutex::new(Policy::default()),
            counters: Counters::default(),
            random: Mutex::new(Random::new(u64::from(address.port()) << 32 | u64::from(target.port()))),
            delayed,
        });
        let tasks = vec![tokio::spawn(forward(socket, shared.clone())), tokio::spawn(release(queue))];
        Relay { address, shared, tasks }
    }

    /// Drops every datagram in both directions while `on`.
    pub fn partition(&self, on: bool) {
        self.shared.policy.lock().unwrap().everyone.partitioned = on;
    }

    /// The faults for every client (each client also gets its own, see [`Relay::set_client_faults`]:
    /// the worse of the two applies).
    pub fn set_faults(&self, faults: Faults) {
        self.shared.policy.lock().unwrap().everyone = faults;
    }

    /// The faults for datagrams from `client` and the answers to it.
    pub fn set_client_faults(&self, client: SocketAddr, faults: Faults) {
        let mut policy = self.shared.policy.lock().unwrap();
        if faults.is_clean() {
            policy.clients.remove(&client);
        } else {
            policy.clients.insert(client, faults);
        }
    }

    /// Forwards everything at once again, for every client.
    pub fn heal(&self) {
        let mut policy = self.shared.policy.lock().unwrap();
        policy.everyone = Faults::default();
        policy.clients.clear();
    }

    pub fn counters(&self) -> RelayCounters {
        let counters = &self.shared.counters;
        RelayCounters {
            forwarded: counters.forwarded.load(Ordering::Relaxed),
            dropped: counters.dropped.load(Ordering::Relaxed),
            duplicated: counters.duplicated.load(Ordering::Relaxed),
            delayed: counters.delayed.load(Ordering::Relaxed),
            overflowed: counters.overflowed.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Shared {
    fn faults_for(&self, client: SocketAddr) -> Faults {
        let policy = self.policy.lock().unwrap();
        match policy.clients.get(&client) {
            Some(faults) => policy.everyone.worst(faults),
            None => policy.everyone,
        }
    }

    /// Sends `bytes` from `socket` to `destination` as the faults for `client` say.
    async fn deliver(&self, socket: &Arc<UdpSocket>, destination: SocketAddr, client: SocketAddr, bytes: &[u8]) {
        let faults = self.faults_for(client);
        if faults.is_clean() {
            self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
            let _ = socket.send_to(bytes, destination).await;
            return;
        }
        // Decide everything under one lock, then send without it.
        let mut delays = Vec::with_capacity(2);
        {
            let mut random = self.random.lock().unwrap();
            if faults.partitioned || random.chance(faults.loss_percent) {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let copies = if random.chance(faults.duplicate_percent) { 2 } else { 1 };
            if copies == 2 {
                self.counters.duplicated.fetch_add(1, Ordering::Relaxed);
            }
            for _ in 0..copies {
                let jitter = random.below(faults.jitter.as_micros() as u64 + 1);
                delays.push(faults.delay + Duration::from_micros(jitter));
            }
        }
        for delay in delays {
            if delay.is_zero() {
                self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
                let _ = socket.send_to(bytes, destination).await;
                continue;
            }
            let delayed =
                Delayed { due: Instant::now() + delay, socket: socket.clone(), destination, bytes: bytes.to_vec() };
            if self.delayed.try_send(delayed).is_ok() {
                self.counters.delayed.fetch_add(1, Ordering::Relaxed);
            } else {
                self.counters.overflowed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

async fn forward(socket: Arc<UdpSocket>, shared: Arc<Shared>) {
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buffer = vec![0u8; 65_536];
    loop {
        let Ok((length, client)) = socket.recv_from(&mut buffer).await else { return };
        let upstream = match upstreams.get(&client) {
            Some(upstream) => upstream.clone(),
            None => {
                let upstream = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind upstream"));
                upstream.connect(shared.target).await.expect("connect upstream");
                upstreams.insert(client, upstream.clone());
                tokio::spawn(backward(upstream.clone(), socket.clone(), client, shared.clone()));
                upstream
            }
        };
        shared.deliver(&upstream, shared.target, client, &buffer[..length]).await;
    }
}

async fn backward(upstream: Arc<UdpSocket>, socket: Arc<UdpSocket>, client: SocketAddr, shared: Arc<Shared>) {
    let mut buffer = vec![0u8; 65_536];
    loop {
        let length = match upstream.recv(&mut buffer).await {
            Ok(length) => length,
            // The target was not listening (ICMP port unreachable on the connected socket): it
            // may be starting, or restarting after a kill; keep relaying for it.
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(_) => return,
        };
        shared.deliver(&socket, client, client, &buffer[..length]).await;
    }
}

/// Sends delayed datagrams when they are due, earliest first; the channel feeding it holds at
/// most [`DELAYED_MAX`], and so does the heap.
async fn release(mut queue: mpsc::Receiver<Delayed>) {
    let mut waiting: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut datagrams: HashMap<u64, Delayed> = HashMap::new();
    let mut sequence = 0u64;
    loop {
        let next_due = waiting.peek().map(|Reverse((due, _))| *due);
        let room = waiting.len() < DELAYED_MAX;
        tokio::select! {
            received = queue.recv(), if room => {
                let Some(delayed) = received else { return };
                sequence += 1;
                waiting.push(Reverse((delayed.due, sequence)));
                datagrams.insert(sequence, delayed);
            }
            () = sleep_until(next_due) => {
                let now = Instant::now();
                while let Some(Reverse((due, key))) = waiting.peek().copied() {
                    if due > now {
                        break;
                    }
                    waiting.pop();
                    if let Some(delayed) = datagrams.remove(&key) {
                        let _ = delayed.socket.send_to(&delayed.bytes, delayed.destination).await;
                    }
                }
            }
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}
