//! The embedded backend: one redb file, no server.
//!
//! Writes go through one committer thread that takes every operation waiting in its queue, runs them one after
//! another inside a single write transaction and commits once (group commit): one fsync is shared by all
//! concurrent writers, and each operation still sees the ones before it. An operation that fails leaves nothing
//! behind because its writes are only applied after it succeeds.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, oneshot};

use crate::ops::{self, Applied, Op, Reader, Tx};
use crate::{Error, HeadChange, HeadWatch, Keys, LineageStore, Result};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("lineage");
/// Most operations folded into one commit.
const MAX_GROUP: usize = 512;

struct Request {
    op: Op,
    reply: oneshot::Sender<Result<Applied>>,
}

pub struct EmbeddedStore {
    db: Arc<Database>,
    keys: Keys,
    path: PathBuf,
    queue: Mutex<Option<mpsc::Sender<Request>>>,
    committer: Mutex<Option<JoinHandle<()>>>,
    heads: broadcast::Sender<HeadChange>,
}

fn storage(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("embedded store: {e}"))
}

impl EmbeddedStore {
    /// Opens (creating if needed) `dir/lineage.redb`.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| storage(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join("lineage.redb");
        let db = Database::create(&path).map_err(|e| storage(format!("opening {}: {e}", path.display())))?;
        let w = db.begin_write().map_err(storage)?;
        w.open_table(KV).map_err(storage)?;
        w.commit().map_err(storage)?;
        let db = Arc::new(db);
        let keys = Keys::new("");
        let (tx, rx) = mpsc::channel::<Request>();
        let (heads, _) = broadcast::channel(1024);
        let committer = {
            let (db, keys, heads) = (db.clone(), keys.clone(), heads.clone());
            std::thread::Builder::new()
                .name("lineage-commit".into())
                .spawn(move || commit_loop(&db, &keys, &rx, &heads))
                .map_err(storage)?
        };
        Ok(Self { db, keys, path, queue: Mutex::new(Some(tx)), committer: Mutex::new(Some(committer)), heads })
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // Close the queue, then wait for the committer so the file is released when this returns.
        self.queue.lock().expect("queue lock").take();
        if let Some(h) = self.committer.lock().expect("committer lock").take() {
            let _ = h.join();
        }
    }
}

struct TxnReader<'a> {
    txn: &'a redb::WriteTransaction,
}

#[async_trait]
impl Reader for TxnReader<'_> {
    async fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>> {
        let table = self.txn.open_table(KV).map_err(storage)?;
        let v = table.get(key).map_err(storage)?.map(|g| g.value().to_vec());
        Ok(v)
    }
}

fn commit_loop(db: &Database, keys: &Keys, rx: &mpsc::Receiver<Request>, heads: &broadcast::Sender<HeadChange>) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(r) => group.push(r),
                Err(_) => break,
            }
        }
        match run_group(db, keys, &group) {
            Ok((results, changes)) => {
                for (req, res) in group.into_iter().zip(results) {
                    let _ = req.reply.send(res);
                }
                for c in changes {
                    let _ = heads.send(c);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, ops = group.len(), "lineage commit failed");
                for req in group {
                    let _ = req.reply.send(Err(Error::Unavailable(format!("embedded store commit failed: {e}"))));
                }
            }
        }
    }
}

type GroupResult = (Vec<Result<Applied>>, Vec<HeadChange>);

fn run_group(db: &Database, keys: &Keys, group: &[Request]) -> Result<GroupResult> {
    let txn = db.begin_write().map_err(storage)?;
    let mut results = Vec::with_capacity(group.len());
    let mut changes = Vec::new();
    for req in group {
        let mut reader = TxnReader { txn: &txn };
        let mut tx = Tx::new(&mut reader);
        // The reader never awaits anything, so this future completes in one poll.
        let res = futures::executor::block_on(ops::run(keys, &req.op, &mut tx));
        if res.is_ok() {
            let mut table = txn.open_table(KV).map_err(storage)?;
            for (k, v) in &tx.writes {
                table.insert(k.as_str(), v.as_slice()).map_err(storage)?;
            }
            changes.append(&mut tx.head_changes);
        }
        results.push(res);
    }
    txn.commit().map_err(storage)?;
    Ok((results, changes))
}

