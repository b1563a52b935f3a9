//! A partition cuts the leader coordinator off from etcd while everything else can still reach it.
//!
//! The leader runs in its own network namespace with two links to this machine: one its clients, workers and
//! replicas use, and one that is its only way to etcd. Taking the etcd link down drops its packets silently: the leader
//! can no longer keep its election lease alive or write, yet it still answers RPCs. It must step down within its lease,
//! the follower must take over, and nothing acknowledged may be lost or applied twice.

use std::time::{Duration, Instant};

use super::*;
use crate::netns::Netns;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_cut_off_from_etcd_steps_down_and_the_follower_takes_over() {
    if !engram_lineage::local_etcd::etcd_available_for_tests() {
        return;
    }
    let mut ns = match Netns::create("part") {
        Ok(ns) => ns,
        Err(e) => {
            // Needs root and iproute2 (CI runs as root and installs them); say so rather than pass silently.
            eprintln!("skipping: cannot make a network namespace here: {e}");
            return;
        }
    };
    let net = std::process::id() % 250;
    let (host_ip, leader_ip) = (format!("10.213.{net}.1"), format!("10.213.{net}.2"));
    let (etcd_host_ip, etcd_ns_ip) = (format!("10.214.{net}.1"), format!("10.214.{net}.2"));
    ns.link("egc", &host_ip, &leader_ip).unwrap();
    ns.link("ege", &etcd_host_ip, &etcd_ns_ip).unwrap();

    const N: usize = 10;
    let etcd = engram_lineage::local_etcd::LocalEtcd::start_also_on(&[&etcd_host_ip]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _logs = KeepLogsOnFailure(
        dir.path().to_path_buf(),
        "a_leader_cut_off_from_etcd_steps_down_and_the_follower_takes_over",
    );
    let prefix = "/engram-partition";
    let blobs = format!("file://{}", dir.path().join("blobs").display());
    let log = |n: &str| dir.path().join(format!("{n}.log"));

    // coordinator-0, in the namespace: it reaches etcd only over the `ege` link.
    let leader_listen = format!("{leader_ip}:{}", free_port());
    let leader_url = format!("http://{leader_listen}");
    let leader_store = format!("etcd://{etcd_host_ip}:{}{prefix}", etcd.client_port());
    let leader_args = [
        "serve",
        "coordinator",
        "--listen",
        &leader_listen,
        "--advertise",
        &leader_url,
        "--elect",
        "--election-ttl-s",
        "2",
        "--store",
        &leader_store,
        "--blobs",
        &blobs,
    ];
    let mut leader = engram_via(&ns.wrapper(), &leader_args, &log("coordinator-0"), &[]);
    let client = Client::connect(&leader_url).await.unwrap();
    namespace(&client, "part").await;
    client.create_namespace("probe", &"0".repeat(64)).await.unwrap();

    // Only now the follower, on this side, so that coordinator-0 is the one leading.
    let store = etcd.url(prefix);
    let common = ["--store", store.as_str(), "--blobs", blobs.as_str()];
    let follower_listen = format!("{host_ip}:{}", free_port());
    let coordinators = format!("{leader_url},http://{follower_listen}");
    let mut procs = vec![engram(
        &[&["serve", "coordinator", "--listen", &follower_listen, "--elect", "--election-ttl-s", "2"][..], &common]
            .concat(),
        &log("coordinator-1"),
    )];
    let mut replicas = Vec::new();
    for i in 0..2 {
        // Replicas listen on the link's address: the leader, in the namespace, stages onto them through it.
        let listen = format!("{host_ip}:{}", free_port());
        let id = format!("replica-{i}");
        let args =
            [&["serve", "replica", "--listen", &listen, "--coordinator", &coordinators, "--id", &id][..], &common]
                .concat();
        procs.push(engram(&args, &log(&id)));
        replicas.push(format!("http://{listen}"));
    }
    procs.push(engram(
        &[&["serve", "worker", "--coordinator", &coordinators, "--id", "worker-0"][..], &common].concat(),
        &log("worker-0"),
    ));
    let client = Client::connect(&coordinators).await.unwrap();
    wait_ready(&client, 2).await;
    assert_eq!(leader_of(&coordinators, "part").await, 0, "the coordinator in the namespace should lead");

    let load = {
        let (c, r) = (coordinators.clone(), replicas.clone());
        tokio::spawn(async move { workload(&c, &r, "part", N, CLIENTS).await })
    };
    wait_for_live(&client, "part", 3).await;

    let at = live_jobs(&client, "part").await;
    ns.set_link("ege", false);
    let cut = Instant::now();
    eprintln!("cut coordinator-0 off from etcd at {at} live versions");
    // Recovery: from the cut to the first request acknowledged (durably, so by the new leader).
    let recovered = first_acknowledged(&coordinators, cut).await;
    recovered_within("a request acknowledged after the leader is cut off from etcd", recovered, LEASE);
    assert_eq!(leader_of(&coordinators, "part").await, 1, "the follower did not take over");

    // The cut-off leader noticed it could not keep its lease and left, without being told.
    let start = Instant::now();
    while leader.0.as_mut().unwrap().try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(10), "the cut-off leader kept running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let said = std::fs::read_to_string(log("coordinator-0")).unwrap();
    assert!(said.contains("stepping down"), "the cut-off leader did not say why it left");

    // Heal, and bring it back: it joins as a follower.
    ns.set_link("ege", true);
    leader = engram_via(&ns.wrapper(), &leader_args, &log("coordinator-0-rejoined"), &[]);
    let out = load.await.unwrap();
    check(&client, &replicas, "part", &out, N).await;
    assert_eq!(leader_of(&coordinators, "part").await, 1, "leadership moved back without a reason");
    drop((leader, procs));
}
