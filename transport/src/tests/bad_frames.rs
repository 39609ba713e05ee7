//! A peer that passes the handshake and then sends bytes that are not frames is disconnected,
//! alone: other peers keep exchanging frames and the process never panics.

use bytes::Bytes;

use crate::events::{CloseCode, DisconnectReason, PeerEvent};
use crate::frame::{FLAG_COMPRESSED, FRAME_BYTES_MAX_DEFAULT};
use crate::tests::support::{
    Cluster, RawPeer, bind, connect_pair, eventually, expect_connected, expect_frame, hello, next_event,
};

fn header(length: usize, flags: u8) -> Vec<u8> {
    let mut header = (length as u32).to_be_bytes().to_vec();
    header.push(flags);
    header
}

fn with_payload(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = header(payload.len(), flags);
    frame.extend_from_slice(payload);
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_are_not_frames_disconnect_only_that_peer() {
    let cluster = Cluster::new("a");
    let (listener, mut events) = bind(cluster.config("listener", 1));
    let (good, mut good_events) = bind(cluster.config("good", 2));
    let (listener_peer, good_peer) = connect_pair(&good, &mut good_events, &listener, &mut events).await;

    let bomb = zstd::bulk::compress(&vec![0u8; FRAME_BYTES_MAX_DEFAULT + 1], 3).unwrap();
    let cases: [(&str, Vec<u8>); 5] = [
        ("garbage with reserved flags", b"\x00\x00\x00\x05\xfehello".to_vec()),
        ("a length over the limit", header(FRAME_BYTES_MAX_DEFAULT + 1, 0)),
        ("the largest length there is", header(u32::MAX as usize, 0)),
        ("corrupt zstd", with_payload(FLAG_COMPRESSED, b"definitely not zstd")),
        ("a decompression bomb", with_payload(FLAG_COMPRESSED, &bomb)),
    ];
    for (number, (case, bytes)) in cases.into_iter().enumerate() {
        let mut raw =
            RawPeer::connect(listener.local_address(), cluster.node("raw").client_config().unwrap()).await.unwrap();
        raw.handshake(&hello("a", "raw", 3)).await.unwrap();
        let (raw_peer, _) = expect_connected(&mut events).await;

        // A valid frame first: it is delivered, then the bad bytes end the connection.
        raw.send.write_all(&with_payload(0, b"valid")).await.unwrap();
        raw.send.write_all(&bytes).await.unwrap();
        assert_eq!(expect_frame(&mut events, raw_peer).await, "valid", "{case}");
        match next_event(&mut events).await {
            PeerEvent::Disconnected { peer_id, reason: DisconnectReason::BadFrame(_) } => assert_eq!(peer_id, raw_peer),
            other => panic!("{case}: expected a bad-frame disconnect, got {other:?}"),
        }
        match raw.closed().await {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code.into_inner(), CloseCode::BadFrame as u64, "{case}")
            }
            other => panic!("{case}: expected an application close, got {other:?}"),
        }
        raw.quinn.close(0u32.into(), b"");
        assert_eq!(listener.counters().bad_frames, number as u64 + 1, "{case}");

        // The good peer is still connected and frames still flow both ways.
        good.send(listener_peer, Bytes::from(format!("still here after {case}"))).unwrap();
        assert_eq!(expect_frame(&mut events, good_peer).await, format!("still here after {case}"));
        listener.send(good_peer, Bytes::from_static(b"and so am I")).unwrap();
        assert_eq!(expect_frame(&mut good_events, listener_peer).await, "and so am I");
    }
    assert_eq!(listener.peers().len(), 1);
    good.shutdown().await;
    listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_hello_frame_is_a_refusal_not_a_connection() {
    let cluster = Cluster::new("a");
    let (listener, mut events) = bind(cluster.config("listener", 1));
    let mut raw =
        RawPeer::connect(listener.local_address(), cluster.node("raw").client_config().unwrap()).await.unwrap();
    // A hello frame longer than the 1 KiB hello limit.
    raw.send.write_all(&header(4096, 0)).await.unwrap();
    match raw.closed().await {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code.into_inner(), CloseCode::BadHandshake as u64)
        }
        other => panic!("expected an application close, got {other:?}"),
    }
    raw.quinn.close(0u32.into(), b"");
    eventually("the refusal to be counted", || listener.counters().refused(crate::RefusalReason::BadHandshake) == 1)
        .await;
    assert!(events.try_recv().is_err());
    listener.shutdown().await;
}
