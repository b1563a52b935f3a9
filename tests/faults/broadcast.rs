//! A middle replica of a chain of five is killed with SIGKILL while a delta is being relayed down the chain.
//!
//! The coordinator stages through the pipelined chain (`--broadcast chain`) in 64 KiB chunks and every replica waits
//! 40 ms before relaying each chunk (`ENGRAM_FAULT_RELAY_DELAY_MS`), so the ~1 MB delta is still flowing when
//! replica-2 dies. Its upstream relay re-attaches replica-3 (which still relays to replica-4) and resumes its stream
//! at the byte where it broke off; the four survivors stage verified copies, the head moves, and replica-2,
//! restarted, catches up by pull and serves the same head.

use std::time::{Duration, Instant};

use super::*;

/// A document about one fresh person.
fn document(seed: u64) -> String {
    let world = engram_world::World::new();
    let mut rng = engram_world::Rng::derive(seed, 3);
    let person = world.new_people(&mut rng, 1).remove(0);
    world.document(&mut rng, std::slice::from_ref(&person), false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_middle_replica_of_a_chain_killed_mid_broadcast_is_routed_around() {
    if !engram_lineage::local_etcd::etcd_available_for_tests() {
        return;
    }
    let etcd = engram_lineage::local_etcd::LocalEtcd::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _logs = KeepLogsOnFailure(dir.path().to_path_buf(), "a_middle_replica_of_a_chain_killed_mid_broadcast");
    let store = etcd.url("/engram-chain");
    let slow = vec![("ENGRAM_FAULT_RELAY_DELAY_MS", "40")];
    let extra = ["--broadcast", "chain", "--stage-chunk-kb", "64", "--stage-timeout-ms", "30000"];
    let (mut procs, coordinators, replicas) =
        cluster_with(&store, dir.path(), 1, &extra, 1, &LARGE_DELTAS, &vec![slow; 5]);
    let client = Client::connect(&coordinators).await.unwrap();
    namespace(&client, "chain").await;
    wait_ready(&client, 5).await;

    let job = client.consolidate("chain", vec![document(91)], "chain-kill").await.unwrap();

    // Replica-2 (the third replica; `cluster` started the coordinator first) dies once it is receiving and relaying.
    let log = dir.path().join("replica-2.log");
    let start = Instant::now();
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("receiving a staged delta") {
        assert!(start.elapsed() < Duration::from_secs(120), "replica-2 never started receiving");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    drop(std::mem::replace(&mut procs[3], Proc::none())); // SIGKILL
    eprintln!("killed replica-2 mid-broadcast");

    let done = client.wait(&job.id).await.unwrap();
    assert_eq!(done.state(), engram_sdk::JobState::Live, "{}", done.error);
    let head = client.versions("chain", 1).await.unwrap().head;
    assert_eq!(head, done.version);
    for i in [0, 1, 3, 4] {
        assert_eq!(
            serving(&replicas[i], "chain").await.as_deref(),
            Some(head.as_str()),
            "replica-{i} is not on the head"
        );
    }
    let coordinator_log = std::fs::read_to_string(dir.path().join("coordinator-0.log")).unwrap();
    assert!(coordinator_log.contains("marked stale"), "the killed replica was not marked stale");
    let relayed = (0..5).filter(|i| *i != 2).any(|i| {
        std::fs::read_to_string(dir.path().join(format!("replica-{i}.log")))
            .unwrap_or_default()
            .contains("re-attaching")
    });
    assert!(relayed, "no relay re-attached the dead replica's subtree");
    // Replica-3 resumed its broken stream where it stopped rather than receiving everything again.
    let r3 = std::fs::read_to_string(dir.path().join("replica-3.log")).unwrap();
    assert!(r3.contains("resuming a staged delta at byte"), "replica-3 was sent the whole delta again");
    let r4 = std::fs::read_to_string(dir.path().join("replica-4.log")).unwrap();
    assert_eq!(r4.matches("receiving a staged delta").count(), 1, "replica-4's stream (from replica-3) broke");

    // Restarted without the delay: it pulls the chain and serves the same head.
    procs[3] = replica_again(dir.path(), &store, &coordinators, &replicas[2], "replica-2");
    let start = Instant::now();
    while serving(&replicas[2], "chain").await.as_deref() != Some(head.as_str()) {
        assert!(start.elapsed() < Duration::from_secs(60), "the restarted replica never reached the head");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("restarted replica-2 serves the head after {:.1} s", start.elapsed().as_secs_f64());
    drop(procs);
}

/// A relaying replica damages a chunk on its way down the chain (`ENGRAM_FAULT_CORRUPT_CHUNK=3` on replica-0): the next
/// replica finds it by its CRC-32 and refuses it (`DataLoss`) before relaying or staging anything of it, is sent the
/// stream again from that chunk, and every replica stages the true delta and serves the head.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chunk_corrupted_on_the_way_is_refused_and_sent_again() {
    if !engram_lineage::local_etcd::etcd_available_for_tests() {
        return;
    }
    let etcd = engram_lineage::local_etcd::LocalEtcd::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _logs = KeepLogsOnFailure(dir.path().to_path_buf(), "a_chunk_corrupted_on_the_way_is_refused_and_sent_again");
    let store = etcd.url("/engram-corrupt");
    let corrupting = vec![("ENGRAM_FAULT_CORRUPT_CHUNK", "3")];
    let extra = ["--broadcast", "chain", "--stage-chunk-kb", "64"];
    let (procs, coordinators, replicas) =
        cluster_with(&store, dir.path(), 1, &extra, 1, &LARGE_DELTAS, &[corrupting, vec![], vec![]]);
    let client = Client::connect(&coordinators).await.unwrap();
    namespace(&client, "corrupt").await;
    wait_ready(&client, 3).await;
    let job = client.consolidate("corrupt", vec![document(17)], "corrupt-1").await.unwrap();
    let done = client.wait(&job.id).await.unwrap();
    assert_eq!(done.state(), engram_sdk::JobState::Live, "{}", done.error);
    let head = client.versions("corrupt", 1).await.unwrap().head;
    for (i, r) in replicas.iter().enumerate() {
        assert_eq!(serving(r, "corrupt").await.as_deref(), Some(head.as_str()), "replica-{i} is not on the head");
    }
    let log = |n: &str| std::fs::read_to_string(dir.path().join(format!("{n}.log"))).unwrap();
    assert!(log("replica-0").contains("it received a corrupt chunk"), "replica-0 never heard of the damage");
    let r1 = log("replica-1");
    assert!(
        r1.contains("resuming a staged delta at byte 196608"),
        "replica-1 was not sent the stream again from chunk 3"
    );
    // Replica-2 only ever saw intact chunks: replica-1 relays a chunk after checking it.
    assert_eq!(log("replica-2").matches("receiving a staged delta").count(), 1);
    assert!(!log("coordinator-0").contains("marked stale"), "a replica was passed over");
    drop(procs);
}

/// The acceptance scenario at full size: a 256 MB delta down a chain of five staging processes (`engram bench
/// broadcast-node`: they receive, check and relay exactly as replicas do, and keep nothing but the hash), the middle one
/// killed with SIGKILL while it relays. The other four stage copies checked against the delta's BLAKE3 (a process
/// acknowledges only after that check). The catch-up by pull of a restarted replica is the test above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_middle_process_of_five_killed_during_a_256_mb_broadcast() {
    use engram_transport::{Broadcaster, Pipelined, Staging, Target, RELAY};
    let dir = tempfile::tempdir().unwrap();
    let _logs =
        KeepLogsOnFailure(dir.path().to_path_buf(), "a_middle_process_of_five_killed_during_a_256_mb_broadcast");
    let port = free_ports(10);
    // 2 ms per relayed chunk: 1024 chunks of 256 KiB take each relay about two seconds, so the kill lands mid-stream.
    let slow = [("ENGRAM_FAULT_RELAY_DELAY_MS", "2")];
    let mut nodes: Vec<Proc> = (0..5u16)
        .map(|i| {
            let (grpc, raw) = (format!("127.0.0.1:{}", port + 2 * i), format!("127.0.0.1:{}", port + 2 * i + 1));
            let log = dir.path().join(format!("node-{i}.log"));
            engram_with_env(&["bench", "broadcast-node", "--listen", &grpc, "--raw", &raw], &log, &slow)
        })
        .collect();
    let targets: Vec<Target> = (0..5u16)
        .map(|i| Target {
            id: format!("node-{i}"),
            address: format!("http://127.0.0.1:{}", port + 2 * i),
            transports: vec![RELAY.to_string()],
        })
        .collect();
    for t in &targets {
        let addr = t.address.trim_start_matches("http://").to_string();
        let start = Instant::now();
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(start.elapsed() < Duration::from_secs(30), "{} never listened", t.id);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut bytes = vec![0u8; 256 << 20];
    blake3::Hasher::new().update(b"a 256 MB delta").finalize_xof().fill(&mut bytes);
    let item = Staging {
        namespace: "chain".into(),
        version: "v-256mb".into(),
        chain: vec![],
        hash: engram_lineage::blob::digest(&bytes),
        blake3: Some(engram_lineage::blob::transfer_hash(&bytes)),
        bytes: bytes.into(),
    };
    let size = item.bytes.len() as u64;
    let staging = {
        let (targets, item) = (targets.clone(), item.clone());
        tokio::spawn(async move {
            Pipelined::new(1, engram_transport::CHUNK_BYTES).stage(&targets, &item, Duration::from_secs(120)).await
        })
    };

    let log = dir.path().join("node-2.log");
    let start = Instant::now();
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("receiving a staged delta") {
        assert!(start.elapsed() < Duration::from_secs(60), "node-2 never started receiving");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(std::mem::replace(&mut nodes[2], Proc::none())); // SIGKILL
    let killed_at = start.elapsed();

    let acks = staging.await.unwrap();
    eprintln!("node-2 killed {killed_at:?} after it began receiving; staging took {:?} in all", start.elapsed());
    assert!(acks[2].is_err(), "the killed process acknowledged: {:?}", acks[2]);
    for i in [0, 1, 3, 4] {
        let ack = acks[i].as_ref().unwrap_or_else(|e| panic!("node-{i}: {e:#}"));
        assert!(ack.ready && ack.received == size, "node-{i}: {ack:?}");
    }
    // node-3 lost its upstream mid-stream and was resumed by node-1, not sent everything again.
    let resumed = std::fs::read_to_string(dir.path().join("node-3.log")).unwrap();
    assert!(resumed.contains("resuming a staged delta at byte"), "node-3 was not resumed:\n{resumed}");
}
