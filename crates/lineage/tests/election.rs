//! Coordinator election on a real etcd: one leader at a time, the follower wins when the leader's lease ends, and
//! a deposed leader's writes are refused (fenced) even though etcd is reachable.

use engram_lineage::election::Candidate;
use engram_lineage::local_etcd::LocalEtcd;
use engram_lineage::Error;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_cannot_write() {
    if !engram_lineage::local_etcd::etcd_available_for_tests() {
        return;
    }
    let etcd = LocalEtcd::start().unwrap();
    let endpoints = vec![format!("http://{}", etcd.endpoint())];
    let old = engram_lineage::open(&etcd.url("/fence")).await.unwrap();
    let new = engram_lineage::open(&etcd.url("/fence")).await.unwrap();
    let a = Candidate::connect(&endpoints, "/fence", "http://a", 2).await.unwrap();
    let b = Candidate::connect(&endpoints, "/fence", "http://b", 2).await.unwrap();
    assert_eq!(a.leader().await.unwrap(), None);
    let first = a.campaign().await.unwrap();
    assert_eq!(a.leader().await.unwrap().as_deref(), Some("http://a"));
    old.set_fence(Some(first.fence.clone()));
    old.create_namespace("ns", "base", "a").await.unwrap();

    // b campaigns meanwhile; it wins only once a's lease is gone (revoked here, as its expiry would).
    let waiting = tokio::spawn(async move { (b.campaign().await.unwrap(), b) });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "b was elected while a still led");
    let mut raw = etcd_client::Client::connect(&endpoints, None).await.unwrap();
    raw.lease_revoke(first.lease).await.unwrap();
    let (second, b) = waiting.await.unwrap();
    assert_eq!(b.leader().await.unwrap().as_deref(), Some("http://b"));
    assert_ne!(second.fence, first.fence);

    // a still reaches etcd, but its writes are fenced; b's go through.
    let e = old.create_namespace("late", "base", "a").await.unwrap_err();
    assert!(matches!(e, Error::Fenced(_)), "{e}");
    assert!(matches!(old.namespace("late").await, Err(Error::NotFound(_))), "a fenced write left a trace");
    new.set_fence(Some(second.fence));
    new.create_namespace("late", "base", "b").await.unwrap();
}
