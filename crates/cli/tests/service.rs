//! The service end to end, as real processes on loopback: `engram up` on the embedded store, and a coordinator,
//! two workers and three replicas as separate `engram serve` processes on a real etcd. Eight SDK clients
//! consolidate 50 documents while another client generates in a loop; afterwards every job ran exactly once, every
//! replica serves the same head, and no answer came from a version that was not the head (or the one just before)
//! when it was served. Bad input is refused with `InvalidArgument` and changes nothing.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engram_sdk::{pb, Client, JobState, Replicas};
use engram_world::{Rng, World};

const DOCS: usize = 50;
const CLIENTS: usize = 8;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A child process killed (SIGKILL) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn engram(args: &[&str], log: &Path) -> Proc {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_engram"))
        .args(args)
        .current_dir(root())
        .env("ENGRAM_CACHE", Path::new(env!("CARGO_TARGET_TMPDIR")).join("engram-cache"))
        .env("ENGRAM_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn engram");
    Proc(child)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until every replica reports itself ready and the coordinator lists them all.
async fn wait_ready(client: &Client, replicas: usize) {
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

struct Outcome {
    jobs: Vec<pb::Job>,
    answers: Vec<String>,
}

/// 50 documents from 8 concurrent clients (some requests sent twice with the same key), while one more client
/// generates in a loop.
async fn workload(coordinator: &str, replica_addrs: &[String], ns: &str) -> Outcome {
    let world = World::new();
    let mut rng = Rng::derive(42, 6);
    let people = world.new_people(&mut rng, DOCS);
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
    for c in 0..CLIENTS {
        let (docs, addr, ns) = (docs.clone(), coordinator.to_string(), ns.to_string());
        clients.push(tokio::spawn(async move {
            let client = Client::connect(&addr).await.unwrap();
            let mut jobs = Vec::new();
            for i in (c..DOCS).step_by(CLIENTS) {
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
async fn check(client: &Client, replica_addrs: &[String], ns: &str, out: &Outcome) {
    assert_eq!(out.jobs.len(), DOCS);
    for j in &out.jobs {
        assert_eq!(j.state(), JobState::Live, "job {} ended {:?}: {}", j.id, j.state(), j.error);
    }
    let ids: HashSet<&str> = out.jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids.len(), DOCS, "jobs were duplicated or merged");
    let log = client.versions(ns, 0).await.unwrap();
    let by_id: HashMap<&str, &pb::Version> = log.versions.iter().map(|v| (v.id.as_str(), v)).collect();
    // The live line, oldest first.
    let mut chain = Vec::new();
    let mut cur = log.head.clone();
    while !cur.is_empty() {
        let v = by_id[cur.as_str()];
        chain.push(v.id.clone());
        cur = v.parent.clone();
    }
    chain.reverse();
    assert_eq!(chain.len(), DOCS, "the head's chain has {} versions for {DOCS} jobs", chain.len());
    let chain_jobs: HashSet<&str> = chain.iter().map(|v| by_id[v.as_str()].job.as_str()).collect();
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
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "replicas serve {serving:?}, the head is {}", log.head);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Answers: each from a version on the live line, never behind the newest one seen by more than one step.
    let index: HashMap<&str, usize> = chain.iter().enumerate().map(|(i, v)| (v.as_str(), i + 1)).collect();
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
        "{} jobs live, {} answers from {} distinct versions",
        out.jobs.len(),
        out.answers.len(),
        out.answers.iter().collect::<HashSet<_>>().len()
    );
}

fn invalid(r: Result<impl std::fmt::Debug, tonic::Status>, what: &str, needle: &str) {
    let s = r.expect_err(&format!("{what} was accepted"));
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{what}: {s:?}");
    assert!(s.message().contains(needle), "{what}: message {:?} does not name {needle:?}", s.message());
}

/// Bad input: refused with InvalidArgument naming the problem, and nothing changes.
async fn bad_input(client: &Client, replica_addr: &str, ns: &str) {
    let before = client.versions(ns, 0).await.unwrap();
    let doc = "<doc> Golhal Kineldley works for Bryquocorp . </doc>".to_string();
    invalid(client.consolidate(ns, vec![], "bad-1").await, "no documents", "no documents");
    invalid(client.consolidate(ns, vec!["  ".into()], "bad-2").await, "an empty document", "document 0 is empty");
    invalid(
        client.consolidate(ns, vec![doc.clone(), "x".repeat(70_000)], "bad-3").await,
        "an oversized document",
        "document 1 is 70000 bytes",
    );
    invalid(
        client.consolidate("no-such-ns", vec![doc.clone()], "bad-4").await,
        "an unknown namespace",
        "unknown namespace",
    );
    let raw = pb::ConsolidateRequest {
        namespace: ns.into(),
        documents: vec![vec![0x66, 0xff, 0xfe]],
        idempotency_key: "bad-5".into(),
        ..Default::default()
    };
    invalid(client.raw().consolidate(raw).await, "invalid UTF-8", "not valid UTF-8");
    // Roll back to a mid version, then try to "roll back" to a later one: not an ancestor.
    let chain: Vec<&pb::Version> =
        before.versions.iter().filter(|v| v.status == "live" || v.status == "superseded").collect();
    let (newer, older) = (chain[2].id.clone(), chain[5].id.clone());
    client.rollback(ns, &older, "test: go back").await.unwrap();
    invalid(client.rollback(ns, &newer, "test: forward").await, "a rollback to a descendant", "not an ancestor");
    // A delta for another base model, staged straight on a replica.
    let mut delta = engram_lora::Delta { meta: Default::default(), adapters: Default::default() };
    delta.meta.base_model = "0".repeat(64);
    delta.meta.scale = 1.0;
    delta.adapters.insert(
        (0, "mlp.down_proj".into()),
        engram_lora::Factors::new(1, 704, 256, vec![0.0; 704], vec![0.0; 256]).unwrap(),
    );
    let bytes = delta.encode().unwrap();
    let hash = engram_lineage::blob::digest(&bytes);
    let version = engram_lineage::VersionId::derive(None, &hash, &"0".repeat(64)).to_string();
    let item = engram_transport::Staging { namespace: ns.into(), version, chain: vec![], bytes: bytes.into(), hash };
    let mut rc = pb::replica_client::ReplicaClient::connect(replica_addr.to_string()).await.unwrap();
    let staged = rc.stage(tokio_stream::iter(engram_transport::chunks(&item, 1 << 16))).await;
    invalid(staged.map(|r| r.into_inner()), "a delta for another base model", "does not name this delta");
    // Nothing was recorded by any of it.
    let after = client.versions(ns, 0).await.unwrap();
    assert_eq!(after.versions.len(), before.versions.len());
    assert_eq!(after.head, older);
}

/// One HTTP/1.1 request over a plain socket; returns the status code and the body.
fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, out.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

/// The OpenAI-style endpoint answers from the head and names it; bad requests get 400.
fn completions(port: u16, ns: &str, head: &str) {
    let (code, body) = http(port, "GET", "/ready", "");
    assert_eq!(code, 200, "{body}");
    let req =
        format!(r#"{{"model": "{ns}", "prompt": "Q : where does Golhal Kineldley work ? A :", "max_tokens": 4}}"#);
    let (code, body) = http(port, "POST", "/v1/completions", &req);
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["engram_version"], head, "{body}");
    assert!(v["choices"][0]["text"].is_string(), "{body}");
    let (code, body) = http(port, "POST", "/v1/completions", "{not json");
    assert_eq!(code, 400, "{body}");
    let (code, body) = http(port, "POST", "/v1/completions", r#"{"model": "no-such-ns", "prompt": "Q : x A :"}"#);
    assert_eq!(code, 404, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn engram_up_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, rp, hp) = (free_port(), free_port(), free_port());
    let _up = engram(
        &[
            "up",
            "--dir",
            dir.path().to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{cp}"),
            "--replica-listen",
            &format!("127.0.0.1:{rp}"),
            "--replicas",
            "3",
            "--workers",
            "2",
            "--namespace",
            "e2e",
            "--http",
            &format!("127.0.0.1:{hp}"),
        ],
        &dir.path().join("up.log"),
    );
    let coordinator = format!("http://127.0.0.1:{cp}");
    let client = Client::connect(&coordinator).await.unwrap();
    wait_ready(&client, 3).await;
    let replicas: Vec<String> = client.replicas("").await.unwrap().into_iter().map(|r| r.address).collect();
    let out = workload(&coordinator, &replicas, "e2e").await;
    check(&client, &replicas, "e2e", &out).await;
    let head = client.versions("e2e", 1).await.unwrap().head;
    tokio::task::spawn_blocking(move || completions(hp, "e2e", &head)).await.unwrap();
    bad_input(&client, &replicas[0], "e2e").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn processes_on_etcd() {
    if !engram_lineage::local_etcd::etcd_available_for_tests() {
        return;
    }
    let etcd = engram_lineage::local_etcd::LocalEtcd::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = etcd.url("/engram-e2e");
    let blobs = format!("file://{}", dir.path().join("blobs").display());
    let log = |n: &str| dir.path().join(format!("{n}.log"));
    let cp = free_port();
    let coordinator = format!("http://127.0.0.1:{cp}");
    let common = ["--store", store.as_str(), "--blobs", blobs.as_str()];
    let mut procs = vec![engram(
        &[&["serve", "coordinator", "--listen", &format!("127.0.0.1:{cp}")][..], &common].concat(),
        &log("coordinator"),
    )];
    let client = Client::connect(&coordinator).await.unwrap();
    let base = engram_model::BaseModel::load(&root().join("models/base"), &candle_core::Device::Cpu).unwrap();
    client.create_namespace("e2e", &base.hash).await.unwrap();
    for i in 0..3 {
        let listen = format!("127.0.0.1:{}", free_port());
        let id = format!("replica-{i}");
        let args =
            [&["serve", "replica", "--listen", &listen, "--coordinator", &coordinator, "--id", &id][..], &common]
                .concat();
        procs.push(engram(&args, &log(&id)));
    }
    for i in 0..2 {
        let id = format!("worker-{i}");
        procs.push(engram(
            &[&["serve", "worker", "--coordinator", &coordinator, "--id", &id][..], &common].concat(),
            &log(&id),
        ));
    }
    wait_ready(&client, 3).await;
    let replicas: Vec<String> = client.replicas("").await.unwrap().into_iter().map(|r| r.address).collect();
    let out = workload(&coordinator, &replicas, "e2e").await;
    for n in ["worker-0", "worker-1"] {
        let text = std::fs::read_to_string(log(n)).unwrap();
        eprintln!("{n}: {} deltas", text.matches("delta ").count());
    }
    check(&client, &replicas, "e2e", &out).await;
    bad_input(&client, &replicas[1], "e2e").await;
    drop(procs);
}
