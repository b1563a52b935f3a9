//! Shared by the service tests and the fault suite (tests/faults): child processes, free ports, the consolidation workload and its checks.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engram_sdk::{pb, Client, JobState, Replicas};
use engram_world::{Rng, World};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc(pub Option<Child>);

impl Proc {
    /// No process (a placeholder while one is down).
    pub fn none() -> Self {
        Proc(None)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn engram(args: &[&str], log: &Path) -> Proc {
    engram_with_env(args, log, &[])
}

/// [`engram`] with extra environment variables (fault injection).
pub fn engram_with_env(args: &[&str], log: &Path, env: &[(&str, &str)]) -> Proc {
    engram_via(&[], args, log, env)
}

/// [`engram_with_env`] started through `wrapper` (e.g. `ip netns exec NAME`), which must exec it in place so that
/// killing the child kills engram.
pub fn engram_via(wrapper: &[&str], args: &[&str], log: &Path, env: &[(&str, &str)]) -> Proc {
    let log = std::fs::File::create(log).unwrap();
    let bin = env!("CARGO_BIN_EXE_engram");
    let mut command = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let child = command
        .args(args)
        .current_dir(root())
        .env("ENGRAM_CACHE", Path::new(env!("CARGO_TARGET_TMPDIR")).join("engram-cache"))
        .env("ENGRAM_LOG", "info")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn engram");
    Proc(Some(child))
}

/// Copies a failed test's process logs (`*.log` in `dir`) to `target/tmp/fault-logs/{name}` before its temporary
/// directory goes: declare it after the directory so it drops first.
pub struct KeepLogsOnFailure(pub PathBuf, pub &'static str);

impl Drop for KeepLogsOnFailure {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let to = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fault-logs").join(self.1);
        let _ = std::fs::create_dir_all(&to);
        for e in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                let _ = std::fs::copy(e.path(), to.join(e.file_name()));
            }
        }
        eprintln!("process logs kept in {}", to.display());
    }
}

/// A free port for a server the test starts (below the ephemeral range: see `free_loopback_port`).
pub fn free_port() -> u16 {
    free_ports(1)
}

/// The first of `n` consecutive free ports.
pub fn free_ports(n: u16) -> u16 {
    engram_lineage::local_etcd::free_loopback_ports(n).expect("free loopback ports")
}

