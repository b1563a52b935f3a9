//! Crash safety: a writer process killed with SIGKILL at a random moment while recording and promoting versions
//! never leaves a head on a missing blob, a version without its blob, or a half-written version.
//!
//! The writer is this test binary re-run in child mode (`ENGRAM_CRASH_CHILD` set), so the kill hits real code paths.

use std::process::{Command, Stdio};
use std::time::Duration;

use engram_lineage::{admin, BlobStore, LineageStore, NewVersion, Status, Version};

const CHILD_ENV: &str = "ENGRAM_CRASH_CHILD";

/// Child mode: record and promote versions forever (until killed).
#[test]
#[ignore = "runs only as the crash test's child process"]
fn crash_writer_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else { return };
    let (store_url, blob_url) = spec.split_once('|').expect("store|blobs");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let store = engram_lineage::open(store_url).await.unwrap();
        let blobs = BlobStore::open(blob_url).unwrap();
        let _ = store.create_namespace("crash", "base-hash", "writer").await;
        println!("ready");
        for i in 0u64.. {
            let head = store.namespace("crash").await.unwrap().head;
            // A delta big enough that the kill often lands inside the blob write.
            let bytes: Vec<u8> = (0..256 * 1024).map(|j| (i.wrapping_mul(31) ^ j as u64) as u8).collect();
            let new = NewVersion {
                namespace: "crash".into(),
                parent: head.clone(),
                injector: "crash-test".into(),
                creator: format!("writer-{}", std::process::id()),
                ..Default::default()
            };
            let v = admin::record(store.as_ref(), &blobs, new, bytes.into()).await.unwrap();
            store.promote("crash", head.as_ref(), &v.id, "writer").await.unwrap();
        }
    });
}

async fn check_invariants(store: &dyn LineageStore, blobs: &BlobStore) -> usize {
    let ns = store.namespace("crash").await.unwrap();
    let mut live = 0;
    let rows = store.scan(&store.keys().versions(), None, false).await.unwrap();
    for (key, bytes) in &rows {
        let v: Version = serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("half-written version {key}: {e}"));
        let got = blobs.get(&v.delta_hash).await.unwrap_or_else(|e| panic!("version {} lost its delta: {e}", v.id));
        assert_eq!(got.len() as u64, v.delta_size);
        if v.status == Status::Live {
            live += 1;
            assert_eq!(ns.head.as_ref(), Some(&v.id), "a live version that is not the head");
        }
    }
    if let Some(head) = &ns.head {
        let chain = store.ancestry(head, None).await.unwrap();
        assert!(chain.iter().skip(1).all(|v| v.status == Status::Superseded), "the head's ancestors are superseded");
        assert_eq!(live, 1);
    }
    // Every log entry names a recorded version.
    assert_eq!(store.log("crash", None).await.unwrap().len(), rows.len());
    rows.len()
}

/// Kills the writer even when an assertion fails first, so no test leaves a process behind.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn crash_rounds(store_url: String, blob_url: String) {
    let exe = std::env::current_exe().unwrap();
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut total = 0;
    for round in 0..4 {
        let mut child = KillOnDrop(
            Command::new(&exe)
                .args(["--exact", "crash_writer_child", "--ignored", "--nocapture", "--test-threads=1"])
                .env(CHILD_ENV, format!("{store_url}|{blob_url}"))
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
        let child = &mut child.0;
        // Wait until the writer is connected and writing, then kill it at a random moment.
        let out = child.stdout.take().unwrap();
        let ready = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            std::io::BufReader::new(out).lines().map_while(Result::ok).any(|l| l.ends_with("ready"))
        });
        assert!(tokio::time::timeout(Duration::from_secs(30), ready).await.unwrap().unwrap(), "writer never got ready");
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(400 + seed % 600)).await;
        assert!(child.try_wait().unwrap().is_none(), "writer died on its own in round {round}");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let store = engram_lineage::open(&store_url).await.unwrap();
        let blobs = BlobStore::open(&blob_url).unwrap();
        let n = check_invariants(store.as_ref(), &blobs).await;
        assert!(n > total || round == 0, "round {round} recorded nothing new ({n} versions)");
        total = n;
    }
    assert!(total >= 4, "only {total} versions were written across the rounds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_survives_sigkill_of_its_writer() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", dir.path().join("lineage").display());
    let blobs = format!("file://{}", dir.path().join("blobs").display());
    crash_rounds(store, blobs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_survives_sigkill_of_its_writer() {
    if !engram_lineage::local_etcd::etcd_available_for_tests() {
        return;
    }
    let etcd = engram_lineage::local_etcd::LocalEtcd::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let blobs = format!("file://{}", dir.path().join("blobs").display());
    crash_rounds(etcd.url("/crash-test"), blobs).await;
}
