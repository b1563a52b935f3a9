//! The etcd backend.
//!
//! An operation reads a consistent snapshot (every get after the first pins the first one's revision), then commits
//! its writes in one transaction guarded by the `mod_revision` of every key it read: if any of them changed, nothing
//! is written and the operation runs again on fresh data. A compare-and-swap on a head therefore has exactly one
//! winner; the losers re-run, see the moved head, and fail with a conflict.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, SortOrder, SortTarget, Txn, TxnOp, WatchOptions,
};

use crate::ops::{self, Applied, Op, Reader, Tx};
use crate::{Error, HeadChange, HeadWatch, Keys, LineageStore, Namespace, Result};

/// How long an operation keeps retrying lost races on a hot key before giving up.
const RETRY_FOR: Duration = Duration::from_secs(10);

pub struct EtcdStore {
    client: Client,
    keys: Keys,
    endpoints: Vec<String>,
    fence: std::sync::RwLock<Option<crate::Fence>>,
}

fn unavailable(e: etcd_client::Error) -> Error {
    Error::Unavailable(format!("etcd: {e}"))
}

/// A request that never reached a member (its connection failed): safe to send again, and the client's balancer
/// may pick a live member next time.
fn unreached(e: &Error) -> bool {
    matches!(e, Error::Unavailable(m) if m.contains("tcp connect error") || m.contains("transport error"))
}

impl EtcdStore {
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self> {
        if !prefix.starts_with('/') {
            return Err(Error::Invalid(format!("etcd key prefix {prefix:?} must start with '/'")));
        }
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
        let client = Client::connect(endpoints, Some(opts))
            .await
            .map_err(|e| Error::Unavailable(format!("etcd at {}: {e}", endpoints.join(","))))?;
        let store = Self { client, keys: Keys::new(prefix), endpoints: endpoints.to_vec(), fence: Default::default() };
        // Fail now, with the address in the message, rather than on the first operation.
        store
            .get_raw(&store.keys.namespaces())
            .await
            .map_err(|e| Error::Unavailable(format!("etcd at {}: {e}", endpoints.join(","))))?;
        Ok(store)
    }
}

/// Runs `f` again (a few times, briefly) while its request did not reach any member.
/// A read that failed while etcd was electing a raft leader (the member it reached lost its leader, or the leader
/// changed under the request). Reads are safe to repeat; writes are not retried on these (their outcome is unknown).
fn leaderless(e: &Error) -> bool {
    matches!(e, Error::Unavailable(m) if m.contains("leader changed") || m.contains("no leader") || m.contains("request timed out"))
}

