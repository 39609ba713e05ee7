//! A userspace UDP relay for fault injection (there is no netem here): peers dial the relay,
//! which forwards each client's datagrams to the target through a socket of its own and the
//! answers back. `partition(true)` drops everything in both directions until healed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::UdpSocket;

/// A running relay; stops when dropped.
pub struct Relay {
    pub address: SocketAddr,
    partitioned: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind relay"));
        let address = socket.local_addr().expect("relay address");
        let partitioned = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(forward(socket, target, partitioned.clone()));
        Relay { address, partitioned, task }
    }

    /// Drops every datagram in both directions while `on`.
    pub fn partition(&self, on: bool) {
        self.partitioned.store(on, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(socket: Arc<UdpSocket>, target: SocketAddr, partitioned: Arc<AtomicBool>) {
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buffer = vec![0u8; 65_536];
    loop {
        let Ok((length, client)) = socket.recv_from(&mut buffer).await else { return };
        if partitioned.load(Ordering::SeqCst) {
            continue;
        }
        let upstream = match upstreams.get(&client) {
            Some(upstream) => upstream.clone(),
            None => {
                let upstream = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind upstream"));
                upstream.connect(target).await.expect("connect upstream");
                upstreams.insert(client, upstream.clone());
                tokio::spawn(backward(upstream.clone(), socket.clone(), client, partitioned.clone()));
                upstream
            }
        };
        let _ = upstream.send(&buffer[..length]).await;
    }
}

async fn backward(upstream: Arc<UdpSocket>, socket: Arc<UdpSocket>, client: SocketAddr, partitioned: Arc<AtomicBool>) {
    let mut buffer = vec![0u8; 65_536];
    loop {
        let Ok(length) = upstream.recv(&mut buffer).await else { return };
        if !partitioned.load(Ordering::SeqCst) {
            let _ = socket.send_to(&buffer[..length], client).await;
        }
    }
}
