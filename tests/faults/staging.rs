//! A replica is killed with SIGKILL in the middle of staging a version.
//!
//! Its stage acknowledgements are held back 2 s (`ENGRAM_FAULT_STAGE_DELAY_MS`, well inside the coordinator's stage
//! timeout), and the kill lands once its log says it is holding one: the bytes have arrived and been verified, the
//! ack has not been sent. The coordinator must pass over it (marking it stale), make the version live on the other
//! replica, and the restarted replica must rebuild the head from the blob store.

use std::time::{Duration, Instant};

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_mid_staging_is_passed_over_and_catches_up() {
    if !engram_lineage::local_etcd::etcd_available_for_tests() {
        return;
    }
    const N: usize = 8;
    let etcd = engram_lineage::local_etcd::LocalEtcd::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _logs =
        KeepLogsOnFailure(dir.path().to_path_buf(), "a_replica_killed_mid_staging_is_passed_over_and_catches_up");
    let store = etcd.url("/engram-midstage");
    let held = vec![("ENGRAM_FAULT_STAGE_DELAY_MS", "2000")];
    let (mut procs, coordinators, replicas) = cluster(&store, dir.path(), 1, &[], 1, &[vec![], held]);
    let client = Client::connect(&coordinators).await.unwrap();
    namespace(&client, "midstage").await;
    wait_ready(&client, 2).await;
    let load = {
        let (c, r) = (coordinators.clone(), replicas.clone());
        tokio::spawn(async move { workload(&c, &r, "midstage", N, 2).await })
    };
    wait_for_live(&client, "midstage", 2).await;

    // `cluster` started the coordinator, then the replicas in order: replica-1 is the third process.
    let replica_log = dir.path().join("replica-1.log");
    let holding = |log: &str| log.matches("holding the stage acknowledgement").count();
    let before = holding(&std::fs::read_to_string(&replica_log).unwrap());
    let start = Instant::now();
    while holding(&std::fs::read_to_string(&replica_log).unwrap()) == before {
        assert!(start.elapsed() < Duration::from_secs(60), "replica-1 never started staging another version");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let head = client.versions("midstage", 1).await.unwrap().head;
    drop(std::mem::replace(&mut procs[2], Proc::none())); // SIGKILL, mid-staging
    let killed = Instant::now();
    eprintln!("killed replica-1 mid-staging at {} live versions", live_jobs(&client, "midstage").await);

    let took = head_moves(&client, "midstage", &head, killed).await;
    // The broken stream, not a lease, tells the coordinator: held to the 2 s lease of the other scenarios + 5 s.
    recovered_within("the version being staged goes live without the killed replica", took, Duration::from_secs(2));

    // Back on the same address, without the held acks: it pulls what it lacks.
    procs[2] = replica_again(dir.path(), &store, &coordinators, &replicas[1], "replica-1");

    let out = load.await.unwrap();
    check(&client, &replicas, "midstage", &out, N).await;
    let log = std::fs::read_to_string(dir.path().join("coordinator-0.log")).unwrap();
    assert!(log.contains("marked stale"), "the coordinator never marked the killed replica stale");
    drop(procs);
}
