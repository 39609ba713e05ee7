//! Frames between two real endpoints: order under volume, compression, and the frame limit.

use std::time::Duration;

use bytes::Bytes;

use crate::endpoint::Endpoint;
use crate::events::PeerId;
use crate::peers::SendError;
use crate::tests::support::{Cluster, Events, bind, connect_pair, expect_frame, guard};

const FRAMES: u32 = 10_000;

/// Frame `index` from `tag`: the tag, the index, then filler of a varying length.
fn numbered(tag: u8, index: u32) -> Bytes {
    let mut payload = vec![tag];
    payload.extend_from_slice(&index.to_be_bytes());
    payload.resize(5 + (index as usize * 7) % 300, tag);
    Bytes::from(payload)
}

/// Sends frames 0..FRAMES, waiting briefly whenever the queue is full.
async fn send_all(endpoint: Endpoint, peer_id: PeerId, tag: u8) {
    for index in 0..FRAMES {
        let payload = numbered(tag, index);
        loop {
            match endpoint.send(peer_id, payload.clone()) {
                Ok(()) => break,
                Err(SendError::Full) => tokio::time::sleep(Duration::from_millis(1)).await,
                Err(error) => panic!("send {index}: {error}"),
            }
        }
    }
}

async fn receive_all(mut events: Events, from: PeerId, tag: u8) -> Events {
    for index in 0..FRAMES {
        assert_eq!(expect_frame(&mut events, from).await, numbered(tag, index), "frame {index}");
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_frames_flow_both_ways_in_order() {
    let cluster = Cluster::new("a");
    let (alpha, mut alpha_events) = bind(cluster.config("alpha", 1));
    let (beta, mut beta_events) = bind(cluster.config("beta", 2));
    let (beta_peer, alpha_peer) = connect_pair(&alpha, &mut alpha_events, &beta, &mut beta_events).await;

    let senders = [
        tokio::spawn(send_all(alpha.clone(), beta_peer, b'a')),
        tokio::spawn(send_all(beta.clone(), alpha_peer, b'b')),
    ];
    let beta_receiver = tokio::spawn(receive_all(beta_events, alpha_peer, b'a'));
    let alpha_receiver = tokio::spawn(receive_all(alpha_events, beta_peer, b'b'));
    for sender in senders {
        guard("the senders", sender).await.unwrap();
    }
    let _alpha_events = guard("alpha's frames", alpha_receiver).await.unwrap();
    let _beta_events = guard("beta's frames", beta_receiver).await.unwrap();

    for endpoint in [&alpha, &beta] {
        let counters = endpoint.counters();
        assert_eq!(counters.frames_sent, u64::from(FRAMES));
        assert_eq!(counters.frames_received, u64::from(FRAMES));
        assert_eq!(counters.bad_frames, 0);
        assert_eq!(counters.refused_total(), 0);
    }
    alpha.shutdown().await;
    beta.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_frame_is_compressed_on_the_wire_and_arrives_whole() {
    let cluster = Cluster::new("a");
    let (alpha, mut alpha_events) = bind(cluster.config("alpha", 1));
    let (beta, mut beta_events) = bind(cluster.config("beta", 2));
    let (beta_peer, alpha_peer) = connect_pair(&alpha, &mut alpha_events, &beta, &mut beta_events).await;

    let payload: Vec<u8> =
        (0..8 * 1024 * 1024u32).flat_map(|index| (index / 1000).to_le_bytes()).take(8 << 20).collect();
    let wire_before = alpha.counters().wire_bytes_sent;
    alpha.send(beta_peer, Bytes::from(payload.clone())).unwrap();
    let received = expect_frame(&mut beta_events, alpha_peer).await;
    assert_eq!(received.len(), payload.len());
    assert!(received == payload);
    let counters = alpha.counters();
    assert_eq!(counters.payload_bytes_sent, payload.len() as u64);
    assert!(counters.wire_bytes_sent - wire_before < payload.len() as u64 / 4, "compressed on the wire");
    alpha.shutdown().await;
    beta.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_at_the_limit_goes_through_and_one_byte_more_is_refused() {
    let cluster = Cluster::new("a");
    let frame_bytes_max = 1024 * 1024;
    let mut alpha_config = cluster.config("alpha", 1);
    alpha_config.limits.frame_bytes_max = frame_bytes_max;
    let mut beta_config = cluster.config("beta", 2);
    beta_config.limits.frame_bytes_max = frame_bytes_max;
    let (alpha, mut alpha_events) = bind(alpha_config);
    let (beta, mut beta_events) = bind(beta_config);
    let (beta_peer, alpha_peer) = connect_pair(&alpha, &mut alpha_events, &beta, &mut beta_events).await;

    // Pseudo-random, so it goes uncompressed and the wire length is the limit itself.
    let payload = crate::tests::support::noise(0x2545_f491_4f6c_dd1d, frame_bytes_max);
    alpha.send(beta_peer, Bytes::from(payload.clone())).unwrap();
    assert!(expect_frame(&mut beta_events, alpha_peer).await == payload);

    let over = alpha.send(beta_peer, Bytes::from(vec![0u8; frame_bytes_max + 1])).unwrap_err();
    assert_eq!(over, SendError::TooLarge { bytes: frame_bytes_max + 1, bytes_max: frame_bytes_max });
    assert_eq!(alpha.counters().frames_sent, 1);
    alpha.shutdown().await;
    beta.shutdown().await;
}