/// Waits until every replica reports itself ready and the coordinator lists them all.
pub async fn wait_ready(client: &Client, replicas: usize) {
    let start = Instant::now();
    loop {
        if let Ok(rs) = client.replicas("").await {
            if rs.len() == replicas && rs.iter().all(|r| r.ready) {
                return;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(180), "replicas not ready within 180 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub struct Outcome {
    pub jobs: Vec<pb::Job>,
    pub answers: Vec<String>,
}

/// 50 documents from 8 concurrent clients (some requests sent twice with the same key), while one more client
/// generates in a loop.
pub async fn workload(
    coordinator: &str,
    replica_addrs: &[String],
    ns: &str,
    docs_n: usize,
    clients_n: usize,
) -> Outcome {
    let world = World::new();
    let mut rng = Rng::derive(42, 6);
    let people = world.new_people(&mut rng, docs_n);
    let docs: Vec<String> = people.iter().map(|p| world.document(&mut rng, std::slice::from_ref(p), false)).collect();
    let question =
        format!("Q : {} A :", engram_world::text::question(engram_world::Attribute::Employer, 0, &people[0].name()));

    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answers = Arc::new(Mutex::new(Vec::new()));
    let generator = {
        let (done, answers, addrs, ns) = (done.clone(), answers.clone(), replica_addrs.to_vec(), ns.to_string());
        tokio::spawn(async move {
            let replicas = Replicas::connect(&addrs).await.unwrap();
            let start = Instant::now();
            // Bounded: at most 20000 requests or 600 s, paced so the run's whole span is covered.
            for _ in 0..20_000 {
                let r = replicas.generate(&ns, &question, 4).await.expect("generate failed while versions changed");
                answers.lock().unwrap().push(r.version);
                tokio::time::sleep(Duration::from_millis(5)).await;
                if done.load(std::sync::atomic::Ordering::SeqCst) || start.elapsed() > Duration::from_secs(600) {
                    break;
                }
            }
        })
    };

    let docs = Arc::new(docs);
    let mut clients = Vec::new();
    for c in 0..clients_n {
        let (docs, addr, ns) = (docs.clone(), coordinator.to_string(), ns.to_string());
        clients.push(tokio::spawn(async move {
            let client = Client::connect(&addr).await.unwrap();
            let mut jobs = Vec::new();
            for i in (c..docs_n).step_by(clients_n) {
                let key = format!("e2e-doc-{i}");
                let job = client.consolidate(&ns, vec![docs[i].clone()], &key).await.unwrap();
                if i % 5 == 0 {
                    // A retry with the same key: the same job, not a second one.
                    let again = client.consolidate(&ns, vec![docs[i].clone()], &key).await.unwrap();
                    assert_eq!(again.id, job.id, "a repeated idempotency key made a second job");
                }
                jobs.push(job);
            }
            let mut out = Vec::new();
            for j in jobs {
                out.push(client.wait(&j.id).await.unwrap());
            }
            out
        }));
    }
    let mut jobs = Vec::new();
    for c in clients {
        jobs.extend(c.await.unwrap());
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    generator.await.unwrap();
    let answers = answers.lock().unwrap().clone();
    Outcome { jobs, answers }
}

/// Every job live exactly once, one version each, the head's chain made of exactly those versions, every replica on
/// the head, and every answer from the head of its moment or the one just before.
pub async fn check(client: &Client, replica_addrs: &[String], ns: &str, out: &Outcome, docs_n: usize) {
    assert_eq!(out.jobs.len(), docs_n);
    for j in &out.jobs {
        assert_eq!(j.state(), JobState::Live, "job {} ended {:?}: {}", j.id, j.state(), j.error);
    }
    let ids: HashSet<&str> = out.jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids.len(), docs_n, "jobs were duplicated or merged");
    let log = client.versions(ns, 0).await.unwrap();
    let by_id: HashMap<&str, &pb::Version> = log.versions.iter().map(|v| (v.id.as_str(), v)).collect();
    // The live line, oldest first. A compaction follows the chain it replaced (it went live after its last one).
    let mut chain = Vec::new();
    let mut cur = log.head.clone();
    while !cur.is_empty() {
        let v = by_id[cur.as_str()];
        chain.push(v.id.clone());
        cur = v.compacts.last().unwrap_or(&v.parent).clone();
    }
    chain.reverse();
    let compactions = chain.iter().filter(|v| !by_id[v.as_str()].compacts.is_empty()).count();
    assert_eq!(
        chain.len() - compactions,
        docs_n,
        "the head's chain has {} versions ({compactions} compactions) for {docs_n} jobs",
        chain.len()
    );
    for (i, v) in chain.iter().enumerate() {
        let compacts = &by_id[v.as_str()].compacts;
        // A compaction replaces exactly the versions just before it on the line, down to the previous compaction.
        if !compacts.is_empty() {
            let from = i - compacts.len();
            assert_eq!(&chain[from..i], compacts.as_slice(), "compaction {v} names another chain");
            assert!(chain[..from].last().is_none_or(|p| !by_id[p.as_str()].compacts.is_empty()));
        }
    }
    let chain_jobs: HashSet<&str> =
        chain.iter().map(|v| by_id[v.as_str()].job.as_str()).filter(|j| !j.is_empty()).collect();
    assert_eq!(chain_jobs, ids, "the chain's versions do not come from exactly the submitted jobs");
    for j in &out.jobs {
        assert!(chain.contains(&j.version), "job {}'s version {} is not on the live line", j.id, j.version);
    }

    // Replicas converge on the head.
    let start = Instant::now();
    loop {
        let mut serving = Vec::new();
        for a in replica_addrs {
            let mut c = pb::replica_client::ReplicaClient::connect(a.clone()).await.unwrap();
            serving.push(
                c.status(pb::StatusRequest {}).await.unwrap().into_inner().serving.get(ns).cloned().unwrap_or_default(),
            );
        }
        if serving.iter().all(|s| *s == log.head) {
            eprintln!(
                "replicas serve the head {:.2} s after the load's jobs were checked",
                start.elapsed().as_secs_f64()
            );
            break;
        }
        // The default member lease (5 s) + 5 s: the loosest bound of any scenario.
        assert!(start.elapsed() < Duration::from_secs(10), "replicas serve {serving:?}, the head is {}", log.head);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Answers: each from a version on the live line, never behind the newest one seen by more than one step.
    // A compaction serves what the last version it replaced served: the same step on the line.
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut step = 0;
    for v in &chain {
        if by_id[v.as_str()].compacts.is_empty() {
            step += 1;
        }
        index.insert(v.as_str(), step);
    }
    let mut newest = 0;
    assert!(out.answers.len() >= 10, "only {} answers during the run", out.answers.len());
    for (n, v) in out.answers.iter().enumerate() {
        let i = if v.is_empty() {
            0
        } else {
            *index.get(v.as_str()).unwrap_or_else(|| panic!("answer {n} came from {v}, never live"))
        };
        assert!(i + 1 >= newest, "answer {n} came from version #{i} after #{newest} had answered");
        newest = newest.max(i);
    }
    eprintln!(
        "{} jobs live, {compactions} compactions, {} answers from {} distinct versions",
        out.jobs.len(),
        out.answers.len(),
        out.answers.iter().collect::<HashSet<_>>().len()
    );
}