/// Runs a read, repeating it while no member is reached or etcd is between raft leaders (an election takes about a
/// second; up to 5 s here), so a member's death does not fail the jobs that were reading at the time.
async fn retry_read<T, F, Fut>(f: F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let start = std::time::Instant::now();
    loop {
        match f().await {
            Err(e) if (unreached(&e) || leaderless(&e)) && start.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

/// Snapshot reads that remember the revision of every key read.
struct SnapshotReader {
    client: Client,
    revision: Option<i64>,
    read: BTreeMap<String, i64>,
}

#[async_trait]
impl Reader for SnapshotReader {
    async fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>> {
        let opts = self.revision.map(|r| GetOptions::new().with_revision(r));
        let resp = self.client.get(key, opts).await.map_err(unavailable)?;
        if self.revision.is_none() {
            self.revision = resp.header().map(|h| h.revision());
        }
        let kv = resp.kvs().first();
        // A missing key compares as mod_revision 0.
        self.read.insert(key.to_string(), kv.map_or(0, |kv| kv.mod_revision()));
        Ok(kv.map(|kv| kv.value().to_vec()))
    }
}

impl SnapshotReader {
    fn guards(&self) -> Vec<Compare> {
        self.read.iter().map(|(k, &rev)| Compare::mod_revision(k.as_str(), CompareOp::Equal, rev)).collect()
    }
}

#[async_trait]
impl LineageStore for EtcdStore {
    fn keys(&self) -> &Keys {
        &self.keys
    }

    fn describe(&self) -> String {
        format!("etcd {} prefix {}", self.endpoints.join(","), self.keys.prefix())
    }

    async fn apply(&self, op: Op) -> Result<Applied> {
        let started = std::time::Instant::now();
        let mut attempt = 0usize;
        while started.elapsed() < RETRY_FOR {
            attempt += 1;
            let mut reader = SnapshotReader { client: self.client.clone(), revision: None, read: BTreeMap::new() };
            let (result, writes) = {
                let mut tx = Tx::new(&mut reader);
                let r = ops::run(&self.keys, &op, &mut tx).await;
                (r, std::mem::take(&mut tx.writes))
            };
            let mut client = self.client.clone();
            let mut guards = reader.guards();
            let fence = self.fence.read().expect("fence").clone();
            if let Some(f) = &fence {
                guards.push(Compare::create_revision(f.key.as_str(), CompareOp::Equal, f.revision));
            }
            let txn = match &result {
                Err(e) if unreached(e) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                // A refusal is only final if what it was based on is still current.
                Err(Error::Unavailable(_)) => return result,
                Err(_) => Txn::new().when(guards),
                Ok(_) => Txn::new()
                    .when(guards)
                    .and_then(writes.into_iter().map(|(k, v)| TxnOp::put(k, v, None)).collect::<Vec<_>>()),
            };
            let resp = match client.txn(txn).await.map_err(unavailable) {
                Ok(r) => r,
                Err(e) if unreached(&e) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if resp.succeeded() {
                return result;
            }
            if let Some(f) = &fence {
                let held = client.get(f.key.as_str(), None).await.map_err(unavailable)?;
                if held.kvs().first().map(|kv| kv.create_revision()) != Some(f.revision) {
                    return Err(Error::Fenced(format!(
                        "election key {} is no longer ours; another leader took over",
                        f.key
                    )));
                }
            }
            // Someone wrote what we read. Back off a little (more on repeats), with jitter so racers spread out,
            // and run again.
            let jitter =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos())
                    % 400;
            tokio::time::sleep(Duration::from_micros(200 * attempt.min(20) as u64 + jitter as u64)).await;
        }
        Err(Error::Unavailable(format!("gave up after {attempt} lost races in {RETRY_FOR:?} on a contended key")))
    }

    async fn get_raw(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let resp = retry_read(|| async { self.client.clone().get(key, None).await.map_err(unavailable) }).await?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    async fn scan(&self, prefix: &str, limit: Option<usize>, newest_first: bool) -> Result<Vec<(String, Vec<u8>)>> {
        let order = if newest_first { SortOrder::Descend } else { SortOrder::Ascend };
        let mut opts = GetOptions::new().with_prefix().with_sort(SortTarget::Key, order);
        if let Some(l) = limit {
            opts = opts.with_limit(l as i64);
        }
        let resp =
            retry_read(|| async { self.client.clone().get(prefix, Some(opts.clone())).await.map_err(unavailable) })
                .await?;
        resp.kvs()
            .iter()
            .map(|kv| {
                let k = kv.key_str().map_err(|e| Error::Corrupt(format!("non-UTF-8 key under {prefix}: {e}")))?;
                Ok((k.to_string(), kv.value().to_vec()))
            })
            .collect()
    }

    fn set_fence(&self, fence: Option<crate::Fence>) {
        *self.fence.write().expect("fence") = fence;
    }

    async fn watch_head(&self, namespace: &str) -> Result<HeadWatch> {
        self.namespace(namespace).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let client = self.client.clone();
        let key = self.keys.namespace(namespace);
        tokio::spawn(watch_loop(client, key, tx));
        Ok(HeadWatch::new(rx))
    }
}

/// Level-triggered: read the record, deliver it if the head changed, watch from the revision after the read; on any
/// break (reconnect, compaction, cancel) start over from a fresh read, so no move is ever skipped.
async fn watch_loop(client: Client, key: String, tx: tokio::sync::mpsc::Sender<Result<HeadChange>>) {
    let mut last: Option<HeadChange> = None;
    let mut failures = 0u32;
    loop {
        if tx.is_closed() {
            return;
        }
        let mut c = client.clone();
        let resp = match c.get(key.as_str(), None).await {
            Ok(r) => r,
            Err(e) => {
                failures += 1;
                tracing::warn!(key, error = %e, failures, "head watch: reading the namespace failed; retrying");
                tokio::time::sleep(Duration::from_millis(100 * failures.min(20) as u64)).await;
                continue;
            }
        };
        let revision = resp.header().map_or(0, |h| h.revision());
        if let Some(kv) = resp.kvs().first() {
            if !deliver(&tx, &mut last, kv.value()).await {
                return;
            }
        }
        let opts = WatchOptions::new().with_start_revision(revision + 1);
        let mut stream = match c.watch(key.as_str(), Some(opts)).await {
            Ok(s) => s,
            Err(e) => {
                failures += 1;
                tracing::warn!(key, error = %e, failures, "head watch: watch failed; retrying");
                tokio::time::sleep(Duration::from_millis(100 * failures.min(20) as u64)).await;
                continue;
            }
        };
        failures = 0;
        loop {
            match stream.message().await {
                Ok(Some(msg)) => {
                    if msg.canceled() || msg.compact_revision() > 0 {
                        tracing::info!(key, compact_revision = msg.compact_revision(), "head watch restarted");
                        break;
                    }
                    for ev in msg.events() {
                        if let Some(kv) = ev.kv() {
                            if !kv.value().is_empty() && !deliver(&tx, &mut last, kv.value()).await {
                                return;
                            }
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(key, error = %e, "head watch stream broke; resuming");
                    break;
                }
            }
        }
    }
}

/// Sends the head in `value` if it differs from the last one sent; false when the watcher is gone.
async fn deliver(
    tx: &tokio::sync::mpsc::Sender<Result<HeadChange>>,
    last: &mut Option<HeadChange>,
    value: &[u8],
) -> bool {
    let ns: Namespace = match serde_json::from_slice(value) {
        Ok(ns) => ns,
        Err(e) => return tx.send(Err(Error::Corrupt(format!("namespace record: {e}")))).await.is_ok(),
    };
    let change = HeadChange { namespace: ns.name, head: ns.head, seq: ns.seq };
    if last.as_ref().is_some_and(|l| l.head == change.head || l.seq >= change.seq) {
        if let Some(l) = last.as_mut() {
            l.seq = l.seq.max(change.seq);
        }
        return true;
    }
    *last = Some(change.clone());
    tx.send(Ok(change)).await.is_ok()
}
