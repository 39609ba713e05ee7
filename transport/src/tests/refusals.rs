//! Peers that must be refused: by TLS (no certificate, another CA, expired) and by the hello
//! (another cluster, another protocol version, ourselves, too many peers). In every case no frame
//! and no `Connected` reaches the node, and the listener goes on serving good peers.

use std::time::Duration;

use crate::counters::RefusalReason;
use crate::endpoint::Endpoint;
use crate::tests::support::{
    Cluster, Events, RawPeer, assert_serves_a_good_peer, bind, config, eventually, expect_connected, hello,
};
use crate::tls::client_config_without_certificate;

/// Waits until `endpoint` has refused at least one peer for `reason`.
async fn until_refused(endpoint: &Endpoint, reason: RefusalReason) {
    eventually(&format!("a refusal for {}", reason.name()), || endpoint.counters().refused(reason) > 0).await;
}

fn assert_no_events(events: &mut Events) {
    if let Ok(event) = events.try_recv() {
        panic!("a refused peer produced an event: {event:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_is_refused() {
    let cluster = Cluster::new("a");
    let (listener, mut events) = bind(cluster.config("listener", 1));
    let trusting_stranger = client_config_without_certificate(&cluster.node("stranger"));
    match RawPeer::connect(listener.local_address(), trusting_stranger).await {
        Err(_) => {}
        Ok(mut raw) => assert!(raw.handshake(&hello("a", "stranger", 9)).await.is_err()),
    }
    until_refused(&listener, RefusalReason::NoCertificate).await;
    assert_no_events(&mut events);
    assert_serves_a_good_peer(&cluster, &listener, &mut events).await;
    listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused() {
    let cluster = Cluster::new("a");
    // Same cluster id, different CA: only the CA decides membership.
    let impostors = Cluster::new("a");
    let (listener, mut events) = bind(cluster.config("listener", 1));
    let (impostor, mut impostor_events) = bind(impostors.config("impostor", 2));
    impostor.connect(listener.local_address()).unwrap();
    until_refused(&listener, RefusalReason::UntrustedCertificate).await;
    until_refused(&impostor, RefusalReason::UntrustedCertificate).await;
    impostor.shutdown().await;
    assert_no_events(&mut events);
    assert_no_events(&mut impostor_events);
    assert_serves_a_good_peer(&cluster, &listener, &mut events).await;
    listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused_on_either_side() {
    let cluster = Cluster::new("a");
    let (listener, mut events) = bind(cluster.config("listener", 1));
    let (expired, mut expired_events) = bind(config("a", "expired", 2, cluster.expired_node("expired")));

    // An expired dialer is refused by the listener.
    expired.connect(listener.local_address()).unwrap();
    until_refused(&listener, RefusalReason::ExpiredCertificate).await;
    expired.shutdown().await;
    assert_no_events(&mut events);

    // A dialer refuses a listener whose certificate expired.
    let (expired_listener, mut expired_listener_events) =
        bind(config("a", "expired-listener", 3, cluster.expired_node("expired-listener")));
    let (dialer, mut dialer_events) = bind(cluster.config("dialer", 4));
    dialer.connect(expired_listener.local_address()).unwrap();
    until_refused(&dialer, RefusalReason::ExpiredCertificate).await;
    dialer.shutdown().await;
    expired_listener.shutdown().await;
    assert_no_events(&mut dialer_events);
    assert_no_events(&mut expired_listener_events);
    assert_no_events(&mut expired_events);

    assert_serves_a_good_peer(&cluster, &listener, &mut events).await;
    listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_of_another_cluster_is_refused_by_the_hello() {
    let cluster = Cluster::new("a");
    let (listener, mut events) = bind(cluster.config("listener", 1));
    // A certificate from our CA, but configured for cluster "b": TLS passes, the hello does not.
    let (stranger, mut stranger_events) = bind(config("b", "stranger", 2, cluster.node("stranger")));
    stranger.connect(listener.local_address()).unwrap();
    until_refused(&listener, RefusalReason::ClusterMismatch).await;
    until_refused(&stranger, RefusalReason::ClusterMismatch).await;
    stranger.shutdown().await;
    assert_no_events(&mut events);
    assert_no_events(&mut stranger_events);
    assert_serves_a_good_peer(&cluster, &listener, &mut events).await;
    listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_of_another_protocol_version_is_refused_by_the_hello() {
    let cluster = Cluster::new("a");
    let (listener, mut events) = bind(cluster.config("listener", 1));
    let mut future_config = cluster.config("future", 2);
    future_config.protocol_version = crate::PROTOCOL_VERSION + 1;
    let (future, mut future_events) = bind(future_config);
    future.connect(listener.local_address()).unwrap();
    until_refused(&listener, RefusalReason::ProtocolMismatch).await;
    until_refused(&future, RefusalReason::ProtocolMismatch).await;
    future.shutdown().await;
    assert_no_events(&mut events);
    assert_no_events(&mut future_events);
    assert_serves_a_good_peer(&cluster, &listener, &mut events).await;
    listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_peer_refused_by_the_hello_hears_why() {
    let cluster = Cluster::new("a");
    let (listener, mut events) = bind(cluster.config("listener", 1));
    let mut raw =
        RawPeer::connect(listener.local_address(), cluster.node("raw").client_config().unwrap()).await.unwrap();
    assert!(raw.handshake(&hello("b", "raw", 2)).await.is_err());
    match raw.closed().await {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code.into_inner(), crate::CloseCode::ClusterMismatch as u64);
            assert_eq!(close.reason, "node 'listener' is in cluster 'a', and you are in cluster 'b'");
        }
        other => panic!("expected an application close, got {other:?}"),
    }
    raw.quinn.close(0u32.into(), b"");
    assert_no_events(&mut events);
    listener.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialing_ourselves_is_refused_and_not_retried() {
    let cluster = Cluster::new("a");
    let (node, mut events) = bind(cluster.config("node", 1));
    node.connect(node.local_address()).unwrap();
    until_refused(&node, RefusalReason::SelfConnection).await;
    // A short pause in which a retry would show up; the loop has stopped, so none does.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(node.counters().reconnects, 0);
    assert_no_events(&mut events);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_over_the_limit_are_refused() {
    let cluster = Cluster::new("a");
    let mut listener_config = cluster.config("listener", 1);
    listener_config.limits.peers_max = 1;
    let (listener, mut events) = bind(listener_config);
    let (first, mut first_events) = bind(cluster.config("first", 2));
    first.connect(listener.local_address()).unwrap();
    expect_connected(&mut first_events).await;
    let (first_peer, _) = expect_connected(&mut events).await;

    let (second, mut second_events) = bind(cluster.config("second", 3));
    second.connect(listener.local_address()).unwrap();
    until_refused(&listener, RefusalReason::PeersFull).await;
    until_refused(&second, RefusalReason::PeersFull).await;
    second.shutdown().await;
    assert_no_events(&mut events);
    assert_no_events(&mut second_events);
    assert_eq!(listener.peers().len(), 1);
    assert_eq!(listener.peers()[0].peer_id, first_peer);
    first.shutdown().await;
    listener.shutdown().await;
}
