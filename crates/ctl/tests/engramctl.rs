//! engramctl end to end: the real binary against a real store.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use engram_lora::{Delta, Factors, Meta};

fn ctl(store: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_engramctl"))
        .arg("--store")
        .arg(store)
        .args(["--actor", "test-operator"])
        .args(args)
        .env_remove("ENGRAM_BLOBS")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(store: &str, args: &[&str]) -> String {
    let (success, out, err) = ctl(store, args);
    assert!(success, "engramctl {args:?} failed: {err}");
    out
}

fn fails(store: &str, args: &[&str], needle: &str) {
    let (success, _, err) = ctl(store, args);
    assert!(!success, "engramctl {args:?} should have failed");
    assert!(err.contains(needle), "engramctl {args:?}: expected {needle:?} in {err:?}");
}

/// A one-layer rank-1 delta whose weight change is `value * e_0 e_0^T`: its norm is |scale * value|.
fn write_delta(dir: &Path, name: &str, value: f32) -> String {
    let f = Factors { rank: 1, in_dim: 3, out_dim: 2, a: vec![1.0, 0.0, 0.0], b: vec![value, 0.0] };
    let meta = Meta { base_model: "b4se".into(), scale: 2.0, ..Default::default() };
    let d = Delta { meta, adapters: BTreeMap::from([((0, "mlp.down_proj".to_string()), f)]), memory: None };
    let path = dir.join(name);
    std::fs::write(&path, d.encode().unwrap()).unwrap();
    path.display().to_string()
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn help_explains_every_command() {
    let out = Command::new(env!("CARGO_BIN_EXE_engramctl")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["log", "show", "diff", "rollback", "promote", "tag", "history", "gc", "--store"] {
        assert!(help.contains(cmd), "--help lacks {cmd}: {help}");
    }
}

#[test]
fn lineage_audit_and_rollback_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", dir.path().join("data").display());
    let s = store.as_str();
    ok(s, &["create-namespace", "acme", "--base-model", "b4se"]);
    fails(s, &["log", "nobody"], "namespace \"nobody\"");

    let d1 = write_delta(dir.path(), "d1.safetensors", 1.0);
    let d2 = write_delta(dir.path(), "d2.safetensors", 3.0);
    let d3 = write_delta(dir.path(), "d3.safetensors", -1.0);
    let v1 = json(&ok(s, &["--json", "import", "acme", &d1, "--promote"]))["id"].as_str().unwrap().to_string();
    let v2 = json(&ok(s, &["--json", "import", "acme", &d2, "--promote"]))["id"].as_str().unwrap().to_string();
    // A candidate built beside v2, on v1.
    let v3 =
        json(&ok(s, &["--json", "import", "acme", &d3, "--parent", &v1[..10]]))["id"].as_str().unwrap().to_string();
    std::fs::write(dir.path().join("junk"), b"junk").unwrap();
    fails(s, &["import", "acme", dir.path().join("junk").to_str().unwrap()], "not an engram LoRA delta");

    let log = ok(s, &["log", "acme"]);
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines[0].starts_with("VERSION"), "{log}");
    assert!(lines[1].starts_with(&v3[..12]) && lines[1].contains("candidate"), "{log}");
    assert!(lines[2].starts_with(&format!("{} *", &v2[..12])) && lines[2].contains("live"), "{log}");
    assert!(lines[3].contains("superseded"), "{log}");

    let shown = ok(s, &["show", &v2[..8]]);
    assert!(shown.contains(&format!("ancestry    {} -> {} -> base", &v2[..12], &v1[..12])), "{shown}");

    // v1 -> v3 (siblings over v1): removes v2 (2*3 = 6) and adds v3 (2*-1 = -2): the change is -8 * e0 e0^T.
    let d = json(&ok(s, &["--json", "diff", &v2, &v3]));
    assert_eq!(d["common_ancestor"].as_str(), Some(v1.as_str()));
    let norm = d["layer_norms"]["0"].as_f64().unwrap();
    assert!((norm - 8.0).abs() < 1e-5, "{d}");

    ok(s, &["tag", "acme", "stable", &v1[..10]]);
    fails(s, &["rollback", "acme", "--to", &v3[..10], "--reason", "x"], "not an ancestor");
    fails(s, &["rollback", "acme", "--to", "stable"], "--reason");
    let rb = ok(s, &["rollback", "acme", "--to", "stable", "--reason", "bad answers in prod"]);
    assert!(rb.contains(&format!("head {} -> {}", &v2[..12], &v1[..12])), "{rb}");
    // v3 was built on v1, which is the head again: it can be promoted now.
    ok(s, &["promote", "acme", &v3[..10]]);
    fails(s, &["promote", "acme", &v2[..10]], "only a candidate");

    let history = json(&ok(s, &["--json", "history", "acme"]));
    let rollback = history.as_array().unwrap().iter().find(|e| e["kind"] == "rolled-back").unwrap();
    assert_eq!(rollback["actor"], "test-operator");
    assert_eq!(rollback["reason"], "bad answers in prod");
    assert!(ok(s, &["history", "acme"]).contains("(rollback)"));

    // v2 is now unreachable from the head (v3 -> v1) and the tag (v1): gc finds its blob, and deletes it only
    // when asked.
    let dry = json(&ok(s, &["--json", "gc", "--min-age-s", "0"]));
    assert_eq!((dry["blobs"].as_u64(), dry["unreachable"].as_array().unwrap().len()), (Some(3), 1));
    assert_eq!(json(&ok(s, &["--json", "gc", "--min-age-s", "0"]))["unreachable"].as_array().unwrap().len(), 1);
    let young = json(&ok(s, &["--json", "gc"]));
    assert_eq!((young["too_young"].as_u64(), young["unreachable"].as_array().unwrap().len()), (Some(1), 0));
    ok(s, &["gc", "--apply", "--min-age-s", "0"]);
    assert_eq!(json(&ok(s, &["--json", "gc", "--min-age-s", "0"]))["blobs"].as_u64(), Some(2));
    // The version record stays for the audit trail; only its bytes are gone.
    assert!(ok(s, &["show", &v2[..10]]).contains("rolled-back"));
    fails(s, &["diff", &v2, &v1], "not found: blob");
}

#[test]
fn rollback_on_etcd_reaches_a_watcher() {
    if !engram_lineage::local_etcd::etcd_available_for_tests() {
        return;
    }
    let etcd = engram_lineage::local_etcd::LocalEtcd::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = etcd.url("/ctl-test");
    let blobs = format!("file://{}", dir.path().join("blobs").display());
    let s = store.as_str();
    ok(s, &["create-namespace", "acme", "--base-model", "b4se"]);
    fails(s, &["import", "acme", "x"], "reading x");
    let d1 = write_delta(dir.path(), "d1.safetensors", 1.0);
    let d2 = write_delta(dir.path(), "d2.safetensors", 2.0);
    let v1 = json(&ok(s, &["--json", "--blobs", &blobs, "import", "acme", &d1, "--promote"]))["id"]
        .as_str()
        .unwrap()
        .to_string();
    ok(s, &["--blobs", &blobs, "import", "acme", &d2, "--promote"]);
    let watcher = Command::new(env!("CARGO_BIN_EXE_engramctl"))
        .args(["--store", s, "--json", "watch", "acme", "--count", "2"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    ok(s, &["rollback", "acme", "--to", &v1[..10], "--reason", "canary regressed"]);
    let out = watcher.wait_with_output().unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().map(json).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["head"].as_str(), Some(v1.as_str()));
    // etcdctl-style inspection: keys are readable and values are JSON.
    let ns = json(&ok(s, &["--json", "namespaces"]));
    assert_eq!(ns[0]["head"].as_str(), Some(v1.as_str()));
}

/// With `--coordinator`, log, show and rollback go through the coordinator's API (which also commits replicas).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_go_through_the_coordinator() {
    use engram_lineage::NewVersion;
    let dir = tempfile::tempdir().unwrap();
    let store = engram_lineage::open(&format!("file://{}", dir.path().display())).await.unwrap();
    let blobs = engram_lineage::BlobStore::open("memory://").unwrap();
    store.create_namespace("ns", &"b".repeat(64), "t").await.unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        let new = NewVersion {
            namespace: "ns".into(),
            parent: ids.last().cloned(),
            delta_hash: engram_lineage::blob::digest(format!("d{i}").as_bytes()),
            creator: "t".into(),
            ..Default::default()
        };
        let v = store.create_version(new).await.unwrap();
        store.promote("ns", ids.last(), &v.id, "t").await.unwrap();
        ids.push(v.id);
    }
    let c = engram_coordinator::Coordinator::new(
        Default::default(),
        store.clone(),
        blobs,
        std::sync::Arc::new(engram_transport::GrpcStream::default()),
    );
    c.recover().await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(engram_coordinator::serve(c, listener, std::future::pending()));
    let api = |args: &[&str]| {
        // The store flag points nowhere usable: these commands must not need it.
        let mut all = vec!["--coordinator", address.as_str()];
        all.extend_from_slice(args);
        ctl("file:///nonexistent/engram", &all)
    };
    let (okay, out, err) = api(&["log", "ns"]);
    assert!(okay, "{err}");
    assert!(out.contains(&format!("{} *", ids[2].short())), "the head is not marked: {out}");
    assert_eq!(out.lines().count(), 4, "{out}");
    let (okay, out, err) = api(&["show", "head", "-n", "ns"]);
    assert!(okay && out.contains(ids[2].as_str()), "{err}{out}");
    let (okay, out, err) = api(&["rollback", "ns", "--to", ids[0].short(), "--reason", "test"]);
    assert!(okay && out.contains("on every replica"), "{err}{out}");
    assert_eq!(store.namespace("ns").await.unwrap().head.as_ref(), Some(&ids[0]));
    let (okay, _, err) = api(&["rollback", "ns", "--to", ids[2].short(), "--reason", "forward"]);
    assert!(!okay && err.contains("not an ancestor"), "{err}");
    let (okay, _, err) = api(&["job", "j1-0"]);
    assert!(!okay && err.contains("not found"), "{err}");
    let (okay, _, err) = ctl("file:///nonexistent/engram", &["job", "j1-0"]);
    assert!(!okay && err.contains("--coordinator"), "{err}");
}