#[async_trait]
impl LineageStore for EmbeddedStore {
    fn keys(&self) -> &Keys {
        &self.keys
    }

    fn describe(&self) -> String {
        format!("embedded store {}", self.path.display())
    }

    async fn apply(&self, op: Op) -> Result<Applied> {
        let (reply, rx) = oneshot::channel();
        {
            let q = self.queue.lock().expect("queue lock");
            let q = q.as_ref().ok_or_else(|| Error::Unavailable("embedded store is closed".into()))?;
            q.send(Request { op, reply }).map_err(|_| Error::Unavailable("lineage committer stopped".into()))?;
        }
        rx.await.map_err(|_| Error::Unavailable("lineage committer stopped".into()))?
    }

    async fn get_raw(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let r = self.db.begin_read().map_err(storage)?;
        let t = r.open_table(KV).map_err(storage)?;
        let v = t.get(key).map_err(storage)?.map(|g| g.value().to_vec());
        Ok(v)
    }

    async fn scan(&self, prefix: &str, limit: Option<usize>, newest_first: bool) -> Result<Vec<(String, Vec<u8>)>> {
        let r = self.db.begin_read().map_err(storage)?;
        let t = r.open_table(KV).map_err(storage)?;
        let range = t.range(prefix..).map_err(storage)?;
        let mut rows = Vec::new();
        let take = |rows: &mut Vec<(String, Vec<u8>)>,
                    item: redb::Result<(redb::AccessGuard<&str>, redb::AccessGuard<&[u8]>)>|
         -> Result<bool> {
            let (k, v) = item.map_err(storage)?;
            if !k.value().starts_with(prefix) {
                return Ok(false);
            }
            rows.push((k.value().to_string(), v.value().to_vec()));
            Ok(true)
        };
        if newest_first {
            // Keys with the prefix form one contiguous run; collect it, then take from the end.
            for item in range {
                if !take(&mut rows, item)? {
                    break;
                }
            }
            rows.reverse();
            if let Some(l) = limit {
                rows.truncate(l);
            }
        } else {
            for item in range {
                if limit.is_some_and(|l| rows.len() >= l) || !take(&mut rows, item)? {
                    break;
                }
            }
        }
        Ok(rows)
    }

    async fn watch_head(&self, namespace: &str) -> Result<HeadWatch> {
        // Subscribe before reading, so no move between the read and the subscription is lost.
        let mut sub = self.heads.subscribe();
        let ns = self.namespace(namespace).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let mut last = HeadChange { namespace: ns.name.clone(), head: ns.head, seq: ns.seq };
        let _ = tx.send(Ok(last.clone())).await;
        let db = self.db.clone();
        let keys = self.keys.clone();
        tokio::spawn(async move {
            loop {
                let change = match sub.recv().await {
                    Ok(c) if c.namespace == last.namespace => c,
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Fell behind: deliver the current head instead of the moves we missed (if it moved).
                        match read_head(&db, &keys, &last.namespace) {
                            Ok(c) if c.head == last.head => {
                                last.seq = last.seq.max(c.seq);
                                continue;
                            }
                            Ok(c) => c,
                            Err(e) => {
                                let _ = tx.send(Err(e)).await;
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if change.seq > last.seq {
                    last = change.clone();
                    if tx.send(Ok(change)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(HeadWatch::new(rx))
    }
}

fn read_head(db: &Database, keys: &Keys, namespace: &str) -> Result<HeadChange> {
    let r = db.begin_read().map_err(storage)?;
    let t = r.open_table(KV).map_err(storage)?;
    let key = keys.namespace(namespace);
    let bytes =
        t.get(key.as_str()).map_err(storage)?.ok_or_else(|| Error::NotFound(format!("namespace {namespace:?}")))?;
    let ns: crate::Namespace =
        serde_json::from_slice(bytes.value()).map_err(|e| Error::Corrupt(format!("{key}: {e}")))?;
    Ok(HeadChange { namespace: ns.name, head: ns.head, seq: ns.seq })
}
