//! The service end to end, as real processes on loopback: `engram up` on the embedded store, and a coordinator,
//! two workers and three replicas as separate `engram serve` processes on a real etcd. Eight SDK clients
//! consolidate 50 documents while another client generates in a loop; afterwards every job ran exactly once, every
//! replica serves the same head, and no answer came from a version that was not the head (or the one just before)
//! when it was served. Bad input is refused with `InvalidArgument` and changes nothing.

mod common;

use common::*;
use engram_sdk::{pb, Client};

const DOCS: usize = 50;
const CLIENTS: usize = 8;

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
    let mut delta = engram_lora::Delta::default();
    delta.meta.base_model = "0".repeat(64);
    delta.meta.scale = 1.0;
    delta.adapters.insert(
        (0, "mlp.down_proj".into()),
        engram_lora::Factors::new(1, 704, 256, vec![0.0; 704], vec![0.0; 256]).unwrap(),
    );
    let bytes = delta.encode().unwrap();
    let hash = engram_lineage::blob::digest(&bytes);
    let version = engram_lineage::VersionId::derive(None, &hash, &"0".repeat(64)).to_string();
    let item = engram_transport::Staging {
        namespace: ns.into(),
        version,
        chain: vec![],
        bytes: bytes.into(),
        hash,
        blake3: None,
    };
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
    // `--replica-listen` and `--http` are each the first of three consecutive ports (one per replica).
    let (cp, hp, rp) = (free_port(), free_ports(3), free_ports(3));
    let _logs = KeepLogsOnFailure(dir.path().to_path_buf(), "engram_up_on_the_embedded_store");
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
            // Compactions under load: replicas stage them like any version, answers may come from them.
            "--compact-every",
            "8",
        ],
        &dir.path().join("up.log"),
    );
    let coordinator = format!("http://127.0.0.1:{cp}");
    let client = Client::connect(&coordinator).await.unwrap();
    wait_ready(&client, 3).await;
    let replicas: Vec<String> = client.replicas("").await.unwrap().into_iter().map(|r| r.address).collect();
    let out = workload(&coordinator, &replicas, "e2e", DOCS, CLIENTS).await;
    check(&client, &replicas, "e2e", &out, DOCS).await;
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
    let out = workload(&coordinator, &replicas, "e2e", DOCS, CLIENTS).await;
    for n in ["worker-0", "worker-1"] {
        let text = std::fs::read_to_string(log(n)).unwrap();
        eprintln!("{n}: {} deltas", text.matches("delta ").count());
    }
    check(&client, &replicas, "e2e", &out, DOCS).await;
    bad_input(&client, &replicas[1], "e2e").await;
    drop(procs);
}
